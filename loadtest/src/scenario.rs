//! The scenarios: what each connection does and what it measures.
//!
//! Every scenario is bounded: connections stop at a deadline, every wait is
//! tied to it, and the run ends even if the server stops answering.
//! Client frames are encoded and masked once up front; only the bytes that
//! change per message (a timestamp, a sequence number) are masked per send.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::ws::frame::{encode_frame, MAX_HEADER_BYTES};
use sluice::ws::{mask, Event, Opcode};

use crate::client::{Client, Rng, Target};
use crate::run::{
    record_arrival_us, record_handshake_us, record_lag_us, record_latency_us, record_latency_us_n, Gate, Live,
    ThreadResult,
};

/// What every scenario shares.
pub struct Common {
    pub target: Target,
    pub threads: usize,
    pub sources: Vec<IpAddr>,
    pub connect_timeout: Duration,
    pub busy_poll: bool,
    /// One epoch for every thread, so timestamps compare across threads.
    pub epoch: Instant,
    /// `epoch` on the realtime clock (nanoseconds since 1970), which the
    /// kernel's receive stamps use.
    pub epoch_realtime_ns: u64,
    pub live: Arc<Live>,
    /// Payloads are JSON-like text (`json_like`).
    pub json: bool,
}

/// `len` bytes of JSON-like text: an array of records of ids, prices,
/// quantities and sides, the same for every call (as compressible as a
/// market-data feed: about 3x by deflate at 1 KiB).
pub fn json_like(len: usize) -> Vec<u8> {
    json_like_variant(len, 0)
}

/// `json_like` with other records: variant `n` of the same shape.
pub fn json_like_variant(len: usize, n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    out.extend_from_slice(b"{\"items\":[");
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let side = ["buy", "sell"][(x & 1) as usize];
        let record = format!(
            "{{\"id\":{},\"price\":{}.{:02},\"qty\":{},\"side\":\"{side}\"}},",
            (x >> 8) % 1_000_000,
            (x >> 28) % 1000,
            (x >> 40) % 100,
            (x >> 48) % 500
        );
        out.extend_from_slice(record.as_bytes());
    }
    out.truncate(len);
    out
}

/// The JSON-like payloads a connection sends in turn: enough different
/// ones that a message's twin is never within deflate's 32 KiB window, so
/// a compressor that keeps its window between messages (context takeover)
/// finds what real traffic gives it, the records' shape, not the message
/// whole.
pub fn json_variants(len: usize) -> Vec<Vec<u8>> {
    let count = (40 * 1024 / len.max(1) + 1).min(64);
    (0..count as u64).map(|n| json_like_variant(len, n)).collect()
}

/// A masked client frame of `payload` appended to `out`: compressed, RSV1
/// set (RFC 7692 6), when the run offers permessage-deflate.
fn push_message(out: &mut Vec<u8>, opcode: Opcode, key: [u8; 4], payload: &[u8], deflate: bool) {
    if !deflate {
        encode_frame(out, true, opcode, Some(key), payload);
        return;
    }
    let mut packed = Vec::with_capacity(payload.len() / 2 + 16);
    crate::client::compress(payload, &mut packed);
    let at = out.len();
    encode_frame(out, true, opcode, Some(key), &packed);
    out[at] |= 0x40;
}

/// Part `index` of `0..total` cut into `parts` near-equal ranges.
fn split(total: usize, parts: usize, index: usize) -> std::ops::Range<usize> {
    let per = total / parts;
    let extra = total % parts;
    let start = index * per + index.min(extra);
    start..start + per + usize::from(index < extra)
}

impl Common {
    /// Connections of thread `index` when `total` are spread over the threads.
    fn share(&self, index: usize, total: usize) -> std::ops::Range<usize> {
        split(total, self.threads, index)
    }

    /// Fan-out connections of thread `index`: with several threads the last
    /// one runs the publishers alone, so a subscriber loop that is busy
    /// never makes a publish late; the others share the subscribers.
    fn fanout_share(&self, index: usize, plan: &FanoutPlan) -> std::ops::Range<usize> {
        let all = plan.subscribers + plan.publishers;
        if self.threads == 1 || plan.publishers == 0 || plan.subscribers == 0 {
            return self.share(index, all);
        }
        if index == self.threads - 1 {
            return plan.subscribers..all;
        }
        split(plan.subscribers, self.threads - 1, index)
    }

    fn source(&self, conn: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[conn % self.sources.len()])
    }

    fn nanos_since_epoch(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Connects, then waits at the thread's gate for its other connections.
    async fn connect_at(&self, gate: &Gate, conn: usize, rng: &mut Rng, result: &mut ThreadResult) -> Option<Client> {
        self.connect_to_at(&self.target, gate, conn, rng, result).await
    }

    /// As `connect_at`, to `target` rather than the run's own.
    async fn connect_to_at(
        &self,
        target: &Target,
        gate: &Gate,
        conn: usize,
        rng: &mut Rng,
        result: &mut ThreadResult,
    ) -> Option<Client> {
        let client = self.connect_to(target, conn, rng, result).await;
        gate.arrive().await;
        client
    }

    async fn connect(&self, conn: usize, rng: &mut Rng, result: &mut ThreadResult) -> Option<Client> {
        self.connect_to(&self.target, conn, rng, result).await
    }

    async fn connect_to(
        &self,
        target: &Target,
        conn: usize,
        rng: &mut Rng,
        result: &mut ThreadResult,
    ) -> Option<Client> {
        match Client::connect(target, self.source(conn), self.connect_timeout, rng).await {
            Ok((client, took)) => {
                record_handshake_us(took.as_micros() as u64);
                result.established += 1;
                Live::add(&self.live.established, 1);
                Some(client)
            }
            Err(e) => {
                *result.failures.entry(e.failure).or_default() += 1;
                Live::add(&self.live.failed, 1);
                if result.first_errors.len() < 5 {
                    result.first_errors.push(format!("connect: {e}"));
                }
                None
            }
        }
    }
}

