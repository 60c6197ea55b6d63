//! `abuse`: the attacks an edge gateway sees, run together for a bounded
//! time, each counted by how the server answered it. Meant to run beside
//! a `latency` run of well-behaved clients (bench/abuse.sh), whose losses
//! and percentiles say what the attacks cost them.
//!
//! Each attack is one thread of blocking sockets with timeouts (the
//! attacks are paced; nothing here needs to be fast), from the `--source`
//! addresses in turn:
//! - handshake flood: upgrade requests at `--flood-rate`, each closed once
//!   answered;
//! - slowloris: `--slowloris` connections that send a request head one
//!   byte per second, replaced when the server drops them;
//! - oversized frames: a frame header announcing 2^40 bytes after a good
//!   handshake, at `--oversized-rate`;
//! - invalid tokens: upgrade requests with a forged, a malformed and an
//!   expired token, at `--bad-token-rate`;
//! - message floods: `--floods` connections sending small messages as fast
//!   as the socket takes them, replaced when closed.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::Target;

/// How hard each attack pushes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub duration: Duration,
    pub flood_rate: f64,
    pub slowloris: usize,
    pub oversized_rate: f64,
    pub bad_token_rate: f64,
    pub floods: usize,
}

/// Outcomes by attack, then by what the server did.
pub type Outcomes = BTreeMap<&'static str, BTreeMap<String, u64>>;

struct Shared {
    target: Target,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
    stop: AtomicBool,
    outcomes: Mutex<Outcomes>,
}

impl Shared {
    fn count(&self, attack: &'static str, outcome: impl Into<String>) {
        let mut all = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        *all.entry(attack).or_default().entry(outcome.into()).or_default() += 1;
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let addr = self.target.addr;
        let stream = if self.sources.is_empty() {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))?
        } else {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(self.sources[i], 0).into())?;
            socket.connect_timeout(&addr.into(), Duration::from_secs(2))?;
            socket.into()
        };
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    fn request(&self, extra: &str) -> String {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
            self.target.path, self.target.host
        )
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

/// Runs every attack for the plan's duration; returns what each got.
pub fn run(target: Target, sources: Vec<IpAddr>, plan: Plan) -> Outcomes {
    let shared = Arc::new(Shared {
        target,
        sources,
        next_source: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        outcomes: Mutex::new(BTreeMap::new()),
    });
    let mut threads = Vec::new();
    let spawn = |threads: &mut Vec<std::thread::JoinHandle<()>>, f: fn(&Shared, &Plan), plan: &Plan| {
        let (shared, plan) = (shared.clone(), plan.clone());
        threads.push(std::thread::spawn(move || f(&shared, &plan)));
    };
    if plan.flood_rate > 0.0 {
        spawn(&mut threads, handshake_flood, &plan);
    }
    if plan.slowloris > 0 {
        spawn(&mut threads, slowloris, &plan);
    }
    if plan.oversized_rate > 0.0 {
        spawn(&mut threads, oversized_frames, &plan);
    }
    if plan.bad_token_rate > 0.0 {
        spawn(&mut threads, bad_tokens, &plan);
    }
    if plan.floods > 0 {
        spawn(&mut threads, message_floods, &plan);
    }
    let until = Instant::now() + plan.duration;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let outcomes = shared.outcomes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    outcomes
}

/// Calls `once` at `rate` per second until the run stops.
fn paced(shared: &Shared, rate: f64, mut once: impl FnMut()) {
    let start = Instant::now();
    let mut n = 0u64;
    while shared.running() {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        once();
        n += 1;
    }
}

/// The status code of an HTTP answer, read until the head ends.
fn status_of(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) => {
                return if head.is_empty() {
                    "closed".into()
                } else {
                    "cut short".into()
                }
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return "no answer".into(),
            Err(_) => return "reset".into(),
        }
    }
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .map_or_else(|| "malformed".into(), |s| format!("HTTP {s}"))
}

fn connect_failure(e: &std::io::Error) -> String {
    format!("connect: {:?}", e.kind())
}

fn handshake_flood(shared: &Shared, plan: &Plan) {
    let request = shared.request("");
    paced(shared, plan.flood_rate, || match shared.connect() {
        Ok(mut s) => {
            let outcome = match s.write_all(request.as_bytes()) {
                Ok(()) => status_of(&mut s),
                Err(_) => "reset".into(),
            };
            shared.count("handshake flood", outcome);
        }
        Err(e) => shared.count("handshake flood", connect_failure(&e)),
    });
}

fn bad_tokens(shared: &Shared, plan: &Plan) {
    // A forged signature, a token that is not one, and one expired long ago
    // (HS256 over {"sub":"x","exp":1}, with a signature of zeros).
    let tokens = [
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4IiwiZXhwIjo0MTAyNDQ0ODAwfQ.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "not-a-token",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4IiwiZXhwIjoxfQ.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ];
    let mut i = 0;
    paced(shared, plan.bad_token_rate, || {
        let request = shared.request(&format!("Authorization: Bearer {}\r\n", tokens[i % tokens.len()]));
        i += 1;
        match shared.connect() {
            Ok(mut s) => {
                let outcome = match s.write_all(request.as_bytes()) {
                    Ok(()) => status_of(&mut s),
                    Err(_) => "reset".into(),
                };
                shared.count("invalid tokens", outcome);
            }
            Err(e) => shared.count("invalid tokens", connect_failure(&e)),
        }
    });
}

