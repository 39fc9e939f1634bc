//! Proves the test tools themselves, without the client: the fault-injecting
//! proxy (PX) against a TCP echo server and against the fake broker, and the
//! scripted fake broker (FS) against a client driven by hand with the codec.

#[path = "common/fake_broker.rs"]
mod fake_broker;
#[path = "common/proxy.rs"]
mod proxy;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fake_broker::{FakeBroker, OwnedFrame, decode_frames, rabbitmq_tune};
use pika::frame::{
    FRAME_MIN_SIZE, Frame, PROTOCOL_HEADER, encode_heartbeat, encode_message, encode_method,
    parse_frame,
};
use pika::spec::{Method, basic, channel, connection};
use pika::{BasicProperties, FieldTable, FieldValue};
use proxy::{Direction, FrameKind, Proxy};

use Direction::{BrokerToClient, ClientToBroker};

const WAIT: Duration = Duration::from_secs(5);

/// A TCP server that echoes every connection until EOF, then half-closes.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// Asserts that nothing arrives within `quiet`.
fn assert_silent(stream: &mut TcpStream, quiet: Duration) {
    stream.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?} {:?}", &buf[..]),
    }
    stream.set_read_timeout(Some(WAIT)).unwrap();
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn method_frame(channel: u16, method: impl Into<Method>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_method(&mut out, channel, &method.into(), 0).unwrap();
    out
}

fn names(proxy: &Proxy, dir: Direction) -> Vec<&'static str> {
    proxy.frames(dir).iter().map(|f| f.name()).collect()
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::new()
    }
}

/// The client side of AMQP, by hand with the codec.
struct HandClient {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl HandClient {
    fn connect(addr: SocketAddr) -> HandClient {
        HandClient {
            stream: connect(addr),
            buffer: Vec::new(),
        }
    }

    fn send(&mut self, channel: u16, method: impl Into<Method>) {
        self.stream
            .write_all(&method_frame(channel, method))
            .unwrap();
    }

    fn read_frame(&mut self) -> OwnedFrame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buffer, 0).unwrap() {
                let owned = match frame {
                    Frame::Method { channel, method } => OwnedFrame::Method(channel, method),
                    Frame::Header { channel, header } => OwnedFrame::Header(channel, header),
                    Frame::Body { channel, payload } => OwnedFrame::Body(channel, payload.to_vec()),
                    Frame::Heartbeat => OwnedFrame::Heartbeat,
                };
                self.buffer.drain(..used);
                return owned;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "the broker closed the connection");
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    fn expect<T: TryFrom<Method, Error = Method>>(&mut self, channel: u16) -> T {
        match self.read_frame() {
            OwnedFrame::Method(c, method) if c == channel => T::try_from(method)
                .unwrap_or_else(|m| panic!("unexpected {m:?} on channel {channel}")),
            other => panic!("expected a method on channel {channel}, got {other:?}"),
        }
    }

    /// The client side of the handshake; returns the broker's Start and Tune.
    fn handshake(&mut self, vhost: &str) -> (connection::Start, connection::Tune) {
        self.stream.write_all(&PROTOCOL_HEADER).unwrap();
        let start = self.expect::<connection::Start>(0);
        let mut client_properties = FieldTable::new();
        client_properties.insert("product", "test_support");
        self.send(
            0,
            connection::StartOk {
                client_properties,
                mechanism: "PLAIN".into(),
                response: b"\0guest\0guest"[..].into(),
                locale: "en_US".into(),
            },
        );
        let tune = self.expect::<connection::Tune>(0);
        self.send(
            0,
            connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: tune.frame_max,
                heartbeat: tune.heartbeat,
            },
        );
        self.send(
            0,
            connection::Open {
                virtual_host: vhost.into(),
                ..Default::default()
            },
        );
        self.expect::<connection::OpenOk>(0);
        (start, tune)
    }
}

// ---- Proxy ----

