//! One core's topic table: topic -> the core's subscribers of it, and how
//! each one takes its messages.
//!
//! A topic exists while it has a subscriber on this core. Subscribers are
//! kept in insertion order with O(1) removal, so a publish walks a dense
//! list and an unsubscribe (or a closing connection) costs no scan. The
//! same table holds STOMP queues (under `QUEUE_PREFIX`), whose messages go
//! to one subscriber each, taken in turn (`next_in_turn`).

use std::cell::Cell;
use std::collections::HashMap;

use indexmap::IndexMap;

use super::SessionKey;

pub use crate::topic::is_queue;

/// How a session takes a topic's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// One native `MSG` frame.
    Native,
    /// The payload alone, in one frame (a backend route's connection
    /// subscribed by its upstream).
    Raw,
    /// One STOMP MESSAGE per subscription of the session to the topic.
    Stomp(Vec<StompTarget>),
}

/// A STOMP subscription, as its MESSAGE frames name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StompTarget {
    /// The subscription id, escaped for a header value.
    pub id: Box<str>,
    /// MESSAGE frames carry an `ack` header (ack mode client or
    /// client-individual).
    pub ack: bool,
}

#[derive(Default)]
pub struct Subscribers {
    pub sessions: IndexMap<SessionKey, Via>,
    /// The next session in turn for a queue.
    next: Cell<usize>,
}

impl Subscribers {
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The session whose turn it is (round robin), for a queue.
    pub fn next_in_turn(&self) -> Option<(SessionKey, &Via)> {
        if self.sessions.is_empty() {
            return None;
        }
        let at = self.next.get() % self.sessions.len();
        self.next.set(at + 1);
        self.sessions.get_index(at).map(|(k, v)| (*k, v))
    }
}

#[derive(Default)]
pub struct Topics {
    by_name: HashMap<Box<[u8]>, Subscribers>,
}

/// What a subscription change did to the topic on this core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The session's membership did not change: it was already in (or not
    /// in) the topic, or only one of its STOMP subscriptions came or went.
    None,
    /// The session joined (left) the topic.
    Joined,
    Left,
    /// The session was the topic's first subscriber on this core (or its
    /// last one left): the other cores must hear of it.
    FirstJoined,
    LastLeft,
}

impl Topics {
    /// Adds `session` to `topic`, taking messages `via` that way; a
    /// `Via::Stomp` adds its subscriptions to the session's.
    pub fn subscribe(&mut self, topic: &[u8], session: SessionKey, via: Via) -> Change {
        let Some(subscribers) = self.by_name.get_mut(topic) else {
            let mut subscribers = Subscribers::default();
            subscribers.sessions.insert(session, via);
            self.by_name.insert(topic.into(), subscribers);
            return Change::FirstJoined;
        };
        match (subscribers.sessions.get_mut(&session), via) {
            (None, via) => {
                subscribers.sessions.insert(session, via);
                Change::Joined
            }
            (Some(Via::Stomp(targets)), Via::Stomp(mut more)) => {
                targets.append(&mut more);
                Change::None
            }
            (Some(_), _) => Change::None,
        }
    }

    /// Removes `session` from `topic`, or (`id` given) only its STOMP
    /// subscription `id` (escaped), and the session once it has none left.
    pub fn unsubscribe(&mut self, topic: &[u8], session: SessionKey, id: Option<&str>) -> Change {
        let Some(subscribers) = self.by_name.get_mut(topic) else {
            return Change::None;
        };
        if let (Some(id), Some(Via::Stomp(targets))) = (id, subscribers.sessions.get_mut(&session)) {
            targets.retain(|t| &*t.id != id);
            if !targets.is_empty() {
                return Change::None;
            }
        }
        if subscribers.sessions.swap_remove(&session).is_none() {
            return Change::None;
        }
        if subscribers.sessions.is_empty() {
            self.by_name.remove(topic);
            return Change::LastLeft;
        }
        Change::Left
    }

    pub fn subscribers(&self, topic: &[u8]) -> Option<&Subscribers> {
        self.by_name.get(topic)
    }

    /// Sessions subscribed to `topic` on this core.
    pub fn count(&self, topic: &[u8]) -> usize {
        self.by_name.get(topic).map_or(0, Subscribers::len)
    }

    pub fn topic_count(&self) -> usize {
        self.by_name.len()
    }

