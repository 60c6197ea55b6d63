//! The frame and message decoder on arbitrary bytes delivered in arbitrary
//! pieces, as a server and as a client. It must never panic, never report
//! more bytes used than given, and never hold more than the message limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::ws::{Event, Limits, MessageKind, MessageReader, Role, Step};

const LIMITS: Limits = Limits { max_frame_bytes: 4096, max_message_bytes: 8192 };

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else { return };
    let role = if seed & 1 == 0 { Role::Server } else { Role::Client };
    let chunk = 1 + (seed >> 1) as usize;
    let mut reader = MessageReader::new(role, LIMITS);
    let mut pending: Vec<u8> = Vec::new();
    for piece in input.chunks(chunk) {
        pending.extend_from_slice(piece);
        let mut pos = 0;
        loop {
            let available = pending.len() - pos;
            match reader.read(&mut pending[pos..]) {
                Ok(Step::Need { frame_bytes }) => {
                    if let Some(total) = frame_bytes {
                        assert!(total <= LIMITS.max_frame_bytes + 14);
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
