//! The README's main example: connect to RabbitMQ in continuation-passing
//! style, open a channel, close it and the connection cleanly, printing
//! each step. Reads the broker from `AMQP_URL` (default
//! `amqp://guest:guest@localhost:5672/%2F`).
//!
//! Run it with a private broker: `scripts/with-broker cargo run --example connect`

use std::cell::Cell;
use std::process::ExitCode;
use std::rc::Rc;

use pika::{Channel, Error, SelectConnection, UrlParameters};

/// Step 2: the connection is open — open a channel.
fn on_connected(conn: &SelectConnection) {
    println!(
        "connected to {} (channel_max {}, frame_max {}, heartbeat {} s)",
        conn.peer_address()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        conn.channel_max(),
        conn.frame_max(),
        conn.heartbeat()
    );
    if let Err(e) = conn.channel(None, on_channel_open) {
        eprintln!("cannot open a channel: {e}");
    }
}

/// Step 3: the channel is open — close it again.
fn on_channel_open(result: Result<Channel, Error>) {
    let channel = match result {
        Ok(channel) => channel,
        Err(e) => {
            eprintln!("channel did not open: {e}");
            return;
        }
    };
    println!("channel {} open", channel.channel_number());
    channel.add_on_close_callback(on_channel_closed);
    if let Err(e) = channel.close(200, "example done") {
        eprintln!("cannot close the channel: {e}");
    }
}

/// Step 4: the channel is closed — close the connection.
fn on_channel_closed(channel: &Channel, reason: Error) {
    println!("channel {} closed: {reason}", channel.channel_number());
    if let Ok(conn) = channel.connection() {
        if let Err(e) = conn.close(200, "example done") {
            eprintln!("cannot close the connection: {e}");
        }
    }
}

/// Connects and runs the loop until the connection is closed; true when
/// everything went as planned.
pub fn run(url: &str) -> Result<bool, Error> {
    let params = UrlParameters::parse(url)?;
    println!("connecting to {params}");
    let clean = Rc::new(Cell::new(false));
    let on_close_clean = clean.clone();
    // Step 1: create the connection, then run its loop.
    let conn = SelectConnection::new(
        params,
        on_connected,
        |conn, err| {
            eprintln!("could not connect: {err}");
            conn.ioloop().stop();
        },
        move |conn, reason| {
            println!("connection closed: {reason}");
            on_close_clean.set(matches!(
                reason,
                Error::ConnectionClosedByClient {
                    reply_code: 200,
                    ..
                }
            ));
            conn.ioloop().stop();
        },
    )?;
    conn.ioloop()
        .start()
        .map_err(|e| Error::IoLoop(std::sync::Arc::new(e)))?;
    Ok(clean.get())
}

#[allow(dead_code)] // the example tests call `run` instead
fn main() -> ExitCode {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    match run(&url) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
