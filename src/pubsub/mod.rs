//! Publish/subscribe across cores.
//!
//! Each core owns a `Hub`: its topic table (topic -> local subscribers), its
//! replica of which other cores have subscribers of each topic (interest),
//! and its end of the mesh. A publish on core k encodes the outbound frame
//! once, queues a refcount of it for each local subscriber, and sends one
//! envelope to each core in the topic's interest, which fans it out to its
//! own subscribers. The first subscriber of a topic on a core, and the last
//! to leave, change that core's interest, which every other core learns
//! through the mesh.
//!
//! Interest changes never wait: they go into a per-target outbox (the
//! latest state per topic) that is flushed whenever its ring has room.
//! Publishes are what waits when a ring is full: the publishing connection
//! stops being read until its envelope is in (see `Pending`).

pub mod mesh;
pub mod topics;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::conn::shard::{SessionKey, Shard};
use crate::proto::native;
use crate::ws::MessageKind;
use mesh::{CoreMesh, Envelope, SessionAction};
use topics::{Change, Topics};

pub struct Hub {
    topics: RefCell<Topics>,
    /// Topic -> the other cores that have subscribers of it.
    interest: RefCell<HashMap<Bytes, Vec<u16>>>,
    /// Interest changes not yet sent, by target core: topic -> on/off.
    interest_outbox: RefCell<Vec<HashMap<Bytes, bool>>>,
    /// Replies to other cores' session requests not yet sent, by target.
    reply_outbox: RefCell<Vec<VecDeque<Envelope>>>,
    /// Our requests to other cores' sessions, waiting for their reply.
    requests: RefCell<HashMap<u64, Request>>,
    next_request: Cell<u64>,
    pub mesh: CoreMesh,
}

struct ForgetRequest<'h>(&'h Hub, u64);

impl Drop for ForgetRequest<'_> {
    fn drop(&mut self) {
        self.0.requests.borrow_mut().remove(&self.1);
    }
}

#[derive(Default)]
struct Request {
    found: Option<bool>,
    waker: Option<Waker>,
}

/// Envelopes a publish could not put into full rings yet, with their
/// target cores, oldest first. While any wait, the publisher is not read.
pub type Pending = Vec<(usize, Envelope)>;

impl Hub {
    pub fn new(mesh: CoreMesh) -> Hub {
        let cores = mesh.cores();
        Hub {
            topics: RefCell::new(Topics::default()),
            interest: RefCell::new(HashMap::new()),
            interest_outbox: RefCell::new(vec![HashMap::new(); cores]),
            reply_outbox: RefCell::new((0..cores).map(|_| VecDeque::new()).collect()),
            requests: RefCell::new(HashMap::new()),
            next_request: Cell::new(0),
            mesh,
        }
    }

    pub fn topic_count(&self) -> usize {
        self.topics.borrow().topic_count()
    }

    /// Subscribes `session` to `topic` on this core.
    pub fn subscribe(&self, topic: &[u8], session: SessionKey) -> Change {
        let change = self.topics.borrow_mut().subscribe(topic, session);
        if change == Change::FirstJoined {
            self.announce(topic, true);
        }
        change
    }

    pub fn unsubscribe(&self, topic: &[u8], session: SessionKey) -> Change {
        let change = self.topics.borrow_mut().unsubscribe(topic, session);
        if change == Change::LastLeft {
            self.announce(topic, false);
        }
        change
    }

    /// Tells every other core that this core gained or lost `topic`.
    fn announce(&self, topic: &[u8], on: bool) {
        if self.mesh.cores() == 1 {
            return;
        }
        let topic = Bytes::copy_from_slice(topic);
        let mut outbox = self.interest_outbox.borrow_mut();
        for (core, pending) in outbox.iter_mut().enumerate() {
            if core != self.mesh.core() {
                pending.insert(topic.clone(), on);
            }
        }
        drop(outbox);
        self.flush_interest();
    }

