//! pika's `basic_consumer_threaded` (the threaded-ack pattern of the docs,
//! §2.2.1 `add_callback_threadsafe`) with a `BlockingConnection`: the
//! consumer callback hands each message to a thread of its own, which does
//! the slow work and acknowledges the message from there, while
//! `start_consuming` keeps the connection's heartbeats (5 s, as in pika)
//! flowing on the main thread.
//!
//! pika's worker acks with
//! `connection.add_callback_threadsafe(functools.partial(channel.basic_ack,
//! delivery_tag=...))`; here the callback takes an ack handle with
//! `channel.ack_handle(&delivery)` and moves it to the worker, whose
//! `ack()` is sent by the connection's thread. After COUNT acks (default
//! 6) the worker that made the count asks the connection thread, through
//! `add_callback_threadsafe`, to `stop_consuming`; the main thread then
//! joins the workers and closes.
//!
//! Like pika's, it declares `test_exchange` (direct, durable) and the
//! `standard` queue (auto-delete), bound with `standard_key`. Unlike
//! pika's, it first publishes COUNT messages there, so the workers have
//! work to do, and lets up to 4 messages be worked on at once (pika's
//! prefetch is 1). Each job takes WORK_SECONDS (default 2; pika's 10).
//!
//! ```text
//! scripts/with-broker cargo run --example blocking_consumer_threaded -- 8 1.5
//! ```
//!
//! Usage: `blocking_consumer_threaded [COUNT] [WORK_SECONDS]`. The broker is
//! `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use pika::{
    BasicConsumeOptions, BasicProperties, BlockingConnection, ConnectionParameters,
    ExchangeDeclareOptions, FieldTable, QueueDeclareOptions, UrlParameters,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().map_or(Ok(6), |a| a.parse())?;
    let work = Duration::from_secs_f64(args.next().map_or(Ok(2.0), |a| a.parse())?);

    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let mut parameters: ConnectionParameters = UrlParameters::parse(&url)?.into();
    parameters.set_heartbeat(5);
    let connection = BlockingConnection::new(parameters)?;
    let channel = connection.channel(None)?;
    let exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.exchange_declare("test_exchange", exchange, FieldTable::new())?;
    let queue = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    channel.queue_declare("standard", queue, FieldTable::new())?;
    channel.queue_bind(
        "standard",
        "test_exchange",
        Some("standard_key"),
        FieldTable::new(),
    )?;
    channel.basic_prefetch(4)?;

    for i in 1..=count {
        let body = format!("job {i}");
        channel.basic_publish(
            "test_exchange",
            "standard_key",
            body,
            &BasicProperties::default(),
            false,
        )?;
    }

    let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let handle = connection.threadsafe_handle();
    let number = channel.channel_number();
    let (workers, acks) = (threads.clone(), acked.clone());
    let on_message = move |channel: &pika::BlockingChannel, delivery: pika::Delivery| {
        let ack = channel.ack_handle(&delivery);
        let (acked, handle) = (acks.clone(), handle.clone());
        let worker = thread::spawn(move || {
            let body = String::from_utf8_lossy(&delivery.body);
            println!(
                "Thread {:?}: delivery tag {}, message body {body}",
                thread::current().id(),
                delivery.method.delivery_tag
            );
            thread::sleep(work);
            if let Err(e) = ack.ack() {
                eprintln!("delivery {} not acked: {e}", ack.delivery_tag());
                return;
            }
            println!("acked delivery {}", ack.delivery_tag());
            if acked.fetch_add(1, Ordering::SeqCst) + 1 == count {
                let stop = handle.add_callback_threadsafe(move |connection| {
                    if let Err(e) = connection
                        .channel_by_number(number)
                        .and_then(|channel| channel.stop_consuming(None))
                    {
                        eprintln!("cannot stop consuming: {e}");
                    }
                });
                if let Err(e) = stop {
                    eprintln!("cannot ask for a stop: {e}");
                }
            }
        });
        workers.lock().unwrap().push(worker);
    };
    channel.basic_consume("standard", on_message, BasicConsumeOptions::default())?;

    println!("Waiting for messages on queue standard");
    channel.start_consuming()?;
    // Wait for all to complete.
    for worker in threads.lock().unwrap().drain(..) {
        worker.join().expect("a worker panicked");
    }
    println!("{} messages acked, done", acked.load(Ordering::SeqCst));
    connection.close(200, "Normal shutdown")?;
    Ok(())
}
