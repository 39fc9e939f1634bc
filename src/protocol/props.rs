//! A property test of the core: random interleavings of the application's
//! commands and a small model broker's frames never panic, every request
//! id gets exactly one terminal event, deliveries reach their consumer in
//! wire order, each channel ends once, and nothing follows the end.
//! `PROPTEST_CASES` raises the (bounded) case budget.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use proptest::prelude::*;

use super::tests::{Pair, Sent};
use super::*;
use crate::BasicProperties;
use crate::spec::{basic, channel as ch, confirm, queue};

/// One step: something the application does, or the model broker.
#[derive(Debug, Clone)]
enum Op {
    OpenChannel,
    Declare(u8),
    DeclareNowait(u8),
    Consume(u8, bool),
    Cancel(u8, u8),
    CancelNowait(u8, u8),
    Get(u8),
    Publish(u8),
    Ack(u8, u8),
    ConfirmSelect(u8),
    CloseChannel(u8),
    CloseConnection,
    UpdateSecret,
    /// The broker answers the oldest request of a channel.
    Answer(u8),
    /// The broker delivers to one of a channel's consumers.
    Deliver(u8, u8),
    BrokerCancel(u8, u8),
    BrokerCloseChannel(u8),
    ConfirmAck(u8, bool),
    BrokerCloseConnection,
    StreamEnd,
    Wait(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let b = any::<u8>;
    prop_oneof![
        3 => Just(Op::OpenChannel),
        3 => b().prop_map(Op::Declare),
        1 => b().prop_map(Op::DeclareNowait),
        4 => (b(), any::<bool>()).prop_map(|(c, a)| Op::Consume(c, a)),
        1 => (b(), b()).prop_map(|(c, k)| Op::Cancel(c, k)),
        1 => (b(), b()).prop_map(|(c, k)| Op::CancelNowait(c, k)),
        1 => b().prop_map(Op::Get),
        3 => b().prop_map(Op::Publish),
        1 => (b(), b()).prop_map(|(c, t)| Op::Ack(c, t)),
        2 => b().prop_map(Op::ConfirmSelect),
        1 => b().prop_map(Op::CloseChannel),
        1 => Just(Op::UpdateSecret),
        14 => b().prop_map(Op::Answer),
        10 => (b(), b()).prop_map(|(c, k)| Op::Deliver(c, k)),
        1 => (b(), b()).prop_map(|(c, k)| Op::BrokerCancel(c, k)),
        1 => b().prop_map(Op::BrokerCloseChannel),
        3 => (b(), any::<bool>()).prop_map(|(c, m)| Op::ConfirmAck(c, m)),
        1 => b().prop_map(Op::Wait),
        // The endings: rare, so that most runs get somewhere first.
        1 => prop_oneof![
            Just(Op::CloseConnection),
            Just(Op::BrokerCloseConnection),
            Just(Op::StreamEnd),
        ],
    ]
}

/// What the model broker knows of one channel.
#[derive(Default)]
struct BrokerChannel {
    /// Requests waiting for the broker's reply, oldest first.
    waiting: VecDeque<Method>,
    /// Consumer tags it confirmed and has not cancelled.
    consumers: Vec<String>,
    confirm: bool,
    published: u64,
    acked: u64,
    next_delivery: u64,
    /// It sent Channel.Close and waits for the CloseOk.
    closing: bool,
}

/// The model broker: reads what the client sent, answers in order.
#[derive(Default)]
struct Broker {
    channels: HashMap<u16, BrokerChannel>,
    connection_close: bool,
    secrets: usize,
}

impl Broker {
    fn read(&mut self, sent: Vec<Sent>) {
        for frame in sent {
            let Sent::Method(n, method) = frame else {
                continue;
            };
            if n == 0 {
                match method {
                    Method::ConnectionClose(_) => self.connection_close = true,
                    Method::ConnectionUpdateSecret(_) => self.secrets += 1,
                    _ => {}
                }
                continue;
            }
            let c = self.channels.entry(n).or_default();
            match &method {
                Method::ChannelCloseOk(_) => {
                    self.channels.remove(&n);
                }
                Method::BasicPublish(_) => c.published += 1,
                Method::ConfirmSelect(_) => {
                    c.confirm = true;
                    c.waiting.push_back(method);
                }
                Method::BasicCancel(cancel) if cancel.nowait => {
                    c.consumers.retain(|t| *t != cancel.consumer_tag)
                }
                Method::QueueDeclare(d) if d.nowait => {}
                m if !m.replies().is_empty() => c.waiting.push_back(method),
                _ => {}
            }
        }
    }

