//! NATS subjects and headers of the bus (docs/PROTOCOL.md, "Cluster").
//!
//! - a topic `T`: `<prefix>.t.<T>`, each empty token of `T` (`a..b`, a
//!   leading or trailing dot) written `=`;
//! - a STOMP queue `Q` (`/queue/Q`): `<prefix>.q.<Q>`, the same way, taken
//!   by the queue group `<prefix>`: one member per node;
//! - requests for node `N`'s sessions: `<prefix>.node.<N>`.
//!
//! A topic's bytes (`A-Z a-z 0-9 . _ - : /`, `topic::valid_topic`) hold no
//! NATS wildcard (`*`, `>`), no whitespace and no `=`, so every topic maps
//! to a valid subject, and back: the mapping is one to one.

use bytes::Bytes;

use crate::topic::{is_queue, valid_topic};

/// The message kind: `text` or `binary`. Absent, a payload that is valid
/// UTF-8 is text (sluice sends it on binary messages only).
pub const KIND: &str = "Sluice-Kind";
/// The node that published it, when that node subscribes to the topic too;
/// a node drops its own topic messages.
pub const NODE: &str = "Sluice-Node";
/// When the sending node's bridge took it, in microseconds since the Unix
/// epoch, on at most one message a millisecond (the cross-node lag
/// histogram samples them).
pub const TIME: &str = "Sluice-Time";
/// A STOMP publisher's pass-through headers, as `Message::stomp_headers`
/// holds them, in standard base64.
pub const STOMP_HEADERS: &str = "Sluice-Stomp-Headers";
/// `no`: the message must not be compressed (`Message::compress`).
pub const COMPRESS: &str = "Sluice-Compress";
/// Node requests: the action (`send`, `close`; and `hello`), the session
/// (`<core>.<slot>.<generation>`), to send the kind, to close the code.
pub const ACTION: &str = "Sluice-Action";
pub const SESSION: &str = "Sluice-Session";
pub const CODE: &str = "Sluice-Code";
/// Until when (Unix milliseconds) the asker waits; a request that arrives
/// later is not carried out.
pub const DEADLINE: &str = "Sluice-Deadline";
/// A node's `hello` on its own subject, at each connect: its process's
/// random instance id, which tells two processes with one node id apart.
pub const INSTANCE: &str = "Sluice-Instance";

/// Written for an empty token of a topic.
const EMPTY_TOKEN: &str = "=";

/// The bus's subjects for one prefix and node.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Subjects {
        Subjects { prefix: prefix.into() }
    }

    /// The subject of a topic table key (a topic, or `#` and a queue's
    /// name).
    pub fn of_key(&self, key: &[u8]) -> String {
        let (kind, name) = if is_queue(key) { ("q", &key[1..]) } else { ("t", key) };
        // Topic bytes are ASCII (checked when published or subscribed).
        let name = std::str::from_utf8(name).unwrap_or_default();
        let mut subject = String::with_capacity(self.prefix.len() + 3 + name.len() + 8);
        subject.push_str(&self.prefix);
        subject.push('.');
        subject.push_str(kind);
        for token in name.split('.') {
            subject.push('.');
            subject.push_str(if token.is_empty() { EMPTY_TOKEN } else { token });
        }
        subject
    }

    /// The topic table key of a subject of ours; `None` for any other
    /// subject, or one whose name is not a valid topic.
    pub fn key_of(&self, subject: &str) -> Option<Bytes> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let (queue, name) = match rest.split_once('.')? {
            ("t", name) => (false, name),
            ("q", name) => (true, name),
            _ => return None,
        };
        let mut key = Vec::with_capacity(name.len() + 1);
        if queue {
            key.push(b'#');
        }
        for (i, token) in name.split('.').enumerate() {
            if i > 0 {
                key.push(b'.');
            }
            if token != EMPTY_TOKEN {
                key.extend_from_slice(token.as_bytes());
            }
        }
        valid_topic(&key[usize::from(queue)..]).then(|| Bytes::from(key))
    }

    /// The queue group every node's subscription to a queue joins.
    pub fn queue_group(&self) -> &str {
        &self.prefix
    }

    /// Where node `node` takes requests for its sessions.
    pub fn node(&self, node: &str) -> String {
        format!("{}.node.{node}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What nats-server takes as a subject to subscribe to, without
    /// wildcards: tokens split by `.`, none empty, no whitespace, `*` or
    /// `>` as a token.
    fn valid_subject(s: &str) -> bool {
        !s.is_empty()
            && s.split('.')
                .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.bytes().any(|b| b.is_ascii_whitespace() || b == 0))
    }

    #[test]
    fn topics_and_queues_map_both_ways() {
        let s = Subjects::new("sluice");
        for (key, subject) in [
            (&b"news"[..], "sluice.t.news"),
            (b"a.b", "sluice.t.a.b"),
            (b"a..b", "sluice.t.a.=.b"),
            (b".", "sluice.t.=.="),
            (b".a.", "sluice.t.=.a.="),
            (b"user.42", "sluice.t.user.42"),
            (b"x:y/z-_", "sluice.t.x:y/z-_"),
            (b"#jobs", "sluice.q.jobs"),
            (b"#a..b", "sluice.q.a.=.b"),
        ] {
            assert_eq!(s.of_key(key), subject, "{key:?}");
            assert_eq!(s.key_of(subject).as_deref(), Some(key), "{subject}");
        }
        for foreign in [
            "other.t.news",
            "sluice.x.news",
            "sluice.t",
            "sluice.t.a*b",
            "sluice.t.a b",
            "sluicey.t.a",
        ] {
            assert_eq!(s.key_of(foreign), None, "{foreign}");
        }
        let long = "a".repeat(256);
        assert_eq!(s.key_of(&format!("sluice.t.{long}")), None, "over 255 bytes");
        assert_eq!(s.node("n1"), "sluice.node.n1");
    }

    proptest! {
        /// Every valid topic (queue) makes a valid subject that maps back
        /// to it.
        #[test]
        fn every_valid_topic_maps_to_a_valid_subject_and_back(
            topic in "[A-Za-z0-9._:/-]{1,255}",
            queue in any::<bool>(),
            prefix in "[a-z_-]{1,8}(\\.[a-z0-9]{1,4}){0,2}",
        ) {
            let s = Subjects::new(&prefix);
            let key = if queue { format!("#{topic}") } else { topic.clone() };
            let subject = s.of_key(key.as_bytes());
            prop_assert!(valid_subject(&subject), "{subject}");
            prop_assert_eq!(s.key_of(&subject), Some(Bytes::from(key)));
        }
    }
}
