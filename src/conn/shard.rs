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
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use bytes::Bytes;
use slotmap::{KeyData, SlotMap};

use super::outbound::Flush;
use super::park::ParkingLot;
use super::pool::BufferPool;
pub use super::session::Session;
pub use super::slot::{Kick, Phase, TokenRefused};
use super::slot::{Slot, Stopping, HEART_BEAT_FRAME};
use crate::config::Config;
use crate::pubsub::mesh::CoreMesh;
use crate::pubsub::sessions::{Ready, Wake};
use crate::pubsub::Hub;
pub use crate::pubsub::SessionKey;
pub use crate::stats::Stats;
use crate::sys::socket::Socket;
use crate::ws::CloseCode;

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
    /// permessage-deflate's decompressor for every session that agreed to
    /// no context takeover (RFC 7692 7.1.1.2): made on first use.
    pub inflater: RefCell<Option<crate::ws::deflate::Inflater>>,
    /// TLS settings of the core's `wss://` listener (shared by all cores).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The core's counters, shared with its hub.
    pub stats: Rc<RefCell<Stats>>,
    pub(super) sessions: RefCell<SlotMap<SessionKey, Slot>>,
    pub hub: Hub,
    pub(super) lot: ParkingLot,
    /// Parking needs the lot's waiter running (see `enable_parking`).
    pub(super) parking: Cell<bool>,
    pub(super) parked: Cell<usize>,
    pub(super) start: Instant,
    pub(super) now_ms: Cell<u64>,
    pub(super) stopping: Cell<Stopping>,
    /// Woken when shutdown begins (the accept loop) or the table empties (the drain).
    pub(super) watcher: Cell<Option<Waker>>,
    /// Admin connections open on this core, by id, with the waker of
    /// each that waits to read: woken when shutdown begins, so they end
    /// instead of idling. An entry leaves with its connection.
    pub(super) admin_waiters: RefCell<std::collections::HashMap<u64, Option<Waker>>>,
    pub(super) next_admin: Cell<u64>,
    /// The drain's deadline passed (`abort_all`): admin connections end
    /// even in the middle of a write.
    pub(super) admin_aborted: Cell<bool>,
    /// Keep-alive connections to the backend routes' upstreams.
    pub upstream: crate::upstream::Pool,
    /// Under io_uring, the core's ring of socket receives, which open
    /// sessions read through (`sys::ring`); set by the worker.
    pub recv_ring: std::cell::OnceCell<Rc<crate::sys::ring::RecvRing>>,
}

