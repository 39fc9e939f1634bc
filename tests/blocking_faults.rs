//! The blocking face (`BlockingConnection`, `BlockingChannel`) under
//! faults, RELIABILITY.md's promises for a call that is *waiting* when
//! something goes wrong: it returns an error that names the fault (never
//! `Ok`, never a hang, never a panic), the connection reports itself
//! closed, and every later call returns an error at once.
//!
//! - Heartbeat timeout while `queue_declare`, `start_consuming`, the
//!   `consume()` iterator and `process_data_events(None)` wait: a fake
//!   broker (FS) that goes silent after the handshake, and the real broker
//!   behind the proxy (PX) stalled in both directions.
//! - A reset (RST) while a confirm-mode `basic_publish` waits for its
//!   confirm, and under `basic_publish_nowait` + `wait_for_confirms`; the
//!   real broker's 404 under such a window: the unconfirmed ones come back
//!   as failed, then the next call says why.
//! - The broker's Connection.Close (320, 541) while a call waits: the
//!   broker's words, and our CloseOk.
//! - The broker's Channel.Close while a call waits (the real broker's 404,
//!   and FS during `basic_get`): the channel ends, the connection goes on.
//! - A channel the broker closed whose number a new channel took: the old
//!   handle's `wait_for_confirms` and `consume()` iterator end at once.
//! - Malformed frames during a call: bad frame-end, unknown frame type, a
//!   body with no header.
//! - A panicking consumer or return callback: the panic propagates out of
//!   the call that dispatched it, and the engine is not wedged.
//! - A broker that stops reading while the application publishes in a loop
//!   (PX stalled): publishing blocks at the outbound high-water mark and
//!   ends with the heartbeat timeout; what it buffers stays bounded
//!   (counted by the binary's allocator, per thread).
//!
//! Every client side runs under a liveness deadline ([`bounded`]): a hang
//! is a failure naming the call, not a stuck test binary. Timing bounds are
//! asserted with at least 2× slack.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::fake_broker::{FakeBroker, FakeConn, OwnedFrame, decode_frames, rabbitmq_tune};
use common::proxy::{Direction, Proxy};
use common::{bounded, broker_params};
use pika::frame::{encode_body, encode_method};
use pika::spec::{Method, basic, channel, confirm, connection, queue};
use pika::{
    BasicConsumeOptions, BasicProperties, BlockingChannel, BlockingConnection, CodecError,
    ConnectionParameters, Error, ExchangeDeclareOptions, FieldTable, QueueDeclareOptions,
};

/// The liveness deadline of one test's client side.
const LIMIT: Duration = Duration::from_secs(20);
/// How long a fake broker waits for the client to close its socket.
const EOF_WAIT: Duration = Duration::from_secs(10);
/// The heartbeat timeout the heartbeat tests negotiate.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// When the client declares a silent broker dead: after 2 × the heartbeat
/// timeout of silence (the core's documented bound).
const DEAD_AFTER: Duration = Duration::from_secs(2);

// ----------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------

/// A name no other test (or run) uses.
fn unique(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "pika-rs.blocking-faults.{what}.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Options for an exclusive queue.
fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

/// A fake broker running one script, which returns what the test inspects
/// once the client is done.
struct Fake<T> {
    broker: FakeBroker,
    result: mpsc::Receiver<T>,
}

impl<T: Send + 'static> Fake<T> {
    /// Starts the broker; `script` gets the first connection.
    fn start(script: impl FnOnce(FakeConn) -> T + Send + 'static) -> Fake<T> {
        let (tx, result) = mpsc::channel();
        let broker = FakeBroker::start(move |conn| {
            let _ = tx.send(script(conn));
        });
        Fake { broker, result }
    }

    /// Parameters pointing at the fake broker, with short timeouts.
    fn params(&self) -> ConnectionParameters {
        let mut params = ConnectionParameters::default();
        params
            .set_host("127.0.0.1")
            .unwrap()
            .set_port(self.broker.addr().port())
            .unwrap();
        params
            .set_socket_timeout(Duration::from_secs(2))
            .unwrap()
            .set_stack_timeout(Duration::from_secs(5))
            .unwrap();
        params
    }

    /// Waits for the script (its failure is the test's) and returns its
    /// result.
    fn finish(self) -> T {
        self.broker.join();
        self.result.recv().expect("the script returned its result")
    }
}

/// Parameters for the real broker, reached through `proxy`.
fn proxied_params(proxy: &Proxy) -> ConnectionParameters {
    let mut params = broker_params();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(proxy.addr().port())
        .unwrap();
    params
}

/// The fake broker's side of the handshake (with `tune`) and of the
/// client's first channel.
fn open_channel(conn: &mut FakeConn, tune: connection::Tune) {
    conn.handshake(tune);
    conn.expect::<channel::Open>(1);
    conn.send_method(1, channel::OpenOk::default());
}

/// RabbitMQ's Tune with the heartbeat of the heartbeat tests.
fn heartbeat_tune() -> connection::Tune {
    connection::Tune {
        heartbeat: HEARTBEAT.as_secs() as u16,
        ..rabbitmq_tune()
    }
}

/// The fake broker's side of the client's `basic_consume` / `consume()`:
/// reads Basic.Consume on channel 1 and confirms it; returns the tag.
fn accept_consumer(conn: &mut FakeConn) -> String {
    let consume = conn.expect::<basic::Consume>(1);
    conn.send_method(
        1,
        basic::ConsumeOk {
            consumer_tag: consume.consumer_tag.clone(),
        },
    );
    consume.consumer_tag
}

/// Delivers `body` to consumer `tag` on channel 1.
fn deliver(conn: &mut FakeConn, tag: &str, delivery_tag: u64, body: &[u8]) {
    conn.send_message(
        1,
        basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            routing_key: "q".into(),
            ..Default::default()
        },
        &BasicProperties::default(),
        body,
    );
}

/// Answers the client's close handshake like a broker (Channel.Close on
/// any channel, then Connection.Close), then waits for its socket to close.
fn serve_close(mut conn: FakeConn) -> Vec<OwnedFrame> {
    loop {
        match conn.read_method() {
            (ch, Method::ChannelClose(_)) => conn.send_method(ch, channel::CloseOk {}),
            (0, Method::ConnectionClose(_)) => {
                conn.send_method(0, connection::CloseOk {});
                return until_eof(&mut conn);
            }
            (ch, other) => panic!("fake broker: unexpected {other:?} on channel {ch}"),
        }
    }
}

