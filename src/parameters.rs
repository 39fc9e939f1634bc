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

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use url::{Host, Position, Url};

use crate::credentials::{Credentials, PlainCredentials, REDACTED};
use crate::error::Error;
use crate::pyliteral;
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

/// Socket options for the connection's TCP socket (pika's `tcp_options`
/// dict, whose keys are the socket option names).
///
/// pika sets these with `setsockopt`; so will the connection. Like pika, it
/// turns `SO_KEEPALIVE` on when any keepalive option is given, or when
/// [`keepalive`](Self::keepalive) is set (see
/// [`so_keepalive`](Self::so_keepalive)); without `tcp_options` the socket
/// is left as the OS makes it. Options the OS lacks (e.g.
/// `TCP_USER_TIMEOUT` off Linux) are skipped with a warning, as pika does.
///
/// The keepalive times are whole seconds and the user timeout whole
/// milliseconds, as the socket options take them.
///
/// ```
/// use std::time::Duration;
/// use pika::parameters::{ConnectionParameters, TcpOptions};
///
/// let opts = TcpOptions {
///     keepalive_idle: Some(Duration::from_secs(60)),
///     user_timeout: Some(Duration::from_millis(30_000)),
///     ..TcpOptions::default()
/// };
/// assert!(opts.so_keepalive());
/// let mut params = ConnectionParameters::new();
/// params.set_tcp_options(Some(opts))?;
/// # Ok::<(), pika::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpOptions {
    /// Turn `SO_KEEPALIVE` on even when no keepalive timing is given
    /// (pika has no key for this; it is implied by the three below).
    pub keepalive: bool,
    /// `TCP_KEEPIDLE`: idle time before the first probe (whole seconds, ≥ 1).
    pub keepalive_idle: Option<Duration>,
    /// `TCP_KEEPINTVL`: time between probes (whole seconds, ≥ 1).
    pub keepalive_interval: Option<Duration>,
    /// `TCP_KEEPCNT`: unanswered probes before the connection is dropped (≥ 1).
    pub keepalive_count: Option<u32>,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged
    /// before the connection is dropped (whole milliseconds; 0 is the OS
    /// default).
    pub user_timeout: Option<Duration>,
}

/// The `tcp_options` keys pika knows, in the order listed in errors.
const TCP_OPTION_KEYS: [&str; 4] = [
    "TCP_KEEPIDLE",
    "TCP_KEEPINTVL",
    "TCP_KEEPCNT",
    "TCP_USER_TIMEOUT",
];

/// The largest value `setsockopt` takes (a C `int`).
const SOCKOPT_MAX: u64 = i32::MAX as u64;

impl TcpOptions {
    /// Whether the socket needs `SO_KEEPALIVE`: [`keepalive`](Self::keepalive)
    /// or any of `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT` (pika's
    /// `socket_requires_keepalive`).
    pub fn so_keepalive(&self) -> bool {
        self.keepalive
            || self.keepalive_idle.is_some()
            || self.keepalive_interval.is_some()
            || self.keepalive_count.is_some()
    }

    /// Reads pika's `tcp_options` dict: keys `TCP_KEEPIDLE` and
    /// `TCP_KEEPINTVL` (integer seconds), `TCP_KEEPCNT` (integer count) and
    /// `TCP_USER_TIMEOUT` (integer milliseconds). A keepalive key also sets
    /// [`keepalive`](Self::keepalive).
    ///
    /// ```
    /// use std::time::Duration;
    /// use pika::FieldTable;
    /// use pika::parameters::TcpOptions;
    ///
    /// let mut dict = FieldTable::new();
    /// dict.insert("TCP_KEEPIDLE", 60i32);
    /// dict.insert("TCP_USER_TIMEOUT", 5000i32);
    /// let opts = TcpOptions::from_table(&dict)?;
    /// assert_eq!(opts.keepalive_idle, Some(Duration::from_secs(60)));
    /// assert_eq!(opts.user_timeout, Some(Duration::from_millis(5000)));
    /// assert!(opts.keepalive);
    /// # Ok::<(), pika::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] named `tcp_options` for a key pika does
    /// not know (pika only logs those), a value that is not an integer, or
    /// a value out of range.
    pub fn from_table(table: &FieldTable) -> Result<TcpOptions, Error> {
        let mut opts = TcpOptions::default();
        for (key, value) in table.iter() {
            let int = match value {
                FieldValue::Bool(_) => None,
                other => other.as_i64(),
            };
            let Some(int) = int else {
                return Err(Error::invalid(
                    "tcp_options",
                    format!("{key} must be an integer, got {}", pyliteral::kind(value)),
                ));
            };
            let low = if key == "TCP_USER_TIMEOUT" { 0 } else { 1 };
            let n = u64::try_from(int)
                .ok()
                .filter(|n| (low..=SOCKOPT_MAX).contains(n))
                .ok_or_else(|| {
                    Error::invalid(
                        "tcp_options",
                        format!("{key} must be between {low} and {SOCKOPT_MAX}, got {int}"),
                    )
                })?;
            match key {
                "TCP_KEEPIDLE" => opts.keepalive_idle = Some(Duration::from_secs(n)),
                "TCP_KEEPINTVL" => opts.keepalive_interval = Some(Duration::from_secs(n)),
                "TCP_KEEPCNT" => opts.keepalive_count = Some(n as u32),
                "TCP_USER_TIMEOUT" => opts.user_timeout = Some(Duration::from_millis(n)),
                _ => {
                    return Err(Error::invalid(
                        "tcp_options",
                        format!(
                            "unknown option {key:?} (known: {})",
                            TCP_OPTION_KEYS.join(", ")
                        ),
                    ));
                }
            }
        }
        opts.keepalive = opts.so_keepalive();
        Ok(opts)
    }

