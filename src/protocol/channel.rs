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

use super::event::{ChannelKey, ConsumerId, Event, RequestId};
use super::{Connection, Phase};
use crate::error::Error;
use crate::frame;
use crate::message::Confirmation;
use crate::spec::{Method, MethodId, channel as channel_class};

/// How many nowait-cancelled consumer tags a channel remembers (their
/// deliveries in flight are rejected back to the queue).
pub(super) const RECENTLY_CANCELLED: usize = 64;

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
pub(super) enum Kind {
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
pub(super) struct Pending {
    /// The application's request: its id and the method it sent. `None`
    /// for nowait and asynchronous methods and for the core's own
    /// requests (a close's cancels, the Close).
    pub(super) request: Option<(RequestId, Method)>,
    pub(super) frames: Vec<u8>,
    pub(super) name: &'static str,
    /// The methods that answer it; empty when none is awaited.
    pub(super) replies: &'static [MethodId],
    pub(super) sent: bool,
    /// Publish, ack, nack, reject: may go out while a request waits for
    /// its reply.
    pub(super) asynchronous: bool,
    pub(super) kind: Kind,
}

#[derive(Debug)]
pub(super) struct Consumer {
    pub(super) id: ConsumerId,
    pub(super) tag: String,
    pub(super) no_ack: bool,
    /// Basic.Cancel queued or sent: deliveries until CancelOk are rejected
    /// (requeued) unless auto-acked.
    pub(super) cancelled: bool,
}

#[derive(Debug)]
pub(super) struct Confirms {
    pub(super) next_tag: u64,
    /// Unconfirmed delivery tags, ascending (tags only grow).
    pub(super) unconfirmed: VecDeque<u64>,
    /// The unconfirmed mandatory publishes, ascending by tag: what a
    /// Basic.Return (which carries no delivery tag) is matched against.
    /// Each leaves when confirmed (or with the channel), so this is
    /// bounded by the unconfirmed window.
    pub(super) mandatory: VecDeque<MandatoryPublish>,
}

/// A mandatory publish in confirm mode, until its confirm.
#[derive(Debug)]
pub(super) struct MandatoryPublish {
    pub(super) delivery_tag: u64,
    pub(super) exchange: String,
    pub(super) routing_key: String,
    /// A Basic.Return was matched to it.
    pub(super) returned: bool,
}

impl Confirms {
    /// The delivery tag of the publish a Basic.Return for `exchange` and
    /// `routing_key` returns: RabbitMQ handles a channel's publishes in
    /// order and sends a publish's Return before its Ack, so it is the
    /// oldest unconfirmed mandatory publish with that exchange and routing
    /// key not yet returned. Marks it returned.
    pub(super) fn match_return(&mut self, exchange: &str, routing_key: &str) -> Option<u64> {
        let publish = self
            .mandatory
            .iter_mut()
            .find(|m| !m.returned && m.exchange == exchange && m.routing_key == routing_key)?;
        publish.returned = true;
        Some(publish.delivery_tag)
    }

