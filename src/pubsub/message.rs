//! A published message, and what each kind of subscriber gets of it.
//!
//! A message is encoded at most once per core for each protocol: the native
//! `MSG` frame is shared by every native subscriber; a STOMP MESSAGE frame
//! differs per subscription only in its first headers (`subscription`,
//! `ack`), so a STOMP subscriber gets a small head of its own (WebSocket
//! header, command, those headers) followed by the rest of the frame (the
//! common headers, the body, the NUL), encoded once and shared by all. Both
//! go out in one vectored write; the body is never copied per subscriber,
//! and a head of its own is a few dozen bytes, which matters as each one is
//! cold by the time the kernel copies it.
//!
//! Subscribers whose subscriptions have the same id and ack mode get the
//! same MESSAGE, head included: clients number their subscriptions from
//! zero (stomp.js names them `sub-0`, `sub-1` ...), so most subscribers of a
//! topic share one head, which stays in cache while it is sent a thousand
//! times. When the body is small (`WHOLE_FRAME_BODY_BYTES`) such a shared
//! MESSAGE is made whole, head and rest in one buffer: a copy of the body
//! once per distinct subscription on the core (at most `SHARED_HEADS`),
//! never per subscriber, saves every subscriber an iovec and a reference
//! count.

use std::cell::{OnceCell, RefCell};

use bytes::{BufMut, Bytes, BytesMut};

use super::topics::{is_queue, StompTarget, Via};
use crate::proto::native;
use crate::proto::stomp::frame::push_value;
use crate::ws::deflate::{Deflater, MAX_WINDOW_BITS};
use crate::ws::frame::{encode_header, FrameHeader, Opcode, MAX_HEADER_BYTES};
use crate::ws::MessageKind;

/// A publish on its way to subscribers (it crosses cores: all shared bytes).
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic table key: a topic name, or a queue's key.
    pub key: Bytes,
    pub kind: MessageKind,
    pub body: Bytes,
    /// A STOMP publisher's headers that pass through to MESSAGE frames,
    /// encoded (`name:value\n` lines, escaped). `None` for native and
    /// admin API publishes, which get a `content-type` by their kind.
    pub stomp_headers: Option<Bytes>,
    /// Unique per publish: the publishing core and its sequence number.
    pub id: u64,
    /// The native `MSG` frame, when the publisher already made it (its
    /// body is then a slice of it).
    pub native: Option<Bytes>,
    /// It may go out compressed (permessage-deflate). A publisher that
    /// mixes a secret with text an attacker chooses turns it off: their
    /// compressed size would tell the secret byte by byte (CRIME, BREACH).
    pub compress: bool,
}

impl Message {
    /// A native (or admin API) publish: its frame is made here, once.
    pub fn native(kind: MessageKind, topic: &[u8], payload: &[u8], id: u64) -> Message {
        let frame = native::message_frame(kind, topic, payload);
        let body = frame.slice(frame.len() - payload.len()..);
        let key = native::topic_of(&frame, topic.len(), payload.len());
        Message {
            key,
            kind,
            body,
            stomp_headers: None,
            id,
            native: Some(frame),
            compress: true,
        }
    }

    /// The STOMP `message-id`: `<core>-<sequence>`.
    pub fn message_id(&self) -> String {
        format!("{}-{}", self.id >> 48, self.id & ((1 << 48) - 1))
    }

    /// The STOMP `destination` of the message's key, escaped for a header
    /// value (a name may hold `:`).
    fn destination(&self) -> Vec<u8> {
        let (prefix, name) = if is_queue(&self.key) {
            ("/queue/", &self.key[1..])
        } else {
            ("/topic/", &self.key[..])
        };
        // Names are ASCII (checked when published).
        let name = std::str::from_utf8(name).unwrap_or_default();
        let mut d = Vec::with_capacity(self.key.len() + 16);
        d.extend_from_slice(prefix.as_bytes());
        push_value(&mut d, name, true);
        d
    }
}

