//! The mesh: how cores talk without sharing mutable state.
//!
//! One bounded wait-free SPSC ring (rtrb) for each ordered pair of cores,
//! and one doorbell (an eventfd) per core. A producer rings the target's
//! doorbell only when the target has said it may go to sleep (`armed`), so
//! a busy core is never signalled; the target drains every ring until all
//! are empty before it arms its doorbell again.
//!
//! A full ring never drops: the producer raises the ring's `space_wanted`
//! flag and waits; the consumer, after popping from a ring with that flag
//! set, rings the producer's doorbell, and the producer's core wakes the
//! tasks waiting for space and sends what its outboxes hold. Why this
//! cannot deadlock is in docs/ARCHITECTURE.md ("The mesh").
//!
//! Both sleeps are store-then-check handshakes between two threads (the
//! Dekker pattern): one side stores its flag, then loads the other side's
//! index; the other stores its index, then loads the flag. A SeqCst store
//! followed by an Acquire load may be reordered (the load done first) on
//! hardware where Acquire loads are weaker than SeqCst ones (AArch64 with
//! `ldapr`), and then both sides can miss each other: a lost wake-up. A
//! `fence(SeqCst)` between the store and the load on *both* sides forbids
//! it: of the two fences, one comes first in their single total order, and
//! the load after the later fence sees the store before the earlier one.
//! So at least one side sees the other, and either the sleeper does not
//! sleep or the waker rings.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::message::Message;
use crate::stats::Bus;
use crate::sys::eventfd::EventFd;

/// Envelopes taken from one ring per drain.
const DRAIN_BUDGET: usize = 1024;

/// What crosses from one core to another.
#[derive(Debug)]
pub enum Envelope {
    /// Deliver the message to this core's subscribers of its topic (one of
    /// them, for a queue). Shared by every core it goes to.
    Publish(Arc<Message>),
    /// Core `core` now has `count` subscribers of `topic` (0: none; for a
    /// topic, 1 stands for any).
    Interest { topic: Bytes, core: u16, count: u32 },
    /// An admin API action on one of this core's sessions (by session key),
    /// to be answered with a `Reply` to core `from`.
    Session {
        key: u64,
        action: SessionAction,
        request: u64,
        from: u16,
    },
    /// The answer to a `Session` (or `Remote`) envelope: `None` if the
    /// session was not there, else the action's answer (empty but for
    /// `Info`).
    Reply { request: u64, answer: Option<Bytes> },
    /// The admin API asks this core for its topics and their subscribers
    /// here, to be answered with a `Reply` to core `from`
    /// (`Topics::encode_counts`).
    Topics { request: u64, from: u16 },
    /// To the NATS bridge: an admin API action on a session of another
    /// node, to be answered with a `Reply` to core `from`.
    Remote(Box<RemoteRequest>),
}

/// An action on a session of another node (`Envelope::Remote`).
#[derive(Debug)]
pub struct RemoteRequest {
    pub node: String,
    /// The session's id on its node: `<core>.<slot>.<generation>`.
    pub session: String,
    pub action: SessionAction,
    pub request: u64,
    pub from: u16,
}

#[derive(Debug, Clone)]
pub enum SessionAction {
    /// Send this message to the session (encoded on its core); `false`:
    /// never compressed (see `Message::compress`).
    Send(crate::ws::MessageKind, Bytes, bool),
    /// Close the session with this code and reason.
    Close(u16, Bytes),
    /// Say what the session is: a JSON object (`admin`'s `GET
    /// /sessions/{id}`).
    Info,
}

/// Tasks to wake, each once however often it asked: a task is known by
/// its waker's data and vtable, so a task polled many times while it
/// waits (a blocked publisher that is kicked for its deliveries, say)
/// holds one entry, not one per poll.
#[derive(Default)]
pub struct WakerSet(RefCell<std::collections::HashMap<(usize, usize), Waker>>);

impl WakerSet {
    pub fn insert(&self, waker: &Waker) {
        let key = (waker.data() as usize, waker.vtable() as *const _ as usize);
        self.0.borrow_mut().entry(key).or_insert_with(|| waker.clone());
    }

    /// Wakes every task in the set and empties it.
    pub fn wake_all(&self) {
        let wakers = std::mem::take(&mut *self.0.borrow_mut());
        for waker in wakers.into_values() {
            waker.wake();
        }
    }

    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}

