//! `run_once`: one pass at a time for an application that drives the loop itself — how long
//! it waits, what it dispatches, and how it shares `running`, `close` and `stop` with `start`.

mod common;

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{log, push, watchdog};
use ioloop::{Closed, Interest, IoLoop, Readiness};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Slack for an upper bound on how long a call took: liveness, not a timing assertion.
const SLACK: Duration = Duration::from_secs(2);

#[test]
fn a_due_timer_runs_in_one_run_once_that_does_not_wait() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    lp.call_later(Duration::ZERO, push(&order, "timer"));
    lp.call_later(Duration::from_secs(3600), push(&order, "not due"));
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(*order.borrow(), vec!["timer"]);
    assert!(!lp.is_running());
}

#[test]
fn queued_callbacks_run_in_one_run_once_without_waiting_for_its_timeout() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    lp.call_soon(push(&order, "soon"));
    let start = Instant::now();
    // Queued callbacks mean the pass does not wait at all, whatever the timeout.
    lp.run_once(Some(Duration::from_secs(3600))).unwrap();
    assert!(start.elapsed() < SLACK, "waited {:?}", start.elapsed());
    assert_eq!(*order.borrow(), vec!["soon"]);
}

#[test]
fn run_once_with_nothing_to_do_returns_after_its_timeout() {
    let lp = IoLoop::new().unwrap();
    // Its 20 s deadline is far beyond the timeout; it only ends a run_once that ignores it.
    watchdog(&lp);
    let timeout = ms(50);
    let start = Instant::now();
    lp.run_once(Some(timeout)).unwrap();
    let waited = start.elapsed();
    assert!(waited >= timeout, "returned after {waited:?}");
    assert!(waited < timeout + SLACK, "returned after {waited:?}");
    assert!(!lp.is_running());
}

#[test]
fn run_once_waits_no_longer_than_the_next_timer() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    lp.call_later(ms(30), push(&order, "timer"));
    let start = Instant::now();
    lp.run_once(Some(Duration::from_secs(3600))).unwrap();
    let waited = start.elapsed();
    assert_eq!(*order.borrow(), vec!["timer"]);
    assert!(waited >= ms(30), "returned after {waited:?}");
    assert!(waited < ms(30) + SLACK, "returned after {waited:?}");
}

#[test]
fn run_once_without_timeout_returns_after_the_next_timer_fires_in_one_pass() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    let (h, o) = (lp.clone(), order.clone());
    lp.call_later(ms(30), move || {
        o.borrow_mut().push("first timer");
        // Would run on a second pass; run_once must return before it.
        h.call_soon(push(&o, "queued by the first timer"));
    });
    lp.call_later(ms(300), push(&order, "second timer"));
    watchdog(&lp);
    let start = Instant::now();
    lp.run_once(None).unwrap();
    let waited = start.elapsed();
    assert_eq!(*order.borrow(), vec!["first timer"]);
    assert!(waited >= ms(30), "returned after {waited:?}");
    assert!(waited < ms(30) + SLACK, "returned after {waited:?}");

    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(
        *order.borrow(),
        vec!["first timer", "queued by the first timer"]
    );
    lp.run_once(None).unwrap();
    assert_eq!(
        *order.borrow(),
        vec!["first timer", "queued by the first timer", "second timer"]
    );
}

#[test]
fn run_once_dispatches_io_readiness() {
    let lp = IoLoop::new().unwrap();
    let (ours, mut peer) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let ours = Rc::new(ours);
    let got = Rc::new(RefCell::new(Vec::new()));
    let (sock, g) = (ours.clone(), got.clone());
    lp.add_handler(ours.clone(), Interest::READABLE, move |r: Readiness| {
        assert!(r.is_readable());
        let mut buf = [0u8; 16];
        let n = (&*sock).read(&mut buf).unwrap();
        g.borrow_mut().extend_from_slice(&buf[..n]);
    })
    .unwrap();

    // Nothing readable: the pass calls no handler.
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert!(got.borrow().is_empty());

    // Already readable: a pass that does not wait finds it.
    peer.write_all(b"hello").unwrap();
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(&*got.borrow(), b"hello");

    // Not yet readable: run_once(None) blocks in the poller until the write wakes it.
    watchdog(&lp);
    let writer = thread::spawn(move || {
        thread::sleep(ms(20));
        peer.write_all(b" world").unwrap();
        peer // kept open until joined, so no hang-up is reported
    });
    lp.run_once(None).unwrap();
    let _peer = writer.join().unwrap();
    assert_eq!(&*got.borrow(), b"hello world");
}

#[test]
fn a_threadsafe_callback_wakes_a_waiting_run_once_and_runs_in_its_pass() {
    let lp = IoLoop::new().unwrap();
    watchdog(&lp);
    let ran = Arc::new(AtomicBool::new(false));
    let (waker, r) = (lp.waker(), ran.clone());
    let sender = thread::spawn(move || {
        thread::sleep(ms(20));
        waker
            .add_callback_threadsafe(move || r.store(true, Ordering::SeqCst))
            .unwrap();
    });
    lp.run_once(None).unwrap();
    sender.join().unwrap();
    assert!(ran.load(Ordering::SeqCst));
}

