//! Fault injection against SelectConnection (RELIABILITY.md's catalogue):
//! a broker that never speaks or never accepts, speaks another protocol,
//! refuses the login or the virtual host, proposes a frame_max below the
//! spec's minimum, sends malformed or oversized frames, blocks the
//! connection, never answers our Close, goes silent with the socket open, or
//! loses the stream. The scripted fake broker (FS) plays what the real one
//! will not do; the proxy (PX) sits in front of the real broker for cuts and
//! stalls. Every test checks the CLEAN promise: exactly one terminal
//! callback, channel close callbacks before it and nothing after it, the
//! socket gone, and later calls refused with `ConnectionWrongState`.

mod common;

use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::fake_broker::{
    FakeBroker, FakeConn, OwnedFrame, decode_frames, rabbitmq_start, rabbitmq_tune,
};
use common::proxy::{Direction, FrameKind, Proxy};
use common::{broker_addr, broker_params, run_loop};
use pika::frame::{encode_body, encode_content_header, encode_method};
use pika::spec::{Method, channel, connection};
use pika::{
    BasicProperties, CodecError, ConnectionParameters, ConnectionState, Error, LongString,
    SelectConnection,
};

use Direction::{BrokerToClient, ClientToBroker};

/// The watchdog of one connection's life in a test.
const LIMIT: Duration = Duration::from_secs(15);
/// How long a fake broker waits for the client to close its socket.
const EOF_WAIT: Duration = Duration::from_secs(8);

// ----------------------------------------------------------------------
// Recording what the client reports
// ----------------------------------------------------------------------

/// A callback the client ran.
#[derive(Debug, Clone)]
enum Event {
    Opened,
    OpenError(Error),
    Closed(Error),
    ChannelOpened(u16),
    ChannelClosed(u16, Error),
    Blocked(String),
    Unblocked,
}

impl Event {
    fn is_terminal(&self) -> bool {
        matches!(self, Event::OpenError(_) | Event::Closed(_))
    }
}

/// Every callback of one connection and its channels, in order, timed.
#[derive(Default)]
struct Outcome {
    events: RefCell<Vec<(Instant, Event)>>,
}

impl Outcome {
    fn push(&self, event: Event) {
        self.events.borrow_mut().push((Instant::now(), event));
    }

    fn events(&self) -> Vec<Event> {
        self.events
            .borrow()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    fn len(&self) -> usize {
        self.events.borrow().len()
    }

    /// When the first event matching `pred` happened.
    fn time_of(&self, pred: impl Fn(&Event) -> bool) -> Instant {
        self.events
            .borrow()
            .iter()
            .find(|(_, e)| pred(e))
            .map(|(at, _)| *at)
            .unwrap_or_else(|| panic!("no such event among {:?}", self.events()))
    }

    fn terminal_time(&self) -> Instant {
        self.time_of(Event::is_terminal)
    }
}

/// Creates a connection whose every callback is recorded in the returned
/// [`Outcome`]; `on_open` runs when it is open. The loop stops at the
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
            o1.push(Event::Opened);
            on_open(conn);
        },
        move |conn, err| {
            o2.push(Event::OpenError(err));
            conn.ioloop().stop();
        },
        move |conn, err| {
            o3.push(Event::Closed(err));
            conn.ioloop().stop();
        },
    )
    .expect("connection created");
    let o = outcome.clone();
    conn.add_on_connection_blocked_callback(move |_, blocked| {
        o.push(Event::Blocked(blocked.reason.clone()))
    });
    let o = outcome.clone();
    conn.add_on_connection_unblocked_callback(move |_, _| o.push(Event::Unblocked));
    (conn, outcome)
}

/// Opens a channel whose open and close are recorded; `then` gets it once
/// open.
fn open_channel(
    conn: &SelectConnection,
    outcome: &Rc<Outcome>,
    then: impl FnOnce(&pika::Channel) + 'static,
) {
    let o = outcome.clone();
    conn.channel(None, move |result| {
        let ch = result.expect("the channel opens");
        o.push(Event::ChannelOpened(ch.channel_number()));
        let o2 = o.clone();
        ch.add_on_close_callback(move |ch, reason| {
            o2.push(Event::ChannelClosed(ch.channel_number(), reason))
        });
        then(&ch);
    })
    .expect("the connection is open");
}

/// Runs the loop for `duration` (or until something stops it).
fn run_for(conn: &SelectConnection, duration: Duration) {
    let lp = conn.ioloop().clone();
    let stopper = lp.clone();
    let timer = lp.call_later(duration, move || stopper.stop());
    lp.start().expect("the loop runs");
    lp.remove_timeout(timer);
}

