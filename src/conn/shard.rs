//! One core's shard of sessions, and the sweep that times them.
//!
//! Owns the session table (a generational slab: a session id is
//! `(core, slot, generation)`), the core's coarse clock, its buffers (pool and
//! read scratch), its counters, and the per-core sweep that replaces a timer
//! per connection: every tick it walks the table and "kicks" each session
//! that is due a ping, a timeout or the shutdown close. A kicked session's
//! task wakes, reads its kick and acts. Protocol logic is not here.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use slotmap::{new_key_type, SlotMap};

use super::pool::BufferPool;
use crate::config::Config;
use crate::ws::CloseCode;

new_key_type! {
    /// Slot and generation of a session in its core's table.
    pub struct SessionKey;
}

/// What the sweep asks a session to do. A bit set: several can be due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kick(u8);

impl Kick {
    pub const PING: Kick = Kick(1);
    pub const TIMEOUT: Kick = Kick(2);
    pub const SHUTDOWN: Kick = Kick(4);
    /// End now, without a close handshake (the drain time is over).
    pub const ABORT: Kick = Kick(8);

    pub fn has(self, k: Kick) -> bool {
        self.0 & k.0 != 0
    }

    pub fn with(self, k: Kick) -> Kick {
        Kick(self.0 | k.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the request head: bounded by `handshake_timeout_ms`.
    Handshake,
    /// Upgraded: pinged when quiet, closed when silent past `idle_timeout_ms`.
    Open,
    /// Our close is sent (or we are answering one): bounded by `close_timeout_ms`.
    Closing,
}

struct Slot {
    phase: Phase,
    phase_since_ms: u64,
    last_rx_ms: u64,
    last_ping_ms: u64,
    shutdown_sent: bool,
    kick: Kick,
    waker: Option<Waker>,
}

/// Counters of one core. Summed across cores when reported.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub accepted: u64,
    pub upgraded: u64,
    pub health_checks: u64,
    pub handshake_timeouts: u64,
    /// Refused handshakes by HTTP status.
    pub rejected: BTreeMap<u16, u64>,
    /// Ended sessions by RFC 6455 7.1.5 close code: the code of the close frame
    /// the peer sent, 1005 if it had none, 1006 if the peer sent none.
    pub closed: BTreeMap<u16, u64>,
    /// Close frames we sent first and got out, by code (violations, shutdown, idle).
    pub close_sent: BTreeMap<u16, u64>,
    /// Whole data messages received, and their payload bytes.
    pub messages_in: u64,
    pub bytes_in: u64,
}

impl Stats {
    pub fn merge(&mut self, other: &Stats) {
        self.accepted += other.accepted;
        self.upgraded += other.upgraded;
        self.health_checks += other.health_checks;
        self.handshake_timeouts += other.handshake_timeouts;
        for (k, v) in &other.rejected {
            *self.rejected.entry(*k).or_default() += v;
        }
        for (k, v) in &other.closed {
            *self.closed.entry(*k).or_default() += v;
        }
        for (k, v) in &other.close_sent {
            *self.close_sent.entry(*k).or_default() += v;
        }
        self.messages_in += other.messages_in;
        self.bytes_in += other.bytes_in;
    }
}

/// Read scratch per core: every ready socket is read into it, parsed, and
/// what must outlive the read is copied out, so no connection owns it.
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// Pool buffers: partial frames and queued output.
pub const POOL_BUF_BYTES: usize = 16 * 1024;
/// Idle pool buffers a core keeps (4 MiB at most).
pub const POOL_MAX_FREE: usize = 256;

pub struct Shard {
    pub core: usize,
    pub config: Arc<Config>,
    pub pool: BufferPool,
    pub scratch: RefCell<Vec<u8>>,
    pub stats: RefCell<Stats>,
    sessions: RefCell<SlotMap<SessionKey, Slot>>,
    start: Instant,
    now_ms: Cell<u64>,
    shutting_down: Cell<bool>,
    /// Woken when shutdown begins (the accept loop) or the table empties (the drain).
    watcher: Cell<Option<Waker>>,
}

impl Shard {
    pub fn new(core: usize, config: Arc<Config>) -> Shard {
        Shard {
            core,
            config,
            pool: BufferPool::new(POOL_BUF_BYTES, POOL_MAX_FREE),
            scratch: RefCell::new(Vec::with_capacity(SCRATCH_BYTES)),
            stats: RefCell::new(Stats::default()),
            sessions: RefCell::new(SlotMap::with_key()),
            start: Instant::now(),
            now_ms: Cell::new(0),
            shutting_down: Cell::new(false),
            watcher: Cell::new(None),
        }
    }

