//! RabbitMQ tutorial 6, "RPC" (`rpc_client.py`), on the blocking face: a
//! `FibonacciRpcClient` whose `call(n)` publishes `n` to `rpc_queue` with
//! a fresh `correlation_id` and an exclusive callback queue as `reply_to`,
//! then processes events until the reply with that id arrives.
//!
//! ```text
//! scripts/with-broker sh -c 'cargo run --example blocking_6_rpc_server -- 2 & sleep 5; cargo run --example blocking_6_rpc_client -- 10 30; wait'
//! ```
//!
//! Usage: `blocking_6_rpc_client [N...]` (default 30). The broker is
//! `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2F`).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};

use pika::{
    BasicConsumeOptions, BasicProperties, BlockingChannel, BlockingConnection, Delivery, Error,
    FieldTable, QueueDeclareOptions, UrlParameters,
};

/// The call in flight: its correlation id, and the reply once it came.
#[derive(Default)]
struct Pending {
    correlation_id: String,
    response: Option<String>,
}

struct FibonacciRpcClient {
    connection: BlockingConnection,
    channel: BlockingChannel,
    callback_queue: String,
    pending: Arc<Mutex<Pending>>,
}

impl FibonacciRpcClient {
    fn new(url: &str) -> Result<FibonacciRpcClient, Error> {
        let connection = BlockingConnection::new(UrlParameters::parse(url)?)?;
        let channel = connection.channel(None)?;

        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let callback_queue = channel
            .queue_declare("", exclusive, FieldTable::new())?
            .queue;

        let pending = Arc::new(Mutex::new(Pending::default()));
        let on_response = {
            let pending = pending.clone();
            move |_: &BlockingChannel, delivery: Delivery| {
                let mut pending = pending.lock().unwrap();
                if delivery.properties.correlation_id.as_deref() == Some(&pending.correlation_id) {
                    pending.response = Some(String::from_utf8_lossy(&delivery.body).into_owned());
                }
            }
        };
        let options = BasicConsumeOptions {
            auto_ack: true,
            ..Default::default()
        };
        channel.basic_consume(&callback_queue, on_response, options)?;

        Ok(FibonacciRpcClient {
            connection,
            channel,
            callback_queue,
            pending,
        })
    }

    fn call(&self, n: u32) -> Result<String, Error> {
        let correlation_id = format!("{:016x}", RandomState::new().build_hasher().finish());
        *self.pending.lock().unwrap() = Pending {
            correlation_id: correlation_id.clone(),
            response: None,
        };
        let properties = BasicProperties::default()
            .with_reply_to(self.callback_queue.as_str())
            .with_correlation_id(correlation_id);
        self.channel
            .basic_publish("", "rpc_queue", n.to_string(), &properties, false)?;
        loop {
            if let Some(response) = self.pending.lock().unwrap().response.take() {
                return Ok(response);
            }
            self.connection.process_data_events(None)?;
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut numbers: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    if numbers.is_empty() {
        numbers.push(30);
    }
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    let fibonacci_rpc = FibonacciRpcClient::new(&url)?;

    for n in numbers {
        println!(" [x] Requesting fib({n})");
        let response = fibonacci_rpc.call(n)?;
        println!(" [.] Got {response}");
    }
    fibonacci_rpc.connection.close(200, "Normal shutdown")?;
    Ok(())
}
