//! The reply made ahead: with the transcript of a pause, before the turn is confirmed, the
//! dialog (or the LLM, on a copy of the conversation) is asked for its reply, and what it
//! sends is kept here, its first sentence synthesized. When the turn ends on those very words
//! the reply is adopted and plays at once; when the caller goes on, or the turn ends on other
//! words, it is discarded and the dialog is told nothing of it. The decisions only: the call
//! task asks the dialog and carries out each `Step`. Pure: no clock, no I/O.

use super::trails_off;

/// Parts of a reply kept while it is made ahead: a reply is a few; one that streams on and
/// on is not kept.
pub const MAX_PARTS: usize = 64;

/// What the dialog sent for the reply made ahead, as far as the decisions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen<'a> {
    /// It failed: nothing was made.
    Failed,
    /// The whole reply is in.
    Done,
    /// A sentence to say.
    Say(&'a str),
    /// Anything else of the reply (its start, a transfer, ...).
    Other,
}

/// What the call task does after a part of the reply made ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Kept for the end of the turn.
    Kept,
    /// Kept; synthesize this first sentence into the prompt cache.
    Prefetch(String),
    /// The reply failed and is forgotten (the dialog has nothing to discard).
    Forgotten,
    /// Too long to keep: tell the dialog to discard the reply `seq`.
    Discard(u64),
}

/// The turn ended: what becomes of the reply made ahead.
#[derive(Debug, PartialEq)]
pub enum Taken<E> {
    /// The turn ended on its words: it is the reply.
    Adopt(Adopted<E>),
    /// The turn ended on other words: tell the dialog to discard the reply `seq`.
    Discard(u64),
    /// None was being made.
    Nothing,
}

/// A reply made ahead, adopted at the end of the turn.
#[derive(Debug, PartialEq)]
pub struct Adopted<E> {
    pub seq: u64,
    /// How much was ready: "done", "partial" (some of it) or "asked" (nothing yet).
    pub ready: &'static str,
    /// How long before the end of the turn it was asked for.
    pub ahead_ms: u64,
    /// What the dialog had sent, in order, to be handled now as the reply.
    pub events: Vec<E>,
}

/// Whether a reply may be made ahead on this transcript.
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    /// `turn.reply_ahead`.
    pub enabled: bool,
    /// The turn is the caller's (the call listens and takes their speech).
    pub theirs: bool,
    /// Earlier parts of the turn are still being transcribed: the text is not the turn's.
    pub parts_pending: bool,
    pub text: &'a str,
}

struct Ahead<E> {
    seq: u64,
    text: String,
    asked_at: u64,
    events: Vec<E>,
    done: bool,
    prefetched: bool,
}

/// The reply being made ahead, if any (one at a time).
pub struct ReplyAhead<E> {
    current: Option<Ahead<E>>,
}

impl<E> Default for ReplyAhead<E> {
    fn default() -> Self {
        Self { current: None }
    }
}

impl<E> ReplyAhead<E> {
    /// The dialog ask whose answers belong here.
    pub fn seq(&self) -> Option<u64> {
        self.current.as_ref().map(|a| a.seq)
    }

    /// Whether to make the reply ahead on `w.text` now: for the caller's own turn, with a
    /// transcript that is the whole turn so far and does not trail off, and none made yet.
    pub fn wanted(&self, w: Want<'_>) -> bool {
        let text = w.text.trim();
        w.enabled
            && w.theirs
            && !w.parts_pending
            && !text.is_empty()
            && !trails_off(text)
            && self.current.is_none()
    }

    /// The dialog was asked (`seq`) at `now` for the reply to `text`.
    pub fn start(&mut self, seq: u64, text: &str, now: u64) {
        self.current = Some(Ahead {
            seq,
            text: text.trim().to_string(),
            asked_at: now,
            events: Vec::new(),
            done: false,
            prefetched: false,
        });
    }

    /// A part of the reply came (`event`, which `seen` describes).
    pub fn on_part(&mut self, seen: Seen<'_>, event: E) -> Step {
        let Some(a) = self.current.as_mut() else {
            return Step::Forgotten;
        };
        let mut step = Step::Kept;
        match seen {
            Seen::Failed => {
                self.current = None;
                return Step::Forgotten;
            }
            Seen::Done => a.done = true,
            Seen::Say(text) if !a.prefetched => {
                a.prefetched = true;
                step = Step::Prefetch(text.to_string());
            }
            _ => {}
        }
        if a.events.len() >= MAX_PARTS {
            return self.cancel().map_or(Step::Forgotten, Step::Discard);
        }
        a.events.push(event);
        step
    }

    /// The turn ended at `now` on `input` (its transcript; None: not speech).
    pub fn take_for(&mut self, now: u64, input: Option<&str>) -> Taken<E> {
        let Some(a) = self.current.take() else {
            return Taken::Nothing;
        };
        if input.map(str::trim) != Some(a.text.as_str()) {
            return Taken::Discard(a.seq);
        }
        let ready = if a.done {
            "done"
        } else if a.events.is_empty() {
            "asked"
        } else {
            "partial"
        };
        Taken::Adopt(Adopted {
            seq: a.seq,
            ready,
            ahead_ms: now.saturating_sub(a.asked_at),
            events: a.events,
        })
    }

