//! Runs the examples against the broker: each example's `run` is compiled
//! into this test binary and must succeed.

mod common;

#[path = "../examples/connect.rs"]
mod connect;

#[path = "../examples/connect_multiple_hosts.rs"]
mod connect_multiple_hosts;

#[path = "../examples/server_properties.rs"]
mod server_properties;

#[test]
fn connect_example_opens_a_channel_and_closes_cleanly() {
    let clean = connect::run(&common::amqp_url()).expect("the example runs");
    assert!(clean, "the connection was closed by the client with 200");
}

#[test]
fn connect_multiple_hosts_example_falls_back_to_the_reachable_broker() {
    let reached = connect_multiple_hosts::run(&common::amqp_url())
        .expect("the example runs")
        .expect("a broker was reached");
    assert!(
        reached.ends_with(&format!(":{}", common::broker_params().port())),
        "{reached}"
    );
}

#[test]
fn server_properties_example_reads_rabbitmqs_connection_start() {
    let start = server_properties::run(&common::amqp_url()).expect("the example runs");
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    assert_eq!(
        start
            .server_properties
            .get("product")
            .and_then(pika::FieldValue::as_str),
        Some("RabbitMQ")
    );
    assert!(start.mechanisms.to_string().contains("PLAIN"));
}
