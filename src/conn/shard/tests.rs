//! The shard and its sessions, driven without a task: kicks, timeouts,
//! parking, rate limits, the flusher, shutdown.

use super::*;
use crate::config::Options;
use crate::pubsub::sessions::tests::budget_opts;
use crate::ws::MessageKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Wake;

struct CountingWaker(AtomicUsize);
impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn shard() -> Rc<Shard> {
    let opts = Options {
        handshake_timeout_ms: Some(100),
        ping_interval_ms: Some(1000),
        idle_timeout_ms: Some(3000),
        close_timeout_ms: Some(500),
        ..Options::default()
    };
    test_shard(opts)
}

pub(crate) fn test_shard(opts: Options) -> Rc<Shard> {
    let mesh = crate::pubsub::mesh::build(1, 16, None).unwrap().pop().unwrap();
    let config = Arc::new(opts.validate(1).unwrap());
    let admission = Arc::new(crate::conn::admission::Admission::from_config(&config));
    Shard::new(config, mesh, admission, None).unwrap()
}

/// Queues a whole frame for session `key`, as the admin API does.
fn deliver(shard: &Rc<Shard>, key: SessionKey, frame: &Bytes) {
    shard.hub.sessions.deliver_frame(key, frame, true, false);
}

fn waker() -> (Arc<CountingWaker>, Waker) {
    let w = Arc::new(CountingWaker(AtomicUsize::new(0)));
    (w.clone(), Waker::from(w))
}

#[test]
fn handshake_timeout_at_the_limit() {
    let shard = shard();
    let s = shard.open_session();
    let (count, w) = waker();
    assert_eq!(s.poll_kick(&w), None);
    shard.sweep_at(99);
    assert_eq!(count.0.load(Ordering::SeqCst), 0);
    shard.sweep_at(100);
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
    assert_eq!(s.poll_kick(&w), Some(Kick::TIMEOUT));
    assert_eq!(s.poll_kick(&w), None, "a kick is taken once");
}

#[test]
fn pings_when_quiet_then_idle_timeout() {
    let shard = shard();
    let s = shard.open_session();
    s.set_phase(Phase::Open);
    let (_, w) = waker();
    s.poll_kick(&w);
    shard.sweep_at(999);
    assert_eq!(s.poll_kick(&w), None);
    shard.sweep_at(1000);
    assert_eq!(s.poll_kick(&w), Some(Kick::PING));
    // One ping per interval, not one per tick.
    shard.sweep_at(1500);
    assert_eq!(s.poll_kick(&w), None);
    shard.sweep_at(2000);
    assert_eq!(s.poll_kick(&w), Some(Kick::PING));
    // Hearing from the peer resets the idle clock.
    s.peer_alive();
    shard.sweep_at(4999);
    assert_eq!(s.poll_kick(&w), Some(Kick::PING));
    shard.sweep_at(5000);
    assert_eq!(s.poll_kick(&w), Some(Kick::TIMEOUT));
}

#[test]
fn quiet_open_session_is_asked_to_park_once_per_interval() {
    let opts = Options {
        ping_interval_ms: Some(1000),
        idle_timeout_ms: Some(3000),
        park_after_ms: Some(400),
        ..Options::default()
    };
    let shard = test_shard(opts);
    let s = shard.open_session();
    let h = shard.open_session();
    s.set_phase(Phase::Open);
    let (_, w) = waker();
    // Without the lot's waiter running, nothing is asked to park.
    shard.sweep_at(400);
    assert_eq!(s.poll_kick(&w), None);
    shard.enable_parking();
    shard.sweep_at(399);
    assert_eq!(s.poll_kick(&w), None, "quiet for less than park_after_ms");
    shard.sweep_at(400);
    assert_eq!(s.poll_kick(&w), Some(Kick::PARK));
    // A session that could not park is asked again one interval later.
    shard.sweep_at(799);
    assert_eq!(s.poll_kick(&w), None);
    shard.sweep_at(800);
    assert_eq!(s.poll_kick(&w), Some(Kick::PARK));
    // A due ping comes first; parking waits for a later tick.
    shard.sweep_at(1200);
    assert_eq!(s.poll_kick(&w), Some(Kick::PING));
    shard.sweep_at(1600);
    assert_eq!(s.poll_kick(&w), Some(Kick::PARK));
    // Hearing from the peer restarts the quiet time.
    s.peer_alive();
    shard.sweep_at(1999);
    assert_eq!(s.poll_kick(&w), None);
    // Sessions in the handshake (or closing) never park.
    assert_eq!(h.poll_kick(&w), None);
}

