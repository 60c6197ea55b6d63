//! STOMP 1.2 frames, sans-I/O: a decoder for a byte stream that may carry
//! several frames in one WebSocket message, or one frame over several
//! (stomp.js splits large frames), and an encoder. No socket, no session.
//!
//! The grammar is the specification's "Augmented BNF" section:
//! `frame = command EOL *(header EOL) EOL *OCTET NULL *(EOL)`, with
//! `EOL = [CR] LF`. What this enforces, by section of the specification:
//! - "Heart-beating": an EOL between frames is a heart-beat, reported as
//!   such.
//! - "Value Encoding": header names and values are UTF-8, and `\\`, `\n`,
//!   `\r`, `\c` are unescaped in every frame but CONNECT, STOMP and
//!   CONNECTED. Any other escape is a fatal error.
//! - "Repeated Header Entries": every entry is kept, in order, and
//!   `Frame::header` returns the first.
//! - "Header content-length": with it, the body is exactly that many octets
//!   (NUL allowed) and must be followed by a NUL; without it, the body ends
//!   at the first NUL.
//! - "Size Limits": at most `max_headers` headers, each line at most
//!   `max_header_bytes`, and a body of at most `max_body_bytes`. All three
//!   are decided before the bytes past the limit are buffered.
//!
//! Leniency, for interoperability: a colon inside a header value is kept
//! as part of the value (the name ends at the first colon), as brokers
//! commonly accept.

use bytes::{Bytes, BytesMut};

/// The commands of STOMP 1.2 ("Client Frames", "Server Frames").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
    Connected,
    Message,
    Receipt,
    Error,
}

const COMMANDS: [(Command, &str); 15] = [
    (Command::Connect, "CONNECT"),
    (Command::Stomp, "STOMP"),
    (Command::Send, "SEND"),
    (Command::Subscribe, "SUBSCRIBE"),
    (Command::Unsubscribe, "UNSUBSCRIBE"),
    (Command::Ack, "ACK"),
    (Command::Nack, "NACK"),
    (Command::Begin, "BEGIN"),
    (Command::Commit, "COMMIT"),
    (Command::Abort, "ABORT"),
    (Command::Disconnect, "DISCONNECT"),
    (Command::Connected, "CONNECTED"),
    (Command::Message, "MESSAGE"),
    (Command::Receipt, "RECEIPT"),
    (Command::Error, "ERROR"),
];

impl Command {
    pub fn parse(name: &[u8]) -> Option<Command> {
        COMMANDS.iter().find(|(_, n)| n.as_bytes() == name).map(|(c, _)| *c)
    }

    pub fn as_str(self) -> &'static str {
        COMMANDS
            .iter()
            .find(|(c, _)| *c == self)
            .map(|(_, n)| *n)
            .expect("every command is in the table")
    }

    /// "Value Encoding": CONNECT, STOMP and CONNECTED frames do not escape
    /// their headers (1.0 clients would not understand it).
    pub fn escapes(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    /// Every header entry, in order, unescaped.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Frame {
    pub fn new(command: Command) -> Frame {
        Frame {
            command,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Frame {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Frame {
        self.body = body.into();
        self
    }

    /// The first entry of header `name` ("Repeated Header Entries").
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Appends the frame's wire form to `out`: command, headers (escaped
    /// where the command calls for it), blank line, body, NUL. Headers are
    /// written as they are: a body that may contain NUL needs the caller's
    /// `content-length`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.command.as_str().as_bytes());
        out.push(b'\n');
        let escape = self.command.escapes();
        for (name, value) in &self.headers {
            push_value(out, name, escape);
            out.push(b':');
            push_value(out, value, escape);
            out.push(b'\n');
        }
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out.push(0);
    }
}

pub fn push_value(out: &mut Vec<u8>, value: &str, escape: bool) {
    if !escape {
        out.extend_from_slice(value.as_bytes());
        return;
    }
    for &b in value.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b':' => out.extend_from_slice(b"\\c"),
            _ => out.push(b),
        }
    }
}

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An EOL between frames: the peer is alive ("Heart-beating").
    HeartBeat,
    Frame(Frame),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_headers: usize,
    /// One header line (name, colon and value, as sent), or the command line.
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_headers: 64,
            max_header_bytes: 8 * 1024,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// A frame the decoder refused. Each is fatal: the session answers with an
