//! The transcripts of the caller's turn, kept apart from the call: the transcription asked at
//! a pause before the turn has ended (speculation), the earlier parts of a turn whose caller
//! went on after a pause, what a streaming recognizer has been given of the utterance, and,
//! once the turn has ended, which transcripts it still waits for and what the caller said in
//! all. `CallCore` routes the detector's events and the engine's answers here and acts on
//! what comes back (asks ASR, tells the detector, makes the reply ahead, asks the dialog).

use std::collections::BTreeMap;

use super::TurnEvent;
use super::barge::is_noise_transcript;
use crate::engines::asr::{AsrError, Transcript};

/// An answer of the engine and the time the request took in all (ms).
type Answer = (Result<Transcript, AsrError>, u64);

/// A transcription to ask for (`Action::Transcribe`).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub seq: u64,
    pub audio: Vec<i16>,
    /// Where `audio` is in the utterance (samples `from..to`).
    pub span: (usize, usize),
    /// Asked at a pause, before the turn has ended: skipped by a busy engine.
    pub speculative: bool,
}

/// A transcription asked at a pause, before the end of the turn was known.
#[derive(Debug)]
struct Early {
    /// The pause check (turn detector) it belongs to.
    check: u64,
    seq: u64,
    asked_at: u64,
    /// Its answer, when it came before the end.
    answer: Option<Answer>,
}

/// Where an engine's answer goes.
#[derive(Debug)]
pub enum Routed {
    /// An earlier part of the turn in progress: kept for the turn's end.
    Kept,
    /// The transcript of pause `check`'s audio (trimmed; empty when it was only noise), kept
    /// for the turn's end: the detector and the reply made ahead are told.
    AtPause { check: u64, text: String },
    /// The transcription at pause `check` failed or was skipped: the turn's audio is
    /// transcribed at its end, whole (no part boundary at this pause).
    Dropped { check: u64 },
    /// Not a transcription of the turn in progress: given back.
    Other(Result<Transcript, AsrError>, u64),
}

/// What the end of a turn asks for and already has.
#[derive(Debug)]
pub struct Ended {
    /// The transcription of the turn's last part (`None`: it was asked at the pause).
    pub request: Option<Request>,
    /// The turn's transcriptions in the order of its parts, with when each was asked.
    pub asked: Vec<(u64, u64)>,
    /// Those answered while the turn was still open: ready now.
    pub answered: Vec<(u64, Answer)>,
    /// The last part's seq.
    pub last: u64,
    /// The last part was asked at the pause this long before the end.
    pub early_ms: Option<u64>,
}

/// The transcriptions of the caller's turn in progress.
#[derive(Debug, Default)]
pub struct Transcripts {
    /// The last seq given to a transcription.
    seq: u64,
    /// The transcription of the audio at the caller's last pause.
    speculation: Option<Early>,
    /// Earlier parts of the turn: pauses the caller went on after, their audio already
    /// being transcribed.
    parts: Vec<Early>,
    /// Samples of the current utterance given to a streaming recognizer so far.
    streamed: usize,
}

impl Transcripts {
    /// The seq the next transcription gets.
    pub fn next_seq(&self) -> u64 {
        self.seq.saturating_add(1)
    }

    /// A transcription of `audio`, at samples `from..` of the utterance.
    pub fn ask(&mut self, audio: Vec<i16>, from: usize, speculative: bool) -> Request {
        self.seq = self.next_seq();
        let span = (from, from.saturating_add(audio.len()));
        Request {
            seq: self.seq,
            audio,
            span,
            speculative,
        }
    }

    /// The caller started an utterance: parts of an earlier turn are not this one's.
    pub fn speech_start(&mut self) {
        self.parts.clear();
    }

    /// The caller paused (check `check`) with `audio` heard so far in the utterance, of which
    /// `audio[part_from..]` is not yet transcribed: that part is transcribed now.
    pub fn pause(&mut self, now: u64, check: u64, audio: &[i16], part_from: usize) -> Request {
        let part = audio.get(part_from..).unwrap_or_default().to_vec();
        let req = self.ask(part, part_from, true);
        self.speculation = Some(Early {
            check,
            seq: req.seq,
            asked_at: now,
            answer: None,
        });
        req
    }

    /// The caller went on after pause `check`: its transcription is the first part of the turn.
    pub fn resumed(&mut self, check: u64) {
        if let Some(s) = self.speculation.take_if(|s| s.check == check) {
            self.parts.push(s);
        }
    }

    /// Earlier parts of the turn in progress are being transcribed.
    pub fn has_parts(&self) -> bool {
        !self.parts.is_empty()
    }

