//! The protocol core: one AMQP 0-9-1 client connection as a state machine
//! with no I/O — [`Connection`]. Every face of the client (the callback
//! face [`crate::SelectConnection`], later the blocking and async faces)
//! drives one of these; none holds protocol logic of its own.
//!
//! The core owns everything protocol: the handshake and tuning, heartbeats,
//! blocked/unblocked, both close handshakes, the channel table, per-channel
//! request serialisation with request ids, content assembly, consumers,
//! publisher confirms, returns, flow, and the mapping of wire faults to
//! reply codes. It owns no socket, no clock (time comes in as `now`), no
//! event loop and no user closure; it is `Send`.
//!
//! ```
//! use std::time::Instant;
//! use pika::frame::{encode_method, FRAME_MIN_SIZE};
//! use pika::protocol::{Config, Connection, Event, Phase};
//! use pika::spec::connection;
//! use pika::ConnectionParameters;
//!
//! // The driver's clock, read by the caller: the core never reads one.
//! let now = Instant::now();
//! let mut core = Connection::new(ConnectionParameters::default(), Config::default(), now);
//! // The protocol header is the first thing to send.
//! assert_eq!(core.outbound(), b"AMQP\x00\x00\x09\x01");
//! let n = core.outbound().len();
//! core.advance_outbound(n, now);
//!
//! // The broker's Connection.Start, as bytes: one frame handled per call.
//! let start = connection::Start {
//!     version_major: 0,
//!     version_minor: 9,
//!     mechanisms: "PLAIN".into(),
//!     locales: "en_US".into(),
//!     ..Default::default()
//! };
//! let mut wire = Vec::new();
//! encode_method(&mut wire, 0, &start.into(), FRAME_MIN_SIZE).unwrap();
//! assert_eq!(core.handle_input(&wire, now), wire.len());
//! assert_eq!(core.phase(), Phase::Start);
//! // ...and the core answered with Connection.StartOk.
//! assert!(!core.outbound().is_empty());
//! assert!(core.poll_event().is_none());
//! ```
//!
//! # The contract
//!
//! * **Getters**: [`Connection::phase`], the negotiated
//!   [`channel_max`](Connection::channel_max) /
//!   [`frame_max`](Connection::frame_max) /
//!   [`heartbeat`](Connection::heartbeat),
//!   [`server_properties`](Connection::server_properties), per-channel
//!   state ([`Connection::channel_phase`], consumer tags, confirm mode).
//! * **Input**: [`Connection::handle_input`] (one frame per call, so the
//!   face can run the callbacks of one frame before the next is read),
//!   [`Connection::handle_timeout`], [`Connection::handle_stream_end`],
//!   [`Connection::fail`] (a failure the face saw, e.g. TLS).
//! * **Commands**: open a channel, RPCs (each returns a [`RequestId`]),
//!   nowait methods, publish (the delivery tag in confirm mode),
//!   consume / cancel, ack / nack / reject, close a channel, close the
//!   connection, update-secret. A caller's mistake is an `Err` at the call
//!   and changes nothing.
//! * **Output**: the one outbound buffer ([`Connection::outbound`],
//!   [`Connection::advance_outbound`]), [`Connection::poll_timeout`] (the
//!   next deadline) and [`Connection::poll_event`].
//!
//! # Invariants
//!
//! * Every [`RequestId`] the core hands out gets exactly one
//!   [`Event::Reply`], in the order today's callbacks fire: replies in
//!   wire order; when a channel ends, its open request, then its pending
//!   requests in order, then its unconfirmed publishes
//!   ([`Confirmation::Failed`](crate::Confirmation::Failed)), then
//!   [`Event::ChannelClosed`]; when the connection ends, every channel's
//!   events, then the connection's own requests, then one
//!   [`Event::Closed`], the last event.
//! * A broker's Connection.Close wins over a stream end that follows it:
//!   once handled, the connection is closed with the broker's words.

mod channel;
mod commands;
mod content;
mod deadlines;
mod event;
mod handshake;
mod incoming;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::frame::{self, FRAME_MIN_SIZE, Frame, PROTOCOL_HEADER};
use crate::parameters::ConnectionParameters;
use crate::spec::{Method, connection};
use crate::table::{FieldTable, FieldValue};

use channel::ChannelSlot;
pub use channel::ChannelState;
pub use commands::Settle;
pub use event::{ChannelKey, ConsumerId, Event, Reply, RequestId};

