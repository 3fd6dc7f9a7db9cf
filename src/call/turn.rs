//! Turn taking: VAD decisions per 20 ms frame become speech start (after a minimum of voiced
//! audio), end of turn and a cut at the maximum utterance length. Missing frames are fed in as
//! silence by the session, so endpointing runs on the call's clock.
//!
//! The end of a turn: at a short pause (`turn.pause_ms`) the detector says `Pause`; the call
//! asks the end-of-turn model and transcribes the audio so far meanwhile. A complete utterance
//! (the model says so and its words do not trail off on "and", "is", "the"...) ends the turn at
//! once; an unfinished one waits longer (`turn.max_silence_ms`, more while the caller reads out
//! a number); without an answer the fixed `vad.end_silence_ms` ends it. Voice before the end
//! drops the check: the next pause asks again about the whole utterance.
//!
//! The rest of turn taking lives beside the detector, each part a state machine the call task
//! only feeds events to and acts on: `transcripts` (what was transcribed at pauses and what an
//! ended turn waits for), `ahead` (the reply made before the turn is confirmed) and `barge`
//! (pause, resume or barge in while the agent speaks).

use std::collections::VecDeque;

pub mod ahead;
pub mod barge;
mod transcripts;
pub use transcripts::{Recognition, Request, Routed, Transcripts};

use super::vad::Vad;
use crate::audio::FRAME_MS;
use crate::config::{TurnConfig, VadConfig};
use crate::engines::dialog::entities::{self, AmountEnd};
use crate::engines::dialog::{Expectation, Spoken};

const FRAME: u64 = FRAME_MS as u64;
/// Audio kept from before the detected start, so ASR hears the first syllable.
const PREROLL_MS: u64 = 300;
/// Silence kept after the last voiced frame.
const TAIL_MS: u64 = 200;

/// What the detector decided on a frame.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnEvent {
    /// The caller started speaking (`voiced_ms` of voice heard so far).
    SpeechStart { voiced_ms: u64 },
    /// The caller paused for `turn.pause_ms`: `audio` is the utterance so far (for the model),
    /// `audio[part_from..]` the part not yet transcribed, the same audio `SpeechEnd` gives if
    /// the caller says nothing more. Answer with `verdict` and `transcript` (or `decline` to
    /// check nothing).
    Pause {
        id: u64,
        audio: Vec<i16>,
        part_from: usize,
    },
    /// The caller went on after pause `id`, whose audio is being transcribed: that transcript
    /// is the first part of this turn, the rest comes as new parts (each transcribed alone).
    Resumed { id: u64 },
    /// The caller's turn ended; `audio` is the utterance (its last part, after a pause whose
    /// audio went to ASR) with a little context on both sides.
    SpeechEnd {
        audio: Vec<i16>,
        /// Where `audio` starts in the utterance (after the parts already transcribed).
        from: usize,
        speech_ms: u64,
        endpoint_ms: u64,
        cut: bool,
        /// The pause check whose audio this is (its transcript, if it came, is this turn's).
        check: Option<Checked>,
    },
}

/// What a pause check had learned when the turn ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub id: u64,
    /// The transcript of the audio, when it came before the end (`None`: still coming, or
    /// none asked).
    pub transcript: Option<String>,
    pub transcript_asked: bool,
    /// The model's score, when it answered.
    pub probability: Option<f32>,
}

/// An answer a pause check waits for.
#[derive(Debug, Clone, PartialEq)]
enum Known<T> {
    Pending,
    Unavailable,
    Got(T),
}

/// A pause's transcript and what its words say for the end of the turn, worked out once when
/// it comes (the end is weighed on every frame).
#[derive(Debug, Clone, PartialEq)]
struct Words {
    text: String,
    trails_off: bool,
    /// The digits in it, if any.
    digits: Option<usize>,
    /// An amount of money in it, and how it ends if it ends on its unit.
    has_amount: bool,
    amount_end: Option<AmountEnd>,
    /// A short yes or no.
    answer: bool,
}

impl Words {
    fn of(text: String) -> Self {
        Self {
            trails_off: trails_off(&text),
            digits: entities::digits(&text).map(|d| d.len()),
            has_amount: entities::amount_cents(&text).is_some(),
            amount_end: entities::amount_end(&text),
            answer: barge::is_answer(&text),
            text,
        }
    }
}

