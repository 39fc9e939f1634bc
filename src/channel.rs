//! [`Channel`]: one AMQP channel of a [`SelectConnection`], its states
//! (OPENING, OPEN, CLOSING, CLOSED), its per-channel RPC queue and its close
//! callbacks.
//!
//! ```no_run
//! use pika::{ConnectionParameters, SelectConnection};
//!
//! let conn = SelectConnection::new(
//!     ConnectionParameters::default(),
//!     |conn| {
//!         conn.channel(None, |result| {
//!             let channel = result.expect("channel opened");
//!             println!("channel {} is open", channel.channel_number());
//!             channel.close(200, "done").expect("channel is open");
//!         })
//!         .expect("connection is open");
//!     },
//!     |_conn, err| eprintln!("could not connect: {err}"),
//!     |conn, reason| {
//!         eprintln!("closed: {reason}");
//!         conn.ioloop().stop();
//!     },
//! )?;
//! conn.ioloop().start()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::rc::{Rc, Weak};

use crate::connection::{Deferred, SelectConnection, Shared as ConnectionShared};
use crate::error::Error;
use crate::spec::{Method, MethodId, channel};

/// A completion closure of a synchronous channel method, given the reply.
pub(crate) type RpcCallback = Box<dyn FnOnce(&Channel, Result<Method, Error>)>;

/// The states of a channel, as pika names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Channel.Open sent, OpenOk not yet received.
    Opening,
    /// Open: operations are accepted.
    Open,
    /// Channel.Close sent (or being sent), CloseOk not yet received.
    Closing,
    /// Closed; the channel object can no longer be used.
    Closed,
}

/// One synchronous request waiting for (or queued before) its reply.
struct PendingRpc {
    method: Method,
    replies: &'static [MethodId],
    callback: Option<RpcCallback>,
    sent: bool,
}

type OnChannelOpen = Box<dyn FnOnce(Result<Channel, Error>)>;
type OnChannelClose = Box<dyn FnOnce(&Channel, Error)>;

pub(crate) struct ChannelInner {
    pub(crate) state: ChannelState,
    on_open: Option<OnChannelOpen>,
    on_close: Vec<OnChannelClose>,
    rpcs: VecDeque<PendingRpc>,
    /// Why the channel is closing or closed.
    close_reason: Option<Error>,
    /// Set when the broker closed the channel while our own Channel.Close
    /// was waiting for its CloseOk: the number stays reserved until then.
    broker_close: Option<Error>,
}

/// Shared state behind [`Channel`] handles.
pub(crate) struct ChannelShared {
    number: u16,
    connection: Weak<ConnectionShared>,
    pub(crate) inner: RefCell<ChannelInner>,
}

/// An AMQP channel: a cheap `Clone` handle, `!Send`, used from the loop's
/// thread. Obtained from [`SelectConnection::channel`].
#[derive(Clone)]
pub struct Channel {
    shared: Rc<ChannelShared>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("number", &self.shared.number)
            .field("state", &self.shared.inner.borrow().state)
            .finish()
    }
}

impl Channel {
    pub(crate) fn new_opening(
        number: u16,
        connection: Weak<ConnectionShared>,
        on_open: Box<dyn FnOnce(Result<Channel, Error>)>,
    ) -> Channel {
        Channel {
            shared: Rc::new(ChannelShared {
                number,
                connection,
                inner: RefCell::new(ChannelInner {
                    state: ChannelState::Opening,
                    on_open: Some(on_open),
                    on_close: Vec::new(),
                    rpcs: VecDeque::new(),
                    close_reason: None,
                    broker_close: None,
                }),
            }),
        }
    }

    /// The channel's number, 1 to the negotiated channel_max.
    pub fn channel_number(&self) -> u16 {
        self.shared.number
    }

    /// The channel's state.
    pub fn state(&self) -> ChannelState {
        self.shared.inner.borrow().state
    }

    /// Whether the channel is open.
    pub fn is_open(&self) -> bool {
        self.state() == ChannelState::Open
    }

    /// Whether the channel is opening (Channel.Open sent, no OpenOk yet).
    pub fn is_opening(&self) -> bool {
        self.state() == ChannelState::Opening
    }

    /// Whether the channel is closing.
    pub fn is_closing(&self) -> bool {
        self.state() == ChannelState::Closing
    }

    /// Whether the channel is closed.
    pub fn is_closed(&self) -> bool {
        self.state() == ChannelState::Closed
    }

