//! `wss://` with real TLS clients (tokio-tungstenite over rustls, and
//! Python's `websockets` over `ssl`) against a certificate made here
//! (rcgen), under both I/O drivers.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{tokio_rt, upgrade_request, Raw, Server, DRIVERS};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

type Wss = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A self-signed certificate for `localhost`, written as PEM files.
struct Cert {
    der: CertificateDer<'static>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn make_cert(name: &str) -> Cert {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-tls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert_file = dir.join("cert.pem");
    let key_file = dir.join("key.pem");
    std::fs::write(&cert_file, made.cert.pem()).unwrap();
    std::fs::write(&key_file, made.signing_key.serialize_pem()).unwrap();
    Cert {
        der: made.cert.der().clone(),
        cert_file,
        key_file,
    }
}

fn start(driver: &str, cert: &Cert, extra: &[&str]) -> (Server, SocketAddr) {
    let mut args = vec![
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.cert_file.to_str().unwrap(),
        "--tls-key",
        cert.key_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let server = Server::start(driver, &args);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(addr) = server
            .log()
            .split("wss:// on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
        {
            return (server, addr.parse().unwrap());
        }
        assert!(Instant::now() < deadline, "no wss:// listener: {}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn client_config(
    roots: &[&CertificateDer<'static>],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    Arc::new(config)
}

async fn connect(addr: SocketAddr, path: &str, config: Arc<rustls::ClientConfig>) -> Result<Wss, String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let url = format!("wss://localhost:{}{path}", addr.port());
    tokio_tungstenite::client_async_tls_with_config(url, tcp, None, Some(Connector::Rustls(config)))
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

/// The certificate the server presented on this connection.
fn peer_cert(ws: &Wss) -> CertificateDer<'static> {
    match ws.get_ref() {
        MaybeTlsStream::Rustls(tls) => tls.get_ref().1.peer_certificates().unwrap()[0].clone(),
        _ => panic!("not TLS"),
    }
}

async fn next_message(ws: &mut Wss) -> Message {
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(m))) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Echo over TLS 1.3 and 1.2, messages from empty to several records
/// long (each way), and a plain client and a TLS one on one topic.
#[test]
fn wss_echo_and_pubsub_over_tls_1_3_and_1_2() {
    let cert = make_cert("echo");
    for driver in DRIVERS {
        let (server, tls_addr) = start(driver, &cert, &[]);
        tokio_rt().block_on(async {
            for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
                let config = client_config(&[&cert.der], versions);
                let mut ws = connect(tls_addr, "/echo", config).await.unwrap();
                for size in [0usize, 1, 125, 16_383, 16_384, 16_385, 70_000, 300_000] {
                    let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
                    ws.send(Message::Binary(payload.clone())).await.unwrap();
                    assert_eq!(next_message(&mut ws).await, Message::Binary(payload), "{driver} {size}");
                }
                ws.send(Message::Text("héllo".into())).await.unwrap();
                assert_eq!(next_message(&mut ws).await, Message::Text("héllo".into()));
                ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: 1000.into(),
                    reason: "".into(),
                }))
                .await
                .unwrap();
                match next_message(&mut ws).await {
                    Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1000),
                    other => panic!("{driver}: expected the close echoed, got {other:?}"),
                }
            }
            // A TLS subscriber gets a plain publisher's message.
            let config = client_config(&[&cert.der], &[&rustls::version::TLS13]);
            let mut sub = connect(tls_addr, "/ws", config).await.unwrap();
            assert!(matches!(next_message(&mut sub).await, Message::Text(t) if t.starts_with("HELLO ")));
            sub.send(Message::Text("SUB t".into())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (mut publisher, _) = tokio_tungstenite::connect_async(server.url("/ws")).await.unwrap();
            publisher.send(Message::Text("PUB t over-tls".into())).await.unwrap();
            loop {
                match next_message(&mut sub).await {
                    Message::Text(t) if t == "MSG t over-tls" => break,
                    Message::Ping(_) => continue,
                    other => panic!("{driver}: {other:?}"),
                }
            }
        });
    }
}

