//! Every option sluice has: its flag, its TOML key, its default and its limit.
//!
//! Flags override the file (`--config FILE`), the file overrides defaults, and
//! the result is validated once, here, into a `Config` the rest of the process
//! trusts. A bad flag or file is a `ConfigError` with the option's name, never
//! a panic.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ws::handshake::OriginPolicy;
use crate::ws::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DriverChoice {
    /// The faster driver as measured: epoll (docs/ARCHITECTURE.md, "Process").
    Auto,
    /// io_uring only; refusing to start without it.
    Uring,
    /// epoll only.
    Epoll,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Options as given on the command line or in the file; `None` means unset.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    // Listeners and workers
    /// Address to serve WebSocket, /healthz and /readyz on [default: 127.0.0.1:8080].
    #[arg(long, help_heading = "Listeners and workers")]
    pub listen: Option<SocketAddr>,
    /// Worker threads, each pinned to a core: at most the CPUs this process
    /// may run on, unless --oversubscribe [default: those CPUs].
    #[arg(long, help_heading = "Listeners and workers")]
    pub workers: Option<usize>,
    /// Allow more workers than CPUs (up to 256): they then share cores.
    #[arg(long, help_heading = "Listeners and workers")]
    #[serde(default)]
    pub oversubscribe: bool,
    /// I/O driver [default: auto].
    #[arg(long, help_heading = "Listeners and workers", value_enum)]
    pub driver: Option<DriverChoice>,
    // TLS
    /// Address to serve wss:// (TLS) on, besides --listen [default: none].
    #[arg(long, help_heading = "TLS")]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for --tls-listen (reloaded on SIGHUP).
    #[arg(long, help_heading = "TLS")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (reloaded on SIGHUP).
    #[arg(long, help_heading = "TLS")]
    pub tls_key: Option<PathBuf>,
    // Limits
    /// Upgraded connections the server holds at once; past it, handshakes
    /// get 503 with Retry-After [default: the open-files limit less 1/16].
    #[arg(long, help_heading = "Limits")]
    pub max_connections: Option<usize>,
    /// Upgraded connections one client address may hold; past it, 503 with
    /// Retry-After; 0: no limit [default: 0].
    #[arg(long, help_heading = "Limits")]
    pub max_connections_per_ip: Option<usize>,
    /// Handshakes one client address may make per second (a bucket of one
    /// second's worth); past it, 429 with Retry-After; 0: no limit [default: 0].
    #[arg(long, help_heading = "Limits")]
    pub max_handshakes_per_sec_per_ip: Option<u32>,
    /// Largest handshake request head; larger gets 431 [default: 8192].
    #[arg(long, help_heading = "Limits")]
    pub max_head_bytes: Option<usize>,
    /// Largest frame payload; larger closes with 1009 [default: 16 MiB].
    #[arg(long, help_heading = "Limits")]
    pub max_frame_bytes: Option<usize>,
    /// Largest message, fragments together; larger closes with 1009 [default: 16 MiB].
    #[arg(long, help_heading = "Limits")]
    pub max_message_bytes: Option<usize>,
    /// Data messages one connection may send per second (a bucket of one
    /// second's worth, refilled as time passes); 0: no limit [default: 0].
    #[arg(long, help_heading = "Limits")]
    pub max_messages_per_sec: Option<u32>,
    /// Payload bytes one connection may send per second (a message is
    /// taken while the bucket is not empty, and may overdraw it); 0: no limit [default: 0].
    #[arg(long, help_heading = "Limits")]
    pub max_bytes_per_sec: Option<u64>,
    /// What happens to a message over those limits [default: close].
    #[arg(long, help_heading = "Limits", value_enum)]
    pub rate_limit: Option<RateLimit>,
    // Timeouts
    /// Drop a client that has not finished its handshake in this time (an admin
    /// request's head too) [default: 5000].
    #[arg(long, help_heading = "Timeouts")]
    pub handshake_timeout_ms: Option<u64>,
    /// Ping a quiet peer this often; 0 turns pings off [default: 30000].
    #[arg(long, help_heading = "Timeouts")]
    pub ping_interval_ms: Option<u64>,
    /// Close a peer silent this long; 0 turns it off [default: 75000].
    #[arg(long, help_heading = "Timeouts")]
    pub idle_timeout_ms: Option<u64>,
    /// After sending a close, wait this long for the peer's [default: 2000].
    #[arg(long, help_heading = "Timeouts")]
    pub close_timeout_ms: Option<u64>,
    /// On SIGTERM/SIGINT, wait this long for sessions to close [default: 10000].
    #[arg(long, help_heading = "Timeouts")]
    pub drain_timeout_ms: Option<u64>,
    /// Park a connection quiet this long: its task ends and only its socket and
    /// session slot remain until the peer speaks again; 0 never parks [default: 1000].
    #[arg(long, help_heading = "Timeouts")]
    pub park_after_ms: Option<u64>,
    // Pub/sub
    /// Most topics one connection may subscribe to [default: 1000].
    #[arg(long, help_heading = "Pub/sub")]
    pub max_subscriptions: Option<usize>,
    /// Most bytes of deliveries queued for one connection [default: 1 MiB].
    #[arg(long, help_heading = "Pub/sub")]
    pub max_outbound_bytes: Option<usize>,
    /// What happens to a subscriber over --max-outbound-bytes [default: close].
    #[arg(long, help_heading = "Pub/sub", value_enum)]
    pub slow_consumer: Option<SlowConsumer>,
    /// Most bytes of deliveries queued for all connections of one core: past
    /// it, publishing on that core waits until half of it is written [default: 64 MiB].
    #[arg(long, help_heading = "Pub/sub")]
    pub max_core_outbound_bytes: Option<usize>,
    /// While a core's publishers wait, a subscriber that has taken none of
    /// its queued deliveries for this long is a slow consumer [default: 2000].
    #[arg(long, help_heading = "Pub/sub")]
    pub stall_timeout_ms: Option<u64>,
    /// Envelopes each cross-core ring holds. There is a ring for each
    /// ordered pair of workers, workers x (workers - 1), of 64 bytes per
    /// envelope, reserved at start: at most 256 MiB in all [default: 4096,
    /// or the largest power of two within 256 MiB].
    #[arg(long, help_heading = "Pub/sub")]
    pub mesh_ring_capacity: Option<usize>,
    /// STOMP heart-beats (ms) offered to clients, both ways: we send one when
    /// quiet this long, and ask as much of them; 0 turns them off [default: 10000].
    #[arg(long, help_heading = "Pub/sub")]
    pub stomp_heart_beat_ms: Option<u64>,
    /// A STOMP client silent this long past its heart-beat interval is closed [default: 5000].
    #[arg(long, help_heading = "Pub/sub")]
    pub stomp_heart_beat_grace_ms: Option<u64>,
    // Compression
    /// permessage-deflate (RFC 7692) for routes without their own `deflate`:
    /// off; shared (no context takeover either way; one compressor and
    /// inflater per core, a publish compressed once); or dedicated (context
    /// takeover where the client allows it; a compressor and an inflater
    /// per connection, within --deflate-dedicated-bytes) [default: shared].
    #[arg(long, help_heading = "Compression", value_enum)]
    pub deflate: Option<DeflateMode>,
    /// Memory per core that connections agreed to `dedicated` deflate may
    /// reserve for their compression contexts; past it, new connections
    /// agree to `shared` [default: 64 MiB].
    #[arg(long, help_heading = "Compression")]
    pub deflate_dedicated_bytes: Option<usize>,
    /// `dedicated` deflate: the largest window a connection's compressor
    /// keeps, 9 to 15 bits (the client may ask for less). Smaller is faster
    /// and takes less memory; larger finds more of earlier messages
    /// [default: 15].
    #[arg(long, help_heading = "Compression")]
    pub deflate_window_bits: Option<u8>,
    /// Messages shorter than this go out uncompressed, even where
    /// permessage-deflate was agreed [default: 256].
    #[arg(long, help_heading = "Compression")]
    pub compress_min_bytes: Option<usize>,
    /// zlib's compression level, 1 (fastest) to 9 (smallest) [default: 6].
    #[arg(long, help_heading = "Compression")]
    pub compress_level: Option<u32>,
    // Auth
    /// Origins allowed to connect, comma-separated: exact origins
    /// (https://app.example.com), subdomain patterns (*.example.com,
    /// https://*.example.com), or * for any; others get 403 [default: any].
    #[arg(long, help_heading = "Auth", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// How routes without their own `auth` treat tokens [default: required
    /// when a JWT key is configured, else none].
    #[arg(long, help_heading = "Auth", value_enum)]
    pub auth: Option<crate::auth::Mode>,
    /// File holding the HMAC secret (at least 32 bytes) that signs HS256/384/512 tokens.
    #[arg(long, help_heading = "Auth")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key (RSA or EC P-256/P-384) that verifies RS*/PS*/ES* tokens.
    #[arg(long, help_heading = "Auth")]
    pub jwt_public_key: Option<PathBuf>,
    /// Seconds of clock skew allowed on a token's exp and nbf [default: 30].
    #[arg(long, help_heading = "Auth")]
    pub jwt_leeway_secs: Option<u64>,
    /// Tokens must carry this `aud` [default: tokens with an `aud` are refused].
    #[arg(long, help_heading = "Auth")]
    pub jwt_audience: Option<String>,
    /// Tokens must carry this `iss` [default: any].
    #[arg(long, help_heading = "Auth")]
    pub jwt_issuer: Option<String>,
    // Admin
    /// Admin HTTP address (web console, publish, metrics, sessions), or "off"
    /// [default: 127.0.0.1:9090].
    #[arg(long, help_heading = "Admin")]
    pub admin_listen: Option<String>,
    /// Bearer token the admin API and console require (all but /healthz,
    /// /readyz, /metrics and the console's login page) [default: none].
    #[arg(long, help_heading = "Admin")]
    pub admin_token: Option<String>,
    /// Admin connections the server holds at once; past it, 503 and close
    /// [default: 64].
    #[arg(long, help_heading = "Admin")]
    pub admin_max_connections: Option<usize>,
    // Cluster
    /// NATS server URLs, comma-separated (nats://host:port, tls://...): join
    /// a cluster of sluice nodes over NATS [default: none, one node alone].
    #[arg(long, help_heading = "Cluster", value_delimiter = ',')]
    pub nats: Option<Vec<String>>,
    /// First tokens of every NATS subject this node uses [default: sluice].
    #[arg(long, help_heading = "Cluster")]
    pub nats_prefix: Option<String>,
    /// This node's name on the bus and in session ids, 1-64 of
    /// `A-Z a-z 0-9 _ -` [default: random, logged at start].
    #[arg(long, help_heading = "Cluster")]
    pub node_id: Option<String>,
    /// NATS user (with --nats-password).
    #[arg(long, help_heading = "Cluster")]
    pub nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(long, help_heading = "Cluster")]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, help_heading = "Cluster")]
    pub nats_token: Option<String>,
    /// NATS credentials file (a user JWT and its nkey seed).
    #[arg(long, help_heading = "Cluster")]
    pub nats_creds: Option<PathBuf>,
    /// File holding an nkey seed (SU...) to sign the NATS server's nonce.
    #[arg(long, help_heading = "Cluster")]
    pub nats_nkey: Option<PathBuf>,
    /// PEM CA certificate(s) the NATS servers' TLS certificates must chain
    /// to; TLS is then required.
    #[arg(long, help_heading = "Cluster")]
    pub nats_ca: Option<PathBuf>,
    /// Publishes held for the bus while it is unreachable, in bytes; past
    /// them new publishes to the bus are dropped and counted [default: 8 MiB].
    #[arg(long, help_heading = "Cluster")]
    pub nats_buffer_bytes: Option<usize>,
    // Logging
    /// Log lines as text or as one JSON object per line (for log shippers);
    /// SLUICE_LOG sets the filter [default: text].
    #[arg(long, help_heading = "Logging", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Routes (file only): `[[route]]` tables with path, protocol, subprotocols.
    #[arg(skip)]
    pub route: Option<Vec<RouteOptions>>,
}

