//! pika's docs, 2.3.7 "Comparing Message Publishing with BlockingConnection
//! and SelectConnection": the same messages published to `test_exchange`
//! with the routing key `test_routing_key` (`text/plain`, delivery mode 1),
//! once with a `BlockingConnection` — straight-line code — and once with a
//! `SelectConnection` — callbacks on an event loop — each connecting,
//! publishing and closing, with the time each took.
//!
//! pika publishes one message; this publishes COUNT (default 1000) so the
//! timings say something. `test_exchange` is declared first (direct and
//! durable, as `blocking_consumer_threaded` declares it); bind a queue to
//! it with `test_routing_key` to keep the messages.
//!
//! ```text
//! scripts/with-broker cargo run --example blocking_publish_compare -- 10000
//! ```
//!
//! Usage: `blocking_publish_compare [COUNT]`. The broker is `AMQP_URL`
//! (default `amqp://guest:guest@localhost:5672/%2F`).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use pika::{
    BasicProperties, BlockingConnection, Channel, ConnectionParameters, Error,
    ExchangeDeclareOptions, FieldTable, SelectConnection, UrlParameters,
};

fn properties() -> BasicProperties {
    BasicProperties::transient().with_content_type("text/plain")
}

/// The blocking way: one call after the other.
fn publish_blocking(parameters: ConnectionParameters, count: u32) -> Result<(), Error> {
    let connection = BlockingConnection::new(parameters)?;
    let channel = connection.channel(None)?;
    for _ in 0..count {
        channel.basic_publish(
            "test_exchange",
            "test_routing_key",
            "message body value",
            &properties(),
            false,
        )?;
    }
    connection.close(200, "Normal shutdown")
}

/// The callback way: each step runs when the previous one has completed.
fn publish_select(parameters: ConnectionParameters, count: u32) -> Result<(), Error> {
    // Step #4: once the channel is open, publish, then close.
    let on_channel_open = move |channel: Result<Channel, Error>| {
        let Ok(channel) = channel else { return };
        for _ in 0..count {
            if let Err(e) = channel.basic_publish(
                "test_exchange",
                "test_routing_key",
                "message body value",
                &properties(),
                false,
            ) {
                eprintln!("cannot publish: {e}");
                break;
            }
        }
        if let Ok(connection) = channel.connection() {
            let _ = connection.close(200, "Normal shutdown");
        }
    };
    // Step #3: once connected, open a channel.
    let on_open = move |connection: &SelectConnection| {
        if let Err(e) = connection.channel(None, on_channel_open) {
            eprintln!("cannot open a channel: {e}");
            let _ = connection.close(200, "Normal shutdown");
        }
    };

    // Step #1: connect; the outcome is set when the connection ends.
    let outcome: Rc<RefCell<Result<(), Error>>> = Rc::new(RefCell::new(Ok(())));
    let (on_open_error, on_close) = (outcome.clone(), outcome.clone());
    let connection = SelectConnection::new(
        parameters,
        on_open,
        move |connection, error| {
            *on_open_error.borrow_mut() = Err(error);
            connection.ioloop().stop();
        },
        move |connection, reason| {
            if !matches!(
                reason,
                Error::ConnectionClosedByClient {
                    reply_code: 200,
                    ..
                }
            ) {
                *on_close.borrow_mut() = Err(reason);
            }
            connection.ioloop().stop();
        },
    )?;
    // Step #2: run the loop until the connection is closed.
    connection
        .ioloop()
        .start()
        .map_err(|e| Error::IoLoop(Arc::new(e)))?;
    outcome.replace(Ok(()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: u32 = std::env::args().nth(1).map_or(Ok(1000), |a| a.parse())?;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let parameters: ConnectionParameters = UrlParameters::parse(&url)?.into();

    let connection = BlockingConnection::new(parameters.clone())?;
    let exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    connection
        .channel(None)?
        .exchange_declare("test_exchange", exchange, FieldTable::new())?;
    connection.close(200, "Normal shutdown")?;

    let started = Instant::now();
    publish_blocking(parameters.clone(), count)?;
    println!(
        "BlockingConnection: published {count} messages in {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    publish_select(parameters, count)?;
    println!(
        "SelectConnection: published {count} messages in {:?}",
        started.elapsed()
    );
    Ok(())
}
