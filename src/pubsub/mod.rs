//! Publish/subscribe across cores.
//!
//! Each core owns a `Hub`: its topic table (topic -> local subscribers), its
//! replica of which other cores have subscribers of each topic (interest),
//! and its end of the mesh. A publish on core k becomes a `Message` (shared
//! bytes), queued for each local subscriber in its protocol's encoding
//! (made once per core, see `message`), and sent in one envelope to each
//! core in the topic's interest, which fans it out to its own subscribers.
//! The first subscriber of a topic on a core, and the last to leave, change
//! that core's interest, which every other core learns through the mesh.
//!
//! A STOMP queue (`/queue/<name>`) gives each message to one subscriber.
//! Its interest carries how many subscribers each core has, so the
//! publishing core picks cores in proportion to them (weighted round
//! robin), and the chosen core its subscribers in turn: over a round, every
//! subscriber on every core gets one message.
//!
//! Interest changes never wait: they go into a per-target outbox (the
//! latest state per topic) that is flushed whenever its ring has room.
//! Publishes are what waits when a ring is full: the publishing connection
//! stops being read until its envelope is in (see `Pending`).
//!
//! Every pub/sub session's state on the core (the keys it is in, its queued
//! deliveries, its publishes waiting for ring space) and the core's budget
//! are `sessions`'. Nothing here calls into a connection: the connection
//! layer asks for what is queued (`Sessions::write`, `poll_ready`) and
//! carries out other cores' actions on its sessions (`receive` hands them
//! back).

pub mod dedicated;
pub mod mesh;
pub mod message;
pub mod sessions;
pub mod topics;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::Config;
use crate::stats::Stats;
use mesh::{CoreMesh, Envelope, RemoteRequest, SessionAction};
use message::{Fanout, Message};
use sessions::Sessions;
use topics::{is_queue, Change, StompTarget, Topics};

slotmap::new_key_type! {
    /// A session: its slot and generation in its core's table (`conn`
    /// owns the table; pub/sub keys its own state by it).
    pub struct SessionKey;
}

/// An admin API action another core asks of one of this core's sessions
/// (carried out by the caller of `Hub::receive`, then answered with
/// `Hub::reply`).
pub struct SessionRequest {
    pub key: SessionKey,
    pub action: SessionAction,
    pub request: u64,
    pub from: u16,
}

pub struct Hub {
    /// Every pub/sub session's state on this core, and the core's budget.
    pub sessions: Sessions,
    stats: Rc<RefCell<Stats>>,
    topics: RefCell<Topics>,
    /// Topic -> the other cores that have subscribers of it, in core
    /// order, with how many (counted for queues only; 1 for topics).
    interest: RefCell<HashMap<Bytes, Vec<(u16, u32)>>>,
    /// Interest changes not yet sent, by target core: topic -> count.
    interest_outbox: RefCell<Vec<HashMap<Bytes, u32>>>,
    /// Queue -> messages this core has handed out (whose turn is next).
    queue_turns: RefCell<HashMap<Bytes, u64>>,
    next_message: Cell<u64>,
    /// Replies to other cores' session requests not yet sent, by target.
    reply_outbox: RefCell<Vec<VecDeque<Envelope>>>,
    /// Publishes of sessions that ended while they waited for ring space,
    /// oldest first: sent by the mesh loop as rings make room.
    orphans: RefCell<Pending>,
    /// Our requests to other cores' sessions, waiting for their reply.
    requests: RefCell<HashMap<u64, Request>>,
    next_request: Cell<u64>,
    /// `topic_counts` as last encoded, and when: every core's admin API
    /// may ask for it, and each is answered from one encoding a
    /// `COUNTS_FRESH`.
    counts: RefCell<Option<(Instant, Bytes)>>,
    pub mesh: CoreMesh,
}

/// How long `Hub::topic_counts` answers from its last encoding.
const COUNTS_FRESH: Duration = Duration::from_secs(1);

struct ForgetRequest<'h>(&'h Hub, u64);

impl Drop for ForgetRequest<'_> {
    fn drop(&mut self) {
        self.0.requests.borrow_mut().remove(&self.1);
    }
}

#[derive(Default)]
struct Request {
    answer: Option<Option<Bytes>>,
    waker: Option<Waker>,
}

