//! After a connection ends — closed by us, refused at open, or failed — its
//! socket is closed (the process's file descriptors are back to where they
//! were) and every closure it stored is dropped, so closures that capture
//! handles cannot keep anything alive. One test in its own binary, so that
//! no other test opens descriptors meanwhile.

mod common;

use std::rc::Rc;
use std::time::Duration;

use common::{broker_params, run_loop};
use pika::{BasicConsumeOptions, ConnectionParameters, IoLoop, SelectConnection};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd is readable")
        .count()
}

/// Runs one connection to its end on `ioloop`; every callback captures
/// `token`, whose strong count shows whether they were dropped.
fn lifecycle(ioloop: &IoLoop, params: ConnectionParameters, token: &Rc<()>) {
    let (t1, t2, t3, t4) = (token.clone(), token.clone(), token.clone(), token.clone());
    let conn = SelectConnection::create(
        vec![params],
        move |conn| {
            let _ = &t1;
            let t = t1.clone();
            conn.add_on_connection_blocked_callback(move |_, _| {
                let _ = &t;
            });
            let t = t1.clone();
            conn.channel(None, move |ch| {
                let ch = ch.unwrap();
                let t2 = t.clone();
                ch.add_on_close_callback(move |_, _| {
                    let _ = &t2;
                });
                let t3 = t.clone();
                ch.basic_consume(
                    "amq.rabbitmq.reply-to",
                    move |_, _| {
                        let _ = &t3;
                    },
                    BasicConsumeOptions {
                        auto_ack: true,
                        ..Default::default()
                    },
                    |ch, ok| {
                        ok.unwrap();
                        ch.connection().unwrap().close(200, "done").unwrap();
                    },
                )
                .unwrap();
            })
            .unwrap();
        },
        move |conn, _| {
            let _ = &t2;
            conn.ioloop().stop();
        },
        move |conn, _| {
            let _ = &t3;
            conn.ioloop().stop();
        },
        Some(ioloop.clone()),
    )
    .unwrap();
    conn.add_on_close_callback(move |_, _| {
        let _ = &t4;
    });
    assert!(Rc::strong_count(token) >= 5, "the callbacks hold the token");
    run_loop(ioloop, Duration::from_secs(30));
    assert!(conn.is_closed());
}

#[test]
fn sockets_are_closed_and_stored_closures_dropped_after_every_ending() {
    let ioloop = IoLoop::new().unwrap();
    let token = Rc::new(());
    // Warm up anything lazily opened once per process.
    lifecycle(&ioloop, broker_params(), &token);
    let baseline = open_fds();

    for _ in 0..3 {
        lifecycle(&ioloop, broker_params(), &token);
    }
    let mut refused = broker_params();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    refused
        .set_host("127.0.0.1")
        .unwrap()
        .set_port(port)
        .unwrap();
    lifecycle(&ioloop, refused, &token);
    let mut wrong_vhost = broker_params();
    wrong_vhost.set_virtual_host("no-such-vhost").unwrap();
    lifecycle(&ioloop, wrong_vhost, &token);

    assert_eq!(open_fds(), baseline, "every socket was closed");
    assert_eq!(
        Rc::strong_count(&token),
        1,
        "every closure the connections stored was dropped"
    );
    ioloop.close();
}
