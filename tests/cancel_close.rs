//! A consumer cancel followed at once by a close (issue: Channel.Close was
//! never sent after a user's `basic_cancel`): every ordering of {cancel,
//! channel close, connection close}, with and without deliveries crossing
//! the cancel, with `basic_cancel_nowait`, and with the cancel queued
//! behind a `queue_declare` in flight — against a scripted fake broker
//! that records what the client sends, so the wire order is asserted; and
//! once against the real broker.
//!
//! As in pika 1.1, `Channel::close` queues Channel.Close behind the
//! requests already pending on the channel: the user's cancel completes
//! with its CancelOk, then Channel.Close goes out at once, then the close
//! completes. The close must finish well before the close bound (10 s
//! here): a liveness deadline of half of it is asserted.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::fake_broker::{FakeBroker, FakeConn, rabbitmq_tune};
use common::{broker_params, run_loop};
use pika::spec::{Method, basic, channel, connection, queue};
use pika::{
    BasicConsumeOptions, BasicProperties, Channel, ConnectionParameters, Error, FieldTable,
    QueueDeclareOptions, SelectConnection,
};

/// The connection's close bound (socket_timeout).
const CLOSE_BOUND: Duration = Duration::from_secs(10);
/// The liveness deadline for a whole close: half the bound.
const DEADLINE: Duration = Duration::from_secs(5);
const TAG: &str = "the-consumer";

// ----------------------------------------------------------------------
// The fake broker: answers like RabbitMQ, records the conversation
// ----------------------------------------------------------------------

