//! The record layer against rustls's own client, over a socket pair:
//! every suite, key updates both ways, and records that must be refused.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned, SupportedCipherSuite};

use super::*;

fn server_config_for_test() -> (Arc<ServerConfig>, CertificateDer<'static>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "sluice-records-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let files = CertFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, made.cert.pem()).unwrap();
    std::fs::write(&files.key, made.signing_key.serialize_pem()).unwrap();
    let config = server_config(Arc::new(CertResolver::new(files).unwrap())).unwrap();
    (config, made.cert.der().clone())
}

/// rustls's client settings for `suite` alone, trusting `root`.
fn client_config(root: &CertificateDer<'static>, suite: SupportedCipherSuite) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[suite.version()])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn client(
    root: &CertificateDer<'static>,
    suite: SupportedCipherSuite,
    sock: UnixStream,
) -> StreamOwned<ClientConnection, UnixStream> {
    client_with(client_config(root, suite), sock)
}

fn client_with(config: ClientConfig, sock: UnixStream) -> StreamOwned<ClientConnection, UnixStream> {
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    StreamOwned::new(conn, sock)
}

/// Runs the client's handshake until its Finished is written but not
/// sent (it waits in `wants_write`).
fn up_to_finished(mut stream: StreamOwned<ClientConnection, UnixStream>) -> StreamOwned<ClientConnection, UnixStream> {
    stream.conn.write_tls(&mut stream.sock).unwrap();
    while stream.conn.is_handshaking() {
        stream.conn.read_tls(&mut stream.sock).unwrap();
        stream.conn.process_new_packets().unwrap();
    }
    stream
}

/// An echo server on `TlsSession`: what it reads it writes back. Once the
/// handshake is done its key may seal `tx_limit` records. It ends with
/// the error that ended the connection.
fn echo_server(config: Arc<ServerConfig>, sock: UnixStream, tx_limit: Option<u64>) -> JoinHandle<io::Error> {
    std::thread::spawn(move || {
        let mut tls = TlsSession::new(config).unwrap();
        let fd = sock.as_fd();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let mut plain = Vec::new();
            match tls.recv_into(fd, &mut plain, 65_536) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return e,
            }
            if let (Some(limit), Stage::Traffic(records)) = (tx_limit, &mut tls.stage) {
                records.set_tx_limit(limit);
            }
            let mut at = 0;
            while at < plain.len() {
                match tls.send(fd, &plain[at..]) {
                    Ok(n) => at += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => return e,
                }
            }
            while !tls.flush_pending(fd).unwrap_or(true) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        io::Error::other("the test ran out of time")
    })
}

/// A socket pair with `echo_server` on one end; the other is the client's.
fn serve_pair(config: &Arc<ServerConfig>, tx_limit: Option<u64>) -> (UnixStream, JoinHandle<io::Error>) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    (a, echo_server(config.clone(), b, tx_limit))
}

/// The client's close_notify; how the server ended.
fn close(mut stream: StreamOwned<ClientConnection, UnixStream>, server: JoinHandle<io::Error>) -> io::Error {
    stream.conn.send_close_notify();
    stream.flush().unwrap();
    server.join().unwrap()
}

fn suites(version: rustls::ProtocolVersion) -> Vec<SupportedCipherSuite> {
    rustls::crypto::ring::default_provider()
        .cipher_suites
        .into_iter()
        // The certificate is ECDSA: TLS 1.2's RSA suites cannot be agreed.
        .filter(|s| s.version().version == version && !format!("{:?}", s.suite()).contains("_RSA_"))
        .collect()
}

fn payload(size: usize, seed: usize) -> Vec<u8> {
    (0..size).map(|i| ((i * 7 + seed) % 251) as u8).collect()
}

fn echo(stream: &mut StreamOwned<ClientConnection, UnixStream>, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut back = vec![0; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert!(back == message, "{} bytes came back changed", message.len());
}

/// TLS 1.3, each suite: messages of 0 to 70,000 bytes each way, while
/// the client asks for key updates (RFC 8446 4.6.3) and the server's key
/// reaches its limit every 5 records and changes. rustls's client checks
/// every record and every key change.
#[test]
fn tls13_every_suite_echoes_across_key_updates_both_ways() {
    let (config, root) = server_config_for_test();
    let tls13 = suites(rustls::ProtocolVersion::TLSv1_3);
    assert_eq!(tls13.len(), 3);
    for suite in tls13 {
        let (a, server) = serve_pair(&config, Some(5));
        let mut stream = client(&root, suite, a);
        for round in 0..40 {
            for size in [1usize, 125, 16_384, 16_385, 70_000] {
                echo(&mut stream, &payload(size, round));
            }
            if round % 3 == 0 {
                stream.conn.refresh_traffic_keys().unwrap();
            }
        }
        let end = close(stream, server);
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof, "{suite:?}: {end}");
    }
}

