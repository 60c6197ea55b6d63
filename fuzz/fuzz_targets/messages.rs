//! The frame and message decoder on arbitrary bytes delivered in arbitrary
//! pieces, as a server and as a client, with permessage-deflate agreed or
//! not. It must never panic, never report more bytes used than given, and
//! never hold more than the message limit (compressed, or inflated).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::ws::deflate::Inflater;
use sluice::ws::message::compressed_bound;
use sluice::ws::{Event, Limits, MessageKind, MessageReader, Role, Step};

const LIMITS: Limits = Limits { max_frame_bytes: 4096, max_message_bytes: 8192 };

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else { return };
    let role = if seed & 1 == 0 { Role::Server } else { Role::Client };
    let deflate = seed & 2 != 0;
    let chunk = 1 + (seed >> 2) as usize;
    let mut reader = MessageReader::new(role, LIMITS);
    let mut inflater = Inflater::default();
    if deflate {
        // The takeover bit: with it, the inflater keeps its window.
        reader = reader.with_deflate(seed & 4 != 0);
    }
    let frame_limit = if deflate { compressed_bound(LIMITS.max_frame_bytes) } else { LIMITS.max_frame_bytes };
    let mut pending: Vec<u8> = Vec::new();
    for piece in input.chunks(chunk) {
        pending.extend_from_slice(piece);
        let mut pos = 0;
        loop {
            let available = pending.len() - pos;
            let step = if deflate {
                reader.read_inflating(&mut pending[pos..], &mut inflater)
            } else {
                reader.read(&mut pending[pos..])
            };
            match step {
                Ok(Step::Need { frame_bytes }) => {
                    if let Some(total) = frame_bytes {
                        assert!(total <= frame_limit + 14);
                    }
                    break;
                }
                Ok(Step::Fragment(n)) => {
                    assert!(n > 0 && n <= available);
                    pos += n;
                }
                Ok(Step::Event(event, n)) => {
                    assert!(n > 0 && n <= available);
                    if let Event::Message { kind, payload } = event {
                        assert!(payload.len() <= LIMITS.max_message_bytes);
                        if kind == MessageKind::Text {
                            assert!(std::str::from_utf8(payload).is_ok());
                        }
                    }
                    pos += n;
                }
                Err(_) => return,
            }
        }
        pending.drain(..pos);
    }
});
