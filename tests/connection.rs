//! SelectConnection against the real broker: open and close, channels and
//! their numbers, negotiation, refused logins and virtual hosts, aborted
//! opens, cross-thread callbacks, update-secret, and broker closes.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{broker_connection_info, broker_params, rabbitmqctl, run_loop};
use pika::{
    Channel, ConnectionParameters, ConnectionState, Error, Heartbeat, PlainCredentials,
    SelectConnection,
};

const LIMIT: Duration = Duration::from_secs(30);

/// What a connection's terminal callbacks saw.
#[derive(Default)]
struct Outcome {
    opened: Cell<u32>,
    open_errors: RefCell<Vec<Error>>,
    closes: RefCell<Vec<Error>>,
}

impl Outcome {
    fn terminal_count(&self) -> usize {
        self.open_errors.borrow().len() + self.closes.borrow().len()
    }
}

/// Connects with `params`; `on_open` runs when open. The loop stops at the
/// terminal callback.
fn connect(
    params: ConnectionParameters,
    on_open: impl FnOnce(&SelectConnection) + 'static,
) -> (SelectConnection, Rc<Outcome>) {
    let outcome = Rc::new(Outcome::default());
    let (o1, o2, o3) = (outcome.clone(), outcome.clone(), outcome.clone());
    let conn = SelectConnection::new(
        params,
        move |conn| {
            o1.opened.set(o1.opened.get() + 1);
            on_open(conn);
        },
        move |conn, err| {
            o2.open_errors.borrow_mut().push(err);
            conn.ioloop().stop();
        },
        move |conn, err| {
            o3.closes.borrow_mut().push(err);
            conn.ioloop().stop();
        },
    )
    .expect("connection created");
    (conn, outcome)
}

#[test]
fn open_then_close_reports_closed_by_client_exactly_once() {
    let (conn, outcome) = connect(broker_params(), |conn| {
        assert!(conn.is_open());
        assert!(conn.publisher_confirms() && conn.basic_nack());
        assert!(conn.consumer_cancel_notify() && conn.exchange_exchange_bindings());
        conn.close(200, "bye").unwrap();
        assert!(conn.is_closing());
        assert!(matches!(
            conn.close(200, "again"),
            Err(Error::ConnectionWrongState { .. })
        ));
    });
    assert_eq!(conn.state(), ConnectionState::Connecting);
    run_loop(conn.ioloop(), LIMIT);
    assert_eq!(outcome.opened.get(), 1);
    assert!(outcome.open_errors.borrow().is_empty());
    let closes = outcome.closes.borrow();
    assert_eq!(closes.len(), 1);
    assert!(
        matches!(&closes[0], Error::ConnectionClosedByClient { reply_code: 200, reply_text } if reply_text == "bye"),
        "{:?}",
        closes[0]
    );
    assert!(conn.is_closed());
    assert!(matches!(
        conn.close(200, "closed"),
        Err(Error::ConnectionWrongState { .. })
    ));
    assert!(matches!(
        conn.channel(None, |_| {}),
        Err(Error::ConnectionWrongState { .. })
    ));
    assert_eq!(conn.local_address(), None, "the socket is gone");
}

#[test]
fn channels_open_with_the_lowest_free_number_and_close_before_the_connection() {
    let events = Rc::new(RefCell::new(Vec::<String>::new()));
    let ev = events.clone();
    let (conn, outcome) = connect(broker_params(), move |conn| {
        let ev2 = ev.clone();
        conn.add_on_close_callback(move |_, _| ev2.borrow_mut().push("connection closed".into()));
        for _ in 0..3 {
            let ev = ev.clone();
            conn.channel(None, move |result| {
                let ch = result.expect("channel opens");
                ev.borrow_mut()
                    .push(format!("open {}", ch.channel_number()));
                let ev3 = ev.clone();
                ch.add_on_close_callback(move |ch, reason| {
                    ev3.borrow_mut().push(format!(
                        "close {} {}",
                        ch.channel_number(),
                        reason.reply_code().unwrap_or(0)
                    ));
                });
                if ch.channel_number() == 3 {
                    let conn = ch.connection().unwrap();
                    conn.close(200, "done").unwrap();
                }
            })
            .unwrap();
        }
    });
    run_loop(conn.ioloop(), LIMIT);
    assert_eq!(outcome.closes.borrow().len(), 1);
    let events = events.borrow();
    assert_eq!(&events[..3], ["open 1", "open 2", "open 3"]);
    let mut closes: Vec<&String> = events[3..6].iter().collect();
    closes.sort();
    assert_eq!(closes, ["close 1 200", "close 2 200", "close 3 200"]);
    assert_eq!(events[6], "connection closed");
}

