//! A backend route (docs/BACKEND.md): every event of a client's connection
//! goes to an HTTP application as WebSocket-over-HTTP (`proto::over_http`),
//! and what it answers goes back to the client.
//!
//! - The handshake waits for the upstream's answer to `OPEN`
//!   (`open`): 200 with `OPEN` upgrades, anything else is the client's
//!   answer.
//! - After it, a connection's `Link` (in its slot, shared with its request
//!   task) batches the client's events. At most one request is in flight:
//!   a connection's request task (`drive`) runs while events wait, sends
//!   them all in one `POST`, and carries out the answer. While a batch
//!   holds `max_batch_bytes` of content the client's socket is not read.
//! - The link outlives the session: a session that ends sends `CLOSE` (its
//!   client's close) or `DISCONNECT` (it vanished), best effort.

use std::cell::RefCell;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::outbound::Outbound;
use super::shard::{Kick, Session, Shard};
use crate::config::{Backend, RouteId};
use crate::proto::over_http::{self, Control, EventType};
use crate::pubsub::mesh::SessionAction;
use crate::pubsub::SessionKey;
use crate::upstream::{add_header, Failure, Post, Response};
use crate::ws::{CloseCode, MessageKind, Opcode};

/// The media type of an event list (requests and answers).
const EVENTS: &str = "application/websocket-events";

/// The most bytes of a refusing answer's body relayed to the client.
const MAX_RELAYED_BODY: usize = 100_000;

/// The most bytes of meta values a connection keeps (names and values).
const MAX_META_BYTES: usize = 8 * 1024;

/// The shortest `Keep-Alive-Interval` taken (Pushpin's floor), and the
/// longest (a day), seconds.
const MIN_KEEP_ALIVE_SECS: u64 = 20;
const MAX_KEEP_ALIVE_SECS: u64 = 86_400;

/// Request headers of the client that are not forwarded: hop-by-hop ones
/// (RFC 9110 7.6.1, and those its `Connection` names), those the request
/// sets itself, the extension offer (sluice answers extensions itself),
/// and what a client could forge: where it comes from (sluice sets
/// `X-Forwarded-For` and `-Proto`), `Meta-*`, `Grip-*`, `Proxy-*`.
const NOT_FORWARDED: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "accept",
    "accept-encoding",
    "content-encoding",
    "content-length",
    "content-type",
    "expect",
    "connection-id",
    "sec-websocket-extensions",
    "forwarded",
    "x-real-ip",
    "host",
];

/// Answer headers to the `OPEN` that are not relayed into the 101.
const NOT_RELAYED: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-type",
    "content-encoding",
    "keep-alive-interval",
    "sec-websocket-extensions",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "date",
    "server",
];

/// What the handshake hands to `open`: the client's request, as the
/// upstream will see it.
pub(super) struct OpenRequest {
    pub route: RouteId,
    /// The `Sec-WebSocket-Key` to answer.
    pub key: Box<[u8]>,
    /// The client's headers, as forwarded: `name: value\r\n` lines.
    pub headers: Box<[u8]>,
    /// The client's query string.
    pub query: Option<Box<str>>,
    /// Subprotocols the client offered.
    pub offered: Vec<Box<str>>,
    /// permessage-deflate, as the route agrees to the client's offer.
    pub deflate: Option<crate::ws::deflate::Agreement>,
}

impl OpenRequest {
    /// What the handshake `head` (the request head `raw`) forwards.
    pub fn new(route: RouteId, head: &crate::ws::handshake::Head<'_>, raw: &[u8]) -> OpenRequest {
        let key = head.validate_upgrade().map(<[u8]>::to_vec).unwrap_or_default();
        let mut headers = Vec::new();
        let mut parsed = [httparse::EMPTY_HEADER; crate::ws::handshake::MAX_HEADERS];
        let mut request = httparse::Request::new(&mut parsed);
        if request.parse(raw).is_ok() {
            // RFC 9110 7.6.1: the headers `Connection` names are hop-by-hop.
            let hop_by_hop: Vec<String> = request
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                .flat_map(|h| {
                    String::from_utf8_lossy(h.value)
                        .split(',')
                        .map(|t| t.trim().to_string())
                        .collect::<Vec<_>>()
                })
                .collect();
            for h in request.headers.iter() {
                let lower = h.name.to_ascii_lowercase();
                if NOT_FORWARDED.contains(&lower.as_str())
                    || ["meta-", "grip-", "proxy-", "x-forwarded-"]
                        .iter()
                        .any(|p| lower.starts_with(p))
                    || hop_by_hop.iter().any(|h| h.eq_ignore_ascii_case(&lower))
                {
                    continue;
                }
                headers.extend_from_slice(h.name.as_bytes());
                headers.extend_from_slice(b": ");
                headers.extend_from_slice(h.value);
                headers.extend_from_slice(b"\r\n");
            }
        }
        let offered = head
            .offered_protocols()
            .filter_map(|p| std::str::from_utf8(p).ok())
            .map(Box::from)
            .collect();
        OpenRequest {
            route,
            key: key.into_boxed_slice(),
            headers: headers.into_boxed_slice(),
            query: head.query.map(Box::from),
            offered,
            deflate: None,
        }
    }
}

