//! Signal handlers (feature `signals`): delivery on the loop thread, several signals and
//! handlers, removal, the Ctrl-C stop pattern, and the default action coming back.
//!
//! Signals are process-wide, and the test harness runs tests on parallel threads of one
//! process, so:
//! - every test takes [`serial`] first: no two of them touch signals at the same time (nor
//!   count descriptors while another spawns a child process);
//! - a test raises a signal only while one of its own handlers has it. When no `IoLoop`
//!   handler of the process has a signal any more, its default action is back — for every
//!   signal used here, terminating the test process. So a test that checks that a *removed*
//!   handler is no longer called keeps a second handler (on another loop) registered for
//!   the same signal while it raises it;
//! - SIGUSR1 and SIGUSR2 serve most tests; SIGINT and SIGTERM only the first two;
//! - what must end a process (the default action coming back) runs in a child process: this
//!   test binary run again on [`child`], a test that does nothing unless
//!   `IOLOOP_SIGNALS_CHILD` names a scenario.
#![cfg(feature = "signals")]

mod common;

use std::cell::{Cell, RefCell};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::rc::Rc;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use common::{WATCHDOG, watchdog};
use ioloop::{IoLoop, SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SignalHandlerId};

static SIGNALS: Mutex<()> = Mutex::new(());

/// Serializes the tests of this file (a failed test poisons the lock; the others go on).
fn serial() -> MutexGuard<'static, ()> {
    SIGNALS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends `signal` to this process, on the calling thread.
fn raise(signal: i32) {
    signal_hook::low_level::raise(signal).unwrap();
}

/// Raises `signal` from another thread after a short delay, so that it arrives while the
/// loop waits in the poller.
fn raise_later(signal: i32) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        raise(signal);
    })
}

type Seen = Rc<RefCell<Vec<(i32, ThreadId)>>>;

/// A handler for `signals` that records each report and the thread it ran on.
fn recording(lp: &IoLoop, signals: &[i32]) -> (SignalHandlerId, Seen) {
    let seen: Seen = Rc::default();
    let s = seen.clone();
    let id = lp
        .add_signal_handler(signals, move |signal| {
            s.borrow_mut().push((signal, thread::current().id()))
        })
        .unwrap();
    (id, seen)
}

fn numbers(seen: &Seen) -> Vec<i32> {
    seen.borrow().iter().map(|&(signal, _)| signal).collect()
}

/// Runs passes of `lp` until `done()`, failing after [`WATCHDOG`].
fn run_until(lp: &IoLoop, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WATCHDOG;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "watchdog: the condition never held"
        );
        lp.run_once(Some(Duration::from_millis(50))).unwrap();
    }
}

/// Runs a few non-waiting passes of each loop, enough for any signal already raised to be
/// reported.
fn settle(loops: &[&IoLoop]) {
    for _ in 0..3 {
        for lp in loops {
            lp.run_once(Some(Duration::ZERO)).unwrap();
        }
    }
}

#[test]
fn sigint_calls_the_callback_on_the_loop_thread_and_the_process_lives_on() {
    let _serial = serial();
    let lp = IoLoop::new().unwrap();
    let seen: Seen = Rc::default();
    let (s, handle) = (seen.clone(), lp.clone());
    lp.add_signal_handler(&[SIGINT], move |signal| {
        s.borrow_mut().push((signal, thread::current().id()));
        handle.stop();
    })
    .unwrap();
    watchdog(&lp);
    // Raised on another thread while the loop blocks in the poller with no timer due soon:
    // the self-pipe wakes it.
    let raiser = raise_later(SIGINT);
    lp.start().unwrap();
    raiser.join().unwrap();
    assert_eq!(*seen.borrow(), [(SIGINT, thread::current().id())]);
    lp.close();
}

#[test]
fn sigint_and_sigterm_in_one_handler_are_each_reported_with_their_number() {
    let _serial = serial();
    let lp = IoLoop::new().unwrap();
    let (_id, seen) = recording(&lp, &[SIGINT, SIGTERM]);

    let raiser = raise_later(SIGTERM);
    run_until(&lp, || !seen.borrow().is_empty());
    raiser.join().unwrap();
    assert_eq!(numbers(&seen), [SIGTERM]);

    raise(SIGINT);
    run_until(&lp, || seen.borrow().len() == 2);
    assert_eq!(numbers(&seen), [SIGTERM, SIGINT]);
    let me = thread::current().id();
    assert!(seen.borrow().iter().all(|&(_, thread)| thread == me));

    settle(&[&lp]);
    assert_eq!(seen.borrow().len(), 2, "no report without a signal");
    lp.close();
}

