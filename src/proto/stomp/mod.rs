//! STOMP 1.2 over WebSocket (the STOMP 1.2 specification), sans-I/O.
//!
//! `frame`: the codec. The session (CONNECT negotiation, subscriptions,
//! receipts, transactions, heart-beats) comes on top of it.

pub mod frame;
