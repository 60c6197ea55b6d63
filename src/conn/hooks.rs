//! A pub/sub route's hooks (docs/BACKEND.md, "Hooks"): an application
//! asked, with a JSON `POST`, whether a handshake is accepted (and as
//! whom, with which grants and subscriptions), whether a subscribe and a
//! publish may go ahead, and with which payload.
//!
//! The connection waits for its hook without holding up its core: the
//! call runs in a task of its own, and the connection reads nothing more
//! until the answer is in (`HookWait`, as a publish waits for ring space),
//! so a client's frames are carried out in order. Every wait is bounded
//! by the route's `hook_timeout_ms`; a hook that fails denies.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

use super::outbound::Outbound;
use super::shard::{Session, Shard};
use crate::auth::{Grants, Identity};
use crate::config::{Hooks, RouteId};
use crate::upstream::{Failure, Post, Upstream};

/// The largest hook answer taken.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The most calls one wait makes (a STOMP COMMIT asks once per SEND it
/// holds); a frame that needs more is denied without a call.
const MAX_ASKS: usize = 64;

#[derive(Clone, Copy)]
enum Kind {
    Connect = 0,
    Subscribe = 1,
    Publish = 2,
}

/// The upstream pool's key of a route's hook (after the backend routes').
fn pool_index(shard: &Shard, route: RouteId, kind: Kind) -> usize {
    shard.config.routes.len() + route.index() * 3 + kind as usize
}

/// Why a hook gave no verdict.
#[derive(Debug)]
enum Failed {
    /// Out of time.
    Timeout,
    /// Unreachable, or an answer that is not a hook's.
    Invalid,
}

/// Calls a hook: its `result` object, or its `error` object as `Err(Ok)`.
async fn call(
    shard: &Shard,
    index: usize,
    upstream: &Upstream,
    timeout_ms: u64,
    request: Value,
) -> Result<Result<Value, Value>, Failed> {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(http::header::ACCEPT, HeaderValue::from_static("application/json"));
    shard.stats.borrow_mut().hook_calls += 1;
    let answer = shard
        .upstream
        .post(
            index,
            upstream,
            Post {
                path: &upstream.path,
                headers,
                body: Bytes::from(request.to_string()),
                max_body: MAX_ANSWER_BYTES,
                timeout: Duration::from_millis(timeout_ms),
            },
        )
        .await;
    let failed = |f: Failed| {
        shard.stats.borrow_mut().hook_failures += 1;
        Err(f)
    };
    let response = match answer {
        Ok(r) => r,
        Err(Failure::Timeout) => return failed(Failed::Timeout),
        Err(_) => return failed(Failed::Invalid),
    };
    if response.status != 200 {
        return failed(Failed::Invalid);
    }
    let Ok(Value::Object(mut answer)) = serde_json::from_slice::<Value>(&response.body) else {
        return failed(Failed::Invalid);
    };
    match (answer.remove("result"), answer.remove("error")) {
        (_, Some(error)) => Ok(Err(error)),
        (Some(result), None) => Ok(Ok(result)),
        (None, None) => failed(Failed::Invalid),
    }
}

/// The `message` of an `error` object.
fn message_of(error: &Value) -> String {
    error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("denied")
        .chars()
        .take(200)
        .collect()
}

/// What the handshake hands to `connect`.
pub(super) struct ConnectRequest {
    pub route: RouteId,
    pub key: Box<[u8]>,
    pub protocol: Option<Box<str>>,
    pub json: Value,
    /// permessage-deflate, as the route agrees to the client's offer.
    pub deflate: Option<crate::ws::deflate::Agreement>,
}

