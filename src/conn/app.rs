//! What a connection does with the whole messages of its protocol: echo
//! them, or carry out what the native protocol (`proto::native`) or STOMP
//! (`proto::stomp`, through `conn::stomp`) asks for. The protocols decide;
//! this carries out, checking grants, against the session and the hub.
//! Which protocol a connection speaks is decided by its route at the
//! handshake.

use super::outbound::Outbound;
use super::pool::BufferPool;
use super::shard::{Session, TokenRefused};
use crate::auth::Action;
use crate::config::{Route, RouteProtocol};
use crate::proto::native;
use crate::proto::stomp::conn::StompConn;
use crate::ws::{CloseCode, MessageKind};
use bytes::Bytes;

use super::hooks::{has_hook, Ask, Verdict, Waiting};

pub enum App {
    Echo,
    /// The native pub/sub protocol. Its state (subscriptions, queued
    /// deliveries, publishes waiting for ring space) lives in the session's
    /// slot, not in the task.
    Native,
    /// STOMP: its codec and session state (`StompConn`) live in the slot
    /// too, so it parks like `Native`.
    Stomp,
    /// Every event goes to the route's upstream (`conn::backend`); its
    /// link lives in the slot.
    Backend,
    /// Our close frame is sent: every message is dropped and nothing is
    /// answered (RFC 6455 5.5.1), so a closing peer cannot make output grow.
    Closing,
}

impl App {
    pub fn for_route(route: &Route) -> App {
        match route.protocol {
            RouteProtocol::Echo => App::Echo,
            RouteProtocol::Pubsub => App::Native,
            RouteProtocol::Stomp => App::Stomp,
            RouteProtocol::Backend => App::Backend,
        }
    }

    /// What the protocol says first, right after the 101 (STOMP: nothing,
    /// the client speaks first).
    pub fn start(&mut self, out: &mut Outbound, pool: &BufferPool, session: &Session) {
        match self {
            App::Native => {
                session.enable_pubsub();
                out.push_bytes(pool, &native::hello_frame(&session.id()));
                // What the connect hook subscribed it to.
                for topic in session.take_initial_subscriptions() {
                    let subscribed = if crate::topic::valid_topic(&topic) {
                        session.subscribe(&topic)
                    } else {
                        Err(native::Refusal::BadTopic)
                    };
                    if let Err(refusal) = subscribed {
                        out.push_bytes(pool, &native::error_frame(refusal, Some(&topic)));
                    }
                }
            }
            App::Stomp => {
                session.enable_pubsub();
                session.set_stomp(Box::new(super::stomp::new_conn(session)));
            }
            // The link was made, and deliveries opened, at the handshake.
            App::Echo | App::Backend | App::Closing => {}
        }
    }

    /// Whether the protocol takes deliveries, and may have to wait before
    /// it takes more input (`Session::is_blocked`).
    pub fn is_pubsub(&self) -> bool {
        matches!(self, App::Native | App::Stomp | App::Backend)
    }

    /// A ping or pong from the peer (answered already), or its close.
    pub fn on_control(&mut self, kind: super::backend::ClientControl<'_>, session: &Session) {
        if let App::Backend = self {
            session.backend_control(kind);
        }
    }

    /// Goes on with input that waited for a publish to get through (STOMP
    /// frames still in the decoder).
    pub fn resume(&mut self, out: &mut Outbound, pool: &BufferPool, session: &Session) {
        match self {
            App::Stomp => {
                session.with_stomp(|stomp| super::stomp::drain(stomp, out, pool, session));
            }
            App::Native => {
                if let Some((waiting, verdicts)) = session.take_verdicts() {
                    native_verdict(waiting, &verdicts, out, pool, session);
                }
            }
            App::Echo | App::Backend | App::Closing => {}
        }
    }

    /// The close the protocol asked for (its session ended), once.
    pub fn take_close(&mut self, session: &Session) -> Option<CloseCode> {
        match self {
            App::Stomp => session.with_stomp(StompConn::take_close).flatten(),
            _ => None,
        }
    }

