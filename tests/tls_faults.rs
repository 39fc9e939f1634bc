//! TLS failures the broker's own listener cannot stage, and streams lost in
//! the middle of TLS traffic (RELIABILITY.md items 32–34).
//!
//! * A TLS server inside the test (rustls over a std socket, in a thread),
//!   with certificates minted by rcgen for `localhost` under a CA of the
//!   test's own: an expired and a not-yet-valid server certificate are
//!   refused with [`Error::Tls`] at once, saying why; after a completed
//!   handshake, a wrong AMQP protocol header or a close_notify instead of
//!   Connection.Start is [`Error::IncompatibleProtocol`], as over plain TCP.
//! * A plain AMQP listener inside the test answers the ClientHello of a
//!   TLS client (an `amqp://` URL with `ssl_options`) with AMQP's protocol
//!   header: the [`Error::Tls`] says the peer did not answer with TLS and
//!   asks whether this is a TLS port.
//! * The fault proxy in front of the broker's TLS port: a 1 MiB round trip
//!   arrives byte for byte.
//! * The fault proxy in front of a record gate (a relay that passes the
//!   broker's TLS records on one by one and can hold the stream inside a
//!   record, after its header and half its payload, or between records) in
//!   front of the broker's TLS port: a RST or a FIN from the proxy once a
//!   1 MiB delivery is held 256 KiB in is [`Error::StreamLost`] — with the
//!   reset as its source, or as an end of file — wherever in the TLS
//!   stream it lands (rustls keeps a partial record to itself; what the
//!   connection reports is the socket's reset or end of file), and the
//!   loop thread uses next to no CPU from the cut on.
//!
//! The broker tests need `scripts/with-broker` (AMQPS_URL, AMQPS_PORT and
//! the AMQP_TLS_* files); the certificate and protocol tests need nothing.

mod common;

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::proxy::{Direction, FrameKind, Proxy};
use common::run_loop;
use pika::{
    BasicConsumeOptions, BasicProperties, Channel, ConnectionParameters, Delivery, Error,
    FieldTable, QueueDeclareOptions, SelectConnection, SslOptions, UrlParameters,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// The bound on every run and wait: a liveness limit, not a timing.
const LIMIT: Duration = Duration::from_secs(60);
/// The stack_timeout of the connections to the test's TLS server.
const STACK_TIMEOUT: Duration = Duration::from_secs(10);
/// "Promptly" for a refused handshake on the loopback: well under
/// [`STACK_TIMEOUT`].
const PROMPT: Duration = Duration::from_secs(3);
/// How long the loop keeps running after a failure, so that a spin
/// following the failure would show in the loop thread's CPU time.
const LINGER: Duration = Duration::from_secs(2);
/// The loop thread's CPU allowance from a failure (or a cut) to the end of
/// the linger: "well under 1 s" over more than [`LINGER`].
const CPU_AFTER_FAILURE: Duration = Duration::from_millis(300);
/// The loop thread's CPU allowance for a whole run (handshake, 1 MiB each
/// way through TLS, failure, linger).
const CPU_PER_RUN: Duration = Duration::from_secs(1);
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------

/// The CPU time the calling thread has used so far: the first field of
/// `/proc/thread-self/schedstat` (nanoseconds on the CPU).
fn thread_cpu() -> Duration {
    cpu_at(Path::new("/proc/thread-self/schedstat"))
}

/// Where the calling thread's scheduler statistics are, for another
/// thread to read with [`cpu_at`].
fn thread_cpu_path() -> PathBuf {
    let task = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self (Linux)");
    PathBuf::from("/proc").join(task).join("schedstat")
}

/// The CPU time of the thread whose schedstat file is `path`.
fn cpu_at(path: &Path) -> Duration {
    let stat = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{} is not readable (Linux only): {e}", path.display()));
    let nanos = stat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("unexpected {}: {stat:?}", path.display()));
    Duration::from_nanos(nanos)
}

/// How a run ended, as its loop thread saw it.
#[derive(Debug)]
struct Outcome {
    /// The terminal errors (`on_open_error` or `on_close`); one expected.
    errors: Vec<Error>,
    /// From creating the connection to its terminal callback.
    elapsed: Duration,
    /// The loop thread's CPU time over the whole run.
    cpu: Duration,
    /// The loop thread's CPU time from the terminal callback to the end of
    /// the run (the [`LINGER`] after a failure).
    cpu_after_failure: Duration,
    /// The loop thread's CPU clock ([`thread_cpu`]) at the end of the run.
    cpu_at_end: Duration,
}

