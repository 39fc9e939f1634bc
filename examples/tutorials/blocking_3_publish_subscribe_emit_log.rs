//! RabbitMQ tutorial 3, "Publish/Subscribe" (`emit_log.py`), on the
//! blocking face: publish a log message — the arguments, or
//! `info: Hello World!` — to the fanout exchange `logs`, which copies it to
//! every queue bound to it.
//!
//! ```text
//! scripts/with-broker cargo run --example blocking_3_publish_subscribe_emit_log -- info: all is well
//! ```
//!
//! (Messages sent while no `blocking_3_publish_subscribe_receive_logs` runs
//! are dropped: no queue is bound then.)
//!
//! Usage: `blocking_3_publish_subscribe_emit_log [WORDS...]`. The broker is
//! `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{
    BasicProperties, BlockingConnection, ExchangeDeclareOptions, FieldTable, UrlParameters,
};

fn main() -> Result<(), pika::Error> {
    let words: Vec<String> = std::env::args().skip(1).collect();
    let message = if words.is_empty() {
        "info: Hello World!".to_string()
    } else {
        words.join(" ")
    };

    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    let fanout = ExchangeDeclareOptions {
        exchange_type: "fanout".into(),
        ..Default::default()
    };
    channel.exchange_declare("logs", fanout, FieldTable::new())?;

    channel.basic_publish("logs", "", &message, &BasicProperties::default(), false)?;
    println!(" [x] Sent {message}");
    connection.close(200, "Normal shutdown")
}