/// How this node authenticates to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    UserPassword(String, String),
    Token(String),
    /// A credentials file: a user JWT and its seed.
    Creds(PathBuf),
    /// An nkey seed, read at start.
    Nkey(String),
}

/// Joining other sluice nodes over NATS (`--nats`).
#[derive(Debug, Clone)]
pub struct Cluster {
    pub urls: Vec<String>,
    pub prefix: String,
    pub node_id: String,
    pub auth: NatsAuth,
    pub ca: Option<PathBuf>,
    pub buffer_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteOptions {
    pub path: String,
    pub protocol: RouteProtocol,
    #[serde(default)]
    pub subprotocols: Vec<String>,
    /// Overrides the global `allowed_origins` for this route.
    pub allowed_origins: Option<Vec<String>>,
    /// Overrides the global `auth` for this route.
    pub auth: Option<crate::auth::Mode>,
    /// Topic patterns an anonymous session of an `optional` route may
    /// subscribe (publish) to.
    #[serde(default)]
    pub anonymous_subscribe: Vec<String>,
    #[serde(default)]
    pub anonymous_publish: Vec<String>,
    /// A `backend` route's application: `http://` or `https://` URL.
    pub upstream: Option<String>,
    /// A PEM file of the CA certificates an `https` upstream is checked
    /// against (default: the system's).
    pub upstream_ca: Option<PathBuf>,
    /// How long one request to the upstream may take, connecting included.
    pub upstream_timeout_ms: Option<u64>,
    /// The most content bytes of client events one request carries; while
    /// a batch is full the client's socket is not read.
    pub max_batch_bytes: Option<usize>,
    /// How often a request that could not connect is tried again before
    /// the client is closed.
    pub upstream_retries: Option<u32>,
    /// Pub/sub routes: URLs asked (JSON `POST`) at the handshake, before a
    /// subscribe and before a publish (docs/BACKEND.md, "Hooks").
    pub connect_hook: Option<String>,
    pub subscribe_hook: Option<String>,
    pub publish_hook: Option<String>,
    /// How long a hook may take, connecting included.
    pub hook_timeout_ms: Option<u64>,
    /// Overrides the global `deflate` for this route.
    pub deflate: Option<DeflateMode>,
}

/// Whether and how a route agrees to permessage-deflate (RFC 7692).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeflateMode {
    /// Decline it: every message goes as it is.
    Off,
    /// No context takeover either way: no compression state per
    /// connection, and a publish is compressed once per core.
    Shared,
    /// Context takeover where the client allows it: a compressor and an
    /// inflater per connection (made on first use), within the core's
    /// `deflate_dedicated_bytes`; past it, `shared`.
    Dedicated,
}

impl DeflateMode {
    /// The negotiation's mode, or `None` when off.
    pub fn mode(self) -> Option<crate::ws::deflate::Mode> {
        match self {
            DeflateMode::Off => None,
            DeflateMode::Shared => Some(crate::ws::deflate::Mode::Shared),
            DeflateMode::Dedicated => Some(crate::ws::deflate::Mode::Dedicated),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteProtocol {
    /// Every data message is sent back as it came.
    Echo,
    /// The native pub/sub protocol (docs/PROTOCOL.md).
    Pubsub,
    /// STOMP 1.2 (also 1.1 and 1.0) over WebSocket, on the same topics.
    Stomp,
    /// Every event goes to an HTTP application, WebSocket-over-HTTP
    /// (docs/BACKEND.md).
    Backend,
}

/// A `backend` route's upstream and how it is used.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub upstream: crate::upstream::Upstream,
    pub timeout_ms: u64,
    pub max_batch_bytes: usize,
    pub retries: u32,
}

impl Eq for Backend {}

/// A pub/sub route's hooks: each optional.
#[derive(Debug, Clone, PartialEq)]
pub struct Hooks {
    pub connect: Option<crate::upstream::Upstream>,
    pub subscribe: Option<crate::upstream::Upstream>,
    pub publish: Option<crate::upstream::Upstream>,
    pub timeout_ms: u64,
}

impl Eq for Hooks {}

/// Pushpin's limit of content bytes in one request.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 200_000;

/// The subprotocol the default native route answers to: a browser that
/// carries its token in a `bearer.<token>` subprotocol must also offer one
/// the server picks, or it fails the connection.
pub const NATIVE_SUBPROTOCOL: &str = "sluice";

/// The subprotocols a STOMP route offers when its file entry lists none
/// (STOMP over WebSocket's names, newest first).
pub const STOMP_SUBPROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];

/// The policy for a subscriber whose queued deliveries pass the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// Close it with 1008 "slow consumer".
    Close,
    /// Drop the deliveries that do not fit, and count them.
    Drop,
}

