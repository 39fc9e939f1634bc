//! pika's asynchronous consumer example, in Rust: a consumer that copes with
//! what RabbitMQ may do to it.
//!
//! Each step is one short function that starts an operation and names the
//! next step as its completion: connect → open a channel → declare the
//! `message` topic exchange → declare the `text` queue → bind it with
//! `example.text` → set the prefetch window (QoS) → consume, acknowledging
//! every message as it arrives.
//!
//! * When the broker closes the **connection** (say `rabbitmqctl
//!   close_connection`, a restart, a network fault), the consumer connects
//!   again: at once when it had got as far as consuming, else after a delay
//!   that grows by a second per failed attempt, up to 30 s (as pika's
//!   example does).
//! * When the broker closes the **channel** (for instance because the
//!   exchange or queue exists with other settings), or cancels the consumer
//!   (the queue was deleted), the consumer closes the connection, and so
//!   reconnects.
//! * On a **stop request** it shuts down cleanly: Basic.Cancel, then
//!   Channel.Close once the broker confirmed the cancel, then
//!   Connection.Close, then the loop ends.
//!
//! # Stopping it, and Ctrl-C
//!
//! pika's Python example relies on Ctrl-C raising `KeyboardInterrupt` out of
//! `ioloop.start()`; it then starts the clean shutdown and runs the loop
//! again until the connection is closed. Rust has no such exception, and
//! this project has no signal-handling crate, so the request comes through a
//! [`StopHandle`]: `Send + Sync + Clone`, usable from any thread. Its
//! [`StopHandle::request_stop`] does what the Ctrl-C does in pika: it
//! interrupts the loop (through the connection's
//! `ConnectionHandle::add_callback_threadsafe`, the one door into the loop
//! from other threads), and [`run`] then starts the clean shutdown and runs
//! the loop until the connection is closed. Between connections (while
//! waiting to reconnect) the request ends the wait at once.
//!
//! A real program would call `request_stop` from its Ctrl-C handler, e.g.
//! with the `ctrlc` crate (`ctrlc::set_handler(move || stop.request_stop())`)
//! or `signal-hook`. This example does not install one: Ctrl-C kills it
//! without a clean close (the broker then requeues unacknowledged messages).
//! Instead `main` stops it after `EXAMPLE_RUN_SECS` seconds (default 10;
//! `0` means no time limit) or when a line is entered on standard input.
//!
//! Run it with a private broker, next to the publisher example to have
//! something to consume:
//!
//! ```text
//! scripts/with-broker cargo run --example asynchronous_consumer_example
//! ```
//!
//! Reads the broker from `AMQP_URL` (default
//! `amqp://guest:guest@localhost:5672/%2F`).

use std::cell::{Cell, RefCell};
use std::io::BufRead;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use pika::spec::basic;
use pika::{
    BasicConsumeOptions, Channel, ConnectionHandle, ConnectionParameters, Delivery, Error,
    ExchangeDeclareOptions, FieldTable, QueueDeclareOptions, SelectConnection, UrlParameters,
};

/// What to consume, and how.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The exchange to declare (pika's example: `message`).
    pub exchange: String,
    /// Its type (`topic`).
    pub exchange_type: String,
    /// The queue to declare and consume from (`text`).
    pub queue: String,
    /// The binding key between them (`example.text`).
    pub routing_key: String,
    /// How many unacknowledged messages the broker may send at once.
    pub prefetch_count: u16,
    /// A name shown by the broker's management tools (`connection_name`).
    pub connection_name: Option<String>,
    /// How much longer to wait before each further reconnection attempt
    /// when the previous connection never got to consume.
    pub reconnect_delay_step: Duration,
    /// The longest wait between reconnection attempts.
    pub max_reconnect_delay: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            exchange: "message".into(),
            exchange_type: "topic".into(),
            queue: "text".into(),
            routing_key: "example.text".into(),
            prefetch_count: 1,
            connection_name: None,
            reconnect_delay_step: Duration::from_secs(1),
            max_reconnect_delay: Duration::from_secs(30),
        }
    }
}