/// A backend connection's state, shared by its session's slot and its
/// request task.
pub struct Link {
    route: RouteId,
    headers: Box<[u8]>,
    /// The client's query string, for the upstream's URL.
    query: Option<Box<str>>,
    /// `Meta-*` values the backend set (most connections have none).
    meta: Option<Box<Meta>>,
    /// Encoded events not yet sent.
    batch: Vec<u8>,
    in_flight: bool,
    /// GRIP mode: the prefix of the backend's messages to the client.
    grip: Option<Box<str>>,
    /// The backend asked for no more events.
    detached: bool,
    /// `CLOSE` or `DISCONNECT` is queued: the client's side is over.
    ended: bool,
    /// `Keep-Alive-Interval` (s; 0: none) and when the last request went
    /// (ms, the core's clock).
    keep_alive_secs: u32,
    last_request_ms: u64,
    /// The connection's task, waiting for room in the batch.
    waker: Option<Waker>,
    /// The client's address and scheme, for `X-Forwarded-*`.
    forwarded_for: Option<std::net::IpAddr>,
    tls: bool,
}

pub type SharedLink = Rc<RefCell<Link>>;

/// Meta values: name (lower case) and value.
type Meta = Vec<(Box<str>, Box<str>)>;

impl Link {
    /// The batch is full: the client is not read until it is sent. What
    /// counts is the encoded events, framing included, so that empty
    /// messages fill it too.
    pub fn is_full(&self, max_batch_bytes: usize) -> bool {
        self.batch.len() >= max_batch_bytes && !self.ended
    }

    /// Whether a keep-alive request is due at `now`.
    pub fn keep_alive_due(&self, now: u64) -> bool {
        self.keep_alive_secs > 0
            && !self.in_flight
            && !self.ended
            && now.saturating_sub(self.last_request_ms) >= u64::from(self.keep_alive_secs) * 1000
    }

    fn push(&mut self, kind: EventType, content: &[u8]) {
        over_http::push(&mut self.batch, kind, content);
    }

    /// The request target: the upstream's path, and the client's query
    /// after its own.
    fn target(&self, upstream: &crate::upstream::Upstream) -> String {
        let base = &upstream.path;
        match &self.query {
            None => base.clone(),
            Some(q) if base.contains('?') => format!("{base}&{q}"),
            Some(q) => format!("{base}?{q}"),
        }
    }

    /// The headers of the next request; `id` is the session's.
    fn request_headers(&self, id: &str) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(16);
        for line in self.headers.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let value = &line[colon + 1..];
                let value = value.strip_prefix(b" ").unwrap_or(value);
                add_header(&mut headers, &line[..colon], value);
            }
        }
        headers.insert(http::header::ACCEPT, HeaderValue::from_static(EVENTS));
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(EVENTS));
        if let Ok(id) = HeaderValue::from_str(id) {
            headers.insert("connection-id", id);
        }
        headers.insert("sec-websocket-extensions", HeaderValue::from_static("grip"));
        if let Some(ip) = self.forwarded_for {
            add_header(&mut headers, b"x-forwarded-for", ip.to_string().as_bytes());
        }
        let proto = if self.tls { "wss" } else { "ws" };
        headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
        for (name, value) in self.meta.iter().flat_map(|m| m.iter()) {
            add_header(&mut headers, format!("meta-{name}").as_bytes(), value.as_bytes());
        }
        headers
    }

    /// Takes `Set-Meta-*` and `Keep-Alive-Interval` from an answer.
    fn take_settings(&mut self, headers: &HeaderMap) {
        for (name, value) in headers {
            let Some(meta) = name.as_str().strip_prefix("set-meta-").filter(|m| !m.is_empty()) else {
                continue;
            };
            let Ok(value) = value.to_str() else { continue };
            self.set_meta(meta, Some(value).filter(|v| !v.is_empty()));
        }
        if let Some(interval) = headers.get("keep-alive-interval") {
            let secs = interval
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .unwrap_or(0);
            self.keep_alive_secs = match secs {
                s if s <= 0 => 0,
                s => (s as u64).clamp(MIN_KEEP_ALIVE_SECS, MAX_KEEP_ALIVE_SECS) as u32,
            };
        }
    }

    /// Sets (or clears) a meta value; names are case-insensitive. Values
    /// past `MAX_META_BYTES` in all are refused.
    fn set_meta(&mut self, name: &str, value: Option<&str>) {
        let name = name.to_ascii_lowercase();
        if let Some(meta) = &mut self.meta {
            meta.retain(|(n, _)| **n != *name);
        }
        let Some(value) = value else { return };
        let used: usize = self
            .meta
            .iter()
            .flat_map(|m| m.iter())
            .map(|(n, v)| n.len() + v.len())
            .sum();
        if used + name.len() + value.len() > MAX_META_BYTES {
            tracing::debug!(name, "meta value over the limit, dropped");
            return;
        }
        if HeaderValue::from_str(value).is_ok()
            && http::HeaderName::from_bytes(format!("meta-{name}").as_bytes()).is_ok()
        {
            self.meta
                .get_or_insert_with(Default::default)
                .push((name.into(), value.into()));
        }
    }
}

