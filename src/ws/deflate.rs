//! permessage-deflate (RFC 7692) without I/O: the negotiation of section
//! 7.1 (an offer's parameters, their rules, the response), and one
//! message's compression and decompression (section 7.2).
//!
//! Who holds a compressor or a decompressor, and for how long, is the
//! caller's: a core may keep one of each for every connection that agreed
//! to no context takeover (`Mode::Shared`), or a connection its own.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// What the server agrees to, as the route asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No context takeover either way (RFC 7692 7.1.1): every message is
    /// compressed and decompressed on its own, so a core's one compressor
    /// and one decompressor serve every connection, and a publish is
    /// compressed once for all its subscribers.
    Shared,
    /// Context takeover where the client allows it: each connection keeps
    /// its own compressor and decompressor, for better ratios.
    Dedicated,
}

/// The largest LZ77 window (RFC 7692 7.1.2: 8 to 15 bits).
pub const MAX_WINDOW_BITS: u8 = 15;

/// RFC 7692 7.2.1: a compressed message is the deflate stream flushed to a
/// byte boundary, less these four octets of the empty stored block that
/// ends it; the receiver puts them back (7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// One `permessage-deflate` offer's parameters (RFC 7692 7.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value (7.1.2.2).
    client_max_window_bits: Option<Option<u8>>,
}

/// What was agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The server keeps no LZ77 window between messages it sends.
    pub server_no_context_takeover: bool,
    /// The client keeps none between messages it sends.
    pub client_no_context_takeover: bool,
    /// The largest window the server's messages may use (8 to 15 bits):
    /// a message compressed with a larger window reaches this client only
    /// if it is no longer than this window, so no back-reference reaches
    /// further than the client keeps.
    pub server_window_bits: u8,
    /// The offer named `server_max_window_bits`: the response must too.
    echo_server_window_bits: bool,
    /// The window the client's messages may use, when the response limits
    /// it (only if the offer named `client_max_window_bits`, 7.1.2.2).
    pub client_window_bits: Option<u8>,
}

/// What a compressor of `window_bits` (9-15) holds once it has compressed
/// a window's worth: zlib-rs's window and chain (4 bytes per window byte),
/// and its hash heads, symbol buffer and state (208 KiB at every window), as
/// measured (`tests::context_memory`).
pub fn deflater_bytes(window_bits: u8) -> usize {
    (4 << window_bits.clamp(9, MAX_WINDOW_BITS)) + 208 * 1024
}

/// What an inflater holds once it has inflated a window's worth: the 32 KiB
/// window and its state, as measured (`tests::context_memory`).
pub const INFLATER_BYTES: usize = 49 * 1024;

impl Agreement {
    /// The server keeps its LZ77 window between the messages it sends: a
    /// message may refer back into those before it, so the connection
    /// needs its own compressor, fed in the order the messages are sent.
    pub fn server_takeover(&self) -> bool {
        !self.server_no_context_takeover
    }

    /// The client keeps its window between its messages: the connection
    /// needs its own inflater.
    pub fn client_takeover(&self) -> bool {
        !self.client_no_context_takeover
    }

    /// The same offer's terms with no context takeover either way (what
    /// `Mode::Shared` agrees to): for a connection its core has no memory
    /// for (RFC 7692 7.1.1.1, 7.1.1.2: the server may ask for both).
    pub fn without_takeover(self) -> Agreement {
        Agreement {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            client_window_bits: None,
            ..self
        }
    }

    /// The window our own compressor keeps for this connection: what the
    /// client allows, at most `max_bits` (a smaller window is always
    /// allowed, RFC 7692 7.1.2.1).
    pub fn compressor_window_bits(&self, max_bits: u8) -> u8 {
        self.server_window_bits.min(max_bits)
    }

    /// The most the connection's own contexts take: a compressor if the
    /// server takes over its context (of a window of at most `max_bits`),
    /// an inflater if the client does.
    pub fn context_bytes(&self, max_bits: u8) -> usize {
        let deflater = if self.server_takeover() {
            deflater_bytes(self.compressor_window_bits(max_bits))
        } else {
            0
        };
        deflater + if self.client_takeover() { INFLATER_BYTES } else { 0 }
    }

