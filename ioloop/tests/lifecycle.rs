//! Start, stop, close and drop; nested starts; panics escaping callbacks.

mod common;

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{DropCounter, log, push, watchdog};
use ioloop::{Closed, HandlerId, Interest, IoLoop};

fn is_closed_error(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<Closed>())
}

/// Runs `start()` and returns the message of the panic that must escape it.
fn start_expecting_panic(lp: &IoLoop) -> String {
    let payload = catch_unwind(AssertUnwindSafe(|| lp.start()))
        .expect_err("start() should have propagated a panic");
    assert!(!lp.is_running(), "a panic left the loop marked running");
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

fn stop_soon(lp: &IoLoop) {
    let h = lp.clone();
    lp.call_soon(move || h.stop());
}

#[test]
fn a_nested_start_from_a_callback_is_refused() {
    let lp = IoLoop::new().unwrap();
    let result = Rc::new(RefCell::new(None));
    let (h, r) = (lp.clone(), result.clone());
    lp.call_soon(move || {
        *r.borrow_mut() = Some(h.start());
        assert!(
            h.is_running(),
            "the refused start must not end the outer one"
        );
        h.stop();
    });
    watchdog(&lp);
    lp.start().unwrap();
    let err = result.borrow_mut().take().unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
}

#[test]
fn start_on_a_closed_loop_fails_with_closed() {
    let lp = IoLoop::new().unwrap();
    lp.close();
    assert!(lp.is_closed());
    assert!(is_closed_error(&lp.start().unwrap_err()));
}

#[test]
fn a_stop_requested_while_not_running_makes_the_next_start_return_at_once() {
    let lp = IoLoop::new().unwrap();
    let ran = log();
    lp.call_soon(push(&ran, "soon"));
    lp.stop();
    lp.start().unwrap();
    assert!(ran.borrow().is_empty(), "no pass ran");
    // The request was consumed: the next start runs.
    stop_soon(&lp);
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*ran.borrow(), vec!["soon"]);
}

#[test]
fn a_panicking_timer_propagates_and_the_remaining_timers_run_on_restart() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    // Three timers due in the same pass, and one later.
    lp.call_later(Duration::ZERO, push(&order, "before"));
    lp.call_later(Duration::ZERO, || panic!("timer boom"));
    lp.call_later(Duration::ZERO, push(&order, "same pass, after the panic"));
    lp.call_later(Duration::from_millis(10), push(&order, "later"));
    watchdog(&lp);
    assert_eq!(start_expecting_panic(&lp), "timer boom");
    assert_eq!(*order.borrow(), vec!["before"]);

    let h = lp.clone();
    lp.call_later(Duration::from_millis(20), move || h.stop());
    lp.start().unwrap();
    assert_eq!(
        *order.borrow(),
        vec!["before", "same pass, after the panic", "later"]
    );
}

#[test]
fn a_panicking_call_soon_propagates_and_the_rest_of_the_queue_survives() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    lp.call_soon(push(&order, 1));
    lp.call_soon(|| panic!("soon boom"));
    lp.call_soon(push(&order, 2));
    watchdog(&lp);
    assert_eq!(start_expecting_panic(&lp), "soon boom");
    assert_eq!(*order.borrow(), vec![1]);
    stop_soon(&lp);
    lp.start().unwrap();
    assert_eq!(*order.borrow(), vec![1, 2]);
}

