//! [`TcpOptions`]: the socket options of the connection's TCP socket (pika's
//! `tcp_options`), read from pika's dict or set field by field, and
//! checked against the ranges `setsockopt` takes.

use std::time::Duration;

use super::pyliteral;
use super::secs;
use crate::error::Error;
use crate::table::{FieldTable, FieldValue};

/// Socket options for the connection's TCP socket (pika's `tcp_options`
/// dict, whose keys are the socket option names).
///
/// The connection sets them on its socket before connecting, as pika does
/// with `setsockopt`. Like pika, it turns `SO_KEEPALIVE` on when any
/// keepalive option is given, or when [`keepalive`](Self::keepalive) is set
/// (see [`so_keepalive`](Self::so_keepalive)), together with the keepalive
/// times given: `TCP_KEEPIDLE` everywhere, `TCP_KEEPINTVL` and
/// `TCP_KEEPCNT` on Linux, macOS and FreeBSD. It sets `TCP_USER_TIMEOUT`
/// on Linux only. Elsewhere those options are left out without a warning
/// (pika logs one). A `setsockopt` that fails fails that connection
/// attempt. Without `tcp_options` the keepalive and user-timeout options
/// are left as the OS sets them.
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

    /// Checks that the times and count fit the socket options' units and
    /// ranges (see
    /// [`ConnectionParameters::set_tcp_options`](super::ConnectionParameters::set_tcp_options)).
    pub(super) fn validate(&self) -> Result<(), Error> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parameters::ConnectionParameters;
    use crate::parameters::tests::invalid_name;

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
}
