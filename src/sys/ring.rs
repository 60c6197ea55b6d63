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
//!   processes completions after its wait: the inbox keeps the buffer
//!   until its task takes the bytes (`take` copies them out once and gives
//!   the buffer back), the next receive is queued while the inbox holds
//!   less than a buffer (`INBOX_LIMIT_BYTES`), and the socket's task is
//!   woken. Bytes that arrive while the inbox already holds some, or while
//!   the core's inboxes hold half the ring (`HELD_LIMIT`), are copied into
//!   the inbox's `Vec` (unallocated between arrivals) and their buffer
//!   goes back at once: sessions that stop reading never hold more than
//!   half the buffers. Entries go to the kernel with the runtime's next
//!   submission: no system call of their own.
//! - A receive queued after the socket was read dry asks the kernel to
//!   wait for bytes before it reads (`IORING_RECVSEND_POLL_FIRST`), rather
//!   than try a read that finds nothing first.
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
/// Buffers the core's inboxes may hold at once; past it, a receive's
/// bytes are copied out and its buffer given back at once, so sessions
/// that do not read never take more than half the ring.
const HELD_LIMIT: u16 = BUFFERS / 2;
/// user_data of the cancel requests, whose completions are ignored (no
/// inbox has this index).
const CANCEL_USER_DATA: u64 = USER_DATA_BIT | u32::MAX as u64;

/// What a receive about to be queued knows of its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Empty {
    /// The socket was just read dry: the bytes the receive waits for are
    /// still to come.
    Likely,
    /// Bytes may be there already (a first receive, or one after a read
    /// that stopped at its size).
    Unknown,
}

/// `IORING_RECVSEND_POLL_FIRST` on a receive (kernel 5.19+, as buffer
/// rings): the kernel waits for the socket to turn readable before it
/// tries to read, instead of a read that finds nothing and then the
/// wait. For a socket just read dry that first read is wasted work: with
/// it skipped, server CPU per message at a fixed 50,000 msg/s fell by
/// 4% (docs/ARCHITECTURE.md, "Reads and writes under io_uring").
fn poll_first(mut entry: squeue::Entry) -> squeue::Entry {
    // SAFETY: `squeue::Entry` is `repr(C)` around the kernel's 64-byte
    // `struct io_uring_sqe`, whose `ioprio` (u16) sits at byte 2 (checked
    // by `poll_first_sets_ioprio`); io-uring 0.6 has no setter for it on
    // a receive.
    let sqe = unsafe { &mut *(&mut entry as *mut squeue::Entry).cast::<[u8; 64]>() };
    sqe[2..4].copy_from_slice(&IORING_RECVSEND_POLL_FIRST.to_ne_bytes());
    entry
}

/// The kernel's flag (include/uapi/linux/io_uring.h).
const IORING_RECVSEND_POLL_FIRST: u16 = 1;
const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);

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

/// Generations count in 30 bits: the two above them in a user_data are
/// our mark and `SEND_BIT`.
const GENERATION_MASK: u32 = 0x3fff_ffff;
/// Set in the user_data of a send (and its cancel's target).
const SEND_BIT: u64 = 1 << 62;

/// The user_data of a receive for inbox `index` in its `generation` under
/// our mark (the top bit). A completion for an inbox since freed and used
/// again does not match its generation.
fn user_data(index: usize, generation: u32) -> u64 {
    USER_DATA_BIT | (u64::from(generation & GENERATION_MASK) << 32) | index as u64
}

/// The user_data of a send on inbox `index`'s socket.
fn send_user_data(index: usize, generation: u32) -> u64 {
    user_data(index, generation) | SEND_BIT
}

/// How a socket's receive ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// End of stream: the peer closed its side.
    Eof,
    /// The socket failed (the errno).
    Failed(i32),
}

