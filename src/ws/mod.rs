//! RFC 6455 without I/O: the opening handshake, frames, masking, messages and
//! close codes. Every rule here is a function of bytes, so it is tested with
//! byte slices, property tests and fuzzers; `conn` moves the bytes.

pub mod close;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod message;
pub mod utf8;

pub use close::{Close, CloseCode};
pub use frame::{Opcode, Role};
pub use message::{Event, Limits, MessageKind, MessageReader, Step, Violation};
