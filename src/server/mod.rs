//! The process: listeners, one pinned worker per core, signals, drain.
//!
//! Owns the threads and their runtimes; a worker's only job is to accept on
//! its own listener and run its shard's sweep, every connection being a task
//! on that worker (`conn::serve`). Platform facts, where they are used:
//! - SO_REUSEPORT gives each worker its own accept queue; the kernel spreads
//!   new connections across them.
//! - monoio's epoll driver needs non-blocking listeners; io_uring accepts on
//!   them too, so they are made non-blocking for both.
//! - `auto` is epoll: measured side by side, it answers more messages per
//!   second than io_uring in every echo shape and spends less CPU per
//!   message at a fixed rate (docs/ARCHITECTURE.md, "Process"). `uring`
//!   builds the ring or refuses to start (memlock limits, seccomp, an old
//!   kernel).

mod listen;
pub mod shutdown;

use std::fmt;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::task::Poll;
use std::time::{Duration, Instant};

use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use crate::config::{Config, DriverChoice};
use crate::conn::shard::{Shard, Stats};
use crate::sys::eventfd::EventFd;
pub use listen::bind_listeners;
pub use shutdown::Shutdown;

/// io_uring submission queue entries per worker.
const URING_ENTRIES: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    IoUring,
    Epoll,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::IoUring => "io_uring",
            DriverKind::Epoll => "epoll",
        })
    }
}