/// ERROR frame whose `message` header is `message()`, then closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    UnknownCommand,
    /// A CR not followed by LF where an EOL belongs.
    BadEol,
    /// A header line without a colon, or with an empty name.
    BadHeader,
    /// An escape other than `\\`, `\n`, `\r`, `\c`.
    BadEscape,
    NotUtf8,
    TooManyHeaders,
    HeaderTooLong,
    BodyTooLarge,
    BadContentLength,
    /// The octet after a `content-length` body is not NUL.
    MissingNul,
}

impl ParseError {
    pub fn message(self) -> &'static str {
        match self {
            ParseError::UnknownCommand => "unknown command",
            ParseError::BadEol => "malformed line ending",
            ParseError::BadHeader => "malformed header",
            ParseError::BadEscape => "undefined escape sequence in a header",
            ParseError::NotUtf8 => "header is not UTF-8",
            ParseError::TooManyHeaders => "too many headers",
            ParseError::HeaderTooLong => "header too long",
            ParseError::BodyTooLarge => "body too large",
            ParseError::BadContentLength => "malformed content-length",
            ParseError::MissingNul => "frame body not terminated by NUL",
        }
    }
}

/// What `parse` found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// More bytes are needed: parsing again can make progress only once
    /// there are `need` in all, or (`until`) once that byte has arrived.
    /// So a frame trickling in byte by byte is not parsed again per byte.
    Incomplete { need: usize, until: Option<u8> },
    /// A heart-beat EOL of this many bytes.
    HeartBeat(usize),
    /// A frame: command and headers, where its body lies, and its length.
    Frame {
        command: Command,
        headers: Vec<(String, String)>,
        body: std::ops::Range<usize>,
        len: usize,
    },
}

/// Parses one item at the front of `buf`.
fn parse(buf: &[u8], limits: &Limits) -> Result<Parsed, ParseError> {
    let more = Parsed::Incomplete {
        need: buf.len() + 1,
        until: None,
    };
    // A line is complete at its LF, or refused once it is too long.
    let line_pending = |pos: usize| Parsed::Incomplete {
        need: pos + limits.max_header_bytes + 2,
        until: Some(b'\n'),
    };
    match buf {
        [] | [b'\r'] => return Ok(more),
        [b'\n', ..] => return Ok(Parsed::HeartBeat(1)),
        [b'\r', b'\n', ..] => return Ok(Parsed::HeartBeat(2)),
        [b'\r', ..] => return Err(ParseError::BadEol),
        _ => {}
    }
    let mut pos = 0;
    let Some(line) = next_line(buf, &mut pos, limits)? else {
        return Ok(line_pending(pos));
    };
    let command = Command::parse(line).ok_or(ParseError::UnknownCommand)?;
    let mut headers = Vec::new();
    let mut content_length = None;
    loop {
        let Some(line) = next_line(buf, &mut pos, limits)? else {
            return Ok(line_pending(pos));
        };
        if line.is_empty() {
            break;
        }
        if headers.len() == limits.max_headers {
            return Err(ParseError::TooManyHeaders);
        }
        let colon = line.iter().position(|&b| b == b':').ok_or(ParseError::BadHeader)?;
        if colon == 0 {
            return Err(ParseError::BadHeader);
        }
        let name = header_text(&line[..colon], command.escapes())?;
        let value = header_text(&line[colon + 1..], command.escapes())?;
        if name == "content-length" && content_length.is_none() {
            content_length = Some(parse_length(&value)?);
        }
        headers.push((name, value));
    }
    let body_start = pos;
    match content_length {
        Some(n) => {
            if n > limits.max_body_bytes {
                return Err(ParseError::BodyTooLarge);
            }
            let end = body_start + n;
            match buf.get(end) {
                None => Ok(Parsed::Incomplete {
                    need: end + 1,
                    until: None,
                }),
                Some(0) => Ok(Parsed::Frame {
                    command,
                    headers,
                    body: body_start..end,
                    len: end + 1,
                }),
                Some(_) => Err(ParseError::MissingNul),
            }
        }
        None => {
            let window = &buf[body_start..buf.len().min(body_start + limits.max_body_bytes + 1)];
            match window.iter().position(|&b| b == 0) {
                Some(n) => Ok(Parsed::Frame {
                    command,
                    headers,
                    body: body_start..body_start + n,
                    len: body_start + n + 1,
                }),
                None if window.len() > limits.max_body_bytes => Err(ParseError::BodyTooLarge),
                // The body ends at a NUL, or is refused at its limit.
                None => Ok(Parsed::Incomplete {
                    need: body_start + limits.max_body_bytes + 1,
                    until: Some(0),
                }),
            }
        }
    }
}

