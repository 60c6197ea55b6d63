//! One STOMP connection's protocol state, without I/O: the codec and the
//! session rules together. WebSocket messages go in (`push`); each whole
//! frame comes out as the `Action`s it asks for (`step`), which the
//! connection carries out (and may refuse: `deny`).

use super::frame::{Command, Decoder, Frame, Item, Limits};
use super::session::{Action, Session, Settings};
use crate::ws::{CloseCode, MessageKind};

pub struct StompConn {
    decoder: Decoder,
    session: Session,
    /// Kind of the WebSocket message that carried the frames being read.
    kind: MessageKind,
    /// The session ended: close with this code once the replies are out.
    close: Option<CloseCode>,
    /// Kept between steps, so that acting on a frame does not allocate.
    spare: Vec<Action>,
}

/// What one `step` did.
pub enum Step {
    /// No whole frame is waiting (or the session has ended).
    Idle,
    /// A heart-beat: nothing to do (reading it showed the peer is alive).
    HeartBeat,
    /// A frame or a bad one was acted on: its actions are in the vector.
    Acted,
    /// As `Acted`, and the frame was the CONNECT that connected the
    /// session: its heart-beats are negotiated.
    Connected,
}

impl StompConn {
    /// `max_body_bytes`: the largest frame body (a frame may span messages).
    pub fn new(settings: Settings, max_body_bytes: usize) -> StompConn {
        StompConn {
            decoder: Decoder::new(Limits {
                max_body_bytes,
                ..Limits::default()
            }),
            session: Session::new(settings),
            kind: MessageKind::Text,
            close: None,
            spare: Vec::new(),
        }
    }

