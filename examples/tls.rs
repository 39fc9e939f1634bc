//! pika's TLS example ("TLS parameters example"): a session with RabbitMQ
//! over mutual TLS — the broker is verified against a private CA, and the
//! client presents a certificate of its own — in which a queue is
//! declared, a message published to it and fetched back with Basic.Get.
//! With EXTERNAL on, the client logs in with SASL EXTERNAL (the broker
//! takes the user name from the client certificate) instead of PLAIN with
//! the URL's user and password.
//!
//! Unlike pika's version, the publish is confirmed (publisher confirms)
//! before the Basic.Get, the message is fetched with `auto_ack`, and the
//! queue is deleted again before the connection is closed.
//!
//! Settings, from the environment (the names `scripts/with-broker`
//! exports):
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `AMQPS_URL` | the broker | `amqps://guest:guest@localhost:5671/%2F` |
//! | `AMQP_TLS_CA` | CA certificate(s) the broker's certificate must chain to (PEM) | `testdata/certs/ca_certificate.pem` |
//! | `AMQP_TLS_CLIENT_CERT` | the client's certificate chain (PEM) | `testdata/certs/client_certificate.pem` |
//! | `AMQP_TLS_CLIENT_KEY` | its private key (PEM) | `testdata/certs/client_key.pem` |
//! | `AMQP_TLS_SERVER_HOSTNAME` | the name the broker's certificate must carry; empty: the URL's host | `localhost` |
//! | `AMQP_TLS_EXTERNAL` | `1`, `true` or `yes`: log in with EXTERNAL (as does `--external`) | off |
//!
//! ```text
//! scripts/with-broker cargo run --example tls
//! scripts/with-broker cargo run --example tls -- --external
//! ```
//!
//! The broker needs a TLS listener that asks for client certificates and,
//! for EXTERNAL, the `rabbitmq_auth_mechanism_ssl` plugin
//! (`scripts/with-broker` sets up both).

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use pika::{
    BasicProperties, Channel, Confirmation, ConnectionParameters, Error, ExternalCredentials,
    FieldTable, FieldValue, QueueDeclareOptions, QueueDeleteOptions, SelectConnection, SslOptions,
    UrlParameters,
};

/// The broker when `AMQPS_URL` is not set.
pub const DEFAULT_URL: &str = "amqps://guest:guest@localhost:5671/%2F";
/// The CA file when `AMQP_TLS_CA` is not set (pika's test data layout).
pub const DEFAULT_CA: &str = "testdata/certs/ca_certificate.pem";
/// The client certificate when `AMQP_TLS_CLIENT_CERT` is not set.
pub const DEFAULT_CLIENT_CERT: &str = "testdata/certs/client_certificate.pem";
/// The client key when `AMQP_TLS_CLIENT_KEY` is not set.
pub const DEFAULT_CLIENT_KEY: &str = "testdata/certs/client_key.pem";
/// The name verified when `AMQP_TLS_SERVER_HOSTNAME` is not set (pika's
/// example passes `SSLOptions(context, "localhost")`).
pub const DEFAULT_SERVER_HOSTNAME: &str = "localhost";

/// What to connect to, with what, and what to send.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker's `amqps://` URL.
    pub url: String,
    /// CA certificate(s) to verify the broker with.
    pub ca_certs: PathBuf,
    /// The client certificate chain.
    pub certfile: PathBuf,
    /// The client certificate's private key.
    pub keyfile: PathBuf,
    /// The name the broker's certificate must carry (`None`: the URL's
    /// host).
    pub server_hostname: Option<String>,
    /// Log in with SASL EXTERNAL instead of PLAIN.
    pub external: bool,
    /// The queue declared, published to, read from and deleted.
    pub queue: String,
    /// The message body.
    pub body: String,
    /// How long the whole session may take before it is closed.
    pub timeout: Duration,
}