#[test]
fn proxy_passes_bytes_both_ways() {
    let proxy = Proxy::start(echo_server());
    let mut client = connect(proxy.addr());
    client.write_all(b"hello, broker").unwrap();
    assert_eq!(read_n(&mut client, 13), b"hello, broker");

    // A megabyte each way at once.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut writer = client.try_clone().unwrap();
        let big = big.clone();
        thread::spawn(move || writer.write_all(&big).unwrap())
    };
    assert!(read_n(&mut client, big.len()) == big, "the echo differs");
    writer.join().unwrap();

    wait_until("all bytes are counted", || {
        proxy.bytes(ClientToBroker) == 1_000_013 && proxy.bytes(BrokerToClient) == 1_000_013
    });
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.open_connections(), 1);
    // Not AMQP: the observation gave up, the bytes still passed.
    assert!(matches!(
        proxy.frames(ClientToBroker).as_slice(),
        [f] if matches!(f.kind, FrameKind::Garbage(_))
    ));

    // The client's half-close passes through; the echo server answers it.
    client.shutdown(Shutdown::Write).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    wait_until("the connection is closed", || proxy.open_connections() == 0);
}

#[test]
fn proxy_cut_fin_gives_the_client_eof() {
    let proxy = Proxy::start(echo_server());
    let mut client = connect(proxy.addr());
    client.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut client, 4), b"ping");

    proxy.cut_fin();
    let mut buf = [0u8; 16];
    assert_eq!(client.read(&mut buf).unwrap(), 0, "EOF after cut_fin");
    assert_eq!(proxy.open_connections(), 0);

    // The proxy still serves new connections.
    let mut again = connect(proxy.addr());
    again.write_all(b"again").unwrap();
    assert_eq!(read_n(&mut again, 5), b"again");
    assert_eq!(proxy.connections(), 2);
}

#[test]
fn proxy_cut_rst_gives_the_client_a_reset() {
    let proxy = Proxy::start(echo_server());
    let mut client = connect(proxy.addr());
    client.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut client, 4), b"ping");

    proxy.cut_rst();
    let mut buf = [0u8; 16];
    let err = client.read(&mut buf).expect_err("a reset, not EOF");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn proxy_stall_holds_one_direction_and_resume_delivers() {
    let proxy = Proxy::start(echo_server());
    let mut client = connect(proxy.addr());
    client.write_all(b"up").unwrap();
    assert_eq!(read_n(&mut client, 2), b"up");

    proxy.stall(BrokerToClient);
    client.write_all(b"queued").unwrap();
    // The other direction flows: the echo server got the bytes...
    wait_until("the bytes reach the upstream", || {
        proxy.bytes(ClientToBroker) == 8
    });
    // ...but its answer is held.
    assert_silent(&mut client, Duration::from_millis(300));
    proxy.resume(BrokerToClient);
    assert_eq!(read_n(&mut client, 6), b"queued");

    proxy.stall(ClientToBroker);
    client.write_all(b"held").unwrap();
    assert_silent(&mut client, Duration::from_millis(300));
    assert_eq!(proxy.bytes(ClientToBroker), 8);
    proxy.resume(ClientToBroker);
    assert_eq!(read_n(&mut client, 4), b"held");
}

