//! RabbitMQ tutorial 3, "Publish/Subscribe": the log emitter, on
//! `SelectConnection`.
//!
//! Mirrors pika's tutorial program `emit_log.py` in callback form: it
//! declares the fanout exchange `logs`, publishes one message to it (the
//! arguments, or `info: Hello World!`) and closes. Every queue bound to
//! `logs` gets a copy; with none bound, the message is dropped.
//!
//! ```text
//! scripts/with-broker cargo run --example select_3_publish_subscribe_emit_log -- [MESSAGE...]
//! ```

use pika::{BasicProperties, Channel, Error, ExchangeDeclareOptions, FieldTable, SelectConnection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let words: Vec<String> = std::env::args().skip(1).collect();
    let message = if words.is_empty() {
        "info: Hello World!".into()
    } else {
        words.join(" ")
    };
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| emit(ch, message).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    Ok(())
}

/// Declares the exchange; once it exists, publishes and closes.
fn emit(ch: Result<Channel, Error>, message: String) -> Result<(), Error> {
    let fanout = ExchangeDeclareOptions {
        exchange_type: "fanout".into(),
        ..Default::default()
    };
    ch?.exchange_declare("logs", fanout, FieldTable::new(), move |ch, declared| {
        declared.expect("logs declared");
        ch.basic_publish("logs", "", &message, &BasicProperties::default(), false)
            .expect("an open channel");
        println!(" [x] Sent {message}");
        let conn = ch.connection().expect("the connection is open");
        conn.close(200, "done").expect("the connection is open");
    })
}