/// What happens to a message over a connection's rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RateLimit {
    /// Close the connection with 1008 "rate limit".
    Close,
    /// Drop the message, and count it.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub path: String,
    pub protocol: RouteProtocol,
    pub subprotocols: Vec<String>,
    pub origins: OriginPolicy,
    pub auth: crate::auth::Mode,
    /// What an anonymous session of an `optional` route may do.
    pub anonymous: std::sync::Arc<crate::auth::Grants>,
    /// A `backend` route's upstream.
    pub backend: Option<std::sync::Arc<Backend>>,
    /// A pub/sub route's hooks.
    pub hooks: Option<std::sync::Arc<Hooks>>,
    /// permessage-deflate as the route agrees to it; `None`: declined.
    pub deflate: Option<crate::ws::deflate::Mode>,
}

/// A route's index in `Config::routes`: what a parked connection keeps of
/// its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteId(u32);

impl RouteId {
    /// The route's position in `Config::routes`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

const MAX_ROUTES: usize = 1024;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The `wss://` listener and its certificate files.
    pub tls: Option<(SocketAddr, crate::tls::CertFiles)>,
    pub workers: usize,
    pub driver: DriverChoice,
    pub routes: Vec<Route>,
    pub handshake_timeout_ms: u64,
    pub max_head_bytes: usize,
    pub limits: Limits,
    pub ping_interval_ms: u64,
    pub idle_timeout_ms: u64,
    pub close_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub park_after_ms: u64,
    pub max_subscriptions: usize,
    pub max_outbound_bytes: usize,
    pub slow_consumer: SlowConsumer,
    pub max_core_outbound_bytes: usize,
    pub stall_timeout_ms: u64,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_handshakes_per_sec_per_ip: u32,
    pub max_messages_per_sec: u32,
    pub max_bytes_per_sec: u64,
    pub rate_limit: RateLimit,
    pub mesh_ring_capacity: usize,
    pub stomp_heart_beat_ms: u64,
    pub stomp_heart_beat_grace_ms: u64,
    /// `None`: no admin port.
    pub admin_listen: Option<SocketAddr>,
    pub admin_token: Option<String>,
    pub admin_max_connections: usize,
    /// Checks handshake tokens; `None` when no JWT key is configured.
    pub verifier: Option<std::sync::Arc<crate::auth::Verifier>>,
    /// `None`: one node, no bus.
    pub cluster: Option<Cluster>,
    /// Messages shorter than this are sent uncompressed.
    pub compress_min_bytes: usize,
    pub compress_level: u32,
    /// Memory per core for `dedicated` deflate contexts.
    pub deflate_dedicated_bytes: usize,
    /// The largest window of a `dedicated` compressor (bits).
    pub deflate_window_bits: u8,
}

#[derive(Debug)]
pub enum ConfigError {
    File { path: PathBuf, error: String },
    Invalid { option: &'static str, error: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::File { path, error } => write!(f, "config file {}: {error}", path.display()),
            ConfigError::Invalid { option, error } => write!(f, "{option}: {error}"),
        }
    }
}

impl std::error::Error for ConfigError {}

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;
/// Path answered with 200 for load balancers on the WebSocket port.
pub const HEALTH_PATH: &str = "/healthz";
/// Path answered 200 while the node takes traffic (in a cluster: while its
/// bus is up), else 503.
pub const READY_PATH: &str = "/readyz";

impl Options {
    /// Reads a TOML file of options.
    pub fn from_file(path: &Path) -> Result<Options, ConfigError> {
        let file_err = |error: String| ConfigError::File {
            path: path.to_owned(),
            error,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| file_err(e.to_string()))
    }

    /// The `log_format` of a file that does not read as options (a wrong
    /// key or value elsewhere), so that the error is written as it asks;
    /// `None` if it is not TOML at all, or says nothing of it.
    pub fn log_format_in(path: &Path) -> Option<LogFormat> {
        let text = std::fs::read_to_string(path).ok()?;
        let table: toml::Table = toml::from_str(&text).ok()?;
        LogFormat::deserialize(table.get("log_format")?.clone()).ok()
    }

    /// `self` wins over `base` wherever it is set.
    pub fn over(self, base: Options) -> Options {
        Options {
            listen: self.listen.or(base.listen),
            tls_listen: self.tls_listen.or(base.tls_listen),
            tls_cert: self.tls_cert.or(base.tls_cert),
            tls_key: self.tls_key.or(base.tls_key),
            workers: self.workers.or(base.workers),
            oversubscribe: self.oversubscribe || base.oversubscribe,
            driver: self.driver.or(base.driver),
            log_format: self.log_format.or(base.log_format),
            allowed_origins: self.allowed_origins.or(base.allowed_origins),
            handshake_timeout_ms: self.handshake_timeout_ms.or(base.handshake_timeout_ms),
            max_head_bytes: self.max_head_bytes.or(base.max_head_bytes),
            max_frame_bytes: self.max_frame_bytes.or(base.max_frame_bytes),
            max_message_bytes: self.max_message_bytes.or(base.max_message_bytes),
            ping_interval_ms: self.ping_interval_ms.or(base.ping_interval_ms),
            idle_timeout_ms: self.idle_timeout_ms.or(base.idle_timeout_ms),
            close_timeout_ms: self.close_timeout_ms.or(base.close_timeout_ms),
            drain_timeout_ms: self.drain_timeout_ms.or(base.drain_timeout_ms),
            park_after_ms: self.park_after_ms.or(base.park_after_ms),
            max_subscriptions: self.max_subscriptions.or(base.max_subscriptions),
            max_outbound_bytes: self.max_outbound_bytes.or(base.max_outbound_bytes),
            slow_consumer: self.slow_consumer.or(base.slow_consumer),
            max_core_outbound_bytes: self.max_core_outbound_bytes.or(base.max_core_outbound_bytes),
            stall_timeout_ms: self.stall_timeout_ms.or(base.stall_timeout_ms),
            max_connections: self.max_connections.or(base.max_connections),
            max_connections_per_ip: self.max_connections_per_ip.or(base.max_connections_per_ip),
            max_handshakes_per_sec_per_ip: self
                .max_handshakes_per_sec_per_ip
                .or(base.max_handshakes_per_sec_per_ip),
            max_messages_per_sec: self.max_messages_per_sec.or(base.max_messages_per_sec),
            max_bytes_per_sec: self.max_bytes_per_sec.or(base.max_bytes_per_sec),
            rate_limit: self.rate_limit.or(base.rate_limit),
            mesh_ring_capacity: self.mesh_ring_capacity.or(base.mesh_ring_capacity),
            stomp_heart_beat_ms: self.stomp_heart_beat_ms.or(base.stomp_heart_beat_ms),
            stomp_heart_beat_grace_ms: self.stomp_heart_beat_grace_ms.or(base.stomp_heart_beat_grace_ms),
            admin_listen: self.admin_listen.or(base.admin_listen),
            admin_token: self.admin_token.or(base.admin_token),
            admin_max_connections: self.admin_max_connections.or(base.admin_max_connections),
            auth: self.auth.or(base.auth),
            jwt_secret_file: self.jwt_secret_file.or(base.jwt_secret_file),
            jwt_public_key: self.jwt_public_key.or(base.jwt_public_key),
            jwt_leeway_secs: self.jwt_leeway_secs.or(base.jwt_leeway_secs),
            jwt_audience: self.jwt_audience.or(base.jwt_audience),
            jwt_issuer: self.jwt_issuer.or(base.jwt_issuer),
            nats: self.nats.or(base.nats),
            nats_prefix: self.nats_prefix.or(base.nats_prefix),
            node_id: self.node_id.or(base.node_id),
            nats_user: self.nats_user.or(base.nats_user),
            nats_password: self.nats_password.or(base.nats_password),
            nats_token: self.nats_token.or(base.nats_token),
            nats_creds: self.nats_creds.or(base.nats_creds),
            nats_nkey: self.nats_nkey.or(base.nats_nkey),
            nats_ca: self.nats_ca.or(base.nats_ca),
            nats_buffer_bytes: self.nats_buffer_bytes.or(base.nats_buffer_bytes),
            deflate: self.deflate.or(base.deflate),
            deflate_dedicated_bytes: self.deflate_dedicated_bytes.or(base.deflate_dedicated_bytes),
            deflate_window_bits: self.deflate_window_bits.or(base.deflate_window_bits),
            compress_min_bytes: self.compress_min_bytes.or(base.compress_min_bytes),
            compress_level: self.compress_level.or(base.compress_level),
            route: self.route.or(base.route),
        }
    }