    /// An empty vector for `step`'s actions (give it back with `give_back`).
    pub fn take_spare(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.spare)
    }

    pub fn give_back(&mut self, mut actions: Vec<Action>) {
        actions.clear();
        self.spare = actions;
    }

    /// One WebSocket message: any number of whole or partial frames and
    /// heart-beats (STOMP over WebSocket may split a frame across messages
    /// or put several in one). Nothing is taken once the session has ended.
    pub fn push(&mut self, kind: MessageKind, payload: &[u8]) {
        if self.session.is_ended() {
            return;
        }
        self.kind = kind;
        self.decoder.push(payload);
    }

    /// Decodes the next whole frame and puts what it asks for in
    /// `actions` (emptied first). `connect` is asked about a first CONNECT
    /// before the session sees it: `Err` refuses it with that text, as
    /// `deny` does.
    pub fn step(&mut self, actions: &mut Vec<Action>, connect: impl FnOnce(&Frame) -> Result<(), String>) -> Step {
        actions.clear();
        if self.session.is_ended() {
            return Step::Idle;
        }
        let step = match self.decoder.next_item() {
            Ok(None) => Step::Idle,
            Ok(Some(Item::HeartBeat)) => Step::HeartBeat,
            Ok(Some(Item::Frame(frame))) => {
                let first_connect =
                    matches!(frame.command, Command::Connect | Command::Stomp) && !self.session.is_connected();
                match first_connect.then(|| connect(&frame)).transpose() {
                    Err(refused) => self.deny(&refused, actions),
                    Ok(_) => self.session.on_frame(frame, actions),
                }
                if first_connect && self.session.is_connected() {
                    Step::Connected
                } else {
                    Step::Acted
                }
            }
            Err(error) => {
                self.session.on_parse_error(error, actions);
                Step::Acted
            }
        };
        self.note_close(actions);
        if self.session.is_ended() {
            self.free_input();
        }
        step
    }

    /// Nothing more is read from this peer: frees what it sent that was
    /// not yet taken (up to a frame's limit).
    fn free_input(&mut self) {
        self.decoder = Decoder::new(Limits::default());
    }

    /// Bytes of input held for frames not yet whole.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// Refuses the frame whose actions are in `actions`, for an action the
    /// session's identity does not allow: none of them is carried out, an
    /// ERROR is sent instead, and the connection closes after it with 1008
    /// (a policy decision, not a broken frame). STOMP 1.2 "ERROR".
    pub fn deny(&mut self, why: &str, actions: &mut Vec<Action>) {
        actions.clear();
        actions.push(Action::Reply(
            Frame::new(Command::Error)
                .with_header("content-type", "text/plain")
                .with_header("message", "access denied")
                .with_body(why.to_string()),
        ));
        self.session.end();
        self.free_input();
        self.close = Some(CloseCode::POLICY_VIOLATION);
    }

    /// STOMP 1.2 "ERROR": the server closes after an ERROR (1002, a broken
    /// frame); after DISCONNECT (and its RECEIPT) the session is over (1000).
    fn note_close(&mut self, actions: &[Action]) {
        if self.close.is_some() || !actions.iter().any(|a| matches!(a, Action::Close)) {
            return;
        }
        let errored = actions
            .iter()
            .any(|a| matches!(a, Action::Reply(frame) if frame.command == Command::Error));
        self.close = Some(if errored {
            CloseCode::PROTOCOL_ERROR
        } else {
            CloseCode::NORMAL
        });
    }

    /// The kind of the WebSocket message that carried the frames being read.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    pub fn is_ended(&self) -> bool {
        self.session.is_ended()
    }

    /// The negotiated heart-beats (ms): what we send, what we expect.
    pub fn heart_beats(&self) -> (u64, u64) {
        self.session.heart_beats()
    }

    /// The close the session asked for, once.
    pub fn take_close(&mut self) -> Option<CloseCode> {
        self.close.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            session_id: "0.1.1".into(),
            heart_beat_send_ms: 0,
            heart_beat_want_ms: 0,
            max_subscriptions: 10,
            max_transactions: 2,
            max_transaction_bytes: 1000,
        }
    }

    #[test]
    fn frames_split_across_messages_come_out_whole_and_a_refused_connect_closes_1008() {
        let mut c = StompConn::new(settings(), 1000);
        let mut actions = Vec::new();
        c.push(
            MessageKind::Text,
            b"CONNECT\naccept-version:1.2\nhost:x\n\n\0SEND\ndestination:/topic/t\n\nh",
        );
        assert!(matches!(c.step(&mut actions, |_| Ok(())), Step::Connected));
        assert!(matches!(&actions[..], [Action::Reply(f)] if f.command == Command::Connected));
        // The SEND's body is not whole yet.
        assert!(matches!(c.step(&mut actions, |_| Ok(())), Step::Idle));
        c.push(MessageKind::Text, b"i\0\n");
        assert!(matches!(c.step(&mut actions, |_| Ok(())), Step::Acted));
        assert!(matches!(&actions[..], [Action::Publish(p)] if &p.body[..] == b"hi"));
        assert!(matches!(c.step(&mut actions, |_| Ok(())), Step::HeartBeat));
        assert_eq!(c.take_close(), None);
        // A CONNECT refused by the connection: an ERROR, then 1008.
        let mut c = StompConn::new(settings(), 1000);
        c.push(MessageKind::Text, b"CONNECT\naccept-version:1.2\nhost:x\n\n\0");
        c.step(&mut actions, |_| Err("no".into()));
        assert!(matches!(&actions[..], [Action::Reply(f)] if f.command == Command::Error));
        assert!(c.is_ended());
        assert_eq!(c.take_close(), Some(CloseCode::POLICY_VIOLATION));
    }

    #[test]
    fn a_denied_frame_frees_what_followed_it() {
        let mut c = StompConn::new(settings(), 1_000_000);
        let mut actions = Vec::new();
        let mut input = b"CONNECT\naccept-version:1.2\nhost:x\n\n\0SEND\ndestination:/topic/b\n\nx\0".to_vec();
        input.extend_from_slice(b"SEND\ndestination:/topic/a\ncontent-length:900000\n\n");
        input.extend_from_slice(&[b'y'; 500_000]);
        c.push(MessageKind::Text, &input);
        assert!(matches!(c.step(&mut actions, |_| Ok(())), Step::Connected));
        assert!(matches!(c.step(&mut actions, |_| Ok(())), Step::Acted));
        assert!(c.buffered() >= 500_000, "the next frame waits for its body");
        // The connection refuses the SEND (its grants): the session ends
        // and what the peer sent behind it is not kept until the close.
        c.deny("no", &mut actions);
        assert!(c.is_ended());
        assert_eq!(c.buffered(), 0);
        assert_eq!(c.take_close(), Some(CloseCode::POLICY_VIOLATION));
    }

    #[test]
    fn an_error_closes_1002_and_disconnect_1000() {
        let mut actions = Vec::new();
        let mut c = StompConn::new(settings(), 1000);
        c.push(MessageKind::Text, b"SEND\n\n\0");
        c.step(&mut actions, |_| Ok(()));
        assert_eq!(c.take_close(), Some(CloseCode::PROTOCOL_ERROR));
        let mut c = StompConn::new(settings(), 1000);
        c.push(
            MessageKind::Text,
            b"CONNECT\naccept-version:1.2\nhost:x\n\n\0DISCONNECT\nreceipt:r\n\n\0",
        );
        c.step(&mut actions, |_| Ok(()));
        c.step(&mut actions, |_| Ok(()));
        assert_eq!(c.take_close(), Some(CloseCode::NORMAL));
        // Nothing more is taken.
        c.push(MessageKind::Text, b"SEND\ndestination:/topic/t\n\nx\0");
        assert!(matches!(c.step(&mut actions, |_| Ok(())), Step::Idle));
    }
}
