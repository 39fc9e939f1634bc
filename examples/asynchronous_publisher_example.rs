//! pika's asynchronous publisher example, in Rust: a publisher that uses
//! publisher confirms and keeps track of what the broker confirmed.
//!
//! Connect → open a channel → declare the `message` topic exchange, the
//! `text` queue and their `example.text` binding → put the channel in
//! confirm mode → publish a message every `publish_interval` (1 s, with an
//! `ioloop().call_later` timer), each to `example.text`.
//!
//! Every publish in confirm mode returns a delivery tag; the tag joins the
//! set of unconfirmed messages until the broker acks or nacks it (one
//! confirmation may cover every earlier tag: `multiple`), or the channel
//! closes first ([`pika::Confirmation::Failed`]: the message may or may not
//! have reached the queue). The counts are printed as they change and
//! returned at the end.
//!
//! * When the **connection** is lost (`rabbitmqctl close_connection`, a
//!   broker restart, a network fault) or cannot be opened, the publisher
//!   waits `reconnect_delay` (5 s, as in pika) and connects again, with a
//!   fresh channel whose delivery tags start from 1 again.
//! * When the broker closes the **channel**, the publisher closes the
//!   connection, and so reconnects.
//! * On a **stop request**, or after `message_limit` messages, it stops
//!   publishing, waits (at most `confirm_wait`) for the confirmations still
//!   due, then closes the channel and the connection.
//!
//! # Stopping it, and Ctrl-C
//!
//! As in the consumer example: pika stops on Ctrl-C (`KeyboardInterrupt`
//! out of `ioloop.start()`). Here a [`StopHandle`] (`Send + Sync + Clone`)
//! interrupts the loop from any thread through
//! `ConnectionHandle::add_callback_threadsafe`, and [`run`] then shuts down
//! cleanly and runs the loop until the connection is closed. A real program
//! would call [`StopHandle::request_stop`] from a Ctrl-C handler (the
//! `ctrlc` or `signal-hook` crate); this one installs none, so Ctrl-C kills
//! it at once. `main` stops after `EXAMPLE_RUN_SECS` seconds (default 10;
//! `0`: no limit), after `EXAMPLE_MESSAGES` messages when that is set, or
//! when a line is entered on standard input.
//!
//! ```text
//! scripts/with-broker cargo run --example asynchronous_publisher_example
//! ```
//!
//! Reads the broker from `AMQP_URL` (default
//! `amqp://guest:guest@localhost:5672/%2F`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use pika::{
    BasicProperties, Channel, Confirmation, ConnectionHandle, ConnectionParameters, Error,
    ExchangeDeclareOptions, FieldTable, QueueDeclareOptions, SelectConnection, UrlParameters,
};

/// Where to publish, how often, and for how long.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The exchange to declare and publish to (pika's example: `message`).
    pub exchange: String,
    /// Its type (`topic`).
    pub exchange_type: String,
    /// The queue to declare and bind, so that messages have somewhere to
    /// go (`text`).
    pub queue: String,
    /// Arguments of the queue declare (none in pika's example; e.g.
    /// `x-max-length` with `x-overflow: reject-publish` makes the broker
    /// nack what does not fit).
    pub queue_arguments: FieldTable,
    /// The routing key of every message, and the binding key
    /// (`example.text`).
    pub routing_key: String,
    /// The time between two messages.
    pub publish_interval: Duration,
    /// Stop after this many messages in all (over all connections).
    pub message_limit: Option<u64>,
    /// The wait before connecting again after a connection was lost.
    pub reconnect_delay: Duration,
    /// How long a stop waits for outstanding confirmations.
    pub confirm_wait: Duration,
    /// A name shown by the broker's management tools (`connection_name`).
    pub connection_name: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            exchange: "message".into(),
            exchange_type: "topic".into(),
            queue: "text".into(),
            queue_arguments: FieldTable::new(),
            routing_key: "example.text".into(),
            publish_interval: Duration::from_secs(1),
            message_limit: None,
            reconnect_delay: Duration::from_secs(5),
            confirm_wait: Duration::from_secs(5),
            connection_name: None,
        }
    }
}