    /// Sends what the interest and reply outboxes hold, as far as the rings
    /// have room. Returns `false` if something is left (the mesh loop
    /// retries when a consumer makes room).
    pub fn flush_interest(&self) -> bool {
        let mut all_sent = true;
        for (core, replies) in self.reply_outbox.borrow_mut().iter_mut().enumerate() {
            while let Some(reply) = replies.pop_front() {
                if let Err(reply) = self.mesh.send(core, reply) {
                    replies.push_front(reply);
                    all_sent = false;
                    break;
                }
            }
        }
        let me = self.mesh.core() as u16;
        for (core, pending) in self.interest_outbox.borrow_mut().iter_mut().enumerate() {
            while let Some(topic) = pending.keys().next().cloned() {
                let on = pending[&topic];
                match self.mesh.send(
                    core,
                    Envelope::Interest {
                        topic: topic.clone(),
                        core: me,
                        on,
                    },
                ) {
                    Ok(()) => {
                        pending.remove(&topic);
                    }
                    Err(_) => {
                        all_sent = false;
                        break;
                    }
                }
            }
        }
        all_sent
    }

    /// Applies one envelope from another core.
    pub fn receive(&self, shard: &Rc<Shard>, envelope: Envelope) {
        match envelope {
            Envelope::Publish { topic, frame } => {
                self.deliver_local(shard, &topic, &frame);
            }
            Envelope::Interest { topic, core, on } => {
                let mut interest = self.interest.borrow_mut();
                let cores = interest.entry(topic.clone()).or_default();
                match (on, cores.binary_search(&core)) {
                    (true, Err(at)) => cores.insert(at, core),
                    (false, Ok(at)) => {
                        cores.remove(at);
                    }
                    _ => {}
                }
                if cores.is_empty() {
                    interest.remove(&topic);
                }
            }
            Envelope::Session {
                key,
                action,
                request,
                from,
            } => {
                let found = shard.act_on_session(SessionKey::from(slotmap::KeyData::from_ffi(key)), action);
                self.reply_outbox.borrow_mut()[from as usize].push_back(Envelope::Reply { request, found });
                self.flush_interest();
            }
            Envelope::Reply { request, found } => {
                if let Some(r) = self.requests.borrow_mut().get_mut(&request) {
                    r.found = Some(found);
                    if let Some(w) = r.waker.take() {
                        w.wake();
                    }
                }
            }
        }
    }

    /// Acts on the session `key` of core `core` (this one or another, over
    /// the mesh). Resolves to whether the session was there.
    pub async fn session_action(&self, shard: &Rc<Shard>, core: usize, key: u64, action: SessionAction) -> bool {
        if core == self.mesh.core() {
            return shard.act_on_session(SessionKey::from(slotmap::KeyData::from_ffi(key)), action);
        }
        let request = self.next_request.get();
        self.next_request.set(request + 1);
        self.requests.borrow_mut().insert(request, Request::default());
        // Removed however this future ends (answered, or dropped by a
        // caller's timeout): a late reply then finds nothing.
        let _forget = ForgetRequest(self, request);
        let mut envelope = Some(Envelope::Session {
            key,
            action,
            request,
            from: self.mesh.core() as u16,
        });
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
            match r.found {
                Some(found) => Poll::Ready(found),
                None => {
                    r.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        found
    }

    /// Queues `frame` for every subscriber of `topic` on this core; returns
    /// how many that was.
    fn deliver_local(&self, shard: &Rc<Shard>, topic: &[u8], frame: &Bytes) -> usize {
        // A delivery never changes the table (a session leaves its topics
        // only when its task ends), so the borrow is held across them.
        let topics = self.topics.borrow();
        let Some(subscribers) = topics.subscribers(topic) else {
            return 0;
        };
        for &key in subscribers {
            shard.deliver(key, frame);
        }
        subscribers.len()
    }

    /// Publishes on this core: encodes the frame once, queues it for local
    /// subscribers, and sends it to every other interested core. Envelopes
    /// that found their ring full are appended to `pending`. Returns how
    /// many cores it reached (this one if it has subscribers, and every
    /// other interested one).
    pub fn publish(
        &self,
        shard: &Rc<Shard>,
        kind: MessageKind,
        topic: &[u8],
        payload: &[u8],
        pending: &mut Pending,
    ) -> usize {
        let frame = native::message_frame(kind, topic, payload);
        shard.count_publish();
        let local = self.deliver_local(shard, topic, &frame);
        let interest = self.interest.borrow();
        let Some(cores) = interest.get(topic) else {
            return usize::from(local > 0);
        };
        let topic = native::topic_of(&frame, topic.len(), payload.len());
        for &core in cores {
            let envelope = Envelope::Publish {
                topic: topic.clone(),
                frame: frame.clone(),
            };
            if let Err(envelope) = self.mesh.send(core as usize, envelope) {
                pending.push((core as usize, envelope));
            }
        }
        usize::from(local > 0) + cores.len()
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
