//! A channel's content and confirms against a scripted fake broker (FS),
//! for what a real broker will not send (RELIABILITY.md 17–18): content
//! frames out of sequence or of the wrong size, a lying body_size, broken
//! field tables in a delivery's headers, deliveries for unknown consumers;
//! and, deterministically, what becomes of unconfirmed publishes and
//! pending requests when the broker closes the channel or the stream is
//! lost.
//!
//! Every fault test checks the CLEAN promise: one terminal callback, the
//! channel's close callback before it and nothing after it, and the fake
//! broker received Connection.Close with the reply code of the error.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::fake_broker::{FakeBroker, FakeConn, OwnedFrame, decode_frames, rabbitmq_tune};
use common::run_loop;
use pika::frame::{encode_body, encode_content_header, encode_method};
use pika::spec::{Method, basic, channel, confirm, connection, queue};
use pika::{
    BasicConsumeOptions, BasicProperties, Channel, CodecError, Confirmation, ConnectionParameters,
    Error, FieldTable, QueueDeclareOptions, SelectConnection,
};

/// The watchdog of one connection's life in a test.
const LIMIT: Duration = Duration::from_secs(15);
/// How long the fake broker waits for the client to close its socket.
const EOF_WAIT: Duration = Duration::from_secs(8);
/// The consumer tag the client asks for.
const TAG: &str = "the-consumer";

// ----------------------------------------------------------------------
// The client side: every callback recorded
// ----------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Event {
    Opened,
    ChannelOpened,
    Consuming,
    Message(Vec<u8>),
    Completion(&'static str, Result<(), Error>),
    Confirm(Confirmation),
    ChannelClosed(Error),
    Closed(Error),
    OpenError,
    Alive,
}

impl Event {
    fn is_terminal(&self) -> bool {
        matches!(self, Event::Closed(_) | Event::OpenError)
    }
}

#[derive(Default)]
struct Outcome {
    events: RefCell<Vec<Event>>,
}

impl Outcome {
    fn push(&self, event: Event) {
        self.events.borrow_mut().push(event);
    }

    fn events(&self) -> Vec<Event> {
        self.events.borrow().clone()
    }
}

/// Connects to `fake`, opens a channel whose close is recorded, and runs
/// `on_channel` with it; runs the loop until the terminal callback.
fn run_client(
    fake: &FakeBroker,
    on_channel: impl FnOnce(&Channel, &Rc<Outcome>) + 'static,
) -> (SelectConnection, Rc<Outcome>) {
    let mut params = ConnectionParameters::default();
    params
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(fake.addr().port())
        .unwrap();
    params
        .set_socket_timeout(Duration::from_secs(2))
        .unwrap()
        .set_stack_timeout(Duration::from_secs(5))
        .unwrap();
    let outcome = Rc::new(Outcome::default());
    let (o1, o2, o3) = (outcome.clone(), outcome.clone(), outcome.clone());
    let conn = SelectConnection::new(
        params,
        move |conn| {
            o1.push(Event::Opened);
            let o = o1.clone();
            conn.channel(None, move |r| {
                let ch = r.expect("the channel opens");
                o.push(Event::ChannelOpened);
                let o2 = o.clone();
                ch.add_on_close_callback(move |_, e| o2.push(Event::ChannelClosed(e)));
                on_channel(&ch, &o);
            })
            .expect("the connection is open");
        },
        move |conn, e| {
            eprintln!("open error: {e}");
            o2.push(Event::OpenError);
            conn.ioloop().stop();
        },
        move |conn, e| {
            o3.push(Event::Closed(e));
            conn.ioloop().stop();
        },
    )
    .expect("connection created");
    run_loop(conn.ioloop(), LIMIT);
    (conn, outcome)
}

/// A client that consumes from "q" with [`TAG`], recording each message.
fn consume(ch: &Channel, outcome: &Rc<Outcome>) {
    let (o1, o2) = (outcome.clone(), outcome.clone());
    ch.basic_consume(
        "q",
        move |_, d| o1.push(Event::Message(d.body)),
        BasicConsumeOptions {
            consumer_tag: Some(TAG.into()),
            ..Default::default()
        },
        move |_, r| match r {
            Ok(_) => o2.push(Event::Consuming),
            Err(e) => o2.push(Event::Completion("basic_consume", Err(e))),
        },
    )
    .expect("the channel is open");
}

