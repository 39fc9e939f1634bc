//! pika's docs, 2.3.9 "Ensuring message delivery with the mandatory flag":
//! in confirm mode, a message published with `mandatory` that no queue
//! takes comes back from `basic_publish` as `Error::UnroutableError` (pika's
//! `UnroutableError`).
//!
//! Two messages go to the `test` exchange: one with the routing key `test`,
//! which the `test` queue is bound with (declared here, as in
//! `blocking_delivery_confirmations`), and one with ROUTING_KEY (default
//! `nobody-listens`), which no queue is bound with.
//!
//! ```text
//! scripts/with-broker cargo run --example blocking_mandatory
//! ```
//!
//! Usage: `blocking_mandatory [ROUTING_KEY]`. The broker is `AMQP_URL`
//! (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{
    BasicProperties, BlockingChannel, BlockingConnection, Error, ExchangeDeclareOptions,
    FieldTable, QueueDeclareOptions, UrlParameters,
};

fn publish(channel: &BlockingChannel, routing_key: &str) -> Result<(), Error> {
    let properties = BasicProperties::transient().with_content_type("text/plain");
    match channel.basic_publish("test", routing_key, "Hello World!", &properties, true) {
        Ok(()) => println!("Message was published (routing key {routing_key})"),
        Err(Error::UnroutableError { messages }) => {
            for message in messages.iter() {
                println!(
                    "Message was returned (routing key {}): {} {}",
                    message.method.routing_key,
                    message.method.reply_code,
                    message.method.reply_text
                );
            }
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let unroutable = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nobody-listens".to_string());
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    // Declare the queue and bind it to the exchange with the key `test`.
    let queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.queue_declare("test", queue, FieldTable::new())?;
    channel.exchange_declare("test", ExchangeDeclareOptions::default(), FieldTable::new())?;
    channel.queue_bind("test", "test", Some("test"), FieldTable::new())?;

    // Enable delivery confirmations. This is REQUIRED.
    channel.confirm_delivery()?;

    publish(&channel, "test")?;
    publish(&channel, &unroutable)?;

    connection.close(200, "Normal shutdown")?;
    Ok(())
}
