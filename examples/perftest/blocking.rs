//! The blocking face's workloads: the select face's P1, P2, C1 and L1 written
//! as a `BlockingConnection` user writes them, on the calling thread.
//!
//! | name | what is timed |
//! |------|---------------|
//! | `BP1` | `basic_publish` × n without confirms (paced by the same watermarks as P1), until a passive declare counts them all |
//! | `BP2` | confirm mode, one `basic_publish` at a time, each waiting for its ack (pika's blocking confirm mode) |
//! | `BP2W` | confirm mode through the window API: `basic_publish_nowait` with `wait_for_confirms(1 000)`, then the last acks |
//! | `BC1` | the `consume()` iterator over n pre-loaded messages (prefetch 1 000), one `basic_ack` each |
//! | `BL1` | publish → next message of `consume()` (auto-ack), one at a time: p50 / p99 |

use pika::{BasicProperties, BlockingChannel, BlockingConnection, FieldTable, QueueDeclareOptions};

use super::{
    C1_PREFETCH, Error, HIGH_WATER, LOW_WATER, MAX_UNCONFIRMED, Measured, Phase, SMALL_BODY,
    failure,
};

/// A blocking connection, a channel and a fresh exclusive server-named
/// queue, as each workload starts with.
struct Bench {
    conn: BlockingConnection,
    channel: BlockingChannel,
    queue: String,
}

impl Bench {
    fn open(params: pika::ConnectionParameters) -> Result<Bench, Error> {
        let conn = BlockingConnection::new(params)?;
        conn.set_outbound_watermarks(HIGH_WATER, LOW_WATER)?;
        let channel = conn.channel(None)?;
        let options = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let queue = channel.queue_declare("", options, FieldTable::new())?.queue;
        Ok(Bench {
            conn,
            channel,
            queue,
        })
    }

    /// Publishes `n` small messages without confirms.
    fn publish(&self, n: u64) -> Result<(), Error> {
        let body = [0xA5; SMALL_BODY];
        let properties = BasicProperties::default();
        for _ in 0..n {
            self.channel
                .basic_publish("", &self.queue, body, &properties, false)?;
        }
        Ok(())
    }

    /// Asks with passive declares until the queue holds `n` messages.
    fn await_queued(&self, n: u64) -> Result<(), Error> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        loop {
            let ok = self
                .channel
                .queue_declare(&self.queue, passive.clone(), FieldTable::new())?;
            if u64::from(ok.message_count) >= n {
                return Ok(());
            }
        }
    }

    fn close(self) -> Result<(), Error> {
        self.conn.close(200, "perftest done")
    }
}

/// Runs the blocking workload `name` (`BP1`, …) with `n` messages on this
/// thread; `None` when `name` is not one of them.
pub fn run(
    name: &str,
    n: u64,
    params: impl FnOnce() -> Result<pika::ConnectionParameters, Error>,
) -> Option<Result<Measured, Error>> {
    let workload: fn(&Bench, u64) -> Result<Measured, Error> = match name {
        "BP1" => publish_without_confirms,
        "BP2" => publish_confirmed_one_at_a_time,
        "BP2W" => publish_confirmed_in_a_window,
        "BC1" => consume_and_ack,
        "BL1" => round_trips,
        _ => return None,
    };
    Some(params().and_then(Bench::open).and_then(|bench| {
        let measured = workload(&bench, n)?;
        bench.close()?;
        Ok(measured)
    }))
}

/// BP1.
fn publish_without_confirms(bench: &Bench, n: u64) -> Result<Measured, Error> {
    let phase = Phase::start();
    bench.publish(n)?;
    bench.await_queued(n)?;
    Ok(phase.finish())
}

/// BP2: pika's blocking confirm mode, a round trip per message.
fn publish_confirmed_one_at_a_time(bench: &Bench, n: u64) -> Result<Measured, Error> {
    bench.channel.confirm_delivery()?;
    let body = [0xA5; SMALL_BODY];
    let properties = BasicProperties::default();
    let phase = Phase::start();
    for _ in 0..n {
        bench
            .channel
            .basic_publish("", &bench.queue, body, &properties, false)?;
    }
    Ok(phase.finish())
}

/// BP2W: at most [`MAX_UNCONFIRMED`] in flight.
fn publish_confirmed_in_a_window(bench: &Bench, n: u64) -> Result<Measured, Error> {
    bench.channel.confirm_delivery()?;
    let body = [0xA5; SMALL_BODY];
    let properties = BasicProperties::default();
    let window = MAX_UNCONFIRMED as usize;
    let mut acked = 0u64;
    let mut tally = |confirms: pika::blocking::Confirms| -> Result<(), Error> {
        if let Some(tag) = confirms.nacked.first().or(confirms.failed.first()) {
            return Err(failure(format!("message {tag} was not acked")));
        }
        acked += confirms.acked.len() as u64;
        Ok(())
    };
    let phase = Phase::start();
    for _ in 0..n {
        bench
            .channel
            .basic_publish_nowait("", &bench.queue, body, &properties, false)?;
        tally(bench.channel.wait_for_confirms(window)?)?;
    }
    tally(bench.channel.wait_for_confirms(0)?)?;
    let measured = phase.finish();
    if acked != n {
        return Err(failure(format!("{acked} of {n} acked")));
    }
    Ok(measured)
}

/// BC1: pre-loads n (untimed), then iterates `consume()` acking each.
fn consume_and_ack(bench: &Bench, n: u64) -> Result<Measured, Error> {
    bench.publish(n)?;
    bench.await_queued(n)?;
    bench.channel.basic_qos(0, C1_PREFETCH, false)?;
    let phase = Phase::start();
    let mut received = 0u64;
    for message in bench
        .channel
        .consume(&bench.queue, false, false, FieldTable::new(), None)?
    {
        let Some(message) = message? else { continue };
        if message.body.len() != SMALL_BODY {
            return Err(failure(format!(
                "a {}-byte body arrived, {SMALL_BODY} were sent",
                message.body.len()
            )));
        }
        bench
            .channel
            .basic_ack(message.method.delivery_tag, false)?;
        received += 1;
        if received == n {
            break;
        }
    }
    let measured = phase.finish();
    if received != n {
        return Err(failure(format!("{received} of {n} arrived")));
    }
    bench.channel.cancel()?;
    Ok(measured)
}

/// BL1: one message at a time through the broker and back.
fn round_trips(bench: &Bench, n: u64) -> Result<Measured, Error> {
    let body = [0xA5; SMALL_BODY];
    let properties = BasicProperties::default();
    let mut messages = bench
        .channel
        .consume(&bench.queue, true, false, FieldTable::new(), None)?;
    let mut latencies_ns = Vec::with_capacity(n as usize);
    let phase = Phase::start();
    for _ in 0..n {
        let sent_at = std::time::Instant::now();
        bench
            .channel
            .basic_publish("", &bench.queue, body, &properties, false)?;
        match messages.next() {
            Some(Ok(Some(_))) => {}
            Some(Err(e)) => return Err(e),
            _ => return Err(failure("the consumer ended".into())),
        }
        latencies_ns.push(sent_at.elapsed().as_nanos() as u64);
    }
    let measured = phase.finish();
    bench.channel.cancel()?;
    Ok(Measured {
        latencies_ns,
        ..measured
    })
}
