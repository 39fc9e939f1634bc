//! The thread-safe door: callbacks and stop from other threads, wakers outliving the loop,
//! and an idle loop that really sleeps.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::watchdog;
use ioloop::{Closed, IoLoop, IoLoopWaker};

#[test]
fn waker_is_send_sync_and_clone() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<IoLoopWaker>();
}

#[test]
fn threadsafe_callbacks_from_8_threads_run_exactly_once_in_per_thread_order() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 10_000;
    let lp = IoLoop::new().unwrap();
    let seen: Arc<Mutex<Vec<Vec<usize>>>> = Arc::new(Mutex::new(vec![Vec::new(); THREADS]));
    let waker = lp.waker();
    let s = seen.clone();
    let coordinator = thread::spawn(move || {
        let producers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (waker, seen) = (waker.clone(), s.clone());
                thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let seen = seen.clone();
                        waker
                            .add_callback_threadsafe(move || seen.lock().unwrap()[t].push(i))
                            .unwrap();
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        // Queued after every producer's last callback, so it runs after them.
        let w = waker.clone();
        waker
            .add_callback_threadsafe(move || w.stop().unwrap())
            .unwrap();
    });
    watchdog(&lp);
    lp.start().unwrap();
    coordinator.join().unwrap();
    let seen = seen.lock().unwrap();
    for (t, calls) in seen.iter().enumerate() {
        assert_eq!(calls.len(), PER_THREAD, "thread {t}");
        assert!(
            calls.iter().copied().eq(0..PER_THREAD),
            "thread {t}'s callbacks ran out of order or more than once"
        );
    }
}

#[test]
fn stop_from_another_thread_wakes_a_blocked_loop() {
    let lp = IoLoop::new().unwrap();
    // No timers but the watchdog: the loop blocks in the poller until woken.
    watchdog(&lp);
    let waker = lp.waker();
    let stopper = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        waker.stop().unwrap();
    });
    lp.start().unwrap();
    stopper.join().unwrap();
    assert!(!lp.is_running());
}

#[test]
fn threadsafe_callbacks_queued_before_start_run_once_started() {
    let lp = IoLoop::new().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let waker = lp.waker();
    let c = count.clone();
    thread::spawn(move || {
        waker
            .add_callback_threadsafe(move || {
                c.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
    })
    .join()
    .unwrap();
    let h = lp.clone();
    lp.call_later(Duration::from_millis(5), move || h.stop());
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn waker_calls_after_close_return_closed_and_drop_the_callback() {
    let lp = IoLoop::new().unwrap();
    let waker = lp.waker();
    lp.close();
    assert!(waker.is_closed());
    let dropped = Arc::new(AtomicUsize::new(0));
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let g = Guard(dropped.clone());
    let result = thread::spawn(move || {
        let r1 = waker.add_callback_threadsafe(move || drop(g));
        let r2 = waker.stop();
        (r1, r2)
    })
    .join()
    .unwrap();
    assert_eq!(result, (Err(Closed), Err(Closed)));
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
}

#[test]
fn waker_calls_after_the_loop_is_dropped_return_closed() {
    let lp = IoLoop::new().unwrap();
    let waker = lp.waker();
    drop(lp);
    assert_eq!(waker.add_callback_threadsafe(|| {}), Err(Closed));
    assert_eq!(waker.stop(), Err(Closed));
}

fn thread_cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass; all-zero is a valid `rusage`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[test]
fn an_idle_loop_with_a_timer_an_hour_away_uses_almost_no_cpu() {
    let (tx, rx) = mpsc::channel();
    let runner = thread::spawn(move || {
        let lp = IoLoop::new().unwrap();
        lp.call_later(Duration::from_secs(3600), || panic!("an hour went by"));
        // Measured from before the waker is handed out, so `wall` covers the full second.
        let (cpu0, wall0) = (thread_cpu_time(), Instant::now());
        tx.send(lp.waker()).unwrap();
        lp.start().unwrap();
        let (cpu, wall) = (thread_cpu_time() - cpu0, wall0.elapsed());
        lp.close();
        (cpu, wall)
    });
    let waker = rx.recv().unwrap();
    thread::sleep(Duration::from_secs(1));
    waker.stop().unwrap();
    let (cpu, wall) = runner.join().unwrap();
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    assert!(
        wall >= Duration::from_secs(1),
        "stopped too early: {wall:?}"
    );
    assert!(
        share < 0.05,
        "the idle loop thread used {cpu:?} CPU in {wall:?} ({:.1}%)",
        share * 100.0
    );
}
