//! RabbitMQ tutorial 5, "Topics" (`receive_logs_topic.py`), on the blocking
//! face: bind a fresh, exclusive queue to the topic exchange `topic_logs`
//! once per binding key given (patterns such as `kern.*`, `*.critical`,
//! `#`), and print the messages that reach it with their routing key.
//!
//! The tutorial runs until Ctrl-C; with `--count N` it stops after N
//! messages.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_5_topics_receive_logs_topic -- --count 1 "kern.*" & sleep 5; cargo run --example blocking_5_topics_emit_log_topic -- kern.critical "A critical kernel error"; wait'
//! ```
//!
//! Usage: `blocking_5_topics_receive_logs_topic [--count N] BINDING_KEY...`.
//! The broker is `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use std::process::ExitCode;

use pika::{
    BasicConsumeOptions, BlockingChannel, BlockingConnection, Delivery, ExchangeDeclareOptions,
    FieldTable, QueueDeclareOptions, UrlParameters,
};

fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut count: Option<u64> = None;
    if args.first().map(String::as_str) == Some("--count") && args.len() >= 2 {
        count = Some(args[1].parse()?);
        args.drain(..2);
    }
    let binding_keys = args;
    if binding_keys.is_empty() {
        eprintln!("Usage: blocking_5_topics_receive_logs_topic [--count N] [binding_key]...");
        return Ok(ExitCode::FAILURE);
    }

    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    let topic = ExchangeDeclareOptions {
        exchange_type: "topic".into(),
        ..Default::default()
    };
    channel.exchange_declare("topic_logs", topic, FieldTable::new())?;

    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("", exclusive, FieldTable::new())?
        .queue;
    for binding_key in &binding_keys {
        channel.queue_bind(&queue, "topic_logs", Some(binding_key), FieldTable::new())?;
    }

    println!(" [*] Waiting for logs. To exit press CTRL+C");

    let mut received = 0;
    let callback = move |channel: &BlockingChannel, delivery: Delivery| {
        let body = String::from_utf8_lossy(&delivery.body);
        println!(" [x] {}:{body}", delivery.method.routing_key);
        received += 1;
        if Some(received) == count {
            if let Err(e) = channel.stop_consuming(None) {
                eprintln!("cannot stop consuming: {e}");
            }
        }
    };
    let options = BasicConsumeOptions {
        auto_ack: true,
        ..Default::default()
    };
    channel.basic_consume(&queue, callback, options)?;

    channel.start_consuming()?;
    connection.close(200, "Normal shutdown")?;
    Ok(ExitCode::SUCCESS)
}
