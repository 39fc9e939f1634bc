//! `perftest`: throughput, latency, client CPU and peak memory of pika
//! against a real RabbitMQ, in five workloads.
//!
//! | name | what is timed |
//! |------|---------------|
//! | `P1` | publish 200 000 × 64-byte messages without confirms, paced by the outbound watermarks, until a passive Queue.Declare says the queue holds them all |
//! | `P2` | the same in confirm mode with at most 1 000 unconfirmed, until the last ack |
//! | `C1` | consume 200 000 pre-loaded 64-byte messages (prefetch 1 000), one Basic.Ack each (the pre-load is not timed) |
//! | `L1` | 10 000 publish → deliver round trips, one at a time (auto-ack): p50 / p99 latency |
//! | `B1` | 500 × 1 MiB messages published and consumed on one connection: MiB/s |
//!
//! and the same through the blocking face (`BlockingConnection`, see
//! `blocking.rs`): `BP1`, `BP2` (one confirmed publish at a time, as pika
//! does), `BP2W` (the window API, 1 000 in flight), `BC1` (the `consume()`
//! iterator) and `BL1` (20 000 for BP2, the others as above).
//!
//! ```text
//! scripts/with-broker cargo run --release --example perftest              # all ten
//! scripts/with-broker cargo run --release --example perftest P1 L1        # some
//! scripts/with-broker cargo run --release --example perftest -- --n 20000 # smaller n, all
//! scripts/with-broker cargo run --release --example perftest P1=20000 B1=50
//! PERFTEST_N=20000 scripts/with-broker cargo run --release --example perftest
//! ```
//!
//! Every workload runs on a fresh connection, with a fresh exclusive,
//! server-named queue that messages reach through the default exchange, in
//! a process of its own: the example re-executes itself once per workload
//! (`PERFTEST_CHILD=<name>:<n>`), so that the peak RSS it reports belongs
//! to that workload alone.
//!
//! Figures, over the timed phase only:
//! * `msgs_per_s`: n / wall time; `mb_per_s` (B1): payload MiB / wall time.
//! * `cpu_us_per_msg`: CPU time of the thread running the loop (user +
//!   system, from `/proc/thread-self/schedstat`, in ns; or, where that file
//!   is missing, utime + stime from `/proc/self/stat` at 100 ticks/s) / n.
//!   On loopback this includes the kernel's TCP work done on our behalf.
//! * `proc_cpu_us_per_msg`: CPU time of the whole process, every thread
//!   (user + system from `getrusage(RUSAGE_SELF)`, µs resolution) / n —
//!   the figure to compare with other clients, whatever threads they use.
//! * `rss_mb`: the process's peak resident set (`VmHWM`, MiB), reset at the
//!   start of the timed phase (`/proc/self/clear_refs`) where allowed.
//!
//! Each workload prints one machine-readable line, e.g.
//! `RESULT workload=P1 n=200000 wall_s=1.234 msgs_per_s=162075 cpu_us_per_msg=0.812 rss_mb=3.1`
//! (`p50_us=` / `p99_us=` for L1, `mb_per_s=` for B1); a table follows.

use std::cell::{Cell, RefCell};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pika::{
    BasicConsumeOptions, BasicProperties, Channel, Confirmation, Delivery, Error, FieldTable,
    QueueDeclareOptions, SelectConnection, UrlParameters,
};

mod blocking;

/// The workloads, in the order a run without arguments runs them: the
/// callback face's, then the blocking face's.
pub const WORKLOADS: [&str; 10] = [
    "P1", "P2", "C1", "L1", "B1", "BP1", "BP2", "BP2W", "BC1", "BL1",
];

/// The n a workload runs with unless told otherwise.
pub fn default_n(workload: &str) -> Option<u64> {
    // A `T` suffix runs the same workload over TLS.
    let workload = workload.strip_suffix('T').unwrap_or(workload);
    match workload {
        "P1" | "P2" | "C1" | "BP1" | "BP2W" | "BC1" => Some(200_000),
        // A round trip per message.
        "BP2" => Some(20_000),
        "L1" | "BL1" => Some(10_000),
        "B1" => Some(500),
        _ => None,
    }
}

/// Body of the P1, P2, C1 and L1 messages.
const SMALL_BODY: usize = 64;
/// Body of the B1 messages.
const BIG_BODY: usize = 1 << 20;
/// Outbound watermarks for the paced publishers: publish until the buffer
/// passes `HIGH_WATER`, resume when it drains below `LOW_WATER`.
const HIGH_WATER: usize = 1 << 20;
const LOW_WATER: usize = 256 << 10;
/// P2's window of unconfirmed messages.
const MAX_UNCONFIRMED: u64 = 1_000;
const C1_PREFETCH: u16 = 1_000;
const B1_PREFETCH: u16 = 8;
/// A liveness bound on one workload, not a timing expectation.
const TIME_LIMIT: Duration = Duration::from_secs(600);
/// Clock ticks per second of `/proc/*/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_S: u64 = 100;

// ----------------------------------------------------------------------
// Reports
// ----------------------------------------------------------------------