/// What happened, as it happens (for a program that embeds the consumer;
/// the tests use it to follow along).
#[derive(Debug, Clone)]
pub enum Event {
    /// Connection attempt number `connection` (counted from 1) is
    /// consuming.
    Consuming {
        /// Which connection.
        connection: u32,
        /// The consumer tag.
        consumer_tag: String,
    },
    /// A message arrived (and was acknowledged).
    Message {
        /// Which connection it arrived on.
        connection: u32,
        /// The message (boxed: it is much larger than the other events).
        delivery: Box<Delivery>,
    },
    /// A connection ended, or could not be opened.
    ConnectionEnded {
        /// Which connection.
        connection: u32,
        /// Why.
        reason: Error,
        /// Whether the consumer will connect again.
        reconnecting: bool,
    },
}

/// What the consumer did, returned by [`run`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// How many connections were opened.
    pub connections_opened: u32,
    /// Messages received on each connection attempt, in order (an attempt
    /// that never opened counts 0).
    pub messages_per_connection: Vec<u64>,
    /// Messages acknowledged (all of them, unless a channel closed first).
    pub acked: u64,
    /// Why each connection ended (or failed to open), in order.
    pub end_reasons: Vec<Error>,
}

impl Summary {
    /// Messages received over all connections.
    pub fn messages(&self) -> u64 {
        self.messages_per_connection.iter().sum()
    }

    /// Whether the last connection was closed by us with 200, as the clean
    /// shutdown does.
    pub fn stopped_cleanly(&self) -> bool {
        matches!(
            self.end_reasons.last(),
            Some(Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            })
        )
    }
}

// ---------------------------------------------------------------------------
// Stop requests from other threads (what Ctrl-C is in pika's example)
// ---------------------------------------------------------------------------

/// Asks a running consumer to stop cleanly. `Send + Sync + Clone`: hand a
/// clone to whichever thread decides (a Ctrl-C handler, a timer thread, a
/// thread reading standard input).
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    shared: Arc<(Mutex<StopState>, Condvar)>,
}

#[derive(Debug, Default)]
struct StopState {
    requested: bool,
    /// The connection whose loop is running, while one is.
    connection: Option<ConnectionHandle>,
}

impl StopHandle {
    /// A handle with no stop requested.
    pub fn new() -> StopHandle {
        StopHandle::default()
    }

