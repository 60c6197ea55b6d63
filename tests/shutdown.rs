//! SIGTERM in the middle of pub/sub traffic, under both I/O drivers: every
//! publish the server confirmed (a STOMP RECEIPT; for a native publisher
//! subscribed to its own topic, its own MSG) reaches every subscriber on
//! every core before that subscriber's 1001, and a publish that reached
//! one subscriber reached them all; also with a core held over its budget
//! at the signal, and with subscribers parked.

mod common;

use common::{upgrade_request, Raw, Server};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Shutdowns per driver.
const ROUNDS: usize = 20;
/// SENDs (or PUBs) a publisher sends before it waits for their receipts.
const BATCH: usize = 20;

/// What one connection took from the topic: per publisher, the sequence
/// numbers in the order they came, and the close code it got.
#[derive(Default, Debug)]
struct Taken {
    by_publisher: BTreeMap<String, Vec<u64>>,
    close: Option<u16>,
}

impl Taken {
    fn record(&mut self, body: &[u8]) {
        let text = std::str::from_utf8(body).expect("UTF-8 body");
        let (publisher, n) = text.split_once(':').unwrap_or_else(|| panic!("body {text:?}"));
        self.by_publisher
            .entry(publisher.to_string())
            .or_default()
            .push(n.parse().unwrap());
    }
}

/// A STOMP frame's command, headers and body, parsed by hand.
fn stomp_parse(payload: &[u8]) -> (String, Vec<(String, String)>, Vec<u8>) {
    let blank = payload.windows(2).position(|w| w == b"\n\n").expect("end of headers");
    let head = std::str::from_utf8(&payload[..blank]).unwrap();
    let mut lines = head.split('\n');
    let command = lines.next().unwrap().to_string();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_string(), v.to_string())
        })
        .collect();
    let body = &payload[blank + 2..];
    (command, headers, body[..body.len() - 1].to_vec())
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

enum Kind {
    Stomp,
    Native,
}

/// An open connection and the core it is on.
struct Conn {
    raw: Raw,
    kind: Kind,
    core: usize,
}

fn connect(server: &Server, kind: Kind) -> Conn {
    match kind {
        Kind::Stomp => {
            let mut raw = Raw::connect(server.addr);
            raw.send(upgrade_request("/stomp", "Sec-WebSocket-Protocol: v12.stomp\r\n").as_bytes());
            assert!(raw.read_head().starts_with("HTTP/1.1 101 "));
            raw.send_frame(0x81, b"CONNECT\naccept-version:1.2\nhost:x\nheart-beat:0,0\n\n\0");
            let (command, headers, _) = stomp_parse(&raw.read_frame().unwrap().payload);
            assert_eq!(command, "CONNECTED");
            let core = header(&headers, "session")
                .unwrap()
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            Conn { raw, kind, core }
        }
        Kind::Native => {
            let mut raw = Raw::open(server.addr, "/ws");
            let hello = String::from_utf8(raw.read_frame().unwrap().payload).unwrap();
            let id = hello.strip_prefix("HELLO ").expect("HELLO first");
            let core = id.split('.').next().unwrap().parse().unwrap();
            Conn { raw, kind, core }
        }
    }
}

/// Connections of `kind`, `per_core` on each of the two cores.
fn on_every_core(server: &Server, per_core: usize, kind: fn() -> Kind) -> Vec<Conn> {
    let mut got: Vec<Conn> = Vec::new();
    for _ in 0..200 {
        let c = connect(server, kind());
        if got.iter().filter(|g| g.core == c.core).count() < per_core {
            got.push(c);
        }
        if got.len() == 2 * per_core {
            return got;
        }
    }
    panic!("connections did not spread over both cores");
}

fn subscribe(c: &mut Conn) {
    match c.kind {
        Kind::Stomp => {
            c.raw
                .send_frame(0x81, b"SUBSCRIBE\nid:0\ndestination:/topic/x\nreceipt:sub\n\n\0");
            let (command, _, _) = stomp_parse(&c.raw.read_frame().unwrap().payload);
            assert_eq!(command, "RECEIPT");
        }
        Kind::Native => c.raw.send_frame(0x81, b"SUB x"),
    }
}

