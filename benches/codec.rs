//! Codec throughput: encoding Basic.Publish + header + 64-byte body, and
//! parsing a stream of Basic.Deliver + header + body frames. Prints ns per
//! message and MB/s (median of several rounds).
//!
//! Run: `cargo bench --bench codec`

use std::hint::black_box;
use std::time::Instant;

use pika::frame::{Frame, encode_message, parse_frame};
use pika::spec::{Method, basic};
use pika::{BasicProperties, FieldTable};

const FRAME_MAX: u32 = 131_072;
const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn properties() -> BasicProperties {
    let mut headers = FieldTable::new();
    headers.insert("x-trace", "abc123");
    BasicProperties::default()
        .with_content_type("application/octet-stream")
        .with_delivery_mode(2)
        .with_headers(headers)
}

fn bench_encode_publish(body_len: usize, messages: usize) {
    let publish: Method = basic::Publish {
        exchange: "bench.exchange".into(),
        routing_key: "bench.key".into(),
        ..Default::default()
    }
    .into();
    let props = properties();
    let body = vec![0x5A; body_len];
    let mut out = Vec::with_capacity(1 << 20);
    let mut ns_per_msg = Vec::new();
    let mut bytes_per_msg = 0;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..messages {
            encode_message(&mut out, 1, &publish, &props, &body, FRAME_MAX).unwrap();
            if out.len() > (1 << 20) - 4096 {
                bytes_per_msg = out.len();
                black_box(&out);
                out.clear();
            }
        }
        let elapsed = start.elapsed();
        ns_per_msg.push(elapsed.as_nanos() as f64 / messages as f64);
    }
    out.clear();
    encode_message(&mut out, 1, &publish, &props, &body, FRAME_MAX).unwrap();
    let wire = out.len();
    let _ = bytes_per_msg;
    let ns = median(ns_per_msg);
    println!(
        "encode Basic.Publish+header+{body_len}B body: {ns:.0} ns/msg, {:.2} M msgs/s, {:.1} MB/s of wire ({wire} B/msg)",
        1e3 / ns,
        wire as f64 / ns * 1e3
    );
}

fn deliver_stream(body_len: usize, messages: usize) -> Vec<u8> {
    let props = properties();
    let body = vec![0xA5; body_len];
    let mut out = Vec::new();
    for i in 0..messages {
        let deliver: Method = basic::Deliver {
            consumer_tag: "ctag-bench".into(),
            delivery_tag: i as u64 + 1,
            exchange: "bench.exchange".into(),
            routing_key: "bench.key".into(),
            ..Default::default()
        }
        .into();
        encode_message(&mut out, 1, &deliver, &props, &body, FRAME_MAX).unwrap();
    }
    out
}

fn bench_parse_deliver(body_len: usize, messages: usize) {
    let stream = deliver_stream(body_len, messages);
    let mut ns_per_msg = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut rest = &stream[..];
        let mut delivered = 0usize;
        let mut body_bytes = 0usize;
        while let Some((frame, used)) = parse_frame(rest, FRAME_MAX).unwrap() {
            match frame {
                Frame::Method { method, .. } => {
                    if let Method::BasicDeliver(d) = method {
                        black_box(&d);
                        delivered += 1;
                    }
                }
                Frame::Header { header, .. } => {
                    black_box(&header);
                }
                Frame::Body { payload, .. } => {
                    // A consumer copies the body once into its own Vec.
                    body_bytes += black_box(payload.to_vec()).len();
                }
                Frame::Heartbeat => {}
            }
            rest = &rest[used..];
        }
        let elapsed = start.elapsed();
        assert_eq!(delivered, messages);
        assert_eq!(body_bytes, messages * body_len);
        ns_per_msg.push(elapsed.as_nanos() as f64 / messages as f64);
    }
    let ns = median(ns_per_msg);
    let wire = stream.len() / messages;
    println!(
        "parse Basic.Deliver+header+{body_len}B body: {ns:.0} ns/msg, {:.2} M msgs/s, {:.1} MB/s of wire ({wire} B/msg)",
        1e3 / ns,
        wire as f64 / ns * 1e3
    );
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent; keep it quick then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n = if quick { 1_000 } else { 1_000_000 };
    println!("codec bench: median of {ROUNDS} rounds, {n} messages each");
    bench_encode_publish(64, n);
    bench_parse_deliver(64, n);
    bench_encode_publish(4096, n / 10);
    bench_parse_deliver(4096, n / 10);
}