/// Checks the CLEAN promise after the loop stopped at the terminal callback
/// and returns the terminal error: exactly one terminal callback
/// (`on_open_error` when the connection never opened, `on_close` when it
/// did), every channel's close callback before it, nothing after it (also
/// not during a further short run of the loop), the socket gone, and later
/// calls refused with `ConnectionWrongState`.
fn assert_clean(conn: &SelectConnection, outcome: &Outcome) -> Error {
    run_for(conn, Duration::from_millis(100));
    let events = outcome.events();
    let terminals: Vec<usize> = (0..events.len())
        .filter(|&i| events[i].is_terminal())
        .collect();
    assert_eq!(
        terminals.len(),
        1,
        "exactly one terminal callback: {events:?}"
    );
    let last = terminals[0];
    assert_eq!(
        last,
        events.len() - 1,
        "nothing runs after the terminal callback: {events:?}"
    );
    let opened = events.iter().filter(|e| matches!(e, Event::Opened)).count();
    let error = match &events[last] {
        Event::OpenError(e) => {
            assert_eq!(
                opened, 0,
                "on_open_error only for a connection that never opened"
            );
            e.clone()
        }
        Event::Closed(e) => {
            assert_eq!(opened, 1, "on_close only for a connection that opened");
            e.clone()
        }
        _ => unreachable!(),
    };
    assert!(error.is_connection_error(), "{error:?}");
    let channels_opened = events
        .iter()
        .filter(|e| matches!(e, Event::ChannelOpened(_)))
        .count();
    let channels_closed = events
        .iter()
        .filter(|e| matches!(e, Event::ChannelClosed(..)))
        .count();
    assert_eq!(
        channels_opened, channels_closed,
        "every open channel's close callback ran, before the connection's: {events:?}"
    );
    assert!(conn.is_closed(), "{:?}", conn.state());
    assert_eq!(conn.local_address(), None, "the socket is gone");
    assert_eq!(conn.peer_address(), None, "the socket is gone");
    assert!(
        matches!(
            conn.close(200, "again"),
            Err(Error::ConnectionWrongState { .. })
        ),
        "close() after the end"
    );
    assert!(
        matches!(
            conn.channel(None, |_| panic!("never called")),
            Err(Error::ConnectionWrongState { .. })
        ),
        "channel() after the end"
    );
    assert!(
        matches!(
            conn.threadsafe_handle().add_callback_threadsafe(|_| {}),
            Err(Error::ConnectionWrongState { .. })
        ),
        "add_callback_threadsafe() after the end"
    );
    error
}

/// Asserts that `elapsed` is at least `bound` (less a hair for timer
/// granularity) and a liveness deadline of 2 × `bound` + 1 s.
fn assert_within_bound(elapsed: Duration, bound: Duration) {
    assert!(
        elapsed >= bound.mul_f64(0.9),
        "gave up after {elapsed:?}, before the {bound:?} bound"
    );
    assert!(
        elapsed < bound * 2 + Duration::from_secs(1),
        "took {elapsed:?} for a {bound:?} bound"
    );
}

// ----------------------------------------------------------------------
// The fake broker (FS) and the proxy (PX)
// ----------------------------------------------------------------------

/// A fake broker whose script returns what the test inspects afterwards.
struct Fake<T> {
    broker: FakeBroker,
    result: mpsc::Receiver<T>,
}

