//! An AMQP 0-9-1 client for RabbitMQ in the style of Python's
//! [pika](https://pika.readthedocs.io/) 1.1, with its two adapters as two
//! faces on one protocol core: [`BlockingConnection`] (straight-line calls
//! that return the broker's reply) and [`SelectConnection`] (an event loop,
//! [`IoLoop`], and a completion closure for every operation), with pika's
//! channels, parameters, credentials, exceptions ([`Error`]) and TLS
//! ([`SslOptions`]).
//!
//! The blocking face:
//!
//! ```no_run
//! use std::time::Duration;
//! use pika::{BasicProperties, BlockingConnection, FieldTable, QueueDeclareOptions, UrlParameters};
//!
//! let params = UrlParameters::parse("amqp://guest:guest@localhost:5672/%2F")?;
//! let connection = BlockingConnection::new(params)?;
//! let channel = connection.channel(None)?;
//! channel.queue_declare("hello", QueueDeclareOptions::default(), FieldTable::new())?;
//! channel.basic_publish("", "hello", "Hello World!", &BasicProperties::default(), false)?;
//!
//! // Read until a second passes with nothing (pika's consume() generator).
//! let idle = Some(Duration::from_secs(1));
//! for message in channel.consume("hello", true, false, FieldTable::new(), idle)? {
//!     let Some(message) = message? else { break };
//!     println!(" [x] Received {}", String::from_utf8_lossy(&message.body));
//! }
//! channel.cancel()?;
//! connection.close(200, "Normal shutdown")?;
//! # Ok::<(), pika::Error>(())
//! ```
//!
//! The callback face:
//!
//! ```no_run
//! use pika::{BasicProperties, Channel, Error, SelectConnection, UrlParameters};
//!
//! fn on_open(conn: &SelectConnection) {
//!     conn.channel(None, on_channel).expect("the connection is open");
//! }
//!
//! fn on_channel(channel: Result<Channel, Error>) {
//!     let Ok(ch) = channel else { return };
//!     ch.basic_publish("", "hello", b"Hello World!", &BasicProperties::default(), false)
//!         .expect("the channel is open");
//!     let _ = ch.connection().map(|conn| conn.close(200, "done"));
//! }
//!
//! let params = UrlParameters::parse("amqp://guest:guest@localhost:5672/%2F")?;
//! let conn = SelectConnection::new(
//!     params,
//!     on_open,
//!     |conn, err| { eprintln!("could not connect: {err}"); conn.ioloop().stop(); },
//!     |conn, reason| { println!("closed: {reason}"); conn.ioloop().stop(); },
//! )?;
//! conn.ioloop().start().expect("the loop runs");
//! # Ok::<(), pika::Error>(())
//! ```
//!
//! Coming from Python pika: the repository's `docs/coming-from-pika.md`
//! maps pika's idioms (keyword arguments, exceptions, `with` blocks,
//! threads, Ctrl-C) to this crate's.
//!
//! # Stopping on Ctrl-C (feature `signals`)
//!
//! With `pika = { features = ["signals"] }`,
//! [`IoLoop::add_signal_handler`][add_signal_handler] runs a callback on the
//! loop's thread when SIGINT (Ctrl-C) or SIGTERM arrives — never inside the
//! signal handler — so it can close the connection gracefully; `on_close` then
//! stops the loop.
//!
#![cfg_attr(
    feature = "signals",
    doc = "[add_signal_handler]: IoLoop::add_signal_handler"
)]
// Without the feature, the method is not documented: the link points to this section.
#![cfg_attr(
    not(feature = "signals"),
    doc = "[add_signal_handler]: #stopping-on-ctrl-c-feature-signals"
)]
//!
#![cfg_attr(feature = "signals", doc = "```no_run")]
#![cfg_attr(not(feature = "signals"), doc = "```ignore")]
//! use std::sync::Arc;
//! use pika::{Error, SelectConnection, UrlParameters, SIGINT, SIGTERM};
//!
//! let params = UrlParameters::parse("amqp://guest:guest@localhost:5672/%2F")?;
//! let conn = SelectConnection::new(
//!     params,
//!     |_conn| { /* open channels, consume, ... */ },
//!     |conn, err| { eprintln!("could not connect: {err}"); conn.ioloop().stop(); },
//!     |conn, reason| { println!("closed: {reason}"); conn.ioloop().stop(); },
//! )?;
//! let c = conn.clone();
//! conn.ioloop()
//!     .add_signal_handler(&[SIGINT, SIGTERM], move |_signal| {
//!         // A graceful close; a second Ctrl-C while it is closing stops the loop at once.
//!         if c.close(200, "interrupted").is_err() {
//!             c.ioloop().stop();
//!         }
//!     })
//!     .map_err(|e| Error::IoLoop(Arc::new(e)))?;
//! conn.ioloop().start().expect("the loop runs");
//! // Unregisters the handler (Ctrl-C terminates again) and drops its closure.
//! conn.ioloop().close();
//! # Ok::<(), pika::Error>(())
//! ```
//!
//! # Layers
//!
//! * [`blocking`] — the blocking face: [`BlockingConnection`],
//!   [`BlockingChannel`], [`blocking::BlockingConnectionHandle`] for other
//!   threads. It drives the protocol core from whichever thread waits.
//! * [`select`] — the callback face: [`SelectConnection`], [`Channel`],
//!   [`ConnectionHandle`] for other threads. It owns the user's closures
//!   and drives the protocol core from the [`IoLoop`].
//! * [`protocol`] — the protocol core, one IO-free state machine per
//!   connection ([`protocol::Connection`]): handshake, heartbeats, channels,
//!   request serialisation, content assembly, consumers, confirms, closes.
//!   Every face drives one; none holds protocol logic of its own.
//! * [`transport`] — TCP and TLS streams, name resolution and socket
//!   options, and the connect workflow as a pure decision.
//! * The codec: every AMQP 0-9-1 method RabbitMQ speaks ([`spec`]), field
//!   tables ([`FieldTable`]), message properties ([`BasicProperties`]) and
//!   frames ([`frame`]), with an incremental parser that never panics on
//!   bad input and never buffers more than `frame_max`.
//!
//! ```
//! use pika::frame::{encode_message, parse_frame, Frame, FRAME_MIN_SIZE};
//! use pika::spec::{basic, Method};
//! use pika::{BasicProperties, FieldTable};
//!
//! // Encode a Basic.Publish with its header and body, as a client sends it.
//! let mut headers = FieldTable::new();
//! headers.insert("x-retries", 3i32);
//! let props = BasicProperties::default()
//!     .with_content_type("text/plain")
//!     .with_headers(headers);
//! let publish = basic::Publish { exchange: "".into(), routing_key: "hello".into(), ..Default::default() };
//! let mut wire = Vec::new();
//! encode_message(&mut wire, 1, &publish.into(), &props, b"Hello World!", FRAME_MIN_SIZE).unwrap();
//!
//! // Parse it back, frame by frame.
//! let mut rest = &wire[..];
//! let mut frames = Vec::new();
//! while let Some((frame, used)) = parse_frame(rest, FRAME_MIN_SIZE).unwrap() {
//!     frames.push(frame);
//!     rest = &rest[used..];
//! }
//! assert!(matches!(&frames[0], Frame::Method { method: Method::BasicPublish(p), .. } if p.routing_key == "hello"));
//! assert!(matches!(&frames[1], Frame::Header { header, .. } if header.properties == props && header.body_size == 12));
//! assert!(matches!(&frames[2], Frame::Body { payload, .. } if *payload == b"Hello World!"));
//! ```
#![warn(missing_docs, missing_debug_implementations)]