    /// The response's `Sec-WebSocket-Extensions` line, CRLF included.
    pub fn write_response(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"Sec-WebSocket-Extensions: permessage-deflate");
        if self.server_no_context_takeover {
            out.extend_from_slice(b"; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.extend_from_slice(b"; client_no_context_takeover");
        }
        if self.echo_server_window_bits {
            out.extend_from_slice(format!("; server_max_window_bits={}", self.server_window_bits).as_bytes());
        }
        if let Some(bits) = self.client_window_bits {
            out.extend_from_slice(format!("; client_max_window_bits={bits}").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// RFC 7692 7.1 and RFC 6455 9.1: the first acceptable `permessage-deflate`
/// offer among the request's `Sec-WebSocket-Extensions` lines (in order),
/// agreed as `mode` says. An offer with an unknown parameter, a parameter
/// twice, or a bad value is declined (RFC 7692 5), and the next is tried;
/// other extensions are not ours and are declined by saying nothing. A line
/// that does not parse as an extension list declines what is left of it.
pub fn negotiate<'a>(lines: impl IntoIterator<Item = &'a [u8]>, mode: Mode) -> Option<Agreement> {
    lines
        .into_iter()
        .flat_map(|line| split_outside_quotes(line, b','))
        .filter_map(|element| {
            let mut parts = split_outside_quotes(element, b';');
            let name = trim(parts.next()?);
            if !name.eq_ignore_ascii_case(b"permessage-deflate") {
                return None;
            }
            parse_offer(parts).ok()
        })
        .map(|offer| agree(offer, mode))
        .next()
}

/// Why an offer was declined; which rule of RFC 7692 7.1 it broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declined {
    UnknownParameter,
    Duplicate,
    BadValue,
}

fn parse_offer<'a>(params: impl Iterator<Item = &'a [u8]>) -> Result<Offer, Declined> {
    let mut offer = Offer::default();
    for param in params {
        let (name, value) = match param.iter().position(|&b| b == b'=') {
            Some(eq) => (trim(&param[..eq]), Some(param_value(trim(&param[eq + 1..]))?)),
            None => (trim(param), None),
        };
        let once = |seen: bool| if seen { Err(Declined::Duplicate) } else { Ok(()) };
        if name.eq_ignore_ascii_case(b"server_no_context_takeover") {
            // 7.1.1.1: no value.
            once(offer.server_no_context_takeover)?;
            value.map_or(Ok(()), |_| Err(Declined::BadValue))?;
            offer.server_no_context_takeover = true;
        } else if name.eq_ignore_ascii_case(b"client_no_context_takeover") {
            // 7.1.1.2: no value.
            once(offer.client_no_context_takeover)?;
            value.map_or(Ok(()), |_| Err(Declined::BadValue))?;
            offer.client_no_context_takeover = true;
        } else if name.eq_ignore_ascii_case(b"server_max_window_bits") {
            // 7.1.2.1: a value is required.
            once(offer.server_max_window_bits.is_some())?;
            offer.server_max_window_bits = Some(window_bits(value.ok_or(Declined::BadValue)?)?);
        } else if name.eq_ignore_ascii_case(b"client_max_window_bits") {
            // 7.1.2.2: the value may be left out.
            once(offer.client_max_window_bits.is_some())?;
            offer.client_max_window_bits = Some(value.map(window_bits).transpose()?);
        } else {
            return Err(Declined::UnknownParameter);
        }
    }
    Ok(offer)
}

/// RFC 6455 9.1: a parameter's value is a token, or a quoted-string whose
/// value, unescaped, is a token. Returned without quotes; an escaped value
/// keeps its backslashes, which no valid window size has.
fn param_value(v: &[u8]) -> Result<&[u8], Declined> {
    let inner = match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    };
    if inner.is_empty() || !inner.iter().all(|&b| is_token_byte(b) || b == b'\\') {
        return Err(Declined::BadValue);
    }
    Ok(inner)
}

