//! The keyword arguments of pika's channel methods as option structs with
//! pika's defaults, and the AMQP methods built from them (shared by every
//! face of the client).

use crate::spec::{Method, exchange, queue};
use crate::table::FieldTable;

/// Options of [`Channel::exchange_declare`](crate::Channel::exchange_declare) (pika's keyword arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeDeclareOptions {
    /// `direct` (default), `fanout`, `topic`, `headers`, or a plugin's type.
    pub exchange_type: String,
    /// Only check that the exchange exists.
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Delete when the last binding goes.
    pub auto_delete: bool,
    /// Only other exchanges may publish to it.
    pub internal: bool,
}

impl Default for ExchangeDeclareOptions {
    fn default() -> Self {
        ExchangeDeclareOptions {
            exchange_type: "direct".into(),
            passive: false,
            durable: false,
            auto_delete: false,
            internal: false,
        }
    }
}

/// Options of [`Channel::queue_declare`](crate::Channel::queue_declare).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDeclareOptions {
    /// Only check that the queue exists.
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Only this connection may use it; deleted when it closes.
    pub exclusive: bool,
    /// Delete when the last consumer goes.
    pub auto_delete: bool,
}

/// Options of [`Channel::queue_delete`](crate::Channel::queue_delete).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDeleteOptions {
    /// Only delete when it has no consumers.
    pub if_unused: bool,
    /// Only delete when it holds no messages.
    pub if_empty: bool,
}

/// Options of [`Channel::basic_consume`](crate::Channel::basic_consume).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BasicConsumeOptions {
    /// The broker considers messages acknowledged once sent (`no_ack`).
    pub auto_ack: bool,
    /// No other consumer may use the queue.
    pub exclusive: bool,
    /// The tag to use; one unique on the connection is generated when
    /// `None`.
    pub consumer_tag: Option<String>,
    /// Consumer arguments (e.g. `x-priority`).
    pub arguments: FieldTable,
}

pub(crate) fn exchange_declare(
    exchange: &str,
    o: ExchangeDeclareOptions,
    arguments: FieldTable,
    nowait: bool,
) -> Method {
    exchange::Declare {
        exchange: exchange.into(),
        exchange_type: o.exchange_type,
        passive: o.passive,
        durable: o.durable,
        auto_delete: o.auto_delete,
        internal: o.internal,
        nowait,
        arguments,
        ..Default::default()
    }
    .into()
}

pub(crate) fn exchange_bind(
    destination: &str,
    source: &str,
    routing_key: &str,
    arguments: FieldTable,
    nowait: bool,
) -> Method {
    exchange::Bind {
        destination: destination.into(),
        source: source.into(),
        routing_key: routing_key.into(),
        arguments,
        nowait,
        ..Default::default()
    }
    .into()
}

pub(crate) fn exchange_unbind(
    destination: &str,
    source: &str,
    routing_key: &str,
    arguments: FieldTable,
    nowait: bool,
) -> Method {
    exchange::Unbind {
        destination: destination.into(),
        source: source.into(),
        routing_key: routing_key.into(),
        arguments,
        nowait,
        ..Default::default()
    }
    .into()
}

/// Queue.Bind; a routing key of `None` is the queue's name (pika's
/// default).
pub(crate) fn queue_bind(
    queue: &str,
    exchange: &str,
    routing_key: Option<&str>,
    arguments: FieldTable,
    nowait: bool,
) -> Method {
    queue::Bind {
        queue: queue.into(),
        exchange: exchange.into(),
        routing_key: routing_key.unwrap_or(queue).into(),
        arguments,
        nowait,
        ..Default::default()
    }
    .into()
}

pub(crate) fn exchange_delete(exchange: &str, if_unused: bool, nowait: bool) -> Method {
    exchange::Delete {
        exchange: exchange.into(),
        if_unused,
        nowait,
        ..Default::default()
    }
    .into()
}

pub(crate) fn queue_declare(
    queue: &str,
    o: QueueDeclareOptions,
    arguments: FieldTable,
    nowait: bool,
) -> Method {
    queue::Declare {
        queue: queue.into(),
        passive: o.passive,
        durable: o.durable,
        exclusive: o.exclusive,
        auto_delete: o.auto_delete,
        nowait,
        arguments,
        ..Default::default()
    }
    .into()
}

pub(crate) fn queue_delete(queue: &str, o: QueueDeleteOptions, nowait: bool) -> Method {
    queue::Delete {
        queue: queue.into(),
        if_unused: o.if_unused,
        if_empty: o.if_empty,
        nowait,
        ..Default::default()
    }
    .into()
}
