//! The compression contexts of one core's connections that agreed to
//! permessage-deflate with context takeover (RFC 7692 7.1.1, the route's
//! `dedicated` mode): a compressor for a connection whose messages may
//! refer back into those before them, an inflater for one whose client's
//! may. Each is made on first use; what an agreement may need is reserved
//! against the core's `--deflate-dedicated-bytes` when it is made, and a
//! connection the budget cannot hold agrees to no context takeover
//! instead (`Mode::Shared`'s terms), which needs nothing of its own.
//!
//! **Order.** A compressor with context takeover must see the messages in
//! the order the client inflates them: in the order they go on the wire.
//! A connection's own replies are compressed as they are queued (its
//! output is one queue), and its deliveries as they are written
//! (`Sessions::write`): those compressed ahead of its replies go before
//! them. This module keeps the contexts; `sessions` keeps the order.

use std::cell::{Cell, RefCell};

use bytes::Bytes;
use slotmap::SecondaryMap;

use super::message::frame_of;
use super::SessionKey;
use crate::ws::deflate::{Agreement, Deflater, Inflater, Totals};
use crate::ws::Opcode;

/// One connection's contexts, as its agreement asks.
struct Contexts {
    agreement: Agreement,
    /// What it reserved of the core's budget.
    reserved: usize,
    /// Boxed: a connection that agreed but has not used them holds two
    /// pointers, not their handles.
    deflater: Option<Box<Deflater>>,
    inflater: Option<Box<Inflater>>,
}

/// What a core's dedicated contexts did and hold, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DedicatedSnapshot {
    /// Connections with contexts of their own.
    pub sessions: u64,
    /// Bytes reserved for them.
    pub reserved_bytes: u64,
    /// Connections that asked for context takeover and got none, the
    /// budget being spent.
    pub refused: u64,
    pub deflate: Totals,
    pub inflate: Totals,
}

pub struct Dedicated {
    budget: usize,
    level: u32,
    /// The largest window a compressor keeps (`--deflate-window-bits`).
    window_bits: u8,
    reserved: Cell<usize>,
    refused: Cell<u64>,
    contexts: RefCell<SecondaryMap<SessionKey, Box<Contexts>>>,
    /// What all the contexts compressed and inflated (kept as they work,
    /// so the metrics never visit every connection).
    deflated: Cell<Totals>,
    inflated: Cell<Totals>,
    /// Compressed bytes on their way into a frame.
    scratch: RefCell<Vec<u8>>,
}

/// The scratch buffer is kept up to this size.
const SCRATCH_KEPT_BYTES: usize = 64 * 1024;

impl Dedicated {
    pub fn new(budget: usize, level: u32, window_bits: u8) -> Dedicated {
        Dedicated {
            budget,
            level,
            window_bits,
            reserved: Cell::new(0),
            refused: Cell::new(0),
            contexts: RefCell::new(SecondaryMap::new()),
            deflated: Cell::new(Totals::default()),
            inflated: Cell::new(Totals::default()),
            scratch: RefCell::new(Vec::new()),
        }
    }

    /// Session `key` is to agree to `agreement`: what it takes is reserved
    /// if the budget holds it, and it is agreed as it is; otherwise it is
    /// agreed with no context takeover. Returns what is agreed.
    pub fn agree(&self, key: SessionKey, agreement: Agreement) -> Agreement {
        let bytes = agreement.context_bytes(self.window_bits);
        if bytes == 0 {
            return agreement;
        }
        let reserved = self.reserved.get();
        if reserved.saturating_add(bytes) > self.budget {
            self.refused.set(self.refused.get() + 1);
            return agreement.without_takeover();
        }
        self.reserved.set(reserved + bytes);
        let contexts = Contexts {
            agreement,
            reserved: bytes,
            deflater: None,
            inflater: None,
        };
        if let Some(old) = self.contexts.borrow_mut().insert(key, Box::new(contexts)) {
            // Not expected: one agreement per session.
            self.reserved.set(self.reserved.get() - old.reserved);
        }
        agreement
    }