/// Checks CLEAN once the loop stopped: exactly one terminal callback, the
/// last event; the channel's close callback once, before it; the
/// connection closed and refusing calls. Returns the terminal error.
fn assert_clean(conn: &SelectConnection, outcome: &Outcome) -> Error {
    // Nothing may run after the terminal callback, also not later.
    let lp = conn.ioloop().clone();
    let stopper = lp.clone();
    lp.call_later(Duration::from_millis(100), move || stopper.stop());
    lp.start().unwrap();
    let events = outcome.events();
    let terminals: Vec<&Event> = events.iter().filter(|e| e.is_terminal()).collect();
    assert_eq!(terminals.len(), 1, "one terminal callback: {events:?}");
    let Some(Event::Closed(error)) = events.last() else {
        panic!("the terminal callback comes last, and is on_close: {events:?}");
    };
    assert!(error.is_connection_error(), "{error:?}");
    let closes: Vec<&Error> = events
        .iter()
        .filter_map(|e| match e {
            Event::ChannelClosed(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(
        closes.len(),
        1,
        "the channel's close callback ran once: {events:?}"
    );
    assert!(conn.is_closed());
    assert!(matches!(
        conn.channel(None, |_| panic!("never called")),
        Err(Error::ConnectionWrongState { .. })
    ));
    error.clone()
}

// ----------------------------------------------------------------------
// The fake broker side
// ----------------------------------------------------------------------

/// The handshake and the channel's opening.
fn open_channel(conn: &mut FakeConn) {
    conn.handshake(rabbitmq_tune());
    conn.expect::<channel::Open>(1);
    conn.send_method(1, channel::OpenOk::default());
}

/// The handshake, the channel, and the client's consumer.
fn open_consumer(conn: &mut FakeConn) {
    open_channel(conn);
    let consume = conn.expect::<basic::Consume>(1);
    assert_eq!(consume.consumer_tag, TAG);
    conn.send_method(
        1,
        basic::ConsumeOk {
            consumer_tag: TAG.into(),
        },
    );
}

/// Answers the client's close handshake (consumer cancels, Channel.Close,
/// Connection.Close) like a broker, until its Connection.Close.
fn serve_close(conn: &mut FakeConn) {
    loop {
        match conn.read_method() {
            (ch, Method::BasicCancel(c)) => conn.send_method(
                ch,
                basic::CancelOk {
                    consumer_tag: c.consumer_tag,
                },
            ),
            (ch, Method::ChannelClose(_)) => conn.send_method(ch, channel::CloseOk {}),
            (0, Method::ConnectionClose(_)) => {
                conn.send_method(0, connection::CloseOk {});
                return;
            }
            (ch, other) => panic!("fake broker: unexpected {other:?} on channel {ch}"),
        }
    }
}

fn method_frame(channel: u16, method: impl Into<Method>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_method(&mut out, channel, &method.into(), 0).unwrap();
    out
}

fn deliver(tag: &str, delivery_tag: u64) -> Vec<u8> {
    method_frame(
        1,
        basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            routing_key: "q".into(),
            ..Default::default()
        },
    )
}

fn header_frame(class_id: u16, body_size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_content_header(
        &mut out,
        1,
        class_id,
        body_size,
        &BasicProperties::default(),
        0,
    )
    .unwrap();
    out
}

fn body_frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_body(&mut out, 1, body, 0);
    out
}

/// A content header frame for Basic on channel 1 whose properties are only
/// `headers`, given as raw table bytes (length prefix included).
fn header_with_raw_headers(body_size: u64, table: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&body_size.to_be_bytes());
    payload.extend_from_slice(&BasicProperties::FLAG_HEADERS.to_be_bytes());
    payload.extend_from_slice(table);
    let mut frame = vec![2, 0, 1];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xCE);
    frame
}

/// A table (length prefix included) of the given raw entries.
fn raw_table(entries: &[u8]) -> Vec<u8> {
    let mut t = (entries.len() as u32).to_be_bytes().to_vec();
    t.extend_from_slice(entries);
    t
}

/// Everything the client sends until it closes its socket.
fn until_eof(conn: &mut FakeConn) -> Vec<OwnedFrame> {
    decode_frames(&conn.read_until_eof(EOF_WAIT))
}

