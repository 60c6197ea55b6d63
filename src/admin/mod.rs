//! The admin HTTP port: publish, metrics, stats, health, and actions on one
//! session. Served by the workers themselves (each has a listener on the
//! admin address, SO_REUSEPORT), HTTP/1.1 with keep-alive.
//!
//! A request is handled on the core that accepted it: a publish is made
//! there (and crosses the mesh like any other), an action on a session of
//! another core travels to it as an envelope and its answer comes back the
//! same way. Metrics are per-core snapshots that each core refreshes at
//! every sweep tick (at most 100 ms old), so a scrape takes no lock on a
//! hot path.

pub mod http;
pub mod metrics;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use serde::Deserialize;

use crate::conn::shard::Shard;
use crate::proto::native;
use crate::pubsub::mesh::SessionAction;
use crate::pubsub::message::Message;
use crate::ws::MessageKind;
use http::{Bad, Request};
pub use metrics::Metrics;

/// An admin connection that sends nothing for this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// Longest wait for cross-core ring space or another core's answer.
const MESH_WAIT: Duration = Duration::from_secs(10);

/// Serves one admin connection until it closes, errs or idles.
pub async fn serve(mut stream: TcpStream, shard: Rc<Shard>, metrics: Arc<Metrics>) {
    let max_body = shard.config.limits.max_message_bytes.saturating_mul(2).max(64 * 1024);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // The head.
        let request = loop {
            match http::parse(&buf, max_body) {
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(Bad(status, message)) => {
                    let _ = stream.write_all(http::error(status, message, true)).await;
                    return;
                }
            }
            if !read_more(&mut stream, &mut buf, 4096, &shard).await {
                return;
            }
        };
        // The body.
        let end = request.head_len + request.content_length;
        while buf.len() < end {
            let want = end - buf.len();
            if !read_more(&mut stream, &mut buf, want, &shard).await {
                return;
            }
        }
        let response = handle(&request, &buf[request.head_len..end], &shard, &metrics).await;
        buf.drain(..end);
        let (result, _) = stream.write_all(response).await;
        if result.is_err() || request.close {
            return;
        }
    }
}

/// Appends up to `want` more bytes; `false` at end of stream, on an
/// error, after `IDLE` without a byte, or once the server shuts down.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize, shard: &Shard) -> bool {
    use monoio::buf::IoBufMut;
    use std::future::Future;
    use std::task::Poll;
    let len = buf.len();
    buf.reserve(want);
    let cap = len + want.min(buf.capacity() - len);
    let mut read = std::pin::pin!(stream.read(std::mem::take(buf).slice_mut(len..cap)));
    let mut idle = std::pin::pin!(monoio::time::sleep(IDLE));
    let outcome = std::future::poll_fn(|cx| {
        if shard.poll_shutdown(cx.waker()) {
            return Poll::Ready(None);
        }
        if let Poll::Ready(r) = read.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        idle.as_mut().poll(cx).map(|()| None)
    })
    .await;
    match outcome {
        Some((Ok(n), slice)) => {
            *buf = slice.into_inner();
            n > 0
        }
        Some((Err(_), _)) | None => false,
    }
}

/// Constant-time comparison of the `Authorization` header with the token.
fn authorized(request: &Request, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    let expected = format!("Bearer {token}");
    let given = request.authorization.as_deref().unwrap_or(b"");
    // Lengths are compared in constant time too (the token's length is
    // not secret, but a mismatch must not leak where it is).
    given.len() == expected.len() && bool::from(given.ct_eq(expected.as_bytes()))
}

