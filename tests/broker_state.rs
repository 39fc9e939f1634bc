//! Tests that change the broker's global state — memory alarms and
//! `stop_app` — in their own test binary. Cargo runs test binaries one at
//! a time, and the tests here take one lock, so no other test sees the
//! alarm or the stopped node; each restores the state in a drop guard.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{broker_params, rabbitmqctl, run_loop};
use pika::{BasicProperties, BlockingConnection, ConnectionParameters, Error, SelectConnection};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets the broker's memory alarm; clears it when dropped.
struct MemoryAlarm;

impl MemoryAlarm {
    fn set() -> MemoryAlarm {
        rabbitmqctl(&[
            "eval",
            "rabbit_alarm:set_alarm({{resource_limit, memory, node()}, []}).",
        ]);
        MemoryAlarm
    }
}

fn clear_memory_alarm() {
    rabbitmqctl(&[
        "eval",
        "rabbit_alarm:clear_alarm({resource_limit, memory, node()}).",
    ]);
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        clear_memory_alarm();
    }
}

/// Stops the RabbitMQ application; starts it again when dropped.
struct StoppedApp;

impl StoppedApp {
    fn stop() -> StoppedApp {
        rabbitmqctl(&["stop_app"]);
        StoppedApp
    }
}

fn start_app() {
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
}

impl Drop for StoppedApp {
    fn drop(&mut self) {
        start_app();
    }
}

#[derive(Default)]
struct Log {
    events: RefCell<Vec<String>>,
    terminal: RefCell<Vec<Error>>,
}

fn connect(
    params: ConnectionParameters,
    log: &Rc<Log>,
    on_open: impl FnOnce(&SelectConnection) + 'static,
) -> SelectConnection {
    let (l1, l2, l3) = (log.clone(), log.clone(), log.clone());
    let conn = SelectConnection::new(
        params,
        move |conn| {
            l1.events.borrow_mut().push("open".into());
            on_open(conn);
        },
        move |conn, e| {
            l2.terminal.borrow_mut().push(e);
            conn.ioloop().stop();
        },
        move |conn, e| {
            l3.terminal.borrow_mut().push(e);
            conn.ioloop().stop();
        },
    )
    .unwrap();
    let (lb, lu) = (log.clone(), log.clone());
    conn.add_on_connection_blocked_callback(move |_, blocked| {
        lb.events
            .borrow_mut()
            .push(format!("blocked: {}", blocked.reason));
    });
    conn.add_on_connection_unblocked_callback(move |_, _| {
        lu.events.borrow_mut().push("unblocked".into());
    });
    conn
}

/// Opens a channel and publishes one message: RabbitMQ blocks a connection
/// under an alarm when it publishes.
fn publish_one(conn: &SelectConnection) {
    conn.channel(None, |ch| {
        let ch = ch.expect("channel opens");
        ch.basic_publish("", "nowhere", b"x", &BasicProperties::default(), false)
            .expect("publish accepted");
    })
    .unwrap();
}

#[test]
fn memory_alarm_blocks_with_the_reason_and_clearing_it_unblocks() {
    let _serial = serial();
    let log = Rc::new(Log::default());
    let alarm = Rc::new(RefCell::new(None::<MemoryAlarm>));
    let a = alarm.clone();
    let conn = connect(broker_params(), &log, move |conn| {
        *a.borrow_mut() = Some(MemoryAlarm::set());
        publish_one(conn);
    });
    let l = log.clone();
    let a2 = alarm.clone();
    // Poll for the blocked event, then clear the alarm; close once unblocked.
    fn watch(conn: SelectConnection, log: Rc<Log>, alarm: Rc<RefCell<Option<MemoryAlarm>>>) {
        let events = log.events.borrow().clone();
        if events.iter().any(|e| e == "unblocked") {
            conn.close(200, "done").unwrap();
            return;
        }
        if events.iter().any(|e| e.starts_with("blocked")) {
            assert!(conn.blocked_reason().is_some());
            alarm.borrow_mut().take(); // clears the alarm
        }
        let lp = conn.ioloop().clone();
        lp.call_later(Duration::from_millis(50), move || watch(conn, log, alarm));
    }
    let c = conn.clone();
    conn.ioloop().call_soon(move || watch(c, l, a2));
    run_loop(conn.ioloop(), Duration::from_secs(30));
    drop(alarm.borrow_mut().take());
    let events = log.events.borrow();
    assert_eq!(events[0], "open");
    assert_eq!(events[1], "blocked: low on memory");
    assert_eq!(events[2], "unblocked");
    assert!(matches!(
        log.terminal.borrow().as_slice(),
        [Error::ConnectionClosedByClient { .. }]
    ));
    assert_eq!(conn.blocked_reason(), None);
}

