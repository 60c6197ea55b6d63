//! Socket receives on the core's io_uring, into buffers the kernel picks
//! from a ring of buffers the core provides (buffer selection, kernel
//! 5.19+), on the ring the runtime already waits on (through
//! `monoio::uring_ext`, our one addition to monoio, vendor/monoio).
//!
//! Why: monoio's receive op reads into a buffer the caller owns, so a
//! waiting connection would hold a buffer; its readiness wait (a poll op,
//! then a `recv` system call) costs one more trip into the kernel per
//! read. Here the receive itself is the wait: its completion carries the
//! bytes, taken with no system call, in a buffer no connection owns.
//!
//! How it runs:
//! - A socket's receive takes one buffer (at most `BUFFER_BYTES`) and
//!   ends. monoio's driver hands its completion to `complete`, while it
//!   processes completions after its wait: the bytes are copied into the
//!   socket's inbox (a plain `Vec`, unallocated between arrivals), the
//!   buffer goes back to the kernel at once (so the ring's buffers never
//!   wait on a connection), the next receive is queued while the inbox
//!   holds less than a buffer (`INBOX_LIMIT_BYTES`), and the socket's task
//!   is woken. Entries go
//!   to the kernel with the runtime's next submission: no system call of
//!   their own.
//! - At the limit no receive is queued: the socket is not read, so TCP's
//!   flow control holds the peer back, as for a connection that stops
//!   reading. `take` queues one again once the task has taken what
//!   waited. So a connection that does not read (its publish waits for
//!   ring space, its output is blocked) holds at most the limit plus one
//!   buffer, 8 KiB, as a connection reading on readiness holds its socket's
//!   bytes in the kernel instead. A task that reads takes its inbox in the
//!   same turn of the loop, so the limit costs it nothing: either way the
//!   next receive goes to the kernel with the next submission. (A
//!   multishot receive, armed once, was measured too: the kernel posts all
//!   the socket holds, and more while the peer sends, before a cancel
//!   lands, so its inbox had no such bound: 4 MB held past a 64 KiB limit
//!   in the test below.)
//! - A receive that fills its buffer, or leaves bytes in the socket
//!   (`IORING_CQE_F_SOCK_NONEMPTY`), is a burst (a large message): the
//!   next `take` reads the rest straight from the socket, up to 64 KiB,
//!   before queueing the next receive, rather than a buffer a turn.
//! - A receive that cannot be queued (`io_uring_enter` failing) ends the
//!   session once the bytes before it are read; a cancel that cannot be
//!   queued is tried again at the next call.
//! - A receive that found no buffer free (more sockets had bytes in one
//!   turn than the ring has buffers) is read on straight from the socket
//!   by the next `take`, as a burst is, and then queued again; one that
//!   ends on end of stream or an error reports it after the bytes before
//!   it.
//!
//! Memory: the buffers (`BUFFERS` x `BUFFER_BYTES`, 4 MiB a core, touched
//! as they are used) and the ring of their descriptors are never freed:
//! the kernel may still finish a receive into them while the runtime's
//! ring is torn down, and a core's buffers live as long as its worker.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types};
use monoio::uring_ext::{self, Queue, USER_DATA_BIT};

/// Buffers the kernel picks from (a power of two, at most 32,768).
const BUFFERS: u16 = 1024;
/// Bytes of each buffer: the most one completion carries.
const BUFFER_BYTES: usize = 4096;
/// The buffer group of the core's one buffer ring.
const GROUP: u16 = 0x5c;
// `Buffers::push` writes the kernel's 16-byte `struct io_uring_buf`.
const _: () = assert!(std::mem::size_of::<types::BufRingEntry>() == 16);
/// The most `take` reads straight from the socket after a burst.
const DIRECT_READ_BYTES: usize = 64 * 1024;
/// Unread bytes an inbox holds before no more receives are queued.
pub const INBOX_LIMIT_BYTES: usize = BUFFER_BYTES;
/// user_data of the cancel requests, whose completions are ignored (no
/// inbox has this index).
const CANCEL_USER_DATA: u64 = USER_DATA_BIT | u32::MAX as u64;

/// One armed socket's handle: its inbox's index, plus one (so an
/// `Option<Token>` is 4 bytes: it sits in every connection's task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(std::num::NonZeroU32);

