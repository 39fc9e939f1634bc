//! Channels in the core: the channel table, each channel's state (OPENING,
//! OPEN, CLOSING, CLOSED), its request queue, consumers, publisher confirms,
//! and the channel commands.
//!
//! # Ordering and serialisation (pika's)
//!
//! A channel has at most one synchronous request in flight; later ones —
//! their `nowait` forms too — wait in a queue and go out in the order they
//! were made, each when the previous one has its reply (RabbitMQ itself
//! misbehaves on a nowait Basic.Cancel sent before the ConsumeOk of its
//! consumer). Asynchronous methods (publish, ack, nack, reject) never wait
//! for a reply: they go out at once, or right behind the requests made
//! before them that are not yet sent, so they are never reordered with
//! those. Channel.Close is a request like the others, queued behind what is
//! pending (a cancel, a declare in flight): each completes with its reply,
//! then the Close goes out.

use std::collections::VecDeque;

use super::event::{ChannelKey, ConsumerId, Event, Reply, RequestId};
use super::{Connection, Phase, truncate_short};
use crate::error::Error;
use crate::frame;
use crate::message::Confirmation;
use crate::spec::{
    BasicProperties, Method, MethodDef, MethodId, basic, channel as channel_class, confirm,
};

/// How many nowait-cancelled consumer tags a channel remembers (their
/// deliveries in flight are rejected back to the queue).
const RECENTLY_CANCELLED: usize = 64;

/// The states of a channel, as pika names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Channel.Open sent, OpenOk not yet received.
    Opening,
    /// Open: operations are accepted.
    Open,
    /// Closing: consumers being cancelled, or Channel.Close queued or sent
    /// and its CloseOk not yet received.
    Closing,
    /// Closed (or a key this connection does not know).
    Closed,
}

/// What a queued item is, beyond its frames.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// A request, a nowait method, or an asynchronous method.
    Plain,
    /// Basic.Get: its reply carries a message.
    Get,
    /// Basic.Cancel of this consumer tag.
    Cancel(String),
    /// Our Channel.Close.
    Close,
}

/// An item in a channel's queue: encoded frames, and what answers them.
#[derive(Debug)]
struct Pending {
    /// The application's request: its id and the method it sent. `None`
    /// for nowait and asynchronous methods and for the core's own
    /// requests (a close's cancels, the Close).
    request: Option<(RequestId, Method)>,
    frames: Vec<u8>,
    name: &'static str,
    /// The methods that answer it; empty when none is awaited.
    replies: &'static [MethodId],
    sent: bool,
    /// Publish, ack, nack, reject: may go out while a request waits for
    /// its reply.
    asynchronous: bool,
    kind: Kind,
}

#[derive(Debug)]
struct Consumer {
    id: ConsumerId,
    tag: String,
    no_ack: bool,
    /// Basic.Cancel queued or sent: deliveries until CancelOk are rejected
    /// (requeued) unless auto-acked.
    cancelled: bool,
}

#[derive(Debug)]
struct Confirms {
    next_tag: u64,
    /// Unconfirmed delivery tags, ascending (tags only grow).
    unconfirmed: VecDeque<u64>,
}

/// One channel's state.
#[derive(Debug)]
pub(crate) struct ChannelSlot {
    pub(super) key: ChannelKey,
    pub(super) state: ChannelState,
    /// The open request, until OpenOk.
    open_request: Option<RequestId>,
    rpcs: VecDeque<Pending>,
    /// How many items of `rpcs` are not sent yet.
    unsent: usize,
    consumers: Vec<Consumer>,
    /// Consumers cancelled with nowait, with their `no_ack`.
    recently_cancelled: VecDeque<(String, bool)>,
    confirms: Option<Confirms>,
    pub(super) content: Option<super::content::PendingContent>,
    get_pending: bool,
    /// Why the channel is closing (our close's code and text).
    close_reason: Option<Error>,
    /// Our Channel.Close is out: only Close and CloseOk matter now.
    pub(super) close_sent: bool,
    /// The broker closed the channel while our Close waited for its
    /// CloseOk: reported then.
    broker_close: Option<Error>,
    /// Methods the face wants to see ([`Event::Watched`]).
    watched: Vec<MethodId>,
}

impl ChannelSlot {
    fn new(key: ChannelKey, open_request: RequestId) -> ChannelSlot {
        ChannelSlot {
            key,
            state: ChannelState::Opening,
            open_request: Some(open_request),
            rpcs: VecDeque::new(),
            unsent: 0,
            consumers: Vec::new(),
            recently_cancelled: VecDeque::new(),
            confirms: None,
            content: None,
            get_pending: false,
            close_reason: None,
            close_sent: false,
            broker_close: None,
            watched: Vec::new(),
        }
    }

    /// Frames for this channel are dropped (our Close is out).
    pub(super) fn discarding(&self) -> bool {
        self.state == ChannelState::Closed
            || (self.state == ChannelState::Closing && self.close_sent)
    }

    fn wrong_state(&self, what: &str) -> Error {
        Error::ChannelWrongState {
            detail: format!(
                "channel {} is {:?}, cannot {what}",
                self.key.number, self.state
            ),
        }
    }

    fn ensure_open(&self, what: &str) -> Result<(), Error> {
        if self.state == ChannelState::Open {
            Ok(())
        } else {
            Err(self.wrong_state(what))
        }
    }

