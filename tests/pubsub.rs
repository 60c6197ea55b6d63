//! The native pub/sub protocol on `/ws` through an independent client
//! (tokio-tungstenite), across two workers, under both I/O drivers.

mod common;

use common::{masked_frame, tokio_rt, Raw, Server};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Time for subscriptions to reach the other core (there is no SUB reply).
const SETTLE: Duration = Duration::from_millis(300);

/// A native client and the core its session landed on.
struct Client {
    ws: Ws,
    core: u32,
}

async fn connect(url: &str) -> Client {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = next_text(&mut ws).await;
    let id = hello
        .strip_prefix("HELLO ")
        .unwrap_or_else(|| panic!("first message {hello:?}"));
    let core = id.split('.').next().unwrap().parse().unwrap();
    assert_eq!(id.split('.').count(), 3, "{id}");
    Client { ws, core }
}

/// Connects until there are `per_core` clients on each of `cores` cores
/// (the kernel spreads connections; bounded attempts).
async fn connect_on_every_core(url: &str, cores: u32, per_core: usize) -> Vec<Vec<Client>> {
    let mut by_core: Vec<Vec<Client>> = (0..cores).map(|_| Vec::new()).collect();
    for _ in 0..400 {
        if by_core.iter().all(|c| c.len() >= per_core) {
            return by_core;
        }
        let c = connect(url).await;
        if by_core[c.core as usize].len() < per_core {
            by_core[c.core as usize].push(c);
        }
    }
    panic!("connections did not land on every core");
}

async fn next_text(ws: &mut Ws) -> String {
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        other => panic!("expected a text message, got {other:?}"),
    }
}

async fn send(ws: &mut Ws, text: String) {
    ws.send(Message::Text(text)).await.unwrap();
}

/// Nothing arrives within `wait`.
async fn silent(ws: &mut Ws, wait: Duration) -> bool {
    tokio::time::timeout(wait, ws.next()).await.is_err()
}

both_drivers!(publishes_reach_every_subscriber_on_every_core_once_in_order, |driver| {
    let server = Server::start(driver, &[]);
    let url = server.url("/ws");
    tokio_rt().block_on(async {
        let mut cores = connect_on_every_core(&url, 2, 6).await;
        let mut publishers: Vec<Client> = cores.iter_mut().map(|c| c.pop().unwrap()).collect();
        let mut subscribers: Vec<Client> = cores.into_iter().flatten().collect();
        for s in &mut subscribers {
            send(&mut s.ws, "SUB news".into()).await;
        }
        tokio::time::sleep(SETTLE).await;
        const EACH: usize = 500;
        for i in 0..EACH {
            for (p, publisher) in publishers.iter_mut().enumerate() {
                send(&mut publisher.ws, format!("PUB news {p}:{i}")).await;
            }
        }
        for s in &mut subscribers {
            let mut next = [0usize; 2];
            for _ in 0..2 * EACH {
                let msg = next_text(&mut s.ws).await;
                let body = msg.strip_prefix("MSG news ").unwrap_or_else(|| panic!("{msg:?}"));
                let (p, i) = body.split_once(':').unwrap();
                let (p, i): (usize, usize) = (p.parse().unwrap(), i.parse().unwrap());
                assert_eq!(i, next[p], "publisher {p}: out of order or repeated on core {}", s.core);
                next[p] += 1;
            }
            assert!(silent(&mut s.ws, Duration::from_millis(100)).await, "more than sent");
        }
        // Binary publishes arrive as binary messages, payload intact.
        send(&mut subscribers[0].ws, "SUB bin".into()).await;
        tokio::time::sleep(SETTLE).await;
        let mut payload = b"PUB bin ".to_vec();
        payload.extend([0u8, 255, 10, 32]);
        publishers[1].ws.send(Message::Binary(payload)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), subscribers[0].ws.next()).await;
        assert_eq!(
            got.unwrap().unwrap().unwrap(),
            Message::Binary(b"MSG bin \x00\xff\n ".to_vec())
        );
    });
});

