//! SIGTERM in the middle of pub/sub traffic, under both I/O drivers: every
//! publish the server confirmed (a STOMP RECEIPT; for a native publisher
//! subscribed to its own topic, its own MSG) reaches every subscriber on
//! every core before that subscriber's 1001, and a publish that reached
//! one subscriber reached them all.

mod common;

use common::{upgrade_request, Raw, Server};
use std::collections::BTreeMap;
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
