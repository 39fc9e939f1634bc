//! The driver: the connect workflow's steps, the socket handler, the one
//! timer and the writes. The core's events go to the user's closures
//! through `dispatch.rs`.
//!
//! Design notes (not API):
//! * Input is handled one frame at a time, and the events of each frame
//!   are dispatched before the next is handled: a callback that closes its
//!   channel or cancels its consumer sees no later delivery.
//! * During a socket event, commands only queue bytes; they are written
//!   once at the end of the event. Outside one, a command that queued bytes
//!   registers write interest (once) and the loop writes when it may.
//! * One timer per attempt, armed at the earliest deadline (the core's
//!   `poll_timeout`, or the TCP connect's own bounds); re-armed only when
//!   that deadline moves earlier. A timer that fires early hands the time
//!   to the core, which does nothing yet, and re-arms.
//! * Events the core queues outside a dispatch (a command called from a
//!   timer or from `main`) are dispatched on the next loop pass.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ioloop::{Interest, Readiness};

use super::{SelectConnection, Session, State};
use crate::error::Error;
use crate::protocol::{self, Config, Phase};
use crate::transport::workflow::Step;
use crate::transport::{Stream, socket, tls_failure};

/// How many reads one readiness event may do before letting timers run.
const READS_PER_EVENT: usize = 16;
/// How much one read asks for (and the read buffer's first size).
const READ_CHUNK: usize = 64 * 1024;

impl SelectConnection {
    // ------------------------------------------------------------------
    // The connect workflow
    // ------------------------------------------------------------------

    /// Takes workflow steps until an attempt is under way, a retry is
    /// scheduled, or the workflow gave up.
    pub(super) fn next_attempt(&self) {
        loop {
            let step = {
                let mut st = self.shared.state.borrow_mut();
                if st.closed || st.session.as_ref().is_some_and(|s| s.stream.is_some()) {
                    return;
                }
                st.workflow.next_step()
            };
            match step {
                Step::Resolve { set } => {
                    let params = self.shared.state.borrow().workflow.set(set).clone();
                    let result = socket::resolve(params.host(), params.port());
                    let mut st = self.shared.state.borrow_mut();
                    if result.is_ok() {
                        st.params = params;
                    }
                    st.workflow.resolved(result);
                }
                Step::Connect { set, address } => {
                    if self.start_attempt(set, address) {
                        return;
                    }
                }
                Step::Wait(delay) => {
                    log::info!("connect: all endpoints failed; retrying in {delay:?}");
                    let me = self.clone();
                    let timer = self
                        .shared
                        .ioloop
                        .call_later(delay, move || me.next_attempt());
                    self.shared.state.borrow_mut().retry_timer = Some(timer);
                    return;
                }
                Step::Fail(error) => {
                    self.finish(error, false);
                    return;
                }
            }
        }
    }

    /// Starts a non-blocking TCP connect; false when it failed at once (the
    /// failure is recorded with the workflow).
    fn start_attempt(&self, set: usize, address: SocketAddr) -> bool {
        log::debug!("connect: trying {address}");
        let params = self.shared.state.borrow().workflow.set(set).clone();
        let stream = socket::start_connect(address, &params)
            .map_err(|e| Error::Connect {
                address: address.to_string(),
                source: std::sync::Arc::new(e),
            })
            .and_then(|tcp| Stream::new(tcp, address, params.ssl_options(), params.host()));
        let stream = match stream {
            Ok(s) => s,
            Err(e) => return self.attempt_failed(e),
        };
        let me = self.clone();
        let handler = self.shared.ioloop.add_handler(
            stream.socket().clone(),
            Interest::WRITABLE,
            move |readiness| me.on_socket_event(readiness),
        );
        let handler = match handler {
            Ok(h) => h,
            Err(e) => return self.attempt_failed(Error::IoLoop(std::sync::Arc::new(e))),
        };
        {
            let mut st = self.shared.state.borrow_mut();
            st.params = params;
            // Request ids go on counting across attempts.
            if let Some(core) = st.core() {
                st.next_request = core.next_request_id();
            }
            st.session = Some(Session {
                address,
                started: Instant::now(),
                stream: Some(stream),
                handler: Some(handler),
                connected: false,
                core: None,
                inbound: Vec::new(),
                inbound_start: 0,
                inbound_end: 0,
                write_interest: true,
                timer: None,
                erased: false,
            });
        }
        self.arm_timer();
        true
    }

