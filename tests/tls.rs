//! TLS with rustls against the broker's TLS listener (started by
//! `scripts/with-broker` with a throwaway CA, a server certificate for
//! localhost and 127.0.0.1, and a client certificate for `guest`; the
//! listener requires a client certificate): round trips up to 16 MiB,
//! mutual TLS with PLAIN and EXTERNAL, and every way the handshake can be
//! refused.

mod common;

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{broker_params, rabbitmqctl, run_loop};
use pika::{
    BasicConsumeOptions, BasicProperties, ConnectionParameters, Error, ExternalCredentials,
    FieldTable, QueueDeclareOptions, SelectConnection, SslOptions, UrlParameters,
};

const LIMIT: Duration = Duration::from_secs(60);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests through `scripts/with-broker`, which starts a \
             RabbitMQ with a TLS listener and exports AMQPS_URL, AMQPS_PORT, AMQP_TLS_CA, \
             AMQP_TLS_CLIENT_CERT and AMQP_TLS_CLIENT_KEY"
        )
    })
}

fn path(name: &str) -> PathBuf {
    PathBuf::from(env(name))
}

fn mutual_tls() -> SslOptions {
    SslOptions::from_pem_files(
        Some(&path("AMQP_TLS_CA")),
        Some((&path("AMQP_TLS_CLIENT_CERT"), &path("AMQP_TLS_CLIENT_KEY"))),
    )
    .expect("the test certificates load")
}

fn tls_params(ssl: SslOptions) -> ConnectionParameters {
    let mut params: ConnectionParameters = UrlParameters::parse(&env("AMQPS_URL"))
        .expect("AMQPS_URL parses")
        .into();
    params.set_ssl_options(Some(ssl));
    params
        .set_socket_timeout(Duration::from_secs(3))
        .unwrap()
        .set_stack_timeout(Duration::from_secs(5))
        .unwrap();
    params
}

/// Connects; `on_open` runs when open; returns the terminal errors
/// (on_open_error or on_close).
fn run(
    params: ConnectionParameters,
    on_open: impl FnOnce(&SelectConnection) + 'static,
) -> Vec<Error> {
    let terminal = Rc::new(RefCell::new(Vec::new()));
    let (t1, t2) = (terminal.clone(), terminal.clone());
    let conn = SelectConnection::new(
        params,
        on_open,
        move |conn, e| {
            t1.borrow_mut().push(e);
            conn.ioloop().stop();
        },
        move |conn, e| {
            t2.borrow_mut().push(e);
            conn.ioloop().stop();
        },
    )
    .unwrap();
    run_loop(conn.ioloop(), LIMIT);
    terminal.take()
}

fn expect_tls_open_error(errors: &[Error], needle: &str) {
    assert_eq!(errors.len(), 1, "{errors:?}");
    match &errors[0] {
        Error::Tls { reason } => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected a TLS error containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn publish_and_consume_over_tls_round_trip_bodies_up_to_16_mib() {
    let sizes = [0usize, 1, 131_064, 1 << 20, 16 << 20];
    let received = Rc::new(RefCell::new(Vec::<Vec<u8>>::new()));
    let r = received.clone();
    let terminal = run(tls_params(mutual_tls()), move |conn| {
        let r = r.clone();
        conn.channel(None, move |ch| {
            let ch = ch.unwrap();
            let opts = QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            };
            ch.queue_declare("", opts, FieldTable::new(), move |ch, ok| {
                let queue = ok.unwrap().queue;
                for (i, size) in sizes.iter().enumerate() {
                    let body: Vec<u8> = (0..*size).map(|b| (b * 7 + i) as u8).collect();
                    ch.basic_publish("", &queue, &body, &BasicProperties::default(), false)
                        .unwrap();
                }
                ch.basic_consume(
                    &queue,
                    move |ch, d| {
                        r.borrow_mut().push(d.body);
                        ch.basic_ack(d.method.delivery_tag, false).unwrap();
                        if r.borrow().len() == sizes.len() {
                            ch.connection().unwrap().close(200, "done").unwrap();
                        }
                    },
                    BasicConsumeOptions::default(),
                    |_, ok| {
                        ok.unwrap();
                    },
                )
                .unwrap();
            })
            .unwrap();
        })
        .unwrap();
    });
    assert!(
        matches!(
            terminal.as_slice(),
            [Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }]
        ),
        "{terminal:?}"
    );
    let received = received.borrow();
    assert_eq!(received.len(), sizes.len());
    for (i, (body, size)) in received.iter().zip(sizes).enumerate() {
        let expected: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
        assert!(*body == expected, "body {i} of {size} bytes differs");
    }
}

