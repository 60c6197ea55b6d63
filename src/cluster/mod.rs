//! The NATS bridge: how a node joins other sluice nodes (`--nats`).
//!
//! One thread, with its own current-thread tokio runtime (async-nats needs
//! tokio; the cores stay on monoio), is one more member of the mesh: the
//! cores talk to it through their SPSC rings, as to each other, and it
//! talks to NATS over one connection.
//!
//! - **Out.** Every publish made on a core is also sent to the bridge
//!   (`Hub::publish`), which takes it off its rings at once into a bounded
//!   buffer (`--nats-buffer-bytes`) and hands it to the client, in order,
//!   while the bus is up. Past the buffer, new publishes to the bus are
//!   dropped and counted: a slow or absent bus never holds a core. The
//!   payload crosses as the message's `Bytes`, without a copy; the client
//!   writes what it has been handed in batches (one write per wake-up of
//!   its connection task, not one per message).
//! - **Interest.** The bridge takes every core's interest changes, like a
//!   core: a topic (or queue) gets a NATS subscription while some core has
//!   a subscriber of it, and loses it with the last one. A topic nobody
//!   here wants costs this node no bus traffic.
//! - **In.** A message from NATS goes to each core with subscribers of its
//!   topic (a queue's, to one core, weighted by its subscribers), into
//!   their rings; one that finds a ring full waits in the bridge, in order.
//!   While too many wait, the bridge reads no more from NATS, whose
//!   subscription buffers then drop (counted as slow-consumer drops):
//!   at most once, never a blocked core. Topic messages this node
//!   published come back only if it subscribes to them too, and are
//!   dropped by their node header: local subscribers had them already.
//! - **Requests.** An admin action on a session of another node goes out
//!   as a NATS request to that node's subject; its bridge hands it to the
//!   session's core and answers what the core answers. No answer within
//!   `REQUEST_WAIT` (the node is gone) reads as "no such session".
//!
//! The client reconnects by itself (every URL in turn, with the back-off
//! below) and subscribes again to every current subject.

pub mod subject;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::{Client, ConnectOptions, Event, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::config::{Cluster, NatsAuth};
use crate::pubsub::mesh::{CoreMesh, Envelope, RemoteRequest, SessionAction};
use crate::pubsub::message::Message;
use crate::stats::Bus;
use crate::topic::is_queue;
use crate::ws::MessageKind;
use subject::Subjects;

/// How long a request to another node's session may wait for its answer.
pub const REQUEST_WAIT: Duration = Duration::from_secs(2);
/// The cross-node lag histogram takes at most one message per this many
/// microseconds from each node (the others carry no time header).
const LAG_SAMPLE_US: u64 = 1000;
/// Requests from other nodes waiting for a core's answer; past it, more
/// are answered "no" at once.
const MAX_PENDING_REQUESTS: usize = 4096;
/// Envelopes for cores that may wait in the bridge for ring space before
/// it stops reading from NATS.
const BACKLOG_MAX: usize = 8192;
/// Pings to the server this often: a connection that stops answering is
/// found dead within two of them.
const PING_INTERVAL: Duration = Duration::from_secs(2);
/// Messages the client keeps per subscription before dropping (slow
/// consumer): a burst at the bus's ceiling (400,000/s) while the bridge's
/// thread waits for its core. (8,192 lost 0.3% of a 400,000/s run.)
const SUBSCRIPTION_CAPACITY: usize = 65_536;
/// The client's queue of commands (publishes) not yet written: what may
/// wait there, uncounted by `--nats-buffer-bytes`, when the connection
/// dies before the client notices.
const CLIENT_CAPACITY: usize = 512;

/// The back-off between connection attempts: 25 ms doubling to 1 s, so a
/// restarted server is found again within a second.
fn reconnect_delay(attempts: usize) -> Duration {
    Duration::from_millis((25u64 << attempts.min(6)).min(1000))
}

/// A running bridge: stop it once the workers are done.
pub struct Bridge {
    stop: Arc<Notify>,
    /// `None` once stopped.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bridge {
    /// Starts the bridge thread on the mesh's last member. Returns once
    /// the client is made (it connects in the background: a node starts
    /// while NATS is down); an error for options the client refuses.
    pub fn start(mesh: CoreMesh, cluster: Cluster, max_message_bytes: usize) -> Result<Bridge, String> {
        let stop = Arc::new(Notify::new());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop_for_thread = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-nats".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start the NATS bridge's runtime: {e}")));
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(
                    &runtime,
                    run(mesh, cluster, max_message_bytes, stop_for_thread, ready_tx),
                );
                drop(local);
                // A DNS lookup or certificate load still blocking does not
                // hold the exit.
                runtime.shutdown_timeout(Duration::from_millis(500));
            })
            .map_err(|e| format!("cannot start the NATS bridge: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Bridge {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err("the NATS bridge ended at start".into())
            }
        }
    }

    /// Hands what the bridge still holds for the bus to the client, lets
    /// it write for at most a second, and ends the thread.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.notify_one();
            let _ = thread.join();
        }
    }
}

