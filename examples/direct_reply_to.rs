//! RPC over RabbitMQ's direct reply-to, after pika's `direct_reply_to`
//! example: a server and its client in one program, on two channels of one
//! connection.
//!
//! * The **server** declares its request queue (exclusive, auto-delete),
//!   consumes from it, and answers each request by publishing the reply to
//!   the default exchange with the request's `reply_to` as routing key and
//!   its `correlation_id` copied, then acks the request.
//! * The **client** consumes from the pseudo-queue `amq.rabbitmq.reply-to`
//!   with `auto_ack` (RabbitMQ refuses that consumer otherwise), and only
//!   then publishes its requests with `reply_to = "amq.rabbitmq.reply-to"`
//!   and a fresh `correlation_id` each; RabbitMQ rewrites `reply_to` into a
//!   name that routes straight back to this channel's consumer, with no
//!   reply queue at all. Replies are matched to requests by
//!   `correlation_id`; one that matches nothing is counted and ignored.
//!   (Publishing with that `reply_to` from a channel that is not consuming
//!   from `amq.rabbitmq.reply-to` is a channel error.)
//!
//! Once every request has its reply, or `timeout` has passed, the
//! connection is closed.
//!
//! ```text
//! scripts/with-broker cargo run --example direct_reply_to
//! ```
//!
//! `EXAMPLE_REQUESTS` sets how many requests `main` sends (default 3).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pika::{
    BasicConsumeOptions, BasicProperties, Channel, Delivery, Error, FieldTable,
    QueueDeclareOptions, SelectConnection, UrlParameters,
};

/// The pseudo-queue of RabbitMQ's direct reply-to.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// How much RPC to do.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server's request queue.
    pub server_queue: String,
    /// How many requests the client sends.
    pub requests: u32,
    /// How long to wait for all the replies.
    pub timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            server_queue: "rpc.server.queue".into(),
            requests: 3,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A request and the reply matched to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundTrip {
    /// The correlation id both carried.
    pub correlation_id: String,
    /// The request body.
    pub request: String,
    /// The reply body.
    pub reply: String,
}

/// What the server and the client did, returned by [`run`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Requests the client published.
    pub requests_sent: u32,
    /// Requests the server answered.
    pub requests_served: u32,
    /// Replies matched to their requests, in the order they arrived.
    pub round_trips: Vec<RoundTrip>,
    /// Replies whose correlation id matched no pending request.
    pub unmatched_replies: u32,
    /// Whether the timeout ended the run before every reply arrived.
    pub timed_out: bool,
    /// Why the connection ended.
    pub end_reason: Option<Error>,
}

struct Rpc {
    settings: Settings,
    /// Tells this run's correlation ids from any other's.
    run_id: String,
    connection: RefCell<Option<SelectConnection>>,
    /// Requests sent and not yet answered, by correlation id.
    pending: RefCell<HashMap<String, String>>,
    done: Cell<bool>,
    summary: RefCell<Summary>,
}

/// What the server answers to `request`.
pub fn answer(request: &str) -> String {
    match request.strip_prefix("Marco") {
        Some(rest) => format!("Polo{rest}"),
        None => format!("Polo? (to {request:?})"),
    }
}

impl Rpc {
    fn close(&self, why: &str) {
        if self.done.replace(true) {
            return;
        }
        println!("[rpc] {why}; closing the connection");
        let conn = self.connection.borrow().clone();
        if let Some(conn) = conn.filter(|c| !c.is_closing() && !c.is_closed()) {
            if let Err(e) = conn.close(200, why) {
                println!("[rpc] cannot close the connection: {e}");
            }
        }
    }

    // --- server -----------------------------------------------------------

    fn start_server(self: &Rc<Self>, conn: &SelectConnection) {
        let me = self.clone();
        let opened = conn.channel(None, move |r| match r {
            Ok(ch) => me.declare_server_queue(&ch),
            Err(e) => println!("[server] channel did not open: {e}"),
        });
        if let Err(e) = opened {
            println!("[server] cannot open a channel: {e}");
        }
    }