    /// Transcription `seq` was not made (the engine was busy): the pause check it belonged to,
    /// when it is the current one.
    pub fn skipped(&mut self, seq: u64) -> Option<u64> {
        self.speculation.take_if(|s| s.seq == seq).map(|s| s.check)
    }

    /// The engine's answer for transcription `seq`.
    pub fn answer(&mut self, seq: u64, result: Result<Transcript, AsrError>, ms: u64) -> Routed {
        if let Some(p) = self.parts.iter_mut().find(|p| p.seq == seq) {
            p.answer = Some((result, ms));
            return Routed::Kept;
        }
        let Some(s) = self.speculation.as_mut().filter(|s| s.seq == seq) else {
            return Routed::Other(result, ms);
        };
        let text = match &result {
            Ok(t) if !is_noise_transcript(&t.text) => t.text.trim().to_string(),
            Ok(_) => String::new(),
            Err(_) => {
                let check = s.check;
                self.speculation = None;
                return Routed::Dropped { check };
            }
        };
        s.answer = Some((result, ms));
        Routed::AtPause {
            check: s.check,
            text,
        }
    }

    /// The turn's transcriptions are not wanted (the utterance was over a reply, or the call
    /// is not waiting for the caller).
    pub fn forget(&mut self) {
        self.speculation = None;
        self.parts.clear();
    }

    /// The caller's turn ended on pause check `check` (if any), with `audio` its last part at
    /// samples `from..` of the utterance: the parts transcribed before, and the last part,
    /// transcribed at the pause when that pause was `check`, else now.
    pub fn end(&mut self, now: u64, check: Option<u64>, audio: Vec<i16>, from: usize) -> Ended {
        let speculation = self
            .speculation
            .take()
            .filter(|s| check.is_some_and(|c| c == s.check));
        let (last, request, early_ms) = match speculation {
            Some(s) => {
                let early_ms = now.saturating_sub(s.asked_at);
                (s, None, Some(early_ms))
            }
            None => {
                let req = self.ask(audio, from, false);
                let last = Early {
                    check: 0,
                    seq: req.seq,
                    asked_at: now,
                    answer: None,
                };
                (last, Some(req), None)
            }
        };
        let mut ended = Ended {
            request,
            asked: Vec::new(),
            answered: Vec::new(),
            last: last.seq,
            early_ms,
        };
        for part in std::mem::take(&mut self.parts)
            .into_iter()
            .chain(std::iter::once(last))
        {
            ended.asked.push((part.seq, part.asked_at));
            if let Some(a) = part.answer {
                ended.answered.push((part.seq, a));
            }
        }
        ended
    }

    /// What a streaming recognizer gets of the utterance with the last frame, before the
    /// frame's event is acted on (a commit at a pause or at the end covers that frame too):
    /// `(begin, samples)`, `begin` on an utterance's first samples. `utterance` is the
    /// detector's, `in_speech` whether it is in one.
    pub fn stream(
        &mut self,
        ev: Option<&TurnEvent>,
        in_speech: bool,
        utterance: &[i16],
    ) -> Option<(bool, Vec<i16>)> {
        let begin = self.streamed == 0;
        if let Some(TurnEvent::SpeechEnd { audio, from, .. }) = ev {
            // The utterance is over (the detector has let it go): its last samples are in
            // the event.
            let sent = std::mem::take(&mut self.streamed);
            let end = from.saturating_add(audio.len());
            if end <= sent || sent < *from {
                return None;
            }
            let rest = audio.get(sent - from..).unwrap_or_default().to_vec();
            return Some((begin, rest));
        }
        if !in_speech {
            self.streamed = 0;
            return None;
        }
        let audio = utterance.get(self.streamed..).filter(|a| !a.is_empty())?;
        self.streamed = utterance.len();
        Some((begin, audio.to_vec()))
    }
}

/// One part of the caller's turn being recognized.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Sent to ASR at this time.
    Pending {
        since: u64,
    },
    Text(String),
    Failed(String),
}

/// The transcripts a turn that has ended waits for, one per part, in order (a caller who
/// pauses mid-sentence and goes on is heard as one input).
#[derive(Debug, Default)]
pub struct Recognition {
    pieces: BTreeMap<u64, Piece>,
}

impl Recognition {
    /// Waiting for transcription `seq`, asked at `since`.
    pub fn asked(seq: u64, since: u64) -> Self {
        let mut r = Self::default();
        r.expect(seq, since);
        r
    }

    /// Waits for transcription `seq` too.
    pub fn expect(&mut self, seq: u64, since: u64) {
        self.pieces.insert(seq, Piece::Pending { since });
    }

    /// Transcription `seq` is one this turn waits for.
    pub fn waits_for(&self, seq: u64) -> bool {
        matches!(self.pieces.get(&seq), Some(Piece::Pending { .. }))
    }