impl<T: Send + 'static> Fake<T> {
    fn start(script: impl FnOnce(&mut FakeConn) -> T + Send + 'static) -> Fake<T> {
        let (tx, result) = mpsc::channel();
        let broker = FakeBroker::start(move |mut conn| {
            let value = script(&mut conn);
            let _ = tx.send(value);
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

    /// Waits for the script (failing the test with its failure).
    fn finish(self) -> T {
        self.broker.join();
        self.result.recv().expect("the script returned its result")
    }
}

/// Everything the client sends until it closes its socket, as frames.
fn until_eof(conn: &mut FakeConn) -> Vec<OwnedFrame> {
    decode_frames(&conn.read_until_eof(EOF_WAIT))
}

/// The Connection.Close frames among `frames`.
fn connection_closes(frames: &[OwnedFrame]) -> Vec<connection::Close> {
    frames
        .iter()
        .filter_map(|f| match f {
            OwnedFrame::Method(0, Method::ConnectionClose(close)) => Some(close.clone()),
            _ => None,
        })
        .collect()
}

fn method_names(frames: &[OwnedFrame]) -> Vec<&'static str> {
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

/// Asserts that the client's last frame is its one Connection.Close, with
/// `reply_code`.
fn assert_closed_with(frames: &[OwnedFrame], reply_code: u16) {
    let closes = connection_closes(frames);
    assert_eq!(
        closes.len(),
        1,
        "one Connection.Close: {:?}",
        method_names(frames)
    );
    assert_eq!(closes[0].reply_code, reply_code, "{:?}", closes[0]);
    assert!(
        matches!(
            frames.last(),
            Some(OwnedFrame::Method(0, Method::ConnectionClose(_)))
        ),
        "Connection.Close is the last frame: {:?}",
        method_names(frames)
    );
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

// ----------------------------------------------------------------------
// Connecting (catalogue 2, 3, 4, 7)
// ----------------------------------------------------------------------

#[test]
fn tcp_connect_without_answer_fails_with_socket_timeout() {
    // A listener with a backlog of 0 that never accepts: one connection
    // fills its accept queue, after which Linux drops every SYN, so a
    // connect gets no answer at all.
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let _filler = TcpStream::connect(addr).expect("the first connection fills the queue");
    let probe = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
    assert!(
        matches!(&probe, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "precondition: a full accept queue must leave connects unanswered: {probe:?}"
    );
    let bound = Duration::from_secs(1);
    let mut params = ConnectionParameters::default();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(addr.port())
        .unwrap();
    params
        .set_socket_timeout(bound)
        .unwrap()
        .set_stack_timeout(Duration::from_secs(10))
        .unwrap();
    let started = Instant::now();
    let (conn, outcome) = connect(params, |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    assert_within_bound(outcome.terminal_time() - started, bound);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::SocketTimeout { address, timeout } if *timeout == bound && *address == addr.to_string()),
        "{error:?}"
    );
}

#[test]
fn broker_that_never_speaks_fails_with_stack_timeout() {
    let fake = Fake::start(|conn| {
        conn.read_protocol_header();
        until_eof(conn)
    });
    let bound = Duration::from_secs(1);
    let mut params = fake.params();
    params.set_stack_timeout(bound).unwrap();
    let started = Instant::now();
    let (conn, outcome) = connect(params, |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    assert_within_bound(outcome.terminal_time() - started, bound);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::StackTimeout { timeout, .. } if *timeout == bound),
        "{error:?}"
    );
    let frames = fake.finish();
    assert!(frames.is_empty(), "{:?}", method_names(&frames));
}

/// Polls every millisecond until the connection is in `state` and the fake
/// broker has set `reached`, then runs `then`.
fn when_reached(
    conn: &SelectConnection,
    state: ConnectionState,
    reached: Arc<AtomicBool>,
    then: Box<dyn FnOnce(&SelectConnection)>,
) {
    if conn.state() == state && reached.load(SeqCst) {
        then(conn);
        return;
    }
    assert!(
        matches!(
            conn.state(),
            ConnectionState::Connecting | ConnectionState::Protocol | ConnectionState::Start
        ) || conn.state() == state,
        "{:?} before reaching {state:?}",
        conn.state()
    );
    let c = conn.clone();
    conn.ioloop().call_later(Duration::from_millis(1), move || {
        when_reached(&c, state, reached, then)
    });
}

/// Runs a fake broker that plays the handshake up to `script`'s end, sets
/// a flag, and then only reads until the client closes its socket. The
/// client calls `close()` once it is in `state` and the flag is set.
/// Returns what the broker received after the flag.
fn close_during_handshake(
    state: ConnectionState,
    script: impl FnOnce(&mut FakeConn) + Send + 'static,
) -> Vec<OwnedFrame> {
    let reached = Arc::new(AtomicBool::new(false));
    let flag = reached.clone();
    let fake = Fake::start(move |conn| {
        script(conn);
        flag.store(true, SeqCst);
        until_eof(conn)
    });
    let (conn, outcome) = connect(fake.params(), |_| panic!("must not open"));
    let c = conn.clone();
    conn.ioloop().call_soon(move || {
        when_reached(
            &c,
            state,
            reached,
            Box::new(|conn| {
                conn.close(200, "abort").expect("close() while opening");
                assert!(conn.is_closed());
            }),
        )
    });
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(matches!(error, Error::ConnectionOpenAborted), "{error:?}");
    fake.finish()
}

#[test]
fn close_after_start_ok_aborts_the_open_without_a_close_handshake() {
    let frames = close_during_handshake(ConnectionState::Start, |conn| {
        conn.read_protocol_header();
        conn.start_default();
        conn.expect::<connection::StartOk>(0);
    });
    assert!(frames.is_empty(), "{:?}", method_names(&frames));
}

#[test]
fn close_after_tune_ok_aborts_the_open_without_a_close_handshake() {
    let frames = close_during_handshake(ConnectionState::Tune, |conn| {
        conn.read_protocol_header();
        conn.start_default();
        conn.expect::<connection::StartOk>(0);
        // A heartbeat of 1 s: the timers the client starts here must go
        // with the aborted attempt.
        conn.send_method(
            0,
            connection::Tune {
                heartbeat: 1,
                ..rabbitmq_tune()
            },
        );
        conn.expect::<connection::TuneOk>(0);
        conn.expect::<connection::Open>(0);
    });
    // Heartbeats may have gone out meanwhile; nothing else.
    assert!(
        frames.iter().all(|f| *f == OwnedFrame::Heartbeat),
        "{:?}",
        method_names(&frames)
    );
}

#[test]
fn broker_dropping_the_socket_after_our_protocol_header_is_incompatible_protocol() {
    let fake = Fake::start(|conn| {
        conn.read_protocol_header();
    });
    let (conn, outcome) = connect(fake.params(), |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::IncompatibleProtocol { detail } if detail.contains("protocol header")),
        "{error:?}"
    );
    fake.finish();
}

#[test]
fn broker_answering_with_another_protocol_header_is_incompatible_protocol_naming_it() {
    for (header, named) in [
        (*b"AMQP\x00\x00\x08\x00", "AMQP 0-0-8-0"),
        (*b"AMQP\x00\x01\x00\x00", "AMQP 0-1-0-0"),
    ] {
        let fake = Fake::start(move |conn| {
            conn.read_protocol_header();
            conn.send_raw(&header);
            until_eof(conn)
        });
        let (conn, outcome) = connect(fake.params(), |_| panic!("must not open"));
        run_loop(conn.ioloop(), LIMIT);
        let error = assert_clean(&conn, &outcome);
        assert!(
            matches!(&error, Error::IncompatibleProtocol { detail } if detail.contains(named)),
            "{named}: {error:?}"
        );
        let frames = fake.finish();
        assert!(frames.is_empty(), "{named}: {:?}", method_names(&frames));
    }
}

#[test]
fn broker_starting_amqp_0_8_is_incompatible_protocol() {
    let fake = Fake::start(|conn| {
        conn.read_protocol_header();
        conn.send_method(
            0,
            connection::Start {
                version_major: 8,
                version_minor: 0,
                ..rabbitmq_start()
            },
        );
        until_eof(conn)
    });
    let (conn, outcome) = connect(fake.params(), |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::IncompatibleProtocol { detail } if detail.contains("8-0")),
        "{error:?}"
    );
    let frames = fake.finish();
    assert!(frames.is_empty(), "{:?}", method_names(&frames));
}