/// Connects with `params` on a fresh loop, runs `on_open` once open, and
/// runs the loop until the connection ends: at once after a close by the
/// client, [`LINGER`] later after any other ending.
fn run(params: ConnectionParameters, on_open: impl FnOnce(&SelectConnection) + 'static) -> Outcome {
    let errors = Rc::new(RefCell::new(Vec::new()));
    let ended: Rc<Cell<Option<(Instant, Duration)>>> = Rc::new(Cell::new(None));
    let terminal = {
        let (errors, ended) = (errors.clone(), ended.clone());
        move |conn: &SelectConnection, error: Error| {
            let by_client = matches!(error, Error::ConnectionClosedByClient { .. });
            errors.borrow_mut().push(error);
            ended.set(Some((Instant::now(), thread_cpu())));
            let ioloop = conn.ioloop().clone();
            if by_client {
                ioloop.stop();
            } else {
                let stopper = ioloop.clone();
                ioloop.call_later(LINGER, move || stopper.stop());
            }
        }
    };
    let (started, cpu_at_start) = (Instant::now(), thread_cpu());
    let conn = SelectConnection::new(params, on_open, terminal.clone(), terminal)
        .expect("a connection is created");
    run_loop(conn.ioloop(), LIMIT);
    let cpu_at_end = thread_cpu();
    let (ended_at, cpu_at_terminal) = ended.get().expect("a terminal callback ran");
    Outcome {
        errors: errors.take(),
        elapsed: ended_at - started,
        cpu: cpu_at_end - cpu_at_start,
        cpu_after_failure: cpu_at_end - cpu_at_terminal,
        cpu_at_end,
    }
}

/// Waits for `thread`, failing the test when it takes over `bound`.
fn join_within<T>(thread: JoinHandle<T>, bound: Duration, what: &str) -> T {
    let deadline = Instant::now() + bound;
    while !thread.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish within {bound:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    thread.join().unwrap_or_else(|_| panic!("{what} panicked"))
}

// ---------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA made for one test.
struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A server certificate chain and its key.
struct ServerIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "pika tls_faults test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("a CA certificate");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `localhost` signed by this CA, valid from
    /// `from_days` to `to_days` days from now (negative: in the past).
    fn server_identity(&self, from_days: i64, to_days: i64) -> ServerIdentity {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_secs() as i64;
        let day = |days: i64| {
            rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs((now + days * 86_400) as u64)
        };
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.not_before = day(from_days);
        params.not_after = day(to_days);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("a server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a server certificate");
        ServerIdentity {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }

    /// Client TLS settings that trust this CA only (read from a PEM file,
    /// as a user would) and verify the name `localhost`.
    fn trusted(&self) -> SslOptions {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "pika-tls-faults-ca-{}-{}.pem",
            std::process::id(),
            NEXT.fetch_add(1, SeqCst)
        ));
        std::fs::write(&path, &self.pem).expect("the CA file is written");
        let ssl = SslOptions::from_pem_files(Some(&path), None);
        let _ = std::fs::remove_file(&path);
        ssl.expect("the CA file loads")
            .with_server_hostname("localhost")
    }
}

// ---------------------------------------------------------------------
// A TLS server inside the test
// ---------------------------------------------------------------------

/// What the test's TLS server does with the one client it accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Script {
    /// The handshake only (for certificates the client refuses).
    Handshake,
    /// After the handshake and the client's protocol header: AMQP 0-8's
    /// protocol header, in plaintext over TLS.
    WrongProtocolHeader,
    /// After the handshake and the client's protocol header: close_notify.
    CloseNotify,
}

/// What the test's TLS server saw.
#[derive(Debug, Default)]
struct ServerLog {
    /// Why the handshake failed, when it did.
    handshake_error: Option<String>,
    /// The client's first 8 plaintext bytes.
    client_header: Vec<u8>,
    /// How the client's side ended.
    end: String,
}

