//! A connection's opening handshake decided: a request head is parsed
//! (`ws::handshake`), routed, validated (RFC 6455 4.2.1), checked against
//! the origin list, the token and the admission caps, and answered (101,
//! the health check, or a refusal). No I/O: the answer is queued in the
//! connection's `Outbound`, or, on a backend route, left to the upstream
//! (`backend::open`).

use super::outbound::Outbound;
use super::pool::BufferPool;
use super::shard::Session;
use crate::auth::Identity;
use crate::config::{Config, RouteId, HEALTH_PATH, READY_PATH};
use crate::ws::{deflate, handshake};

/// What a complete request head leads to; its response is already queued.
pub(super) enum Answer {
    Upgrade(RouteId),
    /// A backend route: nothing is queued yet, the upstream's answer to
    /// `OPEN` decides (`backend::open`).
    Backend(Box<super::backend::OpenRequest>),
    /// A route with a connect hook: its answer decides (`hooks::connect`).
    Hooked(Box<super::hooks::ConnectRequest>),
    Health,
    Reject(handshake::Reject),
}

/// Parses a request head and queues the response once it is complete.
/// `None` while incomplete; otherwise the answer and the head's length.
pub(super) fn answer_head(
    buf: &[u8],
    config: &Config,
    out: &mut Outbound,
    pool: &BufferPool,
    session: &Session,
) -> Option<(Answer, usize)> {
    let (answer, head_len) = match handshake::parse(buf, config.max_head_bytes) {
        Ok(None) => return None,
        Err(reject) => (Err(reject), buf.len()),
        Ok(Some((head, head_len))) => (decide(&head, &buf[..head_len], config, out, pool, session), head_len),
    };
    Some(match answer {
        Ok(answer) => (answer, head_len),
        Err(reject) => {
            out.push_bytes(pool, &reject.response());
            (Answer::Reject(reject), head_len)
        }
    })
}

/// Routes and validates a complete request head (RFC 6455 4.2.1, 4.2.2),
/// queueing the 101 or the health answer. Admission decides last, so only
/// a handshake that would succeed counts against the connection caps; the
/// handshake rate is charged before the token is checked, so that bad
/// tokens cost a flooding address its rate too.
fn decide(
    head: &handshake::Head<'_>,
    raw: &[u8],
    config: &Config,
    out: &mut Outbound,
    pool: &BufferPool,
    session: &Session,
) -> Result<Answer, handshake::Reject> {
    // Shutting down: no new session, and no health check that says ready.
    if session.shard().takes_no_input() {
        return Err(handshake::Reject::ShuttingDown);
    }
    if head.path == HEALTH_PATH && !head.wants_upgrade() {
        out.push_bytes(pool, &handshake::health_response(head.method)?);
        return Ok(Answer::Health);
    }
    if head.path == READY_PATH && !head.wants_upgrade() {
        let ready = session.shard().hub.mesh.bus().is_none_or(|bus| bus.is_connected());
        out.push_bytes(pool, &handshake::ready_response(head.method, ready)?);
        return Ok(Answer::Health);
    }
    let (id, route) = config.route(head.path).ok_or(handshake::Reject::NotFound)?;
    let key = head.validate_upgrade()?;
    if !head.origin_allowed(&route.origins) {
        return Err(handshake::Reject::ForbiddenOrigin);
    }
    session.admit(|| authenticate(head, route, config.verifier.as_deref(), session))?;
    // RFC 7692 7.1: the route's terms for the client's first acceptable
    // offer; taken once the 101 is queued, wherever it is decided.
    let deflate = route
        .deflate
        .and_then(|mode| deflate::negotiate(head.extension_lines().iter().copied(), mode));
    if route.backend.is_some() {
        let mut request = super::backend::OpenRequest::new(id, head, raw);
        request.deflate = deflate;
        return Ok(Answer::Backend(Box::new(request)));
    }
    if route.hooks.as_ref().is_some_and(|h| h.connect.is_some()) {
        let mut request = super::hooks::ConnectRequest::new(id, route, head, raw, session);
        request.deflate = deflate;
        return Ok(Answer::Hooked(Box::new(request)));
    }
    accept(
        out,
        pool,
        session,
        key,
        head.choose_protocol(&route.subprotocols),
        b"",
        deflate,
    );
    Ok(Answer::Upgrade(id))
}

/// Queues the 101 (RFC 6455 4.2.2) with `extra` header lines, and the
/// permessage-deflate agreement, if any, which the session keeps.
pub(super) fn accept(
    out: &mut Outbound,
    pool: &BufferPool,
    session: &Session,
    key: &[u8],
    protocol: Option<&str>,
    extra: &[u8],
    deflate: Option<deflate::Agreement>,
) {
    match deflate {
        None => out.push_accept_with(pool, key, protocol, extra),
        Some(agreement) => {
            let agreement = session.agree_deflate(agreement);
            let mut lines = extra.to_vec();
            agreement.write_response(&mut lines);
            out.push_accept_with(pool, key, protocol, &lines);
        }
    }
}

/// Who the client is, by the token of its handshake, as its route asks
/// (`auth::Mode`): `None` on a route that takes no tokens.
/// A refusal is counted by its reason.
fn authenticate(
    head: &handshake::Head<'_>,
    route: &crate::config::Route,
    verifier: Option<&crate::auth::Verifier>,
    session: &Session,
) -> Result<Option<Identity>, handshake::Reject> {
    use crate::auth::{Failure, Mode};
    let Some(verifier) = verifier.filter(|_| route.auth != Mode::None) else {
        return Ok(None);
    };
    let identity = match crate::auth::token_of(head.authorization, head.offered_protocols(), head.query) {
        Some(token) => verifier.verify(token, crate::auth::unix_now()),
        None if route.auth == Mode::Optional => Ok(Identity::anonymous(route.anonymous.clone())),
        None => Err(Failure::Missing),
    };
    identity.map(Some).map_err(|failure| {
        session.shard().stats.borrow_mut().auth_failures[failure.index()] += 1;
        failure.reject()
    })
}