/// The reply code of the client's one Connection.Close, its last frame.
fn close_code(frames: &[OwnedFrame]) -> u16 {
    let closes: Vec<&connection::Close> = frames
        .iter()
        .filter_map(|f| match f {
            OwnedFrame::Method(0, Method::ConnectionClose(c)) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(closes.len(), 1, "one Connection.Close: {frames:?}");
    assert!(
        matches!(
            frames.last(),
            Some(OwnedFrame::Method(0, Method::ConnectionClose(_)))
        ),
        "Connection.Close is the last frame: {frames:?}"
    );
    closes[0].reply_code
}

/// Opens a consumer, sends `bytes` on its channel, and returns the frames
/// the client sent until it closed its socket.
fn consumer_receives(bytes: Vec<u8>) -> (Error, Vec<Event>, Vec<OwnedFrame>) {
    let (tx, rx) = mpsc::channel();
    let fake = FakeBroker::start(move |mut conn| {
        open_consumer(&mut conn);
        conn.send_raw(&bytes);
        let _ = tx.send(until_eof(&mut conn));
    });
    let (conn, outcome) = run_client(&fake, consume);
    let error = assert_clean(&conn, &outcome);
    fake.join();
    let frames = rx.recv().expect("the script's frames");
    let events = outcome.events();
    let channel_error = events.iter().find_map(|e| match e {
        Event::ChannelClosed(e) => Some(e.to_string()),
        _ => None,
    });
    assert_eq!(
        channel_error,
        Some(error.to_string()),
        "the channel closed with the connection's error"
    );
    assert!(
        !events.iter().any(|e| matches!(e, Event::Message(_))),
        "nothing was delivered: {events:?}"
    );
    (error, events, frames)
}

#[track_caller]
fn assert_unexpected_frame(error: &Error, frames: &[OwnedFrame], detail: &str) {
    match error {
        Error::UnexpectedFrame { detail: d } => assert!(d.contains(detail), "{d}"),
        other => panic!("expected UnexpectedFrame, got {other:?}"),
    }
    assert_eq!(close_code(frames), 505);
}

/// The codec error inside an `Error::Protocol`, looking through field
/// wrappers, after checking the Close's reply code.
#[track_caller]
fn protocol_error(error: &Error, frames: &[OwnedFrame], code: u16) -> CodecError {
    assert_eq!(error.reply_code(), Some(code), "{error:?}");
    assert_eq!(close_code(frames), code);
    match error {
        Error::Protocol(e) => e.root().clone(),
        other => panic!("expected Error::Protocol, got {other:?}"),
    }
}

// ----------------------------------------------------------------------
// Content out of sequence (RELIABILITY 17)
// ----------------------------------------------------------------------

#[test]
fn content_header_without_a_method_closes_with_505() {
    let (error, _, frames) = consumer_receives(header_frame(60, 3));
    assert_unexpected_frame(&error, &frames, "without a method");
}

#[test]
fn body_without_a_header_closes_with_505() {
    let (error, _, frames) = consumer_receives(body_frame(b"lost"));
    assert_unexpected_frame(&error, &frames, "without a content header");
}

#[test]
fn body_right_after_the_deliver_method_without_its_header_closes_with_505() {
    let mut bytes = deliver(TAG, 1);
    bytes.extend(body_frame(b"no header"));
    let (error, _, frames) = consumer_receives(bytes);
    assert_unexpected_frame(&error, &frames, "without a content header");
}

#[test]
fn body_longer_than_its_header_declares_closes_with_505() {
    let mut bytes = deliver(TAG, 1);
    bytes.extend(header_frame(60, 5));
    bytes.extend(body_frame(b"0123456789"));
    let (error, _, frames) = consumer_receives(bytes);
    assert_unexpected_frame(&error, &frames, "longer than its header's 5 bytes");
}

#[test]
fn a_second_body_frame_overrunning_the_declared_size_closes_with_505() {
    let mut bytes = deliver(TAG, 1);
    bytes.extend(header_frame(60, 5));
    bytes.extend(body_frame(b"012"));
    bytes.extend(body_frame(b"345"));
    let (error, _, frames) = consumer_receives(bytes);
    assert_unexpected_frame(&error, &frames, "longer than its header's 5 bytes");
}

#[test]
fn a_method_while_content_is_arriving_closes_with_505() {
    let mut bytes = deliver(TAG, 1);
    bytes.extend(header_frame(60, 10));
    bytes.extend(body_frame(b"012"));
    bytes.extend(deliver(TAG, 2));
    let (error, _, frames) = consumer_receives(bytes);
    assert_unexpected_frame(&error, &frames, "while a message's content was arriving");
}

#[test]
fn content_header_of_class_10_closes_with_503() {
    let mut bytes = deliver(TAG, 1);
    bytes.extend(header_frame(10, 3));
    bytes.extend(body_frame(b"abc"));
    let (error, _, frames) = consumer_receives(bytes);
    let e = protocol_error(&error, &frames, 503);
    assert!(
        matches!(e, CodecError::UnknownContentClass { class_id: 10 }),
        "{e:?}"
    );
}

/// The process's virtual memory size, from /proc/self/statm.
fn virtual_memory() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().next().unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn body_size_of_2_pow_63_is_not_allocated_and_the_client_stays_responsive() {
    let (tx, rx) = mpsc::channel();
    // The client tells the script when it has run a timer during the silence.
    let (alive_tx, alive_rx) = mpsc::channel::<()>();
    let fake = FakeBroker::start(move |mut conn| {
        open_consumer(&mut conn);
        let mut bytes = deliver(TAG, 1);
        bytes.extend(header_frame(60, 1 << 63));
        bytes.extend(body_frame(&[0xAB; 16]));
        conn.send_raw(&bytes);
        // Silence until the client shows it is alive, then the broker
        // closes the connection.
        alive_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the client ran its timer");
        conn.send_method(
            0,
            connection::Close {
                reply_code: 320,
                reply_text: "CONNECTION_FORCED - bye".into(),
                class_id: 0,
                method_id: 0,
            },
        );
        let _ = tx.send(until_eof(&mut conn));
    });
    let before = virtual_memory();
    let grown = Rc::new(RefCell::new(None));
    let g = grown.clone();
    let (conn, outcome) = run_client(&fake, move |ch, outcome| {
        consume(ch, outcome);
        let o = outcome.clone();
        ch.connection()
            .unwrap()
            .ioloop()
            .call_later(Duration::from_millis(300), move || {
                // The loop runs while the rest of the body never comes.
                *g.borrow_mut() = Some(virtual_memory().saturating_sub(before));
                o.push(Event::Alive);
                alive_tx.send(()).unwrap();
            });
    });
    let error = assert_clean(&conn, &outcome);
    fake.join();
    assert!(
        matches!(
            &error,
            Error::ConnectionClosedByBroker {
                reply_code: 320,
                ..
            }
        ),
        "{error:?}"
    );
    let events = outcome.events();
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::Opened,
                Event::ChannelOpened,
                Event::Consuming,
                Event::Alive,
                Event::ChannelClosed(_),
                Event::Closed(_)
            ]
        ),
        "{events:?}"
    );
    // Not a byte of the announced size was reserved beyond a bound (the
    // loose limit allows for other tests' threads in this process).
    let grown = grown.borrow().expect("measured");
    assert!(grown < 1 << 30, "virtual memory grew by {grown} bytes");
    let frames = rx.recv().unwrap();
    assert!(
        matches!(
            frames.as_slice(),
            [OwnedFrame::Method(0, Method::ConnectionCloseOk(_))]
        ),
        "the client answered the broker's Close: {frames:?}"
    );
}

