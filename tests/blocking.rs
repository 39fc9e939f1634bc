//! The blocking face against the real broker: every name of pika's
//! BlockingConnection and BlockingChannel with its reply checked, the
//! consume() generator, confirms one at a time and in a window,
//! UnroutableError and NackError, callbacks dispatched only inside
//! process_data_events, reentrancy, other threads, heartbeats while
//! sleeping, Drop, and the errors of a closed channel or connection.
//!
//! Every test uses its own uniquely named or exclusive queues, so they run
//! in parallel. Waits are liveness deadlines only.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bounded, broker_connection_info, broker_params, rabbitmqctl};
use pika::{
    BasicConsumeOptions, BasicProperties, BlockingChannel, BlockingConnection, Delivery, Error,
    ExchangeDeclareOptions, FieldTable, Heartbeat, QueueDeclareOptions, QueueDeleteOptions,
};

fn unique(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "pika-rs.blocking.{what}.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn connect() -> BlockingConnection {
    BlockingConnection::new(broker_params()).expect("the broker is reachable")
}

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

/// An exclusive, server-named queue on `ch`.
fn temp_queue(ch: &BlockingChannel) -> String {
    ch.queue_declare("", exclusive(), FieldTable::new())
        .unwrap()
        .queue
}

/// How many ready messages `queue` holds (a passive declare).
fn depth(ch: &BlockingChannel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue, passive, FieldTable::new())
        .unwrap()
        .message_count
}

/// Polls `cond` on the connection (processing I/O) until it holds, failing
/// after a generous bound.
fn until(conn: &BlockingConnection, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 15 s"
        );
        conn.process_data_events(Some(Duration::from_millis(20)))
            .unwrap();
    }
}

// ----------------------------------------------------------------------
// The connection
// ----------------------------------------------------------------------

#[test]
fn the_handles_are_send() {
    fn assert_send<T: Send>() {}
    assert_send::<BlockingConnection>();
    assert_send::<BlockingChannel>();
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<pika::blocking::BlockingConnectionHandle>();
    assert_send_sync::<pika::AckHandle>();
}

#[test]
fn a_connection_opens_reports_the_broker_and_closes() {
    let conn = connect();
    assert!(conn.is_open() && !conn.is_closed());
    assert!(conn.publisher_confirms_supported() && conn.publisher_confirms());
    assert!(conn.basic_nack_supported() && conn.basic_nack());
    assert!(conn.consumer_cancel_notify_supported() && conn.consumer_cancel_notify());
    assert!(conn.exchange_exchange_bindings_supported() && conn.exchange_exchange_bindings());
    let props = conn.server_properties();
    assert_eq!(
        props.get("product").and_then(pika::FieldValue::as_str),
        Some("RabbitMQ")
    );
    conn.close(200, "done").unwrap();
    assert!(conn.is_closed() && !conn.is_open());
    assert!(matches!(
        conn.close(200, "again"),
        Err(Error::ConnectionWrongState { .. })
    ));
    assert!(matches!(
        conn.channel(None),
        Err(Error::ConnectionClosedByClient { .. })
    ));
}