    fn declare_server_queue(self: &Rc<Self>, channel: &Channel) {
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let me = self.clone();
        let sent = channel.queue_declare(
            &self.settings.server_queue,
            options,
            FieldTable::new(),
            move |ch, r| match r {
                Ok(ok) => {
                    println!("[server] request queue {} declared", ok.queue);
                    me.serve(ch);
                }
                Err(e) => println!("[server] queue not declared: {e}"),
            },
        );
        if let Err(e) = sent {
            println!("[server] cannot declare its queue: {e}");
        }
    }

    fn serve(self: &Rc<Self>, channel: &Channel) {
        let (on_request, on_ok) = (self.clone(), self.clone());
        let sent = channel.basic_consume(
            &self.settings.server_queue,
            move |ch, request| on_request.on_request(ch, request),
            BasicConsumeOptions::default(),
            move |ch, r| match r {
                Ok(_) => {
                    println!("[server] waiting for requests");
                    match ch.connection() {
                        Ok(conn) => on_ok.start_client(&conn),
                        Err(e) => println!("[server] {e}"),
                    }
                }
                Err(e) => println!("[server] consume refused: {e}"),
            },
        );
        if let Err(e) = sent {
            println!("[server] cannot consume: {e}");
        }
    }

    fn on_request(&self, channel: &Channel, request: Delivery) {
        let tag = request.method.delivery_tag;
        let body = String::from_utf8_lossy(&request.body).into_owned();
        let Some(reply_to) = request.properties.reply_to.clone() else {
            println!("[server] request {body:?} has no reply_to; dropping it");
            if let Err(e) = channel.basic_reject(tag, false) {
                println!("[server] cannot reject: {e}");
            }
            return;
        };
        println!("[server] got request {body:?}, replying to {reply_to}");
        let mut props = BasicProperties::default().with_content_type("text/plain");
        props.correlation_id = request.properties.correlation_id.clone();
        let reply = answer(&body);
        match channel.basic_publish("", &reply_to, reply.as_bytes(), &props, false) {
            Ok(_) => self.summary.borrow_mut().requests_served += 1,
            Err(e) => println!("[server] cannot reply: {e}"),
        }
        if let Err(e) = channel.basic_ack(tag, false) {
            println!("[server] cannot ack: {e}");
        }
    }

    // --- client -----------------------------------------------------------

    fn start_client(self: &Rc<Self>, conn: &SelectConnection) {
        let me = self.clone();
        let opened = conn.channel(None, move |r| match r {
            Ok(ch) => me.consume_replies(&ch),
            Err(e) => println!("[client] channel did not open: {e}"),
        });
        if let Err(e) = opened {
            println!("[client] cannot open a channel: {e}");
        }
    }

    fn consume_replies(self: &Rc<Self>, channel: &Channel) {
        let (on_reply, on_ok) = (self.clone(), self.clone());
        let options = BasicConsumeOptions {
            auto_ack: true, // required by direct reply-to
            ..Default::default()
        };
        let sent = channel.basic_consume(
            REPLY_TO,
            move |_ch, reply| on_reply.on_reply(reply),
            options,
            move |ch, r| match r {
                Ok(_) => on_ok.send_requests(ch),
                Err(e) => println!("[client] cannot consume replies: {e}"),
            },
        );
        if let Err(e) = sent {
            println!("[client] cannot consume: {e}");
        }
    }

    fn send_requests(&self, channel: &Channel) {
        for n in 1..=self.settings.requests {
            let correlation_id = format!("{}-{n}", self.run_id);
            let body = format!("Marco {n}");
            let props = BasicProperties::default()
                .with_reply_to(REPLY_TO)
                .with_correlation_id(correlation_id.clone());
            match channel.basic_publish(
                "",
                &self.settings.server_queue,
                body.as_bytes(),
                &props,
                false,
            ) {
                Ok(_) => {
                    println!("[client] sent {body:?} as {correlation_id}");
                    self.pending.borrow_mut().insert(correlation_id, body);
                    self.summary.borrow_mut().requests_sent += 1;
                }
                Err(e) => println!("[client] cannot send {body:?}: {e}"),
            }
        }
        if self.pending.borrow().is_empty() {
            self.close("nothing was sent");
        }
    }

