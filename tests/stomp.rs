//! STOMP 1.2 on `/stomp`, under both I/O drivers: an independent client
//! library (@stomp/stompjs over `ws`, under Node; tests/stomp/scenarios.mjs)
//! and raw frames for what a library does not send: split and batched
//! frames, silence against promised heart-beats, queues across cores,
//! parking, limits.

mod common;

use common::{stopped_count, upgrade_request, Raw, Server};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Time for a subscription to reach the server's other core (a RECEIPT
/// confirms it on the subscriber's own core).
const SETTLE: Duration = Duration::from_millis(300);

/// A STOMP frame as the server sent it, parsed by hand.
#[derive(Debug)]
struct Stomp {
    command: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Stomp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn parse(payload: &[u8]) -> Stomp {
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
        assert_eq!(body.last(), Some(&0), "frames end with NUL");
        Stomp {
            command,
            headers,
            body: body[..body.len() - 1].to_vec(),
        }
    }
}

struct Client {
    raw: Raw,
    session: String,
}

impl Client {
    fn connect(server: &Server, heart_beat: &str) -> Client {
        let mut raw = Raw::connect(server.addr);
        raw.send(upgrade_request("/stomp", "Sec-WebSocket-Protocol: v12.stomp\r\n").as_bytes());
        let head = raw.read_head();
        assert!(head.contains("Sec-WebSocket-Protocol: v12.stomp"), "{head}");
        let mut c = Client {
            raw,
            session: String::new(),
        };
        c.send(&format!(
            "CONNECT\naccept-version:1.2\nhost:x\nheart-beat:{heart_beat}\n\n\0"
        ));
        let connected = c.next();
        assert_eq!(connected.command, "CONNECTED", "{connected:?}");
        c.session = connected.header("session").unwrap().to_string();
        c
    }

    fn core(&self) -> usize {
        self.session.split('.').next().unwrap().parse().unwrap()
    }

    fn send(&mut self, text: &str) {
        self.raw.send_frame(0x81, text.as_bytes());
    }

    /// The next STOMP frame (heart-beat EOLs are skipped).
    fn next(&mut self) -> Stomp {
        loop {
            let f = self.raw.read_frame().expect("a frame");
            assert!(f.opcode == 1 || f.opcode == 2, "data frame, got {f:?}");
            if f.payload != b"\n" {
                return Stomp::parse(&f.payload);
            }
        }
    }

    /// Sends a frame asking for a receipt and waits for it.
    fn confirmed(&mut self, frame_head: &str, body: &str) {
        self.send(&format!("{frame_head}\nreceipt:r\n\n{body}\0"));
        let r = self.next();
        assert_eq!(
            (r.command.as_str(), r.header("receipt-id")),
            ("RECEIPT", Some("r")),
            "{r:?}"
        );
    }
}

both_drivers!(stompjs_scenarios, |driver| {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stomp/node_modules/@stomp/stompjs");
    if !modules.exists() {
        // scripts/test.sh installs the client (npm ci in tests/stomp) and
        // sets this, so CI never skips it.
        assert!(
            std::env::var_os("SLUICE_REQUIRE_STOMPJS").is_none(),
            "@stomp/stompjs is not installed in tests/stomp"
        );
        eprintln!("skipped: run `npm ci --prefix tests/stomp` to test with @stomp/stompjs");
        return;
    }
    let server = Server::start(driver, &["--stomp-heart-beat-ms", "200"]);
    let out = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stomp/scenarios.mjs"))
        .arg(format!("ws://{}", server.addr))
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 7, "{stdout}");
});

both_drivers!(frames_split_and_batched_across_messages, |driver| {
    let server = Server::start(driver, &[]);
    let mut sub = Client::connect(&server, "0,0");
    sub.confirmed("SUBSCRIBE\nid:0\ndestination:/topic/t", "");
    std::thread::sleep(SETTLE);
    let mut publisher = Client::connect(&server, "0,0");
    // One SEND over three WebSocket messages (as stomp.js splits large
    // frames), then two SENDs and heart-beat EOLs in one message.
    publisher.send("SEND\ndestination:/to");
    publisher.send("pic/t\ncontent-length:5\n\nab");
    publisher.send("\0de\0");
    publisher.send("\n\r\nSEND\ndestination:/topic/t\n\ntwo\0\nSEND\ndestination:/topic/t\n\nthree\0\n");
    let bodies: Vec<Vec<u8>> = (0..3).map(|_| sub.next().body).collect();
    assert_eq!(bodies, [b"ab\0de".to_vec(), b"two".to_vec(), b"three".to_vec()]);
});

