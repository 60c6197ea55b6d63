//! Frame headers (RFC 6455 section 5.2): decoding what a peer sent, encoding
//! what we send.
//!
//! Owns the wire layout of a header and the rules that can be checked from the
//! header alone. It does not own payloads (they stay in the caller's buffer) nor
//! message state (fragment order, UTF-8): that is `message`'s.

use super::close::CloseCode;
use super::mask::{self, MaskKey};

/// Longest header: 2 fixed bytes, 8 length bytes, 4 key bytes.
pub const MAX_HEADER_BYTES: usize = 14;
/// RFC 6455 5.5: control frames carry at most 125 payload bytes.
pub const MAX_CONTROL_PAYLOAD_BYTES: usize = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    /// RFC 6455 5.2: 0x3-0x7 and 0xB-0xF are reserved, so they are `None`.
    pub fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    pub fn as_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1: with permessage-deflate, the message is compressed (RFC 7692
    /// 6). Whether it may be set is the message layer's to say.
    pub rsv1: bool,
    pub opcode: Opcode,
    pub mask: Option<MaskKey>,
    pub payload_len: u64,
}

impl FrameHeader {
    /// Bytes this header occupies on the wire.
    pub fn encoded_len(&self) -> usize {
        let len_bytes = match self.payload_len {
            0..=125 => 0,
            126..=0xFFFF => 2,
            _ => 8,
        };
        2 + len_bytes + if self.mask.is_some() { 4 } else { 0 }
    }
}

/// Why a header was refused. Each maps to the close code RFC 6455 asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// RSV1-3 set without a negotiated extension (5.2), or RSV1 where
    /// permessage-deflate does not allow it (RFC 7692 6.1).
    ReservedBits,
    /// Opcode 0x3-0x7 or 0xB-0xF (5.2).
    ReservedOpcode,
    /// A client frame without a mask (5.1).
    Unmasked,
    /// A server frame with a mask (5.1), seen by clients.
    Masked,
    /// Control frame with FIN clear or more than 125 bytes (5.5).
    BadControlFrame,
    /// 64-bit length with the top bit set, or a length not in its minimal form (5.2).
    BadLength,
}

impl HeaderError {
    pub fn close_code(self) -> CloseCode {
        CloseCode::PROTOCOL_ERROR
    }

    pub fn reason(self) -> &'static str {
        match self {
            HeaderError::ReservedBits => "reserved bits set",
            HeaderError::ReservedOpcode => "reserved opcode",
            HeaderError::Unmasked => "client frame not masked",
            HeaderError::Masked => "server frame masked",
            HeaderError::BadControlFrame => "fragmented or oversized control frame",
            HeaderError::BadLength => "bad payload length encoding",
        }
    }
}

/// Which side's frames are being decoded: servers require masks, clients forbid them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We are the server: peers are clients and must mask.
    Server,
    /// We are the client: peers are servers and must not mask.
    Client,
}

