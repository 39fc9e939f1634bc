//! pika's docs, 2.3.5 "Using the Blocking Connection with connection
//! recovery with multiple hosts": connect to the first reachable node of a
//! list, consume from `recovery-example`, and when the connection is lost
//! connect again and carry on; stop on channel errors.
//!
//! The list here has two entries: a port on 127.0.0.1 where nothing
//! listens (a node that is down), then `AMQP_URL`. pika shuffles the list
//! before each attempt to spread clients over the nodes; this example keeps
//! the order so that it always shows the fallback.
//!
//! It stops after COUNT messages (default 10), across reconnections; the
//! queue is not durable and is deleted with its last consumer, so publish
//! to it while the example runs (its test does, and closes the connection
//! with `rabbitmqctl close_all_connections` in between to show the
//! recovery):
//!
//! ```text
//! scripts/with-broker cargo run --example blocking_recovery -- 3
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pika::{
    BasicConsumeOptions, BlockingConnection, ConnectionParameters, Error, FieldTable,
    QueueDeclareOptions, UrlParameters,
};

/// Connects to the first node that answers and consumes until `received`
/// reaches `count`.
fn consume(
    endpoints: &[ConnectionParameters],
    received: &Arc<AtomicU64>,
    count: u64,
) -> Result<(), Error> {
    println!("Connecting...");
    let connection = BlockingConnection::new(endpoints)?;
    let params = connection.params();
    println!("Connected to {}:{}", params.host(), params.port());
    let channel = connection.channel(None)?;
    channel.basic_prefetch(1)?;
    // Intentionally not durable: see
    // https://www.rabbitmq.com/ha.html#non-mirrored-queue-behavior-on-node-failure
    let options = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    channel.queue_declare("recovery-example", options, FieldTable::new())?;

    let received = received.clone();
    let on_message = move |channel: &pika::BlockingChannel, delivery: pika::Delivery| {
        println!("{}", delivery.method.delivery_tag);
        println!("{}", String::from_utf8_lossy(&delivery.body));
        println!();
        if let Err(e) = channel.basic_ack(delivery.method.delivery_tag, false) {
            eprintln!("cannot ack: {e}");
            return;
        }
        if received.fetch_add(1, Ordering::SeqCst) + 1 == count {
            if let Err(e) = channel.stop_consuming(None) {
                eprintln!("cannot stop consuming: {e}");
            }
        }
    };
    channel.basic_consume(
        "recovery-example",
        on_message,
        BasicConsumeOptions::default(),
    )?;
    println!("Consuming from recovery-example");
    channel.start_consuming()?;
    connection.close(200, "Normal shutdown")
}

fn main() -> ExitCode {
    let count: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 10,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("usage: blocking_recovery [COUNT]: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let endpoints = match endpoints(&url) {
        Ok(endpoints) => endpoints,
        Err(e) => {
            eprintln!("bad settings: {e}");
            return ExitCode::FAILURE;
        }
    };

    let received = Arc::new(AtomicU64::new(0));
    loop {
        match consume(&endpoints, &received, count) {
            Ok(()) => {
                println!("Received {count} messages, done");
                return ExitCode::SUCCESS;
            }
            // Recover from a close by the broker too (the node was stopped
            // cleanly, an operator closed the connection); return here
            // instead to stop then.
            Err(Error::ConnectionClosedByBroker {
                reply_code,
                reply_text,
            }) => {
                println!(
                    "Connection was closed by the broker ({reply_code} {reply_text}), retrying..."
                );
            }
            // Do not recover on channel errors.
            Err(e) if e.is_channel_error() => {
                println!("Caught a channel error: {e}, stopping...");
                return ExitCode::FAILURE;
            }
            // Recover on all other connection errors.
            Err(e) if e.is_connection_error() => {
                println!("Connection was closed, retrying... ({e})");
            }
            Err(e) => {
                println!("Unexpected error: {e}, stopping...");
                return ExitCode::FAILURE;
            }
        }
        // A pause between attempts (pika's `retry` variant waits 5 s).
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A node that is down, then the one in `url`.
fn endpoints(url: &str) -> Result<Vec<ConnectionParameters>, Box<dyn std::error::Error>> {
    // A port that was free a moment ago: connecting to it is refused.
    let down_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut down = ConnectionParameters::new();
    down.set_host("127.0.0.1")?.set_port(down_port)?;
    Ok(vec![down, UrlParameters::parse(url)?.into()])
}