/// Encodes a STOMP publisher's pass-through headers for `Message`.
pub fn encode_stomp_headers(headers: &[(String, String)]) -> Bytes {
    let mut out = Vec::new();
    for (name, value) in headers {
        push_value(&mut out, name, true);
        out.push(b':');
        push_value(&mut out, value, true);
        out.push(b'\n');
    }
    Bytes::from(out)
}

/// Most pass-through headers a message from elsewhere (another node) may
/// carry, and the most bytes they may take encoded: a STOMP frame's own
/// limits (64 headers; `proto::stomp::frame`).
const MAX_FOREIGN_HEADERS: usize = 64;
const MAX_FOREIGN_HEADER_BYTES: usize = 64 * 1024;

/// Pass-through headers that came from elsewhere (another node, through
/// the bus), encoded as `encode_stomp_headers` encodes them, made safe to
/// put into MESSAGE frames: parsed back (STOMP 1.2 escapes only, UTF-8,
/// no NUL or CR, a `:` between name and value), rid of the names a
/// MESSAGE sets itself (`proto::stomp::session::passed_through`), bounded,
/// and encoded again. `None` if they are not such headers.
pub fn checked_stomp_headers(block: &[u8]) -> Option<Bytes> {
    if block.len() > MAX_FOREIGN_HEADER_BYTES {
        return None;
    }
    let text = std::str::from_utf8(block).ok()?;
    let mut headers = Vec::new();
    for line in text.strip_suffix('\n').unwrap_or(text).split('\n') {
        if text.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        let (name, value) = (unescape(name)?, unescape(value)?);
        if name.is_empty() || headers.len() == MAX_FOREIGN_HEADERS {
            return None;
        }
        headers.push((name, value));
    }
    let kept = crate::proto::stomp::session::passed_through(headers);
    Some(encode_stomp_headers(&kept))
}

/// A STOMP 1.2 header name or value without its escapes; `None` for an
/// undefined escape, a NUL or a CR.
fn unescape(s: &str) -> Option<String> {
    if s.contains(['\0', '\r']) {
        return None;
    }
    crate::proto::stomp::frame::header_text(s.as_bytes(), true).ok()
}

/// A core's permessage-deflate compressor for the sessions that agreed to
/// no context takeover (RFC 7692 7.1.1): every message is compressed on
/// its own, so one compressor serves them all, and what it made for one
/// subscriber is good for every other. Made on first use.
pub struct Compressor {
    deflater: RefCell<Option<Deflater>>,
    level: u32,
    /// Shorter payloads are sent as they are.
    min_bytes: usize,
    /// Compressed bytes on their way into a frame.
    scratch: RefCell<Vec<u8>>,
    /// What it has compressed (messages that did not shrink included).
    totals: std::cell::Cell<crate::ws::deflate::Totals>,
}

impl Compressor {
    pub fn new(level: u32, min_bytes: usize) -> Compressor {
        Compressor {
            deflater: RefCell::new(None),
            level,
            min_bytes,
            scratch: RefCell::new(Vec::new()),
            totals: Default::default(),
        }
    }

    /// What it has compressed so far.
    pub fn totals(&self) -> crate::ws::deflate::Totals {
        self.totals.get()
    }

    /// Shorter payloads are sent as they are.
    pub fn min_bytes(&self) -> usize {
        self.min_bytes
    }

    /// Whether a payload of `len` bytes goes out compressed to a peer whose
    /// window is `bits` (RFC 7692 7.1.2.1): messages are compressed with
    /// the largest window, and no back-reference reaches past a message's
    /// start, so one that fits the peer's window is good for it.
    pub fn worth(&self, len: usize, bits: u8) -> bool {
        len >= self.min_bytes && (bits >= MAX_WINDOW_BITS || len <= 1 << bits)
    }

