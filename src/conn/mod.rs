//! One connection's life: handshake, frames in, frames out, close.
//!
//! Owns the I/O loop of a single socket and nothing of the protocol: bytes go
//! to `ws::handshake` and `ws::MessageReader`, whole messages go to `proto`,
//! replies come back through `Outbound`. The rules of the loop:
//! - Wait for readiness, then read into the core's scratch buffer; only bytes
//!   that must outlive the read (a partial frame) are copied to a pooled
//!   buffer, so an idle connection holds no read buffer.
//! - No timer per connection: the shard's sweep kicks the task when a ping,
//!   a timeout or the shutdown is due.
//! - Output of a whole read goes out in one write. While output is pending,
//!   nothing more is read, so a peer that does not read cannot make us buffer
//!   more than one read's worth of replies.

pub mod outbound;
pub mod pool;
pub mod shard;
pub mod socket;

use std::future::Future;
use std::io;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;

use monoio::net::TcpStream;

use crate::config::{Route, HEALTH_PATH};
use crate::proto::App;
use crate::ws::{handshake, CloseCode, Event, MessageReader, Opcode, Role, Step, Violation};
use outbound::{Flush, Outbound};
use shard::{Kick, Phase, Session, Shard, SCRATCH_BYTES};
use socket::Socket;

/// Why the loop woke.
enum Wake {
    Ready,
    Kick(Kick),
}

/// Waits for `io` (a readiness future) or a kick from the sweep, whichever is first.
async fn ready_or_kick<F: Future<Output = io::Result<()>>>(io: F, session: &Session) -> io::Result<Wake> {
    let mut io = pin!(io);
    std::future::poll_fn(|cx| {
        match session.poll_kick(cx.waker()) {
            // Every caller ends the connection on an error.
            Some(kick) if kick.has(Kick::ABORT) => return Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Some(kick) => return Poll::Ready(Ok(Wake::Kick(kick))),
            None => {}
        }
        io.as_mut().poll(cx).map_ok(|()| Wake::Ready)
    })
    .await
}

/// What processing a batch of input decided.
enum Flow {
    Continue,
    /// The peer sent a close frame; ours is queued in reply.
    PeerClosed(Option<CloseCode>),
    /// The peer broke a rule; our close is queued.
    Failed(Violation),
}

/// How a session ended, for the counters.
enum Ending {
    /// A close frame was exchanged or sent; the code that ended the session.
    Close(CloseCode),
    /// No close frame either way (the peer vanished): 1006.
    Abnormal,
}

struct Conn<'a> {
    stream: &'a TcpStream,
    socket: Socket<'a>,
    session: &'a Session,
    shard: &'a Shard,
    out: Outbound,
    /// Bytes read but not yet used: a partial request head or frame.
    carry: Vec<u8>,
    /// Whole size of the partial frame in `carry`, once its header is in.
    carry_frame_bytes: Option<usize>,
    /// Kicks taken from the sweep and not yet acted on.
    kicks: Kick,
}

/// Serves one accepted connection to its end.
pub async fn serve(stream: TcpStream, shard: Rc<Shard>) {
    shard.stats.borrow_mut().accepted += 1;
    let session = shard.open_session();
    let mut conn = Conn {
        stream: &stream,
        socket: Socket::new(&stream),
        session: &session,
        shard: &shard,
        out: Outbound::default(),
        carry: Vec::new(),
        carry_frame_bytes: None,
        kicks: Kick::default(),
    };
    if let Some(route) = conn.handshake().await {
        shard.stats.borrow_mut().upgraded += 1;
        let ending = conn.run(App::for_route(route)).await;
        match ending {
            Ending::Close(code) => shard.count_close(Some(code)),
            Ending::Abnormal => shard.count_close(None),
        }
    }
    conn.release();
}

