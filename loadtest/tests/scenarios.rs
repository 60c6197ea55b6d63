//! Each scenario against a real server, small and bounded, with its figures
//! checked for sense; and bad targets giving clear, non-zero exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A sluice gateway inside the test process (one worker, epoch driver
/// choice left to auto), stopped when dropped.
struct Gateway {
    addr: SocketAddr,
    stop: Arc<sluice::server::Shutdown>,
    server: Option<sluice::server::Server>,
}

impl Gateway {
    fn start() -> Gateway {
        Gateway::with(Default::default())
    }

    /// One worker on 127.0.0.1, no admin port, and `opts` besides.
    fn with(opts: sluice::config::Options) -> Gateway {
        let opts = sluice::config::Options {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            admin_listen: Some("off".into()),
            workers: Some(1),
            ..opts
        };
        let server = sluice::server::Server::start(opts.validate(1).unwrap()).expect("sluice starts");
        Gateway {
            addr: server.local_addr,
            stop: server.shutdown_handle(),
            server: Some(server),
        }
    }

    /// With a `wss://` listener too, on a certificate for 127.0.0.1 made
    /// here; returns its address and the certificate's PEM file.
    fn start_tls() -> (Gateway, SocketAddr, std::path::PathBuf) {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let dir = std::env::temp_dir().join(format!("sluice-load-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let gw = Gateway::with(sluice::config::Options {
            tls_listen: Some("127.0.0.1:0".parse().unwrap()),
            tls_cert: Some(cert.clone()),
            tls_key: Some(key),
            ..Default::default()
        });
        let tls = gw.server.as_ref().unwrap().tls_addr.unwrap();
        (gw, tls, cert)
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    fn stop(&mut self) {
        self.stop.begin();
        if let Some(s) = self.server.take() {
            s.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

fn load(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-load"))
        .args(args)
        .output()
        .expect("run sluice-load");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json_path(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("sluice-load-{name}-{}.json", std::process::id()))
        .display()
        .to_string()
}

fn read_json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json written")).expect("valid json")
}

fn assert_ordered(p: &Value) {
    let keys = ["p50", "p90", "p99", "p99_9", "p99_99", "max"];
    let values: Vec<u64> = keys.iter().map(|k| p[k].as_u64().unwrap()).collect();
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "percentiles not ordered: {values:?}"
    );
    assert!(values[0] > 0, "latencies recorded");
}

#[test]
fn connect_opens_holds_and_closes_every_connection() {
    let gw = Gateway::start();
    let json = json_path("connect");
    let pid = std::process::id().to_string();
    let out = load(&[
        "connect",
        "--url",
        &gw.url("/echo"),
        "-n",
        "300",
        "--rate",
        "3000",
        "--hold",
        "0.5",
        "--source",
        "127.0.0.1-127.0.0.3",
        "--server-pid",
        &pid,
        "--json",
        &json,
    ]);
    assert!(out.status.success());
    let r = read_json(&json);
    assert_eq!(r["established"], 300);
    assert_eq!(r["failed"].as_object().unwrap().len(), 0);
    assert_eq!(r["clean_closes"], 300);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["handshake_us"]["count"], 300);
    assert!(r["memory"]["server_rss_after_kib"].as_u64().unwrap() > 0);
}

#[test]
fn echo_counts_add_up() {
    let gw = Gateway::start();
    let json = json_path("echo");
    let report = std::env::temp_dir().join(format!("sluice-load-echo-{}.html", std::process::id()));
    let out = load(&[
        "echo",
        "--url",
        &gw.url("/echo"),
        "-c",
        "10",
        "-d",
        "4",
        "-s",
        "32",
        "-t",
        "1",
        "--warmup",
        "0.3",
        "--json",
        &json,
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let r = read_json(&json);
    let (sent, received) = (r["sent"].as_u64().unwrap(), r["received"].as_u64().unwrap());
    assert!(received > 1000, "{received}");
    // Everything measured was sent in the window; at most the last batch is unanswered.
    assert!(
        sent >= received && sent - received <= 10 * 4,
        "sent {sent} received {received}"
    );
    assert_eq!(r["latency_us"]["count"].as_u64().unwrap(), received);
    assert_ordered(&r["latency_us"]);
    assert_eq!((r["errors"].as_u64(), r["clean_closes"].as_u64()), (Some(0), Some(10)));
    assert!(!r["latency_histogram"].as_str().unwrap().is_empty());
    assert!(std::fs::read_to_string(report).unwrap().contains("<svg"));
}

/// The same over wss://: TLS in the harness as in the server.
#[test]
fn echo_over_tls_counts_add_up() {
    let (_gw, tls, cert) = Gateway::start_tls();
    let json = json_path("echo-tls");
    let url = format!("wss://{tls}/echo");
    let out = load(&[
        "echo",
        "--url",
        &url,
        "--ca",
        cert.to_str().unwrap(),
        "-c",
        "10",
        "-d",
        "4",
        "-s",
        "3000",
        "-t",
        "1",
        "--warmup",
        "0.3",
        "--json",
        &json,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let r = read_json(&json);
    let (sent, received) = (r["sent"].as_u64().unwrap(), r["received"].as_u64().unwrap());
    assert!(received > 1000, "{received}");
    assert!(
        sent >= received && sent - received <= 10 * 4,
        "sent {sent} received {received}"
    );
    assert_eq!((r["errors"].as_u64(), r["clean_closes"].as_u64()), (Some(0), Some(10)));
    // A certificate the --ca does not lead to: every connection fails.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let other_file = std::env::temp_dir().join(format!("sluice-load-tls-other-{}.pem", std::process::id()));
    std::fs::write(&other_file, other.cert.pem()).unwrap();
    let out = load(&[
        "connect",
        "--url",
        &url,
        "--ca",
        other_file.to_str().unwrap(),
        "-n",
        "3",
        "--hold",
        "0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("invalid peer certificate"));
}

#[test]
fn churn_cycles_connect_echo_and_close_cleanly() {
    let gw = Gateway::start();
    let json = json_path("churn");
    let out = load(&[
        "churn",
        "--url",
        &gw.url("/echo"),
        "-c",
        "4",
        "-t",
        "1",
        "--warmup",
        "0.2",
        "--json",
        &json,
    ]);
    assert!(out.status.success());
    let r = read_json(&json);
    let cycles = r["received"].as_u64().unwrap();
    assert!(cycles > 100, "{cycles}");
    // Every cycle measured is one handshake, one echo and one clean close.
    assert_eq!(r["latency_us"]["count"].as_u64().unwrap(), cycles);
    let (established, closes) = (r["established"].as_u64().unwrap(), r["clean_closes"].as_u64().unwrap());
    assert!(
        established >= cycles && closes >= cycles,
        "{established} {closes} {cycles}"
    );
    assert!(
        established - closes <= 4,
        "at most the cycles cut by the deadline: {established} {closes}"
    );
    assert_eq!(r["errors"].as_u64(), Some(0));
    assert_ordered(&r["latency_us"]);
    // RFC 6455 7.1.1: the client waits for the server to close the TCP
    // connection, so the server holds TIME_WAIT. None of the churn's client
    // sockets (to the gateway's port) may be left in it.
    let port = format!("{:04X}", gw.addr.port());
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let left = tcp
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // rem_address is IP:PORT in hex; state 06 is TIME_WAIT.
            fields.len() > 3 && fields[2].ends_with(&format!(":{port}")) && fields[3] == "06"
        })
        .count();
    assert!(left <= 4, "{left} client sockets in TIME_WAIT");
}

#[test]
fn plot_draws_one_line_per_series_from_earlier_runs() {
    let gw = Gateway::start();
    let (a, b) = (json_path("plot-a"), json_path("plot-b"));
    for json in [&a, &b] {
        let out = load(&[
            "echo",
            "--url",
            &gw.url("/echo"),
            "-c",
            "2",
            "-d",
            "2",
            "-t",
            "0.3",
            "--warmup",
            "0",
            "--json",
            json,
        ]);
        assert!(out.status.success());
    }
    let svg = std::env::temp_dir().join(format!("sluice-load-plot-{}.svg", std::process::id()));
    let svg = svg.to_str().unwrap();
    let out = load(&[
        "plot",
        "--out",
        svg,
        "--title",
        "two",
        &format!("first={a},{b}"),
        &format!("second={b}"),
    ]);
    assert!(out.status.success());
    let drawn = std::fs::read_to_string(svg).unwrap();
    assert!(drawn.contains("<svg") && drawn.contains("first") && drawn.contains("second"));
    // A series without a label, or a file that is not a run, is refused.
    assert_eq!(load(&["plot", "--out", svg, &a]).status.code(), Some(2));
    assert_eq!(
        load(&["plot", "--out", svg, &format!("x={svg}")]).status.code(),
        Some(2)
    );
}

#[test]
fn latency_keeps_its_schedule_and_loses_nothing() {
    let gw = Gateway::start();
    let json = json_path("latency");
    let out = load(&[
        "latency",
        "--url",
        &gw.url("/echo"),
        "-c",
        "10",
        "-r",
        "2000",
        "-s",
        "16",
        "-t",
        "1",
        "--warmup",
        "0.5",
        "--json",
        &json,
    ]);
    assert!(out.status.success());
    let r = read_json(&json);
    let measured = r["latency_us"]["count"].as_u64().unwrap();
    // 2,000 msg/s for 1 s, give or take one interval per connection; unless
    // the hypervisor took the CPU for more than 5% of the window (the
    // report flags such a run as unreliable), which leaves the end of the
    // schedule unsent when the window closes.
    let steal = r["cpu"]["steal_seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap())
        .fold(0.0, f64::max);
    let low = if steal > 0.05 { 1000 } else { 1950 };
    assert!((low..=2050).contains(&measured), "{measured} (steal {steal} s)");
    // Sent and received both count messages whose intended send time is in
    // the window; on an idle machine every one comes back.
    assert_eq!(r["sent"].as_u64(), r["received"].as_u64());
    assert_eq!(r["received"].as_u64().unwrap(), measured);
    assert_ordered(&r["latency_us"]);
    assert_eq!(r["errors"], 0);
}

#[test]
fn latency_busy_poll_drives_every_connection() {
    let gw = Gateway::start();
    let json = json_path("latency-busy");
    let out = load(&[
        "latency",
        "--url",
        &gw.url("/echo"),
        "-c",
        "20",
        "-r",
        "4000",
        "-s",
        "16",
        "-t",
        "1",
        "--warmup",
        "0.3",
        "--busy-poll",
        "--json",
        &json,
    ]);
    assert!(out.status.success());
    let r = read_json(&json);
    // All 20 connections keep their schedules: 4,000 msg/s in total.
    let measured = r["latency_us"]["count"].as_u64().unwrap();
    assert!((3900..=4100).contains(&measured), "{measured}");
    assert_eq!(r["sent"].as_u64(), r["received"].as_u64());
    assert_eq!((r["errors"].as_u64(), r["clean_closes"].as_u64()), (Some(0), Some(20)));
    assert_ordered(&r["latency_us"]);
}

/// A minimal broadcast server speaking `SUB <topic>` / `PUB <topic> <payload>`,
/// delivering `MSG <topic> <payload>`: the shape of sluice's native protocol,
/// so the fan-out scenario is tested before any particular gateway has it.
fn broadcast_server() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    type Subs = Arc<Mutex<HashMap<String, Vec<tokio::sync::mpsc::UnboundedSender<Message>>>>>;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let subs: Subs = Arc::default();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let subs = subs.clone();
                tokio::spawn(async move {
                    let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let (mut sink, mut stream) = ws.split();
                    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(async move {
                        while let Some(m) = out_rx.recv().await {
                            if sink.send(m).await.is_err() {
                                break;
                            }
                        }
                    });
                    while let Some(Ok(msg)) = stream.next().await {
                        let Message::Text(text) = msg else {
                            if let Message::Close(_) = msg {
                                let _ = out_tx.send(Message::Close(None));
                            }
                            continue;
                        };
                        if let Some(topic) = text.strip_prefix("SUB ") {
                            subs.lock()
                                .unwrap()
                                .entry(topic.to_string())
                                .or_default()
                                .push(out_tx.clone());
                        } else if let Some(rest) = text.strip_prefix("PUB ") {
                            let (topic, payload) = rest.split_once(' ').unwrap_or((rest, ""));
                            let deliver = format!("MSG {topic} {payload}");
                            for s in subs.lock().unwrap().get(topic).into_iter().flatten() {
                                let _ = s.send(Message::Text(deliver.clone()));
                            }
                        }
                    }
                });
            }
        });
    });
    rx.recv().unwrap()
}

