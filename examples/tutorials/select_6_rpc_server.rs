//! RabbitMQ tutorial 6, "RPC": the server, on `SelectConnection`.
//!
//! Mirrors pika's tutorial program `rpc_server.py`, in the callback form a
//! pika user writes on `SelectConnection`: it declares
//! `rpc_queue`, takes one request at a time (prefetch 1), and answers each
//! request `n` with `fib(n)`, published to the request's `reply_to` with
//! its `correlation_id`, then acks the request. With a count it closes
//! after serving that many requests.
//!
//! Run it (then `select_6_rpc_client` to send it requests):
//!
//! ```text
//! scripts/with-broker cargo run --example select_6_rpc_server -- [COUNT]
//! ```

use std::error::Error;

use pika::{BasicProperties, Channel, Delivery, FieldTable, SelectConnection};

const QUEUE: &str = "rpc_queue";

fn fib(n: u32) -> u128 {
    (0..n).fold((0, 1), |(a, b), _| (b, a + b)).0
}

fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let limit: Option<u64> = std::env::args().nth(1).map(|n| n.parse()).transpose()?;
    let conn = SelectConnection::new(
        pika::UrlParameters::parse(&url)?,
        move |conn| {
            let on_open = move |ch| serve(ch, limit).expect("an open channel");
            conn.channel(None, on_open).expect("the connection is open");
        },
        |_, err| panic!("cannot connect: {err}"),
        |conn, _| conn.ioloop().stop(),
    )?;
    conn.ioloop().start()?;
    Ok(())
}

/// Declares the queue, sets the prefetch window and consumes (the channel
/// sends each request once the previous one is answered).
fn serve(ch: Result<Channel, pika::Error>, limit: Option<u64>) -> Result<(), pika::Error> {
    let ch = ch?;
    ch.queue_declare_nowait(QUEUE, Default::default(), FieldTable::new())?;
    ch.basic_prefetch(1, |_, _| ())?;
    let on_request = move |ch: &Channel, request| answer(ch, request, limit).expect("answered");
    ch.basic_consume(QUEUE, on_request, Default::default(), |_, consuming| {
        consuming.expect("consuming rpc_queue");
        println!(" [x] Awaiting RPC requests");
    })?;
    Ok(())
}

/// Answers a request; closes the connection after the `limit`-th (the
/// channel's delivery tags count its deliveries from 1).
fn answer(ch: &Channel, request: Delivery, limit: Option<u64>) -> Result<(), Box<dyn Error>> {
    let n = String::from_utf8_lossy(&request.body).parse()?;
    println!(" [.] fib({n})");
    let props = BasicProperties {
        correlation_id: request.properties.correlation_id,
        ..Default::default()
    };
    let reply_to = request.properties.reply_to.ok_or("no reply_to")?;
    ch.basic_publish("", &reply_to, fib(n).to_string(), &props, false)?;
    ch.basic_ack(request.method.delivery_tag, false)?;
    if limit == Some(request.method.delivery_tag) {
        ch.connection()?.close(200, "done")?;
    }
    Ok(())
}
