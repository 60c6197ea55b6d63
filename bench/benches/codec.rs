//! Micro-benchmarks of the RFC 6455 hot path: handshake, frame header,
//! unmasking (fast vs scalar twin) and UTF-8 validation; and what one
//! delivery costs to prepare per subscriber: a STOMP MESSAGE head against a
//! native frame's shared reference.
//! Run: `cargo bench -p sluice-bench --bench codec`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::pubsub::message::{Fanout, Message};
use sluice::pubsub::topics::StompTarget;
use sluice::ws::frame::{decode_header, encode_frame, Opcode, Role};
use sluice::ws::handshake;
use sluice::ws::mask;
use sluice::ws::utf8::Utf8Validator;
use sluice::ws::MessageKind;

const REQUEST: &[u8] = b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1\r\nUser-Agent: bench\r\n\r\n";

fn handshake_bench(c: &mut Criterion) {
    c.bench_function("handshake/parse+validate+accept", |b| {
        b.iter(|| {
            let (head, _) = handshake::parse(black_box(REQUEST), 8192).unwrap().unwrap();
            let key = head.validate_upgrade().unwrap();
            let mut out = Vec::with_capacity(160);
            handshake::write_accept(&mut out, key, None);
            out
        })
    });
}

fn header_bench(c: &mut Criterion) {
    let mut frame = Vec::new();
    encode_frame(&mut frame, true, Opcode::Binary, Some([1, 2, 3, 4]), &[0u8; 512]);
    c.bench_function("frame/decode_header_512B", |b| {
        b.iter(|| decode_header(black_box(&frame), Role::Server))
    });
}

fn mask_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    for size in [16usize, 512, 16 * 1024, 1024 * 1024] {
        let mut buf = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("fast", size), &size, |b, _| {
            b.iter(|| mask::apply(black_box(&mut buf), [1, 2, 3, 4], 1))
        });
        group.bench_with_input(BenchmarkId::new("scalar", size), &size, |b, _| {
            b.iter(|| mask::apply_scalar(black_box(&mut buf), [1, 2, 3, 4], 1))
        });
    }
    group.finish();
}

fn utf8_bench(c: &mut Criterion) {
    let text = "sluice κόσμε 🌊 ".repeat(1024);
    let mut group = c.benchmark_group("utf8");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("validate_16KiB_in_4_fragments", |b| {
        b.iter(|| {
            let mut v = Utf8Validator::default();
            let bytes = black_box(text.as_bytes());
            let q = bytes.len() / 4;
            for i in 0..4 {
                let end = if i == 3 { bytes.len() } else { (i + 1) * q };
                v.feed(&bytes[i * q..end], i == 3).unwrap();
            }
        })
    });
    group.finish();
}

/// Per subscriber, with the message's shared encodings already made: a
/// native subscriber takes a reference to the shared frame; a STOMP one the
/// MESSAGE made for an equal subscription (same id), or a head of its own,
/// carved from the core's arena, and a reference to the body. Each is
/// dropped as a written delivery would be.
fn per_subscriber_bench(c: &mut Criterion) {
    let message = Message::native(MessageKind::Text, b"load.0", &[b'.'; 64], 1 << 48 | 12345);
    let fanout = Fanout::new(&message);
    let target = |id: &str| StompTarget {
        id: id.into(),
        ack: false,
    };
    let mut arena = bytes::BytesMut::new();
    fanout.native();
    // Eight distinct subscriptions fill the shared frames; a ninth id gets
    // a head of its own every time.
    for i in 0..8 {
        fanout.stomp(&target(&format!("sub-{i}")), &mut arena, || true);
    }
    let (shared, own) = (target("sub-0"), target("sub-999"));
    let mut group = c.benchmark_group("delivery_per_subscriber_64B");
    group.bench_function("native_frame", |b| b.iter(|| black_box(fanout.native().clone())));
    group.bench_function("stomp_shared_frame", |b| {
        b.iter(|| black_box(fanout.stomp(black_box(&shared), &mut arena, || true)))
    });
    group.bench_function("stomp_own_head", |b| {
        b.iter(|| black_box(fanout.stomp(black_box(&own), &mut arena, || true)))
    });
    // The subscriber's queue is not empty: a buffer of its own.
    group.bench_function("stomp_own_head_queued", |b| {
        b.iter(|| black_box(fanout.stomp(black_box(&own), &mut arena, || false)))
    });
    group.finish();
}

criterion_group!(
    benches,
    handshake_bench,
    header_bench,
    mask_bench,
    utf8_bench,
    per_subscriber_bench
);
criterion_main!(benches);
