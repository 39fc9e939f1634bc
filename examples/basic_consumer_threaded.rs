//! pika's `basic_consumer_threaded` example, in Rust: consume on the
//! loop's thread, do the slow work on other threads, and acknowledge from
//! the loop's thread again.
//!
//! Connections and channels are `!Send`: only the thread running the loop
//! may touch them. So the consumer declares `test_exchange` (direct), the
//! `standard` queue and their `standard_key` binding, sets a prefetch window
//! as large as the worker pool, and hands each [`pika::Delivery`] (owned, and
//! `Send`) to a pool of worker threads over a `std::sync::mpsc` channel.
//! pika's example starts one thread per message; a fixed pool does the same
//! job with a bound on threads.
//!
//! When a worker is done it cannot ack by itself: it asks the loop's thread
//! to, with `ConnectionHandle::add_callback_threadsafe`. That closure must
//! be `Send` and receives only the `&SelectConnection`, so it cannot carry
//! the `Channel` along. It finds the consumer again through a
//! `thread_local!` registry (filled by [`run`] on the loop's thread, keyed
//! by a number the closure does carry), and acks there, unless the channel
//! has closed meanwhile (then the broker redelivers the message to someone
//! else, as in pika's example).
//!
//! Stopping (a [`StopHandle`], see the consumer example about Ctrl-C):
//! cancel the consumer, let the workers finish and ack what they hold
//! (bounded by `shutdown_wait`), close the channel and the connection, then
//! join the workers. [`Settings::stop_after`] stops it after that many
//! acknowledgements.
//!
//! `main` first publishes `EXAMPLE_MESSAGES` messages (default 6) so that
//! the workers have something to do, then consumes until they are all
//! acknowledged, `EXAMPLE_RUN_SECS` (default 10; `0`: no limit) have passed,
//! or a line is entered on standard input.
//!
//! ```text
//! scripts/with-broker cargo run --example basic_consumer_threaded
//! ```

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::BufRead;
use std::process::ExitCode;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use pika::{
    BasicConsumeOptions, BasicProperties, Channel, ConnectionHandle, Delivery, Error,
    ExchangeDeclareOptions, FieldTable, QueueDeclareOptions, SelectConnection, UrlParameters,
};

/// What to consume, and how many workers do what.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The exchange (pika's example: `test_exchange`, direct).
    pub exchange: String,
    /// Its type.
    pub exchange_type: String,
    /// The queue (`standard`).
    pub queue: String,
    /// The binding key (`standard_key`).
    pub routing_key: String,
    /// Worker threads.
    pub workers: usize,
    /// Unacknowledged messages the broker may hand over at once; as many
    /// as there are workers keeps all of them busy.
    pub prefetch_count: u16,
    /// How long each message's work takes (a sleep stands in for it).
    pub work_time: Duration,
    /// Messages to publish before consuming, so there is work to do.
    pub seed_messages: u32,
    /// Stop after this many acknowledgements.
    pub stop_after: Option<u64>,
    /// How long a stop waits for the workers to finish what they hold.
    pub shutdown_wait: Duration,
    /// A name shown by the broker's management tools.
    pub connection_name: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            exchange: "test_exchange".into(),
            exchange_type: "direct".into(),
            queue: "standard".into(),
            routing_key: "standard_key".into(),
            workers: 3,
            prefetch_count: 3,
            work_time: Duration::from_secs(1),
            seed_messages: 0,
            stop_after: None,
            shutdown_wait: Duration::from_secs(30),
            connection_name: None,
        }
    }
}

/// What the consumer and its workers did, returned by [`run`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Messages delivered to the consumer.
    pub received: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Acknowledgements per worker (index = worker number).
    pub acked_by_worker: Vec<u64>,
    /// Messages whose work finished after the channel or connection had
    /// closed: not acknowledged, so the broker delivers them again.
    pub acks_lost: u64,
    /// Why the connection ended (or could not be opened).
    pub end_reason: Option<Error>,
}

impl Summary {
    /// Whether the connection was closed by us with 200.
    pub fn stopped_cleanly(&self) -> bool {
        matches!(
            self.end_reason,
            Some(Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            })
        )
    }
}

// ---------------------------------------------------------------------------
// Stop requests from other threads
// ---------------------------------------------------------------------------