    /// The reason sent with a close the protocol asked for.
    pub fn close_reason(code: CloseCode) -> &'static str {
        if code == CloseCode::NORMAL {
            ""
        } else {
            "STOMP ERROR"
        }
    }

    pub fn on_message(
        &mut self,
        kind: MessageKind,
        payload: &[u8],
        out: &mut Outbound,
        pool: &BufferPool,
        session: &Session,
    ) {
        match self {
            App::Echo => {
                let sessions = &session.shard().hub.sessions;
                out.push_message(pool, kind.opcode(), payload, sessions, session.key());
            }
            App::Native => match native::parse(payload) {
                // Grants first (a refusal is counted once), then the
                // route's hook, if it has one.
                Ok(native::Command::Sub(topic)) => {
                    let subscribed = if !session.allows(Action::Subscribe, topic) {
                        Err(native::Refusal::Denied)
                    } else if has_hook(session, false) {
                        let topic = Bytes::copy_from_slice(topic);
                        let ask = Ask::Subscribe { topic: topic.clone() };
                        session.ask_hooks(Waiting::Sub(topic), vec![ask]);
                        Ok(true)
                    } else {
                        session.subscribe(topic)
                    };
                    if let Err(refusal) = subscribed {
                        out.push_bytes(pool, &native::error_frame(refusal, Some(topic)));
                    }
                }
                Ok(native::Command::Unsub(topic)) => session.unsubscribe(topic),
                Ok(native::Command::Pub { topic, payload }) => {
                    if !session.allows(Action::Publish, topic) {
                        out.push_bytes(pool, &native::error_frame(native::Refusal::Denied, Some(topic)));
                    } else if has_hook(session, true) {
                        let (topic, payload) = (Bytes::copy_from_slice(topic), Bytes::copy_from_slice(payload));
                        let ask = Ask::Publish {
                            topic: topic.clone(),
                            payload: payload.clone(),
                            binary: kind == MessageKind::Binary,
                        };
                        session.ask_hooks(Waiting::Pub { kind, topic, payload }, vec![ask]);
                    } else {
                        session.publish(kind, topic, payload);
                    }
                }
                Ok(native::Command::Auth(token)) => {
                    let refusal = match session.take_token(token) {
                        Ok(()) => {
                            // The new grants apply to subscriptions made before.
                            for topic in session.disallowed_topics() {
                                session.unsubscribe(&topic);
                                out.push_bytes(pool, &native::error_frame(native::Refusal::Denied, Some(&topic)));
                            }
                            None
                        }
                        Err(TokenRefused::OtherUser) => Some(native::Refusal::Denied),
                        Err(TokenRefused::Invalid(_) | TokenRefused::NotTaken) => Some(native::Refusal::Unauthorized),
                    };
                    if let Some(refusal) = refusal {
                        out.push_bytes(pool, &native::error_frame(refusal, None));
                    }
                }
                Err(refusal) => out.push_bytes(pool, &native::error_frame(refusal, None)),
            },
            App::Stomp => {
                session.with_stomp(|stomp| super::stomp::on_message(stomp, kind, payload, out, pool, session));
            }
            App::Backend => session.backend_event(super::backend::event_of(kind), payload),
            App::Closing => {}
        }
    }

    /// Whether the protocol keeps no state in the connection's task, so the
    /// connection may park between messages.
    pub fn may_park(&self) -> bool {
        !matches!(self, App::Closing)
    }

    /// Whether pings and closes still get answers.
    pub fn replies(&self) -> bool {
        !matches!(self, App::Closing)
    }
}

/// Carries out a native SUB or PUB as its hook decided.
fn native_verdict(waiting: Waiting, verdicts: &[Verdict], out: &mut Outbound, pool: &BufferPool, session: &Session) {
    let verdict = verdicts.first().cloned().unwrap_or(Verdict::Unavailable);
    let refused = |out: &mut Outbound, topic: &[u8], verdict: &Verdict| {
        let refusal = match verdict {
            Verdict::Unavailable => native::Refusal::Unavailable,
            _ => native::Refusal::Denied,
        };
        out.push_bytes(pool, &native::error_frame(refusal, Some(topic)));
    };
    match (waiting, &verdict) {
        (Waiting::Sub(topic), Verdict::Allow(_)) => {
            if let Err(refusal) = session.subscribe(&topic) {
                out.push_bytes(pool, &native::error_frame(refusal, Some(&topic)));
            }
        }
        (Waiting::Pub { kind, topic, payload }, Verdict::Allow(replacement)) => {
            let payload = replacement.clone().unwrap_or(payload);
            // A new payload that is not UTF-8 goes out as binary.
            let kind = match kind {
                MessageKind::Text if std::str::from_utf8(&payload).is_err() => MessageKind::Binary,
                kind => kind,
            };
            session.publish(kind, &topic, &payload);
        }
        (Waiting::Sub(topic) | Waiting::Pub { topic, .. }, verdict) => refused(out, &topic, verdict),
        (Waiting::Stomp(_), _) => {}
    }
}
