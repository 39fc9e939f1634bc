//! Timers: a min-heap of deadlines with O(1) cancellation, and the per-pass list of due timers.
//!
//! Each timer lives in a slab slot stamped with a sequence number that is never reused; the
//! heap holds `(deadline, seq, slot)` keys. Cancelling removes the slot and leaves its key in
//! the heap as a stale entry, skipped when it reaches the top and swept out in bulk when stale
//! keys outnumber live ones. The sequence number also breaks ties, so timers with equal
//! deadlines fire in the order they were added.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

use slab::Slab;

/// A callback run once on the loop thread.
pub(crate) type Callback = Box<dyn FnOnce()>;

/// Identifies a timer added with [`IoLoop::call_later`](crate::IoLoop::call_later).
///
/// Ids are never reused by a loop: once its timer fired or was removed, an id refers to
/// nothing, and [`IoLoop::remove_timeout`](crate::IoLoop::remove_timeout) returns `false` for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimeoutId {
    index: usize,
    seq: u64,
}

impl TimeoutId {
    /// An id that matches no timer, handed out by a closed loop.
    pub(crate) const DANGLING: TimeoutId = TimeoutId {
        index: usize::MAX,
        seq: u64::MAX,
    };
}

struct Entry {
    seq: u64,
    /// `false` once the entry moved from the heap to the due list.
    in_heap: bool,
    callback: Callback,
}

/// Ordered by deadline, then by sequence number (insertion order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    deadline: Instant,
    seq: u64,
    index: usize,
}

/// Sweep the heap only once it holds at least this many stale keys (and more stale than live).
const MIN_STALE_FOR_SWEEP: usize = 1024;

#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<Key>>,
    entries: Slab<Entry>,
    /// Timers found due at the start of the current pass, in firing order.
    due: VecDeque<(usize, u64)>,
    next_seq: u64,
    /// Keys in `heap` whose timer was cancelled.
    stale: usize,
}

impl std::fmt::Debug for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timers")
            .field("pending", &self.entries.len())
            .field("due", &self.due.len())
            .field("heap", &self.heap.len())
            .finish()
    }
}

impl Timers {
    pub(crate) fn new() -> Timers {
        Timers::default()
    }

