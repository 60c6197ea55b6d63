//! Backend routes (docs/BACKEND.md): the real binary in front of a
//! scripted upstream that speaks WebSocket-over-HTTP as Pushpin's
//! backends do, or breaks it on purpose.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// One request the upstream took.
#[derive(Debug, Clone)]
struct Req {
    body_len: usize,
    headers: Vec<(String, String)>,
    events: Vec<(String, Vec<u8>)>,
    /// A hook's JSON request.
    json: serde_json::Value,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, kind: &str) -> bool {
        self.events.iter().any(|(k, _)| k == kind)
    }

    fn content_bytes(&self) -> usize {
        self.events.iter().map(|(_, c)| c.len()).sum()
    }
}

/// What the upstream does with a request.
enum Reply {
    /// 200 with these events (an event list), and these headers.
    Events(Vec<(&'static str, String)>, Vec<u8>),
    /// This status, headers and body.
    Status(u16, Vec<(&'static str, String)>, Vec<u8>),
    /// These bytes as they are, then close.
    Raw(Vec<u8>),
    /// Nothing, for this long, then close.
    Stall(Duration),
    /// Wait, then the reply.
    After(Duration, Box<Reply>),
}

type Script = Arc<dyn Fn(&Req, usize) -> Reply + Send + Sync>;

struct Upstream {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
    /// Its accepted connections, shut down when it is dropped.
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Upstream {
    /// Serves `script` (given each request and its index) on a free port,
    /// keep-alive, a thread per connection.
    fn start(script: impl Fn(&Req, usize) -> Reply + Send + Sync + 'static) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script: Script = Arc::new(script);
        let (seen, stopping) = (requests.clone(), stop.clone());
        let conns = Arc::new(Mutex::new(Vec::new()));
        let open = conns.clone();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        open.lock().unwrap().push(stream.try_clone().unwrap());
                        let (seen, script) = (seen.clone(), script.clone());
                        std::thread::spawn(move || serve(stream, seen, script));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Upstream {
            addr,
            requests,
            stop,
            conns,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/app", self.addr)
    }

    fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until a request holds an event of `kind`; returns it.
    fn wait_for(&self, kind: &str, limit: Duration) -> Req {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| r.has(kind)) {
                return r;
            }
            assert!(Instant::now() < deadline, "no {kind} in {:?}", self.requests());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every event so far, in order.
    fn events(&self) -> Vec<(String, Vec<u8>)> {
        self.requests().into_iter().flat_map(|r| r.events).collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn serve(stream: TcpStream, seen: Arc<Mutex<Vec<Req>>>, script: Script) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        assert!(line.starts_with("POST "), "{line}");
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').unwrap();
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).unwrap();
        let json = headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("content-type") && v == "application/json");
        let req = Req {
            body_len: body.len(),
            events: if json { Vec::new() } else { parse_events(&body) },
            json: if json {
                serde_json::from_slice(&body).unwrap()
            } else {
                serde_json::Value::Null
            },
            headers,
        };
        let index = {
            let mut seen = seen.lock().unwrap();
            seen.push(req.clone());
            seen.len() - 1
        };
        let mut reply = script(&req, index);
        loop {
            match reply {
                Reply::After(wait, then) => {
                    std::thread::sleep(wait);
                    reply = *then;
                }
                Reply::Events(headers, body) => {
                    let mut all = headers;
                    all.push(("Content-Type", "application/websocket-events".into()));
                    respond(&mut stream, 200, &all, &body);
                    break;
                }
                Reply::Status(status, headers, body) => {
                    respond(&mut stream, status, &headers, &body);
                    break;
                }
                // The stream's clones (the reader's, the list of open
                // connections) keep it open: shut it down to close it.
                Reply::Raw(bytes) => {
                    let _ = stream.write_all(&bytes);
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
                Reply::Stall(wait) => {
                    std::thread::sleep(wait);
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }
}

fn respond(stream: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8]) {
    let mut out = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    let _ = stream.write_all(&bytes);
}

/// The test's own reading of an event list (independent of sluice's).
fn parse_events(mut body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let end = body.windows(2).position(|w| w == b"\r\n").expect("CRLF");
        let line = std::str::from_utf8(&body[..end]).unwrap().to_string();
        body = &body[end + 2..];
        match line.split_once(' ') {
            None => out.push((line, Vec::new())),
            Some((kind, len)) => {
                let len = usize::from_str_radix(len, 16).unwrap();
                out.push((kind.to_string(), body[..len].to_vec()));
                assert_eq!(&body[len..len + 2], b"\r\n");
                body = &body[len + 2..];
            }
        }
    }
    out
}

fn event(kind: &str, content: &[u8]) -> Vec<u8> {
    let mut out = format!("{kind} {:x}\r\n", content.len()).into_bytes();
    out.extend_from_slice(content);
    out.extend_from_slice(b"\r\n");
    out
}

fn open_reply() -> Reply {
    Reply::Events(vec![], b"OPEN\r\n".to_vec())
}

fn write_config(name: &str, upstream: &str, extra: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("sluice-backend-{}-{name}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            r#"
[[route]]
path = "/app"
protocol = "backend"
upstream = "{upstream}"
{extra}
"#
        ),
    )
    .unwrap();
    path
}

fn start(driver: &str, upstream: &str, extra: &str, name: &str) -> Server {
    let config = write_config(&format!("{name}-{driver}"), upstream, extra);
    Server::start(driver, &["--config", config.to_str().unwrap()])
}

fn admin(server: &Server, request: &str) -> String {
    let mut s = TcpStream::connect(server.admin_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    all
}

/// Waits (bounded) for a metric to read `want`: the admin port's view of
/// a core is refreshed at its sweep ticks.
fn wait_metric(server: &Server, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = server.metric(name);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: {got}, not {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(raw: &mut Raw) -> String {
    let frame = raw.read_frame().expect("a frame");
    assert_eq!(frame.opcode, 1, "{frame:?}");
    String::from_utf8(frame.payload).unwrap()
}

// The handler shape: OPEN answered with a welcome, each message answered
// at once, the client's close forwarded with its code and reason.
both_drivers!(events_go_both_ways, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            let mut body = b"OPEN\r\n".to_vec();
            body.extend(event("TEXT", b"welcome"));
            return Reply::Events(vec![("Set-Meta-User", "ann".into())], body);
        }
        let mut body = Vec::new();
        for (kind, content) in &req.events {
            if kind == "TEXT" {
                let mut answer = b"echo:".to_vec();
                answer.extend_from_slice(content);
                body.extend(event("TEXT", &answer));
            }
            if kind == "BINARY" {
                body.extend(event("BINARY", content));
            }
        }
        Reply::Events(vec![], body)
    });
    let server = start(driver, &upstream.url(), "", "events");
    let mut raw = Raw::connect(server.addr);
    raw.send(
        upgrade_request(
            "/app?room=7",
            "X-Custom: yes\r\nCookie: c=1\r\nSec-WebSocket-Protocol: chat\r\nX-Forwarded-For: 6.6.6.6\r\n\
             Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nProxy-Foo: x\r\nMeta-User: forged\r\nGrip-Sig: x\r\n\
             Connection: X-Hop\r\nX-Hop: h\r\n",
        )
        .as_bytes(),
    );
    let head = raw.read_head();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(text(&mut raw), "welcome");
    raw.send_frame(0x81, b"hi");
    assert_eq!(text(&mut raw), "echo:hi");
    raw.send_frame(0x82, &[0, 1, 2]);
    let frame = raw.read_frame().unwrap();
    assert_eq!((frame.opcode, frame.payload), (2, vec![0, 1, 2]));
    // A ping goes to the backend too (and is answered by sluice).
    raw.send_frame(0x89, b"p1");
    assert_eq!(raw.read_frame().unwrap().opcode, 10);
    raw.send(&masked_frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']));
    assert_eq!(raw.expect_close(), Some(1000));
    let close = upstream.wait_for("CLOSE", Duration::from_secs(5));
    assert_eq!(close.events.last().unwrap().1, [0x03, 0xe8, b'b', b'y', b'e']);
    let requests = upstream.requests();
    let open = &requests[0];
    let id = open.header("Connection-Id").unwrap().to_string();
    assert_eq!(open.header("Content-Type"), Some("application/websocket-events"));
    assert_eq!(open.header("Accept"), Some("application/websocket-events"));
    assert_eq!(open.header("X-Custom"), Some("yes"));
    assert_eq!(open.header("Cookie"), Some("c=1"));
    assert_eq!(open.header("Sec-WebSocket-Protocol"), Some("chat"));
    assert_eq!(open.header("X-Forwarded-For"), Some("127.0.0.1"));
    assert_eq!(open.header("Upgrade"), None);
    for forged in ["Forwarded", "X-Real-IP", "Proxy-Foo", "Grip-Sig", "X-Hop"] {
        assert_eq!(open.header(forged), None, "{forged}");
    }
    assert_eq!(open.header("Connection"), None);
    assert_eq!(open.header("Meta-User"), None);
    for r in &requests[1..] {
        assert_eq!(r.header("Connection-Id"), Some(id.as_str()));
        assert_eq!(r.header("Meta-User"), Some("ann"), "{r:?}");
    }
    let kinds: Vec<String> = upstream.events().into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["OPEN", "TEXT", "BINARY", "PING", "CLOSE"]);
});

// The backend's refusal is the client's answer; an unreachable upstream
// is 502, a stalled one 504.
both_drivers!(open_refused_unreachable_or_stalled, |driver| {
    let upstream = Upstream::start(|req, _| match req.header("X-Mode") {
        Some("deny") => Reply::Status(403, vec![("Content-Type", "text/plain".into())], b"not you".to_vec()),
        Some("stall") => Reply::Stall(Duration::from_secs(5)),
        Some("bad") => Reply::Events(vec![], b"TEXT 5\r\nhel".to_vec()),
        Some("no-open") => Reply::Events(vec![], event("TEXT", b"x")),
        _ => open_reply(),
    });
    let server = start(driver, &upstream.url(), "upstream_timeout_ms = 500", "refused");
    let answer = |mode: &str| {
        let mut raw = Raw::connect(server.addr);
        raw.send(upgrade_request("/app", &format!("X-Mode: {mode}\r\n")).as_bytes());
        raw.read_to_end()
    };
    let denied = answer("deny");
    assert!(denied.starts_with("HTTP/1.1 403 "), "{denied}");
    assert!(denied.ends_with("not you"), "{denied}");
    let started = Instant::now();
    let stalled = answer("stall");
    assert!(stalled.starts_with("HTTP/1.1 504 "), "{stalled}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(answer("bad").starts_with("HTTP/1.1 502 "));
    assert!(answer("no-open").starts_with("HTTP/1.1 502 "));
    assert!(answer("ok").starts_with("HTTP/1.1 101 "));
    drop(upstream);
    // Nothing listens there any more.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/app", closed.local_addr().unwrap());
    drop(closed);
    let server = start(driver, &url, "", "unreachable");
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request("/app", "").as_bytes());
    let answer = raw.read_to_end();
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
});

fn post(server: &Server, path: &str, body: &str) -> String {
    admin(
        server,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn grip_open(extra_events: &[&[u8]]) -> Reply {
    let mut body = b"OPEN\r\n".to_vec();
    for e in extra_events {
        body.extend(event("TEXT", e));
    }
    Reply::Events(vec![("Sec-WebSocket-Extensions", "grip".into())], body)
}

// GRIP mode: `c:` control messages subscribe the connection to a topic
// that the admin API (or any publisher) then reaches; `m:` messages go
// out without their prefix, others are dropped. The admin API pushes to
// and inspects the connection by its Connection-Id, under both names.
both_drivers!(grip_control_and_the_admin_api, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            return grip_open(&[br#"c:{"type":"subscribe","channel":"news"}"#, b"m:hello", b"no prefix"]);
        }
        Reply::Events(vec![], Vec::new())
    });
    let server = start(driver, &upstream.url(), "", "grip");
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request("/app", "").as_bytes());
    let head = raw.read_head();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(!head.to_ascii_lowercase().contains("grip"), "{head}");
    assert_eq!(text(&mut raw), "hello");
    let answer = post(&server, "/publish?topic=news", "breaking");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(text(&mut raw), "breaking");
    let id = upstream.requests()[0].header("Connection-Id").unwrap().to_string();
    let answer = post(&server, &format!("/connections/{id}/send"), "pushed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(text(&mut raw), "pushed");
    for prefix in ["sessions", "connections"] {
        let info = admin(
            &server,
            &format!("GET /{prefix}/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        );
        assert!(info.starts_with("HTTP/1.1 200"), "{info}");
        let json: serde_json::Value = serde_json::from_str(info.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["session"], id.as_str());
        assert_eq!(json["route"], "/app");
        assert_eq!(json["protocol"], "backend");
        assert!(json["connected_at_ms"].as_u64().unwrap() > 1_700_000_000_000, "{json}");
        assert!(json["last_activity_ms"].as_u64().unwrap() >= json["connected_at_ms"].as_u64().unwrap());
        assert!(json["user"].is_null() && json["node"].is_null(), "{json}");
    }
    let gone = admin(
        &server,
        "GET /connections/0.99.1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(gone.starts_with("HTTP/1.1 404"), "{gone}");
    wait_metric(&server, "sluice_backend_dropped_total", 1);
    let answer = admin(
        &server,
        &format!("DELETE /connections/{id}?code=4000 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(raw.expect_close(), Some(4000));
    raw.send(&masked_frame(0x88, &[0x0f, 0xa0]));
    let close = upstream.wait_for("CLOSE", Duration::from_secs(5));
    assert_eq!(close.events.last().unwrap().1, [0x0f, 0xa0]);
});

// A client that vanishes is a DISCONNECT; a backend's DISCONNECT drops the
// client without a close frame, its CLOSE closes with its code; `detach`
// ends the events but not the connection.
both_drivers!(disconnects_closes_and_detach, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            let mut at_open = b"OPEN\r\n".to_vec();
            at_open.extend(event("TEXT", b"hi"));
            return match req.header("X-Mode") {
                Some("detach") => grip_open(&[br#"c:{"type":"subscribe","channel":"d"}"#]),
                Some("close-at-open") => {
                    at_open.extend(event("CLOSE", &[0x0f, 0xa2]));
                    Reply::Events(vec![], at_open)
                }
                Some("drop-at-open") => {
                    at_open.extend_from_slice(b"DISCONNECT\r\n");
                    Reply::Events(vec![], at_open)
                }
                _ => grip_open(&[]),
            };
        }
        let first = req.events.first().map(|(_, c)| c.as_slice());
        match first {
            Some(b"close me") => Reply::Events(vec![], event("CLOSE", &[0x0f, 0xa1, b'g', b'o'])),
            Some(b"drop me") => Reply::Events(vec![], b"DISCONNECT\r\n".to_vec()),
            Some(b"detach me") => Reply::Events(vec![], event("TEXT", br#"c:{"type":"detach"}"#)),
            _ => Reply::Events(vec![], Vec::new()),
        }
    });
    let server = start(driver, &upstream.url(), "", "ends");
    // The client's TCP connection ends without a close.
    let raw = Raw::open(server.addr, "/app");
    drop(raw);
    upstream.wait_for("DISCONNECT", Duration::from_secs(5));
    // The backend closes with its code.
    let mut raw = Raw::open(server.addr, "/app");
    raw.send_frame(0x81, b"close me");
    let frame = raw.read_frame().unwrap();
    assert_eq!((frame.close_code(), &frame.payload[2..]), (Some(4001), &b"go"[..]));
    // The backend drops the client.
    let mut raw = Raw::open(server.addr, "/app");
    raw.send_frame(0x81, b"drop me");
    assert_eq!(raw.read_frame(), None, "no close frame");
    // A CLOSE or DISCONNECT in the OPEN answer comes after the 101 and the
    // messages before it; after our close, nothing more is sent.
    for (mode, close) in [("close-at-open", Some(4002)), ("drop-at-open", None)] {
        let mut raw = Raw::connect(server.addr);
        raw.send(upgrade_request("/app", &format!("X-Mode: {mode}\r\n")).as_bytes());
        assert!(raw.read_head().starts_with("HTTP/1.1 101"), "{mode}");
        assert_eq!(text(&mut raw), "hi", "{mode}");
        match close {
            Some(code) => {
                let frame = raw.read_frame().unwrap();
                assert_eq!(frame.close_code(), Some(code));
                raw.send(&masked_frame(0x88, &code.to_be_bytes()));
                assert_eq!(raw.read_frame(), None, "{mode}: nothing after the close");
            }
            None => assert_eq!(raw.read_frame(), None, "{mode}"),
        }
    }
    // Detached: events stop, deliveries go on.
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request("/app", "X-Mode: detach\r\n").as_bytes());
    assert!(raw.read_head().starts_with("HTTP/1.1 101"));
    raw.send_frame(0x81, b"detach me");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !upstream
        .requests()
        .iter()
        .any(|r| r.header("X-Mode") == Some("detach") && r.events.iter().any(|(k, c)| k == "CLOSE" && c.is_empty()))
    {
        assert!(Instant::now() < deadline, "{:?}", upstream.requests());
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = upstream.requests().len();
    raw.send_frame(0x81, b"unheard");
    assert!(post(&server, "/publish?topic=d", "still here").starts_with("HTTP/1.1 200"));
    assert_eq!(text(&mut raw), "still here");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(upstream.requests().len(), before);
});

// A backend slower than its client: the batch is bounded, the client is
// not read meanwhile, and every message arrives once, in order.
both_drivers!(back_pressure_keeps_order_and_bounds, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            return open_reply();
        }
        Reply::After(Duration::from_millis(100), Box::new(Reply::Events(vec![], Vec::new())))
    });
    let server = start(driver, &upstream.url(), "max_batch_bytes = 1000", "flow");
    let mut raw = Raw::open(server.addr, "/app");
    let count = 300;
    let mut all = Vec::new();
    for i in 0..count {
        all.extend(masked_frame(0x81, format!("{i:0>99}").as_bytes()));
    }
    raw.send(&all);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let texts: Vec<Vec<u8>> = upstream
            .events()
            .into_iter()
            .filter(|(k, _)| k == "TEXT")
            .map(|(_, c)| c)
            .collect();
        if texts.len() == count {
            for (i, t) in texts.iter().enumerate() {
                assert_eq!(t, format!("{i:0>99}").as_bytes());
            }
            break;
        }
        assert!(texts.len() < count, "duplicates");
        assert!(Instant::now() < deadline, "{} of {count}", texts.len());
        std::thread::sleep(Duration::from_millis(50));
    }
    let requests = upstream.requests();
    for r in &requests {
        assert!(r.content_bytes() <= 1000 + 99, "{}", r.content_bytes());
    }
    // Several requests carried batches of several messages.
    assert!(requests.len() > 3 && requests.len() < count, "{}", requests.len());
    // Empty messages fill a batch too: its events, framing and all, are
    // what is bounded.
    let empties = 3000;
    raw.send(&masked_frame(0x81, b"").repeat(empties));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = upstream
            .events()
            .iter()
            .filter(|(k, c)| k == "TEXT" && c.is_empty())
            .count();
        if seen == empties {
            break;
        }
        assert!(Instant::now() < deadline, "{seen} of {empties}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for r in upstream.requests() {
        // `TEXT 0\r\n\r\n` is 10 bytes: one more than the limit at most.
        assert!(r.body_len <= 1000 + 10 + 99, "{}", r.body_len);
    }
});

// Every way an upstream can fail a connection mid-session: the client is
// closed with 1014 (an answer that is not one) or 1011 (no answer).
both_drivers!(upstream_failures_mid_session, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            return open_reply();
        }
        match req.header("X-Mode").unwrap() {
            "500" => Reply::Status(500, vec![], b"oops".to_vec()),
            "cut" => Reply::Raw(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/websocket-events\r\nContent-Length: 100\r\n\r\nTEXT 5\r\nhe"
                    .to_vec(),
            ),
            "huge" => Reply::Raw(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/websocket-events\r\nContent-Length: 2000000000\r\n\r\nTEXT"
                    .to_vec(),
            ),
            "mid-head" => Reply::Raw(b"HTTP/1.1 200 OK\r\nContent-Ty".to_vec()),
            "silent" => Reply::Raw(Vec::new()),
            "malformed" => Reply::Events(vec![], b"TEXT 5\r\nhello!!".to_vec()),
            "not-events" => Reply::Status(200, vec![("Content-Type", "text/html".into())], b"<html>".to_vec()),
            "stall" => Reply::Stall(Duration::from_secs(3)),
            other => panic!("{other}"),
        }
    });
    let server = start(driver, &upstream.url(), "upstream_timeout_ms = 500", "failures");
    for (mode, code) in [
        ("500", 1014),
        ("cut", 1014),
        ("huge", 1014),
        ("mid-head", 1011),
        ("silent", 1011),
        ("malformed", 1014),
        ("not-events", 1014),
        ("stall", 1011),
    ] {
        let mut raw = Raw::connect(server.addr);
        raw.send(upgrade_request("/app", &format!("X-Mode: {mode}\r\n")).as_bytes());
        assert!(raw.read_head().starts_with("HTTP/1.1 101"), "{mode}");
        raw.send_frame(0x81, b"hello");
        assert_eq!(raw.expect_close(), Some(code), "{mode}");
    }
    wait_metric(&server, "sluice_backend_failures_total", 8);
    // A request that may have reached the upstream is never sent again.
    let silent = upstream
        .requests()
        .iter()
        .filter(|r| r.header("X-Mode") == Some("silent") && r.has("TEXT"))
        .count();
    assert_eq!(silent, 1);
});