#[test]
fn fanout_delivers_everything_in_order() {
    let addr = broadcast_server();
    let json = json_path("fanout");
    let url = format!("ws://{addr}/");
    let out = load(&[
        "fanout",
        "--url",
        &url,
        "--subscribers",
        "20",
        "--topics",
        "2",
        "--publishers",
        "2",
        "-r",
        "200",
        "-s",
        "48",
        "-t",
        "1",
        "--warmup",
        "0.2",
        "--settle-ms",
        "300",
        "--json",
        &json,
    ]);
    assert!(out.status.success());
    let r = read_json(&json);
    let sent = r["sent"].as_u64().unwrap();
    assert!((230..=250).contains(&sent), "200/s over 1.2 s: {sent}");
    // Each publish reaches the 10 subscribers of its topic.
    assert_eq!(r["received"].as_u64().unwrap(), sent * 10);
    assert_eq!((r["lost"].as_u64(), r["out_of_order"].as_u64()), (Some(0), Some(0)));
    assert_ordered(&r["latency_us"]);
}

#[test]
fn fanout_through_sluice_pubsub_loses_nothing() {
    let gw = Gateway::start();
    let json = json_path("fanout-sluice");
    let url = gw.url("/ws");
    let out = load(&[
        "fanout",
        "--url",
        &url,
        "--subscribers",
        "50",
        "--topics",
        "3",
        "--publishers",
        "3",
        "-r",
        "300",
        "-t",
        "1",
        "--warmup",
        "0.2",
        "--settle-ms",
        "300",
        "--threads",
        "2",
        "--json",
        &json,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let r = read_json(&json);
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent > 300, "{sent}");
    // 50 subscribers over 3 topics: 17, 17 and 16 of them.
    assert_eq!((r["lost"].as_u64(), r["out_of_order"].as_u64()), (Some(0), Some(0)));
    assert!(r["received"].as_u64().unwrap() >= sent * 16);
    assert_ordered(&r["latency_us"]);
    // Every measured delivery also has its kernel arrival stamp.
    assert_ordered(&r["arrival_us"]);
    assert_eq!(r["arrival_us"]["count"], r["latency_us"]["count"]);
    assert!(r["arrivals_per_second"].as_f64().unwrap() > 0.0);
    // The publishers ran in a thread of their own, which timed its lag.
    assert!(r["publish_lag_us"]["count"].as_u64().unwrap() > 0);
}

/// Publishers on another URL than the subscribers (`--pub-url`): here the
/// same gateway's wss:// listener, subscribers on its ws:// one, so every
/// publish crosses from one to the other.
#[test]
fn fanout_publishers_connect_to_their_own_url() {
    let (gw, tls, cert) = Gateway::start_tls();
    let json = json_path("fanout-pub-url");
    let url = gw.url("/ws");
    let pub_url = format!("wss://{tls}/ws");
    let cert = cert.to_str().unwrap();
    let run = |pub_url: &str, json: &str| {
        load(&[
            "fanout",
            "--url",
            &url,
            "--pub-url",
            pub_url,
            "--ca",
            cert,
            "--subscribers",
            "20",
            "--publishers",
            "2",
            "-r",
            "200",
            "-t",
            "1",
            "--warmup",
            "0.2",
            "--settle-ms",
            "300",
            "--json",
            json,
        ])
    };
    let out = run(&pub_url, &json);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let r = read_json(&json);
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent > 100, "{sent}");
    assert_eq!((r["lost"].as_u64(), r["out_of_order"].as_u64()), (Some(0), Some(0)));
    assert!(r["received"].as_u64().unwrap() >= sent * 20);
    assert_eq!(r["parameters"]["publishers' url"].as_str(), Some(pub_url.as_str()));
    // Publishers on a route that publishes nothing (the echo route): the
    // subscribers get nothing, and the run says so.
    let json = json_path("fanout-pub-url-echo");
    let out = run(&format!("wss://{tls}/echo"), &json);
    assert!(!out.status.success());
    let r = read_json(&json);
    assert_eq!(r["received"].as_u64(), Some(0));
    assert!(r["lost"].as_u64().unwrap() > 0);
}

