//! Checks the method table against RabbitMQ's extended spec XML and
//! round-trips every method.

use super::*;
use crate::table::FieldTable;
use crate::wire::Writer;

const SPEC_XML: &str = include_str!("amqp0-9-1.extended.xml");

/// Methods we carry that the extended XML lacks.
const SUPPLEMENT: &[&str] = &[
    "Access.Request",
    "Access.RequestOk",
    "Connection.Blocked",
    "Connection.Unblocked",
    "Connection.UpdateSecret",
    "Connection.UpdateSecretOk",
];

fn camel(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn rust_type_of(domain_type: &str) -> &'static str {
    match domain_type {
        "octet" => "u8",
        "short" => "u16",
        "long" => "u32",
        "longlong" => "u64",
        "shortstr" => "String",
        "longstr" => "LongString",
        "bit" => "bool",
        "table" => "FieldTable",
        "timestamp" => "u64",
        other => panic!("unknown XML type {other}"),
    }
}

/// pika's names where they differ from the XML's.
fn pika_field_name(xml: &str, method: &str) -> Option<String> {
    if xml.starts_with("reserved") {
        return None; // pika names reserved fields after their old meaning
    }
    Some(match (xml, method) {
        ("type", "Exchange.Declare") => "exchange_type".into(),
        ("no-wait", _) => "nowait".into(),
        ("global", _) => "global_qos".into(),
        _ => xml.replace('-', "_"),
    })
}

struct XmlMethod {
    id: MethodId,
    name: String,
    fields: Vec<(String, &'static str)>,
    content: bool,
    responses: Vec<String>,
}

fn xml_methods() -> (Vec<XmlMethod>, Vec<(String, String)>) {
    let doc = roxmltree::Document::parse(SPEC_XML).expect("spec XML parses");
    let root = doc.root_element();
    let domain = |name: &str| -> String {
        root.children()
            .find(|n| n.has_tag_name("domain") && n.attribute("name") == Some(name))
            .and_then(|n| n.attribute("type"))
            .unwrap_or(name)
            .to_string()
    };
    let field_type = |f: &roxmltree::Node| {
        let d = f.attribute("domain").or(f.attribute("type")).unwrap();
        domain(d)
    };
    let mut methods = Vec::new();
    let mut basic_props = Vec::new();
    for class in root.children().filter(|n| n.has_tag_name("class")) {
        let class_name = camel(class.attribute("name").unwrap());
        let class_id: u16 = class.attribute("index").unwrap().parse().unwrap();
        if class_name == "Basic" {
            for f in class.children().filter(|n| n.has_tag_name("field")) {
                basic_props.push((f.attribute("name").unwrap().to_string(), field_type(&f)));
            }
        }
        for m in class.children().filter(|n| n.has_tag_name("method")) {
            let name = format!("{class_name}.{}", camel(m.attribute("name").unwrap()));
            methods.push(XmlMethod {
                id: MethodId::new(class_id, m.attribute("index").unwrap().parse().unwrap()),
                fields: m
                    .children()
                    .filter(|n| n.has_tag_name("field"))
                    .map(|f| {
                        (
                            f.attribute("name").unwrap().to_string(),
                            rust_type_of(&field_type(&f)),
                        )
                    })
                    .collect(),
                content: m.attribute("content") == Some("1"),
                responses: m
                    .children()
                    .filter(|n| n.has_tag_name("response"))
                    .map(|r| format!("{class_name}.{}", camel(r.attribute("name").unwrap())))
                    .collect(),
                name,
            });
        }
    }
    (methods, basic_props)
}

fn names_of(ids: &[MethodId]) -> Vec<&'static str> {
    let table = Method::table();
    ids.iter()
        .map(|id| table.iter().find(|(i, _, _)| i == id).unwrap().1)
        .collect()
}

