//! The `ssl_options` query option of an AMQP URL: the dict of pika's
//! `URLParameters` read into [`SslOptions`] (see [`UrlParameters`] for the
//! keys), and the redaction of its `password` when the URL is shown.
//!
//! [`UrlParameters`]: super::UrlParameters

use std::path::PathBuf;

use super::pyliteral;
use crate::credentials::REDACTED;
use crate::error::Error;
use crate::table::FieldTable;
use crate::tls::{ClientPem, PemSources, SslOptions};

/// The `ssl_options` keys that are used, with their aliases (pika's
/// `ssl.wrap_socket` names first, then `SSLContext`'s).
const SSL_KEYS: &str = "ca_certs/cafile, ca_path/capath, ca_data/cadata, certfile, keyfile, \
    password, server_hostname, cert_reqs";
/// The `ssl_options` keys accepted and ignored: rustls picks the protocol
/// version (TLS 1.2 or 1.3) and cipher suites itself.
const SSL_IGNORED_KEYS: [&str; 3] = ["ciphers", "protocol", "ssl_version"];

/// Builds [`SslOptions`] from the `ssl_options` dict of a URL: the broker
/// is verified (with the CAs given, else the bundled Mozilla roots) unless
/// `cert_reqs` is `CERT_NONE`. See [`UrlParameters`] for the keys.
pub(super) fn ssl_options_from_table(table: &FieldTable) -> Result<SslOptions, Error> {
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
    let mut ignored = Vec::new();
    for (key, _) in table.iter() {
        match key {
            "ca_certs" | "cafile" | "ca_path" | "capath" | "ca_data" | "cadata" | "certfile"
            | "keyfile" | "password" | "server_hostname" | "cert_reqs" => {}
            _ if SSL_IGNORED_KEYS.contains(&key) => ignored.push(key),
            _ => {
                return Err(Error::Tls {
                    reason: format!(
                        "unknown key '{key}' (known: {SSL_KEYS}; accepted and ignored: {})",
                        SSL_IGNORED_KEYS.join(", ")
                    ),
                });
            }
        }
    }
    if !ignored.is_empty() {
        log::warn!(
            "ignoring ssl_options {}: rustls chooses the TLS version (1.2 or 1.3) and the \
             cipher suites itself",
            ignored.join(", ")
        );
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
    let mut sources = PemSources {
        verify,
        ..PemSources::default()
    };
    for key in ["ca_certs", "cafile"] {
        if let Some(path) = text(key)? {
            let path = PathBuf::from(path);
            // pika reads a directory given as ca_certs as a capath.
            if path.is_dir() {
                sources.ca_dirs.push((key, path));
            } else {
                sources.ca_files.push((key, path));
            }
        }
    }
    for key in ["ca_path", "capath"] {
        if let Some(path) = text(key)? {
            sources.ca_dirs.push((key, PathBuf::from(path)));
        }
    }
    for key in ["ca_data", "cadata"] {
        if let Some(pem) = text(key)? {
            sources.ca_pem.push((key, pem));
        }
    }
    let password = text("password")?;
    sources.client = match (text("certfile")?, text("keyfile")?) {
        (Some(cert), Some(key)) => Some(ClientPem {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
            password,
        }),
        (None, None) if password.is_some() => {
            return Err(Error::Tls {
                reason: "password is the passphrase of keyfile: it needs certfile and keyfile"
                    .into(),
            });
        }
        (None, None) => None,
        _ => {
            return Err(Error::Tls {
                reason: "certfile and keyfile go together".into(),
            });
        }
    };
    let opts = SslOptions::from_sources(&sources)?;
    Ok(match text("server_hostname")? {
        Some(name) => opts.with_server_hostname(name),
        None => opts,
    })
}

/// The query as shown by `Display`: as parsed, except that an
/// `ssl_options` dict with a `password` is rewritten with the password as
/// `<redacted>`.
pub(super) fn redact_query(query: &str) -> String {
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| {
            let mut decoded = url::form_urlencoded::parse(pair.as_bytes());
            let Some((name, value)) = decoded.next() else {
                return pair.to_owned();
            };
            if name != "ssl_options" {
                return pair.to_owned();
            }
            match pyliteral::parse_dict(&value) {
                Ok(Some(table)) if table.get("password").is_some() => {
                    let text = python_repr_redacting_password(&table);
                    let encoded: String =
                        url::form_urlencoded::byte_serialize(text.as_bytes()).collect();
                    format!("ssl_options={encoded}")
                }
                // No password in it; an unparsable dict never gets here
                // (parse fails first), but is redacted whole all the same.
                Ok(_) => pair.to_owned(),
                Err(_) => format!("ssl_options={REDACTED}"),
            }
        })
        .collect();
    redacted.join("&")
}

