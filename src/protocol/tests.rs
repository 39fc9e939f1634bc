//! The core in memory: a scripted broker feeds frames, the tests read the
//! bytes the core queued and the events it made. No socket, no sleeping:
//! time is a variable.

use std::time::{Duration, Instant};

use super::*;
use crate::error::CodecError;
use crate::frame::{encode_heartbeat, encode_message, encode_method, parse_frame};
use crate::message::Confirmation;
use crate::spec::{basic, channel as ch, confirm, queue};
use crate::table::FieldTable;
use crate::{BasicProperties, Heartbeat};

/// A frame the core sent, owned.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Sent {
    Method(u16, Method),
    Header(u16, u64),
    Body(u16, Vec<u8>),
    Heartbeat,
}

/// A core and the broker's side of it.
pub(super) struct Pair {
    pub(super) core: Connection,
    pub(super) now: Instant,
}

impl Pair {
    /// A core whose protocol header is already taken off its buffer.
    pub(super) fn new(params: ConnectionParameters) -> Pair {
        let now = Instant::now();
        let config = Config {
            epoch: 7,
            first_request_id: 100,
            handshake_deadline: Some((now + Duration::from_secs(10), Duration::from_secs(10))),
            peer: "127.0.0.1:5672".into(),
        };
        let mut core = Connection::new(params, config, now);
        assert_eq!(core.outbound(), &PROTOCOL_HEADER);
        core.advance_outbound(8, now);
        Pair { core, now }
    }

    /// Through the whole handshake with the broker's `tune`.
    pub(super) fn open_with(params: ConnectionParameters, tune: connection::Tune) -> Pair {
        let mut p = Pair::new(params);
        p.feed(0, start());
        assert!(matches!(
            p.sent().as_slice(),
            [Sent::Method(0, Method::ConnectionStartOk(_))]
        ));
        p.feed(0, tune);
        let sent = p.sent();
        assert!(
            matches!(
                sent.as_slice(),
                [
                    Sent::Method(0, Method::ConnectionTuneOk(_)),
                    Sent::Method(0, Method::ConnectionOpen(_))
                ]
            ),
            "{sent:?}"
        );
        p.feed(0, connection::OpenOk::default());
        assert!(matches!(p.events().as_slice(), [Event::Opened]));
        p
    }

    pub(super) fn open() -> Pair {
        Pair::open_with(ConnectionParameters::default(), rabbit_tune())
    }

    /// Opens a channel and answers it.
    pub(super) fn channel(&mut self) -> ChannelKey {
        let (key, request) = self.core.open_channel(None).unwrap();
        assert_eq!(
            self.sent(),
            [Sent::Method(key.number, ch::Open::default().into())]
        );
        self.feed(key.number, ch::OpenOk::default());
        match self.events().as_slice() {
            [
                Event::Reply {
                    request: r,
                    result: Ok(Reply::Method(Method::ChannelOpenOk(_))),
                    ..
                },
            ] => assert_eq!(*r, request),
            other => panic!("{other:?}"),
        }
        key
    }

    /// Feeds one method frame from the broker; it must be used whole.
    pub(super) fn feed(&mut self, channel: u16, method: impl Into<Method>) {
        let mut bytes = Vec::new();
        encode_method(&mut bytes, channel, &method.into(), 0).unwrap();
        self.feed_bytes(&bytes);
    }

    /// Feeds bytes, frame by frame, until they are used.
    pub(super) fn feed_bytes(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let used = self.core.handle_input(bytes, self.now);
            assert!(used > 0, "the core wants more than {bytes:02x?}");
            bytes = &bytes[used..];
        }
    }

    /// A whole message from the broker (method, header, body).
    pub(super) fn feed_message(&mut self, channel: u16, method: impl Into<Method>, body: &[u8]) {
        let mut bytes = Vec::new();
        encode_message(
            &mut bytes,
            channel,
            &method.into(),
            &BasicProperties::default(),
            body,
            self.core.frame_max(),
        )
        .unwrap();
        self.feed_bytes(&bytes);
    }

    /// Everything the core queued since the last call, as frames (and
    /// taken off its buffer).
    pub(super) fn sent(&mut self) -> Vec<Sent> {
        let bytes = self.core.outbound().to_vec();
        self.core.advance_outbound(bytes.len(), self.now);
        decode(&bytes)
    }

    /// The events since the last call.
    pub(super) fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.core.poll_event()).collect()
    }

    pub(super) fn advance(&mut self, by: Duration) {
        self.now += by;
    }
}

pub(super) fn decode(mut bytes: &[u8]) -> Vec<Sent> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (frame, used) = parse_frame(bytes, 0)
            .unwrap_or_else(|e| panic!("the core sent what the codec refuses: {e}"))
            .expect("whole frames");
        out.push(match frame {
            Frame::Method { channel, method } => Sent::Method(channel, method),
            Frame::Header { channel, header } => Sent::Header(channel, header.body_size),
            Frame::Body { channel, payload } => Sent::Body(channel, payload.to_vec()),
            Frame::Heartbeat => Sent::Heartbeat,
        });
        bytes = &bytes[used..];
    }
    out
}

pub(super) fn start() -> connection::Start {
    let mut caps = FieldTable::new();
    caps.insert("publisher_confirms", true);
    let mut props = FieldTable::new();
    props.insert("capabilities", caps);
    props.insert("product", "RabbitMQ");
    connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: props,
        mechanisms: "PLAIN AMQPLAIN".into(),
        locales: "en_US".into(),
    }
}

pub(super) fn rabbit_tune() -> connection::Tune {
    connection::Tune {
        channel_max: 2047,
        frame_max: 131_072,
        heartbeat: 60,
    }
}

fn names(sent: &[Sent]) -> Vec<&'static str> {
    sent.iter()
        .map(|s| match s {
            Sent::Method(_, m) => m.name(),
            Sent::Header(..) => "header",
            Sent::Body(..) => "body",
            Sent::Heartbeat => "heartbeat",
        })
        .collect()
}

/// The terminal event's error, checking it is the last event.
#[track_caller]
fn closed_with(events: &[Event]) -> &Error {
    match events.last() {
        Some(Event::Closed { error, .. }) => error,
        other => panic!("the last event is Closed: {other:?} of {events:?}"),
    }
}

/// The client's Connection.Close reply code among `sent`.
#[track_caller]
fn close_code(sent: &[Sent]) -> u16 {
    match sent.last() {
        Some(Sent::Method(0, Method::ConnectionClose(c))) => c.reply_code,
        other => panic!("expected Connection.Close last, got {other:?} in {sent:?}"),
    }
}

