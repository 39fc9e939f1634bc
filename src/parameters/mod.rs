//! Connection parameters (pika's `ConnectionParameters` and
//! `URLParameters`): where to connect, how to log in, what to negotiate,
//! the client properties sent in `Connection.StartOk`, and the socket's TCP
//! options, with pika 1.1.0's defaults and validation.
//!
//! ```
//! use std::time::Duration;
//! use pika::parameters::{ConnectionParameters, Heartbeat, UrlParameters};
//! use pika::credentials::PlainCredentials;
//!
//! // Field by field, like pika.ConnectionParameters(...).
//! let mut params = ConnectionParameters::new();
//! params
//!     .set_host("rabbit-server1")?
//!     .set_virtual_host("/")?
//!     .set_credentials(PlainCredentials::new("guest", "guest"))
//!     .set_heartbeat(30)
//!     .set_socket_timeout(Duration::from_secs(5))?;
//! assert_eq!(params.port(), 5672);
//! assert!(matches!(params.heartbeat(), Heartbeat::Timeout(30)));
//!
//! // Or from a URL, like pika.URLParameters(...).
//! let url = UrlParameters::parse("amqp://www-data:rabbit_pwd@rabbit1/web_messages?heartbeat=30")?;
//! assert_eq!(url.host(), "rabbit1");
//! assert_eq!(url.virtual_host(), "web_messages");
//! assert_eq!(url.to_string(), "amqp://www-data:<redacted>@rabbit1/web_messages?heartbeat=30");
//! # Ok::<(), pika::Error>(())
//! ```
//!
//! The code is split by what it owns: this module holds [`Heartbeat`],
//! [`ConnectionParameters`], [`default_client_properties`] and the
//! validation the setters share with the URL options; `url.rs` holds
//! [`UrlParameters`] and the reading of AMQP URLs and their query options;
//! `url_ssl.rs` reads the `ssl_options` query option into TLS settings;
//! `tcp.rs` holds [`TcpOptions`]; and the private `pyliteral.rs` parses the
//! Python-literal dicts that the `client_properties`, `tcp_options` and
//! `ssl_options` query options take.

mod pyliteral;
mod tcp;
mod url;
mod url_ssl;

pub use self::tcp::TcpOptions;
pub use self::url::UrlParameters;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::credentials::Credentials;
use crate::error::Error;
use crate::table::{FieldTable, FieldValue};
use crate::tls::SslOptions;

/// The heartbeat timeout to ask for in `Connection.TuneOk` (pika's
/// `heartbeat` parameter).
///
/// Converts from `u16` (`0` is [`Disabled`](Heartbeat::Disabled), any other
/// value a [`Timeout`](Heartbeat::Timeout)) and from `Option<u16>` (`None`
/// is [`ServerDefault`](Heartbeat::ServerDefault)).
///
/// ```
/// use pika::parameters::Heartbeat;
///
/// assert_eq!(Heartbeat::ServerDefault.tune(60), 60);
/// assert_eq!(Heartbeat::from(0).tune(60), 0);
/// assert_eq!(Heartbeat::from(30).tune(60), 30);
/// let at_most_20 = Heartbeat::negotiate_with(|proposal| proposal.min(20));
/// assert_eq!(at_most_20.tune(60), 20);
/// assert_eq!(format!("{at_most_20:?}"), "Negotiate(<callback>)");
/// ```
#[derive(Clone, Default)]
pub enum Heartbeat {
    /// Accept the broker's proposal (pika's `None`, the default).
    #[default]
    ServerDefault,
    /// No heartbeats (pika's `0`).
    Disabled,
    /// This many seconds, whatever the broker proposes (pika 1.x uses the
    /// client's value, not the smaller of the two). Never 0: setting
    /// `Timeout(0)` stores [`Disabled`](Heartbeat::Disabled).
    Timeout(u16),
    /// Called with the broker's proposal (seconds) during tuning; returns
    /// the timeout to use, 0 to disable (pika's callable heartbeat, without
    /// the connection argument).
    Negotiate(Arc<dyn Fn(u16) -> u16 + Send + Sync>),
}

impl Heartbeat {
    /// A [`Heartbeat::Negotiate`] calling `f` with the broker's proposal.
    pub fn negotiate_with(f: impl Fn(u16) -> u16 + Send + Sync + 'static) -> Self {
        Heartbeat::Negotiate(Arc::new(f))
    }

    /// The timeout (seconds, 0 for none) to send in `Connection.TuneOk`
    /// when the broker proposed `broker_proposal` in `Connection.Tune`.
    pub fn tune(&self, broker_proposal: u16) -> u16 {
        match self {
            Heartbeat::ServerDefault => broker_proposal,
            Heartbeat::Disabled => 0,
            Heartbeat::Timeout(secs) => *secs,
            Heartbeat::Negotiate(f) => f(broker_proposal),
        }
    }

    /// `Timeout(0)` becomes `Disabled`; everything else is unchanged.
    fn normalized(self) -> Self {
        match self {
            Heartbeat::Timeout(0) => Heartbeat::Disabled,
            other => other,
        }
    }
}