    /// The coarse clock: milliseconds since the shard started, as of the last tick.
    pub fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// Registers a session in the handshake phase.
    pub fn open_session(self: &Rc<Self>) -> Session {
        let now = self.now_ms();
        let key = self.sessions.borrow_mut().insert(Slot {
            phase: Phase::Handshake,
            phase_since_ms: now,
            last_rx_ms: now,
            last_ping_ms: now,
            shutdown_sent: false,
            kick: Kick::default(),
            waker: None,
        });
        Session {
            shard: self.clone(),
            key,
        }
    }

    /// Sets the watcher waker (accept loop or drain); see `watcher`.
    pub fn watch(&self, waker: &Waker) {
        self.watcher.set(Some(waker.clone()));
    }

    fn wake_watcher(&self) {
        if let Some(w) = self.watcher.take() {
            w.wake();
        }
    }

    /// Starts the shutdown: the next sweep kicks every session with
    /// `SHUTDOWN`, and each later sweep the sessions opened since.
    pub fn begin_shutdown(&self) {
        if !self.shutting_down.replace(true) {
            self.wake_watcher();
        }
    }

    /// Ends every session at its next poll (after the drain timeout).
    pub fn abort_all(&self) {
        for (_, slot) in self.sessions.borrow_mut().iter_mut() {
            slot.kick = slot.kick.with(Kick::ABORT);
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }

    /// One tick: advance the clock and kick every session that is due.
    pub fn sweep(&self) {
        self.sweep_at(self.start.elapsed().as_millis() as u64);
    }

    fn sweep_at(&self, now: u64) {
        self.now_ms.set(now);
        let c = &self.config;
        let shutting_down = self.shutting_down.get();
        for (_, slot) in self.sessions.borrow_mut().iter_mut() {
            let mut due = Kick::default();
            let in_phase = now.saturating_sub(slot.phase_since_ms);
            match slot.phase {
                Phase::Handshake if in_phase >= c.handshake_timeout_ms => due = due.with(Kick::TIMEOUT),
                Phase::Closing if in_phase >= c.close_timeout_ms => due = due.with(Kick::TIMEOUT),
                Phase::Open => {
                    let quiet = now.saturating_sub(slot.last_rx_ms);
                    if c.idle_timeout_ms > 0 && quiet >= c.idle_timeout_ms {
                        due = due.with(Kick::TIMEOUT);
                    } else if c.ping_interval_ms > 0
                        && quiet >= c.ping_interval_ms
                        && now.saturating_sub(slot.last_ping_ms) >= c.ping_interval_ms
                    {
                        slot.last_ping_ms = now;
                        due = due.with(Kick::PING);
                    }
                }
                _ => {}
            }
            if shutting_down && !slot.shutdown_sent && slot.phase != Phase::Closing {
                slot.shutdown_sent = true;
                due = due.with(Kick::SHUTDOWN);
            }
            if !due.is_empty() {
                slot.kick = slot.kick.with(due);
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Milliseconds between sweeps: a quarter of the shortest timeout, within
    /// 10..=100 ms (100 ms also bounds how late a shutdown is noticed).
    pub fn tick_ms(&self) -> u64 {
        let c = &self.config;
        let shortest = [
            c.handshake_timeout_ms,
            c.close_timeout_ms,
            c.ping_interval_ms,
            c.idle_timeout_ms,
        ]
        .into_iter()
        .filter(|&t| t > 0)
        .min()
        .unwrap_or(1000);
        (shortest / 4).clamp(10, 100)
    }

    pub fn count_close(&self, code: CloseCode) {
        *self.stats.borrow_mut().closed.entry(code.0).or_default() += 1;
    }

    pub fn count_close_sent(&self, code: CloseCode) {
        *self.stats.borrow_mut().close_sent.entry(code.0).or_default() += 1;
    }

    pub fn count_rejected(&self, status: u16) {
        *self.stats.borrow_mut().rejected.entry(status).or_default() += 1;
    }
}

/// A session's entry in its shard; removed when dropped.
pub struct Session {
    shard: Rc<Shard>,
    key: SessionKey,
}

impl Session {
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    fn with<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut sessions = self.shard.sessions.borrow_mut();
        // A Session is the only remover of its slot, so the slot exists.
        f(sessions
            .get_mut(self.key)
            .expect("session slot exists while the Session lives"))
    }

    pub fn set_phase(&self, phase: Phase) {
        let now = self.shard.now_ms();
        self.with(|s| {
            s.phase = phase;
            s.phase_since_ms = now;
        });
    }

    /// Records that the peer is alive: it sent bytes, or took some of ours
    /// (resets the idle clock, so a stalled write also times out).
    pub fn peer_alive(&self) {
        let now = self.shard.now_ms();
        self.with(|s| s.last_rx_ms = now);
    }

    /// Takes pending kicks, or stores `waker` to be woken by the next one.
    pub fn poll_kick(&self, waker: &Waker) -> Option<Kick> {
        self.with(|s| {
            if !s.kick.is_empty() {
                return Some(std::mem::take(&mut s.kick));
            }
            match &s.waker {
                Some(w) if w.will_wake(waker) => {}
                _ => s.waker = Some(waker.clone()),
            }
            None
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let empty = {
            let mut sessions = self.shard.sessions.borrow_mut();
            sessions.remove(self.key);
            sessions.is_empty()
        };
        if empty && self.shard.is_shutting_down() {
            self.shard.wake_watcher();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Options;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn shard() -> Rc<Shard> {
        let opts = Options {
            handshake_timeout_ms: Some(100),
            ping_interval_ms: Some(1000),
            idle_timeout_ms: Some(3000),
            close_timeout_ms: Some(500),
            ..Options::default()
        };
        Rc::new(Shard::new(0, Arc::new(opts.validate(1).unwrap())))
    }

    fn waker() -> (Arc<CountingWaker>, Waker) {
        let w = Arc::new(CountingWaker(AtomicUsize::new(0)));
        (w.clone(), Waker::from(w))
    }

    #[test]
    fn handshake_timeout_at_the_limit() {
        let shard = shard();
        let s = shard.open_session();
        let (count, w) = waker();
        assert_eq!(s.poll_kick(&w), None);
        shard.sweep_at(99);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        shard.sweep_at(100);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(s.poll_kick(&w), Some(Kick::TIMEOUT));
        assert_eq!(s.poll_kick(&w), None, "a kick is taken once");
    }

    #[test]
    fn pings_when_quiet_then_idle_timeout() {
        let shard = shard();
        let s = shard.open_session();
        s.set_phase(Phase::Open);
        let (_, w) = waker();
        s.poll_kick(&w);
        shard.sweep_at(999);
        assert_eq!(s.poll_kick(&w), None);
        shard.sweep_at(1000);
        assert_eq!(s.poll_kick(&w), Some(Kick::PING));
        // One ping per interval, not one per tick.
        shard.sweep_at(1500);
        assert_eq!(s.poll_kick(&w), None);
        shard.sweep_at(2000);
        assert_eq!(s.poll_kick(&w), Some(Kick::PING));
        // Hearing from the peer resets the idle clock.
        s.peer_alive();
        shard.sweep_at(4999);
        assert_eq!(s.poll_kick(&w), Some(Kick::PING));
        shard.sweep_at(5000);
        assert_eq!(s.poll_kick(&w), Some(Kick::TIMEOUT));
    }

    #[test]
    fn close_timeout() {
        let shard = shard();
        let s = shard.open_session();
        s.set_phase(Phase::Closing);
        let (_, w) = waker();
        shard.sweep_at(499);
        assert_eq!(s.poll_kick(&w), None);
        shard.sweep_at(500);
        assert_eq!(s.poll_kick(&w), Some(Kick::TIMEOUT));
    }

    #[test]
    fn shutdown_kicks_once_and_empty_table_wakes_watcher() {
        let shard = shard();
        let a = shard.open_session();
        a.set_phase(Phase::Open);
        let (watched, ww) = waker();
        shard.watch(&ww);
        shard.begin_shutdown();
        assert_eq!(watched.0.load(Ordering::SeqCst), 1);
        shard.sweep();
        let (_, w) = waker();
        assert!(a.poll_kick(&w).unwrap().has(Kick::SHUTDOWN));
        shard.sweep();
        assert_eq!(a.poll_kick(&w), None, "shutdown is sent once");
        assert!(!a.poll_kick(&w).is_some_and(|k| k.has(Kick::ABORT)));
        shard.abort_all();
        assert!(a.poll_kick(&w).unwrap().has(Kick::ABORT));
        // A session opened during the drain is told at the next tick.
        let b = shard.open_session();
        shard.sweep();
        assert!(b.poll_kick(&w).unwrap().has(Kick::SHUTDOWN));
        shard.watch(&ww);
        drop(a);
        assert_eq!(watched.0.load(Ordering::SeqCst), 1);
        drop(b);
        assert_eq!(watched.0.load(Ordering::SeqCst), 2);
        assert_eq!(shard.session_count(), 0);
    }

    #[test]
    fn tick_follows_shortest_timeout() {
        assert_eq!(shard().tick_ms(), 25);
        let default = Shard::new(0, Arc::new(Options::default().validate(1).unwrap()));
        assert_eq!(default.tick_ms(), 100);
    }
}