both_drivers!(unsubscribe_and_disconnect_stop_delivery, |driver| {
    let mut server = Server::start(driver, &[]);
    let url = server.url("/ws");
    tokio_rt().block_on(async {
        let mut cores = connect_on_every_core(&url, 2, 2).await;
        let mut a = cores[0].pop().unwrap();
        let mut b = cores[1].pop().unwrap();
        let mut publisher = cores[0].pop().unwrap();
        let leaver = cores[1].pop().unwrap();
        for ws in [&mut a.ws, &mut b.ws] {
            send(ws, "SUB t".into()).await;
        }
        let mut leaver_ws = leaver.ws;
        send(&mut leaver_ws, "SUB t".into()).await;
        tokio::time::sleep(SETTLE).await;
        leaver_ws.close(None).await.unwrap();
        send(&mut a.ws, "UNSUB t".into()).await;
        // Idempotent: neither is an error.
        send(&mut a.ws, "UNSUB t".into()).await;
        send(&mut b.ws, "SUB t".into()).await;
        tokio::time::sleep(SETTLE).await;
        send(&mut publisher.ws, "PUB t one".into()).await;
        assert_eq!(next_text(&mut b.ws).await, "MSG t one");
        assert!(silent(&mut a.ws, Duration::from_millis(300)).await);
        assert!(
            silent(&mut b.ws, Duration::from_millis(100)).await,
            "SUB twice delivers once"
        );
        // The last subscriber on core 1 leaves: core 0 stops sending there.
        send(&mut b.ws, "UNSUB t".into()).await;
        tokio::time::sleep(SETTLE).await;
        send(&mut publisher.ws, "PUB t two".into()).await;
        assert!(silent(&mut b.ws, Duration::from_millis(300)).await);
    });
    server.terminate();
    let log = server.log();
    assert!(log.contains("publishes=2"), "{log}");
});

both_drivers!(bad_commands_are_answered_and_disturb_no_one, |driver| {
    let server = Server::start(driver, &["--max-subscriptions", "3", "--max-message-bytes", "4096"]);
    let url = server.url("/ws");
    tokio_rt().block_on(async {
        let mut bystander = connect(&url).await;
        send(&mut bystander.ws, "SUB calm".into()).await;
        let mut c = connect(&url).await;
        for (command, answer) in [
            ("HELLO", "ERR bad-command"),
            ("sub x", "ERR bad-command"),
            ("SUB", "ERR bad-command"),
            ("PING x", "ERR bad-command"),
            ("SUB pr!ces", "ERR bad-topic"),
            ("SUB ", "ERR bad-topic"),
            ("PUB a b c", ""),
        ] {
            send(&mut c.ws, command.into()).await;
            if !answer.is_empty() {
                assert_eq!(next_text(&mut c.ws).await, answer, "{command}");
            }
        }
        send(&mut c.ws, format!("SUB {}", "x".repeat(256))).await;
        assert_eq!(next_text(&mut c.ws).await, "ERR bad-topic");
        send(&mut c.ws, format!("SUB {}", "x".repeat(255))).await;
        for t in ["a", "b", "c"] {
            send(&mut c.ws, format!("SUB {t}")).await;
        }
        assert_eq!(next_text(&mut c.ws).await, "ERR too-many-subscriptions c");
        // Still open and served: a subscriber at the limit still receives.
        send(&mut c.ws, "PUB a hi".into()).await;
        assert_eq!(next_text(&mut c.ws).await, "MSG a hi");
        // A publish over the message limit closes that connection with 1009.
        send(&mut c.ws, format!("PUB calm {}", "y".repeat(5000))).await;
        match tokio::time::timeout(Duration::from_secs(10), c.ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => assert_eq!(u16::from(f.code), 1009),
            other => panic!("expected close 1009, got {other:?}"),
        }
        // The bystander saw none of it.
        assert!(silent(&mut bystander.ws, Duration::from_millis(200)).await);
        let mut p = connect(&url).await;
        send(&mut p.ws, "PUB calm ok".into()).await;
        assert_eq!(next_text(&mut bystander.ws).await, "MSG calm ok");
    });
});

