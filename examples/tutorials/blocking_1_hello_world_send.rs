//! RabbitMQ tutorial 1, "Hello World!" (`send.py`), on the blocking face:
//! declare the `hello` queue and publish `Hello World!` to it through the
//! default exchange.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_1_hello_world_send && cargo run --example blocking_1_hello_world_receive -- 1'
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{BasicProperties, BlockingConnection, FieldTable, QueueDeclareOptions, UrlParameters};

fn main() -> Result<(), pika::Error> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    channel.queue_declare("hello", QueueDeclareOptions::default(), FieldTable::new())?;

    channel.basic_publish(
        "",
        "hello",
        "Hello World!",
        &BasicProperties::default(),
        false,
    )?;
    println!(" [x] Sent 'Hello World!'");
    connection.close(200, "Normal shutdown")
}