impl fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Heartbeat::ServerDefault => f.write_str("ServerDefault"),
            Heartbeat::Disabled => f.write_str("Disabled"),
            Heartbeat::Timeout(secs) => f.debug_tuple("Timeout").field(secs).finish(),
            Heartbeat::Negotiate(_) => f
                .debug_tuple("Negotiate")
                .field(&format_args!("<callback>"))
                .finish(),
        }
    }
}

impl From<u16> for Heartbeat {
    /// `0` disables heartbeats; any other value is a timeout in seconds.
    fn from(secs: u16) -> Self {
        match secs {
            0 => Heartbeat::Disabled,
            n => Heartbeat::Timeout(n),
        }
    }
}

impl From<Option<u16>> for Heartbeat {
    /// `None` accepts the broker's value; `Some(n)` as for `u16`.
    fn from(secs: Option<u16>) -> Self {
        secs.map_or(Heartbeat::ServerDefault, Heartbeat::from)
    }
}

/// Formats a duration as seconds for messages, e.g. `0s`, `2.5s`.
fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// The client properties this crate reports in `Connection.StartOk` before
/// the user's [`client_properties`](ConnectionParameters::client_properties)
/// are merged over them: `product` (`pika-rs`), `version` (this crate's),
/// `platform` (`Rust`), `information`, and a `capabilities` table with every
/// RabbitMQ extension the client supports set to true.
///
/// ```
/// use pika::FieldValue;
/// let props = pika::parameters::default_client_properties();
/// assert_eq!(props.get("product").and_then(FieldValue::as_str), Some("pika-rs"));
/// let caps = props.get("capabilities").and_then(FieldValue::as_table).unwrap();
/// assert_eq!(caps.get("publisher_confirms"), Some(&FieldValue::Bool(true)));
/// ```
pub fn default_client_properties() -> FieldTable {
    let mut capabilities = FieldTable::new();
    for name in [
        "authentication_failure_close",
        "basic.nack",
        "connection.blocked",
        "consumer_cancel_notify",
        "exchange_exchange_bindings",
        "publisher_confirms",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        capabilities.insert(name, true);
    }
    let mut props = FieldTable::new();
    props.insert("product", "pika-rs");
    props.insert("version", env!("CARGO_PKG_VERSION"));
    props.insert("platform", "Rust");
    props.insert("information", "pika for Rust: an AMQP 0-9-1 client");
    props.insert("capabilities", capabilities);
    props
}

/// Everything a connection needs to know to connect to RabbitMQ (pika's
/// `ConnectionParameters`), with pika 1.1.0's defaults.
///
/// Getters are named like pika's attributes. Setters that can reject a
/// value validate it and return [`Error::InvalidParameter`] naming the
/// parameter and the bad value; the others return `&mut Self` directly.
/// Both chain.
///
/// `Debug` prints `<redacted>` in place of the password.
///
/// ```
/// use std::time::Duration;
/// use pika::parameters::ConnectionParameters;
/// use pika::credentials::PlainCredentials;
///
/// let mut params = ConnectionParameters::new();
/// params
///     .set_host("rabbit-server1")?
///     .set_port(5672)?
///     .set_credentials(PlainCredentials::new("app", "s3cret"))
///     .set_connection_name("billing worker")
///     .set_frame_max(65536)?
///     .set_blocked_connection_timeout(Duration::from_secs(300))?;
/// assert_eq!(params.connection_name(), Some("billing worker"));
/// assert!(!format!("{params:?}").contains("s3cret"));
///
/// let err = params.set_frame_max(100).unwrap_err();
/// assert_eq!(err.to_string(), "invalid frame_max: must be between 4096 and 2147483647, got 100");
/// # Ok::<(), pika::Error>(())
/// ```
#[derive(Clone)]
pub struct ConnectionParameters {
    host: String,
    port: u16,
    virtual_host: String,
    credentials: Credentials,
    channel_max: u16,
    frame_max: u32,
    heartbeat: Heartbeat,
    connection_attempts: u32,
    retry_delay: Duration,
    socket_timeout: Option<Duration>,
    stack_timeout: Option<Duration>,
    locale: String,
    blocked_connection_timeout: Option<Duration>,
    client_properties: FieldTable,
    tcp_options: Option<TcpOptions>,
    /// Whether `port` was set explicitly (otherwise it follows TLS).
    port_set: bool,
    ssl_options: Option<SslOptions>,
}