    /// Requests the clean shutdown; returns at once. Calling it again has no
    /// further effect once the loop has been interrupted.
    pub fn request_stop(&self) {
        let (lock, wakeup) = &*self.shared;
        let running = {
            let mut state = lock.lock().unwrap_or_else(PoisonError::into_inner);
            state.requested = true;
            wakeup.notify_all();
            state.connection.clone()
        };
        if let Some(handle) = running {
            // Interrupt the loop, as KeyboardInterrupt does in pika; `run`
            // takes it from there on its own thread. If the connection has
            // just closed, `run` sees the flag instead.
            if let Err(e) = handle.add_callback_threadsafe(|conn| conn.ioloop().stop()) {
                println!("[consumer] stop requested while the connection closes: {e}");
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

    /// Records the connection whose loop is about to run; false (and
    /// nothing recorded) when a stop was already requested.
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

    /// Waits up to `delay`; true when a stop was requested meanwhile.
    fn wait(&self, delay: Duration) -> bool {
        let (lock, wakeup) = &*self.shared;
        let state = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (state, _) = wakeup
            .wait_timeout_while(state, delay, |s| !s.requested)
            .unwrap_or_else(PoisonError::into_inner);
        state.requested
    }
}

// ---------------------------------------------------------------------------
// The consumer: one per connection
// ---------------------------------------------------------------------------

/// What lives as long as [`run`]: the settings, the counts, the observer.
/// The program's observer of [`Event`]s.
type Observer = Box<dyn FnMut(&Event)>;

struct Shared {
    settings: Settings,
    summary: RefCell<Summary>,
    on_event: RefCell<Observer>,
}

impl Shared {
    fn emit(&self, event: Event) {
        (self.on_event.borrow_mut())(&event);
    }
}

/// One connection's consumer (pika's `ExampleConsumer`).
struct Consumer {
    number: u32,
    shared: Rc<Shared>,
    connection: RefCell<Option<SelectConnection>>,
    channel: RefCell<Option<Channel>>,
    consumer_tag: RefCell<Option<String>>,
    /// Basic.ConsumeOk received and not yet cancelled.
    consuming: Cell<bool>,
    /// It got as far as consuming at some point.
    was_consuming: Cell<bool>,
    /// A clean shutdown is under way.
    closing: Cell<bool>,
    /// The connection ended without being asked to: connect again.
    should_reconnect: Cell<bool>,
}

fn say(number: u32, text: impl std::fmt::Display) {
    println!("[consumer #{number}] {text}");
}

impl Consumer {
    fn new(number: u32, shared: Rc<Shared>) -> Rc<Consumer> {
        Rc::new(Consumer {
            number,
            shared,
            connection: RefCell::new(None),
            channel: RefCell::new(None),
            consumer_tag: RefCell::new(None),
            consuming: Cell::new(false),
            was_consuming: Cell::new(false),
            closing: Cell::new(false),
            should_reconnect: Cell::new(false),
        })
    }

    fn log(&self, text: impl std::fmt::Display) {
        say(self.number, text);
    }

    fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    fn channel(&self) -> Option<Channel> {
        self.channel.borrow().clone()
    }

    // --- connection -------------------------------------------------------

    fn connect(self: &Rc<Self>, params: ConnectionParameters) -> Result<SelectConnection, Error> {
        self.log(format_args!(
            "connecting to {}:{}",
            params.host(),
            params.port()
        ));
        let (on_open, on_error, on_close) = (self.clone(), self.clone(), self.clone());
        let conn = SelectConnection::new(
            params,
            move |conn| on_open.on_connection_open(conn),
            move |conn, err| on_error.on_connection_open_error(conn, err),
            move |conn, reason| on_close.on_connection_closed(conn, reason),
        )?;
        *self.connection.borrow_mut() = Some(conn.clone());
        Ok(conn)
    }

    fn on_connection_open(self: &Rc<Self>, conn: &SelectConnection) {
        self.log("connection opened");
        self.shared.summary.borrow_mut().connections_opened += 1;
        self.open_channel(conn);
    }

    fn on_connection_open_error(&self, conn: &SelectConnection, err: Error) {
        self.log(format_args!("connection open failed: {err}"));
        self.connection_ended(conn, err);
    }

    fn on_connection_closed(&self, conn: &SelectConnection, reason: Error) {
        self.log(format_args!("connection closed: {reason}"));
        self.connection_ended(conn, reason);
    }

    /// Either way the connection is gone: stop the loop, and tell `run`
    /// whether to connect again.
    fn connection_ended(&self, conn: &SelectConnection, reason: Error) {
        *self.channel.borrow_mut() = None;
        self.consuming.set(false);
        let reconnecting = !self.closing.get();
        self.should_reconnect.set(reconnecting);
        self.shared
            .summary
            .borrow_mut()
            .end_reasons
            .push(reason.clone());
        self.shared.emit(Event::ConnectionEnded {
            connection: self.number,
            reason,
            reconnecting,
        });
        conn.ioloop().stop();
    }

    fn close_connection(&self) {
        self.consuming.set(false);
        let Some(conn) = self.connection.borrow().clone() else {
            return;
        };
        if conn.is_closing() || conn.is_closed() {
            self.log("connection is closing or already closed");
        } else {
            self.log("closing the connection");
            if let Err(e) = conn.close(200, "consumer shutting down") {
                self.log(format_args!("cannot close the connection: {e}"));
            }
        }
    }

    // --- channel ----------------------------------------------------------

    fn open_channel(self: &Rc<Self>, conn: &SelectConnection) {
        self.log("opening a channel");
        let me = self.clone();
        if let Err(e) = conn.channel(None, move |result| me.on_channel_open(result)) {
            self.log(format_args!("cannot open a channel: {e}"));
        }
    }

    fn on_channel_open(self: &Rc<Self>, result: Result<Channel, Error>) {
        let channel = match result {
            Ok(channel) => channel,
            // The connection is going away; its close callback follows.
            Err(e) => return self.log(format_args!("channel did not open: {e}")),
        };
        self.log(format_args!("channel {} opened", channel.channel_number()));
        let me = self.clone();
        channel.add_on_close_callback(move |ch, reason| me.on_channel_closed(ch, reason));
        *self.channel.borrow_mut() = Some(channel.clone());
        if self.closing.get() {
            // A stop arrived while the channel was opening.
            return self.close_connection();
        }
        self.setup_exchange(&channel);
    }

    /// The broker closed the channel (a declare that clashes with what
    /// exists, say), or our clean shutdown did: either way, close the
    /// connection.
    fn on_channel_closed(&self, channel: &Channel, reason: Error) {
        self.log(format_args!(
            "channel {} closed: {reason}",
            channel.channel_number()
        ));
        *self.channel.borrow_mut() = None;
        self.close_connection();
    }

    // --- topology ---------------------------------------------------------

    fn setup_exchange(self: &Rc<Self>, channel: &Channel) {
        let settings = self.settings();
        self.log(format_args!(
            "declaring exchange {} ({})",
            settings.exchange, settings.exchange_type
        ));
        let options = ExchangeDeclareOptions {
            exchange_type: settings.exchange_type.clone(),
            ..Default::default()
        };
        let me = self.clone();
        let declared = channel.exchange_declare(
            &settings.exchange,
            options,
            FieldTable::new(),
            move |ch, r| match r {
                Ok(_) => me.on_exchange_declareok(ch),
                Err(e) => me.log(format_args!("exchange not declared: {e}")),
            },
        );
        if let Err(e) = declared {
            self.log(format_args!("cannot declare the exchange: {e}"));
        }
    }

    fn on_exchange_declareok(self: &Rc<Self>, channel: &Channel) {
        self.log("exchange declared");
        let queue = &self.settings().queue;
        self.log(format_args!("declaring queue {queue}"));
        let me = self.clone();
        let declared = channel.queue_declare(
            queue,
            QueueDeclareOptions::default(),
            FieldTable::new(),
            move |ch, r| match r {
                Ok(ok) => me.on_queue_declareok(ch, ok.message_count),
                Err(e) => me.log(format_args!("queue not declared: {e}")),
            },
        );
        if let Err(e) = declared {
            self.log(format_args!("cannot declare the queue: {e}"));
        }
    }

    fn on_queue_declareok(self: &Rc<Self>, channel: &Channel, waiting: u32) {
        let s = self.settings();
        self.log(format_args!(
            "queue declared ({waiting} messages waiting); binding {} to {} with {}",
            s.queue, s.exchange, s.routing_key
        ));
        let me = self.clone();
        let bound = channel.queue_bind(
            &s.queue,
            &s.exchange,
            Some(&s.routing_key),
            FieldTable::new(),
            move |ch, r| match r {
                Ok(_) => me.on_bindok(ch),
                Err(e) => me.log(format_args!("queue not bound: {e}")),
            },
        );
        if let Err(e) = bound {
            self.log(format_args!("cannot bind the queue: {e}"));
        }
    }

    fn on_bindok(self: &Rc<Self>, channel: &Channel) {
        self.log("queue bound");
        self.set_qos(channel);
    }

    /// With a prefetch count of 1 the broker sends the next message only
    /// once the last one is acknowledged: raise it for throughput.
    fn set_qos(self: &Rc<Self>, channel: &Channel) {
        let prefetch = self.settings().prefetch_count;
        let me = self.clone();
        let sent = channel.basic_qos(0, prefetch, false, move |ch, r| match r {
            Ok(_) => {
                me.log(format_args!("QoS set to {prefetch}"));
                me.start_consuming(ch);
            }
            Err(e) => me.log(format_args!("QoS not set: {e}")),
        });
        if let Err(e) = sent {
            self.log(format_args!("cannot set QoS: {e}"));
        }
    }

    // --- consuming --------------------------------------------------------

    fn start_consuming(self: &Rc<Self>, channel: &Channel) {
        self.log("starting to consume");
        let me = self.clone();
        channel.add_on_cancel_callback(move |ch, cancel| me.on_consumer_cancelled(ch, cancel));
        let (on_message, on_ok) = (self.clone(), self.clone());
        let started = channel.basic_consume(
            &self.settings().queue,
            move |ch, delivery| on_message.on_message(ch, delivery),
            BasicConsumeOptions::default(),
            move |_ch, r| match r {
                Ok(ok) => on_ok.on_consumeok(ok.consumer_tag),
                Err(e) => on_ok.log(format_args!("consume refused: {e}")),
            },
        );
        match started {
            Ok(tag) => {
                *self.consumer_tag.borrow_mut() = Some(tag);
                self.was_consuming.set(true);
                self.consuming.set(true);
            }
            Err(e) => self.log(format_args!("cannot consume: {e}")),
        }
    }

    fn on_consumeok(&self, consumer_tag: String) {
        self.log(format_args!("consuming as {consumer_tag}"));
        self.shared.emit(Event::Consuming {
            connection: self.number,
            consumer_tag,
        });
    }

    /// The broker cancelled our consumer (its queue was deleted, say):
    /// close the channel, which closes the connection, which reconnects.
    fn on_consumer_cancelled(&self, channel: &Channel, cancel: &basic::Cancel) {
        self.log(format_args!(
            "consumer {} cancelled by the broker; closing the channel",
            cancel.consumer_tag
        ));
        self.consuming.set(false);
        if channel.is_open() {
            if let Err(e) = channel.close(200, "consumer cancelled") {
                self.log(format_args!("cannot close the channel: {e}"));
            }
        }
    }

    fn on_message(&self, channel: &Channel, delivery: Delivery) {
        let tag = delivery.method.delivery_tag;
        self.log(format_args!(
            "received message #{tag} from {}: {}",
            delivery.properties.app_id.as_deref().unwrap_or("-"),
            String::from_utf8_lossy(&delivery.body)
        ));
        if let Some(count) = self
            .shared
            .summary
            .borrow_mut()
            .messages_per_connection
            .get_mut(self.number as usize - 1)
        {
            *count += 1;
        }
        match channel.basic_ack(tag, false) {
            Ok(()) => self.shared.summary.borrow_mut().acked += 1,
            Err(e) => self.log(format_args!("cannot acknowledge #{tag}: {e}")),
        }
        self.shared.emit(Event::Message {
            connection: self.number,
            delivery: Box::new(delivery),
        });
    }

    // --- clean shutdown ---------------------------------------------------

    /// Starts the clean shutdown (pika's `stop`): cancel the consumer, and
    /// when the broker confirms, close the channel and then the connection.
    fn stop(self: &Rc<Self>) {
        if self.closing.replace(true) {
            return;
        }
        self.log("stopping");
        let tag = self.consumer_tag.borrow().clone();
        let conn = self.connection.borrow().clone();
        match (self.consuming.get(), self.channel(), tag, conn) {
            (true, Some(channel), Some(tag), _) => self.stop_consuming(&channel, &tag),
            (_, _, _, Some(conn)) if !conn.is_closed() => self.close_connection(),
            (_, _, _, Some(conn)) => conn.ioloop().stop(),
            _ => {}
        }
    }

    fn stop_consuming(self: &Rc<Self>, channel: &Channel, tag: &str) {
        self.log(format_args!("cancelling consumer {tag}"));
        let me = self.clone();
        let sent = channel.basic_cancel(tag, move |ch, r| {
            match r {
                Ok(_) => me.log("the broker confirmed the cancel"),
                Err(e) => me.log(format_args!("cancel failed: {e}")),
            }
            me.on_cancelok(ch);
        });
        if let Err(e) = sent {
            self.log(format_args!("cannot cancel: {e}"));
            self.close_connection();
        }
    }

    fn on_cancelok(&self, channel: &Channel) {
        self.consuming.set(false);
        if channel.is_open() {
            self.log(format_args!("closing channel {}", channel.channel_number()));
            if let Err(e) = channel.close(200, "consumer stopped") {
                self.log(format_args!("cannot close the channel: {e}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Running it, reconnecting (pika's ReconnectingExampleConsumer)
// ---------------------------------------------------------------------------

/// Consumes until `stop` is requested, reconnecting whenever the broker
/// takes the connection away. `on_event` hears of each step (pass
/// `|_| {}` when not interested). Returns what happened.
///
/// # Errors
/// [`Error::InvalidUrl`] for a bad `url`; [`Error::IoLoop`] when no event
/// loop can be created. Failures to connect are not errors: the consumer
/// keeps trying until stopped.
pub fn run(
    url: &str,
    settings: Settings,
    stop: StopHandle,
    on_event: impl FnMut(&Event) + 'static,
) -> Result<Summary, Error> {
    let mut params = UrlParameters::parse(url)?.into_parameters();
    if let Some(name) = &settings.connection_name {
        params.set_connection_name(name.clone());
    }
    let shared = Rc::new(Shared {
        settings,
        summary: RefCell::new(Summary::default()),
        on_event: RefCell::new(Box::new(on_event)),
    });
    let mut reconnect_delay = Duration::ZERO;
    let mut number = 0;
    while !stop.is_requested() {
        number += 1;
        let consumer = Consumer::new(number, shared.clone());
        shared.summary.borrow_mut().messages_per_connection.push(0);
        let conn = consumer.connect(params.clone())?;
        if !stop.attach(conn.threadsafe_handle()) {
            consumer.stop();
        }
        let ran = conn.ioloop().start();
        if ran.is_ok() && stop.is_requested() && !conn.is_closed() {
            // Interrupted by the stop request: shut down cleanly, running
            // the loop until the connection is closed.
            consumer.stop();
            let _ = conn.ioloop().start();
        }
        stop.detach();
        conn.ioloop().close();
        // Break the handle cycles a connection left unclosed would keep.
        *consumer.connection.borrow_mut() = None;
        *consumer.channel.borrow_mut() = None;
        ran.map_err(|e| Error::IoLoop(Arc::new(e)))?;
        if !consumer.should_reconnect.get() {
            break;
        }
        reconnect_delay = if consumer.was_consuming.get() {
            Duration::ZERO
        } else {
            (reconnect_delay + shared.settings.reconnect_delay_step)
                .min(shared.settings.max_reconnect_delay)
        };
        say(
            number,
            format_args!("reconnecting in {} s", reconnect_delay.as_secs_f32()),
        );
        if stop.wait(reconnect_delay) {
            break;
        }
    }
    println!("[consumer] stopped");
    let summary = shared.summary.borrow().clone();
    Ok(summary)
}

#[allow(dead_code)] // the example tests call `run` instead
fn main() -> ExitCode {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let seconds: u64 = match std::env::var("EXAMPLE_RUN_SECS") {
        Ok(s) => match s.parse() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("EXAMPLE_RUN_SECS must be a number of seconds, not {s:?}");
                return ExitCode::FAILURE;
            }
        },
        Err(_) => 10,
    };
    let stop = StopHandle::new();
    if seconds > 0 {
        println!("[consumer] will stop after {seconds} s (EXAMPLE_RUN_SECS), or on Enter");
        let timer = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(seconds));
            timer.request_stop();
        });
    } else {
        println!("[consumer] press Enter to stop");
    }
    // A line on standard input stops it too (end of input does not).
    let on_enter = stop.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        if matches!(std::io::stdin().lock().read_line(&mut line), Ok(n) if n > 0) {
            on_enter.request_stop();
        }
    });
    match run(&url, Settings::default(), stop, |_| {}) {
        Ok(summary) => {
            println!(
                "[consumer] {} connection(s), {} message(s) received, {} acknowledged",
                summary.connections_opened,
                summary.messages(),
                summary.acked
            );
            for (i, reason) in summary.end_reasons.iter().enumerate() {
                println!("[consumer] connection #{} ended: {reason}", i + 1);
            }
            if summary.stopped_cleanly() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
