//! pika's docs, 2.3.3 "Using the Blocking Connection to get a message from
//! RabbitMQ": fetch one message from the `test` queue with `basic_get`,
//! print it and acknowledge it, or say that there was none.
//!
//! The queue is declared first (durable, as in 2.3.8) so that the example
//! also works on a fresh broker; `blocking_delivery_confirmations` puts
//! messages in it:
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_delivery_confirmations && cargo run --example blocking_basic_get'
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{BlockingConnection, FieldTable, QueueDeclareOptions, UrlParameters};

fn main() -> Result<(), pika::Error> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.queue_declare("test", durable, FieldTable::new())?;

    match channel.basic_get("test", false)? {
        Some(message) => {
            println!("{:?}", message.method);
            println!("{:?}", message.properties);
            println!("{}", String::from_utf8_lossy(&message.body));
            channel.basic_ack(message.method.delivery_tag, false)?;
            println!("acked delivery {}", message.method.delivery_tag);
        }
        None => println!("No message returned"),
    }
    connection.close(200, "Normal shutdown")
}
