//! Shared helpers of the broker tests: where the broker is, and a raw AMQP
//! session driven by the codec alone (the connection layer comes later).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pika::frame::{FRAME_MIN_SIZE, Frame, PROTOCOL_HEADER, encode_method, parse_frame};
use pika::spec::Method;

const HOW_TO_GET_A_BROKER: &str = "run the tests through the project's broker script, \
     `scripts/with-broker scripts/test` (it installs and starts a private RabbitMQ), \
     or set AMQP_URL=amqp://user:password@host:port/ to a running RabbitMQ";

/// `AMQP_URL`, or a failure that says how to get a broker.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .unwrap_or_else(|_| panic!("AMQP_URL is not set: {HOW_TO_GET_A_BROKER}"))
}

/// The `host:port` of `AMQP_URL` (user info and path stripped; port 5672
/// when absent).
pub fn broker_addr() -> String {
    let url = amqp_url();
    let rest = url
        .strip_prefix("amqp://")
        .unwrap_or_else(|| panic!("AMQP_URL must start with amqp:// (got a different scheme)"));
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host_port.to_string()
    } else {
        format!("{host_port}:5672")
    }
}

/// The user and password of `AMQP_URL` (guest/guest when absent).
pub fn broker_credentials() -> (String, String) {
    let url = amqp_url();
    let authority = url
        .trim_start_matches("amqp://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    match authority.rsplit_once('@') {
        Some((userinfo, _)) => match userinfo.split_once(':') {
            Some((u, p)) => (u.to_string(), p.to_string()),
            None => (userinfo.to_string(), String::new()),
        },
        None => ("guest".into(), "guest".into()),
    }
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
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedFrame {
    Method(u16, Method),
    Header(u16, pika::frame::ContentHeader),
    Body(u16, Vec<u8>),
    Heartbeat,
}

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
                let owned = match frame {
                    Frame::Method { channel, method } => OwnedFrame::Method(channel, method),
                    Frame::Header { channel, header } => OwnedFrame::Header(channel, header),
                    Frame::Body { channel, payload } => OwnedFrame::Body(channel, payload.to_vec()),
                    Frame::Heartbeat => OwnedFrame::Heartbeat,
                };
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

    /// Reads the next method frame, skipping heartbeats.
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
}

/// Connection parameters for the broker at `AMQP_URL`, with short timeouts
/// suited to tests.
pub fn broker_params() -> pika::ConnectionParameters {
    let mut params = pika::UrlParameters::parse(&amqp_url())
        .unwrap_or_else(|e| panic!("AMQP_URL does not parse: {e}"))
        .into_parameters();
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
