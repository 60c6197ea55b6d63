//! Descriptors: a readiness wait on any fd, and duplicates.
//!
//! Platform facts this relies on:
//! - monoio has no readiness wait for an arbitrary fd; a duplicate of it is
//!   wrapped as a monoio `UnixStream` only for `readable()` (a PollAdd under
//!   io_uring, a registration under epoll). No socket call is ever made on
//!   it, so any pollable fd will do (an epoll set, an eventfd).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

/// A monoio handle on a duplicate of `fd` (an epoll set, an eventfd), to
/// await its readiness with `readable()` under either driver.
pub fn readiness_handle(fd: BorrowedFd<'_>) -> io::Result<monoio::net::UnixStream> {
    let fd = duplicate(fd)?;
    monoio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
}

/// A new fd (close-on-exec) for the same open file. For a socket, this keeps
/// it open after the task's stream is gone (monoio closes that fd once its
/// in-flight operations are done).
pub fn duplicate(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}