/// Decodes a header from the start of `buf`. `Ok(None)` means more bytes are
/// needed; `Ok(Some((header, n)))` means the header took `n` bytes.
pub fn decode_header(buf: &[u8], role: Role) -> Result<Option<(FrameHeader, usize)>, HeaderError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    // RFC 6455 5.2: RSV1-3 MUST be 0 unless an extension defines them.
    // Only permessage-deflate is spoken, and it defines RSV1 alone.
    if b0 & 0x30 != 0 {
        return Err(HeaderError::ReservedBits);
    }
    let rsv1 = b0 & 0x40 != 0;
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_u8(b0 & 0x0F).ok_or(HeaderError::ReservedOpcode)?;
    let masked = b1 & 0x80 != 0;
    // RFC 6455 5.1: a server MUST close on an unmasked client frame, and a
    // client MUST close on a masked server frame.
    match (role, masked) {
        (Role::Server, false) => return Err(HeaderError::Unmasked),
        (Role::Client, true) => return Err(HeaderError::Masked),
        _ => {}
    }
    let (payload_len, mut pos) = match b1 & 0x7F {
        126 => {
            let Some(bytes) = buf.get(2..4) else { return Ok(None) };
            let len = u16::from_be_bytes([bytes[0], bytes[1]]) as u64;
            // RFC 6455 5.2: "the minimal number of bytes MUST be used".
            if len < 126 {
                return Err(HeaderError::BadLength);
            }
            (len, 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else { return Ok(None) };
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            let len = u64::from_be_bytes(b);
            // RFC 6455 5.2: the most significant bit MUST be 0.
            if len >> 63 != 0 || len <= 0xFFFF {
                return Err(HeaderError::BadLength);
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    // RFC 6455 5.5: control frames MUST NOT be fragmented and carry <= 125 bytes.
    if opcode.is_control() && (!fin || payload_len > MAX_CONTROL_PAYLOAD_BYTES as u64) {
        return Err(HeaderError::BadControlFrame);
    }
    let mask = if masked {
        let Some(bytes) = buf.get(pos..pos + 4) else {
            return Ok(None);
        };
        pos += 4;
        Some([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        None
    };
    Ok(Some((
        FrameHeader {
            fin,
            rsv1,
            opcode,
            mask,
            payload_len,
        },
        pos,
    )))
}

/// Writes `header` into `out` and returns how many bytes it used.
pub fn encode_header(header: &FrameHeader, out: &mut [u8; MAX_HEADER_BYTES]) -> usize {
    out[0] = (if header.fin { 0x80 } else { 0 }) | (if header.rsv1 { 0x40 } else { 0 }) | header.opcode.as_u8();
    let mask_bit = if header.mask.is_some() { 0x80 } else { 0 };
    let mut pos = match header.payload_len {
        n @ 0..=125 => {
            out[1] = mask_bit | n as u8;
            2
        }
        n @ 126..=0xFFFF => {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            4
        }
        n => {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&n.to_be_bytes());
            10
        }
    };
    if let Some(key) = header.mask {
        out[pos..pos + 4].copy_from_slice(&key);
        pos += 4;
    }
    pos
}

/// Appends a whole frame to `out`: header, then `payload` masked with `mask`
/// when given (clients mask, servers do not).
pub fn encode_frame(out: &mut Vec<u8>, fin: bool, opcode: Opcode, mask: Option<MaskKey>, payload: &[u8]) {
    let header = FrameHeader {
        fin,
        rsv1: false,
        opcode,
        mask,
        payload_len: payload.len() as u64,
    };
    let mut head = [0u8; MAX_HEADER_BYTES];
    let n = encode_header(&header, &mut head);
    out.reserve(n + payload.len());
    out.extend_from_slice(&head[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        mask::apply(&mut out[start..], key, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn server(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, HeaderError> {
        decode_header(buf, Role::Server)
    }

    #[test]
    fn rfc_examples_decode() {
        // RFC 6455 5.7: unmasked "Hello" as a server sends it.
        let (h, n) = decode_header(&[0x81, 0x05], Role::Client).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.payload_len, n), (true, Opcode::Text, 5, 2));
        // Masked "Hello" from a client.
        let (h, n) = server(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d]).unwrap().unwrap();
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(n, 6);
        // 256 bytes binary in one unmasked frame: 0x82 0x7E 0x0100.
        let (h, _) = decode_header(&[0x82, 0x7E, 0x01, 0x00], Role::Client).unwrap().unwrap();
        assert_eq!(h.payload_len, 256);
        // 64 KiB binary: 0x82 0x7F 0x0000000000010000.
        let (h, n) = decode_header(&[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0], Role::Client)
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, n), (65536, 10));
    }

    #[test]
    fn partial_headers_ask_for_more() {
        let full = [0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        for cut in 0..full.len() {
            assert_eq!(server(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(server(&full).unwrap().is_some());
    }

    #[test]
    fn reserved_bits_and_opcodes_are_refused() {
        for rsv in [0x10, 0x20, 0x30, 0x50] {
            assert_eq!(server(&[0x81 | rsv, 0x80, 0, 0, 0, 0]), Err(HeaderError::ReservedBits));
        }
        // RSV1 is permessage-deflate's: the header carries it on.
        let (h, _) = server(&[0xC1, 0x80, 0, 0, 0, 0]).unwrap().unwrap();
        assert!(h.rsv1);
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(server(&[0x80 | op, 0x80, 0, 0, 0, 0]), Err(HeaderError::ReservedOpcode));
        }
    }

    #[test]
    fn masking_rules_by_role() {
        assert_eq!(server(&[0x81, 0x05]), Err(HeaderError::Unmasked));
        assert_eq!(
            decode_header(&[0x81, 0x85, 1, 2, 3, 4], Role::Client),
            Err(HeaderError::Masked)
        );
    }

    #[test]
    fn control_frame_rules() {
        // Fragmented ping.
        assert_eq!(server(&[0x09, 0x80, 0, 0, 0, 0]), Err(HeaderError::BadControlFrame));
        // 126-byte ping (uses the 16-bit length form).
        assert_eq!(
            server(&[0x89, 0xFE, 0, 126, 0, 0, 0, 0]),
            Err(HeaderError::BadControlFrame)
        );
        // 125 bytes is the limit and is fine.
        assert!(server(&[0x89, 0xFD, 0, 0, 0, 0]).unwrap().is_some());
    }

    #[test]
    fn length_encoding_rules() {
        // 16-bit form for a length that fits in 7 bits.
        assert_eq!(server(&[0x82, 0xFE, 0, 125, 0, 0, 0, 0]), Err(HeaderError::BadLength));
        // 64-bit form for a length that fits in 16 bits.
        assert_eq!(
            server(&[0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0, 0, 0]),
            Err(HeaderError::BadLength)
        );
        // Top bit set.
        assert_eq!(
            server(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(HeaderError::BadLength)
        );
        // Largest legal length.
        let (h, _) = server(&[0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!(h.payload_len, i64::MAX as u64);
    }

    #[test]
    fn encode_masks_payload() {
        let mut out = Vec::new();
        encode_frame(&mut out, true, Opcode::Text, Some([0x37, 0xfa, 0x21, 0x3d]), b"Hello");
        assert_eq!(out, [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }

    fn opcode() -> impl Strategy<Value = Opcode> {
        prop_oneof![
            Just(Opcode::Continuation),
            Just(Opcode::Text),
            Just(Opcode::Binary),
            Just(Opcode::Close),
            Just(Opcode::Ping),
            Just(Opcode::Pong),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn header_round_trip(
            fin in any::<bool>(),
            rsv1 in any::<bool>(),
            op in opcode(),
            mask in proptest::option::of(any::<[u8; 4]>()),
            len in prop_oneof![0u64..=125, 126u64..=0xFFFF, 0x10000u64..=(i64::MAX as u64)],
        ) {
            let (fin, len) = if op.is_control() { (true, len % 126) } else { (fin, len) };
            let header = FrameHeader { fin, rsv1, opcode: op, mask, payload_len: len };
            let mut buf = [0u8; MAX_HEADER_BYTES];
            let n = encode_header(&header, &mut buf);
            prop_assert_eq!(n, header.encoded_len());
            let role = if mask.is_some() { Role::Server } else { Role::Client };
            prop_assert_eq!(decode_header(&buf[..n], role), Ok(Some((header, n))));
        }

        #[test]
        fn frame_round_trip(
            op in prop_oneof![Just(Opcode::Text), Just(Opcode::Binary)],
            key in any::<[u8; 4]>(),
            payload in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..200),
                proptest::collection::vec(any::<u8>(), 60_000..70_000),
            ],
        ) {
            let mut wire = Vec::new();
            encode_frame(&mut wire, true, op, Some(key), &payload);
            let (h, n) = decode_header(&wire, Role::Server).unwrap().unwrap();
            prop_assert_eq!(h.payload_len as usize, payload.len());
            let body = &mut wire[n..];
            mask::apply(body, key, 0);
            prop_assert_eq!(&*body, &payload[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            let _ = decode_header(&bytes, Role::Server);
            let _ = decode_header(&bytes, Role::Client);
        }
    }
}