// An upstream that stops taking connections mid-session: each request is
// tried again, with backoff, a bounded number of times, then 1011.
both_drivers!(unreachable_upstream_is_retried_then_closes, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            return open_reply();
        }
        Reply::Events(vec![], Vec::new())
    });
    let server = start(driver, &upstream.url(), "upstream_retries = 2", "retries");
    let mut raw = Raw::open(server.addr, "/app");
    drop(upstream);
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    raw.send_frame(0x81, b"anyone?");
    raw.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(raw.expect_close(), Some(1011));
    // Two waits of 0.5-0.75 s and 1-1.5 s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(6),
        "{took:?}"
    );
    wait_metric(&server, "sluice_backend_retries_total", 2);
});

fn hook_answer(value: serde_json::Value) -> Reply {
    Reply::Status(
        200,
        vec![("Content-Type", "application/json".into())],
        value.to_string().into_bytes(),
    )
}

fn hooked_server(driver: &str, hooks: &Upstream, name: &str) -> Server {
    let path = std::env::temp_dir().join(format!("sluice-hooks-{}-{name}-{driver}.toml", std::process::id()));
    let url = |hook: &str| format!("http://{}/{hook}", hooks.addr);
    std::fs::write(
        &path,
        format!(
            r#"
[[route]]
path = "/ws"
protocol = "pubsub"
connect_hook = "{}"
subscribe_hook = "{}"
publish_hook = "{}"
hook_timeout_ms = 500

[[route]]
path = "/stomp"
protocol = "stomp"
subscribe_hook = "{}"
publish_hook = "{}"
hook_timeout_ms = 500
"#,
            url("connect"),
            url("subscribe"),
            url("publish"),
            url("subscribe"),
            url("publish"),
        ),
    )
    .unwrap();
    Server::start(driver, &["--config", path.to_str().unwrap()])
}

