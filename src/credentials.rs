//! Authentication credentials (pika's `pika.credentials`): SASL PLAIN
//! username and password ([`PlainCredentials`]), SASL EXTERNAL
//! ([`ExternalCredentials`]), and choosing the mechanism from what the
//! broker offers in `Connection.Start` ([`Credentials::response_for`]).
//!
//! Passwords never appear in `Debug` output: it prints `<redacted>` instead
//! (and not the password's length).

use std::fmt;

use crate::error::Error;
use crate::table::LongString;

/// The text `Debug` prints in place of a secret.
pub(crate) const REDACTED: &str = "<redacted>";

/// Username and password for SASL PLAIN, RabbitMQ's default mechanism
/// (pika's `PlainCredentials`).
///
/// With [`with_erase_on_connect(true)`](Self::with_erase_on_connect) the
/// connection wipes the password from these credentials once it has sent
/// it in `Connection.StartOk`, so it is not kept in memory for the life of
/// the connection. Erased credentials cannot log in again.
///
/// ```
/// use pika::credentials::PlainCredentials;
///
/// let creds = PlainCredentials::new("www-data", "rabbit_pwd").with_erase_on_connect(true);
/// assert_eq!(creds.username(), "www-data");
/// assert!(creds.erase_on_connect());
/// // Debug output never shows the password.
/// assert!(!format!("{creds:?}").contains("rabbit_pwd"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct PlainCredentials {
    username: String,
    password: String,
    erase_on_connect: bool,
}

impl PlainCredentials {
    /// The SASL mechanism name these credentials use.
    pub const MECHANISM: &'static str = "PLAIN";

    /// Credentials for `username` with `password`; `erase_on_connect` is
    /// off, as in pika.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        PlainCredentials {
            username: username.into(),
            password: password.into(),
            erase_on_connect: false,
        }
    }

    /// Sets whether the connection erases the password after sending it
    /// (pika's `erase_on_connect`).
    #[must_use]
    pub fn with_erase_on_connect(mut self, erase: bool) -> Self {
        self.erase_on_connect = erase;
        self
    }

    /// The username.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The password (empty once erased).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Whether the password is erased after `Connection.StartOk`.
    pub fn erase_on_connect(&self) -> bool {
        self.erase_on_connect
    }

    /// The SASL PLAIN response: `\0username\0password` (RFC 4616, with an
    /// empty authorization identity).
    pub fn sasl_response(&self) -> LongString {
        let mut out = Vec::with_capacity(self.username.len() + self.password.len() + 2);
        out.push(0);
        out.extend_from_slice(self.username.as_bytes());
        out.push(0);
        out.extend_from_slice(self.password.as_bytes());
        LongString::from(out)
    }

    /// Overwrites the password's bytes with zeros and empties it.
    ///
    /// Best effort: copies made earlier (clones of these credentials, or a
    /// response already built from them) are not reached.
    fn wipe_password(&mut self) {
        let mut bytes = std::mem::take(&mut self.password).into_bytes();
        bytes.fill(0);
        // Keep the zeroing from being optimised away as a dead store.
        std::hint::black_box(&bytes);
    }
}

impl Default for PlainCredentials {
    /// pika's default credentials: `guest` / `guest`.
    fn default() -> Self {
        PlainCredentials::new("guest", "guest")
    }
}

impl fmt::Debug for PlainCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlainCredentials")
            .field("username", &self.username)
            .field("password", &format_args!("{REDACTED}"))
            .field("erase_on_connect", &self.erase_on_connect)
            .finish()
    }
}

/// SASL EXTERNAL: the broker takes the identity from the TLS client
/// certificate, so there is nothing to send (pika's `ExternalCredentials`).
///
/// RabbitMQ offers EXTERNAL only with the `rabbitmq_auth_mechanism_ssl`
/// plugin on a TLS listener.
///
/// ```
/// use pika::credentials::{Credentials, ExternalCredentials};
///
/// let creds = Credentials::from(ExternalCredentials);
/// let (mechanism, response) = creds.response_for("PLAIN EXTERNAL").unwrap();
/// assert_eq!(mechanism, "EXTERNAL");
/// assert!(response.is_empty());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExternalCredentials;