async fn handle(request: &Request, body: &[u8], shard: &Rc<Shard>, metrics: &Metrics) -> Vec<u8> {
    let close = request.close;
    let json = |status: u16, value: serde_json::Value| {
        http::response(status, "application/json", value.to_string().as_bytes(), close)
    };
    let open = matches!(request.path.as_str(), "/healthz" | "/metrics");
    if let Some(token) = &shard.config.admin_token {
        if !open && !authorized(request, token) {
            return http::error(401, "a valid bearer token is required", close);
        }
    }
    let method = request.method.as_str();
    let path = request.path.as_str();
    match (method, path) {
        ("GET" | "HEAD", "/healthz") => json(200, serde_json::json!({ "status": "ok" })),
        ("GET", "/metrics") => http::response(200, "text/plain; version=0.0.4", metrics.prometheus().as_bytes(), close),
        ("GET", "/stats") => json(200, metrics.json()),
        ("POST", "/publish") => match publish(request, body, shard).await {
            Ok(value) => json(200, value),
            Err((status, message)) => http::error(status, &message, close),
        },
        (_, "/healthz" | "/metrics" | "/stats" | "/publish") => http::error(405, "method not allowed", close),
        _ => match path.strip_prefix("/sessions/") {
            Some(rest) => match session(method, rest, request, body, shard).await {
                Ok(value) => json(200, value),
                Err((status, message)) => http::error(status, &message, close),
            },
            None => http::error(404, "no such endpoint", close),
        },
    }
}

type Failure = (u16, String);

/// One message of a batch publish.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchMessage {
    topic: String,
    /// Text payload; or `payload_base64` for a binary one.
    payload: Option<String>,
    payload_base64: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    messages: Vec<BatchMessage>,
}

/// `POST /publish?topic=T` (the body is the payload; binary with
/// `Content-Type: application/octet-stream`, else UTF-8 text), or
/// `POST /publish` with a JSON batch `{"messages": [{"topic", "payload" |
/// "payload_base64"}]}`. All messages are checked before any is published.
async fn publish(request: &Request, body: &[u8], shard: &Rc<Shard>) -> Result<serde_json::Value, Failure> {
    let limit = shard.config.limits.max_message_bytes;
    let mut messages: Vec<(MessageKind, String, Vec<u8>)> = Vec::new();
    match http::query_value(&request.query, "topic") {
        Some(topic) => {
            let topic = http::percent_decode(topic).ok_or((400, "bad topic encoding".to_string()))?;
            let kind = if request.binary {
                MessageKind::Binary
            } else {
                std::str::from_utf8(body).map_err(|_| (400, "a text payload must be UTF-8".to_string()))?;
                MessageKind::Text
            };
            messages.push((kind, topic, body.to_vec()));
        }
        None => {
            let batch: Batch = serde_json::from_slice(body).map_err(|e| (400, format!("bad batch: {e}")))?;
            for (i, m) in batch.messages.into_iter().enumerate() {
                let (kind, payload) = match (m.payload, m.payload_base64) {
                    (Some(text), None) => (MessageKind::Text, text.into_bytes()),
                    (None, Some(b64)) => {
                        use base64::Engine;
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|e| (400, format!("message {i}: bad base64: {e}")))?;
                        (MessageKind::Binary, bytes)
                    }
                    _ => return Err((400, format!("message {i}: give payload or payload_base64"))),
                };
                messages.push((kind, m.topic, payload));
            }
        }
    }
    for (i, (_, topic, payload)) in messages.iter().enumerate() {
        if !native::valid_topic(topic.as_bytes()) {
            return Err((400, format!("message {i}: invalid topic {topic:?}")));
        }
        // A delivery is a `MSG <topic> <payload>` message: bounded like any.
        if payload.len() + topic.len() + 5 > limit {
            return Err((413, format!("message {i}: over the {limit}-byte message limit")));
        }
    }
    if shard.is_shutting_down() {
        return Err((503, "shutting down".to_string()));
    }
    // Counted until every message is in every ring: the shutdown waits for
    // it before any subscriber is closed, so a 200 means delivered to
    // every subscriber still connected.
    shard.admin_publishing(true);
    let _in_flight = InFlight(shard);
    let hub = &shard.hub;
    let mut cores = 0;
    for (kind, topic, payload) in &messages {
        // Subscribers here over their budget: wait (bounded) like a
        // publishing connection, which is not read meanwhile.
        let within = monoio::time::timeout(MESH_WAIT, std::future::poll_fn(|cx| shard.poll_budget(cx))).await;
        if within.is_err() {
            return Err((503, "subscribers' queues on this core stayed full".to_string()));
        }
        let mut pending = Vec::new();
        let message = Message::native(*kind, topic.as_bytes(), payload, hub.next_message_id());
        let reached = hub.publish(shard, message, &mut pending);
        cores = cores.max(reached);
        // Full rings: wait for room (bounded), in order, like a publisher.
        let sent = monoio::time::timeout(
            MESH_WAIT,
            std::future::poll_fn(|cx| loop {
                if hub.retry(&mut pending) {
                    return std::task::Poll::Ready(());
                }
                if hub.mesh.poll_space(pending[0].0, cx).is_pending() {
                    return std::task::Poll::Pending;
                }
            }),
        )
        .await;
        if sent.is_err() {
            return Err((503, "cross-core queues stayed full".to_string()));
        }
    }
    Ok(serde_json::json!({ "published": messages.len(), "cores": cores }))
}