#[test]
fn outbound_limit_is_exact() {
    let opts = Options {
        max_outbound_bytes: Some(1024),
        ..Options::default()
    };
    let shard = test_shard(opts);
    let s = shard.open_session();
    s.set_phase(Phase::Open);
    s.enable_pubsub();
    let (_, w) = waker();
    let frame = Bytes::from(vec![0u8; 512]);
    deliver(&shard, s.key(), &frame);
    assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
    // Before its socket has refused anything, a burst is not the
    // subscriber's backlog: all of it is queued.
    deliver(&shard, s.key(), &Bytes::from(vec![0u8; 4096]));
    assert_eq!(shard.hub.sessions.queued_bytes(), 512 + 4096);
    let (_full, _peer) = stall(&s);
    // A backlog one byte short of the limit takes a message of any
    // size: the limit bounds what waits, not one message.
    let s = shard.open_session();
    s.set_phase(Phase::Open);
    s.enable_pubsub();
    let queued = shard.hub.sessions.queued_bytes();
    deliver(&shard, s.key(), &frame);
    let (_full, _peer) = stall(&s);
    deliver(&shard, s.key(), &Bytes::from(vec![0u8; 511]));
    deliver(&shard, s.key(), &Bytes::from(vec![0u8; 4096]));
    assert_eq!(shard.stats.borrow().deliveries, 5);
    assert_eq!(shard.hub.sessions.queued_bytes() - queued, 1023 + 4096);
    assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
    // A backlog at or past the limit takes no more: the session is a
    // slow consumer, its queue freed.
    deliver(&shard, s.key(), &Bytes::from_static(&[0]));
    assert_eq!(s.poll_kick(&w), Some(Kick::SLOW));
    assert_eq!(shard.stats.borrow().slow_consumers, 1);
    assert!(!s.has_deliveries());
    assert_eq!(shard.hub.sessions.queued_bytes(), queued);
    // And it takes nothing more.
    deliver(&shard, s.key(), &frame);
    assert_eq!(shard.stats.borrow().deliveries, 5);
    // An empty queue takes one message larger than the limit.
    let t = shard.open_session();
    t.set_phase(Phase::Open);
    t.enable_pubsub();
    deliver(&shard, t.key(), &Bytes::from(vec![0u8; 1024 * 64]));
    assert!(t.has_deliveries());
    assert_eq!(shard.stats.borrow().slow_consumers, 1);
}

#[test]
fn outbound_limit_under_drop_policy_drops_and_counts() {
    let opts = Options {
        max_outbound_bytes: Some(1024),
        slow_consumer: Some(crate::config::SlowConsumer::Drop),
        ..Options::default()
    };
    let shard = test_shard(opts);
    let s = shard.open_session();
    s.set_phase(Phase::Open);
    s.enable_pubsub();
    let frame = Bytes::from(vec![0u8; 512]);
    deliver(&shard, s.key(), &frame);
    let (_full, _peer) = stall(&s);
    for _ in 0..2 {
        deliver(&shard, s.key(), &frame);
    }
    let stats = shard.stats.borrow();
    // The third finds a backlog at the limit.
    assert_eq!((stats.deliveries, stats.dropped, stats.slow_consumers), (2, 1, 0));
    drop(stats);
    assert!(s.has_deliveries());
}

/// Tries to write `s`'s deliveries to a socket that takes nothing (its
/// peer never reads): the socket refuses them, as a stalled peer's does.
fn stall(s: &Session) -> (std::os::unix::net::UnixStream, std::os::unix::net::UnixStream) {
    use std::io::Write;
    use std::os::fd::AsFd;
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    while (&ours).write(&[0u8; 4096]).is_ok() {}
    let flushed = s.flush_deliveries(&Socket::from_fd(ours.as_fd()), false).unwrap();
    assert!(matches!(flushed, Flush::Blocked));
    (ours, peer)
}