#[test]
fn a_list_of_hosts_falls_back_to_the_reachable_one() {
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut dead = broker_params();
    dead.set_host("127.0.0.1")
        .unwrap()
        .set_port(dead_port)
        .unwrap();
    let good = broker_params();
    let port = good.port();
    let hosts = vec![dead, good];
    // A borrowed list works too (and leaves the list to the caller).
    let conn = BlockingConnection::new(&hosts).unwrap();
    assert_eq!(conn.params().port(), port);
    assert_eq!(conn.peer_address().map(|a| a.port()), Some(port));
    drop(conn);
    let conn = BlockingConnection::new(hosts).unwrap();
    assert_eq!(conn.params().port(), port);
    // Only the dead one: the error names it.
    let mut dead = broker_params();
    dead.set_host("127.0.0.1")
        .unwrap()
        .set_port(dead_port)
        .unwrap();
    match BlockingConnection::new(dead) {
        Err(e @ Error::Connect { .. }) => {
            assert!(e.is_connection_error());
            assert!(e.to_string().contains(&dead_port.to_string()), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_wrong_password_and_an_unknown_vhost_are_the_probable_errors() {
    let mut params = broker_params();
    params.set_credentials(pika::PlainCredentials::new("guest", "wrong-password"));
    assert!(matches!(
        BlockingConnection::new(params),
        Err(Error::ProbableAuthenticationError { .. })
    ));
    let mut params = broker_params();
    params.set_virtual_host("no-such-vhost").unwrap();
    assert!(matches!(
        BlockingConnection::new(params),
        Err(Error::ProbableAccessDeniedError { .. })
    ));
}

#[test]
fn dropping_a_connection_closes_it_on_the_broker() {
    let conn = connect();
    let port = conn.local_address().unwrap().port();
    assert!(broker_connection_info(port, &["name"]).is_some());
    let ch = conn.channel(None).unwrap();
    drop(ch);
    drop(conn);
    // The broker lists it no more (it may take a moment to forget it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker_connection_info(port, &["name"]).is_some() {
        assert!(Instant::now() < deadline, "the broker still lists it");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_connection_moves_to_another_thread() {
    let conn = connect();
    let worker = std::thread::spawn(move || {
        let ch = conn.channel(None).unwrap();
        let q = temp_queue(&ch);
        ch.basic_publish("", &q, "from a worker", &BasicProperties::default(), false)
            .unwrap();
        let m = ch.basic_get(&q, true).unwrap().unwrap();
        conn.close(200, "done").unwrap();
        m.body
    });
    assert_eq!(worker.join().unwrap(), b"from a worker");
}

#[test]
fn timers_and_threadsafe_callbacks_run_inside_process_data_events_only() {
    let conn = connect();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    conn.call_later(Duration::from_millis(50), move |_| {
        l.lock().unwrap().push("timer")
    });
    let l = log.clone();
    let cancelled = conn.call_later(Duration::from_millis(10), move |_| {
        l.lock().unwrap().push("cancelled timer")
    });
    assert!(conn.remove_timeout(cancelled));
    assert!(!conn.remove_timeout(cancelled));
    let handle = conn.threadsafe_handle();
    let l = log.clone();
    std::thread::spawn(move || {
        handle
            .add_callback_threadsafe(move |_| l.lock().unwrap().push("threadsafe"))
            .unwrap()
    })
    .join()
    .unwrap();
    // pika's name on the connection itself (from its own thread).
    let l = log.clone();
    conn.add_callback_threadsafe(move |_| l.lock().unwrap().push("on the connection"))
        .unwrap();
    // A blocking call in between dispatches nothing.
    let ch = conn.channel(None).unwrap();
    std::thread::sleep(Duration::from_millis(80));
    temp_queue(&ch);
    assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
    // sleep (process_data_events) runs both.
    conn.sleep(Duration::from_millis(100)).unwrap();
    let mut seen = log.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, ["on the connection", "threadsafe", "timer"]);
    conn.close(200, "done").unwrap();
    assert!(matches!(
        conn.threadsafe_handle().add_callback_threadsafe(|_| {}),
        Err(Error::ConnectionWrongState { .. })
    ));
    assert!(matches!(
        conn.add_callback_threadsafe(|_| {}),
        Err(Error::ConnectionWrongState { .. })
    ));
}

#[test]
fn process_data_events_with_zero_returns_at_once_and_with_none_waits_for_an_event() {
    let conn = connect();
    let started = Instant::now();
    conn.process_data_events(Some(Duration::ZERO)).unwrap();
    conn.process_data_events(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(100));
    let fired = Arc::new(Mutex::new(false));
    let f = fired.clone();
    conn.call_later(Duration::from_millis(50), move |_| {
        *f.lock().unwrap() = true
    });
    conn.process_data_events(None).unwrap();
    assert!(*fired.lock().unwrap(), "None waited for the timer");
}

#[test]
fn heartbeats_keep_flowing_while_the_application_sleeps() {
    let mut params = broker_params();
    params.set_heartbeat(Heartbeat::Timeout(1));
    let conn = BlockingConnection::new(params).unwrap();
    assert_eq!(conn.heartbeat(), 1);
    // Three timeouts of sleep: the broker would drop a silent client after
    // about two.
    conn.sleep(Duration::from_secs(3)).unwrap();
    let ch = conn.channel(None).unwrap();
    temp_queue(&ch);
    assert!(conn.is_open());
}

#[test]
fn an_application_that_does_not_call_in_is_dropped_by_the_broker_after_the_heartbeat_timeout() {
    // Documented behaviour: no thread answers heartbeats between calls.
    let mut params = broker_params();
    params.set_heartbeat(Heartbeat::Timeout(1));
    let conn = BlockingConnection::new(params).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let result = conn.channel(None).map(|_| ());
    assert!(
        matches!(
            &result,
            Err(e) if e.is_connection_error()
        ),
        "the broker dropped the silent connection: {result:?}"
    );
}

#[test]
fn update_secret_is_accepted() {
    let conn = connect();
    let (_, password) = common::broker_credentials();
    conn.update_secret(&password, "rotation").unwrap();
    assert!(conn.is_open());
}

// ----------------------------------------------------------------------
// Channel requests
// ----------------------------------------------------------------------

#[test]
fn every_request_returns_the_brokers_reply() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    assert!(ch.is_open() && !ch.is_closed());
    assert_eq!(ch.channel_number(), 1);
    let (x1, x2, q) = (unique("x1"), unique("x2"), unique("q"));
    let fanout = ExchangeDeclareOptions {
        exchange_type: "fanout".into(),
        auto_delete: true,
        ..Default::default()
    };
    ch.exchange_declare(&x1, fanout.clone(), FieldTable::new())
        .unwrap();
    ch.exchange_declare(&x2, fanout, FieldTable::new()).unwrap();
    ch.exchange_bind(&x2, &x1, "", FieldTable::new()).unwrap();
    let ok = ch
        .queue_declare(&q, exclusive(), FieldTable::new())
        .unwrap();
    assert_eq!((ok.queue.as_str(), ok.message_count), (q.as_str(), 0));
    ch.queue_bind(&q, &x2, None, FieldTable::new()).unwrap();
    // Through x1 -> x2 -> q.
    ch.basic_publish(
        &x1,
        "any",
        "via two exchanges",
        &BasicProperties::default(),
        false,
    )
    .unwrap();
    until(&conn, "the message arrives", || depth(&ch, &q) == 1);
    assert_eq!(ch.queue_purge(&q).unwrap().message_count, 1);
    ch.queue_unbind(&q, &x2, None, FieldTable::new()).unwrap();
    ch.exchange_unbind(&x2, &x1, "", FieldTable::new()).unwrap();
    ch.basic_qos(0, 10, false).unwrap();
    ch.basic_prefetch(5).unwrap();
    ch.basic_recover(true).unwrap();
    assert!(ch.flow(true).unwrap());
    ch.tx_select().unwrap();
    ch.basic_publish(
        "",
        &q,
        "in a transaction",
        &BasicProperties::default(),
        false,
    )
    .unwrap();
    ch.tx_rollback().unwrap();
    assert_eq!(depth(&ch, &q), 0, "rolled back");
    ch.basic_publish("", &q, "committed", &BasicProperties::default(), false)
        .unwrap();
    ch.tx_commit().unwrap();
    assert_eq!(depth(&ch, &q), 1);
    assert_eq!(
        ch.queue_delete(&q, QueueDeleteOptions::default())
            .unwrap()
            .message_count,
        1
    );
    ch.exchange_delete(&x2, false).unwrap();
    ch.exchange_delete(&x1, false).unwrap();
    ch.close(200, "done").unwrap();
    assert!(ch.is_closed());
    assert!(matches!(
        ch.close(200, "again"),
        Err(Error::ChannelWrongState { .. })
    ));
    conn.close(200, "done").unwrap();
}

#[test]
fn a_broker_channel_close_is_reported_by_the_call_that_saw_it_then_wrong_state() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match ch.queue_declare(&unique("missing"), passive, FieldTable::new()) {
        Err(
            e @ Error::ChannelClosedByBroker {
                reply_code: 404, ..
            },
        ) => {
            assert!(e.is_channel_error() && e.is_channel_closed())
        }
        other => panic!("{other:?}"),
    }
    assert!(ch.is_closed());
    assert!(matches!(
        ch.queue_declare("", exclusive(), FieldTable::new()),
        Err(Error::ChannelWrongState { .. })
    ));
    assert!(matches!(
        ch.basic_publish("", "q", "x", &BasicProperties::default(), false),
        Err(Error::ChannelWrongState { .. })
    ));
    // The connection goes on.
    let other = conn.channel(None).unwrap();
    temp_queue(&other);
    conn.close(200, "done").unwrap();
}

#[test]
fn basic_get_returns_the_message_or_none_and_acks_nacks_rejects_settle() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    assert!(ch.basic_get(&q, false).unwrap().is_none());
    for body in ["a", "b", "c", "d"] {
        ch.basic_publish("", &q, body, &BasicProperties::persistent(), false)
            .unwrap();
    }
    let a = ch.basic_get(&q, false).unwrap().unwrap();
    assert_eq!(a.body, b"a");
    assert_eq!(a.method.message_count, 3);
    assert_eq!(
        a.properties.persistence(),
        Some(pika::DeliveryMode::Persistent)
    );
    ch.basic_ack(a.method.delivery_tag, false).unwrap();
    let b = ch.basic_get(&q, false).unwrap().unwrap();
    ch.basic_nack(b.method.delivery_tag, false, true).unwrap();
    let b_again = ch.basic_get(&q, false).unwrap().unwrap();
    assert!(b_again.method.redelivered);
    ch.basic_reject(b_again.method.delivery_tag, false).unwrap();
    let c = ch.basic_get(&q, true).unwrap().unwrap();
    assert_eq!(c.body, b"c");
    assert_eq!(depth(&ch, &q), 1);
    conn.close(200, "done").unwrap();
}

// ----------------------------------------------------------------------
// Publishing with confirms
// ----------------------------------------------------------------------

#[test]
fn a_confirmed_publish_waits_and_unroutable_or_nacked_ones_are_errors() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    ch.confirm_delivery().unwrap();
    assert!(matches!(
        ch.confirm_delivery(),
        Err(Error::InvalidParameter { .. })
    ));
    let q = temp_queue(&ch);
    ch.basic_publish("", &q, "routed", &BasicProperties::default(), true)
        .unwrap();
    match ch.basic_publish(
        "",
        &unique("nowhere"),
        "lost",
        &BasicProperties::default(),
        true,
    ) {
        Err(Error::UnroutableError { messages }) => {
            assert_eq!(messages.len(), 1);
            assert_eq!(messages[0].body, b"lost");
            assert_eq!(messages[0].method.reply_code, 312);
        }
        other => panic!("{other:?}"),
    }
    // Without mandatory an unroutable message is simply acked.
    ch.basic_publish(
        "",
        &unique("nowhere"),
        "dropped",
        &BasicProperties::default(),
        false,
    )
    .unwrap();
    // x-max-length 0 with reject-publish: the broker nacks.
    let mut args = FieldTable::new();
    args.insert("x-max-length", 0i32);
    args.insert("x-overflow", "reject-publish");
    let full = ch.queue_declare("", exclusive(), args).unwrap().queue;
    match ch.basic_publish("", &full, "no room", &BasicProperties::default(), false) {
        Err(Error::NackError { delivery_tags }) => assert_eq!(delivery_tags.len(), 1),
        other => panic!("{other:?}"),
    }
    // And the channel goes on.
    ch.basic_publish("", &q, "after", &BasicProperties::default(), false)
        .unwrap();
    assert_eq!(depth(&ch, &q), 2);
    conn.close(200, "done").unwrap();
}

