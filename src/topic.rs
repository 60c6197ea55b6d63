//! Topic names: what a topic is, for every layer that names one (the
//! protocols parse them, grants match them, the hub keys its table by
//! them). No I/O, no state.

/// Longest topic name, in bytes.
pub const MAX_TOPIC_BYTES: usize = 255;

/// Topic names: 1..=255 bytes of `A-Z a-z 0-9 . _ - : /`.
pub fn valid_topic(topic: &[u8]) -> bool {
    (1..=MAX_TOPIC_BYTES).contains(&topic.len())
        && topic
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'))
}

/// A segment of a dotted name: topic bytes without a dot.
pub fn valid_segment(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| b != b'.') && valid_topic(s)
}

/// Table keys that start with this byte are STOMP queues (`/queue/<name>`);
/// it is not a valid topic byte, so no topic name can collide with a
/// queue's key.
pub const QUEUE_PREFIX: u8 = b'#';

pub fn is_queue(key: &[u8]) -> bool {
    key.first() == Some(&QUEUE_PREFIX)
}

/// The table key of the queue `name`.
pub fn queue_key(name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(QUEUE_PREFIX);
    key.extend_from_slice(name);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_queue_keys() {
        assert!(valid_topic(b"a.b-c_d:e/f") && !valid_topic(b"") && !valid_topic(b"a b"));
        assert!(valid_topic(&[b'a'; MAX_TOPIC_BYTES]) && !valid_topic(&[b'a'; MAX_TOPIC_BYTES + 1]));
        assert!(valid_segment(b"ab") && !valid_segment(b"a.b"));
        assert!(is_queue(&queue_key(b"q")) && !is_queue(b"q"));
    }
}
