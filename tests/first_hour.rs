//! What a pika user reaches for in the first hour, against the real broker
//! (and the fake broker where RabbitMQ will not stage it): the threaded-ack
//! door ([`pika::AckHandle`], `channel_by_number`), the graceful
//! [`SelectConnection::shutdown`], `queue_bind` with the queue's name as
//! the default routing key, `Channel::connection` once the connection is
//! gone, and a pending cancel ended by the broker's own cancel.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fake_broker::{FakeBroker, rabbitmq_tune};
use common::{broker_params, run_loop};
use pika::spec::{basic, channel};
use pika::{
    BasicConsumeOptions, BasicProperties, Channel, ConnectionParameters, Delivery, Error,
    FieldTable, QueueDeclareOptions, SelectConnection,
};

const LIMIT: Duration = Duration::from_secs(30);

fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "pika-rs.first-hour.{what}.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a connection whose open channel goes to `body`; returns how the
/// connection ended.
fn with_channel(body: impl FnOnce(&Channel) + 'static) -> Error {
    let ended = Rc::new(RefCell::new(None));
    let e = ended.clone();
    let conn = SelectConnection::new(
        broker_params(),
        move |conn| {
            conn.channel(None, move |r| body(&r.expect("the channel opens")))
                .expect("open");
        },
        |conn, e| {
            conn.ioloop().stop();
            panic!("cannot connect: {e}");
        },
        move |conn, err| {
            *e.borrow_mut() = Some(err);
            conn.ioloop().stop();
        },
    )
    .unwrap();
    run_loop(conn.ioloop(), LIMIT);
    let end = ended.borrow_mut().take();
    end.expect("the connection ended")
}

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

/// Declares an exclusive queue holding `n` messages (bodies 0..n), then
/// runs `then` with its name.
fn queue_with(ch: &Channel, n: u32, then: impl FnOnce(&Channel, String) + 'static) {
    ch.queue_declare("", exclusive(), FieldTable::new(), move |ch, r| {
        let q = r.expect("declared").queue;
        for i in 0..n {
            ch.basic_publish("", &q, i.to_be_bytes(), &BasicProperties::default(), false)
                .unwrap();
        }
        then(ch, q);
    })
    .unwrap();
}

/// Waits (on the loop) until the queue holds `count` ready messages.
fn when_queue_holds(ch: &Channel, q: String, count: u32, then: impl FnOnce(&Channel) + 'static) {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q2 = q.clone();
    ch.queue_declare(&q, passive, FieldTable::new(), move |ch, r| {
        if r.expect("the queue exists").message_count == count {
            then(ch);
        } else {
            let ch = ch.clone();
            let lp = ch.connection().unwrap().ioloop().clone();
            lp.call_later(Duration::from_millis(20), move || {
                when_queue_holds(&ch, q2, count, then)
            });
        }
    })
    .unwrap();
}

// ----------------------------------------------------------------------
// The threaded-ack door
// ----------------------------------------------------------------------

#[test]
fn eight_worker_threads_ack_every_delivery_through_ack_handles() {
    const N: u32 = 400;
    let (jobs_tx, jobs_rx) = mpsc::channel::<(Delivery, pika::AckHandle)>();
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (rx, acked) = (jobs_rx.clone(), acked.clone());
            std::thread::spawn(move || {
                loop {
                    let job = rx.lock().unwrap().recv();
                    let Ok((delivery, ack)) = job else { return };
                    ack.ack().expect("the channel is open");
                    acked
                        .lock()
                        .unwrap()
                        .push(u32::from_be_bytes(delivery.body.try_into().unwrap()));
                }
            })
        })
        .collect();
    let ended = with_channel(move |ch| {
        queue_with(ch, N, move |ch, q| {
            ch.basic_prefetch(50, |_, r| {
                r.unwrap();
            })
            .unwrap();
            let received = Rc::new(Cell::new(0u32));
            let q2 = q.clone();
            ch.basic_consume(
                &q,
                move |ch, d| {
                    let ack = ch.ack_handle(&d);
                    assert_eq!(ack.delivery_tag(), d.method.delivery_tag);
                    assert_eq!(ack.channel_number(), ch.channel_number());
                    jobs_tx.send((d, ack)).unwrap();
                    received.set(received.get() + 1);
                    if received.get() == N {
                        // Every message acked by the workers: the queue
                        // holds nothing, and nothing is unacked.
                        let q = q2.clone();
                        ch.basic_cancel(&ch.consumer_tags()[0], move |ch, r| {
                            r.unwrap();
                            when_queue_holds(ch, q, 0, |ch| {
                                // Give the last acks time to land, then
                                // close: unacked messages would return.
                                let ch = ch.clone();
                                let lp = ch.connection().unwrap().ioloop().clone();
                                lp.call_later(Duration::from_millis(200), move || {
                                    ch.connection().unwrap().close(200, "done").unwrap();
                                });
                            });
                        })
                        .unwrap();
                    }
                },
                BasicConsumeOptions::default(),
                |_, r| {
                    r.unwrap();
                },
            )
            .unwrap();
        });
    });
    assert!(
        matches!(ended, Error::ConnectionClosedByClient { .. }),
        "{ended:?}"
    );
    for w in workers {
        w.join().unwrap();
    }
    let mut acked = acked.lock().unwrap().clone();
    acked.sort_unstable();
    assert_eq!(acked, (0..N).collect::<Vec<_>>(), "each message acked once");
}

