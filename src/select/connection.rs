//! [`SelectConnection`]: pika's asynchronous connection on an
//! [`IoLoop`] — constructors, getters, the connection's callbacks,
//! channels, close and update-secret.
//!
//! ```no_run
//! use pika::{ConnectionParameters, SelectConnection};
//!
//! let conn = SelectConnection::new(
//!     ConnectionParameters::default(),
//!     |conn| {
//!         println!("connected");
//!         conn.close(200, "bye").expect("open");
//!     },
//!     |conn, err| {
//!         eprintln!("could not connect: {err}");
//!         conn.ioloop().stop();
//!     },
//!     |conn, reason| {
//!         println!("closed: {reason}");
//!         conn.ioloop().stop();
//!     },
//! )?;
//! conn.ioloop().start()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use ioloop::IoLoop;

use super::{Callbacks, Channel, ChannelRecord, ConnectionHandle, Shared, State, ThreadsafeQueue};
use crate::error::Error;
use crate::frame::FRAME_MIN_SIZE;
use crate::parameters::ConnectionParameters;
use crate::spec::connection;
use crate::table::FieldTable;
use crate::transport::workflow::Workflow;

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Resolving and connecting TCP (or waiting to retry).
    Connecting,
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

impl ConnectionState {
    fn is_opening(self) -> bool {
        matches!(
            self,
            ConnectionState::Connecting
                | ConnectionState::Protocol
                | ConnectionState::Start
                | ConnectionState::Tune
        )
    }
}

/// An AMQP 0-9-1 connection driven by an [`IoLoop`] (pika's
/// `SelectConnection`). A cheap `Clone` handle, `!Send`; other threads use
/// [`SelectConnection::threadsafe_handle`].
///
/// Every operation that has a reply takes a completion closure; exactly one
/// terminal callback runs per connection — `on_open_error` when it never
/// opened, `on_close` when it did — after every channel's close callback.
#[derive(Clone)]
pub struct SelectConnection {
    pub(super) shared: Rc<Shared>,
}

impl fmt::Debug for SelectConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.state.borrow();
        f.debug_struct("SelectConnection")
            .field("state", &SelectConnection::face_state(&st))
            .field("params", &st.params)
            .finish()
    }
}

thread_local! {
    static NEXT_ID: Cell<u64> = const { Cell::new(1) };
}

impl SelectConnection {
    /// Creates a connection and starts connecting on a new [`IoLoop`]
    /// (reachable through [`SelectConnection::ioloop`]); run
    /// `conn.ioloop().start()` to drive it.
    ///
    /// `on_open` runs when the connection is open; `on_open_error` when it
    /// could not be opened; `on_close` when an open connection closes.
    /// Exactly one of `on_open_error` and `on_close` runs.
    ///
    /// # Errors
    /// [`Error::IoLoop`] when no event loop can be created.
    pub fn new(
        parameters: impl Into<ConnectionParameters>,
        on_open: impl FnOnce(&SelectConnection) + 'static,
        on_open_error: impl FnOnce(&SelectConnection, Error) + 'static,
        on_close: impl FnOnce(&SelectConnection, Error) + 'static,
    ) -> Result<SelectConnection, Error> {
        Self::create(
            vec![parameters.into()],
            on_open,
            on_open_error,
            on_close,
            None,
        )
    }

