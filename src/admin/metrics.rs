//! Per-core snapshots of the counters, refreshed by each core at every
//! sweep tick, rendered as Prometheus text and as JSON. A scrape reads the
//! snapshots (one short lock per core); the cores never wait for it.

use std::fmt::Write;
use std::sync::Mutex;

use serde::Serialize;

use crate::conn::shard::{Shard, Stats};
use crate::stats::Bus;

#[derive(Debug, Default, Clone, Serialize)]
pub struct CoreSnapshot {
    pub driver: &'static str,
    pub connections: usize,
    pub parked: usize,
    pub topics: usize,
    /// Bytes of deliveries queued for the core's subscribers.
    pub queued_bytes: usize,
    /// Per target core: envelopes waiting in our ring to it, and its capacity.
    pub rings: Vec<(usize, usize, usize)>,
    pub doorbell_signals: u64,
    /// Receives under io_uring that found no buffer of the core free.
    pub recv_buffer_waits: u64,
    /// permessage-deflate on the core: messages compressed (a publish once,
    /// an echo or reply each), bytes given and made; messages inflated,
    /// bytes taken and made.
    pub deflate: crate::ws::deflate::Totals,
    pub inflate: crate::ws::deflate::Totals,
    /// Connections with compression contexts of their own (context
    /// takeover), and their reservations.
    pub dedicated: crate::pubsub::dedicated::DedicatedSnapshot,
    #[serde(flatten)]
    pub stats: StatsView,
}

/// The counters, in the form both renderings use.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StatsView {
    pub accepted: u64,
    pub upgraded: u64,
    pub closed: std::collections::BTreeMap<u16, u64>,
    pub close_sent: std::collections::BTreeMap<u16, u64>,
    pub rejected: std::collections::BTreeMap<u16, u64>,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub bytes_out: u64,
    pub publishes: u64,
    pub deliveries: u64,
    pub dropped: u64,
    pub slow_consumers: u64,
    pub publish_holds: u64,
    pub refused_max_connections: u64,
    pub refused_max_per_ip: u64,
    pub refused_handshake_rate: u64,
    pub refused_sockets: u64,
    pub refused_admin: u64,
    pub rate_limited: u64,
    pub auth_failures: [u64; 7],
    pub denied_subscribes: u64,
    pub denied_publishes: u64,
    pub token_refreshes: u64,
    pub tokens_expired: u64,
    pub backend_requests: u64,
    pub backend_retries: u64,
    pub backend_failures: u64,
    pub backend_messages_out: u64,
    pub backend_dropped: u64,
    pub hook_calls: u64,
    pub hook_failures: u64,
    pub hook_denials: u64,
    pub parks: u64,
    pub resumes: u64,
}

impl From<&Stats> for StatsView {
    fn from(s: &Stats) -> StatsView {
        StatsView {
            accepted: s.accepted,
            upgraded: s.upgraded,
            closed: s.closed.clone(),
            close_sent: s.close_sent.clone(),
            rejected: s.rejected.clone(),
            messages_in: s.messages_in,
            bytes_in: s.bytes_in,
            messages_out: s.messages_out,
            bytes_out: s.bytes_out,
            publishes: s.publishes,
            deliveries: s.deliveries,
            dropped: s.dropped,
            slow_consumers: s.slow_consumers,
            publish_holds: s.publish_holds,
            refused_max_connections: s.refused_max_connections,
            refused_max_per_ip: s.refused_max_per_ip,
            refused_handshake_rate: s.refused_handshake_rate,
            refused_sockets: s.refused_sockets,
            refused_admin: s.refused_admin,
            rate_limited: s.rate_limited,
            auth_failures: s.auth_failures,
            denied_subscribes: s.denied_subscribes,
            denied_publishes: s.denied_publishes,
            token_refreshes: s.token_refreshes,
            tokens_expired: s.tokens_expired,
            backend_requests: s.backend_requests,
            backend_retries: s.backend_retries,
            backend_failures: s.backend_failures,
            backend_messages_out: s.backend_messages_out,
            backend_dropped: s.backend_dropped,
            hook_calls: s.hook_calls,
            hook_failures: s.hook_failures,
            hook_denials: s.hook_denials,
            parks: s.parks,
            resumes: s.resumes,
        }
    }
}

/// `# HELP` and `# TYPE` lines of series `sluice_<name>`.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP sluice_{name} {help}\n# TYPE sluice_{name} {kind}");
}