    fn number(&self, pick: u8) -> Option<u16> {
        let mut numbers: Vec<u16> = self.channels.keys().copied().collect();
        numbers.sort();
        (!numbers.is_empty()).then(|| numbers[pick as usize % numbers.len()])
    }
}

/// What the application side saw.
#[derive(Default)]
struct Ledger {
    /// Terminal events per request the core handed out.
    replies: HashMap<RequestId, usize>,
    /// Per consumer, the delivery tags in the order they arrived.
    deliveries: HashMap<ConsumerId, Vec<u64>>,
    channel_ends: HashMap<ChannelKey, usize>,
    closed: usize,
    keys: Vec<ChannelKey>,
    consumers: Vec<(ChannelKey, String)>,
}

fn run(random: Vec<Op>) {
    // Every run starts with two open channels, a consumer on each.
    let mut ops = vec![
        Op::OpenChannel,
        Op::OpenChannel,
        Op::Answer(0),
        Op::Answer(1),
        Op::Consume(0, false),
        Op::Consume(1, true),
        Op::Answer(0),
        Op::Answer(1),
    ];
    ops.extend(random);
    let mut p = Pair::open();
    let mut broker = Broker::default();
    let mut ledger = Ledger::default();
    let props = BasicProperties::default();
    for op in ops {
        let key = |ledger: &Ledger, pick: u8| -> Option<ChannelKey> {
            (!ledger.keys.is_empty()).then(|| ledger.keys[pick as usize % ledger.keys.len()])
        };
        let consumer = |ledger: &Ledger, key: ChannelKey, pick: u8| -> Option<String> {
            let tags: Vec<&String> = ledger
                .consumers
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, t)| t)
                .collect();
            (!tags.is_empty()).then(|| tags[pick as usize % tags.len()].clone())
        };
        let accept = |r: Result<RequestId, Error>, ledger: &mut Ledger| {
            if let Ok(id) = r {
                assert!(
                    ledger.replies.insert(id, 0).is_none(),
                    "{id} handed out twice"
                );
            }
        };
        match op {
            Op::OpenChannel => {
                if let Ok((k, id)) = p.core.open_channel(None) {
                    ledger.keys.push(k);
                    accept(Ok(id), &mut ledger);
                }
            }
            Op::Declare(c) => {
                if let Some(k) = key(&ledger, c) {
                    let r = p.core.rpc(k, queue::Declare::default().into());
                    accept(r, &mut ledger);
                }
            }
            Op::DeclareNowait(c) => {
                if let Some(k) = key(&ledger, c) {
                    let m = queue::Declare {
                        nowait: true,
                        ..Default::default()
                    };
                    let _ = p.core.nowait(k, m.into());
                }
            }
            Op::Consume(c, no_ack) => {
                if let Some(k) = key(&ledger, c) {
                    let m = basic::Consume {
                        no_ack,
                        ..Default::default()
                    };
                    if let Ok((id, _, tag)) = p.core.consume(k, m) {
                        accept(Ok(id), &mut ledger);
                        ledger.consumers.push((k, tag));
                    }
                }
            }
            Op::Cancel(c, t) => {
                if let Some(k) = key(&ledger, c) {
                    if let Some(tag) = consumer(&ledger, k, t) {
                        let r = p.core.cancel(k, &tag);
                        accept(r, &mut ledger);
                    }
                }
            }
            Op::CancelNowait(c, t) => {
                if let Some(k) = key(&ledger, c) {
                    if let Some(tag) = consumer(&ledger, k, t) {
                        let _ = p.core.cancel_nowait(k, &tag);
                    }
                }
            }
            Op::Get(c) => {
                if let Some(k) = key(&ledger, c) {
                    let r = p.core.get(k, basic::Get::default());
                    accept(r, &mut ledger);
                }
            }
            Op::Publish(c) => {
                if let Some(k) = key(&ledger, c) {
                    let _ = p.core.publish(k, "", "q", false, &props, b"m");
                }
            }
            Op::Ack(c, t) => {
                if let Some(k) = key(&ledger, c) {
                    let _ = p.core.ack(k, u64::from(t), false, None);
                }
            }
            Op::ConfirmSelect(c) => {
                if let Some(k) = key(&ledger, c) {
                    let r = p.core.confirm_select(k);
                    accept(r, &mut ledger);
                }
            }
            Op::CloseChannel(c) => {
                if let Some(k) = key(&ledger, c) {
                    let _ = p.core.close_channel(k, 200, "bye");
                }
            }
            Op::CloseConnection => {
                let _ = p.core.close(200, "bye", p.now);
            }
            Op::UpdateSecret => {
                let r = p.core.update_secret("s", "r");
                accept(r, &mut ledger);
            }
            Op::Answer(c) => {
                if broker.connection_close {
                    p.feed(0, connection::CloseOk {});
                } else if let Some(n) = broker.number(c) {
                    let bc = broker.channels.get_mut(&n).unwrap();
                    if let Some(request) = bc.waiting.pop_front() {
                        let reply: Method = match request {
                            Method::ChannelOpen(_) => ch::OpenOk::default().into(),
                            Method::ChannelClose(_) => ch::CloseOk {}.into(),
                            Method::QueueDeclare(_) => queue::DeclareOk::default().into(),
                            Method::ConfirmSelect(_) => confirm::SelectOk {}.into(),
                            Method::BasicGet(_) => basic::GetEmpty::default().into(),
                            Method::BasicConsume(c) => {
                                bc.consumers.push(c.consumer_tag.clone());
                                basic::ConsumeOk {
                                    consumer_tag: c.consumer_tag,
                                }
                                .into()
                            }
                            Method::BasicCancel(c) => {
                                bc.consumers.retain(|t| *t != c.consumer_tag);
                                basic::CancelOk {
                                    consumer_tag: c.consumer_tag,
                                }
                                .into()
                            }
                            other => panic!("the model broker cannot answer {other:?}"),
                        };
                        p.feed(n, reply);
                    }
                } else if broker.secrets > 0 {
                    broker.secrets -= 1;
                    p.feed(0, connection::UpdateSecretOk {});
                }
            }
            Op::Deliver(c, t) => {
                if let Some(n) = broker.number(c) {
                    let bc = broker.channels.get_mut(&n).unwrap();
                    if !bc.consumers.is_empty() && !bc.closing {
                        let tag = bc.consumers[t as usize % bc.consumers.len()].clone();
                        bc.next_delivery += 1;
                        let d = basic::Deliver {
                            consumer_tag: tag,
                            delivery_tag: bc.next_delivery,
                            ..Default::default()
                        };
                        p.feed_message(n, d, &bc.next_delivery.to_be_bytes());
                    }
                }
            }
            Op::BrokerCancel(c, t) => {
                if let Some(n) = broker.number(c) {
                    let bc = broker.channels.get_mut(&n).unwrap();
                    if !bc.consumers.is_empty() && !bc.closing {
                        let tag = bc.consumers.remove(t as usize % bc.consumers.len());
                        p.feed(
                            n,
                            basic::Cancel {
                                consumer_tag: tag,
                                nowait: false,
                            },
                        );
                    }
                }
            }
            Op::BrokerCloseChannel(c) => {
                if let Some(n) = broker.number(c) {
                    let bc = broker.channels.get_mut(&n).unwrap();
                    if !bc.closing {
                        bc.closing = true;
                        p.feed(
                            n,
                            ch::Close {
                                reply_code: 404,
                                reply_text: "NOT_FOUND".into(),
                                ..Default::default()
                            },
                        );
                    }
                }
            }
            Op::ConfirmAck(c, multiple) => {
                if let Some(n) = broker.number(c) {
                    let bc = broker.channels.get_mut(&n).unwrap();
                    if bc.confirm && bc.acked < bc.published && !bc.closing {
                        bc.acked += 1;
                        let tag = if multiple { bc.published } else { bc.acked };
                        if multiple {
                            bc.acked = bc.published;
                        }
                        p.feed(
                            n,
                            basic::Ack {
                                delivery_tag: tag,
                                multiple,
                            },
                        );
                    }
                }
            }
            Op::BrokerCloseConnection => p.feed(
                0,
                connection::Close {
                    reply_code: 320,
                    reply_text: "CONNECTION_FORCED".into(),
                    ..Default::default()
                },
            ),
            Op::StreamEnd => p.core.handle_stream_end(None),
            Op::Wait(s) => {
                p.advance(Duration::from_secs(u64::from(s % 8)));
                p.core.handle_timeout(p.now);
            }
        }
        let sent = p.sent();
        broker.read(sent);
        collect(&mut p, &mut ledger);
        if p.core.phase() == Phase::Closed {
            break;
        }
    }
    // Every ending resolves what is left.
    p.core.handle_stream_end(None);
    collect(&mut p, &mut ledger);
    assert_eq!(ledger.closed, 1, "one terminal event");
    for (id, n) in &ledger.replies {
        assert_eq!(*n, 1, "{id} got {n} terminal events");
    }
    for (k, n) in &ledger.channel_ends {
        assert_eq!(*n, 1, "{k} ended {n} times");
    }
    for tags in ledger.deliveries.values() {
        assert!(
            tags.windows(2).all(|w| w[0] < w[1]),
            "out of order: {tags:?}"
        );
    }
    assert!(p.core.poll_event().is_none());
    assert_eq!(p.core.poll_timeout(), None);
}

fn collect(p: &mut Pair, ledger: &mut Ledger) {
    while let Some(event) = p.core.poll_event() {
        assert_eq!(ledger.closed, 0, "an event after Closed: {event:?}");
        match event {
            Event::Reply { request, .. } => {
                let n = ledger
                    .replies
                    .get_mut(&request)
                    .unwrap_or_else(|| panic!("a reply for unknown {request}"));
                *n += 1;
            }
            Event::Delivery {
                consumer, delivery, ..
            } => ledger
                .deliveries
                .entry(consumer)
                .or_default()
                .push(delivery.method.delivery_tag),
            Event::ChannelClosed { channel, .. } => {
                *ledger.channel_ends.entry(channel).or_default() += 1;
                ledger.keys.retain(|k| *k != channel);
                ledger.consumers.retain(|(k, _)| *k != channel);
            }
            Event::ConsumerEnded { .. } => {}
            Event::Closed { .. } => ledger.closed += 1,
            _ => {}
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(128),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_commands_and_broker_frames_keep_every_promise(ops in prop::collection::vec(op(), 1..80)) {
        run(ops);
    }
}