    /// `parts`, one payload, compressed on its own (RFC 7692 7.2.1) and
    /// appended to `out`; `false` (and `out` as it was) when that is no
    /// shorter, so the message is better sent as it is.
    pub fn compress(&self, parts: &[&[u8]], out: &mut Vec<u8>) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let start = out.len();
        let mut deflater = self.deflater.borrow_mut();
        let deflater = deflater.get_or_insert_with(|| Deflater::new(self.level, MAX_WINDOW_BITS));
        deflater.compress_parts(parts, out, false);
        let mut totals = self.totals.get();
        totals.add(len, out.len() - start);
        self.totals.set(totals);
        if out.len() - start >= len {
            out.truncate(start);
            return false;
        }
        true
    }

    /// `f` of `parts` compressed (`None`: compressing does not shrink
    /// them), in the core's scratch buffer.
    pub fn compressed<R>(&self, parts: &[&[u8]], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        let mut packed = self.scratch.borrow_mut();
        packed.clear();
        let shrunk = self.compress(parts, &mut packed);
        let r = f(shrunk.then_some(&packed[..]));
        // A large message's buffer is not kept.
        if packed.capacity() > SCRATCH_KEPT_BYTES {
            *packed = Vec::new();
        }
        r
    }

    /// A whole frame (`opcode`, RSV1 set) of `parts` compressed, or `None`
    /// when compressing does not shrink them.
    pub fn frame(&self, opcode: Opcode, parts: &[&[u8]]) -> Option<Bytes> {
        self.compressed(parts, |packed| packed.map(|packed| frame_of(opcode, packed)))
    }
}

/// The compressor's scratch buffer is kept up to this size.
const SCRATCH_KEPT_BYTES: usize = 64 * 1024;

/// A whole unmasked frame, RSV1 set, of the compressed `packed`.
pub(crate) fn frame_of(opcode: Opcode, packed: &[u8]) -> Bytes {
    let mut head = [0u8; MAX_HEADER_BYTES];
    let n = encode_header(
        &FrameHeader {
            fin: true,
            rsv1: true,
            opcode,
            mask: None,
            payload_len: packed.len() as u64,
        },
        &mut head,
    );
    let mut frame = BytesMut::with_capacity(n + packed.len());
    frame.put_slice(&head[..n]);
    frame.put_slice(packed);
    frame.freeze()
}

/// How a subscriber that agreed to permessage-deflate takes a message:
/// the window its messages may use, and the core's compressor.
#[derive(Clone, Copy)]
pub struct Deflating<'c> {
    pub window_bits: u8,
    pub compressor: &'c Compressor,
}

/// One message's encodings on one core, each made on first use.
pub struct Fanout<'m> {
    pub message: &'m Message,
    native: OnceCell<Bytes>,
    raw: OnceCell<Bytes>,
    stomp: OnceCell<StompShared>,
    /// MESSAGE frames made so far, by subscription (the first `SHARED_HEADS`).
    heads: RefCell<Vec<(StompTarget, StompParts)>>,
    /// The compressed encodings (`None` inside: not worth compressing).
    native_deflated: OnceCell<Option<Bytes>>,
    raw_deflated: OnceCell<Option<Bytes>>,
    /// A STOMP MESSAGE's shared rest, compressed on its own.
    stomp_deflated: OnceCell<Option<Bytes>>,
    deflated_heads: RefCell<Vec<(StompTarget, Bytes)>>,
}

/// Distinct subscriptions per message whose MESSAGE frames are kept for
/// reuse.
const SHARED_HEADS: usize = 8;

/// Bodies up to this size are copied into a shared MESSAGE frame made whole.
pub const WHOLE_FRAME_BODY_BYTES: usize = 4096;

/// One MESSAGE frame, in one or two parts.
pub struct StompParts {
    parts: [Bytes; 2],
    count: usize,
}