/// The figures of one workload run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `P1`, `P2`, `C1`, `L1` or `B1`.
    pub workload: String,
    /// Messages (round trips for L1).
    pub n: u64,
    /// Wall time of the timed phase, seconds.
    pub wall_s: f64,
    /// n / wall_s.
    pub msgs_per_s: f64,
    /// Client CPU (user + system) of the loop thread over the timed phase /
    /// n, µs.
    pub cpu_us_per_msg: f64,
    /// CPU (user + system) of the whole process, all threads, / n, µs.
    pub proc_cpu_us_per_msg: f64,
    /// The user part, from clock ticks (10 ms resolution); not on the
    /// RESULT line.
    pub user_us_per_msg: f64,
    /// The system part, likewise.
    pub sys_us_per_msg: f64,
    /// Peak resident set of the process, MiB.
    pub rss_mb: f64,
    /// L1: median round trip, µs.
    pub p50_us: Option<f64>,
    /// L1: 99th percentile round trip, µs.
    pub p99_us: Option<f64>,
    /// B1: payload MiB consumed per second.
    pub mb_per_s: Option<f64>,
}

impl Report {
    fn new(workload: &str, n: u64, m: &Measured) -> Report {
        let wall_s = m.wall.as_secs_f64().max(1e-9);
        let per_msg = |ns: u64| ns as f64 / 1e3 / n as f64;
        let mut sorted = m.latencies_ns.clone();
        sorted.sort_unstable();
        let percentile = |q: f64| -> Option<f64> {
            if sorted.is_empty() {
                return None;
            }
            // Nearest rank.
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            Some(sorted[rank - 1] as f64 / 1e3)
        };
        Report {
            workload: workload.to_string(),
            n,
            wall_s,
            msgs_per_s: n as f64 / wall_s,
            cpu_us_per_msg: per_msg(m.cpu_ns),
            proc_cpu_us_per_msg: per_msg(m.proc_cpu_ns),
            user_us_per_msg: per_msg(m.user_ns),
            sys_us_per_msg: per_msg(m.sys_ns),
            rss_mb: m.peak_rss_kb as f64 / 1024.0,
            p50_us: percentile(0.50),
            p99_us: percentile(0.99),
            mb_per_s: (m.payload_bytes > 0)
                .then(|| m.payload_bytes as f64 / (1u64 << 20) as f64 / wall_s),
        }
    }

    /// The machine-readable line:
    /// `RESULT workload=P1 n=200000 wall_s=… msgs_per_s=… cpu_us_per_msg=… rss_mb=…`,
    /// with `p50_us=… p99_us=…` (L1) and `mb_per_s=…` (B1) when present.
    pub fn result_line(&self) -> String {
        let mut line = format!(
            "RESULT workload={} n={} wall_s={:.3} msgs_per_s={:.0} cpu_us_per_msg={:.3} \
             proc_cpu_us_per_msg={:.3} rss_mb={:.1}",
            self.workload,
            self.n,
            self.wall_s,
            self.msgs_per_s,
            self.cpu_us_per_msg,
            self.proc_cpu_us_per_msg,
            self.rss_mb
        );
        if let (Some(p50), Some(p99)) = (self.p50_us, self.p99_us) {
            line.push_str(&format!(" p50_us={p50:.1} p99_us={p99:.1}"));
        }
        if let Some(mb) = self.mb_per_s {
            line.push_str(&format!(" mb_per_s={mb:.1}"));
        }
        line
    }

    /// Reads a [`Report::result_line`] back (the user/system split, not on
    /// the line, reads as 0); `None` for any other line.
    pub fn parse_result_line(line: &str) -> Option<Report> {
        let mut fields = line.split_whitespace();
        if fields.next()? != "RESULT" {
            return None;
        }
        let mut report = Report {
            workload: String::new(),
            n: 0,
            wall_s: 0.0,
            msgs_per_s: 0.0,
            cpu_us_per_msg: 0.0,
            proc_cpu_us_per_msg: 0.0,
            user_us_per_msg: 0.0,
            sys_us_per_msg: 0.0,
            rss_mb: 0.0,
            p50_us: None,
            p99_us: None,
            mb_per_s: None,
        };
        for field in fields {
            let (key, value) = field.split_once('=')?;
            let number = || value.parse::<f64>().ok();
            match key {
                "workload" => report.workload = value.to_string(),
                "n" => report.n = value.parse().ok()?,
                "wall_s" => report.wall_s = number()?,
                "msgs_per_s" => report.msgs_per_s = number()?,
                "cpu_us_per_msg" => report.cpu_us_per_msg = number()?,
                "proc_cpu_us_per_msg" => report.proc_cpu_us_per_msg = number()?,
                "rss_mb" => report.rss_mb = number()?,
                "p50_us" => report.p50_us = Some(number()?),
                "p99_us" => report.p99_us = Some(number()?),
                "mb_per_s" => report.mb_per_s = Some(number()?),
                _ => {}
            }
        }
        (!report.workload.is_empty()).then_some(report)
    }

    /// A comment line with the user/system split of the CPU figure.
    pub fn cpu_split_line(&self) -> String {
        format!(
            "# {}: client CPU {:.3} µs/msg; by clock ticks (10 ms resolution): user {:.3} + system {:.3} µs/msg",
            self.workload, self.cpu_us_per_msg, self.user_us_per_msg, self.sys_us_per_msg
        )
    }
}

