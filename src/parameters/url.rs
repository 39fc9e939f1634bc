//! [`UrlParameters`]: connection parameters read from an AMQP URL (pika's
//! `URLParameters`), with the URL's query options, percent-decoding, and
//! the `ssl_options` dict that turns TLS on (on `amqp://` as on
//! `amqps://`, as in pika 1.1).
//!
//! `ssl_options` keys, with the names of Python's `ssl.wrap_socket` and of
//! `SSLContext` both accepted:
//!
//! * `ca_certs` / `cafile`: a PEM file of CA certificates (a directory is
//!   read as `ca_path`, as pika does); `ca_path` / `capath`: a directory
//!   whose `*.pem` and `*.crt` files are all loaded; `ca_data` / `cadata`:
//!   PEM text. Every source given must yield a usable certificate. With
//!   none, the bundled Mozilla roots (`webpki-roots`) are used.
//! * `certfile` and `keyfile` (both or neither): the client certificate
//!   chain and its key; `password`: the passphrase of an encrypted PKCS#8
//!   key (`-----BEGIN ENCRYPTED PRIVATE KEY-----`), decrypted with the
//!   RustCrypto `pkcs8` crate.
//! * `server_hostname`: the name to verify the broker's certificate for.
//! * `cert_reqs`: `CERT_REQUIRED` (the default) or `CERT_NONE`. The
//!   broker's certificate is verified unless it is `CERT_NONE` (pika 1.1's
//!   URL path does not verify; this crate does).
//! * `ciphers`, `protocol`, `ssl_version`: accepted and ignored with a
//!   warning naming them: rustls picks TLS 1.2 or 1.3 and its cipher
//!   suites.
//!
//! Any other key is an error naming it.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::time::Duration;

use url::{Host, Position, Url};

use super::pyliteral;
use super::url_ssl::{redact_query, ssl_options_from_table};
use super::{
    ConnectionParameters, TcpOptions, validate_channel_max, validate_connection_attempts,
    validate_frame_max, validate_heartbeat,
};
use crate::credentials::{PlainCredentials, REDACTED};
use crate::error::Error;
use crate::tls::SslOptions;