    /// An attempt failed before its core could say so (a refused connect,
    /// a timeout of the TCP connect): drops it and goes on with the
    /// workflow. Always false (no attempt under way).
    fn attempt_failed(&self, error: Error) -> bool {
        self.drop_session_io();
        let fatal = self.shared.state.borrow_mut().workflow.failed(error);
        if let Some(error) = fatal {
            self.finish(error, false);
        }
        false
    }

    /// The attempt's core ended (`opened`: after the connection had
    /// opened): the socket goes, then the workflow goes on or the
    /// connection ends.
    pub(super) fn session_ended(&self, error: Error, opened: bool) {
        // What the core queued last (a CloseOk, a Close with a reply
        // code) is written once, best effort, before the socket goes.
        self.write_out_best_effort();
        self.drop_session_io();
        if opened {
            self.finish(error, true);
            return;
        }
        let fatal = {
            let mut st = self.shared.state.borrow_mut();
            if st.closed {
                return;
            }
            st.workflow.failed(error)
        };
        match fatal {
            Some(error) => self.finish(error, false),
            None => self.next_attempt(),
        }
    }

    /// Releases the attempt's socket, handler and timer (the core stays,
    /// for the getters). No user code runs.
    pub(super) fn drop_session_io(&self) {
        let (handler, timer, stream) = {
            let mut st = self.shared.state.borrow_mut();
            let Some(s) = st.session.as_mut() else { return };
            (s.handler.take(), s.timer.take(), s.stream.take())
        };
        let lp = &self.shared.ioloop;
        if let Some(h) = handler {
            lp.remove_handler(h);
        }
        if let Some((t, _)) = timer {
            lp.remove_timeout(t);
        }
        if let Some(mut stream) = stream {
            stream.shutdown();
        }
    }

    /// The end of the connection: resources released, then the terminal
    /// callbacks. Idempotent.
    pub(super) fn finish(&self, error: Error, opened: bool) {
        if self.release() {
            self.fire_terminal(error, opened);
        }
    }

    /// Marks the connection closed and releases its timers and socket;
    /// other threads' closures are refused from now on. False when it was
    /// already closed. No user code runs.
    pub(super) fn release(&self) -> bool {
        let already = std::mem::replace(&mut self.shared.state.borrow_mut().closed, true);
        if already {
            return false;
        }
        self.shared.door.close();
        self.drop_session_io();
        let retry = self.shared.state.borrow_mut().retry_timer.take();
        if let Some(t) = retry {
            self.shared.ioloop.remove_timeout(t);
        }
        let pending = {
            let mut q = self
                .shared
                .threadsafe
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            q.closed = true;
            std::mem::take(&mut q.callbacks)
        };
        // Closures other threads queued but that never ran: dropped here,
        // on the loop thread, outside the lock.
        drop(pending);
        true
    }

    /// Drops every stored closure, then runs the terminal callbacks
    /// (`on_close` when the connection had opened, `on_open_error` when
    /// not), after the pending update-secret callbacks.
    pub(super) fn fire_terminal(&self, error: Error, opened: bool) {
        log::info!("connection closed: {error}");
        let (callbacks, channels) = {
            let mut st = self.shared.state.borrow_mut();
            (
                std::mem::take(&mut st.callbacks),
                std::mem::take(&mut st.channels),
            )
        };
        drop(channels);
        for (_, cb) in callbacks.update_secret {
            cb(self, Err(error.clone()));
        }
        if opened {
            for cb in callbacks.on_close {
                cb(self, error.clone());
            }
        } else {
            for cb in callbacks.on_open_error {
                cb(self, error.clone());
            }
        }
        super::handle::unregister(self.shared.id);
    }

    // ------------------------------------------------------------------
    // Socket events
    // ------------------------------------------------------------------