// ----------------------------------------------------------------------
// Measuring
// ----------------------------------------------------------------------

/// CPU time used so far by the calling thread.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    /// user + system, ns (`None` when schedstat is unavailable).
    runtime_ns: Option<u64>,
    user_ticks: u64,
    sys_ticks: u64,
    /// user + system of the whole process (every thread), µs.
    process_us: u64,
}

/// The whole process's CPU time so far (every thread), µs.
fn process_cpu_us() -> u64 {
    // SAFETY: getrusage writes one `rusage` through the pointer, which
    // points at a zeroed, live value of that type.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0;
        }
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

fn cpu_sample() -> CpuSample {
    let runtime_ns = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok());
    // Fields after the `(comm)` one: state is field 3, utime 14, stime 15.
    let (user_ticks, sys_ticks) = std::fs::read_to_string("/proc/thread-self/stat")
        .or_else(|_| std::fs::read_to_string("/proc/self/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            let mut fields = rest.split_whitespace().skip(11);
            Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
        })
        .unwrap_or((0, 0));
    CpuSample {
        runtime_ns,
        user_ticks,
        sys_ticks,
        process_us: process_cpu_us(),
    }
}

/// Resets the process's peak RSS to its current RSS (Linux ≥ 4.0); best
/// effort.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak RSS, KiB (0 when unknown).
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The start of a timed phase.
#[derive(Debug, Clone, Copy)]
struct Phase {
    started: Instant,
    cpu: CpuSample,
}

/// What a timed phase measured.
#[derive(Debug, Default)]
struct Measured {
    wall: Duration,
    cpu_ns: u64,
    proc_cpu_ns: u64,
    user_ns: u64,
    sys_ns: u64,
    peak_rss_kb: u64,
    latencies_ns: Vec<u64>,
    payload_bytes: u64,
}

impl Phase {
    fn start() -> Phase {
        reset_peak_rss();
        let cpu = cpu_sample();
        Phase {
            started: Instant::now(),
            cpu,
        }
    }

    fn finish(self) -> Measured {
        let wall = self.started.elapsed();
        let end = cpu_sample();
        let tick_ns = 1_000_000_000 / TICKS_PER_S;
        let user_ns = end.user_ticks.saturating_sub(self.cpu.user_ticks) * tick_ns;
        let sys_ns = end.sys_ticks.saturating_sub(self.cpu.sys_ticks) * tick_ns;
        let cpu_ns = match (self.cpu.runtime_ns, end.runtime_ns) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => user_ns + sys_ns,
        };
        Measured {
            wall,
            cpu_ns,
            proc_cpu_ns: end.process_us.saturating_sub(self.cpu.process_us) * 1_000,
            user_ns,
            sys_ns,
            peak_rss_kb: peak_rss_kb(),
            ..Measured::default()
        }
    }
}

/// A failure of the benchmark itself (a nack, a lost message).
fn failure(reason: String) -> Error {
    Error::InvalidParameter {
        name: "perftest",
        reason,
    }
}

// ----------------------------------------------------------------------
// One connection, one channel, one queue
// ----------------------------------------------------------------------

type ResultSlot = Rc<RefCell<Option<Result<Measured, Error>>>>;

/// Keeps the first outcome: later ones (e.g. the close that follows a
/// result) change nothing.
fn store(slot: &ResultSlot, outcome: Result<Measured, Error>) {
    let mut slot = slot.borrow_mut();
    if slot.is_none() {
        *slot = Some(outcome);
    }
}

/// Records the outcome and ends the run: closes the connection (its close
/// callback stops the loop), or stops the loop at once when it is not open.
fn end_run(conn: &SelectConnection, slot: &ResultSlot, outcome: Result<Measured, Error>) {
    store(slot, outcome);
    if !conn.is_open() || conn.close(200, "perftest done").is_err() {
        conn.ioloop().stop();
    }
}

/// What a workload works with: its connection, an open channel and a fresh
/// exclusive queue.
#[derive(Clone)]
struct Bench {
    conn: SelectConnection,
    channel: Channel,
    queue: Rc<str>,
    slot: ResultSlot,
}

impl Bench {
    fn finish(&self, outcome: Result<Measured, Error>) {
        end_run(&self.conn, &self.slot, outcome);
    }
}

/// Connects to `url`, opens a channel, declares an exclusive server-named
/// queue, hands them to `workload` and runs the loop until the workload
/// finishes (or the connection fails, or [`TIME_LIMIT`] passes).
fn run_on_connection(url: &str, workload: impl FnOnce(Bench) + 'static) -> Result<Measured, Error> {
    let params = params_for(url)?;
    let slot: ResultSlot = Rc::default();
    let (open_slot, error_slot, close_slot) = (slot.clone(), slot.clone(), slot.clone());
    let conn = SelectConnection::new(
        params,
        move |conn| open_bench(conn, open_slot, workload),
        move |conn, err| {
            store(&error_slot, Err(err));
            conn.ioloop().stop();
        },
        move |conn, reason| {
            store(&close_slot, Err(reason));
            conn.ioloop().stop();
        },
    )?;
    let ioloop = conn.ioloop().clone();
    let (watchdog_slot, stopper) = (slot.clone(), ioloop.clone());
    let watchdog = ioloop.call_later(TIME_LIMIT, move || {
        store(
            &watchdog_slot,
            Err(failure(format!("not finished within {TIME_LIMIT:?}"))),
        );
        stopper.stop();
    });
    let ran = ioloop.start();
    ioloop.remove_timeout(watchdog);
    ran.map_err(|e| Error::IoLoop(Arc::new(e)))?;
    let outcome = slot.borrow_mut().take();
    outcome.unwrap_or_else(|| Err(failure("the loop stopped without a result".into())))
}