/// TLS 1.2, each suite: messages of 1 to 70,000 bytes each way; a key at
/// its limit ends the connection with close_notify (TLS 1.2 has no key
/// update), as rustls does.
#[test]
fn tls12_every_suite_echoes_and_closes_at_the_key_limit() {
    let (config, root) = server_config_for_test();
    let tls12 = suites(rustls::ProtocolVersion::TLSv1_2);
    assert_eq!(tls12.len(), 3);
    for suite in tls12 {
        let (a, server) = serve_pair(&config, None);
        let mut stream = client(&root, suite, a);
        for round in 0..20 {
            for size in [1usize, 125, 16_384, 16_385, 70_000] {
                echo(&mut stream, &payload(size, round));
            }
        }
        let end = close(stream, server);
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof, "{suite:?}: {end}");

        let (a, server) = serve_pair(&config, Some(3));
        let mut stream = client(&root, suite, a);
        echo(&mut stream, b"one");
        // The key sealed the handshake's Finished and "one": one record
        // more and it is spent. The rest is refused, and close_notify ends
        // the stream cleanly.
        let sent = payload(40_000, 1);
        stream.write_all(&sent).unwrap();
        let mut back = Vec::new();
        let read = stream.read_to_end(&mut back);
        assert!(read.is_ok(), "{suite:?}: {read:?}");
        assert!(!back.is_empty() && back.len() <= MAX_PLAIN, "{suite:?}: {}", back.len());
        assert!(sent.starts_with(&back), "{suite:?}");
        let end = server.join().unwrap();
        assert_eq!(end.kind(), io::ErrorKind::InvalidData, "{suite:?}: {end}");
    }
}

/// A client connection whose handshake is done.
fn connected(version: rustls::ProtocolVersion) -> (StreamOwned<ClientConnection, UnixStream>, JoinHandle<io::Error>) {
    let (config, root) = server_config_for_test();
    let (a, server) = serve_pair(&config, None);
    let mut stream = client(&root, suites(version)[0], a);
    echo(&mut stream, b"ready");
    (stream, server)
}

/// The alert the client got for what it sent.
fn alert_received(stream: &mut StreamOwned<ClientConnection, UnixStream>) -> String {
    let mut buf = [0; 64];
    match stream.read(&mut buf) {
        Err(e) => e.to_string(),
        Ok(n) => format!("read {n} bytes, no alert"),
    }
}

/// A record changed on the way fails to decrypt: bad_record_mac (RFC
/// 8446 5.2), and the connection ends.
#[test]
fn a_changed_record_is_refused_with_bad_record_mac() {
    for version in [rustls::ProtocolVersion::TLSv1_3, rustls::ProtocolVersion::TLSv1_2] {
        let (mut stream, server) = connected(version);
        stream.conn.writer().write_all(b"hello").unwrap();
        let mut record = Vec::new();
        stream.conn.write_tls(&mut record).unwrap();
        let last = record.len() - 1;
        record[last] ^= 1;
        stream.sock.write_all(&record).unwrap();
        let end = server.join().unwrap();
        assert!(end.to_string().contains("failed to decrypt"), "{end}");
        assert!(alert_received(&mut stream).contains("BadRecordMac"), "{version:?}");
    }
}

/// A record longer than the version allows is refused from its header,
/// before its body comes (record_overflow, RFC 8446 5.2, RFC 5246
/// 6.2.3); one at the limit is read whole (and fails to decrypt here).
#[test]
fn a_record_over_its_length_limit_is_refused_from_its_header() {
    for (version, limit) in [
        (rustls::ProtocolVersion::TLSv1_3, MAX_PLAIN + 256),
        (rustls::ProtocolVersion::TLSv1_2, MAX_PLAIN + 2048),
    ] {
        let (mut stream, server) = connected(version);
        let [hi, lo] = (limit as u16).to_be_bytes();
        stream.sock.write_all(&[23, 3, 3, hi, lo]).unwrap();
        stream.sock.write_all(&vec![0; limit]).unwrap();
        let end = server.join().unwrap();
        assert!(end.to_string().contains("failed to decrypt"), "{version:?}: {end}");

        let (mut stream, server) = connected(version);
        let [hi, lo] = (limit as u16 + 1).to_be_bytes();
        stream.sock.write_all(&[23, 3, 3, hi, lo]).unwrap();
        let end = server.join().unwrap();
        assert!(
            end.to_string().contains(&format!("a record of {} bytes", limit + 1)),
            "{end}"
        );
        assert!(alert_received(&mut stream).contains("RecordOverflow"), "{version:?}");
    }
}

