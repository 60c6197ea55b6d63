//! Every pub/sub session's state on one core, and the core's delivery
//! budget: which topic table keys a session is in, the deliveries queued
//! for it, and its publishes that wait for ring space.
//!
//! Deliveries are shared frames (`Bytes`), queued as parts marked where
//! each message ends, and written by the connection layer with vectored
//! sends (`write`): this module keeps the queue and its accounting, the
//! caller owns the socket. It never calls into a connection: when a queue
//! turns non-empty (or its subscriber turns slow) it tells the layer above
//! through `Wake`, which wakes the session's task if one runs; otherwise it
//! lists the session as ready and wakes whoever waits for that
//! (`poll_ready`, the core's flusher), which writes to the socket itself.
//!
//! **Limits.** `--max-outbound-bytes` bounds a session's backlog: a
//! delivery finding the queue at or past it, once the socket has refused
//! bytes since the queue was last empty, makes the subscriber slow (closed
//! with 1008 by its connection, or, under `--slow-consumer drop`, the
//! delivery is dropped). `--max-core-outbound-bytes` bounds the core's sum:
//! past it the core *holds* its publishers (`poll_budget`) until writes
//! bring it to half; a hold that lasts `--stall-timeout-ms` sheds the
//! subscribers that took nothing, then the largest queues (`tick`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use slotmap::SecondaryMap;

use super::mesh::WakerSet;
use super::message::{frame_header_len, Compressor, Deflating, Fanout};
use super::topics::Via;
use super::{Pending, SessionKey};
use crate::config::{Config, SlowConsumer};
use crate::stats::Stats;
use crate::sys::Flush;
use crate::ws::Opcode;

/// Parts per vectored send.
pub const IOV_PARTS: usize = 128;

/// Bytes a session's own compressor takes ahead of a write (see
/// `compress_ahead`).
const AHEAD_BYTES: usize = 64 * 1024;

/// One piece of a queued delivery: a message is one or more parts (a
/// STOMP MESSAGE: its own head, then shared headers and body), and only
/// whole messages are ever dropped.
struct Part {
    bytes: Bytes,
    /// The message's last part.
    last: bool,
    /// The message counts in `messages_out` (a delivery, not a heart-beat).
    counts: bool,
    /// The message may be compressed as it is written, by a session's own
    /// compressor (its first part says for the message).
    compress: bool,
}

/// One session's pub/sub state.
#[derive(Default)]
struct State {
    /// Topic table keys the session is in (topics, and STOMP queues).
    topics: Vec<Box<[u8]>>,
    queue: VecDeque<Part>,
    queued_bytes: usize,
    /// Bytes of the queue's first part already written.
    head_sent: usize,
    /// The queue's first part continues a message partly written.
    mid_message: bool,
    /// Over the limit under the close policy: takes no more deliveries.
    slow: bool,
    /// The socket refused bytes while deliveries waited, and the queue has
    /// not been empty since: only then is a backlog the subscriber's own.
    stalled: bool,
    /// The session is closing: nothing more is queued (RFC 6455 5.5.1:
    /// nothing follows its close frame).
    closed: bool,
    /// Last time some of its deliveries were written (ms, the core's clock).
    written_ms: u64,
    /// Envelopes of this session's publishes that wait for ring space.
    pending: Pending,
    /// A publish of this session found the core over its budget: it is not
    /// read until the hold ends.
    held: bool,
    /// It agreed to permessage-deflate, with this window for our messages
    /// (8-15 bits); 0: it did not.
    deflate_bits: u8,
    /// With context takeover for our messages: they are compressed by its
    /// own compressor as they are written (`compress_ahead`).
    takeover: bool,
    /// Parts at the front of the queue its compressor has taken (whole
    /// messages): they go on the wire before anything queued after them
    /// is compressed, its own replies included.
    ahead: usize,
}

impl State {
    fn is_blocked(&self) -> bool {
        self.held || !self.pending.is_empty()
    }

    /// Whether a message is partly written: only its rest may go next.
    fn mid_message(&self) -> bool {
        self.head_sent > 0 || self.mid_message
    }

    /// Parts that must go before any other output: the rest of a message
    /// partly written, and every message compressed ahead.
    fn committed(&self) -> usize {
        let partial = if self.mid_message() {
            self.queue
                .iter()
                .position(|p| p.last)
                .map_or(self.queue.len(), |i| i + 1)
        } else {
            0
        };
        partial.max(self.ahead)
    }
}