struct Inbox {
    /// The socket received from.
    fd: RawFd,
    generation: u32,
    in_use: bool,
    /// A receive is in flight (until its last completion).
    armed: bool,
    /// A cancel of the receive is on its way.
    cancelling: bool,
    /// Its owner is gone: the inbox is freed at the last completion of its
    /// receive and its send.
    orphan: bool,
    /// A send is in flight (until its completion).
    sending: bool,
    /// A cancel of the send is on its way.
    send_cancelling: bool,
    /// How the last send ended: bytes sent (>= 0) or an errno (< 0);
    /// `i32::MIN` while none has ended since the last `take_sent`.
    sent: i32,
    /// The bytes of the send in flight, or of the last one until
    /// `take_sent`: the kernel reads them until the send's completion.
    out: Vec<u8>,
    /// The first bytes received and not yet taken, still in the ring's
    /// buffer they came in (no copy until `take`).
    held: Option<Held>,
    /// Bytes received and not yet taken, after `held`'s.
    data: Vec<u8>,
    /// The last receive left bytes in the socket (or filled its buffer):
    /// `take` reads them straight from the socket, no receive being in
    /// flight then.
    more: bool,
    end: Option<End>,
    waker: Option<Waker>,
}

impl Default for Inbox {
    fn default() -> Inbox {
        Inbox {
            fd: -1,
            generation: 0,
            in_use: false,
            armed: false,
            cancelling: false,
            orphan: false,
            sending: false,
            send_cancelling: false,
            sent: i32::MIN,
            out: Vec::new(),
            held: None,
            data: Vec::new(),
            more: false,
            end: None,
            waker: None,
        }
    }
}

/// A buffer of the ring kept by an inbox: bytes `start..end` are not yet
/// taken.
#[derive(Debug, Clone, Copy)]
struct Held {
    bid: u16,
    start: u16,
    end: u16,
}

impl Inbox {
    /// Bytes received and not yet taken.
    fn pending(&self) -> usize {
        self.held.map_or(0, |h| usize::from(h.end - h.start)) + self.data.len()
    }

