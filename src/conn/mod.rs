//! One connection's life: handshake, frames in, frames out, close.
//!
//! Owns the I/O loop of a single socket: bytes go to `ws::handshake` (the
//! answer decided in `upgrade`) and `ws::MessageReader` (`input`), whole
//! messages go to the route's protocol (`app`, which carries out what
//! `proto` decides), replies come back through `Outbound`. The session's
//! state outside its task lives in the core's `shard` (its `slot`), reached
//! through its `session` handle. The rules of the loop:
//! - Wait for readiness, then read into the core's scratch buffer; only bytes
//!   that must outlive the read (a partial head or frame) are copied to a
//!   pooled buffer, so an idle connection holds no read buffer.
//! - No timer per connection: the shard's sweep kicks the task when a ping,
//!   a timeout or the shutdown is due.
//! - Output of a whole read goes out in one write. While output is pending,
//!   nothing more is read, so a peer that does not read cannot make us buffer
//!   more than one read's worth of replies.
//! - A quiet connection with nothing in progress parks when the sweep asks:
//!   its task ends, and the shard starts a new one (`resume`) when the peer
//!   speaks or a kick is due. See `park`.

pub mod admission;
pub mod app;
mod backend;
mod hooks;
mod input;
pub mod outbound;
pub mod park;
pub mod pool;
pub mod session;
pub mod shard;
pub mod slot;
pub mod stomp;
mod upgrade;

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use monoio::net::TcpStream;

use crate::config::RouteId;
use crate::sys::ring::{RecvRing, Token};
use crate::sys::socket::Socket;
use crate::tls::Left;
use crate::ws::{handshake, CloseCode, MessageReader, Opcode, Role, Violation};
use app::App;
use input::process;
use outbound::{Flush, Outbound};
use shard::{Kick, Phase, Session, Shard, SCRATCH_BYTES};
use upgrade::{answer_head, Answer};

/// Waits until input is there to take: the socket's inbox on the core's
/// receive ring when it is armed there, else the socket's readiness.
///
/// On readiness, the wait trusts the epoll driver's record (`relaxed`),
/// which `recv` clears when the kernel said a read left nothing: the next
/// wait then lasts until new bytes come, with no system call to check. A
/// strict wait checks with `poll(2)` both when bytes came and when the
/// socket was read dry, two system calls a read; it is kept after a read
/// that found nothing (`Left::NothingRead`), which is no proof of an empty
/// socket, and where the record was not cleared the relaxed wait would
/// return at once to another read that finds nothing.
fn input<'a>(
    stream: &'a TcpStream,
    socket: &Socket,
    ring: Option<(&'a RecvRing, Token)>,
) -> Input<'a, impl Future<Output = io::Result<()>> + 'a> {
    match ring {
        Some((ring, token)) => Input::Ring { ring, token },
        None => Input::Ready {
            ready: stream.readable(socket.left() != Left::NothingRead),
        },
    }
}

pin_project_lite::pin_project! {
    /// `input`'s future: a plain enum rather than an async fn, which would
    /// keep its arguments beside either wait (every idle task holds one).
    #[project = InputProj]
    enum Input<'a, F> {
        Ring { ring: &'a RecvRing, token: Token },
        Ready { #[pin] ready: F },
    }
}

impl<F: Future<Output = io::Result<()>>> Future for Input<'_, F> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            InputProj::Ring { ring, token } => ring.poll_input(*token, cx).map(Ok),
            InputProj::Ready { ready } => ready.poll(cx),
        }
    }
}

/// Appends at most `max` received bytes to `buf`, as `Socket::recv_into`
/// does, from the socket's inbox when it is armed on the receive ring.
///
/// A read of bytes that the kernel said left nothing behind
/// (`tls::recv_unread`) tells the epoll driver to forget its readiness,
/// and its edge-triggered registration reports the next bytes (`input`).
/// A peer's close stays reported.
fn recv(
    stream: &TcpStream,
    socket: &Socket,
    ring: Option<(&RecvRing, Token)>,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<usize>> {
    if let Some((ring, token)) = ring {
        return ring.take(token, socket.fd(), buf, max);
    }
    let got = socket.recv_into(buf, max);
    if got.is_ok() && socket.left() == Left::Empty {
        stream.clear_readable();
    }
    got
}

/// The least output sent on the ring. Waiting for a send's completion
/// costs the task one more wake-up: for the replies to a read of many
/// frames, or a large one, one system call for the turn's sends pays for
/// it; for one small frame (one message per read, a ping) a `send` costs
/// less (docs/ARCHITECTURE.md, "Reads and writes under io_uring").
const RING_SEND_MIN_BYTES: usize = 1024;

/// The most output sent on the ring. The kernel copies a ring send's bytes
/// at the loop's next submission, after every session of the turn ran, by
/// when a large output is out of the cache; a `send` copies it while it is
/// hot. Past 4 KiB that costs more than the system calls it saves: 24%
/// more echo at 100 x 16 x 512 B, 38% at 100 x 64 x 512 B, with `send`
/// (docs/ARCHITECTURE.md, "Reads and writes under io_uring").
const RING_SEND_MAX_BYTES: usize = 4 * 1024;

/// Why the loop woke.
enum Wake {
    Ready,
    Kick(Kick),
}

/// Waits for `io` (a readiness future) or a kick from the sweep, whichever is
/// first. An `ABORT` kick is an error, and every caller ends on an error.
fn ready_or_kick<F: Future<Output = io::Result<()>>>(io: F, session: &Session) -> ReadyOrKick<F, &Session> {
    ReadyOrKick { io, waiter: session }
}

/// The main wait of an open connection: as `ready_or_kick`, and while it
/// waits the shard may write the session's deliveries itself (see
/// `Shard::flush_direct`): nothing of ours is queued then.
fn idle_or_kick<F: Future<Output = io::Result<()>>>(io: F, session: &Session) -> ReadyOrKick<F, Direct<'_>> {
    ReadyOrKick {
        io,
        waiter: Direct(session),
    }
}