/// The hooks' application: decides by the request's fields.
fn hook_app() -> Upstream {
    Upstream::start(|req, _| {
        let j = &req.json;
        if j.get("headers").is_some() {
            // Connect.
            return match j["headers"]["x-token"].as_str() {
                Some("ann") => hook_answer(serde_json::json!({"result": {
                    "user": "ann",
                    "sluice": {"subscribe": ["news.*", "slow", "secret", "edit"], "publish": ["news.*", "edit", "shh"]},
                    "subscriptions": ["news.welcome"],
                }})),
                Some("stall") => Reply::Stall(Duration::from_secs(3)),
                Some("junk") => Reply::Status(200, vec![], b"not json".to_vec()),
                _ => hook_answer(serde_json::json!({"error": {"status": 401, "message": "who are you"}})),
            };
        }
        let topic = j["topic"].as_str().unwrap();
        match (topic, j.get("payload").is_some()) {
            ("secret", false) => hook_answer(serde_json::json!({"error": {"message": "no"}})),
            ("slow", false) => Reply::Stall(Duration::from_secs(3)),
            ("edit", true) => hook_answer(serde_json::json!({"result": {"payload": "edited"}})),
            ("shh", true) => hook_answer(serde_json::json!({"error": {"message": "hush"}})),
            _ => hook_answer(serde_json::json!({"result": {}})),
        }
    })
}

