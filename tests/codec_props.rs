//! Property tests of the codec on stable Rust: arbitrary bytes given to the
//! frame parser, the method, header and table decoders give errors or
//! values, never panics or hangs; encode → decode round-trips arbitrary
//! tables; a valid stream cut anywhere decodes as the uncut one.
//!
//! The case count is bounded (set `PROPTEST_CASES` to run more locally);
//! `cargo fuzz` targets are not part of CI.

use proptest::prelude::*;

use pika::frame::{
    FRAME_MIN_SIZE, Frame, decode_content_header, encode_message, encode_method, parse_frame,
};
use pika::spec::{Method, basic, queue};
use pika::{BasicProperties, Decimal, FieldTable, FieldValue, LongString};

fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_cases),
        ..ProptestConfig::default()
    }
}

/// Frames with a valid header and end octet around an arbitrary payload, so
/// the decoders behind the framing get exercised, not just the framing.
fn framed(frame_type: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![frame_type];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
    out
}

fn known_method_prefix() -> impl Strategy<Value = [u8; 4]> {
    prop::sample::select(vec![
        (10u16, 10u16),
        (10, 11),
        (10, 30),
        (10, 50),
        (10, 70),
        (20, 40),
        (30, 10),
        (40, 10),
        (50, 10),
        (50, 11),
        (60, 20),
        (60, 40),
        (60, 60),
        (60, 71),
        (60, 120),
        (85, 10),
        (90, 10),
    ])
    .prop_map(|(c, m)| {
        let mut id = [0u8; 4];
        id[..2].copy_from_slice(&c.to_be_bytes());
        id[2..].copy_from_slice(&m.to_be_bytes());
        id
    })
}

fn leaf_value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i8>().prop_map(FieldValue::I8),
        any::<u8>().prop_map(FieldValue::U8),
        any::<i16>().prop_map(FieldValue::I16),
        any::<u16>().prop_map(FieldValue::U16),
        any::<i32>().prop_map(FieldValue::I32),
        any::<u32>().prop_map(FieldValue::U32),
        any::<i64>().prop_map(FieldValue::I64),
        // NaN != NaN would fail the equality check, not the codec.
        prop::num::f32::NORMAL.prop_map(FieldValue::F32),
        prop::num::f64::NORMAL.prop_map(FieldValue::F64),
        (any::<u8>(), any::<i32>())
            .prop_map(|(scale, value)| FieldValue::Decimal(Decimal { scale, value })),
        prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| FieldValue::LongString(LongString::from(b))),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(FieldValue::ByteArray),
        any::<u64>().prop_map(FieldValue::Timestamp),
        Just(FieldValue::Void),
    ]
}

fn field_value() -> impl Strategy<Value = FieldValue> {
    leaf_value().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(FieldValue::Array),
            prop::collection::vec(("[a-z]{0,12}", inner), 0..6)
                .prop_map(|entries| FieldValue::Table(entries.into_iter().collect())),
        ]
    })
}

fn field_table() -> impl Strategy<Value = FieldTable> {
    prop::collection::vec(("\\PC{0,20}", field_value()), 0..10)
        .prop_map(|entries| entries.into_iter().collect())
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn parse_frame_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        frame_max in prop::sample::select(vec![0u32, 4096, 8192, 131_072]),
    ) {
        if let Ok(Some((_, used))) = parse_frame(&bytes, frame_max) {
            prop_assert!(used <= bytes.len());
            prop_assert!(frame_max == 0 || used <= frame_max as usize);
        }
    }

    #[test]
    fn decoders_behind_valid_framing_never_panic(
        frame_type in prop::sample::select(vec![1u8, 2, 3, 8]),
        channel in any::<u16>(),
        prefix in known_method_prefix(),
        tail in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut payload = prefix.to_vec();
        payload.extend_from_slice(&tail);
        let bytes = framed(frame_type, channel, &payload);
        let result = parse_frame(&bytes, FRAME_MIN_SIZE);
        if let Ok(Some((_, used))) = result {
            prop_assert_eq!(used, bytes.len());
        }
        let _ = Method::decode(&payload);
        let _ = decode_content_header(&tail);
    }

    #[test]
    fn table_decoder_never_panics_and_never_reads_past_its_input(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Ok((_, used)) = FieldTable::decode(&bytes) {
            prop_assert!(used <= bytes.len());
        }
    }

    #[test]
    fn table_decoder_never_panics_on_plausible_tables(
        body in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        // A well-formed length prefix in front of arbitrary entries.
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let _ = FieldTable::decode(&bytes);
    }

    #[test]
    fn any_table_round_trips(table in field_table()) {
        let mut out = Vec::new();
        table.encode(&mut out).unwrap();
        let (back, used) = FieldTable::decode(&out).unwrap();
        prop_assert_eq!(used, out.len());
        prop_assert_eq!(back, table);
    }

}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_message_round_trips_and_a_cut_stream_decodes_as_whole(
        body in prop::collection::vec(any::<u8>(), 0..12_000),
        headers in field_table(),
        routing_key in "[a-z.]{0,40}",
        delivery_tag in any::<u64>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let props = BasicProperties::default().with_headers(headers).with_priority(3);
        let deliver = basic::Deliver { delivery_tag, routing_key, ..Default::default() };
        let mut stream = Vec::new();
        encode_method(&mut stream, 2, &queue::DeclareOk::default().into(), FRAME_MIN_SIZE).unwrap();
        let encoded = encode_message(&mut stream, 2, &deliver.clone().into(), &props, &body, FRAME_MIN_SIZE);
        prop_assume!(encoded.is_ok()); // headers too big for one 4096-byte frame
        let whole = parse_all(&stream);
        let reassembled: Vec<u8> = whole.iter().filter_map(|f| match f {
            Frame::Body { payload, .. } => Some(payload.to_vec()),
            _ => None,
        }).flatten().collect();
        prop_assert_eq!(&reassembled, &body);
        let deliver_ok = matches!(&whole[1], Frame::Method { method: Method::BasicDeliver(d), .. } if *d == deliver);
        prop_assert!(deliver_ok, "deliver decodes as sent");
        let header_ok = matches!(&whole[2], Frame::Header { header, .. } if header.properties == props);
        prop_assert!(header_ok, "properties decode as sent");

        // Feed the stream in two pieces, split at an arbitrary offset.
        let at = cut.index(stream.len() + 1);
        let mut buffer = stream[..at].to_vec();
        let mut seen = Vec::new();
        let mut start = 0;
        loop {
            match parse_frame(&buffer[start..], FRAME_MIN_SIZE).unwrap() {
                Some((frame, used)) => { seen.push(format!("{frame:?}")); start += used; }
                None if buffer.len() < stream.len() => buffer.extend_from_slice(&stream[at..]),
                None => break,
            }
        }
        let expected: Vec<String> = whole.iter().map(|f| format!("{f:?}")).collect();
        prop_assert_eq!(seen, expected);
    }
}

fn parse_all(mut buf: &[u8]) -> Vec<Frame<'_>> {
    let mut frames = Vec::new();
    while let Some((frame, used)) = parse_frame(buf, FRAME_MIN_SIZE).unwrap() {
        frames.push(frame);
        buf = &buf[used..];
    }
    assert!(buf.is_empty());
    frames
}
