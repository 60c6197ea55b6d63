//! The admin HTTP port: publish, metrics, stats, topics, health, actions on
//! one session, and the web console that shows them. Served by the workers themselves (each has a listener on the
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
use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use serde::Deserialize;

use crate::conn::shard::Shard;
use crate::pubsub::mesh::SessionAction;
use crate::pubsub::message::Message;
use crate::ws::MessageKind;
use http::{Bad, Request};
pub use metrics::Metrics;

/// An admin connection that sends nothing for this long between requests
/// is closed; a request's body must arrive within this long of its head.
/// (Its first request's first byte has `--handshake-timeout-ms`.)
const IDLE: Duration = Duration::from_secs(30);
/// A response must be taken by the client within this long.
const WRITE_TIME: Duration = Duration::from_secs(10);
/// Longest wait for cross-core ring space or another core's answer.
const MESH_WAIT: Duration = Duration::from_secs(10);
/// A connection's read buffer keeps at most this much capacity between
/// requests: a large body's buffer is given back once it is handled.
const KEEP_BUF_BYTES: usize = 16 * 1024;
/// After a refusal, input is discarded (so that it does not turn our answer
/// into a reset) for at most this long and this much.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// An admin connection's place: one of `--admin-max-connections` for the
/// server, and one of its core's open admin connections (which the drain
/// waits for), with its entry in the core's list of whom to wake at
/// shutdown. Given back however the connection's task ends.
pub struct Place {
    shard: Rc<Shard>,
    id: u64,
}