/// Why a session is listed ready (`poll_ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Its queue turned non-empty: write it, or wake its task to.
    Deliver,
    /// It became a slow consumer under the close policy: close it (1008).
    Slow,
}

/// How a core's sessions reach their tasks without knowing what a task
/// is: implemented by the connection layer, set with `Sessions::wake_with`.
pub trait Wake {
    /// Session `key`'s queue turned non-empty (`Ready::Deliver`) or it
    /// turned slow (`Ready::Slow`): wakes its task if one runs and returns
    /// `true`; `false` if none does (it waits with nothing of its own, or
    /// is parked), and it is listed ready for the flusher instead. Called
    /// with no borrow of this module held.
    fn wake(self: Rc<Self>, key: SessionKey, why: Ready) -> bool;
}

/// A session would be in more topic table keys than it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTopics;

/// What a removed session leaves behind for the hub to clear up: the keys
/// it was in, and its publishes still waiting for ring space.
pub struct Removed {
    pub topics: Vec<Box<[u8]>>,
    pub pending: Pending,
}

/// The pub/sub sessions of one core.
pub struct Sessions {
    config: Arc<Config>,
    stats: Rc<RefCell<Stats>>,
    table: RefCell<SecondaryMap<SessionKey, Box<State>>>,
    /// The core's clock (ms), as of the last `tick`.
    now_ms: Cell<u64>,
    /// Bytes queued for all of this core's sessions (the sum of their
    /// `queued_bytes`). Past `max_core_outbound_bytes`, publishers are held
    /// (since `held_since_ms`) until it falls to half of that.
    queued: Cell<usize>,
    held_since_ms: Cell<Option<u64>>,
    budget_waiters: WakerSet,
    /// Shutdown has begun: the core never holds (see `holds_publishers`).
    never_hold: Cell<bool>,
    /// Sessions listed ready, and the waker of the one who writes them.
    ready: RefCell<Vec<(SessionKey, Ready)>>,
    /// Wakes a session's running task at once (`Wake`).
    wake: RefCell<Option<Weak<dyn Wake>>>,
    flusher: Cell<Option<Waker>>,
    /// Where STOMP MESSAGE heads are carved from (see `message`).
    heads: RefCell<BytesMut>,
    /// permessage-deflate's compressor for every session that agreed to
    /// no context takeover.
    pub compressor: Compressor,
    /// The compressors and inflaters of sessions that agreed to context
    /// takeover.
    pub dedicated: super::dedicated::Dedicated,
    /// Sessions whose publish waits for ring space, and admin publishes
    /// under way: publishes accepted but not yet in every ring.
    in_flight: Cell<usize>,
}

impl Sessions {
    pub fn new(config: Arc<Config>, stats: Rc<RefCell<Stats>>) -> Sessions {
        Sessions {
            stats,
            table: RefCell::new(SecondaryMap::new()),
            now_ms: Cell::new(0),
            queued: Cell::new(0),
            held_since_ms: Cell::new(None),
            budget_waiters: WakerSet::default(),
            never_hold: Cell::new(false),
            ready: RefCell::new(Vec::new()),
            wake: RefCell::new(None),
            flusher: Cell::new(None),
            heads: RefCell::new(BytesMut::new()),
            compressor: Compressor::new(config.compress_level, config.compress_min_bytes),
            dedicated: super::dedicated::Dedicated::new(
                config.deflate_dedicated_bytes,
                config.compress_level,
                config.deflate_window_bits,
            ),
            config,
            in_flight: Cell::new(0),
        }
    }

    /// Session `key` agreed to permessage-deflate with a window of
    /// `window_bits` for our messages: its deliveries go compressed where
    /// that is worth it; with `takeover`, by its own compressor as they
    /// are written, otherwise as the core's shared encodings.
    pub fn set_deflate(&self, key: SessionKey, window_bits: u8, takeover: bool) {
        if let Some(state) = self.table.borrow_mut().get_mut(key) {
            state.deflate_bits = window_bits;
            state.takeover = takeover;
        }
    }

    /// Makes `key` a pub/sub session (nothing changes if it is one). Its
    /// clock of writes starts now: a new subscriber is not one that took
    /// nothing for `--stall-timeout-ms` (`shed_stalled`).
    pub fn open(&self, key: SessionKey) {
        let mut table = self.table.borrow_mut();
        if !table.contains_key(key) {
            table.insert(
                key,
                Box::new(State {
                    written_ms: self.now_ms.get(),
                    ..State::default()
                }),
            );
        }
    }