fn open_bench(conn: &SelectConnection, slot: ResultSlot, workload: impl FnOnce(Bench) + 'static) {
    let (bench_conn, bench_slot) = (conn.clone(), slot.clone());
    let opened = conn.channel(None, move |channel| {
        let channel = match channel {
            Ok(channel) => channel,
            Err(e) => return end_run(&bench_conn, &bench_slot, Err(e)),
        };
        let options = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let (declare_conn, declare_slot) = (bench_conn.clone(), bench_slot.clone());
        let declared =
            channel.queue_declare("", options, FieldTable::new(), move |channel, declared| {
                match declared {
                    Ok(ok) => workload(Bench {
                        conn: declare_conn,
                        channel: channel.clone(),
                        queue: ok.queue.into(),
                        slot: declare_slot,
                    }),
                    Err(e) => end_run(&declare_conn, &declare_slot, Err(e)),
                }
            });
        if let Err(e) = declared {
            end_run(&bench_conn, &bench_slot, Err(e));
        }
    });
    if let Err(e) = opened {
        end_run(conn, &slot, Err(e));
    }
}

// ----------------------------------------------------------------------
// Building blocks
// ----------------------------------------------------------------------

/// What runs once a paced publisher has queued its last message.
type AfterPublishing = Box<dyn FnOnce(&Bench)>;

/// A publisher paced by the outbound watermarks.
struct Pacer {
    remaining: u64,
    body: Rc<[u8]>,
    then: Option<AfterPublishing>,
}

/// Publishes `count` copies of `body` to the bench queue: until the
/// outbound buffer passes its high-water mark, then again each time it
/// drains below the low one. `then` runs once the last message is in the
/// outbound buffer.
fn publish_paced(bench: &Bench, count: u64, body: Rc<[u8]>, then: impl FnOnce(&Bench) + 'static) {
    let pacer = Rc::new(RefCell::new(Pacer {
        remaining: count,
        body,
        then: Some(Box::new(then)),
    }));
    let (drained_bench, drained_pacer) = (bench.clone(), pacer.clone());
    bench
        .conn
        .add_on_outbound_drained_callback(move |_| pump(&drained_bench, &drained_pacer));
    pump(bench, &pacer);
}

fn pump(bench: &Bench, pacer: &RefCell<Pacer>) {
    let (mut remaining, body) = {
        let p = pacer.borrow();
        (p.remaining, p.body.clone())
    };
    if remaining == 0 {
        return;
    }
    let properties = BasicProperties::default();
    while remaining > 0 {
        if let Err(e) = bench
            .channel
            .basic_publish("", &bench.queue, &body, &properties, false)
        {
            pacer.borrow_mut().remaining = 0;
            return bench.finish(Err(e));
        }
        remaining -= 1;
        if bench.conn.is_outbound_above_high_water() {
            break;
        }
    }
    let then = {
        let mut p = pacer.borrow_mut();
        p.remaining = remaining;
        if remaining == 0 { p.then.take() } else { None }
    };
    if let Some(then) = then {
        then(bench);
    }
}

/// Asks the broker how many messages the queue holds with a passive
/// Queue.Declare — answered after every frame sent before it on the
/// channel has been processed — until it holds `n`; then runs `then`.
fn await_queued(bench: &Bench, n: u64, then: impl FnOnce(&Bench) + 'static) {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let asker = bench.clone();
    let asked = bench.channel.queue_declare(
        &bench.queue,
        options,
        FieldTable::new(),
        move |_, declared| match declared {
            Ok(ok) if u64::from(ok.message_count) >= n => then(&asker),
            Ok(_) => await_queued(&asker, n, then),
            Err(e) => asker.finish(Err(e)),
        },
    );
    if let Err(e) = asked {
        bench.finish(Err(e));
    }
}

fn set_watermarks(bench: &Bench) -> bool {
    match bench.conn.set_outbound_watermarks(HIGH_WATER, LOW_WATER) {
        Ok(()) => true,
        Err(e) => {
            bench.finish(Err(e));
            false
        }
    }
}

fn small_body() -> Rc<[u8]> {
    vec![0xA5; SMALL_BODY].into()
}

// ----------------------------------------------------------------------
// The workloads
// ----------------------------------------------------------------------

/// P1: paced publishes without confirms, until the broker counts them all.
fn publish_without_confirms(bench: Bench, n: u64) {
    if !set_watermarks(&bench) {
        return;
    }
    let body = small_body();
    let phase = Phase::start();
    publish_paced(&bench, n, body, move |bench| {
        await_queued(bench, n, move |bench| bench.finish(Ok(phase.finish())))
    });
}

