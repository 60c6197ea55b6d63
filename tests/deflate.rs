//! permessage-deflate (RFC 7692) end to end: what is agreed at the
//! handshake, compressed messages both ways on every route, the rules of
//! RSV1, the bounds of inflating, and publishes compressed once for every
//! subscriber that agreed. Interop with other implementations is at the
//! end (Python's `websockets`, Node's `ws`, Chromium).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use sluice::ws::deflate::{deflater_bytes, Deflater, Inflater, INFLATER_BYTES};

/// What browsers offer.
const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
const AGREED: &str =
    "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n";

fn open_with(addr: std::net::SocketAddr, path: &str, extra: &str) -> (Raw, String) {
    let mut raw = Raw::connect(addr);
    raw.send(upgrade_request(path, extra).as_bytes());
    let head = raw.read_head();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    (raw, head)
}

fn open_deflate(addr: std::net::SocketAddr, path: &str) -> Raw {
    let (raw, head) = open_with(addr, path, OFFER);
    assert!(head.contains(AGREED), "{head}");
    raw
}

fn deflated(plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Deflater::new(6, 15).compress(plain, &mut out, false);
    out
}

fn inflated(packed: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Inflater::default().inflate(packed, &mut out, 1 << 30, false).unwrap();
    out
}

/// A message's payload as the client reads it: inflated if RSV1 is set.
fn message(frame: &Frame) -> Vec<u8> {
    if frame.rsv1 {
        inflated(&frame.payload)
    } else {
        frame.payload.clone()
    }
}

fn json(len: usize) -> Vec<u8> {
    let mut out = String::from("{\"items\":[");
    let mut i = 0u64;
    while out.len() < len {
        i += 1;
        out.push_str(&format!(
            "{{\"id\":{},\"price\":{}.{:02},\"side\":\"{}\"}},",
            i * 7919 % 100_000,
            i * 31 % 1000,
            i % 100,
            if i.is_multiple_of(3) { "buy" } else { "sell" }
        ));
    }
    out.truncate(len);
    out.into_bytes()
}

fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