/// Starts a TLS server on 127.0.0.1 presenting `identity`; returns its
/// port and the thread that serves one client with `script`.
fn tls_server(identity: ServerIdentity, script: Script) -> (u16, JoinHandle<ServerLog>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener
        .local_addr()
        .expect("the listener's address")
        .port();
    let config = ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("ring does TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .expect("the certificate and its key match");
    let server = thread::Builder::new()
        .name("tls-server".into())
        .spawn(move || serve(&listener, Arc::new(config), script))
        .expect("spawn the TLS server");
    (port, server)
}

fn serve(listener: &TcpListener, config: Arc<ServerConfig>, script: Script) -> ServerLog {
    let mut log = ServerLog::default();
    let mut socket = match listener.accept() {
        Ok((socket, _)) => socket,
        Err(e) => {
            log.end = format!("accept failed: {e}");
            return log;
        }
    };
    // A client that goes quiet cannot keep this thread forever.
    socket
        .set_read_timeout(Some(LIMIT / 2))
        .expect("a read timeout");
    let mut tls = ServerConnection::new(config).expect("a server session");
    while tls.is_handshaking() {
        if let Err(e) = tls.complete_io(&mut socket) {
            log.handshake_error = Some(e.to_string());
            return log;
        }
    }
    let mut stream = StreamOwned::new(tls, socket);
    let mut header = [0u8; 8];
    if let Err(e) = stream.read_exact(&mut header) {
        log.end = format!("no protocol header: {e}");
        return log;
    }
    log.client_header = header.to_vec();
    let answered = match script {
        Script::Handshake => Ok(()),
        Script::WrongProtocolHeader => stream
            .write_all(b"AMQP\x00\x00\x08\x00")
            .and_then(|()| stream.flush()),
        Script::CloseNotify => {
            stream.conn.send_close_notify();
            stream.flush()
        }
    };
    if let Err(e) = answered {
        log.end = format!("answering failed: {e}");
        return log;
    }
    let mut rest = Vec::new();
    log.end = match stream.read_to_end(&mut rest) {
        Ok(_) => "end of stream".to_string(),
        Err(e) => e.to_string(),
    };
    log
}

/// Parameters for the test's TLS server on `port`.
fn test_server_params(port: u16, ssl: SslOptions) -> ConnectionParameters {
    let mut params = ConnectionParameters::new();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(port)
        .unwrap()
        .set_socket_timeout(Duration::from_secs(3))
        .unwrap()
        .set_stack_timeout(STACK_TIMEOUT)
        .unwrap();
    params.set_ssl_options(Some(ssl));
    params
}

/// The one error of `outcome`, which must be an open error that came
/// promptly and without burning CPU.
fn prompt_open_error(outcome: &Outcome) -> &Error {
    assert_eq!(outcome.errors.len(), 1, "{:?}", outcome.errors);
    let error = &outcome.errors[0];
    assert!(error.is_connection_error(), "{error:?}");
    assert!(
        outcome.elapsed < PROMPT,
        "{error:?} took {:?}",
        outcome.elapsed
    );
    assert!(
        outcome.cpu < CPU_AFTER_FAILURE,
        "the loop thread used {:?} of CPU",
        outcome.cpu
    );
    error
}

/// A server certificate valid from `from_days` to `to_days` (days from
/// now) is refused with a TLS error containing `reason`, and the server
/// hears the alert `alert`.
fn refused_server_certificate(from_days: i64, to_days: i64, reason: &str, alert: &str) {
    let ca = TestCa::new();
    let (port, server) = tls_server(ca.server_identity(from_days, to_days), Script::Handshake);
    let outcome = run(test_server_params(port, ca.trusted()), |_| {
        panic!("must not open")
    });
    match prompt_open_error(&outcome) {
        Error::Tls { reason: why } => assert!(why.contains(reason), "{why}"),
        other => panic!("expected a TLS error saying {reason:?}, got {other:?}"),
    }
    let log = join_within(server, LIMIT, "the TLS server");
    assert!(
        log.handshake_error
            .as_deref()
            .is_some_and(|e| e.contains(alert)),
        "the client told the server why: {log:?}"
    );
    println!(
        "refused in {:?}, loop thread CPU {:?} (of which {:?} in the {LINGER:?} after)",
        outcome.elapsed, outcome.cpu, outcome.cpu_after_failure
    );
}

#[test]
fn an_expired_server_certificate_is_refused_promptly_saying_so() {
    // Valid from 30 days ago until yesterday.
    refused_server_certificate(-30, -1, "certificate expired", "CertificateExpired");
}

#[test]
fn a_not_yet_valid_server_certificate_is_refused_promptly_saying_so() {
    // Valid from tomorrow for 30 days.
    refused_server_certificate(1, 30, "certificate not valid yet", "CertificateExpired");
}

#[test]
fn the_test_ca_is_trusted_when_the_certificate_is_current() {
    // The control for the two tests above: the same CA and name, a current
    // certificate, and the handshake completes (the server then closes).
    let ca = TestCa::new();
    let (port, server) = tls_server(ca.server_identity(-1, 1), Script::CloseNotify);
    let outcome = run(test_server_params(port, ca.trusted()), |_| {
        panic!("must not open")
    });
    prompt_open_error(&outcome);
    let log = join_within(server, LIMIT, "the TLS server");
    assert_eq!(log.handshake_error, None, "{log:?}");
}

#[test]
fn a_wrong_protocol_header_over_tls_is_incompatible_protocol() {
    let ca = TestCa::new();
    let (port, server) = tls_server(ca.server_identity(-1, 30), Script::WrongProtocolHeader);
    let outcome = run(test_server_params(port, ca.trusted()), |_| {
        panic!("must not open")
    });
    match prompt_open_error(&outcome) {
        Error::IncompatibleProtocol { detail } => {
            assert!(detail.contains("AMQP 0-0-8-0"), "{detail}")
        }
        other => panic!("expected IncompatibleProtocol, got {other:?}"),
    }
    let log = join_within(server, LIMIT, "the TLS server");
    assert_eq!(log.handshake_error, None, "{log:?}");
    assert_eq!(log.client_header, b"AMQP\x00\x00\x09\x01", "{log:?}");
    // The client closed its side with close_notify, not just TCP.
    assert_eq!(log.end, "end of stream", "{log:?}");
}

#[test]
fn close_notify_right_after_the_handshake_is_incompatible_protocol() {
    let ca = TestCa::new();
    let (port, server) = tls_server(ca.server_identity(-1, 30), Script::CloseNotify);
    let outcome = run(test_server_params(port, ca.trusted()), |_| {
        panic!("must not open")
    });
    // As over plain TCP: the broker hung up right after our header.
    match prompt_open_error(&outcome) {
        Error::IncompatibleProtocol { detail } => {
            assert!(detail.contains("right after our AMQP"), "{detail}")
        }
        other => panic!("expected IncompatibleProtocol, got {other:?}"),
    }
    let log = join_within(server, LIMIT, "the TLS server");
    assert_eq!(log.client_header, b"AMQP\x00\x00\x09\x01", "{log:?}");
}

/// A plain AMQP listener on 127.0.0.1 for one client: it reads the
/// client's first bytes and answers, as a broker's plain port answers
/// anything that is not AMQP's header, with AMQP's protocol header; then it
/// waits for the client to hang up. Returns its port and the thread, which
/// gives the first bytes it read.
fn plain_amqp_listener() -> (u16, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener
        .local_addr()
        .expect("the listener's address")
        .port();
    let server = thread::spawn(move || {
        let (mut sock, _) = listener.accept().expect("a client");
        sock.set_read_timeout(Some(LIMIT)).expect("a read timeout");
        let mut first = vec![0; 4096];
        let n = sock.read(&mut first).expect("the client's first bytes");
        first.truncate(n);
        sock.write_all(b"AMQP\x00\x00\x09\x01")
            .expect("the header is sent");
        let mut rest = [0; 1024];
        while matches!(sock.read(&mut rest), Ok(n) if n > 0) {}
        first
    });
    (port, server)
}

#[test]
fn tls_to_a_plain_amqp_port_says_the_peer_did_not_answer_with_tls() {
    // ssl_options on an amqp:// URL turns TLS on and keeps the port given.
    let (port, server) = plain_amqp_listener();
    let params = UrlParameters::parse(&format!(
        "amqp://127.0.0.1:{port}/%2F?ssl_options=%7B%7D&socket_timeout=3&stack_timeout={}",
        STACK_TIMEOUT.as_secs()
    ))
    .expect("the URL parses");
    assert!(params.ssl_options().is_some());
    let outcome = run(params.into(), |_| panic!("must not open"));
    match prompt_open_error(&outcome) {
        Error::Tls { reason } => assert_eq!(
            reason,
            &format!(
                "the peer at 127.0.0.1:{port} did not answer with TLS (is this a TLS port?): \
                 received corrupt message of type InvalidContentType"
            )
        ),
        other => panic!("expected Error::Tls, got {other:?}"),
    }
    assert_eq!(
        outcome.errors[0].to_string(),
        format!(
            "TLS error: the peer at 127.0.0.1:{port} did not answer with TLS (is this a TLS \
             port?): received corrupt message of type InvalidContentType"
        )
    );
    let hello = join_within(server, LIMIT, "the plain listener");
    assert_eq!(
        hello.first(),
        Some(&0x16),
        "the client sent a TLS handshake record"
    );
}

// ---------------------------------------------------------------------
// A broker Close over TLS wins over the write error that follows it
// ---------------------------------------------------------------------

/// An AMQP broker over TLS, for one client: reads frames from the
/// decrypted stream with the project's codec.
struct TlsBroker {
    stream: StreamOwned<ServerConnection, TcpStream>,
    buffer: Vec<u8>,
}

impl TlsBroker {
    fn read_frame(&mut self) -> common::OwnedFrame {
        loop {
            if let Some((frame, used)) =
                pika::frame::parse_frame(&self.buffer, 0).expect("the client's frames decode")
            {
                let owned = common::OwnedFrame::from_frame(frame);
                self.buffer.drain(..used);
                return owned;
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).expect("the client's bytes");
            assert!(n > 0, "the client closed the connection");
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    fn read_method(&mut self) -> pika::spec::Method {
        loop {
            if let common::OwnedFrame::Method(_, m) = self.read_frame() {
                return m;
            }
        }
    }

    fn send(&mut self, channel: u16, method: impl Into<pika::spec::Method>) {
        let mut out = Vec::new();
        pika::frame::encode_method(&mut out, channel, &method.into(), 0).unwrap();
        self.stream.write_all(&out).expect("send to the client");
        self.stream.flush().expect("flush to the client");
    }
}

/// Serves one client over TLS: the handshake and channel 1, then, once
/// 512 KiB of the client's publishes are in, Connection.Close (320) with
/// nothing more read, and the socket closed with the client's input unread
/// (a RST) once the Close is in the client's receive buffer. With
/// `hold`, the client's loop is held while the Close and the RST arrive.
fn close_under_load(
    listener: &TcpListener,
    config: Arc<ServerConfig>,
    hold: Option<&common::LoopHold>,
) {
    use pika::spec::{Method, channel, connection};
    let (mut socket, _) = listener.accept().expect("the client connects");
    socket.set_read_timeout(Some(LIMIT / 2)).unwrap();
    let mut tls = ServerConnection::new(config).expect("a server session");
    while tls.is_handshaking() {
        tls.complete_io(&mut socket).expect("the TLS handshake");
    }
    let mut broker = TlsBroker {
        stream: StreamOwned::new(tls, socket),
        buffer: Vec::new(),
    };
    let mut header = [0u8; 8];
    broker.stream.read_exact(&mut header).unwrap();
    broker.send(0, common::fake_broker::rabbitmq_start());
    assert!(matches!(broker.read_method(), Method::ConnectionStartOk(_)));
    broker.send(0, common::fake_broker::rabbitmq_tune());
    assert!(matches!(broker.read_method(), Method::ConnectionTuneOk(_)));
    assert!(matches!(broker.read_method(), Method::ConnectionOpen(_)));
    broker.send(0, connection::OpenOk::default());
    assert!(matches!(broker.read_method(), Method::ChannelOpen(_)));
    broker.send(1, channel::OpenOk::default());
    let mut seen = 0;
    while seen < 512 * 1024 {
        if let common::OwnedFrame::Body(_, payload) = broker.read_frame() {
            seen += payload.len();
        }
    }
    if let Some(hold) = hold {
        hold.hold_client(LIMIT);
    }
    broker.send(
        0,
        connection::Close {
            reply_code: 320,
            reply_text: "CONNECTION_FORCED - broker forced connection closure".into(),
            class_id: 0,
            method_id: 0,
        },
    );
    common::wait_until_sent(&broker.stream.sock, LIMIT);
    // No close_notify: the socket goes with the client's input unread.
    drop(broker);
    if let Some(hold) = hold {
        hold.release();
    }
}

/// The TLS form of the plain-TCP test in `tests/faults.rs`: the broker's
/// Close, decrypted from records already received, wins over the write
/// error the RST causes — half of the runs with the client's loop held
/// while the Close and the RST arrive.
#[test]
fn a_broker_close_over_tls_while_the_client_floods_is_reported_with_the_brokers_words() {
    const RUNS: usize = 40;
    let ca = TestCa::new();
    let mut lost = Vec::new();
    for run in 0..RUNS {
        let identity = ca.server_identity(-1, 30);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = Arc::new(
            ServerConfig::builder_with_provider(ring())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(identity.chain, identity.key)
                .unwrap(),
        );
        let hold = Arc::new(common::LoopHold::default());
        let held = run % 2 == 1;
        let h = hold.clone();
        let server =
            thread::spawn(move || close_under_load(&listener, config, held.then_some(&*h)));
        let errors = run_flood(test_server_params(port, ca.trusted()), hold);
        join_within(server, LIMIT, "the TLS broker");
        match errors.as_slice() {
            [
                Error::ConnectionClosedByBroker {
                    reply_code: 320, ..
                },
            ] => {}
            other => lost.push((run, other.to_vec())),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {RUNS} runs lost the broker's Close: {lost:?}",
        lost.len()
    );
}

/// Opens a channel and floods it until the connection ends; returns the
/// terminal errors (one expected).
fn run_flood(params: ConnectionParameters, hold: Arc<common::LoopHold>) -> Vec<Error> {
    let errors = Rc::new(RefCell::new(Vec::new()));
    let (e1, e2) = (errors.clone(), errors.clone());
    let conn = SelectConnection::new(
        params,
        move |conn| {
            conn.channel(None, move |r| {
                common::flood(&r.expect("a channel opens"), move || {
                    hold.hold_if_asked(LIMIT)
                })
            })
            .expect("open");
        },
        move |conn, e| {
            e1.borrow_mut().push(e);
            conn.ioloop().stop();
        },
        move |conn, e| {
            e2.borrow_mut().push(e);
            conn.ioloop().stop();
        },
    )
    .expect("a connection is created");
    run_loop(conn.ioloop(), LIMIT);
    errors.take()
}

// ---------------------------------------------------------------------
// The broker's TLS port, through the proxy
// ---------------------------------------------------------------------

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests through `scripts/with-broker`, which starts a \
             RabbitMQ with a TLS listener and exports AMQPS_URL, AMQPS_PORT, AMQP_TLS_CA, \
             AMQP_TLS_CLIENT_CERT and AMQP_TLS_CLIENT_KEY"
        )
    })
}

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(env(name))
}