/// The broker's view of our connection: auth mechanism, user, ssl.
fn broker_view(conn: &SelectConnection) -> Vec<String> {
    let port = conn.local_address().unwrap().port();
    common::broker_connection_info(port, &["auth_mechanism", "user", "ssl"])
        .expect("the broker lists our connection")
}

#[test]
fn mutual_tls_logs_in_with_plain_and_with_external() {
    let views = Rc::new(RefCell::new(Vec::new()));
    for external in [false, true] {
        let mut params = tls_params(mutual_tls());
        if external {
            params.set_credentials(ExternalCredentials::new());
        }
        let v = views.clone();
        let terminal = run(params, move |conn| {
            v.borrow_mut().push(broker_view(conn));
            conn.close(200, "done").unwrap();
        });
        assert!(
            matches!(
                terminal.as_slice(),
                [Error::ConnectionClosedByClient { .. }]
            ),
            "external={external}: {terminal:?}"
        );
    }
    let views = views.borrow();
    assert_eq!(views[0], ["PLAIN", "guest", "true"]);
    assert_eq!(views[1], ["EXTERNAL", "guest", "true"]);
}

#[test]
fn an_amqps_url_with_ssl_options_connects() {
    let url = format!(
        "{}?ssl_options={}",
        env("AMQPS_URL"),
        url_encode(&format!(
            "{{'ca_certs': '{}', 'certfile': '{}', 'keyfile': '{}'}}",
            env("AMQP_TLS_CA"),
            env("AMQP_TLS_CLIENT_CERT"),
            env("AMQP_TLS_CLIENT_KEY")
        ))
    );
    let params = UrlParameters::parse(&url).expect("the URL parses");
    assert_eq!(params.port(), env("AMQPS_PORT").parse::<u16>().unwrap());
    let terminal = run(params.into(), |conn| conn.close(200, "done").unwrap());
    assert!(
        matches!(
            terminal.as_slice(),
            [Error::ConnectionClosedByClient { .. }]
        ),
        "{terminal:?}"
    );
}