/// One step of the conversation on the wire, in the order the fake broker
/// saw (client frames) or made (its own frames) them.
#[derive(Debug, Clone, PartialEq)]
enum Wire {
    /// A method the client sent: channel, method name.
    Client(u16, &'static str),
    /// A method the fake broker sent: channel, method name.
    Broker(u16, &'static str),
}

#[derive(Clone, Copy, Default)]
struct Script {
    /// Deliveries sent between reading the client's Basic.Cancel and
    /// answering it (they cross the cancel on the wire).
    deliveries_in_flight: u64,
    /// How long Queue.DeclareOk is held back (a declare in flight).
    declare_delay: Option<Duration>,
    /// Never answer Basic.Cancel (for the close-bound log test).
    ignore_cancel: bool,
    /// The client's close bound, when not [`CLOSE_BOUND`].
    close_bound: Option<Duration>,
}

fn serve(conn: &mut FakeConn, script: Script, wire: &Mutex<Vec<Wire>>) {
    let record = |w: Wire| wire.lock().unwrap().push(w);
    conn.handshake(rabbitmq_tune());
    let mut next_delivery_tag = 1;
    loop {
        let Some(frame) = conn.try_read_frame() else {
            return;
        };
        let common::OwnedFrame::Method(ch, method) = frame else {
            continue;
        };
        record(Wire::Client(ch, method.name()));
        let reply = |conn: &mut FakeConn, m: Method| {
            record(Wire::Broker(ch, m.name()));
            conn.send_method(ch, m);
        };
        match method {
            Method::ChannelOpen(_) => reply(conn, channel::OpenOk::default().into()),
            Method::BasicConsume(c) => reply(
                conn,
                basic::ConsumeOk {
                    consumer_tag: c.consumer_tag,
                }
                .into(),
            ),
            Method::QueueDeclare(d) => {
                if let Some(delay) = script.declare_delay {
                    conn.sleep(delay);
                }
                reply(
                    conn,
                    queue::DeclareOk {
                        queue: d.queue,
                        message_count: 0,
                        consumer_count: 0,
                    }
                    .into(),
                )
            }
            Method::BasicCancel(c) => {
                for _ in 0..script.deliveries_in_flight {
                    let deliver = basic::Deliver {
                        consumer_tag: c.consumer_tag.clone(),
                        delivery_tag: next_delivery_tag,
                        routing_key: "q".into(),
                        ..Default::default()
                    };
                    next_delivery_tag += 1;
                    record(Wire::Broker(ch, "Basic.Deliver"));
                    conn.send_message(ch, deliver, &BasicProperties::default(), b"late");
                }
                if !c.nowait && !script.ignore_cancel {
                    reply(
                        conn,
                        basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        }
                        .into(),
                    );
                }
            }
            Method::ChannelClose(_) => reply(conn, channel::CloseOk {}.into()),
            Method::ConnectionClose(_) => {
                reply(conn, connection::CloseOk {}.into());
                return;
            }
            _ => {}
        }
    }
}

// ----------------------------------------------------------------------
// The client
// ----------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Event {
    CancelDone(Result<(), String>),
    Declared(Result<(), String>),
    Message,
    ChannelClosed(Error),
    ChannelCallRefused(&'static str, Error),
    Closed(Error),
}

type Events = Rc<RefCell<Vec<Event>>>;

/// Runs a client against `fake` that consumes from "q" with manual acks
/// and, once consuming, runs `act`; returns the events, the time from
/// `act` to the terminal callback, and the conversation.
fn run(
    script: Script,
    act: impl FnOnce(&SelectConnection, &Channel, &Events) + 'static,
) -> (Vec<Event>, Duration, Vec<Wire>) {
    let wire = Arc::new(Mutex::new(Vec::new()));
    let w = wire.clone();
    let fake = FakeBroker::start(move |mut conn| serve(&mut conn, script, &w));
    let mut params = ConnectionParameters::default();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(fake.addr().port())
        .unwrap()
        .set_socket_timeout(script.close_bound.unwrap_or(CLOSE_BOUND))
        .unwrap();
    let events: Events = Rc::default();
    let started = Rc::new(RefCell::new(None::<Instant>));
    let ended = Rc::new(RefCell::new(None::<Instant>));
    let (e1, e2, s1, end) = (
        events.clone(),
        events.clone(),
        started.clone(),
        ended.clone(),
    );
    let conn = SelectConnection::new(
        params,
        move |conn| {
            let conn2 = conn.clone();
            conn.channel(None, move |r| {
                let ch = r.expect("channel opens");
                let e = e1.clone();
                ch.add_on_close_callback(move |_, err| {
                    e.borrow_mut().push(Event::ChannelClosed(err))
                });
                let e = e1.clone();
                ch.basic_consume(
                    "q",
                    move |_, _| e.borrow_mut().push(Event::Message),
                    BasicConsumeOptions {
                        consumer_tag: Some(TAG.into()),
                        ..Default::default()
                    },
                    move |ch, r| {
                        r.expect("consuming");
                        *s1.borrow_mut() = Some(Instant::now());
                        act(&conn2, ch, &e1);
                    },
                )
                .unwrap();
            })
            .unwrap();
        },
        |conn, e| {
            conn.ioloop().stop();
            panic!("open error: {e}");
        },
        move |conn, e| {
            *end.borrow_mut() = Some(Instant::now());
            e2.borrow_mut().push(Event::Closed(e));
            conn.ioloop().stop();
        },
    )
    .unwrap();
    run_loop(conn.ioloop(), Duration::from_secs(30));
    fake.join();
    let took = ended.borrow().unwrap() - started.borrow().expect("the test acted");
    let events = events.borrow().clone();
    let wire = wire.lock().unwrap().clone();
    (events, took, wire)
}

fn cancel(ch: &Channel, events: &Events) {
    let e = events.clone();
    ch.basic_cancel(TAG, move |_, r| {
        e.borrow_mut()
            .push(Event::CancelDone(r.map(|_| ()).map_err(|e| e.to_string())))
    })
    .expect("the cancel is accepted");
}

fn close_channel(ch: &Channel, events: &Events) {
    if let Err(e) = ch.close(200, "bye") {
        events
            .borrow_mut()
            .push(Event::ChannelCallRefused("close", e));
    }
}

fn close_connection(conn: &SelectConnection, events: &Events) {
    if let Err(e) = conn.close(200, "bye") {
        events
            .borrow_mut()
            .push(Event::ChannelCallRefused("connection close", e));
    }
}

/// Closes the connection once the channel has closed (for the orderings
/// that close only the channel).
fn then_close_connection(ch: &Channel) {
    ch.add_on_close_callback(|ch, _| {
        if let Ok(conn) = ch.connection() {
            let _ = conn.close(200, "after the channel");
        }
    });
}

// ----------------------------------------------------------------------
// Assertions
// ----------------------------------------------------------------------

/// The client frames on channel 1 after `Basic.Cancel`, and whether the
/// first frame the client sent after the broker's CancelOk is
/// Channel.Close.
#[track_caller]
fn assert_close_right_after_cancel_ok(wire: &[Wire], rejects: usize) {
    let cancel_ok = wire
        .iter()
        .position(|w| *w == Wire::Broker(1, "Basic.CancelOk"))
        .unwrap_or_else(|| panic!("the broker answered the cancel: {wire:#?}"));
    // The rejects answer deliveries that preceded the CancelOk on the wire
    // (the client sent them before it read the CancelOk, though the fake
    // broker may read them after sending it); the first frame the client
    // sent in answer to the CancelOk is Channel.Close.
    let after: Vec<&Wire> = wire[cancel_ok + 1..]
        .iter()
        .filter(|w| matches!(w, Wire::Client(..)) && **w != Wire::Client(1, "Basic.Reject"))
        .collect();
    assert_eq!(
        after.first(),
        Some(&&Wire::Client(1, "Channel.Close")),
        "the first frame after CancelOk is Channel.Close: {wire:#?}"
    );
    // Between the client's Cancel and its Close: only the rejects of the
    // deliveries that crossed the cancel.
    let cancel = wire
        .iter()
        .position(|w| *w == Wire::Client(1, "Basic.Cancel"))
        .unwrap();
    let close = wire
        .iter()
        .position(|w| *w == Wire::Client(1, "Channel.Close"))
        .unwrap();
    let between: Vec<&Wire> = wire[cancel + 1..close]
        .iter()
        .filter(|w| matches!(w, Wire::Client(..)))
        .collect();
    assert_eq!(
        between,
        vec![&Wire::Client(1, "Basic.Reject"); rejects],
        "{wire:#?}"
    );
}

#[track_caller]
fn assert_ends_cleanly(events: &[Event], took: Duration) {
    assert!(
        took < DEADLINE,
        "the close took {took:?}: not within {DEADLINE:?} (the close bound is {CLOSE_BOUND:?}); \
         {events:?}"
    );
    let closes = events
        .iter()
        .filter(|e| matches!(e, Event::ChannelClosed(_)))
        .count();
    assert_eq!(closes, 1, "the channel closed once: {events:?}");
    let ch_close = events
        .iter()
        .position(|e| matches!(e, Event::ChannelClosed(Error::ChannelClosedByClient { .. })))
        .unwrap_or_else(|| panic!("the channel closed by us: {events:?}"));
    assert!(
        matches!(
            events.last(),
            Some(Event::Closed(Error::ConnectionClosedByClient { .. }))
        ),
        "the connection closed by us, last: {events:?}"
    );
    if let Some(done) = events
        .iter()
        .position(|e| matches!(e, Event::CancelDone(_)))
    {
        assert!(
            matches!(events[done], Event::CancelDone(Ok(()))),
            "the user's cancel got its CancelOk: {events:?}"
        );
        assert!(
            done < ch_close,
            "the cancel completed before the channel's close: {events:?}"
        );
    }
    assert!(
        !events.iter().any(|e| matches!(e, Event::Message)),
        "no delivery reached the cancelled consumer: {events:?}"
    );
}

fn refused(events: &[Event], what: &str) -> Vec<Error> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ChannelCallRefused(w, e) if *w == what => Some(e.clone()),
            _ => None,
        })
        .collect()
}

