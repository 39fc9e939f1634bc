//! Transports: the byte stream under a connection — TCP, or TLS over TCP
//! — behind one small type ([`Stream`]: read into / write from / wants
//! write / shutdown), name resolution and socket options
//! ([`socket`]), the TLS session over bytes ([`tls`]), and the connect
//! workflow as a pure decision ([`workflow`]).
//!
//! The faces own the I/O readiness (an event loop, a poller); a stream
//! only moves bytes when asked and never blocks: its socket is
//! non-blocking, and `WouldBlock` comes back as such.

pub mod socket;
pub mod tls;
pub mod workflow;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

pub use tls::{TlsSession, tls_failure};

use crate::error::Error;
use crate::tls::SslOptions;

/// A connected, non-blocking byte stream: plaintext in and out, over TCP or
/// TLS.
#[derive(Debug)]
pub struct Stream {
    tcp: Arc<TcpStream>,
    tls: Option<TlsSession>,
    peer: SocketAddr,
}

impl Stream {
    /// A stream over a connected (or connecting) non-blocking socket, with
    /// TLS when `ssl` is given (the handshake runs as bytes move).
    ///
    /// # Errors
    /// [`Error::Tls`] when no session can be made for `host`.
    pub fn new(
        tcp: TcpStream,
        peer: SocketAddr,
        ssl: Option<&SslOptions>,
        host: &str,
    ) -> Result<Stream, Error> {
        let tls = ssl
            .map(|opts| TlsSession::new(opts, host).map(|t| t.with_peer(peer)))
            .transpose()?;
        Ok(Stream {
            tcp: Arc::new(tcp),
            tls,
            peer,
        })
    }

    /// The socket, to register with a poller.
    pub fn socket(&self) -> &Arc<TcpStream> {
        &self.tcp
    }

    /// The address connected to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.local_addr().ok()
    }

    /// Reads received plaintext into `buf`: `Ok(0)` is the end of the
    /// stream; `WouldBlock` when nothing is there yet. Over TLS, decrypted
    /// records rustls already holds are returned before the socket is read.
    ///
    /// # Errors
    /// The socket's error, `WouldBlock`, or a TLS failure
    /// ([`tls_failure`] names it).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return (&*self.tcp).read(buf);
        };
        loop {
            match tls.read_plaintext(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            let received = tls.receive_records(&mut &*self.tcp);
            // An alert saying why a TLS failure happened goes out first.
            if tls.wants_write() {
                let _ = tls.send_records(&mut &*self.tcp);
            }
            if received? == 0 {
                return Ok(0);
            }
        }
    }

    /// Sends as much of `data` as the socket takes now, returning how much
    /// of it is taken (over TLS: all of it, into the session; its records
    /// go out as the socket takes them).
    ///
    /// # Errors
    /// The socket's error (not `WouldBlock`: nothing taken is `Ok(0)`).
    pub fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self.tls.as_mut() {
            None => {
                let mut taken = 0;
                while taken < data.len() {
                    match (&*self.tcp).write(&data[taken..]) {
                        Ok(0) => {
                            return Err(io::Error::new(
                                io::ErrorKind::WriteZero,
                                "socket took 0 bytes",
                            ));
                        }
                        Ok(n) => taken += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                Ok(taken)
            }
            Some(tls) => {
                let taken = if data.is_empty() {
                    0
                } else {
                    tls.write_plaintext(data)?
                };
                self.send_records()?;
                Ok(taken)
            }
        }
    }

    /// Sends waiting TLS records as far as the socket takes them.
    ///
    /// # Errors
    /// The socket's error.
    pub fn send_records(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        while tls.wants_write() {
            match tls.send_records(&mut &*self.tcp) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "socket took 0 bytes",
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether TLS records wait for the socket.
    pub fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(TlsSession::wants_write)
    }

    /// Ends the stream: close_notify over TLS (best effort), then a TCP
    /// shutdown both ways.
    pub fn shutdown(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = tls.send_records(&mut &*self.tcp);
        }
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }
}
