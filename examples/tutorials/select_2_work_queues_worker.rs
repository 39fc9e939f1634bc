//! RabbitMQ tutorial 2, "Work queues": the worker, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `worker.py`, in the callback form a pika
//! user writes on `SelectConnection`: it consumes the durable
//! `task_queue` with a prefetch window of 1, "works" on each message for
//! 2 ms per dot in its body (on a loop timer, so the loop keeps running),
//! then acks it. With a count it closes after that many messages and
//! prints how many it processed.
//!
//! Run it (then `select_2_work_queues_new_task` to give it work):
//!
//! ```text
//! scripts/with-broker cargo run --example select_2_work_queues_worker -- [COUNT]
//! ```

use std::{cell::Cell, rc::Rc, time::Duration};

use pika::{Channel, Error, FieldTable, QueueDeclareOptions, SelectConnection};

const QUEUE: &str = "task_queue";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let limit: Option<u32> = std::env::args().nth(1).map(|n| n.parse()).transpose()?;
    let done = Rc::new(Cell::new(0));
    let counter = done.clone();
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| consume(ch, limit, counter).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    println!(" [x] processed {} messages", done.get());
    Ok(())
}

/// Declares the queue, sets the prefetch window and consumes: the channel
/// sends each request once the previous one is answered.
fn consume(
    ch: Result<Channel, Error>,
    limit: Option<u32>,
    done: Rc<Cell<u32>>,
) -> Result<(), Error> {
    let ch = ch?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare_nowait(QUEUE, durable, FieldTable::new())?;
    ch.basic_prefetch(1, |_, _| ())?;
    let on_message = move |ch: &Channel, msg| work(ch, msg, limit, done.clone());
    ch.basic_consume(QUEUE, on_message, Default::default(), |_, consuming| {
        consuming.expect("consuming task_queue");
        println!(" [*] Waiting for messages");
    })?;
    Ok(())
}

fn work(ch: &Channel, msg: pika::Delivery, limit: Option<u32>, done: Rc<Cell<u32>>) {
    println!(" [x] Received {}", String::from_utf8_lossy(&msg.body));
    let dots = msg.body.iter().filter(|&&b| b == b'.').count() as u64;
    let conn = ch.connection().expect("the connection is open");
    let ch = ch.clone();
    let ioloop = conn.ioloop().clone();
    ioloop.call_later(Duration::from_millis(2 * dots), move || {
        if ch.basic_ack(msg.method.delivery_tag, false).is_err() {
            return; // the channel closed meanwhile: the broker redelivers it
        }
        done.set(done.get() + 1);
        if limit == Some(done.get()) {
            conn.close(200, "done").expect("the connection is open");
        }
    });
}