/// Envelopes a publish could not put into full rings yet, with their
/// target cores, oldest first. While any wait, the publisher is not read.
pub type Pending = Vec<(usize, Envelope)>;

impl Hub {
    pub fn new(mesh: CoreMesh, config: Arc<Config>, stats: Rc<RefCell<Stats>>) -> Hub {
        let cores = mesh.cores();
        Hub {
            sessions: Sessions::new(config, stats.clone()),
            stats,
            topics: RefCell::new(Topics::default()),
            interest: RefCell::new(HashMap::new()),
            interest_outbox: RefCell::new(vec![HashMap::new(); cores]),
            queue_turns: RefCell::new(HashMap::new()),
            next_message: Cell::new(0),
            reply_outbox: RefCell::new((0..cores).map(|_| VecDeque::new()).collect()),
            orphans: RefCell::new(Vec::new()),
            requests: RefCell::new(HashMap::new()),
            next_request: Cell::new(0),
            counts: RefCell::new(None),
            mesh,
        }
    }

    pub fn topic_count(&self) -> usize {
        self.topics.borrow().topic_count()
    }

    /// This core's topics and their subscribers here
    /// (`topics::decode_counts` reads them), as encoded at most
    /// `COUNTS_FRESH` ago: however many cores ask, a core copies its table
    /// once a second at most.
    pub fn topic_counts(&self) -> Bytes {
        let mut cached = self.counts.borrow_mut();
        if let Some((at, counts)) = cached.as_ref() {
            if at.elapsed() < COUNTS_FRESH {
                return counts.clone();
            }
        }
        let counts = Bytes::from(self.topics.borrow().encode_counts());
        *cached = Some((Instant::now(), counts.clone()));
        counts
    }

    /// Core `core`'s (another one's) `topic_counts`, over the mesh.
    pub async fn remote_topic_counts(&self, core: usize) -> Option<Bytes> {
        debug_assert_ne!(core, self.mesh.core(), "this core's are read here");
        let from = self.mesh.core() as u16;
        self.ask(core, |request| Envelope::Topics { request, from }).await
    }

    /// A new message id: this core and its sequence number.
    pub fn next_message_id(&self) -> u64 {
        let seq = self.next_message.get();
        self.next_message.set(seq + 1);
        ((self.mesh.core() as u64) << 48) | (seq & ((1 << 48) - 1))
    }

    /// Subscribes `session` to `topic` (or a queue's key) on this core:
    /// natively, or (`target`) with one more STOMP subscription.
    pub fn subscribe(&self, topic: &[u8], session: SessionKey, via: topics::Via) -> Change {
        let change = self.topics.borrow_mut().subscribe(topic, session, via);
        self.announce_change(topic, change);
        change
    }

    /// Unsubscribes `session` from `topic`: wholly, or (`id`) one STOMP
    /// subscription.
    pub fn unsubscribe(&self, topic: &[u8], session: SessionKey, id: Option<&str>) -> Change {
        let change = self.topics.borrow_mut().unsubscribe(topic, session, id);
        self.announce_change(topic, change);
        change
    }

    fn announce_change(&self, topic: &[u8], change: Change) {
        let count = match change {
            Change::None => return,
            // Topics: only whether this core has subscribers matters.
            Change::FirstJoined if !is_queue(topic) => 1,
            Change::LastLeft if !is_queue(topic) => 0,
            Change::Joined | Change::Left if !is_queue(topic) => return,
            _ => self.topics.borrow().count(topic) as u32,
        };
        if count == 0 {
            self.forget_turn_if_unused(topic);
        }
        self.announce(topic, count);
    }

    /// Tells every other core how many subscribers of `topic` this core
    /// has now (0: none).
    fn announce(&self, topic: &[u8], count: u32) {
        if self.mesh.cores() == 1 {
            return;
        }
        let topic = Bytes::copy_from_slice(topic);
        let mut outbox = self.interest_outbox.borrow_mut();
        for (core, pending) in outbox.iter_mut().enumerate() {
            if core != self.mesh.core() {
                pending.insert(topic.clone(), count);
            }
        }
        drop(outbox);
        self.flush_outboxes();
    }

