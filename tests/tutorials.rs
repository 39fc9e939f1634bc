//! Runs the RabbitMQ tutorial programs (`examples/tutorials/`) and the
//! reconnecting consumer (`examples/reconnecting_consumer.rs`) against the
//! broker, each as a child process, the way a user runs them: the receiving
//! side first, until it prints its "waiting" line, then the sending side;
//! then both outputs and exit codes are checked.
//!
//! The programs are the example binaries cargo builds next to this test's
//! `deps/` directory (`cargo test` builds them; `cargo test --test
//! tutorials` alone does not, so run `cargo build --examples` first).
//!
//! The programs use the tutorials' fixed names (`hello`, `task_queue`,
//! `logs`, …), so the tests here take turns (one lock), and delete the
//! queues and exchanges they use before and after. Every wait is bounded by
//! a liveness limit; a program still running at the end is killed.
//!
//! The last test keeps the measured programs short: each must stay within
//! twice the lines of its Python pika twin.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use pika::{BasicProperties, FieldTable, QueueDeclareOptions, SelectConnection};

/// The bound on every wait: generous, a liveness limit, not a timing.
const LIMIT: Duration = Duration::from_secs(60);

/// The tests share the tutorials' queue and exchange names: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// The example binaries, run as child processes
// ---------------------------------------------------------------------------

/// The newest modification time of `path`, a file or a directory tree.
fn newest_mtime(path: &Path) -> SystemTime {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let own = meta.modified().expect("file times");
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|entry| newest_mtime(&entry.expect("a directory entry").path()))
        .fold(own, SystemTime::max)
}

/// The path of the example binary `name`, built from `source` (relative
/// to the package). Fails when it is missing, or older than its source or
/// the libraries' (a stale binary would test old code): this test cannot
/// build it, as cargo holds the build directory while tests run.
fn example(name: &str, source: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps/");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let Ok(built) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
        panic!(
            "the example binary {} is missing: run `cargo build --examples` (with the same \
             CARGO_TARGET_DIR) before `cargo test --test tutorials`",
            path.display()
        );
    };
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [source, "src", "ioloop/src"]
        .into_iter()
        .map(|path| newest_mtime(&package.join(path)))
        .fold(SystemTime::UNIX_EPOCH, SystemTime::max);
    assert!(
        built >= sources,
        "the example binary {} is older than its sources: run `cargo build --examples` (with \
         the same CARGO_TARGET_DIR) before `cargo test --test tutorials`",
        path.display()
    );
    path
}

/// The path of a tutorial program's binary.
fn tutorial(name: &str) -> PathBuf {
    example(name, &format!("examples/tutorials/{name}.rs"))
}