    /// When the oldest transcription still out was asked.
    pub fn pending_since(&self) -> Option<u64> {
        self.pieces
            .values()
            .filter_map(|p| match p {
                Piece::Pending { since } => Some(*since),
                _ => None,
            })
            .min()
    }

    /// Transcription `seq` came: its text (empty: nothing to understand), or why it failed.
    /// Only a transcription this turn waits for is taken.
    pub fn got(&mut self, seq: u64, piece: Result<String, String>) {
        if self.waits_for(seq) {
            let piece = piece.map_or_else(Piece::Failed, Piece::Text);
            self.pieces.insert(seq, piece);
        }
    }

    /// What the caller said, once every transcript is in: the parts' texts joined in order,
    /// or the first part's failure. `None` while one is still out.
    pub fn heard(&self) -> Option<Result<String, String>> {
        if self.pending_since().is_some() {
            return None;
        }
        if let Some(e) = self.pieces.values().find_map(|p| match p {
            Piece::Failed(e) => Some(e.clone()),
            _ => None,
        }) {
            return Some(Err(e));
        }
        let joined = self
            .pieces
            .values()
            .filter_map(|p| match p {
                Piece::Text(t) if !t.is_empty() => Some(t.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" ");
        Some(Ok(joined))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(text: &str) -> Result<Transcript, AsrError> {
        Ok(Transcript {
            text: text.into(),
            ..Transcript::default()
        })
    }

    fn samples(n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| i16::try_from(i % 1000).unwrap_or(0))
            .collect()
    }

    #[test]
    fn a_turn_that_ends_on_its_pause_uses_the_transcript_asked_there() {
        let mut t = Transcripts::default();
        let utterance = samples(8000);
        let req = t.pause(1_000, 7, &utterance, 0);
        assert!(req.speculative);
        assert_eq!(req.span, (0, 8000));
        assert_eq!(req.audio, utterance);
        match t.answer(req.seq, said(" Yes. "), 120) {
            Routed::AtPause { check, text } => {
                assert_eq!(check, 7);
                assert_eq!(text, "Yes.");
            }
            other => panic!("routed {other:?}"),
        }
        let ended = t.end(1_300, Some(7), samples(100), 8000);
        assert!(ended.request.is_none(), "nothing transcribed again");
        assert_eq!(ended.asked, vec![(req.seq, 1_000)]);
        assert_eq!(ended.last, req.seq);
        assert_eq!(ended.early_ms, Some(300));
        assert_eq!(ended.answered.len(), 1);
        let (seq, (result, ms)) = &ended.answered[0];
        assert_eq!((*seq, *ms), (req.seq, 120));
        assert_eq!(
            result.as_ref().map(|t| t.text.as_str()).ok(),
            Some(" Yes. ")
        );
    }

    #[test]
    fn a_caller_who_goes_on_after_pauses_is_heard_in_parts_in_order() {
        let mut t = Transcripts::default();
        let u = samples(20_000);
        let first = t.pause(500, 1, &u[..6000], 0);
        t.resumed(1);
        assert!(t.has_parts());
        let second = t.pause(1_500, 2, &u[..14_000], 6000);
        assert_eq!(second.span, (6000, 14_000));
        assert_eq!(second.audio, u[6000..14_000].to_vec());
        t.resumed(2);
        // The first part's transcript comes while the caller talks: kept, not told.
        assert!(matches!(
            t.answer(first.seq, said("my order number is"), 300),
            Routed::Kept
        ));
        // The turn ends without a pause check: its last part is transcribed now.
        let ended = t.end(2_600, None, u[14_000..].to_vec(), 14_000);
        let last = ended.request.expect("the last part is asked at the end");
        assert!(!last.speculative);
        assert_eq!(last.span, (14_000, 20_000));
        assert_eq!(
            ended.asked,
            vec![(first.seq, 500), (second.seq, 1_500), (last.seq, 2_600)]
        );
        assert_eq!(ended.last, last.seq);
        assert_eq!(ended.early_ms, None);
        let answered: Vec<u64> = ended.answered.iter().map(|(s, _)| *s).collect();
        assert_eq!(answered, vec![first.seq], "only the first part was in");
        assert!(!t.has_parts(), "the parts went with the turn");
        // The second part's answer after the end is not the turn's any more here.
        assert!(matches!(
            t.answer(second.seq, said("five five"), 400),
            Routed::Other(..)
        ));
    }

    #[test]
    fn a_failed_or_skipped_pause_transcription_is_done_again_whole_at_the_end() {
        let mut t = Transcripts::default();
        let u = samples(9000);
        let req = t.pause(100, 3, &u, 0);
        let failed = t.answer(req.seq, Err(AsrError::Timeout(5)), 5);
        assert!(matches!(failed, Routed::Dropped { check: 3 }));
        let ended = t.end(400, Some(3), u.clone(), 0);
        let again = ended.request.expect("transcribed at the end");
        assert_ne!(again.seq, req.seq);
        assert_eq!(again.audio, u);

        let req = t.pause(1_000, 4, &u, 0);
        assert_eq!(t.skipped(req.seq), Some(4));
        assert_eq!(t.skipped(req.seq), None, "told once");
        assert!(t.end(1_200, Some(4), u.clone(), 0).request.is_some());
    }

    #[test]
    fn a_turn_that_ends_on_another_pause_than_the_transcribed_one_is_transcribed_at_its_end() {
        let mut t = Transcripts::default();
        let u = samples(4000);
        let req = t.pause(100, 5, &u, 0);
        // The check of pause 5 was dropped (voice), a later one never asked for a transcript.
        let ended = t.end(900, Some(6), u.clone(), 0);
        let last = ended.request.expect("asked at the end");
        assert_eq!(ended.asked, vec![(last.seq, 900)]);
        assert!(matches!(
            t.answer(req.seq, said("hello"), 50),
            Routed::Other(..)
        ));
    }

    #[test]
    fn noise_at_a_pause_is_no_words() {
        let mut t = Transcripts::default();
        let req = t.pause(0, 1, &samples(3000), 0);
        match t.answer(req.seq, said("[BLANK_AUDIO]"), 80) {
            Routed::AtPause { text, .. } => assert_eq!(text, ""),
            other => panic!("routed {other:?}"),
        }
    }

    #[test]
    fn an_utterance_over_a_reply_forgets_the_turns_transcriptions() {
        let mut t = Transcripts::default();
        let u = samples(3000);
        let first = t.pause(0, 1, &u, 0);
        t.resumed(1);
        let second = t.pause(500, 2, &u, 1000);
        t.forget();
        assert!(!t.has_parts());
        assert!(matches!(
            t.answer(first.seq, said("a"), 1),
            Routed::Other(..)
        ));
        assert!(matches!(
            t.answer(second.seq, said("b"), 1),
            Routed::Other(..)
        ));
        // A new utterance drops parts left from before as well.
        let third = t.pause(900, 3, &u, 0);
        t.resumed(3);
        t.speech_start();
        assert!(matches!(
            t.answer(third.seq, said("c"), 1),
            Routed::Other(..)
        ));
    }

    #[test]
    fn a_streaming_recognizer_gets_each_sample_once() {
        let mut t = Transcripts::default();
        let u = samples(4800);
        assert_eq!(t.stream(None, false, &[]), None, "nothing out of speech");
        let (begin, a) = t.stream(None, true, &u[..1600]).expect("the first samples");
        assert!(begin);
        assert_eq!(a, u[..1600].to_vec());
        assert_eq!(t.stream(None, true, &u[..1600]), None, "nothing new");
        let (begin, b) = t.stream(None, true, &u[..3200]).expect("more");
        assert!(!begin);
        assert_eq!(b, u[1600..3200].to_vec());
        // The end: the detector has let the utterance go; its last part is in the event.
        let end = TurnEvent::SpeechEnd {
            audio: u[800..].to_vec(),
            from: 800,
            speech_ms: 300,
            endpoint_ms: 600,
            cut: false,
            check: None,
        };
        let (begin, c) = t.stream(Some(&end), false, &[]).expect("the rest");
        assert!(!begin);
        assert_eq!(c, u[3200..].to_vec());
        // The next utterance begins again.
        let (begin, _) = t.stream(None, true, &u[..160]).expect("a new utterance");
        assert!(begin);
    }

    #[test]
    fn recognition_waits_for_every_part_then_joins_them_in_order() {
        let mut r = Recognition::asked(4, 100);
        r.expect(2, 50);
        r.expect(6, 300);
        assert_eq!(r.pending_since(), Some(50));
        r.got(6, Ok("two one".into()));
        r.got(2, Ok("my number is".into()));
        assert_eq!(r.heard(), None, "part 4 is still out");
        assert_eq!(r.pending_since(), Some(100));
        r.got(4, Ok(String::new()));
        assert_eq!(r.heard(), Some(Ok("my number is two one".into())));
        // A transcript it does not wait for changes nothing.
        r.got(9, Err("late".into()));
        r.got(2, Err("again".into()));
        assert_eq!(r.heard(), Some(Ok("my number is two one".into())));
    }

    #[test]
    fn a_failed_part_fails_the_turn() {
        let mut r = Recognition::asked(1, 0);
        r.expect(2, 0);
        r.got(1, Ok("hello".into()));
        r.got(2, Err("ASR timed out".into()));
        assert_eq!(r.heard(), Some(Err("ASR timed out".into())));
        assert!(!r.waits_for(2));
    }
}