// ----------------------------------------------------------------------
// Broken field tables in a delivery's headers (RELIABILITY 18)
// ----------------------------------------------------------------------

/// What a consumer received of one delivery whose headers are `table`
/// (raw bytes, length prefix included), after acking it from the
/// consumer callback and closing the connection normally. Checks the
/// broker's side saw the ack, then the client's own close.
fn delivery_with_raw_headers(table: &[u8]) -> pika::Delivery {
    let mut bytes = deliver(TAG, 1);
    bytes.extend(header_with_raw_headers(4, table));
    bytes.extend(body_frame(b"body"));
    let fake = FakeBroker::start(move |mut conn| {
        open_consumer(&mut conn);
        conn.send_raw(&bytes);
        let ack = conn.expect::<basic::Ack>(1);
        assert_eq!(ack.delivery_tag, 1, "the client acked the delivery");
        serve_close(&mut conn);
    });
    let received = Rc::new(RefCell::new(None));
    let got = received.clone();
    let (conn, outcome) = run_client(&fake, move |ch, _| {
        ch.basic_consume(
            "q",
            move |ch, d| {
                ch.basic_ack(d.method.delivery_tag, false).unwrap();
                *got.borrow_mut() = Some(d);
                ch.connection().unwrap().close(200, "done").unwrap();
            },
            BasicConsumeOptions {
                consumer_tag: Some(TAG.into()),
                ..Default::default()
            },
            |_, r| {
                r.expect("consuming");
            },
        )
        .unwrap();
    });
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(
            error,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "the connection stayed open until the client closed it: {error:?}"
    );
    fake.join();
    let delivery = received.borrow_mut().take();
    delivery.expect("the message was delivered")
}

/// Checks a delivery carries an unreadable-headers report whose root
/// error matches, the raw property bytes, and the body.
#[track_caller]
fn assert_unreadable_headers(
    delivery: &pika::Delivery,
    table: &[u8],
    root: impl Fn(&CodecError) -> bool,
) {
    assert_eq!(delivery.body, b"body");
    assert_eq!(delivery.properties.headers, None);
    let problem = delivery
        .properties_error
        .as_ref()
        .expect("the delivery says its properties did not decode");
    assert!(root(problem.error.root()), "{:?}", problem.error);
    assert!(
        problem.error.to_string().contains("headers"),
        "{}",
        problem.error
    );
    let mut raw = BasicProperties::FLAG_HEADERS.to_be_bytes().to_vec();
    raw.extend_from_slice(table);
    assert_eq!(problem.raw_properties, raw);
}

#[test]
fn headers_with_an_unknown_field_type_are_delivered_as_unreadable_and_the_connection_stays_open() {
    // {"k": 'Z' ...}
    let table = raw_table(&[1, b'k', b'Z', 0, 0, 0, 0]);
    let d = delivery_with_raw_headers(&table);
    assert_unreadable_headers(&d, &table, |e| {
        matches!(e, CodecError::UnknownFieldType { tag: b'Z' })
    });
}

#[test]
fn headers_claiming_a_huge_table_length_close_with_502() {
    // The table's own length overruns the frame: where the next property
    // starts is lost, so this stays a connection error.
    let mut table = 0xFFFF_FFF0u32.to_be_bytes().to_vec();
    table.extend_from_slice(&[1, b'k', b'V']);
    let mut bytes = deliver(TAG, 1);
    bytes.extend(header_with_raw_headers(4, &table));
    bytes.extend(body_frame(b"body"));
    let (error, _, frames) = consumer_receives(bytes);
    let e = protocol_error(&error, &frames, 502);
    assert!(matches!(e, CodecError::Truncated { .. }), "{e:?}");
}