#[test]
fn an_amqp_url_with_ssl_options_connects_over_tls() {
    // pika 1.1: ssl_options on amqp:// turns TLS on; the port is the one
    // in the URL (the TLS port here), and the broker is verified against
    // the CA given as ca_data, and the client key given as a file.
    let ca_pem = std::fs::read_to_string(env("AMQP_TLS_CA")).expect("the CA file reads");
    let url = format!(
        "amqp://guest:guest@localhost:{}/%2F?ssl_options={}",
        env("AMQPS_PORT"),
        url_encode(&format!(
            "{{'cadata': '{}', 'certfile': '{}', 'keyfile': '{}', 'cert_reqs': 'CERT_REQUIRED'}}",
            ca_pem.replace('\n', "\\n"),
            env("AMQP_TLS_CLIENT_CERT"),
            env("AMQP_TLS_CLIENT_KEY")
        ))
    );
    let params = UrlParameters::parse(&url).expect("the URL parses");
    assert!(params.ssl_options().is_some_and(SslOptions::verifies_peer));
    assert_eq!(params.port(), env("AMQPS_PORT").parse::<u16>().unwrap());
    let terminal = run(params.into(), |conn| conn.close(200, "done").unwrap());
    assert!(
        matches!(
            terminal.as_slice(),
            [Error::ConnectionClosedByClient { .. }]
        ),
        "{terminal:?}"
    );
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[test]
fn no_client_certificate_is_an_open_error() {
    let ssl = SslOptions::from_pem_files(Some(&path("AMQP_TLS_CA")), None).unwrap();
    let errors = run(tls_params(ssl), |_| panic!("must not open"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    // The broker's alert (TLS 1.3: after our side of the handshake).
    assert!(
        matches!(&errors[0], Error::Tls { reason } if reason.contains("alert"))
            || matches!(
                &errors[0],
                Error::IncompatibleProtocol { .. } | Error::StreamLost { .. }
            ),
        "{:?}",
        errors[0]
    );
    assert!(errors[0].is_connection_error());
}

#[test]
fn an_unknown_ca_is_refused_promptly() {
    // The bundled Mozilla roots do not know the test CA.
    let ssl = SslOptions::from_pem_files(
        None,
        Some((&path("AMQP_TLS_CLIENT_CERT"), &path("AMQP_TLS_CLIENT_KEY"))),
    )
    .unwrap();
    let started = Instant::now();
    let errors = run(tls_params(ssl), |_| panic!("must not open"));
    expect_tls_open_error(&errors, "UnknownIssuer");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_server_hostname_the_certificate_does_not_name_is_refused() {
    let ssl = mutual_tls().with_server_hostname("not-the-broker.example");
    let errors = run(tls_params(ssl), |_| panic!("must not open"));
    expect_tls_open_error(&errors, "not valid for name \"not-the-broker.example\"");
}

#[test]
fn a_plain_client_on_the_tls_port_fails_within_stack_timeout() {
    let mut params = broker_params();
    params
        .set_port(env("AMQPS_PORT").parse().unwrap())
        .unwrap()
        .set_stack_timeout(Duration::from_secs(3))
        .unwrap();
    let started = Instant::now();
    let errors = run(params, |_| panic!("must not open"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].is_connection_error(), "{:?}", errors[0]);
    // The TLS listener answers the AMQP header with a TLS alert record:
    // said as such, not as a frame of a huge size.
    assert!(
        errors[0]
            .to_string()
            .contains("the peer answered with TLS: is this a TLS port? use amqps://"),
        "{}",
        errors[0]
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_tls_client_on_the_plain_port_fails_within_stack_timeout() {
    let mut params = tls_params(mutual_tls());
    params.set_port(broker_params().port()).unwrap();
    let started = Instant::now();
    let errors = run(params, |_| panic!("must not open"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    // The broker's plain port answers the ClientHello with AMQP's header.
    assert!(
        matches!(&errors[0], Error::Tls { reason }
            if reason.contains("did not answer with TLS (is this a TLS port?)"))
            || matches!(&errors[0], Error::StackTimeout { .. }),
        "{:?}",
        errors[0]
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let _ = rabbitmqctl;
}

#[path = "../examples/tls.rs"]
mod tls_example;

#[test]
fn the_tls_example_gets_its_message_back_with_plain_and_with_external() {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    for (external, mechanism) in [(false, "PLAIN"), (true, "EXTERNAL")] {
        let mut settings = tls_example::Settings::from_env();
        assert_eq!(settings.url, env("AMQPS_URL"));
        assert_eq!(settings.ca_certs, path("AMQP_TLS_CA"));
        assert_eq!(settings.certfile, path("AMQP_TLS_CLIENT_CERT"));
        assert_eq!(settings.keyfile, path("AMQP_TLS_CLIENT_KEY"));
        settings.external = external;
        settings.queue = format!("tls.example.{mechanism}.{}.{stamp}", std::process::id());
        settings.timeout = LIMIT / 2;
        let summary = tls_example::run(&settings).expect("the example runs");
        let port = env("AMQPS_PORT");
        assert!(
            summary
                .connected_to
                .as_deref()
                .is_some_and(|peer| peer.ends_with(&format!(":{port}"))),
            "{summary:?}"
        );
        assert_eq!(summary.mechanism.as_deref(), Some(mechanism), "{summary:?}");
        assert!(
            summary
                .offered_mechanisms
                .as_deref()
                .is_some_and(|offered| offered.split(' ').any(|m| m == "EXTERNAL")),
            "{summary:?}"
        );
        assert_eq!(summary.queue.as_deref(), Some(settings.queue.as_str()));
        assert!(summary.published && summary.confirmed, "{summary:?}");
        assert_eq!(summary.got.as_deref(), Some(settings.body.as_bytes()));
        assert!(summary.queue_deleted && !summary.timed_out, "{summary:?}");
        assert!(
            matches!(
                summary.end_reason,
                Some(Error::ConnectionClosedByClient {
                    reply_code: 200,
                    ..
                })
            ),
            "{summary:?}"
        );
    }
}

#[test]
fn heartbeats_keep_an_idle_tls_connection_open() {
    let mut params = tls_params(mutual_tls());
    params.set_heartbeat(1);
    let still_open = Rc::new(RefCell::new(None));
    let s = still_open.clone();
    let terminal = run(params, move |conn| {
        assert_eq!(conn.heartbeat(), 1);
        // Idle for 3 timeouts: heartbeats, through TLS, keep it alive.
        let c = conn.clone();
        conn.ioloop().call_later(Duration::from_secs(3), move || {
            *s.borrow_mut() = Some(c.is_open());
            c.close(200, "done").unwrap();
        });
    });
    assert_eq!(*still_open.borrow(), Some(true));
    assert!(
        matches!(
            terminal.as_slice(),
            [Error::ConnectionClosedByClient { .. }]
        ),
        "{terminal:?}"
    );
}
