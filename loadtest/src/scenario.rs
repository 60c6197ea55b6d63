//! The scenarios: what each connection does and what it measures.
//!
//! Every scenario is bounded: connections stop at a deadline, every wait is
//! tied to it, and the run ends even if the server stops answering.
//! Client frames are encoded and masked once up front; only the bytes that
//! change per message (a timestamp, a sequence number) are masked per send.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::ws::frame::{encode_frame, MAX_HEADER_BYTES};
use sluice::ws::{mask, Event, Opcode};

use crate::client::{Client, Rng, Target};
use crate::run::{record_handshake_us, record_latency_us, record_latency_us_n, Deadline, Gate, Live, ThreadResult};

/// What every scenario shares.
pub struct Common {
    pub target: Target,
    pub threads: usize,
    pub sources: Vec<IpAddr>,
    pub connect_timeout: Duration,
    pub busy_poll: bool,
    /// One epoch for every thread, so timestamps compare across threads.
    pub epoch: Instant,
    pub live: Arc<Live>,
}

impl Common {
    /// Connections of thread `index` when `total` are spread over the threads.
    fn share(&self, index: usize, total: usize) -> std::ops::Range<usize> {
        let per = total / self.threads;
        let extra = total % self.threads;
        let start = index * per + index.min(extra);
        start..start + per + usize::from(index < extra)
    }