type Value = fn(&CoreSnapshot) -> u64;
type RingValue = fn(usize, usize) -> usize;

/// The series shown per core and summed: name, type, help, value.
const SERIES: &[(&str, &str, &str, Value)] = &[
    ("connections", "gauge", "Open connections.", |c| c.connections as u64),
    (
        "parked_connections",
        "gauge",
        "Open connections parked without a task.",
        |c| c.parked as u64,
    ),
    ("topics", "gauge", "Topics with a subscriber on the core.", |c| {
        c.topics as u64
    }),
    (
        "queued_bytes",
        "gauge",
        "Bytes of deliveries queued for the core's subscribers.",
        |c| c.queued_bytes as u64,
    ),
    (
        "connections_accepted_total",
        "counter",
        "Accepted TCP connections.",
        |c| c.stats.accepted,
    ),
    (
        "connections_upgraded_total",
        "counter",
        "Completed WebSocket handshakes.",
        |c| c.stats.upgraded,
    ),
    ("messages_in_total", "counter", "Data messages received.", |c| {
        c.stats.messages_in
    }),
    ("bytes_in_total", "counter", "Payload bytes received.", |c| {
        c.stats.bytes_in
    }),
    ("messages_out_total", "counter", "Data messages sent.", |c| {
        c.stats.messages_out
    }),
    ("bytes_out_total", "counter", "Bytes written to sockets.", |c| {
        c.stats.bytes_out
    }),
    ("publishes_total", "counter", "Publishes made on the core.", |c| {
        c.stats.publishes
    }),
    ("deliveries_total", "counter", "Messages queued for subscribers.", |c| {
        c.stats.deliveries
    }),
    (
        "dropped_total",
        "counter",
        "Deliveries dropped (slow consumer, drop policy).",
        |c| c.stats.dropped,
    ),
    (
        "slow_consumer_closes_total",
        "counter",
        "Subscribers closed with 1008 as slow consumers.",
        |c| c.stats.slow_consumers,
    ),
    (
        "publish_holds_total",
        "counter",
        "Times publishing paused: queued deliveries passed --max-core-outbound-bytes.",
        |c| c.stats.publish_holds,
    ),
    (
        "refused_max_connections_total",
        "counter",
        "Handshakes refused with 503 at --max-connections.",
        |c| c.stats.refused_max_connections,
    ),
    (
        "refused_max_connections_per_ip_total",
        "counter",
        "Handshakes refused with 503 at --max-connections-per-ip.",
        |c| c.stats.refused_max_per_ip,
    ),
    (
        "refused_handshake_rate_total",
        "counter",
        "Handshakes refused with 429 at --max-handshakes-per-sec-per-ip.",
        |c| c.stats.refused_handshake_rate,
    ),
    (
        "refused_sockets_total",
        "counter",
        "Connections closed at accept: the WebSocket port held its share of the open-files limit.",
        |c| c.stats.refused_sockets,
    ),
    (
        "refused_admin_connections_total",
        "counter",
        "Admin connections refused with 503 at --admin-max-connections.",
        |c| c.stats.refused_admin,
    ),
    (
        "rate_limited_total",
        "counter",
        "Data messages over a connection's rate limits (dropped, or closing it with 1008).",
        |c| c.stats.rate_limited,
    ),
    (
        "denied_subscribes_total",
        "counter",
        "Subscribes refused by the session's grants.",
        |c| c.stats.denied_subscribes,
    ),
    (
        "denied_publishes_total",
        "counter",
        "Publishes refused by the session's grants.",
        |c| c.stats.denied_publishes,
    ),
    (
        "token_refreshes_total",
        "counter",
        "Fresh tokens taken by open sessions.",
        |c| c.stats.token_refreshes,
    ),
    (
        "tokens_expired_total",
        "counter",
        "Sessions closed with 4001 when their token expired.",
        |c| c.stats.tokens_expired,
    ),
    (
        "backend_requests_total",
        "counter",
        "Requests made to backend routes' upstreams (OPEN included).",
        |c| c.stats.backend_requests,
    ),
    (
        "backend_retries_total",
        "counter",
        "Upstream requests tried again after a failed connect.",
        |c| c.stats.backend_retries,
    ),
    (
        "backend_failures_total",
        "counter",
        "Connections an upstream failed: handshakes answered 502/504, sessions closed with 1011/1014.",
        |c| c.stats.backend_failures,
    ),
    (
        "backend_messages_out_total",
        "counter",
        "Messages upstreams sent to their clients.",
        |c| c.stats.backend_messages_out,
    ),
    (
        "backend_dropped_total",
        "counter",
        "Upstream messages dropped: GRIP ones without the prefix, bad control messages, text that is not UTF-8.",
        |c| c.stats.backend_dropped,
    ),
    (
        "hook_calls_total",
        "counter",
        "Calls to pub/sub routes' connect, subscribe and publish hooks.",
        |c| c.stats.hook_calls,
    ),
    (
        "hook_failures_total",
        "counter",
        "Hook calls with no answer in time, or an answer that is not a hook's.",
        |c| c.stats.hook_failures,
    ),
    (
        "hook_denials_total",
        "counter",
        "Subscribes and publishes a hook denied (or failed, which denies).",
        |c| c.stats.hook_denials,
    ),
    ("parks_total", "counter", "Times a quiet connection parked.", |c| {
        c.stats.parks
    }),
    (
        "mesh_doorbell_signals_total",
        "counter",
        "Times another core woke this one.",
        |c| c.doorbell_signals,
    ),
    (
        "recv_buffer_waits_total",
        "counter",
        "Receives under io_uring that found every buffer of the core's ring taken (the connection then reads from its socket directly).",
        |c| c.recv_buffer_waits,
    ),
    (
        "compressed_messages_total",
        "counter",
        "Messages compressed (permessage-deflate): without context takeover a publish once per core, an echo or a reply each; with it, each message of each connection.",
        |c| c.deflate.messages,
    ),
    (
        "compressed_bytes_in_total",
        "counter",
        "Bytes given to the compressor (messages that did not shrink too, which go out as they were).",
        |c| c.deflate.bytes_in,
    ),
    (
        "compressed_bytes_out_total",
        "counter",
        "Bytes the compressor made of them: with compressed_bytes_in_total, its ratio.",
        |c| c.deflate.bytes_out,
    ),
    (
        "inflated_messages_total",
        "counter",
        "Compressed messages received and inflated.",
        |c| c.inflate.messages,
    ),
    (
        "inflated_bytes_in_total",
        "counter",
        "Compressed bytes received.",
        |c| c.inflate.bytes_in,
    ),
    (
        "inflated_bytes_out_total",
        "counter",
        "Bytes they inflated to.",
        |c| c.inflate.bytes_out,
    ),
    (
        "deflate_dedicated_sessions",
        "gauge",
        "Connections agreed to permessage-deflate with context takeover, each with its own compressor or inflater.",
        |c| c.dedicated.sessions,
    ),
    (
        "deflate_dedicated_reserved_bytes",
        "gauge",
        "Memory reserved for their compressors and inflaters, within --deflate-dedicated-bytes.",
        |c| c.dedicated.reserved_bytes,
    ),
    (
        "deflate_dedicated_refused_total",
        "counter",
        "Connections that asked for context takeover and were agreed without it, the core's --deflate-dedicated-bytes being spent.",
        |c| c.dedicated.refused,
    ),
];