impl<'a> Conn<'a> {
    /// Reads and answers the opening handshake. Returns the route on a 101;
    /// `None` when the client was refused, timed out or went away.
    async fn handshake(&mut self) -> Option<&'a Route> {
        loop {
            match ready_or_kick(self.stream.readable(false), self.session).await {
                // Handshake timeout, or shutdown before the upgrade: drop.
                Ok(Wake::Kick(k)) => {
                    if k.has(Kick::TIMEOUT) {
                        self.shard.stats.borrow_mut().handshake_timeouts += 1;
                    }
                    return None;
                }
                Err(_) => return None,
                Ok(Wake::Ready) => {}
            }
            let decision = match self.read_head() {
                Ok(Some(decision)) => decision,
                Ok(None) => continue,
                Err(_) => return None,
            };
            return match decision {
                Ok((Decision::Health, _)) => {
                    self.shard.stats.borrow_mut().health_checks += 1;
                    self.out.push_bytes(&self.shard.pool, &handshake::health_response());
                    Box::pin(self.refuse()).await;
                    None
                }
                Ok((Decision::Upgrade { route, response }, _)) => {
                    self.out.push_bytes(&self.shard.pool, &response);
                    self.session.set_phase(Phase::Open);
                    self.session.heard_from_peer();
                    Some(route)
                }
                Err(reject) => {
                    self.shard.count_rejected(reject.status());
                    tracing::debug!(status = reject.status(), reason = reject.reason(), "handshake refused");
                    self.out.push_bytes(&self.shard.pool, &reject.response());
                    Box::pin(self.refuse()).await;
                    None
                }
            };
        }
    }

    /// Reads what the socket has of the request head and decides on it once
    /// the head is complete. Like frames, the head is read into the core's
    /// scratch buffer; only an incomplete head, or frames that came behind
    /// it, are kept in `carry`. `Ok(None)`: incomplete, wait for more.
    fn read_head(&mut self) -> io::Result<Option<Result<(Decision<'a>, usize), handshake::Reject>>> {
        let shard: &'a Shard = self.shard;
        let config = &*shard.config;
        if !self.carry.is_empty() {
            // Never read past the head limit: parse() answers 431 at it.
            let room = config.max_head_bytes - self.carry.len();
            if !self.recv(room)? {
                return Ok(None);
            }
            let Some(decision) = examine_head(&self.carry, config) else {
                return Ok(None);
            };
            if let Ok((_, head_len)) = &decision {
                self.carry.drain(..*head_len);
                if self.carry.is_empty() {
                    shard.pool.give(std::mem::take(&mut self.carry));
                }
            }
            return Ok(Some(decision));
        }
        let mut scratch = shard.scratch.borrow_mut();
        scratch.clear();
        match self.socket.recv_into(&mut scratch, config.max_head_bytes) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
        let decision = examine_head(&scratch, config);
        // Keep what must outlive this read: an unfinished head, or the
        // client's first frames behind a complete one.
        let keep = match &decision {
            None => 0,
            Some(Ok((_, head_len))) => *head_len,
            Some(Err(_)) => scratch.len(),
        };
        if keep < scratch.len() {
            self.carry = shard.pool.take();
            self.carry.extend_from_slice(&scratch[keep..]);
        }
        Ok(decision)
    }

    /// Sends the queued last words (an HTTP refusal, or the close frame of a
    /// failed connection), then closes our side and waits (bounded) for the
    /// peer to close its own. Rare: callers box it, so its state does not
    /// weigh on every idle connection's task.
    async fn refuse(&mut self) {
        self.session.set_phase(Phase::Closing);
        if self.flush().await.is_ok() {
            self.linger().await;
        }
    }

    /// The upgraded connection, until it ends.
    async fn run(&mut self, mut app: App) -> Ending {
        let mut reader = MessageReader::new(Role::Server, self.shard.config.limits);
        // Frames that arrived with the request head come first.
        let mut flow = if self.carry.is_empty() {
            Flow::Continue
        } else {
            self.process_carry(&mut reader, &mut app)
        };
        loop {
            match flow {
                Flow::Continue => {}
                Flow::PeerClosed(code) => {
                    // RFC 6455 7.1.1: the server closes the TCP connection first,
                    // once its close frame is out.
                    self.session.set_phase(Phase::Closing);
                    let _ = self.flush().await;
                    return Ending::Close(code.unwrap_or(CloseCode::NO_STATUS));
                }
                Flow::Failed(violation) => {
                    // RFC 6455 7.1.7: fail the connection: send a close, then
                    // close. Lingering until the peer closes keeps its unread
                    // input from turning our close into a reset.
                    tracing::debug!(
                        code = violation.code.0,
                        reason = violation.reason,
                        "closing on violation"
                    );
                    self.shard.count_close_sent(violation.code);
                    Box::pin(self.refuse()).await;
                    return Ending::Close(violation.code);
                }
            }
            if self.kicks.has(Kick::TIMEOUT) {
                return self
                    .close_first(&mut reader, CloseCode::GOING_AWAY, "idle timeout")
                    .await;
            }
            if self.kicks.has(Kick::SHUTDOWN) {
                return self
                    .close_first(&mut reader, CloseCode::GOING_AWAY, "server shutting down")
                    .await;
            }
            if self.kicks.has(Kick::PING) {
                // RFC 6455 5.5.2: a ping may be sent at any time after the upgrade.
                self.out.push_frame(&self.shard.pool, Opcode::Ping, &[]);
            }
            self.kicks = Kick::default();
            if self.flush().await.is_err() {
                return Ending::Abnormal;
            }
            if !self.kicks.is_empty() {
                continue;
            }
            match ready_or_kick(self.stream.readable(false), self.session).await {
                Ok(Wake::Kick(k)) => {
                    self.kicks = self.kicks.with(k);
                    continue;
                }
                Ok(Wake::Ready) => {}
                Err(_) => return Ending::Abnormal,
            }
            flow = match self.read_and_process(&mut reader, &mut app) {
                Ok(Some(flow)) => flow,
                Ok(None) => Flow::Continue,
                Err(_) => return Ending::Abnormal,
            };
        }
    }

    /// Reads what the socket has and processes it. `Ok(None)`: nothing was
    /// there after all. An end of stream is an error (the peer vanished).
    fn read_and_process(&mut self, reader: &mut MessageReader, app: &mut App) -> io::Result<Option<Flow>> {
        if !self.carry.is_empty() {
            // A partial frame is waiting: read straight behind it, as much
            // as the frame still needs (its header was checked against the
            // limits, so this is bounded by max_frame_bytes).
            let missing = self
                .carry_frame_bytes
                .map_or(0, |total| total.saturating_sub(self.carry.len()));
            let want = missing.max(self.shard.pool.buf_bytes());
            if !self.recv(want)? {
                return Ok(None);
            }
            return Ok(Some(self.process_carry(reader, app)));
        }
        let shard = self.shard;
        let mut scratch = shard.scratch.borrow_mut();
        scratch.clear();
        match self.socket.recv_into(&mut scratch, SCRATCH_BYTES) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
        self.session.heard_from_peer();
        let (used, flow, frame_bytes) = process(&mut scratch, reader, app, &mut self.out, shard);
        self.carry_frame_bytes = frame_bytes;
        if used < scratch.len() {
            // Keep the unfinished frame for the next read.
            self.carry = shard.pool.take();
            self.carry.extend_from_slice(&scratch[used..]);
        }
        Ok(Some(flow))
    }

    /// Appends up to `max` bytes to `carry`. `Ok(false)`: nothing available.
    fn recv(&mut self, max: usize) -> io::Result<bool> {
        match self.socket.recv_into(&mut self.carry, max) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {
                self.session.heard_from_peer();
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn process_carry(&mut self, reader: &mut MessageReader, app: &mut App) -> Flow {
        let (used, flow, frame_bytes) = process(&mut self.carry, reader, app, &mut self.out, self.shard);
        self.carry_frame_bytes = frame_bytes;
        self.carry.drain(..used);
        if self.carry.is_empty() {
            self.shard.pool.give(std::mem::take(&mut self.carry));
        }
        flow
    }

    /// We close first (shutdown, idle): send our close, wait for the peer's
    /// (RFC 6455 7.1.2), then close. Bounded by `close_timeout_ms`.
    async fn close_first(&mut self, reader: &mut MessageReader, code: CloseCode, reason: &str) -> Ending {
        self.shard.count_close_sent(code);
        self.session.set_phase(Phase::Closing);
        self.out.push_close(&self.shard.pool, Some(code), reason);
        if self.flush().await.is_err() {
            return Ending::Close(code);
        }
        // Read until the peer's close. Our close is sent, so nothing more is
        // (RFC 6455 5.5.1): no echo, no pong, and so no output can pile up.
        let mut discard = App::Closing;
        loop {
            match ready_or_kick(self.stream.readable(false), self.session).await {
                Ok(Wake::Ready) => {}
                Ok(Wake::Kick(k)) if !k.has(Kick::TIMEOUT) => continue,
                _ => return Ending::Close(code),
            }
            match self.read_and_process(reader, &mut discard) {
                Ok(None) | Ok(Some(Flow::Continue)) => continue,
                // The peer answered (or broke a rule): the handshake is over.
                Ok(Some(_)) | Err(_) => return Ending::Close(code),
            }
        }
    }

    /// Writes all queued output, waiting for writability as needed. Kicks
    /// that arrive meanwhile are kept for the main loop, except a timeout,
    /// which ends the wait.
    async fn flush(&mut self) -> io::Result<()> {
        match self.out.flush(&self.socket, &self.shard.pool)? {
            Flush::Done => Ok(()),
            // A full socket is the rare case: its wait is boxed.
            Flush::Blocked => Box::pin(self.flush_when_writable()).await,
        }
    }

    async fn flush_when_writable(&mut self) -> io::Result<()> {
        loop {
            match ready_or_kick(self.stream.writable(false), self.session).await? {
                Wake::Ready => {}
                Wake::Kick(k) if k.has(Kick::TIMEOUT) => return Err(io::ErrorKind::TimedOut.into()),
                Wake::Kick(k) => self.kicks = self.kicks.with(k),
            }
            if let Flush::Done = self.out.flush(&self.socket, &self.shard.pool)? {
                return Ok(());
            }
        }
    }

    /// After our last bytes: close our side and discard input until the peer
    /// closes its side or the close timeout passes.
    async fn linger(&mut self) {
        if self.socket.shutdown_write().is_err() {
            return;
        }
        loop {
            match self.socket.discard() {
                Ok(false) => {}
                Ok(true) | Err(_) => return,
            }
            match ready_or_kick(self.stream.readable(false), self.session).await {
                Ok(Wake::Ready) => {}
                Ok(Wake::Kick(k)) if !k.has(Kick::TIMEOUT) => {}
                _ => return,
            }
        }
    }

    /// Gives pooled buffers back.
    fn release(&mut self) {
        let pool = &self.shard.pool;
        pool.give(std::mem::take(&mut self.carry));
        let _ = std::mem::take(&mut self.out);
    }
}

/// What the handshake leads to.
enum Decision<'r> {
    Health,
    Upgrade { route: &'r Route, response: Vec<u8> },
}

/// Parses a request head; `None` while it is incomplete. On a decision, the
/// head's length comes with it.
fn examine_head<'r>(
    buf: &[u8],
    config: &'r crate::config::Config,
) -> Option<Result<(Decision<'r>, usize), handshake::Reject>> {
    match handshake::parse(buf, config.max_head_bytes) {
        Ok(None) => None,
        Err(reject) => Some(Err(reject)),
        Ok(Some((head, head_len))) => Some(decide(&head, config).map(|d| (d, head_len))),
    }
}