/// The broker's TLS listener, where the proxies forward to.
fn broker_tls_addr() -> String {
    format!("127.0.0.1:{}", env("AMQPS_PORT"))
}

/// Parameters for the broker's TLS listener reached through `port` on
/// 127.0.0.1: mutual TLS, verifying the name `localhost` (the broker's
/// certificate names localhost and 127.0.0.1).
fn broker_params_via(port: u16) -> ConnectionParameters {
    let ssl = SslOptions::from_pem_files(
        Some(&env_path("AMQP_TLS_CA")),
        Some((
            &env_path("AMQP_TLS_CLIENT_CERT"),
            &env_path("AMQP_TLS_CLIENT_KEY"),
        )),
    )
    .expect("the broker's test certificates load")
    .with_server_hostname("localhost");
    let mut params: ConnectionParameters = UrlParameters::parse(&env("AMQPS_URL"))
        .expect("AMQPS_URL parses")
        .into();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(port)
        .unwrap()
        .set_socket_timeout(Duration::from_secs(5))
        .unwrap()
        .set_stack_timeout(Duration::from_secs(10))
        .unwrap();
    params.set_ssl_options(Some(ssl));
    params
}

/// `len` bytes that repeat only every 251 × 256 bytes.
fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i + i / 256 + seed) % 251) as u8)
        .collect()
}

