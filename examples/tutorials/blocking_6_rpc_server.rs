//! RabbitMQ tutorial 6, "RPC" (`rpc_server.py`), on the blocking face:
//! take requests — a number `n` — from `rpc_queue`, one at a time, and
//! answer each with `fib(n)`, published to the request's `reply_to` queue
//! with its `correlation_id`.
//!
//! The tutorial runs until Ctrl-C; with COUNT the server stops after that
//! many requests.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_6_rpc_server -- 1 & sleep 5; cargo run --example blocking_6_rpc_client -- 30; wait'
//! ```
//!
//! Usage: `blocking_6_rpc_server [COUNT]`. The broker is `AMQP_URL` (default
//! `amqp://guest:guest@localhost:5672/%2F`).

use pika::{
    BasicConsumeOptions, BasicProperties, BlockingChannel, BlockingConnection, Delivery,
    FieldTable, QueueDeclareOptions, UrlParameters,
};

/// The n-th Fibonacci number, `None` when it does not fit in 128 bits.
fn fib(n: u32) -> Option<u128> {
    let (mut a, mut b) = (0u128, 1u128);
    for _ in 0..n {
        (a, b) = (b, a.checked_add(b)?);
    }
    Some(a)
}

fn on_request(channel: &BlockingChannel, delivery: &Delivery) -> Result<(), pika::Error> {
    let request = String::from_utf8_lossy(&delivery.body);
    let response = match request.trim().parse::<u32>() {
        Ok(n) => {
            println!(" [.] fib({n})");
            fib(n).map_or_else(
                || format!("error: fib({n}) is too large"),
                |f| f.to_string(),
            )
        }
        Err(e) => format!("error: {request:?} is not a number ({e})"),
    };
    let properties = &delivery.properties;
    if let Some(reply_to) = &properties.reply_to {
        let reply = BasicProperties {
            correlation_id: properties.correlation_id.clone(),
            ..Default::default()
        };
        channel.basic_publish("", reply_to, response, &reply, false)?;
    }
    channel.basic_ack(delivery.method.delivery_tag, false)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: Option<u64> = std::env::args().nth(1).map(|a| a.parse()).transpose()?;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    channel.queue_declare(
        "rpc_queue",
        QueueDeclareOptions::default(),
        FieldTable::new(),
    )?;

    let mut served = 0;
    let callback = move |channel: &BlockingChannel, delivery: Delivery| {
        if let Err(e) = on_request(channel, &delivery) {
            eprintln!("cannot answer: {e}");
            return;
        }
        served += 1;
        if Some(served) == count {
            if let Err(e) = channel.stop_consuming(None) {
                eprintln!("cannot stop consuming: {e}");
            }
        }
    };
    channel.basic_prefetch(1)?;
    channel.basic_consume("rpc_queue", callback, BasicConsumeOptions::default())?;

    println!(" [x] Awaiting RPC requests");
    channel.start_consuming()?;
    connection.close(200, "Normal shutdown")?;
    Ok(())
}
