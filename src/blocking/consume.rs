//! [`BlockingChannel::consume`]: pika's consumer generator, as an
//! iterator whose state lives on the channel (so calling `consume` again
//! with the same queue resumes it, and `cancel` ends it).

use std::fmt;
use std::time::Duration;

use super::channel::BlockingChannel;
use super::engine::{Generator, State, Waited};
use crate::error::Error;
use crate::message::Delivery;
use crate::protocol::Reply;
use crate::spec::basic;
use crate::table::FieldTable;

/// The iterator of [`BlockingChannel::consume`]: each item is a message,
/// `Ok(None)` when the inactivity timeout passed with nothing, or the
/// error that ended the channel or connection; iteration ends when the
/// consumer is cancelled (by [`BlockingChannel::cancel`] or the broker).
///
/// While [`Iterator::next`] waits for a message it dispatches everything
/// else that is due, as [`BlockingConnection::process_data_events`] does
/// (pika's generator waits in it): timers, closures from other threads
/// (e.g. their acks), other consumers' deliveries, returns, cancels. Its
/// own consumer's messages are not dispatched but yielded. A callback's
/// panic propagates out of `next`. Inside a callback (or while another
/// thread dispatches) it only waits.
///
/// [`BlockingConnection::process_data_events`]: super::BlockingConnection::process_data_events
pub struct ConsumeIter<'a> {
    channel: &'a BlockingChannel,
    inactivity_timeout: Option<Duration>,
    done: bool,
}

impl fmt::Debug for ConsumeIter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumeIter")
            .field("channel", &self.channel.channel_number())
            .field("inactivity_timeout", &self.inactivity_timeout)
            .field("done", &self.done)
            .finish()
    }
}

impl Iterator for ConsumeIter<'_> {
    type Item = Result<Option<Delivery>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let key = self.channel.key();
        let engine = self.channel.engine();
        let deadline = BlockingChannel::deadline(self.inactivity_timeout);
        enum Next {
            Message(Box<Delivery>),
            Ended,
            Closed(Error),
        }
        let own = |st: &mut State| {
            let terminal = st.terminal.clone();
            let Some(face) = st.face(key) else {
                // Closed, and its number taken by a new channel.
                return Some(Next::Closed(terminal.unwrap_or_else(|| {
                    Error::ChannelWrongState {
                        detail: format!("channel {} is Closed", key.number),
                    }
                })));
            };
            let Some(g) = face.generator.as_mut() else {
                return Some(Next::Ended);
            };
            if let Some(d) = g.buffer.pop_front() {
                return Some(Next::Message(Box::new(d)));
            }
            if g.ended {
                face.generator = None;
                return Some(match face.closed_error("consume").or(terminal) {
                    Some(e) => Next::Closed(e),
                    None => Next::Ended,
                });
            }
            None
        };
        // While it waits for its next message, what else is due is
        // dispatched, as pika's generator (which waits in
        // process_data_events) does: timers, other threads' closures, other
        // consumers' deliveries. Not from inside a callback, nor while
        // another thread dispatches: then it only waits.
        let next = loop {
            if !engine.lock().may_dispatch() {
                break engine.wait(deadline, own);
            }
            match engine.wait_dispatchable(deadline, own) {
                Ok(Waited::Own(next)) => break Ok(Some(next)),
                Ok(Waited::TimedOut) => break Ok(None),
                Ok(Waited::Dispatch) => self.channel.connection().dispatch_all(),
                Err(e) => break Err(e),
            }
        };
        match next {
            Ok(Some(Next::Message(d))) => Some(Ok(Some(*d))),
            Ok(Some(Next::Ended)) => {
                self.done = true;
                None
            }
            Ok(Some(Next::Closed(e))) | Err(e) => {
                self.done = true;
                Some(Err(e))
            }
            Ok(None) => Some(Ok(None)),
        }
    }
}