#[test]
fn an_ack_handle_refuses_after_its_channel_or_connection_is_gone() {
    let handles: Rc<RefCell<Vec<pika::AckHandle>>> = Rc::default();
    let results = Arc::new(Mutex::new(Vec::new()));
    let (h, r) = (handles.clone(), results.clone());
    let ended = with_channel(move |ch| {
        queue_with(ch, 2, move |ch, q| {
            let h2 = h.clone();
            let r2 = r.clone();
            ch.basic_consume(
                &q,
                move |ch, d| {
                    h2.borrow_mut().push(ch.ack_handle(&d));
                    if h2.borrow().len() < 2 {
                        return;
                    }
                    // The first handle is used once the channel is closed,
                    // the second once the connection is.
                    let (first, second) = (h2.borrow()[0].clone(), h2.borrow()[1].clone());
                    let r3 = r2.clone();
                    ch.add_on_close_callback(move |ch, _| {
                        let r4 = r3.clone();
                        let outcome = std::thread::spawn(move || first.ack()).join().unwrap();
                        r3.lock().unwrap().push(("channel closed", outcome));
                        let conn = ch.connection().unwrap();
                        conn.add_on_close_callback(move |_, _| {
                            let outcome = std::thread::spawn(move || second.ack()).join().unwrap();
                            r4.lock().unwrap().push(("connection closed", outcome));
                        });
                        conn.close(200, "done").unwrap();
                    });
                    ch.close(200, "bye").unwrap();
                },
                BasicConsumeOptions::default(),
                |_, r| {
                    r.unwrap();
                },
            )
            .unwrap();
        });
    });
    assert!(matches!(ended, Error::ConnectionClosedByClient { .. }));
    let results = results.lock().unwrap();
    assert!(
        matches!(
            results.as_slice(),
            [
                ("channel closed", Err(Error::ChannelWrongState { detail })),
                ("connection closed", Err(Error::ConnectionWrongState { .. }))
            ] if detail.contains("is closed")
        ),
        "{results:?}"
    );
}

#[test]
fn a_threadsafe_closure_finds_the_channel_by_number_and_acks() {
    let ended = with_channel(move |ch| {
        queue_with(ch, 1, move |ch, q| {
            let q2 = q.clone();
            ch.basic_consume(
                &q,
                move |ch, d| {
                    let handle = ch.connection().unwrap().threadsafe_handle();
                    let (number, tag) = (ch.channel_number(), d.method.delivery_tag);
                    let q3 = q2.clone();
                    std::thread::spawn(move || {
                        handle
                            .add_callback_threadsafe(move |conn| {
                                let ch = conn.channel_by_number(number).expect("open");
                                ch.basic_ack(tag, false).unwrap();
                                // Acked: after a cancel and a passive
                                // declare the queue is empty.
                                let tag = ch.consumer_tags()[0].clone();
                                ch.basic_cancel(&tag, move |ch, r| {
                                    r.unwrap();
                                    when_queue_holds(ch, q3, 0, |ch| {
                                        ch.connection().unwrap().close(200, "done").unwrap()
                                    });
                                })
                                .unwrap();
                            })
                            .unwrap();
                    });
                },
                BasicConsumeOptions::default(),
                |_, r| {
                    r.unwrap();
                },
            )
            .unwrap();
            assert!(matches!(
                ch.connection().unwrap().channel_by_number(999),
                Err(Error::ChannelWrongState { .. })
            ));
        });
    });
    assert!(
        matches!(ended, Error::ConnectionClosedByClient { .. }),
        "{ended:?}"
    );
}

// ----------------------------------------------------------------------
// Graceful shutdown
// ----------------------------------------------------------------------