    /// Applies defaults and checks every limit.
    pub fn validate(self, available_cpus: usize) -> Result<Config, ConfigError> {
        let workers = self.workers.unwrap_or(available_cpus.clamp(1, MAX_WORKERS));
        let most_workers = if self.oversubscribe {
            MAX_WORKERS
        } else {
            available_cpus.clamp(1, MAX_WORKERS)
        };
        if workers > available_cpus && !self.oversubscribe {
            return Err(ConfigError::Invalid {
                option: "workers",
                error: format!(
                    "{workers} is more than the {available_cpus} CPUs this process may run on \
                     (workers would share cores; --oversubscribe allows it)"
                ),
            });
        }
        in_range("workers", workers, 1, most_workers)?;
        let cluster = cluster(&self)?;
        // The NATS bridge is one more member of the mesh.
        let mesh_ring_capacity = mesh_ring_capacity(workers + usize::from(cluster.is_some()), self.mesh_ring_capacity)?;
        let global_origins = origin_policy(self.allowed_origins)?;
        let verifier = verifier(
            self.jwt_secret_file.as_deref(),
            self.jwt_public_key.as_deref(),
            self.jwt_leeway_secs.unwrap_or(30),
            self.jwt_audience,
            self.jwt_issuer,
        )?;
        let global_auth = self.auth.unwrap_or(if verifier.is_some() {
            crate::auth::Mode::Required
        } else {
            crate::auth::Mode::None
        });
        let no_grants = std::sync::Arc::new(crate::auth::Grants::default());
        let global_deflate = self.deflate.unwrap_or(DeflateMode::Shared).mode();
        let routes = match self.route {
            None => vec![
                Route {
                    path: "/echo".into(),
                    protocol: RouteProtocol::Echo,
                    subprotocols: Vec::new(),
                    origins: global_origins.clone(),
                    auth: global_auth,
                    anonymous: no_grants.clone(),
                    backend: None,
                    hooks: None,
                    deflate: global_deflate,
                },
                Route {
                    path: "/ws".into(),
                    protocol: RouteProtocol::Pubsub,
                    subprotocols: vec![NATIVE_SUBPROTOCOL.into()],
                    origins: global_origins.clone(),
                    auth: global_auth,
                    anonymous: no_grants.clone(),
                    backend: None,
                    hooks: None,
                    deflate: global_deflate,
                },
                Route {
                    path: "/stomp".into(),
                    protocol: RouteProtocol::Stomp,
                    subprotocols: STOMP_SUBPROTOCOLS.map(String::from).to_vec(),
                    origins: global_origins.clone(),
                    auth: global_auth,
                    anonymous: no_grants.clone(),
                    backend: None,
                    hooks: None,
                    deflate: global_deflate,
                },
            ],
            Some(routes) => routes
                .into_iter()
                .map(|r| {
                    let backend = backend(&r)?;
                    let hooks = hooks(&r)?;
                    Ok(Route {
                        path: r.path,
                        protocol: r.protocol,
                        subprotocols: if r.protocol == RouteProtocol::Stomp && r.subprotocols.is_empty() {
                            STOMP_SUBPROTOCOLS.map(String::from).to_vec()
                        } else {
                            r.subprotocols
                        },
                        origins: match r.allowed_origins {
                            None => global_origins.clone(),
                            Some(list) => origin_policy(Some(list))?,
                        },
                        auth: r.auth.unwrap_or(global_auth),
                        anonymous: std::sync::Arc::new(
                            crate::auth::Grants::new(&r.anonymous_subscribe, &r.anonymous_publish, None)
                                .map_err(|error| ConfigError::Invalid { option: "route", error })?,
                        ),
                        backend,
                        hooks,
                        deflate: r.deflate.map_or(global_deflate, DeflateMode::mode),
                    })
                })
                .collect::<Result<_, ConfigError>>()?,
        };
        let admin_listen = match self.admin_listen.as_deref() {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            Some("off") => None,
            Some(addr) => Some(addr.parse().map_err(|_| ConfigError::Invalid {
                option: "admin_listen",
                error: format!("{addr:?} is not an address (HOST:PORT) or \"off\""),
            })?),
        };
        if let Some(token) = &self.admin_token {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::Invalid {
                    option: "admin_token",
                    error: "must be non-empty visible ASCII".into(),
                });
            }
        }
        let tls = match (self.tls_listen, self.tls_cert, self.tls_key) {
            (None, None, None) => None,
            (Some(addr), Some(cert), Some(key)) => Some((addr, crate::tls::CertFiles { cert, key })),
            _ => {
                return Err(ConfigError::Invalid {
                    option: "tls_listen",
                    error: "tls_listen, tls_cert and tls_key go together".into(),
                })
            }
        };
        if let Some((_, files)) = &tls {
            files.load().map_err(|error| ConfigError::Invalid {
                option: "tls_cert",
                error,
            })?;
        }
        let listen = self.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        // Each listener on an address of its own: two on one port would
        // find it taken by the other, and say so as if another process had it.
        let named: [(&'static str, Option<SocketAddr>); 3] = [
            ("listen", Some(listen)),
            ("tls_listen", tls.as_ref().map(|(addr, _)| *addr)),
            ("admin_listen", admin_listen),
        ];
        for (i, (option, addr)) in named.iter().enumerate() {
            for (other, other_addr) in &named[..i] {
                if let (Some(a), Some(b)) = (addr, other_addr) {
                    if a.port() != 0 && a.port() == b.port() && overlap(a.ip(), b.ip()) {
                        return Err(ConfigError::Invalid {
                            option,
                            error: format!("{a} is --{}'s address too", other.replace('_', "-")),
                        });
                    }
                }
            }
        }
        let config = Config {
            listen,
            tls,
            workers,
            driver: self.driver.unwrap_or(DriverChoice::Auto),
            routes,
            handshake_timeout_ms: self.handshake_timeout_ms.unwrap_or(5_000),
            max_head_bytes: self.max_head_bytes.unwrap_or(8192),
            limits: Limits {
                max_frame_bytes: self.max_frame_bytes.unwrap_or(16 * MIB),
                max_message_bytes: self.max_message_bytes.unwrap_or(16 * MIB),
            },
            ping_interval_ms: self.ping_interval_ms.unwrap_or(30_000),
            idle_timeout_ms: self.idle_timeout_ms.unwrap_or(75_000),
            close_timeout_ms: self.close_timeout_ms.unwrap_or(2_000),
            drain_timeout_ms: self.drain_timeout_ms.unwrap_or(10_000),
            park_after_ms: self.park_after_ms.unwrap_or(1_000),
            max_subscriptions: self.max_subscriptions.unwrap_or(1_000),
            max_outbound_bytes: self.max_outbound_bytes.unwrap_or(MIB),
            slow_consumer: self.slow_consumer.unwrap_or(SlowConsumer::Close),
            max_core_outbound_bytes: self.max_core_outbound_bytes.unwrap_or(64 * MIB),
            stall_timeout_ms: self.stall_timeout_ms.unwrap_or(2_000),
            max_connections: self.max_connections.unwrap_or_else(|| {
                let admin = if admin_listen.is_some() {
                    self.admin_max_connections.unwrap_or(DEFAULT_ADMIN_CONNECTIONS)
                } else {
                    0
                };
                default_max_connections(kept_back(workers, admin))
            }),
            max_connections_per_ip: self.max_connections_per_ip.unwrap_or(0),
            max_handshakes_per_sec_per_ip: self.max_handshakes_per_sec_per_ip.unwrap_or(0),
            max_messages_per_sec: self.max_messages_per_sec.unwrap_or(0),
            max_bytes_per_sec: self.max_bytes_per_sec.unwrap_or(0),
            rate_limit: self.rate_limit.unwrap_or(RateLimit::Close),
            mesh_ring_capacity,
            stomp_heart_beat_ms: self.stomp_heart_beat_ms.unwrap_or(10_000),
            stomp_heart_beat_grace_ms: self.stomp_heart_beat_grace_ms.unwrap_or(5_000),
            admin_listen,
            admin_token: self.admin_token,
            admin_max_connections: self.admin_max_connections.unwrap_or(DEFAULT_ADMIN_CONNECTIONS),
            verifier,
            cluster,
            compress_min_bytes: self.compress_min_bytes.unwrap_or(256),
            compress_level: self.compress_level.unwrap_or(6),
            deflate_dedicated_bytes: self.deflate_dedicated_bytes.unwrap_or(64 * 1024 * 1024),
            deflate_window_bits: self.deflate_window_bits.unwrap_or(15),
        };
        config.check()?;
        Ok(config)
    }
}