// ----------------------------------------------------------------------
// Orderings
// ----------------------------------------------------------------------

fn with_and_without_deliveries(act: fn(&SelectConnection, &Channel, &Events)) {
    for in_flight in [0, 3] {
        let script = Script {
            deliveries_in_flight: in_flight,
            ..Default::default()
        };
        let (events, took, wire) = run(script, act);
        assert_ends_cleanly(&events, took);
        assert_close_right_after_cancel_ok(&wire, in_flight as usize);
    }
}

#[test]
fn cancel_then_channel_close() {
    with_and_without_deliveries(|_, ch, ev| {
        cancel(ch, ev);
        then_close_connection(ch);
        close_channel(ch, ev);
        assert!(refused(&ev.borrow(), "close").is_empty());
    });
}

#[test]
fn cancel_then_connection_close() {
    with_and_without_deliveries(|conn, ch, ev| {
        cancel(ch, ev);
        close_connection(conn, ev);
    });
}

#[test]
fn cancel_then_channel_close_then_connection_close() {
    with_and_without_deliveries(|conn, ch, ev| {
        cancel(ch, ev);
        close_channel(ch, ev);
        close_connection(conn, ev);
        assert!(refused(&ev.borrow(), "close").is_empty());
        assert!(refused(&ev.borrow(), "connection close").is_empty());
    });
}