/// A bridge dropped without `stop` (a server that failed to start) ends
/// its thread all the same.
impl Drop for Bridge {
    fn drop(&mut self) {
        self.end();
    }
}

type Ready = std::sync::mpsc::Sender<Result<(), String>>;

/// The client's options from the node's configuration.
async fn options(
    cluster: &Cluster,
    bus: Arc<Bus>,
    sender: Arc<Notify>,
    why: Arc<std::sync::Mutex<String>>,
) -> Result<ConnectOptions, String> {
    let mut options = match &cluster.auth {
        NatsAuth::None => ConnectOptions::new(),
        NatsAuth::UserPassword(user, password) => {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(token) => ConnectOptions::with_token(token.clone()),
        NatsAuth::Nkey(seed) => ConnectOptions::with_nkey(seed.clone()),
        NatsAuth::Creds(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| format!("nats_creds {}: {e}", path.display()))?,
    };
    if let Some(ca) = &cluster.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let ever_connected = Arc::new(AtomicBool::new(false));
    let said = Arc::new(Said::default());
    let options = options
        .name(format!("sluice {}", cluster.node_id))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .ping_interval(PING_INTERVAL)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .client_capacity(CLIENT_CAPACITY)
        .request_timeout(Some(REQUEST_WAIT))
        // Called before each attempt with every server's last error: kept
        // for the warning while the bus is unreachable. The choice of
        // server stays the client's.
        .reconnect_to_server_callback(move |servers, _| {
            let said = servers
                .iter()
                .map(|s| format!("{s}: {}", s.last_error.as_deref().unwrap_or("not tried yet")))
                .collect::<Vec<_>>()
                .join("; ");
            *why.lock().unwrap_or_else(|e| e.into_inner()) = said;
            std::future::ready(None)
        })
        .event_callback(move |event| {
            let bus = bus.clone();
            let sender = sender.clone();
            let ever_connected = ever_connected.clone();
            let said = said.clone();
            async move {
                match event {
                    Event::Connected => {
                        bus.connected.store(true, Ordering::Release);
                        if ever_connected.swap(true, Ordering::Relaxed) {
                            bus.reconnects.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("NATS: reconnected");
                        } else {
                            tracing::info!("NATS: connected");
                        }
                        sender.notify_one();
                    }
                    Event::Disconnected => {
                        bus.connected.store(false, Ordering::Release);
                        tracing::warn!("NATS: disconnected; reconnecting, publishes to the bus are buffered");
                    }
                    Event::SlowConsumer(_) => {
                        bus.dropped_slow_consumer.fetch_add(1, Ordering::Relaxed);
                    }
                    // Said again at each attempt to connect: logged once
                    // in ten seconds.
                    Event::ServerError(e) => {
                        let e = e.to_string();
                        if said.first_in_a_while(&e) {
                            tracing::error!("NATS server error: {e}");
                        }
                    }
                    Event::ClientError(e) => {
                        let e = e.to_string();
                        if said.first_in_a_while(&e) {
                            tracing::warn!("NATS client error: {e}");
                        }
                    }
                    Event::LameDuckMode => tracing::warn!("NATS: the server is going away (lame duck mode)"),
                    Event::Draining | Event::Closed => {}
                }
            }
        });
    Ok(options)
}

/// The last error the client reported, and when it was last logged.
#[derive(Default)]
struct Said(std::sync::Mutex<Option<(String, std::time::Instant)>>);

impl Said {
    /// Whether `what` should be logged: it differs from the last one, or
    /// that was logged ten seconds ago or more.
    fn first_in_a_while(&self, what: &str) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        match &*last {
            Some((said, at)) if said == what && now.duration_since(*at) < Duration::from_secs(10) => false,
            _ => {
                *last = Some((what.to_string(), now));
                true
            }
        }
    }
}