/// A core's wake-up, shared by every core.
pub struct Doorbell {
    eventfd: EventFd,
    /// Set by the owner before it waits; taken by whoever rings.
    armed: AtomicBool,
    rings: AtomicU64,
}

impl Doorbell {
    fn new() -> io::Result<Doorbell> {
        Ok(Doorbell {
            eventfd: EventFd::new()?,
            armed: AtomicBool::new(false),
            rings: AtomicU64::new(0),
        })
    }

    /// Wakes the owner if it may be asleep.
    pub fn ring(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.rings.fetch_add(1, Ordering::Relaxed);
            self.eventfd.signal();
        }
    }

    /// Times this doorbell actually signalled (woke or could have woken) its core.
    pub fn signals(&self) -> u64 {
        self.rings.load(Ordering::Relaxed)
    }
}

/// Flags shared by the two ends of one ring.
struct RingShared {
    space_wanted: AtomicBool,
}

struct Outbound {
    producer: RefCell<rtrb::Producer<Envelope>>,
    shared: Arc<RingShared>,
    capacity: usize,
}

struct Inbound {
    from: usize,
    consumer: RefCell<rtrb::Consumer<Envelope>>,
    shared: Arc<RingShared>,
}

/// One core's end of the mesh: its rings to and from every other core.
/// With a NATS bridge, the bridge is one more member, after the workers.
pub struct CoreMesh {
    core: usize,
    workers: usize,
    bus: Option<Arc<Bus>>,
    doorbells: Arc<[Doorbell]>,
    /// By target core; `None` at our own index.
    outbound: Vec<Option<Outbound>>,
    inbound: Vec<Inbound>,
    /// Tasks waiting for space in one of our outbound rings.
    space_waiters: WakerSet,
}

/// Builds the mesh for `workers` cores with rings of `capacity` envelopes;
/// with `bus`, one more member for the NATS bridge (the last).
pub fn build(workers: usize, capacity: usize, bus: Option<Arc<Bus>>) -> io::Result<Vec<CoreMesh>> {
    let cores = workers + usize::from(bus.is_some());
    let doorbells: Arc<[Doorbell]> = (0..cores)
        .map(|_| Doorbell::new())
        .collect::<io::Result<Vec<_>>>()?
        .into();
    let mut meshes: Vec<CoreMesh> = (0..cores)
        .map(|core| CoreMesh {
            core,
            workers,
            bus: bus.clone(),
            doorbells: doorbells.clone(),
            outbound: (0..cores).map(|_| None).collect(),
            inbound: Vec::new(),
            space_waiters: WakerSet::default(),
        })
        .collect();
    for from in 0..cores {
        for to in (0..cores).filter(|&to| to != from) {
            let (producer, consumer) = rtrb::RingBuffer::new(capacity);
            let shared = Arc::new(RingShared {
                space_wanted: AtomicBool::new(false),
            });
            meshes[from].outbound[to] = Some(Outbound {
                producer: RefCell::new(producer),
                shared: shared.clone(),
                capacity,
            });
            meshes[to].inbound.push(Inbound {
                from,
                consumer: RefCell::new(consumer),
                shared,
            });
        }
    }
    Ok(meshes)
}

impl CoreMesh {
    pub fn core(&self) -> usize {
        self.core
    }

    /// Members of the mesh: the workers, and the bridge if there is one.
    pub fn cores(&self) -> usize {
        self.outbound.len()
    }

    /// Worker cores (those with sessions).
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The NATS bridge's index in the mesh, if there is one.
    pub fn bridge(&self) -> Option<usize> {
        self.bus.as_ref().map(|_| self.workers)
    }

    /// The bridge's state, if there is one.
    pub fn bus(&self) -> Option<&Arc<Bus>> {
        self.bus.as_ref()
    }

    /// Pushes `envelope` to core `to` and wakes it if it may be asleep.
    /// A full ring gives the envelope back; call `poll_space` to wait.
    pub fn send(&self, to: usize, envelope: Envelope) -> Result<(), Envelope> {
        let ring = self.outbound[to].as_ref().expect("no ring to our own core");
        match ring.producer.borrow_mut().push(envelope) {
            Ok(()) => {
                // Handshake with `arm`: our tail store (in `push`) before
                // the load of `armed` (in `ring`). See the module comment.
                fence(Ordering::SeqCst);
                self.doorbells[to].ring();
                Ok(())
            }
            Err(rtrb::PushError::Full(envelope)) => Err(envelope),
        }
    }