#[test]
fn proxy_corrupt_flips_the_byte_at_the_offset() {
    let proxy = Proxy::start(echo_server());
    // Armed before connecting: for the next connection.
    proxy.corrupt(ClientToBroker, 3, 0xFF);
    let mut client = connect(proxy.addr());
    client.write_all(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    assert_eq!(read_n(&mut client, 8), [0, 1, 2, 3 ^ 0xFF, 4, 5, 6, 7]);

    // On the live connection, ahead of the stream, in the other direction,
    // across two writes.
    proxy.corrupt(BrokerToClient, 10, 0x01);
    proxy.corrupt(BrokerToClient, 13, 0x80);
    client.write_all(&[0; 4]).unwrap();
    assert_eq!(read_n(&mut client, 4), [0, 0, 1, 0]);
    client.write_all(&[0; 4]).unwrap();
    assert_eq!(read_n(&mut client, 4), [0, 0x80, 0, 0]);

    // An offset already passed is refused loudly.
    let refused = panic::catch_unwind(AssertUnwindSafe(|| {
        proxy.corrupt(ClientToBroker, 0, 1);
    }));
    assert!(panic_text(refused.unwrap_err()).contains("already passed"));
    // And the proxy still works after that.
    client.write_all(b"ok").unwrap();
    assert_eq!(read_n(&mut client, 2), b"ok");
}

#[test]
fn proxy_inject_splices_at_the_next_frame_boundary() {
    let proxy = Proxy::start(echo_server());
    let mut client = connect(proxy.addr());
    let tune_ok = method_frame(
        0,
        connection::TuneOk {
            channel_max: 7,
            frame_max: 4096,
            heartbeat: 3,
        },
    );
    let injected = method_frame(
        0,
        connection::Open {
            virtual_host: "/injected".into(),
            ..Default::default()
        },
    );
    let channel_open = method_frame(1, channel::Open::default());

    // The protocol header and the first 5 bytes of a frame: once they are
    // echoed, the proxy stands in the middle of that frame.
    client.write_all(&PROTOCOL_HEADER).unwrap();
    client.write_all(&tune_ok[..5]).unwrap();
    assert_eq!(
        read_n(&mut client, 13),
        [&PROTOCOL_HEADER[..], &tune_ok[..5]].concat()
    );
    proxy.inject(ClientToBroker, injected.clone());
    assert_silent(&mut client, Duration::from_millis(200));

    // The rest of the frame and the next: the injection goes between them.
    client
        .write_all(&[&tune_ok[5..], &channel_open[..]].concat())
        .unwrap();
    let expected = [&tune_ok[5..], &injected[..], &channel_open[..]].concat();
    assert_eq!(read_n(&mut client, expected.len()), expected);

    assert_eq!(
        names(&proxy, ClientToBroker),
        [
            "protocol-header",
            "Connection.TuneOk",
            "injected",
            "Channel.Open"
        ]
    );
    let frames = proxy.frames(ClientToBroker);
    assert_eq!(frames[2].kind, FrameKind::Injected(injected.clone()));
    assert_eq!(frames[2].offset, 8 + tune_ok.len() as u64);
    // Downstream of the splice the injection is a frame like any other.
    wait_until("the echo is observed", || {
        proxy.frames(BrokerToClient).len() == 4
    });
    assert_eq!(
        names(&proxy, BrokerToClient),
        [
            "protocol-header",
            "Connection.TuneOk",
            "Connection.Open",
            "Channel.Open"
        ]
    );
    // Injected bytes are not the sender's: not counted.
    assert_eq!(
        proxy.bytes(ClientToBroker),
        (8 + tune_ok.len() + channel_open.len()) as u64
    );

    // Between frames and idle: the injection goes out at once.
    let mut heartbeat = Vec::new();
    encode_heartbeat(&mut heartbeat);
    proxy.inject(BrokerToClient, heartbeat.clone());
    assert_eq!(read_n(&mut client, 8), heartbeat);
}

#[test]
fn proxy_counts_and_names_frames() {
    let proxy = Proxy::start(echo_server());
    let mut client = connect(proxy.addr());
    let mut wire = PROTOCOL_HEADER.to_vec();
    encode_method(&mut wire, 0, &connection::StartOk::default().into(), 0).unwrap();
    encode_heartbeat(&mut wire);
    let publish = basic::Publish {
        routing_key: "jobs".into(),
        ..Default::default()
    };
    encode_message(
        &mut wire,
        1,
        &publish.into(),
        &BasicProperties::default(),
        &[7u8; 5000],
        FRAME_MIN_SIZE,
    )
    .unwrap();
    // In small pieces, so that frames straddle reads.
    for piece in wire.chunks(7) {
        client.write_all(piece).unwrap();
    }
    assert!(read_n(&mut client, wire.len()) == wire);

    let frames = proxy.frames(ClientToBroker);
    let got: Vec<_> = frames.iter().map(|f| (f.name(), f.channel)).collect();
    assert_eq!(
        got,
        [
            ("protocol-header", 0),
            ("Connection.StartOk", 0),
            ("heartbeat", 0),
            ("Basic.Publish", 1),
            ("header", 1),
            ("body", 1),
            ("body", 1)
        ]
    );
    assert!(matches!(
        frames[4].kind,
        FrameKind::Header {
            class_id: 60,
            body_size: 5000
        }
    ));
    assert_eq!(
        frames[3].method(),
        Some(&Method::from(basic::Publish {
            routing_key: "jobs".into(),
            ..Default::default()
        }))
    );
    assert_eq!((frames[5].size, frames[6].size), (4088, 912));
    assert_eq!(frames[2].size, 0);
    // Offsets tile the stream; times never go back.
    assert_eq!(frames[1].offset, 8);
    for pair in frames[1..].windows(2) {
        assert_eq!(pair[0].offset + pair[0].size as u64 + 8, pair[1].offset);
        assert!(pair[0].at <= pair[1].at);
    }
    assert!(frames.iter().all(|f| f.conn == 0));

    let echoed = proxy.wait_for_frame(BrokerToClient, WAIT, |f| {
        f.name() == "body" && f.size == 912
    });
    assert_eq!(echoed.channel, 1);
    assert_eq!(proxy.frames(BrokerToClient).len(), 7);
}

#[test]
fn proxy_max_gap_reflects_a_pause() {
    let proxy = Proxy::start(echo_server());
    let mut client = connect(proxy.addr());
    for _ in 0..30 {
        client.write_all(b"x").unwrap();
        assert_eq!(read_n(&mut client, 1), b"x");
        thread::sleep(Duration::from_millis(10));
    }
    let steady = proxy.max_gap(ClientToBroker);
    assert!(
        steady < Duration::from_millis(200),
        "steady traffic every 10 ms, yet a gap of {steady:?}"
    );

    thread::sleep(Duration::from_millis(400));
    client.write_all(b"y").unwrap();
    assert_eq!(read_n(&mut client, 1), b"y");
    let gap = proxy.max_gap(ClientToBroker);
    assert!(
        gap >= Duration::from_millis(200),
        "a 400 ms pause, a gap of {gap:?}"
    );
    assert!(proxy.max_gap(BrokerToClient) >= Duration::from_millis(200));
}

#[test]
fn proxy_drop_closes_everything_promptly() {
    let proxy = Proxy::start(echo_server());
    let addr = proxy.addr();
    let mut client = connect(addr);
    client.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut client, 4), b"ping");
    proxy.stall(BrokerToClient);

    let started = Instant::now();
    drop(proxy);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        started.elapsed()
    );
    let mut buf = [0u8; 8];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
    assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
}

