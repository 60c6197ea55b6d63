//! The examples a newcomer runs, each run here against the real binary:
//! examples/sluice.toml starts as it is (and its token route, once
//! uncommented as its comments say); examples/browser in headless Chromium
//! (tests/browser/drive.py) reads a publish on both protocols; and the
//! Python and Node clients reconnect, subscribe again, and refresh their
//! token before it expires. The admin API publishes and closes sessions
//! from here. A misbehaving server written here (`hostile`) and malformed
//! token files check that the clients neither crash nor hammer.
//!
//! Needs what scripts/test.sh installs: `npm ci` in examples/browser and
//! examples/node, Python's `websockets` on PYTHONPATH (or in
//! target/python), Node.js and Chromium. Without the npm packages the
//! tests that need them are skipped, unless SLUICE_REQUIRE_EXAMPLES is set.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

fn example_config() -> PathBuf {
    root().join("examples/sluice.toml")
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sluice-examples-{}-{name}", std::process::id()))
}

/// PYTHONPATH with target/python (where scripts/test.sh installs
/// `websockets`) ahead of whatever the caller set.
fn python_path() -> std::ffi::OsString {
    let mut paths = vec![root().join("target/python")];
    if let Some(inherited) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&inherited));
    }
    std::env::join_paths(paths).unwrap()
}

/// True when `modules` (an npm package the example needs) is installed;
/// otherwise the test is skipped, or fails under scripts/test.sh.
fn installed(modules: &str, install: &str) -> bool {
    if root().join(modules).exists() {
        return true;
    }
    assert!(
        std::env::var_os("SLUICE_REQUIRE_EXAMPLES").is_none(),
        "{modules} is missing: run `{install}`"
    );
    eprintln!("skipped: run `{install}` first");
    false
}