/// The NATS options, checked; `None` without `--nats`.
fn cluster(o: &Options) -> Result<Option<Cluster>, ConfigError> {
    let bad = |option: &'static str, error: String| ConfigError::Invalid { option, error };
    let Some(urls) = o.nats.clone() else {
        let given = [
            ("nats_prefix", o.nats_prefix.is_some()),
            ("node_id", o.node_id.is_some()),
            ("nats_user", o.nats_user.is_some()),
            ("nats_password", o.nats_password.is_some()),
            ("nats_token", o.nats_token.is_some()),
            ("nats_creds", o.nats_creds.is_some()),
            ("nats_nkey", o.nats_nkey.is_some()),
            ("nats_ca", o.nats_ca.is_some()),
            ("nats_buffer_bytes", o.nats_buffer_bytes.is_some()),
        ];
        if let Some((option, _)) = given.iter().find(|(_, set)| *set) {
            return Err(bad(option, "takes effect only with nats (--nats URL)".into()));
        }
        return Ok(None);
    };
    let urls: Vec<String> = urls
        .into_iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() || urls.len() > 64 {
        return Err(bad("nats", "between 1 and 64 URLs are required".into()));
    }
    for url in &urls {
        url.parse::<async_nats::ServerAddr>()
            .map_err(|e| bad("nats", format!("{url:?} is not a NATS URL: {e}")))?;
    }
    let prefix = o.nats_prefix.clone().unwrap_or_else(|| "sluice".into());
    // Tokens of a NATS subject: no wildcard, no whitespace, none empty.
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix
            .split('.')
            .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    {
        return Err(bad(
            "nats_prefix",
            format!("{prefix:?} must be 1-64 bytes of dot-separated tokens of A-Z a-z 0-9 _ -"),
        ));
    }
    let node_id = match &o.node_id {
        Some(id) => {
            if id.is_empty()
                || id.len() > 64
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(bad("node_id", format!("{id:?} must be 1-64 bytes of A-Z a-z 0-9 _ -")));
            }
            id.clone()
        }
        None => random_node_id(),
    };
    let auth = match (
        &o.nats_user,
        &o.nats_password,
        &o.nats_token,
        &o.nats_creds,
        &o.nats_nkey,
    ) {
        (None, None, None, None, None) => NatsAuth::None,
        (Some(user), Some(password), None, None, None) => NatsAuth::UserPassword(user.clone(), password.clone()),
        (Some(_), None, None, None, None) | (None, Some(_), None, None, None) => {
            return Err(bad("nats_user", "nats_user and nats_password go together".into()))
        }
        (None, None, Some(token), None, None) => NatsAuth::Token(token.clone()),
        (None, None, None, Some(creds), None) => {
            std::fs::metadata(creds).map_err(|e| bad("nats_creds", format!("{}: {e}", creds.display())))?;
            NatsAuth::Creds(creds.clone())
        }
        (None, None, None, None, Some(path)) => {
            let seed =
                std::fs::read_to_string(path).map_err(|e| bad("nats_nkey", format!("{}: {e}", path.display())))?;
            let seed = seed.trim().to_string();
            if !seed.starts_with("SU") || nkeys::KeyPair::from_seed(&seed).is_err() {
                return Err(bad(
                    "nats_nkey",
                    format!("{}: not a user nkey seed (SU...)", path.display()),
                ));
            }
            NatsAuth::Nkey(seed)
        }
        _ => {
            return Err(bad(
                "nats_token",
                "give one way to authenticate to NATS: user and password, a token, a creds file or an nkey".into(),
            ))
        }
    };
    if let Some(ca) = &o.nats_ca {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let certificates = CertificateDer::pem_file_iter(ca)
            .map_err(|e| bad("nats_ca", format!("{}: {e}", ca.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("nats_ca", format!("{}: {e}", ca.display())))?;
        if certificates.is_empty() {
            return Err(bad("nats_ca", format!("{}: no PEM certificate in it", ca.display())));
        }
    }
    let buffer_bytes = o.nats_buffer_bytes.unwrap_or(8 * MIB);
    in_range("nats_buffer_bytes", buffer_bytes, 0, 4 * GIB)?;
    Ok(Some(Cluster {
        urls,
        prefix,
        node_id,
        auth,
        ca: o.nats_ca.clone(),
        buffer_bytes,
    }))
}

/// A node id nobody chose: 12 hex digits from the process's random hash keys.
pub fn random_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

/// The token verifier, from the key files.
fn verifier(
    secret_file: Option<&Path>,
    public_key: Option<&Path>,
    leeway_secs: u64,
    audience: Option<String>,
    issuer: Option<String>,
) -> Result<Option<std::sync::Arc<crate::auth::Verifier>>, ConfigError> {
    let read = |option: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| ConfigError::Invalid {
            option,
            error: format!("{}: {e}", path.display()),
        })
    };
    let keys = crate::auth::KeySource {
        // A trailing newline (as `echo` writes) is not part of the secret.
        secret: secret_file
            .map(|p| read("jwt_secret_file", p).map(|s| s.trim_ascii_end().to_vec()))
            .transpose()?,
        public_key_pem: public_key.map(|p| read("jwt_public_key", p)).transpose()?,
    };
    in_range("jwt_leeway_secs", leeway_secs, 0, 3600)?;
    let verifier = crate::auth::Verifier::new(keys, leeway_secs, audience, issuer).map_err(|e| match e {
        crate::auth::KeyError::Secret(error) => ConfigError::Invalid {
            option: "jwt_secret_file",
            error,
        },
        crate::auth::KeyError::PublicKey(error) => ConfigError::Invalid {
            option: "jwt_public_key",
            error,
        },
    })?;
    Ok(verifier.map(std::sync::Arc::new))
}

/// Whether listeners on one port at these two addresses would take each
/// other's: the same address, or a wildcard of the other's family, or the
/// IPv6 wildcard, which on Linux takes IPv4 too unless the host says
/// otherwise (`net.ipv6.bindv6only`, 0 by default).
fn overlap(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    let v6_any = |ip: std::net::IpAddr| ip.is_ipv6() && ip.is_unspecified();
    a == b || v6_any(a) || v6_any(b) || (a.is_ipv4() == b.is_ipv4() && (a.is_unspecified() || b.is_unspecified()))
}

/// `--admin-max-connections` by default.
const DEFAULT_ADMIN_CONNECTIONS: usize = 64;