#[test]
fn an_alarm_active_before_connecting_blocks_the_first_publish() {
    let _serial = serial();
    let _alarm = MemoryAlarm::set();
    let log = Rc::new(Log::default());
    let conn = connect(broker_params(), &log, publish_one);
    let l = log.clone();
    fn watch(conn: SelectConnection, log: Rc<Log>) {
        if log.events.borrow().iter().any(|e| e.starts_with("blocked")) {
            clear_memory_alarm();
        }
        if log.events.borrow().iter().any(|e| e == "unblocked") {
            conn.close(200, "done").unwrap();
            return;
        }
        let lp = conn.ioloop().clone();
        lp.call_later(Duration::from_millis(50), move || watch(conn, log));
    }
    let c = conn.clone();
    conn.ioloop().call_soon(move || watch(c, l));
    run_loop(conn.ioloop(), Duration::from_secs(30));
    assert_eq!(
        *log.events.borrow(),
        ["open", "blocked: low on memory", "unblocked"]
    );
}

#[test]
fn blocked_connection_timeout_closes_with_connection_blocked_timeout() {
    let _serial = serial();
    let _alarm = MemoryAlarm::set();
    let mut params = broker_params();
    params
        .set_blocked_connection_timeout(Duration::from_secs(2))
        .unwrap();
    let log = Rc::new(Log::default());
    let blocked_at = Rc::new(RefCell::new(None::<Instant>));
    let b = blocked_at.clone();
    let conn = connect(params, &log, publish_one);
    conn.add_on_connection_blocked_callback(move |_, _| *b.borrow_mut() = Some(Instant::now()));
    run_loop(conn.ioloop(), Duration::from_secs(30));
    let terminal = log.terminal.borrow();
    assert!(
        matches!(terminal.as_slice(), [Error::ConnectionBlockedTimeout { timeout }] if *timeout == Duration::from_secs(2)),
        "{terminal:?}"
    );
    let waited = blocked_at.borrow().expect("blocked first").elapsed();
    assert!(waited >= Duration::from_millis(1900), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert!(conn.is_closed());
}

#[test]
fn close_while_blocked_finishes_within_the_bound() {
    let _serial = serial();
    let _alarm = MemoryAlarm::set();
    let mut params = broker_params();
    params.set_socket_timeout(Duration::from_secs(2)).unwrap();
    let log = Rc::new(Log::default());
    let conn = connect(params, &log, publish_one);
    let closing_at = Rc::new(RefCell::new(None::<Instant>));
    let c = closing_at.clone();
    conn.add_on_connection_blocked_callback(move |conn, _| {
        *c.borrow_mut() = Some(Instant::now());
        conn.close(200, "closing while blocked").unwrap();
    });
    run_loop(conn.ioloop(), Duration::from_secs(30));
    let took = closing_at.borrow().expect("was blocked").elapsed();
    assert!(took < Duration::from_secs(5), "close took {took:?}");
    assert!(matches!(
        log.terminal.borrow().as_slice(),
        [Error::ConnectionClosedByClient {
            reply_code: 200,
            ..
        }]
    ));
}

#[test]
fn stop_app_closes_with_320_connecting_while_stopped_fails_and_start_app_recovers() {
    let _serial = serial();
    // 1. An open connection sees the broker going down as a 320. stop_app
    // runs on another thread, so the loop stays free to answer the Close.
    let log = Rc::new(Log::default());
    let stopper = Rc::new(RefCell::new(None::<std::thread::JoinHandle<StoppedApp>>));
    let s = stopper.clone();
    let conn = connect(broker_params(), &log, move |_| {
        *s.borrow_mut() = Some(std::thread::spawn(StoppedApp::stop));
    });
    run_loop(conn.ioloop(), Duration::from_secs(60));
    let stopped = stopper
        .borrow_mut()
        .take()
        .expect("stop_app started")
        .join()
        .expect("stop_app ran");
    assert!(
        matches!(
            log.terminal.borrow().as_slice(),
            [Error::ConnectionClosedByBroker {
                reply_code: 320,
                ..
            }]
        ),
        "{:?}",
        log.terminal.borrow()
    );

    // 2. While stopped, connecting fails cleanly with an open error.
    let log2 = Rc::new(Log::default());
    let conn2 = connect(broker_params(), &log2, |_| panic!("the broker is stopped"));
    run_loop(conn2.ioloop(), Duration::from_secs(30));
    assert_eq!(log2.terminal.borrow().len(), 1);
    assert!(log2.terminal.borrow()[0].is_connection_error());
    assert!(log2.events.borrow().is_empty());

    // 3. After start_app, a new connection works.
    drop(stopped);
    let log3 = Rc::new(Log::default());
    let conn3 = connect(broker_params(), &log3, |conn| {
        conn.close(200, "ok").unwrap()
    });
    run_loop(conn3.ioloop(), Duration::from_secs(30));
    assert_eq!(*log3.events.borrow(), ["open"]);
}

// ----------------------------------------------------------------------
// The blocking face
// ----------------------------------------------------------------------

#[test]
fn blocking_blocked_and_unblocked_callbacks_run_inside_process_data_events() {
    let _serial = serial();
    let alarm = MemoryAlarm::set();
    let conn = BlockingConnection::new(broker_params()).unwrap();
    let seen = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    conn.add_on_connection_blocked_callback(move |_, blocked| {
        s.lock()
            .unwrap()
            .push(format!("blocked: {}", blocked.reason))
    });
    let s = seen.clone();
    conn.add_on_connection_unblocked_callback(move |_, _| {
        s.lock().unwrap().push("unblocked".into())
    });
    let ch = conn.channel(None).unwrap();
    ch.basic_publish("", "nowhere", "x", &BasicProperties::default(), false)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "never blocked");
        conn.process_data_events(Some(Duration::from_millis(50)))
            .unwrap();
    }
    drop(alarm);
    while seen.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "never unblocked");
        conn.process_data_events(Some(Duration::from_millis(50)))
            .unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen[0].starts_with("blocked: ") && seen[0].contains("memory"),
        "{seen:?}"
    );
    assert_eq!(seen[1], "unblocked");
    conn.close(200, "done").unwrap();
}

