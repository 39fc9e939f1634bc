//! Publishing on a [`BlockingChannel`]: `basic_publish` (in confirm mode it
//! waits for the broker's answer, as pika's), and beyond pika the window
//! API, `basic_publish_nowait` + `wait_for_confirms` collecting
//! [`Confirms`].

use std::sync::Arc;

use super::channel::BlockingChannel;
use super::engine::{ChannelFace, Outcome};
use crate::error::Error;
use crate::message::ReturnedMessage;
use crate::spec::BasicProperties;

/// What became of messages published with
/// [`BlockingChannel::basic_publish_nowait`], collected by
/// [`BlockingChannel::wait_for_confirms`]. Tags ascending.
#[derive(Debug, Clone, Default)]
pub struct Confirms {
    /// Delivery tags the broker acked.
    pub acked: Vec<u64>,
    /// Delivery tags the broker nacked.
    pub nacked: Vec<u64>,
    /// Delivery tags left unconfirmed when the channel ended: their fate is
    /// unknown, and the channel is closed (the next call says why).
    pub failed: Vec<u64>,
    /// The mandatory messages among those collected here that the broker
    /// returned as unroutable (each is also acked), in the order they came
    /// back. A return belongs to the publish it returns (see
    /// [`crate::protocol::Event::Returned`]): it is reported with that
    /// publish's confirm, never by another publish.
    pub returned: Vec<ReturnedMessage>,
}

impl BlockingChannel {
    /// Publishes a message.
    ///
    /// Without confirms it does not wait (see the [module docs](super) on
    /// writes): it returns once the message is in the connection's buffer.
    /// In confirm mode it waits for the broker's answer: `Ok` when acked,
    /// [`Error::UnroutableError`] (with the returned message) when
    /// `mandatory` and the broker could not route it,
    /// [`Error::NackError`] when nacked.
    ///
    /// # Errors
    /// As above, and see [`BlockingChannel`].
    pub fn basic_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: impl AsRef<[u8]>,
        properties: &BasicProperties,
        mandatory: bool,
    ) -> Result<(), Error> {
        let tag = self.publish(exchange, routing_key, body.as_ref(), properties, mandatory)?;
        let Some(tag) = tag else {
            return Ok(());
        };
        let key = self.key();
        let (outcome, returned) = self
            .engine()
            .wait(None, |st| {
                let Some(face) = st.face(key) else {
                    // Closed, and its number taken by a new channel: the
                    // outcome went with it.
                    return Some((Outcome::Failed, Vec::new()));
                };
                let outcome = face.outcomes.remove(&tag)?;
                face.unconfirmed -= 1;
                Some((outcome, take_returned(face, |t| t == tag)))
            })?
            .unwrap_or((Outcome::Failed, Vec::new()));
        match outcome {
            Outcome::Ack if returned.is_empty() => Ok(()),
            Outcome::Ack => Err(Error::UnroutableError {
                messages: Arc::new(returned),
            }),
            Outcome::Nack => Err(Error::NackError {
                delivery_tags: vec![tag],
            }),
            Outcome::Failed => {
                let mut st = self.engine().lock();
                Err(self.usable(&mut st, "basic_publish").err().unwrap_or(
                    Error::ChannelWrongState {
                        detail: format!("channel {} closed before the confirm", key.number),
                    },
                ))
            }
        }
    }

    /// Publishes without waiting for the broker's confirm, in confirm mode
    /// (beyond pika): returns the message's delivery tag;
    /// [`BlockingChannel::wait_for_confirms`] collects what became of it. A
    /// window of publishes in flight gives the callback face's throughput
    /// (pika's blocking confirm mode does one round trip per message).
    ///
    /// ```no_run
    /// # fn demo(channel: &pika::BlockingChannel) -> Result<(), pika::Error> {
    /// channel.confirm_delivery()?;
    /// for i in 0..10_000u32 {
    ///     channel.basic_publish_nowait("", "jobs", i.to_string(), &Default::default(), false)?;
    ///     // At most 1 000 unconfirmed at a time.
    ///     let confirms = channel.wait_for_confirms(1_000)?;
    ///     assert!(confirms.nacked.is_empty() && confirms.failed.is_empty());
    /// }
    /// let last = channel.wait_for_confirms(0)?;
    /// # let _ = last; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] outside confirm mode; see
    /// [`BlockingChannel`].
    pub fn basic_publish_nowait(
        &self,
        exchange: &str,
        routing_key: &str,
        body: impl AsRef<[u8]>,
        properties: &BasicProperties,
        mandatory: bool,
    ) -> Result<u64, Error> {
        {
            let mut st = self.engine().lock();
            if !st.face(self.key()).is_some_and(|f| f.confirm_mode) {
                return Err(Error::invalid(
                    "basic_publish_nowait",
                    "needs confirm mode (confirm_delivery) to give a delivery tag",
                ));
            }
        }
        self.publish(exchange, routing_key, body.as_ref(), properties, mandatory)?
            .ok_or_else(|| Error::invalid("basic_publish_nowait", "no delivery tag was given"))
    }

    /// Waits until at most `max_outstanding` messages published in confirm
    /// mode are unconfirmed (0: all confirmed), and returns what became of
    /// those confirmed since the last collection: acked, nacked, failed
    /// (the channel ended before the broker answered), and the messages
    /// the broker returned meanwhile.
    ///
    /// When the channel or the connection ends, the publishes still
    /// unconfirmed come back in [`Confirms::failed`] — an `Ok`, so check
    /// it — and from then on, with nothing left to collect, every call
    /// returns the error that ended it.
    ///
    /// # Errors
    /// The channel's or the connection's end, once nothing is left to
    /// collect (see [`BlockingChannel`]).
    pub fn wait_for_confirms(&self, max_outstanding: usize) -> Result<Confirms, Error> {
        let key = self.key();
        let confirms = self.engine().wait(None, |st| {
            let terminal = st.terminal.is_some();
            let Some(face) = st.face(key) else {
                // Closed, and its number taken by a new channel.
                return Some(
                    self.usable(st, "wait_for_confirms")
                        .map(|()| Confirms::default()),
                );
            };
            let ended = terminal || face.closed.is_some();
            if !ended || !face.outcomes.is_empty() || !face.returned.is_empty() {
                let pending = face.unconfirmed - face.outcomes.len();
                return (pending <= max_outstanding || ended).then(|| Ok(collect(face, ended)));
            }
            // Nothing left to report but the end itself.
            Some(
                self.usable(st, "wait_for_confirms")
                    .map(|()| Confirms::default()),
            )
        })?;
        confirms.unwrap_or_else(|| Ok(Confirms::default()))
    }

    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        mandatory: bool,
    ) -> Result<Option<u64>, Error> {
        let key = self.key();
        let mut st = self.engine().lock();
        self.usable(&mut st, "basic_publish")?;
        let tag = st
            .core
            .publish(key, exchange, routing_key, mandatory, properties, body)?;
        if tag.is_some() {
            if let Some(face) = st.face(key) {
                face.unconfirmed += 1;
            }
        }
        self.engine().after_command(st)?;
        Ok(tag)
    }
}