#[test]
fn run_once_and_start_from_a_callback_of_run_once_are_refused() {
    let lp = IoLoop::new().unwrap();
    let results = log();
    let (h, r) = (lp.clone(), results.clone());
    lp.call_soon(move || {
        assert!(h.is_running());
        r.borrow_mut().push(h.run_once(Some(Duration::ZERO)));
        r.borrow_mut().push(h.start());
        assert!(h.is_running(), "the refused calls must not end the pass");
    });
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert!(!lp.is_running());
    let results = results.take();
    assert_eq!(results.len(), 2);
    for result in results {
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ResourceBusy);
    }
}

#[test]
fn run_once_from_a_callback_of_start_is_refused() {
    let lp = IoLoop::new().unwrap();
    let result = Rc::new(RefCell::new(None));
    let (h, r) = (lp.clone(), result.clone());
    lp.call_soon(move || {
        *r.borrow_mut() = Some(h.run_once(None));
        h.stop();
    });
    watchdog(&lp);
    lp.start().unwrap();
    let err = result.borrow_mut().take().unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
}

#[test]
fn run_once_on_a_closed_loop_fails_with_closed() {
    let lp = IoLoop::new().unwrap();
    lp.close();
    let err = lp.run_once(Some(Duration::ZERO)).unwrap_err();
    assert!(err.get_ref().is_some_and(|e| e.is::<Closed>()), "{err}");
    assert!(!lp.is_running());
}

#[test]
fn close_from_a_callback_ends_run_once_with_ok() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    let (h, o) = (lp.clone(), order.clone());
    lp.call_soon(move || {
        o.borrow_mut().push("closing");
        h.close();
    });
    lp.call_soon(push(&order, "dropped, not run"));
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(*order.borrow(), vec!["closing"]);
    assert!(lp.is_closed() && !lp.is_running());
}

#[test]
fn a_callback_queued_during_a_pass_runs_on_the_next_run_once() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    let (h, o) = (lp.clone(), order.clone());
    lp.call_soon(move || {
        o.borrow_mut().push("soon");
        h.call_soon(push(&o, "soon added by soon"));
        h.call_later(Duration::ZERO, push(&o, "timer added by soon"));
    });
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(*order.borrow(), vec!["soon"]);
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(
        *order.borrow(),
        vec!["soon", "timer added by soon", "soon added by soon"]
    );
}

#[test]
fn a_stop_request_is_left_for_the_next_start() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    // A stop requested before run_once does not prevent its pass.
    lp.stop();
    lp.call_soon(push(&order, "first pass"));
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(*order.borrow(), vec!["first pass"]);

    // Nor does one requested during the pass cut it short.
    let (h, o) = (lp.clone(), order.clone());
    lp.call_soon(move || {
        h.stop();
        o.borrow_mut().push("stopping");
    });
    lp.call_soon(push(&order, "same pass, after the stop"));
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(
        *order.borrow(),
        vec!["first pass", "stopping", "same pass, after the stop"]
    );

    // The request is still pending: start() returns without a pass, consuming it.
    lp.call_soon(push(&order, "after the stop"));
    lp.start().unwrap();
    assert_eq!(order.borrow().len(), 3, "start() ran a pass");
    let h = lp.clone();
    lp.call_soon(move || h.stop());
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(order.borrow().last(), Some(&"after the stop"));
}

#[test]
fn a_stop_from_another_thread_wakes_a_waiting_run_once() {
    let lp = IoLoop::new().unwrap();
    // No timers but the watchdog: run_once(None) blocks in the poller until woken.
    watchdog(&lp);
    let waker = lp.waker();
    let stopper = thread::spawn(move || {
        thread::sleep(ms(20));
        waker.stop().unwrap();
    });
    lp.run_once(None).unwrap();
    stopper.join().unwrap();
    // The request was not consumed by run_once.
    let ran = Rc::new(Cell::new(false));
    let r = ran.clone();
    lp.call_soon(move || r.set(true));
    lp.start().unwrap();
    assert!(!ran.get(), "start() ran a pass");
}

#[test]
fn a_panic_in_a_callback_propagates_out_of_run_once_and_leaves_the_loop_usable() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    lp.call_soon(|| panic!("soon boom"));
    lp.call_soon(push(&order, "after the panic"));
    let payload = catch_unwind(AssertUnwindSafe(|| lp.run_once(Some(Duration::ZERO))))
        .expect_err("run_once() should have propagated a panic");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"soon boom"));
    assert!(!lp.is_running(), "a panic left the loop marked running");
    assert!(order.borrow().is_empty());
    lp.run_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(*order.borrow(), vec!["after the panic"]);
}
