//! Queued deliveries are counted per core (`sluice_queued_bytes`), and a
//! core over its budget holds its publishers. Every way a subscriber
//! closes, with deliveries still queued for it, must take them off that
//! count; and one message larger than `--max-outbound-bytes` is delivered
//! to subscribers that keep up. Under both I/O drivers.

mod common;

use common::{masked_frame, upgrade_request, Raw, Server};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes";

fn token(user: &str, secs: u64) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({
            "sub": user,
            "exp": exp,
            "sluice": {"subscribe": ["q", "self.*"], "publish": ["self.*"]},
        }),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A native subscriber of `topic` with a token valid for `secs`; its
/// session id (from HELLO).
fn subscriber(server: &Server, topic: &str, secs: u64) -> (Raw, String) {
    let mut raw = Raw::open(server.addr, &format!("/ws?token={}", token("u", secs)));
    let hello = String::from_utf8(raw.read_frame().unwrap().payload).unwrap();
    raw.send(&masked_frame(0x81, format!("SUB {topic}").as_bytes()));
    (raw, hello["HELLO ".len()..].to_string())
}

fn admin_request(server: &Server, request: &str) -> String {
    let mut s = TcpStream::connect(server.admin_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    all
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

both_drivers!(every_close_path_gives_queued_deliveries_back, |driver| {
    let secret = std::env::temp_dir().join(format!("sluice-queued-{}-{driver}", std::process::id()));
    std::fs::write(&secret, SECRET).unwrap();
    let mut server = Server::start(
        driver,
        &[
            "--jwt-secret-file",
            secret.to_str().unwrap(),
            "--jwt-leeway-secs",
            "0",
            // Queues may grow large here: what is tested is what happens
            // to them when their sessions close.
            "--max-outbound-bytes",
            "67108864",
            "--max-core-outbound-bytes",
            "1073741824",
            "--max-messages-per-sec",
            "20",
            "--idle-timeout-ms",
            "5000",
            "--ping-interval-ms",
            "4000",
            "--stomp-heart-beat-ms",
            "1000",
            "--stomp-heart-beat-grace-ms",
            "200",
            "--close-timeout-ms",
            "500",
        ],
    );
    // Subscribers that never read: their sockets fill, then their queues.
    let (idle, _) = subscriber(&server, "q", 600);
    let (deleted, deleted_id) = subscriber(&server, "q", 600);
    let (expiring, _) = subscriber(&server, "q", 2);
    // A STOMP subscriber that promised a heart-beat every second.
    let mut silent = Raw::connect(server.addr);
    silent.send(
        upgrade_request(
            &format!("/stomp?token={}", token("u", 600)),
            "Sec-WebSocket-Protocol: v12.stomp\r\n",
        )
        .as_bytes(),
    );
    assert!(silent.read_head().starts_with("HTTP/1.1 101 "));
    silent.send(&masked_frame(
        0x81,
        b"CONNECT\naccept-version:1.2\nhost:x\nheart-beat:1000,0\n\n\0SUBSCRIBE\nid:0\ndestination:/topic/q\n\n\0",
    ));
    std::thread::sleep(Duration::from_millis(300));
    // 32 MiB to each, in 64 KiB messages: far more than their sockets take.
    let body = "z".repeat(64 * 1024);
    for _ in 0..512 {
        let response = admin_request(
            &server,
            &format!(
                "POST /publish?topic=q HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    }
    wait_for("deliveries never queued", Duration::from_secs(10), || {
        server.metric("sluice_queued_bytes") > 32 << 20
    });
    // Subscribers that close while their own publishes to themselves are
    // queued for them, in the read that closes them: a close frame, a
    // protocol violation, past the message rate.
    let endings: [(&str, Vec<u8>); 3] = [
        ("pc", masked_frame(0x88, &1000u16.to_be_bytes())),
        ("v", masked_frame(0x83, b"")),
        (
            "rl",
            (0..30).flat_map(|_| masked_frame(0x81, b"PUB self.rl x")).collect(),
        ),
    ];
    let mut ended = Vec::new();
    for (name, ending) in endings {
        let topic = format!("self.{name}");
        let (mut raw, _) = subscriber(&server, &topic, 600);
        std::thread::sleep(Duration::from_millis(100));
        let mut input: Vec<u8> = (0..8)
            .flat_map(|_| masked_frame(0x82, format!("PUB {topic} {body}").as_bytes()))
            .collect();
        input.extend(ending);
        raw.send(&input);
        ended.push(raw);
    }
    // An admin close, while its queue is full.
    let response = admin_request(
        &server,
        &format!("DELETE /sessions/{deleted_id}?code=4000 HTTP/1.1\r\nConnection: close\r\n\r\n"),
    );
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    // The token expires, the heart-beat is missed, the idle timeout passes:
    // every session ends, and nothing is left counted.
    wait_for("sessions did not all end", Duration::from_secs(15), || {
        server.metric("sluice_connections") == 0
    });
    assert_eq!(server.metric("sluice_queued_bytes"), 0);
    assert!(server.metric("sluice_tokens_expired_total") >= 1);
    assert!(server.metric("sluice_rate_limited_total") >= 1);
    // Publishing is not held: a new subscriber gets a publish at once.
    let (mut fresh, _) = subscriber(&server, "q", 600);
    std::thread::sleep(Duration::from_millis(300));
    let response = admin_request(
        &server,
        "POST /publish?topic=q HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert_eq!(fresh.read_frame().unwrap().payload, b"MSG q hi");
    drop((idle, deleted, expiring, silent, ended, fresh));
    assert_eq!(server.terminate().code(), Some(0), "{}", server.log());
});

/// Reads one data message whole (`Raw::read_frame` reads any length).
fn read_message(raw: &mut Raw) -> Vec<u8> {
    let f = raw.read_frame().expect("a message");
    assert!(f.fin && (f.opcode == 1 || f.opcode == 2), "{:?}", f.opcode);
    f.payload
}

both_drivers!(
    a_message_larger_than_the_outbound_limit_reaches_subscribers_that_keep_up,
    |driver| {
        // Defaults: --max-outbound-bytes is 1 MiB, --max-message-bytes 16 MiB.
        // The limit bounds a backlog, not one message: subscribers whose queue
        // is empty take any admitted message, under either policy.
        for policy in ["close", "drop"] {
            let server = Server::start(driver, &["--slow-consumer", policy]);
            let mut subs: Vec<Raw> = (0..4)
                .map(|_| {
                    let mut raw = Raw::open(server.addr, "/ws");
                    raw.read_frame().unwrap();
                    raw.send(&masked_frame(0x81, b"SUB big"));
                    raw
                })
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            let mut publisher = Raw::open(server.addr, "/ws");
            publisher.read_frame().unwrap();
            for size in [1_048_000, 1_100_000, 4 << 20] {
                let mut pub_frame = b"PUB big ".to_vec();
                pub_frame.resize(8 + size, b'x');
                publisher.send(&masked_frame(0x82, &pub_frame));
                for sub in &mut subs {
                    let got = read_message(sub);
                    assert_eq!(got.len(), 8 + size, "{policy}: a {size}-byte publish");
                }
            }
            // From the admin API: 2 MB, answered and delivered.
            let body = "y".repeat(2_000_000);
            let response = admin_request(
                &server,
                &format!(
                    "POST /publish?topic=big HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
            );
            assert!(response.contains("\"published\":1"), "{response}");
            for sub in &mut subs {
                assert_eq!(read_message(sub).len(), 8 + body.len(), "{policy}: the admin publish");
            }
            assert_eq!(server.metric("sluice_slow_consumer_closes_total"), 0);
            assert_eq!(server.metric("sluice_dropped_total"), 0);
        }
    }
);

both_drivers!(a_backlog_at_the_outbound_limit_takes_no_more, |driver| {
    // A subscriber that does not read: once its queue holds 1 MiB, the
    // next message closes it (1008) or, under drop, is dropped.
    for (policy, counter) in [
        ("close", "sluice_slow_consumer_closes_total"),
        ("drop", "sluice_dropped_total"),
    ] {
        let server = Server::start(driver, &["--slow-consumer", policy, "--workers", "1"]);
        let mut stalled = Raw::open(server.addr, "/ws");
        stalled.read_frame().unwrap();
        stalled.send(&masked_frame(0x81, b"SUB jam"));
        std::thread::sleep(Duration::from_millis(200));
        let mut publisher = Raw::open(server.addr, "/ws");
        publisher.read_frame().unwrap();
        let mut frame = b"PUB jam ".to_vec();
        frame.resize(8 + 256 * 1024, b'x');
        let frame = masked_frame(0x82, &frame);
        // One publish at a time, each taken by the server (and so queued,
        // and written as far as the subscriber's socket takes it) before
        // the next: the queue grows past what the socket took only once
        // the socket has refused bytes, which is when the limit applies.
        // (Several publishes in one read are a burst, queued whole.)
        let started = Instant::now();
        let mut sent = 0;
        while server.metric(counter) == 0 {
            assert!(started.elapsed() < Duration::from_secs(20), "{policy}: never refused");
            publisher.send(&frame);
            sent += 1;
            while server.metric("sluice_publishes_total") < sent {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "{policy}: publish not taken"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Within the limit plus one message when it was refused.
        assert!(server.metric("sluice_queued_bytes") <= (1 << 20) + 256 * 1024 + 64);
    }
});

// Two 2 MB publishes in one write, to a subscriber on a slower link (a
// 64 KiB window) that reads all the time: both are queued before its
// socket could take a byte, which is a burst, not the subscriber's
// backlog; it gets both, not 1008.
both_drivers!(
    two_large_publishes_in_one_read_reach_a_subscriber_that_reads,
    |driver| {
        let server = Server::start(driver, &["--workers", "1"]);
        // A subscriber on a link slower than loopback (a 64 KiB window), which
        // reads all the time.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        socket.connect(&server.addr.into()).unwrap();
        let mut sub = Raw { stream: socket.into() };
        sub.send(common::upgrade_request("/ws", "").as_bytes());
        assert!(sub.read_head().starts_with("HTTP/1.1 101 "));
        let _hello = sub.read_frame().unwrap();
        sub.send(&masked_frame(0x81, b"SUB big"));
        let mut publisher = Raw::open(server.addr, "/ws");
        let _hello = publisher.read_frame().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let body = "b".repeat(2_000_000);
        let mut both = masked_frame(0x81, format!("PUB big {body}").as_bytes());
        both.extend(masked_frame(0x81, format!("PUB big {body}").as_bytes()));
        let writer = std::thread::spawn(move || {
            publisher.send(&both);
            publisher
        });
        // It reads 64 KiB every 2 ms (about 30 MB/s): it keeps up with any
        // reasonable rate, just not with a loopback publisher.
        sub.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let frames = loop {
            std::thread::sleep(Duration::from_millis(2));
            let n = std::io::Read::read(&mut sub.stream, &mut chunk).unwrap_or(0);
            if n == 0 {
                break whole_frames(&got);
            }
            got.extend_from_slice(&chunk[..n]);
            let frames = whole_frames(&got);
            if frames.len() == 2 || frames.iter().any(|f| f.0 == 8) {
                break frames;
            }
        };
        let summary: Vec<(u8, usize)> = frames.iter().map(|f| (f.0, f.1.len())).collect();
        assert!(
            frames.len() == 2 && frames.iter().all(|f| f.0 == 1),
            "a reading subscriber got {summary:?} (opcode, length) instead of two messages; close: {:?}",
            frames
                .iter()
                .find(|f| f.0 == 8)
                .map(|f| String::from_utf8_lossy(&f.1).into_owned())
        );
        drop(writer.join().unwrap());
    }
);

/// Whole server frames at the front of `buf`: (opcode, payload).
fn whole_frames(buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() >= at + 2 {
        let b1 = buf[at + 1] & 0x7f;
        let (len, head) = match b1 {
            126 if buf.len() >= at + 4 => (u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize, 4),
            127 if buf.len() >= at + 10 => (
                u64::from_be_bytes(buf[at + 2..at + 10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if buf.len() < at + head + len {
            break;
        }
        out.push((buf[at] & 0x0f, buf[at + head..at + head + len].to_vec()));
        at += head + len;
    }
    out
}
