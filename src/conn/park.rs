//! Where a core's quiet connections wait without a task.
//!
//! Most connections at the edge are quiet most of the time (notifications,
//! dashboards between updates). A task waiting for readiness costs its whole
//! future; a parked connection costs its socket, its session slot and one
//! registration in this per-core readiness set. When the peer sends bytes
//! (or hangs up) the set reports the session's key and the shard starts a
//! task for it again.
//!
//! Platform facts this relies on:
//! - An fd added to an epoll set with bytes already queued is reported at
//!   once, so nothing that arrived between the last read and the park is
//!   missed (epoll(7), and mio's edge-triggered registration).
//! - An epoll registration belongs to the (file, fd) pair and outlives the fd
//!   while a duplicate keeps the file open, so a session is always removed
//!   from the set before its fd is handed back to a task.
//! - monoio has no readiness wait for an arbitrary fd; the set's own fd is
//!   readable when it has events, so it is awaited through
//!   `sys::fd::readiness_handle`.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, RawFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

/// Events taken from the set per call.
const EVENTS_PER_WAIT: usize = 256;

pub struct ParkingLot {
    poll: RefCell<Poll>,
    events: RefCell<Events>,
}

impl ParkingLot {
    pub fn new() -> io::Result<ParkingLot> {
        Ok(ParkingLot {
            poll: RefCell::new(Poll::new()?),
            events: RefCell::new(Events::with_capacity(EVENTS_PER_WAIT)),
        })
    }

    /// Watches `fd` for input or hang-up on behalf of session `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.poll
            .borrow()
            .registry()
            .register(&mut SourceFd(&fd), Token(token as usize), Interest::READABLE)
    }

    /// Stops watching `fd`; must precede handing the fd back to a task.
    pub fn remove(&self, fd: RawFd) {
        // Fails only if `fd` is not in the set, which leaves nothing to undo.
        let _ = self.poll.borrow().registry().deregister(&mut SourceFd(&fd));
    }

    /// Tokens of parked sessions that became ready, without waiting. Returns
    /// whether the batch was full (more may be pending).
    pub fn ready(&self, into: &mut Vec<u64>) -> io::Result<bool> {
        let mut events = self.events.borrow_mut();
        self.poll.borrow_mut().poll(&mut events, Some(Duration::ZERO))?;
        let before = into.len();
        into.extend(events.iter().map(|e| e.token().0 as u64));
        Ok(into.len() - before == EVENTS_PER_WAIT)
    }

    /// A monoio handle whose `readable()` resolves when `ready` has events.
    pub fn waiter(&self) -> io::Result<monoio::net::UnixStream> {
        // The registry's fd is the set's own.
        crate::sys::fd::readiness_handle(self.poll.borrow().registry().as_fd())
    }
}