    fn validate(&self) -> Result<(), Error> {
        let whole_secs = |what: &str, d: Option<Duration>| match d {
            Some(d) if d.subsec_nanos() != 0 || !(1..=SOCKOPT_MAX).contains(&d.as_secs()) => {
                Err(Error::invalid(
                    "tcp_options",
                    format!(
                        "{what} must be a whole number of seconds between 1 and {SOCKOPT_MAX}, got {}",
                        secs(d)
                    ),
                ))
            }
            _ => Ok(()),
        };
        whole_secs("keepalive_idle (TCP_KEEPIDLE)", self.keepalive_idle)?;
        whole_secs(
            "keepalive_interval (TCP_KEEPINTVL)",
            self.keepalive_interval,
        )?;
        if let Some(n) = self.keepalive_count {
            if !(1..=SOCKOPT_MAX).contains(&u64::from(n)) {
                return Err(Error::invalid(
                    "tcp_options",
                    format!(
                        "keepalive_count (TCP_KEEPCNT) must be between 1 and {SOCKOPT_MAX}, got {n}"
                    ),
                ));
            }
        }
        if let Some(d) = self.user_timeout {
            if d.subsec_nanos() % 1_000_000 != 0 || d.as_millis() > u128::from(SOCKOPT_MAX) {
                return Err(Error::invalid(
                    "tcp_options",
                    format!(
                        "user_timeout (TCP_USER_TIMEOUT) must be a whole number of milliseconds \
                         up to {SOCKOPT_MAX}, got {d:?}"
                    ),
                ));
            }
        }
        Ok(())
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
    #[allow(dead_code)] // for the connection handshake
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

// ---- URL parameters ----------------------------------------------------

/// Connection parameters read from an AMQP URL (pika's `URLParameters`):
///
/// `amqp://username:password@host:port/virtual_host?option=value&...`
///
/// * The scheme is `amqp`, or `amqps` for TLS (port 5671 by default,
///   verifying the broker against the bundled Mozilla roots unless
///   `ssl_options` says otherwise); any other scheme is an
///   [`Error::InvalidUrl`].
/// * Username, password and virtual host are percent-decoded (`%2F` is
///   `/`). With no `user:password@`, the credentials are `guest`/`guest`;
///   `user@` alone gives an empty password.
/// * A missing host is `localhost`; an IPv6 host is written in brackets,
///   `[::1]`, and stored without them. Host names are lower-cased, as in
///   pika.
/// * The port defaults to 5672.
/// * An empty path or a bare `/` is the virtual host `/`; `/vhost` is
///   `vhost`; `/%2Fv` is `/v`. The path must be a single segment (write `/`
///   inside the virtual host as `%2F`). Dot segments (`.`, `..`, `%2E`) are
///   resolved away by URL normalisation, so such virtual hosts cannot be
///   written in a URL.
/// * A fragment (`#...`) is an error: it usually means an unencoded `#`.
///
/// Query options, each at most once (pika raises `ValueError` for a
/// repeated option; so does this):
///
/// | option | value |
/// |---|---|
/// | `blocked_connection_timeout` | seconds, int or float, > 0 |
/// | `channel_max` | integer, 1 to 65535 |
/// | `client_properties` | URL-encoded dict literal (below), or `None` |
/// | `connection_attempts` | integer ≥ 1 |
/// | `frame_max` | integer, 4096 to 2147483647 |
/// | `heartbeat` | integer seconds, 0 to 65535 (0 disables) |
/// | `locale` | text, e.g. `en_US` |
/// | `retry_delay` | seconds, int or float, ≥ 0 |
/// | `socket_timeout` | seconds, int or float, > 0 |
/// | `stack_timeout` | seconds, int or float, > 0 |
/// | `tcp_options` | URL-encoded dict literal with keys `TCP_KEEPIDLE`, `TCP_KEEPINTVL` (seconds), `TCP_KEEPCNT`, `TCP_USER_TIMEOUT` (milliseconds), or `None` |
/// | `ssl_options` | amqps only: a dict with `ca_certs`, `certfile`, `keyfile` (PEM paths), `cert_reqs` (`CERT_REQUIRED` or `CERT_NONE`), `server_hostname`, `ssl_version` (ignored) |
/// | `backpressure_detection` | `t` or `f`; accepted and ignored with a warning (removed in pika 1.0.0, still shown in its docs) |
///
/// Dict values are Python literals as `urllib.urlencode` writes them
/// (`{'connection_name': 'web', 'retries': 3, 'debug': True, 'x': None}`,
/// single or double quotes, `True`/`False`/`None`, nested dicts, lists and
/// tuples) or JSON (`true`/`false`/`null`). Integers become 32-bit field
/// values when they fit and 64-bit otherwise, floats 64-bit, strings long
/// strings, `None` void, as pika encodes them.
///
/// `Display` prints the URL (normalised) with the password replaced by
/// `<redacted>`; `Debug` redacts it too. The URL shown is the one parsed:
/// later changes made through `DerefMut` do not alter it.
///
/// ```
/// use std::time::Duration;
/// use pika::parameters::{ConnectionParameters, Heartbeat, UrlParameters};
///
/// let url = UrlParameters::parse(
///     "amqp://user:pass@host:5672/%2F?heartbeat=30&connection_attempts=3&socket_timeout=5\
///      &client_properties=%7B%27connection_name%27%3A+%27web%27%7D",
/// )?;
/// assert_eq!(url.virtual_host(), "/");
/// assert!(matches!(url.heartbeat(), Heartbeat::Timeout(30)));
/// assert_eq!(url.connection_attempts(), 3);
/// assert_eq!(url.socket_timeout(), Some(Duration::from_secs(5)));
/// assert_eq!(url.connection_name(), Some("web"));
/// assert!(!url.to_string().contains("pass"));
/// let params: ConnectionParameters = url.into();
/// assert_eq!(params.host(), "host");
/// # Ok::<(), pika::Error>(())
/// ```
#[derive(Clone)]
pub struct UrlParameters {
    params: ConnectionParameters,
    /// The URL as parsed, with the password already replaced.
    redacted_url: String,
}

impl UrlParameters {
    /// Parses an AMQP URL into connection parameters.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when the URL does not parse, its scheme is not
    /// `amqp` or `amqps`, a percent-escape is malformed, the path has more
    /// than one segment, it has a fragment, a query option is unknown,
    /// repeated, empty or has a malformed or out-of-range value, or
    /// `ssl_options` is given without amqps or names files that cannot be
    /// loaded. The reason names the
    /// part or option and the bad value, never the password.
    pub fn parse(url: &str) -> Result<UrlParameters, Error> {
        let parsed = Url::parse(url).map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => bad_url(
                "no scheme: expected amqp://[username:password@]host[:port][/virtual_host][?options]",
            ),
            other => bad_url(other.to_string()),
        })?;
        match parsed.scheme() {
            "amqp" => {}
            "amqps" => {}
            other => {
                return Err(bad_url(format!(
                    "unsupported scheme '{other}': expected amqp"
                )));
            }
        }
        if !parsed.has_authority() {
            return Err(bad_url(
                "expected amqp://[username:password@]host[:port][/virtual_host][?options]",
            ));
        }
        if parsed.fragment().is_some() {
            return Err(bad_url(
                "unexpected fragment ('#'); write '#' in a password or virtual host as %23",
            ));
        }

        let mut params = ConnectionParameters::new();
        if parsed.scheme() == "amqps" {
            params.set_ssl_options(Some(SslOptions::with_webpki_roots()));
        }

        let host = match parsed.host() {
            None => ConnectionParameters::DEFAULT_HOST.to_owned(),
            Some(Host::Domain("")) => ConnectionParameters::DEFAULT_HOST.to_owned(),
            Some(Host::Domain(name)) => percent_decode(name, "host", false)?.to_ascii_lowercase(),
            Some(Host::Ipv4(addr)) => addr.to_string(),
            Some(Host::Ipv6(addr)) => addr.to_string(),
        };
        params.set_host(host).map_err(in_url)?;
        if let Some(port) = parsed.port() {
            params.set_port(port).map_err(in_url)?;
        }

        let username = parsed.username();
        let password = parsed.password();
        if !username.is_empty() || password.is_some() {
            let username = percent_decode(username, "username", false)?;
            let password = percent_decode(password.unwrap_or(""), "password", true)?;
            params.set_credentials(PlainCredentials::new(username, password));
        }

        let path = parsed.path();
        let vhost = path.strip_prefix('/').unwrap_or(path);
        if !vhost.is_empty() {
            if vhost.contains('/') {
                return Err(bad_url(format!(
                    "path {path:?} has more than one segment; the path is the virtual host, \
                     with '/' in it written as %2F"
                )));
            }
            let vhost = percent_decode(vhost, "virtual host", false)?;
            params.set_virtual_host(vhost).map_err(in_url)?;
        }

        let mut seen: Vec<String> = Vec::new();
        for (name, value) in parsed.query_pairs() {
            if seen.iter().any(|s| *s == name) {
                return Err(bad_url(format!(
                    "query option {name} is given more than once"
                )));
            }
            apply_query_option(&mut params, &name, &value)?;
            seen.push(name.into_owned());
        }

        let redacted_url = if parsed.password().is_some() {
            format!(
                "{}{REDACTED}{}",
                &parsed[..Position::BeforePassword],
                &parsed[Position::AfterPassword..]
            )
        } else {
            parsed.as_str().to_owned()
        };
        Ok(UrlParameters {
            params,
            redacted_url,
        })
    }

