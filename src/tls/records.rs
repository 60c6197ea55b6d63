//! The record layer after the handshake (RFC 8446 5, RFC 5246 6.2):
//! records are opened where they were read and sealed where they are
//! written, with no copy but the cipher's own pass (and the gathering of a
//! record's plaintext when it is sealed).
//!
//! rustls runs the handshake, then hands over the traffic keys through its
//! `KernelConnection` (the API it has for kTLS), which still derives every
//! later key (KeyUpdate, RFC 8446 4.6.3). The ciphers are ring's, the ones
//! rustls's own record layer uses here.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};

/// A record's header: content type, version, length (RFC 8446 5.1).
pub const HEADER: usize = 5;

/// Plaintext in one record, at most (RFC 8446 5.1, RFC 5246 6.2.1).
pub const MAX_PLAIN: usize = 16_384;

/// An AEAD tag: every suite rustls offers here has 16 bytes.
const TAG: usize = 16;

/// TLS 1.2 with AES-GCM sends 8 bytes of its nonce in each record (RFC 5288 3).
const EXPLICIT_NONCE: usize = 8;

/// Content types (RFC 8446 B.1).
const CHANGE_CIPHER_SPEC: u8 = 20;
pub const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Alert descriptions (RFC 8446 6).
pub const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const INTERNAL_ERROR: u8 = 80;
const USER_CANCELED: u8 = 90;

/// What a peer may send that costs work and carries no data, as rustls
/// allows it (its `TemperCounters`, after BoringSSL): key updates between
/// two records of data, warning alerts in all, empty records in a row.
const MAX_KEY_UPDATES: u8 = 32;
const MAX_WARNINGS: u8 = 4;
const MAX_EMPTY_RECORDS: u8 = 32;

/// The one handshake message a client may send after the handshake here
/// (no post-handshake authentication is asked for): KeyUpdate.
const KEY_UPDATE: u8 = 24;
const KEY_UPDATE_LEN: usize = 5;

/// Why the connection ends: the alert to send (none when the peer sent a
/// fatal one), and what to log.
#[derive(Debug)]
pub struct Fatal {
    pub alert: Option<u8>,
    pub reason: String,
}

impl Fatal {
    fn send(alert: u8, reason: impl Into<String>) -> Fatal {
        Fatal {
            alert: Some(alert),
            reason: reason.into(),
        }
    }
}

/// What opening a read's records found.
#[derive(Debug, Default)]
pub struct Opened {
    /// The plaintext ends here (it starts where the records did).
    pub plain_end: usize,
    /// An incomplete record starts here (the buffer's end when none).
    pub rest: usize,
    /// The peer sent close_notify; what came after it is dropped.
    pub peer_closed: bool,
}