    /// Number of timers that have neither fired nor been cancelled.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn insert(&mut self, deadline: Instant, callback: Callback) -> TimeoutId {
        let seq = self.next_seq;
        self.next_seq += 1;
        let index = self.entries.insert(Entry {
            seq,
            in_heap: true,
            callback,
        });
        self.heap.push(Reverse(Key {
            deadline,
            seq,
            index,
        }));
        TimeoutId { index, seq }
    }

    fn is_live(&self, index: usize, seq: u64) -> bool {
        self.entries.get(index).is_some_and(|e| e.seq == seq)
    }

    /// Removes a timer that has not fired yet and hands back its callback, for the caller to
    /// drop outside of any borrow.
    pub(crate) fn cancel(&mut self, id: TimeoutId) -> Option<Callback> {
        if !self.is_live(id.index, id.seq) {
            return None;
        }
        let entry = self.entries.remove(id.index);
        if entry.in_heap {
            self.stale += 1;
            if self.stale >= MIN_STALE_FOR_SWEEP && self.stale > self.heap.len() / 2 {
                self.sweep();
            }
        }
        Some(entry.callback)
    }

    fn sweep(&mut self) {
        let entries = &self.entries;
        self.heap
            .retain(|Reverse(k)| entries.get(k.index).is_some_and(|e| e.seq == k.seq));
        self.stale = 0;
    }

    /// The earliest deadline among timers still in the heap (not counting the due list).
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse(key)) = self.heap.peek() {
            if self.is_live(key.index, key.seq) {
                return Some(key.deadline);
            }
            self.heap.pop();
            self.stale -= 1;
        }
        None
    }

    /// Whether timers found due are still waiting to be called.
    pub(crate) fn has_due(&self) -> bool {
        !self.due.is_empty()
    }

    /// Moves every timer whose deadline is at or before `now` to the due list, in firing order.
    /// Their callbacks stay in the slab until called, so they can still be cancelled.
    pub(crate) fn collect_due(&mut self, now: Instant) {
        while let Some(&Reverse(key)) = self.heap.peek() {
            if key.deadline > now {
                break;
            }
            self.heap.pop();
            match self.entries.get_mut(key.index) {
                Some(entry) if entry.seq == key.seq => {
                    entry.in_heap = false;
                    self.due.push_back((key.index, key.seq));
                }
                _ => self.stale -= 1,
            }
        }
    }

    /// Takes the callback of the next due timer that has not been cancelled meanwhile.
    pub(crate) fn pop_due(&mut self) -> Option<Callback> {
        while let Some((index, seq)) = self.due.pop_front() {
            if self.is_live(index, seq) {
                return Some(self.entries.remove(index).callback);
            }
        }
        None
    }

    /// Removes every timer and returns the callbacks, for the caller to drop.
    pub(crate) fn drain(&mut self) -> Vec<Callback> {
        self.heap = BinaryHeap::new();
        self.due = VecDeque::new();
        self.stale = 0;
        let callbacks = self.entries.drain().map(|e| e.callback).collect();
        self.entries = Slab::new();
        callbacks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Duration;

    fn recorder() -> (Rc<RefCell<Vec<u32>>>, impl Fn(u32) -> Callback) {
        let log = Rc::new(RefCell::new(Vec::new()));
        let log2 = log.clone();
        let make = move |n: u32| -> Callback {
            let log = log2.clone();
            Box::new(move || log.borrow_mut().push(n))
        };
        (log, make)
    }

    fn fire_all_due(t: &mut Timers, now: Instant) {
        t.collect_due(now);
        while let Some(cb) = t.pop_due() {
            cb();
        }
    }

    #[test]
    fn equal_deadlines_fire_in_insertion_order_and_earlier_deadlines_first() {
        let (log, cb) = recorder();
        let mut t = Timers::new();
        let base = Instant::now();
        let later = base + Duration::from_millis(5);
        t.insert(later, cb(3));
        for n in 0..3 {
            t.insert(base, cb(n));
        }
        t.insert(later, cb(4));
        fire_all_due(&mut t, later);
        assert_eq!(*log.borrow(), vec![0, 1, 2, 3, 4]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn collect_due_leaves_future_timers_in_the_heap() {
        let (log, cb) = recorder();
        let mut t = Timers::new();
        let base = Instant::now();
        t.insert(base, cb(1));
        t.insert(base + Duration::from_secs(60), cb(2));
        fire_all_due(&mut t, base);
        assert_eq!(*log.borrow(), vec![1]);
        assert_eq!(t.next_deadline(), Some(base + Duration::from_secs(60)));
    }

    #[test]
    fn a_due_timer_can_still_be_cancelled_before_it_is_called() {
        let (log, cb) = recorder();
        let mut t = Timers::new();
        let base = Instant::now();
        t.insert(base, cb(1));
        let second = t.insert(base, cb(2));
        t.collect_due(base);
        assert!(t.has_due());
        assert!(t.cancel(second).is_some());
        while let Some(c) = t.pop_due() {
            c();
        }
        assert_eq!(*log.borrow(), vec![1]);
        assert!(!t.has_due());
    }

    #[test]
    fn cancelled_or_fired_ids_are_not_confused_with_a_reused_slot() {
        let (log, cb) = recorder();
        let mut t = Timers::new();
        let base = Instant::now();
        let first = t.insert(base, cb(1));
        assert!(t.cancel(first).is_some());
        // The slab slot is reused; the old id must not reach the new timer.
        let second = t.insert(base, cb(2));
        assert!(t.cancel(first).is_none());
        fire_all_due(&mut t, base);
        assert_eq!(*log.borrow(), vec![2]);
        assert!(t.cancel(second).is_none());
        assert!(t.cancel(TimeoutId::DANGLING).is_none());
    }

    #[test]
    fn cancelling_many_timers_sweeps_stale_heap_keys() {
        let (_log, cb) = recorder();
        let mut t = Timers::new();
        let base = Instant::now();
        let ids: Vec<_> = (0..10_000)
            .map(|n| t.insert(base + Duration::from_millis(n), cb(n as u32)))
            .collect();
        for id in &ids[..9_000] {
            assert!(t.cancel(*id).is_some());
        }
        assert_eq!(t.len(), 1_000);
        assert!(t.heap.len() < 3_000, "heap kept {} keys", t.heap.len());
        assert_eq!(t.next_deadline(), Some(base + Duration::from_millis(9_000)));
    }

    #[test]
    fn drain_returns_every_pending_callback() {
        let (_log, cb) = recorder();
        let mut t = Timers::new();
        let base = Instant::now();
        t.insert(base, cb(1));
        t.insert(base + Duration::from_secs(1), cb(2));
        t.collect_due(base);
        assert_eq!(t.drain().len(), 2);
        assert_eq!(t.len(), 0);
        assert!(!t.has_due());
        assert_eq!(t.next_deadline(), None);
    }
}