#[test]
fn blocking_blocked_connection_timeout_is_the_error_of_the_call_in_progress() {
    let _serial = serial();
    let _alarm = MemoryAlarm::set();
    let mut params = broker_params();
    params
        .set_blocked_connection_timeout(Duration::from_secs(2))
        .unwrap();
    let conn = BlockingConnection::new(params).unwrap();
    let ch = conn.channel(None).unwrap();
    let published_at = Instant::now();
    ch.basic_publish("", "nowhere", "x", &BasicProperties::default(), false)
        .unwrap();
    // The blocked broker reads nothing more: the declare waits until the
    // timeout ends the connection.
    let declared = ch.queue_declare("", Default::default(), Default::default());
    let waited = published_at.elapsed();
    assert!(
        matches!(declared, Err(Error::ConnectionBlockedTimeout { timeout }) if timeout == Duration::from_secs(2)),
        "{declared:?}"
    );
    assert!(waited >= Duration::from_millis(1900), "{waited:?}");
    assert!(waited < Duration::from_secs(6), "{waited:?}");
    assert!(conn.is_closed());
    // Every later call says the same.
    assert!(matches!(
        conn.process_data_events(Some(Duration::ZERO)),
        Err(Error::ConnectionBlockedTimeout { .. })
    ));
}
