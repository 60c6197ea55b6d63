//! A STOMP connection on a route: the codec and the session rules (both
//! sans-I/O) wired to the connection and its shard. Replies go out through
//! the connection's `Outbound`; subscriptions and publishes go to the hub,
//! where `/topic/<name>` is the native topic `<name>` and `/queue/<name>`
//! is a queue (one subscriber per message).

use bytes::Bytes;

use super::frame::{Command, Decoder, Item, Limits};
use super::session::{AckMode, Action, Destination, Session, Settings};
use crate::conn::outbound::Outbound;
use crate::conn::pool::BufferPool;
use crate::conn::shard;
use crate::pubsub::message::{encode_stomp_headers, Message};
use crate::pubsub::topics::StompTarget;
use crate::ws::{CloseCode, MessageKind, Opcode};

/// Open transactions per connection. The bytes they hold are bounded by
/// `max_outbound_bytes`, like deliveries queued for the connection.
const MAX_TRANSACTIONS: usize = 16;

pub struct StompConn {
    decoder: Decoder,
    session: Session,
    actions: Vec<Action>,
    /// Kind of the WebSocket message that carried the frames being read.
    kind: MessageKind,
    /// The session ended: close with this code once the replies are out.
    close: Option<CloseCode>,
}

impl StompConn {
    pub fn new(conn: &shard::Session) -> StompConn {
        let config = &conn.shard().config;
        StompConn {
            decoder: Decoder::new(Limits {
                max_body_bytes: config.limits.max_message_bytes,
                ..Limits::default()
            }),
            session: Session::new(Settings {
                session_id: conn.id(),
                heart_beat_send_ms: config.stomp_heart_beat_ms,
                heart_beat_want_ms: config.stomp_heart_beat_ms,
                max_subscriptions: config.max_subscriptions,
                max_transactions: MAX_TRANSACTIONS,
                max_transaction_bytes: config.max_outbound_bytes,
            }),
            actions: Vec::new(),
            kind: MessageKind::Text,
            close: None,
        }
    }

    /// One WebSocket message: any number of whole or partial frames and
    /// heart-beats (STOMP over WebSocket may split a frame across messages
    /// or put several in one).
    pub fn on_message(
        &mut self,
        kind: MessageKind,
        payload: &[u8],
        out: &mut Outbound,
        pool: &BufferPool,
        conn: &shard::Session,
    ) {
        if self.session.is_ended() {
            return;
        }
        self.kind = kind;
        self.decoder.push(payload);
        self.drain(out, pool, conn);
    }

    /// Acts on every whole frame decoded, until none is left, a publish
    /// waits for ring space (`conn.is_blocked()`: the rest waits in the
    /// decoder), or the session ends.
    pub fn drain(&mut self, out: &mut Outbound, pool: &BufferPool, conn: &shard::Session) {
        while !self.session.is_ended() && !conn.is_blocked() {
            match self.decoder.next_item() {
                Ok(None) => break,
                // The peer is alive: reading it already said so.
                Ok(Some(Item::HeartBeat)) => {}
                Ok(Some(Item::Frame(frame))) => {
                    let connect = matches!(frame.command, Command::Connect | Command::Stomp);
                    if connect && !self.session.is_connected() {
                        if let Err(refused) = take_connect_token(&frame, conn) {
                            self.deny(&refused, out, pool);
                            break;
                        }
                    }
                    self.session.on_frame(frame, &mut self.actions);
                    if connect && !self.session.is_ended() {
                        let (send, expect) = self.session.heart_beats();
                        conn.set_heart_beats(send, expect);
                    }
                }
                Err(error) => self.session.on_parse_error(error, &mut self.actions),
            }
            self.carry_out(out, pool, conn);
        }
        if self.session.is_ended() {
            // Nothing more is read from this peer: free what it sent.
            self.decoder = Decoder::new(Limits::default());
        }
    }

    /// Ends the session with an ERROR for an action its identity does not
    /// allow. STOMP 1.2 "ERROR": the connection closes after it (1008:
    /// a policy decision, not a broken frame); the frame's other actions
    /// (its RECEIPT) are not carried out.
    fn deny(&mut self, why: &str, out: &mut Outbound, pool: &BufferPool) {
        let error = super::frame::Frame::new(Command::Error)
            .with_header("content-type", "text/plain")
            .with_header("message", "access denied")
            .with_body(why.to_string());
        let mut encoded = Vec::new();
        error.encode(&mut encoded);
        out.push_frame(pool, Opcode::Text, &encoded);
        self.actions.clear();
        self.session.end();
        self.close = Some(CloseCode::POLICY_VIOLATION);
    }

