//! What the broker sends on a channel: replies to the request in flight,
//! the channel's open and close, flow, confirms, the broker's cancels,
//! and whole messages (from [`super::content`]) to their consumer, get or
//! return.

use super::Connection;
use super::channel::{ChannelState, Kind, front_expects};
use super::event::{Event, Reply};
use crate::error::Error;
use crate::message::Confirmation;
use crate::spec::{Method, MethodDef, basic, channel as channel_class};

impl Connection {
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
            // Until the CloseOk, the broker's confirms and returns for what
            // was published before our Close still count (pika keeps their
            // callbacks until then): a publisher told `Failed` about a
            // message the broker acked would publish it twice.
            Method::BasicAck(ack) if state == ChannelState::Closing => {
                self.on_confirm(number, ack.delivery_tag, ack.multiple, true)
            }
            Method::BasicNack(nack) if state == ChannelState::Closing => {
                self.on_confirm(number, nack.delivery_tag, nack.multiple, false)
            }
            m @ Method::BasicReturn(_) if state == ChannelState::Closing => {
                slot.content = Some(super::content::PendingContent::new(m));
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
        if matches!(&pending.request, Some((_, Method::BasicGet(get))) if !get.no_ack) {
            slot.unsettled.push_back(message.method.delivery_tag);
        }
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
        let settled: Vec<u64> = if multiple {
            let n = confirms.unconfirmed.partition_point(|&t| t <= tag);
            confirms.unconfirmed.drain(..n).collect()
        } else if confirms.unconfirmed.front() == Some(&tag) {
            confirms.unconfirmed.pop_front().into_iter().collect()
        } else {
            match confirms.unconfirmed.binary_search(&tag) {
                Ok(i) => confirms.unconfirmed.remove(i).into_iter().collect(),
                Err(_) => Vec::new(),
            }
        };
        confirms.settle_mandatory(&settled);
        let confirmation = if ack {
            Confirmation::Ack {
                delivery_tag: tag,
                multiple,
                settled,
            }
        } else {
            Confirmation::Nack {
                delivery_tag: tag,
                multiple,
                settled,
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
        // A cancel of the application's still waiting for its CancelOk
        // ends now, with the broker's reason; its CancelOk, if one comes,
        // is taken without a second answer.
        let pending_cancel = slot
            .rpcs
            .iter_mut()
            .find(|p| matches!(&p.kind, Kind::Cancel(t) if *t == cancel.consumer_tag))
            .and_then(|p| p.request.take());
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
        if let Some((request, method)) = pending_cancel {
            let tag = match &method {
                Method::BasicCancel(c) => c.consumer_tag.clone(),
                _ => String::new(),
            };
            self.events.push_back(Event::Reply {
                request,
                channel: Some(key),
                method,
                result: Err(Error::ConsumerCancelled { tag }),
            });
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
                if !c.no_ack {
                    slot.unsettled.push_back(delivery.method.delivery_tag);
                }
                self.events.push_back(Event::Delivery {
                    channel: key,
                    consumer,
                    delivery,
                });
                return;
            }
            Some(c) => Some((c.id, c.no_ack)),
            None => slot
                .recently_cancelled
                .iter()
                .find(|(t, _, _)| t == tag)
                .map(|(_, id, no_ack)| (*id, *no_ack)),
        };
        match requeue_unless_no_ack {
            Some((_, false)) => {
                let reject = basic::Reject {
                    delivery_tag: delivery.method.delivery_tag,
                    requeue: true,
                };
                if let Err(e) = self.send_method(number, &reject.into()) {
                    log::debug!("channel {number}: Reject not sent: {e}");
                }
            }
            // Auto-acked: the broker has let go of it. It goes to the face
            // as such (the select face drops it, as pika does; the blocking
            // face hands it back from basic_cancel).
            Some((consumer, true)) => self.events.push_back(Event::DeliveryAfterCancel {
                channel: key,
                consumer,
                delivery,
            }),
            None => log::warn!("channel {number}: delivery for unknown consumer {tag:?} dropped",),
        }
    }

    /// A returned message, for the face's return callbacks; in confirm
    /// mode with the delivery tag of the publish it returns.
    pub(super) fn on_returned(&mut self, number: u16, message: crate::message::ReturnedMessage) {
        if let Some(slot) = self.slot_by_number(number) {
            let key = slot.key;
            let delivery_tag = slot.confirms.as_mut().and_then(|c| {
                c.match_return(&message.method.exchange, &message.method.routing_key)
            });
            self.events.push_back(Event::Returned {
                channel: key,
                message,
                delivery_tag,
            });
        }
    }
}