/// An admin publish under way (`Shard::admin_publishing`), however its
/// future ends.
struct InFlight<'s>(&'s Shard);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.admin_publishing(false);
    }
}

/// `POST /sessions/{id}/send` and `DELETE /sessions/{id}?code=&reason=`.
async fn session(
    method: &str,
    rest: &str,
    request: &Request,
    body: &[u8],
    shard: &Rc<Shard>,
) -> Result<serde_json::Value, Failure> {
    let (id, action) = match (method, rest.strip_suffix("/send")) {
        ("POST", Some(id)) => {
            let kind = if request.binary {
                MessageKind::Binary
            } else {
                std::str::from_utf8(body).map_err(|_| (400, "a text message must be UTF-8".to_string()))?;
                MessageKind::Text
            };
            if body.len() > shard.config.limits.max_message_bytes {
                return Err((413, "over the message size limit".to_string()));
            }
            (id, SessionAction::Send(native::frame(kind.opcode(), &[body])))
        }
        ("DELETE", None) if !rest.contains('/') => {
            let code = match http::query_value(&request.query, "code") {
                Some(c) => c.parse().map_err(|_| (400, "bad code".to_string()))?,
                None => 1000,
            };
            // RFC 6455 7.4: what an endpoint may send; 3000-4999 are for
            // applications, 1000 is a normal close.
            if code != 1000 && !(3000..=4999).contains(&code) {
                return Err((400, "code must be 1000 or 3000..=4999".to_string()));
            }
            let reason = http::query_value(&request.query, "reason")
                .map(|r| http::percent_decode(r).ok_or((400, "bad reason encoding".to_string())))
                .transpose()?
                .unwrap_or_default();
            // RFC 6455 5.5: a close payload is at most 125 bytes, 2 for the code.
            if reason.len() > 123 {
                return Err((400, "reason over 123 bytes".to_string()));
            }
            (rest, SessionAction::Close(code, Bytes::from(reason)))
        }
        _ => return Err((404, "no such endpoint".to_string())),
    };
    let (core, key) = parse_session_id(id).ok_or((404, "no such session".to_string()))?;
    if core >= shard.hub.mesh.cores() {
        return Err((404, "no such session".to_string()));
    }
    let action = shard.hub.session_action(shard, core, key, action);
    match monoio::time::timeout(MESH_WAIT, action).await {
        Ok(true) => Ok(serde_json::json!({ "session": id })),
        Ok(false) => Err((404, "no such session".to_string())),
        Err(_) => Err((503, "the session's core did not answer".to_string())),
    }
}

/// `<core>.<slot>.<generation>` -> core and slot key.
fn parse_session_id(id: &str) -> Option<(usize, u64)> {
    let mut parts = id.split('.');
    let core = parts.next()?.parse().ok()?;
    let slot: u32 = parts.next()?.parse().ok()?;
    let generation: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((core, (u64::from(generation) << 32) | u64::from(slot)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        assert_eq!(parse_session_id("1.17.3"), Some((1, (3 << 32) | 17)));
        for bad in ["", "1", "1.2", "1.2.3.4", "a.1.1", "1.-1.1", "1.4294967296.1"] {
            assert_eq!(parse_session_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn bearer_token_is_compared_whole() {
        let mut r = http::parse(b"GET /stats HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n", 0)
            .unwrap()
            .unwrap();
        assert!(authorized(&r, "s3cret"));
        assert!(!authorized(&r, "s3cre"));
        assert!(!authorized(&r, "s3cret!"));
        r.authorization = None;
        assert!(!authorized(&r, "s3cret"));
    }
}
