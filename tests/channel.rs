//! Channel against the real broker: every operation with its reply checked
//! (nowait forms included), the broker's channel and connection errors
//! (RELIABILITY.md 19–23 and RabbitMQ's 540s), frame_max (25), confirms,
//! returns and no loss (28–31), channel states, RPC serialisation,
//! reentrancy, body sizes, every property and field type, and volume.
//!
//! Every test uses its own uniquely named or exclusive queues and
//! exchanges, so the tests run in parallel; what a test creates beyond its
//! connection's life it deletes. Waits are liveness deadlines only.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::proxy::{Direction, FrameKind, FrameSummary, Proxy};
use common::{broker_addr, broker_credentials, broker_params, rabbitmqctl, run_loop};
use pika::spec::{Method, MethodDef, basic, queue};
use pika::table::Decimal;
use pika::{
    BasicConsumeOptions, BasicProperties, Channel, CodecError, Confirmation, ConnectionParameters,
    Error, ExchangeDeclareOptions, FieldTable, FieldValue, LongString, PlainCredentials,
    QueueDeclareOptions, QueueDeleteOptions, SelectConnection,
};

use Direction::{BrokerToClient, ClientToBroker};

/// The watchdog of one test's event loop.
const LIMIT: Duration = Duration::from_secs(30);
/// How long a test waits for the broker to reach a state it polls for.
const SETTLE: Duration = Duration::from_secs(10);

// ----------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------

static NAMES: AtomicUsize = AtomicUsize::new(0);

/// A name no other test (or test run) uses; leaked, so that closures can
/// capture it by copy.
fn unique(what: &str) -> &'static str {
    let n = NAMES.fetch_add(1, Ordering::Relaxed);
    let name = format!("pika-rs.channel.{what}.{}.{n}", std::process::id());
    Box::leak(name.into_boxed_str())
}

thread_local! {
    /// What the callbacks of the test running on this thread saw.
    static LOG: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn log(entry: impl Into<String>) {
    LOG.with(|l| l.borrow_mut().push(entry.into()));
}

/// Takes the log (tests call it first, to start empty, and last).
fn take_log() -> Vec<String> {
    LOG.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

fn exchange_type(kind: &str) -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        exchange_type: kind.into(),
        ..Default::default()
    }
}

fn passive_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in entries {
        t.insert(*k, v.clone());
    }
    t
}

fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) -> Option<u64> {
    ch.basic_publish(
        exchange,
        routing_key,
        body,
        &BasicProperties::default(),
        false,
    )
    .expect("the channel accepts the publish")
}

/// A body whose every byte depends on its position and on `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 11) as u8 ^ seed ^ (i >> 16) as u8)
        .collect()
}

/// Connects with `params` (watchdog [`LIMIT`]); `on_open` runs once open.
/// Returns the connection's terminal errors once the loop stopped.
fn run_connection(
    params: ConnectionParameters,
    on_open: impl FnOnce(&SelectConnection) + 'static,
) -> Vec<Error> {
    let terminal = Rc::new(RefCell::new(Vec::new()));
    let (t1, t2) = (terminal.clone(), terminal.clone());
    let conn = SelectConnection::new(
        params,
        on_open,
        move |conn, e| {
            t1.borrow_mut().push(e);
            conn.ioloop().stop();
        },
        move |conn, e| {
            t2.borrow_mut().push(e);
            conn.ioloop().stop();
        },
    )
    .expect("connection created");
    run_loop(conn.ioloop(), LIMIT);
    terminal.take()
}

/// Connects with `params`, opens a channel and hands it to `body`; returns
/// the connection's terminal errors once it closed.
fn run_with_channel(
    params: ConnectionParameters,
    body: impl FnOnce(&Channel) + 'static,
) -> Vec<Error> {
    run_connection(params, move |conn| {
        conn.channel(None, move |ch| body(&ch.expect("the channel opens")))
            .expect("the connection is open");
    })
}

fn with_channel(body: impl FnOnce(&Channel) + 'static) -> Vec<Error> {
    run_with_channel(broker_params(), body)
}

/// Closes the channel's connection: the end of a test.
fn finish(ch: &Channel) {
    ch.connection()
        .expect("the connection exists")
        .close(200, "done")
        .expect("the connection is open");
}

#[track_caller]
fn assert_closed_by_us(terminal: &[Error]) {
    assert!(
        matches!(
            terminal,
            [Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }]
        ),
        "the connection ended by our close, once: {terminal:?}"
    );
}

/// Opens another channel on `ch`'s connection.
fn open_another(ch: &Channel, then: impl FnOnce(&Channel) + 'static) {
    ch.connection()
        .expect("the connection exists")
        .channel(None, move |r| then(&r.expect("the channel opens")))
        .expect("the connection is open");
}

/// Polls `queue` with passive declares until it holds `expected` messages
/// (deadline [`SETTLE`]), then runs `then`.
fn await_message_count(
    ch: &Channel,
    queue: &'static str,
    expected: u32,
    then: impl FnOnce(&Channel) + 'static,
) {
    fn poll(
        ch: &Channel,
        queue: &'static str,
        expected: u32,
        deadline: Instant,
        then: Box<dyn FnOnce(&Channel)>,
    ) {
        ch.queue_declare(queue, passive(), FieldTable::new(), move |ch, ok| {
            let count = ok.expect("passive declare").message_count;
            if count == expected {
                return then(ch);
            }
            assert!(
                Instant::now() < deadline,
                "{queue} holds {count} messages, not {expected}, after {SETTLE:?}"
            );
            let again = ch.clone();
            ch.connection()
                .unwrap()
                .ioloop()
                .call_later(Duration::from_millis(20), move || {
                    poll(&again, queue, expected, deadline, then)
                });
        })
        .expect("the channel is open");
    }
    poll(ch, queue, expected, Instant::now() + SETTLE, Box::new(then));
}

/// Fetches one message with `basic_get`, which must be there.
fn get_one(
    ch: &Channel,
    queue: &str,
    auto_ack: bool,
    then: impl FnOnce(&Channel, pika::GetMessage) + 'static,
) {
    ch.basic_get(queue, auto_ack, move |ch, r| {
        then(ch, r.expect("basic_get").expect("a message"))
    })
    .expect("the channel is open");
}

/// Runs a list of steps one after the other: each gets the channel and a
/// [`Next`] to call when it is done.
struct Next(Rc<RefCell<VecDeque<Step>>>);
type Step = Box<dyn FnOnce(&Channel, Next)>;

impl Next {
    fn go(self, ch: &Channel) {
        let step = self.0.borrow_mut().pop_front();
        if let Some(step) = step {
            step(ch, Next(self.0.clone()));
        }
    }
}

fn step(f: impl FnOnce(&Channel, Next) + 'static) -> Step {
    Box::new(f)
}

fn run_steps(ch: &Channel, steps: Vec<Step>) {
    Next(Rc::new(RefCell::new(steps.into()))).go(ch);
}

/// Parameters for the real broker, reached through `proxy`.
fn proxied(proxy: &Proxy) -> ConnectionParameters {
    let mut params = broker_params();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(proxy.addr().port())
        .unwrap();
    params
}

fn method_frames(frames: &[FrameSummary]) -> Vec<(&'static str, u16)> {
    frames
        .iter()
        .filter(|f| f.method().is_some())
        .map(|f| (f.name(), f.channel))
        .collect()
}

// ----------------------------------------------------------------------
// Every operation, with its reply
// ----------------------------------------------------------------------

