//! The opening-handshake parser and validator on arbitrary bytes: never
//! panics; a parsed head's length never exceeds the input or the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::ws::handshake;

fuzz_target!(|data: &[u8]| {
    // First byte picks a head limit, so the 431 edge is explored too.
    let Some((&limit_seed, input)) = data.split_first() else { return };
    let limit = 64 + limit_seed as usize * 32;
    if let Ok(Some((head, n))) = handshake::parse(input, limit) {
        assert!(n <= input.len() && n <= limit);
        let _ = head.wants_upgrade();
        if let Ok(key) = head.validate_upgrade() {
            assert_eq!(key.len(), 24);
            let mut out = Vec::new();
            let supported = ["chat".to_string(), "v12.stomp".to_string()];
            handshake::write_accept(&mut out, key, head.choose_protocol(&supported));
            assert!(out.ends_with(b"\r\n\r\n"));
        }
        let _ = head.offered_protocols().count();
    }
});