/// A process of the test's, in a process group of its own (so Chromium,
/// under drive.py, goes with it), and the lines it printed so far.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let lines = gather_lines(child.stdout.take().unwrap());
        Proc { child, lines }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first line from the `from`th on that starts with `prefix`, and
    /// its index; fails after `limit`.
    fn wait_for(&self, from: usize, prefix: &str, limit: Duration) -> (usize, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.find(from, prefix) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no line starting {prefix:?} after line {from} within {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn find(&self, from: usize, prefix: &str) -> Option<(usize, String)> {
        let lines = self.lines.lock().unwrap();
        (from..lines.len())
            .find(|&i| lines[i].starts_with(prefix))
            .map(|i| (i, lines[i].clone()))
    }

    /// Waits (bounded) for the process to exit by itself.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SIGINT first: drive.py then closes Chromium itself; the group's
        // SIGKILL after a while ends whatever is left.
        let group = -(self.child.id() as i32);
        // SAFETY: kill(2) on the process group of our own child.
        unsafe { libc::kill(group, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// One admin API request; the status code and the body.
fn admin(addr: SocketAddr, method: &str, target: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (code, body)
}

/// Publishes `payload` to `topic` every 300 ms until each of `proc`'s
/// lines `expected` has come (from line `from` on), for at most 10 s. A
/// subscription has no answer in the native protocol, and takes a moment
/// to reach the server's other core, so the first publish may find none.
fn publish_until(admin_addr: SocketAddr, proc: &Proc, from: usize, topic: &str, payload: &str, expected: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = admin(admin_addr, "POST", &format!("/publish?topic={topic}"), payload);
        assert_eq!(code, 200, "{body}");
        let wait = Instant::now() + Duration::from_millis(300);
        while Instant::now() < wait {
            if expected.iter().all(|e| proc.find(from, e).is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            Instant::now() < deadline,
            "{expected:?} did not come after line {from}:\n{}",
            proc.output()
        );
    }
}

/// examples/sluice.toml with its token route turned on as its comments
/// say (the `#` taken from each line that starts with `#` and no space),
/// the secret read from `secret`.
fn token_config(secret: &Path) -> String {
    let example = std::fs::read_to_string(example_config()).unwrap();
    let mut out = String::new();
    for line in example.lines() {
        let uncommented = line
            .strip_prefix('#')
            .filter(|rest| rest.chars().next().is_some_and(|c| !c.is_whitespace()));
        out.push_str(uncommented.unwrap_or(line));
        out.push('\n');
    }
    assert!(out.contains("\npath = \"/live\""), "{out}");
    let secret_line = "jwt_secret_file = \"/etc/sluice/jwt-secret\"";
    assert!(out.contains(secret_line), "{out}");
    out.replace(
        secret_line,
        &format!("jwt_secret_file = {:?}", secret.to_str().unwrap()),
    )
}

const SECRET: &str = "an-example-secret-of-at-least-thirty-two-bytes";

fn token(user: &str, exp: u64) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let claims = serde_json::json!({
        "sub": user,
        "exp": exp,
        "sluice": {"subscribe": ["news"], "publish": []},
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Replaces the file whole, as a token issuer should (a reader never sees
/// half a token).
fn write_atomically(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

both_drivers!(the_example_configuration_starts_as_it_is, |driver| {
    // Only the listeners are moved, to free ports (Server's flags).
    let server = Server::start(driver, &["--config", example_config().to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let routes = [
        "route /echo protocol=echo",
        "route /ws protocol=pubsub",
        "route /stomp protocol=stomp",
    ];
    while !routes.iter().all(|r| server.log().contains(r)) {
        assert!(
            Instant::now() < deadline,
            "routes missing from the log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!server.log().contains("route /live"), "{}", server.log());

    let mut echo = Raw::open(server.addr, "/echo");
    echo.send_frame(0x81, b"hello");
    let frame = echo.read_frame().expect("an echo");
    assert_eq!((frame.opcode, frame.payload.as_slice()), (1, &b"hello"[..]));

    assert_eq!(admin(server.admin_addr(), "GET", "/healthz", "").0, 200);
});

#[test]
fn the_example_configuration_shows_every_option_and_only_options() {
    let help = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<String> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '=']).next().unwrap().to_string())
        .filter(|f| !["config", "help", "version"].contains(&f.as_str()))
        .collect();
    assert!(flags.len() > 50, "{help}");
    // The keys before the first route, commented or not.
    let example = std::fs::read_to_string(example_config()).unwrap();
    let global = example.split("\n[[route]]").next().unwrap();
    let keys: Vec<String> = global
        .lines()
        .filter_map(|l| l.trim_start_matches('#').trim_start().split_once(" = "))
        .map(|(key, _)| key.to_string())
        .filter(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .collect();
    for key in &keys {
        assert!(
            flags.contains(&key.replace('_', "-")),
            "{key} is not an option of sluice --help"
        );
    }
    for flag in &flags {
        assert!(
            keys.contains(&flag.replace('-', "_")),
            "--{flag} is not in examples/sluice.toml"
        );
    }
}

both_drivers!(the_token_route_of_the_example_configuration_uncommented, |driver| {
    let secret = temp_path(&format!("secret-{driver}"));
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let config = temp_path(&format!("live-{driver}.toml"));
    std::fs::write(&config, token_config(&secret)).unwrap();
    let server = Server::start(driver, &["--config", config.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log().contains("route /live protocol=pubsub auth=optional") {
        assert!(Instant::now() < deadline, "no /live route:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Anonymous: the route's grants, `public.*` and nothing else.
    let mut raw = Raw::open(server.addr, "/live");
    let hello = raw.read_frame().unwrap();
    assert!(hello.payload.starts_with(b"HELLO "), "{hello:?}");
    raw.send_frame(0x81, b"SUB news");
    assert_eq!(raw.read_frame().unwrap().payload, b"ERR denied news");
    raw.send_frame(0x81, b"SUB public.news");
    // Published until it comes: the subscription takes a moment to reach
    // the server's other core.
    raw.stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = admin(server.admin_addr(), "POST", "/publish?topic=public.news", "hi");
        assert_eq!(code, 200);
        if let Some(frame) = raw.read_frame() {
            assert_eq!(frame.payload, b"MSG public.news hi", "{frame:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no MSG public.news");
    }
    let _ = std::fs::remove_file(secret);
    let _ = std::fs::remove_file(config);
});

#[test]
fn the_browser_page_reads_a_publish_on_both_protocols() {
    if !installed(
        "examples/browser/node_modules/@stomp/stompjs/bundles/stomp.umd.min.js",
        "npm ci --prefix examples/browser",
    ) {
        return;
    }
    let server = Server::start("uring", &["--config", example_config().to_str().unwrap()]);
    let port = free_port();
    let _http = Proc::spawn(
        Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(root().join("examples/browser"))
            .arg(port.to_string())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "python3 -m http.server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let page = format!("http://127.0.0.1:{port}/?sluice=ws://{}&topic=news&auto=1", server.addr);
    let native = "native: MSG news hello";
    let stomp = "stomp: MESSAGE /topic/news hello";
    let mut drive = Proc::spawn(
        Command::new("python3")
            .arg(root().join("tests/browser/drive.py"))
            .args(["--follow", page.as_str(), "40", native, stomp])
            .env("PYTHONPATH", python_path()),
    );
    // Published only once the page has subscribed on both.
    let (a, _) = drive.wait_for(0, "native: subscribed news", Duration::from_secs(30));
    let (b, _) = drive.wait_for(0, "stomp: subscribed /topic/news", Duration::from_secs(30));
    publish_until(server.admin_addr(), &drive, a.max(b), "news", "hello", &[native, stomp]);
    let status = drive.wait_exit(Duration::from_secs(45));
    assert!(status.success(), "{}", drive.output());
    let output = drive.output();
    assert!(output.contains("native: connected, session "), "{output}");
    assert!(output.contains("stomp: connected, session "), "{output}");
}

/// One of the example clients.
#[derive(Clone, Copy, Debug)]
enum Client {
    Python,
    Node,
}

impl Client {
    /// The client's command, with `args`; None when it is not installed.
    fn command(self, args: &[&str]) -> Option<Command> {
        match self {
            Client::Python => {
                let mut cmd = Command::new("python3");
                cmd.arg(root().join("examples/python/client.py"))
                    .args(args)
                    .env("PYTHONPATH", python_path());
                Some(cmd)
            }
            Client::Node => {
                if !installed("examples/node/node_modules/ws", "npm ci --prefix examples/node") {
                    return None;
                }
                let mut cmd = Command::new("node");
                cmd.arg(root().join("examples/node/client.mjs")).args(args);
                Some(cmd)
            }
        }
    }
}

/// The client subscribes to two topics and reads a publish on each; its
/// session is closed through the admin API; it says it reconnects after
/// a delay within its first backoff, subscribes to both again on a new
/// session, and reads the next publishes.
fn reconnects_and_subscribes_again(driver: &str, client: Client) {
    let server = Server::start(driver, &["--config", example_config().to_str().unwrap()]);
    let url = server.url("/ws");
    let Some(mut cmd) = client.command(&[
        "--url",
        &url,
        "--backoff-ms",
        "400",
        "--stable-ms",
        "500",
        "news",
        "sport",
    ]) else {
        return;
    };
    let proc = Proc::spawn(&mut cmd);
    let limit = Duration::from_secs(10);
    let (_, connected) = proc.wait_for(0, "connected ", limit);
    let first = connected["connected ".len()..].to_string();
    proc.wait_for(0, "subscribed news", limit);
    let (mark, _) = proc.wait_for(0, "subscribed sport", limit);
    publish_until(server.admin_addr(), &proc, mark, "news", "one", &["MSG news one"]);
    publish_until(server.admin_addr(), &proc, mark, "sport", "two", &["MSG sport two"]);

    let (code, body) = admin(
        server.admin_addr(),
        "DELETE",
        &format!("/sessions/{first}?code=4000&reason=bye"),
        "",
    );
    assert_eq!(code, 200, "{body}");
    let (closed, line) = proc.wait_for(mark, "closed ", limit);
    assert_eq!(line.trim_end(), "closed 4000 bye");
    let (_, line) = proc.wait_for(closed, "reconnecting in ", limit);
    let delay_ms: u64 = line["reconnecting in ".len()..]
        .trim_end_matches(" ms")
        .parse()
        .unwrap();
    assert!(
        (200..=400).contains(&delay_ms),
        "{line}: the first delay is jittered within the backoff"
    );
    let (again, connected) = proc.wait_for(closed, "connected ", limit);
    let second = &connected["connected ".len()..];
    assert_ne!(second, first, "a new session");
    proc.wait_for(again, "subscribed news", limit);
    let (mark, _) = proc.wait_for(again, "subscribed sport", limit);
    // Read only if the client subscribed again: the new session starts with none.
    // A message's control characters are spelled out, not sent to the terminal.
    publish_until(
        server.admin_addr(),
        &proc,
        mark,
        "news",
        "\u{1b}]0;t\u{7}\u{9b}three",
        &["MSG news \\x1b]0;t\\x07\\x9bthree"],
    );
    publish_until(server.admin_addr(), &proc, mark, "sport", "four", &["MSG sport four"]);
    assert_eq!(
        admin(server.admin_addr(), "GET", &format!("/sessions/{second}"), "").0,
        200
    );
}

/// The client connects to the token route with a token that expires in 7-8
/// s (time for a slow start on a loaded machine); the file gets a fresh one; the client sends it with AUTH before the
/// first expires, so its session lives past that expiry (no 4001), goes on
/// reading publishes, and the server counts the refresh.
fn refreshes_its_token(driver: &str, client: Client) {
    let secret = temp_path(&format!("secret-{driver}-{client:?}"));
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let config = temp_path(&format!("live-{driver}-{client:?}.toml"));
    std::fs::write(&config, token_config(&secret)).unwrap();
    // No leeway: the token is refused the moment its exp passes.
    let server = Server::start(
        driver,
        &["--config", config.to_str().unwrap(), "--jwt-leeway-secs", "0"],
    );
    let token_file = temp_path(&format!("token-{driver}-{client:?}"));
    let exp = now_secs() + 8;
    write_atomically(&token_file, &token("alice", exp));
    let url = server.url("/live");
    let args = [
        "--url",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
        "--refresh-margin",
        "1",
        "news",
    ];
    let Some(mut cmd) = client.command(&args) else {
        return;
    };
    let proc = Proc::spawn(&mut cmd);
    let limit = Duration::from_secs(10);
    let (_, connected) = proc.wait_for(0, "connected ", limit);
    let session = connected["connected ".len()..].to_string();
    write_atomically(&token_file, &token("alice", now_secs() + 600));
    let (mark, _) = proc.wait_for(0, "subscribed news", limit);
    publish_until(server.admin_addr(), &proc, mark, "news", "before", &["MSG news before"]);
    proc.wait_for(0, "refreshed token", limit);

    // Past the first token's exp, and the server's sweep (100 ms).
    let past = UNIX_EPOCH + Duration::from_secs(exp) + Duration::from_millis(1500);
    if let Ok(wait) = past.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
    assert_eq!(
        admin(server.admin_addr(), "GET", &format!("/sessions/{session}"), "").0,
        200,
        "the session outlived its first token:\n{}",
        proc.output()
    );
    publish_until(server.admin_addr(), &proc, mark, "news", "after", &["MSG news after"]);
    let output = proc.output();
    assert!(!output.contains("closed"), "{output}");
    assert_eq!(output.matches("connected ").count(), 1, "{output}");
    assert!(server.metric("sluice_token_refreshes_total") >= 1);
    assert_eq!(server.metric("sluice_tokens_expired_total"), 0);
    for path in [secret, config, token_file] {
        let _ = std::fs::remove_file(path);
    }
}

/// sluice with the example configuration on `port`, its admin API on
/// `admin_port`, started by the test itself (Server picks its own ports):
/// the process and, once it listens, nothing else to wait for.
fn sluice_at(driver: &str, port: u16, admin_port: u16) -> Proc {
    let sluice = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--config")
            .arg(example_config())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--driver", driver, "--workers", "2"])
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
        assert!(Instant::now() < deadline, "sluice did not listen on {admin_port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    sluice
}

/// With no server there, the client's delays double from its first
/// backoff up to its cap, each jittered within its upper half; sluice
/// starts on that port and the client connects, subscribes and reads.
fn backs_off_until_the_server_comes(driver: &str, client: Client) {
    let (port, admin_port) = (free_port(), free_port());
    let url = format!("ws://127.0.0.1:{port}/ws");
    let args = ["--url", &url, "--backoff-ms", "100", "--max-backoff-ms", "400", "news"];
    let Some(mut cmd) = client.command(&args) else {
        return;
    };
    let proc = Proc::spawn(&mut cmd);
    let mut from = 0;
    for attempt in 0..6 {
        let (at, line) = proc.wait_for(from, "reconnecting in ", Duration::from_secs(10));
        let delay_ms: u64 = line["reconnecting in ".len()..]
            .trim_end_matches(" ms")
            .parse()
            .unwrap();
        let ceiling = (100u64 << attempt).min(400);
        assert!(
            (ceiling / 2..=ceiling).contains(&delay_ms),
            "attempt {attempt}: {delay_ms} ms, not within {}..={ceiling}:\n{}",
            ceiling / 2,
            proc.output()
        );
        from = at + 1;
    }
    assert!(proc.find(0, "connected ").is_none(), "{}", proc.output());
    let _sluice = sluice_at(driver, port, admin_port);
    let (mark, _) = proc.wait_for(from, "subscribed news", Duration::from_secs(10));
    proc.wait_for(from, "connected ", Duration::from_secs(1));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin_port));
    publish_until(admin_addr, &proc, mark, "news", "back", &["MSG news back"]);
}

both_drivers!(the_python_client_reconnects_and_subscribes_again, |driver| {
    reconnects_and_subscribes_again(driver, Client::Python)
});

both_drivers!(the_node_client_reconnects_and_subscribes_again, |driver| {
    reconnects_and_subscribes_again(driver, Client::Node)
});

both_drivers!(the_python_client_refreshes_its_token, |driver| {
    refreshes_its_token(driver, Client::Python)
});

both_drivers!(the_node_client_refreshes_its_token, |driver| {
    refreshes_its_token(driver, Client::Node)
});

both_drivers!(the_python_client_backs_off_until_the_server_comes, |driver| {
    backs_off_until_the_server_comes(driver, Client::Python)
});

both_drivers!(the_node_client_backs_off_until_the_server_comes, |driver| {
    backs_off_until_the_server_comes(driver, Client::Node)
});

/// What a [`Hostile`] server does with each connection it accepts, once it
/// has answered the handshake.
#[derive(Clone, Copy)]
enum Hostile {
    /// Sends `HELLO s<n>` and reads until the client goes.
    Hello,
    /// Sends the HELLO as a binary message (the protocol's is text).
    BinaryHello,
    /// Sends `HELLO s<n>`, then closes at once with this code.
    HelloThenClose(u16),
    /// Completes the handshake and says nothing.
    Silent,
}

/// What a hostile server saw: connections, AUTH messages, and each
/// handshake's Authorization header.
#[derive(Default)]
struct Seen {
    connections: usize,
    auths: usize,
    authorizations: Vec<String>,
}

/// A WebSocket server on a free loopback port, written here on std::net,
/// that misbehaves as `mode` says and counts what clients send it. Its
/// threads end with the test process; each connection's within 60 s.
fn hostile(mode: Hostile) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let counts = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let seen = counts.clone();
            std::thread::spawn(move || {
                let _ = hostile_connection(stream, mode, &seen);
            });
        }
    });
    (addr, seen)
}

fn hostile_connection(mut stream: TcpStream, mode: Hostile, seen: &Mutex<Seen>) -> std::io::Result<()> {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let (mut key, mut authorization) = (String::new(), String::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.to_ascii_lowercase().as_str() {
                "sec-websocket-key" => key = value.trim().to_string(),
                "authorization" => authorization = value.trim().to_string(),
                _ => {}
            }
        }
    }
    let n = {
        let mut seen = seen.lock().unwrap();
        seen.connections += 1;
        seen.authorizations.push(authorization);
        seen.connections
    };
    let accept = base64::engine::general_purpose::STANDARD.encode(Sha1::digest(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ));
    write!(
        stream,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: sluice\r\n\r\n"
    )?;
    let frame = |opcode: u8, payload: &[u8]| {
        let mut out = vec![0x80 | opcode, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    };
    let hello = format!("HELLO s{n}");
    match mode {
        Hostile::Hello => stream.write_all(&frame(1, hello.as_bytes()))?,
        Hostile::BinaryHello => stream.write_all(&frame(2, hello.as_bytes()))?,
        Hostile::HelloThenClose(code) => {
            stream.write_all(&frame(1, hello.as_bytes()))?;
            let mut close = code.to_be_bytes().to_vec();
            close.extend_from_slice(b"go away");
            stream.write_all(&frame(8, &close))?;
        }
        Hostile::Silent => {}
    }
    // The client's frames (masked), until it closes or goes.
    loop {
        let mut head = [0u8; 2];
        reader.read_exact(&mut head)?;
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            reader.read_exact(&mut b)?;
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            reader.read_exact(&mut b)?;
            len = u64::from_be_bytes(b);
        }
        let mut mask = [0u8; 4];
        if head[1] & 0x80 != 0 {
            reader.read_exact(&mut mask)?;
        }
        let mut payload = vec![0u8; len as usize];
        reader.read_exact(&mut payload)?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        match head[0] & 0x0f {
            1 if payload.starts_with(b"AUTH ") => seen.lock().unwrap().auths += 1,
            8 => {
                let _ = stream.write_all(&frame(8, &payload[..payload.len().min(2)]));
                return Ok(());
            }
            _ => {}
        }
    }
}

/// A JWT-shaped token with `payload` (JSON) as its claims, unsigned: the
/// clients read `exp` without checking signatures, and a hostile server
/// checks nothing.
fn token_with(payload: &str) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.c2ln", b64(r#"{"alg":"HS256"}"#), b64(payload))
}

/// The delay of each `reconnecting in <n> ms` line from line `from` on.
fn delays(proc: &Proc, from: usize) -> Vec<u64> {
    proc.lines.lock().unwrap()[from..]
        .iter()
        .filter_map(|l| l.strip_prefix("reconnecting in "))
        .map(|l| l.trim_end_matches(" ms").parse().unwrap())
        .collect()
}

/// Each token in the file is refused, without being printed, when its
/// `exp` is not a number (its payload `[1]` at connect: the client retries;
/// `"exp":"soon"`, then `"exp":null`, on a live connection at refresh
/// time): no AUTH goes out, the client says so once for each content of
/// the file, still runs, and sends a fresh token once the file has one.
fn refuses_a_token_without_a_numeric_exp(client: Client) {
    let (addr, seen) = hostile(Hostile::Hello);
    let token_file = temp_path(&format!("exp-token-{client:?}"));
    let list = token_with("[1]");
    write_atomically(&token_file, &list);
    let url = format!("ws://{addr}/ws");
    let args = [
        "--url",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
        "--refresh-margin",
        "1",
        "--backoff-ms",
        "100",
        "--max-backoff-ms",
        "200",
        "news",
    ];
    let Some(mut cmd) = client.command(&args) else {
        return;
    };
    let mut proc = Proc::spawn(&mut cmd);
    let limit = Duration::from_secs(10);
    proc.wait_for(0, "connection failed: token refused", limit);
    proc.wait_for(0, "reconnecting in ", limit);
    assert_eq!(seen.lock().unwrap().connections, 0, "{}", proc.output());

    // A token good for 3 s: the client connects, and refreshes from 2 s on.
    write_atomically(&token_file, &token_with(&format!(r#"{{"exp":{}}}"#, now_secs() + 3)));
    let (connected, _) = proc.wait_for(0, "connected ", limit);
    let soon = token_with(r#"{"sub":"a","exp":"soon"}"#);
    write_atomically(&token_file, &soon);
    let (first, _) = proc.wait_for(connected, "token refused", limit);
    std::thread::sleep(Duration::from_millis(1500));
    let null = token_with(r#"{"sub":"a","exp":null}"#);
    write_atomically(&token_file, &null);
    proc.wait_for(first + 1, "token refused", limit);
    // Retried 1 s, 2 s, 4 s later: the same file says nothing more.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(proc.child.try_wait().unwrap().is_none(), "{}", proc.output());
    assert_eq!(seen.lock().unwrap().auths, 0, "{}", proc.output());
    let output = proc.output();
    let after = proc.lines.lock().unwrap()[connected..].to_vec();
    assert_eq!(
        after.iter().filter(|l| l.contains("token refused")).count(),
        2,
        "{output}"
    );
    assert!(after.len() <= 8, "{output}");

    write_atomically(&token_file, &token_with(&format!(r#"{{"exp":{}}}"#, now_secs() + 600)));
    proc.wait_for(connected, "refreshed token", Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(seen.lock().unwrap().auths, 1, "{}", proc.output());
    let output = proc.output();
    for secret in [&list, &soon, &null] {
        let payload = secret.split('.').nth(1).unwrap();
        assert!(!output.contains(payload), "a token printed:\n{output}");
    }
    assert_eq!(output.matches("connected ").count(), 1, "{output}");
    assert!(proc.child.try_wait().unwrap().is_none(), "{output}");
    let _ = std::fs::remove_file(token_file);
}

/// A server whose first message is a binary HELLO: the client says so,
/// drops the connection and tries again, never takes it for a session,
/// and does not exit.
fn survives_a_binary_hello(client: Client) {
    let (addr, seen) = hostile(Hostile::BinaryHello);
    let url = format!("ws://{addr}/ws");
    let args = ["--url", &url, "--backoff-ms", "100", "--max-backoff-ms", "200", "news"];
    let Some(mut cmd) = client.command(&args) else {
        return;
    };
    let mut proc = Proc::spawn(&mut cmd);
    let limit = Duration::from_secs(10);
    let (at, line) = proc.wait_for(0, "connection failed: ", limit);
    assert!(line.contains("expected HELLO"), "{}", proc.output());
    proc.wait_for(at, "reconnecting in ", limit);
    let deadline = Instant::now() + limit;
    while seen.lock().unwrap().connections < 3 {
        assert!(Instant::now() < deadline, "no third connection:\n{}", proc.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proc.child.try_wait().unwrap().is_none(), "{}", proc.output());
    assert!(proc.find(0, "connected ").is_none(), "{}", proc.output());
}

/// The token file holds its token on the first line and a comment on the
/// next, as a cron job might leave it: the client sends the first line
/// alone. Before that, a token with a character no JWT has (a space) is
/// refused without being printed, and without a connection.
fn reads_the_first_line_of_the_token_file(client: Client) {
    let (addr, seen) = hostile(Hostile::Hello);
    let token_file = temp_path(&format!("line-token-{client:?}"));
    let bad = format!("{} x", token_with(r#"{"exp":4102444800}"#));
    write_atomically(&token_file, &bad);
    let url = format!("ws://{addr}/ws");
    let args = [
        "--url",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
        "--backoff-ms",
        "100",
        "--max-backoff-ms",
        "200",
        "news",
    ];
    let Some(mut cmd) = client.command(&args) else {
        return;
    };
    let mut proc = Proc::spawn(&mut cmd);
    let limit = Duration::from_secs(10);
    let (at, line) = proc.wait_for(0, "connection failed: token refused", limit);
    assert!(line.contains("not a JWT"), "{}", proc.output());
    proc.wait_for(at, "reconnecting in ", limit);
    assert_eq!(seen.lock().unwrap().connections, 0, "{}", proc.output());

    let good = token_with(r#"{"sub":"a","exp":4102444800}"#);
    write_atomically(&token_file, &format!("\n  {good}  \n# rotated by cron\n"));
    proc.wait_for(0, "connected ", limit);
    proc.wait_for(0, "subscribed news", limit);
    assert_eq!(
        seen.lock().unwrap().authorizations,
        [format!("Bearer {good}")],
        "{}",
        proc.output()
    );
    let output = proc.output();
    for token in [&bad, &good] {
        let payload = token.split('.').nth(1).unwrap();
        assert!(!output.contains(payload), "a token printed:\n{output}");
    }
    assert!(proc.child.try_wait().unwrap().is_none(), "{output}");
    let _ = std::fs::remove_file(token_file);
}

/// A server that says HELLO and closes at once (as one that refuses the
/// client's token does, with 4001): the connection did not last, so the
/// delays keep doubling to the cap instead of starting over at each HELLO.
fn backs_off_from_a_server_that_drops_it_at_once(client: Client) {
    let (addr, seen) = hostile(Hostile::HelloThenClose(4001));
    let url = format!("ws://{addr}/ws");
    let args = ["--url", &url, "--backoff-ms", "100", "--max-backoff-ms", "800", "news"];
    let Some(mut cmd) = client.command(&args) else {
        return;
    };
    let proc = Proc::spawn(&mut cmd);
    let limit = Duration::from_secs(10);
    let mut from = 0;
    for attempt in 0..6 {
        let (at, _) = proc.wait_for(from, "reconnecting in ", limit);
        from = at + 1;
        let delay_ms = *delays(&proc, at).first().unwrap();
        let ceiling = (100u64 << attempt).min(800);
        assert!(
            (ceiling / 2..=ceiling).contains(&delay_ms),
            "attempt {attempt}: {delay_ms} ms, not within {}..={ceiling}:\n{}",
            ceiling / 2,
            proc.output()
        );
    }
    let output = proc.output();
    assert!(output.matches("closed 4001 go away").count() >= 5, "{output}");
    assert!(seen.lock().unwrap().connections >= 5, "{output}");
}

/// A delay that is not a number, or below its least, is a usage error
/// (exit 2): NaN or a negative delay would reconnect in a tight loop.
fn refuses_bad_delays(client: Client) {
    // As `--name=value`: Node's parseArgs takes `--name -5` for two options.
    for arg in [
        "--backoff-ms=abc",
        "--backoff-ms=-5",
        "--backoff-ms=0",
        "--max-backoff-ms=nan",
        "--stable-ms=-1",
        "--refresh-margin=-1",
        "--refresh-margin=inf",
    ] {
        let Some(mut cmd) = client.command(&[arg, "--url", "ws://127.0.0.1:9/ws", "news"]) else {
            return;
        };
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{arg}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{arg}: it never connected");
        // Refused by the delay's own check, not for want of a value.
        let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            said.contains("at least") || said.contains("not a number"),
            "{arg}: {said}"
        );
    }
}

#[test]
fn the_python_client_refuses_bad_delays() {
    refuses_bad_delays(Client::Python)
}

#[test]
fn the_node_client_refuses_bad_delays() {
    refuses_bad_delays(Client::Node)
}

#[test]
fn the_python_client_refuses_a_token_without_a_numeric_exp() {
    refuses_a_token_without_a_numeric_exp(Client::Python)
}

#[test]
fn the_node_client_refuses_a_token_without_a_numeric_exp() {
    refuses_a_token_without_a_numeric_exp(Client::Node)
}

/// A server that completes the handshake and then says nothing: the
/// client gives up on it within its 10 s for HELLO, and tries again.
fn gives_up_on_a_silent_server(client: Client) {
    let (addr, seen) = hostile(Hostile::Silent);
    let url = format!("ws://{addr}/ws");
    let args = ["--url", &url, "--backoff-ms", "100", "--max-backoff-ms", "200", "news"];
    let Some(mut cmd) = client.command(&args) else {
        return;
    };
    let mut proc = Proc::spawn(&mut cmd);
    let (at, _) = proc.wait_for(0, "connection failed: ", Duration::from_secs(20));
    proc.wait_for(at, "reconnecting in ", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().connections < 2 {
        assert!(Instant::now() < deadline, "no second connection:\n{}", proc.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proc.find(0, "connected ").is_none(), "{}", proc.output());
    assert!(proc.child.try_wait().unwrap().is_none(), "{}", proc.output());
}

#[test]
fn the_python_client_gives_up_on_a_silent_server() {
    gives_up_on_a_silent_server(Client::Python)
}

#[test]
fn the_node_client_gives_up_on_a_silent_server() {
    gives_up_on_a_silent_server(Client::Node)
}

#[test]
fn the_python_client_survives_a_binary_hello() {
    survives_a_binary_hello(Client::Python)
}

#[test]
fn the_node_client_survives_a_binary_hello() {
    survives_a_binary_hello(Client::Node)
}

#[test]
fn the_python_client_reads_the_first_line_of_the_token_file() {
    reads_the_first_line_of_the_token_file(Client::Python)
}

#[test]
fn the_node_client_reads_the_first_line_of_the_token_file() {
    reads_the_first_line_of_the_token_file(Client::Node)
}

#[test]
fn the_python_client_backs_off_from_a_server_that_drops_it_at_once() {
    backs_off_from_a_server_that_drops_it_at_once(Client::Python)
}

#[test]
fn the_node_client_backs_off_from_a_server_that_drops_it_at_once() {
    backs_off_from_a_server_that_drops_it_at_once(Client::Node)
}