#[test]
fn a_closed_channel_number_is_reused_after_its_close_ok() {
    let numbers = Rc::new(RefCell::new(Vec::new()));
    let n = numbers.clone();
    let (conn, _) = connect(broker_params(), move |conn| {
        let n = n.clone();
        conn.channel(None, move |result| {
            let ch = result.unwrap();
            n.borrow_mut().push(ch.channel_number());
            ch.close(200, "recycle").unwrap();
            assert!(ch.is_closing());
            assert!(matches!(
                ch.close(200, "twice"),
                Err(Error::ChannelWrongState { .. })
            ));
            // Until the CloseOk, number 1 is reserved: the next channel gets 2.
            let conn = ch.connection().unwrap();
            let n2 = n.clone();
            conn.channel(None, move |r| {
                n2.borrow_mut().push(r.unwrap().channel_number())
            })
            .unwrap();
            let n3 = n.clone();
            ch.add_on_close_callback(move |ch, _| {
                let conn = ch.connection().unwrap();
                conn.channel(None, move |r| {
                    let ch = r.unwrap();
                    n3.borrow_mut().push(ch.channel_number());
                    ch.connection().unwrap().close(200, "ok").unwrap();
                })
                .unwrap();
            });
        })
        .unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    assert_eq!(*numbers.borrow(), [1, 2, 1]);
}

#[test]
fn negotiated_values_are_what_the_broker_reports() {
    let mut params = broker_params();
    params.set_frame_max(4096).unwrap();
    params.set_channel_max(3).unwrap();
    params.set_heartbeat(2);
    let seen = Rc::new(RefCell::new(None));
    let s = seen.clone();
    let (conn, outcome) = connect(params, move |conn| {
        let port = conn.local_address().unwrap().port();
        let info = broker_connection_info(port, &["frame_max", "channel_max", "timeout"])
            .expect("the broker lists our connection");
        *s.borrow_mut() = Some((conn.frame_max(), conn.channel_max(), conn.heartbeat(), info));
        conn.close(200, "done").unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    assert_eq!(outcome.closes.borrow().len(), 1);
    let (frame_max, channel_max, heartbeat, info) = seen.borrow_mut().take().unwrap();
    assert_eq!((frame_max, channel_max, heartbeat), (4096, 3, 2));
    assert_eq!(info, ["4096", "3", "2"]);
}

#[test]
fn heartbeat_negotiation_variants() {
    for (heartbeat, expected) in [
        (Heartbeat::Disabled, Some(0)),
        (Heartbeat::Timeout(7), Some(7)),
        (Heartbeat::ServerDefault, None), // the broker's proposal
        (Heartbeat::negotiate_with(|proposal| proposal / 2 + 1), None),
    ] {
        let mut params = broker_params();
        params.set_heartbeat(heartbeat.clone());
        let got = Rc::new(Cell::new(None));
        let g = got.clone();
        let (conn, _) = connect(params, move |conn| {
            g.set(Some(conn.heartbeat()));
            conn.close(200, "done").unwrap();
        });
        run_loop(conn.ioloop(), LIMIT);
        let got = got.get().expect("opened");
        match (expected, &heartbeat) {
            (Some(v), _) => assert_eq!(got, v, "{heartbeat:?}"),
            (None, Heartbeat::ServerDefault) => assert_eq!(got, 60, "RabbitMQ proposes 60"),
            (None, _) => assert_eq!(got, 31, "the closure gets the broker's 60"),
        }
    }
}

#[test]
fn the_fourth_channel_over_channel_max_3_fails_without_sending() {
    let mut params = broker_params();
    params.set_channel_max(3).unwrap();
    let result = Rc::new(RefCell::new(None));
    let r = result.clone();
    let (conn, _) = connect(params, move |conn| {
        for _ in 0..3 {
            conn.channel(None, |_| {}).unwrap();
        }
        *r.borrow_mut() = Some(conn.channel(None, |_| panic!("never called")));
        assert!(matches!(
            conn.channel(Some(4), |_| panic!("never called")),
            Err(Error::InvalidChannelNumber { number: 4, .. })
        ));
        assert!(matches!(
            conn.channel(Some(0), |_| panic!("never called")),
            Err(Error::InvalidChannelNumber { number: 0, .. })
        ));
        conn.close(200, "done").unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    assert!(matches!(
        result.borrow_mut().take(),
        Some(Err(Error::NoFreeChannels { channel_max: 3 }))
    ));
}

#[test]
fn wrong_password_is_a_probable_authentication_error_with_403() {
    let mut params = broker_params();
    params.set_credentials(PlainCredentials::new("guest", "not-the-password"));
    let (conn, outcome) = connect(params, |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let errors = outcome.open_errors.borrow();
    assert_eq!(errors.len(), 1);
    assert!(
        matches!(&errors[0], Error::ProbableAuthenticationError { reply_code: 403, reply_text } if reply_text.contains("ACCESS_REFUSED")),
        "{:?}",
        errors[0]
    );
    assert!(errors[0].is_connection_error());
    assert!(outcome.closes.borrow().is_empty());
    assert!(!format!("{:?}", conn.params()).contains("not-the-password"));
}

#[test]
fn unknown_vhost_is_probable_access_denied_with_530() {
    let mut params = broker_params();
    params.set_virtual_host("no-such-vhost").unwrap();
    let (conn, outcome) = connect(params, |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let errors = outcome.open_errors.borrow();
    assert_eq!(errors.len(), 1);
    assert!(
        matches!(
            &errors[0],
            Error::ProbableAccessDeniedError {
                reply_code: 530,
                ..
            }
        ),
        "{:?}",
        errors[0]
    );
}

#[test]
fn refused_port_is_an_open_error_and_leaves_nothing_behind() {
    let mut params = broker_params();
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(port)
        .unwrap();
    let (conn, outcome) = connect(params, |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let errors = outcome.open_errors.borrow();
    assert_eq!(errors.len(), 1);
    assert!(
        matches!(&errors[0], Error::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{:?}",
        errors[0]
    );
    assert_eq!(outcome.terminal_count(), 1);
    assert!(conn.is_closed());
}

#[test]
fn close_right_after_construction_aborts_the_open() {
    let (conn, outcome) = connect(broker_params(), |_| panic!("must not open"));
    conn.close(200, "never mind").unwrap();
    run_loop(conn.ioloop(), LIMIT);
    let errors = outcome.open_errors.borrow();
    assert!(
        matches!(errors.as_slice(), [Error::ConnectionOpenAborted]),
        "{errors:?}"
    );
    assert_eq!(outcome.opened.get(), 0);
}

// close() during the handshake is tested deterministically against the
// fake broker in tests/faults.rs (close_after_start_ok_..., close_after_
// tune_ok_...): against the real broker on loopback the handshake is too
// fast to hit a phase reliably.

#[test]
fn add_callback_threadsafe_runs_on_the_loop_with_the_connection_in_order() {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let s = seen.clone();
    let (conn, _) = connect(broker_params(), move |conn| {
        let handle = conn.threadsafe_handle();
        let s = s.clone();
        let loop_thread = std::thread::current().id();
        std::thread::spawn(move || {
            for i in 0..100 {
                handle
                    .add_callback_threadsafe(move |conn| {
                        assert_eq!(std::thread::current().id(), loop_thread);
                        assert!(conn.is_open());
                        if i == 99 {
                            conn.close(200, "done").unwrap();
                        }
                    })
                    .unwrap();
            }
        });
        let _ = s;
    });
    let s2 = seen.clone();
    conn.add_on_close_callback(move |_, _| s2.borrow_mut().push("closed"));
    run_loop(conn.ioloop(), LIMIT);
    assert_eq!(*seen.borrow(), ["closed"]);
    let handle = conn.threadsafe_handle();
    assert!(matches!(
        handle.add_callback_threadsafe(|_| {}),
        Err(Error::ConnectionWrongState { .. })
    ));
}

#[test]
fn broker_close_connection_is_reported_with_320_and_pending_channel_open_fails() {
    let channel_result = Rc::new(RefCell::new(None::<Result<Channel, Error>>));
    let r = channel_result.clone();
    let (conn, outcome) = connect(broker_params(), move |conn| {
        let port = conn.local_address().unwrap().port();
        // Find our connection's pid, then have the broker close it.
        let pid = common::rabbitmqctl(&["-q", "list_connections", "pid", "peer_port"])
            .lines()
            .find_map(|l| {
                let (pid, p) = l.split_once('\t')?;
                (p.trim().parse::<u16>().ok()? == port).then(|| pid.to_string())
            })
            .expect("our connection is listed");
        let r = r.clone();
        conn.channel(None, move |res| *r.borrow_mut() = Some(res))
            .unwrap();
        rabbitmqctl(&["close_connection", &pid, "test says bye"]);
    });
    run_loop(conn.ioloop(), LIMIT);
    let closes = outcome.closes.borrow();
    assert!(
        matches!(closes.as_slice(), [Error::ConnectionClosedByBroker { reply_code: 320, reply_text }] if reply_text.contains("test says bye")),
        "{closes:?}"
    );
    // The channel open either completed before the close or failed with it.
    match channel_result
        .borrow_mut()
        .take()
        .expect("the open callback ran")
    {
        Ok(_) => {}
        Err(e) => assert!(matches!(
            e,
            Error::ConnectionClosedByBroker {
                reply_code: 320,
                ..
            }
        )),
    }
}

#[test]
fn update_secret_is_answered() {
    let result = Rc::new(RefCell::new(None));
    let r = result.clone();
    let (conn, _) = connect(broker_params(), move |conn| {
        let (_, password) = common::broker_credentials();
        conn.update_secret(&password, "rotation", move |conn, res| {
            *r.borrow_mut() = Some(res);
            let _ = conn.close(200, "done");
        })
        .unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    let res = result.borrow_mut().take().expect("callback ran");
    assert!(res.is_ok(), "{res:?}");
}

#[test]
fn several_endpoints_the_first_dead_connects_to_the_second() {
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
    let outcome = Rc::new(Outcome::default());
    let (o1, o2, o3) = (outcome.clone(), outcome.clone(), outcome.clone());
    let conn = SelectConnection::create(
        vec![dead, good.clone()],
        move |conn| {
            o1.opened.set(1);
            assert_eq!(conn.params().port(), good.port());
            conn.close(200, "ok").unwrap();
        },
        move |conn, e| {
            o2.open_errors.borrow_mut().push(e);
            conn.ioloop().stop();
        },
        move |conn, e| {
            o3.closes.borrow_mut().push(e);
            conn.ioloop().stop();
        },
        None,
    )
    .unwrap();
    run_loop(conn.ioloop(), LIMIT);
    assert_eq!(
        outcome.opened.get(),
        1,
        "{:?}",
        outcome.open_errors.borrow()
    );
}

#[test]
fn connection_attempts_and_retry_delay_are_honoured() {
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut params = broker_params();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(dead_port)
        .unwrap();
    params.set_connection_attempts(3).unwrap();
    params.set_retry_delay(Duration::from_millis(300));
    let started = Instant::now();
    let (conn, outcome) = connect(params, |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let elapsed = started.elapsed();
    let errors = outcome.open_errors.borrow();
    match errors.as_slice() {
        [Error::ConnectionWorkflowFailed { attempts }] => assert_eq!(attempts.len(), 3),
        other => panic!("{other:?}"),
    }
    // Two delays of 300 ms between three rounds: at least 600 ms.
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
}

#[test]
fn several_sets_are_tried_in_passes_counted_and_paced_by_the_last_set() {
    // Both sets point at a dead port. The first set asks for 5 attempts 3 s
    // apart, the last for 2 passes 200 ms apart: as in pika 1.1, the last
    // set's values apply to passes over the whole list.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = |attempts: u32, delay: Duration| {
        let mut p = broker_params();
        p.set_host("127.0.0.1")
            .unwrap()
            .set_port(dead_port)
            .unwrap()
            .set_connection_attempts(attempts)
            .unwrap();
        p.set_retry_delay(delay);
        p
    };
    let sets = vec![
        dead(5, Duration::from_secs(3)),
        dead(2, Duration::from_millis(200)),
    ];
    let errors = Rc::new(RefCell::new(Vec::new()));
    let e = errors.clone();
    let started = Instant::now();
    let conn = SelectConnection::create(
        sets,
        |_| panic!("must not open"),
        move |conn, err| {
            e.borrow_mut().push(err);
            conn.ioloop().stop();
        },
        |_, _| panic!("never opened"),
        None,
    )
    .unwrap();
    run_loop(conn.ioloop(), LIMIT);
    let elapsed = started.elapsed();
    match errors.borrow().as_slice() {
        [Error::ConnectionWorkflowFailed { attempts }] => {
            assert_eq!(attempts.len(), 4, "2 passes x 2 sets: {attempts:?}")
        }
        other => panic!("{other:?}"),
    }
    // One pause of 200 ms; the first set's 3 s were never waited (a
    // liveness bound with slack, not a timing).
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[test]
fn outbound_buffer_is_visible_and_drained_callback_fires_below_low_water() {
    let drained = Rc::new(Cell::new(0u32));
    let seen_size = Rc::new(Cell::new(0usize));
    let (d, s) = (drained.clone(), seen_size.clone());
    let (conn, outcome) = connect(broker_params(), move |conn| {
        conn.set_outbound_watermarks(64 * 1024, 16 * 1024).unwrap();
        assert!(matches!(
            conn.set_outbound_watermarks(1, 2),
            Err(Error::InvalidParameter { .. })
        ));
        let d = d.clone();
        conn.add_on_outbound_drained_callback(move |conn| {
            d.set(d.get() + 1);
            assert!(conn.outbound_buffer_size() < 16 * 1024);
            assert!(!conn.is_outbound_above_high_water());
            conn.close(200, "drained").unwrap();
        });
        let s = s.clone();
        conn.channel(None, move |ch| {
            let ch = ch.unwrap();
            let conn = ch.connection().unwrap();
            let body = vec![7u8; 256 * 1024];
            for _ in 0..8 {
                ch.basic_publish("", "no-such-queue", &body, &Default::default(), false)
                    .unwrap();
            }
            // Nothing has been written yet: it is all in the buffer.
            s.set(conn.outbound_buffer_size());
            assert!(conn.is_outbound_above_high_water());
        })
        .unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    assert!(seen_size.get() >= 8 * 256 * 1024, "{}", seen_size.get());
    assert_eq!(drained.get(), 1);
    assert!(matches!(
        outcome.closes.borrow().as_slice(),
        [Error::ConnectionClosedByClient { .. }]
    ));
}

#[test]
fn channel_returns_an_opening_handle_that_can_be_closed_before_it_opens() {
    let result = Rc::new(RefCell::new(None));
    let closed = Rc::new(RefCell::new(None));
    let (r, c) = (result.clone(), closed.clone());
    let (conn, outcome) = connect(broker_params(), move |conn| {
        let ch = conn
            .channel(None, move |res| {
                *r.borrow_mut() = Some(res.map(|ch| ch.channel_number()))
            })
            .unwrap();
        assert!(ch.is_opening());
        assert_eq!(ch.channel_number(), 1);
        ch.add_on_close_callback(move |ch, reason| {
            *c.borrow_mut() = Some(reason);
            ch.connection().unwrap().close(200, "done").unwrap();
        });
        ch.close(200, "changed my mind").unwrap();
        assert!(ch.is_closing());
    });
    run_loop(conn.ioloop(), LIMIT);
    assert!(
        matches!(
            result.borrow_mut().take(),
            Some(Err(Error::ChannelClosedByClient {
                reply_code: 200,
                ..
            }))
        ),
        "the OpenOk is suppressed: the open callback gets the close"
    );
    assert!(matches!(
        closed.borrow_mut().take(),
        Some(Error::ChannelClosedByClient { .. })
    ));
    assert_eq!(outcome.closes.borrow().len(), 1);
}

#[test]
fn an_update_secret_answered_while_closing_completes_and_the_close_is_clean() {
    let secret_result = Rc::new(RefCell::new(None));
    let s = secret_result.clone();
    let (conn, outcome) = connect(broker_params(), move |conn| {
        let (_, password) = common::broker_credentials();
        conn.update_secret(&password, "rotation", move |_, r| *s.borrow_mut() = Some(r))
            .unwrap();
        conn.close(200, "right away").unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    let r = secret_result.borrow_mut().take().expect("the callback ran");
    assert!(r.is_ok(), "{r:?}");
    assert!(
        matches!(
            outcome.closes.borrow().as_slice(),
            [Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }]
        ),
        "{:?}",
        outcome.closes.borrow()
    );
}

#[test]
fn reply_texts_over_255_bytes_are_cut_not_refused() {
    let channel_reason = Rc::new(RefCell::new(None));
    let c = channel_reason.clone();
    let long = "é".repeat(200); // 400 bytes
    let (conn, outcome) = connect(broker_params(), move |conn| {
        conn.channel(None, move |ch| {
            let ch = ch.unwrap();
            let long = long.clone();
            ch.add_on_close_callback(move |ch, reason| {
                *c.borrow_mut() = Some(reason);
                ch.connection().unwrap().close(200, &long).unwrap();
            });
            ch.close(200, &"é".repeat(200)).unwrap();
        })
        .unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    match channel_reason.borrow_mut().take() {
        Some(Error::ChannelClosedByClient { reply_text, .. }) => {
            assert_eq!(reply_text.len(), 254, "cut at a character boundary");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        outcome.closes.borrow().as_slice(),
        [Error::ConnectionClosedByClient { .. }]
    ));
}

#[test]
fn erase_on_connect_wipes_the_password_once_it_was_sent() {
    let (user, password) = common::broker_credentials();
    let mut params = broker_params();
    params
        .set_credentials(PlainCredentials::new(user, password.clone()).with_erase_on_connect(true));
    let seen = Rc::new(RefCell::new(None));
    let s = seen.clone();
    let (conn, _) = connect(params, move |conn| {
        let p = conn.params();
        *s.borrow_mut() = p.credentials().as_plain().map(|c| c.password().to_string());
        conn.close(200, "done").unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    let after = seen.borrow_mut().take().expect("opened");
    assert_ne!(after, password, "the password is gone from the parameters");
    assert!(
        after.bytes().all(|b| b == 0) || after.is_empty(),
        "{after:?}"
    );
}

#[test]
fn timeouts_beyond_the_clocks_range_mean_no_deadline_and_never_panic() {
    // Duration::MAX as socket, stack and blocked-connection timeout: the
    // connect, the handshake and the close handshake (bounded by the
    // socket timeout) run without a deadline instead of overflowing the
    // clock.
    let params = common::broker_params_with_timeouts_at_max();
    let (conn, outcome) = connect(params, |conn| {
        conn.channel(None, |ch| {
            let ch = ch.unwrap();
            ch.connection().unwrap().close(200, "bye").unwrap();
        })
        .unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    assert_eq!(outcome.opened.get(), 1);
    let closes = outcome.closes.borrow();
    assert!(
        matches!(
            closes.as_slice(),
            [Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }]
        ),
        "{closes:?}"
    );
}