    fn on_reply(&self, reply: Delivery) {
        let body = String::from_utf8_lossy(&reply.body).into_owned();
        let id = reply.properties.correlation_id.clone().unwrap_or_default();
        let request = self.pending.borrow_mut().remove(&id);
        match request {
            Some(request) => {
                println!("[client] reply {body:?} to {request:?} ({id})");
                self.summary.borrow_mut().round_trips.push(RoundTrip {
                    correlation_id: id,
                    request,
                    reply: body,
                });
            }
            None => {
                println!("[client] reply {body:?} matches no request (correlation id {id:?})");
                self.summary.borrow_mut().unmatched_replies += 1;
            }
        }
        let sent = self.summary.borrow().requests_sent;
        if sent == self.settings.requests && self.pending.borrow().is_empty() {
            self.close("every request has its reply");
        }
    }
}

/// Runs the server and the client until every request is answered or
/// `settings.timeout` has passed.
///
/// # Errors
/// [`Error::InvalidUrl`] for a bad `url`; [`Error::IoLoop`] when no event
/// loop can be created.
pub fn run(url: &str, settings: Settings) -> Result<Summary, Error> {
    let params = UrlParameters::parse(url)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let timeout = settings.timeout;
    let rpc = Rc::new(Rpc {
        settings,
        run_id: format!("{}-{stamp:x}", std::process::id()),
        connection: RefCell::new(None),
        pending: RefCell::new(HashMap::new()),
        done: Cell::new(false),
        summary: RefCell::new(Summary::default()),
    });
    let (on_open, on_close) = (rpc.clone(), rpc.clone());
    let conn = SelectConnection::new(
        params,
        move |conn| {
            println!("[rpc] connected");
            on_open.start_server(conn);
        },
        |conn, err| {
            println!("[rpc] could not connect: {err}");
            conn.ioloop().stop();
        },
        move |conn, reason| {
            println!("[rpc] connection closed: {reason}");
            on_close.summary.borrow_mut().end_reason = Some(reason);
            conn.ioloop().stop();
        },
    )?;
    *rpc.connection.borrow_mut() = Some(conn.clone());
    let on_timeout = rpc.clone();
    conn.ioloop().call_later(timeout, move || {
        if !on_timeout.done.get() {
            on_timeout.summary.borrow_mut().timed_out = true;
            let missing = on_timeout.pending.borrow().len();
            on_timeout.close(&format!("timed out with {missing} reply(ies) missing"));
        }
    });
    let ran = conn.ioloop().start();
    conn.ioloop().close();
    rpc.connection.borrow_mut().take();
    ran.map_err(|e| Error::IoLoop(Arc::new(e)))?;
    let summary = rpc.summary.borrow().clone();
    Ok(summary)
}

#[allow(dead_code)] // the example tests call `run` instead
fn main() -> ExitCode {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let requests = match std::env::var("EXAMPLE_REQUESTS").map(|s| s.parse::<u32>()) {
        Ok(Ok(n)) => n,
        Ok(Err(_)) => {
            eprintln!("EXAMPLE_REQUESTS must be a number");
            return ExitCode::FAILURE;
        }
        Err(_) => 3,
    };
    let settings = Settings {
        requests,
        ..Settings::default()
    };
    match run(&url, settings) {
        Ok(summary) => {
            println!(
                "[rpc] sent {}, served {}, matched {}, unmatched {}{}",
                summary.requests_sent,
                summary.requests_served,
                summary.round_trips.len(),
                summary.unmatched_replies,
                if summary.timed_out { ", timed out" } else { "" }
            );
            let all_answered = summary.round_trips.len() == requests as usize
                && summary
                    .round_trips
                    .iter()
                    .all(|x| x.reply == answer(&x.request) && !x.correlation_id.is_empty());
            let clean = matches!(
                summary.end_reason,
                Some(Error::ConnectionClosedByClient {
                    reply_code: 200,
                    ..
                })
            );
            if all_answered && clean && !summary.timed_out {
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
