//! Runs the channel examples against the broker: each example's `run` is
//! compiled into this test binary, bounded by a message count, a stop
//! request or a timeout, and what it reports is checked against the
//! broker's own view (queue depths, connections).
//!
//! Every test uses exchange, queue and connection names of its own, so the
//! tests can run side by side on one broker.

mod common;

#[path = "../examples/asynchronous_consumer_example.rs"]
mod asynchronous_consumer_example;

#[path = "../examples/asynchronous_publisher_example.rs"]
mod asynchronous_publisher_example;

#[path = "../examples/basic_consumer_threaded.rs"]
mod basic_consumer_threaded;

#[path = "../examples/direct_reply_to.rs"]
mod direct_reply_to;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashSet};
use std::fmt::Debug;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use asynchronous_consumer_example as consumer;
use asynchronous_publisher_example as publisher;
use basic_consumer_threaded as threaded;
use common::proxy::{Direction, Proxy};
use pika::{
    BasicProperties, Confirmation, Error, FieldTable, QueueDeleteOptions, SelectConnection,
};

/// The bound on every wait: generous, a liveness limit, not a timing.
const LIMIT: Duration = Duration::from_secs(60);

/// A name no other test (or earlier run) uses.
fn unique(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(
        "examples_channel.{what}.{}.{stamp}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `f` when dropped: stops an example's thread when a test fails.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Joins an example's thread, failing the test if it takes over `LIMIT`.
fn join<T>(thread: JoinHandle<T>, what: &str) -> T {
    let deadline = Instant::now() + LIMIT;
    while !thread.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish within {LIMIT:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    thread.join().unwrap_or_else(|_| panic!("{what} panicked"))
}

/// Collects events into `seen` until `done(seen)`, failing after `LIMIT`.
fn wait_for<E: Debug>(
    events: &Receiver<E>,
    seen: &mut Vec<E>,
    what: &str,
    done: impl Fn(&[E]) -> bool,
) {
    let deadline = Instant::now() + LIMIT;
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(event) => seen.push(event),
            Err(e) => panic!("no {what} ({e}); events so far: {seen:#?}"),
        }
    }
}

/// Has the broker close the connection whose client properties carry
/// `connection_name`, as `rabbitmqctl close_connection` does by hand.
fn broker_closes_connection(connection_name: &str) {
    let deadline = Instant::now() + LIMIT;
    let pid = loop {
        let listing = common::rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]);
        let found = listing.lines().find_map(|line| {
            let (pid, properties) = line.split_once('\t')?;
            properties
                .contains(connection_name)
                .then(|| pid.trim().to_string())
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no connection named {connection_name} in {listing}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    common::rabbitmqctl(&["close_connection", &pid, "examples test closes it"]);
}

/// The broker's (ready, unacknowledged, consumers) counts of `queue`, or
/// `None` when it does not exist.
fn queue_info(queue: &str) -> Option<(u64, u64, u64)> {
    let listing = common::rabbitmqctl(&[
        "-q",
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
    ]);
    listing.lines().find_map(|line| {
        let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
        match fields.as_slice() {
            [name, ready, unacked, consumers] if *name == queue => Some((
                ready.parse().ok()?,
                unacked.parse().ok()?,
                consumers.parse().ok()?,
            )),
            _ => None,
        }
    })
}

/// Waits until `queue` holds `ready` ready and no unacknowledged messages
/// (the broker settles acks a moment after they arrive).
fn assert_queue_settles_at(queue: &str, ready: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = queue_info(queue);
        if matches!(info, Some((r, 0, _)) if r == ready) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queue {queue}: (ready, unacked, consumers) = {info:?}, expected {ready} ready and none unacked"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Publishes `bodies` to `exchange` with confirms, and returns once the
/// broker has acked every one of them.
fn publish(exchange: &str, routing_key: &str, bodies: Vec<String>) {
    let outcome = Rc::new(RefCell::new(Vec::<Confirmation>::new()));
    let (o, exchange, routing_key) = (
        outcome.clone(),
        exchange.to_string(),
        routing_key.to_string(),
    );
    let total = bodies.len();
    let conn = SelectConnection::new(
        common::broker_params(),
        move |conn| {
            conn.channel(None, move |ch| {
                let ch = ch.expect("a channel");
                let (o, settled) = (o.clone(), Rc::new(Cell::new(0usize)));
                let unconfirmed = Rc::new(RefCell::new(BTreeSet::new()));
                let u = unconfirmed.clone();
                ch.confirm_delivery(
                    move |ch, c| {
                        let mut open = u.borrow_mut();
                        for t in c.settled() {
                            assert!(open.remove(t), "tag {t} settled once: {c:?}");
                            settled.set(settled.get() + 1);
                        }
                        o.borrow_mut().push(c);
                        if settled.get() == total {
                            let _ = ch.connection().expect("open").close(200, "published");
                        }
                    },
                    move |ch, ok| {
                        ok.expect("confirm mode");
                        for body in &bodies {
                            let tag = ch
                                .basic_publish(
                                    &exchange,
                                    &routing_key,
                                    body.as_bytes(),
                                    &BasicProperties::default(),
                                    false,
                                )
                                .expect("published")
                                .expect("a delivery tag");
                            unconfirmed.borrow_mut().insert(tag);
                        }
                    },
                )
                .expect("confirm_delivery");
            })
            .expect("channel");
        },
        |_, e| panic!("the test publisher cannot connect: {e}"),
        |conn, _| conn.ioloop().stop(),
    )
    .expect("a connection");
    common::run_loop(conn.ioloop(), LIMIT);
    conn.ioloop().close();
    let outcome = outcome.borrow();
    assert!(
        outcome.iter().all(Confirmation::is_ack) && !outcome.is_empty(),
        "the test publisher's messages were not all acked: {outcome:?}"
    );
}

/// Deletes the queues and exchanges a test declared.
fn delete(queues: &[&str], exchanges: &[&str]) {
    let queues: Vec<String> = queues.iter().map(|s| s.to_string()).collect();
    let exchanges: Vec<String> = exchanges.iter().map(|s| s.to_string()).collect();
    let conn = SelectConnection::new(
        common::broker_params(),
        move |conn| {
            conn.channel(None, move |ch| {
                let ch = ch.expect("a channel");
                // Close once the last delete is answered.
                let left = Rc::new(Cell::new(queues.len() + exchanges.len()));
                let done = move |ch: &pika::Channel, left: &Cell<usize>| {
                    left.set(left.get() - 1);
                    if left.get() == 0 {
                        let _ = ch.connection().expect("open").close(200, "cleaned up");
                    }
                };
                for q in &queues {
                    let left = left.clone();
                    ch.queue_delete(q, QueueDeleteOptions::default(), move |ch, r| {
                        r.expect("queue deleted");
                        done(ch, &left);
                    })
                    .expect("queue_delete");
                }
                for x in &exchanges {
                    let left = left.clone();
                    ch.exchange_delete(x, false, move |ch, r| {
                        r.expect("exchange deleted");
                        done(ch, &left);
                    })
                    .expect("exchange_delete");
                }
            })
            .expect("channel");
        },
        |_, e| panic!("cannot connect to clean up: {e}"),
        |conn, _| conn.ioloop().stop(),
    )
    .expect("a connection");
    common::run_loop(conn.ioloop(), LIMIT);
    conn.ioloop().close();
}

// ---------------------------------------------------------------------------
// asynchronous_consumer_example
// ---------------------------------------------------------------------------

fn received_bodies(events: &[consumer::Event], connection: Option<u32>) -> HashSet<String> {
    events
        .iter()
        .filter_map(|e| match e {
            consumer::Event::Message {
                connection: c,
                delivery,
            } if connection.is_none_or(|n| n == *c) => {
                Some(String::from_utf8_lossy(&delivery.body).into_owned())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn asynchronous_consumer_reconnects_after_the_broker_closes_its_connection() {
    let settings = consumer::Settings {
        exchange: unique("message"),
        queue: unique("text"),
        connection_name: Some(unique("consumer")),
        ..Default::default()
    };
    let (exchange, queue, routing_key) = (
        settings.exchange.clone(),
        settings.queue.clone(),
        settings.routing_key.clone(),
    );
    let name = settings.connection_name.clone().unwrap_or_default();
    let stop = consumer::StopHandle::new();
    let _stop_on_failure = OnDrop({
        let stop = stop.clone();
        move || stop.request_stop()
    });
    let (tx, events) = mpsc::channel();
    let (url, stop2) = (common::amqp_url(), stop.clone());
    let example = thread::spawn(move || {
        consumer::run(&url, settings, stop2, move |e| {
            let _ = tx.send(e.clone());
        })
    });
    let mut seen = Vec::new();

    wait_for(&events, &mut seen, "first consumer", |s| {
        s.iter()
            .any(|e| matches!(e, consumer::Event::Consuming { connection: 1, .. }))
    });
    let before: HashSet<String> = (0..5).map(|i| format!("before {i}")).collect();
    publish(&exchange, &routing_key, before.iter().cloned().collect());
    wait_for(&events, &mut seen, "messages before the close", |s| {
        received_bodies(s, Some(1)).is_superset(&before)
    });

    broker_closes_connection(&name);
    wait_for(&events, &mut seen, "consumer on a new connection", |s| {
        s.iter()
            .any(|e| matches!(e, consumer::Event::Consuming { connection: 2, .. }))
    });
    let after: HashSet<String> = (0..5).map(|i| format!("after {i}")).collect();
    publish(&exchange, &routing_key, after.iter().cloned().collect());
    wait_for(&events, &mut seen, "messages after the reconnection", |s| {
        received_bodies(s, Some(2)).is_superset(&after)
    });

    stop.request_stop();
    let summary = join(example, "the consumer").expect("the consumer runs");
    seen.extend(events.try_iter());
    // Each connection consumed under a tag of its own making, and the
    // first one's end said why and that a reconnection followed.
    let tags: Vec<(u32, &str)> = seen
        .iter()
        .filter_map(|e| match e {
            consumer::Event::Consuming {
                connection,
                consumer_tag,
            } => Some((*connection, consumer_tag.as_str())),
            _ => None,
        })
        .collect();
    assert!(
        matches!(tags.as_slice(), [(1, a), (2, b)] if !a.is_empty() && !b.is_empty()),
        "{tags:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(
            e,
            consumer::Event::ConnectionEnded {
                connection: 1,
                reason: Error::ConnectionClosedByBroker {
                    reply_code: 320,
                    ..
                },
                reconnecting: true,
            }
        )),
        "{seen:#?}"
    );
    assert_eq!(summary.connections_opened, 2, "{summary:?}");
    assert!(
        matches!(
            summary.end_reasons.as_slice(),
            [Error::ConnectionClosedByBroker { reply_code: 320, reply_text }, Error::ConnectionClosedByClient { reply_code: 200, .. }]
                if reply_text.contains("examples test closes it")
        ),
        "{summary:?}"
    );
    assert!(summary.stopped_cleanly());
    // Every message arrived, each was acked; none is left in the queue.
    assert!(summary.messages() >= 10, "{summary:?}");
    assert_eq!(summary.acked, summary.messages(), "{summary:?}");
    assert_eq!(received_bodies(&seen, None).len(), 10);
    assert_queue_settles_at(&queue, 0);
    delete(&[&queue], &[&exchange]);
}

#[test]
fn asynchronous_consumer_stops_at_once_when_asked_before_it_connects() {
    let stop = consumer::StopHandle::new();
    stop.request_stop();
    let summary = consumer::run(
        &common::amqp_url(),
        consumer::Settings::default(),
        stop,
        |_| {},
    )
    .expect("runs");
    assert_eq!(summary.connections_opened, 0, "{summary:?}");
    assert!(summary.end_reasons.is_empty(), "{summary:?}");
}

// ---------------------------------------------------------------------------
// asynchronous_publisher_example
// ---------------------------------------------------------------------------

fn published_on(events: &[publisher::Event], connection: u32) -> usize {
    events
        .iter()
        .filter(
            |e| matches!(e, publisher::Event::Published { connection: c, .. } if *c == connection),
        )
        .count()
}

#[test]
fn asynchronous_publisher_counts_every_confirmation_across_reconnections() {
    // Through the fault-injecting proxy, so that a connection can be lost
    // with confirmations still due.
    let proxy = Proxy::start(common::broker_addr());
    let (user, password) = common::broker_credentials();
    let url = format!("amqp://{user}:{password}@{}/%2F", proxy.addr());
    let settings = publisher::Settings {
        exchange: unique("message"),
        queue: unique("text"),
        connection_name: Some(unique("publisher")),
        publish_interval: Duration::from_millis(20),
        reconnect_delay: Duration::from_millis(100),
        ..Default::default()
    };
    let (exchange, queue) = (settings.exchange.clone(), settings.queue.clone());
    let name = settings.connection_name.clone().unwrap_or_default();
    let stop = publisher::StopHandle::new();
    let _stop_on_failure = OnDrop({
        let stop = stop.clone();
        move || stop.request_stop()
    });
    let (tx, events) = mpsc::channel();
    let stop2 = stop.clone();
    let example = thread::spawn(move || {
        publisher::run(&url, settings, stop2, move |e| {
            let _ = tx.send(e.clone());
        })
    });
    let mut seen = Vec::new();

    // 1. The broker closes the first connection.
    wait_for(&events, &mut seen, "publishes on connection 1", |s| {
        published_on(s, 1) >= 5
    });
    broker_closes_connection(&name);
    // 2. The second connection loses its socket while the broker's
    //    confirmations are held back: what it published since is Failed.
    wait_for(&events, &mut seen, "publishes on connection 2", |s| {
        published_on(s, 2) >= 5
    });
    proxy.stall(Direction::BrokerToClient);
    let stalled_at = published_on(&seen, 2);
    wait_for(&events, &mut seen, "publishes with confirms held", |s| {
        published_on(s, 2) >= stalled_at + 3
    });
    proxy.cut_fin();
    proxy.resume(Direction::BrokerToClient);
    // 3. The third connection publishes until stopped.
    wait_for(&events, &mut seen, "publishes on connection 3", |s| {
        published_on(s, 3) >= 5
    });
    stop.request_stop();
    let summary = join(example, "the publisher").expect("the publisher runs");
    seen.extend(events.try_iter());

    assert_eq!(summary.connections_opened, 3, "{summary:?}");
    assert!(
        matches!(
            summary.end_reasons.as_slice(),
            [
                Error::ConnectionClosedByBroker {
                    reply_code: 320,
                    ..
                },
                Error::StreamLost { .. },
                Error::ConnectionClosedByClient {
                    reply_code: 200,
                    ..
                }
            ]
        ),
        "{:?}",
        summary.end_reasons
    );
    assert!(summary.stopped_cleanly());
    let [first, second, third] = summary.per_connection.as_slice() else {
        panic!("three connections expected: {summary:?}");
    };
    // Every message of every connection was settled one way or another.
    for stats in &summary.per_connection {
        assert_eq!(stats.unconfirmed(), 0, "{summary:?}");
        assert_eq!(stats.nacked, 0, "{summary:?}");
    }
    assert_eq!(first.published, first.acked + first.failed);
    // The ones published while confirms were held were Failed.
    assert!(second.failed >= 3, "{summary:?}");
    // One Failed confirmation lists them all.
    let failed: Vec<&Confirmation> = seen
        .iter()
        .filter_map(|e| match e {
            publisher::Event::Confirmed {
                connection: 2,
                confirmation: c @ Confirmation::Failed { .. },
            } => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].settled().len() as u64, second.failed);
    // The stop waited for the last connection's confirmations.
    assert_eq!(third.failed, 0, "{summary:?}");
    assert_eq!(third.acked, third.published, "{summary:?}");
    assert!(third.published >= 5);
    // The events tell the same story: each connection started publishing
    // once, with delivery tags counting from 1 on its fresh channel, and
    // ended as the summary says.
    for connection in 1..=3u32 {
        let starts = seen
            .iter()
            .filter(
                |e| matches!(e, publisher::Event::Publishing { connection: c } if *c == connection),
            )
            .count();
        assert_eq!(starts, 1, "connection {connection}");
        let tags: Vec<u64> = seen
            .iter()
            .filter_map(|e| match e {
                publisher::Event::Published {
                    connection: c,
                    delivery_tag,
                } if *c == connection => Some(*delivery_tag),
                _ => None,
            })
            .collect();
        let expected: Vec<u64> =
            (1..=summary.per_connection[connection as usize - 1].published).collect();
        assert_eq!(tags, expected, "connection {connection}");
    }
    let ends: Vec<(u32, Option<u16>, bool)> = seen
        .iter()
        .filter_map(|e| match e {
            publisher::Event::ConnectionEnded {
                connection,
                reason,
                reconnecting,
            } => Some((*connection, reason.reply_code(), *reconnecting)),
            _ => None,
        })
        .collect();
    assert_eq!(
        ends,
        [(1, Some(320), true), (2, None, true), (3, Some(200), false)]
    );
    let total = summary.total();
    // The queue holds every acked message, and at most what was published
    // (a Failed message may or may not have arrived).
    let (ready, unacked, _) = queue_info(&queue).expect("the queue exists");
    assert_eq!(unacked, 0);
    assert!(
        total.acked <= ready && ready <= total.published,
        "ready {ready}, {summary:?}"
    );
    delete(&[&queue], &[&exchange]);
}

#[test]
fn asynchronous_publisher_stops_after_its_limit_once_everything_is_confirmed() {
    // A queue that takes 2 messages and refuses the rest: the broker nacks.
    let mut arguments = FieldTable::new();
    arguments.insert("x-max-length", 2i32);
    arguments.insert("x-overflow", "reject-publish");
    let settings = publisher::Settings {
        exchange: unique("message"),
        queue: unique("text"),
        queue_arguments: arguments,
        publish_interval: Duration::from_millis(10),
        message_limit: Some(6),
        ..Default::default()
    };
    let (exchange, queue) = (settings.exchange.clone(), settings.queue.clone());
    let summary = publisher::run(
        &common::amqp_url(),
        settings,
        publisher::StopHandle::new(),
        |_| {},
    )
    .expect("the publisher runs");
    assert_eq!(summary.connections_opened, 1, "{summary:?}");
    assert!(summary.stopped_cleanly(), "{summary:?}");
    assert_eq!(
        summary.total(),
        publisher::ConnectionStats {
            published: 6,
            acked: 2,
            nacked: 4,
            failed: 0
        }
    );
    assert_queue_settles_at(&queue, 2);
    delete(&[&queue], &[&exchange]);
}

// ---------------------------------------------------------------------------
// basic_consumer_threaded
// ---------------------------------------------------------------------------

#[test]
fn threaded_consumer_workers_ack_every_message_through_the_loop() {
    let settings = threaded::Settings {
        exchange: unique("test_exchange"),
        queue: unique("standard"),
        workers: 3,
        prefetch_count: 3,
        work_time: Duration::from_millis(30),
        seed_messages: 12,
        stop_after: Some(12),
        ..Default::default()
    };
    let (exchange, queue) = (settings.exchange.clone(), settings.queue.clone());
    let stop = threaded::StopHandle::new();
    let _stop_on_failure = OnDrop({
        let stop = stop.clone();
        move || stop.request_stop()
    });
    let url = common::amqp_url();
    let example = thread::spawn(move || threaded::run(&url, settings, stop));
    let summary = join(example, "the threaded consumer").expect("it runs");
    assert!(summary.stopped_cleanly(), "{summary:?}");
    assert_eq!(summary.received, 12, "{summary:?}");
    assert_eq!(summary.acked, 12, "{summary:?}");
    assert_eq!(summary.acks_lost, 0, "{summary:?}");
    assert_eq!(summary.acked_by_worker.len(), 3);
    assert_eq!(summary.acked_by_worker.iter().sum::<u64>(), 12);
    assert_queue_settles_at(&queue, 0);
    delete(&[&queue], &[&exchange]);
}

#[test]
fn threaded_consumer_stop_request_lets_the_workers_finish_and_ack() {
    let settings = threaded::Settings {
        exchange: unique("test_exchange"),
        queue: unique("standard"),
        workers: 2,
        prefetch_count: 2,
        work_time: Duration::from_millis(200),
        seed_messages: 20,
        ..Default::default()
    };
    let (exchange, queue) = (settings.exchange.clone(), settings.queue.clone());
    let stop = threaded::StopHandle::new();
    let _stop_on_failure = OnDrop({
        let stop = stop.clone();
        move || stop.request_stop()
    });
    let (url, stop2) = (common::amqp_url(), stop.clone());
    let example = thread::spawn(move || threaded::run(&url, settings, stop2));
    // Once the consumer is registered, its 20 messages are in the queue.
    let deadline = Instant::now() + LIMIT;
    while !matches!(queue_info(&queue), Some((_, _, 1))) {
        assert!(Instant::now() < deadline, "the consumer never started");
        thread::sleep(Duration::from_millis(100));
    }
    stop.request_stop();
    let summary = join(example, "the threaded consumer").expect("it runs");
    assert!(summary.stopped_cleanly(), "{summary:?}");
    // Whatever was handed to the workers was acked before the close; the
    // rest is still in the queue.
    assert_eq!(summary.acked, summary.received, "{summary:?}");
    assert_eq!(summary.acks_lost, 0, "{summary:?}");
    assert!(summary.acked <= 20);
    assert_queue_settles_at(&queue, 20 - summary.acked);
    delete(&[&queue], &[&exchange]);
}

#[test]
fn threaded_consumer_ack_after_the_close_fails_and_the_message_comes_back() {
    // The workers take longer than the stop waits for them: the shutdown
    // closes the channel and the connection under them, so their `ack()`
    // fails and the broker requeues the two messages.
    let settings = threaded::Settings {
        exchange: unique("test_exchange"),
        queue: unique("standard"),
        workers: 2,
        prefetch_count: 2,
        work_time: Duration::from_secs(5),
        seed_messages: 2,
        shutdown_wait: Duration::from_millis(100),
        ..Default::default()
    };
    let (exchange, queue) = (settings.exchange.clone(), settings.queue.clone());
    let stop = threaded::StopHandle::new();
    let _stop_on_failure = OnDrop({
        let stop = stop.clone();
        move || stop.request_stop()
    });
    let (url, first) = (common::amqp_url(), settings.clone());
    let stop2 = stop.clone();
    let example = thread::spawn(move || threaded::run(&url, first, stop2));
    // Both messages are with the workers (delivered, not acked).
    let deadline = Instant::now() + LIMIT;
    while !matches!(queue_info(&queue), Some((0, 2, 1))) {
        assert!(
            Instant::now() < deadline,
            "the workers never got both messages"
        );
        thread::sleep(Duration::from_millis(100));
    }
    stop.request_stop();
    let summary = join(example, "the threaded consumer").expect("it runs");
    assert!(summary.stopped_cleanly(), "{summary:?}");
    assert_eq!(summary.received, 2, "{summary:?}");
    assert_eq!(summary.acked, 0, "{summary:?}");
    assert_eq!(summary.acks_lost, 2, "{summary:?}");
    // The queue holds them again, and a later consumer gets them (the only
    // two messages there are) and acks them.
    assert_queue_settles_at(&queue, 2);
    let again = threaded::Settings {
        work_time: Duration::from_millis(10),
        seed_messages: 0,
        stop_after: Some(2),
        shutdown_wait: LIMIT,
        ..settings
    };
    let url = common::amqp_url();
    let stop = threaded::StopHandle::new();
    let _stop_on_failure = OnDrop({
        let stop = stop.clone();
        move || stop.request_stop()
    });
    let example = thread::spawn(move || threaded::run(&url, again, stop));
    let summary = join(example, "the second threaded consumer").expect("it runs");
    assert!(summary.stopped_cleanly(), "{summary:?}");
    assert_eq!(summary.received, 2, "{summary:?}");
    assert_eq!(summary.acked, 2, "{summary:?}");
    assert_eq!(summary.acks_lost, 0, "{summary:?}");
    assert_queue_settles_at(&queue, 0);
    delete(&[&queue], &[&exchange]);
}

// ---------------------------------------------------------------------------
// direct_reply_to
// ---------------------------------------------------------------------------

#[test]
fn direct_reply_to_matches_every_reply_to_its_request() {
    let server_queue = unique("rpc");
    let settings = direct_reply_to::Settings {
        server_queue: server_queue.clone(),
        requests: 25,
        timeout: LIMIT,
    };
    let summary = direct_reply_to::run(&common::amqp_url(), settings).expect("it runs");
    assert!(!summary.timed_out, "{summary:?}");
    assert_eq!(summary.requests_sent, 25);
    assert_eq!(summary.requests_served, 25);
    assert_eq!(summary.unmatched_replies, 0);
    assert_eq!(summary.round_trips.len(), 25, "{summary:?}");
    let mut requests = HashSet::new();
    let mut ids = HashSet::new();
    for rt in &summary.round_trips {
        assert_eq!(rt.reply, direct_reply_to::answer(&rt.request), "{rt:?}");
        assert!(
            rt.correlation_id
                .ends_with(&format!("-{}", rt.request.trim_start_matches("Marco ")))
        );
        requests.insert(rt.request.clone());
        ids.insert(rt.correlation_id.clone());
    }
    assert_eq!(requests.len(), 25);
    assert_eq!(ids.len(), 25);
    assert!(
        matches!(
            summary.end_reason,
            Some(Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            })
        ),
        "{summary:?}"
    );
    // The server's queue was exclusive: it went with the connection.
    assert_eq!(queue_info(&server_queue), None);
}
