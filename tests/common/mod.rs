//! Shared helpers of the broker tests: where the broker is, and a raw AMQP
//! session driven by the codec alone (the connection layer comes later).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pika::frame::{FRAME_MIN_SIZE, PROTOCOL_HEADER, encode_method, parse_frame};
use pika::spec::{Method, connection};
use pika::{FieldTable, LongString};

const HOW_TO_GET_A_BROKER: &str = "run the tests through the project's broker script, \
     `scripts/with-broker scripts/test` (it installs and starts a private RabbitMQ), \
     or set AMQP_URL=amqp://user:password@host:port/ to a running RabbitMQ";

/// `AMQP_URL`, or a failure that says how to get a broker.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .unwrap_or_else(|_| panic!("AMQP_URL is not set: {HOW_TO_GET_A_BROKER}"))
}

/// `AMQP_URL` parsed by the client's own URL parser.
fn parsed_url() -> pika::UrlParameters {
    pika::UrlParameters::parse(&amqp_url())
        .unwrap_or_else(|e| panic!("AMQP_URL does not parse: {e}"))
}

/// The `host:port` of `AMQP_URL`.
pub fn broker_addr() -> String {
    let url = parsed_url();
    format!("{}:{}", url.host(), url.port())
}

/// The user and password of `AMQP_URL` (guest/guest when absent).
pub fn broker_credentials() -> (String, String) {
    let url = parsed_url();
    let plain = url
        .credentials()
        .as_plain()
        .expect("AMQP_URL carries PLAIN credentials");
    (plain.username().to_string(), plain.password().to_string())
}

