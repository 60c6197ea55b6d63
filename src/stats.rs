//! A core's counters, kept by every layer that counts something on it
//! (connections, the hub, the admin port) and summed across cores when
//! reported (`admin::metrics`, the log line at exit). Plain data.

use std::collections::BTreeMap;

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
    /// Data messages sent (echoes and deliveries), and bytes written.
    pub messages_out: u64,
    pub bytes_out: u64,
    /// Times a quiet session parked, and times a parked one got a task again.
    pub parks: u64,
    pub resumes: u64,
    /// Publishes made on this core (by its clients), frames queued for its
    /// subscribers, deliveries dropped (policy drop), slow consumers closed.
    pub publishes: u64,
    pub deliveries: u64,
    pub dropped: u64,
    pub slow_consumers: u64,
    /// Times the core's queued deliveries passed their budget, so its
    /// publishers were held.
    pub publish_holds: u64,
    /// Handshakes refused with 503 at `--max-connections`, and at
    /// `--max-connections-per-ip`.
    pub refused_max_connections: u64,
    pub refused_max_per_ip: u64,
    /// Handshakes refused with 429 at `--max-handshakes-per-sec-per-ip`.
    pub refused_handshake_rate: u64,
    /// Connections closed at accept: the WebSocket port's share of the
    /// open-files limit was taken (see `Admission::take_socket`).
    pub refused_sockets: u64,
    /// Admin connections refused (503) at `--admin-max-connections`.
    pub refused_admin: u64,
    /// Data messages over a connection's rate limits (dropped, or the one
    /// that closed it).
    pub rate_limited: u64,
    /// Handshakes refused with 401, by `auth::Failure::index`.
    pub auth_failures: [u64; 7],
    /// Subscribes and publishes the session's grants refused.
    pub denied_subscribes: u64,
    pub denied_publishes: u64,
    /// Fresh tokens taken in a session (`AUTH`), and sessions closed with
    /// 4001 when theirs expired.
    pub token_refreshes: u64,
    pub tokens_expired: u64,
    /// Backend routes: requests made to upstreams (`OPEN` included), those
    /// tried again after a failed connect, connections the upstream failed
    /// (refused handshakes with 502/504, closes with 1011/1014), messages
    /// it sent to clients, and its messages dropped (GRIP ones without the
    /// prefix, bad control messages, text that is not UTF-8).
    pub backend_requests: u64,
    pub backend_retries: u64,
    pub backend_failures: u64,
    pub backend_messages_out: u64,
    pub backend_dropped: u64,
    /// Hooks of pub/sub routes: calls made, calls that failed (no answer,
    /// or not a hook's), and subscribes and publishes denied (by a hook's
    /// answer or its failure).
    pub hook_calls: u64,
    pub hook_failures: u64,
    pub hook_denials: u64,
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
        self.messages_out += other.messages_out;
        self.bytes_out += other.bytes_out;
        self.parks += other.parks;
        self.resumes += other.resumes;
        self.publishes += other.publishes;
        self.deliveries += other.deliveries;
        self.dropped += other.dropped;
        self.slow_consumers += other.slow_consumers;
        self.publish_holds += other.publish_holds;
        self.refused_max_connections += other.refused_max_connections;
        self.refused_max_per_ip += other.refused_max_per_ip;
        self.refused_handshake_rate += other.refused_handshake_rate;
        self.refused_sockets += other.refused_sockets;
        self.refused_admin += other.refused_admin;
        self.rate_limited += other.rate_limited;
        for (mine, theirs) in self.auth_failures.iter_mut().zip(other.auth_failures) {
            *mine += theirs;
        }
        self.denied_subscribes += other.denied_subscribes;
        self.denied_publishes += other.denied_publishes;
        self.token_refreshes += other.token_refreshes;
        self.tokens_expired += other.tokens_expired;
        self.backend_requests += other.backend_requests;
        self.backend_retries += other.backend_retries;
        self.backend_failures += other.backend_failures;
        self.backend_messages_out += other.backend_messages_out;
        self.backend_dropped += other.backend_dropped;
        self.hook_calls += other.hook_calls;
        self.hook_failures += other.hook_failures;
        self.hook_denials += other.hook_denials;
    }
}