/// The next line from `pos`, without its EOL; `None` if its EOL has not
/// arrived. A line longer than `max_header_bytes` is refused as soon as
/// that many bytes are in, whether or not its end has arrived.
fn next_line<'b>(buf: &'b [u8], pos: &mut usize, limits: &Limits) -> Result<Option<&'b [u8]>, ParseError> {
    let rest = &buf[*pos..];
    let window = &rest[..rest.len().min(limits.max_header_bytes + 2)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if window.len() > limits.max_header_bytes + 1 {
            return Err(ParseError::HeaderTooLong);
        }
        return Ok(None);
    };
    let mut line = &rest[..lf];
    if let [head @ .., b'\r'] = line {
        line = head;
    }
    if line.len() > limits.max_header_bytes {
        return Err(ParseError::HeaderTooLong);
    }
    if line.contains(&b'\r') {
        return Err(ParseError::BadEol);
    }
    *pos += lf + 1;
    Ok(Some(line))
}

/// A header name or value: UTF-8, unescaped where the command escapes.
pub fn header_text(raw: &[u8], escaped: bool) -> Result<String, ParseError> {
    let text = std::str::from_utf8(raw).map_err(|_| ParseError::NotUtf8)?;
    if !escaped || !text.contains('\\') {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('\\') => '\\',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('c') => ':',
            _ => return Err(ParseError::BadEscape),
        });
    }
    Ok(out)
}

fn parse_length(value: &str) -> Result<usize, ParseError> {
    let digits = value.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadContentLength);
    }
    digits.parse().map_err(|_| ParseError::BadContentLength)
}