/// A TCP connection to the broker, or a failure that says how to get one.
pub fn connect() -> TcpStream {
    let addr = broker_addr();
    let stream = TcpStream::connect(&addr).unwrap_or_else(|e| {
        panic!("cannot reach RabbitMQ at {addr} (from AMQP_URL): {e}; {HOW_TO_GET_A_BROKER}")
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A blocking frame reader/writer over one socket, for tests only.
pub struct RawSession {
    pub stream: TcpStream,
    buffer: Vec<u8>,
    pub frame_max: u32,
}

/// An owned frame (bodies copied), as tests want them.
pub use fake_broker::OwnedFrame;

impl RawSession {
    /// Connects and sends the protocol header.
    pub fn open() -> RawSession {
        let mut stream = connect();
        stream.write_all(&PROTOCOL_HEADER).unwrap();
        RawSession {
            stream,
            buffer: Vec::new(),
            frame_max: FRAME_MIN_SIZE,
        }
    }

    /// Reads until one whole frame is parsed. Panics on a codec error, a
    /// read error or EOF, naming it.
    pub fn read_frame(&mut self) -> OwnedFrame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buffer, self.frame_max)
                .unwrap_or_else(|e| panic!("broker sent what our codec refuses: {e}"))
            {
                let owned = OwnedFrame::from_frame(frame);
                self.buffer.drain(..used);
                return owned;
            }
            let mut chunk = [0u8; 16384];
            let n = self.stream.read(&mut chunk).expect("read from broker");
            assert!(
                n > 0,
                "broker closed the socket; buffered: {:?}",
                self.buffer
            );
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads the next method frame; heartbeats are passed over.
    pub fn read_method(&mut self) -> (u16, Method) {
        loop {
            match self.read_frame() {
                OwnedFrame::Method(channel, method) => return (channel, method),
                OwnedFrame::Heartbeat => continue,
                other => panic!("expected a method frame, got {other:?}"),
            }
        }
    }

    /// Sends one method frame.
    pub fn send(&mut self, channel: u16, method: impl Into<Method>) {
        let mut out = Vec::new();
        encode_method(&mut out, channel, &method.into(), self.frame_max).unwrap();
        self.stream.write_all(&out).unwrap();
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Connects and runs the whole handshake by hand (PLAIN with
    /// `AMQP_URL`'s credentials, the broker's channel_max and frame_max, no
    /// heartbeats), with `client_properties` plus `connection_name`.
    pub fn open_handshaken(client_properties: FieldTable, name: &str) -> RawSession {
        let mut session = RawSession::open();
        match session.read_method() {
            (0, Method::ConnectionStart(_)) => {}
            other => panic!("expected Connection.Start on channel 0, got {other:?}"),
        }
        let (user, password) = broker_credentials();
        let mut props = client_properties;
        props.insert("connection_name", name);
        session.send(
            0,
            connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: LongString::from(format!("\0{user}\0{password}")),
                locale: "en_US".into(),
            },
        );
        let tune = match session.read_method() {
            (0, Method::ConnectionTune(t)) => t,
            other => panic!("expected Connection.Tune, got {other:?}"),
        };
        session.send(
            0,
            connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: tune.frame_max,
                heartbeat: 0,
            },
        );
        session.frame_max = tune.frame_max;
        session.send(0, connection::Open::default());
        match session.read_method() {
            (0, Method::ConnectionOpenOk(_)) => {}
            other => panic!("expected Connection.OpenOk, got {other:?}"),
        }
        session
    }

    /// Publishes through the broker with a content header given as raw
    /// frame bytes (a golden vector, or a header our encoder would not
    /// write), on `channel` (opened here if `open_channel`), then waits for
    /// the publish to be confirmed so the message is in the queue when this
    /// returns.
    pub fn publish_raw_header(
        &mut self,
        channel: u16,
        routing_key: &str,
        header_frame: &[u8],
        body: &[u8],
    ) {
        self.send(channel, pika::spec::channel::Open::default());
        match self.read_method() {
            (c, Method::ChannelOpenOk(_)) if c == channel => {}
            other => panic!("expected Channel.OpenOk, got {other:?}"),
        }
        self.send(channel, pika::spec::confirm::Select { nowait: false });
        match self.read_method() {
            (c, Method::ConfirmSelectOk(_)) if c == channel => {}
            other => panic!("expected Confirm.SelectOk, got {other:?}"),
        }
        self.send(
            channel,
            pika::spec::basic::Publish {
                routing_key: routing_key.into(),
                ..Default::default()
            },
        );
        assert_eq!(header_frame[0], 2, "a content header frame");
        assert_eq!(
            u16::from_be_bytes([header_frame[1], header_frame[2]]),
            channel,
            "the header frame is on channel {channel}"
        );
        self.send_raw(header_frame);
        let mut frames = Vec::new();
        pika::frame::encode_body(&mut frames, channel, body, self.frame_max);
        self.send_raw(&frames);
        match self.read_method() {
            (c, Method::BasicAck(ack)) if c == channel && ack.delivery_tag == 1 => {}
            other => panic!("expected the broker's Basic.Ack of the raw publish, got {other:?}"),
        }
    }

    /// Closes the connection with a Close handshake.
    pub fn close(mut self) {
        self.send(
            0,
            connection::Close {
                reply_code: 200,
                reply_text: "done".into(),
                ..Default::default()
            },
        );
        loop {
            match self.read_method() {
                (0, Method::ConnectionCloseOk(_)) => return,
                _ => continue,
            }
        }
    }
}

/// Connection parameters for the broker at `AMQP_URL`, with short timeouts
/// suited to tests.
pub fn broker_params() -> pika::ConnectionParameters {
    let mut params = parsed_url().into_parameters();
    params
        .set_socket_timeout(Duration::from_secs(5))
        .unwrap()
        .set_stack_timeout(Duration::from_secs(10))
        .unwrap();
    params
}

/// Runs `ioloop` until something calls `stop()`, failing the test if that
/// takes longer than `limit` (a liveness bound, not a timing assertion).
pub fn run_loop(ioloop: &pika::IoLoop, limit: Duration) {
    let stopper = ioloop.clone();
    let expired = std::rc::Rc::new(std::cell::Cell::new(false));
    let flag = expired.clone();
    let watchdog = ioloop.call_later(limit, move || {
        flag.set(true);
        stopper.stop();
    });
    ioloop.start().expect("the loop runs");
    ioloop.remove_timeout(watchdog);
    assert!(!expired.get(), "the loop did not finish within {limit:?}");
}

/// Runs `rabbitmqctl -n $RABBITMQ_NODENAME ARGS`, returning its stdout.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let node = std::env::var("RABBITMQ_NODENAME").unwrap_or_else(|_| {
        panic!(
            "RABBITMQ_NODENAME is not set: run through `scripts/with-broker`, or set it to the \
             node behind AMQP_URL so tests can call rabbitmqctl"
        )
    });
    let out = std::process::Command::new("rabbitmqctl")
        .arg("-n")
        .arg(&node)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (is RabbitMQ installed?): {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The broker's view of the connection whose client port is `local_port`:
/// the requested `rabbitmqctl list_connections` columns, tab-separated.
pub fn broker_connection_info(local_port: u16, columns: &[&str]) -> Option<Vec<String>> {
    let mut args = vec!["-q", "list_connections", "peer_port"];
    args.extend_from_slice(columns);
    let listing = rabbitmqctl(&args);
    listing.lines().find_map(|line| {
        let mut fields = line.split('\t');
        let port: u16 = fields.next()?.trim().parse().ok()?;
        (port == local_port).then(|| fields.map(str::to_string).collect())
    })
}

pub mod fake_broker;
pub mod proxy;

/// Publishes 64 KiB messages on `channel` without pause for as long as it
/// is open, keeping about 1 MiB in the outbound buffer: a client busy
/// writing, for the tests of what it reports when the peer goes away.
/// `each_turn` runs on the loop between batches (to pause the loop on
/// cue, for instance).
pub fn flood(channel: &pika::Channel, each_turn: impl FnMut() + 'static) {
    static BODY: [u8; 64 * 1024] = [7; 64 * 1024];
    fn turn(channel: pika::Channel, mut each_turn: impl FnMut() + 'static) {
        let Ok(conn) = channel.connection() else {
            return;
        };
        each_turn();
        let props = pika::BasicProperties::default();
        while channel.is_open() && conn.outbound_buffer_size() < 1 << 20 {
            if channel
                .basic_publish("", "flood", BODY, &props, false)
                .is_err()
            {
                return;
            }
        }
        if channel.is_open() {
            let lp = conn.ioloop().clone();
            lp.call_later(std::time::Duration::from_millis(1), move || {
                turn(channel, each_turn)
            });
        }
    }
    turn(channel.clone(), each_turn);
}

/// Counts the body bytes the client published until at least `bytes`
/// arrived (a fake broker's side of [`flood`]).
pub fn read_published_bytes(conn: &mut fake_broker::FakeConn, bytes: usize) {
    let mut seen = 0;
    while seen < bytes {
        if let OwnedFrame::Body(_, payload) = conn.read_frame() {
            seen += payload.len();
        }
    }
}

#[allow(unused_imports)]
pub use fake_broker::wait_until_sent;

/// A handshake between a test's broker thread and the client's loop: the
/// broker asks the client to hold its loop, the client holds it (inside a
/// callback) until the broker says it is done, so that everything the
/// broker did meanwhile reaches the client's next socket event at once.
#[derive(Default)]
pub struct LoopHold {
    asked: std::sync::atomic::AtomicBool,
    holding: std::sync::atomic::AtomicBool,
    released: std::sync::atomic::AtomicBool,
}

impl LoopHold {
    /// The broker's side: asks for the hold and waits until the client
    /// holds its loop (bounded by `bound`).
    pub fn hold_client(&self, bound: Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        self.asked.store(true, SeqCst);
        let deadline = std::time::Instant::now() + bound;
        while !self.holding.load(SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the client did not hold its loop within {bound:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The broker's side: lets the client's loop go on.
    pub fn release(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The client's side, called from a loop callback: when asked, holds
    /// the loop until released (at most `bound`), then a little longer so
    /// that packets in flight land.
    pub fn hold_if_asked(&self, bound: Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.asked.load(SeqCst) || self.holding.swap(true, SeqCst) {
            return;
        }
        let deadline = std::time::Instant::now() + bound;
        while !self.released.load(SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a thread of its own and returns what it returns, failing
/// the test naming `what` when it takes longer than `bound` (a hang is a
/// failure, not a stuck test binary; the thread is left behind). A panic
/// in `f` is the test's panic.
pub fn bounded<T: Send + 'static>(
    what: &str,
    bound: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("client: {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn the client thread");
    match rx.recv_timeout(bound) {
        Ok(value) => {
            let _ = handle.join();
            value
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: the client did not finish within {bound:?} (a hang)")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(payload) => std::panic::resume_unwind(payload),
            Ok(()) => unreachable!("the client thread ended without a result"),
        },
    }
}

/// The broker's parameters with socket_timeout, stack_timeout and
/// blocked_connection_timeout beyond the clock's range (`Duration::MAX`).
pub fn broker_params_with_timeouts_at_max() -> pika::ConnectionParameters {
    let mut params = broker_params();
    params
        .set_socket_timeout(Duration::MAX)
        .unwrap()
        .set_stack_timeout(Duration::MAX)
        .unwrap()
        .set_blocked_connection_timeout(Duration::MAX)
        .unwrap();
    params
}