impl ConnectionParameters {
    /// Default broker host.
    pub const DEFAULT_HOST: &'static str = "localhost";
    /// Default AMQP port.
    pub const DEFAULT_PORT: u16 = 5672;
    /// Default AMQPS port (TLS).
    pub const DEFAULT_SSL_PORT: u16 = 5671;
    /// Default virtual host.
    pub const DEFAULT_VIRTUAL_HOST: &'static str = "/";
    /// Default username (with [`DEFAULT_PASSWORD`](Self::DEFAULT_PASSWORD)).
    pub const DEFAULT_USERNAME: &'static str = "guest";
    /// Default password.
    pub const DEFAULT_PASSWORD: &'static str = "guest";
    /// Default (and largest) channel_max.
    pub const DEFAULT_CHANNEL_MAX: u16 = 65535;
    /// Default frame_max.
    pub const DEFAULT_FRAME_MAX: u32 = 131_072;
    /// Smallest frame_max (AMQP's `frame-min-size`).
    pub const MIN_FRAME_MAX: u32 = crate::frame::FRAME_MIN_SIZE;
    /// Largest frame_max this client accepts (2³¹ − 1).
    pub const MAX_FRAME_MAX: u32 = i32::MAX as u32;
    /// Default number of connection attempts.
    pub const DEFAULT_CONNECTION_ATTEMPTS: u32 = 1;
    /// Default delay between connection attempts.
    pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(2);
    /// Default TCP connect timeout.
    pub const DEFAULT_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default timeout for TCP connect plus the AMQP handshake.
    pub const DEFAULT_STACK_TIMEOUT: Duration = Duration::from_secs(15);
    /// Default locale.
    pub const DEFAULT_LOCALE: &'static str = "en_US";

    /// Parameters with every default: `localhost:5672`, virtual host `/`,
    /// `guest`/`guest`, channel_max 65535, frame_max 131072, the broker's
    /// heartbeat, 1 connection attempt, 2 s retry delay, 10 s socket
    /// timeout, 15 s stack timeout, locale `en_US`, no blocked-connection
    /// timeout, no extra client properties, no TCP options.
    pub fn new() -> Self {
        ConnectionParameters {
            host: Self::DEFAULT_HOST.to_owned(),
            port: Self::DEFAULT_PORT,
            virtual_host: Self::DEFAULT_VIRTUAL_HOST.to_owned(),
            credentials: Credentials::default(),
            channel_max: Self::DEFAULT_CHANNEL_MAX,
            frame_max: Self::DEFAULT_FRAME_MAX,
            heartbeat: Heartbeat::ServerDefault,
            connection_attempts: Self::DEFAULT_CONNECTION_ATTEMPTS,
            retry_delay: Self::DEFAULT_RETRY_DELAY,
            socket_timeout: Some(Self::DEFAULT_SOCKET_TIMEOUT),
            stack_timeout: Some(Self::DEFAULT_STACK_TIMEOUT),
            locale: Self::DEFAULT_LOCALE.to_owned(),
            blocked_connection_timeout: None,
            client_properties: FieldTable::new(),
            tcp_options: None,
            port_set: false,
            ssl_options: None,
        }
    }

    // ---- getters ------------------------------------------------------

    /// Host name or IP address of the broker (default `localhost`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The broker's port: the one set, or 5671 with TLS on and 5672
    /// without.
    pub fn port(&self) -> u16 {
        match (self.port_set, &self.ssl_options) {
            (true, _) => self.port,
            (false, Some(_)) => Self::DEFAULT_SSL_PORT,
            (false, None) => Self::DEFAULT_PORT,
        }
    }

    /// The TLS settings, when the connection uses TLS.
    pub fn ssl_options(&self) -> Option<&SslOptions> {
        self.ssl_options.as_ref()
    }

    /// Turns TLS on (`Some`) or off. Unless a port was set, the default
    /// port follows: 5671 with TLS, 5672 without.
    pub fn set_ssl_options(&mut self, ssl_options: Option<SslOptions>) -> &mut Self {
        self.ssl_options = ssl_options;
        self
    }

    /// The virtual host (default `/`).
    pub fn virtual_host(&self) -> &str {
        &self.virtual_host
    }

    /// The credentials (default PLAIN `guest`/`guest`).
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Largest channel number to ask for in tuning (default 65535).
    pub fn channel_max(&self) -> u16 {
        self.channel_max
    }

    /// Largest frame size to ask for in tuning, in bytes (default 131072).
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// The heartbeat setting (default: accept the broker's).
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// How many times to try connecting (default 1).
    pub fn connection_attempts(&self) -> u32 {
        self.connection_attempts
    }

    /// Pause between connection attempts (default 2 s).
    pub fn retry_delay(&self) -> Duration {
        self.retry_delay
    }

    /// TCP connect timeout (default 10 s; `None` waits for the OS).
    pub fn socket_timeout(&self) -> Option<Duration> {
        self.socket_timeout
    }

    /// Timeout for the whole bring-up, TCP connect plus AMQP handshake
    /// (default 15 s; `None` for no limit).
    pub fn stack_timeout(&self) -> Option<Duration> {
        self.stack_timeout
    }

    /// Locale sent in `Connection.StartOk` (default `en_US`).
    pub fn locale(&self) -> &str {
        &self.locale
    }

    /// How long the broker may keep the connection blocked
    /// (`Connection.Blocked`) before the client tears it down (default
    /// `None`: forever).
    pub fn blocked_connection_timeout(&self) -> Option<Duration> {
        self.blocked_connection_timeout
    }

    /// The user's client properties, merged over
    /// [`default_client_properties`] at connect time (default empty; see
    /// [`effective_client_properties`](Self::effective_client_properties)).
    pub fn client_properties(&self) -> &FieldTable {
        &self.client_properties
    }