async fn run(mesh: CoreMesh, cluster: Cluster, max_message_bytes: usize, stop: Arc<Notify>, ready: Ready) {
    let bus = mesh.bus().expect("the bridge's mesh has the bus").clone();
    let sender_wake = Arc::new(Notify::new());
    let why = Arc::new(std::sync::Mutex::new(String::new()));
    let connected = async {
        let options = options(&cluster, bus.clone(), sender_wake.clone(), why.clone()).await?;
        options
            .connect(cluster.urls.as_slice())
            .await
            .map_err(|e| format!("nats: {e}"))
    };
    let client = match connected.await {
        Ok(client) => client,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // A duplicate of the doorbell's eventfd: tokio owns what it watches.
    // SAFETY: the duplicate is a valid descriptor the `AsyncFd` owns, and
    // nothing else closes or replaces it while it is registered.
    let doorbell = match nix_dup(mesh.doorbell_fd().as_raw_fd())
        .and_then(|fd| unsafe { AsyncFd::register(fd) }.map_err(io::Error::from))
    {
        Ok(fd) => fd,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot watch the NATS bridge's doorbell: {e}")));
            return;
        }
    };
    let instance = crate::config::random_node_id();
    let bridge = Rc::new(State {
        subjects: Subjects::new(&cluster.prefix),
        node_id: cluster.node_id.clone(),
        node_header: format!("{} {instance}", cluster.node_id),
        instance,
        client,
        bus,
        max_message_bytes,
        buffer_bytes: cluster.buffer_bytes,
        interest: RefCell::new(HashMap::new()),
        out: RefCell::new(VecDeque::new()),
        out_bytes: Cell::new(0),
        sender_wake,
        backlog: RefCell::new((0..mesh.cores()).map(|_| VecDeque::new()).collect()),
        backlog_len: Cell::new(0),
        space: Notify::new(),
        kick: Notify::new(),
        replies: RefCell::new(HashMap::new()),
        next_request: Cell::new(0),
        next_message: Cell::new(0),
        turns: RefCell::new(HashMap::new()),
        mesh,
    });
    tracing::info!(
        node = %bridge.node_id,
        urls = ?cluster.urls,
        prefix = %cluster.prefix,
        "cluster: node {} on NATS {}",
        bridge.node_id,
        cluster.urls.join(",")
    );
    let _ = ready.send(Ok(()));
    drop(ready);
    let requests = tokio::task::spawn_local(serve_requests(bridge.clone()));
    let sender = tokio::task::spawn_local(send_to_bus(bridge.clone()));
    let unreachable = tokio::task::spawn_local(warn_while_unreachable(bridge.clone(), why));
    let watcher = tokio::task::spawn_local(watch_connection(bridge.clone()));
    bridge_loop(&bridge, &doorbell, &stop).await;
    // Stopping: what is buffered goes to the client, which gets a second
    // to write it.
    let flushed = async {
        while !bridge.out.borrow().is_empty() && bridge.bus.is_connected() {
            bridge.sender_wake.notify_one();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = bridge.client.flush().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), flushed).await;
    requests.abort();
    sender.abort();
    unreachable.abort();
    watcher.abort();
    for (_, interest) in bridge.interest.borrow_mut().drain() {
        interest.task.abort();
    }
}