#[test]
fn cancel_then_connection_close_then_channel_close_refused_as_closing() {
    with_and_without_deliveries(|conn, ch, ev| {
        cancel(ch, ev);
        close_connection(conn, ev);
        close_channel(ch, ev);
        let r = refused(&ev.borrow(), "close");
        assert!(
            matches!(r.as_slice(), [Error::ChannelWrongState { .. }]),
            "the channel is already closing: {r:?}"
        );
    });
}

/// Orderings where the close comes first: the cancel is refused at the
/// call (the channel is closing) and the close cancels the consumer
/// itself, then sends Channel.Close right after the CancelOk.
fn close_first(act: fn(&SelectConnection, &Channel, &Events)) {
    for in_flight in [0, 3] {
        let script = Script {
            deliveries_in_flight: in_flight,
            ..Default::default()
        };
        let (events, took, wire) = run(script, act);
        assert_ends_cleanly(&events, took);
        assert_close_right_after_cancel_ok(&wire, in_flight as usize);
    }
}

#[test]
fn channel_close_then_cancel_refused() {
    close_first(|_, ch, ev| {
        then_close_connection(ch);
        close_channel(ch, ev);
        let r = ch.basic_cancel(TAG, |_, _| panic!("a refused call's closure never runs"));
        assert!(matches!(r, Err(Error::ChannelWrongState { .. })), "{r:?}");
    });
}

#[test]
fn connection_close_then_cancel_refused() {
    close_first(|conn, ch, ev| {
        close_connection(conn, ev);
        let r = ch.basic_cancel(TAG, |_, _| panic!("a refused call's closure never runs"));
        assert!(matches!(r, Err(Error::ChannelWrongState { .. })), "{r:?}");
    });
}

#[test]
fn channel_close_then_connection_close() {
    close_first(|conn, ch, ev| {
        close_channel(ch, ev);
        close_connection(conn, ev);
        assert!(refused(&ev.borrow(), "connection close").is_empty());
    });
}

#[test]
fn connection_close_then_channel_close_refused() {
    close_first(|conn, ch, ev| {
        close_connection(conn, ev);
        close_channel(ch, ev);
        assert_eq!(refused(&ev.borrow(), "close").len(), 1);
    });
}

// ----------------------------------------------------------------------
// basic_cancel_nowait, and a cancel queued behind a request in flight
// ----------------------------------------------------------------------