    /// Keeps `cx`'s waker, to be woken by the next completion (kept as it
    /// is when it would wake the same task).
    fn wake_later(&mut self, cx: &Context<'_>) {
        match &self.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.waker = Some(cx.waker().clone()),
        }
    }
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
    /// One entry per socket armed, from index 0 up: a new socket takes the
    /// lowest free index, and free entries at the end are dropped, so the
    /// table is as long as the highest index in use (quiet sessions park
    /// and give theirs up).
    inboxes: RefCell<Vec<Inbox>>,
    free: RefCell<std::collections::BTreeSet<u32>>,
    /// The generation of the last inbox armed: each arm takes the next, so
    /// no index, even one dropped from the table and made again, sees a
    /// generation again before 2^30 arms.
    generation: Cell<u32>,
    /// Inboxes whose cancel (of their receive, or with `true` of their
    /// send) could not be queued, tried again by the next call.
    cancels: RefCell<Vec<(u32, bool)>>,
    /// Sockets with a receive in flight.
    armed: Cell<usize>,
    /// Sockets with a send in flight.
    sending: Cell<usize>,
    /// Receives that found every buffer taken (ENOBUFS): `take` reads on
    /// from the socket, then queues them again.
    starved: Cell<u64>,
    /// Buffers held by inboxes (at most `HELD_LIMIT`).
    held: Cell<u16>,
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
            free: RefCell::new(std::collections::BTreeSet::new()),
            generation: Cell::new(0),
            cancels: RefCell::new(Vec::new()),
            armed: Cell::new(0),
            sending: Cell::new(0),
            starved: Cell::new(0),
            held: Cell::new(0),
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
            let index = match self.free.borrow_mut().pop_first() {
                Some(index) => index,
                // u32::MAX is the cancels' mark.
                None if inboxes.len() < u32::MAX as usize - 2 => {
                    inboxes.push(Inbox::default());
                    (inboxes.len() - 1) as u32
                }
                None => return Err(io::ErrorKind::OutOfMemory.into()),
            };
            let inbox = &mut inboxes[index as usize];
            self.generation
                .set(self.generation.get().wrapping_add(1) & GENERATION_MASK);
            inbox.generation = self.generation.get();
            inbox.in_use = true;
            Token::new(index as usize)
        };
        if let Err(e) = self.submit_receive(token, fd.as_raw_fd(), Empty::Unknown) {
            self.free_inbox(token.index());
            return Err(e);
        }
        Ok(token)
    }

    /// A receive of at most one buffer into inbox `index`.
    fn receive_entry(index: usize, inbox: &Inbox, empty: Empty) -> squeue::Entry {
        let entry = opcode::Recv::new(types::Fd(inbox.fd), std::ptr::null_mut(), BUFFER_BYTES as u32)
            .buf_group(GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data(index, inbox.generation));
        match empty {
            Empty::Likely => poll_first(entry),
            Empty::Unknown => entry,
        }
    }

    fn submit_receive(&self, token: Token, fd: RawFd, empty: Empty) -> io::Result<()> {
        let entry = {
            let mut inboxes = self.inboxes.borrow_mut();
            let inbox = &mut inboxes[token.index()];
            inbox.fd = fd;
            Self::receive_entry(token.index(), inbox, empty)
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

    fn cancel_entry(target: u64) -> squeue::Entry {
        opcode::AsyncCancel::new(target).build().user_data(CANCEL_USER_DATA)
    }

    /// Lists inbox `index`'s cancel (of its send, with `send`) to be
    /// tried again by the next call.
    fn cancel_later(&self, index: usize, send: bool) {
        let mut cancels = self.cancels.borrow_mut();
        if !cancels.contains(&(index as u32, send)) {
            cancels.push((index as u32, send));
        }
    }

    /// Asks the kernel to end `token`'s receive, once.
    fn cancel(&self, token: Token) {
        self.cancel_one(token.index(), false);
    }

    /// Asks the kernel to end `token`'s send, once. Its completion then
    /// says how much of it went out.
    pub fn cancel_send(&self, token: Token) {
        self.cancel_one(token.index(), true);
    }

    /// Cancels inbox `index`'s receive (or, with `send`, its send) if it
    /// is in flight. The entry is looked up, never indexed: queueing an
    /// entry may run completions (a full queue is submitted, and a busy
    /// kernel's completions taken), which may free an orphan's entry and
    /// drop it from the table.
    fn cancel_one(&self, index: usize, send: bool) {
        let generation = {
            let mut inboxes = self.inboxes.borrow_mut();
            let Some(inbox) = inboxes.get_mut(index).filter(|i| i.in_use) else {
                return;
            };
            let (in_flight, cancelling) = if send {
                (inbox.sending, &mut inbox.send_cancelling)
            } else {
                (inbox.armed, &mut inbox.cancelling)
            };
            if !in_flight || *cancelling {
                return;
            }
            *cancelling = true;
            inbox.generation
        };
        let target = if send {
            send_user_data(index, generation)
        } else {
            user_data(index, generation)
        };
        // SAFETY: a cancel points to no memory.
        if let Err(e) = unsafe { uring_ext::push(&Self::cancel_entry(target)) } {
            // It goes on; the next call tries again, if it still does.
            let mut inboxes = self.inboxes.borrow_mut();
            let Some(inbox) = inboxes
                .get_mut(index)
                .filter(|i| i.in_use && i.generation == generation)
            else {
                return;
            };
            if send {
                inbox.send_cancelling = false;
            } else {
                inbox.cancelling = false;
            }
            drop(inboxes);
            self.cancel_later(index, send);
            tracing::debug!(error = %e, send, "cannot queue a cancel");
        }
    }

    /// Queues the cancels that could not be queued before.
    fn retry_cancels(&self) {
        if self.cancels.borrow().is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut *self.cancels.borrow_mut());
        for (index, send) in waiting {
            let inboxes = self.inboxes.borrow();
            let Some(inbox) = inboxes.get(index as usize).filter(|i| i.in_use) else {
                continue;
            };
            let (receive, sending) = (
                inbox.armed && !inbox.cancelling,
                inbox.sending && !inbox.send_cancelling,
            );
            drop(inboxes);
            match send {
                false if receive => self.cancel(Token::new(index as usize)),
                true if sending => self.cancel_send(Token::new(index as usize)),
                _ => {}
            }
        }
    }

    /// Gives the buffer `inbox` holds, if any, back to the kernel.
    fn give_back(&self, inbox: &mut Inbox) {
        if let Some(held) = inbox.held.take() {
            self.buffers.push(held.bid);
            self.buffers.publish();
            self.held.set(self.held.get() - 1);
        }
    }

    fn free_inbox(&self, index: usize) {
        let mut inboxes = self.inboxes.borrow_mut();
        let inbox = &mut inboxes[index];
        self.give_back(inbox);
        *inbox = Inbox::default();
        let mut free = self.free.borrow_mut();
        free.insert(index as u32);
        // Free entries at the end go, and with them the memory of a table
        // that was long (its entries have no completion to come: an inbox
        // is freed after its last one).
        while free.last().is_some_and(|&last| last as usize + 1 == inboxes.len()) {
            free.pop_last();
            inboxes.pop();
        }
        if inboxes.capacity() > 64 && inboxes.len() < inboxes.capacity() / 4 {
            let keep = (inboxes.len() * 2).max(64);
            inboxes.shrink_to(keep);
        }
    }

    /// Entries in the table of inboxes (in use or free).
    pub fn inbox_entries(&self) -> usize {
        self.inboxes.borrow().len()
    }

    /// One completion of ours, from inside the driver's completion
    /// processing: the bytes kept in their buffer for the inbox (or copied
    /// into it, the buffer going back to the kernel; or, for an inbox
    /// whose owner is gone, dropped), the owner woken.
    fn complete(&self, cqe: &cqueue::Entry, queue: &mut Queue<'_>) {
        if cqe.user_data() == CANCEL_USER_DATA {
            return;
        }
        let index = cqe.user_data() as u32 as usize;
        let generation = ((cqe.user_data() >> 32) as u32) & GENERATION_MASK;
        if cqe.user_data() & SEND_BIT != 0 {
            self.complete_send(index, generation, cqe.result());
            return;
        }
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
            let len = if result > 0 && !inbox.orphan {
                (result as usize).min(BUFFER_BYTES)
            } else {
                0
            };
            if len > 0 && inbox.pending() == 0 && self.held.get() < HELD_LIMIT {
                // The usual case, a session that takes its bytes this turn:
                // they stay where the kernel put them until `take` copies
                // them to the caller, once.
                inbox.held = Some(Held {
                    bid,
                    start: 0,
                    end: len as u16,
                });
                self.held.set(self.held.get() + 1);
            } else {
                if len > 0 {
                    // SAFETY: the kernel wrote `len` <= BUFFER_BYTES bytes
                    // into buffer `bid`, which is ours until pushed back
                    // below.
                    let bytes = unsafe { std::slice::from_raw_parts(self.buffers.buffer(bid), len) };
                    // Exactly what waits: at most the limit plus one buffer.
                    inbox.data.reserve_exact(len);
                    inbox.data.extend_from_slice(bytes);
                }
                self.buffers.push(bid);
                self.buffers.publish();
            }
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
        self.cancels
            .borrow_mut()
            .retain(|&(i, send)| send || i as usize != index);
        if inbox.orphan {
            if !inbox.sending {
                drop(inboxes);
                self.free_inbox(index);
            }
            return;
        }
        let cancelled = std::mem::take(&mut inbox.cancelling);
        if result > 0 && inbox.end.is_none() && !cancelled && !inbox.more && inbox.pending() < INBOX_LIMIT_BYTES {
            // Room left: the next receive, with the runtime's next
            // submission. (Out of buffers, or the queue full: `take` arms
            // it again.)
            // SAFETY: the entry points to no memory but the registered
            // buffers, which are never freed.
            // The receive just ended without `IORING_CQE_F_SOCK_NONEMPTY`
            // (not `more`): the socket was read dry.
            if unsafe { queue.push(&Self::receive_entry(index, inbox, Empty::Likely)) } {
                inbox.armed = true;
                self.armed.set(self.armed.get() + 1);
            }
        }
        if let Some(waker) = inbox.waker.take() {
            waker.wake();
        }
    }

    /// A send's completion: how it ended is kept for `take_sent`, its task
    /// woken; an orphan's bytes are dropped and the inbox freed once its
    /// receive has ended too.
    fn complete_send(&self, index: usize, generation: u32, result: i32) {
        let mut inboxes = self.inboxes.borrow_mut();
        let Some(inbox) = inboxes
            .get_mut(index)
            .filter(|i| i.in_use && i.generation == generation && i.sending)
        else {
            return;
        };
        inbox.sending = false;
        inbox.send_cancelling = false;
        self.sending.set(self.sending.get() - 1);
        self.cancels
            .borrow_mut()
            .retain(|&(i, send)| !send || i as usize != index);
        if inbox.orphan {
            inbox.out = Vec::new();
            if !inbox.armed {
                drop(inboxes);
                self.free_inbox(index);
            }
            return;
        }
        inbox.sent = result;
        if let Some(waker) = inbox.waker.take() {
            waker.wake();
        }
    }

    /// Sends `bytes[from..]` on `token`'s socket (`fd`, the one it was armed
    /// with), with the runtime's next submission: one system call carries
    /// every send a turn of the loop queued. At most one send is in flight
    /// per socket; wait for it (`poll_sent`) and take its end
    /// (`take_sent`) before the next. The bytes stay here, where the
    /// kernel reads them, until then (and for ever if the ring is dropped
    /// first). On an error the bytes are handed back, unsent.
    pub fn send(
        &self,
        token: Token,
        fd: BorrowedFd<'_>,
        bytes: Vec<u8>,
        from: usize,
    ) -> Result<(), (io::Error, Vec<u8>)> {
        self.retry_cancels();
        let entry = {
            let mut inboxes = self.inboxes.borrow_mut();
            let inbox = &mut inboxes[token.index()];
            if inbox.sending || inbox.sent != i32::MIN || !inbox.out.is_empty() || from >= bytes.len() {
                return Err((io::Error::other("a send already in flight, or nothing to send"), bytes));
            }
            inbox.out = bytes;
            // A send of more than u32::MAX bytes ends short, as a socket's
            // write may: the caller sends the rest.
            let len = (inbox.out.len() - from).min(u32::MAX as usize) as u32;
            let start = inbox.out[from..].as_ptr();
            opcode::Send::new(types::Fd(fd.as_raw_fd()), start, len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(send_user_data(token.index(), inbox.generation))
        };
        // SAFETY: the entry points into `out`'s heap buffer, which does not
        // move when the table of inboxes grows, and is neither changed nor
        // freed until the send's completion: `take_sent` refuses while it
        // is in flight, and an inbox is freed only after it.
        if let Err(e) = unsafe { uring_ext::push(&entry) } {
            let bytes = std::mem::take(&mut self.inboxes.borrow_mut()[token.index()].out);
            return Err((e, bytes));
        }
        let mut inboxes = self.inboxes.borrow_mut();
        inboxes[token.index()].sending = true;
        self.sending.set(self.sending.get() + 1);
        Ok(())
    }

    /// Ready once `token`'s send, if any, has ended.
    pub fn poll_sent(&self, token: Token, cx: &mut Context<'_>) -> Poll<()> {
        let mut inboxes = self.inboxes.borrow_mut();
        let inbox = &mut inboxes[token.index()];
        if !inbox.sending {
            return Poll::Ready(());
        }
        inbox.wake_later(cx);
        Poll::Pending
    }

    /// Ends `token`'s send. `Poll::Ready` once it has ended (by itself or
    /// cancelled); `take_sent` then says how much went out.
    pub fn poll_send_stopped(&self, token: Token, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_ended(token, true, cx)
    }

    /// The end of `token`'s last send: its bytes back, and how many went
    /// out (a cancelled send may end short, or with none) or its error.
    /// Refused while the send is in flight.
    pub fn take_sent(&self, token: Token) -> (Vec<u8>, io::Result<usize>) {
        let mut inboxes = self.inboxes.borrow_mut();
        let inbox = &mut inboxes[token.index()];
        if inbox.sending {
            return (Vec::new(), Err(io::Error::other("the send is in flight")));
        }
        let bytes = std::mem::take(&mut inbox.out);
        let result = match std::mem::replace(&mut inbox.sent, i32::MIN) {
            i32::MIN => Ok(0),
            n if n >= 0 => Ok(n as usize),
            // Cancelled before any byte went, or interrupted: nothing sent.
            e if e == -libc::ECANCELED || e == -libc::EINTR || e == -libc::EAGAIN => Ok(0),
            e => Err(io::Error::from_raw_os_error(-e)),
        };
        (bytes, result)
    }

    /// Ready when bytes wait in `token`'s inbox, or its receive has ended
    /// (by itself, cancelled or not) and `take` has something to do.
    pub fn poll_input(&self, token: Token, cx: &mut Context<'_>) -> Poll<()> {
        let mut inboxes = self.inboxes.borrow_mut();
        let inbox = &mut inboxes[token.index()];
        if inbox.pending() > 0 || inbox.end.is_some() || !inbox.armed {
            return Poll::Ready(());
        }
        inbox.wake_later(cx);
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
            let mut n = 0;
            if let Some(held) = &mut inbox.held {
                n = usize::from(held.end - held.start).min(max);
                // SAFETY: buffer `bid` is ours while the inbox holds it (the
                // kernel has it back only after `give_back`); the kernel
                // wrote its bytes up to `end` <= BUFFER_BYTES.
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.buffers.buffer(held.bid).add(usize::from(held.start)), n)
                };
                buf.extend_from_slice(bytes);
                held.start += n as u16;
                if held.start == held.end {
                    self.give_back(inbox);
                }
            }
            let more = inbox.data.len().min(max - n);
            if n == 0 && more == inbox.data.len() && buf.is_empty() && buf.capacity() < more {
                // The whole inbox, into an empty buffer too small for it:
                // hand it over rather than copy it.
                std::mem::swap(buf, &mut inbox.data);
            } else {
                buf.extend_from_slice(&inbox.data[..more]);
                inbox.data.drain(..more);
            }
            n += more;
            if inbox.data.is_empty() {
                inbox.data = Vec::new();
            }
            let rearm = !inbox.armed && inbox.end.is_none() && inbox.pending() < INBOX_LIMIT_BYTES;
            (n, inbox.end, rearm)
        };
        let mut end = end;
        let mut n = n;
        // A receive that ended at the inbox's limit or was cancelled may
        // have left bytes in the socket.
        let mut empty = Empty::Unknown;
        if rearm && n < max && std::mem::take(&mut self.inboxes.borrow_mut()[token.index()].more) {
            // A burst (a large message): the rest is read from the socket
            // at once, as much as the caller takes, rather than a buffer a
            // turn. No receive is in flight, so nothing overtakes it.
            let asked = (max - n).min(DIRECT_READ_BYTES);
            match super::socket::Socket::from_fd(fd).recv_into(buf, asked) {
                Ok(Some(more)) => {
                    n += more;
                    if more < asked {
                        empty = Empty::Likely;
                    }
                }
                Ok(None) => empty = Empty::Likely,
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
            if let Err(e) = self.submit_receive(token, fd.as_raw_fd(), empty) {
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
        self.poll_ended(token, false, cx)
    }

    /// Cancels `token`'s receive (or, with `send`, its send) and is ready
    /// once it has ended.
    fn poll_ended(&self, token: Token, send: bool, cx: &mut Context<'_>) -> Poll<()> {
        let in_flight = |i: &Inbox| if send { i.sending } else { i.armed };
        if !in_flight(&self.inboxes.borrow()[token.index()]) {
            return Poll::Ready(());
        }
        if send {
            self.cancel_send(token);
        } else {
            self.cancel(token);
        }
        // Looked at again with the waker stored: queueing the cancel may
        // have run the driver, and the end with it.
        let mut inboxes = self.inboxes.borrow_mut();
        let inbox = &mut inboxes[token.index()];
        if !in_flight(inbox) {
            return Poll::Ready(());
        }
        if (send && inbox.send_cancelling) || (!send && inbox.cancelling) {
            inbox.wake_later(cx);
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
        inbox.pending() > 0 || inbox.end.is_some()
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
        let (armed, sending) = {
            let mut inboxes = self.inboxes.borrow_mut();
            let inbox = &mut inboxes[token.index()];
            self.give_back(inbox);
            inbox.data = Vec::new();
            inbox.waker = None;
            inbox.orphan = true;
            if !inbox.sending {
                inbox.out = Vec::new();
            }
            (inbox.armed, inbox.sending)
        };
        // Each cancel looks the entry up again: queueing the first may
        // have run completions that freed it.
        if armed {
            self.cancel(token);
        }
        if sending {
            self.cancel_send(token);
        }
        if !armed && !sending {
            self.free_inbox(token.index());
        }
    }

    /// Sockets with a send in flight.
    pub fn sending(&self) -> usize {
        self.sending.get()
    }

    /// Sockets with a receive in flight.
    pub fn armed(&self) -> usize {
        self.armed.get()
    }

    /// Buffers held by inboxes now.
    pub fn held(&self) -> u16 {
        self.held.get()
    }

    /// Receives so far that found no buffer free.
    pub fn starved(&self) -> u64 {
        self.starved.get()
    }
}

impl Drop for RecvRing {
    fn drop(&mut self) {
        uring_ext::set_handler(None);
        // A send still in flight (none is, as sessions wait for theirs,
        // but `release` allows it) may be read by the kernel until the
        // runtime's ring is torn down: its bytes are never freed, as the
        // receive buffers are not.
        for inbox in self.inboxes.get_mut().iter_mut().filter(|i| i.sending) {
            std::mem::forget(std::mem::take(&mut inbox.out));
        }
        debug_assert_eq!(self.sending.get(), 0, "a send in flight as the ring goes");
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

    /// A connected pair: the server side (non-blocking, as the epoll
    /// driver's sockets are; io_uring works on either) and the client.
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
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

    /// Every session reading holds an entry in the core's table of
    /// inboxes (the table shrinks as sessions park or end): its size is
    /// part of what a connection costs.
    #[test]
    fn an_inbox_entry_fits_its_budget() {
        let size = std::mem::size_of::<Inbox>();
        assert!(size <= 104, "an inbox entry is {size} bytes");
    }

    /// `poll_first` writes the kernel's `ioprio` field, where the kernel
    /// reads it: byte 0 is the opcode, bytes 2-3 ioprio, 4-7 the fd.
    #[test]
    fn poll_first_sets_ioprio() {
        let plain = opcode::Recv::new(types::Fd(0x0102_0304), std::ptr::null_mut(), 64).build();
        let mut entry = poll_first(plain.clone());
        // SAFETY: as in `poll_first`.
        let (before, after) = unsafe {
            (
                *(&plain as *const squeue::Entry).cast::<[u8; 64]>(),
                *(&mut entry as *mut squeue::Entry).cast::<[u8; 64]>(),
            )
        };
        assert_eq!(after[0], opcode::Recv::CODE);
        assert_eq!(after[4..8], 0x0102_0304i32.to_ne_bytes());
        assert_eq!(after[2..4], IORING_RECVSEND_POLL_FIRST.to_ne_bytes());
        assert_eq!(before[2..4], [0, 0]);
        assert_eq!(before[..2], after[..2]);
        assert_eq!(before[4..], after[4..]);
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
            let held = ring.inboxes.borrow()[token.index()].pending();
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

    /// Sends until every byte is out, as `Conn::send_on_ring` does: one
    /// send in flight, the rest sent again after a send that ended short.
    async fn send_all(ring: &RecvRing, token: Token, fd: BorrowedFd<'_>, mut bytes: Vec<u8>) {
        let mut from = 0;
        while from < bytes.len() {
            ring.send(token, fd, bytes, from).map_err(|(e, _)| e).unwrap();
            let (_, back) = ring
                .send(token, fd, vec![1], 0)
                .expect_err("one send in flight at most");
            assert_eq!(back, [1], "the refused bytes come back");
            std::future::poll_fn(|cx| ring.poll_sent(token, cx)).await;
            let (back, sent) = ring.take_sent(token);
            from += sent.unwrap();
            bytes = back;
        }
    }

    /// 8 MiB to a peer that reads slowly arrive whole and in order, over
    /// sends that end short on the full socket.
    #[test]
    fn sends_arrive_whole_and_in_order() {
        on_uring(async {
            let ring = RecvRing::new().unwrap();
            let (server, client) = pair();
            let token = ring.arm(server.as_fd()).unwrap();
            let sent: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
            let total = sent.len();
            let reader = std::thread::spawn(move || {
                let mut client = client;
                let mut got = Vec::new();
                let mut chunk = vec![0u8; 100_000];
                while got.len() < total {
                    let n = std::io::Read::read(&mut client, &mut chunk).unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&chunk[..n]);
                    std::thread::sleep(Duration::from_micros(200));
                }
                got
            });
            send_all(&ring, token, server.as_fd(), sent.clone()).await;
            assert_eq!(ring.sending(), 0);
            assert!(reader.join().unwrap() == sent, "bytes differ");
            ring.release(token);
        });
    }

    /// A send to a peer that never reads stays in flight; cancelling it
    /// ends it with what went out (the socket's buffers' worth), and the
    /// rest is the caller's again. A socket given up with a send in
    /// flight has it cancelled, and its inbox is used again once both its
    /// receive and its send have ended.
    #[test]
    fn a_stuck_send_is_cancelled_with_what_went_out() {
        on_uring(async {
            let ring = RecvRing::new().unwrap();
            let (server, _client) = pair();
            let token = ring.arm(server.as_fd()).unwrap();
            let total = 32 * 1024 * 1024;
            // The first send takes what the socket has room for and ends
            // short; the rest waits for room.
            ring.send(token, server.as_fd(), vec![3u8; total], 0)
                .map_err(|(e, _)| e)
                .unwrap();
            turn().await;
            let (rest, first) = ring.take_sent(token);
            let first = first.unwrap();
            assert!(first > 0 && first < total, "sent {first}");
            ring.send(token, server.as_fd(), rest, first)
                .map_err(|(e, _)| e)
                .unwrap();
            for _ in 0..5 {
                turn().await;
            }
            assert_eq!(ring.sending(), 1, "the send waits for room");
            assert!(ring.take_sent(token).1.is_err(), "refused while in flight");
            std::future::poll_fn(|cx| ring.poll_send_stopped(token, cx)).await;
            let (back, sent) = ring.take_sent(token);
            assert_eq!(back.len(), total, "the bytes come back whole, unmoved");
            assert_eq!(sent.unwrap(), 0, "nothing went out of the cancelled send");
            assert_eq!(ring.sending(), 0);

            // Given up mid-send: cancelled, then freed and used again.
            ring.send(token, server.as_fd(), vec![4u8; total], 0)
                .map_err(|(e, _)| e)
                .unwrap();
            turn().await;
            ring.release(token);
            turn().await;
            assert_eq!((ring.sending(), ring.armed()), (0, 0));
            let (server2, mut client2) = pair();
            let again = ring.arm(server2.as_fd()).unwrap();
            assert_eq!(again.index(), token.index(), "the freed inbox is used again");
            client2.write_all(b"next").unwrap();
            turn().await;
            assert_eq!(take_all(&ring, again, server2.as_fd()).unwrap(), b"next");
            ring.release(again);
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
            turn().await;
            assert_eq!(
                ring.held(),
                HELD_LIMIT,
                "bytes past the limit are copied, their buffers given back"
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while armed.iter().any(|(_, _, _, got)| got.len() < 3000) {
                assert!(std::time::Instant::now() < deadline, "bytes missing");
                turn().await;
                for (server, _, token, got) in &mut armed {
                    got.extend(take_all(&ring, *token, server.as_fd()).unwrap_or_else(|e| panic!("{e}")));
                }
            }
            assert!(ring.starved() > 0, "no receive ran out of buffers");
            assert_eq!(ring.held(), 0, "every buffer taken from went back");
            assert_eq!(ring.inbox_entries(), sockets, "one entry per socket armed");
            for (i, (server, _client, token, got)) in armed.into_iter().enumerate() {
                assert_eq!(got, message(i), "socket {i}");
                ring.release(token);
                drop(server);
            }
            turn().await;
            assert_eq!(ring.inbox_entries(), 0, "the table shrinks as its sockets go");
            assert!(ring.inboxes.borrow().capacity() <= 64, "and gives its memory back");
        });
    }
}
