//! pika's docs, 2.3.4 "Using the Blocking Connection to consume messages
//! from RabbitMQ": a callback consumer on the `test` queue that prints and
//! acknowledges each message, run by `start_consuming`.
//!
//! pika's example runs until Ctrl-C; this one stops by itself: after COUNT
//! messages (default 10) the callback calls `stop_consuming`, and with
//! SECONDS a timer (`call_later`) calls it too, whatever came by then.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_delivery_confirmations && cargo run --example blocking_consume -- 5'
//! scripts/with-broker cargo run --example blocking_consume -- 10 3
//! ```
//!
//! Usage: `blocking_consume [COUNT] [SECONDS]`. The broker is `AMQP_URL`
//! (default `amqp://guest:guest@localhost:5672/%2F`).

use std::time::Duration;

use pika::{
    BasicConsumeOptions, BlockingConnection, FieldTable, QueueDeclareOptions, UrlParameters,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().map_or(Ok(10), |a| a.parse())?;
    let seconds: Option<u64> = args.next().map(|a| a.parse()).transpose()?;

    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.queue_declare("test", durable, FieldTable::new())?;

    let mut received = 0;
    let on_message = move |channel: &pika::BlockingChannel, delivery: pika::Delivery| {
        println!("{}", delivery.method.delivery_tag);
        println!("{}", String::from_utf8_lossy(&delivery.body));
        println!();
        if let Err(e) = channel.basic_ack(delivery.method.delivery_tag, false) {
            eprintln!("cannot ack: {e}");
        }
        received += 1;
        if received == count {
            println!("received {count} messages, stopping");
            if let Err(e) = channel.stop_consuming(None) {
                eprintln!("cannot stop consuming: {e}");
            }
        }
    };
    channel.basic_consume("test", on_message, BasicConsumeOptions::default())?;

    if let Some(seconds) = seconds {
        let number = channel.channel_number();
        connection.call_later(Duration::from_secs(seconds), move |connection| {
            println!("{seconds} s are up, stopping");
            if let Err(e) = connection
                .channel_by_number(number)
                .and_then(|channel| channel.stop_consuming(None))
            {
                eprintln!("cannot stop consuming: {e}");
            }
        });
    }

    println!("Waiting for messages on queue test");
    channel.start_consuming()?;
    connection.close(200, "Normal shutdown")?;
    Ok(())
}
