//! Authentication at the handshake and authorisation of every subscribe
//! and publish, through an independent client (tokio-tungstenite), under
//! both I/O drivers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream as StdTcp;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{tokio_rt, upgrade_request, Raw, Server, DRIVERS};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn write_temp(name: &str, contents: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("sluice-auth-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

fn hs256(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A token for `user`, valid for `secs`, with these grants.
fn token_for(user: &str, secs: u64, subscribe: &[&str], publish: &[&str]) -> String {
    hs256(json!({
        "sub": user,
        "exp": now() + secs,
        "sluice": {"subscribe": subscribe, "publish": publish},
    }))
}

fn start(driver: &str, extra: &[&str]) -> Server {
    let secret = write_temp(&format!("secret-{driver}"), format!("{SECRET}\n").as_bytes());
    let mut args = vec!["--jwt-secret-file", secret.to_str().unwrap(), "--jwt-leeway-secs", "0"];
    args.extend_from_slice(extra);
    Server::start(driver, &args)
}

/// The status line and head of a handshake with `headers` on `target`.
fn handshake(server: &Server, target: &str, headers: &str) -> String {
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request(target, headers).as_bytes());
    raw.read_head()
}

async fn connect(url: &str, bearer: Option<&str>) -> (Ws, String) {
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = bearer {
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let hello = next_text(&mut ws).await;
    let id = hello.strip_prefix("HELLO ").expect("HELLO first").to_string();
    (ws, id)
}

async fn next_text(ws: &mut Ws) -> String {
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Nothing arrives for a while.
async fn silent(ws: &mut Ws) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
        panic!("expected nothing, got {m:?}");
    }
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
}

/// Publishes through the admin API.
fn admin_publish(server: &Server, topic: &str, body: &str) {
    let mut s = StdTcp::connect(server.admin_addr()).unwrap();
    write!(
        s,
        "POST /publish?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn each_token_outcome_at_the_handshake() {
    for driver in DRIVERS {
        let server = start(driver, &[]);
        let good = token_for("alice", 600, &[], &[]);
        let cases: Vec<(String, &str, &str)> = vec![
            (String::new(), "401", "missing token"),
            ("Authorization: Bearer not-a-jwt\r\n".into(), "401", "malformed token"),
            ("Authorization: Basic YTpi\r\n".into(), "401", "malformed token"),
            (
                format!("Authorization: Bearer {}\r\n", forged(&good)),
                "401",
                "bad signature",
            ),
            (
                format!(
                    "Authorization: Bearer {}\r\n",
                    hs256(json!({"sub": "alice", "exp": now() - 5}))
                ),
                "401",
                "token expired",
            ),
            (
                format!(
                    "Authorization: Bearer {}\r\n",
                    hs256(json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 300}))
                ),
                "401",
                "token not yet valid",
            ),
            (
                // RS256 named, while the server holds only an HMAC secret.
                format!(
                    "Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.{}.AAAA\r\n",
                    good.split('.').nth(1).unwrap()
                ),
                "401",
                "algorithm not accepted",
            ),
            (
                format!("Authorization: Bearer {}\r\n", hs256(json!({"exp": now() + 600}))),
                "401",
                "invalid claims",
            ),
            (format!("Authorization: Bearer {good}\r\n"), "101", ""),
        ];
        for (headers, status, reason) in &cases {
            let mut raw = Raw::connect(server.addr);
            raw.send(upgrade_request("/ws", headers).as_bytes());
            let answer = if *status == "101" {
                raw.read_head()
            } else {
                raw.read_to_end()
            };
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{driver} {headers:?}: {answer}"
            );
            if *status == "401" {
                assert!(answer.contains(reason), "{driver}: {answer}");
                // RFC 6750 3.1: an error code only when a token was given.
                assert_eq!(
                    answer.contains("error=\"invalid_token\""),
                    !headers.is_empty(),
                    "{driver}: {answer}"
                );
                assert!(answer.contains("WWW-Authenticate: Bearer realm=\"sluice\""), "{answer}");
            }
        }
        // The subprotocol a browser can set, and the query: the server
        // picks its own protocol, never the one carrying the token.
        let head = handshake(
            &server,
            "/ws",
            &format!("Sec-WebSocket-Protocol: sluice, bearer.{good}\r\n"),
        );
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains("Sec-WebSocket-Protocol: sluice\r\n"), "{head}");
        assert!(!head.contains("bearer."), "{head}");
        let head = handshake(&server, &format!("/ws?x=1&token={good}"), "");
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        // Health checks need no token.
        let mut raw = Raw::connect(server.addr);
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        assert!(raw.read_to_end().starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_millis(300));
        let metrics = metrics_text(&server);
        for (label, n) in [
            ("missing", 1),
            ("malformed", 2),
            ("bad_signature", 1),
            ("expired", 1),
            ("not_yet_valid", 1),
            ("wrong_algorithm", 1),
            ("bad_claims", 1),
        ] {
            let line = format!("sluice_auth_failures_total{{reason=\"{label}\"}} {n}\n");
            assert!(metrics.contains(&line), "{driver}: no {line:?} in\n{metrics}");
        }
    }
}

