//! A published message, and what each kind of subscriber gets of it.
//!
//! A message is encoded at most once per core for each protocol: the native
//! `MSG` frame is shared by every native subscriber; a STOMP MESSAGE frame
//! differs per subscription only in its first headers, so each STOMP
//! subscriber gets its own small head (WebSocket header, command,
//! `subscription`, `ack`) followed by parts shared by all: the common
//! headers, and the body with its NUL. The parts go out in one vectored
//! write; the body is never copied per subscriber.

use std::cell::OnceCell;

use bytes::{BufMut, Bytes, BytesMut};

use super::topics::{is_queue, StompTarget};
use crate::proto::native;
use crate::proto::stomp::frame::push_value;
use crate::ws::frame::{encode_header, FrameHeader, MAX_HEADER_BYTES};
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
        }
    }

    /// The STOMP `message-id`: `<core>-<sequence>`.
    pub fn message_id(&self) -> String {
        format!("{}-{}", self.id >> 48, self.id & ((1 << 48) - 1))
    }

    /// The STOMP `destination` of the message's key.
    fn destination(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(self.key.len() + 7);
        if is_queue(&self.key) {
            d.extend_from_slice(b"/queue/");
            d.extend_from_slice(&self.key[1..]);
        } else {
            d.extend_from_slice(b"/topic/");
            d.extend_from_slice(&self.key);
        }
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

/// One message's encodings on one core, each made on first use.
pub struct Fanout<'m> {
    pub message: &'m Message,
    native: OnceCell<Bytes>,
    stomp: OnceCell<StompShared>,
}

/// What every STOMP subscriber's MESSAGE shares.
struct StompShared {
    message_id: String,
    /// From `message-id` to the blank line that ends the headers.
    headers: Bytes,
    /// The body and the frame's NUL.
    tail: Bytes,
}

const MESSAGE_SUBSCRIPTION: &[u8] = b"MESSAGE\nsubscription:";

impl<'m> Fanout<'m> {
    pub fn new(message: &'m Message) -> Fanout<'m> {
        Fanout {
            message,
            native: OnceCell::new(),
            stomp: OnceCell::new(),
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

    fn stomp_shared(&self) -> &StompShared {
        self.stomp.get_or_init(|| {
            let m = self.message;
            let message_id = m.message_id();
            let mut h = BytesMut::with_capacity(128 + m.stomp_headers.as_ref().map_or(0, Bytes::len));
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
            let mut tail = BytesMut::with_capacity(m.body.len() + 1);
            tail.put_slice(&m.body);
            tail.put_u8(0);
            StompShared {
                message_id,
                headers: h.freeze(),
                tail: tail.freeze(),
            }
        })
    }

    /// The three parts of one subscription's MESSAGE frame: its own head
    /// (carved from `arena`, a per-core buffer), then the shared headers
    /// and body.
    pub fn stomp(&self, target: &StompTarget, arena: &mut BytesMut) -> [Bytes; 3] {
        let shared = self.stomp_shared();
        let ack_len = if target.ack { 4 + shared.message_id.len() + 1 } else { 0 };
        let own = MESSAGE_SUBSCRIPTION.len() + target.id.len() + 1 + ack_len;
        let payload_len = own + shared.headers.len() + shared.tail.len();
        let mut ws = [0u8; MAX_HEADER_BYTES];
        let ws_len = encode_header(
            &FrameHeader {
                fin: true,
                opcode: self.message.kind.opcode(),
                mask: None,
                payload_len: payload_len as u64,
            },
            &mut ws,
        );
        if arena.capacity() - arena.len() < ws_len + own {
            *arena = BytesMut::with_capacity(ARENA_BYTES.max(ws_len + own));
        }
        arena.put_slice(&ws[..ws_len]);
        arena.put_slice(MESSAGE_SUBSCRIPTION);
        arena.put_slice(target.id.as_bytes());
        arena.put_u8(b'\n');
        if target.ack {
            arena.put_slice(b"ack:");
            arena.put_slice(shared.message_id.as_bytes());
            arena.put_u8(b'\n');
        }
        [arena.split().freeze(), shared.headers.clone(), shared.tail.clone()]
    }
}

/// Size of the buffers STOMP heads are carved from (one allocation serves
/// hundreds of subscribers).
pub const ARENA_BYTES: usize = 64 * 1024;

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

    #[test]
    fn stomp_subscribers_share_all_but_their_head() {
        let m = Message::native(MessageKind::Binary, b"news", b"a\0b", 7 | (1 << 48));
        let f = Fanout::new(&m);
        let mut arena = BytesMut::new();
        let a = f.stomp(
            &StompTarget {
                id: "s\\c1".into(),
                ack: true,
            },
            &mut arena,
        );
        let b = f.stomp(
            &StompTarget {
                id: "2".into(),
                ack: false,
            },
            &mut arena,
        );
        assert_eq!(a[2].as_ptr(), b[2].as_ptr(), "the body is shared");
        assert_eq!(a[1].as_ptr(), b[1].as_ptr());
        let (op, p) = payload_of(&a);
        assert_eq!(op, Opcode::Binary);
        let frame = decode(&p);
        assert_eq!(frame.header("subscription"), Some("s:1"));
        assert_eq!(frame.header("message-id"), Some("1-7"));
        assert_eq!(frame.header("ack"), Some("1-7"));
        assert_eq!(frame.header("destination"), Some("/topic/news"));
        assert_eq!(frame.header("content-type"), Some("application/octet-stream"));
        assert_eq!(frame.header("content-length"), Some("3"));
        assert_eq!(&frame.body[..], b"a\0b");
        let frame = decode(&payload_of(&b).1);
        assert_eq!(frame.header("subscription"), Some("2"));
        assert_eq!(frame.header("ack"), None);
        // The native frame is the publisher's own.
        assert_eq!(f.native(), m.native.as_ref().unwrap());
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
        };
        let f = Fanout::new(&m);
        let mut arena = BytesMut::new();
        let frame = decode(
            &payload_of(&f.stomp(
                &StompTarget {
                    id: "q".into(),
                    ack: false,
                },
                &mut arena,
            ))
            .1,
        );
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
    fn heads_come_from_shared_arenas() {
        let m = Message::native(MessageKind::Text, b"t", b"x", 1);
        let f = Fanout::new(&m);
        let mut arena = BytesMut::new();
        let t = StompTarget {
            id: "1".into(),
            ack: false,
        };
        let heads: Vec<Bytes> = (0..100).map(|_| f.stomp(&t, &mut arena)[0].clone()).collect();
        // Consecutive heads sit side by side in one allocation.
        assert_eq!(heads[0].as_ptr().wrapping_add(heads[0].len()), heads[1].as_ptr());
    }
}