    /// Takes the envelopes of a session that ended while they waited for
    /// ring space: they are sent, in order, by `flush_outboxes`.
    pub fn adopt(&self, pending: Pending) {
        self.orphans.borrow_mut().extend(pending);
        self.flush_outboxes();
    }

    /// Whether publishes of ended sessions still wait for ring space.
    pub fn has_orphans(&self) -> bool {
        !self.orphans.borrow().is_empty()
    }

    /// Sends `envelope` to core `to`; on a full ring, asks its consumer to
    /// ring this core's doorbell once it makes room (the mesh loop, woken
    /// by that, flushes the outboxes again) and gives the envelope back.
    fn send_or_want_space(&self, to: usize, mut envelope: Envelope) -> Result<(), Envelope> {
        loop {
            match self.mesh.send(to, envelope) {
                Ok(()) => return Ok(()),
                // Room was made meanwhile: no ring will come for it.
                Err(e) if self.mesh.want_space(to) => envelope = e,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends what the outboxes (replies, interest changes, ended sessions'
    /// publishes) hold, as far as the rings have room. Returns `false` if
    /// something is left; see `send_or_want_space` for what sends it then.
    pub fn flush_outboxes(&self) -> bool {
        let mut all_sent = true;
        for (core, replies) in self.reply_outbox.borrow_mut().iter_mut().enumerate() {
            while let Some(reply) = replies.pop_front() {
                if let Err(reply) = self.send_or_want_space(core, reply) {
                    replies.push_front(reply);
                    all_sent = false;
                    break;
                }
            }
        }
        let me = self.mesh.core() as u16;
        for (core, pending) in self.interest_outbox.borrow_mut().iter_mut().enumerate() {
            while let Some(topic) = pending.keys().next().cloned() {
                let count = pending[&topic];
                let envelope = Envelope::Interest {
                    topic: topic.clone(),
                    core: me,
                    count,
                };
                if self.send_or_want_space(core, envelope).is_err() {
                    all_sent = false;
                    break;
                }
                pending.remove(&topic);
            }
        }
        let mut orphans = self.orphans.borrow_mut();
        if !orphans.is_empty() {
            // In order per target: once one waits, the later ones to the
            // same core wait behind it.
            let mut left: Pending = Vec::new();
            for (core, envelope) in orphans.drain(..) {
                if left.iter().any(|&(c, _)| c == core) {
                    left.push((core, envelope));
                } else if let Err(envelope) = self.send_or_want_space(core, envelope) {
                    left.push((core, envelope));
                }
            }
            all_sent &= left.is_empty();
            *orphans = left;
        }
        all_sent
    }

    /// Applies one envelope from another core. An action on one of this
    /// core's sessions is handed back to be carried out (and answered with
    /// `reply`): sessions are the connection layer's.
    pub fn receive(&self, envelope: Envelope) -> Option<SessionRequest> {
        match envelope {
            Envelope::Publish(message) => {
                let fanout = Fanout::new(&message);
                if is_queue(&message.key) {
                    if !self.deliver_in_turn(&fanout) {
                        // Its last subscriber here left while it was on its
                        // way: nobody takes it.
                        self.stats.borrow_mut().dropped += 1;
                    }
                } else {
                    self.deliver_local(&fanout);
                }
            }
            Envelope::Interest { topic, core, count } => {
                let mut interest = self.interest.borrow_mut();
                let cores = interest.entry(topic.clone()).or_default();
                match (count, cores.binary_search_by_key(&core, |&(c, _)| c)) {
                    (0, Ok(at)) => {
                        cores.remove(at);
                    }
                    (0, Err(_)) => {}
                    (n, Ok(at)) => cores[at].1 = n,
                    (n, Err(at)) => cores.insert(at, (core, n)),
                }
                if cores.is_empty() {
                    interest.remove(&topic);
                    drop(interest);
                    self.forget_turn_if_unused(&topic);
                }
            }
            Envelope::Session {
                key,
                action,
                request,
                from,
            } => {
                return Some(SessionRequest {
                    key: SessionKey::from(slotmap::KeyData::from_ffi(key)),
                    action,
                    request,
                    from,
                })
            }
            Envelope::Reply { request, answer } => {
                if let Some(r) = self.requests.borrow_mut().get_mut(&request) {
                    r.answer = Some(answer);
                    if let Some(w) = r.waker.take() {
                        w.wake();
                    }
                }
            }
            Envelope::Topics { request, from } => {
                self.reply(from, request, Some(self.topic_counts()));
            }
            // Only the bridge takes these.
            Envelope::Remote(_) => {}
        }
        None
    }

    /// Answers another core's `SessionRequest`: `None` if the session was
    /// not there, else what the action answers (`SessionAction`).
    pub fn reply(&self, to: u16, request: u64, answer: Option<Bytes>) {
        self.reply_outbox.borrow_mut()[to as usize].push_back(Envelope::Reply { request, answer });
        self.flush_outboxes();
    }

    /// Asks core `core` (another one) to act on its session `key`, over the
    /// mesh. Resolves to the action's answer, `None` if the session was
    /// not there.
    pub async fn remote_session_action(&self, core: usize, key: u64, action: SessionAction) -> Option<Bytes> {
        debug_assert_ne!(core, self.mesh.core(), "a session of this core is acted on here");
        let from = self.mesh.core() as u16;
        self.ask(core, |request| Envelope::Session {
            key,
            action,
            request,
            from,
        })
        .await
    }

    /// Asks node `node` (another one), through the NATS bridge, to act on
    /// its session `session` (`<core>.<slot>.<generation>`). Resolves to
    /// the action's answer, `None` if the session was not there (at once
    /// without a bridge).
    pub async fn remote_node_action(&self, node: &str, session: &str, action: SessionAction) -> Option<Bytes> {
        let bridge = self.mesh.bridge()?;
        let from = self.mesh.core() as u16;
        self.ask(bridge, |request| {
            Envelope::Remote(Box::new(RemoteRequest {
                node: node.to_string(),
                session: session.to_string(),
                action,
                request,
                from,
            }))
        })
        .await
    }

    /// Sends the envelope `make` builds for a new request to `core`, and
    /// waits for its `Reply`.
    async fn ask(&self, core: usize, make: impl FnOnce(u64) -> Envelope) -> Option<Bytes> {
        let request = self.next_request.get();
        self.next_request.set(request + 1);
        self.requests.borrow_mut().insert(request, Request::default());
        // Removed however this future ends (answered, or dropped by a
        // caller's timeout): a late reply then finds nothing.
        let _forget = ForgetRequest(self, request);
        let mut envelope = Some(make(request));
        let found = std::future::poll_fn(|cx: &mut Context<'_>| {
            if let Some(e) = envelope.take() {
                if let Err(e) = self.mesh.send(core, e) {
                    envelope = Some(e);
                    // Full ring: wait for room like a publisher.
                    return match self.mesh.poll_space(core, cx) {
                        Poll::Ready(()) => {
                            cx.waker().wake_by_ref();
                            Poll::Pending
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
            let mut requests = self.requests.borrow_mut();
            let r = requests
                .get_mut(&request)
                .expect("request is registered until answered");
            match r.answer.take() {
                Some(answer) => Poll::Ready(answer),
                None => {
                    r.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        found
    }

    /// Queues the message for every subscriber of its topic on this core;
    /// returns how many that was.
    fn deliver_local(&self, fanout: &Fanout<'_>) -> usize {
        // A delivery never changes the table (a session leaves its topics
        // only when its task ends), so the borrow is held across them.
        let topics = self.topics.borrow();
        let Some(subscribers) = topics.subscribers(&fanout.message.key) else {
            return 0;
        };
        for (&key, via) in &subscribers.sessions {
            self.sessions.deliver(key, via, fanout, false);
        }
        subscribers.len()
    }

    /// Queues a queue's message for the one local subscriber whose turn it
    /// is; `false` if there is none.
    fn deliver_in_turn(&self, fanout: &Fanout<'_>) -> bool {
        let topics = self.topics.borrow();
        let Some((key, via)) = topics.subscribers(&fanout.message.key).and_then(|s| s.next_in_turn()) else {
            return false;
        };
        self.sessions.deliver(key, via, fanout, true);
        true
    }

    /// Publishes on this core: queues the message for local subscribers and
    /// sends it to every other interested core (a queue's message: to the
    /// one core whose turn it is). Envelopes that found their ring full are
    /// appended to `pending`. Returns how many cores it reached.
    pub fn publish(&self, message: Message, pending: &mut Pending) -> usize {
        self.stats.borrow_mut().publishes += 1;
        if is_queue(&message.key) {
            return self.publish_to_queue(message, pending);
        }
        let local = self.deliver_local(&Fanout::new(&message));
        let interest = self.interest.borrow();
        let cores = interest.get(&message.key).map_or(&[][..], Vec::as_slice);
        let bridge = self.mesh.bridge();
        if cores.is_empty() && bridge.is_none() {
            return usize::from(local > 0);
        }
        let message = Arc::new(message);
        for &(core, _) in cores {
            self.send_in_order(core as usize, Envelope::Publish(message.clone()), pending);
        }
        // Other nodes: every publish made here goes to the bus (NATS
        // knows who wants it); one that came from it never goes back.
        if let Some(bridge) = bridge {
            self.send_in_order(bridge, Envelope::Publish(message), pending);
        }
        usize::from(local > 0) + cores.len()
    }

    /// Sends a publisher's envelope, or queues it in `pending` behind any of
    /// the same publisher's that wait for the same ring (several publishes
    /// may come from one read: a STOMP COMMIT, frames batched in one
    /// message), so none overtakes another.
    fn send_in_order(&self, core: usize, envelope: Envelope, pending: &mut Pending) {
        if pending.iter().any(|&(c, _)| c == core) {
            pending.push((core, envelope));
        } else if let Err(envelope) = self.mesh.send(core, envelope) {
            pending.push((core, envelope));
        }
    }

    /// Forgets a queue's turn once it has no subscriber on any core.
    fn forget_turn_if_unused(&self, key: &[u8]) {
        if is_queue(key) && self.topics.borrow().count(key) == 0 && !self.interest.borrow().contains_key(key) {
            self.queue_turns.borrow_mut().remove(key);
        }
    }

    /// Picks the core whose turn it is, each core weighted by its
    /// subscribers of the queue, and hands the message to it.
    fn publish_to_queue(&self, message: Message, pending: &mut Pending) -> usize {
        // In a cluster, NATS picks the node (a queue group, one member per
        // node with subscribers) and that node's bridge the core: one
        // delivery cluster-wide. While the bus is down, the node's own
        // subscribers share the queue's messages.
        if let (Some(bridge), Some(bus)) = (self.mesh.bridge(), self.mesh.bus()) {
            // One the bus cannot carry (over the server's max_payload), or
            // past shutdown's start, stays with the node's subscribers.
            let closing = bus.closing.load(std::sync::atomic::Ordering::Relaxed);
            if bus.is_connected() && !closing && bus.carries(message.body.len()) {
                self.send_in_order(bridge, Envelope::Publish(Arc::new(message)), pending);
                return 1;
            }
        }
        let me = self.mesh.core() as u16;
        let local = self.topics.borrow().count(&message.key) as u64;
        let interest = self.interest.borrow();
        let remote = interest.get(&message.key).map_or(&[][..], Vec::as_slice);
        let total = local + remote.iter().map(|&(_, n)| u64::from(n)).sum::<u64>();
        let mut turns = self.queue_turns.borrow_mut();
        if total == 0 {
            // No subscriber anywhere: the message is not kept.
            turns.remove(&message.key);
            self.stats.borrow_mut().dropped += 1;
            return 0;
        }
        let turn = turns.entry(message.key.clone()).or_insert(0);
        let mut at = *turn % total;
        *turn = turn.wrapping_add(1);
        drop(turns);
        let mut chosen = me;
        if at >= local {
            at -= local;
            for &(core, n) in remote {
                if at < u64::from(n) {
                    chosen = core;
                    break;
                }
                at -= u64::from(n);
            }
        }
        if chosen == me {
            drop(interest);
            self.deliver_in_turn(&Fanout::new(&message));
        } else {
            self.send_in_order(chosen as usize, Envelope::Publish(Arc::new(message)), pending);
        }
        1
    }

    /// Subscribes session `key` to `topic` natively; `Ok(false)` if it
    /// already was. An error past `max` subscriptions.
    pub fn subscribe_native(&self, key: SessionKey, topic: &[u8], max: usize) -> Result<bool, sessions::TooManyTopics> {
        let added = self.sessions.join(key, topic, max)?;
        if added {
            self.subscribe(topic, key, topics::Via::Native);
        }
        Ok(added)
    }

    /// Subscribes session `key` to `topic`, taking each message's payload
    /// alone (`Via::Raw`): a backend route's connection, subscribed by its
    /// upstream. `unsubscribe_native` ends it.
    pub fn subscribe_raw(&self, key: SessionKey, topic: &[u8], max: usize) -> Result<bool, sessions::TooManyTopics> {
        let added = self.sessions.join(key, topic, max)?;
        if added {
            self.subscribe(topic, key, topics::Via::Raw);
        }
        Ok(added)
    }

    /// Ends session `key`'s native subscription to `topic`, if it has one.
    pub fn unsubscribe_native(&self, key: SessionKey, topic: &[u8]) {
        if self.sessions.leave(key, topic) {
            self.unsubscribe(topic, key, None);
        }
    }

    /// Adds a STOMP subscription of session `key` to the table key
    /// `topic` (the session rules bound how many there are).
    pub fn subscribe_stomp(&self, key: SessionKey, topic: &[u8], target: StompTarget) {
        if let Change::Joined | Change::FirstJoined = self.subscribe(topic, key, topics::Via::Stomp(vec![target])) {
            let _ = self.sessions.join(key, topic, usize::MAX);
        }
    }

    /// Ends session `key`'s STOMP subscription `id` (escaped) to `topic`.
    pub fn unsubscribe_stomp(&self, key: SessionKey, topic: &[u8], id: &str) {
        if let Change::Left | Change::LastLeft = self.unsubscribe(topic, key, Some(id)) {
            self.sessions.leave(key, topic);
        }
    }

    /// Publishes from session `key`: envelopes that find a ring full wait
    /// in its state, and its connection is not read until they are through
    /// (`poll_unblocked`); so does a publish that takes the core over its
    /// budget.
    pub fn publish_from(&self, key: SessionKey, message: Message) {
        let mut pending = self.sessions.take_pending(key);
        let was_empty = pending.is_empty();
        self.publish(message, &mut pending);
        if let Some(left) = self.sessions.put_pending(key, pending, was_empty) {
            self.adopt(left);
        }
        if self.sessions.over_budget() {
            self.sessions.hold(key);
        }
    }

    /// Ready once no publish of session `key` waits for ring space and the
    /// core takes publishes again.
    pub fn poll_unblocked(&self, key: SessionKey, cx: &mut Context<'_>) -> Poll<()> {
        let mut pending = self.sessions.take_pending(key);
        let was_empty = pending.is_empty();
        let sent = loop {
            if self.retry(&mut pending) {
                break true;
            }
            if self.mesh.poll_space(pending[0].0, cx).is_pending() {
                break false;
            }
        };
        if let Some(left) = self.sessions.put_pending(key, pending, was_empty) {
            self.adopt(left);
        }
        if !sent {
            return Poll::Pending;
        }
        self.sessions.poll_hold(key, cx)
    }

    /// Session `key` is gone: it leaves every topic, and its publishes
    /// that waited for ring space (it may have confirmed them: a STOMP
    /// RECEIPT) are still sent, after it (`adopt`).
    pub fn remove_session(&self, key: SessionKey) {
        let Some(removed) = self.sessions.remove(key) else {
            return;
        };
        if !removed.pending.is_empty() {
            self.adopt(removed.pending);
        }
        for topic in &removed.topics {
            self.unsubscribe(topic, key, None);
        }
    }

    /// Publishes accepted on this core that are not yet in every ring they
    /// go to: sessions' and admin requests' (`Sessions::in_flight`), and
    /// those of ended sessions the hub sends on (counted as one).
    pub fn publishes_in_flight(&self) -> usize {
        self.sessions.in_flight() + usize::from(self.has_orphans())
    }

    /// Retries pending envelopes in order; returns `true` once all are sent.
    pub fn retry(&self, pending: &mut Pending) -> bool {
        while let Some((core, _)) = pending.first() {
            let core = *core;
            let (_, envelope) = pending.remove(0);
            if let Err(envelope) = self.mesh.send(core, envelope) {
                pending.insert(0, (core, envelope));
                return false;
            }
        }
        true
    }
}
