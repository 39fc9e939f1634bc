//! Runs the blocking examples (`examples/blocking/`, the seed's 2.3
//! examples) and the blocking RabbitMQ tutorials (`examples/tutorials/`)
//! against the broker, each as a child process, and checks what they print
//! and how they exit.
//!
//! The binaries are the ones cargo builds into the target directory's
//! `examples/` folder (`cargo test` builds them; `cargo test --test
//! blocking_examples` alone does not: run `cargo build --examples` first).
//! The programs use fixed names (`test`, `hello`, `task_queue`, `logs`, …),
//! so the tests here run one at a time (a static mutex) and delete what
//! they use before and after. Every wait is bounded (a liveness bound, not
//! a timing assertion); a program that overruns its bound is killed.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use pika::{
    BasicConsumeOptions, BasicProperties, BlockingChannel, BlockingConnection, Error,
    ExchangeDeclareOptions, FieldTable, QueueDeclareOptions, QueueDeleteOptions, UrlParameters,
};

/// How long a program may take to print an awaited line.
const LINE_BOUND: Duration = Duration::from_secs(30);
/// How long a program may take to finish once it has what it needs.
const EXIT_BOUND: Duration = Duration::from_secs(60);

/// The tests share queue and exchange names: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// The example binaries
// ---------------------------------------------------------------------------

/// The source of an example registered in Cargo.toml.
fn example_source(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["examples/blocking", "examples/tutorials"]
        .iter()
        .map(|dir| root.join(dir).join(format!("{name}.rs")))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no source for example {name}"))
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
}

/// The newest modification time of the `.rs` files under `dir`.
fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            modified(&path)
        } else {
            continue;
        };
        newest = newest.max(time);
    }
    newest
}

