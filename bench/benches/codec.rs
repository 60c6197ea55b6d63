//! Micro-benchmarks of the RFC 6455 hot path: handshake, frame header,
//! unmasking (fast vs scalar twin) and UTF-8 validation; and what one
//! delivery costs to prepare per subscriber: a STOMP MESSAGE head against a
//! native frame's shared reference; STOMP frame parsing, topic lookup, and
//! a cross-core ring's push and pop between two threads; permessage-deflate
//! without context takeover: one message compressed (and the compressor
//! started afresh, as every message is) and inflated, by size and level.
//! Run: `cargo bench -p sluice-bench --bench codec`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::proto::stomp::frame::{Decoder, Item, Limits};
use sluice::pubsub::mesh::{self, Envelope};
use sluice::pubsub::message::{Fanout, Message};
use sluice::pubsub::topics::{StompTarget, Topics};
use sluice::pubsub::SessionKey;
use sluice::ws::frame::{decode_header, encode_frame, Opcode, Role};
use sluice::ws::handshake;
use sluice::ws::mask;
use sluice::ws::utf8::Utf8Validator;
use sluice::ws::MessageKind;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A SEND as stomp.js writes it (64-byte body), and a MESSAGE as sluice
/// writes it, each decoded from one WebSocket message.
fn stomp_bench(c: &mut Criterion) {
    let body = [b'.'; 64];
    let mut send = b"SEND\ndestination:/topic/prices.eur\ncontent-type:text/plain\ncontent-length:64\n\n".to_vec();
    send.extend_from_slice(&body);
    send.push(0);
    let mut message =
        b"MESSAGE\nsubscription:sub-0\nmessage-id:0-12345\ndestination:/topic/prices.eur\ncontent-length:64\n\n"
            .to_vec();
    message.extend_from_slice(&body);
    message.push(0);
    let mut group = c.benchmark_group("stomp_decode");
    for (name, wire) in [("send_64B", &send), ("message_64B", &message)] {
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(name, |b| {
            let mut d = Decoder::new(Limits::default());
            b.iter(|| {
                d.push(black_box(wire));
                match d.next_item() {
                    Ok(Some(Item::Frame(f))) => f,
                    other => panic!("{other:?}"),
                }
            })
        });
    }
    group.finish();
}

/// A publish finds its topic's subscribers among 10,000 topics.
fn topic_lookup_bench(c: &mut Criterion) {
    let mut topics = Topics::default();
    for i in 0..10_000 {
        topics.subscribe(
            format!("prices.{i}").as_bytes(),
            SessionKey::default(),
            sluice::pubsub::topics::Via::Native,
        );
    }
    c.bench_function("topics/lookup_among_10000", |b| {
        b.iter(|| topics.subscribers(black_box(b"prices.5000")).map(|s| s.len()))
    });
}

/// One envelope from core 0 to core 1: pushed by one thread, popped by
/// another, as publishes cross cores (the consumer drains as it would in
/// its mesh loop; no doorbell, both threads spin).
fn mesh_bench(c: &mut Criterion) {
    let message = Arc::new(Message::native(MessageKind::Text, b"t", &[0u8; 32], 0));
    c.bench_function("mesh/envelope_across_two_threads", |b| {
        b.iter_custom(|iters| {
            let mut meshes = mesh::build(2, 4096, None).unwrap();
            let consumer = meshes.pop().unwrap();
            let producer = meshes.pop().unwrap();
            let drain = std::thread::spawn(move || {
                let mut got = 0;
                while got < iters {
                    got += consumer.drain(
                        |e| {
                            black_box(e);
                        },
                        || false,
                    ) as u64;
                }
            });
            let start = Instant::now();
            for _ in 0..iters {
                let mut envelope = Envelope::Publish(message.clone());
                while let Err(back) = producer.send(1, envelope) {
                    envelope = back;
                    std::hint::spin_loop();
                }
            }
            drain.join().unwrap();
            start.elapsed().max(Duration::from_nanos(1))
        })
    });
}

/// JSON-like text: records of ids, prices, quantities and sides.
fn json_like(len: usize) -> Vec<u8> {
    let mut out = b"{\"items\":[".to_vec();
    let mut i = 0u64;
    while out.len() < len {
        i += 1;
        let record = format!(
            "{{\"id\":{},\"price\":{}.{:02},\"qty\":{},\"side\":\"{}\"}},",
            i.wrapping_mul(7_919) % 1_000_000,
            i.wrapping_mul(31) % 1000,
            i.wrapping_mul(17) % 100,
            i.wrapping_mul(13) % 500,
            ["buy", "sell"][(i.wrapping_mul(5) % 3 % 2) as usize]
        );
        out.extend_from_slice(record.as_bytes());
    }
    out.truncate(len);
    out
}

fn deflate_bench(c: &mut Criterion) {
    use sluice::ws::deflate::{Deflater, Inflater};
    let mut group = c.benchmark_group("deflate");
    for len in [0usize, 64, 256, 1024, 4096] {
        let message = json_like(len);
        group.throughput(Throughput::Bytes(len as u64));
        for level in [1u32, 6] {
            let mut deflater = Deflater::new(level, 15);
            let mut out = Vec::with_capacity(len + 64);
            group.bench_with_input(
                BenchmarkId::new(format!("compress_level{level}"), len),
                &message,
                |b, m| {
                    b.iter(|| {
                        out.clear();
                        deflater.compress(black_box(m), &mut out, false);
                        out.len()
                    })
                },
            );
            let mut packed = Vec::new();
            Deflater::new(level, 15).compress(&message, &mut packed, false);
            eprintln!("deflate: {len} B at level {level}: {} B", packed.len());
            let mut inflater = Inflater::default();
            let mut plain = Vec::with_capacity(len + 64);
            group.bench_with_input(
                BenchmarkId::new(format!("inflate_level{level}"), len),
                &packed,
                |b, p| {
                    b.iter(|| {
                        plain.clear();
                        inflater.inflate(black_box(p), &mut plain, 1 << 20, false).unwrap();
                        plain.len()
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    deflate_bench,
    handshake_bench,
    header_bench,
    mask_bench,
    utf8_bench,
    per_subscriber_bench,
    stomp_bench,
    topic_lookup_bench,
    mesh_bench
);
criterion_main!(benches);