/// A raw subscriber that never reads after subscribing.
fn stalled_subscriber(server: &Server, topic: &str) -> Raw {
    let mut raw = Raw::open(server.addr, "/ws");
    let hello = raw.read_frame().unwrap();
    assert!(hello.payload.starts_with(b"HELLO "));
    raw.send(&masked_frame(0x81, format!("SUB {topic}").as_bytes()));
    raw
}

/// Publishes `count` messages of `size` bytes on `topic`, in rounds of 32
/// that a reader on the same topic takes in full before the next round, so
/// the reader is never the slow one.
async fn flood(url: &str, topic: &str, count: usize, size: usize) {
    let mut publisher = connect(url).await;
    let mut reader = connect(url).await;
    send(&mut reader.ws, format!("SUB {topic}")).await;
    tokio::time::sleep(SETTLE).await;
    let body = "z".repeat(size);
    let expected = format!("MSG {topic} {body}");
    for round in 0..count.div_ceil(32) {
        let n = 32.min(count - round * 32);
        for _ in 0..n {
            send(&mut publisher.ws, format!("PUB {topic} {body}")).await;
        }
        for _ in 0..n {
            assert!(next_text(&mut reader.ws).await == expected);
        }
    }
}

both_drivers!(a_subscriber_that_pauses_gets_everything_in_order_after, |driver| {
    // The queue may hold it all: what does not fit in the socket waits in
    // the queue, written as the subscriber drains its socket.
    let mut server = Server::start(driver, &["--max-outbound-bytes", "16777216"]);
    let url = server.url("/ws");
    let mut paused = stalled_subscriber(&server, "pause");
    std::thread::sleep(SETTLE);
    let (count, size) = (1000, 8 * 1024);
    let body = "z".repeat(size);
    tokio_rt().block_on(async {
        let mut publisher = connect(&url).await;
        let mut reader = connect(&url).await;
        send(&mut reader.ws, "SUB pause".into()).await;
        tokio::time::sleep(SETTLE).await;
        for round in 0..count / 20 {
            for i in round * 20..round * 20 + 20 {
                send(&mut publisher.ws, format!("PUB pause {i:05} {body}")).await;
            }
            for i in round * 20..round * 20 + 20 {
                assert!(next_text(&mut reader.ws)
                    .await
                    .starts_with(&format!("MSG pause {i:05} ")));
            }
        }
    });
    // Far more than the socket buffers hold was published while it slept.
    paused.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..count {
        let frame = paused.read_frame().expect("every message");
        assert_eq!(frame.opcode, 1);
        let expected = format!("MSG pause {i:05} {body}");
        assert!(
            frame.payload == expected.as_bytes(),
            "message {i} is whole and in order"
        );
    }
    server.terminate();
    let log = server.log();
    assert!(log.contains("slow_consumers=0"), "{log}");
    assert!(log.contains("dropped=0"), "{log}");
});

