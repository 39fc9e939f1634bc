//! Descriptor handlers: readiness on Unix socket pairs and TCP loopback, level-triggered
//! delivery, and handler changes during dispatch.

mod common;

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::Duration;

use common::{log, watchdog};
use ioloop::{HandlerId, Interest, IoLoop, Readiness};

fn pair() -> (Rc<UnixStream>, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (Rc::new(a), b)
}

fn stop_after(lp: &IoLoop, delay: Duration) {
    let h = lp.clone();
    lp.call_later(delay, move || h.stop());
}

#[test]
fn unix_pair_handler_is_called_readable_when_data_arrives() {
    let lp = IoLoop::new().unwrap();
    let (a, mut b) = pair();
    let got = log();
    let (h, sock, g) = (lp.clone(), a.clone(), got.clone());
    lp.add_handler(a.clone(), Interest::READABLE, move |r: Readiness| {
        assert!(r.is_readable() && !r.is_writable() && !r.is_hangup() && !r.is_error());
        let mut buf = [0u8; 16];
        let n = (&*sock).read(&mut buf).unwrap();
        g.borrow_mut().extend_from_slice(&buf[..n]);
        h.stop();
    })
    .unwrap();
    // Nothing is readable yet: the loop blocks in the poller until this write wakes it.
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        b.write_all(b"hello").unwrap();
        b // kept open until joined, so no hang-up is reported
    });
    watchdog(&lp);
    lp.start().unwrap();
    let _b = writer.join().unwrap();
    assert_eq!(&*got.borrow(), b"hello");
}

#[test]
fn unix_pair_handler_is_called_writable() {
    let lp = IoLoop::new().unwrap();
    let (a, _b) = pair();
    let seen = Rc::new(Cell::new(None));
    let (h, s) = (lp.clone(), seen.clone());
    let id = Rc::new(Cell::new(None::<HandlerId>));
    let id2 = id.clone();
    id.set(Some(
        lp.add_handler(a, Interest::WRITABLE, move |r| {
            s.set(Some(r));
            assert!(h.remove_handler(id2.get().unwrap()));
            h.stop();
        })
        .unwrap(),
    ));
    watchdog(&lp);
    lp.start().unwrap();
    let r = seen.get().expect("handler was not called");
    assert!(r.is_writable() && !r.is_readable() && !r.is_hangup() && !r.is_error());
}

#[test]
fn unix_pair_handler_sees_hangup_and_reads_eof_when_the_peer_closes() {
    let lp = IoLoop::new().unwrap();
    let (a, b) = pair();
    drop(b);
    let seen = log();
    let (h, sock, s) = (lp.clone(), a.clone(), seen.clone());
    let id = lp
        .add_handler(a.clone(), Interest::READABLE, move |r| {
            let mut buf = [0u8; 8];
            let n = (&*sock).read(&mut buf).unwrap();
            s.borrow_mut().push((r, n));
            h.stop();
        })
        .unwrap();
    watchdog(&lp);
    lp.start().unwrap();
    let (r, n) = seen.borrow()[0];
    assert!(r.is_hangup(), "{r:?}");
    assert!(
        r.is_readable(),
        "a hang-up is also reported readable: {r:?}"
    );
    assert_eq!(n, 0, "the read after a hang-up returns end of file");
    assert!(lp.remove_handler(id));
}

#[test]
fn a_writable_only_handler_is_also_told_readable_on_hangup() {
    let lp = IoLoop::new().unwrap();
    let (a, b) = pair();
    drop(b);
    let seen = Rc::new(Cell::new(None));
    let (h, s) = (lp.clone(), seen.clone());
    lp.add_handler(a, Interest::WRITABLE, move |r| {
        s.set(Some(r));
        h.stop();
    })
    .unwrap();
    watchdog(&lp);
    lp.start().unwrap();
    let r = seen.get().unwrap();
    assert!(r.is_hangup() && r.is_readable(), "{r:?}");
}