#[test]
fn headers_with_a_huge_long_string_length_are_delivered_as_unreadable() {
    let mut entry = vec![1, b'k', b'S'];
    entry.extend_from_slice(&0x7FFF_FFFFu32.to_be_bytes());
    entry.extend_from_slice(b"short");
    let table = raw_table(&entry);
    let d = delivery_with_raw_headers(&table);
    assert_unreadable_headers(&d, &table, |e| matches!(e, CodecError::Truncated { .. }));
}

#[test]
fn headers_with_a_negative_byte_array_length_are_delivered_as_unreadable() {
    let mut entry = vec![1, b'k', b'x'];
    entry.extend_from_slice(&(-1i32).to_be_bytes());
    entry.extend_from_slice(b"abc");
    let table = raw_table(&entry);
    let d = delivery_with_raw_headers(&table);
    assert_unreadable_headers(&d, &table, |e| matches!(e, CodecError::Truncated { .. }));
}

#[test]
fn headers_nested_too_deep_are_delivered_as_unreadable() {
    fn nest(depth: usize) -> Vec<u8> {
        if depth == 0 {
            return raw_table(&[]);
        }
        let mut entry = vec![1, b'k', b'F'];
        entry.extend(nest(depth - 1));
        raw_table(&entry)
    }
    let table = nest(pika::table::MAX_TABLE_DEPTH + 8);
    let d = delivery_with_raw_headers(&table);
    assert_unreadable_headers(&d, &table, |e| matches!(e, CodecError::TableTooDeep { .. }));
}

#[test]
fn headers_with_an_array_claiming_more_than_the_table_holds_are_delivered_as_unreadable() {
    let mut entry = vec![1, b'k', b'A'];
    entry.extend_from_slice(&1000u32.to_be_bytes());
    entry.extend_from_slice(&[b'I', 0, 0, 0, 1]);
    let table = raw_table(&entry);
    let d = delivery_with_raw_headers(&table);
    assert_unreadable_headers(&d, &table, |e| matches!(e, CodecError::Truncated { .. }));
}

#[test]
fn a_returned_message_with_unreadable_headers_reaches_the_return_callback() {
    // Only the publishing connection sees a Basic.Return: the fake broker
    // returns the client's mandatory publish with a broken headers table.
    let table = raw_table(&[1, b'k', b'Z', 0, 0, 0, 0]);
    let raw_headers = table.clone();
    let fake = FakeBroker::start(move |mut conn| {
        open_channel(&mut conn);
        assert_eq!(read_publish(&mut conn), b"body");
        let mut bytes = method_frame(
            1,
            basic::Return {
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
                exchange: "".into(),
                routing_key: "nowhere".into(),
            },
        );
        bytes.extend(header_with_raw_headers(4, &raw_headers));
        bytes.extend(body_frame(b"body"));
        conn.send_raw(&bytes);
        serve_close(&mut conn);
    });
    let returned = Rc::new(RefCell::new(None));
    let got = returned.clone();
    let (conn, outcome) = run_client(&fake, move |ch, _| {
        ch.add_on_return_callback(move |ch, m| {
            *got.borrow_mut() = Some(m.clone());
            ch.connection().unwrap().close(200, "done").unwrap();
        });
        ch.basic_publish("", "nowhere", b"body", &BasicProperties::default(), true)
            .unwrap();
    });
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(
            error,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "{error:?}"
    );
    fake.join();
    let m = returned
        .borrow_mut()
        .take()
        .expect("the return callback ran");
    assert_eq!(m.method.reply_code, 312);
    assert_eq!(m.body, b"body");
    let problem = m.properties_error.expect("unreadable properties reported");
    assert!(
        matches!(
            problem.error.root(),
            CodecError::UnknownFieldType { tag: b'Z' }
        ),
        "{:?}",
        problem.error
    );
}

