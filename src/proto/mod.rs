//! Application protocols spoken over an upgraded connection.
//!
//! A protocol sees whole, validated messages and answers through the
//! connection's `Outbound`; it never touches a socket. Which protocol a
//! connection speaks is decided by its route at the handshake.

pub mod echo;

use crate::config::{Route, RouteProtocol};
use crate::conn::outbound::Outbound;
use crate::conn::pool::BufferPool;
use crate::ws::MessageKind;

pub enum App {
    Echo,
    /// Our close frame is sent: every message is dropped and nothing is
    /// answered (RFC 6455 5.5.1), so a closing peer cannot make output grow.
    Closing,
}

impl App {
    pub fn for_route(route: &Route) -> App {
        match route.protocol {
            RouteProtocol::Echo => App::Echo,
        }
    }

    pub fn on_message(&mut self, kind: MessageKind, payload: &[u8], out: &mut Outbound, pool: &BufferPool) {
        match self {
            App::Echo => echo::on_message(kind, payload, out, pool),
            App::Closing => {}
        }
    }

    /// Whether the protocol keeps no state in the connection's task, so the
    /// connection may park between messages.
    pub fn may_park(&self) -> bool {
        matches!(self, App::Echo)
    }

    /// Whether pings and closes still get answers.
    pub fn replies(&self) -> bool {
        !matches!(self, App::Closing)
    }
}