#[derive(Debug, Clone)]
struct Check {
    id: u64,
    verdict: Known<f32>,
    transcript: Known<Words>,
    /// Where the checked audio ends in the utterance.
    audio_end: usize,
}

/// How turns end: `[vad]` and `[turn]` as the call uses them.
#[derive(Debug, Clone)]
pub struct Endpointing {
    pub pause_ms: u64,
    /// Without an answer from the model.
    pub end_silence_ms: u64,
    /// Unfinished utterance.
    pub max_silence_ms: u64,
    /// Unfinished while a number is expected.
    pub digits_silence_ms: u64,
    pub threshold: f32,
    /// The end-of-turn model is loaded.
    pub model: bool,
    /// Pauses are transcribed ahead.
    pub speculate: bool,
}

impl Endpointing {
    pub fn new(vad: &VadConfig, turn: &TurnConfig, model: bool) -> Self {
        Self {
            pause_ms: turn.pause_ms,
            end_silence_ms: vad.end_silence_ms,
            max_silence_ms: turn.max_silence_ms.max(vad.end_silence_ms),
            digits_silence_ms: turn.digits_silence_ms.max(vad.end_silence_ms),
            threshold: turn.threshold,
            model,
            speculate: turn.speculate,
        }
    }

    /// Fixed silence only: no pause checks.
    pub fn silence_only(vad: &VadConfig) -> Self {
        Self {
            speculate: false,
            ..Self::new(vad, &TurnConfig::default(), false)
        }
    }

    fn checks(&self) -> bool {
        (self.model || self.speculate) && self.pause_ms < self.end_silence_ms
    }
}

/// Words an utterance does not end on: the caller paused mid-sentence ("my number is",
/// "I want to change my address and").
const TRAILING: &[&str] = &[
    "a", "an", "the", "and", "or", "but", "so", "because", "if", "that", "which", "to", "of",
    "for", "with", "from", "in", "on", "at", "by", "about", "into", "my", "your", "our", "their",
    "his", "her", "its", "is", "are", "was", "were", "am", "be", "i", "i'm", "it's", "um", "uh",
    "er", "erm", "uhm", "hmm", "like", "than", "then", "what's", "where's", "when", "please",
];

/// Whether a transcript trails off: it ends on a word a sentence does not end with, or on a
/// comma, a dash or an ellipsis.
pub fn trails_off(text: &str) -> bool {
    let t = text.trim();
    if t.ends_with(',') || t.ends_with('-') || t.ends_with('…') || t.ends_with("...") {
        return true;
    }
    let last = t
        .rsplit(|c: char| c.is_whitespace())
        .next()
        .unwrap_or("")
        .trim_matches(|c: char| !c.is_alphanumeric() && c != '\'')
        .to_lowercase();
    // "please" ends "yes please": only trailing when the sentence goes on after it.
    !last.is_empty() && last != "please" && TRAILING.contains(&last.as_str())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Idle,
    Speaking,
}

/// The endpointing state machine for one call.
pub struct TurnDetector {
    vad: Box<dyn Vad>,
    min_speech: u64,
    max_utterance: u64,
    state: State,
    candidate_ms: u64,
    gap_frames: u32,
    preroll: VecDeque<Vec<i16>>,
    preroll_frames: usize,
    utterance: Vec<i16>,
    silence_ms: u64,
    voiced_ms: u64,
    speech_ms: u64,
    samples_at_last_voice: usize,
    ends: Endpointing,
    /// The question expects a number of up to this many digits: unfinished utterances wait
    /// longer, a complete number ends the turn at once.
    digits: Option<usize>,
    /// The question expects yes or no: such an answer ends the turn at once.
    yes_no: bool,
    /// The question expects an amount of money: one that names its unit ends the turn at once.
    amount: bool,
    check: Option<Check>,
    next_check: u64,
    /// Where the part of the utterance not yet sent to ASR begins.
    part_start: usize,
    /// The last frame may be the caller's voice starting (see [`TurnDetector::onset`]).
    onset: bool,
}

