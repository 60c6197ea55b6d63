//! The native pub/sub protocol (docs/PROTOCOL.md) without I/O: parses a
//! client's command and encodes the server's messages as whole frames.

use bytes::{BufMut, Bytes, BytesMut};

use crate::topic::valid_topic;
use crate::ws::frame::{encode_header, FrameHeader, Opcode, MAX_HEADER_BYTES};
use crate::ws::MessageKind;

#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Sub(&'a [u8]),
    Unsub(&'a [u8]),
    Pub {
        topic: &'a [u8],
        payload: &'a [u8],
    },
    /// A fresh token for the session (docs/PROTOCOL.md, "Authentication").
    Auth(&'a [u8]),
}

/// Why a command was not carried out; answered with `ERR <reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadCommand,
    BadTopic,
    TooManySubscriptions,
    /// The session's grants do not cover the topic.
    Denied,
    /// `AUTH` with a token that is not valid (or on a route that takes none).
    Unauthorized,
    /// The route's hook gave no verdict (no answer in time, or not one).
    Unavailable,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadCommand => "bad-command",
            Refusal::BadTopic => "bad-topic",
            Refusal::TooManySubscriptions => "too-many-subscriptions",
            Refusal::Denied => "denied",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Unavailable => "unavailable",
        }
    }
}

/// Parses one client message (text or binary: the command is ASCII).
pub fn parse(message: &[u8]) -> Result<Command<'_>, Refusal> {
    let space = message.iter().position(|&b| b == b' ').ok_or(Refusal::BadCommand)?;
    let (verb, rest) = (&message[..space], &message[space + 1..]);
    let topic = |t: &[u8]| if valid_topic(t) { Ok(()) } else { Err(Refusal::BadTopic) };
    match verb {
        b"SUB" => topic(rest).map(|()| Command::Sub(rest)),
        b"UNSUB" => topic(rest).map(|()| Command::Unsub(rest)),
        b"PUB" => {
            let (name, payload) = match rest.iter().position(|&b| b == b' ') {
                Some(end) => (&rest[..end], &rest[end + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            topic(name).map(|()| Command::Pub { topic: name, payload })
        }
        b"AUTH" if !rest.is_empty() => Ok(Command::Auth(rest)),
        _ => Err(Refusal::BadCommand),
    }
}

/// A complete unmasked server frame (RFC 6455 5.1: servers do not mask)
/// whose payload is the concatenation of `parts`.
pub fn frame(opcode: Opcode, parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; MAX_HEADER_BYTES];
    let n = encode_header(
        &FrameHeader {
            fin: true,
            rsv1: false,
            opcode,
            mask: None,
            payload_len: len as u64,
        },
        &mut head,
    );
    let mut out = BytesMut::with_capacity(n + len);
    out.put_slice(&head[..n]);
    for part in parts {
        out.put_slice(part);
    }
    out.freeze()
}

/// `MSG <topic> <payload>` in a frame of the publisher's kind: encoded once
/// per publish and shared by every subscriber.
pub fn message_frame(kind: MessageKind, topic: &[u8], payload: &[u8]) -> Bytes {
    frame(kind.opcode(), &[b"MSG ", topic, b" ", payload])
}

/// The topic inside a frame made by `message_frame`, without a copy.
pub fn topic_of(frame: &Bytes, topic_len: usize, payload_len: usize) -> Bytes {
    let start = frame.len() - payload_len - 1 - topic_len;
    frame.slice(start..start + topic_len)
}

/// `ERR <reason>`, or `ERR <reason> <topic>` when it concerns a (valid) topic.
pub fn error_frame(refusal: Refusal, topic: Option<&[u8]>) -> Bytes {
    match topic {
        Some(t) => frame(Opcode::Text, &[b"ERR ", refusal.reason().as_bytes(), b" ", t]),
        None => frame(Opcode::Text, &[b"ERR ", refusal.reason().as_bytes()]),
    }
}

/// `HELLO <session-id>`: the first message of every native session.
pub fn hello_frame(session_id: &str) -> Bytes {
    frame(Opcode::Text, &[b"HELLO ", session_id.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::MAX_TOPIC_BYTES;
    use crate::ws::frame::{decode_header, Role};
    use proptest::prelude::*;

    #[test]
    fn commands() {
        assert_eq!(parse(b"SUB news"), Ok(Command::Sub(b"news")));
        assert_eq!(parse(b"UNSUB a/b.c-d_e:f"), Ok(Command::Unsub(b"a/b.c-d_e:f")));
        assert_eq!(
            parse(b"PUB news hello world"),
            Ok(Command::Pub {
                topic: b"news",
                payload: b"hello world"
            })
        );
        assert_eq!(
            parse(b"PUB news "),
            Ok(Command::Pub {
                topic: b"news",
                payload: b""
            })
        );
        assert_eq!(
            parse(b"PUB news"),
            Ok(Command::Pub {
                topic: b"news",
                payload: b""
            })
        );
        assert_eq!(
            parse(b"PUB n \x00\xff binary"),
            Ok(Command::Pub {
                topic: b"n",
                payload: b"\x00\xff binary"
            })
        );
    }

    #[test]
    fn refusals() {
        for bad in [
            &b""[..],
            b"SUB",
            b"sub news",
            b"SUBnews",
            b"PING x",
            b"MSG a b",
            b" SUB a",
        ] {
            assert_eq!(
                parse(bad),
                Err(Refusal::BadCommand),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            &b"SUB "[..],
            b"SUB a b",
            b"SUB pr!ces",
            b"UNSUB \xff",
            b"PUB  x",
            b"SUB caf\xc3\xa9",
        ] {
            assert_eq!(parse(bad), Err(Refusal::BadTopic), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn topic_length_at_the_limit() {
        let mut cmd = b"SUB ".to_vec();
        cmd.extend(std::iter::repeat_n(b'a', MAX_TOPIC_BYTES));
        assert!(matches!(parse(&cmd), Ok(Command::Sub(t)) if t.len() == MAX_TOPIC_BYTES));
        cmd.push(b'a');
        assert_eq!(parse(&cmd), Err(Refusal::BadTopic));
    }

    #[test]
    fn frames_are_whole_and_unmasked() {
        let f = message_frame(MessageKind::Binary, b"t", &[0u8; 300]);
        let (h, n) = decode_header(&f, Role::Client).unwrap().unwrap();
        assert_eq!(
            (h.opcode, h.fin, h.mask, h.payload_len),
            (Opcode::Binary, true, None, 306)
        );
        assert_eq!(&f[n..n + 6], b"MSG t ");
        assert_eq!(f.len(), n + 306);
        let e = error_frame(Refusal::TooManySubscriptions, Some(b"news"));
        assert_eq!(&e[2..], b"ERR too-many-subscriptions news");
        assert_eq!(&hello_frame("0.1.1")[2..], b"HELLO 0.1.1");
        assert_eq!(parse(b"AUTH a.b.c"), Ok(Command::Auth(b"a.b.c")));
        assert_eq!(parse(b"AUTH "), Err(Refusal::BadCommand));
        assert_eq!(
            &error_frame(Refusal::Denied, Some(b"user.bob"))[2..],
            b"ERR denied user.bob"
        );
    }

    proptest! {
        #[test]
        fn any_input_parses_or_is_refused(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            match parse(&input) {
                Ok(Command::Sub(t)) | Ok(Command::Unsub(t)) | Ok(Command::Pub { topic: t, .. }) => {
                    prop_assert!(valid_topic(t));
                }
                Ok(Command::Auth(token)) => prop_assert!(!token.is_empty()),
                Err(_) => {}
            }
        }
    }
}