/// `token` with one signature character changed (not the last, whose
/// spare bits would make it malformed base64).
fn forged(token: &str) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let i = bytes.len() - 5;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

fn metrics_text(server: &Server) -> String {
    let mut s = StdTcp::connect(server.admin_addr()).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// RS256 and ES256 keys, and the algorithm-confusion attack on them: an
/// HS256 token "signed" with the public key is refused.
#[test]
fn rsa_and_ec_public_keys_verify_their_tokens_only() {
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pairs = [
        // A fixed 2048-bit key: RSA keys take long to make.
        (
            Algorithm::RS256,
            std::fs::read_to_string(keys.join("rsa-public.pem")).unwrap(),
            std::fs::read_to_string(keys.join("rsa-private.pem")).unwrap(),
        ),
        (Algorithm::ES256, ec.public_key_pem(), ec.serialize_pem()),
    ];
    for (alg, public, private) in pairs {
        let key_file = write_temp(&format!("{alg:?}.pem"), public.as_bytes());
        let claims = json!({"sub": "carol", "exp": now() + 600});
        let signing = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private.as_bytes()).unwrap(),
            _ => EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
        };
        let good = encode(&Header::new(alg), &claims, &signing).unwrap();
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(public.as_bytes()),
        )
        .unwrap();
        for driver in DRIVERS {
            let server = Server::start(driver, &["--jwt-public-key", key_file.to_str().unwrap()]);
            let head = handshake(&server, "/ws", &format!("Authorization: Bearer {good}\r\n"));
            assert!(head.starts_with("HTTP/1.1 101 "), "{alg:?} {driver}: {head}");
            let mut raw = Raw::connect(server.addr);
            raw.send(upgrade_request("/ws", &format!("Authorization: Bearer {confused}\r\n")).as_bytes());
            let answer = raw.read_to_end();
            assert!(
                answer.starts_with("HTTP/1.1 401 ") && answer.contains("algorithm not accepted"),
                "{alg:?} {driver}: {answer}"
            );
        }
    }
}

