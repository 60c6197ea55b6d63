//! The queues and the budget, driven without a socket: a "socket" here is
//! a closure that takes bytes (or refuses them).

use super::*;
use crate::config::Options;
use slotmap::SlotMap;

fn sessions(opts: Options) -> Sessions {
    let config = Arc::new(opts.validate(1).unwrap());
    Sessions::new(config, Rc::new(RefCell::new(Stats::default())))
}

/// A small core budget (4096 bytes) and stall timeout (100 ms), with
/// `slow_consumer` and `max_outbound_bytes`.
pub(crate) fn budget_opts(slow_consumer: SlowConsumer, max_outbound_bytes: usize) -> Options {
    Options {
        max_outbound_bytes: Some(max_outbound_bytes),
        max_core_outbound_bytes: Some(4096),
        stall_timeout_ms: Some(100),
        slow_consumer: Some(slow_consumer),
        ..Options::default()
    }
}

/// Keys of sessions, as the connection layer's table makes them.
fn keys(n: usize) -> Vec<SessionKey> {
    let mut table: SlotMap<SessionKey, ()> = SlotMap::with_key();
    (0..n).map(|_| table.insert(())).collect()
}

/// Writes into `sink`, taking at most `room` bytes in all, then refusing.
fn into(sink: &mut Vec<u8>, room: usize) -> impl FnMut(&[IoSlice<'_>]) -> io::Result<usize> + '_ {
    move |iov| {
        let left = room.saturating_sub(sink.len());
        if left == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut taken = 0;
        for part in iov {
            let n = part.len().min(left - taken);
            sink.extend_from_slice(&part[..n]);
            taken += n;
            if taken == left {
                break;
            }
        }
        Ok(taken)
    }
}

#[test]
fn a_message_in_parts_is_never_cut() {
    let s = sessions(Options::default());
    let [key, other] = keys(2)[..] else { unreachable!() };
    s.open(key);
    let parts = |m: &'static [u8]| {
        [
            Bytes::from_static(&m[..1]),
            Bytes::from_static(&m[1..2]),
            Bytes::from_static(&m[2..]),
        ]
    };
    let queued = |s: &Sessions, key: SessionKey| {
        let table = s.table.borrow();
        let state = &table[key];
        let bytes: Vec<u8> = state.queue.iter().flat_map(|p| p.bytes.to_vec()).collect();
        (bytes[state.head_sent..].to_vec(), state.queued_bytes)
    };
    s.enqueue(key, &mut parts(b"AAA"), true, false);
    s.enqueue(key, &mut parts(b"BBB"), true, false);
    assert_eq!(s.stats.borrow().deliveries, 2);
    // A byte of the first part is out: the rest of that message stays.
    let mut sink = Vec::new();
    s.write(key, false, into(&mut sink, 1)).unwrap();
    assert_eq!(sink, b"A");
    s.close(key);
    assert_eq!(queued(&s, key), (b"AA".to_vec(), 2));
    // Only the rest of the message goes before other output, and
    // messages, not parts, are counted.
    let mut sink = Vec::new();
    s.write(key, true, into(&mut sink, 100)).unwrap();
    assert_eq!(sink, b"AA");
    assert_eq!(queued(&s, key), (Vec::new(), 0));
    assert_eq!(s.stats.borrow().messages_out, 1, "messages are counted, not parts");
    // Its first part out, the last two stay when the rest is dropped.
    let key = other;
    s.open(key);
    s.enqueue(key, &mut parts(b"CCC"), true, false);
    s.enqueue(key, &mut parts(b"DDD"), true, false);
    let mut sink = Vec::new();
    s.write(key, false, into(&mut sink, 1)).unwrap();
    s.close(key);
    assert_eq!(queued(&s, key), (b"CC".to_vec(), 2));
    assert_eq!(s.queued_bytes(), 2);
}

#[test]
fn a_grown_queue_is_kept_while_busy_and_freed_by_the_tick() {
    let s = sessions(Options::default());
    let [key] = keys(1)[..] else { unreachable!() };
    s.open(key);
    let capacity = || s.table.borrow()[key].queue.capacity();
    for _ in 0..IOV_PARTS * 5 {
        s.deliver_frame(key, &Bytes::from_static(b"x"), true, false);
    }
    let mut sink = Vec::new();
    s.write(key, false, into(&mut sink, usize::MAX)).unwrap();
    assert!(!s.has_deliveries(key));
    assert!(capacity() > IOV_PARTS * 2, "kept for the next batch");
    s.tick(1);
    assert_eq!(capacity(), 0, "freed once the tick finds it empty");
}

#[test]
fn a_hold_past_the_stall_timeout_sheds_stuck_subscribers_then_the_largest_queues() {
    for policy in [SlowConsumer::Close, SlowConsumer::Drop] {
        let s = sessions(budget_opts(policy, 2048));
        let [stuck, big, small] = keys(3)[..] else {
            unreachable!()
        };
        for key in [stuck, big, small] {
            s.open(key);
        }
        let mut cx = Context::from_waker(Waker::noop());
        // Queues of 1000, 2000 and 1200 bytes (and a byte before each of
        // the last two): over the 4096 budget.
        let frame = |n: usize| Bytes::from(vec![0u8; n]);
        s.deliver_frame(stuck, &frame(1000), true, false);
        s.deliver_frame(big, &frame(1), true, false);
        s.deliver_frame(big, &frame(2000), true, false);
        s.deliver_frame(small, &frame(1), true, false);
        s.deliver_frame(small, &frame(1200), true, false);
        assert!(s.poll_budget(&mut cx).is_pending());
        // The others took something (that byte) 60 ms into the hold.
        s.tick(60);
        for key in [big, small] {
            let mut sink = Vec::new();
            s.write(key, false, into(&mut sink, 1)).unwrap();
        }
        assert_eq!(s.tick(99), Vec::new());
        assert_eq!(s.queued_bytes(), 4200, "not stalled yet");
        // Held for the stall timeout: the stuck one goes, then the
        // largest queue, which takes the core down to half the budget.
        let slow = s.tick(100);
        assert_eq!(s.queued_bytes(), 1200);
        assert!(s.poll_budget(&mut cx).is_ready());
        assert!(s.has_deliveries(small));
        let stats = s.stats.borrow().clone();
        match policy {
            SlowConsumer::Close => {
                assert_eq!((stats.slow_consumers, stats.dropped), (2, 0));
                assert_eq!(slow, vec![stuck, big]);
            }
            SlowConsumer::Drop => {
                assert_eq!((stats.slow_consumers, stats.dropped), (0, 2));
                assert_eq!(slow, Vec::new());
            }
        }
    }
}

#[test]
fn a_subscriber_younger_than_the_stall_timeout_is_not_stuck() {
    let s = sessions(budget_opts(SlowConsumer::Close, 2048));
    let [big, fresh] = keys(2)[..] else { unreachable!() };
    let mut cx = Context::from_waker(Waker::noop());
    let frame = |n: usize| Bytes::from(vec![0u8; n]);
    s.tick(1000);
    s.open(big);
    s.deliver_frame(big, &frame(1), true, false);
    s.deliver_frame(big, &frame(4200), true, false);
    assert!(s.poll_budget(&mut cx).is_pending(), "held from 1000");
    s.tick(1060);
    let mut sink = Vec::new();
    s.write(big, false, into(&mut sink, 1)).unwrap();
    // A subscriber that arrives during the hold, 20 ms before it has
    // lasted the stall timeout, has had no time to take anything.
    s.tick(1080);
    s.open(fresh);
    s.deliver_frame(fresh, &frame(100), true, false);
    // Neither is stuck: the largest queue goes, and that is enough.
    assert_eq!(s.tick(1100), vec![big]);
    assert!(s.has_deliveries(fresh));
    assert_eq!(s.stats.borrow().slow_consumers, 1);
}

#[test]
fn a_removed_session_leaves_its_topics_and_publishes_and_the_total() {
    let s = sessions(Options::default());
    let [key] = keys(1)[..] else { unreachable!() };
    s.open(key);
    assert_eq!(s.join(key, b"a", 2), Ok(true));
    assert_eq!(s.join(key, b"a", 2), Ok(false));
    assert_eq!(s.join(key, b"b", 2), Ok(true));
    assert_eq!(s.join(key, b"c", 2), Err(TooManyTopics), "at most 2");
    s.deliver_frame(key, &Bytes::from_static(b"xyz"), true, false);
    assert_eq!(s.queued_bytes(), 3);
    let removed = s.remove(key).unwrap();
    assert_eq!(removed.topics.len(), 2);
    assert_eq!(s.queued_bytes(), 0);
    assert!(s.remove(key).is_none());
    // Nothing is queued for a session that is not (or no longer) one.
    s.deliver_frame(key, &Bytes::from_static(b"xyz"), true, false);
    assert_eq!(s.queued_bytes(), 0);
}

#[test]
fn a_session_without_pub_sub_state_keeps_no_envelopes_and_joins_as_one() {
    use crate::pubsub::mesh::Envelope;
    use crate::pubsub::message::Message;
    use crate::ws::MessageKind;
    let s = sessions(Options::default());
    let [key] = keys(1)[..] else { unreachable!() };
    let message = Arc::new(Message::native(MessageKind::Text, b"t", b"x", 1));
    let pending = vec![(1, Envelope::Publish(message))];
    // Nothing was taken from it, and nothing is kept: the envelope comes
    // back to be sent on, and it is not counted in flight.
    assert!(s.take_pending(key).is_empty());
    assert_eq!(s.put_pending(key, pending, true).map(|p| p.len()), Some(1));
    assert_eq!(s.in_flight(), 0);
    // Joining a topic makes it a pub/sub session, so its removal leaves it.
    assert_eq!(s.join(key, b"t", 1), Ok(true));
    assert_eq!(s.remove(key).unwrap().topics.len(), 1);
}

/// A session with its own compressor (context takeover): its deliveries
/// are compressed as they are written, in queue order, and what the
/// compressor took goes before any other output and is never dropped; one
/// inflater that keeps its window reads them all.
#[test]
fn what_a_session_s_own_compressor_took_goes_before_anything_else() {
    use crate::ws::deflate::{negotiate, Inflater, Mode};
    use crate::ws::frame::{decode_header, Role};
    let s = sessions(Options {
        compress_min_bytes: Some(100),
        ..Options::default()
    });
    let [key] = keys(1)[..] else { unreachable!() };
    s.open(key);
    let agreed = s
        .dedicated
        .agree(key, negotiate([&b"permessage-deflate"[..]], Mode::Dedicated).unwrap());
    assert!(agreed.server_takeover());
    s.set_deflate(key, agreed.server_window_bits, true);
    let body = |i: usize| format!("{i:04} {}", "{\"id\":7,\"side\":\"buy\"},".repeat(20)).into_bytes();
    let frame = |payload: &[u8]| crate::proto::native::frame(Opcode::Text, &[payload]);
    // Whole messages, one in two parts (as a STOMP head and shared rest),
    // one that may not be compressed, and one too short.
    s.enqueue(key, &mut [frame(&body(0))], true, true);
    let two = frame(&body(1));
    s.enqueue(key, &mut [two.slice(..50), two.slice(50..)], true, true);
    s.enqueue(key, &mut [frame(&body(2))], true, false);
    s.enqueue(key, &mut [frame(b"short")], true, true);
    s.enqueue(key, &mut [frame(&body(3))], true, true);
    let plain: usize = s.session_queued_bytes(key);
    // The socket takes 10 bytes: all five were compressed, and all of
    // them go before other output; closing drops none of them.
    let mut sink = Vec::new();
    s.write(key, false, into(&mut sink, 10)).unwrap();
    assert!(s.session_queued_bytes(key) + 10 < plain / 2, "compressed in the queue");
    assert_eq!(s.queued_bytes(), s.session_queued_bytes(key));
    s.close(key);
    s.write(key, true, into(&mut sink, 1 << 20)).unwrap();
    assert_eq!(s.queued_bytes(), 0);
    // Read back in order with one inflater.
    let mut inflater = Inflater::default();
    let mut at = 0;
    let mut got = Vec::new();
    while at < sink.len() {
        let (head, n) = decode_header(&sink[at..], Role::Client).unwrap().unwrap();
        let payload = &sink[at + n..at + n + head.payload_len as usize];
        let mut out = Vec::new();
        if head.rsv1 {
            inflater.inflate(payload, &mut out, 1 << 20, true).unwrap();
        } else {
            out = payload.to_vec();
        }
        got.push((head.rsv1, out));
        at += n + head.payload_len as usize;
    }
    let want = [
        (true, body(0)),
        (true, body(1)),
        (false, body(2)),
        (false, b"short".to_vec()),
        (true, body(3)),
    ];
    assert_eq!(got, want);
    assert_eq!(s.stats.borrow().messages_out, 5);
    assert_eq!(s.dedicated.snapshot().deflate.messages, 3);
}