    /// The `connection_name` client property, which RabbitMQ shows in its
    /// management UI, when it is set and is a UTF-8 string.
    pub fn connection_name(&self) -> Option<&str> {
        self.client_properties
            .get("connection_name")
            .and_then(FieldValue::as_str)
    }

    /// The TCP socket options (default `None`).
    pub fn tcp_options(&self) -> Option<&TcpOptions> {
        self.tcp_options.as_ref()
    }

    /// The client properties sent in `Connection.StartOk`:
    /// [`default_client_properties`] with the user's
    /// [`client_properties`](Self::client_properties) merged over them.
    ///
    /// The merge is shallow, as pika's `dict.update`: a user key replaces
    /// the default of the same name, new keys follow the defaults. In
    /// particular a user `capabilities` table replaces the default one
    /// wholesale, so it must list every capability the client should claim.
    pub fn effective_client_properties(&self) -> FieldTable {
        let mut props = default_client_properties();
        for (key, value) in self.client_properties.iter() {
            props.insert(key, value.clone());
        }
        props
    }

    // ---- setters ------------------------------------------------------

    /// Sets the broker's host name or IP address (IPv6 without brackets).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`host`) when it is empty.
    pub fn set_host(&mut self, host: impl Into<String>) -> Result<&mut Self, Error> {
        let host = host.into();
        if host.is_empty() {
            return Err(Error::invalid("host", "must not be empty"));
        }
        self.host = host;
        Ok(self)
    }

    /// Sets the broker's port.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`port`) for port 0.
    pub fn set_port(&mut self, port: u16) -> Result<&mut Self, Error> {
        self.port = validate_range("port", port.into(), 1, 65535)? as u16;
        self.port_set = true;
        Ok(self)
    }

    /// Sets the virtual host.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`virtual_host`) when it is longer than
    /// 255 bytes, the most `Connection.Open` can carry.
    pub fn set_virtual_host(&mut self, vhost: impl Into<String>) -> Result<&mut Self, Error> {
        self.virtual_host = validate_short_string("virtual_host", vhost.into())?;
        Ok(self)
    }

    /// Sets the credentials.
    pub fn set_credentials(&mut self, credentials: impl Into<Credentials>) -> &mut Self {
        self.credentials = credentials.into();
        self
    }

    /// Sets the largest channel number to ask for.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`channel_max`) for 0; the range is
    /// 1 to 65535.
    pub fn set_channel_max(&mut self, channel_max: u16) -> Result<&mut Self, Error> {
        self.channel_max = validate_channel_max(channel_max.into())?;
        Ok(self)
    }

    /// Sets the largest frame size to ask for, in bytes.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`frame_max`) outside 4096 to
    /// 2147483647. (pika 1.1.0 caps it at 131072; RabbitMQ accepts larger
    /// frames.)
    pub fn set_frame_max(&mut self, frame_max: u32) -> Result<&mut Self, Error> {
        self.frame_max = validate_frame_max(frame_max.into())?;
        Ok(self)
    }

    /// Sets the heartbeat: a [`Heartbeat`], a `u16` (0 disables), or an
    /// `Option<u16>` (`None` accepts the broker's). `Timeout(0)` is stored
    /// as [`Heartbeat::Disabled`].
    pub fn set_heartbeat(&mut self, heartbeat: impl Into<Heartbeat>) -> &mut Self {
        self.heartbeat = heartbeat.into().normalized();
        self
    }

    /// Sets how many times to try connecting.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`connection_attempts`) for 0.
    pub fn set_connection_attempts(&mut self, attempts: u32) -> Result<&mut Self, Error> {
        self.connection_attempts = validate_connection_attempts(attempts.into())?;
        Ok(self)
    }

    /// Sets the pause between connection attempts.
    pub fn set_retry_delay(&mut self, delay: Duration) -> &mut Self {
        self.retry_delay = delay;
        self
    }

    /// Sets the TCP connect timeout: a `Duration`, or `None` to wait as long
    /// as the OS does.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`socket_timeout`) for a zero duration.
    pub fn set_socket_timeout(
        &mut self,
        timeout: impl Into<Option<Duration>>,
    ) -> Result<&mut Self, Error> {
        self.socket_timeout = validate_timeout("socket_timeout", timeout.into())?;
        Ok(self)
    }

    /// Sets the bring-up timeout (TCP connect plus AMQP handshake): a
    /// `Duration`, or `None` for no limit. It should be longer than the
    /// socket timeout.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`stack_timeout`) for a zero duration.
    pub fn set_stack_timeout(
        &mut self,
        timeout: impl Into<Option<Duration>>,
    ) -> Result<&mut Self, Error> {
        self.stack_timeout = validate_timeout("stack_timeout", timeout.into())?;
        Ok(self)
    }

    /// Sets the locale sent in `Connection.StartOk`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`locale`) when longer than 255 bytes.
    pub fn set_locale(&mut self, locale: impl Into<String>) -> Result<&mut Self, Error> {
        self.locale = validate_short_string("locale", locale.into())?;
        Ok(self)
    }

