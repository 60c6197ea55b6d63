//! The ordered shutdown of every core, which SIGTERM and SIGINT start.
//!
//! A publish that a client was told about (a STOMP RECEIPT, an admin 200)
//! must reach every subscriber still connected, whichever core it is on.
//! Cores learn of the signal at once (each has a bell, an eventfd), and
//! then go through the same steps, with one barrier between them:
//!
//! 1. Stop taking input (`Shard::stop_taking_input`): no accept, no admin
//!    request, no session input acted on; handshakes get 503.
//! 2. Wait until nothing accepted here still waits for ring space (a
//!    session's publish, an admin publish, an ended session's publish).
//!    Then say so (`quiet`), and ring every bell.
//! 3. Wait until every core has said so: no core will put a publish into
//!    a ring any more.
//! 4. Take everything left in this core's inbound rings: every publish
//!    accepted anywhere is now queued for this core's subscribers.
//! 5. Close every session (`Shard::close_all`): its deliveries go out
//!    first, then 1001.
//!
//! Steps 2-4 end at the drain deadline (`--drain-timeout-ms` after the
//! signal) even if a core never gets there, so the shutdown is bounded;
//! the sessions then get 1001 at once, and the drain ends at the same
//! deadline.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::conn::shard::Shard;
use crate::sys::eventfd::EventFd;

/// How often a core looks again while it waits in steps 2 and 3 (the bell
/// also wakes it when another core gets there).
const RECHECK: Duration = Duration::from_millis(1);

/// What the cores share about the shutdown.
pub struct Shutdown {
    begun: AtomicBool,
    /// Cores that finished step 2, or that never ran (a worker that failed
    /// to start, or ended): `said` keeps each from counting twice.
    quiet: AtomicUsize,
    said: Vec<AtomicBool>,
    /// One per core.
    bells: Vec<EventFd>,
}

impl Shutdown {
    pub fn new(cores: usize) -> std::io::Result<Shutdown> {
        Ok(Shutdown {
            begun: AtomicBool::new(false),
            quiet: AtomicUsize::new(0),
            said: (0..cores).map(|_| AtomicBool::new(false)).collect(),
            bells: (0..cores).map(|_| EventFd::new()).collect::<std::io::Result<_>>()?,
        })
    }

    /// Starts the shutdown on every core at once.
    pub fn begin(&self) {
        self.begun.store(true, Ordering::SeqCst);
        self.ring_all();
    }

    /// Core `core` will put no publish into a ring any more (it is quiet,
    /// or its worker has ended or never ran). Counted once per core.
    pub fn say_quiet(&self, core: usize) {
        if !self.said[core].swap(true, Ordering::SeqCst) {
            self.quiet.fetch_add(1, Ordering::SeqCst);
            self.ring_all();
        }
    }

    pub fn is_begun(&self) -> bool {
        self.begun.load(Ordering::SeqCst)
    }

    fn ring_all(&self) {
        for bell in &self.bells {
            bell.signal();
        }
    }

    /// Waits for the shutdown to begin (core `core`'s bell).
    pub async fn begun(&self, core: usize) {
        let bell = match self.bells[core].waiter() {
            Ok(bell) => Some(bell),
            Err(e) => {
                tracing::warn!(core, error = %e, "shutdown bell unavailable: looking every 10 ms");
                None
            }
        };
        while !self.is_begun() {
            match &bell {
                Some(bell) => {
                    let _ = bell.readable(false).await;
                    self.bells[core].clear();
                }
                None => monoio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Steps 1 to 5 for this core (see the module comment); returns the
    /// deadline by which its sessions must have ended.
    pub async fn run(&self, shard: &Rc<Shard>) -> Instant {
        let deadline = Instant::now() + Duration::from_millis(shard.config.drain_timeout_ms);
        let cores = self.bells.len();
        shard.stop_taking_input();
        let quiet = wait_until(deadline, || shard.publishes_in_flight() == 0).await;
        if quiet {
            self.say_quiet(shard.core);
        }
        let all_quiet = quiet && wait_until(deadline, || self.quiet.load(Ordering::SeqCst) == cores).await;
        // Once every core is quiet, no publish enters a ring any more: this
        // takes the last of them. At the deadline it takes what is there.
        // (Other envelopes that come, interest and replies, are few.)
        let hub = &shard.hub;
        while hub
            .mesh
            .drain(|envelope| super::take_envelope(shard, envelope), || false)
            > 0
        {}
        if !all_quiet && shard.config.drain_timeout_ms > 0 {
            tracing::warn!(
                core = shard.core,
                in_flight = shard.publishes_in_flight(),
                "drain deadline: closing sessions before every core's publishes were in"
            );
        }
        shard.close_all();
        deadline
    }
}

/// Waits (looking every `RECHECK`) until `done` or the deadline; `false`
/// at the deadline.
async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        monoio::time::sleep(RECHECK.min(deadline - now)).await;
    }
}
