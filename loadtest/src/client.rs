//! One client connection: TCP connect from a chosen source address, the
//! opening handshake, and frame I/O.
//!
//! Owns the client side of RFC 6455 over a socket and nothing of any
//! scenario. Frames are decoded with `sluice::ws::MessageReader` (client
//! role: server frames are unmasked), so replies are counted from their
//! headers and payloads are borrowed, never copied. Bytes move with the same
//! readiness-then-non-blocking-syscall pattern as the gateway, so either
//! monoio driver works.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use sluice::sys::socket::{set_int_option, Socket};
use sluice::ws::deflate::{Deflater, Inflater};
use sluice::ws::{handshake, Event, Limits, MessageReader, Role, Step};

/// Where to connect: `ws://host:port/path`, or `wss://` with the TLS
/// settings to use.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// `wss://`: settings, once `with_ca` gave them.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    secure: bool,
    /// Offer permessage-deflate without context takeover (RFC 7692), and
    /// fail a connection whose server declines it.
    pub deflate: bool,
    /// With `deflate`: offer it leaving context takeover to the server,
    /// and inflate whole what it compresses with it (a connection's own
    /// inflater, keeping its window).
    pub deflate_takeover: bool,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let (rest, secure) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err(format!("{url}: give a ws:// or wss:// URL")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = authority
            .parse()
            .or_else(|_| {
                use std::net::ToSocketAddrs;
                authority.to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or(())
            })
            .map_err(|_| format!("{url}: cannot resolve {authority:?} (give HOST:PORT)"))?;
        Ok(Target {
            addr,
            host: authority.to_string(),
            path: path.to_string(),
            tls: None,
            secure,
            deflate: false,
            deflate_takeover: false,
        })
    }

    /// The TLS settings of a `wss://` target: the server's chain must lead
    /// to a certificate of `ca` (PEM), for the URL's host name.
    pub fn with_ca(mut self, ca: Option<&std::path::Path>) -> Result<Target, String> {
        if !self.secure {
            return Ok(self);
        }
        use rustls::pki_types::pem::PemObject;
        let ca = ca.ok_or("a wss:// URL needs --ca FILE (the PEM certificate the server's chain leads to)")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?
        {
            roots
                .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        self.tls = Some(Arc::new(config));
        Ok(self)
    }

    /// The name the server's certificate must carry: the URL's host.
    fn server_name(&self) -> Result<rustls::pki_types::ServerName<'static>, String> {
        let host = match self.host.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => self.host.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))
    }
}

/// Why a connection attempt failed, as the summary reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    Refused,
    Timeout,
    /// The server answered with a status other than 101, or a bad accept key.
    Non101,
    /// The connection was reset or closed during the handshake.
    Reset,
    /// Local resources: no free port or descriptor on the source address.
    Local,
    Other,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Failure::Refused => "refused",
            Failure::Timeout => "timeout",
            Failure::Non101 => "non-101",
            Failure::Reset => "reset",
            Failure::Local => "local",
            Failure::Other => "other",
        })
    }
}

fn classify(e: &io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Failure::Refused,
        io::ErrorKind::TimedOut => Failure::Timeout,
        io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe => Failure::Reset,
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable => Failure::Local,
        _ if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE) => Failure::Local,
        _ => Failure::Other,
    }
}

/// A connection failure with what the user needs to act on it.
#[derive(Debug)]
pub struct ConnectError {
    pub failure: Failure,
    pub detail: String,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.failure, self.detail)
    }
}

fn io_fail(e: io::Error) -> ConnectError {
    ConnectError {
        failure: classify(&e),
        detail: e.to_string(),
    }
}

/// A write that makes no progress this long means the server stopped reading.
const WRITE_STALL: Duration = Duration::from_secs(5);

/// Most bytes a connection may have queued and unsent.
const MAX_QUEUED_BYTES: usize = 4 << 20;

fn stalled() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the server took no data for {WRITE_STALL:?}"),
    )
}

const READER_LIMITS: Limits = Limits {
    max_frame_bytes: 1 << 30,
    max_message_bytes: 1 << 30,
};

