//! pika's docs, 2.3.14 "TLS parameters example": a `BlockingConnection`
//! over TLS with mutual authentication — the broker's certificate is
//! verified against a CA, and the client presents a certificate of its
//! own — that declares `foobar`, publishes `Hello, world!` to it and
//! fetches it back with `basic_get`.
//!
//! Settings, from the environment (the names `scripts/with-broker`
//! exports; the defaults are pika's test data layout):
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `AMQPS_URL` | the broker | `amqps://guest:guest@localhost:5671/%2F` |
//! | `AMQP_TLS_CA` | CA certificate(s) for the broker's certificate (PEM) | `testdata/certs/ca_certificate.pem` |
//! | `AMQP_TLS_CLIENT_CERT` | the client's certificate (PEM) | `testdata/certs/client_certificate.pem` |
//! | `AMQP_TLS_CLIENT_KEY` | its private key (PEM) | `testdata/certs/client_key.pem` |
//!
//! The broker's certificate must be for `localhost` (pika's
//! `SSLOptions(context, "localhost")`).
//!
//! ```text
//! scripts/with-broker cargo run --example blocking_tls
//! ```

use std::path::PathBuf;

use pika::{
    BasicProperties, BlockingConnection, ConnectionParameters, FieldTable, QueueDeclareOptions,
    SslOptions, UrlParameters,
};

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() -> Result<(), pika::Error> {
    let url = setting("AMQPS_URL", "amqps://guest:guest@localhost:5671/%2F");
    let ca = PathBuf::from(setting("AMQP_TLS_CA", "testdata/certs/ca_certificate.pem"));
    let cert = PathBuf::from(setting(
        "AMQP_TLS_CLIENT_CERT",
        "testdata/certs/client_certificate.pem",
    ));
    let key = PathBuf::from(setting(
        "AMQP_TLS_CLIENT_KEY",
        "testdata/certs/client_key.pem",
    ));

    let ssl_options = SslOptions::from_pem_files(Some(&ca), Some((&cert, &key)))?
        .with_server_hostname("localhost");
    let mut parameters: ConnectionParameters = UrlParameters::parse(&url)?.into();
    parameters.set_ssl_options(Some(ssl_options));

    // Dropping the connection at the end of the block closes it, as pika's
    // `with` block does.
    {
        let connection = BlockingConnection::new(parameters)?;
        let channel = connection.channel(None)?;
        channel.queue_declare("foobar", QueueDeclareOptions::default(), FieldTable::new())?;
        channel.basic_publish(
            "",
            "foobar",
            "Hello, world!",
            &BasicProperties::default(),
            false,
        )?;
        // auto_ack: the message is not left behind in the queue.
        match channel.basic_get("foobar", true)? {
            Some(message) => {
                println!("{:?}", message.method);
                println!("{:?}", message.properties);
                println!("{}", String::from_utf8_lossy(&message.body));
            }
            None => println!("No message returned"),
        }
    }
    Ok(())
}
