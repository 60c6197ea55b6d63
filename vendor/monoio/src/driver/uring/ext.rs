//! sluice's addition to monoio 0.2.4: raw submissions on the current
//! thread's io_uring, and one handler for their completions, so that ops
//! monoio does not define (a receive into a registered buffer ring) run on
//! the ring the runtime already waits on.
//!
//! - `push` queues an entry; it goes to the kernel with the runtime's next
//!   submission (at the latest when the thread waits), like monoio's ops.
//! - Every completion whose user_data has `USER_DATA_BIT` set goes to the
//!   thread's handler, right after the driver has gone through its
//!   completion queue; the handler may queue entries through the `Queue`
//!   it is given, and wake tasks.
//! - `register_buf_ring` registers a ring of provided buffers.

use std::cell::RefCell;
use std::io;

use io_uring::{cqueue, squeue};

use super::super::{Inner, CURRENT};

/// Set in the user_data of every entry pushed here; the driver's own
/// user_data never has it (op indices are slab indices, and its reserved
/// values are the last four of u64).
pub const USER_DATA_BIT: u64 = 1 << 63;

/// Where a handler queues entries while the driver processes completions.
pub struct Queue<'a>(&'a mut io_uring::IoUring);

impl Queue<'_> {
    /// Queues `entry`; `false` if the submission queue is full.
    ///
    /// # Safety
    /// As `io_uring::SubmissionQueue::push`: whatever the entry points to
    /// stays valid until its completion.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> bool {
        // A fresh view of the queue for each entry, dropped (its tail
        // stored) at once: a handler wakes tasks but runs none, so nothing
        // else pushes while it runs today; a view kept across a push of
        // monoio's own (a close, when the last handle on a file is
        // dropped) would store a stale tail over it. A quarter of the
        // queue is left to monoio's ops, whose submission into a full
        // queue enters the kernel from inside the driver.
        let mut sq = self.0.submission();
        if sq.len() >= sq.capacity() / 4 * 3 {
            return false;
        }
        sq.push(entry).is_ok()
    }
}

type Handler = Box<dyn FnMut(&cqueue::Entry, &mut Queue<'_>)>;

thread_local! {
    static HANDLER: RefCell<Option<Handler>> = const { RefCell::new(None) };
    /// The handler is running: `push` would reach the driver's state
    /// while the driver holds it.
    static IN_HANDLER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// `set_handler` was called while the handler ran.
    static REPLACED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Completions of ours taken from the queue, handed over once the
    /// driver has gone through it.
    static STASH: RefCell<Vec<cqueue::Entry>> = const { RefCell::new(Vec::new()) };
}

/// Sets (or, with `None`, clears) the thread's handler of completions.
pub fn set_handler(handler: Option<Handler>) {
    HANDLER.with(|h| *h.borrow_mut() = handler);
    REPLACED.with(|r| r.set(true));
}

pub(crate) fn stash(cqe: cqueue::Entry) {
    STASH.with(|s| s.borrow_mut().push(cqe));
}

/// Hands every stashed completion to the handler, once the completion
/// queue is no longer borrowed, so it may queue entries.
pub(crate) fn complete_stashed(uring: &mut io_uring::IoUring) {
    let stashed = STASH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if stashed.is_empty() {
        return;
    }
    // Out of its cell while it runs, so that setting or clearing the
    // handler meanwhile (a ring dropped by a woken task's end) is no
    // second borrow; put back unless replaced.
    if let Some(mut handler) = HANDLER.with(|h| h.borrow_mut().take()) {
        REPLACED.with(|r| r.set(false));
        IN_HANDLER.with(|f| f.set(true));
        let mut queue = Queue(uring);
        for cqe in &stashed {
            handler(cqe, &mut queue);
        }
        IN_HANDLER.with(|f| f.set(false));
        if !REPLACED.with(|r| r.get()) {
            HANDLER.with(|h| *h.borrow_mut() = Some(handler));
        }
    }
    // Keep the allocation for the next turn.
    let mut stashed = stashed;
    stashed.clear();
    STASH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_empty() {
            *s = stashed;
        }
    });
}

fn with_uring<R>(f: impl FnOnce(&mut super::UringInner) -> io::Result<R>) -> io::Result<R> {
    if !CURRENT.is_set() {
        return Err(io::Error::other("not in a monoio runtime"));
    }
    if IN_HANDLER.with(|f| f.get()) {
        return Err(io::Error::other("the driver is busy: from a handler, use its Queue"));
    }
    CURRENT.with(|inner| match inner {
        // SAFETY: the driver's state is used from its own thread only, and
        // not while the driver processes completions (refused just above
        // while a handler runs; a handler queues through its `Queue`).
        Inner::Uring(this) => f(unsafe { &mut *this.get() }),
        #[allow(unreachable_patterns)]
        _ => Err(io::Error::other("not an io_uring runtime")),
    })
}

/// The current runtime runs on io_uring.
pub fn is_uring() -> bool {
    CURRENT.is_set() && CURRENT.with(|inner| matches!(inner, Inner::Uring(_)))
}

/// Queues `entry`, whose user_data must have `USER_DATA_BIT`.
///
/// # Safety
/// As `io_uring::SubmissionQueue::push`: whatever the entry points to
/// stays valid until its completion.
pub unsafe fn push(entry: &squeue::Entry) -> io::Result<()> {
    debug_assert!(entry.get_user_data() & USER_DATA_BIT != 0);
    with_uring(|inner| {
        if inner.uring.submission().is_full() {
            inner.submit()?;
        }
        if inner.uring.submission().push(entry).is_err() {
            return Err(io::Error::other("io_uring submission queue full"));
        }
        Ok(())
    })
}

/// Registers a ring of provided buffers (`IORING_REGISTER_PBUF_RING`).
///
/// # Safety
/// `ring_addr` points to `ring_entries` page-aligned descriptors that stay
/// valid, with the buffers they describe, as long as the ring lives.
pub unsafe fn register_buf_ring(ring_addr: u64, ring_entries: u16, bgid: u16) -> io::Result<()> {
    with_uring(|inner| inner.uring.submitter().register_buf_ring(ring_addr, ring_entries, bgid))
}