#[test]
fn unreachable_server_is_a_clear_failure() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}/echo");
    let start = Instant::now();
    let out = load(&["echo", "--url", &url, "-c", "3", "-t", "1", "--warmup", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused 3"));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn non_101_answers_are_reported_as_such() {
    let gw = Gateway::start();
    let out = load(&["connect", "--url", &gw.url("/no-such-route"), "-n", "5", "--hold", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("non-101 5") && stdout.contains("HTTP 404"), "{stdout}");
}

#[test]
fn server_stopping_mid_run_ends_the_run_with_an_error() {
    let mut gw = Gateway::start();
    let url = gw.url("/echo");
    let run = std::thread::spawn(move || load(&["echo", "--url", &url, "-c", "5", "-t", "5", "--warmup", "0"]));
    std::thread::sleep(Duration::from_millis(800));
    let start = Instant::now();
    gw.stop();
    let out = run.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(start.elapsed() < Duration::from_secs(8), "the run ended, not hung");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("server sent close 1001"), "{stdout}");
}

/// Completes the WebSocket handshake, then never reads or writes again.
fn black_hole_server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let mut held = Vec::new();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                    held.push(ws);
                }
            }
        });
    });
    rx.recv().unwrap()
}

#[test]
fn server_that_stops_reading_cannot_hang_the_run() {
    let addr = black_hole_server();
    let url = format!("ws://{addr}/");
    let start = Instant::now();
    // Large messages fill both socket buffers quickly, so the writes stall.
    let out = load(&[
        "echo", "--url", &url, "-c", "2", "-d", "64", "-s", "60000", "-t", "1", "--warmup", "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("echoed nothing back"));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "bounded: {:?}",
        start.elapsed()
    );
    let start = Instant::now();
    let out = load(&[
        "latency", "--url", &url, "-c", "2", "-r", "2000", "-s", "60000", "-t", "1", "--warmup", "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "bounded: {:?}",
        start.elapsed()
    );
}

#[test]
fn bad_arguments_exit_2() {
    let out = load(&["echo", "--url", "http://127.0.0.1:1/"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give a ws:// or wss:// URL"));
    let out = load(&["echo", "--url", "wss://127.0.0.1:1/"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --ca"));
    let out = load(&["latency", "--url", "ws://127.0.0.1:1/", "-s", "4"]);
    assert_eq!(out.status.code(), Some(2));
}
