//! Malformed and limit-breaking input over raw sockets, under both drivers:
//! each violation gets the close code or HTTP status RFC 6455 gives it
//! (docs/ARCHITECTURE.md, "The protocol core"; docs/PROTOCOL.md, "Errors"),
//! and the server keeps serving others.

mod common;

use common::{masked_frame, upgrade_request, Raw, Server};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Opens a connection, sends `wire` after the handshake, expects a close with `code`.
fn expect_close_after(server: &Server, wire: &[u8], code: u16) {
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send(wire);
    assert_eq!(raw.expect_close(), Some(code), "after {wire:02x?}");
    assert!(raw.is_closed_by_server());
}

both_drivers!(protocol_violations_close_1002, |driver| {
    let server = Server::start(driver, &[]);
    let unmasked = [0x81, 0x02, b'h', b'i'];
    expect_close_after(&server, &unmasked, 1002);
    for rsv in [0x40, 0x20, 0x10] {
        expect_close_after(&server, &masked_frame(0x81 | rsv, b"x"), 1002);
    }
    for op in [3u8, 7, 0xB, 0xF] {
        expect_close_after(&server, &masked_frame(0x80 | op, b""), 1002);
    }
    // Fragmented ping; ping over 125 bytes.
    expect_close_after(&server, &masked_frame(0x09, b""), 1002);
    expect_close_after(&server, &masked_frame(0x89, &[0; 126]), 1002);
    // Continuation with nothing to continue; new message inside a fragmented one.
    expect_close_after(&server, &masked_frame(0x80, b"x"), 1002);
    let mut wire = masked_frame(0x01, b"a");
    wire.extend(masked_frame(0x81, b"b"));
    expect_close_after(&server, &wire, 1002);
    // Close payloads: one byte, or a code peers may not send.
    expect_close_after(&server, &masked_frame(0x88, &[3]), 1002);
    expect_close_after(&server, &masked_frame(0x88, &1005u16.to_be_bytes()), 1002);
    expect_close_after(&server, &masked_frame(0x88, &999u16.to_be_bytes()), 1002);
    // The server still serves.
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send_frame(0x81, b"still here");
    assert_eq!(raw.read_frame().unwrap().payload, b"still here");
});

both_drivers!(invalid_utf8_closes_1007, |driver| {
    let server = Server::start(driver, &[]);
    expect_close_after(&server, &masked_frame(0x81, &[0xce, 0xba, 0xff]), 1007);
    // Fails at the fragment that breaks it, before the message ends.
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send_frame(0x01, &[0xce, 0xba, 0xe1]);
    raw.send_frame(0x00, &[0xbd, 0xb9, 0xed, 0xa0, 0x80]);
    assert_eq!(raw.expect_close(), Some(1007));
    // Close reason that is not UTF-8.
    expect_close_after(&server, &masked_frame(0x88, &[0x03, 0xe8, 0xff]), 1007);
});

both_drivers!(frame_and_message_limits_close_1009, |driver| {
    let server = Server::start(driver, &["--max-frame-bytes", "1000", "--max-message-bytes", "3000"]);
    // A frame at the limit is echoed.
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send_frame(0x82, &[1; 1000]);
    assert_eq!(raw.read_frame().unwrap().payload.len(), 1000);
    // One byte over: 1009, decided from the header (the payload is never sent).
    let mut raw = Raw::open(server.addr, "/echo");
    let frame = masked_frame(0x82, &[1; 1001]);
    raw.send(&frame[..8]);
    assert_eq!(raw.expect_close(), Some(1009));
    // A message at the limit, then one byte over.
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send_frame(0x02, &[1; 1000]);
    raw.send_frame(0x00, &[1; 1000]);
    raw.send_frame(0x80, &[1; 1000]);
    assert_eq!(raw.read_frame().unwrap().payload.len(), 3000);
    raw.send_frame(0x02, &[1; 1000]);
    raw.send_frame(0x00, &[1; 1000]);
    raw.send_frame(0x00, &[1; 1000]);
    raw.send_frame(0x80, &[1; 1]);
    assert_eq!(raw.expect_close(), Some(1009));
    // A 2^63-1 length is refused as too big, not allocated.
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send(&[0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4]);
    assert_eq!(raw.expect_close(), Some(1009));
});