/// What happened, as it happens (the tests use it to follow along).
#[derive(Debug, Clone)]
pub enum Event {
    /// Connection attempt number `connection` (from 1) has its channel in
    /// confirm mode and starts publishing.
    Publishing {
        /// Which connection.
        connection: u32,
    },
    /// A message went out.
    Published {
        /// Which connection.
        connection: u32,
        /// Its delivery tag on that connection's channel.
        delivery_tag: u64,
    },
    /// The broker (or the channel's closing) settled one or more messages.
    Confirmed {
        /// Which connection.
        connection: u32,
        /// The confirmation as the library reported it.
        confirmation: Confirmation,
    },
    /// A connection ended, or could not be opened.
    ConnectionEnded {
        /// Which connection.
        connection: u32,
        /// Why.
        reason: Error,
        /// Whether the publisher will connect again.
        reconnecting: bool,
    },
}

/// The counts of one connection attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Messages published.
    pub published: u64,
    /// Messages the broker acked.
    pub acked: u64,
    /// Messages the broker nacked.
    pub nacked: u64,
    /// Messages whose channel closed before they were confirmed.
    pub failed: u64,
}

impl ConnectionStats {
    /// Published and not (yet) settled one way or the other.
    pub fn unconfirmed(&self) -> u64 {
        self.published - self.acked - self.nacked - self.failed
    }
}

/// What the publisher did, returned by [`run`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// How many connections were opened.
    pub connections_opened: u32,
    /// The counts of each connection attempt, in order.
    pub per_connection: Vec<ConnectionStats>,
    /// Why each connection ended (or failed to open), in order.
    pub end_reasons: Vec<Error>,
}

impl Summary {
    /// The counts over all connections.
    pub fn total(&self) -> ConnectionStats {
        self.per_connection
            .iter()
            .fold(ConnectionStats::default(), |a, c| ConnectionStats {
                published: a.published + c.published,
                acked: a.acked + c.acked,
                nacked: a.nacked + c.nacked,
                failed: a.failed + c.failed,
            })
    }

