//! One core's shard of sessions, and the sweep that times them.
//!
//! Owns the session table (a generational slab: a session id is
//! `(core, slot, generation)`), the core's coarse clock, its buffers (pool and
//! read scratch), its counters, and the per-core sweep that replaces a timer
//! per connection: every tick it walks the table and "kicks" each session
//! that is due a ping, a timeout or the shutdown close. A kicked session's
//! task wakes, reads its kick and acts. A session quiet for `park_after_ms`
//! is kicked to park: its task ends and the slot keeps its socket, watched by
//! the core's `ParkingLot`, until input, a due kick or the shutdown starts a
//! task for it again. Protocol logic is not here, and neither are the
//! deliveries queued for a session (`pubsub::sessions`): the shard's
//! flusher and a session's task write them to its socket.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use bytes::Bytes;
use slotmap::{Key, KeyData, SlotMap};

use super::outbound::Flush;
use super::park::ParkingLot;
use super::pool::BufferPool;
use crate::auth::{Action, Identity};
use crate::config::{Config, RouteId};
use crate::proto::stomp::conn::StompConn;
use crate::pubsub::mesh::CoreMesh;
use crate::pubsub::message::Message;
use crate::pubsub::sessions::Ready;
use crate::pubsub::topics::StompTarget;
use crate::pubsub::Hub;
pub use crate::pubsub::SessionKey;
use crate::sys::socket::Socket;
use crate::ws::CloseCode;
use crate::ws::MessageKind;

/// Why a session did not take a fresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefused {
    /// The session's route takes no tokens.
    NotTaken,
    Invalid(crate::auth::Failure),
    /// A valid token of another user.
    OtherUser,
}

/// What the sweep asks a session to do. A bit set: several can be due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kick(u16);

impl Kick {
    pub const PING: Kick = Kick(1);
    pub const TIMEOUT: Kick = Kick(2);
    pub const SHUTDOWN: Kick = Kick(4);
    /// End now, without a close handshake (the drain time is over).
    pub const ABORT: Kick = Kick(8);
    /// Quiet for `park_after_ms`: park if nothing is in progress.
    pub const PARK: Kick = Kick(16);
    /// Deliveries were queued for the session.
    pub const DELIVER: Kick = Kick(32);
    /// The session's deliveries passed `max_outbound_bytes` (policy close).
    pub const SLOW: Kick = Kick(64);
    /// The admin API asked to close the session (`take_close_request`).
    pub const CLOSE: Kick = Kick(128);
    /// The session's token expired: close with 4001.
    pub const EXPIRED: Kick = Kick(256);

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

/// Where the core is in an ordered shutdown (`server::shutdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    No,
    /// No connection, admin request or session input is taken.
    Input,
    /// Sessions are sent their deliveries, then 1001.
    Close,
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
    /// Last time deliveries went out (a subscriber that only receives is
    /// not quiet, and does not park between deliveries).
    last_tx_ms: u64,
    last_park_kick_ms: u64,
    shutdown_sent: bool,
    kick: Kick,
    waker: Option<Waker>,
    /// Set while the session has no task.
    parked: Option<Parked>,
    /// A STOMP connection's state, and a close asked for from outside the
    /// task (the admin API, a missed heart-beat): only for some sessions.
    app: Option<Box<AppState>>,
    /// The socket of the session's task (while it has one).
    fd: RawFd,
    /// The task waits with nothing of its own queued: the shard may write
    /// deliveries to `fd` itself (`Shard::flush_direct`).
    direct: bool,
    /// The session counts against the admission caps (from its 101 until
    /// the slot is removed).
    admitted: bool,
    /// Its socket counts against the WebSocket port's share of the
    /// open-files limit (`Admission::take_socket`).
    socket_taken: bool,
    /// What only some configurations need (a per-address cap, rate
    /// limits, tokens): allocated on first use, so it weighs on no other slot.
    extra: Option<Box<Extra>>,
    /// The TLS state of a `wss://` connection (here rather than in `extra`:
    /// a TLS connection needs nothing else of it).
    tls: Option<crate::sys::socket::Tls>,
    /// STOMP heart-beats (ms, 0: none): we send one when we have sent
    /// nothing for `heart_beat_send_ms`; the peer must send something at
    /// least every `heart_beat_expect_ms`.
    heart_beat_send_ms: u64,
    heart_beat_expect_ms: u64,
}

/// A session's address (kept only under a per-address cap), the token
/// buckets of its inbound messages and bytes as of `bucket_ms` (see
/// `Session::take_tokens`), and who it is (routes that take tokens).
struct Extra {
    peer_ip: Option<std::net::IpAddr>,
    identity: Option<Identity>,
    message_tokens: f64,
    byte_tokens: f64,
    bucket_ms: u64,
}

impl Extra {
    /// Full buckets as of `now`.
    fn new(config: &Config, now: u64) -> Extra {
        Extra {
            peer_ip: None,
            identity: None,
            message_tokens: f64::from(config.max_messages_per_sec),
            byte_tokens: config.max_bytes_per_sec as f64,
            bucket_ms: now,
        }
    }
}

impl Slot {
    fn peer_ip(&self) -> Option<std::net::IpAddr> {
        self.extra.as_ref().and_then(|l| l.peer_ip)
    }

    fn tls(&self) -> Option<crate::sys::socket::Tls> {
        self.tls.clone()
    }

    fn identity(&self) -> Option<&Identity> {
        self.extra.as_ref().and_then(|e| e.identity.as_ref())
    }

    fn extra(&mut self, config: &Config, now: u64) -> &mut Extra {
        self.extra.get_or_insert_with(|| Box::new(Extra::new(config, now)))
    }
}

/// What a session's slot keeps for its protocol, outside its task.
#[derive(Default)]
struct AppState {
    /// A close the admin API (or a missed heart-beat) asked for: code and
    /// reason.
    close_request: Option<(u16, Bytes)>,
    /// A STOMP connection's codec and session state.
    stomp: Option<Box<StompConn>>,
}

/// A STOMP heart-beat: an EOL, in a text frame of its own.
const HEART_BEAT_FRAME: &[u8] = &[0x81, 0x01, b'\n'];

/// What a parked session keeps: its socket (a duplicate fd, registered in
/// the parking lot) and its route.
struct Parked {
    fd: OwnedFd,
    route: RouteId,
}

pub use crate::stats::Stats;

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
    pub admission: Arc<super::admission::Admission>,
    pub scratch: RefCell<Vec<u8>>,
    /// TLS settings of the core's `wss://` listener (shared by all cores).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The core's counters, shared with its hub.
    pub stats: Rc<RefCell<Stats>>,
    sessions: RefCell<SlotMap<SessionKey, Slot>>,
    pub hub: Hub,
    lot: ParkingLot,
    /// Parking needs the lot's waiter running (see `enable_parking`).
    parking: Cell<bool>,
    parked: Cell<usize>,
    start: Instant,
    now_ms: Cell<u64>,
    stopping: Cell<Stopping>,
    /// Woken when shutdown begins (the accept loop) or the table empties (the drain).
    watcher: Cell<Option<Waker>>,
    /// Admin connections open on this core, by id, with the waker of
    /// each that waits to read: woken when shutdown begins, so they end
    /// instead of idling. An entry leaves with its connection.
    admin_waiters: RefCell<std::collections::HashMap<u64, Option<Waker>>>,
    next_admin: Cell<u64>,
    /// The drain's deadline passed (`abort_all`): admin connections end
    /// even in the middle of a write.
    admin_aborted: Cell<bool>,
}