/// P2's window: published and confirmed counts (the confirm callback is
/// told how many tags each ack settled).
struct ConfirmTracker {
    n: u64,
    published: u64,
    confirmed: u64,
}

impl ConfirmTracker {
    fn new(n: u64) -> ConfirmTracker {
        ConfirmTracker {
            n,
            published: 0,
            confirmed: 0,
        }
    }

    /// An ack settled `count` tags.
    fn acked(&mut self, count: usize) {
        self.confirmed += count as u64;
    }

    /// How many more may be published now.
    fn room(&self) -> u64 {
        let in_flight = self.published - self.confirmed;
        MAX_UNCONFIRMED
            .saturating_sub(in_flight)
            .min(self.n - self.published)
    }
}

/// P2: publishes in confirm mode, keeping at most [`MAX_UNCONFIRMED`] in
/// flight, until the last one is acked.
fn publish_with_confirms(bench: Bench, n: u64) {
    let body = small_body();
    let tracker = Rc::new(RefCell::new(ConfirmTracker::new(n)));
    let phase: Rc<Cell<Option<Phase>>> = Rc::default();

    fn top_up(bench: &Bench, tracker: &RefCell<ConfirmTracker>, body: &[u8]) {
        let room = tracker.borrow().room();
        let properties = BasicProperties::default();
        for _ in 0..room {
            match bench
                .channel
                .basic_publish("", &bench.queue, body, &properties, false)
            {
                Ok(_) => tracker.borrow_mut().published += 1,
                Err(e) => return bench.finish(Err(e)),
            }
        }
    }

    let (ack_bench, ack_tracker, ack_phase, ack_body) =
        (bench.clone(), tracker.clone(), phase.clone(), body.clone());
    let on_ack_nack = move |_: &Channel, confirmation: Confirmation| {
        match confirmation {
            Confirmation::Ack { settled, .. } => ack_tracker.borrow_mut().acked(settled.len()),
            Confirmation::Nack { delivery_tag, .. } => {
                return ack_bench.finish(Err(failure(format!(
                    "the broker nacked message {delivery_tag}"
                ))));
            }
            Confirmation::Failed { error, .. } => return ack_bench.finish(Err(error)),
        }
        if ack_tracker.borrow().confirmed == n {
            if let Some(phase) = ack_phase.get() {
                ack_bench.finish(Ok(phase.finish()));
            }
            return;
        }
        top_up(&ack_bench, &ack_tracker, &ack_body);
    };
    let select_bench = bench.clone();
    let selected = bench.channel.confirm_delivery(on_ack_nack, move |_, ok| {
        if let Err(e) = ok {
            return select_bench.finish(Err(e));
        }
        phase.set(Some(Phase::start()));
        top_up(&select_bench, &tracker, &body);
    });
    if let Err(e) = selected {
        bench.finish(Err(e));
    }
}

/// C1: pre-loads n messages (untimed), then consumes them with a prefetch
/// of [`C1_PREFETCH`] and one Basic.Ack each.
fn consume_and_ack(bench: Bench, n: u64) {
    if !set_watermarks(&bench) {
        return;
    }
    publish_paced(&bench, n, small_body(), move |bench| {
        await_queued(bench, n, move |bench| start_consuming(bench, n))
    });
}

fn start_consuming(bench: &Bench, n: u64) {
    let qos_bench = bench.clone();
    let asked = bench
        .channel
        .basic_qos(0, C1_PREFETCH, false, move |channel, ok| {
            let bench = qos_bench;
            if let Err(e) = ok {
                return bench.finish(Err(e));
            }
            let phase = Phase::start();
            let received = Cell::new(0u64);
            let message_bench = bench.clone();
            let on_message = move |channel: &Channel, delivery: Delivery| {
                let bench = &message_bench;
                if delivery.body.len() != SMALL_BODY {
                    return bench.finish(Err(failure(format!(
                        "a {}-byte body arrived, {SMALL_BODY} were sent",
                        delivery.body.len()
                    ))));
                }
                if let Err(e) = channel.basic_ack(delivery.method.delivery_tag, false) {
                    return bench.finish(Err(e));
                }
                received.set(received.get() + 1);
                if received.get() == n {
                    bench.finish(Ok(phase.finish()));
                }
            };
            let consume_bench = bench.clone();
            let consumed = channel.basic_consume(
                &bench.queue,
                on_message,
                BasicConsumeOptions::default(),
                move |_, ok| {
                    if let Err(e) = ok {
                        consume_bench.finish(Err(e));
                    }
                },
            );
            if let Err(e) = consumed {
                bench.finish(Err(e));
            }
        });
    if let Err(e) = asked {
        bench.finish(Err(e));
    }
}

/// L1's state: the round trip under way and those done.
struct RoundTrips {
    phase: Option<Phase>,
    sent_at: Option<Instant>,
    latencies_ns: Vec<u64>,
}