impl Clone for StompParts {
    /// Counts a reference only for the parts in use.
    fn clone(&self) -> StompParts {
        let mut parts = [Bytes::new(), Bytes::new()];
        for (to, from) in parts.iter_mut().zip(self.as_slice()) {
            *to = from.clone();
        }
        StompParts {
            parts,
            count: self.count,
        }
    }
}

impl StompParts {
    pub fn as_slice(&self) -> &[Bytes] {
        &self.parts[..self.count]
    }

    /// The parts, to be moved out (`std::mem::take`).
    pub fn as_mut_slice(&mut self) -> &mut [Bytes] {
        &mut self.parts[..self.count]
    }
}

/// What every STOMP subscriber's MESSAGE shares.
struct StompShared {
    message_id: String,
    /// The rest of the frame after the subscription's own headers: the
    /// common headers from `message-id`, the blank line, the body and the
    /// NUL.
    rest: Bytes,
}

const MESSAGE_SUBSCRIPTION: &[u8] = b"MESSAGE\nsubscription:";

impl<'m> Fanout<'m> {
    /// The one place that decides what a subscriber gets of the message,
    /// by how it takes it (`via`): each message it is to be sent, as parts
    /// written in order, goes to `emit`. One native `MSG` frame; one STOMP
    /// MESSAGE per subscription of the session to the topic, or (`one`, a
    /// queue's message, which has one consumer) for its first. `idle`:
    /// whether the subscriber's queue is empty (see `stomp`). A new
    /// protocol is a new `Via` and an arm here. A subscriber that agreed
    /// to permessage-deflate (`deflate`) gets the compressed encoding, made
    /// once per core too, where the message may be compressed and it is
    /// worth it; the plain one otherwise (RFC 7692 6: per message).
    pub fn encode(
        &self,
        via: &Via,
        one: bool,
        deflate: Option<Deflating<'_>>,
        arena: &mut BytesMut,
        idle: impl Fn() -> bool,
        mut emit: impl FnMut(&mut [Bytes]),
    ) {
        let deflate = deflate.filter(|_| self.message.compress);
        match via {
            Via::Native => match deflate.and_then(|d| self.native_deflated(d)) {
                Some(frame) => emit(&mut [frame]),
                None => emit(&mut [self.native().clone()]),
            },
            Via::Raw => match deflate.and_then(|d| self.raw_deflated(d)) {
                Some(frame) => emit(&mut [frame]),
                None => emit(&mut [self.raw().clone()]),
            },
            Via::Stomp(targets) => {
                let take = if one { 1 } else { targets.len() };
                for target in &targets[..take] {
                    match deflate.and_then(|d| self.stomp_deflated(target, d)) {
                        Some(mut parts) => emit(&mut parts),
                        None => emit(self.stomp(target, arena, &idle).as_mut_slice()),
                    }
                }
            }
        }
    }

    /// The native `MSG` frame compressed, if worth it for this subscriber.
    fn native_deflated(&self, d: Deflating<'_>) -> Option<Bytes> {
        let frame = self.native();
        let payload = &frame[frame_header_len(frame)..];
        if !d.compressor.worth(payload.len(), d.window_bits) {
            return None;
        }
        let opcode = self.message.kind.opcode();
        self.native_deflated
            .get_or_init(|| d.compressor.frame(opcode, &[payload]))
            .clone()
    }

    /// The payload alone, compressed, if worth it for this subscriber.
    fn raw_deflated(&self, d: Deflating<'_>) -> Option<Bytes> {
        let m = self.message;
        if !d.compressor.worth(m.body.len(), d.window_bits) {
            return None;
        }
        self.raw_deflated
            .get_or_init(|| d.compressor.frame(m.kind.opcode(), &[&m.body]))
            .clone()
    }