#[test]
fn signals_raised_before_the_loop_runs_are_all_delivered_when_it_runs() {
    let _serial = serial();
    let lp = IoLoop::new().unwrap();
    let (_id, seen) = recording(&lp, &[SIGUSR1, SIGUSR2]);
    raise(SIGUSR2);
    raise(SIGUSR1);
    raise(SIGUSR1);
    assert!(
        seen.borrow().is_empty(),
        "never reported inside the signal handler"
    );

    run_until(&lp, || seen.borrow().len() >= 2);
    settle(&[&lp]);
    // Arrivals of one signal coalesce; distinct signals are reported in the order given
    // at registration.
    assert_eq!(numbers(&seen), [SIGUSR1, SIGUSR2]);
    lp.close();
}

#[test]
fn every_handler_of_a_signal_is_called_and_a_removed_one_no_more() {
    let _serial = serial();
    let a = IoLoop::new().unwrap();
    let b = IoLoop::new().unwrap();
    let (a_id, a_seen) = recording(&a, &[SIGUSR1]);
    let (_b_id, b_seen) = recording(&b, &[SIGUSR1]);
    let (_b2_id, b2_seen) = recording(&b, &[SIGUSR1, SIGUSR2]);

    raise(SIGUSR1);
    settle(&[&a, &b]);
    assert_eq!(numbers(&a_seen), [SIGUSR1]);
    assert_eq!(numbers(&b_seen), [SIGUSR1]);
    assert_eq!(numbers(&b2_seen), [SIGUSR1]);

    assert!(a.remove_signal_handler(a_id));
    assert!(!a.remove_signal_handler(a_id), "already removed");
    // `b` still has SIGUSR1, so no default action (terminate) runs for this one: the
    // process survives, and `b`'s reports show that the signal did arrive.
    raise(SIGUSR1);
    settle(&[&a, &b]);
    assert_eq!(
        numbers(&a_seen),
        [SIGUSR1],
        "the removed handler was called"
    );
    assert_eq!(numbers(&b_seen), [SIGUSR1, SIGUSR1]);
    assert_eq!(numbers(&b2_seen), [SIGUSR1, SIGUSR1]);

    a.close();
    b.close();
}

#[test]
fn closing_a_loop_removes_its_signal_handlers() {
    let _serial = serial();
    let a = IoLoop::new().unwrap();
    let b = IoLoop::new().unwrap();
    let (_a_id, a_seen) = recording(&a, &[SIGUSR2]);
    let (_b_id, b_seen) = recording(&b, &[SIGUSR2]);
    let guard = common::DropCounter(Rc::new(Cell::new(0)));
    let count = guard.0.clone();
    a.add_signal_handler(&[SIGUSR2], move |_| {
        let _ = &guard;
    })
    .unwrap();

    a.close();
    assert_eq!(count.get(), 1, "close() drops the callback");
    // `b` keeps SIGUSR2 handled (see `every_handler_of_a_signal_is_called_...`).
    raise(SIGUSR2);
    settle(&[&b]);
    assert!(a_seen.borrow().is_empty());
    assert_eq!(numbers(&b_seen), [SIGUSR2]);

    // Dropping the last handle unregisters as well.
    let c = IoLoop::new().unwrap();
    let (_c_id, c_seen) = recording(&c, &[SIGUSR2]);
    drop(c);
    raise(SIGUSR2);
    settle(&[&b]);
    assert!(c_seen.borrow().is_empty());
    assert_eq!(numbers(&b_seen), [SIGUSR2, SIGUSR2]);
    b.close();
}