    /// What this channel's close has done so far, for the log when the
    /// connection's close bound expires.
    pub(super) fn close_progress(&self) -> String {
        let number = self.key.number;
        if self.close_sent {
            return format!("channel {number}: Channel.Close sent, no Channel.CloseOk");
        }
        let waiting: Vec<&str> = self
            .rpcs
            .iter()
            .take_while(|r| r.kind != Kind::Close)
            .filter(|r| !r.replies.is_empty())
            .map(|r| r.name)
            .collect();
        match self.rpcs.front() {
            Some(front) if front.sent && !waiting.is_empty() => format!(
                "channel {number}: Channel.Close not sent, queued behind {} (in flight, no \
                 reply){}",
                front.name,
                if waiting.len() > 1 {
                    format!(" and {} more", waiting.len() - 1)
                } else {
                    String::new()
                }
            ),
            _ => format!("channel {number}: Channel.Close not sent"),
        }
    }

    fn consumer(&self, tag: &str) -> Option<&Consumer> {
        self.consumers.iter().find(|c| c.tag == tag)
    }

    fn remove_consumer(&mut self, tag: &str) -> Option<Consumer> {
        let i = self.consumers.iter().position(|c| c.tag == tag)?;
        Some(self.consumers.remove(i))
    }
}

/// The error for a key this connection does not know (a channel closed
/// since, or of another connection).
fn unknown_channel(key: ChannelKey, what: &str) -> Error {
    Error::ChannelWrongState {
        detail: format!("channel {} is Closed, cannot {what}", key.number),
    }
}

/// Methods that have their own command; `rpc` and `nowait` refuse them.
fn special_command(method: &Method) -> Option<&'static str> {
    match method {
        Method::BasicConsume(_) => Some("consume"),
        Method::BasicCancel(_) => Some("cancel"),
        Method::BasicGet(_) => Some("get"),
        Method::BasicPublish(_) => Some("publish"),
        Method::BasicAck(_) | Method::BasicNack(_) | Method::BasicReject(_) => {
            Some("ack, nack or reject")
        }
        Method::ConfirmSelect(_) => Some("confirm_select"),
        Method::ChannelOpen(_) => Some("open_channel"),
        Method::ChannelClose(_) => Some("close_channel"),
        m if m.id().class_id == crate::spec::connection::CLASS_ID => Some("the connection's"),
        _ => None,
    }
}

impl Connection {
    // ------------------------------------------------------------------
    // Table
    // ------------------------------------------------------------------

    fn slot(&self, key: ChannelKey) -> Option<&ChannelSlot> {
        self.channels
            .get(key.number as usize)
            .and_then(Option::as_ref)
            .filter(|s| s.key == key)
    }

    fn slot_mut(&mut self, key: ChannelKey) -> Option<&mut ChannelSlot> {
        self.channels
            .get_mut(key.number as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.key == key)
    }

    /// The open slot for a command, or the error saying why not.
    fn open_slot(&mut self, key: ChannelKey, what: &str) -> Result<&mut ChannelSlot, Error> {
        let slot = self
            .slot_mut(key)
            .ok_or_else(|| unknown_channel(key, what))?;
        slot.ensure_open(what)?;
        Ok(slot)
    }

    pub(super) fn slot_by_number(&mut self, number: u16) -> Option<&mut ChannelSlot> {
        self.channels
            .get_mut(number as usize)
            .and_then(Option::as_mut)
    }

    /// A channel's state ([`ChannelState::Closed`] for a key this
    /// connection does not know).
    pub fn channel_phase(&self, key: ChannelKey) -> ChannelState {
        self.slot(key).map_or(ChannelState::Closed, |s| s.state)
    }

    /// The tags of a channel's active consumers (not being cancelled),
    /// sorted.
    pub fn consumer_tags(&self, key: ChannelKey) -> Vec<String> {
        let mut tags: Vec<String> = self
            .slot(key)
            .map(|s| {
                s.consumers
                    .iter()
                    .filter(|c| !c.cancelled)
                    .map(|c| c.tag.clone())
                    .collect()
            })
            .unwrap_or_default();
        tags.sort();
        tags
    }

    /// Whether the channel is in confirm mode.
    pub fn is_confirm_mode(&self, key: ChannelKey) -> bool {
        self.slot(key).is_some_and(|s| s.confirms.is_some())
    }

