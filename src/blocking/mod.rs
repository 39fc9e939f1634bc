//! The blocking face: pika's [`BlockingConnection`] and [`BlockingChannel`],
//! for straight-line programs — each call returns when the broker has
//! answered. The same protocol core as the callback face drives it
//! ([`crate::protocol`]); this face only waits.
//!
//! ```no_run
//! use pika::{BasicProperties, BlockingConnection, QueueDeclareOptions, UrlParameters};
//!
//! let conn = BlockingConnection::new(UrlParameters::parse("amqp://guest:guest@localhost/%2F")?)?;
//! let channel = conn.channel(None)?;
//! channel.queue_declare("hello", QueueDeclareOptions::default(), Default::default())?;
//! channel.basic_publish("", "hello", "Hello World!", &BasicProperties::default(), false)?;
//! if let Some(message) = channel.basic_get("hello", true)? {
//!     println!("got {:?}", String::from_utf8_lossy(&message.body));
//! }
//! conn.close(200, "done")?;
//! # Ok::<(), pika::Error>(())
//! ```
//!
//! # Threads and callbacks
//!
//! A [`BlockingConnection`] and its channels are `Send` — open them in one
//! thread, move them to a worker — but not `Sync`. I/O happens only in the
//! thread that is inside a call: there is no background thread reading the
//! socket. Consumer callbacks, timers, thread-safe callbacks and the
//! blocked/unblocked, cancel and return callbacks run only inside
//! [`BlockingConnection::process_data_events`] (and so inside
//! [`BlockingConnection::sleep`], [`BlockingChannel::start_consuming`] and
//! the [`ConsumeIter`] of [`BlockingChannel::consume`] while it waits for a
//! message), as in pika: what arrives during any other call is queued and dispatched
//! later, in order. Inside a callback every method works, except
//! `start_consuming` ([`Error::ReentrancyError`](crate::Error::ReentrancyError)).
//! When several threads share one connection (through
//! [`BlockingConnection::channel_by_number`] handles), one at a time
//! dispatches callbacks; the others process I/O meanwhile.
//!
//! Neither handle is `Sync`, and a [`BlockingChannel`] is not `Clone`:
//!
//! ```compile_fail
//! fn shared<T: Sync>() {}
//! shared::<pika::BlockingConnection>();
//! ```
//!
//! ```compile_fail
//! fn shared<T: Sync>() {}
//! shared::<pika::BlockingChannel>();
//! ```
//!
//! ```compile_fail
//! fn cloned<T: Clone>() {}
//! cloned::<pika::BlockingChannel>();
//! ```
//!
//! A callback that panics panics the call that dispatched it
//! (`process_data_events`, `sleep`, `start_consuming`): the panic
//! propagates to the application unchanged. Nothing is left wedged: the
//! callback stays registered, and what was queued behind it is dispatched
//! by the next call. (A delivery the panicking consumer did not ack stays
//! unacked, and goes back to its queue when the channel closes.)
//!
//! # Heartbeats
//!
//! Heartbeats are sent and checked while the application is inside a call
//! of this face. An application that does not call in for longer than the
//! negotiated heartbeat timeout (RabbitMQ: 60 s by default) is taken for
//! dead by the broker, which closes the connection; the next call returns
//! the error. Use [`BlockingConnection::sleep`] rather than
//! `std::thread::sleep`, or call `process_data_events` now and then during
//! long work, or turn heartbeats off with [`crate::Heartbeat::Disabled`].
//!
//! Calls that do not wait for the broker count too: a `basic_publish`
//! without confirms (or an ack) whose connection has a deadline due reads
//! what arrived and acts on it, so a publisher behind a stalled network
//! gets [`crate::Error::AmqpHeartbeatTimeout`] from its next publish once
//! the broker has been silent for twice the timeout, instead of filling
//! socket buffers that nobody reads.
//!
//! # Writes
//!
//! [`BlockingChannel::basic_publish`] without confirms does not wait for
//! the broker. When nothing was written in the last millisecond it writes
//! the message at once (as far as the socket takes it, without blocking);
//! within a burst the messages are buffered and written together, once
//! 64 KiB are queued or the oldest has waited a millisecond — by the
//! publishing thread's next call, or, when the application goes quiet, by
//! a small flusher thread (the last message of a burst leaves within about
//! ten milliseconds without another call). The call blocks only while the
//! buffer is above its high-water mark (16 MiB,
//! [`BlockingConnection::set_outbound_watermarks`]). Every blocking call
//! (waiting for a reply, `process_data_events`, `close`, `Drop`) writes
//! first. Acks and other commands go the same way. pika instead writes and
//! waits until its buffer is empty after each publish: a write per
//! message, which costs far more CPU than a write per burst.

mod channel;
mod connection;
mod consume;
mod engine;
mod handle;
mod publish;

pub use channel::BlockingChannel;
pub use connection::{BlockingConnection, IntoParameterSets, TimerId};
pub use consume::ConsumeIter;
pub use handle::BlockingConnectionHandle;
pub use publish::Confirms;