#[test]
fn every_subscribe_and_publish_is_decided_by_the_token_s_grants() {
    for driver in DRIVERS {
        let server = start(driver, &[]);
        let url = server.url("/ws");
        tokio_rt().block_on(async {
            let alice = token_for("alice", 600, &["news.*"], &["chat.*", "user.{sub}.outbox"]);
            let (mut a, _) = connect(&url, Some(&alice)).await;
            send(&mut a, "SUB secret").await;
            assert_eq!(next_text(&mut a).await, "ERR denied secret");
            send(&mut a, "SUB news.x").await;
            send(&mut a, "SUB user.alice").await;
            send(&mut a, "SUB user.bob").await;
            assert_eq!(next_text(&mut a).await, "ERR denied user.bob");
            send(&mut a, "PUB news.x hi").await;
            assert_eq!(next_text(&mut a).await, "ERR denied news.x");
            // Another user's topic, and one's own without a grant: denied.
            send(&mut a, "PUB user.bob hi").await;
            assert_eq!(next_text(&mut a).await, "ERR denied user.bob");
            send(&mut a, "PUB user.alice hi").await;
            assert_eq!(next_text(&mut a).await, "ERR denied user.alice");
            // The connection stays open and what is granted works.
            send(&mut a, "SUB chat.room").await;
            assert_eq!(next_text(&mut a).await, "ERR denied chat.room");
            admin_publish(&server, "news.x", "n1");
            assert_eq!(next_text(&mut a).await, "MSG news.x n1");
            let bob = token_for("bob", 600, &["chat.*"], &[]);
            let (mut b, _) = connect(&url, Some(&bob)).await;
            send(&mut b, "SUB chat.room").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            send(&mut a, "PUB chat.room hello").await;
            assert_eq!(next_text(&mut b).await, "MSG chat.room hello");
            silent(&mut a).await;
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(server.metric("sluice_denied_subscribes_total"), 3, "{driver}");
        assert_eq!(server.metric("sluice_denied_publishes_total"), 3, "{driver}");
    }
}

/// `user.<id>` reaches every connection of that user, on every core, and
/// no one else's.
#[test]
fn a_user_topic_reaches_every_connection_of_its_user_on_every_core() {
    for driver in DRIVERS {
        let server = start(driver, &[]);
        let url = server.url("/ws");
        tokio_rt().block_on(async {
            let alice = token_for("alice", 600, &[], &["user.{sub}"]);
            let mut alices = Vec::new();
            let mut cores = std::collections::HashSet::new();
            for _ in 0..200 {
                if cores.len() == 2 && alices.len() >= 3 {
                    break;
                }
                let (mut ws, id) = connect(&url, Some(&alice)).await;
                send(&mut ws, "SUB user.alice").await;
                cores.insert(id.split('.').next().unwrap().to_string());
                alices.push(ws);
            }
            assert_eq!(cores.len(), 2, "{driver}: alice's connections did not reach both cores");
            let bob = token_for("bob", 600, &[">"], &[]);
            let (mut b, _) = connect(&url, Some(&bob)).await;
            send(&mut b, "SUB user.bob").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            admin_publish(&server, "user.alice", "from-backend");
            for ws in &mut alices {
                assert_eq!(next_text(ws).await, "MSG user.alice from-backend");
            }
            // Granted `user.{sub}`: alice publishes to her own connections.
            send(&mut alices[0], "PUB user.alice from-alice").await;
            for ws in &mut alices {
                assert_eq!(next_text(ws).await, "MSG user.alice from-alice");
            }
            // Bob's `>` does not reach user topics.
            send(&mut b, "SUB user.alice").await;
            assert_eq!(next_text(&mut b).await, "ERR denied user.alice");
            silent(&mut b).await;
        });
    }
}

/// A session is closed with 4001 when its token expires, unless `AUTH`
/// brought a fresh one of the same user first.
#[test]
fn an_expiring_token_closes_4001_unless_refreshed() {
    for driver in DRIVERS {
        let server = start(driver, &[]);
        let url = server.url("/ws");
        tokio_rt().block_on(async {
            let short = token_for("dave", 2, &["t"], &[]);
            let (mut expiring, _) = connect(&url, Some(&short)).await;
            let (mut refreshed, _) = connect(&url, Some(&short)).await;
            send(&mut refreshed, "AUTH not-a-token").await;
            assert_eq!(next_text(&mut refreshed).await, "ERR unauthorized");
            send(&mut refreshed, &format!("AUTH {}", token_for("erin", 600, &[], &[]))).await;
            assert_eq!(next_text(&mut refreshed).await, "ERR denied");
            send(&mut refreshed, "SUB t").await;
            send(&mut refreshed, &format!("AUTH {}", token_for("dave", 600, &["u"], &[]))).await;
            // The fresh token's grants apply at once, to the subscriptions
            // made before it too.
            assert_eq!(next_text(&mut refreshed).await, "ERR denied t");
            send(&mut refreshed, "SUB u").await;
            let started = Instant::now();
            let close = tokio::time::timeout(Duration::from_secs(10), expiring.next()).await;
            match close {
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    assert_eq!(u16::from(frame.code), 4001, "{driver}");
                    assert_eq!(frame.reason, "token expired");
                }
                other => panic!("{driver}: expected a 4001 close, got {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(4), "{driver}");
            // The refreshed one outlives the first token.
            admin_publish(&server, "t", "revoked");
            admin_publish(&server, "u", "still-here");
            assert_eq!(next_text(&mut refreshed).await, "MSG u still-here");
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(server.metric("sluice_tokens_expired_total"), 1, "{driver}");
        assert_eq!(server.metric("sluice_token_refreshes_total"), 1, "{driver}");
    }
}

/// Routes choose: `optional` takes anonymous sessions with the route's
/// grants, `none` looks at no token and keeps user topics closed.
#[test]
fn optional_and_open_routes() {
    let file = write_temp(
        "routes.toml",
        br#"
[[route]]
path = "/public"
protocol = "pubsub"
auth = "optional"
anonymous_subscribe = ["public.*"]

[[route]]
path = "/open"
protocol = "pubsub"
auth = "none"

[[route]]
path = "/stomp"
protocol = "stomp"
"#,
    );
    for driver in DRIVERS {
        let server = start(driver, &["--config", file.to_str().unwrap()]);
        tokio_rt().block_on(async {
            let (mut anon, _) = connect(&server.url("/public"), None).await;
            send(&mut anon, "SUB public.a").await;
            send(&mut anon, "SUB private.a").await;
            assert_eq!(next_text(&mut anon).await, "ERR denied private.a");
            send(&mut anon, "PUB public.a x").await;
            assert_eq!(next_text(&mut anon).await, "ERR denied public.a");
            // AUTH turns an anonymous session into its user's.
            send(
                &mut anon,
                &format!("AUTH {}", token_for("frank", 600, &["private.*"], &[])),
            )
            .await;
            // Frank's grants replace the route's anonymous ones.
            assert_eq!(next_text(&mut anon).await, "ERR denied public.a");
            send(&mut anon, "SUB private.a").await;
            send(&mut anon, "SUB user.frank").await;
            silent(&mut anon).await;
            // A bad token is refused even where one is optional.
            let head = handshake(&server, "/public?token=junk", "");
            assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
            let (mut open, _) = connect(&server.url("/open?token=junk"), None).await;
            send(&mut open, "SUB anything").await;
            send(&mut open, "SUB user.frank").await;
            assert_eq!(next_text(&mut open).await, "ERR denied user.frank");
            send(&mut open, "AUTH x").await;
            assert_eq!(next_text(&mut open).await, "ERR unauthorized");
            // The global default (a key is set): required.
            let head = handshake(&server, "/stomp", "");
            assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
        });
    }
}

/// STOMP: a CONNECT token refreshes the session's, and a denied SUBSCRIBE
/// or SEND gets an ERROR, then a close (STOMP 1.2 "ERROR").
#[test]
fn stomp_frames_are_authorised_too() {
    for driver in DRIVERS {
        let server = start(driver, &[]);
        let token = token_for("gina", 600, &["news"], &["chat"]);
        tokio_rt().block_on(async {
            let url = server.url(&format!("/stomp?token={token}"));
            let stomp = |frame: &str| Message::Text(frame.to_string());
            // Allowed, then denied.
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
            ws.send(stomp("CONNECT\naccept-version:1.2\nhost:x\n\n\0"))
                .await
                .unwrap();
            assert!(next_text(&mut ws).await.starts_with("CONNECTED\n"));
            ws.send(stomp("SUBSCRIBE\nid:0\ndestination:/topic/news\nreceipt:r0\n\n\0"))
                .await
                .unwrap();
            assert!(next_text(&mut ws).await.starts_with("RECEIPT\nreceipt-id:r0\n"));
            ws.send(stomp("SEND\ndestination:/topic/news\nreceipt:r1\n\nx\0"))
                .await
                .unwrap();
            let error = next_text(&mut ws).await;
            assert!(
                error.starts_with("ERROR\n") && error.contains("message:access denied"),
                "{error}"
            );
            assert!(!error.contains("receipt-id:r1"), "{error}");
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(u16::from(frame.code), 1008),
                other => panic!("{driver}: expected a 1008 close, got {other:?}"),
            }
            // A SEND inside a transaction is checked when it comes, not at
            // COMMIT: no RECEIPT, an ERROR at once.
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
            ws.send(stomp("CONNECT\naccept-version:1.2\nhost:x\n\n\0"))
                .await
                .unwrap();
            assert!(next_text(&mut ws).await.starts_with("CONNECTED\n"));
            ws.send(stomp("BEGIN\ntransaction:t\nreceipt:b\n\n\0")).await.unwrap();
            assert!(next_text(&mut ws).await.starts_with("RECEIPT\nreceipt-id:b\n"));
            ws.send(stomp(
                "SEND\ndestination:/topic/chat\ntransaction:t\nreceipt:s0\n\nok\0",
            ))
            .await
            .unwrap();
            assert!(next_text(&mut ws).await.starts_with("RECEIPT\nreceipt-id:s0\n"));
            ws.send(stomp("SEND\ndestination:/topic/news\ntransaction:t\nreceipt:s1\n\nx\0"))
                .await
                .unwrap();
            let error = next_text(&mut ws).await;
            assert!(
                error.starts_with("ERROR\n")
                    && error.contains("message:access denied")
                    && !error.contains("receipt-id:s1"),
                "{error}"
            );
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(u16::from(frame.code), 1008),
                other => panic!("{driver}: expected a 1008 close, got {other:?}"),
            }
            // A CONNECT with another user's token.
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
            let other = token_for("hank", 600, &[], &[]);
            ws.send(stomp(&format!(
                "CONNECT\naccept-version:1.2\nhost:x\nAuthorization:Bearer {other}\n\n\0"
            )))
            .await
            .unwrap();
            let error = next_text(&mut ws).await;
            assert!(error.contains("another user"), "{error}");
        });
    }
}

/// A bad token costs its address a handshake like a good one: past the
/// rate, 429 before any signature is checked.
#[test]
fn bad_tokens_count_against_the_handshake_rate() {
    for driver in DRIVERS {
        let server = start(driver, &["--max-handshakes-per-sec-per-ip", "3"]);
        let statuses: Vec<String> = (0..4)
            .map(|_| {
                let mut raw = Raw::connect(server.addr);
                raw.send(upgrade_request("/ws", "Authorization: Bearer junk\r\n").as_bytes());
                raw.read_to_end().split_whitespace().nth(1).unwrap_or("").to_string()
            })
            .collect();
        assert_eq!(statuses, ["401", "401", "401", "429"], "{driver}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(server.metric("sluice_refused_handshake_rate_total"), 1, "{driver}");
    }
}