/// Everything the client sends until it closes its socket, as frames.
fn until_eof(conn: &mut FakeConn) -> Vec<OwnedFrame> {
    decode_frames(&conn.read_until_eof(EOF_WAIT))
}

/// The frames' names, for messages.
fn names(frames: &[OwnedFrame]) -> Vec<&'static str> {
    frames
        .iter()
        .map(|f| match f {
            OwnedFrame::Method(_, m) => m.name(),
            OwnedFrame::Header(..) => "header",
            OwnedFrame::Body(..) => "body",
            OwnedFrame::Heartbeat => "heartbeat",
        })
        .collect()
}

/// One method frame, encoded.
fn method_frame(channel: u16, method: impl Into<Method>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_method(&mut out, channel, &method.into(), 0).unwrap();
    out
}

/// Asserts that `frames` (what the client sent after a fault) end with its
/// one Connection.Close, carrying `reply_code`.
fn assert_closed_with(frames: &[OwnedFrame], reply_code: u16) {
    let closes: Vec<&connection::Close> = frames
        .iter()
        .filter_map(|f| match f {
            OwnedFrame::Method(0, Method::ConnectionClose(c)) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(closes.len(), 1, "one Connection.Close: {:?}", names(frames));
    assert_eq!(closes[0].reply_code, reply_code, "{:?}", closes[0]);
    assert!(
        matches!(
            frames.last(),
            Some(OwnedFrame::Method(0, Method::ConnectionClose(_)))
        ),
        "Connection.Close is the client's last frame: {:?}",
        names(frames)
    );
}

/// Asserts that `error` is the heartbeat timeout of the tests' heartbeat,
/// declared after at least twice the timeout of silence, and that the call
/// that returned it took at most 2 × that bound.
fn assert_heartbeat_timeout(error: &Error, call_took: Duration) {
    match error {
        Error::AmqpHeartbeatTimeout { timeout, silence } => {
            assert_eq!(*timeout, HEARTBEAT, "{error}");
            assert!(*silence >= DEAD_AFTER, "declared dead after {silence:?}");
        }
        other => panic!("expected AmqpHeartbeatTimeout, got {other:?}"),
    }
    assert!(
        error.to_string().contains("heartbeat timeout"),
        "the message names the heartbeat: {error}"
    );
    assert!(error.is_connection_error(), "{error:?}");
    assert!(
        call_took < DEAD_AFTER * 2,
        "the blocked call returned {call_took:?} after it started (bound {DEAD_AFTER:?})"
    );
}

/// Asserts that the connection is closed and that every later call on it
/// and on `ch` returns an error at once (each `expected`, except `close`,
/// which is wrong state), none waiting.
fn assert_every_later_call_fails(
    conn: &BlockingConnection,
    ch: &BlockingChannel,
    expected: impl Fn(&Error) -> bool,
) {
    assert!(conn.is_closed() && !conn.is_open());
    assert!(ch.is_closed() && !ch.is_open());
    let started = Instant::now();
    let props = BasicProperties::default();
    let results: Vec<(&str, Result<(), Error>)> = vec![
        ("channel", conn.channel(None).map(drop)),
        (
            "process_data_events(0)",
            conn.process_data_events(Some(Duration::ZERO)),
        ),
        ("process_data_events(None)", conn.process_data_events(None)),
        ("sleep", conn.sleep(Duration::from_millis(1))),
        (
            "queue_declare",
            ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new())
                .map(drop),
        ),
        (
            "basic_publish",
            ch.basic_publish("", "q", "late", &props, false),
        ),
        ("basic_get", ch.basic_get("q", false).map(drop)),
        ("basic_ack", ch.basic_ack(1, false)),
        (
            "consume",
            ch.consume("q", false, false, FieldTable::new(), None)
                .map(drop),
        ),
        ("start_consuming", ch.start_consuming()),
        ("wait_for_confirms", ch.wait_for_confirms(0).map(drop)),
        ("channel close", ch.close(200, "late")),
    ];
    for (call, result) in results {
        match result {
            Err(e) if expected(&e) => {}
            other => panic!("{call} on the closed connection returned {other:?}"),
        }
    }
    assert!(
        matches!(
            conn.close(200, "late"),
            Err(Error::ConnectionWrongState { .. })
        ),
        "close of a closed connection is wrong state"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the later calls took {:?}: they must not wait",
        started.elapsed()
    );
}

// ----------------------------------------------------------------------
// Heartbeat timeout while a call waits
// ----------------------------------------------------------------------

/// A fake broker that handshakes with the tests' heartbeat, serves the
/// client's first channel, runs `then`, and from there sends nothing; it
/// returns what the client sent afterwards, up to its closing the socket.
fn silent_broker(then: impl FnOnce(&mut FakeConn) + Send + 'static) -> Fake<Vec<OwnedFrame>> {
    Fake::start(move |mut conn| {
        open_channel(&mut conn, heartbeat_tune());
        then(&mut conn);
        until_eof(&mut conn)
    })
}

/// Asserts that what the client sent to a silent broker is only
/// heartbeats (it kept talking) and no Connection.Close (no close
/// handshake with a dead peer).
fn assert_only_heartbeats(frames: &[OwnedFrame]) {
    assert!(
        frames.iter().all(|f| *f == OwnedFrame::Heartbeat),
        "only heartbeats after the broker went silent: {:?}",
        names(frames)
    );
    assert!(
        frames.len() >= 2,
        "the client sent a heartbeat every half timeout: {:?}",
        names(frames)
    );
}

/// Connects to `fake` with the tests' heartbeat and opens a channel.
fn connect_with_heartbeat<T: Send + 'static>(
    fake: &Fake<T>,
) -> (BlockingConnection, BlockingChannel) {
    let mut params = fake.params();
    params.set_heartbeat(HEARTBEAT.as_secs() as u16);
    let conn = BlockingConnection::new(params).expect("the fake broker handshakes");
    assert_eq!(conn.heartbeat(), HEARTBEAT.as_secs() as u16);
    let ch = conn
        .channel(None)
        .expect("the fake broker opens the channel");
    (conn, ch)
}