/// The close handshake's bound when `socket_timeout` is unset.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sent bytes at the front of the outbound buffer are dropped (moving the
/// rest) once there are this many and they are at least half of it.
const OUTBOUND_COMPACT_AT: usize = 64 * 1024;
/// The capacity the outbound buffer keeps once drained.
const OUTBOUND_KEPT_CAPACITY: usize = 1 << 20;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Protocol header sent; waiting for Connection.Start.
    Protocol,
    /// StartOk sent; waiting for Connection.Tune (or Secure).
    Start,
    /// TuneOk and Open sent; waiting for Connection.OpenOk.
    Tune,
    /// Open.
    Open,
    /// Our Connection.Close is under way.
    Closing,
    /// Closed; terminal.
    Closed,
}

impl Phase {
    /// Whether the handshake is still under way.
    pub fn is_opening(self) -> bool {
        matches!(self, Phase::Protocol | Phase::Start | Phase::Tune)
    }
}

/// What a face tells a new core besides the parameters.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// This instance's epoch: deliveries carry it, and acks naming another
    /// epoch are refused.
    pub epoch: u64,
    /// The first request id to hand out (a face seeds each new instance
    /// with [`Connection::next_request_id`] of the last).
    pub first_request_id: u64,
    /// When the handshake must be done by (`stack_timeout` counted from the
    /// start of the attempt), with the bound, for the error.
    pub handshake_deadline: Option<(Instant, Duration)>,
    /// The peer's address, for error texts.
    pub peer: String,
}

/// One AMQP connection's protocol state. See the [module docs](self) for
/// the contract.
#[derive(Debug)]
pub struct Connection {
    pub(crate) phase: Phase,
    pub(crate) opened: bool,
    pub(crate) params: ConnectionParameters,
    pub(crate) config: Config,
    pub(crate) channel_max: u16,
    pub(crate) frame_max: u32,
    pub(crate) heartbeat: u16,
    pub(crate) server_properties: FieldTable,
    /// Indexed by channel number; `None` where free.
    pub(crate) channels: Vec<Option<ChannelSlot>>,
    /// The generation of each channel number's latest use.
    pub(crate) generations: Vec<u32>,
    pub(crate) outbound: Vec<u8>,
    /// How much of `outbound`'s front was already sent (compacted lazily:
    /// a partial write of a large buffer moves nothing).
    outbound_sent: usize,
    pub(crate) events: VecDeque<Event>,
    pub(crate) next_request: u64,
    pub(crate) next_consumer: u64,
    pub(crate) consumer_tags_issued: u64,
    /// Connection.UpdateSecret requests waiting for their UpdateSecretOk.
    pub(crate) secret_updates: VecDeque<(RequestId, Method)>,
    pub(crate) last_sent: Instant,
    pub(crate) last_received: Instant,
    /// Our close reason while Closing.
    pub(crate) close_reason: Option<Error>,
    pub(crate) close_sent: bool,
    pub(crate) close_deadline: Option<Instant>,
    pub(crate) blocked: Option<String>,
    pub(crate) blocked_since: Option<Instant>,
}

impl Connection {
    /// A connection whose transport has just connected at `now`: the
    /// protocol header waits in the outbound buffer.
    pub fn new(params: ConnectionParameters, config: Config, now: Instant) -> Connection {
        Connection {
            phase: Phase::Protocol,
            opened: false,
            params,
            next_request: config.first_request_id,
            config,
            channel_max: 0,
            frame_max: FRAME_MIN_SIZE,
            heartbeat: 0,
            server_properties: FieldTable::new(),
            channels: Vec::new(),
            generations: Vec::new(),
            outbound: PROTOCOL_HEADER.to_vec(),
            outbound_sent: 0,
            events: VecDeque::new(),
            next_consumer: 1,
            consumer_tags_issued: 0,
            secret_updates: VecDeque::new(),
            last_sent: now,
            last_received: now,
            close_reason: None,
            close_sent: false,
            close_deadline: None,
            blocked: None,
            blocked_since: None,
        }
    }

    // ------------------------------------------------------------------
    // Getters
    // ------------------------------------------------------------------

    /// Where the connection is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the connection opened (whatever happened since).
    pub fn opened(&self) -> bool {
        self.opened
    }

    /// The parameters in use.
    pub fn params(&self) -> &ConnectionParameters {
        &self.params
    }

    /// This instance's epoch.
    pub fn epoch(&self) -> u64 {
        self.config.epoch
    }

    /// The id the next request will get (seed for the next instance).
    pub fn next_request_id(&self) -> u64 {
        self.next_request
    }

    /// The negotiated channel_max (0 before Connection.Tune).
    pub fn channel_max(&self) -> u16 {
        self.channel_max
    }