    fn source(&self, conn: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[conn % self.sources.len()])
    }

    fn nanos_since_epoch(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Connects, then waits at the thread's gate for its other connections.
    async fn connect_at(&self, gate: &Gate, conn: usize, rng: &mut Rng, result: &mut ThreadResult) -> Option<Client> {
        let client = self.connect(conn, rng, result).await;
        gate.arrive().await;
        client
    }

    async fn connect(&self, conn: usize, rng: &mut Rng, result: &mut ThreadResult) -> Option<Client> {
        match Client::connect(&self.target, self.source(conn), self.connect_timeout, rng).await {
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

// ---- echo -------------------------------------------------------------------

pub struct EchoPlan {
    pub connections: usize,
    pub in_flight: usize,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Closed loop: each connection keeps `in_flight` messages outstanding and
/// sends one more for each echo. Round trips come from a per-connection
/// queue of send times (echoes come back in order).
pub async fn echo(common: Arc<Common>, plan: Arc<EchoPlan>, index: usize) -> ThreadResult {
    let share = common.share(index, plan.connections);
    let deadline = Deadline::start(common.epoch + plan.warmup + plan.duration, share.len());
    let gate = Gate::new(share.len());
    let conns: Vec<_> = share
        .enumerate()
        .map(|(slot, conn)| {
            let common = common.clone();
            let plan = plan.clone();
            let deadline = deadline.clone();
            let gate = gate.clone();
            monoio::spawn(async move { echo_conn(&common, &plan, conn, (&deadline, slot), &gate).await })
        })
        .collect();
    let mut total = ThreadResult::default();
    for c in conns {
        total.merge(c.await);
    }
    total
}

async fn echo_conn(
    common: &Common,
    plan: &EchoPlan,
    conn: usize,
    (deadline, slot): (&Deadline, usize),
    gate: &Gate,
) -> ThreadResult {
    let mut result = ThreadResult::default();
    let mut rng = Rng::new(conn as u64);
    let Some(mut client) = common.connect_at(gate, conn, &mut rng, &mut result).await else {
        return result;
    };
    let (frame, key) = masked(Opcode::Binary, &vec![0x5a; plan.size], &mut rng);
    // `in_flight` frames back to back: a batch of n is one copy of its first n.
    let batch = frame.repeat(plan.in_flight);
    let measure_from = common.epoch + plan.warmup;
    // Send times by batch: every message of a batch left at the same instant,
    // so round trips are recorded per batch (`record_n`), not per message.
    let mut sent_at: VecDeque<(Instant, usize)> = VecDeque::with_capacity(plan.in_flight);
    let mut owed = plan.in_flight;
    let live = &common.live;
    while !deadline.passed() {
        if owed > 0 {
            let now = Instant::now();
            client.queue(&batch[..owed * frame.len()]);
            sent_at.push_back((now, owed));
            if now >= measure_from {
                result.sent += owed as u64;
                Live::add(&live.sent, owed as u64);
            }
            match deadline.wait(slot, client.write_queued()).await {
                None => break,
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    result.error(live, format!("write: {e}"));
                    break;
                }
            }
        }
        // Echoes cannot be back the moment we sent: wait first (a read now
        // would be a wasted syscall per batch).
        let read = match deadline.wait(slot, client.recv()).await {
            None => break,
            Some(read) => read,
        };
        match read {
            Ok(0) => {
                result.error(live, "server closed the connection mid-run".into());
                return result;
            }
            Ok(_) => {}
            Err(e) => {
                result.error(live, format!("read: {e}"));
                return result;
            }
        }
        let now = Instant::now();
        let mut replies = 0;
        let drained = client.drain_events(key, |e| replies += usize::from(matches!(e, Event::Message { .. })));
        if let Err(e) = drained {
            result.error(live, e);
            let _ = client.flush().await;
            return result;
        }
        let mut left = replies;
        while left > 0 {
            let Some((sent, count)) = sent_at.front_mut() else {
                result.error(live, "more echoes than messages sent".into());
                return result;
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
                sent_at.pop_front();
            }
        }
        owed = replies;
    }
    if result.sent > 0 && result.received == 0 {
        result.error(live, "the server echoed nothing back".into());
    }
    if client.close(key, Duration::from_secs(2)).await {
        result.clean_closes += 1;
    }
    result
}

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
/// Without `--busy-poll` each connection is a task that sleeps until its
/// next send or a reply; monoio's timer has millisecond resolution, so sends
/// can start up to a millisecond late, and that lateness is charged as
/// latency. With `--busy-poll` one loop per thread drives all of the
/// thread's connections with non-blocking calls and never parks.
pub async fn latency(common: Arc<Common>, plan: Arc<LatencyPlan>, index: usize) -> ThreadResult {
    let share = common.share(index, plan.connections);
    let gate = Gate::new(share.len());
    let tasks: Vec<_> = share
        .map(|conn| {
            let common = common.clone();
            let plan = plan.clone();
            let gate = gate.clone();
            monoio::spawn(async move {
                let mut result = ThreadResult::default();
                let mut rng = Rng::new(conn as u64);
                let client = common.connect_at(&gate, conn, &mut rng, &mut result).await;
                let sender = client.map(|c| Sender::new(&common, &plan, conn, c, &mut rng));
                if common.busy_poll {
                    // The thread's spin loop takes it from here.
                    return (sender, result);
                }
                if let Some(mut s) = sender {
                    s.run(&common, &plan, &mut result).await;
                    s.finish(&common, &plan, &mut result).await;
                }
                (None, result)
            })
        })
        .collect();
    let mut total = ThreadResult::default();
    let mut senders = Vec::new();
    for t in tasks {
        let (sender, result) = t.await;
        total.merge(result);
        senders.extend(sender);
    }
    if common.busy_poll {
        spin(&common, &plan, &mut senders, &mut total);
        let closes: Vec<_> = senders
            .into_iter()
            .map(|s| {
                let common = common.clone();
                let plan = plan.clone();
                monoio::spawn(async move {
                    let mut result = ThreadResult::default();
                    s.finish(&common, &plan, &mut result).await;
                    result
                })
            })
            .collect();
        for c in closes {
            total.merge(c.await);
        }
    }
    total
}

/// Drives every sender of the thread until the window ends, never parking.
fn spin(common: &Common, plan: &LatencyPlan, senders: &mut Vec<Sender>, result: &mut ThreadResult) {
    let until = common.epoch + plan.warmup + plan.duration;
    while Instant::now() < until && !senders.is_empty() && !common.live.stop.load(Ordering::Relaxed) {
        senders.retain_mut(|s| match s.step(common, plan, result) {
            Ok(_) => true,
            Err(e) => {
                result.error(&common.live, e);
                false
            }
        });
        std::hint::spin_loop();
    }
}

/// One latency connection: its schedule, its pre-masked frame, and the
/// messages it has in flight.
struct Sender {
    client: Client,
    frame: Vec<u8>,
    key: [u8; 4],
    /// Where the 8-byte send time sits in `frame`.
    stamp_at: usize,
    interval: Duration,
    next: Instant,
    outstanding: u64,
}

impl Sender {
    fn new(common: &Common, plan: &LatencyPlan, conn: usize, client: Client, rng: &mut Rng) -> Sender {
        let size = plan.size.max(8);
        let (frame, key) = masked(Opcode::Binary, &vec![0u8; size], rng);
        let interval = Duration::from_secs_f64(plan.connections as f64 / plan.rate);
        // Spread the connections' schedules evenly over one interval.
        let next = Instant::now().max(common.epoch) + interval.mul_f64(conn as f64 / plan.connections as f64);
        Sender {
            client,
            frame,
            key,
            stamp_at: header_len(size),
            interval,
            next,
            outstanding: 0,
        }
    }

    /// Queues every message due by now, stamped with its intended time.
    fn queue_due(&mut self, common: &Common, plan: &LatencyPlan, result: &mut ThreadResult) -> u64 {
        let now = Instant::now();
        let measure_from = common.epoch + plan.warmup;
        let until = measure_from + plan.duration;
        let mut due = 0;
        while self.next <= now && self.next < until {
            if self.next >= measure_from {
                result.sent += 1;
                Live::add(&common.live.sent, 1);
            }
            let out = self.client.outbox();
            let at = out.len();
            out.extend_from_slice(&self.frame);
            let mut stamp = (self.next.duration_since(common.epoch).as_nanos() as u64).to_le_bytes();
            mask::apply(&mut stamp, self.key, 0);
            out[at + self.stamp_at..at + self.stamp_at + 8].copy_from_slice(&stamp);
            self.next += self.interval;
            due += 1;
        }
        self.outstanding += due;
        due
    }

    /// Sends what is due and takes what has come back, without waiting.
    /// `Ok(true)` when something was read.
    fn step(&mut self, common: &Common, plan: &LatencyPlan, result: &mut ThreadResult) -> Result<bool, String> {
        self.queue_due(common, plan, result);
        self.client.try_send().map_err(|e| format!("write: {e}"))?;
        match self.client.try_recv() {
            Ok(Some(0)) => Err("server closed the connection mid-run".into()),
            Ok(Some(_)) => {
                self.take_latencies(common, plan, result)?;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// The task-per-connection loop: sleep until the next send or a reply.
    async fn run(&mut self, common: &Common, plan: &LatencyPlan, result: &mut ThreadResult) {
        let until = common.epoch + plan.warmup + plan.duration;
        while Instant::now() < until && !common.live.stop.load(Ordering::Relaxed) {
            match self.step(common, plan, result) {
                Ok(true) => {}
                Ok(false) => {
                    if let Err(e) = self.client.send_now().await {
                        return result.error(&common.live, format!("write: {e}"));
                    }
                    let left = self.next.min(until).saturating_duration_since(Instant::now());
                    let _ = monoio::time::timeout(left, self.client.stream().readable(false)).await;
                }
                Err(e) => {
                    result.error(&common.live, e);
                    let _ = self.client.flush().await;
                    return;
                }
            }
        }
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
    /// Subscribe message; `{topic}` is replaced by the topic name.
    pub sub_msg: String,
    /// Text before a publish's payload; `{topic}` is replaced.
    pub pub_prefix: String,
    pub topic_prefix: String,
    /// Time for subscriptions to settle before publishing starts.
    pub settle: Duration,
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
    let at = message.windows(MARK.len()).position(|w| w == MARK)?;
    let rest = std::str::from_utf8(&message[at + MARK.len()..]).ok()?;
    let body = rest.split('#').next()?;
    let mut parts = body.split(':');
    let publisher = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let sent_ns = parts.next()?.parse().ok()?;
    Some((publisher, seq, sent_ns))
}

/// Subscribers and publishers share connection numbers: 0..subscribers are
/// subscribers, the rest publishers. Publisher `p` publishes its messages to
/// topics round robin; every subscriber of a topic should see every message
/// published to it, in each publisher's order.
pub async fn fanout(common: Arc<Common>, plan: Arc<FanoutPlan>, index: usize) -> ThreadResult {
    let total_conns = plan.subscribers + plan.publishers;
    let share = common.share(index, total_conns);
    let gate = Gate::new(share.len());
    let tasks: Vec<_> = share
        .map(|conn| {
            let common = common.clone();
            let plan = plan.clone();
            let gate = gate.clone();
            monoio::spawn(async move {
                if conn < plan.subscribers {
                    subscriber(&common, &plan, conn, &gate).await
                } else {
                    publisher(&common, &plan, conn, conn - plan.subscribers, &gate).await
                }
            })
        })
        .collect();
    let mut total = ThreadResult::default();
    for t in tasks {
        total.merge(t.await);
    }
    total
}

async fn subscriber(common: &Common, plan: &FanoutPlan, conn: usize, gate: &Gate) -> ThreadResult {
    let mut result = ThreadResult::default();
    let mut rng = Rng::new(conn as u64);
    let Some(mut client) = common.connect_at(gate, conn, &mut rng, &mut result).await else {
        return result;
    };
    let topic = plan.topic(conn % plan.topics);
    let (sub, key) = masked(
        Opcode::Text,
        plan.sub_msg.replace("{topic}", &topic).as_bytes(),
        &mut rng,
    );
    client.queue(&sub);
    if let Err(e) = client.flush().await {
        result.error(&common.live, format!("subscribe: {e}"));
        return result;
    }
    let live = &common.live;
    let publish_from = common.epoch + plan.settle;
    let measure_ns = (plan.settle + plan.warmup).as_nanos() as u64;
    // Publishing ends at publish_from + warmup + duration; deliveries get a
    // grace period after that.
    let until = publish_from + plan.warmup + plan.duration + Duration::from_secs(2);
    let mut last_seq: HashMap<u32, u64> = HashMap::new();
    while Instant::now() < until && !live.stop.load(Ordering::Relaxed) {
        wait_readable(&client, until).await;
        match client.try_recv() {
            Ok(Some(0)) => {
                result.error(live, "server closed a subscriber mid-run".into());
                return result;
            }
            Ok(Some(_)) => {}
            Ok(None) => continue,
            Err(e) => {
                result.error(live, format!("read: {e}"));
                return result;
            }
        }
        let now_ns = common.nanos_since_epoch();
        let mut received = 0;
        let out_of_order = &mut result.out_of_order;
        let drained = client.drain_events(key, |e| {
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
            }
        });
        if let Err(e) = drained {
            result.error(live, e);
            let _ = client.flush().await;
            return result;
        }
        result.received += received;
        Live::add(&live.received, received);
        if client.flush().await.is_err() {
            break;
        }
    }
    if client.close(key, Duration::from_secs(2)).await {
        result.clean_closes += 1;
    }
    result
}

async fn publisher(common: &Common, plan: &FanoutPlan, conn: usize, publisher: usize, gate: &Gate) -> ThreadResult {
    let mut result = ThreadResult::default();
    let mut rng = Rng::new(conn as u64);
    let Some(mut client) = common.connect_at(gate, conn, &mut rng, &mut result).await else {
        return result;
    };
    let key = (rng.next_u64() as u32).to_le_bytes();
    let live = &common.live;
    let interval = Duration::from_secs_f64(plan.publishers as f64 / plan.rate);
    let start = common.epoch + plan.settle;
    let until = start + plan.warmup + plan.duration;
    let mut next = start + interval.mul_f64(publisher as f64 / plan.publishers as f64);
    let prefixes: Vec<String> = (0..plan.topics)
        .map(|t| plan.pub_prefix.replace("{topic}", &plan.topic(t)))
        .collect();
    let mut seq = 0u64;
    let mut payload = Vec::with_capacity(plan.size + 64);
    while next < until && !live.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            monoio::time::sleep_until(monoio::time::Instant::from_std(next)).await;
            continue;
        }
        while next <= now && next < until {
            seq += 1;
            let topic = (seq as usize) % plan.topics;
            let prefix = &prefixes[topic];
            payload.clear();
            payload.extend_from_slice(prefix.as_bytes());
            let sent_ns = next.duration_since(common.epoch).as_nanos();
            payload.extend_from_slice(format!("#L{publisher}:{seq}:{sent_ns}#").as_bytes());
            while payload.len() < prefix.len() + plan.size {
                payload.push(b'.');
            }
            encode_frame(client.outbox(), true, Opcode::Text, Some(key), &payload);
            // Every publish counts as sent: a loss is a publish no one saw.
            result.sent += 1;
            *result.published.entry(topic).or_default() += 1;
            Live::add(&live.sent, 1);
            next += interval;
        }
        if let Err(e) = client.send_now().await {
            result.error(live, format!("publish: {e}"));
            return result;
        }
        // Answer pings and notice a server that went away.
        match client.try_recv() {
            Ok(Some(0)) => {
                result.error(live, "server closed a publisher mid-run".into());
                return result;
            }
            Ok(_) => {
                let _ = client.drain_events(key, |_| {});
            }
            Err(e) => {
                result.error(live, format!("read: {e}"));
                return result;
            }
        }
    }
    if client.close(key, Duration::from_secs(2)).await {
        result.clean_closes += 1;
    }
    result
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
            live: Arc::default(),
        };
        let mut all: Vec<usize> = (0..3).flat_map(|i| common.share(i, 10)).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn expected_deliveries_per_topic() {
        let plan = FanoutPlan {
            subscribers: 5,
            topics: 2,
            publishers: 1,
            rate: 1.0,
            size: 0,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            sub_msg: String::new(),
            pub_prefix: String::new(),
            topic_prefix: String::new(),
            settle: Duration::ZERO,
        };
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
