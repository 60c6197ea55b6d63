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
        if let App::Stomp = self {
            session.with_stomp(|stomp| super::stomp::drain(stomp, out, pool, session));
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
            App::Echo => out.push_frame(pool, kind.opcode(), payload),
            App::Native => match native::parse(payload) {
                Ok(native::Command::Sub(topic)) => {
                    let subscribed = if session.allows(Action::Subscribe, topic) {
                        session.subscribe(topic)
                    } else {
                        Err(native::Refusal::Denied)
                    };
                    if let Err(refusal) = subscribed {
                        out.push_bytes(pool, &native::error_frame(refusal, Some(topic)));
                    }
                }
                Ok(native::Command::Unsub(topic)) => session.unsubscribe(topic),
                Ok(native::Command::Pub { topic, payload }) => {
                    if session.allows(Action::Publish, topic) {
                        session.publish(kind, topic, payload);
                    } else {
                        out.push_bytes(pool, &native::error_frame(native::Refusal::Denied, Some(topic)));
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
