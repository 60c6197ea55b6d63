//! Giving freed memory back to the OS.
//!
//! The allocator keeps the pages it freed, to use them again. A burst of
//! connections that then go quiet (each one's task ends as it parks) would
//! leave the process at its peak resident size for as long as it runs,
//! though all that stays per connection is its slot. So each core's sweep
//! asks the allocator to hand back what it holds unused once many tasks
//! have ended since the last peak (`Reclaim`): mimalloc frees the thread's
//! empty pages and purges the free memory of its arenas (process-wide, so
//! what other cores freed goes too, and they fault it in again if they
//! need it). A collect stalls its core for 0.1-1.0 ms (15,000 sessions on
//! it); a load whose live tasks swing by `RECLAIM_AFTER_TASKS` every second
//! pays that once a second. A drop smaller than that since the last
//! collect is kept (about 1 MiB a core at most).

/// How many tasks must have ended since the peak (each held about 1 KiB:
/// the connection future and monoio's task around it) before a collect.
pub const RECLAIM_AFTER_TASKS: usize = 1024;
/// A core collects at most this often.
pub const RECLAIM_EVERY_MS: u64 = 1_000;

/// When a core gives its freed memory back: see the module docs.
#[derive(Debug, Default)]
pub struct Reclaim {
    /// The most tasks alive since the last collect.
    peak: usize,
    last_ms: Option<u64>,
}

impl Reclaim {
    /// Called once per sweep with the tasks alive now (sessions less the
    /// parked ones) and the core's clock; collects when enough have ended.
    /// Returns whether it did.
    pub fn after_tick(&mut self, live: usize, now_ms: u64) -> bool {
        self.peak = self.peak.max(live);
        if self.peak - live < RECLAIM_AFTER_TASKS {
            return false;
        }
        if self
            .last_ms
            .is_some_and(|last| now_ms < last.saturating_add(RECLAIM_EVERY_MS))
        {
            return false;
        }
        give_back();
        self.peak = live;
        self.last_ms = Some(now_ms);
        true
    }
}

/// Hands the allocator's free memory back to the OS (see the module docs).
pub fn give_back() {
    // SAFETY: `mi_collect` takes no pointers: it frees the calling thread's
    // empty pages and purges free memory it holds.
    #[cfg(feature = "mimalloc")]
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
    // SAFETY: `malloc_trim` takes no pointers: it returns the free memory
    // of glibc's heaps (every arena's, each locked in turn) to the OS.
    #[cfg(all(not(feature = "mimalloc"), target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_only_after_enough_tasks_ended_and_at_most_once_a_second() {
        let mut r = Reclaim::default();
        assert!(!r.after_tick(5_000, 0));
        // One short of the threshold below the peak.
        assert!(!r.after_tick(5_000 - RECLAIM_AFTER_TASKS + 1, 100));
        assert!(r.after_tick(5_000 - RECLAIM_AFTER_TASKS, 200));
        // The peak restarts from there: a further drop of the threshold,
        // but within a second of the last collect, waits.
        assert!(!r.after_tick(5_000 - 2 * RECLAIM_AFTER_TASKS, 200 + RECLAIM_EVERY_MS - 1));
        assert!(r.after_tick(5_000 - 2 * RECLAIM_AFTER_TASKS, 200 + RECLAIM_EVERY_MS));
        // Tasks that come and go in step never trigger one.
        for t in 0..100 {
            assert!(!r.after_tick(5_000 - 2 * RECLAIM_AFTER_TASKS + t % 7, 10_000 + t as u64 * 100));
        }
    }

    #[test]
    fn giving_back_keeps_live_memory_intact() {
        let keep: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 4096]).collect();
        drop((0..4096).map(|_| vec![0u8; 1024]).collect::<Vec<_>>());
        give_back();
        for (i, v) in keep.iter().enumerate() {
            assert!(v.iter().all(|&b| b == i as u8));
        }
    }
}