impl ExternalCredentials {
    /// The SASL mechanism name these credentials use.
    pub const MECHANISM: &'static str = "EXTERNAL";

    /// EXTERNAL credentials.
    pub fn new() -> Self {
        ExternalCredentials
    }
}

/// The credentials a connection authenticates with: one of pika's
/// `VALID_TYPES`. The default is PLAIN `guest` / `guest`.
///
/// ```
/// use pika::credentials::{Credentials, PlainCredentials};
///
/// let creds: Credentials = PlainCredentials::new("user", "s3cret").into();
/// let (mechanism, response) = creds.response_for("AMQPLAIN PLAIN").unwrap();
/// assert_eq!(mechanism, "PLAIN");
/// assert_eq!(response.as_bytes(), b"\0user\0s3cret");
/// assert!(!format!("{creds:?}").contains("s3cret"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Username and password (SASL PLAIN).
    Plain(PlainCredentials),
    /// Identity from the TLS client certificate (SASL EXTERNAL).
    External(ExternalCredentials),
}

impl Credentials {
    /// The SASL mechanism these credentials need: `PLAIN` or `EXTERNAL`.
    pub fn mechanism(&self) -> &'static str {
        match self {
            Credentials::Plain(_) => PlainCredentials::MECHANISM,
            Credentials::External(_) => ExternalCredentials::MECHANISM,
        }
    }

    /// Whether the secret is erased after `Connection.StartOk`
    /// (always false for EXTERNAL, which has no secret).
    pub fn erase_on_connect(&self) -> bool {
        match self {
            Credentials::Plain(p) => p.erase_on_connect(),
            Credentials::External(_) => false,
        }
    }

    /// The PLAIN credentials, when these are PLAIN.
    pub fn as_plain(&self) -> Option<&PlainCredentials> {
        match self {
            Credentials::Plain(p) => Some(p),
            Credentials::External(_) => None,
        }
    }

    /// Chooses the mechanism and builds the `Connection.StartOk` response
    /// for the broker's `mechanisms` (a space-separated list from
    /// `Connection.Start`, e.g. `"AMQPLAIN PLAIN"`); pika's
    /// `response_for`.
    ///
    /// PLAIN credentials answer `("PLAIN", "\0username\0password")`;
    /// EXTERNAL answers `("EXTERNAL", "")`. Mechanism names are matched
    /// exactly (SASL names are upper case).
    ///
    /// # Errors
    /// [`Error::AuthenticationError`] naming what the broker offered and
    /// the mechanism these credentials need, when the broker does not offer
    /// it.
    pub fn response_for(
        &self,
        offered_mechanisms: &str,
    ) -> Result<(&'static str, LongString), Error> {
        let wanted = self.mechanism();
        if !offered_mechanisms
            .split_ascii_whitespace()
            .any(|m| m == wanted)
        {
            return Err(Error::AuthenticationError {
                offered: offered_mechanisms.trim().to_owned(),
                wanted,
            });
        }
        let response = match self {
            Credentials::Plain(p) => p.sasl_response(),
            Credentials::External(_) => LongString::new(),
        };
        Ok((wanted, response))
    }

    /// Erases the password when `erase_on_connect` is set, and does nothing
    /// otherwise (pika's `erase_credentials`). The connection calls this
    /// after sending `Connection.StartOk`.
    ///
    /// The username is kept, for log and error messages; the password's
    /// bytes are overwritten before they are freed.
    pub(crate) fn erase_secret(&mut self) {
        if let Credentials::Plain(p) = self {
            if p.erase_on_connect {
                log::info!("erasing the stored password (erase_on_connect)");
                p.wipe_password();
            }
        }
    }
}

impl Default for Credentials {
    /// PLAIN `guest` / `guest`, pika's `DEFAULT_CREDENTIALS`.
    fn default() -> Self {
        Credentials::Plain(PlainCredentials::default())
    }
}

impl From<PlainCredentials> for Credentials {
    fn from(c: PlainCredentials) -> Self {
        Credentials::Plain(c)
    }
}

