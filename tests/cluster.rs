//! Several sluice nodes over real nats-server processes (Debian's
//! `nats-server`, started here on 127.0.0.1 and random ports): delivery
//! across nodes, native and STOMP, sessions, users, queues, an independent
//! NATS client (nats-py), and the faults a cluster meets: a NATS server
//! killed and restarted, a NATS cluster losing the server a node is on, a
//! node killed, bad credentials, a node started before its bus.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcp};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, tokio_rt, Server};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A nats-server process of ours.
struct Nats {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Nats {
    /// Starts nats-server on a random port with `extra` arguments.
    fn start(extra: &[&str]) -> Nats {
        Self::start_on(-1, extra)
    }

    fn start_on(port: i32, extra: &[&str]) -> Nats {
        let mut args: Vec<String> = ["-a", "127.0.0.1", "-p", &port.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, port, log) = spawn_nats(&args);
        // A restart takes the same port.
        args[3] = port.to_string();
        Nats {
            child: Some(child),
            port,
            args,
            log,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on its port (bounded retries while the port is in
    /// TIME_WAIT's way).
    fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        let (child, port, log) = spawn_nats(&self.args);
        assert_eq!(port, self.port);
        self.child = Some(child);
        self.log = log;
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_nats(args: &[String]) -> (Child, u16, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new("nats-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nats-server (Debian package nats-server; scripts/test.sh installs it)");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                let port = rest.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                let _ = tx.send(port);
            }
            sink.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Some(port)) => (child, port, log),
        _ => {
            let _ = child.kill();
            panic!("nats-server did not start: {:?}", log.lock().unwrap());
        }
    }
}

/// A sluice node named `id` on the NATS servers `urls` (comma-separated).
fn node(driver: &str, id: &str, urls: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--nats", urls, "--node-id", id];
    args.extend_from_slice(extra);
    Server::start(driver, &args)
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_connected(node: &Server) {
    wait_for("the bus", Duration::from_secs(10), || {
        node.metric("sluice_bus_connected") == 1
    });
}

/// One HTTP request to an address; (status, body).
fn http(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let mut s = StdTcp::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

async fn connect(url: &str) -> (Ws, String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = next_text(&mut ws).await;
    let id = hello
        .strip_prefix("HELLO ")
        .unwrap_or_else(|| panic!("first message {hello:?}"))
        .to_string();
    (ws, id)
}

async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, text: String) {
    ws.send(Message::Text(text)).await.unwrap();
}

/// A STOMP 1.2 client over WebSocket, connected.
async fn stomp(url: &str) -> Ws {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "v12.stomp".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    send(
        &mut ws,
        "CONNECT\naccept-version:1.2\nhost:x\nheart-beat:0,0\n\n\0".into(),
    )
    .await;
    let connected = next_text(&mut ws).await;
    assert!(connected.starts_with("CONNECTED\n"), "{connected}");
    ws
}

/// The next STOMP MESSAGE's body (heart-beats skipped).
async fn stomp_body(ws: &mut Ws) -> String {
    loop {
        let frame = next_text(ws).await;
        if frame == "\n" {
            continue;
        }
        assert!(frame.starts_with("MESSAGE\n"), "{frame}");
        let (_, body) = frame.split_once("\n\n").unwrap();
        return body.trim_end_matches('\0').to_string();
    }
}

/// How a test client takes and sends messages.
enum Client {
    Native(Ws),
    Stomp(Ws),
}

impl Client {
    async fn subscribe(&mut self, topic: &str) {
        match self {
            Client::Native(ws) => send(ws, format!("SUB {topic}")).await,
            Client::Stomp(ws) => {
                send(
                    ws,
                    format!("SUBSCRIBE\nid:0\ndestination:/topic/{topic}\nreceipt:r\n\n\0"),
                )
                .await;
                let receipt = next_text(ws).await;
                assert!(receipt.starts_with("RECEIPT\n"), "{receipt}");
            }
        }
    }

    async fn publish(&mut self, topic: &str, body: &str) {
        match self {
            Client::Native(ws) => send(ws, format!("PUB {topic} {body}")).await,
            Client::Stomp(ws) => send(ws, format!("SEND\ndestination:/topic/{topic}\n\n{body}\0")).await,
        }
    }

    async fn next(&mut self) -> String {
        match self {
            Client::Native(ws) => {
                let m = next_text(ws).await;
                let rest = m.strip_prefix("MSG ").unwrap_or_else(|| panic!("{m}"));
                rest.split_once(' ').unwrap().1.to_string()
            }
            Client::Stomp(ws) => stomp_body(ws).await,
        }
    }
}

/// Three nodes of two workers on one nats-server; on every node a native
/// and a STOMP subscriber, and one publisher (native on two nodes, STOMP
/// on the third) sending its share of 10,000 numbered messages. Every
/// subscriber gets every message once, each publisher's in order.
#[test]
fn three_nodes_deliver_every_publish_once_in_order() {
    const TOTAL: usize = 10_000;
    const PUBLISHERS: usize = 3;
    let nats = Nats::start(&[]);
    let nodes: Vec<Server> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, id)| node(common::DRIVERS[i % 2], id, &nats.url(), &[]))
        .collect();
    for n in &nodes {
        wait_connected(n);
    }
    tokio_rt().block_on(async {
        let mut subscribers = Vec::new();
        for n in &nodes {
            let (ws, _) = connect(&n.url("/ws")).await;
            subscribers.push(Client::Native(ws));
            subscribers.push(Client::Stomp(stomp(&n.url("/stomp")).await));
        }
        for s in &mut subscribers {
            s.subscribe("news").await;
        }
        let mut publishers = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            publishers.push(if i == 2 {
                Client::Stomp(stomp(&n.url("/stomp")).await)
            } else {
                Client::Native(connect(&n.url("/ws")).await.0)
            });
        }
        // Until every node's subscription is at the server: probes from
        // every publisher, until every subscriber has seen each one's.
        let ready = Arc::new(Mutex::new(vec![[false; PUBLISHERS]; subscribers.len()]));
        let probing = {
            let ready = ready.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while ready.lock().unwrap().iter().any(|seen| seen.contains(&false)) {
                    assert!(Instant::now() < deadline, "subscriptions did not reach every node");
                    for (p, publisher) in publishers.iter_mut().enumerate() {
                        publisher.publish("news", &format!("probe {p}")).await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                publishers
            }
        };
        let readers = subscribers.into_iter().enumerate().map(|(s, mut sub)| {
            let ready = ready.clone();
            async move {
                let mut next = [0usize; PUBLISHERS];
                let mut got = 0;
                while got < TOTAL {
                    let body = sub.next().await;
                    if let Some(p) = body.strip_prefix("probe ") {
                        ready.lock().unwrap()[s][p.parse::<usize>().unwrap()] = true;
                        continue;
                    }
                    let (p, n) = body.split_once('-').unwrap();
                    let (p, n): (usize, usize) = (p.parse().unwrap(), n.parse().unwrap());
                    assert_eq!(n, next[p], "subscriber {s}, publisher {p}: out of order or lost");
                    next[p] += 1;
                    got += 1;
                }
                sub
            }
        });
        let readers = futures_util::future::join_all(readers.map(Box::pin));
        let publishing = async move {
            let mut publishers = probing.await;
            // The readers' last probes may still be on their way: numbered
            // messages follow them in order.
            for i in 0..TOTAL {
                let p = i % PUBLISHERS;
                publishers[p].publish("news", &format!("{p}-{}", i / PUBLISHERS)).await;
            }
            publishers
        };
        let (subscribers, _publishers) = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(readers, tokio::task::unconstrained(publishing))
        })
        .await
        .expect("every message within 60 s");
        assert_eq!(subscribers.len(), 6);
    });
    let published: u64 = nodes.iter().map(|n| n.metric("sluice_bus_published_total")).sum();
    assert!(published >= TOTAL as u64, "{published}");
    for n in &nodes {
        assert_eq!(n.metric("sluice_bus_dropped_total"), 0);
    }
}