both_drivers!(a_client_silent_past_its_heart_beat_is_closed, |driver| {
    let server = Server::start(
        driver,
        &["--stomp-heart-beat-ms", "100", "--stomp-heart-beat-grace-ms", "200"],
    );
    // It promises a heart-beat every 100 ms and wants ours as often.
    let mut c = Client::connect(&server, "100,100");
    let start = Instant::now();
    let mut eols = 0;
    let code = loop {
        let f = c.raw.read_frame().expect("a frame");
        match f.opcode {
            1 if f.payload == b"\n" => eols += 1,
            8 => break f.close_code(),
            _ => panic!("unexpected {f:?}"),
        }
    };
    let after = start.elapsed();
    assert_eq!(code, Some(1001));
    assert!(eols >= 1, "the server sent heart-beats meanwhile");
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
    // One that keeps sending stays.
    let mut c = Client::connect(&server, "100,0");
    for _ in 0..10 {
        c.raw.send_frame(0x81, b"\n");
        std::thread::sleep(Duration::from_millis(60));
    }
    c.confirmed("SEND\ndestination:/topic/alive", "still here");
});

both_drivers!(queues_take_turns_across_cores, |driver| {
    let server = Server::start(driver, &[]);
    // Two subscribers on each core.
    let mut on_core: Vec<Vec<Client>> = vec![Vec::new(), Vec::new()];
    for _ in 0..200 {
        if on_core.iter().all(|c| c.len() == 2) {
            break;
        }
        let c = Client::connect(&server, "0,0");
        let core = c.core();
        if on_core[core].len() < 2 {
            on_core[core].push(c);
        }
    }
    assert!(
        on_core.iter().all(|c| c.len() == 2),
        "connections did not land on both cores"
    );
    let mut subs: Vec<Client> = on_core.into_iter().flatten().collect();
    for s in &mut subs {
        s.confirmed("SUBSCRIBE\nid:q\ndestination:/queue/work", "");
    }
    // Each core learns of the other's subscribers through the mesh.
    std::thread::sleep(SETTLE);
    let mut publisher = Client::connect(&server, "0,0");
    for i in 0..40 {
        publisher.send(&format!("SEND\ndestination:/queue/work\n\njob {i}\0"));
    }
    publisher.confirmed("SEND\ndestination:/topic/none", "");
    let mut all = Vec::new();
    for s in &mut subs {
        let got: Vec<String> = (0..10)
            .map(|_| {
                let m = s.next();
                assert_eq!(m.header("destination"), Some("/queue/work"));
                String::from_utf8(m.body).unwrap()
            })
            .collect();
        all.extend(got);
    }
    // And nobody got an eleventh.
    for s in &mut subs {
        s.raw.stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        assert!(s.raw.read_frame().is_none(), "an extra message");
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 40, "each job exactly once");
});

both_drivers!(a_parked_stomp_session_keeps_its_state, |driver| {
    let mut server = Server::start(driver, &["--park-after-ms", "50", "--stomp-heart-beat-ms", "0"]);
    let mut sub = Client::connect(&server, "0,0");
    sub.confirmed("SUBSCRIBE\nid:7\ndestination:/topic/p\nack:client", "");
    sub.confirmed("BEGIN\ntransaction:t1", "");
    // Half a frame waits in the decoder while the session is parked.
    sub.send("SEND\ndestination:/topic/p\ntransaction:t1\n\nheld");
    // Parked after 50 ms of quiet (swept every 12 ms).
    std::thread::sleep(Duration::from_millis(400));
    let mut publisher = Client::connect(&server, "0,0");
    publisher.confirmed("SEND\ndestination:/topic/p", "to a parked subscriber");
    let m = sub.next();
    assert_eq!(m.body, b"to a parked subscriber");
    assert_eq!((m.header("subscription"), m.header("ack").is_some()), (Some("7"), true));
    // The rest of the frame, then the commit: the transaction survived.
    sub.send("\0");
    sub.confirmed("COMMIT\ntransaction:t1", "");
    assert_eq!(sub.next().body, b"held");
    drop((sub, publisher));
    server.terminate();
    assert!(stopped_count(&server.log(), "parks") >= 1, "{}", server.log());
});