#[test]
fn a_panicking_threadsafe_callback_propagates_and_later_ones_survive() {
    let lp = IoLoop::new().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let waker = lp.waker();
    let c = count.clone();
    waker
        .add_callback_threadsafe(|| panic!("remote boom"))
        .unwrap();
    waker
        .add_callback_threadsafe(move || {
            c.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    watchdog(&lp);
    assert_eq!(start_expecting_panic(&lp), "remote boom");
    assert_eq!(count.load(Ordering::SeqCst), 0);
    stop_soon(&lp);
    lp.start().unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panicking_handler_propagates_and_stays_registered() {
    let lp = IoLoop::new().unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.write_all(b"x").unwrap();
    let calls = Rc::new(Cell::new(0));
    let id = Rc::new(Cell::new(None::<HandlerId>));
    let (h, c, i) = (lp.clone(), calls.clone(), id.clone());
    id.set(Some(
        lp.add_handler(a, Interest::READABLE, move |_| {
            c.set(c.get() + 1);
            if c.get() == 1 {
                panic!("handler boom");
            }
            assert!(h.remove_handler(i.get().unwrap()));
            h.stop();
        })
        .unwrap(),
    ));
    watchdog(&lp);
    assert_eq!(start_expecting_panic(&lp), "handler boom");
    assert_eq!(calls.get(), 1);
    // Still registered: level-triggered, the unread byte calls it again.
    lp.start().unwrap();
    assert_eq!(calls.get(), 2);
    assert!(!lp.remove_handler(id.get().unwrap()));
}

#[test]
fn close_drops_every_pending_callback_handler_and_source() {
    let lp = IoLoop::new().unwrap();
    let drops = Rc::new(Cell::new(0));
    let counter = || DropCounter(drops.clone());

    let c = counter();
    lp.call_later(Duration::from_secs(3600), move || drop(c));
    let c = counter();
    lp.call_later(Duration::ZERO, move || drop(c));
    let c = counter();
    lp.call_soon(move || drop(c));
    let (a, _b) = UnixStream::pair().unwrap();
    let source = Rc::new(a);
    let c = counter();
    lp.add_handler(source.clone(), Interest::READABLE, move |_| {
        let _ = &c;
    })
    .unwrap();
    let remote_drops = Arc::new(AtomicUsize::new(0));
    struct RemoteCounter(Arc<AtomicUsize>);
    impl Drop for RemoteCounter {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let rc = RemoteCounter(remote_drops.clone());
    lp.waker()
        .add_callback_threadsafe(move || drop(rc))
        .unwrap();

    assert_eq!(drops.get(), 0);
    assert_eq!(Rc::strong_count(&source), 2);
    lp.close();
    assert_eq!(drops.get(), 4);
    assert_eq!(remote_drops.load(Ordering::SeqCst), 1);
    assert_eq!(Rc::strong_count(&source), 1);
    lp.close(); // a second close is a no-op
}

#[test]
fn close_breaks_the_cycle_of_a_callback_holding_the_loop() {
    let lp = IoLoop::new().unwrap();
    let drops = Rc::new(Cell::new(0));
    let (h, c) = (lp.clone(), DropCounter(drops.clone()));
    lp.call_later(Duration::from_secs(3600), move || {
        let _ = (&h, &c);
    });
    let waker = lp.waker();
    lp.close();
    drop(lp);
    assert_eq!(
        drops.get(),
        1,
        "the callback (and its loop handle) was dropped"
    );
    assert!(waker.is_closed());
}

#[test]
fn dropping_the_last_handle_closes_the_loop_and_drops_pending_callbacks() {
    let lp = IoLoop::new().unwrap();
    let drops = Rc::new(Cell::new(0));
    let c = DropCounter(drops.clone());
    lp.call_soon(move || drop(c));
    let waker = lp.waker();
    let clone = lp.clone();
    drop(lp);
    assert_eq!(drops.get(), 0, "a clone still holds the loop");
    drop(clone);
    assert_eq!(drops.get(), 1);
    assert!(waker.is_closed());
}

#[test]
fn close_from_inside_a_callback_ends_start_and_drops_the_rest() {
    let lp = IoLoop::new().unwrap();
    let drops = Rc::new(Cell::new(0));
    let order = log();
    let (h, o) = (lp.clone(), order.clone());
    lp.call_soon(move || {
        o.borrow_mut().push("closing");
        h.close();
    });
    let c = DropCounter(drops.clone());
    lp.call_soon(move || drop(c));
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*order.borrow(), vec!["closing"]);
    assert_eq!(drops.get(), 1, "the queued callback was dropped, not run");
    assert!(lp.is_closed() && !lp.is_running());
}

#[test]
fn every_method_is_harmless_on_a_closed_loop() {
    let lp = IoLoop::new().unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    let id = lp.add_handler(a, Interest::READABLE, |_| {}).unwrap();
    lp.close();
    let drops = Rc::new(Cell::new(0));
    let c = DropCounter(drops.clone());
    let t = lp.call_later(Duration::ZERO, move || drop(c));
    assert!(!lp.remove_timeout(t));
    let c = DropCounter(drops.clone());
    lp.call_soon(move || drop(c));
    assert_eq!(
        drops.get(),
        2,
        "callbacks given to a closed loop are dropped"
    );
    let (x, _y) = UnixStream::pair().unwrap();
    let err = lp.add_handler(x, Interest::READABLE, |_| {}).unwrap_err();
    assert!(is_closed_error(&err), "{err}");
    assert_eq!(
        lp.update_handler(id, Interest::WRITABLE)
            .unwrap_err()
            .kind(),
        io::ErrorKind::NotFound
    );
    assert!(!lp.remove_handler(id));
    lp.stop();
}

/// A value whose destructor calls back into the loop, as captured state often does.
struct CallsLoopOnDrop(IoLoop, Rc<Cell<usize>>);

impl Drop for CallsLoopOnDrop {
    fn drop(&mut self) {
        self.0.call_soon(|| {});
        self.0
            .remove_timeout(self.0.call_later(Duration::ZERO, || {}));
        self.1.set(self.1.get() + 1);
    }
}

#[test]
fn callbacks_whose_destructors_use_the_loop_can_be_removed_and_closed() {
    let lp = IoLoop::new().unwrap();
    let drops = Rc::new(Cell::new(0));
    let guard = CallsLoopOnDrop(lp.clone(), drops.clone());
    let t = lp.call_later(Duration::from_secs(60), move || drop(guard));
    assert!(lp.remove_timeout(t));
    assert_eq!(drops.get(), 1);

    let (a, _b) = UnixStream::pair().unwrap();
    let guard = CallsLoopOnDrop(lp.clone(), drops.clone());
    let id = lp
        .add_handler(a, Interest::READABLE, move |_| {
            let _ = &guard;
        })
        .unwrap();
    assert!(lp.remove_handler(id));
    assert_eq!(drops.get(), 2);

    let guard = CallsLoopOnDrop(lp.clone(), drops.clone());
    lp.call_soon(move || drop(guard));
    let guard = CallsLoopOnDrop(lp.clone(), drops.clone());
    lp.call_later(Duration::from_secs(60), move || drop(guard));
    lp.close();
    assert_eq!(drops.get(), 4);
}
