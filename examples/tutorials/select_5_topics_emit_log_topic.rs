//! RabbitMQ tutorial 5, "Topics": the log emitter, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `emit_log_topic.py` in callback form: it
//! declares the topic exchange `topic_logs` and publishes one message (the
//! arguments after the first, or `Hello World!`) with a routing key of
//! dot-separated words (the first argument, or `anonymous.info`), then
//! closes. The queues whose binding pattern matches the key get it (`*`
//! matches one word, `#` any number).
//!
//! ```text
//! scripts/with-broker cargo run --example select_5_topics_emit_log_topic -- [ROUTING_KEY [MESSAGE...]]
//! ```

use pika::{BasicProperties, Channel, Error, ExchangeDeclareOptions, FieldTable, SelectConnection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let routing_key = args.first().cloned().unwrap_or("anonymous.info".into());
    let message = match args.get(1..) {
        Some(words) if !words.is_empty() => words.join(" "),
        _ => "Hello World!".into(),
    };
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| emit(ch, routing_key, message).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    Ok(())
}

/// Declares the exchange; once it exists, publishes and closes.
fn emit(ch: Result<Channel, Error>, routing_key: String, message: String) -> Result<(), Error> {
    let topic = ExchangeDeclareOptions {
        exchange_type: "topic".into(),
        ..Default::default()
    };
    ch?.exchange_declare(
        "topic_logs",
        topic,
        FieldTable::new(),
        move |ch, declared| {
            declared.expect("topic_logs declared");
            let props = BasicProperties::default();
            ch.basic_publish("topic_logs", &routing_key, &message, &props, false)
                .expect("an open channel");
            println!(" [x] Sent {routing_key}:{message}");
            let conn = ch.connection().expect("the connection is open");
            conn.close(200, "done").expect("the connection is open");
        },
    )
}
