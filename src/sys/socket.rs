//! Non-blocking byte moves on a connected socket, for either driver.
//!
//! Platform facts this relies on:
//! - monoio's io_uring driver leaves accepted sockets blocking, its epoll
//!   driver makes them non-blocking. `MSG_DONTWAIT` makes each call
//!   non-blocking whatever the file's mode, so one code path serves both.
//! - `MSG_NOSIGNAL`: a write to a reset peer returns EPIPE instead of raising
//!   SIGPIPE and killing the process.
//! - Readiness comes from monoio. A strict wait (`relaxed=false`) makes the
//!   epoll driver re-check with poll(2); an open session's wait is relaxed
//!   after a read the kernel said left nothing (`Left`, `conn::input`).
//! - Under io_uring, monoio 0.2.4 unwraps the submission of that readiness
//!   op (`net/tcp/stream.rs`, `Op::poll_read(..).unwrap()`), as it does for
//!   every op. Submitting makes a system call only when the submission
//!   queue is full (4096 entries a worker, `server::URING_ENTRIES`);
//!   monoio then retries `io_uring_enter` on EAGAIN and EBUSY (the kernel's
//!   answers to a request it cannot allocate and to a full completion
//!   queue), so only another failure of `io_uring_enter` itself, a broken
//!   ring, reaches the unwrap, and with `panic = "abort"` it ends the
//!   process. monoio offers no readiness wait that returns that error, so
//!   none is handled here; the epoll driver has no such failure.

use std::cell::{Cell, RefCell};
use std::io;
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;

use monoio::net::TcpStream;
use socket2::SockRef;

use crate::tls::{recv_unread, Left, TlsSession};

/// A connection's TLS state, shared by its task and its shard (which
/// writes deliveries to an idle connection itself).
pub type Tls = Rc<RefCell<TlsSession>>;

/// A socket; with TLS, every byte passes through the connection's
/// `TlsSession` (the callers see plaintext only).
pub struct Socket<'a> {
    fd: BorrowedFd<'a>,
    tls: Option<Tls>,
    /// What the last plain `recv_into` found of the socket's bytes.
    left: Cell<Left>,
}

impl<'a> Socket<'a> {
    pub fn new(stream: &'a TcpStream) -> Socket<'a> {
        // SAFETY: the fd belongs to `stream`, which is borrowed for 'a and so
        // stays open at least that long.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        Socket {
            fd,
            tls: None,
            left: Cell::new(Left::Unknown),
        }
    }

    /// The socket's fd, borrowed as long as the socket is.
    pub fn fd(&self) -> BorrowedFd<'a> {
        self.fd
    }

    /// A socket the caller keeps open for `'a`.
    pub fn from_fd(fd: BorrowedFd<'a>) -> Socket<'a> {
        Socket {
            fd,
            tls: None,
            left: Cell::new(Left::Unknown),
        }
    }

    /// The same socket, speaking TLS when `tls` is given.
    pub fn with_tls(mut self, tls: Option<Tls>) -> Socket<'a> {
        self.tls = tls;
        self
    }

    /// The socket speaks TLS.
    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Ciphertext is waiting for the socket to take it (TLS only).
    pub fn has_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.borrow().has_pending())
    }

    /// Writes the ciphertext that waited; `Ok(true)` once none is left
    /// (always, without TLS). Every flush that ends with all its bytes
    /// taken ends with this, so "done" means on the wire, not in `pending`.
    pub fn flush_pending(&self) -> io::Result<bool> {
        match &self.tls {
            Some(tls) => tls.borrow_mut().flush_pending(self.fd),
            None => Ok(true),
        }
    }

    fn sock(&self) -> SockRef<'_> {
        SockRef::from(&self.fd)
    }

    /// Appends at most `max` received bytes to `buf`, without blocking.
    /// `Ok(Some(n))`: `n > 0` bytes arrived. `Ok(None)`: nothing yet, wait for
    /// readiness. End of stream is an `UnexpectedEof` error: on a WebSocket a
    /// peer that closes without a close frame has vanished.
    pub fn recv_into(&self, buf: &mut Vec<u8>, max: usize) -> io::Result<Option<usize>> {
        if let Some(tls) = &self.tls {
            return tls.borrow_mut().recv_into(self.fd, buf, max);
        }
        self.left.set(Left::Unknown);
        buf.reserve(max);
        let spare = buf.spare_capacity_mut();
        let room = spare.len().min(max);
        match recv_unread(self.fd, &mut spare[..room]) {
            Ok((0, _)) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok((n, unread)) => {
                // SAFETY: recvmsg(2) initialised the first `n <= room` bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                self.left.set(Left::after(n, unread));
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.left.set(Left::NothingRead);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// What the last `recv_into` found of the socket's bytes (`Left`).
    pub fn left(&self) -> Left {
        match &self.tls {
            Some(tls) => tls.borrow().left(),
            None => self.left.get(),
        }
    }

    /// Writes what it can of `bytes` without blocking; returns bytes written.
    pub fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            return tls.borrow_mut().send(self.fd, bytes);
        }
        self.sock()
            .send_with_flags(bytes, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    }

    /// Writes what it can of `frames`, in order, with one vectored send.
    pub fn send_vectored(&self, frames: &[std::io::IoSlice<'_>]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            return tls.borrow_mut().send_vectored(self.fd, frames);
        }
        self.sock()
            .send_vectored_with_flags(frames, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    }

    pub fn shutdown_write(&self) -> io::Result<()> {
        self.close_notify();
        self.sock().shutdown(Shutdown::Write)
    }

    /// Ends the TCP connection now, before the stream is dropped. Dropping
    /// alone may not send the FIN at once: under io_uring an operation
    /// still in flight on the socket (a readiness wait given up for a kick)
    /// holds the file open until it completes, and a client that waits for
    /// the server's FIN, as RFC 6455 7.1.1 asks, sends nothing to complete
    /// it. `shutdown` acts on the socket itself. Only the write side: a
    /// socket shut for reading answers any later input with a reset, which
    /// can destroy our close frame before the peer reads it.
    pub fn shutdown(&self) {
        self.close_notify();
        let _ = self.sock().shutdown(Shutdown::Write);
    }

    /// TLS: our close_notify goes before our FIN (RFC 8446 6.1).
    fn close_notify(&self) {
        if let Some(tls) = &self.tls {
            tls.borrow_mut().close_notify(self.fd);
        }
    }

    /// Reads and discards what is queued, at most `DISCARD_BUDGET_BYTES` per
    /// call so a flooding peer cannot hold the core. `Ok(true)` once the
    /// peer has closed its side. Used only while closing.
    pub fn discard(&self) -> io::Result<bool> {
        let mut sink = [MaybeUninit::<u8>::uninit(); 16 * 1024];
        let mut taken = 0;
        while taken < DISCARD_BUDGET_BYTES {
            match self.sock().recv_with_flags(&mut sink, libc::MSG_DONTWAIT) {
                Ok(0) => return Ok(true),
                Ok(n) => taken += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

/// Bytes `discard` drops before yielding to other connections.
const DISCARD_BUDGET_BYTES: usize = 256 * 1024;

/// Asks the kernel to say, with each read, how many bytes it left in the
/// socket (`TCP_INQ`, Linux 4.18+), which `tls::recv_unread` passes on.
pub fn report_unread(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(fd, libc::SOL_TCP, libc::TCP_INQ, 1)
}

/// Sets a socket option whose value is an int.
pub fn set_int_option(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid socket fd and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