/// What `--deflate` offers: what sluice's `shared` mode agrees to.
const DEFLATE_OFFER: &str =
    "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n";

/// What `--deflate --deflate-takeover` offers: the extension, context
/// takeover left to the server (as browsers offer it).
const TAKEOVER_OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

/// Of a compressed message, only this much is inflated: the harness reads
/// its stamps at the start, and inflating all of every message would make
/// the client, not the server, the limit.
const INFLATED_PREFIX_BYTES: usize = 256;

thread_local! {
    /// The thread's compressor and inflater (no context takeover: every
    /// message stands alone, so one serves every connection).
    static DEFLATER: std::cell::RefCell<Option<Deflater>> = const { std::cell::RefCell::new(None) };
    static INFLATER: std::rc::Rc<std::cell::RefCell<Inflater>> =
        std::rc::Rc::new(std::cell::RefCell::new(Inflater::prefix_only(INFLATED_PREFIX_BYTES)));
}

/// Appends `payload` compressed (RFC 7692 7.2.1) to `out`.
pub fn compress(payload: &[u8], out: &mut Vec<u8>) {
    DEFLATER.with_borrow_mut(|deflater| {
        deflater
            .get_or_insert_with(|| Deflater::new(6, 15))
            .compress(payload, out, false)
    });
}

/// Read buffer growth step, and the most a single read takes.
const READ_BYTES: usize = 64 * 1024;

pub struct Client {
    stream: TcpStream,
    /// A `wss://` connection's TLS state: everything below speaks
    /// plaintext to it and it speaks ciphertext to the socket.
    tls: Option<Box<rustls::ClientConnection>>,
    reader: MessageReader,
    /// Received bytes not yet decoded (a partial frame).
    inbox: Vec<u8>,
    /// Bytes queued for the socket; the first `outbox_sent` are sent.
    outbox: Vec<u8>,
    outbox_sent: usize,
    /// Since when `try_send` has left bytes queued without sending any.
    stalled_since: Option<Instant>,
    /// The close frame the server sent, if it did (code, reason).
    server_close: Option<String>,
    /// Compressed messages are inflated by this (`--deflate`): the
    /// thread's one, which stays in cache from one message to the next.
    inflater: Option<std::rc::Rc<std::cell::RefCell<Inflater>>>,
}

