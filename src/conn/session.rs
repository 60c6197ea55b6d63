//! A session's handle: what its connection task (and the protocol code it
//! runs) asks of its slot in the shard and of the hub. Removing the slot
//! when dropped (unless the session parked) ends the session: it leaves the
//! admission caps, every topic, and the hub.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::Waker;

use bytes::Bytes;
use slotmap::Key;

use super::outbound::Flush;
use super::shard::{write_deliveries, Shard};
use super::slot::{Kick, Parked, Phase, Slot, TokenRefused};
use crate::auth::{Action, Identity};
use crate::config::RouteId;
use crate::proto::stomp::conn::StompConn;
use crate::pubsub::message::Message;
use crate::pubsub::topics::StompTarget;
use crate::pubsub::SessionKey;
use crate::sys::socket::Socket;
use crate::ws::MessageKind;

/// A session's entry in its shard; removed when dropped.
pub struct Session {
    pub(super) shard: Rc<Shard>,
    pub(super) key: SessionKey,
}

impl Session {
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut sessions = self.shard.sessions.borrow_mut();
        // A Session is the only remover of its slot, so the slot exists.
        f(sessions
            .get_mut(self.key)
            .expect("session slot exists while the Session lives"))
    }

    /// The session's id for the admin API and `HELLO`: core, slot and
    /// generation, `<core>.<slot>.<generation>`; in a cluster, after the
    /// node's id, `<node>.<core>.<slot>.<generation>`.
    pub fn id(&self) -> String {
        self.shard.session_id(self.key)
    }

    pub fn key(&self) -> SessionKey {
        self.key
    }

    /// Makes this a pub/sub session: it can subscribe and take deliveries.
    pub fn enable_pubsub(&self) {
        self.shard.open_pubsub(self.key);
    }

    /// The client agreed to permessage-deflate: compressed messages are
    /// read from now on, and ours are compressed where worth it. Context
    /// takeover is agreed only if the core's budget holds its contexts;
    /// returns what is agreed.
    pub fn agree_deflate(&self, agreement: crate::ws::deflate::Agreement) -> crate::ws::deflate::Agreement {
        let agreement = self.shard.hub.sessions.dedicated.agree(self.key, agreement);
        self.with(|s| s.deflate_bits = agreement.server_window_bits);
        agreement
    }

    /// The window of our compressed messages, if the client agreed to
    /// permessage-deflate (0: it did not).
    pub fn deflate_bits(&self) -> u8 {
        self.with(|s| s.deflate_bits)
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
    /// deliveries to be written down, or a backend route's batch is full,
    /// or a hook's verdict.
    pub fn is_blocked(&self) -> bool {
        self.shard.hub.sessions.is_blocked(self.key) || self.backend_full() || self.hook_blocked()
    }

    /// Ready once no publish waits for ring space, the core takes
    /// publishes again and the backend batch has room.
    pub fn poll_unblocked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::task::ready!(self.poll_backend_room(cx));
        std::task::ready!(self.poll_hook(cx));
        self.shard.hub.poll_unblocked(self.key, cx)
    }

    /// The close the admin API asked for, if any.
    pub fn take_close_request(&self) -> Option<(u16, Bytes)> {
        self.with(|s| s.app.as_mut().and_then(|a| a.close_request.take()).map(|b| *b))
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

    /// Records the client's address (for the per-address cap, and the
    /// `X-Forwarded-For` of a backend route, and the connect hook).
    pub fn set_peer_ip(&self, ip: std::net::IpAddr) {
        let config = &self.shard.config;
        let backends = config.routes.iter().any(|r| r.backend.is_some() || r.hooks.is_some());
        if config.max_connections_per_ip == 0 && config.max_handshakes_per_sec_per_ip == 0 && !backends {
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

    /// Sets who the session is (a connect hook's answer).
    pub fn set_identity(&self, identity: Identity) {
        let (config, now) = (&self.shard.config, self.shard.now_ms());
        self.with(|s| s.extra(config, now).identity = Some(identity));
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

    /// Kicks wait to be taken (`poll_kick`).
    pub fn has_kick(&self) -> bool {
        self.with(|s| !s.kick.is_empty())
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
