//! Proves the test rig and the codec against the real RabbitMQ started by
//! `scripts/with-broker`: the broker's Connection.Start decodes, a whole
//! handshake with every field-table type in our client properties is
//! accepted and read back by the broker, and a wrong protocol header is
//! answered with the broker's own.

mod common;

use std::io::Read;

use common::{OwnedFrame, RawSession};
use pika::error::CodecError;
use pika::frame::parse_frame;
use pika::spec::{Method, channel, connection};
use pika::{Decimal, FieldTable, FieldValue};

fn expect_start(session: &mut RawSession) -> connection::Start {
    match session.read_method() {
        (0, Method::ConnectionStart(start)) => start,
        other => panic!("expected Connection.Start on channel 0, got {other:?}"),
    }
}

#[test]
fn broker_connection_start_decodes_with_plain_and_capabilities() {
    let mut session = RawSession::open();
    let start = expect_start(&mut session);
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let mechanisms = start.mechanisms.as_str().expect("mechanisms are text");
    assert!(
        mechanisms.split(' ').any(|m| m == "PLAIN"),
        "mechanisms: {mechanisms}"
    );
    assert!(start.locales.as_str().unwrap().contains("en_US"));
    let props = &start.server_properties;
    assert_eq!(
        props.get("product").and_then(FieldValue::as_str),
        Some("RabbitMQ")
    );
    let capabilities = props
        .get("capabilities")
        .and_then(FieldValue::as_table)
        .expect("server_properties has a capabilities table");
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
    ] {
        assert_eq!(
            capabilities.get(cap).and_then(FieldValue::as_bool),
            Some(true),
            "capability {cap}"
        );
    }
}

#[test]
fn broker_answers_a_wrong_protocol_header_with_its_own() {
    let mut session = common::connect();
    std::io::Write::write_all(&mut session, b"AMQP\x00\x00\x08\x00").unwrap();
    // The broker writes its header, then closes (possibly with a reset).
    let mut reply = Vec::new();
    let mut chunk = [0u8; 64];
    while let Ok(n @ 1..) = session.read(&mut chunk) {
        reply.extend_from_slice(&chunk[..n]);
    }
    let err = parse_frame(&reply, 4096).unwrap_err();
    assert_eq!(
        err,
        CodecError::ProtocolHeader {
            protocol_id: 0,
            major: 0,
            minor: 9,
            revision: 1
        }
    );
}

fn every_type_table() -> FieldTable {
    let mut nested = FieldTable::new();
    nested.insert("inner", "yes");
    let mut t = FieldTable::new();
    t.insert("f_bool", true);
    t.insert("f_i8", -5i8);
    t.insert("f_u8", 250u8);
    t.insert("f_i16", -300i16);
    t.insert("f_u16", 65000u16);
    t.insert("f_i32", -70000i32);
    t.insert("f_u32", 4_000_000_000u32);
    t.insert("f_i64", -1_099_511_627_776i64);
    t.insert("f_f32", 1.5f32);
    t.insert("f_f64", -2.25f64);
    t.insert(
        "f_decimal",
        Decimal {
            scale: 2,
            value: 314,
        },
    );
    t.insert("f_longstr", "long string");
    t.insert("f_bytes", FieldValue::ByteArray(vec![1, 2, 255]));
    t.insert(
        "f_array",
        vec![FieldValue::I32(1), "two".into(), FieldValue::Bool(false)],
    );
    t.insert("f_timestamp", FieldValue::Timestamp(1_577_934_245));
    t.insert("f_table", nested);
    t.insert("f_void", FieldValue::Void);
    t
}

/// Opens a connection whose client_properties hold every field type.
fn handshake_with(client_properties: FieldTable, name: &str) -> RawSession {
    RawSession::open_handshaken(client_properties, name)
}

#[test]
fn broker_reads_every_field_type_we_encode_in_client_properties() {
    let name = format!("every-type-{}", std::process::id());
    let mut session = handshake_with(every_type_table(), &name);

    // The broker decoded our table with its own parser; it prints each value
    // with the type it read.
    let listing = common::rabbitmqctl(&[
        "eval",
        "io:format(\"~w~n\", [rabbit_networking:connection_info_all([client_properties])]).",
    ]);
    // `~w` prints each value as {Key, Type, Value} with binaries as bytes.
    let bin = |s: &str| {
        let bytes: Vec<String> = s.bytes().map(|b| b.to_string()).collect();
        format!("<<{}>>", bytes.join(","))
    };
    for (key, typed_value) in [
        ("f_bool", "bool,true".to_string()),
        ("f_i8", "byte,-5".into()),
        ("f_u8", "unsignedbyte,250".into()),
        ("f_i16", "short,-300".into()),
        ("f_u16", "unsignedshort,65000".into()),
        ("f_i32", "signedint,-70000".into()),
        ("f_u32", "unsignedint,4000000000".into()),
        ("f_i64", "long,-1099511627776".into()),
        ("f_f32", "float,1.5".into()),
        ("f_f64", "double,-2.25".into()),
        ("f_decimal", "decimal,{2,314}".into()),
        ("f_longstr", format!("longstr,{}", bin("long string"))),
        ("f_bytes", "binary,<<1,2,255>>".into()),
        (
            "f_array",
            format!(
                "array,[{{signedint,1}},{{longstr,{}}},{{bool,false}}]",
                bin("two")
            ),
        ),
        ("f_timestamp", "timestamp,1577934245".into()),
        (
            "f_table",
            format!("table,[{{{},longstr,{}}}]", bin("inner"), bin("yes")),
        ),
        ("f_void", "void,undefined".into()),
        ("connection_name", format!("longstr,{}", bin(&name))),
    ] {
        let expected = format!("{{{},{typed_value}}}", bin(key));
        assert!(
            listing.contains(&expected),
            "{key}: the broker did not read {typed_value}; its view: {listing}"
        );
    }

    // And the session is healthy: a channel opens and closes.
    session.send(1, channel::Open::default());
    assert!(matches!(
        session.read_method(),
        (1, Method::ChannelOpenOk(_))
    ));
    session.send(
        0,
        connection::Close {
            reply_code: 200,
            reply_text: "done".into(),
            ..Default::default()
        },
    );
    loop {
        match session.read_frame() {
            OwnedFrame::Method(0, Method::ConnectionCloseOk(_)) => break,
            OwnedFrame::Heartbeat => continue,
            other => panic!("expected Connection.CloseOk, got {other:?}"),
        }
    }
}