/// Sends `count` publishes of `size` bytes on `topic` from a raw
/// connection in a thread of its own (blocking writes: the server's
/// pause stops it), counting those written. Paced at 32 per 5 ms, so a
/// subscriber that reads never falls its 1 MiB limit behind.
fn publish_in_background(
    server: &Server,
    topic: &'static str,
    count: usize,
    size: usize,
) -> (std::thread::JoinHandle<Raw>, Arc<AtomicUsize>) {
    let addr = server.addr;
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let publisher = std::thread::spawn(move || {
        let mut raw = Raw::open(addr, "/ws");
        assert!(raw.read_frame().unwrap().payload.starts_with(b"HELLO "));
        let body = "z".repeat(size);
        for i in 0..count {
            raw.send(&masked_frame(0x81, format!("PUB {topic} {i:05} {body}").as_bytes()));
            counter.fetch_add(1, Ordering::SeqCst);
            if i % 32 == 31 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        raw
    });
    (publisher, sent)
}

/// Reads `count` messages on `topic` from `sub` in a thread of its own,
/// checking each is whole and in order.
fn read_all_in_background(mut sub: Raw, topic: &'static str, count: usize, size: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        sub.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        for i in 0..count {
            let frame = sub.read_frame().expect("every message");
            let head = format!("MSG {topic} {i:05} ");
            assert!(
                frame.payload.starts_with(head.as_bytes()) && frame.payload.len() == head.len() + size,
                "message {i} is whole and in order: opcode {}, {} bytes, {:?}",
                frame.opcode,
                frame.payload.len(),
                String::from_utf8_lossy(&frame.payload[..frame.payload.len().min(20)])
            );
        }
    })
}

/// Reads data messages until a close frame: how many, and the close code.
fn messages_then_close(sub: &mut Raw) -> (usize, Option<u16>) {
    sub.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut messages = 0;
    loop {
        let frame = sub.read_frame().expect("a close frame before the end");
        if frame.opcode == 8 {
            return (messages, frame.close_code());
        }
        messages += 1;
    }
}

/// Waits (bounded) until `ready` holds.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

both_drivers!(
    publishing_pauses_while_the_core_s_queues_are_over_budget_and_loses_nothing,
    |driver| {
        // One core with a 32 MiB budget for its subscribers' queues, and four
        // that do not read: the whole stream (1,000 x 16 KiB) is within each
        // one's own 16 MiB limit, but not within the budget for all four.
        // No stall timeout within the test.
        let mut server = Server::start(
            driver,
            &[
                "--workers",
                "1",
                "--max-outbound-bytes",
                "16777216",
                "--max-core-outbound-bytes",
                "33554432",
                "--stall-timeout-ms",
                "600000",
            ],
        );
        let subs: Vec<Raw> = (0..4).map(|_| stalled_subscriber(&server, "held")).collect();
        std::thread::sleep(SETTLE);
        let (count, size) = (1000, 16 * 1024);
        let (publisher, _) = publish_in_background(&server, "held", count, size);
        wait_for("publishing was never held", || {
            server.metric("sluice_publish_holds_total") >= 1
        });
        // Held: the core took only part of the stream, and its queues stay
        // within the budget (past it by one publish at most).
        std::thread::sleep(Duration::from_millis(500));
        let taken = server.metric("sluice_publishes_total");
        assert!(taken < count as u64, "{taken}");
        let queued = server.metric("sluice_queued_bytes");
        assert!(
            queued > 16 << 20 && queued <= ((32 << 20) + 4 * (size + 32)) as u64,
            "{queued}"
        );
        // The subscribers read: publishing resumes, and each gets everything.
        let readers: Vec<_> = subs
            .into_iter()
            .map(|sub| read_all_in_background(sub, "held", count, size))
            .collect();
        for reader in readers {
            reader.join().unwrap();
        }
        publisher.join().unwrap();
        server.terminate();
        let log = server.log();
        assert_eq!(common::stopped_count(&log, "publishes"), count as u64, "{log}");
        assert_eq!(common::stopped_count(&log, "slow_consumers"), 0, "{log}");
        assert_eq!(common::stopped_count(&log, "dropped"), 0, "{log}");
    }
);