/// Consumes from a fresh exclusive queue and publishes `body` to it once
/// consuming; `before_publish` and `after_publish` run around the publish
/// (on the loop thread). The first delivery closes the connection.
/// Returns how the run ended and the bodies delivered.
fn transfer(
    params: ConnectionParameters,
    body: Vec<u8>,
    before_publish: impl FnOnce(&SelectConnection) + 'static,
    after_publish: impl FnOnce(&SelectConnection) + 'static,
) -> (Outcome, Vec<Vec<u8>>) {
    let delivered = Rc::new(RefCell::new(Vec::new()));
    let sink = delivered.clone();
    let outcome = run(params, move |conn| {
        conn.channel(None, move |ch| {
            let ch = ch.expect("a channel opens");
            let exclusive = QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            };
            ch.queue_declare("", exclusive, FieldTable::new(), move |ch, ok| {
                let queue = ok.expect("a queue is declared").queue;
                let on_message = move |ch: &Channel, delivery: Delivery| {
                    sink.borrow_mut().push(delivery.body);
                    ch.basic_ack(delivery.method.delivery_tag, false)
                        .expect("ack");
                    if let Ok(conn) = ch.connection() {
                        conn.close(200, "delivered").expect("close");
                    }
                };
                let target = queue.clone();
                let consuming = move |ch: &Channel, ok: Result<_, Error>| {
                    ok.expect("consuming");
                    let conn = ch.connection().expect("the connection is there");
                    before_publish(&conn);
                    ch.basic_publish("", &target, &body, &BasicProperties::default(), false)
                        .expect("publish");
                    after_publish(&conn);
                };
                ch.basic_consume(
                    &queue,
                    on_message,
                    BasicConsumeOptions::default(),
                    consuming,
                )
                .expect("basic_consume");
            })
            .expect("queue_declare");
        })
        .expect("channel");
    });
    let delivered = delivered.take();
    (outcome, delivered)
}