fn connect_with(server: &Server, path: &str, token: &str) -> (Raw, String) {
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request(path, &format!("X-Token: {token}\r\n")).as_bytes());
    let head = raw.read_head();
    (raw, head)
}

// The connect hook decides the handshake, the user, the grants and the
// first subscriptions; its failures are 502 and 504.
both_drivers!(connect_hook, |driver| {
    let hooks = hook_app();
    let server = hooked_server(driver, &hooks, "connect");
    let (mut raw, head) = connect_with(&server, "/ws", "ann");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let hello = text(&mut raw);
    let id = hello.strip_prefix("HELLO ").unwrap();
    let connect = hooks
        .requests()
        .into_iter()
        .find(|r| r.json.get("headers").is_some())
        .unwrap();
    assert_eq!(connect.json["route"], "/ws");
    assert_eq!(connect.json["protocol"], "pubsub");
    assert_eq!(connect.json["remote_addr"], "127.0.0.1");
    assert_eq!(connect.json["headers"]["x-token"], "ann");
    assert!(connect.json["session"].is_string());
    // Subscribed by the hook: a publish reaches it.
    assert!(post(&server, "/publish?topic=news.welcome", "hi").starts_with("HTTP/1.1 200"));
    assert_eq!(text(&mut raw), "MSG news.welcome hi");
    // The hook's grants: other topics are denied before any hook is asked.
    raw.send_frame(0x81, b"SUB other");
    assert_eq!(text(&mut raw), "ERR denied other");
    let info = admin(
        &server,
        &format!("GET /sessions/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    );
    assert!(info.contains("\"user\":\"ann\""), "{info}");
    let (mut raw, head) = connect_with(&server, "/ws", "bob");
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(raw.read_to_end().contains("who are you"));
    let (_, head) = connect_with(&server, "/ws", "stall");
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    let (_, head) = connect_with(&server, "/ws", "junk");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
});

// Subscribe and publish hooks allow, deny, replace, and time out; the
// connection waits for each verdict, so its frames keep their order.
both_drivers!(subscribe_and_publish_hooks, |driver| {
    let hooks = hook_app();
    let server = hooked_server(driver, &hooks, "subpub");
    let (mut raw, head) = connect_with(&server, "/ws", "ann");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    text(&mut raw);
    raw.send_frame(0x81, b"SUB secret");
    assert_eq!(text(&mut raw), "ERR denied secret");
    // A stalled hook: the SUB waits its timeout, the PUB behind it waits
    // for the SUB.
    let started = Instant::now();
    raw.send_frame(0x81, b"SUB slow");
    raw.send_frame(0x81, b"SUB edit");
    raw.send_frame(0x81, b"PUB edit original");
    raw.send_frame(0x81, b"PUB shh quiet");
    assert_eq!(text(&mut raw), "ERR unavailable slow");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(text(&mut raw), "MSG edit edited");
    assert_eq!(text(&mut raw), "ERR denied shh");
    let publish = hooks
        .requests()
        .into_iter()
        .find(|r| r.json["topic"] == "edit" && r.json.get("payload").is_some())
        .unwrap();
    assert_eq!(publish.json["payload"], "original");
    assert_eq!(publish.json["user"], "ann");
    wait_metric(&server, "sluice_hook_failures_total", 1);
    // STOMP: a denied SUBSCRIBE is an ERROR; a SEND's payload replaced.
    let mut stomp = Raw::connect(server.addr);
    stomp.send(upgrade_request("/stomp", "Sec-WebSocket-Protocol: v12.stomp\r\n").as_bytes());
    assert!(stomp.read_head().starts_with("HTTP/1.1 101"));
    stomp.send_frame(0x81, b"CONNECT\naccept-version:1.2\nhost:x\n\n\0");
    assert!(text(&mut stomp).starts_with("CONNECTED"));
    stomp.send_frame(0x81, b"SUBSCRIBE\nid:1\ndestination:/topic/edit\n\n\0");
    stomp.send_frame(0x81, b"SEND\ndestination:/topic/edit\n\noriginal\0");
    let message = text(&mut stomp);
    assert!(
        message.starts_with("MESSAGE") && message.ends_with("\n\nedited\0"),
        "{message}"
    );
    stomp.send_frame(0x81, b"SUBSCRIBE\nid:2\ndestination:/topic/secret\n\n\0");
    let error = text(&mut stomp);
    assert!(error.starts_with("ERROR") && error.contains("no"), "{error}");
});

// `Keep-Alive-Interval` (raised to its 20 s floor): an empty request when
// none went for that long. `c:set-meta` sets what later requests carry.
both_drivers!(keep_alive_interval_and_set_meta, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            let mut body = b"OPEN\r\n".to_vec();
            body.extend(event("TEXT", br#"c:{"type":"set-meta","name":"Room","value":"7"}"#));
            return Reply::Events(
                vec![
                    ("Keep-Alive-Interval", "1".into()),
                    ("Sec-WebSocket-Extensions", "grip".into()),
                    ("Set-Meta-User", "ann".into()),
                ],
                body,
            );
        }
        Reply::Events(vec![("Set-Meta-User", String::new())], Vec::new())
    });
    let server = start(driver, &upstream.url(), "", "keepalive");
    let mut raw = Raw::open(server.addr, "/app");
    raw.send_frame(0x81, b"one");
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.requests().len() < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = &upstream.requests()[1];
    assert_eq!(second.header("Meta-Room"), Some("7"));
    assert_eq!(second.header("Meta-User"), Some("ann"));
    let sent = Instant::now();
    // Nothing for 20 s: a request with no events.
    let deadline = Instant::now() + Duration::from_secs(25);
    while upstream.requests().len() < 3 {
        assert!(Instant::now() < deadline, "no keep-alive request");
        std::thread::sleep(Duration::from_millis(50));
    }
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_secs(19) && waited < Duration::from_secs(22),
        "{waited:?}"
    );
    let third = &upstream.requests()[2];
    assert!(third.events.is_empty(), "{third:?}");
    // The empty Set-Meta-User cleared it.
    assert_eq!(third.header("Meta-User"), None);
    assert_eq!(third.header("Meta-Room"), Some("7"));
    drop(raw);
});

