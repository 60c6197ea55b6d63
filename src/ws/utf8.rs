//! Incremental UTF-8 validation across the fragments of a text message
//! (RFC 6455 8.1: a text message whose bytes are not UTF-8 fails the
//! connection with 1007).
//!
//! Owns only the validation state between fragments: at most 3 bytes of a
//! character cut by a fragment boundary. The bulk work is simdutf8's.

#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Validator {
    /// Bytes of a character started in an earlier fragment.
    pending: [u8; 4],
    pending_len: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Length of the character a leading byte starts, or `None` if it cannot lead.
fn char_width(lead: u8) -> Option<usize> {
    match lead {
        0x00..=0x7F => Some(1),
        0xC2..=0xDF => Some(2),
        0xE0..=0xEF => Some(3),
        0xF0..=0xF4 => Some(4),
        _ => None,
    }
}

impl Utf8Validator {
    /// Checks the next piece of the message; `fin` says it is the last piece.
    /// Fails as soon as the bytes seen so far cannot begin valid UTF-8.
    pub fn feed(&mut self, mut data: &[u8], fin: bool) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = self.pending_len as usize;
            let width = char_width(self.pending[0]).ok_or(InvalidUtf8)?;
            let take = (width - have).min(data.len());
            self.pending[have..have + take].copy_from_slice(&data[..take]);
            let now = have + take;
            data = &data[take..];
            match simdutf8::compat::from_utf8(&self.pending[..now]) {
                Ok(_) => self.pending_len = 0,
                // Still a valid prefix of a character: wait for more.
                Err(e) if e.error_len().is_none() => {
                    self.pending_len = now as u8;
                    return if fin { Err(InvalidUtf8) } else { Ok(()) };
                }
                Err(_) => return Err(InvalidUtf8),
            }
        }
        match simdutf8::compat::from_utf8(data) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() => {
                // A character is cut at the end of this piece; simdutf8 has
                // checked that what is there is a valid prefix of one.
                let tail = &data[e.valid_up_to()..];
                debug_assert!(tail.len() < 4);
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
            }
            Err(_) => return Err(InvalidUtf8),
        }
        if fin && self.pending_len > 0 {
            return Err(InvalidUtf8);
        }
        Ok(())
    }

    pub fn reset(&mut self) {
        self.pending_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_feed(bytes: &[u8], cuts: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::default();
        let mut start = 0;
        for &c in cuts {
            let c = c.clamp(start, bytes.len());
            v.feed(&bytes[start..c], false)?;
            start = c;
        }
        v.feed(&bytes[start..], true)
    }

    #[test]
    fn autobahn_6_x_samples() {
        // "κόσμε" cut inside every multi-byte character.
        let s = "κόσμε".as_bytes();
        for cut in 0..=s.len() {
            assert_eq!(split_feed(s, &[cut]), Ok(()), "cut {cut}");
        }
        // Invalid continuation is caught in the fragment that has it.
        let mut v = Utf8Validator::default();
        assert_eq!(
            v.feed(
                &[0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5],
                false
            ),
            Ok(())
        );
        assert_eq!(v.feed(&[0xED, 0xA0, 0x80], false), Err(InvalidUtf8)); // surrogate
                                                                          // A cut character at the end of the message fails.
        assert_eq!(Utf8Validator::default().feed(&[0xE2, 0x82], true), Err(InvalidUtf8));
        // A prefix that can never be valid fails before the message ends.
        assert_eq!(Utf8Validator::default().feed(&[0xF4, 0x90], false), Err(InvalidUtf8));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn agrees_with_std_at_any_cuts(
            bytes in proptest::collection::vec(any::<u8>(), 0..40),
            cuts in proptest::collection::vec(0usize..40, 0..5),
        ) {
            let mut cuts = cuts;
            cuts.sort();
            let expected = std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(split_feed(&bytes, &cuts).is_ok(), expected);
        }

        #[test]
        fn valid_text_any_cuts(s in "\\PC{0,30}", cuts in proptest::collection::vec(0usize..120, 0..6)) {
            let mut cuts = cuts;
            cuts.sort();
            prop_assert_eq!(split_feed(s.as_bytes(), &cuts), Ok(()));
        }
    }
}
