//! pika's docs, 2.3.8 "Using Delivery Confirmations with the
//! BlockingConnection": turn publisher confirms on with `confirm_delivery`;
//! `basic_publish` then returns once the broker has confirmed the message,
//! and an error when it could not take it.
//!
//! The message goes to the `test` exchange with the routing key `test`,
//! as in pika; the example declares that exchange (direct) and binds the
//! `test` queue to it, so the message lands in the queue.
//!
//! Then, beyond pika, COUNT more messages (default 100) are confirmed in a
//! window: `basic_publish_nowait` does not wait for each confirm, and
//! `wait_for_confirms` collects them, keeping at most 50 unconfirmed.
//!
//! ```text
//! scripts/with-broker cargo run --example blocking_delivery_confirmations -- 1000
//! ```
//!
//! Usage: `blocking_delivery_confirmations [COUNT]`. The broker is
//! `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{
    BasicProperties, BlockingConnection, Error, ExchangeDeclareOptions, FieldTable,
    QueueDeclareOptions, UrlParameters,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: u32 = std::env::args().nth(1).map_or(Ok(100), |a| a.parse())?;
    // Open a connection to RabbitMQ.
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;

    // Open the channel.
    let channel = connection.channel(None)?;

    // Declare the queue, and the exchange it gets the messages from.
    let queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.queue_declare("test", queue, FieldTable::new())?;
    channel.exchange_declare("test", ExchangeDeclareOptions::default(), FieldTable::new())?;
    channel.queue_bind("test", "test", Some("test"), FieldTable::new())?;

    // Turn on delivery confirmations.
    channel.confirm_delivery()?;

    // Send a message.
    let properties = BasicProperties::transient().with_content_type("text/plain");
    match channel.basic_publish("test", "test", "Hello World!", &properties, false) {
        Ok(()) => println!("Message publish was confirmed"),
        Err(Error::UnroutableError { .. } | Error::NackError { .. }) => {
            println!("Message could not be confirmed")
        }
        Err(e) => return Err(e.into()),
    }

    // Many messages, confirmed in a window.
    let (mut acked, mut nacked) = (0, 0);
    for i in 1..=count {
        let body = format!("Message {i}");
        channel.basic_publish_nowait("test", "test", body, &properties, false)?;
        let confirms = channel.wait_for_confirms(50)?;
        acked += confirms.acked.len();
        nacked += confirms.nacked.len();
    }
    let confirms = channel.wait_for_confirms(0)?;
    acked += confirms.acked.len();
    nacked += confirms.nacked.len();
    println!("{count} more messages published: {acked} acked, {nacked} nacked");

    connection.close(200, "Normal shutdown")?;
    Ok(())
}