both_drivers!(
    a_hold_past_the_stall_timeout_closes_the_subscribers_that_took_nothing,
    |driver| {
        // A 2 MiB budget and three subscribers that never read: after 300 ms
        // of a hold they are closed as slow consumers (each holding less than
        // its own 1 MiB limit), and the publisher gets through. Their 1008
        // waits in their full sockets until they read: give the close that long.
        let mut server = Server::start(
            driver,
            &[
                "--workers",
                "1",
                "--max-core-outbound-bytes",
                "2097152",
                "--stall-timeout-ms",
                "300",
                "--close-timeout-ms",
                "30000",
            ],
        );
        let mut stalled: Vec<Raw> = (0..3).map(|_| stalled_subscriber(&server, "jam")).collect();
        std::thread::sleep(SETTLE);
        let (count, size) = (3000, 16 * 1024);
        let (publisher, sent) = publish_in_background(&server, "jam", count, size);
        wait_for("the publisher never got through", || {
            sent.load(Ordering::SeqCst) == count
        });
        publisher.join().unwrap();
        for sub in &mut stalled {
            let (messages, code) = messages_then_close(sub);
            assert_eq!(code, Some(1008));
            assert!(messages < count, "{messages}");
        }
        assert!(server.metric("sluice_publish_holds_total") >= 1);
        // Written by the client is not yet read by the server: the last
        // publishes may still be in the socket (slow under ASan).
        wait_for("the server never took every publish", || {
            server.metric("sluice_publishes_total") == count as u64
        });
        drop(stalled);
        server.terminate();
        let log = server.log();
        assert_eq!(common::stopped_count(&log, "publishes"), count as u64, "{log}");
        assert_eq!(common::stopped_count(&log, "slow_consumers"), 3, "{log}");
    }
);

both_drivers!(
    slow_consumer_is_closed_with_1008_while_others_keep_receiving,
    |driver| {
        // The slow subscriber reads only once the flood is over, and the
        // 1008 waits in its full socket until then: give the close that long.
        let mut server = Server::start(driver, &["--close-timeout-ms", "30000"]);
        let url = server.url("/ws");
        let mut slow = stalled_subscriber(&server, "firehose");
        std::thread::sleep(SETTLE);
        // 3,000 x 8 KiB: far more than the socket buffers and the 1 MiB limit hold.
        tokio_rt().block_on(flood(&url, "firehose", 3000, 8 * 1024));
        // Reading now: some messages, then the close.
        let (messages, code) = messages_then_close(&mut slow);
        assert_eq!(code, Some(1008));
        assert!(messages < 3000, "{messages}");
        server.terminate();
        let log = server.log();
        assert!(log.contains("slow_consumers=1"), "{log}");
        assert!(log.contains("dropped=0"), "{log}");
    }
);

both_drivers!(slow_consumer_under_drop_policy_loses_messages_but_stays, |driver| {
    let mut server = Server::start(driver, &["--slow-consumer", "drop"]);
    let url = server.url("/ws");
    let mut slow = stalled_subscriber(&server, "firehose");
    std::thread::sleep(SETTLE);
    tokio_rt().block_on(flood(&url, "firehose", 3000, 8 * 1024));
    // It is still open: it gets what was kept, then later messages again.
    slow.stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut messages = 0;
    while let Some(frame) = slow.read_frame() {
        assert_eq!(frame.opcode, 1);
        messages += 1;
    }
    assert!(messages > 0 && messages < 3000, "{messages}");
    server.terminate();
    let log = server.log();
    assert!(log.contains("slow_consumers=0"), "{log}");
    assert!(!log.contains("dropped=0 "), "{log}");
});

both_drivers!(full_ring_back_pressures_the_publisher_and_loses_nothing, |driver| {
    let server = Server::start(driver, &["--mesh-ring-capacity", "16"]);
    let url = server.url("/ws");
    tokio_rt().block_on(async {
        let mut cores = connect_on_every_core(&url, 2, 1).await;
        let mut subscriber = cores[1].pop().unwrap();
        let mut publisher = cores[0].pop().unwrap();
        send(&mut subscriber.ws, "SUB q".into()).await;
        tokio::time::sleep(SETTLE).await;
        const COUNT: usize = 20_000;
        let pubs = tokio::spawn(async move {
            for i in 0..COUNT {
                send(&mut publisher.ws, format!("PUB q {i}")).await;
            }
            publisher
        });
        let mut seen = HashSet::new();
        for i in 0..COUNT {
            assert_eq!(next_text(&mut subscriber.ws).await, format!("MSG q {i}"));
            seen.insert(i);
        }
        assert_eq!(seen.len(), COUNT);
        pubs.await.unwrap();
    });
});