#[test]
fn a_heartbeat_timeout_ends_a_queue_declare_waiting_for_its_reply() {
    let fake = silent_broker(|conn| {
        conn.expect::<queue::Declare>(1);
    });
    let (conn, ch) = connect_with_heartbeat(&fake);
    bounded("queue_declare", LIMIT, move || {
        let started = Instant::now();
        let result = ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new());
        let error = result.expect_err("no reply: the declare fails");
        assert_heartbeat_timeout(&error, started.elapsed());
        assert_every_later_call_fails(&conn, &ch, |e| {
            matches!(e, Error::AmqpHeartbeatTimeout { .. })
        });
    });
    assert_only_heartbeats(&fake.finish());
}

#[test]
fn a_heartbeat_timeout_ends_start_consuming() {
    let fake = silent_broker(|conn| {
        let tag = accept_consumer(conn);
        deliver(conn, &tag, 1, b"first");
    });
    let (conn, ch) = connect_with_heartbeat(&fake);
    bounded("start_consuming", LIMIT, move || {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let options = BasicConsumeOptions {
            auto_ack: true,
            ..Default::default()
        };
        ch.basic_consume("q", move |_, d| s.lock().unwrap().push(d.body), options)
            .unwrap();
        let started = Instant::now();
        let error = ch
            .start_consuming()
            .expect_err("a silent broker ends start_consuming");
        assert_heartbeat_timeout(&error, started.elapsed());
        assert_eq!(
            *seen.lock().unwrap(),
            [b"first".to_vec()],
            "the delivery before the silence was dispatched"
        );
        assert_every_later_call_fails(&conn, &ch, |e| {
            matches!(e, Error::AmqpHeartbeatTimeout { .. })
        });
    });
    assert_only_heartbeats(&fake.finish());
}

#[test]
fn a_heartbeat_timeout_ends_the_consume_iteration() {
    let fake = silent_broker(|conn| {
        let tag = accept_consumer(conn);
        deliver(conn, &tag, 1, b"first");
    });
    let (conn, ch) = connect_with_heartbeat(&fake);
    bounded("consume()", LIMIT, move || {
        {
            let mut messages = ch
                .consume("q", true, false, FieldTable::new(), None)
                .unwrap();
            let first = messages.next().expect("an item").expect("a message");
            assert_eq!(first.expect("not an inactivity timeout").body, b"first");
            let started = Instant::now();
            let error = messages
                .next()
                .expect("the iterator yields the end's error")
                .expect_err("a silent broker ends the iteration with an error");
            assert_heartbeat_timeout(&error, started.elapsed());
            assert!(messages.next().is_none(), "then the iteration ends");
        }
        assert_every_later_call_fails(&conn, &ch, |e| {
            matches!(e, Error::AmqpHeartbeatTimeout { .. })
        });
    });
    assert_only_heartbeats(&fake.finish());
}

#[test]
fn a_heartbeat_timeout_ends_process_data_events_waiting_for_an_event() {
    let fake = silent_broker(|_| {});
    let (conn, ch) = connect_with_heartbeat(&fake);
    bounded("process_data_events(None)", LIMIT, move || {
        let started = Instant::now();
        let error = conn
            .process_data_events(None)
            .expect_err("a silent broker ends the wait");
        assert_heartbeat_timeout(&error, started.elapsed());
        assert_every_later_call_fails(&conn, &ch, |e| {
            matches!(e, Error::AmqpHeartbeatTimeout { .. })
        });
    });
    assert_only_heartbeats(&fake.finish());
}

/// A connection with the tests' heartbeat to the real broker through a
/// proxy, a channel (`before` runs on it), then the proxy stalled both
/// ways. Returns the proxy (keep it alive), both handles and when the
/// stall began.
fn stalled_real_broker(
    before: impl FnOnce(&BlockingChannel),
) -> (Proxy, BlockingConnection, BlockingChannel, Instant) {
    let proxy = Proxy::start(common::broker_addr());
    let mut params = proxied_params(&proxy);
    params.set_heartbeat(HEARTBEAT.as_secs() as u16);
    let conn = BlockingConnection::new(params).expect("the broker is reachable");
    assert_eq!(conn.heartbeat(), HEARTBEAT.as_secs() as u16);
    let ch = conn.channel(None).unwrap();
    before(&ch);
    for dir in Direction::BOTH {
        proxy.stall(dir);
    }
    (proxy, conn, ch, Instant::now())
}

#[test]
fn the_real_broker_stalled_both_ways_behind_the_proxy_is_a_heartbeat_timeout_of_queue_declare() {
    let (_proxy, conn, ch, stalled_at) = stalled_real_broker(|ch| {
        ch.queue_declare("", exclusive(), FieldTable::new())
            .unwrap();
    });
    bounded(
        "queue_declare through the stalled proxy",
        LIMIT,
        move || {
            let started = Instant::now();
            let result = ch.queue_declare(&unique("q"), exclusive(), FieldTable::new());
            let error = result.expect_err("no reply through the stall: the declare fails");
            assert_heartbeat_timeout(&error, started.elapsed());
            assert!(
                stalled_at.elapsed() < DEAD_AFTER * 2,
                "{:?} from the stall",
                stalled_at.elapsed()
            );
            assert_every_later_call_fails(&conn, &ch, |e| {
                matches!(e, Error::AmqpHeartbeatTimeout { .. })
            });
        },
    );
}

#[test]
fn a_publisher_without_confirms_behind_a_stalled_network_gets_the_heartbeat_timeout() {
    // basic_publish without confirms returns without waiting for the
    // broker, and the socket keeps taking bytes (kernel buffers) after the
    // network stalled: only the deadlines the publish itself keeps can tell
    // that the broker went silent. (Found by black-box testing: every
    // publish returned Ok for 86 s after the stall.)
    let (_proxy, conn, ch, stalled_at) = stalled_real_broker(|_| {});
    bounded("publishing through the stalled proxy", LIMIT, move || {
        let error = loop {
            let started = Instant::now();
            match ch.basic_publish("", "nowhere", b"x", &BasicProperties::default(), false) {
                Ok(()) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    assert_heartbeat_timeout(&e, started.elapsed());
                    break e;
                }
            }
        };
        assert!(
            stalled_at.elapsed() < DEAD_AFTER * 2,
            "{error} only {:?} after the stall",
            stalled_at.elapsed()
        );
        assert_every_later_call_fails(&conn, &ch, |e| {
            matches!(e, Error::AmqpHeartbeatTimeout { .. })
        });
    });
}