/// Takes the returned messages of the publishes `of` selects by delivery
/// tag, in the order they came back.
fn take_returned(face: &mut ChannelFace, of: impl Fn(u64) -> bool) -> Vec<ReturnedMessage> {
    if face.returned.is_empty() {
        return Vec::new();
    }
    let (taken, kept) = std::mem::take(&mut face.returned)
        .into_iter()
        .partition(|(tag, _)| of(*tag));
    face.returned = kept;
    taken.into_iter().map(|(_, message)| message).collect()
}

/// Collects a channel's confirm outcomes since the last collection, with
/// the returns of those publishes (a return comes before its publish's
/// confirm: one whose confirm has not come yet waits for it). Once the
/// channel `ended`, every return left.
fn collect(face: &mut ChannelFace, ended: bool) -> Confirms {
    let mut confirms = Confirms::default();
    for (tag, outcome) in face.outcomes.drain() {
        match outcome {
            Outcome::Ack => confirms.acked.push(tag),
            Outcome::Nack => confirms.nacked.push(tag),
            Outcome::Failed => confirms.failed.push(tag),
        }
    }
    face.unconfirmed -= confirms.acked.len() + confirms.nacked.len() + confirms.failed.len();
    confirms.acked.sort_unstable();
    confirms.nacked.sort_unstable();
    confirms.failed.sort_unstable();
    confirms.returned = take_returned(face, |tag| {
        ended
            || confirms.acked.binary_search(&tag).is_ok()
            || confirms.nacked.binary_search(&tag).is_ok()
            || confirms.failed.binary_search(&tag).is_ok()
    });
    confirms
}