/// `dup(2)` with close-on-exec.
fn nix_dup(fd: std::os::fd::RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall on a descriptor the mesh keeps open; the
    // result is checked before use.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

/// The bridge's state; everything runs on its one thread.
struct State {
    mesh: CoreMesh,
    subjects: Subjects,
    node_id: String,
    /// This process's random id: what `Sluice-Node` says besides the node
    /// id, so that two processes given one node id do not drop each
    /// other's messages as their own (and see each other's hello).
    instance: String,
    /// `Sluice-Node`'s value: the node id and the instance.
    node_header: String,
    client: Client,
    bus: Arc<Bus>,
    max_message_bytes: usize,
    buffer_bytes: usize,
    /// Topic table key -> the cores with subscribers (a topic's count is 1
    /// for any), and the task holding its NATS subscription.
    interest: RefCell<HashMap<Bytes, Interest>>,
    /// Publishes for the bus, oldest first, and their payload bytes.
    out: RefCell<VecDeque<Outgoing>>,
    out_bytes: Cell<usize>,
    /// Wakes the task that hands `out` to the client.
    sender_wake: Arc<Notify>,
    /// Envelopes for each core that found its ring full, oldest first.
    backlog: RefCell<Vec<VecDeque<Envelope>>>,
    backlog_len: Cell<usize>,
    /// Wakes subscription tasks once the backlog is below `BACKLOG_MAX`.
    space: Notify,
    /// Wakes the bridge loop (a backlog to retry).
    kick: Notify,
    /// Requests from other nodes handed to a core: our request id -> the
    /// subject to answer on.
    replies: RefCell<HashMap<u64, async_nats::Subject>>,
    next_request: Cell<u64>,
    next_message: Cell<u64>,
    /// Queue -> messages handed out here (whose turn is next).
    turns: RefCell<HashMap<Bytes, u64>>,
}

struct Interest {
    cores: Vec<(u16, u32)>,
    task: tokio::task::AbortHandle,
}

struct Outgoing {
    message: Arc<Message>,
    /// When the bridge took it, in microseconds since the epoch.
    at_us: u64,
}

/// What a buffered publish holds: its frame (or body), its key, and the
/// entry and message themselves.
fn buffered_size(message: &Message) -> usize {
    const ENTRY_BYTES: usize = 160;
    message.native.as_ref().map_or(message.body.len(), Bytes::len) + message.key.len() + ENTRY_BYTES
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Takes what the cores send until stopped: drains the rings, retries the
/// backlog, then sleeps on the doorbell (the same store-then-check
/// handshake as a core's mesh loop, `CoreMesh::arm`).
async fn bridge_loop(bridge: &Rc<State>, doorbell: &AsyncFd<std::os::fd::OwnedFd>, stop: &Notify) {
    loop {
        let taken = bridge.mesh.drain(|envelope| bridge.take(envelope), || false);
        bridge.retry_backlog();
        if !bridge.out.borrow().is_empty() {
            bridge.sender_wake.notify_one();
        }
        if taken > 0 {
            // Let the sender and the subscriptions run before draining more.
            tokio::task::yield_now().await;
            continue;
        }
        if !bridge.mesh.arm() {
            continue;
        }
        tokio::select! {
            ready = doorbell.readable() => {
                bridge.mesh.clear_doorbell();
                if let Ok(mut guard) = ready {
                    guard.clear_ready();
                }
            }
            _ = bridge.kick.notified() => {}
            _ = stop.notified() => return,
        }
    }
}

impl State {
    /// One envelope from a core.
    fn take(self: &Rc<Self>, envelope: Envelope) {
        match envelope {
            Envelope::Publish(message) => self.buffer(message),
            Envelope::Interest { topic, core, count } => self.interest_changed(topic, core, count),
            Envelope::Reply { request, answer } => {
                if let Some(reply) = self.replies.borrow_mut().remove(&request) {
                    let client = self.client.clone();
                    // `0`: no such session; `1` and the action's answer.
                    let answer = match answer {
                        None => Bytes::from_static(b"0"),
                        Some(info) => [&b"1"[..], &info].concat().into(),
                    };
                    tokio::task::spawn_local(async move {
                        let _ = client.publish(reply, answer).await;
                    });
                }
            }
            Envelope::Remote(request) => self.ask_node(*request),
            // Sent only to cores.
            Envelope::Session { .. } | Envelope::Topics { .. } => {}
        }
    }

    /// Queues a publish for the bus, or drops it past the buffer.
    fn buffer(&self, message: Arc<Message>) {
        let size = buffered_size(&message);
        if self.out_bytes.get() + size > self.buffer_bytes && !self.out.borrow().is_empty() {
            self.bus.dropped_buffer_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.out_bytes.set(self.out_bytes.get() + size);
        self.out.borrow_mut().push_back(Outgoing {
            message,
            at_us: now_us(),
        });
        self.note_depth();
    }

    fn note_depth(&self) {
        let depth = self.out.borrow().len() + self.backlog_len.get();
        self.bus.queue_depth.store(depth as u64, Ordering::Relaxed);
        self.bus
            .buffered_bytes
            .store(self.out_bytes.get() as u64, Ordering::Relaxed);
    }

    /// A core's count of subscribers of `topic` changed: subscribe to its
    /// subject when the node's first appears, unsubscribe with its last.
    fn interest_changed(self: &Rc<Self>, topic: Bytes, core: u16, count: u32) {
        let mut interest = self.interest.borrow_mut();
        if let Some(entry) = interest.get_mut(&topic) {
            match (count, entry.cores.binary_search_by_key(&core, |&(c, _)| c)) {
                (0, Ok(at)) => {
                    entry.cores.remove(at);
                }
                (0, Err(_)) => {}
                (n, Ok(at)) => entry.cores[at].1 = n,
                (n, Err(at)) => entry.cores.insert(at, (core, n)),
            }
            if entry.cores.is_empty() {
                // Dropping the subscriber (the task) unsubscribes.
                if let Some(gone) = interest.remove(&topic) {
                    gone.task.abort();
                }
                self.turns.borrow_mut().remove(&topic);
            }
            return;
        }
        // (Once the node shuts down, it takes up no subject.)
        if count == 0 || self.bus.closing.load(Ordering::Relaxed) {
            return;
        }
        let task = tokio::task::spawn_local(subscription(self.clone(), topic.clone())).abort_handle();
        interest.insert(
            topic,
            Interest {
                cores: vec![(core, count)],
                task,
            },
        );
    }

    /// Hands an envelope to core `core`, behind any of its envelopes
    /// still waiting for ring space.
    fn to_core(&self, core: usize, envelope: Envelope) {
        let mut backlog = self.backlog.borrow_mut();
        if backlog[core].is_empty() {
            match self.mesh.send(core, envelope) {
                Ok(()) => return,
                Err(envelope) => backlog[core].push_back(envelope),
            }
            // The consumer rings our doorbell once it has made room;
            // room made meanwhile: retry from the loop at once.
            if self.mesh.want_space(core) {
                self.kick.notify_one();
            }
        } else {
            backlog[core].push_back(envelope);
        }
        self.backlog_len.set(self.backlog_len.get() + 1);
    }

    /// Sends what waits for ring space, as far as there is room; what is
    /// left waits for its consumer to ring our doorbell (or, if it made
    /// room meanwhile, for the kick this stores).
    fn retry_backlog(&self) {
        if self.backlog_len.get() == 0 {
            return;
        }
        let mut backlog = self.backlog.borrow_mut();
        for (core, waiting) in backlog.iter_mut().enumerate() {
            while let Some(envelope) = waiting.pop_front() {
                match self.mesh.send(core, envelope) {
                    Ok(()) => self.backlog_len.set(self.backlog_len.get() - 1),
                    Err(envelope) => {
                        waiting.push_front(envelope);
                        if self.mesh.want_space(core) {
                            // Room already: the loop comes back at once.
                            self.kick.notify_one();
                        }
                        break;
                    }
                }
            }
        }
        drop(backlog);
        if self.backlog_len.get() < BACKLOG_MAX {
            self.space.notify_waiters();
        }
        self.note_depth();
    }

    /// A message from NATS on `key`'s subject: to the cores with
    /// subscribers of it (a queue's, to one).
    fn deliver(&self, key: &Bytes, message: async_nats::Message) {
        let headers = message.headers.as_ref();
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let queue = is_queue(key);
        // Shutting down: the cores take no more (their sessions are
        // closing; a queue's message would be lost here, and the watcher
        // hands the queues to the other nodes).
        if self.bus.closing.load(Ordering::Relaxed) {
            return;
        }
        // Our own topic publish, back because we subscribe to it too: our
        // cores had it already.
        if !queue && header(subject::NODE) == Some(self.node_header.as_str()) {
            return;
        }
        let payload = message.payload;
        let name_len = key.len() - usize::from(queue);
        // RFC 6455 8.1: a text message is UTF-8 (each payload is scanned
        // once: a binary one not at all); and a delivery is bounded like
        // any message (`MSG <topic> <payload>`).
        let utf8 = || simdutf8::basic::from_utf8(&payload).is_ok();
        let kind = match header(subject::KIND) {
            Some("binary") => Some(MessageKind::Binary),
            Some("text") => utf8().then_some(MessageKind::Text),
            _ if utf8() => Some(MessageKind::Text),
            _ => Some(MessageKind::Binary),
        };
        let Some(kind) = kind.filter(|_| payload.len() + name_len + 5 <= self.max_message_bytes) else {
            self.bus.dropped_invalid.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // A STOMP publisher's headers, parsed and encoded again: bytes
        // from the bus never go into a MESSAGE frame as they came.
        let stomp_headers = match header(subject::STOMP_HEADERS) {
            None => None,
            Some(h) => {
                use base64::Engine;
                let checked = base64::engine::general_purpose::STANDARD
                    .decode(h)
                    .ok()
                    .and_then(|block| crate::pubsub::message::checked_stomp_headers(&block));
                match checked {
                    Some(headers) => Some(headers),
                    None => {
                        self.bus.dropped_invalid.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        };
        self.bus.received.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = header(subject::TIME).and_then(|t| t.parse::<u64>().ok()) {
            self.bus.observe_lag(now_us().saturating_sub(at));
        }
        let seq = self.next_message.get();
        self.next_message.set(seq + 1);
        let message = Arc::new(Message {
            key: key.clone(),
            kind,
            body: payload,
            stomp_headers,
            id: ((self.mesh.core() as u64) << 48) | (seq & ((1 << 48) - 1)),
            native: None,
            compress: header(subject::COMPRESS) != Some("no"),
        });
        let interest = self.interest.borrow();
        let Some(entry) = interest.get(key) else {
            // The last subscriber here left while it was on its way.
            return;
        };
        if queue {
            let total: u64 = entry.cores.iter().map(|&(_, n)| u64::from(n)).sum();
            let mut turns = self.turns.borrow_mut();
            let turn = turns.entry(key.clone()).or_insert(0);
            let mut at = *turn % total.max(1);
            *turn = turn.wrapping_add(1);
            drop(turns);
            for &(core, n) in &entry.cores {
                if at < u64::from(n) {
                    self.to_core(core as usize, Envelope::Publish(message));
                    break;
                }
                at -= u64::from(n);
            }
        } else {
            for &(core, _) in &entry.cores {
                self.to_core(core as usize, Envelope::Publish(message.clone()));
            }
        }
    }

    /// An admin action on another node's session: a NATS request to that
    /// node, whose answer (or its absence) goes back to the asking core.
    /// While the bus is down it is answered "no" at once: a request the
    /// client kept until it reconnected would be carried out after its
    /// asker had been told 404.
    fn ask_node(self: &Rc<Self>, request: RemoteRequest) {
        self.bus.requests_out.fetch_add(1, Ordering::Relaxed);
        let (asker, asked_for) = (request.from as usize, request.request);
        let reply = move |bridge: &State, answer: Option<Bytes>| {
            bridge.to_core(
                asker,
                Envelope::Reply {
                    request: asked_for,
                    answer,
                },
            );
            bridge.kick.notify_one();
        };
        if self.client.connection_state() != async_nats::connection::State::Connected {
            reply(self, None);
            return;
        }
        let mut headers = HeaderMap::new();
        headers.insert(subject::SESSION, request.session.as_str());
        // The other node refuses it past this (its asker has given up).
        let deadline = now_us() / 1000 + REQUEST_WAIT.as_millis() as u64;
        headers.insert(subject::DEADLINE, deadline.to_string().as_str());
        let payload = match &request.action {
            SessionAction::Send(kind, body, compress) => {
                headers.insert(subject::ACTION, "send");
                if !compress {
                    headers.insert(subject::COMPRESS, "no");
                }
                headers.insert(
                    subject::KIND,
                    if *kind == MessageKind::Text { "text" } else { "binary" },
                );
                body.clone()
            }
            SessionAction::Close(code, reason) => {
                headers.insert(subject::ACTION, "close");
                headers.insert(subject::CODE, code.to_string().as_str());
                reason.clone()
            }
            SessionAction::Info => {
                headers.insert(subject::ACTION, "info");
                Bytes::new()
            }
        };
        let subject = self.subjects.node(&request.node);
        let bridge = self.clone();
        tokio::task::spawn_local(async move {
            let asked = bridge.client.request_with_headers(subject, headers, payload);
            let answer = match tokio::time::timeout(REQUEST_WAIT, asked).await {
                Ok(Ok(answer)) => answer.payload.strip_prefix(b"1").map(Bytes::copy_from_slice),
                Ok(Err(e)) => {
                    tracing::debug!(node = %request.node, error = %e, "request to another node failed");
                    None
                }
                Err(_) => None,
            };
            reply(&bridge, answer);
        });
    }

    /// A message on this node's subject: another node's request for one
    /// of our sessions, or a node saying hello (one with our id and another
    /// instance is a configuration mistake worth an error).
    fn take_request(&self, message: async_nats::Message) {
        let headers = message.headers.as_ref();
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        if header(subject::ACTION) == Some("hello") {
            if let Some(other) = header(subject::INSTANCE).filter(|i| *i != self.instance) {
                tracing::error!(
                    node = %self.node_id,
                    other,
                    "another sluice process uses this node id: give every node its own --node-id, or their messages are lost"
                );
            }
            return;
        }
        let Some(reply) = message.reply.clone() else { return };
        self.bus.requests_in.fetch_add(1, Ordering::Relaxed);
        let answer_no = |client: &Client, reply: async_nats::Subject| {
            let client = client.clone();
            tokio::task::spawn_local(async move {
                let _ = client.publish(reply, Bytes::from_static(b"0")).await;
            });
        };
        // The asker has given up: carrying it out now would contradict
        // the 404 it was given.
        let late = header(subject::DEADLINE)
            .and_then(|d| d.parse::<u64>().ok())
            .is_some_and(|deadline| now_us() / 1000 > deadline);
        if late {
            return;
        }
        let target = header(subject::SESSION).and_then(|id| parse_session(id, self.mesh.workers()));
        let action = self.requested_action(
            header(subject::ACTION),
            header(subject::KIND),
            header(subject::CODE),
            header(subject::COMPRESS) != Some("no"),
            &message.payload,
        );
        let (Some((core, key)), Some(action)) = (target, action) else {
            answer_no(&self.client, reply);
            return;
        };
        if self.replies.borrow().len() >= MAX_PENDING_REQUESTS || self.backlog_len.get() >= BACKLOG_MAX {
            answer_no(&self.client, reply);
            return;
        }
        let request = self.next_request.get();
        self.next_request.set(request + 1);
        self.replies.borrow_mut().insert(request, reply);
        self.to_core(
            core,
            Envelope::Session {
                key,
                action,
                request,
                from: self.mesh.core() as u16,
            },
        );
        self.kick.notify_one();
    }

    /// The action a request asks for, checked as the admin port checks
    /// its own: a message within `--max-message-bytes` (text: UTF-8), or
    /// a close with a code an application may send (1000, 3000-4999) and
    /// a UTF-8 reason of at most 123 bytes (RFC 6455 5.5, 5.5.1, 7.4).
    fn requested_action(
        &self,
        action: Option<&str>,
        kind: Option<&str>,
        code: Option<&str>,
        compress: bool,
        payload: &Bytes,
    ) -> Option<SessionAction> {
        match action? {
            "send" => {
                let utf8 = simdutf8::basic::from_utf8(payload).is_ok();
                let kind = match kind {
                    Some("binary") => MessageKind::Binary,
                    Some("text") if utf8 => MessageKind::Text,
                    None if utf8 => MessageKind::Text,
                    None => MessageKind::Binary,
                    _ => return None,
                };
                (payload.len() <= self.max_message_bytes).then(|| SessionAction::Send(kind, payload.clone(), compress))
            }
            "close" => {
                let code: u16 = code?.parse().ok()?;
                let allowed = code == 1000 || (3000..=4999).contains(&code);
                let reason_ok = payload.len() <= 123 && simdutf8::basic::from_utf8(payload).is_ok();
                (allowed && reason_ok).then(|| SessionAction::Close(code, payload.clone()))
            }
            "info" => Some(SessionAction::Info),
            _ => None,
        }
    }
}

/// `<core>.<slot>.<generation>` -> core and slot key, for a core of ours
/// and an odd generation (as the admin port reads it).
fn parse_session(id: &str, workers: usize) -> Option<(usize, u64)> {
    let mut parts = id.split('.');
    let core: usize = parts.next()?.parse().ok()?;
    let slot: u32 = parts.next()?.parse().ok()?;
    let generation: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || generation.is_multiple_of(2) || core >= workers {
        return None;
    }
    Some((core, (u64::from(generation) << 32) | u64::from(slot)))
}

/// Holds the NATS subscription of one topic (or queue) while the node
/// wants it, and hands its messages on; aborted (which unsubscribes) when
/// the node's last subscriber leaves.
async fn subscription(bridge: Rc<State>, key: Bytes) {
    let subject = bridge.subjects.of_key(&key);
    let subscribed = if is_queue(&key) {
        let group = bridge.subjects.queue_group().to_string();
        bridge.client.queue_subscribe(subject.clone(), group).await
    } else {
        bridge.client.subscribe(subject.clone()).await
    };
    let mut subscriber = match subscribed {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(subject, error = %e, "NATS: cannot subscribe; this node misses the topic's publishes from other nodes");
            return std::future::pending().await;
        }
    };
    // Counted once the subscription has been written to the server (while
    // connected), uncounted however the task ends.
    let _ = bridge.client.flush().await;
    bridge.bus.subjects.fetch_add(1, Ordering::Relaxed);
    let _counted = Subscribed(&bridge.bus);
    while let Some(message) = subscriber.next().await {
        bridge.deliver(&key, message);
        while bridge.backlog_len.get() >= BACKLOG_MAX {
            bridge.space.notified().await;
        }
    }
}

/// One subject in `Bus::subjects` while it lives.
struct Subscribed<'b>(&'b Bus);

impl Drop for Subscribed<'_> {
    fn drop(&mut self) {
        self.0.subjects.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers other nodes' requests for this node's sessions.
async fn serve_requests(bridge: Rc<State>) {
    let subject = bridge.subjects.node(&bridge.node_id);
    let mut requests = match bridge.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(subject, error = %e, "NATS: cannot take requests for this node's sessions");
            return;
        }
    };
    while let Some(message) = requests.next().await {
        bridge.take_request(message);
    }
}

/// Hands the buffered publishes to the client, in order, while the bus is
/// up; while it is down they wait (bounded by `buffer`).
async fn send_to_bus(bridge: Rc<State>) {
    let mut last_stamp_us = 0;
    let mut last_subject: Option<(Bytes, async_nats::Subject)> = None;
    loop {
        let next = if bridge.bus.is_connected() {
            bridge.out.borrow_mut().pop_front()
        } else {
            None
        };
        let Some(Outgoing { message, at_us }) = next else {
            bridge.note_depth();
            bridge.sender_wake.notified().await;
            continue;
        };
        bridge.out_bytes.set(bridge.out_bytes.get() - buffered_size(&message));
        if !bridge.bus.carries(message.body.len()) {
            bridge.bus.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // Headers only where they say something (most messages go without,
        // which spares both ends a header map per message):
        let mut headers = HeaderMap::new();
        // text is what a receiver takes a UTF-8 payload for, and a text
        // message is UTF-8;
        if message.kind == MessageKind::Binary {
            headers.insert(subject::KIND, "binary");
        }
        // our node, only if we subscribe to the topic ourselves (else NATS
        // cannot echo it to us: a subscription made later is behind this
        // publish on our connection);
        if bridge.interest.borrow().contains_key(&message.key) {
            headers.insert(subject::NODE, bridge.node_header.as_str());
        }
        // the time, on one message a millisecond at most (the lag
        // histogram samples them);
        if at_us >= last_stamp_us + LAG_SAMPLE_US {
            last_stamp_us = at_us;
            headers.insert(subject::TIME, at_us.to_string().as_str());
        }
        // that it must not be compressed;
        if !message.compress {
            headers.insert(subject::COMPRESS, "no");
        }
        // and a STOMP publisher's own headers.
        if let Some(stomp) = &message.stomp_headers {
            use base64::Engine;
            headers.insert(
                subject::STOMP_HEADERS,
                base64::engine::general_purpose::STANDARD.encode(stomp).as_str(),
            );
        }
        // Runs of one topic are the common case: its subject is made once.
        let subject = match &last_subject {
            Some((key, subject)) if *key == message.key => subject.clone(),
            _ => {
                let subject = async_nats::Subject::from(bridge.subjects.of_key(&message.key));
                last_subject = Some((message.key.clone(), subject.clone()));
                subject
            }
        };
        let body = message.body.clone();
        let sent = if headers.is_empty() {
            bridge.client.publish(subject, body).await
        } else {
            bridge.client.publish_with_headers(subject, headers, body).await
        };
        match sent {
            Ok(()) => {
                bridge.bus.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                bridge.bus.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "NATS: a publish was refused");
            }
        }
    }
}

/// Follows the client's connection state (its events may be lost under
/// load, its state may not), every 50 ms: at each connect, reads the
/// server's `max_payload` (warning if messages sluice takes may not cross)
/// and says hello on the node's subject (another process with this node id
/// answers with an error in its log, and this one in its own); once the
/// node shuts down, leaves its queues to the other nodes.
async fn watch_connection(bridge: Rc<State>) {
    let mut was_connected = false;
    let mut left_queues = false;
    loop {
        let connected = bridge.client.connection_state() == async_nats::connection::State::Connected;
        bridge.bus.connected.store(connected, Ordering::Release);
        if connected && !was_connected {
            bridge.sender_wake.notify_one();
            let max_payload = bridge.client.server_info().max_payload;
            bridge.bus.max_payload.store(max_payload as u64, Ordering::Relaxed);
            if bridge.max_message_bytes > max_payload {
                tracing::warn!(
                    max_payload,
                    max_message_bytes = bridge.max_message_bytes,
                    "the NATS server takes messages of at most {max_payload} bytes: larger ones stay on this node (--max-message-bytes is {})",
                    bridge.max_message_bytes
                );
            }
            let mut hello = HeaderMap::new();
            hello.insert(subject::ACTION, "hello");
            hello.insert(subject::INSTANCE, bridge.instance.as_str());
            let _ = bridge
                .client
                .publish_with_headers(bridge.subjects.node(&bridge.node_id), hello, Bytes::new())
                .await;
        }
        was_connected = connected;
        if !left_queues && bridge.bus.closing.load(Ordering::Relaxed) {
            left_queues = true;
            // Dropping a subscription's task unsubscribes: NATS gives the
            // queues' messages to the other nodes from now on.
            let queues: Vec<Bytes> = bridge
                .interest
                .borrow()
                .keys()
                .filter(|k| is_queue(k))
                .cloned()
                .collect();
            for key in queues {
                if let Some(gone) = bridge.interest.borrow_mut().remove(&key) {
                    gone.task.abort();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Says, every 10 s while it lasts, that the bus is unreachable (first
/// after half a second: a node that starts before its bus says so).
async fn warn_while_unreachable(bridge: Rc<State>, why: Arc<std::sync::Mutex<String>>) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    loop {
        if !bridge.bus.is_connected() {
            // Why, server by server, as the client last found it.
            let why = why.lock().unwrap_or_else(|e| e.into_inner()).clone();
            tracing::warn!(
                dropped = Bus::get(&bridge.bus.dropped_buffer_full),
                "NATS unreachable: serving local clients only, retrying ({why})"
            );
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_name_a_core_of_ours() {
        assert_eq!(parse_session("1.17.3", 2), Some((1, (3 << 32) | 17)));
        for bad in ["2.17.3", "1.17.2", "1.17", "1.17.3.1", "x.1.1", ""] {
            assert_eq!(parse_session(bad, 2), None, "{bad}");
        }
    }

    #[test]
    fn reconnects_back_off_to_a_second() {
        assert_eq!(reconnect_delay(0), Duration::from_millis(25));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(100), Duration::from_secs(1));
    }
}
