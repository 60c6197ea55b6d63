//! Per-core pool of fixed-size byte buffers.
//!
//! Owns reuse only: a connection takes a buffer when it has bytes to keep
//! (a partial frame, queued output) and gives it back as soon as it has none,
//! so an idle connection holds no buffer. Single-threaded by construction:
//! one pool per worker, never shared across cores.

use std::cell::RefCell;

/// A large buffer is this many pool buffers.
const LARGE_FACTOR: usize = 4;

/// Idle large buffers kept, at most.
const MAX_LARGE_FREE: usize = 8;

pub struct BufferPool {
    free: RefCell<Vec<Vec<u8>>>,
    buf_bytes: usize,
    max_free: usize,
    /// Buffers of `LARGE_FACTOR` pool buffers, for output past one: the
    /// replies to a large read move once into one, rather than grow by
    /// doubling and be freed after (a 64 KiB read's echoes cost 48 KiB of
    /// copies and an allocation that way, every read).
    large: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A pool of `buf_bytes` buffers that keeps at most `max_free` idle ones
    /// (so it never holds more than `buf_bytes * max_free` bytes).
    pub fn new(buf_bytes: usize, max_free: usize) -> BufferPool {
        BufferPool {
            free: RefCell::new(Vec::with_capacity(max_free)),
            buf_bytes,
            max_free,
            large: RefCell::new(Vec::with_capacity(MAX_LARGE_FREE)),
        }
    }

    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    pub fn large_bytes(&self) -> usize {
        self.buf_bytes * LARGE_FACTOR
    }

    /// An empty buffer with `buf_bytes` of capacity.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.buf_bytes))
    }

    /// An empty buffer with `large_bytes` of capacity.
    pub fn take_large(&self) -> Vec<u8> {
        self.large
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.large_bytes()))
    }

    /// Returns a buffer. Pool-sized and large ones are kept, up to their
    /// counts; others (one that grew for a large frame) are freed, so the
    /// pool's footprint stays bounded: `buf_bytes * (max_free +
    /// LARGE_FACTOR * MAX_LARGE_FREE)`.
    pub fn give(&self, mut buf: Vec<u8>) {
        let list = if buf.capacity() == self.buf_bytes {
            (&self.free, self.max_free)
        } else if buf.capacity() == self.large_bytes() {
            (&self.large, MAX_LARGE_FREE)
        } else {
            return;
        };
        let mut free = list.0.borrow_mut();
        if free.len() < list.1 {
            buf.clear();
            free.push(buf);
        }
    }

    pub fn idle_buffers(&self) -> usize {
        self.free.borrow().len()
    }

    pub fn idle_large_buffers(&self) -> usize {
        self.large.borrow().len()
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

    #[test]
    fn large_buffers_are_reused_and_bounded() {
        let pool = BufferPool::new(64, 2);
        let a = pool.take_large();
        assert_eq!(a.capacity(), 64 * LARGE_FACTOR);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take_large();
        assert_eq!(b.as_ptr(), ptr, "a given large buffer is reused");
        for _ in 0..MAX_LARGE_FREE + 3 {
            pool.give(Vec::with_capacity(64 * LARGE_FACTOR));
        }
        assert_eq!(pool.idle_large_buffers(), MAX_LARGE_FREE);
        assert_eq!(pool.idle_buffers(), 0);
    }
}