impl BlockingChannel {
    /// pika's `consume` generator: starts a consumer on `queue` (or
    /// resumes this channel's, when `queue`, `auto_ack` and `exclusive`
    /// match) and iterates its messages. `inactivity_timeout`: yield
    /// `Ok(None)` after that long without a message (`None`: wait). While
    /// the iterator waits, other callbacks are dispatched (see
    /// [`ConsumeIter`]).
    ///
    /// ```no_run
    /// # fn demo(channel: &pika::BlockingChannel) -> Result<(), pika::Error> {
    /// for message in channel.consume("test", false, false, Default::default(), None)? {
    ///     let Some(message) = message? else { continue };
    ///     println!("{:?}", message.body);
    ///     channel.basic_ack(message.method.delivery_tag, false)?;
    ///     if message.method.delivery_tag == 10 {
    ///         break;
    ///     }
    /// }
    /// let requeued = channel.cancel()?;
    /// println!("requeued {requeued} messages");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when a `consume` with other parameters
    /// is active on this channel (cancel it first); see [`BlockingChannel`].
    pub fn consume(
        &self,
        queue: &str,
        auto_ack: bool,
        exclusive: bool,
        arguments: FieldTable,
        inactivity_timeout: Option<Duration>,
    ) -> Result<ConsumeIter<'_>, Error> {
        self.check_usable("consume")?;
        let key = self.key();
        let engine = self.engine();
        let resume = {
            let mut st = engine.lock();
            match st.face(key).and_then(|f| f.generator.as_ref()) {
                Some(g)
                    if g.queue == queue && g.auto_ack == auto_ack && g.exclusive == exclusive =>
                {
                    true
                }
                Some(g) => {
                    return Err(Error::invalid(
                        "consume",
                        format!(
                            "a consume() of queue {:?} (auto_ack {}, exclusive {}) is active on \
                             this channel: cancel() it first",
                            g.queue, g.auto_ack, g.exclusive
                        ),
                    ));
                }
                None => false,
            }
        };
        if !resume {
            let m = basic::Consume {
                queue: queue.into(),
                no_ack: auto_ack,
                exclusive,
                arguments,
                ..Default::default()
            };
            let request = {
                let mut st = engine.lock();
                let (request, id, tag) = st.core.consume(key, m)?;
                if let Some(face) = st.face(key) {
                    face.generator = Some(Generator {
                        queue: queue.to_string(),
                        auto_ack,
                        exclusive,
                        id,
                        tag,
                        buffer: Default::default(),
                        ended: false,
                    });
                }
                request
            };
            engine.notify();
            let reply = engine
                .wait(None, |st| st.replies.remove(&request))?
                .unwrap_or(Err(Error::ConnectionOpenAborted));
            if let Err(e) = reply {
                if let Some(face) = engine.lock().face(key) {
                    face.generator = None;
                }
                return Err(e);
            }
        }
        Ok(ConsumeIter {
            channel: self,
            inactivity_timeout,
            done: false,
        })
    }

    /// Ends this channel's `consume()` consumer: cancels it and rejects the
    /// messages it buffered that need an ack, back to the queue. Returns how
    /// many it rejected (beyond pika, whose `cancel` returns 0); 0 when no
    /// `consume()` is active.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn cancel(&self) -> Result<usize, Error> {
        let key = self.key();
        let engine = self.engine();
        let tag = {
            let mut st = engine.lock();
            match st.face(key).and_then(|f| f.generator.as_ref()) {
                Some(g) if !g.ended => Some(g.tag.clone()),
                _ => None,
            }
        };
        if let Some(tag) = tag {
            self.check_usable("cancel")?;
            let request = engine.lock().core.cancel(key, &tag)?;
            engine.notify();
            let reply: Result<Reply, Error> = engine
                .wait(None, |st| st.replies.remove(&request))?
                .unwrap_or(Err(Error::ConnectionOpenAborted));
            match reply {
                Ok(_) | Err(Error::ConsumerCancelled { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let generator = engine.lock().face(key).and_then(|f| f.generator.take());
        let Some(generator) = generator else {
            return Ok(0);
        };
        let mut rejected = 0;
        if !generator.auto_ack {
            for d in generator.buffer {
                self.basic_reject(d.method.delivery_tag, true)?;
                rejected += 1;
            }
        }
        Ok(rejected)
    }

    /// How many messages this channel's `consume()` holds, not yet
    /// iterated.
    pub fn get_waiting_message_count(&self) -> usize {
        let key = self.key();
        self.engine()
            .lock()
            .face(key)
            .and_then(|f| f.generator.as_ref())
            .map_or(0, |g| g.buffer.len())
    }
}