/// A raw native client and its core (from its HELLO).
fn raw_on_core(server: &Server, core: Option<u32>) -> (Raw, u32) {
    for _ in 0..200 {
        let mut raw = Raw::open(server.addr, "/ws");
        let hello = String::from_utf8(raw.read_frame().unwrap().payload).unwrap();
        let on: u32 = hello["HELLO ".len()..].split('.').next().unwrap().parse().unwrap();
        if core.is_none_or(|c| c == on) {
            return (raw, on);
        }
    }
    panic!("no connection landed on core {core:?}");
}

both_drivers!(interest_changes_past_a_full_ring_all_arrive, |driver| {
    // Rings of 16 envelopes. Core B is held (subscribers that do not read
    // have its budget's worth queued), so it drains nothing, while a
    // subscriber on core A subscribes to 600 topics in one read: 16 of the
    // interest changes fill A's ring to B, the rest wait in A's outbox.
    // Once B drains again it must ring A back for the rest; otherwise B
    // never learns of the later topics, and its publishes to them skip A.
    const TOPICS: usize = 600;
    const SIZE: usize = 16 * 1024;
    let server = Server::start(
        driver,
        &[
            "--mesh-ring-capacity",
            "16",
            "--max-outbound-bytes",
            "4194304",
            "--max-core-outbound-bytes",
            "8388608",
            "--stall-timeout-ms",
            "600000",
        ],
    );
    let (mut sub, core_a) = raw_on_core(&server, None);
    let core_b = 1 - core_a;
    // Three, so that the core's budget (8 MiB) is passed before any one's
    // own limit (4 MiB).
    let jams: Vec<Raw> = (0..3)
        .map(|_| {
            let (mut jam, _) = raw_on_core(&server, Some(core_b));
            jam.send(&masked_frame(0x81, b"SUB jam"));
            jam
        })
        .collect();
    let (mut filler, _) = raw_on_core(&server, Some(core_b));
    let (mut publisher, _) = raw_on_core(&server, Some(core_b));
    std::thread::sleep(SETTLE);
    let body = "z".repeat(SIZE);
    let count = 800;
    let fill = std::thread::spawn(move || {
        for i in 0..count {
            filler.send(&masked_frame(0x81, format!("PUB jam {i:05} {body}").as_bytes()));
        }
    });
    wait_for("core B was never held", || {
        server.metric("sluice_publish_holds_total") >= 1
    });
    let subs: Vec<u8> = (0..TOPICS)
        .flat_map(|t| masked_frame(0x81, format!("SUB t{t}").as_bytes()))
        .collect();
    sub.send(&subs);
    std::thread::sleep(SETTLE);
    // B drains again once those subscribers are gone (their queues with them).
    drop(jams);
    fill.join().unwrap();
    std::thread::sleep(SETTLE);
    // The latest topics first: B takes them all in one read.
    let pubs: Vec<u8> = (0..TOPICS)
        .rev()
        .flat_map(|t| masked_frame(0x81, format!("PUB t{t} {t}").as_bytes()))
        .collect();
    publisher.send(&pubs);
    for t in (0..TOPICS).rev() {
        let f = sub
            .read_frame()
            .unwrap_or_else(|| panic!("topic {t}: the connection ended"));
        assert_eq!(String::from_utf8(f.payload).unwrap(), format!("MSG t{t} {t}"));
    }
});
