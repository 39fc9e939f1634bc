//! TLS for a transport: a rustls client session fed and drained through
//! `io::Read` / `io::Write` values — a socket here, byte buffers for a
//! face that does its own I/O — so that every face can use it.

use std::fmt;
use std::io::{self, Read, Write};

use rustls::ClientConnection;

use crate::error::Error;
use crate::tls::SslOptions;

/// A TLS failure carried inside an `io::Error` through the transport.
#[derive(Debug)]
struct TlsFailure(rustls::Error);

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for TlsFailure {}

/// The TLS error inside an I/O error from a transport, if it is one (a
/// refused certificate, an alert from the peer, a peer that does not speak
/// TLS).
pub fn tls_failure(e: &io::Error) -> Option<Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsFailure>())
        .map(|t| Error::Tls {
            reason: t.0.to_string(),
        })
}

/// A client TLS session: plaintext in and out on one side, TLS records in
/// and out on the other.
pub struct TlsSession {
    conn: ClientConnection,
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
        })
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
            if let Err(e) = self.conn.process_new_packets() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, TlsFailure(e)));
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