    /// Session `key` has ended: its contexts are freed and its reservation
    /// given back.
    pub fn remove(&self, key: SessionKey) {
        let Some(contexts) = self.contexts.borrow_mut().remove(key) else {
            return;
        };
        self.reserved.set(self.reserved.get() - contexts.reserved);
    }

    /// Whether session `key`'s messages are compressed with its own
    /// compressor, in the order they are sent.
    pub fn compresses(&self, key: SessionKey) -> bool {
        self.contexts
            .borrow()
            .get(key)
            .is_some_and(|c| c.agreement.server_takeover())
    }

    /// `f` of `parts` (one payload) compressed by session `key`'s own
    /// compressor, keeping its window for the next message; `None` if it
    /// has none. Once compressed, a message must be sent so: the client's
    /// window has to hold what ours does.
    pub fn compressed<R>(&self, key: SessionKey, parts: &[&[u8]], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let mut contexts = self.contexts.borrow_mut();
        let c = contexts.get_mut(key).filter(|c| c.agreement.server_takeover())?;
        let (level, bits) = (self.level, c.agreement.compressor_window_bits(self.window_bits));
        let deflater = c.deflater.get_or_insert_with(|| Box::new(Deflater::new(level, bits)));
        let mut packed = self.scratch.borrow_mut();
        packed.clear();
        deflater.compress_parts(parts, &mut packed, true);
        let mut deflated = self.deflated.get();
        deflated.add(parts.iter().map(|p| p.len()).sum(), packed.len());
        self.deflated.set(deflated);
        drop(contexts);
        let r = f(&packed);
        if packed.capacity() > SCRATCH_KEPT_BYTES {
            *packed = Vec::new();
        }
        Some(r)
    }

    /// A whole frame (`opcode`, RSV1 set) of `parts` compressed by session
    /// `key`'s own compressor (see `compressed`).
    pub fn frame(&self, key: SessionKey, opcode: Opcode, parts: &[&[u8]]) -> Option<Bytes> {
        self.compressed(key, parts, |packed| frame_of(opcode, packed))
    }

    /// Whether session `key`'s client takes over its context: its messages
    /// are inflated by its own inflater.
    pub fn inflates(&self, key: SessionKey) -> bool {
        self.contexts
            .borrow()
            .get(key)
            .is_some_and(|c| c.agreement.client_takeover())
    }

    /// `f` of session `key`'s own inflater, made on first use; `None` if
    /// its client does not take over its context.
    pub fn with_inflater<R>(&self, key: SessionKey, f: impl FnOnce(&mut Inflater) -> R) -> Option<R> {
        let mut contexts = self.contexts.borrow_mut();
        let c = contexts.get_mut(key).filter(|c| c.agreement.client_takeover())?;
        let inflater = c.inflater.get_or_insert_with(Box::default);
        let before = inflater.totals();
        let r = f(inflater);
        let after = inflater.totals();
        let mut inflated = self.inflated.get();
        inflated.messages += after.messages - before.messages;
        inflated.bytes_in += after.bytes_in - before.bytes_in;
        inflated.bytes_out += after.bytes_out - before.bytes_out;
        self.inflated.set(inflated);
        Some(r)
    }

    pub fn snapshot(&self) -> DedicatedSnapshot {
        DedicatedSnapshot {
            sessions: self.contexts.borrow().len() as u64,
            reserved_bytes: self.reserved.get() as u64,
            refused: self.refused.get(),
            deflate: self.deflated.get(),
            inflate: self.inflated.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an agreed connection holds before its first compressed message.
    #[test]
    fn an_unused_agreement_holds_little() {
        assert!(
            std::mem::size_of::<Contexts>() <= 64,
            "{}",
            std::mem::size_of::<Contexts>()
        );
    }
}