/// A control frame from the client.
pub enum ClientControl<'a> {
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    Close(crate::ws::Close<'a>),
}

impl Session {
    /// A control frame from the client: pings and pongs go to the backend
    /// as events, a close as `CLOSE`.
    pub(super) fn backend_control(&self, control: ClientControl<'_>) {
        match control {
            ClientControl::Ping(payload) => self.backend_event(EventType::Ping, payload),
            // An empty pong answers sluice's own keep-alive ping: the
            // backend did not ask for it.
            ClientControl::Pong([]) => {}
            ClientControl::Pong(payload) => self.backend_event(EventType::Pong, payload),
            ClientControl::Close(close) => self.backend_close(close.code, close.reason),
        }
    }

    fn link(&self) -> Option<SharedLink> {
        self.with(|s| s.app.as_ref().and_then(|a| a.backend.clone()))
    }

    /// Whether the session's backend batch is full.
    pub(super) fn backend_full(&self) -> bool {
        let Some(link) = self.link() else { return false };
        let max = self.backend().map_or(usize::MAX, |b| b.max_batch_bytes);
        let full = link.borrow().is_full(max);
        full
    }

    /// Ready once the backend batch has room.
    pub(super) fn poll_backend_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(link) = self.link() else {
            return Poll::Ready(());
        };
        let max = self.backend().map_or(usize::MAX, |b| b.max_batch_bytes);
        let mut link = link.borrow_mut();
        if link.is_full(max) {
            link.waker = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    fn backend(&self) -> Option<std::sync::Arc<Backend>> {
        let link = self.link()?;
        let route = link.borrow().route;
        self.shard.config.route_by_id(route).backend.clone()
    }

    /// A message (or ping, pong) from the client, for the backend.
    pub(super) fn backend_event(&self, kind: EventType, payload: &[u8]) {
        let Some(link) = self.link() else { return };
        {
            let mut l = link.borrow_mut();
            if l.detached || l.ended {
                return;
            }
            l.push(kind, payload);
        }
        start(&self.shard, self.key, link);
    }

    /// The client's close: `CLOSE` with its code and reason.
    pub(super) fn backend_close(&self, code: Option<CloseCode>, reason: &str) {
        let Some(link) = self.link() else { return };
        {
            let mut l = link.borrow_mut();
            if l.detached || l.ended {
                return;
            }
            over_http::push_close(&mut l.batch, code.map(|c| c.0), reason.as_bytes());
            l.ended = true;
        }
        start(&self.shard, self.key, link);
    }

    /// The session ended (not parked): the backend hears `CLOSE` with the
    /// client's code if the client closed, else `DISCONNECT`, unless it
    /// heard already.
    pub(super) fn backend_ended(&self, peer_close: Option<Option<CloseCode>>) {
        let Some(link) = self.link() else { return };
        {
            let mut l = link.borrow_mut();
            if l.detached || l.ended {
                return;
            }
            match peer_close {
                Some(code) => over_http::push_close(&mut l.batch, code.map(|c| c.0), b""),
                None => l.push(EventType::Disconnect, b""),
            }
            l.ended = true;
        }
        start(&self.shard, self.key, link);
    }
}

/// Starts the connection's request task unless one runs (with nothing
/// batched, it sends a keep-alive request).
pub(super) fn start(shard: &Rc<Shard>, key: SessionKey, link: SharedLink) {
    {
        let mut l = link.borrow_mut();
        if l.in_flight {
            return;
        }
        l.in_flight = true;
    }
    monoio::spawn(drive(shard.clone(), key, link));
}

/// The delay before retry `attempt` (0-based) of a request that could not
/// connect: 500 ms doubling, at most 8 s, plus up to half of it at random.
fn backoff(attempt: u32) -> Duration {
    let base = 500u64.saturating_mul(1 << attempt.min(4)).min(8_000);
    let jitter = jitter_ms(base / 2);
    Duration::from_millis(base + jitter)
}

/// A number in `0..=max` from the clock's low bits (enough to spread
/// retries; nothing depends on it being unpredictable).
fn jitter_ms(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mixed = nanos.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    mixed % (max + 1)
}

/// A connection's request task: while events wait (or a keep-alive is
/// due), sends them and carries out the answer.
async fn drive(shard: Rc<Shard>, key: SessionKey, link: SharedLink) {
    let (route, backend) = {
        let route = link.borrow().route;
        match shard.config.route_by_id(route).backend.clone() {
            Some(backend) => (route, backend),
            None => return,
        }
    };
    let mut first = true;
    loop {
        {
            let mut l = link.borrow_mut();
            let keep_alive = first && l.batch.is_empty() && l.keep_alive_secs > 0;
            if l.batch.is_empty() && !keep_alive {
                l.in_flight = false;
                return;
            }
        }
        // The client's queue is long: the backend's next answer waits
        // until it is written, looked at every 10 ms (bounded by the
        // session's life; only while events wait to go).
        while alive(&shard, key) && shard.hub.sessions.session_queued_bytes(key) >= backend.max_batch_bytes {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        let (body, headers, path, last) = {
            let mut l = link.borrow_mut();
            first = false;
            let body = Bytes::from(std::mem::take(&mut l.batch));
            l.last_request_ms = shard.now_ms();
            if let Some(w) = l.waker.take() {
                w.wake();
            }
            let headers = l.request_headers(&shard.session_id(key));
            (body, headers, l.target(&backend.upstream), l.ended)
        };
        // A request that could not connect is tried again; the last one,
        // for a session that is over, only once.
        let retries = if last { 0 } else { backend.retries };
        let mut attempt = 0;
        let answer = loop {
            let sent = post_events(&shard, route, &backend, &path, headers.clone(), body.clone()).await;
            match sent {
                Err(Failure::Connect(e)) if attempt < retries && alive(&shard, key) => {
                    tracing::debug!(error = %e, attempt, "backend unreachable, retrying");
                    shard.stats.borrow_mut().backend_retries += 1;
                    monoio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                other => break other,
            }
        };
        if last || !alive(&shard, key) {
            // Nobody to carry the answer out for.
            continue;
        }
        match answer {
            Ok(response) => {
                if let Err(failure) = carry_out(&shard, key, &link, response) {
                    fail(&shard, key, &link, failure);
                    return;
                }
            }
            Err(failure) => {
                let failure = match failure {
                    Failure::Connect(_) | Failure::Timeout | Failure::Dropped(_) | Failure::Stopped => {
                        BadAnswer::NoAnswer(failure.to_string())
                    }
                    Failure::Broken(_) | Failure::TooLarge => BadAnswer::Invalid(failure.to_string()),
                };
                fail(&shard, key, &link, failure);
                return;
            }
        }
    }
}

/// Sends one event list to a route's upstream (the pool's key is the
/// route's index; hooks' keys come after every route's), counted.
async fn post_events(
    shard: &Shard,
    route: RouteId,
    backend: &Backend,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    shard.stats.borrow_mut().backend_requests += 1;
    let post = Post {
        path,
        headers,
        body,
        max_body: max_answer_bytes(shard),
        timeout: Duration::from_millis(backend.timeout_ms),
    };
    shard.upstream.post(route.index(), &backend.upstream, post).await
}

/// The largest answer body taken: Pushpin's 1,000,000 bytes, or one
/// message of the largest size and room for its framing.
fn max_answer_bytes(shard: &Shard) -> usize {
    (shard.config.limits.max_message_bytes + 64 * 1024).max(1_000_000)
}

/// Whether the session is still open (not gone, not closing).
fn alive(shard: &Shard, key: SessionKey) -> bool {
    shard
        .sessions
        .borrow()
        .get(key)
        .is_some_and(|s| s.phase == super::slot::Phase::Open)
}

/// Why an answer mid-session ends the connection.
enum BadAnswer {
    /// No answer (unreachable after the retries, or a timeout): 1011.
    NoAnswer(String),
    /// An answer that is not a WebSocket-over-HTTP one: 1014.
    Invalid(String),
}

/// Ends the client's connection after the upstream failed it.
fn fail(shard: &Rc<Shard>, key: SessionKey, link: &SharedLink, failure: BadAnswer) {
    let (code, why) = match failure {
        BadAnswer::NoAnswer(why) => (CloseCode::INTERNAL_ERROR, why),
        BadAnswer::Invalid(why) => (CloseCode(1014), why),
    };
    tracing::debug!(code = code.0, why, "backend failed a connection");
    shard.stats.borrow_mut().backend_failures += 1;
    {
        let mut l = link.borrow_mut();
        // The backend is not told of an end it caused.
        l.ended = true;
        l.batch = Vec::new();
        l.in_flight = false;
        if let Some(w) = l.waker.take() {
            w.wake();
        }
    }
    let reason = if code == CloseCode::INTERNAL_ERROR {
        "backend unavailable"
    } else {
        "bad gateway"
    };
    shard.act_on_session(key, SessionAction::Close(code.0, Bytes::from_static(reason.as_bytes())));
}

/// Whether a `Content-Type` is the event list's.
fn is_events(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(EVENTS))
}

/// Carries out an answer mid-session.
fn carry_out(shard: &Rc<Shard>, key: SessionKey, link: &SharedLink, response: Response) -> Result<(), BadAnswer> {
    if response.status != 200 {
        return Err(BadAnswer::Invalid(format!("status {}", response.status)));
    }
    if !is_events(&response.headers) {
        return Err(BadAnswer::Invalid("not an event list".into()));
    }
    let events = over_http::parse(&response.body).map_err(|e| BadAnswer::Invalid(format!("{e:?}")))?;
    link.borrow_mut().take_settings(&response.headers);
    let mut to_client = ToClient::Deliver { shard, key };
    for event in events {
        if !apply(event, link, &mut to_client, shard, key) {
            break;
        }
    }
    Ok(())
}

/// Where the backend's messages go: into the handshake's output (the
/// events answering `OPEN`, behind the 101), or the session's queue.
enum ToClient<'a> {
    Out(&'a mut Outbound),
    Deliver { shard: &'a Rc<Shard>, key: SessionKey },
}

impl ToClient<'_> {
    fn send(&mut self, shard: &Shard, opcode: Opcode, payload: &[u8]) {
        match self {
            // Behind the 101: nothing is compressed yet.
            ToClient::Out(out) => out.push_frame(&shard.pool, opcode, payload),
            // Its queue is made on first use: an idle connection has none.
            ToClient::Deliver { shard, key } => shard.deliver_to(*key, opcode, payload, true),
        }
    }
}

/// Carries out one event from the backend. `false`: the connection is
/// ending, the rest of the answer is not.
fn apply(
    event: over_http::Event<'_>,
    link: &SharedLink,
    to_client: &mut ToClient<'_>,
    shard: &Rc<Shard>,
    key: SessionKey,
) -> bool {
    match event.kind {
        EventType::Text | EventType::Binary => {
            let binary = event.kind == EventType::Binary;
            let grip = link.borrow().grip.clone();
            let payload = match grip.as_deref() {
                None => event.content,
                Some(prefix) => {
                    // GRIP mode: `c:` is a control message (text only);
                    // anything else needs the message prefix.
                    if !binary {
                        if let Some(json) = event.content.strip_prefix(b"c:") {
                            control(json, link, shard, key);
                            return true;
                        }
                    }
                    match event.content.strip_prefix(prefix.as_bytes()) {
                        Some(rest) => rest,
                        None => {
                            shard.stats.borrow_mut().backend_dropped += 1;
                            return true;
                        }
                    }
                }
            };
            if !binary && std::str::from_utf8(payload).is_err() {
                // RFC 6455 5.6: a text message is UTF-8.
                shard.stats.borrow_mut().backend_dropped += 1;
                return true;
            }
            let opcode = if binary { Opcode::Binary } else { Opcode::Text };
            to_client.send(shard, opcode, payload);
            shard.stats.borrow_mut().backend_messages_out += 1;
            true
        }
        // RFC 6455 5.5: control frames carry at most 125 bytes.
        EventType::Ping if event.content.len() <= 125 => {
            to_client.send(shard, Opcode::Ping, event.content);
            true
        }
        EventType::Pong if event.content.len() <= 125 => {
            to_client.send(shard, Opcode::Pong, event.content);
            true
        }
        EventType::Ping | EventType::Pong => true,
        EventType::Close => {
            let (code, reason) = event.close();
            let code = code.filter(|&c| CloseCode(c).is_valid_on_wire()).unwrap_or(1000);
            let mut reason = &reason[..reason.len().min(123)];
            while std::str::from_utf8(reason).is_err() {
                reason = &reason[..reason.len() - 1];
            }
            link.borrow_mut().ended = true;
            let reason = Bytes::copy_from_slice(reason);
            match to_client {
                // In the `OPEN` answer: the session is not open yet; its
                // close is asked for as the admin API asks, and carried out
                // once the 101 and the messages before it are out.
                ToClient::Out(_) => shard.request_close(key, code, reason),
                ToClient::Deliver { .. } => {
                    shard.act_on_session(key, SessionAction::Close(code, reason));
                }
            }
            false
        }
        EventType::Disconnect | EventType::Open => {
            // The backend ends the connection without a close handshake
            // (an `OPEN` after the first counts as that too).
            link.borrow_mut().ended = true;
            shard.kick(key, Kick::ABORT);
            false
        }
    }
}

/// Carries out a GRIP control message; one that does not parse is ignored.
fn control(json: &[u8], link: &SharedLink, shard: &Rc<Shard>, key: SessionKey) {
    let control = match over_http::parse_control(json) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = e.0, "control message ignored");
            shard.stats.borrow_mut().backend_dropped += 1;
            return;
        }
    };
    match control {
        Control::Subscribe(channel) => {
            let max = shard.config.max_subscriptions;
            if !crate::topic::valid_topic(channel.as_bytes()) {
                tracing::debug!(channel, "subscribe to a channel that is no topic, ignored");
                shard.stats.borrow_mut().backend_dropped += 1;
                return;
            }
            // Its pub/sub state is made on first use.
            shard.open_pubsub(key);
            if shard.hub.subscribe_raw(key, channel.as_bytes(), max).is_err() {
                tracing::debug!(channel, "subscribe over max_subscriptions, ignored");
                shard.stats.borrow_mut().backend_dropped += 1;
            }
        }
        Control::Unsubscribe(channel) => shard.hub.unsubscribe_native(key, channel.as_bytes()),
        Control::Detach => {
            let mut l = link.borrow_mut();
            if !l.ended {
                // As Pushpin: the backend hears a last CLOSE.
                over_http::push_close(&mut l.batch, None, b"");
                l.ended = true;
                l.detached = true;
            }
        }
        Control::SetMeta(name, value) => link.borrow_mut().set_meta(&name, value.as_deref()),
        Control::KeepAlive(_) => {
            tracing::debug!("GRIP keep-alive is not supported, ignored");
        }
    }
}