/// `POST /sessions/{id}/send` and `DELETE` on one node reach a session on
/// another; a gone session, or a node nobody runs, answers 404 at once; a
/// publish through any node's admin API reaches every node.
#[test]
fn sessions_and_admin_publishes_cross_nodes() {
    let nats = Nats::start(&[]);
    let a = node("uring", "a", &nats.url(), &[]);
    let b = node("epoll", "b", &nats.url(), &[]);
    wait_connected(&a);
    wait_connected(&b);
    tokio_rt().block_on(async {
        let (mut on_b, id) = connect(&b.url("/ws")).await;
        assert!(id.starts_with("b."), "a session id names its node: {id}");
        assert_eq!(id.split('.').count(), 4, "{id}");
        let (status, body) = http(a.admin_addr(), "POST", &format!("/sessions/{id}/send"), b"from a");
        assert_eq!(status, 200, "{body}");
        assert_eq!(next_text(&mut on_b).await, "from a");
        // GET on one node says what the session on the other is.
        let (status, body) = http(a.admin_addr(), "GET", &format!("/connections/{id}"), b"");
        assert_eq!(status, 200, "{body}");
        let info: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(info["session"], id.as_str());
        assert_eq!(info["node"], "b");
        assert_eq!(info["route"], "/ws");
        // Admin publishes, on either node, reach subscribers on both.
        let (mut on_a, _) = connect(&a.url("/ws")).await;
        send(&mut on_a, "SUB t".into()).await;
        send(&mut on_b, "SUB t".into()).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = (false, false);
        while !(seen.0 && seen.1) {
            assert!(Instant::now() < deadline, "admin publish did not cross");
            let (status, _) = http(b.admin_addr(), "POST", "/publish?topic=t", b"hello");
            assert_eq!(status, 200);
            for (ws, flag) in [(&mut on_a, &mut seen.0), (&mut on_b, &mut seen.1)] {
                if let Ok(m) = tokio::time::timeout(Duration::from_millis(100), next_text(ws)).await {
                    assert_eq!(m, "MSG t hello");
                    *flag = true;
                }
            }
        }
        let started = Instant::now();
        let (status, body) = http(
            a.admin_addr(),
            "DELETE",
            &format!("/sessions/{id}?code=4000&reason=bye"),
            b"",
        );
        assert_eq!(status, 200, "{body}");
        loop {
            match tokio::time::timeout(Duration::from_secs(5), on_b.next()).await.unwrap() {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(u16::from(frame.code), 4000);
                    assert_eq!(frame.reason, "bye");
                    break;
                }
                Some(Ok(_)) => continue,
                other => panic!("expected the close, got {other:?}"),
            }
        }
        // Gone now; and a node that does not exist.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (method, target) in [
            ("POST", format!("/sessions/{id}/send")),
            ("GET", format!("/sessions/{id}")),
            ("POST", "/sessions/zz.0.1.1/send".to_string()),
        ] {
            let asked = Instant::now();
            let body: &[u8] = if method == "GET" { b"" } else { b"x" };
            let (status, _) = http(a.admin_addr(), method, &target, body);
            assert_eq!(status, 404, "{target}");
            assert!(asked.elapsed() < Duration::from_secs(3), "404 after a bounded wait");
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    });
    assert!(a.metric("sluice_bus_requests_out_total") >= 3);
    assert!(b.metric("sluice_bus_requests_in_total") >= 2);
    // A node of a cluster shuts down as one alone does.
    let mut a = a;
    assert!(a.terminate().success(), "{}", a.log());
}