impl ConnectRequest {
    /// The connect hook's request for handshake `head`.
    pub fn new(
        route: RouteId,
        config: &crate::config::Route,
        head: &crate::ws::handshake::Head<'_>,
        raw: &[u8],
        session: &Session,
    ) -> ConnectRequest {
        let key = head.validate_upgrade().map(<[u8]>::to_vec).unwrap_or_default();
        let mut headers = serde_json::Map::new();
        let mut parsed = [httparse::EMPTY_HEADER; crate::ws::handshake::MAX_HEADERS];
        let mut request = httparse::Request::new(&mut parsed);
        if request.parse(raw).is_ok() {
            for h in request.headers.iter() {
                let name = h.name.to_ascii_lowercase();
                if matches!(
                    name.as_str(),
                    "connection" | "upgrade" | "sec-websocket-key" | "sec-websocket-extensions"
                ) {
                    continue;
                }
                if let Ok(value) = std::str::from_utf8(h.value) {
                    headers.insert(name, Value::from(value));
                }
            }
        }
        let (user, ip) = session.with(|s| {
            (
                s.identity().and_then(|i| i.user.as_deref()).map(str::to_string),
                s.peer_ip(),
            )
        });
        let json = json!({
            "session": session.id(),
            "route": config.path,
            "protocol": format!("{:?}", config.protocol).to_lowercase(),
            "user": user,
            "remote_addr": ip.map(|i| i.to_string()),
            "query": head.query,
            "headers": headers,
        });
        ConnectRequest {
            route,
            key: key.into_boxed_slice(),
            protocol: head.choose_protocol(&config.subprotocols).map(Box::from),
            json,
            deflate: None,
        }
    }
}

/// Asks the connect hook, and queues the client's answer: the 101, or
/// the hook's refusal (its status, 4xx, and message), 502 when it
/// failed, 504 when it timed out. `Ok`: upgraded.
pub(super) async fn connect(session: &Session, request: ConnectRequest, out: &mut Outbound) -> Result<(), u16> {
    let shard = &session.shard;
    let hooks = shard.config.route_by_id(request.route).hooks.clone();
    let Some((hooks, upstream)) = hooks.and_then(|h| h.connect.clone().map(|u| (h, u))) else {
        return Err(refuse(out, shard, 502, "no connect hook"));
    };
    let index = pool_index(shard, request.route, Kind::Connect);
    let result = match call(shard, index, &upstream, hooks.timeout_ms, request.json).await {
        Ok(Ok(result)) => result,
        Ok(Err(error)) => {
            let status = error
                .get("status")
                .and_then(Value::as_u64)
                .filter(|s| (400..=499).contains(s))
                .unwrap_or(403) as u16;
            return Err(refuse(out, shard, status, &message_of(&error)));
        }
        Err(Failed::Timeout) => return Err(refuse(out, shard, 504, "the connect hook did not answer in time")),
        Err(Failed::Invalid) => {
            return Err(refuse(
                out,
                shard,
                502,
                "the connect hook could not be reached, or its answer is not one",
            ))
        }
    };
    // The answer's user and grants are the session's identity, as a
    // token's would be.
    let user = result.get("user").and_then(Value::as_str);
    if result.get("user").is_some() || result.get("sluice").is_some() {
        let list = |name: &str| -> Vec<String> {
            result
                .pointer(&format!("/sluice/{name}"))
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default()
        };
        let grants = match Grants::new(&list("subscribe"), &list("publish"), user) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = e, "connect hook's grants refused");
                return Err(refuse(out, shard, 502, "the connect hook's grants are not well formed"));
            }
        };
        // A token's expiry stays: the hook cannot lengthen its life.
        let expires_at = session.with(|s| s.identity().and_then(|i| i.expires_at));
        let identity = Identity {
            user: user.map(Box::from),
            expires_at,
            grants: Arc::new(grants),
        };
        session.set_identity(identity);
    }
    let subscriptions: Vec<Box<[u8]>> = result
        .get("subscriptions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|t| Box::from(t.as_bytes()))
                .collect()
        })
        .unwrap_or_default();
    if !subscriptions.is_empty() {
        session.with(|s| s.app.get_or_insert_with(Default::default).initial = subscriptions.into_boxed_slice());
    }
    let protocol = request.protocol.as_deref();
    super::upgrade::accept(out, &shard.pool, session, &request.key, protocol, b"", request.deflate);
    Ok(())
}

fn refuse(out: &mut Outbound, shard: &Shard, status: u16, message: &str) -> u16 {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Refused");
    let body = format!("{message}\n");
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    out.push_bytes(&shard.pool, response.as_bytes());
    status
}