/// Who waits in a `ReadyOrKick`, and what it does while it waits.
trait Waiter {
    fn session(&self) -> &Session;
    /// The wait goes on (`true`) or ends (`false`).
    fn waiting(&self, _on: bool) {}
}

impl Waiter for &Session {
    fn session(&self) -> &Session {
        self
    }
}

/// A waiter whose socket the shard may write to while it waits.
struct Direct<'s>(&'s Session);

impl Waiter for Direct<'_> {
    fn session(&self) -> &Session {
        self.0
    }

    fn waiting(&self, on: bool) {
        self.0.set_direct(on);
    }
}

impl Drop for Direct<'_> {
    fn drop(&mut self) {
        // However the wait ends (even dropped with its task), the shard
        // must not write to this socket behind the task's back.
        self.0.set_direct(false);
    }
}

pin_project_lite::pin_project! {
    /// A plain struct rather than an `async fn`: an async fn would keep both
    /// its argument and the pinned copy of it, and this future sits in every
    /// idle connection's task.
    struct ReadyOrKick<F, W> {
        #[pin]
        io: F,
        waiter: W,
    }
}

impl<F: Future<Output = io::Result<()>>, W: Waiter> Future for ReadyOrKick<F, W> {
    type Output = io::Result<Wake>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let session = this.waiter.session();
        let woke = match session.poll_kick(cx.waker()) {
            Some(kick) if kick.has(Kick::ABORT) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Some(kick) => Poll::Ready(Ok(Wake::Kick(kick))),
            None => match this.io.poll(cx) {
                // A strict readiness wait asks poll(2), which a signal to
                // this thread interrupts (EINTR): that says nothing of the
                // socket, and the read or write that follows finds out.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Poll::Ready(Ok(Wake::Ready)),
                other => other.map_ok(|()| Wake::Ready),
            },
        };
        this.waiter.waiting(woke.is_pending());
        woke
    }
}

/// What processing a batch of input decided.
pub(super) enum Flow {
    Continue,
    /// The replies of the frames taken so far reached `OUTPUT_PAUSE_BYTES`
    /// (compressed messages inflate to more than they took to read): the
    /// rest of the read waits in `carry` until they are written.
    Paused,
    /// The peer sent a close frame (with this code); ours is queued in reply.
    PeerClosed(Option<CloseCode>),
    /// The peer broke a rule; our close is queued.
    Failed(Violation),
    /// The protocol's session ended (STOMP DISCONNECT or ERROR): its last
    /// replies are queued; we close first with this code.
    AppClosed(CloseCode),
}

/// How an upgraded connection's task ended.
enum End {
    /// The session is over. The peer's close frame code, if it sent one
    /// (`Some(None)`: a close without a code).
    Closed(Option<Option<CloseCode>>),
    /// The session parked: its socket and slot live on without this task.
    Parked,
}

/// The RFC 6455 7.1.5 close code of an ended session: the code of the close
/// frame the peer sent (1005 if it had none), or 1006 if it sent none.
fn close_code(peer_close: Option<Option<CloseCode>>) -> CloseCode {
    match peer_close {
        Some(code) => code.unwrap_or(CloseCode::NO_STATUS),
        None => CloseCode::ABNORMAL,
    }
}

struct Conn<'a> {
    stream: &'a TcpStream,
    socket: Socket<'a>,
    session: &'a Session,
    out: Outbound,
    /// Bytes read but not yet used: a partial request head or frame.
    carry: Vec<u8>,
    /// Whole size of the partial frame in `carry`, once its header is in.
    /// (u32: frames are at most 1 GiB plus a header; this keeps the task
    /// within its budget.)
    carry_frame_bytes: Option<u32>,
    /// Kicks taken from the sweep and not yet acted on.
    kicks: Kick,
    /// The socket's receive on the core's ring (io_uring, plain sockets,
    /// open sessions): while it is armed every byte is read through it.
    ring: Option<Token>,
    /// Deliveries may be queued for this session (a pub/sub route, or a
    /// message the admin API pushed): flushes look at the queue only then.
    deliveries: bool,
}