    /// Forgets the mandatory publishes among `settled` (ascending).
    pub(super) fn settle_mandatory(&mut self, settled: &[u64]) {
        let (Some(first), Some(&last)) = (self.mandatory.front(), settled.last()) else {
            return;
        };
        if first.delivery_tag <= last {
            self.mandatory
                .retain(|m| settled.binary_search(&m.delivery_tag).is_err());
        }
    }
}

/// One channel's state.
#[derive(Debug)]
pub(crate) struct ChannelSlot {
    pub(super) key: ChannelKey,
    pub(super) state: ChannelState,
    /// The open request, until OpenOk.
    pub(super) open_request: Option<RequestId>,
    pub(super) rpcs: VecDeque<Pending>,
    /// How many items of `rpcs` are not sent yet.
    pub(super) unsent: usize,
    pub(super) consumers: Vec<Consumer>,
    /// Consumers cancelled with nowait: tag, id and `no_ack`.
    pub(super) recently_cancelled: VecDeque<(String, ConsumerId, bool)>,
    pub(super) confirms: Option<Confirms>,
    pub(super) content: Option<super::content::PendingContent>,
    pub(super) get_pending: bool,
    /// Why the channel is closing (our close's code and text).
    pub(super) close_reason: Option<Error>,
    /// Our Channel.Close is out: only Close and CloseOk matter now.
    pub(super) close_sent: bool,
    /// The broker closed the channel while our Close waited for its
    /// CloseOk: reported then.
    pub(super) broker_close: Option<Error>,
    /// Methods the face wants to see ([`Event::Watched`]).
    pub(super) watched: Vec<MethodId>,
    /// Delivery tags handed to the application with manual acks and not
    /// yet acked, nacked or rejected, ascending.
    pub(super) unsettled: VecDeque<u64>,
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
            unsettled: VecDeque::new(),
        }
    }

    /// A settle (ack, nack, reject) of `tag` went out.
    pub(super) fn settled(&mut self, tag: u64, multiple: bool) {
        if multiple {
            // Tag 0 with `multiple` settles everything outstanding.
            let n = if tag == 0 {
                self.unsettled.len()
            } else {
                self.unsettled.partition_point(|&t| t <= tag)
            };
            self.unsettled.drain(..n);
        } else if self.unsettled.front() == Some(&tag) {
            self.unsettled.pop_front();
        } else if let Ok(i) = self.unsettled.binary_search(&tag) {
            self.unsettled.remove(i);
        }
    }

    /// Frames for this channel are dropped (our Close is out).
    pub(super) fn discarding(&self) -> bool {
        self.state == ChannelState::Closed
            || (self.state == ChannelState::Closing && self.close_sent)
    }

    pub(super) fn wrong_state(&self, what: &str) -> Error {
        Error::ChannelWrongState {
            detail: format!(
                "channel {} is {:?}, cannot {what}",
                self.key.number, self.state
            ),
        }
    }

    pub(super) fn ensure_open(&self, what: &str) -> Result<(), Error> {
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

    pub(super) fn consumer(&self, tag: &str) -> Option<&Consumer> {
        self.consumers.iter().find(|c| c.tag == tag)
    }

    pub(super) fn remove_consumer(&mut self, tag: &str) -> Option<Consumer> {
        let i = self.consumers.iter().position(|c| c.tag == tag)?;
        Some(self.consumers.remove(i))
    }
}

/// The error for a key this connection does not know (a channel closed
/// since, or of another connection).
pub(super) fn unknown_channel(key: ChannelKey, what: &str) -> Error {
    Error::ChannelWrongState {
        detail: format!("channel {} is Closed, cannot {what}", key.number),
    }
}

/// Methods that have their own command; `rpc` and `nowait` refuse them.
pub(super) fn special_command(method: &Method) -> Option<&'static str> {
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

    pub(super) fn slot(&self, key: ChannelKey) -> Option<&ChannelSlot> {
        self.channels
            .get(key.number as usize)
            .and_then(Option::as_ref)
            .filter(|s| s.key == key)
    }

    pub(super) fn slot_mut(&mut self, key: ChannelKey) -> Option<&mut ChannelSlot> {
        self.channels
            .get_mut(key.number as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.key == key)
    }

    /// The open slot for a command, or the error saying why not.
    pub(super) fn open_slot(
        &mut self,
        key: ChannelKey,
        what: &str,
    ) -> Result<&mut ChannelSlot, Error> {
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

    /// How many deliveries the application has on this channel (manual
    /// acks) and not yet acked, nacked or rejected.
    pub fn unsettled_deliveries(&self, key: ChannelKey) -> usize {
        self.slot(key).map_or(0, |s| s.unsettled.len())
    }

    /// The same over every channel.
    pub fn total_unsettled_deliveries(&self) -> usize {
        self.channels
            .iter()
            .flatten()
            .map(|s| s.unsettled.len())
            .sum()
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

    pub(super) fn ensure_connection_open(&self, what: &str) -> Result<(), Error> {
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
    pub(super) fn encode_for(&self, number: u16, method: &Method) -> Result<Vec<u8>, Error> {
        let mut frames = Vec::new();
        frame::encode_method(&mut frames, number, method, self.frame_max)?;
        Ok(frames)
    }

    pub(super) fn push_pending(&mut self, key: ChannelKey, pending: Pending) {
        if let Some(slot) = self.slot_mut(key) {
            slot.unsent += 1;
            slot.rpcs.push_back(pending);
        }
        self.pump(key);
    }

    /// Sends queued items until one is waiting for its reply.
    pub(super) fn pump(&mut self, key: ChannelKey) {
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
            if !confirms.unconfirmed.is_empty() {
                self.events.push_back(Event::Confirm {
                    channel: key,
                    confirmation: Confirmation::Failed {
                        settled: confirms.unconfirmed.into(),
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
pub(super) fn front_expects(slot: &ChannelSlot, id: MethodId) -> bool {
    slot.rpcs
        .front()
        .is_some_and(|r| r.sent && r.replies.contains(&id))
}