impl TurnDetector {
    pub fn new(cfg: &VadConfig, ends: Endpointing, vad: Box<dyn Vad>) -> Self {
        Self {
            vad,
            min_speech: cfg.min_speech_ms.max(FRAME),
            max_utterance: cfg.max_utterance_ms,
            state: State::Idle,
            candidate_ms: 0,
            gap_frames: 0,
            preroll: VecDeque::with_capacity((PREROLL_MS / FRAME) as usize + 1),
            preroll_frames: (PREROLL_MS / FRAME) as usize,
            utterance: Vec::new(),
            silence_ms: 0,
            voiced_ms: 0,
            speech_ms: 0,
            samples_at_last_voice: 0,
            ends,
            digits: None,
            yes_no: false,
            amount: false,
            check: None,
            next_check: 0,
            part_start: 0,
            onset: false,
        }
    }

    /// Replaces how turns end (the end-of-turn model became available).
    pub fn set_endpointing(&mut self, ends: Endpointing) {
        self.ends = ends;
    }

    /// What a pause check asks: (the model, a transcript).
    pub fn checks(&self) -> (bool, bool) {
        (self.ends.model, self.ends.speculate)
    }

    /// What the call now expects the caller to say: as the expectation says, else as its
    /// keypad entry suggests (a number of more than one digit is read out; one key and no
    /// terminator is a yes or no, as flows and agents ask it; a one-digit number ends with `#`).
    pub fn expect(&mut self, exp: &Expectation) {
        let keys = exp.digits.as_ref();
        let spoken = exp.spoken.unwrap_or(match keys {
            Some(d) if d.max > 1 => Spoken::Digits { max: d.max },
            Some(d) if d.max == 1 && d.terminator.is_none() => Spoken::YesNo,
            _ => Spoken::Free,
        });
        self.expect_digits(match spoken {
            Spoken::Digits { max } => Some(max),
            _ => None,
        });
        self.expect_yes_no(spoken == Spoken::YesNo);
        self.amount = spoken == Spoken::Amount;
    }

    /// Whether the caller is now expected to read out a number (of at most `max` digits).
    pub fn expect_digits(&mut self, max: Option<usize>) {
        self.digits = max;
    }

    /// Whether the caller is now expected to answer yes or no.
    pub fn expect_yes_no(&mut self, on: bool) {
        self.yes_no = on;
    }

    /// The model's answer for pause `id` (`None`: it could not answer).
    pub fn verdict(&mut self, id: u64, probability: Option<f32>) {
        if let Some(c) = self.check.as_mut().filter(|c| c.id == id) {
            c.verdict = probability.map_or(Known::Unavailable, Known::Got);
        }
    }

    /// The transcript of pause `id`'s audio (`None`: it failed).
    pub fn transcript(&mut self, id: u64, text: Option<String>) {
        if let Some(c) = self.check.as_mut().filter(|c| c.id == id) {
            c.transcript = text.map_or(Known::Unavailable, |t| Known::Got(Words::of(t)));
        }
    }

    /// Pause `id` is not checked (the call is not waiting for this caller's turn).
    pub fn decline(&mut self, id: u64) {
        if let Some(c) = self.check.as_mut().filter(|c| c.id == id) {
            c.verdict = Known::Unavailable;
            c.transcript = Known::Unavailable;
        }
    }

    /// The silence after which a turn whose words trail off ends anyway.
    pub fn unfinished_ms(&self) -> u64 {
        if self.digits.is_some() {
            self.ends.digits_silence_ms
        } else {
            self.ends.max_silence_ms
        }
    }

    /// Whether the call waits for more of a turn that has ended, `silent_ms` after the
    /// caller's last voice, whose words `text` trail off ("my order number is..."): yes, up
    /// to the silence an unfinished turn gets, when pauses are checked at all.
    pub fn waits_for_rest(&self, text: &str, silent_ms: u64) -> bool {
        (self.ends.model || self.ends.speculate)
            && trails_off(text)
            && silent_ms < self.unfinished_ms()
    }