/// Reads until the server's close, recording every delivery; `confirmed`
/// counts the receipts (STOMP) or own messages (native, publisher `me`).
fn read_until_close(c: &mut Conn, taken: &mut Taken, me: Option<&str>, confirmed: &mut u64) -> bool {
    while let Some(f) = c.raw.read_frame() {
        if f.opcode == 8 {
            taken.close = f.close_code();
            return true;
        }
        match c.kind {
            Kind::Stomp => {
                let (command, headers, body) = stomp_parse(&f.payload);
                match command.as_str() {
                    "MESSAGE" => taken.record(&body),
                    "RECEIPT" => {
                        let id: u64 = header(&headers, "receipt-id").unwrap().parse().unwrap();
                        assert_eq!(id, *confirmed, "receipts come in order");
                        *confirmed += 1;
                        if confirmed.is_multiple_of(BATCH as u64) {
                            return false;
                        }
                    }
                    other => panic!("unexpected {other}"),
                }
            }
            Kind::Native => {
                let body = f.payload.strip_prefix(b"MSG x ").expect("MSG x");
                taken.record(body);
                let own = me.is_some_and(|me| body.starts_with(format!("{me}:").as_bytes()));
                if own {
                    *confirmed += 1;
                    if confirmed.is_multiple_of(BATCH as u64) {
                        return false;
                    }
                }
            }
        }
    }
    true
}

/// Publishes batches until the server closes; returns what it confirmed
/// and what the connection took from the topic.
fn publish(mut c: Conn, me: String) -> (u64, Taken) {
    let mut taken = Taken::default();
    let mut sent = 0u64;
    let mut confirmed = 0u64;
    loop {
        let mut batch = Vec::new();
        for _ in 0..BATCH {
            let frame = match c.kind {
                Kind::Stomp => format!("SEND\ndestination:/topic/x\nreceipt:{sent}\n\n{me}:{sent}\0"),
                Kind::Native => format!("PUB x {me}:{sent}"),
            };
            batch.extend(common::masked_frame(0x81, frame.as_bytes()));
            sent += 1;
        }
        if std::io::Write::write_all(&mut c.raw.stream, &batch).is_err() {
            return (confirmed, taken);
        }
        if read_until_close(&mut c, &mut taken, Some(&me), &mut confirmed) {
            return (confirmed, taken);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn one_shutdown(driver: &str, round: usize) {
    let mut server = Server::start(driver, &[]);
    let mut subscribers = on_every_core(&server, 2, || Kind::Stomp);
    subscribers.extend(on_every_core(&server, 2, || Kind::Native));
    let mut native_publishers = on_every_core(&server, 1, || Kind::Native);
    for c in subscribers.iter_mut().chain(native_publishers.iter_mut()) {
        subscribe(c);
    }
    // STOMP publishers: three, on both cores.
    let mut stomp_publishers = on_every_core(&server, 1, || Kind::Stomp);
    stomp_publishers.push(connect(&server, Kind::Stomp));
    // Subscriptions reach the other core's interest table.
    std::thread::sleep(Duration::from_millis(300));

    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut taken = Taken::default();
                let mut none = 0;
                read_until_close(&mut c, &mut taken, None, &mut none);
                (c.core, taken)
            })
        })
        .collect();
    let publishers: Vec<_> = stomp_publishers
        .into_iter()
        .enumerate()
        .map(|(i, c)| (format!("s{i}"), c))
        .chain(
            native_publishers
                .into_iter()
                .enumerate()
                .map(|(i, c)| (format!("n{i}"), c)),
        )
        .map(|(me, c)| {
            let core = c.core;
            let name = me.clone();
            (name, core, std::thread::spawn(move || publish(c, me)))
        })
        .collect();
    // Mid-traffic, at a different point each round.
    std::thread::sleep(Duration::from_millis(150 + 17 * (round as u64 % 10)));
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "{}", server.log());

    let mut confirmed = BTreeMap::new();
    let mut everyone: Vec<(String, usize, Taken)> = Vec::new();
    for (name, core, p) in publishers {
        let (n, taken) = p.join().unwrap();
        assert!(n > 0, "round {round}: {name} had nothing confirmed before the signal");
        confirmed.insert(name.clone(), n);
        if name.starts_with('n') {
            everyone.push((name, core, taken));
        }
    }
    for (i, r) in readers.into_iter().enumerate() {
        let (core, taken) = r.join().unwrap();
        everyone.push((format!("subscriber {i}"), core, taken));
    }
    for (publisher, &confirmed) in &confirmed {
        let mut counts = Vec::new();
        for (who, core, taken) in &everyone {
            assert_eq!(taken.close, Some(1001), "round {round}: {who} on core {core}");
            let got = taken.by_publisher.get(publisher).map_or(&[][..], Vec::as_slice);
            // In order, without a gap.
            assert!(
                got.iter().enumerate().all(|(i, &n)| n == i as u64),
                "round {round}: {who} on core {core} got {publisher}'s {got:?}"
            );
            assert!(
                got.len() as u64 >= confirmed,
                "round {round}: {who} on core {core} got {} of {publisher}'s messages, {confirmed} were confirmed",
                got.len()
            );
            counts.push((who.clone(), *core, got.len()));
        }
        assert!(
            counts.iter().all(|c| c.2 == counts[0].2),
            "round {round}: {publisher}'s messages reached some subscribers and not others: {counts:?}"
        );
    }
}