#[test]
fn a_got_message_with_unreadable_headers_reaches_the_get_callback() {
    let table = raw_table(&[1, b'k', b'Z', 0, 0, 0, 0]);
    let raw_headers = table.clone();
    let fake = FakeBroker::start(move |mut conn| {
        open_channel(&mut conn);
        conn.expect::<basic::Get>(1);
        let mut bytes = method_frame(
            1,
            basic::GetOk {
                delivery_tag: 1,
                routing_key: "q".into(),
                message_count: 0,
                ..Default::default()
            },
        );
        bytes.extend(header_with_raw_headers(4, &raw_headers));
        bytes.extend(body_frame(b"body"));
        conn.send_raw(&bytes);
        let ack = conn.expect::<basic::Ack>(1);
        assert_eq!(ack.delivery_tag, 1);
        serve_close(&mut conn);
    });
    let got = Rc::new(RefCell::new(None));
    let slot = got.clone();
    let (conn, outcome) = run_client(&fake, move |ch, _| {
        ch.basic_get("q", false, move |ch, r| {
            let m = r.expect("get ok").expect("a message");
            ch.basic_ack(m.method.delivery_tag, false).unwrap();
            *slot.borrow_mut() = Some(m);
            ch.connection().unwrap().close(200, "done").unwrap();
        })
        .unwrap();
    });
    let error = assert_clean(&conn, &outcome);
    assert!(
        matches!(
            error,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "{error:?}"
    );
    fake.join();
    let m = got.borrow_mut().take().expect("the get callback ran");
    assert_eq!(m.body, b"body");
    let problem = m.properties_error.expect("unreadable properties reported");
    let mut raw = BasicProperties::FLAG_HEADERS.to_be_bytes().to_vec();
    raw.extend_from_slice(&table);
    assert_eq!(problem.raw_properties, raw);
}

// ----------------------------------------------------------------------
// Deliveries for no consumer
// ----------------------------------------------------------------------

#[test]
fn a_delivery_for_an_unknown_consumer_tag_is_dropped_and_the_channel_goes_on() {
    let fake = FakeBroker::start(|mut conn| {
        open_consumer(&mut conn);
        let mut bytes = deliver("nobody", 1);
        bytes.extend(header_frame(60, 7));
        bytes.extend(body_frame(b"dropped"));
        bytes.extend(deliver(TAG, 2));
        bytes.extend(header_frame(60, 9));
        bytes.extend(body_frame(b"delivered"));
        conn.send_raw(&bytes);
        serve_close(&mut conn);
    });
    let (conn, outcome) = run_client(&fake, |ch, outcome| {
        let o = outcome.clone();
        ch.basic_consume(
            "q",
            move |ch, d| {
                assert_eq!(d.method.consumer_tag, TAG);
                o.push(Event::Message(d.body));
                ch.connection().unwrap().close(200, "done").unwrap();
            },
            BasicConsumeOptions {
                consumer_tag: Some(TAG.into()),
                ..Default::default()
            },
            |_, r| {
                r.unwrap();
            },
        )
        .unwrap();
    });
    let error = assert_clean(&conn, &outcome);
    fake.join();
    assert!(
        matches!(
            error,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "{error:?}"
    );
    let messages: Vec<Vec<u8>> = outcome
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(body) => Some(body),
            _ => None,
        })
        .collect();
    assert_eq!(messages, [b"delivered".to_vec()]);
}

// ----------------------------------------------------------------------
// Confirms and pending requests when the channel goes away
// ----------------------------------------------------------------------

/// Reads one published message (method, header, body frames) on channel 1.
fn read_publish(conn: &mut FakeConn) -> Vec<u8> {
    let (ch, method) = conn.read_method();
    assert!(
        matches!((ch, &method), (1, Method::BasicPublish(_))),
        "{method:?}"
    );
    let OwnedFrame::Header(1, header) = conn.read_frame() else {
        panic!("fake broker: expected a content header");
    };
    let mut body = Vec::new();
    while (body.len() as u64) < header.body_size {
        let OwnedFrame::Body(1, part) = conn.read_frame() else {
            panic!("fake broker: expected a body frame");
        };
        body.extend(part);
    }
    body
}