/// L1: one message at a time, published when the previous one arrives.
fn round_trips(bench: Bench, n: u64) {
    let body = small_body();
    let trips = Rc::new(RefCell::new(RoundTrips {
        phase: None,
        sent_at: None,
        latencies_ns: Vec::with_capacity(n as usize),
    }));

    fn send(bench: &Bench, trips: &RefCell<RoundTrips>, body: &[u8]) {
        trips.borrow_mut().sent_at = Some(Instant::now());
        if let Err(e) =
            bench
                .channel
                .basic_publish("", &bench.queue, body, &BasicProperties::default(), false)
        {
            bench.finish(Err(e));
        }
    }

    let (message_bench, message_trips, message_body) = (bench.clone(), trips.clone(), body.clone());
    let on_message = move |_: &Channel, _: Delivery| {
        let now = Instant::now();
        let done = {
            let mut t = message_trips.borrow_mut();
            if let Some(sent_at) = t.sent_at.take() {
                t.latencies_ns
                    .push(now.duration_since(sent_at).as_nanos() as u64);
            }
            t.latencies_ns.len() as u64 >= n
        };
        if !done {
            return send(&message_bench, &message_trips, &message_body);
        }
        let (phase, latencies_ns) = {
            let mut t = message_trips.borrow_mut();
            (t.phase.take(), std::mem::take(&mut t.latencies_ns))
        };
        if let Some(phase) = phase {
            message_bench.finish(Ok(Measured {
                latencies_ns,
                ..phase.finish()
            }));
        }
    };
    let consume_bench = bench.clone();
    let options = BasicConsumeOptions {
        auto_ack: true,
        ..Default::default()
    };
    let consumed = bench
        .channel
        .basic_consume(&bench.queue, on_message, options, move |_, ok| {
            if let Err(e) = ok {
                return consume_bench.finish(Err(e));
            }
            trips.borrow_mut().phase = Some(Phase::start());
            send(&consume_bench, &trips, &body);
        });
    if let Err(e) = consumed {
        bench.finish(Err(e));
    }
}

/// B1: a consumer (prefetch [`B1_PREFETCH`], acks) and a paced publisher
/// of 1 MiB messages on the same channel, until the last one arrives.
fn big_messages(bench: Bench, n: u64) {
    if !set_watermarks(&bench) {
        return;
    }
    let body: Rc<[u8]> = vec![0x5A; BIG_BODY].into();
    let phase: Rc<Cell<Option<Phase>>> = Rc::default();
    let qos_bench = bench.clone();
    let asked = bench
        .channel
        .basic_qos(0, B1_PREFETCH, false, move |channel, ok| {
            let bench = qos_bench;
            if let Err(e) = ok {
                return bench.finish(Err(e));
            }
            let (message_bench, message_phase) = (bench.clone(), phase.clone());
            let (received, bytes) = (Cell::new(0u64), Cell::new(0u64));
            let on_message = move |channel: &Channel, delivery: Delivery| {
                let bench = &message_bench;
                if delivery.body.len() != BIG_BODY {
                    return bench.finish(Err(failure(format!(
                        "a {}-byte body arrived, {BIG_BODY} were sent",
                        delivery.body.len()
                    ))));
                }
                if let Err(e) = channel.basic_ack(delivery.method.delivery_tag, false) {
                    return bench.finish(Err(e));
                }
                received.set(received.get() + 1);
                bytes.set(bytes.get() + delivery.body.len() as u64);
                if received.get() == n {
                    if let Some(phase) = message_phase.get() {
                        bench.finish(Ok(Measured {
                            payload_bytes: bytes.get(),
                            ..phase.finish()
                        }));
                    }
                }
            };
            let consume_bench = bench.clone();
            let consumed = channel.basic_consume(
                &bench.queue,
                on_message,
                BasicConsumeOptions::default(),
                move |_, ok| {
                    if let Err(e) = ok {
                        return consume_bench.finish(Err(e));
                    }
                    phase.set(Some(Phase::start()));
                    publish_paced(&consume_bench, n, body, |_| {});
                },
            );
            if let Err(e) = consumed {
                bench.finish(Err(e));
            }
        });
    if let Err(e) = asked {
        bench.finish(Err(e));
    }
}

