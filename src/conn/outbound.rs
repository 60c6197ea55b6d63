//! A connection's queued output.
//!
//! Owns the bytes waiting for the socket and the rule that many frames go out
//! in one write: everything a read produced is encoded back to back into one
//! pooled buffer and written with one syscall. When all of it is written the
//! buffer goes back to the pool, so a quiet connection holds none.

use std::io;

use super::pool::BufferPool;
use crate::pubsub::sessions::Sessions;
use crate::pubsub::SessionKey;
use crate::sys::socket::Socket;
use crate::ws::close::{self, CloseCode};
use crate::ws::frame::{self, FrameHeader, Opcode, MAX_HEADER_BYTES};
use crate::ws::handshake;

#[derive(Default)]
pub struct Outbound {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already written.
    sent: usize,
    /// Bytes written since the last `take_written` (taken after every
    /// flush, which writes at most the buffer: one read's replies or one
    /// message, within 4 GiB).
    written: u32,
    /// The peer agreed to permessage-deflate with this window for our
    /// messages (0: it did not).
    deflate_bits: u8,
    /// With context takeover: our messages go through the session's own
    /// compressor, in the order they are queued.
    takeover: bool,
}

pub use crate::sys::Flush;

impl Outbound {
    pub fn is_empty(&self) -> bool {
        self.sent == self.buf.len()
    }

    /// The buffer, with room for `more` bytes where it can have it: past
    /// a pool buffer the output moves once into a large one (its unsent
    /// part only), rather than grow by doubling.
    fn room(&mut self, pool: &BufferPool, more: usize) -> &mut Vec<u8> {
        if self.buf.capacity() == 0 {
            self.buf = pool.take();
        }
        let unsent = self.buf.len() - self.sent;
        if self.buf.len() + more > self.buf.capacity()
            && self.buf.capacity() == pool.buf_bytes()
            && unsent + more <= pool.large_bytes()
        {
            let mut large = pool.take_large();
            large.extend_from_slice(&self.buf[self.sent..]);
            self.sent = 0;
            pool.give(std::mem::replace(&mut self.buf, large));
        }
        &mut self.buf
    }

    /// Queues raw bytes (an HTTP response).
    pub fn push_bytes(&mut self, pool: &BufferPool, bytes: &[u8]) {
        self.room(pool, bytes.len()).extend_from_slice(bytes);
    }

    /// Queues the 101 response (RFC 6455 4.2.2).
    pub fn push_accept(&mut self, pool: &BufferPool, key: &[u8], protocol: Option<&str>) {
        handshake::write_accept(self.room(pool, 0), key, protocol);
    }

    /// Queues the 101 with more header lines (`extra`, each ending in CRLF).
    pub fn push_accept_with(&mut self, pool: &BufferPool, key: &[u8], protocol: Option<&str>, extra: &[u8]) {
        handshake::write_accept_with(self.room(pool, extra.len()), key, protocol, extra);
    }

    /// Queues an unmasked server frame (RFC 6455 5.1: servers do not mask).
    pub fn push_frame(&mut self, pool: &BufferPool, opcode: Opcode, payload: &[u8]) {
        self.push_frame_with(pool, opcode, false, payload);
    }

    /// Queues an unmasked frame, with RSV1 (a compressed message) or not.
    fn push_frame_with(&mut self, pool: &BufferPool, opcode: Opcode, rsv1: bool, payload: &[u8]) {
        let header = FrameHeader {
            fin: true,
            rsv1,
            opcode,
            mask: None,
            payload_len: payload.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_BYTES];
        let n = frame::encode_header(&header, &mut head);
        let buf = self.room(pool, n + payload.len());
        buf.extend_from_slice(&head[..n]);
        buf.extend_from_slice(payload);
    }

    /// The peer agreed to permessage-deflate, with a window of `bits` for
    /// our messages (0: it did not), and with context takeover or not.
    pub fn set_deflate(&mut self, bits: u8, takeover: bool) {
        self.deflate_bits = bits;
        self.takeover = takeover;
    }

    /// Queues a data message of session `key`: compressed (RSV1 set) where
    /// the peer agreed to permessage-deflate and it is worth it, as it is
    /// otherwise (RFC 7692 6: compression is per message). With context
    /// takeover, by the session's own compressor: the queue is written in
    /// order, so the peer inflates in the order it was compressed.
    pub fn push_message(
        &mut self,
        pool: &BufferPool,
        opcode: Opcode,
        payload: &[u8],
        sessions: &Sessions,
        key: SessionKey,
    ) {
        let compressor = &sessions.compressor;
        if self.takeover && payload.len() >= compressor.min_bytes() {
            let pushed = sessions.dedicated.compressed(key, &[payload], |packed| {
                self.push_frame_with(pool, opcode, true, packed)
            });
            if pushed.is_some() {
                return;
            }
        } else if self.deflate_bits != 0 && !self.takeover && compressor.worth(payload.len(), self.deflate_bits) {
            let pushed = compressor.compressed(&[payload], |packed| {
                packed.map(|packed| self.push_frame_with(pool, opcode, true, packed))
            });
            if pushed.is_some() {
                return;
            }
        }
        self.push_frame(pool, opcode, payload);
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
                    self.written = self.written.wrapping_add(n as u32);
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
        self.written = self.written.wrapping_add(n as u32);
        if from + n >= buf.len() {
            pool.give(buf);
        } else {
            self.buf = buf;
            self.sent = from + n;
        }
    }

    /// Bytes written since the last call.
    pub fn take_written(&mut self) -> u64 {
        u64::from(std::mem::take(&mut self.written))
    }

    /// Gives the buffer back to the pool, dropping anything unsent.
    pub fn release(&mut self, pool: &BufferPool) {
        self.sent = 0;
        pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_at(out: &Outbound, i: usize) -> &[u8] {
        &out.buf[out.sent + i * 102..out.sent + (i + 1) * 102]
    }

    /// Output past a pool buffer moves once, its unsent part only, into a
    /// large buffer, which goes back to the pool's large list after.
    #[test]
    fn output_past_a_buffer_moves_once_into_a_large_one() {
        let pool = BufferPool::new(1024, 4);
        let mut out = Outbound::default();
        let payload = [7u8; 100];
        for _ in 0..5 {
            out.push_frame(&pool, Opcode::Binary, &payload);
        }
        // A send on the ring wrote the first frame.
        let (buf, from) = out.take_unsent();
        out.sent_back(&pool, buf, from, 102);
        assert_eq!(out.unsent(), 4 * 102);
        for _ in 0..10 {
            out.push_frame(&pool, Opcode::Binary, &payload);
        }
        assert_eq!(out.buf.capacity(), pool.large_bytes());
        assert_eq!(out.unsent(), 14 * 102);
        for i in 0..14 {
            assert_eq!(&frame_at(&out, i)[..2], &[0x82, 100], "frame {i}");
            assert!(frame_at(&out, i)[2..].iter().all(|&b| b == 7), "frame {i}");
        }
        assert_eq!(pool.idle_buffers(), 1, "the small buffer went back");
        out.release(&pool);
        assert_eq!(pool.idle_large_buffers(), 1);
        // Output past a large buffer grows as a Vec does, and is freed.
        for _ in 0..50 {
            out.push_frame(&pool, Opcode::Binary, &payload);
        }
        assert_eq!(out.unsent(), 50 * 102);
        out.release(&pool);
        assert_eq!(pool.idle_large_buffers(), 0);
    }
}
