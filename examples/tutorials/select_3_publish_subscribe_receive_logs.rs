//! RabbitMQ tutorial 3, "Publish/Subscribe": the log receiver, on
//! `SelectConnection`.
//!
//! Mirrors pika's tutorial program `receive_logs.py` in callback form: it
//! declares the fanout exchange `logs` and a fresh exclusive queue named by
//! the broker, binds the queue to `logs`, and prints every message (auto
//! acks). With a count it closes after that many messages; its queue goes
//! with its connection.
//!
//! ```text
//! scripts/with-broker cargo run --example select_3_publish_subscribe_receive_logs -- [COUNT]
//! ```

use pika::{BasicConsumeOptions, Channel, Delivery, Error, ExchangeDeclareOptions, FieldTable};
use pika::{QueueDeclareOptions, SelectConnection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let limit: Option<u32> = std::env::args().nth(1).map(|n| n.parse()).transpose()?;
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| declare(ch, limit).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    Ok(())
}

/// Declares the exchange and a private queue.
fn declare(ch: Result<Channel, Error>, limit: Option<u32>) -> Result<(), Error> {
    let ch = ch?;
    let fanout = ExchangeDeclareOptions {
        exchange_type: "fanout".into(),
        ..Default::default()
    };
    ch.exchange_declare_nowait("logs", fanout, FieldTable::new())?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    ch.queue_declare("", exclusive, FieldTable::new(), move |ch, declared| {
        let queue = declared.expect("a queue declared").queue;
        receive(ch, &queue, limit).expect("an open channel");
    })
}

/// Binds the queue to `logs` and consumes from it (the channel sends each
/// request once the previous one is answered).
fn receive(ch: &Channel, queue: &str, limit: Option<u32>) -> Result<(), Error> {
    ch.queue_bind_nowait(queue, "logs", None, FieldTable::new())?;
    let mut received = 0;
    let on_message = move |ch: &Channel, msg: Delivery| {
        println!(" [x] {}", String::from_utf8_lossy(&msg.body));
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
