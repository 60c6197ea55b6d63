//! STOMP 1.2 over WebSocket (the STOMP 1.2 specification), sans-I/O.
//!
//! - `frame`: the codec (frames across and within WebSocket messages).
//! - `session`: what each client frame does and what is answered
//!   (negotiation, subscriptions, receipts, transactions, errors).
//! - `conn`: the two together, one connection's protocol state.

pub mod conn;
pub mod frame;
pub mod session;