#[test]
fn broker_offering_no_plain_mechanism_is_an_authentication_error() {
    let fake = Fake::start(|conn| {
        conn.read_protocol_header();
        conn.send_method(
            0,
            connection::Start {
                mechanisms: LongString::from("AMQPLAIN EXTERNAL"),
                ..rabbitmq_start()
            },
        );
        until_eof(conn)
    });
    let (conn, outcome) = connect(fake.params(), |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::AuthenticationError { offered, wanted: "PLAIN" } if offered == "AMQPLAIN EXTERNAL"),
        "{error:?}"
    );
    let frames = fake.finish();
    assert!(frames.is_empty(), "no StartOk: {:?}", method_names(&frames));
}

#[test]
fn broker_proposing_frame_max_below_4096_is_refused_at_open() {
    let fake = Fake::start(|conn| {
        conn.read_protocol_header();
        conn.start_default();
        conn.expect::<connection::StartOk>(0);
        conn.send_method(
            0,
            connection::Tune {
                frame_max: 1024,
                ..rabbitmq_tune()
            },
        );
        until_eof(conn)
    });
    let (conn, outcome) = connect(fake.params(), |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::IncompatibleProtocol { detail } if detail.contains("frame_max 1024")),
        "{error:?}"
    );
    let frames = fake.finish();
    assert!(
        frames.is_empty(),
        "no TuneOk agreeing to it, no Close: {:?}",
        method_names(&frames)
    );
}

#[test]
fn login_refused_with_403_is_probable_authentication_error_and_answered_with_close_ok() {
    let fake = Fake::start(|conn| {
        conn.read_protocol_header();
        conn.start_default();
        conn.expect::<connection::StartOk>(0);
        conn.send_method(
            0,
            connection::Close {
                reply_code: 403,
                reply_text: "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"
                    .into(),
                class_id: 0,
                method_id: 0,
            },
        );
        until_eof(conn)
    });
    let (conn, outcome) = connect(fake.params(), |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::ProbableAuthenticationError { reply_code: 403, reply_text } if reply_text.starts_with("ACCESS_REFUSED")),
        "{error:?}"
    );
    let frames = fake.finish();
    assert_eq!(method_names(&frames), ["Connection.CloseOk"]);
}

#[test]
fn vhost_refused_with_530_is_probable_access_denied_and_answered_with_close_ok() {
    let fake = Fake::start(|conn| {
        conn.read_protocol_header();
        conn.start_default();
        conn.expect::<connection::StartOk>(0);
        conn.send_method(0, rabbitmq_tune());
        conn.expect::<connection::TuneOk>(0);
        conn.expect::<connection::Open>(0);
        conn.send_method(
            0,
            connection::Close {
                reply_code: 530,
                reply_text: "NOT_ALLOWED - vhost / not found".into(),
                class_id: 10,
                method_id: 40,
            },
        );
        until_eof(conn)
    });
    let (conn, outcome) = connect(fake.params(), |_| panic!("must not open"));
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::ProbableAccessDeniedError { reply_code: 530, reply_text } if reply_text.contains("vhost")),
        "{error:?}"
    );
    let frames = fake.finish();
    assert_eq!(method_names(&frames), ["Connection.CloseOk"]);
}

// ----------------------------------------------------------------------
// Broker closes and blocked connections (FS)
// ----------------------------------------------------------------------

#[test]
fn broker_close_after_open_is_answered_and_closes_channels_first() {
    let fake = Fake::start(|conn| {
        conn.handshake(rabbitmq_tune());
        conn.expect::<channel::Open>(1);
        conn.send_method(1, channel::OpenOk::default());
        conn.send_method(
            0,
            connection::Close {
                reply_code: 320,
                reply_text: "CONNECTION_FORCED - broker forced connection closure".into(),
                class_id: 0,
                method_id: 0,
            },
        );
        until_eof(conn)
    });
    let (conn, outcome) = connect(fake.params(), |_| {});
    let o = outcome.clone();
    conn.add_on_open_callback(move |conn| open_channel(conn, &o, |_| {}));
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::ConnectionClosedByBroker { reply_code: 320, reply_text } if reply_text.starts_with("CONNECTION_FORCED")),
        "{error:?}"
    );
    let events = outcome.events();
    assert!(
        matches!(
            &events[events.len() - 2],
            Event::ChannelClosed(
                1,
                Error::ConnectionClosedByBroker {
                    reply_code: 320,
                    ..
                }
            )
        ),
        "{events:?}"
    );
    let frames = fake.finish();
    assert_eq!(method_names(&frames), ["Connection.CloseOk"]);
}