both_drivers!(echo_agrees_and_compresses_each_message_worth_it, |driver| {
    let server = Server::start(driver, &[]);
    let mut raw = open_deflate(server.addr, "/echo");
    // A compressed message comes back compressed.
    let text = json(1000);
    raw.send_frame(0xC1, &deflated(&text));
    let f = raw.read_frame().unwrap();
    assert!(f.rsv1 && f.opcode == 1 && f.payload.len() < text.len() / 2);
    assert_eq!(inflated(&f.payload), text);
    // So does a plain one that is worth compressing: it is per message.
    raw.send_frame(0x82, &text);
    let f = raw.read_frame().unwrap();
    assert!(f.rsv1 && f.opcode == 2);
    assert_eq!(inflated(&f.payload), text);
    // Short ones (under --compress-min-bytes) and what does not shrink go
    // out as they are.
    raw.send_frame(0xC1, &deflated(b"hello"));
    assert_eq!(raw.read_frame().unwrap(), plain_frame(1, b"hello"));
    raw.send_frame(0xC2, &deflated(&[]));
    assert_eq!(raw.read_frame().unwrap(), plain_frame(2, b""));
    let random = noise(1 << 20);
    raw.send_frame(0xC2, &deflated(&random));
    let f = raw.read_frame().unwrap();
    assert!(!f.rsv1);
    assert_eq!(f.payload, random);
    // A compressed message in fragments, RSV1 on the first only, with a
    // ping between them.
    let big = json(200_000);
    let packed = deflated(&big);
    let third = packed.len() / 3;
    raw.send_frame(0x41, &packed[..third]);
    raw.send_frame(0x00, &packed[third..2 * third]);
    raw.send_frame(0x89, b"p");
    raw.send_frame(0x80, &packed[2 * third..]);
    assert_eq!(raw.read_frame().unwrap(), plain_frame(0xA, b"p"));
    let f = raw.read_frame().unwrap();
    assert_eq!(message(&f), big);
    // 1 MiB of text, compressed.
    let mib = json(1 << 20);
    raw.send_frame(0xC1, &deflated(&mib));
    assert_eq!(message(&raw.read_frame().unwrap()), mib);
    raw.send_frame(0x88, &1000u16.to_be_bytes());
    assert_eq!(raw.expect_close(), Some(1000));
    // The admin port's counters (refreshed at the cores' sweep ticks): 6
    // messages inflated; 5 compressed (short ones are not tried, the
    // random one was and did not shrink).
    let deadline = Instant::now() + Duration::from_secs(3);
    while server.metric("sluice_inflated_messages_total") < 6 {
        assert!(
            Instant::now() < deadline,
            "{}",
            server.metric("sluice_inflated_messages_total")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.metric("sluice_compressed_messages_total"), 5);
    let (given, made) = (
        server.metric("sluice_compressed_bytes_in_total"),
        server.metric("sluice_compressed_bytes_out_total"),
    );
    assert!(made < given, "{made} of {given}");
    assert!(server.metric("sluice_inflated_bytes_out_total") > server.metric("sluice_inflated_bytes_in_total"));
});

fn plain_frame(opcode: u8, payload: &[u8]) -> Frame {
    Frame {
        fin: true,
        rsv1: false,
        opcode,
        payload: payload.to_vec(),
    }
}

both_drivers!(what_is_agreed_follows_the_offer_and_the_route, |driver| {
    let dir = std::env::temp_dir().join(format!("sluice-deflate-{}-{driver}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        "[[route]]\npath = \"/on\"\nprotocol = \"echo\"\n\n[[route]]\npath = \"/off\"\nprotocol = \"echo\"\ndeflate = \"off\"\n",
    )
    .unwrap();
    let server = Server::start(driver, &["--config", config.to_str().unwrap()]);
    let agreed = |offer: &str| {
        let (_, head) = open_with(server.addr, "/on", offer);
        head.lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
            .map(str::to_string)
    };
    assert_eq!(agreed(""), None);
    assert_eq!(agreed("Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n"), None);
    // A bad offer is declined, and the next one taken (RFC 7692 5, 7.1).
    assert_eq!(
        agreed("Sec-WebSocket-Extensions: permessage-deflate; foo, permessage-deflate; server_max_window_bits=10\r\n")
            .as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10")
    );
    assert_eq!(
        agreed("Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=16\r\n"),
        None
    );
    let (_, head) = open_with(server.addr, "/off", OFFER);
    assert!(!head.contains("Extensions"), "{head}");
    // Without the extension, RSV1 is a protocol error (RFC 6455 5.2).
    let (mut raw, _) = open_with(server.addr, "/off", OFFER);
    raw.send_frame(0xC1, &deflated(b"hello"));
    assert_eq!(raw.expect_close(), Some(1002));
    // Off for every route without its own word.
    let server = Server::start(driver, &["--deflate", "off"]);
    let (_, head) = open_with(server.addr, "/echo", OFFER);
    assert!(!head.contains("Extensions"), "{head}");
});

both_drivers!(rsv1_and_compressed_data_break_the_rules_they_break, |driver| {
    let server = Server::start(driver, &["--max-message-bytes", "65536", "--max-frame-bytes", "65536"]);
    let close_after = |frames: &[(u8, Vec<u8>)]| {
        let mut raw = open_deflate(server.addr, "/echo");
        for (b0, payload) in frames {
            raw.send_frame(*b0, payload);
        }
        raw.expect_close()
    };
    // RFC 7692 6.1: RSV1 on a continuation frame, or on a control frame.
    assert_eq!(
        close_after(&[(0x01, b"he".to_vec()), (0xC0, b"llo".to_vec())]),
        Some(1002)
    );
    assert_eq!(close_after(&[(0xC9, Vec::new())]), Some(1002));
    // Not a deflate stream; text that is not UTF-8 once inflated.
    assert_eq!(close_after(&[(0xC2, vec![0xff; 16])]), Some(1007));
    assert_eq!(close_after(&[(0xC1, deflated(&[b'a', 0xff, 0xfe]))]), Some(1007));
    // What it inflates to is held to --max-message-bytes, at the byte.
    let mut raw = open_deflate(server.addr, "/echo");
    raw.send_frame(0xC2, &deflated(&vec![7; 65536]));
    assert_eq!(message(&raw.read_frame().unwrap()), vec![7; 65536]);
    assert_eq!(close_after(&[(0xC2, deflated(&vec![7; 65537]))]), Some(1009));
    // In fragments too.
    let packed = deflated(&vec![7; 65537]);
    assert_eq!(
        close_after(&[(0x42, packed[..10].to_vec()), (0x80, packed[10..].to_vec())]),
        Some(1009)
    );
    // What does not compress may be a little larger compressed than the
    // limit it is within.
    let random = noise(65536);
    let packed = deflated(&random);
    assert!(packed.len() > 65536);
    raw.send_frame(0xC2, &packed);
    assert_eq!(message(&raw.read_frame().unwrap()), random);
});

both_drivers!(a_deflate_bomb_costs_the_message_limit_and_no_more, |driver| {
    // 4 GiB of zeros is 4 MiB compressed: each connection's bomb stops at
    // the 16 MiB message limit, one at a time per core.
    let server = Server::start(driver, &[]);
    let mut def = Deflater::new(9, 15);
    let zeros = vec![0u8; 1 << 20];
    let mut bomb = Vec::new();
    for i in 0..4096 {
        if i > 0 {
            bomb.extend_from_slice(&[0, 0, 0xff, 0xff]);
        }
        def.compress(&zeros, &mut bomb, true);
    }
    assert!(bomb.len() < 5 << 20, "{}", bomb.len());
    let started = Instant::now();
    let mut clients: Vec<Raw> = (0..8).map(|_| open_deflate(server.addr, "/echo")).collect();
    for raw in &mut clients {
        raw.send_frame(0xC2, &bomb);
    }
    for raw in &mut clients {
        assert_eq!(raw.expect_close(), Some(1009));
    }
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    if !sanitized() {
        // Eight bombs of 4 GiB each: the server's peak is a few times the
        // 16 MiB limit, not gigabytes.
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        let peak: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert!(peak < 200 * 1024, "peak {peak} KiB");
    }
    // And it goes on serving.
    let mut raw = open_deflate(server.addr, "/echo");
    raw.send_frame(0x81, b"still here");
    assert_eq!(message(&raw.read_frame().unwrap()), b"still here");
});

fn admin_publish(server: &Server, query: &str, body: &[u8]) {
    admin_request(server, "POST", &format!("/publish?{query}"), body);
}

fn admin_request(server: &Server, method: &str, target: &str, body: &[u8]) {
    let mut s = TcpStream::connect(server.admin_addr()).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A native subscriber of `topic`, past its HELLO, with `extra` offered.
fn subscriber(server: &Server, topic: &str, extra: &str) -> Raw {
    let (mut raw, _) = open_with(server.addr, "/ws", extra);
    assert!(message(&raw.read_frame().unwrap()).starts_with(b"HELLO "));
    raw.send_frame(0x81, format!("SUB {topic}").as_bytes());
    raw
}

both_drivers!(a_publish_reaches_every_kind_of_subscriber_compressed_once, |driver| {
    let server = Server::start(driver, &[]);
    // On both cores: three that agreed, three that did not, three that
    // agreed with a window of 512 bytes for our messages.
    let small = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n";
    let mut subs: Vec<(Raw, &str)> = Vec::new();
    for _ in 0..3 {
        subs.push((subscriber(&server, "t", OFFER), "deflate"));
        subs.push((subscriber(&server, "t", ""), "plain"));
        subs.push((subscriber(&server, "t", small), "small"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let body = json(1024);
    let whole = [&b"MSG t "[..], &body].concat();
    admin_publish(&server, "topic=t", &body);
    let mut compressed = Vec::new();
    for (raw, kind) in &mut subs {
        let f = raw.read_frame().unwrap();
        assert_eq!(message(&f), whole, "{kind}");
        // The window of 512 bytes is too small for this message.
        assert_eq!(f.rsv1, *kind == "deflate", "{kind}");
        if f.rsv1 {
            compressed.push(f.payload);
        }
    }
    // One compression, the same bytes for all (on each core).
    assert!(compressed.windows(2).all(|w| w[0] == w[1]));
    assert!(compressed[0].len() < whole.len() / 2, "{}", compressed[0].len());
    // A message that fits a 512-byte window reaches that subscriber
    // compressed too.
    let body = json(400);
    admin_publish(&server, "topic=t", &body);
    for (raw, kind) in &mut subs {
        let f = raw.read_frame().unwrap();
        assert_eq!(f.rsv1, *kind != "plain", "{kind}");
        assert_eq!(message(&f), [&b"MSG t "[..], &body].concat());
    }
    // A publisher may forbid compression (secrets beside attacker text),
    // and so may the admin API's send to one session.
    admin_publish(&server, "topic=t&compress=false", &json(1024));
    for (raw, _) in &mut subs {
        assert!(!raw.read_frame().unwrap().rsv1);
    }
    let (mut one, _) = open_with(server.addr, "/ws", OFFER);
    let hello = String::from_utf8(message(&one.read_frame().unwrap())).unwrap();
    let id = hello.trim_start_matches("HELLO ").to_string();
    for (query, compressed) in [("", true), ("?compress=false", false)] {
        admin_request(&server, "POST", &format!("/sessions/{id}/send{query}"), &json(1024));
        let f = one.read_frame().unwrap();
        assert_eq!((f.rsv1, message(&f)), (compressed, json(1024)), "{query}");
    }
    // A client's compressed publish reaches each as it takes messages.
    let (mut publisher, _) = open_with(server.addr, "/ws", OFFER);
    publisher.read_frame().unwrap();
    let body = json(3000);
    publisher.send_frame(0xC1, &deflated(&[&b"PUB t "[..], &body].concat()));
    for (raw, kind) in &mut subs {
        let f = raw.read_frame().unwrap();
        assert_eq!(f.rsv1, *kind == "deflate", "{kind}");
        assert_eq!(message(&f), [&b"MSG t "[..], &body].concat());
    }
});

both_drivers!(stomp_messages_are_compressed_with_a_head_of_their_own, |driver| {
    let server = Server::start(driver, &[]);
    let (mut raw, head) = open_with(
        server.addr,
        "/stomp",
        &format!("Sec-WebSocket-Protocol: v12.stomp\r\n{OFFER}"),
    );
    assert!(head.contains(AGREED), "{head}");
    raw.send_frame(0x81, b"CONNECT\naccept-version:1.2\nhost:x\nheart-beat:0,0\n\n\0");
    assert!(message(&raw.read_frame().unwrap()).starts_with(b"CONNECTED"));
    // Twelve subscriptions of their own: past the ones whose frames are
    // kept whole, every one still gets the shared compressed rest.
    for i in 0..12usize {
        let ack = if i.is_multiple_of(2) { "client" } else { "auto" };
        raw.send_frame(
            0x81,
            format!("SUBSCRIBE\nid:s{i}\ndestination:/topic/t\nack:{ack}\nreceipt:r{i}\n\n\0").as_bytes(),
        );
        assert!(message(&raw.read_frame().unwrap()).starts_with(b"RECEIPT"));
    }
    let body = json(2000);
    admin_publish(&server, "topic=t", &body);
    let mut ids = Vec::new();
    for _ in 0..12 {
        let f = raw.read_frame().unwrap();
        assert!(f.rsv1);
        let frame = message(&f);
        let text = String::from_utf8(frame).unwrap();
        let (head, rest) = text.split_once("\n\n").unwrap();
        assert!(head.starts_with("MESSAGE\nsubscription:s"), "{head}");
        assert!(head.contains("\ndestination:/topic/t\n"), "{head}");
        let id: usize = head["MESSAGE\nsubscription:s".len()..]
            .split('\n')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(head.contains("\nack:"), id.is_multiple_of(2), "{head}");
        assert_eq!(rest.as_bytes(), [&body[..], b"\0"].concat());
        ids.push(id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (0..12).collect::<Vec<_>>());
    // A compressed SEND is taken like any.
    raw.send_frame(
        0xC1,
        &deflated(format!("SEND\ndestination:/topic/t\n\n{}\0", "x".repeat(500)).as_bytes()),
    );
    for _ in 0..12 {
        let text = String::from_utf8(message(&raw.read_frame().unwrap())).unwrap();
        assert!(text.ends_with(&format!("\n\n{}\0", "x".repeat(500))));
    }
});

both_drivers!(dedicated_stomp_messages_share_the_connection_s_window, |driver| {
    // A STOMP session with context takeover and three subscriptions: each
    // MESSAGE (a head of its own and the shared rest, in two parts) is
    // compressed whole against the ones before, in the order sent, with
    // heart-beats plain between them.
    let server = Server::start(driver, &["--deflate", "dedicated"]);
    let (raw, head) = open_with(
        server.addr,
        "/stomp",
        &format!("Sec-WebSocket-Protocol: v12.stomp\r\n{OFFER}"),
    );
    assert!(head.contains(TAKEN_OVER), "{head}");
    let mut stream = Stream {
        raw,
        inflater: Inflater::default(),
    };
    stream
        .raw
        .send_frame(0x81, b"CONNECT\naccept-version:1.2\nhost:x\nheart-beat:0,50\n\n\0");
    assert!(stream.next().2.starts_with(b"CONNECTED"));
    for i in 0..3 {
        stream.raw.send_frame(
            0x81,
            format!("SUBSCRIBE\nid:s{i}\ndestination:/topic/t\nreceipt:r{i}\n\n\0").as_bytes(),
        );
        assert!(stream.next().2.starts_with(b"RECEIPT"));
    }
    let mut sizes = Vec::new();
    for n in 0..20 {
        let body = [format!("{n} ").into_bytes(), json(2000)].concat();
        admin_publish(&server, "topic=t", &body);
        let mut seen = 0;
        while seen < 3 {
            let (rsv1, wire, frame) = stream.next();
            if frame == b"\n" {
                continue;
            }
            assert!(rsv1);
            assert!(frame.starts_with(b"MESSAGE\nsubscription:s"), "{n}");
            assert!(frame.ends_with(&[&body[..], b"\0"].concat()), "{n}");
            sizes.push(wire);
            seen += 1;
        }
    }
    // After the first, each finds the body in the window.
    assert!(sizes[1..].iter().all(|&w| w < 200), "{sizes:?}");
});

/// Runs a client script; the last line it prints must be `ok`.
fn run_client(program: &str, args: &[&str]) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(program)
        .args(args)
        .env("PYTHONPATH", root.join("target/python"))
        .env("NODE_PATH", root.join("tests/stomp/node_modules"))
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().rfind(|l| !l.trim().is_empty()) == Some("ok"),
        "{program} {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn script(name: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/deflate")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

// Python's `websockets` offers permessage-deflate by default.
both_drivers!(python_websockets_round_trips_compressed_messages, |driver| {
    let server = Server::start(driver, &[]);
    run_client("python3", &[&script("client.py"), &server.url("")]);
    let server = Server::start(driver, &["--deflate", "dedicated"]);
    run_client("python3", &[&script("client.py"), &server.url(""), "dedicated"]);
});

// Node's `ws`, with `perMessageDeflate` (its client's default).
both_drivers!(node_ws_round_trips_compressed_messages, |driver| {
    let server = Server::start(driver, &[]);
    run_client("node", &[&script("client.mjs"), &server.url("")]);
    let server = Server::start(driver, &["--deflate", "dedicated"]);
    run_client("node", &[&script("client.mjs"), &server.url(""), "dedicated"]);
});

/// Chromium always offers permessage-deflate; `dedicated` agrees to
/// context takeover both ways.
#[test]
fn chromium_round_trips_compressed_messages() {
    for (args, agreed) in [
        (
            &[][..],
            "extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        ),
        (&["--deflate", "dedicated"][..], "extensions: permessage-deflate\n"),
    ] {
        let server = Server::start("epoll", args);
        let page = format!("file://{}?ws={}", script("page.html"), server.url("/echo"));
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        run_client(
            "python3",
            &[
                root.join("tests/browser/drive.py").to_str().unwrap(),
                &page,
                "30",
                agreed,
                "echo 0 ok",
                "echo 100 ok",
                "echo 1048576 ok",
                // The last line, once all six came back ("ok" alone is in
                // every echo's line).
                "\nok\n",
            ],
        );
    }
}

both_drivers!(echoes_of_inflated_messages_wait_for_the_socket, |driver| {
    // Each compressed message here is 4 KiB and inflates to 4 MiB: a read
    // of 64 KiB holds 16 of them. The echoes of one read are not all
    // queued at once: past 64 KiB of replies the rest of the read waits,
    // compressed, until they are written. A client that offers a window
    // of 512 bytes gets them uncompressed, and does not read.
    let server = Server::start(driver, &["--workers", "1"]);
    let message = vec![b'x'; 4 << 20];
    let packed = deflated(&message);
    assert!(packed.len() < 8 << 10, "{}", packed.len());
    let before = server.rss_anon_kib();
    let small = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n";
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (mut raw, head) = open_with(server.addr, "/echo", small);
        assert!(head.contains("server_max_window_bits=9"), "{head}");
        let burst: Vec<u8> = (0..16).flat_map(|_| masked_frame(0xC2, &packed)).collect();
        raw.send(&burst);
        clients.push(raw);
    }
    std::thread::sleep(Duration::from_millis(1500));
    if !sanitized() {
        // All queued at once, that would be 8 x 16 x 4 MiB = 512 MiB; one
        // echo each (and the socket buffers) is about 40 MiB.
        let grown = server.rss_anon_kib().saturating_sub(before);
        assert!(grown < 120 * 1024, "grew {grown} KiB");
    }
    // Read, they all come.
    for raw in &mut clients {
        for _ in 0..16 {
            let f = raw.read_frame().unwrap();
            assert!(!f.rsv1);
            assert_eq!(f.payload.len(), message.len());
        }
    }
});

both_drivers!(
    a_close_the_server_starts_while_paused_takes_the_peer_s_close_that_waits,
    |driver| {
        // Echoes of a burst pause the read (see above), and the client's
        // close waits behind them, unread. On shutdown the server sends 1001
        // and must find that close in what waits, not wait for the socket
        // until --close-timeout-ms.
        let mut server = Server::start(driver, &["--workers", "1", "--close-timeout-ms", "8000"]);
        let small = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n";
        let (mut raw, _) = open_with(server.addr, "/echo", small);
        let packed = deflated(&vec![b'x'; 1 << 20]);
        let mut burst: Vec<u8> = (0..16).flat_map(|_| masked_frame(0xC2, &packed)).collect();
        burst.extend(masked_frame(0x88, &1000u16.to_be_bytes()));
        raw.send(&burst);
        std::thread::sleep(Duration::from_millis(500));
        let reader = std::thread::spawn(move || {
            let mut sink = vec![0u8; 1 << 20];
            while matches!(raw.stream.read(&mut sink), Ok(n) if n > 0) {}
        });
        let started = Instant::now();
        let status = server.terminate();
        assert!(status.success(), "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
        reader.join().unwrap();
    }
);

both_drivers!(what_is_compressed_is_decided_at_the_byte, |driver| {
    // --compress-min-bytes (256 by default): 255 bytes go as they are,
    // 256 compressed; a window of 9 bits (512 bytes) takes messages up to
    // 512 bytes compressed, and 513 as they are.
    let server = Server::start(driver, &[]);
    let small = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n";
    let (mut raw, _) = open_with(server.addr, "/echo", small);
    for (len, compressed) in [(255, false), (256, true), (512, true), (513, false)] {
        raw.send_frame(0x81, &json(len));
        let f = raw.read_frame().unwrap();
        assert_eq!((len, f.rsv1), (len, compressed));
        assert_eq!(message(&f), json(len));
    }
    let server = Server::start(driver, &["--compress-min-bytes", "100"]);
    let mut raw = open_deflate(server.addr, "/echo");
    for (len, compressed) in [(99, false), (100, true)] {
        raw.send_frame(0x81, &json(len));
        assert_eq!((len, raw.read_frame().unwrap().rsv1), (len, compressed));
    }
});

/// `dedicated`'s answer to an offer that leaves context takeover to us.
const TAKEN_OVER: &str = "Sec-WebSocket-Extensions: permessage-deflate\r\n";

/// Waits (up to 10 s) for a metric, which each core refreshes at its tick.
fn wait_for_metric(server: &Server, name: &str, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = server.metric(name);
        if now == value {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: {now}, not {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a client's messages in order, inflating with one inflater that
/// keeps its window (the server takes over its context).
struct Stream {
    raw: Raw,
    inflater: Inflater,
}

impl Stream {
    fn next(&mut self) -> (bool, usize, Vec<u8>) {
        let f = self.raw.read_frame().unwrap();
        let mut out = Vec::new();
        if f.rsv1 {
            self.inflater.inflate(&f.payload, &mut out, 1 << 30, true).unwrap();
        } else {
            out = f.payload.clone();
        }
        (f.rsv1, f.payload.len(), out)
    }
}

both_drivers!(dedicated_takes_over_the_context_both_ways, |driver| {
    let server = Server::start(driver, &["--deflate", "dedicated"]);
    let (raw, head) = open_with(server.addr, "/echo", OFFER);
    assert!(head.contains(TAKEN_OVER), "{head}");
    let mut stream = Stream {
        raw,
        inflater: Inflater::default(),
    };
    // Ours refer back into the messages before them: the same message
    // again is a few bytes. The client's may too (its own compressor,
    // never reset).
    let mut ours = Deflater::new(6, 15);
    let body = json(2000);
    let mut sizes = Vec::new();
    for _ in 0..5 {
        let mut packed = Vec::new();
        ours.compress(&body, &mut packed, true);
        stream.raw.send_frame(0xC1, &packed);
        let (rsv1, wire, plain) = stream.next();
        assert!(rsv1);
        assert_eq!(plain, body);
        sizes.push(wire);
    }
    assert!(sizes[1..].iter().all(|&n| n < 30), "{sizes:?}");
    assert!(sizes[0] > 200, "{sizes:?}");
    // A plain message from the client leaves its window as it was (its
    // echo is compressed, against ours).
    stream.raw.send_frame(0x81, &body);
    let (rsv1, wire, plain) = stream.next();
    assert!(rsv1 && wire < 30 && plain == body, "{wire}");
    let mut packed = Vec::new();
    ours.compress(&body, &mut packed, true);
    stream.raw.send_frame(0xC1, &packed);
    let (_, wire, plain) = stream.next();
    assert_eq!((plain == body, wire < 30), (true, true));
    wait_for_metric(&server, "sluice_deflate_dedicated_sessions", 1);
    // Counted with the core's: 7 compressed, 6 inflated.
    wait_for_metric(&server, "sluice_compressed_messages_total", 7);
    wait_for_metric(&server, "sluice_inflated_messages_total", 6);
    wait_for_metric(&server, "sluice_inflated_bytes_out_total", 6 * body.len() as u64);

    // Everything compressed (--compress-min-bytes 0): empty messages one
    // after another, each an empty stored block's first octet.
    let all = Server::start(driver, &["--deflate", "dedicated", "--compress-min-bytes", "0"]);
    let (raw, _) = open_with(all.addr, "/echo", OFFER);
    let mut small = Stream {
        raw,
        inflater: Inflater::default(),
    };
    for m in [&b"a"[..], b"", b"", b"b", b""] {
        small.raw.send_frame(0x81, m);
        let (rsv1, wire, plain) = small.next();
        assert!(rsv1 && plain == m && (wire == 1) == m.is_empty(), "{m:?}: {wire}");
    }

    // The client may still ask for none either way, or a window of 8
    // bits, which zlib cannot compress with: ours then stand alone.
    for (offer, agreed) in [
        (
            "permessage-deflate; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover\r\n",
        ),
        (
            "permessage-deflate; client_no_context_takeover",
            "permessage-deflate; client_no_context_takeover\r\n",
        ),
        (
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=8\r\n",
        ),
    ] {
        let (mut raw, head) = open_with(server.addr, "/echo", &format!("Sec-WebSocket-Extensions: {offer}\r\n"));
        assert!(head.contains(&format!("Sec-WebSocket-Extensions: {agreed}")), "{head}");
        let takeover = !agreed.contains("server_no");
        let mut sizes = Vec::new();
        for _ in 0..3 {
            raw.send_frame(0xC1, &deflated(&json(400)));
            let f = raw.read_frame().unwrap();
            sizes.push(f.payload.len());
        }
        assert_eq!(sizes[2] < 30, takeover, "{offer}: {sizes:?}");
    }
});

/// One core, `--deflate dedicated` within `budget` bytes, compressors of
/// at most `window_bits`.
fn dedicated_server(driver: &str, budget: usize, window_bits: u8) -> Server {
    let (budget, window_bits) = (budget.to_string(), window_bits.to_string());
    Server::start(
        driver,
        &[
            "--deflate",
            "dedicated",
            "--deflate-dedicated-bytes",
            &budget,
            "--deflate-window-bits",
            &window_bits,
            "--workers",
            "1",
        ],
    )
}

both_drivers!(dedicated_contexts_stay_within_the_core_budget, |driver| {
    // Room for two connections' contexts on the one core, not three.
    let each = deflater_bytes(15) + INFLATER_BYTES;
    let budget = 2 * each;
    let server = dedicated_server(driver, budget, 15);
    let (a, head) = open_with(server.addr, "/echo", OFFER);
    assert!(head.contains(TAKEN_OVER), "{head}");
    let (_b, head) = open_with(server.addr, "/echo", OFFER);
    assert!(head.contains(TAKEN_OVER), "{head}");
    // The budget is spent: the third agrees to no context takeover.
    let (mut c, head) = open_with(server.addr, "/echo", OFFER);
    assert!(head.contains(AGREED), "{head}");
    c.send_frame(0xC1, &deflated(&json(1000)));
    assert_eq!(message(&c.read_frame().unwrap()), json(1000));
    wait_for_metric(&server, "sluice_deflate_dedicated_refused_total", 1);
    wait_for_metric(&server, "sluice_deflate_dedicated_reserved_bytes", 2 * each as u64);
    wait_for_metric(&server, "sluice_deflate_dedicated_sessions", 2);
    // Nor does one that asks for less (a 9-bit window, no inflater of
    // its own): nothing is left.
    let offer =
        "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; server_max_window_bits=9\r\n";
    let (_d, head) = open_with(server.addr, "/echo", offer);
    assert!(head.contains("server_no_context_takeover"), "{head}");
    // A connection that ends gives its share back.
    drop(a);
    wait_for_metric(&server, "sluice_deflate_dedicated_sessions", 1);
    wait_for_metric(&server, "sluice_deflate_dedicated_reserved_bytes", each as u64);
    let (_e, head) = open_with(server.addr, "/echo", OFFER);
    assert!(head.contains(TAKEN_OVER), "{head}");

    // At the byte: one short of two connections' worth takes one.
    let budget = 2 * each - 1;
    let server = dedicated_server(driver, budget, 15);
    let (_a, head) = open_with(server.addr, "/echo", OFFER);
    assert!(head.contains(TAKEN_OVER), "{head}");
    let (_b, head) = open_with(server.addr, "/echo", OFFER);
    assert!(head.contains(AGREED), "{head}");

    // A smaller window for our compressors (--deflate-window-bits) is
    // what is reserved: exactly three fit.
    let each = deflater_bytes(10) + INFLATER_BYTES;
    let budget = 3 * each;
    let server = dedicated_server(driver, budget, 10);
    let mut held = Vec::new();
    for _ in 0..3 {
        let (mut raw, head) = open_with(server.addr, "/echo", OFFER);
        assert!(head.contains(TAKEN_OVER), "{head}");
        raw.send_frame(0x81, &json(3000));
        assert_eq!(message(&raw.read_frame().unwrap()), json(3000));
        held.push(raw);
    }
    let (_d, head) = open_with(server.addr, "/echo", OFFER);
    assert!(head.contains(AGREED), "{head}");
    wait_for_metric(&server, "sluice_deflate_dedicated_reserved_bytes", 3 * each as u64);

    // The window's bounds, 9 to 15 bits (zlib compresses with no less).
    for bits in ["8", "16"] {
        let (code, error) = start_error(&["--deflate-window-bits", bits]);
        assert_eq!(code, Some(2), "{bits}: {error}");
        assert!(error.contains("deflate_window_bits"), "{error}");
    }
    let each = deflater_bytes(9) + INFLATER_BYTES;
    let server = dedicated_server(driver, each, 9);
    let (_a, head) = open_with(server.addr, "/echo", OFFER);
    assert!(head.contains(TAKEN_OVER), "{head}");
    wait_for_metric(&server, "sluice_deflate_dedicated_reserved_bytes", each as u64);
});

both_drivers!(
    dedicated_deliveries_and_replies_go_out_in_the_order_compressed,
    |driver| {
        // An echo session takes its own replies (compressed as they are
        // queued) and admin sends (compressed as they are written), mixed,
        // while its socket is full: one inflater that keeps its window reads
        // every one of them, in order. Each message repeats text of the one
        // before it, so one read against the wrong window reads wrong.
        let server = Server::start(
            driver,
            &[
                "--deflate",
                "dedicated",
                "--workers",
                "1",
                "--max-outbound-bytes",
                "67108864",
                "--max-core-outbound-bytes",
                "268435456",
            ],
        );
        let (mut raw, head) = open_with(server.addr, "/echo", OFFER);
        assert!(head.contains(TAKEN_OVER), "{head}");
        raw.send_frame(0x81, b"up?");
        raw.read_frame().unwrap();
        // The one session of the one core: its id is found by asking.
        let id = (0..8)
            .flat_map(|slot| (1..4).map(move |generation| format!("0.{slot}.{generation}")))
            .find(|id| {
                let mut s = TcpStream::connect(server.admin_addr()).unwrap();
                write!(
                    s,
                    "GET /sessions/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut answer = String::new();
                s.read_to_string(&mut answer).unwrap();
                answer.starts_with("HTTP/1.1 200")
            })
            .expect("the session's id");
        const EACH: usize = 300;
        let message = |what: &str, i: usize| {
            let mut m = format!("{what} {i} ").into_bytes();
            m.extend_from_slice(&noise(16 * 1024 + i));
            m.extend_from_slice(&json(8 * 1024));
            m
        };
        let admin = {
            let addr = server.admin_addr();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let body = message("admin", i);
                    let mut s = TcpStream::connect(addr).unwrap();
                    write!(
                    s,
                    "POST /sessions/{id}/send HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .unwrap();
                    s.write_all(&body).unwrap();
                    let mut answer = String::new();
                    s.read_to_string(&mut answer).unwrap();
                    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                }
            })
        };
        let echo = {
            let mut raw = Raw {
                stream: raw.stream.try_clone().unwrap(),
            };
            std::thread::spawn(move || {
                let mut ours = Deflater::new(6, 15);
                for i in 0..EACH {
                    let mut packed = Vec::new();
                    ours.compress(&message("echo", i), &mut packed, true);
                    raw.send_frame(0xC2, &packed);
                }
            })
        };
        // Unread for a while: the socket fills, and deliveries and echoes
        // wait together.
        std::thread::sleep(Duration::from_millis(1000));
        let mut stream = Stream {
            raw,
            inflater: Inflater::default(),
        };
        let (mut echoes, mut sends) = (0, 0);
        while echoes < EACH || sends < EACH {
            let (_, _, plain) = stream.next();
            let (what, n) = if plain.starts_with(b"echo ") {
                echoes += 1;
                ("echo", echoes - 1)
            } else {
                sends += 1;
                ("admin", sends - 1)
            };
            assert!(
                plain == message(what, n),
                "{what} {n}: {:?}",
                String::from_utf8_lossy(&plain[..plain.len().min(20)])
            );
        }
        admin.join().unwrap();
        echo.join().unwrap();
    }
);

both_drivers!(dedicated_contexts_cost_what_they_reserve, |driver| {
    // 200 connections with context takeover both ways, each having sent
    // and taken a compressed message of 64 KiB of varied JSON (which
    // touches all of both windows): the server grows by about what the
    // agreements reserve, and no more. Before their first compressed
    // message, they hold no context.
    if sanitized() {
        return;
    }
    const N: usize = 200;
    let server = Server::start(
        driver,
        &[
            "--deflate",
            "dedicated",
            "--deflate-dedicated-bytes",
            "1073741824",
            "--workers",
            "1",
        ],
    );
    let before = server.rss_anon_kib();
    let mut clients: Vec<Raw> = (0..N)
        .map(|_| {
            let (raw, head) = open_with(server.addr, "/echo", OFFER);
            assert!(head.contains(TAKEN_OVER), "{head}");
            raw
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let idle = server.rss_anon_kib();
    let body = [json(32 * 1024), noise(32 * 1024)].concat();
    let packed = deflated(&body);
    for raw in &mut clients {
        raw.send_frame(0xC2, &packed);
        assert_eq!(message(&raw.read_frame().unwrap()), body);
    }
    std::thread::sleep(Duration::from_millis(300));
    let used = server.rss_anon_kib();
    let reserved = (deflater_bytes(15) + INFLATER_BYTES) / 1024;
    let per_idle = idle.saturating_sub(before) as usize * 1024 / N;
    let per_used = used.saturating_sub(before) as usize / N;
    println!("dedicated: {per_idle} B per idle connection, {per_used} KiB per connection once used (reserved: {reserved} KiB)");
    assert!(per_idle < 8 * 1024, "{per_idle} B before any message");
    assert!(
        per_used <= reserved + 64,
        "{per_used} KiB used, {reserved} KiB reserved"
    );
    assert!(per_used >= reserved / 2, "{per_used} KiB used: contexts not made?");
});