    /// Creates a connection that tries several parameter sets in order
    /// (pika's `create_connection`), optionally on an existing loop (pika's
    /// `custom_ioloop`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an empty list; [`Error::IoLoop`] when
    /// no event loop can be created.
    pub fn create(
        parameter_sets: Vec<ConnectionParameters>,
        on_open: impl FnOnce(&SelectConnection) + 'static,
        on_open_error: impl FnOnce(&SelectConnection, Error) + 'static,
        on_close: impl FnOnce(&SelectConnection, Error) + 'static,
        custom_ioloop: Option<IoLoop>,
    ) -> Result<SelectConnection, Error> {
        let first = parameter_sets.first().cloned();
        let workflow = Workflow::new(parameter_sets)?;
        let params = first.unwrap_or_default();
        let ioloop = match custom_ioloop {
            Some(l) => l,
            None => IoLoop::new().map_err(|e| Error::IoLoop(Arc::new(e)))?,
        };
        let id = NEXT_ID.with(|n| {
            let id = n.get();
            n.set(id + 1);
            id
        });
        let callbacks = Callbacks {
            on_open: vec![Box::new(on_open)],
            on_open_error: vec![Box::new(on_open_error)],
            on_close: vec![Box::new(on_close)],
            ..Default::default()
        };
        let shared = Rc::new(Shared {
            id,
            ioloop: ioloop.clone(),
            state: RefCell::new(State {
                workflow,
                params,
                retry_timer: None,
                session: None,
                closed: false,
                next_request: 1,
                callbacks,
                channels: Vec::new(),
                high_water: 16 * 1024 * 1024,
                low_water: 4 * 1024 * 1024,
                above_high_water: false,
                shutting_down: false,
            }),
            threadsafe: Arc::new(Mutex::new(ThreadsafeQueue {
                closed: false,
                callbacks: VecDeque::new(),
            })),
            dispatching: Cell::new(false),
            dispatch_queued: Cell::new(false),
            in_socket_event: Cell::new(false),
            door: Arc::default(),
            door_handle: std::cell::OnceCell::new(),
        });
        super::handle::register(id, &shared);
        let conn = SelectConnection { shared };
        // Start on the loop, so that close() right after new() aborts
        // cleanly and no callback runs inside new(). The closure keeps the
        // connection alive until the workflow owns it.
        let starter = conn.clone();
        ioloop.call_soon(move || starter.next_attempt());
        Ok(conn)
    }

    pub(crate) fn from_shared(shared: Rc<Shared>) -> SelectConnection {
        SelectConnection { shared }
    }

    /// The event loop this connection runs on.
    pub fn ioloop(&self) -> &IoLoop {
        &self.shared.ioloop
    }

    /// The connection's state.
    pub fn state(&self) -> ConnectionState {
        SelectConnection::face_state(&self.shared.state.borrow())
    }

    /// Whether the connection is open.
    pub fn is_open(&self) -> bool {
        self.state() == ConnectionState::Open
    }

    /// Whether our close handshake is under way.
    pub fn is_closing(&self) -> bool {
        self.state() == ConnectionState::Closing
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.state() == ConnectionState::Closed
    }

    /// The parameter set in use (the one that connected, or being tried).
    pub fn params(&self) -> ConnectionParameters {
        self.shared.state.borrow().params.clone()
    }

    /// The negotiated channel_max (0 before Connection.Tune).
    pub fn channel_max(&self) -> u16 {
        self.shared
            .state
            .borrow()
            .core()
            .map_or(0, |c| c.channel_max())
    }

    /// The negotiated frame_max (4096 before Connection.Tune).
    pub fn frame_max(&self) -> u32 {
        self.shared
            .state
            .borrow()
            .core()
            .map_or(FRAME_MIN_SIZE, |c| c.frame_max())
    }

    /// The negotiated heartbeat timeout in seconds (0: off).
    pub fn heartbeat(&self) -> u16 {
        self.shared
            .state
            .borrow()
            .core()
            .map_or(0, |c| c.heartbeat())
    }

    /// The broker's `server_properties` from Connection.Start.
    pub fn server_properties(&self) -> FieldTable {
        self.shared
            .state
            .borrow()
            .core()
            .map(|c| c.server_properties().clone())
            .unwrap_or_default()
    }

    /// The address connected to, while a socket exists.
    pub fn peer_address(&self) -> Option<SocketAddr> {
        let st = self.shared.state.borrow();
        st.session
            .as_ref()
            .filter(|s| s.stream.is_some())
            .map(|s| s.address)
    }

    /// The local address of the socket, while one exists (useful to find
    /// this connection in `rabbitmqctl list_connections peer_port`).
    pub fn local_address(&self) -> Option<SocketAddr> {
        let st = self.shared.state.borrow();
        st.session
            .as_ref()
            .and_then(|s| s.stream.as_ref())
            .and_then(|s| s.local_addr())
    }

    fn capability(&self, name: &str) -> bool {
        self.shared
            .state
            .borrow()
            .core()
            .is_some_and(|c| c.capability(name))
    }

    /// Whether the broker supports publisher confirms.
    pub fn publisher_confirms(&self) -> bool {
        self.capability("publisher_confirms")
    }

    /// Whether the broker supports Basic.Nack.
    pub fn basic_nack(&self) -> bool {
        self.capability("basic.nack")
    }