// ----------------------------------------------------------------------
// A reset while a publish waits for its confirm
// ----------------------------------------------------------------------

/// The fake broker's side of a channel in confirm mode.
fn confirm_channel(conn: &mut FakeConn) {
    open_channel(conn, rabbitmq_tune());
    conn.expect::<confirm::Select>(1);
    conn.send_method(1, confirm::SelectOk {});
}

/// Reads one publish (method, header, body) on channel 1; returns its body.
fn read_publish(conn: &mut FakeConn) -> Vec<u8> {
    conn.expect::<basic::Publish>(1);
    match conn.read_frame() {
        OwnedFrame::Header(1, header) if header.body_size == 0 => return Vec::new(),
        OwnedFrame::Header(1, _) => {}
        other => panic!("fake broker: expected the publish's header, got {other:?}"),
    }
    match conn.read_frame() {
        OwnedFrame::Body(1, body) => body,
        other => panic!("fake broker: expected the publish's body, got {other:?}"),
    }
}

/// Whether `e` is the stream lost to a reset (or to the write that found
/// the reset first).
fn is_reset(e: &Error) -> bool {
    matches!(e, Error::StreamLost { .. }) && e.is_connection_error()
}

#[test]
fn a_reset_while_basic_publish_waits_for_its_confirm_is_stream_lost() {
    let fake = Fake::start(|mut conn| {
        confirm_channel(&mut conn);
        let body = read_publish(&mut conn);
        conn.reset();
        body
    });
    let conn = BlockingConnection::new(fake.params()).unwrap();
    bounded("confirmed basic_publish", LIMIT, move || {
        let ch = conn.channel(None).unwrap();
        ch.confirm_delivery().unwrap();
        let result = ch.basic_publish("", "q", "unconfirmed", &BasicProperties::default(), false);
        match &result {
            Err(Error::StreamLost { source, detail }) => {
                assert!(
                    source.is_some(),
                    "a reset is an I/O error, not an end of file: {detail}"
                );
            }
            other => panic!("expected StreamLost, got {other:?}"),
        }
        assert_every_later_call_fails(&conn, &ch, is_reset);
    });
    assert_eq!(fake.finish(), b"unconfirmed");
}

#[test]
fn a_reset_under_a_window_of_publishes_reports_the_unconfirmed_ones_as_failed() {
    const N: u64 = 5;
    let fake = Fake::start(|mut conn| {
        confirm_channel(&mut conn);
        for _ in 0..N {
            read_publish(&mut conn);
        }
        // The first two are acked; the rest never are.
        conn.send_method(
            1,
            basic::Ack {
                delivery_tag: 2,
                multiple: true,
            },
        );
        conn.wait_until_sent(LIMIT);
        conn.reset();
    });
    let conn = BlockingConnection::new(fake.params()).unwrap();
    bounded("wait_for_confirms", LIMIT, move || {
        let ch = conn.channel(None).unwrap();
        ch.confirm_delivery().unwrap();
        let props = BasicProperties::default();
        let tags: Vec<u64> = (0..N)
            .map(|i| {
                ch.basic_publish_nowait("", "q", format!("m{i}"), &props, false)
                    .unwrap()
            })
            .collect();
        assert_eq!(tags, (1..=N).collect::<Vec<_>>());
        // As documented: the acked ones, and those whose fate is unknown
        // as failed; nothing left pending, nothing reported acked that was
        // not.
        let confirms = ch.wait_for_confirms(0).expect("the window is collected");
        assert_eq!(confirms.acked, [1, 2]);
        assert!(confirms.nacked.is_empty(), "{confirms:?}");
        assert_eq!(confirms.failed, [3, 4, 5]);
        assert!(confirms.returned.is_empty());
        // The next call says why: with nothing left to collect, the next
        // wait_for_confirms too.
        let again = ch.wait_for_confirms(0);
        assert!(
            matches!(&again, Err(e) if is_reset(e)),
            "the next wait_for_confirms reports the reset: {again:?}"
        );
        let next = ch.basic_publish_nowait("", "q", "late", &props, false);
        assert!(
            matches!(&next, Err(e) if is_reset(e)),
            "the next publish reports the reset: {next:?}"
        );
        assert_every_later_call_fails(&conn, &ch, is_reset);
    });
    fake.finish();
}

#[test]
fn a_real_broker_404_under_a_window_of_publishes_reports_them_failed_then_the_brokers_words() {
    bounded("wait_for_confirms", LIMIT, || {
        let conn = BlockingConnection::new(broker_params()).unwrap();
        let ch = conn.channel(None).unwrap();
        ch.confirm_delivery().unwrap();
        let missing = unique("missing-exchange");
        let props = BasicProperties::default();
        // RabbitMQ closes the channel (404) for a publish to an exchange
        // that does not exist; the publish is never confirmed.
        let tag = ch
            .basic_publish_nowait(&missing, "q", "lost", &props, false)
            .unwrap();
        let confirms = ch.wait_for_confirms(0).expect("the window is collected");
        assert_eq!(confirms.failed, [tag], "{confirms:?}");
        assert!(confirms.acked.is_empty() && confirms.nacked.is_empty());
        // The next call says why, in the broker's words; then wrong state.
        match ch.wait_for_confirms(0) {
            Err(Error::ChannelClosedByBroker {
                reply_code: 404,
                reply_text,
            }) => assert!(reply_text.contains(&missing), "{reply_text}"),
            other => panic!("expected ChannelClosedByBroker(404), got {other:?}"),
        }
        assert!(matches!(
            ch.wait_for_confirms(0),
            Err(Error::ChannelWrongState { .. })
        ));
        assert!(conn.is_open());
        conn.close(200, "done").unwrap();
    });
}

// ----------------------------------------------------------------------
// The broker's Connection.Close while a call waits
// ----------------------------------------------------------------------

