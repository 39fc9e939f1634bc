//! A user callback that panics, against the real broker: the panic leaves
//! `ioloop.start()` (as an exception leaves pika's `ioloop.start()`), the
//! application may start the loop again, and then the connection carries
//! on — repeating callbacks (consumers, confirms) stay registered, queued
//! requests go out, nothing waits for a heartbeat. And a `shutdown` whose
//! held deliveries went with their channel closes at once.

mod common;

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::broker_params;
use pika::{
    BasicConsumeOptions, BasicProperties, Channel, Confirmation, Error, FieldTable,
    QueueDeclareOptions, SelectConnection,
};

static NAMES: AtomicUsize = AtomicUsize::new(0);

fn unique(what: &str) -> String {
    let n = NAMES.fetch_add(1, Ordering::Relaxed);
    format!("pika-rs.panics.{what}.{}.{n}", std::process::id())
}

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

/// Opens a connection (heartbeats off, so nothing but the fix can wake a
/// stalled connection) and a channel, and hands the channel to `body`.
/// Then runs the loop until the connection closes, starting it again after
/// each panic that leaves it; returns how many panics left the loop.
/// Fails if the whole run takes longer than `limit` (a liveness bound).
fn run_restarting(limit: Duration, body: impl FnOnce(&Channel) + 'static) -> usize {
    let mut params = broker_params();
    params.set_heartbeat(0);
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    let conn = SelectConnection::new(
        params,
        move |conn| {
            conn.channel(None, move |ch| body(&ch.expect("the channel opens")))
                .expect("the connection accepts a channel");
        },
        |_, e| panic!("could not connect: {e} (run the tests through scripts/with-broker)"),
        move |conn, _| {
            d.set(true);
            conn.ioloop().stop();
        },
    )
    .expect("a loop");
    let ioloop = conn.ioloop().clone();
    let expired = Rc::new(Cell::new(false));
    let (flag, stopper) = (expired.clone(), ioloop.clone());
    ioloop.call_later(limit, move || {
        flag.set(true);
        stopper.stop();
    });
    let mut panics = 0;
    while !done.get() && !expired.get() {
        match catch_unwind(AssertUnwindSafe(|| ioloop.start())) {
            Ok(result) => result.expect("the loop runs"),
            Err(_) => panics += 1,
        }
    }
    assert!(!expired.get(), "not finished within {limit:?}");
    panics
}

fn finish(ch: &Channel) {
    ch.connection()
        .expect("the connection exists")
        .close(200, "done")
        .expect("the connection is open");
}

#[test]
fn a_consumer_whose_callback_panicked_still_gets_the_next_deliveries_after_the_loop_restarts() {
    let q = unique("consume");
    let seen = Rc::new(RefCell::new(Vec::new()));
    let s = seen.clone();
    let panics = run_restarting(Duration::from_secs(10), move |ch| {
        ch.queue_declare(&q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        for i in 1..=5u8 {
            ch.basic_publish("", &q, [i], &BasicProperties::default(), false)
                .unwrap();
        }
        ch.basic_consume(
            &q,
            move |ch, d| {
                s.borrow_mut().push(d.body[0]);
                if d.body[0] == 1 {
                    panic!("the first message breaks the application");
                }
                if d.body[0] == 5 {
                    ch.basic_ack(d.method.delivery_tag, true).unwrap();
                    finish(ch);
                }
            },
            BasicConsumeOptions::default(),
            |_, ok| {
                ok.unwrap();
            },
        )
        .unwrap();
    });
    assert_eq!(panics, 1);
    assert_eq!(*seen.borrow(), [1, 2, 3, 4, 5]);
}

#[test]
fn a_confirm_callback_that_panicked_still_gets_the_later_confirms() {
    let q = unique("confirm");
    let acked = Rc::new(RefCell::new(Vec::new()));
    let a = acked.clone();
    let panics = run_restarting(Duration::from_secs(10), move |ch| {
        ch.queue_declare(&q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        ch.confirm_delivery(
            move |ch, c| {
                let Confirmation::Ack { settled, .. } = c else {
                    panic!("not an ack: {c:?}");
                };
                a.borrow_mut().extend_from_slice(&settled);
                if settled.contains(&1) {
                    // Published one by one: tag 1 comes alone.
                    let q = q.clone();
                    let ch2 = ch.clone();
                    ch.connection().unwrap().ioloop().call_soon(move || {
                        for _ in 0..3 {
                            ch2.basic_publish("", &q, b"x", &BasicProperties::default(), false)
                                .unwrap();
                        }
                    });
                    panic!("the first confirm breaks the application");
                }
                if a.borrow().len() == 4 {
                    finish(ch);
                }
            },
            |ch, ok| {
                ok.unwrap();
                ch.basic_publish("", "", b"first", &BasicProperties::default(), false)
                    .unwrap();
            },
        )
        .unwrap();
    });
    assert_eq!(panics, 1);
    assert_eq!(*acked.borrow(), [1, 2, 3, 4]);
}

#[test]
fn a_request_queued_before_a_completion_callback_panicked_goes_out_when_the_loop_restarts() {
    // Both declares are in the core before the first completes; the first
    // completion panics while the second Queue.Declare waits in the
    // outbound buffer. With heartbeats off, only the restarted loop can
    // write it.
    let second_done = Rc::new(Cell::new(false));
    let s = second_done.clone();
    let panics = run_restarting(Duration::from_secs(5), move |ch| {
        ch.queue_declare("", exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
            panic!("the first completion breaks the application");
        })
        .unwrap();
        ch.queue_declare("", exclusive(), FieldTable::new(), move |ch, ok| {
            ok.unwrap();
            s.set(true);
            finish(ch);
        })
        .unwrap();
    });
    assert_eq!(panics, 1);
    assert!(second_done.get());
}

#[test]
fn shutdown_closes_at_once_when_the_channel_holding_the_unacked_deliveries_closes() {
    let q = unique("shutdown");
    let closed_after = Rc::new(Cell::new(None));
    let c = closed_after.clone();
    let timeout = Duration::from_secs(30);
    let panics = run_restarting(Duration::from_secs(10), move |ch| {
        ch.queue_declare(&q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        for _ in 0..5 {
            ch.basic_publish("", &q, b"held", &BasicProperties::default(), false)
                .unwrap();
        }
        let conn = ch.connection().unwrap();
        let started = Instant::now();
        conn.add_on_close_callback(move |_, reason| {
            assert!(
                matches!(
                    reason,
                    Error::ConnectionClosedByClient {
                        reply_code: 200,
                        ..
                    }
                ),
                "{reason:?}"
            );
            c.set(Some(started.elapsed()));
        });
        let held = Rc::new(Cell::new(0));
        ch.basic_consume(
            &q,
            move |ch, _| {
                // Nothing is acked: the shutdown waits for these.
                held.set(held.get() + 1);
                if held.get() == 5 {
                    let conn = ch.connection().unwrap();
                    conn.shutdown(timeout).unwrap();
                    ch.close(200, "giving up on them").unwrap();
                }
            },
            BasicConsumeOptions::default(),
            |_, ok| {
                ok.unwrap();
            },
        )
        .unwrap();
    });
    assert_eq!(panics, 0);
    let closed_after = closed_after.get().expect("the connection closed");
    assert!(
        closed_after < timeout / 2,
        "closed after {closed_after:?}, the shutdown timeout is {timeout:?}"
    );
}