    /// Sets how long the connection may stay blocked by the broker before
    /// the client tears it down: a `Duration`, or `None` for no limit.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`blocked_connection_timeout`) for a zero
    /// duration.
    pub fn set_blocked_connection_timeout(
        &mut self,
        timeout: impl Into<Option<Duration>>,
    ) -> Result<&mut Self, Error> {
        self.blocked_connection_timeout =
            validate_timeout("blocked_connection_timeout", timeout.into())?;
        Ok(self)
    }

    /// Replaces the user's client properties (merged over the defaults at
    /// connect time; see
    /// [`effective_client_properties`](Self::effective_client_properties)).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`client_properties`) when the table
    /// cannot be encoded: a key over 255 bytes, or nesting deeper than
    /// [`MAX_TABLE_DEPTH`](crate::table::MAX_TABLE_DEPTH).
    pub fn set_client_properties(&mut self, properties: FieldTable) -> Result<&mut Self, Error> {
        properties
            .encode(&mut Vec::new())
            .map_err(|e| Error::invalid("client_properties", e.to_string()))?;
        self.client_properties = properties;
        Ok(self)
    }

    /// Sets the `connection_name` client property, the name RabbitMQ shows
    /// for the connection in its management UI and logs.
    pub fn set_connection_name(&mut self, name: impl Into<String>) -> &mut Self {
        self.client_properties.insert(
            "connection_name",
            FieldValue::LongString(name.into().into()),
        );
        self
    }

    /// Sets the TCP socket options, or `None` to leave the socket as the OS
    /// makes it. The stored options have [`keepalive`](TcpOptions::keepalive)
    /// set whenever [`so_keepalive`](TcpOptions::so_keepalive) is true, so
    /// the socket code need only read that field.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`tcp_options`) when a keepalive time is
    /// not a whole number of seconds from 1 to 2147483647, the keepalive
    /// count is 0 or over 2147483647, or the user timeout is not a whole
    /// number of milliseconds up to 2147483647.
    pub fn set_tcp_options(&mut self, options: Option<TcpOptions>) -> Result<&mut Self, Error> {
        let options = match options {
            Some(mut opts) => {
                opts.validate()?;
                opts.keepalive = opts.so_keepalive();
                Some(opts)
            }
            None => None,
        };
        self.tcp_options = options;
        Ok(self)
    }

    /// Erases the password when the credentials ask for it
    /// (`erase_on_connect`); the connection calls this after
    /// `Connection.StartOk`.
    pub(crate) fn erase_credentials_if_asked(&mut self) {
        self.credentials.erase_secret();
    }
}

impl Default for ConnectionParameters {
    fn default() -> Self {
        ConnectionParameters::new()
    }
}

impl fmt::Debug for ConnectionParameters {
    // Written out so the password can only ever appear through
    // `Credentials`' own redacting `Debug`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionParameters")
            .field("host", &self.host)
            .field("port", &self.port())
            .field("virtual_host", &self.virtual_host)
            .field("credentials", &self.credentials)
            .field("channel_max", &self.channel_max)
            .field("frame_max", &self.frame_max)
            .field("heartbeat", &self.heartbeat)
            .field("connection_attempts", &self.connection_attempts)
            .field("retry_delay", &self.retry_delay)
            .field("socket_timeout", &self.socket_timeout)
            .field("stack_timeout", &self.stack_timeout)
            .field("locale", &self.locale)
            .field(
                "blocked_connection_timeout",
                &self.blocked_connection_timeout,
            )
            .field("client_properties", &self.client_properties)
            .field("tcp_options", &self.tcp_options)
            .field("ssl_options", &self.ssl_options)
            .finish()
    }
}

// ---- validation shared by setters and URL options ----------------------

fn validate_range(name: &'static str, v: i64, lo: i64, hi: i64) -> Result<i64, Error> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(Error::invalid(
            name,
            format!("must be between {lo} and {hi}, got {v}"),
        ))
    }
}

fn validate_channel_max(v: i64) -> Result<u16, Error> {
    Ok(validate_range("channel_max", v, 1, 65535)? as u16)
}

fn validate_frame_max(v: i64) -> Result<u32, Error> {
    let (lo, hi) = (
        ConnectionParameters::MIN_FRAME_MAX,
        ConnectionParameters::MAX_FRAME_MAX,
    );
    Ok(validate_range("frame_max", v, lo.into(), hi.into())? as u32)
}

fn validate_connection_attempts(v: i64) -> Result<u32, Error> {
    Ok(validate_range("connection_attempts", v, 1, u32::MAX.into())? as u32)
}

fn validate_heartbeat(v: i64) -> Result<u16, Error> {
    Ok(validate_range("heartbeat", v, 0, 65535)? as u16)
}

fn validate_timeout(name: &'static str, t: Option<Duration>) -> Result<Option<Duration>, Error> {
    match t {
        Some(d) if d.is_zero() => Err(Error::invalid(
            name,
            format!(
                "must be greater than zero (or None for no timeout), got {}",
                secs(d)
            ),
        )),
        other => Ok(other),
    }
}