    /// The silence that ends the turn, given what the current pause check knows.
    pub fn end_silence_ms(&self) -> u64 {
        let e = &self.ends;
        let Some(c) = &self.check else {
            return e.end_silence_ms;
        };
        let unfinished = self.unfinished_ms();
        let words = match &c.transcript {
            Known::Got(w) => Some(w),
            _ => None,
        };
        // An amount asked for, said with its unit: how it ends.
        let amount = words.filter(|_| self.amount).and_then(|w| w.amount_end);
        // A number asked for, and words without one ("I want to check my order", "I don't
        // have it"): no number comes in groups here; the model decides, as for any words.
        let no_number = words.is_some_and(|w| {
            (self.digits.is_some() && w.digits.is_none()) || (self.amount && !w.has_amount)
        });
        let number_pending =
            !no_number && (self.digits.is_some() || (self.amount && amount.is_none()));
        if let Some(w) = words {
            // Words that trail off wait (when they come after the end, the call waits for
            // more before the dialog hears them: `CallCore::check_recognized`).
            if w.trails_off {
                return unfinished;
            }
            // All the digits asked for, or the yes or no asked for: nothing more to come,
            // whatever the tone.
            if self
                .digits
                .is_some_and(|max| w.digits.is_some_and(|d| d >= max))
            {
                return 0;
            }
            if self.yes_no && w.answer {
                return 0;
            }
            // Down to the cents: nothing more to come.
            if amount == Some(AmountEnd::Cents) {
                return 0;
            }
        }
        match c.verdict {
            // Dollars named: the model's doubt waits only as long as a turn without it
            // ("...and fifty cents" may follow), not as long as words that trail off.
            Known::Got(p) if p < e.threshold && amount.is_some() => e.end_silence_ms,
            Known::Got(p) if p < e.threshold => unfinished,
            // A number can come in groups ("five five four... two one"), an amount before its
            // unit too ("one hundred... twenty dollars"), and a number whose words are not in
            // yet may be one: never early.
            Known::Got(_) if number_pending => e.end_silence_ms,
            Known::Got(_) => 0,
            Known::Pending | Known::Unavailable => e.end_silence_ms,
        }
    }

    /// The utterance heard so far (pre-roll included; empty when idle).
    pub fn utterance(&self) -> &[i16] {
        &self.utterance
    }

    /// True between speech start and end of turn.
    pub fn in_speech(&self) -> bool {
        self.state == State::Speaking
    }

    /// Voiced audio heard since the current speech began (0 when idle).
    pub fn voiced_ms(&self) -> u64 {
        if self.in_speech() {
            self.voiced_ms
        } else {
            self.candidate_ms
        }
    }

    /// The last frame may be the caller's voice starting: weaker evidence than a voiced frame
    /// (the VAD's onset score, well above the line's floor, not the agent's echo), enough to
    /// pause a reply but not to count as speech.
    pub fn onset(&self) -> bool {
        self.onset
    }

    /// Forgets the current utterance (for speech the agent chose not to listen to).
    pub fn reset(&mut self) {
        self.check = None;
        self.part_start = 0;
        self.state = State::Idle;
        self.candidate_ms = 0;
        self.gap_frames = 0;
        self.utterance.clear();
        self.silence_ms = 0;
        self.voiced_ms = 0;
        self.speech_ms = 0;
    }

    /// Feeds one 20 ms frame.
    pub fn push(&mut self, frame: &[i16]) -> Option<TurnEvent> {
        self.push_gated(frame, false)
    }