#[test]
fn a_window_of_publishes_is_confirmed_by_wait_for_confirms() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    assert!(matches!(
        ch.basic_publish_nowait("", &q, "x", &BasicProperties::default(), false),
        Err(Error::InvalidParameter { .. })
    ));
    ch.confirm_delivery().unwrap();
    let mut acked = Vec::new();
    let mut tags = Vec::new();
    for i in 0..2_000u32 {
        tags.push(
            ch.basic_publish_nowait("", &q, i.to_be_bytes(), &BasicProperties::default(), false)
                .unwrap(),
        );
        let confirms = ch.wait_for_confirms(100).unwrap();
        assert!(confirms.nacked.is_empty() && confirms.failed.is_empty());
        acked.extend(confirms.acked);
    }
    let rest = ch.wait_for_confirms(0).unwrap();
    acked.extend(rest.acked);
    acked.sort_unstable();
    assert_eq!(acked, tags, "every tag acked once");
    assert_eq!(depth(&ch, &q), 2_000);
    // Returns in the window come back with the confirms.
    ch.basic_publish_nowait(
        "",
        &unique("nowhere"),
        "r",
        &BasicProperties::default(),
        true,
    )
    .unwrap();
    let c = ch.wait_for_confirms(0).unwrap();
    assert_eq!(c.acked.len(), 1);
    assert_eq!(c.returned.len(), 1);
    conn.close(200, "done").unwrap();
}

// ----------------------------------------------------------------------
// Consumers with callbacks
// ----------------------------------------------------------------------

#[test]
fn start_consuming_dispatches_until_stop_consuming_from_a_callback() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    for i in 0..10u8 {
        ch.basic_publish("", &q, [i], &BasicProperties::default(), false)
            .unwrap();
    }
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let tag = ch
        .basic_consume(
            &q,
            move |ch, d: Delivery| {
                g.lock().unwrap().push(d.body[0]);
                ch.basic_ack(d.method.delivery_tag, false).unwrap();
                if d.body[0] == 9 {
                    ch.stop_consuming(None).unwrap();
                }
            },
            BasicConsumeOptions::default(),
        )
        .unwrap();
    assert_eq!(ch.consumer_tags(), [tag]);
    // Nothing is dispatched outside process_data_events.
    temp_queue(&ch);
    assert!(got.lock().unwrap().is_empty());
    ch.start_consuming().unwrap();
    assert_eq!(*got.lock().unwrap(), (0..10).collect::<Vec<u8>>());
    assert!(ch.consumer_tags().is_empty());
    assert_eq!(depth(&ch, &q), 0);
    conn.close(200, "done").unwrap();
}