#[test]
fn shutdown_cancels_consumers_waits_for_the_work_in_flight_to_ack_then_closes() {
    let acked = Rc::new(Cell::new(0u32));
    let a = acked.clone();
    let q: &'static str = Box::leak(unique("shutdown").into_boxed_str());
    let q2 = q;
    let ended = with_channel(move |ch| {
        // A durable-less, non-exclusive queue: it outlives the connection,
        // so the test can count what is left in it.
        ch.queue_declare(
            q,
            QueueDeclareOptions::default(),
            FieldTable::new(),
            move |ch, r| {
                r.unwrap();
                for i in 0..20u32 {
                    ch.basic_publish("", q, i.to_be_bytes(), &BasicProperties::default(), false)
                        .unwrap();
                }
                ch.basic_prefetch(5, |_, r| {
                    r.unwrap();
                })
                .unwrap();
                let started = Rc::new(Cell::new(false));
                ch.basic_consume(
                    q,
                    move |ch, d| {
                        // Each message takes 50 ms of "work" on a timer, then
                        // is acked.
                        let (ch2, a) = (ch.clone(), a.clone());
                        let lp = ch.connection().unwrap().ioloop().clone();
                        lp.call_later(Duration::from_millis(50), move || {
                            ch2.basic_ack(d.method.delivery_tag, false).unwrap();
                            a.set(a.get() + 1);
                        });
                        if !started.replace(true) {
                            // The first delivery: shut down now, with 5 in
                            // flight at most.
                            ch.connection()
                                .unwrap()
                                .shutdown(Duration::from_secs(10))
                                .unwrap();
                            assert!(ch.consumer_tags().is_empty(), "consumers cancelled");
                        }
                    },
                    BasicConsumeOptions::default(),
                    |_, r| {
                        r.unwrap();
                    },
                )
                .unwrap();
            },
        )
        .unwrap();
    });
    assert!(
        matches!(&ended, Error::ConnectionClosedByClient { reply_code: 200, reply_text } if reply_text == "Normal shutdown"),
        "{ended:?}"
    );
    let acked = acked.get();
    assert!(
        (1..=5).contains(&acked),
        "the work in flight was acked: {acked}"
    );
    // What was acked is gone; the rest is back in the queue.
    let left = Rc::new(Cell::new(u32::MAX));
    let l = left.clone();
    with_channel(move |ch| {
        ch.queue_delete(q2, Default::default(), move |ch, r| {
            l.set(r.unwrap().message_count);
            ch.connection().unwrap().close(200, "done").unwrap();
        })
        .unwrap();
    });
    assert_eq!(left.get(), 20 - acked);
}

#[test]
fn shutdown_closes_at_its_timeout_when_work_never_acks() {
    let ended = with_channel(move |ch| {
        queue_with(ch, 3, move |ch, q| {
            ch.basic_consume(
                &q,
                |ch, _| {
                    // Never acked.
                    let conn = ch.connection().unwrap();
                    if !conn.is_closing() {
                        let _ = conn.shutdown(Duration::from_millis(300));
                    }
                },
                BasicConsumeOptions::default(),
                |_, r| {
                    r.unwrap();
                },
            )
            .unwrap();
        });
    });
    assert!(
        matches!(ended, Error::ConnectionClosedByClient { .. }),
        "{ended:?}"
    );
}

// ----------------------------------------------------------------------
// Smaller parity details
// ----------------------------------------------------------------------

#[test]
fn queue_bind_without_a_routing_key_binds_with_the_queues_name() {
    let got = Rc::new(RefCell::new(Vec::new()));
    let g = got.clone();
    let x: &'static str = Box::leak(unique("x").into_boxed_str());
    let ended = with_channel(move |ch| {
        let opts = pika::ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        };
        ch.exchange_declare(x, opts, FieldTable::new(), move |ch, r| {
            r.unwrap();
            ch.queue_declare("", exclusive(), FieldTable::new(), move |ch, r| {
                let q = r.unwrap().queue;
                // None: the queue's name; Some(""): the empty key.
                ch.queue_bind(&q, x, None, FieldTable::new(), |_, r| {
                    r.unwrap();
                })
                .unwrap();
                let (x2, q2) = (x, q.clone());
                ch.queue_bind(&q, x, Some(""), FieldTable::new(), move |ch, r| {
                    r.unwrap();
                    let props = BasicProperties::persistent();
                    for (key, body) in [
                        (q2.as_str(), "by name"),
                        ("", "by empty key"),
                        ("other", "lost"),
                    ] {
                        ch.basic_publish(x2, key, body, &props, false).unwrap();
                    }
                    let g = g.clone();
                    let mut seen = 0;
                    ch.basic_consume(
                        &q2,
                        move |ch, d| {
                            assert_eq!(
                                d.properties.persistence(),
                                Some(pika::DeliveryMode::Persistent)
                            );
                            g.borrow_mut().push(String::from_utf8(d.body).unwrap());
                            seen += 1;
                            if seen == 2 {
                                ch.connection().unwrap().close(200, "done").unwrap();
                            }
                        },
                        BasicConsumeOptions {
                            auto_ack: true,
                            ..Default::default()
                        },
                        |_, r| {
                            r.unwrap();
                        },
                    )
                    .unwrap();
                })
                .unwrap();
            })
            .unwrap();
        })
        .unwrap();
    });
    assert!(matches!(ended, Error::ConnectionClosedByClient { .. }));
    assert_eq!(*got.borrow(), ["by name", "by empty key"]);
}