    /// Every topic (and queue key) of this core with its subscribers here,
    /// as `decode_counts` reads them: for each, the count (4 bytes, big
    /// endian), the name's length (2 bytes) and the name.
    pub fn encode_counts(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.by_name.len() * 24);
        for (name, subscribers) in &self.by_name {
            // A topic name is at most 255 bytes (`topic::valid`), a queue
            // key one more: the length fits.
            let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&u32::try_from(subscribers.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&name[..usize::from(len)]);
        }
        out
    }
}

/// Reads what `Topics::encode_counts` wrote: (name, subscribers) pairs;
/// it stops at a truncated entry.
pub fn decode_counts(mut bytes: &[u8]) -> impl Iterator<Item = (&[u8], u32)> {
    std::iter::from_fn(move || {
        let (count, rest) = bytes.split_first_chunk::<4>()?;
        let (len, rest) = rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        let name = rest.get(..len)?;
        bytes = &rest[len..];
        Some((name, u32::from_be_bytes(*count)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use slotmap::{Key, KeyData};

    fn key(n: u64) -> SessionKey {
        SessionKey::from(KeyData::from_ffi((1 << 32) | n))
    }

    fn target(id: &str) -> Via {
        Via::Stomp(vec![StompTarget {
            id: id.into(),
            ack: false,
        }])
    }

    #[test]
    fn first_and_last_subscriber_are_reported() {
        let mut t = Topics::default();
        assert_eq!(t.subscribe(b"a", key(1), Via::Native), Change::FirstJoined);
        assert_eq!(t.subscribe(b"a", key(1), Via::Native), Change::None);
        assert_eq!(t.subscribe(b"a", key(2), Via::Native), Change::Joined);
        assert_eq!(t.count(b"a"), 2);
        assert_eq!(t.unsubscribe(b"a", key(3), None), Change::None);
        assert_eq!(t.unsubscribe(b"b", key(1), None), Change::None);
        assert_eq!(t.unsubscribe(b"a", key(1), None), Change::Left);
        assert_eq!(t.unsubscribe(b"a", key(2), None), Change::LastLeft);
        assert!(t.subscribers(b"a").is_none());
        assert_eq!(t.topic_count(), 0);
        assert!(!key(1).is_null());
    }

    #[test]
    fn a_session_leaves_with_its_last_stomp_subscription() {
        let mut t = Topics::default();
        assert_eq!(t.subscribe(b"a", key(1), target("s1")), Change::FirstJoined);
        assert_eq!(t.subscribe(b"a", key(1), target("s2")), Change::None);
        let via = &t.subscribers(b"a").unwrap().sessions[&key(1)];
        assert!(matches!(via, Via::Stomp(v) if v.len() == 2));
        assert_eq!(t.unsubscribe(b"a", key(1), Some("s1")), Change::None);
        assert_eq!(t.unsubscribe(b"a", key(1), Some("nope")), Change::None);
        assert_eq!(t.unsubscribe(b"a", key(1), Some("s2")), Change::LastLeft);
        // A closing session leaves whatever its subscriptions.
        t.subscribe(b"a", key(1), target("s1"));
        t.subscribe(b"a", key(1), target("s2"));
        assert_eq!(t.unsubscribe(b"a", key(1), None), Change::LastLeft);
    }

    #[test]
    fn queue_turns_go_round() {
        let mut t = Topics::default();
        for n in 1..=3 {
            t.subscribe(b"#q", key(n), target("s"));
        }
        let s = t.subscribers(b"#q").unwrap();
        let turns: Vec<_> = (0..6).map(|_| s.next_in_turn().unwrap().0).collect();
        assert_eq!(turns, [key(1), key(2), key(3), key(1), key(2), key(3)]);
        assert!(is_queue(b"#q") && !is_queue(b"q"));
    }

    #[test]
    fn counts_are_read_back_as_written() {
        let mut topics = Topics::default();
        for n in 0..3 {
            topics.subscribe(b"news", key(n), Via::Native);
        }
        topics.subscribe(b"#jobs", key(0), Via::Native);
        let long = vec![b'a'; 255];
        topics.subscribe(&long, key(1), Via::Native);
        let bytes = topics.encode_counts();
        let mut read: Vec<(Vec<u8>, u32)> = decode_counts(&bytes).map(|(n, c)| (n.to_vec(), c)).collect();
        read.sort();
        assert_eq!(
            read,
            vec![(b"#jobs".to_vec(), 1), (long.clone(), 1), (b"news".to_vec(), 3)]
        );
        // A truncated answer yields the whole entries before the cut.
        assert_eq!(decode_counts(&bytes[..bytes.len() - 1]).count(), 2);
        assert_eq!(decode_counts(&[]).count(), 0);
    }
}
