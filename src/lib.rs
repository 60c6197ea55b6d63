//! sluice: a thread-per-core WebSocket gateway on monoio.
//!
//! `ws` is RFC 6455 as pure functions over bytes; `conn` runs one
//! connection's life over a socket; `server` owns the process (workers,
//! listeners, signals); `proto` holds the application protocols spoken over
//! a connection; `config` is every option with its default and limit.

pub mod admin;
pub mod auth;
pub mod config;
pub mod conn;
pub mod proto;
pub mod pubsub;
pub mod server;
pub mod stats;
pub mod sys;
pub mod tls;
pub mod topic;
pub mod ws;