impl From<ExternalCredentials> for Credentials {
    fn from(c: ExternalCredentials) -> Self {
        Credentials::External(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_credentials_are_plain_guest_guest() {
        let c = Credentials::default();
        let p = c.as_plain().unwrap();
        assert_eq!((p.username(), p.password()), ("guest", "guest"));
        assert!(!p.erase_on_connect());
        assert_eq!(c.mechanism(), "PLAIN");
        assert_eq!(
            PlainCredentials::default(),
            PlainCredentials::new("guest", "guest")
        );
    }

    #[test]
    fn plain_response_is_nul_user_nul_password() {
        let c = Credentials::from(PlainCredentials::new("www-data", "rabbit_pwd"));
        let (mech, resp) = c.response_for("AMQPLAIN PLAIN").unwrap();
        assert_eq!(mech, "PLAIN");
        assert_eq!(resp.as_bytes(), b"\0www-data\0rabbit_pwd");
    }

    #[test]
    fn plain_response_keeps_non_ascii_bytes() {
        let c = Credentials::from(PlainCredentials::new("jörg", "pässwörd"));
        let (_, resp) = c.response_for("PLAIN").unwrap();
        assert_eq!(resp.as_bytes(), "\0jörg\0pässwörd".as_bytes());
    }

    #[test]
    fn external_response_is_empty() {
        let c = Credentials::from(ExternalCredentials::new());
        let (mech, resp) = c.response_for("EXTERNAL PLAIN AMQPLAIN").unwrap();
        assert_eq!(mech, "EXTERNAL");
        assert!(resp.is_empty());
    }

    #[test]
    fn mechanism_not_offered_is_an_authentication_error() {
        let c = Credentials::from(PlainCredentials::new("u", "topsecret"));
        let err = c.response_for("AMQPLAIN EXTERNAL").unwrap_err();
        match &err {
            Error::AuthenticationError { offered, wanted } => {
                assert_eq!(offered, "AMQPLAIN EXTERNAL");
                assert_eq!(*wanted, "PLAIN");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.is_connection_error());
        assert!(!err.to_string().contains("topsecret"));

        let ext = Credentials::from(ExternalCredentials);
        assert!(matches!(
            ext.response_for("AMQPLAIN PLAIN"),
            Err(Error::AuthenticationError {
                wanted: "EXTERNAL",
                ..
            })
        ));
    }

    #[test]
    fn mechanism_match_is_exact_token_not_substring() {
        let c = Credentials::default();
        // "AMQPLAIN" contains "PLAIN" but is another mechanism.
        assert!(c.response_for("AMQPLAIN").is_err());
        assert!(c.response_for("plain").is_err());
        assert!(c.response_for("").is_err());
        assert!(c.response_for("  PLAIN\t").is_ok());
    }

    #[test]
    fn debug_of_plain_credentials_redacts_password_and_its_length() {
        let c = PlainCredentials::new("alice", "hunter2-very-secret");
        let dbg = format!("{c:?}");
        let pretty = format!("{c:#?}");
        for text in [&dbg, &pretty] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
            assert!(text.contains("alice"), "{text}");
            assert!(!text.contains("19"), "length leaked: {text}");
        }
    }

    #[test]
    fn debug_of_credentials_enum_redacts_password() {
        let c = Credentials::from(PlainCredentials::new("alice", "hunter2"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("Plain") && dbg.contains("<redacted>"), "{dbg}");
        assert_eq!(
            format!("{:?}", Credentials::from(ExternalCredentials)),
            "External(ExternalCredentials)"
        );
    }

    #[test]
    fn erase_secret_clears_password_only_when_requested() {
        let mut keep = Credentials::from(PlainCredentials::new("u", "p"));
        keep.erase_secret();
        assert_eq!(keep.as_plain().unwrap().password(), "p");

        let mut erase =
            Credentials::from(PlainCredentials::new("u", "p").with_erase_on_connect(true));
        assert!(erase.erase_on_connect());
        erase.erase_secret();
        let p = erase.as_plain().unwrap();
        assert_eq!(p.password(), "");
        assert_eq!(p.username(), "u");

        let mut ext = Credentials::from(ExternalCredentials);
        ext.erase_secret();
        assert_eq!(ext, Credentials::External(ExternalCredentials));
    }

    #[test]
    fn credentials_are_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Credentials>();
        check::<PlainCredentials>();
        check::<ExternalCredentials>();
    }
}