/// Serves one accepted connection to its end (or until it parks). The
/// session was registered by the accept loop, so a shutdown that starts
/// meanwhile still sees it.
/// `tls`: the connection came to the `wss://` listener and speaks TLS
/// first.
pub fn serve(stream: TcpStream, session: Session, tls: bool) -> impl Future<Output = ()> {
    if tls {
        match session.shard().tls.clone().map(crate::tls::TlsSession::new) {
            Some(Ok(tls)) => session.set_tls(tls),
            // Without its TLS state (out of memory) the connection is not
            // served: its task ends at its first wait.
            _ => {
                tracing::warn!("cannot start TLS on a connection");
                session.abort();
            }
        }
    }
    serve_from(stream, session, None)
}

/// Serves a parked session again, from its next input or pending kick.
pub fn resume(stream: TcpStream, session: Session, route: RouteId) -> impl Future<Output = ()> {
    serve_from(stream, session, Some(route))
}

/// Both entries share one body, so there is one task type and one size
/// (plain functions, not async ones: a wrapper future would add its own
/// copy of the arguments).
// An async block rather than an async fn: an async fn keeps its arguments
// twice in its state (as passed, and as moved into locals), 104 bytes here.
#[allow(clippy::manual_async_fn)]
fn serve_from(stream: TcpStream, session: Session, resumed: Option<RouteId>) -> impl Future<Output = ()> {
    async move {
        let shard = session.shard();
        session.set_fd(stream.as_raw_fd());
        let mut conn = Conn {
            stream: &stream,
            socket: Socket::new(&stream).with_tls(session.tls()),
            session: &session,
            out: Outbound::default(),
            carry: Vec::new(),
            carry_frame_bytes: None,
            kicks: Kick::default(),
            ring: None,
            deliveries: false,
        };
        let route = match resumed {
            Some(route) => Some(route),
            None => conn
                .handshake()
                .await
                .inspect(|_| shard.stats.borrow_mut().upgraded += 1),
        };
        let ended = match route {
            Some(route) => match conn.run(route, resumed.is_some()).await {
                End::Closed(peer_close) => {
                    shard.count_close(close_code(peer_close));
                    session.backend_ended(peer_close);
                    true
                }
                End::Parked => false,
            },
            None => true,
        };
        // RFC 6455 7.1.1: the server closes the TCP connection first.
        if ended {
            conn.socket.shutdown();
        }
        conn.release();
    }
}