pub struct Metrics {
    cores: Vec<Mutex<CoreSnapshot>>,
    bus: Option<std::sync::Arc<Bus>>,
}

impl Metrics {
    /// `bus`: the NATS bridge's state, in a cluster.
    pub fn new(cores: usize, bus: Option<std::sync::Arc<Bus>>) -> Metrics {
        Metrics {
            cores: (0..cores).map(|_| Mutex::new(CoreSnapshot::default())).collect(),
            bus,
        }
    }

    /// Whether the node takes traffic as a load balancer means it: always
    /// alone; in a cluster, while the bus is up.
    pub fn bus_ready(&self) -> bool {
        self.bus.as_ref().is_none_or(|bus| bus.is_connected())
    }

    /// The bus's state for `/stats` and `/readyz`.
    pub fn bus_json(&self) -> serde_json::Value {
        let Some(bus) = &self.bus else {
            return serde_json::Value::Null;
        };
        serde_json::json!({
            "node": bus.node_id,
            "connected": bus.is_connected(),
            "reconnects": Bus::get(&bus.reconnects),
            "published": Bus::get(&bus.published),
            "received": Bus::get(&bus.received),
            "dropped_buffer_full": Bus::get(&bus.dropped_buffer_full),
            "dropped_slow_consumer": Bus::get(&bus.dropped_slow_consumer),
            "dropped_invalid": Bus::get(&bus.dropped_invalid),
            "refused": Bus::get(&bus.refused),
            "max_payload": Bus::get(&bus.max_payload),
            "subjects": Bus::get(&bus.subjects),
            "queue_depth": Bus::get(&bus.queue_depth),
            "buffered_bytes": Bus::get(&bus.buffered_bytes),
            "requests_out": Bus::get(&bus.requests_out),
            "requests_in": Bus::get(&bus.requests_in),
        })
    }

