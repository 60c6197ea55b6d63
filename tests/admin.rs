//! The admin HTTP API (publish, metrics, stats, sessions, token), with real
//! WebSocket clients on both workers, under both I/O drivers.

mod common;

use common::{tokio_rt, Server};
use futures_util::{SinkExt, StreamExt};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

const SETTLE: Duration = Duration::from_millis(300);

/// A keep-alive HTTP/1.1 client, deliberately minimal.
struct Http {
    stream: TcpStream,
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Http { stream }
    }

    /// Sends one request; returns the status and body.
    fn request(&mut self, method: &str, target: &str, headers: &str, body: &[u8]) -> (u16, String) {
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n{headers}\r\n",
            body.len()
        );
        self.stream.write_all(head.as_bytes()).unwrap();
        self.stream.write_all(body).unwrap();
        self.response()
    }

    /// The server ended the connection (reads end of stream).
    fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }

    fn response(&mut self) -> (u16, String) {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(self.stream.read(&mut b).unwrap(), 1, "connection closed mid-response");
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let status = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }
}

async fn connect(url: &str) -> (Ws, String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = next_text(&mut ws).await;
    let id = hello.strip_prefix("HELLO ").unwrap().to_string();
    (ws, id)
}

async fn next_text(ws: &mut Ws) -> String {
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Clients until one has landed on each of the two cores.
async fn one_per_core(url: &str) -> [(Ws, String); 2] {
    let mut slots: [Option<(Ws, String)>; 2] = [None, None];
    for _ in 0..200 {
        let (ws, id) = connect(url).await;
        let core: usize = id.split('.').next().unwrap().parse().unwrap();
        if slots[core].is_none() {
            slots[core] = Some((ws, id));
        }
        if slots.iter().all(Option::is_some) {
            return slots.map(Option::unwrap);
        }
    }
    panic!("connections did not land on both cores");
}

both_drivers!(http_publish_reaches_every_core_in_order, |driver| {
    let server = Server::start(driver, &[]);
    let admin = server.admin_addr();
    let url = server.url("/ws");
    tokio_rt().block_on(async {
        let mut subs = one_per_core(&url).await;
        for (ws, _) in &mut subs {
            ws.send(Message::Text("SUB news".into())).await.unwrap();
        }
        tokio::time::sleep(SETTLE).await;
        let mut http = Http::connect(admin);
        // Keep-alive: many requests on one connection, in order.
        for i in 0..50 {
            let (status, body) = http.request("POST", "/publish?topic=news", "", format!("n{i}").as_bytes());
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"cores\":2"), "{body}");
        }
        let batch = r#"{"messages":[{"topic":"news","payload":"b0"},{"topic":"news","payload_base64":"AAH/"}]}"#;
        let (status, body) = http.request(
            "POST",
            "/publish",
            "Content-Type: application/json\r\n",
            batch.as_bytes(),
        );
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"published\":2"), "{body}");
        for (ws, _) in &mut subs {
            for i in 0..50 {
                assert_eq!(next_text(ws).await, format!("MSG news n{i}"));
            }
            assert_eq!(next_text(ws).await, "MSG news b0");
            let bin = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            assert_eq!(
                bin.unwrap().unwrap().unwrap(),
                Message::Binary(b"MSG news \x00\x01\xff".to_vec())
            );
        }
    });
});

