//! A STOMP connection's frames carried out (`proto::stomp::conn` decides
//! what each asks for): replies go out through the connection's
//! `Outbound`; subscriptions and publishes go to the hub, where
//! `/topic/<name>` is the native topic `<name>` and `/queue/<name>` is a
//! queue (one subscriber per message). Every action of a frame is checked
//! against the session's grants before any is carried out.

use bytes::Bytes;

use super::outbound::Outbound;
use super::pool::BufferPool;
use super::shard::{self, Session};
use crate::proto::stomp::conn::{Step, StompConn};
use crate::proto::stomp::frame::Frame;
use crate::proto::stomp::session::{AckMode, Action, Destination, Settings};
use crate::pubsub::message::{encode_stomp_headers, Message};
use crate::pubsub::topics::StompTarget;
use crate::ws::{MessageKind, Opcode};

use super::hooks::{has_hook, Ask, Verdict, Waiting};

/// Open transactions per connection. The bytes they hold are bounded by
/// `max_outbound_bytes`, like deliveries queued for the connection.
const MAX_TRANSACTIONS: usize = 16;

/// A new STOMP connection's state, with the limits the configuration sets.
pub fn new_conn(conn: &Session) -> StompConn {
    let config = &conn.shard().config;
    let settings = Settings {
        session_id: conn.id(),
        heart_beat_send_ms: config.stomp_heart_beat_ms,
        heart_beat_want_ms: config.stomp_heart_beat_ms,
        max_subscriptions: config.max_subscriptions,
        max_transactions: MAX_TRANSACTIONS,
        max_transaction_bytes: config.max_outbound_bytes,
    };
    StompConn::new(settings, config.limits.max_message_bytes)
}

/// One WebSocket message of the connection.
pub fn on_message(
    stomp: &mut StompConn,
    kind: MessageKind,
    payload: &[u8],
    out: &mut Outbound,
    pool: &BufferPool,
    conn: &Session,
) {
    stomp.push(kind, payload);
    drain(stomp, out, pool, conn);
}

/// Carries out every whole frame, until none is left, a publish waits for
/// ring space (`conn.is_blocked()`: the rest waits in the decoder), or the
/// session ends.
pub fn drain(stomp: &mut StompConn, out: &mut Outbound, pool: &BufferPool, conn: &Session) {
    // A frame that waited for its hooks goes first.
    if let Some((Waiting::Stomp(mut actions), verdicts)) = conn.take_verdicts() {
        let mut verdicts = verdicts.into_iter();
        let (sub_hook, pub_hook) = (has_hook(conn, false), has_hook(conn, true));
        let mut refusal = None;
        for action in actions.iter_mut() {
            let hooked = match action {
                Action::Subscribe(_) => sub_hook,
                Action::Publish(_) => pub_hook,
                _ => false,
            };
            if !hooked {
                continue;
            }
            match verdicts.next().unwrap_or(Verdict::Unavailable) {
                Verdict::Allow(Some(body)) => {
                    if let Action::Publish(p) = action {
                        p.body = body;
                    }
                }
                Verdict::Allow(None) => {}
                Verdict::Deny(why) => refusal = refusal.or(Some(why)),
                Verdict::Unavailable => refusal = refusal.or(Some("The hook did not answer.".to_string())),
            }
        }
        if let Some(why) = refusal {
            stomp.deny(&why, &mut actions);
        }
        execute(stomp, &mut actions, out, pool, conn);
    }
    let mut actions = stomp.take_spare();
    while !stomp.is_ended() && !conn.is_blocked() {
        match stomp.step(&mut actions, |frame| take_connect_token(frame, conn)) {
            Step::Idle => break,
            // The peer is alive: reading it already said so.
            Step::HeartBeat => {}
            Step::Connected => {
                let (send, expect) = stomp.heart_beats();
                conn.set_heart_beats(send, expect);
                carry_out(stomp, &mut actions, out, pool, conn);
            }
            Step::Acted => carry_out(stomp, &mut actions, out, pool, conn),
        }
    }
    stomp.give_back(actions);
}

fn carry_out(stomp: &mut StompConn, actions: &mut Vec<Action>, out: &mut Outbound, pool: &BufferPool, conn: &Session) {
    // Grants first: a denied frame has none of its actions carried out.
    for action in actions.iter() {
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
            let why = format!("This session may not {verb} {}.", destination.to_header());
            stomp.deny(&why, actions);
            return execute(stomp, actions, out, pool, conn);
        }
    }
    // Then the route's hooks: the frame waits for their verdicts, and the
    // connection reads nothing more meanwhile.
    let (sub_hook, pub_hook) = (has_hook(conn, false), has_hook(conn, true));
    if sub_hook || pub_hook {
        let asks: Vec<Ask> = actions
            .iter()
            .filter_map(|action| match action {
                Action::Subscribe(s) if sub_hook => Some(Ask::Subscribe {
                    topic: Bytes::from(hook_topic(&s.destination)),
                }),
                Action::Publish(p) if pub_hook => Some(Ask::Publish {
                    topic: Bytes::from(hook_topic(&p.destination)),
                    payload: p.body.clone(),
                    binary: std::str::from_utf8(&p.body).is_err(),
                }),
                _ => None,
            })
            .collect();
        if !asks.is_empty() {
            conn.ask_hooks(Waiting::Stomp(std::mem::take(actions)), asks);
            return;
        }
    }
    execute(stomp, actions, out, pool, conn);
}

/// A destination as a hook is told of it: a topic by its name, a queue
/// by its header (`/queue/<name>`).
fn hook_topic(destination: &Destination) -> String {
    match destination {
        Destination::Topic(name) => name.clone(),
        Destination::Queue(_) => destination.to_header(),
    }
}

/// Carries out a frame's actions (their grants and hooks passed).
fn execute(stomp: &mut StompConn, actions: &mut Vec<Action>, out: &mut Outbound, pool: &BufferPool, conn: &Session) {
    let mut encoded = Vec::new();
    for action in actions.drain(..) {
        match action {
            Action::Reply(frame) => {
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
            Action::Unsubscribe { id, destination } => conn.unsubscribe_stomp(&table_key(&destination), &escaped(&id)),
            Action::Publish(p) => {
                // MESSAGE frames go out as text only if the body is text.
                let kind = match stomp.kind() {
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
                    compress: true,
                });
            }
            // Its grants were checked above; it is published at COMMIT.
            Action::Held(_) => {}
            // The close itself was noted by the session (`take_close`).
            Action::Close => {}
        }
    }
}

/// A token in CONNECT (`Authorization: Bearer <token>`, or `passcode`)
/// is taken as a fresh token for the session (`Session::take_token`); on
/// a route that takes no tokens it is not looked at. `Err`: why it was
/// refused, for the ERROR frame.
fn take_connect_token(frame: &Frame, conn: &Session) -> Result<(), String> {
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
    crate::proto::stomp::frame::push_value(&mut out, id, true);
    String::from_utf8(out).expect("escaping keeps UTF-8").into_boxed_str()
}