/// A small xorshift generator: masking keys and handshake nonces need to be
/// unpredictable to intermediaries, not cryptographically strong.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos());
        Rng((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ nanos as u64) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

impl Client {
    /// Connects from `source` (any port) and completes the handshake within
    /// `timeout`. Returns the client and the time from connect to the 101.
    pub async fn connect(
        target: &Target,
        source: Option<IpAddr>,
        timeout: Duration,
        rng: &mut Rng,
    ) -> Result<(Client, Duration), ConnectError> {
        let start = Instant::now();
        let attempt = Self::connect_inner(target, source, rng);
        match monoio::time::timeout(timeout, attempt).await {
            Ok(Ok(client)) => Ok((client, start.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnectError {
                failure: Failure::Timeout,
                detail: format!("no 101 within {timeout:?}"),
            }),
        }
    }

    async fn connect_inner(target: &Target, source: Option<IpAddr>, rng: &mut Rng) -> Result<Client, ConnectError> {
        let domain = socket2::Domain::for_address(target.addr);
        let sock =
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP)).map_err(io_fail)?;
        sock.set_nonblocking(true).map_err(io_fail)?;
        sock.set_nodelay(true).map_err(io_fail)?;
        if let Some(ip) = source {
            // IP_BIND_ADDRESS_NO_PORT: take the port at connect time, per
            // destination, so one source address serves more than 28k
            // connections across targets and bind(2) does not exhaust ports.
            let _ = sock_bind_no_port(&sock);
            sock.bind(&SocketAddr::new(ip, 0).into()).map_err(io_fail)?;
        }
        match sock.connect(&target.addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(io_fail(e)),
        }
        // SAFETY: `into_raw_fd` hands over sole ownership of a valid socket fd.
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(sock.into_raw_fd()) };
        let stream = TcpStream::from_std(std_stream).map_err(io_fail)?;
        stream.writable(false).await.map_err(io_fail)?;
        if let Some(e) = socket2::SockRef::from(&BorrowedStream(&stream))
            .take_error()
            .map_err(io_fail)?
        {
            return Err(io_fail(e));
        }
        let tls = match &target.tls {
            Some(config) => {
                let name = target.server_name().map_err(|detail| ConnectError {
                    failure: Failure::Other,
                    detail,
                })?;
                let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| ConnectError {
                    failure: Failure::Other,
                    detail: e.to_string(),
                })?;
                Some(Box::new(conn))
            }
            None => None,
        };
        let mut client = Client {
            stream,
            tls,
            reader: MessageReader::new(Role::Client, READER_LIMITS),
            inbox: Vec::new(),
            outbox: Vec::new(),
            outbox_sent: 0,
            stalled_since: None,
            server_close: None,
            inflater: None,
        };
        client.handshake(target, rng).await?;
        Ok(client)
    }

    async fn handshake(&mut self, target: &Target, rng: &mut Rng) -> Result<(), ConnectError> {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        nonce[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
        let key = BASE64.encode(nonce);
        let offer = match (target.deflate, target.deflate_takeover) {
            (false, _) => "",
            (true, false) => DEFLATE_OFFER,
            (true, true) => TAKEOVER_OFFER,
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
            target.path, target.host
        );
        self.outbox.extend_from_slice(request.as_bytes());
        self.flush().await.map_err(io_fail)?;
        loop {
            if self.recv().await.map_err(io_fail)? == 0 {
                return Err(ConnectError {
                    failure: Failure::Reset,
                    detail: "closed during the handshake".into(),
                });
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            let head_len = match response.parse(&self.inbox) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if self.inbox.len() < 16 * 1024 => continue,
                _ => {
                    return Err(ConnectError {
                        failure: Failure::Non101,
                        detail: "malformed HTTP response".into(),
                    })
                }
            };
            let status = response.code.unwrap_or(0);
            if status != 101 {
                let reason = response.reason.unwrap_or("").to_string();
                return Err(ConnectError {
                    failure: Failure::Non101,
                    detail: format!("HTTP {status} {reason}"),
                });
            }
            let expected = handshake::accept_key(key.as_bytes());
            let accepted = response
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == expected);
            if !accepted {
                return Err(ConnectError {
                    failure: Failure::Non101,
                    detail: "wrong Sec-WebSocket-Accept".into(),
                });
            }
            if target.deflate {
                let agreed = response.headers.iter().find_map(|h| {
                    let v = std::str::from_utf8(h.value).ok()?;
                    (h.name.eq_ignore_ascii_case("sec-websocket-extensions") && v.starts_with("permessage-deflate"))
                        .then_some(v)
                });
                let takeover = agreed.is_some_and(|v| !v.contains("server_no_context_takeover"));
                if agreed.is_none() || (takeover && !target.deflate_takeover) {
                    return Err(ConnectError {
                        failure: Failure::Non101,
                        detail: "the server declined permessage-deflate without context takeover".into(),
                    });
                }
                let reader = std::mem::replace(&mut self.reader, MessageReader::new(Role::Client, READER_LIMITS));
                self.reader = reader.with_deflate(takeover);
                self.inflater = Some(match takeover {
                    // Its messages refer back into the ones before: all
                    // of each is inflated, in order, by its own.
                    true => std::rc::Rc::new(std::cell::RefCell::new(Inflater::default())),
                    false => INFLATER.with(|i| i.clone()),
                });
            }
            // Frames may already follow the response.
            self.inbox.drain(..head_len);
            return Ok(());
        }
    }

    /// Queues bytes (already framed and masked) for the next flush.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.outbox.extend_from_slice(bytes);
    }

    /// Whether bytes wait to be sent (TLS: also ciphertext).
    pub fn has_queued(&self) -> bool {
        self.outbox.len() > self.outbox_sent || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// TLS: hands the queued plaintext to rustls as far as its buffer takes
    /// it, and writes its ciphertext as far as the socket takes it.
    /// Returns the plaintext bytes taken.
    fn tls_send(&mut self) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(0);
        };
        let mut taken = 0;
        loop {
            if self.outbox_sent < self.outbox.len() {
                let n = std::io::Write::write(&mut tls.writer(), &self.outbox[self.outbox_sent..])?;
                self.outbox_sent += n;
                taken += n;
            }
            let mut wrote = false;
            while tls.wants_write() {
                match tls.write_tls(&mut FdIo(self.stream.as_raw_fd())) {
                    Ok(_) => wrote = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if self.outbox_sent == self.outbox.len() || !wrote || tls.wants_write() {
                break;
            }
        }
        if self.outbox_sent == self.outbox.len() {
            self.outbox.clear();
            self.outbox_sent = 0;
        }
        Ok(taken)
    }

    /// TLS: reads what the socket has (at most `READ_BYTES`), lets rustls
    /// process it, and appends the plaintext to the inbox. `Ok(Some(0))`
    /// at the end of the stream (close_notify or FIN).
    fn tls_recv(&mut self) -> io::Result<Option<usize>> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(None);
        };
        let before = self.inbox.len();
        let mut read = 0;
        let mut eof = false;
        let mut chunk = [0u8; 16 * 1024];
        while read < READ_BYTES && !eof {
            match tls.read_tls(&mut FdIo(self.stream.as_raw_fd())) {
                Ok(0) => eof = true,
                Ok(n) => {
                    read += n;
                    tls.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
            // Take the plaintext after every read: rustls holds only so much.
            loop {
                match std::io::Read::read(&mut tls.reader(), &mut chunk) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => self.inbox.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        eof = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        // Handshake answers and key updates go out at once.
        self.tls_send()?;
        match self.inbox.len() - before {
            0 if eof => Ok(Some(0)),
            0 => Ok(None),
            n => Ok(Some(n)),
        }
    }

    /// The queue itself, for callers that frame in place.
    pub fn outbox(&mut self) -> &mut Vec<u8> {
        &mut self.outbox
    }

    /// Writes everything queued, failing if the server takes none of it for
    /// `WRITE_STALL` (it stopped reading): no write waits without a bound.
    pub async fn flush(&mut self) -> io::Result<()> {
        match monoio::time::timeout(WRITE_STALL, self.write_queued()).await {
            Ok(result) => result,
            Err(_) => Err(stalled()),
        }
    }

    /// Writes everything queued, with no bound of its own: the caller bounds
    /// it (echo wraps it in its thread's deadline, which costs no timer per
    /// write). An owned-buffer write: with io_uring a SEND in the ring.
    pub async fn write_queued(&mut self) -> io::Result<()> {
        if self.tls.is_some() {
            loop {
                self.tls_send()?;
                if !self.has_queued() {
                    return Ok(());
                }
                self.stream.writable(false).await?;
            }
        }
        self.outbox.drain(..std::mem::take(&mut self.outbox_sent));
        if self.outbox.is_empty() {
            return Ok(());
        }
        let (result, mut buf) = self.stream.write_all(std::mem::take(&mut self.outbox)).await;
        buf.clear();
        self.outbox = buf;
        result.map(|_| ())
    }

    /// Sends what the socket takes now and keeps the rest queued. Fails
    /// when the server has taken nothing for `WRITE_STALL`, or when more than
    /// `MAX_QUEUED_BYTES` wait: an open-loop sender must not queue without
    /// a bound behind a server that stopped reading.
    pub fn try_send(&mut self) -> io::Result<()> {
        let mut sent = 0;
        if self.tls.is_some() {
            sent = self.tls_send()?;
        }
        while self.tls.is_none() && self.outbox_sent < self.outbox.len() {
            match Socket::new(&self.stream).send(&self.outbox[self.outbox_sent..]) {
                Ok(n) => {
                    sent += n;
                    self.outbox_sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.outbox_sent == self.outbox.len() {
            self.outbox.clear();
            self.outbox_sent = 0;
        } else if self.outbox_sent > self.outbox.len() / 2 {
            // Behind a slow reader the queue can be megabytes: move the
            // unsent rest to the front only once half of it is sent.
            self.outbox.drain(..std::mem::take(&mut self.outbox_sent));
        }
        let queued = self.outbox.len() - self.outbox_sent;
        if queued == 0 || sent > 0 {
            self.stalled_since = None;
        } else if self.stalled_since.get_or_insert_with(Instant::now).elapsed() >= WRITE_STALL {
            return Err(stalled());
        }
        if queued > MAX_QUEUED_BYTES {
            return Err(io::Error::other(format!(
                "{queued} bytes wait to be sent: the server reads slower than this connection writes"
            )));
        }
        Ok(())
    }

    /// Waits for data and reads what is there; returns bytes read (0 at end
    /// of stream). An owned-buffer read: with io_uring a RECV operation.
    pub async fn recv(&mut self) -> io::Result<usize> {
        if self.tls.is_some() {
            loop {
                if let Some(n) = self.tls_recv()? {
                    return Ok(n);
                }
                if self.tls.as_ref().is_some_and(|t| t.wants_write()) {
                    self.stream.writable(false).await?;
                    self.tls_send()?;
                } else {
                    self.stream.readable(false).await?;
                }
            }
        }
        let len = self.inbox.len();
        if self.inbox.capacity() - len < READ_BYTES / 4 {
            self.inbox.reserve(READ_BYTES);
        }
        let cap = self.inbox.capacity();
        let (result, slice) = self
            .stream
            .read(std::mem::take(&mut self.inbox).slice_mut(len..cap))
            .await;
        self.inbox = slice.into_inner();
        result
    }

    /// Reads what is there without waiting. `Ok(Some(0))` is end of stream.
    pub fn try_recv(&mut self) -> io::Result<Option<usize>> {
        if self.tls.is_some() {
            return self.tls_recv();
        }
        match Socket::new(&self.stream).recv_into(&mut self.inbox, READ_BYTES) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Some(0)),
            Err(e) => Err(e),
        }
    }

    /// Asks the kernel to stamp each received segment with its arrival time
    /// (SO_TIMESTAMPNS), read back by `try_recv_stamped`.
    pub fn enable_arrival_stamps(&self) -> io::Result<()> {
        // SAFETY: the stream's open socket, borrowed for this call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.stream.as_raw_fd()) };
        set_int_option(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
    }

    /// As `try_recv`, and also when the last segment read reached the socket
    /// (CLOCK_REALTIME nanoseconds, if stamps are enabled): every message
    /// complete after this read had arrived by then.
    pub fn try_recv_stamped(&mut self) -> io::Result<(Option<usize>, Option<u64>)> {
        if self.tls.is_some() {
            // A segment's arrival says nothing of when its record completed.
            return Ok((self.tls_recv()?, None));
        }
        self.inbox.reserve(READ_BYTES);
        let spare = self.inbox.spare_capacity_mut();
        let room = spare.len().min(READ_BYTES);
        let mut iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: room,
        };
        // Room for one timespec control message, aligned for cmsghdr.
        let mut control = [0u64; 8];
        // SAFETY: an all-zero msghdr is valid; the pointers set below stay
        // valid for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: the iovec points at `room` bytes of the inbox's spare
        // capacity, and the control buffer at `control`.
        let n = unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok((None, None)),
                _ => Err(e),
            };
        }
        // SAFETY: recvmsg initialised the first `n <= room` bytes.
        unsafe { self.inbox.set_len(self.inbox.len() + n as usize) };
        let mut stamp = None;
        // SAFETY: walking the control messages recvmsg wrote into `control`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                    stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok((Some(n as usize), stamp))
    }

    /// Decodes every complete frame received so far, calling `on_event` for
    /// each. Pings are answered with pongs and a server's close with a close
    /// (queued; flush to send). Returns an error on a protocol violation by
    /// the server, or once the server has sent a close.
    pub fn drain_events(&mut self, mask: [u8; 4], mut on_event: impl FnMut(&Event<'_>)) -> Result<(), String> {
        let mut pos = 0;
        let mut replies: Vec<(sluice::ws::Opcode, Vec<u8>)> = Vec::new();
        loop {
            let mut inflater = self.inflater.as_ref().map(|i| i.borrow_mut());
            let step = match inflater.as_deref_mut() {
                Some(inflater) => self.reader.read_inflating(&mut self.inbox[pos..], inflater),
                None => self.reader.read(&mut self.inbox[pos..]),
            };
            match step {
                Ok(Step::Need { .. }) => break,
                Ok(Step::Fragment(n)) => pos += n,
                Ok(Step::Event(event, n)) => {
                    pos += n;
                    match &event {
                        // RFC 6455 5.5.3: a pong echoes the ping's payload.
                        Event::Ping(payload) => replies.push((sluice::ws::Opcode::Pong, payload.to_vec())),
                        // RFC 6455 5.5.1: answer a close with a close.
                        Event::Close(c) if self.server_close.is_none() => {
                            let code = c.code.unwrap_or(sluice::ws::CloseCode::NO_STATUS);
                            self.server_close = Some(format!("{} {:?}", code, c.reason));
                            let (payload, n) = sluice::ws::close::payload(code, "");
                            let payload = if c.code.is_some() {
                                payload[..n].to_vec()
                            } else {
                                Vec::new()
                            };
                            replies.push((sluice::ws::Opcode::Close, payload));
                        }
                        _ => {}
                    }
                    on_event(&event);
                }
                Err(v) => return Err(format!("server broke RFC 6455: {} ({})", v.reason, v.code)),
            }
        }
        self.inbox.drain(..pos);
        for (opcode, payload) in replies {
            sluice::ws::frame::encode_frame(&mut self.outbox, true, opcode, Some(mask), &payload);
        }
        match &self.server_close {
            Some(close) => Err(format!("server sent close {close}")),
            None => Ok(()),
        }
    }

    /// Sends a close 1000 and waits (bounded) for the server's close frame,
    /// then for the server to close the TCP connection: RFC 6455 7.1.1 has
    /// the server close first, so that the server, not the client, holds
    /// the TIME_WAIT state. A client that closed at once would race the
    /// server's FIN and end in TIME_WAIT itself, which makes later connects
    /// from the same addresses slower.
    pub async fn close(mut self, mask: [u8; 4], wait: Duration) -> bool {
        if self.server_close.is_some() {
            return false;
        }
        let (payload, n) = sluice::ws::close::payload(sluice::ws::CloseCode::NORMAL, "");
        sluice::ws::frame::encode_frame(
            &mut self.outbox,
            true,
            sluice::ws::Opcode::Close,
            Some(mask),
            &payload[..n],
        );
        if self.flush().await.is_err() {
            return false;
        }
        let closed = async {
            loop {
                match self.recv().await {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                }
                let mut got_close = false;
                let drained = self.drain_events(mask, |e| got_close |= matches!(e, Event::Close(_)));
                if got_close {
                    break;
                }
                if drained.is_err() {
                    return false;
                }
            }
            // The close handshake is done; what follows is the server's FIN.
            loop {
                match self.recv().await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => self.inbox.clear(),
                }
            }
        };
        matches!(monoio::time::timeout(wait, closed).await, Ok(true))
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// Non-blocking reads and writes on a socket, for rustls's `read_tls` and
/// `write_tls`.
struct FdIo(std::os::fd::RawFd);

impl std::io::Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv(2) into `buf`, on a socket the client owns.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl std::io::Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: send(2) from `buf`, on a socket the client owns.
        let n = unsafe {
            libc::send(
                self.0,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct BorrowedStream<'a>(&'a TcpStream);

impl std::os::fd::AsFd for BorrowedStream<'_> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the stream is borrowed for the lifetime of the BorrowedFd.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

fn sock_bind_no_port(sock: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on our own socket with a valid int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
