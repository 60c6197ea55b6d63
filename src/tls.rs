//! TLS for `wss://` (RFC 8446, RFC 5246 with rustls), built so that an idle
//! TLS connection costs little more than a plain one.
//!
//! rustls's unbuffered API leaves every buffer to us:
//! - Ciphertext is read into the core's input buffer (a thread-local: one
//!   per core), decrypted in place, and the plaintext is appended to the
//!   caller's buffer (the core's scratch), where the WebSocket code takes it
//!   as it takes plain bytes. Only a partial record at the end of a read is
//!   kept by the connection (`leftover`), and only until it completes.
//! - Plaintext is encrypted into the core's output buffer and written at
//!   once; only what the socket did not take is kept (`pending`), and no
//!   more plaintext is taken until it is written.
//!
//! So an idle connection holds the rustls state alone (keys, about 3.5 KiB),
//! where a buffered TLS stream holds two 16 KiB buffers.
//!
//! The certificate is behind `CertResolver`, which `reload` replaces (on
//! SIGHUP): new handshakes take the new one, open connections are untouched.

use std::cell::RefCell;
use std::io;
use std::io::IoSlice;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{
    AppDataRecord, ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use socket2::SockRef;

/// Largest TLS record the peer may send: 2^14 plaintext plus 2048 of
/// expansion (RFC 5246 6.2.3), plus its 5-byte header.
pub const MAX_RECORD_BYTES: usize = 16_384 + 2_048 + 5;

/// Incomplete handshake data kept between reads, at most: what rustls's
/// own buffered connections allow (a handshake message may span records,
/// and rustls joins them only once it is whole).
const MAX_HANDSHAKE_LEFTOVER: usize = 64 * 1024;

/// Plaintext encrypted per `WriteTraffic::encrypt` call: one record.
const PLAIN_CHUNK: usize = 16_384;

/// The core's output buffer: enough for 64 KiB of plaintext in records.
const OUT_BYTES: usize = 64 * 1024 + 4 * 256;

/// Ciphertext one read takes at least, whatever plaintext the caller asked
/// for: a smaller read would cut records short, and each partial record is
/// copied out and back in. The plaintext may then pass the caller's `max`
/// by up to this much.
const READ_FLOOR: usize = 64 * 1024;

/// Rounds of `process_tls_records` one call may run; far above what any
/// read needs, so only a library fault could reach it.
const MAX_ROUNDS: usize = 100_000;

thread_local! {
    /// The core's ciphertext input: a leftover plus one read.
    static TLS_IN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The core's ciphertext output.
    static TLS_OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Small frames gathered into one record's plaintext.
    static TLS_STAGE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
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
    Ok(Arc::new(config))
}

/// One connection's TLS state.
pub struct TlsSession {
    conn: UnbufferedServerConnection,
    /// The start of a record not yet complete (empty, unallocated, when idle).
    leftover: Vec<u8>,
    /// Ciphertext the socket did not take yet.
    pending: Vec<u8>,
    /// We sent close_notify: nothing more may be encrypted.
    closed: bool,
    /// The peer sent close_notify.
    peer_closed: bool,
}

impl TlsSession {
    pub fn new(config: Arc<ServerConfig>) -> io::Result<TlsSession> {
        let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        Ok(TlsSession {
            conn,
            leftover: Vec::new(),
            pending: Vec::new(),
            closed: false,
            peer_closed: false,
        })
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
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
        if self.peer_closed {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let before = plain.len();
        let read = TLS_IN.with_borrow_mut(|incoming| -> io::Result<()> {
            incoming.clear();
            incoming.extend_from_slice(&self.leftover);
            let max = max.max(READ_FLOOR);
            incoming.reserve(max);
            let spare = incoming.spare_capacity_mut();
            let room = spare.len().min(max);
            let eof = match SockRef::from(&fd).recv_with_flags(&mut spare[..room], libc::MSG_DONTWAIT) {
                Ok(0) => true,
                Ok(n) => {
                    // SAFETY: recv(2) initialised the first `n <= room` spare bytes.
                    unsafe { incoming.set_len(incoming.len() + n) };
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            let rest = self.process(incoming, plain)?;
            let left = incoming.len() - rest;
            // What is kept is one incomplete record, or (in the handshake) a
            // handshake message whose records rustls joins only once it is
            // whole. A peer that sends more without completing either (tiny
            // fragment records, say) is refused: it would hold memory, and
            // every read would copy it again.
            let most = if self.is_handshaking() {
                MAX_HANDSHAKE_LEFTOVER
            } else {
                MAX_RECORD_BYTES
            };
            if left > most {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{left} bytes of TLS records pending, over {most}"),
                ));
            }
            // Keep it for the next read (the one copy of the read's
            // leftover); give the memory back when there is none.
            if left == 0 {
                self.leftover = Vec::new();
            } else {
                self.leftover.clear();
                self.leftover.extend_from_slice(&incoming[rest..]);
            }
            if eof {
                self.peer_closed = true;
            }
            Ok(())
        });
        self.flush_pending(fd)?;
        read?;
        match plain.len() - before {
            0 if self.peer_closed => Err(io::ErrorKind::UnexpectedEof.into()),
            0 => Ok(None),
            n => Ok(Some(n)),
        }
    }

    /// Runs the records in `incoming` (`process_tls_records` until it
    /// needs more bytes): handshake messages are answered into `pending`,
    /// application data goes to `plain`. Returns where the records still
    /// incomplete start. What rustls is done with is skipped, not moved:
    /// rustls yields a state per record, and moving the rest of the buffer
    /// after each would cost a read of many small records its length
    /// squared.
    fn process(&mut self, incoming: &mut [u8], plain: &mut Vec<u8>) -> io::Result<usize> {
        let mut start = 0;
        for _ in 0..MAX_ROUNDS {
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(&mut incoming[start..]);
            let mut done = false;
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
                    done = true;
                }
                // Every whole record is taken: the rest (if any) is partial.
                Ok(ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_)) => done = true,
                Ok(_) => done = true,
                Err(e) => {
                    self.queue_alert();
                    return Err(invalid(e));
                }
            }
            start += discard;
            if done {
                return Ok(start);
            }
        }
        Err(io::Error::other("TLS processing did not settle"))
    }

    /// After an error rustls has a fatal alert to send: queue it.
    fn queue_alert(&mut self) {
        for _ in 0..8 {
            match self.conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if encode_into(&mut self.pending, |out| encode.encode(out)).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => return,
            }
        }
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

    /// Encrypts as much of `frames` (in order) as fits the core's output
    /// buffer and writes it. Returns the plaintext bytes taken; what the
    /// socket did not take waits in `pending`, and until it is written no
    /// more plaintext is taken (`WouldBlock`).
    pub fn send_vectored(&mut self, fd: BorrowedFd<'_>, frames: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.flush_pending(fd)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.closed || self.is_handshaking() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        TLS_OUT.with_borrow_mut(|out| {
            out.resize(OUT_BYTES, 0);
            let mut written = 0;
            let mut taken = 0;
            self.write_traffic(|w| {
                TLS_STAGE.with_borrow_mut(|stage| {
                    // Frames smaller than a record (deliveries are many small
                    // parts) are gathered into one record: one seal and 22
                    // bytes of overhead per 16 KiB, not per part.
                    let mut seal = |plain: &[u8]| match w.encrypt(plain, &mut out[written..]) {
                        Ok(n) => {
                            written += n;
                            taken += plain.len();
                            Ok(true)
                        }
                        Err(EncryptError::InsufficientSize(_)) => Ok(false),
                        Err(e) => Err(io::Error::other(e.to_string())),
                    };
                    stage.clear();
                    'frames: for (i, frame) in frames.iter().enumerate() {
                        let last = i + 1 == frames.len();
                        let mut rest: &[u8] = frame;
                        while !rest.is_empty() {
                            // A whole record's worth, or the last part with
                            // nothing staged before it, is sealed where it
                            // lies: staging it would copy it once more.
                            if stage.is_empty() && (rest.len() >= PLAIN_CHUNK || last) {
                                let n = rest.len().min(PLAIN_CHUNK);
                                if !seal(&rest[..n])? {
                                    break 'frames;
                                }
                                rest = &rest[n..];
                                continue;
                            }
                            let n = rest.len().min(PLAIN_CHUNK - stage.len());
                            stage.extend_from_slice(&rest[..n]);
                            rest = &rest[n..];
                            if stage.len() == PLAIN_CHUNK {
                                if !seal(stage)? {
                                    break 'frames;
                                }
                                stage.clear();
                            }
                        }
                    }
                    if !stage.is_empty() && seal(stage)? {
                        stage.clear();
                    }
                    Ok(())
                })
            })?;
            // A message rustls queued first (in `pending`) goes first.
            if !self.pending.is_empty() {
                self.pending.extend_from_slice(&out[..written]);
                self.flush_pending(fd)?;
                return Ok(taken);
            }
            let sent = match send(fd, &out[..written]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            self.pending.extend_from_slice(&out[sent..written]);
            Ok(taken)
        })
    }

    pub fn send(&mut self, fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
        self.send_vectored(fd, &[IoSlice::new(bytes)])
    }

    /// Sends close_notify (RFC 8446 6.1) with whatever waits before it,
    /// as far as the socket takes it; nothing is encrypted after it.
    pub fn close_notify(&mut self, fd: BorrowedFd<'_>) {
        if self.closed || self.is_handshaking() {
            return;
        }
        self.closed = true;
        let mut alert = [0u8; 64];
        let mut n = 0;
        let queued = self.write_traffic(|w| {
            n = w
                .queue_close_notify(&mut alert)
                .map_err(|e| io::Error::other(e.to_string()))?;
            Ok(())
        });
        if queued.is_ok() {
            self.pending.extend_from_slice(&alert[..n]);
            let _ = self.flush_pending(fd);
        }
    }

    /// Runs `f` in the connection's write state. The leftover (a partial
    /// record at most) is passed as the input, as rustls requires.
    fn write_traffic(
        &mut self,
        f: impl FnOnce(&mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut f = Some(f);
        for _ in 0..8 {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.leftover);
            let result = match state {
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    let f = f.take().ok_or_else(|| io::Error::other("TLS write state twice"))?;
                    Some(f(&mut w))
                }
                // A message rustls must send first (a key update).
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut self.pending, |out| encode.encode(out))?;
                    None
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                Ok(ConnectionState::Closed | ConnectionState::PeerClosed) => {
                    Some(Err(io::ErrorKind::BrokenPipe.into()))
                }
                Ok(_) => Some(Err(io::Error::other("TLS connection not ready to write"))),
                Err(e) => Some(Err(invalid(e))),
            };
            if discard > 0 {
                self.leftover.drain(..discard);
            }
            if let Some(result) = result {
                return result;
            }
        }
        Err(io::Error::other("TLS write state not reached"))
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

fn send(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    SockRef::from(&fd).send_with_flags(bytes, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