    fn on_socket_event(&self, readiness: Readiness) {
        let connected = {
            let st = self.shared.state.borrow();
            match st.session.as_ref() {
                Some(s) if s.stream.is_some() => s.connected,
                _ => return,
            }
        };
        if !connected {
            self.on_connect_ready();
            return;
        }
        struct InEvent<'a>(&'a std::cell::Cell<bool>);
        impl Drop for InEvent<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let guard = InEvent(&self.shared.in_socket_event);
        guard.0.set(true);
        if readiness.is_writable() {
            self.flush();
        }
        if readiness.is_readable() || readiness.is_error() {
            self.read_some();
        }
        drop(guard);
        self.flush();
        self.arm_timer();
    }

    fn on_connect_ready(&self) {
        let result = {
            let st = self.shared.state.borrow();
            let Some(stream) = st.session.as_ref().and_then(|s| s.stream.as_ref()) else {
                return;
            };
            socket::connect_result(stream.socket()).map_err(|e| (stream.peer(), e))
        };
        if let Err((address, e)) = result {
            self.attempt_failed(Error::Connect {
                address: address.to_string(),
                source: std::sync::Arc::new(e),
            });
            self.next_attempt();
            return;
        }
        {
            let mut st = self.shared.state.borrow_mut();
            let st = &mut *st;
            let params = st.params.clone();
            let Some(s) = st.session.as_mut() else { return };
            let handshake_deadline = params
                .stack_timeout()
                .and_then(|t| Some((s.started.checked_add(t)?, t)));
            let epoch = crate::ack::next_epoch();
            self.shared.door.set_epoch(epoch);
            let config = Config {
                epoch,
                first_request_id: st.next_request,
                handshake_deadline,
                peer: s.address.to_string(),
            };
            s.core = Some(protocol::Connection::new(params, config, Instant::now()));
            s.connected = true;
            s.inbound = vec![0; READ_CHUNK];
            log::debug!("connect: TCP connected to {}", s.address);
        }
        self.flush();
        self.arm_timer();
    }

    /// Registers write interest exactly while bytes wait (the core's or
    /// TLS records); during a socket event, the write at its end decides.
    pub(super) fn set_interest(&self) {
        self.update_interest(&mut self.shared.state.borrow_mut());
    }

    /// [`SelectConnection::set_interest`] under a borrow the caller holds
    /// (it calls into the loop, never into user code).
    fn update_interest(&self, st: &mut State) {
        let Some(s) = st.session.as_mut() else { return };
        let (Some(h), Some(stream)) = (s.handler, s.stream.as_ref()) else {
            return;
        };
        if !s.connected {
            return;
        }
        let want = s.core.as_ref().is_some_and(|c| c.wants_write()) || stream.wants_write();
        if want && self.shared.in_socket_event.get() {
            return;
        }
        if want != s.write_interest {
            s.write_interest = want;
            let interest = if want {
                Interest::BOTH
            } else {
                Interest::READABLE
            };
            if let Err(e) = self.shared.ioloop.update_handler(h, interest) {
                log::warn!("cannot update socket interest: {e}");
            }
        }
    }

    /// Reads what is there (a bounded number of reads, so timers get their
    /// turn), handling each frame and dispatching its events.
    fn read_some(&self) {
        for _ in 0..READS_PER_EVENT {
            match self.read_once() {
                None => return,
                Some(Ok(0)) => {
                    self.stream_ended(None);
                    return;
                }
                Some(Ok(n)) => {
                    self.process_inbound();
                    if n < READ_CHUNK {
                        return;
                    }
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Some(Err(e)) => {
                    self.stream_ended(Some(e));
                    return;
                }
            }
        }
    }

    /// One read into the read buffer (made room for first); `None` without
    /// a live session.
    fn read_once(&self) -> Option<io::Result<usize>> {
        let mut st = self.shared.state.borrow_mut();
        let s = st.session.as_mut()?;
        let stream = s.stream.as_mut()?;
        if s.inbound.len() - s.inbound_end < READ_CHUNK {
            // Move the unhandled tail to the front, then grow if a frame
            // larger than the buffer is arriving (the core refuses frames
            // over frame_max from their header, so this is bounded).
            s.inbound.copy_within(s.inbound_start..s.inbound_end, 0);
            s.inbound_end -= s.inbound_start;
            s.inbound_start = 0;
            if s.inbound.len() - s.inbound_end < READ_CHUNK {
                let grown = s.inbound_end + READ_CHUNK;
                s.inbound.resize(grown, 0);
            }
        }
        let result = stream.read(&mut s.inbound[s.inbound_end..]);
        if let Ok(n) = result {
            s.inbound_end += n;
        }
        Some(result)
    }

    /// Hands the received bytes to the core one frame at a time, running
    /// each frame's callbacks before the next frame is handled.
    fn process_inbound(&self) {
        let epoch = self.session_epoch();
        loop {
            let used = {
                let mut st = self.shared.state.borrow_mut();
                let st = &mut *st;
                let Some(s) = st.session.as_mut() else { return };
                let Some(core) = s.core.as_mut() else { return };
                if s.stream.is_none() || s.inbound_start == s.inbound_end {
                    return;
                }
                let used =
                    core.handle_input(&s.inbound[s.inbound_start..s.inbound_end], Instant::now());
                s.inbound_start += used;
                if s.inbound_start == s.inbound_end {
                    s.inbound_start = 0;
                    s.inbound_end = 0;
                }
                if !s.erased && core.phase() != Phase::Protocol {
                    // erase_on_connect: the password goes once sent.
                    s.erased = true;
                    for set in st.workflow.sets_mut() {
                        set.erase_credentials_if_asked();
                    }
                    st.params.erase_credentials_if_asked();
                }
                used
            };
            self.dispatch();
            if used == 0 || self.session_epoch() != epoch {
                return;
            }
        }
    }

    /// The epoch of the live attempt's core (`None` without one).
    fn session_epoch(&self) -> Option<u64> {
        let st = self.shared.state.borrow();
        let s = st.session.as_ref()?;
        s.stream.as_ref()?;
        s.core.as_ref().map(protocol::Connection::epoch)
    }

    /// The stream ended or failed (reading); a TLS failure is the core's
    /// to judge as such.
    fn stream_ended(&self, error: Option<io::Error>) {
        {
            let mut st = self.shared.state.borrow_mut();
            let Some(core) = st.core_mut() else { return };
            match error.as_ref().and_then(tls_failure) {
                Some(tls) => core.fail(tls),
                None => core.handle_stream_end(error),
            }
        }
        self.dispatch();
    }

    /// Writes what the core queued, as far as the socket takes it; runs the
    /// drained callbacks when the buffer fell below the low-water mark.
    pub(super) fn flush(&self) {
        let (result, drained) = {
            let mut st = self.shared.state.borrow_mut();
            let st = &mut *st;
            let low = st.low_water;
            let Some(s) = st.session.as_mut() else { return };
            let (Some(stream), Some(core)) = (s.stream.as_mut(), s.core.as_mut()) else {
                return;
            };
            let result = match stream.write(core.outbound()) {
                Ok(n) => {
                    core.advance_outbound(n, Instant::now());
                    Ok(())
                }
                Err(e) => Err(e),
            };
            let drained = st.above_high_water && core.outbound().len() < low;
            if drained {
                st.above_high_water = false;
            }
            (result, drained)
        };
        self.set_interest();
        if let Err(e) = result {
            self.write_failed(e);
            return;
        }
        if drained {
            self.run_connection_callbacks(|c| &mut c.on_drained, |cb, conn| cb(conn));
        }
    }

    /// A write failed: before the failure decides how the connection ends,
    /// every byte still readable is read and handled (over TLS, every
    /// record and the plaintext rustls holds), so that what the broker sent
    /// before the stream broke — its Connection.Close above all — is heard.
    fn write_failed(&self, error: io::Error) {
        if let Some(tls) = tls_failure(&error) {
            if let Some(core) = self.shared.state.borrow_mut().core_mut() {
                core.fail(tls);
            }
            self.dispatch();
            return;
        }
        let epoch = self.session_epoch();
        loop {
            match self.read_once() {
                Some(Ok(n)) if n > 0 => self.process_inbound(),
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The end, an error, or nothing more: decided below.
                _ => break,
            }
            if self.session_epoch() != epoch {
                return;
            }
        }
        if self.session_epoch() == epoch {
            self.stream_ended(Some(error));
        }
    }

    /// One write attempt of what is queued, ignoring errors: the socket is
    /// about to go.
    fn write_out_best_effort(&self) {
        let mut st = self.shared.state.borrow_mut();
        let Some(s) = st.session.as_mut() else { return };
        let (Some(stream), Some(core)) = (s.stream.as_mut(), s.core.as_mut()) else {
            return;
        };
        if let Ok(n) = stream.write(core.outbound()) {
            core.advance_outbound(n, Instant::now());
        }
    }

    // ------------------------------------------------------------------
    // The one timer
    // ------------------------------------------------------------------

    /// The attempt's earliest deadline: the TCP connect's bounds while
    /// connecting, then the core's.
    fn next_deadline(st: &State) -> Option<Instant> {
        let s = st.session.as_ref()?;
        s.stream.as_ref()?;
        if !s.connected {
            // Beyond the clock's range (Duration::MAX): no deadline.
            let socket = st
                .params
                .socket_timeout()
                .and_then(|t| s.started.checked_add(t));
            let stack = st
                .params
                .stack_timeout()
                .and_then(|t| s.started.checked_add(t));
            return socket.into_iter().chain(stack).min();
        }
        s.core.as_ref().and_then(protocol::Connection::poll_timeout)
    }

    /// Arms the timer at the next deadline, unless one is armed at or
    /// before it.
    pub(super) fn arm_timer(&self) {
        let (deadline, old) = {
            let mut st = self.shared.state.borrow_mut();
            let Some(deadline) = Self::next_deadline(&st) else {
                return;
            };
            let Some(s) = st.session.as_mut() else { return };
            match s.timer {
                Some((_, at)) if at <= deadline => return,
                _ => {}
            }
            (deadline, s.timer.take())
        };
        if let Some((t, _)) = old {
            self.shared.ioloop.remove_timeout(t);
        }
        let weak = std::rc::Rc::downgrade(&self.shared);
        let delay = deadline.saturating_duration_since(Instant::now());
        let id = self.shared.ioloop.call_later(delay, move || {
            if let Some(conn) = super::upgrade(&weak) {
                conn.on_timer();
            }
        });
        if let Some(s) = self.shared.state.borrow_mut().session.as_mut() {
            s.timer = Some((id, deadline));
        }
    }

    fn on_timer(&self) {
        let now = Instant::now();
        enum Due {
            Nothing,
            Socket(Duration),
            Stack(Duration),
        }
        let due = {
            let mut st = self.shared.state.borrow_mut();
            let params = st.params.clone();
            let Some(s) = st.session.as_mut() else { return };
            s.timer = None;
            if s.stream.is_none() {
                return;
            }
            if !s.connected {
                match (params.socket_timeout(), params.stack_timeout()) {
                    (Some(t), _) if s.started.checked_add(t).is_some_and(|d| now >= d) => {
                        Due::Socket(t)
                    }
                    (_, Some(t)) if s.started.checked_add(t).is_some_and(|d| now >= d) => {
                        Due::Stack(t)
                    }
                    _ => Due::Nothing,
                }
            } else {
                if let Some(core) = s.core.as_mut() {
                    core.handle_timeout(now);
                }
                Due::Nothing
            }
        };
        let address = self
            .shared
            .state
            .borrow()
            .session
            .as_ref()
            .map(|s| s.address.to_string())
            .unwrap_or_default();
        match due {
            Due::Socket(timeout) => {
                self.attempt_failed(Error::SocketTimeout { address, timeout });
                self.next_attempt();
            }
            Due::Stack(timeout) => {
                self.attempt_failed(Error::StackTimeout { address, timeout });
                self.next_attempt();
            }
            Due::Nothing => {
                self.dispatch();
                self.set_interest();
                if !self.shared.in_socket_event.get() {
                    self.flush();
                }
                self.arm_timer();
            }
        }
    }

    // ------------------------------------------------------------------
    // After a command
    // ------------------------------------------------------------------

    /// What a command that changed the core needs: write interest for the
    /// bytes it queued, the high-water mark, and a dispatch for events it
    /// queued.
    pub(super) fn after_command(&self) {
        self.after_command_locked(&mut self.shared.state.borrow_mut());
    }

    /// [`SelectConnection::after_command`] under the command's own borrow:
    /// one borrow per publish or ack. It calls into the loop (interest, a
    /// queued dispatch), never into user code.
    pub(super) fn after_command_locked(&self, st: &mut State) {
        let high = st.high_water;
        let (queued, events) = st
            .core()
            .map_or((0, false), |c| (c.outbound().len(), c.has_events()));
        if queued > high {
            st.above_high_water = true;
        }
        self.update_interest(st);
        if events {
            self.queue_dispatch();
        }
        if st.shutting_down
            && st
                .core()
                .is_some_and(|c| c.total_unsettled_deliveries() == 0)
        {
            self.queue_shutdown_check();
        }
    }

    /// After a user callback panicked out of a dispatch: the next loop
    /// pass dispatches the rest, handles the bytes already read, writes
    /// what was queued and re-arms the timer. Called while unwinding, so
    /// it only queues (the loop's `call_soon` takes no borrow of ours).
    pub(super) fn queue_recovery(&self) {
        let me = self.clone();
        self.shared.ioloop.call_soon(move || {
            me.dispatch();
            me.process_inbound();
            me.set_interest();
            me.flush();
            me.arm_timer();
        });
    }

    /// Dispatches on the next loop pass (once), unless a dispatch is
    /// running: it picks the new events up.
    fn queue_dispatch(&self) {
        if self.shared.dispatching.get() || self.shared.dispatch_queued.replace(true) {
            return;
        }
        let me = self.clone();
        self.shared.ioloop.call_soon(move || {
            me.shared.dispatch_queued.set(false);
            me.dispatch();
            me.flush();
            me.arm_timer();
        });
    }
}
