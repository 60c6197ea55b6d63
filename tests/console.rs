//! The admin port's web console in headless Chromium, step by step over the
//! DevTools protocol (tests/browser/steps.py; Debian's `chromium`, Python
//! `websockets`, both installed by scripts/test.sh): it asks for the admin
//! token, shows a client that connects and the topic it takes, publishes
//! from its form to that client, and looks the client's session up, sends
//! to it and closes it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::*;

/// A page in headless Chromium that takes one step at a time.
struct Page {
    child: Child,
    /// `None` once closed (steps.py then closes Chromium and exits).
    steps: Option<ChildStdin>,
    lines: Receiver<String>,
    taken: usize,
    said: Vec<String>,
}

impl Page {
    fn open(url: &str) -> Page {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("python3")
            .arg(root().join("tests/browser/steps.py"))
            .args([url, "60"])
            .env("PYTHONPATH", root().join("target/python"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Chromium too, so that a driver that has to be killed takes it along.
            .process_group(0)
            .spawn()
            .expect("python3 with websockets (scripts/test.sh installs it)");
        let steps = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Page {
            child,
            steps: Some(steps),
            lines,
            taken: 0,
            said: Vec::new(),
        }
    }

    /// Runs one step (`wait` for an expression to hold, or `do` one) and
    /// waits until the page has carried it out.
    fn step(&mut self, kind: &str, expression: &str) {
        self.taken += 1;
        let line = serde_json::json!([kind, expression]).to_string();
        writeln!(self.steps.as_mut().unwrap(), "{line}").expect("steps.py is running");
        let done = format!("done {}", self.taken);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == done => return,
                Ok(line) => self.said.push(line),
                Err(RecvTimeoutError::Timeout) => panic!("step {line} not done: {:?}", self.said),
                Err(RecvTimeoutError::Disconnected) => panic!("step {line} failed: {:?}", self.said),
            }
        }
    }

    /// Sets an input's value.
    fn fill(&mut self, id: &str, value: &str) {
        let value = serde_json::Value::from(value);
        self.step("do", &format!("document.getElementById('{id}').value = {value}"));
    }

    fn click(&mut self, id: &str) {
        self.step("do", &format!("document.getElementById('{id}').click()"));
    }

    /// Waits until element `id`'s text is `text`, or holds it.
    fn wait_text(&mut self, id: &str, text: &str, whole: bool) {
        let text = serde_json::Value::from(text);
        let test = if whole { "===" } else { ".includes" };
        let expression = if whole {
            format!("document.getElementById('{id}').textContent {test} {text}")
        } else {
            format!("document.getElementById('{id}').textContent{test}({text})")
        };
        self.step("wait", &expression);
    }
}

impl Drop for Page {
    /// Ends the input, so that steps.py closes Chromium; if it has not
    /// exited in 10 s, kills its process group, Chromium with it.
    fn drop(&mut self) {
        self.steps = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: kill(2) on the process group of our own child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn next_text(client: &mut Raw) -> String {
    loop {
        let frame = client.read_frame().expect("a message");
        if frame.opcode == 1 {
            return String::from_utf8(frame.payload).unwrap();
        }
    }
}

#[test]
fn the_console_shows_a_client_and_acts_on_it() {
    let server = Server::start("uring", &["--admin-token", "console-token"]);
    let mut page = Page::open(&format!("http://{}/", server.admin_addr()));

    // The page asks for the token, and says so when one is refused, or
    // could not be sent.
    page.step("wait", "!document.getElementById('login').hidden");
    page.fill("token", "sekrit\u{2603}");
    page.click("login-go");
    page.wait_text("login-error", "visible ASCII", false);
    page.fill("token", "wrong");
    page.click("login-go");
    page.wait_text("login-error", "refused", false);
    page.fill("token", "console-token");
    page.click("login-go");
    page.step("wait", "!document.getElementById('console').hidden");
    // Once the first answers are shown (the page starts with zeros).
    page.wait_text("status", "updated", false);
    page.wait_text("open", "0", true);

    // A client connects and subscribes: the page shows it, live.
    let mut client = Raw::open(server.addr, "/ws");
    let hello = next_text(&mut client);
    let id = hello.strip_prefix("HELLO ").expect("HELLO <id>").to_string();
    client.send_frame(0x81, b"SUB news");
    page.wait_text("open", "1", true);
    page.wait_text("topics", "news", false);

    // A publish from the form reaches it.
    page.fill("publish-topic", "news");
    page.fill("publish-payload", "from the console");
    page.click("publish-go");
    page.wait_text("publish-result", "\"published\": 1", false);
    assert_eq!(next_text(&mut client), "MSG news from the console");

    // The session lookup finds it, sends to it and closes it.
    page.fill("session-id", &id);
    page.click("session-go");
    page.wait_text("session-info", "\"route\": \"/ws\"", false);
    page.fill("session-text", "just you");
    page.click("session-send");
    page.wait_text("session-result", &id, false);
    assert_eq!(next_text(&mut client), "just you");
    page.fill("session-code", "4000");
    page.fill("session-reason", "bye");
    page.click("session-close");
    assert_eq!(client.expect_close(), Some(4000));
    page.wait_text("open", "0", true);

    // Signing out forgets the token: the login again.
    page.click("sign-out");
    page.step(
        "wait",
        "!document.getElementById('login').hidden && !sessionStorage.length",
    );
}
