//! Connects to the broker at `AMQP_URL`, sends the AMQP protocol header and
//! prints what the broker's Connection.Start says about it: product,
//! version, platform, SASL mechanisms, locales and capabilities.
//!
//! Run it with a private broker: `scripts/with-broker cargo run --example server_properties`

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use pika::frame::{FRAME_MIN_SIZE, Frame, PROTOCOL_HEADER, parse_frame};
use pika::spec::{Method, connection};
use pika::{FieldTable, FieldValue};

/// `host:port` from an AMQP URL, by the client's own URL parser.
fn address_of(url: &str) -> Result<String, String> {
    let params = pika::UrlParameters::parse(url).map_err(|e| e.to_string())?;
    Ok(format!("{}:{}", params.host(), params.port()))
}

fn read_start(addr: &str) -> Result<connection::Start, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&PROTOCOL_HEADER)
        .map_err(|e| format!("send protocol header: {e}"))?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match parse_frame(&buffer, FRAME_MIN_SIZE).map_err(|e| format!("bad reply: {e}"))? {
            Some((
                Frame::Method {
                    method: Method::ConnectionStart(start),
                    ..
                },
                _,
            )) => return Ok(start),
            Some((other, _)) => return Err(format!("expected Connection.Start, got {other:?}")),
            None => {}
        }
        let n = stream
            .read(&mut chunk)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "{addr} closed the connection before Connection.Start"
            ));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn text(props: &FieldTable, key: &str) -> String {
    props
        .get(key)
        .and_then(FieldValue::as_str)
        .unwrap_or("?")
        .to_string()
}

/// Reads the broker's Connection.Start and prints what it says; returns
/// it (the example test checks it).
pub fn run(url: &str) -> Result<connection::Start, String> {
    let start = address_of(url).and_then(|addr| read_start(&addr))?;
    let props = &start.server_properties;
    println!(
        "AMQP {}-{}: {} {} on {}",
        start.version_major,
        start.version_minor,
        text(props, "product"),
        text(props, "version"),
        text(props, "platform")
    );
    println!("mechanisms:   {}", start.mechanisms);
    println!("locales:      {}", start.locales);
    println!("capabilities:");
    if let Some(caps) = props.get("capabilities").and_then(FieldValue::as_table) {
        for (name, value) in caps {
            let shown = match value.as_bool() {
                Some(b) => b.to_string(),
                None => format!("{value:?}"),
            };
            println!("  {name:<32} {shown}");
        }
    }
    Ok(start)
}

#[allow(dead_code)] // the example tests call `run` instead
fn main() -> ExitCode {
    let Ok(url) = std::env::var("AMQP_URL") else {
        eprintln!(
            "AMQP_URL is not set. Run with a private broker: \
             scripts/with-broker cargo run --example server_properties"
        );
        return ExitCode::FAILURE;
    };
    match run(&url) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