fn open_subscriber(shard: &Rc<Shard>) -> Session {
    let s = shard.open_session();
    s.set_phase(Phase::Open);
    s.enable_pubsub();
    s
}

/// Every way a subscriber starts closing (peer close, violation, rate
/// limit, idle timeout, admin close, missed heart-beats, token expiry)
/// goes through `Phase::Closing`, which drops its unsent deliveries:
/// they leave the core's total then, not only when the slot goes.
#[test]
fn deliveries_dropped_at_closing_leave_the_core_total() {
    let shard = test_shard(budget_opts(crate::config::SlowConsumer::Close, 1024));
    let s = open_subscriber(&shard);
    deliver(&shard, s.key(), &Bytes::from(vec![0u8; 1000]));
    assert_eq!(shard.hub.sessions.queued_bytes(), 1000);
    s.set_phase(Phase::Closing);
    assert_eq!(shard.hub.sessions.queued_bytes(), 0, "dropped at the close");
    drop(s);
    assert_eq!(shard.hub.sessions.queued_bytes(), 0);
    // Over the budget with publishers held: subscribers that close
    // release the hold, and the core is left with nothing counted.
    let subs: Vec<Session> = (0..5).map(|_| open_subscriber(&shard)).collect();
    for s in &subs {
        deliver(&shard, s.key(), &Bytes::from(vec![0u8; 1000]));
    }
    let (woken, w) = waker();
    let mut cx = std::task::Context::from_waker(&w);
    assert!(shard.hub.sessions.poll_budget(&mut cx).is_pending());
    for s in &subs {
        s.set_phase(Phase::Closing);
    }
    assert_eq!(woken.0.load(Ordering::SeqCst), 1, "the hold ended");
    assert!(shard.hub.sessions.poll_budget(&mut cx).is_ready());
    drop(subs);
    assert_eq!((shard.session_count(), shard.hub.sessions.queued_bytes()), (0, 0));
    assert!(!shard.hub.sessions.over_budget());
}