/// A plain-text client on the TLS port gets an alert and the connection
/// is closed at once (no hang); a client that offers only `h2` is refused
/// in the handshake; the plain port does not speak TLS.
#[test]
fn wrong_clients_fail_cleanly() {
    let cert = make_cert("wrong");
    for driver in DRIVERS {
        let (server, tls_addr) = start(driver, &cert, &[]);
        let started = Instant::now();
        let mut raw = Raw::connect(tls_addr);
        raw.send(upgrade_request("/echo", "").as_bytes());
        let mut answer = Vec::new();
        let _ = raw.stream.read_to_end(&mut answer);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{driver}: took {:?}",
            started.elapsed()
        );
        // RFC 8446 5.1: an alert record (content type 21), then the end.
        assert_eq!(answer.first(), Some(&21), "{driver}: {answer:?}");
        tokio_rt().block_on(async {
            let mut config = (*client_config(&[&cert.der], &[&rustls::version::TLS13])).clone();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let err = connect(tls_addr, "/echo", Arc::new(config)).await.unwrap_err();
            assert!(
                err.contains("NoApplicationProtocol") || err.contains("no_application_protocol"),
                "{err}"
            );
            // ALPN http/1.1 is accepted.
            let mut config = (*client_config(&[&cert.der], &[&rustls::version::TLS13])).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let ws = connect(tls_addr, "/echo", Arc::new(config)).await.unwrap();
            match ws.get_ref() {
                MaybeTlsStream::Rustls(tls) => assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..])),
                _ => unreachable!(),
            }
            // TLS on the plain port: the server answers 400, not a hang.
            let config = client_config(&[&cert.der], &[&rustls::version::TLS13]);
            assert!(connect(server.addr, "/echo", config).await.is_err());
        });
        // The server is unharmed.
        let mut raw = Raw::connect(server.addr);
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        assert!(raw.read_to_end().starts_with("HTTP/1.1 200"));
    }
}

/// SIGHUP loads the certificate files again: new handshakes get the new
/// certificate, an open connection goes on; a broken file keeps the old.
#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let first = make_cert("reload");
    let second = make_cert("reload-next");
    for driver in DRIVERS {
        std::fs::copy(&first.cert_file, first.cert_file.with_extension("live")).unwrap();
        std::fs::copy(&first.key_file, first.key_file.with_extension("live")).unwrap();
        let live = Cert {
            der: first.der.clone(),
            cert_file: first.cert_file.with_extension("live"),
            key_file: first.key_file.with_extension("live"),
        };
        let (server, tls_addr) = start(driver, &live, &[]);
        // A config per connection: a shared one would resume the first
        // session (RFC 8446 2.2), which presents no certificate.
        let both = || client_config(&[&first.der, &second.der], &[&rustls::version::TLS13]);
        tokio_rt().block_on(async {
            let mut old = connect(tls_addr, "/echo", both()).await.unwrap();
            assert_eq!(peer_cert(&old), first.der);
            std::fs::copy(&second.cert_file, &live.cert_file).unwrap();
            std::fs::copy(&second.key_file, &live.key_file).unwrap();
            hangup(&server, 1);
            let fresh = connect(tls_addr, "/echo", both()).await.unwrap();
            assert_eq!(peer_cert(&fresh), second.der, "{driver}");
            old.send(Message::Text("still".into())).await.unwrap();
            assert_eq!(next_message(&mut old).await, Message::Text("still".into()));
            // A key that does not match: refused, the second stays.
            std::fs::copy(&first.key_file, &live.key_file).unwrap();
            hangup(&server, 2);
            assert!(server.log().contains("certificate not reloaded"), "{}", server.log());
            let after = connect(tls_addr, "/echo", both()).await.unwrap();
            assert_eq!(peer_cert(&after), second.der, "{driver}");
        });
    }
}

