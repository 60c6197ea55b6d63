//! What a core's table keeps for each session (`Slot`), and the words the
//! shard and a session's task use between them: why a task is woken
//! (`Kick`), where a session is in its life (`Phase`).

use std::os::fd::{OwnedFd, RawFd};
use std::task::Waker;

use bytes::Bytes;

use crate::auth::Identity;
use crate::config::{Config, RouteId};
use crate::proto::stomp::conn::StompConn;

/// Why a session did not take a fresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefused {
    /// The session's route takes no tokens.
    NotTaken,
    Invalid(crate::auth::Failure),
    /// A valid token of another user.
    OtherUser,
}

/// What the sweep asks a session to do. A bit set: several can be due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kick(u16);

impl Kick {
    pub const PING: Kick = Kick(1);
    pub const TIMEOUT: Kick = Kick(2);
    pub const SHUTDOWN: Kick = Kick(4);
    /// End now, without a close handshake (the drain time is over).
    pub const ABORT: Kick = Kick(8);
    /// Quiet for `park_after_ms`: park if nothing is in progress.
    pub const PARK: Kick = Kick(16);
    /// Deliveries were queued for the session.
    pub const DELIVER: Kick = Kick(32);
    /// The session's deliveries passed `max_outbound_bytes` (policy close).
    pub const SLOW: Kick = Kick(64);
    /// The admin API asked to close the session (`take_close_request`).
    pub const CLOSE: Kick = Kick(128);
    /// The session's token expired: close with 4001.
    pub const EXPIRED: Kick = Kick(256);

    pub fn has(self, k: Kick) -> bool {
        self.0 & k.0 != 0
    }

