//! RabbitMQ tutorial 1, "Hello World!" (`receive.py`), on the blocking
//! face: consume from the `hello` queue (auto-ack) and print each message.
//!
//! The tutorial runs until Ctrl-C; with COUNT it stops after that many
//! messages.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_1_hello_world_send && cargo run --example blocking_1_hello_world_receive -- 1'
//! ```
//!
//! Usage: `blocking_1_hello_world_receive [COUNT]`. The broker is `AMQP_URL`
//! (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{
    BasicConsumeOptions, BlockingChannel, BlockingConnection, Delivery, FieldTable,
    QueueDeclareOptions, UrlParameters,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: Option<u64> = std::env::args().nth(1).map(|a| a.parse()).transpose()?;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    channel.queue_declare("hello", QueueDeclareOptions::default(), FieldTable::new())?;

    let mut received = 0;
    let callback = move |channel: &BlockingChannel, delivery: Delivery| {
        println!(" [x] Received {}", String::from_utf8_lossy(&delivery.body));
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
    channel.basic_consume("hello", callback, options)?;

    println!(" [*] Waiting for messages. To exit press CTRL+C");
    channel.start_consuming()?;
    connection.close(200, "Normal shutdown")?;
    Ok(())
}
