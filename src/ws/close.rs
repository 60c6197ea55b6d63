//! Close codes and close-frame payloads (RFC 6455 sections 5.5.1 and 7.4).
//!
//! Owns which codes a peer may send, how a close payload is laid out, and the
//! codes sluice itself sends. When to close is the connection's business.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// Never on the wire: the close frame had no status code.
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// Never on the wire: the connection ended without a close frame.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    pub const MANDATORY_EXTENSION: CloseCode = CloseCode(1010);
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);

    /// RFC 6455 7.4.1/7.4.2: may a peer put this code in a close frame?
    /// 1000-1003 and 1007-1011 are defined for use on the wire, and 1012
    /// (service restart), 1013 (try again later) and 1014 (bad gateway) are
    /// registered since in the IANA WebSocket close code registry
    /// (RFC 6455 11.7); 3000-3999 are registered for libraries and 4000-4999
    /// are private. 1004-1006 and 1015 (never sent), and everything else
    /// below 3000, are refused.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// The code as counted in metrics: exact for the codes RFC 6455 and the
    /// registry define, one bucket each for the library (3000-3999) and
    /// private (4000-4999) ranges, whose codes a client chooses freely.
    pub fn bucket(self) -> CloseCode {
        match self.0 {
            3000..=3999 => CloseCode(3000),
            4000..=4999 => CloseCode(4000),
            code => CloseCode(code),
        }
    }

    /// The metrics label of a bucket: `3xxx`, `4xxx`, or the code.
    pub fn bucket_label(self) -> String {
        match self.0 {
            3000..=3999 => "3xxx".into(),
            4000..=4999 => "4xxx".into(),
            code => code.to_string(),
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A close frame as the peer sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close<'a> {
    /// `None` when the payload was empty (reported as 1005).
    pub code: Option<CloseCode>,
    pub reason: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseError {
    /// A 1-byte payload, or a code peers may not send (answered with 1002).
    BadCode,
    /// The reason is not UTF-8 (answered with 1007).
    BadReason,
}

impl CloseError {
    pub fn close_code(self) -> CloseCode {
        match self {
            CloseError::BadCode => CloseCode::PROTOCOL_ERROR,
            CloseError::BadReason => CloseCode::INVALID_PAYLOAD,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseError::BadCode => "invalid close code",
            CloseError::BadReason => "close reason is not UTF-8",
        }
    }
}

/// Parses an unmasked close payload.
pub fn parse(payload: &[u8]) -> Result<Close<'_>, CloseError> {
    match payload {
        [] => Ok(Close { code: None, reason: "" }),
        // RFC 6455 5.5.1: a body starts with a 2-byte code, so 1 byte is malformed.
        [_] => Err(CloseError::BadCode),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_valid_on_wire() {
                return Err(CloseError::BadCode);
            }
            // RFC 6455 5.5.1: the reason is UTF-8 encoded data.
            let reason = std::str::from_utf8(reason).map_err(|_| CloseError::BadReason)?;
            Ok(Close {
                code: Some(code),
                reason,
            })
        }
    }
}

/// Close payload: 2-byte code, then a reason cut to fit a control frame.
pub fn payload(code: CloseCode, reason: &str) -> ([u8; 125], usize) {
    let mut out = [0u8; 125];
    out[..2].copy_from_slice(&code.0.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    out[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    (out, 2 + cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_codes() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
        ] {
            let p = CloseCode(code).0.to_be_bytes();
            assert_eq!(parse(&p).unwrap().code, Some(CloseCode(code)), "{code}");
        }
    }

    #[test]
    fn counted_codes_are_few() {
        let labels: std::collections::BTreeSet<String> =
            (3000..=4999).map(|c| CloseCode(c).bucket().bucket_label()).collect();
        assert_eq!(labels.into_iter().collect::<Vec<_>>(), ["3xxx", "4xxx"]);
        assert_eq!(CloseCode(1001).bucket().bucket_label(), "1001");
    }

    #[test]
    fn refused_codes() {
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert_eq!(parse(&u16::to_be_bytes(code)), Err(CloseError::BadCode), "{code}");
        }
    }

    #[test]
    fn empty_and_one_byte() {
        assert_eq!(parse(&[]), Ok(Close { code: None, reason: "" }));
        assert_eq!(parse(&[0x03]), Err(CloseError::BadCode));
    }

    #[test]
    fn reason_must_be_utf8() {
        assert_eq!(parse(&[0x03, 0xE8, b'o', b'k']).unwrap().reason, "ok");
        assert_eq!(parse(&[0x03, 0xE8, 0xCE, 0xBA, 0xE1]), Err(CloseError::BadReason));
        assert_eq!(CloseError::BadReason.close_code(), CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn payload_cuts_reason_on_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let (buf, n) = payload(CloseCode::GOING_AWAY, &reason);
        assert!(n <= 125);
        assert_eq!(parse(&buf[..n]).unwrap().code, Some(CloseCode::GOING_AWAY));
        assert!(parse(&buf[..n]).unwrap().reason.chars().all(|c| c == 'é'));
    }
}
