//! sluice: a thread-per-core WebSocket gateway on monoio.
//!
//! The modules, lowest first; each uses only modules before it in this
//! list (docs/ARCHITECTURE.md has the table, `tests/layers.rs` checks it):
//! `ws` (RFC 6455 over bytes), `tls`, `topic`, `stats`, `upstream` (HTTP
//! to an application), `sys` (the OS: sockets, eventfds), `auth`, `config`, `proto` (the application
//! protocols, without I/O), `pubsub` (topics, the mesh between cores,
//! every session's queued deliveries), `cluster` (the NATS bridge to other
//! nodes), `conn` (one connection's life over a socket), `admin` (the admin
//! HTTP port), `server` (the process).

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod proto;
pub mod pubsub;
pub mod server;
pub mod stats;
pub mod sys;
pub mod tls;
pub mod topic;
pub mod upstream;
pub mod ws;