fn declare(name: &str) -> Method {
    queue::Declare {
        queue: name.into(),
        ..Default::default()
    }
    .into()
}

fn declare_ok(name: &str) -> queue::DeclareOk {
    queue::DeclareOk {
        queue: name.into(),
        message_count: 0,
        consumer_count: 0,
    }
}

// ----------------------------------------------------------------------
// Handshake and tuning
// ----------------------------------------------------------------------

fn tuned(ours: (u16, u32, Heartbeat), theirs: (u16, u32, u16)) -> connection::TuneOk {
    let mut params = ConnectionParameters::default();
    params.set_channel_max(ours.0).unwrap();
    params.set_frame_max(ours.1).unwrap();
    params.set_heartbeat(ours.2);
    let mut p = Pair::new(params);
    p.feed(0, start());
    p.sent();
    p.feed(
        0,
        connection::Tune {
            channel_max: theirs.0,
            frame_max: theirs.1,
            heartbeat: theirs.2,
        },
    );
    match p.sent().as_slice() {
        [
            Sent::Method(0, Method::ConnectionTuneOk(ok)),
            Sent::Method(0, Method::ConnectionOpen(_)),
        ] => {
            assert_eq!(
                (p.core.channel_max(), p.core.frame_max(), p.core.heartbeat()),
                (ok.channel_max, ok.frame_max, ok.heartbeat)
            );
            ok.clone()
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tuning_takes_the_smaller_limit_and_zero_means_no_limit_on_either_side() {
    let ok = tuned((100, 8192, Heartbeat::ServerDefault), (2047, 131_072, 60));
    assert_eq!(
        (ok.channel_max, ok.frame_max, ok.heartbeat),
        (100, 8192, 60)
    );
    let ok = tuned((2047, 131_072, Heartbeat::Timeout(5)), (100, 8192, 60));
    assert_eq!((ok.channel_max, ok.frame_max, ok.heartbeat), (100, 8192, 5));
    // The broker's 0: ours wins.
    let ok = tuned((10, 4096, Heartbeat::Disabled), (0, 0, 60));
    assert_eq!((ok.channel_max, ok.frame_max, ok.heartbeat), (10, 4096, 0));
    // A closure decides the heartbeat from the broker's proposal.
    let ok = tuned(
        (
            100,
            8192,
            Heartbeat::negotiate_with(|proposed| proposed / 2),
        ),
        (0, 0, 60),
    );
    assert_eq!(ok.heartbeat, 30);
    // Our parameters cannot hold 0 (they are validated), so our side's 0
    // is proven on the rule itself: symmetric, and 0 on both is no limit.
    use super::handshake::negotiate;
    assert_eq!(negotiate(0, 2047), 2047);
    assert_eq!(negotiate(2047, 0), 2047);
    assert_eq!(negotiate(0, 0), 0);
    assert_eq!(negotiate(10, 20), 10);
}

#[test]
fn the_handshake_sends_start_ok_tune_ok_and_open_and_then_reports_open() {
    let mut params = ConnectionParameters::default();
    params.set_virtual_host("vh").unwrap();
    let mut p = Pair::new(params);
    assert_eq!(p.core.phase(), Phase::Protocol);
    p.feed(0, start());
    assert_eq!(p.core.phase(), Phase::Start);
    match p.sent().as_slice() {
        [Sent::Method(0, Method::ConnectionStartOk(ok))] => {
            assert_eq!(ok.mechanism, "PLAIN");
            assert_eq!(ok.response.as_bytes(), b"\0guest\0guest");
        }
        other => panic!("{other:?}"),
    }
    p.feed(0, rabbit_tune());
    assert_eq!(p.core.phase(), Phase::Tune);
    match p.sent().as_slice() {
        [_, Sent::Method(0, Method::ConnectionOpen(open))] => assert_eq!(open.virtual_host, "vh"),
        other => panic!("{other:?}"),
    }
    assert!(p.events().is_empty());
    p.feed(0, connection::OpenOk::default());
    assert_eq!(p.core.phase(), Phase::Open);
    assert!(matches!(p.events().as_slice(), [Event::Opened]));
    assert!(p.core.capability("publisher_confirms"));
    assert!(!p.core.capability("basic.nack"));
}

#[test]
fn a_tune_below_4096_and_a_start_of_another_version_fail_the_open() {
    let mut p = Pair::new(ConnectionParameters::default());
    p.feed(0, start());
    p.sent();
    p.feed(
        0,
        connection::Tune {
            frame_max: 512,
            ..rabbit_tune()
        },
    );
    let events = p.events();
    assert!(matches!(
        events.as_slice(),
        [Event::Closed {
            error: Error::IncompatibleProtocol { .. },
            opened: false
        }]
    ));
    assert!(p.sent().is_empty(), "no Close handshake before open");

    let mut p = Pair::new(ConnectionParameters::default());
    p.feed(
        0,
        connection::Start {
            version_minor: 8,
            ..start()
        },
    );
    assert!(matches!(
        closed_with(&p.events()),
        Error::IncompatibleProtocol { detail } if detail.contains("0-8")
    ));
}

#[test]
fn a_refused_login_and_vhost_are_the_probable_errors_and_answered_with_close_ok() {
    let mut p = Pair::new(ConnectionParameters::default());
    p.feed(0, start());
    p.sent();
    p.feed(
        0,
        connection::Close {
            reply_code: 403,
            reply_text: "ACCESS_REFUSED".into(),
            ..Default::default()
        },
    );
    assert_eq!(names(&p.sent()), ["Connection.CloseOk"]);
    assert!(matches!(
        closed_with(&p.events()),
        Error::ProbableAuthenticationError {
            reply_code: 403,
            ..
        }
    ));

    let mut p = Pair::new(ConnectionParameters::default());
    p.feed(0, start());
    p.feed(0, rabbit_tune());
    p.sent();
    p.feed(
        0,
        connection::Close {
            reply_code: 530,
            reply_text: "NOT_ALLOWED".into(),
            ..Default::default()
        },
    );
    assert_eq!(names(&p.sent()), ["Connection.CloseOk"]);
    assert!(matches!(
        closed_with(&p.events()),
        Error::ProbableAccessDeniedError {
            reply_code: 530,
            ..
        }
    ));
}

#[test]
fn a_stream_end_means_what_its_phase_says() {
    type Expected = fn(&Error) -> bool;
    let cases: [(usize, Expected); 4] = [
        (0, |e| matches!(e, Error::IncompatibleProtocol { .. })),
        (1, |e| {
            matches!(e, Error::ProbableAuthenticationError { reply_code: 0, .. })
        }),
        (2, |e| {
            matches!(e, Error::ProbableAccessDeniedError { reply_code: 0, .. })
        }),
        (3, |e| matches!(e, Error::StreamLost { .. })),
    ];
    for (steps, expected) in cases {
        let mut p = Pair::new(ConnectionParameters::default());
        if steps >= 1 {
            p.feed(0, start());
        }
        if steps >= 2 {
            p.feed(0, rabbit_tune());
        }
        if steps >= 3 {
            p.feed(0, connection::OpenOk::default());
        }
        p.events();
        p.core.handle_stream_end(None);
        let events = p.events();
        assert!(expected(closed_with(&events)), "{steps}: {events:?}");
        assert_eq!(events.len(), 1);
    }
}

#[test]
fn the_handshake_deadline_is_a_stack_timeout() {
    let mut p = Pair::new(ConnectionParameters::default());
    p.feed(0, start());
    let deadline = p.core.poll_timeout().expect("a handshake deadline");
    p.core.handle_timeout(deadline - Duration::from_millis(1));
    assert!(p.events().is_empty());
    p.core.handle_timeout(deadline);
    assert!(matches!(
        closed_with(&p.events()),
        Error::StackTimeout { address, .. } if address == "127.0.0.1:5672"
    ));
    assert_eq!(p.core.poll_timeout(), None);
}

// ----------------------------------------------------------------------
// Heartbeats
// ----------------------------------------------------------------------

fn heartbeat_pair(seconds: u16) -> Pair {
    let mut params = ConnectionParameters::default();
    params.set_heartbeat(seconds);
    let mut p = Pair::open_with(
        params,
        connection::Tune {
            heartbeat: seconds,
            ..rabbit_tune()
        },
    );
    p.sent();
    p
}

#[test]
fn a_heartbeat_goes_out_after_half_the_timeout_of_silence() {
    let mut p = heartbeat_pair(10);
    let due = p.core.poll_timeout().expect("the heartbeat send is due");
    assert_eq!(due, p.now + Duration::from_secs(5));
    p.now = due - Duration::from_millis(1);
    p.core.handle_timeout(p.now);
    assert!(p.sent().is_empty(), "not before t/2");
    // Something sent meanwhile resets the clock.
    p.core
        .ack(
            ChannelKey {
                number: 9,
                generation: 1,
            },
            1,
            false,
            None,
        )
        .unwrap_err();
    p.now = due;
    p.core.handle_timeout(p.now);
    assert_eq!(p.sent(), [Sent::Heartbeat]);
    // The next is t/2 later (the broker keeps talking so it stays alive).
    p.feed_bytes(&{
        let mut hb = Vec::new();
        encode_heartbeat(&mut hb);
        hb
    });
    assert_eq!(p.core.poll_timeout(), Some(p.now + Duration::from_secs(5)));
    assert!(p.events().is_empty());
}

#[test]
fn written_bytes_postpone_the_heartbeat() {
    let mut p = heartbeat_pair(10);
    let key = p.channel();
    p.advance(Duration::from_secs(4));
    p.core
        .publish(key, "", "q", false, &BasicProperties::default(), b"x")
        .unwrap();
    p.sent();
    assert_eq!(p.core.poll_timeout(), Some(p.now + Duration::from_secs(5)));
}

#[test]
fn nothing_received_for_twice_the_timeout_is_a_heartbeat_timeout_without_close() {
    let mut p = heartbeat_pair(2);
    let start = p.now;
    // The client keeps sending heartbeats; the broker says nothing.
    loop {
        let due = p.core.poll_timeout().unwrap();
        p.now = due;
        p.core.handle_timeout(due);
        let events = p.events();
        if let Some(Event::Closed { error, opened }) = events.last() {
            assert!(*opened);
            match error {
                Error::AmqpHeartbeatTimeout { timeout, silence } => {
                    assert_eq!(*timeout, Duration::from_secs(2));
                    assert_eq!(*silence, Duration::from_secs(4));
                }
                other => panic!("{other:?}"),
            }
            break;
        }
        assert!(p.now - start < Duration::from_secs(10), "no timeout");
    }
    assert_eq!(p.now - start, Duration::from_secs(4));
    assert!(
        p.sent().iter().all(|s| *s == Sent::Heartbeat),
        "heartbeats only, no Close"
    );
    assert_eq!(p.core.poll_timeout(), None);
}

// ----------------------------------------------------------------------
// Wire faults: 501, 502, 503, 505
// ----------------------------------------------------------------------

#[test]
fn a_bad_frame_end_is_501_and_an_unknown_method_503_and_bad_arguments_502() {
    let mut bad_end = Vec::new();
    encode_method(&mut bad_end, 0, &connection::Blocked::default().into(), 0).unwrap();
    *bad_end.last_mut().unwrap() = 0;
    let unknown = vec![1, 0, 0, 0, 0, 0, 4, 0, 99, 0, 1, 0xCE];
    let bad_args = vec![1, 0, 1, 0, 0, 0, 5, 0, 20, 0, 10, 200, 0xCE];
    for (bytes, code) in [(bad_end, 501), (unknown, 503), (bad_args, 502)] {
        let mut p = Pair::open();
        p.sent();
        p.channel();
        assert_eq!(p.core.handle_input(&bytes, p.now), bytes.len());
        assert_eq!(close_code(&p.sent()), code);
        let events = p.events();
        assert!(
            matches!(&events[..], [Event::ChannelClosed { .. }, Event::Closed { error: Error::Protocol(e), .. }] if e.reply_code() == code),
            "{events:?}"
        );
    }
}

#[test]
fn a_frame_over_frame_max_is_refused_from_its_header() {
    let mut p = Pair::open();
    p.sent();
    let header = [1, 0, 1, 0, 0xFF, 0xFF, 0xFF];
    assert_eq!(p.core.handle_input(&header, p.now), header.len());
    assert_eq!(close_code(&p.sent()), 501);
    assert!(matches!(
        closed_with(&p.events()),
        Error::Protocol(CodecError::FrameTooLarge { .. })
    ));
}

#[test]
fn frames_out_of_place_are_505() {
    type Setup = fn(&mut Pair) -> Vec<u8>;
    let cases: [(&str, Setup); 4] = [
        ("channel 3, which is not open", |p| {
            let mut b = Vec::new();
            encode_method(&mut b, 3, &basic::Ack::default().into(), 0).unwrap();
            let _ = p;
            b
        }),
        ("no reply to a request in flight", |p| {
            let key = p.channel();
            let mut b = Vec::new();
            encode_method(&mut b, key.number, &declare_ok("q").into(), 0).unwrap();
            b
        }),
        ("content frame on channel 0", |_| {
            let mut b = Vec::new();
            crate::frame::encode_body(&mut b, 0, b"x", 0);
            b
        }),
        ("without a method", |p| {
            let key = p.channel();
            let mut b = Vec::new();
            crate::frame::encode_content_header(
                &mut b,
                key.number,
                60,
                1,
                &BasicProperties::default(),
                0,
            )
            .unwrap();
            b
        }),
    ];
    for (detail, setup) in cases {
        let mut p = Pair::open();
        p.sent();
        let bytes = setup(&mut p);
        p.sent();
        p.events();
        p.feed_bytes(&bytes);
        assert_eq!(close_code(&p.sent()), 505, "{detail}");
        match closed_with(&p.events()) {
            Error::UnexpectedFrame { detail: d } => assert!(d.contains(detail), "{d}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn nothing_is_handled_after_the_end() {
    let mut p = Pair::open();
    p.core.handle_stream_end(None);
    p.events();
    let mut b = Vec::new();
    encode_method(&mut b, 0, &connection::Blocked::default().into(), 0).unwrap();
    assert_eq!(p.core.handle_input(&b, p.now), b.len());
    assert!(p.events().is_empty());
    p.core.handle_stream_end(None);
    p.core.fail(Error::ConnectionOpenAborted);
    assert!(p.events().is_empty());
}

// ----------------------------------------------------------------------
// Requests
// ----------------------------------------------------------------------

#[test]
fn requests_go_out_one_at_a_time_and_nowait_ones_wait_behind_the_one_in_flight() {
    let mut p = Pair::open();
    let key = p.channel();
    let first = p.core.rpc(key, declare("a")).unwrap();
    let second = p.core.rpc(key, declare("b")).unwrap();
    p.core
        .nowait(
            key,
            queue::Declare {
                queue: "c".into(),
                nowait: true,
                ..Default::default()
            }
            .into(),
        )
        .unwrap();
    // Acks never wait behind a request in flight... but do wait behind
    // items not yet sent, in order.
    p.core.ack(key, 1, false, None).unwrap();
    assert_eq!(names(&p.sent()), ["Queue.Declare"]);
    p.feed(key.number, declare_ok("a"));
    assert_eq!(names(&p.sent()), ["Queue.Declare"]);
    p.feed(key.number, declare_ok("b"));
    assert_eq!(names(&p.sent()), ["Queue.Declare", "Basic.Ack"]);
    let events = p.events();
    let replies: Vec<(RequestId, String)> = events
        .iter()
        .map(|e| match e {
            Event::Reply {
                request,
                method: Method::QueueDeclare(sent),
                result: Ok(Reply::Method(Method::QueueDeclareOk(ok))),
                ..
            } => {
                assert_eq!(
                    sent.queue, ok.queue,
                    "the reply carries the request's method"
                );
                (*request, ok.queue.clone())
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        replies,
        [(first, "a".to_string()), (second, "b".to_string())]
    );
    assert_eq!(second.0, first.0 + 1);
    assert!(first.0 > 100, "ids count on from the seed");
}

#[test]
fn an_ack_with_nothing_queued_goes_out_at_once_while_a_request_waits() {
    let mut p = Pair::open();
    let key = p.channel();
    p.core.rpc(key, declare("a")).unwrap();
    p.sent();
    p.core.ack(key, 5, true, None).unwrap();
    assert_eq!(names(&p.sent()), ["Basic.Ack"]);
}

#[test]
fn caller_mistakes_are_errors_at_the_call_and_change_nothing() {
    let mut p = Pair::open();
    let key = p.channel();
    let long = "x".repeat(300);
    assert!(matches!(
        p.core.rpc(key, declare(&long)),
        Err(Error::Encode(_))
    ));
    assert!(matches!(
        p.core.rpc(key, basic::Get::default().into()),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        p.core
            .rpc(key, basic::Recover { requeue: true }.into())
            .map(|_| ()),
        Ok(())
    ));
    p.feed(key.number, basic::RecoverOk {});
    p.events();
    let stale = ChannelKey {
        number: key.number,
        generation: key.generation + 1,
    };
    assert!(matches!(
        p.core.rpc(stale, declare("q")),
        Err(Error::ChannelWrongState { .. })
    ));
    assert!(matches!(
        p.core.cancel(key, "nobody"),
        Err(Error::InvalidParameter {
            name: "consumer_tag",
            ..
        })
    ));
    assert!(matches!(
        p.core.open_channel(Some(key.number)),
        Err(Error::InvalidChannelNumber {
            reason: "in use",
            ..
        })
    ));
    assert!(matches!(
        p.core.open_channel(Some(0)),
        Err(Error::InvalidChannelNumber { number: 0, .. })
    ));
    assert!(matches!(
        p.core.ack(key, 1, false, Some(8)),
        Err(Error::ChannelWrongState { detail }) if detail.contains("instance 8")
    ));
    p.core.ack(key, 1, false, Some(7)).unwrap();
    assert_eq!(names(&p.sent()), ["Basic.Recover", "Basic.Ack"]);
    assert!(p.events().is_empty());
}

#[test]
fn the_channel_limit_is_enforced_and_a_number_is_reused_with_a_new_generation_after_close_ok() {
    let mut params = ConnectionParameters::default();
    params.set_channel_max(2).unwrap();
    let mut p = Pair::open_with(params, rabbit_tune());
    let a = p.channel();
    let b = p.channel();
    assert_eq!((a.number, b.number), (1, 2));
    assert!(matches!(
        p.core.open_channel(None),
        Err(Error::NoFreeChannels { channel_max: 2 })
    ));
    assert!(p.sent().is_empty());
    p.core.close_channel(a, 200, "bye").unwrap();
    assert_eq!(names(&p.sent()), ["Channel.Close"]);
    // Not free before the CloseOk.
    assert!(p.core.open_channel(None).is_err());
    p.feed(1, ch::CloseOk {});
    assert!(matches!(
        p.events().as_slice(),
        [Event::ChannelClosed { channel, error: Error::ChannelClosedByClient { reply_code: 200, .. } }] if *channel == a
    ));
    let (again, _) = p.core.open_channel(None).unwrap();
    assert_eq!(again.number, 1);
    assert_ne!(again.generation, a.generation);
    assert_eq!(p.core.channel_phase(a), ChannelState::Closed);
    assert_eq!(p.core.channel_phase(again), ChannelState::Opening);
}

#[test]
fn a_reopened_channel_keeps_its_key_on_a_new_instance() {
    let mut p = Pair::open();
    p.channel();
    let key = p.channel();
    let mut fresh = Pair::open();
    let request = fresh.core.reopen_channel(key).unwrap();
    assert_eq!(
        fresh.sent(),
        [Sent::Method(key.number, ch::Open::default().into())]
    );
    fresh.feed(key.number, ch::OpenOk::default());
    assert!(matches!(
        fresh.events().as_slice(),
        [Event::Reply { request: r, channel: Some(k), .. }] if *r == request && *k == key
    ));
    assert_eq!(fresh.core.channel_phase(key), ChannelState::Open);
    // A number taken later still gets a newer generation.
    fresh.core.close_channel(key, 200, "").unwrap();
    fresh.feed(key.number, ch::CloseOk {});
    let (next, _) = fresh.core.open_channel(Some(key.number)).unwrap();
    assert!(next.generation > key.generation);
}

// ----------------------------------------------------------------------
// Consumers, content, confirms
// ----------------------------------------------------------------------

fn consumer(p: &mut Pair, key: ChannelKey, tag: &str, no_ack: bool) -> ConsumerId {
    let (request, id, given) = p
        .core
        .consume(
            key,
            basic::Consume {
                queue: "q".into(),
                consumer_tag: tag.into(),
                no_ack,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(names(&p.sent()), ["Basic.Consume"]);
    p.feed(
        key.number,
        basic::ConsumeOk {
            consumer_tag: given.clone(),
        },
    );
    assert!(matches!(
        p.events().as_slice(),
        [Event::Reply { request: r, result: Ok(Reply::Method(Method::BasicConsumeOk(_))), .. }] if *r == request
    ));
    id
}

fn deliver(tag: &str, delivery_tag: u64) -> basic::Deliver {
    basic::Deliver {
        consumer_tag: tag.into(),
        delivery_tag,
        routing_key: "q".into(),
        ..Default::default()
    }
}

#[test]
fn a_delivery_split_over_frames_reaches_its_consumer_whole_with_the_epoch() {
    let mut params = ConnectionParameters::default();
    params.set_frame_max(4096).unwrap();
    let mut p = Pair::open_with(params, rabbit_tune());
    let key = p.channel();
    let id = consumer(&mut p, key, "c", false);
    let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    p.feed_message(key.number, deliver("c", 1), &body);
    match p.events().as_slice() {
        [
            Event::Delivery {
                channel,
                consumer,
                delivery,
            },
        ] => {
            assert_eq!((*channel, *consumer), (key, id));
            assert_eq!(delivery.body, body);
            assert_eq!(delivery.epoch, 7);
            assert_eq!(delivery.method.delivery_tag, 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_generated_consumer_tag_is_unique_and_a_duplicate_is_refused() {
    let mut p = Pair::open();
    let key = p.channel();
    let (_, _, t1) = p.core.consume(key, basic::Consume::default()).unwrap();
    let (_, _, t2) = p.core.consume(key, basic::Consume::default()).unwrap();
    assert_eq!(t1, format!("ctag{}.1", key.number));
    assert_ne!(t1, t2);
    assert!(matches!(
        p.core.consume(
            key,
            basic::Consume {
                consumer_tag: t1.clone(),
                ..Default::default()
            }
        ),
        Err(Error::DuplicateConsumerTag { tag }) if tag == t1
    ));
}

#[test]
fn deliveries_crossing_a_cancel_are_rejected_unless_auto_acked_and_the_cancel_ends_the_consumer() {
    for no_ack in [false, true] {
        let mut p = Pair::open();
        let key = p.channel();
        let id = consumer(&mut p, key, "c", no_ack);
        let request = p.core.cancel(key, "c").unwrap();
        assert_eq!(p.core.consumer_tags(key), Vec::<String>::new());
        assert_eq!(names(&p.sent()), ["Basic.Cancel"]);
        p.feed_message(key.number, deliver("c", 4), b"late");
        let sent = p.sent();
        if no_ack {
            assert!(sent.is_empty());
        } else {
            assert_eq!(
                sent,
                [Sent::Method(
                    key.number,
                    basic::Reject {
                        delivery_tag: 4,
                        requeue: true
                    }
                    .into()
                )]
            );
        }
        p.feed(
            key.number,
            basic::CancelOk {
                consumer_tag: "c".into(),
            },
        );
        let mut events = p.events();
        if no_ack {
            // The broker let go of an auto-acked message: the face gets it
            // as such, never as a delivery to the cancelled consumer.
            assert!(
                matches!(
                    events.first(),
                    Some(Event::DeliveryAfterCancel { consumer, delivery, .. })
                        if *consumer == id && delivery.method.delivery_tag == 4
                ),
                "{events:?}"
            );
            events.remove(0);
        }
        assert!(
            matches!(
                events.as_slice(),
                [
                    Event::ConsumerEnded { consumer, by_broker: None, .. },
                    Event::Reply { request: r, result: Ok(Reply::Method(Method::BasicCancelOk(_))), .. }
                ] if *consumer == id && *r == request
            ),
            "{events:?}"
        );
    }
}

#[test]
fn a_broker_cancel_is_answered_and_ends_the_consumer() {
    let mut p = Pair::open();
    let key = p.channel();
    let id = consumer(&mut p, key, "c", false);
    p.feed(
        key.number,
        basic::Cancel {
            consumer_tag: "c".into(),
            nowait: false,
        },
    );
    assert_eq!(names(&p.sent()), ["Basic.CancelOk"]);
    assert!(matches!(
        p.events().as_slice(),
        [Event::ConsumerEnded { consumer, by_broker: Some(c), .. }] if *consumer == id && c.consumer_tag == "c"
    ));
}

#[test]
fn confirms_with_multiple_settle_every_earlier_tag_and_the_rest_fail_on_close() {
    let mut p = Pair::open();
    let key = p.channel();
    let select = p.core.confirm_select(key).unwrap();
    let tags: Vec<Option<u64>> = (0..6)
        .map(|_| {
            p.core
                .publish(key, "", "q", false, &BasicProperties::default(), b"m")
                .unwrap()
        })
        .collect();
    assert_eq!(tags, (1..=6).map(Some).collect::<Vec<_>>());
    // The Select is in flight: the publishes go out right behind it (the
    // broker handles them in order).
    let sent = names(&p.sent());
    assert_eq!(sent.len(), 19, "{sent:?}");
    assert_eq!(sent[0], "Confirm.Select");
    p.feed(key.number, confirm::SelectOk {});
    p.feed(
        key.number,
        basic::Ack {
            delivery_tag: 3,
            multiple: true,
        },
    );
    p.feed(
        key.number,
        basic::Nack {
            delivery_tag: 5,
            multiple: false,
            requeue: false,
        },
    );
    assert_eq!(p.core.unconfirmed_delivery_tags(key), [4, 6]);
    p.feed(
        key.number,
        ch::Close {
            reply_code: 404,
            reply_text: "NOT_FOUND".into(),
            ..Default::default()
        },
    );
    assert_eq!(names(&p.sent()), ["Channel.CloseOk"]);
    let events = p.events();
    let summary: Vec<String> = events
        .iter()
        .map(|e| match e {
            Event::Reply { request, .. } if *request == select => "select".into(),
            Event::Confirm {
                confirmation:
                    Confirmation::Ack {
                        delivery_tag,
                        multiple: true,
                        settled,
                    },
                ..
            } => format!("ack{delivery_tag}+{settled:?}"),
            Event::Confirm {
                confirmation:
                    Confirmation::Nack {
                        delivery_tag,
                        multiple: false,
                        settled,
                    },
                ..
            } => format!("nack{delivery_tag}{settled:?}"),
            Event::Confirm {
                confirmation: Confirmation::Failed { settled, error },
                ..
            } => {
                assert_eq!(error.reply_code(), Some(404));
                format!("failed{settled:?}")
            }
            Event::ChannelClosed { error, .. } => format!("closed{}", error.reply_code().unwrap()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "select",
            "ack3+[1, 2, 3]",
            "nack5[5]",
            "failed[4, 6]",
            "closed404"
        ]
    );
}

#[test]
fn a_get_answers_with_the_message_or_none_and_two_at_once_are_refused() {
    let mut p = Pair::open();
    let key = p.channel();
    let first = p.core.get(key, basic::Get::default()).unwrap();
    assert!(matches!(
        p.core.get(key, basic::Get::default()),
        Err(Error::DuplicateGetOkCallback)
    ));
    p.sent();
    p.feed_message(
        key.number,
        basic::GetOk {
            delivery_tag: 1,
            message_count: 0,
            ..Default::default()
        },
        b"hello",
    );
    match p.events().as_slice() {
        [
            Event::Reply {
                request,
                result: Ok(Reply::Get(Some(m))),
                ..
            },
        ] => {
            assert_eq!(*request, first);
            assert_eq!(m.body, b"hello");
        }
        other => panic!("{other:?}"),
    }
    let second = p.core.get(key, basic::Get::default()).unwrap();
    p.feed(key.number, basic::GetEmpty::default());
    assert!(matches!(
        p.events().as_slice(),
        [Event::Reply { request, result: Ok(Reply::Get(None)), .. }] if *request == second
    ));
}

// ----------------------------------------------------------------------
// Closing
// ----------------------------------------------------------------------

#[test]
fn close_cancels_consumers_then_sends_channel_close_then_connection_close() {
    let mut p = Pair::open();
    let key = p.channel();
    consumer(&mut p, key, "c", false);
    p.core.close(200, "bye", p.now).unwrap();
    assert_eq!(p.core.phase(), Phase::Closing);
    assert!(matches!(
        p.core.close(200, "again", p.now),
        Err(Error::ConnectionWrongState { .. })
    ));
    assert_eq!(names(&p.sent()), ["Basic.Cancel"]);
    p.feed(
        key.number,
        basic::CancelOk {
            consumer_tag: "c".into(),
        },
    );
    assert_eq!(names(&p.sent()), ["Channel.Close"]);
    p.feed(key.number, ch::CloseOk {});
    assert_eq!(close_code(&p.sent()), 200);
    p.feed(0, connection::CloseOk {});
    let events = p.events();
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::ConsumerEnded { .. },
                Event::ChannelClosed {
                    error: Error::ChannelClosedByClient { .. },
                    ..
                },
                Event::Closed {
                    error: Error::ConnectionClosedByClient {
                        reply_code: 200,
                        ..
                    },
                    opened: true
                }
            ]
        ),
        "{events:?}"
    );
}

#[test]
fn close_while_opening_ends_at_once_without_a_handshake() {
    let mut p = Pair::new(ConnectionParameters::default());
    p.feed(0, start());
    p.sent();
    p.core.close(200, "bye", p.now).unwrap();
    assert!(p.sent().is_empty());
    assert!(matches!(
        p.events().as_slice(),
        [Event::Closed {
            error: Error::ConnectionOpenAborted,
            opened: false
        }]
    ));
}

#[test]
fn an_unanswered_close_ends_at_the_bound_with_our_reason() {
    let mut p = Pair::open();
    let key = p.channel();
    p.core.close(200, "bye", p.now).unwrap();
    let bound = p.core.poll_timeout().unwrap();
    assert_eq!(bound, p.now + DEFAULT_CLOSE_TIMEOUT);
    p.core.handle_timeout(bound);
    let events = p.events();
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::ChannelClosed { channel, error: Error::ConnectionClosedByClient { .. } },
                Event::Closed { error: Error::ConnectionClosedByClient { .. }, .. }
            ] if *channel == key
        ),
        "{events:?}"
    );
}

#[test]
fn a_broker_close_crossing_ours_is_answered_and_wins() {
    let mut p = Pair::open();
    p.channel();
    p.core.close(200, "bye", p.now).unwrap();
    p.sent();
    p.feed(
        0,
        connection::Close {
            reply_code: 320,
            reply_text: "CONNECTION_FORCED".into(),
            ..Default::default()
        },
    );
    assert_eq!(names(&p.sent()), ["Connection.CloseOk"]);
    assert!(matches!(
        closed_with(&p.events()),
        Error::ConnectionClosedByBroker {
            reply_code: 320,
            ..
        }
    ));
}

#[test]
fn a_broker_close_followed_by_eof_or_a_reset_stays_closed_by_broker() {
    for reset in [false, true] {
        let mut p = Pair::open();
        p.feed(
            0,
            connection::Close {
                reply_code: 320,
                reply_text: "CONNECTION_FORCED".into(),
                ..Default::default()
            },
        );
        let error = reset.then(|| std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        p.core.handle_stream_end(error);
        let events = p.events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(
            closed_with(&events),
            Error::ConnectionClosedByBroker {
                reply_code: 320,
                ..
            }
        ));
    }
}

#[test]
fn a_channel_close_while_opening_suppresses_the_open_ok_and_fails_the_open() {
    let mut p = Pair::open();
    let (key, request) = p.core.open_channel(None).unwrap();
    p.core.close_channel(key, 200, "changed my mind").unwrap();
    assert_eq!(names(&p.sent()), ["Channel.Open", "Channel.Close"]);
    p.feed(key.number, ch::OpenOk::default());
    p.feed(key.number, ch::CloseOk {});
    let events = p.events();
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::Reply { request: r, result: Err(Error::ChannelClosedByClient { .. }), .. },
                Event::ChannelClosed { .. }
            ] if *r == request
        ),
        "{events:?}"
    );
}

/// Every way a connection can end, from the same starting point: two
/// channels, requests in flight and queued, a get, unconfirmed publishes
/// and an update-secret pending.
#[test]
fn every_pending_request_and_unconfirmed_publish_fails_exactly_once_on_each_kind_of_ending() {
    type Ending = fn(&mut Pair);
    let endings: [(&str, Ending); 6] = [
        ("eof", |p| p.core.handle_stream_end(None)),
        ("reset", |p| {
            p.core
                .handle_stream_end(Some(std::io::ErrorKind::ConnectionReset.into()))
        }),
        ("broker close", |p| {
            p.feed(
                0,
                connection::Close {
                    reply_code: 320,
                    reply_text: "x".into(),
                    ..Default::default()
                },
            )
        }),
        ("protocol fault", |p| {
            p.feed_bytes(&[9, 0, 0, 0, 0, 0, 0, 0xCE]);
        }),
        ("heartbeat timeout", |p| {
            let t = p.now + Duration::from_secs(121);
            p.core.handle_timeout(t);
        }),
        ("tls failure", |p| {
            p.core.fail(Error::Tls {
                reason: "bad record".into(),
            })
        }),
    ];
    for (name, end) in endings {
        let mut p = Pair::open();
        let a = p.channel();
        let b = p.channel();
        p.core.confirm_select(a).unwrap();
        p.feed(a.number, confirm::SelectOk {});
        for _ in 0..3 {
            p.core
                .publish(a, "", "q", false, &BasicProperties::default(), b"m")
                .unwrap();
        }
        let mut requests = vec![
            p.core.rpc(a, declare("x")).unwrap(),
            p.core.rpc(a, declare("y")).unwrap(),
            p.core.get(b, basic::Get::default()).unwrap(),
            p.core.update_secret("token", "rotate").unwrap(),
        ];
        let (c, open) = p.core.open_channel(None).unwrap();
        requests.push(open);
        p.events();
        end(&mut p);
        let events = p.events();
        let mut replied: Vec<RequestId> = Vec::new();
        let mut failed = Vec::new();
        let mut closed = Vec::new();
        for e in &events {
            match e {
                Event::Reply {
                    request,
                    result: Err(_),
                    ..
                } => replied.push(*request),
                Event::Confirm {
                    confirmation: Confirmation::Failed { settled, .. },
                    channel,
                } => {
                    assert_eq!(*channel, a);
                    failed.extend_from_slice(settled)
                }
                Event::ChannelClosed { channel, .. } => closed.push(*channel),
                Event::Closed { .. } => {}
                other => panic!("{name}: {other:?}"),
            }
        }
        replied.sort();
        requests.sort();
        assert_eq!(replied, requests, "{name}: each request failed once");
        assert_eq!(failed, [1, 2, 3], "{name}");
        assert_eq!(closed, [a, b, c], "{name}");
        assert!(
            matches!(events.last(), Some(Event::Closed { opened: true, .. })),
            "{name}"
        );
        assert_eq!(p.core.poll_timeout(), None, "{name}");
        assert!(p.events().is_empty());
    }
}

#[test]
fn update_secret_is_answered_in_order() {
    let mut p = Pair::open();
    let r1 = p.core.update_secret("a", "r").unwrap();
    let r2 = p.core.update_secret("b", "r").unwrap();
    assert_eq!(
        names(&p.sent()),
        ["Connection.UpdateSecret", "Connection.UpdateSecret"]
    );
    p.feed(0, connection::UpdateSecretOk {});
    p.feed(0, connection::UpdateSecretOk {});
    let ids: Vec<RequestId> = p
        .events()
        .into_iter()
        .map(|e| match e {
            Event::Reply {
                request,
                channel: None,
                result: Ok(_),
                ..
            } => request,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, [r1, r2]);
}

#[test]
fn a_blocked_timeout_or_close_bound_beyond_the_clocks_range_is_no_deadline() {
    let mut params = ConnectionParameters::default();
    params
        .set_blocked_connection_timeout(Some(Duration::MAX))
        .unwrap()
        .set_socket_timeout(Duration::MAX)
        .unwrap();
    params.set_heartbeat(Heartbeat::Disabled);
    let mut p = Pair::open_with(params, rabbit_tune());
    p.feed(0, connection::Blocked { reason: "x".into() });
    assert!(matches!(p.events().as_slice(), [Event::Blocked(_)]));
    assert_eq!(p.core.poll_timeout(), None);
    p.core.close(200, "bye", p.now).unwrap();
    assert_eq!(p.core.poll_timeout(), None);
}

#[test]
fn blocked_counts_towards_its_timeout_and_unblocked_stops_it() {
    let mut params = ConnectionParameters::default();
    params
        .set_blocked_connection_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    params.set_heartbeat(Heartbeat::Disabled);
    let mut p = Pair::open_with(params.clone(), rabbit_tune());
    p.feed(
        0,
        connection::Blocked {
            reason: "low on memory".into(),
        },
    );
    assert_eq!(p.core.blocked_reason(), Some("low on memory"));
    assert!(matches!(p.events().as_slice(), [Event::Blocked(b)] if b.reason == "low on memory"));
    assert_eq!(p.core.poll_timeout(), Some(p.now + Duration::from_secs(30)));
    p.feed(0, connection::Unblocked {});
    assert!(matches!(p.events().as_slice(), [Event::Unblocked(_)]));
    assert_eq!(p.core.poll_timeout(), None);

    let mut p = Pair::open_with(params, rabbit_tune());
    p.feed(0, connection::Blocked { reason: "x".into() });
    p.events();
    p.now += Duration::from_secs(30);
    p.core.handle_timeout(p.now);
    assert!(matches!(
        closed_with(&p.events()),
        Error::ConnectionBlockedTimeout { .. }
    ));
    assert!(p.sent().is_empty(), "no Close handshake");
}

#[test]
fn watched_methods_are_seen_before_their_handling() {
    let mut p = Pair::open();
    let key = p.channel();
    p.core
        .watch_methods(key, vec![<queue::DeclareOk as crate::spec::MethodDef>::ID]);
    let request = p.core.rpc(key, declare("q")).unwrap();
    p.feed(key.number, declare_ok("q"));
    assert!(matches!(
        p.events().as_slice(),
        [Event::Watched { method: Method::QueueDeclareOk(_), .. }, Event::Reply { request: r, .. }] if *r == request
    ));
}

#[test]
fn the_core_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Connection>();
    assert_send::<Event>();
}

#[test]
fn a_publish_behind_an_unsent_confirm_select_waits_its_turn() {
    let mut p = Pair::open();
    let key = p.channel();
    p.core.rpc(key, declare("q")).unwrap();
    p.core.confirm_select(key).unwrap();
    let tag = p
        .core
        .publish(key, "", "q", false, &BasicProperties::default(), b"m")
        .unwrap();
    assert_eq!(tag, Some(1));
    assert_eq!(names(&p.sent()), ["Queue.Declare"]);
    p.feed(key.number, declare_ok("q"));
    assert_eq!(
        names(&p.sent()),
        ["Confirm.Select", "Basic.Publish", "header", "body"]
    );
}

#[test]
fn a_cancel_pending_when_the_broker_cancels_the_consumer_ends_with_consumer_cancelled() {
    let mut p = Pair::open();
    let key = p.channel();
    let id = consumer(&mut p, key, "c", false);
    let request = p.core.cancel(key, "c").unwrap();
    assert_eq!(names(&p.sent()), ["Basic.Cancel"]);
    p.feed(
        key.number,
        basic::Cancel {
            consumer_tag: "c".into(),
            nowait: true,
        },
    );
    let events = p.events();
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::ConsumerEnded { consumer, by_broker: Some(_), .. },
                Event::Reply { request: r, result: Err(Error::ConsumerCancelled { tag }), .. }
            ] if *consumer == id && *r == request && tag == "c"
        ),
        "{events:?}"
    );
    // The CancelOk that RabbitMQ still sends ends nothing twice, and the
    // channel goes on.
    p.feed(
        key.number,
        basic::CancelOk {
            consumer_tag: "c".into(),
        },
    );
    assert!(p.events().is_empty());
    let next = p.core.rpc(key, declare("q")).unwrap();
    p.feed(key.number, declare_ok("q"));
    assert!(
        matches!(p.events().as_slice(), [Event::Reply { request, result: Ok(_), .. }] if *request == next)
    );
}

#[test]
fn deliveries_awaiting_an_ack_are_counted_until_acked_nacked_or_rejected() {
    let mut p = Pair::open();
    let key = p.channel();
    consumer(&mut p, key, "manual", false);
    consumer(&mut p, key, "auto", true);
    for tag in 1..=6 {
        let who = if tag == 3 { "auto" } else { "manual" };
        p.feed_message(key.number, deliver(who, tag), b"m");
    }
    p.events();
    // Auto-acked deliveries are never outstanding.
    assert_eq!(p.core.unsettled_deliveries(key), 5);
    p.core.ack(key, 2, true, None).unwrap();
    assert_eq!(p.core.unsettled_deliveries(key), 3);
    p.core.reject(key, 5, true, None).unwrap();
    p.core.nack(key, 4, false, false, None).unwrap();
    assert_eq!(p.core.unsettled_deliveries(key), 1);
    // A get with manual ack counts too; multiple with tag 0 settles all.
    p.core.get(key, basic::Get::default()).unwrap();
    p.feed_message(
        key.number,
        basic::GetOk {
            delivery_tag: 7,
            ..Default::default()
        },
        b"g",
    );
    p.events();
    assert_eq!(p.core.total_unsettled_deliveries(), 2);
    p.core.ack(key, 0, true, None).unwrap();
    assert_eq!(p.core.unsettled_deliveries(key), 0);
}

#[test]
fn partial_writes_of_a_large_buffer_send_every_byte_once_in_order() {
    let mut p = Pair::open();
    let key = p.channel();
    let props = BasicProperties::default();
    let mut expected = Vec::new();
    let mut written = Vec::new();
    // Interleave queuing and partial writes of odd sizes, so that the
    // buffer is compacted with unsent bytes behind and new ones appended.
    let mut step = 1usize;
    for round in 0..40u32 {
        for i in 0..200u32 {
            let body = (round * 1000 + i).to_be_bytes();
            let before = p.core.outbound().len();
            p.core.publish(key, "", "q", false, &props, &body).unwrap();
            expected.extend_from_slice(&p.core.outbound()[before..]);
        }
        for _ in 0..3 {
            step = (step * 7919 + 13) % 40_000 + 1;
            let n = step.min(p.core.outbound().len());
            written.extend_from_slice(&p.core.outbound()[..n]);
            p.core.advance_outbound(n, p.now);
        }
    }
    while p.core.wants_write() {
        let n = p.core.outbound().len().min(12_345);
        written.extend_from_slice(&p.core.outbound()[..n]);
        p.core.advance_outbound(n, p.now);
    }
    assert_eq!(written.len(), expected.len());
    assert!(
        written == expected,
        "the bytes written differ from those queued"
    );
    assert!(p.core.outbound().is_empty());
}

#[test]
fn in_confirm_mode_a_return_names_the_oldest_unreturned_mandatory_publish_to_its_key() {
    let mut p = Pair::open();
    let key = p.channel();
    p.core.confirm_select(key).unwrap();
    p.feed(key.number, confirm::SelectOk {});
    p.events();
    let props = BasicProperties::default();
    let publish = |p: &mut Pair, rk: &str, mandatory: bool| {
        p.core
            .publish(key, "", rk, mandatory, &props, b"m")
            .unwrap()
            .unwrap()
    };
    let a = publish(&mut p, "nowhere", true);
    let _routable = publish(&mut p, "q", true);
    let _not_mandatory = publish(&mut p, "nowhere", false);
    let b = publish(&mut p, "nowhere", true);
    let returned = |rk: &str| basic::Return {
        reply_code: 312,
        reply_text: "NO_ROUTE".into(),
        exchange: String::new(),
        routing_key: rk.into(),
    };
    let returned_tags = |p: &mut Pair| -> Vec<Option<u64>> {
        p.feed_message(key.number, returned("nowhere"), b"m");
        p.events()
            .into_iter()
            .map(|e| match e {
                Event::Returned { delivery_tag, .. } => delivery_tag,
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(returned_tags(&mut p), [Some(a)]);
    assert_eq!(returned_tags(&mut p), [Some(b)]);
    // Every mandatory publish to that key has its return: a third matches
    // none.
    assert_eq!(returned_tags(&mut p), [None]);
    // Confirmed publishes are forgotten: nothing is kept for them.
    p.feed(
        key.number,
        basic::Ack {
            delivery_tag: b,
            multiple: true,
        },
    );
    p.events();
    let slot = p.core.slot(key).unwrap();
    assert!(slot.confirms.as_ref().unwrap().mandatory.is_empty());
}
