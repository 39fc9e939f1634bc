//! RabbitMQ tutorial 1, "Hello World!": the sender, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `send.py` in callback form: it declares
//! the queue `hello`, publishes `Hello World!` to it through the default
//! exchange, and closes the connection (the close goes out after the
//! message).
//!
//! ```text
//! scripts/with-broker cargo run --example select_1_hello_world_send
//! ```

use pika::{BasicProperties, Channel, Error, FieldTable, QueueDeclareOptions, SelectConnection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        |conn| {
            let on_open = |ch| send(ch).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    Ok(())
}

/// Declares the queue; once it exists, publishes and closes.
fn send(ch: Result<Channel, Error>) -> Result<(), Error> {
    let options = QueueDeclareOptions::default();
    ch?.queue_declare("hello", options, FieldTable::new(), |ch, declared| {
        declared.expect("hello declared");
        let props = BasicProperties::default();
        ch.basic_publish("", "hello", "Hello World!", &props, false)
            .expect("an open channel");
        println!(" [x] Sent 'Hello World!'");
        let conn = ch.connection().expect("the connection is open");
        conn.close(200, "done").expect("the connection is open");
    })
}