/// The NATS bridge's state and counters, shared by the bridge thread (which
/// writes them) and every core (which reads them: the hub whether the bus
/// is up, the admin port for `/readyz` and `/metrics`). Plain atomics.
#[derive(Debug)]
pub struct Bus {
    pub node_id: String,
    /// Whether the NATS connection is up now.
    pub connected: std::sync::atomic::AtomicBool,
    /// Times it came back after being lost.
    pub reconnects: AtomicU64,
    /// Publishes handed to NATS, and taken from it for local subscribers.
    pub published: AtomicU64,
    pub received: AtomicU64,
    /// Publishes to the bus dropped because its buffer was full (the bus
    /// unreachable or slower than the publishers), and messages NATS
    /// dropped for this node as a slow consumer.
    pub dropped_buffer_full: AtomicU64,
    pub dropped_slow_consumer: AtomicU64,
    /// Messages from NATS no subscriber could take: a text kind that is
    /// not UTF-8, or over `--max-message-bytes`.
    pub dropped_invalid: AtomicU64,
    /// Publishes the client refused (over the server's `max_payload`).
    pub refused: AtomicU64,
    /// The largest message the NATS server takes (its `max_payload`), 0
    /// until connected.
    pub max_payload: AtomicU64,
    /// Set when the node starts shutting down: the bridge feeds its cores
    /// no more and leaves its queues to the other nodes.
    pub closing: std::sync::atomic::AtomicBool,
    /// Subjects subscribed now (topics and queues with local subscribers).
    pub subjects: AtomicU64,
    /// Messages waiting in the bridge: publishes for the bus, and
    /// deliveries for cores whose rings are full; and the publishes' bytes.
    pub queue_depth: AtomicU64,
    pub buffered_bytes: AtomicU64,
    /// Cross-node requests (admin actions on sessions of other nodes) sent
    /// and answered for other nodes.
    pub requests_out: AtomicU64,
    pub requests_in: AtomicU64,
    /// From the sending node's bridge to this one's, per message
    /// (`LAG_BOUNDS_US`, plus one bucket past the last), and the sum.
    pub lag_buckets: [AtomicU64; LAG_BOUNDS_US.len() + 1],
    pub lag_sum_us: AtomicU64,
}

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the cross-node lag histogram's buckets, in microseconds.
pub const LAG_BOUNDS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000,
];

impl Bus {
    pub fn new(node_id: String) -> Bus {
        Bus {
            node_id,
            connected: Default::default(),
            reconnects: Default::default(),
            published: Default::default(),
            received: Default::default(),
            dropped_buffer_full: Default::default(),
            dropped_slow_consumer: Default::default(),
            dropped_invalid: Default::default(),
            refused: Default::default(),
            max_payload: Default::default(),
            closing: Default::default(),
            subjects: Default::default(),
            queue_depth: Default::default(),
            buffered_bytes: Default::default(),
            requests_out: Default::default(),
            requests_in: Default::default(),
            lag_buckets: Default::default(),
            lag_sum_us: Default::default(),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Whether a message of `bytes` can cross the bus (unknown before the
    /// first connect: then it may).
    pub fn carries(&self, bytes: usize) -> bool {
        let max = self.max_payload.load(Ordering::Relaxed);
        max == 0 || bytes as u64 <= max
    }

    /// Counts one message's cross-node lag.
    /// (A lag is taken as at most an hour: a stamp from a stranger's clock
    /// does not wrap the sum.)
    pub fn observe_lag(&self, us: u64) {
        let us = us.min(3_600_000_000);
        let bucket = LAG_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LAG_BOUNDS_US.len());
        self.lag_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.lag_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
