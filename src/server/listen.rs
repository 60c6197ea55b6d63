//! Listening sockets: one per worker on the same address (SO_REUSEPORT).
//!
//! Platform facts:
//! - With SO_REUSEPORT, a second process of the same user can bind the same
//!   port and silently take a share of the connections. Before binding the
//!   shared sockets we bind once WITHOUT it: that fails if anyone (reuseport
//!   or not) is listening there, so a port held by another process is an
//!   error at start rather than a silent split.
//! - SO_REUSEADDR lets a restart bind while old connections sit in TIME_WAIT.
//! - Port 0: the first socket picks the port, the others bind to that one.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

use super::ServerError;

/// Pending connections the kernel queues per worker before refusing more.
const BACKLOG: i32 = 4096;

fn socket_for(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    Ok(s)
}

fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket_for(addr)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Binds `count` listeners on `addr`; returns them and the bound address.
pub fn bind_listeners(addr: SocketAddr, count: usize) -> Result<(Vec<TcpListener>, SocketAddr), ServerError> {
    let bind_err = |error| ServerError::Bind { addr, error };
    if addr.port() != 0 {
        // Exclusive probe: fails with EADDRINUSE if the port has a listener.
        let probe = socket_for(addr).map_err(bind_err)?;
        probe.bind(&addr.into()).map_err(bind_err)?;
        drop(probe);
    }
    let first = listener(addr).map_err(bind_err)?;
    let bound = first.local_addr().map_err(bind_err)?;
    let mut all = vec![first];
    for _ in 1..count {
        all.push(listener(bound).map_err(|error| ServerError::Bind { addr: bound, error })?);
    }
    Ok((all, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_shares_one_port() {
        let (ls, addr) = bind_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(ls.len(), 3);
        assert_ne!(addr.port(), 0);
        for l in &ls {
            assert_eq!(l.local_addr().unwrap(), addr);
        }
    }

    #[test]
    fn port_held_by_another_listener_is_an_error() {
        // A plain listener, as another program would hold it.
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind_listeners(other.local_addr().unwrap(), 1).unwrap_err();
        assert!(err.to_string().contains("in use by another process"), "{err}");
        // And a reuseport group of a second sluice on the same port.
        let (_ours, addr) = bind_listeners("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        assert!(bind_listeners(addr, 2).is_err());
    }
}
