//! Frame parser and encoder tests: need-more, limits, malformed frames.

use super::*;
use crate::spec::{basic, channel, connection};
use crate::table::FieldTable;

fn all_properties() -> BasicProperties {
    let mut headers = FieldTable::new();
    headers.insert("x-int", 42i32);
    BasicProperties::default()
        .with_content_type("application/json")
        .with_content_encoding("utf-8")
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("c")
        .with_reply_to("r")
        .with_expiration("60000")
        .with_message_id("m")
        .with_timestamp(1_700_000_000u64)
        .with_kind("t")
        .with_user_id("guest")
        .with_app_id("a")
        .with_cluster_id("x")
}

fn sample_stream() -> Vec<u8> {
    let mut out = Vec::new();
    encode_method(
        &mut out,
        0,
        &connection::Tune {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 60,
        }
        .into(),
        FRAME_MIN_SIZE,
    )
    .unwrap();
    encode_heartbeat(&mut out);
    let deliver = basic::Deliver {
        consumer_tag: "ctag".into(),
        delivery_tag: 9,
        routing_key: "rk".into(),
        ..Default::default()
    };
    encode_message(
        &mut out,
        5,
        &deliver.into(),
        &all_properties(),
        &[0xAB; 5000],
        FRAME_MIN_SIZE,
    )
    .unwrap();
    out
}

fn parse_all(mut buf: &[u8], frame_max: u32) -> Vec<Frame<'_>> {
    let mut frames = Vec::new();
    while let Some((frame, used)) = parse_frame(buf, frame_max).unwrap() {
        assert!(used <= buf.len());
        frames.push(frame);
        buf = &buf[used..];
    }
    assert!(buf.is_empty(), "{} bytes left unparsed", buf.len());
    frames
}