/// Workers at most, with --oversubscribe.
pub const MAX_WORKERS: usize = 256;
/// Bytes one envelope takes in a cross-core ring (`pubsub::mesh` checks
/// that an envelope fits).
pub const MESH_SLOT_BYTES: usize = 64;
/// What all cross-core rings together may reserve.
pub const MESH_BUDGET_BYTES: usize = 256 * MIB;
/// Envelopes a ring holds, at least and by default.
const MIN_RING_CAPACITY: usize = 16;
const DEFAULT_RING_CAPACITY: usize = 4096;

/// The capacity of each cross-core ring: as asked, or the default, as long
/// as all `workers x (workers - 1)` rings stay within `MESH_BUDGET_BYTES`;
/// by default, the largest power of two that does.
fn mesh_ring_capacity(workers: usize, asked: Option<usize>) -> Result<usize, ConfigError> {
    let rings = workers * workers.saturating_sub(1);
    let fits = MESH_BUDGET_BYTES / (rings.max(1) * MESH_SLOT_BYTES);
    match asked {
        None => {
            let capacity = DEFAULT_RING_CAPACITY.min(fits.max(1));
            // The largest power of two not above it (at least the minimum).
            Ok((1 << capacity.ilog2()).max(MIN_RING_CAPACITY))
        }
        Some(capacity) => {
            in_range("mesh_ring_capacity", capacity, MIN_RING_CAPACITY, 1 << 20)?;
            if capacity > fits {
                return Err(ConfigError::Invalid {
                    option: "mesh_ring_capacity",
                    error: format!(
                        "{capacity} envelopes in each of {rings} rings ({workers} workers) is {} MiB, over {} MiB",
                        rings * capacity * MESH_SLOT_BYTES / MIB,
                        MESH_BUDGET_BYTES / MIB
                    ),
                });
            }
            Ok(capacity)
        }
    }
}

/// The open-files limit (soft) less 1/16 of it, or less what the admin
/// port and the process keep back (`kept_back`) if that is more: room
/// for handshakes being refused besides the connections (see
/// `Admission::take_socket` for what keeps it).
fn default_max_connections(kept: usize) -> usize {
    let files = open_files_limit();
    files.saturating_sub((files / 16).max(kept)).max(1)
}

/// Descriptors a worker holds besides connections: its listeners (up to
/// three), its io_uring or epoll instance, its parking lot and mesh doorbell
/// and shutdown bell and flush eventfd, each with the duplicate monoio
/// waits on, and room to spare.
const FDS_PER_WORKER: usize = 16;
/// The process's own: standard streams, the signal pipe, files read at
/// start, and room to spare.
const FDS_OF_PROCESS: usize = 32;

/// Descriptors kept back from the WebSocket ports: the admin port's
/// connections and what the process and its workers hold themselves.
pub fn kept_back(workers: usize, admin_connections: usize) -> usize {
    FDS_OF_PROCESS + FDS_PER_WORKER * workers + admin_connections
}

/// The process's open-files limit (soft).
pub fn open_files_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX).min(100_000_000)
    } else {
        1024
    }
}

/// An allow-list: `*` (alone) for any origin, else exact origins and
/// `*.domain` patterns, each checked.
fn origin_policy(list: Option<Vec<String>>) -> Result<OriginPolicy, ConfigError> {
    match list {
        None => Ok(OriginPolicy::Any),
        Some(list) if list.iter().any(|o| o == "*") => Ok(OriginPolicy::Any),
        Some(list) => {
            for entry in &list {
                crate::ws::handshake::check_origin_entry(entry).map_err(|error| ConfigError::Invalid {
                    option: "allowed_origins",
                    error,
                })?;
            }
            Ok(OriginPolicy::List(list))
        }
    }
}

fn in_range<T: PartialOrd + fmt::Display>(option: &'static str, v: T, lo: T, hi: T) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::Invalid {
            option,
            error: format!("{v} is outside {lo}..={hi}"),
        });
    }
    Ok(())
}

impl Config {
    fn check(&self) -> Result<(), ConfigError> {
        in_range("handshake_timeout_ms", self.handshake_timeout_ms, 1, 600_000)?;
        in_range("max_head_bytes", self.max_head_bytes, 256, 64 * 1024)?;
        in_range("max_frame_bytes", self.limits.max_frame_bytes, 1, GIB)?;
        in_range("max_message_bytes", self.limits.max_message_bytes, 1, GIB)?;
        in_range("ping_interval_ms", self.ping_interval_ms, 0, 3_600_000)?;
        in_range("idle_timeout_ms", self.idle_timeout_ms, 0, 24 * 3_600_000)?;
        in_range("close_timeout_ms", self.close_timeout_ms, 1, 60_000)?;
        in_range("drain_timeout_ms", self.drain_timeout_ms, 0, 600_000)?;
        in_range("park_after_ms", self.park_after_ms, 0, 3_600_000)?;
        in_range("max_subscriptions", self.max_subscriptions, 1, 1_000_000)?;
        in_range("compress_min_bytes", self.compress_min_bytes, 0, GIB)?;
        in_range("compress_level", self.compress_level, 1, 9)?;
        in_range("deflate_dedicated_bytes", self.deflate_dedicated_bytes, 0, 64 * GIB)?;
        in_range("deflate_window_bits", self.deflate_window_bits, 9, 15)?;
        in_range("max_outbound_bytes", self.max_outbound_bytes, 1024, GIB)?;
        // One subscriber at its own limit must not hold a core's publishers.
        in_range(
            "max_core_outbound_bytes",
            self.max_core_outbound_bytes,
            self.max_outbound_bytes.saturating_mul(2),
            64 * GIB,
        )?;
        in_range("stall_timeout_ms", self.stall_timeout_ms, 1, 600_000)?;
        in_range("max_connections", self.max_connections, 1, 100_000_000)?;
        in_range(
            "max_connections_per_ip",
            self.max_connections_per_ip,
            0,
            self.max_connections,
        )?;
        in_range(
            "max_handshakes_per_sec_per_ip",
            self.max_handshakes_per_sec_per_ip,
            0,
            100_000_000,
        )?;
        in_range("max_messages_per_sec", self.max_messages_per_sec, 0, 100_000_000)?;
        in_range("max_bytes_per_sec", self.max_bytes_per_sec, 0, 1 << 40)?;
        in_range("admin_max_connections", self.admin_max_connections, 1, 100_000)?;
        in_range("stomp_heart_beat_ms", self.stomp_heart_beat_ms, 0, 3_600_000)?;
        in_range("stomp_heart_beat_grace_ms", self.stomp_heart_beat_grace_ms, 0, 600_000)?;
        if self.ping_interval_ms > 0 && self.idle_timeout_ms > 0 && self.idle_timeout_ms <= self.ping_interval_ms {
            return Err(ConfigError::Invalid {
                option: "idle_timeout_ms",
                error: format!(
                    "{} must exceed ping_interval_ms ({}) so a live peer can answer a ping",
                    self.idle_timeout_ms, self.ping_interval_ms
                ),
            });
        }
        if self.routes.is_empty() || self.routes.len() > MAX_ROUTES {
            return Err(ConfigError::Invalid {
                option: "route",
                error: format!("between 1 and {MAX_ROUTES} routes are required"),
            });
        }
        for (i, r) in self.routes.iter().enumerate() {
            let bad = |error: String| Err(ConfigError::Invalid { option: "route", error });
            if !r.path.starts_with('/') || r.path.contains('?') {
                return bad(format!("path {:?} must start with '/' and have no query", r.path));
            }
            if r.path == HEALTH_PATH || r.path == READY_PATH {
                return bad(format!("path {} is reserved for health checks", r.path));
            }
            if self.routes[..i].iter().any(|o| o.path == r.path) {
                return bad(format!("path {:?} is listed twice", r.path));
            }
            if r.auth != crate::auth::Mode::None && self.verifier.is_none() {
                return bad(format!(
                    "route {:?} takes tokens (auth = {:?}) but no JWT key is configured (jwt_secret_file, jwt_public_key)",
                    r.path, r.auth
                ));
            }
            // RFC 6455 4.1: subprotocol names are HTTP tokens.
            if let Some(p) = r
                .subprotocols
                .iter()
                .find(|p| p.is_empty() || !p.bytes().all(is_token_byte))
            {
                return bad(format!("subprotocol {p:?} is not an HTTP token"));
            }
        }
        Ok(())
    }

