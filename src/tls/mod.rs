//! TLS for `wss://` (RFC 8446, RFC 5246 with rustls), built so that an idle
//! TLS connection costs little more than a plain one.
//!
//! rustls's unbuffered API runs the handshake, and leaves every buffer to
//! us; once it is done, rustls hands the keys over and `records` seals and
//! opens the records itself:
//! - Ciphertext is read into the caller's buffer (the core's scratch) and
//!   opened there: the cipher's pass moves each record's plaintext down
//!   over the headers, so the WebSocket code takes it as it takes plain
//!   bytes, with no copy. Only a partial record at the end of a read is
//!   kept by the connection (`leftover`), and only until it completes.
//! - Plaintext is gathered into records in the core's output buffer,
//!   sealed there and written at once; only what the socket did not take
//!   is kept (`pending`), and no more plaintext is taken until it is
//!   written.
//!
//! So an idle connection holds its keys alone, where a buffered TLS stream
//! holds two 16 KiB buffers.
//!
//! The certificate is behind `CertResolver`, which `reload` replaces (on
//! SIGHUP): new handshakes take the new one, open connections are untouched.

use std::cell::RefCell;
use std::io;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{AppDataRecord, ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use socket2::SockRef;

mod records;

use records::{Fatal, Records, APPLICATION_DATA, CLOSE_NOTIFY, MAX_PLAIN};

/// Largest TLS record the peer may send: 2^14 plaintext plus 2048 of
/// expansion (RFC 5246 6.2.3), plus its 5-byte header.
pub const MAX_RECORD_BYTES: usize = 16_384 + 2_048 + 5;

/// Incomplete handshake data kept between reads, at most: what rustls's
/// own buffered connections allow (a handshake message may span records,
/// and rustls joins them only once it is whole).
const MAX_HANDSHAKE_LEFTOVER: usize = 64 * 1024;

/// Plaintext one `send_vectored` takes, at most: four whole records.
const PLAIN_PER_SEND: usize = 4 * MAX_PLAIN;

/// The core's output buffer: 64 KiB of plaintext in records, and a key
/// update before them.
const OUT_BYTES: usize = PLAIN_PER_SEND + 1024;

/// Ciphertext one read takes at least, whatever plaintext the caller asked
/// for: a smaller read would cut records short, and each partial record is
/// copied out and back in. The plaintext may then pass the caller's `max`
/// by up to this much.
const READ_FLOOR: usize = 64 * 1024;

/// Rounds of `process_tls_records` one call may run; far above what any
/// read needs, so only a library fault could reach it.
const MAX_ROUNDS: usize = 100_000;

thread_local! {
    /// The core's ciphertext input in the handshake: a leftover plus one read.
    static TLS_IN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The core's ciphertext output.
    static TLS_OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The PEM files of the certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// Reads and checks both files: the chain parses, the key parses and
    /// matches the first certificate.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, String> {
        let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
        let chain = CertificateDer::pem_slice_iter(&read(&self.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", self.cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no certificate in it", self.cert.display()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(&read(&self.key)?).map_err(|e| format!("{}: {e}", self.key.display()))?;
        let key = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| format!("{} and {}: {e}", self.cert.display(), self.key.display()))?;
        Ok(Arc::new(key))
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The certificate every handshake is answered with, replaceable while
/// the server runs.
#[derive(Debug)]
pub struct CertResolver {
    files: CertFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    pub fn new(files: CertFiles) -> Result<CertResolver, String> {
        let current = RwLock::new(files.load()?);
        Ok(CertResolver { files, current })
    }

    /// Loads the files again; on any error the current certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = self.files.load()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The server's TLS settings: TLS 1.3 and 1.2, no client certificates,
/// ALPN `http/1.1` (a client that offers only other protocols is refused,
/// RFC 7301 3.2), stateless session tickets (no cache shared by cores),
/// no early data.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    config.max_early_data_size = 0;
    // The keys go to `records` once the handshake is done.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// One connection's TLS state.
pub struct TlsSession {
    stage: Stage,
    /// The start of a record not yet complete (empty, unallocated, when idle).
    leftover: Vec<u8>,
    /// In the handshake: where in `leftover` the first record rustls was
    /// not given whole starts. The records before it are not walked again:
    /// rustls moves the fragments of a message it joins down over their
    /// headers, and a partial record it leaves as it is.
    given: usize,
    /// Ciphertext the socket did not take yet.
    pending: Vec<u8>,
    /// We sent close_notify (or a fatal alert): nothing more may be encrypted.
    closed: bool,
    /// The peer sent close_notify.
    peer_closed: bool,
    /// What the last `recv_into` found of the socket's bytes.
    left: Left,
}

// The traffic stage is the one that lasts, and the session is one heap
// allocation already (`sys::socket::Tls`): boxing it would add another.
#[allow(clippy::large_enum_variant)]
enum Stage {
    /// rustls runs the handshake (and its records).
    Handshake(UnbufferedServerConnection),
    /// The handshake is done: our record layer, on the keys rustls handed over.
    Traffic(Records),
    /// The keys could not be handed over; nothing more is read or written.
    Failed,
}

impl TlsSession {
    pub fn new(config: Arc<ServerConfig>) -> io::Result<TlsSession> {
        let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        Ok(TlsSession {
            stage: Stage::Handshake(conn),
            leftover: Vec::new(),
            given: 0,
            pending: Vec::new(),
            closed: false,
            peer_closed: false,
            left: Left::Unknown,
        })
    }

    pub fn is_handshaking(&self) -> bool {
        match &self.stage {
            Stage::Handshake(conn) => conn.is_handshaking(),
            Stage::Traffic(_) | Stage::Failed => false,
        }
    }

    /// What the last `recv_into` found of the socket's bytes.
    pub fn left(&self) -> Left {
        self.left
    }

    /// Ciphertext is waiting for the socket.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Reads at most `max` bytes of ciphertext (at least `READ_FLOOR`), runs the handshake or
    /// decrypts, and appends the plaintext to `plain`. `Ok(Some(n))`: `n >
    /// 0` plaintext bytes; `Ok(None)`: none yet (wait for readiness, and
    /// for writability if `has_pending`). The peer's close_notify or end
    /// of stream is `UnexpectedEof`; a TLS error is `InvalidData`, after
    /// its alert was sent if the socket took it.
    pub fn recv_into(&mut self, fd: BorrowedFd<'_>, plain: &mut Vec<u8>, max: usize) -> io::Result<Option<usize>> {
        self.left = Left::Unknown;
        if self.peer_closed {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let before = plain.len();
        let read = match self.stage {
            Stage::Handshake(_) => self.recv_handshake(fd, plain, max),
            // An empty buffer (the core's scratch) takes the ciphertext and
            // keeps the plaintext where it was opened. One that holds bytes
            // already (a connection's partial frame) is not grown by a
            // whole read: the records are opened in the core's input
            // buffer and only their plaintext is appended.
            Stage::Traffic(_) if plain.is_empty() => self.recv_records(fd, plain, max),
            Stage::Traffic(_) => TLS_IN.with_borrow_mut(|incoming| {
                incoming.clear();
                let read = self.recv_records(fd, incoming, max);
                plain.extend_from_slice(incoming);
                read
            }),
            Stage::Failed => Err(io::ErrorKind::BrokenPipe.into()),
        };
        self.flush_pending(fd)?;
        read?;
        match plain.len() - before {
            0 if self.peer_closed => Err(io::ErrorKind::UnexpectedEof.into()),
            0 => Ok(None),
            n => Ok(Some(n)),
        }
    }

    /// Reads ciphertext straight into `plain`, behind the leftover, and
    /// opens the whole records there.
    fn recv_records(&mut self, fd: BorrowedFd<'_>, plain: &mut Vec<u8>, max: usize) -> io::Result<()> {
        let from = plain.len();
        plain.reserve(self.leftover.len() + max.max(READ_FLOOR));
        plain.extend_from_slice(&self.leftover);
        match recv_behind(fd, plain, max, &mut self.left) {
            Ok(Some(0)) => self.peer_closed = true,
            Ok(Some(_)) => {}
            Ok(None) => {
                plain.truncate(from);
                return Ok(());
            }
            Err(e) => {
                plain.truncate(from);
                return Err(e);
            }
        }
        self.open_records(plain, from)
    }

    /// Opens the records in `plain[from..]`: their plaintext stays there,
    /// an incomplete record at the end goes to `leftover`.
    fn open_records(&mut self, plain: &mut Vec<u8>, from: usize) -> io::Result<()> {
        let Stage::Traffic(records) = &mut self.stage else {
            plain.truncate(from);
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        let opened = match records.open(plain, from) {
            Ok(opened) => opened,
            Err(fatal) => {
                plain.truncate(from);
                return Err(self.fail(fatal));
            }
        };
        // What is kept is one incomplete record: `open` refuses a longer
        // one as soon as its header is in.
        keep(&mut self.leftover, &plain[opened.rest..]);
        plain.truncate(opened.plain_end);
        if opened.peer_closed {
            self.peer_closed = true;
        }
        if !self.closed {
            if let Err(fatal) = records.answer_key_update(&mut self.pending) {
                return Err(self.fail(fatal));
            }
        }
        Ok(())
    }

    /// Ends the connection on a TLS error: its alert (if it has one) is
    /// queued, and nothing is encrypted after it.
    fn fail(&mut self, fatal: Fatal) -> io::Error {
        if let (Stage::Traffic(records), Some(alert), false) = (&mut self.stage, fatal.alert, self.closed) {
            let _ = records.seal_alert(&mut self.pending, alert);
        }
        self.closed = true;
        io::Error::new(io::ErrorKind::InvalidData, fatal.reason)
    }

    /// The handshake's reads: ciphertext goes to the core's input buffer,
    /// and rustls runs it. Once the handshake is done the keys go to
    /// `records`, which opens whatever came behind it.
    fn recv_handshake(&mut self, fd: BorrowedFd<'_>, plain: &mut Vec<u8>, max: usize) -> io::Result<()> {
        TLS_IN.with_borrow_mut(|incoming| -> io::Result<()> {
            incoming.clear();
            incoming.extend_from_slice(&self.leftover);
            let seen = self.given;
            let eof = match recv_behind(fd, incoming, max, &mut self.left)? {
                Some(n) => n == 0,
                None => return Ok(()),
            };
            let (rest, given) = self.process(incoming, seen, plain)?;
            if eof {
                self.peer_closed = true;
            }
            if !self.is_handshaking() && !self.peer_closed {
                self.hand_over()?;
                // Records behind the handshake's last one are ours now.
                let from = plain.len();
                plain.extend_from_slice(&incoming[rest..]);
                return self.open_records(plain, from);
            }
            let left = incoming.len() - rest;
            // What is kept is one incomplete record, or (in the handshake) a
            // handshake message whose records rustls joins only once it is
            // whole. A peer that sends more without completing either (tiny
            // fragment records, say) is refused: it would hold memory, and
            // every read would copy it again.
            if left > MAX_HANDSHAKE_LEFTOVER {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{left} bytes of TLS records pending, over {MAX_HANDSHAKE_LEFTOVER}"),
                ));
            }
            // Kept for the next read: the one copy of the read's leftover.
            keep(&mut self.leftover, &incoming[rest..]);
            self.given = given.saturating_sub(rest);
            Ok(())
        })
    }

    /// Takes the keys from rustls, whose handshake is done and whose
    /// answers are all in `pending`.
    fn hand_over(&mut self) -> io::Result<()> {
        let Stage::Handshake(conn) = std::mem::replace(&mut self.stage, Stage::Failed) else {
            return Ok(());
        };
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(io::Error::other)?;
        let records = Records::new(secrets, kernel).map_err(|fatal| io::Error::other(fatal.reason))?;
        self.stage = Stage::Traffic(records);
        Ok(())
    }

    /// Runs the records in `incoming` (`process_tls_records` until it
    /// needs more bytes): handshake messages are answered into `pending`,
    /// application data goes to `plain`. Returns where the records rustls
    /// did not take start. What rustls is done with is skipped, not moved:
    /// rustls yields a state per record, and moving the rest of the buffer
    /// after each would cost a read of many small records its length
    /// squared.
    ///
    /// rustls is given one record more at a time, and none once the
    /// handshake is done: it would otherwise go on past the client's
    /// Finished, and what it did with the records behind it (answer a key
    /// update, hold part of a message) would be lost when the keys are
    /// handed over. Those records are `Records`'s.
    ///
    /// rustls keeps offsets into what it was given (the parts of a
    /// handshake message it joins): each call gives it at least that
    /// again. `seen` is the leftover it saw in the last read, which
    /// `incoming` starts with.
    fn process(&mut self, incoming: &mut [u8], seen: usize, plain: &mut Vec<u8>) -> io::Result<(usize, usize)> {
        let Stage::Handshake(conn) = &mut self.stage else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        let mut start = 0;
        // `seen` is where the first record not given whole starts.
        let mut at = seen;
        let mut end = next_record_end(incoming, at);
        refuse_unsealable(incoming, at)?;
        for _ in 0..MAX_ROUNDS {
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut incoming[start..end]);
            let mut wants_more = false;
            match state {
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(record) = traffic.next_record() {
                        let AppDataRecord { discard: d, payload } = record.map_err(invalid)?;
                        discard += d;
                        plain.extend_from_slice(payload);
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut self.pending, |out| encode.encode(out))?
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                Ok(ConnectionState::PeerClosed) => self.peer_closed = true,
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    return Ok((start + discard, given_to(incoming, at, end)));
                }
                // Every record given is taken.
                Ok(ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_)) => wants_more = true,
                Ok(_) => return Ok((start + discard, given_to(incoming, at, end))),
                Err(e) => {
                    // rustls keeps offsets into what it was given: the
                    // alert is taken from the same records, less its discard.
                    queue_alert(conn, &mut incoming[start + discard..end], &e, &mut self.pending);
                    return Err(invalid(e));
                }
            }
            start += discard;
            if !wants_more {
                continue;
            }
            if !conn.is_handshaking() {
                // rustls holds nothing of what it was given (the last
                // handshake message ends its record, RFC 8446 5.1).
                if start != end {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS handshake done with part of a record held",
                    ));
                }
                return Ok((start, end));
            }
            if end == incoming.len() {
                return Ok((start, given_to(incoming, at, end)));
            }
            refuse_unsealable(incoming, end)?;
            at = end;
            end = next_record_end(incoming, end);
        }
        Err(io::Error::other("TLS processing did not settle"))
    }

    /// Writes ciphertext that waited. `Ok(true)` once none is left.
    pub fn flush_pending(&mut self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        while !self.pending.is_empty() {
            match send(fd, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        // A burst's backlog is not kept for an idle connection.
        self.pending = Vec::new();
        Ok(true)
    }

    /// Seals as much of `frames` (in order) as one call takes (64 KiB)
    /// into records and writes them. Returns the plaintext bytes taken;
    /// what the socket did not take waits in `pending`, and until it is
    /// written no more plaintext is taken (`WouldBlock`).
    pub fn send_vectored(&mut self, fd: BorrowedFd<'_>, frames: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.flush_pending(fd)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        TLS_OUT.with_borrow_mut(|out| {
            out.clear();
            out.reserve(OUT_BYTES);
            let Stage::Traffic(records) = &mut self.stage else {
                return Err(io::ErrorKind::BrokenPipe.into());
            };
            let mut taken = 0;
            let sealed = seal_frames(records, frames, out, &mut taken);
            if let Err(fatal) = sealed {
                // The records sealed before it took sequence numbers: they
                // go out, then the alert.
                self.pending.extend_from_slice(out);
                let error = self.fail(fatal);
                let _ = self.flush_pending(fd);
                return Err(error);
            }
            // `flush_pending` emptied `pending`, and sealing writes only to
            // `out`: nothing queued can be overtaken.
            debug_assert!(self.pending.is_empty());
            let sent = match send(fd, out) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            self.pending.extend_from_slice(&out[sent..]);
            Ok(taken)
        })
    }

    pub fn send(&mut self, fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
        self.send_vectored(fd, &[IoSlice::new(bytes)])
    }

    /// Sends close_notify (RFC 8446 6.1) with whatever waits before it,
    /// as far as the socket takes it; nothing is encrypted after it.
    pub fn close_notify(&mut self, fd: BorrowedFd<'_>) {
        if self.closed {
            return;
        }
        let Stage::Traffic(records) = &mut self.stage else {
            return;
        };
        self.closed = true;
        if records.seal_alert(&mut self.pending, CLOSE_NOTIFY).is_ok() {
            let _ = self.flush_pending(fd);
        }
    }
}

