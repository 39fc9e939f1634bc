//! RabbitMQ tutorial 5, "Topics": the log receiver, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `receive_logs_topic.py` in callback
//! form: it declares the topic exchange `topic_logs` and a fresh exclusive
//! queue named by the broker, binds the queue once per binding key given
//! (`kern.*`, `*.critical`, `#`: `*` stands for one word, `#` for any
//! number), and prints every message it gets with its routing key (auto
//! acks). A first argument that is a number is a count: it then closes
//! after that many messages.
//!
//! ```text
//! scripts/with-broker cargo run --example select_5_topics_receive_logs_topic -- [COUNT] BINDING_KEY...
//! ```

use pika::{BasicConsumeOptions, Channel, Delivery, Error, ExchangeDeclareOptions, FieldTable};
use pika::{QueueDeclareOptions, SelectConnection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let mut binding_keys: Vec<String> = std::env::args().skip(1).collect();
    let limit: Option<u32> = binding_keys.first().and_then(|n| n.parse().ok());
    if limit.is_some() {
        binding_keys.remove(0);
    }
    if binding_keys.is_empty() {
        eprintln!("Usage: select_5_topics_receive_logs_topic [COUNT] [binding_key]...");
        std::process::exit(1);
    }
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| declare(ch, binding_keys, limit).expect("an open channel");
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
    binding_keys: Vec<String>,
    limit: Option<u32>,
) -> Result<(), Error> {
    let ch = ch?;
    let topic = ExchangeDeclareOptions {
        exchange_type: "topic".into(),
        ..Default::default()
    };
    ch.exchange_declare_nowait("topic_logs", topic, FieldTable::new())?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    ch.queue_declare("", exclusive, FieldTable::new(), move |ch, declared| {
        let queue = declared.expect("a queue declared").queue;
        receive(ch, &queue, &binding_keys, limit).expect("an open channel");
    })
}

/// Binds the queue once per binding key and consumes from it (the channel
/// sends each request once the previous one is answered).
fn receive(
    ch: &Channel,
    queue: &str,
    binding_keys: &[String],
    limit: Option<u32>,
) -> Result<(), Error> {
    for binding_key in binding_keys {
        ch.queue_bind_nowait(queue, "topic_logs", Some(binding_key), FieldTable::new())?;
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