    /// The session is closing: its unsent deliveries are dropped (one
    /// partly written stays, so no frame is cut) and no more are queued.
    pub fn close(&self, key: SessionKey) {
        if let Some(state) = self.table.borrow_mut().get_mut(key) {
            state.closed = true;
            self.drop_unsent(state);
        }
    }

    /// The session is gone: its queue leaves the core's total. Returns
    /// what the hub must clear up.
    pub fn remove(&self, key: SessionKey) -> Option<Removed> {
        self.dedicated.remove(key);
        let state = self.table.borrow_mut().remove(key)?;
        self.unqueue(state.queued_bytes);
        if !state.pending.is_empty() {
            self.in_flight.set(self.in_flight.get() - 1);
        }
        self.check_queued();
        let State { topics, pending, .. } = *state;
        Some(Removed { topics, pending })
    }

    /// The keys the session is in.
    pub fn topics_of(&self, key: SessionKey) -> Vec<Box<[u8]>> {
        self.table.borrow().get(key).map_or_else(Vec::new, |s| s.topics.clone())
    }

    /// Records that the session is in `topic` (a table key), making it a
    /// pub/sub session if it was not; an error if it would be in more
    /// than `max` (`Ok(false)`: it was already).
    pub fn join(&self, key: SessionKey, topic: &[u8], max: usize) -> Result<bool, TooManyTopics> {
        self.open(key);
        let mut table = self.table.borrow_mut();
        let state = table.get_mut(key).ok_or(TooManyTopics)?;
        if state.topics.iter().any(|t| &t[..] == topic) {
            return Ok(false);
        }
        if state.topics.len() >= max {
            return Err(TooManyTopics);
        }
        state.topics.push(topic.into());
        Ok(true)
    }

    /// Records that the session left `topic`; `false` if it was not in it.
    pub fn leave(&self, key: SessionKey, topic: &[u8]) -> bool {
        let mut table = self.table.borrow_mut();
        let Some(state) = table.get_mut(key) else { return false };
        let Some(at) = state.topics.iter().position(|t| &t[..] == topic) else {
            return false;
        };
        state.topics.swap_remove(at);
        true
    }

    /// The envelopes waiting for ring space, out of the table (so the hub
    /// may be used); `put_pending` puts them back.
    pub fn take_pending(&self, key: SessionKey) -> Pending {
        self.table
            .borrow_mut()
            .get_mut(key)
            .map(|s| std::mem::take(&mut s.pending))
            .unwrap_or_default()
    }

    /// Puts back what `take_pending` took (`was_empty`: whether it was
    /// empty then), counting the session among the core's publishes in
    /// flight while any envelope waits. A session without pub/sub state
    /// keeps nothing here: its envelopes come back, for the hub to send
    /// on by itself.
    #[must_use]
    pub fn put_pending(&self, key: SessionKey, pending: Pending, was_empty: bool) -> Option<Pending> {
        let mut table = self.table.borrow_mut();
        let Some(state) = table.get_mut(key) else {
            return (!pending.is_empty()).then_some(pending);
        };
        let in_flight = &self.in_flight;
        match (was_empty, pending.is_empty()) {
            (true, false) => in_flight.set(in_flight.get() + 1),
            (false, true) => in_flight.set(in_flight.get() - 1),
            _ => {}
        }
        state.pending = pending;
        None
    }

    /// The session's publish took the core over its budget: it waits for
    /// the hold to end (`poll_unblocked`).
    pub fn hold(&self, key: SessionKey) {
        if let Some(state) = self.table.borrow_mut().get_mut(key) {
            state.held = true;
        }
    }

    /// Whether a publish of the session waits for ring space, or for the
    /// core's budget.
    pub fn is_blocked(&self, key: SessionKey) -> bool {
        self.table.borrow().get(key).is_some_and(|s| s.is_blocked())
    }

    /// Ready once the session's hold (if any) is over.
    pub fn poll_hold(&self, key: SessionKey, cx: &mut Context<'_>) -> Poll<()> {
        let held = self.table.borrow().get(key).is_some_and(|s| s.held);
        if held {
            if self.poll_budget(cx).is_pending() {
                return Poll::Pending;
            }
            if let Some(state) = self.table.borrow_mut().get_mut(key) {
                state.held = false;
            }
        }
        Poll::Ready(())
    }

