//! Benchmarks of the loop's hot paths, as a plain program that prints one labelled figure per
//! line: `cargo bench -p ioloop`. Keeps the whole run to a few seconds.

use std::cell::Cell;
use std::hint::black_box;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ioloop::{Interest, IoLoop};

const TIMERS: u32 = 1_000_000;
const CALLBACKS: u32 = 1_000_000;
const WAKES: usize = 100_000;
const PING_PONG_BUDGET: Duration = Duration::from_secs(3);

fn schedule_and_cancel_timers() {
    let lp = IoLoop::new().unwrap();
    let mut ids = Vec::with_capacity(TIMERS as usize);
    let t0 = Instant::now();
    for i in 0..TIMERS {
        // Spread deadlines over 1..1000 s so the heap is exercised, not appended to.
        let delay = Duration::from_millis(1_000 + u64::from(i.wrapping_mul(7919) % 999_000));
        ids.push(lp.call_later(delay, || {}));
    }
    let scheduled = t0.elapsed();
    let t1 = Instant::now();
    for id in ids {
        assert!(lp.remove_timeout(black_box(id)));
    }
    let cancelled = t1.elapsed();
    let per = |d: Duration| d.as_nanos() as f64 / f64::from(TIMERS);
    println!("timers.schedule_ns_per_op: {:.1}", per(scheduled));
    println!("timers.cancel_ns_per_op: {:.1}", per(cancelled));
    println!(
        "timers.schedule_plus_cancel_ns_per_op: {:.1}",
        per(scheduled + cancelled) / 2.0
    );
    lp.close();
}

fn fire_call_soon() {
    let lp = IoLoop::new().unwrap();
    let count = Rc::new(Cell::new(0u32));
    let t0 = Instant::now();
    for _ in 0..CALLBACKS {
        let (c, h) = (count.clone(), lp.clone());
        lp.call_soon(move || {
            c.set(c.get() + 1);
            if c.get() == CALLBACKS {
                h.stop();
            }
        });
    }
    lp.start().unwrap();
    let elapsed = t0.elapsed();
    assert_eq!(count.get(), CALLBACKS);
    println!(
        "call_soon.queue_and_fire_ns_per_callback: {:.1}",
        elapsed.as_nanos() as f64 / f64::from(CALLBACKS)
    );
    lp.close();
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn cross_thread_wake_latency() {
    let (waker_tx, waker_rx) = mpsc::channel();
    let loop_thread = thread::spawn(move || {
        let lp = IoLoop::new().unwrap();
        waker_tx.send(lp.waker()).unwrap();
        lp.start().unwrap();
        lp.close();
    });
    let waker = waker_rx.recv().unwrap();
    let (seen_tx, seen_rx) = mpsc::channel::<Duration>();
    let mut latencies = Vec::with_capacity(WAKES);
    for _ in 0..WAKES {
        let seen_tx = seen_tx.clone();
        let sent = Instant::now();
        waker
            .add_callback_threadsafe(move || seen_tx.send(sent.elapsed()).unwrap())
            .unwrap();
        // Wait until it ran before sending the next, so each one wakes a blocked poller.
        latencies.push(seen_rx.recv().unwrap());
    }
    waker.stop().unwrap();
    loop_thread.join().unwrap();
    latencies.sort();
    println!("wake.p50_us: {:.1}", percentile(&latencies, 0.50));
    println!("wake.p99_us: {:.1}", percentile(&latencies, 0.99));
}

fn ping_pong() {
    let lp = IoLoop::new().unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let (a, b) = (Rc::new(a), Rc::new(b));
    let round_trips = Rc::new(Cell::new(0u64));
    let started = Instant::now();

    // Echo side.
    let sock = b.clone();
    lp.add_handler(b.clone(), Interest::READABLE, move |_| {
        let mut byte = [0u8; 1];
        match (&*sock).read(&mut byte) {
            Ok(1) => (&*sock).write_all(&byte).unwrap(),
            Ok(_) => panic!("unexpected end of file"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    })
    .unwrap();

    // Initiating side: counts a round trip per echoed byte, sends the next one.
    let (sock, n, h) = (a.clone(), round_trips.clone(), lp.clone());
    lp.add_handler(a.clone(), Interest::READABLE, move |_| {
        let mut byte = [0u8; 1];
        match (&*sock).read(&mut byte) {
            Ok(1) => {
                n.set(n.get() + 1);
                // Check the clock only now and then.
                if n.get() % 1024 == 0 && started.elapsed() >= PING_PONG_BUDGET {
                    h.stop();
                } else {
                    (&*sock).write_all(&byte).unwrap();
                }
            }
            Ok(_) => panic!("unexpected end of file"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    })
    .unwrap();

    (&*a).write_all(b"p").unwrap();
    lp.start().unwrap();
    let elapsed = started.elapsed();
    println!(
        "ping_pong.round_trips_per_sec: {:.0}",
        round_trips.get() as f64 / elapsed.as_secs_f64()
    );
    lp.close();
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let t0 = Instant::now();
    println!(
        "backend: {}",
        if cfg!(polling_test_poll_backend) {
            "poll"
        } else {
            "default (epoll on Linux)"
        }
    );
    schedule_and_cancel_timers();
    fire_call_soon();
    cross_thread_wake_latency();
    ping_pong();
    println!("bench.total_s: {:.1}", t0.elapsed().as_secs_f64());
}