    /// Feeds one 20 ms frame; `echo`: its sound is the agent's own voice coming back, never
    /// the caller's (the VAD still hears it, to keep its state).
    pub fn push_gated(&mut self, frame: &[i16], echo: bool) -> Option<TurnEvent> {
        let voiced = self.vad.is_voice(frame) && !echo;
        self.onset = !echo && self.vad.maybe_voice();
        match self.state {
            State::Idle => {
                // Reuse the oldest pre-roll buffer: no allocation per frame while idle.
                let mut buf = if self.preroll.len() >= self.preroll_frames {
                    self.preroll.pop_front().unwrap_or_default()
                } else {
                    Vec::with_capacity(frame.len())
                };
                buf.clear();
                buf.extend_from_slice(frame);
                self.preroll.push_back(buf);
                if voiced {
                    self.candidate_ms += FRAME;
                    self.gap_frames = 0;
                } else if self.candidate_ms > 0 {
                    // One unvoiced frame inside a word does not reset the count; two do.
                    self.gap_frames += 1;
                    if self.gap_frames > 1 {
                        self.candidate_ms = 0;
                        self.gap_frames = 0;
                    }
                }
                if self.candidate_ms >= self.min_speech {
                    self.state = State::Speaking;
                    self.utterance.clear();
                    for f in self.preroll.drain(..) {
                        self.utterance.extend_from_slice(&f);
                    }
                    self.voiced_ms = self.candidate_ms;
                    self.speech_ms = self.candidate_ms;
                    self.silence_ms = 0;
                    self.samples_at_last_voice = self.utterance.len();
                    self.candidate_ms = 0;
                    return Some(TurnEvent::SpeechStart {
                        voiced_ms: self.voiced_ms,
                    });
                }
                None
            }
            State::Speaking => {
                self.utterance.extend_from_slice(frame);
                self.speech_ms += FRAME;
                if voiced {
                    self.voiced_ms += FRAME;
                    self.silence_ms = 0;
                    self.samples_at_last_voice = self.utterance.len();
                    // The caller goes on: what was checked is not the utterance any more. Its
                    // transcript is the turn's first part; only what follows is transcribed.
                    if let Some(c) = self.check.take()
                        && c.transcript != Known::Unavailable
                    {
                        self.part_start = c.audio_end;
                        return Some(TurnEvent::Resumed { id: c.id });
                    }
                } else {
                    self.silence_ms += FRAME;
                }
                let tail = {
                    let frame_len = frame.len().max(1) as u64;
                    (TAIL_MS / FRAME * frame_len) as usize
                };
                let ended = self.silence_ms >= self.end_silence_ms();
                let cut = !ended && self.speech_ms >= self.max_utterance;
                if !(ended || cut) {
                    if self.ends.checks()
                        && self.silence_ms >= self.ends.pause_ms
                        && self.check.is_none()
                        && self.silence_ms.saturating_sub(FRAME) < self.ends.pause_ms
                    {
                        self.next_check += 1;
                        let keep = (self.samples_at_last_voice + tail).min(self.utterance.len());
                        self.check = Some(Check {
                            audio_end: keep,
                            id: self.next_check,
                            verdict: if self.ends.model {
                                Known::Pending
                            } else {
                                Known::Unavailable
                            },
                            transcript: if self.ends.speculate {
                                Known::Pending
                            } else {
                                Known::Unavailable
                            },
                        });
                        return Some(TurnEvent::Pause {
                            id: self.next_check,
                            audio: self.utterance[..keep].to_vec(),
                            part_from: self.part_start.min(keep),
                        });
                    }
                    return None;
                }
                let keep = (self.samples_at_last_voice + tail).min(self.utterance.len());
                let mut audio = std::mem::take(&mut self.utterance);
                audio.truncate(keep);
                let from = self.part_start.min(audio.len());
                if from > 0 {
                    audio.drain(..from);
                }
                let check = self.check.take().map(|c| Checked {
                    id: c.id,
                    transcript_asked: c.transcript != Known::Unavailable,
                    transcript: match c.transcript {
                        Known::Got(w) => Some(w.text),
                        _ => None,
                    },
                    probability: match c.verdict {
                        Known::Got(p) => Some(p),
                        _ => None,
                    },
                });
                let event = TurnEvent::SpeechEnd {
                    audio,
                    from,
                    speech_ms: self.speech_ms.saturating_sub(self.silence_ms),
                    endpoint_ms: self.silence_ms,
                    cut,
                    check,
                };
                self.reset();
                self.preroll.clear();
                Some(event)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted VAD: frames whose first sample is non-zero are voice.
    struct Scripted;
    impl Vad for Scripted {
        fn is_voice(&mut self, frame: &[i16]) -> bool {
            frame.first().is_some_and(|&s| s != 0)
        }
        fn maybe_voice(&self) -> bool {
            false
        }
    }

    fn det(cfg: VadConfig) -> TurnDetector {
        TurnDetector::new(&cfg, Endpointing::silence_only(&cfg), Box::new(Scripted))
    }

    fn feed(d: &mut TurnDetector, voiced: bool, frames: usize) -> Vec<TurnEvent> {
        let f = vec![if voiced { 1000 } else { 0 }; 160];
        (0..frames).filter_map(|_| d.push(&f)).collect()
    }

    #[test]
    fn start_after_minimum_voice_end_after_silence() {
        let mut d = det(VadConfig {
            min_speech_ms: 100,
            end_silence_ms: 600,
            ..VadConfig::default()
        });
        assert!(feed(&mut d, false, 10).is_empty());
        let ev = feed(&mut d, true, 4);
        assert!(ev.is_empty(), "80 ms is not yet speech");
        let ev = feed(&mut d, true, 1);
        assert_eq!(ev, vec![TurnEvent::SpeechStart { voiced_ms: 100 }]);
        feed(&mut d, true, 45);
        assert!(
            feed(&mut d, false, 29).is_empty(),
            "580 ms of silence is not the end"
        );
        let ev = feed(&mut d, false, 1);
        match &ev[..] {
            [
                TurnEvent::SpeechEnd {
                    audio,
                    from: 0,
                    speech_ms,
                    endpoint_ms,
                    cut,
                    check: None,
                },
            ] => {
                assert_eq!(*speech_ms, 1000);
                assert_eq!(*endpoint_ms, 600);
                assert!(!cut);
                // 300 ms pre-roll (15 frames incl. the 5 voiced) + 45 voiced + 200 ms tail.
                assert_eq!(audio.len(), (15 + 45 + 10) * 160);
            }
            other => panic!("{other:?}"),
        }
        assert!(!d.in_speech());
    }

    #[test]
    fn clicks_do_not_start_speech() {
        let mut d = det(VadConfig {
            min_speech_ms: 100,
            ..VadConfig::default()
        });
        for _ in 0..20 {
            assert!(feed(&mut d, true, 2).is_empty());
            assert!(feed(&mut d, false, 2).is_empty());
        }
    }

    #[test]
    fn max_utterance_cuts() {
        let mut d = det(VadConfig {
            min_speech_ms: 40,
            max_utterance_ms: 1_000,
            ..VadConfig::default()
        });
        let ev = feed(&mut d, true, 60);
        assert!(matches!(ev[0], TurnEvent::SpeechStart { .. }));
        assert!(
            matches!(ev[1], TurnEvent::SpeechEnd { cut: true, .. }),
            "{:?}",
            ev[1]
        );
    }

    #[test]
    fn voiced_ms_tracks_onset_for_barge_in() {
        let mut d = det(VadConfig {
            min_speech_ms: 60,
            ..VadConfig::default()
        });
        feed(&mut d, true, 2);
        assert_eq!(d.voiced_ms(), 40);
        feed(&mut d, true, 5);
        assert!(d.in_speech());
        assert_eq!(d.voiced_ms(), 140);
    }

    fn with_checks(model: bool) -> TurnDetector {
        let cfg = VadConfig {
            min_speech_ms: 60,
            end_silence_ms: 600,
            ..VadConfig::default()
        };
        // The frame counts below are written for 200 ms pauses, whatever the default.
        let turn = TurnConfig {
            pause_ms: 200,
            ..TurnConfig::default()
        };
        let ends = Endpointing::new(&cfg, &turn, model);
        TurnDetector::new(&cfg, ends, Box::new(Scripted))
    }

    fn pause_id(ev: &[TurnEvent]) -> u64 {
        match ev {
            [TurnEvent::Pause { id, audio, .. }] => {
                assert!(!audio.is_empty());
                *id
            }
            other => panic!("expected one pause, got {other:?}"),
        }
    }

    #[test]
    fn one_check_per_pause_and_voice_drops_it() {
        let mut d = with_checks(true);
        feed(&mut d, true, 20);
        assert!(feed(&mut d, false, 9).is_empty());
        let first = pause_id(&feed(&mut d, false, 1));
        assert!(feed(&mut d, false, 5).is_empty(), "asked once per pause");
        // The caller goes on: the answer about the old audio no longer counts; its words are
        // the turn's first part.
        assert_eq!(
            feed(&mut d, true, 10),
            vec![TurnEvent::Resumed { id: first }]
        );
        d.verdict(first, Some(0.99));
        assert_eq!(d.end_silence_ms(), 600);
        feed(&mut d, false, 9);
        let ev = feed(&mut d, false, 1);
        let second = pause_id(&ev);
        assert!(second > first);
        // The model hears the whole utterance; ASR only the part after the first pause.
        let [
            TurnEvent::Pause {
                audio, part_from, ..
            },
        ] = &ev[..]
        else {
            unreachable!()
        };
        // 20 voiced, 15 quiet, 10 voiced, then the 200 ms tail; the first check had the 20
        // voiced and its 200 ms tail.
        assert_eq!(audio.len(), (20 + 15 + 10 + 10) * 160);
        assert_eq!(*part_from, (20 + 10) * 160);
        d.verdict(second, Some(0.99));
        assert_eq!(
            d.end_silence_ms(),
            0,
            "complete: at once, its words to come"
        );
        d.transcript(second, Some("Yes, that's all.".into()));
        assert_eq!(d.end_silence_ms(), 0);
        match &feed(&mut d, false, 1)[..] {
            [
                TurnEvent::SpeechEnd {
                    check: Some(c),
                    endpoint_ms,
                    ..
                },
            ] => {
                assert_eq!(*endpoint_ms, 220);
                assert_eq!(c.transcript.as_deref(), Some("Yes, that's all."));
                assert_eq!(c.probability, Some(0.99));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_end_follows_what_the_check_knows() {
        let mut d = with_checks(true);
        feed(&mut d, true, 20);
        feed(&mut d, false, 9);
        let id = pause_id(&feed(&mut d, false, 1));
        assert_eq!(d.end_silence_ms(), 600, "nothing known yet");
        d.transcript(id, Some("Yes.".into()));
        assert_eq!(
            d.end_silence_ms(),
            600,
            "the words but no verdict: the fixed silence"
        );
        d.verdict(id, Some(0.3));
        assert_eq!(d.end_silence_ms(), 1_500, "unfinished");
        d.verdict(id, Some(0.8));
        d.transcript(id, Some("my number is".into()));
        assert_eq!(d.end_silence_ms(), 1_500, "trailing words");
        d.transcript(id, Some("my number is 5".into()));
        assert_eq!(d.end_silence_ms(), 0);
        d.expect_digits(Some(5));
        assert_eq!(d.end_silence_ms(), 600, "a number never ends early");
        d.verdict(id, Some(0.1));
        assert_eq!(d.end_silence_ms(), 2_500);
        d.transcript(id, Some("five five four two one".into()));
        assert_eq!(d.end_silence_ms(), 0, "all five digits: at once");
        d.verdict(id, None);
        d.transcript(id, None);
        assert_eq!(d.end_silence_ms(), 600, "no answers: the fixed silence");
        // A yes or no to a yes-or-no question, whatever the tone (the model hears "no." as
        // unfinished more often than not); not when it trails off.
        d.expect_digits(None);
        d.verdict(id, Some(0.02));
        d.transcript(id, Some("no".into()));
        assert_eq!(
            d.end_silence_ms(),
            1_500,
            "no question asked: the model decides"
        );
        d.expect_yes_no(true);
        assert_eq!(d.end_silence_ms(), 0, "the answer asked for: at once");
        d.transcript(id, Some("Yes, that's right.".into()));
        assert_eq!(d.end_silence_ms(), 0);
        d.transcript(id, Some("yes and".into()));
        assert_eq!(d.end_silence_ms(), 1_500, "trailing words");
        d.transcript(id, Some("Thursday".into()));
        assert_eq!(d.end_silence_ms(), 1_500, "not a yes or no");
        d.transcript(id, Some("I'm not sure".into()));
        assert_eq!(d.end_silence_ms(), 1_500, "'not' is not a no");
        // Without a model only the words count.
        let mut d = with_checks(false);
        feed(&mut d, true, 20);
        feed(&mut d, false, 9);
        let id = pause_id(&feed(&mut d, false, 1));
        d.transcript(id, Some("Yes.".into()));
        assert_eq!(d.end_silence_ms(), 600);
        d.transcript(id, Some("and".into()));
        assert_eq!(d.end_silence_ms(), 1_500);
    }

    #[test]
    fn words_that_trail_off_wait_for_the_rest_up_to_the_unfinished_silence() {
        let d = with_checks(true);
        let unfinished = d.unfinished_ms();
        assert!(unfinished > 600);
        assert!(d.waits_for_rest("my order number is", 0));
        assert!(d.waits_for_rest("my order number is", unfinished - 20));
        assert!(
            !d.waits_for_rest("my order number is", unfinished),
            "waited enough"
        );
        assert!(!d.waits_for_rest("five five four two one", 0), "complete");
        let mut d = with_checks(true);
        d.expect_digits(Some(5));
        assert!(
            d.waits_for_rest("it is", d.unfinished_ms() - 20),
            "longer for a number"
        );
        // Without pause checks the fixed silence has ended the turn: nothing more is awaited.
        let cfg = VadConfig::default();
        let d = TurnDetector::new(&cfg, Endpointing::silence_only(&cfg), Box::new(Scripted));
        assert!(!d.waits_for_rest("my order number is", 0));
    }

    #[test]
    fn what_the_call_expects_sets_the_waits() {
        use crate::engines::dialog::DigitSpec;
        let keys = |max, terminator| Expectation {
            digits: Some(DigitSpec { max, terminator }),
            ..Expectation::default()
        };
        let mut d = with_checks(true);
        let plain = d.unfinished_ms();
        d.expect(&keys(5, Some('#')));
        assert!(d.unfinished_ms() > plain, "a number waits longer");
        d.expect(&keys(1, Some('#')));
        assert_eq!(d.unfinished_ms(), plain, "one digit is no number read out");
        // A yes or no: the answer ends the turn at once whatever the model says.
        d.expect(&keys(1, None));
        feed(&mut d, true, 20);
        feed(&mut d, false, 9);
        let id = pause_id(&feed(&mut d, false, 1));
        d.verdict(id, Some(0.02));
        d.transcript(id, Some("Yes.".into()));
        assert_eq!(d.end_silence_ms(), 0);
        d.expect(&Expectation::default());
        assert_eq!(
            d.end_silence_ms(),
            plain,
            "no question: the model's doubt waits"
        );
    }

    #[test]
    fn an_amount_ends_the_turn_by_its_unit() {
        let mut d = with_checks(true);
        let plain = d.unfinished_ms();
        // Keyed as up to 20 digits, spoken in words: not a number read out.
        d.expect(&Expectation {
            digits: Some(crate::engines::dialog::DigitSpec {
                max: 20,
                terminator: Some('#'),
            }),
            spoken: Some(Spoken::Amount),
            ..Expectation::default()
        });
        assert_eq!(d.unfinished_ms(), plain, "no wait for digit groups");
        feed(&mut d, true, 20);
        feed(&mut d, false, 9);
        let id = pause_id(&feed(&mut d, false, 1));
        let ends = |d: &mut TurnDetector, p: f32, said: &str| {
            d.verdict(id, Some(p));
            d.transcript(id, Some(said.into()));
            d.end_silence_ms()
        };
        // Down to the cents: at once, whatever the model hears.
        assert_eq!(ends(&mut d, 0.25, "Fifty dollars and fifty cents."), 0);
        assert_eq!(ends(&mut d, 0.25, "$10.50"), 0);
        // Dollars named: the model's doubt ("fifty dollars" heard as trailing off) waits only
        // the fixed silence, for "...and fifty cents".
        assert_eq!(ends(&mut d, 0.25, "Fifty dollars."), 600);
        assert_eq!(ends(&mut d, 0.25, "$50."), 600);
        assert_eq!(ends(&mut d, 0.9, "Fifty dollars."), 0, "complete: at once");
        // No unit yet: the number may go on ("one hundred... twenty dollars").
        assert_eq!(ends(&mut d, 0.9, "One hundred."), 600, "never early");
        assert_eq!(ends(&mut d, 0.25, "Fifty"), plain);
        assert_eq!(
            ends(&mut d, 0.9, "a hundred dollars and"),
            plain,
            "trails off"
        );
    }

    #[test]
    fn words_without_the_number_asked_for_end_as_any_words() {
        let mut d = with_checks(true);
        d.expect_digits(Some(5));
        feed(&mut d, true, 20);
        feed(&mut d, false, 9);
        let id = pause_id(&feed(&mut d, false, 1));
        d.verdict(id, Some(0.9));
        assert_eq!(
            d.end_silence_ms(),
            600,
            "the words are not in yet: may be digits"
        );
        d.transcript(id, Some("five five".into()));
        assert_eq!(d.end_silence_ms(), 600, "digits come in groups");
        d.transcript(id, Some("I want to check my order.".into()));
        assert_eq!(d.end_silence_ms(), 0, "no number: the model decides");
        d.verdict(id, Some(0.1));
        assert_eq!(
            d.end_silence_ms(),
            d.unfinished_ms(),
            "its doubt waits as long"
        );
        d.transcript(id, Some("My order number is".into()));
        assert_eq!(d.end_silence_ms(), d.unfinished_ms());
        // The same for an amount asked for.
        d.expect_digits(None);
        d.expect(&Expectation {
            spoken: Some(Spoken::Amount),
            ..Expectation::default()
        });
        d.verdict(id, Some(0.9));
        d.transcript(id, Some("I'd rather pay by card.".into()));
        assert_eq!(d.end_silence_ms(), 0);
        d.transcript(id, Some("One hundred".into()));
        assert_eq!(d.end_silence_ms(), 600);
    }
}