    /// The delivery tags published in confirm mode and not yet settled, in
    /// order.
    pub fn unconfirmed_delivery_tags(&self, key: ChannelKey) -> Vec<u64> {
        self.slot(key)
            .and_then(|s| s.confirms.as_ref())
            .map(|c| c.unconfirmed.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Opens a channel: the lowest free number when `number` is `None`.
    /// The channel is OPENING at once; the request's reply is
    /// Channel.OpenOk.
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when the connection is not open,
    /// [`Error::NoFreeChannels`] when every number up to channel_max is
    /// taken, [`Error::InvalidChannelNumber`] for 0, a number above
    /// channel_max, or one in use. Nothing is sent then.
    pub fn open_channel(&mut self, number: Option<u16>) -> Result<(ChannelKey, RequestId), Error> {
        self.ensure_connection_open("open a channel")?;
        let max = self.channel_max;
        let taken = |n: u16| self.channels.get(n as usize).is_some_and(Option::is_some);
        let number = match number {
            Some(0) => {
                return Err(Error::InvalidChannelNumber {
                    number: 0,
                    reason: "channel 0 is the connection's",
                });
            }
            Some(n) if n > max => {
                return Err(Error::InvalidChannelNumber {
                    number: n,
                    reason: "above the negotiated channel_max",
                });
            }
            Some(n) if taken(n) => {
                return Err(Error::InvalidChannelNumber {
                    number: n,
                    reason: "in use",
                });
            }
            Some(n) => n,
            None => (1..=max)
                .find(|&n| !taken(n))
                .ok_or(Error::NoFreeChannels { channel_max: max })?,
        };
        if self.generations.len() <= number as usize {
            self.generations.resize(number as usize + 1, 0);
        }
        self.generations[number as usize] += 1;
        let key = ChannelKey {
            number,
            generation: self.generations[number as usize],
        };
        let request = self.start_channel(key)?;
        Ok((key, request))
    }

    /// Opens the channel `key` names on this connection, keeping its key —
    /// for a layer that replaces a dead connection under the application's
    /// channel handles.
    ///
    /// # Errors
    /// As [`Connection::open_channel`] for that number.
    pub fn reopen_channel(&mut self, key: ChannelKey) -> Result<RequestId, Error> {
        self.ensure_connection_open("open a channel")?;
        if key.number == 0 || key.number > self.channel_max {
            return Err(Error::InvalidChannelNumber {
                number: key.number,
                reason: "0 or above the negotiated channel_max",
            });
        }
        if self
            .channels
            .get(key.number as usize)
            .is_some_and(Option::is_some)
        {
            return Err(Error::InvalidChannelNumber {
                number: key.number,
                reason: "in use",
            });
        }
        if self.generations.len() <= key.number as usize {
            self.generations.resize(key.number as usize + 1, 0);
        }
        let generation = &mut self.generations[key.number as usize];
        *generation = (*generation).max(key.generation);
        self.start_channel(key)
    }

    fn start_channel(&mut self, key: ChannelKey) -> Result<RequestId, Error> {
        self.send_method(key.number, &channel_class::Open::default().into())?;
        let request = self.new_request_id();
        if self.channels.len() <= key.number as usize {
            self.channels.resize_with(key.number as usize + 1, || None);
        }
        self.channels[key.number as usize] = Some(ChannelSlot::new(key, request));
        Ok(request)
    }

    fn ensure_connection_open(&self, what: &str) -> Result<(), Error> {
        if self.phase == Phase::Open {
            Ok(())
        } else {
            Err(Error::ConnectionWrongState {
                detail: format!("connection is {:?}, cannot {what}", self.phase),
            })
        }
    }

    /// Asks to see every method in `ids` that arrives on the channel, as an
    /// [`Event::Watched`] before its normal handling (pika's generic
    /// `add_callback`). Replaces the previous set.
    pub fn watch_methods(&mut self, key: ChannelKey, ids: Vec<MethodId>) {
        if let Some(slot) = self.slot_mut(key) {
            slot.watched = ids;
        }
    }

    // ------------------------------------------------------------------
    // The request queue
    // ------------------------------------------------------------------

    /// Encodes `method` for the channel's queue; the error leaves nothing
    /// queued.
    fn encode_for(&self, number: u16, method: &Method) -> Result<Vec<u8>, Error> {
        let mut frames = Vec::new();
        frame::encode_method(&mut frames, number, method, self.frame_max)?;
        Ok(frames)
    }

    fn push_pending(&mut self, key: ChannelKey, pending: Pending) {
        if let Some(slot) = self.slot_mut(key) {
            slot.unsent += 1;
            slot.rpcs.push_back(pending);
        }
        self.pump(key);
    }

    /// Sends queued items until one is waiting for its reply.
    fn pump(&mut self, key: ChannelKey) {
        loop {
            let Some(slot) = self
                .channels
                .get_mut(key.number as usize)
                .and_then(Option::as_mut)
            else {
                return;
            };
            // At most one request is in flight, at the front. Behind it,
            // asynchronous items go out at once; the next request waits.
            let idx = match slot.rpcs.front() {
                Some(front) if front.sent => 1,
                Some(_) => 0,
                None => return,
            };
            let Some(item) = slot.rpcs.get_mut(idx) else {
                return;
            };
            if idx == 1 && !item.asynchronous {
                return;
            }
            item.sent = true;
            slot.unsent -= 1;
            let frames = std::mem::take(&mut item.frames);
            if item.kind == Kind::Close {
                slot.close_sent = true;
            }
            if item.replies.is_empty() {
                slot.rpcs.remove(idx);
            }
            self.outbound.extend_from_slice(&frames);
        }
    }

    /// A synchronous request (declare, bind, purge, delete, qos, recover,
    /// tx, flow, …): its reply comes as [`Event::Reply`].
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open;
    /// [`Error::Encode`] for a value that does not encode (a name over
    /// 255 bytes); [`Error::InvalidParameter`] for a method that has its
    /// own command or no reply. Nothing is queued then.
    pub fn rpc(&mut self, key: ChannelKey, method: Method) -> Result<RequestId, Error> {
        if let Some(command) = special_command(&method) {
            return Err(Error::invalid(
                "method",
                format!("{} goes through {command} command", method.name()),
            ));
        }
        if method.replies().is_empty() {
            return Err(Error::invalid(
                "method",
                format!("{} has no reply; send it with nowait", method.name()),
            ));
        }
        self.open_slot(key, method.name())?;
        self.queue_request(key, method, Kind::Plain)
    }

    fn queue_request(
        &mut self,
        key: ChannelKey,
        method: Method,
        kind: Kind,
    ) -> Result<RequestId, Error> {
        let frames = self.encode_for(key.number, &method)?;
        let request = self.new_request_id();
        let pending = Pending {
            name: method.name(),
            replies: method.replies(),
            request: Some((request, method)),
            frames,
            sent: false,
            asynchronous: false,
            kind,
        };
        self.push_pending(key, pending);
        Ok(request)
    }

    /// A method sent without awaiting a reply (a request with its `nowait`
    /// flag set by the caller, or a method that has no reply): it goes out
    /// in turn behind the requests before it.
    ///
    /// # Errors
    /// As [`Connection::rpc`].
    pub fn nowait(&mut self, key: ChannelKey, method: Method) -> Result<(), Error> {
        if let Some(command) = special_command(&method) {
            return Err(Error::invalid(
                "method",
                format!("{} goes through {command} command", method.name()),
            ));
        }
        self.open_slot(key, method.name())?;
        let frames = self.encode_for(key.number, &method)?;
        self.push_pending(
            key,
            Pending {
                request: None,
                frames,
                name: method.name(),
                replies: &[],
                sent: false,
                asynchronous: false,
                kind: Kind::Plain,
            },
        );
        Ok(())
    }

    /// Sends an asynchronous method (ack, nack, reject): at once, unless
    /// queued items are not sent yet; then in turn behind them.
    fn send_async(&mut self, key: ChannelKey, method: Method) -> Result<(), Error> {
        let slot = self.open_slot(key, method.name())?;
        if slot.unsent == 0 {
            return self.send_method(key.number, &method);
        }
        let frames = self.encode_for(key.number, &method)?;
        self.push_pending(
            key,
            Pending {
                request: None,
                frames,
                name: method.name(),
                replies: &[],
                sent: false,
                asynchronous: true,
                kind: Kind::Plain,
            },
        );
        Ok(())
    }

    fn check_epoch(&self, epoch: Option<u64>, what: &str) -> Result<(), Error> {
        match epoch {
            Some(e) if e != self.config.epoch => Err(Error::ChannelWrongState {
                detail: format!(
                    "cannot {what}: the delivery came from connection instance {e}, this is \
                     instance {} (its delivery tags mean nothing here)",
                    self.config.epoch
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Acknowledges one message, or with `multiple` every message up to
    /// and including `delivery_tag`. With `epoch` (the delivery's), a tag
    /// of another connection instance is refused.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open or the
    /// epoch is another instance's.
    pub fn ack(
        &mut self,
        key: ChannelKey,
        delivery_tag: u64,
        multiple: bool,
        epoch: Option<u64>,
    ) -> Result<(), Error> {
        self.check_epoch(epoch, "basic_ack")?;
        let m = basic::Ack {
            delivery_tag,
            multiple,
        };
        self.send_async(key, m.into())
    }

    /// Rejects one or more messages (RabbitMQ's Basic.Nack).
    ///
    /// # Errors
    /// As [`Connection::ack`].
    pub fn nack(
        &mut self,
        key: ChannelKey,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
        epoch: Option<u64>,
    ) -> Result<(), Error> {
        self.check_epoch(epoch, "basic_nack")?;
        let m = basic::Nack {
            delivery_tag,
            multiple,
            requeue,
        };
        self.send_async(key, m.into())
    }

    /// Rejects one message.
    ///
    /// # Errors
    /// As [`Connection::ack`].
    pub fn reject(
        &mut self,
        key: ChannelKey,
        delivery_tag: u64,
        requeue: bool,
        epoch: Option<u64>,
    ) -> Result<(), Error> {
        self.check_epoch(epoch, "basic_reject")?;
        let m = basic::Reject {
            delivery_tag,
            requeue,
        };
        self.send_async(key, m.into())
    }

    /// Publishes a message: Basic.Publish, its content header and its body
    /// split at frame_max, straight into the outbound buffer (or queued
    /// behind requests not yet sent, which it may depend on). Returns the
    /// delivery tag in confirm mode.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open,
    /// [`Error::ConnectionWrongState`] when the connection is not open,
    /// [`Error::Encode`] for a name over 255 bytes or a content header
    /// over frame_max. Nothing is sent then.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &mut self,
        key: ChannelKey,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<Option<u64>, Error> {
        let frame_max = self.frame_max;
        let phase = self.phase;
        let slot = self
            .channels
            .get_mut(key.number as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.key == key)
            .ok_or_else(|| unknown_channel(key, "basic_publish"))?;
        slot.ensure_open("basic_publish")?;
        if phase != Phase::Open {
            return Err(Error::ConnectionWrongState {
                detail: format!("connection is {phase:?}, cannot send Basic.Publish"),
            });
        }
        if slot.unsent == 0 {
            frame::encode_publish(
                &mut self.outbound,
                key.number,
                exchange,
                routing_key,
                mandatory,
                properties,
                body,
                frame_max,
            )?;
        } else {
            // Behind a request not yet sent (a declare waiting for the one
            // in flight, a Confirm.Select), the message waits its turn:
            // sent now, it would overtake what it may depend on.
            let mut frames = Vec::new();
            frame::encode_publish(
                &mut frames,
                key.number,
                exchange,
                routing_key,
                mandatory,
                properties,
                body,
                frame_max,
            )?;
            slot.unsent += 1;
            slot.rpcs.push_back(Pending {
                request: None,
                frames,
                name: <basic::Publish as MethodDef>::NAME,
                replies: &[],
                sent: false,
                asynchronous: true,
                kind: Kind::Plain,
            });
        }
        let tag = slot.confirms.as_mut().map(|c| {
            let tag = c.next_tag;
            c.next_tag += 1;
            c.unconfirmed.push_back(tag);
            tag
        });
        if slot.unsent > 0 {
            self.pump(key);
        }
        Ok(tag)
    }

    /// Starts a consumer. An empty `consumer_tag` gets one unique on the
    /// connection (`ctag<channel>.<n>`). Returns the request (its reply is
    /// Basic.ConsumeOk), the consumer's id (deliveries carry it) and its
    /// tag. If the request fails, the consumer is forgotten.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`]; [`Error::DuplicateConsumerTag`] when
    /// the tag is in use on this channel; [`Error::Encode`].
    pub fn consume(
        &mut self,
        key: ChannelKey,
        mut consume: basic::Consume,
    ) -> Result<(RequestId, ConsumerId, String), Error> {
        self.open_slot(key, "basic_consume")?;
        if consume.consumer_tag.is_empty() {
            self.consumer_tags_issued += 1;
            consume.consumer_tag = format!("ctag{}.{}", key.number, self.consumer_tags_issued);
        }
        let tag = consume.consumer_tag.clone();
        let no_ack = consume.no_ack;
        consume.nowait = false;
        if self.slot(key).is_some_and(|s| s.consumer(&tag).is_some()) {
            return Err(Error::DuplicateConsumerTag { tag });
        }
        let request = self.queue_request(key, consume.into(), Kind::Plain)?;
        let id = ConsumerId(self.next_consumer);
        self.next_consumer += 1;
        if let Some(slot) = self.slot_mut(key) {
            slot.consumers.push(Consumer {
                id,
                tag: tag.clone(),
                no_ack,
                cancelled: false,
            });
        }
        Ok((request, id, tag))
    }

    /// Cancels a consumer; the reply is Basic.CancelOk, after
    /// [`Event::ConsumerEnded`]. Deliveries that arrive for it before the
    /// CancelOk are rejected back to the queue (unless it auto-acks).
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`]; [`Error::InvalidParameter`] naming
    /// `consumer_tag` when no such consumer is active on this channel.
    pub fn cancel(&mut self, key: ChannelKey, consumer_tag: &str) -> Result<RequestId, Error> {
        self.open_slot(key, "basic_cancel")?;
        self.mark_cancelled(key, consumer_tag)?;
        let m = basic::Cancel {
            consumer_tag: consumer_tag.to_string(),
            nowait: false,
        };
        match self.queue_request(key, m.into(), Kind::Cancel(consumer_tag.to_string())) {
            Ok(request) => Ok(request),
            Err(e) => {
                self.unmark_cancelled(key, consumer_tag);
                Err(e)
            }
        }
    }

    /// Cancels a consumer with `nowait`: it is forgotten at once
    /// ([`Event::ConsumerEnded`]); deliveries already on their way are
    /// rejected back to the queue (unless it auto-acks).
    ///
    /// # Errors
    /// As [`Connection::cancel`].
    pub fn cancel_nowait(&mut self, key: ChannelKey, consumer_tag: &str) -> Result<(), Error> {
        self.open_slot(key, "basic_cancel")?;
        self.mark_cancelled(key, consumer_tag)?;
        let m: Method = basic::Cancel {
            consumer_tag: consumer_tag.to_string(),
            nowait: true,
        }
        .into();
        let frames = match self.encode_for(key.number, &m) {
            Ok(f) => f,
            Err(e) => {
                self.unmark_cancelled(key, consumer_tag);
                return Err(e);
            }
        };
        if let Some(slot) = self.slot_mut(key) {
            if let Some(c) = slot.remove_consumer(consumer_tag) {
                if slot.recently_cancelled.len() == RECENTLY_CANCELLED {
                    slot.recently_cancelled.pop_front();
                }
                slot.recently_cancelled
                    .push_back((consumer_tag.to_string(), c.no_ack));
                self.events.push_back(Event::ConsumerEnded {
                    channel: key,
                    consumer: c.id,
                    by_broker: None,
                });
            }
        }
        self.push_pending(
            key,
            Pending {
                request: None,
                frames,
                name: m.name(),
                replies: &[],
                sent: false,
                asynchronous: false,
                kind: Kind::Plain,
            },
        );
        Ok(())
    }

    fn mark_cancelled(&mut self, key: ChannelKey, tag: &str) -> Result<(), Error> {
        let slot = self
            .slot_mut(key)
            .ok_or_else(|| unknown_channel(key, "basic_cancel"))?;
        match slot.consumers.iter_mut().find(|c| c.tag == tag) {
            Some(c) if !c.cancelled => {
                c.cancelled = true;
                Ok(())
            }
            _ => Err(Error::InvalidParameter {
                name: "consumer_tag",
                reason: format!("no active consumer {tag:?} on channel {}", key.number),
            }),
        }
    }

    fn unmark_cancelled(&mut self, key: ChannelKey, tag: &str) {
        if let Some(c) = self
            .slot_mut(key)
            .and_then(|s| s.consumers.iter_mut().find(|c| c.tag == tag))
        {
            c.cancelled = false;
        }
    }

    /// Fetches one message: the reply is [`Reply::Get`].
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`]; [`Error::DuplicateGetOkCallback`]
    /// when a get is already waiting for its reply on this channel.
    pub fn get(&mut self, key: ChannelKey, get: basic::Get) -> Result<RequestId, Error> {
        let slot = self.open_slot(key, "basic_get")?;
        if slot.get_pending {
            return Err(Error::DuplicateGetOkCallback);
        }
        let request = self.queue_request(key, get.into(), Kind::Get)?;
        if let Some(slot) = self.slot_mut(key) {
            slot.get_pending = true;
        }
        Ok(request)
    }

    /// Puts the channel in confirm mode (Confirm.Select); publishes from
    /// now on get delivery tags from 1, settled through
    /// [`Event::Confirm`].
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`]; [`Error::InvalidParameter`] when the
    /// channel is already in confirm mode.
    pub fn confirm_select(&mut self, key: ChannelKey) -> Result<RequestId, Error> {
        let slot = self.open_slot(key, "confirm_delivery")?;
        if slot.confirms.is_some() {
            return Err(Error::InvalidParameter {
                name: "confirm_delivery",
                reason: format!("channel {} is already in confirm mode", key.number),
            });
        }
        let request =
            self.queue_request(key, confirm::Select { nowait: false }.into(), Kind::Plain)?;
        // The broker counts publishes from the Select on: so do we.
        if let Some(slot) = self.slot_mut(key) {
            slot.confirms = Some(Confirms {
                next_tag: 1,
                unconfirmed: VecDeque::new(),
            });
        }
        Ok(request)
    }

    /// Closes the channel: its active consumers are cancelled, then
    /// Channel.Close is queued behind the requests already pending; once
    /// the broker's CloseOk arrives the channel ends with
    /// [`Error::ChannelClosedByClient`]. Closing while the channel opens
    /// suppresses its OpenOk (the open request fails with the close).
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is already closing or
    /// closed; nothing is sent then.
    pub fn close_channel(
        &mut self,
        key: ChannelKey,
        reply_code: u16,
        reply_text: &str,
    ) -> Result<(), Error> {
        let reply_text = truncate_short(reply_text);
        let close: Method = channel_class::Close {
            reply_code,
            reply_text: reply_text.clone(),
            class_id: 0,
            method_id: 0,
        }
        .into();
        let frames = self.encode_for(key.number, &close)?;
        let slot = self
            .slot_mut(key)
            .ok_or_else(|| unknown_channel(key, "close it"))?;
        if matches!(slot.state, ChannelState::Closing | ChannelState::Closed) {
            return Err(slot.wrong_state("close it"));
        }
        let was_open = slot.state == ChannelState::Open;
        slot.state = ChannelState::Closing;
        slot.close_reason = Some(Error::ChannelClosedByClient {
            reply_code,
            reply_text,
        });
        let tags: Vec<String> = if was_open {
            slot.consumers
                .iter()
                .filter(|c| !c.cancelled)
                .map(|c| c.tag.clone())
                .collect()
        } else {
            Vec::new()
        };
        for tag in tags {
            let m: Method = basic::Cancel {
                consumer_tag: tag.clone(),
                nowait: false,
            }
            .into();
            match self.encode_for(key.number, &m) {
                Ok(frames) => {
                    if let Some(c) = self
                        .slot_mut(key)
                        .and_then(|s| s.consumers.iter_mut().find(|c| c.tag == tag))
                    {
                        c.cancelled = true;
                    }
                    self.push_pending(
                        key,
                        Pending {
                            request: None,
                            frames,
                            name: m.name(),
                            replies: m.replies(),
                            sent: false,
                            asynchronous: false,
                            kind: Kind::Cancel(tag),
                        },
                    );
                }
                Err(e) => log::debug!("{key}: consumer {tag} not cancelled: {e}"),
            }
        }
        self.push_pending(
            key,
            Pending {
                request: None,
                frames,
                name: close.name(),
                replies: close.replies(),
                sent: false,
                asynchronous: false,
                kind: Kind::Close,
            },
        );
        Ok(())
    }

    // ------------------------------------------------------------------
    // Incoming
    // ------------------------------------------------------------------

    /// A method the broker sent on channel `number`.
    pub(super) fn handle_channel_method(&mut self, number: u16, method: Method) {
        let Some(slot) = self.slot_by_number(number) else {
            self.unexpected(format!(
                "{} on channel {number}, which is not open",
                method.name()
            ));
            return;
        };
        if slot.content.is_some() {
            let detail = format!(
                "{} on channel {number} while a message's content was arriving",
                method.name()
            );
            self.unexpected(detail);
            return;
        }
        let key = slot.key;
        let state = slot.state;
        if slot.watched.contains(&method.id()) {
            self.events.push_back(Event::Watched {
                channel: key,
                method: method.clone(),
            });
        }
        let Some(slot) = self.slot_by_number(number) else {
            return;
        };
        match method {
            Method::ChannelOpenOk(ok) if state == ChannelState::Opening => {
                slot.state = ChannelState::Open;
                if let Some(request) = slot.open_request.take() {
                    self.events.push_back(Event::Reply {
                        request,
                        channel: Some(key),
                        method: channel_class::Open::default().into(),
                        result: Ok(Reply::Method(ok.into())),
                    });
                }
            }
            Method::ChannelCloseOk(_) if state == ChannelState::Closing => {
                let reason = slot
                    .broker_close
                    .clone()
                    .or_else(|| slot.close_reason.clone())
                    .unwrap_or(Error::ChannelClosedByClient {
                        reply_code: 200,
                        reply_text: "Normal shutdown".into(),
                    });
                self.finish_channel(number, reason);
            }
            Method::ChannelClose(close) => {
                let reason = Error::ChannelClosedByBroker {
                    reply_code: close.reply_code,
                    reply_text: close.reply_text,
                };
                let ours_pending = slot.state == ChannelState::Closing && slot.close_sent;
                // Always answered.
                if let Err(e) = self.send_method(number, &channel_class::CloseOk {}.into()) {
                    log::debug!("channel {number}: CloseOk not sent: {e}");
                }
                if ours_pending {
                    // Our Close waits for its CloseOk: the broker's reason
                    // is reported then, and the number stays taken.
                    if let Some(slot) = self.slot_by_number(number) {
                        slot.broker_close = Some(reason);
                    }
                } else {
                    self.finish_channel(number, reason);
                }
            }
            other if slot.discarding() => {
                log::debug!(
                    "channel {number}: discarding {} while closing",
                    other.name()
                );
            }
            Method::ChannelFlow(flow) => {
                let ok = channel_class::FlowOk {
                    active: flow.active,
                };
                if let Err(e) = self.send_method(number, &ok.into()) {
                    log::debug!("channel {number}: FlowOk not sent: {e}");
                }
                self.events.push_back(Event::Flow {
                    channel: key,
                    active: flow.active,
                });
            }
            m @ (Method::BasicDeliver(_) | Method::BasicReturn(_) | Method::BasicGetOk(_)) => {
                slot.content = Some(super::content::PendingContent::new(m));
            }
            Method::BasicAck(ack) => self.on_confirm(number, ack.delivery_tag, ack.multiple, true),
            Method::BasicNack(nack) => {
                self.on_confirm(number, nack.delivery_tag, nack.multiple, false)
            }
            // A broker's Basic.Cancel is never the reply to ours.
            Method::BasicCancel(cancel)
                if !front_expects(slot, <basic::Cancel as MethodDef>::ID) =>
            {
                self.on_broker_cancel(number, cancel)
            }
            other => self.on_reply(number, other),
        }
    }

    /// A reply to the request in flight (or a 505 when there is none it
    /// answers).
    fn on_reply(&mut self, number: u16, method: Method) {
        let id = method.id();
        let Some(slot) = self.slot_by_number(number) else {
            return;
        };
        let key = slot.key;
        if !front_expects(slot, id) {
            let detail = format!(
                "{} on channel {number}, which is no reply to a request in flight",
                method.name()
            );
            self.unexpected(detail);
            return;
        }
        let Some(pending) = slot.rpcs.pop_front() else {
            return;
        };
        match &pending.kind {
            Kind::Get => {
                slot.get_pending = false;
                // Basic.GetEmpty (GetOk comes through the content path).
                if let Some((request, method)) = pending.request {
                    self.events.push_back(Event::Reply {
                        request,
                        channel: Some(key),
                        method,
                        result: Ok(Reply::Get(None)),
                    });
                }
            }
            Kind::Cancel(tag) => {
                if let Some(consumer) = slot.remove_consumer(tag) {
                    self.events.push_back(Event::ConsumerEnded {
                        channel: key,
                        consumer: consumer.id,
                        by_broker: None,
                    });
                }
                if let Some((request, sent)) = pending.request {
                    self.events.push_back(Event::Reply {
                        request,
                        channel: Some(key),
                        method: sent,
                        result: Ok(Reply::Method(method)),
                    });
                }
            }
            Kind::Plain | Kind::Close => {
                if let Some((request, sent)) = pending.request {
                    self.events.push_back(Event::Reply {
                        request,
                        channel: Some(key),
                        method: sent,
                        result: Ok(Reply::Method(method)),
                    });
                }
            }
        }
        self.pump(key);
    }

    /// A whole Basic.GetOk message: the reply of the get in flight.
    pub(super) fn on_get_ok(&mut self, number: u16, message: crate::message::GetMessage) {
        let id = <basic::GetOk as MethodDef>::ID;
        let Some(slot) = self.slot_by_number(number) else {
            return;
        };
        let key = slot.key;
        if !front_expects(slot, id) {
            log::warn!("channel {number}: Basic.GetOk with no get waiting");
            return;
        }
        let Some(pending) = slot.rpcs.pop_front() else {
            return;
        };
        slot.get_pending = false;
        if let Some((request, method)) = pending.request {
            self.events.push_back(Event::Reply {
                request,
                channel: Some(key),
                method,
                result: Ok(Reply::Get(Some(Box::new(message)))),
            });
        }
        self.pump(key);
    }

    fn on_confirm(&mut self, number: u16, tag: u64, multiple: bool, ack: bool) {
        let Some(slot) = self.slot_by_number(number) else {
            return;
        };
        let key = slot.key;
        let Some(confirms) = slot.confirms.as_mut() else {
            log::warn!(
                "channel {number}: Basic.{} outside confirm mode ignored",
                if ack { "Ack" } else { "Nack" }
            );
            return;
        };
        if multiple {
            while confirms.unconfirmed.front().is_some_and(|&t| t <= tag) {
                confirms.unconfirmed.pop_front();
            }
        } else if confirms.unconfirmed.front() == Some(&tag) {
            confirms.unconfirmed.pop_front();
        } else if let Ok(i) = confirms.unconfirmed.binary_search(&tag) {
            confirms.unconfirmed.remove(i);
        }
        let confirmation = if ack {
            Confirmation::Ack {
                delivery_tag: tag,
                multiple,
            }
        } else {
            Confirmation::Nack {
                delivery_tag: tag,
                multiple,
            }
        };
        self.events.push_back(Event::Confirm {
            channel: key,
            confirmation,
        });
    }

    fn on_broker_cancel(&mut self, number: u16, cancel: basic::Cancel) {
        let Some(slot) = self.slot_by_number(number) else {
            return;
        };
        let key = slot.key;
        let removed = slot.remove_consumer(&cancel.consumer_tag);
        if !cancel.nowait {
            let ok = basic::CancelOk {
                consumer_tag: cancel.consumer_tag.clone(),
            };
            if let Err(e) = self.send_method(number, &ok.into()) {
                log::debug!("channel {number}: CancelOk not sent: {e}");
            }
        }
        match removed {
            Some(consumer) => self.events.push_back(Event::ConsumerEnded {
                channel: key,
                consumer: consumer.id,
                by_broker: Some(cancel),
            }),
            None => log::debug!(
                "channel {number}: the broker cancelled unknown consumer {:?}",
                cancel.consumer_tag
            ),
        }
    }

    /// A whole delivery: to its consumer, or rejected back to the queue
    /// when the consumer is being cancelled (unless it auto-acks).
    pub(super) fn dispatch_delivery(&mut self, number: u16, delivery: crate::message::Delivery) {
        let Some(slot) = self.slot_by_number(number) else {
            return;
        };
        let key = slot.key;
        let tag = &delivery.method.consumer_tag;
        let requeue_unless_no_ack = match slot.consumer(tag) {
            Some(c) if !c.cancelled => {
                let consumer = c.id;
                self.events.push_back(Event::Delivery {
                    channel: key,
                    consumer,
                    delivery,
                });
                return;
            }
            Some(c) => Some(c.no_ack),
            None => slot
                .recently_cancelled
                .iter()
                .find(|(t, _)| t == tag)
                .map(|(_, no_ack)| *no_ack),
        };
        match requeue_unless_no_ack {
            Some(false) => {
                let reject = basic::Reject {
                    delivery_tag: delivery.method.delivery_tag,
                    requeue: true,
                };
                if let Err(e) = self.send_method(number, &reject.into()) {
                    log::debug!("channel {number}: Reject not sent: {e}");
                }
            }
            Some(true) => {}
            None => log::warn!("channel {number}: delivery for unknown consumer {tag:?} dropped",),
        }
    }

    /// A returned message, for the face's return callbacks.
    pub(super) fn on_returned(&mut self, number: u16, message: crate::message::ReturnedMessage) {
        if let Some(slot) = self.slot_by_number(number) {
            let key = slot.key;
            self.events.push_back(Event::Returned {
                channel: key,
                message,
            });
        }
    }

    /// Ends channel `number` with `reason`: fails its open request, its
    /// pending requests and its unconfirmed publishes (in that order),
    /// forgets its consumers, frees its number, then
    /// [`Event::ChannelClosed`].
    pub(super) fn finish_channel(&mut self, number: u16, reason: Error) {
        let Some(mut slot) = self
            .channels
            .get_mut(number as usize)
            .and_then(Option::take)
        else {
            return;
        };
        while self.channels.last().is_some_and(Option::is_none) {
            self.channels.pop();
        }
        let key = slot.key;
        slot.state = ChannelState::Closed;
        if let Some(request) = slot.open_request.take() {
            self.events.push_back(Event::Reply {
                request,
                channel: Some(key),
                method: channel_class::Open::default().into(),
                result: Err(reason.clone()),
            });
        }
        for pending in slot.rpcs.drain(..) {
            if let Some((request, method)) = pending.request {
                self.events.push_back(Event::Reply {
                    request,
                    channel: Some(key),
                    method,
                    result: Err(reason.clone()),
                });
            }
        }
        if let Some(confirms) = slot.confirms.take() {
            for delivery_tag in confirms.unconfirmed {
                self.events.push_back(Event::Confirm {
                    channel: key,
                    confirmation: Confirmation::Failed {
                        delivery_tag,
                        error: reason.clone(),
                    },
                });
            }
        }
        self.events.push_back(Event::ChannelClosed {
            channel: key,
            error: reason,
        });
    }
}

/// Whether the request in flight is answered by `id`.
fn front_expects(slot: &ChannelSlot, id: MethodId) -> bool {
    slot.rpcs
        .front()
        .is_some_and(|r| r.sent && r.replies.contains(&id))
}