/// Sends SIGHUP and waits for the `n`th reload line in the log.
fn hangup(server: &Server, n: usize) {
    // SAFETY: kill(2) on the pid of our own child process.
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.log().matches("SIGHUP: certificate").count() < n {
        assert!(Instant::now() < deadline, "no reload: {}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Python's `websockets` with the standard library's `ssl`: echo and the
/// native protocol over wss://.
#[test]
fn python_websockets_over_ssl() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/client.py");
    let probe = Command::new("python3").args(["-c", "import websockets"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        // scripts/test.sh installs the client and sets this, so CI never skips it.
        assert!(
            std::env::var_os("SLUICE_REQUIRE_PYTHON_WEBSOCKETS").is_none(),
            "python3 -c 'import websockets' failed"
        );
        eprintln!("skipped: `pip install websockets` to test with Python's websockets");
        return;
    }
    let cert = make_cert("python");
    for driver in DRIVERS {
        let (_server, tls_addr) = start(driver, &cert, &[]);
        let out = Command::new("python3")
            .arg(&script)
            .arg(format!("wss://localhost:{}", tls_addr.port()))
            .arg(&cert.cert_file)
            .output()
            .expect("run python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("ok"),
            "{driver}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A handshake message cut into tiny records is refused once 64 KiB of it
/// wait (rustls joins a handshake message only once it is whole): long
/// before the handshake timeout.
#[test]
fn a_handshake_in_tiny_records_is_refused_at_its_bound() {
    let cert = make_cert("tiny");
    for driver in DRIVERS {
        let (_server, tls_addr) = start(driver, &cert, &["--handshake-timeout-ms", "30000"]);
        let mut raw = Raw::connect(tls_addr);
        // A ClientHello announcing 65,535 bytes, one byte per record:
        // more than one read, so rustls's joining spans reads.
        let mut wire = Vec::new();
        for byte in [1u8, 0, 0xff, 0xff].into_iter().chain(std::iter::repeat_n(0u8, 20_000)) {
            wire.extend_from_slice(&[22, 3, 1, 0, 1, byte]);
        }
        let started = Instant::now();
        let _ = raw.stream.write_all(&wire);
        assert!(raw.is_closed_by_server(), "{driver}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{driver}: {:?}",
            started.elapsed()
        );
        // Refused, not crashed: the next client is served.
        tokio_rt().block_on(async {
            let config = client_config(&[&cert.der], &[&rustls::version::TLS13]);
            let mut ws = connect(tls_addr, "/echo", config).await.unwrap();
            ws.send(Message::Text("still here".into())).await.unwrap();
            assert_eq!(
                next_message(&mut ws).await,
                Message::Text("still here".into()),
                "{driver}"
            );
        });
    }
}

/// Handshakes that stop halfway hold nothing past the handshake timeout.
#[test]
fn a_stalled_tls_handshake_is_dropped_at_the_timeout() {
    let cert = make_cert("stall");
    for driver in DRIVERS {
        let (_server, tls_addr) = start(driver, &cert, &["--handshake-timeout-ms", "300"]);
        let mut raw = Raw::connect(tls_addr);
        // The first bytes of a ClientHello record, and no more.
        raw.stream.write_all(&[22, 3, 1, 0, 200, 1]).unwrap();
        let started = Instant::now();
        assert!(raw.is_closed_by_server(), "{driver}");
        assert!(started.elapsed() < Duration::from_secs(3), "{driver}");
    }
}

/// An idle TLS connection parks (its task ends; its TLS state stays in
/// its slot) and both directions go on after: deliveries written by the
/// shard while it is parked, and the client's next message.
#[test]
fn parked_tls_connections_keep_their_session() {
    let cert = make_cert("park");
    for driver in DRIVERS {
        let (server, tls_addr) = start(driver, &cert, &["--park-after-ms", "100"]);
        tokio_rt().block_on(async {
            let config = client_config(&[&cert.der], &[&rustls::version::TLS13]);
            let mut sub = connect(tls_addr, "/ws", config).await.unwrap();
            assert!(matches!(next_message(&mut sub).await, Message::Text(t) if t.starts_with("HELLO ")));
            sub.send(Message::Text("SUB p".into())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            let (mut publisher, _) = tokio_tungstenite::connect_async(server.url("/ws")).await.unwrap();
            for i in 0..3 {
                publisher.send(Message::Text(format!("PUB p m{i}"))).await.unwrap();
                assert_eq!(next_message(&mut sub).await, Message::Text(format!("MSG p m{i}")));
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            sub.send(Message::Text("PUB p back".into())).await.unwrap();
            assert_eq!(next_message(&mut sub).await, Message::Text("MSG p back".into()));
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(server.metric("sluice_parks_total") >= 2, "{driver}");
    }
}