    pub fn with(self, k: Kick) -> Kick {
        Kick(self.0 | k.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// Where the core is in an ordered shutdown (`server::shutdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stopping {
    No,
    /// No connection, admin request or session input is taken.
    Input,
    /// Sessions are sent their deliveries, then 1001.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the request head: bounded by `handshake_timeout_ms`.
    Handshake,
    /// Upgraded: pinged when quiet, closed when silent past `idle_timeout_ms`.
    Open,
    /// Our close is sent (or we are answering one): bounded by `close_timeout_ms`.
    Closing,
}

pub(super) struct Slot {
    pub(super) phase: Phase,
    pub(super) phase_since_ms: u64,
    pub(super) last_rx_ms: u64,
    pub(super) last_ping_ms: u64,
    /// Last time deliveries went out (a subscriber that only receives is
    /// not quiet, and does not park between deliveries).
    pub(super) last_tx_ms: u64,
    pub(super) last_park_kick_ms: u64,
    pub(super) shutdown_sent: bool,
    pub(super) kick: Kick,
    pub(super) waker: Option<Waker>,
    /// Set while the session has no task.
    pub(super) parked: Option<Parked>,
    /// A STOMP connection's state, and a close asked for from outside the
    /// task (the admin API, a missed heart-beat): only for some sessions.
    pub(super) app: Option<Box<AppState>>,
    /// The socket of the session's task (while it has one).
    pub(super) fd: RawFd,
    /// The task waits with nothing of its own queued: the shard may write
    /// deliveries to `fd` itself (`Shard::flush_direct`).
    pub(super) direct: bool,
    /// The session counts against the admission caps (from its 101 until
    /// the slot is removed).
    pub(super) admitted: bool,
    /// Its socket counts against the WebSocket port's share of the
    /// open-files limit (`Admission::take_socket`).
    pub(super) socket_taken: bool,
    /// What only some configurations need (a per-address cap, rate
    /// limits, tokens): allocated on first use, so it weighs on no other slot.
    pub(super) extra: Option<Box<Extra>>,
    /// The TLS state of a `wss://` connection (here rather than in `extra`:
    /// a TLS connection needs nothing else of it).
    pub(super) tls: Option<crate::sys::socket::Tls>,
    /// STOMP heart-beats (ms, 0: none): we send one when we have sent
    /// nothing for `heart_beat_send_ms`; the peer must send something at
    /// least every `heart_beat_expect_ms`.
    pub(super) heart_beat_send_ms: u64,
    pub(super) heart_beat_expect_ms: u64,
    /// The route, once upgraded.
    pub(super) route: Option<RouteId>,
    /// permessage-deflate with no context takeover was agreed, with this
    /// window for our messages (8-15 bits); 0: not agreed.
    pub(super) deflate_bits: u8,
}

/// A session's address (kept only under a per-address cap), the token
/// buckets of its inbound messages and bytes as of `bucket_ms` (see
/// `Session::take_tokens`), and who it is (routes that take tokens).
pub(super) struct Extra {
    pub(super) peer_ip: Option<std::net::IpAddr>,
    pub(super) identity: Option<Identity>,
    pub(super) message_tokens: f64,
    pub(super) byte_tokens: f64,
    pub(super) bucket_ms: u64,
}

impl Extra {
    /// Full buckets as of `now`.
    pub(super) fn new(config: &Config, now: u64) -> Extra {
        Extra {
            peer_ip: None,
            identity: None,
            message_tokens: f64::from(config.max_messages_per_sec),
            byte_tokens: config.max_bytes_per_sec as f64,
            bucket_ms: now,
        }
    }
}

impl Slot {
    pub(super) fn peer_ip(&self) -> Option<std::net::IpAddr> {
        self.extra.as_ref().and_then(|l| l.peer_ip)
    }

    pub(super) fn tls(&self) -> Option<crate::sys::socket::Tls> {
        self.tls.clone()
    }

    pub(super) fn identity(&self) -> Option<&Identity> {
        self.extra.as_ref().and_then(|e| e.identity.as_ref())
    }

    /// Whether the session is not read because it waits for its upstream:
    /// a full backend batch, or a hook's verdict.
    pub(super) fn waits_on_upstream(&self, config: &Config) -> bool {
        let Some(app) = self.app.as_ref() else { return false };
        let hook = app.hook.as_ref().is_some_and(|w| w.borrow().waiting());
        let full = match (
            &app.backend,
            self.route.and_then(|r| config.route_by_id(r).backend.as_ref()),
        ) {
            (Some(link), Some(backend)) => link.borrow().is_full(backend.max_batch_bytes),
            _ => false,
        };
        hook || full
    }

    pub(super) fn extra(&mut self, config: &Config, now: u64) -> &mut Extra {
        self.extra.get_or_insert_with(|| Box::new(Extra::new(config, now)))
    }
}

/// What a session's slot keeps for its protocol, outside its task.
#[derive(Default)]
pub(super) struct AppState {
    /// A close the admin API (or a missed heart-beat) asked for: code and
    /// reason.
    pub(super) close_request: Option<Box<(u16, Bytes)>>,
    /// A STOMP connection's codec and session state.
    pub(super) stomp: Option<Box<StompConn>>,
    /// A backend route's link to its upstream.
    pub(super) backend: Option<super::backend::SharedLink>,
    /// A wait for the route's hooks.
    pub(super) hook: Option<super::hooks::SharedWait>,
    /// Topics the connect hook subscribed the session to, until it starts.
    pub(super) initial: Box<[Box<[u8]>]>,
}

/// A STOMP heart-beat: an EOL, in a text frame of its own.
pub(super) const HEART_BEAT_FRAME: &[u8] = &[0x81, 0x01, b'\n'];

/// What a parked session keeps: its socket (a duplicate fd, registered in
/// the parking lot) and its route.
pub(super) struct Parked {
    pub(super) fd: OwnedFd,
    pub(super) route: RouteId,
}

pub use crate::stats::Stats;

#[cfg(test)]
mod tests {
    /// Every session holds one, parked or not: docs/ARCHITECTURE.md gives
    /// its size, and the memory figures in docs/bench/README.md depend on it.
    #[test]
    fn a_slot_stays_at_128_bytes() {
        assert_eq!(std::mem::size_of::<super::Slot>(), 128);
    }
}