    /// The route serving `path`, if any, and its index in `routes`.
    pub fn route(&self, path: &str) -> Option<(RouteId, &Route)> {
        let i = self.routes.iter().position(|r| r.path == path)?;
        Some((RouteId(i as u32), &self.routes[i]))
    }

    pub fn route_by_id(&self, id: RouteId) -> &Route {
        &self.routes[id.0 as usize]
    }
}

/// A route's backend settings: required on a `backend` route, refused on
/// any other.
fn backend(r: &RouteOptions) -> Result<Option<std::sync::Arc<Backend>>, ConfigError> {
    let bad = |option: &'static str, error: String| ConfigError::Invalid { option, error };
    let given = (r.upstream_ca.is_some() && !has_hooks(r))
        || r.upstream_timeout_ms.is_some()
        || r.max_batch_bytes.is_some()
        || r.upstream_retries.is_some();
    let Some(url) = r.upstream.as_deref().filter(|_| r.protocol == RouteProtocol::Backend) else {
        if r.protocol == RouteProtocol::Backend {
            return Err(bad(
                "upstream",
                format!("route {:?} is a backend route without an upstream", r.path),
            ));
        }
        if r.upstream.is_some() || given {
            return Err(bad(
                "upstream",
                format!("route {:?}: upstream settings are for backend routes", r.path),
            ));
        }
        return Ok(None);
    };
    let upstream = crate::upstream::Upstream::parse(url, r.upstream_ca.as_deref()).map_err(|e| bad("upstream", e))?;
    let timeout_ms = r.upstream_timeout_ms.unwrap_or(10_000);
    in_range("upstream_timeout_ms", timeout_ms, 1, 3_600_000)?;
    let max_batch_bytes = r.max_batch_bytes.unwrap_or(DEFAULT_MAX_BATCH_BYTES);
    in_range("max_batch_bytes", max_batch_bytes, 1, 64 * MIB)?;
    let retries = r.upstream_retries.unwrap_or(5);
    in_range("upstream_retries", u64::from(retries), 0, 100)?;
    Ok(Some(std::sync::Arc::new(Backend {
        upstream,
        timeout_ms,
        max_batch_bytes,
        retries,
    })))
}

fn has_hooks(r: &RouteOptions) -> bool {
    r.connect_hook.is_some() || r.subscribe_hook.is_some() || r.publish_hook.is_some()
}

/// A pub/sub route's hooks: refused on other routes.
fn hooks(r: &RouteOptions) -> Result<Option<std::sync::Arc<Hooks>>, ConfigError> {
    let bad = |option: &'static str, error: String| ConfigError::Invalid { option, error };
    if !has_hooks(r) {
        if r.hook_timeout_ms.is_some() {
            return Err(bad("hook_timeout_ms", format!("route {:?} has no hooks", r.path)));
        }
        return Ok(None);
    }
    if !matches!(r.protocol, RouteProtocol::Pubsub | RouteProtocol::Stomp) {
        return Err(bad(
            "connect_hook",
            format!("route {:?}: hooks are for pubsub and stomp routes", r.path),
        ));
    }
    let ca = r.upstream_ca.as_deref();
    let parse = |option: &'static str, url: &Option<String>| {
        url.as_deref()
            .map(|u| crate::upstream::Upstream::parse(u, ca).map_err(|e| bad(option, e)))
            .transpose()
    };
    let timeout_ms = r.hook_timeout_ms.unwrap_or(5_000);
    in_range("hook_timeout_ms", timeout_ms, 1, 600_000)?;
    Ok(Some(std::sync::Arc::new(Hooks {
        connect: parse("connect_hook", &r.connect_hook)?,
        subscribe: parse("subscribe_hook", &r.subscribe_hook)?,
        publish: parse("publish_hook", &r.publish_hook)?,
        timeout_ms,
    })))
}