impl<'a> Conn<'a> {
    fn shard(&self) -> &'a Shard {
        let session: &'a Session = self.session;
        session.shard()
    }

    /// Reads and answers the opening handshake. Returns the route on a 101;
    /// `None` when the client was refused, timed out or went away.
    async fn handshake(&mut self) -> Option<RouteId> {
        loop {
            // TLS: the handshake's own messages the socket did not take.
            if self.socket.has_pending() && Box::pin(self.flush_when_writable()).await.is_err() {
                return None;
            }
            // Kicks that came while it waited to write.
            if self.kicks.has(Kick::TIMEOUT) {
                self.shard().stats.borrow_mut().handshake_timeouts += 1;
                return None;
            }
            match ready_or_kick(self.stream.readable(false), self.session).await {
                Ok(Wake::Ready) => {}
                Ok(Wake::Kick(k)) if k.has(Kick::SHUTDOWN) => {
                    self.out
                        .push_bytes(&self.shard().pool, &handshake::Reject::ShuttingDown.response());
                    Box::pin(self.refuse()).await;
                    return None;
                }
                // Handshake timeout: drop without a word.
                Ok(Wake::Kick(k)) => {
                    if k.has(Kick::TIMEOUT) {
                        self.shard().stats.borrow_mut().handshake_timeouts += 1;
                        return None;
                    }
                    continue;
                }
                Err(_) => return None,
            }
            let answer = match self.read_head() {
                Ok(Some(answer)) => answer,
                Ok(None) => continue,
                Err(_) => return None,
            };
            return match answer {
                Answer::Upgrade(route) => {
                    self.session.set_phase(Phase::Open);
                    self.session.peer_alive();
                    Some(route)
                }
                Answer::Backend(request) => {
                    let route = request.route;
                    Box::pin(self.ask_upstream(route, |session| async move {
                        let mut out = Outbound::default();
                        let decided = match backend::open(session, *request, &mut out).await {
                            backend::Opened::Accepted => Ok(()),
                            backend::Opened::Refused(status) => Err(status),
                        };
                        (out, decided)
                    }))
                    .await
                }
                Answer::Hooked(request) => {
                    let route = request.route;
                    Box::pin(self.ask_upstream(route, |session| async move {
                        let mut out = Outbound::default();
                        let decided = hooks::connect(session, *request, &mut out).await;
                        (out, decided)
                    }))
                    .await
                }
                Answer::Health => {
                    self.shard().stats.borrow_mut().health_checks += 1;
                    Box::pin(self.refuse()).await;
                    None
                }
                Answer::Reject(reject) => {
                    self.shard().count_rejected(reject.status());
                    tracing::debug!(status = reject.status(), reason = reject.reason(), "handshake refused");
                    Box::pin(self.refuse()).await;
                    None
                }
            };
        }
    }

    /// Waits for an upstream to decide a handshake (a backend route's
    /// `OPEN`, a connect hook), bounded by the route's timeout, and sends
    /// what `ask` queued: the 101 (`Ok`), or a refusal with its status. A
    /// shutdown meanwhile is answered with 503.
    async fn ask_upstream<'s, F, Fut>(&'s mut self, route: RouteId, ask: F) -> Option<RouteId>
    where
        F: FnOnce(&'s Session) -> Fut,
        Fut: Future<Output = (Outbound, Result<(), u16>)> + 's,
    {
        let session: &'s Session = self.session;
        let mut decided = None;
        let shut = {
            let asked = ask(session);
            let waiting = async {
                decided = Some(asked.await);
                Ok(())
            };
            let mut waiting = std::pin::pin!(waiting);
            loop {
                match ready_or_kick(waiting.as_mut(), session).await {
                    Ok(Wake::Ready) => break false,
                    Ok(Wake::Kick(k)) if k.has(Kick::SHUTDOWN) => break true,
                    // The handshake's own timeout does not cut the
                    // upstream's: that one answers 504.
                    Ok(Wake::Kick(_)) => continue,
                    Err(_) => return None,
                }
            }
        };
        let pool = &self.shard().pool;
        let status = match decided {
            _ if shut => {
                if let Some((mut out, _)) = decided {
                    out.release(pool);
                }
                let reject = handshake::Reject::ShuttingDown;
                self.out.push_bytes(pool, &reject.response());
                reject.status()
            }
            Some((mut out, Ok(()))) => {
                std::mem::swap(&mut self.out, &mut out);
                out.release(pool);
                self.session.set_phase(Phase::Open);
                self.session.peer_alive();
                // The 101 and what the upstream sent with it go out before
                // anything it asked for (a close, a disconnect) is done. A
                // failed write is found again by the session's next one.
                let _ = self.flush().await;
                return Some(route);
            }
            Some((mut out, Err(status))) => {
                std::mem::swap(&mut self.out, &mut out);
                out.release(pool);
                status
            }
            None => return None,
        };
        self.shard().count_rejected(status);
        Box::pin(self.refuse()).await;
        None
    }

    /// Reads what the socket has of the request head and, once the head is
    /// complete, queues the answer. Like frames, the head is read into the
    /// core's scratch buffer; only an incomplete head, or frames that came
    /// behind a complete one, are kept in `carry`. `Ok(None)`: read more.
    fn read_head(&mut self) -> io::Result<Option<Answer>> {
        let shard: &'a Shard = self.shard();
        let config = &*shard.config;
        if !self.carry.is_empty() {
            // Never read past the head limit: parse() answers 431 at it.
            let room = config.max_head_bytes - self.carry.len();
            if self.socket.recv_into(&mut self.carry, room)?.is_none() {
                return Ok(None);
            }
            let session = self.session;
            let Some((answer, head_len)) = answer_head(&self.carry, config, &mut self.out, &shard.pool, session) else {
                return Ok(None);
            };
            self.carry.drain(..head_len);
            self.release_carry_if_empty();
            return Ok(Some(answer));
        }
        let mut scratch = shard.scratch.borrow_mut();
        scratch.clear();
        if self.socket.recv_into(&mut scratch, config.max_head_bytes)?.is_none() {
            return Ok(None);
        }
        let session = self.session;
        let answer = answer_head(&scratch, config, &mut self.out, &shard.pool, session);
        // Keep what must outlive this read: an unfinished head, or the
        // client's first frames behind a complete one.
        let keep_from = answer.as_ref().map_or(0, |(_, head_len)| *head_len);
        if keep_from < scratch.len() {
            self.carry = shard.pool.take();
            self.carry.extend_from_slice(&scratch[keep_from..]);
        }
        Ok(answer.map(|(answer, _)| answer))
    }

    /// Sends the queued last words (an HTTP answer, or the close frame of a
    /// failed connection), then closes our side and waits (bounded by the
    /// close timeout) for the peer to close its own. Rare: callers box it,
    /// so its state does not weigh on every idle connection's task.
    async fn refuse(&mut self) {
        self.session.set_phase(Phase::Closing);
        if self.flush().await.is_ok() {
            self.linger().await;
        }
    }

    /// The upgraded connection, until it ends or parks. A resumed session
    /// starts with a read: its socket is likely what woke it.
    async fn run(&mut self, route: RouteId, resumed: bool) -> End {
        let mut app = App::for_route(self.shard().config.route_by_id(route));
        self.session.with(|s| s.route = Some(route));
        self.deliveries = app.is_pubsub() || self.session.has_deliveries();
        if !resumed {
            let pool = &self.shard().pool;
            app.start(&mut self.out, pool, self.session);
        }
        let mut reader = MessageReader::new(Role::Server, self.shard().config.limits);
        // permessage-deflate (RFC 7692): without context takeover the
        // core's inflater and compressor serve the session; with it, its own.
        let deflate_bits = self.session.deflate_bits();
        let dedicated = &self.shard().hub.sessions.dedicated;
        self.out
            .set_deflate(deflate_bits, dedicated.compresses(self.session.key()));
        if deflate_bits != 0 {
            reader = reader.with_deflate(dedicated.inflates(self.session.key()));
        }
        // Frames that arrived with the request head come first.
        let mut flow = if !self.carry.is_empty() {
            self.process_carry(&mut reader, &mut app)
        } else if resumed {
            match self.read_and_process(&mut reader, &mut app) {
                Ok(flow) => flow.unwrap_or(Flow::Continue),
                Err(_) => return End::Closed(None),
            }
        } else {
            Flow::Continue
        };
        loop {
            let paused = matches!(flow, Flow::Paused);
            match flow {
                Flow::Continue | Flow::Paused => {}
                Flow::PeerClosed(code) => {
                    // RFC 6455 7.1.1: the server closes the TCP connection first,
                    // once its close frame is out.
                    self.session.set_phase(Phase::Closing);
                    let _ = self.flush().await;
                    return End::Closed(Some(code));
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
                    self.session.set_phase(Phase::Closing);
                    // (A kick may end a send on the ring with our close
                    // still queued: then it was not sent.)
                    if self.flush().await.is_ok() && self.out.is_empty() {
                        self.shard().count_close_sent(violation.code);
                        self.linger().await;
                    }
                    return End::Closed(None);
                }
                Flow::AppClosed(code) => {
                    let reason = App::close_reason(code);
                    return End::Closed(Box::pin(self.close_first(&mut reader, code, reason)).await);
                }
            }
            if self.kicks.has(Kick::TIMEOUT) {
                return End::Closed(
                    Box::pin(self.close_first(&mut reader, CloseCode::GOING_AWAY, "idle timeout")).await,
                );
            }
            if self.kicks.has(Kick::SHUTDOWN) {
                // Every publish accepted before the shutdown is queued by
                // now (`server::shutdown`): it goes out before our close.
                self.deliveries |= self.session.has_deliveries();
                if self.flush().await.is_err() {
                    return End::Closed(None);
                }
                let reason = "server shutting down";
                return End::Closed(Box::pin(self.close_first(&mut reader, CloseCode::GOING_AWAY, reason)).await);
            }
            if self.kicks.has(Kick::CLOSE) {
                if let Some((code, reason)) = self.session.take_close_request() {
                    let reason = String::from_utf8_lossy(&reason).into_owned();
                    let closing = Box::pin(self.close_first(&mut reader, CloseCode(code), &reason));
                    return End::Closed(closing.await);
                }
            }
            if self.kicks.has(Kick::EXPIRED) {
                self.shard().stats.borrow_mut().tokens_expired += 1;
                let closing = self.close_first(&mut reader, crate::auth::EXPIRED_CLOSE, "token expired");
                return End::Closed(Box::pin(closing).await);
            }
            if self.kicks.has(Kick::SLOW) {
                let reason = "slow consumer";
                return End::Closed(Box::pin(self.close_first(&mut reader, CloseCode::POLICY_VIOLATION, reason)).await);
            }
            if self.kicks.has(Kick::PING) {
                // RFC 6455 5.5.2: a ping may be sent at any time after the upgrade.
                self.out.push_frame(&self.shard().pool, Opcode::Ping, &[]);
            }
            if self.kicks == Kick::PARK
                && self.may_park(&reader, &app)
                && Box::pin(self.stop_ring()).await
                // Waiting for the receive to end let the core run: what
                // came meanwhile (deliveries, a kick) is acted on, not
                // parked over (a parked queue is listed only when it turns
                // non-empty, and a kick to a task is not seen by a park).
                && self.may_park(&reader, &app)
                && !self.session.has_kick()
                && self.park(route)
            {
                return End::Parked;
            }
            self.deliveries |= self.kicks.has(Kick::DELIVER);
            self.kicks = Kick::default();
            if self.flush().await.is_err() {
                return End::Closed(None);
            }
            if !self.kicks.is_empty() {
                continue;
            }
            if paused {
                // The replies that paused it are out: on with the read.
                flow = self.process_carry(&mut reader, &mut app);
                continue;
            }
            if self.session.is_blocked() {
                // Reads stay paused until the publish is through.
                match Box::pin(self.wait_for_ring_space()).await {
                    Ok(Wake::Kick(k)) => self.kicks = self.kicks.with(k),
                    Ok(Wake::Ready) => flow = self.process_carry(&mut reader, &mut app),
                    Err(_) => return End::Closed(None),
                }
                continue;
            }
            if self.shard().takes_no_input() {
                // Shutting down: wait for the shutdown kick, not for input,
                // taking deliveries meanwhile.
                let kicked = Box::pin(idle_or_kick(std::future::pending(), self.session)).await;
                match kicked {
                    Ok(Wake::Kick(k)) => self.kicks = self.kicks.with(k),
                    Ok(Wake::Ready) => {}
                    Err(_) => return End::Closed(None),
                }
                continue;
            }
            self.arm_ring();
            match idle_or_kick(input(self.stream, &self.socket, self.armed_ring()), self.session).await {
                Ok(Wake::Kick(k)) => {
                    self.kicks = self.kicks.with(k);
                    continue;
                }
                Ok(Wake::Ready) => {}
                Err(_) => return End::Closed(None),
            }
            flow = match self.read_and_process(&mut reader, &mut app) {
                Ok(Some(flow)) => flow,
                Ok(None) => Flow::Continue,
                Err(_) => return End::Closed(None),
            };
        }
    }

    /// Waits until the app's pending cross-core envelopes are all sent, or
    /// a kick comes. `Ready` once they are.
    async fn wait_for_ring_space(&mut self) -> io::Result<Wake> {
        let session = self.session;
        std::future::poll_fn(|cx| {
            match session.poll_kick(cx.waker()) {
                Some(kick) if kick.has(Kick::ABORT) => return Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
                Some(kick) => return Poll::Ready(Ok(Wake::Kick(kick))),
                None => {}
            }
            session.poll_unblocked(cx).map(|()| Ok(Wake::Ready))
        })
        .await
    }

    /// Nothing in progress that lives in the task: no partial frame or
    /// message, no queued output or deliveries, a protocol whose state is
    /// not in the task.
    fn may_park(&self, reader: &MessageReader, app: &App) -> bool {
        reader.is_idle()
            && self.carry.is_empty()
            && self.out.is_empty()
            && app.may_park()
            && !self.session.has_deliveries()
            && !self.session.is_blocked()
            && !self.session.hook_pending()
    }

    /// Under io_uring, arms the socket's receive on the core's ring, once
    /// (a plain socket: TLS reads ciphertext its own way). Where it cannot,
    /// the connection reads on readiness, as under epoll.
    fn arm_ring(&mut self) {
        if self.ring.is_some() || self.socket.has_tls() {
            return;
        }
        if let Some(ring) = self.shard().recv_ring.get() {
            match ring.arm(self.socket.fd()) {
                Ok(token) => self.ring = Some(token),
                Err(e) => tracing::debug!(error = %e, "cannot arm a receive; reading on readiness"),
            }
        }
    }

    /// The socket's receive on the ring, if armed.
    fn armed_ring(&self) -> Option<(&'a RecvRing, Token)> {
        let shard: &'a Shard = self.shard();
        Some((shard.recv_ring.get()?, self.ring?))
    }

    /// Before parking: ends the socket's receive on the ring and gives its
    /// inbox up. `false` if bytes (or the end of the stream) came before it
    /// ended: the session then reads them instead of parking.
    async fn stop_ring(&mut self) -> bool {
        let Some((ring, token)) = self.armed_ring() else {
            return true;
        };
        std::future::poll_fn(|cx| ring.poll_stopped(token, cx)).await;
        if ring.has_input_or_end(token) {
            return false;
        }
        self.release_ring();
        true
    }

    /// Gives the socket's inbox on the ring up (its receive is cancelled if
    /// still armed); reads go to the socket again.
    fn release_ring(&mut self) {
        if let (Some(ring), Some(token)) = (self.shard().recv_ring.get(), self.ring.take()) {
            ring.release(token);
        }
    }

    /// Hands the socket to the shard's parking lot. `false` if it could not
    /// (out of descriptors or memory): the task then simply goes on.
    fn park(&self, route: RouteId) -> bool {
        let parked = crate::sys::fd::duplicate(self.socket.fd()).and_then(|fd| self.session.park(fd, route));
        if let Err(e) = &parked {
            tracing::debug!(error = %e, "cannot park a quiet connection");
        }
        parked.is_ok()
    }

    /// Reads what the socket has and processes it. `Ok(None)`: nothing was
    /// there after all. An end of stream is an error (the peer vanished).
    fn read_and_process(&mut self, reader: &mut MessageReader, app: &mut App) -> io::Result<Option<Flow>> {
        if !self.carry.is_empty() {
            // A partial frame is waiting: read straight behind it.
            let want = self.grow_carry_for_frame();
            if recv(self.stream, &self.socket, self.armed_ring(), &mut self.carry, want)?.is_none() {
                return Ok(None);
            }
            self.session.peer_alive();
            return Ok(Some(self.process_carry(reader, app)));
        }
        let shard = self.shard();
        let mut scratch = shard.scratch.borrow_mut();
        scratch.clear();
        if recv(
            self.stream,
            &self.socket,
            self.armed_ring(),
            &mut scratch,
            SCRATCH_BYTES,
        )?
        .is_none()
        {
            return Ok(None);
        }
        self.session.peer_alive();
        let (used, flow, frame_bytes) = process(&mut scratch, reader, app, &mut self.out, self.session);
        self.carry_frame_bytes = frame_bytes.and_then(|n| u32::try_from(n).ok());
        if used < scratch.len() {
            // Keep the unfinished frame for the next read.
            self.carry = shard.pool.take();
            self.carry.extend_from_slice(&scratch[used..]);
        }
        Ok(Some(flow))
    }

    /// Makes room in `carry` for the next read of a partial frame and returns
    /// how much to read. The buffer doubles as bytes arrive but never grows
    /// past what the frame needs (its header passed the size limits), so a
    /// header alone never reserves a large buffer.
    fn grow_carry_for_frame(&mut self) -> usize {
        let len = self.carry.len();
        let missing = match self.carry_frame_bytes {
            Some(total) if total as usize > len => total as usize - len,
            // Header still incomplete: a pool buffer's worth.
            _ => self.shard().pool.buf_bytes(),
        };
        let want = missing.min(SCRATCH_BYTES);
        if self.carry.capacity() - len < want {
            let target = (self.carry.capacity() * 2).clamp(len + want, len + missing);
            self.carry.reserve_exact(target - len);
        }
        self.carry.capacity() - len
    }

    fn process_carry(&mut self, reader: &mut MessageReader, app: &mut App) -> Flow {
        let (used, flow, frame_bytes) = process(&mut self.carry, reader, app, &mut self.out, self.session);
        self.carry_frame_bytes = frame_bytes.and_then(|n| u32::try_from(n).ok());
        self.carry.drain(..used);
        let pool = &self.shard().pool;
        if self.carry.capacity() > pool.buf_bytes() && self.carry.len() <= pool.buf_bytes() {
            // A large frame went through: keep its remainder in a pooled
            // buffer rather than holding the large one.
            let mut small = pool.take();
            small.extend_from_slice(&self.carry);
            self.carry = small;
        }
        self.release_carry_if_empty();
        flow
    }

    fn release_carry_if_empty(&mut self) {
        if self.carry.is_empty() {
            self.shard().pool.give(std::mem::take(&mut self.carry));
        }
    }

    /// We close first (shutdown, idle): send our close, wait for the peer's
    /// (RFC 6455 7.1.2), then close. Bounded by `close_timeout_ms`. Returns
    /// the peer's close code, if its close came.
    async fn close_first(
        &mut self,
        reader: &mut MessageReader,
        code: CloseCode,
        reason: &str,
    ) -> Option<Option<CloseCode>> {
        self.session.set_phase(Phase::Closing);
        self.out.push_close(&self.shard().pool, Some(code), reason);
        self.flush().await.ok()?;
        if !self.out.is_empty() {
            // A kick ended a send on the ring before our close went out:
            // no close handshake to wait for.
            return None;
        }
        self.shard().count_close_sent(code);
        // Read until the peer's close. Our close is sent, so nothing more is
        // (RFC 6455 5.5.1): no echo, no pong, and so no output can pile up.
        let mut closing = App::Closing;
        // A read paused for its replies (`Flow::Paused`) may hold the
        // peer's close already: it is looked for before any wait.
        if !self.carry.is_empty() {
            match self.process_carry(reader, &mut closing) {
                Flow::PeerClosed(peer_code) => return Some(peer_code),
                Flow::Failed(_) | Flow::AppClosed(_) => return None,
                Flow::Continue | Flow::Paused => {}
            }
        }
        loop {
            match ready_or_kick(input(self.stream, &self.socket, self.armed_ring()), self.session).await {
                Ok(Wake::Ready) => {}
                Ok(Wake::Kick(k)) if !k.has(Kick::TIMEOUT) => continue,
                _ => return None,
            }
            match self.read_and_process(reader, &mut closing) {
                Ok(None) | Ok(Some(Flow::Continue | Flow::Paused)) => continue,
                Ok(Some(Flow::PeerClosed(peer_code))) => return Some(peer_code),
                Ok(Some(Flow::Failed(_))) | Ok(Some(Flow::AppClosed(_))) | Err(_) => return None,
            }
        }
    }

    /// Writes all queued output (the session's own replies, then queued
    /// deliveries), waiting for writability as needed.
    async fn flush(&mut self) -> io::Result<()> {
        if let Some((ring, token)) = self.ring_for_output() {
            if !self.send_on_ring(ring, token).await? {
                return Ok(());
            }
        }
        match self.try_flush()? {
            Flush::Done => Ok(()),
            // A full socket is the rare case: its wait is boxed.
            Flush::Blocked => Box::pin(self.flush_when_writable()).await,
        }
    }

    /// The ring, when the session's own output goes through it: under
    /// io_uring, once its receive is armed there (plain sockets only),
    /// while no delivery waits (deliveries go by vectored writes of shared
    /// frames, after our own output), and for output of
    /// `RING_SEND_MIN_BYTES` to `RING_SEND_MAX_BYTES`.
    fn ring_for_output(&self) -> Option<(&'a RecvRing, Token)> {
        if self.deliveries || !(RING_SEND_MIN_BYTES..=RING_SEND_MAX_BYTES).contains(&self.out.unsent()) {
            return None;
        }
        self.armed_ring()
    }

    /// Sends our queued output as sends on the core's ring, which go to
    /// the kernel with the loop's next submission, every session's sends
    /// of a turn in one system call; then waits for each to end, so a
    /// session has one in flight at most and nothing else writes to its
    /// socket meanwhile. `Ok(false)`: a kick that ends the wait for output
    /// (a slow consumer, a close, an expiry) came first; what is unsent
    /// stays queued. The send is ended and waited for before any return,
    /// so none is in flight outside this call.
    async fn send_on_ring(&mut self, ring: &'a RecvRing, token: Token) -> io::Result<bool> {
        // The last send ended short: the socket was full.
        let mut full = false;
        while !self.out.is_empty() {
            let len = self.out.unsent();
            let (bytes, from) = self.out.take_unsent();
            if let Err((e, bytes)) = ring.send(token, self.socket.fd(), bytes, from) {
                // The ring cannot take it: the bytes go by `send` instead.
                tracing::debug!(error = %e, "cannot queue a send");
                self.out.sent_back(&self.shard().pool, bytes, from, 0);
                return Ok(true);
            }
            let mut stop = None;
            loop {
                let sent = std::future::poll_fn(|cx| ring.poll_sent(token, cx).map(Ok));
                match ready_or_kick(sent, self.session).await {
                    Ok(Wake::Ready) => break,
                    // As on a full socket (`flush_when_writable`).
                    Ok(Wake::Kick(k)) if k.has(Kick::TIMEOUT) => stop = Some(Err(io::ErrorKind::TimedOut.into())),
                    Ok(Wake::Kick(k)) if k.has(Kick::SLOW) || k.has(Kick::CLOSE) || k.has(Kick::EXPIRED) => {
                        self.kicks = self.kicks.with(k);
                        stop = Some(Ok(false));
                    }
                    Ok(Wake::Kick(k)) => {
                        self.deliveries |= k.has(Kick::DELIVER);
                        self.kicks = self.kicks.with(k);
                        continue;
                    }
                    Err(e) => stop = Some(Err(e)),
                }
                // Ended now: the cancel's completion says what went out.
                std::future::poll_fn(|cx| ring.poll_send_stopped(token, cx)).await;
                break;
            }
            let (bytes, result) = ring.take_sent(token);
            let pool = &self.shard().pool;
            match result {
                Ok(n) => {
                    if n > 0 && full {
                        // Bytes went into a socket that was full (the last
                        // send ended short): the peer takes them, so it is
                        // alive, as when a full socket turns writable. A
                        // send that goes at once says nothing of the peer:
                        // a silent one still times out.
                        self.session.peer_alive();
                    }
                    full = n < len;
                    self.out.sent_back(pool, bytes, from, n);
                    self.shard().stats.borrow_mut().bytes_out += self.out.take_written();
                    if n == 0 && stop.is_none() {
                        // Nothing went, uncancelled (not expected: the
                        // kernel waits for room): the rest goes by `send`
                        // and a wait for writability rather than a
                        // resend at once.
                        return Ok(true);
                    }
                }
                Err(e) => {
                    pool.give(bytes);
                    return Err(e);
                }
            }
            if let Some(stop) = stop {
                return stop;
            }
        }
        Ok(true)
    }

    /// Frames never interleave: a delivery partly written is finished
    /// before our own output, and deliveries go only once that is all out.
    fn try_flush(&mut self) -> io::Result<Flush> {
        if !self.deliveries {
            let flushed = self.out.flush(&self.socket, &self.shard().pool);
            self.shard().stats.borrow_mut().bytes_out += self.out.take_written();
            return flushed;
        }
        if let Flush::Blocked = self.session.flush_deliveries(&self.socket, true)? {
            return Ok(Flush::Blocked);
        }
        let flushed = self.out.flush(&self.socket, &self.shard().pool);
        self.shard().stats.borrow_mut().bytes_out += self.out.take_written();
        match flushed? {
            Flush::Done => self.session.flush_deliveries(&self.socket, false),
            Flush::Blocked => Ok(Flush::Blocked),
        }
    }

    /// Kicks that arrive while the socket is full are kept for the main loop,
    /// except a timeout, which ends the wait. The socket turning writable
    /// again (the peer took bytes) counts as the peer being alive, so only
    /// a peer that stops reading times out; a kick (a ping, a delivery)
    /// does not.
    async fn flush_when_writable(&mut self) -> io::Result<()> {
        loop {
            match ready_or_kick(self.stream.writable(false), self.session).await? {
                Wake::Ready => self.session.peer_alive(),
                Wake::Kick(k) if k.has(Kick::TIMEOUT) => return Err(io::ErrorKind::TimedOut.into()),
                Wake::Kick(k) if k.has(Kick::SLOW) || k.has(Kick::CLOSE) || k.has(Kick::EXPIRED) => {
                    // Closing does not wait for this output: the close
                    // handshake has its own (bounded) wait.
                    self.kicks = self.kicks.with(k);
                    return Ok(());
                }
                Wake::Kick(k) => {
                    self.deliveries |= k.has(Kick::DELIVER);
                    self.kicks = self.kicks.with(k);
                }
            }
            if let Flush::Done = self.try_flush()? {
                return Ok(());
            }
        }
    }

    /// After our last bytes: close our side and discard input until the peer
    /// closes its side or the close timeout passes.
    async fn linger(&mut self) {
        // Input is discarded straight from the socket from now on.
        self.release_ring();
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

    /// Gives pooled buffers and the socket's inbox back.
    fn release(&mut self) {
        self.release_ring();
        let pool = &self.shard().pool;
        pool.give(std::mem::take(&mut self.carry));
        self.out.release(pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Options;

    /// The connection task is what an idle connection costs: keep it small.
    /// Budget in bytes for the future of `serve` (monoio's task header and
    /// the session slot come on top).
    const SERVE_FUTURE_BUDGET_BYTES: usize = 512;

    #[test]
    fn connection_future_fits_its_budget() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            accepted.set_nonblocking(true).unwrap();
            let stream = TcpStream::from_std(accepted).unwrap();
            let shard = crate::conn::shard::tests::test_shard(Options::default());
            let future = serve(stream, shard.open_session(), false);
            let size = std::mem::size_of_val(&future);
            eprintln!("serve future: {size} bytes");
            assert!(size <= SERVE_FUTURE_BUDGET_BYTES, "serve future is {size} bytes");
        });
    }
}