/// Connection parameters read from an AMQP URL (pika's `URLParameters`):
///
/// `amqp://username:password@host:port/virtual_host?option=value&...`
///
/// * The scheme is `amqp`, or `amqps` for TLS (port 5671 by default,
///   verifying the broker against the bundled Mozilla roots unless
///   `ssl_options` says otherwise); any other scheme is an
///   [`Error::InvalidUrl`]. `ssl_options` on an `amqp` URL turns TLS on
///   too, as in pika 1.1, keeping the scheme's port (5672 unless the URL
///   gives one).
/// * Username, password and virtual host are percent-decoded (`%2F` is
///   `/`). With no `user:password@`, the credentials are `guest`/`guest`;
///   `user@` alone gives an empty password.
/// * A missing host is `localhost`; an IPv6 host is written in brackets,
///   `[::1]`, and stored without them. Host names are lower-cased, as in
///   pika.
/// * The port defaults to 5672 (5671 for `amqps`); it must be a number from
///   1 to 65535.
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
/// | `ssl_options` | URL-encoded dict literal (below) turning TLS on, or `None` |
/// | `backpressure_detection` | `t` or `f`; accepted and ignored with a warning (removed in pika 1.0.0, still shown in its docs) |
///
/// Dict values are Python literals as `urllib.urlencode` writes them
/// (`{'connection_name': 'web', 'retries': 3, 'debug': True, 'x': None}`,
/// single or double quotes, `True`/`False`/`None`, nested dicts, lists and
/// tuples) or JSON (`true`/`false`/`null`). Integers become 32-bit field
/// values when they fit and 64-bit otherwise, floats 64-bit, strings long
/// strings, `None` void, as pika encodes them.
///
/// `ssl_options` keys (string values; `None` is the same as leaving the key
/// out):
///
/// | key | value |
/// |---|---|
/// | `ca_certs`, `cafile` | PEM file of CA certificates (a directory: as `ca_path`) |
/// | `ca_path`, `capath` | directory: every `*.pem` and `*.crt` file in it is loaded; one that cannot be read or holds no certificate is an error naming it |
/// | `ca_data`, `cadata` | PEM text of CA certificates |
/// | `certfile`, `keyfile` | client certificate chain and private key (PEM), both or neither |
/// | `password` | passphrase of an encrypted PKCS#8 `keyfile` (PBES2: PBKDF2-HMAC-SHA256 or scrypt, with AES, as `openssl pkcs8 -topk8 -v2 aes-256-cbc` writes); an encrypted key without it is an error |
/// | `server_hostname` | name to verify the broker's certificate for |
/// | `cert_reqs` | `CERT_REQUIRED` (default) or `CERT_NONE` (no verification; a warning is logged on connect); anything else is an error |
/// | `ciphers`, `protocol`, `ssl_version` | ignored, with a warning naming them |
///
/// The CA sources add up; without any, the broker is verified against the
/// bundled Mozilla roots. Any other key is an error naming it.
///
/// `Display` prints the URL (normalised) with the password replaced by
/// `<redacted>`, and an `ssl_options` dict that holds a `password` shown
/// decoded with that value as `<redacted>`; `Debug` redacts both too. The
/// URL shown is the one parsed: later changes made through `DerefMut` do
/// not alter it.
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
    /// `amqps://` turns TLS on with port 5671 by default; so does an
    /// `ssl_options` dict on `amqp://`, keeping port 5672 unless the URL
    /// gives one (pika reads the port before the query). The broker's
    /// certificate is verified — against the CAs of `ca_certs`/`cafile`,
    /// `ca_path`/`capath` and `ca_data`/`cadata`, else the bundled Mozilla
    /// roots — unless `cert_reqs` is `CERT_NONE`. `certfile` and `keyfile`
    /// give a client certificate, `password` opens an encrypted PKCS#8
    /// key, `server_hostname` names the certificate's host; `ciphers`,
    /// `protocol` and `ssl_version` are ignored with a warning. See
    /// [`UrlParameters`] for every query option.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when the URL does not parse, its scheme is not
    /// `amqp` or `amqps`, its port is not a number from 1 to 65535, a
    /// percent-escape is malformed, the path has more than one segment, it
    /// has a fragment, a query option is unknown, repeated, empty or has a
    /// malformed or out-of-range value, or `ssl_options` has an unknown key
    /// or a bad `cert_reqs`, names files that cannot be loaded, or holds an
    /// encrypted key without its password (or with a wrong one). The reason
    /// names the part or option and the bad value, never a password.
    pub fn parse(url: &str) -> Result<UrlParameters, Error> {
        let parsed = Url::parse(url).map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => bad_url(
                "no scheme: expected amqp://[username:password@]host[:port][/virtual_host][?options]",
            ),
            url::ParseError::InvalidPort => invalid_port(url),
            other => bad_url(other.to_string()),
        })?;
        match parsed.scheme() {
            "amqp" => {}
            "amqps" => {}
            other => {
                return Err(bad_url(format!(
                    "unsupported scheme '{other}': expected amqp or amqps"
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
            if port == 0 {
                return Err(invalid_port(url));
            }
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

        let mut redacted_url = if parsed.password().is_some() {
            format!(
                "{}{REDACTED}{}",
                &parsed[..Position::BeforePassword],
                &parsed[Position::AfterPassword..Position::AfterPath]
            )
        } else {
            parsed[..Position::AfterPath].to_owned()
        };
        if let Some(query) = parsed.query() {
            redacted_url.push('?');
            redacted_url.push_str(&redact_query(query));
        }
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

/// The error for a port that is not a number from 1 to 65535, showing the
/// port as written in `url`.
fn invalid_port(url: &str) -> Error {
    const RANGE: &str = "expected a number from 1 to 65535";
    let url = url.trim();
    let rest = url.find("://").map_or(url, |i| &url[i + 3..]);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(end);
    // An '@' after the authority means a '/', '?' or '#' in the user
    // information was not encoded: what looks like the port may be part of
    // the password, so it is not shown.
    if after.contains('@') {
        return bad_url(format!(
            "invalid port: {RANGE} (not shown: if the username or password holds a '/', '?' \
             or '#', write it as %2F, %3F or %23)"
        ));
    }
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = match host_port.rfind(']') {
        Some(close) => host_port[close + 1..].strip_prefix(':'),
        None => host_port.rsplit_once(':').map(|(_, p)| p),
    };
    match port {
        Some(port) => bad_url(format!("invalid port {}: {RANGE}", shown(port))),
        None => bad_url(format!("invalid port: {RANGE}")),
    }
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
            let table = pyliteral::parse_dict(raw).map_err(|e| {
                if raw.contains("password") {
                    // The message could quote part of the passphrase.
                    option_err(format!(
                        "malformed dict at byte {} (not shown: it may hold a password)",
                        e.offset()
                    ))
                } else {
                    option_err(format!("{e} in {}", shown(raw)))
                }
            })?;
            if let Some(table) = table {
                let opts = ssl_options_from_table(&table).map_err(|e| match e {
                    Error::Tls { reason } => option_err(reason),
                    other => other,
                })?;
                // TLS turned on by ssl_options on an amqp:// URL keeps the
                // scheme's port, 5672 (pika reads the port before the
                // query); amqps:// already has TLS on and keeps 5671.
                if params.ssl_options().is_none() && !params.port_set {
                    params
                        .set_port(ConnectionParameters::DEFAULT_PORT)
                        .map_err(setter_err)?;
                }
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
pub(super) mod tests {
    use super::*;
    use crate::parameters::Heartbeat;
    use crate::parameters::tests::{SECRET, plain};
    use crate::table::FieldValue;

    pub(in crate::parameters) fn url(text: &str) -> UrlParameters {
        UrlParameters::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    pub(in crate::parameters) fn url_err(text: &str) -> String {
        match UrlParameters::parse(text) {
            Ok(p) => panic!("{text} parsed: {p:?}"),
            Err(e @ Error::InvalidUrl { .. }) => e.to_string(),
            Err(other) => panic!("{text}: not InvalidUrl: {other:?}"),
        }
    }

    // ---- defaults -------------------------------------------------------

    #[test]
    fn url_without_options_has_the_same_defaults() {
        let u = url("amqp://");
        let d = ConnectionParameters::new();
        assert_eq!(format!("{:?}", *u), format!("{d:?}"));
    }

    // ---- redaction --------------------------------------------------------

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
            format!("amqp://u:{SECRET}@h:0/"),
            format!("amqp://u:{SECRET}/x@h/"),
            format!("amqp://u:{SECRET}?x@h/"),
            format!("amqp://u:{SECRET}#x@h/"),
            format!("amqp://u:1{SECRET}@h:abc/"),
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
    fn invalid_ports_are_errors_showing_the_port_given() {
        for (text, port) in [
            ("amqp://h:99999/", "99999"),
            ("amqp://h:65536/", "65536"),
            ("amqp://h:abc/", "abc"),
            ("amqp://h:0/", "0"),
            ("amqps://u:pw@h:0/?heartbeat=1", "0"),
            ("amqp://u:pw@[::1]:70000/", "70000"),
            ("amqp://h:12ab", "12ab"),
        ] {
            assert_eq!(
                url_err(text),
                format!(
                    "invalid AMQP URL: invalid port \"{port}\": expected a number from 1 to 65535"
                ),
                "{text}"
            );
        }
        assert_eq!(url("amqp://h:65535/").port(), 65535);
        assert_eq!(url("amqp://h:1/").port(), 1);
        // An unencoded '/' in the password makes the rest look like a
        // port: it is not shown, and the error says what to do.
        let e = url_err(&format!("amqp://u:{SECRET}/x@h/"));
        assert_eq!(
            e,
            "invalid AMQP URL: invalid port: expected a number from 1 to 65535 (not shown: if \
             the username or password holds a '/', '?' or '#', write it as %2F, %3F or %23)"
        );
    }

    #[test]
    fn other_schemes_are_errors_naming_the_scheme() {
        assert_eq!(
            url_err("http://h/"),
            "invalid AMQP URL: unsupported scheme 'http': expected amqp or amqps"
        );
        let e = url_err("redis://h/");
        assert!(
            e.contains("unsupported scheme 'redis': expected amqp or amqps"),
            "{e}"
        );
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