#[test]
fn exchange_declare_bind_unbind_and_delete_each_get_their_reply() {
    take_log();
    let (src, dst, q) = (unique("x-src"), unique("x-dst"), unique("q"));
    let terminal = with_channel(move |ch| {
        run_steps(
            ch,
            vec![
                step(move |ch, next| {
                    ch.exchange_declare(
                        src,
                        exchange_type("fanout"),
                        FieldTable::new(),
                        move |ch, ok| {
                            ok.expect("fanout declared");
                            log("src declared");
                            next.go(ch);
                        },
                    )
                    .unwrap();
                }),
                step(move |ch, next| {
                    ch.exchange_declare(
                        dst,
                        exchange_type("direct"),
                        FieldTable::new(),
                        move |ch, ok| {
                            ok.expect("direct declared");
                            log("dst declared");
                            next.go(ch);
                        },
                    )
                    .unwrap();
                }),
                step(move |ch, next| {
                    ch.queue_declare(q, exclusive(), FieldTable::new(), move |ch, ok| {
                        assert_eq!(ok.expect("queue declared").queue, q);
                        ch.queue_bind(q, dst, Some("k"), FieldTable::new(), move |ch, ok| {
                            ok.expect("queue bound");
                            log("queue bound");
                            next.go(ch);
                        })
                        .unwrap();
                    })
                    .unwrap();
                }),
                step(move |ch, next| {
                    ch.exchange_bind(dst, src, "k", FieldTable::new(), move |ch, ok| {
                        ok.expect("exchange bound");
                        log("exchange bound");
                        // src (fanout) → dst (direct, "k") → q.
                        publish(ch, src, "k", b"m1");
                        await_message_count(ch, q, 1, move |ch| next.go(ch));
                    })
                    .unwrap();
                }),
                step(move |ch, next| {
                    ch.exchange_unbind(dst, src, "k", FieldTable::new(), move |ch, ok| {
                        ok.expect("exchange unbound");
                        log("exchange unbound");
                        publish(ch, src, "k", b"m2 (no route any more)");
                        publish(ch, dst, "k", b"m3");
                        await_message_count(ch, q, 2, move |ch| next.go(ch));
                    })
                    .unwrap();
                }),
                step(move |ch, next| {
                    get_one(ch, q, true, move |ch, m1| {
                        get_one(ch, q, true, move |ch, m3| {
                            log(format!(
                                "got {} {}",
                                String::from_utf8_lossy(&m1.body),
                                String::from_utf8_lossy(&m3.body)
                            ));
                            next.go(ch);
                        })
                    })
                }),
                step(move |ch, next| {
                    ch.exchange_delete(dst, false, |_, ok| {
                        ok.expect("dst deleted");
                        log("dst deleted");
                    })
                    .unwrap();
                    ch.exchange_delete(src, true, move |ch, ok| {
                        ok.expect("src deleted (if_unused: nothing bound to it any more)");
                        log("src deleted");
                        next.go(ch);
                    })
                    .unwrap();
                }),
                step(move |ch, _| {
                    ch.exchange_declare(src, passive_exchange(), FieldTable::new(), |ch, r| {
                        assert!(
                            matches!(
                                r,
                                Err(Error::ChannelClosedByBroker {
                                    reply_code: 404,
                                    ..
                                })
                            ),
                            "{r:?}"
                        );
                        log("src is gone");
                        finish(ch);
                    })
                    .unwrap();
                }),
            ],
        );
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        [
            "src declared",
            "dst declared",
            "queue bound",
            "exchange bound",
            "exchange unbound",
            "got m1 m3",
            "dst deleted",
            "src deleted",
            "src is gone"
        ]
    );
}

#[test]
fn nowait_forms_take_effect_as_later_replies_show() {
    take_log();
    let (x, fan, q) = (unique("x"), unique("x-fan"), unique("q"));
    let terminal = with_channel(move |ch| {
        run_steps(
            ch,
            vec![
                step(move |ch, next| {
                    ch.exchange_declare_nowait(x, exchange_type("direct"), FieldTable::new())
                        .unwrap();
                    ch.exchange_declare_nowait(fan, exchange_type("fanout"), FieldTable::new())
                        .unwrap();
                    ch.queue_declare_nowait(q, exclusive(), FieldTable::new())
                        .unwrap();
                    ch.queue_bind_nowait(q, x, Some("k"), FieldTable::new())
                        .unwrap();
                    ch.exchange_bind_nowait(x, fan, "", FieldTable::new())
                        .unwrap();
                    // Replies to later requests prove the nowait ones happened.
                    ch.exchange_declare(x, passive_exchange(), FieldTable::new(), |_, ok| {
                        ok.expect("the nowait exchange exists");
                    })
                    .unwrap();
                    ch.queue_declare(q, passive(), FieldTable::new(), move |ch, ok| {
                        let ok = ok.expect("the nowait queue exists");
                        assert_eq!((ok.message_count, ok.consumer_count), (0, 0));
                        // Through fan → x → q: both nowait binds are in place.
                        publish(ch, fan, "k", b"a");
                        await_message_count(ch, q, 1, move |ch| next.go(ch));
                    })
                    .unwrap();
                }),
                step(move |ch, next| {
                    ch.queue_purge_nowait(q).unwrap();
                    ch.queue_declare(q, passive(), FieldTable::new(), move |ch, ok| {
                        assert_eq!(ok.unwrap().message_count, 0, "purged");
                        log("purged");
                        next.go(ch);
                    })
                    .unwrap();
                }),
                step(move |ch, next| {
                    // The nowait cancel only once the ConsumeOk is in: sent
                    // while the Consume is in flight, RabbitMQ 3.10's channel
                    // crashes (541 INTERNAL_ERROR, badkey in
                    // rabbit_channel:consumer_monitor/2).
                    let tag = ch
                        .basic_consume(
                            q,
                            |_, d| panic!("no message expected: {d:?}"),
                            BasicConsumeOptions::default(),
                            move |ch, ok| {
                                let tag = ok.expect("consuming").consumer_tag;
                                assert_eq!(ch.consumer_tags(), std::slice::from_ref(&tag));
                                ch.basic_cancel_nowait(&tag).unwrap();
                                assert!(ch.consumer_tags().is_empty(), "forgotten at once");
                                ch.queue_declare(q, passive(), FieldTable::new(), move |ch, ok| {
                                    assert_eq!(ok.unwrap().consumer_count, 0, "cancelled");
                                    log("cancelled");
                                    next.go(ch);
                                })
                                .unwrap();
                            },
                        )
                        .unwrap();
                    assert_eq!(ch.consumer_tags(), [tag]);
                }),
                step(move |ch, next| {
                    ch.exchange_unbind_nowait(x, fan, "", FieldTable::new())
                        .unwrap();
                    publish(ch, fan, "k", b"b (no route any more)");
                    publish(ch, x, "k", b"c");
                    await_message_count(ch, q, 1, move |ch| {
                        get_one(ch, q, true, move |ch, m| {
                            assert_eq!(m.body, b"c");
                            log("unbound");
                            next.go(ch);
                        })
                    });
                }),
                step(move |ch, _| {
                    ch.queue_delete_nowait(q, QueueDeleteOptions::default())
                        .unwrap();
                    ch.exchange_delete_nowait(fan, false).unwrap();
                    ch.exchange_delete_nowait(x, false).unwrap();
                    // Each passive check on its own channel (a 404 closes it),
                    // the first on this one: once it fails, this channel's
                    // deletes are done (a channel's methods run in order on
                    // the broker; different channels' do not), so the
                    // other checks start then.
                    fn gone(what: &str, r: Result<(), Error>) {
                        assert!(
                            matches!(
                                r,
                                Err(Error::ChannelClosedByBroker {
                                    reply_code: 404,
                                    ..
                                })
                            ),
                            "{what}: {r:?}"
                        );
                    }
                    ch.queue_declare(q, passive(), FieldTable::new(), move |ch, r| {
                        gone("queue", r.map(drop));
                        open_another(ch, move |ch| {
                            ch.exchange_declare(
                                x,
                                passive_exchange(),
                                FieldTable::new(),
                                move |ch, r| {
                                    gone("x", r.map(drop));
                                    open_another(ch, move |ch| {
                                        ch.exchange_declare(
                                            fan,
                                            passive_exchange(),
                                            FieldTable::new(),
                                            move |ch, r| {
                                                gone("fan", r.map(drop));
                                                log("all deleted");
                                                finish(ch);
                                            },
                                        )
                                        .unwrap();
                                    });
                                },
                            )
                            .unwrap();
                        });
                    })
                    .unwrap();
                }),
            ],
        );
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        ["purged", "cancelled", "unbound", "all deleted"]
    );
}

#[test]
fn queue_bind_unbind_purge_and_delete_report_their_counts() {
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        run_steps(
            ch,
            vec![
                step(move |ch, next| {
                    ch.queue_declare(q, exclusive(), FieldTable::new(), move |ch, ok| {
                        let ok = ok.unwrap();
                        assert_eq!(
                            (ok.queue.as_str(), ok.message_count, ok.consumer_count),
                            (q, 0, 0)
                        );
                        ch.queue_bind(q, "amq.direct", None, FieldTable::new(), move |ch, ok| {
                            ok.expect("bound");
                            for _ in 0..3 {
                                publish(ch, "amq.direct", q, b"via amq.direct");
                            }
                            await_message_count(ch, q, 3, move |ch| next.go(ch));
                        })
                        .unwrap();
                    })
                    .unwrap();
                }),
                step(move |ch, next| {
                    ch.queue_unbind(q, "amq.direct", None, FieldTable::new(), move |ch, ok| {
                        ok.expect("unbound");
                        publish(ch, "amq.direct", q, b"no route any more");
                        publish(ch, "", q, b"via the default exchange");
                        ch.queue_purge(q, move |ch, ok| {
                            log(format!("purged {}", ok.unwrap().message_count));
                            next.go(ch);
                        })
                        .unwrap();
                    })
                    .unwrap();
                }),
                step(move |ch, _| {
                    publish(ch, "", q, b"1");
                    publish(ch, "", q, b"2");
                    ch.queue_delete(q, QueueDeleteOptions::default(), move |ch, ok| {
                        log(format!("deleted {}", ok.unwrap().message_count));
                        finish(ch);
                    })
                    .unwrap();
                }),
            ],
        );
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["purged 4", "deleted 2"]);
}

#[test]
fn queue_delete_if_empty_and_if_unused_refuse_with_406_and_keep_the_queue() {
    take_log();
    let (full, used) = (unique("full"), unique("used"));
    let terminal = with_channel(move |ch| {
        ch.queue_declare(full, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        ch.queue_declare(used, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        publish(ch, "", full, b"x");
        await_message_count(ch, full, 1, move |ch| {
            // A consumer on another channel of this connection.
            let ch = ch.clone();
            open_another(&ch.clone(), move |consumer| {
                consumer
                    .basic_consume(
                        used,
                        |_, _| {},
                        BasicConsumeOptions::default(),
                        move |_, ok| {
                            ok.unwrap();
                            let refused = |what: &'static str| {
                                move |ch: &Channel, r: Result<queue::DeleteOk, Error>| {
                                    match r {
                                        Err(Error::ChannelClosedByBroker {
                                            reply_code: 406,
                                            reply_text,
                                        }) => {
                                            assert!(
                                                reply_text.starts_with("PRECONDITION_FAILED"),
                                                "{reply_text}"
                                            );
                                            log(format!("{what} refused"));
                                        }
                                        other => panic!("{what}: {other:?}"),
                                    }
                                    ch.clone()
                                }
                            };
                            let if_empty = QueueDeleteOptions {
                                if_empty: true,
                                ..Default::default()
                            };
                            let if_unused = QueueDeleteOptions {
                                if_unused: true,
                                ..Default::default()
                            };
                            ch.queue_delete(full, if_empty, move |ch, r| {
                                let ch = refused("if_empty")(ch, r);
                                open_another(&ch, move |ch| {
                                    ch.queue_delete(used, if_unused, move |ch, r| {
                                        let ch = refused("if_unused")(ch, r);
                                        open_another(&ch, move |ch| {
                                            ch.queue_declare(
                                                full,
                                                passive(),
                                                FieldTable::new(),
                                                |_, ok| {
                                                    assert_eq!(
                                                        ok.unwrap().message_count,
                                                        1,
                                                        "still there"
                                                    );
                                                },
                                            )
                                            .unwrap();
                                            ch.queue_declare(
                                                used,
                                                passive(),
                                                FieldTable::new(),
                                                |ch, ok| {
                                                    assert_eq!(
                                                        ok.unwrap().consumer_count,
                                                        1,
                                                        "still there"
                                                    );
                                                    finish(ch);
                                                },
                                            )
                                            .unwrap();
                                        });
                                    })
                                    .unwrap();
                                });
                            })
                            .unwrap();
                        },
                    )
                    .unwrap();
            });
        });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["if_empty refused", "if_unused refused"]);
}

#[test]
fn tx_commit_delivers_and_tx_rollback_discards() {
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        run_steps(
            ch,
            vec![
                step(move |ch, next| {
                    ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
                        ok.unwrap();
                    })
                    .unwrap();
                    ch.tx_select(move |ch, ok| {
                        ok.expect("tx selected");
                        next.go(ch);
                    })
                    .unwrap();
                }),
                step(move |ch, next| {
                    publish(ch, "", q, b"rolled back");
                    ch.tx_rollback(move |ch, ok| {
                        ok.expect("rolled back");
                        ch.basic_get(q, true, move |ch, got| {
                            assert!(
                                got.unwrap().is_none(),
                                "a rolled-back publish is not in the queue"
                            );
                            log("rollback left the queue empty");
                            next.go(ch);
                        })
                        .unwrap();
                    })
                    .unwrap();
                }),
                step(move |ch, _| {
                    publish(ch, "", q, b"committed");
                    ch.tx_commit(move |ch, ok| {
                        ok.expect("committed");
                        get_one(ch, q, true, |ch, m| {
                            assert_eq!(m.body, b"committed");
                            assert_eq!(m.method.message_count, 0);
                            log("commit delivered");
                            finish(ch);
                        });
                    })
                    .unwrap();
                }),
            ],
        );
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        ["rollback left the queue empty", "commit delivered"]
    );
}

#[test]
fn basic_qos_flow_true_recover_requeue_and_the_generic_callback_hook() {
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        ch.add_callback(&[basic::QosOk::ID], true, |_, m| {
            assert!(matches!(m, Method::BasicQosOk(_)));
            log("hook: Basic.QosOk (one shot)");
        });
        ch.add_callback(
            &[queue::DeclareOk::ID, basic::RecoverOk::ID],
            false,
            |_, m| {
                log(format!("hook: {}", m.name()));
            },
        );
        run_steps(
            ch,
            vec![
                step(move |ch, next| {
                    ch.basic_qos(0, 5, false, |_, ok| {
                        ok.expect("qos");
                        log("qos ok");
                    })
                    .unwrap();
                    ch.basic_qos(0, 10, true, move |ch, ok| {
                        ok.expect("global qos");
                        log("qos ok");
                        next.go(ch);
                    })
                    .unwrap();
                }),
                step(move |ch, next| {
                    ch.flow(true, move |ch, active| {
                        assert!(active.expect("flow(true)"), "the broker confirms active");
                        log("flow active");
                        next.go(ch);
                    })
                    .unwrap();
                }),
                step(move |ch, _| {
                    ch.queue_declare(q, exclusive(), FieldTable::new(), move |ch, ok| {
                        ok.unwrap();
                        publish(ch, "", q, b"r");
                        ch.basic_consume(
                            q,
                            |ch, d| {
                                log(format!("delivery redelivered={}", d.method.redelivered));
                                if !d.method.redelivered {
                                    ch.basic_recover(true, |_, ok| {
                                        ok.expect("recover");
                                        log("recover ok");
                                    })
                                    .unwrap();
                                } else {
                                    ch.basic_ack(d.method.delivery_tag, false).unwrap();
                                    finish(ch);
                                }
                            },
                            BasicConsumeOptions::default(),
                            |_, ok| {
                                ok.unwrap();
                            },
                        )
                        .unwrap();
                    })
                    .unwrap();
                }),
            ],
        );
    });
    assert_closed_by_us(&terminal);
    let log = take_log();
    // The hook runs before the reply's own completion; the one-shot hook
    // only once. The redelivery may come before or after the RecoverOk.
    assert_eq!(
        log[..6],
        [
            "hook: Basic.QosOk (one shot)",
            "qos ok",
            "qos ok",
            "flow active",
            "hook: Queue.DeclareOk",
            "delivery redelivered=false"
        ]
    );
    let mut rest = log[6..].to_vec();
    rest.sort();
    assert_eq!(
        rest,
        [
            "delivery redelivered=true",
            "hook: Basic.RecoverOk",
            "recover ok"
        ]
    );
    let hook = log
        .iter()
        .position(|e| e == "hook: Basic.RecoverOk")
        .unwrap();
    assert_eq!(log[hook + 1], "recover ok");
}

#[test]
fn basic_get_empty_reject_and_nack_requeue_or_drop() {
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        run_steps(
            ch,
            vec![
                step(move |ch, next| {
                    ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
                        ok.unwrap();
                    })
                    .unwrap();
                    ch.basic_get(q, false, move |ch, r| {
                        assert!(r.unwrap().is_none(), "Basic.GetEmpty");
                        next.go(ch);
                    })
                    .unwrap();
                }),
                step(move |ch, next| {
                    publish(ch, "", q, b"a");
                    get_one(ch, q, false, move |ch, m| {
                        assert_eq!(
                            (m.body.as_slice(), m.method.redelivered),
                            (&b"a"[..], false)
                        );
                        assert_eq!(m.method.message_count, 0);
                        assert_eq!(m.method.routing_key, q);
                        ch.basic_reject(m.method.delivery_tag, true).unwrap();
                        get_one(ch, q, false, move |ch, m| {
                            assert!(m.method.redelivered, "rejected with requeue");
                            ch.basic_nack(m.method.delivery_tag, false, false).unwrap();
                            ch.basic_get(q, false, move |ch, r| {
                                assert!(r.unwrap().is_none(), "nacked without requeue: dropped");
                                next.go(ch);
                            })
                            .unwrap();
                        });
                    });
                }),
                step(move |ch, _| {
                    publish(ch, "", q, b"b");
                    publish(ch, "", q, b"c");
                    get_one(ch, q, false, move |ch, b| {
                        get_one(ch, q, false, move |ch, c| {
                            assert_eq!(
                                (b.body.as_slice(), c.body.as_slice()),
                                (&b"b"[..], &b"c"[..])
                            );
                            ch.basic_nack(c.method.delivery_tag, true, true).unwrap();
                            await_message_count(ch, q, 2, |ch| {
                                get_one(ch, q, true, |ch, m| {
                                    assert_eq!(m.body, b"b");
                                    assert!(m.method.redelivered);
                                    log("multiple nack requeued both");
                                    finish(ch);
                                })
                            });
                        })
                    });
                }),
            ],
        );
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["multiple nack requeued both"]);
}

