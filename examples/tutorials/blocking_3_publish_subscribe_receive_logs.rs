//! RabbitMQ tutorial 3, "Publish/Subscribe" (`receive_logs.py`), on the
//! blocking face: bind a fresh, exclusive queue named by the broker to the
//! fanout exchange `logs`, and print every log message that reaches it.
//!
//! The tutorial runs until Ctrl-C; with COUNT it stops after that many
//! messages.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_3_publish_subscribe_receive_logs -- 1 & sleep 5; cargo run --example blocking_3_publish_subscribe_emit_log; wait'
//! ```
//!
//! Usage: `blocking_3_publish_subscribe_receive_logs [COUNT]`. The broker is
//! `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{
    BasicConsumeOptions, BlockingChannel, BlockingConnection, Delivery, ExchangeDeclareOptions,
    FieldTable, QueueDeclareOptions, UrlParameters,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: Option<u64> = std::env::args().nth(1).map(|a| a.parse()).transpose()?;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    let fanout = ExchangeDeclareOptions {
        exchange_type: "fanout".into(),
        ..Default::default()
    };
    channel.exchange_declare("logs", fanout, FieldTable::new())?;

    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("", exclusive, FieldTable::new())?
        .queue;
    channel.queue_bind(&queue, "logs", Some(""), FieldTable::new())?;

    println!(" [*] Waiting for logs. To exit press CTRL+C");

    let mut received = 0;
    let callback = move |channel: &BlockingChannel, delivery: Delivery| {
        println!(" [x] {}", String::from_utf8_lossy(&delivery.body));
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
    Ok(())
}