    /// One subscription's MESSAGE frame compressed: a head of its own
    /// (WebSocket header with RSV1, then the subscription's own headers as
    /// a stored deflate block, RFC 1951 3.2.4), then the shared rest
    /// compressed once per core. A stored block ends on a byte boundary
    /// and the rest's compression starts afresh, referring to nothing
    /// before it, so the two are one valid deflate stream (RFC 7692
    /// 7.2.1) and the rest is never compressed per subscriber.
    fn stomp_deflated(&self, target: &StompTarget, d: Deflating<'_>) -> Option<[Bytes; 2]> {
        let shared = self.stomp_shared();
        let (_, _, head_len) = self.stomp_head_len(shared, target);
        if !d.compressor.worth(head_len + shared.rest.len(), d.window_bits) {
            return None;
        }
        let rest = self
            .stomp_deflated
            .get_or_init(|| {
                let mut packed = Vec::new();
                // Copied to its size: the buffer it was made in has room
                // for the uncompressed rest, and a queued delivery would
                // hold all of it while counting only the compressed bytes.
                d.compressor
                    .compress(&[&shared.rest], &mut packed)
                    .then(|| Bytes::copy_from_slice(&packed))
            })
            .clone()?;
        let mut heads = self.deflated_heads.borrow_mut();
        if let Some((_, head)) = heads.iter().find(|(t, _)| t == target) {
            return Some([head.clone(), rest]);
        }
        let mut own = BytesMut::new();
        put_head(&mut own, &[], shared, target);
        let own_len = u16::try_from(own.len()).ok()?;
        let mut ws = [0u8; MAX_HEADER_BYTES];
        let ws_len = encode_header(
            &FrameHeader {
                fin: true,
                rsv1: true,
                opcode: self.message.kind.opcode(),
                mask: None,
                payload_len: (STORED_HEADER_BYTES + own.len() + rest.len()) as u64,
            },
            &mut ws,
        );
        let mut head = BytesMut::with_capacity(ws_len + STORED_HEADER_BYTES + own.len());
        head.put_slice(&ws[..ws_len]);
        // BFINAL 0, BTYPE 00, to the byte boundary; LEN and its complement.
        head.put_u8(0);
        head.put_u16_le(own_len);
        head.put_u16_le(!own_len);
        head.put_slice(&own);
        let head = head.freeze();
        if heads.len() < SHARED_HEADS {
            heads.push((target.clone(), head.clone()));
        }
        Some([head, rest])
    }