// ---- Fake broker ----

#[test]
fn fake_broker_handshake_with_a_hand_driven_client() {
    let (tx, rx) = mpsc::channel();
    let broker = FakeBroker::start(move |mut conn| {
        let start_ok = conn.handshake(connection::Tune {
            channel_max: 3,
            frame_max: 8192,
            heartbeat: 5,
        });
        assert_eq!(start_ok.mechanism, "PLAIN");
        assert_eq!(start_ok.response.as_bytes(), b"\0guest\0guest");
        assert_eq!(start_ok.locale, "en_US");
        assert_eq!(
            start_ok
                .client_properties
                .get("product")
                .and_then(FieldValue::as_str),
            Some("test_support")
        );
        assert_eq!(conn.start_ok.as_ref(), Some(&start_ok));
        assert_eq!(
            conn.tune_ok,
            Some(connection::TuneOk {
                channel_max: 3,
                frame_max: 8192,
                heartbeat: 5
            })
        );
        assert_eq!(conn.open.as_ref().unwrap().virtual_host, "/vh");
        assert_eq!(conn.frame_max, 8192);

        conn.expect::<channel::Open>(1);
        conn.send_method(1, channel::OpenOk::default());
        let close = conn.expect::<connection::Close>(0);
        conn.send_method(0, connection::CloseOk {});
        tx.send(close).unwrap();
        assert!(conn.read_until_eof(WAIT).is_empty());
    });

    let mut client = HandClient::connect(broker.addr());
    let (start, tune) = client.handshake("/vh");
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    assert_eq!(start.mechanisms.as_str(), Some("PLAIN AMQPLAIN"));
    assert_eq!(start.locales.as_str(), Some("en_US"));
    let props = &start.server_properties;
    assert_eq!(
        props.get("product").and_then(FieldValue::as_str),
        Some("RabbitMQ")
    );
    assert!(props.get("version").and_then(FieldValue::as_str).is_some());
    let capabilities = props
        .get("capabilities")
        .and_then(FieldValue::as_table)
        .unwrap();
    for capability in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
    ] {
        assert_eq!(
            capabilities.get(capability).and_then(FieldValue::as_bool),
            Some(true),
            "{capability}"
        );
    }
    assert_eq!(
        (tune.channel_max, tune.frame_max, tune.heartbeat),
        (3, 8192, 5)
    );

    client.send(1, channel::Open::default());
    client.expect::<channel::OpenOk>(1);
    client.send(
        0,
        connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            ..Default::default()
        },
    );
    client.expect::<connection::CloseOk>(0);
    drop(client);

    broker.join();
    let close = rx.recv().unwrap();
    assert_eq!((close.reply_code, close.reply_text.as_str()), (200, "bye"));
}

