//! A consumer that survives the broker closing its connection, on
//! `SelectConnection`: a compact version of pika's
//! `asynchronous_consumer_example.py`, as a pika user writes it.
//!
//! It names its connection `newcomer-consumer` (the `connection_name`
//! client property; a second argument overrides it), runs every connection
//! on one `IoLoop` of its own, declares the durable `task_queue`, sets a
//! prefetch window of 1, consumes, and acks each message 20 ms after it
//! arrives (on a timer; if the channel closed meanwhile it skips the ack,
//! and the broker redelivers the message). When a connection cannot be
//! opened or closes (`rabbitmqctl close_connection`, a broker restart), it
//! connects again after a delay that grows by 1 s per attempt up to 30 s,
//! back to 0 once it consumes. After `TARGET` distinct messages (default
//! 1000) it closes, stops the loop and prints what it did.
//!
//! ```text
//! scripts/with-broker cargo run --example reconnecting_consumer -- [TARGET [CONNECTION_NAME]]
//! ```

use std::cell::{Cell, RefCell};
use std::{collections::HashSet, rc::Rc, time::Duration};

use pika::{Channel, ConnectionParameters, Delivery, Error, FieldTable, IoLoop, SelectConnection};

const QUEUE: &str = "task_queue";

struct App {
    params: ConnectionParameters,
    ioloop: IoLoop,
    target: usize,
    seen: RefCell<HashSet<Vec<u8>>>, // the distinct message bodies acked
    acked: Cell<u32>,
    connections: Cell<u32>,
    stopping: Cell<bool>,
    delay: Cell<u64>, // seconds before the next connection attempt
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@localhost:5672/%2F".into());
    let mut args = std::env::args().skip(1);
    let target = args.next().map_or(Ok(1000), |n| n.parse())?;
    let mut params = pika::UrlParameters::parse(&url)?.into_parameters();
    params.set_connection_name(args.next().unwrap_or("newcomer-consumer".into()));
    let app = Rc::new(App {
        params,
        ioloop: IoLoop::new()?,
        target,
        seen: RefCell::default(),
        acked: Cell::new(0),
        connections: Cell::new(0),
        stopping: Cell::new(false),
        delay: Cell::new(0),
    });
    app.connect();
    app.ioloop.start()?;
    let (connections, acks) = (app.connections.get(), app.acked.get());
    let distinct = app.seen.borrow().len();
    println!("[app] done: {connections} connections, {acks} acks, {distinct} distinct messages");
    Ok(())
}

impl App {
    fn connect(self: &Rc<Self>) {
        self.connections.set(self.connections.get() + 1);
        println!("[app] connecting (#{})", self.connections.get());
        let (app, on_open_error, on_close) = (self.clone(), self.clone(), self.clone());
        SelectConnection::create(
            vec![self.params.clone()],
            move |conn| {
                let on_open = move |ch| app.consume(ch).expect("an open channel");
                conn.channel(None, on_open).expect("the connection is open");
            },
            move |_, err| on_open_error.on_close(err),
            move |_, reason| on_close.on_close(reason),
            Some(self.ioloop.clone()),
        )
        .expect("one parameter set and a loop");
    }

    /// The connection closed, or could not be opened: reconnect, unless
    /// stopping.
    fn on_close(self: &Rc<Self>, reason: Error) {
        println!("[app] connection closed: {reason}");
        if self.stopping.get() {
            return self.ioloop.stop();
        }
        println!("[app] reconnecting in {}s", self.delay.get());
        let app = self.clone();
        let delay = Duration::from_secs(self.delay.get());
        self.ioloop.call_later(delay, move || app.connect());
        self.delay.set((self.delay.get() + 1).min(30));
    }

    /// Declares the queue, sets the prefetch window and consumes (the
    /// channel sends each request once the previous one is answered).
    fn consume(self: &Rc<Self>, ch: Result<Channel, Error>) -> Result<(), Error> {
        let ch = ch?;
        ch.add_on_close_callback(|ch, _| {
            // Closing the connection (unless it is closing already) makes it reconnect.
            let _ = ch.connection().map(|c| c.close(200, "channel closed"));
        });
        let durable = pika::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare_nowait(QUEUE, durable, FieldTable::new())?;
        ch.basic_prefetch(1, |_, _| ())?;
        let (app, on_message) = (self.clone(), self.clone());
        let on_message = move |ch: &Channel, msg| on_message.on_message(ch, msg);
        ch.basic_consume(QUEUE, on_message, Default::default(), move |_, reply| {
            let Ok(ok) = reply else { return }; // refused: the channel closes, and so it reconnects
            println!("[app] consuming as {}", ok.consumer_tag);
            app.delay.set(0);
        })?;
        Ok(())
    }

    fn on_message(self: &Rc<Self>, ch: &Channel, msg: Delivery) {
        let (app, ch) = (self.clone(), ch.clone());
        self.ioloop.call_later(Duration::from_millis(20), move || {
            if ch.basic_ack(msg.method.delivery_tag, false).is_err() {
                return; // the channel closed meanwhile: the broker redelivers it
            }
            app.acked.set(app.acked.get() + 1);
            app.seen.borrow_mut().insert(msg.body);
            if app.seen.borrow().len() == app.target && !app.stopping.replace(true) {
                let conn = ch.connection().expect("the connection is open");
                conn.close(200, "done").expect("the connection is open");
            }
        });
    }
}