/// Asks the running consumer to stop cleanly, from any thread.
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    shared: Arc<(Mutex<StopState>, Condvar)>,
}

#[derive(Debug, Default)]
struct StopState {
    requested: bool,
    connection: Option<ConnectionHandle>,
}

impl StopHandle {
    /// A handle with no stop requested.
    pub fn new() -> StopHandle {
        StopHandle::default()
    }

    /// Requests the clean shutdown; returns at once.
    pub fn request_stop(&self) {
        let running = {
            let mut state = self.shared.0.lock().unwrap_or_else(PoisonError::into_inner);
            state.requested = true;
            self.shared.1.notify_all();
            state.connection.clone()
        };
        if let Some(handle) = running {
            if let Err(e) = handle.add_callback_threadsafe(|conn| conn.ioloop().stop()) {
                println!("[threaded] stop requested while the connection closes: {e}");
            }
        }
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.shared
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .requested
    }

    fn attach(&self, handle: ConnectionHandle) -> bool {
        let mut state = self.shared.0.lock().unwrap_or_else(PoisonError::into_inner);
        if state.requested {
            return false;
        }
        state.connection = Some(handle);
        true
    }

    fn detach(&self) {
        self.shared
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .connection = None;
    }
}

// ---------------------------------------------------------------------------
// Finding the consumer again from a closure sent by a worker
// ---------------------------------------------------------------------------