/// The confirms, messages and channel closes among `events`, one line
/// each, in order.
fn confirm_lines(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(body) => Some(format!("message {body:?}")),
            Event::Confirm(Confirmation::Ack {
                delivery_tag,
                multiple,
                settled,
            }) => Some(format!(
                "ack {delivery_tag} multiple={multiple} settled {settled:?}"
            )),
            Event::Confirm(Confirmation::Nack {
                delivery_tag,
                multiple,
                settled,
            }) => Some(format!(
                "nack {delivery_tag} multiple={multiple} settled {settled:?}"
            )),
            Event::Confirm(Confirmation::Failed { settled, error }) => Some(format!(
                "failed {settled:?} {}",
                error.reply_code().unwrap_or(0)
            )),
            Event::ChannelClosed(e) => {
                Some(format!("channel closed {}", e.reply_code().unwrap_or(0)))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_broker_channel_close_fails_exactly_the_unconfirmed_publishes_in_one_call_before_the_close_callback()
 {
    let fake = FakeBroker::start(|mut conn| {
        open_channel(&mut conn);
        conn.expect::<confirm::Select>(1);
        conn.send_method(1, confirm::SelectOk {});
        for i in 1..=6u8 {
            assert_eq!(read_publish(&mut conn), [i]);
        }
        conn.send_method(
            1,
            basic::Ack {
                delivery_tag: 3,
                multiple: true,
            },
        );
        conn.send_method(
            1,
            basic::Nack {
                delivery_tag: 5,
                multiple: false,
                requeue: false,
            },
        );
        conn.send_method(
            1,
            channel::Close {
                reply_code: 404,
                reply_text: "NOT_FOUND - scripted".into(),
                class_id: 50,
                method_id: 10,
            },
        );
        conn.expect::<channel::CloseOk>(1);
        serve_close(&mut conn);
    });
    let (conn, outcome) = run_client(&fake, |ch, outcome| {
        let o = outcome.clone();
        ch.confirm_delivery(
            move |_, c| o.push(Event::Confirm(c)),
            |ch, r| {
                r.unwrap();
                for i in 1..=6u8 {
                    let tag = ch.basic_publish("", "q", [i], &BasicProperties::default(), false);
                    assert_eq!(tag.unwrap(), Some(u64::from(i)));
                }
            },
        )
        .unwrap();
        ch.add_on_close_callback(|ch, _| {
            assert!(ch.unconfirmed_delivery_tags().is_empty());
            ch.connection().unwrap().close(200, "done").unwrap();
        });
    });
    let events = outcome.events();
    fake.join();
    let settled = confirm_lines(&events);
    assert_eq!(
        settled,
        [
            "ack 3 multiple=true settled [1, 2, 3]",
            "nack 5 multiple=false settled [5]",
            "failed [4, 6] 404",
            "channel closed 404"
        ]
    );
    assert!(matches!(
        events.last(),
        Some(Event::Closed(Error::ConnectionClosedByClient { .. }))
    ));
    assert!(conn.is_closed());
}

#[test]
fn returns_and_confirms_the_broker_sends_before_its_close_ok_are_reported_not_failed() {
    // The client closes its channel right after publishing; the broker
    // answers with a return (tag 2), an ack up to tag 3 and a delivery
    // before its CloseOk. The return and the acks count (pika keeps its
    // callbacks until the CloseOk); only tag 4 is failed; the delivery of
    // a closing channel is dropped.
    let fake = FakeBroker::start(|mut conn| {
        open_channel(&mut conn);
        conn.expect::<confirm::Select>(1);
        conn.send_method(1, confirm::SelectOk {});
        for i in 1..=4u8 {
            assert_eq!(read_publish(&mut conn), [i]);
        }
        conn.expect::<channel::Close>(1);
        conn.send_message(
            1,
            basic::Return {
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
                exchange: "".into(),
                routing_key: "nowhere".into(),
            },
            &BasicProperties::default(),
            &[2],
        );
        conn.send_method(
            1,
            basic::Ack {
                delivery_tag: 3,
                multiple: true,
            },
        );
        conn.send_message(
            1,
            basic::Deliver {
                consumer_tag: "ctag".into(),
                delivery_tag: 1,
                redelivered: false,
                exchange: "".into(),
                routing_key: "q".into(),
            },
            &BasicProperties::default(),
            b"late",
        );
        conn.send_method(1, channel::CloseOk {});
        serve_close(&mut conn);
    });
    let (conn, outcome) = run_client(&fake, |ch, outcome| {
        let o = outcome.clone();
        ch.confirm_delivery(
            move |_, c| o.push(Event::Confirm(c)),
            |ch, r| {
                r.unwrap();
                for i in 1..=4u8 {
                    let mandatory = i == 2;
                    ch.basic_publish("", "q", [i], &BasicProperties::default(), mandatory)
                        .unwrap();
                }
                ch.close(200, "done").unwrap();
            },
        )
        .unwrap();
        let o = outcome.clone();
        ch.add_on_return_callback(move |_, m| o.push(Event::Message(m.body.clone())));
        ch.add_on_close_callback(|ch, _| {
            ch.connection().unwrap().close(200, "done").unwrap();
        });
    });
    let events = outcome.events();
    fake.join();
    let seen = confirm_lines(&events);
    assert_eq!(
        seen,
        [
            "message [2]",
            "ack 3 multiple=true settled [1, 2, 3]",
            "failed [4] 200",
            "channel closed 200"
        ]
    );
    assert!(conn.is_closed());
}

#[test]
fn a_lost_stream_completes_every_pending_request_once_in_order_and_fails_unconfirmed_publishes() {
    let fake = FakeBroker::start(|mut conn| {
        open_channel(&mut conn);
        conn.expect::<confirm::Select>(1);
        conn.send_method(1, confirm::SelectOk {});
        conn.expect::<queue::Declare>(1);
        // The first declare is in flight, the rest queued: the stream ends.
        conn.close_socket();
    });
    let (conn, outcome) = run_client(&fake, |ch, outcome| {
        let o = outcome.clone();
        ch.confirm_delivery(
            move |_, c| o.push(Event::Confirm(c)),
            |_, r| {
                r.unwrap();
            },
        )
        .unwrap();
        for name in ["declare 1", "declare 2", "declare 3"] {
            let o = outcome.clone();
            ch.queue_declare(
                "q",
                QueueDeclareOptions::default(),
                FieldTable::new(),
                move |_, r| o.push(Event::Completion(name, r.map(drop))),
            )
            .unwrap();
        }
        for i in 1..=2u8 {
            ch.basic_publish("", "q", [i], &BasicProperties::default(), false)
                .unwrap();
        }
    });
    let error = assert_clean(&conn, &outcome);
    fake.join();
    assert!(matches!(error, Error::StreamLost { .. }), "{error:?}");
    let seen: Vec<String> = outcome
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Completion(name, Err(Error::StreamLost { .. })) => Some(name.to_string()),
            Event::Completion(name, other) => panic!("{name}: {other:?}"),
            Event::Confirm(Confirmation::Failed {
                settled,
                error: Error::StreamLost { .. },
            }) => Some(format!("failed {settled:?}")),
            Event::Confirm(other) => panic!("{other:?}"),
            Event::ChannelClosed(_) => Some("channel closed".into()),
            Event::Closed(_) => Some("connection closed".into()),
            _ => None,
        })
        .collect();
    assert_eq!(
        seen,
        [
            "declare 1",
            "declare 2",
            "declare 3",
            "failed [1, 2]",
            "channel closed",
            "connection closed"
        ]
    );
}