/// A masked client frame of `payload`, and the masking key used.
fn masked(opcode: Opcode, payload: &[u8], rng: &mut Rng) -> (Vec<u8>, [u8; 4]) {
    let key = (rng.next_u64() as u32).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + MAX_HEADER_BYTES);
    encode_frame(&mut out, true, opcode, Some(key), payload);
    (out, key)
}

/// Offset of the payload inside an encoded client frame of `len` bytes.
fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 6,
        126..=0xFFFF => 8,
        _ => 14,
    }
}

/// Waits for the socket or a deadline.
async fn wait_readable(client: &Client, until: Instant) {
    let left = until.saturating_duration_since(Instant::now());
    let _ = monoio::time::timeout(left, client.stream().readable(false)).await;
}

// ---- connect ----------------------------------------------------------------

pub struct ConnectPlan {
    pub connections: usize,
    /// Handshakes per second, over all threads.
    pub rate: f64,
    pub hold: Duration,
}

/// Opens connections at the planned rate, holds them (answering pings),
/// then closes each with 1000.
pub async fn connect(common: Arc<Common>, plan: Arc<ConnectPlan>, index: usize) -> ThreadResult {
    let share = common.share(index, plan.connections);
    let per_thread_rate = plan.rate / common.threads as f64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, conn) in share.enumerate() {
        let due = start + Duration::from_secs_f64(k as f64 / per_thread_rate);
        monoio::time::sleep_until(monoio::time::Instant::from_std(due)).await;
        let common = common.clone();
        let plan = plan.clone();
        tasks.push(monoio::spawn(async move {
            let mut result = ThreadResult::default();
            let mut rng = Rng::new(conn as u64);
            let Some(client) = common.connect(conn, &mut rng, &mut result).await else {
                return result;
            };
            // Everyone holds until the same moment: the end of the ramp plus the hold.
            let ramp = Duration::from_secs_f64(plan.connections as f64 / plan.rate);
            let until = common.epoch + ramp + plan.hold;
            hold(client, until, &mut rng, &common.live, &mut result).await;
            result
        }));
    }
    let mut total = ThreadResult::default();
    for t in tasks {
        total.merge(t.await);
    }
    total
}

async fn hold(mut client: Client, until: Instant, rng: &mut Rng, live: &Live, result: &mut ThreadResult) {
    let key = (rng.next_u64() as u32).to_le_bytes();
    while Instant::now() < until && !live.stop.load(Ordering::Relaxed) {
        wait_readable(&client, until).await;
        match client.try_recv() {
            Ok(Some(0)) => return result.error(live, "server closed the connection during the hold".into()),
            Ok(_) => {}
            Err(e) => return result.error(live, format!("read: {e}")),
        }
        if let Err(e) = client.drain_events(key, |_| {}) {
            result.error(live, format!("during the hold: {e}"));
            let _ = client.flush().await;
            return;
        }
        if client.flush().await.is_err() {
            return result.error(live, "write failed during the hold".into());
        }
    }
    if client.close(key, Duration::from_secs(2)).await {
        result.clean_closes += 1;
    }
}

// ---- churn ------------------------------------------------------------------