    /// The connection this channel belongs to, while it exists.
    pub fn connection(&self) -> Option<SelectConnection> {
        self.shared
            .connection
            .upgrade()
            .map(SelectConnection::from_shared)
    }

    /// Adds a callback called once when the channel closes, with the reason:
    /// [`Error::ChannelClosedByBroker`], [`Error::ChannelClosedByClient`],
    /// or the connection's error when the connection went away. On a closed
    /// channel the callback is dropped uncalled.
    pub fn add_on_close_callback(&self, callback: impl FnOnce(&Channel, Error) + 'static) {
        let mut inner = self.shared.inner.borrow_mut();
        if inner.state != ChannelState::Closed {
            inner.on_close.push(Box::new(callback));
        }
    }

    /// Closes the channel: sends Channel.Close and, once the broker's
    /// CloseOk arrives, calls the close callbacks with
    /// [`Error::ChannelClosedByClient`]. Closing while the channel is still
    /// opening suppresses its OpenOk (the open callback gets the close
    /// reason).
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is already closing or
    /// closed; nothing is sent then.
    pub fn close(&self, reply_code: u16, reply_text: &str) -> Result<(), Error> {
        let reason = Error::ChannelClosedByClient {
            reply_code,
            reply_text: reply_text.to_string(),
        };
        let method = channel::Close {
            reply_code,
            reply_text: reply_text.to_string(),
            class_id: 0,
            method_id: 0,
        };
        {
            let mut inner = self.shared.inner.borrow_mut();
            match inner.state {
                ChannelState::Closing | ChannelState::Closed => {
                    return Err(Error::ChannelWrongState {
                        detail: format!(
                            "channel {} is {:?}, cannot close it",
                            self.shared.number, inner.state
                        ),
                    });
                }
                ChannelState::Opening | ChannelState::Open => {}
            }
            inner.state = ChannelState::Closing;
            inner.close_reason = Some(reason);
        }
        self.send_method(method.into())
    }