/// A hook's verdict on one subscribe or publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead; a publish with this payload instead, if given.
    Allow(Option<Bytes>),
    /// The hook said no, with its message.
    Deny(String),
    /// The hook did not answer, or not as a hook.
    Unavailable,
}

/// What a subscribe or publish hook is asked about.
pub enum Ask {
    Subscribe { topic: Bytes },
    Publish { topic: Bytes, payload: Bytes, binary: bool },
}

/// A connection waiting for its hooks, shared with the task that calls
/// them: `verdicts` are filled in, in the order asked, and then the
/// connection goes on.
pub struct HookWait {
    what: Option<Waiting>,
    pub verdicts: Option<Vec<Verdict>>,
    waker: Option<Waker>,
}

/// What waits for the verdicts.
pub enum Waiting {
    /// A native SUB.
    Sub(Bytes),
    /// A native PUB.
    Pub {
        kind: crate::ws::MessageKind,
        topic: Bytes,
        payload: Bytes,
    },
    /// A STOMP frame's actions.
    Stomp(Vec<crate::proto::stomp::session::Action>),
}

pub type SharedWait = Rc<RefCell<HookWait>>;

impl HookWait {
    /// The verdicts are not in yet.
    pub fn waiting(&self) -> bool {
        self.verdicts.is_none()
    }
}

/// Whether the route has a hook for subscribes (publishes).
pub(super) fn has_hook(session: &Session, publish: bool) -> bool {
    let route = session.with(|s| s.route);
    route
        .and_then(|r| session.shard.config.route_by_id(r).hooks.as_ref())
        .is_some_and(|h| {
            if publish {
                h.publish.is_some()
            } else {
                h.subscribe.is_some()
            }
        })
}

impl Session {
    /// Whether the session waits for a hook's verdict.
    pub(super) fn hook_blocked(&self) -> bool {
        self.with(|s| {
            s.app
                .as_ref()
                .and_then(|a| a.hook.as_ref())
                .is_some_and(|w| w.borrow().verdicts.is_none())
        })
    }

    /// Whether a hook's call or its verdict is in progress.
    pub(super) fn hook_pending(&self) -> bool {
        self.with(|s| s.app.as_ref().is_some_and(|a| a.hook.is_some()))
    }

