//! Messages other clients publish that our decoder once refused, through
//! the real broker (RELIABILITY.md 18): Python pika 1.3.2's `L` header
//! values and a content type that is not UTF-8, published as the exact
//! bytes pika 1.3.2 writes (`tests/golden/make_golden_pika132.py`) by a
//! raw-frame publisher, then consumed and fetched with `SelectConnection`.
//! The connection stays open, the message is delivered (with
//! `properties_error` where a property did not decode) and can be acked.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use common::{RawSession, broker_params, run_loop};
use pika::spec::{Method, queue};
use pika::{
    BasicConsumeOptions, Channel, CodecError, Delivery, Error, FieldTable, FieldValue, GetMessage,
    SelectConnection,
};

const LIMIT: Duration = Duration::from_secs(20);

fn golden(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let text = text.trim();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// Declares a fresh queue and publishes one message into it with the
/// golden content header `header` and the body `b"body"`, with raw frames.
fn publish_golden(header: &str, tag: &str) -> String {
    let queue = format!("foreign-{tag}-{}", std::process::id());
    let mut raw = RawSession::open_handshaken(FieldTable::new(), "raw publisher");
    raw.send(2, pika::spec::channel::Open::default());
    assert!(matches!(raw.read_method(), (2, Method::ChannelOpenOk(_))));
    raw.send(
        2,
        queue::Declare {
            queue: queue.clone(),
            auto_delete: false,
            ..Default::default()
        },
    );
    assert!(matches!(raw.read_method(), (2, Method::QueueDeclareOk(_))));
    raw.publish_raw_header(1, &queue, &golden(header), b"body");
    raw.close();
    queue
}

/// What one connection does with the queue: `on_channel` gets the channel
/// and must eventually close the connection; returns how it ended.
fn with_channel(on_channel: impl FnOnce(Channel) + 'static) -> Error {
    let ended = Rc::new(RefCell::new(None));
    let slot = ended.clone();
    let conn = SelectConnection::new(
        broker_params(),
        move |conn| {
            conn.channel(None, move |r| on_channel(r.expect("channel opens")))
                .expect("open");
        },
        |conn, e| {
            conn.ioloop().stop();
            panic!("cannot connect: {e}");
        },
        move |conn, e| {
            *slot.borrow_mut() = Some(e);
            conn.ioloop().stop();
        },
    )
    .unwrap();
    run_loop(conn.ioloop(), LIMIT);
    let end = ended.borrow_mut().take();
    end.expect("the connection ended")
}

/// Consumes the one message in `queue` with manual acks, acks it, checks
/// the queue is then empty, and closes. Returns the delivery.
fn consume_one(queue: String) -> Delivery {
    let got = Rc::new(RefCell::new(None));
    let slot = got.clone();
    let ended = with_channel(move |ch| {
        let q = queue.clone();
        ch.basic_consume(
            &queue,
            move |ch, d| {
                ch.basic_ack(d.method.delivery_tag, false).unwrap();
                *slot.borrow_mut() = Some(d);
                // The ack went out before this declare: the queue is empty.
                ch.queue_delete(&q, Default::default(), |ch, r| {
                    let ok = r.expect("queue deleted");
                    assert_eq!(ok.message_count, 0, "the ack removed the message");
                    ch.connection().unwrap().close(200, "done").unwrap();
                })
                .unwrap();
            },
            BasicConsumeOptions::default(),
            |_, r| {
                r.expect("consuming");
            },
        )
        .unwrap();
    });
    assert!(
        matches!(
            ended,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "the connection stayed open until we closed it: {ended:?}"
    );
    let d = got.borrow_mut().take();
    d.expect("the message was delivered")
}

/// Fetches the one message in `queue` with basic_get, acks it, checks the
/// queue is then empty, and closes.
fn get_one(queue: String) -> GetMessage {
    let got = Rc::new(RefCell::new(None));
    let slot = got.clone();
    let ended = with_channel(move |ch| {
        let q = queue.clone();
        ch.basic_get(&queue, false, move |ch, r| {
            let m = r.expect("get").expect("a message");
            ch.basic_ack(m.method.delivery_tag, false).unwrap();
            *slot.borrow_mut() = Some(m);
            ch.queue_delete(&q, Default::default(), |ch, r| {
                assert_eq!(r.expect("deleted").message_count, 0);
                ch.connection().unwrap().close(200, "done").unwrap();
            })
            .unwrap();
        })
        .unwrap();
    });
    assert!(
        matches!(
            ended,
            Error::ConnectionClosedByClient {
                reply_code: 200,
                ..
            }
        ),
        "{ended:?}"
    );
    let m = got.borrow_mut().take();
    m.expect("the message was fetched")
}

#[track_caller]
fn assert_long_l_headers(headers: Option<&FieldTable>) {
    let headers = headers.expect("headers");
    assert_eq!(headers.get("big-neg"), Some(&FieldValue::I64(-(1 << 40))));
    assert_eq!(
        headers.get("small-neg"),
        Some(&FieldValue::I64(-(1i64 << 31) - 1))
    );
    assert_eq!(headers.get("x"), Some(&FieldValue::I32(5)));
}

#[test]
fn a_pika_1_3_2_message_with_long_l_headers_is_consumed_and_acked() {
    let d = consume_one(publish_golden("pika132_header_long_l.hex", "l-consume"));
    assert_eq!(d.properties_error, None);
    assert_eq!(d.body, b"body");
    assert_eq!(d.properties.content_type.as_deref(), Some("text/plain"));
    assert_long_l_headers(d.properties.headers.as_ref());
}

#[test]
fn a_pika_1_3_2_message_with_long_l_headers_is_fetched_and_acked() {
    let m = get_one(publish_golden("pika132_header_long_l.hex", "l-get"));
    assert_eq!(m.properties_error, None);
    assert_eq!(m.body, b"body");
    assert_long_l_headers(m.properties.headers.as_ref());
}

#[track_caller]
fn assert_raw_content_type(
    properties: &pika::BasicProperties,
    problem: Option<&pika::PropertiesError>,
) {
    assert_eq!(properties.content_type, None);
    let problem = problem.expect("the unreadable content type is reported");
    assert!(
        matches!(problem.error.root(), CodecError::InvalidUtf8 { .. }),
        "{:?}",
        problem.error
    );
    assert!(
        problem.error.to_string().contains("content_type"),
        "{}",
        problem.error
    );
    // RabbitMQ passed pika's bytes through unchanged.
    assert_eq!(problem.raw_properties, [0x80, 0x00, 0x01, 0xFF]);
}

#[test]
fn a_content_type_that_is_not_utf8_is_consumed_with_properties_error_and_acked() {
    let d = consume_one(publish_golden("pika132_header_ctype_ff.hex", "ff-consume"));
    assert_eq!(d.body, b"body");
    assert_raw_content_type(&d.properties, d.properties_error.as_ref());
}

#[test]
fn a_content_type_that_is_not_utf8_is_fetched_with_properties_error_and_acked() {
    let m = get_one(publish_golden("pika132_header_ctype_ff.hex", "ff-get"));
    assert_eq!(m.body, b"body");
    assert_raw_content_type(&m.properties, m.properties_error.as_ref());
}
