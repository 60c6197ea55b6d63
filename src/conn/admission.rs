//! Admission: how many upgraded connections the whole server holds, and
//! how many from one address. Shared by every core; decided when a
//! handshake would succeed, so refused clients get a 503 with
//! `Retry-After` instead of a silent drop, and health checks and refused
//! handshakes never count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::ws::handshake::Reject;

pub struct Admission {
    max: usize,
    /// 0: no limit per address.
    max_per_ip: usize,
    open: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Admission {
    pub fn new(max: usize, max_per_ip: usize) -> Admission {
        Admission {
            max,
            max_per_ip,
            open: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        }
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
                if *count == 0 {
                    by_ip.remove(&ip);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_exact_and_release_gives_back() {
        let ip = |n: u8| Some(IpAddr::from([127, 0, 0, n]));
        let a = Admission::new(3, 2);
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
        let a = Admission::new(2, 0);
        assert_eq!(a.admit(ip(1)), Ok(()));
        assert_eq!(a.admit(ip(1)), Ok(()));
        assert_eq!(a.admit(ip(1)), Err(Reject::TooManyConnections));
        assert_eq!(a.addresses(), 0);
    }
}
