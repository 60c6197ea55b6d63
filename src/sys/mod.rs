//! A thin layer over the OS, shared by the server and the load-test
//! harness: a socket's non-blocking reads and writes (through TLS when it
//! has it), eventfds, readiness waits on any fd, and a core's socket
//! receives on its io_uring, and handing freed memory back. It knows nothing of
//! WebSocket, sessions or protocols.

pub mod alloc;
pub mod eventfd;
pub mod fd;
pub mod ring;
pub mod socket;

/// How far a write got.
pub enum Flush {
    /// Everything is written.
    Done,
    /// The socket is full; wait for it to be writable.
    Blocked,
}