// A shutdown with kept-alive upstream connections (and then with a request
// in flight too) and clients open: 1001 to every client, and a clean exit.
both_drivers!(shutdown_with_upstream_connections_is_clean, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            return open_reply();
        }
        if req.events.iter().any(|(_, c)| c == b"slow") {
            return Reply::After(Duration::from_secs(2), Box::new(Reply::Events(vec![], Vec::new())));
        }
        Reply::Events(vec![], event("TEXT", b"ok"))
    });
    let config = write_config(&format!("shutdown-{driver}"), &upstream.url(), "");
    for in_flight in [false, true] {
        // One worker: its shard is dropped when it ends (the case that once
        // woke a pooled connection's task after its runtime was gone).
        let mut server = Server::start(driver, &["--config", config.to_str().unwrap(), "--workers", "1"]);
        let mut clients: Vec<Raw> = (0..4).map(|_| Raw::open(server.addr, "/app")).collect();
        for raw in &mut clients {
            raw.send_frame(0x81, b"hi");
            assert_eq!(text(raw), "ok");
        }
        if in_flight {
            clients[0].send_frame(0x81, b"slow");
            std::thread::sleep(Duration::from_millis(200));
        } else {
            // Every client gone and its CLOSE delivered: only idle pooled
            // connections are left.
            let closes = upstream.events().iter().filter(|(k, _)| k == "CLOSE").count();
            for raw in &mut clients {
                raw.send(&masked_frame(0x88, &[0x03, 0xe8]));
                assert_eq!(raw.expect_close(), Some(1000));
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while upstream.events().iter().filter(|(k, _)| k == "CLOSE").count() < closes + 4 {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(100));
            clients.clear();
        }
        let status = server.terminate();
        assert!(status.success(), "{in_flight}: {status:?}\n{}", server.log());
        assert!(!server.log().contains("panicked"), "{}", server.log());
        for raw in &mut clients {
            assert_eq!(raw.expect_close(), Some(1001));
        }
    }
});

