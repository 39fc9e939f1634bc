//! RabbitMQ tutorial 2, "Work queues": the producer, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `new_task.py`, in the callback form a
//! pika user writes on `SelectConnection`: it declares the
//! durable `task_queue`, turns on publisher confirms, publishes 1 000
//! persistent tasks (`Hello N` with 0 to 4 dots, one dot per 2 ms of work),
//! counts the broker's acks and nacks, and closes once every message is
//! settled.
//!
//! Run it (with `select_2_work_queues_worker` running to do the work):
//!
//! ```text
//! scripts/with-broker cargo run --example select_2_work_queues_new_task
//! ```

use std::{cell::Cell, rc::Rc};

use pika::{BasicProperties, Channel, Error, FieldTable, QueueDeclareOptions, SelectConnection};

const QUEUE: &str = "task_queue";
const COUNT: usize = 1000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let settled = Rc::new(Cell::new((0, 0))); // (acked, nacked)
    let counter = settled.clone();
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| publish(ch, counter).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    let (acked, nacked) = settled.get();
    println!(" [x] acked {acked}, nacked {nacked}");
    Ok(())
}

/// Declares the queue, turns on confirms and publishes: the channel sends
/// each request once the previous one is answered, the messages after them.
fn publish(ch: Result<Channel, Error>, settled: Rc<Cell<(usize, usize)>>) -> Result<(), Error> {
    let ch = ch?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare_nowait(QUEUE, durable, FieldTable::new())?;
    ch.confirm_delivery(
        move |ch, confirmed| on_confirm(ch, confirmed, &settled),
        |_, _| (),
    )?;
    for i in 0..COUNT {
        let body = format!("Hello {i}{}", ".".repeat(i % 5));
        ch.basic_publish("", QUEUE, body, &BasicProperties::persistent(), false)?;
    }
    println!(" [x] Sent {COUNT} messages");
    Ok(())
}

fn on_confirm(ch: &Channel, confirmed: pika::Confirmation, settled: &Cell<(usize, usize)>) {
    let (mut acked, mut nacked) = settled.get();
    if confirmed.is_ack() {
        acked += confirmed.settled().len();
    } else {
        nacked += confirmed.settled().len(); // nacked, or failed: the channel closed
    }
    settled.set((acked, nacked));
    if acked + nacked == COUNT {
        // Unless it is closing already, as when the channel failed:
        let _ = ch.connection().map(|conn| conn.close(200, "done"));
    }
}
