//! RabbitMQ tutorial 4, "Routing": the log emitter, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `emit_log_direct.py` in callback form:
//! it declares the direct exchange `direct_logs` and publishes one message
//! (the arguments after the first, or `Hello World!`) with the severity
//! (the first argument, or `info`) as routing key, then closes. Only the
//! queues bound with that severity get it.
//!
//! ```text
//! scripts/with-broker cargo run --example select_4_routing_emit_log_direct -- [SEVERITY [MESSAGE...]]
//! ```

use pika::{BasicProperties, Channel, Error, ExchangeDeclareOptions, FieldTable, SelectConnection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let severity = args.first().cloned().unwrap_or("info".into());
    let message = match args.get(1..) {
        Some(words) if !words.is_empty() => words.join(" "),
        _ => "Hello World!".into(),
    };
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| emit(ch, severity, message).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    Ok(())
}

/// Declares the exchange; once it exists, publishes and closes.
fn emit(ch: Result<Channel, Error>, severity: String, message: String) -> Result<(), Error> {
    let direct = ExchangeDeclareOptions {
        exchange_type: "direct".into(),
        ..Default::default()
    };
    ch?.exchange_declare(
        "direct_logs",
        direct,
        FieldTable::new(),
        move |ch, declared| {
            declared.expect("direct_logs declared");
            let props = BasicProperties::default();
            ch.basic_publish("direct_logs", &severity, &message, &props, false)
                .expect("an open channel");
            println!(" [x] Sent {severity}:{message}");
            let conn = ch.connection().expect("the connection is open");
            conn.close(200, "done").expect("the connection is open");
        },
    )
}
