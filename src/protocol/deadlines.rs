//! The core's clocks: the heartbeat it sends after `t/2` of silence, the
//! heartbeat timeout after `2t` of hearing nothing, the close handshake's
//! bound, `blocked_connection_timeout`, and the handshake's
//! `stack_timeout`. None of them is a timer: [`Connection::poll_timeout`]
//! says when the next one is due and [`Connection::handle_timeout`] acts on
//! whatever is due, so a face needs one timer of its own.
//!
//! With a heartbeat timeout `t`, a heartbeat frame is queued whenever
//! nothing was sent for `t/2`, and the broker is declared dead when nothing
//! at all was received for `2t` ([`Error::AmqpHeartbeatTimeout`]; no Close
//! handshake). pika 1.1.0 checks only every `t + 5 s`; we follow the spec.

use std::time::{Duration, Instant};

use super::{Connection, Phase};
use crate::error::Error;
use crate::frame;

impl Connection {
    fn heartbeat_period(&self) -> Option<Duration> {
        let running = matches!(self.phase, Phase::Tune | Phase::Open | Phase::Closing);
        (running && self.heartbeat > 0).then(|| Duration::from_secs(u64::from(self.heartbeat)))
    }

    fn heartbeat_send_due(&self) -> Option<Instant> {
        self.heartbeat_period().map(|t| self.last_sent + t / 2)
    }

    fn heartbeat_dead_at(&self) -> Option<Instant> {
        self.heartbeat_period().map(|t| self.last_received + t * 2)
    }

    fn blocked_deadline(&self) -> Option<Instant> {
        let since = self.blocked_since?;
        self.params
            .blocked_connection_timeout()
            // Beyond the clock's range (Duration::MAX): no deadline.
            .and_then(|bound| since.checked_add(bound))
    }

    fn handshake_deadline(&self) -> Option<Instant> {
        if self.phase.is_opening() {
            self.config.handshake_deadline.map(|(at, _)| at)
        } else {
            None
        }
    }

    /// The next moment something is due (a heartbeat to send, the
    /// heartbeat, close, blocked or handshake deadline); `None` when
    /// nothing is. Call [`Connection::handle_timeout`] then — early calls
    /// are harmless.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Closed {
            return None;
        }
        [
            self.heartbeat_send_due(),
            self.heartbeat_dead_at(),
            self.close_deadline,
            self.blocked_deadline(),
            self.handshake_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Acts on every deadline due at `now`: queues a heartbeat, or ends the
    /// connection (heartbeat timeout, close bound, blocked timeout,
    /// handshake timeout).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        if let (Some(at), Some((_, bound))) =
            (self.handshake_deadline(), self.config.handshake_deadline)
        {
            if now >= at {
                self.end(Error::StackTimeout {
                    address: self.config.peer.clone(),
                    timeout: bound,
                });
                return;
            }
        }
        if let Some(t) = self.heartbeat_period() {
            let silence = now.saturating_duration_since(self.last_received);
            if silence >= t * 2 {
                log::warn!("no data from the broker for {silence:?}: heartbeat timeout");
                self.end(Error::AmqpHeartbeatTimeout {
                    timeout: t,
                    silence,
                });
                return;
            }
        }
        if self.close_deadline.is_some_and(|at| now >= at) {
            let bound = self
                .params
                .socket_timeout()
                .unwrap_or(super::DEFAULT_CLOSE_TIMEOUT);
            log::warn!(
                "close handshake not answered within {bound:?} ({}); dropping the socket",
                self.close_progress()
            );
            let reason = self
                .close_reason
                .clone()
                .unwrap_or(Error::ConnectionOpenAborted);
            self.end(reason);
            return;
        }
        if let (Some(at), Some(bound)) = (
            self.blocked_deadline(),
            self.params.blocked_connection_timeout(),
        ) {
            if now >= at {
                self.end(Error::ConnectionBlockedTimeout { timeout: bound });
                return;
            }
        }
        if self.heartbeat_send_due().is_some_and(|at| now >= at) {
            frame::encode_heartbeat(&mut self.outbound);
            // Counted as sent: the next one is due t/2 from now even if the
            // socket is slow to take this one.
            self.last_sent = now;
        }
    }
}