#[test]
fn a_1_mib_round_trip_over_tls_through_the_proxy_arrives_byte_for_byte() {
    let proxy = Proxy::start(broker_tls_addr());
    let body = pattern(MIB, 3);
    let (outcome, delivered) = transfer(
        broker_params_via(proxy.addr().port()),
        body.clone(),
        |_| {},
        |_| {},
    );
    assert!(
        matches!(
            outcome.errors.as_slice(),
            [Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }]
        ),
        "{:?}",
        outcome.errors
    );
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].len(), body.len());
    let first_difference = delivered[0].iter().zip(&body).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "the body differs");
    // Both ways through this proxy, and encrypted: no plaintext AMQP.
    assert_eq!(proxy.connections(), 1);
    for dir in Direction::BOTH {
        assert!(
            proxy.bytes(dir) > MIB as u64,
            "{dir:?}: {}",
            proxy.bytes(dir)
        );
        assert!(
            !proxy
                .frames(dir)
                .iter()
                .any(|f| matches!(f.kind, FrameKind::ProtocolHeader(_) | FrameKind::Method(_))),
            "plaintext AMQP passed the proxy {dir:?}"
        );
    }
    assert!(
        outcome.cpu < CPU_PER_RUN,
        "loop thread CPU {:?}",
        outcome.cpu
    );
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    Rst,
    Fin,
}

/// Where the record gate holds the broker's stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Hold {
    /// After the 5-byte header and half the payload of a record.
    InsideARecord,
    /// Between two records.
    BetweenRecords,
}

/// How far into the delivery the gate holds the stream (at least).
const HOLD_AFTER: u64 = 256 * 1024;

/// What the record gate did.
#[derive(Debug, Default)]
struct GateLog {
    /// Bytes sent towards the client in all (headers and a half record
    /// included).
    sent: u64,
    /// Whole records passed after the gate was armed.
    records_after_arming: usize,
    /// Their bytes.
    bytes_after_arming: u64,
    /// The payload length of the record the gate split or held back.
    held_record: Option<usize>,
    /// Why the gate stopped before holding, if it did.
    error: Option<String>,
}