impl Settings {
    /// The settings from the environment variables above, with their
    /// defaults; the queue is pika's `foobar`, the body `Hello, world!`.
    pub fn from_env() -> Settings {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let server_hostname = var("AMQP_TLS_SERVER_HOSTNAME", DEFAULT_SERVER_HOSTNAME);
        let external = var("AMQP_TLS_EXTERNAL", "").to_ascii_lowercase();
        Settings {
            url: var("AMQPS_URL", DEFAULT_URL),
            ca_certs: var("AMQP_TLS_CA", DEFAULT_CA).into(),
            certfile: var("AMQP_TLS_CLIENT_CERT", DEFAULT_CLIENT_CERT).into(),
            keyfile: var("AMQP_TLS_CLIENT_KEY", DEFAULT_CLIENT_KEY).into(),
            server_hostname: Some(server_hostname).filter(|name| !name.is_empty()),
            external: matches!(external.as_str(), "1" | "true" | "yes"),
            queue: "foobar".to_string(),
            body: "Hello, world!".to_string(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// What the session did, returned by [`run`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The broker's address, once connected.
    pub connected_to: Option<String>,
    /// The SASL mechanism the client logged in with, once open.
    pub mechanism: Option<String>,
    /// The SASL mechanisms the broker offered on this listener.
    pub offered_mechanisms: Option<String>,
    /// The queue, once declared.
    pub queue: Option<String>,
    /// The message was published.
    pub published: bool,
    /// The broker confirmed the message.
    pub confirmed: bool,
    /// The body Basic.Get fetched (`None` when nothing came back).
    pub got: Option<Vec<u8>>,
    /// The queue was deleted again.
    pub queue_deleted: bool,
    /// The timeout ended the session.
    pub timed_out: bool,
    /// Why the connection ended: the open error, or the close reason.
    pub end_reason: Option<Error>,
}

struct Session {
    settings: Settings,
    mechanism: &'static str,
    summary: RefCell<Summary>,
    connection: RefCell<Option<SelectConnection>>,
    closing: Cell<bool>,
}

impl Session {
    fn close(&self, why: &str) {
        if self.closing.replace(true) {
            return;
        }
        println!("closing: {why}");
        let conn = self.connection.borrow().clone();
        if let Some(conn) = conn.filter(|c| !c.is_closed()) {
            if let Err(e) = conn.close(200, why) {
                println!("cannot close the connection ({e}); stopping");
                conn.ioloop().stop();
            }
        }
    }

    fn on_open(self: &Rc<Self>, conn: &SelectConnection) {
        let peer = conn
            .peer_address()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let offered = conn
            .server_properties()
            .get("mechanisms")
            .and_then(FieldValue::as_str)
            .unwrap_or_default()
            .to_string();
        println!(
            "connected to {peer} over TLS, logged in with {} (the broker offers {offered})",
            self.mechanism
        );
        {
            let mut summary = self.summary.borrow_mut();
            summary.connected_to = Some(peer);
            summary.mechanism = Some(self.mechanism.to_string());
            summary.offered_mechanisms = Some(offered);
        }
        let me = self.clone();
        let opened = conn.channel(None, move |result| match result {
            Ok(channel) => me.declare(&channel),
            Err(e) => me.close(&format!("the channel did not open: {e}")),
        });
        if let Err(e) = opened {
            self.close(&format!("cannot open a channel: {e}"));
        }
    }

    fn declare(self: &Rc<Self>, channel: &Channel) {
        let me = self.clone();
        let sent = channel.queue_declare(
            &self.settings.queue,
            QueueDeclareOptions::default(),
            FieldTable::new(),
            move |channel, result| match result {
                Ok(ok) => {
                    println!("queue {} declared", ok.queue);
                    me.summary.borrow_mut().queue = Some(ok.queue);
                    me.confirm_and_publish(channel);
                }
                Err(e) => me.close(&format!("the queue was not declared: {e}")),
            },
        );
        if let Err(e) = sent {
            self.close(&format!("cannot declare the queue: {e}"));
        }
    }

    fn confirm_and_publish(self: &Rc<Self>, channel: &Channel) {
        let (on_confirm, on_select) = (self.clone(), self.clone());
        let selected = channel.confirm_delivery(
            move |channel, confirmation| on_confirm.on_confirmation(channel, confirmation),
            move |channel, result| match result {
                Ok(_) => on_select.publish(channel),
                Err(e) => on_select.close(&format!("confirm mode refused: {e}")),
            },
        );
        if let Err(e) = selected {
            self.close(&format!("cannot turn publisher confirms on: {e}"));
        }
    }

    fn publish(&self, channel: &Channel) {
        let properties = BasicProperties::default().with_content_type("text/plain");
        let body = self.settings.body.as_bytes();
        match channel.basic_publish("", &self.settings.queue, body, &properties, false) {
            Ok(_) => {
                println!(
                    "published {:?} to {}",
                    self.settings.body, self.settings.queue
                );
                self.summary.borrow_mut().published = true;
            }
            Err(e) => self.close(&format!("cannot publish: {e}")),
        }
    }

    fn on_confirmation(self: &Rc<Self>, channel: &Channel, confirmation: Confirmation) {
        match confirmation {
            Confirmation::Ack { .. } => {
                println!("the broker confirmed the message");
                self.summary.borrow_mut().confirmed = true;
                self.get(channel);
            }
            other => self.close(&format!("the message was not confirmed: {other:?}")),
        }
    }

    fn get(self: &Rc<Self>, channel: &Channel) {
        let me = self.clone();
        let sent = channel.basic_get(
            &self.settings.queue,
            true,
            move |channel, result| match result {
                Ok(Some(message)) => {
                    println!(
                        "got {:?} back (delivery tag {}, {} left in the queue)",
                        String::from_utf8_lossy(&message.body),
                        message.method.delivery_tag,
                        message.method.message_count
                    );
                    me.summary.borrow_mut().got = Some(message.body);
                    me.delete(channel);
                }
                Ok(None) => {
                    println!("the queue was empty");
                    me.delete(channel);
                }
                Err(e) => me.close(&format!("Basic.Get failed: {e}")),
            },
        );
        if let Err(e) = sent {
            self.close(&format!("cannot get: {e}"));
        }
    }

    fn delete(self: &Rc<Self>, channel: &Channel) {
        let me = self.clone();
        let sent = channel.queue_delete(
            &self.settings.queue,
            QueueDeleteOptions::default(),
            move |_, result| match result {
                Ok(ok) => {
                    println!(
                        "queue {} deleted with {} message(s) in it",
                        me.settings.queue, ok.message_count
                    );
                    me.summary.borrow_mut().queue_deleted = true;
                    me.close("tls example done");
                }
                Err(e) => me.close(&format!("the queue was not deleted: {e}")),
            },
        );
        if let Err(e) = sent {
            self.close(&format!("cannot delete the queue: {e}"));
        }
    }
}

/// The connection parameters `settings` describe.
///
/// # Errors
/// [`Error::InvalidUrl`] (and the other URL errors) for a bad URL;
/// [`Error::Tls`] naming a certificate or key file that cannot be read.
pub fn parameters(settings: &Settings) -> Result<ConnectionParameters, Error> {
    let mut ssl = SslOptions::from_pem_files(
        Some(&settings.ca_certs),
        Some((&settings.certfile, &settings.keyfile)),
    )?;
    if let Some(name) = &settings.server_hostname {
        ssl = ssl.with_server_hostname(name.clone());
    }
    let mut params: ConnectionParameters = UrlParameters::parse(&settings.url)?.into();
    params.set_ssl_options(Some(ssl));
    if settings.external {
        params.set_credentials(ExternalCredentials::new());
    }
    Ok(params)
}

/// Runs the session until the connection is closed (or could not be
/// opened); what happened is in the summary, its `end_reason` included.
///
/// # Errors
/// As [`parameters`]; [`Error::IoLoop`] when no event loop can be created.
pub fn run(settings: &Settings) -> Result<Summary, Error> {
    let params = parameters(settings)?;
    let mechanism = params.credentials().mechanism();
    // Host and port only: the URL may carry a password.
    println!(
        "connecting to {}:{} over TLS (CA {}, client certificate {}), {mechanism} login",
        params.host(),
        params.port(),
        settings.ca_certs.display(),
        settings.certfile.display()
    );
    let session = Rc::new(Session {
        settings: settings.clone(),
        mechanism,
        summary: RefCell::new(Summary::default()),
        connection: RefCell::new(None),
        closing: Cell::new(false),
    });
    let (on_open, on_open_error, on_close) = (session.clone(), session.clone(), session.clone());
    let conn = SelectConnection::new(
        params,
        move |conn| on_open.on_open(conn),
        move |conn, error| {
            println!("could not connect: {error}");
            on_open_error.summary.borrow_mut().end_reason = Some(error);
            conn.ioloop().stop();
        },
        move |conn, reason| {
            println!("connection closed: {reason}");
            on_close.summary.borrow_mut().end_reason = Some(reason);
            conn.ioloop().stop();
        },
    )?;
    *session.connection.borrow_mut() = Some(conn.clone());
    let on_timeout = session.clone();
    let timer = conn.ioloop().call_later(settings.timeout, move || {
        on_timeout.summary.borrow_mut().timed_out = true;
        // A close already under way has a bound of its own.
        on_timeout.close("timed out");
    });
    let ran = conn.ioloop().start();
    conn.ioloop().remove_timeout(timer);
    session.connection.borrow_mut().take();
    ran.map_err(|e| Error::IoLoop(Arc::new(e)))?;
    let summary = session.summary.borrow().clone();
    Ok(summary)
}

#[allow(dead_code)] // the TLS tests call `run` instead
fn main() -> ExitCode {
    let mut settings = Settings::from_env();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--external" => settings.external = true,
            "--plain" => settings.external = false,
            other => {
                eprintln!("usage: tls [--external | --plain] (unknown argument {other:?})");
                return ExitCode::FAILURE;
            }
        }
    }
    match run(&settings) {
        Ok(summary) => {
            let clean = matches!(
                summary.end_reason,
                Some(Error::ConnectionClosedByClient {
                    reply_code: 200,
                    ..
                })
            );
            let round_trip = summary.got.as_deref() == Some(settings.body.as_bytes());
            if clean && round_trip && summary.queue_deleted && !summary.timed_out {
                ExitCode::SUCCESS
            } else {
                eprintln!("the session did not go as planned: {summary:?}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
