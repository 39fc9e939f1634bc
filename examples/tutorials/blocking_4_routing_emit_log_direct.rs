//! RabbitMQ tutorial 4, "Routing" (`emit_log_direct.py`), on the blocking
//! face: publish a log message to the direct exchange `direct_logs` with
//! its severity as the routing key, so only the queues bound with that
//! severity get it.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_4_routing_receive_logs_direct -- --count 1 error & sleep 5; cargo run --example blocking_4_routing_emit_log_direct -- error "Run. Run. Or it will explode."; wait'
//! ```
//!
//! Usage: `blocking_4_routing_emit_log_direct [SEVERITY [WORDS...]]`
//! (default `info` and `Hello World!`). The broker is `AMQP_URL` (default
//! `amqp://guest:guest@localhost:5672/%2F`).

use pika::{
    BasicProperties, BlockingConnection, ExchangeDeclareOptions, FieldTable, UrlParameters,
};

fn main() -> Result<(), pika::Error> {
    let mut args = std::env::args().skip(1);
    let severity = args.next().unwrap_or_else(|| "info".to_string());
    let words: Vec<String> = args.collect();
    let message = if words.is_empty() {
        "Hello World!".to_string()
    } else {
        words.join(" ")
    };

    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    let direct = ExchangeDeclareOptions {
        exchange_type: "direct".into(),
        ..Default::default()
    };
    channel.exchange_declare("direct_logs", direct, FieldTable::new())?;

    channel.basic_publish(
        "direct_logs",
        &severity,
        &message,
        &BasicProperties::default(),
        false,
    )?;
    println!(" [x] Sent {severity}:{message}");
    connection.close(200, "Normal shutdown")
}