/// One direction's key, its IV and its record sequence number.
struct Cipher {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Cipher {
    fn new(secrets: ConnectionTrafficSecrets, seq: u64) -> Result<Cipher, Fatal> {
        let internal = |what: &str| Fatal::send(INTERNAL_ERROR, format!("TLS keys: {what}"));
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(internal("a cipher this record layer does not have")),
        };
        let key = UnboundKey::new(algorithm, key.as_ref()).map_err(|_| internal("bad key length"))?;
        let iv = iv.as_ref().try_into().map_err(|_| internal("bad IV length"))?;
        Ok(Cipher {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The IV with the sequence number folded into its last 8 bytes (RFC
    /// 8446 5.3; RFC 7905 2 for TLS 1.2 ChaCha20; and the explicit nonce
    /// of TLS 1.2 AES-GCM is made the same way).
    fn nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        nonce
    }

    fn advance(&mut self) -> Result<(), Fatal> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| Fatal::send(INTERNAL_ERROR, "record sequence number exhausted"))?;
        Ok(())
    }
}

/// The additional data of a TLS 1.2 record (RFC 5246 6.2.3.3).
fn tls12_aad(seq: u64, typ: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// One connection's record layer, from the end of its handshake.
pub struct Records {
    kernel: KernelConnection<ServerConnectionData>,
    tls13: bool,
    /// TLS 1.2 with AES-GCM: each record carries an explicit nonce.
    explicit_nonce: bool,
    rx: Cipher,
    tx: Cipher,
    /// Records one key may seal (the suite's confidentiality limit); past
    /// it TLS 1.3 changes key and TLS 1.2 closes, as rustls does.
    tx_limit: u64,
    /// The peer asked for our key update (RFC 8446 4.6.3): it goes out
    /// before our next record.
    update_tx: bool,
    /// A post-handshake message split over records, so far.
    handshake: [u8; KEY_UPDATE_LEN],
    handshake_len: u8,
    /// Key updates since the last record of data, warnings in all, empty
    /// records in a row (see `MAX_KEY_UPDATES`).
    key_updates: u8,
    warnings: u8,
    empty_records: u8,
}

impl Records {
    pub fn new(secrets: ExtractedSecrets, kernel: KernelConnection<ServerConnectionData>) -> Result<Records, Fatal> {
        let tls13 = kernel.protocol_version() == ProtocolVersion::TLSv1_3;
        let tx_limit = match kernel.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(suite) => suite.common.confidentiality_limit,
        };
        let explicit_nonce = !tls13 && !matches!(secrets.tx.1, ConnectionTrafficSecrets::Chacha20Poly1305 { .. });
        Ok(Records {
            kernel,
            tls13,
            explicit_nonce,
            rx: Cipher::new(secrets.rx.1, secrets.rx.0)?,
            tx: Cipher::new(secrets.tx.1, secrets.tx.0)?,
            tx_limit,
            update_tx: false,
            handshake: [0; KEY_UPDATE_LEN],
            handshake_len: 0,
            key_updates: 0,
            warnings: 0,
            empty_records: 0,
        })
    }

    /// Records of this length or more are refused before they are whole
    /// (RFC 8446 5.2: 2^14 + 256; RFC 5246 6.2.3: 2^14 + 2048).
    fn max_ciphertext(&self) -> usize {
        if self.tls13 {
            MAX_PLAIN + 256
        } else {
            MAX_PLAIN + 2048
        }
    }

    /// Opens the whole records in `buf[from..]`, in place: the plaintext
    /// of application data is moved down to `from` by the cipher's pass
    /// (ring opens from one offset into another), alerts and handshake
    /// messages are taken as they come. A KeyUpdate changes the key for
    /// the records behind it in the same buffer.
    pub fn open(&mut self, buf: &mut [u8], from: usize) -> Result<Opened, Fatal> {
        let mut out = from;
        let mut at = from;
        while let Some(&[typ, major, minor, hi, lo]) = buf.get(at..at + HEADER) {
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            if len > self.max_ciphertext() {
                return Err(Fatal::send(RECORD_OVERFLOW, format!("a record of {len} bytes")));
            }
            let body = at + HEADER;
            let end = body + len;
            if end > buf.len() {
                break;
            }
            let (typ, n) = if self.tls13 {
                // RFC 8446 5.2: after the handshake every record is
                // application_data outside; a change_cipher_spec is no
                // longer allowed (5).
                if typ != APPLICATION_DATA {
                    return Err(Fatal::send(
                        UNEXPECTED_MESSAGE,
                        format!("a record of type {typ} after the handshake"),
                    ));
                }
                let nonce = Nonce::assume_unique_for_key(self.rx.nonce());
                let aad = Aad::from([typ, major, minor, hi, lo]);
                let n = self
                    .rx
                    .key
                    .open_within(nonce, aad, &mut buf[out..end], body - out..)
                    .map_err(|_| Fatal::send(BAD_RECORD_MAC, "a record failed to decrypt"))?
                    .len();
                if n > MAX_PLAIN + 1 {
                    return Err(Fatal::send(
                        RECORD_OVERFLOW,
                        format!("{n} bytes of plaintext in a record"),
                    ));
                }
                // RFC 8446 5.4: the content type is the last byte that is
                // not zero; a record of zeros only has none.
                let Some(last) = buf[out..out + n].iter().rposition(|&b| b != 0) else {
                    return Err(Fatal::send(UNEXPECTED_MESSAGE, "a record without a content type"));
                };
                (buf[out + last], last)
            } else {
                let skip = if self.explicit_nonce { EXPLICIT_NONCE } else { 0 };
                let Some(plain) = len.checked_sub(skip + TAG) else {
                    return Err(Fatal::send(BAD_RECORD_MAC, "a record shorter than its tag"));
                };
                let nonce = if self.explicit_nonce {
                    let mut nonce = [0; aead::NONCE_LEN];
                    nonce[..4].copy_from_slice(&self.rx.iv[..4]);
                    nonce[4..].copy_from_slice(&buf[body..body + EXPLICIT_NONCE]);
                    nonce
                } else {
                    self.rx.nonce()
                };
                let aad = Aad::from(tls12_aad(self.rx.seq, typ, [major, minor], plain));
                let n = self
                    .rx
                    .key
                    .open_within(
                        Nonce::assume_unique_for_key(nonce),
                        aad,
                        &mut buf[out..end],
                        body + skip - out..,
                    )
                    .map_err(|_| Fatal::send(BAD_RECORD_MAC, "a record failed to decrypt"))?
                    .len();
                if n > MAX_PLAIN {
                    return Err(Fatal::send(
                        RECORD_OVERFLOW,
                        format!("{n} bytes of plaintext in a record"),
                    ));
                }
                (typ, n)
            };
            self.rx.advance()?;
            at = end;
            if n == 0 {
                if self.empty_records == MAX_EMPTY_RECORDS {
                    return Err(Fatal::send(UNEXPECTED_MESSAGE, "too many empty records in a row"));
                }
                self.empty_records += 1;
            } else {
                self.empty_records = 0;
            }
            // Handshake messages are not interleaved with other records
            // (RFC 8446 5.1).
            if typ != HANDSHAKE && self.handshake_len > 0 {
                return Err(Fatal::send(
                    UNEXPECTED_MESSAGE,
                    "a handshake message cut by another record",
                ));
            }
            match typ {
                APPLICATION_DATA => {
                    if n > 0 {
                        self.key_updates = 0;
                    }
                    out += n;
                }
                ALERT => {
                    let &[level, description] = &buf[out..out + n] else {
                        return Err(Fatal::send(DECODE_ERROR, format!("an alert of {n} bytes")));
                    };
                    if description == CLOSE_NOTIFY {
                        return Ok(Opened {
                            plain_end: out,
                            rest: buf.len(),
                            peer_closed: true,
                        });
                    }
                    // RFC 8446 6: every alert but close_notify and
                    // user_canceled is fatal; RFC 5246 7.2: a warning
                    // may be passed over.
                    let warning = if self.tls13 {
                        description == USER_CANCELED
                    } else {
                        level == 1
                    };
                    if !warning {
                        return Err(Fatal {
                            alert: None,
                            reason: format!("the peer sent alert {description}"),
                        });
                    }
                    if self.warnings == MAX_WARNINGS {
                        return Err(Fatal::send(UNEXPECTED_MESSAGE, "too many warning alerts"));
                    }
                    self.warnings += 1;
                }
                HANDSHAKE if self.tls13 && n > 0 => self.handshake_message(&buf[out..out + n])?,
                // TLS 1.2: a ClientHello after the handshake asks to
                // renegotiate, which rustls does not do either.
                HANDSHAKE => {
                    return Err(Fatal::send(
                        UNEXPECTED_MESSAGE,
                        "a handshake message after the handshake",
                    ))
                }
                CHANGE_CIPHER_SPEC => {
                    return Err(Fatal::send(
                        UNEXPECTED_MESSAGE,
                        "change_cipher_spec after the handshake",
                    ))
                }
                other => return Err(Fatal::send(UNEXPECTED_MESSAGE, format!("a record of type {other}"))),
            }
        }
        Ok(Opened {
            plain_end: out,
            rest: at,
            peer_closed: false,
        })
    }

    /// Takes one record's handshake bytes. A client may send KeyUpdate
    /// only (RFC 8446 4.6.3), perhaps split over records; it must end its
    /// record (5.1: handshake messages do not span a key change).
    fn handshake_message(&mut self, mut bytes: &[u8]) -> Result<(), Fatal> {
        while !bytes.is_empty() {
            let have = usize::from(self.handshake_len);
            let n = bytes.len().min(KEY_UPDATE_LEN - have);
            self.handshake[have..have + n].copy_from_slice(&bytes[..n]);
            self.handshake_len += n as u8;
            bytes = &bytes[n..];
            let joined = &self.handshake[..usize::from(self.handshake_len)];
            if joined.first().is_some_and(|&t| t != KEY_UPDATE) {
                return Err(Fatal::send(
                    UNEXPECTED_MESSAGE,
                    format!("handshake message {} after the handshake", joined[0]),
                ));
            }
            if joined.len() >= 4 && joined[1..4] != [0, 0, 1] {
                return Err(Fatal::send(DECODE_ERROR, "a KeyUpdate of the wrong length"));
            }
            if joined.len() < KEY_UPDATE_LEN {
                continue;
            }
            let requested = match joined[4] {
                0 => false,
                1 => true,
                other => return Err(Fatal::send(ILLEGAL_PARAMETER, format!("KeyUpdate request {other}"))),
            };
            if !bytes.is_empty() {
                return Err(Fatal::send(
                    UNEXPECTED_MESSAGE,
                    "a KeyUpdate that does not end its record",
                ));
            }
            self.handshake_len = 0;
            if self.key_updates == MAX_KEY_UPDATES {
                return Err(Fatal::send(UNEXPECTED_MESSAGE, "too many key updates without data"));
            }
            self.key_updates += 1;
            let (seq, secrets) = self
                .kernel
                .update_rx_secret()
                .map_err(|e| Fatal::send(INTERNAL_ERROR, format!("KeyUpdate: {e}")))?;
            self.rx = Cipher::new(secrets, seq)?;
            self.update_tx |= requested;
        }
        Ok(())
    }

    /// Our key update is due: the peer asked for it, or the key sealed as
    /// many records as its cipher allows.
    fn wants_key_update(&self) -> bool {
        self.update_tx || self.tx.seq >= self.tx_limit
    }

    /// Seals our key update into `out` if it is due; called before each
    /// record is started.
    pub fn update_key_if_due(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        if self.wants_key_update() {
            self.send_key_update(out)?;
        }
        Ok(())
    }

    /// Starts a record at the end of `out`: its header (filled in by
    /// `seal`) and, in TLS 1.2 with AES-GCM, its explicit nonce. Its
    /// plaintext is then appended.
    pub fn start(&self, out: &mut Vec<u8>) -> usize {
        let at = out.len();
        out.extend_from_slice(&[0; HEADER]);
        if self.explicit_nonce {
            out.extend_from_slice(&self.tx.nonce()[4..]);
        }
        at
    }

    /// Seals the record `start` started at `at`, whose plaintext is the
    /// rest of `out`, as content of type `typ`.
    pub fn seal(&mut self, out: &mut Vec<u8>, at: usize, typ: u8) -> Result<(), Fatal> {
        let body = at + HEADER + if self.explicit_nonce { EXPLICIT_NONCE } else { 0 };
        let plain = out.len() - body;
        debug_assert!(plain <= MAX_PLAIN);
        if self.tls13 {
            // RFC 8446 5.2: the real type follows the content, inside.
            out.push(typ);
        }
        let len = (out.len() - at - HEADER + TAG) as u16;
        let header = if self.tls13 {
            let [hi, lo] = len.to_be_bytes();
            [APPLICATION_DATA, 3, 3, hi, lo]
        } else {
            let [hi, lo] = len.to_be_bytes();
            [typ, 3, 3, hi, lo]
        };
        out[at..at + HEADER].copy_from_slice(&header);
        let nonce = Nonce::assume_unique_for_key(self.tx.nonce());
        let tag = if self.tls13 {
            self.tx
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[body..])
        } else {
            let aad = tls12_aad(self.tx.seq, typ, [3, 3], plain);
            self.tx
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[body..])
        }
        .map_err(|_| Fatal::send(INTERNAL_ERROR, "sealing a record failed"))?;
        out.extend_from_slice(tag.as_ref());
        self.tx.advance()
    }

    /// Seals an alert (RFC 8446 6): close_notify is a warning, the rest fatal.
    pub fn seal_alert(&mut self, out: &mut Vec<u8>, description: u8) -> Result<(), Fatal> {
        let at = self.start(out);
        let level = if description == CLOSE_NOTIFY || description == USER_CANCELED {
            1
        } else {
            2
        };
        out.extend_from_slice(&[level, description]);
        self.seal(out, at, ALERT)
    }

    /// Sends KeyUpdate (update_not_requested) under the current key and
    /// takes the next one (RFC 8446 4.6.3). TLS 1.2 has no key update: a
    /// key at its limit ends the connection (with close_notify).
    fn send_key_update(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        if !self.tls13 {
            return Err(Fatal::send(
                CLOSE_NOTIFY,
                "the TLS 1.2 key sealed as many records as its cipher allows",
            ));
        }
        let at = self.start(out);
        out.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]);
        self.seal(out, at, HANDSHAKE)?;
        let (seq, secrets) = self
            .kernel
            .update_tx_secret()
            .map_err(|e| Fatal::send(INTERNAL_ERROR, format!("KeyUpdate: {e}")))?;
        self.tx = Cipher::new(secrets, seq)?;
        self.update_tx = false;
        Ok(())
    }

    /// Sends the key update the peer asked for at once, not with our next
    /// record.
    pub fn answer_key_update(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        if self.update_tx {
            self.send_key_update(out)?;
        }
        Ok(())
    }

    /// Lowers the confidentiality limit, so that tests reach it.
    #[cfg(test)]
    pub fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }
}