impl Shard {
    /// The shard of the core at `mesh`'s end of the mesh.
    pub fn new(config: Arc<Config>, mesh: CoreMesh, admission: Arc<super::admission::Admission>) -> io::Result<Shard> {
        let stats = Rc::new(RefCell::new(Stats::default()));
        Ok(Shard {
            core: mesh.core(),
            hub: Hub::new(mesh, config.clone(), stats.clone()),
            config,
            pool: BufferPool::new(POOL_BUF_BYTES, POOL_MAX_FREE),
            admission,
            scratch: RefCell::new(Vec::with_capacity(SCRATCH_BYTES)),
            tls: None,
            stats,
            sessions: RefCell::new(SlotMap::with_key()),
            lot: ParkingLot::new()?,
            parking: Cell::new(false),
            parked: Cell::new(0),
            start: Instant::now(),
            now_ms: Cell::new(0),
            stopping: Cell::new(Stopping::No),
            watcher: Cell::new(None),
            admin_waiters: RefCell::new(std::collections::HashMap::new()),
            next_admin: Cell::new(0),
            admin_aborted: Cell::new(false),
        })
    }

    /// The shard with TLS settings for its `wss://` listener.
    pub fn with_tls(mut self, tls: Option<Arc<rustls::ServerConfig>>) -> Shard {
        self.tls = tls;
        self
    }

    /// The coarse clock: milliseconds since the shard started, as of the last tick.
    pub fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// Sessions parked now (their count is also in `session_count`).
    pub fn parked_count(&self) -> usize {
        self.parked.get()
    }

    pub fn lot(&self) -> &ParkingLot {
        &self.lot
    }

    /// Lets quiet sessions park, once something resumes them when their
    /// socket is ready (`resume_ready`); if `park_after_ms` is 0, nothing parks.
    pub fn enable_parking(&self) {
        self.parking.set(self.config.park_after_ms > 0);
    }

    /// Shutdown has begun: no more connections or admin requests are taken.
    pub fn is_shutting_down(&self) -> bool {
        self.stopping.get() != Stopping::No
    }

    /// Sessions' input is not acted on any more (shutdown has begun): no
    /// publish, subscribe or reply comes from a read after this.
    pub fn takes_no_input(&self) -> bool {
        self.is_shutting_down()
    }

    /// Publishes accepted on this core that are not yet in every ring
    /// they go to (`Hub::publishes_in_flight`).
    pub fn publishes_in_flight(&self) -> usize {
        self.hub.publishes_in_flight()
    }