#[test]
fn a_broker_close_mid_content_is_answered_and_reported_cleanly() {
    // Connection.Close on channel 0 may come between a delivery's frames
    // on channel 1: the client answers it and reports the broker's words.
    let (tx, rx) = mpsc::channel();
    let fake = FakeBroker::start(move |mut conn| {
        open_consumer(&mut conn);
        let mut bytes = deliver(TAG, 1);
        bytes.extend(header_frame(60, 10));
        bytes.extend(body_frame(b"01234"));
        bytes.extend(method_frame(
            0,
            connection::Close {
                reply_code: 320,
                reply_text: "CONNECTION_FORCED - shutdown".into(),
                class_id: 0,
                method_id: 0,
            },
        ));
        conn.send_raw(&bytes);
        let _ = tx.send(until_eof(&mut conn));
    });
    let started = Instant::now();
    let (conn, outcome) = run_client(&fake, consume);
    let error = assert_clean(&conn, &outcome);
    fake.join();
    assert!(started.elapsed() < LIMIT);
    assert!(
        matches!(&error, Error::ConnectionClosedByBroker { reply_code: 320, reply_text } if reply_text == "CONNECTION_FORCED - shutdown"),
        "{error:?}"
    );
    let frames = rx.recv().unwrap();
    assert!(
        matches!(
            frames.as_slice(),
            [OwnedFrame::Method(0, Method::ConnectionCloseOk(_))]
        ),
        "{frames:?}"
    );
}

// ----------------------------------------------------------------------
// Channel.Flow from the broker (RabbitMQ never sends it)
// ----------------------------------------------------------------------

#[test]
fn a_broker_channel_flow_is_answered_with_flow_ok_and_reaches_the_flow_callbacks() {
    let (tx, rx) = mpsc::channel();
    let fake = FakeBroker::start(move |mut conn| {
        open_channel(&mut conn);
        let mut answers = Vec::new();
        for active in [false, true] {
            conn.send_method(1, channel::Flow { active });
            answers.push(conn.expect::<channel::FlowOk>(1).active);
        }
        let _ = tx.send(answers);
        serve_close(&mut conn);
    });
    let seen = Rc::new(RefCell::new(Vec::new()));
    let s = seen.clone();
    let (conn, outcome) = run_client(&fake, move |ch, _| {
        let s2 = s.clone();
        ch.add_on_flow_callback(move |_, active| s2.borrow_mut().push(format!("first {active}")));
        ch.add_on_flow_callback(move |ch, active| {
            s.borrow_mut().push(format!("second {active}"));
            if active {
                // From inside the callback: the channel and connection are usable.
                ch.connection().unwrap().close(200, "done").unwrap();
            }
        });
    });
    let error = assert_clean(&conn, &outcome);
    fake.join();
    assert!(
        matches!(
            error,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(
        rx.recv().unwrap(),
        [false, true],
        "each Flow answered with its state"
    );
    assert_eq!(
        *seen.borrow(),
        ["first false", "second false", "first true", "second true"]
    );
}

#[test]
fn an_unsolicited_reply_on_an_open_channel_closes_with_505() {
    let (error, _, frames) = consumer_receives(method_frame(
        1,
        queue::DeclareOk {
            queue: "nobody-asked".into(),
            message_count: 0,
            consumer_count: 0,
        },
    ));
    assert_unexpected_frame(&error, &frames, "Queue.DeclareOk on channel 1");
}

#[test]
fn a_connection_method_on_an_open_channel_closes_with_505() {
    let (error, _, frames) = consumer_receives(method_frame(
        1,
        connection::Blocked {
            reason: "wrong channel".into(),
        },
    ));
    assert_unexpected_frame(&error, &frames, "Connection.Blocked on channel 1");
}