    /// The bus's series (Prometheus text), after the cores'.
    fn bus_prometheus(&self, out: &mut String) {
        let Some(bus) = &self.bus else { return };
        header(out, "node_info", "gauge", "This node's id in the cluster.");
        let _ = writeln!(out, "sluice_node_info{{node=\"{}\"}} 1", bus.node_id);
        let series: [(&str, &str, &str, u64); 12] = [
            (
                "bus_connected",
                "gauge",
                "Whether the NATS connection is up.",
                u64::from(bus.is_connected()),
            ),
            (
                "bus_reconnects_total",
                "counter",
                "Times the NATS connection came back.",
                Bus::get(&bus.reconnects),
            ),
            (
                "bus_published_total",
                "counter",
                "Publishes handed to NATS.",
                Bus::get(&bus.published),
            ),
            (
                "bus_received_total",
                "counter",
                "Messages from NATS for local subscribers.",
                Bus::get(&bus.received),
            ),
            (
                "bus_subjects",
                "gauge",
                "NATS subjects subscribed (topics and queues with local subscribers).",
                Bus::get(&bus.subjects),
            ),
            (
                "bus_queue_depth",
                "gauge",
                "Messages waiting in the bridge: publishes for NATS and deliveries for full rings.",
                Bus::get(&bus.queue_depth),
            ),
            (
                "bus_buffered_bytes",
                "gauge",
                "Bytes of publishes waiting for NATS (bounded by --nats-buffer-bytes).",
                Bus::get(&bus.buffered_bytes),
            ),
            (
                "bus_requests_out_total",
                "counter",
                "Admin actions on other nodes' sessions sent over NATS.",
                Bus::get(&bus.requests_out),
            ),
            (
                "bus_requests_in_total",
                "counter",
                "Admin actions on this node's sessions taken from NATS.",
                Bus::get(&bus.requests_in),
            ),
            (
                "bus_dropped_invalid_total",
                "counter",
                "Messages from NATS refused: text that is not UTF-8, or over the message limit.",
                Bus::get(&bus.dropped_invalid),
            ),
            (
                "bus_refused_total",
                "counter",
                "Publishes the NATS client refused (over the server's max_payload): they reached this node's subscribers only.",
                Bus::get(&bus.refused),
            ),
            (
                "bus_dropped_slow_consumer_total",
                "counter",
                "Messages NATS's client dropped because the bridge fell behind (at least).",
                Bus::get(&bus.dropped_slow_consumer),
            ),
        ];
        for (name, kind, help, value) in series {
            header(out, name, kind, help);
            let _ = writeln!(out, "sluice_{name} {value}");
        }
        header(
            out,
            "bus_dropped_total",
            "counter",
            "Publishes to NATS dropped: its buffer was full (the bus unreachable or too slow).",
        );
        let _ = writeln!(out, "sluice_bus_dropped_total {}", Bus::get(&bus.dropped_buffer_full));
        header(
            out,
            "bus_lag_seconds",
            "histogram",
            "From the sending node's bridge to this node's, per message.",
        );
        let mut cumulative = 0;
        for (i, bucket) in bus.lag_buckets.iter().enumerate() {
            cumulative += Bus::get(bucket);
            match crate::stats::LAG_BOUNDS_US.get(i) {
                Some(us) => {
                    let _ = writeln!(
                        out,
                        "sluice_bus_lag_seconds_bucket{{le=\"{}\"}} {cumulative}",
                        *us as f64 / 1e6
                    );
                }
                None => {
                    let _ = writeln!(out, "sluice_bus_lag_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(
            out,
            "sluice_bus_lag_seconds_sum {}",
            Bus::get(&bus.lag_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "sluice_bus_lag_seconds_count {cumulative}");
    }

    /// Called by each core at every sweep tick.
    pub fn refresh(&self, shard: &Shard, driver: &'static str) {
        let dedicated = shard.hub.sessions.dedicated.snapshot();
        let sum = |a: crate::ws::deflate::Totals, b: crate::ws::deflate::Totals| crate::ws::deflate::Totals {
            messages: a.messages + b.messages,
            bytes_in: a.bytes_in + b.bytes_in,
            bytes_out: a.bytes_out + b.bytes_out,
        };
        let snapshot = CoreSnapshot {
            driver,
            connections: shard.session_count(),
            parked: shard.parked_count(),
            topics: shard.hub.topic_count(),
            queued_bytes: shard.hub.sessions.queued_bytes(),
            rings: shard.hub.mesh.fullness().collect(),
            doorbell_signals: shard.hub.mesh.doorbell_signals(),
            recv_buffer_waits: shard.recv_ring.get().map_or(0, |r| r.starved()),
            deflate: sum(shard.hub.sessions.compressor.totals(), dedicated.deflate),
            inflate: sum(
                shard.inflater.borrow().as_ref().map(|i| i.totals()).unwrap_or_default(),
                dedicated.inflate,
            ),
            dedicated,
            stats: StatsView::from(&*shard.stats.borrow()),
        };
        if let Ok(mut slot) = self.cores[shard.core].lock() {
            *slot = snapshot;
        }
    }

    fn snapshots(&self) -> Vec<CoreSnapshot> {
        self.cores
            .iter()
            .map(|c| c.lock().map(|s| s.clone()).unwrap_or_default())
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({ "cores": self.snapshots() });
        if let Some(bus) = &self.bus {
            json["node"] = serde_json::Value::from(bus.node_id.clone());
            json["bus"] = self.bus_json();
        }
        json
    }

    /// Prometheus text format 0.0.4: every series per core (`core` label)
    /// and summed (no `core` label).
    pub fn prometheus(&self) -> String {
        let cores = self.snapshots();
        let mut out = String::new();
        let driver = cores.first().map_or("", |c| c.driver);
        header(&mut out, "info", "gauge", "The I/O driver in use.");
        let _ = writeln!(out, "sluice_info{{driver=\"{driver}\",workers=\"{}\"}} 1", cores.len());
        for (name, kind, help, value) in SERIES {
            header(&mut out, name, kind, help);
            let mut total = 0;
            for (core, c) in cores.iter().enumerate() {
                let v = value(c);
                total += v;
                let _ = writeln!(out, "sluice_{name}{{core=\"{core}\"}} {v}");
            }
            let _ = writeln!(out, "sluice_{name} {total}");
        }
        header(
            &mut out,
            "connections_closed_total",
            "counter",
            "Ended sessions by RFC 6455 7.1.5 close code.",
        );
        let mut codes = std::collections::BTreeMap::<u16, u64>::new();
        for (core, c) in cores.iter().enumerate() {
            for (code, n) in &c.stats.closed {
                *codes.entry(*code).or_default() += n;
                let code = crate::ws::CloseCode(*code).bucket_label();
                let _ = writeln!(
                    out,
                    "sluice_connections_closed_total{{core=\"{core}\",code=\"{code}\"}} {n}"
                );
            }
        }
        for (code, n) in codes {
            let code = crate::ws::CloseCode(code).bucket_label();
            let _ = writeln!(out, "sluice_connections_closed_total{{code=\"{code}\"}} {n}");
        }
        header(
            &mut out,
            "auth_failures_total",
            "counter",
            "Handshakes refused with 401, by why the token was refused.",
        );
        for failure in crate::auth::Failure::ALL {
            let reason = failure.label();
            let mut total = 0;
            for (core, c) in cores.iter().enumerate() {
                let n = c.stats.auth_failures[failure.index()];
                total += n;
                let _ = writeln!(
                    out,
                    "sluice_auth_failures_total{{core=\"{core}\",reason=\"{reason}\"}} {n}"
                );
            }
            let _ = writeln!(out, "sluice_auth_failures_total{{reason=\"{reason}\"}} {total}");
        }
        // Each family's samples stay together under its own header.
        let rings: [(&str, &str, RingValue); 2] = [
            (
                "mesh_ring_used",
                "Envelopes waiting in a cross-core ring.",
                |used, _| used,
            ),
            (
                "mesh_ring_capacity",
                "Envelopes a cross-core ring holds.",
                |_, capacity| capacity,
            ),
        ];
        for (name, help, value) in rings {
            header(&mut out, name, "gauge", help);
            for (core, c) in cores.iter().enumerate() {
                for &(to, used, capacity) in &c.rings {
                    let v = value(used, capacity);
                    let _ = writeln!(out, "sluice_{name}{{from=\"{core}\",to=\"{to}\"}} {v}");
                }
            }
        }
        self.bus_prometheus(&mut out);
        out
    }
}
