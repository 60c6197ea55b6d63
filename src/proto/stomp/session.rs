//! A STOMP session's rules, sans-I/O: what each client frame does and what
//! is answered, per the STOMP 1.2 specification. Frames come in decoded;
//! actions go out (frames for the client, subscriptions, publishes, close),
//! and the connection carries them out.
//!
//! What is enforced, by section of the specification:
//! - "Connecting", "Protocol Negotiation": the first frame is CONNECT or
//!   STOMP; the highest version both sides accept is chosen (a missing
//!   `accept-version` means 1.0); none in common is an ERROR that lists
//!   ours. CONNECTED carries `version`, `heart-beat`, `server`, `session`.
//! - "Heart-beating": each direction's interval is the larger of what the
//!   sender can do and what the receiver wants, 0 if either says 0.
//! - "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT",
//!   "ABORT", "DISCONNECT": their required headers; `ack` is `auto`,
//!   `client` or `client-individual`; a SEND inside a transaction is held
//!   until COMMIT and dropped on ABORT.
//! - "RECEIPT": any client frame with a `receipt` header is answered with a
//!   RECEIPT once it has been acted on.
//! - "ERROR": a broken rule is answered with an ERROR frame (`message`
//!   header, a body that says more, `receipt-id` when the frame asked for a
//!   receipt), and the connection is closed.
//!
//! Destinations: `/topic/<name>` is the topic `<name>` of the native
//! protocol (the same names, docs/PROTOCOL.md), so STOMP and native clients
//! see each other's messages; `/queue/<name>` delivers each message to one
//! subscriber. Anything else is refused, naming the supported prefixes.
//!
//! Not checked: `host` (virtual hosts are not a concept here) and
//! `login`/`passcode` (authentication happens at the handshake).

use std::collections::HashMap;

use bytes::Bytes;

use super::frame::{Command, Frame, ParseError};
use crate::topic::valid_topic;

/// STOMP versions, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1_0,
    V1_1,
    V1_2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    fn parse(s: &str) -> Option<Version> {
        match s.trim() {
            "1.0" => Some(Version::V1_0),
            "1.1" => Some(Version::V1_1),
            "1.2" => Some(Version::V1_2),
            _ => None,
        }
    }
}

/// Where a SEND goes, or what a SUBSCRIBE listens to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Every subscriber (the native protocol's topic of that name).
    Topic(String),
    /// One subscriber per message, round robin.
    Queue(String),
}

impl Destination {
    pub fn parse(s: &str) -> Option<Destination> {
        let (make, name): (fn(String) -> Destination, &str) = if let Some(name) = s.strip_prefix("/topic/") {
            (Destination::Topic, name)
        } else if let Some(name) = s.strip_prefix("/queue/") {
            (Destination::Queue, name)
        } else {
            return None;
        };
        valid_topic(name.as_bytes()).then(|| make(name.to_string()))
    }