pub mod ack;
pub mod blocking;
pub mod credentials;
pub mod error;
pub mod frame;
pub mod message;
pub mod options;
pub mod parameters;
pub mod protocol;
pub mod select;
pub mod spec;
pub mod table;
pub mod tls;
pub mod transport;
mod wire;

/// The connection types of the callback face, at the path they had before
/// the face moved to [`select`].
pub mod connection {
    pub use crate::select::{ConnectionHandle, ConnectionState, SelectConnection};
}

/// The channel types of the callback face and the messages and options
/// they use, at the path they had before the face moved to [`select`].
pub mod channel {
    pub use crate::message::{Confirmation, Delivery, GetMessage, ReturnedMessage};
    pub use crate::options::{
        BasicConsumeOptions, ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    pub use crate::protocol::ChannelState;
    pub use crate::select::Channel;
}

pub use ack::{AckHandle, Settle};
pub use blocking::{BlockingChannel, BlockingConnection};
pub use channel::{
    BasicConsumeOptions, Channel, ChannelState, Confirmation, Delivery, ExchangeDeclareOptions,
    GetMessage, QueueDeclareOptions, QueueDeleteOptions, ReturnedMessage,
};
pub use connection::{ConnectionHandle, ConnectionState, SelectConnection};
pub use credentials::{Credentials, ExternalCredentials, PlainCredentials};
pub use error::{CodecError, Error};
// Inlined: `cargo doc` shows the event loop's own docs on pika's pages.
#[doc(inline)]
pub use ioloop::{HandlerId, Interest, IoLoop, IoLoopWaker, Readiness, TimeoutId};
// With the `signals` feature: what `IoLoop::add_signal_handler` takes and returns.
#[cfg(feature = "signals")]
#[doc(inline)]
pub use ioloop::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SignalHandlerId};
pub use parameters::{ConnectionParameters, Heartbeat, TcpOptions, UrlParameters};
pub use spec::{BasicProperties, DeliveryMode, PropertiesError};
pub use table::{Decimal, FieldTable, FieldValue, LongString};
pub use tls::SslOptions;

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The "Coming from pika" guide's Rust examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/coming-from-pika.md")]
struct GuideDoctests;