#[test]
fn cancel_nowait_then_channel_close_or_connection_close() {
    for close_conn in [false, true] {
        for in_flight in [0, 3] {
            let script = Script {
                deliveries_in_flight: in_flight,
                ..Default::default()
            };
            let (events, took, wire) = run(script, move |conn, ch, ev| {
                ch.basic_cancel_nowait(TAG).unwrap();
                if close_conn {
                    close_connection(conn, ev);
                } else {
                    then_close_connection(ch);
                    close_channel(ch, ev);
                }
            });
            assert_ends_cleanly(&events, took);
            // On the wire: the nowait Cancel, the rejects of what crossed
            // it, Channel.Close.
            let client: Vec<&Wire> = wire
                .iter()
                .filter(|w| matches!(w, Wire::Client(1, _)))
                .collect();
            let cancel = client
                .iter()
                .position(|w| **w == Wire::Client(1, "Basic.Cancel"))
                .unwrap_or_else(|| panic!("the nowait cancel went out: {wire:#?}"));
            let close = client
                .iter()
                .position(|w| **w == Wire::Client(1, "Channel.Close"))
                .unwrap_or_else(|| panic!("Channel.Close went out: {wire:#?}"));
            assert!(cancel < close, "{wire:#?}");
            // The deliveries that crossed the cancel were rejected before
            // the Close, or discarded once it was out (the broker requeues
            // them at the close either way): never delivered.
            assert!(
                client[cancel + 1..close]
                    .iter()
                    .all(|w| **w == Wire::Client(1, "Basic.Reject")),
                "{wire:#?}"
            );
        }
    }
}

#[test]
fn a_cancel_queued_behind_a_declare_in_flight_completes_then_the_close_goes_out() {
    for close_conn in [false, true] {
        for in_flight in [0, 3] {
            let script = Script {
                deliveries_in_flight: in_flight,
                declare_delay: Some(Duration::from_millis(200)),
                ..Default::default()
            };
            let (events, took, wire) = run(script, move |conn, ch, ev| {
                let e = ev.clone();
                ch.queue_declare(
                    "other",
                    QueueDeclareOptions::default(),
                    FieldTable::new(),
                    move |_, r| {
                        e.borrow_mut()
                            .push(Event::Declared(r.map(|_| ()).map_err(|e| e.to_string())))
                    },
                )
                .unwrap();
                cancel(ch, ev);
                if close_conn {
                    close_connection(conn, ev);
                } else {
                    then_close_connection(ch);
                    close_channel(ch, ev);
                }
            });
            assert_ends_cleanly(&events, took);
            assert_close_right_after_cancel_ok(&wire, in_flight as usize);
            // The declare in flight got its real reply, before the cancel's.
            let declared = events
                .iter()
                .position(|e| matches!(e, Event::Declared(_)))
                .expect("the declare completed");
            assert!(
                matches!(events[declared], Event::Declared(Ok(()))),
                "{events:?}"
            );
            let cancelled = events
                .iter()
                .position(|e| matches!(e, Event::CancelDone(_)))
                .unwrap();
            assert!(declared < cancelled, "{events:?}");
            // And the Cancel left only after the DeclareOk.
            let declare_ok = wire
                .iter()
                .position(|w| *w == Wire::Broker(1, "Queue.DeclareOk"))
                .unwrap();
            let cancel_out = wire
                .iter()
                .position(|w| *w == Wire::Client(1, "Basic.Cancel"))
                .unwrap();
            assert!(declare_ok < cancel_out, "{wire:#?}");
        }
    }
}

// ----------------------------------------------------------------------
// The real broker
// ----------------------------------------------------------------------