/// Runs one workload (`P1`, `P2`, `C1`, `L1`, `B1` or a blocking one,
/// `BP1` …, see [`WORKLOADS`]) with `n` messages
/// (round trips for L1) against the broker at `url`, in this process and
/// on this thread, and returns its figures.
///
/// # Errors
/// [`Error::InvalidParameter`] for an unknown workload or `n == 0`, and for
/// a benchmark that could not complete (a nacked or missing message, the
/// time limit); otherwise the connection's or channel's error.
pub fn run_workload(name: &str, n: u64, url: &str) -> Result<Report, Error> {
    let (base, tls_url);
    let (name, url) = match name.strip_suffix('T') {
        Some(plain) => {
            base = plain;
            tls_url = std::env::var("AMQPS_URL").map_err(|_| Error::InvalidParameter {
                name: "AMQPS_URL",
                reason: "TLS workloads need AMQPS_URL and AMQP_TLS_CA, AMQP_TLS_CLIENT_CERT, \
                         AMQP_TLS_CLIENT_KEY (scripts/with-broker exports them)"
                    .into(),
            })?;
            (base, tls_url.as_str())
        }
        None => (name, url),
    };
    let report_name = if url.starts_with("amqps://") {
        format!("{name}T")
    } else {
        name.to_string()
    };
    if n == 0 {
        return Err(Error::InvalidParameter {
            name: "n",
            reason: "at least one message is needed".into(),
        });
    }
    if let Some(measured) = blocking::run(name, n, || params_for(url)) {
        return Ok(Report::new(&report_name, n, &measured?));
    }
    let measured = match name {
        "P1" => run_on_connection(url, move |b| publish_without_confirms(b, n))?,
        "P2" => run_on_connection(url, move |b| publish_with_confirms(b, n))?,
        "C1" => run_on_connection(url, move |b| consume_and_ack(b, n))?,
        "L1" => run_on_connection(url, move |b| round_trips(b, n))?,
        "B1" => run_on_connection(url, move |b| big_messages(b, n))?,
        other => {
            return Err(Error::InvalidParameter {
                name: "workload",
                reason: format!(
                    "unknown workload {other:?}; known: {}",
                    WORKLOADS.join(", ")
                ),
            });
        }
    };
    Ok(Report::new(&report_name, n, &measured))
}

/// Parameters for `url`: see [`tls_params`] for amqps.
fn params_for(url: &str) -> Result<pika::ConnectionParameters, Error> {
    if url.starts_with("amqps://") {
        tls_params(url)
    } else {
        Ok(UrlParameters::parse(url)?.into())
    }
}

/// Parameters for an amqps URL, with the CA and client certificate from
/// `AMQP_TLS_CA`, `AMQP_TLS_CLIENT_CERT` and `AMQP_TLS_CLIENT_KEY`.
fn tls_params(url: &str) -> Result<pika::ConnectionParameters, Error> {
    let var = |name: &'static str| {
        std::env::var(name).map_err(|_| Error::InvalidParameter {
            name,
            reason: "not set (scripts/with-broker exports it)".into(),
        })
    };
    let (ca, cert, key) = (
        var("AMQP_TLS_CA")?,
        var("AMQP_TLS_CLIENT_CERT")?,
        var("AMQP_TLS_CLIENT_KEY")?,
    );
    let ssl =
        pika::SslOptions::from_pem_files(Some(ca.as_ref()), Some((cert.as_ref(), key.as_ref())))?;
    let mut params: pika::ConnectionParameters = UrlParameters::parse(url)?.into();
    params.set_ssl_options(Some(ssl));
    Ok(params)
}

// ----------------------------------------------------------------------
// The command line
// ----------------------------------------------------------------------

/// Set in the environment of the per-workload child processes: `<name>:<n>`.
#[allow(dead_code)] // main only
const CHILD_ENV: &str = "PERFTEST_CHILD";

#[allow(dead_code)] // main only
const USAGE: &str = "usage: perftest [--n N] [WORKLOAD[=N]...]
  WORKLOAD: P1 P2 C1 L1 B1, and through the blocking face BP1 BP2 BP2W BC1
  BL1 (default: all, in that order); a T suffix
  (P1T ...) runs it over TLS; --tls runs each chosen workload over TLS too,
  right after its plain-TCP run
  --n N / PERFTEST_N=N: n for every workload run; WORKLOAD=N: n for that one
  the broker: AMQP_URL (run through scripts/with-broker)";

/// The workloads to run, with their n, from the arguments and `PERFTEST_N`.
#[allow(dead_code)] // main only
fn parse_args(
    args: impl IntoIterator<Item = String>,
    env_n: Option<String>,
) -> Result<Vec<(String, u64)>, String> {
    let parse_n = |s: &str| -> Result<u64, String> {
        match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("n must be a positive integer, not {s:?}")),
        }
    };
    let mut global_n = env_n.as_deref().map(parse_n).transpose()?;
    let mut tls = false;
    let mut wanted: Vec<(String, Option<u64>)> = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--n" {
            let value = args.next().ok_or("--n needs a value")?;
            global_n = Some(parse_n(&value)?);
        } else if let Some(value) = arg.strip_prefix("--n=") {
            global_n = Some(parse_n(value)?);
        } else if arg == "--tls" {
            tls = true;
        } else if arg == "-h" || arg == "--help" {
            return Err(String::new());
        } else {
            let (name, n) = match arg.split_once('=') {
                Some((name, n)) => (name.to_ascii_uppercase(), Some(parse_n(n)?)),
                None => (arg.to_ascii_uppercase(), None),
            };
            if default_n(&name).is_none() {
                return Err(format!("unknown workload {arg:?}"));
            }
            wanted.push((name, n));
        }
    }
    if wanted.is_empty() {
        wanted = WORKLOADS.iter().map(|w| (w.to_string(), None)).collect();
    }
    if tls {
        wanted = wanted
            .into_iter()
            .flat_map(|(name, n)| {
                let over_tls = (!name.ends_with('T')).then(|| (format!("{name}T"), n));
                std::iter::once((name, n)).chain(over_tls)
            })
            .collect();
    }
    Ok(wanted
        .into_iter()
        .map(|(name, n)| {
            let n = n.or(global_n).or(default_n(&name)).unwrap_or(1);
            (name, n)
        })
        .collect())
}