#[test]
fn fake_broker_join_fails_with_the_scripts_panic() {
    let broker = FakeBroker::start(|mut conn| {
        let header = conn.read_protocol_header();
        assert_eq!(&header, b"AMQP\x00\x00\x09\x02", "deliberate mismatch");
    });
    let mut client = connect(broker.addr());
    client.write_all(&PROTOCOL_HEADER).unwrap();
    let failure = panic::catch_unwind(AssertUnwindSafe(|| broker.join())).unwrap_err();
    let text = panic_text(failure);
    assert!(text.contains("deliberate mismatch"), "{text}");
}

#[test]
fn fake_broker_join_gives_up_on_a_stuck_script() {
    let broker = FakeBroker::start(|conn| conn.stall_forever());
    let _client = connect(broker.addr());
    let started = Instant::now();
    let failure = panic::catch_unwind(AssertUnwindSafe(|| {
        broker.join_timeout(Duration::from_millis(300))
    }))
    .unwrap_err();
    assert!(panic_text(failure).contains("stuck"));
    assert!(started.elapsed() < Duration::from_secs(5));

    // A client that never comes.
    let lonely = FakeBroker::start(|_| {});
    let failure = panic::catch_unwind(AssertUnwindSafe(|| {
        lonely.join_timeout(Duration::from_millis(100))
    }))
    .unwrap_err();
    assert!(panic_text(failure).contains("0 connections accepted"));
}

#[test]
fn fake_broker_read_timeout_names_what_it_waited_for() {
    let broker = FakeBroker::start(|mut conn| {
        conn.set_timeout(Duration::from_millis(100));
        conn.read_protocol_header();
    });
    let _client = connect(broker.addr());
    let failure = panic::catch_unwind(AssertUnwindSafe(|| broker.join())).unwrap_err();
    let text = panic_text(failure);
    assert!(text.contains("the protocol header"), "{text}");
}

