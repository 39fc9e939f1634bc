//! RabbitMQ tutorial 4, "Routing": the log receiver, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `receive_logs_direct.py` in callback
//! form: it declares the direct exchange `direct_logs` and a fresh
//! exclusive queue named by the broker, binds the queue once per severity
//! given, and prints every message it gets with its routing key (auto
//! acks). A first argument that is a number is a count: it then closes
//! after that many messages.
//!
//! ```text
//! scripts/with-broker cargo run --example select_4_routing_receive_logs_direct -- [COUNT] [info] [warning] [error]
//! ```

use pika::{BasicConsumeOptions, Channel, Delivery, Error, ExchangeDeclareOptions, FieldTable};
use pika::{QueueDeclareOptions, SelectConnection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let mut severities: Vec<String> = std::env::args().skip(1).collect();
    let limit: Option<u32> = severities.first().and_then(|n| n.parse().ok());
    if limit.is_some() {
        severities.remove(0);
    }
    if severities.is_empty() {
        eprintln!("Usage: select_4_routing_receive_logs_direct [COUNT] [info] [warning] [error]");
        std::process::exit(1);
    }
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| declare(ch, severities, limit).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    Ok(())
}

/// Declares the exchange and a private queue.
fn declare(
    ch: Result<Channel, Error>,
    severities: Vec<String>,
    limit: Option<u32>,
) -> Result<(), Error> {
    let ch = ch?;
    let direct = ExchangeDeclareOptions {
        exchange_type: "direct".into(),
        ..Default::default()
    };
    ch.exchange_declare_nowait("direct_logs", direct, FieldTable::new())?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    ch.queue_declare("", exclusive, FieldTable::new(), move |ch, declared| {
        let queue = declared.expect("a queue declared").queue;
        receive(ch, &queue, &severities, limit).expect("an open channel");
    })
}

/// Binds the queue once per severity and consumes from it (the channel
/// sends each request once the previous one is answered).
fn receive(
    ch: &Channel,
    queue: &str,
    severities: &[String],
    limit: Option<u32>,
) -> Result<(), Error> {
    for severity in severities {
        ch.queue_bind_nowait(queue, "direct_logs", Some(severity), FieldTable::new())?;
    }
    let mut received = 0;
    let on_message = move |ch: &Channel, msg: Delivery| {
        let body = String::from_utf8_lossy(&msg.body);
        println!(" [x] {}:{body}", msg.method.routing_key);
        received += 1;
        if limit == Some(received) {
            let conn = ch.connection().expect("the connection is open");
            conn.close(200, "done").expect("the connection is open");
        }
    };
    let auto_ack = BasicConsumeOptions {
        auto_ack: true,
        ..Default::default()
    };
    ch.basic_consume(queue, on_message, auto_ack, |_, consuming| {
        consuming.expect("consuming the queue");
        println!(" [*] Waiting for logs. To exit press CTRL+C");
    })?;
    Ok(())
}