/// What a program printed, and how it ended.
#[derive(Debug)]
struct Finished {
    name: String,
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Finished {
    /// Asserts that the program exited with 0, and returns its output.
    fn succeeded(self) -> Finished {
        assert!(self.status.success(), "{} failed: {self:#?}", self.name);
        self
    }

    /// The lines that start with `prefix`, with it cut off.
    fn lines_with(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .iter()
            .filter_map(|line| line.strip_prefix(prefix))
            .collect()
    }
}

/// A program running as a child process, its stdout read line by line. A
/// program still running when this is dropped (a test failed) is killed.
struct Program {
    name: String,
    child: Child,
    lines: Receiver<String>,
    stdout: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Program {
    /// Starts `binary` with `args`, with `AMQP_URL` the broker's.
    fn start(binary: PathBuf, args: &[&str]) -> Program {
        let name = format!(
            "{} {}",
            binary.file_name().unwrap_or_default().to_string_lossy(),
            args.join(" ")
        );
        let mut child = Command::new(&binary)
            .args(args)
            .env("AMQP_URL", common::amqp_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let stdout = child.stdout.take().expect("a stdout pipe");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().expect("a stderr pipe");
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Program {
            name,
            child,
            lines,
            stdout: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Reads stdout until `done` holds for the lines so far, within the
    /// limit.
    fn wait_for(&mut self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !done(&self.stdout) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.stdout.push(line),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{} did not print {what} within {LIMIT:?}; its stdout so far: {:#?}",
                    self.name, self.stdout
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let finished = self.finish();
                    panic!("{} ended before printing {what}: {finished:#?}", self.name);
                }
            }
        }
    }

    /// Waits until stdout has a line that starts with `prefix`.
    fn wait_for_line(&mut self, prefix: &str) {
        self.wait_for(&format!("a line {prefix:?}"), |lines| {
            lines.iter().any(|line| line.starts_with(prefix))
        });
    }

    /// Waits for the program to end (killing it if it runs past the
    /// limit), and returns what it printed.
    fn finish(&mut self) -> Finished {
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("the child's status") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.stdout.extend(self.lines.try_iter());
            panic!(
                "{} did not end within {LIMIT:?} and was killed; its stdout: {:#?}",
                self.name, self.stdout
            );
        };
        // The pipes close with the process: the readers finish.
        self.stdout.extend(self.lines.iter());
        let stderr = self
            .stderr
            .take()
            .map(|reader| reader.join().unwrap_or_default())
            .unwrap_or_default();
        Finished {
            name: self.name.clone(),
            status,
            stdout: std::mem::take(&mut self.stdout),
            stderr,
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a program to its end.
fn run(binary: PathBuf, args: &[&str]) -> Finished {
    Program::start(binary, args).finish()
}

// ---------------------------------------------------------------------------
// The broker's side
// ---------------------------------------------------------------------------

/// What went wrong on a connection of the test's own.
type Problems = Rc<RefCell<Vec<String>>>;

/// Runs a short-lived connection of the test's own: `on_channel` gets its
/// channel, and must close the connection when done (or record a problem
/// and close it). What went wrong comes back as `Err`, not as a panic: this
/// also runs while a failed test unwinds.
fn with_channel(on_channel: impl FnOnce(pika::Channel, Problems) + 'static) -> Result<(), String> {
    let problems = Problems::default();
    let (on_open_problems, on_error_problems) = (problems.clone(), problems.clone());
    let conn = SelectConnection::new(
        common::broker_params(),
        move |conn| {
            let channel_problems = on_open_problems.clone();
            let opened = conn.channel(None, move |ch| match ch {
                Ok(ch) => on_channel(ch, channel_problems),
                Err(e) => channel_problems
                    .borrow_mut()
                    .push(format!("no channel: {e}")),
            });
            if let Err(e) = opened {
                on_open_problems
                    .borrow_mut()
                    .push(format!("no channel: {e}"));
                let _ = conn.close(200, "no channel");
            }
        },
        move |conn, e| {
            on_error_problems
                .borrow_mut()
                .push(format!("cannot connect: {e}"));
            conn.ioloop().stop();
        },
        |conn, _| conn.ioloop().stop(),
    )
    .map_err(|e| format!("no connection: {e}"))?;
    let timed_out = Rc::new(Cell::new(false));
    let (flag, stopper) = (timed_out.clone(), conn.ioloop().clone());
    let watchdog = conn.ioloop().call_later(LIMIT, move || {
        flag.set(true);
        stopper.stop();
    });
    let ran = conn.ioloop().start();
    conn.ioloop().remove_timeout(watchdog);
    conn.ioloop().close();
    let mut problems = problems.take();
    if let Err(e) = ran {
        problems.push(format!("the loop failed: {e}"));
    }
    if timed_out.get() {
        problems.push(format!("not done within {LIMIT:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Closes the connection of `ch` (a no-op when it is closing already).
fn close_connection(ch: &pika::Channel) {
    if let Ok(conn) = ch.connection() {
        let _ = conn.close(200, "test done");
    }
}

/// A completion closure that records an error reply as a problem.
fn check<T>(
    problems: &Problems,
    what: String,
) -> impl FnOnce(&pika::Channel, Result<T, pika::Error>) + 'static {
    let problems = problems.clone();
    move |_, reply| {
        if let Err(e) = reply {
            problems.borrow_mut().push(format!("{what}: {e}"));
        }
    }
}

/// Deletes queues and exchanges (those that do not exist are fine).
fn delete(queues: &[&str], exchanges: &[&str]) -> Result<(), String> {
    let queues: Vec<String> = queues.iter().map(|q| q.to_string()).collect();
    let exchanges: Vec<String> = exchanges.iter().map(|x| x.to_string()).collect();
    with_channel(move |ch, problems| {
        let sent = queues
            .iter()
            .try_for_each(|queue| {
                let on_deleted = check(&problems, format!("queue {queue} not deleted"));
                ch.queue_delete(queue, Default::default(), on_deleted)
            })
            .and_then(|()| {
                exchanges.iter().try_for_each(|exchange| {
                    let on_deleted = check(&problems, format!("exchange {exchange} not deleted"));
                    ch.exchange_delete(exchange, false, on_deleted)
                })
            });
        if let Err(e) = sent {
            problems.borrow_mut().push(format!("cannot delete: {e}"));
        }
        // The connection closes its channel first, and the channel's close
        // waits for the deletes before it.
        close_connection(&ch);
    })
}

/// Deletes the queues and exchanges a test uses when made, and again when
/// dropped (after the test's programs, made later, are gone).
struct Cleanup {
    queues: &'static [&'static str],
    exchanges: &'static [&'static str],
}

impl Cleanup {
    fn new(queues: &'static [&'static str], exchanges: &'static [&'static str]) -> Cleanup {
        delete(queues, exchanges).unwrap_or_else(|e| panic!("cleaning up before the test: {e}"));
        Cleanup { queues, exchanges }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = delete(self.queues, self.exchanges) {
            if thread::panicking() {
                eprintln!("cleaning up after the failed test: {e}");
            } else {
                panic!("cleaning up after the test: {e}");
            }
        }
    }
}

/// Publishes `bodies` to the durable `task_queue` as persistent messages,
/// and returns once the broker has confirmed every one.
fn publish_tasks(bodies: Vec<String>) {
    let total = bodies.len();
    with_channel(move |ch, problems| {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let (acked, confirm_problems) = (Rc::new(Cell::new(0)), problems.clone());
        let on_confirm = move |ch: &pika::Channel, confirmation: pika::Confirmation| {
            if !confirmation.is_ack() {
                let problem = format!("not acked: {confirmation:?}");
                confirm_problems.borrow_mut().push(problem);
                return close_connection(ch);
            }
            acked.set(acked.get() + confirmation.settled().len());
            if acked.get() == total {
                close_connection(ch);
            }
        };
        let published = ch
            .queue_declare_nowait("task_queue", durable, FieldTable::new())
            .and_then(|()| ch.confirm_delivery(on_confirm, |_, _| ()))
            .and_then(|()| {
                bodies.iter().try_for_each(|body| {
                    ch.basic_publish(
                        "",
                        "task_queue",
                        body,
                        &BasicProperties::persistent(),
                        false,
                    )
                    .map(drop)
                })
            });
        if let Err(e) = published {
            problems.borrow_mut().push(format!("cannot publish: {e}"));
            close_connection(&ch);
        }
    })
    .unwrap_or_else(|e| panic!("publishing to task_queue: {e}"));
}

/// The number of messages in `queue` (ready and unacknowledged), from
/// `rabbitmqctl`.
fn queue_depth(queue: &str) -> Option<u64> {
    let listing = common::rabbitmqctl(&["-q", "list_queues", "name", "messages"]);
    listing.lines().find_map(|line| {
        let (name, messages) = line.split_once('\t')?;
        (name.trim() == queue).then(|| messages.trim().parse().ok())?
    })
}

/// Has the broker close the connection whose `connection_name` is `name`,
/// as `rabbitmqctl close_connection` does.
fn broker_closes_connection(name: &str) {
    let deadline = Instant::now() + LIMIT;
    let pid = loop {
        let listing = common::rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]);
        let found = listing.lines().find_map(|line| {
            let (pid, properties) = line.split_once('\t')?;
            properties.contains(name).then(|| pid.trim().to_string())
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no connection named {name} in {listing}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    common::rabbitmqctl(&["close_connection", &pid, "the tutorials test closes it"]);
}

// ---------------------------------------------------------------------------
// The tutorials
// ---------------------------------------------------------------------------

const WAITING_FOR_LOGS: &str = " [*] Waiting for logs. To exit press CTRL+C";

#[test]
fn tutorial_1_hello_world_the_receiver_gets_what_the_sender_sends() {
    let _serial = serial();
    let _cleanup = Cleanup::new(&["hello"], &[]);
    let mut receiver = Program::start(tutorial("select_1_hello_world_receive"), &["2"]);
    receiver.wait_for_line(" [*] Waiting for messages");
    for _ in 0..2 {
        let sent = run(tutorial("select_1_hello_world_send"), &[]).succeeded();
        assert_eq!(sent.stdout, [" [x] Sent 'Hello World!'"], "{sent:#?}");
    }
    let received = receiver.finish().succeeded();
    assert_eq!(
        received.stdout,
        [
            " [*] Waiting for messages. To exit press CTRL+C",
            " [x] Received Hello World!",
            " [x] Received Hello World!",
        ],
        "{received:#?}"
    );
}

#[test]
fn tutorial_2_work_queues_two_workers_share_the_thousand_tasks() {
    let _serial = serial();
    let _cleanup = Cleanup::new(&["task_queue"], &[]);
    let worker = || Program::start(tutorial("select_2_work_queues_worker"), &["500"]);
    let mut workers = [worker(), worker()];
    for worker in &mut workers {
        worker.wait_for_line(" [*] Waiting for messages");
    }
    let producer = run(tutorial("select_2_work_queues_new_task"), &[]).succeeded();
    assert_eq!(
        producer.stdout,
        [" [x] Sent 1000 messages", " [x] acked 1000, nacked 0"],
        "{producer:#?}"
    );
    let mut processed = 0;
    let mut received = HashSet::new();
    for worker in &mut workers {
        let worker = worker.finish().succeeded();
        assert_eq!(
            worker.stdout.last().map(String::as_str),
            Some(" [x] processed 500 messages"),
            "{worker:#?}"
        );
        processed += 500;
        received.extend(
            worker
                .lines_with(" [x] Received ")
                .into_iter()
                .map(str::to_string),
        );
    }
    assert_eq!(processed, 1000);
    // Every task reached a worker (one may have reached both: a worker
    // that stops hands its prefetched, unacked message back).
    let tasks: HashSet<String> = (0..1000)
        .map(|i| format!("Hello {i}{}", ".".repeat(i % 5)))
        .collect();
    assert_eq!(received, tasks);
}

#[test]
fn tutorial_3_publish_subscribe_every_receiver_gets_every_log() {
    let _serial = serial();
    let _cleanup = Cleanup::new(&[], &["logs"]);
    let receiver = || Program::start(tutorial("select_3_publish_subscribe_receive_logs"), &["2"]);
    let mut receivers = [receiver(), receiver()];
    for receiver in &mut receivers {
        receiver.wait_for_line(WAITING_FOR_LOGS);
    }
    let emit = tutorial("select_3_publish_subscribe_emit_log");
    let first = run(emit.clone(), &[]).succeeded();
    assert_eq!(first.stdout, [" [x] Sent info: Hello World!"], "{first:#?}");
    let second = run(emit, &["warning:", "disk", "almost", "full"]).succeeded();
    assert_eq!(
        second.stdout,
        [" [x] Sent warning: disk almost full"],
        "{second:#?}"
    );
    for receiver in &mut receivers {
        let received = receiver.finish().succeeded();
        assert_eq!(
            received.stdout,
            [
                WAITING_FOR_LOGS,
                " [x] info: Hello World!",
                " [x] warning: disk almost full"
            ],
            "{received:#?}"
        );
    }
}

#[test]
fn tutorial_4_routing_each_receiver_gets_the_severities_it_bound() {
    let _serial = serial();
    let _cleanup = Cleanup::new(&[], &["direct_logs"]);
    let receive = tutorial("select_4_routing_receive_logs_direct");
    let mut errors_only = Program::start(receive.clone(), &["1", "error"]);
    let mut everything = Program::start(receive, &["3", "info", "warning", "error"]);
    errors_only.wait_for_line(WAITING_FOR_LOGS);
    everything.wait_for_line(WAITING_FOR_LOGS);
    let emit = tutorial("select_4_routing_emit_log_direct");
    // The error goes last: a receiver that got another severity first
    // would print it, and stop before the error.
    for (args, printed) in [
        (
            &["info", "Starting", "up"][..],
            " [x] Sent info:Starting up",
        ),
        (
            &["warning", "Disk", "almost", "full"],
            " [x] Sent warning:Disk almost full",
        ),
        (
            &["error", "Run.", "Run.", "Or", "it", "will", "explode."],
            " [x] Sent error:Run. Run. Or it will explode.",
        ),
    ] {
        let sent = run(emit.clone(), args).succeeded();
        assert_eq!(sent.stdout, [printed], "{sent:#?}");
    }
    let errors = errors_only.finish().succeeded();
    assert_eq!(
        errors.stdout,
        [WAITING_FOR_LOGS, " [x] error:Run. Run. Or it will explode."],
        "{errors:#?}"
    );
    let all = everything.finish().succeeded();
    assert_eq!(
        all.stdout,
        [
            WAITING_FOR_LOGS,
            " [x] info:Starting up",
            " [x] warning:Disk almost full",
            " [x] error:Run. Run. Or it will explode.",
        ],
        "{all:#?}"
    );
    // Without a severity the receiver says how to use it.
    let usage = run(tutorial("select_4_routing_receive_logs_direct"), &[]);
    assert_eq!(usage.status.code(), Some(1), "{usage:#?}");
    assert!(usage.stderr.starts_with("Usage: "), "{usage:#?}");
}

#[test]
fn tutorial_5_topics_each_receiver_gets_the_keys_its_patterns_match() {
    let _serial = serial();
    let _cleanup = Cleanup::new(&[], &["topic_logs"]);
    let receive = tutorial("select_5_topics_receive_logs_topic");
    let mut critical = Program::start(receive.clone(), &["2", "*.critical"]);
    let mut kernel = Program::start(receive.clone(), &["3", "kern.#"]);
    let mut both = Program::start(receive, &["3", "kern.*", "*.critical"]);
    for receiver in [&mut critical, &mut kernel, &mut both] {
        receiver.wait_for_line(WAITING_FOR_LOGS);
    }
    // Each receiver stops after the messages it should get, so one that
    // got another would print it and miss a later one.
    let emit = tutorial("select_5_topics_emit_log_topic");
    for key in [
        "anonymous.info",
        "kern.disk.failure",
        "kern.info",
        "cron.critical",
        "kern.critical",
    ] {
        let message = format!("a {key} message");
        let sent = run(emit.clone(), &[key, &message]).succeeded();
        assert_eq!(
            sent.stdout,
            [format!(" [x] Sent {key}:{message}")],
            "{sent:#?}"
        );
    }
    let expect = |receiver: &mut Program, keys: &[&str]| {
        let received = receiver.finish().succeeded();
        let mut expected = vec![WAITING_FOR_LOGS.to_string()];
        expected.extend(keys.iter().map(|key| format!(" [x] {key}:a {key} message")));
        assert_eq!(received.stdout, expected, "{received:#?}");
    };
    expect(&mut critical, &["cron.critical", "kern.critical"]);
    expect(
        &mut kernel,
        &["kern.disk.failure", "kern.info", "kern.critical"],
    );
    expect(&mut both, &["kern.info", "cron.critical", "kern.critical"]);
}

#[test]
fn tutorial_6_rpc_the_client_gets_a_hundred_fibonacci_numbers() {
    let _serial = serial();
    let _cleanup = Cleanup::new(&["rpc_queue"], &[]);
    let mut server = Program::start(tutorial("select_6_rpc_server"), &["100"]);
    server.wait_for_line(" [x] Awaiting RPC requests");
    let client = run(tutorial("select_6_rpc_client"), &[]).succeeded();
    let fib = |n: u32| (0..n).fold((0u128, 1u128), |(a, b), _| (b, a + b)).0;
    let mut expected: Vec<String> = (0..100)
        .map(|n| format!(" [.] fib({n}) = {}", fib(n)))
        .collect();
    expected.push(" [x] 100 results, 0 missing".into());
    assert_eq!(client.stdout, expected, "{client:#?}");
    assert_eq!(fib(10), 55); // the test's own arithmetic
    // One request at a time, in the order the client sent them.
    let served = server.finish().succeeded();
    let mut requests = vec![" [x] Awaiting RPC requests".to_string()];
    requests.extend((0..100).map(|n| format!(" [.] fib({n})")));
    assert_eq!(served.stdout, requests, "{served:#?}");
}

// ---------------------------------------------------------------------------
// The reconnecting consumer
// ---------------------------------------------------------------------------

#[test]
fn reconnecting_consumer_survives_close_connection_and_gets_every_message() {
    let _serial = serial();
    let _cleanup = Cleanup::new(&["task_queue"], &[]);
    const TARGET: usize = 200;
    let name = format!("tutorials-test-consumer-{}", std::process::id());
    let binary = example("reconnecting_consumer", "examples/reconnecting_consumer.rs");
    let mut consumer = Program::start(binary, &[&TARGET.to_string(), &name]);
    consumer.wait_for_line("[app] consuming as ");
    // Half the messages before the broker closes the connection, half
    // after, so the close always lands before the consumer is done.
    let bodies: Vec<String> = (0..TARGET).map(|i| format!("task {i}")).collect();
    let (before, after) = bodies.split_at(TARGET / 2);
    publish_tasks(before.to_vec());
    let deadline = Instant::now() + LIMIT;
    while queue_depth("task_queue").is_none_or(|depth| depth >= before.len() as u64) {
        assert!(
            Instant::now() < deadline,
            "the consumer acked nothing within {LIMIT:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    broker_closes_connection(&name);
    consumer.wait_for("a second connection consuming", |lines| {
        lines
            .iter()
            .filter(|line| line.starts_with("[app] consuming as "))
            .count()
            >= 2
    });
    publish_tasks(after.to_vec());
    let finished = consumer.finish().succeeded();
    assert!(
        finished
            .stdout
            .iter()
            .any(|line| line.starts_with("[app] connection closed:")
                && line.contains("CONNECTION_FORCED")
                && line.contains("the tutorials test closes it")),
        "{finished:#?}"
    );
    let done = finished.lines_with("[app] done: ");
    let [summary] = done.as_slice() else {
        panic!("no summary line: {finished:#?}");
    };
    let numbers: Vec<usize> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let [connections, acks, distinct] = numbers[..] else {
        panic!("a summary of three numbers: {summary:?}");
    };
    assert!(connections >= 2, "{finished:#?}");
    assert_eq!(distinct, TARGET, "{finished:#?}");
    assert!(acks >= TARGET, "{finished:#?}");
}

// ---------------------------------------------------------------------------
// Size
// ---------------------------------------------------------------------------

/// Non-blank lines that are not only a comment.
fn code_lines(text: &str) -> usize {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("//"))
        .count()
}

#[test]
fn the_measured_programs_stay_within_twice_their_pika_twins() {
    // The Python pika 1.1 twins' lines, counted the same way (non-blank,
    // not only a `#` comment).
    let measured = [
        (
            "examples/tutorials/select_2_work_queues_worker.rs",
            "worker.py",
            31,
        ),
        (
            "examples/tutorials/select_2_work_queues_new_task.rs",
            "new_task.py",
            28,
        ),
        (
            "examples/tutorials/select_6_rpc_server.rs",
            "rpc_server.py",
            24,
        ),
        (
            "examples/tutorials/select_6_rpc_client.rs",
            "rpc_client.py",
            27,
        ),
        (
            "examples/reconnecting_consumer.rs",
            "reconnecting_consumer.py",
            51,
        ),
    ];
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut over = Vec::new();
    println!(
        "{:<52} {:<25} {:>4} {:>4} {:>5}",
        "program", "twin", "", "ours", "ratio"
    );
    for (path, twin, twin_lines) in measured {
        let text =
            std::fs::read_to_string(package.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let ours = code_lines(&text);
        let ratio = ours as f64 / twin_lines as f64;
        println!("{path:<52} {twin:<25} {twin_lines:>4} {ours:>4} {ratio:>5.2}");
        if ours > 2 * twin_lines {
            over.push(format!("{path}: {ours} lines, over 2 x {twin_lines}"));
        }
    }
    assert!(over.is_empty(), "programs over their budget: {over:#?}");
}