/// After the handshake a TLS 1.3 record must be application_data outside
/// (RFC 8446 5): a change_cipher_spec, or a plain handshake record, ends
/// the connection with unexpected_message.
#[test]
fn tls13_records_of_other_outer_types_are_refused() {
    for record in [&[20u8, 3, 3, 0, 1, 1][..], &[22, 3, 3, 0, 5, 24, 0, 0, 1, 0]] {
        let (mut stream, server) = connected(rustls::ProtocolVersion::TLSv1_3);
        stream.sock.write_all(record).unwrap();
        let end = server.join().unwrap();
        assert!(end.to_string().contains("after the handshake"), "{end}");
        assert!(alert_received(&mut stream).contains("UnexpectedMessage"), "{record:?}");
    }
}

/// The peer's close_notify ends the stream after the data before it.
#[test]
fn close_notify_ends_the_stream_after_what_came_before() {
    let (mut stream, server) = connected(rustls::ProtocolVersion::TLSv1_3);
    stream.conn.writer().write_all(b"last words").unwrap();
    stream.conn.send_close_notify();
    stream.flush().unwrap();
    let mut back = [0; 10];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"last words");
    assert_eq!(server.join().unwrap().kind(), io::ErrorKind::UnexpectedEof);
}

/// A client whose Finished is written but not sent (in `wants_write`).
fn client_up_to_finished(
    version: rustls::ProtocolVersion,
    extract: bool,
) -> (StreamOwned<ClientConnection, UnixStream>, JoinHandle<io::Error>) {
    let (config, root) = server_config_for_test();
    let (a, server) = serve_pair(&config, None);
    let mut config = client_config(&root, suites(version)[0]);
    config.enable_secret_extraction = extract;
    (up_to_finished(client_with(config, a)), server)
}

/// A TLS 1.3 record of `typ` content sealed with the client's key.
fn seal13(secrets: &rustls::ConnectionTrafficSecrets, seq: u64, typ: u8, payload: &[u8]) -> Vec<u8> {
    let (algorithm, key, iv) = match secrets {
        rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&ring::aead::AES_128_GCM, key, iv),
        rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&ring::aead::AES_256_GCM, key, iv),
        rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&ring::aead::CHACHA20_POLY1305, key, iv),
        _ => panic!("a suite the test does not have"),
    };
    let key = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(algorithm, key.as_ref()).unwrap());
    let mut nonce: [u8; 12] = iv.as_ref().try_into().unwrap();
    for (b, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    let mut body = payload.to_vec();
    body.push(typ);
    let [hi, lo] = ((body.len() + 16) as u16).to_be_bytes();
    let header = [23, 3, 3, hi, lo];
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key(nonce),
        ring::aead::Aad::from(header),
        &mut body,
    )
    .unwrap();
    let mut record = header.to_vec();
    record.extend_from_slice(&body);
    record
}

/// Reads what the server sends until it closes.
fn drain_and_close(mut sock: UnixStream) {
    sock.set_nonblocking(true).unwrap();
    let mut sink = [0; 65536];
    while let Ok(n) = sock.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
    std::thread::sleep(Duration::from_millis(100));
}

/// The client's Finished, a KeyUpdate that asks for ours and data, in one
/// read: rustls must not see the records behind the Finished (it would
/// answer the key update itself, and its answer would be lost with it).
#[test]
fn a_key_update_in_the_read_of_the_finished_is_answered_once() {
    let (mut stream, server) = client_up_to_finished(rustls::ProtocolVersion::TLSv1_3, false);
    stream.conn.refresh_traffic_keys().unwrap();
    stream.conn.writer().write_all(b"hello").unwrap();
    let mut flight = Vec::new();
    while stream.conn.wants_write() {
        stream.conn.write_tls(&mut flight).unwrap();
    }
    stream.sock.write_all(&flight).unwrap();
    let mut back = [0; 5];
    let read = stream.read_exact(&mut back);
    drop(stream);
    let end = server.join().unwrap();
    assert!(read.is_ok(), "client: {read:?}; server ended with {end}");
    assert_eq!(&back, b"hello");
}