/// Builds a method payload from the table's field list: every field gets
/// value A except `vary`, which gets value B.
fn synthesize(id: MethodId, fields: &[(&str, &str)], vary: Option<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = Writer::new(&mut out);
    w.u16(id.class_id);
    w.u16(id.method_id);
    for (i, (name, ty)) in fields.iter().enumerate() {
        let b = vary == Some(i);
        match *ty {
            "u8" => w.u8(if b { 0xA5 } else { 1 }),
            "u16" => w.u16(if b { 0xBEEF } else { 2 }),
            "u32" => w.u32(if b { 0xDEAD_BEEF } else { 3 }),
            "u64" => w.u64(if b { u64::MAX - 1 } else { 4 }),
            "String" => w
                .short_str(&if b { format!("{name}-B") } else { "a".into() }, "t")
                .unwrap(),
            "LongString" => w
                .long_bytes(if b { b"long \xff value" } else { b"a" }, "t")
                .unwrap(),
            "bool" => w.bit(b),
            "FieldTable" => {
                let mut t = FieldTable::new();
                t.insert("k", if b { 99i32 } else { 1i32 });
                t.write(&mut w, 0).unwrap();
            }
            other => panic!("unknown type {other}"),
        }
    }
    out
}

#[test]
fn method_table_matches_the_extended_spec_xml() {
    let (xml, _) = xml_methods();
    let ours = Method::table();
    for x in &xml {
        let (_, name, fields) = ours
            .iter()
            .find(|(id, _, _)| *id == x.id)
            .unwrap_or_else(|| panic!("{} ({}) is missing", x.name, x.id));
        assert_eq!(*name, x.name, "name of {}", x.id);
        assert_eq!(fields.len(), x.fields.len(), "field count of {name}");
        for ((ours_name, ours_ty), (xml_name, xml_ty)) in fields.iter().zip(&x.fields) {
            assert_eq!(ours_ty, xml_ty, "type of {name}.{xml_name}");
            if let Some(expected) = pika_field_name(xml_name, name) {
                assert_eq!(*ours_name, expected, "name of a field of {name}");
            }
        }
        // Our decode of a payload of this method tells its facts.
        let m = Method::decode(&synthesize(x.id, fields, None)).unwrap();
        assert_eq!(m.has_content(), x.content, "content of {name}");
        // The XML omits recover-ok as recover's response; RabbitMQ sends it,
        // and pika waits for it.
        if *name != "Basic.Recover" {
            assert_eq!(names_of(m.replies()), x.responses, "replies of {name}");
        }
        assert_eq!(m.synchronous(), !m.replies().is_empty(), "{name}");
    }
    let mut extra: Vec<_> = ours
        .iter()
        .filter(|(id, _, _)| !xml.iter().any(|x| x.id == *id))
        .map(|(_, name, _)| *name)
        .collect();
    extra.sort();
    assert_eq!(extra, SUPPLEMENT);
}

#[test]
fn basic_properties_match_the_extended_spec_xml() {
    let (_, props) = xml_methods();
    let ours = BasicProperties::WIRE_TYPES;
    assert_eq!(ours.len(), props.len());
    for ((name, ty), (xml_name, xml_ty)) in ours.iter().zip(&props) {
        let expected = match xml_name.as_str() {
            "reserved" => "cluster_id".to_string(),
            "type" => "kind".to_string(),
            other => other.replace('-', "_"),
        };
        assert_eq!(*name, expected);
        assert_eq!(ty, xml_ty, "type of property {name}");
    }
}

#[test]
fn supplement_methods_have_the_rabbitmq_ids() {
    assert_eq!(<access::Request as MethodDef>::ID, MethodId::new(30, 10));
    assert_eq!(<access::RequestOk as MethodDef>::ID, MethodId::new(30, 11));
    assert_eq!(
        <connection::Blocked as MethodDef>::ID,
        MethodId::new(10, 60)
    );
    assert_eq!(
        <connection::Unblocked as MethodDef>::ID,
        MethodId::new(10, 61)
    );
    assert_eq!(
        <connection::UpdateSecret as MethodDef>::ID,
        MethodId::new(10, 70)
    );
    assert_eq!(
        <connection::UpdateSecretOk as MethodDef>::ID,
        MethodId::new(10, 71)
    );
    let req = access::Request::default();
    assert!(req.passive && req.active && req.write && req.read && !req.exclusive);
    assert_eq!(req.realm, "/data");
}

#[test]
fn pika_index_values_match_the_seed() {
    assert_eq!(<connection::Start as MethodDef>::ID.index(), 655370);
    assert_eq!(<exchange::UnbindOk as MethodDef>::ID.index(), 2621491);
    assert_eq!(<basic::Nack as MethodDef>::ID.index(), 3932280);
    assert_eq!(<confirm::SelectOk as MethodDef>::ID.index(), 5570571);
}

