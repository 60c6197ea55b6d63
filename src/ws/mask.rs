//! Masking of frame payloads (RFC 6455 section 5.3).
//!
//! Owns the XOR transform only; where the key comes from is `frame`'s business.
//! `apply` is the fast path: 32-byte blocks that the compiler turns into SIMD
//! XORs (SSE2 is baseline on x86_64, NEON on aarch64), then 8-byte words, then
//! bytes. It uses no `unsafe`. `apply_scalar` is the byte-at-a-time twin the
//! property tests hold it to.

/// The 4-byte masking key of a client frame.
pub type MaskKey = [u8; 4];

const BLOCK_BYTES: usize = 32;

/// XORs `buf` with `key`, where `buf[0]` is byte number `offset` of the frame
/// payload. The offset lets a payload be unmasked in pieces as it arrives.
#[inline]
pub fn apply(buf: &mut [u8], key: MaskKey, offset: usize) {
    // RFC 6455 5.3: octet i of the payload is XORed with key[i mod 4].
    let rotated = rotate(key, offset);
    let mut block = [0u8; BLOCK_BYTES];
    for (i, b) in block.iter_mut().enumerate() {
        *b = rotated[i % 4];
    }
    let mut blocks = buf.chunks_exact_mut(BLOCK_BYTES);
    for chunk in &mut blocks {
        for (b, k) in chunk.iter_mut().zip(block.iter()) {
            *b ^= *k;
        }
    }
    // Every block is a multiple of 4 bytes long, so the key phase is unchanged.
    let rest = blocks.into_remainder();
    let word = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2], rotated[3],
    ]);
    let mut words = rest.chunks_exact_mut(8);
    for chunk in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= rotated[i % 4];
    }
}

/// Byte-at-a-time reference for [`apply`]: same contract, no tricks.
pub fn apply_scalar(buf: &mut [u8], key: MaskKey, offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[(offset + i) % 4];
    }
}

fn rotate(key: MaskKey, offset: usize) -> MaskKey {
    let s = offset % 4;
    [key[s], key[(s + 1) % 4], key[(s + 2) % 4], key[(s + 3) % 4]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 5.7: "Hello" masked with 37 fa 21 3d.
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }

    #[test]
    fn masking_twice_is_identity() {
        let original: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut buf = original.clone();
        apply(&mut buf, [1, 2, 3, 4], 3);
        assert_ne!(buf, original);
        apply(&mut buf, [1, 2, 3, 4], 3);
        assert_eq!(buf, original);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        // Every length up to a few blocks, every start alignment inside the
        // allocation, every key phase.
        #[test]
        fn fast_matches_scalar(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            key in any::<[u8; 4]>(),
            align in 0usize..32,
            offset in 0usize..8,
        ) {
            let mut backing = vec![0u8; align];
            backing.extend_from_slice(&data);
            let mut fast = backing.clone();
            apply(&mut fast[align..], key, offset);
            apply_scalar(&mut backing[align..], key, offset);
            prop_assert_eq!(fast, backing);
        }

        #[test]
        fn split_anywhere_equals_whole(
            data in proptest::collection::vec(any::<u8>(), 0..200),
            key in any::<[u8; 4]>(),
            cut in 0usize..200,
        ) {
            let cut = cut.min(data.len());
            let mut whole = data.clone();
            apply(&mut whole, key, 0);
            let mut pieces = data.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply(a, key, 0);
            apply(b, key, cut);
            prop_assert_eq!(whole, pieces);
        }
    }

    #[test]
    fn every_length_and_alignment_exhaustive() {
        let key = [0xa5, 0x5a, 0x0f, 0xf0];
        for len in 0..=130 {
            for align in 0..16 {
                for offset in 0..4 {
                    let mut a: Vec<u8> = (0..len + align).map(|i| i as u8).collect();
                    let mut b = a.clone();
                    apply(&mut a[align..], key, offset);
                    apply_scalar(&mut b[align..], key, offset);
                    assert_eq!(a, b, "len {len} align {align} offset {offset}");
                }
            }
        }
    }
}