/// A relay between the proxy and the broker's TLS port, for one
/// connection, that reads the broker's stream record by record (5-byte
/// header, then the payload) and passes each on whole. Once armed and
/// [`HOLD_AFTER`] bytes later, it holds the stream at an application-data
/// record as `hold` says, and reports how many bytes it sent in all; the
/// proxy in front can then be cut at exactly that point of the TLS stream.
struct RecordGate {
    port: u16,
    armed: Arc<AtomicBool>,
    /// The gate's `sent` once it holds.
    holding: mpsc::Receiver<u64>,
    thread: JoinHandle<GateLog>,
}

impl RecordGate {
    fn start(hold: Hold) -> RecordGate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("the gate's address").port();
        let upstream = broker_tls_addr();
        let armed = Arc::new(AtomicBool::new(false));
        let (held, holding) = mpsc::channel();
        let flag = armed.clone();
        let thread = thread::Builder::new()
            .name("record-gate".into())
            .spawn(move || gate(&listener, &upstream, &flag, hold, &held))
            .expect("spawn the record gate");
        RecordGate {
            port,
            armed,
            holding,
            thread,
        }
    }
}

fn gate(
    listener: &TcpListener,
    upstream: &str,
    armed: &AtomicBool,
    hold: Hold,
    held: &mpsc::Sender<u64>,
) -> GateLog {
    let mut log = GateLog::default();
    let (proxy_side, broker) = match listener
        .accept()
        .and_then(|(proxy_side, _)| Ok((proxy_side, TcpStream::connect(upstream)?)))
    {
        Ok(pair) => pair,
        Err(e) => {
            log.error = Some(format!("connecting: {e}"));
            return log;
        }
    };
    for socket in [&proxy_side, &broker] {
        let _ = socket.set_nodelay(true);
        let _ = socket.set_read_timeout(Some(LIMIT / 2));
    }
    // Towards the broker: copied as it comes, until the proxy's side ends
    // (the cut); once the broker's side fails, drained.
    let (mut from_proxy, mut to_broker) = (
        proxy_side.try_clone().expect("clone a socket"),
        broker.try_clone().expect("clone a socket"),
    );
    let upward = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut forwarding = true;
        while let Ok(n @ 1..) = from_proxy.read(&mut buf) {
            if forwarding && to_broker.write_all(&buf[..n]).is_err() {
                forwarding = false;
            }
        }
    });
    let (mut from_broker, mut to_proxy) = (&broker, &proxy_side);
    let mut header = [0u8; 5];
    loop {
        let mut payload = Vec::new();
        let read = from_broker.read_exact(&mut header).and_then(|()| {
            payload.resize(usize::from(u16::from_be_bytes([header[3], header[4]])), 0);
            from_broker.read_exact(&mut payload)
        });
        if let Err(e) = read {
            log.error = Some(format!("reading the broker: {e}"));
            break;
        }
        let application_data = header[0] == 23;
        let at_hold =
            application_data && armed.load(SeqCst) && log.bytes_after_arming >= HOLD_AFTER;
        let part = match (at_hold, hold) {
            (false, _) => &payload[..],
            (true, Hold::InsideARecord) => &payload[..payload.len() / 2],
            (true, Hold::BetweenRecords) => &[][..],
        };
        let sent = if at_hold && hold == Hold::BetweenRecords {
            Ok(())
        } else {
            to_proxy
                .write_all(&header)
                .and_then(|()| to_proxy.write_all(part))
                .map(|()| log.sent += (header.len() + part.len()) as u64)
        };
        if let Err(e) = sent {
            log.error = Some(format!("writing to the proxy: {e}"));
            break;
        }
        if at_hold {
            log.held_record = Some(payload.len());
            let _ = held.send(log.sent);
            break;
        }
        if armed.load(SeqCst) {
            log.records_after_arming += 1;
            log.bytes_after_arming += (header.len() + payload.len()) as u64;
        }
    }
    // Holding: nothing more goes towards the client until the proxy's
    // side of this relay goes away.
    join_within(upward, LIMIT / 2, "the gate's copy towards the broker");
    let _ = broker.shutdown(Shutdown::Both);
    log
}

/// What a cut during a 1 MiB delivery came to.
#[derive(Debug)]
struct CutResult {
    outcome: Outcome,
    delivered: usize,
    gate: GateLog,
    /// The loop thread's CPU time from the cut to the end of the run.
    cpu_from_cut: Duration,
}