#[test]
fn undrained_socket_calls_the_handler_again_level_triggered() {
    let lp = IoLoop::new().unwrap();
    let (a, mut b) = pair();
    b.write_all(b"x").unwrap();
    let calls = Rc::new(Cell::new(0));
    let id = Rc::new(Cell::new(None::<HandlerId>));
    let (h, c, i) = (lp.clone(), calls.clone(), id.clone());
    id.set(Some(
        lp.add_handler(a.clone(), Interest::READABLE, move |r| {
            assert!(r.is_readable());
            // Deliberately not reading.
            c.set(c.get() + 1);
            if c.get() == 3 {
                h.remove_handler(i.get().unwrap());
                h.stop();
            }
        })
        .unwrap(),
    ));
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(calls.get(), 3);
    // The byte is still there.
    let mut buf = [0u8; 4];
    assert_eq!((&*a).read(&mut buf).unwrap(), 1);
}

#[test]
fn a_drained_socket_is_not_reported_again_until_new_data_arrives() {
    let lp = IoLoop::new().unwrap();
    let (a, mut b) = pair();
    b.write_all(b"abc").unwrap();
    let reads = log();
    let (sock, r) = (a.clone(), reads.clone());
    lp.add_handler(a.clone(), Interest::READABLE, move |_| {
        let mut buf = [0u8; 16];
        match (&*sock).read(&mut buf) {
            Ok(n) => r.borrow_mut().push(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => r.borrow_mut().push(usize::MAX),
            Err(e) => panic!("{e}"),
        }
    })
    .unwrap();
    // Several passes go by (each timer wakes the poller) with nothing to read.
    for i in 1..5 {
        lp.call_later(Duration::from_millis(5 * i), || {});
    }
    stop_after(&lp, Duration::from_millis(30));
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*reads.borrow(), vec![3]);

    b.write_all(b"de").unwrap();
    stop_after(&lp, Duration::from_millis(10));
    lp.start().unwrap();
    assert_eq!(*reads.borrow(), vec![3, 2]);
    lp.close();
}

/// Two sockets readable before the loop starts, so both events arrive in one batch.
fn two_ready_pairs() -> [(Rc<UnixStream>, UnixStream); 2] {
    let mut pairs = [pair(), pair()];
    for (_, b) in &mut pairs {
        b.write_all(b"!").unwrap();
    }
    pairs
}

#[test]
fn a_handler_removed_by_another_in_the_same_batch_is_not_called() {
    let lp = IoLoop::new().unwrap();
    let [(a1, _b1), (a2, _b2)] = two_ready_pairs();
    let calls = log();
    let ids: Rc<RefCell<Vec<HandlerId>>> = Rc::new(RefCell::new(Vec::new()));
    for (n, a) in [(0usize, a1), (1, a2)] {
        let (h, c, ids2) = (lp.clone(), calls.clone(), ids.clone());
        let id = lp
            .add_handler(a, Interest::READABLE, move |_| {
                c.borrow_mut().push(n);
                let ids = ids2.borrow().clone();
                // Whichever runs first removes the other, whose event is in this batch.
                assert!(h.remove_handler(ids[1 - n]));
                assert!(h.remove_handler(ids[n]));
                h.stop();
            })
            .unwrap();
        ids.borrow_mut().push(id);
    }
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(calls.borrow().len(), 1, "calls: {:?}", calls.borrow());
}