    /// Publishes accepted on this core that are not yet in every ring
    /// they go to (sessions' and admin requests').
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// An admin publish starts (`true`) or ends (`false`).
    pub fn admin_publishing(&self, on: bool) {
        let n = self.in_flight.get();
        self.in_flight.set(if on { n + 1 } else { n - 1 });
    }

    /// Bytes queued for session `key`.
    pub fn session_queued_bytes(&self, key: SessionKey) -> usize {
        self.table.borrow().get(key).map_or(0, |s| s.queued_bytes)
    }

    #[cfg(test)]
    pub fn queue_len(&self, key: SessionKey) -> usize {
        self.table.borrow().get(key).map_or(0, |s| s.queue.len())
    }

    #[cfg(test)]
    pub fn budget_waiter_count(&self) -> usize {
        self.budget_waiters.len()
    }

    /// Whether deliveries wait to be written.
    pub fn has_deliveries(&self, key: SessionKey) -> bool {
        self.table.borrow().get(key).is_some_and(|s| !s.queue.is_empty())
    }

    /// Whether the session has nothing queued (or is not a pub/sub one).
    pub fn queue_is_empty(&self, key: SessionKey) -> bool {
        !self.has_deliveries(key)
    }

    /// Whether the session became a slow consumer (closed by policy).
    pub fn is_slow(&self, key: SessionKey) -> bool {
        self.table.borrow().get(key).is_some_and(|s| s.slow)
    }

    /// Queues a message for session `key` in the encoding its subscription
    /// asks for: one MESSAGE per STOMP subscription to the topic, or (`one`,
    /// a queue's message, which has one consumer) for its first.
    pub fn deliver(&self, key: SessionKey, via: &Via, fanout: &Fanout<'_>, one: bool) {
        let (bits, takeover) = self
            .table
            .borrow()
            .get(key)
            .map_or((0, false), |s| (s.deflate_bits, s.takeover));
        // With its own compressor, it takes the plain encodings, compressed
        // as they are written.
        let deflate = (bits != 0 && !takeover).then_some(Deflating {
            window_bits: bits,
            compressor: &self.compressor,
        });
        let compress = takeover && fanout.message.compress;
        let mut heads = self.heads.borrow_mut();
        fanout.encode(
            via,
            one,
            deflate,
            &mut heads,
            || self.queue_is_empty(key),
            |parts| self.enqueue(key, parts, true, compress),
        );
    }

    /// Queues one whole frame (from the admin API, or a STOMP heart-beat:
    /// `counts` false) for session `key`. `compress`: a plain frame that
    /// the session's own compressor (if it has one) may compress.
    pub fn deliver_frame(&self, key: SessionKey, frame: &Bytes, counts: bool, compress: bool) {
        self.enqueue(key, &mut [frame.clone()], counts, compress);
    }

    /// Queues one message (`parts`, written in order) for session `key`,
    /// applying the outbound limit, and lists it ready if its queue was
    /// empty. Sessions that are not pub/sub ones, or are closing, are
    /// skipped. `count`: the message is a delivery (not a heart-beat).
    ///
    /// The limit bounds a backlog: a message is refused only when what is
    /// already queued has reached `max_outbound_bytes` and the socket has
    /// refused bytes since the queue was last empty. So a subscriber that
    /// keeps up takes a message of any admitted size (up to
    /// `--max-message-bytes`, larger than the limit by default), and what
    /// one burst queued before its socket could take any (several large
    /// publishes in one read) is not held against it. A queue holds at most
    /// the limit plus one message once its socket is full; before, what
    /// one round of the core queues, itself bounded by the core's budget.
    fn enqueue(&self, key: SessionKey, parts: &mut [Bytes], count: bool, compress: bool) {
        let limit = self.config.max_outbound_bytes;
        let len: usize = parts.iter().map(Bytes::len).sum();
        let ready = {
            let mut table = self.table.borrow_mut();
            let Some(state) = table.get_mut(key) else { return };
            if state.closed || state.slow {
                return;
            }
            let mut stats = self.stats.borrow_mut();
            if state.stalled && state.queued_bytes >= limit {
                match self.config.slow_consumer {
                    SlowConsumer::Drop => {
                        stats.dropped += 1;
                        return;
                    }
                    SlowConsumer::Close => {
                        // Free the queue now; its connection closes with 1008.
                        state.slow = true;
                        stats.slow_consumers += 1;
                        drop(stats);
                        self.drop_unsent(state);
                        Ready::Slow
                    }
                }
            } else {
                stats.deliveries += u64::from(count);
                let was_empty = state.queue.is_empty();
                state.queued_bytes += len;
                self.queued.set(self.queued.get() + len);
                let n = parts.len();
                for (i, part) in parts.iter_mut().enumerate() {
                    state.queue.push_back(Part {
                        bytes: std::mem::take(part),
                        last: i + 1 == n,
                        counts: count,
                        compress,
                    });
                }
                if !was_empty {
                    // Listed when the queue became non-empty.
                    return;
                }
                Ready::Deliver
            }
        };
        self.list_ready(key, ready);
    }