// The bounds of a backend route, at the bound: a refusal's body relayed
// up to 100,000 bytes; an answer of 1,000,000 bytes taken, one more
// refused (1014).
both_drivers!(relayed_bodies_and_answers_at_their_limits, |driver| {
    fn events_of_length(total: usize) -> Vec<u8> {
        // 988 events of 1,012 bytes, then one that makes up the rest.
        let mut body = Vec::new();
        for _ in 0..988 {
            body.extend(event("TEXT", &[b'a'; 1000]));
        }
        let rest = total - body.len();
        // `TEXT <2 hex digits>\r\n<content>\r\n`: 11 bytes of framing.
        body.extend(event("TEXT", &vec![b'b'; rest - 11]));
        assert_eq!(body.len(), total);
        body
    }
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            return match req.header("X-Mode") {
                Some("deny") => Reply::Status(403, vec![], vec![b'x'; 100_001]),
                _ => open_reply(),
            };
        }
        match req.header("X-Mode") {
            Some("exact") => Reply::Events(vec![], events_of_length(1_000_000)),
            _ => Reply::Events(vec![], events_of_length(1_000_001)),
        }
    });
    // With messages of at most 64 KiB, an answer's bound is 1,000,000.
    let config = write_config(&format!("limits-{driver}"), &upstream.url(), "");
    let server = Server::start(
        driver,
        &["--config", config.to_str().unwrap(), "--max-message-bytes", "65536"],
    );
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request("/app", "X-Mode: deny\r\n").as_bytes());
    let answer = raw.read_to_end();
    assert!(answer.starts_with("HTTP/1.1 403"), "{}", &answer[..40]);
    assert!(answer.contains("\r\nContent-Length: 100000\r\n"));
    assert_eq!(answer.split("\r\n\r\n").nth(1).unwrap().len(), 100_000);
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request("/app", "X-Mode: exact\r\n").as_bytes());
    assert!(raw.read_head().starts_with("HTTP/1.1 101"));
    raw.send_frame(0x81, b"go");
    for i in 0..989 {
        let frame = raw.read_frame().unwrap();
        assert_eq!(frame.opcode, 1, "message {i}");
    }
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request("/app", "X-Mode: over\r\n").as_bytes());
    assert!(raw.read_head().starts_with("HTTP/1.1 101"));
    raw.send_frame(0x81, b"go");
    assert_eq!(raw.expect_close(), Some(1014));
});

