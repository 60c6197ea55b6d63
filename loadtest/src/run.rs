//! Threads, runtimes and the figures they gather.
//!
//! Owns running a scenario on N threads (one monoio runtime each, no work
//! shared between them), the live counters the progress line reads, and
//! merging each thread's results. What a scenario does is `scenario`'s.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IsTerminal;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use crate::client::Failure;

/// Counters every thread bumps and the progress line reads.
#[derive(Default)]
pub struct Live {
    pub established: AtomicU64,
    pub failed: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub errors: AtomicU64,
    /// Set when the run is over, so every thread stops.
    pub stop: AtomicBool,
}

impl Live {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Latencies are recorded in microseconds, 1 µs to 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("static histogram bounds are valid")
}

type Local = std::thread::LocalKey<std::cell::RefCell<Histogram<u64>>>;

thread_local! {
    // One set of histograms per load thread: connections record into them
    // directly (a histogram per connection would cost tens of KB each).
    static LATENCY_US: std::cell::RefCell<Histogram<u64>> = std::cell::RefCell::new(histogram());
    static HANDSHAKE_US: std::cell::RefCell<Histogram<u64>> = std::cell::RefCell::new(histogram());
    static ARRIVAL_US: std::cell::RefCell<Histogram<u64>> = std::cell::RefCell::new(histogram());
    static LAG_US: std::cell::RefCell<Histogram<u64>> = std::cell::RefCell::new(histogram());
}

/// Records `n` equal times (microseconds, at least 1) on this thread's `local`.
fn record(local: &'static Local, us: u64, n: u64) {
    local.with(|h| {
        let _ = h.borrow_mut().record_n(us.max(1), n);
    });
}

/// Takes this thread's `local`, leaving an empty one.
fn take(local: &'static Local) -> Histogram<u64> {
    local.with(|h| std::mem::replace(&mut *h.borrow_mut(), histogram()))
}

/// Adds `other` into `into`.
fn add(into: &mut Histogram<u64>, other: &Histogram<u64>) {
    if !other.is_empty() {
        let _ = into.add(other);
    }
}

/// Records how late a publish left the harness after its intended time.
pub fn record_lag_us(us: u64) {
    record(&LAG_US, us, 1);
}

/// Records a send-to-arrival time (by the kernel's receive stamp).
pub fn record_arrival_us(us: u64) {
    record(&ARRIVAL_US, us, 1);
}

/// Records a latency on this thread's histogram.
pub fn record_latency_us(us: u64) {
    record(&LATENCY_US, us, 1);
}

/// Records `n` equal latencies at once.
pub fn record_latency_us_n(us: u64, n: u64) {
    record(&LATENCY_US, us, n);
}

/// Records a handshake time on this thread's histogram.
pub fn record_handshake_us(us: u64) {
    record(&HANDSHAKE_US, us, 1);
}

/// What one thread (or one of its connections) gathered. The histograms
/// are filled in once per thread, by `with_thread_histograms`.
pub struct ThreadResult {
    pub latency_us: Histogram<u64>,
    /// Fan-out: send to arrival in the subscriber's socket, by the kernel's
    /// receive stamps, so the harness's own delays are not in it.
    pub arrival_us: Histogram<u64>,
    /// Fan-out: how late publishes were written after their intended time
    /// (part of every latency above; the harness's own delay).
    pub lag_us: Histogram<u64>,
    pub handshake_us: Histogram<u64>,
    pub failures: BTreeMap<Failure, u64>,
    pub established: u64,
    /// Messages sent and received inside the measured window.
    pub sent: u64,
    pub received: u64,
    /// Fan-out: deliveries that arrived inside the measured window,
    /// whenever they were sent (the rate a subscriber sees under overload).
    pub arrived_in_window: u64,
    pub bytes_received: u64,
    pub out_of_order: u64,
    /// Fan-out: publishes sent per topic number.
    pub published: BTreeMap<usize, u64>,
    pub clean_closes: u64,
    /// Problems other than connect failures (server closed mid-run, violations).
    pub errors: u64,
    pub first_errors: Vec<String>,
}

/// An empty histogram that allocates next to nothing (auto-resizing).
fn empty_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is valid")
}

impl Default for ThreadResult {
    fn default() -> ThreadResult {
        ThreadResult {
            latency_us: empty_histogram(),
            arrival_us: empty_histogram(),
            lag_us: empty_histogram(),
            handshake_us: empty_histogram(),
            failures: BTreeMap::new(),
            established: 0,
            sent: 0,
            received: 0,
            arrived_in_window: 0,
            bytes_received: 0,
            out_of_order: 0,
            published: BTreeMap::new(),
            clean_closes: 0,
            errors: 0,
            first_errors: Vec::new(),
        }
    }
}

/// Error messages kept verbatim per thread; the rest are only counted.
const KEPT_ERRORS: usize = 5;

impl ThreadResult {
    pub fn error(&mut self, live: &Live, message: String) {
        self.errors += 1;
        Live::add(&live.errors, 1);
        if self.first_errors.len() < KEPT_ERRORS {
            self.first_errors.push(message);
        }
    }