impl Place {
    /// A place for a new connection, or `None` at the cap.
    pub fn take(shard: &Rc<Shard>) -> Option<Place> {
        if !shard.admission.open_admin() {
            return None;
        }
        Some(Place {
            shard: shard.clone(),
            id: shard.admin_opened(),
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.shard.admin_closed(self.id);
        self.shard.admission.close_admin();
    }
}

/// What a connection past `--admin-max-connections` is told, in one
/// attempt that never waits, before it is closed.
pub const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 39\r\nX-Content-Type-Options: nosniff\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{\"error\":\"too many admin connections\"}\n";

/// Serves one admin connection until it closes, errs, idles or the server
/// shuts down.
pub async fn serve(mut stream: TcpStream, place: Place, metrics: Arc<Metrics>) {
    let shard = &place.shard;
    let head_time = Duration::from_millis(shard.config.handshake_timeout_ms);
    let mut buf: Vec<u8> = Vec::new();
    // A new connection's first byte has as long as a handshake; a kept-alive
    // one may idle `IDLE` between requests.
    let mut idle = head_time;
    loop {
        // The head: the first byte within `idle`, then the whole of it
        // within `--handshake-timeout-ms`, however it trickles in.
        let mut head_deadline = None;
        let request = loop {
            if !buf.is_empty() {
                match http::parse(&buf, usize::MAX) {
                    Ok(Some(r)) => break r,
                    Ok(None) => {}
                    Err(Bad(status, message)) => return refuse(&mut stream, &place, buf, status, message).await,
                }
                head_deadline.get_or_insert_with(|| Instant::now() + head_time);
            }
            let deadline = head_deadline.unwrap_or_else(|| Instant::now() + idle);
            if !read_more(&mut stream, &mut buf, 4096, &place, deadline).await {
                return;
            }
        };
        // Decided from the head alone, before any byte of the body is read:
        // the token, the endpoint, the method and the body's length.
        let endpoint = match admit(&request, shard) {
            Ok(endpoint) => endpoint,
            Err((status, message)) => return refuse(&mut stream, &place, buf, status, message).await,
        };
        // The body.
        let end = request.head_len + request.content_length;
        let body_deadline = Instant::now() + IDLE;
        while buf.len() < end {
            let want = end - buf.len();
            if !read_more(&mut stream, &mut buf, want, &place, body_deadline).await {
                return;
            }
        }
        let response = handle(&endpoint, &request, &buf[request.head_len..end], shard, &metrics).await;
        buf.drain(..end);
        buf.shrink_to(KEEP_BUF_BYTES);
        if !write_response(&mut stream, response, &place).await || request.close {
            return;
        }
        idle = IDLE;
    }
}

/// Writes a response; `false` if the client did not take it within
/// `WRITE_TIME`, on an error, or once the drain's deadline has passed (a
/// client that stops reading neither keeps its place nor holds up the
/// shutdown).
async fn write_response(stream: &mut TcpStream, response: Vec<u8>, place: &Place) -> bool {
    use std::future::Future;
    use std::task::Poll;
    let mut write = std::pin::pin!(stream.write_all(response));
    let mut expired = std::pin::pin!(monoio::time::sleep(WRITE_TIME));
    std::future::poll_fn(|cx| {
        if place.shard.poll_aborted(place.id, cx.waker()) {
            return Poll::Ready(false);
        }
        if let Poll::Ready((written, _)) = write.as_mut().poll(cx) {
            return Poll::Ready(written.is_ok());
        }
        expired.as_mut().poll(cx).map(|()| false)
    })
    .await
}

/// Answers with `status` and closes: our side is shut first, and input is
/// discarded for a moment, so that what the client still sends (the body
/// we did not read) does not turn the answer into a reset.
async fn refuse(stream: &mut TcpStream, place: &Place, mut buf: Vec<u8>, status: u16, message: &str) {
    if !write_response(stream, http::error(status, message, true), place).await || stream.shutdown().await.is_err() {
        return;
    }
    buf.clear();
    buf.shrink_to(4096);
    let deadline = Instant::now() + LINGER;
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((Ok(n), slice)) = monoio::time::timeout(left, stream.read(std::mem::take(&mut buf))).await else {
            return;
        };
        if n == 0 {
            return;
        }
        discarded += n;
        buf = slice;
        buf.clear();
    }
}

/// Appends up to `want` more bytes; `false` at end of stream, on an
/// error, at `deadline` without the bytes, or once the server shuts down.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize, place: &Place, deadline: Instant) -> bool {
    use monoio::buf::IoBufMut;
    use std::future::Future;
    use std::task::Poll;
    let len = buf.len();
    buf.reserve(want);
    let cap = len + want.min(buf.capacity() - len);
    let mut read = std::pin::pin!(stream.read(std::mem::take(buf).slice_mut(len..cap)));
    let mut expired = std::pin::pin!(monoio::time::sleep(deadline.saturating_duration_since(Instant::now())));
    let outcome = std::future::poll_fn(|cx| {
        if place.shard.poll_shutdown(place.id, cx.waker()) {
            return Poll::Ready(None);
        }
        if let Poll::Ready(r) = read.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        expired.as_mut().poll(cx).map(|()| None)
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

/// What a request asks for.
enum Endpoint<'r> {
    /// `GET /`: the web console's page.
    Console,
    Health,
    Ready,
    Metrics,
    Stats,
    /// `GET /topics`
    Topics,
    Publish,
    /// `POST /sessions/{id}/send`
    Send(&'r str),
    /// `DELETE /sessions/{id}`
    Close(&'r str),
    /// `GET /sessions/{id}`
    Info(&'r str),
}

impl Endpoint<'_> {
    /// Whether it answers without the admin token (load balancers,
    /// scrapers, and the console's page, which holds no data and asks for
    /// the token itself).
    fn is_open(&self) -> bool {
        matches!(
            self,
            Endpoint::Console | Endpoint::Health | Endpoint::Ready | Endpoint::Metrics
        )
    }

    /// The largest body it takes.
    fn max_body(&self, config: &crate::config::Config) -> usize {
        let message = config.limits.max_message_bytes;
        match self {
            // A JSON batch: the messages, escaped or in base64.
            Endpoint::Publish => message.saturating_mul(2).max(64 * 1024),
            Endpoint::Send(_) => message,
            _ => 0,
        }
    }
}

/// The endpoint of `method` and `path`, or 404/405.
fn route<'r>(method: &str, path: &'r str) -> Result<Endpoint<'r>, (u16, &'static str)> {
    const NOT_ALLOWED: (u16, &str) = (405, "method not allowed");
    let allow = |ok: bool, endpoint| if ok { Ok(endpoint) } else { Err(NOT_ALLOWED) };
    match path {
        "/" => allow(matches!(method, "GET" | "HEAD"), Endpoint::Console),
        "/healthz" => allow(matches!(method, "GET" | "HEAD"), Endpoint::Health),
        "/readyz" => allow(matches!(method, "GET" | "HEAD"), Endpoint::Ready),
        "/metrics" => allow(method == "GET", Endpoint::Metrics),
        "/stats" => allow(method == "GET", Endpoint::Stats),
        "/topics" => allow(method == "GET", Endpoint::Topics),
        "/publish" => allow(method == "POST", Endpoint::Publish),
        _ => {
            // `/connections/{id}`: the same, as API gateways name it.
            let rest = path
                .strip_prefix("/sessions/")
                .or_else(|| path.strip_prefix("/connections/"))
                .ok_or((404, "no such endpoint"))?;
            match rest.strip_suffix("/send") {
                Some(id) if !id.is_empty() && !id.contains('/') => allow(method == "POST", Endpoint::Send(id)),
                None if !rest.is_empty() && !rest.contains('/') => match method {
                    "DELETE" => Ok(Endpoint::Close(rest)),
                    "GET" => Ok(Endpoint::Info(rest)),
                    _ => Err(NOT_ALLOWED),
                },
                _ => Err((404, "no such endpoint")),
            }
        }
    }
}

/// Whether the request may go on to its body: where it comes from (a page
/// of another origin is refused when no token is set), the token (an
/// endpoint that is not open needs it, whatever the path, so that an
/// unauthenticated client learns nothing), then the endpoint and method,
/// then the body's length.
fn admit<'r>(request: &'r Request, shard: &Shard) -> Result<Endpoint<'r>, (u16, &'static str)> {
    // Without a token, a page of another site may make a browser send
    // requests here (CSRF): its `Origin` says so, and nothing it asks is
    // done. With one, the token decides: a page cannot make a browser send
    // it (a bearer token is no cookie), and the console behind a reverse
    // proxy (`Origin: https://admin.example`) keeps working.
    if request.cross_origin && shard.config.admin_token.is_none() {
        return Err((403, "requests from another origin are refused"));
    }
    let endpoint = route(&request.method, &request.path);
    let open = endpoint.as_ref().is_ok_and(Endpoint::is_open);
    // Without a token, a name that is not this machine's address may be a
    // page's own, made to resolve here (DNS rebinding): only requests
    // addressed to an IP address or localhost go on, but for the open
    // endpoints.
    if shard.config.admin_token.is_none() && !request.host_is_address && !open {
        return Err((
            403,
            "address the admin port by IP address or localhost, or give it --admin-token",
        ));
    }
    if let Some(token) = &shard.config.admin_token {
        if !open && !authorized(request, token) {
            return Err((401, "a valid bearer token is required"));
        }
    }
    let endpoint = endpoint?;
    if request.content_length > endpoint.max_body(&shard.config) {
        return Err((413, "body over the size limit"));
    }
    Ok(endpoint)
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

async fn handle(
    endpoint: &Endpoint<'_>,
    request: &Request,
    body: &[u8],
    shard: &Rc<Shard>,
    metrics: &Metrics,
) -> Vec<u8> {
    let close = request.close;
    let json = |status: u16, value: serde_json::Value| {
        http::response(status, "application/json", value.to_string().as_bytes(), close)
    };
    // RFC 9110 9.3.2: a HEAD response has the GET's head and no content.
    let head_only = |mut response: Vec<u8>| {
        if request.method == "HEAD" {
            let head_len = response
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(response.len(), |i| i + 4);
            response.truncate(head_len);
        }
        response
    };
    let outcome = match endpoint {
        Endpoint::Console => return head_only(http::console(close)),
        Endpoint::Health => return head_only(json(200, serde_json::json!({ "status": "ok" }))),
        // 503 while a cluster's bus is down (or the node shuts down): a
        // load balancer sends its clients elsewhere.
        Endpoint::Ready => {
            let ready = metrics.bus_ready() && !shard.is_shutting_down();
            let status = if ready { 200 } else { 503 };
            return head_only(json(
                status,
                serde_json::json!({ "ready": ready, "bus": metrics.bus_json() }),
            ));
        }
        Endpoint::Metrics => {
            return http::response(200, "text/plain; version=0.0.4", metrics.prometheus().as_bytes(), close)
        }
        Endpoint::Stats => Ok(metrics.json()),
        Endpoint::Topics => topics(request, shard).await,
        Endpoint::Publish => publish(request, body, shard).await,
        Endpoint::Send(id) => send(id, request, body, shard).await,
        Endpoint::Close(id) => close_session(id, request, shard).await,
        Endpoint::Info(id) => act(id, SessionAction::Info, shard).await,
    };
    match outcome {
        Ok(value) => json(200, value),
        Err((status, message)) => http::error(status, &message, close),
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
    /// `false`: never sent compressed (see `Message::compress`).
    #[serde(default = "yes")]
    compress: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    messages: Vec<BatchMessage>,
}

/// `POST /publish?topic=T` (the body is the payload; binary with
/// `Content-Type: application/octet-stream`, else UTF-8 text), or
/// `POST /publish` with a JSON batch `{"messages": [{"topic", "payload" |
/// "payload_base64", "compress"}]}`. All messages are checked before any
/// is published. `compress=false` (in the query, or per message) keeps a
/// message from ever going out compressed: one that holds a secret beside
/// text an attacker chooses would give the secret away through its
/// compressed size (CRIME, BREACH).
async fn publish(request: &Request, body: &[u8], shard: &Rc<Shard>) -> Result<serde_json::Value, Failure> {
    let limit = shard.config.limits.max_message_bytes;
    let mut messages: Vec<(MessageKind, String, Vec<u8>, bool)> = Vec::new();
    let compress = match http::query_value(&request.query, "compress") {
        None | Some("true") => true,
        Some("false") => false,
        Some(_) => return Err((400, "compress is true or false".to_string())),
    };
    match http::query_value(&request.query, "topic") {
        Some(topic) => {
            let topic = http::percent_decode(topic).ok_or((400, "bad topic encoding".to_string()))?;
            let kind = if request.binary {
                MessageKind::Binary
            } else {
                std::str::from_utf8(body).map_err(|_| (400, "a text payload must be UTF-8".to_string()))?;
                MessageKind::Text
            };
            messages.push((kind, topic, body.to_vec(), compress));
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
                messages.push((kind, m.topic, payload, compress && m.compress));
            }
        }
    }
    for (i, (_, topic, payload, _)) in messages.iter().enumerate() {
        if !crate::topic::valid_topic(topic.as_bytes()) {
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
    shard.hub.sessions.admin_publishing(true);
    let _in_flight = InFlight(shard);
    let hub = &shard.hub;
    let mut cores = 0;
    for (kind, topic, payload, compress) in &messages {
        // Subscribers here over their budget: wait (bounded) like a
        // publishing connection, which is not read meanwhile.
        let within = monoio::time::timeout(MESH_WAIT, std::future::poll_fn(|cx| hub.sessions.poll_budget(cx))).await;
        if within.is_err() {
            return Err((503, "subscribers' queues on this core stayed full".to_string()));
        }
        let mut pending = Vec::new();
        let mut message = Message::native(*kind, topic.as_bytes(), payload, hub.next_message_id());
        message.compress = *compress;
        let reached = hub.publish(message, &mut pending);
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
        self.0.hub.sessions.admin_publishing(false);
    }
}

/// `POST /sessions/{id}/send`: the body, as one message to the session.
async fn send(id: &str, request: &Request, body: &[u8], shard: &Rc<Shard>) -> Result<serde_json::Value, Failure> {
    let kind = if request.binary {
        MessageKind::Binary
    } else {
        std::str::from_utf8(body).map_err(|_| (400, "a text message must be UTF-8".to_string()))?;
        MessageKind::Text
    };
    let compress = match http::query_value(&request.query, "compress") {
        None | Some("true") => true,
        Some("false") => false,
        Some(_) => return Err((400, "compress is true or false".to_string())),
    };
    act(
        id,
        SessionAction::Send(kind, Bytes::copy_from_slice(body), compress),
        shard,
    )
    .await
}

/// `DELETE /sessions/{id}?code=&reason=`: closes the session.
async fn close_session(id: &str, request: &Request, shard: &Rc<Shard>) -> Result<serde_json::Value, Failure> {
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
    act(id, SessionAction::Close(code, Bytes::from(reason)), shard).await
}

/// Topics `GET /topics` lists by default, and at most (`?limit=`).
const DEFAULT_TOPICS: usize = 100;
const MAX_TOPICS: usize = 10_000;
/// How long a core answers `GET /topics` from what it gathered last.
const TOPICS_FRESH: Duration = Duration::from_secs(1);

/// The node's topics as a core last gathered them: the `MAX_TOPICS` with
/// the most subscribers, in order, as (name, is a STOMP queue,
/// subscribers), the totals, and when the gathering finished.
struct TopicList {
    gathered: Instant,
    top: Vec<(Box<[u8]>, bool, u64)>,
    topics_total: usize,
    subscriptions_total: u64,
}

thread_local! {
    /// This core's (this worker thread's) last `TopicList`, and whether a
    /// request is gathering a new one.
    static TOPIC_LIST: std::cell::RefCell<Option<Rc<TopicList>>> = const { std::cell::RefCell::new(None) };
    static GATHERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `GET /topics[?limit=N]`: this node's topics (STOMP queues marked
/// `"queue": true`), each with its subscribers on every core, most first
/// (then by name); at most `limit` of them, and how many there are in all.
///
/// Gathering copies every core's topic table, so its cost grows with the
/// number of topics: a core gathers at most once in `TOPICS_FRESH`, one
/// request at a time, and answers every request meanwhile from that; each
/// core encodes its table at most once in that time, however many ask.
async fn topics(request: &Request, shard: &Rc<Shard>) -> Result<serde_json::Value, Failure> {
    let limit = match http::query_value(&request.query, "limit") {
        None => DEFAULT_TOPICS,
        Some(n) => Some(n)
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=MAX_TOPICS).contains(n))
            .ok_or_else(|| (400, format!("limit is 1 to {MAX_TOPICS}")))?,
    };
    let list = topic_list(shard).await?;
    let topics: Vec<serde_json::Value> = list
        .top
        .iter()
        .take(limit)
        .map(|(name, queue, subscribers)| {
            let mut entry = serde_json::json!({
                "topic": String::from_utf8_lossy(name),
                "subscribers": subscribers,
            });
            if *queue {
                entry["queue"] = serde_json::Value::Bool(true);
            }
            entry
        })
        .collect();
    Ok(serde_json::json!({
        "topics": topics,
        "topics_total": list.topics_total,
        "subscriptions_total": list.subscriptions_total,
    }))
}

/// This core's `TopicList` if it is fresh, or was finished after this
/// request came (while it waited for another request's gathering); else,
/// once no other request of this core is gathering one, a new one: this
/// core's counts and every other core's (`Hub::topic_counts`, asked over
/// the mesh), summed.
async fn topic_list(shard: &Rc<Shard>) -> Result<Rc<TopicList>, Failure> {
    let arrived = Instant::now();
    let deadline = arrived + MESH_WAIT;
    loop {
        let fresh = TOPIC_LIST
            .with(|l| l.borrow().clone())
            .filter(|l| l.gathered >= arrived || l.gathered.elapsed() < TOPICS_FRESH);
        if let Some(list) = fresh {
            return Ok(list);
        }
        // Past its deadline a request neither waits nor starts a gathering.
        if Instant::now() >= deadline {
            return Err((503, "the topics are still being gathered".to_string()));
        }
        if !GATHERING.with(|g| g.replace(true)) {
            break;
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    // However this ends (a core that does not answer, or the request's
    // connection gone), the next request may gather.
    struct Gathered;
    impl Drop for Gathered {
        fn drop(&mut self) {
            GATHERING.with(|g| g.set(false));
        }
    }
    let _gathered = Gathered;
    let others = (0..shard.hub.mesh.workers())
        .filter(|&c| c != shard.core)
        .map(|core| async move {
            let wait = deadline.saturating_duration_since(Instant::now());
            (
                core,
                monoio::time::timeout(wait, shard.hub.remote_topic_counts(core)).await,
            )
        });
    let mut answers = vec![shard.hub.topic_counts()];
    for (core, answer) in futures_util::future::join_all(others).await {
        match answer {
            Ok(Some(counts)) => answers.push(counts),
            _ => return Err((503, format!("core {core} did not answer"))),
        }
    }
    let list = Rc::new(sum_topics(&answers));
    TOPIC_LIST.with(|l| *l.borrow_mut() = Some(list.clone()));
    Ok(list)
}

/// Sums the cores' counts (`topics::decode_counts`) into a `TopicList`,
/// stamped now.
fn sum_topics(answers: &[Bytes]) -> TopicList {
    let mut counts = std::collections::HashMap::<&[u8], u64>::new();
    for answer in answers {
        for (key, n) in crate::pubsub::topics::decode_counts(answer) {
            *counts.entry(key).or_default() += u64::from(n);
        }
    }
    let topics_total = counts.len();
    let subscriptions_total = counts.values().sum();
    // (name, queue, subscribers): a queue's key is its name after the prefix.
    let mut all: Vec<(&[u8], bool, u64)> = counts
        .into_iter()
        .map(|(key, n)| match key.split_first() {
            Some((&crate::topic::QUEUE_PREFIX, name)) => (name, true, n),
            _ => (key, false, n),
        })
        .collect();
    let order =
        |a: &(&[u8], bool, u64), b: &(&[u8], bool, u64)| b.2.cmp(&a.2).then_with(|| (a.0, a.1).cmp(&(b.0, b.1)));
    if all.len() > MAX_TOPICS {
        all.select_nth_unstable_by(MAX_TOPICS, order);
        all.truncate(MAX_TOPICS);
    }
    all.sort_unstable_by(order);
    TopicList {
        gathered: Instant::now(),
        top: all
            .into_iter()
            .map(|(name, queue, n)| (name.into(), queue, n))
            .collect(),
        topics_total,
        subscriptions_total,
    }
}

/// Carries out `action` on the session `id`, on whatever core (and node)
/// it is.
async fn act(id: &str, action: SessionAction, shard: &Rc<Shard>) -> Result<serde_json::Value, Failure> {
    let gone = || (404, "no such session".to_string());
    let local = match (id.split_once('.'), &shard.config.cluster) {
        // `<node>.<core>.<slot>.<generation>`: a cluster's session id.
        (Some((node, rest)), Some(cluster)) if rest.matches('.').count() == 2 => {
            if node != cluster.node_id {
                // A node id as `--node-id` takes them (no NATS wildcard).
                let named = node.len() <= 64
                    && node
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !named {
                    return Err(gone());
                }
                parse_session_id(rest).ok_or_else(gone)?;
                // The bridge bounds its wait for the other node
                // (`cluster::REQUEST_WAIT`): a node that is gone, or a bus
                // that is down, reads as no such session.
                let asked = shard.hub.remote_node_action(node, rest, action);
                return match monoio::time::timeout(MESH_WAIT, asked).await {
                    Ok(Some(answer)) => Ok(answered(id, &answer)),
                    Ok(None) => Err(gone()),
                    Err(_) => Err((503, "the NATS bridge did not answer".to_string())),
                };
            }
            rest
        }
        _ => id,
    };
    let (core, key) = parse_session_id(local).ok_or_else(gone)?;
    if core >= shard.hub.mesh.workers() {
        return Err(gone());
    }
    let found = if core == shard.core {
        Ok(shard.act_on_session(crate::pubsub::SessionKey::from(slotmap::KeyData::from_ffi(key)), action))
    } else {
        monoio::time::timeout(MESH_WAIT, shard.hub.remote_session_action(core, key, action)).await
    };
    match found {
        Ok(Some(answer)) => Ok(answered(id, &answer)),
        Ok(None) => Err((404, "no such session".to_string())),
        Err(_) => Err((503, "the session's core did not answer".to_string())),
    }
}

/// The JSON answer to an action on session `id`: its id, and what the
/// session's core said of it (`GET`).
fn answered(id: &str, answer: &[u8]) -> serde_json::Value {
    let mut value = match serde_json::from_slice::<serde_json::Value>(answer) {
        Ok(serde_json::Value::Object(info)) => serde_json::Value::Object(info),
        _ => serde_json::json!({}),
    };
    value["session"] = serde_json::Value::from(id);
    value
}

/// `<core>.<slot>.<generation>` -> core and slot key. A session's
/// generation is odd (the session table's versions are odd while a slot is
/// in use, and it would read an even one as the next odd one), so an even
/// one names no session.
fn parse_session_id(id: &str) -> Option<(usize, u64)> {
    let mut parts = id.split('.');
    let core = parts.next()?.parse().ok()?;
    let slot: u32 = parts.next()?.parse().ok()?;
    let generation: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || generation.is_multiple_of(2) {
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
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "a.1.1",
            "1.-1.1",
            "1.4294967296.1",
            "1.17.2",
            "1.17.0",
        ] {
            assert_eq!(parse_session_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn too_many_says_its_length() {
        let text = std::str::from_utf8(TOO_MANY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{text}"
        );
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