    /// The caller went on, or something else happened: the reply to discard, if any.
    pub fn cancel(&mut self) -> Option<u64> {
        self.current.take().map(|a| a.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(text: &str) -> Want<'_> {
        Want {
            enabled: true,
            theirs: true,
            parts_pending: false,
            text,
        }
    }

    #[test]
    fn made_only_for_the_callers_own_whole_words_once_at_a_time() {
        let mut a = ReplyAhead::<u32>::default();
        assert!(a.wanted(want("my internet is slow")));
        assert!(!a.wanted(want("  ")), "no words");
        assert!(!a.wanted(want("my order number is")), "trails off");
        assert!(!a.wanted(want("I want to, um,")), "trails off on a comma");
        assert!(
            !a.wanted(Want {
                enabled: false,
                ..want("yes")
            }),
            "turned off"
        );
        assert!(
            !a.wanted(Want {
                theirs: false,
                ..want("yes")
            }),
            "the agent's turn"
        );
        assert!(
            !a.wanted(Want {
                parts_pending: true,
                ..want("yes")
            }),
            "only the last part of the turn"
        );
        a.start(7, "yes", 100);
        assert_eq!(a.seq(), Some(7));
        assert!(!a.wanted(want("yes please")), "one at a time");
    }

    #[test]
    fn the_first_sentence_is_synthesized_ahead_once() {
        let mut a = ReplyAhead::default();
        a.start(3, "billing", 0);
        assert_eq!(a.on_part(Seen::Other, 1), Step::Kept);
        assert_eq!(
            a.on_part(Seen::Say("Billing, sure."), 2),
            Step::Prefetch("Billing, sure.".into())
        );
        assert_eq!(a.on_part(Seen::Say("Which invoice?"), 3), Step::Kept);
        assert_eq!(a.on_part(Seen::Done, 4), Step::Kept);
        let Taken::Adopt(got) = a.take_for(250, Some("billing")) else {
            panic!("not adopted");
        };
        assert_eq!(
            got,
            Adopted {
                seq: 3,
                ready: "done",
                ahead_ms: 250,
                events: vec![1, 2, 3, 4]
            }
        );
        assert_eq!(a.seq(), None);
    }

    #[test]
    fn adopted_with_how_much_was_ready() {
        let mut a = ReplyAhead::default();
        a.start(1, "no", 10);
        let Taken::Adopt(got) = a.take_for(40, Some(" no ")) else {
            panic!("not adopted");
        };
        assert_eq!(
            (got.ready, got.ahead_ms, got.events.len()),
            ("asked", 30, 0)
        );
        a.start(2, "no", 10);
        a.on_part(Seen::Say("Okay."), 5u8);
        let Taken::Adopt(got) = a.take_for(40, Some("no")) else {
            panic!("not adopted");
        };
        assert_eq!((got.ready, got.events), ("partial", vec![5]));
    }

    #[test]
    fn other_words_or_no_words_discard_it() {
        let mut a = ReplyAhead::<u8>::default();
        assert_eq!(a.take_for(0, Some("yes")), Taken::Nothing);
        a.start(4, "yes", 0);
        assert_eq!(a.take_for(0, Some("yes it is")), Taken::Discard(4));
        assert_eq!(a.seq(), None);
        a.start(5, "yes", 0);
        assert_eq!(a.take_for(0, None), Taken::Discard(5), "a key, not words");
        a.start(6, "yes", 0);
        assert_eq!(a.cancel(), Some(6), "the caller went on");
        assert_eq!(a.cancel(), None);
    }

    #[test]
    fn a_failed_reply_is_forgotten_and_an_endless_one_discarded() {
        let mut a = ReplyAhead::default();
        a.start(8, "hello", 0);
        a.on_part(Seen::Other, 0u16);
        assert_eq!(a.on_part(Seen::Failed, 1), Step::Forgotten);
        assert_eq!(a.seq(), None);
        assert_eq!(a.take_for(0, Some("hello")), Taken::Nothing);

        a.start(9, "hello", 0);
        for i in 0..MAX_PARTS {
            let step = a.on_part(Seen::Other, u16::try_from(i).unwrap_or(0));
            assert_eq!(step, Step::Kept);
        }
        assert_eq!(a.on_part(Seen::Other, 0), Step::Discard(9));
        assert_eq!(a.seq(), None);

        // Past the limit, a first sentence is not synthesized for a reply that is discarded.
        a.start(10, "hello", 0);
        for _ in 0..MAX_PARTS {
            a.on_part(Seen::Other, 0);
        }
        assert_eq!(a.on_part(Seen::Say("Hi."), 0), Step::Discard(10));
        // A late part of a reply no longer kept is forgotten.
        assert_eq!(a.on_part(Seen::Say("Hi."), 0), Step::Forgotten);
        assert_eq!(a.on_part(Seen::Done, 0), Step::Forgotten);
    }
}
