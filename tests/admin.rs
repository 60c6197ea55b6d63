//! The admin HTTP API (publish, metrics, stats, sessions, token), with real
//! WebSocket clients on both workers, under both I/O drivers.

mod common;

use common::{tokio_rt, Server};
use futures_util::{SinkExt, StreamExt};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
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
            "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n{headers}\r\n",
            body.len()
        );
        self.stream.write_all(head.as_bytes()).unwrap();
        self.stream.write_all(body).unwrap();
        self.response()
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
    for (method, target, body, status) in [
        ("POST", "/publish?topic=bad!", &b"x"[..], 400),
        ("POST", "/publish?topic=t", &[0xff, 0xfe][..], 400),
        ("POST", "/publish", b"{\"messages\":[{\"topic\":\"t\"}]}", 400),
        ("POST", "/publish", b"not json", 400),
        // A delivery is `MSG t <payload>`: 6 bytes more than the payload.
        ("POST", "/publish?topic=t", &[b'a'; 995][..], 413),
        ("POST", "/publish?topic=t", &[b'a'; 994][..], 200),
        ("GET", "/publish", b"", 405),
        ("GET", "/nowhere", b"", 404),
        ("POST", "/sessions/0.1.1/send", b"hi", 404),
        ("DELETE", "/sessions/9.1.1", b"", 404),
        ("DELETE", "/sessions/0.1.1?code=1006", b"", 400),
        ("DELETE", "/sessions/x", b"", 404),
        ("GET", "/healthz", b"", 200),
    ] {
        let (got, body) = http.request(method, target, "", body);
        assert_eq!(got, status, "{method} {target}: {body}");
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
});

both_drivers!(token_guards_everything_but_health_and_metrics, |driver| {
    let server = Server::start(driver, &["--admin-token", "s3cret-token"]);
    let mut http = Http::connect(server.admin_addr());
    assert_eq!(http.request("GET", "/stats", "", b"").0, 401);
    assert_eq!(http.request("POST", "/publish?topic=t", "", b"x").0, 401);
    assert_eq!(
        http.request("GET", "/stats", "Authorization: Bearer wrong\r\n", b"").0,
        401
    );
    assert_eq!(
        http.request("GET", "/stats", "Authorization: Bearer s3cret-token\r\n", b"")
            .0,
        200
    );
    assert_eq!(http.request("GET", "/healthz", "", b"").0, 200);
    let (status, metrics) = http.request("GET", "/metrics", "", b"");
    assert_eq!(status, 200);
    let driver_name = if driver == "uring" { "io_uring" } else { "epoll" };
    assert!(
        metrics.contains(&format!("sluice_info{{driver=\"{driver_name}\",workers=\"2\"}} 1")),
        "{metrics}"
    );
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