/// Runs the workload named in `PERFTEST_CHILD` and prints its lines.
#[allow(dead_code)] // main only
fn child_main(spec: &str, url: &str) -> ExitCode {
    let Some((name, n)) = spec
        .split_once(':')
        .and_then(|(name, n)| Some((name, n.parse::<u64>().ok()?)))
    else {
        eprintln!("perftest: bad {CHILD_ENV}={spec:?}");
        return ExitCode::from(2);
    };
    match run_workload(name, n, url) {
        Ok(report) => {
            println!("{}", report.result_line());
            println!("{}", report.cpu_split_line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("perftest: {name} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The peers' client CPU per message (µs) that the project measures
/// itself against, where there is one.
#[allow(dead_code)] // main only
fn peer_cpu_us(workload: &str) -> Option<f64> {
    match workload {
        // The peers' figures are for plain TCP.
        "P1" => Some(3.7),
        "P2" => Some(5.0),
        "C1" => Some(7.0),
        // amiquip 0.4, a blocking Rust client, with the same workloads.
        "BP1" => Some(3.7),
        "BP2W" => Some(4.6),
        "BC1" => Some(5.0),
        _ => None,
    }
}

#[allow(dead_code)] // main only
fn print_table(reports: &[Report]) {
    let opt = |v: Option<f64>, decimals: usize| match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_string(),
    };
    println!();
    println!(
        "{:<8} {:>7} {:>8} {:>9} {:>7} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "workload",
        "n",
        "wall s",
        "msgs/s",
        "MiB/s",
        "CPU µs/msg",
        "proc µs",
        "peers µs",
        "goal µs",
        "RSS MiB",
        "p50 µs",
        "p99 µs"
    );
    for r in reports {
        let peer = peer_cpu_us(&r.workload);
        println!(
            "{:<8} {:>7} {:>8.3} {:>9.0} {:>7} {:>10.3} {:>10.3} {:>9} {:>9} {:>8.1} {:>8} {:>8}",
            r.workload,
            r.n,
            r.wall_s,
            r.msgs_per_s,
            opt(r.mb_per_s, 1),
            r.cpu_us_per_msg,
            r.proc_cpu_us_per_msg,
            opt(peer, 1),
            opt(peer.map(|p| p / 3.0), 2),
            r.rss_mb,
            opt(r.p50_us, 1),
            opt(r.p99_us, 1),
        );
    }
}

/// The blocking face beside the callback face, from the same run: process
/// CPU per message of BP1, BP2W and BC1 over P1, P2 and C1, and BL1's p50
/// over L1's.
#[allow(dead_code)] // main only
fn print_face_comparison(reports: &[Report]) {
    let find = |name: &str| reports.iter().find(|r| r.workload == name);
    let pairs = [("BP1", "P1"), ("BP2W", "P2"), ("BC1", "C1")];
    let mut lines = Vec::new();
    for (blocking, select) in pairs {
        if let (Some(b), Some(s)) = (find(blocking), find(select)) {
            lines.push(format!(
                "{blocking}/{select} process CPU per message: {:.3} / {:.3} µs = {:.2}×",
                b.proc_cpu_us_per_msg,
                s.proc_cpu_us_per_msg,
                b.proc_cpu_us_per_msg / s.proc_cpu_us_per_msg.max(1e-9)
            ));
        }
    }
    if let (Some(b), Some(s)) = (find("BL1"), find("L1")) {
        if let (Some(bp), Some(sp)) = (b.p50_us, s.p50_us) {
            lines.push(format!(
                "BL1/L1 p50: {bp:.1} / {sp:.1} µs = {:.2}×",
                bp / sp.max(1e-9)
            ));
        }
    }
    if !lines.is_empty() {
        println!();
        println!("# the blocking face beside the callback face");
        for line in lines {
            println!("{line}");
        }
    }
}

#[allow(dead_code)] // the perftest smoke test calls `run_workload` instead
fn main() -> ExitCode {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child_main(&spec, &url);
    }
    let plan = match parse_args(std::env::args().skip(1), std::env::var("PERFTEST_N").ok()) {
        Ok(plan) => plan,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("perftest: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("perftest: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    match UrlParameters::parse(&url) {
        Ok(params) => println!("perftest against {params}, one process per workload"),
        Err(e) => {
            eprintln!("perftest: AMQP_URL: {e}");
            return ExitCode::from(2);
        }
    }
    let mut reports = Vec::new();
    let mut failed = false;
    for (name, n) in plan {
        let output = std::process::Command::new(&exe)
            .env(CHILD_ENV, format!("{name}:{n}"))
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output();
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                eprintln!("perftest: cannot run {name}: {e}");
                failed = true;
                continue;
            }
        };
        let text = String::from_utf8_lossy(&output.stdout);
        print!("{text}");
        match text.lines().find_map(Report::parse_result_line) {
            Some(report) if output.status.success() => reports.push(report),
            _ => {
                eprintln!("perftest: {name} failed ({})", output.status);
                failed = true;
            }
        }
    }
    print_table(&reports);
    print_face_comparison(&reports);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