    /// The parameters, without the URL.
    pub fn into_parameters(self) -> ConnectionParameters {
        self.params
    }
}

impl FromStr for UrlParameters {
    type Err = Error;

    /// Same as [`UrlParameters::parse`].
    fn from_str(url: &str) -> Result<Self, Error> {
        UrlParameters::parse(url)
    }
}

impl Deref for UrlParameters {
    type Target = ConnectionParameters;

    fn deref(&self) -> &ConnectionParameters {
        &self.params
    }
}

impl DerefMut for UrlParameters {
    fn deref_mut(&mut self) -> &mut ConnectionParameters {
        &mut self.params
    }
}

impl From<UrlParameters> for ConnectionParameters {
    fn from(url: UrlParameters) -> Self {
        url.params
    }
}

impl fmt::Display for UrlParameters {
    /// The URL as parsed, with the password as `<redacted>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_url)
    }
}

impl fmt::Debug for UrlParameters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UrlParameters")
            .field("url", &self.redacted_url)
            .field("parameters", &self.params)
            .finish()
    }
}

/// The query options `UrlParameters` accepts, listed in errors.
const QUERY_OPTIONS: &str = "blocked_connection_timeout, channel_max, client_properties, \
    connection_attempts, frame_max, heartbeat, locale, retry_delay, socket_timeout, \
    stack_timeout, ssl_options, tcp_options";

fn bad_url(reason: impl Into<String>) -> Error {
    Error::InvalidUrl {
        reason: reason.into(),
    }
}

/// Builds [`SslOptions`] from the `ssl_options` dict of an amqps URL: keys
/// `ca_certs`, `certfile`, `keyfile`, `cert_reqs` (`CERT_REQUIRED`, the
/// default, or `CERT_NONE`), `server_hostname`, and `ssl_version` (accepted
/// and ignored: rustls negotiates TLS 1.2 or 1.3).
fn ssl_options_from_table(table: &FieldTable) -> Result<SslOptions, Error> {
    let text = |key: &str| -> Result<Option<String>, Error> {
        match table.get(key) {
            None | Some(crate::table::FieldValue::Void) => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| Error::Tls {
                    reason: format!("{key} must be a string, got {}", pyliteral::kind(v)),
                }),
        }
    };
    for (key, _) in table.iter() {
        if !matches!(
            key,
            "ca_certs" | "certfile" | "keyfile" | "cert_reqs" | "server_hostname" | "ssl_version"
        ) {
            return Err(Error::Tls {
                reason: format!(
                    "unknown key '{key}' (known: ca_certs, certfile, keyfile, cert_reqs, \
                     server_hostname, ssl_version)"
                ),
            });
        }
    }
    if let Some(v) = text("ssl_version")? {
        log::warn!("ignoring ssl_options ssl_version={v}: rustls negotiates TLS 1.2 or 1.3");
    }
    let verify = match text("cert_reqs")?.as_deref() {
        None | Some("CERT_REQUIRED") | Some("ssl.CERT_REQUIRED") => true,
        Some("CERT_NONE") | Some("ssl.CERT_NONE") => false,
        Some(other) => {
            return Err(Error::Tls {
                reason: format!("cert_reqs must be CERT_REQUIRED or CERT_NONE, got {other:?}"),
            });
        }
    };
    let ca = text("ca_certs")?;
    let cert = text("certfile")?;
    let key = text("keyfile")?;
    let client = match (&cert, &key) {
        (Some(c), Some(k)) => Some((std::path::Path::new(c), std::path::Path::new(k))),
        (None, None) => None,
        _ => {
            return Err(Error::Tls {
                reason: "certfile and keyfile go together".into(),
            });
        }
    };
    let opts = if verify {
        SslOptions::from_pem_files(ca.as_deref().map(std::path::Path::new), client)?
    } else {
        SslOptions::without_verification(client)?
    };
    Ok(match text("server_hostname")? {
        Some(name) => opts.with_server_hostname(name),
        None => opts,
    })
}

/// Turns a setter's `InvalidParameter` into an `InvalidUrl` naming the part.
fn in_url(e: Error) -> Error {
    match e {
        Error::InvalidParameter { name, reason } => bad_url(format!("{name}: {reason}")),
        other => other,
    }
}

/// Shortens a query value for an error message.
fn shown(value: &str) -> String {
    const LIMIT: usize = 120;
    if value.chars().count() <= LIMIT {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(LIMIT).collect();
        format!("{head:?}…")
    }
}

/// Decodes `%XX` escapes (and nothing else: `+` stays `+`). `secret` keeps
/// the text out of the error message.
fn percent_decode(text: &str, what: &str, secret: bool) -> Result<String, Error> {
    let malformed = || {
        if secret {
            bad_url(format!("malformed percent-escape in the {what}"))
        } else {
            bad_url(format!("malformed percent-escape in the {what} {text:?}"))
        }
    };
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(malformed)?;
            let hex = std::str::from_utf8(hex).map_err(|_| malformed())?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| malformed())?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        if secret {
            bad_url(format!(
                "the {what} is not valid UTF-8 once percent-decoded"
            ))
        } else {
            bad_url(format!(
                "the {what} {text:?} is not valid UTF-8 once percent-decoded"
            ))
        }
    })
}