    /// The negotiated frame_max (4096 before Connection.Tune).
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// The negotiated heartbeat timeout in seconds (0: off).
    pub fn heartbeat(&self) -> u16 {
        self.heartbeat
    }

    /// The broker's `server_properties` from Connection.Start (with the
    /// offered `mechanisms` added).
    pub fn server_properties(&self) -> &FieldTable {
        &self.server_properties
    }

    /// Whether the broker's capabilities table says `name` is supported.
    pub fn capability(&self, name: &str) -> bool {
        self.server_properties
            .get("capabilities")
            .and_then(FieldValue::as_table)
            .and_then(|caps| caps.get(name))
            .and_then(FieldValue::as_bool)
            .unwrap_or(false)
    }

    /// Why the broker blocked the connection, while it is blocked.
    pub fn blocked_reason(&self) -> Option<&str> {
        self.blocked.as_deref()
    }

    /// The keys of the channels in the table (open, opening or closing), in
    /// number order.
    pub fn channel_keys(&self) -> Vec<ChannelKey> {
        self.channels.iter().flatten().map(|c| c.key).collect()
    }

    // ------------------------------------------------------------------
    // Input
    // ------------------------------------------------------------------

    /// Handles the first whole frame in `input` (bytes received, in order)
    /// and returns how many bytes it used: 0 when `input` holds no whole
    /// frame yet (keep the bytes, append what arrives next, call again).
    /// One frame per call: the face drains [`Connection::poll_event`]
    /// between calls, so a callback that closes its channel or cancels its
    /// consumer sees no later delivery. A call with bytes counts as data
    /// received at `now` for the heartbeat.
    ///
    /// Malformed input ends the connection (with Connection.Close carrying
    /// the reply code once open): the input is then consumed whole.
    pub fn handle_input(&mut self, input: &[u8], now: Instant) -> usize {
        if self.phase == Phase::Closed {
            return input.len();
        }
        if !input.is_empty() {
            self.last_received = now;
        }
        match frame::parse_frame(input, self.frame_max) {
            Ok(None) => 0,
            Ok(Some((frame, used))) => {
                self.handle_frame(frame, now);
                if self.phase == Phase::Closed {
                    input.len()
                } else {
                    used
                }
            }
            Err(e) => {
                self.protocol_failure(e);
                input.len()
            }
        }
    }

    /// The stream ended: the peer closed it (`None`) or it failed. What
    /// that means depends on the phase (right after our protocol header:
    /// another protocol; after StartOk: a refused login; after Open: a
    /// refused virtual host; once open: a lost stream; while closing: our
    /// close's reason). Nothing, when a broker Close already ended it.
    pub fn handle_stream_end(&mut self, error: Option<std::io::Error>) {
        self.stream_ended(error);
    }

    /// Ends the connection with a failure the face saw (a TLS error, a
    /// timeout of its own), unless it already ended.
    pub fn fail(&mut self, error: Error) {
        self.end(error);
    }

    // ------------------------------------------------------------------
    // Output
    // ------------------------------------------------------------------

    /// The bytes waiting to be sent.
    pub fn outbound(&self) -> &[u8] {
        &self.outbound[self.outbound_sent..]
    }

    /// Whether bytes wait to be sent.
    pub fn wants_write(&self) -> bool {
        self.outbound.len() > self.outbound_sent
    }

    /// `n` bytes of [`Connection::outbound`] were sent at `now`.
    pub fn advance_outbound(&mut self, n: usize, now: Instant) {
        let n = n.min(self.outbound.len() - self.outbound_sent);
        if n == 0 {
            return;
        }
        self.outbound_sent += n;
        if self.outbound_sent == self.outbound.len() {
            self.outbound.clear();
            self.outbound_sent = 0;
            // A buffer grown by a burst is not kept at its peak.
            if self.outbound.capacity() > OUTBOUND_KEPT_CAPACITY {
                self.outbound.shrink_to(OUTBOUND_KEPT_CAPACITY);
            }
        } else if self.outbound_sent >= OUTBOUND_COMPACT_AT
            && self.outbound_sent * 2 >= self.outbound.len()
        {
            // Moves at most as much as was sent since the last compaction.
            self.outbound.drain(..self.outbound_sent);
            self.outbound_sent = 0;
        }
        self.last_sent = now;
    }

    /// The next event, in the order things happened.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether events wait to be polled.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    // ------------------------------------------------------------------
    // Connection commands
    // ------------------------------------------------------------------