both_drivers!(
    sigterm_mid_traffic_delivers_every_confirmed_publish_before_1001,
    |driver| {
        let started = Instant::now();
        for round in 0..ROUNDS {
            one_shutdown(driver, round);
        }
        eprintln!("{ROUNDS} shutdowns in {:?}", started.elapsed());
    }
);

fn core_of_session(id: &str) -> usize {
    id.split('.').next().unwrap().parse().unwrap()
}

/// A native subscriber of `x`, and its core.
fn native(addr: SocketAddr, small_window: bool) -> (Raw, usize) {
    let mut raw = if small_window {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { stream }
    } else {
        Raw::connect(addr)
    };
    raw.send(upgrade_request("/ws", "").as_bytes());
    assert!(raw.read_head().starts_with("HTTP/1.1 101 "));
    let hello = String::from_utf8(raw.read_frame().unwrap().payload).unwrap();
    let core = core_of_session(hello.strip_prefix("HELLO ").unwrap());
    (raw, core)
}

fn native_on(addr: SocketAddr, core: usize, small_window: bool) -> Raw {
    for _ in 0..200 {
        let (raw, c) = native(addr, small_window);
        if c == core {
            return raw;
        }
    }
    panic!("no connection on core {core}");
}

fn stomp_head(payload: &[u8]) -> (String, Vec<(String, String)>) {
    let blank = payload.windows(2).position(|w| w == b"\n\n").expect("end of headers");
    let head = std::str::from_utf8(&payload[..blank]).unwrap();
    let mut lines = head.split('\n');
    let command = lines.next().unwrap().to_string();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_string(), v.to_string())
        })
        .collect();
    (command, headers)
}

/// A STOMP connection and its core.
fn stomp(addr: SocketAddr) -> (Raw, usize) {
    let mut raw = Raw::connect(addr);
    raw.send(upgrade_request("/stomp", "Sec-WebSocket-Protocol: v12.stomp\r\n").as_bytes());
    assert!(raw.read_head().starts_with("HTTP/1.1 101 "));
    raw.send_frame(0x81, b"CONNECT\naccept-version:1.2\nhost:x\nheart-beat:0,0\n\n\0");
    let (command, headers) = stomp_head(&raw.read_frame().unwrap().payload);
    assert_eq!(command, "CONNECTED");
    let id = &headers.iter().find(|(n, _)| n == "session").unwrap().1;
    let core = core_of_session(id);
    (raw, core)
}

fn metric(admin: SocketAddr, series: &str) -> u64 {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series}"))
}