    /// Whether the last connection was closed by us with 200.
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

/// Asks a running publisher to stop cleanly, from any thread.
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
        let (lock, wakeup) = &*self.shared;
        let running = {
            let mut state = lock.lock().unwrap_or_else(PoisonError::into_inner);
            state.requested = true;
            wakeup.notify_all();
            state.connection.clone()
        };
        if let Some(handle) = running {
            // Interrupt the loop; `run` carries on with the shutdown.
            if let Err(e) = handle.add_callback_threadsafe(|conn| conn.ioloop().stop()) {
                println!("[publisher] stop requested while the connection closes: {e}");
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
// The publisher: one per connection
// ---------------------------------------------------------------------------

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

/// One connection's publisher (pika's `ExamplePublisher`).
struct Publisher {
    number: u32,
    shared: Rc<Shared>,
    connection: RefCell<Option<SelectConnection>>,
    channel: RefCell<Option<Channel>>,
    /// Delivery tags published and not yet settled.
    deliveries: RefCell<BTreeSet<u64>>,
    stopping: Cell<bool>,
    closing: Cell<bool>,
    should_reconnect: Cell<bool>,
}

fn say(number: u32, text: impl std::fmt::Display) {
    println!("[publisher #{number}] {text}");
}

impl Publisher {
    fn new(number: u32, shared: Rc<Shared>) -> Rc<Publisher> {
        Rc::new(Publisher {
            number,
            shared,
            connection: RefCell::new(None),
            channel: RefCell::new(None),
            deliveries: RefCell::new(BTreeSet::new()),
            stopping: Cell::new(false),
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

    /// Applies `f` to this connection's counts.
    fn count(&self, f: impl FnOnce(&mut ConnectionStats)) {
        if let Some(stats) = self
            .shared
            .summary
            .borrow_mut()
            .per_connection
            .get_mut(self.number as usize - 1)
        {
            f(stats);
        }
    }

    fn stats(&self) -> ConnectionStats {
        self.shared.summary.borrow().per_connection[self.number as usize - 1]
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
            move |conn, err| {
                on_error.log(format_args!("connection open failed: {err}"));
                on_error.connection_ended(conn, err);
            },
            move |conn, reason| {
                on_close.log(format_args!("connection closed: {reason}"));
                on_close.connection_ended(conn, reason);
            },
        )?;
        *self.connection.borrow_mut() = Some(conn.clone());
        Ok(conn)
    }

    fn on_connection_open(self: &Rc<Self>, conn: &SelectConnection) {
        self.log("connection opened; opening a channel");
        self.shared.summary.borrow_mut().connections_opened += 1;
        let me = self.clone();
        if let Err(e) = conn.channel(None, move |result| me.on_channel_open(result)) {
            self.log(format_args!("cannot open a channel: {e}"));
        }
    }

    fn connection_ended(&self, conn: &SelectConnection, reason: Error) {
        *self.channel.borrow_mut() = None;
        let reconnecting = !self.stopping.get();
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
        let Some(conn) = self.connection.borrow().clone() else {
            return;
        };
        if !conn.is_closing() && !conn.is_closed() {
            self.log("closing the connection");
            if let Err(e) = conn.close(200, "publisher shutting down") {
                self.log(format_args!("cannot close the connection: {e}"));
            }
        }
    }

    // --- channel and topology ---------------------------------------------

    fn on_channel_open(self: &Rc<Self>, result: Result<Channel, Error>) {
        let channel = match result {
            Ok(channel) => channel,
            Err(e) => return self.log(format_args!("channel did not open: {e}")),
        };
        self.log(format_args!("channel {} opened", channel.channel_number()));
        let me = self.clone();
        channel.add_on_close_callback(move |ch, reason| {
            me.log(format_args!(
                "channel {} closed: {reason}",
                ch.channel_number()
            ));
            *me.channel.borrow_mut() = None;
            if !me.stopping.get() {
                me.close_connection();
            }
        });
        *self.channel.borrow_mut() = Some(channel.clone());
        if self.stopping.get() {
            return self.close_channel_and_connection();
        }
        self.setup_exchange(&channel);
    }

    fn setup_exchange(self: &Rc<Self>, channel: &Channel) {
        let s = self.settings();
        self.log(format_args!(
            "declaring exchange {} ({})",
            s.exchange, s.exchange_type
        ));
        let options = ExchangeDeclareOptions {
            exchange_type: s.exchange_type.clone(),
            ..Default::default()
        };
        // The closure carries the name along: pika's example shows
        // `functools.partial` for this.
        let (me, name) = (self.clone(), s.exchange.clone());
        let sent = channel.exchange_declare(
            &s.exchange,
            options,
            FieldTable::new(),
            move |ch, r| match r {
                Ok(_) => {
                    me.log(format_args!("exchange {name} declared"));
                    me.setup_queue(ch);
                }
                Err(e) => me.log(format_args!("exchange not declared: {e}")),
            },
        );
        if let Err(e) = sent {
            self.log(format_args!("cannot declare the exchange: {e}"));
        }
    }

    fn setup_queue(self: &Rc<Self>, channel: &Channel) {
        let queue = &self.settings().queue;
        self.log(format_args!("declaring queue {queue}"));
        let me = self.clone();
        let sent = channel.queue_declare(
            queue,
            QueueDeclareOptions::default(),
            self.settings().queue_arguments.clone(),
            move |ch, r| match r {
                Ok(_) => me.bind_queue(ch),
                Err(e) => me.log(format_args!("queue not declared: {e}")),
            },
        );
        if let Err(e) = sent {
            self.log(format_args!("cannot declare the queue: {e}"));
        }
    }

    fn bind_queue(self: &Rc<Self>, channel: &Channel) {
        let s = self.settings();
        self.log(format_args!(
            "binding {} to {} with {}",
            s.exchange, s.queue, s.routing_key
        ));
        let me = self.clone();
        let sent = channel.queue_bind(
            &s.queue,
            &s.exchange,
            Some(&s.routing_key),
            FieldTable::new(),
            move |ch, r| match r {
                Ok(_) => {
                    me.log("queue bound");
                    me.enable_delivery_confirmations(ch);
                }
                Err(e) => me.log(format_args!("queue not bound: {e}")),
            },
        );
        if let Err(e) = sent {
            self.log(format_args!("cannot bind the queue: {e}"));
        }
    }

    // --- confirms ---------------------------------------------------------

    /// Confirm.Select: from now on the broker confirms every message. The
    /// only way back is a new channel.
    fn enable_delivery_confirmations(self: &Rc<Self>, channel: &Channel) {
        self.log("enabling delivery confirmations");
        let (on_confirm, on_ok) = (self.clone(), self.clone());
        let sent = channel.confirm_delivery(
            move |_ch, confirmation| on_confirm.on_delivery_confirmation(confirmation),
            move |_ch, r| match r {
                Ok(_) => {
                    on_ok.shared.emit(Event::Publishing {
                        connection: on_ok.number,
                    });
                    on_ok.schedule_next_message();
                }
                Err(e) => on_ok.log(format_args!("confirm mode refused: {e}")),
            },
        );
        if let Err(e) = sent {
            self.log(format_args!("cannot enable confirmations: {e}"));
        }
    }

    fn on_delivery_confirmation(self: &Rc<Self>, confirmation: Confirmation) {
        // The confirmation lists every tag it settles (all of them at once
        // for a `multiple` ack or nack, and for a channel's end).
        let kind = if confirmation.is_ack() {
            "ack"
        } else if confirmation.is_nack() {
            "nack"
        } else {
            "failed"
        };
        let settled = {
            let mut deliveries = self.deliveries.borrow_mut();
            confirmation
                .settled()
                .iter()
                .filter(|tag| deliveries.remove(tag))
                .count() as u64
        };
        self.count(|s| match kind {
            "ack" => s.acked += settled,
            "nack" => s.nacked += settled,
            _ => s.failed += settled,
        });
        let s = self.stats();
        self.log(format_args!(
            "{kind} for delivery tags {:?}: published {}, unconfirmed {}, acked {}, nacked {}, failed {}",
            confirmation.settled(),
            s.published,
            s.unconfirmed(),
            s.acked,
            s.nacked,
            s.failed
        ));
        self.shared.emit(Event::Confirmed {
            connection: self.number,
            confirmation,
        });
        if self.stopping.get() && self.deliveries.borrow().is_empty() {
            self.close_channel_and_connection();
        }
    }

    // --- publishing -------------------------------------------------------

    fn schedule_next_message(self: &Rc<Self>) {
        let Some(conn) = self.connection.borrow().clone() else {
            return;
        };
        let me = self.clone();
        conn.ioloop()
            .call_later(self.settings().publish_interval, move || {
                me.publish_message()
            });
    }

    fn publish_message(self: &Rc<Self>) {
        if self.stopping.get() {
            return;
        }
        let Some(channel) = self.channel.borrow().clone() else {
            return;
        };
        if !channel.is_open() {
            return;
        }
        let number = self.shared.summary.borrow().total().published + 1;
        let mut headers = FieldTable::new();
        headers.insert("schlüssel", "wert");
        headers.insert("clé", "valeur");
        headers.insert("ключ", "значение");
        let properties = BasicProperties::default()
            .with_app_id("example-publisher")
            .with_content_type("application/json")
            .with_headers(headers);
        let body = format!(r#"{{"message": {number}, "greeting": "Grüße, 世界"}}"#);
        let s = self.settings();
        match channel.basic_publish(
            &s.exchange,
            &s.routing_key,
            body.as_bytes(),
            &properties,
            false,
        ) {
            Ok(Some(tag)) => {
                self.deliveries.borrow_mut().insert(tag);
                self.count(|s| s.published += 1);
                self.log(format_args!(
                    "published message {number} (delivery tag {tag})"
                ));
                self.shared.emit(Event::Published {
                    connection: self.number,
                    delivery_tag: tag,
                });
            }
            Ok(None) => self.log("published, but the channel is not in confirm mode"),
            Err(e) => self.log(format_args!("cannot publish: {e}")),
        }
        let limit_reached = s.message_limit.is_some_and(|limit| number >= limit);
        if limit_reached {
            self.log(format_args!("{number} messages published: that is all"));
            self.stop();
        } else {
            self.schedule_next_message();
        }
    }

    // --- stopping ---------------------------------------------------------

    /// Stops publishing; closes once every message is confirmed, or after
    /// `confirm_wait` at the latest.
    fn stop(self: &Rc<Self>) {
        if self.stopping.replace(true) {
            return;
        }
        let outstanding = self.deliveries.borrow().len();
        if outstanding == 0 || self.channel.borrow().is_none() {
            self.log("stopping");
            return self.close_channel_and_connection();
        }
        let wait = self.settings().confirm_wait;
        self.log(format_args!(
            "stopping: waiting up to {} s for {outstanding} confirmation(s)",
            wait.as_secs_f32()
        ));
        let Some(conn) = self.connection.borrow().clone() else {
            return;
        };
        let me = self.clone();
        conn.ioloop()
            .call_later(wait, move || me.close_channel_and_connection());
    }

    fn close_channel_and_connection(&self) {
        if self.closing.replace(true) {
            return;
        }
        let channel = self.channel.borrow().clone();
        if let Some(channel) = channel.filter(|c| c.is_open()) {
            self.log(format_args!("closing channel {}", channel.channel_number()));
            if let Err(e) = channel.close(200, "publisher stopped") {
                self.log(format_args!("cannot close the channel: {e}"));
            }
        }
        self.close_connection();
    }
}

// ---------------------------------------------------------------------------
// Running it, reconnecting
// ---------------------------------------------------------------------------

/// Publishes until `stop` is requested or `message_limit` messages went
/// out, reconnecting whenever the connection is lost. `on_event` hears of
/// each step (pass `|_| {}` when not interested).
///
/// # Errors
/// [`Error::InvalidUrl`] for a bad `url`; [`Error::IoLoop`] when no event
/// loop can be created.
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
    let mut number = 0;
    while !stop.is_requested() {
        number += 1;
        let publisher = Publisher::new(number, shared.clone());
        shared
            .summary
            .borrow_mut()
            .per_connection
            .push(ConnectionStats::default());
        let conn = publisher.connect(params.clone())?;
        if !stop.attach(conn.threadsafe_handle()) {
            publisher.stop();
        }
        let ran = conn.ioloop().start();
        if ran.is_ok() && stop.is_requested() && !conn.is_closed() {
            publisher.stop();
            let _ = conn.ioloop().start();
        }
        stop.detach();
        conn.ioloop().close();
        *publisher.connection.borrow_mut() = None;
        *publisher.channel.borrow_mut() = None;
        ran.map_err(|e| Error::IoLoop(Arc::new(e)))?;
        if !publisher.should_reconnect.get() {
            break;
        }
        let delay = shared.settings.reconnect_delay;
        say(
            number,
            format_args!("reconnecting in {} s", delay.as_secs_f32()),
        );
        if stop.wait(delay) {
            break;
        }
    }
    let summary = shared.summary.borrow().clone();
    let t = summary.total();
    println!(
        "[publisher] stopped: {} connection(s); published {}, acked {}, nacked {}, failed {}, unconfirmed {}",
        summary.connections_opened,
        t.published,
        t.acked,
        t.nacked,
        t.failed,
        t.unconfirmed()
    );
    Ok(summary)
}

fn env_number(name: &str) -> Result<Option<u64>, String> {
    match std::env::var(name) {
        Ok(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("{name} must be a number, not {s:?}")),
        Err(_) => Ok(None),
    }
}

#[allow(dead_code)] // the example tests call `run` instead
fn main() -> ExitCode {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let (seconds, limit) = match (
        env_number("EXAMPLE_RUN_SECS"),
        env_number("EXAMPLE_MESSAGES"),
    ) {
        (Ok(s), Ok(m)) => (s.unwrap_or(10), m),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = StopHandle::new();
    if seconds > 0 {
        println!("[publisher] will stop after {seconds} s (EXAMPLE_RUN_SECS), or on Enter");
        let timer = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(seconds));
            timer.request_stop();
        });
    }
    let on_enter = stop.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        if matches!(std::io::stdin().lock().read_line(&mut line), Ok(n) if n > 0) {
            on_enter.request_stop();
        }
    });
    let settings = Settings {
        message_limit: limit,
        ..Settings::default()
    };
    match run(&url, settings, stop, |_| {}) {
        Ok(summary) => {
            for (i, (stats, reason)) in summary
                .per_connection
                .iter()
                .zip(&summary.end_reasons)
                .enumerate()
            {
                println!(
                    "[publisher] connection #{}: published {}, acked {}, nacked {}, failed {}; ended: {reason}",
                    i + 1,
                    stats.published,
                    stats.acked,
                    stats.nacked,
                    stats.failed
                );
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