#[test]
fn inside_a_callback_every_method_works_but_start_consuming_is_reentrancy() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let (q, replies) = (temp_queue(&ch), temp_queue(&ch));
    ch.basic_publish("", &replies, "waiting", &BasicProperties::default(), false)
        .unwrap();
    ch.basic_publish("", &q, "request", &BasicProperties::default(), false)
        .unwrap();
    let outcome = Arc::new(Mutex::new(Vec::<String>::new()));
    let o = outcome.clone();
    let r = replies.clone();
    ch.basic_consume(
        &q,
        move |ch, d| {
            let mut o = o.lock().unwrap();
            // publish (tutorial 6's RPC server), queue_declare, basic_get, ack.
            ch.basic_publish("", &r, "reply", &BasicProperties::default(), false)
                .unwrap();
            o.push(format!(
                "declared {}",
                ch.queue_declare("", exclusive(), FieldTable::new()).is_ok()
            ));
            let got = ch.basic_get(&r, true).unwrap().map(|m| m.body);
            o.push(format!(
                "got {:?}",
                got.map(|b| String::from_utf8(b).unwrap())
            ));
            ch.basic_ack(d.method.delivery_tag, false).unwrap();
            match ch.start_consuming() {
                Err(Error::ReentrancyError { .. }) => o.push("reentrancy".into()),
                other => o.push(format!("{other:?}")),
            }
            ch.stop_consuming(None).unwrap();
        },
        BasicConsumeOptions::default(),
    )
    .unwrap();
    ch.start_consuming().unwrap();
    assert_eq!(
        *outcome.lock().unwrap(),
        ["declared true", "got Some(\"waiting\")", "reentrancy"]
    );
    assert_eq!(depth(&ch, &replies), 1, "the reply was published");
    conn.close(200, "done").unwrap();
}

#[test]
fn stop_consuming_from_another_thread_through_the_threadsafe_handle() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    ch.basic_consume(&q, |_, _| {}, BasicConsumeOptions::default())
        .unwrap();
    let handle = conn.threadsafe_handle();
    let number = ch.channel_number();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        handle
            .add_callback_threadsafe(move |conn| {
                conn.channel_by_number(number)
                    .unwrap()
                    .stop_consuming(None)
                    .unwrap()
            })
            .unwrap();
    });
    ch.start_consuming().unwrap();
    stopper.join().unwrap();
    assert!(ch.is_open());
    conn.close(200, "done").unwrap();
}

#[test]
fn a_deleted_queue_fires_the_cancel_callback_and_start_consuming_returns() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = unique("deleted");
    ch.queue_declare(&q, QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    let cancelled = Arc::new(Mutex::new(Vec::new()));
    let c = cancelled.clone();
    ch.add_on_cancel_callback(move |_, cancel| c.lock().unwrap().push(cancel.consumer_tag.clone()));
    let tag = ch
        .basic_consume(&q, |_, _| {}, BasicConsumeOptions::default())
        .unwrap();
    let other = conn.channel(None).unwrap();
    other
        .queue_delete(&q, QueueDeleteOptions::default())
        .unwrap();
    ch.start_consuming().unwrap();
    assert_eq!(*cancelled.lock().unwrap(), [tag]);
    conn.close(200, "done").unwrap();
}

#[test]
fn deliveries_queued_before_a_broker_cancel_still_reach_the_callback() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = unique("cancelled-with-backlog");
    ch.queue_declare(&q, QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let o = order.clone();
    ch.add_on_cancel_callback(move |_, _| o.lock().unwrap().push("cancel".into()));
    let o = order.clone();
    let auto = BasicConsumeOptions {
        auto_ack: true,
        ..Default::default()
    };
    ch.basic_consume(
        &q,
        move |_, d| o.lock().unwrap().push(format!("message {}", d.body[0])),
        auto,
    )
    .unwrap();
    let other = conn.channel(None).unwrap();
    for i in 0..3u8 {
        other
            .basic_publish("", &q, [i], &BasicProperties::default(), false)
            .unwrap();
    }
    // Wait (RPCs on the other channel dispatch nothing) until the three are
    // taken, then delete the queue and wait for the broker's Cancel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while depth(&other, &q) != 0 {
        assert!(Instant::now() < deadline);
    }
    other
        .queue_delete(&q, QueueDeleteOptions::default())
        .unwrap();
    while !ch.consumer_tags().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the broker's Cancel did not arrive"
        );
        other.basic_qos(0, 0, false).unwrap();
    }
    assert!(order.lock().unwrap().is_empty(), "nothing dispatched yet");
    ch.start_consuming().unwrap();
    assert_eq!(
        *order.lock().unwrap(),
        ["message 0", "message 1", "message 2", "cancel"]
    );
    conn.close(200, "done").unwrap();
}

#[test]
fn basic_cancel_hands_back_auto_acked_messages_not_yet_dispatched() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    for i in 0..5u8 {
        ch.basic_publish("", &q, [i], &BasicProperties::default(), false)
            .unwrap();
    }
    let auto = BasicConsumeOptions {
        auto_ack: true,
        ..Default::default()
    };
    let tag = ch
        .basic_consume(&q, |_, _| panic!("never dispatched"), auto)
        .unwrap();
    // Let the five arrive without dispatching: blocking calls queue them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while depth(&ch, &q) != 0 {
        assert!(Instant::now() < deadline);
    }
    let pending = ch.basic_cancel(&tag).unwrap();
    let bodies: Vec<u8> = pending.iter().map(|d| d.body[0]).collect();
    assert_eq!(bodies, [0, 1, 2, 3, 4]);
    conn.process_data_events(Some(Duration::from_millis(50)))
        .unwrap();
    conn.close(200, "done").unwrap();
}

#[test]
fn returns_reach_the_return_callback_outside_confirm_mode() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let returned = Arc::new(Mutex::new(Vec::new()));
    let r = returned.clone();
    ch.add_on_return_callback(move |_, m| r.lock().unwrap().push(m.body.clone()));
    ch.basic_publish(
        "",
        &unique("nowhere"),
        "back",
        &BasicProperties::default(),
        true,
    )
    .unwrap();
    until(&conn, "the return", || !returned.lock().unwrap().is_empty());
    assert_eq!(*returned.lock().unwrap(), [b"back".to_vec()]);
    conn.close(200, "done").unwrap();
}

