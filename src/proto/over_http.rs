//! WebSocket-over-HTTP (Pushpin's format, docs/BACKEND.md) without I/O:
//! the event list a backend route sends in each request body and takes
//! back in each response, and the GRIP control messages a backend may send
//! in GRIP mode.
//!
//! An event is `TYPE[ <hex length>]\r\n[<content>\r\n]`: the length (hex,
//! either case) and the content are there only for an event with content.

/// What an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Open,
    Text,
    Binary,
    Ping,
    Pong,
    /// Content: the close code (2 bytes, big-endian) and the reason.
    Close,
    /// The connection ended without a close handshake (the client
    /// vanished), or, from the backend, end it without one.
    Disconnect,
}

impl EventType {
    pub fn name(self) -> &'static [u8] {
        match self {
            EventType::Open => b"OPEN",
            EventType::Text => b"TEXT",
            EventType::Binary => b"BINARY",
            EventType::Ping => b"PING",
            EventType::Pong => b"PONG",
            EventType::Close => b"CLOSE",
            EventType::Disconnect => b"DISCONNECT",
        }
    }

    fn from_name(name: &[u8]) -> Option<EventType> {
        Some(match name {
            b"OPEN" => EventType::Open,
            b"TEXT" => EventType::Text,
            b"BINARY" => EventType::Binary,
            b"PING" => EventType::Ping,
            b"PONG" => EventType::Pong,
            b"CLOSE" => EventType::Close,
            b"DISCONNECT" => EventType::Disconnect,
            _ => return None,
        })
    }
}

/// One event of a list; `content` borrows from the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    pub kind: EventType,
    pub content: &'a [u8],
}

impl Event<'_> {
    /// A `CLOSE` event's code (`None` without one) and reason.
    pub fn close(&self) -> (Option<u16>, &[u8]) {
        match self.content {
            [hi, lo, reason @ ..] => (Some(u16::from_be_bytes([*hi, *lo])), reason),
            _ => (None, &[]),
        }
    }
}

/// The bytes `push` adds for an event of `content_len` bytes: what a
/// batch's size is counted in.
pub fn encoded_len(kind: EventType, content_len: usize) -> usize {
    let name = kind.name().len();
    match content_len {
        0 if !has_content(kind) => name + 2,
        n => name + 1 + hex_digits(n) + 2 + n + 2,
    }
}

/// Whether the event is written with a length even when empty (a message
/// may be empty; `OPEN` and `DISCONNECT` never carry one).
fn has_content(kind: EventType) -> bool {
    !matches!(kind, EventType::Open | EventType::Disconnect)
}

fn hex_digits(n: usize) -> usize {
    (usize::BITS - n.leading_zeros()).div_ceil(4).max(1) as usize
}

/// Appends one event.
pub fn push(out: &mut Vec<u8>, kind: EventType, content: &[u8]) {
    out.reserve(encoded_len(kind, content.len()));
    out.extend_from_slice(kind.name());
    if content.is_empty() && !has_content(kind) {
        out.extend_from_slice(b"\r\n");
        return;
    }
    out.extend_from_slice(format!(" {:x}\r\n", content.len()).as_bytes());
    out.extend_from_slice(content);
    out.extend_from_slice(b"\r\n");
}

/// Appends a `CLOSE` event: the code, if any, and the reason.
pub fn push_close(out: &mut Vec<u8>, code: Option<u16>, reason: &[u8]) {
    let mut content = Vec::with_capacity(2 + reason.len());
    if let Some(code) = code {
        content.extend_from_slice(&code.to_be_bytes());
        content.extend_from_slice(reason);
    }
    push(out, EventType::Close, &content);
}

/// Why an event list is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A line without its CRLF, or content cut short.
    Truncated,
    BadLength,
    /// Content not followed by CRLF.
    MissingCrlf,
}

/// The events of a body, in order. Lengths are bounded by the body itself,
/// so a hostile length costs nothing. An event of a type not known here is
/// skipped (with its content), as Pushpin skips it.
pub fn parse(body: &[u8]) -> Result<Vec<Event<'_>>, Malformed> {
    let mut events = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").ok_or(Malformed::Truncated)?;
        let line = &rest[..line_end];
        rest = &rest[line_end + 2..];
        let (name, length) = match line.iter().position(|&b| b == b' ') {
            Some(space) => (&line[..space], Some(&line[space + 1..])),
            None => (line, None),
        };
        let kind = EventType::from_name(name);
        let content = match length {
            None => &rest[..0],
            Some(hex) => {
                let len = parse_hex(hex).ok_or(Malformed::BadLength)?;
                if len > rest.len() {
                    return Err(Malformed::Truncated);
                }
                let (content, after) = rest.split_at(len);
                rest = after.strip_prefix(b"\r\n").ok_or(if after.len() < 2 {
                    Malformed::Truncated
                } else {
                    Malformed::MissingCrlf
                })?;
                content
            }
        };
        if let Some(kind) = kind {
            events.push(Event { kind, content });
        }
    }
    Ok(events)
}