both_drivers!(fragments_with_control_frames_between, |driver| {
    let server = Server::start(driver, &[]);
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send_frame(0x01, b"frag");
    raw.send_frame(0x89, b"ping!");
    raw.send_frame(0x00, b"men");
    raw.send_frame(0x80, b"ted");
    let pong = raw.read_frame().unwrap();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"ping!"[..]));
    let text = raw.read_frame().unwrap();
    assert_eq!(
        (text.opcode, text.fin, text.payload.as_slice()),
        (1, true, &b"fragmented"[..])
    );
});

both_drivers!(handshake_in_small_reads_with_frames_behind_it, |driver| {
    let server = Server::start(driver, &[]);
    let mut raw = Raw::connect(server.addr);
    let mut wire = upgrade_request("/echo", "").into_bytes();
    wire.extend(masked_frame(0x81, b"first"));
    wire.extend(masked_frame(0x81, b"second"));
    // Head in 7-byte pieces, the last piece carrying the frames too.
    let head_len = wire.len() - masked_frame(0x81, b"first").len() - masked_frame(0x81, b"second").len();
    for chunk in wire[..head_len - 3].chunks(7) {
        raw.send(chunk);
        std::thread::sleep(Duration::from_millis(2));
    }
    raw.send(&wire[head_len - 3..]);
    assert!(raw.read_head().starts_with("HTTP/1.1 101 "));
    assert_eq!(raw.read_frame().unwrap().payload, b"first");
    assert_eq!(raw.read_frame().unwrap().payload, b"second");
});

/// Sends `bytes` with `MSG_OOB`: TCP's urgent data.
fn send_urgent(raw: &Raw, bytes: &[u8]) {
    // SAFETY: a connected socket and a readable buffer of `bytes.len()`.
    let n = unsafe {
        libc::send(
            raw.stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_OOB,
        )
    };
    assert_eq!(n, bytes.len() as isize);
}

fn set_cork(raw: &Raw, on: bool) {
    let on = libc::c_int::from(on);
    // SAFETY: a valid socket and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            raw.stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
}

// A peer's urgent byte (`MSG_OOB`) stops the server's read at its mark
// with bytes still queued behind it: a read that ends short is no proof
// that the socket is empty, and a wait that took it for one would sleep
// on those bytes until the peer sent more. Parking off, so that only the
// read path can deliver them.
both_drivers!(urgent_data_does_not_strand_the_bytes_behind_it, |driver| {
    let server = Server::start(driver, &["--park-after-ms", "0"]);
    for round in 0..40 {
        let mut raw = Raw::open(server.addr, "/echo");
        raw.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let payload = format!("urgent-{round}-").repeat(6);
        let first = masked_frame(0x81, b"before");
        let frame = masked_frame(0x81, payload.as_bytes());
        // Half a frame, the urgent byte, the rest: one segment, corked.
        let (a, b) = frame.split_at(frame.len() / 2);
        set_cork(&raw, true);
        raw.send(&first);
        raw.send(a);
        send_urgent(&raw, b"Z");
        raw.send(b);
        set_cork(&raw, false);
        assert_eq!(
            raw.read_frame().expect("first echo").payload,
            b"before",
            "round {round}"
        );
        let echo = raw
            .read_frame()
            .unwrap_or_else(|| panic!("round {round}: no echo of the frame behind the urgent byte"));
        assert_eq!(echo.payload, payload.as_bytes(), "round {round}");
    }
});

// A signal to the process may reach any thread that does not block it, a
// worker among them. Under epoll a strict readiness wait is a poll(2),
// which a signal interrupts (EINTR): that must not end the session
// waiting on it. SIGHUP (a certificate reload; nothing to reload here)
// sent to the worker thread itself, about 5,000 a second, while sessions
// echo.
both_drivers!(signals_to_a_worker_end_no_session, |driver| {
    let server = Server::start(driver, &["--park-after-ms", "0", "--workers", "1"]);
    let mut conns: Vec<Raw> = (0..20).map(|_| Raw::open(server.addr, "/echo")).collect();
    let pid = server.pid();
    let worker: i32 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let task = task.ok()?;
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            (comm.trim() == "sluice-w0").then(|| task.file_name().to_str()?.parse().ok())?
        })
        .next()
        .expect("the worker thread");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let signaller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 50_000 {
                // SAFETY: a signal to a thread of the server this test started.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, worker, libc::SIGHUP) };
                sent += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            sent
        })
    };
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(3) {
        for (i, raw) in conns.iter_mut().enumerate() {
            let payload = format!("{rounds}-{i}");
            // Half a frame, a pause, the rest: the read between finds the
            // socket empty, and the wait after it may be a strict one.
            let frame = masked_frame(0x81, payload.as_bytes());
            let (a, b) = frame.split_at(3);
            raw.send(a);
            if i % 4 == 0 {
                std::thread::sleep(Duration::from_micros(300));
            }
            raw.send(b);
            let echo = raw
                .read_frame()
                .unwrap_or_else(|| panic!("connection {i} ended in round {rounds}"));
            assert_eq!(echo.payload, payload.as_bytes());
        }
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = signaller.join().unwrap();
    assert!(sent > 1_000, "{sent} signals");
    assert!(rounds > 10, "{rounds} rounds");
});