impl Shard {
    /// The shard of the core at `mesh`'s end of the mesh, with the TLS
    /// settings of its `wss://` listener. It wakes its sessions' tasks for
    /// their deliveries (`Wake`).
    pub fn new(
        config: Arc<Config>,
        mesh: CoreMesh,
        admission: Arc<super::admission::Admission>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<Rc<Shard>> {
        let stats = Rc::new(RefCell::new(Stats::default()));
        let admission_budget: Arc<dyn crate::upstream::SocketBudget + Send + Sync> = admission.clone();
        let shard = Rc::new(Shard {
            core: mesh.core(),
            hub: Hub::new(mesh, config.clone(), stats.clone()),
            config,
            pool: BufferPool::new(POOL_BUF_BYTES, POOL_MAX_FREE),
            admission,
            scratch: RefCell::new(Vec::with_capacity(SCRATCH_BYTES)),
            inflater: RefCell::new(None),
            tls,
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
            // Upstream sockets share the client sockets' descriptors.
            upstream: crate::upstream::Pool::new(Some(admission_budget)),
            recv_ring: std::cell::OnceCell::new(),
        });
        let wake: Weak<dyn Wake> = Rc::downgrade(&shard) as Weak<Shard>;
        shard.hub.sessions.wake_with(wake);
        Ok(shard)
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

    /// Session `key`'s id (`Session::id`).
    pub fn session_id(&self, key: SessionKey) -> String {
        let ffi = slotmap::Key::data(&key).as_ffi();
        let (slot, generation) = (ffi & 0xffff_ffff, ffi >> 32);
        match &self.config.cluster {
            Some(cluster) => format!("{}.{}.{slot}.{generation}", cluster.node_id, self.core),
            None => format!("{}.{slot}.{generation}", self.core),
        }
    }

    /// Makes `key` a pub/sub session (nothing changes if it is one): it
    /// takes deliveries, compressed if it agreed to permessage-deflate.
    pub fn open_pubsub(&self, key: SessionKey) {
        let sessions = &self.hub.sessions;
        sessions.open(key);
        let bits = self.sessions.borrow().get(key).map_or(0, |s| s.deflate_bits);
        if bits != 0 {
            sessions.set_deflate(key, bits, sessions.dedicated.compresses(key));
        }
    }

    /// Queues a whole message for session `key` alone (its queue is made
    /// now if it has none): compressed where it agreed to
    /// permessage-deflate, `compress` allows it, and it is worth it; by
    /// its own compressor as it is written, if it has one.
    pub fn deliver_to(&self, key: SessionKey, opcode: crate::ws::Opcode, payload: &[u8], compress: bool) {
        self.open_pubsub(key);
        let sessions = &self.hub.sessions;
        let bits = self.sessions.borrow().get(key).map_or(0, |s| s.deflate_bits);
        let plain = || crate::proto::native::frame(opcode, &[payload]);
        if bits == 0 || !compress {
            sessions.deliver_frame(key, &plain(), true, false);
        } else if sessions.dedicated.compresses(key) {
            sessions.deliver_frame(key, &plain(), true, true);
        } else {
            let compressor = &sessions.compressor;
            let frame = compressor
                .worth(payload.len(), bits)
                .then(|| compressor.frame(opcode, &[payload]))
                .flatten()
                .unwrap_or_else(plain);
            sessions.deliver_frame(key, &frame, true, false);
        }
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
            route: None,
            deflate_bits: 0,
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
    pub(super) fn kick_for_shutdown(self: &Rc<Self>) {
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

    pub(super) fn shutdown_due(&self, slot: &Slot) -> bool {
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
    pub(super) fn admin_wait(&self, id: u64, waker: &Waker) -> bool {
        let mut waiters = self.admin_waiters.borrow_mut();
        let Some(slot) = waiters.get_mut(&id) else { return false };
        match slot {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
        true
    }

    pub(super) fn wake_admin(&self) {
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
    pub(super) fn release_slot(&self, slot: &mut Slot) {
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

    pub(super) fn sweep_at(self: &Rc<Self>, now: u64) {
        self.now_ms.set(now);
        let c = &self.config;
        let shutting_down = self.is_shutting_down();
        let park_after = if self.parking.get() { c.park_after_ms } else { 0 };
        let mut due_parked = Vec::new();
        let mut due_heart_beats = Vec::new();
        let mut due_keep_alives = Vec::new();
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
                    // Not reading because it waits for its upstream (a full
                    // batch, a hook's verdict): its peer is not the one
                    // that is quiet.
                    if slot.waits_on_upstream(&self.config) {
                        slot.last_rx_ms = now;
                    }
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
                    // A backend route's `Keep-Alive-Interval`: an empty
                    // request when none went for that long.
                    if let Some(link) = slot.app.as_ref().and_then(|a| a.backend.as_ref()) {
                        if link.borrow().keep_alive_due(now) {
                            due_keep_alives.push((key, link.clone()));
                        }
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
                            app.close_request = Some(Box::new((
                                CloseCode::GOING_AWAY.0,
                                Bytes::from_static(b"missed heart-beats"),
                            )));
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
        for (key, link) in due_keep_alives {
            super::backend::start(self, key, link);
        }
        for key in due_heart_beats {
            self.hub
                .sessions
                .deliver_frame(key, &Bytes::from_static(HEART_BEAT_FRAME), false, false);
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
    pub(super) fn resume(self: &Rc<Self>, key: SessionKey) {
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
    /// Asks session `key` (in any phase) to close with this code and reason
    /// at its next wait.
    pub(super) fn request_close(self: &Rc<Self>, key: SessionKey, code: u16, reason: Bytes) {
        {
            let mut sessions = self.sessions.borrow_mut();
            let Some(slot) = sessions.get_mut(key) else { return };
            slot.app.get_or_insert_with(Default::default).close_request = Some(Box::new((code, reason)));
        }
        self.kick(key, Kick::CLOSE);
    }

    pub(super) fn kick(self: &Rc<Self>, key: SessionKey, kick: Kick) {
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

    /// Carries out an admin API action on session `key` of this core:
    /// `None` if there is no such open session, else the action's answer
    /// (a JSON object for `Info`, empty for the others).
    pub fn act_on_session(
        self: &Rc<Self>,
        key: SessionKey,
        action: crate::pubsub::mesh::SessionAction,
    ) -> Option<Bytes> {
        use crate::pubsub::mesh::SessionAction;
        let info = {
            let mut sessions = self.sessions.borrow_mut();
            let slot = sessions.get_mut(key)?;
            if slot.phase != Phase::Open {
                return None;
            }
            match &action {
                SessionAction::Close(code, reason) => {
                    slot.app.get_or_insert_with(Default::default).close_request =
                        Some(Box::new((*code, reason.clone())));
                    None
                }
                SessionAction::Info => Some(self.session_info(slot)),
                SessionAction::Send(..) => None,
            }
        };
        match action {
            SessionAction::Send(kind, body, compress) => {
                // Any open session takes it (an echo one too): its queue
                // is made now.
                self.deliver_to(key, kind.opcode(), &body, compress);
            }
            SessionAction::Close(..) => self.kick(key, Kick::CLOSE),
            SessionAction::Info => {}
        }
        Some(info.unwrap_or_default())
    }

    /// What `GET /sessions/{id}` says of an open session: when it
    /// connected and was last active (Unix ms, from the core's coarse
    /// clock), its route, user and node.
    fn session_info(&self, slot: &Slot) -> Bytes {
        let now = self.now_ms();
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let at = |ms: u64| unix_ms.saturating_sub(now.saturating_sub(ms));
        let route = slot.route.map(|r| self.config.route_by_id(r));
        let info = serde_json::json!({
            "connected_at_ms": at(slot.phase_since_ms),
            "last_activity_ms": at(slot.last_rx_ms.max(slot.last_tx_ms)),
            "route": route.map(|r| r.path.as_str()),
            "protocol": route.map(|r| format!("{:?}", r.protocol).to_lowercase()),
            "user": slot.identity().and_then(|i| i.user.as_deref()),
            "node": self.config.cluster.as_ref().map(|c| c.node_id.as_str()),
            "core": self.core,
            "parked": slot.parked.is_some(),
            "tls": slot.tls.is_some(),
        });
        Bytes::from(info.to_string())
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

impl Wake for Shard {
    /// A session whose task runs is kicked now; one that waits with nothing
    /// of its own, or is parked, is written by the flusher once the current
    /// task yields, together with whatever else arrives until then.
    fn wake(self: Rc<Self>, key: SessionKey, why: Ready) -> bool {
        let kick = match why {
            Ready::Slow => Kick::SLOW,
            Ready::Deliver => match self.sessions.borrow().get(key) {
                None => return true,
                Some(slot) if slot.direct || slot.parked.is_some() => return false,
                Some(_) => Kick::DELIVER,
            },
        };
        self.kick(key, kick);
        true
    }
}

/// Writes a session's queued deliveries (`Sessions::write`), many parts
/// per vectored send, until the queue is empty or the socket is full. With
/// `partial_only`, only the rest of a message already partly written.
pub(super) fn write_deliveries(
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

#[cfg(test)]
pub(crate) mod tests;
