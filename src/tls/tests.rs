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

fn client(
    root: &CertificateDer<'static>,
    suite: SupportedCipherSuite,
    sock: UnixStream,
) -> StreamOwned<ClientConnection, UnixStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[suite.version()])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    StreamOwned::new(conn, sock)
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
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let server = echo_server(config.clone(), b, Some(5));
        let mut stream = client(&root, suite, a);
        for round in 0..40 {
            for size in [1usize, 125, 16_384, 16_385, 70_000] {
                echo(&mut stream, &payload(size, round));
            }
            if round % 3 == 0 {
                stream.conn.refresh_traffic_keys().unwrap();
            }
        }
        stream.conn.send_close_notify();
        stream.flush().unwrap();
        let end = server.join().unwrap();
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
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let server = echo_server(config.clone(), b, None);
        let mut stream = client(&root, suite, a);
        for round in 0..20 {
            for size in [1usize, 125, 16_384, 16_385, 70_000] {
                echo(&mut stream, &payload(size, round));
            }
        }
        stream.conn.send_close_notify();
        stream.flush().unwrap();
        let end = server.join().unwrap();
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof, "{suite:?}: {end}");

        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let server = echo_server(config.clone(), b, Some(3));
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
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    let server = echo_server(config, b, None);
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
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    let server = echo_server(config, b, None);
    let suite = suites(version)[0];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[suite.version()])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.enable_secret_extraction = extract;
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut stream = StreamOwned::new(conn, a);
    stream.conn.write_tls(&mut stream.sock).unwrap();
    while stream.conn.is_handshaking() {
        stream.conn.read_tls(&mut stream.sock).unwrap();
        stream.conn.process_new_packets().unwrap();
    }
    (stream, server)
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