// A core opens at most 64 connections to one upstream: 150 handshakes
// at once, with the upstream slow to answer, all get their 101 over at
// most 128 connections (two workers).
both_drivers!(upstream_connections_are_capped_per_core, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            return Reply::After(Duration::from_millis(300), Box::new(open_reply()));
        }
        Reply::Events(vec![], Vec::new())
    });
    let server = start(driver, &upstream.url(), "", "cap");
    let mut clients: Vec<Raw> = (0..150)
        .map(|_| {
            let mut raw = Raw::connect(server.addr);
            raw.send(upgrade_request("/app", "").as_bytes());
            raw
        })
        .collect();
    for raw in &mut clients {
        let head = raw.read_head();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
    let opened = upstream.conns.lock().unwrap().len();
    assert!((2..=128).contains(&opened), "{opened} upstream connections");
});

// A frame that would need more than 64 hook calls (a STOMP COMMIT of 65
// SENDs) is denied without one; 64 are asked about, each.
both_drivers!(hook_calls_per_frame_are_bounded, |driver| {
    let hooks = hook_app();
    let server = hooked_server(driver, &hooks, "asks");
    for (sends, allowed) in [(64, true), (65, false)] {
        let before = hooks.requests().len();
        let mut stomp = Raw::connect(server.addr);
        stomp.send(upgrade_request("/stomp", "Sec-WebSocket-Protocol: v12.stomp\r\n").as_bytes());
        assert!(stomp.read_head().starts_with("HTTP/1.1 101"));
        stomp.send_frame(0x81, b"CONNECT\naccept-version:1.2\nhost:x\n\n\0");
        assert!(text(&mut stomp).starts_with("CONNECTED"));
        stomp.send_frame(0x81, b"BEGIN\ntransaction:t\n\n\0");
        for _ in 0..sends {
            stomp.send_frame(0x81, b"SEND\ndestination:/topic/news.x\ntransaction:t\n\nm\0");
        }
        stomp.send_frame(0x81, b"COMMIT\ntransaction:t\nreceipt:done\n\n\0");
        let answer = text(&mut stomp);
        if allowed {
            assert!(answer.starts_with("RECEIPT"), "{answer}");
            assert_eq!(hooks.requests().len() - before, sends);
        } else {
            assert!(
                answer.starts_with("ERROR") && answer.contains("More than 64"),
                "{answer}"
            );
            assert_eq!(hooks.requests().len(), before);
        }
    }
});