    /// Whether the broker sends Basic.Cancel when a consumer's queue goes.
    pub fn consumer_cancel_notify(&self) -> bool {
        self.capability("consumer_cancel_notify")
    }

    /// Whether the broker supports exchange-to-exchange bindings.
    pub fn exchange_exchange_bindings(&self) -> bool {
        self.capability("exchange_exchange_bindings")
    }

    /// Adds a callback run when the connection opens.
    pub fn add_on_open_callback(&self, callback: impl FnOnce(&SelectConnection) + 'static) {
        if self.state().is_opening() {
            let mut st = self.shared.state.borrow_mut();
            st.callbacks.on_open.push(Box::new(callback));
        }
    }

    /// Adds a callback run when the connection cannot be opened.
    pub fn add_on_open_error_callback(
        &self,
        callback: impl FnOnce(&SelectConnection, Error) + 'static,
    ) {
        if self.state().is_opening() {
            let mut st = self.shared.state.borrow_mut();
            st.callbacks.on_open_error.push(Box::new(callback));
        }
    }

    /// Adds a callback run when the open connection closes, with the
    /// reason.
    pub fn add_on_close_callback(&self, callback: impl FnOnce(&SelectConnection, Error) + 'static) {
        let mut st = self.shared.state.borrow_mut();
        if !st.closed {
            st.callbacks.on_close.push(Box::new(callback));
        }
    }

    /// Adds a callback run each time the broker blocks the connection, with
    /// the broker's Connection.Blocked (its `reason`, e.g. "low on
    /// memory"), as pika's `add_on_connection_blocked_callback`.
    pub fn add_on_connection_blocked_callback(
        &self,
        callback: impl FnMut(&SelectConnection, &connection::Blocked) + 'static,
    ) {
        self.shared
            .state
            .borrow_mut()
            .callbacks
            .on_blocked
            .push(Box::new(callback));
    }

    /// Adds a callback run each time the broker unblocks the connection,
    /// with its Connection.Unblocked.
    pub fn add_on_connection_unblocked_callback(
        &self,
        callback: impl FnMut(&SelectConnection, &connection::Unblocked) + 'static,
    ) {
        self.shared
            .state
            .borrow_mut()
            .callbacks
            .on_unblocked
            .push(Box::new(callback));
    }

    /// Whether the broker has blocked the connection, and why.
    pub fn blocked_reason(&self) -> Option<String> {
        self.shared
            .state
            .borrow()
            .core()
            .and_then(|c| c.blocked_reason().map(str::to_string))
    }

    /// A handle other threads use to run closures on this connection's
    /// loop thread.
    pub fn threadsafe_handle(&self) -> ConnectionHandle {
        ConnectionHandle::new(&self.shared)
    }

    /// Bytes waiting in the outbound buffer.
    pub fn outbound_buffer_size(&self) -> usize {
        self.shared
            .state
            .borrow()
            .core()
            .map_or(0, |c| c.outbound().len())
    }

    /// Sets the outbound buffer's high- and low-water marks (default 16 MiB
    /// and 4 MiB): once the buffer has grown past `high`, the drained
    /// callbacks run when it falls below `low`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when `low > high`.
    pub fn set_outbound_watermarks(&self, high: usize, low: usize) -> Result<(), Error> {
        if low > high {
            return Err(Error::invalid(
                "outbound watermarks",
                format!("low ({low}) must not exceed high ({high})"),
            ));
        }
        let mut st = self.shared.state.borrow_mut();
        st.high_water = high;
        st.low_water = low;
        Ok(())
    }

    /// Adds a callback run each time the outbound buffer, having passed the
    /// high-water mark, drains below the low-water mark: a publisher can
    /// pause at the high mark and resume here.
    pub fn add_on_outbound_drained_callback(
        &self,
        callback: impl FnMut(&SelectConnection) + 'static,
    ) {
        self.shared
            .state
            .borrow_mut()
            .callbacks
            .on_drained
            .push(Box::new(callback));
    }

    /// Whether the outbound buffer is past its high-water mark (and not yet
    /// back under the low one).
    pub fn is_outbound_above_high_water(&self) -> bool {
        self.shared.state.borrow().above_high_water
    }