    /// Takes this thread's histograms into the result.
    pub fn with_thread_histograms(mut self) -> ThreadResult {
        self.latency_us = take(&LATENCY_US);
        self.handshake_us = take(&HANDSHAKE_US);
        self.arrival_us = take(&ARRIVAL_US);
        self.lag_us = take(&LAG_US);
        self
    }

    pub fn merge(&mut self, other: ThreadResult) {
        add(&mut self.latency_us, &other.latency_us);
        add(&mut self.handshake_us, &other.handshake_us);
        add(&mut self.arrival_us, &other.arrival_us);
        add(&mut self.lag_us, &other.lag_us);
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
        self.established += other.established;
        self.sent += other.sent;
        self.received += other.received;
        self.bytes_received += other.bytes_received;
        self.arrived_in_window += other.arrived_in_window;
        self.out_of_order += other.out_of_order;
        for (k, v) in other.published {
            *self.published.entry(k).or_default() += v;
        }
        self.clean_closes += other.clean_closes;
        self.errors += other.errors;
        for e in other.first_errors {
            if self.first_errors.len() < KEPT_ERRORS {
                self.first_errors.push(e);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    Auto,
    Uring,
    Epoll,
}

/// A scenario's body for thread `index`; built on that thread.
pub type ThreadBody = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = ThreadResult>>> + Send + Sync>;

/// Runs `body` on `threads` threads and merges what they gathered. The
/// progress line runs on the calling thread until every thread is done.
pub fn run_threads(threads: usize, driver: Driver, live: Arc<Live>, body: ThreadBody) -> Result<ThreadResult, String> {
    let mut handles = Vec::new();
    for index in 0..threads {
        let body = body.clone();
        let handle = std::thread::Builder::new()
            .name(format!("load-{index}"))
            .spawn(move || -> Result<ThreadResult, String> {
                let use_uring = match driver {
                    Driver::Uring => true,
                    Driver::Epoll => false,
                    Driver::Auto => monoio::utils::detect_uring(),
                };
                if use_uring {
                    let mut rt = RuntimeBuilder::<IoUringDriver>::new()
                        .with_entries(4096)
                        .enable_timer()
                        .build()
                        .map_err(|e| format!("io_uring runtime: {e}"))?;
                    Ok(rt.block_on(body(index)).with_thread_histograms())
                } else {
                    let mut rt = RuntimeBuilder::<LegacyDriver>::new()
                        .enable_timer()
                        .build()
                        .map_err(|e| format!("epoll runtime: {e}"))?;
                    Ok(rt.block_on(body(index)).with_thread_histograms())
                }
            })
            .map_err(|e| format!("cannot start thread: {e}"))?;
        handles.push(handle);
    }
    progress(&live, &handles);
    let mut total = ThreadResult::default();
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => total.merge(r),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a load thread panicked".into()),
        }
    }
    Ok(total)
}

/// Live progress: a spinner line on a terminal, a plain line a second otherwise.
fn progress<T>(live: &Live, handles: &[std::thread::JoinHandle<T>]) {
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("static template"));
        bar
    });
    let start = Instant::now();
    let mut last = (start, 0u64);
    let mut last_plain = start;
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        let received = live.received.load(Ordering::Relaxed);
        let rate = (received - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-9);
        last = (now, received);
        let line = format!(
            "conns {} failed {} | recv {} ({:.0}/s) | errors {}",
            live.established.load(Ordering::Relaxed),
            live.failed.load(Ordering::Relaxed),
            received,
            rate,
            live.errors.load(Ordering::Relaxed)
        );
        match &bar {
            Some(bar) => {
                bar.set_message(line);
                bar.tick();
            }
            None if now.duration_since(last_plain) >= Duration::from_secs(1) => {
                eprintln!("[{:>5.1}s] {line}", now.duration_since(start).as_secs_f64());
                last_plain = now;
            }
            None => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// A per-thread start line: every connection of the thread waits here until
/// all have connected (or failed), so measuring starts together, and a
/// busy-polling thread starts spinning only once every connect is done
/// (while it spins, no other task of the thread runs).
pub struct Gate {
    waiting_for: std::cell::Cell<usize>,
    waiters: std::cell::RefCell<Vec<std::task::Waker>>,
}

impl Gate {
    pub fn new(connections: usize) -> std::rc::Rc<Gate> {
        std::rc::Rc::new(Gate {
            waiting_for: std::cell::Cell::new(connections),
            waiters: std::cell::RefCell::new(Vec::with_capacity(connections)),
        })
    }

    /// Marks one connection as settled, then waits for the rest.
    pub async fn arrive(&self) {
        let left = self.waiting_for.get().saturating_sub(1);
        self.waiting_for.set(left);
        if left == 0 {
            for w in self.waiters.borrow_mut().drain(..) {
                w.wake();
            }
            return;
        }
        let mut registered = false;
        std::future::poll_fn(|cx| {
            if self.waiting_for.get() == 0 {
                return std::task::Poll::Ready(());
            }
            if !registered {
                self.waiters.borrow_mut().push(cx.waker().clone());
                registered = true;
            }
            std::task::Poll::Pending
        })
        .await
    }
}
