//! RabbitMQ tutorial 6, "RPC": the client, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `rpc_client.py`, in the callback form a
//! pika user writes on `SelectConnection`, with RabbitMQ's direct reply-to
//! instead of a reply queue: it consumes
//! `amq.rabbitmq.reply-to` (auto-ack, as RabbitMQ requires), sends 100
//! requests `fib(0)` to `fib(99)` to `rpc_queue` at once, each with its own
//! `correlation_id` (the request's number), matches the replies to them,
//! and closes when all are answered or after 10 s; then it prints the
//! results.
//!
//! Run it (with `select_6_rpc_server` running to answer):
//!
//! ```text
//! scripts/with-broker cargo run --example select_6_rpc_client
//! ```

use std::{cell::RefCell, collections::BTreeMap, rc::Rc, time::Duration};

use pika::{BasicConsumeOptions, BasicProperties, Channel, Delivery, Error, SelectConnection};

const REPLY_TO: &str = "amq.rabbitmq.reply-to";
const REQUESTS: usize = 100;

/// The answers, `fib(n)` by `n`; each request's `correlation_id` is its `n`.
type Results = Rc<RefCell<BTreeMap<usize, String>>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let results = Results::default();
    let replies = results.clone();
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let timer = conn.clone(); // closes the connection in 10 s, unless closed already
            let time_out = move || drop(timer.close(200, "timed out"));
            conn.ioloop().call_later(Duration::from_secs(10), time_out);
            let on_open = move |ch| call(ch, replies).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    for (n, fib) in results.borrow().iter() {
        println!(" [.] fib({n}) = {fib}");
    }
    let answered = results.borrow().len();
    println!(" [x] {answered} results, {} missing", REQUESTS - answered);
    Ok(())
}

/// Consumes the replies and sends the requests. The channel sends the
/// requests after the Basic.Consume, so the broker knows where to reply;
/// if it refused the consumer, it drops them, and the client times out.
fn call(ch: Result<Channel, Error>, results: Results) -> Result<(), Error> {
    let ch = ch?;
    let on_reply = move |ch: &Channel, reply: Delivery| {
        let mut results = results.borrow_mut();
        let id = reply.properties.correlation_id.unwrap_or_default();
        if let Some(n) = id.parse().ok().filter(|&n| n < REQUESTS) {
            results.insert(n, String::from_utf8_lossy(&reply.body).into_owned());
        }
        if results.len() == REQUESTS {
            // Unless it is closing already, as when the 10 s ran out:
            let _ = ch.connection().map(|conn| conn.close(200, "done"));
        }
    };
    let auto_ack = BasicConsumeOptions {
        auto_ack: true,
        ..Default::default()
    };
    ch.basic_consume(REPLY_TO, on_reply, auto_ack, |_, _| ())?;
    let reply_to = BasicProperties::default().with_reply_to(REPLY_TO);
    for n in 0..REQUESTS {
        let props = reply_to.clone().with_correlation_id(n.to_string());
        ch.basic_publish("", "rpc_queue", n.to_string(), &props, false)?;
    }
    Ok(())
}