#[test]
fn cancel_then_connection_close_finishes_promptly_against_rabbitmq() {
    let queue = format!("cancel-close-{}", std::process::id());
    let outcome: Events = Rc::default();
    let (o1, o2) = (outcome.clone(), outcome.clone());
    let started = Rc::new(RefCell::new(None::<Instant>));
    let s = started.clone();
    let mut params = broker_params();
    params.set_socket_timeout(CLOSE_BOUND).unwrap();
    let conn = SelectConnection::new(
        params,
        move |conn| {
            let conn2 = conn.clone();
            conn.channel(None, move |r| {
                let ch = r.unwrap();
                let e = o1.clone();
                ch.add_on_close_callback(move |_, err| {
                    e.borrow_mut().push(Event::ChannelClosed(err))
                });
                let opts = QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                };
                let o = o1.clone();
                ch.queue_declare(&queue, opts, FieldTable::new(), move |ch, r| {
                    let q = r.unwrap().queue;
                    for i in 0..20u8 {
                        ch.basic_publish("", &q, [i], &BasicProperties::default(), false)
                            .unwrap();
                    }
                    let o2 = o.clone();
                    ch.basic_consume(
                        &q,
                        |_, _| {},
                        BasicConsumeOptions::default(),
                        move |ch, r| {
                            let tag = r.unwrap().consumer_tag;
                            *s.borrow_mut() = Some(Instant::now());
                            let o3 = o2.clone();
                            ch.basic_cancel(&tag, move |_, r| {
                                o3.borrow_mut().push(Event::CancelDone(
                                    r.map(|_| ()).map_err(|e| e.to_string()),
                                ))
                            })
                            .unwrap();
                            conn2.close(200, "bye").unwrap();
                        },
                    )
                    .unwrap();
                })
                .unwrap();
            })
            .unwrap();
        },
        |conn, e| {
            conn.ioloop().stop();
            panic!("open error: {e}");
        },
        move |conn, e| {
            o2.borrow_mut().push(Event::Closed(e));
            conn.ioloop().stop();
        },
    )
    .unwrap();
    run_loop(conn.ioloop(), Duration::from_secs(30));
    let took = started.borrow().expect("consuming").elapsed();
    let events = outcome.borrow().clone();
    assert!(
        matches!(events.first(), Some(Event::CancelDone(Ok(())))),
        "{events:?}"
    );
    assert!(
        matches!(
            events.get(1),
            Some(Event::ChannelClosed(Error::ChannelClosedByClient { .. }))
        ),
        "{events:?}"
    );
    assert!(
        matches!(
            events.get(2),
            Some(Event::Closed(Error::ConnectionClosedByClient { .. }))
        ),
        "{events:?}"
    );
    assert!(took < DEADLINE, "closing took {took:?}");
}

// ----------------------------------------------------------------------
// The close bound's log line says what was sent and what was not
// ----------------------------------------------------------------------

static RECORDS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            RECORDS.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

#[test]
fn an_unanswered_close_logs_what_was_sent_and_what_was_not() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
    });
    let bound = Duration::from_millis(500);
    let script = Script {
        ignore_cancel: true,
        close_bound: Some(bound),
        ..Default::default()
    };
    let (events, took, wire) = run(script, |conn, ch, ev| {
        cancel(ch, ev);
        close_connection(conn, ev);
    });
    assert!(took >= bound, "the bound was waited out: {took:?}");
    assert!(
        !wire.contains(&Wire::Client(1, "Channel.Close")),
        "no Close behind an unanswered cancel: {wire:#?}"
    );
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::CancelDone(Err(_)),
                Event::ChannelClosed(_),
                Event::Closed(Error::ConnectionClosedByClient { .. })
            ]
        ),
        "every callback fired once: {events:?}"
    );
    let records = RECORDS.lock().unwrap().clone();
    let line = records
        .iter()
        .find(|r| r.contains("close handshake not answered"))
        .unwrap_or_else(|| panic!("the bound's log line: {records:#?}"));
    for part in [
        "channel 1: Channel.Close not sent, queued behind Basic.Cancel (in flight, no reply)",
        "Connection.Close not sent",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
}