#[test]
fn a_slot_reused_during_the_batch_does_not_get_the_removed_handlers_event() {
    let lp = IoLoop::new().unwrap();
    let [(a1, _b1), (a2, _b2)] = two_ready_pairs();
    let (a3, _b3) = pair(); // never readable
    let calls = log();
    let ids: Rc<RefCell<Vec<HandlerId>>> = Rc::new(RefCell::new(Vec::new()));
    let a3 = Rc::new(RefCell::new(Some(a3)));
    for (n, a) in [(0usize, a1), (1, a2)] {
        let (h, c, ids2, a3) = (lp.clone(), calls.clone(), ids.clone(), a3.clone());
        let id = lp
            .add_handler(a, Interest::READABLE, move |_| {
                c.borrow_mut().push(format!("handler {n}"));
                let ids = ids2.borrow().clone();
                assert!(h.remove_handler(ids[1 - n]));
                // The new handler takes the freed slot (same poller key) while the removed
                // handler's event is still in this batch.
                let c2 = c.clone();
                let new = h
                    .add_handler(
                        a3.borrow_mut().take().unwrap(),
                        Interest::READABLE,
                        move |_| c2.borrow_mut().push("new handler".to_string()),
                    )
                    .unwrap();
                assert_ne!(new, ids[1 - n]);
                assert!(h.remove_handler(ids[n]));
                let h2 = h.clone();
                h.call_later(Duration::from_millis(20), move || h2.stop());
            })
            .unwrap();
        ids.borrow_mut().push(id);
    }
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(calls.borrow().len(), 1, "calls: {:?}", calls.borrow());
    lp.close();
}

#[test]
fn update_handler_to_none_during_a_batch_suppresses_the_pending_event() {
    let lp = IoLoop::new().unwrap();
    let [(a1, _b1), (a2, _b2)] = two_ready_pairs();
    let calls = log();
    let ids: Rc<RefCell<Vec<HandlerId>>> = Rc::new(RefCell::new(Vec::new()));
    for (n, a) in [(0usize, a1), (1, a2)] {
        let (h, c, ids2, sock) = (lp.clone(), calls.clone(), ids.clone(), a.clone());
        let id = lp
            .add_handler(a, Interest::READABLE, move |_| {
                c.borrow_mut().push(n);
                let mut buf = [0u8; 4];
                let _ = (&*sock).read(&mut buf);
                let ids = ids2.borrow().clone();
                if c.borrow().len() == 1 {
                    // First call: silence the other handler, whose event is in this batch.
                    h.update_handler(ids[1 - n], Interest::NONE).unwrap();
                    let (h2, other) = (h.clone(), ids[1 - n]);
                    h.call_later(Duration::from_millis(20), move || {
                        h2.update_handler(other, Interest::READABLE).unwrap()
                    });
                } else {
                    h.stop();
                }
            })
            .unwrap();
        ids.borrow_mut().push(id);
    }
    watchdog(&lp);
    lp.start().unwrap();
    let calls = calls.borrow();
    assert_eq!(calls.len(), 2, "calls: {calls:?}");
    assert_ne!(
        calls[0], calls[1],
        "re-enabled handler was called once: {calls:?}"
    );
}

#[test]
fn interest_none_is_never_called_even_after_a_hangup_until_reenabled() {
    let lp = IoLoop::new().unwrap();
    let (a, b) = pair();
    drop(b);
    let seen = log();
    let s = seen.clone();
    let id = lp
        .add_handler(a, Interest::NONE, move |r| s.borrow_mut().push(r))
        .unwrap();
    stop_after(&lp, Duration::from_millis(30));
    watchdog(&lp);
    lp.start().unwrap();
    assert!(seen.borrow().is_empty());

    lp.update_handler(id, Interest::READABLE).unwrap();
    let h = lp.clone();
    lp.call_soon(move || h.stop());
    lp.start().unwrap();
    assert_eq!(seen.borrow().len(), 1);
    assert!(seen.borrow()[0].is_hangup());
    lp.close();
}

#[test]
fn update_handler_switches_from_writable_to_readable() {
    let lp = IoLoop::new().unwrap();
    let (a, mut b) = pair();
    let seen = log();
    let id = Rc::new(Cell::new(None::<HandlerId>));
    let (h, s, i) = (lp.clone(), seen.clone(), id.clone());
    id.set(Some(
        lp.add_handler(a.clone(), Interest::WRITABLE, move |r| {
            s.borrow_mut().push((r.is_readable(), r.is_writable()));
            if r.is_writable() {
                h.update_handler(i.get().unwrap(), Interest::READABLE)
                    .unwrap();
            } else {
                h.stop();
            }
        })
        .unwrap(),
    ));
    b.write_all(b"x").unwrap();
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*seen.borrow(), vec![(false, true), (true, false)]);
    lp.close();
}

