//! pika's docs, 2.3.6 "Using the BlockingChannel.consume generator to
//! consume messages": iterate over the `test` queue's messages with
//! `consume`, acknowledge each, break out after delivery tag COUNT
//! (default 10, as in pika), then `cancel` the consumer, which hands the
//! messages it had buffered back to the queue, and say how many.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_delivery_confirmations && cargo run --example blocking_consume_generator'
//! ```
//!
//! Usage: `blocking_consume_generator [COUNT]`. The broker is `AMQP_URL`
//! (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{BlockingConnection, FieldTable, QueueDeclareOptions, UrlParameters};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: u64 = std::env::args().nth(1).map_or(Ok(10), |a| a.parse())?;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.queue_declare("test", durable, FieldTable::new())?;

    // Get COUNT messages and break out.
    for message in channel.consume("test", false, false, FieldTable::new(), None)? {
        // Without an inactivity timeout there are no empty items.
        let Some(message) = message? else { continue };

        // Display the message parts.
        println!("{:?}", message.method);
        println!("{:?}", message.properties);
        println!("{}", String::from_utf8_lossy(&message.body));

        // Acknowledge the message.
        channel.basic_ack(message.method.delivery_tag, false)?;

        // Escape out of the loop after COUNT messages.
        if message.method.delivery_tag == count {
            break;
        }
    }

    // Cancel the consumer and return any pending messages.
    let requeued = channel.cancel()?;
    println!("Requeued {requeued} messages");

    // Close the channel and the connection.
    channel.close(200, "Normal shutdown")?;
    connection.close(200, "Normal shutdown")?;
    Ok(())
}
