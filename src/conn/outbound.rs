//! A connection's queued output.
//!
//! Owns the bytes waiting for the socket and the rule that many frames go out
//! in one write: everything a read produced is encoded back to back into one
//! pooled buffer and written with one syscall. When all of it is written the
//! buffer goes back to the pool, so a quiet connection holds none.

use std::io;

use super::pool::BufferPool;
use crate::sys::socket::Socket;
use crate::ws::close::{self, CloseCode};
use crate::ws::frame::{self, FrameHeader, Opcode, MAX_HEADER_BYTES};
use crate::ws::handshake;

#[derive(Default)]
pub struct Outbound {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already written.
    sent: usize,
    /// Bytes written since the last `take_written`.
    written: u64,
}

pub use crate::sys::Flush;

impl Outbound {
    pub fn is_empty(&self) -> bool {
        self.sent == self.buf.len()
    }

    fn room(&mut self, pool: &BufferPool) -> &mut Vec<u8> {
        if self.buf.capacity() == 0 {
            self.buf = pool.take();
        }
        &mut self.buf
    }

    /// Queues raw bytes (an HTTP response).
    pub fn push_bytes(&mut self, pool: &BufferPool, bytes: &[u8]) {
        self.room(pool).extend_from_slice(bytes);
    }

    /// Queues the 101 response (RFC 6455 4.2.2).
    pub fn push_accept(&mut self, pool: &BufferPool, key: &[u8], protocol: Option<&str>) {
        handshake::write_accept(self.room(pool), key, protocol);
    }

    /// Queues the 101 with more header lines (`extra`, each ending in CRLF).
    pub fn push_accept_with(&mut self, pool: &BufferPool, key: &[u8], protocol: Option<&str>, extra: &[u8]) {
        handshake::write_accept_with(self.room(pool), key, protocol, extra);
    }

    /// Queues an unmasked server frame (RFC 6455 5.1: servers do not mask).
    pub fn push_frame(&mut self, pool: &BufferPool, opcode: Opcode, payload: &[u8]) {
        let header = FrameHeader {
            fin: true,
            opcode,
            mask: None,
            payload_len: payload.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_BYTES];
        let n = frame::encode_header(&header, &mut head);
        let buf = self.room(pool);
        buf.extend_from_slice(&head[..n]);
        buf.extend_from_slice(payload);
    }

    /// Queues a close frame with `code` and `reason` (RFC 6455 5.5.1).
    pub fn push_close(&mut self, pool: &BufferPool, code: Option<CloseCode>, reason: &str) {
        match code {
            Some(code) => {
                let (payload, n) = close::payload(code, reason);
                self.push_frame(pool, Opcode::Close, &payload[..n]);
            }
            None => self.push_frame(pool, Opcode::Close, &[]),
        }
    }

    /// Writes as much as the socket takes without blocking.
    pub fn flush(&mut self, socket: &Socket<'_>, pool: &BufferPool) -> io::Result<Flush> {
        while !self.is_empty() {
            match socket.send(&self.buf[self.sent..]) {
                Ok(n) => {
                    self.sent += n;
                    self.written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.release(pool);
        if !socket.flush_pending()? {
            return Ok(Flush::Blocked);
        }
        Ok(Flush::Done)
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Hands the buffer over to a send that owns it until it ends
    /// (`sent_back`), with where its unwritten bytes start; nothing is
    /// queued after.
    pub fn take_unsent(&mut self) -> (Vec<u8>, usize) {
        (std::mem::take(&mut self.buf), std::mem::take(&mut self.sent))
    }

    /// Takes back the buffer of a send that wrote `n` more bytes from
    /// `from`: all written, it goes back to the pool; else the rest is
    /// queued again, where it was (no bytes move, however many sends a
    /// slow peer takes). Nothing was queued meanwhile: the send's owner
    /// waited for it.
    pub fn sent_back(&mut self, pool: &BufferPool, buf: Vec<u8>, from: usize, n: usize) {
        debug_assert!(self.buf.capacity() == 0, "output queued during a send");
        self.written += n as u64;
        if from + n >= buf.len() {
            pool.give(buf);
        } else {
            self.buf = buf;
            self.sent = from + n;
        }
    }

    /// Bytes written since the last call.
    pub fn take_written(&mut self) -> u64 {
        std::mem::take(&mut self.written)
    }

    /// Gives the buffer back to the pool, dropping anything unsent.
    pub fn release(&mut self, pool: &BufferPool) {
        self.sent = 0;
        pool.give(std::mem::take(&mut self.buf));
    }
}