    pub fn to_header(&self) -> String {
        match self {
            Destination::Topic(name) => format!("/topic/{name}"),
            Destination::Queue(name) => format!("/queue/{name}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    Auto,
    Client,
    ClientIndividual,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub destination: Destination,
    pub ack: AckMode,
}

/// A message to publish: its destination, the sender's headers that pass
/// through to MESSAGE frames (not the frame's own: destination,
/// content-length, transaction, receipt), and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub destination: Destination,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// What holding a SEND costs beyond its bytes (its place in the list, its
/// destination): an empty SEND is not free, so a transaction of them is
/// bounded too.
const HELD_SEND_BYTES: usize = 64;

impl Publish {
    /// What holding it in a transaction counts against the limit.
    fn held_bytes(&self) -> usize {
        let name = match &self.destination {
            Destination::Topic(n) | Destination::Queue(n) => n.len(),
        };
        HELD_SEND_BYTES + name + self.body.len() + self.headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
    }
}

/// What the connection does for the session, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this frame to the client.
    Reply(Frame),
    Subscribe(Subscription),
    /// Stop the subscription with this id (it was on this destination).
    Unsubscribe {
        id: String,
        destination: Destination,
    },
    Publish(Publish),
    /// A SEND to this destination is held in a transaction: the session's
    /// grants must allow it now, before its RECEIPT, not only at COMMIT.
    Held(Destination),
    /// Close the connection once what came before is sent (after an ERROR,
    /// or DISCONNECT).
    Close,
}

/// The session's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The id given to the client in CONNECTED (`session`).
    pub session_id: String,
    /// Milliseconds: how often we can send heart-beats, and how often we
    /// want them (0: not at all).
    pub heart_beat_send_ms: u64,
    pub heart_beat_want_ms: u64,
    pub max_subscriptions: usize,
    /// Open transactions, and bytes of SENDs they may hold in all.
    pub max_transactions: usize,
    pub max_transaction_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingConnect,
    Connected,
    /// An ERROR or DISCONNECT ended it: further frames are ignored.
    Ended,
}

#[derive(Debug)]
pub struct Session {
    settings: Settings,
    state: State,
    version: Version,
    /// Negotiated intervals (ms): ours to the client, the client's to us.
    send_every_ms: u64,
    expect_every_ms: u64,
    subscriptions: Vec<Subscription>,
    transactions: HashMap<String, Vec<Publish>>,
    transaction_bytes: usize,
}

/// The server's name in CONNECTED.
const SERVER: &str = concat!("sluice/", env!("CARGO_PKG_VERSION"));
const SUPPORTED: &str = "1.0,1.1,1.2";

impl Session {
    pub fn new(settings: Settings) -> Session {
        Session {
            settings,
            state: State::AwaitingConnect,
            version: Version::V1_2,
            send_every_ms: 0,
            expect_every_ms: 0,
            subscriptions: Vec::new(),
            transactions: HashMap::new(),
            transaction_bytes: 0,
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Negotiated heart-beats, in ms: (we send every, the client must send
    /// every). 0 is none.
    pub fn heart_beats(&self) -> (u64, u64) {
        (self.send_every_ms, self.expect_every_ms)
    }

    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }

    /// CONNECT was answered and the session is not over.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Ends the session: every later frame is ignored.
    pub fn end(&mut self) {
        self.state = State::Ended;
    }

    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// The decoder refused the stream: ERROR, then close.
    pub fn on_parse_error(&mut self, error: ParseError, out: &mut Vec<Action>) {
        self.fail(error.message(), "The frame could not be parsed.", None, out);
    }

    /// Acts on one client frame.
    pub fn on_frame(&mut self, frame: Frame, out: &mut Vec<Action>) {
        let receipt = frame.header("receipt").map(str::to_string);
        match self.state {
            State::Ended => return,
            State::AwaitingConnect => match frame.command {
                Command::Connect | Command::Stomp => self.connect(&frame, out),
                _ => self.fail(
                    "expected CONNECT",
                    "The first frame must be CONNECT or STOMP.",
                    receipt,
                    out,
                ),
            },
            State::Connected => {
                if let Err((message, detail)) = self.act(frame, out) {
                    return self.fail(message, &detail, receipt, out);
                }
                if let Some(id) = receipt {
                    out.push(Action::Reply(
                        Frame::new(Command::Receipt).with_header("receipt-id", &id),
                    ));
                }
            }
        }
        if self.state == State::Ended && !matches!(out.last(), Some(Action::Close)) {
            out.push(Action::Close);
        }
    }

    fn connect(&mut self, frame: &Frame, out: &mut Vec<Action>) {
        let offered = frame.header("accept-version").unwrap_or("1.0");
        let Some(version) = offered.split(',').filter_map(Version::parse).max() else {
            let error = Frame::new(Command::Error)
                .with_header("version", SUPPORTED)
                .with_header("content-type", "text/plain")
                .with_header("message", "unsupported protocol version")
                .with_body("Supported protocol versions are 1.0 1.1 1.2");
            out.push(Action::Reply(error));
            self.state = State::Ended;
            return;
        };
        self.version = version;
        let (cx, cy) = match frame.header("heart-beat").map(parse_heart_beat) {
            Some(Some(pair)) => pair,
            Some(None) => {
                return self.fail(
                    "malformed heart-beat",
                    "heart-beat must be two integers: <cx>,<cy>.",
                    None,
                    out,
                )
            }
            None => (0, 0),
        };
        let (sx, sy) = (self.settings.heart_beat_send_ms, self.settings.heart_beat_want_ms);
        self.send_every_ms = if sx == 0 || cy == 0 { 0 } else { sx.max(cy) };
        self.expect_every_ms = if cx == 0 || sy == 0 { 0 } else { cx.max(sy) };
        let connected = Frame::new(Command::Connected)
            .with_header("version", version.as_str())
            .with_header("heart-beat", &format!("{sx},{sy}"))
            .with_header("server", SERVER)
            .with_header("session", &self.settings.session_id);
        out.push(Action::Reply(connected));
        self.state = State::Connected;
    }

    /// One frame of a connected session. `Err`: the ERROR's message header
    /// and body.
    fn act(&mut self, frame: Frame, out: &mut Vec<Action>) -> Result<(), (&'static str, String)> {
        match frame.command {
            Command::Send => {
                let destination = destination_of(&frame)?;
                let transaction = frame.header("transaction").map(str::to_string);
                let publish = Publish {
                    destination,
                    headers: passed_through(frame.headers),
                    body: frame.body,
                };
                match transaction {
                    None => out.push(Action::Publish(publish)),
                    Some(tx) => {
                        let size = publish.held_bytes();
                        if self.transaction_bytes + size > self.settings.max_transaction_bytes {
                            return Err((
                                "transaction too large",
                                format!("Transactions may hold {} bytes.", self.settings.max_transaction_bytes),
                            ));
                        }
                        let held = self.transactions.get_mut(&tx).ok_or_else(|| unknown_transaction(&tx))?;
                        out.push(Action::Held(publish.destination.clone()));
                        // Its own copy: a slice would keep the whole
                        // message that carried it for as long as it is held.
                        let body = Bytes::copy_from_slice(&publish.body);
                        held.push(Publish { body, ..publish });
                        self.transaction_bytes += size;
                    }
                }
            }
            Command::Subscribe => {
                // 1.0 makes `id` optional: the destination names it then.
                let id = match (frame.header("id"), self.version) {
                    (None, Version::V1_0) => required(&frame, "destination")?,
                    _ => required(&frame, "id")?,
                };
                let destination = destination_of(&frame)?;
                let ack = match frame.header("ack").unwrap_or("auto") {
                    "auto" => AckMode::Auto,
                    "client" => AckMode::Client,
                    "client-individual" => AckMode::ClientIndividual,
                    other => {
                        return Err((
                            "bad ack mode",
                            format!("ack must be auto, client or client-individual, not {other:?}."),
                        ))
                    }
                };
                if self.subscriptions.iter().any(|s| s.id == id) {
                    return Err((
                        "duplicate subscription id",
                        format!("Subscription {id:?} already exists."),
                    ));
                }
                if self.subscriptions.len() >= self.settings.max_subscriptions {
                    return Err((
                        "too many subscriptions",
                        format!(
                            "At most {} subscriptions per connection.",
                            self.settings.max_subscriptions
                        ),
                    ));
                }
                let subscription = Subscription {
                    id: id.to_string(),
                    destination,
                    ack,
                };
                self.subscriptions.push(subscription.clone());
                out.push(Action::Subscribe(subscription));
            }
            Command::Unsubscribe => {
                let id = required(&frame, "id")?;
                // An unknown id is not an error: the subscription may have
                // been ended by the server already.
                if let Some(at) = self.subscriptions.iter().position(|s| s.id == id) {
                    let s = self.subscriptions.remove(at);
                    out.push(Action::Unsubscribe {
                        id: s.id,
                        destination: s.destination,
                    });
                }
            }
            Command::Ack | Command::Nack => {
                // 1.2 names the message by `id`; 1.1 by `message-id`.
                let id_header = if self.version == Version::V1_2 {
                    "id"
                } else {
                    "message-id"
                };
                required(&frame, id_header)?;
                if let Some(tx) = frame.header("transaction") {
                    if !self.transactions.contains_key(tx) {
                        return Err(unknown_transaction(tx));
                    }
                }
                // Deliveries are not held for redelivery: an ACK or NACK
                // in any mode is accepted and has nothing to release.
            }
            Command::Begin => {
                let tx = required(&frame, "transaction")?;
                if self.transactions.contains_key(tx) {
                    return Err(("duplicate transaction", format!("Transaction {tx:?} is already open.")));
                }
                if self.transactions.len() >= self.settings.max_transactions {
                    return Err((
                        "too many transactions",
                        format!(
                            "At most {} open transactions per connection.",
                            self.settings.max_transactions
                        ),
                    ));
                }
                self.transactions.insert(tx.to_string(), Vec::new());
            }
            Command::Commit | Command::Abort => {
                let tx = required(&frame, "transaction")?;
                let held = self.transactions.remove(tx).ok_or_else(|| unknown_transaction(tx))?;
                self.transaction_bytes -= held.iter().map(Publish::held_bytes).sum::<usize>();
                if frame.command == Command::Commit {
                    out.extend(held.into_iter().map(Action::Publish));
                }
            }
            Command::Disconnect => {
                // The RECEIPT (if asked) goes out before the close.
                self.state = State::Ended;
            }
            Command::Connect | Command::Stomp => {
                return Err(("already connected", "CONNECT is only the first frame.".into()));
            }
            Command::Connected | Command::Message | Command::Receipt | Command::Error => {
                return Err((
                    "unexpected command",
                    format!("{} is a server frame.", frame.command.as_str()),
                ));
            }
        }
        Ok(())
    }

    fn fail(&mut self, message: &str, detail: &str, receipt: Option<String>, out: &mut Vec<Action>) {
        let mut error = Frame::new(Command::Error)
            .with_header("content-type", "text/plain")
            .with_header("message", message);
        if let Some(id) = receipt {
            error = error.with_header("receipt-id", &id);
        }
        let error = error.with_header("content-length", &detail.len().to_string());
        out.push(Action::Reply(error.with_body(detail.to_string())));
        out.push(Action::Close);
        self.state = State::Ended;
    }
}

fn parse_heart_beat(value: &str) -> Option<(u64, u64)> {
    let (a, b) = value.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

fn required<'f>(frame: &'f Frame, name: &'static str) -> Result<&'f str, (&'static str, String)> {
    frame.header(name).ok_or_else(|| {
        (
            "missing header",
            format!("{} needs a {name} header.", frame.command.as_str()),
        )
    })
}

fn destination_of(frame: &Frame) -> Result<Destination, (&'static str, String)> {
    let raw = required(frame, "destination")?;
    Destination::parse(raw).ok_or_else(|| {
        (
            "unsupported destination",
            format!(
                "{raw:?} is not supported: destinations are /topic/<name> or /queue/<name>, names of 1 to 255 of A-Z a-z 0-9 . _ - : /"
            ),
        )
    })
}

/// The sender's headers that a MESSAGE carries on: all but those that
/// belong to the SEND frame itself (first entry of each name only).
pub fn passed_through(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut kept: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        let own = matches!(
            name.as_str(),
            "destination" | "content-length" | "transaction" | "receipt" | "subscription" | "message-id" | "ack"
        );
        if !own && !kept.iter().any(|(n, _)| *n == name) {
            kept.push((name, value));
        }
    }
    kept
}

fn unknown_transaction(tx: &str) -> (&'static str, String) {
    ("unknown transaction", format!("Transaction {tx:?} is not open."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            session_id: "0.1.2".into(),
            heart_beat_send_ms: 10_000,
            heart_beat_want_ms: 10_000,
            max_subscriptions: 2,
            max_transactions: 1,
            // One held SEND of a 200-byte body to /topic/t, exactly.
            max_transaction_bytes: HELD_SEND_BYTES + 1 + 200,
        }
    }

    fn connected() -> Session {
        let mut s = Session::new(settings());
        let mut out = Vec::new();
        s.on_frame(
            Frame::new(Command::Connect).with_header("accept-version", "1.2"),
            &mut out,
        );
        assert!(matches!(&out[..], [Action::Reply(f)] if f.command == Command::Connected));
        s
    }

    fn run(s: &mut Session, frame: Frame) -> Vec<Action> {
        let mut out = Vec::new();
        s.on_frame(frame, &mut out);
        out
    }

    fn error_message(out: &[Action]) -> Option<String> {
        match out {
            [Action::Reply(f), Action::Close] if f.command == Command::Error => f.header("message").map(str::to_string),
            _ => None,
        }
    }

    #[test]
    fn connect_negotiates_version_and_heart_beats() {
        let mut s = Session::new(settings());
        let out = run(
            &mut s,
            Frame::new(Command::Stomp)
                .with_header("accept-version", "1.0,1.1,1.2,2.1")
                .with_header("host", "example")
                .with_header("heart-beat", "5000,20000"),
        );
        let [Action::Reply(c)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(c.command, Command::Connected);
        assert_eq!(c.header("version"), Some("1.2"));
        assert_eq!(c.header("heart-beat"), Some("10000,10000"));
        assert_eq!(c.header("session"), Some("0.1.2"));
        assert!(c.header("server").unwrap().starts_with("sluice/"));
        // We send every max(10000, 20000); the client every max(5000, 10000).
        assert_eq!(s.heart_beats(), (20_000, 10_000));

        let mut s = Session::new(settings());
        run(&mut s, Frame::new(Command::Connect).with_header("heart-beat", "0,0"));
        assert_eq!(s.version(), Version::V1_0, "no accept-version: 1.0");
        assert_eq!(s.heart_beats(), (0, 0));
    }

    #[test]
    fn no_common_version_is_an_error_listing_ours() {
        let mut s = Session::new(settings());
        let out = run(
            &mut s,
            Frame::new(Command::Connect).with_header("accept-version", "2.0,3.1"),
        );
        let [Action::Reply(e), Action::Close] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(e.command, Command::Error);
        assert_eq!(e.header("version"), Some("1.0,1.1,1.2"));
        assert!(s.is_ended());
        assert!(
            run(&mut s, Frame::new(Command::Connect)).is_empty(),
            "an ended session ignores frames"
        );
    }

    #[test]
    fn first_frame_must_be_connect() {
        let mut s = Session::new(settings());
        let out = run(
            &mut s,
            Frame::new(Command::Send)
                .with_header("destination", "/topic/a")
                .with_header("receipt", "9"),
        );
        assert_eq!(error_message(&out).as_deref(), Some("expected CONNECT"));
        let Action::Reply(e) = &out[0] else { panic!() };
        assert_eq!(e.header("receipt-id"), Some("9"));
        let mut s = Session::new(settings());
        let out = run(&mut s, Frame::new(Command::Connect).with_header("heart-beat", "x"));
        assert_eq!(error_message(&out).as_deref(), Some("malformed heart-beat"));
    }

    #[test]
    fn subscribe_and_unsubscribe_with_receipts() {
        let mut s = connected();
        let out = run(
            &mut s,
            Frame::new(Command::Subscribe)
                .with_header("id", "0")
                .with_header("destination", "/topic/news")
                .with_header("ack", "client-individual")
                .with_header("receipt", "r1"),
        );
        let sub = Subscription {
            id: "0".into(),
            destination: Destination::Topic("news".into()),
            ack: AckMode::ClientIndividual,
        };
        assert_eq!(out[0], Action::Subscribe(sub));
        assert!(
            matches!(&out[1], Action::Reply(r) if r.command == Command::Receipt && r.header("receipt-id") == Some("r1"))
        );
        let out = run(&mut s, Frame::new(Command::Unsubscribe).with_header("id", "0"));
        assert_eq!(
            out,
            [Action::Unsubscribe {
                id: "0".into(),
                destination: Destination::Topic("news".into())
            }]
        );
        assert!(run(&mut s, Frame::new(Command::Unsubscribe).with_header("id", "0")).is_empty());
    }

    #[test]
    fn subscribe_errors() {
        let sub = |id: &str, dest: &str| {
            Frame::new(Command::Subscribe)
                .with_header("id", id)
                .with_header("destination", dest)
        };
        let mut s = connected();
        assert_eq!(
            error_message(&run(&mut s, sub("0", "/exchange/x"))).as_deref(),
            Some("unsupported destination")
        );
        let mut s = connected();
        assert_eq!(
            error_message(&run(&mut s, sub("0", "/topic/"))).as_deref(),
            Some("unsupported destination")
        );
        let mut s = connected();
        let out = run(
            &mut s,
            Frame::new(Command::Subscribe).with_header("destination", "/topic/a"),
        );
        assert_eq!(error_message(&out).as_deref(), Some("missing header"));
        let mut s = connected();
        run(&mut s, sub("0", "/topic/a"));
        assert_eq!(
            error_message(&run(&mut s, sub("0", "/topic/b"))).as_deref(),
            Some("duplicate subscription id")
        );
        let mut s = connected();
        run(&mut s, sub("0", "/topic/a"));
        run(&mut s, sub("1", "/queue/b"));
        assert_eq!(s.subscriptions().len(), 2);
        assert_eq!(
            error_message(&run(&mut s, sub("2", "/topic/c"))).as_deref(),
            Some("too many subscriptions")
        );
        let mut s = connected();
        let out = run(&mut s, sub("0", "/topic/a").with_header("ack", "sometimes"));
        assert_eq!(error_message(&out).as_deref(), Some("bad ack mode"));
    }

    #[test]
    fn send_publishes_with_user_headers_passed_through() {
        let mut s = connected();
        let out = run(
            &mut s,
            Frame::new(Command::Send)
                .with_header("destination", "/queue/jobs")
                .with_header("content-type", "application/json")
                .with_header("content-length", "2")
                .with_header("x-trace", "abc")
                .with_header("x-trace", "ignored")
                .with_body(&b"{}"[..]),
        );
        assert_eq!(
            out,
            [Action::Publish(Publish {
                destination: Destination::Queue("jobs".into()),
                headers: vec![
                    ("content-type".into(), "application/json".into()),
                    ("x-trace".into(), "abc".into())
                ],
                body: Bytes::from_static(b"{}"),
            })]
        );
        let out = run(&mut s, Frame::new(Command::Send).with_header("destination", "/app/x"));
        assert_eq!(error_message(&out).as_deref(), Some("unsupported destination"));
        let Action::Reply(e) = &out[0] else { panic!() };
        assert!(String::from_utf8_lossy(&e.body).contains("/topic/<name> or /queue/<name>"));
    }

    #[test]
    fn transactions_hold_sends_until_commit_and_drop_them_on_abort() {
        let send = |tx: &str, body: &'static [u8]| {
            Frame::new(Command::Send)
                .with_header("destination", "/topic/t")
                .with_header("transaction", tx)
                .with_body(body)
        };
        let mut s = connected();
        assert!(run(&mut s, Frame::new(Command::Begin).with_header("transaction", "tx1")).is_empty());
        // Held, and to be checked against the grants now (before any RECEIPT).
        let held = |out: Vec<Action>| {
            assert_eq!(out, [Action::Held(Destination::Topic("t".into()))]);
        };
        held(run(&mut s, send("tx1", b"a")));
        held(run(&mut s, send("tx1", b"b")));
        let out = run(
            &mut s,
            Frame::new(Command::Commit)
                .with_header("transaction", "tx1")
                .with_header("receipt", "c"),
        );
        let bodies: Vec<&[u8]> = out
            .iter()
            .filter_map(|a| match a {
                Action::Publish(p) => Some(&p.body[..]),
                _ => None,
            })
            .collect();
        assert_eq!(bodies, [b"a", b"b"]);
        assert!(matches!(out.last(), Some(Action::Reply(r)) if r.command == Command::Receipt));
        // ABORT drops what the transaction held.
        run(&mut s, Frame::new(Command::Begin).with_header("transaction", "tx2"));
        run(&mut s, send("tx2", b"c"));
        assert!(run(&mut s, Frame::new(Command::Abort).with_header("transaction", "tx2")).is_empty());
        // The limits: open transactions, and the bytes they hold.
        run(&mut s, Frame::new(Command::Begin).with_header("transaction", "tx3"));
        let out = run(&mut s, Frame::new(Command::Begin).with_header("transaction", "tx4"));
        assert_eq!(error_message(&out).as_deref(), Some("too many transactions"));
        let held = |size: usize| {
            Frame::new(Command::Send)
                .with_header("destination", "/topic/t")
                .with_header("transaction", "t")
                .with_body(vec![0u8; size])
        };
        let mut s = connected();
        run(&mut s, Frame::new(Command::Begin).with_header("transaction", "t"));
        assert_eq!(
            error_message(&run(&mut s, held(201))).as_deref(),
            Some("transaction too large")
        );
        // Exactly at the limit (a 200-byte body), then one byte over it; an
        // empty SEND counts too.
        let mut s = connected();
        run(&mut s, Frame::new(Command::Begin).with_header("transaction", "t"));
        assert_eq!(run(&mut s, held(200)).len(), 1, "held");
        assert_eq!(
            error_message(&run(&mut s, held(1))).as_deref(),
            Some("transaction too large")
        );
    }

    #[test]
    fn unknown_and_duplicate_transactions_are_errors() {
        for frame in [
            Frame::new(Command::Commit).with_header("transaction", "nope"),
            Frame::new(Command::Abort).with_header("transaction", "nope"),
            Frame::new(Command::Send)
                .with_header("destination", "/topic/t")
                .with_header("transaction", "nope"),
            Frame::new(Command::Ack)
                .with_header("id", "1")
                .with_header("transaction", "nope"),
        ] {
            let mut s = connected();
            assert_eq!(
                error_message(&run(&mut s, frame)).as_deref(),
                Some("unknown transaction")
            );
        }
        let mut s = connected();
        run(&mut s, Frame::new(Command::Begin).with_header("transaction", "t"));
        let out = run(&mut s, Frame::new(Command::Begin).with_header("transaction", "t"));
        assert_eq!(error_message(&out).as_deref(), Some("duplicate transaction"));
    }

    #[test]
    fn ack_and_nack_need_their_id() {
        let mut s = connected();
        assert!(run(&mut s, Frame::new(Command::Ack).with_header("id", "m1")).is_empty());
        assert!(run(&mut s, Frame::new(Command::Nack).with_header("id", "m1")).is_empty());
        let out = run(&mut s, Frame::new(Command::Ack).with_header("message-id", "m1"));
        assert_eq!(
            error_message(&out).as_deref(),
            Some("missing header"),
            "1.2 names it id"
        );
    }

    #[test]
    fn disconnect_sends_its_receipt_then_closes() {
        let mut s = connected();
        let out = run(&mut s, Frame::new(Command::Disconnect).with_header("receipt", "77"));
        let [Action::Reply(r), Action::Close] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!((r.command, r.header("receipt-id")), (Command::Receipt, Some("77")));
        assert!(s.is_ended());
    }

    #[test]
    fn server_frames_and_a_second_connect_are_errors() {
        for command in [Command::Message, Command::Connected, Command::Receipt, Command::Error] {
            let mut s = connected();
            assert_eq!(
                error_message(&run(&mut s, Frame::new(command))).as_deref(),
                Some("unexpected command")
            );
        }
        let mut s = connected();
        assert_eq!(
            error_message(&run(&mut s, Frame::new(Command::Connect))).as_deref(),
            Some("already connected")
        );
    }

    #[test]
    fn parse_errors_end_the_session_with_an_error_frame() {
        let mut s = connected();
        let mut out = Vec::new();
        s.on_parse_error(ParseError::BodyTooLarge, &mut out);
        assert_eq!(error_message(&out).as_deref(), Some("body too large"));
        assert!(s.is_ended());
    }
}
