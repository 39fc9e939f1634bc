//! TLS for a transport: a rustls client session fed and drained through
//! `io::Read` / `io::Write` values — a socket here, byte buffers for a
//! face that does its own I/O — so that every face can use it.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use rustls::{ClientConnection, InvalidMessage};

use crate::error::Error;
use crate::tls::SslOptions;

/// A TLS failure carried inside an `io::Error` through the transport: the
/// rustls error, the peer (when known), and whether the handshake was
/// still running.
#[derive(Debug)]
struct TlsFailure {
    error: rustls::Error,
    peer: Option<SocketAddr>,
    handshaking: bool,
}

impl TlsFailure {
    /// Whether the peer answered the handshake with bytes that are not TLS
    /// records at all (an AMQP protocol header, an HTTP response): rustls
    /// refused the record header itself.
    fn peer_does_not_speak_tls(&self) -> bool {
        self.handshaking
            && matches!(
                self.error,
                rustls::Error::InvalidMessage(
                    InvalidMessage::InvalidContentType
                        | InvalidMessage::UnknownProtocolVersion
                        | InvalidMessage::InvalidEmptyPayload
                        | InvalidMessage::MessageTooLarge
                )
            )
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.peer_does_not_speak_tls() {
            match self.peer {
                Some(peer) => write!(f, "the peer at {peer}")?,
                None => f.write_str("the peer")?,
            }
            write!(
                f,
                " did not answer with TLS (is this a TLS port?): {}",
                self.error
            )
        } else {
            fmt::Display::fmt(&self.error, f)
        }
    }
}

impl std::error::Error for TlsFailure {}

/// The TLS error inside an I/O error from a transport, if it is one (a
/// refused certificate, an alert from the peer, a peer that does not speak
/// TLS). A peer that answers the handshake with something other than TLS
/// records is reported as "the peer at ADDRESS did not answer with TLS (is
/// this a TLS port?): " followed by what rustls said.
pub fn tls_failure(e: &io::Error) -> Option<Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsFailure>())
        .map(|t| Error::Tls {
            reason: t.to_string(),
        })
}

/// A client TLS session: plaintext in and out on one side, TLS records in
/// and out on the other.
pub struct TlsSession {
    conn: ClientConnection,
    peer: Option<SocketAddr>,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .finish()
    }
}

impl TlsSession {
    /// A session for a connection to `host` with `options`.
    ///
    /// # Errors
    /// [`Error::Tls`] for a server name rustls refuses.
    pub fn new(options: &SslOptions, host: &str) -> Result<TlsSession, Error> {
        Ok(TlsSession {
            conn: options.session(host)?,
            peer: None,
        })
    }

    /// Names the address connected to, for TLS failures to name it.
    pub fn with_peer(mut self, peer: SocketAddr) -> TlsSession {
        self.peer = Some(peer);
        self
    }

    /// Queues plaintext to be sent (all of it: rustls buffers what the
    /// handshake holds back).
    ///
    /// # Errors
    /// What rustls reports for a session that can no longer send.
    pub fn write_plaintext(&mut self, data: &[u8]) -> io::Result<usize> {
        self.conn.writer().write(data)
    }

    /// Takes received plaintext: `Ok(0)` when the peer closed the session
    /// (close_notify, or a TCP end without one); `WouldBlock` when there is
    /// none yet.
    ///
    /// # Errors
    /// `WouldBlock`, or what rustls reports.
    pub fn read_plaintext(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.conn.reader().read(buf) {
            // The peer closed without close_notify: the end, as a TCP end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            other => other,
        }
    }

