//! pika's `basic_consumer_threaded` example, in Rust: consume on the
//! loop's thread, do the slow work on worker threads, and ack from there.
//!
//! A connection and its channels belong to the thread that runs the loop,
//! so in pika a worker cannot call `channel.basic_ack` itself; it asks the
//! loop's thread to, with
//! `connection.add_callback_threadsafe(functools.partial(channel.basic_ack,
//! delivery_tag=...))`. Here that line is [`pika::AckHandle`]: take one
//! with `channel.ack_handle(&delivery)` on the loop's thread, send it to
//! the worker with the delivery, and call `ack.ack()` there when the work
//! is done; the ack goes out on the loop's thread. When the channel or the
//! connection has closed meanwhile, `ack()` returns `Err` and sends
//! nothing: the broker delivers the message again. (pika's closure style
//! works too: `ConnectionHandle::add_callback_threadsafe` with
//! `SelectConnection::channel_by_number`.)
//!
//! The consumer declares `test_exchange` (direct) and the `standard`
//! queue, binds them with `standard_key`, sets the prefetch window to the
//! size of a fixed pool of workers (pika's example starts a thread per
//! message), and hands each delivery with its ack handle to the pool over
//! a `std::sync::mpsc` channel.
//!
//! Stopping: [`StopHandle::request_stop`], from any thread, runs
//! `SelectConnection::shutdown` on the loop's thread: the consumer is
//! cancelled, the workers finish and ack what they hold (for at most
//! `shutdown_wait`), then the connection closes and [`run`] joins the
//! workers. [`Settings::stop_after`] requests it after that many acks.
//!
//! `main` first publishes `EXAMPLE_MESSAGES` messages (default 6) so that
//! the workers have something to do, then consumes until they are all
//! acked, `EXAMPLE_RUN_SECS` (default 10; `0`: no limit) have passed, or a
//! line is entered on standard input.
//!
//! ```text
//! scripts/with-broker cargo run --example basic_consumer_threaded
//! ```