    fn carry_out(&mut self, out: &mut Outbound, pool: &BufferPool, conn: &shard::Session) {
        let mut errored = false;
        let mut encoded = Vec::new();
        // Grants first: a denied frame has none of its actions carried out.
        for action in &self.actions {
            let (what, destination) = match action {
                Action::Subscribe(s) => (crate::auth::Action::Subscribe, &s.destination),
                Action::Publish(p) => (crate::auth::Action::Publish, &p.destination),
                Action::Held(destination) => (crate::auth::Action::Publish, destination),
                _ => continue,
            };
            let name = match destination {
                Destination::Topic(n) | Destination::Queue(n) => n,
            };
            if !conn.allows(what, name.as_bytes()) {
                let verb = if what == crate::auth::Action::Subscribe {
                    "subscribe to"
                } else {
                    "send to"
                };
                return self.deny(
                    &format!("This session may not {verb} {}.", destination.to_header()),
                    out,
                    pool,
                );
            }
        }
        for action in self.actions.drain(..) {
            match action {
                Action::Reply(frame) => {
                    errored |= frame.command == Command::Error;
                    encoded.clear();
                    frame.encode(&mut encoded);
                    out.push_frame(pool, Opcode::Text, &encoded);
                }
                Action::Subscribe(s) => conn.subscribe_stomp(
                    &table_key(&s.destination),
                    StompTarget {
                        id: escaped(&s.id),
                        ack: s.ack != AckMode::Auto,
                    },
                ),
                Action::Unsubscribe { id, destination } => {
                    conn.unsubscribe_stomp(&table_key(&destination), &escaped(&id))
                }
                Action::Publish(p) => {
                    // MESSAGE frames go out as text only if the body is text.
                    let kind = match self.kind {
                        MessageKind::Text if std::str::from_utf8(&p.body).is_ok() => MessageKind::Text,
                        _ => MessageKind::Binary,
                    };
                    conn.publish_message(Message {
                        key: table_key(&p.destination),
                        kind,
                        body: p.body,
                        stomp_headers: Some(encode_stomp_headers(&p.headers)),
                        id: conn.shard().hub.next_message_id(),
                        native: None,
                    });
                }
                // Its grants were checked above; it is published at COMMIT.
                Action::Held(_) => {}
                // STOMP 1.2 "ERROR": the server closes after an ERROR;
                // after DISCONNECT (and its RECEIPT) the session is over.
                Action::Close => {
                    self.close = Some(if errored {
                        CloseCode::PROTOCOL_ERROR
                    } else {
                        CloseCode::NORMAL
                    })
                }
            }
        }
    }

    /// The close the session asked for, once.
    pub fn take_close(&mut self) -> Option<CloseCode> {
        self.close.take()
    }
}

/// A token in CONNECT (`Authorization: Bearer <token>`, or `passcode`)
/// is taken as a fresh token for the session (`Session::take_token`); on
/// a route that takes no tokens it is not looked at. `Err`: why it was
/// refused, for the ERROR frame.
fn take_connect_token(frame: &super::frame::Frame, conn: &shard::Session) -> Result<(), String> {
    let token = match (frame.header("Authorization"), frame.header("passcode")) {
        (Some(value), _) => crate::auth::token_of(Some(value.as_bytes()), std::iter::empty(), None),
        (None, Some(passcode)) => Some(passcode.as_bytes()),
        (None, None) => None,
    };
    let Some(token) = token else {
        return Ok(());
    };
    match conn.take_token(token) {
        Ok(()) | Err(shard::TokenRefused::NotTaken) => Ok(()),
        Err(shard::TokenRefused::Invalid(failure)) => Err(format!("The token was refused: {}.", failure.reason())),
        Err(shard::TokenRefused::OtherUser) => Err("The token is another user's.".into()),
    }
}

/// The topic table key of a destination.
fn table_key(destination: &Destination) -> Bytes {
    match destination {
        Destination::Topic(name) => Bytes::copy_from_slice(name.as_bytes()),
        Destination::Queue(name) => Bytes::from(crate::topic::queue_key(name.as_bytes())),
    }
}

/// A subscription id as a MESSAGE header value carries it (STOMP 1.2
/// "Value Encoding").
fn escaped(id: &str) -> Box<str> {
    let mut out = Vec::with_capacity(id.len());
    super::frame::push_value(&mut out, id, true);
    String::from_utf8(out).expect("escaping keeps UTF-8").into_boxed_str()
}