#[test]
fn a_handler_can_remove_itself_and_its_source_is_then_dropped() {
    let lp = IoLoop::new().unwrap();
    let (a, mut b) = pair();
    b.write_all(b"x").unwrap();
    let id = Rc::new(Cell::new(None::<HandlerId>));
    let results = log();
    let (h, i, r) = (lp.clone(), id.clone(), results.clone());
    id.set(Some(
        lp.add_handler(a.clone(), Interest::READABLE, move |_| {
            r.borrow_mut().push(h.remove_handler(i.get().unwrap()));
            r.borrow_mut().push(h.remove_handler(i.get().unwrap()));
            h.stop();
        })
        .unwrap(),
    ));
    assert_eq!(Rc::strong_count(&a), 2);
    watchdog(&lp);
    lp.start().unwrap();
    assert_eq!(*results.borrow(), vec![true, false]);
    assert_eq!(Rc::strong_count(&a), 1, "the loop let go of the source");
}

#[test]
fn removing_or_updating_an_unknown_handler_is_harmless() {
    let lp = IoLoop::new().unwrap();
    let (a, _b) = pair();
    let id = lp.add_handler(a, Interest::READABLE, |_| {}).unwrap();
    assert!(lp.remove_handler(id));
    assert!(!lp.remove_handler(id));
    let err = lp.update_handler(id, Interest::WRITABLE).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    // A new handler reusing the slot is not reachable through the old id.
    let (c, _d) = pair();
    let new = lp.add_handler(c, Interest::READABLE, |_| {}).unwrap();
    assert!(!lp.remove_handler(id));
    assert!(lp.remove_handler(new));
}

#[test]
fn registering_the_same_descriptor_twice_fails_and_drops_the_source() {
    let lp = IoLoop::new().unwrap();
    let (a, _b) = pair();
    let first = lp
        .add_handler(a.clone(), Interest::READABLE, |_| {})
        .unwrap();
    let err = lp
        .add_handler(a.clone(), Interest::READABLE, |_| {})
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
    assert_eq!(
        Rc::strong_count(&a),
        2,
        "the failed registration dropped its source"
    );
    assert!(lp.remove_handler(first));
    assert_eq!(Rc::strong_count(&a), 1);
}