impl Token {
    fn new(index: usize) -> Token {
        Token(std::num::NonZeroU32::new(index as u32 + 1).expect("an index below u32::MAX"))
    }

    fn index(self) -> usize {
        self.0.get() as usize - 1
    }
}

/// The user_data of an entry for inbox `index` in its `generation` (31
/// bits) under our mark (the top bit). A completion for an inbox since
/// freed and used again does not match its generation.
fn user_data(index: usize, generation: u32) -> u64 {
    USER_DATA_BIT | (u64::from(generation & 0x7fff_ffff) << 32) | index as u64
}

/// How a socket's receive ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// End of stream: the peer closed its side.
    Eof,
    /// The socket failed (the errno).
    Failed(i32),
}

#[derive(Default)]
struct Inbox {
    /// The socket received from.
    fd: RawFd,
    generation: u32,
    in_use: bool,
    /// A receive is in flight (until its last completion).
    armed: bool,
    /// A cancel of the receive is on its way.
    cancelling: bool,
    /// Its owner is gone: the inbox is freed at the receive's last
    /// completion.
    orphan: bool,
    /// Bytes received and not yet taken.
    data: Vec<u8>,
    /// The last receive left bytes in the socket (or filled its buffer):
    /// `take` reads them straight from the socket, no receive being in
    /// flight then.
    more: bool,
    end: Option<End>,
    waker: Option<Waker>,
}

/// Every core's buffer memory, which is never freed.
static KEPT: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// The buffers the kernel picks from, and the ring it picks them through.
struct Buffers {
    /// The ring of buffer descriptors (page-aligned, shared with the
    /// kernel); its tail is ours to advance.
    entries: *mut types::BufRingEntry,
    memory: *mut u8,
    /// Our count of descriptors handed to the kernel.
    tail: Cell<u16>,
}

impl Buffers {
    fn new() -> io::Result<Buffers> {
        let ring_layout = std::alloc::Layout::from_size_align(
            usize::from(BUFFERS) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        let memory_layout =
            std::alloc::Layout::from_size_align(usize::from(BUFFERS) * BUFFER_BYTES, 4096).map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size. Never freed (see the
        // module's note on memory).
        let (entries, memory) = unsafe { (std::alloc::alloc_zeroed(ring_layout), std::alloc::alloc(memory_layout)) };
        if entries.is_null() || memory.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // Kept where a leak checker sees them: they are meant to outlive
        // the ring.
        KEPT.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([entries as usize, memory as usize]);
        let buffers = Buffers {
            entries: entries.cast(),
            memory,
            tail: Cell::new(0),
        };
        for bid in 0..BUFFERS {
            buffers.push(bid);
        }
        buffers.publish();
        Ok(buffers)
    }

    /// Puts buffer `bid` back at the tail (seen by the kernel once
    /// `publish`ed).
    fn push(&self, bid: u16) {
        let tail = self.tail.get();
        let slot = usize::from(tail & (BUFFERS - 1));
        // The descriptor is the kernel's `struct io_uring_buf`: addr (u64)
        // at 0, len (u32) at 8, bid (u16) at 12; the ring's tail sits in the
        // first one's last two bytes, which the kernel reads at any time, so
        // the three fields are written through raw pointers, never through
        // a reference to the whole descriptor.
        // SAFETY: `slot` < BUFFERS, inside the descriptor ring (16-byte
        // aligned descriptors, page-aligned ring). The kernel reads these
        // fields only between its head and the published tail, and this
        // descriptor is past the published tail until `publish`.
        unsafe {
            let entry = self.entries.add(slot).cast::<u8>();
            entry.cast::<u64>().write(self.buffer(bid) as u64);
            entry.add(8).cast::<u32>().write(BUFFER_BYTES as u32);
            entry.add(12).cast::<u16>().write(bid);
        }
        self.tail.set(tail.wrapping_add(1));
    }

    /// Hands every pushed descriptor to the kernel.
    fn publish(&self) {
        // SAFETY: the tail lies in the ring's first descriptor, which the
        // kernel reads atomically: store it the same way, after the
        // descriptors (Release).
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail.get(), Ordering::Release);
        }
    }