const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes";

fn user_token(user: &str) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({ "sub": user, "exp": exp }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A user connected to three nodes gets a publish to `user.<id>` on all
/// three, whichever node's admin API publishes it.
#[test]
fn a_user_on_three_nodes_gets_its_messages_on_all() {
    let secret = std::env::temp_dir().join(format!("sluice-cluster-secret-{}", std::process::id()));
    std::fs::write(&secret, SECRET).unwrap();
    let nats = Nats::start(&[]);
    let secret = secret.to_str().unwrap();
    let nodes: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|id| {
            node(
                "uring",
                id,
                &nats.url(),
                &["--jwt-secret-file", secret, "--workers", "1"],
            )
        })
        .collect();
    for n in &nodes {
        wait_connected(n);
    }
    let token = user_token("ann");
    tokio_rt().block_on(async {
        let mut sessions = Vec::new();
        for n in &nodes {
            let (mut ws, _) = connect(&format!("{}?token={token}", n.url("/ws"))).await;
            send(&mut ws, "SUB user.ann".into()).await;
            sessions.push(ws);
        }
        let admin = nodes[1].admin_addr();
        let mut seen = [false; 3];
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.contains(&false) {
            assert!(Instant::now() < deadline, "not every session got it: {seen:?}");
            let (status, _) = http(admin, "POST", "/publish?topic=user.ann", b"hi ann");
            assert_eq!(status, 200);
            for (ws, seen) in sessions.iter_mut().zip(seen.iter_mut()) {
                while let Ok(m) = tokio::time::timeout(Duration::from_millis(100), next_text(ws)).await {
                    assert_eq!(m, "MSG user.ann hi ann");
                    *seen = true;
                }
            }
        }
    });
}

