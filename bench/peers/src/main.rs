//! Peer WebSocket servers for sluice's benchmarks, built from crates.io:
//! what people would otherwise pick, each run single-threaded (one core,
//! like one sluice worker) in two configurations:
//! - `default`: the library's documented usage;
//! - `tuned`: the best a careful user gets from it.
//!
//! Modes: `echo` sends every data message back; `broadcast` speaks the
//! native protocol's `SUB <topic>` / `UNSUB <topic>` / `PUB <topic>
//! <payload>` and delivers `MSG <topic> <payload>` to every subscriber, so
//! `sluice-load fanout` drives it unchanged.
//!
//! Run: `peer --lib tungstenite --config tuned --mode echo --listen 127.0.0.1:9001`
//! (it prints `listening on ADDR` on stderr once it accepts).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use clap::{Parser, ValueEnum};

mod fastwebsockets_peer;
mod tungstenite_peer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lib {
    /// tokio-tungstenite.
    Tungstenite,
    /// fastwebsockets (with hyper for the upgrade).
    Fastwebsockets,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Config {
    Default,
    Tuned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Echo,
    Broadcast,
}

#[derive(Parser)]
#[command(about = "Peer WebSocket servers for sluice's benchmarks")]
struct Args {
    #[arg(long, value_enum)]
    lib: Lib,
    #[arg(long, value_enum, default_value_t = Config::Default)]
    config: Config,
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
}

/// A native-protocol command.
pub enum Command<'a> {
    Sub(&'a str),
    Unsub(&'a str),
    Pub(&'a str, &'a [u8]),
}

pub fn parse(message: &[u8]) -> Option<Command<'_>> {
    let space = message.iter().position(|&b| b == b' ')?;
    let (verb, rest) = (&message[..space], &message[space + 1..]);
    match verb {
        b"SUB" => std::str::from_utf8(rest).ok().map(Command::Sub),
        b"UNSUB" => std::str::from_utf8(rest).ok().map(Command::Unsub),
        b"PUB" => {
            let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            let payload = rest.get(end + 1..).unwrap_or(&[]);
            std::str::from_utf8(&rest[..end]).ok().map(|t| Command::Pub(t, payload))
        }
        _ => None,
    }
}

/// Applies a native command from connection `id` (whose topics are
/// `mine`). A PUB returns its topic and the `MSG <topic> <payload>` bytes to
/// deliver to its subscribers.
pub fn apply<'a, T: Clone>(
    topics: &Topics<T>,
    id: u64,
    outbox: &T,
    mine: &mut Vec<String>,
    data: &'a [u8],
) -> Option<(&'a str, Vec<u8>)> {
    match parse(data)? {
        Command::Sub(t) => {
            topics.subscribe(t, id, outbox);
            mine.push(t.to_string());
            None
        }
        Command::Unsub(t) => {
            topics.unsubscribe(t, id);
            mine.retain(|m| m != t);
            None
        }
        Command::Pub(t, payload) => {
            let mut msg = Vec::with_capacity(5 + t.len() + payload.len());
            msg.extend_from_slice(b"MSG ");
            msg.extend_from_slice(t.as_bytes());
            msg.push(b' ');
            msg.extend_from_slice(payload);
            Some((t, msg))
        }
    }
}

/// Topic -> subscribers (connection id, and its outbox), for one thread.
pub struct Topics<T> {
    by_name: RefCell<HashMap<String, Vec<(u64, T)>>>,
}

impl<T: Clone> Topics<T> {
    pub fn new() -> Rc<Topics<T>> {
        Rc::new(Topics {
            by_name: RefCell::new(HashMap::new()),
        })
    }

    pub fn subscribe(&self, topic: &str, id: u64, outbox: &T) {
        let mut by_name = self.by_name.borrow_mut();
        let subs = by_name.entry(topic.to_string()).or_default();
        if !subs.iter().any(|(i, _)| *i == id) {
            subs.push((id, outbox.clone()));
        }
    }

    pub fn unsubscribe(&self, topic: &str, id: u64) {
        let mut by_name = self.by_name.borrow_mut();
        if let Some(subs) = by_name.get_mut(topic) {
            subs.retain(|(i, _)| *i != id);
            if subs.is_empty() {
                by_name.remove(topic);
            }
        }
    }

    /// Calls `f` with each subscriber's outbox of `topic`.
    pub fn each(&self, topic: &str, mut f: impl FnMut(&T)) {
        if let Some(subs) = self.by_name.borrow().get(topic) {
            for (_, t) in subs {
                f(t);
            }
        }
    }

    pub fn leave_all(&self, topics: &[String], id: u64) {
        for t in topics {
            self.unsubscribe(t, id);
        }
    }
}

impl<M: Clone> Topics<tokio::sync::mpsc::Sender<M>> {
    /// Sends `message` to every subscriber of `topic`; a full outbox makes
    /// the publisher wait for it.
    pub async fn publish(&self, topic: &str, message: M) {
        let mut full = Vec::new();
        self.each(topic, |sub| {
            if let Err(tokio::sync::mpsc::error::TrySendError::Full(m)) = sub.try_send(message.clone()) {
                full.push((sub.clone(), m));
            }
        });
        for (sub, m) in full {
            let _ = sub.send(m).await;
        }
    }
}

/// Messages a subscriber's outbox holds before its publishers wait (so an
/// overloaded peer holds a bounded backlog, as sluice does).
pub const OUTBOX: usize = 4096;

/// Accepts connections for ever; each gets a task running `handle` with
/// its stream, a connection id, and the thread's topic table.
pub async fn accept_loop<T, F, Fut>(listener: tokio::net::TcpListener, mut handle: F) -> std::io::Result<()>
where
    T: Clone + 'static,
    F: FnMut(tokio::net::TcpStream, u64, Rc<Topics<T>>) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let topics: Rc<Topics<T>> = Topics::new();
    let mut next_id = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        next_id += 1;
        tokio::task::spawn_local(handle(stream, next_id, topics.clone()));
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        eprintln!("listening on {}", listener.local_addr()?);
        match args.lib {
            Lib::Tungstenite => tungstenite_peer::serve(listener, args.config, args.mode).await,
            Lib::Fastwebsockets => fastwebsockets_peer::serve(listener, args.config, args.mode).await,
        }
    })
}