/// A masked frame header (client to server) announcing `len` bytes.
fn frame_head(opcode: u8, len: u64) -> Vec<u8> {
    let mut head = vec![0x80 | opcode];
    match len {
        0..=125 => head.push(0x80 | len as u8),
        126..=0xffff => {
            head.push(0x80 | 126);
            head.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            head.push(0x80 | 127);
            head.extend_from_slice(&len.to_be_bytes());
        }
    }
    head.extend_from_slice(&[1, 2, 3, 4]);
    head
}

/// Upgrades `s`; the outcome when the server refused.
fn upgrade(shared: &Shared, s: &mut TcpStream) -> Result<(), String> {
    s.write_all(shared.request("").as_bytes())
        .map_err(|_| "reset".to_string())?;
    match status_of(s) {
        status if status == "HTTP 101" => Ok(()),
        status => Err(status),
    }
}

/// What the server did after an attack's frames: its close code, or how
/// the connection ended.
fn close_of(s: &mut TcpStream) -> String {
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                return if got.is_empty() {
                    "closed".into()
                } else {
                    close_code(&got)
                }
            }
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > 64 * 1024 {
                    got.drain(..got.len() - 1024);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return if got.is_empty() {
                    "no answer".into()
                } else {
                    close_code(&got)
                };
            }
            Err(_) => {
                return if got.is_empty() {
                    "reset".into()
                } else {
                    close_code(&got)
                }
            }
        }
    }
}

/// The code of the last close frame in `bytes` (server frames are unmasked).
fn close_code(bytes: &[u8]) -> String {
    match bytes
        .windows(2)
        .rposition(|w| w[0] == 0x88 && (2..=125).contains(&w[1]))
    {
        Some(i) if i + 4 <= bytes.len() => format!("close {}", u16::from_be_bytes([bytes[i + 2], bytes[i + 3]])),
        _ => "closed".into(),
    }
}

fn oversized_frames(shared: &Shared, plan: &Plan) {
    paced(shared, plan.oversized_rate, || {
        let outcome = match shared.connect() {
            Ok(mut s) => match upgrade(shared, &mut s) {
                Ok(()) => match s.write_all(&frame_head(2, 1 << 40)) {
                    Ok(()) => close_of(&mut s),
                    Err(_) => "reset".into(),
                },
                Err(status) => format!("upgrade refused: {status}"),
            },
            Err(e) => connect_failure(&e),
        };
        shared.count("oversized frames", outcome);
    });
}

fn slowloris(shared: &Shared, plan: &Plan) {
    let request = shared.request("");
    let bytes = request.as_bytes();
    let mut conns: Vec<(TcpStream, usize, Instant)> = Vec::new();
    while shared.running() {
        while conns.len() < plan.slowloris && shared.running() {
            match shared.connect() {
                Ok(s) => {
                    let _ = s.set_nonblocking(true);
                    conns.push((s, 0, Instant::now()));
                }
                Err(e) => {
                    shared.count("slowloris", connect_failure(&e));
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
        // One more byte each, a second apart; a server that dropped one
        // (EOF, reset, or an answer) ends it, and a new one takes its place.
        conns.retain_mut(|(s, sent, opened)| {
            let mut buf = [0u8; 256];
            let ended = match s.read(&mut buf) {
                Ok(0) => Some("dropped".to_string()),
                Ok(_) => Some("answered".to_string()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                Err(_) => Some("reset".to_string()),
            };
            if let Some(how) = ended {
                shared.count("slowloris", format!("{how} after {} s", opened.elapsed().as_secs()));
                return false;
            }
            if *sent < bytes.len() - 1 && s.write(&bytes[*sent..*sent + 1]).is_ok_and(|n| n == 1) {
                *sent += 1;
            }
            true
        });
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn message_floods(shared: &Shared, plan: &Plan) {
    let message = {
        let mut m = frame_head(1, 16);
        m.extend(
            b"flood flood floo"
                .iter()
                .zip([1u8, 2, 3, 4].iter().cycle())
                .map(|(b, k)| b ^ k),
        );
        m.repeat(256)
    };
    let mut conns: Vec<TcpStream> = Vec::new();
    while shared.running() {
        while conns.len() < plan.floods && shared.running() {
            match shared.connect() {
                Ok(mut s) => match upgrade(shared, &mut s) {
                    Ok(()) => {
                        let _ = s.set_nonblocking(true);
                        conns.push(s);
                    }
                    Err(status) => {
                        shared.count("message floods", format!("upgrade refused: {status}"));
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                },
                Err(e) => {
                    shared.count("message floods", connect_failure(&e));
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
        conns.retain_mut(|s| {
            let _ = s.write(&message);
            let mut buf = [0u8; 64 * 1024];
            let mut tail = Vec::new();
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        shared.count("message floods", close_code(&tail));
                        return false;
                    }
                    Ok(n) => {
                        tail.clear();
                        tail.extend_from_slice(&buf[n.saturating_sub(16)..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        shared.count("message floods", "reset");
                        return false;
                    }
                }
            }
            if tail.windows(2).any(|w| w[0] == 0x88) {
                shared.count("message floods", close_code(&tail));
                return false;
            }
            true
        });
        // Paced only by the socket: sleep a little so the thread does not spin.
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_heads_and_close_codes() {
        assert_eq!(frame_head(2, 1 << 40)[..2], [0x82, 0xff]);
        assert_eq!(frame_head(1, 16)[..2], [0x81, 0x90]);
        assert_eq!(close_code(&[0x81, 0x01, b'x', 0x88, 0x02, 0x03, 0xf1]), "close 1009");
        assert_eq!(close_code(b"no close here"), "closed");
    }
}