/// A KeyUpdate split over two records (RFC 8446 5.1), the first in the
/// read of the Finished, the second after: joined once, not decrypted
/// twice. And the same records sent after the hand-over.
#[test]
fn a_split_key_update_is_joined_before_and_after_the_hand_over() {
    for with_finished in [true, false] {
        let (mut stream, server) = client_up_to_finished(rustls::ProtocolVersion::TLSv1_3, true);
        let mut finished = Vec::new();
        while stream.conn.wants_write() {
            stream.conn.write_tls(&mut finished).unwrap();
        }
        let StreamOwned { conn, mut sock } = stream;
        let (seq, tx) = conn.dangerous_extract_secrets().unwrap().tx;
        let first = seal13(&tx, seq, 22, &[24, 0]);
        if with_finished {
            sock.write_all(&[finished, first].concat()).unwrap();
        } else {
            sock.write_all(&finished).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            sock.write_all(&first).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = sock.write_all(&seal13(&tx, seq + 1, 22, &[0, 1, 0]));
        std::thread::sleep(Duration::from_millis(200));
        drain_and_close(sock);
        let end = server.join().unwrap();
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof, "{with_finished}: {end}");
    }
}

/// Key updates cost a key derivation each and carry nothing: 32 between
/// two records of data are taken, the 33rd ends the connection (as rustls
/// and BoringSSL count them).
#[test]
fn key_updates_without_data_are_bounded() {
    let (mut stream, server) = connected(rustls::ProtocolVersion::TLSv1_3);
    for _ in 0..32 {
        stream.conn.refresh_traffic_keys().unwrap();
    }
    echo(&mut stream, b"data");
    for _ in 0..33 {
        stream.conn.refresh_traffic_keys().unwrap();
    }
    stream.flush().unwrap();
    let end = server.join().unwrap();
    assert!(end.to_string().contains("too many key updates"), "{end}");
    assert!(alert_received(&mut stream).contains("UnexpectedMessage"));
}

/// Records that carry nothing are bounded as rustls bounds them: 32 empty
/// records in a row, 4 warning alerts in all (user_canceled, RFC 8446 6).
/// At the bound the connection goes on to the peer's close_notify; one
/// past it ends the connection.
#[test]
fn empty_records_and_warning_alerts_are_bounded() {
    let cases: [(u8, &[u8], u64, &str); 2] = [
        (23, &[], 32, "too many empty records"),
        (21, &[1, 90], 4, "too many warning alerts"),
    ];
    for (typ, payload, allowed, reason) in cases {
        for extra in [0, 1] {
            let (mut stream, server) = client_up_to_finished(rustls::ProtocolVersion::TLSv1_3, true);
            let mut wire = Vec::new();
            while stream.conn.wants_write() {
                stream.conn.write_tls(&mut wire).unwrap();
            }
            let StreamOwned { conn, mut sock } = stream;
            let (seq, tx) = conn.dangerous_extract_secrets().unwrap().tx;
            let sent = allowed + extra;
            for i in 0..sent {
                wire.extend_from_slice(&seal13(&tx, seq + i, typ, payload));
            }
            wire.extend_from_slice(&seal13(&tx, seq + sent, 21, &[1, 0]));
            sock.write_all(&wire).unwrap();
            drain_and_close(sock);
            let end = server.join().unwrap();
            if extra == 0 {
                assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof, "{typ} x {sent}: {end}");
            } else {
                assert!(end.to_string().contains(reason), "{typ} x {sent}: {end}");
            }
        }
    }
}