#[test]
fn eight_worker_threads_ack_through_ack_handles() {
    const N: u8 = 200;
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    for i in 0..N {
        ch.basic_publish("", &q, [i], &BasicProperties::default(), false)
            .unwrap();
    }
    ch.basic_prefetch(20).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<pika::AckHandle>();
    let rx = Arc::new(Mutex::new(rx));
    let acked = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (rx, acked) = (rx.clone(), acked.clone());
            std::thread::spawn(move || {
                while let Ok(ack) = rx.lock().unwrap().recv() {
                    ack.ack().unwrap();
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let received = Arc::new(AtomicUsize::new(0));
    let r = received.clone();
    ch.basic_consume(
        &q,
        move |ch, d| {
            tx.send(ch.ack_handle(&d)).unwrap();
            if r.fetch_add(1, Ordering::SeqCst) + 1 == N as usize {
                ch.stop_consuming(None).unwrap();
            }
        },
        BasicConsumeOptions::default(),
    )
    .unwrap();
    ch.start_consuming().unwrap();
    until(&conn, "every ack", || {
        acked.load(Ordering::SeqCst) == N as usize
    });
    conn.sleep(Duration::from_millis(100)).unwrap();
    assert_eq!(depth(&ch, &q), 0, "all acked, none requeued");
    ch.close(200, "done").unwrap();
    conn.close(200, "done").unwrap();
    for w in workers {
        w.join().unwrap();
    }
}

// ----------------------------------------------------------------------
// consume()
// ----------------------------------------------------------------------

#[test]
fn the_consume_generator_acks_in_the_loop_and_cancel_counts_what_it_requeued() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    for i in 1..=20u8 {
        ch.basic_publish("", &q, [i], &BasicProperties::default(), false)
            .unwrap();
    }
    // The seed's 2.3.6 loop.
    for message in ch
        .consume(&q, false, false, FieldTable::new(), None)
        .unwrap()
    {
        let message = message.unwrap().expect("no inactivity timeout");
        ch.basic_ack(message.method.delivery_tag, false).unwrap();
        if message.method.delivery_tag == 10 {
            break;
        }
    }
    // The other 10 arrive into the channel's buffer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ch.get_waiting_message_count() < 10 {
        assert!(
            Instant::now() < deadline,
            "{}",
            ch.get_waiting_message_count()
        );
        conn.process_data_events(Some(Duration::from_millis(20)))
            .unwrap();
    }
    assert_eq!(ch.get_waiting_message_count(), 10);
    assert_eq!(ch.cancel().unwrap(), 10);
    // A reject reaches the queue as a cast, a passive declare as a call the
    // queue may answer first: wait for the count rather than read it once.
    until(&conn, "ten requeued", || depth(&ch, &q) == 10);
    assert_eq!(ch.get_waiting_message_count(), 0);
    assert_eq!(ch.cancel().unwrap(), 0, "nothing to cancel any more");
    conn.close(200, "done").unwrap();
}

#[test]
fn consume_resumes_with_the_same_parameters_and_refuses_others() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    for i in 0..4u8 {
        ch.basic_publish("", &q, [i], &BasicProperties::default(), false)
            .unwrap();
    }
    let mut seen = Vec::new();
    for m in ch
        .consume(&q, true, false, FieldTable::new(), None)
        .unwrap()
    {
        seen.push(m.unwrap().unwrap().body[0]);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(ch.consumer_tags().len(), 1);
    assert!(matches!(
        ch.consume(&q, false, false, FieldTable::new(), None),
        Err(Error::InvalidParameter { .. })
    ));
    for m in ch
        .consume(&q, true, false, FieldTable::new(), None)
        .unwrap()
    {
        seen.push(m.unwrap().unwrap().body[0]);
        if seen.len() == 4 {
            break;
        }
    }
    assert_eq!(seen, [0, 1, 2, 3], "the same consumer, in order");
    assert_eq!(ch.consumer_tags().len(), 1);
    ch.cancel().unwrap();
    conn.close(200, "done").unwrap();
}

#[test]
fn the_inactivity_timeout_yields_none() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    let started = Instant::now();
    let mut it = ch
        .consume(
            &q,
            true,
            false,
            FieldTable::new(),
            Some(Duration::from_millis(300)),
        )
        .unwrap();
    assert!(matches!(it.next(), Some(Ok(None))));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    ch.cancel().unwrap();
    conn.close(200, "done").unwrap();
}

#[test]
fn a_broker_cancel_ends_the_iteration_and_a_channel_close_is_an_error() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = unique("gen");
    ch.queue_declare(&q, QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    let other = conn.channel(None).unwrap();
    let mut it = ch
        .consume(&q, true, false, FieldTable::new(), None)
        .unwrap();
    other
        .queue_delete(&q, QueueDeleteOptions::default())
        .unwrap();
    assert!(
        it.next().is_none(),
        "the broker's cancel ends the iteration"
    );
    // A generator on a channel the broker closes: an error, then the end.
    let ch2 = conn.channel(None).unwrap();
    let q2 = temp_queue(&ch2);
    let mut it = ch2
        .consume(&q2, false, false, FieldTable::new(), None)
        .unwrap();
    ch2.basic_publish("", &q2, "x", &BasicProperties::default(), false)
        .unwrap();
    let m = it.next().unwrap().unwrap().unwrap();
    // Acking twice makes the broker close the channel (406).
    ch2.basic_ack(m.method.delivery_tag, false).unwrap();
    ch2.basic_ack(m.method.delivery_tag, false).unwrap();
    match it.next() {
        Some(Err(Error::ChannelClosedByBroker {
            reply_code: 406, ..
        })) => {}
        other => panic!("{other:?}"),
    }
    assert!(it.next().is_none());
    conn.close(200, "done").unwrap();
}

// ----------------------------------------------------------------------
// The connection lost under a call
// ----------------------------------------------------------------------

#[test]
fn a_connection_closed_by_the_broker_during_start_consuming_is_the_calls_error() {
    let conn = connect();
    let port = conn.local_address().unwrap().port();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    ch.basic_consume(&q, |_, _| {}, BasicConsumeOptions::default())
        .unwrap();
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let pid = broker_connection_info(port, &["pid"]).expect("listed")[0].clone();
        rabbitmqctl(&["close_connection", &pid, "test closes it"]);
    });
    match ch.start_consuming() {
        Err(Error::ConnectionClosedByBroker {
            reply_code: 320,
            reply_text,
        }) => {
            assert!(reply_text.contains("test closes it"), "{reply_text}")
        }
        other => panic!("{other:?}"),
    }
    closer.join().unwrap();
    // Every channel reports the connection's end.
    assert!(matches!(
        ch.basic_get(&q, true),
        Err(Error::ConnectionClosedByBroker { .. })
    ));
    assert!(conn.is_closed());
}

// ----------------------------------------------------------------------
// Writes
// ----------------------------------------------------------------------