fn validate_short_string(name: &'static str, s: String) -> Result<String, Error> {
    if s.len() > 255 {
        Err(Error::invalid(
            name,
            format!("must be at most 255 bytes, got {} bytes", s.len()),
        ))
    } else {
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::{ExternalCredentials, PlainCredentials};

    // The helpers below are shared with the tests in `url.rs` and `tcp.rs`.

    /// A password that must never appear in any output.
    pub(super) const SECRET: &str = "Sup3r-S3cret-pw";

    /// The PLAIN username and password of `p`.
    pub(super) fn plain(p: &ConnectionParameters) -> (&str, &str) {
        let c = p.credentials().as_plain().expect("plain credentials");
        (c.username(), c.password())
    }

    /// The parameter name and reason of an [`Error::InvalidParameter`].
    pub(super) fn invalid_name(e: Error) -> (&'static str, String) {
        match e {
            Error::InvalidParameter { name, reason } => (name, reason),
            other => panic!("not InvalidParameter: {other:?}"),
        }
    }

    // ---- defaults -------------------------------------------------------

    #[test]
    fn defaults_match_pika() {
        let p = ConnectionParameters::default();
        assert_eq!(p.host(), "localhost");
        assert_eq!(p.port(), 5672);
        assert_eq!(p.virtual_host(), "/");
        assert_eq!(plain(&p), ("guest", "guest"));
        assert_eq!(p.channel_max(), 65535);
        assert_eq!(p.frame_max(), 131_072);
        assert!(matches!(p.heartbeat(), Heartbeat::ServerDefault));
        assert_eq!(p.connection_attempts(), 1);
        assert_eq!(p.retry_delay(), Duration::from_secs(2));
        assert_eq!(p.socket_timeout(), Some(Duration::from_secs(10)));
        assert_eq!(p.stack_timeout(), Some(Duration::from_secs(15)));
        assert_eq!(p.locale(), "en_US");
        assert_eq!(p.blocked_connection_timeout(), None);
        assert!(p.client_properties().is_empty());
        assert_eq!(p.connection_name(), None);
        assert_eq!(p.tcp_options(), None);
    }

    #[test]
    fn parameters_are_clone_send_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<ConnectionParameters>();
        check::<UrlParameters>();
        check::<Heartbeat>();
        check::<TcpOptions>();
    }

    // ---- setters and their bounds ----------------------------------------

    #[test]
    fn set_host_rejects_empty() {
        let mut p = ConnectionParameters::new();
        assert_eq!(p.set_host("rabbit1").unwrap().host(), "rabbit1");
        let (name, reason) = invalid_name(p.set_host("").unwrap_err());
        assert_eq!(name, "host");
        assert!(reason.contains("empty"), "{reason}");
        assert_eq!(p.host(), "rabbit1");
    }

    #[test]
    fn set_port_accepts_1_to_65535() {
        let mut p = ConnectionParameters::new();
        assert_eq!(p.set_port(1).unwrap().port(), 1);
        assert_eq!(p.set_port(65535).unwrap().port(), 65535);
        let e = p.set_port(0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid port: must be between 1 and 65535, got 0"
        );
        assert_eq!(p.port(), 65535);
    }

    #[test]
    fn set_channel_max_accepts_1_to_65535() {
        let mut p = ConnectionParameters::new();
        assert_eq!(p.set_channel_max(1).unwrap().channel_max(), 1);
        assert_eq!(p.set_channel_max(65535).unwrap().channel_max(), 65535);
        let e = p.set_channel_max(0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid channel_max: must be between 1 and 65535, got 0"
        );
    }

    #[test]
    fn set_frame_max_accepts_4096_to_i32_max() {
        let mut p = ConnectionParameters::new();
        assert_eq!(p.set_frame_max(4096).unwrap().frame_max(), 4096);
        assert_eq!(
            p.set_frame_max(2_147_483_647).unwrap().frame_max(),
            2_147_483_647
        );
        let e = p.set_frame_max(100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid frame_max: must be between 4096 and 2147483647, got 100"
        );
        let e = p.set_frame_max(4095).unwrap_err();
        assert!(e.to_string().contains("got 4095"), "{e}");
        let e = p.set_frame_max(2_147_483_648).unwrap_err();
        assert_eq!(invalid_name(e).0, "frame_max");
        assert_eq!(p.frame_max(), 2_147_483_647);
    }

    #[test]
    fn set_connection_attempts_rejects_zero() {
        let mut p = ConnectionParameters::new();
        assert_eq!(
            p.set_connection_attempts(1).unwrap().connection_attempts(),
            1
        );
        assert_eq!(
            p.set_connection_attempts(u32::MAX)
                .unwrap()
                .connection_attempts(),
            u32::MAX
        );
        let e = p.set_connection_attempts(0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid connection_attempts: must be between 1 and 4294967295, got 0"
        );
    }

    #[test]
    fn set_retry_delay_accepts_zero() {
        let mut p = ConnectionParameters::new();
        assert_eq!(
            p.set_retry_delay(Duration::ZERO).retry_delay(),
            Duration::ZERO
        );
        assert_eq!(
            p.set_retry_delay(Duration::from_millis(500)).retry_delay(),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn timeouts_accept_none_and_positive_and_reject_zero() {
        type Setter = fn(
            &mut ConnectionParameters,
            Option<Duration>,
        ) -> Result<&mut ConnectionParameters, Error>;
        type Getter = fn(&ConnectionParameters) -> Option<Duration>;
        let cases: [(&str, Setter, Getter); 3] = [
            (
                "socket_timeout",
                |p, t| p.set_socket_timeout(t),
                |p| p.socket_timeout(),
            ),
            (
                "stack_timeout",
                |p, t| p.set_stack_timeout(t),
                |p| p.stack_timeout(),
            ),
            (
                "blocked_connection_timeout",
                |p, t| p.set_blocked_connection_timeout(t),
                |p| p.blocked_connection_timeout(),
            ),
        ];
        for (name, set, get) in cases {
            let mut p = ConnectionParameters::new();
            set(&mut p, None).unwrap();
            assert_eq!(get(&p), None, "{name}");
            set(&mut p, Some(Duration::from_nanos(1))).unwrap();
            assert_eq!(get(&p), Some(Duration::from_nanos(1)), "{name}");
            let e = set(&mut p, Some(Duration::ZERO)).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid {name}: must be greater than zero (or None for no timeout), got 0s"
                )
            );
            assert_eq!(get(&p), Some(Duration::from_nanos(1)), "{name} unchanged");
        }
        // A plain Duration works too.
        let mut p = ConnectionParameters::new();
        p.set_socket_timeout(Duration::from_secs(3)).unwrap();
        assert_eq!(p.socket_timeout(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn virtual_host_and_locale_are_at_most_255_bytes() {
        let mut p = ConnectionParameters::new();
        let ok = "v".repeat(255);
        assert_eq!(p.set_virtual_host(ok.clone()).unwrap().virtual_host(), ok);
        let (name, reason) = invalid_name(p.set_virtual_host("v".repeat(256)).unwrap_err());
        assert_eq!(name, "virtual_host");
        assert!(reason.contains("got 256 bytes"), "{reason}");

        assert_eq!(p.set_locale("pt_BR").unwrap().locale(), "pt_BR");
        p.set_locale("l".repeat(255)).unwrap();
        let (name, _) = invalid_name(p.set_locale("l".repeat(256)).unwrap_err());
        assert_eq!(name, "locale");
    }

    #[test]
    fn set_credentials_accepts_plain_and_external() {
        let mut p = ConnectionParameters::new();
        p.set_credentials(PlainCredentials::new("u", "p"));
        assert_eq!(plain(&p), ("u", "p"));
        p.set_credentials(ExternalCredentials);
        assert_eq!(p.credentials().mechanism(), "EXTERNAL");
    }

    #[test]
    fn set_client_properties_rejects_unencodable_tables() {
        let mut p = ConnectionParameters::new();
        let mut ok = FieldTable::new();
        ok.insert("k".repeat(255), 1i32);
        p.set_client_properties(ok.clone()).unwrap();
        assert_eq!(p.client_properties(), &ok);

        let mut long_key = FieldTable::new();
        long_key.insert("k".repeat(256), 1i32);
        let (name, _) = invalid_name(p.set_client_properties(long_key).unwrap_err());
        assert_eq!(name, "client_properties");
        assert_eq!(p.client_properties(), &ok);
    }

    #[test]
    fn connection_name_is_a_client_property() {
        let mut p = ConnectionParameters::new();
        p.set_connection_name("orders-worker");
        assert_eq!(p.connection_name(), Some("orders-worker"));
        assert_eq!(
            p.client_properties().get("connection_name"),
            Some(&FieldValue::LongString("orders-worker".into()))
        );
        p.set_connection_name("renamed");
        assert_eq!(p.client_properties().len(), 1);
        assert_eq!(p.connection_name(), Some("renamed"));
    }

    #[test]
    fn erase_credentials_honours_erase_on_connect() {
        let mut p = ConnectionParameters::new();
        p.set_credentials(PlainCredentials::new("u", SECRET).with_erase_on_connect(true));
        p.erase_credentials_if_asked();
        assert_eq!(plain(&p), ("u", ""));
        let mut keep = ConnectionParameters::new();
        keep.erase_credentials_if_asked();
        assert_eq!(plain(&keep), ("guest", "guest"));
    }

    // ---- heartbeat --------------------------------------------------------

    #[test]
    fn heartbeat_from_zero_is_disabled_and_from_none_is_server_default() {
        assert!(matches!(Heartbeat::from(0), Heartbeat::Disabled));
        assert!(matches!(Heartbeat::from(30), Heartbeat::Timeout(30)));
        assert!(matches!(Heartbeat::from(None), Heartbeat::ServerDefault));
        assert!(matches!(Heartbeat::from(Some(0)), Heartbeat::Disabled));
        assert!(matches!(Heartbeat::from(Some(5)), Heartbeat::Timeout(5)));
        assert!(matches!(Heartbeat::default(), Heartbeat::ServerDefault));
    }

    #[test]
    fn heartbeat_tune_follows_pika_1x() {
        assert_eq!(Heartbeat::ServerDefault.tune(60), 60);
        assert_eq!(Heartbeat::ServerDefault.tune(0), 0);
        assert_eq!(Heartbeat::Disabled.tune(60), 0);
        // pika 1.x sends the client's value even when it is larger.
        assert_eq!(Heartbeat::Timeout(120).tune(60), 120);
        assert_eq!(Heartbeat::Timeout(10).tune(60), 10);
        let cb = Heartbeat::negotiate_with(|proposal| proposal / 2);
        assert_eq!(cb.tune(60), 30);
    }

    #[test]
    fn set_heartbeat_stores_timeout_zero_as_disabled() {
        let mut p = ConnectionParameters::new();
        p.set_heartbeat(Heartbeat::Timeout(0));
        assert!(matches!(p.heartbeat(), Heartbeat::Disabled));
        p.set_heartbeat(15);
        assert!(matches!(p.heartbeat(), Heartbeat::Timeout(15)));
        p.set_heartbeat(None);
        assert!(matches!(p.heartbeat(), Heartbeat::ServerDefault));
        p.set_heartbeat(Heartbeat::negotiate_with(|_| 7));
        assert_eq!(p.heartbeat().tune(60), 7);
    }

    #[test]
    fn heartbeat_debug_shows_callback_placeholder() {
        assert_eq!(format!("{:?}", Heartbeat::ServerDefault), "ServerDefault");
        assert_eq!(format!("{:?}", Heartbeat::Disabled), "Disabled");
        assert_eq!(format!("{:?}", Heartbeat::Timeout(30)), "Timeout(30)");
        let cb = Heartbeat::negotiate_with(|p| p);
        assert_eq!(format!("{cb:?}"), "Negotiate(<callback>)");
        let mut p = ConnectionParameters::new();
        p.set_heartbeat(cb);
        assert!(format!("{p:?}").contains("heartbeat: Negotiate(<callback>)"));
    }

    // ---- client properties ------------------------------------------------

    #[test]
    fn default_client_properties_identify_this_client() {
        let props = default_client_properties();
        assert_eq!(
            props.keys().collect::<Vec<_>>(),
            [
                "product",
                "version",
                "platform",
                "information",
                "capabilities"
            ]
        );
        assert_eq!(
            props.get("product").and_then(FieldValue::as_str),
            Some("pika-rs")
        );
        assert_eq!(
            props.get("version").and_then(FieldValue::as_str),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(
            props.get("platform").and_then(FieldValue::as_str),
            Some("Rust")
        );
        let info = props
            .get("information")
            .and_then(FieldValue::as_str)
            .unwrap();
        assert!(!info.contains("http"), "{info}");
        let caps = props
            .get("capabilities")
            .and_then(FieldValue::as_table)
            .unwrap();
        let names: Vec<_> = caps.keys().collect();
        assert_eq!(
            names,
            [
                "authentication_failure_close",
                "basic.nack",
                "connection.blocked",
                "consumer_cancel_notify",
                "exchange_exchange_bindings",
                "publisher_confirms",
                "per_consumer_qos",
                "direct_reply_to",
            ]
        );
        assert!(caps.iter().all(|(_, v)| *v == FieldValue::Bool(true)));
    }

    #[test]
    fn effective_client_properties_are_defaults_when_user_set_none() {
        let p = ConnectionParameters::new();
        assert_eq!(p.effective_client_properties(), default_client_properties());
    }

    #[test]
    fn user_client_properties_replace_defaults_and_append_new_keys() {
        let mut user = FieldTable::new();
        user.insert("product", "my-app");
        user.insert("team", "billing");
        let mut p = ConnectionParameters::new();
        p.set_client_properties(user).unwrap();
        p.set_connection_name("worker-1");
        let eff = p.effective_client_properties();
        assert_eq!(
            eff.keys().collect::<Vec<_>>(),
            [
                "product",
                "version",
                "platform",
                "information",
                "capabilities",
                "team",
                "connection_name"
            ]
        );
        assert_eq!(
            eff.get("product").and_then(FieldValue::as_str),
            Some("my-app")
        );
        assert_eq!(
            eff.get("team").and_then(FieldValue::as_str),
            Some("billing")
        );
        // Defaults not overridden stay.
        assert!(
            eff.get("capabilities")
                .and_then(FieldValue::as_table)
                .unwrap()
                .len()
                == 8
        );
        // The user's own table is untouched.
        assert_eq!(p.client_properties().len(), 3);
    }

    #[test]
    fn user_capabilities_table_replaces_the_default_wholesale() {
        let mut caps = FieldTable::new();
        caps.insert("basic.nack", false);
        let mut user = FieldTable::new();
        user.insert("capabilities", caps.clone());
        let mut p = ConnectionParameters::new();
        p.set_client_properties(user).unwrap();
        let eff = p.effective_client_properties();
        assert_eq!(eff.get("capabilities"), Some(&FieldValue::Table(caps)));
    }

    // ---- redaction --------------------------------------------------------

    #[test]
    fn debug_of_parameters_never_shows_the_password() {
        let mut p = ConnectionParameters::new();
        p.set_credentials(PlainCredentials::new("alice", SECRET));
        for text in [format!("{p:?}"), format!("{p:#?}")] {
            assert!(!text.contains(SECRET), "{text}");
            assert!(
                text.contains("<redacted>") && text.contains("alice"),
                "{text}"
            );
        }
    }
}
