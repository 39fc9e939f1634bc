//! RabbitMQ tutorial 1, "Hello World!": the receiver, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `receive.py` in callback form: it
//! declares the queue `hello`, consumes from it with automatic acks, and
//! prints every message. With a count it closes after that many messages
//! (messages that arrive meanwhile are lost: they were acked on delivery).
//!
//! ```text
//! scripts/with-broker cargo run --example select_1_hello_world_receive -- [COUNT]
//! ```

use pika::{BasicConsumeOptions, Channel, Delivery, Error, FieldTable, SelectConnection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let limit: Option<u32> = std::env::args().nth(1).map(|n| n.parse()).transpose()?;
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| receive(ch, limit).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    Ok(())
}

/// Declares the queue and consumes (the channel sends each request once
/// the previous one is answered).
fn receive(ch: Result<Channel, Error>, limit: Option<u32>) -> Result<(), Error> {
    let ch = ch?;
    ch.queue_declare_nowait("hello", Default::default(), FieldTable::new())?;
    let mut received = 0;
    let on_message = move |ch: &Channel, msg: Delivery| {
        println!(" [x] Received {}", String::from_utf8_lossy(&msg.body));
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
    ch.basic_consume("hello", on_message, auto_ack, |_, consuming| {
        consuming.expect("consuming hello");
        println!(" [*] Waiting for messages. To exit press CTRL+C");
    })?;
    Ok(())
}