/// Waits (bounded) on another connection until `queue` holds `n`.
fn observed_depth(other: &BlockingChannel, queue: &str, n: u32) -> Duration {
    let started = Instant::now();
    while depth(other, queue) < n {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the broker never got the message(s) without another call"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    started.elapsed()
}

#[test]
fn a_publish_leaves_without_another_call_after_quiet_and_after_busy_spells() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = unique("flushed");
    ch.queue_declare(&q, QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    let observer = connect();
    let other = observer.channel(None).unwrap();
    // A lone publish, the application then busy elsewhere (not calling in).
    ch.basic_publish("", &q, "lone", &BasicProperties::default(), false)
        .unwrap();
    observed_depth(&other, &q, 1);
    // The last of a burst, likewise.
    for _ in 0..5_000 {
        ch.basic_publish("", &q, "burst", &BasicProperties::default(), false)
            .unwrap();
    }
    observed_depth(&other, &q, 5_001);
    // And after the flusher went to sleep (a quiet spell of > 50 ms).
    std::thread::sleep(Duration::from_millis(200));
    ch.basic_publish("", &q, "after", &BasicProperties::default(), false)
        .unwrap();
    observed_depth(&other, &q, 5_002);
    ch.queue_delete(&q, QueueDeleteOptions::default()).unwrap();
    observer.close(200, "done").unwrap();
    conn.close(200, "done").unwrap();
}

#[test]
fn process_data_events_without_a_limit_inside_a_callback_waits_for_the_next_frame() {
    let mut params = broker_params();
    params.set_heartbeat(1);
    let conn = BlockingConnection::new(params).unwrap();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    for body in ["first", "second"] {
        ch.basic_publish("", &q, body, &BasicProperties::default(), false)
            .unwrap();
    }
    let turns = Arc::new(Mutex::new(None));
    let t = turns.clone();
    let auto = BasicConsumeOptions {
        auto_ack: true,
        ..Default::default()
    };
    ch.basic_consume(
        &q,
        move |ch, _| {
            if t.lock().unwrap().is_some() {
                return ch.stop_consuming(None).unwrap();
            }
            // The second delivery is queued behind this callback: each
            // call must still wait for I/O (a heartbeat at the latest)
            // rather than return at once.
            let started = Instant::now();
            let mut n = 0u32;
            while started.elapsed() < Duration::from_millis(2_500) {
                ch.connection().process_data_events(None).unwrap();
                n += 1;
            }
            *t.lock().unwrap() = Some(n);
        },
        auto,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while depth(&ch, &q) != 0 {
        assert!(Instant::now() < deadline);
    }
    ch.start_consuming().unwrap();
    let n = turns.lock().unwrap().unwrap();
    // Heartbeats every ~0.5 s from the broker: a handful of turns, not a
    // spin.
    assert!((1..100).contains(&n), "{n} turns in 2.5 s");
    assert!(conn.is_open());
    conn.close(200, "done").unwrap();
}

#[test]
fn dropping_a_channel_closes_it_and_frees_its_number() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let number = ch.channel_number();
    let q = temp_queue(&ch);
    let by_number = conn.channel_by_number(number).unwrap();
    drop(by_number);
    assert!(
        ch.is_open(),
        "a handle from channel_by_number does not own it"
    );
    drop(ch);
    assert!(conn.channel_by_number(number).is_err(), "closed on drop");
    // The number is free again, and the exclusive queue survives (it is
    // the connection's).
    let again = conn.channel(Some(number)).unwrap();
    assert_eq!(depth(&again, &q), 0);
    conn.close(200, "done").unwrap();
}

#[test]
fn two_threads_consuming_on_one_connection_never_run_callbacks_at_once() {
    const N: usize = 20;
    let conn = connect();
    let running = Arc::new(AtomicUsize::new(0));
    let overlapped = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for _ in 0..2 {
        let ch = conn.channel(None).unwrap();
        let q = temp_queue(&ch);
        for i in 0..N as u8 {
            ch.basic_publish("", &q, [i], &BasicProperties::default(), false)
                .unwrap();
        }
        let (running, overlapped) = (running.clone(), overlapped.clone());
        let seen = Arc::new(AtomicUsize::new(0));
        ch.basic_consume(
            &q,
            move |ch, d| {
                if running.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlapped.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(2));
                ch.basic_ack(d.method.delivery_tag, false).unwrap();
                if seen.fetch_add(1, Ordering::SeqCst) + 1 == N {
                    ch.stop_consuming(None).unwrap();
                }
                running.fetch_sub(1, Ordering::SeqCst);
            },
            BasicConsumeOptions::default(),
        )
        .unwrap();
        threads.push(std::thread::spawn(move || {
            let outcome = ch.start_consuming();
            (outcome, ch)
        }));
    }
    for t in threads {
        let (outcome, ch) = t.join().unwrap();
        assert!(outcome.is_ok(), "not a reentrancy error: {outcome:?}");
        ch.close(200, "done").unwrap();
    }
    assert_eq!(overlapped.load(Ordering::SeqCst), 0, "callbacks overlapped");
    conn.close(200, "done").unwrap();
}
// ----------------------------------------------------------------------
// Regressions: defects found by black-box testing
// ----------------------------------------------------------------------