/// The built example `name`, next to this test binary's `deps/` folder.
/// Fails when it is missing, or older than its source or the library's.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in <target>/<profile>/deps/");
    let path = target
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "example binary {} not found: run `cargo build --examples` first (a plain `cargo test` \
         builds them; `cargo test --test blocking_examples` does not)",
        path.display()
    );
    let built = modified(&path);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [
        modified(&example_source(name)),
        newest_source(&root.join("src")),
        newest_source(&root.join("ioloop/src")),
    ];
    assert!(
        sources.iter().all(|s| *s <= built),
        "example binary {} is older than its sources: run `cargo build --examples` first",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------
// Running them
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Output {
    stdout: Vec<String>,
    stderr: String,
    stdout_closed: bool,
}

/// A running example: its output is collected by two reader threads.
struct Program {
    name: String,
    child: Child,
    output: Arc<(Mutex<Output>, Condvar)>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// A finished example.
#[derive(Debug)]
struct Finished {
    name: String,
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Program {
    /// Starts example `name` with `args`, `AMQP_URL` from the environment,
    /// and `env` on top.
    fn start_with(name: &str, args: &[&str], env: &[(&str, String)]) -> Program {
        let mut command = Command::new(example_binary(name));
        command
            .args(args)
            .env("AMQP_URL", common::amqp_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start example {name}: {e}"));
        let output: Arc<(Mutex<Output>, Condvar)> = Arc::default();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out = output.clone();
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                out.0.lock().unwrap().stdout.push(line);
                out.1.notify_all();
            }
            out.0.lock().unwrap().stdout_closed = true;
            out.1.notify_all();
        });
        let err = output.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            err.0.lock().unwrap().stderr = text;
        });
        Program {
            name: name.to_string(),
            child,
            output,
            readers: vec![stdout_reader, stderr_reader],
        }
    }

    fn start(name: &str, args: &[&str]) -> Program {
        Program::start_with(name, args, &[])
    }

    /// Waits until the program has printed `n` lines containing `text`;
    /// returns the last of them.
    fn wait_for_nth(&self, text: &str, n: usize) -> String {
        let deadline = Instant::now() + LINE_BOUND;
        let (lock, cv) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            let found: Vec<&String> = out.stdout.iter().filter(|l| l.contains(text)).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            let now = Instant::now();
            assert!(
                !out.stdout_closed,
                "{} ended its output without printing {text:?} {n} time(s); stdout:\n{}",
                self.name,
                out.stdout.join("\n")
            );
            assert!(
                now < deadline,
                "{} did not print {text:?} {n} time(s) within {LINE_BOUND:?}; stdout so far:\n{}",
                self.name,
                out.stdout.join("\n")
            );
            out = cv.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// Waits until the program has printed a line containing `text`.
    fn wait_for(&self, text: &str) -> String {
        self.wait_for_nth(text, 1)
    }

    /// Waits for the program to exit (killing it after [`EXIT_BOUND`]) and
    /// returns what it printed.
    fn finish(mut self) -> Finished {
        let deadline = Instant::now() + EXIT_BOUND;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                let out = self.output.0.lock().unwrap();
                panic!(
                    "{} did not exit within {EXIT_BOUND:?} and was killed; stdout:\n{}\nstderr:\n{}",
                    self.name,
                    out.stdout.join("\n"),
                    out.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipes close with the process (these programs start no
        // children of their own).
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let mut out = self.output.0.lock().unwrap();
        Finished {
            name: self.name.clone(),
            status,
            stdout: std::mem::take(&mut out.stdout),
            stderr: std::mem::take(&mut out.stderr),
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // A test that failed half-way: the program goes too.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Finished {
    fn describe(&self) -> String {
        format!(
            "{} exited with {}; stdout:\n{}\nstderr:\n{}",
            self.name,
            self.status,
            self.stdout.join("\n"),
            self.stderr
        )
    }

    /// Asserts a zero exit status; returns self for more checks.
    fn success(self) -> Finished {
        assert!(self.status.success(), "{}", self.describe());
        self
    }

    /// The lines containing `text`.
    fn lines_with(&self, text: &str) -> Vec<&str> {
        self.stdout
            .iter()
            .filter(|l| l.contains(text))
            .map(String::as_str)
            .collect()
    }

    fn has_line(&self, line: &str) -> bool {
        self.stdout.iter().any(|l| l == line)
    }

    fn assert_line(&self, line: &str) {
        assert!(self.has_line(line), "no line {line:?}: {}", self.describe());
    }

    fn assert_no_line_with(&self, text: &str) {
        assert!(
            self.lines_with(text).is_empty(),
            "a line with {text:?}: {}",
            self.describe()
        );
    }
}

/// Runs an example to its end.
fn run(name: &str, args: &[&str]) -> Finished {
    Program::start(name, args).finish()
}

// ---------------------------------------------------------------------------
// The broker side of the tests
// ---------------------------------------------------------------------------

fn connect() -> BlockingConnection {
    let params = UrlParameters::parse(&common::amqp_url()).expect("AMQP_URL parses");
    BlockingConnection::new(params).unwrap_or_else(|e| panic!("cannot connect to AMQP_URL: {e}"))
}

/// Runs `f` on a channel of a fresh connection, closed afterwards.
fn with_channel<T>(f: impl FnOnce(&BlockingChannel) -> Result<T, Error>) -> Result<T, Error> {
    let connection = connect();
    let channel = connection.channel(None)?;
    let result = f(&channel);
    let _ = connection.close(200, "test done");
    result
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn declare_queue(queue: &str, options: QueueDeclareOptions) {
    with_channel(|ch| ch.queue_declare(queue, options, FieldTable::new()))
        .unwrap_or_else(|e| panic!("cannot declare {queue}: {e}"));
}

/// Publishes `bodies` (confirmed, mandatory: each is in a queue when this
/// returns).
fn publish(exchange: &str, routing_key: &str, bodies: &[&str]) {
    with_channel(|ch| {
        ch.confirm_delivery()?;
        for body in bodies {
            ch.basic_publish(
                exchange,
                routing_key,
                body,
                &BasicProperties::default(),
                true,
            )?;
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("cannot publish to {exchange:?}/{routing_key:?}: {e}"));
}

/// The number of ready messages in `queue`.
fn message_count(queue: &str) -> u32 {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    with_channel(|ch| ch.queue_declare(queue, passive, FieldTable::new()))
        .unwrap_or_else(|e| panic!("cannot look at {queue}: {e}"))
        .message_count
}

/// Waits (bounded) until `queue` holds `expected` ready messages.
fn wait_message_count(queue: &str, expected: u32) {
    let deadline = Instant::now() + LINE_BOUND;
    loop {
        let count = message_count(queue);
        if count == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue} holds {count} messages, not {expected}, after {LINE_BOUND:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deletes the queues and exchanges a test uses, now and when dropped.
struct Names {
    queues: &'static [&'static str],
    exchanges: &'static [&'static str],
}

impl Names {
    fn clean(queues: &'static [&'static str], exchanges: &'static [&'static str]) -> Names {
        let names = Names { queues, exchanges };
        if let Err(e) = names.delete() {
            panic!("cannot clean up before the test: {e}");
        }
        names
    }

    fn delete(&self) -> Result<(), Error> {
        with_channel(|ch| {
            for queue in self.queues {
                ch.queue_delete(queue, QueueDeleteOptions::default())?;
            }
            for exchange in self.exchanges {
                ch.exchange_delete(exchange, false)?;
            }
            Ok(())
        })
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            if !std::thread::panicking() {
                panic!("cannot clean up after the test: {e}");
            }
        }
    }
}

/// Closes every connection to the broker (RabbitMQ's 320
/// CONNECTION_FORCED).
fn close_all_connections(reason: &str) {
    common::rabbitmqctl(&["close_all_connections", "--global", reason]);
}

// ---------------------------------------------------------------------------
// Task 1: the seed's blocking examples
// ---------------------------------------------------------------------------

#[test]
fn basic_get_acks_the_message_then_finds_none() {
    let _serial = serial();
    let _names = Names::clean(&["test"], &[]);
    declare_queue("test", durable());
    publish("", "test", &["a message for basic_get"]);

    let got = run("blocking_basic_get", &[]).success();
    got.assert_line("a message for basic_get");
    got.assert_line("acked delivery 1");
    assert_eq!(got.lines_with("Basic.GetOk").len(), 1, "{}", got.describe());
    wait_message_count("test", 0);

    let empty = run("blocking_basic_get", &[]).success();
    empty.assert_line("No message returned");
}

#[test]
fn consume_stops_after_count_messages() {
    let _serial = serial();
    let _names = Names::clean(&["test"], &[]);
    declare_queue("test", durable());

    let consumer = Program::start("blocking_consume", &["3"]);
    consumer.wait_for("Waiting for messages on queue test");
    publish("", "test", &["consume one", "consume two", "consume three"]);
    let out = consumer.finish().success();
    for body in ["consume one", "consume two", "consume three"] {
        out.assert_line(body);
    }
    out.assert_line("received 3 messages, stopping");
    // Each was acked.
    wait_message_count("test", 0);
}

#[test]
fn consume_stops_on_its_timer() {
    let _serial = serial();
    let _names = Names::clean(&["test"], &[]);
    declare_queue("test", durable());
    publish("", "test", &["before the timer"]);

    let out = run("blocking_consume", &["100", "1"]).success();
    out.assert_line("1 s are up, stopping");
    // Consumed and acked, or (had the timer come first) back in the queue.
    let consumed = out.has_line("before the timer");
    wait_message_count("test", if consumed { 0 } else { 1 });
}

#[test]
fn recovery_falls_back_to_the_second_host_and_reconnects_after_a_forced_close() {
    let _serial = serial();
    let _names = Names::clean(&["recovery-example"], &[]);
    let port = UrlParameters::parse(&common::amqp_url()).unwrap().port();

    let consumer = Program::start("blocking_recovery", &["2"]);
    let connected = consumer.wait_for("Connected to ");
    assert!(
        connected.ends_with(&format!(":{port}")),
        "{connected:?} is not the broker of AMQP_URL (port {port})"
    );
    consumer.wait_for("Consuming from recovery-example");
    publish("", "recovery-example", &["before the forced close"]);
    consumer.wait_for("before the forced close");

    close_all_connections("the recovery test closes it");
    consumer.wait_for("Connection was closed by the broker (320");
    let reconnected = consumer.wait_for_nth("Connected to ", 2);
    assert!(
        reconnected.ends_with(&format!(":{port}")),
        "{reconnected:?}"
    );
    consumer.wait_for_nth("Consuming from recovery-example", 2);
    publish("", "recovery-example", &["after the forced close"]);

    let out = consumer.finish().success();
    out.assert_line("after the forced close");
    out.assert_line("Received 2 messages, done");
    assert_eq!(
        out.lines_with("Connecting...").len(),
        2,
        "{}",
        out.describe()
    );
}

#[test]
fn recovery_does_not_retry_on_a_channel_error() {
    let _serial = serial();
    let _names = Names::clean(&["recovery-example"], &[]);
    // A queue of that name with other options: the example's declare gets
    // 406 PRECONDITION_FAILED, a channel error.
    declare_queue("recovery-example", durable());

    let out = run("blocking_recovery", &["1"]);
    assert!(!out.status.success(), "{}", out.describe());
    let caught = out.lines_with("Caught a channel error");
    assert_eq!(caught.len(), 1, "{}", out.describe());
    assert!(caught[0].contains("406"), "{}", out.describe());
    assert_eq!(
        out.lines_with("Connecting...").len(),
        1,
        "{}",
        out.describe()
    );
}

#[test]
fn consume_generator_breaks_at_tag_count_and_cancel_requeues_the_rest() {
    let _serial = serial();
    let _names = Names::clean(&["test"], &[]);
    declare_queue("test", durable());
    let bodies: Vec<String> = (1..=15).map(|i| format!("generator {i}")).collect();
    let bodies: Vec<&str> = bodies.iter().map(String::as_str).collect();
    publish("", "test", &bodies);

    let out = run("blocking_consume_generator", &["10"]).success();
    for body in &bodies[..10] {
        out.assert_line(body);
    }
    for body in &bodies[10..] {
        assert!(
            !out.has_line(body),
            "{body} was handled: {}",
            out.describe()
        );
    }
    let requeued = out.lines_with("Requeued ");
    assert_eq!(requeued.len(), 1, "{}", out.describe());
    let n: u32 = requeued[0]
        .trim_start_matches("Requeued ")
        .trim_end_matches(" messages")
        .parse()
        .unwrap_or_else(|_| panic!("not a count: {:?}", requeued[0]));
    // What the consumer had buffered of the other five; the broker has all
    // five again once the channel is closed.
    assert!(n <= 5, "{}", out.describe());
    wait_message_count("test", 5);
}

#[test]
fn publish_compare_publishes_with_both_faces() {
    let _serial = serial();
    let _names = Names::clean(&["publish-compare"], &["test_exchange"]);
    with_channel(|ch| {
        let durable_direct = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare("test_exchange", durable_direct, FieldTable::new())?;
        ch.queue_declare(
            "publish-compare",
            QueueDeclareOptions::default(),
            FieldTable::new(),
        )?;
        ch.queue_bind(
            "publish-compare",
            "test_exchange",
            Some("test_routing_key"),
            FieldTable::new(),
        )
    })
    .expect("the compare queue is bound");

    let out = run("blocking_publish_compare", &["50"]).success();
    assert_eq!(
        out.lines_with("BlockingConnection: published 50 messages in ")
            .len(),
        1,
        "{}",
        out.describe()
    );
    assert_eq!(
        out.lines_with("SelectConnection: published 50 messages in ")
            .len(),
        1,
        "{}",
        out.describe()
    );
    wait_message_count("publish-compare", 100);
}

#[test]
fn delivery_confirmations_reports_the_acks() {
    let _serial = serial();
    let _names = Names::clean(&["test"], &["test"]);

    let out = run("blocking_delivery_confirmations", &["25"]).success();
    out.assert_line("Message publish was confirmed");
    out.assert_line("25 more messages published: 25 acked, 0 nacked");
    wait_message_count("test", 26);
}

#[test]
fn mandatory_reports_the_unroutable_message() {
    let _serial = serial();
    let _names = Names::clean(&["test"], &["test"]);

    let out = run("blocking_mandatory", &["no-queue-here"]).success();
    out.assert_line("Message was published (routing key test)");
    out.assert_line("Message was returned (routing key no-queue-here): 312 NO_ROUTE");
    wait_message_count("test", 1);
}

/// The TLS settings `scripts/with-broker` exports.
fn tls_env() -> Vec<(&'static str, String)> {
    [
        "AMQPS_URL",
        "AMQP_TLS_CA",
        "AMQP_TLS_CLIENT_CERT",
        "AMQP_TLS_CLIENT_KEY",
    ]
    .into_iter()
    .map(|name| {
        let value = std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: run the tests through `scripts/with-broker`, whose \
                     private broker has a TLS listener, or set AMQPS_URL and AMQP_TLS_CA, \
                     AMQP_TLS_CLIENT_CERT, AMQP_TLS_CLIENT_KEY for yours"
            )
        });
        (name, value)
    })
    .collect()
}

#[test]
fn tls_example_gets_its_message_back_over_mutual_tls() {
    let _serial = serial();
    let env = tls_env();
    let _names = Names::clean(&["foobar"], &[]);

    let out = Program::start_with("blocking_tls", &[], &env)
        .finish()
        .success();
    out.assert_line("Hello, world!");
    assert_eq!(out.lines_with("Basic.GetOk").len(), 1, "{}", out.describe());
    // auto_ack: nothing left behind.
    wait_message_count("foobar", 0);
}

#[test]
fn threaded_consumer_acks_from_worker_threads() {
    let _serial = serial();
    let _names = Names::clean(&["standard"], &["test_exchange"]);

    let out = run("blocking_consumer_threaded", &["5", "0.2"]).success();
    let acked: BTreeSet<&str> = out
        .lines_with("acked delivery ")
        .into_iter()
        .map(|l| l.trim_start_matches("acked delivery "))
        .collect();
    assert_eq!(
        acked,
        BTreeSet::from(["1", "2", "3", "4", "5"]),
        "{}",
        out.describe()
    );
    out.assert_line("5 messages acked, done");
    assert!(out.stderr.is_empty(), "{}", out.describe());
}

// ---------------------------------------------------------------------------
// Task 2: the RabbitMQ tutorials
// ---------------------------------------------------------------------------

#[test]
fn tutorial_1_hello_world() {
    let _serial = serial();
    let _names = Names::clean(&["hello"], &[]);

    let receiver = Program::start("blocking_1_hello_world_receive", &["2"]);
    receiver.wait_for(" [*] Waiting for messages. To exit press CTRL+C");
    for _ in 0..2 {
        run("blocking_1_hello_world_send", &[])
            .success()
            .assert_line(" [x] Sent 'Hello World!'");
    }
    let out = receiver.finish().success();
    assert_eq!(
        out.lines_with(" [x] Received Hello World!").len(),
        2,
        "{}",
        out.describe()
    );
}

#[test]
fn tutorial_2_work_queues() {
    let _serial = serial();
    let _names = Names::clean(&["task_queue"], &[]);

    // A task is a persistent message in the durable queue.
    run("blocking_2_work_queues_new_task", &["a", "probe"])
        .success()
        .assert_line(" [x] Sent a probe");
    let probe = with_channel(|ch| ch.basic_get("task_queue", true))
        .expect("basic_get")
        .expect("the task is in task_queue");
    assert_eq!(probe.body, b"a probe");
    assert_eq!(probe.properties.delivery_mode, Some(2));

    let workers = [
        Program::start("blocking_2_work_queues_worker", &["2"]),
        Program::start("blocking_2_work_queues_worker", &["2"]),
    ];
    for worker in &workers {
        worker.wait_for(" [*] Waiting for messages. To exit press CTRL+C");
    }
    let tasks = ["First task.", "Second task", "Third task.", "Fourth task"];
    for task in tasks {
        run("blocking_2_work_queues_new_task", &[task])
            .success()
            .assert_line(&format!(" [x] Sent {task}"));
    }
    let [a, b] = workers.map(Program::finish);
    let mut received = Vec::new();
    for out in [a.success(), b.success()] {
        let mine = out.lines_with(" [x] Received ");
        assert_eq!(mine.len(), 2, "{}", out.describe());
        assert_eq!(out.lines_with(" [x] Done").len(), 2, "{}", out.describe());
        received.extend(
            mine.iter()
                .map(|l| l.trim_start_matches(" [x] Received ").to_string()),
        );
    }
    received.sort();
    let mut expected: Vec<String> = tasks.iter().map(|t| t.to_string()).collect();
    expected.sort();
    assert_eq!(received, expected, "each task done once");
    wait_message_count("task_queue", 0);
}

#[test]
fn tutorial_3_publish_subscribe() {
    let _serial = serial();
    let _names = Names::clean(&[], &["logs"]);

    let receivers = [
        Program::start("blocking_3_publish_subscribe_receive_logs", &["1"]),
        Program::start("blocking_3_publish_subscribe_receive_logs", &["1"]),
    ];
    for receiver in &receivers {
        receiver.wait_for(" [*] Waiting for logs. To exit press CTRL+C");
    }
    run(
        "blocking_3_publish_subscribe_emit_log",
        &["info:", "fanned", "out"],
    )
    .success()
    .assert_line(" [x] Sent info: fanned out");
    for out in receivers.map(Program::finish) {
        out.success().assert_line(" [x] info: fanned out");
    }
}

#[test]
fn tutorial_4_routing() {
    let _serial = serial();
    let _names = Names::clean(&[], &["direct_logs"]);

    let problems = Program::start(
        "blocking_4_routing_receive_logs_direct",
        &["--count", "2", "warning", "error"],
    );
    let everything = Program::start(
        "blocking_4_routing_receive_logs_direct",
        &["--count", "3", "info", "warning", "error"],
    );
    problems.wait_for(" [*] Waiting for logs");
    everything.wait_for(" [*] Waiting for logs");
    for (severity, message) in [
        ("info", "routine"),
        ("warning", "careful"),
        ("error", "broken"),
    ] {
        run("blocking_4_routing_emit_log_direct", &[severity, message])
            .success()
            .assert_line(&format!(" [x] Sent {severity}:{message}"));
    }
    let problems = problems.finish().success();
    problems.assert_line(" [x] warning:careful");
    problems.assert_line(" [x] error:broken");
    problems.assert_no_line_with("routine");
    let everything = everything.finish().success();
    for line in [
        " [x] info:routine",
        " [x] warning:careful",
        " [x] error:broken",
    ] {
        everything.assert_line(line);
    }

    // Without a severity, the receiver says how to use it.
    let usage = run("blocking_4_routing_receive_logs_direct", &[]);
    assert!(!usage.status.success(), "{}", usage.describe());
    assert!(usage.stderr.contains("Usage:"), "{}", usage.describe());
}

#[test]
fn tutorial_5_topics() {
    let _serial = serial();
    let _names = Names::clean(&[], &["topic_logs"]);

    let kernel = Program::start(
        "blocking_5_topics_receive_logs_topic",
        &["--count", "2", "kern.*"],
    );
    let critical = Program::start(
        "blocking_5_topics_receive_logs_topic",
        &["--count", "2", "*.critical"],
    );
    kernel.wait_for(" [*] Waiting for logs");
    critical.wait_for(" [*] Waiting for logs");
    for (key, message) in [
        ("kern.critical", "A critical kernel error"),
        ("kern.info", "kernel news"),
        ("app.critical", "the app is down"),
    ] {
        run("blocking_5_topics_emit_log_topic", &[key, message])
            .success()
            .assert_line(&format!(" [x] Sent {key}:{message}"));
    }
    let kernel = kernel.finish().success();
    kernel.assert_line(" [x] kern.critical:A critical kernel error");
    kernel.assert_line(" [x] kern.info:kernel news");
    kernel.assert_no_line_with("app.critical");
    let critical = critical.finish().success();
    critical.assert_line(" [x] kern.critical:A critical kernel error");
    critical.assert_line(" [x] app.critical:the app is down");
    critical.assert_no_line_with("kern.info");
}

#[test]
fn tutorial_6_rpc() {
    let _serial = serial();
    let _names = Names::clean(&["rpc_queue"], &[]);

    let server = Program::start("blocking_6_rpc_server", &["3"]);
    server.wait_for(" [x] Awaiting RPC requests");
    let client = run("blocking_6_rpc_client", &["0", "10", "30"]).success();
    for (n, fib) in [(0, 0), (10, 55), (30, 832_040)] {
        client.assert_line(&format!(" [x] Requesting fib({n})"));
        client.assert_line(&format!(" [.] Got {fib}"));
    }
    let server = server.finish().success();
    for n in [0, 10, 30] {
        server.assert_line(&format!(" [.] fib({n})"));
    }
}

// ---------------------------------------------------------------------------
// What the examples found in the library
// ---------------------------------------------------------------------------

/// `BlockingConnection::sleep` "waits while processing I/O (heartbeats
/// keep flowing)". Called from inside a consumer callback while another
/// delivery is already queued for dispatch, it must still drive the
/// socket: here a 1 s heartbeat and a 5 s sleep, after which the
/// connection must still be open and the ack must go through.
#[test]
fn sleep_inside_a_callback_keeps_the_connection_alive_while_deliveries_wait() {
    let _serial = serial();
    let _names = Names::clean(&["sleep-in-callback"], &[]);
    declare_queue("sleep-in-callback", QueueDeclareOptions::default());
    publish("", "sleep-in-callback", &["first", "second"]);

    let mut params: pika::ConnectionParameters =
        UrlParameters::parse(&common::amqp_url()).unwrap().into();
    params.set_heartbeat(1);
    let connection = BlockingConnection::new(params).expect("connects");
    let channel = connection.channel(None).expect("a channel");
    let outcomes: Arc<Mutex<Vec<Result<(), Error>>>> = Arc::default();
    let seen = outcomes.clone();
    let mut slept = false;
    channel
        .basic_consume(
            "sleep-in-callback",
            move |ch, delivery| {
                if !slept {
                    slept = true;
                    // Both deliveries are in by now: wait for the second one
                    // to be queued behind this callback.
                    let started = Instant::now();
                    let result = ch.connection().sleep(Duration::from_secs(5));
                    assert!(started.elapsed() >= Duration::from_secs(5));
                    seen.lock().unwrap().push(result);
                }
                let acked = ch.basic_ack(delivery.method.delivery_tag, false);
                seen.lock().unwrap().push(acked);
                if seen.lock().unwrap().len() == 3 {
                    let _ = ch.stop_consuming(None);
                }
            },
            BasicConsumeOptions::default(),
        )
        .expect("consumes");
    // Let both deliveries arrive before dispatching the first.
    connection
        .process_data_events(Some(Duration::ZERO))
        .expect("open");
    let deadline = Instant::now() + LINE_BOUND;
    while outcomes.lock().unwrap().len() < 3 && Instant::now() < deadline {
        if let Err(e) = connection.process_data_events(Some(Duration::from_millis(100))) {
            outcomes.lock().unwrap().push(Err(e));
            break;
        }
    }
    let outcomes = outcomes.lock().unwrap().clone();
    assert!(
        outcomes.iter().all(Result::is_ok) && outcomes.len() == 3,
        "sleep, ack, ack: {outcomes:?}"
    );
    // The acks only queue bytes: whether they went out, the connection
    // tells.
    let after = connection.process_data_events(Some(Duration::from_millis(200)));
    assert!(
        after.is_ok() && connection.is_open(),
        "the connection did not survive the sleep: {after:?}"
    );
    connection.close(200, "done").expect("a clean close");
    wait_message_count("sleep-in-callback", 0);
}