    /// Opens a channel: the lowest free number when `channel_number` is
    /// `None`. Returns the channel at once, in state OPENING (as pika's
    /// `connection.channel()` does: it can be closed before it opens);
    /// `on_open` receives it once open, or the error that prevented it
    /// (exactly once).
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when the connection is not open,
    /// [`Error::NoFreeChannels`] when every number up to channel_max is
    /// taken, [`Error::InvalidChannelNumber`] for 0, a number above
    /// channel_max, or one in use. Nothing is sent then and `on_open` is
    /// dropped uncalled.
    pub fn channel(
        &self,
        channel_number: Option<u16>,
        on_open: impl FnOnce(Result<Channel, Error>) + 'static,
    ) -> Result<Channel, Error> {
        let key = {
            let mut st = self.shared.state.borrow_mut();
            let phase = SelectConnection::face_state(&st);
            let Some(core) = st.core_mut().filter(|_| phase == ConnectionState::Open) else {
                return Err(Error::ConnectionWrongState {
                    detail: format!("connection is {phase:?}, cannot open a channel"),
                });
            };
            let (key, request) = core.open_channel(channel_number)?;
            let number = key.number as usize;
            if st.channels.len() <= number {
                st.channels.resize_with(number + 1, || None);
            }
            let record = ChannelRecord {
                on_open: Some((request, Box::new(on_open))),
                ..Default::default()
            };
            st.channels[number] = Some((key, record));
            key
        };
        self.after_command();
        Ok(Channel::new(Rc::downgrade(&self.shared), key))
    }

    /// Closes the connection: open channels are closed first, then
    /// Connection.Close is sent and its CloseOk awaited (bounded by
    /// `socket_timeout`, 10 s when unset); `on_close` then gets
    /// [`Error::ConnectionClosedByClient`]. While the connection is still
    /// opening, the attempt is aborted and `on_open_error` gets
    /// [`Error::ConnectionOpenAborted`].
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when already closing or closed.
    pub fn close(&self, reply_code: u16, reply_text: &str) -> Result<(), Error> {
        let phase = self.state();
        match phase {
            ConnectionState::Closing | ConnectionState::Closed => {
                return Err(Error::ConnectionWrongState {
                    detail: format!("connection is {phase:?}, cannot close it"),
                });
            }
            p if p.is_opening() => {
                // Never a Close handshake before the connection is open:
                // the attempt ends at once (its core too), and the terminal
                // callback runs on the loop, not inside close().
                if let Some(core) = self.shared.state.borrow_mut().core_mut() {
                    let _ = core.close(reply_code, reply_text, std::time::Instant::now());
                }
                if self.release() {
                    let me = self.clone();
                    self.shared.ioloop.call_soon(move || {
                        me.fire_terminal(Error::ConnectionOpenAborted, false);
                    });
                }
                return Ok(());
            }
            _ => {}
        }
        {
            let mut st = self.shared.state.borrow_mut();
            if let Some(core) = st.core_mut() {
                core.close(reply_code, reply_text, std::time::Instant::now())?;
                // Every channel is closing: acks from other threads are
                // refused from now on.
                for key in core.channel_keys() {
                    self.shared.door.channel_closed(key);
                }
            }
        }
        self.after_command();
        self.arm_timer();
        Ok(())
    }

    /// Replaces the connection's secret (e.g. an expiring OAuth token) with
    /// RabbitMQ's Connection.UpdateSecret; `callback` gets `Ok(())` on
    /// UpdateSecretOk, or the error that closed the connection.
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when the connection is not open.
    pub fn update_secret(
        &self,
        new_secret: &str,
        reason: &str,
        callback: impl FnOnce(&SelectConnection, Result<(), Error>) + 'static,
    ) -> Result<(), Error> {
        {
            let mut st = self.shared.state.borrow_mut();
            let phase = SelectConnection::face_state(&st);
            let Some(core) = st.core_mut().filter(|_| phase == ConnectionState::Open) else {
                return Err(Error::ConnectionWrongState {
                    detail: format!("connection is {phase:?}, cannot update its secret"),
                });
            };
            let request = core.update_secret(new_secret, reason)?;
            st.callbacks
                .update_secret
                .push_back((request, Box::new(callback)));
        }
        self.after_command();
        Ok(())
    }