/// Routes and validates a complete request head (RFC 6455 4.2.1, 4.2.2).
fn decide<'r>(
    head: &handshake::Head<'_>,
    config: &'r crate::config::Config,
) -> Result<Decision<'r>, handshake::Reject> {
    if head.path == HEALTH_PATH && !head.wants_upgrade() {
        return Ok(Decision::Health);
    }
    let route = config.route(head.path).ok_or(handshake::Reject::NotFound)?;
    let key = head.validate_upgrade()?;
    // RFC 6455 4.2.2 (4) and 10.2: refuse origins the route does not allow.
    if !route.origins.allows(head.origin) {
        return Err(handshake::Reject::ForbiddenOrigin);
    }
    let mut response = Vec::with_capacity(160);
    handshake::write_accept(&mut response, key, head.choose_protocol(&route.subprotocols));
    Ok(Decision::Upgrade { route, response })
}

/// Runs every complete frame in `data` through the reader and the app.
/// Returns the bytes used (the rest is a partial frame), what to do next, and
/// the whole size of the partial frame when its header is complete.
fn process(
    data: &mut [u8],
    reader: &mut MessageReader,
    app: &mut App,
    out: &mut Outbound,
    shard: &Shard,
) -> (usize, Flow, Option<usize>) {
    let pool = &shard.pool;
    let mut pos = 0;
    let mut messages_in = 0u64;
    let mut bytes_in = 0u64;
    let mut partial_frame_bytes = None;
    let flow = loop {
        match reader.read(&mut data[pos..]) {
            Ok(Step::Need { frame_bytes }) => {
                partial_frame_bytes = frame_bytes;
                break Flow::Continue;
            }
            Ok(Step::Fragment(n)) => pos += n,
            Ok(Step::Event(event, n)) => {
                pos += n;
                match event {
                    Event::Message { kind, payload } => {
                        messages_in += 1;
                        bytes_in += payload.len() as u64;
                        app.on_message(kind, payload, out, pool);
                    }
                    // RFC 6455 5.5.2: answer a ping with a pong of the same payload.
                    Event::Ping(payload) if app.replies() => out.push_frame(pool, Opcode::Pong, payload),
                    Event::Ping(_) | Event::Pong(_) => {}
                    Event::Close(close) => {
                        // RFC 6455 5.5.1: reply with a close, echoing the code.
                        if app.replies() {
                            out.push_close(pool, close.code, "");
                        }
                        break Flow::PeerClosed(close.code);
                    }
                }
            }
            Err(violation) => {
                if app.replies() {
                    out.push_close(pool, Some(violation.code), violation.reason);
                }
                break Flow::Failed(violation);
            }
        }
    };
    let mut stats = shard.stats.borrow_mut();
    stats.messages_in += messages_in;
    stats.bytes_in += bytes_in;
    (pos, flow, partial_frame_bytes)
}
