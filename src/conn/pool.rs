//! Per-core pool of fixed-size byte buffers.
//!
//! Owns reuse only: a connection takes a buffer when it has bytes to keep
//! (a partial frame, queued output) and gives it back as soon as it has none,
//! so an idle connection holds no buffer. Single-threaded by construction:
//! one pool per worker, never shared across cores.

use std::cell::RefCell;

pub struct BufferPool {
    free: RefCell<Vec<Vec<u8>>>,
    buf_bytes: usize,
    max_free: usize,
}

impl BufferPool {
    /// A pool of `buf_bytes` buffers that keeps at most `max_free` idle ones
    /// (so it never holds more than `buf_bytes * max_free` bytes).
    pub fn new(buf_bytes: usize, max_free: usize) -> BufferPool {
        BufferPool {
            free: RefCell::new(Vec::with_capacity(max_free)),
            buf_bytes,
            max_free,
        }
    }

    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    /// An empty buffer with `buf_bytes` of capacity.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.buf_bytes))
    }

    /// Returns a buffer. Buffers that grew past the pool size (a large frame)
    /// are freed rather than kept, so the pool's footprint stays bounded.
    pub fn give(&self, mut buf: Vec<u8>) {
        let mut free = self.free.borrow_mut();
        if buf.capacity() == self.buf_bytes && free.len() < self.max_free {
            buf.clear();
            free.push(buf);
        }
    }

    pub fn idle_buffers(&self) -> usize {
        self.free.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let pool = BufferPool::new(64, 2);
        let a = pool.take();
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptr, "a given buffer is reused");
        pool.give(b);
        pool.give(Vec::with_capacity(64));
        // max_free is 2: a third idle buffer is freed.
        pool.give(Vec::with_capacity(64));
        assert_eq!(pool.idle_buffers(), 2);
        // A buffer that grew is not kept.
        let mut big = pool.take();
        big.reserve(1000);
        pool.give(big);
        assert_eq!(pool.idle_buffers(), 1);
    }
}