both_drivers!(limits_and_bad_frames_end_in_error, |driver| {
    let server = Server::start(driver, &["--max-message-bytes", "1024"]);
    let expect_error = |c: &mut Client, message: &str| {
        let e = c.next();
        assert_eq!(
            (e.command.as_str(), e.header("message")),
            ("ERROR", Some(message)),
            "{e:?}"
        );
        assert!(!e.body.is_empty(), "the ERROR body says more");
        assert_eq!(c.raw.expect_close(), Some(1002));
    };
    // A frame may span WebSocket messages, so its body has a limit of its
    // own (--max-message-bytes): at the limit it passes, one byte more is
    // an ERROR.
    let mut c = Client::connect(&server, "0,0");
    let half = "x".repeat(512);
    c.send("SEND\ndestination:/topic/big\nreceipt:r\n\n");
    c.send(&half);
    c.send(&half);
    c.send("\0");
    assert_eq!(c.next().command, "RECEIPT");
    c.send("SEND\ndestination:/topic/big\n\n");
    c.send(&half);
    c.send(&half);
    c.send("x\0");
    expect_error(&mut c, "body too large");
    let mut c = Client::connect(&server, "0,0");
    c.send("FOO\n\n\0");
    expect_error(&mut c, "unknown command");
    let mut c = Client::connect(&server, "0,0");
    c.send("SUBSCRIBE\nid:1\ndestination:/exchange/x\nreceipt:r1\n\n\0");
    let e = c.next();
    assert_eq!(e.header("receipt-id"), Some("r1"));
    assert_eq!(e.header("message"), Some("unsupported destination"));
    // Without any subprotocol offered, the route still speaks STOMP 1.2.
    let mut raw = Raw::open(server.addr, "/stomp");
    raw.send_frame(0x81, b"CONNECT\naccept-version:1.1,1.2\n\n\0");
    let f = raw.read_frame().unwrap();
    assert!(f.payload.starts_with(b"CONNECTED\n"));
    assert!(String::from_utf8_lossy(&f.payload).contains("version:1.2"));
    raw.send_frame(0x81, b"DISCONNECT\nreceipt:bye\n\n\0");
    let r = Stomp::parse(&raw.read_frame().unwrap().payload);
    assert_eq!(r.header("receipt-id"), Some("bye"));
    assert_eq!(raw.expect_close(), Some(1000));
});

both_drivers!(a_queue_message_has_one_consumer_and_names_are_escaped, |driver| {
    let server = Server::start(driver, &[]);
    // Two subscriptions of one connection to one queue: each message is
    // consumed once.
    let mut c = Client::connect(&server, "0,0");
    c.confirmed("SUBSCRIBE\nid:a\ndestination:/queue/jobs:eu", "");
    c.confirmed("SUBSCRIBE\nid:b\ndestination:/queue/jobs:eu", "");
    std::thread::sleep(SETTLE);
    let mut publisher = Client::connect(&server, "0,0");
    publisher.confirmed("SEND\ndestination:/queue/jobs:eu", "one");
    publisher.confirmed("SEND\ndestination:/queue/jobs:eu", "two");
    for body in [&b"one"[..], b"two"] {
        let m = c.next();
        assert_eq!(m.body, body);
        // A colon in a header value is escaped (STOMP 1.2 "Value Encoding").
        assert_eq!(m.header("destination"), Some("/queue/jobs\\ceu"));
    }
    c.raw.stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    assert!(c.raw.read_frame().is_none(), "a message came twice");
});
