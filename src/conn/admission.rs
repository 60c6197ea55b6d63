//! Admission: how many upgraded connections the whole server holds, how
//! many from one address, and how fast one address may open them. Shared
//! by every core; decided when a handshake would succeed, so refused
//! clients get a 503 (a cap) or a 429 (the rate), with `Retry-After`,
//! instead of a silent drop; health checks and refused handshakes never
//! count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ws::handshake::Reject;

pub struct Admission {
    max: usize,
    /// Sockets of the WebSocket listeners (every accepted connection, from
    /// its accept until its slot is removed: handshakes, open, parked,
    /// closing) the server holds at most, and holds now. What is left of
    /// the open-files limit is kept back for the admin port and the
    /// process's own descriptors (`kept_back`), so a flood on the
    /// WebSocket port cannot take them.
    socket_max: usize,
    sockets: AtomicUsize,
    /// Admin connections the server holds at most, and holds now.
    admin_max: usize,
    admin_open: AtomicUsize,
    /// 0: no limit per address.
    max_per_ip: usize,
    open: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Handshakes one address may make per second; 0: no limit.
    handshakes_per_sec: u32,
    rates: Mutex<Rates>,
}

/// A token bucket per address that made a handshake lately (a second's
/// worth, refilled as time passes). An address idle for a second has a
/// full bucket, the same as none: once the map reaches `prune_at`
/// addresses, at most once a second, those are forgotten, so it holds at
/// most the addresses of about two seconds of handshakes beyond that.
struct Rates {
    by_ip: HashMap<IpAddr, (f64, Instant)>,
    prune_at: usize,
    pruned: Instant,
}

/// Addresses the handshake-rate map holds before it prunes.
const PRUNE_AT: usize = 65_536;

impl Admission {
    pub fn new(max: usize, max_per_ip: usize, handshakes_per_sec: u32) -> Admission {
        Admission::with_prune_at(max, max_per_ip, handshakes_per_sec, PRUNE_AT)
    }

    /// The caps and the rate `config` sets.
    pub fn from_config(config: &crate::config::Config) -> Admission {
        let admin = if config.admin_listen.is_some() {
            config.admin_max_connections
        } else {
            0
        };
        Admission {
            admin_max: config.admin_max_connections,
            socket_max: crate::config::open_files_limit()
                .saturating_sub(crate::config::kept_back(config.workers, admin))
                .max(1),
            ..Admission::new(
                config.max_connections,
                config.max_connections_per_ip,
                config.max_handshakes_per_sec_per_ip,
            )
        }
    }