    /// Closes the connection: open channels are closed first, then
    /// Connection.Close is sent and its CloseOk awaited, bounded by
    /// `socket_timeout` (10 s when unset). While still opening there is no
    /// handshake: the connection ends at once with
    /// [`Error::ConnectionOpenAborted`] (the face drops the socket).
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when already closing or closed.
    pub fn close(&mut self, reply_code: u16, reply_text: &str, now: Instant) -> Result<(), Error> {
        match self.phase {
            Phase::Closing | Phase::Closed => {
                return Err(Error::ConnectionWrongState {
                    detail: format!("connection is {:?}, cannot close it", self.phase),
                });
            }
            p if p.is_opening() => {
                // Never a Close handshake before the connection is open.
                self.end(Error::ConnectionOpenAborted);
                return Ok(());
            }
            _ => {}
        }
        self.phase = Phase::Closing;
        self.close_reason = Some(Error::ConnectionClosedByClient {
            reply_code,
            reply_text: reply_text.to_string(),
        });
        let bound = self
            .params
            .socket_timeout()
            .unwrap_or(DEFAULT_CLOSE_TIMEOUT);
        // Beyond the clock's range (Duration::MAX): no bound.
        self.close_deadline = now.checked_add(bound);
        for key in self.channel_keys() {
            if matches!(
                self.channel_phase(key),
                ChannelState::Opening | ChannelState::Open
            ) {
                if let Err(e) = self.close_channel(key, reply_code, reply_text) {
                    log::debug!("{key} not closed: {e}");
                }
            }
        }
        self.maybe_send_connection_close();
        Ok(())
    }

    /// Replaces the connection's secret (RabbitMQ's Connection.UpdateSecret);
    /// the reply is Connection.UpdateSecretOk.
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when the connection is not open.
    pub fn update_secret(&mut self, new_secret: &str, reason: &str) -> Result<RequestId, Error> {
        if self.phase != Phase::Open {
            return Err(Error::ConnectionWrongState {
                detail: format!("connection is {:?}, cannot update its secret", self.phase),
            });
        }
        let method: Method = connection::UpdateSecret {
            new_secret: new_secret.into(),
            reason: reason.to_string(),
        }
        .into();
        self.send_method(0, &method)?;
        let id = self.new_request_id();
        self.secret_updates.push_back((id, method));
        Ok(id)
    }

    // ------------------------------------------------------------------
    // Internals shared by the submodules
    // ------------------------------------------------------------------

    fn new_request_id(&mut self) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        id
    }

    /// Encodes a method frame onto the outbound buffer.
    fn send_method(&mut self, channel: u16, method: &Method) -> Result<(), Error> {
        frame::encode_method(&mut self.outbound, channel, method, self.frame_max)?;
        Ok(())
    }

    /// Handles one parsed frame.
    fn handle_frame(&mut self, frame: Frame<'_>, now: Instant) {
        let number = frame.channel();
        if number != 0 && !matches!(self.phase, Phase::Open | Phase::Closing) {
            self.unexpected(format!(
                "a frame on channel {number} before the connection is open"
            ));
            return;
        }
        match frame {
            Frame::Heartbeat => {}
            Frame::Method { channel: 0, method } => self.handle_connection_method(method, now),
            Frame::Header { channel: 0, .. } | Frame::Body { channel: 0, .. } => {
                self.unexpected("content frame on channel 0".into())
            }
            Frame::Method { method, .. } => self.handle_channel_method(number, method),
            Frame::Header { header, .. } => self.handle_header(number, header),
            Frame::Body { payload, .. } => self.handle_body(number, payload),
        }
        if self.phase == Phase::Closing {
            self.maybe_send_connection_close();
        }
    }

    /// Ends the connection with `error`: every channel ends (its events
    /// first), the connection's own requests fail, then [`Event::Closed`].
    /// Idempotent.
    fn end(&mut self, error: Error) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.close_deadline = None;
        self.blocked_since = None;
        log::info!("connection closed: {error}");
        for number in 0..self.channels.len() {
            if self.channels[number].is_some() {
                self.finish_channel(number as u16, error.clone());
            }
        }
        self.channels.clear();
        for (request, method) in std::mem::take(&mut self.secret_updates) {
            self.events.push_back(Event::Reply {
                request,
                channel: None,
                method,
                result: Err(error.clone()),
            });
        }
        self.events.push_back(Event::Closed {
            error,
            opened: self.opened,
        });
    }
}

/// Cuts a reply text to the 255 bytes a short string holds (at a character
/// boundary).
pub(crate) fn truncate_short(text: &str) -> String {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
