//! pika's `create_connection` pattern: try several brokers in order, each
//! with its own parameters, on an event loop the program made itself
//! (pika's `custom_ioloop`). The first entry here points at a port where
//! nothing listens, so the connection falls back to the broker in
//! `AMQP_URL`.
//!
//! Run it: `scripts/with-broker cargo run --example connect_multiple_hosts`

use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use pika::{ConnectionParameters, Error, IoLoop, SelectConnection, UrlParameters};

/// Connects through the list and returns the address it reached.
pub fn run(url: &str) -> Result<Option<String>, Error> {
    let reachable: ConnectionParameters = UrlParameters::parse(url)?.into();

    // A first endpoint that refuses: a port we bound and released.
    let refused_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::IoLoop(std::sync::Arc::new(e)))?;
    let mut unreachable = ConnectionParameters::new();
    unreachable
        .set_host("127.0.0.1")?
        .set_port(refused_port)?
        .set_socket_timeout(Duration::from_secs(2))?;

    let ioloop = IoLoop::new().map_err(|e| Error::IoLoop(std::sync::Arc::new(e)))?;
    let reached = Rc::new(RefCell::new(None));
    let r = reached.clone();
    SelectConnection::create(
        vec![unreachable, reachable],
        move |conn| {
            let addr = conn.peer_address().map(|a| a.to_string());
            println!("connected to {}", addr.as_deref().unwrap_or("?"));
            *r.borrow_mut() = addr;
            let _ = conn.close(200, "done");
        },
        |conn, err| {
            eprintln!("no broker could be reached: {err}");
            conn.ioloop().stop();
        },
        |conn, reason| {
            println!("closed: {reason}");
            conn.ioloop().stop();
        },
        Some(ioloop.clone()),
    )?;
    ioloop
        .start()
        .map_err(|e| Error::IoLoop(std::sync::Arc::new(e)))?;
    ioloop.close();
    Ok(reached.borrow_mut().take())
}

#[allow(dead_code)] // the example tests call `run` instead
fn main() -> ExitCode {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2F".to_string());
    match run(&url) {
        Ok(Some(_)) => ExitCode::SUCCESS,
        Ok(None) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