#[test]
fn a_stream_parses_into_its_frames() {
    let stream = sample_stream();
    let frames = parse_all(&stream, FRAME_MIN_SIZE);
    assert_eq!(frames.len(), 6); // tune, heartbeat, deliver, header, 2 bodies
    assert!(matches!(frames[1], Frame::Heartbeat));
    match &frames[3] {
        Frame::Header { channel: 5, header } => {
            assert_eq!(header.body_size, 5000);
            assert_eq!(header.properties, all_properties());
        }
        other => panic!("{other:?}"),
    }
    let body: Vec<u8> = frames[4..]
        .iter()
        .flat_map(|f| match f {
            Frame::Body {
                channel: 5,
                payload,
            } => payload.to_vec(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(body, vec![0xAB; 5000]);
}

#[test]
fn every_prefix_of_a_frame_is_need_more() {
    let stream = sample_stream();
    let (_, first_len) = parse_frame(&stream, FRAME_MIN_SIZE).unwrap().unwrap();
    for cut in 0..first_len {
        assert_eq!(
            parse_frame(&stream[..cut], FRAME_MIN_SIZE).unwrap(),
            None,
            "cut at {cut}"
        );
    }
}

#[test]
fn a_stream_fed_in_pieces_decodes_as_whole() {
    let stream = sample_stream();
    let whole = parse_all(&stream, FRAME_MIN_SIZE);
    for step in [1, 2, 3, 7, 100, 4095] {
        // Feed `step` bytes at a time into a growing buffer.
        let mut buffered: Vec<u8> = Vec::new();
        let mut got = Vec::new();
        let mut start = 0;
        for piece in stream.chunks(step) {
            buffered.extend_from_slice(piece);
            while let Some((frame, used)) = parse_frame(&buffered[start..], FRAME_MIN_SIZE).unwrap()
            {
                got.push(format!("{frame:?}"));
                start += used;
            }
        }
        let expected: Vec<String> = whole.iter().map(|f| format!("{f:?}")).collect();
        assert_eq!(got, expected, "step {step}");
    }
}

#[test]
fn oversized_frames_are_rejected_from_the_header_alone() {
    // 0xFFFFFFFF declared, only the 7 header bytes present: refused now,
    // not "need more" for 4 GiB.
    let err = parse_frame(&[1, 0, 1, 0xff, 0xff, 0xff, 0xff], 131072).unwrap_err();
    assert_eq!(
        err,
        CodecError::FrameTooLarge {
            size: 0xFFFF_FFFF + 8,
            frame_max: 131072
        }
    );
    assert_eq!(err.reply_code(), 501);
}

#[test]
fn a_frame_of_exactly_frame_max_is_accepted_and_one_more_byte_is_not() {
    let mut out = Vec::new();
    encode_body(&mut out, 1, &[7; 4088], FRAME_MIN_SIZE);
    assert_eq!(out.len(), 4096);
    assert!(parse_frame(&out, 4096).unwrap().is_some());
    let err = parse_frame(&out, 4095).unwrap_err();
    assert!(matches!(err, CodecError::FrameTooLarge { size: 4096, .. }));
}

#[test]
fn bad_frame_end_is_a_frame_error() {
    let mut out = Vec::new();
    encode_heartbeat(&mut out);
    *out.last_mut().unwrap() = 0xCD;
    let err = parse_frame(&out, FRAME_MIN_SIZE).unwrap_err();
    assert_eq!(
        err,
        CodecError::BadFrameEnd {
            found: 0xCD,
            frame_type: 8,
            channel: 0
        }
    );
    assert_eq!(err.reply_code(), 501);
}

#[test]
fn unknown_frame_type_is_a_frame_error() {
    let err = parse_frame(&[4, 0, 1, 0, 0, 0, 0, 0xCE], FRAME_MIN_SIZE).unwrap_err();
    assert_eq!(
        err,
        CodecError::UnknownFrameType {
            frame_type: 4,
            channel: 1
        }
    );
    assert_eq!(err.reply_code(), 501);
}

#[test]
fn heartbeat_off_channel_zero_or_with_payload_is_a_frame_error() {
    let err = parse_frame(&[8, 0, 1, 0, 0, 0, 0, 0xCE], FRAME_MIN_SIZE).unwrap_err();
    assert_eq!(
        err,
        CodecError::BadHeartbeat {
            channel: 1,
            size: 0
        }
    );
    let err = parse_frame(&[8, 0, 0, 0, 0, 0, 1, 0, 0xCE], FRAME_MIN_SIZE).unwrap_err();
    assert_eq!(
        err,
        CodecError::BadHeartbeat {
            channel: 0,
            size: 1
        }
    );
    assert_eq!(err.reply_code(), 501);
}

#[test]
fn a_protocol_header_in_place_of_a_frame_names_the_version() {
    assert_eq!(parse_frame(b"AMQ", FRAME_MIN_SIZE).unwrap(), None);
    let err = parse_frame(b"AMQP\x00\x00\x09\x01", FRAME_MIN_SIZE).unwrap_err();
    assert_eq!(
        err,
        CodecError::ProtocolHeader {
            protocol_id: 0,
            major: 0,
            minor: 9,
            revision: 1
        }
    );
    let err = parse_frame(b"AMQP\x01\x01\x00\x0a", FRAME_MIN_SIZE).unwrap_err();
    assert!(err.to_string().contains("AMQP 1-1-0-10"), "{err}");
    let err = parse_frame(b"Axyz", FRAME_MIN_SIZE).unwrap_err();
    assert!(matches!(
        err,
        CodecError::UnknownFrameType {
            frame_type: b'A',
            ..
        }
    ));
}

#[test]
fn content_header_faults_are_named() {
    let mut out = Vec::new();
    encode_content_header(&mut out, 1, 60, 3, &all_properties(), FRAME_MIN_SIZE).unwrap();
    let payload = &out[7..out.len() - 1];
    assert_eq!(
        decode_content_header(payload).unwrap().properties,
        all_properties()
    );

    let mut wrong_class = payload.to_vec();
    wrong_class[1] = 10;
    let err = decode_content_header(&wrong_class).unwrap_err();
    assert_eq!(err, CodecError::UnknownContentClass { class_id: 10 });
    assert_eq!(err.reply_code(), 503);

    let mut weight = payload.to_vec();
    weight[3] = 1;
    assert_eq!(
        decode_content_header(&weight).unwrap_err(),
        CodecError::NonZeroWeight { weight: 1 }
    );

    let mut continuation = payload.to_vec();
    continuation[13] |= 1;
    assert!(matches!(
        decode_content_header(&continuation).unwrap_err(),
        CodecError::BadPropertyFlags { .. }
    ));

    let err = decode_content_header(&payload[..payload.len() - 2]).unwrap_err();
    assert!(
        err.to_string()
            .contains("BasicProperties field 'cluster_id'"),
        "{err}"
    );
}

#[test]
fn unset_properties_are_not_encoded() {
    let mut out = Vec::new();
    encode_content_header(
        &mut out,
        1,
        60,
        0,
        &BasicProperties::default(),
        FRAME_MIN_SIZE,
    )
    .unwrap();
    // 7 header + class 2 + weight 2 + size 8 + flags 2 + end 1
    assert_eq!(out.len(), 22);
    assert_eq!(&out[19..21], &[0, 0]);
}

#[test]
fn bodies_split_at_frame_max_minus_8_and_empty_bodies_add_no_frame() {
    let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let mut out = Vec::new();
    encode_body(&mut out, 3, &body, FRAME_MIN_SIZE);
    let frames = parse_all(&out, FRAME_MIN_SIZE);
    assert_eq!(frames.len(), 3);
    let mut joined = Vec::new();
    for f in &frames {
        let Frame::Body {
            channel: 3,
            payload,
        } = f
        else {
            panic!("{f:?}")
        };
        assert!(payload.len() <= 4088);
        joined.extend_from_slice(payload);
    }
    assert_eq!(joined, body);

    let mut out = Vec::new();
    encode_body(&mut out, 3, &[], FRAME_MIN_SIZE);
    assert!(out.is_empty());
}

#[test]
fn a_method_frame_over_frame_max_is_refused_and_the_buffer_kept() {
    let mut args = FieldTable::new();
    args.insert("big", "x".repeat(5000).as_str());
    let declare = crate::spec::queue::Declare {
        queue: "q".into(),
        arguments: args,
        ..Default::default()
    };
    let mut out = vec![9];
    let err = encode_method(&mut out, 1, &declare.into(), FRAME_MIN_SIZE).unwrap_err();
    assert!(matches!(
        err,
        CodecError::EncodedFrameTooLarge {
            what: "method",
            frame_max: 4096,
            ..
        }
    ));
    assert_eq!(out, [9]);
}

#[test]
fn a_header_over_frame_max_is_refused_and_nothing_of_the_message_is_kept() {
    let mut headers = FieldTable::new();
    headers.insert("big", "y".repeat(5000).as_str());
    let props = BasicProperties::default().with_headers(headers);
    let mut out = Vec::new();
    let err = encode_message(
        &mut out,
        1,
        &basic::Publish::default().into(),
        &props,
        b"body",
        FRAME_MIN_SIZE,
    )
    .unwrap_err();
    assert!(err.to_string().contains("content header frame"), "{err}");
    assert!(out.is_empty());
}

#[test]
fn only_content_methods_take_a_body() {
    let mut out = Vec::new();
    let err = encode_message(
        &mut out,
        1,
        &channel::Open::default().into(),
        &BasicProperties::default(),
        b"x",
        FRAME_MIN_SIZE,
    )
    .unwrap_err();
    assert_eq!(
        err,
        CodecError::NotContentMethod {
            method: "Channel.Open"
        }
    );
    assert!(out.is_empty());
}

#[test]
fn frame_max_zero_means_no_limit() {
    let mut out = Vec::new();
    encode_body(&mut out, 1, &vec![1; 200_000], 0);
    assert_eq!(parse_all(&out, 0).len(), 1);
}

#[test]
fn encode_publish_writes_the_same_bytes_as_encode_message() {
    for (exchange, key, mandatory, body) in [
        ("", "q", false, &b""[..]),
        ("amq.direct", "golden.key", true, &[7u8; 9000][..]),
    ] {
        let method: Method = basic::Publish {
            exchange: exchange.into(),
            routing_key: key.into(),
            mandatory,
            ..Default::default()
        }
        .into();
        let mut a = Vec::new();
        encode_message(&mut a, 3, &method, &all_properties(), body, FRAME_MIN_SIZE).unwrap();
        let mut b = Vec::new();
        encode_publish(
            &mut b,
            3,
            exchange,
            key,
            mandatory,
            &all_properties(),
            body,
            FRAME_MIN_SIZE,
        )
        .unwrap();
        assert_eq!(a, b);
    }
    let mut out = vec![1];
    let err = encode_publish(
        &mut out,
        1,
        &"x".repeat(256),
        "k",
        false,
        &BasicProperties::default(),
        b"",
        FRAME_MIN_SIZE,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("Basic.Publish field 'exchange'"),
        "{err}"
    );
    assert_eq!(out, [1]);
}

/// A content header payload (class 60, weight 0, body size 4) with the
/// given property flags and property bytes.
fn header_payload(flags: u16, properties: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4];
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(properties);
    p
}

#[test]
fn a_header_table_that_does_not_decode_is_skipped_and_the_later_properties_still_read() {
    // headers = {"k": 'Z' ...} (unknown tag, the table's length fits), then
    // delivery_mode 2 and correlation_id "c".
    let table = [0, 0, 0, 7, 1, b'k', b'Z', 0, 0, 0, 0];
    let mut props = table.to_vec();
    props.extend_from_slice(&[2, 1, b'c']);
    let flags = BasicProperties::FLAG_HEADERS
        | BasicProperties::FLAG_DELIVERY_MODE
        | BasicProperties::FLAG_CORRELATION_ID;
    let payload = header_payload(flags, &props);
    let header = decode_content_header(&payload).unwrap();
    assert_eq!(header.properties.headers, None);
    assert_eq!(header.properties.delivery_mode, Some(2));
    assert_eq!(header.properties.correlation_id.as_deref(), Some("c"));
    let problem = header.properties_error.unwrap();
    assert!(
        matches!(
            problem.error.root(),
            CodecError::UnknownFieldType { tag: b'Z' }
        ),
        "{:?}",
        problem.error
    );
    assert!(
        problem.error.to_string().contains("headers"),
        "{}",
        problem.error
    );
    assert_eq!(problem.raw_properties, payload[12..]);
}

#[test]
fn the_first_unreadable_property_is_the_one_reported() {
    // content_type 0xFF (not UTF-8), then headers with an unknown tag.
    let mut props = vec![1, 0xFF];
    props.extend_from_slice(&[0, 0, 0, 7, 1, b'k', b'Z', 0, 0, 0, 0]);
    let flags = BasicProperties::FLAG_CONTENT_TYPE | BasicProperties::FLAG_HEADERS;
    let header = decode_content_header(&header_payload(flags, &props)).unwrap();
    let problem = header.properties_error.unwrap();
    assert!(
        matches!(problem.error.root(), CodecError::InvalidUtf8 { .. }),
        "{:?}",
        problem.error
    );
    assert_eq!(header.properties, BasicProperties::default());
}

#[test]
fn a_property_whose_length_overruns_the_frame_still_fails_the_header() {
    // A table claiming far more bytes than the frame holds.
    let mut props = 0xFFFF_FFF0u32.to_be_bytes().to_vec();
    props.extend_from_slice(&[1, b'k', b'V']);
    let err =
        decode_content_header(&header_payload(BasicProperties::FLAG_HEADERS, &props)).unwrap_err();
    assert!(
        matches!(err.root(), CodecError::Truncated { .. }),
        "{err:?}"
    );
    assert_eq!(err.reply_code(), 502);
    // A short string claiming more than is left.
    let err = decode_content_header(&header_payload(
        BasicProperties::FLAG_CONTENT_TYPE,
        &[9, b'a'],
    ))
    .unwrap_err();
    assert!(
        matches!(err.root(), CodecError::Truncated { .. }),
        "{err:?}"
    );
}

#[test]
fn a_well_formed_header_reports_no_properties_error() {
    let mut out = Vec::new();
    encode_content_header(&mut out, 1, 60, 3, &all_properties(), FRAME_MIN_SIZE).unwrap();
    match parse_frame(&out, FRAME_MIN_SIZE).unwrap().unwrap().0 {
        Frame::Header { header, .. } => {
            assert_eq!(header.properties, all_properties());
            assert_eq!(header.properties_error, None);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_frame_type_is_checked_before_the_size() {
    // A TLS alert record and an HTTP answer, read as frame headers.
    let tls_alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32, 0, 0];
    let err = parse_frame(&tls_alert, 4096).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::UnknownFrameType {
                frame_type: 0x15,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("is this a TLS port?"), "{err}");
    let err = parse_frame(b"HTTP/1.1 400 Bad Request", 4096).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::UnknownFrameType {
                frame_type: b'H',
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("is this an AMQP port?"), "{err}");
    // A known type still has its size checked.
    let big = [FRAME_BODY, 0, 1, 0, 1, 0, 0];
    assert!(matches!(
        parse_frame(&big, 4096),
        Err(CodecError::FrameTooLarge { .. })
    ));
}