/// Reassembles STOMP frames from the payloads of WebSocket messages, in
/// order. Holds at most one frame in progress (bounded by `Limits`) and the
/// rest of the message that carried it.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    /// Parsing again can make progress once this many bytes are buffered,
    /// or once `until` arrives in the bytes after `scanned`.
    need: usize,
    until: Option<u8>,
    scanned: usize,
    limits: Limits,
    /// Times `parse` ran.
    #[cfg(test)]
    parses: usize,
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            need: 1,
            until: None,
            scanned: 0,
            limits,
            #[cfg(test)]
            parses: 0,
        }
    }

    /// Adds the payload of one WebSocket message.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received and not yet part of a whole item.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole item, or `None` until more bytes are pushed. After an
    /// error the stream is not resynchronised: the session ends.
    pub fn next_item(&mut self) -> Result<Option<Item>, ParseError> {
        if self.buf.len() < self.need {
            let arrived = self.until.is_some_and(|b| self.buf[self.scanned..].contains(&b));
            self.scanned = self.buf.len();
            if !arrived {
                return Ok(None);
            }
        }
        #[cfg(test)]
        {
            self.parses += 1;
        }
        match parse(&self.buf, &self.limits)? {
            Parsed::Incomplete { need, until } => {
                self.need = need;
                self.until = until;
                self.scanned = self.buf.len();
                Ok(None)
            }
            Parsed::HeartBeat(n) => {
                let _ = self.buf.split_to(n);
                self.need = 1;
                self.until = None;
                Ok(Some(Item::HeartBeat))
            }
            Parsed::Frame {
                command,
                headers,
                body,
                len,
            } => {
                let whole = self.buf.split_to(len).freeze();
                self.need = 1;
                self.until = None;
                Ok(Some(Item::Frame(Frame {
                    command,
                    headers,
                    body: whole.slice(body),
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_trickling_in_is_not_parsed_again_per_byte() {
        let mut d = Decoder::new(Limits::default());
        let body = vec![b'x'; 100_000];
        let mut wire = b"SEND\ndestination:/topic/t\nx-a:1\nx-b:2\n\n".to_vec();
        wire.extend_from_slice(&body);
        wire.push(0);
        for &b in &wire {
            d.push(&[b]);
            if let Some(Item::Frame(f)) = d.next_item().unwrap() {
                assert_eq!(f.body.len(), body.len());
            }
        }
        assert_eq!(d.buffered(), 0);
        // Once per line of the head, and once when the NUL came.
        assert!(d.parses <= 8, "{} parses", d.parses);
        // The limits still apply as bytes arrive: a body one byte over.
        let mut d = Decoder::new(Limits {
            max_body_bytes: 10,
            ..Limits::default()
        });
        d.push(b"SEND\ndestination:/topic/t\n\n");
        for _ in 0..10 {
            d.push(b"y");
            assert_eq!(d.next_item(), Ok(None));
        }
        d.push(b"y");
        assert_eq!(d.next_item(), Err(ParseError::BodyTooLarge));
        // And a header line over its limit, before its LF (16 bytes and a
        // CR may still be a line).
        let mut d = Decoder::new(Limits {
            max_header_bytes: 16,
            ..Limits::default()
        });
        d.push(b"SEND\n");
        for _ in 0..18 {
            assert_eq!(d.next_item(), Ok(None));
            d.push(b"h");
        }
        assert_eq!(d.next_item(), Err(ParseError::HeaderTooLong));
    }

    fn decode_all(wire: &[u8]) -> Result<Vec<Item>, ParseError> {
        let mut d = Decoder::new(Limits::default());
        d.push(wire);
        let mut items = Vec::new();
        while let Some(item) = d.next_item()? {
            items.push(item);
        }
        assert_eq!(d.buffered(), 0, "nothing left over");
        Ok(items)
    }

    fn one(wire: &[u8]) -> Frame {
        match decode_all(wire).unwrap().as_slice() {
            [Item::Frame(f)] => f.clone(),
            other => panic!("expected one frame, got {other:?}"),
        }
    }

    fn h(f: &Frame) -> Vec<(&str, &str)> {
        f.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
    }

    // The frames of the STOMP 1.2 specification, in its order.

    #[test]
    fn spec_connect_and_stomp() {
        let f = one(b"CONNECT\naccept-version:1.2\nhost:stomp.github.org\n\n\0");
        assert_eq!(f.command, Command::Connect);
        assert_eq!(h(&f), [("accept-version", "1.2"), ("host", "stomp.github.org")]);
        assert!(f.body.is_empty());
        let f = one(b"STOMP\naccept-version:1.2\nhost:stomp.github.org\n\n\0");
        assert_eq!(f.command, Command::Stomp);
    }

    #[test]
    fn spec_connected_and_version_error() {
        let f = one(b"CONNECTED\nversion:1.2\n\n\0");
        assert_eq!((f.command, f.header("version")), (Command::Connected, Some("1.2")));
        let f = one(b"ERROR\nversion:1.2,2.1\ncontent-type:text/plain\n\nSupported protocol versions are 1.2 2.1\0");
        assert_eq!(f.command, Command::Error);
        assert_eq!(f.header("version"), Some("1.2,2.1"));
        assert_eq!(&f.body[..], b"Supported protocol versions are 1.2 2.1");
    }

    #[test]
    fn spec_heart_beat_header() {
        let f = one(b"CONNECT\naccept-version:1.2\nhost:stomp.github.org\nheart-beat:1000,0\n\n\0");
        assert_eq!(f.header("heart-beat"), Some("1000,0"));
    }

    #[test]
    fn spec_send() {
        let f = one(b"SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\n\0");
        assert_eq!(f.command, Command::Send);
        assert_eq!(f.header("destination"), Some("/queue/a"));
        assert_eq!(&f.body[..], b"hello queue a\n");
        let f = one(b"SEND\ndestination:/queue/a\ntransaction:tx1\ncontent-type:text/plain\n\nhello queue a\0");
        assert_eq!(f.header("transaction"), Some("tx1"));
        assert_eq!(&f.body[..], b"hello queue a");
    }

    #[test]
    fn spec_subscribe_unsubscribe_ack_nack() {
        let f = one(b"SUBSCRIBE\nid:0\ndestination:/queue/foo\nack:client\n\n\0");
        assert_eq!(h(&f), [("id", "0"), ("destination", "/queue/foo"), ("ack", "client")]);
        assert_eq!(one(b"UNSUBSCRIBE\nid:0\n\n\0").command, Command::Unsubscribe);
        let f = one(b"ACK\nid:12345\ntransaction:tx1\n\n\0");
        assert_eq!((f.command, f.header("id")), (Command::Ack, Some("12345")));
        let f = one(b"NACK\nid:12345\ntransaction:tx1\n\n\0");
        assert_eq!((f.command, f.header("transaction")), (Command::Nack, Some("tx1")));
    }

    #[test]
    fn spec_transactions() {
        for (wire, command) in [
            (&b"BEGIN\ntransaction:tx1\n\n\0"[..], Command::Begin),
            (b"COMMIT\ntransaction:tx1\n\n\0", Command::Commit),
            (b"ABORT\ntransaction:tx1\n\n\0", Command::Abort),
        ] {
            let f = one(wire);
            assert_eq!((f.command, f.header("transaction")), (command, Some("tx1")));
        }
    }

    #[test]
    fn spec_disconnect_and_receipt() {
        let f = one(b"DISCONNECT\nreceipt:77\n\n\0");
        assert_eq!((f.command, f.header("receipt")), (Command::Disconnect, Some("77")));
        let f = one(b"RECEIPT\nreceipt-id:77\n\n\0");
        assert_eq!((f.command, f.header("receipt-id")), (Command::Receipt, Some("77")));
    }

    #[test]
    fn spec_message() {
        let f = one(
            b"MESSAGE\nsubscription:0\nmessage-id:007\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\0",
        );
        assert_eq!(f.command, Command::Message);
        assert_eq!(f.header("message-id"), Some("007"));
        assert_eq!(&f.body[..], b"hello queue a");
    }

    #[test]
    fn spec_error_with_content_length() {
        let body = b"The message:\n-----\nMESSAGE\ndestined:/queue/a\nreceipt:message-12345\n\nHello queue a!\n-----\nDid not contain a destination header, which is REQUIRED\nfor message propagation.\n";
        let mut wire = format!(
            "ERROR\nreceipt-id:message-12345\ncontent-type:text/plain\ncontent-length:{}\nmessage:malformed frame received\n\n",
            body.len()
        )
        .into_bytes();
        wire.extend_from_slice(body);
        wire.push(0);
        let f = one(&wire);
        assert_eq!(f.header("message"), Some("malformed frame received"));
        assert_eq!(&f.body[..], &body[..]);
    }

    #[test]
    fn spec_repeated_headers_first_wins() {
        let f = one(b"MESSAGE\nfoo:World\nfoo:Hello\n\n\0");
        assert_eq!(f.header("foo"), Some("World"));
        assert_eq!(f.headers.len(), 2, "every entry is kept");
    }

    #[test]
    fn escapes_apply_except_in_connect_frames() {
        let f = one(b"SEND\ndestination:/topic/a\\cb\nx:1\\\\2\\n3\\r\n\n\0");
        assert_eq!(f.header("destination"), Some("/topic/a:b"));
        assert_eq!(f.header("x"), Some("1\\2\n3\r"));
        let f = one(b"CONNECT\nlogin:a\\cb\n\n\0");
        assert_eq!(f.header("login"), Some("a\\cb"), "CONNECT values are not unescaped");
        assert_eq!(decode_all(b"SEND\nx:a\\tb\n\n\0"), Err(ParseError::BadEscape));
        assert_eq!(decode_all(b"SEND\nx:a\\\n\n\0"), Err(ParseError::BadEscape));
    }

    #[test]
    fn crlf_line_endings_and_heart_beats_between_frames() {
        let items =
            decode_all(b"\n\r\nSEND\r\ndestination:/topic/t\r\n\r\nbody\0\n\nRECEIPT\nreceipt-id:1\n\n\0\r\n").unwrap();
        assert_eq!(items.len(), 7);
        assert_eq!(items[0], Item::HeartBeat);
        assert_eq!(items[1], Item::HeartBeat);
        let Item::Frame(f) = &items[2] else { panic!() };
        assert_eq!((f.header("destination"), &f.body[..]), (Some("/topic/t"), &b"body"[..]));
        assert_eq!(items[3], Item::HeartBeat);
        assert_eq!(items[4], Item::HeartBeat);
        assert!(matches!(&items[5], Item::Frame(f) if f.command == Command::Receipt));
        assert_eq!(items[6], Item::HeartBeat);
    }

    #[test]
    fn content_length_body_may_hold_nul() {
        let f = one(b"SEND\ndestination:/topic/t\ncontent-length:5\n\na\0b\0c\0");
        assert_eq!(&f.body[..], b"a\0b\0c");
        assert_eq!(
            decode_all(b"SEND\ncontent-length:2\n\nabc\0"),
            Err(ParseError::MissingNul)
        );
        for bad in [
            &b"SEND\ncontent-length:x\n\n\0"[..],
            b"SEND\ncontent-length:\n\n\0",
            b"SEND\ncontent-length:-1\n\n\0",
        ] {
            assert_eq!(decode_all(bad), Err(ParseError::BadContentLength));
        }
        // The first content-length wins, like any repeated header.
        let f = one(b"SEND\ncontent-length:1\ncontent-length:9\n\na\0");
        assert_eq!(&f.body[..], b"a");
    }

    #[test]
    fn malformed_frames() {
        assert_eq!(decode_all(b"HELLO\n\n\0"), Err(ParseError::UnknownCommand));
        assert_eq!(decode_all(b"send\n\n\0"), Err(ParseError::UnknownCommand));
        assert_eq!(decode_all(b"SEND\nno-colon\n\n\0"), Err(ParseError::BadHeader));
        assert_eq!(decode_all(b"SEND\n:value\n\n\0"), Err(ParseError::BadHeader));
        assert_eq!(decode_all(b"\rSEND\n\n\0"), Err(ParseError::BadEol));
        assert_eq!(decode_all(b"SEND\nx:a\rb\n\n\0"), Err(ParseError::BadEol));
        assert_eq!(decode_all(b"SEND\nx:\xff\n\n\0"), Err(ParseError::NotUtf8));
        // A colon in a value is kept (the name ends at the first one).
        assert_eq!(one(b"SEND\nx:a:b\n\n\0").header("x"), Some("a:b"));
    }

    #[test]
    fn one_frame_over_many_messages_and_many_in_one() {
        let wire = b"SEND\ndestination:/topic/t\ncontent-length:3\n\nabc\0SEND\ndestination:/topic/u\n\nxyz\0";
        // Byte by byte: nothing until each frame is whole.
        let mut d = Decoder::new(Limits::default());
        let mut frames = Vec::new();
        for b in wire {
            d.push(&[*b]);
            while let Some(item) = d.next_item().unwrap() {
                frames.push(item);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames, decode_all(wire).unwrap());
    }

    #[test]
    fn header_count_limit_is_exact() {
        let limits = Limits {
            max_headers: 3,
            ..Limits::default()
        };
        let mut d = Decoder::new(limits);
        d.push(b"SEND\na:1\nb:2\nc:3\n\n\0");
        assert!(matches!(d.next_item(), Ok(Some(Item::Frame(_)))));
        d.push(b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0");
        assert_eq!(d.next_item(), Err(ParseError::TooManyHeaders));
    }

    #[test]
    fn header_length_limit_is_exact_and_decided_early() {
        let limits = Limits {
            max_header_bytes: 10,
            ..Limits::default()
        };
        let mut d = Decoder::new(limits);
        d.push(b"SEND\nabcd:12345\n\n\0"); // 10 bytes: at the limit
        assert!(matches!(d.next_item(), Ok(Some(Item::Frame(_)))));
        d.push(b"SEND\nabcd:123456\n\n\0");
        assert_eq!(d.next_item(), Err(ParseError::HeaderTooLong));
        // A line that never ends is refused once past the limit, before its EOL.
        let mut d = Decoder::new(limits);
        d.push(b"SEND\nabcd:123456789");
        assert_eq!(d.next_item(), Err(ParseError::HeaderTooLong));
        let mut d = Decoder::new(limits);
        d.push(b"SEND\nabcd:12345\r");
        assert_eq!(d.next_item(), Ok(None), "the CR of an EOL is not counted");
    }

    #[test]
    fn body_limit_is_exact_with_and_without_content_length() {
        let limits = Limits {
            max_body_bytes: 4,
            ..Limits::default()
        };
        let mut d = Decoder::new(limits);
        d.push(b"SEND\n\nabcd\0SEND\ncontent-length:4\n\nabcd\0");
        assert!(matches!(d.next_item(), Ok(Some(Item::Frame(_)))));
        assert!(matches!(d.next_item(), Ok(Some(Item::Frame(_)))));
        // Declared too large: refused before the body arrives.
        d.push(b"SEND\ncontent-length:5\n\n");
        assert_eq!(d.next_item(), Err(ParseError::BodyTooLarge));
        // Undeclared: refused once one byte past the limit is in.
        let mut d = Decoder::new(limits);
        d.push(b"SEND\n\nabcd");
        assert_eq!(d.next_item(), Ok(None));
        d.push(b"e");
        assert_eq!(d.next_item(), Err(ParseError::BodyTooLarge));
    }

    #[test]
    fn encode_escapes_and_round_trips() {
        let f = Frame::new(Command::Message)
            .with_header("destination", "/topic/a:b")
            .with_header("x", "1\\2\n3\r")
            .with_body(&b"payload"[..]);
        let mut wire = Vec::new();
        f.encode(&mut wire);
        assert_eq!(
            &wire[..],
            &b"MESSAGE\ndestination:/topic/a\\cb\nx:1\\\\2\\n3\\r\n\npayload\0"[..]
        );
        assert_eq!(one(&wire), f);
        let c = Frame::new(Command::Connected).with_header("server", "a:b");
        let mut wire = Vec::new();
        c.encode(&mut wire);
        assert_eq!(
            &wire[..],
            &b"CONNECTED\nserver:a:b\n\n\0"[..],
            "CONNECTED is not escaped"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn command() -> impl Strategy<Value = Command> {
            (0..COMMANDS.len()).prop_map(|i| COMMANDS[i].0)
        }

        proptest! {
            /// Any frame survives encoding and decoding, however its bytes
            /// are cut into messages, when its body is framed by
            /// content-length (so it may hold NUL).
            #[test]
            fn round_trip(
                command in command(),
                headers in proptest::collection::vec(("[a-z][a-z0-9:\\\\\n\r-]{0,8}", "[ -~\n\r\\\\:é]{0,12}"), 0..6),
                body in proptest::collection::vec(any::<u8>(), 0..64),
                cuts in proptest::collection::vec(1usize..16, 0..8),
            ) {
                // CONNECT-style frames cannot carry what only escapes express.
                let headers: Vec<(String, String)> = headers
                    .into_iter()
                    .filter(|(n, v)| command.escapes() || !(n.contains([':', '\n', '\r']) || v.contains(['\n', '\r'])))
                    .filter(|(n, _)| n != "content-length")
                    .collect();
                let mut frame = Frame::new(command).with_body(body.clone());
                frame.headers.push(("content-length".into(), body.len().to_string()));
                frame.headers.extend(headers);
                let mut wire = Vec::new();
                frame.encode(&mut wire);
                let mut d = Decoder::new(Limits::default());
                let mut got = Vec::new();
                let mut at = 0usize;
                for cut in cuts.into_iter().chain(std::iter::once(usize::MAX)) {
                    let end = wire.len().min(at.saturating_add(cut));
                    d.push(&wire[at..end]);
                    at = end;
                    while let Some(item) = d.next_item().unwrap() {
                        got.push(item);
                    }
                }
                prop_assert_eq!(got, vec![Item::Frame(frame)]);
            }

            /// Arbitrary bytes never panic the decoder, and it never holds
            /// more than what was pushed.
            #[test]
            fn arbitrary_input_is_refused_or_parsed(data in proptest::collection::vec(any::<u8>(), 0..256)) {
                let mut d = Decoder::new(Limits { max_headers: 4, max_header_bytes: 32, max_body_bytes: 64 });
                d.push(&data);
                while let Ok(Some(_)) = d.next_item() {}
                prop_assert!(d.buffered() <= data.len());
            }
        }
    }
}