#[test]
fn a_channel_whose_connection_is_gone_says_so() {
    let kept: Rc<RefCell<Option<Channel>>> = Rc::default();
    let k = kept.clone();
    let ended = with_channel(move |ch| {
        *k.borrow_mut() = Some(ch.clone());
        ch.connection().unwrap().close(200, "done").unwrap();
    });
    assert!(matches!(ended, Error::ConnectionClosedByClient { .. }));
    let ch = kept.borrow_mut().take().unwrap();
    // The loop that held the connection is gone with the test's handles.
    assert!(ch.is_closed());
    assert!(matches!(
        ch.connection(),
        Err(Error::ChannelWrongState { .. })
    ));
    assert!(matches!(
        ch.basic_publish("", "q", b"x", &BasicProperties::default(), false),
        Err(Error::ChannelWrongState { .. })
    ));
}

#[test]
fn a_cancel_pending_when_the_broker_cancels_the_consumer_gets_consumer_cancelled() {
    // Only a fake broker can send its own Basic.Cancel between our Cancel
    // and its CancelOk on purpose.
    let fake = FakeBroker::start(|mut conn| {
        conn.handshake(rabbitmq_tune());
        conn.expect::<channel::Open>(1);
        conn.send_method(1, channel::OpenOk::default());
        let consume = conn.expect::<basic::Consume>(1);
        conn.send_method(
            1,
            basic::ConsumeOk {
                consumer_tag: consume.consumer_tag.clone(),
            },
        );
        let cancel = conn.expect::<basic::Cancel>(1);
        conn.send_method(
            1,
            basic::Cancel {
                consumer_tag: cancel.consumer_tag.clone(),
                nowait: true,
            },
        );
        conn.send_method(
            1,
            basic::CancelOk {
                consumer_tag: cancel.consumer_tag,
            },
        );
        conn.expect::<channel::Close>(1);
        conn.send_method(1, channel::CloseOk {});
        conn.expect::<pika::spec::connection::Close>(0);
        conn.send_method(0, pika::spec::connection::CloseOk {});
    });
    let mut params = ConnectionParameters::default();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(fake.addr().port())
        .unwrap();
    let seen = Rc::new(RefCell::new(Vec::new()));
    let s = seen.clone();
    let conn = SelectConnection::new(
        params,
        move |conn| {
            conn.channel(None, move |r| {
                let ch = r.unwrap();
                let s2 = s.clone();
                ch.add_on_cancel_callback(move |_, c| {
                    s2.borrow_mut()
                        .push(format!("on_cancel {}", c.consumer_tag))
                });
                let s3 = s.clone();
                ch.basic_consume(
                    "q",
                    |_, _| {},
                    BasicConsumeOptions {
                        consumer_tag: Some("c".into()),
                        ..Default::default()
                    },
                    move |ch, r| {
                        r.unwrap();
                        ch.basic_cancel("c", move |ch, r| {
                            s3.borrow_mut().push(format!("cancel {r:?}"));
                            ch.connection().unwrap().close(200, "done").unwrap();
                        })
                        .unwrap();
                    },
                )
                .unwrap();
            })
            .unwrap();
        },
        |_, e| panic!("{e}"),
        |conn, _| conn.ioloop().stop(),
    )
    .unwrap();
    run_loop(conn.ioloop(), LIMIT);
    fake.join();
    assert_eq!(
        *seen.borrow(),
        [
            "on_cancel c".to_string(),
            "cancel Err(ConsumerCancelled { tag: \"c\" })".to_string()
        ]
    );
}