#[test]
fn blocked_and_unblocked_reach_their_callbacks_and_unblocking_stops_the_timeout() {
    let fake = Fake::start(|conn| {
        conn.handshake(rabbitmq_tune());
        conn.send_method(
            0,
            connection::Blocked {
                reason: "low on memory".into(),
            },
        );
        conn.sleep(Duration::from_millis(200));
        conn.send_method(0, connection::Unblocked {});
        conn.expect::<connection::Close>(0);
        conn.send_method(0, connection::CloseOk {});
        until_eof(conn)
    });
    let mut params = fake.params();
    params
        .set_blocked_connection_timeout(Duration::from_secs(1))
        .unwrap();
    let reasons = Rc::new(RefCell::new(Vec::new()));
    let (conn, outcome) = connect(params, |_| {});
    let r = reasons.clone();
    conn.add_on_connection_blocked_callback(move |conn, _| {
        r.borrow_mut().push(conn.blocked_reason());
    });
    let r = reasons.clone();
    conn.add_on_connection_unblocked_callback(move |conn, _| {
        r.borrow_mut().push(conn.blocked_reason());
        // Stay open past the blocked timeout: it must not fire any more.
        let c = conn.clone();
        conn.ioloop()
            .call_later(Duration::from_millis(1500), move || {
                c.close(200, "done").unwrap()
            });
    });
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(
            &error,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "{error:?}"
    );
    let events = outcome.events();
    assert!(
        matches!(events.as_slice(), [Event::Opened, Event::Blocked(reason), Event::Unblocked, Event::Closed(_)] if reason == "low on memory"),
        "{events:?}"
    );
    assert_eq!(*reasons.borrow(), [Some("low on memory".to_string()), None]);
    let frames = fake.finish();
    assert!(
        frames.is_empty(),
        "nothing after the close handshake: {:?}",
        method_names(&frames)
    );
}

#[test]
fn blocked_longer_than_blocked_connection_timeout_drops_the_socket_without_close() {
    let fake = Fake::start(|conn| {
        conn.handshake(rabbitmq_tune());
        conn.send_method(
            0,
            connection::Blocked {
                reason: "low on memory".into(),
            },
        );
        until_eof(conn)
    });
    let bound = Duration::from_secs(1);
    let mut params = fake.params();
    params.set_blocked_connection_timeout(bound).unwrap();
    let (conn, outcome) = connect(params, |_| {});
    run_loop(conn.ioloop(), LIMIT);
    let blocked_at = outcome.time_of(|e| matches!(e, Event::Blocked(_)));
    assert_within_bound(outcome.terminal_time() - blocked_at, bound);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::ConnectionBlockedTimeout { timeout } if *timeout == bound),
        "{error:?}"
    );
    let frames = fake.finish();
    assert!(frames.is_empty(), "{:?}", method_names(&frames));
}

#[test]
fn close_unanswered_by_the_broker_finishes_within_socket_timeout() {
    let fake = Fake::start(|conn| {
        conn.handshake(rabbitmq_tune());
        let close = conn.expect::<connection::Close>(0);
        assert_eq!((close.reply_code, close.reply_text.as_str()), (200, "bye"));
        // Never answered.
        until_eof(conn)
    });
    let bound = Duration::from_secs(1);
    let mut params = fake.params();
    params.set_socket_timeout(bound).unwrap();
    let closed_at = Rc::new(Cell::new(None));
    let c = closed_at.clone();
    let (conn, outcome) = connect(params, move |conn| {
        c.set(Some(Instant::now()));
        conn.close(200, "bye").unwrap();
    });
    run_loop(conn.ioloop(), LIMIT);
    assert_within_bound(outcome.terminal_time() - closed_at.get().unwrap(), bound);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(&error, Error::ConnectionClosedByClient { reply_code: 200, reply_text } if reply_text == "bye"),
        "{error:?}"
    );
    let frames = fake.finish();
    assert!(frames.is_empty(), "{:?}", method_names(&frames));
}

// ----------------------------------------------------------------------
// Malformed input after open (catalogue 15, 16)
// ----------------------------------------------------------------------

/// Opens a connection to a fake broker that, once the handshake is done,
/// sends `bytes` and reads until the client closes; returns the client's
/// terminal error (CLEAN checked), its events, and the frames it sent
/// after the handshake.
fn after_open_send(
    params: impl FnOnce(&mut ConnectionParameters),
    bytes: Vec<u8>,
) -> (Error, Vec<Event>, Vec<OwnedFrame>) {
    let fake = Fake::start(move |conn| {
        conn.handshake(rabbitmq_tune());
        conn.send_raw(&bytes);
        until_eof(conn)
    });
    let mut p = fake.params();
    params(&mut p);
    let (conn, outcome) = connect(p, |_| {});
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    (error, outcome.events(), fake.finish())
}

/// The codec error inside an `Error::Protocol`.
fn codec_error(error: &Error) -> &CodecError {
    match error {
        Error::Protocol(e) => e,
        other => panic!("expected Error::Protocol, got {other:?}"),
    }
}

fn method_frame(channel: u16, method: impl Into<Method>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_method(&mut out, channel, &method.into(), 0).unwrap();
    out
}

