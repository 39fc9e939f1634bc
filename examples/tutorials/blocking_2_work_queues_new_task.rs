//! RabbitMQ tutorial 2, "Work Queues" (`new_task.py`), on the blocking
//! face: publish a task — the arguments, or `Hello World!` — as a
//! persistent message to the durable `task_queue`. Each `.` in it is a
//! second of work for `blocking_2_work_queues_worker`.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_2_work_queues_new_task -- First message.. && cargo run --example blocking_2_work_queues_worker -- 1'
//! ```
//!
//! Usage: `blocking_2_work_queues_new_task [WORDS...]`. The broker is
//! `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use pika::{BasicProperties, BlockingConnection, FieldTable, QueueDeclareOptions, UrlParameters};

fn main() -> Result<(), pika::Error> {
    let words: Vec<String> = std::env::args().skip(1).collect();
    let message = if words.is_empty() {
        "Hello World!".to_string()
    } else {
        words.join(" ")
    };

    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let connection = BlockingConnection::new(UrlParameters::parse(&url)?)?;
    let channel = connection.channel(None)?;

    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.queue_declare("task_queue", durable, FieldTable::new())?;

    channel.basic_publish(
        "",
        "task_queue",
        &message,
        &BasicProperties::persistent(),
        false,
    )?;
    println!(" [x] Sent {message}");
    connection.close(200, "Normal shutdown")
}