/// Raw bytes to a fresh `echo_server`: how its thread ended (a panic is `Err`).
fn raw_to_server(bytes: &[u8]) -> std::thread::Result<io::Error> {
    let (config, _root) = server_config_for_test();
    let (mut a, server) = serve_pair(&config, None);
    a.write_all(bytes).unwrap();
    let end = server.join();
    drop(a);
    end
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// rustls's client's TLS 1.3 ClientHello, with an empty early_data
/// extension (RFC 8446 4.2.10) added at the end: rustls's server then
/// rejects early data and trial-decrypts what follows (up to 16384 bytes).
fn client_hello_with_early_data() -> Vec<u8> {
    let (_, root) = server_config_for_test();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 22);
    assert_eq!(hello.len(), 5 + usize::from(u16::from_be_bytes([hello[3], hello[4]])));
    let mut at = 9 + 2 + 32;
    at += 1 + usize::from(hello[at]);
    at += 2 + usize::from(u16::from_be_bytes([hello[at], hello[at + 1]]));
    at += 1 + usize::from(hello[at]);
    let ext_len = usize::from(u16::from_be_bytes([hello[at], hello[at + 1]]));
    assert_eq!(at + 2 + ext_len, hello.len());
    hello.extend_from_slice(&[0, 42, 0, 0]);
    let bump16 = |h: &mut Vec<u8>, i: usize| {
        let v = u16::from_be_bytes([h[i], h[i + 1]]) + 4;
        h[i..i + 2].copy_from_slice(&v.to_be_bytes());
    };
    bump16(&mut hello, at);
    bump16(&mut hello, 3);
    let hs = u32::from_be_bytes([0, hello[6], hello[7], hello[8]]) + 4;
    hello[6..9].copy_from_slice(&hs.to_be_bytes()[1..]);
    hello
}

#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// A `server_config` whose key exchange is secp256r1 only: rustls's client
/// sends an X25519 share first, and is asked again (HelloRetryRequest).
fn hrr_server_config(config: &Arc<ServerConfig>) -> Arc<ServerConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![rustls::crypto::ring::kx_group::SECP256R1];
    let mut c = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(config.cert_resolver.clone());
    c.alpn_protocols = config.alpn_protocols.clone();
    c.ticketer = config.ticketer.clone();
    c.max_early_data_size = 0;
    c.enable_secret_extraction = true;
    Arc::new(c)
}

#[derive(Debug, Default)]
struct HandshakeSecret(std::sync::Mutex<Vec<u8>>);

impl rustls::KeyLog for HandshakeSecret {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if label == "CLIENT_HANDSHAKE_TRAFFIC_SECRET" {
            *self.0.lock().unwrap() = secret.to_vec();
        }
    }
}

/// HKDF-Expand-Label (RFC 8446 7.1) with SHA-256, empty context.
fn expand_label(secret: &[u8], label: &str, len: usize) -> Vec<u8> {
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let full = format!("tls13 {label}");
    let mut info = (len as u16).to_be_bytes().to_vec();
    info.push(full.len() as u8);
    info.extend_from_slice(full.as_bytes());
    info.push(0);
    let prk = ring::hkdf::Prk::new_less_safe(ring::hkdf::HKDF_SHA256, secret);
    let infos = [&info[..]];
    let okm = prk.expand(&infos, Len(len)).unwrap();
    let mut out = vec![0; len];
    okm.fill(&mut out).unwrap();
    out
}

/// A client holding a ticket that allows early data (from another server of
/// the same name: ours allow none) sends 6,000 bytes of it with its
/// ClientHello. The server cannot use the ticket, rejects the early data
/// and skips its record by trial decryption (RFC 8446 4.2.10), within a
/// budget of 16,384 bytes. A record given to rustls more than once is
/// skipped again and spends the budget again: it must be given once, as
/// rustls's own connection does.
#[test]
fn rejected_early_data_is_skipped_within_its_budget() {
    let (config, root) = server_config_for_test();
    let mut zero_rtt = (*config).clone();
    zero_rtt.max_early_data_size = 16_384;
    zero_rtt.ticketer = Arc::new(NoTickets);
    let zero_rtt = Arc::new(zero_rtt);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut client_config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_config.enable_early_data = true;
    let client_config = Arc::new(client_config);
    let name = || ServerName::try_from("localhost").unwrap();

    let ticket = |client_config: &Arc<ClientConfig>| {
        let (a, b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn({
            let zero_rtt = zero_rtt.clone();
            move || {
                let mut s = StreamOwned::new(rustls::ServerConnection::new(zero_rtt).unwrap(), b);
                s.write_all(b"x").unwrap();
                s.flush().unwrap();
                let mut one = [0; 1];
                let _ = s.read(&mut one);
            }
        });
        let mut c = StreamOwned::new(ClientConnection::new(client_config.clone(), name()).unwrap(), a);
        let mut one = [0; 1];
        c.read_exact(&mut one).unwrap();
        drop(c);
        srv.join().unwrap();
    };

    for ours in [false, true] {
        ticket(&client_config);
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let server = if ours {
            b.set_nonblocking(true).unwrap();
            let h = echo_server(config.clone(), b, None);
            std::thread::spawn(move || h.join().unwrap().to_string())
        } else {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut s = StreamOwned::new(rustls::ServerConnection::new(config).unwrap(), b);
                let mut buf = [0; 5];
                match s.read_exact(&mut buf) {
                    Ok(()) => {
                        s.write_all(&buf).unwrap();
                        s.flush().unwrap();
                        "echoed".to_string()
                    }
                    Err(e) => e.to_string(),
                }
            })
        };
        let mut conn = ClientConnection::new(client_config.clone(), name()).unwrap();
        let mut early = conn.early_data().expect("the ticket allows early data");
        early.write_all(&payload(6_000, 3)).unwrap();
        let mut stream = StreamOwned::new(conn, a);
        stream.write_all(b"hello").unwrap();
        let mut back = [0; 5];
        let read = stream.read_exact(&mut back);
        assert!(!stream.conn.is_early_data_accepted());
        drop(stream);
        let end = server.join().unwrap();
        eprintln!("ours={ours}: client {read:?}, server {end}");
        assert!(read.is_ok(), "ours={ours}: client {read:?}, server {end}");
    }
}

