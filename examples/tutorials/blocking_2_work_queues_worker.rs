//! RabbitMQ tutorial 2, "Work Queues" (`worker.py`), on the blocking face:
//! take tasks from the durable `task_queue` one at a time (prefetch 1),
//! work a second per `.` in each, and acknowledge it when done, so a task
//! of a worker that dies goes to another.
//!
//! The work is `connection.sleep`, not `std::thread::sleep`: the
//! connection keeps answering heartbeats meanwhile. The tutorial runs
//! until Ctrl-C; with COUNT the worker stops after that many tasks.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_2_work_queues_new_task -- First message.. && cargo run --example blocking_2_work_queues_worker -- 1'
//! ```
//!
//! Usage: `blocking_2_work_queues_worker [COUNT]`. The broker is `AMQP_URL`
//! (default `amqp://guest:guest@localhost:5672/%2F`).

use std::time::Duration;

use pika::{
    BasicConsumeOptions, BlockingChannel, BlockingConnection, Delivery, FieldTable,
    QueueDeclareOptions, UrlParameters,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: Option<u64> = std::env::args().nth(1).map(|a| a.parse()).transpose()?;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.queue_declare("task_queue", durable, FieldTable::new())?;
    println!(" [*] Waiting for messages. To exit press CTRL+C");

    let mut done = 0;
    let callback = move |channel: &BlockingChannel, delivery: Delivery| {
        let body = String::from_utf8_lossy(&delivery.body);
        println!(" [x] Received {body}");
        let dots = body.matches('.').count() as u64;
        let worked = channel.connection().sleep(Duration::from_secs(dots));
        println!(" [x] Done");
        if let Err(e) = worked.and_then(|()| channel.basic_ack(delivery.method.delivery_tag, false))
        {
            eprintln!("cannot ack: {e}");
            return;
        }
        done += 1;
        if Some(done) == count {
            if let Err(e) = channel.stop_consuming(None) {
                eprintln!("cannot stop consuming: {e}");
            }
        }
    };
    channel.basic_prefetch(1)?;
    channel.basic_consume("task_queue", callback, BasicConsumeOptions::default())?;

    channel.start_consuming()?;
    connection.close(200, "Normal shutdown")?;
    Ok(())
}