thread_local! {
    /// The consumers run by this thread, by key. Only the loop's thread
    /// reads it: a worker's closure runs there and looks its consumer up.
    static CONSUMERS: RefCell<HashMap<u64, Weak<Consumer>>> = RefCell::new(HashMap::new());
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

fn register(consumer: &Rc<Consumer>) {
    CONSUMERS.with(|c| c.borrow_mut().insert(consumer.key, Rc::downgrade(consumer)));
}

fn unregister(key: u64) {
    CONSUMERS.with(|c| c.borrow_mut().remove(&key));
}

fn lookup(key: u64) -> Option<Rc<Consumer>> {
    CONSUMERS.with(|c| c.borrow().get(&key).and_then(Weak::upgrade))
}

// ---------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------

/// Runs jobs until the job channel closes; asks the loop's thread to ack
/// each finished one.
fn worker(
    id: usize,
    key: u64,
    jobs: Arc<Mutex<Receiver<Delivery>>>,
    connection: ConnectionHandle,
    work_time: Duration,
    lost: Arc<AtomicU64>,
) {
    loop {
        // Hold the lock only while waiting for the next job.
        let next = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(delivery) = next else {
            return;
        };
        let tag = delivery.method.delivery_tag;
        println!(
            "[worker {id}] working on #{tag}: {}",
            String::from_utf8_lossy(&delivery.body)
        );
        thread::sleep(work_time);
        // Only a delivery tag crosses back; the loop's thread acks.
        let posted = connection.add_callback_threadsafe(move |_conn| match lookup(key) {
            Some(consumer) => consumer.on_work_done(id, tag),
            None => println!("[worker {id}] consumer gone; #{tag} not acknowledged"),
        });
        if let Err(e) = posted {
            println!("[worker {id}] cannot ack #{tag}: {e}; the broker will redeliver it");
            lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------
// The consumer, on the loop's thread
// ---------------------------------------------------------------------------

struct Consumer {
    key: u64,
    settings: Settings,
    connection: RefCell<Option<SelectConnection>>,
    channel: RefCell<Option<Channel>>,
    consumer_tag: RefCell<Option<String>>,
    consuming: Cell<bool>,
    closing: Cell<bool>,
    finished: Cell<bool>,
    /// Delivered to workers and not yet back.
    outstanding: Cell<u64>,
    jobs: RefCell<Option<Sender<Delivery>>>,
    summary: RefCell<Summary>,
}

fn say(text: impl std::fmt::Display) {
    println!("[threaded] {text}");
}

impl Consumer {
    fn connect(self: &Rc<Self>, url: &str) -> Result<SelectConnection, Error> {
        let mut params = UrlParameters::parse(url)?.into_parameters();
        if let Some(name) = &self.settings.connection_name {
            params.set_connection_name(name.clone());
        }
        let (on_open, on_error, on_close) = (self.clone(), self.clone(), self.clone());
        let conn = SelectConnection::new(
            params,
            move |conn| {
                say("connection opened");
                let me = on_open.clone();
                if let Err(e) = conn.channel(None, move |r| me.on_channel_open(r)) {
                    say(format_args!("cannot open a channel: {e}"));
                }
            },
            move |conn, err| {
                say(format_args!("could not connect: {err}"));
                on_error.summary.borrow_mut().end_reason = Some(err);
                conn.ioloop().stop();
            },
            move |conn, reason| {
                say(format_args!("connection closed: {reason}"));
                on_close.summary.borrow_mut().end_reason = Some(reason);
                *on_close.channel.borrow_mut() = None;
                conn.ioloop().stop();
            },
        )?;
        *self.connection.borrow_mut() = Some(conn.clone());
        Ok(conn)
    }

    fn on_channel_open(self: &Rc<Self>, result: Result<Channel, Error>) {
        let channel = match result {
            Ok(channel) => channel,
            Err(e) => return say(format_args!("channel did not open: {e}")),
        };
        let me = self.clone();
        channel.add_on_close_callback(move |_ch, reason| {
            say(format_args!("channel closed: {reason}"));
            *me.channel.borrow_mut() = None;
            me.consuming.set(false);
            me.close_connection();
        });
        *self.channel.borrow_mut() = Some(channel.clone());
        if self.closing.get() {
            return self.maybe_finish();
        }
        // Exchange, queue, binding, QoS: each step starts the next.
        let s = &self.settings;
        let options = ExchangeDeclareOptions {
            exchange_type: s.exchange_type.clone(),
            ..Default::default()
        };
        let me = self.clone();
        let sent =
            channel.exchange_declare(&s.exchange, options, FieldTable::new(), move |ch, r| {
                if let Err(e) = r {
                    return say(format_args!("exchange not declared: {e}"));
                }
                let me2 = me.clone();
                let sent = ch.queue_declare(
                    &me.settings.queue,
                    QueueDeclareOptions::default(),
                    FieldTable::new(),
                    move |ch, r| match r {
                        Ok(_) => me2.bind(ch),
                        Err(e) => say(format_args!("queue not declared: {e}")),
                    },
                );
                if let Err(e) = sent {
                    say(format_args!("cannot declare the queue: {e}"));
                }
            });
        if let Err(e) = sent {
            say(format_args!("cannot declare the exchange: {e}"));
        }
    }

    fn bind(self: &Rc<Self>, channel: &Channel) {
        let s = &self.settings;
        let me = self.clone();
        let sent = channel.queue_bind(
            &s.queue,
            &s.exchange,
            Some(&s.routing_key),
            FieldTable::new(),
            move |ch, r| {
                if let Err(e) = r {
                    return say(format_args!("queue not bound: {e}"));
                }
                let me2 = me.clone();
                let sent =
                    ch.basic_qos(0, me.settings.prefetch_count, false, move |ch, r| match r {
                        Ok(_) => me2.start_consuming(ch),
                        Err(e) => say(format_args!("QoS not set: {e}")),
                    });
                if let Err(e) = sent {
                    say(format_args!("cannot set QoS: {e}"));
                }
            },
        );
        if let Err(e) = sent {
            say(format_args!("cannot bind the queue: {e}"));
        }
    }

    fn start_consuming(self: &Rc<Self>, channel: &Channel) {
        let s = &self.settings;
        for n in 1..=s.seed_messages {
            let body = format!("job {n} of {}", s.seed_messages);
            let props = BasicProperties::default().with_content_type("text/plain");
            if let Err(e) =
                channel.basic_publish(&s.exchange, &s.routing_key, body.as_bytes(), &props, false)
            {
                say(format_args!("cannot publish a seed message: {e}"));
            }
        }
        if s.seed_messages > 0 {
            say(format_args!(
                "published {} messages to work on",
                s.seed_messages
            ));
        }
        let me = self.clone();
        let started = channel.basic_consume(
            &s.queue,
            move |ch, delivery| me.on_message(ch, delivery),
            BasicConsumeOptions::default(),
            |_ch, r| match r {
                Ok(ok) => say(format_args!("consuming as {}", ok.consumer_tag)),
                Err(e) => say(format_args!("consume refused: {e}")),
            },
        );
        match started {
            Ok(tag) => {
                *self.consumer_tag.borrow_mut() = Some(tag);
                self.consuming.set(true);
            }
            Err(e) => say(format_args!("cannot consume: {e}")),
        }
    }

    /// On the loop's thread: hand the message to the workers.
    fn on_message(&self, channel: &Channel, delivery: Delivery) {
        self.summary.borrow_mut().received += 1;
        let tag = delivery.method.delivery_tag;
        let sent = self
            .jobs
            .borrow()
            .as_ref()
            .map(|jobs| jobs.send(delivery).is_ok());
        if sent == Some(true) {
            self.outstanding.set(self.outstanding.get() + 1);
        } else {
            say(format_args!("no workers left; requeueing #{tag}"));
            if let Err(e) = channel.basic_nack(tag, false, true) {
                say(format_args!("cannot requeue #{tag}: {e}"));
            }
        }
    }

    /// On the loop's thread, called through a worker's
    /// `add_callback_threadsafe`: acknowledge the finished message.
    fn on_work_done(self: &Rc<Self>, worker: usize, tag: u64) {
        self.outstanding
            .set(self.outstanding.get().saturating_sub(1));
        let channel = self.channel.borrow().clone();
        match channel.filter(Channel::is_open) {
            Some(channel) => match channel.basic_ack(tag, false) {
                Ok(()) => {
                    let mut summary = self.summary.borrow_mut();
                    summary.acked += 1;
                    summary.acked_by_worker[worker] += 1;
                    drop(summary);
                    say(format_args!("acknowledged #{tag} for worker {worker}"));
                }
                Err(e) => {
                    say(format_args!("cannot ack #{tag}: {e}"));
                    self.summary.borrow_mut().acks_lost += 1;
                }
            },
            None => {
                // As in pika's example: the channel is gone, so this
                // message cannot be acked; the broker redelivers it.
                say(format_args!("channel closed; #{tag} not acknowledged"));
                self.summary.borrow_mut().acks_lost += 1;
            }
        }
        let acked = self.summary.borrow().acked;
        if self.settings.stop_after.is_some_and(|n| acked >= n) {
            self.stop();
        }
        self.maybe_finish();
    }

    // --- stopping ---------------------------------------------------------

    fn stop(self: &Rc<Self>) {
        if self.closing.replace(true) {
            return;
        }
        say(format_args!(
            "stopping; {} message(s) still with the workers",
            self.outstanding.get()
        ));
        let channel = self.channel.borrow().clone();
        let tag = self.consumer_tag.borrow().clone();
        if let (true, Some(channel), Some(tag)) = (self.consuming.get(), channel, tag) {
            let me = self.clone();
            let sent = channel.basic_cancel(&tag, move |_ch, r| {
                if let Err(e) = r {
                    say(format_args!("cancel failed: {e}"));
                }
                me.consuming.set(false);
                me.maybe_finish();
            });
            if sent.is_err() {
                self.consuming.set(false);
            }
        }
        // Bound the wait for the workers.
        if let Some(conn) = self.connection.borrow().clone() {
            let me = self.clone();
            conn.ioloop()
                .call_later(self.settings.shutdown_wait, move || me.finish());
        }
        self.maybe_finish();
    }

    fn maybe_finish(&self) {
        if self.closing.get() && !self.consuming.get() && self.outstanding.get() == 0 {
            self.finish();
        }
    }

    /// Closes the channel, then the connection.
    fn finish(&self) {
        if self.finished.replace(true) {
            return;
        }
        let channel = self.channel.borrow().clone();
        if let Some(channel) = channel.filter(Channel::is_open) {
            if let Err(e) = channel.close(200, "done") {
                say(format_args!("cannot close the channel: {e}"));
            }
        }
        self.close_connection();
    }

    fn close_connection(&self) {
        let conn = self.connection.borrow().clone();
        match conn {
            Some(conn) if conn.is_open() => {
                if let Err(e) = conn.close(200, "threaded consumer done") {
                    say(format_args!("cannot close the connection: {e}"));
                }
            }
            Some(conn) if !conn.is_closing() && !conn.is_closed() => {
                // Still connecting: abort.
                let _ = conn.close(200, "threaded consumer done");
            }
            _ => {}
        }
    }
}

/// Consumes with `settings.workers` worker threads until `stop` is
/// requested, `settings.stop_after` messages are acknowledged, or the
/// connection ends.
///
/// # Errors
/// [`Error::InvalidUrl`] for a bad `url`; [`Error::IoLoop`] when no event
/// loop can be created.
pub fn run(url: &str, settings: Settings, stop: StopHandle) -> Result<Summary, Error> {
    let workers = settings.workers.max(1);
    let (jobs_tx, jobs_rx) = mpsc::channel::<Delivery>();
    let consumer = Rc::new(Consumer {
        key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
        summary: RefCell::new(Summary {
            acked_by_worker: vec![0; workers],
            ..Summary::default()
        }),
        settings,
        connection: RefCell::new(None),
        channel: RefCell::new(None),
        consumer_tag: RefCell::new(None),
        consuming: Cell::new(false),
        closing: Cell::new(false),
        finished: Cell::new(false),
        outstanding: Cell::new(0),
        jobs: RefCell::new(Some(jobs_tx)),
    });
    register(&consumer);
    let conn = match consumer.connect(url) {
        Ok(conn) => conn,
        Err(e) => {
            unregister(consumer.key);
            return Err(e);
        }
    };
    let handle = conn.threadsafe_handle();
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let lost = Arc::new(AtomicU64::new(0));
    let pool: Vec<JoinHandle<()>> = (0..workers)
        .map(|id| {
            let (jobs, handle, lost) = (jobs_rx.clone(), handle.clone(), lost.clone());
            let (key, work_time) = (consumer.key, consumer.settings.work_time);
            thread::spawn(move || worker(id, key, jobs, handle, work_time, lost))
        })
        .collect();
    if !stop.attach(handle) {
        consumer.stop();
    }
    let ran = conn.ioloop().start();
    if ran.is_ok() && stop.is_requested() && !conn.is_closed() {
        consumer.stop();
        let _ = conn.ioloop().start();
    }
    stop.detach();
    // Closing the job channel ends the workers once they are idle.
    consumer.jobs.borrow_mut().take();
    for w in pool {
        if w.join().is_err() {
            say("a worker panicked");
        }
    }
    unregister(consumer.key);
    conn.ioloop().close();
    *consumer.connection.borrow_mut() = None;
    *consumer.channel.borrow_mut() = None;
    ran.map_err(|e| Error::IoLoop(Arc::new(e)))?;
    let mut summary = consumer.summary.borrow().clone();
    summary.acks_lost += lost.load(Ordering::Relaxed);
    say(format_args!(
        "stopped: received {}, acknowledged {} (per worker {:?}), not acknowledged {}",
        summary.received, summary.acked, summary.acked_by_worker, summary.acks_lost
    ));
    Ok(summary)
}

#[allow(dead_code)] // the example tests call `run` instead
fn main() -> ExitCode {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let number = |name: &str, default: u64| -> Result<u64, String> {
        match std::env::var(name) {
            Ok(s) => s
                .parse()
                .map_err(|_| format!("{name} must be a number, not {s:?}")),
            Err(_) => Ok(default),
        }
    };
    let (seconds, messages) = match (
        number("EXAMPLE_RUN_SECS", 10),
        number("EXAMPLE_MESSAGES", 6),
    ) {
        (Ok(s), Ok(m)) => (s, m),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = StopHandle::new();
    if seconds > 0 {
        let timer = stop.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_secs(seconds));
            timer.request_stop();
        });
    }
    let on_enter = stop.clone();
    thread::spawn(move || {
        let mut line = String::new();
        if matches!(std::io::stdin().lock().read_line(&mut line), Ok(n) if n > 0) {
            on_enter.request_stop();
        }
    });
    let settings = Settings {
        seed_messages: u32::try_from(messages).unwrap_or(u32::MAX),
        stop_after: (messages > 0).then_some(messages),
        ..Settings::default()
    };
    match run(&url, settings, stop) {
        Ok(summary) if summary.stopped_cleanly() && summary.acks_lost == 0 => ExitCode::SUCCESS,
        Ok(summary) => {
            eprintln!(
                "did not stop cleanly: {:?}",
                summary.end_reason.map(|e| e.to_string())
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