/// Gathers `frames` (in order) into records in `out`, at most
/// `PLAIN_PER_SEND` of them, counting what it took in `taken`. Frames
/// smaller than a record (deliveries are many small parts) share one: one
/// seal and 22 bytes of overhead per 16 KiB, not per part. On an error
/// `out` holds the records sealed before it, whole.
fn seal_frames(
    records: &mut Records,
    frames: &[IoSlice<'_>],
    out: &mut Vec<u8>,
    taken: &mut usize,
) -> Result<(), Fatal> {
    let mut whole = out.len();
    let sealed = gather(records, frames, out, taken, &mut whole);
    if sealed.is_err() {
        out.truncate(whole);
    }
    sealed
}

fn gather(
    records: &mut Records,
    frames: &[IoSlice<'_>],
    out: &mut Vec<u8>,
    taken: &mut usize,
    whole: &mut usize,
) -> Result<(), Fatal> {
    let mut record: Option<(usize, usize)> = None;
    'frames: for frame in frames {
        let mut rest: &[u8] = frame;
        while !rest.is_empty() {
            if *taken == PLAIN_PER_SEND {
                break 'frames;
            }
            let (at, filled) = match record {
                Some(open) => open,
                None => {
                    records.update_key_if_due(out)?;
                    *whole = out.len();
                    (records.start(out), 0)
                }
            };
            let n = rest.len().min(MAX_PLAIN - filled).min(PLAIN_PER_SEND - *taken);
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            *taken += n;
            if filled + n == MAX_PLAIN {
                records.seal(out, at, APPLICATION_DATA)?;
                *whole = out.len();
                record = None;
            } else {
                record = Some((at, filled + n));
            }
        }
    }
    if let Some((at, _)) = record {
        records.seal(out, at, APPLICATION_DATA)?;
    }
    Ok(())
}

/// After an error in the handshake rustls has a fatal alert to send (after
/// what it queued before the error, a ServerHello say): queue them.
/// rustls is given the records it was last given, less its discard: its
/// deframer keeps offsets into them (an empty buffer panics it). An error
/// the deframer raised (a record it refused, which it would read and refuse
/// again, with a second alert) queued one alert and nothing else: one
/// chunk is taken then.
fn queue_alert(
    conn: &mut UnbufferedServerConnection,
    incoming: &mut [u8],
    error: &rustls::Error,
    pending: &mut Vec<u8>,
) {
    let deframer = matches!(
        error,
        rustls::Error::InvalidMessage(_) | rustls::Error::DecryptError | rustls::Error::PeerSentOversizedRecord
    );
    for _ in 0..16 {
        match conn.process_tls_records(incoming).state {
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                if encode_into(pending, |out| encode.encode(out)).is_err() || deframer {
                    return;
                }
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
            _ => return,
        }
    }
}

/// An application_data record too short to hold an AEAD tag and a
/// content type (RFC 8446 5.2) cannot be part of a handshake; rustls's
/// trial decryption (rejected early data) would skip it at no cost to its
/// budget, again on every call, as it skips every record it could not open.
fn refuse_unsealable(buf: &[u8], at: usize) -> io::Result<()> {
    match buf.get(at..at + 5) {
        Some(&[23, _, _, hi, lo]) if u16::from_be_bytes([hi, lo]) < 17 => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "an application_data record too short to be sealed, in the handshake",
        )),
        _ => Ok(()),
    }
}

