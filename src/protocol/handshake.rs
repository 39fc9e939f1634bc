//! Channel 0: the handshake (Start, Secure, Tune, Open), blocked and
//! unblocked, update-secret, both close handshakes, and what malformed or
//! unexpected input and a lost stream mean in each phase.
//!
//! Negotiation (Connection.Tune): `channel_max` and `frame_max` take the
//! smaller of ours and the broker's, where 0 from either side means "no
//! limit" (the other side's value wins; 0 on both sides is 65535 channels
//! and no frame limit). The heartbeat is what [`Heartbeat::tune`] makes of
//! the broker's proposal. A broker proposing a frame_max below the spec's
//! 4096 does not speak AMQP 0-9-1: the attempt fails.
//!
//! [`Heartbeat::tune`]: crate::Heartbeat::tune

use std::time::Instant;

use super::{Connection, Event, Phase, truncate_short};
use crate::error::{CodecError, Error, UNEXPECTED_FRAME};
use crate::frame::FRAME_MIN_SIZE;
use crate::spec::{self, Method, connection};
use crate::table::FieldValue;

/// The smaller of two limits where 0 means "no limit".
pub(super) fn negotiate(ours: u32, theirs: u32) -> u32 {
    if ours == 0 || theirs == 0 {
        ours.max(theirs)
    } else {
        ours.min(theirs)
    }
}

impl Connection {
    pub(super) fn handle_connection_method(&mut self, method: Method, now: Instant) {
        let phase = self.phase;
        match (phase, method) {
            (_, Method::ConnectionClose(close)) => self.on_broker_close(phase, close),
            (Phase::Protocol, Method::ConnectionStart(start)) => self.on_start(start),
            (Phase::Start, Method::ConnectionSecure(_)) => {
                let offered = self
                    .server_properties
                    .get("mechanisms")
                    .and_then(FieldValue::as_str)
                    .unwrap_or("PLAIN")
                    .to_string();
                let response = self
                    .params
                    .credentials()
                    .response_for(&offered)
                    .map(|(_, r)| r)
                    .unwrap_or_default();
                self.send_or_log(&connection::SecureOk { response }.into());
            }
            (Phase::Start, Method::ConnectionTune(tune)) => self.on_tune(tune, now),
            (Phase::Tune, Method::ConnectionOpenOk(_)) => {
                self.phase = Phase::Open;
                self.opened = true;
                log::info!("connection open");
                self.events.push_back(Event::Opened);
            }
            (Phase::Open | Phase::Closing, Method::ConnectionBlocked(blocked)) => {
                self.blocked = Some(blocked.reason.clone());
                self.blocked_since.get_or_insert(now);
                if phase == Phase::Open {
                    self.events.push_back(Event::Blocked(blocked));
                }
            }
            (Phase::Open | Phase::Closing, Method::ConnectionUnblocked(unblocked)) => {
                self.blocked = None;
                self.blocked_since = None;
                self.events.push_back(Event::Unblocked(unblocked));
            }
            (Phase::Open | Phase::Closing, Method::ConnectionUpdateSecretOk(ok)) => {
                match self.secret_updates.pop_front() {
                    Some((request, method)) => self.events.push_back(Event::Reply {
                        request,
                        channel: None,
                        method,
                        result: Ok(super::Reply::Method(ok.into())),
                    }),
                    None => log::warn!("Connection.UpdateSecretOk with no update-secret waiting"),
                }
            }
            (Phase::Closing, Method::ConnectionCloseOk(_)) => {
                let reason = self
                    .close_reason
                    .clone()
                    .unwrap_or(Error::ConnectionClosedByClient {
                        reply_code: 200,
                        reply_text: "Normal shutdown".into(),
                    });
                self.end(reason);
            }
            (Phase::Closing, method) if self.close_sent => {
                // Once our Close is out, only Close and CloseOk matter.
                log::debug!("discarding {} while closing", method.name());
            }
            (phase, method) => {
                self.unexpected(format!("{} on channel 0 while {phase:?}", method.name()))
            }
        }
    }

    /// Sends a connection-level method; an encoding failure (which only a
    /// bug could cause: our own values) is logged.
    fn send_or_log(&mut self, method: &Method) {
        if let Err(e) = self.send_method(0, method) {
            log::warn!("cannot send {}: {e}", method.name());
        }
    }

    fn on_start(&mut self, start: connection::Start) {
        if (start.version_major, start.version_minor) != (0, 9) {
            self.end(Error::IncompatibleProtocol {
                detail: format!(
                    "the broker speaks AMQP {}-{}, we speak 0-9-1",
                    start.version_major, start.version_minor
                ),
            });
            return;
        }
        let offered = start.mechanisms.to_string_lossy().into_owned();
        let mut server_properties = start.server_properties;
        server_properties.insert("mechanisms", offered.as_str());
        self.server_properties = server_properties;
        match self.params.credentials().response_for(&offered) {
            Ok((mechanism, response)) => {
                let start_ok = connection::StartOk {
                    client_properties: self.params.effective_client_properties(),
                    mechanism: mechanism.to_string(),
                    response,
                    locale: self.params.locale().to_string(),
                };
                self.phase = Phase::Start;
                self.send_or_log(&start_ok.into());
                // erase_on_connect: the password goes once it is sent.
                self.params.erase_credentials_if_asked();
            }
            Err(e) => {
                log::warn!("connect: {e}");
                self.end(e);
            }
        }
    }

