//! From frames to messages (RFC 6455 sections 5.4-5.6 and 8.1, and RFC
//! 7692 6 for compressed ones).
//!
//! `MessageReader` owns the state between frames: the kind of a fragmented
//! message in progress, its bytes so far, and its UTF-8 validation state. It
//! reads from a caller's buffer, unmasks in place, and hands back events that
//! borrow that buffer (a message in a single frame is never copied). It does
//! no I/O and never allocates more than `max_message_bytes` (a compressed
//! message: its compressed bytes, then what they inflate to, each bounded
//! by it).

use super::close::{self, Close, CloseCode};
use super::deflate::{InflateError, Inflater};
use super::frame::{self, FrameHeader, Opcode, Role};
use super::mask;
use super::utf8::Utf8Validator;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of a single frame.
    pub max_frame_bytes: usize,
    /// Largest message, all fragments together.
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

impl MessageKind {
    pub fn opcode(self) -> Opcode {
        match self {
            MessageKind::Text => Opcode::Text,
            MessageKind::Binary => Opcode::Binary,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole message. Text payloads are valid UTF-8.
    Message {
        kind: MessageKind,
        payload: &'a [u8],
    },
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    Close(Close<'a>),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// An event, and how many input bytes it used.
    Event(Event<'a>, usize),
    /// A fragment was taken into the message in progress; no event yet.
    Fragment(usize),
    /// The next frame is not all there. `frame_bytes` is its whole size once
    /// its header has been read (so the caller can size its buffer).
    Need { frame_bytes: Option<usize> },
}

/// A reason to fail the connection: the close code and reason to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: CloseCode,
    pub reason: &'static str,
}

impl Violation {
    fn protocol(reason: &'static str) -> Violation {
        Violation {
            code: CloseCode::PROTOCOL_ERROR,
            reason,
        }
    }
}

#[derive(Debug)]
pub struct MessageReader {
    role: Role,
    limits: Limits,
    /// Kind of the fragmented message in progress, if any.
    partial: Option<MessageKind>,
    fragments: Vec<u8>,
    utf8: Utf8Validator,
    /// The last event lent out `fragments`; free it on the next call.
    lent_fragments: bool,
    /// Payload bytes of the incomplete text frame at the front of the
    /// caller's buffer already unmasked and validated (see `read`).
    /// (A frame is within `max_frame_bytes`, at most 1 GiB: a `u32`.)
    frame_progress: u32,
    /// permessage-deflate was agreed: RSV1 marks a compressed message.
    deflate: bool,
    /// The peer keeps its LZ77 window between messages (no
    /// `client_no_context_takeover`), so the inflater must too.
    takeover: bool,
    /// The fragmented message in progress is compressed.
    compressed: bool,
}

/// The largest frame a reader takes: 1 GiB.
pub const MAX_FRAME_LIMIT: usize = 1 << 30;

/// A compressed payload's bound for an uncompressed limit: deflate adds at
/// most a few bytes per stored block to what it cannot compress.
pub fn compressed_bound(limit: usize) -> usize {
    limit.saturating_add(limit / 1024 + 64)
}

impl MessageReader {
    /// A frame larger than `MAX_FRAME_LIMIT` is refused whatever `limits`
    /// say (sluice's own options stop at it).
    pub fn new(role: Role, limits: Limits) -> MessageReader {
        MessageReader {
            role,
            limits: Limits {
                max_frame_bytes: limits.max_frame_bytes.min(MAX_FRAME_LIMIT),
                ..limits
            },
            partial: None,
            fragments: Vec::new(),
            utf8: Utf8Validator::default(),
            lent_fragments: false,
            frame_progress: 0,
            deflate: false,
            takeover: false,
            compressed: false,
        }
    }

    /// permessage-deflate was agreed (RFC 7692): messages with RSV1 set are
    /// inflated (`read_inflating`). `takeover`: the peer keeps its window
    /// between messages.
    pub fn with_deflate(mut self, takeover: bool) -> MessageReader {
        self.deflate = true;
        self.takeover = takeover;
        self
    }

    /// Whether permessage-deflate was agreed (`read_inflating` reads).
    pub fn inflates(&self) -> bool {
        self.deflate
    }

    /// Whether the peer keeps its window between messages: its inflater
    /// must be its own.
    pub fn takes_over(&self) -> bool {
        self.takeover
    }

    /// True when no fragmented message is in progress (nothing is held).
    pub fn is_idle(&self) -> bool {
        self.partial.is_none()
    }

    /// Reads the next frame at the start of `buf`, unmasking it in place.
    ///
    /// After `Step::Need`, the next call must pass the same bytes again (with
    /// more appended): the payload of an incomplete text frame is unmasked and
    /// validated as it arrives, so invalid text fails before its frame ends.
    pub fn read<'a>(&'a mut self, buf: &'a mut [u8]) -> Result<Step<'a>, Violation> {
        self.read_with(buf, None)
    }

    /// `read`, with the inflater that compressed messages go through (the
    /// core's, or the connection's own when the peer keeps its window).
    pub fn read_inflating<'a>(&'a mut self, buf: &'a mut [u8], inflater: &mut Inflater) -> Result<Step<'a>, Violation> {
        self.read_with(buf, Some(inflater))
    }

    fn read_with<'a>(&'a mut self, buf: &'a mut [u8], inflater: Option<&mut Inflater>) -> Result<Step<'a>, Violation> {
        if self.lent_fragments {
            // Free, not clear: an idle connection holds no message buffer.
            self.fragments = Vec::new();
            self.lent_fragments = false;
        }
        let Some((header, header_len)) = frame::decode_header(buf, self.role).map_err(|e| Violation {
            code: e.close_code(),
            reason: e.reason(),
        })?
        else {
            return Ok(Step::Need { frame_bytes: None });
        };
        self.check_header(&header)?;
        // check_header bounded payload_len by a usize limit (or 125 for control).
        let frame_bytes = header_len + header.payload_len as usize;
        if buf.len() < frame_bytes {
            self.check_partial_text(&header, &mut buf[header_len..])?;
            return Ok(Step::Need {
                frame_bytes: Some(frame_bytes),
            });
        }
        // Bytes a Need step already unmasked and validated.
        let done = std::mem::take(&mut self.frame_progress) as usize;
        let payload = &mut buf[header_len..frame_bytes];
        if let Some(key) = header.mask {
            mask::apply(&mut payload[done..], key, done);
        }
        let payload: &'a [u8] = payload;
        let event = match header.opcode {
            Opcode::Ping => Event::Ping(payload),
            Opcode::Pong => Event::Pong(payload),
            Opcode::Close => {
                let close = close::parse(payload).map_err(|e| Violation {
                    code: e.close_code(),
                    reason: e.reason(),
                })?;
                Event::Close(close)
            }
            Opcode::Text | Opcode::Binary => {
                let kind = if header.opcode == Opcode::Text {
                    MessageKind::Text
                } else {
                    MessageKind::Binary
                };
                if header.rsv1 && header.fin {
                    self.inflate(inflater, kind, Some(payload))?;
                    Event::Message {
                        kind,
                        payload: &self.fragments,
                    }
                } else if header.fin {
                    // RFC 6455 8.1: a text message must be valid UTF-8.
                    if kind == MessageKind::Text {
                        let valid = if done == 0 {
                            simdutf8::basic::from_utf8(payload).is_ok()
                        } else {
                            self.utf8.feed(&payload[done..], true).is_ok()
                        };
                        if !valid {
                            return Err(invalid_utf8());
                        }
                    }
                    Event::Message { kind, payload }
                } else {
                    if done == 0 {
                        self.utf8.reset();
                    }
                    self.compressed = header.rsv1;
                    self.take_fragment(kind, payload, done, false)?;
                    self.partial = Some(kind);
                    return Ok(Step::Fragment(frame_bytes));
                }
            }
            Opcode::Continuation => {
                let kind = self
                    .partial
                    .ok_or(Violation::protocol("continuation without a message"))?;
                self.take_fragment(kind, payload, done, header.fin)?;
                if !header.fin {
                    return Ok(Step::Fragment(frame_bytes));
                }
                self.partial = None;
                if std::mem::take(&mut self.compressed) {
                    self.inflate(inflater, kind, None)?;
                }
                self.lent_fragments = true;
                Event::Message {
                    kind,
                    payload: &self.fragments,
                }
            }
        };
        Ok(Step::Event(event, frame_bytes))
    }

    /// Inflates a compressed message (RFC 7692 7.2.2) into `fragments`:
    /// `payload` when it came in one frame, else the compressed fragments
    /// gathered there. What it inflates to is bounded as it grows, and text
    /// must be UTF-8 once inflated (RFC 6455 8.1).
    fn inflate(
        &mut self,
        inflater: Option<&mut Inflater>,
        kind: MessageKind,
        payload: Option<&[u8]>,
    ) -> Result<(), Violation> {
        let inflater = inflater.ok_or(Violation::protocol("reserved bits set"))?;
        let mut plain = Vec::new();
        let input = payload.unwrap_or(&self.fragments);
        inflater
            .inflate(input, &mut plain, self.limits.max_message_bytes, self.takeover)
            .map_err(|e| match e {
                InflateError::TooBig => Violation {
                    code: CloseCode::TOO_BIG,
                    reason: "message too big",
                },
                InflateError::Corrupt => Violation {
                    code: CloseCode::INVALID_PAYLOAD,
                    reason: "bad compressed data",
                },
            })?;
        self.fragments = plain;
        self.lent_fragments = true;
        if kind == MessageKind::Text && simdutf8::basic::from_utf8(&self.fragments).is_err() {
            return Err(invalid_utf8());
        }
        Ok(())
    }

    /// Whether the frame's payload is compressed: RSV1 on the first frame
    /// of a message marks the whole message (RFC 7692 6).
    fn is_compressed(&self, header: &FrameHeader) -> bool {
        header.rsv1 || (header.opcode == Opcode::Continuation && self.compressed)
    }

    /// The rules that need the header and the message state, checked before
    /// any payload is buffered, so an oversized frame costs nothing.
    fn check_header(&self, header: &FrameHeader) -> Result<(), Violation> {
        // RFC 7692 6.1: RSV1 only with the extension, and only on the
        // first frame of a data message.
        if header.rsv1 {
            if !self.deflate {
                return Err(Violation::protocol("reserved bits set"));
            }
            if header.opcode.is_control() || header.opcode == Opcode::Continuation {
                return Err(Violation::protocol("RSV1 on a control or continuation frame"));
            }
        }
        match header.opcode {
            // RFC 6455 5.4: a continuation needs a message in progress...
            Opcode::Continuation if self.partial.is_none() => {
                return Err(Violation::protocol("continuation without a message"))
            }
            // ...and a new data frame may not start inside one.
            Opcode::Text | Opcode::Binary if self.partial.is_some() => {
                return Err(Violation::protocol("new message inside a fragmented message"))
            }
            _ => {}
        }
        if header.opcode.is_control() {
            return Ok(());
        }
        let too_big = Violation {
            code: CloseCode::TOO_BIG,
            reason: "message too big",
        };
        // A compressed payload may be a little larger than what it holds.
        let (frame_limit, message_limit) = if self.is_compressed(header) {
            (
                compressed_bound(self.limits.max_frame_bytes),
                compressed_bound(self.limits.max_message_bytes),
            )
        } else {
            (self.limits.max_frame_bytes, self.limits.max_message_bytes)
        };
        if header.payload_len > frame_limit as u64 {
            return Err(Violation {
                reason: "frame too big",
                ..too_big
            });
        }
        if self.fragments.len() as u64 + header.payload_len > message_limit as u64 {
            return Err(too_big);
        }
        Ok(())
    }

    /// Unmasks and validates the newly arrived part of an incomplete text
    /// frame (RFC 6455 8.1: fail as soon as the text cannot be UTF-8).
    fn check_partial_text(&mut self, header: &FrameHeader, payload: &mut [u8]) -> Result<(), Violation> {
        let is_text = match header.opcode {
            _ if self.is_compressed(header) => false,
            Opcode::Text => true,
            Opcode::Continuation => self.partial == Some(MessageKind::Text),
            _ => false,
        };
        let (Some(key), true) = (header.mask, is_text) else {
            return Ok(());
        };
        let available = payload.len().min(header.payload_len as usize);
        let progress = self.frame_progress as usize;
        if available <= progress {
            return Ok(());
        }
        if progress == 0 && header.opcode == Opcode::Text {
            self.utf8.reset();
        }
        let fresh = &mut payload[progress..available];
        mask::apply(fresh, key, progress);
        self.utf8.feed(fresh, false).map_err(|_| invalid_utf8())?;
        self.frame_progress = available as u32;
        Ok(())
    }

    /// Adds a fragment's payload; its first `done` bytes were validated while
    /// the frame was incomplete.
    fn take_fragment(&mut self, kind: MessageKind, payload: &[u8], done: usize, fin: bool) -> Result<(), Violation> {
        // RFC 6455 8.1, checked per fragment so bad text fails at the fragment
        // that breaks it rather than at the end of the message (compressed
        // text: once inflated).
        if kind == MessageKind::Text && !self.compressed {
            self.utf8.feed(&payload[done..], fin).map_err(|_| invalid_utf8())?;
        }
        self.fragments.extend_from_slice(payload);
        Ok(())
    }
}

fn invalid_utf8() -> Violation {
    Violation {
        code: CloseCode::INVALID_PAYLOAD,
        reason: "text is not UTF-8",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::deflate::Inflater;
    use crate::ws::frame::encode_frame;
    use proptest::prelude::*;

    const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
    const LIMITS: Limits = Limits {
        max_frame_bytes: 1024,
        max_message_bytes: 4096,
    };

    fn reader() -> MessageReader {
        MessageReader::new(Role::Server, LIMITS)
    }

    fn frame(fin: bool, op: Opcode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(&mut out, fin, op, Some(KEY), payload);
        out
    }

    /// Feeds a byte stream and collects owned events, or the violation.
    fn run(r: &mut MessageReader, wire: Vec<u8>) -> Result<Vec<(String, Vec<u8>)>, Violation> {
        run_with(r, wire, None)
    }

    /// `run`, compressed messages inflated by `inflater` (as a core's).
    fn run_with(
        r: &mut MessageReader,
        mut wire: Vec<u8>,
        mut inflater: Option<&mut Inflater>,
    ) -> Result<Vec<(String, Vec<u8>)>, Violation> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let step = match inflater.as_deref_mut() {
                Some(inflater) => r.read_inflating(&mut wire[pos..], inflater)?,
                None => r.read(&mut wire[pos..])?,
            };
            match step {
                Step::Need { .. } => return Ok(out),
                Step::Fragment(n) => pos += n,
                Step::Event(ev, n) => {
                    pos += n;
                    out.push(match ev {
                        Event::Message { kind, payload } => (format!("{kind:?}"), payload.to_vec()),
                        Event::Ping(p) => ("Ping".into(), p.to_vec()),
                        Event::Pong(p) => ("Pong".into(), p.to_vec()),
                        Event::Close(c) => (format!("Close {:?}", c.code), c.reason.as_bytes().to_vec()),
                    });
                }
            }
        }
    }

    #[test]
    fn single_frame_messages() {
        let mut wire = frame(true, Opcode::Text, b"hello");
        wire.extend(frame(true, Opcode::Binary, &[0, 255]));
        let ev = run(&mut reader(), wire).unwrap();
        assert_eq!(
            ev,
            vec![("Text".into(), b"hello".to_vec()), ("Binary".into(), vec![0, 255])]
        );
    }

    #[test]
    fn fragments_with_control_frames_between() {
        // RFC 6455 5.4: control frames may be injected in the middle of a fragmented message.
        let mut wire = frame(false, Opcode::Text, b"fra");
        wire.extend(frame(true, Opcode::Ping, b"p"));
        wire.extend(frame(false, Opcode::Continuation, b"gme"));
        wire.extend(frame(true, Opcode::Pong, b""));
        wire.extend(frame(true, Opcode::Continuation, b"nted"));
        let ev = run(&mut reader(), wire).unwrap();
        assert_eq!(
            ev,
            vec![
                ("Ping".into(), b"p".to_vec()),
                ("Pong".into(), vec![]),
                ("Text".into(), b"fragmented".to_vec())
            ]
        );
    }

    #[test]
    fn fragment_order_violations() {
        let err = run(&mut reader(), frame(true, Opcode::Continuation, b"x")).unwrap_err();
        assert_eq!(err.code, CloseCode::PROTOCOL_ERROR);
        let mut wire = frame(false, Opcode::Text, b"a");
        wire.extend(frame(true, Opcode::Binary, b"b"));
        assert_eq!(run(&mut reader(), wire).unwrap_err().code, CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn utf8_fails_at_the_breaking_fragment() {
        let mut r = reader();
        // κόσμε then a surrogate, across fragments: the second fragment fails,
        // before any final frame arrives.
        let mut wire = frame(false, Opcode::Text, &[0xCE, 0xBA, 0xE1]);
        wire.extend(frame(false, Opcode::Continuation, &[0xBD, 0xB9, 0xED, 0xA0, 0x80]));
        assert_eq!(run(&mut r, wire).unwrap_err().code, CloseCode::INVALID_PAYLOAD);
        // Invalid in a single frame.
        assert_eq!(
            run(&mut reader(), frame(true, Opcode::Text, &[0xFF])).unwrap_err().code,
            CloseCode::INVALID_PAYLOAD
        );
        // Binary is never checked.
        assert!(run(&mut reader(), frame(true, Opcode::Binary, &[0xFF])).is_ok());
    }

    #[test]
    fn bad_text_fails_before_its_frame_is_complete() {
        // A 1000-byte text frame whose third byte breaks UTF-8: refused when
        // only 20 payload bytes have arrived (Autobahn 6.4.3/6.4.4).
        let mut body = vec![b'a'; 1000];
        body[2] = 0xFF;
        let wire = frame(true, Opcode::Text, &body);
        let mut r = reader();
        let mut head = wire[..8 + 20].to_vec();
        assert_eq!(r.read(&mut head).unwrap_err().code, CloseCode::INVALID_PAYLOAD);
        // Valid text arriving in pieces is validated once and delivered whole.
        let text = "κόσμε".repeat(100);
        let wire = frame(true, Opcode::Text, text.as_bytes());
        let mut r = reader();
        let mut pending = Vec::new();
        for piece in wire.chunks(7) {
            pending.extend_from_slice(piece);
            match r.read(&mut pending).unwrap() {
                Step::Need { .. } => continue,
                Step::Event(Event::Message { payload, .. }, n) => {
                    assert_eq!(payload, text.as_bytes());
                    assert_eq!(n, wire.len());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn frame_limit_is_exact() {
        assert!(run(&mut reader(), frame(true, Opcode::Binary, &[0; 1024])).is_ok());
        let err = run(&mut reader(), frame(true, Opcode::Binary, &[0; 1025])).unwrap_err();
        assert_eq!(err.code, CloseCode::TOO_BIG);
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header_alone() {
        // Only the header: the reader refuses before the payload is there.
        let wire = frame(true, Opcode::Binary, &[0; 1025]);
        let mut head = wire[..8].to_vec();
        assert_eq!(reader().read(&mut head).unwrap_err().code, CloseCode::TOO_BIG);
    }

    #[test]
    fn message_limit_is_exact() {
        let mut three_k = frame(false, Opcode::Binary, &[1; 1024]);
        for _ in 0..2 {
            three_k.extend(frame(false, Opcode::Continuation, &[1; 1024]));
        }
        let mut at_limit = three_k.clone();
        at_limit.extend(frame(true, Opcode::Continuation, &[1; 1024]));
        let ev = run(&mut reader(), at_limit).unwrap();
        assert_eq!(ev[0].1.len(), 4096);
        let mut over = three_k;
        over.extend(frame(false, Opcode::Continuation, &[1; 1024]));
        over.extend(frame(true, Opcode::Continuation, &[1]));
        let err = run(&mut reader(), over).unwrap_err();
        assert_eq!((err.code, err.reason), (CloseCode::TOO_BIG, "message too big"));
    }

    #[test]
    fn close_frames() {
        let ev = run(
            &mut reader(),
            frame(true, Opcode::Close, &[0x03, 0xE8, b'b', b'y', b'e']),
        )
        .unwrap();
        assert_eq!(ev, vec![("Close Some(CloseCode(1000))".into(), b"bye".to_vec())]);
        let ev = run(&mut reader(), frame(true, Opcode::Close, &[])).unwrap();
        assert_eq!(ev[0].0, "Close None");
        let err = run(&mut reader(), frame(true, Opcode::Close, &[0x03])).unwrap_err();
        assert_eq!(err.code, CloseCode::PROTOCOL_ERROR);
        let err = run(&mut reader(), frame(true, Opcode::Close, &[0x03, 0xE8, 0xFF])).unwrap_err();
        assert_eq!(err.code, CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn fragments_buffer_is_freed_after_the_message() {
        let mut r = reader();
        let mut wire = frame(false, Opcode::Binary, b"ab");
        wire.extend(frame(true, Opcode::Continuation, b"cd"));
        run(&mut r, wire).unwrap();
        // Next read frees the lent buffer.
        let _ = r.read(&mut []);
        assert_eq!(r.fragments.capacity(), 0);
        assert!(r.is_idle());
    }

    /// A frame with RSV1 set: a compressed message's first frame.
    fn compressed_frame(fin: bool, op: Opcode, payload: &[u8]) -> Vec<u8> {
        let mut out = frame(fin, op, payload);
        out[0] |= 0x40;
        out
    }

    fn deflated(plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::ws::deflate::Deflater::new(6, 15).compress(plain, &mut out, false);
        out
    }

    /// `run`, inflating with one inflater as a core would.
    fn run_inflating(r: &mut MessageReader, wire: Vec<u8>) -> Result<Vec<(String, Vec<u8>)>, Violation> {
        run_with(r, wire, Some(&mut Inflater::default()))
    }

    fn deflating_reader() -> MessageReader {
        reader().with_deflate(false)
    }

    #[test]
    fn compressed_messages_are_inflated_whole_or_fragmented() {
        let text = "héllo ".repeat(100);
        let packed = deflated(text.as_bytes());
        let mut wire = compressed_frame(true, Opcode::Text, &packed);
        // The same message in three fragments, with a ping between them:
        // RSV1 on the first only (RFC 7692 6.1).
        let (a, rest) = packed.split_at(packed.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        wire.extend(compressed_frame(false, Opcode::Text, a));
        wire.extend(frame(false, Opcode::Continuation, b));
        wire.extend(frame(true, Opcode::Ping, b"p"));
        wire.extend(frame(true, Opcode::Continuation, c));
        // Uncompressed messages may come between (7.2.1: per message).
        wire.extend(frame(true, Opcode::Binary, &[7]));
        wire.extend(compressed_frame(true, Opcode::Binary, &deflated(&[])));
        let ev = run_inflating(&mut deflating_reader(), wire).unwrap();
        let text = text.into_bytes();
        assert_eq!(
            ev,
            vec![
                ("Text".into(), text.clone()),
                ("Ping".into(), b"p".to_vec()),
                ("Text".into(), text),
                ("Binary".into(), vec![7]),
                ("Binary".into(), vec![]),
            ]
        );
    }

    #[test]
    fn rsv1_is_refused_where_permessage_deflate_does_not_allow_it() {
        let packed = deflated(b"hello");
        let cases = [
            // Not agreed.
            (reader(), compressed_frame(true, Opcode::Text, &packed)),
            // On a control frame.
            (deflating_reader(), compressed_frame(true, Opcode::Ping, b"")),
            (deflating_reader(), compressed_frame(true, Opcode::Close, &[3, 232])),
            // On a continuation frame.
            (deflating_reader(), {
                let mut w = frame(false, Opcode::Text, b"he");
                w.extend(compressed_frame(true, Opcode::Continuation, b"llo"));
                w
            }),
        ];
        for (mut r, wire) in cases {
            let err = run_inflating(&mut r, wire).unwrap_err();
            assert_eq!(err.code, CloseCode::PROTOCOL_ERROR, "{}", err.reason);
        }
        // Agreed, but read without an inflater: refused, not inflated.
        let err = run(&mut deflating_reader(), compressed_frame(true, Opcode::Text, &packed)).unwrap_err();
        assert_eq!(err.code, CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn compressed_text_must_be_utf8_once_inflated_and_data_must_inflate() {
        let err = run_inflating(
            &mut deflating_reader(),
            compressed_frame(true, Opcode::Text, &deflated(&[0xff, 0xfe])),
        );
        assert_eq!(err.unwrap_err().code, CloseCode::INVALID_PAYLOAD);
        // The same bytes are fine as binary.
        let ev = run_inflating(
            &mut deflating_reader(),
            compressed_frame(true, Opcode::Binary, &deflated(&[0xff, 0xfe])),
        );
        assert_eq!(ev.unwrap()[0].1, vec![0xff, 0xfe]);
        let err = run_inflating(
            &mut deflating_reader(),
            compressed_frame(true, Opcode::Binary, &[0xff; 8]),
        )
        .unwrap_err();
        assert_eq!(
            (err.code, err.reason),
            (CloseCode::INVALID_PAYLOAD, "bad compressed data")
        );
    }

    #[test]
    fn what_a_compressed_message_inflates_to_is_held_to_the_message_limit() {
        // 4096 bytes inflated is the limit; one more is refused, in one
        // frame or in fragments.
        for (len, ok) in [(4096, true), (4097, false)] {
            let packed = deflated(&vec![b'a'; len]);
            assert!(packed.len() < 100);
            let ev = run_inflating(&mut deflating_reader(), compressed_frame(true, Opcode::Text, &packed));
            let (a, b) = packed.split_at(10);
            let mut fragmented = compressed_frame(false, Opcode::Text, a);
            fragmented.extend(frame(true, Opcode::Continuation, b));
            let ev2 = run_inflating(&mut deflating_reader(), fragmented);
            for ev in [ev, ev2] {
                match ok {
                    true => assert_eq!(ev.unwrap()[0].1.len(), len),
                    false => assert_eq!(ev.unwrap_err().code, CloseCode::TOO_BIG),
                }
            }
        }
        // What does not compress may be a little larger compressed than
        // the limit it is within: 1024 random bytes in one frame (the
        // frame limit) and 4096 in fragments.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let packed = deflated(&noise[..1024]);
        assert!(packed.len() > 1024);
        let ev = run_inflating(&mut deflating_reader(), compressed_frame(true, Opcode::Binary, &packed));
        assert_eq!(ev.unwrap()[0].1, &noise[..1024]);
        let packed = deflated(&noise);
        let mut wire = compressed_frame(false, Opcode::Binary, &packed[..1000]);
        for chunk in packed[1000..].chunks(1000) {
            wire.extend(frame(false, Opcode::Continuation, chunk));
        }
        wire.extend(frame(true, Opcode::Continuation, &[]));
        assert_eq!(run_inflating(&mut deflating_reader(), wire).unwrap()[0].1, noise);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Any split of a valid stream into reads gives the same events.
        #[test]
        fn chunking_does_not_matter(
            msgs in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300), 1usize..4), 1..6),
            chunk in 1usize..64,
        ) {
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for (text, body, parts) in &msgs {
                let (op, body) = if *text {
                    (Opcode::Text, String::from_utf8_lossy(body).into_owned().into_bytes())
                } else {
                    (Opcode::Binary, body.clone())
                };
                let step = body.len().div_ceil(*parts).max(1);
                let pieces: Vec<&[u8]> = if body.is_empty() { vec![&[][..]] } else { body.chunks(step).collect() };
                for (i, p) in pieces.iter().enumerate() {
                    let fin = i + 1 == pieces.len();
                    let o = if i == 0 { op } else { Opcode::Continuation };
                    wire.extend(frame(fin, o, p));
                }
                expected.push((if *text { "Text" } else { "Binary" }.to_string(), body));
            }
            // Deliver the stream in chunks, keeping the unread rest as a connection would.
            let mut r = MessageReader::new(Role::Server, Limits { max_frame_bytes: 1 << 20, max_message_bytes: 1 << 20 });
            let mut got = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            for piece in wire.chunks(chunk) {
                pending.extend_from_slice(piece);
                let mut pos = 0;
                loop {
                    match r.read(&mut pending[pos..]).unwrap() {
                        Step::Need { .. } => break,
                        Step::Fragment(n) => pos += n,
                        Step::Event(Event::Message { kind, payload }, n) => {
                            got.push((format!("{kind:?}"), payload.to_vec()));
                            pos += n;
                        }
                        Step::Event(_, n) => pos += n,
                    }
                }
                pending.drain(..pos);
            }
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn arbitrary_input_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut r = reader();
            let mut pos = 0;
            while pos < bytes.len() {
                match r.read(&mut bytes[pos..]) {
                    Ok(Step::Event(_, n)) | Ok(Step::Fragment(n)) => pos += n,
                    Ok(Step::Need { .. }) | Err(_) => break,
                }
            }
        }
    }
}