/// RFC 7692 7.1.2: a decimal integer from 8 to 15 without leading zeros.
fn window_bits(v: &[u8]) -> Result<u8, Declined> {
    match v {
        [b'8'] => Ok(8),
        [b'9'] => Ok(9),
        [b'1', d @ b'0'..=b'5'] => Ok(10 + (d - b'0')),
        _ => Err(Declined::BadValue),
    }
}

fn agree(offer: Offer, mode: Mode) -> Agreement {
    let server_window_bits = offer.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS);
    match mode {
        // 7.1.1.2: the server may ask the client for no context takeover
        // even when it did not offer it.
        Mode::Shared => Agreement {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_window_bits,
            echo_server_window_bits: offer.server_max_window_bits.is_some(),
            client_window_bits: None,
        },
        Mode::Dedicated => Agreement {
            // A window of 8 bits is one zlib cannot compress with (it
            // takes 9): such a connection's messages each stand alone.
            server_no_context_takeover: offer.server_no_context_takeover || server_window_bits < 9,
            client_no_context_takeover: offer.client_no_context_takeover,
            server_window_bits,
            echo_server_window_bits: offer.server_max_window_bits.is_some(),
            client_window_bits: None,
        },
    }
}

/// Splits `s` at every `sep` that is not inside a quoted-string.
fn split_outside_quotes(s: &[u8], sep: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, &b) in s.iter().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                _ if b == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// RFC 7230 3.2.6 tchar.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// A message compressor (RFC 7692 7.2.1).
pub struct Deflater {
    inner: Compress,
}

impl Deflater {
    /// `level`: zlib's 0-9. `window_bits`: 9 to 15.
    pub fn new(level: u32, window_bits: u8) -> Deflater {
        Deflater {
            inner: Compress::new_with_window_bits(
                Compression::new(level),
                false,
                window_bits.clamp(9, MAX_WINDOW_BITS),
            ),
        }
    }

