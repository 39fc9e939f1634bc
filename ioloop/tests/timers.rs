//! Timers and `call_soon`: ordering, cancellation from inside callbacks, and fairness.

mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use common::{log, push, watchdog};
use ioloop::{IoLoop, TimeoutId};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn timers_fire_in_deadline_order_not_insertion_order() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    lp.call_later(ms(30), push(&order, 30));
    lp.call_later(ms(10), push(&order, 10));
    lp.call_later(ms(20), push(&order, 20));
    lp.call_later(ms(0), push(&order, 0));
    let h = lp.clone();
    lp.call_later(ms(40), move || h.stop());
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*order.borrow(), vec![0, 10, 20, 30]);
}

#[test]
fn timers_with_equal_delays_fire_in_the_order_they_were_added() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    for i in 0..200 {
        lp.call_later(Duration::ZERO, push(&order, i));
    }
    for i in 200..400 {
        lp.call_later(ms(5), push(&order, i));
    }
    let h = lp.clone();
    lp.call_later(ms(5), move || h.stop());
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*order.borrow(), (0..400).collect::<Vec<_>>());
}

#[test]
fn a_timer_can_remove_a_later_timer_that_is_due_in_the_same_pass() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    let second: Rc<Cell<Option<TimeoutId>>> = Rc::new(Cell::new(None));
    let (h, s, o) = (lp.clone(), second.clone(), order.clone());
    lp.call_later(Duration::ZERO, move || {
        o.borrow_mut().push("first");
        o.borrow_mut().push(if h.remove_timeout(s.get().unwrap()) {
            "removed second"
        } else {
            "second not found"
        });
    });
    second.set(Some(lp.call_later(Duration::ZERO, push(&order, "second"))));
    lp.call_later(Duration::ZERO, push(&order, "third"));
    let h = lp.clone();
    lp.call_later(ms(5), move || h.stop());
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*order.borrow(), vec!["first", "removed second", "third"]);
}

#[test]
fn a_timer_can_remove_a_later_pending_timer() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    let later = lp.call_later(ms(30), push(&order, "later"));
    let (h, o) = (lp.clone(), order.clone());
    lp.call_later(ms(1), move || {
        o.borrow_mut().push("early");
        assert!(h.remove_timeout(later));
    });
    let h = lp.clone();
    lp.call_later(ms(60), move || h.stop());
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*order.borrow(), vec!["early"]);
}

#[test]
fn a_timer_removing_itself_gets_false_and_fires_once() {
    let lp = IoLoop::new().unwrap();
    let own: Rc<Cell<Option<TimeoutId>>> = Rc::new(Cell::new(None));
    let results = log();
    let (h, id, r) = (lp.clone(), own.clone(), results.clone());
    own.set(Some(lp.call_later(ms(1), move || {
        r.borrow_mut().push(h.remove_timeout(id.get().unwrap()));
        h.stop();
    })));
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*results.borrow(), vec![false]);
    assert!(!lp.remove_timeout(own.get().unwrap()));
}

#[test]
fn removing_a_fired_or_already_removed_timer_is_a_harmless_false() {
    let lp = IoLoop::new().unwrap();
    let fired = lp.call_later(Duration::ZERO, || {});
    let removed = lp.call_later(ms(10), || panic!("a removed timer fired"));
    assert!(lp.remove_timeout(removed));
    assert!(!lp.remove_timeout(removed));
    let h = lp.clone();
    lp.call_later(ms(20), move || h.stop());
    watchdog(&lp);
    lp.start().unwrap();
    assert!(!lp.remove_timeout(fired));
    assert!(!lp.remove_timeout(removed));
}

#[test]
fn timeout_ids_are_not_confused_after_their_slot_is_reused() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    let old = lp.call_later(ms(1), push(&order, "old"));
    assert!(lp.remove_timeout(old));
    // Takes the freed slot; the stale id must not cancel it.
    let new = lp.call_later(ms(1), push(&order, "new"));
    assert_ne!(old, new);
    assert!(!lp.remove_timeout(old));
    let h = lp.clone();
    lp.call_later(ms(10), move || h.stop());
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*order.borrow(), vec!["new"]);
}

#[test]
fn call_soon_readding_itself_does_not_starve_a_timer() {
    fn spin(lp: IoLoop, count: Rc<Cell<u64>>) {
        count.set(count.get() + 1);
        let again = lp.clone();
        lp.call_soon(move || spin(again, count));
    }
    let lp = IoLoop::new().unwrap();
    let count = Rc::new(Cell::new(0));
    spin(lp.clone(), count.clone());
    let timer_fired = Rc::new(Cell::new(false));
    let (h, f) = (lp.clone(), timer_fired.clone());
    lp.call_later(ms(20), move || {
        f.set(true);
        h.stop();
    });
    watchdog(&lp);
    lp.start().unwrap();
    assert!(timer_fired.get());
    assert!(count.get() > 1);
    // The spinning callback is still queued; close() drops it (and its loop handle).
    lp.close();
}

#[test]
fn callbacks_added_during_a_pass_run_on_a_later_pass() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    let (h, o) = (lp.clone(), order.clone());
    lp.call_soon(move || {
        o.borrow_mut().push("soon");
        h.call_soon(push(&o, "soon added by soon"));
        h.call_later(Duration::ZERO, push(&o, "timer added by soon"));
        // Takes effect at the end of this pass: the two callbacks above must not have run.
        h.stop();
    });
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*order.borrow(), vec!["soon"]);

    let h = lp.clone();
    lp.call_later(ms(5), move || h.stop());
    lp.start().unwrap();
    assert_eq!(
        *order.borrow(),
        vec!["soon", "timer added by soon", "soon added by soon"]
    );
}

#[test]
fn call_soon_callbacks_run_in_fifo_order_after_the_due_timers() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    for i in 0..5 {
        lp.call_soon(push(&order, format!("soon {i}")));
    }
    lp.call_later(Duration::ZERO, push(&order, "timer".to_string()));
    let h = lp.clone();
    lp.call_soon(move || h.stop());
    watchdog(&lp);
    lp.start().unwrap();
    let mut expected = vec!["timer".to_string()];
    expected.extend((0..5).map(|i| format!("soon {i}")));
    assert_eq!(*order.borrow(), expected);
}

#[test]
fn a_stopped_loop_runs_again_and_keeps_its_pending_timers() {
    let lp = IoLoop::new().unwrap();
    let order = log();
    let h = lp.clone();
    lp.call_later(ms(1), move || h.stop());
    lp.call_later(ms(30), push(&order, "after restart"));
    watchdog(&lp);
    lp.start().unwrap();
    assert!(order.borrow().is_empty());
    let h = lp.clone();
    lp.call_later(ms(40), move || h.stop());
    lp.start().unwrap();
    assert_eq!(*order.borrow(), vec!["after restart"]);
}