    /// Sets who wakes a session's running task (`Wake`); without one,
    /// every session is listed ready for the flusher.
    pub fn wake_with(&self, wake: Weak<dyn Wake>) {
        *self.wake.borrow_mut() = Some(wake);
    }

    fn list_ready(&self, key: SessionKey, why: Ready) {
        let wake = self.wake.borrow().as_ref().and_then(Weak::upgrade);
        if wake.is_some_and(|w| w.wake(key, why)) {
            return;
        }
        let mut ready = self.ready.borrow_mut();
        if ready.is_empty() {
            if let Some(w) = self.flusher.take() {
                w.wake();
            }
        }
        ready.push((key, why));
    }

    /// For the flusher: moves the sessions listed ready into `batch`
    /// (empty), or keeps `cx`'s waker to be woken when there are some.
    pub fn poll_ready(&self, cx: &mut Context<'_>, batch: &mut Vec<(SessionKey, Ready)>) -> Poll<()> {
        let mut ready = self.ready.borrow_mut();
        if ready.is_empty() {
            self.flusher.set(Some(cx.waker().clone()));
            return Poll::Pending;
        }
        std::mem::swap(&mut *ready, batch);
        Poll::Ready(())
    }

    /// Writes the session's queued deliveries with `send` (a vectored send
    /// on its socket), many parts per call, until the queue is empty or
    /// `send` would block. With `partial_only`, only what must go before
    /// other output: the rest of a message already partly written (other
    /// output may go only between whole frames), and what its own
    /// compressor took. Returns whether all went, and the bytes written.
    pub fn write(
        &self,
        key: SessionKey,
        partial_only: bool,
        mut send: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<(Flush, usize)> {
        let mut table = self.table.borrow_mut();
        let Some(state) = table.get_mut(key) else {
            return Ok((Flush::Done, 0));
        };
        let mut total = 0;
        while !state.queue.is_empty() && (!partial_only || state.committed() > 0) {
            if !partial_only && state.takeover {
                self.compress_ahead(key, state);
            }
            let take = if partial_only { state.committed() } else { IOV_PARTS };
            let mut iov = [IoSlice::new(&[]); IOV_PARTS];
            let mut n = 0;
            for (i, part) in state.queue.iter().take(IOV_PARTS.min(take)).enumerate() {
                let from = if i == 0 { state.head_sent } else { 0 };
                iov[i] = IoSlice::new(&part.bytes[from..]);
                n += 1;
            }
            let mut written = match send(&iov[..n]) {
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    state.stalled = true;
                    return Ok((Flush::Blocked, total));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += written;
            state.written_ms = self.now_ms.get();
            state.queued_bytes -= written;
            self.unqueue(written);
            let mut stats = self.stats.borrow_mut();
            stats.bytes_out += written as u64;
            while written > 0 {
                let left = state.queue[0].bytes.len() - state.head_sent;
                if written < left {
                    state.head_sent += written;
                    break;
                }
                written -= left;
                state.head_sent = 0;
                state.ahead = state.ahead.saturating_sub(1);
                let (last, counts) = state.queue.pop_front().map_or((true, false), |p| (p.last, p.counts));
                state.mid_message = !last;
                stats.messages_out += u64::from(last && counts);
            }
        }
        if state.queue.is_empty() {
            state.stalled = false;
        }
        Ok((Flush::Done, total))
    }

    /// Compresses the messages at the front of a session's queue with its
    /// own compressor (RFC 7692 7.2.1, context takeover), in queue order,
    /// until a write's worth is ahead: `AHEAD_BYTES`, or `IOV_PARTS` parts.
    /// Each is compressed just before it is written, so the replies its
    /// connection queued before it (compressed as they were queued) are
    /// out first, and those it queues after go after it (`committed`).
    /// Messages that may not be compressed, or are too short, stay plain
    /// (a plain message leaves the window as it is, 6.1).
    fn compress_ahead(&self, key: SessionKey, state: &mut State) {
        if state.ahead == 0 && state.mid_message() {
            // Partly written before it had a compressor: it goes as it is.
            state.ahead = state.committed();
        }
        let mut bytes: usize = state.queue.iter().take(state.ahead).map(|p| p.bytes.len()).sum();
        while state.ahead < state.queue.len() && state.ahead < IOV_PARTS && bytes < AHEAD_BYTES {
            let start = state.ahead;
            let end = state
                .queue
                .iter()
                .skip(start)
                .position(|p| p.last)
                .map_or(state.queue.len(), |i| start + i + 1);
            let first = &state.queue[start].bytes;
            let head = frame_header_len(first);
            let len = state.queue.range(start..end).map(|p| p.bytes.len()).sum::<usize>() - head;
            let frame = if state.queue[start].compress && len >= self.config.compress_min_bytes && first.len() >= 2 {
                let opcode = Opcode::from_u8(first[0] & 0x0f);
                let parts: Vec<&[u8]> = state
                    .queue
                    .range(start..end)
                    .enumerate()
                    .map(|(i, p)| if i == 0 { &p.bytes[head..] } else { &p.bytes[..] })
                    .collect();
                opcode.and_then(|opcode| self.dedicated.frame(key, opcode, &parts))
            } else {
                None
            };
            let Some(frame) = frame else {
                state.ahead = end;
                bytes += len + head;
                continue;
            };
            let counts = state.queue[end - 1].counts;
            let old: usize = state.queue.drain(start..end).map(|p| p.bytes.len()).sum();
            let new = frame.len();
            state.queue.insert(
                start,
                Part {
                    bytes: frame,
                    last: true,
                    counts,
                    compress: false,
                },
            );
            state.queued_bytes = state.queued_bytes + new - old;
            if new >= old {
                self.queued.set(self.queued.get() + (new - old));
            } else {
                self.unqueue(old - new);
            }
            state.ahead = start + 1;
            bytes += new;
        }
    }

    /// The socket refused what was already taken from the queue (TLS
    /// ciphertext it holds back): the subscriber's socket is full.
    pub fn stall(&self, key: SessionKey) {
        if let Some(state) = self.table.borrow_mut().get_mut(key) {
            state.stalled = true;
        }
    }

    /// Drops every queued message not yet started; one partly written
    /// stays, so the stream of frames is never cut mid-frame. The bytes
    /// dropped leave the core's total too, so the two cannot drift apart.
    /// Returns the deliveries dropped.
    fn drop_unsent(&self, state: &mut State) -> u64 {
        // What its own compressor took stays too: the client's window must
        // hold what the compressor's does.
        let keep = state.committed();
        let deliveries = state.queue.iter().skip(keep).filter(|p| p.last && p.counts).count() as u64;
        state.queue.truncate(keep);
        let before = state.queued_bytes;
        state.queued_bytes = state.queue.iter().map(|p| p.bytes.len()).sum::<usize>() - state.head_sent;
        self.unqueue(before - state.queued_bytes);
        deliveries
    }

    /// The core's queued total is the sum of its sessions' queues: checked
    /// whenever a session is removed (in full while the table is small,
    /// and by every tick, which visits each session anyway), in debug builds.
    fn check_queued(&self) {
        let table = self.table.borrow();
        if cfg!(debug_assertions) && table.len() <= 4096 {
            let sum: usize = table.values().map(|s| s.queued_bytes).sum();
            assert_eq!(sum, self.queued.get(), "queued total drifted");
        }
    }

    /// One tick of the core's clock (`now`, ms): gives back the memory of
    /// queues a burst grew and that are empty again, and sheds what holds
    /// the core back if a hold has lasted `--stall-timeout-ms`. Returns the
    /// sessions made slow by that (to be closed, 1008).
    pub fn tick(&self, now: u64) -> Vec<SessionKey> {
        self.now_ms.set(now);
        let mut sum = 0;
        for state in self.table.borrow_mut().values_mut() {
            sum += state.queued_bytes;
            // Not at once when it empties, as a busy subscriber would grow
            // it again for every batch.
            if state.queue.is_empty() && state.queue.capacity() > IOV_PARTS * 2 {
                state.queue = VecDeque::new();
            }
        }
        debug_assert_eq!(sum, self.queued.get(), "queued total drifted");
        let stall = self.config.stall_timeout_ms;
        if self
            .held_since_ms
            .get()
            .is_some_and(|since| now.saturating_sub(since) >= stall)
        {
            self.shed_stalled(now)
        } else {
            Vec::new()
        }
    }

    /// The core's publishers have been held for `stall_timeout_ms`: its
    /// subscribers' queues are not being written down. Frees the queues of
    /// those that hold it back: every subscriber that took nothing for as
    /// long, then the largest queues until the total is down to half the
    /// budget, which ends the hold. Under the close policy they are slow
    /// consumers (returned, to be closed with 1008); under the drop policy
    /// their unsent deliveries are dropped and counted.
    fn shed_stalled(&self, now: u64) -> Vec<SessionKey> {
        let stall = self.config.stall_timeout_ms;
        let half = self.config.max_core_outbound_bytes / 2;
        let mut slow = Vec::new();
        let mut table = self.table.borrow_mut();
        let mut candidates: Vec<(bool, usize, SessionKey)> = table
            .iter()
            .filter(|(_, s)| !s.closed && s.queued_bytes > 0 && !s.slow)
            .map(|(key, s)| (now.saturating_sub(s.written_ms) >= stall, s.queued_bytes, key))
            .collect();
        // Stuck ones first, then the largest queues.
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        let mut shed = 0;
        for (stuck, _, key) in candidates {
            if !stuck && self.queued.get() <= half {
                break;
            }
            shed += 1;
            let state = &mut table[key];
            let deliveries = self.drop_unsent(state);
            let mut stats = self.stats.borrow_mut();
            match self.config.slow_consumer {
                SlowConsumer::Drop => stats.dropped += deliveries,
                SlowConsumer::Close => {
                    state.slow = true;
                    stats.slow_consumers += 1;
                    slow.push(key);
                }
            }
        }
        tracing::debug!(shed, "publishers held too long: subscribers' queues shed");
        slow
    }

    /// Whether this core's sessions hold more queued deliveries than
    /// `--max-core-outbound-bytes`.
    pub fn over_budget(&self) -> bool {
        self.queued.get() > self.config.max_core_outbound_bytes
    }

    /// Bytes queued for all of this core's sessions.
    pub fn queued_bytes(&self) -> usize {
        self.queued.get()
    }

    /// Ready while this core may take publishes: its sessions' queues are
    /// within their budget, and no hold is in force. Past the budget, the
    /// hold starts (and the caller waits) until the queues are written
    /// down to half of it: a publisher that made the core go over is
    /// paused, its socket unread, so TCP slows it, and the core spends its
    /// time writing rather than queueing more than it can write.
    pub fn poll_budget(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.holds_publishers() {
            return Poll::Ready(());
        }
        self.budget_waiters.insert(cx.waker());
        Poll::Pending
    }

    /// Whether the core's publishers are held (see `poll_budget`); starts
    /// the hold if the core is over its budget. Never once shutdown has
    /// begun (`never_hold`): nothing more is read, and every publish
    /// already accepted must reach its subscribers, so the rings are
    /// drained whatever the budget (what they hold bounds what is added).
    pub fn holds_publishers(&self) -> bool {
        if self.never_hold.get() {
            return false;
        }
        if self.held_since_ms.get().is_none() {
            if !self.over_budget() {
                return false;
            }
            self.held_since_ms.set(Some(self.now_ms.get()));
            self.stats.borrow_mut().publish_holds += 1;
        }
        true
    }

    /// From now on the core never holds its publishers (shutdown): a hold
    /// in force ends.
    pub fn never_hold(&self) {
        self.never_hold.set(true);
        self.end_hold();
    }

    /// Takes `n` written (or dropped) bytes off the core's queued total,
    /// and ends a hold once half the budget is reached.
    fn unqueue(&self, n: usize) {
        let queued = self.queued.get() - n;
        self.queued.set(queued);
        if queued <= self.config.max_core_outbound_bytes / 2 {
            self.end_hold();
        }
    }

    /// Ends a hold, if one is in force, and wakes whoever waits on it.
    fn end_hold(&self) {
        if self.held_since_ms.take().is_some() {
            self.budget_waiters.wake_all();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