/// A fake broker that, once the client sent what `until` reads, closes
/// the connection with `reply_code` and `reply_text`; returns the client's
/// frames from then on (its CloseOk first).
fn broker_closes_after(
    until: impl FnOnce(&mut FakeConn) + Send + 'static,
    reply_code: u16,
    reply_text: &'static str,
) -> Fake<Vec<OwnedFrame>> {
    Fake::start(move |mut conn| {
        until(&mut conn);
        conn.send_method(
            0,
            connection::Close {
                reply_code,
                reply_text: reply_text.into(),
                class_id: 0,
                method_id: 0,
            },
        );
        until_eof(&mut conn)
    })
}

/// Asserts that `error` is the broker's close with its words.
fn assert_closed_by_broker(error: &Error, code: u16, text: &str) {
    match error {
        Error::ConnectionClosedByBroker {
            reply_code,
            reply_text,
        } => {
            assert_eq!((*reply_code, reply_text.as_str()), (code, text));
        }
        other => panic!("expected ConnectionClosedByBroker({code}), got {other:?}"),
    }
    assert!(error.is_connection_closed() && error.is_connection_error());
}

/// Asserts that the client answered the broker's Close with CloseOk, and
/// sent nothing else.
fn assert_answered_with_close_ok(frames: &[OwnedFrame]) {
    let methods: Vec<&OwnedFrame> = frames
        .iter()
        .filter(|f| **f != OwnedFrame::Heartbeat)
        .collect();
    assert!(
        matches!(
            methods.as_slice(),
            [OwnedFrame::Method(0, Method::ConnectionCloseOk(_))]
        ),
        "the client answers with Connection.CloseOk alone: {:?}",
        names(frames)
    );
}

#[test]
fn a_broker_close_320_while_queue_declare_waits_is_the_calls_error_and_answered() {
    const TEXT: &str =
        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'";
    let fake = broker_closes_after(
        |conn| {
            open_channel(conn, rabbitmq_tune());
            conn.expect::<queue::Declare>(1);
        },
        320,
        TEXT,
    );
    let conn = BlockingConnection::new(fake.params()).unwrap();
    bounded("queue_declare", LIMIT, move || {
        let ch = conn.channel(None).unwrap();
        let error = ch
            .queue_declare("q", QueueDeclareOptions::default(), FieldTable::new())
            .expect_err("the broker closed instead of answering");
        assert_closed_by_broker(&error, 320, TEXT);
        assert_every_later_call_fails(&conn, &ch, |e| {
            matches!(
                e,
                Error::ConnectionClosedByBroker {
                    reply_code: 320,
                    ..
                }
            )
        });
    });
    assert_answered_with_close_ok(&fake.finish());
}

#[test]
fn a_broker_close_541_while_a_confirmed_publish_waits_is_the_calls_error_and_answered() {
    const TEXT: &str = "INTERNAL_ERROR";
    let fake = broker_closes_after(
        |conn| {
            confirm_channel(conn);
            read_publish(conn);
        },
        541,
        TEXT,
    );
    let conn = BlockingConnection::new(fake.params()).unwrap();
    bounded("confirmed basic_publish", LIMIT, move || {
        let ch = conn.channel(None).unwrap();
        ch.confirm_delivery().unwrap();
        let error = ch
            .basic_publish("", "q", "m", &BasicProperties::default(), false)
            .expect_err("the broker closed instead of confirming");
        assert_closed_by_broker(&error, 541, TEXT);
        assert_every_later_call_fails(&conn, &ch, |e| e.reply_code() == Some(541));
    });
    assert_answered_with_close_ok(&fake.finish());
}

// ----------------------------------------------------------------------
// The broker's Channel.Close while a call waits
// ----------------------------------------------------------------------

#[test]
fn a_real_broker_404_while_exchange_declare_waits_closes_only_that_channel() {
    bounded("passive exchange_declare", LIMIT, || {
        let conn = BlockingConnection::new(broker_params()).unwrap();
        let doomed = conn.channel(None).unwrap();
        let other = conn.channel(None).unwrap();
        let q = other
            .queue_declare("", exclusive(), FieldTable::new())
            .unwrap()
            .queue;
        other
            .basic_publish("", &q, "kept", &BasicProperties::default(), false)
            .unwrap();
        let missing = unique("missing-exchange");
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match doomed.exchange_declare(&missing, passive, FieldTable::new()) {
            Err(
                e @ Error::ChannelClosedByBroker {
                    reply_code: 404, ..
                },
            ) => {
                assert!(e.is_channel_closed() && e.is_channel_error(), "{e:?}");
                assert!(
                    e.reply_text().is_some_and(|t| t.contains(&missing)),
                    "the broker's text names the exchange: {e}"
                );
            }
            other => panic!("expected ChannelClosedByBroker(404), got {other:?}"),
        }
        assert!(doomed.is_closed());
        assert!(matches!(
            doomed.queue_declare("", exclusive(), FieldTable::new()),
            Err(Error::ChannelWrongState { .. })
        ));
        // The connection and its other channel go on.
        assert!(conn.is_open());
        let got = other.basic_get(&q, true).unwrap().expect("the message");
        assert_eq!(got.body, b"kept");
        let fresh = conn.channel(None).unwrap();
        fresh
            .queue_declare("", exclusive(), FieldTable::new())
            .unwrap();
        conn.close(200, "done").unwrap();
    });
}