#[test]
fn a_callback_that_stops_the_loop_ends_start_the_ctrl_c_pattern() {
    let _serial = serial();
    let lp = IoLoop::new().unwrap();
    let calls = Rc::new(Cell::new(0));
    let own_id: Rc<Cell<Option<SignalHandlerId>>> = Rc::default();
    let (c, handle, own) = (calls.clone(), lp.clone(), own_id.clone());
    let id = lp
        .add_signal_handler(&[SIGUSR1], move |signal| {
            assert_eq!(signal, SIGUSR1);
            c.set(c.get() + 1);
            // What an application does on Ctrl-C: close its connection (whose on_close
            // stops the loop) and give up the handler, all from this loop callback.
            assert!(handle.remove_signal_handler(own.get().unwrap()));
            handle.stop();
        })
        .unwrap();
    own_id.set(Some(id));
    // A second handler keeps SIGUSR1 handled once the first removed itself.
    let keeper = IoLoop::new().unwrap();
    let (_k, _k_seen) = recording(&keeper, &[SIGUSR1]);

    watchdog(&lp);
    let raiser = raise_later(SIGUSR1);
    lp.start().unwrap();
    raiser.join().unwrap();
    assert_eq!(calls.get(), 1);
    assert!(!lp.is_running());

    raise(SIGUSR1);
    settle(&[&lp, &keeper]);
    assert_eq!(calls.get(), 1, "removed from its own callback");
    lp.close();
    keeper.close();
}

#[test]
fn a_callback_that_closes_the_loop_reports_nothing_more() {
    let _serial = serial();
    let lp = IoLoop::new().unwrap();
    let seen: Rc<RefCell<Vec<i32>>> = Rc::default();
    let (s, handle) = (seen.clone(), lp.clone());
    lp.add_signal_handler(&[SIGUSR1, SIGUSR2], move |signal| {
        s.borrow_mut().push(signal);
        handle.close();
    })
    .unwrap();
    // Keeps both signals handled once `lp` is closed.
    let keeper = IoLoop::new().unwrap();
    let (_k, k_seen) = recording(&keeper, &[SIGUSR1, SIGUSR2]);
    raise(SIGUSR1);
    raise(SIGUSR2);
    watchdog(&lp);
    lp.start().unwrap(); // returns once the callback closed the loop
    assert!(lp.is_closed());
    // Both had arrived, but the loop closed while reporting the first.
    assert_eq!(*seen.borrow(), [SIGUSR1]);
    settle(&[&keeper]);
    assert_eq!(numbers(&k_seen), [SIGUSR1, SIGUSR2]);
    keeper.close();
}

#[test]
fn a_panicking_callback_leaves_the_other_pending_signals_for_the_next_pass() {
    let _serial = serial();
    let lp = IoLoop::new().unwrap();
    let seen: Rc<RefCell<Vec<i32>>> = Rc::default();
    let s = seen.clone();
    lp.add_signal_handler(&[SIGUSR1, SIGUSR2], move |signal| {
        s.borrow_mut().push(signal);
        if signal == SIGUSR1 {
            panic!("test: callback panics on SIGUSR1");
        }
    })
    .unwrap();
    raise(SIGUSR1);
    raise(SIGUSR2);
    let deadline = Instant::now() + WATCHDOG;
    let panicked = loop {
        assert!(Instant::now() < deadline, "watchdog: never reported");
        match catch_unwind(AssertUnwindSafe(|| lp.run_once(Some(Duration::ZERO)))) {
            Ok(result) => result.unwrap(),
            Err(_) => break true,
        }
    };
    assert!(panicked);
    assert_eq!(*seen.borrow(), [SIGUSR1]);
    // The pipe was drained before the panic; SIGUSR2 is still reported.
    run_until(&lp, || seen.borrow().len() == 2);
    assert_eq!(*seen.borrow(), [SIGUSR1, SIGUSR2]);
    lp.close();
}

#[test]
fn invalid_registrations_fail_and_leave_nothing_registered() {
    let _serial = serial();
    let lp = IoLoop::new().unwrap();
    let kind = |signals: &[i32]| lp.add_signal_handler(signals, |_| {}).unwrap_err().kind();
    assert_eq!(kind(&[]), io::ErrorKind::InvalidInput);
    assert_eq!(kind(&[libc::SIGKILL]), io::ErrorKind::InvalidInput);
    assert_eq!(kind(&[SIGUSR1, libc::SIGSEGV]), io::ErrorKind::InvalidInput);
    // Not a signal: refused by sigaction(2), after SIGUSR1 was registered, which is undone.
    let called = Rc::new(Cell::new(false));
    let c = called.clone();
    let err = lp
        .add_signal_handler(&[SIGUSR1, 1000], move |_| c.set(true))
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");

    let (_id, seen) = recording(&lp, &[SIGUSR1, SIGUSR1]);
    raise(SIGUSR1);
    settle(&[&lp]);
    assert_eq!(numbers(&seen), [SIGUSR1], "a repeated signal counts once");
    assert!(!called.get(), "the failed registration was undone");

    lp.close();
    let err = lp.add_signal_handler(&[SIGUSR1], |_| {}).unwrap_err();
    assert!(err.get_ref().is_some_and(|e| e.is::<ioloop::Closed>()));
}