/// epoll refuses regular files (EPERM). poll(2) accepts them and reports them always ready,
/// which is what the loop then does too: the difference is the OS poller's, not the loop's.
#[test]
fn registering_a_regular_file_fails_with_epoll_and_is_always_ready_with_poll() {
    let lp = IoLoop::new().unwrap();
    let path = std::env::temp_dir().join(format!("ioloop-regular-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let called = Rc::new(Cell::new(false));
    let (h, c) = (lp.clone(), called.clone());
    let result = lp.add_handler(file, Interest::READABLE, move |r| {
        assert!(r.is_readable());
        c.set(true);
        h.stop();
    });
    if cfg!(polling_test_poll_backend) {
        result.unwrap();
        watchdog(&lp);
        lp.start().unwrap();
        assert!(called.get());
    } else {
        let err = result.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}

#[test]
fn tcp_loopback_accept_read_write_and_eof() {
    let lp = IoLoop::new().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = Rc::new(listener);
    let events = log();

    // Server: accept one connection, echo "ping" back as "pong", stop at end of file.
    let (h, l, ev) = (lp.clone(), listener.clone(), events.clone());
    let listener_id = Rc::new(Cell::new(None::<HandlerId>));
    let lid = listener_id.clone();
    listener_id.set(Some(
        lp.add_handler(listener.clone(), Interest::READABLE, move |r| {
            assert!(r.is_readable());
            let (conn, _) = l.accept().unwrap();
            conn.set_nonblocking(true).unwrap();
            ev.borrow_mut().push("accepted".to_string());
            h.remove_handler(lid.get().unwrap());
            let conn = Rc::new(conn);
            let (h2, c, ev2) = (h.clone(), conn.clone(), ev.clone());
            let conn_id = Rc::new(Cell::new(None::<HandlerId>));
            let cid = conn_id.clone();
            conn_id.set(Some(
                h.add_handler(conn, Interest::READABLE, move |r| {
                    assert!(r.is_readable());
                    let mut buf = [0u8; 64];
                    match (&*c).read(&mut buf) {
                        Ok(0) => {
                            ev2.borrow_mut().push("server eof".to_string());
                            h2.remove_handler(cid.get().unwrap());
                            h2.stop();
                        }
                        Ok(n) => {
                            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                            ev2.borrow_mut().push(format!("server got {msg}"));
                            (&*c).write_all(b"pong").unwrap();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("{e}"),
                    }
                })
                .unwrap(),
            ));
        })
        .unwrap(),
    ));

    // Client: connect, wait for writable, send "ping", read "pong", then close.
    let client = TcpStream::connect(addr).unwrap();
    client.set_nonblocking(true).unwrap();
    let client = Rc::new(RefCell::new(Some(client)));
    let client_fd = Rc::new(client.borrow().as_ref().unwrap().try_clone().unwrap());
    let (h, c, ev) = (lp.clone(), client.clone(), events.clone());
    let client_id = Rc::new(Cell::new(None::<HandlerId>));
    let cid = client_id.clone();
    client_id.set(Some(
        lp.add_handler(client_fd, Interest::WRITABLE, move |r| {
            let id = cid.get().unwrap();
            if r.is_writable() {
                c.borrow().as_ref().unwrap().write_all(b"ping").unwrap();
                ev.borrow_mut().push("client sent ping".to_string());
                h.update_handler(id, Interest::READABLE).unwrap();
            } else if r.is_readable() {
                let mut buf = [0u8; 64];
                let n = c.borrow().as_ref().unwrap().read(&mut buf).unwrap();
                ev.borrow_mut()
                    .push(format!("client got {}", String::from_utf8_lossy(&buf[..n])));
                h.remove_handler(id);
                // Closing both descriptors of the client socket ends the connection.
                c.borrow_mut().take();
            }
        })
        .unwrap(),
    ));

    watchdog(&lp);
    lp.start().unwrap();
    let mut events = events.borrow().clone();
    // The listener and the client are ready in the same first pass, in an order that is the
    // poller's (poll(2)'s backend reports in hash order): sort those two.
    events[..2].sort();
    assert_eq!(
        events,
        vec![
            "accepted",
            "client sent ping",
            "server got ping",
            "client got pong",
            "server eof"
        ]
    );
    lp.close();
}

#[test]
fn tcp_connection_reset_is_reported_as_error_and_hangup() {
    let lp = IoLoop::new().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    // SO_LINGER with a zero timeout makes close() send a RST.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized `linger` value.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    drop(client);

    let server = Rc::new(server);
    let seen = log();
    let (h, s, sock) = (lp.clone(), seen.clone(), server.clone());
    lp.add_handler(server.clone(), Interest::READABLE, move |r| {
        let mut buf = [0u8; 8];
        let read = (&*sock).read(&mut buf).map_err(|e| e.kind());
        s.borrow_mut().push((r, read));
        h.stop();
    })
    .unwrap();
    watchdog(&lp);
    lp.start().unwrap();
    let (r, read) = seen.borrow()[0];
    assert!(r.is_error(), "{r:?}");
    assert!(r.is_hangup() && r.is_readable(), "{r:?}");
    assert_eq!(read, Err(io::ErrorKind::ConnectionReset));
    lp.close();
}