use std::cell::{Cell, RefCell};
use std::io::BufRead;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use pika::{
    AckHandle, BasicConsumeOptions, BasicProperties, Channel, ConnectionHandle, Delivery, Error,
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
    /// Unacked messages the broker may hand over at once; as many as there
    /// are workers keeps each of them busy.
    pub prefetch_count: u16,
    /// How long each message's work takes (a sleep stands in for it).
    pub work_time: Duration,
    /// Messages to publish before consuming, so there is work to do.
    pub seed_messages: u32,
    /// Stop after this many acks.
    pub stop_after: Option<u64>,
    /// How long a stop waits for the workers to ack what they hold.
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
    /// Messages acked.
    pub acked: u64,
    /// Acks per worker (index = worker number).
    pub acked_by_worker: Vec<u64>,
    /// Messages whose work finished after their channel or connection had
    /// closed: `ack()` failed, and the broker delivers them again.
    pub acks_lost: u64,
    /// Why the connection ended (or could not be opened); a channel the
    /// broker closed, when that ended it.
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

/// Asks the running consumer to stop cleanly, from any thread.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<Mutex<StopState>>);

#[derive(Debug, Default)]
struct StopState {
    requested: bool,
    /// The running connection, and how long its shutdown may wait.
    running: Option<(ConnectionHandle, Duration)>,
}

impl StopHandle {
    /// A handle with no stop requested.
    pub fn new() -> StopHandle {
        StopHandle::default()
    }

    /// Requests the clean shutdown; returns at once.
    pub fn request_stop(&self) {
        let running = {
            let mut state = self.state();
            state.requested = true;
            state.running.clone()
        };
        if let Some((connection, wait)) = running {
            // The connection is not `Send`: the shutdown runs on its thread.
            // An `Err` here means it has closed already: nothing to stop.
            let _ = connection.add_callback_threadsafe(move |conn| match conn.shutdown(wait) {
                Ok(()) => say("stopping"),
                Err(e) => say(format_args!("already stopping: {e}")),
            });
        }
    }

    /// Sets (or clears) the connection a stop request goes to; a request
    /// made before there was one goes to it now.
    fn set_running(&self, running: Option<(ConnectionHandle, Duration)>) {
        let requested = {
            let mut state = self.state();
            state.running = running;
            state.requested && state.running.is_some()
        };
        if requested {
            self.request_stop();
        }
    }

    fn state(&self) -> MutexGuard<'_, StopState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A worker's job: the message, and the handle that acks it.
type Job = (Delivery, AckHandle);

fn say(text: impl std::fmt::Display) {
    println!("[threaded] {text}");
}

/// Consumes with `settings.workers` worker threads until `stop` is
/// requested, `settings.stop_after` messages are acked, or the connection
/// ends.
///
/// # Errors
/// [`Error::InvalidUrl`] for a bad `url`; [`Error::IoLoop`] when the event
/// loop fails.
pub fn run(url: &str, settings: Settings, stop: StopHandle) -> Result<Summary, Error> {
    let mut params = UrlParameters::parse(url)?.into_parameters();
    if let Some(name) = &settings.connection_name {
        params.set_connection_name(name.clone());
    }
    let (jobs, queue) = mpsc::channel::<Job>();
    let received = Rc::new(Cell::new(0));
    let end_reason = Rc::new(RefCell::new(None::<Error>));
    let ended = |what: &'static str| {
        let end_reason = end_reason.clone();
        move |conn: &SelectConnection, reason: Error| {
            say(format_args!("{what}: {reason}"));
            // Keep a channel error that made us close.
            end_reason.borrow_mut().get_or_insert(reason);
            conn.ioloop().stop();
        }
    };
    let on_open = {
        let (settings, received, end_reason) =
            (settings.clone(), received.clone(), end_reason.clone());
        move |conn: &SelectConnection| {
            say("connection opened");
            let opened = conn.channel(None, move |channel| {
                let channel = match channel {
                    Ok(channel) => channel,
                    Err(e) => return say(format_args!("no channel: {e}")),
                };
                channel.add_on_close_callback(move |channel, reason| {
                    // The broker closed it (say, a declare it refused):
                    // nothing left to do, so close the connection too.
                    if let Some(conn) = channel.connection().ok().filter(SelectConnection::is_open)
                    {
                        say(format_args!("channel closed: {reason}"));
                        *end_reason.borrow_mut() = Some(reason);
                        let _ = conn.close(200, "channel closed");
                    }
                });
                if let Err(e) = consume(&channel, &settings, jobs, received) {
                    say(format_args!("cannot consume: {e}"));
                    let _ = channel.close(200, "cannot consume");
                }
            });
            if let Err(e) = opened {
                say(format_args!("cannot open a channel: {e}"));
            }
        }
    };
    let conn = SelectConnection::new(
        params,
        on_open,
        ended("could not connect"),
        ended("connection closed"),
    )?;

    let queue = Arc::new(Mutex::new(queue));
    let acked = Arc::new(AtomicU64::new(0));
    let pool: Vec<_> = (0..settings.workers.max(1))
        .map(|id| {
            let (queue, acked, stop) = (queue.clone(), acked.clone(), stop.clone());
            let (work_time, stop_after) = (settings.work_time, settings.stop_after);
            let on_ack = move || {
                let total = acked.fetch_add(1, Ordering::Relaxed) + 1;
                if stop_after == Some(total) {
                    stop.request_stop();
                }
            };
            thread::spawn(move || worker(id, &queue, work_time, on_ack))
        })
        .collect();

    stop.set_running(Some((conn.threadsafe_handle(), settings.shutdown_wait)));
    let ran = conn.ioloop().start();
    stop.set_running(None);
    conn.ioloop().close();
    ran.map_err(|e| Error::IoLoop(Arc::new(e)))?;
    // The connection has closed, and its consumer with it: the job channel's
    // sending end is gone, so each worker ends once it is idle.
    let (acked_by_worker, lost): (Vec<u64>, Vec<u64>) = pool
        .into_iter()
        .map(|w| {
            w.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
        .unzip();
    let summary = Summary {
        received: received.get(),
        acked: acked_by_worker.iter().sum(),
        acks_lost: lost.iter().sum(),
        acked_by_worker,
        end_reason: end_reason.take(),
    };
    say(format_args!(
        "stopped: received {}, acked {} (per worker {:?}), not acked {}",
        summary.received, summary.acked, summary.acked_by_worker, summary.acks_lost
    ));
    Ok(summary)
}

/// Declares, binds, publishes the seed messages and starts consuming, on
/// the loop's thread once the channel is open. As in pika, the channel sends
/// each request once the previous one is answered (the seed messages go
/// after the binding is made). When the broker refuses one, it closes the
/// channel, whose close callback reports it: the callbacks here have
/// nothing to add.
fn consume(
    channel: &Channel,
    s: &Settings,
    jobs: Sender<Job>,
    received: Rc<Cell<u64>>,
) -> Result<(), Error> {
    let exchange = ExchangeDeclareOptions {
        exchange_type: s.exchange_type.clone(),
        ..Default::default()
    };
    channel.exchange_declare(&s.exchange, exchange, FieldTable::new(), |_, _| {})?;
    let queue = QueueDeclareOptions::default();
    channel.queue_declare(&s.queue, queue, FieldTable::new(), |_, _| {})?;
    let key = Some(s.routing_key.as_str());
    channel.queue_bind(&s.queue, &s.exchange, key, FieldTable::new(), |_, _| {})?;
    channel.basic_prefetch(s.prefetch_count, |_, _| {})?;
    for n in 1..=s.seed_messages {
        let body = format!("job {n} of {}", s.seed_messages);
        channel.basic_publish(
            &s.exchange,
            &s.routing_key,
            body,
            &BasicProperties::default(),
            false,
        )?;
    }
    let on_message = move |channel: &Channel, delivery: Delivery| {
        received.set(received.get() + 1);
        let ack = channel.ack_handle(&delivery);
        if let Err(mpsc::SendError((delivery, _))) = jobs.send((delivery, ack)) {
            // No worker left to take it: back to the queue.
            let _ = channel.basic_nack(delivery.method.delivery_tag, false, true);
        }
    };
    channel.basic_consume(
        &s.queue,
        on_message,
        BasicConsumeOptions::default(),
        |_, ok| {
            if let Ok(ok) = ok {
                say(format_args!("consuming as {}", ok.consumer_tag));
            }
        },
    )?;
    Ok(())
}

/// A worker thread: works on jobs until the job channel closes, acking
/// each one when done. Returns how many it acked and how many it could not.
fn worker(
    id: usize,
    queue: &Mutex<Receiver<Job>>,
    work_time: Duration,
    on_ack: impl Fn(),
) -> (u64, u64) {
    let (mut acked, mut lost) = (0, 0);
    loop {
        // A statement of its own, so that the lock is released before the
        // work starts.
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((delivery, ack)) = job else {
            return (acked, lost);
        };
        let tag = delivery.method.delivery_tag;
        let again = if delivery.method.redelivered {
            " (redelivered)"
        } else {
            ""
        };
        let body = String::from_utf8_lossy(&delivery.body);
        println!("[worker {id}] working on #{tag}{again}: {body}");
        thread::sleep(work_time);
        match ack.ack() {
            Ok(()) => {
                println!("[worker {id}] acked #{tag}");
                acked += 1;
                on_ack();
            }
            Err(e) => {
                println!("[worker {id}] #{tag} not acked ({e}); the broker will deliver it again");
                lost += 1;
            }
        }
    }
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