/// The open descriptors of this process.
#[cfg(target_os = "linux")]
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
#[cfg(target_os = "linux")]
fn removal_unregisters_the_actions_and_closes_their_descriptors() {
    let _serial = serial();
    let lp = IoLoop::new().unwrap();
    let keeper = IoLoop::new().unwrap();
    let (_k, _k_seen) = recording(&keeper, &[SIGUSR1, SIGUSR2]);
    let before = open_fds();
    let (id, seen) = recording(&lp, &[SIGUSR1, SIGUSR2]);
    // The socket pair, and a write end for each signal's signal-hook action (the loop's own
    // end is the pair's).
    assert_eq!(open_fds(), before + 4);
    assert!(lp.remove_signal_handler(id));
    // signal-hook drops an unregistered action, and the write end it owned, before
    // `unregister` returns.
    assert_eq!(open_fds(), before);
    raise(SIGUSR1);
    settle(&[&lp, &keeper]);
    assert!(seen.borrow().is_empty());
    lp.close();
    keeper.close();
}

// ---- In a child process: the default action comes back. ----

/// Runs [`child`] in a new process of this test binary, with `scenario`.
fn run_child(scenario: &str) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    Command::new(exe)
        .args([
            "child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IOLOOP_SIGNALS_CHILD", scenario)
        .output()
        .unwrap()
}

#[test]
fn removing_the_last_handler_brings_the_default_action_back() {
    let _serial = serial();
    let out = run_child("remove");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("handled SIGUSR1"), "{out:?}");
    assert_eq!(out.status.signal(), Some(SIGUSR1), "{out:?}");
}

#[test]
fn closing_the_loop_brings_the_default_action_back() {
    let _serial = serial();
    let out = run_child("close");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("handled SIGTERM"), "{out:?}");
    assert_eq!(out.status.signal(), Some(SIGTERM), "{out:?}");
}

#[test]
fn an_ignored_signal_stays_ignored_after_removal() {
    let _serial = serial();
    let out = run_child("ignored");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("handled SIGUSR2"), "{out:?}");
    assert!(stdout.contains("still alive"), "{out:?}");
    assert!(out.status.success(), "{out:?}");
}

/// Not a test of its own: the child process of the three tests above.
#[test]
#[ignore = "run as a child process by the default-action tests"]
fn child() {
    let Ok(scenario) = std::env::var("IOLOOP_SIGNALS_CHILD") else {
        return;
    };
    let handled = |lp: &IoLoop, signal: i32, name: &str| {
        let (id, seen) = recording(lp, &[signal]);
        raise(signal);
        run_until(lp, || !seen.borrow().is_empty());
        println!("handled {name}");
        id
    };
    let lp = IoLoop::new().unwrap();
    match scenario.as_str() {
        "remove" => {
            let id = handled(&lp, SIGUSR1, "SIGUSR1");
            assert!(lp.remove_signal_handler(id));
            raise(SIGUSR1); // terminates the process
        }
        "close" => {
            handled(&lp, SIGTERM, "SIGTERM");
            lp.close();
            raise(SIGTERM); // terminates the process
        }
        "ignored" => {
            // SAFETY: SIG_IGN is a valid disposition for SIGUSR2, set before any thread of
            // this test touches the signal.
            let previous = unsafe { libc::signal(SIGUSR2, libc::SIG_IGN) };
            assert_ne!(previous, libc::SIG_ERR);
            let id = handled(&lp, SIGUSR2, "SIGUSR2");
            assert!(lp.remove_signal_handler(id));
            raise(SIGUSR2); // ignored, as before the handler was added
            println!("still alive");
            return;
        }
        other => panic!("unknown scenario {other}"),
    }
    thread::sleep(Duration::from_millis(100));
    println!("survived a signal that should have terminated the process");
    std::process::exit(3);
}
