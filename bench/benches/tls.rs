//! What one read of TLS records costs the server: a 64 KiB read of the
//! smallest records a client can send (one byte of plaintext each, about
//! 2,800 of them), against the same read of full 16 KiB records. The
//! client is rustls; the server side is `sluice::tls::TlsSession`, reading
//! from one end of a socket pair the ciphertext the client wrote to the
//! other.
//! Run: `cargo bench -p sluice-bench --bench tls`.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rustls::pki_types::{CertificateDer, ServerName};
use sluice::tls::{CertFiles, CertResolver, TlsSession};

/// Ciphertext per read, as the server reads it.
const READ_BYTES: usize = 64 * 1024;

struct Pair {
    client: rustls::ClientConnection,
    server: TlsSession,
    /// The client's end, and the server's.
    ours: UnixStream,
    theirs: UnixStream,
}

fn pair() -> Pair {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = CertFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, made.cert.pem()).unwrap();
    std::fs::write(&files.key, made.signing_key.serialize_pem()).unwrap();
    let server_config = sluice::tls::server_config(Arc::new(CertResolver::new(files).unwrap())).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(made.cert.der().to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client =
        rustls::ClientConnection::new(Arc::new(client_config), ServerName::try_from("localhost").unwrap()).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let mut p = Pair {
        client,
        server: TlsSession::new(server_config).unwrap(),
        ours,
        theirs,
    };
    // The handshake, over the pair.
    let mut plain = Vec::new();
    let mut buf = vec![0u8; READ_BYTES];
    while p.client.is_handshaking() || p.server.is_handshaking() {
        while p.client.wants_write() {
            p.client.write_tls(&mut p.ours).unwrap();
        }
        let _ = p.server.recv_into(p.theirs.as_fd(), &mut plain, READ_BYTES).unwrap();
        p.ours.set_nonblocking(true).unwrap();
        while let Ok(n) = p.ours.read(&mut buf) {
            p.client.read_tls(&mut &buf[..n]).unwrap();
            p.client.process_new_packets().unwrap();
        }
        p.ours.set_nonblocking(false).unwrap();
    }
    p
}

/// The client's ciphertext for `records` records of `each` plaintext bytes.
fn ciphertext(client: &mut rustls::ClientConnection, records: usize, each: usize) -> Vec<u8> {
    let payload = vec![b'x'; each];
    for _ in 0..records {
        // One write, one record.
        client.writer().write_all(&payload).unwrap();
    }
    let mut out = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut out).unwrap();
    }
    out
}

fn read_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("tls/read_64KiB");
    // A record of one byte is 5 + 1 + 1 + 16 = 23 bytes under TLS 1.3.
    for (name, records, each) in [("tiny_records", READ_BYTES / 23, 1), ("16KiB_records", 3, 16 * 1024)] {
        let Pair {
            mut client,
            mut server,
            mut ours,
            theirs,
        } = pair();
        let mut plain = Vec::with_capacity(READ_BYTES);
        let probe = ciphertext(&mut client, records, each);
        group.throughput(Throughput::Bytes(probe.len() as u64));
        ours.write_all(&probe).unwrap();
        let _ = server.recv_into(theirs.as_fd(), &mut plain, READ_BYTES).unwrap();
        assert_eq!(plain.len(), records * each, "{name}: every record decrypted");
        group.bench_function(name, |b| {
            b.iter_batched(
                || ours.write_all(&ciphertext(&mut client, records, each)).unwrap(),
                |()| {
                    plain.clear();
                    server.recv_into(theirs.as_fd(), &mut plain, READ_BYTES).unwrap()
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, read_bench);
criterion_main!(benches);