    /// Publishes a message (Basic.Publish with its content header and
    /// body, split into frames of at most frame_max).
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open;
    /// [`Error::Encode`] for a name over 255 bytes or a content header over
    /// frame_max. Nothing is sent then.
    pub fn basic_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &crate::spec::BasicProperties,
        mandatory: bool,
    ) -> Result<(), Error> {
        if self.state() != ChannelState::Open {
            return Err(Error::ChannelWrongState {
                detail: format!(
                    "channel {} is {:?}, cannot publish",
                    self.shared.number,
                    self.state()
                ),
            });
        }
        let conn = self.connection().ok_or_else(|| Error::ChannelWrongState {
            detail: "the connection is gone".into(),
        })?;
        let method = crate::spec::basic::Publish {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            mandatory,
            ..Default::default()
        };
        conn.send_message_on_channel(self.shared.number, &method.into(), properties, body)
    }

    /// Sends a method on this channel.
    pub(crate) fn send_method(&self, method: Method) -> Result<(), Error> {
        let conn = self
            .shared
            .connection
            .upgrade()
            .ok_or_else(|| Error::ChannelWrongState {
                detail: "the connection is gone".into(),
            })?;
        SelectConnection::from_shared(conn).send_on_channel(self.shared.number, &method)
    }

    /// Queues a synchronous method; it goes out when every RPC queued before
    /// it has its reply (pika's per-channel RPC serialisation).
    #[allow(dead_code)] // the channel issue's operations use it
    pub(crate) fn rpc(&self, method: Method, callback: RpcCallback) -> Result<(), Error> {
        {
            let mut inner = self.shared.inner.borrow_mut();
            if inner.state != ChannelState::Open {
                return Err(Error::ChannelWrongState {
                    detail: format!(
                        "channel {} is {:?}, cannot send {}",
                        self.shared.number,
                        inner.state,
                        method.name()
                    ),
                });
            }
            inner.rpcs.push_back(PendingRpc {
                replies: method.replies(),
                method,
                callback: Some(callback),
                sent: false,
            });
        }
        self.send_next_rpc()
    }

    fn send_next_rpc(&self) -> Result<(), Error> {
        let method = {
            let mut inner = self.shared.inner.borrow_mut();
            match inner.rpcs.front_mut() {
                Some(rpc) if !rpc.sent => {
                    rpc.sent = true;
                    rpc.method.clone()
                }
                _ => return Ok(()),
            }
        };
        self.send_method(method)
    }

    /// Handles a method the broker sent on this channel; returns the user
    /// callbacks to run once no borrow is held.
    pub(crate) fn handle_method(&self, method: Method) -> Vec<Deferred> {
        let mut deferred: Vec<Deferred> = Vec::new();
        let state = self.state();
        match method {
            Method::ChannelOpenOk(_) if state == ChannelState::Opening => {
                let on_open = {
                    let mut inner = self.shared.inner.borrow_mut();
                    inner.state = ChannelState::Open;
                    inner.on_open.take()
                };
                if let Some(cb) = on_open {
                    let ch = self.clone();
                    deferred.push(Box::new(move |_| cb(Ok(ch))));
                }
            }
            Method::ChannelCloseOk(_) if state == ChannelState::Closing => {
                let reason = {
                    let inner = self.shared.inner.borrow();
                    inner
                        .broker_close
                        .clone()
                        .or_else(|| inner.close_reason.clone())
                        .unwrap_or(Error::ChannelClosedByClient {
                            reply_code: 200,
                            reply_text: "Normal shutdown".into(),
                        })
                };
                deferred.extend(self.finish_close(reason));
            }
            Method::ChannelClose(close) => {
                let reason = Error::ChannelClosedByBroker {
                    reply_code: close.reply_code,
                    reply_text: close.reply_text,
                };
                // Always answer the broker's close.
                if let Err(e) = self.send_method(channel::CloseOk {}.into()) {
                    log::debug!("channel {}: CloseOk not sent: {e}", self.shared.number);
                }
                if state == ChannelState::Closing {
                    // Our own Close is waiting for its CloseOk: report the
                    // broker's reason then, keep the number until then.
                    self.shared.inner.borrow_mut().broker_close = Some(reason);
                } else {
                    deferred.extend(self.finish_close(reason));
                }
            }
            other if state == ChannelState::Closing => {
                log::debug!(
                    "channel {}: discarding {} while closing",
                    self.shared.number,
                    other.name()
                );
            }
            other => {
                let id = other.id();
                let matched = {
                    let mut inner = self.shared.inner.borrow_mut();
                    match inner.rpcs.front() {
                        Some(rpc) if rpc.sent && rpc.replies.contains(&id) => inner
                            .rpcs
                            .pop_front()
                            .and_then(|mut rpc| rpc.callback.take()),
                        _ => None,
                    }
                };
                match matched {
                    Some(cb) => {
                        let ch = self.clone();
                        deferred.push(Box::new(move |_| cb(&ch, Ok(other))));
                        if let Err(e) = self.send_next_rpc() {
                            log::debug!("channel {}: next RPC not sent: {e}", self.shared.number);
                        }
                    }
                    None => log::warn!(
                        "channel {}: unexpected {} ignored",
                        self.shared.number,
                        other.name()
                    ),
                }
            }
        }
        deferred
    }

    /// Marks the channel closed with `reason`: fails its pending RPCs and its
    /// open callback, releases its number, and returns its close callbacks
    /// to run. Stored closures are dropped.
    pub(crate) fn finish_close(&self, reason: Error) -> Vec<Deferred> {
        let (on_open, rpcs, on_close) = {
            let mut inner = self.shared.inner.borrow_mut();
            if inner.state == ChannelState::Closed {
                return Vec::new();
            }
            inner.state = ChannelState::Closed;
            inner.close_reason = Some(reason.clone());
            (
                inner.on_open.take(),
                std::mem::take(&mut inner.rpcs),
                std::mem::take(&mut inner.on_close),
            )
        };
        if let Some(conn) = self.shared.connection.upgrade() {
            SelectConnection::from_shared(conn).release_channel(self.shared.number);
        }
        let mut deferred: Vec<Deferred> = Vec::new();
        if let Some(cb) = on_open {
            let r = reason.clone();
            deferred.push(Box::new(move |_| cb(Err(r))));
        }
        for mut rpc in rpcs {
            if let Some(cb) = rpc.callback.take() {
                let (ch, r) = (self.clone(), reason.clone());
                deferred.push(Box::new(move |_| cb(&ch, Err(r))));
            }
        }
        for cb in on_close {
            let (ch, r) = (self.clone(), reason.clone());
            deferred.push(Box::new(move |_| cb(&ch, r)));
        }
        deferred
    }
}