// permessage-deflate on a backend route: the upstream sees messages as
// the client meant them, and its answers reach the client compressed
// where worth it (RFC 7692 6: per message). The upstream's own
// Sec-WebSocket-Extensions is not relayed: sluice agrees on its own.
both_drivers!(compressed_messages_cross_a_backend_route, |driver| {
    let upstream = Upstream::start(|req, _| {
        if req.has("OPEN") {
            let mut body = b"OPEN\r\n".to_vec();
            body.extend(event("TEXT", b"welcome"));
            return Reply::Events(vec![("Sec-WebSocket-Extensions", "x-upstream".into())], body);
        }
        let mut body = Vec::new();
        for (kind, content) in &req.events {
            if kind == "TEXT" {
                body.extend(event("TEXT", &[&b"echo:"[..], content].concat()));
            }
        }
        Reply::Events(vec![], body)
    });
    let server = start(driver, &upstream.url(), "", "deflate");
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request("/app", "Sec-WebSocket-Extensions: permessage-deflate\r\n").as_bytes());
    let head = raw.read_head();
    assert!(
        head.contains(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
        ),
        "{head}"
    );
    assert!(!head.contains("x-upstream"), "{head}");
    // Short: as it is.
    let welcome = raw.read_frame().unwrap();
    assert_eq!((welcome.rsv1, &welcome.payload[..]), (false, &b"welcome"[..]));
    let message = "{\"say\":\"hello\"}".repeat(70);
    let mut packed = Vec::new();
    sluice::ws::deflate::Deflater::new(6, 15).compress(message.as_bytes(), &mut packed, false);
    raw.send_frame(0xC1, &packed);
    let answer = raw.read_frame().unwrap();
    assert!(
        answer.rsv1 && answer.payload.len() < message.len() / 4,
        "{}",
        answer.payload.len()
    );
    let mut plain = Vec::new();
    sluice::ws::deflate::Inflater::default()
        .inflate(&answer.payload, &mut plain, 1 << 20, false)
        .unwrap();
    assert_eq!(plain, format!("echo:{message}").as_bytes());
    let seen = upstream.wait_for("TEXT", Duration::from_secs(5));
    assert_eq!(
        seen.events.iter().find(|(k, _)| k == "TEXT").unwrap().1,
        message.as_bytes()
    );
});