    fn on_tune(&mut self, tune: connection::Tune, now: Instant) {
        if tune.frame_max != 0 && tune.frame_max < FRAME_MIN_SIZE {
            self.end(Error::IncompatibleProtocol {
                detail: format!(
                    "the broker's Connection.Tune proposes frame_max {}, below AMQP 0-9-1's \
                     minimum of {FRAME_MIN_SIZE}",
                    tune.frame_max
                ),
            });
            return;
        }
        let mut channel_max = negotiate(
            u32::from(self.params.channel_max()),
            u32::from(tune.channel_max),
        ) as u16;
        if channel_max == 0 {
            channel_max = u16::MAX;
        }
        let frame_max = negotiate(self.params.frame_max(), tune.frame_max);
        let heartbeat = self.params.heartbeat().tune(tune.heartbeat);
        self.channel_max = channel_max;
        self.frame_max = frame_max;
        self.heartbeat = heartbeat;
        self.phase = Phase::Tune;
        let tune_ok = connection::TuneOk {
            channel_max,
            frame_max,
            heartbeat,
        };
        let open = connection::Open {
            virtual_host: self.params.virtual_host().to_string(),
            ..Default::default()
        };
        self.send_or_log(&tune_ok.into());
        self.send_or_log(&open.into());
        // The heartbeat clocks start with the tuning.
        self.last_received = now;
    }

    fn on_broker_close(&mut self, phase: Phase, close: connection::Close) {
        // Always answered, during the handshake too.
        self.send_or_log(&connection::CloseOk {}.into());
        let (reply_code, reply_text) = (close.reply_code, close.reply_text);
        let error = match phase {
            Phase::Start if reply_code == spec::ACCESS_REFUSED => {
                Error::ProbableAuthenticationError {
                    reply_code,
                    reply_text,
                }
            }
            Phase::Start | Phase::Tune if reply_code == spec::NOT_ALLOWED => {
                Error::ProbableAccessDeniedError {
                    reply_code,
                    reply_text,
                }
            }
            _ => Error::ConnectionClosedByBroker {
                reply_code,
                reply_text,
            },
        };
        self.end(error);
    }

    /// The broker sent bytes the codec refuses: Connection.Close with the
    /// reply code (once open, and unless ours is out), then the end.
    pub(super) fn protocol_failure(&mut self, e: CodecError) {
        if let (CodecError::ProtocolHeader { .. }, true) = (&e, self.phase.is_opening()) {
            // A protocol header is the broker's answer to ours only while
            // opening; once open it is malformed input like any other.
            self.end(Error::IncompatibleProtocol {
                detail: e.to_string(),
            });
            return;
        }
        self.close_for_fault(e.reply_code(), &e.to_string());
        self.end(Error::Protocol(e));
    }

    /// A valid frame where it is not allowed (505 once open).
    pub(super) fn unexpected(&mut self, detail: String) {
        self.close_for_fault(UNEXPECTED_FRAME, &detail);
        self.end(Error::UnexpectedFrame { detail });
    }

    /// Queues Connection.Close for a fault on the broker's side: only once
    /// open (never a Close handshake before that), and only if ours is not
    /// out yet. The face writes it before it drops the socket.
    fn close_for_fault(&mut self, reply_code: u16, text: &str) {
        if matches!(self.phase, Phase::Open | Phase::Closing) && !self.close_sent {
            self.close_sent = true;
            let close = connection::Close {
                reply_code,
                reply_text: truncate_short(text),
                class_id: 0,
                method_id: 0,
            };
            self.send_or_log(&close.into());
        }
    }

    pub(super) fn stream_ended(&mut self, error: Option<std::io::Error>) {
        let detail = match &error {
            Some(e) => format!("socket error: {e}"),
            None => "the broker closed the connection (end of file)".to_string(),
        };
        let failure = match self.phase {
            Phase::Closed => return,
            Phase::Protocol => Error::IncompatibleProtocol {
                detail: format!("{detail} right after our AMQP 0-9-1 protocol header"),
            },
            Phase::Start => Error::ProbableAuthenticationError {
                reply_code: 0,
                reply_text: format!("{detail} after Connection.StartOk"),
            },
            Phase::Tune => Error::ProbableAccessDeniedError {
                reply_code: 0,
                reply_text: format!("{detail} after Connection.Open"),
            },
            Phase::Open => Error::stream_lost(detail, error),
            Phase::Closing => self
                .close_reason
                .clone()
                .unwrap_or_else(|| Error::stream_lost(detail, error)),
        };
        if matches!(
            failure,
            Error::ProbableAuthenticationError { .. } | Error::ProbableAccessDeniedError { .. }
        ) {
            log::warn!("connect: {failure}");
        }
        self.end(failure);
    }

    /// Sends our Connection.Close, once, when no channel is left closing.
    pub(super) fn maybe_send_connection_close(&mut self) {
        if self.phase != Phase::Closing
            || self.close_sent
            || self.channels.iter().flatten().next().is_some()
        {
            return;
        }
        self.close_sent = true;
        let (reply_code, reply_text) = match &self.close_reason {
            Some(Error::ConnectionClosedByClient {
                reply_code,
                reply_text,
            }) => (*reply_code, truncate_short(reply_text)),
            _ => (spec::REPLY_SUCCESS, "Normal shutdown".to_string()),
        };
        let close = connection::Close {
            reply_code,
            reply_text,
            class_id: 0,
            method_id: 0,
        };
        self.send_or_log(&close.into());
    }

    /// What our close handshake has sent and what it has not, for the log
    /// when its bound expires.
    pub(super) fn close_progress(&self) -> String {
        let mut parts: Vec<String> = self
            .channels
            .iter()
            .flatten()
            .map(|slot| slot.close_progress())
            .collect();
        parts.push(if self.close_sent {
            "Connection.Close sent, no Connection.CloseOk".to_string()
        } else {
            "Connection.Close not sent: waiting for the channels to close".to_string()
        });
        parts.join("; ")
    }
}