#[test]
fn consumer_tags_track_consume_and_cancel_and_generated_tags_are_unique_across_channels() {
    take_log();
    let all_tags = Rc::new(RefCell::new(Vec::<String>::new()));
    let channels = Rc::new(RefCell::new(Vec::<Channel>::new()));
    let consume_oks = Rc::new(Cell::new(0));
    let (tags, chans) = (all_tags.clone(), channels.clone());
    let terminal = run_connection(broker_params(), move |conn| {
        for _ in 0..3 {
            let (tags, chans, oks) = (tags.clone(), chans.clone(), consume_oks.clone());
            conn.channel(None, move |ch| {
                let ch = ch.unwrap();
                chans.borrow_mut().push(ch.clone());
                let q = unique("q");
                ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
                    ok.unwrap();
                })
                .unwrap();
                let mut mine = Vec::new();
                for _ in 0..2 {
                    let (tags2, chans2, oks) = (tags.clone(), chans.clone(), oks.clone());
                    let tag = ch
                        .basic_consume(
                            q,
                            |_, _| {},
                            BasicConsumeOptions::default(),
                            move |ch, ok| {
                                let ok = ok.expect("consuming");
                                assert!(
                                    tags2.borrow().contains(&ok.consumer_tag),
                                    "ConsumeOk names our tag"
                                );
                                oks.set(oks.get() + 1);
                                if oks.get() == 6 {
                                    for c in chans2.borrow().iter() {
                                        assert_eq!(c.consumer_tags().len(), 2);
                                    }
                                    cancel_one(ch);
                                }
                            },
                        )
                        .unwrap();
                    tags.borrow_mut().push(tag.clone());
                    mine.push(tag);
                }
                mine.sort();
                assert_eq!(ch.consumer_tags(), mine, "listed at once, sorted");
            })
            .unwrap();
        }
    });
    fn cancel_one(ch: &Channel) {
        let tags = ch.consumer_tags();
        let (gone, keep) = (tags[0].clone(), tags[1].clone());
        ch.basic_cancel(&gone.clone(), move |ch, ok| {
            assert_eq!(ok.expect("cancelled").consumer_tag, gone);
            assert_eq!(ch.consumer_tags(), [keep]);
            log("cancelled one");
            finish(ch);
        })
        .unwrap();
        assert_eq!(ch.consumer_tags().len(), 1, "not listed once cancelling");
    }
    assert_closed_by_us(&terminal);
    assert_eq!(channels.borrow().len(), 3);
    let tags = all_tags.borrow();
    let distinct: BTreeSet<&String> = tags.iter().collect();
    assert_eq!((tags.len(), distinct.len()), (6, 6), "{tags:?}");
    assert_eq!(take_log(), ["cancelled one"]);
}

// ----------------------------------------------------------------------
// The broker's errors (RELIABILITY 19–23)
// ----------------------------------------------------------------------

/// Runs `fail` on a fresh channel, expecting it to close the channel with
/// `code`: the failing call's completion and the channel's close callback
/// both get `ChannelClosedByBroker(code)` (in that order), and the
/// connection stays usable: another channel declares a queue. Returns the
/// broker's reply text.
fn channel_error(
    code: u16,
    fail: impl FnOnce(&Channel, Box<dyn FnOnce(Result<(), Error>)>) + 'static,
) -> String {
    take_log();
    let text = Rc::new(RefCell::new(String::new()));
    let t = text.clone();
    let terminal = with_channel(move |ch| {
        ch.add_on_close_callback(move |ch, reason| {
            match &reason {
                Error::ChannelClosedByBroker {
                    reply_code,
                    reply_text,
                } if *reply_code == code => {
                    *t.borrow_mut() = reply_text.clone();
                }
                other => panic!("close callback: {other:?}"),
            }
            log("channel close callback");
            assert!(ch.is_closed());
            let conn = ch.connection().unwrap();
            assert!(conn.is_open(), "a channel error leaves the connection open");
            conn.channel(None, |r| {
                let ch = r.expect("another channel opens");
                ch.queue_declare("", exclusive(), FieldTable::new(), |ch, ok| {
                    ok.expect("and works");
                    log("another channel works");
                    finish(ch);
                })
                .unwrap();
            })
            .unwrap();
        });
        fail(
            ch,
            Box::new(move |r| {
                assert!(
                    matches!(&r, Err(Error::ChannelClosedByBroker { reply_code, .. }) if *reply_code == code),
                    "completion: {r:?}"
                );
                log("completion");
            }),
        );
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        [
            "completion",
            "channel close callback",
            "another channel works"
        ]
    );
    text.take()
}

#[test]
fn passive_declare_of_a_missing_queue_fails_with_404_and_the_connection_stays_usable() {
    let q = unique("missing");
    let text = channel_error(404, move |ch, done| {
        ch.queue_declare(q, passive(), FieldTable::new(), move |_, r| {
            done(r.map(drop))
        })
        .unwrap();
    });
    assert!(text.starts_with("NOT_FOUND") && text.contains(q), "{text}");
}

#[test]
fn passive_declare_of_a_missing_exchange_fails_with_404_and_the_connection_stays_usable() {
    let x = unique("missing");
    let text = channel_error(404, move |ch, done| {
        ch.exchange_declare(x, passive_exchange(), FieldTable::new(), move |_, r| {
            done(r.map(drop))
        })
        .unwrap();
    });
    assert!(text.starts_with("NOT_FOUND") && text.contains(x), "{text}");
}

#[test]
fn redeclare_with_different_arguments_fails_with_406() {
    let q = unique("q");
    let text = channel_error(406, move |ch, done| {
        let ten = table(&[("x-max-length", FieldValue::I32(10))]);
        ch.queue_declare(q, exclusive(), ten, |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        let twenty = table(&[("x-max-length", FieldValue::I32(20))]);
        ch.queue_declare(q, exclusive(), twenty, move |_, r| done(r.map(drop)))
            .unwrap();
    });
    assert!(
        text.starts_with("PRECONDITION_FAILED") && text.contains("inequivalent arg"),
        "{text}"
    );
}

#[test]
fn double_ack_fails_with_406_unknown_delivery_tag() {
    let q = unique("q");
    let text = channel_error(406, move |ch, done| {
        // The ack itself has no completion: the declare queued behind it
        // gets the channel's error.
        ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        publish(ch, "", q, b"once");
        get_one(ch, q, false, move |ch, m| {
            ch.basic_ack(m.method.delivery_tag, false).unwrap();
            ch.basic_ack(m.method.delivery_tag, false).unwrap();
            ch.queue_declare(q, passive(), FieldTable::new(), move |_, r| {
                done(r.map(drop))
            })
            .unwrap();
        });
    });
    assert_eq!(text, "PRECONDITION_FAILED - unknown delivery tag 1");
}

#[test]
fn ack_of_a_made_up_delivery_tag_fails_with_406_and_acks_on_the_closed_channel_fail_at_the_call() {
    take_log();
    let proxy = Rc::new(Proxy::start(broker_addr()));
    let terminal = run_with_channel(proxied(&proxy), move |ch| {
        ch.add_on_close_callback(move |ch, reason| {
            assert!(
                matches!(&reason, Error::ChannelClosedByBroker { reply_code: 406, reply_text }
                    if reply_text == "PRECONDITION_FAILED - unknown delivery tag 12345"),
                "{reason:?}"
            );
            for r in [
                ch.basic_ack(1, false),
                ch.basic_nack(1, false, true),
                ch.basic_reject(1, true),
            ] {
                assert!(matches!(r, Err(Error::ChannelWrongState { .. })), "{r:?}");
            }
            log("refused at the call");
            finish(ch);
        });
        ch.basic_ack(12345, false).unwrap();
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["refused at the call"]);
    let sent: Vec<&'static str> = proxy
        .frames(ClientToBroker)
        .iter()
        .map(FrameSummary::name)
        .filter(|n| ["Basic.Ack", "Basic.Nack", "Basic.Reject"].contains(n))
        .collect();
    assert_eq!(
        sent,
        ["Basic.Ack"],
        "only the made-up ack reached the broker"
    );
}

/// A broker user with permissions only on names starting `pika-allowed.`;
/// deleted when dropped.
struct RestrictedUser {
    name: String,
    password: String,
}

impl RestrictedUser {
    fn create() -> RestrictedUser {
        let name = format!(
            "pika-rs-restricted-{}-{}",
            std::process::id(),
            NAMES.fetch_add(1, Ordering::Relaxed)
        );
        let password = "restricted-secret".to_string();
        rabbitmqctl(&["add_user", &name, &password]);
        let user = RestrictedUser { name, password };
        let allowed = "^pika-allowed\\..*";
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            &user.name,
            allowed,
            allowed,
            allowed,
        ]);
        user
    }
}

impl Drop for RestrictedUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }
}

#[test]
fn restricted_user_outside_its_permissions_gets_403() {
    take_log();
    let user = RestrictedUser::create();
    let mut params = broker_params();
    params.set_credentials(PlainCredentials::new(
        user.name.clone(),
        user.password.clone(),
    ));
    let allowed: &'static str = Box::leak(format!("pika-allowed.{}", unique("q")).into_boxed_str());
    let forbidden = unique("q");
    let terminal = run_with_channel(params, move |ch| {
        ch.queue_declare(allowed, exclusive(), FieldTable::new(), |_, ok| {
            ok.expect("inside the permissions");
            log("allowed declared");
        })
        .unwrap();
        ch.add_on_close_callback(|ch, reason| {
            assert!(
                matches!(
                    reason,
                    Error::ChannelClosedByBroker {
                        reply_code: 403,
                        ..
                    }
                ),
                "{reason:?}"
            );
            log("channel closed 403");
            open_another(ch, |ch| {
                ch.queue_declare(allowed, passive(), FieldTable::new(), |ch, ok| {
                    ok.expect("the connection still works");
                    finish(ch);
                })
                .unwrap();
            });
        });
        ch.queue_declare(
            forbidden,
            exclusive(),
            FieldTable::new(),
            move |_, r| match r {
                Err(Error::ChannelClosedByBroker {
                    reply_code: 403,
                    reply_text,
                }) => {
                    assert!(
                        reply_text.starts_with("ACCESS_REFUSED") && reply_text.contains(forbidden),
                        "{reply_text}"
                    );
                    log("forbidden refused 403");
                }
                other => panic!("{other:?}"),
            },
        )
        .unwrap();
    });
    drop(user);
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        [
            "allowed declared",
            "forbidden refused 403",
            "channel closed 403"
        ]
    );
}

/// Starts a connection on `lp`; the loop stops once `closed` counts
/// `of` closed connections.
fn connect_on(
    lp: &pika::IoLoop,
    closed: &Rc<Cell<u32>>,
    of: u32,
    on_open: impl FnOnce(&SelectConnection) + 'static,
) -> SelectConnection {
    let closed = closed.clone();
    SelectConnection::create(
        vec![broker_params()],
        on_open,
        |_, e| panic!("open failed: {e}"),
        move |conn, e| {
            assert!(matches!(e, Error::ConnectionClosedByClient { .. }), "{e:?}");
            closed.set(closed.get() + 1);
            if closed.get() == of {
                conn.ioloop().stop();
            }
        },
        Some(lp.clone()),
    )
    .expect("connection created")
}

#[test]
fn another_connections_exclusive_queue_is_locked_with_405() {
    take_log();
    let q = unique("q");
    let lp = pika::IoLoop::new().unwrap();
    let closed = Rc::new(Cell::new(0));
    let (lp2, closed2) = (lp.clone(), closed.clone());
    let _owner = connect_on(&lp, &closed, 2, move |conn| {
        conn.channel(None, move |r| {
            let owner = r.unwrap();
            owner
                .queue_declare(q, exclusive(), FieldTable::new(), move |owner, ok| {
                    ok.unwrap();
                    log("owner declared");
                    let owner = owner.clone();
                    connect_on(&lp2, &closed2, 2, move |other| {
                        other
                            .channel(None, move |r| {
                                let ch = r.unwrap();
                                ch.add_on_close_callback(|_, reason| {
                                    assert_eq!(reason.reply_code(), Some(405), "{reason:?}");
                                    log("other's channel closed 405");
                                });
                                ch.queue_declare(q, passive(), FieldTable::new(), move |ch, r| {
                                    match r {
                                        Err(Error::ChannelClosedByBroker {
                                            reply_code: 405,
                                            reply_text,
                                        }) => {
                                            assert!(
                                                reply_text.starts_with("RESOURCE_LOCKED"),
                                                "{reply_text}"
                                            );
                                            log("other refused 405");
                                        }
                                        other => panic!("{other:?}"),
                                    }
                                    finish(ch);
                                    finish(&owner);
                                })
                                .unwrap();
                            })
                            .unwrap();
                    });
                })
                .unwrap();
        })
        .unwrap();
    });
    run_loop(&lp, LIMIT);
    assert_eq!(closed.get(), 2);
    assert_eq!(
        take_log(),
        [
            "owner declared",
            "other refused 405",
            "other's channel closed 405"
        ]
    );
}