#[test]
fn core_budget_holds_publishers_past_the_limit_until_half_is_written() {
    use std::os::fd::AsFd;
    let shard = test_shard(budget_opts(crate::config::SlowConsumer::Close, 1024));
    let subs: Vec<Session> = (0..5).map(|_| open_subscriber(&shard)).collect();
    subs[4].subscribe(b"t").unwrap();
    let publisher = open_subscriber(&shard);
    let (woken, w) = waker();
    let mut cx = std::task::Context::from_waker(&w);
    let kib = Bytes::from(vec![0u8; 1024]);
    for s in &subs[..4] {
        deliver(&shard, s.key(), &kib);
    }
    // Exactly at the budget: publishing goes on.
    assert_eq!(shard.hub.sessions.queued_bytes(), 4096);
    assert!(!shard.hub.sessions.over_budget());
    assert!(shard.hub.sessions.poll_budget(&mut cx).is_ready());
    // The publish that takes the core over is made; then its publisher
    // waits, not read until the hold ends.
    publisher.publish(MessageKind::Binary, b"t", &[7; 100]);
    assert!(shard.hub.sessions.over_budget());
    assert!(publisher.is_blocked());
    assert!(publisher.poll_unblocked(&mut cx).is_pending());
    assert!(shard.hub.sessions.poll_budget(&mut cx).is_pending());
    assert_eq!(shard.hub.sessions.budget_waiter_count(), 1, "one waker per task");
    assert_eq!(shard.stats.borrow().publish_holds, 1);
    // Written down, but still above half: held.
    let (ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let socket = Socket::from_fd(ours.as_fd());
    for s in [&subs[4], &subs[0]] {
        s.flush_deliveries(&socket, false).unwrap();
    }
    assert_eq!(shard.hub.sessions.queued_bytes(), 3072);
    assert!(shard.hub.sessions.poll_budget(&mut cx).is_pending());
    assert_eq!(woken.0.load(Ordering::SeqCst), 0);
    // Exactly half: the hold ends and its waiters are woken.
    subs[1].flush_deliveries(&socket, false).unwrap();
    assert_eq!(shard.hub.sessions.queued_bytes(), 2048);
    assert_eq!(woken.0.load(Ordering::SeqCst), 1);
    assert!(publisher.poll_unblocked(&mut cx).is_ready());
    assert!(!publisher.is_blocked());
    // A session that ends gives its queue back.
    drop(subs);
    assert_eq!(shard.hub.sessions.queued_bytes(), 0);
}

#[test]
fn rate_limits_are_exact_and_refill_with_time() {
    let shard = test_shard(Options {
        max_messages_per_sec: Some(3),
        max_bytes_per_sec: Some(1000),
        ..Options::default()
    });
    let s = shard.open_session();
    // A second's worth at once: three messages, the fourth refused.
    for _ in 0..3 {
        assert!(s.take_tokens(10));
    }
    assert!(!s.take_tokens(10));
    assert_eq!(shard.stats.borrow().rate_limited, 1);
    // 333 ms give back 0.999 of a message: still refused; 334 ms, one.
    shard.sweep_at(333);
    assert!(!s.take_tokens(10));
    shard.sweep_at(334);
    assert!(s.take_tokens(10));
    assert!(!s.take_tokens(10));
    // Bytes: a full bucket (1000) takes a 1500-byte message and is
    // overdrawn by 500, so nothing passes until 500 ms have refilled it.
    let b = shard.open_session();
    assert!(b.take_tokens(1500));
    shard.sweep_at(334 + 499);
    assert!(!b.take_tokens(1));
    shard.sweep_at(334 + 500);
    assert!(b.take_tokens(1));
    // No limits: always.
    let free = test_shard(Options::default()).open_session();
    assert!((0..10_000).all(|_| free.take_tokens(1 << 20)));
}

#[test]
fn idle_sessions_take_deliveries_without_their_task() {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let shard = test_shard(Options::default());
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let s = shard.open_session();
    s.set_phase(Phase::Open);
    s.enable_pubsub();
    s.set_fd(ours.as_raw_fd());
    let (woken, w) = waker();
    let mut cx = std::task::Context::from_waker(&w);
    let mut batch = Vec::new();
    assert!(shard.poll_ready(&mut cx, &mut batch).is_pending());

    // Waiting in its idle wait: queued, and the flusher (not the task) told.
    s.set_direct(true);
    deliver(&shard, s.key(), &Bytes::from_static(b"one"));
    deliver(&shard, s.key(), &Bytes::from_static(b"two"));
    assert_eq!(woken.0.load(Ordering::SeqCst), 1, "the flusher is woken once");
    assert!(shard.poll_ready(&mut cx, &mut batch).is_ready());
    assert_eq!(batch, vec![(s.key(), Ready::Deliver)]);
    assert_eq!(shard.flush_direct(&batch, 0, 8), 1);
    let mut got = [0u8; 6];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"onetwo");
    assert!(!s.has_deliveries());
    assert_eq!(s.poll_kick(&w), None, "its task was not disturbed");

    // Its task runs: the task is kicked at the delivery and writes them
    // itself; the flusher is not involved.
    s.set_direct(false);
    deliver(&shard, s.key(), &Bytes::from_static(b"three"));
    assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
    batch.clear();
    assert!(shard.poll_ready(&mut cx, &mut batch).is_pending());
    assert!(s.has_deliveries(), "left to its task");
    s.flush_deliveries(&Socket::from_fd(ours.as_fd()), false).unwrap();

    // A full socket is left to the task, kicked to wait for it; the
    // frame stays queued.
    let filler = [0u8; 4096];
    while (&ours).write(&filler).is_ok() {}
    s.set_direct(true);
    deliver(&shard, s.key(), &Bytes::from_static(b"four"));
    batch.clear();
    assert!(shard.poll_ready(&mut cx, &mut batch).is_ready());
    assert_eq!(shard.flush_direct(&batch, 0, 8), 1);
    assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
    assert!(s.has_deliveries());
}