/// Parses an integer the way Python's `int()` reads a query value.
fn parse_int(raw: &str) -> Result<i64, String> {
    let t = raw.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected an integer, got {}", shown(raw)));
    }
    t.strip_prefix('+')
        .unwrap_or(t)
        .parse()
        .map_err(|_| format!("integer out of range, got {}", shown(raw)))
}

/// Parses seconds, int or float, the way Python's `float()` reads a query
/// value (but finite and not negative).
fn parse_seconds(raw: &str) -> Result<Duration, String> {
    let t = raw.trim();
    let looks_numeric = !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'+' | b'-' | b'e' | b'E'));
    let value: f64 = match t.parse() {
        Ok(v) if looks_numeric => v,
        _ => return Err(format!("expected a number of seconds, got {}", shown(raw))),
    };
    if value < 0.0 {
        return Err(format!("must not be negative, got {}", shown(raw)));
    }
    Duration::try_from_secs_f64(value).map_err(|_| format!("out of range, got {}", shown(raw)))
}

fn apply_query_option(
    params: &mut ConnectionParameters,
    name: &str,
    raw: &str,
) -> Result<(), Error> {
    let option_err = |reason: String| bad_url(format!("query option {name}: {reason}"));
    // A setter's error already names the option; add only where it came from.
    let setter_err = |e: Error| match e {
        Error::InvalidParameter { reason, .. } => option_err(reason),
        other => other,
    };
    if raw.trim().is_empty() {
        return Err(option_err("empty value".to_owned()));
    }
    match name {
        "backpressure_detection" => match raw {
            "t" | "f" => log::warn!(
                "ignoring URL option backpressure_detection={raw}: it is deprecated \
                 (removed in pika 1.0.0; use Connection.Blocked notifications instead)"
            ),
            _ => return Err(option_err(format!("expected t or f, got {}", shown(raw)))),
        },
        "blocked_connection_timeout" => {
            let t = parse_seconds(raw).map_err(option_err)?;
            params
                .set_blocked_connection_timeout(t)
                .map_err(setter_err)?;
        }
        "channel_max" => {
            let v = parse_int(raw).map_err(option_err)?;
            params.channel_max = validate_channel_max(v).map_err(setter_err)?;
        }
        "client_properties" => {
            let table = pyliteral::parse_dict(raw)
                .map_err(|e| option_err(format!("{e} in {}", shown(raw))))?;
            params
                .set_client_properties(table.unwrap_or_default())
                .map_err(setter_err)?;
        }
        "connection_attempts" => {
            let v = parse_int(raw).map_err(option_err)?;
            params.connection_attempts = validate_connection_attempts(v).map_err(setter_err)?;
        }
        "frame_max" => {
            let v = parse_int(raw).map_err(option_err)?;
            params.frame_max = validate_frame_max(v).map_err(setter_err)?;
        }
        "heartbeat" => {
            let v = parse_int(raw).map_err(option_err)?;
            params.set_heartbeat(validate_heartbeat(v).map_err(setter_err)?);
        }
        "heartbeat_interval" => {
            return Err(option_err(
                "was removed in pika 1.0.0; use heartbeat".to_owned(),
            ));
        }
        "locale" => {
            params.set_locale(raw).map_err(setter_err)?;
        }
        "retry_delay" => {
            let t = parse_seconds(raw).map_err(option_err)?;
            params.set_retry_delay(t);
        }
        "socket_timeout" => {
            let t = parse_seconds(raw).map_err(option_err)?;
            params.set_socket_timeout(t).map_err(setter_err)?;
        }
        "stack_timeout" => {
            let t = parse_seconds(raw).map_err(option_err)?;
            params.set_stack_timeout(t).map_err(setter_err)?;
        }
        "ssl_options" => {
            if params.ssl_options().is_none() {
                return Err(option_err(
                    "needs the amqps:// scheme (TLS); with amqp:// the connection is plain".into(),
                ));
            }
            let table = pyliteral::parse_dict(raw)
                .map_err(|e| option_err(format!("{e} in {}", shown(raw))))?;
            if let Some(table) = table {
                let opts = ssl_options_from_table(&table).map_err(|e| match e {
                    Error::Tls { reason } => option_err(reason),
                    other => other,
                })?;
                params.set_ssl_options(Some(opts));
            }
        }
        "tcp_options" => {
            let table = pyliteral::parse_dict(raw)
                .map_err(|e| option_err(format!("{e} in {}", shown(raw))))?;
            let opts = match table {
                Some(t) => Some(TcpOptions::from_table(&t).map_err(setter_err)?),
                None => None,
            };
            params.set_tcp_options(opts).map_err(setter_err)?;
        }
        _ => {
            return Err(bad_url(format!(
                "unknown query option {name:?} (={}); valid options: {QUERY_OPTIONS}",
                shown(raw)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::ExternalCredentials;

    const SECRET: &str = "Sup3r-S3cret-pw";

    fn url(text: &str) -> UrlParameters {
        UrlParameters::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn url_err(text: &str) -> String {
        match UrlParameters::parse(text) {
            Ok(p) => panic!("{text} parsed: {p:?}"),
            Err(e @ Error::InvalidUrl { .. }) => e.to_string(),
            Err(other) => panic!("{text}: not InvalidUrl: {other:?}"),
        }
    }

    fn plain(p: &ConnectionParameters) -> (&str, &str) {
        let c = p.credentials().as_plain().expect("plain credentials");
        (c.username(), c.password())
    }

    fn invalid_name(e: Error) -> (&'static str, String) {
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
    fn url_without_options_has_the_same_defaults() {
        let u = url("amqp://");
        let d = ConnectionParameters::new();
        assert_eq!(format!("{:?}", *u), format!("{d:?}"));
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

    // ---- tcp options ------------------------------------------------------

    #[test]
    fn tcp_options_from_pika_dict_keys_and_units() {
        let mut t = FieldTable::new();
        t.insert("TCP_KEEPIDLE", 60i32);
        t.insert("TCP_KEEPINTVL", 10i32);
        t.insert("TCP_KEEPCNT", 5i32);
        t.insert("TCP_USER_TIMEOUT", 30_000i32);
        let o = TcpOptions::from_table(&t).unwrap();
        assert_eq!(
            o,
            TcpOptions {
                keepalive: true,
                keepalive_idle: Some(Duration::from_secs(60)),
                keepalive_interval: Some(Duration::from_secs(10)),
                keepalive_count: Some(5),
                user_timeout: Some(Duration::from_millis(30_000)),
            }
        );
    }

    #[test]
    fn tcp_user_timeout_alone_does_not_turn_on_keepalive() {
        let mut t = FieldTable::new();
        t.insert("TCP_USER_TIMEOUT", 0i32);
        let o = TcpOptions::from_table(&t).unwrap();
        assert!(!o.keepalive && !o.so_keepalive());
        assert_eq!(o.user_timeout, Some(Duration::ZERO));
        let mut t = FieldTable::new();
        t.insert("TCP_KEEPCNT", 3i32);
        assert!(TcpOptions::from_table(&t).unwrap().so_keepalive());
        let explicit = TcpOptions {
            keepalive: true,
            ..TcpOptions::default()
        };
        assert!(explicit.so_keepalive());
        assert!(!TcpOptions::default().so_keepalive());
    }

    #[test]
    fn tcp_options_unknown_key_is_an_error_naming_it() {
        let mut t = FieldTable::new();
        t.insert("TCP_NODELAY", 1i32);
        let (name, reason) = invalid_name(TcpOptions::from_table(&t).unwrap_err());
        assert_eq!(name, "tcp_options");
        assert!(reason.contains("\"TCP_NODELAY\""), "{reason}");
        assert!(reason.contains("TCP_KEEPIDLE"), "{reason}");
    }

    #[test]
    fn tcp_options_values_must_be_integers_in_range() {
        for (key, value, needle) in [
            (
                "TCP_KEEPIDLE",
                FieldValue::F64(1.5),
                "must be an integer, got a float",
            ),
            (
                "TCP_KEEPIDLE",
                FieldValue::Bool(true),
                "must be an integer, got a bool",
            ),
            (
                "TCP_KEEPIDLE",
                FieldValue::LongString("5".into()),
                "got a string",
            ),
            (
                "TCP_KEEPIDLE",
                FieldValue::I32(0),
                "between 1 and 2147483647, got 0",
            ),
            ("TCP_KEEPINTVL", FieldValue::I32(-1), "got -1"),
            (
                "TCP_KEEPCNT",
                FieldValue::I64(2_147_483_648),
                "got 2147483648",
            ),
            (
                "TCP_USER_TIMEOUT",
                FieldValue::I32(-5),
                "between 0 and 2147483647, got -5",
            ),
        ] {
            let mut t = FieldTable::new();
            t.insert(key, value);
            let (name, reason) = invalid_name(TcpOptions::from_table(&t).unwrap_err());
            assert_eq!(name, "tcp_options");
            assert!(reason.contains(key) && reason.contains(needle), "{reason}");
        }
    }

    #[test]
    fn set_tcp_options_validates_units() {
        let mut p = ConnectionParameters::new();
        let ok = TcpOptions {
            keepalive_idle: Some(Duration::from_secs(1)),
            keepalive_interval: Some(Duration::from_secs(2_147_483_647)),
            keepalive_count: Some(1),
            user_timeout: Some(Duration::from_millis(2_147_483_647)),
            ..TcpOptions::default()
        };
        p.set_tcp_options(Some(ok.clone())).unwrap();
        // Stored with keepalive on, as the keepalive timings imply it.
        let stored = TcpOptions {
            keepalive: true,
            ..ok
        };
        assert_eq!(p.tcp_options(), Some(&stored));
        for bad in [
            TcpOptions {
                keepalive_idle: Some(Duration::from_millis(1500)),
                ..TcpOptions::default()
            },
            TcpOptions {
                keepalive_interval: Some(Duration::ZERO),
                ..TcpOptions::default()
            },
            TcpOptions {
                keepalive_count: Some(0),
                ..TcpOptions::default()
            },
            TcpOptions {
                user_timeout: Some(Duration::from_micros(1500)),
                ..TcpOptions::default()
            },
            TcpOptions {
                user_timeout: Some(Duration::from_millis(2_147_483_648)),
                ..TcpOptions::default()
            },
        ] {
            let (name, _) = invalid_name(p.set_tcp_options(Some(bad)).unwrap_err());
            assert_eq!(name, "tcp_options");
        }
        assert_eq!(p.tcp_options(), Some(&stored));
        let user_timeout_only = TcpOptions {
            user_timeout: Some(Duration::from_millis(10)),
            ..TcpOptions::default()
        };
        p.set_tcp_options(Some(user_timeout_only.clone())).unwrap();
        assert_eq!(p.tcp_options(), Some(&user_timeout_only));
        p.set_tcp_options(None).unwrap();
        assert_eq!(p.tcp_options(), None);
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

    #[test]
    fn display_and_debug_of_url_parameters_redact_the_password() {
        let u = url(&format!(
            "amqp://alice:{SECRET}@rabbit1:5673/vh?heartbeat=5"
        ));
        let shown = u.to_string();
        assert_eq!(shown, "amqp://alice:<redacted>@rabbit1:5673/vh?heartbeat=5");
        for text in [shown, format!("{u:?}"), format!("{u:#?}")] {
            assert!(!text.contains(SECRET), "{text}");
        }
        // The parameters still hold the real password.
        assert_eq!(plain(&u), ("alice", SECRET));
    }

    #[test]
    fn display_redacts_a_percent_encoded_password() {
        let u = url("amqp://bob:p%40ss%2Fw0rd@h/");
        assert_eq!(u.to_string(), "amqp://bob:<redacted>@h/");
        assert_eq!(plain(&u), ("bob", "p@ss/w0rd"));
    }

    #[test]
    fn display_of_url_without_password_is_the_url() {
        assert_eq!(url("amqp://rabbit1/%2F").to_string(), "amqp://rabbit1/%2F");
        assert_eq!(url("amqp://bob@rabbit1").to_string(), "amqp://bob@rabbit1");
    }

    #[test]
    fn url_errors_never_show_the_password() {
        for bad in [
            format!("amqp://u:{SECRET}@h/?nope=1"),
            format!("amqp://u:{SECRET}@h/?frame_max=1"),
            format!("amqp://u:{SECRET}@h/a/b"),
            format!("amqp://u:{SECRET}@h:0/"),
            format!("amqp://u:{SECRET}%zz@h/"),
            format!("amqp://u:{SECRET}%ff@h/"),
            format!("amqp://u:{SECRET}@h/#frag"),
            format!("amqps://u:{SECRET}@h/?ssl_options=%7B%27bogus%27%3A1%7D"),
            format!("http://u:{SECRET}@h/"),
            format!("amqp://u:{SECRET}@h:99999/"),
        ] {
            let e = url_err(&bad);
            assert!(!e.contains(SECRET), "{e}");
        }
    }

    // ---- URL: the base ----------------------------------------------------

    #[test]
    fn seed_default_url_is_localhost_5672_guest_and_root_vhost() {
        let u = url("amqp://guest:guest@localhost:5672/%2F");
        assert_eq!(
            (u.host(), u.port(), u.virtual_host()),
            ("localhost", 5672, "/")
        );
        assert_eq!(plain(&u), ("guest", "guest"));
    }

    #[test]
    fn seed_www_data_url_sets_user_password_host_and_vhost() {
        let u = url("amqp://www-data:rabbit_pwd@rabbit1/web_messages");
        assert_eq!(u.host(), "rabbit1");
        assert_eq!(u.port(), 5672);
        assert_eq!(u.virtual_host(), "web_messages");
        assert_eq!(plain(&u), ("www-data", "rabbit_pwd"));
    }

    #[test]
    fn seed_url_query_sets_heartbeat_attempts_and_socket_timeout() {
        let u = url(
            "amqp://user:pass@host:5672/%2F?heartbeat=30&connection_attempts=3&socket_timeout=5",
        );
        assert_eq!((u.host(), u.port(), u.virtual_host()), ("host", 5672, "/"));
        assert_eq!(plain(&u), ("user", "pass"));
        assert!(matches!(u.heartbeat(), Heartbeat::Timeout(30)));
        assert_eq!(u.connection_attempts(), 3);
        assert_eq!(u.socket_timeout(), Some(Duration::from_secs(5)));
    }

    #[test]
    fn seed_amqps_urls_turn_tls_on_with_port_5671() {
        for text in [
            "amqps://www-data:rabbit_pwd@rabbit1/web_messages",
            "amqps://www-data:rabbit_pwd@rabbit1/web_messages?heartbeat=30",
        ] {
            let u = url(text);
            assert_eq!(u.port(), 5671, "{text}");
            let tls = u.ssl_options().expect("TLS is on");
            assert!(tls.verifies_peer());
            assert_eq!(tls.server_hostname(), None);
        }
        assert_eq!(url("amqps://h:5999/").port(), 5999);
        assert_eq!(url("amqp://h/").ssl_options().map(|_| ()), None);
    }

    #[test]
    fn ssl_options_need_the_amqps_scheme() {
        // The seed's example pairs ssl_options with amqp://; like pika 1.x,
        // TLS options without the amqps scheme are refused.
        let e = url_err(
            "amqp://www-data:rabbit_pwd@rabbit1/web_messages?heartbeat=30&ssl_options=%7B%27keyfile\
             %27%3A+%27%2Fetc%2Fssl%2Fmykey.pem%27%2C%27certfile%27%3A+%27%2Fetc%2Fssl%2Fmycert.pem%27%7D",
        );
        assert!(e.contains("ssl_options") && e.contains("amqps"), "{e}");
    }

    #[test]
    fn ssl_options_keys_are_checked_and_files_named_in_errors() {
        let e = url_err("amqps://h/?ssl_options=%7B%27bogus%27%3A+1%7D");
        assert!(e.contains("unknown key 'bogus'"), "{e}");
        let e = url_err("amqps://h/?ssl_options=%7B%27ca_certs%27%3A+%27%2Fno%2Fsuch.pem%27%7D");
        assert!(e.contains("ca_certs /no/such.pem"), "{e}");
        let e = url_err("amqps://h/?ssl_options=%7B%27certfile%27%3A+%27%2Fx.pem%27%7D");
        assert!(e.contains("certfile and keyfile go together"), "{e}");
        let e = url_err("amqps://h/?ssl_options=%7B%27cert_reqs%27%3A+%27MAYBE%27%7D");
        assert!(e.contains("cert_reqs"), "{e}");
        // JSON works too; CERT_NONE turns verification off; server_hostname.
        let u = url(
            "amqps://h/?ssl_options=%7B%22cert_reqs%22%3A%22CERT_NONE%22%2C%22server_hostname%22%3A%22rabbit.example%22%7D",
        );
        let tls = u.ssl_options().unwrap();
        assert!(!tls.verifies_peer());
        assert_eq!(tls.server_hostname(), Some("rabbit.example"));
    }

    #[test]
    fn seed_backpressure_detection_is_accepted_and_ignored() {
        let u = url("amqp://guest:guest@rabbit-server1:5672/%2F?backpressure_detection=t");
        assert_eq!(u.host(), "rabbit-server1");
        assert_eq!(format!("{:?}", u.params.heartbeat), "ServerDefault");
        url("amqp://h/?backpressure_detection=f");
        let e = url_err("amqp://h/?backpressure_detection=yes");
        assert!(
            e.contains("backpressure_detection") && e.contains("\"yes\""),
            "{e}"
        );
    }

    #[test]
    fn missing_parts_take_the_defaults() {
        let u = url("amqp://");
        assert_eq!(
            (u.host(), u.port(), u.virtual_host()),
            ("localhost", 5672, "/")
        );
        assert_eq!(plain(&u), ("guest", "guest"));
        let u = url("amqp:///%2Fv");
        assert_eq!((u.host(), u.virtual_host()), ("localhost", "/v"));
        let u = url("amqp://rabbit1");
        assert_eq!((u.host(), u.virtual_host()), ("rabbit1", "/"));
        let u = url("amqp://rabbit1/");
        assert_eq!(u.virtual_host(), "/");
    }

    #[test]
    fn vhost_is_the_percent_decoded_single_path_segment() {
        assert_eq!(url("amqp://h/vhost").virtual_host(), "vhost");
        assert_eq!(url("amqp://h/%2F").virtual_host(), "/");
        assert_eq!(url("amqp://h/%2f").virtual_host(), "/");
        assert_eq!(url("amqp://h/%2Fv").virtual_host(), "/v");
        assert_eq!(url("amqp://h/a%20b%2Bc+d").virtual_host(), "a b+c+d");
        assert_eq!(url("amqp://h/caf%C3%A9").virtual_host(), "café");
        let e = url_err("amqp://h/a/b");
        assert!(e.contains("\"/a/b\"") && e.contains("%2F"), "{e}");
        assert!(url_err("amqp://h//").contains("more than one segment"));
    }

    #[test]
    fn user_and_password_are_percent_decoded() {
        let u = url("amqp://us%3Aer%40x:p%40ss%3Aw%2Fo%25rd@h/");
        assert_eq!(plain(&u), ("us:er@x", "p@ss:w/o%rd"));
        let u = url("amqp://j%C3%B6rg:p+w@h/");
        assert_eq!(plain(&u), ("jörg", "p+w"));
    }

    #[test]
    fn user_without_password_gets_an_empty_password() {
        assert_eq!(plain(&url("amqp://bob@h/")), ("bob", ""));
        assert_eq!(plain(&url("amqp://bob:@h/")), ("bob", ""));
        assert_eq!(plain(&url("amqp://:pw@h/")), ("", "pw"));
    }

    #[test]
    fn malformed_percent_escapes_are_errors() {
        let e = url_err("amqp://u:p%zz@h/");
        assert!(
            e.contains("malformed percent-escape in the password"),
            "{e}"
        );
        let e = url_err("amqp://u%4@h/");
        assert!(e.contains("username"), "{e}");
        let e = url_err("amqp://h/v%G1");
        assert!(e.contains("virtual host") && e.contains("v%G1"), "{e}");
        let e = url_err("amqp://h/%FF");
        assert!(e.contains("not valid UTF-8"), "{e}");
    }

    #[test]
    fn ipv6_host_loses_its_brackets() {
        let u = url("amqp://[::1]:5673/");
        assert_eq!((u.host(), u.port()), ("::1", 5673));
        let u = url("amqp://guest:guest@[2001:db8::42]/%2F");
        assert_eq!(u.host(), "2001:db8::42");
        assert_eq!(u.port(), 5672);
    }

    #[test]
    fn host_is_lower_cased_and_ipv4_kept() {
        assert_eq!(
            url("AMQP://Rabbit1.Example.COM/").host(),
            "rabbit1.example.com"
        );
        assert_eq!(url("amqp://127.0.0.1:5672").host(), "127.0.0.1");
    }

    #[test]
    fn port_zero_and_out_of_range_ports_are_errors() {
        let e = url_err("amqp://h:0/");
        assert!(e.contains("port") && e.contains("got 0"), "{e}");
        assert!(url_err("amqp://h:65536/").contains("port"));
        assert_eq!(url("amqp://h:65535/").port(), 65535);
    }

    #[test]
    fn other_schemes_are_errors_naming_the_scheme() {
        let e = url_err("http://h/");
        assert!(e.contains("'http'"), "{e}");
        let e = url_err("redis://h/");
        assert!(e.contains("'redis'"), "{e}");
        let e = url_err("rabbit1/vhost");
        assert!(e.contains("no scheme"), "{e}");
        let e = url_err("amqp:rabbit1");
        assert!(e.contains("expected amqp://"), "{e}");
    }

    #[test]
    fn url_fragment_is_an_error() {
        let e = url_err("amqp://h/v#x");
        assert!(e.contains("fragment"), "{e}");
    }

    #[test]
    fn url_parameters_deref_to_and_convert_into_connection_parameters() {
        let mut u: UrlParameters = "amqp://h/v?channel_max=10".parse().unwrap();
        assert_eq!(u.channel_max(), 10);
        u.set_channel_max(20).unwrap();
        assert_eq!(u.channel_max(), 20);
        let p = ConnectionParameters::from(u.clone());
        assert_eq!((p.host(), p.channel_max()), ("h", 20));
        assert_eq!(u.into_parameters().virtual_host(), "v");
    }

    // ---- URL: query options -----------------------------------------------

    #[test]
    fn integer_options_parse_and_are_bounded() {
        let u = url("amqp://h/?channel_max=1&frame_max=4096&connection_attempts=7&heartbeat=0");
        assert_eq!(u.channel_max(), 1);
        assert_eq!(u.frame_max(), 4096);
        assert_eq!(u.connection_attempts(), 7);
        assert!(matches!(u.heartbeat(), Heartbeat::Disabled));
        let u = url("amqp://h/?channel_max=65535&frame_max=2147483647&heartbeat=65535");
        assert_eq!((u.channel_max(), u.frame_max()), (65535, 2_147_483_647));
        assert!(matches!(u.heartbeat(), Heartbeat::Timeout(65535)));
        assert_eq!(url("amqp://h/?heartbeat=+30").heartbeat().tune(0), 30);

        for (query, needle) in [
            (
                "channel_max=0",
                "query option channel_max: must be between 1 and 65535, got 0",
            ),
            ("channel_max=65536", "got 65536"),
            (
                "frame_max=100",
                "query option frame_max: must be between 4096 and 2147483647, got 100",
            ),
            ("frame_max=2147483648", "got 2147483648"),
            (
                "connection_attempts=0",
                "query option connection_attempts: must be between 1",
            ),
            (
                "heartbeat=-1",
                "query option heartbeat: must be between 0 and 65535, got -1",
            ),
            ("heartbeat=70000", "got 70000"),
            (
                "heartbeat=30.5",
                "query option heartbeat: expected an integer, got \"30.5\"",
            ),
            ("channel_max=ten", "expected an integer, got \"ten\""),
            ("frame_max=99999999999999999999", "integer out of range"),
        ] {
            let e = url_err(&format!("amqp://h/?{query}"));
            assert!(e.contains(needle), "{query}: {e}");
        }
    }

    #[test]
    fn duration_options_take_int_or_float_seconds() {
        let u = url(
            "amqp://h/?retry_delay=0.5&socket_timeout=5&stack_timeout=2.25\
             &blocked_connection_timeout=300",
        );
        assert_eq!(u.retry_delay(), Duration::from_millis(500));
        assert_eq!(u.socket_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(u.stack_timeout(), Some(Duration::from_millis(2250)));
        assert_eq!(
            u.blocked_connection_timeout(),
            Some(Duration::from_secs(300))
        );
        assert_eq!(url("amqp://h/?retry_delay=0").retry_delay(), Duration::ZERO);
        assert_eq!(
            url("amqp://h/?retry_delay=1e1").retry_delay(),
            Duration::from_secs(10)
        );
        assert_eq!(
            url("amqp://h/?retry_delay=.25").retry_delay(),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn malformed_duration_options_are_errors() {
        for (query, needle) in [
            (
                "socket_timeout=0",
                "query option socket_timeout: must be greater than zero",
            ),
            (
                "stack_timeout=0.0",
                "query option stack_timeout: must be greater than zero",
            ),
            (
                "blocked_connection_timeout=0",
                "blocked_connection_timeout: must be greater than zero",
            ),
            (
                "retry_delay=-1",
                "query option retry_delay: must not be negative, got \"-1\"",
            ),
            ("socket_timeout=-0.5", "must not be negative"),
            (
                "socket_timeout=abc",
                "expected a number of seconds, got \"abc\"",
            ),
            (
                "socket_timeout=inf",
                "expected a number of seconds, got \"inf\"",
            ),
            ("retry_delay=NaN", "got \"NaN\""),
            ("retry_delay=1e400", "out of range, got \"1e400\""),
            ("retry_delay=1e300", "out of range"),
            ("retry_delay=5s", "got \"5s\""),
        ] {
            let e = url_err(&format!("amqp://h/?{query}"));
            assert!(e.contains(needle), "{query}: {e}");
        }
    }

    #[test]
    fn locale_option_sets_the_locale() {
        assert_eq!(url("amqp://h/?locale=pt_BR").locale(), "pt_BR");
        let e = url_err(&format!("amqp://h/?locale={}", "x".repeat(256)));
        assert!(
            e.contains("query option locale: must be at most 255 bytes"),
            "{e}"
        );
    }

    #[test]
    fn client_properties_option_takes_a_url_encoded_python_dict() {
        // urllib.urlencode({'client_properties': {...}}) writes str(dict).
        let u = url(
            "amqp://h/?client_properties=%7B%27connection_name%27%3A+%27x%27%2C+%27n%27%3A+1%2C+\
             %27flag%27%3A+True%2C+%27none%27%3A+None%2C+%27nested%27%3A+%7B%27a%27%3A+%5B1%2C+\
             2.5%2C+%27b%27%5D%7D%7D",
        );
        let props = u.client_properties();
        assert_eq!(u.connection_name(), Some("x"));
        assert_eq!(props.get("n"), Some(&FieldValue::I32(1)));
        assert_eq!(props.get("flag"), Some(&FieldValue::Bool(true)));
        assert_eq!(props.get("none"), Some(&FieldValue::Void));
        let nested = props.get("nested").and_then(FieldValue::as_table).unwrap();
        assert_eq!(
            nested.get("a"),
            Some(&FieldValue::Array(vec![
                FieldValue::I32(1),
                FieldValue::F64(2.5),
                FieldValue::LongString("b".into()),
            ]))
        );
        // And it is merged over the defaults.
        let eff = u.effective_client_properties();
        assert_eq!(
            eff.get("product").and_then(FieldValue::as_str),
            Some("pika-rs")
        );
        assert_eq!(
            eff.get("connection_name").and_then(FieldValue::as_str),
            Some("x")
        );
    }

    #[test]
    fn client_properties_option_takes_json_with_double_quotes() {
        let u = url(
            "amqp://h/?client_properties=%7B%22connection_name%22%3A%22web%22%2C%22big%22%3A\
             4294967296%2C%22on%22%3Atrue%2C%22off%22%3Afalse%2C%22z%22%3Anull%7D",
        );
        let props = u.client_properties();
        assert_eq!(u.connection_name(), Some("web"));
        assert_eq!(props.get("big"), Some(&FieldValue::I64(4_294_967_296)));
        assert_eq!(props.get("on"), Some(&FieldValue::Bool(true)));
        assert_eq!(props.get("off"), Some(&FieldValue::Bool(false)));
        assert_eq!(props.get("z"), Some(&FieldValue::Void));
    }

    #[test]
    fn client_properties_none_clears_them() {
        let u = url("amqp://h/?client_properties=None");
        assert!(u.client_properties().is_empty());
    }

    #[test]
    fn malformed_client_properties_are_errors_with_offset_and_value() {
        let e = url_err("amqp://h/?client_properties=%7B%27a%27%3A+1+%27b%27%3A+2%7D");
        assert!(e.contains("query option client_properties"), "{e}");
        assert!(e.contains("at byte 8"), "{e}");
        assert!(e.contains("\"{'a': 1 'b': 2}\""), "{e}");
        let e = url_err("amqp://h/?client_properties=%5B1%2C2%5D");
        assert!(e.contains("expected a dict, found a list"), "{e}");
        let e = url_err("amqp://h/?client_properties=connection_name");
        assert!(e.contains("unknown name 'connection_name'"), "{e}");
    }

    #[test]
    fn tcp_options_option_takes_pika_keys() {
        let u = url(
            "amqp://h/?tcp_options=%7B%27TCP_KEEPIDLE%27%3A+60%2C+%27TCP_KEEPINTVL%27%3A+10%2C+\
             %27TCP_KEEPCNT%27%3A+3%2C+%27TCP_USER_TIMEOUT%27%3A+20000%7D",
        );
        let o = u.tcp_options().unwrap();
        assert!(o.keepalive);
        assert_eq!(o.keepalive_idle, Some(Duration::from_secs(60)));
        assert_eq!(o.keepalive_interval, Some(Duration::from_secs(10)));
        assert_eq!(o.keepalive_count, Some(3));
        assert_eq!(o.user_timeout, Some(Duration::from_millis(20_000)));
        let u = url("amqp://h/?tcp_options=%7B%22TCP_USER_TIMEOUT%22%3A+1000%7D");
        assert!(!u.tcp_options().unwrap().so_keepalive());
        assert_eq!(url("amqp://h/?tcp_options=None").tcp_options(), None);
    }

    #[test]
    fn bad_tcp_options_are_errors_naming_the_key() {
        let e = url_err("amqp://h/?tcp_options=%7B%27SO_LINGER%27%3A+1%7D");
        assert!(
            e.contains("query option tcp_options") && e.contains("\"SO_LINGER\""),
            "{e}"
        );
        let e = url_err("amqp://h/?tcp_options=%7B%27TCP_KEEPIDLE%27%3A+%2710%27%7D");
        assert!(
            e.contains("TCP_KEEPIDLE must be an integer, got a string"),
            "{e}"
        );
        let e = url_err("amqp://h/?tcp_options=%7B%27TCP_KEEPCNT%27%3A+0%7D");
        assert!(
            e.contains("TCP_KEEPCNT must be between 1 and 2147483647, got 0"),
            "{e}"
        );
    }

    #[test]
    fn unknown_option_is_an_error_naming_it() {
        let e = url_err("amqp://h/?hearbeat=30");
        assert!(e.contains("unknown query option \"hearbeat\""), "{e}");
        assert!(e.contains("\"30\""), "{e}");
        assert!(e.contains("heartbeat"), "{e}");
    }

    #[test]
    fn heartbeat_interval_is_refused_as_removed() {
        let e = url_err("amqp://h/?heartbeat_interval=30");
        assert!(
            e.contains("heartbeat_interval") && e.contains("use heartbeat"),
            "{e}"
        );
    }

    #[test]
    fn repeated_option_is_an_error() {
        let e = url_err("amqp://h/?heartbeat=30&heartbeat=60");
        assert!(e.contains("heartbeat is given more than once"), "{e}");
    }

    #[test]
    fn empty_option_value_is_an_error() {
        for q in ["heartbeat=", "heartbeat", "locale=+"] {
            let e = url_err(&format!("amqp://h/?{q}"));
            assert!(e.contains("empty value"), "{q}: {e}");
        }
    }

    #[test]
    fn every_query_option_applies_in_one_url() {
        let u = url(
            "amqp://u:p@h:1234/v?blocked_connection_timeout=1.5&channel_max=100\
             &client_properties=%7B%27connection_name%27%3A%27all%27%7D&connection_attempts=4\
             &frame_max=8192&heartbeat=20&locale=de_DE&retry_delay=3&socket_timeout=4\
             &stack_timeout=9&tcp_options=%7B%27TCP_KEEPIDLE%27%3A5%7D&backpressure_detection=f",
        );
        assert_eq!((u.host(), u.port(), u.virtual_host()), ("h", 1234, "v"));
        assert_eq!(
            u.blocked_connection_timeout(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(u.channel_max(), 100);
        assert_eq!(u.connection_name(), Some("all"));
        assert_eq!(u.connection_attempts(), 4);
        assert_eq!(u.frame_max(), 8192);
        assert!(matches!(u.heartbeat(), Heartbeat::Timeout(20)));
        assert_eq!(u.locale(), "de_DE");
        assert_eq!(u.retry_delay(), Duration::from_secs(3));
        assert_eq!(u.socket_timeout(), Some(Duration::from_secs(4)));
        assert_eq!(u.stack_timeout(), Some(Duration::from_secs(9)));
        assert_eq!(
            u.tcp_options().unwrap().keepalive_idle,
            Some(Duration::from_secs(5))
        );
    }
}