#[derive(Debug)]
pub enum ServerError {
    /// The listen address could not be bound.
    Bind {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    /// `--driver uring` and the kernel refused io_uring.
    UringRefused(std::io::Error),
    /// A worker could not start.
    Worker {
        core: usize,
        error: String,
    },
    Signals(std::io::Error),
    /// The NATS bridge could not start (options the client refused).
    Cluster(String),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind { addr, error } if error.kind() == std::io::ErrorKind::AddrInUse => {
                write!(f, "cannot listen on {addr}: the address is in use by another process")
            }
            ServerError::Bind { addr, error } => write!(f, "cannot listen on {addr}: {error}"),
            ServerError::UringRefused(e) => write!(
                f,
                "--driver uring: the kernel refused io_uring ({e}); it may be disabled \
                 (kernel.io_uring_disabled), blocked by seccomp, or too old. Use --driver auto or epoll"
            ),
            ServerError::Worker { core, error } => write!(f, "worker {core} failed to start: {error}"),
            ServerError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            ServerError::Cluster(e) => write!(f, "cluster: {e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// A started server: its address and driver, and the handle that stops it.
pub struct Server {
    pub local_addr: std::net::SocketAddr,
    /// The admin port's address, if it has one.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// The `wss://` listener's address, if there is one.
    pub tls_addr: Option<std::net::SocketAddr>,
    /// Its certificate, which `reload_certificate` replaces.
    cert: Option<Arc<crate::tls::CertResolver>>,
    pub driver: DriverKind,
    shutdown: Arc<Shutdown>,
    workers: std::sync::Mutex<Vec<std::thread::JoinHandle<Stats>>>,
    /// The NATS bridge, stopped once the workers are done, and its state.
    bridge: std::sync::Mutex<Option<crate::cluster::Bridge>>,
    bus: Option<Arc<crate::stats::Bus>>,
}

impl Server {
    /// Binds the listeners and starts every worker; returns once all serve.
    pub fn start(config: Config) -> Result<Server, ServerError> {
        let config = Arc::new(config);
        let (listeners, local_addr) = bind_listeners(config.listen, config.workers)?;
        let (tls_listeners, tls_addr, tls, cert) = match &config.tls {
            Some((addr, files)) => {
                let fail = |error: String| ServerError::Worker { core: 0, error };
                let resolver = Arc::new(crate::tls::CertResolver::new(files.clone()).map_err(fail)?);
                let tls = crate::tls::server_config(resolver.clone()).map_err(fail)?;
                let (listeners, bound) = bind_listeners(*addr, config.workers)?;
                (
                    listeners.into_iter().map(Some).collect(),
                    Some(bound),
                    Some(tls),
                    Some(resolver),
                )
            }
            None => ((0..config.workers).map(|_| None).collect::<Vec<_>>(), None, None, None),
        };
        let (admin_listeners, admin_addr) = match config.admin_listen {
            Some(addr) => {
                let (listeners, bound) = bind_listeners(addr, config.workers)?;
                (listeners.into_iter().map(Some).collect(), Some(bound))
            }
            None => ((0..config.workers).map(|_| None).collect::<Vec<_>>(), None),
        };
        let bus = config
            .cluster
            .as_ref()
            .map(|c| Arc::new(crate::stats::Bus::new(c.node_id.clone())));
        let metrics = Arc::new(crate::admin::Metrics::new(config.workers, bus.clone()));
        let admission = Arc::new(crate::conn::admission::Admission::from_config(&config));
        if admission.socket_max() < config.max_connections {
            tracing::warn!(
                sockets = admission.socket_max(),
                max_connections = config.max_connections,
                open_files = crate::config::open_files_limit(),
                "the open-files limit leaves the WebSocket ports fewer sockets than --max-connections"
            );
        }
        let mut meshes =
            crate::pubsub::mesh::build(config.workers, config.mesh_ring_capacity, bus.clone()).map_err(|e| {
                ServerError::Worker {
                    core: 0,
                    error: format!("cannot build the mesh: {e}"),
                }
            })?;
        // The NATS bridge is the mesh's last member; it connects in the
        // background, so the node starts while NATS is down.
        let bridge = match &config.cluster {
            Some(cluster) => {
                let mesh = meshes.pop().expect("the mesh has the bridge's member");
                Some(
                    crate::cluster::Bridge::start(mesh, cluster.clone(), config.limits.max_message_bytes)
                        .map_err(ServerError::Cluster)?,
                )
            }
            None => None,
        };
        let cpus = core_affinity::get_core_ids().unwrap_or_default();
        let shutdown = Arc::new(Shutdown::new(config.workers).map_err(|e| ServerError::Worker {
            core: 0,
            error: format!("cannot make the shutdown bells: {e}"),
        })?);
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut workers = Vec::with_capacity(config.workers);
        let per_worker = listeners
            .into_iter()
            .zip(tls_listeners)
            .zip(admin_listeners)
            .zip(meshes);
        for (index, (((listener, tls_listener), admin), mesh)) in per_worker.enumerate() {
            let shared = Shared {
                config: config.clone(),
                tls: tls.clone(),
                metrics: metrics.clone(),
                admission: admission.clone(),
                shutdown: shutdown.clone(),
            };
            let cpu = (!cpus.is_empty()).then(|| cpus[index % cpus.len()]);
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("sluice-w{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        core_affinity::set_for_current(cpu);
                    }
                    let listeners = Listeners {
                        ws: listener,
                        tls: tls_listener,
                        admin,
                    };
                    run_worker(index, listeners, mesh, shared, ready)
                })
                .map_err(|e| ServerError::Worker {
                    core: index,
                    error: e.to_string(),
                })?;
            workers.push(handle);
        }
        drop(ready_tx);
        let mut driver = None;
        let mut failure = None;
        for _ in 0..workers.len() {
            match ready_rx.recv() {
                Ok(Ok(kind)) => driver = Some(kind),
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => {
                    failure = failure.or(Some(ServerError::Worker {
                        core: 0,
                        error: "exited early".into(),
                    }))
                }
            }
        }
        let server = Server {
            local_addr,
            tls_addr,
            cert,
            admin_addr,
            driver: driver.unwrap_or(DriverKind::Epoll),
            shutdown,
            workers: std::sync::Mutex::new(workers),
            bridge: std::sync::Mutex::new(bridge),
            bus,
        };
        if let Some(e) = failure {
            server.shutdown.begin();
            server.join();
            return Err(e);
        }
        Ok(server)
    }

    /// Loads the TLS certificate and key files again: new handshakes get
    /// them, open connections keep theirs. On an error the old ones stay.
    pub fn reload_certificate(&self) -> Result<(), String> {
        match &self.cert {
            Some(cert) => cert.reload(),
            None => Ok(()),
        }
    }

    /// What stops every worker, in order (`Shutdown::begin`): no more
    /// input, every accepted publish delivered, 1001 to every session, drain.
    pub fn shutdown_handle(&self) -> Arc<Shutdown> {
        self.shutdown.clone()
    }

    /// Starts the ordered shutdown; in a cluster, the NATS bridge first
    /// stops feeding the cores and leaves the node's queues to the others.
    pub fn begin_shutdown(&self) {
        if let Some(bus) = &self.bus {
            bus.closing.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.shutdown.begin();
    }

    /// Waits for every worker to finish; returns their counters summed.
    pub fn join(self) -> Stats {
        let stats = join(self.take_workers());
        self.stop_bridge();
        stats
    }

    /// Stops the NATS bridge (after the workers: what they published on
    /// their way out goes to the bus first).
    fn stop_bridge(&self) {
        let bridge = self.bridge.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(bridge) = bridge {
            bridge.stop();
        }
    }

    fn take_workers(&self) -> Vec<std::thread::JoinHandle<Stats>> {
        std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn join(workers: Vec<std::thread::JoinHandle<Stats>>) -> Stats {
    let mut total = Stats::default();
    for w in workers {
        if let Ok(stats) = w.join() {
            total.merge(&stats);
        }
    }
    total
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
/// A second signal during the drain exits at once.
pub fn run(config: Config) -> Result<Stats, ServerError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    // Install the handlers before any worker starts, so an early signal drains too.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(ServerError::Signals)?;
    let workers = config.workers;
    // What each route speaks, as the start log lists it.
    let lower = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
    let routes: Vec<_> = config
        .routes
        .iter()
        .map(|r| {
            let deflate = r.deflate.map_or_else(|| "off".to_string(), |m| lower(&m));
            (r.path.clone(), lower(&r.protocol), lower(&r.auth), deflate)
        })
        .collect();
    let server = Server::start(config)?;
    // "listening on" last: whoever waits for it finds the rest said.
    for (path, protocol, auth, deflate) in routes {
        tracing::info!(%protocol, %auth, %deflate, "route {path}");
    }
    if let Some(admin) = server.admin_addr {
        tracing::info!("admin API on {admin} (web console: http://{admin}/)");
    }
    if let Some(tls) = server.tls_addr {
        tracing::info!("wss:// on {tls}");
    }
    tracing::info!(driver = %server.driver, workers, "listening on {}", server.local_addr);
    let signal_handle = signals.handle();
    let server = Arc::new(server);
    let for_signals = server.clone();
    let watcher = std::thread::spawn(move || {
        let mut seen = 0;
        for signal in signals.forever() {
            if signal == SIGHUP {
                if for_signals.tls_addr.is_none() {
                    tracing::info!("SIGHUP: no TLS listener, nothing to reload");
                    continue;
                }
                match for_signals.reload_certificate() {
                    Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                    Err(e) => tracing::error!("SIGHUP: certificate not reloaded, the old one stays: {e}"),
                }
                continue;
            }
            seen += 1;
            if seen == 1 {
                tracing::info!(signal, "shutting down: closing sessions with 1001");
                for_signals.begin_shutdown();
            } else {
                tracing::warn!(signal, "second signal: exiting without draining");
                std::process::exit(1);
            }
        }
    });
    let workers = server.take_workers();
    let stats = join(workers);
    server.stop_bridge();
    signal_handle.close();
    let _ = watcher.join();
    Ok(stats)
}

type Ready = mpsc::Sender<Result<DriverKind, ServerError>>;

/// Says a worker is quiet (`Shutdown::say_quiet`) when it ends.
struct QuietAtExit(Arc<Shutdown>, usize);

impl Drop for QuietAtExit {
    fn drop(&mut self) {
        self.0.say_quiet(self.1);
    }
}

/// A worker's listening sockets.
struct Listeners {
    ws: std::net::TcpListener,
    tls: Option<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
}

/// What every worker shares with the others.
struct Shared {
    config: Arc<Config>,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: Arc<crate::admin::Metrics>,
    admission: Arc<crate::conn::admission::Admission>,
    shutdown: Arc<Shutdown>,
}

/// The ring of a worker: made for one thread per ring (Linux 6.0+).
/// `SINGLE_ISSUER`: only this worker submits. `COOP_TASKRUN`: the kernel
/// finishes completions when the worker next enters it rather than
/// interrupting the thread. (`DEFER_TASKRUN` took 4% off the CPU at a
/// fixed rate, within the run's noise, but it defers completions to
/// `io_uring_enter` calls that ask for events, and monoio's submission
/// between two batches of tasks does not: the flusher's yield to the
/// core's I/O would let none in. See docs/ARCHITECTURE.md.) A kernel that
/// refuses the flags gets a ring without them.
fn uring_runtime() -> std::io::Result<monoio::Runtime<monoio::time::TimeDriver<IoUringDriver>>> {
    let mut tuned = io_uring::IoUring::builder();
    tuned.setup_single_issuer().setup_coop_taskrun();
    let build = |setup: io_uring::Builder| {
        RuntimeBuilder::<IoUringDriver>::new()
            .uring_builder(setup)
            .with_entries(URING_ENTRIES)
            .enable_timer()
            .build()
    };
    build(tuned).or_else(|e| {
        tracing::debug!(error = %e, "io_uring refused SINGLE_ISSUER and COOP_TASKRUN; a ring without them");
        build(io_uring::IoUring::builder())
    })
}

fn run_worker(
    index: usize,
    listeners: Listeners,
    mesh: crate::pubsub::mesh::CoreMesh,
    shared: Shared,
    ready: Ready,
) -> Stats {
    let Shared {
        config,
        tls,
        metrics,
        admission,
        shutdown,
    } = shared;
    // However this worker ends, even before it ran, the other cores'
    // shutdown does not wait for it.
    let _quiet_at_exit = QuietAtExit(shutdown.clone(), index);
    let uring = uring_runtime;
    let epoll = || RuntimeBuilder::<LegacyDriver>::new().enable_timer().build();
    let fail = |error: std::io::Error| ServerError::Worker {
        core: index,
        error: error.to_string(),
    };
    let shard = match Shard::new(config.clone(), mesh, admission, tls) {
        Ok(shard) => shard,
        Err(e) => {
            let _ = ready.send(Err(fail(e)));
            return Stats::default();
        }
    };
    let work = worker(listeners, shard.clone(), metrics, shutdown, ready.clone());
    match config.driver {
        DriverChoice::Uring => match uring() {
            Ok(mut rt) => rt.block_on(work(DriverKind::IoUring)),
            Err(e) => {
                let _ = ready.send(Err(ServerError::UringRefused(e)));
                return Stats::default();
            }
        },
        DriverChoice::Auto | DriverChoice::Epoll => match epoll() {
            Ok(mut rt) => rt.block_on(work(DriverKind::Epoll)),
            Err(e) => {
                let _ = ready.send(Err(fail(e)));
                return Stats::default();
            }
        },
    }
    let stats = shard.stats.borrow().clone();
    stats
}

/// The worker's life on its runtime: accept until shutdown, then drain.
fn worker(
    listeners: Listeners,
    shard: Rc<Shard>,
    metrics: Arc<crate::admin::Metrics>,
    shutdown: Arc<Shutdown>,
    ready: Ready,
) -> impl FnOnce(DriverKind) -> std::pin::Pin<Box<dyn Future<Output = ()>>> {
    move |driver| {
        Box::pin(async move {
            let admin = listeners.admin.map(monoio::net::TcpListener::from_std).transpose();
            let tls = listeners.tls.map(monoio::net::TcpListener::from_std).transpose();
            let listener = match monoio::net::TcpListener::from_std(listeners.ws).and_then(|l| Ok((l, admin?, tls?))) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready.send(Err(ServerError::Worker {
                        core: shard.core,
                        error: e.to_string(),
                    }));
                    return;
                }
            };
            if driver == DriverKind::IoUring {
                start_recv_ring(&shard);
            }
            let _ = ready.send(Ok(driver));
            drop(ready);
            let (listener, admin, tls) = listener;
            let shard_for_life = shard.clone();
            let metrics_for_admin = metrics.clone();
            let life = async move {
                // Each accept loop ends once shutdown begins (the signal
                // makes the shard stop taking input); the admin one never ends.
                let plain = accept_until_shutdown(&listener, &shard_for_life, false);
                let secure = async {
                    if let Some(tls) = &tls {
                        accept_until_shutdown(tls, &shard_for_life, true).await;
                    }
                };
                let signal = async {
                    shutdown.begun(shard_for_life.core).await;
                    shard_for_life.stop_taking_input();
                };
                let admin_loop = async {
                    match &admin {
                        Some(admin) => accept_admin(admin, &shard_for_life, &metrics_for_admin).await,
                        None => std::future::pending().await,
                    }
                };
                monoio::select! {
                    _ = async { monoio::join!(plain, secure, signal) } => {}
                    _ = admin_loop => {}
                }
                // Stop accepting: connections still queued on these listeners are reset.
                drop(listener);
                drop(tls);
                drop(admin);
                let deadline = shutdown.run(&shard_for_life).await;
                drain(&shard_for_life, deadline).await;
                // Upstream requests still under way (a session's last
                // events, hook calls) end now, and idle upstream
                // connections close, on the runtime: their tasks must run
                // to their end, or what they hold (the shard among it)
                // would outlive the runtime, never dropped. Bounded.
                shard_for_life.upstream.stop();
                for _ in 0..200 {
                    if shard_for_life.upstream.active() == 0 {
                        break;
                    }
                    monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                // One more turn: connections' tasks woken by their closed
                // handles end.
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            };
            // The sweep runs inside this future rather than as its own task:
            // monoio does not drop unfinished tasks with the runtime.
            monoio::select! {
                _ = life => {}
                _ = sweep(shard.clone(), metrics, driver) => {}
                _ = resume_parked(shard.clone()) => {}
                _ = mesh_loop(shard.clone()) => {}
                _ = flush_loop(shard.clone()) => {}
            }
        })
    }
}

/// Under io_uring: the core's receives (`sys::ring`), which its open
/// sessions then read through. Where the kernel has no buffer rings,
/// sessions read on readiness instead.
fn start_recv_ring(shard: &Shard) {
    match crate::sys::ring::RecvRing::new() {
        Ok(ring) => {
            let _ = shard.recv_ring.set(ring);
        }
        Err(e) => tracing::warn!(core = shard.core, error = %e, "no receive ring: sessions read on readiness"),
    }
}

/// Starts a task again for each parked session whose socket is ready.
/// Parking is enabled only once this runs; if it cannot, nothing parks.
async fn resume_parked(shard: Rc<Shard>) {
    let waiter = match shard.lot().waiter() {
        Ok(waiter) => waiter,
        Err(e) => {
            tracing::warn!(core = shard.core, error = %e, "parking lot unavailable: quiet connections keep their tasks");
            return std::future::pending().await;
        }
    };
    shard.enable_parking();
    let mut tokens = Vec::new();
    loop {
        let ready = waiter.readable(false).await;
        if shard.takes_no_input() {
            // Shutting down: input is not acted on, so a parked session
            // stays parked until its shutdown kick gives it a task.
            return std::future::pending().await;
        }
        // poll(2) under the epoll driver: a signal to this thread ends it
        // early (EINTR), which is no failure.
        let ready = match ready {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            other => other,
        };
        if let Err(e) = ready.and_then(|()| shard.resume_ready(&mut tokens)) {
            // Not expected from an epoll set; back off rather than spin.
            tracing::warn!(core = shard.core, error = %e, "parking lot wait failed");
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Takes what other cores send this one, until all rings are empty, then
/// sleeps on the core's doorbell. Never waits for ring space itself, which
/// is what keeps the mesh free of deadlock (docs/ARCHITECTURE.md).
///
/// Over its budget, the core takes no more publishes from the rings:
/// their producers wait for space like any publisher. It still sends what
/// its outboxes hold and wakes its tasks waiting for ring space whenever
/// a consumer rings it for that, so a hold delays neither.
async fn mesh_loop(shard: Rc<Shard>) {
    let hub = &shard.hub;
    if hub.mesh.cores() == 1 {
        return std::future::pending().await;
    }
    let doorbell = match hub.mesh.doorbell_waiter() {
        Ok(d) => d,
        Err(e) => {
            // Without a doorbell, poll the rings on a short timer instead.
            tracing::warn!(core = shard.core, error = %e, "mesh doorbell unavailable: polling every millisecond");
            loop {
                if !shard.hub.sessions.holds_publishers() {
                    hub.mesh.drain(
                        |envelope| take_envelope(&shard, envelope),
                        || shard.hub.sessions.holds_publishers(),
                    );
                }
                hub.flush_outboxes();
                hub.mesh.wake_space_waiters();
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    loop {
        if shard.hub.sessions.holds_publishers() {
            hub.flush_outboxes();
            hub.mesh.wake_space_waiters();
            // Not armed: producers do not ring for their publishes, only a
            // consumer that made room (a forced ring) does.
            monoio::select! {
                _ = std::future::poll_fn(|cx| shard.hub.sessions.poll_budget(cx)) => {}
                _ = doorbell.readable(false) => hub.mesh.clear_doorbell(),
            }
            continue;
        }
        let taken = hub.mesh.drain(
            |envelope| take_envelope(&shard, envelope),
            || shard.hub.sessions.holds_publishers(),
        );
        hub.flush_outboxes();
        hub.mesh.wake_space_waiters();
        if taken > 0 {
            // Let the sessions just fed write before draining more: ring
            // our own doorbell, so the wait below ends only after the
            // core's other ready tasks ran (a task that wakes itself is
            // polled again at once by monoio).
            hub.mesh.ring_own_doorbell();
        } else if !hub.mesh.arm() {
            continue;
        }
        let _ = doorbell.readable(false).await;
        hub.mesh.clear_doorbell();
    }
}

/// Applies one envelope from another core; an action on one of this
/// core's sessions is carried out here and answered.
pub(crate) fn take_envelope(shard: &Rc<Shard>, envelope: crate::pubsub::mesh::Envelope) {
    if let Some(request) = shard.hub.receive(envelope) {
        let answer = shard.act_on_session(request.key, request.action);
        shard.hub.reply(request.from, request.request, answer);
    }
}

/// Writes deliveries to the sessions that may take them without their
/// task (`Shard::flush_direct`). It is woken by the first delivery and runs
/// after the task that delivered has yielded, so what a publisher's whole
/// read produced goes out together. A long round yields to the core's I/O
/// every `FLUSH_SLICE` sessions: a publish that arrived meanwhile is queued
/// behind the frames of the sessions not yet written, which then take both
/// in one send (under load, the batches grow by themselves).
async fn flush_loop(shard: Rc<Shard>) {
    let io_yield = IoYield::new()
        .inspect_err(|e| tracing::warn!(core = shard.core, error = %e, "flush rounds will not yield to I/O"))
        .ok();
    let mut batch = Vec::new();
    loop {
        std::future::poll_fn(|cx| shard.poll_ready(cx, &mut batch)).await;
        let mut done = 0;
        while done < batch.len() {
            let slice = match io_yield {
                Some(_) => FLUSH_SLICE,
                None => batch.len(),
            };
            done = shard.flush_direct(&batch, done, slice);
            if let (Some(y), true) = (&io_yield, done < batch.len()) {
                y.yield_now().await;
            }
        }
        batch.clear();
    }
}

/// Sessions a flush round writes between two looks at the core's I/O.
const FLUSH_SLICE: usize = 128;

/// Lets the core's I/O and its other tasks run before going on. The worker
/// future is polled again at once when it wakes itself, without the driver
/// looking for completions, so it waits instead on an eventfd it has just
/// signalled: that completes through the driver, after the others.
struct IoYield {
    eventfd: EventFd,
    waiter: monoio::net::UnixStream,
}

impl IoYield {
    fn new() -> std::io::Result<IoYield> {
        let eventfd = EventFd::new()?;
        let waiter = eventfd.waiter()?;
        Ok(IoYield { eventfd, waiter })
    }

    async fn yield_now(&self) {
        self.eventfd.signal();
        let _ = self.waiter.readable(false).await;
        self.eventfd.clear();
    }
}

/// The per-core timer: advances the shard's clock and kicks due sessions.
async fn sweep(shard: Rc<Shard>, metrics: Arc<crate::admin::Metrics>, driver: DriverKind) {
    let tick = Duration::from_millis(shard.tick_ms());
    let driver = match driver {
        DriverKind::IoUring => "io_uring",
        DriverKind::Epoll => "epoll",
    };
    let mut reclaim = crate::sys::alloc::Reclaim::default();
    loop {
        metrics.refresh(&shard, driver);
        monoio::time::sleep(tick).await;
        shard.sweep();
        let live = shard.session_count().saturating_sub(shard.parked_count());
        let started = Instant::now();
        if reclaim.after_tick(live, shard.now_ms()) {
            tracing::debug!(
                core = shard.core,
                live,
                took_us = started.elapsed().as_micros() as u64,
                "freed memory given back"
            );
        }
    }
}

/// Accepts admin connections (until the select it runs in ends at
/// shutdown), up to `--admin-max-connections` for the server: one past it
/// is told 503 in one attempt that never waits, and closed.
async fn accept_admin(listener: &monoio::net::TcpListener, shard: &Rc<Shard>, metrics: &Arc<crate::admin::Metrics>) {
    let mut failures = AcceptFailures::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(place) = crate::admin::Place::take(shard) else {
                    shard.stats.borrow_mut().refused_admin += 1;
                    let fd = stream.as_raw_fd();
                    // SAFETY: `fd` is the stream's open socket, borrowed
                    // for this one call.
                    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                    let _ = socket2::SockRef::from(&socket).send_with_flags(crate::admin::TOO_MANY, libc::MSG_DONTWAIT);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                monoio::spawn(crate::admin::serve(stream, place, metrics.clone()));
            }
            Err(e) => failures.back_off(shard, "admin accept failed", e).await,
        }
    }
}

/// Accept errors (out of descriptors or memory): said once a second at
/// most, each followed by a short back-off instead of a spin on the error.
#[derive(Default)]
struct AcceptFailures {
    last_warning_ms: Option<u64>,
}

impl AcceptFailures {
    async fn back_off(&mut self, shard: &Shard, what: &str, error: std::io::Error) {
        let now = shard.now_ms();
        if self.last_warning_ms.is_none_or(|t| now.saturating_sub(t) >= 1000) {
            tracing::warn!(core = shard.core, %error, "{what}");
            self.last_warning_ms = Some(now);
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Accepts connections until shutdown begins; `tls`: they speak TLS first.
/// A socket past the WebSocket port's share of the open-files limit
/// (`Admission::take_socket`) is closed at once.
async fn accept_until_shutdown(listener: &monoio::net::TcpListener, shard: &Rc<Shard>, tls: bool) {
    let mut failures = AcceptFailures::default();
    loop {
        let mut accept = std::pin::pin!(listener.accept());
        let accepted = std::future::poll_fn(|cx| {
            if shard.is_shutting_down() {
                return Poll::Ready(None);
            }
            shard.watch(cx.waker());
            accept.as_mut().poll(cx).map(Some)
        })
        .await;
        match accepted {
            None => return,
            Some(Ok((stream, peer))) => {
                shard.stats.borrow_mut().accepted += 1;
                if !shard.admission.take_socket() {
                    shard.stats.borrow_mut().refused_sockets += 1;
                    continue;
                }
                // Small frames must not wait for Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                // Each read says what it left: an epoll wait after a read
                // that left nothing waits for new bytes (`conn::recv`).
                // Without it (a kernel before 4.18) reads never say so,
                // and only one that finds nothing lets the wait forget.
                // SAFETY: the stream's open socket, borrowed for this call.
                let _ = crate::sys::socket::report_unread(unsafe {
                    std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd())
                });
                // Registered before the task first runs, so a shutdown that
                // starts meanwhile waits for (and kicks) this session too.
                let session = shard.open_session();
                session.hold_socket_place();
                session.set_peer_ip(peer.ip());
                monoio::spawn(crate::conn::serve(stream, session, tls));
            }
            Some(Err(e)) => failures.back_off(shard, "accept failed", e).await,
        }
    }
}

/// Waits until every session has closed, or the deadline; then ends the
/// rest, so that no task outlives the runtime (monoio would leak it).
async fn drain(shard: &Rc<Shard>, deadline: Instant) {
    let limit = deadline.saturating_duration_since(Instant::now());
    if monoio::time::timeout(limit, all_sessions_ended(shard)).await.is_err() {
        tracing::warn!(
            core = shard.core,
            left = shard.session_count(),
            "drain timeout: dropping remaining sessions"
        );
        shard.abort_all();
        // Aborted tasks end at their next poll; this bound is only a backstop.
        let _ = monoio::time::timeout(Duration::from_secs(1), all_sessions_ended(shard)).await;
    }
}

fn all_sessions_ended(shard: &Shard) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| {
        if shard.session_count() == 0 && shard.admin_count() == 0 {
            return Poll::Ready(());
        }
        shard.watch(cx.waker());
        Poll::Pending
    })
}