#[test]
fn invalid_exchange_type_closes_the_connection_with_503() {
    take_log();
    let x = unique("x");
    let terminal = with_channel(move |ch| {
        ch.add_on_close_callback(|_, reason| {
            assert!(
                matches!(&reason, Error::ConnectionClosedByBroker { reply_code: 503, reply_text }
                    if reply_text.starts_with("COMMAND_INVALID") && reply_text.contains("no-such-type")),
                "{reason:?}"
            );
            log("channel close callback 503");
        });
        ch.connection().unwrap().add_on_close_callback(|_, reason| {
            assert_eq!(reason.reply_code(), Some(503));
            log("connection close callback 503");
        });
        ch.exchange_declare(
            x,
            exchange_type("no-such-type"),
            FieldTable::new(),
            |_, r| {
                assert!(
                    matches!(
                        r,
                        Err(Error::ConnectionClosedByBroker {
                            reply_code: 503,
                            ..
                        })
                    ),
                    "{r:?}"
                );
                log("completion 503");
            },
        )
        .unwrap();
    });
    assert!(
        matches!(
            terminal.as_slice(),
            [Error::ConnectionClosedByBroker {
                reply_code: 503,
                ..
            }]
        ),
        "{terminal:?}"
    );
    assert_eq!(
        take_log(),
        [
            "completion 503",
            "channel close callback 503",
            "connection close callback 503"
        ]
    );
}

/// Runs `call` on an open channel and expects RabbitMQ to close the
/// *connection* with 540 NOT_IMPLEMENTED; returns the reply text.
fn not_implemented(
    call: impl FnOnce(&Channel, Box<dyn FnOnce(Result<(), Error>)>) + 'static,
) -> String {
    take_log();
    let terminal = with_channel(move |ch| {
        ch.add_on_close_callback(|_, reason| {
            assert_eq!(reason.reply_code(), Some(540), "{reason:?}");
            log("channel close callback");
        });
        call(
            ch,
            Box::new(|r| {
                assert!(
                    matches!(
                        r,
                        Err(Error::ConnectionClosedByBroker {
                            reply_code: 540,
                            ..
                        })
                    ),
                    "{r:?}"
                );
                log("completion");
            }),
        );
    });
    assert_eq!(take_log(), ["completion", "channel close callback"]);
    match terminal.as_slice() {
        [
            Error::ConnectionClosedByBroker {
                reply_code: 540,
                reply_text,
            },
        ] => reply_text.clone(),
        other => panic!("expected a connection close with 540: {other:?}"),
    }
}

#[test]
fn flow_false_closes_the_connection_with_540_not_implemented() {
    let text = not_implemented(|ch, done| {
        ch.flow(false, move |_, r| done(r.map(drop))).unwrap();
    });
    assert!(
        text.starts_with("NOT_IMPLEMENTED") && text.contains("active=false"),
        "{text}"
    );
}

#[test]
fn basic_recover_without_requeue_closes_the_connection_with_540_not_implemented() {
    let text = not_implemented(|ch, done| {
        ch.basic_recover(false, move |_, r| done(r.map(drop)))
            .unwrap();
    });
    assert!(
        text.starts_with("NOT_IMPLEMENTED") && text.contains("requeue=false"),
        "{text}"
    );
}

#[test]
fn basic_qos_with_a_prefetch_size_closes_the_connection_with_540_not_implemented() {
    let text = not_implemented(|ch, done| {
        ch.basic_qos(4096, 0, false, move |_, r| done(r.map(drop)))
            .unwrap();
    });
    assert!(
        text.starts_with("NOT_IMPLEMENTED") && text.contains("prefetch_size"),
        "{text}"
    );
}

// ----------------------------------------------------------------------
// frame_max (RELIABILITY 25)
// ----------------------------------------------------------------------

#[test]
fn frame_max_4096_round_trips_empty_and_1_mib_bodies_in_frames_within_frame_max() {
    let proxy = Proxy::start(broker_addr());
    let mut params = proxied(&proxy);
    params.set_frame_max(4096).unwrap();
    let q = unique("q");
    let big = pattern(1 << 20, 0x5a);
    let sent = big.clone();
    let got = Rc::new(RefCell::new(Vec::<Vec<u8>>::new()));
    let g = got.clone();
    let terminal = run_with_channel(params, move |ch| {
        assert_eq!(ch.connection().unwrap().frame_max(), 4096);
        ch.queue_declare(q, exclusive(), FieldTable::new(), move |ch, ok| {
            ok.unwrap();
            publish(ch, "", q, b"");
            publish(ch, "", q, &sent);
            get_one(ch, q, true, move |ch, empty| {
                g.borrow_mut().push(empty.body);
                get_one(ch, q, true, move |ch, big| {
                    g.borrow_mut().push(big.body);
                    finish(ch);
                });
            });
        })
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    let got = got.borrow();
    assert!(got[0].is_empty());
    assert!(got[1] == big, "the 1 MiB body came back different");
    for dir in Direction::BOTH {
        let frames = proxy.frames(dir);
        let headers: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f.kind {
                FrameKind::Header { body_size, .. } => Some(body_size),
                _ => None,
            })
            .collect();
        assert_eq!(headers, [0, 1 << 20], "{dir:?}");
        let bodies: Vec<usize> = frames
            .iter()
            .filter(|f| f.kind == FrameKind::Body)
            .map(|f| f.size)
            .collect();
        // No body frame for the empty message; 1 MiB in frames of at most
        // frame_max − 8 = 4088 bytes.
        assert_eq!(bodies.len(), (1usize << 20).div_ceil(4088), "{dir:?}");
        assert!(bodies.iter().all(|&s| s <= 4088), "{dir:?}: {bodies:?}");
        assert_eq!(bodies.iter().sum::<usize>(), 1 << 20);
        let over: Vec<&FrameSummary> = frames.iter().filter(|f| f.size + 8 > 4096).collect();
        assert!(over.is_empty(), "{dir:?}: frames over frame_max: {over:?}");
    }
}

#[test]
fn content_header_over_frame_max_is_an_encode_error_at_the_call_and_nothing_is_sent() {
    take_log();
    let proxy = Proxy::start(broker_addr());
    let mut params = proxied(&proxy);
    params.set_frame_max(4096).unwrap();
    let q = unique("q");
    let terminal = run_with_channel(params, move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), move |ch, ok| {
            ok.unwrap();
            ch.confirm_delivery(
                |ch, c| {
                    assert!(
                        matches!(
                            c,
                            Confirmation::Ack {
                                delivery_tag: 1,
                                ..
                            }
                        ),
                        "{c:?}"
                    );
                    get_one(ch, q, true, |ch, m| {
                        assert_eq!(m.body, b"small header");
                        log("the channel still works");
                        finish(ch);
                    });
                },
                |_, ok| {
                    ok.unwrap();
                },
            )
            .unwrap();
            let huge = table(&[("big", FieldValue::from("h".repeat(5000)))]);
            let props = BasicProperties::default().with_headers(huge);
            let r = ch.basic_publish("", q, b"huge header", &props, false);
            match r {
                Err(Error::Encode(CodecError::EncodedFrameTooLarge {
                    what: "content header",
                    frame_max: 4096,
                    size,
                })) => {
                    assert!(size > 5000, "{size}");
                    log("refused at the call");
                }
                other => panic!("{other:?}"),
            }
            assert!(ch.is_open());
            assert!(ch.unconfirmed_delivery_tags().is_empty(), "no tag used");
            let tag = publish(ch, "", q, b"small header");
            assert_eq!(tag, Some(1), "the refused publish took no delivery tag");
        })
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        ["refused at the call", "the channel still works"]
    );
    let publishes = proxy
        .frames(ClientToBroker)
        .iter()
        .filter(|f| f.name() == "Basic.Publish" || matches!(f.kind, FrameKind::Header { .. }))
        .count();
    assert_eq!(
        publishes, 2,
        "one Basic.Publish and its header: the refused one sent nothing"
    );
}

// ----------------------------------------------------------------------
// Confirms, returns, no loss (RELIABILITY 28–31)
// ----------------------------------------------------------------------

/// What became of each delivery tag, from the confirmations as they came:
/// every tag settles exactly once.
#[derive(Default)]
struct Confirms {
    outstanding: BTreeSet<u64>,
    outcome: BTreeMap<u64, &'static str>,
    failed_with: Vec<Error>,
}

impl Confirms {
    fn published(&mut self, tag: Option<u64>) {
        let tag = tag.expect("confirm mode gives a delivery tag");
        assert!(self.outstanding.insert(tag), "tag {tag} given twice");
    }

    /// Records one confirmation; returns the tags it settled (which the
    /// confirmation lists itself: checked against the outstanding tags).
    fn record(&mut self, c: &Confirmation) -> Vec<u64> {
        let (kind, tags): (&'static str, Vec<u64>) = match *c {
            Confirmation::Ack {
                delivery_tag,
                multiple,
                ..
            }
            | Confirmation::Nack {
                delivery_tag,
                multiple,
                ..
            } => {
                let kind = if c.is_ack() { "ack" } else { "nack" };
                if multiple {
                    let covered: Vec<u64> =
                        self.outstanding.range(..=delivery_tag).copied().collect();
                    assert!(
                        !covered.is_empty(),
                        "a multiple {kind} up to {delivery_tag} settles nothing"
                    );
                    (kind, covered)
                } else {
                    (kind, vec![delivery_tag])
                }
            }
            Confirmation::Failed {
                ref settled,
                ref error,
            } => {
                self.failed_with.push(error.clone());
                ("failed", settled.clone())
            }
        };
        assert_eq!(c.settled(), tags, "the confirmation lists what it settles");
        for &tag in &tags {
            assert!(
                self.outstanding.remove(&tag),
                "tag {tag} settled twice, or never published: {c:?}"
            );
            self.outcome.insert(tag, kind);
        }
        tags
    }

    fn count(&self, kind: &str) -> usize {
        self.outcome.values().filter(|k| **k == kind).count()
    }
}

#[test]
fn mandatory_unroutable_publish_in_confirm_mode_is_returned_before_its_ack() {
    take_log();
    let (q, nowhere) = (unique("q"), unique("nowhere"));
    let confirms = Rc::new(RefCell::new(Confirms::default()));
    let c = confirms.clone();
    let terminal = with_channel(move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        ch.add_on_return_callback(|_, r| {
            log(format!(
                "return {} {} {} {}",
                r.method.reply_code,
                r.method.reply_text,
                r.method.routing_key,
                String::from_utf8_lossy(&r.body)
            ));
        });
        let c2 = c.clone();
        ch.confirm_delivery(
            move |ch, conf| {
                let settled = c2.borrow_mut().record(&conf);
                for tag in settled {
                    log(format!("{} {tag}", c2.borrow().outcome[&tag]));
                    if tag == 2 {
                        get_one(ch, q, true, |ch, m| {
                            assert_eq!(m.body, b"routed");
                            finish(ch);
                        });
                    }
                }
            },
            move |ch, ok| {
                ok.unwrap();
                assert!(ch.is_confirm_mode());
                let tag = ch
                    .basic_publish(
                        "",
                        nowhere,
                        b"unroutable",
                        &BasicProperties::default(),
                        true,
                    )
                    .unwrap();
                c.borrow_mut().published(tag);
                let tag = ch
                    .basic_publish("", q, b"routed", &BasicProperties::default(), true)
                    .unwrap();
                c.borrow_mut().published(tag);
            },
        )
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        [
            format!("return 312 NO_ROUTE {nowhere} unroutable"),
            "ack 1".to_string(),
            "ack 2".to_string()
        ]
    );
}