    /// Registers a session in the handshake phase.
    pub fn open_session(self: &Rc<Self>) -> Session {
        let now = self.now_ms();
        let key = self.sessions.borrow_mut().insert(Slot {
            phase: Phase::Handshake,
            phase_since_ms: now,
            last_rx_ms: now,
            last_ping_ms: now,
            last_tx_ms: now,
            last_park_kick_ms: now,
            shutdown_sent: false,
            kick: Kick::default(),
            waker: None,
            parked: None,
            app: None,
            fd: -1,
            direct: false,
            admitted: false,
            socket_taken: false,
            extra: None,
            tls: None,
            heart_beat_send_ms: 0,
            heart_beat_expect_ms: 0,
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

    /// Wakes the watcher (the accept loop, or the drain, which waits for
    /// admin connections too).
    pub fn wake_watcher(&self) {
        if let Some(w) = self.watcher.take() {
            w.wake();
        }
    }

    /// The shutdown's first step (see `server::shutdown`): the accept
    /// loops and admin connections end, sessions' input is no longer
    /// acted on, and sessions still in their handshake are refused (503).
    /// Open sessions keep taking deliveries.
    pub fn stop_taking_input(self: &Rc<Self>) {
        if self.stopping.get() != Stopping::No {
            return;
        }
        self.stopping.set(Stopping::Input);
        self.wake_watcher();
        self.wake_admin();
        self.hub.sessions.never_hold();
        self.kick_for_shutdown();
    }

    /// The shutdown's last step, once every publish accepted anywhere is
    /// queued here: every session gets its deliveries, then 1001. Later
    /// sweeps kick the sessions that were not reached.
    pub fn close_all(self: &Rc<Self>) {
        self.stop_taking_input();
        if self.stopping.replace(Stopping::Close) != Stopping::Close {
            self.kick_for_shutdown();
        }
    }

    /// Kicks with `SHUTDOWN` the sessions due it now: those in their
    /// handshake, and (once closing) the open ones. Each is kicked once.
    fn kick_for_shutdown(self: &Rc<Self>) {
        let mut due_parked = Vec::new();
        for (key, slot) in self.sessions.borrow_mut().iter_mut() {
            if self.shutdown_due(slot) {
                slot.shutdown_sent = true;
                slot.kick = slot.kick.with(Kick::SHUTDOWN);
                if slot.parked.is_some() {
                    due_parked.push(key);
                } else if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
        for key in due_parked {
            self.resume(key);
        }
    }

    fn shutdown_due(&self, slot: &Slot) -> bool {
        !slot.shutdown_sent
            && match (self.stopping.get(), slot.phase) {
                (Stopping::No, _) | (_, Phase::Closing) => false,
                (Stopping::Input, phase) => phase == Phase::Handshake,
                (Stopping::Close, _) => true,
            }
    }

    /// An admin connection opens: its id on this core.
    pub fn admin_opened(&self) -> u64 {
        let id = self.next_admin.get();
        self.next_admin.set(id + 1);
        self.admin_waiters.borrow_mut().insert(id, None);
        id
    }

    /// Admin connection `id` ended: it is forgotten, and the drain, which
    /// waits for admin connections too, looks again.
    pub fn admin_closed(&self, id: u64) {
        self.admin_waiters.borrow_mut().remove(&id);
        self.wake_watcher();
    }

    /// Admin connections open on this core.
    pub fn admin_count(&self) -> usize {
        self.admin_waiters.borrow().len()
    }

    /// For admin connection `id`: `true` once shutdown began; otherwise
    /// `waker` is woken when it does.
    pub fn poll_shutdown(&self, id: u64, waker: &Waker) -> bool {
        self.is_shutting_down() || !self.admin_wait(id, waker)
    }

    /// For admin connection `id`: `true` once the drain's deadline passed;
    /// otherwise `waker` is woken when it does.
    pub fn poll_aborted(&self, id: u64, waker: &Waker) -> bool {
        self.admin_aborted.get() || !self.admin_wait(id, waker)
    }

    /// Keeps `waker` as admin connection `id`'s (woken at shutdown and at
    /// the drain's deadline); `false` if there is no such connection.
    fn admin_wait(&self, id: u64, waker: &Waker) -> bool {
        let mut waiters = self.admin_waiters.borrow_mut();
        let Some(slot) = waiters.get_mut(&id) else { return false };
        match slot {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
        true
    }

    fn wake_admin(&self) {
        for w in self.admin_waiters.borrow_mut().values_mut().filter_map(Option::take) {
            w.wake();
        }
    }

    /// Ends every session at its next poll (after the drain timeout); a
    /// parked one at once, by closing its socket.
    pub fn abort_all(&self) {
        self.admin_aborted.set(true);
        self.wake_admin();
        let mut aborted_parked = 0;
        let mut removed = Vec::new();
        let empty = {
            let mut sessions = self.sessions.borrow_mut();
            sessions.retain(|key, slot| {
                if slot.parked.is_some() {
                    aborted_parked += 1;
                    self.release_slot(slot);
                    removed.push(key);
                    return false;
                }
                slot.kick = slot.kick.with(Kick::ABORT);
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
                true
            });
            sessions.is_empty()
        };
        for key in removed {
            self.hub.remove_session(key);
        }
        self.parked.set(self.parked.get() - aborted_parked);
        // As for a task that is aborted: no close frame came from the peer.
        *self.stats.borrow_mut().closed.entry(CloseCode::ABNORMAL.0).or_default() += aborted_parked as u64;
        if empty {
            self.wake_watcher();
        }
    }

    /// What a slot being removed gives back: its place under the
    /// admission caps. (Its pub/sub state the caller removes from the hub,
    /// outside the table's borrow: `Hub::remove_session`.)
    fn release_slot(&self, slot: &mut Slot) {
        if std::mem::take(&mut slot.admitted) {
            self.admission.release(slot.peer_ip());
        }
        if std::mem::take(&mut slot.socket_taken) {
            self.admission.release_socket();
        }
    }

    /// One tick: advance the clock and kick every session that is due.
    pub fn sweep(self: &Rc<Self>) {
        self.sweep_at(self.start.elapsed().as_millis() as u64);
    }

    fn sweep_at(self: &Rc<Self>, now: u64) {
        self.now_ms.set(now);
        let c = &self.config;
        let shutting_down = self.is_shutting_down();
        let park_after = if self.parking.get() { c.park_after_ms } else { 0 };
        let mut due_parked = Vec::new();
        let mut due_heart_beats = Vec::new();
        let unix_now = crate::auth::unix_now();
        // Subscribers shed because the core was held too long are closed.
        let slow = self.hub.sessions.tick(now);
        let sessions_hub = &self.hub.sessions;
        for (key, slot) in self.sessions.borrow_mut().iter_mut() {
            let mut due = Kick::default();
            let in_phase = now.saturating_sub(slot.phase_since_ms);
            match slot.phase {
                Phase::Handshake if in_phase >= c.handshake_timeout_ms => due = due.with(Kick::TIMEOUT),
                Phase::Closing if in_phase >= c.close_timeout_ms => due = due.with(Kick::TIMEOUT),
                Phase::Open => {
                    let quiet = now.saturating_sub(slot.last_rx_ms);
                    // STOMP 1.2 "Heart-beating": an EOL when we have been
                    // quiet for our interval (unless something is queued);
                    // a peer silent past its interval and the grace is dead.
                    if slot.heart_beat_send_ms > 0
                        && now.saturating_sub(slot.last_tx_ms) >= slot.heart_beat_send_ms
                        && sessions_hub.queue_is_empty(key)
                    {
                        due_heart_beats.push(key);
                    }
                    // (A client's interval may be anything: the sum saturates.
                    // A session waiting for ring space is not reading, so
                    // its peer's heart-beats are not seen: not counted.)
                    if slot.heart_beat_expect_ms > 0
                        && quiet >= slot.heart_beat_expect_ms.saturating_add(c.stomp_heart_beat_grace_ms)
                        && !slot.kick.has(Kick::CLOSE)
                        && !sessions_hub.is_blocked(key)
                    {
                        let app = slot.app.get_or_insert_with(Default::default);
                        if app.close_request.is_none() {
                            app.close_request =
                                Some((CloseCode::GOING_AWAY.0, Bytes::from_static(b"missed heart-beats")));
                            due = due.with(Kick::CLOSE);
                        }
                    }
                    if slot
                        .identity()
                        .and_then(|id| id.expires_at)
                        .is_some_and(|at| unix_now >= at)
                    {
                        due = due.with(Kick::EXPIRED);
                    }
                    if c.idle_timeout_ms > 0 && quiet >= c.idle_timeout_ms {
                        due = due.with(Kick::TIMEOUT);
                    } else if c.ping_interval_ms > 0
                        && quiet >= c.ping_interval_ms
                        && now.saturating_sub(slot.last_ping_ms) >= c.ping_interval_ms
                    {
                        slot.last_ping_ms = now;
                        due = due.with(Kick::PING);
                    } else if park_after > 0
                        && slot.parked.is_none()
                        && !shutting_down
                        && quiet >= park_after
                        && now.saturating_sub(slot.last_tx_ms) >= park_after
                        && now.saturating_sub(slot.last_park_kick_ms) >= park_after
                    {
                        slot.last_park_kick_ms = now;
                        due = due.with(Kick::PARK);
                    }
                }
                _ => {}
            }
            if self.shutdown_due(slot) {
                slot.shutdown_sent = true;
                due = due.with(Kick::SHUTDOWN);
            }
            if !due.is_empty() {
                slot.kick = slot.kick.with(due);
                if slot.parked.is_some() {
                    due_parked.push(key);
                } else if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
        for key in due_parked {
            self.resume(key);
        }
        for key in due_heart_beats {
            self.hub
                .sessions
                .deliver_frame(key, &Bytes::from_static(HEART_BEAT_FRAME), false);
        }
        for key in slow {
            self.kick(key, Kick::SLOW);
        }
    }

    /// Starts a task again for every parked session whose socket became
    /// ready. Called when the lot's waiter is readable.
    pub fn resume_ready(self: &Rc<Self>, keys: &mut Vec<u64>) -> std::io::Result<()> {
        loop {
            keys.clear();
            let more = self.lot.ready(keys)?;
            for &token in keys.iter() {
                // A stale token (the session resumed or ended since) finds no
                // parked slot: the generation in the key tells them apart.
                self.resume(SessionKey::from(KeyData::from_ffi(token)));
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Gives a parked session a task again; its pending kicks are waiting
    /// in its slot. Does nothing if the session is not parked.
    fn resume(self: &Rc<Self>, key: SessionKey) {
        let parked = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(parked) = sessions.get_mut(key).and_then(|s| s.parked.take()) else {
                return;
            };
            parked
        };
        self.parked.set(self.parked.get() - 1);
        self.lot.remove(parked.fd.as_raw_fd());
        self.stats.borrow_mut().resumes += 1;
        let session = Session {
            shard: self.clone(),
            key,
        };
        match monoio::net::TcpStream::from_std(std::net::TcpStream::from(parked.fd)) {
            Ok(stream) => {
                monoio::spawn(super::resume(stream, session, parked.route));
            }
            Err(e) => {
                // The runtime could not take the socket back (out of memory):
                // the connection is lost, as if the peer had vanished.
                tracing::warn!(core = self.core, error = %e, "cannot resume a parked connection");
                self.count_close(CloseCode::ABNORMAL);
                // Ended in a task of its own: this may run inside a
                // delivery, which holds the topic table its end changes.
                monoio::spawn(async move { drop(session) });
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
            c.park_after_ms,
        ]
        .into_iter()
        .filter(|&t| t > 0)
        .min()
        .unwrap_or(1000);
        (shortest / 4).clamp(10, 100)
    }

    /// For the flusher: the sessions the hub listed ready (`Ready`), or
    /// `cx`'s waker is kept to be woken when there are some.
    pub fn poll_ready(
        &self,
        cx: &mut std::task::Context<'_>,
        batch: &mut Vec<(SessionKey, Ready)>,
    ) -> std::task::Poll<()> {
        self.hub.sessions.poll_ready(cx, batch)
    }

    /// Writes the queued deliveries of each session in `batch` straight to
    /// its socket, without waking its task: a subscriber idle in its wait,
    /// or parked, costs one vectored send per batch of deliveries. A socket
    /// that is full (or failing) is left to the session's task, which is
    /// kicked (or resumed) to wait for it, as is a session whose task runs,
    /// and one made slow (to be closed). Writes at most `max` sessions of
    /// `batch` from `from`; returns where it stopped.
    pub fn flush_direct(self: &Rc<Self>, batch: &[(SessionKey, Ready)], from: usize, max: usize) -> usize {
        let now = self.now_ms();
        let until = batch.len().min(from.saturating_add(max));
        for &(key, why) in &batch[from..until] {
            if why == Ready::Slow {
                self.kick(key, Kick::SLOW);
                continue;
            }
            let written = {
                let mut sessions = self.sessions.borrow_mut();
                let Some(slot) = sessions.get_mut(key) else { continue };
                if self.hub.sessions.queue_is_empty(key) {
                    // Written meanwhile by its task.
                    continue;
                }
                let fd = match &slot.parked {
                    Some(parked) => parked.fd.as_raw_fd(),
                    None if slot.direct => slot.fd,
                    // Its task runs: it writes its deliveries itself.
                    None => -1,
                };
                if fd < 0 || slot.phase != Phase::Open {
                    false
                } else {
                    // SAFETY: a parked slot owns its fd; a direct one's task
                    // owns it and is suspended in its wait (`direct` is
                    // cleared before the task can close it).
                    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                    let socket = Socket::from_fd(fd).with_tls(slot.tls());
                    matches!(write_deliveries(slot, key, &socket, false, now, self), Ok(Flush::Done))
                }
            };
            if !written {
                self.kick(key, Kick::DELIVER);
            }
        }
        until
    }

    /// Adds `kick` to session `key` and wakes its task, or gives it a task
    /// again if it is parked.
    fn kick(self: &Rc<Self>, key: SessionKey, kick: Kick) {
        let resume = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(slot) = sessions.get_mut(key) else { return };
            slot.kick = slot.kick.with(kick);
            if slot.parked.is_some() {
                true
            } else {
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
                false
            }
        };
        if resume {
            self.resume(key);
        }
    }

    /// Carries out an admin API action on session `key` of this core.
    /// `false` if there is no such open session.
    pub fn act_on_session(self: &Rc<Self>, key: SessionKey, action: crate::pubsub::mesh::SessionAction) -> bool {
        use crate::pubsub::mesh::SessionAction;
        {
            let mut sessions = self.sessions.borrow_mut();
            let Some(slot) = sessions.get_mut(key) else {
                return false;
            };
            if slot.phase != Phase::Open {
                return false;
            }
            if let SessionAction::Close(code, reason) = &action {
                slot.app.get_or_insert_with(Default::default).close_request = Some((*code, reason.clone()));
            }
        }
        match action {
            SessionAction::Send(frame) => {
                // Any open session takes it (an echo one too): its queue
                // is made now.
                self.hub.sessions.open(key);
                self.hub.sessions.deliver_frame(key, &frame, true);
            }
            SessionAction::Close(..) => self.kick(key, Kick::CLOSE),
        }
        true
    }

    /// Counts an ended session by its peer's close code, bucketed
    /// (`CloseCode::bucket`): a client cannot make the series many.
    pub fn count_close(&self, code: CloseCode) {
        *self.stats.borrow_mut().closed.entry(code.bucket().0).or_default() += 1;
    }

    pub fn count_close_sent(&self, code: CloseCode) {
        *self.stats.borrow_mut().close_sent.entry(code.0).or_default() += 1;
    }

    pub fn count_rejected(&self, status: u16) {
        *self.stats.borrow_mut().rejected.entry(status).or_default() += 1;
    }
}

/// Writes a session's queued deliveries (`Sessions::write`), many parts
/// per vectored send, until the queue is empty or the socket is full. With
/// `partial_only`, only the rest of a message already partly written.
fn write_deliveries(
    slot: &mut Slot,
    key: SessionKey,
    socket: &Socket<'_>,
    partial_only: bool,
    now: u64,
    shard: &Shard,
) -> io::Result<Flush> {
    let sessions = &shard.hub.sessions;
    let (flushed, written) = sessions.write(key, partial_only, |iov| socket.send_vectored(iov))?;
    if written > 0 {
        slot.last_tx_ms = now;
    }
    if let Flush::Blocked = flushed {
        return Ok(Flush::Blocked);
    }
    if !socket.flush_pending()? {
        // Ciphertext the socket did not take: it is full.
        sessions.stall(key);
        return Ok(Flush::Blocked);
    }
    Ok(Flush::Done)
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

    /// The session's id for the admin API and `HELLO`: core, slot and
    /// generation, `<core>.<slot>.<generation>`.
    pub fn id(&self) -> String {
        let ffi = self.key.data().as_ffi();
        format!("{}.{}.{}", self.shard.core, ffi & 0xffff_ffff, ffi >> 32)
    }

    pub fn key(&self) -> SessionKey {
        self.key
    }

    /// Makes this a pub/sub session: it can subscribe and take deliveries.
    pub fn enable_pubsub(&self) {
        self.shard.hub.sessions.open(self.key);
    }

    /// Subscribes the session to `topic` (a valid name); `Ok(false)` if it
    /// already was. Fails at `max_subscriptions`.
    pub fn subscribe(&self, topic: &[u8]) -> Result<bool, crate::proto::native::Refusal> {
        let max = self.shard.config.max_subscriptions;
        self.shard
            .hub
            .subscribe_native(self.key, topic, max)
            .map_err(|_| crate::proto::native::Refusal::TooManySubscriptions)
    }

    pub fn unsubscribe(&self, topic: &[u8]) {
        self.shard.hub.unsubscribe_native(self.key, topic);
    }

    /// Adds a STOMP subscription to the topic table key `key` (the session
    /// rules bound how many there are).
    pub fn subscribe_stomp(&self, key: &[u8], target: StompTarget) {
        self.shard.hub.subscribe_stomp(self.key, key, target);
    }

    /// Ends the STOMP subscription `id` (escaped) to `key`.
    pub fn unsubscribe_stomp(&self, key: &[u8], id: &str) {
        self.shard.hub.unsubscribe_stomp(self.key, key, id);
    }

    /// Publishes a native message from this session.
    pub fn publish(&self, kind: MessageKind, topic: &[u8], payload: &[u8]) {
        let id = self.shard.hub.next_message_id();
        self.publish_message(Message::native(kind, topic, payload, id));
    }

    /// Publishes from this session (`Hub::publish_from`): the session is
    /// not read while its publish waits (`poll_unblocked`).
    pub fn publish_message(&self, message: Message) {
        self.shard.hub.publish_from(self.key, message);
    }

    /// Sets the negotiated STOMP heart-beats (ms, 0: none): the sweep sends
    /// ours and closes the session when the peer's stop.
    pub fn set_heart_beats(&self, send_ms: u64, expect_ms: u64) {
        self.with(|s| {
            s.heart_beat_send_ms = send_ms;
            s.heart_beat_expect_ms = expect_ms;
        });
    }

    /// Makes this a STOMP session with this state.
    pub fn set_stomp(&self, conn: Box<StompConn>) {
        self.with(|s| s.app.get_or_insert_with(Default::default).stomp = Some(conn));
    }

    /// Runs `f` on the session's STOMP state (`None` if it has none). The
    /// state is out of the slot meanwhile, so `f` may use the shard.
    pub fn with_stomp<R>(&self, f: impl FnOnce(&mut StompConn) -> R) -> Option<R> {
        let mut conn = self.with(|s| s.app.as_mut().and_then(|a| a.stomp.take()))?;
        let r = f(&mut conn);
        self.set_stomp(conn);
        Some(r)
    }

    /// Whether a publish waits for ring space, or for the core's queued
    /// deliveries to be written down.
    pub fn is_blocked(&self) -> bool {
        self.shard.hub.sessions.is_blocked(self.key)
    }

    /// Ready once no publish waits for ring space and the core takes
    /// publishes again.
    pub fn poll_unblocked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.shard.hub.poll_unblocked(self.key, cx)
    }

    /// The close the admin API asked for, if any.
    pub fn take_close_request(&self) -> Option<(u16, Bytes)> {
        self.with(|s| s.app.as_mut().and_then(|a| a.close_request.take()))
    }

    /// Whether deliveries wait to be written.
    pub fn has_deliveries(&self) -> bool {
        self.shard.hub.sessions.has_deliveries(self.key)
    }

    /// Writes queued deliveries, many frames per vectored send, until the
    /// queue is empty or the socket is full. With `partial_only`, only the
    /// rest of a frame already partly written: other output may go out
    /// only between whole frames.
    pub fn flush_deliveries(&self, socket: &Socket<'_>, partial_only: bool) -> io::Result<Flush> {
        let now = self.shard.now_ms();
        let key = self.key;
        self.with(|s| write_deliveries(s, key, socket, partial_only, now, &self.shard))
    }

    /// Takes one message of `len` payload bytes from the connection's
    /// buckets: `false` (counted) if either limit refuses it. A bucket holds
    /// one second's worth and refills at its rate; a message needs a whole
    /// message token, and bytes not overdrawn (a message larger than the
    /// byte rate passes on a full bucket and overdraws it).
    pub fn take_tokens(&self, len: usize) -> bool {
        let c = &self.shard.config;
        if c.max_messages_per_sec == 0 && c.max_bytes_per_sec == 0 {
            return true;
        }
        let now = self.shard.now_ms();
        let (messages, bytes) = (f64::from(c.max_messages_per_sec), c.max_bytes_per_sec as f64);
        let taken = self.with(|s| {
            let b = s.extra(c, now);
            let seconds = now.saturating_sub(b.bucket_ms) as f64 / 1000.0;
            b.bucket_ms = now;
            b.message_tokens = super::admission::refill(b.message_tokens, seconds, messages);
            b.byte_tokens = super::admission::refill(b.byte_tokens, seconds, bytes);
            let fits = (messages == 0.0 || b.message_tokens >= 1.0) && (bytes == 0.0 || b.byte_tokens >= 0.0);
            if fits {
                b.message_tokens -= 1.0;
                b.byte_tokens -= len as f64;
            }
            fits
        });
        if !taken {
            self.shard.stats.borrow_mut().rate_limited += 1;
        }
        taken
    }

    /// Records that the session's socket holds a place it took with
    /// `Admission::take_socket`, given back when the slot is removed.
    pub fn hold_socket_place(&self) {
        self.with(|s| s.socket_taken = true);
    }

    /// Records the client's address (for the per-address cap).
    pub fn set_peer_ip(&self, ip: std::net::IpAddr) {
        let config = &self.shard.config;
        if config.max_connections_per_ip == 0 && config.max_handshakes_per_sec_per_ip == 0 {
            return;
        }
        let now = self.shard.now_ms();
        self.with(|s| s.extra(config, now).peer_ip = Some(ip));
    }

    /// Charges the handshake to its address's rate, then runs `identify`
    /// (the token check), then counts the session against the admission
    /// caps (its handshake is about to succeed); or says which refuses it
    /// (counted). The rate comes first so that a flood of bad tokens is
    /// refused with 429 before any signature is checked.
    pub fn admit(
        &self,
        identify: impl FnOnce() -> Result<Option<Identity>, crate::ws::handshake::Reject>,
    ) -> Result<(), crate::ws::handshake::Reject> {
        use crate::ws::handshake::Reject;
        let ip = self.with(|s| s.peer_ip());
        let admission = &self.shard.admission;
        let count = |reject: Reject| {
            let mut stats = self.shard.stats.borrow_mut();
            match reject {
                Reject::TooManyHandshakes => stats.refused_handshake_rate += 1,
                Reject::TooManyFromAddress => stats.refused_max_per_ip += 1,
                _ => stats.refused_max_connections += 1,
            }
            reject
        };
        admission.handshake(ip, std::time::Instant::now()).map_err(count)?;
        // A refused token is counted by the caller (a 401 like any other).
        let identity = identify()?;
        admission.admit(ip).map_err(count)?;
        let (config, now) = (&self.shard.config, self.shard.now_ms());
        self.with(|s| {
            s.admitted = true;
            if identity.is_some() {
                s.extra(config, now).identity = identity;
            }
        });
        Ok(())
    }

    /// Whether the session may do `action` on `topic` (docs/PROTOCOL.md,
    /// "Authentication and permissions"); a refusal is counted.
    pub fn allows(&self, action: Action, topic: &[u8]) -> bool {
        let allowed = self.with(|s| crate::auth::allows(s.identity(), action, topic));
        if !allowed {
            let mut stats = self.shard.stats.borrow_mut();
            match action {
                Action::Subscribe => stats.denied_subscribes += 1,
                Action::Publish => stats.denied_publishes += 1,
            }
        }
        allowed
    }

    /// The native topics the session is subscribed to that its identity
    /// no longer allows (after a fresh token with fewer grants).
    pub fn disallowed_topics(&self) -> Vec<Box<[u8]>> {
        let mut topics = self.shard.hub.sessions.topics_of(self.key);
        self.with(|s| topics.retain(|t| !crate::auth::allows(s.identity(), Action::Subscribe, t)));
        topics
    }

    /// Takes a fresh token in the session (native `AUTH`, STOMP CONNECT):
    /// its identity replaces the session's, which moves its expiry. Only
    /// the same user's token, or any valid one for an anonymous session
    /// (which becomes that user's); nothing changes on a refusal.
    pub fn take_token(&self, token: &[u8]) -> Result<(), TokenRefused> {
        let Some(verifier) = self.shard.config.verifier.as_deref() else {
            return Err(TokenRefused::NotTaken);
        };
        if self.with(|s| s.identity().is_none()) {
            return Err(TokenRefused::NotTaken);
        }
        let identity = verifier
            .verify(token, crate::auth::unix_now())
            .map_err(TokenRefused::Invalid)?;
        self.with(|s| match s.extra.as_mut().and_then(|e| e.identity.as_mut()) {
            None => Err(TokenRefused::NotTaken),
            Some(current) if current.user.is_some() && current.user != identity.user => Err(TokenRefused::OtherUser),
            Some(current) => {
                *current = identity;
                Ok(())
            }
        })?;
        self.shard.stats.borrow_mut().token_refreshes += 1;
        Ok(())
    }

    /// Makes the session a TLS one (a connection of a TLS listener).
    pub fn set_tls(&self, tls: crate::tls::TlsSession) {
        self.with(|s| s.tls = Some(Rc::new(std::cell::RefCell::new(tls))));
    }

    /// The session's TLS state, if it has one.
    pub fn tls(&self) -> Option<crate::sys::socket::Tls> {
        self.with(|s| s.tls())
    }

    /// Ends the session's task at its next wait, without a word.
    pub fn abort(&self) {
        self.with(|s| s.kick = s.kick.with(Kick::ABORT));
    }

    /// Records the socket of the session's task.
    pub fn set_fd(&self, fd: RawFd) {
        self.with(|s| s.fd = fd);
    }

    /// Whether the shard may write deliveries to the task's socket itself:
    /// only while the task waits with nothing of its own queued.
    pub fn set_direct(&self, direct: bool) {
        self.with(|s| s.direct = direct);
    }

    pub fn set_phase(&self, phase: Phase) {
        let now = self.shard.now_ms();
        self.with(|s| {
            s.phase = phase;
            s.phase_since_ms = now;
        });
        if phase == Phase::Closing {
            // Nothing may follow our close frame (RFC 6455 5.5.1).
            self.shard.hub.sessions.close(self.key);
        }
    }

    /// Records that the peer is alive: it sent bytes, or took some of ours
    /// (resets the idle clock, so a stalled write also times out).
    pub fn peer_alive(&self) {
        let now = self.shard.now_ms();
        self.with(|s| s.last_rx_ms = now);
    }

    /// Parks the session: from now on its slot holds `fd` (a duplicate of
    /// the task's socket) and the lot watches it; the task must end, and
    /// dropping this handle then keeps the slot. On error nothing changed.
    pub fn park(&self, fd: OwnedFd, route: RouteId) -> std::io::Result<()> {
        let shard = &self.shard;
        shard.lot.add(fd.as_raw_fd(), self.key.data().as_ffi())?;
        self.with(|s| {
            s.parked = Some(Parked { fd, route });
            // The task is ending: a waker kept here would keep its memory.
            s.waker = None;
        });
        shard.parked.set(shard.parked.get() + 1);
        shard.stats.borrow_mut().parks += 1;
        Ok(())
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
            if sessions.get(self.key).is_some_and(|s| s.parked.is_some()) {
                // Parked: the slot lives on without a task.
                return;
            }
            if let Some(mut slot) = sessions.remove(self.key) {
                self.shard.release_slot(&mut slot);
            }
            sessions.is_empty()
        };
        // A closing connection leaves all its topics, and its publishes
        // still waiting for ring space are sent after it.
        self.shard.hub.remove_session(self.key);
        if empty && self.shard.is_shutting_down() {
            self.shard.wake_watcher();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
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
        test_shard(opts)
    }

    pub(crate) fn test_shard(opts: Options) -> Rc<Shard> {
        let mesh = crate::pubsub::mesh::build(1, 16).unwrap().pop().unwrap();
        let config = Arc::new(opts.validate(1).unwrap());
        let admission = Arc::new(crate::conn::admission::Admission::from_config(&config));
        Rc::new(Shard::new(config, mesh, admission).unwrap())
    }

    /// Queues a whole frame for session `key`, as the admin API does.
    fn deliver(shard: &Rc<Shard>, key: SessionKey, frame: &Bytes) {
        shard.hub.sessions.deliver_frame(key, frame, true);
    }

    /// Runs the flusher once over the sessions the hub listed ready: it
    /// writes to idle ones, and kicks the others (`Kick::DELIVER`, `SLOW`).
    fn run_flusher(shard: &Rc<Shard>) {
        let (_, w) = waker();
        let mut cx = std::task::Context::from_waker(&w);
        let mut batch = Vec::new();
        if shard.poll_ready(&mut cx, &mut batch).is_ready() {
            shard.flush_direct(&batch, 0, batch.len());
        }
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
    fn quiet_open_session_is_asked_to_park_once_per_interval() {
        let opts = Options {
            ping_interval_ms: Some(1000),
            idle_timeout_ms: Some(3000),
            park_after_ms: Some(400),
            ..Options::default()
        };
        let shard = test_shard(opts);
        let s = shard.open_session();
        let h = shard.open_session();
        s.set_phase(Phase::Open);
        let (_, w) = waker();
        // Without the lot's waiter running, nothing is asked to park.
        shard.sweep_at(400);
        assert_eq!(s.poll_kick(&w), None);
        shard.enable_parking();
        shard.sweep_at(399);
        assert_eq!(s.poll_kick(&w), None, "quiet for less than park_after_ms");
        shard.sweep_at(400);
        assert_eq!(s.poll_kick(&w), Some(Kick::PARK));
        // A session that could not park is asked again one interval later.
        shard.sweep_at(799);
        assert_eq!(s.poll_kick(&w), None);
        shard.sweep_at(800);
        assert_eq!(s.poll_kick(&w), Some(Kick::PARK));
        // A due ping comes first; parking waits for a later tick.
        shard.sweep_at(1200);
        assert_eq!(s.poll_kick(&w), Some(Kick::PING));
        shard.sweep_at(1600);
        assert_eq!(s.poll_kick(&w), Some(Kick::PARK));
        // Hearing from the peer restarts the quiet time.
        s.peer_alive();
        shard.sweep_at(1999);
        assert_eq!(s.poll_kick(&w), None);
        // Sessions in the handshake (or closing) never park.
        assert_eq!(h.poll_kick(&w), None);
    }

    #[test]
    fn outbound_limit_is_exact() {
        let opts = Options {
            max_outbound_bytes: Some(1024),
            ..Options::default()
        };
        let shard = test_shard(opts);
        let s = shard.open_session();
        s.set_phase(Phase::Open);
        s.enable_pubsub();
        let (_, w) = waker();
        let frame = Bytes::from(vec![0u8; 512]);
        deliver(&shard, s.key(), &frame);
        run_flusher(&shard);
        assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
        // Before its socket has refused anything, a burst is not the
        // subscriber's backlog: all of it is queued.
        deliver(&shard, s.key(), &Bytes::from(vec![0u8; 4096]));
        assert_eq!(shard.hub.sessions.queued_bytes(), 512 + 4096);
        let (_full, _peer) = stall(&s);
        // A backlog one byte short of the limit takes a message of any
        // size: the limit bounds what waits, not one message.
        let s = shard.open_session();
        s.set_phase(Phase::Open);
        s.enable_pubsub();
        let queued = shard.hub.sessions.queued_bytes();
        deliver(&shard, s.key(), &frame);
        let (_full, _peer) = stall(&s);
        deliver(&shard, s.key(), &Bytes::from(vec![0u8; 511]));
        deliver(&shard, s.key(), &Bytes::from(vec![0u8; 4096]));
        assert_eq!(shard.stats.borrow().deliveries, 5);
        assert_eq!(shard.hub.sessions.queued_bytes() - queued, 1023 + 4096);
        run_flusher(&shard);
        assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
        // A backlog at or past the limit takes no more: the session is a
        // slow consumer, its queue freed.
        deliver(&shard, s.key(), &Bytes::from_static(&[0]));
        run_flusher(&shard);
        assert_eq!(s.poll_kick(&w), Some(Kick::SLOW));
        assert_eq!(shard.stats.borrow().slow_consumers, 1);
        assert!(!s.has_deliveries());
        assert_eq!(shard.hub.sessions.queued_bytes(), queued);
        // And it takes nothing more.
        deliver(&shard, s.key(), &frame);
        assert_eq!(shard.stats.borrow().deliveries, 5);
        // An empty queue takes one message larger than the limit.
        let t = shard.open_session();
        t.set_phase(Phase::Open);
        t.enable_pubsub();
        deliver(&shard, t.key(), &Bytes::from(vec![0u8; 1024 * 64]));
        assert!(t.has_deliveries());
        assert_eq!(shard.stats.borrow().slow_consumers, 1);
    }

    #[test]
    fn outbound_limit_under_drop_policy_drops_and_counts() {
        let opts = Options {
            max_outbound_bytes: Some(1024),
            slow_consumer: Some(crate::config::SlowConsumer::Drop),
            ..Options::default()
        };
        let shard = test_shard(opts);
        let s = shard.open_session();
        s.set_phase(Phase::Open);
        s.enable_pubsub();
        let frame = Bytes::from(vec![0u8; 512]);
        deliver(&shard, s.key(), &frame);
        let (_full, _peer) = stall(&s);
        for _ in 0..2 {
            deliver(&shard, s.key(), &frame);
        }
        let stats = shard.stats.borrow();
        // The third finds a backlog at the limit.
        assert_eq!((stats.deliveries, stats.dropped, stats.slow_consumers), (2, 1, 0));
        drop(stats);
        assert!(s.has_deliveries());
    }

    /// Tries to write `s`'s deliveries to a socket that takes nothing (its
    /// peer never reads): the socket refuses them, as a stalled peer's does.
    fn stall(s: &Session) -> (std::os::unix::net::UnixStream, std::os::unix::net::UnixStream) {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        while (&ours).write(&[0u8; 4096]).is_ok() {}
        let flushed = s.flush_deliveries(&Socket::from_fd(ours.as_fd()), false).unwrap();
        assert!(matches!(flushed, Flush::Blocked));
        (ours, peer)
    }

    fn budget_opts(slow_consumer: crate::config::SlowConsumer, max_outbound_bytes: usize) -> Options {
        Options {
            max_outbound_bytes: Some(max_outbound_bytes),
            max_core_outbound_bytes: Some(4096),
            stall_timeout_ms: Some(100),
            slow_consumer: Some(slow_consumer),
            ..Options::default()
        }
    }

    fn open_subscriber(shard: &Rc<Shard>) -> Session {
        let s = shard.open_session();
        s.set_phase(Phase::Open);
        s.enable_pubsub();
        s
    }

    /// Every way a subscriber starts closing (peer close, violation, rate
    /// limit, idle timeout, admin close, missed heart-beats, token expiry)
    /// goes through `Phase::Closing`, which drops its unsent deliveries:
    /// they leave the core's total then, not only when the slot goes.
    #[test]
    fn deliveries_dropped_at_closing_leave_the_core_total() {
        let shard = test_shard(budget_opts(crate::config::SlowConsumer::Close, 1024));
        let s = open_subscriber(&shard);
        deliver(&shard, s.key(), &Bytes::from(vec![0u8; 1000]));
        assert_eq!(shard.hub.sessions.queued_bytes(), 1000);
        s.set_phase(Phase::Closing);
        assert_eq!(shard.hub.sessions.queued_bytes(), 0, "dropped at the close");
        drop(s);
        assert_eq!(shard.hub.sessions.queued_bytes(), 0);
        // Over the budget with publishers held: subscribers that close
        // release the hold, and the core is left with nothing counted.
        let subs: Vec<Session> = (0..5).map(|_| open_subscriber(&shard)).collect();
        for s in &subs {
            deliver(&shard, s.key(), &Bytes::from(vec![0u8; 1000]));
        }
        let (woken, w) = waker();
        let mut cx = std::task::Context::from_waker(&w);
        assert!(shard.hub.sessions.poll_budget(&mut cx).is_pending());
        for s in &subs {
            s.set_phase(Phase::Closing);
        }
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "the hold ended");
        assert!(shard.hub.sessions.poll_budget(&mut cx).is_ready());
        drop(subs);
        assert_eq!((shard.session_count(), shard.hub.sessions.queued_bytes()), (0, 0));
        assert!(!shard.hub.sessions.over_budget());
    }

    #[test]
    fn core_budget_holds_publishers_past_the_limit_until_half_is_written() {
        use std::os::fd::AsFd;
        let shard = test_shard(budget_opts(crate::config::SlowConsumer::Close, 1024));
        let subs: Vec<Session> = (0..5).map(|_| open_subscriber(&shard)).collect();
        subs[4].subscribe(b"t").unwrap();
        let publisher = open_subscriber(&shard);
        let (woken, w) = waker();
        let mut cx = std::task::Context::from_waker(&w);
        let kib = Bytes::from(vec![0u8; 1024]);
        for s in &subs[..4] {
            deliver(&shard, s.key(), &kib);
        }
        // Exactly at the budget: publishing goes on.
        assert_eq!(shard.hub.sessions.queued_bytes(), 4096);
        assert!(!shard.hub.sessions.over_budget());
        assert!(shard.hub.sessions.poll_budget(&mut cx).is_ready());
        // The publish that takes the core over is made; then its publisher
        // waits, not read until the hold ends.
        publisher.publish(MessageKind::Binary, b"t", &[7; 100]);
        assert!(shard.hub.sessions.over_budget());
        assert!(publisher.is_blocked());
        assert!(publisher.poll_unblocked(&mut cx).is_pending());
        assert!(shard.hub.sessions.poll_budget(&mut cx).is_pending());
        assert_eq!(shard.hub.sessions.budget_waiter_count(), 1, "one waker per task");
        assert_eq!(shard.stats.borrow().publish_holds, 1);
        // Written down, but still above half: held.
        let (ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let socket = Socket::from_fd(ours.as_fd());
        for s in [&subs[4], &subs[0]] {
            s.flush_deliveries(&socket, false).unwrap();
        }
        assert_eq!(shard.hub.sessions.queued_bytes(), 3072);
        assert!(shard.hub.sessions.poll_budget(&mut cx).is_pending());
        assert_eq!(woken.0.load(Ordering::SeqCst), 0);
        // Exactly half: the hold ends and its waiters are woken.
        subs[1].flush_deliveries(&socket, false).unwrap();
        assert_eq!(shard.hub.sessions.queued_bytes(), 2048);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(publisher.poll_unblocked(&mut cx).is_ready());
        assert!(!publisher.is_blocked());
        // A session that ends gives its queue back.
        drop(subs);
        assert_eq!(shard.hub.sessions.queued_bytes(), 0);
    }

    #[test]
    fn rate_limits_are_exact_and_refill_with_time() {
        let shard = test_shard(Options {
            max_messages_per_sec: Some(3),
            max_bytes_per_sec: Some(1000),
            ..Options::default()
        });
        let s = shard.open_session();
        // A second's worth at once: three messages, the fourth refused.
        for _ in 0..3 {
            assert!(s.take_tokens(10));
        }
        assert!(!s.take_tokens(10));
        assert_eq!(shard.stats.borrow().rate_limited, 1);
        // 333 ms give back 0.999 of a message: still refused; 334 ms, one.
        shard.sweep_at(333);
        assert!(!s.take_tokens(10));
        shard.sweep_at(334);
        assert!(s.take_tokens(10));
        assert!(!s.take_tokens(10));
        // Bytes: a full bucket (1000) takes a 1500-byte message and is
        // overdrawn by 500, so nothing passes until 500 ms have refilled it.
        let b = shard.open_session();
        assert!(b.take_tokens(1500));
        shard.sweep_at(334 + 499);
        assert!(!b.take_tokens(1));
        shard.sweep_at(334 + 500);
        assert!(b.take_tokens(1));
        // No limits: always.
        let free = test_shard(Options::default()).open_session();
        assert!((0..10_000).all(|_| free.take_tokens(1 << 20)));
    }

    #[test]
    fn idle_sessions_take_deliveries_without_their_task() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let shard = test_shard(Options::default());
        let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let s = shard.open_session();
        s.set_phase(Phase::Open);
        s.enable_pubsub();
        s.set_fd(ours.as_raw_fd());
        let (woken, w) = waker();
        let mut cx = std::task::Context::from_waker(&w);
        let mut batch = Vec::new();
        assert!(shard.poll_ready(&mut cx, &mut batch).is_pending());

        // Waiting in its idle wait: queued, and the flusher (not the task) told.
        s.set_direct(true);
        deliver(&shard, s.key(), &Bytes::from_static(b"one"));
        deliver(&shard, s.key(), &Bytes::from_static(b"two"));
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "the flusher is woken once");
        assert!(shard.poll_ready(&mut cx, &mut batch).is_ready());
        assert_eq!(batch, vec![(s.key(), Ready::Deliver)]);
        assert_eq!(shard.flush_direct(&batch, 0, 8), 1);
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"onetwo");
        assert!(!s.has_deliveries());
        assert_eq!(s.poll_kick(&w), None, "its task was not disturbed");

        // Its task runs: the flusher kicks the task, which writes them
        // itself.
        s.set_direct(false);
        deliver(&shard, s.key(), &Bytes::from_static(b"three"));
        batch.clear();
        assert!(shard.poll_ready(&mut cx, &mut batch).is_ready());
        assert_eq!(shard.flush_direct(&batch, 0, 8), 1);
        assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
        assert!(s.has_deliveries(), "left to its task");
        s.flush_deliveries(&Socket::from_fd(ours.as_fd()), false).unwrap();

        // A full socket is left to the task, kicked to wait for it; the
        // frame stays queued.
        let filler = [0u8; 4096];
        while (&ours).write(&filler).is_ok() {}
        s.set_direct(true);
        deliver(&shard, s.key(), &Bytes::from_static(b"four"));
        batch.clear();
        assert!(shard.poll_ready(&mut cx, &mut batch).is_ready());
        assert_eq!(shard.flush_direct(&batch, 0, 8), 1);
        assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
        assert!(s.has_deliveries());
    }

    #[test]
    fn stomp_heart_beats_are_sent_and_required() {
        let shard = test_shard(Options {
            stomp_heart_beat_grace_ms: Some(50),
            ping_interval_ms: Some(0),
            idle_timeout_ms: Some(0),
            park_after_ms: Some(0),
            ..Options::default()
        });
        let s = shard.open_session();
        s.set_phase(Phase::Open);
        s.enable_pubsub();
        s.set_heart_beats(100, 200);
        let (_, w) = waker();
        shard.sweep_at(99);
        assert!(!s.has_deliveries());
        shard.sweep_at(100);
        assert!(s.has_deliveries(), "an EOL is queued after 100 ms without output");
        run_flusher(&shard);
        assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
        assert_eq!(shard.stats.borrow().deliveries, 0, "a heart-beat is not a delivery");
        shard.sweep_at(150);
        assert_eq!(shard.hub.sessions.queue_len(s.key()), 1, "one at a time");
        // The peer promised one every 200 ms: at 200 + 50 ms of silence
        // (since 150) it is closed.
        s.peer_alive();
        shard.sweep_at(399);
        assert_eq!(s.poll_kick(&w), None);
        shard.sweep_at(400);
        assert_eq!(s.poll_kick(&w), Some(Kick::CLOSE));
        assert_eq!(
            s.take_close_request(),
            Some((1001, Bytes::from_static(b"missed heart-beats")))
        );
    }

    #[test]
    fn flush_rounds_stop_at_their_slice() {
        let shard = test_shard(Options::default());
        let sessions: Vec<Session> = (0..3).map(|_| shard.open_session()).collect();
        let keys: Vec<(SessionKey, Ready)> = sessions.iter().map(|s| (s.key(), Ready::Deliver)).collect();
        assert_eq!(shard.flush_direct(&keys, 0, 2), 2);
        assert_eq!(shard.flush_direct(&keys, 2, 2), 3);
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
        let h = shard.open_session();
        let (watched, ww) = waker();
        shard.watch(&ww);
        let (_, w) = waker();
        // Input stops: handshakes are refused at once, open sessions are
        // not closed yet (their deliveries may still be on their way).
        shard.stop_taking_input();
        assert!(shard.takes_no_input());
        assert_eq!(watched.0.load(Ordering::SeqCst), 1);
        assert!(h.poll_kick(&w).unwrap().has(Kick::SHUTDOWN));
        shard.sweep();
        assert_eq!(a.poll_kick(&w), None);
        assert_eq!(h.poll_kick(&w), None, "shutdown is sent once");
        drop(h);
        // Then every session is closed.
        shard.close_all();
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
        let default = test_shard(Options::default());
        assert_eq!(default.tick_ms(), 100);
    }
}
