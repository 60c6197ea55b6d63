//! The echo route: every data message goes back to its sender unchanged,
//! text as text and binary as binary. The baseline for conformance
//! (Autobahn) and throughput.

use crate::conn::outbound::Outbound;
use crate::conn::pool::BufferPool;
use crate::ws::MessageKind;

pub fn on_message(kind: MessageKind, payload: &[u8], out: &mut Outbound, pool: &BufferPool) {
    out.push_frame(pool, kind.opcode(), payload);
}
