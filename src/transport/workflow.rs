//! The connect workflow as a pure decision: which parameter set, which
//! address, when to wait and when to give up. It does no I/O and keeps no
//! clock: a face asks for the [`Step`] to take, does it, and reports back.
//!
//! As pika 1.1's connection workflow: the parameter sets are tried in
//! passes over the whole list, each set at every address its host
//! resolves to (IPv4 and IPv6, in the resolver's order). The number of
//! passes is the LAST set's `connection_attempts`, and passes are
//! separated by the LAST set's `retry_delay` (the other sets' values are
//! not used, as in pika). A failure that retrying cannot fix
//! ([`retryable`] says which) ends the workflow at once. When every
//! attempt failed, the error is the one failure, or
//! [`Error::ConnectionWorkflowFailed`] listing each in order.
//!
//! Where this differs from pika 1.1: pika reports
//! `AMQPConnectionWorkflowFailed` even when a single attempt was made;
//! here a single failed attempt is reported as its own error. And a
//! refused login or virtual host ends the workflow at once (pika goes on
//! to the next address).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::parameters::ConnectionParameters;

/// What to do next.
#[derive(Debug)]
pub enum Step {
    /// Resolve the host of set `set` and report with [`Workflow::resolved`].
    Resolve {
        /// The set's index.
        set: usize,
    },
    /// Connect to `address` with set `set` (TCP, TLS, then the AMQP
    /// handshake); report a failure with [`Workflow::failed`].
    Connect {
        /// The set's index.
        set: usize,
        /// Where.
        address: SocketAddr,
    },
    /// Wait this long, then ask again (the next round).
    Wait(Duration),
    /// Give up with this error.
    Fail(Error),
}

/// Where the workflow is.
#[derive(Debug)]
pub struct Workflow {
    sets: Vec<ConnectionParameters>,
    /// The pass over the list (from 0).
    pass: u32,
    /// The set being tried in this pass (`None` before the first).
    set_index: Option<usize>,
    addresses: Vec<SocketAddr>,
    address_index: usize,
    errors: Vec<Error>,
}

/// Whether an attempt that failed with `error` is worth another: not when
/// the broker refused the login or the virtual host, offered no usable
/// mechanism, closed the connection during the handshake, or the
/// application aborted the open.
pub fn retryable(error: &Error) -> bool {
    !matches!(
        error,
        Error::ProbableAuthenticationError { .. }
            | Error::ProbableAccessDeniedError { .. }
            | Error::AuthenticationError { .. }
            | Error::ConnectionClosedByBroker { .. }
            | Error::ConnectionOpenAborted
    )
}

impl Workflow {
    /// A workflow over `sets`, in order.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an empty list.
    pub fn new(sets: Vec<ConnectionParameters>) -> Result<Workflow, Error> {
        if sets.is_empty() {
            return Err(Error::invalid(
                "parameters",
                "at least one set of connection parameters is needed",
            ));
        }
        Ok(Workflow {
            sets,
            pass: 0,
            set_index: None,
            addresses: Vec::new(),
            address_index: 0,
            errors: Vec::new(),
        })
    }

    /// Parameter set `i`.
    pub fn set(&self, i: usize) -> &ConnectionParameters {
        &self.sets[i.min(self.sets.len() - 1)]
    }

    /// Every parameter set (to erase credentials once sent, for instance).
    pub fn sets_mut(&mut self) -> &mut [ConnectionParameters] {
        &mut self.sets
    }

    /// The next step.
    pub fn next_step(&mut self) -> Step {
        if self.address_index < self.addresses.len() {
            let address = self.addresses[self.address_index];
            self.address_index += 1;
            return Step::Connect {
                set: self.set_index.unwrap_or(0),
                address,
            };
        }
        let next = self.set_index.map_or(0, |i| i + 1);
        if next < self.sets.len() {
            self.set_index = Some(next);
            self.addresses.clear();
            self.address_index = 0;
            return Step::Resolve { set: next };
        }
        // A pass over the whole list is done.
        self.pass += 1;
        self.set_index = None;
        let last = &self.sets[self.sets.len() - 1];
        if self.pass < last.connection_attempts() {
            Step::Wait(last.retry_delay())
        } else {
            Step::Fail(self.give_up())
        }
    }

    /// The resolver's answer for the set of the last [`Step::Resolve`].
    pub fn resolved(&mut self, result: Result<Vec<SocketAddr>, Error>) {
        match result {
            Ok(addresses) => {
                self.addresses = addresses;
                self.address_index = 0;
            }
            Err(e) => self.errors.push(e),
        }
    }

    /// The attempt of the last [`Step::Connect`] failed with `error`.
    /// Returns the error to end with when retrying cannot help; otherwise
    /// the workflow goes on with [`Workflow::next_step`].
    pub fn failed(&mut self, error: Error) -> Option<Error> {
        log::warn!("connect: {error}");
        if retryable(&error) {
            self.errors.push(error);
            None
        } else {
            Some(error)
        }
    }