/// RFC 7230 3.2.6 tchar.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_toml(text: &str) -> Result<Options, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn workers_stay_within_the_cpus_unless_oversubscribed() {
        let with = |workers: usize, oversubscribe: bool| Options {
            workers: Some(workers),
            oversubscribe,
            ..Options::default()
        };
        assert_eq!(with(2, false).validate(2).unwrap().workers, 2);
        let e = with(3, false).validate(2).unwrap_err().to_string();
        assert!(e.starts_with("workers: 3 is more than the 2 CPUs"), "{e}");
        assert_eq!(with(256, true).validate(2).unwrap().workers, 256);
        assert_eq!(
            with(257, true).validate(2).unwrap_err().to_string(),
            "workers: 257 is outside 1..=256"
        );
    }

    #[test]
    fn defaults_start_on_machines_of_any_size() {
        let c = Options::default().validate(384).unwrap();
        assert_eq!(c.workers, 256);
        let e = Options {
            workers: Some(300),
            ..Options::default()
        }
        .validate(384)
        .unwrap_err();
        assert_eq!(e.to_string(), "workers: 300 is outside 1..=256");
    }

    #[test]
    fn listeners_collide_only_where_the_kernel_would_say_so() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(overlap(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(overlap(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(overlap(ip("::"), ip("127.0.0.1")));
        assert!(overlap(ip("::1"), ip("::")));
        assert!(!overlap(ip("0.0.0.0"), ip("::1")));
        assert!(!overlap(ip("127.0.0.1"), ip("127.0.0.2")));
        assert!(!overlap(ip("127.0.0.1"), ip("::1")));
    }

    #[test]
    fn the_mesh_stays_within_its_budget() {
        let capacity = |workers: usize, asked: Option<usize>| mesh_ring_capacity(workers, asked);
        // Few workers: the default.
        assert_eq!(capacity(2, None).unwrap(), 4096);
        assert_eq!(capacity(32, None).unwrap(), 4096);
        // Many: the largest power of two within the budget, at least 16.
        for workers in [64, 128, 256] {
            let c = capacity(workers, None).unwrap();
            let rings = workers * (workers - 1);
            assert!(c.is_power_of_two() && c >= MIN_RING_CAPACITY, "{workers}: {c}");
            assert!(rings * c * MESH_SLOT_BYTES <= MESH_BUDGET_BYTES, "{workers}: {c}");
            assert!(rings * c * 2 * MESH_SLOT_BYTES > MESH_BUDGET_BYTES, "{workers}: {c}");
        }
        // Asked for: as asked, unless over the budget.
        assert_eq!(capacity(4, Some(100)).unwrap(), 100);
        let e = capacity(256, Some(4096)).unwrap_err().to_string();
        assert!(
            e.starts_with("mesh_ring_capacity: 4096 envelopes in each of 65280 rings"),
            "{e}"
        );
        assert!(capacity(2, Some(15)).is_err());
    }

    #[test]
    fn defaults() {
        let c = Options::default().validate(2).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.workers, 2);
        assert_eq!(c.limits.max_frame_bytes, 16 * MIB);
        assert_eq!(c.route("/echo").unwrap().1.protocol, RouteProtocol::Echo);
        let stomp = c.route("/stomp").unwrap().1;
        assert_eq!(stomp.protocol, RouteProtocol::Stomp);
        assert_eq!(stomp.subprotocols, ["v12.stomp", "v11.stomp", "v10.stomp"]);
        let file = parse_toml("[[route]]\npath = \"/s\"\nprotocol = \"stomp\"\n").unwrap();
        let c = file.validate(1).unwrap();
        assert_eq!(c.route("/s").unwrap().1.subprotocols.len(), 3);
        assert_eq!(c.handshake_timeout_ms, 5000);
        assert_eq!((c.ping_interval_ms, c.idle_timeout_ms), (30_000, 75_000));
    }

    #[test]
    fn flags_override_file() {
        let file = parse_toml("workers = 3\nmax_frame_bytes = 100\n[[route]]\npath = \"/e\"\nprotocol = \"echo\"\nsubprotocols = [\"chat\"]\n").unwrap();
        let cli = Options {
            workers: Some(1),
            ..Options::default()
        };
        let c = cli.over(file).validate(2).unwrap();
        assert_eq!(c.workers, 1);
        assert_eq!(c.limits.max_frame_bytes, 100);
        assert_eq!(c.route("/e").unwrap().1.subprotocols, vec!["chat".to_string()]);
        assert!(c.route("/echo").is_none());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(parse_toml("wrkers = 3").is_err());
        assert!(parse_toml("driver = \"kqueue\"").is_err());
        let e = Options {
            workers: Some(0),
            ..Options::default()
        }
        .validate(2)
        .unwrap_err();
        assert_eq!(e.to_string(), "workers: 0 is outside 1..=2");
        let e = Options {
            ping_interval_ms: Some(5000),
            idle_timeout_ms: Some(5000),
            ..Options::default()
        }
        .validate(2)
        .unwrap_err();
        assert!(e.to_string().starts_with("idle_timeout_ms"));
        // A core's budget holds at least two subscribers at their own limit.
        let budget = |core: usize| {
            Options {
                max_outbound_bytes: Some(4096),
                max_core_outbound_bytes: Some(core),
                ..Options::default()
            }
            .validate(2)
        };
        assert!(budget(8192).is_ok());
        // Connection caps: per address at most the server's.
        let caps = |max: usize, per_ip: usize| {
            Options {
                max_connections: Some(max),
                max_connections_per_ip: Some(per_ip),
                ..Options::default()
            }
            .validate(2)
        };
        assert!(caps(10, 10).is_ok());
        assert_eq!(
            caps(10, 11).unwrap_err().to_string(),
            "max_connections_per_ip: 11 is outside 0..=10"
        );
        // The default leaves a sixteenth of the open-files limit (at least
        // 64) to what is not a connection.
        let files = {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one rlimit.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
            l.rlim_cur as usize
        };
        let max = Options::default().validate(2).unwrap().max_connections;
        assert_eq!(max, files - (files / 16).max(64));
        assert_eq!(
            budget(8191).unwrap_err().to_string(),
            "max_core_outbound_bytes: 8191 is outside 8192..=68719476736"
        );
        let bad_route = parse_toml("[[route]]\npath = \"/healthz\"\nprotocol = \"echo\"\n").unwrap();
        assert!(bad_route.validate(2).is_err());
        let dup = parse_toml(
            "[[route]]\npath = \"/a\"\nprotocol = \"echo\"\n[[route]]\npath = \"/a\"\nprotocol = \"echo\"\n",
        )
        .unwrap();
        assert!(dup.validate(2).is_err());
        let bad_proto =
            parse_toml("[[route]]\npath = \"/a\"\nprotocol = \"echo\"\nsubprotocols = [\"a b\"]\n").unwrap();
        assert!(bad_proto.validate(2).is_err());
    }

    #[test]
    fn limits_at_their_edges() {
        let ok = Options {
            max_frame_bytes: Some(GIB),
            max_head_bytes: Some(256),
            ..Options::default()
        };
        assert!(ok.validate(1).is_ok());
        let over = Options {
            max_frame_bytes: Some(GIB + 1),
            ..Options::default()
        };
        assert!(over.validate(1).is_err());
        let under = Options {
            max_head_bytes: Some(255),
            ..Options::default()
        };
        assert!(under.validate(1).is_err());
    }

    #[test]
    fn origins() {
        let c = Options {
            allowed_origins: Some(vec!["https://a.example".into()]),
            ..Options::default()
        }
        .validate(1)
        .unwrap();
        assert_eq!(
            c.route("/echo").unwrap().1.origins,
            OriginPolicy::List(vec!["https://a.example".into()])
        );
        let c = Options {
            allowed_origins: Some(vec!["*".into()]),
            ..Options::default()
        }
        .validate(1)
        .unwrap();
        assert_eq!(c.route("/echo").unwrap().1.origins, OriginPolicy::Any);
    }

    #[test]
    fn auth_defaults_follow_the_keys_and_routes_need_one_to_take_tokens() {
        use crate::auth::Mode;
        let c = Options::default().validate(1).unwrap();
        assert!(c.verifier.is_none());
        assert!(c.routes.iter().all(|r| r.auth == Mode::None));
        let secret = std::env::temp_dir().join(format!("sluice-config-secret-{}", std::process::id()));
        std::fs::write(&secret, [b'k'; 32]).unwrap();
        let with_key = Options {
            jwt_secret_file: Some(secret.clone()),
            ..Options::default()
        };
        let c = with_key.clone().validate(1).unwrap();
        assert!(c.verifier.is_some());
        assert!(c.routes.iter().all(|r| r.auth == Mode::Required));
        let file = parse_toml(
            "[[route]]\npath = \"/p\"\nprotocol = \"pubsub\"\nauth = \"optional\"\nanonymous_subscribe = [\"a.*\"]\n",
        )
        .unwrap();
        let c = file.clone().over(with_key.clone()).validate(1).unwrap();
        assert_eq!(c.routes[0].auth, Mode::Optional);
        assert_eq!(c.routes[0].anonymous.subscribe, vec![Box::from("a.*")]);
        let err = file.validate(1).unwrap_err().to_string();
        assert!(err.contains("no JWT key is configured"), "{err}");
        let bad_grant =
            parse_toml("[[route]]\npath = \"/p\"\nprotocol = \"pubsub\"\nanonymous_publish = [\"a..b\"]\n").unwrap();
        assert!(bad_grant.over(with_key).validate(1).is_err());
        // 31 bytes (a trailing newline is not counted): refused.
        std::fs::write(&secret, [b'k'; 31].iter().chain(b"\n").copied().collect::<Vec<u8>>()).unwrap();
        let short = Options {
            jwt_secret_file: Some(secret.clone()),
            ..Options::default()
        };
        let err = short.validate(1).unwrap_err().to_string();
        assert!(err.contains("at least 32"), "{err}");
        std::fs::remove_file(&secret).unwrap();
    }

    #[test]
    fn backend_routes_and_hooks() {
        let route = |body: &str| {
            parse_toml(&format!("[[route]]\npath = \"/a\"\n{body}\n"))
                .unwrap()
                .validate(1)
        };
        let c = route("protocol = \"backend\"\nupstream = \"http://127.0.0.1:3000/ws\"").unwrap();
        let backend = c.routes[0].backend.as_ref().unwrap();
        assert_eq!(backend.upstream.path, "/ws");
        assert_eq!(
            (backend.timeout_ms, backend.max_batch_bytes, backend.retries),
            (10_000, DEFAULT_MAX_BATCH_BYTES, 5)
        );
        for bad in [
            "protocol = \"backend\"",
            "protocol = \"backend\"\nupstream = \"ftp://127.0.0.1/\"",
            "protocol = \"backend\"\nupstream = \"http://127.0.0.1/\"\nupstream_timeout_ms = 0",
            "protocol = \"backend\"\nupstream = \"http://127.0.0.1/\"\nmax_batch_bytes = 0",
            "protocol = \"backend\"\nupstream = \"http://127.0.0.1/\"\nupstream_retries = 101",
            "protocol = \"echo\"\nupstream = \"http://127.0.0.1/\"",
            "protocol = \"pubsub\"\nmax_batch_bytes = 10",
            "protocol = \"echo\"\nconnect_hook = \"http://127.0.0.1/\"",
            "protocol = \"backend\"\nupstream = \"http://127.0.0.1/\"\npublish_hook = \"http://127.0.0.1/\"",
            "protocol = \"pubsub\"\nhook_timeout_ms = 10",
            "protocol = \"pubsub\"\nsubscribe_hook = \"127.0.0.1:80\"",
        ] {
            assert!(route(bad).is_err(), "{bad}");
        }
        let c = route("protocol = \"stomp\"\npublish_hook = \"http://127.0.0.1:9/p\"").unwrap();
        let hooks = c.routes[0].hooks.as_ref().unwrap();
        assert!(hooks.connect.is_none() && hooks.subscribe.is_none());
        assert_eq!(
            (hooks.publish.as_ref().unwrap().path.as_str(), hooks.timeout_ms),
            ("/p", 5_000)
        );
    }
}