    fn buffer(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < BUFFERS);
        // SAFETY: bid < BUFFERS, so the offset is inside `memory`.
        unsafe { self.memory.add(usize::from(bid) * BUFFER_BYTES) }
    }
}

/// A core's receives. Used only from its worker's thread.
pub struct RecvRing {
    buffers: Buffers,
    inboxes: RefCell<Vec<Inbox>>,
    free: RefCell<Vec<u32>>,
    /// Inboxes whose cancel could not be queued, tried again by the next
    /// call.
    cancels: RefCell<Vec<u32>>,
    /// Sockets with a receive in flight.
    armed: Cell<usize>,
    /// Receives that found every buffer taken (ENOBUFS): `take` reads on
    /// from the socket, then queues them again.
    starved: Cell<u64>,
}

impl RecvRing {
    /// The core's receives, on the io_uring of the runtime it is called
    /// in. Fails outside an io_uring runtime, or where the kernel has no
    /// buffer rings (before 5.19).
    pub fn new() -> io::Result<Rc<RecvRing>> {
        if !uring_ext::is_uring() {
            return Err(io::Error::other("not an io_uring runtime"));
        }
        let buffers = Buffers::new()?;
        // SAFETY: the descriptor ring is page-aligned, BUFFERS entries
        // long, and never freed, nor are the buffers.
        unsafe { uring_ext::register_buf_ring(buffers.entries as u64, BUFFERS, GROUP)? };
        let ring = Rc::new(RecvRing {
            buffers,
            inboxes: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            cancels: RefCell::new(Vec::new()),
            armed: Cell::new(0),
            starved: Cell::new(0),
        });
        let weak: Weak<RecvRing> = Rc::downgrade(&ring);
        uring_ext::set_handler(Some(Box::new(move |cqe, queue| {
            if let Some(ring) = weak.upgrade() {
                ring.complete(cqe, queue);
            }
        })));
        Ok(ring)
    }

    /// Starts receiving `fd` into a new inbox. The socket must stay open
    /// until `release`.
    pub fn arm(&self, fd: BorrowedFd<'_>) -> io::Result<Token> {
        self.retry_cancels();
        let token = {
            let mut inboxes = self.inboxes.borrow_mut();
            let index = match self.free.borrow_mut().pop() {
                Some(index) => index,
                // u32::MAX is the cancels' mark.
                None if inboxes.len() < u32::MAX as usize - 2 => {
                    inboxes.push(Inbox::default());
                    (inboxes.len() - 1) as u32
                }
                None => return Err(io::ErrorKind::OutOfMemory.into()),
            };
            let inbox = &mut inboxes[index as usize];
            inbox.generation = inbox.generation.wrapping_add(1) & 0x7fff_ffff;
            inbox.in_use = true;
            Token::new(index as usize)
        };
        if let Err(e) = self.submit_receive(token, fd.as_raw_fd()) {
            self.free_inbox(token.index());
            return Err(e);
        }
        Ok(token)
    }

    /// A receive of at most one buffer into inbox `index`.
    fn receive_entry(index: usize, inbox: &Inbox) -> squeue::Entry {
        opcode::Recv::new(types::Fd(inbox.fd), std::ptr::null_mut(), BUFFER_BYTES as u32)
            .buf_group(GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data(index, inbox.generation))
    }

    fn submit_receive(&self, token: Token, fd: RawFd) -> io::Result<()> {
        let entry = {
            let mut inboxes = self.inboxes.borrow_mut();
            let inbox = &mut inboxes[token.index()];
            inbox.fd = fd;
            Self::receive_entry(token.index(), inbox)
        };
        // SAFETY: the entry points to no memory but the registered buffers,
        // which are never freed.
        unsafe { uring_ext::push(&entry)? };
        let mut inboxes = self.inboxes.borrow_mut();
        let inbox = &mut inboxes[token.index()];
        inbox.armed = true;
        inbox.cancelling = false;
        self.armed.set(self.armed.get() + 1);
        Ok(())
    }

    fn cancel_entry(index: usize, generation: u32) -> squeue::Entry {
        opcode::AsyncCancel::new(user_data(index, generation))
            .build()
            .user_data(CANCEL_USER_DATA)
    }

