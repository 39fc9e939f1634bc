//! Byte-exact golden vectors made by an independent implementation (Python
//! pika 1.4.4, see `tests/golden/make_golden.py`): our encoder must produce
//! the same bytes, and our decoder must read them back to the same values.
//!
//! pika never produces the field types `b B s u i f d` (and refuses floats
//! altogether); those are covered by the unit round trips and, against the
//! real broker, by `tests/broker_rig.rs`'s Connection.Start decode.

use pika::frame::{FRAME_MIN_SIZE, Frame, encode_message, encode_method, parse_frame};
use pika::spec::{Method, basic, connection};
use pika::{BasicProperties, Decimal, FieldTable, FieldValue, LongString};

fn golden(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let text = text.trim();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn capabilities() -> FieldTable {
    [
        "authentication_failure_close",
        "basic.nack",
        "connection.blocked",
        "consumer_cancel_notify",
        "publisher_confirms",
    ]
    .into_iter()
    .map(|k| (k, true))
    .collect()
}

fn start_ok() -> connection::StartOk {
    let mut props = FieldTable::new();
    props.insert("product", "pika-rs-golden");
    props.insert("version", "1.0");
    props.insert("platform", "Rust");
    props.insert("capabilities", capabilities());
    props.insert("information", "golden vector");
    connection::StartOk {
        client_properties: props,
        mechanism: "PLAIN".into(),
        response: LongString::from("\0guest\0guest"),
        locale: "en_US".into(),
    }
}

#[test]
fn connection_start_ok_matches_pika_byte_for_byte() {
    let expected = golden("connection_start_ok.hex");
    let mut ours = Vec::new();
    encode_method(&mut ours, 0, &start_ok().into(), FRAME_MIN_SIZE).unwrap();
    assert_eq!(ours, expected);

    let (frame, used) = parse_frame(&expected, FRAME_MIN_SIZE).unwrap().unwrap();
    assert_eq!(used, expected.len());
    assert_eq!(
        frame,
        Frame::Method {
            channel: 0,
            method: start_ok().into()
        }
    );
}

fn publish_properties() -> BasicProperties {
    let mut headers = FieldTable::new();
    headers.insert("x-int", 42i32);
    headers.insert("x-str", "v");
    BasicProperties {
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        headers: Some(headers),
        delivery_mode: Some(2),
        priority: Some(7),
        correlation_id: Some("corr-1".into()),
        reply_to: Some("reply.q".into()),
        expiration: Some("60000".into()),
        message_id: Some("msg-1".into()),
        timestamp: Some(1_700_000_000),
        kind: Some("golden.type".into()),
        user_id: Some("guest".into()),
        app_id: Some("pika-golden".into()),
        cluster_id: Some("cluster-x".into()),
    }
}

const BODY: &[u8] = br#"{"hello": "golden world"}"#;

#[test]
fn basic_publish_with_all_14_properties_matches_pika_byte_for_byte() {
    let expected = golden("basic_publish.hex");
    let publish = basic::Publish {
        exchange: "amq.direct".into(),
        routing_key: "golden.key".into(),
        mandatory: true,
        immediate: false,
        ..Default::default()
    };
    let mut ours = Vec::new();
    encode_message(
        &mut ours,
        1,
        &publish.clone().into(),
        &publish_properties(),
        BODY,
        FRAME_MIN_SIZE,
    )
    .unwrap();
    assert_eq!(ours, expected);

    let mut rest = &expected[..];
    let mut frames = Vec::new();
    while let Some((frame, used)) = parse_frame(rest, FRAME_MIN_SIZE).unwrap() {
        frames.push(frame);
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    assert_eq!(frames.len(), 3);
    assert_eq!(
        frames[0],
        Frame::Method {
            channel: 1,
            method: Method::BasicPublish(publish)
        }
    );
    let Frame::Header { channel: 1, header } = &frames[1] else {
        panic!("{:?}", frames[1])
    };
    assert_eq!(header.body_size, BODY.len() as u64);
    assert_eq!(header.properties, publish_properties());
    assert_eq!(header.properties.flags(), 0xFFFC);
    assert_eq!(
        frames[2],
        Frame::Body {
            channel: 1,
            payload: BODY
        }
    );
}

fn every_pika_type_table() -> FieldTable {
    let mut deeper = FieldTable::new();
    deeper.insert("n", 1i32);
    let mut table = FieldTable::new();
    table.insert("nested", "yes");
    table.insert("deeper", deeper);
    let mut in_array = FieldTable::new();
    in_array.insert("k", "v");

    let mut t = FieldTable::new();
    t.insert("bool_t", true);
    t.insert("bool_f", false);
    t.insert("int", 123i32);
    t.insert("neg", -5i32);
    t.insert("long", 1i64 << 40);
    t.insert("neg_long", -(1i64 << 40));
    t.insert(
        "decimal",
        Decimal {
            scale: 2,
            value: 314,
        },
    );
    // 2020-01-02T03:04:05Z
    t.insert("timestamp", FieldValue::Timestamp(1_577_934_245));
    t.insert("string", "hello");
    t.insert("unicode", "grüße");
    t.insert("bytes", FieldValue::ByteArray(vec![0x00, 0x01, 0xff]));
    t.insert(
        "array",
        vec![
            FieldValue::I32(1),
            "two".into(),
            FieldValue::Bool(true),
            FieldValue::Void,
            FieldValue::Table(in_array),
        ],
    );
    t.insert("table", table);
    t.insert("void", FieldValue::Void);
    t
}

#[test]
fn field_table_of_every_type_pika_encodes_matches_byte_for_byte() {
    let expected = golden("field_table.hex");
    let mut ours = Vec::new();
    every_pika_type_table().encode(&mut ours).unwrap();
    assert_eq!(ours, expected);

    let (decoded, used) = FieldTable::decode(&expected).unwrap();
    assert_eq!(used, expected.len());
    assert_eq!(decoded, every_pika_type_table());
    let tags: String = decoded.iter().map(|(_, v)| v.tag() as char).collect();
    assert_eq!(tags, "ttIIllDTSSxAFV");
}

// ----------------------------------------------------------------------
// pika 1.3.2's `L` and raw-octet short strings (tests/golden/make_golden_pika132.py)
// ----------------------------------------------------------------------

fn pika132_header(name: &str) -> pika::frame::ContentHeader {
    let bytes = golden(name);
    match parse_frame(&bytes, FRAME_MIN_SIZE).unwrap().unwrap() {
        (Frame::Header { channel: 1, header }, used) if used == bytes.len() => header,
        other => panic!("{name} is not one content header frame: {other:?}"),
    }
}

#[test]
fn pika_1_3_2_long_l_headers_decode_as_i64_and_reencode_as_l() {
    let header = pika132_header("pika132_header_long_l.hex");
    assert_eq!(header.properties_error, None);
    assert_eq!(header.body_size, 4);
    let props = &header.properties;
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    let headers = props.headers.as_ref().expect("headers");
    assert_eq!(headers.get("big-neg"), Some(&FieldValue::I64(-(1 << 40))));
    assert_eq!(
        headers.get("small-neg"),
        Some(&FieldValue::I64(-(1i64 << 31) - 1))
    );
    assert_eq!(headers.get("x"), Some(&FieldValue::I32(5)));
    // 2^63 + 5 was packed unsigned under `l`: it reads back negative, as
    // RabbitMQ reads it.
    assert_eq!(
        headers.get("huge"),
        Some(&FieldValue::I64(((1u64 << 63) + 5) as i64))
    );
    // Written back, the `L` entries carry `l` and nothing else changes.
    let mut ours = Vec::new();
    pika::frame::encode_content_header(&mut ours, 1, 60, 4, props, FRAME_MIN_SIZE).unwrap();
    let expected: Vec<u8> = {
        let mut b = golden("pika132_header_long_l.hex");
        for key in [&b"\x07big-neg"[..], &b"\x09small-neg"[..]] {
            let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
            assert_eq!(b[at], b'L');
            b[at] = b'l';
        }
        b
    };
    assert_eq!(ours, expected);
}

#[test]
fn pika_1_3_2_raw_octet_content_type_is_reported_not_fatal() {
    let header = pika132_header("pika132_header_ctype_ff.hex");
    assert_eq!(header.body_size, 4);
    assert_eq!(header.properties.content_type, None);
    let problem = header
        .properties_error
        .expect("the bad content_type is reported");
    assert!(
        problem.error.to_string().contains("content_type"),
        "{}",
        problem.error
    );
    assert_eq!(problem.raw_properties, [0x80, 0x00, 0x01, 0xFF]);
}