#[test]
fn every_method_round_trips_and_carries_every_field() {
    for (id, name, fields) in Method::table() {
        let base = synthesize(id, fields, None);
        let decoded = Method::decode(&base).unwrap();
        assert_eq!(decoded.id(), id);
        let mut again = Vec::new();
        decoded.encode(&mut again).unwrap();
        assert_eq!(again, base, "{name} re-encodes byte-exactly");
        for i in 0..fields.len() {
            let varied = synthesize(id, fields, Some(i));
            let m = Method::decode(&varied).unwrap();
            assert_ne!(m, decoded, "{name}.{} is carried", fields[i].0);
            let mut again = Vec::new();
            m.encode(&mut again).unwrap();
            assert_eq!(again, varied, "{name} with {} varied", fields[i].0);
        }
    }
}

#[test]
fn pika_defaults() {
    let d = exchange::Declare::default();
    assert_eq!(d.exchange_type, "direct");
    assert!(!d.durable && !d.nowait && d.arguments.is_empty());
    let s = connection::StartOk::default();
    assert_eq!(
        (s.mechanism.as_str(), s.locale.as_str()),
        ("PLAIN", "en_US")
    );
    assert_eq!(connection::Open::default().virtual_host, "/");
    assert!(basic::Reject::default().requeue);
    assert!(basic::Nack::default().requeue);
    assert!(!basic::Recover::default().requeue);
    let start = connection::Start::default();
    assert_eq!((start.version_major, start.version_minor), (0, 9));
}

#[test]
fn secrets_are_redacted_from_debug() {
    let start_ok = connection::StartOk {
        response: "\0guest\0hunter2".into(),
        ..Default::default()
    };
    let shown = format!("{start_ok:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("<redacted>"));
    let update = connection::UpdateSecret {
        new_secret: "token-xyz".into(),
        reason: "rotation".into(),
    };
    let shown = format!("{:?}", Method::from(update));
    assert!(
        !shown.contains("token-xyz") && shown.contains("rotation"),
        "{shown}"
    );
    let secure_ok = connection::SecureOk {
        response: "s3cr3t".into(),
    };
    assert!(!format!("{secure_ok:?}").contains("s3cr3t"));
}

#[test]
fn unknown_methods_are_command_invalid() {
    let err = Method::decode(&[0, 60, 0, 99]).unwrap_err();
    assert_eq!(
        err,
        CodecError::UnknownMethod {
            class_id: 60,
            method_id: 99
        }
    );
    assert_eq!(err.reply_code(), 503);
    assert_eq!(
        Method::decode(&[0, 77, 0, 10]).unwrap_err().reply_code(),
        503
    );
}

#[test]
fn truncated_and_overlong_payloads_are_syntax_errors_naming_the_field() {
    // Queue.Declare cut inside its queue name.
    let mut payload = Vec::new();
    Method::from(queue::Declare {
        queue: "orders".into(),
        ..Default::default()
    })
    .encode(&mut payload)
    .unwrap();
    let err = Method::decode(&payload[..9]).unwrap_err();
    assert_eq!(err.reply_code(), 502);
    assert!(
        err.to_string().contains("Queue.Declare field 'queue'"),
        "{err}"
    );
    // One byte too many.
    payload.push(0);
    let err = Method::decode(&payload).unwrap_err();
    assert!(matches!(err, CodecError::TrailingBytes { count: 1, .. }));
    // A short string over 255 bytes is refused at encode, buffer untouched.
    let mut out = vec![1, 2, 3];
    let err = Method::from(queue::Declare {
        queue: "q".repeat(300),
        ..Default::default()
    })
    .encode(&mut out)
    .unwrap_err();
    assert_eq!(out, [1, 2, 3]);
    assert!(err.to_string().contains("'queue'") && err.to_string().contains("300"));
}

#[test]
fn method_structs_convert_to_and_from_method() {
    let ok = queue::DeclareOk {
        queue: "amq.gen-1".into(),
        message_count: 3,
        consumer_count: 1,
    };
    let m: Method = ok.clone().into();
    assert_eq!(queue::DeclareOk::try_from(m.clone()), Ok(ok));
    assert!(queue::BindOk::try_from(m).is_err());
    assert_eq!(
        names_of(Method::from(basic::Get::default()).replies()),
        ["Basic.GetOk", "Basic.GetEmpty"]
    );
}
