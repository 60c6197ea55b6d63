//! One core's topic table: topic -> the core's subscribers of it.
//!
//! A topic exists while it has a subscriber on this core. Subscribers are
//! kept in insertion order with O(1) removal, so a publish walks a dense
//! list and an unsubscribe (or a closing connection) costs no scan.

use std::collections::HashMap;

use indexmap::IndexSet;

use crate::conn::shard::SessionKey;

#[derive(Default)]
pub struct Topics {
    by_name: HashMap<Box<[u8]>, IndexSet<SessionKey>>,
}

/// What a subscription change did to the topic on this core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing: already subscribed, or not subscribed.
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
    pub fn subscribe(&mut self, topic: &[u8], session: SessionKey) -> Change {
        match self.by_name.get_mut(topic) {
            Some(subscribers) => {
                if subscribers.insert(session) {
                    Change::Joined
                } else {
                    Change::None
                }
            }
            None => {
                self.by_name.insert(topic.into(), IndexSet::from([session]));
                Change::FirstJoined
            }
        }
    }

    pub fn unsubscribe(&mut self, topic: &[u8], session: SessionKey) -> Change {
        let Some(subscribers) = self.by_name.get_mut(topic) else {
            return Change::None;
        };
        if !subscribers.swap_remove(&session) {
            return Change::None;
        }
        if subscribers.is_empty() {
            self.by_name.remove(topic);
            return Change::LastLeft;
        }
        Change::Left
    }

    pub fn subscribers(&self, topic: &[u8]) -> Option<&IndexSet<SessionKey>> {
        self.by_name.get(topic)
    }

    pub fn topic_count(&self) -> usize {
        self.by_name.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slotmap::{Key, KeyData};

    fn key(n: u64) -> SessionKey {
        SessionKey::from(KeyData::from_ffi((1 << 32) | n))
    }

    #[test]
    fn first_and_last_subscriber_are_reported() {
        let mut t = Topics::default();
        assert_eq!(t.subscribe(b"a", key(1)), Change::FirstJoined);
        assert_eq!(t.subscribe(b"a", key(1)), Change::None);
        assert_eq!(t.subscribe(b"a", key(2)), Change::Joined);
        assert_eq!(t.subscribers(b"a").unwrap().len(), 2);
        assert_eq!(t.unsubscribe(b"a", key(3)), Change::None);
        assert_eq!(t.unsubscribe(b"b", key(1)), Change::None);
        assert_eq!(t.unsubscribe(b"a", key(1)), Change::Left);
        assert_eq!(t.unsubscribe(b"a", key(2)), Change::LastLeft);
        assert!(t.subscribers(b"a").is_none());
        assert_eq!(t.topic_count(), 0);
        assert!(!key(1).is_null());
    }
}