/// Where the first record not given whole starts, the last one given
/// being at `at` and ending at `end`.
fn given_to(buf: &[u8], at: usize, end: usize) -> usize {
    if record_whole(buf, at) {
        end
    } else {
        at
    }
}

/// The record at `at` is all in `buf`.
fn record_whole(buf: &[u8], at: usize) -> bool {
    match buf.get(at..at + 5) {
        Some(&[_, _, _, hi, lo]) => at + 5 + usize::from(u16::from_be_bytes([hi, lo])) <= buf.len(),
        _ => false,
    }
}

/// Where the record at `at` ends, or the buffer's end if it is not whole
/// (rustls then waits for the rest, or refuses a header it cannot take).
fn next_record_end(buf: &[u8], at: usize) -> usize {
    match buf.get(at..at + 5) {
        Some(&[_, _, _, hi, lo]) => (at + 5 + usize::from(u16::from_be_bytes([hi, lo]))).min(buf.len()),
        _ => buf.len(),
    }
}

/// Appends what `encode` writes to `pending`, growing it as rustls asks.
fn encode_into(
    pending: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> io::Result<()> {
    let start = pending.len();
    let mut room = 4096;
    loop {
        pending.resize(start + room, 0);
        match encode(&mut pending[start..]) {
            Ok(n) => {
                pending.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(EncodeError::AlreadyEncoded) => {
                pending.truncate(start);
                return Ok(());
            }
        }
    }
}

/// Reads what the socket holds, without waiting, behind `buf`'s bytes:
/// at most `max` (at least `READ_FLOOR`). `Ok(None)` when it holds
/// nothing, `Ok(Some(0))` at its end. `left`: what the read found of the
/// socket's bytes (`recv_unread`).
fn recv_behind(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, max: usize, left: &mut Left) -> io::Result<Option<usize>> {
    let max = max.max(READ_FLOOR);
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let room = spare.len().min(max);
    match recv_unread(fd, &mut spare[..room]) {
        Ok((n, unread)) => {
            // SAFETY: recvmsg(2) initialised the first `n <= room` spare bytes.
            unsafe { buf.set_len(buf.len() + n) };
            *left = Left::after(n, unread);
            Ok(Some(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            *left = Left::NothingRead;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Keeps an incomplete record (or handshake message) for the next read,
/// and gives the memory back when there is none.
fn keep(leftover: &mut Vec<u8>, rest: &[u8]) {
    if rest.is_empty() {
        *leftover = Vec::new();
    } else {
        leftover.clear();
        leftover.extend_from_slice(rest);
    }
}

/// What a read found of the socket's bytes, for the epoll driver's next
/// wait (`conn::recv`, `conn::input`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// The kernel did not say (no read yet, or no `TCP_INQ`): bytes may be
    /// left, and the next wait may return at once to a read that finds
    /// nothing.
    Unknown,
    /// The kernel said nothing was left behind the bytes read: the next
    /// wait can sleep until new bytes come.
    Empty,
    /// The read found nothing (`EAGAIN`). That is no proof that the socket
    /// is empty: at a peer's urgent mark with a signal pending, TCP
    /// returns `EAGAIN` with bytes still queued behind the mark. The next
    /// wait asks the socket (`poll(2)` sees past the mark).
    NothingRead,
}

impl Left {
    /// After a read of `n > 0` bytes that left `unread` (the kernel's count).
    pub fn after(n: usize, unread: Option<usize>) -> Left {
        if n > 0 && unread == Some(0) {
            Left::Empty
        } else {
            Left::Unknown
        }
    }
}

/// Reads what the socket holds into `buf`, without waiting. Returns the
/// bytes read and, on a socket with `TCP_INQ` (`sys::socket::report_unread`),
/// the bytes the kernel left in it (`TCP_CM_INQ`; a received FIN counts as
/// one).
///
/// A read that returns less than it was given room for does not prove the
/// socket empty: TCP stops a read at the urgent mark of a peer's
/// `MSG_OOB`, with the bytes behind it still queued. Only this count does.
/// Plain sockets read through it too (`sys::socket`).
pub fn recv_unread(fd: BorrowedFd<'_>, buf: &mut [MaybeUninit<u8>]) -> io::Result<(usize, Option<usize>)> {
    // Room for one control message of an int, aligned for `cmsghdr`.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed is a valid `msghdr` (null name, no iovecs yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (the caller's writable `buf`) and at
    // `control`, both alive for the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // A control message did not fit: the count may be missing or cut.
        return Ok((n as usize, None));
    }
    let mut unread = None;
    // SAFETY: the kernel wrote `msg_controllen` bytes of whole control
    // messages into `control` (none was cut: no MSG_CTRUNC); the CMSG_*
    // walk stays inside them, and an int's data is read unaligned only
    // from a message long enough to hold it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let whole = (*cmsg).cmsg_len as usize >= libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
            if whole && (*cmsg).cmsg_level == libc::SOL_TCP && (*cmsg).cmsg_type == libc::TCP_CM_INQ {
                let left = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                unread = usize::try_from(left).ok();
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, unread))
}

fn send(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    SockRef::from(&fd).send_with_flags(bytes, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests;