pub struct ChurnPlan {
    /// Clients cycling at once.
    pub concurrency: usize,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Connection churn: each client connects, sends one message, waits for its
/// echo, closes (1000, waiting for the server's close) and starts over,
/// until the window ends. A cycle counts when it ends inside the window; its
/// time, connect to close, is the latency recorded, so the cycles per second
/// are the handshakes per second the server completed with a message each.
pub async fn churn(common: Arc<Common>, plan: Arc<ChurnPlan>, index: usize) -> ThreadResult {
    let tasks: Vec<_> = common
        .share(index, plan.concurrency)
        .map(|slot| monoio::spawn(churn_client(common.clone(), plan.clone(), slot)))
        .collect();
    let mut total = ThreadResult::default();
    for t in tasks {
        total.merge(t.await);
    }
    total
}

/// Longest a cycle's echo or close may take before it counts as an error.
const CHURN_STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed connect, so refusals do not spin.
const CHURN_RETRY: Duration = Duration::from_millis(10);

async fn churn_client(common: Arc<Common>, plan: Arc<ChurnPlan>, slot: usize) -> ThreadResult {
    let mut result = ThreadResult::default();
    let mut rng = Rng::new(slot as u64);
    let measure_from = common.epoch + plan.warmup;
    let until = measure_from + plan.duration;
    let live = common.live.clone();
    let payload = vec![0x5a; plan.size];
    for cycle in 0.. {
        let start = Instant::now();
        if start >= until || live.stop.load(Ordering::Relaxed) {
            break;
        }
        // Each cycle takes the next source address, so ports last.
        let Some(mut client) = common
            .connect(slot + cycle * plan.concurrency, &mut rng, &mut result)
            .await
        else {
            monoio::time::sleep(CHURN_RETRY).await;
            continue;
        };
        let (frame, key) = masked(Opcode::Binary, &payload, &mut rng);
        client.queue(&frame);
        let echoed = monoio::time::timeout(CHURN_STEP_TIMEOUT, async {
            client.flush().await.map_err(|e| format!("write: {e}"))?;
            loop {
                match client.recv().await {
                    Ok(0) => return Err("server closed the connection before the echo".to_string()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
                let mut got = false;
                client.drain_events(key, |e| got |= matches!(e, Event::Message { .. }))?;
                if got {
                    return Ok(());
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no echo within {CHURN_STEP_TIMEOUT:?}")));
        if let Err(e) = echoed {
            result.error(&live, e);
            continue;
        }
        if !client.close(key, CHURN_STEP_TIMEOUT).await {
            result.error(&live, "the server did not answer the close".into());
            continue;
        }
        result.clean_closes += 1;
        let end = Instant::now();
        if start >= measure_from && end <= until {
            result.sent += 1;
            result.received += 1;
            Live::add(&live.received, 1);
            record_latency_us(end.duration_since(start).as_micros() as u64);
        }
    }
    result
}

// ---- echo -------------------------------------------------------------------

pub struct EchoPlan {
    pub connections: usize,
    pub in_flight: usize,
    pub size: usize,
    /// Each message goes out with its own `send`, as a population of
    /// independent clients writes, rather than every message a connection
    /// owes in one.
    pub write_each: bool,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Closed loop: each connection keeps `in_flight` messages outstanding and
/// sends one more for each echo. Round trips come from a per-connection
/// queue of send times (echoes come back in order).
pub async fn echo(common: Arc<Common>, plan: Arc<EchoPlan>, index: usize) -> ThreadResult {
    let (mut echoers, mut total) = join_all(common.share(index, plan.connections), |conn, gate| {
        let (common, plan) = (common.clone(), plan.clone());
        async move {
            let mut result = ThreadResult::default();
            let mut rng = Rng::new(conn as u64);
            let client = common.connect_at(&gate, conn, &mut rng, &mut result).await;
            (client.map(|c| Echoer::new(&common, &plan, c, &mut rng)), result)
        }
    })
    .await;
    if let Err(e) = drive_echo(&common, &plan, &mut echoers, &mut total) {
        total.error(&common.live, format!("event loop: {e}"));
    }
    if total.sent > 0 && total.received == 0 {
        total.error(&common.live, "the server echoed nothing back".into());
    }
    end_all(echoers, |e| close_cleanly(e.client, e.key), &mut total).await;
    total
}

/// Connects this thread's share of `count` connections, one task each
/// (`join` connects one, through the thread's start line `gate`, and makes
/// what the scenario's loop drives of it), and collects them.
async fn join_all<T, F, Fut>(share: std::ops::Range<usize>, join: F) -> (Vec<T>, ThreadResult)
where
    T: 'static,
    F: Fn(usize, std::rc::Rc<Gate>) -> Fut,
    Fut: std::future::Future<Output = (Option<T>, ThreadResult)> + 'static,
{
    let gate = Gate::new(share.len());
    let tasks: Vec<_> = share.map(|conn| monoio::spawn(join(conn, gate.clone()))).collect();
    let mut total = ThreadResult::default();
    let mut joined = Vec::new();
    for t in tasks {
        let (member, result) = t.await;
        total.merge(result);
        joined.extend(member);
    }
    (joined, total)
}

/// Ends every connection of the thread at once, each with `end`.
async fn end_all<T, F, Fut>(members: Vec<T>, end: F, total: &mut ThreadResult)
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ThreadResult> + 'static,
{
    let tasks: Vec<_> = members.into_iter().map(|m| monoio::spawn(end(m))).collect();
    for t in tasks {
        total.merge(t.await);
    }
}

/// A clean close (1000), counted.
async fn close_cleanly(client: Client, key: [u8; 4]) -> ThreadResult {
    let mut result = ThreadResult::default();
    if client.close(key, Duration::from_secs(2)).await {
        result.clean_closes += 1;
    }
    result
}

/// One echo connection: its pre-masked frames and its messages in flight.
struct Echoer {
    client: Client,
    key: [u8; 4],
    /// The frames it sends, in turn (one, or `json_variants`' payloads).
    frames: Vec<Vec<u8>>,
    next_frame: usize,
    /// Send times by batch: every message of a batch left at the same
    /// instant, so round trips are recorded per batch, not per message.
    sent_at: VecDeque<(Instant, usize)>,
    /// Messages to send: the replies just taken.
    owed: usize,
    write_each: bool,
    done: bool,
}

impl Echoer {
    fn new(common: &Common, plan: &EchoPlan, client: Client, rng: &mut Rng) -> Echoer {
        let (payloads, opcode) = match common.json {
            true => (json_variants(plan.size), Opcode::Text),
            false => (vec![vec![0x5a; plan.size]], Opcode::Binary),
        };
        let key = (rng.next_u64() as u32).to_le_bytes();
        let frames = payloads
            .iter()
            .map(|payload| {
                let mut frame = Vec::with_capacity(plan.size + MAX_HEADER_BYTES);
                push_message(&mut frame, opcode, key, payload, common.target.deflate);
                frame
            })
            .collect();
        Echoer {
            client,
            key,
            frames,
            next_frame: 0,
            sent_at: VecDeque::with_capacity(plan.in_flight),
            owed: plan.in_flight,
            write_each: plan.write_each,
            done: false,
        }
    }

    /// Queues and sends the owed messages; keeps what the socket did not take.
    fn send_owed(
        &mut self,
        now: Instant,
        measure_from: Instant,
        live: &Live,
        result: &mut ThreadResult,
    ) -> io::Result<()> {
        // One frame per write (`write_each`), else all in one; what the
        // socket refuses waits in the outbox and goes with the next write.
        for _ in 0..self.owed {
            self.client.queue(&self.frames[self.next_frame]);
            self.next_frame = (self.next_frame + 1) % self.frames.len();
            if self.write_each {
                self.client.try_send()?;
            }
        }
        if self.owed > 0 {
            self.sent_at.push_back((now, self.owed));
            if now >= measure_from {
                result.sent += self.owed as u64;
                Live::add(&live.sent, self.owed as u64);
            }
            self.owed = 0;
        }
        self.client.try_send()
    }

    /// Reads the echoes that are there and records their round trips.
    fn take_echoes(
        &mut self,
        plan: &EchoPlan,
        measure_from: Instant,
        live: &Live,
        result: &mut ThreadResult,
    ) -> Result<(), String> {
        match self.client.try_recv() {
            Ok(Some(0)) => return Err("server closed the connection mid-run".into()),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("read: {e}")),
        }
        let now = Instant::now();
        let mut replies = 0;
        self.client
            .drain_events(self.key, |e| replies += usize::from(matches!(e, Event::Message { .. })))?;
        let mut left = replies;
        while left > 0 {
            let Some((sent, count)) = self.sent_at.front_mut() else {
                return Err("more echoes than messages sent".into());
            };
            let n = left.min(*count);
            if *sent >= measure_from {
                record_latency_us_n(now.duration_since(*sent).as_micros() as u64, n as u64);
                result.received += n as u64;
                result.bytes_received += (n * plan.size) as u64;
                Live::add(&live.received, n as u64);
            }
            *count -= n;
            left -= n;
            if *count == 0 {
                self.sent_at.pop_front();
            }
        }
        self.owed += replies;
        Ok(())
    }
}

/// The closed loop of every echo connection of the thread: each connection
/// sends as many messages as it got back, as soon as it got them. One wait
/// covers all connections; sends and reads are direct non-blocking calls.
fn drive_echo(
    common: &Common,
    plan: &EchoPlan,
    echoers: &mut Vec<Echoer>,
    result: &mut ThreadResult,
) -> io::Result<()> {
    let measure_from = common.epoch + plan.warmup;
    let until = measure_from + plan.duration;
    let live = &common.live;
    let fds: Vec<RawFd> = echoers.iter().map(|e| e.client.stream().as_raw_fd()).collect();
    let mut set = ReadySet::new(&fds)?;
    let mut ready = Vec::new();
    let now = Instant::now();
    for (i, e) in echoers.iter_mut().enumerate() {
        if let Err(err) = e.send_owed(now, measure_from, live, result) {
            e.done = true;
            set.remove(fds[i]);
            result.error(live, format!("write: {err}"));
        }
    }
    let mut blocked = echoers.iter().any(|e| e.client.has_queued());
    loop {
        let now = Instant::now();
        if now >= until || live.stop.load(Ordering::Relaxed) || echoers.iter().all(|e| e.done) {
            break;
        }
        let mut wait = (until - now).min(STOP_CHECK);
        if blocked {
            wait = wait.min(FULL_SOCKET_RETRY);
        }
        set.wait(wait, &mut ready)?;
        for &i in &ready {
            let e = &mut echoers[i];
            if e.done {
                continue;
            }
            if let Err(err) = e.take_echoes(plan, measure_from, live, result) {
                e.done = true;
                set.remove(fds[i]);
                result.error(live, err);
            }
        }
        let now = Instant::now();
        blocked = false;
        for (i, e) in echoers.iter_mut().enumerate() {
            if e.done || (e.owed == 0 && !e.client.has_queued()) {
                continue;
            }
            if let Err(err) = e.send_owed(now, measure_from, live, result) {
                e.done = true;
                set.remove(fds[i]);
                result.error(live, format!("write: {err}"));
            }
            blocked |= e.client.has_queued();
        }
    }
    echoers.retain(|e| !e.done);
    Ok(())
}

/// Longest single wait, so a stop request (Ctrl-C, too many errors) is seen.
const STOP_CHECK: Duration = Duration::from_millis(50);

// ---- latency ----------------------------------------------------------------

pub struct LatencyPlan {
    pub connections: usize,
    /// Messages per second over all connections.
    pub rate: f64,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Open loop: messages go out on a fixed schedule whatever the replies do,
/// each carrying its INTENDED send time, and latency is measured from that
/// time, so a stalled server is charged for every message it delayed
/// (coordinated-omission correction).
///
/// Once connected, one loop per thread drives all of the thread's
/// connections with non-blocking calls: it sends whatever is due, then waits
/// in one epoll set for replies or the next send time, with nanosecond
/// timeouts (`epoll_pwait2`), so a send is late only by the wake-up itself.
/// With `--busy-poll` the wait never blocks: the loop spins, and neither side
/// of a message pays for waking the harness.
pub async fn latency(common: Arc<Common>, plan: Arc<LatencyPlan>, index: usize) -> ThreadResult {
    let (mut senders, mut total) = join_all(common.share(index, plan.connections), |conn, gate| {
        let (common, plan) = (common.clone(), plan.clone());
        async move {
            let mut result = ThreadResult::default();
            let mut rng = Rng::new(conn as u64);
            let client = common.connect_at(&gate, conn, &mut rng, &mut result).await;
            (client.map(|c| Sender::new(&common, &plan, conn, c, &mut rng)), result)
        }
    })
    .await;
    if let Err(e) = drive(&common, &plan, &mut senders, &mut total) {
        total.error(&common.live, format!("event loop: {e}"));
    }
    let end = |s: Sender| {
        let (common, plan) = (common.clone(), plan.clone());
        async move {
            let mut result = ThreadResult::default();
            s.finish(&common, &plan, &mut result).await;
            result
        }
    };
    end_all(senders, end, &mut total).await;
    total
}

/// Drives every sender of the thread until the window ends: sends what is
/// due, then waits (or, busy-polling, only looks) for replies until the next
/// send time. A connection that fails is reported and leaves the loop.
fn drive(common: &Common, plan: &LatencyPlan, senders: &mut Vec<Sender>, result: &mut ThreadResult) -> io::Result<()> {
    let until = common.epoch + plan.warmup + plan.duration;
    let live = &common.live;
    let fds: Vec<RawFd> = senders.iter().map(|s| s.client.stream().as_raw_fd()).collect();
    let mut set = ReadySet::new(&fds)?;
    let mut ready = Vec::new();
    loop {
        let now = Instant::now();
        if now >= until || live.stop.load(Ordering::Relaxed) || senders.iter().all(|s| s.done) {
            break;
        }
        let mut next_due = until;
        let mut blocked = false;
        for (i, s) in senders.iter_mut().enumerate() {
            if s.done {
                continue;
            }
            if s.next <= now {
                s.queue_due(now, common, plan, result);
            }
            if let Err(e) = s.client.try_send() {
                s.done = true;
                set.remove(fds[i]);
                result.error(live, format!("write: {e}"));
                continue;
            }
            blocked |= s.client.has_queued();
            next_due = next_due.min(s.next);
        }
        // A full socket is retried soon rather than waited on for
        // writability: it is rare at the rates this scenario runs at.
        let mut wait = next_due.saturating_duration_since(Instant::now()).min(STOP_CHECK);
        if common.busy_poll {
            wait = Duration::ZERO;
        } else if blocked {
            wait = wait.min(FULL_SOCKET_RETRY);
        }
        set.wait(wait, &mut ready)?;
        for &i in &ready {
            let s = &mut senders[i];
            if s.done {
                continue;
            }
            let outcome = match s.client.try_recv() {
                Ok(Some(0)) => Err("server closed the connection mid-run".to_string()),
                Ok(Some(_)) => s.take_latencies(common, plan, result),
                Ok(None) => Ok(()),
                Err(e) => Err(format!("read: {e}")),
            };
            if let Err(e) = outcome {
                s.done = true;
                set.remove(fds[i]);
                result.error(live, e);
            }
        }
    }
    senders.retain(|s| !s.done);
    Ok(())
}

/// How soon a connection whose socket was full is tried again.
const FULL_SOCKET_RETRY: Duration = Duration::from_micros(200);

/// One thread's sockets in one epoll set, waited on with a nanosecond
/// timeout (`epoll_pwait2`; monoio's timers and mio round to milliseconds).
/// Level-triggered: a socket with unread replies is reported until read.
struct ReadySet {
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl ReadySet {
    fn new(fds: &[RawFd]) -> io::Result<ReadySet> {
        // SAFETY: plain syscall; the result is checked before use.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epfd` is a fresh fd that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
        for (i, &fd) in fds.iter().enumerate() {
            let mut event = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                u64: i as u64,
            };
            // SAFETY: `event` is a valid epoll_event for the call's duration.
            if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(ReadySet {
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; fds.len().max(1)],
        })
    }

    fn remove(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL; an error only
        // means the fd was not in the set.
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Waits up to `timeout` and puts the indices of ready sockets in `ready`.
    fn wait(&mut self, timeout: Duration, ready: &mut Vec<usize>) -> io::Result<()> {
        ready.clear();
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `events` has room for `len` entries and `ts` outlives the call.
        let n = unsafe {
            libc::epoll_pwait2(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                &ts,
                std::ptr::null(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        ready.extend(self.events[..n as usize].iter().map(|e| e.u64 as usize));
        Ok(())
    }
}

/// One latency connection: its schedule, its pre-masked frame, and the
/// messages it has in flight.
struct Sender {
    client: Client,
    frame: Vec<u8>,
    /// With `--deflate`: the payload, compressed afresh for each message.
    plain: Option<Vec<u8>>,
    key: [u8; 4],
    /// Where the 8-byte send time sits in `frame`.
    stamp_at: usize,
    interval: Duration,
    next: Instant,
    outstanding: u64,
    /// Failed: out of the loop, already reported.
    done: bool,
}

impl Sender {
    fn new(common: &Common, plan: &LatencyPlan, conn: usize, client: Client, rng: &mut Rng) -> Sender {
        let size = plan.size.max(8);
        let mut plain = if common.json { json_like(size) } else { vec![0u8; size] };
        plain[..8].fill(0);
        let (frame, key) = masked(Opcode::Binary, &plain, rng);
        let interval = Duration::from_secs_f64(plan.connections as f64 / plan.rate);
        // Spread the connections' schedules evenly over one interval.
        let next = Instant::now().max(common.epoch) + interval.mul_f64(conn as f64 / plan.connections as f64);
        Sender {
            client,
            frame,
            plain: common.target.deflate.then_some(plain),
            key,
            stamp_at: header_len(size),
            interval,
            next,
            outstanding: 0,
            done: false,
        }
    }

    /// Queues every message due by now, stamped with its intended time.
    fn queue_due(&mut self, now: Instant, common: &Common, plan: &LatencyPlan, result: &mut ThreadResult) -> u64 {
        let measure_from = common.epoch + plan.warmup;
        let until = measure_from + plan.duration;
        let mut due = 0;
        while self.next <= now && self.next < until {
            if self.next >= measure_from {
                result.sent += 1;
                Live::add(&common.live.sent, 1);
            }
            let out = self.client.outbox();
            let stamp = (self.next.duration_since(common.epoch).as_nanos() as u64).to_le_bytes();
            if let Some(plain) = &mut self.plain {
                // Compressed: each message afresh, its stamp inside.
                plain[..8].copy_from_slice(&stamp);
                push_message(out, Opcode::Binary, self.key, plain, true);
            } else {
                let at = out.len();
                out.extend_from_slice(&self.frame);
                let mut stamp = stamp;
                mask::apply(&mut stamp, self.key, 0);
                out[at + self.stamp_at..at + self.stamp_at + 8].copy_from_slice(&stamp);
            }
            self.next += self.interval;
            due += 1;
        }
        self.outstanding += due;
        due
    }

    /// Collects the replies still in flight (briefly), then closes with 1000.
    async fn finish(mut self, common: &Common, plan: &LatencyPlan, result: &mut ThreadResult) {
        let drain_until = Instant::now() + Duration::from_secs(2);
        while self.outstanding > 0 && Instant::now() < drain_until {
            let left = drain_until.saturating_duration_since(Instant::now());
            let _ = monoio::time::timeout(left, self.client.stream().readable(false)).await;
            if !matches!(self.client.try_recv(), Ok(Some(n)) if n > 0) {
                break;
            }
            if self.take_latencies(common, plan, result).is_err() {
                break;
            }
        }
        if self.client.close(self.key, Duration::from_secs(2)).await {
            result.clean_closes += 1;
        }
    }

    /// Records the latency of every echo read so far, measured from the
    /// intended send time it carries; counts those sent inside the window.
    fn take_latencies(&mut self, common: &Common, plan: &LatencyPlan, result: &mut ThreadResult) -> Result<(), String> {
        let now_ns = common.nanos_since_epoch();
        let measure_ns = plan.warmup.as_nanos() as u64;
        let mut replies = 0u64;
        let mut measured = 0u64;
        let drained = self.client.drain_events(self.key, |e| {
            let Event::Message { payload, .. } = e else { return };
            replies += 1;
            let Some(stamp) = payload.get(..8) else { return };
            let intended = u64::from_le_bytes(stamp.try_into().expect("8 bytes"));
            if intended >= measure_ns {
                measured += 1;
                record_latency_us(now_ns.saturating_sub(intended) / 1000);
            }
        });
        self.outstanding = self.outstanding.saturating_sub(replies);
        result.received += measured;
        Live::add(&common.live.received, measured);
        drained
    }
}

// ---- fanout -----------------------------------------------------------------

pub struct FanoutPlan {
    pub subscribers: usize,
    pub topics: usize,
    pub publishers: usize,
    /// Publishes per second over all publishers.
    pub rate: f64,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub speech: Speech,
    pub topic_prefix: String,
    /// Time for subscriptions to settle before publishing starts.
    pub settle: Duration,
    /// Where publishers connect, if not to the run's target (another node
    /// of a cluster, another listener or route).
    pub publish_target: Option<Target>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FanoutProtocol {
    Native,
    Stomp,
}

/// What fan-out clients send, as templates where `{topic}` is replaced by
/// the topic name and `{conn}` by the connection's number.
#[derive(Debug, Clone, Default)]
pub struct Speech {
    /// The first message of every client, if the protocol has one.
    pub hello: Option<String>,
    pub subscribe: String,
    /// Text before and after a publish's payload.
    pub publish_prefix: String,
    pub publish_suffix: String,
}

impl FanoutProtocol {
    /// The messages of this protocol; the native ones are the caller's.
    pub fn speech(self, sub_msg: &str, pub_prefix: &str, distinct_ids: bool) -> Speech {
        match self {
            FanoutProtocol::Native => Speech {
                hello: None,
                subscribe: sub_msg.into(),
                publish_prefix: pub_prefix.into(),
                publish_suffix: String::new(),
            },
            FanoutProtocol::Stomp => Speech {
                hello: Some("CONNECT\naccept-version:1.2\nhost:sluice-load\nheart-beat:0,0\n\n\0".into()),
                subscribe: format!(
                    "SUBSCRIBE\nid:{}\ndestination:/topic/{{topic}}\n\n\0",
                    if distinct_ids { "sub-{conn}" } else { "sub-0" }
                ),
                publish_prefix: "SEND\ndestination:/topic/{topic}\n\n".into(),
                publish_suffix: "\0".into(),
            },
        }
    }
}

impl FanoutPlan {
    fn topic(&self, n: usize) -> String {
        format!("{}{n}", self.topic_prefix)
    }

    /// Subscribers of topic `t`: subscriber `c` takes topic `c % topics`.
    pub fn subscribers_of(&self, t: usize) -> u64 {
        (self.subscribers / self.topics + usize::from(t < self.subscribers % self.topics)) as u64
    }

    /// Deliveries the server owes for these publishes.
    pub fn expected_deliveries(&self, published: &std::collections::BTreeMap<usize, u64>) -> u64 {
        published.iter().map(|(t, n)| n * self.subscribers_of(*t)).sum()
    }
}

/// Marker that starts the harness's fields inside a published payload:
/// `#<publisher>:<seq>:<sent_ns>#`, padded with `.` to the payload size.
const MARK: &[u8] = b"#L";

fn parse_stamp(message: &[u8]) -> Option<(u32, u64, u64)> {
    // No UTF-8 pass, and a vectorised search for the mark (a STOMP MESSAGE
    // puts a hundred bytes of headers before it): this runs for every
    // delivery, and at millions per second it is most of the harness's own
    // work.
    let at = memchr::memmem::find(message, MARK)?;
    let mut rest = &message[at + MARK.len()..];
    let publisher = take_number(&mut rest, b':')?;
    let seq = take_number(&mut rest, b':')?;
    let sent_ns = take_number(&mut rest, b'#')?;
    Some((u32::try_from(publisher).ok()?, seq, sent_ns))
}

/// A decimal number at the front of `rest`, up to `end` (consumed).
fn take_number(rest: &mut &[u8], end: u8) -> Option<u64> {
    let mut n = 0u64;
    for (i, &b) in rest.iter().enumerate() {
        if b == end && i > 0 {
            *rest = &rest[i + 1..];
            return Some(n);
        }
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    None
}

/// Makes the calling thread (the publishers' own) real-time, so that when
/// it shares a core with subscriber threads that keep it busy, a publish
/// leaves when due instead of after their time slice (several ms). It
/// sleeps between publishes, so it cannot starve them. Without the right
/// (CAP_SYS_NICE), it says so and runs as before.
fn publish_on_time() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sets the calling thread's policy from a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        eprintln!(
            "sluice-load: publishers run at normal priority ({}); publishes may leave late when subscribers keep the core busy",
            io::Error::last_os_error()
        );
    }
}

/// Subscribers and publishers share connection numbers: 0..subscribers are
/// subscribers, the rest publishers. Publisher `p` publishes its messages to
/// topics round robin; every subscriber of a topic should see every message
/// published to it, in each publisher's order.
pub async fn fanout(common: Arc<Common>, plan: Arc<FanoutPlan>, index: usize) -> ThreadResult {
    let share = common.fanout_share(index, &plan);
    if share.start >= plan.subscribers && common.threads > 1 && !common.busy_poll {
        publish_on_time();
    }
    let (mut members, mut total) = join_all(share, |conn, gate| {
        let (common, plan) = (common.clone(), plan.clone());
        async move {
            let mut result = ThreadResult::default();
            let member = if conn < plan.subscribers {
                subscribe(&common, &plan, conn, &gate, &mut result).await
            } else {
                join_as_publisher(&common, &plan, conn, &gate, &mut result).await
            };
            (member, result)
        }
    })
    .await;
    if let Err(e) = drive_fanout(&common, &plan, &mut members, &mut total) {
        total.error(&common.live, format!("event loop: {e}"));
    }
    end_all(members, |m| close_cleanly(m.client, m.key), &mut total).await;
    total
}

/// A fan-out connection, once connected.
struct Member {
    client: Client,
    key: [u8; 4],
    role: Role,
}

enum Role {
    /// Only reads; keeps the highest sequence number seen per publisher.
    Subscriber { last_seq: HashMap<u32, u64> },
    /// Sends on its schedule.
    Publisher {
        publisher: usize,
        prefixes: Vec<String>,
        seq: u64,
        next: Instant,
    },
}

async fn subscribe(
    common: &Common,
    plan: &FanoutPlan,
    conn: usize,
    gate: &Gate,
    result: &mut ThreadResult,
) -> Option<Member> {
    let mut rng = Rng::new(conn as u64);
    let mut client = common.connect_at(gate, conn, &mut rng, result).await?;
    let topic = plan.topic(conn % plan.topics);
    if let Some(hello) = &plan.speech.hello {
        client.queue(&masked(Opcode::Text, hello.as_bytes(), &mut rng).0);
    }
    let (sub, key) = masked(
        Opcode::Text,
        plan.speech
            .subscribe
            .replace("{topic}", &topic)
            .replace("{conn}", &conn.to_string())
            .as_bytes(),
        &mut rng,
    );
    client.queue(&sub);
    if let Err(e) = client.flush().await {
        result.error(&common.live, format!("subscribe: {e}"));
        return None;
    }
    if let Err(e) = client.enable_arrival_stamps() {
        result.error(&common.live, format!("SO_TIMESTAMPNS: {e}"));
    }
    Some(Member {
        client,
        key,
        role: Role::Subscriber {
            last_seq: HashMap::new(),
        },
    })
}

async fn join_as_publisher(
    common: &Common,
    plan: &FanoutPlan,
    conn: usize,
    gate: &Gate,
    result: &mut ThreadResult,
) -> Option<Member> {
    let mut rng = Rng::new(conn as u64);
    let target = plan.publish_target.as_ref().unwrap_or(&common.target);
    let mut client = common.connect_to_at(target, gate, conn, &mut rng, result).await?;
    if let Some(hello) = &plan.speech.hello {
        // Sent ahead of its first publish.
        client.queue(&masked(Opcode::Text, hello.as_bytes(), &mut rng).0);
    }
    let publisher = conn - plan.subscribers;
    let interval = Duration::from_secs_f64(plan.publishers as f64 / plan.rate);
    Some(Member {
        client,
        key: (rng.next_u64() as u32).to_le_bytes(),
        role: Role::Publisher {
            publisher,
            prefixes: (0..plan.topics)
                .map(|t| plan.speech.publish_prefix.replace("{topic}", &plan.topic(t)))
                .collect(),
            seq: 0,
            next: common.epoch + plan.settle + interval.mul_f64(publisher as f64 / plan.publishers as f64),
        },
    })
}

/// The thread's fan-out loop: publishers send what their schedule says is
/// due (stamped with the intended time), subscribers take deliveries as
/// they come (one epoll wait for all), until the window and a grace
/// period for late deliveries are over.
fn drive_fanout(
    common: &Common,
    plan: &FanoutPlan,
    members: &mut Vec<Member>,
    result: &mut ThreadResult,
) -> io::Result<()> {
    let live = &common.live;
    let publish_from = common.epoch + plan.settle;
    let publish_until = publish_from + plan.warmup + plan.duration;
    let until = publish_until + Duration::from_secs(2);
    let measure_ns = (plan.settle + plan.warmup).as_nanos() as u64;
    let interval = Duration::from_secs_f64(plan.publishers as f64 / plan.rate);
    let fds: Vec<RawFd> = members.iter().map(|m| m.client.stream().as_raw_fd()).collect();
    let mut set = ReadySet::new(&fds)?;
    let mut ready = Vec::new();
    let mut failed = vec![false; members.len()];
    let mut payload = Vec::with_capacity(plan.size + 64);
    let fillers = if common.json {
        json_variants(plan.size)
    } else {
        vec![vec![b'.'; plan.size]]
    };
    loop {
        let now = Instant::now();
        if now >= until || live.stop.load(Ordering::Relaxed) {
            break;
        }
        let mut next_due = until;
        for (i, m) in members.iter_mut().enumerate() {
            let Member { client, key, role } = m;
            let Role::Publisher {
                publisher,
                prefixes,
                seq,
                next,
            } = role
            else {
                continue;
            };
            if failed[i] {
                continue;
            }
            while *next <= now && *next < publish_until {
                *seq += 1;
                let topic = (*seq as usize) % plan.topics;
                let prefix = &prefixes[topic];
                payload.clear();
                payload.extend_from_slice(prefix.as_bytes());
                let sent_ns = next.duration_since(common.epoch).as_nanos();
                payload.extend_from_slice(format!("#L{publisher}:{seq}:{sent_ns}#").as_bytes());
                let short = (prefix.len() + plan.size).saturating_sub(payload.len());
                let filler = &fillers[*seq as usize % fillers.len()];
                payload.extend_from_slice(&filler[..short]);
                payload.extend_from_slice(plan.speech.publish_suffix.as_bytes());
                push_message(client.outbox(), Opcode::Text, *key, &payload, common.target.deflate);
                if sent_ns as u64 >= measure_ns {
                    record_lag_us(now.duration_since(*next).as_micros() as u64);
                }
                // Every publish counts as sent: a loss is a publish no one saw.
                result.sent += 1;
                *result.published.entry(topic).or_default() += 1;
                Live::add(&live.sent, 1);
                *next += interval;
            }
            if let Err(e) = client.try_send() {
                failed[i] = true;
                set.remove(fds[i]);
                result.error(live, format!("publish: {e}"));
                continue;
            }
            if *next < publish_until {
                next_due = next_due.min(*next);
            }
            if client.has_queued() {
                next_due = next_due.min(now + FULL_SOCKET_RETRY);
            }
        }
        let wait = next_due.saturating_duration_since(Instant::now()).min(STOP_CHECK);
        set.wait(if common.busy_poll { Duration::ZERO } else { wait }, &mut ready)?;
        for &i in &ready {
            if failed[i] {
                continue;
            }
            let window = measure_ns..measure_ns + plan.duration.as_nanos() as u64;
            let outcome = take_deliveries(&mut members[i], common, window, result);
            if let Err(e) = outcome {
                failed[i] = true;
                set.remove(fds[i]);
                result.error(live, e);
            }
        }
    }
    let mut i = 0;
    members.retain(|_| {
        i += 1;
        !failed[i - 1]
    });
    Ok(())
}

/// Reads what a member's socket has: deliveries for a subscriber (counted,
/// sequence-checked, their latency recorded), pings for either.
fn take_deliveries(
    member: &mut Member,
    common: &Common,
    window: std::ops::Range<u64>,
    result: &mut ThreadResult,
) -> Result<(), String> {
    let measure_ns = window.start;
    let live = &common.live;
    let Member { client, key, role } = member;
    let arrived_ns = match client.try_recv_stamped() {
        Ok((Some(0), _)) => return Err("server closed a connection mid-run".into()),
        Ok((Some(_), stamp)) => stamp.map(|s| s.saturating_sub(common.epoch_realtime_ns)),
        Ok((None, _)) => return Ok(()),
        Err(e) => return Err(format!("read: {e}")),
    };
    // Read now: what this read returned was all in by this time.
    let now_ns = common.nanos_since_epoch();
    let mut received = 0;
    let out_of_order = &mut result.out_of_order;
    let mut last_seq = match role {
        Role::Subscriber { last_seq } => Some(last_seq),
        Role::Publisher { .. } => None,
    };
    client.drain_events(*key, |e| {
        let Some(last_seq) = last_seq.as_deref_mut() else {
            return;
        };
        let Event::Message { payload, .. } = e else { return };
        let Some((publisher, seq, sent_ns)) = parse_stamp(payload) else {
            return;
        };
        received += 1;
        let last = last_seq.entry(publisher).or_insert(0);
        if seq <= *last {
            *out_of_order += 1;
        }
        *last = (*last).max(seq);
        if sent_ns >= measure_ns {
            record_latency_us(now_ns.saturating_sub(sent_ns) / 1000);
            if let Some(arrived) = arrived_ns {
                record_arrival_us(arrived.saturating_sub(sent_ns) / 1000);
            }
        }
    })?;
    result.received += received;
    if window.contains(&now_ns) {
        result.arrived_in_window += received;
    }
    Live::add(&live.received, received);
    // Pongs (and a close reply) queued by `drain_events`.
    client.try_send().map_err(|e| format!("write: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_inside_any_wrapping() {
        let msg = b"MSG t3 #L7:42:123456789#......";
        assert_eq!(parse_stamp(msg), Some((7, 42, 123456789)));
        let stomp = b"MESSAGE\ndestination:/topic/t3\n\n#L1:2:3#..\0";
        assert_eq!(parse_stamp(stomp), Some((1, 2, 3)));
        assert_eq!(parse_stamp(b"no stamp"), None);
        // A '#' before the mark, and broken stamps.
        assert_eq!(parse_stamp(b"MSG a#b #L1:2:3#"), Some((1, 2, 3)));
        assert_eq!(parse_stamp(b"#L1:2:3"), None);
        assert_eq!(parse_stamp(b"#L1::3#"), None);
        assert_eq!(parse_stamp(b"#L1:x:3#"), None);
        assert_eq!(parse_stamp(b"#L99999999999:2:3#"), None, "publisher is a u32");
        assert_eq!(parse_stamp(b"#L1:2:99999999999999999999999#"), None, "overflow");
    }

    fn plan(subscribers: usize, topics: usize, publishers: usize) -> FanoutPlan {
        FanoutPlan {
            subscribers,
            topics,
            publishers,
            rate: 1.0,
            size: 0,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            speech: Speech::default(),
            topic_prefix: String::new(),
            settle: Duration::ZERO,
            publish_target: None,
        }
    }

    #[test]
    fn json_like_payloads_are_the_size_asked_and_compress_like_json() {
        for len in [0, 1, 100, 1024, 4096] {
            assert_eq!(json_like(len).len(), len);
        }
        let text = json_like(1024);
        assert!(text.starts_with(b"{\"items\":[{\"id\":"));
        let mut out = Vec::new();
        push_message(&mut out, Opcode::Text, [1, 2, 3, 4], &text, true);
        // RSV1 set, masked, and about 3x smaller.
        assert_eq!(out[0], 0xC1);
        assert!(out.len() < 1024 / 2 && out.len() > 1024 / 5, "{}", out.len());
    }

    #[test]
    fn shares_cover_every_connection_once() {
        let common = Common {
            target: Target::parse("ws://127.0.0.1:1/").unwrap(),
            threads: 3,
            sources: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            busy_poll: false,
            epoch: Instant::now(),
            epoch_realtime_ns: 0,
            live: Arc::default(),
            json: false,
        };
        let mut all: Vec<usize> = (0..3).flat_map(|i| common.share(i, 10)).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        // Fan-out: the last thread has the publishers to itself.
        let plan = plan(7, 1, 2);
        let shares: Vec<_> = (0..3).map(|i| common.fanout_share(i, &plan)).collect();
        assert_eq!(shares, vec![0..4, 4..7, 7..9]);
    }

    #[test]
    fn expected_deliveries_per_topic() {
        let plan = plan(5, 2, 1);
        // Subscribers 0, 2, 4 on topic 0; 1, 3 on topic 1.
        assert_eq!((plan.subscribers_of(0), plan.subscribers_of(1)), (3, 2));
        let published = [(0usize, 10u64), (1, 7)].into_iter().collect();
        assert_eq!(plan.expected_deliveries(&published), 10 * 3 + 7 * 2);
    }

    #[test]
    fn header_len_matches_encoder() {
        for len in [0usize, 8, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            encode_frame(&mut out, true, Opcode::Binary, Some([1, 2, 3, 4]), &vec![0; len]);
            assert_eq!(out.len() - len, header_len(len), "{len}");
        }
    }
}
