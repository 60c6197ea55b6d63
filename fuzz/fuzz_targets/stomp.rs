//! The STOMP frame decoder on arbitrary bytes, fed in pieces like the
//! payloads of WebSocket messages: never panics; never holds more than it
//! was given; every frame stays within the limits; a frame with a body
//! that has no NUL survives encoding and decoding again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::proto::stomp::frame::{Decoder, Item, Limits};

fuzz_target!(|data: &[u8]| {
    // First byte: the size of the pieces (1..=256).
    let Some((&piece, input)) = data.split_first() else { return };
    let piece = piece as usize + 1;
    let limits = Limits {
        max_headers: 8,
        max_header_bytes: 64,
        max_body_bytes: 256,
    };
    let mut d = Decoder::new(limits);
    let mut pushed = 0;
    for chunk in input.chunks(piece) {
        d.push(chunk);
        pushed += chunk.len();
        loop {
            match d.next_item() {
                Ok(Some(Item::Frame(f))) => {
                    assert!(f.headers.len() <= limits.max_headers);
                    assert!(f.body.len() <= limits.max_body_bytes);
                    if !f.body.contains(&0) && f.header("content-length").is_none() {
                        let mut wire = Vec::new();
                        f.encode(&mut wire);
                        let mut again = Decoder::new(Limits::default());
                        again.push(&wire);
                        assert_eq!(again.next_item(), Ok(Some(Item::Frame(f))));
                    }
                }
                Ok(Some(Item::HeartBeat)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= pushed);
    }
});