/// Core B is held at SIGTERM by subscribers that stopped reading; a STOMP
/// publisher on core A had SENDs receipted whose envelopes sit in A's ring
/// to B (and one waits for room in it). B's subscriber that reads is
/// connected all along and must get every one of them before its 1001:
/// once input stops, a core drains its rings whatever its budget, and it
/// takes what they hold before closing its sessions even at the deadline.
fn held_at_sigterm(driver: &str, stall_ms: &str, drain_ms: &str) {
    let mut server = Server::start(
        driver,
        &[
            "--workers",
            "2",
            "--slow-consumer",
            "drop",
            "--max-outbound-bytes",
            "4194304",
            "--max-core-outbound-bytes",
            "8388608",
            "--mesh-ring-capacity",
            "16",
            "--stall-timeout-ms",
            stall_ms,
            "--drain-timeout-ms",
            drain_ms,
            "--park-after-ms",
            "0",
        ],
    );
    let addr = server.addr;
    let admin = server.admin_addr();
    let (mut publisher, a) = stomp(addr);
    let b = 1 - a;
    let mut healthy = native_on(addr, b, false);
    healthy.send_frame(0x81, b"SUB x");
    let mut stalled: Vec<Raw> = (0..3).map(|_| native_on(addr, b, true)).collect();
    for s in &mut stalled {
        s.send_frame(0x81, b"SUB x");
    }
    // The subscriptions reach core A's interest table.
    std::thread::sleep(Duration::from_millis(300));

    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut close = None;
        while let Some(f) = healthy.read_frame() {
            if f.opcode == 8 {
                close = f.close_code();
                break;
            }
            let body = f.payload.strip_prefix(b"MSG x ").expect("MSG x");
            let end = body.iter().position(|&b| b == b':').unwrap();
            got.push(std::str::from_utf8(&body[..end]).unwrap().parse::<u64>().unwrap());
        }
        (got, close)
    });

    // SENDs of 200 KB, one at a time, each with its receipt, until one is
    // not answered within a second (the publisher is no longer read).
    publisher.stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let padding = "p".repeat(200 * 1024);
    let mut confirmed = 0u64;
    for n in 0..400u64 {
        let frame = format!("SEND\ndestination:/topic/x\nreceipt:{n}\n\n{n}:{padding}\0");
        publisher.send_frame(0x81, frame.as_bytes());
        match publisher.read_frame() {
            Some(f) => {
                let (command, headers) = stomp_head(&f.payload);
                assert_eq!(command, "RECEIPT");
                let id: u64 = headers
                    .iter()
                    .find(|(h, _)| h == "receipt-id")
                    .unwrap()
                    .1
                    .parse()
                    .unwrap();
                assert_eq!(id, n);
                confirmed = n + 1;
            }
            None => break,
        }
    }
    let holds = metric(admin, &format!("sluice_publish_holds_total{{core=\"{b}\"}}"));
    eprintln!("confirmed {confirmed}, holds on core {b}: {holds}");
    assert!(
        holds > 0,
        "core {b} was not held: the test did not set up what it means to"
    );
    assert!(confirmed < 400, "the publisher was never held back");

    let started = Instant::now();
    let status = server.terminate();
    eprintln!("exit {status:?} after {:?}", started.elapsed());
    let (got, close) = reader.join().unwrap();
    assert_eq!(close, Some(1001));
    let missing: Vec<u64> = (0..confirmed).filter(|n| !got.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "core {b}'s connected subscriber got 1001 without {} receipted publishes ({missing:?}); log:\n{}",
        missing.len(),
        server.log()
    );
    drop(stalled);
}

both_drivers!(a_core_held_at_sigterm_still_delivers_what_was_receipted, |driver| {
    held_at_sigterm(driver, "8000", "2000")
});

// The same with the stall timeout inside the drain timeout (2 s, the
// default, and 5 s).
both_drivers!(a_core_held_at_sigterm_with_the_default_stall_timeout, |driver| {
    held_at_sigterm(driver, "2000", "5000")
});

// Parked subscribers on both cores; a STOMP publisher's receipted batch,
// then SIGTERM at once: each subscriber gets the whole batch, then 1001.
both_drivers!(parked_subscribers_get_receipted_publishes_before_1001, |driver| {
    let mut server = Server::start(driver, &["--workers", "2", "--park-after-ms", "50"]);
    let addr = server.addr;
    let (mut publisher, a) = stomp(addr);
    let mut subs: Vec<Raw> = Vec::new();
    for core in [a, 1 - a, a, 1 - a] {
        let mut s = native_on(addr, core, false);
        s.send_frame(0x81, b"SUB x");
        subs.push(s);
    }
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        metric(server.admin_addr(), "sluice_parks_total") >= 4,
        "subscribers did not park"
    );
    let mut batch = Vec::new();
    for n in 0..50u64 {
        batch.extend(common::masked_frame(
            0x81,
            format!("SEND\ndestination:/topic/x\nreceipt:{n}\n\n{n}:x\0").as_bytes(),
        ));
    }
    publisher.send(&batch);
    for n in 0..50u64 {
        let f = publisher.read_frame().unwrap();
        let (command, _) = stomp_head(&f.payload);
        assert_eq!(command, "RECEIPT", "{n}");
    }
    let status = server.terminate();
    assert_eq!(status.code(), Some(0));
    for (i, mut s) in subs.into_iter().enumerate() {
        let mut got = Vec::new();
        let close = loop {
            let Some(f) = s.read_frame() else { break None };
            if f.opcode == 8 {
                break f.close_code();
            }
            got.push(f.payload);
        };
        assert_eq!(close, Some(1001), "subscriber {i}");
        assert_eq!(got.len(), 50, "subscriber {i}");
    }
});