#[test]
fn fake_broker_closes_with_fin_or_rst_and_sees_what_the_client_sent() {
    // FIN: the client reads EOF.
    let broker = FakeBroker::start(|mut conn| {
        conn.read_protocol_header();
        conn.close_socket();
    });
    let mut client = connect(broker.addr());
    client.write_all(&PROTOCOL_HEADER).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    broker.join();

    // RST: the client reads ECONNRESET.
    let broker = FakeBroker::start(|mut conn| {
        conn.read_protocol_header();
        conn.reset();
    });
    let mut client = connect(broker.addr());
    client.write_all(&PROTOCOL_HEADER).unwrap();
    let err = client.read(&mut buf).expect_err("a reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    broker.join();

    // What the client sends before it closes.
    let (tx, rx) = mpsc::channel();
    let broker = FakeBroker::start(move |mut conn| {
        conn.read_protocol_header();
        tx.send(decode_frames(&conn.read_until_eof(WAIT))).unwrap();
    });
    let mut client = connect(broker.addr());
    client.write_all(&PROTOCOL_HEADER).unwrap();
    let mut heartbeat = Vec::new();
    encode_heartbeat(&mut heartbeat);
    client.write_all(&heartbeat).unwrap();
    client
        .write_all(&method_frame(0, connection::CloseOk {}))
        .unwrap();
    drop(client);
    broker.join();
    assert_eq!(
        rx.recv().unwrap(),
        [
            OwnedFrame::Heartbeat,
            OwnedFrame::Method(0, connection::CloseOk {}.into())
        ]
    );
}

#[test]
fn fake_broker_start_many_serves_each_connection() {
    let broker = FakeBroker::start_many(2, |mut conn| {
        conn.handshake(rabbitmq_tune());
        let index = conn.index() as u16;
        conn.send_method(
            0,
            connection::Close {
                reply_code: 320 + index,
                reply_text: "CONNECTION_FORCED".into(),
                ..Default::default()
            },
        );
        conn.expect::<connection::CloseOk>(0);
    });
    let codes: Vec<u16> = (0..2)
        .map(|_| {
            let mut client = HandClient::connect(broker.addr());
            client.handshake("/");
            let close = client.expect::<connection::Close>(0);
            client.send(0, connection::CloseOk {});
            close.reply_code
        })
        .collect();
    broker.join();
    assert_eq!(codes, [320, 321]);
}

// ---- Both together ----

#[test]
fn proxy_in_front_of_the_fake_broker_observes_the_handshake() {
    let (tx, rx) = mpsc::channel();
    let broker = FakeBroker::start(move |mut conn| {
        conn.handshake(rabbitmq_tune());
        conn.send_heartbeat();
        tx.send(decode_frames(&conn.read_until_eof(WAIT))).unwrap();
    });
    let proxy = Proxy::start(broker.addr());
    let mut client = HandClient::connect(proxy.addr());
    let (_, tune) = client.handshake("/");
    assert_eq!(tune, rabbitmq_tune());
    assert_eq!(client.read_frame(), OwnedFrame::Heartbeat);

    let mut heartbeat = Vec::new();
    encode_heartbeat(&mut heartbeat);
    proxy.inject(BrokerToClient, heartbeat);
    assert_eq!(client.read_frame(), OwnedFrame::Heartbeat);

    client.send(
        0,
        connection::Close {
            reply_code: 200,
            reply_text: "done".into(),
            ..Default::default()
        },
    );
    proxy.wait_for_frame(ClientToBroker, WAIT, |f| f.name() == "Connection.Close");
    drop(client);
    broker.join();

    match rx.recv().unwrap().as_slice() {
        [OwnedFrame::Method(0, Method::ConnectionClose(close))] => {
            assert_eq!(close.reply_text, "done")
        }
        other => panic!("the broker saw {other:?}"),
    }
    assert_eq!(
        names(&proxy, ClientToBroker),
        [
            "protocol-header",
            "Connection.StartOk",
            "Connection.TuneOk",
            "Connection.Open",
            "Connection.Close"
        ]
    );
    assert_eq!(
        names(&proxy, BrokerToClient),
        [
            "Connection.Start",
            "Connection.Tune",
            "Connection.OpenOk",
            "heartbeat",
            "injected"
        ]
    );
    let tune_ok = proxy.frames(ClientToBroker)[2].method().cloned().unwrap();
    assert_eq!(
        connection::TuneOk::try_from(tune_ok).unwrap().frame_max,
        131_072
    );
}