/// A hex length of 1 to 16 digits.
fn parse_hex(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut n: usize = 0;
    for &d in digits {
        let v = (d as char).to_digit(16)?;
        n = n.checked_mul(16)?.checked_add(v as usize)?;
    }
    Some(n)
}

/// A GRIP control message (`c:{...}` from the backend in GRIP mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Subscribe(String),
    Unsubscribe(String),
    /// No more events go to the backend; the connection stays.
    Detach,
    /// Sets (`Some`) or clears (`None`) a meta value.
    SetMeta(String, Option<String>),
    /// Send `content` to the client (`binary` or text) whenever it has
    /// been sent nothing for `timeout_secs` (`None`: stop).
    KeepAlive(Option<KeepAlive>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepAlive {
    pub content: Vec<u8>,
    pub binary: bool,
    pub timeout_secs: u32,
}

/// Why a control message is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadControl(pub String);

/// Parses the JSON of a control message (after `c:`).
pub fn parse_control(json: &[u8]) -> Result<Control, BadControl> {
    use serde_json::Value;
    let bad = |why: &str| BadControl(why.to_string());
    let value: Value = serde_json::from_slice(json).map_err(|e| BadControl(e.to_string()))?;
    let object = value.as_object().ok_or_else(|| bad("not an object"))?;
    let text = |key: &str| object.get(key).and_then(Value::as_str);
    let channel = || {
        text("channel")
            .map(str::to_string)
            .ok_or_else(|| bad("no \"channel\" string"))
    };
    match text("type").ok_or_else(|| bad("no \"type\" string"))? {
        "subscribe" => channel().map(Control::Subscribe),
        "unsubscribe" => channel().map(Control::Unsubscribe),
        "detach" => Ok(Control::Detach),
        "set-meta" => {
            let name = text("name").ok_or_else(|| bad("no \"name\" string"))?;
            let value = text("value").filter(|v| !v.is_empty()).map(str::to_string);
            Ok(Control::SetMeta(name.to_string(), value))
        }
        "keep-alive" => {
            let timeout = match object.get("timeout") {
                None => 55,
                Some(t) => t
                    .as_u64()
                    .filter(|&t| (1..=86_400).contains(&t))
                    .ok_or_else(|| bad("bad \"timeout\""))?,
            };
            let binary = text("message-type") == Some("binary");
            let content = match (text("content"), text("content-bin")) {
                (Some(c), _) => c.as_bytes().to_vec(),
                (None, Some(b)) => {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .map_err(|_| bad("bad \"content-bin\""))?
                }
                (None, None) => return Ok(Control::KeepAlive(None)),
            };
            Ok(Control::KeepAlive(Some(KeepAlive {
                content,
                binary,
                timeout_secs: timeout as u32,
            })))
        }
        other => Err(BadControl(format!("unknown type {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(events: &[(EventType, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, content) in events {
            push(&mut out, *kind, content);
        }
        out
    }

    #[test]
    fn encodes_as_pushpin_does() {
        let out = encode(&[
            (EventType::Open, b""),
            (EventType::Text, b"hello"),
            (EventType::Text, b""),
            (EventType::Binary, &[0u8; 26]),
            (EventType::Disconnect, b""),
        ]);
        let expected: &[u8] = b"OPEN\r\nTEXT 5\r\nhello\r\nTEXT 0\r\n\r\nBINARY 1a\r\n\
            \0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\r\nDISCONNECT\r\n";
        assert_eq!(&out[..], expected);
        let mut close = Vec::new();
        push_close(&mut close, Some(1000), b"bye");
        assert_eq!(&close[..], b"CLOSE 5\r\n\x03\xe8bye\r\n");
        let parsed = parse(&close).unwrap();
        assert_eq!(parsed[0].close(), (Some(1000), &b"bye"[..]));
    }

    #[test]
    fn parses_what_backends_write() {
        let events = parse(b"OPEN\r\nTEXT 5\r\nhello\r\nBINARY a\r\n0123456789\r\nCLOSE 2\r\n\x03\xe8\r\n").unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(events[1].content, b"hello");
        assert_eq!(events[2].kind, EventType::Binary);
        assert_eq!(events[2].content, b"0123456789");
        assert_eq!(events[3].close(), (Some(1000), &b""[..]));
        assert_eq!(parse(b"").unwrap(), vec![]);
        // Unknown types (names are case-sensitive) are skipped, content
        // and all; an empty line is one.
        let events = parse(b"text 5\r\nhello\r\nHELLO\r\n\r\nTEXT 2\r\nok\r\n").unwrap();
        assert_eq!(
            events,
            vec![Event {
                kind: EventType::Text,
                content: b"ok"
            }]
        );
        // A content of its own CRLFs is content.
        assert_eq!(parse(b"TEXT 2\r\n\r\n\r\n").unwrap()[0].content, b"\r\n");
    }

    #[test]
    fn refuses_what_is_not_an_event_list() {
        for (body, why) in [
            (&b"OPEN"[..], Malformed::Truncated),
            (b"TEXT 5\r\nhel", Malformed::Truncated),
            (b"TEXT 5\r\nhello", Malformed::Truncated),
            (b"TEXT 5\r\nhelloXY", Malformed::MissingCrlf),
            (b"TEXT 5\r\nhello!\r\n", Malformed::MissingCrlf),
            (b"TEXT \r\n\r\n", Malformed::BadLength),
            (b"TEXT -1\r\n\r\n", Malformed::BadLength),
            (b"TEXT 5g\r\nhello\r\n", Malformed::BadLength),
            (b"TEXT 7FFFFFFF\r\nhello\r\n", Malformed::Truncated),
            (b"TEXT FFFFFFFFFFFFFFFFF\r\n", Malformed::BadLength),
            (b"TEXT FFFFFFFFFFFFFFFF\r\n", Malformed::Truncated),
        ] {
            assert_eq!(parse(body), Err(why), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn control_messages() {
        assert_eq!(
            parse_control(br#"{"type":"subscribe","channel":"news"}"#),
            Ok(Control::Subscribe("news".into()))
        );
        assert_eq!(
            parse_control(br#"{"type":"unsubscribe","channel":"news"}"#),
            Ok(Control::Unsubscribe("news".into()))
        );
        assert_eq!(parse_control(br#"{"type":"detach"}"#), Ok(Control::Detach));
        assert_eq!(
            parse_control(br#"{"type":"set-meta","name":"user","value":"ann"}"#),
            Ok(Control::SetMeta("user".into(), Some("ann".into())))
        );
        assert_eq!(
            parse_control(br#"{"type":"set-meta","name":"user","value":""}"#),
            Ok(Control::SetMeta("user".into(), None))
        );
        assert_eq!(
            parse_control(br#"{"type":"keep-alive","content":"{}","timeout":20}"#),
            Ok(Control::KeepAlive(Some(KeepAlive {
                content: b"{}".to_vec(),
                binary: false,
                timeout_secs: 20
            })))
        );
        assert_eq!(parse_control(br#"{"type":"keep-alive"}"#), Ok(Control::KeepAlive(None)));
        for bad in [
            &br#"{"type":"subscribe"}"#[..],
            br#"{"type":"nope"}"#,
            br#"[]"#,
            br#"{"type":"keep-alive","content":"x","timeout":0}"#,
            br#"{"type":"close","code":1000}"#,
            b"{",
        ] {
            assert!(parse_control(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    fn event_type() -> impl Strategy<Value = EventType> {
        prop_oneof![
            Just(EventType::Open),
            Just(EventType::Text),
            Just(EventType::Binary),
            Just(EventType::Ping),
            Just(EventType::Pong),
            Just(EventType::Close),
            Just(EventType::Disconnect),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(events in proptest::collection::vec((event_type(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20)) {
            let events: Vec<(EventType, Vec<u8>)> = events
                .into_iter()
                .map(|(k, c)| if has_content(k) { (k, c) } else { (k, Vec::new()) })
                .collect();
            let mut out = Vec::new();
            let mut expected_len = 0;
            for (kind, content) in &events {
                push(&mut out, *kind, content);
                expected_len += encoded_len(*kind, content.len());
            }
            prop_assert_eq!(out.len(), expected_len);
            let parsed = parse(&out).unwrap();
            prop_assert_eq!(parsed.len(), events.len());
            for (p, (kind, content)) in parsed.iter().zip(&events) {
                prop_assert_eq!(p.kind, *kind);
                prop_assert_eq!(p.content, &content[..]);
            }
        }

        #[test]
        fn any_body_is_parsed_or_refused(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&body);
        }

        #[test]
        fn cut_lists_are_refused(events in proptest::collection::vec((event_type(), proptest::collection::vec(any::<u8>(), 1..50)), 1..5), cut in 1usize..1000) {
            let mut out = Vec::new();
            for (kind, content) in &events {
                push(&mut out, *kind, content);
            }
            let cut = cut % out.len();
            if cut > 0 {
                // A list cut inside its last event is never read as whole.
                let (kind, content) = events.last().unwrap();
                let last_start = out.len() - encoded_len(*kind, content.len());
                if cut > last_start {
                    prop_assert!(parse(&out[..cut]).is_err());
                }
            }
        }
    }
}