/// HelloRetryRequest, then resumption (TLS 1.3 tickets, TLS 1.2 tickets),
/// each with a ClientHello split into 7-byte fragment records sent a few
/// records a write: the handshakes complete and data goes both ways.
#[test]
fn hello_retry_resumption_and_split_hellos_complete() {
    let (plain_config, root) = server_config_for_test();
    let hrr = hrr_server_config(&plain_config);
    for (name, config, version) in [
        ("tls13-hrr", hrr.clone(), &rustls::version::TLS13),
        ("tls13", plain_config.clone(), &rustls::version::TLS13),
        ("tls12", plain_config.clone(), &rustls::version::TLS12),
    ] {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let cc = Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        for round in 0..3 {
            for split in [false, true] {
                let (a, server) = serve_pair(&config, None);
                let mut conn = ClientConnection::new(cc.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
                a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut sock = a;
                if split {
                    // The ClientHello, re-cut into fragments of 2 bytes.
                    let mut hello = Vec::new();
                    conn.write_tls(&mut hello).unwrap();
                    let body = &hello[5..];
                    let mut out = Vec::new();
                    for chunk in body.chunks(2) {
                        out.extend_from_slice(&[22, 3, 1, 0, chunk.len() as u8]);
                        out.extend_from_slice(chunk);
                    }
                    for (i, piece) in out.chunks(40).enumerate() {
                        sock.write_all(piece).unwrap();
                        if i % 50 == 0 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                }
                let mut stream = StreamOwned::new(conn, sock);
                let message = payload(3000, round);
                stream.write_all(&message).unwrap();
                let mut back = vec![0; message.len()];
                let read = stream.read_exact(&mut back);
                let kind = stream.conn.handshake_kind();
                drop(stream);
                let end = server.join().unwrap();
                eprintln!("{name} round {round} split {split}: {kind:?} {read:?} / server {end}");
                assert!(
                    read.is_ok() && back == message,
                    "{name} {round} {split}: {read:?}, server {end}"
                );
            }
        }
    }
}

/// The client's Finished cut into 4-byte fragments, one record each, the
/// last cut across two reads, a KeyUpdate that asks for ours and data
/// behind it in the second read. rustls joins the fragments of the first
/// read over their record headers, so the leftover is no longer a run of
/// records: where rustls stopped is kept, not found again by walking it,
/// and rustls is not given the records behind the Finished.
#[test]
fn a_finished_in_fragments_across_reads_then_a_key_update() {
    let (config, root) = server_config_for_test();
    let (a, server) = serve_pair(&config, None);
    let log = Arc::new(HandshakeSecret::default());
    let mut cc = client_config(&root, rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256);
    cc.key_log = log.clone();
    let mut stream = up_to_finished(client_with(cc, a));
    let mut flight = Vec::new();
    while stream.conn.wants_write() {
        stream.conn.write_tls(&mut flight).unwrap();
    }
    // The flight: perhaps a change_cipher_spec, then the Finished record.
    let mut at = 0;
    let mut records = vec![];
    while at < flight.len() {
        let len = usize::from(u16::from_be_bytes([flight[at + 3], flight[at + 4]]));
        records.push(flight[at..at + 5 + len].to_vec());
        at += 5 + len;
    }
    let secret = log.0.lock().unwrap().clone();
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &expand_label(&secret, "key", 16)).unwrap(),
    );
    let iv: [u8; 12] = expand_label(&secret, "iv", 12).try_into().unwrap();
    let nonce = |seq: u64| {
        let mut n = iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        ring::aead::Nonce::assume_unique_for_key(n)
    };
    let finished_record = records.pop().unwrap();
    let mut body = finished_record[5..].to_vec();
    let aad = ring::aead::Aad::from(<[u8; 5]>::try_from(&finished_record[..5]).unwrap());
    let inner = key.open_in_place(nonce(0), aad, &mut body).unwrap().to_vec();
    assert_eq!(*inner.last().unwrap(), 22);
    let finished = &inner[..inner.len() - 1];
    let mut first = records.concat();
    for (seq, fragment) in finished.chunks(4).enumerate() {
        let mut body = fragment.to_vec();
        body.push(22);
        let [hi, lo] = ((body.len() + 16) as u16).to_be_bytes();
        let header = [23, 3, 3, hi, lo];
        key.seal_in_place_append_tag(nonce(seq as u64), ring::aead::Aad::from(header), &mut body)
            .unwrap();
        first.extend_from_slice(&header);
        first.extend_from_slice(&body);
    }
    // What follows the Finished: a KeyUpdate asking for ours, and data.
    stream.conn.refresh_traffic_keys().unwrap();
    stream.conn.writer().write_all(b"hello").unwrap();
    let mut after = Vec::new();
    while stream.conn.wants_write() {
        stream.conn.write_tls(&mut after).unwrap();
    }
    let cut = first.len() - 3;
    stream.sock.write_all(&first[..cut]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut second = first[cut..].to_vec();
    second.extend_from_slice(&after);
    stream.sock.write_all(&second).unwrap();
    let mut back = [0; 5];
    let read = stream.read_exact(&mut back);
    drop(stream);
    let end = server.join().unwrap();
    eprintln!("client: {read:?}; server ended with {end}");
    assert!(read.is_ok(), "client: {read:?}; server ended with {end}");
    assert_eq!(&back, b"hello");
}

/// Handshake records rustls refuses, as a client's first bytes: each ends
/// the connection with an error, none panics (rustls keeps offsets into
/// the records it was given, and the alert is taken from them again: an
/// empty buffer made it index past its end, which aborted the server).
/// - a ClientHello header claiming 65,536 bytes (65,535 at most);
/// - a ClientHello's first byte, then a change_cipher_spec (RFC 8446 5.1);
/// - one record with a bad message before another.
#[test]
fn refused_handshake_records_end_the_connection_without_a_panic() {
    for bytes in [
        &[22u8, 3, 1, 0, 4, 1, 1, 0, 0][..],
        &[22, 3, 1, 0, 1, 1, 20, 3, 3, 0, 1, 1],
        &[22, 3, 1, 0, 8, 2, 0, 0, 0, 1, 0, 0, 0],
    ] {
        match raw_to_server(bytes) {
            Ok(end) => assert_eq!(end.kind(), io::ErrorKind::InvalidData, "{bytes:?}: {end}"),
            Err(p) => panic!("{bytes:?}: the server panicked: {}", panic_text(&p)),
        }
    }
}

/// A ClientHello that offers early data (which rustls then rejects,
/// skipping records it cannot open, RFC 8446 4.2.10), then empty
/// application_data records: refused at the first, which no AEAD could
/// have sealed (a tag and a content type are 17 bytes). Skipping them cost
/// rustls's budget nothing, and each was skipped again at every record
/// given after it: 4,000 of them took 1.85 s of one read.
#[test]
fn records_too_short_to_be_sealed_are_refused_in_the_handshake() {
    let (config, _) = server_config_for_test();
    let mut bytes = client_hello_with_early_data();
    for _ in 0..4000 {
        bytes.extend_from_slice(&[23, 3, 3, 0, 0]);
    }
    let (mut a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    a.write_all(&bytes).unwrap();
    let mut tls = TlsSession::new(config).unwrap();
    let started = Instant::now();
    let read = tls.recv_into(b.as_fd(), &mut Vec::new(), 65_536);
    let error = read.expect_err("refused");
    assert!(error.to_string().contains("too short to be sealed"), "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}