    /// The attempts' errors so far, in order.
    pub fn errors(&self) -> &[Error] {
        &self.errors
    }

    fn give_up(&mut self) -> Error {
        let mut errors = std::mem::take(&mut self.errors);
        if errors.len() == 1 {
            errors.pop().unwrap_or(Error::ConnectionOpenAborted)
        } else {
            Error::ConnectionWorkflowFailed {
                attempts: Arc::new(errors),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(host: &str, attempts: u32, delay: u64) -> ConnectionParameters {
        let mut p = ConnectionParameters::default();
        p.set_host(host).unwrap();
        p.set_connection_attempts(attempts).unwrap();
        p.set_retry_delay(Duration::from_secs(delay));
        p
    }

    fn addr(last: u8) -> SocketAddr {
        ([10, 0, 0, last], 5672).into()
    }

    fn refused(a: SocketAddr) -> Error {
        Error::Connect {
            address: a.to_string(),
            source: Arc::new(std::io::ErrorKind::ConnectionRefused.into()),
        }
    }

    /// Runs the workflow with every connect failing; the steps as text.
    fn trace(
        sets: Vec<ConnectionParameters>,
        addresses: &[Vec<SocketAddr>],
    ) -> (Vec<String>, Error) {
        let mut wf = Workflow::new(sets).unwrap();
        let mut steps = Vec::new();
        loop {
            match wf.next_step() {
                Step::Resolve { set } => {
                    steps.push(format!("resolve {set}"));
                    wf.resolved(Ok(addresses[set].clone()));
                }
                Step::Connect { set, address } => {
                    steps.push(format!("connect {set} {address}"));
                    assert!(wf.failed(refused(address)).is_none());
                }
                Step::Wait(d) => steps.push(format!("wait {}", d.as_secs())),
                Step::Fail(e) => return (steps, e),
            }
        }
    }

    #[test]
    fn passes_try_every_set_at_every_address_as_often_as_the_last_set_says() {
        // The first set's attempts (5) and delay (9) are not used: the
        // last set's are (2 passes, 3 s apart), as in pika 1.1.
        let (steps, error) = trace(
            vec![set("a", 5, 9), set("b", 2, 3)],
            &[vec![addr(1), addr(2)], vec![addr(3)]],
        );
        assert_eq!(
            steps,
            [
                "resolve 0",
                "connect 0 10.0.0.1:5672",
                "connect 0 10.0.0.2:5672",
                "resolve 1",
                "connect 1 10.0.0.3:5672",
                "wait 3",
                "resolve 0",
                "connect 0 10.0.0.1:5672",
                "connect 0 10.0.0.2:5672",
                "resolve 1",
                "connect 1 10.0.0.3:5672",
            ]
        );
        match error {
            Error::ConnectionWorkflowFailed { attempts } => assert_eq!(attempts.len(), 6),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_failed_attempt_is_reported_as_itself() {
        let (steps, error) = trace(vec![set("a", 1, 0)], &[vec![addr(1)]]);
        assert_eq!(steps, ["resolve 0", "connect 0 10.0.0.1:5672"]);
        assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    }

    #[test]
    fn a_resolver_failure_counts_as_an_attempt() {
        let mut wf = Workflow::new(vec![set("nowhere", 1, 0), set("b", 1, 0)]).unwrap();
        assert!(matches!(wf.next_step(), Step::Resolve { set: 0 }));
        wf.resolved(Err(Error::Resolve {
            host: "nowhere".into(),
            reason: "no such host".into(),
        }));
        assert!(matches!(wf.next_step(), Step::Resolve { set: 1 }));
        wf.resolved(Ok(vec![addr(9)]));
        assert!(matches!(wf.next_step(), Step::Connect { set: 1, .. }));
        assert_eq!(wf.errors().len(), 1);
    }

    #[test]
    fn a_refused_login_ends_the_workflow_at_once() {
        let mut wf = Workflow::new(vec![set("a", 5, 0)]).unwrap();
        wf.next_step();
        wf.resolved(Ok(vec![addr(1)]));
        wf.next_step();
        let end = wf.failed(Error::ProbableAuthenticationError {
            reply_code: 403,
            reply_text: "ACCESS_REFUSED".into(),
        });
        assert!(matches!(
            end,
            Some(Error::ProbableAuthenticationError { .. })
        ));
        assert!(!retryable(&Error::ConnectionOpenAborted));
        assert!(retryable(&Error::IncompatibleProtocol {
            detail: String::new()
        }));
    }

    #[test]
    fn an_empty_list_is_refused() {
        assert!(matches!(
            Workflow::new(Vec::new()),
            Err(Error::InvalidParameter {
                name: "parameters",
                ..
            })
        ));
    }
}