#[test]
fn requests_from_a_second_thread_complete_while_the_main_thread_is_in_start_consuming() {
    // Without heartbeats nothing else wakes the thread that sleeps in the
    // poller: a request another thread queued must wake it.
    bounded(
        "requests beside start_consuming",
        Duration::from_secs(20),
        || {
            let mut params = broker_params();
            params.set_heartbeat(Heartbeat::Disabled);
            let conn = BlockingConnection::new(params).unwrap();
            assert_eq!(conn.heartbeat(), 0);
            let ch = conn.channel(None).unwrap();
            let q = temp_queue(&ch);
            let worker = conn.channel(None).unwrap();
            let spare = conn.channel(None).unwrap();
            ch.basic_consume(
                &q,
                |c, d| {
                    c.basic_ack(d.method.delivery_tag, false).unwrap();
                    c.stop_consuming(None).unwrap();
                },
                BasicConsumeOptions::default(),
            )
            .unwrap();
            let q2 = q.clone();
            let second = std::thread::spawn(move || {
                // Let the main thread settle in start_consuming.
                std::thread::sleep(Duration::from_millis(200));
                let mut took = Vec::new();
                let mut timed = |what: &'static str, f: &mut dyn FnMut()| {
                    let started = Instant::now();
                    f();
                    took.push((what, started.elapsed()));
                };
                let mut own = String::new();
                timed("queue_declare", &mut || own = temp_queue(&worker));
                timed("basic_get", &mut || {
                    assert!(worker.basic_get(&own, false).unwrap().is_none())
                });
                timed("basic_qos", &mut || {
                    worker.basic_qos(0, 5, false).unwrap();
                });
                timed("basic_consume + basic_cancel", &mut || {
                    let tag = worker
                        .basic_consume(&own, |_, _| {}, BasicConsumeOptions::default())
                        .unwrap();
                    worker.basic_cancel(&tag).unwrap();
                });
                timed("tx_select + tx_commit", &mut || {
                    spare.tx_select().unwrap();
                    spare.tx_commit().unwrap();
                });
                timed("close", &mut || spare.close(200, "done").unwrap());
                timed("confirm_delivery", &mut || {
                    worker.confirm_delivery().unwrap()
                });
                // The confirmed publish that ends the main thread's consumer.
                timed("confirmed basic_publish", &mut || {
                    worker
                        .basic_publish("", &q2, "x", &BasicProperties::default(), false)
                        .unwrap()
                });
                took
            });
            ch.start_consuming().unwrap();
            let took = second.join().unwrap();
            for (what, took) in took {
                // Each is a round trip on loopback (milliseconds); a request
                // stuck until something else woke the poller never returned.
                assert!(
                    took < Duration::from_secs(2),
                    "{what} from a second thread took {took:?}"
                );
            }
            conn.close(200, "done").unwrap();
        },
    );
}

#[test]
fn the_consume_iterator_runs_acks_from_worker_threads_while_it_waits() {
    // The seed's threaded-ack pattern with consume(): prefetch 1, so each
    // next message needs the previous one's ack, which a worker thread
    // hands over with add_callback_threadsafe.
    bounded(
        "threaded acks under consume()",
        Duration::from_secs(20),
        || {
            let conn = connect();
            let ch = conn.channel(None).unwrap();
            let q = temp_queue(&ch);
            ch.basic_qos(0, 1, false).unwrap();
            for i in 0..3u8 {
                ch.basic_publish("", &q, [i], &BasicProperties::default(), false)
                    .unwrap();
            }
            let acked = Arc::new(AtomicUsize::new(0));
            let handle = conn.threadsafe_handle();
            let number = ch.channel_number();
            let mut got = Vec::new();
            let mut workers = Vec::new();
            for m in ch
                .consume(
                    &q,
                    false,
                    false,
                    FieldTable::new(),
                    Some(Duration::from_secs(5)),
                )
                .unwrap()
            {
                let Some(d) = m.unwrap() else {
                    panic!(
                        "no message within 5 s after {got:?}: the workers' acks ({} run) were not \
                     dispatched while consume() waited",
                        acked.load(Ordering::SeqCst)
                    );
                };
                got.push(d.body[0]);
                let tag = d.method.delivery_tag;
                let (handle, acked) = (handle.clone(), acked.clone());
                workers.push(std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    handle
                        .add_callback_threadsafe(move |conn| {
                            conn.channel_by_number(number)
                                .unwrap()
                                .basic_ack(tag, false)
                                .unwrap();
                            acked.fetch_add(1, Ordering::SeqCst);
                        })
                        .unwrap();
                }));
                if got.len() == 3 {
                    break;
                }
            }
            for w in workers {
                w.join().unwrap();
            }
            assert_eq!(got, [0, 1, 2]);
            assert_eq!(ch.cancel().unwrap(), 0);
            until(&conn, "the last ack", || acked.load(Ordering::SeqCst) == 3);
            assert_eq!(depth(&ch, &q), 0);
            conn.close(200, "done").unwrap();
        },
    );
}

#[test]
fn the_consume_iterator_runs_timers_and_other_consumers_while_it_waits() {
    bounded("timers under consume()", Duration::from_secs(20), || {
        let conn = connect();
        let ch = conn.channel(None).unwrap();
        let q = temp_queue(&ch);
        let number = ch.channel_number();
        // A timer that publishes to the iterated queue.
        let target = q.clone();
        conn.call_later(Duration::from_millis(50), move |conn| {
            conn.channel_by_number(number)
                .unwrap()
                .basic_publish("", &target, "timer", &BasicProperties::default(), false)
                .unwrap();
        });
        // A callback consumer on another channel that does too.
        let other = conn.channel(None).unwrap();
        let other_q = temp_queue(&other);
        let target = q.clone();
        other
            .basic_consume(
                &other_q,
                move |c, d| {
                    c.basic_ack(d.method.delivery_tag, false).unwrap();
                    c.connection()
                        .channel_by_number(number)
                        .unwrap()
                        .basic_publish("", &target, "consumer", &BasicProperties::default(), false)
                        .unwrap();
                },
                BasicConsumeOptions::default(),
            )
            .unwrap();
        other
            .basic_publish("", &other_q, "go", &BasicProperties::default(), false)
            .unwrap();
        let mut got = Vec::new();
        for m in ch
            .consume(
                &q,
                true,
                false,
                FieldTable::new(),
                Some(Duration::from_secs(3)),
            )
            .unwrap()
        {
            let Some(d) = m.unwrap() else {
                panic!("only {got:?} within 3 s: the timer or the other consumer did not run");
            };
            got.push(String::from_utf8(d.body).unwrap());
            if got.len() == 2 {
                break;
            }
        }
        got.sort();
        assert_eq!(got, ["consumer", "timer"]);
        ch.cancel().unwrap();
        conn.close(200, "done").unwrap();
    });
}
/// The text of a panic's payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[test]
fn duration_max_means_no_deadline_and_never_panics() {
    bounded("Duration::MAX", Duration::from_secs(20), || {
        let conn = connect();
        // A timer that never comes due.
        let never = conn.call_later(Duration::MAX, |_| panic!("a timer at Duration::MAX ran"));
        conn.process_data_events(Some(Duration::from_millis(20)))
            .unwrap();
        assert!(conn.remove_timeout(never));
        // process_data_events waits until there is something to dispatch.
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        conn.call_later(Duration::from_millis(50), move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        });
        conn.process_data_events(Some(Duration::MAX)).unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        // sleep waits "forever": a callback's panic gets it out.
        let handle = conn.threadsafe_handle();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            handle
                .add_callback_threadsafe(|_| std::panic::panic_any("wake up"))
                .unwrap();
        });
        let slept =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.sleep(Duration::MAX)));
        match slept {
            Err(payload) => assert_eq!(panic_text(&*payload), "wake up"),
            Ok(outcome) => panic!("sleep(Duration::MAX) returned {outcome:?}"),
        }
        // consume() with an inactivity timeout of Duration::MAX.
        let ch = conn.channel(None).unwrap();
        let q = temp_queue(&ch);
        ch.basic_publish("", &q, "x", &BasicProperties::default(), false)
            .unwrap();
        let mut it = ch
            .consume(&q, true, false, FieldTable::new(), Some(Duration::MAX))
            .unwrap();
        let m = it
            .next()
            .unwrap()
            .unwrap()
            .expect("a message, not a timeout");
        assert_eq!(m.body, b"x");
        ch.cancel().unwrap();
        conn.close(200, "done").unwrap();
        // The connection's own bounds at Duration::MAX: connect, handshake
        // and the close handshake (bounded by socket_timeout) run without
        // a deadline.
        let params = common::broker_params_with_timeouts_at_max();
        let conn = BlockingConnection::new(params).unwrap();
        let ch = conn.channel(None).unwrap();
        temp_queue(&ch);
        ch.close(200, "done").unwrap();
        conn.close(200, "done").unwrap();
        assert!(conn.is_closed());
    });
}

