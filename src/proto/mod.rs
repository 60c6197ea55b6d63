//! The application protocols spoken over an upgraded connection, without
//! I/O: each parses what a client sends, decides what it asks for (reply,
//! subscribe, unsubscribe, publish, a fresh token, close) and encodes what
//! the server says. The connection carries it out (`conn::app`); a
//! protocol never holds a session, a socket or a buffer of the
//! connection's, and its tests drive it with bytes.
//!
//! - `native`: the native pub/sub protocol (docs/PROTOCOL.md).
//! - `stomp`: STOMP 1.2.
//! - `over_http`: WebSocket-over-HTTP events and GRIP control messages,
//!   what a backend route exchanges with its upstream.

pub mod native;
pub mod over_http;
pub mod stomp;