#[test]
fn a_channel_close_while_basic_get_waits_is_the_calls_error_and_the_connection_goes_on() {
    const TEXT: &str = "NOT_FOUND - no queue 'gone' in vhost '/'";
    let fake = Fake::start(|mut conn| {
        open_channel(&mut conn, rabbitmq_tune());
        let get = conn.expect::<basic::Get>(1);
        assert_eq!(get.queue, "gone");
        conn.send_method(
            1,
            channel::Close {
                reply_code: 404,
                reply_text: TEXT.into(),
                class_id: 60,
                method_id: 70,
            },
        );
        conn.expect::<channel::CloseOk>(1);
        // A new channel, and a declare on it.
        let (number, method) = conn.read_method();
        assert!(
            matches!(method, Method::ChannelOpen(_)),
            "expected Channel.Open, got {method:?}"
        );
        conn.send_method(number, channel::OpenOk::default());
        let declare = conn.expect::<queue::Declare>(number);
        conn.send_method(
            number,
            queue::DeclareOk {
                queue: declare.queue,
                message_count: 0,
                consumer_count: 0,
            },
        );
        serve_close(conn)
    });
    let conn = BlockingConnection::new(fake.params()).unwrap();
    bounded("basic_get", LIMIT, move || {
        let ch = conn.channel(None).unwrap();
        match ch.basic_get("gone", false) {
            Err(Error::ChannelClosedByBroker {
                reply_code: 404,
                reply_text,
            }) => assert_eq!(reply_text, TEXT),
            other => panic!("expected ChannelClosedByBroker(404), got {other:?}"),
        }
        assert!(ch.is_closed());
        assert!(matches!(
            ch.basic_get("gone", false),
            Err(Error::ChannelWrongState { .. })
        ));
        assert!(matches!(
            ch.wait_for_confirms(0),
            Err(Error::ChannelWrongState { .. })
        ));
        assert!(conn.is_open());
        let fresh = conn.channel(None).unwrap();
        let ok = fresh
            .queue_declare("after", QueueDeclareOptions::default(), FieldTable::new())
            .unwrap();
        assert_eq!(ok.queue, "after");
        drop(fresh);
        conn.close(200, "done").unwrap();
    });
    fake.finish();
}

/// Processes I/O on `conn` until `ch` is closed (the broker's
/// Channel.Close received and answered), failing after a liveness bound.
fn until_closed(conn: &BlockingConnection, ch: &BlockingChannel) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ch.is_closed() {
        assert!(
            Instant::now() < deadline,
            "the broker's Channel.Close did not arrive"
        );
        conn.process_data_events(Some(Duration::from_millis(20)))
            .unwrap();
    }
}

#[test]
fn wait_for_confirms_on_a_closed_channel_whose_number_was_reused_fails_at_once() {
    bounded("wait_for_confirms on the old handle", LIMIT, || {
        let conn = BlockingConnection::new(broker_params()).unwrap();
        let old = conn.channel(None).unwrap();
        old.confirm_delivery().unwrap();
        // A publish to a missing exchange: the broker closes the channel
        // (404), and the publish is never confirmed.
        old.basic_publish_nowait(
            &unique("missing-exchange"),
            "q",
            "lost",
            &BasicProperties::default(),
            false,
        )
        .unwrap();
        until_closed(&conn, &old);
        let new = conn.channel(None).unwrap();
        assert_eq!(
            new.channel_number(),
            old.channel_number(),
            "the closed channel's number is reused"
        );
        let result = old.wait_for_confirms(0);
        assert!(
            matches!(result, Err(Error::ChannelWrongState { .. })),
            "{result:?}"
        );
        // The new channel is unaffected.
        new.queue_declare("", exclusive(), FieldTable::new())
            .unwrap();
        conn.close(200, "done").unwrap();
    });
}

#[test]
fn the_consume_iterator_of_a_closed_channel_whose_number_was_reused_ends_at_once() {
    bounded("consume() on the old handle", LIMIT, || {
        let conn = BlockingConnection::new(broker_params()).unwrap();
        let old = conn.channel(None).unwrap();
        let q = old
            .queue_declare("", exclusive(), FieldTable::new())
            .unwrap()
            .queue;
        let mut messages = old
            .consume(&q, false, false, FieldTable::new(), None)
            .unwrap();
        // An ack of a delivery tag never delivered: the broker closes the
        // channel (406).
        old.basic_ack(999, false).unwrap();
        until_closed(&conn, &old);
        let new = conn.channel(None).unwrap();
        assert_eq!(new.channel_number(), old.channel_number());
        match messages.next() {
            Some(Err(Error::ChannelWrongState { .. })) => {}
            other => panic!("expected the channel's end, got {other:?}"),
        }
        assert!(messages.next().is_none());
        assert!(matches!(
            old.start_consuming(),
            Err(Error::ChannelWrongState { .. })
        ));
        new.queue_declare("", exclusive(), FieldTable::new())
            .unwrap();
        conn.close(200, "done").unwrap();
    });
}

// ----------------------------------------------------------------------
// Malformed frames while a call waits
// ----------------------------------------------------------------------

/// A fake broker that, once the client sent what `until` reads, sends
/// `bytes`; returns the client's frames until it closed the socket.
fn broker_sends_after(
    until: impl FnOnce(&mut FakeConn) + Send + 'static,
    bytes: Vec<u8>,
) -> Fake<Vec<OwnedFrame>> {
    Fake::start(move |mut conn| {
        until(&mut conn);
        conn.send_raw(&bytes);
        until_eof(&mut conn)
    })
}