/// Publishes 1 MiB through the proxy, in front of the record gate in front
/// of the broker's TLS port, and cuts the proxy with `cut` once the
/// delivery coming back is held where `hold` says and the proxy has
/// passed everything before that point to the client.
fn cut_a_delivery_through_the_proxy(cut: Cut, hold: Hold) -> CutResult {
    let gate = RecordGate::start(hold);
    let proxy = Arc::new(Proxy::start(("127.0.0.1", gate.port)));
    let (arm, armed) = mpsc::channel::<PathBuf>();
    let holding = gate.holding;
    let watcher = {
        let proxy = proxy.clone();
        thread::spawn(move || {
            let loop_thread = armed.recv_timeout(LIMIT).ok()?;
            let sent = holding.recv_timeout(LIMIT).ok()?;
            let deadline = Instant::now() + LIMIT / 2;
            while proxy.bytes(Direction::BrokerToClient) < sent {
                assert!(Instant::now() < deadline, "the proxy holds bytes back");
                thread::sleep(Duration::from_millis(1));
            }
            // The client takes in what reached it, and waits for the rest.
            thread::sleep(Duration::from_millis(200));
            let (forwarded, cpu) = (proxy.bytes(Direction::BrokerToClient), cpu_at(&loop_thread));
            match cut {
                Cut::Rst => proxy.cut_rst(),
                Cut::Fin => proxy.cut_fin(),
            }
            Some((forwarded, cpu))
        })
    };
    let before_publish = {
        let armed = gate.armed.clone();
        move |_: &SelectConnection| {
            arm.send(thread_cpu_path()).expect("the watcher waits");
            armed.store(true, SeqCst);
        }
    };
    let (outcome, delivered) = transfer(
        broker_params_via(proxy.addr().port()),
        pattern(MIB, 5),
        before_publish,
        |_| {},
    );
    let watched = join_within(watcher, LIMIT, "the watcher");
    let gate = join_within(gate.thread, LIMIT, "the record gate");
    let (forwarded, cpu_at_cut) = watched.unwrap_or_else(|| panic!("no cut: {gate:?}"));
    assert_eq!(proxy.connections(), 1);
    assert_eq!(forwarded, gate.sent, "{gate:?}");
    assert!(gate.bytes_after_arming >= HOLD_AFTER, "{gate:?}");
    assert!(gate.held_record.is_some_and(|len| len > 1), "{gate:?}");
    CutResult {
        delivered: delivered.len(),
        gate,
        cpu_from_cut: outcome.cpu_at_end - cpu_at_cut,
        outcome,
    }
}

/// The checks every cut shares: it came part way through the delivery,
/// nothing was delivered, the stream was
/// reported lost with `source` (the I/O error's kind, or none for an end
/// of file), and the loop did not spin.
fn expect_stream_lost(result: &CutResult, source: Option<std::io::ErrorKind>) {
    println!(
        "{result:?}\nloop thread CPU: {:?} over the run, {:?} from the cut to the end \
         (the failure came {:?} after connecting; the loop ran {LINGER:?} after it)",
        result.outcome.cpu, result.cpu_from_cut, result.outcome.elapsed
    );
    // Cut in the middle of the delivery: part of it passed, none arrived.
    assert!(
        (HOLD_AFTER..MIB as u64).contains(&result.gate.bytes_after_arming),
        "{:?}",
        result.gate
    );
    assert_eq!(result.delivered, 0, "the cut came after the delivery");
    assert_eq!(
        result.outcome.errors.len(),
        1,
        "{:?}",
        result.outcome.errors
    );
    match &result.outcome.errors[0] {
        Error::StreamLost { detail, source: e } => {
            assert_eq!(e.as_ref().map(|e| e.kind()), source, "{detail}; {e:?}");
            if source.is_none() {
                assert!(detail.contains("end of file"), "{detail}");
            }
        }
        other => panic!("expected StreamLost, got {other:?}"),
    }
    assert!(
        result.cpu_from_cut < CPU_AFTER_FAILURE,
        "the loop thread used {:?} of CPU after the cut",
        result.cpu_from_cut
    );
    assert!(
        result.outcome.cpu_after_failure < CPU_AFTER_FAILURE,
        "the loop thread used {:?} of CPU after the failure",
        result.outcome.cpu_after_failure
    );
    assert!(
        result.outcome.cpu < CPU_PER_RUN,
        "the loop thread used {:?} of CPU",
        result.outcome.cpu
    );
}

#[test]
fn a_rst_inside_a_tls_record_of_a_1_mib_delivery_is_stream_lost_without_spinning() {
    // The partial record stays in rustls; the reset is what is reported.
    let result = cut_a_delivery_through_the_proxy(Cut::Rst, Hold::InsideARecord);
    expect_stream_lost(&result, Some(std::io::ErrorKind::ConnectionReset));
}

#[test]
fn a_fin_inside_a_tls_record_of_a_1_mib_delivery_is_stream_lost_without_spinning() {
    // A truncated record and no close_notify: reported as the end of file.
    let result = cut_a_delivery_through_the_proxy(Cut::Fin, Hold::InsideARecord);
    expect_stream_lost(&result, None);
}

#[test]
fn a_rst_between_tls_records_of_a_1_mib_delivery_is_stream_lost_without_spinning() {
    let result = cut_a_delivery_through_the_proxy(Cut::Rst, Hold::BetweenRecords);
    expect_stream_lost(&result, Some(std::io::ErrorKind::ConnectionReset));
}

#[test]
fn a_fin_between_tls_records_of_a_1_mib_delivery_is_stream_lost_without_spinning() {
    let result = cut_a_delivery_through_the_proxy(Cut::Fin, Hold::BetweenRecords);
    expect_stream_lost(&result, None);
}