    /// Ready when ring `to` has room; otherwise asks its consumer to ring
    /// our doorbell once it has made some, and wakes this task then.
    pub fn poll_space(&self, to: usize, cx: &mut Context<'_>) -> Poll<()> {
        let ring = self.outbound[to].as_ref().expect("no ring to our own core");
        if !ring.producer.borrow().is_full() {
            return Poll::Ready(());
        }
        self.space_waiters.insert(cx.waker());
        if self.want_space(to) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Asks the consumer of ring `to` (found full) to ring our doorbell
    /// once it has made room: our mesh loop then sends what the outboxes
    /// hold and wakes the tasks waiting for space. Returns `true` if room
    /// was made meanwhile (try again now: no ring will come for it).
    pub fn want_space(&self, to: usize) -> bool {
        let ring = self.outbound[to].as_ref().expect("no ring to our own core");
        ring.shared.space_wanted.store(true, Ordering::SeqCst);
        // Handshake with `drain`: the flag's store before the load of the
        // consumer's head (in `is_full`). See the module comment.
        fence(Ordering::SeqCst);
        !ring.producer.borrow().is_full()
    }

    /// Takes every envelope waiting in our inbound rings, in ring order,
    /// until `stop` says so (it is asked before each), and rings the
    /// doorbell of each producer that waits for space. Returns how many
    /// were taken.
    pub fn drain(&self, mut handle: impl FnMut(Envelope), stop: impl Fn() -> bool) -> usize {
        let mut taken = 0;
        for ring in &self.inbound {
            let mut consumer = ring.consumer.borrow_mut();
            let mut popped = false;
            // Bounded per ring, so a busy producer cannot hold the others back.
            for _ in 0..DRAIN_BUDGET {
                if stop() {
                    break;
                }
                let Ok(envelope) = consumer.pop() else { break };
                handle(envelope);
                taken += 1;
                popped = true;
            }
            if !popped {
                continue;
            }
            // Handshake with `want_space`: our head store (in `pop`) before
            // the load of the flag. See the module comment.
            fence(Ordering::SeqCst);
            if ring.shared.space_wanted.swap(false, Ordering::SeqCst) {
                // Force the signal: the producer's core may be busy but is
                // waiting for exactly this.
                self.doorbells[ring.from].armed.store(true, Ordering::SeqCst);
                self.doorbells[ring.from].ring();
            }
        }
        taken
    }

    /// Wakes every task that waited for ring space (some may find their
    /// ring still full and wait again).
    pub fn wake_space_waiters(&self) {
        self.space_waiters.wake_all();
    }

    /// Says we may go to sleep. Returns `false` if an envelope arrived
    /// meanwhile (drain again instead of sleeping).
    pub fn arm(&self) -> bool {
        self.doorbells[self.core].armed.store(true, Ordering::SeqCst);
        // Handshake with `send`: the flag's store before the loads of the
        // producers' tails (in `is_empty`). See the module comment.
        fence(Ordering::SeqCst);
        if self.inbound.iter().any(|r| !r.consumer.borrow().is_empty()) {
            self.doorbells[self.core].armed.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Rings our own doorbell (see `mesh_loop`).
    pub fn ring_own_doorbell(&self) {
        let own = &self.doorbells[self.core];
        own.armed.store(true, Ordering::SeqCst);
        own.ring();
    }

    /// A monoio handle on our doorbell: readable once rung.
    pub fn doorbell_waiter(&self) -> io::Result<monoio::net::UnixStream> {
        self.doorbells[self.core].eventfd.waiter()
    }

    /// Our doorbell's eventfd, for a loop that is not on monoio (the bridge).
    pub fn doorbell_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.doorbells[self.core].eventfd.fd()
    }

    /// Resets our doorbell's counter after a wake-up.
    pub fn clear_doorbell(&self) {
        self.doorbells[self.core].eventfd.clear();
    }

    /// Envelopes waiting in our ring to each other core, and its capacity.
    pub fn fullness(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.outbound.iter().enumerate().filter_map(|(to, ring)| {
            let ring = ring.as_ref()?;
            let used = ring.capacity - ring.producer.borrow().slots();
            Some((to, used, ring.capacity))
        })
    }

    /// Times our doorbell signalled us.
    pub fn doorbell_signals(&self) -> u64 {
        self.doorbells[self.core].signals()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::MessageKind;

    fn publish(key: Bytes, body: Bytes) -> Envelope {
        Envelope::Publish(Arc::new(Message {
            key,
            kind: MessageKind::Binary,
            body,
            stomp_headers: None,
            id: 0,
            native: None,
            compress: true,
        }))
    }

    /// Three cores, tiny rings, every core sending numbered publishes to
    /// every other from its own thread while draining its inbound rings:
    /// each consumer must see each producer's numbers exactly once, in
    /// order, whatever the interleaving and however often rings are full.
    #[test]
    fn rings_lose_and_reorder_nothing_under_contention() {
        const CORES: usize = 3;
        const EACH: u64 = 20_000;
        let meshes = build(CORES, 8, None).unwrap();
        let threads: Vec<_> = meshes
            .into_iter()
            .map(|mesh| {
                std::thread::spawn(move || {
                    let me = mesh.core();
                    let mut next_to_send = [0u64; CORES];
                    let mut next_expected = [0u64; CORES];
                    let mut full_seen = 0u64;
                    let done = |sent: &[u64; CORES], got: &[u64; CORES]| {
                        (0..CORES)
                            .filter(|&c| c != me)
                            .all(|c| sent[c] == EACH && got[c] == EACH)
                    };
                    let mut spins = 0u64;
                    while !done(&next_to_send, &next_expected) {
                        spins += 1;
                        assert!(
                            spins < 200_000_000,
                            "stuck: sent {next_to_send:?} got {next_expected:?}"
                        );
                        for to in (0..CORES).filter(|&c| c != me) {
                            // A few at a time, so sending and draining interleave.
                            for _ in 0..3 {
                                let n = next_to_send[to];
                                if n == EACH {
                                    break;
                                }
                                let frame = Bytes::copy_from_slice(&n.to_le_bytes());
                                let topic = Bytes::from(vec![me as u8]);
                                match mesh.send(to, publish(topic, frame)) {
                                    Ok(()) => next_to_send[to] += 1,
                                    Err(_) => {
                                        full_seen += 1;
                                        break;
                                    }
                                }
                            }
                        }
                        mesh.drain(
                            |envelope| {
                                let Envelope::Publish(message) = envelope else {
                                    panic!("only publishes are sent")
                                };
                                let (topic, frame) = (&message.key, &message.body);
                                let from = topic[0] as usize;
                                let n = u64::from_le_bytes(frame[..8].try_into().unwrap());
                                assert_eq!(n, next_expected[from], "core {me} from core {from}");
                                next_expected[from] += 1;
                            },
                            || false,
                        );
                    }
                    full_seen
                })
            })
            .collect();
        let full: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(full > 0, "the rings never filled: the test did not test back-pressure");
    }

    #[test]
    fn doorbell_signals_only_when_armed() {
        let meshes = build(2, 4, None).unwrap();
        let frame = || publish(Bytes::from_static(b"t"), Bytes::from_static(b"f"));
        // Core 1 is busy (not armed): no signal.
        meshes[0].send(1, frame()).unwrap();
        assert_eq!(meshes[1].doorbell_signals(), 0);
        // It drained, armed only if nothing is waiting.
        assert!(!meshes[1].arm(), "an envelope waits: must not sleep");
        assert_eq!(meshes[1].drain(|_| {}, || false), 1);
        assert!(meshes[1].arm());
        meshes[0].send(1, frame()).unwrap();
        meshes[0].send(1, frame()).unwrap();
        assert_eq!(
            meshes[1].doorbell_signals(),
            1,
            "one signal while asleep, not one per envelope"
        );
    }

    /// The configuration sizes the rings by this (`config::MESH_SLOT_BYTES`).
    #[test]
    fn an_envelope_fits_its_slot() {
        assert!(std::mem::size_of::<Envelope>() <= crate::config::MESH_SLOT_BYTES);
    }

    #[test]
    fn full_ring_gives_the_envelope_back() {
        let meshes = build(2, 2, None).unwrap();
        let env = |n: u8| publish(Bytes::from_static(b"t"), Bytes::from(vec![n]));
        meshes[0].send(1, env(0)).unwrap();
        meshes[0].send(1, env(1)).unwrap();
        assert!(meshes[0].send(1, env(2)).is_err());
        assert_eq!(meshes[0].fullness().collect::<Vec<_>>(), vec![(1, 2, 2)]);
    }
}
