//! RabbitMQ tutorial 5, "Topics" (`emit_log_topic.py`), on the blocking
//! face: publish a log message to the topic exchange `topic_logs` with a
//! routing key of dot-separated words, `<facility>.<severity>`; queues
//! bound with patterns (`*` one word, `#` any number) get the ones that
//! match.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_5_topics_receive_logs_topic -- --count 1 "kern.*" & sleep 5; cargo run --example blocking_5_topics_emit_log_topic -- kern.critical "A critical kernel error"; wait'
//! ```
//!
//! Usage: `blocking_5_topics_emit_log_topic [ROUTING_KEY [WORDS...]]`
//! (default `anonymous.info` and `Hello World!`). The broker is `AMQP_URL`
//! (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{
    BasicProperties, BlockingConnection, ExchangeDeclareOptions, FieldTable, UrlParameters,
};

fn main() -> Result<(), pika::Error> {
    let mut args = std::env::args().skip(1);
    let routing_key = args.next().unwrap_or_else(|| "anonymous.info".to_string());
    let words: Vec<String> = args.collect();
    let message = if words.is_empty() {
        "Hello World!".to_string()
    } else {
        words.join(" ")
    };

    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    let topic = ExchangeDeclareOptions {
        exchange_type: "topic".into(),
        ..Default::default()
    };
    channel.exchange_declare("topic_logs", topic, FieldTable::new())?;

    channel.basic_publish(
        "topic_logs",
        &routing_key,
        &message,
        &BasicProperties::default(),
        false,
    )?;
    println!(" [x] Sent {routing_key}:{message}");
    connection.close(200, "Normal shutdown")
}