    /// Appends `input` compressed to `out`, flushed to a byte boundary and
    /// without the final empty block's four octets (7.2.1). Without
    /// `takeover` the compressor starts afresh for the next message.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>, takeover: bool) {
        self.compress_parts(&[input], out, takeover);
    }

    /// `compress` of the concatenation of `parts`.
    pub fn compress_parts(&mut self, parts: &[&[u8]], out: &mut Vec<u8>, takeover: bool) {
        let start = out.len();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        // zlib's bound for stored blocks, and room for the flush.
        out.reserve(len + len / 1024 + 64);
        for (i, part) in parts.iter().enumerate() {
            let flush = if i + 1 == parts.len() {
                FlushCompress::Sync
            } else {
                FlushCompress::None
            };
            self.feed(part, out, flush);
        }
        if parts.is_empty() {
            self.feed(&[], out, FlushCompress::Sync);
        }
        if out.len() == start {
            // An empty message right after a flush, the context kept:
            // zlib writes nothing for a second flush with nothing between.
            // The first octet of an empty stored block says it (RFC 7692
            // 7.2.3.6), and the stream stays on a byte boundary.
            out.push(0x00);
        } else {
            debug_assert!(out[start..].ends_with(&TAIL));
            if out[start..].ends_with(&TAIL) {
                out.truncate(out.len() - TAIL.len());
            }
        }
        if !takeover {
            self.inner.reset();
        }
    }

    /// Takes all of `input`; with a sync flush, writes all it holds.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, flush: FlushCompress) {
        let mut taken = 0;
        loop {
            let before = self.inner.total_in();
            // Never fails on a valid stream with room to write.
            let _ = self.inner.compress_vec(&input[taken..], out, flush);
            taken += (self.inner.total_in() - before) as usize;
            if taken == input.len() && out.len() < out.capacity() {
                return;
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

/// What a compressor or an inflater has done: messages, and bytes taken
/// and made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub messages: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Totals {
    /// One more message, of `bytes_in` taken and `bytes_out` made.
    pub fn add(&mut self, bytes_in: usize, bytes_out: usize) {
        self.messages += 1;
        self.bytes_in += bytes_in as u64;
        self.bytes_out += bytes_out as u64;
    }
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the limit (RFC 6455 7.4.1: 1009).
    TooBig,
    /// It is not a deflate stream (1007: the payload is not what its
    /// frame says it is).
    Corrupt,
}

/// A message decompressor (RFC 7692 7.2.2), with the LZ77 window of the
/// largest the client may use.
pub struct Inflater {
    inner: Decompress,
    /// Inflate only this much of each message (`prefix_only`).
    prefix: Option<usize>,
    /// Messages inflated whole.
    totals: Totals,
}

impl Default for Inflater {
    fn default() -> Inflater {
        Inflater {
            inner: Decompress::new_with_window_bits(false, MAX_WINDOW_BITS),
            prefix: None,
            totals: Totals::default(),
        }
    }
}

impl Inflater {
    /// An inflater that stops after the first `bytes` of each message and
    /// returns them as if they were all of it: for a load generator that
    /// reads only a stamp at the start of each message it counts, and
    /// must not spend a server's worth of CPU inflating the rest. Only
    /// without context takeover.
    pub fn prefix_only(bytes: usize) -> Inflater {
        Inflater {
            prefix: Some(bytes),
            ..Inflater::default()
        }
    }

    /// Appends the message `input` inflates to to `out`. The size is
    /// checked as it grows: once `out` holds more than `limit` bytes it
    /// stops with `TooBig`, so no input makes it allocate more than
    /// `limit` and a bit, nor work past that much output. Without
    /// `takeover` the decompressor starts afresh for the next message (as
    /// it does after a stream's final block).
    pub fn inflate(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
        takeover: bool,
    ) -> Result<(), InflateError> {
        let start = out.len();
        let result = match self.prefix {
            Some(prefix) => self
                .inflate_parts(input, out, prefix.min(limit))
                .map(|_| true)
                .or_else(|e| match e {
                    InflateError::TooBig => {
                        out.truncate(start + prefix.min(limit));
                        Ok(true)
                    }
                    e => Err(e),
                }),
            None => self.inflate_parts(input, out, limit),
        };
        if !takeover || result != Ok(false) {
            self.inner.reset(false);
        }
        if result.is_ok() {
            self.totals.add(input.len(), out.len() - start);
        }
        result.map(|_| ())
    }

    /// What it has inflated so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// `Ok(true)`: the stream ended with a final block.
    fn inflate_parts(&mut self, input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<bool, InflateError> {
        let start = out.len();
        let room = |out: &Vec<u8>| out.len() - start;
        let first = input.len().saturating_mul(4).max(1024).min(limit.saturating_add(1));
        out.reserve(first);
        for (part, is_input) in [(input, true), (&TAIL[..], false)] {
            let mut taken = 0;
            loop {
                if out.len() == out.capacity() {
                    if room(out) > limit {
                        return Err(InflateError::TooBig);
                    }
                    let grow = room(out).max(1024).min(limit.saturating_add(1) - room(out));
                    out.reserve_exact(grow);
                }
                let (in_before, out_before) = (self.inner.total_in(), out.len());
                let status = self
                    .inner
                    .decompress_vec(&part[taken..], out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                taken += (self.inner.total_in() - in_before) as usize;
                if room(out) > limit {
                    return Err(InflateError::TooBig);
                }
                match status {
                    // Nothing may follow a final block but what RFC 7692
                    // 7.2.1 leaves of the empty stored block a sender
                    // appends: its first octet (7.2.3.4's example ends so),
                    // which the four we put back complete.
                    Status::StreamEnd if is_input && !matches!(&part[taken..], [] | [0x00]) => {
                        return Err(InflateError::Corrupt)
                    }
                    Status::StreamEnd => return Ok(true),
                    _ if taken == part.len() && out.len() < out.capacity() => break,
                    // Neither input taken nor output made, with room for
                    // both: a stream that cannot go on.
                    _ if self.inner.total_in() == in_before
                        && out.len() == out_before
                        && out.len() < out.capacity() =>
                    {
                        return Err(InflateError::Corrupt)
                    }
                    _ => {}
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests;