#[test]
fn max_length_with_reject_publish_acks_the_first_and_nacks_the_second() {
    let q = unique("q");
    let confirms = Rc::new(RefCell::new(Confirms::default()));
    let c = confirms.clone();
    let terminal = with_channel(move |ch| {
        let args = table(&[
            ("x-max-length", FieldValue::I32(1)),
            ("x-overflow", FieldValue::from("reject-publish")),
        ]);
        ch.queue_declare(q, exclusive(), args, |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        let c2 = c.clone();
        ch.confirm_delivery(
            move |ch, conf| {
                c2.borrow_mut().record(&conf);
                if c2.borrow().outstanding.is_empty() {
                    ch.queue_declare(q, passive(), FieldTable::new(), |ch, ok| {
                        assert_eq!(ok.unwrap().message_count, 1);
                        finish(ch);
                    })
                    .unwrap();
                }
            },
            |_, ok| {
                ok.unwrap();
            },
        )
        .unwrap();
        for body in [&b"first"[..], b"second"] {
            let tag = publish(ch, "", q, body);
            c.borrow_mut().published(tag);
        }
    });
    assert_closed_by_us(&terminal);
    let c = confirms.borrow();
    assert_eq!(c.outcome, BTreeMap::from([(1, "ack"), (2, "nack")]));
}

/// Publishes `n` messages in confirm mode and has `lose` end the channel
/// right after; checks that every tag settled exactly once (ack, nack or
/// failed), the failed ones with the channel's close reason, all before
/// the channel's close callback and none after it. Returns the
/// confirmations and the close reason.
fn confirms_on_channel_loss(n: u64, lose: impl FnOnce(&Channel) + 'static) -> (Confirms, Error) {
    take_log();
    let q = unique("q");
    let confirms = Rc::new(RefCell::new(Confirms::default()));
    let reason = Rc::new(RefCell::new(None));
    let (c, r) = (confirms.clone(), reason.clone());
    let terminal = with_channel(move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), move |ch, ok| {
            ok.unwrap();
            let c2 = c.clone();
            ch.confirm_delivery(
                move |_, conf| {
                    c2.borrow_mut().record(&conf);
                    log(if matches!(conf, Confirmation::Failed { .. }) {
                        "failed"
                    } else {
                        "confirmed"
                    });
                },
                // When our close is sent before the SelectOk arrives, the
                // SelectOk is discarded and this gets the close reason.
                |_, _| {},
            )
            .unwrap();
            let c3 = c.clone();
            ch.add_on_close_callback(move |ch, reason| {
                log("channel closed");
                assert!(
                    c3.borrow().outstanding.is_empty(),
                    "unsettled: {:?}",
                    c3.borrow().outstanding
                );
                assert!(ch.unconfirmed_delivery_tags().is_empty());
                *r.borrow_mut() = Some(reason);
                let conn = ch.connection().unwrap();
                if conn.is_open() {
                    conn.close(200, "done").unwrap();
                }
            });
            let body = [7u8; 512];
            for _ in 0..n {
                let tag = publish(ch, "", q, &body);
                c.borrow_mut().published(tag);
            }
            assert_eq!(ch.unconfirmed_delivery_tags().len() as u64, n);
            lose(ch);
        })
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    let log = take_log();
    assert_eq!(
        log.last().map(String::as_str),
        Some("channel closed"),
        "nothing after the close callback"
    );
    // Possibly none failed: the broker may have confirmed all in time.
    let first_failed = log
        .iter()
        .position(|e| e == "failed")
        .unwrap_or(log.len() - 1);
    assert!(
        log[first_failed..log.len() - 1]
            .iter()
            .all(|e| e == "failed"),
        "the failures come last, together, right before the close callback"
    );
    let confirms = Rc::try_unwrap(confirms).ok().unwrap().into_inner();
    assert_eq!(confirms.outcome.len() as u64, n, "every tag settled");
    assert_eq!(
        confirms.outcome.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    let reason = reason.take().expect("the channel closed");
    for e in &confirms.failed_with {
        assert_eq!(
            e.to_string(),
            reason.to_string(),
            "failed with the channel's close reason"
        );
    }
    (confirms, reason)
}

#[test]
fn unconfirmed_publishes_are_failed_before_the_close_callback_when_a_channel_error_ends_the_channel()
 {
    let missing = unique("missing");
    let (confirms, reason) = confirms_on_channel_loss(1000, move |ch| {
        ch.queue_declare(missing, passive(), FieldTable::new(), |_, r| {
            assert!(matches!(
                r,
                Err(Error::ChannelClosedByBroker {
                    reply_code: 404,
                    ..
                })
            ));
        })
        .unwrap();
    });
    assert_eq!(reason.reply_code(), Some(404));
    assert_eq!(confirms.count("nack"), 0);
    eprintln!(
        "404 after 1000 publishes: {} acked, {} failed",
        confirms.count("ack"),
        confirms.count("failed")
    );
}

#[test]
fn acks_the_broker_sends_before_the_close_ok_of_our_channel_close_are_acks_not_failures() {
    // Unroutable, non-mandatory publishes are acked by RabbitMQ's channel
    // process in order, before it handles the Close that follows them: all
    // 1000 acks arrive after our Close is out and before its CloseOk. They
    // are reported as acks (as pika does); none is `Failed`.
    let nowhere = unique("nowhere");
    let confirms = Rc::new(RefCell::new(Confirms::default()));
    let c = confirms.clone();
    let terminal = with_channel(move |ch| {
        let c2 = c.clone();
        ch.confirm_delivery(
            move |_, conf| {
                c2.borrow_mut().record(&conf);
            },
            move |ch, ok| {
                ok.unwrap();
                for _ in 0..1000 {
                    let tag = publish(ch, "", nowhere, b"x");
                    c.borrow_mut().published(tag);
                }
                ch.close(200, "published").unwrap();
            },
        )
        .unwrap();
        ch.add_on_close_callback(|ch, reason| {
            assert!(
                matches!(
                    reason,
                    Error::ChannelClosedByClient {
                        reply_code: 200,
                        ..
                    }
                ),
                "{reason:?}"
            );
            finish(ch);
        });
    });
    assert_closed_by_us(&terminal);
    let c = confirms.borrow();
    assert_eq!(c.outcome.len(), 1000, "every tag settled");
    assert_eq!(c.count("ack"), 1000, "failed: {}", c.count("failed"));
}

#[test]
fn unconfirmed_publishes_are_failed_before_the_close_callback_when_the_connection_closes() {
    let (confirms, reason) = confirms_on_channel_loss(1000, finish);
    assert!(
        matches!(
            reason,
            Error::ChannelClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "{reason:?}"
    );
    eprintln!(
        "close after 1000 publishes: {} acked, {} failed",
        confirms.count("ack"),
        confirms.count("failed")
    );
}

#[test]
fn unacked_deliveries_return_to_the_queue_when_their_channel_closes_and_auto_acked_ones_do_not() {
    take_log();
    let (manual, auto) = (unique("manual"), unique("auto"));
    let terminal = with_channel(move |ch0| {
        for q in [manual, auto] {
            ch0.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
                ok.unwrap();
            })
            .unwrap();
            for i in 0..3u8 {
                publish(ch0, "", q, &[i]);
            }
        }
        await_message_count(ch0, manual, 3, move |ch0| {
            let ch0 = ch0.clone();
            open_another(&ch0.clone(), move |ch1| {
                let seen = Rc::new(Cell::new(0));
                for (q, auto_ack) in [(manual, false), (auto, true)] {
                    let seen = seen.clone();
                    let opts = BasicConsumeOptions {
                        auto_ack,
                        ..Default::default()
                    };
                    ch1.basic_consume(
                        q,
                        move |ch1, _| {
                            seen.set(seen.get() + 1);
                            if seen.get() == 6 {
                                ch1.close(200, "leaving three unacked").unwrap();
                            }
                        },
                        opts,
                        |_, ok| {
                            ok.unwrap();
                        },
                    )
                    .unwrap();
                }
                ch1.add_on_close_callback(move |_, reason| {
                    assert!(matches!(reason, Error::ChannelClosedByClient { .. }));
                    log("consumer channel closed");
                    await_message_count(&ch0, manual, 3, move |ch0| {
                        // By now the manual queue's requeue is done: the
                        // auto-ack queue's would be too.
                        ch0.queue_declare(auto, passive(), FieldTable::new(), |ch0, ok| {
                            assert_eq!(ok.unwrap().message_count, 0, "auto-acked ones are gone");
                            get_one(ch0, manual, true, |ch0, m| {
                                assert!(m.method.redelivered);
                                assert_eq!(m.body, [0]);
                                log("unacked ones returned");
                                finish(ch0);
                            });
                        })
                        .unwrap();
                    });
                });
            });
        });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        ["consumer channel closed", "unacked ones returned"]
    );
}

#[test]
fn unacked_deliveries_return_to_the_queue_when_their_connection_closes_and_auto_acked_ones_do_not()
{
    take_log();
    let (manual, auto) = (unique("manual"), unique("auto"));
    // Queues that outlive the first connection; the broker removes them a
    // minute after their last use should the test fail before deleting them.
    let expires = || table(&[("x-expires", FieldValue::I32(60_000))]);
    let terminal = with_channel(move |ch| {
        for q in [manual, auto] {
            ch.queue_declare(q, QueueDeclareOptions::default(), expires(), |_, ok| {
                ok.unwrap();
            })
            .unwrap();
            for i in 0..3u8 {
                publish(ch, "", q, &[i]);
            }
        }
        let seen = Rc::new(Cell::new(0));
        for (q, auto_ack) in [(manual, false), (auto, true)] {
            let seen = seen.clone();
            let opts = BasicConsumeOptions {
                auto_ack,
                ..Default::default()
            };
            ch.basic_consume(
                q,
                move |ch, _| {
                    seen.set(seen.get() + 1);
                    if seen.get() == 6 {
                        log("six delivered, three unacked");
                        finish(ch);
                    }
                },
                opts,
                |_, ok| {
                    ok.unwrap();
                },
            )
            .unwrap();
        }
    });
    assert_closed_by_us(&terminal);
    let terminal = with_channel(move |ch| {
        await_message_count(ch, manual, 3, move |ch| {
            ch.queue_declare(auto, passive(), FieldTable::new(), |_, ok| {
                assert_eq!(ok.unwrap().message_count, 0, "auto-acked ones are gone");
            })
            .unwrap();
            get_one(ch, manual, true, |_, m| assert!(m.method.redelivered));
            ch.queue_delete(auto, QueueDeleteOptions::default(), |_, ok| {
                ok.unwrap();
            })
            .unwrap();
            ch.queue_delete(manual, QueueDeleteOptions::default(), |ch, ok| {
                assert_eq!(ok.unwrap().message_count, 2);
                log("unacked ones returned");
                finish(ch);
            })
            .unwrap();
        });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        ["six delivered, three unacked", "unacked ones returned"]
    );
}

#[test]
fn deleting_a_queue_under_a_consumer_fires_the_cancel_callback_with_its_tag() {
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        let tag = Rc::new(RefCell::new(String::new()));
        let t = tag.clone();
        ch.add_on_cancel_callback(move |ch, cancel| {
            assert_eq!(cancel.consumer_tag, *t.borrow());
            assert!(
                ch.consumer_tags().is_empty(),
                "forgotten before the callback"
            );
            assert!(ch.is_open(), "the channel stays open");
            log("cancelled by the broker");
            ch.basic_qos(0, 1, false, |ch, ok| {
                ok.expect("the channel still works");
                finish(ch);
            })
            .unwrap();
        });
        *tag.borrow_mut() = ch
            .basic_consume(
                q,
                |_, _| {},
                BasicConsumeOptions::default(),
                move |ch, ok| {
                    ok.unwrap();
                    open_another(ch, move |other| {
                        other
                            .queue_delete(q, QueueDeleteOptions::default(), |other, ok| {
                                ok.unwrap();
                                log("deleted");
                                other.close(200, "done").unwrap();
                            })
                            .unwrap();
                    });
                },
            )
            .unwrap();
    });
    assert_closed_by_us(&terminal);
    let mut log = take_log();
    log.sort();
    assert_eq!(log, ["cancelled by the broker", "deleted"]);
}

// ----------------------------------------------------------------------
// RPC serialisation and ordering
// ----------------------------------------------------------------------