/// A STOMP queue's messages go to one subscriber each across the cluster,
/// spread over the nodes (a NATS queue group, one member per node).
#[test]
fn a_stomp_queue_spans_the_cluster() {
    const MESSAGES: usize = 300;
    let nats = Nats::start(&[]);
    let nodes: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|id| node("epoll", id, &nats.url(), &["--workers", "1"]))
        .collect();
    for n in &nodes {
        wait_connected(n);
    }
    tokio_rt().block_on(async {
        let mut consumers = Vec::new();
        for n in &nodes {
            let mut ws = stomp(&n.url("/stomp")).await;
            send(
                &mut ws,
                "SUBSCRIBE\nid:q\ndestination:/queue/jobs\nreceipt:r\n\n\0".into(),
            )
            .await;
            assert!(next_text(&mut ws).await.starts_with("RECEIPT\n"));
            consumers.push(ws);
        }
        // Every node's queue subscription at the server: the bus's subject
        // gauge, then a round trip through the server on each.
        for n in &nodes {
            wait_for("the queue's subject", Duration::from_secs(10), || {
                n.metric("sluice_bus_subjects") == 1
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut producer = stomp(&nodes[0].url("/stomp")).await;
        for i in 0..MESSAGES {
            send(&mut producer, format!("SEND\ndestination:/queue/jobs\n\njob {i}\0")).await;
        }
        let mut seen = vec![0u32; MESSAGES];
        let mut per_node = [0usize; 3];
        let mut total = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while total < MESSAGES {
            assert!(
                Instant::now() < deadline,
                "only {total} of {MESSAGES} arrived: {per_node:?}"
            );
            for (n, ws) in consumers.iter_mut().enumerate() {
                while let Ok(body) = tokio::time::timeout(Duration::from_millis(50), stomp_body(ws)).await {
                    let i: usize = body.strip_prefix("job ").unwrap().parse().unwrap();
                    seen[i] += 1;
                    per_node[n] += 1;
                    total += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for ws in &mut consumers {
            assert!(
                tokio::time::timeout(Duration::from_millis(100), stomp_body(ws))
                    .await
                    .is_err(),
                "a message was delivered twice"
            );
        }
        assert!(seen.iter().all(|&n| n == 1), "each message exactly once");
        assert!(per_node.iter().all(|&n| n > 0), "spread over the nodes: {per_node:?}");
    });
}

/// Another service publishes straight into NATS with an independent
/// client library (nats-py), with and without sluice's headers, and
/// WebSocket subscribers get it.
#[test]
fn an_independent_nats_client_reaches_websocket_subscribers() {
    let nats = Nats::start(&[]);
    let a = node("uring", "a", &nats.url(), &["--nats-prefix", "acme.live"]);
    wait_connected(&a);
    tokio_rt().block_on(async {
        let (mut ws, _) = connect(&a.url("/ws")).await;
        send(&mut ws, "SUB orders..eu".into()).await;
        wait_for("the subject", Duration::from_secs(10), || {
            a.metric("sluice_bus_subjects") == 1
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let script = r#"
import asyncio, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    await nc.publish("acme.live.t.orders.=.eu", b"from python", headers={"Sluice-Kind": "text"})
    await nc.publish("acme.live.t.orders.=.eu", b"\xff\x01")
    await nc.publish("acme.live.t.orders.=.eu", b"no headers")
    await nc.flush()
    await nc.close()

asyncio.run(main())
"#;
        let out = Command::new("python3")
            .args(["-c", script, &nats.url()])
            .output()
            .expect("python3 with nats-py (scripts/test.sh installs it)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(next_text(&mut ws).await, "MSG orders..eu from python");
        // No kind header and not UTF-8: binary.
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => assert_eq!(b, b"MSG orders..eu \xff\x01"),
            other => panic!("expected a binary message, got {other:?}"),
        }
        assert_eq!(next_text(&mut ws).await, "MSG orders..eu no headers");
    });
    assert_eq!(a.metric("sluice_bus_received_total"), 3);
}

/// What a stranger on the bus sends is checked, never written as it came:
/// a request for a session with a close code no endpoint may send, or
/// text that is not UTF-8, is refused ("0"); a good one is encoded by the
/// node ("1"); STOMP headers that smuggle a frame drop the message.
#[test]
fn hostile_bus_input_is_checked() {
    let nats = Nats::start(&[]);
    let a = node("epoll", "a", &nats.url(), &[]);
    wait_connected(&a);
    tokio_rt().block_on(async {
        let (mut ws, id) = connect(&a.url("/ws")).await;
        let session = id.strip_prefix("a.").unwrap().to_string();
        let mut stomp_sub = stomp(&a.url("/stomp")).await;
        send(
            &mut stomp_sub,
            "SUBSCRIBE\nid:0\ndestination:/topic/inj\nreceipt:r\n\n\0".into(),
        )
        .await;
        assert!(next_text(&mut stomp_sub).await.starts_with("RECEIPT\n"));
        wait_for("the subject", Duration::from_secs(10), || {
            a.metric("sluice_bus_subjects") == 1
        });
        let script = r#"
import asyncio, base64, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    ask = lambda headers, payload: nc.request("sluice.node.a", payload, timeout=2, headers=headers)
    session = sys.argv[2]
    answers = []
    for headers, payload in [
        ({"Sluice-Action": "close", "Sluice-Session": session, "Sluice-Code": "1006"}, b"x" * 10),
        ({"Sluice-Action": "close", "Sluice-Session": session, "Sluice-Code": "4000"}, b"x" * 200),
        ({"Sluice-Action": "send", "Sluice-Session": session, "Sluice-Kind": "text"}, b"\xff\xfe"),
        ({"Sluice-Action": "send", "Sluice-Session": session}, b"\x88\x02\x03\xed raw"),
    ]:
        answers.append((await ask(headers, payload)).data.decode())
    forged = b"x:1\n\nFORGED\x00RECEIPT\nreceipt-id:evil\n\n\x00"
    await nc.publish("sluice.t.inj", b"smuggled", headers={"Sluice-Stomp-Headers": base64.b64encode(forged).decode()})
    await nc.publish("sluice.t.inj", b"clean", headers={"Sluice-Stomp-Headers": base64.b64encode(b"x-a:1\n").decode()})
    await nc.flush()
    print(" ".join(answers))

asyncio.run(main())
"#;
        let out = Command::new("python3")
            .args(["-c", script, &nats.url(), &session])
            .output()
            .expect("python3 with nats-py");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0 0 0 1");
        // The one accepted: its bytes as a message, framed by the node.
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => assert_eq!(b, b"\x88\x02\x03\xed raw"),
            other => panic!("expected the binary message, got {other:?}"),
        }
        let frame = next_text(&mut stomp_sub).await;
        assert!(frame.starts_with("MESSAGE\n"), "{frame}");
        assert!(frame.contains("\nx-a:1\n") && frame.ends_with("\n\nclean\0"), "{frame}");
    });
    assert_eq!(a.metric("sluice_bus_dropped_invalid_total"), 1);
}

/// The NATS server's max_payload bounds what crosses: a larger message
/// still reaches the node's own subscribers (a STOMP queue's too), and is
/// counted as refused by the bus.
#[test]
fn messages_over_the_servers_max_payload_stay_on_the_node() {
    let dir = std::env::temp_dir().join(format!("sluice-cluster-payload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let nats = Nats::start(&["-c", conf.to_str().unwrap()]);
    let a = node("uring", "a", &nats.url(), &["--workers", "1"]);
    wait_connected(&a);
    wait_for("the warning", Duration::from_secs(5), || {
        a.log().contains("at most 4096 bytes")
    });
    tokio_rt().block_on(async {
        let mut consumer = stomp(&a.url("/stomp")).await;
        send(
            &mut consumer,
            "SUBSCRIBE\nid:q\ndestination:/queue/big\nreceipt:r\n\n\0".into(),
        )
        .await;
        assert!(next_text(&mut consumer).await.starts_with("RECEIPT\n"));
        let mut producer = stomp(&a.url("/stomp")).await;
        let body = "y".repeat(10_000);
        send(
            &mut producer,
            format!("SEND\ndestination:/queue/big\nreceipt:s\n\n{body}\0"),
        )
        .await;
        assert!(next_text(&mut producer).await.starts_with("RECEIPT\n"));
        assert_eq!(stomp_body(&mut consumer).await, body);
        let (mut ws, _) = connect(&a.url("/ws")).await;
        send(&mut ws, "SUB t".into()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&mut ws, format!("PUB t {body}")).await;
        assert_eq!(next_text(&mut ws).await, format!("MSG t {body}"));
    });
    wait_for("the count", Duration::from_secs(5), || {
        a.metric("sluice_bus_refused_total") == 1
    });
}

/// Publishes numbered messages on `topic` from `url` every `every` until
/// told to stop; returns when each was sent.
fn publish_numbered(
    url: String,
    topic: &'static str,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Instant>> {
    std::thread::spawn(move || {
        tokio_rt().block_on(async {
            let (mut ws, _) = connect(&url).await;
            let mut sent = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                send(&mut ws, format!("PUB {topic} {}", sent.len())).await;
                sent.push(Instant::now());
                tokio::time::sleep(every).await;
            }
            sent
        })
    })
}

/// Numbers a subscriber got, with when each arrived.
fn collect_numbered(
    url: String,
    topic: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(usize, Instant)>> {
    std::thread::spawn(move || {
        tokio_rt().block_on(async {
            let (mut ws, _) = connect(&url).await;
            send(&mut ws, format!("SUB {topic}")).await;
            let mut got = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(Some(Ok(Message::Text(m)))) = tokio::time::timeout(Duration::from_millis(50), ws.next()).await
                {
                    let n = m.rsplit(' ').next().unwrap().parse().unwrap();
                    got.push((n, Instant::now()));
                }
            }
            got
        })
    })
}

/// The nats-server is killed mid-traffic and started again: local
/// delivery never stops, the nodes say they are not ready meanwhile,
/// publishes past the buffer are dropped and counted, and delivery across
/// nodes resumes within 2 s of the restart, in order.
#[test]
fn nats_restarted_mid_traffic_resumes_within_two_seconds() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut nats = Nats::start(&[]);
    let a = node("uring", "a", &nats.url(), &["--nats-buffer-bytes", "4096"]);
    let b = node("epoll", "b", &nats.url(), &[]);
    wait_connected(&a);
    wait_connected(&b);
    let stop = Arc::new(AtomicBool::new(false));
    let remote = collect_numbered(b.url("/ws"), "feed", stop.clone());
    let local = collect_numbered(a.url("/ws"), "feed", stop.clone());
    wait_for("the subjects", Duration::from_secs(10), || {
        a.metric("sluice_bus_subjects") == 1 && b.metric("sluice_bus_subjects") == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    let publisher = publish_numbered(a.url("/ws"), "feed", Duration::from_millis(2), stop.clone());
    std::thread::sleep(Duration::from_millis(700));
    nats.kill();
    wait_for("the disconnect", Duration::from_secs(10), || {
        a.metric("sluice_bus_connected") == 0
    });
    let (status, _) = http(a.admin_addr(), "GET", "/readyz", b"");
    assert_eq!(status, 503, "not ready while the bus is down");
    let (status, _) = http(a.admin_addr(), "GET", "/healthz", b"");
    assert_eq!(status, 200, "healthy all the same");
    std::thread::sleep(Duration::from_millis(1500));
    nats.restart();
    let restarted = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.join().unwrap().len();
    let remote = remote.join().unwrap();
    let local = local.join().unwrap();
    // Local subscribers missed nothing.
    let local_numbers: Vec<usize> = local.iter().map(|&(n, _)| n).collect();
    assert_eq!(local_numbers, (0..local_numbers.len()).collect::<Vec<_>>());
    assert!(
        local_numbers.len() + 5 >= sent,
        "local: {} of {sent}",
        local_numbers.len()
    );
    // Across the bus: in order, no duplicates, resumed within 2 s.
    assert!(remote.windows(2).all(|w| w[0].0 < w[1].0), "in order, once each");
    let resumed = remote
        .iter()
        .find(|&&(_, at)| at > restarted)
        .map(|&(_, at)| at - restarted)
        .expect("delivery resumed after the restart");
    assert!(
        resumed < Duration::from_secs(2),
        "resumed {resumed:?} after the restart"
    );
    let dropped = a.metric("sluice_bus_dropped_total");
    assert!(dropped > 0, "the 4 KiB buffer overflowed while the bus was down");
    assert!(
        remote.len() as u64 + dropped <= sent as u64 + 1,
        "{} delivered + {dropped} dropped, of {sent}",
        remote.len()
    );
    // Every publish was handed to the bus or counted as dropped: the
    // buffer's went out once it was back, none vanished in the bridge.
    wait_for("the buffer to empty", Duration::from_secs(5), || {
        a.metric("sluice_bus_buffered_bytes") == 0
    });
    let published = a.metric("sluice_bus_published_total");
    assert_eq!(
        published + dropped,
        sent as u64,
        "{published} published + {dropped} dropped"
    );
    assert!(a.metric("sluice_bus_reconnects_total") >= 1);
    let (status, _) = http(a.admin_addr(), "GET", "/readyz", b"");
    assert_eq!(status, 200);
}

/// While NATS is down, what a node holds for it stays within
/// `--nats-buffer-bytes`: 256 MiB published meanwhile leaves its memory
/// where 16 MiB left it, and the rest is counted as dropped.
#[test]
fn memory_stays_within_the_buffer_while_nats_is_down() {
    let mut nats = Nats::start(&[]);
    let a = node(
        "uring",
        "a",
        &nats.url(),
        &["--nats-buffer-bytes", "1048576", "--workers", "1"],
    );
    wait_connected(&a);
    nats.kill();
    wait_for("the disconnect", Duration::from_secs(10), || {
        a.metric("sluice_bus_connected") == 0
    });
    let payload = "x".repeat(64 * 1024);
    let mut rss = Vec::new();
    tokio_rt().block_on(async {
        let (mut ws, _) = connect(&a.url("/ws")).await;
        for round in 0..2 {
            let count = if round == 0 { 256 } else { 4096 };
            for _ in 0..count {
                send(&mut ws, format!("PUB gone {payload}")).await;
            }
            // A round trip: every publish before it has been taken.
            send(&mut ws, "SUB probe".into()).await;
            send(&mut ws, "PUB probe x".into()).await;
            assert_eq!(next_text(&mut ws).await, "MSG probe x");
            send(&mut ws, "UNSUB probe".into()).await;
            std::thread::sleep(Duration::from_millis(200));
            rss.push(a.rss_kib());
        }
    });
    let dropped = a.metric("sluice_bus_dropped_total");
    assert!(dropped >= 4096, "{dropped}");
    assert!(a.metric("sluice_bus_buffered_bytes") <= 1024 * 1024 + 70 * 1024);
    if !common::sanitized() {
        assert!(rss[1] < rss[0] + 8 * 1024, "RSS grew from {} to {} KiB", rss[0], rss[1]);
    }
    // And it shuts down with its bus gone and its buffer full.
    let mut a = a;
    let asked = Instant::now();
    assert!(a.terminate().success(), "{}", a.log());
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
}

/// Three NATS servers routed as a cluster; node `a` knows only the first,
/// which is killed: it moves to another (learnt from the cluster), and
/// subscribers on both nodes keep getting each other's publishes.
#[test]
fn a_nats_cluster_losing_a_server_keeps_every_node_receiving() {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let route_urls = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers: Vec<Nats> = routes
        .iter()
        .map(|p| {
            Nats::start(&[
                "--cluster_name",
                "test",
                "--cluster",
                &format!("nats://127.0.0.1:{p}"),
                "--routes",
                &route_urls,
            ])
        })
        .collect();
    // Routes up: each server sees two others.
    std::thread::sleep(Duration::from_millis(1500));
    let a = node("uring", "a", &servers[0].url(), &[]);
    let b = node("epoll", "b", &format!("{},{}", servers[1].url(), servers[2].url()), &[]);
    wait_connected(&a);
    wait_connected(&b);
    tokio_rt().block_on(async {
        let (mut sub_a, _) = connect(&a.url("/ws")).await;
        let (mut sub_b, _) = connect(&b.url("/ws")).await;
        let (mut pub_a, _) = connect(&a.url("/ws")).await;
        let (mut pub_b, _) = connect(&b.url("/ws")).await;
        send(&mut sub_a, "SUB x".into()).await;
        send(&mut sub_b, "SUB x".into()).await;
        // Each gets the other node's publishes; then again after the
        // server `a` is on is gone.
        for round in 0..2 {
            if round == 1 {
                servers[0].kill();
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut seen = (false, false);
            while !(seen.0 && seen.1) {
                assert!(Instant::now() < deadline, "round {round}: {seen:?}");
                send(&mut pub_a, "PUB x from-a".into()).await;
                send(&mut pub_b, "PUB x from-b".into()).await;
                while let Ok(m) = tokio::time::timeout(Duration::from_millis(100), next_text(&mut sub_a)).await {
                    seen.0 |= m == "MSG x from-b";
                }
                while let Ok(m) = tokio::time::timeout(Duration::from_millis(100), next_text(&mut sub_b)).await {
                    seen.1 |= m == "MSG x from-a";
                }
            }
        }
    });
    assert!(a.metric("sluice_bus_reconnects_total") >= 1);
}

/// A node killed with SIGKILL: the others and their clients carry on, and
/// an action on one of its sessions answers 404 after a bounded wait.
#[test]
fn a_node_killed_leaves_the_others_unaffected() {
    let nats = Nats::start(&[]);
    let a = node("uring", "a", &nats.url(), &[]);
    let b = node("epoll", "b", &nats.url(), &[]);
    let mut c = node("uring", "c", &nats.url(), &[]);
    for n in [&a, &b, &c] {
        wait_connected(n);
    }
    tokio_rt().block_on(async {
        let (_on_c, id) = connect(&c.url("/ws")).await;
        let (mut sub_b, _) = connect(&b.url("/ws")).await;
        send(&mut sub_b, "SUB y".into()).await;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.pid(), libc::SIGKILL) };
        let _ = c.reap();
        let (mut pub_a, _) = connect(&a.url("/ws")).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "b stopped getting a's publishes");
            send(&mut pub_a, "PUB y after".into()).await;
            if let Ok(m) = tokio::time::timeout(Duration::from_millis(100), next_text(&mut sub_b)).await {
                assert_eq!(m, "MSG y after");
                break;
            }
        }
        let asked = Instant::now();
        let (status, _) = http(a.admin_addr(), "POST", &format!("/sessions/{id}/send"), b"x");
        assert_eq!(status, 404);
        assert!(asked.elapsed() < Duration::from_secs(3));
    });
}

/// A node that takes requests and never answers (a stand-in on its
/// subject, with nats-py): the action is a 404 after the bounded wait.
#[test]
fn a_node_that_does_not_answer_is_a_404_after_the_wait() {
    let nats = Nats::start(&[]);
    let a = node("epoll", "a", &nats.url(), &[]);
    wait_connected(&a);
    let script = r#"
import asyncio, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    async def ignore(message):
        pass

    await nc.subscribe("sluice.node.mute", cb=ignore)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.sleep(8)

asyncio.run(main())
"#;
    let mut mute = Command::new("python3")
        .args(["-c", script, &nats.url()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with nats-py");
    let mut line = String::new();
    BufReader::new(mute.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let asked = Instant::now();
    let (status, _) = http(a.admin_addr(), "POST", "/sessions/mute.0.1.1/send", b"x");
    let waited = asked.elapsed();
    let _ = mute.kill();
    let _ = mute.wait();
    assert_eq!(status, 404);
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_millis(3500),
        "{waited:?}"
    );
}

/// Wrong NATS credentials: the node starts, serves its own clients, says
/// what is wrong in its log, is not ready, and never panics; the right
/// ones connect.
#[test]
fn bad_nats_credentials_are_a_clear_error() {
    let nats = Nats::start(&["--user", "sluice", "--pass", "s3cret"]);
    let wrong = node(
        "uring",
        "a",
        &nats.url(),
        &["--nats-user", "sluice", "--nats-password", "wrong"],
    );
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        wrong.log().to_lowercase().contains("authorization violation")
    });
    let (status, _) = http(wrong.admin_addr(), "GET", "/readyz", b"");
    assert_eq!(status, 503);
    assert_eq!(wrong.metric("sluice_bus_connected"), 0);
    assert!(!wrong.log().contains("panicked"), "{}", wrong.log());
    let right = node(
        "epoll",
        "b",
        &nats.url(),
        &["--nats-user", "sluice", "--nats-password", "s3cret"],
    );
    wait_connected(&right);
    let token = Nats::start(&["--auth", "t0ken"]);
    let with_token = node("uring", "c", &token.url(), &["--nats-token", "t0ken"]);
    wait_connected(&with_token);
}

/// TLS to NATS with the node's own CA file; without it the server's
/// certificate is refused and the node stays unconnected. And an nkey
/// seed signs the server's nonce.
#[test]
fn tls_and_nkeys_to_nats() {
    let dir = std::env::temp_dir().join(format!("sluice-cluster-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let nats = Nats::start(&[
        "--tls",
        "--tlscert",
        cert.to_str().unwrap(),
        "--tlskey",
        key.to_str().unwrap(),
    ]);
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let trusted = node("uring", "a", &url, &["--nats-ca", cert.to_str().unwrap()]);
    wait_connected(&trusted);
    let untrusted = node("epoll", "b", &url, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !untrusted.log().contains("UnknownIssuer") {
        assert!(Instant::now() < deadline, "no certificate error in {}", untrusted.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(untrusted.metric("sluice_bus_connected"), 0);

    let user = nkeys::KeyPair::new_user();
    let seed = dir.join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!("authorization {{ users = [ {{ nkey: {} }} ] }}\n", user.public_key()),
    )
    .unwrap();
    let guarded = Nats::start(&["-c", conf.to_str().unwrap()]);
    let signed = node("uring", "c", &guarded.url(), &["--nats-nkey", seed.to_str().unwrap()]);
    wait_connected(&signed);
}

/// A node started while NATS is down serves its own clients, is healthy
/// but not ready, says so in `/metrics`, and joins once NATS is up.
#[test]
fn a_node_started_before_nats_joins_when_it_comes() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let a = node("epoll", "a", &url, &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.metric("sluice_bus_connected"), 0);
    assert_eq!(http(a.admin_addr(), "GET", "/readyz", b"").0, 503);
    assert_eq!(http(a.admin_addr(), "GET", "/healthz", b"").0, 200);
    let ws_port = {
        let mut s = StdTcp::connect(a.addr).unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r
    };
    assert!(ws_port.starts_with("HTTP/1.1 503"), "{ws_port}");
    tokio_rt().block_on(async {
        let (mut sub, _) = connect(&a.url("/ws")).await;
        let (mut publisher, _) = connect(&a.url("/ws")).await;
        send(&mut sub, "SUB z".into()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&mut publisher, "PUB z local".into()).await;
        assert_eq!(next_text(&mut sub).await, "MSG z local");
    });
    wait_for("the warning", Duration::from_secs(5), || {
        a.log().contains("NATS unreachable")
    });
    let _nats = Nats::start_on(port as i32, &[]);
    wait_connected(&a);
    assert_eq!(http(a.admin_addr(), "GET", "/readyz", b"").0, 200);
}

#[test]
fn cluster_options_are_checked() {
    for (args, says) in [
        (&["--node-id", "a"][..], "node_id: takes effect only with nats"),
        (&["--nats", "nats://127.0.0.1:4222", "--node-id", "a.b"], "node_id"),
        (
            &["--nats", "nats://127.0.0.1:4222", "--nats-prefix", "a..b"],
            "nats_prefix",
        ),
        (
            &["--nats", "nats://127.0.0.1:4222", "--nats-prefix", "a.*"],
            "nats_prefix",
        ),
        (
            &["--nats", "nats://127.0.0.1:4222", "--nats-user", "u"],
            "nats_user and nats_password go together",
        ),
        (
            &[
                "--nats",
                "nats://127.0.0.1:4222",
                "--nats-token",
                "t",
                "--nats-user",
                "u",
                "--nats-password",
                "p",
            ],
            "one way to authenticate",
        ),
        (
            &["--nats", "nats://127.0.0.1:4222", "--nats-creds", "/nonexistent"],
            "nats_creds",
        ),
        (
            &["--nats", "nats://127.0.0.1:4222", "--nats-ca", "/nonexistent"],
            "nats_ca",
        ),
        (
            &["--nats", "nats://127.0.0.1:4222", "--nats-ca", "/etc/hostname"],
            "nats_ca",
        ),
        (
            &["--nats", "nats://127.0.0.1:4222", "--nats-nkey", "/etc/hostname"],
            "nats_nkey",
        ),
        (&["--nats", "no such url"], "nats"),
    ] {
        let (code, stderr) = common::start_error(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