    /// Ready once the verdicts are in.
    pub(super) fn poll_hook(&self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(wait) = self.with(|s| s.app.as_ref().and_then(|a| a.hook.clone())) else {
            return Poll::Ready(());
        };
        let mut wait = wait.borrow_mut();
        if wait.verdicts.is_some() {
            return Poll::Ready(());
        }
        wait.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The topics the connect hook subscribed the session to (once).
    pub(super) fn take_initial_subscriptions(&self) -> Box<[Box<[u8]>]> {
        self.with(|s| {
            s.app
                .as_mut()
                .map(|a| std::mem::take(&mut a.initial))
                .unwrap_or_default()
        })
    }

    /// The verdicts and what waited for them, once in; the wait is over.
    pub(super) fn take_verdicts(&self) -> Option<(Waiting, Vec<Verdict>)> {
        let ready = self.with(|s| {
            let app = s.app.as_mut()?;
            if app.hook.as_ref()?.borrow().verdicts.is_some() {
                app.hook.take()
            } else {
                None
            }
        })?;
        let mut wait = ready.borrow_mut();
        Some((wait.what.take()?, wait.verdicts.take()?))
    }

    /// Asks the route's hooks about `asks` (each that has a hook; one
    /// without is allowed at once); the session reads nothing more until
    /// the verdicts are in.
    pub(super) fn ask_hooks(&self, what: Waiting, asks: Vec<Ask>) {
        let wait = Rc::new(RefCell::new(HookWait {
            what: Some(what),
            verdicts: None,
            waker: None,
        }));
        self.with(|s| s.app.get_or_insert_with(Default::default).hook = Some(wait.clone()));
        let route = self.with(|s| s.route);
        let hooks = route.and_then(|r| self.shard.config.route_by_id(r).hooks.clone());
        let user = self.with(|s| s.identity().and_then(|i| i.user.as_deref()).map(str::to_string));
        let mut base = json!({ "session": self.id(), "user": user });
        if let Some(route) = route {
            base["route"] = Value::from(self.shard.config.route_by_id(route).path.as_str());
        }
        // Verdicts always come from the task, never at once: the caller
        // must see the session blocked, so that later input waits.
        let (route, hooks, asks) = match (route, hooks) {
            (Some(route), Some(hooks)) if asks.len() <= MAX_ASKS => (route, hooks, asks),
            (_, _) => {
                let why = format!("More than {MAX_ASKS} subscribes and publishes for the hooks in one frame.");
                let verdicts = vec![Verdict::Deny(why); asks.len()];
                let wait = Rc::downgrade(&wait);
                monoio::spawn(async move { deliver(&wait, verdicts) });
                return;
            }
        };
        monoio::spawn(ask(self.shard.clone(), route, hooks, base, asks, Rc::downgrade(&wait)));
    }
}

/// The hook calls of one wait, one after the other.
/// The task ends when the session does: it holds its wait weakly.
async fn ask(
    shard: Rc<Shard>,
    route: RouteId,
    hooks: Arc<Hooks>,
    base: Value,
    asks: Vec<Ask>,
    wait: std::rc::Weak<RefCell<HookWait>>,
) {
    let mut verdicts = Vec::with_capacity(asks.len());
    for ask in asks {
        if wait.strong_count() == 0 {
            return;
        }
        let (upstream, kind, mut request) = match &ask {
            Ask::Subscribe { topic } => (&hooks.subscribe, Kind::Subscribe, json!({ "topic": lossy(topic) })),
            Ask::Publish { topic, payload, binary } => {
                let mut request = json!({ "topic": lossy(topic), "binary": binary });
                match std::str::from_utf8(payload) {
                    Ok(text) if !binary => request["payload"] = Value::from(text),
                    _ => {
                        use base64::Engine;
                        request["payload_base64"] =
                            Value::from(base64::engine::general_purpose::STANDARD.encode(payload));
                    }
                }
                (&hooks.publish, Kind::Publish, request)
            }
        };
        let Some(upstream) = upstream else {
            verdicts.push(Verdict::Allow(None));
            continue;
        };
        for (k, v) in base.as_object().into_iter().flatten() {
            request[k] = v.clone();
        }
        let index = pool_index(&shard, route, kind);
        let verdict = match call(&shard, index, upstream, hooks.timeout_ms, request).await {
            Ok(Ok(result)) => match replacement(&result, &ask) {
                Some(payload) if payload.len() > shard.config.limits.max_message_bytes => {
                    Verdict::Deny("The hook's payload is over the message size limit.".into())
                }
                payload => Verdict::Allow(payload),
            },
            Ok(Err(error)) => Verdict::Deny(message_of(&error)),
            Err(_) => Verdict::Unavailable,
        };
        if !matches!(verdict, Verdict::Allow(_)) {
            shard.stats.borrow_mut().hook_denials += 1;
        }
        verdicts.push(verdict);
    }
    deliver(&wait, verdicts);
}

/// Hands the verdicts to the waiting session, if it is still there.
fn deliver(wait: &std::rc::Weak<RefCell<HookWait>>, verdicts: Vec<Verdict>) {
    let Some(wait) = wait.upgrade() else { return };
    let mut wait = wait.borrow_mut();
    wait.verdicts = Some(verdicts);
    if let Some(w) = wait.waker.take() {
        w.wake();
    }
}

/// A publish hook's new payload, if it gave one (`payload`, text, or
/// `payload_base64`).
fn replacement(result: &Value, ask: &Ask) -> Option<Bytes> {
    let Ask::Publish { .. } = ask else { return None };
    if let Some(text) = result.get("payload").and_then(Value::as_str) {
        return Some(Bytes::copy_from_slice(text.as_bytes()));
    }
    let b64 = result.get("payload_base64").and_then(Value::as_str)?;
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .map(Bytes::from)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