    /// Takes a place for a socket the WebSocket port accepted; `false`
    /// when it holds its share of the open-files limit (the socket is then
    /// closed at once). Every `true` is matched by one `release_socket`.
    pub fn take_socket(&self) -> bool {
        self.sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.socket_max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Sockets the WebSocket ports may hold at once.
    pub fn socket_max(&self) -> usize {
        self.socket_max
    }

    pub fn release_socket(&self) {
        self.sockets.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes a place for an admin connection; `false` at the cap.
    pub fn open_admin(&self) -> bool {
        self.admin_open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.admin_max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives an admin connection's place back.
    pub fn close_admin(&self) {
        self.admin_open.fetch_sub(1, Ordering::AcqRel);
    }

    fn with_prune_at(max: usize, max_per_ip: usize, handshakes_per_sec: u32, prune_at: usize) -> Admission {
        Admission {
            max,
            socket_max: usize::MAX,
            sockets: AtomicUsize::new(0),
            admin_max: usize::MAX,
            admin_open: AtomicUsize::new(0),
            max_per_ip,
            open: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
            handshakes_per_sec,
            rates: Mutex::new(Rates {
                by_ip: HashMap::new(),
                prune_at,
                pruned: Instant::now(),
            }),
        }
    }

    /// Takes one handshake from `ip`'s bucket, or refuses it (429).
    pub fn handshake(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Reject> {
        let (Some(ip), true) = (ip, self.handshakes_per_sec > 0) else {
            return Ok(());
        };
        let rate = f64::from(self.handshakes_per_sec);
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        if rates.by_ip.len() >= rates.prune_at && now.duration_since(rates.pruned) >= Duration::from_secs(1) {
            rates
                .by_ip
                .retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(1));
            rates.pruned = now;
        }
        let (tokens, at) = rates.by_ip.entry(ip).or_insert((rate, now));
        *tokens = refill(*tokens, now.duration_since(*at).as_secs_f64(), rate);
        *at = now;
        if *tokens < 1.0 {
            return Err(Reject::TooManyHandshakes);
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// Addresses the handshake-rate map holds.
    pub fn rate_entries(&self) -> usize {
        self.rates.lock().map_or(0, |r| r.by_ip.len())
    }

    /// Counts one more connection from `ip`, unless a cap is reached.
    /// Every `Ok` must be matched by one `release` with the same address.
    pub fn admit(&self, ip: Option<IpAddr>) -> Result<(), Reject> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .map_err(|_| Reject::TooManyConnections)?;
        if let (Some(ip), true) = (ip, self.max_per_ip > 0) {
            let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
            let count = by_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                drop(by_ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Reject::TooManyFromAddress);
            }
            *count += 1;
        }
        Ok(())
    }

    /// Gives back what `admit` counted for `ip`.
    pub fn release(&self, ip: Option<IpAddr>) {
        if let (Some(ip), true) = (ip, self.max_per_ip > 0) {
            let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = by_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    // The map holds only addresses with open connections.
                    by_ip.remove(&ip);
                }
            }
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Connections admitted and not yet released, on every core.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Addresses with at least one connection (when a per-address cap is set).
    pub fn addresses(&self) -> usize {
        self.by_ip.lock().map_or(0, |m| m.len())
    }
}

/// A token bucket of one second's worth at `rate` a second, `seconds`
/// after it held `tokens`.
pub fn refill(tokens: f64, seconds: f64, rate: f64) -> f64 {
    (tokens + seconds * rate).min(rate)
}

/// Upstream connections (backend routes, hooks) take their sockets from
/// the WebSocket ports' share of the open files, as client sockets do.
impl crate::upstream::SocketBudget for Admission {
    fn take(&self) -> bool {
        self.take_socket()
    }

    fn release(&self) {
        self.release_socket();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_exact_and_release_gives_back() {
        let ip = |n: u8| Some(IpAddr::from([127, 0, 0, n]));
        let a = Admission::new(3, 2, 0);
        assert_eq!(a.admit(ip(1)), Ok(()));
        assert_eq!(a.admit(ip(1)), Ok(()));
        // The address's cap: refused, and the global count is not kept.
        assert_eq!(a.admit(ip(1)), Err(Reject::TooManyFromAddress));
        assert_eq!(a.open(), 2);
        assert_eq!(a.admit(ip(2)), Ok(()));
        // The global cap.
        assert_eq!(a.admit(ip(3)), Err(Reject::TooManyConnections));
        assert_eq!(a.admit(None), Err(Reject::TooManyConnections));
        a.release(ip(1));
        assert_eq!(a.admit(ip(3)), Ok(()));
        for n in [1, 2, 3] {
            a.release(ip(n));
        }
        assert_eq!((a.open(), a.addresses()), (0, 0));
        // No per-address cap: the map stays empty.
        let a = Admission::new(2, 0, 0);
        assert_eq!(a.admit(ip(1)), Ok(()));
        assert_eq!(a.admit(ip(1)), Ok(()));
        assert_eq!(a.admit(ip(1)), Err(Reject::TooManyConnections));
        assert_eq!(a.addresses(), 0);
    }

    #[test]
    fn handshake_rate_is_exact_per_address_and_its_map_is_pruned() {
        let ip = |n: u8| Some(IpAddr::from([127, 0, 0, n]));
        let a = Admission::with_prune_at(100, 0, 2, 3);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // A second's worth at once, then refused; others are not affected.
        assert_eq!(a.handshake(ip(1), at(0)), Ok(()));
        assert_eq!(a.handshake(ip(1), at(0)), Ok(()));
        assert_eq!(a.handshake(ip(1), at(0)), Err(Reject::TooManyHandshakes));
        assert_eq!(a.handshake(ip(2), at(0)), Ok(()));
        // 2 a second: one more after 500 ms, not after 499.
        assert_eq!(a.handshake(ip(1), at(499)), Err(Reject::TooManyHandshakes));
        assert_eq!(a.handshake(ip(1), at(500)), Ok(()));
        // Without an address (or a limit), nothing is counted.
        assert_eq!(a.handshake(None, at(500)), Ok(()));
        assert_eq!(Admission::new(1, 0, 0).handshake(ip(1), at(0)), Ok(()));
        // At 3 addresses the map prunes those idle for a second.
        assert_eq!(a.handshake(ip(3), at(600)), Ok(()));
        assert_eq!(a.rate_entries(), 3);
        assert_eq!(a.handshake(ip(4), at(1550)), Ok(()));
        // ip 1 (idle since 500 ms) and ip 2 (0 ms) went; ip 3 (600) stayed.
        assert_eq!(a.rate_entries(), 2);
        // Forgotten means a full bucket, as it would have been.
        assert_eq!(a.handshake(ip(1), at(1550)), Ok(()));
        assert_eq!(a.handshake(ip(1), at(1550)), Ok(()));
        assert_eq!(a.handshake(ip(1), at(1550)), Err(Reject::TooManyHandshakes));
    }
}
