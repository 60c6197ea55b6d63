//! What the bytes of one read do: every complete frame goes through the
//! connection's `MessageReader` (RFC 6455 5, the rules of frames and
//! messages), each whole message is charged to the connection's rate
//! limits and handed to its protocol (`App`), pings are answered, a close
//! or a violation ends the batch. No I/O.

use super::app::App;
use super::backend::ClientControl as Control;
use super::outbound::Outbound;
use super::shard::Session;
use super::Flow;
use crate::config::RateLimit;
use crate::ws::{CloseCode, Event, MessageReader, Opcode, Step, Violation};

/// Replies queued past which a read's remaining frames wait until they
/// are written. Plain frames never get there: a reply is no longer than
/// what it answers, and a read takes at most this much. Compressed ones
/// may (a 16 KiB message can inflate to 16 MiB and be echoed as that).
const OUTPUT_PAUSE_BYTES: usize = super::SCRATCH_BYTES;

/// Runs every complete frame in `data` through the reader and the app.
/// Returns the bytes used (the rest is a partial frame), what to do next, and
/// the whole size of the partial frame when its header is complete.
pub(super) fn process(
    data: &mut [u8],
    reader: &mut MessageReader,
    app: &mut App,
    out: &mut Outbound,
    session: &Session,
) -> (usize, Flow, Option<usize>) {
    let shard = session.shard();
    let pool = &shard.pool;
    let mut pos = 0;
    let mut messages_in = 0u64;
    let mut bytes_in = 0u64;
    let echoes = matches!(app, App::Echo);
    let mut partial_frame_bytes = None;
    // Messages dropped over the rate limits (never echoed).
    let mut limited = 0;
    if shard.takes_no_input() && !matches!(app, App::Closing) {
        // Shutting down: nothing read from now on is acted on (the close
        // handshake's own reading, as `App::Closing`, goes on).
        return (0, Flow::Continue, None);
    }
    // Input that waited for a publish to get through goes first.
    app.resume(out, pool, session);
    if let Some(code) = app.take_close(session) {
        return (0, Flow::AppClosed(code), None);
    }
    if app.is_pubsub() && session.is_blocked() {
        return (0, Flow::Continue, None);
    }
    let flow = loop {
        let step = if reader.inflates() && reader.takes_over() {
            // Its client keeps its window: its own inflater (made now if
            // it has none; the agreement reserved its memory).
            let dedicated = &shard.hub.sessions.dedicated;
            let (buf, key, reader) = (&mut data[pos..], session.key(), &mut *reader);
            match dedicated.with_inflater(key, move |inflater| reader.read_inflating(buf, inflater)) {
                Some(step) => step,
                None => Err(crate::ws::message::Violation {
                    code: crate::ws::close::CloseCode::INTERNAL_ERROR,
                    reason: "no inflater",
                }),
            }
        } else if reader.inflates() {
            let mut inflater = shard.inflater.borrow_mut();
            reader.read_inflating(&mut data[pos..], inflater.get_or_insert_with(Default::default))
        } else {
            reader.read(&mut data[pos..])
        };
        match step {
            Ok(Step::Need { frame_bytes }) => {
                partial_frame_bytes = frame_bytes;
                break Flow::Continue;
            }
            Ok(Step::Fragment(n)) => pos += n,
            Ok(Step::Event(event, n)) => {
                pos += n;
                match event {
                    // Closing: a message is dropped unread (RFC 6455 5.5.1),
                    // neither counted nor charged to the rate limits.
                    Event::Message { .. } if !app.replies() => {}
                    Event::Message { kind, payload } => {
                        messages_in += 1;
                        bytes_in += payload.len() as u64;
                        if !session.take_tokens(payload.len()) {
                            if shard.config.rate_limit == RateLimit::Drop {
                                limited += 1;
                                continue;
                            }
                            let violation = Violation {
                                code: CloseCode::POLICY_VIOLATION,
                                reason: "rate limit",
                            };
                            if app.replies() {
                                out.push_close(pool, Some(violation.code), violation.reason);
                            }
                            break Flow::Failed(violation);
                        }
                        app.on_message(kind, payload, out, pool, session);
                        if let Some(code) = app.take_close(session) {
                            break Flow::AppClosed(code);
                        }
                        if out.unsent() >= OUTPUT_PAUSE_BYTES {
                            // Replies (echoes of inflated messages) outgrew
                            // the read: written before the rest is taken.
                            break Flow::Paused;
                        }
                        if app.is_pubsub() && session.is_blocked() {
                            // A cross-core ring is full: stop here; the rest
                            // waits in `carry` until the publish is through.
                            break Flow::Continue;
                        }
                    }
                    // RFC 6455 5.5.2: answer a ping with a pong of the same payload.
                    Event::Ping(payload) if app.replies() => {
                        out.push_frame(pool, Opcode::Pong, payload);
                        app.on_control(Control::Ping(payload), session);
                        if app.is_pubsub() && session.is_blocked() {
                            break Flow::Continue;
                        }
                    }
                    Event::Pong(payload) => {
                        app.on_control(Control::Pong(payload), session);
                        if app.is_pubsub() && session.is_blocked() {
                            break Flow::Continue;
                        }
                    }
                    Event::Ping(_) => {}
                    Event::Close(close) => {
                        // RFC 6455 5.5.1: reply with a close, echoing the code.
                        if app.replies() {
                            out.push_close(pool, close.code, "");
                        }
                        app.on_control(Control::Close(close), session);
                        break Flow::PeerClosed(close.code);
                    }
                }
            }
            Err(violation) => {
                if app.replies() {
                    out.push_close(pool, Some(violation.code), violation.reason);
                }
                break Flow::Failed(violation);
            }
        }
    };
    let mut stats = shard.stats.borrow_mut();
    stats.messages_in += messages_in;
    stats.bytes_in += bytes_in;
    if echoes {
        stats.messages_out += messages_in - limited;
    }
    (pos, flow, partial_frame_bytes)
}