#[test]
fn stomp_heart_beats_are_sent_and_required() {
    let shard = test_shard(Options {
        stomp_heart_beat_grace_ms: Some(50),
        ping_interval_ms: Some(0),
        idle_timeout_ms: Some(0),
        park_after_ms: Some(0),
        ..Options::default()
    });
    let s = shard.open_session();
    s.set_phase(Phase::Open);
    s.enable_pubsub();
    s.set_heart_beats(100, 200);
    let (_, w) = waker();
    shard.sweep_at(99);
    assert!(!s.has_deliveries());
    shard.sweep_at(100);
    assert!(s.has_deliveries(), "an EOL is queued after 100 ms without output");
    assert_eq!(s.poll_kick(&w), Some(Kick::DELIVER));
    assert_eq!(shard.stats.borrow().deliveries, 0, "a heart-beat is not a delivery");
    shard.sweep_at(150);
    assert_eq!(shard.hub.sessions.queue_len(s.key()), 1, "one at a time");
    // The peer promised one every 200 ms: at 200 + 50 ms of silence
    // (since 150) it is closed.
    s.peer_alive();
    shard.sweep_at(399);
    assert_eq!(s.poll_kick(&w), None);
    shard.sweep_at(400);
    assert_eq!(s.poll_kick(&w), Some(Kick::CLOSE));
    assert_eq!(
        s.take_close_request(),
        Some((1001, Bytes::from_static(b"missed heart-beats")))
    );
}

#[test]
fn flush_rounds_stop_at_their_slice() {
    let shard = test_shard(Options::default());
    let sessions: Vec<Session> = (0..3).map(|_| shard.open_session()).collect();
    let keys: Vec<(SessionKey, Ready)> = sessions.iter().map(|s| (s.key(), Ready::Deliver)).collect();
    assert_eq!(shard.flush_direct(&keys, 0, 2), 2);
    assert_eq!(shard.flush_direct(&keys, 2, 2), 3);
}

#[test]
fn close_timeout() {
    let shard = shard();
    let s = shard.open_session();
    s.set_phase(Phase::Closing);
    let (_, w) = waker();
    shard.sweep_at(499);
    assert_eq!(s.poll_kick(&w), None);
    shard.sweep_at(500);
    assert_eq!(s.poll_kick(&w), Some(Kick::TIMEOUT));
}

#[test]
fn shutdown_kicks_once_and_empty_table_wakes_watcher() {
    let shard = shard();
    let a = shard.open_session();
    a.set_phase(Phase::Open);
    let h = shard.open_session();
    let (watched, ww) = waker();
    shard.watch(&ww);
    let (_, w) = waker();
    // Input stops: handshakes are refused at once, open sessions are
    // not closed yet (their deliveries may still be on their way).
    shard.stop_taking_input();
    assert!(shard.takes_no_input());
    assert_eq!(watched.0.load(Ordering::SeqCst), 1);
    assert!(h.poll_kick(&w).unwrap().has(Kick::SHUTDOWN));
    shard.sweep();
    assert_eq!(a.poll_kick(&w), None);
    assert_eq!(h.poll_kick(&w), None, "shutdown is sent once");
    drop(h);
    // Then every session is closed.
    shard.close_all();
    assert!(a.poll_kick(&w).unwrap().has(Kick::SHUTDOWN));
    shard.sweep();
    assert_eq!(a.poll_kick(&w), None, "shutdown is sent once");
    assert!(!a.poll_kick(&w).is_some_and(|k| k.has(Kick::ABORT)));
    shard.abort_all();
    assert!(a.poll_kick(&w).unwrap().has(Kick::ABORT));
    // A session opened during the drain is told at the next tick.
    let b = shard.open_session();
    shard.sweep();
    assert!(b.poll_kick(&w).unwrap().has(Kick::SHUTDOWN));
    shard.watch(&ww);
    drop(a);
    assert_eq!(watched.0.load(Ordering::SeqCst), 1);
    drop(b);
    assert_eq!(watched.0.load(Ordering::SeqCst), 2);
    assert_eq!(shard.session_count(), 0);
}

#[test]
fn tick_follows_shortest_timeout() {
    assert_eq!(shard().tick_ms(), 25);
    let default = test_shard(Options::default());
    assert_eq!(default.tick_ms(), 100);
}