    /// Reads TLS records from `source` and decrypts them; `Ok(0)` at the
    /// end of `source`.
    ///
    /// # Errors
    /// The source's error, or a TLS failure (see [`tls_failure`]) after
    /// which the session is dead; the alert saying why is queued for the
    /// peer.
    pub fn receive_records(&mut self, source: &mut dyn Read) -> io::Result<usize> {
        let n = self.conn.read_tls(source)?;
        if n > 0 {
            let handshaking = self.conn.is_handshaking();
            if let Err(error) = self.conn.process_new_packets() {
                let failure = TlsFailure {
                    error,
                    peer: self.peer,
                    handshaking,
                };
                return Err(io::Error::new(io::ErrorKind::InvalidData, failure));
            }
        }
        Ok(n)
    }

    /// Whether TLS records wait to be sent.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Writes waiting TLS records to `sink`.
    ///
    /// # Errors
    /// The sink's error.
    pub fn send_records(&mut self, sink: &mut dyn Write) -> io::Result<usize> {
        self.conn.write_tls(sink)
    }

    /// Queues close_notify.
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::thread;
    use std::time::Duration;

    use super::*;

    /// A plain AMQP listener on 127.0.0.1: it reads what the client sends
    /// first (a ClientHello, here) and answers, as a broker's plain port
    /// does, with AMQP's protocol header, then waits for the client to go.
    fn plain_amqp_listener() -> (SocketAddr, thread::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("the listener's address");
        let server = thread::spawn(move || {
            let (mut sock, _) = listener.accept().expect("a client");
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("a read timeout");
            let mut first = vec![0; 4096];
            let n = sock.read(&mut first).expect("the client's first bytes");
            first.truncate(n);
            sock.write_all(b"AMQP\x00\x00\x09\x01")
                .expect("the header is sent");
            // Keep the socket open until the client is done, so that it
            // reads the header rather than a reset.
            let mut rest = [0; 1024];
            while matches!(sock.read(&mut rest), Ok(n) if n > 0) {}
            first
        });
        (addr, server)
    }

    #[test]
    fn a_plain_amqp_port_answering_the_client_hello_is_named_as_not_tls() {
        let (addr, server) = plain_amqp_listener();
        let mut tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a read timeout");
        let mut session = TlsSession::new(&SslOptions::with_webpki_roots(), "localhost")
            .expect("a session")
            .with_peer(addr);
        while session.wants_write() {
            session
                .send_records(&mut tcp)
                .expect("the ClientHello is sent");
        }
        let error = loop {
            match session.receive_records(&mut tcp) {
                Ok(0) => panic!("the stream ended without a TLS failure"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        let _ = tcp.shutdown(Shutdown::Both);
        let hello = server.join().expect("the listener thread");
        assert_eq!(hello.first(), Some(&0x16), "a TLS handshake record");
        match tls_failure(&error) {
            Some(Error::Tls { reason }) => assert_eq!(
                reason,
                format!(
                    "the peer at {addr} did not answer with TLS (is this a TLS port?): \
                     received corrupt message of type InvalidContentType"
                )
            ),
            other => panic!("expected a TLS failure, got {other:?} from {error:?}"),
        }
    }

    #[test]
    fn without_a_known_peer_the_wording_leaves_the_address_out() {
        let failure = TlsFailure {
            error: rustls::Error::InvalidMessage(InvalidMessage::UnknownProtocolVersion),
            peer: None,
            handshaking: true,
        };
        assert_eq!(
            failure.to_string(),
            "the peer did not answer with TLS (is this a TLS port?): received corrupt message \
             of type UnknownProtocolVersion"
        );
    }

    #[test]
    fn other_tls_failures_keep_the_rustls_text() {
        let after_handshake = TlsFailure {
            error: rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType),
            peer: Some(([127, 0, 0, 1], 5671).into()),
            handshaking: false,
        };
        assert_eq!(
            after_handshake.to_string(),
            "received corrupt message of type InvalidContentType"
        );
        let refused = TlsFailure {
            error: rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
            peer: Some(([127, 0, 0, 1], 5671).into()),
            handshaking: true,
        };
        assert_eq!(
            refused.to_string(),
            "received fatal alert: HandshakeFailure"
        );
    }
}
