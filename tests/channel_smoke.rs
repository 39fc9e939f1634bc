//! A first round trip through the broker: declare, publish, consume, ack,
//! get, confirm.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use common::{broker_params, run_loop};
use pika::{
    BasicConsumeOptions, BasicProperties, Confirmation, FieldTable, QueueDeclareOptions,
    SelectConnection,
};

#[test]
fn publish_consume_ack_get_and_confirm_round_trip() {
    let log = Rc::new(RefCell::new(Vec::<String>::new()));
    let l = log.clone();
    let conn = SelectConnection::new(
        broker_params(),
        move |conn| {
            let l = l.clone();
            conn.channel(None, move |ch| {
                let ch = ch.unwrap();
                let l = l.clone();
                let opts = QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                };
                ch.queue_declare("", opts, FieldTable::new(), move |ch, ok| {
                    let queue = ok.unwrap().queue;
                    assert!(queue.starts_with("amq.gen-"), "{queue}");
                    let l2 = l.clone();
                    ch.confirm_delivery(
                        move |_, c: Confirmation| {
                            for tag in c.settled() {
                                l2.borrow_mut().push(format!("confirm {tag}"))
                            }
                        },
                        |_, ok| {
                            ok.unwrap();
                        },
                    )
                    .unwrap();
                    for i in 0..3u8 {
                        let tag = ch
                            .basic_publish(
                                "",
                                &queue,
                                [i; 5],
                                &BasicProperties::default().with_priority(i),
                                false,
                            )
                            .unwrap();
                        assert_eq!(tag, Some(u64::from(i) + 1));
                    }
                    let l3 = l.clone();
                    let q2 = queue.clone();
                    ch.basic_get(&queue, false, move |ch, msg| {
                        let msg = msg.unwrap().expect("a message");
                        l3.borrow_mut().push(format!("get {:?}", msg.body));
                        ch.basic_ack(msg.method.delivery_tag, false).unwrap();
                        let l4 = l3.clone();
                        ch.basic_consume(
                            &q2,
                            move |ch, d| {
                                l4.borrow_mut().push(format!(
                                    "deliver {:?} p{:?}",
                                    d.body, d.properties.priority
                                ));
                                ch.basic_ack(d.method.delivery_tag, false).unwrap();
                                if d.body[0] == 2 {
                                    ch.connection().unwrap().close(200, "done").unwrap();
                                }
                            },
                            BasicConsumeOptions::default(),
                            |_, ok| {
                                ok.unwrap();
                            },
                        )
                        .unwrap();
                    })
                    .unwrap();
                })
                .unwrap();
            })
            .unwrap();
        },
        |_, e| panic!("open failed: {e}"),
        |conn, _| conn.ioloop().stop(),
    )
    .unwrap();
    run_loop(conn.ioloop(), Duration::from_secs(20));
    let log = log.borrow();
    assert!(log.contains(&"get [0, 0, 0, 0, 0]".to_string()), "{log:?}");
    assert!(
        log.contains(&"deliver [1, 1, 1, 1, 1] pSome(1)".to_string()),
        "{log:?}"
    );
    assert!(
        log.contains(&"deliver [2, 2, 2, 2, 2] pSome(2)".to_string()),
        "{log:?}"
    );
    // The broker confirms all three, possibly with one multiple ack.
    for tag in 1..=3 {
        assert!(log.contains(&format!("confirm {tag}")), "{log:?}");
    }
}