/// How the upstream answered `OPEN`.
pub(super) enum Opened {
    /// Upgraded: the 101 and the first events are queued.
    Accepted,
    /// Refused: the answer is queued; its status.
    Refused(u16),
}

/// Sends `OPEN` for a handshake and queues the client's answer: the 101
/// (and the events that came with the upstream's `OPEN`), or the upstream's
/// refusal relayed, 502 when it could not be reached or did not answer as
/// it should, 504 when it timed out.
pub(super) async fn open(session: &Session, request: OpenRequest, out: &mut Outbound) -> Opened {
    let shard = &session.shard;
    let Some(backend) = shard.config.route_by_id(request.route).backend.clone() else {
        return refuse(out, shard, 502, "Bad Gateway", b"no upstream\n");
    };
    let link = Rc::new(RefCell::new(Link {
        route: request.route,
        headers: request.headers,
        query: request.query,
        meta: None,
        batch: Vec::new(),
        in_flight: true,
        grip: None,
        detached: false,
        ended: false,
        keep_alive_secs: 0,
        last_request_ms: shard.now_ms(),
        waker: None,
        forwarded_for: session.with(|s| s.peer_ip()),
        tls: session.with(|s| s.tls.is_some()),
    }));
    let (headers, path) = {
        let l = link.borrow();
        (l.request_headers(&session.id()), l.target(&backend.upstream))
    };
    let mut body = Vec::new();
    over_http::push(&mut body, EventType::Open, b"");
    let answer = post_events(shard, request.route, &backend, &path, headers, Bytes::from(body)).await;
    let response = match answer {
        Ok(r) => r,
        Err(Failure::Timeout) => {
            shard.stats.borrow_mut().backend_failures += 1;
            return refuse(
                out,
                shard,
                504,
                "Gateway Timeout",
                b"the backend did not answer in time\n",
            );
        }
        Err(e) => {
            tracing::debug!(error = %e, upstream = backend.upstream.url, "OPEN failed");
            shard.stats.borrow_mut().backend_failures += 1;
            return refuse(out, shard, 502, "Bad Gateway", b"the backend could not be reached\n");
        }
    };
    if response.status != 200 {
        // The backend's own refusal (a 401 or 403 of its authentication):
        // relayed, its body bounded.
        if !(200..=599).contains(&response.status) || response.status == 101 {
            return refuse(
                out,
                shard,
                502,
                "Bad Gateway",
                b"the backend answered with no valid status\n",
            );
        }
        let body = &response.body[..response.body.len().min(MAX_RELAYED_BODY)];
        let reason = http::StatusCode::from_u16(response.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Refused");
        let content_type = response
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/plain");
        return relay(
            out,
            shard,
            response.status,
            reason,
            content_type,
            &response.headers,
            body,
        );
    }
    let events = match over_http::parse(&response.body) {
        Ok(events) if is_events(&response.headers) => events,
        _ => {
            shard.stats.borrow_mut().backend_failures += 1;
            return refuse(
                out,
                shard,
                502,
                "Bad Gateway",
                b"the backend's answer is not an event list\n",
            );
        }
    };
    if events.first().map(|e| e.kind) != Some(EventType::Open) {
        shard.stats.borrow_mut().backend_failures += 1;
        return refuse(
            out,
            shard,
            502,
            "Bad Gateway",
            b"the backend did not accept with OPEN\n",
        );
    }
    // Accepted.
    {
        let mut l = link.borrow_mut();
        l.take_settings(&response.headers);
        l.grip = grip_prefix(&response.headers);
    }
    let protocol = response
        .headers
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .filter(|p| request.offered.iter().any(|o| **o == **p));
    let mut extra = Vec::new();
    for (name, value) in &response.headers {
        let name = name.as_str();
        if NOT_RELAYED.contains(&name) || name.starts_with("set-meta-") || extra.len() > 8 * 1024 {
            continue;
        }
        extra.extend_from_slice(name.as_bytes());
        extra.extend_from_slice(b": ");
        extra.extend_from_slice(value.as_bytes());
        extra.extend_from_slice(b"\r\n");
    }
    super::upgrade::accept(
        out,
        &shard.pool,
        session,
        &request.key,
        protocol,
        &extra,
        request.deflate,
    );
    // The client's address was kept for the link (which has it now):
    // without per-address caps and a token, the slot needs it no more.
    let c = &shard.config;
    if c.max_connections_per_ip == 0 && c.max_handshakes_per_sec_per_ip == 0 {
        session.with(|s| {
            if s.identity().is_none() {
                s.extra = None;
            }
        });
    }
    session.with(|s| s.app.get_or_insert_with(Default::default).backend = Some(link.clone()));
    let mut to_client = ToClient::Out(out);
    for event in events.into_iter().skip(1) {
        if !apply(event, &link, &mut to_client, shard, session.key) {
            break;
        }
    }
    let pending = {
        let mut l = link.borrow_mut();
        l.in_flight = false;
        !l.batch.is_empty()
    };
    if pending {
        // A detach queued its CLOSE.
        start(shard, session.key, link);
    }
    Opened::Accepted
}

/// GRIP mode, if the answer's `Sec-WebSocket-Extensions` names `grip`:
/// its `message-prefix` (default `m:`).
fn grip_prefix(headers: &HeaderMap) -> Option<Box<str>> {
    for value in headers.get_all(http::header::SEC_WEBSOCKET_EXTENSIONS) {
        let Ok(value) = value.to_str() else { continue };
        for extension in split_unquoted(value, ',') {
            let mut params = split_unquoted(extension, ';').into_iter().map(str::trim);
            if params.next() != Some("grip") {
                continue;
            }
            let mut prefix = "m:".to_string();
            for param in params {
                if let Some((name, v)) = param.split_once('=') {
                    if name.trim() == "message-prefix" {
                        prefix = unquote(v.trim());
                    }
                }
            }
            return Some(prefix.into());
        }
    }
    None
}

/// `text` split at `sep` outside quoted strings (RFC 9110 5.6.4).
fn split_unquoted(text: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A parameter value, its quotes and escapes taken off.
fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// Queues our own refusal of a handshake.
fn refuse(out: &mut Outbound, shard: &Shard, status: u16, reason: &str, body: &[u8]) -> Opened {
    relay(out, shard, status, reason, "text/plain", &HeaderMap::new(), body)
}

/// Queues a refusal of the handshake: `status`, a content type, the
/// upstream's `WWW-Authenticate` and `Retry-After` if it sent them, and
/// `body`; the connection closes after it.
fn relay(
    out: &mut Outbound,
    shard: &Shard,
    status: u16,
    reason: &str,
    content_type: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Opened {
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for name in [http::header::WWW_AUTHENTICATE, http::header::RETRY_AFTER] {
        for value in headers.get_all(&name) {
            if let Ok(v) = value.to_str() {
                head.push_str(&format!("{name}: {v}\r\n"));
            }
        }
    }
    let content_type = if content_type.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        content_type
    } else {
        "application/octet-stream"
    };
    head.push_str(&format!(
        "Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut response = head.into_bytes();
    response.extend_from_slice(body);
    out.push_bytes(&shard.pool, &response);
    Opened::Refused(status)
}

/// The kind of an event of a client message.
pub(super) fn event_of(kind: MessageKind) -> EventType {
    match kind {
        MessageKind::Text => EventType::Text,
        MessageKind::Binary => EventType::Binary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link {
            route: crate::config::Options::default()
                .validate(1)
                .unwrap()
                .route("/echo")
                .unwrap()
                .0,
            headers: Box::default(),
            query: None,
            meta: None,
            batch: Vec::new(),
            in_flight: false,
            grip: None,
            detached: false,
            ended: false,
            keep_alive_secs: 0,
            last_request_ms: 0,
            waker: None,
            forwarded_for: None,
            tls: false,
        }
    }

    #[test]
    fn meta_values_are_bounded_at_8_kib() {
        let mut l = link();
        // Names and values, 8,192 bytes in all: taken.
        l.set_meta("a", Some(&"x".repeat(4095)));
        l.set_meta("b", Some(&"y".repeat(4095)));
        assert_eq!(l.meta.as_ref().unwrap().len(), 2);
        // One byte more: dropped.
        l.set_meta("c", Some(""));
        l.set_meta("c", Some("z"));
        assert_eq!(l.meta.as_ref().unwrap().len(), 2);
        // Replacing a value frees its bytes first; an empty one removes it.
        l.set_meta("A", Some("small"));
        l.set_meta("c", Some("z"));
        assert_eq!(l.meta.as_ref().unwrap().len(), 3);
        l.set_meta("b", None);
        assert_eq!(l.meta.as_ref().unwrap().len(), 2);
        let headers = l.request_headers("0.1.1");
        assert_eq!(headers.get("meta-a").unwrap(), "small");
        assert_eq!(headers.get("connection-id").unwrap(), "0.1.1");
    }

    #[test]
    fn keep_alive_interval_is_clamped() {
        for (given, secs) in [
            ("1", 20),
            ("19", 20),
            ("20", 20),
            ("86400", 86_400),
            ("86401", 86_400),
            ("18446744073709552", 86_400),
            ("99999999999999999999", 0),
            ("0", 0),
            ("-5", 0),
            ("soon", 0),
        ] {
            let mut l = link();
            let mut h = HeaderMap::new();
            h.insert("keep-alive-interval", HeaderValue::from_str(given).unwrap());
            l.take_settings(&h);
            assert_eq!(l.keep_alive_secs, secs, "{given}");
        }
    }

    #[test]
    fn grip_mode_and_its_prefix() {
        let mut h = HeaderMap::new();
        assert_eq!(grip_prefix(&h), None);
        h.insert("sec-websocket-extensions", HeaderValue::from_static("grip"));
        assert_eq!(grip_prefix(&h).as_deref(), Some("m:"));
        h.insert(
            "sec-websocket-extensions",
            HeaderValue::from_static("x-other, grip; message-prefix=\"\""),
        );
        assert_eq!(grip_prefix(&h).as_deref(), Some(""));
        h.insert(
            "sec-websocket-extensions",
            HeaderValue::from_static("grip;message-prefix=msg>"),
        );
        assert_eq!(grip_prefix(&h).as_deref(), Some("msg>"));
        h.insert("sec-websocket-extensions", HeaderValue::from_static("gripper"));
        assert_eq!(grip_prefix(&h), None);
        // Separators and escapes inside a quoted prefix are the prefix's.
        h.insert(
            "sec-websocket-extensions",
            HeaderValue::from_static("grip; message-prefix=\"a,b;\\\"c\", other"),
        );
        assert_eq!(grip_prefix(&h).as_deref(), Some("a,b;\"c"));
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        for attempt in 0..10 {
            let d = backoff(attempt).as_millis() as u64;
            let base = (500u64 << attempt.min(4)).min(8_000);
            assert!((base..=base + base / 2).contains(&d), "{attempt}: {d}");
        }
    }
}
#[cfg(test)]
mod size_budget {
    /// What an idle backend connection keeps beyond an echo one: its
    /// link (behind an `Rc`), its `AppState` and its headers. Keep the link
    /// small.
    const LINK_BUDGET_BYTES: usize = 136;

    #[test]
    fn link_fits_its_budget() {
        let size = std::mem::size_of::<super::Link>();
        eprintln!("Link: {size} bytes");
        assert!(size <= LINK_BUDGET_BYTES, "Link is {size} bytes");
    }
}