    pub fn new(message: &'m Message) -> Fanout<'m> {
        Fanout {
            message,
            native: OnceCell::new(),
            raw: OnceCell::new(),
            stomp: OnceCell::new(),
            heads: RefCell::new(Vec::new()),
            native_deflated: OnceCell::new(),
            raw_deflated: OnceCell::new(),
            stomp_deflated: OnceCell::new(),
            deflated_heads: RefCell::new(Vec::new()),
        }
    }

    /// The native `MSG` frame.
    pub fn native(&self) -> &Bytes {
        let m = self.message;
        self.native.get_or_init(|| match &m.native {
            Some(frame) => frame.clone(),
            None => native::message_frame(m.kind, &m.key, &m.body),
        })
    }

    /// The payload alone, in one frame of the message's kind.
    pub fn raw(&self) -> &Bytes {
        let m = self.message;
        self.raw.get_or_init(|| native::frame(m.kind.opcode(), &[&m.body]))
    }

    fn stomp_shared(&self) -> &StompShared {
        self.stomp.get_or_init(|| {
            let m = self.message;
            let message_id = m.message_id();
            let extra = m.stomp_headers.as_ref().map_or(0, Bytes::len);
            let mut h = BytesMut::with_capacity(128 + extra + m.body.len());
            h.put_slice(b"message-id:");
            h.put_slice(message_id.as_bytes());
            h.put_slice(b"\ndestination:");
            h.put_slice(&m.destination());
            h.put_u8(b'\n');
            match &m.stomp_headers {
                Some(headers) => h.put_slice(headers),
                None => h.put_slice(match m.kind {
                    MessageKind::Text => b"content-type:text/plain;charset=utf-8\n",
                    MessageKind::Binary => b"content-type:application/octet-stream\n",
                }),
            }
            // The body may hold NULs: its length says where it ends.
            h.put_slice(format!("content-length:{}\n\n", m.body.len()).as_bytes());
            h.put_slice(&m.body);
            h.put_u8(0);
            StompShared {
                message_id,
                rest: h.freeze(),
            }
        })
    }

    /// One subscription's MESSAGE frame: the one made for an equal
    /// subscription (shared), or a head of its own and the shared body. A
    /// head of its own is carved from `arena` (a per-core buffer) only if
    /// `idle()` says the subscriber's queue is empty, so it is written
    /// within the round: a head that waits in a queue would keep its whole
    /// chunk alive, and gets a buffer of its size instead (moved into the
    /// queue, never counted).
    pub fn stomp(&self, target: &StompTarget, arena: &mut BytesMut, idle: impl FnOnce() -> bool) -> StompParts {
        let shared = self.stomp_shared();
        let mut heads = self.heads.borrow_mut();
        if let Some((_, parts)) = heads.iter().find(|(t, _)| t == target) {
            return parts.clone();
        }
        let (ws, ws_len, head_len) = self.stomp_head_len(shared, target);
        if heads.len() >= SHARED_HEADS {
            let head = if idle() {
                if arena.capacity() - arena.len() < head_len {
                    *arena = BytesMut::with_capacity(ARENA_BYTES.max(head_len));
                }
                put_head(arena, &ws[..ws_len], shared, target);
                arena.split().freeze()
            } else {
                let mut own = BytesMut::with_capacity(head_len);
                put_head(&mut own, &ws[..ws_len], shared, target);
                own.freeze()
            };
            return StompParts {
                parts: [head, shared.rest.clone()],
                count: 2,
            };
        }
        let parts = if self.message.body.len() <= WHOLE_FRAME_BODY_BYTES {
            let mut whole = BytesMut::with_capacity(head_len + shared.rest.len());
            put_head(&mut whole, &ws[..ws_len], shared, target);
            whole.put_slice(&shared.rest);
            StompParts {
                parts: [whole.freeze(), Bytes::new()],
                count: 1,
            }
        } else {
            let mut head = BytesMut::with_capacity(head_len);
            put_head(&mut head, &ws[..ws_len], shared, target);
            StompParts {
                parts: [head.freeze(), shared.rest.clone()],
                count: 2,
            }
        };
        heads.push((target.clone(), parts.clone()));
        parts
    }

    /// The WebSocket header of a subscription's MESSAGE frame, its length,
    /// and the length of the whole head (everything before the body).
    fn stomp_head_len(&self, shared: &StompShared, target: &StompTarget) -> ([u8; MAX_HEADER_BYTES], usize, usize) {
        let ack_len = if target.ack { 4 + shared.message_id.len() + 1 } else { 0 };
        let own = MESSAGE_SUBSCRIPTION.len() + target.id.len() + 1 + ack_len;
        let mut ws = [0u8; MAX_HEADER_BYTES];
        let ws_len = encode_header(
            &FrameHeader {
                fin: true,
                rsv1: false,
                opcode: self.message.kind.opcode(),
                mask: None,
                payload_len: (own + shared.rest.len()) as u64,
            },
            &mut ws,
        );
        (ws, ws_len, ws_len + own)
    }
}

/// Writes a MESSAGE head: WebSocket header, command, the subscription's
/// own headers, then those every subscriber shares.
fn put_head(out: &mut BytesMut, ws: &[u8], shared: &StompShared, target: &StompTarget) {
    out.put_slice(ws);
    out.put_slice(MESSAGE_SUBSCRIPTION);
    out.put_slice(target.id.as_bytes());
    out.put_u8(b'\n');
    if target.ack {
        out.put_slice(b"ack:");
        out.put_slice(shared.message_id.as_bytes());
        out.put_u8(b'\n');
    }
}

/// A stored deflate block's header: one byte to the boundary, LEN, NLEN.
const STORED_HEADER_BYTES: usize = 5;

/// The length of the WebSocket header at the start of a frame we made.
pub(crate) fn frame_header_len(frame: &[u8]) -> usize {
    match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

/// Size of the buffers STOMP heads of their own are carved from (one
/// allocation serves dozens of subscribers). A chunk lives while any head carved from it
/// waits: at most one per subscriber whose socket filled within a round,
/// as later heads for a waiting subscriber get buffers of their own.
pub const ARENA_BYTES: usize = 8 * 1024;

#[cfg(test)]
mod foreign_header_tests {
    use super::*;

    #[test]
    fn foreign_stomp_headers_are_parsed_filtered_and_encoded_again() {
        let ours = encode_stomp_headers(&[
            ("x-a".into(), "1:2\\3".into()),
            ("content-type".into(), "text/plain".into()),
        ]);
        assert_eq!(checked_stomp_headers(&ours).as_deref(), Some(&ours[..]));
        assert_eq!(checked_stomp_headers(b"").as_deref(), Some(&b""[..]));
        // A frame smuggled in: refused, whatever the bytes.
        for bad in [
            &b"x:1\n\nFORGED\0RECEIPT\nreceipt-id:e\n\n\0"[..],
            b"x:1\r\n",
            b"x\n",
            b":v\n",
            b"x:a\\t\n",
            b"x:\xff\n",
        ] {
            assert_eq!(checked_stomp_headers(bad), None, "{bad:?}");
        }
        // Names a MESSAGE sets itself are dropped, not passed on.
        let filtered = checked_stomp_headers(b"message-id:fake\nsubscription:0\nx:1\n").unwrap();
        assert_eq!(&filtered[..], b"x:1\n");
        let many: String = (0..65).map(|i| format!("h{i}:v\n")).collect();
        assert_eq!(checked_stomp_headers(many.as_bytes()), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::stomp::frame::{Decoder, Item, Limits};
    use crate::ws::frame::{decode_header, Opcode, Role};

    fn payload_of(parts: &[Bytes]) -> (Opcode, Vec<u8>) {
        let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let (h, n) = decode_header(&whole, Role::Client).unwrap().unwrap();
        assert_eq!(whole.len(), n + h.payload_len as usize);
        (h.opcode, whole[n..].to_vec())
    }

    fn decode(payload: &[u8]) -> crate::proto::stomp::frame::Frame {
        let mut d = Decoder::new(Limits::default());
        d.push(payload);
        match d.next_item().unwrap() {
            Some(Item::Frame(f)) => f,
            other => panic!("{other:?}"),
        }
    }

    fn target(id: &str, ack: bool) -> StompTarget {
        StompTarget { id: id.into(), ack }
    }

    #[test]
    fn a_stomp_message_is_whole_and_says_what_it_is() {
        let m = Message::native(MessageKind::Binary, b"news", b"a\0b", 7 | (1 << 48));
        let f = Fanout::new(&m);
        let mut arena = BytesMut::new();
        let a = f.stomp(&target("s\\c1", true), &mut arena, || true);
        assert_eq!(a.as_slice().len(), 1, "a small body is copied into a whole frame");
        let (op, p) = payload_of(a.as_slice());
        assert_eq!(op, Opcode::Binary);
        let frame = decode(&p);
        assert_eq!(frame.header("subscription"), Some("s:1"));
        assert_eq!(frame.header("message-id"), Some("1-7"));
        assert_eq!(frame.header("ack"), Some("1-7"));
        assert_eq!(frame.header("destination"), Some("/topic/news"));
        assert_eq!(frame.header("content-type"), Some("application/octet-stream"));
        assert_eq!(frame.header("content-length"), Some("3"));
        assert_eq!(&frame.body[..], b"a\0b");
        let frame = decode(&payload_of(f.stomp(&target("2", false), &mut arena, || true).as_slice()).1);
        assert_eq!(frame.header("subscription"), Some("2"));
        assert_eq!(frame.header("ack"), None);
        // The native frame is the publisher's own.
        assert_eq!(f.native(), m.native.as_ref().unwrap());
    }

    #[test]
    fn equal_subscriptions_share_their_frame_and_a_large_body_is_never_copied() {
        let big = vec![b'x'; WHOLE_FRAME_BODY_BYTES + 1];
        let m = Message::native(MessageKind::Text, b"t", &big, 1);
        let f = Fanout::new(&m);
        let mut arena = BytesMut::new();
        let a = f.stomp(&target("sub-0", false), &mut arena, || true);
        let b = f.stomp(&target("sub-0", false), &mut arena, || true);
        let c = f.stomp(&target("sub-1", false), &mut arena, || true);
        assert_eq!(a.as_slice()[0].as_ptr(), b.as_slice()[0].as_ptr(), "one head");
        assert_ne!(a.as_slice()[0].as_ptr(), c.as_slice()[0].as_ptr());
        assert_eq!(a.as_slice()[1].as_ptr(), c.as_slice()[1].as_ptr(), "one body");
        let frame = decode(&payload_of(c.as_slice()).1);
        assert_eq!(frame.body.len(), big.len());
        // A small body: equal subscriptions share one whole frame.
        let m = Message::native(MessageKind::Text, b"t", b"small", 2);
        let f = Fanout::new(&m);
        let a = f.stomp(&target("sub-0", false), &mut arena, || true);
        let b = f.stomp(&target("sub-0", false), &mut arena, || true);
        assert_eq!(a.as_slice()[0].as_ptr(), b.as_slice()[0].as_ptr());
    }

    #[test]
    fn a_stomp_publish_keeps_its_headers_and_reaches_native_subscribers() {
        let m = Message {
            key: Bytes::from_static(b"#jobs"),
            kind: MessageKind::Text,
            body: Bytes::from_static(b"hello"),
            stomp_headers: Some(encode_stomp_headers(&[
                ("content-type".into(), "text/plain".into()),
                ("x-trace".into(), "a:b".into()),
            ])),
            id: 3,
            native: None,
            compress: true,
        };
        let f = Fanout::new(&m);
        let mut arena = BytesMut::new();
        let frame = decode(&payload_of(f.stomp(&target("q", false), &mut arena, || true).as_slice()).1);
        assert_eq!(frame.header("destination"), Some("/queue/jobs"));
        assert_eq!(frame.header("content-type"), Some("text/plain"));
        assert_eq!(frame.header("x-trace"), Some("a:b"));
        assert_eq!(&frame.body[..], b"hello");
        let topic = Message {
            key: Bytes::from_static(b"news"),
            ..m
        };
        let native = Fanout::new(&topic).native().clone();
        assert_eq!(&native[2..], b"MSG news hello");
    }

    #[test]
    fn heads_of_their_own_come_from_shared_arenas() {
        let m = Message::native(MessageKind::Text, b"t", b"x", 1);
        let f = Fanout::new(&m);
        let mut arena = BytesMut::new();
        let parts: Vec<StompParts> = (0..100)
            .map(|i| f.stomp(&target(&i.to_string(), false), &mut arena, || true))
            .collect();
        // Past the first SHARED_HEADS distinct subscriptions, each gets a
        // head of its own, side by side in one allocation, and the body.
        let (a, b) = (parts[20].as_slice(), parts[21].as_slice());
        assert_eq!((a.len(), b.len()), (2, 2));
        assert_eq!(a[0].as_ptr().wrapping_add(a[0].len()), b[0].as_ptr());
        assert_eq!(a[1].as_ptr(), b[1].as_ptr());
        let frame = decode(&payload_of(a).1);
        assert_eq!((frame.header("subscription"), &frame.body[..]), (Some("20"), &b"x"[..]));
    }
}