    /// Asks the kernel to end `token`'s receive, once.
    fn cancel(&self, token: Token) {
        let generation = {
            let mut inboxes = self.inboxes.borrow_mut();
            let inbox = &mut inboxes[token.index()];
            if !inbox.armed || inbox.cancelling {
                return;
            }
            inbox.cancelling = true;
            inbox.generation
        };
        // SAFETY: a cancel points to no memory.
        if let Err(e) = unsafe { uring_ext::push(&Self::cancel_entry(token.index(), generation)) } {
            // The receive goes on; the next call tries again.
            self.inboxes.borrow_mut()[token.index()].cancelling = false;
            let mut cancels = self.cancels.borrow_mut();
            if !cancels.contains(&(token.index() as u32)) {
                cancels.push(token.index() as u32);
            }
            tracing::debug!(error = %e, "cannot cancel a receive");
        }
    }

    /// Queues the cancels that could not be queued before.
    fn retry_cancels(&self) {
        if self.cancels.borrow().is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut *self.cancels.borrow_mut());
        for index in waiting {
            let in_flight = self
                .inboxes
                .borrow()
                .get(index as usize)
                .is_some_and(|i| i.in_use && i.armed && !i.cancelling);
            if in_flight {
                self.cancel(Token::new(index as usize));
            }
        }
    }

    fn free_inbox(&self, index: usize) {
        let mut inboxes = self.inboxes.borrow_mut();
        let inbox = &mut inboxes[index];
        let generation = inbox.generation;
        *inbox = Inbox {
            generation,
            ..Inbox::default()
        };
        self.free.borrow_mut().push(index as u32);
    }

    /// One completion of ours, from inside the driver's completion
    /// processing: bytes to their inbox (or, for an inbox whose owner is
    /// gone, nowhere), the buffer back to the kernel, the owner woken.
    fn complete(&self, cqe: &cqueue::Entry, queue: &mut Queue<'_>) {
        if cqe.user_data() == CANCEL_USER_DATA {
            return;
        }
        let index = cqe.user_data() as u32 as usize;
        let generation = ((cqe.user_data() & !USER_DATA_BIT) >> 32) as u32;
        let (result, flags) = (cqe.result(), cqe.flags());
        let buffer = cqueue::buffer_select(flags).filter(|&bid| bid < BUFFERS);
        let mut inboxes = self.inboxes.borrow_mut();
        let Some(inbox) = inboxes
            .get_mut(index)
            .filter(|i| i.in_use && i.generation == generation)
        else {
            // Not ours any more (an inbox is freed only after its
            // receive's last completion, so not expected): give the
            // buffer back.
            if let Some(bid) = buffer {
                self.buffers.push(bid);
                self.buffers.publish();
            }
            return;
        };
        if result > 0 && buffer.is_none() && !inbox.orphan {
            // Bytes without a buffer of ours: nothing to take them from.
            debug_assert!(false, "a receive's bytes without a buffer");
            inbox.end = Some(End::Failed(libc::EIO));
        }
        if let Some(bid) = buffer {
            if result > 0 && !inbox.orphan {
                let len = (result as usize).min(BUFFER_BYTES);
                // SAFETY: the kernel wrote `len` <= BUFFER_BYTES bytes into
                // buffer `bid`, which is ours until pushed back below.
                let bytes = unsafe { std::slice::from_raw_parts(self.buffers.buffer(bid), len) };
                // Exactly what waits: at most the limit plus one buffer.
                inbox.data.reserve_exact(len);
                inbox.data.extend_from_slice(bytes);
            }
            self.buffers.push(bid);
            self.buffers.publish();
        }
        // A burst (a full buffer, or bytes left in the socket), or no buffer
        // free: `take` reads on straight from the socket. (Queueing again
        // after no buffer would mostly meet none again while the burst that
        // took them all is being taken.)
        inbox.more = result == -libc::ENOBUFS
            || (result > 0 && (result as usize >= BUFFER_BYTES || cqueue::sock_nonempty(flags)));
        match result {
            0 => inbox.end = Some(End::Eof),
            r if r == -libc::ENOBUFS => self.starved.set(self.starved.get() + 1),
            // Cancelled (a park), or interrupted in the kernel's workers
            // while it was being cancelled: the socket is as it was.
            r if r == -libc::ECANCELED || r == -libc::EINTR || r == -libc::EAGAIN => {}
            r if r < 0 => inbox.end = Some(End::Failed(-r)),
            _ => {}
        }
        // Each receive takes one buffer and ends; a cancel still waiting to
        // be queued would now reach the next one.
        inbox.armed = false;
        self.armed.set(self.armed.get() - 1);
        self.cancels.borrow_mut().retain(|&i| i as usize != index);
        if inbox.orphan {
            drop(inboxes);
            self.free_inbox(index);
            return;
        }
        let cancelled = std::mem::take(&mut inbox.cancelling);
        if result > 0 && inbox.end.is_none() && !cancelled && !inbox.more && inbox.data.len() < INBOX_LIMIT_BYTES {
            // Room left: the next receive, with the runtime's next
            // submission. (Out of buffers, or the queue full: `take` arms
            // it again.)
            // SAFETY: the entry points to no memory but the registered
            // buffers, which are never freed.
            if unsafe { queue.push(&Self::receive_entry(index, inbox)) } {
                inbox.armed = true;
                self.armed.set(self.armed.get() + 1);
            }
        }
        if let Some(waker) = inbox.waker.take() {
            waker.wake();
        }
    }

    /// Ready when bytes wait in `token`'s inbox, or its receive has ended
    /// (by itself, cancelled or not) and `take` has something to do.
    pub fn poll_input(&self, token: Token, cx: &mut Context<'_>) -> Poll<()> {
        let mut inboxes = self.inboxes.borrow_mut();
        let inbox = &mut inboxes[token.index()];
        if !inbox.data.is_empty() || inbox.end.is_some() || !inbox.armed {
            return Poll::Ready(());
        }
        match &inbox.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inbox.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Appends what waits in `token`'s inbox to `buf`, at most `max` bytes,
    /// as `Socket::recv_into` reads: `Ok(Some(n))` with n > 0, `Ok(None)`
    /// when nothing waits, end of stream as `UnexpectedEof`. A receive that
    /// ended by itself, or was cancelled for a full inbox, is armed again
    /// once the inbox is below its limit.
    pub fn take(&self, token: Token, fd: BorrowedFd<'_>, buf: &mut Vec<u8>, max: usize) -> io::Result<Option<usize>> {
        self.retry_cancels();
        let (n, end, rearm) = {
            let mut inboxes = self.inboxes.borrow_mut();
            let inbox = &mut inboxes[token.index()];
            let n = inbox.data.len().min(max);
            if n == inbox.data.len() && buf.is_empty() && buf.capacity() < n {
                // The whole inbox, into an empty buffer too small for it:
                // hand it over rather than copy it.
                std::mem::swap(buf, &mut inbox.data);
            } else {
                buf.extend_from_slice(&inbox.data[..n]);
                inbox.data.drain(..n);
            }
            if inbox.data.is_empty() {
                inbox.data = Vec::new();
            }
            let rearm = !inbox.armed && inbox.end.is_none() && inbox.data.len() < INBOX_LIMIT_BYTES;
            (n, inbox.end, rearm)
        };
        let mut end = end;
        let mut n = n;
        if rearm && n < max && std::mem::take(&mut self.inboxes.borrow_mut()[token.index()].more) {
            // A burst (a large message): the rest is read from the socket
            // at once, as much as the caller takes, rather than a buffer a
            // turn. No receive is in flight, so nothing overtakes it.
            match super::socket::Socket::from_fd(fd).recv_into(buf, (max - n).min(DIRECT_READ_BYTES)) {
                Ok(Some(more)) => n += more,
                Ok(None) => {}
                Err(e) => {
                    let ended = match e.kind() {
                        io::ErrorKind::UnexpectedEof => End::Eof,
                        _ => End::Failed(e.raw_os_error().unwrap_or(libc::EIO)),
                    };
                    self.inboxes.borrow_mut()[token.index()].end = Some(ended);
                    end = Some(ended);
                }
            }
        }
        let rearm = rearm && end.is_none();
        if rearm {
            if let Err(e) = self.submit_receive(token, fd.as_raw_fd()) {
                // Reported after the bytes taken now.
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                self.inboxes.borrow_mut()[token.index()].end = Some(End::Failed(errno));
                end = Some(End::Failed(errno));
            }
        }
        if n > 0 {
            return Ok(Some(n));
        }
        match end {
            Some(End::Eof) => Err(io::ErrorKind::UnexpectedEof.into()),
            Some(End::Failed(errno)) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(None),
        }
    }

    /// Ends `token`'s receive. `Poll::Ready` once it has ended: the inbox
    /// then holds everything it will get.
    pub fn poll_stopped(&self, token: Token, cx: &mut Context<'_>) -> Poll<()> {
        if !self.inboxes.borrow()[token.index()].armed {
            return Poll::Ready(());
        }
        self.cancel(token);
        // Looked at again with the waker stored: queueing the cancel may
        // have run the driver, and the receive's end with it.
        let mut inboxes = self.inboxes.borrow_mut();
        let inbox = &mut inboxes[token.index()];
        if !inbox.armed {
            return Poll::Ready(());
        }
        if inbox.cancelling {
            inbox.waker = Some(cx.waker().clone());
        } else {
            // The cancel could not be queued (the submission queue full and
            // the kernel refusing more): no completion is coming to wake
            // us, so the next turn tries again.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Bytes wait in `token`'s inbox, or its end (of stream, or an error)
    /// is there to report.
    pub fn has_input_or_end(&self, token: Token) -> bool {
        let inboxes = self.inboxes.borrow();
        let inbox = &inboxes[token.index()];
        !inbox.data.is_empty() || inbox.end.is_some()
    }

    /// Gives `token`'s inbox up: now if its receive has ended, else at the
    /// receive's last completion (it is cancelled; what it still gets is
    /// dropped). The socket may be closed right after through the runtime
    /// (monoio's close is an entry on the same ring, queued behind the
    /// receive and its cancel, and the kernel takes entries in order, so
    /// the receive holds the old socket's file until it ends). A `close(2)`
    /// of its own would not be safe: a receive queued this turn looks its
    /// descriptor up only at the next submission, and might find another
    /// socket under the same number.
    pub fn release(&self, token: Token) {
        self.retry_cancels();
        let armed = {
            let mut inboxes = self.inboxes.borrow_mut();
            let inbox = &mut inboxes[token.index()];
            inbox.data = Vec::new();
            inbox.waker = None;
            inbox.orphan = true;
            inbox.armed
        };
        if armed {
            self.cancel(token);
        } else {
            self.free_inbox(token.index());
        }
    }

    /// Sockets with a receive in flight.
    pub fn armed(&self) -> usize {
        self.armed.get()
    }

    /// Receives so far that found no buffer free.
    pub fn starved(&self) -> u64 {
        self.starved.get()
    }
}

impl Drop for RecvRing {
    fn drop(&mut self) {
        uring_ext::set_handler(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn on_uring(test: impl std::future::Future<Output = ()>) {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime");
        rt.block_on(test);
    }

    /// A connected pair: the server side (non-blocking) and the client.
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (server, client)
    }

    async fn turn() {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }

    fn take_all(ring: &RecvRing, token: Token, fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        while ring.take(token, fd, &mut got, usize::MAX)?.is_some() {}
        Ok(got)
    }

    #[test]
    fn bytes_arrive_in_order_then_end_of_stream() {
        on_uring(async {
            let ring = RecvRing::new().unwrap();
            let (server, mut client) = pair();
            let token = ring.arm(server.as_fd()).unwrap();
            let sent: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
            client.write_all(&sent).unwrap();
            drop(client);
            let mut got = Vec::new();
            for _ in 0..100 {
                turn().await;
                match ring.take(token, server.as_fd(), &mut got, usize::MAX) {
                    Ok(_) => {}
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                        break;
                    }
                }
            }
            assert_eq!(got, sent);
            ring.release(token);
            assert_eq!(ring.armed(), 0);
        });
    }

    /// An inbox nobody takes from stops at its limit, plus one buffer
    /// (16 MiB sent at it):
    /// no receive is queued past it, and TCP holds the rest back; taking
    /// queues one again.
    #[test]
    fn an_inbox_not_taken_from_stops_at_its_limit() {
        on_uring(async {
            let ring = RecvRing::new().unwrap();
            let (server, client) = pair();
            let token = ring.arm(server.as_fd()).unwrap();
            let total = 16 * 1024 * 1024;
            let writer = std::thread::spawn(move || {
                let mut client = client;
                client.write_all(&vec![7u8; total]).unwrap();
                client
            });
            for _ in 0..50 {
                turn().await;
            }
            let held = ring.inboxes.borrow()[token.index()].data.len();
            assert!(held >= INBOX_LIMIT_BYTES, "held {held}");
            assert!(held < INBOX_LIMIT_BYTES + BUFFER_BYTES, "held {held}");
            let capacity = ring.inboxes.borrow()[token.index()].data.capacity();
            assert!(capacity < INBOX_LIMIT_BYTES + BUFFER_BYTES, "capacity {capacity}");
            assert_eq!(ring.armed(), 0, "no receive past the limit");
            // Taking arms it again; the rest arrives.
            let mut got = take_all(&ring, token, server.as_fd()).unwrap().len();
            assert_eq!(ring.armed(), 1);
            // A reader woken by each arrival, as a session's task is.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while got < total && std::time::Instant::now() < deadline {
                std::future::poll_fn(|cx| ring.poll_input(token, cx)).await;
                got += take_all(&ring, token, server.as_fd()).unwrap().len();
            }
            assert_eq!(got, total);
            let _client = writer.join().unwrap();
            ring.release(token);
            turn().await;
            assert_eq!(ring.armed(), 0, "a released receive ends");
        });
    }

    /// A receive given up while armed ends, and its inbox is used again
    /// by the next socket; a late completion for the old one (a no-op
    /// entry with its user_data, which would otherwise read as an end of
    /// stream) does not reach the new one.
    #[test]
    fn a_released_inbox_is_freed_and_used_again() {
        on_uring(async {
            let ring = RecvRing::new().unwrap();
            let (server, mut client) = pair();
            let first = ring.arm(server.as_fd()).unwrap();
            let old_generation = ring.inboxes.borrow()[first.index()].generation;
            ring.release(first);
            client.write_all(b"late").unwrap();
            turn().await;
            assert_eq!(ring.armed(), 0);
            let (server2, mut client2) = pair();
            let second = ring.arm(server2.as_fd()).unwrap();
            assert_eq!(second.index(), first.index(), "the freed inbox is used again");
            let late = opcode::Nop::new()
                .build()
                .user_data(user_data(first.index(), old_generation));
            // SAFETY: a no-op points to no memory.
            unsafe { uring_ext::push(&late).unwrap() };
            turn().await;
            assert_eq!(ring.armed(), 1, "the new receive is still in flight");
            assert!(!ring.has_input_or_end(second), "nothing reached the new inbox");
            client2.write_all(b"fresh").unwrap();
            turn().await;
            assert_eq!(take_all(&ring, second, server2.as_fd()).unwrap(), b"fresh");
            ring.release(second);
            drop((server, server2));
        });
    }

    /// More sockets with bytes waiting than the ring has buffers: the
    /// receives that found none end with ENOBUFS, `take` reads those
    /// sockets directly and queues their receives again; every socket gets
    /// all its bytes, in order.
    #[test]
    fn more_sockets_than_buffers_all_get_their_bytes() {
        on_uring(async {
            let ring = RecvRing::new().unwrap();
            let sockets = usize::from(BUFFERS) + 476;
            let message = |i: usize| -> Vec<u8> { (0..3000).map(|j| (i * 7 + j) as u8).collect() };
            let mut armed = Vec::new();
            for i in 0..sockets {
                let (server, mut client) = pair();
                let token = ring.arm(server.as_fd()).unwrap();
                client.write_all(&message(i)).unwrap();
                armed.push((server, client, token, Vec::new()));
            }
            assert_eq!(ring.armed(), sockets);
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while armed.iter().any(|(_, _, _, got)| got.len() < 3000) {
                assert!(std::time::Instant::now() < deadline, "bytes missing");
                turn().await;
                for (server, _, token, got) in &mut armed {
                    got.extend(take_all(&ring, *token, server.as_fd()).unwrap_or_else(|e| panic!("{e}")));
                }
            }
            assert!(ring.starved() > 0, "no receive ran out of buffers");
            for (i, (server, _client, token, got)) in armed.into_iter().enumerate() {
                assert_eq!(got, message(i), "socket {i}");
                ring.release(token);
                drop(server);
            }
        });
    }
}
