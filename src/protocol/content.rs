//! Content assembly: a content-carrying method (Basic.Deliver,
//! Basic.Return, Basic.GetOk), then its header, then body frames until the
//! header's body size — into a [`Delivery`], [`ReturnedMessage`] or
//! [`GetMessage`]. Each body is copied once, from the received frame into
//! the message; a lying body size reserves at most 1 MiB up front.
//!
//! Out-of-sequence content (a header without its method, a body without a
//! header, a body longer than declared, a method while content is
//! arriving) is a 505.

use super::Connection;
use crate::frame::ContentHeader;
use crate::message::{Delivery, GetMessage, ReturnedMessage};
use crate::spec::{BasicProperties, Method, PropertiesError};

/// How much a header's body size may reserve before the body arrives.
const RESERVE_AT_MOST: u64 = 1 << 20;

/// A content-carrying method whose header and body are arriving.
#[derive(Debug)]
pub(crate) struct PendingContent {
    method: Method,
    header: Option<(BasicProperties, u64)>,
    properties_error: Option<PropertiesError>,
    body: Vec<u8>,
}

impl PendingContent {
    pub(super) fn new(method: Method) -> PendingContent {
        PendingContent {
            method,
            header: None,
            properties_error: None,
            body: Vec::new(),
        }
    }

    fn is_complete(&self) -> bool {
        matches!(&self.header, Some((_, size)) if self.body.len() as u64 == *size)
    }
}

impl Connection {
    /// A content header on channel `number`.
    pub(super) fn handle_header(&mut self, number: u16, header: ContentHeader) {
        let Some(slot) = self.slot_by_number(number) else {
            self.unexpected(format!(
                "content header on channel {number}, which is not open"
            ));
            return;
        };
        let discarding = slot.discarding();
        match slot.content.as_mut() {
            Some(content) if content.header.is_none() => {
                content.header = Some((header.properties, header.body_size));
                content.properties_error = header.properties_error.map(|e| *e);
                content
                    .body
                    .reserve_exact(header.body_size.min(RESERVE_AT_MOST) as usize);
            }
            Some(_) => {
                self.unexpected(format!("a second content header on channel {number}"));
                return;
            }
            None if discarding => return,
            None => {
                self.unexpected(format!(
                    "content header on channel {number} without a method"
                ));
                return;
            }
        }
        self.complete_content(number);
    }

    /// A body frame on channel `number`.
    pub(super) fn handle_body(&mut self, number: u16, payload: &[u8]) {
        let Some(slot) = self.slot_by_number(number) else {
            self.unexpected(format!("body frame on channel {number}, which is not open"));
            return;
        };
        let discarding = slot.discarding();
        match slot.content.as_mut() {
            Some(PendingContent {
                header: Some((_, size)),
                body,
                ..
            }) => {
                let total = body.len() as u64 + payload.len() as u64;
                if total > *size {
                    let size = *size;
                    self.unexpected(format!(
                        "body on channel {number} longer than its header's {size} bytes"
                    ));
                    return;
                }
                body.extend_from_slice(payload);
            }
            _ if discarding => return,
            _ => {
                self.unexpected(format!(
                    "body frame on channel {number} without a content header"
                ));
                return;
            }
        }
        self.complete_content(number);
    }

    /// Hands on the message once its body is whole (dropped when the
    /// channel is discarding — our Close is out — unless it is a return,
    /// which counts until the CloseOk).
    fn complete_content(&mut self, number: u16) {
        let Some(slot) = self.slot_by_number(number) else {
            return;
        };
        if !slot
            .content
            .as_ref()
            .is_some_and(PendingContent::is_complete)
        {
            return;
        }
        let Some(content) = slot.content.take() else {
            return;
        };
        let returned_while_closing = slot.state == super::channel::ChannelState::Closing
            && matches!(content.method, Method::BasicReturn(_));
        if slot.discarding() && !returned_while_closing {
            return;
        }
        let (properties, _) = content.header.unwrap_or_default();
        let body = content.body;
        let properties_error = content.properties_error;
        if let Some(problem) = &properties_error {
            log::warn!(
                "channel {number}: {} with unreadable properties, delivered with the raw bytes: {}",
                content.method.name(),
                problem.error
            );
        }
        match content.method {
            Method::BasicDeliver(method) => {
                let delivery = Delivery {
                    method,
                    properties,
                    body,
                    properties_error,
                    epoch: self.config.epoch,
                };
                self.dispatch_delivery(number, delivery);
            }
            Method::BasicReturn(method) => {
                let message = ReturnedMessage {
                    method,
                    properties,
                    body,
                    properties_error,
                };
                self.on_returned(number, message);
            }
            Method::BasicGetOk(method) => {
                let message = GetMessage {
                    method,
                    properties,
                    body,
                    properties_error,
                };
                self.on_get_ok(number, message);
            }
            other => log::warn!("channel {number}: content for {}", other.name()),
        }
    }
}