both_drivers!(http_errors_are_precise, |driver| {
    let server = Server::start(driver, &["--max-message-bytes", "1000"]);
    let mut http = Http::connect(server.admin_addr());
    // What the head alone decides (endpoint, method, the body's length)
    // is answered before the body is read, and ends the connection; what
    // the body decides keeps it.
    for (method, target, body, status, closes) in [
        ("POST", "/publish?topic=bad!", &b"x"[..], 400, false),
        ("POST", "/publish?topic=t", &[0xff, 0xfe][..], 400, false),
        ("POST", "/publish", b"{\"messages\":[{\"topic\":\"t\"}]}", 400, false),
        ("POST", "/publish", b"not json", 400, false),
        // A delivery is `MSG t <payload>`: 6 bytes more than the payload.
        ("POST", "/publish?topic=t", &[b'a'; 995][..], 413, false),
        ("POST", "/publish?topic=t", &[b'a'; 994][..], 200, false),
        ("POST", "/sessions/0.1.1/send", b"hi", 404, false),
        ("DELETE", "/sessions/9.1.1", b"", 404, false),
        ("DELETE", "/sessions/0.1.1?code=1006", b"", 400, false),
        // An even generation names no session.
        ("DELETE", "/sessions/0.1.2", b"", 404, false),
        ("GET", "/healthz", b"", 200, false),
        ("GET", "/publish", b"", 405, true),
        ("GET", "/nowhere", b"", 404, true),
        ("DELETE", "/sessions/x/y", b"", 404, true),
        ("PUT", "/sessions/0.1.1", b"", 405, true),
        ("POST", "/sessions/0.1.1/send", &[b'a'; 1001][..], 413, true),
        ("GET", "/stats", b"x", 413, true),
    ] {
        let (got, body) = http.request(method, target, "", body);
        assert_eq!(got, status, "{method} {target}: {body}");
        if closes {
            assert!(http.is_closed(), "{method} {target}: the connection stays open");
            http = Http::connect(server.admin_addr());
        }
    }
    // A body over twice the message limit is refused from its length alone.
    let (got, _) = http.request("POST", "/publish?topic=t", "", &[b'a'; 70_000]);
    assert_eq!(got, 413);
    // Garbage is a 400 and the end of that connection.
    let mut raw = TcpStream::connect(server.admin_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(b"\x01\x02\x03 nonsense\r\n\r\n").unwrap();
    let mut all = String::new();
    raw.read_to_string(&mut all).unwrap();
    assert!(all.starts_with("HTTP/1.1 400 "), "{all}");
    // So are lengths that differ (RFC 9112 6.3): the rest of the body is
    // not taken for a second request.
    let mut raw = TcpStream::connect(server.admin_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(
        b"POST /publish?topic=t HTTP/1.1\r\nContent-Length: 60\r\nContent-Length: 2\r\n\r\nhiGET /stats HTTP/1.1\r\n\r\n",
    )
    .unwrap();
    let mut all = String::new();
    raw.read_to_string(&mut all).unwrap();
    assert!(all.starts_with("HTTP/1.1 400 "), "{all}");
    assert_eq!(all.matches("HTTP/1.1").count(), 1, "{all}");
});

both_drivers!(token_guards_everything_but_health_and_metrics, |driver| {
    let server = Server::start(driver, &["--admin-token", "s3cret-token"]);
    let admin = server.admin_addr();
    // Refused from the head, whatever the path (nothing is told of the
    // endpoints), and the connection ends.
    for (method, target, headers) in [
        ("GET", "/stats", ""),
        ("POST", "/publish?topic=t", ""),
        ("GET", "/stats", "Authorization: Bearer wrong\r\n"),
        ("GET", "/nowhere", ""),
    ] {
        let mut http = Http::connect(admin);
        assert_eq!(http.request(method, target, headers, b"x").0, 401, "{method} {target}");
        assert!(http.is_closed());
    }
    let mut http = Http::connect(admin);
    assert_eq!(
        http.request("GET", "/stats", "Authorization: Bearer s3cret-token\r\n", b"")
            .0,
        200
    );
    assert_eq!(http.request("GET", "/healthz", "", b"").0, 200);
    // The console's page is the login: it holds no data, and what it asks
    // for needs the token.
    let (status, page) = http.request("GET", "/", "", b"");
    assert_eq!(status, 200);
    assert!(page.contains("sluice console") && page.contains("Bearer "), "{page}");
    let mut guarded = Http::connect(admin);
    assert_eq!(guarded.request("GET", "/topics", "", b"").0, 401);
    let (status, metrics) = http.request("GET", "/metrics", "", b"");
    assert_eq!(status, 200);
    let driver_name = if driver == "uring" { "io_uring" } else { "epoll" };
    assert!(
        metrics.contains(&format!("sluice_info{{driver=\"{driver_name}\",workers=\"2\"}} 1")),
        "{metrics}"
    );
});

both_drivers!(pages_of_other_origins_are_refused, |driver| {
    let server = Server::start(driver, &[]);
    let admin = server.admin_addr();
    // A page of another site (CSRF): refused from the head, nothing done.
    // (`Http` says `Host: 127.0.0.1`.)
    for origin in [
        "https://evil.example",
        "null",
        "http://127.0.0.1.evil.example",
        "https://127.0.0.1",
    ] {
        let mut http = Http::connect(admin);
        let headers = format!("Origin: {origin}\r\nContent-Type: text/plain\r\n");
        let (status, body) = http.request("POST", "/publish?topic=news", &headers, b"forged");
        assert_eq!(status, 403, "{origin}: {body}");
        assert!(http.is_closed());
    }
    // The console's own requests carry its own origin; curl and backends none.
    let mut http = Http::connect(admin);
    assert_eq!(
        http.request("POST", "/publish?topic=news", "Origin: http://127.0.0.1\r\n", b"ok")
            .0,
        200
    );
    assert_eq!(http.request("POST", "/publish?topic=news", "", b"ok").0, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, stats) = http.request("GET", "/stats", "", b"");
        assert_eq!(status, 200);
        let publishes: u64 = serde_json::from_str::<serde_json::Value>(&stats).unwrap()["cores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["publishes"].as_u64().unwrap())
            .sum();
        if publishes == 2 {
            break;
        }
        assert!(publishes < 2 && Instant::now() < deadline, "{stats}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A page whose own name was made to resolve here (DNS rebinding) sends
    // its own Host and Origin: without a token, only an address is taken,
    // but for the open endpoints. With a token, the token decides.
    let answer = |admin: SocketAddr, head: &str| {
        let mut raw = TcpStream::connect(admin).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        raw.write_all(head.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = raw.read_to_string(&mut answer);
        answer
    };
    let rebound = "Host: evil.example:9090\r\nOrigin: http://evil.example:9090\r\n";
    for (method, target) in [("POST", "/publish?topic=news"), ("GET", "/stats"), ("GET", "/topics")] {
        let head = format!("{method} {target} HTTP/1.1\r\n{rebound}Content-Length: 1\r\n\r\nx");
        let got = answer(admin, &head);
        assert!(got.starts_with("HTTP/1.1 403 "), "{method} {target}: {got}");
    }
    for target in ["/healthz", "/metrics", "/"] {
        let head = format!("GET {target} HTTP/1.1\r\nHost: evil.example:9090\r\nConnection: close\r\n\r\n");
        let got = answer(admin, &head);
        assert!(got.starts_with("HTTP/1.1 200 "), "{target}: {got}");
    }
    let guarded = Server::start(driver, &["--admin-token", "t0ken"]);
    let head =
        "GET /stats HTTP/1.1\r\nHost: admin.example:9090\r\nAuthorization: Bearer t0ken\r\nConnection: close\r\n\r\n";
    let got = answer(guarded.admin_addr(), head);
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    // Behind a TLS proxy the console's origin is the proxy's: with a token,
    // the token decides, not the origin.
    let proxied = "POST /publish?topic=news HTTP/1.1\r\nHost: 127.0.0.1:9090\r\nOrigin: https://admin.example\r\nConnection: close\r\nContent-Length: 1\r\n";
    let got = answer(
        guarded.admin_addr(),
        &format!("{proxied}Authorization: Bearer t0ken\r\n\r\nx"),
    );
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    let got = answer(guarded.admin_addr(), &format!("{proxied}\r\nx"));
    assert!(got.starts_with("HTTP/1.1 401 "), "{got}");
});

both_drivers!(topics_are_counted_on_every_core, |driver| {
    let server = Server::start(driver, &[]);
    let mut http = Http::connect(server.admin_addr());
    let topics = |http: &mut Http, query: &str| {
        let (status, body) = http.request("GET", &format!("/topics{query}"), "", b"");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    // Subscriptions take effect without an answer, and a core answers
    // from what it gathered within the last second: asked until it says
    // what is expected, for a while.
    let topics_become = |http: &mut Http, query: &str, field: &str, expected: serde_json::Value| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = topics(http, query);
            let found = if field.is_empty() {
                now.clone()
            } else {
                now[field].clone()
            };
            if found == expected {
                return now;
            }
            assert!(Instant::now() < deadline, "{now} is not {expected}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(
        topics(&mut http, ""),
        serde_json::json!({"topics": [], "topics_total": 0, "subscriptions_total": 0})
    );
    tokio_rt().block_on(async {
        // Two subscribers of `news`, one on each core; `a.b` on one of
        // them; a STOMP queue on the other.
        let [(mut a, _), (mut b, _)] = one_per_core(&server.url("/ws")).await;
        a.send(Message::Text("SUB news".into())).await.unwrap();
        b.send(Message::Text("SUB news".into())).await.unwrap();
        b.send(Message::Text("SUB a.b".into())).await.unwrap();
        let (mut stomp, _) = tokio_tungstenite::connect_async(server.url("/stomp")).await.unwrap();
        stomp
            .send(Message::Text("CONNECT\naccept-version:1.2\nhost:x\n\n\0".into()))
            .await
            .unwrap();
        assert!(next_text(&mut stomp).await.starts_with("CONNECTED"));
        stomp
            .send(Message::Text("SUBSCRIBE\nid:0\ndestination:/queue/jobs\n\n\0".into()))
            .await
            .unwrap();
        topics_become(
            &mut http,
            "",
            "",
            serde_json::json!({
                "topics": [
                    {"topic": "news", "subscribers": 2},
                    {"topic": "a.b", "subscribers": 1},
                    {"topic": "jobs", "queue": true, "subscribers": 1},
                ],
                "topics_total": 3,
                "subscriptions_total": 4,
            }),
        );
        // `limit` keeps the first; the totals stay whole.
        let first = topics(&mut http, "?limit=1");
        assert_eq!(
            first["topics"],
            serde_json::json!([{"topic": "news", "subscribers": 2}])
        );
        assert_eq!(first["topics_total"], 3);
        // The bounds: 1 and 10,000 are taken.
        assert_eq!(topics(&mut http, "?limit=10000")["topics"].as_array().unwrap().len(), 3);
        for bad in ["0", "10001", "x", "-1", "+3", ""] {
            assert_eq!(
                http.request("GET", &format!("/topics?limit={bad}"), "", b"").0,
                400,
                "{bad}"
            );
        }
        // A subscriber that leaves is no longer counted; a topic without
        // any is gone.
        b.send(Message::Text("UNSUB a.b".into())).await.unwrap();
        drop(a);
        let now = topics_become(
            &mut http,
            "",
            "topics",
            serde_json::json!([
                {"topic": "jobs", "queue": true, "subscribers": 1},
                {"topic": "news", "subscribers": 1},
            ]),
        );
        assert_eq!(now["subscriptions_total"], 2);
    });
});

both_drivers!(metrics_and_stats_count_what_happened, |driver| {
    let server = Server::start(driver, &[]);
    let admin = server.admin_addr();
    let url = server.url("/ws");
    tokio_rt().block_on(async {
        let (mut a, _) = connect(&url).await;
        a.send(Message::Text("SUB m".into())).await.unwrap();
        tokio::time::sleep(SETTLE).await;
        let mut http = Http::connect(admin);
        for _ in 0..3 {
            assert_eq!(http.request("POST", "/publish?topic=m", "", b"x").0, 200);
        }
        for _ in 0..3 {
            next_text(&mut a).await;
        }
        // Snapshots are refreshed every sweep tick (100 ms).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, metrics) = http.request("GET", "/metrics", "", b"");
        assert!(metrics.contains("sluice_publishes_total 3\n"), "{metrics}");
        assert!(metrics.contains("sluice_deliveries_total 3\n"), "{metrics}");
        assert!(metrics.contains("sluice_connections 1\n"), "{metrics}");
        assert!(
            metrics.contains("sluice_mesh_ring_capacity{from=\"0\",to=\"1\"} 4096"),
            "{metrics}"
        );
        let (_, stats) = http.request("GET", "/stats", "", b"");
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        let publishes: u64 = stats["cores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["publishes"].as_u64().unwrap())
            .sum();
        assert_eq!(publishes, 3);
    });
});

both_drivers!(a_backend_answers_one_session_on_any_core, |driver| {
    let server = Server::start(driver, &[]);
    let admin = server.admin_addr();
    let url = server.url("/ws");
    tokio_rt().block_on(async {
        let mut clients = one_per_core(&url).await;
        // Whatever core the admin connection landed on, one of these is remote.
        let mut http = Http::connect(admin);
        for (ws, id) in &mut clients {
            let (status, body) = http.request("POST", &format!("/sessions/{id}/send"), "", b"just for you");
            assert_eq!(status, 200, "{body}");
            assert_eq!(next_text(ws).await, "just for you");
        }
        for (ws, id) in &mut clients {
            let (status, _) = http.request("DELETE", &format!("/sessions/{id}?code=4000&reason=bye+now"), "", b"");
            assert_eq!(status, 200);
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    assert_eq!((u16::from(f.code), f.reason.as_ref()), (4000, "bye now"));
                }
                other => panic!("expected close 4000, got {other:?}"),
            }
            let _ = ws.close(None).await;
        }
        tokio::time::sleep(SETTLE).await;
        for (_, id) in &clients {
            assert_eq!(
                http.request("POST", &format!("/sessions/{id}/send"), "", b"late").0,
                404
            );
        }
    });
});

/// Sends a request head (no body) and reads the response within `wait`:
/// the status, and whether the server then closed the connection.
fn head_only(admin: SocketAddr, head: &str, wait: Duration) -> (u16, bool) {
    let mut http = Http::connect(admin);
    http.stream.set_read_timeout(Some(wait)).unwrap();
    http.stream.write_all(head.as_bytes()).unwrap();
    let (status, _) = http.response();
    (status, http.is_closed())
}

both_drivers!(refusals_come_from_the_head_before_any_body, |driver| {
    // A body as large as the admin port takes (twice the 16 MiB message
    // limit), announced but never sent: each refusal comes at once, and
    // the server holds nothing of it.
    let server = Server::start(driver, &["--admin-token", "s3cret-token"]);
    let admin = server.admin_addr();
    let before = server.rss_kib();
    let big = 2 * 16 * 1024 * 1024;
    let auth = "Authorization: Bearer s3cret-token\r\n";
    for (head, status) in [
        (
            format!("POST /publish?topic=t HTTP/1.1\r\nContent-Length: {big}\r\n\r\n"),
            401,
        ),
        (
            format!("POST /publish?topic=t HTTP/1.1\r\nAuthorization: Bearer wrong\r\nContent-Length: {big}\r\n\r\n"),
            401,
        ),
        (
            format!("POST /nowhere HTTP/1.1\r\n{auth}Content-Length: {big}\r\n\r\n"),
            404,
        ),
        (
            format!("PUT /publish HTTP/1.1\r\n{auth}Content-Length: {big}\r\n\r\n"),
            405,
        ),
        (
            format!(
                "POST /publish?topic=t HTTP/1.1\r\n{auth}Content-Length: {}\r\n\r\n",
                big + 1
            ),
            413,
        ),
    ] {
        for _ in 0..8 {
            assert_eq!(
                head_only(admin, &head, Duration::from_secs(5)),
                (status, true),
                "{head}"
            );
        }
    }
    // Eight connections that announce the largest body and send half of it,
    // with a wrong token: none of it is kept.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(admin).unwrap();
                let head = format!("POST /publish?topic=t HTTP/1.1\r\nContent-Length: {big}\r\n\r\n");
                s.write_all(head.as_bytes()).unwrap();
                let chunk = vec![b'a'; 1 << 20];
                for _ in 0..16 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let grown_kib = server.rss_kib().saturating_sub(before);
    assert!(
        grown_kib < 8 * 1024 || common::sanitized(),
        "the server grew by {grown_kib} KiB"
    );
});

both_drivers!(a_request_head_has_a_deadline, |driver| {
    // One byte every 200 ms keeps the connection busy, but the head must
    // be whole within --handshake-timeout-ms of its first byte.
    let server = Server::start(driver, &["--handshake-timeout-ms", "1000"]);
    let mut s = TcpStream::connect(server.admin_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = std::time::Instant::now();
    let head = b"GET /stats HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_at = None;
    for b in head {
        let mut buf = [0u8; 64];
        match s.write_all(&[*b]).map(|()| s.read(&mut buf)) {
            Err(_) | Ok(Ok(0)) => {
                closed_at = Some(start.elapsed());
                break;
            }
            Ok(Ok(_)) => panic!("an answer to a head that never came whole"),
            // Nothing yet (the read timed out).
            Ok(Err(_)) => {}
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let closed_at = closed_at.expect("the head trickled in whole");
    assert!(
        closed_at >= Duration::from_millis(900) && closed_at < Duration::from_millis(2500),
        "closed after {closed_at:?}"
    );
});

both_drivers!(admin_connections_are_capped, |driver| {
    let server = Server::start(driver, &["--admin-max-connections", "4"]);
    let admin = server.admin_addr();
    // Four connections that sent one byte hold the four places.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(admin).unwrap();
            s.write_all(b"G").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let mut s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut all = String::new();
        let _ = s.read_to_string(&mut all);
        assert!(all.starts_with("HTTP/1.1 503 "), "{all:?}");
        assert!(all.contains("Retry-After: 1\r\n"), "{all}");
    }
    // The WebSocket port does not mind.
    let ws = common::Raw::open(server.addr, "/echo");
    drop(ws);
    // A place given back is taken again.
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.metric("sluice_refused_admin_connections_total"), 3);
});

both_drivers!(descriptors_kept_back_stay_free_under_floods, |driver| {
    // 256 open files in all. 300 admin connections that send one byte, and
    // 300 WebSocket connections that never send a head: the admin port
    // keeps to its cap and the WebSocket port to its share, so a health
    // check still answers on each, and a handshake succeeds once the idle
    // ones time out.
    let server = Server::start_limited(driver, &["--handshake-timeout-ms", "1500"], &[], Some(256));
    let admin = server.admin_addr();
    let admin_flood: Vec<TcpStream> = (0..300)
        .filter_map(|_| {
            let mut s = TcpStream::connect(admin).ok()?;
            let _ = s.write_all(b"G");
            Some(s)
        })
        .collect();
    let ws_flood: Vec<TcpStream> = (0..300).filter_map(|_| TcpStream::connect(server.addr).ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let log = server.log();
    assert!(!log.contains("Too many open files"), "{log}");
    drop(admin_flood);
    std::thread::sleep(Duration::from_millis(300));
    let mut http = Http::connect(admin);
    assert_eq!(http.request("GET", "/healthz", "", b"").0, 200);
    assert!(server.metric("sluice_refused_sockets_total") > 0);
    // The idle handshakes end at their timeout; then a handshake succeeds.
    std::thread::sleep(Duration::from_millis(1600));
    let ws = common::Raw::open(server.addr, "/echo");
    drop(ws);
    drop(ws_flood);
});

both_drivers!(admin_memory_is_flat_over_many_connections, |driver| {
    // One request per connection, as a health checker does: nothing of a
    // finished connection is kept.
    let server = Server::start(driver, &["--workers", "1"]);
    let admin = server.admin_addr();
    let one = || {
        let mut s = TcpStream::connect(admin).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        assert!(all.starts_with(b"HTTP/1.1 200 "));
    };
    for _ in 0..2_000 {
        one();
    }
    let before = server.rss_kib();
    let started = std::time::Instant::now();
    let mut n = 0;
    // Under a sanitizer RSS says nothing: the connections still run.
    let count = if common::sanitized() { 2_000 } else { 100_000 };
    while n < count && started.elapsed() < Duration::from_secs(40) {
        one();
        n += 1;
    }
    let grown_kib = server.rss_kib().saturating_sub(before);
    eprintln!("{n} connections in {:?}: grew {grown_kib} KiB", started.elapsed());
    if common::sanitized() {
        return;
    }
    assert!(n >= 20_000, "only {n} connections in the time");
    assert!(grown_kib < 1024, "{n} connections: the server grew by {grown_kib} KiB");
});

/// A response read until the server closes: (head, body).
fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all);
    let blank = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(&all)));
    (
        String::from_utf8_lossy(&all[..blank]).into_owned(),
        all[blank + 4..].to_vec(),
    )
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length")
}

/// A connection whose receive buffer is small, so that a server writing
/// to it and not being read fills it at once.
fn small_window(addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

/// Pipelines `n` `GET /metrics` (open without a token) and never reads.
fn pipeline_metrics_unread(stream: &mut TcpStream, n: usize) {
    let one = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut all = Vec::with_capacity(one.len() * n);
    for _ in 0..n {
        all.extend_from_slice(one);
    }
    stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server stops reading once its answers fill the windows; what it
    // did not take waits in the kernel (or the write times out): fine.
    let _ = stream.write_all(&all);
}

fn healthz(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

// The 503 at `--admin-max-connections` is whole: its Content-Length is
// its body's.
both_drivers!(the_503_at_the_cap_says_its_length, |driver| {
    let server = Server::start(driver, &["--admin-max-connections", "1", "--workers", "1"]);
    let admin = server.admin_addr();
    let _holder = TcpStream::connect(admin).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut refused = TcpStream::connect(admin).unwrap();
    refused.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (head, body) = read_response(&mut refused);
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert_eq!(
        content_length(&head),
        body.len(),
        "Content-Length vs body {:?}",
        String::from_utf8_lossy(&body)
    );
});

// A client that sends requests and never reads the answers (`/metrics`
// needs no token) gives its place back once a response has waited 10 s,
// so it cannot keep health checks at 503.
both_drivers!(a_client_that_stops_reading_loses_its_place, |driver| {
    let server = Server::start(driver, &["--admin-max-connections", "1", "--workers", "1"]);
    let admin = server.admin_addr();
    let mut stuck = small_window(admin);
    pipeline_metrics_unread(&mut stuck, 2000);
    // Past the 10 s a response may wait.
    std::thread::sleep(Duration::from_secs(12));
    let answer = healthz(admin);
    assert!(
        answer.starts_with("HTTP/1.1 200 "),
        "a client that stopped reading 12 s ago still holds the only admin place: {answer:?}"
    );
    drop(stuck);
});

// At SIGTERM, a connection stuck writing to a client that does not read
// ends at the drain's deadline: the shutdown takes no longer.
both_drivers!(a_client_that_stops_reading_does_not_hold_up_the_shutdown, |driver| {
    let mut server = Server::start(
        driver,
        &[
            "--admin-max-connections",
            "4",
            "--workers",
            "1",
            "--drain-timeout-ms",
            "500",
        ],
    );
    let admin = server.admin_addr();
    let mut stuck = small_window(admin);
    pipeline_metrics_unread(&mut stuck, 2000);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let status = server.terminate();
    let took = started.elapsed();
    eprintln!("exit {status:?} after {took:?}");
    assert_eq!(status.code(), Some(0));
    assert!(
        took < Duration::from_millis(1000),
        "SIGTERM with --drain-timeout-ms 500 took {took:?} (an admin connection stuck writing)\n{}",
        server.log()
    );
    drop(stuck);
});

// RFC 9110 9.3.2: a response to HEAD has no content, so the next
// response on a kept-alive connection starts right after its head.
both_drivers!(head_healthz_has_no_body, |driver| {
    let server = Server::start(driver, &["--workers", "1"]);
    let mut s = TcpStream::connect(server.admin_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all).into_owned();
    let first_end = text.find("\r\n\r\n").expect("a head") + 4;
    assert!(
        text[first_end..].starts_with("HTTP/1.1 200 "),
        "the HEAD answer carried content before the next response: {text:?}"
    );
});

// Out of descriptors, the admin port says so at most once a second, as
// the WebSocket port does (it said so for every failed accept: 1,174 lines
// in 6 s). A cap above what the open-files limit allows makes it happen.
both_drivers!(accept_failures_are_said_once_a_second, |driver| {
    let server = Server::start_limited(
        driver,
        &["--workers", "1", "--admin-max-connections", "100000"],
        &[],
        Some(128),
    );
    let admin = server.admin_addr();
    let started = Instant::now();
    let mut held = Vec::new();
    while started.elapsed() < Duration::from_secs(3) {
        if let Ok(mut s) = TcpStream::connect(admin) {
            let _ = s.write_all(b"G");
            held.push(s);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = server.log();
    let said = log.lines().filter(|l| l.contains("admin accept failed")).count();
    assert!((1..=5).contains(&said), "{said} lines in 3 s:\n{log}");
    drop(held);
});