#[test]
fn after_a_channel_closed_each_error_names_the_call_that_was_refused() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    assert!(matches!(
        ch.queue_declare(&unique("missing"), passive, FieldTable::new()),
        Err(Error::ChannelClosedByBroker {
            reply_code: 404,
            ..
        })
    ));
    let detail = |r: Result<(), Error>| match r {
        Err(Error::ChannelWrongState { detail }) => detail,
        other => panic!("{other:?}"),
    };
    let ack = detail(ch.basic_ack(1, false));
    assert!(ack.contains("basic_ack"), "{ack}");
    let get = detail(ch.basic_get("q", false).map(drop));
    assert!(get.contains("basic_get"), "{get}");
    let publish = detail(ch.basic_publish("", "q", "x", &BasicProperties::default(), false));
    assert!(publish.contains("basic_publish"), "{publish}");
    let nack = detail(ch.basic_nack(1, false, true));
    assert!(nack.contains("basic_nack"), "{nack}");
    let declare = detail(
        ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new())
            .map(drop),
    );
    assert!(declare.contains("Declare"), "{declare}");
    conn.close(200, "done").unwrap();
}

#[test]
fn start_consuming_returns_ok_when_a_callback_closes_its_channel() {
    bounded(
        "channel close in a callback",
        Duration::from_secs(20),
        || {
            let conn = connect();
            let ch = conn.channel(None).unwrap();
            let q = temp_queue(&conn.channel(None).unwrap());
            ch.basic_publish("", &q, "x", &BasicProperties::default(), false)
                .unwrap();
            ch.basic_consume(
                &q,
                |c, d| {
                    c.basic_ack(d.method.delivery_tag, false).unwrap();
                    c.close(200, "done from the callback").unwrap();
                },
                BasicConsumeOptions::default(),
            )
            .unwrap();
            ch.start_consuming()
                .expect("a close by the client ends the loop: no consumers left");
            assert!(ch.is_closed());
            assert!(conn.is_open());
            conn.close(200, "done").unwrap();
        },
    );
}

#[test]
fn start_consuming_returns_ok_when_a_callback_closes_the_connection() {
    bounded(
        "connection close in a callback",
        Duration::from_secs(20),
        || {
            let conn = connect();
            let ch = conn.channel(None).unwrap();
            let q = temp_queue(&ch);
            ch.basic_publish("", &q, "x", &BasicProperties::default(), false)
                .unwrap();
            ch.basic_consume(
                &q,
                |c, d| {
                    c.basic_ack(d.method.delivery_tag, false).unwrap();
                    c.connection().close(200, "done from the callback").unwrap();
                },
                BasicConsumeOptions::default(),
            )
            .unwrap();
            ch.start_consuming()
                .expect("a close by the client ends the loop: no consumers left");
            assert!(conn.is_closed());
        },
    );
}

#[test]
fn in_confirm_mode_each_return_belongs_to_the_publish_it_returns() {
    let conn = connect();
    let ch = conn.channel(None).unwrap();
    let q = temp_queue(&ch);
    ch.confirm_delivery().unwrap();
    let props = BasicProperties::default();
    let nowhere = unique("nowhere");
    // An unroutable one in the window, then a routable one confirmed alone.
    let first = ch
        .basic_publish_nowait("", &nowhere, "first", &props, true)
        .unwrap();
    ch.basic_publish("", &q, "second", &props, true)
        .expect("a routable publish is not the earlier one's return");
    let confirms = ch.wait_for_confirms(0).unwrap();
    assert_eq!(confirms.acked, [first]);
    let bodies: Vec<&[u8]> = confirms.returned.iter().map(|m| &m.body[..]).collect();
    assert_eq!(bodies, [b"first"], "the window reports its own return");
    // Two unroutable ones to the same key: each comes back once.
    let a = ch
        .basic_publish_nowait("", &nowhere, "a", &props, true)
        .unwrap();
    let b = ch
        .basic_publish_nowait("", &nowhere, "b", &props, true)
        .unwrap();
    let confirms = ch.wait_for_confirms(0).unwrap();
    assert_eq!(confirms.acked, [a, b]);
    let bodies: Vec<&[u8]> = confirms.returned.iter().map(|m| &m.body[..]).collect();
    assert_eq!(bodies, [b"a", b"b"]);
    // A confirmed publish to that key behind one in the window: each its own.
    let c = ch
        .basic_publish_nowait("", &nowhere, "c", &props, true)
        .unwrap();
    match ch.basic_publish("", &nowhere, "d", &props, true) {
        Err(Error::UnroutableError { messages }) => {
            let bodies: Vec<&[u8]> = messages.iter().map(|m| &m.body[..]).collect();
            assert_eq!(bodies, [b"d"]);
        }
        other => panic!("{other:?}"),
    }
    let confirms = ch.wait_for_confirms(0).unwrap();
    assert_eq!(confirms.acked, [c]);
    let bodies: Vec<&[u8]> = confirms.returned.iter().map(|m| &m.body[..]).collect();
    assert_eq!(bodies, [b"c"]);
    conn.close(200, "done").unwrap();
}