/// `table` written as Python writes a dict (`str(dict)`), with the value
/// of `password` as `<redacted>`. Values are the strings and `None`s
/// `ssl_options` takes; others are shown by their kind.
fn python_repr_redacting_password(table: &FieldTable) -> String {
    use crate::table::FieldValue;

    fn quoted(text: &str) -> String {
        let mut out = String::from("'");
        for c in text.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\'' => out.push_str("\\'"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('\'');
        out
    }
    let entries: Vec<String> = table
        .iter()
        .map(|(key, value)| {
            let shown = if key == "password" {
                quoted(REDACTED)
            } else {
                match value {
                    FieldValue::Void => "None".to_owned(),
                    FieldValue::Bool(true) => "True".to_owned(),
                    FieldValue::Bool(false) => "False".to_owned(),
                    v => match v.as_str() {
                        Some(text) => quoted(text),
                        None => format!("<{}>", pyliteral::kind(v)),
                    },
                }
            };
            format!("{}: {shown}", quoted(key))
        })
        .collect();
    format!("{{{}}}", entries.join(", "))
}

#[cfg(test)]
mod tests {
    use crate::parameters::Heartbeat;
    use crate::parameters::tests::SECRET;
    use crate::parameters::url::tests::{url, url_err};
    use crate::tls::testing::{
        Minted, OPENSSL_CLIENT_CERT, OPENSSL_ENCRYPTED_KEY, OPENSSL_KEY_PASSWORD, TempDir,
    };

    /// `base?ssl_options=<dict>`, the dict URL-encoded as urllib does.
    fn with_ssl(base: &str, dict: &str) -> String {
        let encoded: String = url::form_urlencoded::byte_serialize(dict.as_bytes()).collect();
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}ssl_options={encoded}")
    }

    /// `text` as a Python string literal (as `str(dict)` writes it).
    fn py(text: &str) -> String {
        let escaped = text
            .replace('\\', "\\\\")
            .replace('\'', "\\'")
            .replace('\n', "\\n");
        format!("'{escaped}'")
    }

    fn py_path(path: &std::path::Path) -> String {
        py(path.to_str().expect("temporary paths are UTF-8"))
    }

    /// The log records of the calling thread, captured at warning level
    /// (the logger is installed once for the test binary; `None` when
    /// another logger was installed first).
    mod capture {
        use std::cell::RefCell;
        use std::sync::OnceLock;

        thread_local! {
            static RECORDS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
        }

        struct ThreadCapture;

        impl log::Log for ThreadCapture {
            fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
                metadata.level() <= log::Level::Warn
            }
            fn log(&self, record: &log::Record<'_>) {
                if self.enabled(record.metadata()) {
                    RECORDS.with(|r| r.borrow_mut().push(record.args().to_string()));
                }
            }
            fn flush(&self) {}
        }

        static LOGGER: ThreadCapture = ThreadCapture;
        static INSTALLED: OnceLock<bool> = OnceLock::new();

        /// Runs `f`, returning what it logged at warning level or above.
        pub(super) fn warnings<T>(f: impl FnOnce() -> T) -> (T, Option<Vec<String>>) {
            let installed = *INSTALLED.get_or_init(|| {
                let ok = log::set_logger(&LOGGER).is_ok();
                if ok {
                    log::set_max_level(log::LevelFilter::Warn);
                }
                ok
            });
            RECORDS.with(|r| r.borrow_mut().clear());
            let value = f();
            let records = RECORDS.with(|r| r.borrow_mut().split_off(0));
            (value, installed.then_some(records))
        }
    }

    #[test]
    fn ssl_options_on_amqp_turn_tls_on_and_keep_port_5672() {
        // pika 1.1 turns TLS on for ssl_options on amqp://, keeping the
        // port the scheme gave.
        let u = url(&with_ssl("amqp://h/", "{}"));
        let tls = u.ssl_options().expect("TLS is on");
        assert!(tls.verifies_peer());
        assert_eq!(u.port(), 5672);
        // An explicit port is kept, on either scheme.
        assert_eq!(url(&with_ssl("amqp://h:5999/", "{}")).port(), 5999);
        assert_eq!(url(&with_ssl("amqps://h:5999/", "{}")).port(), 5999);
        // amqps:// keeps 5671 with ssl_options too.
        let u = url(&with_ssl("amqps://h/", "{}"));
        assert_eq!((u.port(), u.ssl_options().is_some()), (5671, true));
        // ssl_options=None leaves amqp:// plain.
        let u = url("amqp://h/?ssl_options=None");
        assert_eq!((u.port(), u.ssl_options().is_none()), (5672, true));
    }

    #[test]
    fn seed_ssl_options_example_on_amqp_loads_the_client_certificate() {
        // The seed's §2.3.1 example, with the files it names made here.
        let minted = Minted::new();
        let dir = TempDir::new("url-seed-example");
        let cert = dir.write("mycert.pem", &minted.client_cert_pem);
        let key = dir.write("mykey.pem", minted.client_key_pem());
        let u = url(&with_ssl(
            "amqp://www-data:rabbit_pwd@rabbit1/web_messages?heartbeat=30",
            &format!(
                "{{'keyfile': {}, 'certfile': {}}}",
                py_path(&key),
                py_path(&cert)
            ),
        ));
        assert_eq!((u.host(), u.port()), ("rabbit1", 5672));
        assert!(matches!(u.heartbeat(), Heartbeat::Timeout(30)));
        let tls = u.ssl_options().expect("TLS is on");
        assert!(tls.verifies_peer());
        assert!(tls.config().client_auth_cert_resolver.has_certs());
        // The seed's own URL names files this machine does not have: the
        // error names the file, not the scheme.
        let e = url_err(
            "amqp://www-data:rabbit_pwd@rabbit1/web_messages?heartbeat=30&ssl_options=%7B%27keyfile\
             %27%3A+%27%2Fetc%2Fssl%2Fmykey.pem%27%2C%27certfile%27%3A+%27%2Fetc%2Fssl%2Fmycert.pem%27%7D",
        );
        assert!(e.contains("certfile /etc/ssl/mycert.pem"), "{e}");
    }

    #[test]
    fn ssl_options_ca_file_keys_load_a_pem_file_or_a_directory() {
        let minted = Minted::new();
        let dir = TempDir::new("url-ca-file");
        let ca = dir.write("ca.pem", &minted.ca_pem);
        for key in ["ca_certs", "cafile"] {
            let u = url(&with_ssl(
                "amqp://h/",
                &format!("{{'{key}': {}}}", py_path(&ca)),
            ));
            assert!(u.ssl_options().unwrap().verifies_peer(), "{key}");
            // A directory given as ca_certs is read as a capath, as pika does.
            url(&with_ssl(
                "amqp://h/",
                &format!("{{'{key}': {}}}", py_path(dir.path())),
            ));
            let e = url_err(&with_ssl(
                "amqp://h/",
                &format!("{{'{key}': '/no/such/ca.pem'}}"),
            ));
            assert!(e.contains(&format!("{key} /no/such/ca.pem")), "{e}");
        }
    }

    #[test]
    fn ssl_options_ca_path_keys_load_every_pem_and_crt_file_of_a_directory() {
        let (a, b) = (Minted::new(), Minted::new());
        let dir = TempDir::new("url-ca-path");
        dir.write("a.pem", &a.ca_pem);
        dir.write("b.crt", &b.ca_pem);
        for key in ["ca_path", "capath"] {
            let u = url(&with_ssl(
                "amqps://h/",
                &format!("{{'{key}': {}}}", py_path(dir.path())),
            ));
            assert!(u.ssl_options().unwrap().verifies_peer());
        }
        let empty = TempDir::new("url-ca-path-empty");
        let e = url_err(&with_ssl(
            "amqp://h/",
            &format!("{{'ca_path': {}}}", py_path(empty.path())),
        ));
        assert!(
            e.contains(&format!(
                "query option ssl_options: ca_path {}: no certificate in any *.pem or *.crt file",
                empty.path().display()
            )),
            "{e}"
        );
        let e = url_err(&with_ssl("amqp://h/", "{'capath': '/no/such/dir'}"));
        assert!(
            e.contains("capath /no/such/dir: cannot read the directory"),
            "{e}"
        );
    }

    #[test]
    fn ssl_options_ca_data_keys_take_pem_text() {
        let minted = Minted::new();
        for key in ["ca_data", "cadata"] {
            let u = url(&with_ssl(
                "amqp://h/",
                &format!("{{'{key}': {}}}", py(&minted.ca_pem)),
            ));
            assert!(u.ssl_options().unwrap().verifies_peer());
            let e = url_err(&with_ssl("amqp://h/", &format!("{{'{key}': 'not PEM'}}")));
            assert!(
                e.contains(&format!("{key}: no certificate in the PEM text")),
                "{e}"
            );
        }
    }

    #[test]
    fn ssl_options_certfile_keyfile_and_password_open_an_encrypted_key() {
        let dir = TempDir::new("url-encrypted-key");
        let cert = dir.write("client.crt", OPENSSL_CLIENT_CERT);
        let key = dir.write("client.key", OPENSSL_ENCRYPTED_KEY);
        let dict = |password: Option<&str>| {
            let mut d = format!(
                "{{'certfile': {}, 'keyfile': {}",
                py_path(&cert),
                py_path(&key)
            );
            if let Some(p) = password {
                d.push_str(&format!(", 'password': {}", py(p)));
            }
            d.push('}');
            d
        };
        let u = url(&with_ssl("amqp://h/", &dict(Some(OPENSSL_KEY_PASSWORD))));
        assert!(
            u.ssl_options()
                .unwrap()
                .config()
                .client_auth_cert_resolver
                .has_certs()
        );
        let e = url_err(&with_ssl("amqp://h/", &dict(None)));
        assert!(
            e.contains("the private key is encrypted (ENCRYPTED PRIVATE KEY) and no password"),
            "{e}"
        );
        let e = url_err(&with_ssl("amqp://h/", &dict(Some("wrong-pass"))));
        assert!(e.contains("wrong password"), "{e}");
        assert!(!e.contains("wrong-pass"), "{e}");
    }

    #[test]
    fn ssl_options_server_hostname_and_cert_reqs() {
        let u = url(
            "amqps://h/?ssl_options=%7B%22cert_reqs%22%3A%22CERT_NONE%22%2C%22server_hostname%22%3A%22rabbit.example%22%7D",
        );
        let tls = u.ssl_options().unwrap();
        assert!(!tls.verifies_peer());
        assert_eq!(tls.server_hostname(), Some("rabbit.example"));
        let u = url(&with_ssl("amqp://h/", "{'cert_reqs': 'CERT_REQUIRED'}"));
        assert!(u.ssl_options().unwrap().verifies_peer());
        let u = url(&with_ssl("amqp://h/", "{'cert_reqs': 'CERT_NONE'}"));
        assert!(!u.ssl_options().unwrap().verifies_peer());
        assert_eq!(u.port(), 5672);
        let e = url_err(&with_ssl("amqp://h/", "{'cert_reqs': 'CERT_OPTIONAL'}"));
        assert!(
            e.contains(
                "query option ssl_options: cert_reqs must be CERT_REQUIRED or CERT_NONE, \
                 got \"CERT_OPTIONAL\""
            ),
            "{e}"
        );
    }

    #[test]
    fn ssl_options_ciphers_protocol_and_ssl_version_are_ignored_with_a_warning() {
        let (u, warnings) = capture::warnings(|| {
            url(&with_ssl(
                "amqp://h/",
                "{'ciphers': 'ECDHE+AESGCM', 'protocol': 2, 'ssl_version': 'PROTOCOL_TLSv1_2'}",
            ))
        });
        assert!(u.ssl_options().unwrap().verifies_peer());
        if let Some(warnings) = warnings {
            assert!(
                warnings.iter().any(|w| w.contains(
                    "ignoring ssl_options ciphers, protocol, ssl_version: rustls chooses"
                )),
                "{warnings:?}"
            );
        }
        let (_, warnings) = capture::warnings(|| url(&with_ssl("amqp://h/", "{'ciphers': 'x'}")));
        if let Some(warnings) = warnings {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.starts_with("ignoring ssl_options ciphers:")),
                "{warnings:?}"
            );
        }
    }

    #[test]
    fn ssl_options_refuse_unknown_keys_and_mismatched_pairs() {
        let e = url_err("amqps://h/?ssl_options=%7B%27bogus%27%3A+1%7D");
        assert!(e.contains("unknown key 'bogus'"), "{e}");
        assert!(e.contains("ca_path/capath"), "{e}");
        let e = url_err(&with_ssl("amqp://h/", "{'do_handshake_on_connect': True}"));
        assert!(e.contains("unknown key 'do_handshake_on_connect'"), "{e}");
        let e = url_err("amqps://h/?ssl_options=%7B%27certfile%27%3A+%27%2Fx.pem%27%7D");
        assert!(e.contains("certfile and keyfile go together"), "{e}");
        let e = url_err(&with_ssl("amqp://h/", "{'keyfile': '/x.key'}"));
        assert!(e.contains("certfile and keyfile go together"), "{e}");
        let e = url_err(&with_ssl("amqp://h/", "{'password': 'pw'}"));
        assert!(
            e.contains("password is the passphrase of keyfile: it needs certfile and keyfile"),
            "{e}"
        );
        let e = url_err(&with_ssl("amqp://h/", "{'ca_certs': 5}"));
        assert!(e.contains("ca_certs must be a string, got an int"), "{e}");
        let e = url_err(&with_ssl("amqp://h/", "['ca_certs']"));
        assert!(e.contains("expected a dict, found a list"), "{e}");
    }

    #[test]
    fn the_ssl_options_password_is_redacted_in_display_debug_and_errors() {
        let dir = TempDir::new("url-redact");
        let cert = dir.write("client.crt", OPENSSL_CLIENT_CERT);
        let key = dir.write("client.key", OPENSSL_ENCRYPTED_KEY);
        let text = with_ssl(
            &format!("amqp://u:{SECRET}@h/v?heartbeat=5"),
            &format!(
                "{{'certfile': {}, 'keyfile': {}, 'password': {}}}",
                py_path(&cert),
                py_path(&key),
                py(OPENSSL_KEY_PASSWORD)
            ),
        );
        assert!(text.contains(OPENSSL_KEY_PASSWORD));
        let u = url(&text);
        let shown = u.to_string();
        assert!(
            shown.starts_with("amqp://u:<redacted>@h/v?heartbeat=5&ssl_options="),
            "{shown}"
        );
        // The dict is shown, decoded, with the password replaced.
        let query = shown.split_once('?').unwrap().1;
        let (_, dict) = url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "ssl_options")
            .unwrap();
        assert_eq!(
            dict,
            format!(
                "{{'certfile': {}, 'keyfile': {}, 'password': '<redacted>'}}",
                py_path(&cert),
                py_path(&key)
            )
        );
        for text in [shown, format!("{u:?}"), format!("{u:#?}")] {
            assert!(!text.contains(OPENSSL_KEY_PASSWORD), "{text}");
            assert!(!text.contains(SECRET), "{text}");
        }
        // Errors: a wrong password, or a malformed dict holding one.
        let e = url_err(&with_ssl(
            "amqp://h/",
            &format!(
                "{{'certfile': {}, 'keyfile': {}, 'password': 'Wr0ng-{SECRET}'}}",
                py_path(&cert),
                py_path(&key)
            ),
        ));
        assert!(!e.contains(SECRET), "{e}");
        let e = url_err(&with_ssl("amqp://h/", &format!("{{'password': {SECRET}}}")));
        assert!(!e.contains(SECRET) && !e.contains("S3cret"), "{e}");
        assert!(e.contains("not shown: it may hold a password"), "{e}");
        // Without a password the query is shown as parsed.
        let u = url("amqps://h/?ssl_options=%7B%27cert_reqs%27%3A+%27CERT_NONE%27%7D");
        assert_eq!(
            u.to_string(),
            "amqps://h/?ssl_options=%7B%27cert_reqs%27%3A+%27CERT_NONE%27%7D"
        );
    }
}
