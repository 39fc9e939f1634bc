//! Sockets: name resolution, a non-blocking TCP connect with the
//! connection's socket options, and the result of that connect.
//!
//! Name resolution runs on the caller's thread (`getaddrinfo` through std):
//! IP literals skip the resolver.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::error::Error;
use crate::parameters::{ConnectionParameters, TcpOptions};

#[cfg(target_os = "linux")]
const EINPROGRESS: i32 = 115;
#[cfg(not(target_os = "linux"))]
const EINPROGRESS: i32 = 36;

/// The addresses `host` resolves to, in the resolver's order (IPv4 and
/// IPv6), with `port`.
///
/// # Errors
/// [`Error::Resolve`] when the name does not resolve, or to nothing.
pub fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    match (host, port).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            if addrs.is_empty() {
                Err(Error::Resolve {
                    host: host.to_string(),
                    reason: "no addresses".into(),
                })
            } else {
                Ok(addrs)
            }
        }
        Err(e) => Err(Error::Resolve {
            host: host.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Starts a non-blocking TCP connect to `addr` (TCP_NODELAY, and the
/// parameters' TCP options); the socket becomes writable when the connect
/// is done, then [`connect_result`] says how it went.
///
/// # Errors
/// The socket calls' errors (a refused connect may also show here).
pub fn start_connect(addr: SocketAddr, params: &ConnectionParameters) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(opts) = params.tcp_options() {
        apply_tcp_options(&SockRef::from(&socket), opts)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e)
            if e.raw_os_error() == Some(EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from(socket))
}

/// How a connect started by [`start_connect`] ended, once its socket is
/// writable.
///
/// # Errors
/// Why the connect failed (refused, unreachable, …).
pub fn connect_result(stream: &TcpStream) -> io::Result<()> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => Err(e),
        Ok(None) => stream.peer_addr().map(|_| ()),
    }
}

/// Applies `SO_KEEPALIVE` (with `TCP_KEEPIDLE`; `TCP_KEEPINTVL` and
/// `TCP_KEEPCNT` on Linux, macOS and FreeBSD) and `TCP_USER_TIMEOUT` (on
/// Linux). A failing option fails the connect.
fn apply_tcp_options(socket: &SockRef<'_>, opts: &TcpOptions) -> io::Result<()> {
    if opts.keepalive {
        let mut ka = TcpKeepalive::new();
        if let Some(idle) = opts.keepalive_idle {
            ka = ka.with_time(idle);
        }
        #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
        {
            if let Some(interval) = opts.keepalive_interval {
                ka = ka.with_interval(interval);
            }
            if let Some(count) = opts.keepalive_count {
                ka = ka.with_retries(count);
            }
        }
        socket.set_tcp_keepalive(&ka)?;
    }
    #[cfg(target_os = "linux")]
    if let Some(t) = opts.user_timeout {
        socket.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_skip_the_resolver_and_bad_names_say_which() {
        assert_eq!(
            resolve("127.0.0.1", 5672).unwrap(),
            ["127.0.0.1:5672".parse().unwrap()]
        );
        assert_eq!(
            resolve("::1", 1).unwrap(),
            ["[::1]:1".parse::<SocketAddr>().unwrap()]
        );
        match resolve("no-such-host.invalid", 5672) {
            Err(Error::Resolve { host, .. }) => assert_eq!(host, "no-such-host.invalid"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refused_connect_is_reported_by_connect_result() {
        // A port nothing listens on: bind one, learn it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let stream = match start_connect(addr, &ConnectionParameters::default()) {
            Ok(s) => s,
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
                return;
            }
        };
        // Wait for the connect to finish (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match connect_result(&stream) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                other => panic!("{other:?}"),
            }
            assert!(std::time::Instant::now() < deadline, "no connect result");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
