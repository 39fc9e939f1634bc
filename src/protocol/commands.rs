//! The channel commands of the core: requests (with ids), nowait
//! methods, publish, acks, consumers, gets, confirm mode and the channel's
//! close. Each checks what it can at the call and changes nothing when it
//! refuses.

use std::collections::VecDeque;

use super::channel::{
    ChannelState, Confirms, Consumer, Kind, MandatoryPublish, Pending, RECENTLY_CANCELLED,
    special_command, unknown_channel,
};
use super::event::{ChannelKey, ConsumerId, Event, RequestId};
use super::{Connection, Phase, truncate_short};
use crate::error::Error;
use crate::frame;
use crate::spec::{BasicProperties, Method, MethodDef, basic, channel as channel_class, confirm};

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Basic.Ack (with `multiple`, every earlier delivery too).
    Ack {
        /// Also every earlier unsettled delivery of the channel.
        multiple: bool,
    },
    /// Basic.Nack (RabbitMQ's extension).
    Nack {
        /// Also every earlier unsettled delivery of the channel.
        multiple: bool,
        /// Back to the queue, or dropped / dead-lettered.
        requeue: bool,
    },
    /// Basic.Reject.
    Reject {
        /// Back to the queue, or dropped / dead-lettered.
        requeue: bool,
    },
}

impl Connection {
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
        match &method {
            Method::BasicAck(m) => slot.settled(m.delivery_tag, m.multiple),
            Method::BasicNack(m) => slot.settled(m.delivery_tag, m.multiple),
            Method::BasicReject(m) => slot.settled(m.delivery_tag, false),
            _ => {}
        }
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
            if mandatory {
                c.mandatory.push_back(MandatoryPublish {
                    delivery_tag: tag,
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                    returned: false,
                });
            }
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
                    .push_back((consumer_tag.to_string(), c.id, c.no_ack));
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

    /// Fetches one message: the reply is [`Reply::Get`](super::Reply::Get).
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
                mandatory: VecDeque::new(),
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

    /// Settles a delivery as `how` says, refusing a delivery of another
    /// connection instance (`epoch`) or a channel this connection does not
    /// know.
    ///
    /// # Errors
    /// As [`Connection::ack`].
    pub fn settle(
        &mut self,
        key: ChannelKey,
        delivery_tag: u64,
        how: Settle,
        epoch: Option<u64>,
    ) -> Result<(), Error> {
        match how {
            Settle::Ack { multiple } => self.ack(key, delivery_tag, multiple, epoch),
            Settle::Nack { multiple, requeue } => {
                self.nack(key, delivery_tag, multiple, requeue, epoch)
            }
            Settle::Reject { requeue } => self.reject(key, delivery_tag, requeue, epoch),
        }
    }
}