#[test]
fn bad_frame_end_octet_closes_with_501_before_the_frame_is_used() {
    let mut bytes = method_frame(
        0,
        connection::Blocked {
            reason: "low on memory".into(),
        },
    );
    *bytes.last_mut().unwrap() = 0x00;
    let (error, events, frames) = after_open_send(|_| {}, bytes);
    assert!(
        matches!(
            codec_error(&error),
            CodecError::BadFrameEnd {
                found: 0x00,
                frame_type: 1,
                channel: 0
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(501));
    assert!(
        !events.iter().any(|e| matches!(e, Event::Blocked(_))),
        "the frame was not dispatched: {events:?}"
    );
    assert_closed_with(&frames, 501);
}

#[test]
fn unknown_frame_type_closes_with_501() {
    let (error, _, frames) = after_open_send(|_| {}, vec![9, 0, 0, 0, 0, 0, 0, 0xCE]);
    assert!(
        matches!(
            codec_error(&error),
            CodecError::UnknownFrameType {
                frame_type: 9,
                channel: 0
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(501));
    assert_closed_with(&frames, 501);
}

#[test]
fn heartbeat_on_channel_1_closes_with_501() {
    let (error, _, frames) = after_open_send(|_| {}, vec![8, 0, 1, 0, 0, 0, 0, 0xCE]);
    assert!(
        matches!(
            codec_error(&error),
            CodecError::BadHeartbeat {
                channel: 1,
                size: 0
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(501));
    assert_closed_with(&frames, 501);
}

#[test]
fn protocol_header_after_open_closes_with_501() {
    let (error, _, frames) = after_open_send(|_| {}, b"AMQP\x00\x00\x09\x01".to_vec());
    assert!(
        matches!(codec_error(&error), CodecError::ProtocolHeader { .. }),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(501));
    assert_closed_with(&frames, 501);
}

#[test]
fn unknown_class_and_method_closes_with_503() {
    // A method frame on channel 0 for class 77, method 10, no arguments.
    let bytes = vec![1, 0, 0, 0, 0, 0, 4, 0, 77, 0, 10, 0xCE];
    let (error, _, frames) = after_open_send(|_| {}, bytes);
    assert!(
        matches!(
            codec_error(&error).root(),
            CodecError::UnknownMethod {
                class_id: 77,
                method_id: 10
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(503));
    assert_closed_with(&frames, 503);
}

#[test]
fn undecodable_method_arguments_close_with_502() {
    // Connection.Blocked whose reason claims 5 bytes and has none.
    let bytes = vec![1, 0, 0, 0, 0, 0, 5, 0, 10, 0, 60, 5, 0xCE];
    let (error, events, frames) = after_open_send(|_| {}, bytes);
    assert!(
        matches!(codec_error(&error).root(), CodecError::Truncated { .. }),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(502));
    assert!(!events.iter().any(|e| matches!(e, Event::Blocked(_))));
    assert_closed_with(&frames, 502);
}

#[test]
fn connection_method_on_a_channel_that_is_not_open_closes_with_505() {
    let bytes = method_frame(1, connection::OpenOk::default());
    let (error, _, frames) = after_open_send(|_| {}, bytes);
    assert!(
        matches!(&error, Error::UnexpectedFrame { detail } if detail.contains("channel 1")),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(505));
    assert_closed_with(&frames, 505);
}

#[test]
fn content_header_on_channel_0_closes_with_505() {
    let mut bytes = Vec::new();
    encode_content_header(&mut bytes, 0, 60, 5, &BasicProperties::default(), 0).unwrap();
    let (error, _, frames) = after_open_send(|_| {}, bytes);
    assert!(
        matches!(&error, Error::UnexpectedFrame { detail } if detail.contains("channel 0")),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(505));
    assert_closed_with(&frames, 505);
}

#[test]
fn body_on_channel_0_closes_with_505() {
    let mut bytes = Vec::new();
    encode_body(&mut bytes, 0, b"hello", 0);
    let (error, _, frames) = after_open_send(|_| {}, bytes);
    assert!(
        matches!(&error, Error::UnexpectedFrame { detail } if detail.contains("channel 0")),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(505));
    assert_closed_with(&frames, 505);
}

#[test]
fn body_without_header_on_a_channel_that_is_not_open_closes_with_505() {
    let mut bytes = Vec::new();
    encode_body(&mut bytes, 1, b"hello", 0);
    let (error, _, frames) = after_open_send(|_| {}, bytes);
    assert!(
        matches!(&error, Error::UnexpectedFrame { detail } if detail.contains("channel 1")),
        "{error:?}"
    );
    assert_eq!(error.reply_code(), Some(505));
    assert_closed_with(&frames, 505);
}

#[test]
fn frame_over_frame_max_is_refused_from_its_header_alone_with_501() {
    // Only the 7-byte header is sent, and the socket stays open: the client
    // must not wait for (or make room for) the payload.
    for size in [u32::MAX, 4096 - 8 + 1] {
        let mut header = vec![1, 0, 0];
        header.extend_from_slice(&size.to_be_bytes());
        let (error, _, frames) = after_open_send(
            |p| {
                p.set_frame_max(4096).unwrap();
            },
            header,
        );
        let expected = u64::from(size) + 8;
        assert!(
            matches!(codec_error(&error), CodecError::FrameTooLarge { size, frame_max: 4096 } if *size == expected),
            "size {size}: {error:?}"
        );
        assert_eq!(error.reply_code(), Some(501));
        assert_closed_with(&frames, 501);
    }
}

#[test]
fn frame_of_exactly_frame_max_is_accepted() {
    let fake = Fake::start(|conn| {
        conn.handshake(rabbitmq_tune());
        assert_eq!(conn.frame_max, 4096, "the client asked for 4096");
        conn.expect::<channel::Open>(1);
        // 7 header + 4 class/method + 4 length + 4080 + 1 frame-end = 4096.
        let open_ok = channel::OpenOk {
            channel_id: LongString::from(vec![b'x'; 4080]),
        };
        let frame = method_frame(1, open_ok);
        assert_eq!(frame.len(), 4096);
        conn.send_raw(&frame);
        conn.expect::<channel::Close>(1);
        conn.send_method(1, channel::CloseOk {});
        conn.expect::<connection::Close>(0);
        conn.send_method(0, connection::CloseOk {});
        until_eof(conn)
    });
    let mut params = fake.params();
    params.set_frame_max(4096).unwrap();
    let (conn, outcome) = connect(params, |_| {});
    let o = outcome.clone();
    conn.add_on_open_callback(move |conn| {
        assert_eq!(conn.frame_max(), 4096);
        open_channel(conn, &o, |ch| {
            ch.connection().unwrap().close(200, "done").unwrap();
        });
    });
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(
            &error,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "{error:?}"
    );
    let events = outcome.events();
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::Opened,
                Event::ChannelOpened(1),
                Event::ChannelClosed(1, Error::ChannelClosedByClient { .. }),
                Event::Closed(_)
            ]
        ),
        "{events:?}"
    );
    let frames = fake.finish();
    assert!(frames.is_empty(), "{:?}", method_names(&frames));
}

// ----------------------------------------------------------------------
// Lost streams and heartbeats through the proxy (catalogue 12, 13, 14)
// ----------------------------------------------------------------------

/// Opens a connection and a channel to the real broker through a proxy,
/// cuts the stream while idle with `cut`, and returns the terminal error.
fn cut_while_idle(cut: fn(&Proxy)) -> Error {
    let proxy = Rc::new(Proxy::start(broker_addr()));
    let (conn, outcome) = connect(proxied_params(&proxy), |_| {});
    let (o, px) = (outcome.clone(), proxy.clone());
    conn.add_on_open_callback(move |conn| {
        open_channel(conn, &o, move |ch| {
            let px = px.clone();
            let ch = ch.clone();
            let lp = ch.connection().unwrap().ioloop().clone();
            lp.call_later(Duration::from_millis(100), move || {
                cut(&px);
                // The channel is usable until the loss is noticed.
                assert!(ch.is_open());
                let ch2 = ch.clone();
                ch.add_on_close_callback(move |_, _| {
                    assert!(matches!(
                        ch2.basic_publish("", "q", b"late", &BasicProperties::default(), false),
                        Err(Error::ChannelWrongState { .. })
                    ));
                });
            });
        });
    });
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    let events = outcome.events();
    assert!(
        matches!(
            &events[events.len() - 2],
            Event::ChannelClosed(1, Error::StreamLost { .. })
        ),
        "the channel learns the connection's reason first: {events:?}"
    );
    error
}

#[test]
fn rst_while_idle_is_stream_lost() {
    let error = cut_while_idle(Proxy::cut_rst);
    assert!(
        matches!(&error, Error::StreamLost { source: Some(e), .. } if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{error:?}"
    );
}

#[test]
fn fin_while_idle_is_stream_lost() {
    let error = cut_while_idle(Proxy::cut_fin);
    assert!(
        matches!(&error, Error::StreamLost { source: None, detail } if detail.contains("end of file")),
        "{error:?}"
    );
}

#[test]
fn heartbeats_keep_an_idle_connection_open_for_three_timeouts() {
    let proxy = Proxy::start(broker_addr());
    let timeout = Duration::from_secs(2);
    let mut params = proxied_params(&proxy);
    params.set_heartbeat(2);
    let (conn, outcome) = connect(params, move |conn| {
        assert_eq!(conn.heartbeat(), 2);
        let c = conn.clone();
        conn.ioloop().call_later(timeout * 3, move || {
            assert!(c.is_open());
            c.close(200, "idle long enough").unwrap();
        });
    });
    run_loop(conn.ioloop(), LIMIT);
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(
            &error,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        matches!(
            outcome.events().as_slice(),
            [Event::Opened, Event::Closed(_)]
        ),
        "{:?}",
        outcome.events()
    );
    let gap = proxy.max_gap(ClientToBroker);
    assert!(
        gap < timeout,
        "the client went silent for {gap:?} (timeout {timeout:?})"
    );
    let heartbeats = proxy
        .frames(ClientToBroker)
        .iter()
        .filter(|f| f.kind == FrameKind::Heartbeat)
        .count();
    assert!(heartbeats >= 3, "{heartbeats} heartbeats in 6 s");
}

#[test]
fn broker_silent_with_the_socket_open_is_a_heartbeat_timeout_after_twice_the_timeout() {
    let proxy = Rc::new(Proxy::start(broker_addr()));
    let timeout = Duration::from_secs(2);
    let mut params = proxied_params(&proxy);
    params.set_heartbeat(2);
    let stalled_at = Rc::new(Cell::new(None));
    let (px, s) = (proxy.clone(), stalled_at.clone());
    let (conn, outcome) = connect(params, move |conn| {
        let lp = conn.ioloop().clone();
        lp.call_later(Duration::from_millis(300), move || {
            px.stall(BrokerToClient);
            s.set(Some(Instant::now()));
        });
    });
    run_loop(conn.ioloop(), LIMIT);
    let terminal_at = outcome.terminal_time();
    let error = assert_clean(&conn, &outcome);
    match &error {
        Error::AmqpHeartbeatTimeout {
            timeout: t,
            silence,
        } => {
            assert_eq!(*t, timeout);
            assert!(*silence >= timeout * 2, "declared dead after {silence:?}");
        }
        other => panic!("expected AmqpHeartbeatTimeout, got {other:?}"),
    }
    // The bound is 2 × timeout of silence: from the last byte that reached
    // the client, not from the stall.
    let last_in = proxy
        .frames(BrokerToClient)
        .last()
        .expect("the broker spoke")
        .at;
    let silent = terminal_at - last_in;
    assert!(
        silent >= timeout.mul_f64(1.75) && silent < timeout * 4,
        "declared dead {silent:?} after the last byte in (bound {:?})",
        timeout * 2
    );
    let stalled_at = stalled_at.get().unwrap();
    assert!(terminal_at - stalled_at < timeout * 4);
    // The client kept talking through the stall, and dropped the socket
    // without a Close handshake.
    let sent = proxy.frames(ClientToBroker);
    let heartbeats_during_stall = sent
        .iter()
        .filter(|f| f.kind == FrameKind::Heartbeat && f.at > stalled_at)
        .count();
    assert!(heartbeats_during_stall >= 2, "{heartbeats_during_stall}");
    assert!(
        !sent
            .iter()
            .any(|f| matches!(f.method(), Some(Method::ConnectionClose(_)))),
        "no Close handshake with a dead peer"
    );
    // Nothing is left running: no callback and no byte in 2 more seconds,
    // past the heartbeat send interval.
    let (events, bytes) = (outcome.len(), proxy.bytes(ClientToBroker));
    run_for(&conn, Duration::from_secs(2));
    assert_eq!(outcome.len(), events, "{:?}", outcome.events());
    assert_eq!(proxy.bytes(ClientToBroker), bytes);
}

// ----------------------------------------------------------------------
// A broker Close wins over the write error that follows it
// ----------------------------------------------------------------------

/// The broker closes with 320 and drops the socket while the client is
/// flooding it with 64 KiB publishes: the Close is in the client's receive
/// buffer when its next write fails (the broker's RST makes it fail).
/// Three ways, each repeated to catch every interleaving of the write
/// failure and the read: the Close alone; the Close behind 2 MiB of
/// heartbeats (more than one socket event reads); and the client's loop
/// held in a callback while the Close and the RST arrive, so that its next
/// socket event finds both at once (deterministic).
#[test]
fn a_broker_close_while_the_client_floods_is_reported_with_the_brokers_words() {
    const RUNS: usize = 90;
    let mut lost = Vec::new();
    for run in 0..RUNS {
        let variant = run % 3;
        let hold = Arc::new(common::LoopHold::default());
        let h = hold.clone();
        let fake = FakeBroker::start(move |mut conn| {
            conn.handshake(rabbitmq_tune());
            conn.expect::<channel::Open>(1);
            conn.send_method(1, channel::OpenOk::default());
            common::read_published_bytes(&mut conn, 512 * 1024);
            match variant {
                1 => {
                    let heartbeat = [8, 0, 0, 0, 0, 0, 0, 0xCE];
                    conn.send_raw(&heartbeat.repeat(256 * 1024));
                    conn.wait_until_sent(LIMIT);
                }
                2 => h.hold_client(LIMIT),
                _ => {}
            }
            conn.send_method(
                0,
                connection::Close {
                    reply_code: 320,
                    reply_text: "CONNECTION_FORCED - broker forced connection closure".into(),
                    class_id: 0,
                    method_id: 0,
                },
            );
            // The Close is in the client's receive buffer before the RST.
            conn.wait_until_sent(LIMIT);
            conn.close_with_unread_input();
            drop(conn);
            h.release();
        });
        let mut params = ConnectionParameters::default();
        params
            .set_host("127.0.0.1")
            .unwrap()
            .set_port(fake.addr().port())
            .unwrap();
        let (conn, outcome) = connect(params, move |conn| {
            conn.channel(None, move |r| {
                common::flood(&r.expect("channel opens"), move || {
                    hold.hold_if_asked(LIMIT)
                })
            })
            .unwrap();
        });
        run_loop(conn.ioloop(), LIMIT);
        let error = assert_clean(&conn, &outcome);
        fake.join();
        match error {
            Error::ConnectionClosedByBroker {
                reply_code: 320, ..
            } => {}
            other => lost.push((run, other)),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {RUNS} runs lost the broker's Close: {lost:?}",
        lost.len()
    );
}