#[test]
fn a_bad_frame_end_while_queue_declare_waits_is_a_frame_error_naming_it() {
    let mut reply = method_frame(
        1,
        queue::DeclareOk {
            queue: "q".into(),
            ..Default::default()
        },
    );
    *reply.last_mut().unwrap() = 0x00;
    let fake = broker_sends_after(
        |conn| {
            open_channel(conn, rabbitmq_tune());
            conn.expect::<queue::Declare>(1);
        },
        reply,
    );
    let conn = BlockingConnection::new(fake.params()).unwrap();
    bounded("queue_declare", LIMIT, move || {
        let ch = conn.channel(None).unwrap();
        let error = ch
            .queue_declare("q", QueueDeclareOptions::default(), FieldTable::new())
            .expect_err("the reply's frame is malformed");
        assert!(
            matches!(
                &error,
                Error::Protocol(CodecError::BadFrameEnd {
                    found: 0x00,
                    frame_type: 1,
                    channel: 1
                })
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("frame-end"), "{error}");
        assert_eq!(error.reply_code(), Some(501));
        assert_every_later_call_fails(&conn, &ch, |e| matches!(e, Error::Protocol(_)));
    });
    assert_closed_with(&fake.finish(), 501);
}

#[test]
fn an_unknown_frame_type_while_basic_get_waits_is_a_frame_error_naming_it() {
    let fake = broker_sends_after(
        |conn| {
            open_channel(conn, rabbitmq_tune());
            conn.expect::<basic::Get>(1);
        },
        vec![9, 0, 1, 0, 0, 0, 0, 0xCE],
    );
    let conn = BlockingConnection::new(fake.params()).unwrap();
    bounded("basic_get", LIMIT, move || {
        let ch = conn.channel(None).unwrap();
        let error = ch
            .basic_get("q", false)
            .expect_err("the broker sent an unknown frame type");
        assert!(
            matches!(
                &error,
                Error::Protocol(CodecError::UnknownFrameType {
                    frame_type: 9,
                    channel: 1
                })
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("unknown frame type 9"),
            "{error}"
        );
        assert_eq!(error.reply_code(), Some(501));
        assert_every_later_call_fails(&conn, &ch, |e| matches!(e, Error::Protocol(_)));
    });
    assert_closed_with(&fake.finish(), 501);
}

#[test]
fn a_body_without_a_header_during_start_consuming_is_an_unexpected_frame_naming_it() {
    let mut body = Vec::new();
    encode_body(&mut body, 1, b"orphan", 0);
    let fake = broker_sends_after(
        |conn| {
            open_channel(conn, rabbitmq_tune());
            accept_consumer(conn);
        },
        body,
    );
    let conn = BlockingConnection::new(fake.params()).unwrap();
    bounded("start_consuming", LIMIT, move || {
        let ch = conn.channel(None).unwrap();
        let delivered = Arc::new(AtomicUsize::new(0));
        let d = delivered.clone();
        ch.basic_consume(
            "q",
            move |_, _| {
                d.fetch_add(1, Ordering::SeqCst);
            },
            BasicConsumeOptions::default(),
        )
        .unwrap();
        let error = ch
            .start_consuming()
            .expect_err("the broker sent a body with no header");
        assert!(
            matches!(
                &error,
                Error::UnexpectedFrame { detail } if detail.contains("without a content header")
            ),
            "{error:?}"
        );
        assert_eq!(error.reply_code(), Some(505));
        assert_eq!(delivered.load(Ordering::SeqCst), 0, "nothing was delivered");
        assert_every_later_call_fails(&conn, &ch, |e| matches!(e, Error::UnexpectedFrame { .. }));
    });
    assert_closed_with(&fake.finish(), 505);
}

// ----------------------------------------------------------------------
// A panicking callback
// ----------------------------------------------------------------------

/// The text of a panic's payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".into())
}

#[test]
fn a_consumer_callback_that_panics_propagates_out_of_start_consuming_and_the_consumer_lives_on() {
    bounded("start_consuming with a panicking callback", LIMIT, || {
        let conn = BlockingConnection::new(broker_params()).unwrap();
        let ch = conn.channel(None).unwrap();
        let q = ch
            .queue_declare("", exclusive(), FieldTable::new())
            .unwrap()
            .queue;
        let props = BasicProperties::default();
        for body in ["boom", "one", "two"] {
            ch.basic_publish("", &q, body, &props, false).unwrap();
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        ch.basic_consume(
            &q,
            move |ch, d| {
                let body = String::from_utf8(d.body).unwrap();
                if body == "boom" {
                    panic!("the consumer callback fails on {body}");
                }
                ch.basic_ack(d.method.delivery_tag, false).unwrap();
                let mut seen = s.lock().unwrap();
                seen.push(body);
                if seen.len() == 2 {
                    ch.stop_consuming(None).unwrap();
                }
            },
            BasicConsumeOptions::default(),
        )
        .unwrap();
        // A panic in the application's own closure is the application's:
        // it propagates out of the call that ran it.
        let payload = catch_unwind(AssertUnwindSafe(|| ch.start_consuming()))
            .expect_err("the callback's panic propagates out of start_consuming");
        assert_eq!(panic_text(&*payload), "the consumer callback fails on boom");
        // Nothing is wedged: the connection, the channel and the consumer
        // go on, and the messages queued behind the panic reach the
        // callback.
        assert!(conn.is_open() && ch.is_open());
        assert_eq!(ch.consumer_tags().len(), 1, "the consumer is still there");
        ch.start_consuming()
            .expect("start_consuming goes on after the panic");
        assert_eq!(*seen.lock().unwrap(), ["one", "two"]);
        // The message the panicking callback held was never acked: it is
        // not lost, the channel's close puts it back in the queue.
        ch.close(200, "done").unwrap();
        let after = conn.channel(None).unwrap();
        let back = after
            .basic_get(&q, true)
            .unwrap()
            .expect("the message is back");
        assert_eq!(back.body, b"boom");
        assert!(back.method.redelivered);
        conn.close(200, "done").unwrap();
    });
}

#[test]
fn a_return_callback_that_panics_propagates_and_the_next_return_still_reaches_it() {
    bounded(
        "process_data_events with a panicking return callback",
        LIMIT,
        || {
            let conn = BlockingConnection::new(broker_params()).unwrap();
            let ch = conn.channel(None).unwrap();
            let returned = Arc::new(Mutex::new(Vec::new()));
            let r = returned.clone();
            ch.add_on_return_callback(move |_, m| {
                let body = String::from_utf8(m.body.clone()).unwrap();
                if body == "boom" {
                    panic!("the return callback fails on {body}");
                }
                r.lock().unwrap().push(body);
            });
            let props = BasicProperties::default();
            let nowhere = unique("unroutable");
            for body in ["boom", "next"] {
                ch.basic_publish("", &nowhere, body, &props, true).unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            let payload = loop {
                assert!(Instant::now() < deadline, "the return never came");
                let run = catch_unwind(AssertUnwindSafe(|| {
                    conn.process_data_events(Some(Duration::from_millis(50)))
                }));
                match run {
                    Ok(result) => result.unwrap(),
                    Err(payload) => break payload,
                }
            };
            assert_eq!(panic_text(&*payload), "the return callback fails on boom");
            while returned.lock().unwrap().is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "the return after the panic never reached the callback"
                );
                conn.process_data_events(Some(Duration::from_millis(50)))
                    .unwrap();
            }
            assert_eq!(*returned.lock().unwrap(), ["next"]);
            assert!(conn.is_open() && ch.is_open());
            conn.close(200, "done").unwrap();
        },
    );
}

// ----------------------------------------------------------------------
// A broker that stops reading while the application publishes
// ----------------------------------------------------------------------

/// The test binary's allocator: the system's, counting per thread the
/// bytes that thread's allocations hold (allocated less freed, reallocs
/// included) and the peak of that count. The process's RSS would not do:
/// it is shared with the tests running alongside (a panic's backtrace
/// alone loads ~100 MiB of debug info).
struct CountingAllocator;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

thread_local! {
    /// Bytes held by this thread's allocations.
    static HELD: Cell<i64> = const { Cell::new(0) };
    /// The highest `HELD` since [`reset_peak`].
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

/// Adds `delta` to this thread's count (nothing while its thread-locals
/// are being torn down).
fn count(delta: i64) {
    let _ = HELD.try_with(|held| {
        let now = held.get() + delta;
        held.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counting touches only `const`-initialized thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Starts a new peak for this thread's count; returns the count now.
fn reset_peak() -> i64 {
    let now = HELD.with(Cell::get);
    PEAK.with(|peak| peak.set(now));
    now
}

/// The highest count of this thread since [`reset_peak`].
fn peak() -> i64 {
    PEAK.with(Cell::get)
}

/// The largest buffer the kernel may give one TCP socket in `which`
/// direction (`wmem` or `rmem`): the third value of
/// `/proc/sys/net/ipv4/tcp_<which>`.
fn tcp_buffer_max(which: &str) -> u64 {
    let path = format!("/proc/sys/net/ipv4/tcp_{which}");
    let values = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    values
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{path}: three numbers expected, got {values:?}"))
}

#[test]
fn a_broker_that_stops_reading_blocks_publishing_at_high_water_until_the_heartbeat_timeout() {
    const HIGH_WATER: u64 = 16 << 20;
    const MESSAGE: usize = 64 * 1024;
    static BODY: [u8; MESSAGE] = [0x5a; MESSAGE];
    let proxy = Proxy::start(common::broker_addr());
    let mut params = proxied_params(&proxy);
    params.set_heartbeat(HEARTBEAT.as_secs() as u16);
    let conn = BlockingConnection::new(params).expect("the broker is reachable");
    let ch = conn.channel(None).unwrap();
    for dir in Direction::BOTH {
        proxy.stall(dir);
    }
    let stalled_at = Instant::now();
    let (accepted, error, grown) = bounded("the publish loop", LIMIT, move || {
        let props = BasicProperties::default();
        let mut accepted: u64 = 0;
        // The outbound buffer grows in the publishing thread: in
        // basic_publish, under the connection's lock.
        let before = reset_peak();
        let error = loop {
            match ch.basic_publish("", "nowhere", BODY, &props, false) {
                Ok(()) => accepted += MESSAGE as u64,
                Err(e) => break e,
            }
            assert!(
                accepted < 1 << 30,
                "basic_publish took 1 GiB without blocking"
            );
        };
        let grown = (peak() - before).max(0) as u64;
        assert!(conn.is_closed());
        assert!(matches!(
            ch.basic_publish("", "nowhere", BODY, &props, false),
            Err(Error::AmqpHeartbeatTimeout { .. })
        ));
        (accepted, error, grown)
    });
    let took = stalled_at.elapsed();
    assert!(
        matches!(error, Error::AmqpHeartbeatTimeout { .. }),
        "the loop ends with the heartbeat timeout: {error:?}"
    );
    assert!(
        took < DEAD_AFTER * 2,
        "the publish loop ended {took:?} after the stall (bound {DEAD_AFTER:?})"
    );
    // What publishing took: the outbound buffer up to high water and one
    // message, plus what the kernel holds (our send buffer, the proxy's
    // receive buffer, one chunk the proxy read before it stalled).
    let kernel = tcp_buffer_max("wmem") + tcp_buffer_max("rmem") + 64 * 1024;
    let bound = HIGH_WATER + MESSAGE as u64 + kernel;
    assert!(
        accepted <= bound,
        "basic_publish accepted {accepted} bytes into a stalled connection (bound {bound})"
    );
    assert!(
        accepted >= HIGH_WATER,
        "publishing blocked after {accepted} bytes, before the high-water mark"
    );
    // What the client held for it: the outbound buffer, whose capacity
    // may be up to twice the length it needed (high water, one message and
    // its framing), and a few small allocations.
    let held_bound = 2 * (HIGH_WATER + MESSAGE as u64 + 4096) + (1 << 20);
    assert!(
        grown <= held_bound,
        "publishing into a stalled connection held up to {grown} bytes (bound {held_bound})"
    );
}

#[test]
fn a_publisher_at_high_water_resumes_as_soon_as_the_socket_drains_without_heartbeats() {
    // Without heartbeats the poller has no deadline: a high-water wait that
    // slept in it after its own write had already drained the buffer (a
    // publisher reads nothing) never woke. The proxy's stalls make the
    // socket fill and drain again and again; the old code hung in about
    // three runs of four (the window is a race), this one never does.
    const MESSAGE: usize = 64 * 1024;
    const MESSAGES: usize = 1_600;
    const ROUNDS: usize = 3;
    static BODY: [u8; MESSAGE] = [0x3c; MESSAGE];
    let proxy = Arc::new(Proxy::start(common::broker_addr()));
    let mut params = proxied_params(&proxy);
    params.set_heartbeat(0);
    let conn = BlockingConnection::new(params).expect("the broker is reachable");
    conn.set_outbound_watermarks(256 << 10, 64 << 10).unwrap();
    let ch = conn.channel(None).unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let toggler = {
        let (proxy, done) = (proxy.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                proxy.stall(Direction::ClientToBroker);
                std::thread::sleep(Duration::from_millis(5));
                proxy.resume(Direction::ClientToBroker);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let published = bounded("publishing through a stalling proxy", LIMIT, move || {
        let props = BasicProperties::default();
        for _ in 0..ROUNDS * MESSAGES {
            ch.basic_publish("", "nowhere", BODY, &props, false)
                .unwrap();
        }
        // A round trip: every publish reached the broker.
        ch.basic_qos(0, 0, false).unwrap();
        conn.close(200, "done").unwrap();
        ROUNDS * MESSAGES
    });
    done.store(true, Ordering::SeqCst);
    toggler.join().unwrap();
    assert_eq!(published, ROUNDS * MESSAGES);
    assert!(proxy.bytes(Direction::ClientToBroker) >= (MESSAGE * ROUNDS * MESSAGES) as u64);
}
