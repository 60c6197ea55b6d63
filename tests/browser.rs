//! examples/backend in headless Chromium: the page, served by the
//! example's backend, talks to sluice's backend route; the backend answers
//! each message, pushes another a second later through the admin API, and
//! logs the close code. Chromium is driven over the DevTools protocol by
//! tests/browser/drive.py (Debian's `chromium`, Python `websockets`;
//! scripts/test.sh installs both).

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The example's backend: its process and the lines it printed.
struct Backend {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Backend {
    fn start(port: u16, admin: std::net::SocketAddr) -> Backend {
        let mut child = Command::new("python3")
            .arg(root().join("examples/backend/backend.py"))
            .args(["--port", &port.to_string(), "--admin", &format!("http://{admin}")])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let lines = gather_lines(child.stdout.take().unwrap());
        let backend = Backend { child, lines };
        backend.wait_for("listening on", Duration::from_secs(10));
        backend
    }

    fn wait_for(&self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| l.contains(text)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} in {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_backend_example_in_headless_chromium() {
    // The example's own configuration, pointed at a free port for the
    // backend (sluice's listeners are moved by the test's flags).
    let port = free_port();
    let example = std::fs::read_to_string(root().join("examples/backend/sluice.toml")).unwrap();
    let config = example.replace("127.0.0.1:3000", &format!("127.0.0.1:{port}"));
    assert_ne!(config, example);
    let path = std::env::temp_dir().join(format!("sluice-browser-{}.toml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let server = Server::start("uring", &["--config", path.to_str().unwrap()]);
    let backend = Backend::start(port, server.admin_addr());
    let page = format!("http://127.0.0.1:{port}/?auto=1&ws={}", server.url("/app"));
    let python_path = root().join("target/python");
    let out = Command::new("python3")
        .arg(root().join("tests/browser/drive.py"))
        .args([
            page.as_str(),
            "30",
            "open",
            "message: you said: hello",
            "message: a second later: hello",
            "closed: 1000",
        ])
        .env("PYTHONPATH", python_path)
        .output()
        .expect("python3 with websockets (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let open = backend.wait_for("open ", Duration::from_secs(5));
    let id = open.split_whitespace().nth(1).unwrap().to_string();
    let close = backend.wait_for("close ", Duration::from_secs(5));
    assert_eq!(close, format!("close {id} code=1000"));
}