#[test]
fn a_publish_waits_behind_requests_queued_before_it() {
    take_log();
    let (q1, q2) = (unique("q1"), unique("q2"));
    let terminal = with_channel(move |ch| {
        // q1's declare goes out at once; q2's waits for q1's reply. The
        // publish to q2 must go out after q2's declare, not before.
        ch.queue_declare(q1, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        ch.queue_declare(q2, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        publish(ch, "", q2, b"after the declare");
        // Polled: RabbitMQ's queue answers a passive declare's `stat` ahead
        // of deliveries still in its mailbox. Overtaken, the publish would
        // have found no q2 and been dropped: the count would stay 0.
        await_message_count(ch, q2, 1, |ch| {
            log("routed");
            finish(ch);
        });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["routed"]);
}

#[test]
fn publishes_made_while_confirm_select_waits_in_the_queue_are_confirmed_with_their_tags() {
    take_log();
    let q = unique("q");
    let confirms = Rc::new(RefCell::new(Confirms::default()));
    let c = confirms.clone();
    let terminal = with_channel(move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        // Confirm.Select waits behind the declare; so must the publishes
        // made after it, or the broker would not count them.
        let c2 = c.clone();
        ch.confirm_delivery(
            move |ch, conf| {
                c2.borrow_mut().record(&conf);
                if c2.borrow().outstanding.is_empty() {
                    log("all confirmed");
                    finish(ch);
                }
            },
            |_, ok| {
                ok.unwrap();
            },
        )
        .unwrap();
        for body in [&b"one"[..], b"two", b"three"] {
            let tag = publish(ch, "", q, body);
            c.borrow_mut().published(tag);
        }
        let ch2 = ch.clone();
        ch.connection()
            .unwrap()
            .ioloop()
            .call_later(Duration::from_secs(5), move || {
                assert!(
                    !ch2.is_open(),
                    "still unconfirmed after 5 s: {:?}",
                    ch2.unconfirmed_delivery_tags()
                );
            });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["all confirmed"]);
    assert_eq!(
        confirms.borrow().outcome,
        BTreeMap::from([(1, "ack"), (2, "ack"), (3, "ack")])
    );
}

/// Whether a frame is one of the channel's requests (a method with a reply,
/// Channel.Open and Close aside).
fn is_request(f: &FrameSummary) -> bool {
    f.channel == 1
        && f.method().is_some_and(|m| !m.replies().is_empty())
        && !matches!(f.name(), "Channel.Open" | "Channel.Close")
}

fn is_reply(f: &FrameSummary) -> bool {
    f.channel == 1
        && f.method().is_some()
        && !matches!(f.name(), "Channel.OpenOk" | "Channel.CloseOk")
}

/// The requests the client sent and the replies it was given, on channel 1.
fn rpc_counts(px: &Proxy) -> (usize, usize) {
    let requests = px
        .frames(ClientToBroker)
        .iter()
        .filter(|f| is_request(f))
        .count();
    let replies = px
        .frames(BrokerToClient)
        .iter()
        .filter(|f| is_reply(f))
        .count();
    (requests, replies)
}

#[test]
fn queued_requests_go_out_one_at_a_time_and_complete_in_call_order() {
    const REQUESTS: usize = 10;
    take_log();
    let proxy = Rc::new(Proxy::start(broker_addr()));
    let px = proxy.clone();
    let held = Rc::new(Cell::new(0));
    let h = held.clone();
    let (x1, x2, q1, q2) = (unique("x1"), unique("x2"), unique("q1"), unique("q2"));
    let terminal = run_with_channel(proxied(&proxy), move |ch| {
        // The broker's replies are held by the proxy and released one at a
        // time, from this loop's thread (so the client cannot act while one
        // is being released). Each time, with a reply held for a while, the
        // client must have exactly one request out.
        px.stall(BrokerToClient);
        fn hold_and_release(px: Rc<Proxy>, lp: pika::IoLoop, held: Rc<Cell<usize>>) {
            let (requests, replies) = rpc_counts(&px);
            assert!(
                requests <= replies + 1,
                "{requests} requests sent with {replies} replies received: more than one in flight"
            );
            if replies == REQUESTS {
                return px.resume(BrokerToClient);
            }
            if requests == replies + 1 {
                held.set(held.get() + 1);
                px.resume(BrokerToClient);
                let deadline = Instant::now() + Duration::from_secs(2);
                while rpc_counts(&px).1 == replies && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                px.stall(BrokerToClient);
            }
            let again = lp.clone();
            lp.call_later(Duration::from_millis(50), move || {
                hold_and_release(px, again, held)
            });
        }
        let lp = ch.connection().unwrap().ioloop().clone();
        let (px, again) = (px.clone(), lp.clone());
        lp.call_later(Duration::from_millis(50), move || {
            hold_and_release(px, again, h)
        });
        let done = |i: usize| {
            move |ch: &Channel, ok: Result<(), Error>| {
                ok.unwrap_or_else(|e| panic!("request {i}: {e}"));
                log(format!("{i}"));
                if i == REQUESTS - 1 {
                    finish(ch);
                }
            }
        };
        let args = FieldTable::new;
        ch.exchange_declare(x1, exchange_type("direct"), args(), move |c, r| {
            done(0)(c, r.map(drop))
        })
        .unwrap();
        ch.queue_declare(q1, exclusive(), args(), move |c, r| done(1)(c, r.map(drop)))
            .unwrap();
        ch.queue_bind(q1, x1, Some("k"), args(), move |c, r| {
            done(2)(c, r.map(drop))
        })
        .unwrap();
        ch.exchange_declare(x2, exchange_type("fanout"), args(), move |c, r| {
            done(3)(c, r.map(drop))
        })
        .unwrap();
        ch.exchange_bind(x1, x2, "", args(), move |c, r| done(4)(c, r.map(drop)))
            .unwrap();
        ch.queue_declare(q2, exclusive(), args(), move |c, r| done(5)(c, r.map(drop)))
            .unwrap();
        ch.queue_bind(q2, x2, Some(""), args(), move |c, r| {
            done(6)(c, r.map(drop))
        })
        .unwrap();
        ch.basic_qos(0, 7, false, move |c, r| done(7)(c, r.map(drop)))
            .unwrap();
        ch.exchange_delete(x2, false, move |c, r| done(8)(c, r.map(drop)))
            .unwrap();
        ch.exchange_delete(x1, false, move |c, r| done(9)(c, r.map(drop)))
            .unwrap();
    });
    assert_closed_by_us(&terminal);
    let expected: Vec<String> = (0..REQUESTS).map(|i| i.to_string()).collect();
    assert_eq!(take_log(), expected, "completions in call order");
    assert_eq!(
        held.get(),
        REQUESTS,
        "each request was seen alone in flight, its reply held"
    );
    let requests: Vec<&'static str> = proxy
        .frames(ClientToBroker)
        .iter()
        .filter(|f| is_request(f))
        .map(FrameSummary::name)
        .collect();
    assert_eq!(
        requests,
        [
            "Exchange.Declare",
            "Queue.Declare",
            "Queue.Bind",
            "Exchange.Declare",
            "Exchange.Bind",
            "Queue.Declare",
            "Queue.Bind",
            "Basic.Qos",
            "Exchange.Delete",
            "Exchange.Delete"
        ],
        "sent in call order"
    );
}

#[test]
fn closing_a_channel_with_a_consumer_cancels_it_before_channel_close() {
    take_log();
    let proxy = Proxy::start(broker_addr());
    let q = unique("q");
    let tag = Rc::new(RefCell::new(String::new()));
    let t = tag.clone();
    let terminal = run_with_channel(proxied(&proxy), move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        ch.add_on_close_callback(|ch, reason| {
            assert!(
                matches!(&reason, Error::ChannelClosedByClient { reply_code: 200, reply_text } if reply_text == "bye"),
                "{reason:?}"
            );
            assert!(ch.consumer_tags().is_empty());
            log("closed by client");
            finish(ch);
        });
        *t.borrow_mut() = ch
            .basic_consume(
                q,
                |_, _| {},
                BasicConsumeOptions::default(),
                |ch, ok| {
                    ok.unwrap();
                    ch.close(200, "bye").unwrap();
                    assert!(ch.is_closing());
                    assert!(ch.consumer_tags().is_empty(), "being cancelled");
                },
            )
            .unwrap();
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["closed by client"]);
    let sent: Vec<(&str, u16)> = method_frames(&proxy.frames(ClientToBroker));
    let cancel = sent
        .iter()
        .position(|m| *m == ("Basic.Cancel", 1))
        .expect("a Basic.Cancel");
    let close = sent
        .iter()
        .position(|m| *m == ("Channel.Close", 1))
        .expect("a Channel.Close");
    assert!(cancel < close, "{sent:?}");
    let cancelled = proxy
        .frames(ClientToBroker)
        .iter()
        .find_map(|f| match f.method() {
            Some(Method::BasicCancel(c)) => Some(c.consumer_tag.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(cancelled, *tag.borrow());
}

// ----------------------------------------------------------------------
// Channel states and calls refused at once
// ----------------------------------------------------------------------

#[test]
fn closing_while_opening_suppresses_the_open_ok() {
    take_log();
    let proxy = Proxy::start(broker_addr());
    let terminal = run_connection(proxied(&proxy), |conn| {
        conn.channel(None, |r| match r {
            Err(Error::ChannelClosedByClient {
                reply_code: 200,
                reply_text,
            }) if reply_text == "bye" => log("the open callback got the close"),
            other => panic!("{other:?}"),
        })
        .unwrap();
        // Closing the connection closes the opening channel (no public
        // handle to a channel exists before its OpenOk).
        conn.close(200, "bye").unwrap();
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["the open callback got the close"]);
    assert_eq!(
        method_frames(&proxy.frames(ClientToBroker)),
        [
            ("Connection.StartOk", 0),
            ("Connection.TuneOk", 0),
            ("Connection.Open", 0),
            ("Channel.Open", 1),
            ("Channel.Close", 1),
            ("Connection.Close", 0)
        ]
    );
    let answers = method_frames(&proxy.frames(BrokerToClient));
    assert!(
        answers.contains(&("Channel.OpenOk", 1)),
        "the broker did open it: {answers:?}"
    );
}

/// Calls every channel operation and asserts that each is refused at the
/// call with `ChannelWrongState`, its closure dropped uncalled.
fn assert_every_operation_refused(ch: &Channel) {
    fn never<T>(_: &Channel, _: T) {
        panic!("the closure of a refused call is never called");
    }
    let args = FieldTable::new;
    let results: Vec<(&str, Result<(), Error>)> = vec![
        (
            "exchange_declare",
            ch.exchange_declare("x", Default::default(), args(), never),
        ),
        (
            "exchange_declare_nowait",
            ch.exchange_declare_nowait("x", Default::default(), args()),
        ),
        ("exchange_delete", ch.exchange_delete("x", false, never)),
        (
            "exchange_delete_nowait",
            ch.exchange_delete_nowait("x", false),
        ),
        (
            "exchange_bind",
            ch.exchange_bind("a", "b", "", args(), never),
        ),
        (
            "exchange_bind_nowait",
            ch.exchange_bind_nowait("a", "b", "", args()),
        ),
        (
            "exchange_unbind",
            ch.exchange_unbind("a", "b", "", args(), never),
        ),
        (
            "exchange_unbind_nowait",
            ch.exchange_unbind_nowait("a", "b", "", args()),
        ),
        (
            "queue_declare",
            ch.queue_declare("q", Default::default(), args(), never),
        ),
        (
            "queue_declare_nowait",
            ch.queue_declare_nowait("q", Default::default(), args()),
        ),
        (
            "queue_bind",
            ch.queue_bind("q", "x", Some(""), args(), never),
        ),
        (
            "queue_bind_nowait",
            ch.queue_bind_nowait("q", "x", Some(""), args()),
        ),
        (
            "queue_unbind",
            ch.queue_unbind("q", "x", Some(""), args(), never),
        ),
        ("queue_purge", ch.queue_purge("q", never)),
        ("queue_purge_nowait", ch.queue_purge_nowait("q")),
        (
            "queue_delete",
            ch.queue_delete("q", Default::default(), never),
        ),
        (
            "queue_delete_nowait",
            ch.queue_delete_nowait("q", Default::default()),
        ),
        ("basic_qos", ch.basic_qos(0, 1, false, never)),
        (
            "basic_consume",
            ch.basic_consume("q", |_, _| panic!("never"), Default::default(), never)
                .map(drop),
        ),
        ("basic_cancel", ch.basic_cancel("tag", never)),
        ("basic_cancel_nowait", ch.basic_cancel_nowait("tag")),
        ("basic_get", ch.basic_get("q", false, never)),
        (
            "basic_publish",
            ch.basic_publish("", "q", b"x", &BasicProperties::default(), false)
                .map(drop),
        ),
        ("basic_ack", ch.basic_ack(1, false)),
        ("basic_nack", ch.basic_nack(1, false, true)),
        ("basic_reject", ch.basic_reject(1, true)),
        ("basic_recover", ch.basic_recover(true, never)),
        (
            "confirm_delivery",
            ch.confirm_delivery(|_, _| panic!("never"), never),
        ),
        ("tx_select", ch.tx_select(never)),
        ("tx_commit", ch.tx_commit(never)),
        ("tx_rollback", ch.tx_rollback(never)),
        ("flow", ch.flow(true, never)),
        ("close", ch.close(200, "again")),
    ];
    for (what, r) in results {
        assert!(
            matches!(r, Err(Error::ChannelWrongState { .. })),
            "{what} on a {:?} channel: {r:?}",
            ch.state()
        );
    }
}

#[test]
fn closing_while_a_get_is_in_flight_lets_it_complete_then_closes_and_the_unacked_message_goes_back()
{
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        queue_with_messages(ch, q, 1, move |ch| {
            ch.basic_get(q, false, |_, r| {
                let m = r
                    .expect("the get completes with its reply")
                    .expect("a message");
                assert_eq!(m.body, [0]);
                log("get completed with its message");
            })
            .unwrap();
            // As in pika, our Close is queued behind the Get in flight: the
            // GetOk reaches the get's closure, then the Close goes out.
            ch.close(200, "bye").unwrap();
            ch.add_on_close_callback(move |ch, _| {
                log("closed");
                open_another(ch, move |ch| {
                    await_message_count(ch, q, 1, |ch| {
                        log("the fetched message went back");
                        finish(ch);
                    })
                });
            });
        });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        [
            "get completed with its message",
            "closed",
            "the fetched message went back"
        ]
    );
}

#[test]
fn every_operation_on_a_closing_or_closed_channel_fails_at_the_call_with_wrong_state() {
    take_log();
    let proxy = Proxy::start(broker_addr());
    let terminal = run_with_channel(proxied(&proxy), |ch| {
        ch.add_on_close_callback(|ch, reason| {
            assert!(matches!(reason, Error::ChannelClosedByClient { .. }));
            assert!(ch.is_closed());
            assert_every_operation_refused(ch);
            log("refused while closed");
            finish(ch);
        });
        ch.close(200, "bye").unwrap();
        assert!(ch.is_closing());
        assert_every_operation_refused(ch);
        log("refused while closing");
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        ["refused while closing", "refused while closed"]
    );
    assert_eq!(
        method_frames(&proxy.frames(ClientToBroker))[3..],
        [
            ("Channel.Open", 1),
            ("Channel.Close", 1),
            ("Connection.Close", 0)
        ],
        "nothing else was sent"
    );
}

#[test]
fn a_second_basic_get_before_the_first_reply_is_duplicate_get_ok_callback() {
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        publish(ch, "", q, b"a");
        ch.basic_get(q, true, move |ch, r| {
            assert_eq!(r.unwrap().unwrap().body, b"a");
            log("first get");
            // Once the first has its reply, a get is accepted again.
            ch.basic_get(q, true, |ch, r| {
                assert!(r.unwrap().is_none());
                log("third get");
                finish(ch);
            })
            .unwrap();
        })
        .unwrap();
        let second = ch.basic_get(q, true, |_, _| panic!("never called"));
        assert!(
            matches!(second, Err(Error::DuplicateGetOkCallback)),
            "{second:?}"
        );
        log("second refused");
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["second refused", "first get", "third get"]);
}

#[test]
fn a_consumer_tag_in_use_on_the_channel_is_refused_with_duplicate_consumer_tag() {
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        let opts = || BasicConsumeOptions {
            consumer_tag: Some("my-tag".into()),
            ..Default::default()
        };
        let tag = ch
            .basic_consume(
                q,
                |_, _| {},
                opts(),
                |ch, ok| {
                    assert_eq!(ok.unwrap().consumer_tag, "my-tag");
                    log("consuming");
                    finish(ch);
                },
            )
            .unwrap();
        assert_eq!(tag, "my-tag");
        let again = ch.basic_consume(q, |_, _| {}, opts(), |_, _| panic!("never called"));
        assert!(
            matches!(&again, Err(Error::DuplicateConsumerTag { tag }) if tag == "my-tag"),
            "{again:?}"
        );
        assert_eq!(ch.consumer_tags(), ["my-tag"]);
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["consuming"]);
}

#[test]
fn names_over_255_bytes_are_encode_errors_at_the_call_and_nothing_is_sent() {
    take_log();
    let proxy = Proxy::start(broker_addr());
    let long: &'static str = Box::leak("n".repeat(300).into_boxed_str());
    let terminal = run_with_channel(proxied(&proxy), move |ch| {
        fn never<T>(_: &Channel, _: T) {
            panic!("the closure of a refused call is never called");
        }
        let args = FieldTable::new;
        let long_tag = BasicConsumeOptions {
            consumer_tag: Some(long.into()),
            ..Default::default()
        };
        let results: Vec<(&str, Result<(), Error>)> = vec![
            (
                "queue_declare",
                ch.queue_declare(long, exclusive(), args(), never),
            ),
            (
                "queue_declare_nowait",
                ch.queue_declare_nowait(long, exclusive(), args()),
            ),
            (
                "exchange_declare",
                ch.exchange_declare(long, Default::default(), args(), never),
            ),
            (
                "queue_bind",
                ch.queue_bind("q", long, Some(""), args(), never),
            ),
            (
                "queue_bind routing key",
                ch.queue_bind("q", "x", Some(long), args(), never),
            ),
            (
                "exchange_bind",
                ch.exchange_bind(long, "x", "", args(), never),
            ),
            ("queue_purge", ch.queue_purge(long, never)),
            (
                "queue_delete",
                ch.queue_delete(long, Default::default(), never),
            ),
            ("basic_get", ch.basic_get(long, true, never)),
            (
                "basic_consume queue",
                ch.basic_consume(long, |_, _| {}, Default::default(), never)
                    .map(drop),
            ),
            (
                "basic_consume tag",
                ch.basic_consume("q", |_, _| {}, long_tag, never).map(drop),
            ),
            (
                "basic_publish routing key",
                ch.basic_publish("", long, b"x", &BasicProperties::default(), false)
                    .map(drop),
            ),
        ];
        for (what, r) in results {
            match r {
                Err(Error::Encode(e)) => assert!(
                    matches!(
                        e.root(),
                        CodecError::TooLong {
                            len: 300,
                            max: 255,
                            ..
                        }
                    ),
                    "{what}: {e:?}"
                ),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert!(ch.is_open());
        assert!(ch.consumer_tags().is_empty(), "no consumer registered");
        // Still usable, and no get is left pending.
        ch.queue_declare("", exclusive(), args(), |ch, ok| {
            let q = ok.unwrap().queue;
            ch.basic_get(&q, true, |ch, r| {
                assert!(r.unwrap().is_none());
                log("still usable");
                finish(ch);
            })
            .unwrap();
        })
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["still usable"]);
    assert_eq!(
        method_frames(&proxy.frames(ClientToBroker))[3..],
        [
            ("Channel.Open", 1),
            ("Queue.Declare", 1),
            ("Basic.Get", 1),
            ("Channel.Close", 1),
            ("Connection.Close", 0)
        ],
        "nothing refused was sent"
    );
}

// ----------------------------------------------------------------------
// Reentrancy: user code calls back into the library from its callbacks
// ----------------------------------------------------------------------

/// Declares an exclusive queue holding `n` one-byte messages 0, 1, …, then
/// runs `then`.
fn queue_with_messages(
    ch: &Channel,
    q: &'static str,
    n: u8,
    then: impl FnOnce(&Channel) + 'static,
) {
    ch.queue_declare(q, exclusive(), FieldTable::new(), move |ch, ok| {
        ok.unwrap();
        for i in 0..n {
            publish(ch, "", q, &[i]);
        }
        await_message_count(ch, q, n.into(), then);
    })
    .unwrap();
}

#[test]
fn closing_the_channel_from_inside_its_own_on_message() {
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        queue_with_messages(ch, q, 3, move |ch| {
            ch.add_on_close_callback(move |ch, reason| {
                assert!(matches!(
                    reason,
                    Error::ChannelClosedByClient {
                        reply_code: 200,
                        ..
                    }
                ));
                log("closed");
                open_another(ch, move |ch| {
                    await_message_count(ch, q, 3, |ch| {
                        log("all three back in the queue");
                        finish(ch);
                    })
                });
            });
            ch.basic_consume(
                q,
                |ch, d| {
                    log(format!("message {}", d.body[0]));
                    ch.close(200, "from on_message").unwrap();
                    assert!(ch.is_closing());
                },
                BasicConsumeOptions::default(),
                |_, ok| {
                    ok.unwrap();
                },
            )
            .unwrap();
        });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        ["message 0", "closed", "all three back in the queue"],
        "on_message ran once: later deliveries were not dispatched"
    );
}

#[test]
fn publishing_and_opening_a_channel_from_inside_on_message() {
    take_log();
    let (q, q2) = (unique("q"), unique("q2"));
    let terminal = with_channel(move |ch| {
        ch.queue_declare(q2, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        queue_with_messages(ch, q, 1, move |ch| {
            ch.basic_consume(
                q,
                move |ch, d| {
                    ch.basic_ack(d.method.delivery_tag, false).unwrap();
                    ch.basic_publish(
                        "",
                        q2,
                        b"from on_message",
                        &BasicProperties::default(),
                        false,
                    )
                    .unwrap();
                    log("published");
                    open_another(ch, move |other| {
                        log(format!("opened channel {}", other.channel_number()));
                        get_one(other, q2, true, |other, m| {
                            assert_eq!(m.body, b"from on_message");
                            log("got it");
                            finish(other);
                        });
                    });
                },
                BasicConsumeOptions::default(),
                |_, ok| {
                    ok.unwrap();
                },
            )
            .unwrap();
        });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["published", "opened channel 2", "got it"]);
}

#[test]
fn closing_the_connection_from_inside_a_channel_close_callback() {
    take_log();
    let missing = unique("missing");
    let terminal = with_channel(move |ch| {
        ch.add_on_close_callback(|ch, reason| {
            assert_eq!(reason.reply_code(), Some(404));
            let conn = ch.connection().unwrap();
            conn.close(200, "from the channel's close callback")
                .unwrap();
            assert!(conn.is_closing());
            log("closing");
        });
        ch.queue_declare(missing, passive(), FieldTable::new(), |_, r| {
            assert!(r.is_err());
        })
        .unwrap();
    });
    assert!(
        matches!(terminal.as_slice(), [Error::ConnectionClosedByClient { reply_code: 200, reply_text }]
            if reply_text == "from the channel's close callback"),
        "{terminal:?}"
    );
    assert_eq!(take_log(), ["closing"]);
}

#[test]
fn basic_cancel_from_inside_on_message() {
    take_log();
    let q = unique("q");
    let terminal = with_channel(move |ch| {
        queue_with_messages(ch, q, 3, move |ch| {
            let tag = Rc::new(RefCell::new(String::new()));
            let t = tag.clone();
            *tag.borrow_mut() = ch
                .basic_consume(
                    q,
                    move |ch, d| {
                        log(format!("message {}", d.body[0]));
                        ch.basic_ack(d.method.delivery_tag, false).unwrap();
                        let tag = t.borrow().clone();
                        ch.basic_cancel(&tag.clone(), move |ch, ok| {
                            assert_eq!(ok.unwrap().consumer_tag, tag);
                            assert!(ch.consumer_tags().is_empty());
                            log("cancelled");
                            // Deliveries that raced the cancel went back.
                            await_message_count(ch, q, 2, |ch| {
                                log("two left");
                                finish(ch);
                            });
                        })
                        .unwrap();
                        assert!(ch.consumer_tags().is_empty(), "not listed once cancelling");
                    },
                    BasicConsumeOptions::default(),
                    |_, ok| {
                        ok.unwrap();
                    },
                )
                .unwrap();
        });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(take_log(), ["message 0", "cancelled", "two left"]);
}

#[test]
fn every_channel_operation_is_callable_from_inside_another_channels_callback() {
    take_log();
    let (x, x2, q, q2) = (unique("x"), unique("x2"), unique("q"), unique("q2"));
    let terminal = with_channel(move |ch1| {
        let ch1 = ch1.clone();
        open_another(&ch1.clone(), move |ch2| {
            let ch = ch2.clone();
            ch2.add_on_close_callback(|ch2, reason| {
                assert!(
                    matches!(reason, Error::ChannelClosedByClient { .. }),
                    "{reason:?}"
                );
                log("close");
                // tx on a third channel: a channel is either transactional
                // or in confirm mode.
                open_another(ch2, |ch3| {
                    ch3.tx_select(|ch3, r| {
                        r.unwrap();
                        log("tx_select");
                        ch3.tx_commit(|ch3, r| {
                            r.unwrap();
                            log("tx_commit");
                            ch3.tx_rollback(|ch3, r| {
                                r.unwrap();
                                log("tx_rollback");
                                finish(ch3);
                            })
                            .unwrap();
                        })
                        .unwrap();
                    })
                    .unwrap();
                });
            });
            // Every request on ch2 made from inside ch1's completion.
            ch1.clone()
                .queue_declare("", exclusive(), FieldTable::new(), move |_, ok| {
                    ok.unwrap();
                    fn done(name: &'static str) -> impl Fn(&Channel, Result<(), Error>) {
                        move |_, r| {
                            r.unwrap_or_else(|e| panic!("{name}: {e}"));
                            log(name);
                        }
                    }
                    let args = FieldTable::new;
                    ch.exchange_declare(x, exchange_type("direct"), args(), move |c, r| {
                        done("exchange_declare")(c, r.map(drop))
                    })
                    .unwrap();
                    ch.exchange_declare_nowait(x2, exchange_type("fanout"), args())
                        .unwrap();
                    ch.exchange_bind(x, x2, "", args(), move |c, r| {
                        done("exchange_bind")(c, r.map(drop))
                    })
                    .unwrap();
                    ch.exchange_unbind(x, x2, "", args(), move |c, r| {
                        done("exchange_unbind")(c, r.map(drop))
                    })
                    .unwrap();
                    ch.queue_declare(q, exclusive(), args(), move |c, r| {
                        done("queue_declare")(c, r.map(drop))
                    })
                    .unwrap();
                    ch.queue_bind(q, x, Some("k"), args(), move |c, r| {
                        done("queue_bind")(c, r.map(drop))
                    })
                    .unwrap();
                    ch.queue_unbind(q, x, Some("k"), args(), move |c, r| {
                        done("queue_unbind")(c, r.map(drop))
                    })
                    .unwrap();
                    ch.queue_purge(q, move |c, r| done("queue_purge")(c, r.map(drop)))
                        .unwrap();
                    ch.basic_qos(0, 10, false, move |c, r| done("basic_qos")(c, r.map(drop)))
                        .unwrap();
                    let tag = ch
                        .basic_consume(
                            q,
                            |_, _| {},
                            Default::default(),
                            move |c, r| done("basic_consume")(c, r.map(drop)),
                        )
                        .unwrap();
                    ch.basic_cancel(&tag, move |c, r| done("basic_cancel")(c, r.map(drop)))
                        .unwrap();
                    ch.basic_recover(true, move |c, r| done("basic_recover")(c, r.map(drop)))
                        .unwrap();
                    ch.flow(true, move |c, r| done("flow")(c, r.map(drop)))
                        .unwrap();
                    ch.queue_declare(q2, exclusive(), args(), move |c, r| {
                        done("queue_declare 2")(c, r.map(drop))
                    })
                    .unwrap();
                    for i in 0..3u8 {
                        publish(&ch, "", q2, &[i]);
                    }
                    let tags = Rc::new(RefCell::new(Vec::new()));
                    let t = tags.clone();
                    ch.basic_get(q2, false, move |_, r| {
                        t.borrow_mut()
                            .push(r.unwrap().expect("a message").method.delivery_tag);
                        log("basic_get");
                    })
                    .unwrap();
                    ch.exchange_delete(x2, false, move |c, r| {
                        done("exchange_delete")(c, r.map(drop))
                    })
                    .unwrap();
                    let ch1 = ch1.clone();
                    ch.exchange_delete(x, false, move |ch2, r| {
                        r.unwrap();
                        log("exchange_delete 2");
                        // The rest from inside another of ch1's completions.
                        let ch2 = ch2.clone();
                        ch1.queue_declare("", exclusive(), FieldTable::new(), move |_, _| {
                            let t = tags.clone();
                            get_one(&ch2, q2, false, move |ch2, m1| {
                                get_one(ch2, q2, false, move |ch2, m2| {
                                    let tags = [
                                        t.borrow()[0],
                                        m1.method.delivery_tag,
                                        m2.method.delivery_tag,
                                    ];
                                    log("basic_get twice more");
                                    ch2.basic_ack(tags[0], false).unwrap();
                                    ch2.basic_nack(tags[1], false, true).unwrap();
                                    ch2.basic_reject(tags[2], true).unwrap();
                                    ch2.confirm_delivery(
                                        |_, _| {},
                                        |_, r| {
                                            r.unwrap();
                                            log("confirm_delivery");
                                        },
                                    )
                                    .unwrap();
                                    await_message_count(ch2, q2, 2, |ch2| {
                                        ch2.queue_delete(
                                            q2,
                                            QueueDeleteOptions::default(),
                                            |ch2, ok| {
                                                assert_eq!(
                                                    ok.unwrap().message_count,
                                                    2,
                                                    "nacked and rejected: requeued"
                                                );
                                                log("queue_delete");
                                                ch2.close(200, "done").unwrap();
                                            },
                                        )
                                        .unwrap();
                                    });
                                });
                            });
                        })
                        .unwrap();
                    })
                    .unwrap();
                })
                .unwrap();
        });
    });
    assert_closed_by_us(&terminal);
    assert_eq!(
        take_log(),
        [
            "exchange_declare",
            "exchange_bind",
            "exchange_unbind",
            "queue_declare",
            "queue_bind",
            "queue_unbind",
            "queue_purge",
            "basic_qos",
            "basic_consume",
            "basic_cancel",
            "basic_recover",
            "flow",
            "queue_declare 2",
            "basic_get",
            "exchange_delete",
            "exchange_delete 2",
            "basic_get twice more",
            "confirm_delivery",
            "queue_delete",
            "close",
            "tx_select",
            "tx_commit",
            "tx_rollback"
        ]
    );
}

// ----------------------------------------------------------------------
// Bodies, properties, field types
// ----------------------------------------------------------------------

#[test]
fn bodies_of_every_boundary_size_round_trip_byte_exact() {
    let q = unique("q");
    // Default frame_max 131072: one body frame carries 131064 bytes.
    let sizes = [0usize, 1, 131_064, 131_065, 1 << 20, 16 << 20];
    let bodies: Rc<Vec<Vec<u8>>> = Rc::new(
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i as u8))
            .collect(),
    );
    let got = Rc::new(RefCell::new(Vec::<Vec<u8>>::new()));
    let (b, g) = (bodies.clone(), got.clone());
    let terminal = with_channel(move |ch| {
        assert_eq!(ch.connection().unwrap().frame_max(), 131_072);
        ch.queue_declare(q, exclusive(), FieldTable::new(), move |ch, ok| {
            ok.unwrap();
            for body in b.iter() {
                publish(ch, "", q, body);
            }
            fn next(ch: &Channel, q: &'static str, left: usize, got: Rc<RefCell<Vec<Vec<u8>>>>) {
                if left == 0 {
                    return finish(ch);
                }
                get_one(ch, q, true, move |ch, m| {
                    got.borrow_mut().push(m.body);
                    next(ch, q, left - 1, got);
                });
            }
            next(ch, q, b.len(), g);
        })
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    let got = got.borrow();
    assert_eq!(got.len(), sizes.len());
    for (i, (got, sent)) in got.iter().zip(bodies.iter()).enumerate() {
        assert_eq!(got.len(), sizes[i]);
        assert!(
            got == sent,
            "the body of {} bytes came back different",
            sizes[i]
        );
    }
}

/// A headers table with one value of every field type, some nested.
fn every_field_type() -> FieldTable {
    let mut inner = FieldTable::new();
    inner.insert("deeper", table(&[("void", FieldValue::Void)]));
    inner.insert("n", FieldValue::I64(7));
    table(&[
        ("t", FieldValue::Bool(true)),
        ("b", FieldValue::I8(-5)),
        ("B", FieldValue::U8(250)),
        ("s", FieldValue::I16(-300)),
        ("u", FieldValue::U16(65_000)),
        ("I", FieldValue::I32(-70_000)),
        ("i", FieldValue::U32(4_000_000_000)),
        ("l", FieldValue::I64(-5_000_000_000)),
        ("f", FieldValue::F32(1.5)),
        ("d", FieldValue::F64(-2.25e300)),
        (
            "D",
            FieldValue::Decimal(Decimal {
                scale: 3,
                value: -12_345,
            }),
        ),
        (
            "S",
            FieldValue::LongString(LongString::from(vec![b'a', 0, 0xff])),
        ),
        ("x", FieldValue::ByteArray(vec![0, 1, 0xfe, 0xff])),
        (
            "A",
            FieldValue::Array(vec![
                FieldValue::I32(1),
                FieldValue::from("two"),
                FieldValue::Array(vec![FieldValue::Bool(false)]),
                FieldValue::Void,
            ]),
        ),
        ("T", FieldValue::Timestamp(1_700_000_000)),
        ("F", FieldValue::Table(inner)),
        ("V", FieldValue::Void),
    ])
}

#[test]
fn every_basic_property_and_field_type_round_trips_through_the_broker() {
    let q = unique("q");
    let (user, _) = broker_credentials();
    let sent = BasicProperties::default()
        .with_content_type("application/x-pika-test")
        .with_content_encoding("identity")
        .with_headers(every_field_type())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("correlation")
        .with_reply_to("reply-here")
        .with_expiration("60000")
        .with_message_id("message-1")
        .with_timestamp(1_700_000_001u64)
        .with_kind("test.kind")
        // RabbitMQ refuses (406) a user_id other than the connection's user.
        .with_user_id(user)
        .with_app_id("pika-rs-tests")
        .with_cluster_id("cluster-x");
    assert_eq!(sent.flags(), 0xFFFC, "all 14 properties set");
    let got = Rc::new(RefCell::new(Vec::<BasicProperties>::new()));
    let (s, g) = (sent.clone(), got.clone());
    let terminal = with_channel(move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), move |ch, ok| {
            ok.unwrap();
            for _ in 0..2 {
                ch.basic_publish("", q, b"props", &s, false).unwrap();
            }
            let g2 = g.clone();
            // Basic.GetOk's content, then Basic.Deliver's.
            get_one(ch, q, true, move |ch, m| {
                g.borrow_mut().push(m.properties);
                ch.basic_consume(
                    q,
                    move |ch, d| {
                        g2.borrow_mut().push(d.properties);
                        finish(ch);
                    },
                    BasicConsumeOptions {
                        auto_ack: true,
                        ..Default::default()
                    },
                    |_, ok| {
                        ok.unwrap();
                    },
                )
                .unwrap();
            });
        })
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    // RabbitMQ 3.10 passes a classic queue's message properties through
    // unchanged: every property and every field type comes back as sent,
    // with the headers' keys in the order sent.
    let got = got.borrow();
    assert_eq!(got.len(), 2);
    for props in got.iter() {
        assert_eq!(*props, sent);
        let keys: Vec<&str> = props.headers.as_ref().unwrap().keys().collect();
        assert_eq!(
            keys,
            "tbBsuIilfdDSxATFV"
                .chars()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
        );
    }
}

// ----------------------------------------------------------------------
// Volume
// ----------------------------------------------------------------------

#[test]
fn a_thousand_channels_open_work_and_close_on_one_connection() {
    const N: usize = 1000;
    let numbers = Rc::new(RefCell::new(BTreeSet::<u16>::new()));
    let received = Rc::new(RefCell::new(BTreeSet::<u16>::new()));
    let closed = Rc::new(Cell::new(0usize));
    let (nums, recv, cl) = (numbers.clone(), received.clone(), closed.clone());
    let terminal = with_channel(move |ch0| {
        let done = {
            let (recv, cl) = (recv.clone(), cl.clone());
            move |ch: &Channel| {
                if recv.borrow().len() == N && cl.get() == N {
                    finish(ch);
                }
            }
        };
        let done2 = done.clone();
        ch0.queue_declare("", exclusive(), FieldTable::new(), move |ch0, ok| {
            let q: &'static str = Box::leak(ok.unwrap().queue.into_boxed_str());
            let recv2 = recv.clone();
            ch0.basic_consume(
                q,
                move |ch0, d| {
                    let n = u16::from_be_bytes([d.body[0], d.body[1]]);
                    assert!(recv2.borrow_mut().insert(n), "channel {n} published once");
                    done(ch0);
                },
                BasicConsumeOptions {
                    auto_ack: true,
                    ..Default::default()
                },
                move |ch0, ok| {
                    ok.unwrap();
                    let conn = ch0.connection().unwrap();
                    for _ in 0..N {
                        let (nums, cl, done) = (nums.clone(), cl.clone(), done2.clone());
                        let ch0 = ch0.clone();
                        conn.channel(None, move |r| {
                            let ch = r.expect("the channel opens");
                            let n = ch.channel_number();
                            assert!(nums.borrow_mut().insert(n), "number {n} given twice");
                            publish(&ch, "", q, &n.to_be_bytes());
                            ch.add_on_close_callback(move |_, reason| {
                                assert!(matches!(reason, Error::ChannelClosedByClient { .. }));
                                cl.set(cl.get() + 1);
                                done(&ch0);
                            });
                            ch.close(200, "used once").unwrap();
                        })
                        .unwrap();
                    }
                },
            )
            .unwrap();
        })
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    assert_eq!(closed.get(), N);
    let numbers = numbers.borrow();
    assert_eq!(numbers.len(), N);
    assert_eq!(
        (numbers.first(), numbers.last()),
        (Some(&2), Some(&(N as u16 + 1)))
    );
    assert_eq!(*received.borrow(), *numbers);
}

#[test]
fn ten_thousand_messages_are_consumed_in_order_with_manual_acks() {
    const N: u32 = 10_000;
    let q = unique("q");
    let next = Rc::new(Cell::new(0u32));
    let n2 = next.clone();
    let terminal = with_channel(move |ch| {
        ch.queue_declare(q, exclusive(), FieldTable::new(), |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        ch.basic_qos(0, 200, false, |_, ok| {
            ok.unwrap();
        })
        .unwrap();
        for i in 0..N {
            let props = BasicProperties::default().with_message_id(i.to_string());
            ch.basic_publish("", q, i.to_be_bytes(), &props, false)
                .unwrap();
        }
        ch.basic_consume(
            q,
            move |ch, d| {
                let expected = n2.get();
                let seq = u32::from_be_bytes(d.body[..].try_into().expect("4 bytes"));
                assert_eq!(seq, expected, "in order");
                assert_eq!(d.properties.message_id, Some(expected.to_string()));
                assert!(!d.method.redelivered);
                ch.basic_ack(d.method.delivery_tag, false).unwrap();
                n2.set(expected + 1);
                if expected + 1 == N {
                    ch.queue_declare(q, passive(), FieldTable::new(), |ch, ok| {
                        let ok = ok.unwrap();
                        assert_eq!(ok.message_count, 0, "all acked");
                        finish(ch);
                    })
                    .unwrap();
                }
            },
            BasicConsumeOptions::default(),
            |_, ok| {
                ok.unwrap();
            },
        )
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    assert_eq!(next.get(), N);
}

/// A nowait cancel called right after its consume waits for the ConsumeOk
/// (as pika does): RabbitMQ 3.10 crashes the channel with 541 when the
/// cancel reaches it before it has sent the ConsumeOk.
#[test]
fn basic_cancel_nowait_right_after_basic_consume_waits_for_the_consume_ok() {
    let rounds = Rc::new(Cell::new(0));
    let r = rounds.clone();
    let terminal = with_channel(move |ch| {
        ch.queue_declare("", exclusive(), FieldTable::new(), move |ch, ok| {
            let queue = ok.unwrap().queue;
            for _ in 0..50 {
                let r = r.clone();
                let tag = ch
                    .basic_consume(
                        &queue,
                        |_, _| {},
                        BasicConsumeOptions::default(),
                        move |_, ok| {
                            ok.unwrap();
                            r.set(r.get() + 1);
                        },
                    )
                    .unwrap();
                ch.basic_cancel_nowait(&tag).unwrap();
                assert!(!ch.consumer_tags().contains(&tag));
            }
            ch.queue_declare(&queue, passive(), FieldTable::new(), |ch, ok| {
                assert_eq!(ok.unwrap().consumer_count, 0);
                finish(ch);
            })
            .unwrap();
        })
        .unwrap();
    });
    assert_closed_by_us(&terminal);
    assert_eq!(rounds.get(), 50);
}