    /// The open (or opening, or closing) channel with this number — for a
    /// closure another thread handed over with
    /// [`ConnectionHandle::add_callback_threadsafe`], as pika's
    /// threaded-ack pattern does.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when no channel has that number.
    pub fn channel_by_number(&self, number: u16) -> Result<Channel, Error> {
        let st = self.shared.state.borrow();
        match st.channels.get(number as usize) {
            Some(Some((key, _))) => Ok(Channel::new(Rc::downgrade(&self.shared), *key)),
            _ => Err(Error::ChannelWrongState {
                detail: format!("no channel {number} on this connection"),
            }),
        }
    }

    /// Shuts down gracefully, in one call: every consumer is cancelled (no
    /// new deliveries; those already on their way are rejected back to the
    /// queue), then, once every delivery the application holds has been
    /// acked, nacked or rejected — its work in flight finished — or
    /// `timeout` passed, the connection is closed as by
    /// [`SelectConnection::close`] (200, "Normal shutdown"): channels
    /// first, then the connection; `on_close` runs as usual. Deliveries
    /// still unacked at the close go back to their queues (the broker
    /// requeues them). While the connection is still opening, this aborts
    /// it as `close` does.
    ///
    /// A Ctrl-C handler usually calls this (see the `signals` feature).
    /// Calling it again, or on a connection already closing or closed,
    /// does nothing: "stop, whatever the state".
    ///
    /// # Errors
    /// None today; the `Result` leaves room for failures to come.
    pub fn shutdown(&self, timeout: std::time::Duration) -> Result<(), Error> {
        match self.state() {
            ConnectionState::Open => {}
            ConnectionState::Closing | ConnectionState::Closed => return Ok(()),
            _ => return self.close(200, "Normal shutdown"),
        }
        {
            let mut st = self.shared.state.borrow_mut();
            if st.shutting_down {
                return Ok(());
            }
            st.shutting_down = true;
            if let Some(core) = st.core_mut() {
                for key in core.channel_keys() {
                    for tag in core.consumer_tags(key) {
                        if let Err(e) = core.cancel(key, &tag) {
                            log::debug!("shutdown: consumer {tag} not cancelled: {e}");
                        }
                    }
                }
            }
        }
        log::info!("shutting down: consumers cancelled, waiting for acks (at most {timeout:?})");
        self.after_command();
        let me = self.clone();
        self.shared.ioloop.call_later(timeout, move || {
            if me.is_open() {
                log::warn!("shutdown: deliveries still unacked after {timeout:?}; closing");
                let _ = me.close(200, "Normal shutdown");
            }
        });
        self.queue_shutdown_check();
        Ok(())
    }

    /// During a shutdown, closes once nothing is left unacked (checked on
    /// the loop, outside any borrow).
    pub(super) fn queue_shutdown_check(&self) {
        let me = self.clone();
        self.shared.ioloop.call_soon(move || {
            let done = {
                let st = me.shared.state.borrow();
                st.shutting_down
                    && SelectConnection::face_state(&st) == ConnectionState::Open
                    && st
                        .core()
                        .is_some_and(|c| c.total_unsettled_deliveries() == 0)
            };
            if done {
                log::info!("shutdown: every delivery settled; closing");
                let _ = me.close(200, "Normal shutdown");
            }
        });
    }

    /// The door ack handles of this connection go through.
    pub(super) fn door(&self) -> Arc<dyn crate::ack::Door> {
        self.shared
            .door_handle
            .get_or_init(|| {
                Arc::new(super::handle::SelectDoor {
                    handle: self.threadsafe_handle(),
                    state: self.shared.door.clone(),
                })
            })
            .clone()
    }

    /// An ack handle's settle, on the loop thread: checked again here (the
    /// channel may have closed since the handle's call), never sent to the
    /// wrong channel or connection instance.
    pub(super) fn settle_on_loop(
        &self,
        channel: crate::protocol::ChannelKey,
        epoch: u64,
        delivery_tag: u64,
        how: crate::ack::Settle,
    ) {
        let result = {
            let mut st = self.shared.state.borrow_mut();
            let result = match st.core_mut() {
                Some(core) => core.settle(channel, delivery_tag, how, Some(epoch)),
                None => Err(Error::ConnectionWrongState {
                    detail: "the connection is closed".into(),
                }),
            };
            if result.is_ok() {
                self.after_command_locked(&mut st);
            }
            result
        };
        if let Err(e) = result {
            log::warn!(
                "delivery {delivery_tag} of channel {} not settled: {e}",
                channel.number
            );
        }
    }
}