/// Sends `request` and returns the whole response.
fn respond(server: &Server, request: &str) -> String {
    let mut raw = Raw::connect(server.addr);
    raw.send(request.as_bytes());
    raw.read_to_end()
}

both_drivers!(handshake_refusals, |driver| {
    let server = Server::start(driver, &["--allowed-origins", "https://app.example"]);
    let ok = respond(&server, &upgrade_request("/echo", "Origin: https://app.example\r\n"));
    assert!(ok.starts_with("HTTP/1.1 101 "), "{ok}");
    let r = respond(&server, &upgrade_request("/echo", "Origin: https://evil.example\r\n"));
    assert!(r.starts_with("HTTP/1.1 403 "), "{r}");
    let r = respond(&server, &upgrade_request("/nope", ""));
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
    let r = respond(
        &server,
        &upgrade_request("/echo", "").replace("Version: 13", "Version: 8"),
    );
    assert!(
        r.starts_with("HTTP/1.1 426 ") && r.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{r}"
    );
    let r = respond(&server, &upgrade_request("/echo", "").replace(common::KEY, "c2hvcnQ="));
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    let r = respond(&server, &upgrade_request("/echo", "").replace("GET", "POST"));
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    let r = respond(&server, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 200 ") && r.ends_with("ok\n"), "{r}");
});

/// Sends an upgrade on `/echo` from 127.0.0.`host`; returns the
/// connection (open on a 101) and the response head.
fn upgrade_from(server: &Server, host: u8) -> (Raw, String) {
    let mut raw = Raw::connect_from(server.addr, std::net::IpAddr::from([127, 0, 0, host]));
    raw.send(upgrade_request("/echo", "").as_bytes());
    let head = raw.read_head();
    (raw, head)
}

/// An upgrade from 127.0.0.`host` gets 503, `Retry-After` and `reason`.
fn refused_at_a_cap(server: &Server, host: u8, reason: &str) {
    let (mut raw, head) = upgrade_from(server, host);
    assert!(
        head.starts_with("HTTP/1.1 503 ") && head.contains("\r\nRetry-After: 5\r\n"),
        "{head}"
    );
    assert_eq!(raw.read_to_end(), reason);
}

both_drivers!(connection_caps_answer_503_with_retry_after_at_the_limit, |driver| {
    let mut server = Server::start(driver, &["--max-connections", "3", "--max-connections-per-ip", "2"]);
    // Two from one address: its cap.
    let (mut first, head) = upgrade_from(&server, 1);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (_second, head) = upgrade_from(&server, 1);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    refused_at_a_cap(&server, 1, "too many connections from this address\n");
    // A third from another address: the server's cap.
    let (_third, head) = upgrade_from(&server, 2);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    refused_at_a_cap(&server, 3, "too many connections\n");
    // Health checks are not connections.
    let health = respond(&server, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200 "), "{health}");
    // One closes: its place is free again, and its address's.
    first.send(&masked_frame(0x88, &1000u16.to_be_bytes()));
    assert_eq!(first.expect_close(), Some(1000));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_raw, head) = upgrade_from(&server, 1);
        if head.starts_with("HTTP/1.1 101 ") {
            break;
        }
        assert!(Instant::now() < deadline, "the place never came back: {head}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The metrics are refreshed at every sweep tick.
    while server.metric("sluice_refused_max_connections_per_ip_total") != 1 {
        assert!(Instant::now() < deadline, "no refusal in the metrics");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.metric("sluice_refused_max_connections_total") >= 1);
    server.terminate();
    let log = server.log();
    assert_eq!(common::stopped_count(&log, "refused_max_per_ip"), 1, "{log}");
    assert!(common::stopped_count(&log, "refused_max_connections") >= 1, "{log}");
});

both_drivers!(origin_lists_per_route_take_subdomain_patterns, |driver| {
    let file = std::env::temp_dir().join(format!("sluice-origins-{driver}-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "allowed_origins = [\"https://app.example.com\"]\n\
         [[route]]\npath = \"/open\"\nprotocol = \"echo\"\nallowed_origins = [\"*\"]\n\
         [[route]]\npath = \"/sub\"\nprotocol = \"echo\"\nallowed_origins = [\"https://*.example.com\"]\n\
         [[route]]\npath = \"/exact\"\nprotocol = \"echo\"\n",
    )
    .unwrap();
    let server = Server::start(driver, &["--config", file.to_str().unwrap()]);
    let status = |path: &str, origin: &str| {
        let mut raw = Raw::connect(server.addr);
        raw.send(upgrade_request(path, &format!("Origin: {origin}\r\n")).as_bytes());
        raw.read_head()[9..12].to_string()
    };
    assert_eq!(status("/open", "https://anything.test"), "101");
    assert_eq!(status("/sub", "https://a.example.com"), "101");
    assert_eq!(status("/sub", "https://a.b.example.com"), "101");
    assert_eq!(status("/sub", "https://example.com"), "403");
    assert_eq!(status("/sub", "http://a.example.com"), "403");
    assert_eq!(status("/sub", "https://a.example.com.evil.test"), "403");
    // Only a serialised origin (RFC 6454 6.2) is matched: what merely ends
    // like one is not.
    for not_an_origin in [
        "https://evil.com#.example.com",
        "https://evil.com/.example.com",
        "https://evil.com?.example.com",
        "https://\u{e9}vil.example.com",
    ] {
        assert_eq!(status("/sub", not_an_origin), "403", "{not_an_origin}");
    }
    // A route without a list of its own takes the global one.
    assert_eq!(status("/exact", "https://app.example.com"), "101");
    assert_eq!(status("/exact", "https://other.example.com"), "403");
    let _ = std::fs::remove_file(file);
    // A malformed pattern stops the server at start, naming the entry.
    let (code, err) = common::start_error(&["--allowed-origins", "https://app.*.com"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("allowed_origins: \"https://app.*.com\""), "{err}");
});

/// Sends `count` one-byte text messages in one write on `/echo`; returns
/// the connection and how many echoes came back before `end` (a close
/// frame's code, or None once nothing more came within 300 ms).
fn burst(server: &Server, count: usize) -> (Raw, usize, Option<u16>) {
    let mut raw = Raw::open(server.addr, "/echo");
    let wire: Vec<u8> = (0..count).flat_map(|_| masked_frame(0x81, b"x")).collect();
    raw.send(&wire);
    raw.stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut echoes = 0;
    while let Some(frame) = raw.read_frame() {
        if frame.opcode == 8 {
            return (raw, echoes, frame.close_code());
        }
        echoes += 1;
    }
    (raw, echoes, None)
}

both_drivers!(handshake_rate_per_address_answers_429_at_the_limit, |driver| {
    let mut server = Server::start(driver, &["--max-handshakes-per-sec-per-ip", "3"]);
    // A second's worth from one address; the next gets 429 (a clock that
    // moves during the burst may refill one at most).
    let mut open = Vec::new();
    for _ in 0..3 {
        let (raw, head) = upgrade_from(&server, 5);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        open.push(raw);
    }
    let refused = (0..2).find_map(|_| {
        let (mut raw, head) = upgrade_from(&server, 5);
        head.starts_with("HTTP/1.1 429 ").then(|| (head, raw.read_to_end()))
    });
    let (head, body) = refused.expect("a 429 within the burst");
    assert!(head.contains("\r\nRetry-After: 1\r\n"), "{head}");
    assert_eq!(body, "too many handshakes from this address\n");
    // Another address is not affected.
    let (_raw, head) = upgrade_from(&server, 6);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    // A second later the address may come back.
    std::thread::sleep(Duration::from_millis(1100));
    let (_raw, head) = upgrade_from(&server, 5);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    server.terminate();
    assert_eq!(common::stopped_count(&server.log(), "refused_handshake_rate"), 1);
});

both_drivers!(message_rate_limit_closes_1008_or_drops_at_the_limit, |driver| {
    // 20 a second: a burst of 40 gets its first 20 through (a clock tick
    // during the burst may refill one or two), then 1008.
    let mut server = Server::start(driver, &["--max-messages-per-sec", "20"]);
    let (mut raw, echoes, code) = burst(&server, 40);
    assert_eq!(code, Some(1008));
    assert!((20..=22).contains(&echoes), "{echoes}");
    assert!(raw.is_closed_by_server());
    server.terminate();
    assert_eq!(common::stopped_count(&server.log(), "rate_limited"), 1);
    // Under the drop policy the rest of the burst is dropped and the
    // connection stays; a second later the bucket is full again.
    let server = Server::start(driver, &["--max-messages-per-sec", "20", "--rate-limit", "drop"]);
    let (mut raw, echoes, code) = burst(&server, 40);
    assert_eq!(code, None);
    assert!((20..=22).contains(&echoes), "{echoes}");
    std::thread::sleep(Duration::from_millis(1100));
    raw.send(&masked_frame(0x81, b"again"));
    raw.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(raw.read_frame().unwrap().payload, b"again");
    // Counted in the metrics (refreshed at every sweep tick).
    let deadline = Instant::now() + Duration::from_secs(10);
    let limited = loop {
        let limited = server.metric("sluice_rate_limited_total");
        if limited > 0 || Instant::now() > deadline {
            break limited;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(limited, 40 - echoes as u64);
});

both_drivers!(head_over_8_kib_gets_431, |driver| {
    let server = Server::start(driver, &[]);
    let base = upgrade_request("/echo", "X-Pad: \r\n").len();
    let at_limit = upgrade_request("/echo", &format!("X-Pad: {}\r\n", "a".repeat(8192 - base)));
    assert_eq!(at_limit.len(), 8192);
    assert!(respond(&server, &at_limit).starts_with("HTTP/1.1 101 "));
    let over = upgrade_request("/echo", &format!("X-Pad: {}\r\n", "a".repeat(8193 - base)));
    let r = respond(&server, &over);
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    // A head that never ends is cut at the limit too.
    let mut raw = Raw::connect(server.addr);
    raw.send(format!("GET /echo HTTP/1.1\r\nX: {}", "b".repeat(10_000)).as_bytes());
    assert!(raw.read_to_end().starts_with("HTTP/1.1 431 "));
});

both_drivers!(handshake_timeout_drops_slow_clients, |driver| {
    let server = Server::start(driver, &["--handshake-timeout-ms", "300"]);
    let mut raw = Raw::connect(server.addr);
    raw.send(b"GET /echo HTTP/1.1\r\n");
    let start = Instant::now();
    assert!(raw.is_closed_by_server(), "dropped");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
});

both_drivers!(pings_quiet_peers_and_closes_silent_ones, |driver| {
    let server = Server::start(driver, &["--ping-interval-ms", "200", "--idle-timeout-ms", "600"]);
    let mut raw = Raw::open(server.addr, "/echo");
    let start = Instant::now();
    let ping = raw.read_frame().unwrap();
    assert_eq!(ping.opcode, 0x9);
    // Never answering: closed with 1001 once silent past the idle timeout.
    assert_eq!(raw.expect_close(), Some(1001));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // A peer that answers pings stays open past the idle timeout.
    let mut live = Raw::open(server.addr, "/echo");
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        let f = live.read_frame().unwrap();
        assert_eq!(f.opcode, 0x9, "only pings while alive");
        live.send_frame(0x8A, &f.payload);
    }
    live.send_frame(0x81, b"alive");
    let f = live.read_frame().unwrap();
    assert!(f.opcode == 0x1 || f.opcode == 0x9);
});

both_drivers!(vanished_peers_count_as_1006, |driver| {
    let mut server = Server::start(driver, &[]);
    {
        let _gone = Raw::open(server.addr, "/echo");
    }
    let mut clean = Raw::open(server.addr, "/echo");
    clean.send_frame(0x88, &1000u16.to_be_bytes());
    assert_eq!(clean.expect_close(), Some(1000));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.terminate().code(), Some(0));
    let log = server.log();
    let stopped = log.lines().find(|l| l.contains("stopped")).expect("stop line");
    assert!(stopped.contains("closed={1000: 1, 1006: 1}"), "{stopped}");
});

both_drivers!(drain_timeout_ends_sessions_that_never_close, |driver| {
    let mut server = Server::start(driver, &["--drain-timeout-ms", "300", "--close-timeout-ms", "10000"]);
    // Gets the 1001 but never answers it.
    let mut silent = Raw::open(server.addr, "/echo");
    let start = Instant::now();
    let status = server.terminate();
    let took = start.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    assert_eq!(silent.expect_close(), Some(1001));
    assert!(server.log().contains("drain timeout"), "{}", server.log());
});

both_drivers!(health_check_methods_and_absolute_targets, |driver| {
    let server = Server::start(driver, &[]);
    let r = respond(&server, "HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 200 ") && r.ends_with("\r\n\r\n"),
        "HEAD has no body: {r:?}"
    );
    let r = respond(
        &server,
        "POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET, HEAD"), "{r}");
    let absolute = upgrade_request("/echo", "").replacen("GET /echo ", &format!("GET http://{}/echo ", server.addr), 1);
    assert!(respond(&server, &absolute).starts_with("HTTP/1.1 101 "));
});

both_drivers!(shutdown_answers_unfinished_handshakes_with_503, |driver| {
    let mut server = Server::start(driver, &[]);
    let mut raw = Raw::connect(server.addr);
    raw.send(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    std::thread::sleep(Duration::from_millis(100));
    let status = std::thread::scope(|s| {
        let term = s.spawn(|| server.terminate());
        let r = raw.read_to_end();
        assert!(r.starts_with("HTTP/1.1 503 ") && r.contains("Retry-After: 1"), "{r}");
        term.join().unwrap()
    });
    assert_eq!(status.code(), Some(0));
});

both_drivers!(peer_that_stops_reading_is_cut_off, |driver| {
    let mut server = Server::start(driver, &["--ping-interval-ms", "200", "--idle-timeout-ms", "800"]);
    let mut raw = Raw::open(server.addr, "/echo");
    // Send echo requests without reading until our own socket is full: the
    // server's replies back up, its writes stall, and the stall times out.
    raw.stream.set_nonblocking(true).unwrap();
    let frame = masked_frame(0x82, &[7; 60_000]);
    let start = Instant::now();
    let mut sent = 0usize;
    while start.elapsed() < Duration::from_secs(5) {
        match std::io::Write::write(&mut raw.stream, &frame) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => break,
        }
    }
    assert!(sent > 0);
    std::thread::sleep(Duration::from_millis(2500));
    raw.stream.set_nonblocking(false).unwrap();
    // Everything the server managed to send is readable, then the stream ends.
    let mut sink = vec![0u8; 1 << 16];
    let ended = loop {
        match std::io::Read::read(&mut raw.stream, &mut sink) {
            Ok(0) | Err(_) => break start.elapsed(),
            Ok(_) => {}
        }
    };
    assert!(ended < Duration::from_secs(15), "{ended:?}");
    assert_eq!(server.terminate().code(), Some(0));
    let log = server.log();
    let stopped = log.lines().find(|l| l.contains("stopped")).expect("stop line");
    assert!(stopped.contains("closed={1006: 1}"), "{stopped}");
});

both_drivers!(
    registered_close_codes_are_echoed_and_private_ones_counted_in_buckets,
    |driver| {
        let server = Server::start(driver, &[]);
        // 1012-1014 are in the IANA registry: a peer may send them, and its
        // close is echoed, not answered with 1002.
        for code in [1012u16, 1013, 1014, 3001, 3002, 4005] {
            let mut raw = Raw::open(server.addr, "/echo");
            raw.send_frame(0x88, &code.to_be_bytes());
            assert_eq!(raw.expect_close(), Some(code));
        }
        // Codes a client picks freely are counted in one series per range.
        std::thread::sleep(Duration::from_millis(300));
        let mut s = std::net::TcpStream::connect(server.admin_addr()).unwrap();
        std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut metrics = String::new();
        std::io::Read::read_to_string(&mut s, &mut metrics).unwrap();
        for line in [
            "sluice_connections_closed_total{code=\"1012\"} 1",
            "sluice_connections_closed_total{code=\"3xxx\"} 2",
            "sluice_connections_closed_total{code=\"4xxx\"} 1",
        ] {
            assert!(metrics.contains(line), "{line}\n{metrics}");
        }
        assert!(!metrics.contains("code=\"3001\""), "{metrics}");
    }
);
