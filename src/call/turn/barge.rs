//! Barge-in decisions while the agent speaks, as a state machine the call task feeds once per
//! tick (and at the end of each caller utterance, and with each backchannel transcript) and
//! whose answers it carries out: pause the reply at the caller's first voiced frame (or at the
//! onset of one: a frame that may be a voice starting, undone at once unless a voice follows),
//! resume it when the sound stopped before it became speech (a cough, a click) or turned out
//! to be only acknowledgement ("mm-hm", "okay"), barge in when the caller's speech lasts past
//! the minimum, when a pause lasts too long, or when a second utterance comes while the first
//! is checked. Pure: no clock, no I/O.

/// A pause on an onset alone resumes after this many ticks of the caller's audio with neither
/// onset nor voice (ticks without a frame from the PBX, jitter, do not count)...
const ONSET_QUIET_TICKS: u8 = 3;
/// ...or, without a voice, after this long in all (a sound that keeps scoring as an onset).
const ONSET_MAX_MS: u64 = 100;
/// After such a resume, onsets alone pause nothing for this long (a voice still does)...
const ONSET_REST_MS: u64 = 1_000;
/// ...and after this many in a row (a line whose clicks score as onsets), nothing until the
/// caller really speaks.
const ONSET_MAX_MISSES: u32 = 3;

/// Words that acknowledge without taking the turn.
const BACKCHANNELS: &[&str] = &[
    "mm", "mmm", "hmm", "mhm", "hm", "uh", "huh", "um", "ah", "oh", "okay", "ok", "yeah", "yep",
    "yes", "right", "sure", "alright", "i", "see", "got", "it", "cool", "great", "fine", "aha",
    "uhhuh", "mmhm", "mmhmm", "hmhm",
];

/// The transcript is only acknowledgement ("mm-hm", "okay", "right", "I see").
pub fn is_backchannel(text: &str) -> bool {
    let words: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '.' || c == '!' || c == '?')
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect();
    words.len() <= 3 && words.iter().all(|w| BACKCHANNELS.contains(&w.as_str()))
}

/// A short yes or no, led by the word itself ("yes", "okay", "no thanks", "yes that's right"):
/// an answer to a yes-or-no question, complete whatever its tone.
pub fn is_answer(text: &str) -> bool {
    crate::engines::dialog::entities::tokens(text).len() <= 4
        && crate::engines::dialog::entities::yes_no(text).is_some_and(|(_, conf)| conf >= 1.0)
}

/// A transcript of no words: "[BLANK_AUDIO]", "(coughs)", "...".
pub fn is_noise_transcript(text: &str) -> bool {
    let t = text.trim();
    (t.starts_with('[') && t.ends_with(']'))
        || (t.starts_with('(') && t.ends_with(')'))
        || t.chars().all(|c| !c.is_alphanumeric())
}

/// The limits, from `[vad]` (and the ASR limit for a pause whose utterance is checked).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub barge_in_min_ms: u64,
    /// Speech shorter than this over a paused reply may be a backchannel (0: none are).
    pub backchannel_max_ms: u64,
    /// Quiet this long after a pause resumes the reply.
    pub resume_after_ms: u64,
    /// A pause longer than this is the caller taking the turn.
    pub pause_limit_ms: u64,
}

/// What the call sees in this tick.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    pub now: u64,
    /// The caller's voice in the current utterance so far, and whether it has become speech.
    pub voiced_ms: u64,
    /// A frame of this tick may be the caller's voice starting (weaker evidence than a voice).
    pub onset: bool,
    /// The tick carried the caller's audio (a frame, or silence after frames stopped coming).
    pub heard: bool,
    pub in_speech: bool,
    /// Speech over the agent is ignored (the reply was not interruptible when it began).
    pub ignored: bool,
    /// The reply has started playing, may be interrupted, may be paused (the PBX holds little
    /// of it), and has audio not yet sent.
    pub started: bool,
    pub interruptible: bool,
    pub pausable: bool,
    pub unsent: bool,
}

impl Seen {
    fn voice(&self) -> bool {
        self.in_speech || self.voiced_ms > 0
    }
}

/// What the call is to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Stop sending the reply (and drop what the PBX has queued), keeping the rest.
    Pause,
    /// Go on from where it stopped.
    Resume(Resumed),
    /// The caller takes the turn: flush, cancel, cut the history to what was heard.
    BargeIn,
    /// Transcribe the short utterance to tell a backchannel from a turn; stay paused.
    Check,
}

/// Why a paused reply resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    Noise,
    Backchannel,
    /// The reply turned into a farewell while paused: it plays to its end.
    Farewell,
    /// The onset it paused on was not followed by a voice.
    Unconfirmed,
}

impl Resumed {
    pub fn label(self) -> &'static str {
        match self {
            Resumed::Noise => "noise",
            Resumed::Backchannel => "backchannel",
            Resumed::Farewell => "farewell",
            Resumed::Unconfirmed => "unconfirmed",
        }
    }
}

/// A paused reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    pub since: u64,
    /// A voice was heard (not only an onset); while not, the ticks of the caller's audio since
    /// the last onset.
    pub confirmed: bool,
    pub onset_quiet: u8,
    /// The caller has been quiet since then.
    pub quiet_since: Option<u64>,
    /// The short utterance is being transcribed (ASR seq) to tell a backchannel from a turn.
    pub checking: Option<u64>,
    /// When that utterance ended, and the silence that ended it (for its turn record).
    pub speech_end: u64,
    pub endpoint_ms: u64,
}

/// What a call remembers, from reply to reply, of onsets not followed by a voice: until when
/// onsets alone pause nothing, and how many there were since the caller last spoke. The call
/// keeps it and hands it to every tick of its replies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OnsetRest {
    until: u64,
    misses: u32,
}

/// The barge-in state of the reply playing now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BargeIn {
    pause: Option<Pause>,
}

impl BargeIn {
    pub fn pause(&self) -> Option<&Pause> {
        self.pause.as_ref()
    }

    pub fn paused(&self) -> bool {
        self.pause.is_some()
    }

    /// The utterance being checked for a backchannel (its ASR seq).
    pub fn checking(&self) -> Option<u64> {
        self.pause.and_then(|p| p.checking)
    }

    /// The check's transcript came (or failed): the pause no longer waits for it.
    pub fn checked(&mut self) {
        if let Some(p) = self.pause.as_mut() {
            p.checking = None;
        }
    }

    /// Ends the pause (the reply resumed or was cut), giving it back.
    pub fn end(&mut self) -> Option<Pause> {
        self.pause.take()
    }

    /// Once per tick, after the caller's audio of the tick and before the reply's audio goes
    /// out (so a pause silences the ear in this tick), with the call's memory of onsets.
    pub fn tick(&mut self, s: &Seen, l: &Limits, onsets: &mut OnsetRest) -> Option<Decision> {
        if s.in_speech {
            // The caller really speaks: their onsets are worth pausing for again.
            *onsets = OnsetRest::default();
        }
        if s.in_speech && !s.ignored && s.started && s.interruptible {
            // Once the whole reply has gone out there is nothing to resume: speech is an
            // answer, at the plain minimum.
            let min = if s.pausable && l.backchannel_max_ms > 0 && s.unsent {
                l.barge_in_min_ms.max(l.backchannel_max_ms)
            } else {
                l.barge_in_min_ms
            };
            if s.voiced_ms >= min {
                return Some(Decision::BargeIn);
            }
        }
        if self.pause.is_some() && !s.interruptible {
            return Some(Decision::Resume(Resumed::Farewell));
        }
        if !s.pausable || s.ignored {
            return None;
        }
        if !s.started || !s.interruptible {
            return None;
        }
        let Some(p) = self.pause.as_mut() else {
            // Everything received has gone out (the PBX is playing the last of it, or the
            // dialog is still writing): nothing to resume, so the caller's voice is their answer.
            let onset = s.onset && s.now >= onsets.until && onsets.misses < ONSET_MAX_MISSES;
            if (s.voice() || onset) && s.unsent {
                self.pause = Some(Pause {
                    since: s.now,
                    confirmed: s.voice(),
                    onset_quiet: 0,
                    quiet_since: None,
                    checking: None,
                    speech_end: s.now,
                    endpoint_ms: 0,
                });
                return Some(Decision::Pause);
            }
            return None;
        };
        if s.now.saturating_sub(p.since) > l.pause_limit_ms {
            return Some(Decision::BargeIn);
        }
        if !p.confirmed && !s.voice() {
            // Paused on an onset: undone unless a voice follows at once.
            if s.onset {
                p.onset_quiet = 0;
            } else if s.heard {
                p.onset_quiet = p.onset_quiet.saturating_add(1);
            }
            if p.onset_quiet >= ONSET_QUIET_TICKS || s.now.saturating_sub(p.since) >= ONSET_MAX_MS {
                onsets.misses = onsets.misses.saturating_add(1);
                onsets.until = s.now.saturating_add(ONSET_REST_MS);
                return Some(Decision::Resume(Resumed::Unconfirmed));
            }
            return None;
        }
        if s.voice() {
            p.confirmed = true;
            p.quiet_since = None;
            return None;
        }
        let quiet = *p.quiet_since.get_or_insert(s.now);
        if p.checking.is_none() && s.now.saturating_sub(quiet) >= l.resume_after_ms {
            return Some(Decision::Resume(Resumed::Noise));
        }
        None
    }

    /// The caller's utterance ended (`speech_ms` of it, `endpoint_ms` of silence ended it at
    /// `now`) while this reply played; `ignored` when speech over it does not count. `Check`
    /// asks for its transcript as `seq` (the reply stays paused meanwhile).
    pub fn utterance_end(
        &mut self,
        now: u64,
        speech_ms: u64,
        endpoint_ms: u64,
        ignored: bool,
        seq: u64,
        l: &Limits,
    ) -> Option<Decision> {
        if ignored {
            return None;
        }
        let p = self.pause.as_mut()?;
        // A second utterance while the first is checked: the caller is talking, not
        // acknowledging.
        if p.checking.is_some() {
            return Some(Decision::BargeIn);
        }
        // Too long for a backchannel (words with gaps): the caller's turn.
        if speech_ms >= l.backchannel_max_ms {
            return Some(Decision::BargeIn);
        }
        p.checking = Some(seq);
        p.speech_end = now.saturating_sub(endpoint_ms);
        p.endpoint_ms = endpoint_ms;
        Some(Decision::Check)
    }

    /// The checked utterance's transcript (an error when it failed: not understood is not
    /// "mm-hm"). `asking`: the reply is in its closing question, where a yes or no ("yes",
    /// "okay", "right") answers it; "mm-hm", "um" or "I see" still only acknowledge.
    pub fn transcript(&mut self, text: Result<&str, ()>, asking: bool) -> Decision {
        self.checked();
        match text {
            Ok(t) if t.is_empty() || is_noise_transcript(t) => {
                Decision::Resume(Resumed::Backchannel)
            }
            Ok(t) if is_backchannel(t) && !(asking && is_answer(t)) => {
                Decision::Resume(Resumed::Backchannel)
            }
            _ => Decision::BargeIn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply's barge-in state with its call's memory of onsets.
    #[derive(Default)]
    struct B {
        b: BargeIn,
        o: OnsetRest,
    }

    impl B {
        fn tick(&mut self, s: &Seen, l: &Limits) -> Option<Decision> {
            self.b.tick(s, l, &mut self.o)
        }
    }

    impl std::ops::Deref for B {
        type Target = BargeIn;
        fn deref(&self) -> &BargeIn {
            &self.b
        }
    }

    impl std::ops::DerefMut for B {
        fn deref_mut(&mut self) -> &mut BargeIn {
            &mut self.b
        }
    }

    const L: Limits = Limits {
        barge_in_min_ms: 300,
        backchannel_max_ms: 700,
        resume_after_ms: 250,
        pause_limit_ms: 3_000,
    };

    fn playing(now: u64) -> Seen {
        Seen {
            now,
            started: true,
            interruptible: true,
            pausable: true,
            unsent: true,
            heard: true,
            ..Seen::default()
        }
    }

    /// A reply paused at 0 ms whose short utterance (350 ms, ended at 600 ms) is checked as
    /// `seq`.
    fn checking(seq: u64) -> B {
        let mut b = B::default();
        b.tick(&voiced(0, 20), &L);
        assert_eq!(
            b.utterance_end(600, 350, 200, false, seq, &L),
            Some(Decision::Check)
        );
        b
    }

    fn voiced(now: u64, ms: u64) -> Seen {
        Seen {
            voiced_ms: ms,
            in_speech: ms >= 100,
            ..playing(now)
        }
    }

    #[test]
    fn a_cough_pauses_the_reply_then_quiet_resumes_it() {
        let mut b = B::default();
        assert_eq!(b.tick(&playing(0), &L), None);
        assert_eq!(b.tick(&voiced(20, 20), &L), Some(Decision::Pause));
        assert!(b.paused());
        assert_eq!(b.tick(&voiced(40, 40), &L), None);
        // Quiet from 60 ms: resumes 250 ms later, not before.
        assert_eq!(b.tick(&playing(60), &L), None);
        assert_eq!(b.tick(&playing(300), &L), None);
        assert_eq!(
            b.tick(&playing(310), &L),
            Some(Decision::Resume(Resumed::Noise))
        );
        assert_eq!(b.end().map(|p| p.since), Some(20));
        assert!(!b.paused());
    }

    #[test]
    fn voice_again_restarts_the_quiet_wait() {
        let mut b = B::default();
        b.tick(&voiced(0, 20), &L);
        b.tick(&playing(20), &L);
        assert_eq!(b.tick(&voiced(200, 20), &L), None);
        assert_eq!(b.tick(&playing(220), &L), None);
        assert_eq!(b.tick(&playing(400), &L), None);
        assert_eq!(
            b.tick(&playing(470), &L),
            Some(Decision::Resume(Resumed::Noise))
        );
    }

    #[test]
    fn speech_past_the_backchannel_length_barges_in() {
        let mut b = B::default();
        assert_eq!(b.tick(&voiced(0, 20), &L), Some(Decision::Pause));
        // Past barge_in_min but a backchannel may still be this long: wait.
        assert_eq!(b.tick(&voiced(400, 400), &L), None);
        assert_eq!(b.tick(&voiced(700, 700), &L), Some(Decision::BargeIn));
    }

    #[test]
    fn with_everything_sent_speech_barges_in_at_the_plain_minimum() {
        let mut b = B::default();
        let sent = |s: Seen| Seen { unsent: false, ..s };
        // No pause: nothing is left to hold back.
        assert_eq!(b.tick(&sent(voiced(0, 20)), &L), None);
        assert!(!b.paused());
        assert_eq!(b.tick(&sent(voiced(300, 300)), &L), Some(Decision::BargeIn));
    }

    #[test]
    fn a_reply_that_may_not_be_interrupted_is_never_paused() {
        let mut b = B::default();
        let fixed = |s: Seen| Seen {
            interruptible: false,
            ..s
        };
        assert_eq!(b.tick(&fixed(voiced(0, 20)), &L), None);
        assert_eq!(b.tick(&fixed(voiced(2_000, 2_000)), &L), None);
        // Paused, then it became a farewell: it plays on.
        let mut b = B::default();
        b.tick(&voiced(0, 20), &L);
        assert_eq!(
            b.tick(&fixed(voiced(20, 40)), &L),
            Some(Decision::Resume(Resumed::Farewell))
        );
    }

    #[test]
    fn without_pausing_speech_cuts_at_the_minimum() {
        let mut b = B::default();
        let cut = |s: Seen| Seen {
            pausable: false,
            ..s
        };
        assert_eq!(b.tick(&cut(voiced(0, 20)), &L), None);
        assert_eq!(b.tick(&cut(voiced(200, 200)), &L), None);
        assert_eq!(b.tick(&cut(voiced(300, 300)), &L), Some(Decision::BargeIn));
    }

    #[test]
    fn a_pause_that_lasts_is_the_callers_turn() {
        let mut b = B::default();
        b.tick(&voiced(0, 20), &L);
        assert_eq!(b.tick(&voiced(3_000, 60), &L), None);
        assert_eq!(b.tick(&voiced(3_020, 60), &L), Some(Decision::BargeIn));
    }

    #[test]
    fn a_short_utterance_is_checked_and_its_transcript_decides() {
        let mut b = B::default();
        b.tick(&voiced(0, 20), &L);
        assert_eq!(
            b.utterance_end(600, 350, 200, false, 7, &L),
            Some(Decision::Check)
        );
        assert_eq!(b.checking(), Some(7));
        assert_eq!(
            b.pause().map(|p| (p.speech_end, p.endpoint_ms)),
            Some((400, 200))
        );
        // Quiet does not resume while the transcript is awaited.
        assert_eq!(b.tick(&playing(620), &L), None);
        assert_eq!(b.tick(&playing(1_200), &L), None);
        assert_eq!(
            b.transcript(Ok("Mm-hm."), false),
            Decision::Resume(Resumed::Backchannel)
        );
        assert_eq!(b.checking(), None);

        let mut b = checking(8);
        assert_eq!(b.transcript(Ok("stop, what"), false), Decision::BargeIn);

        let mut b = checking(9);
        assert_eq!(b.transcript(Err(()), false), Decision::BargeIn);
    }

    #[test]
    fn yes_over_the_closing_question_answers_it() {
        let mut b = checking(7);
        assert_eq!(b.transcript(Ok("Yes."), true), Decision::BargeIn);
        // Acknowledgement that is not a yes or no, or a cough, still resumes it.
        for t in ["Mm-hm.", "um", "I see."] {
            let mut b = checking(9);
            assert_eq!(
                b.transcript(Ok(t), true),
                Decision::Resume(Resumed::Backchannel),
                "{t}"
            );
        }
        let mut b = checking(8);
        assert_eq!(
            b.transcript(Ok("(coughs)"), true),
            Decision::Resume(Resumed::Backchannel)
        );
    }

    #[test]
    fn a_second_utterance_while_the_first_is_checked_barges_in() {
        let mut b = checking(7);
        assert_eq!(
            b.utterance_end(1_000, 200, 200, false, 8, &L),
            Some(Decision::BargeIn)
        );
    }

    #[test]
    fn a_long_utterance_with_little_voice_barges_in_and_ignored_speech_does_nothing() {
        let mut b = B::default();
        b.tick(&voiced(0, 20), &L);
        assert_eq!(
            b.utterance_end(1_500, 900, 200, false, 7, &L),
            Some(Decision::BargeIn)
        );
        assert_eq!(b.utterance_end(1_500, 300, 200, true, 8, &L), None);
        // No pause: nothing to decide.
        assert_eq!(
            B::default().utterance_end(1_500, 300, 200, false, 9, &L),
            None
        );
    }

    #[test]
    fn backchannels_and_noise_are_told_from_words() {
        for t in [
            "mm-hm",
            "Mm-hmm.",
            "Okay.",
            "yeah, right",
            "I see.",
            "uh huh",
            "uh-huh",
            "Got it.",
        ] {
            assert!(is_backchannel(t), "{t}");
        }
        for t in [
            "wait",
            "Wait, what?",
            "Stop.",
            "okay stop that",
            "okay so my order is late",
            "No.",
            "agent",
            "yes I want to return it",
        ] {
            assert!(!is_backchannel(t), "{t}");
        }
        for t in ["[BLANK_AUDIO]", "(coughs)", "...", ""] {
            assert!(is_noise_transcript(t), "{t}");
        }
        assert!(!is_noise_transcript("hello"));
        for t in [
            "yes",
            "Okay.",
            "no thanks",
            "Yes, that's right.",
            "no it does not",
        ] {
            assert!(is_answer(t), "{t}");
        }
        for t in [
            "I'm not sure",
            "hello",
            "mm-hm",
            "well yes",
            "yes I would like to return the blue one",
        ] {
            assert!(!is_answer(t), "{t}");
        }
    }

    fn onset(now: u64) -> Seen {
        Seen {
            onset: true,
            ..playing(now)
        }
    }

    #[test]
    fn an_onset_pauses_and_is_undone_when_no_voice_follows() {
        let mut b = B::default();
        assert_eq!(b.tick(&onset(1_000), &L), Some(Decision::Pause));
        assert_eq!(b.pause().map(|p| p.confirmed), Some(false));
        // Three ticks of the caller's audio without it undo it; a tick without a frame from
        // the PBX (jitter) is not one of them.
        assert_eq!(b.tick(&playing(1_020), &L), None);
        let no_frame = Seen {
            heard: false,
            ..playing(1_040)
        };
        assert_eq!(b.tick(&no_frame, &L), None);
        assert_eq!(b.tick(&playing(1_060), &L), None);
        assert_eq!(
            b.tick(&playing(1_080), &L),
            Some(Decision::Resume(Resumed::Unconfirmed))
        );
        assert_eq!(b.end().map(|p| p.since), Some(1_000));
        // For a second after, onsets alone pause nothing; a voice still does.
        assert_eq!(b.tick(&onset(1_100), &L), None);
        assert_eq!(b.tick(&onset(2_060), &L), None);
        assert_eq!(b.tick(&voiced(2_070, 20), &L), Some(Decision::Pause));
        assert_eq!(b.pause().map(|p| p.confirmed), Some(true));
        b.end();
        assert_eq!(b.tick(&onset(2_080), &L), Some(Decision::Pause));
    }

    #[test]
    fn a_soft_word_start_stays_paused_until_its_voice() {
        // An onset, two frames under the onset score, then the voice: one pause, no blip.
        let mut b = B::default();
        assert_eq!(b.tick(&onset(0), &L), Some(Decision::Pause));
        assert_eq!(b.tick(&playing(20), &L), None);
        assert_eq!(b.tick(&playing(40), &L), None);
        assert_eq!(b.tick(&voiced(60, 20), &L), None);
        assert_eq!(b.pause().map(|p| (p.since, p.confirmed)), Some((0, true)));
    }

    #[test]
    fn an_onset_followed_by_a_voice_is_a_pause_like_any_other() {
        let mut b = B::default();
        assert_eq!(b.tick(&onset(0), &L), Some(Decision::Pause));
        assert_eq!(b.tick(&onset(20), &L), None);
        assert_eq!(b.tick(&voiced(40, 20), &L), None);
        assert_eq!(b.pause().map(|p| p.confirmed), Some(true));
        // Now it waits the cough's quiet, not the onset's, and speech past the minimum cuts.
        assert_eq!(b.tick(&playing(60), &L), None);
        assert_eq!(b.tick(&playing(200), &L), None);
        assert_eq!(
            b.tick(&playing(310), &L),
            Some(Decision::Resume(Resumed::Noise))
        );
        b.end();
        assert_eq!(b.tick(&onset(400), &L), Some(Decision::Pause));
        assert_eq!(b.tick(&voiced(420, 20), &L), None);
        assert_eq!(b.tick(&voiced(900, 700), &L), Some(Decision::BargeIn));
    }

    #[test]
    fn after_three_onsets_that_were_not_voices_only_speech_brings_them_back() {
        let miss = |b: &mut B, at: u64| {
            assert_eq!(b.tick(&onset(at), &L), Some(Decision::Pause), "{at}");
            for t in [20, 40] {
                assert_eq!(b.tick(&playing(at + t), &L), None);
            }
            assert_eq!(
                b.tick(&playing(at + 60), &L),
                Some(Decision::Resume(Resumed::Unconfirmed))
            );
            b.end();
        };
        let mut b = B::default();
        miss(&mut b, 0);
        miss(&mut b, 1_100);
        // A later reply remembers.
        let mut b = B {
            b: BargeIn::default(),
            o: b.o,
        };
        miss(&mut b, 2_200);
        for at in [3_300, 10_000, 60_000] {
            assert_eq!(b.tick(&onset(at), &L), None, "{at}");
        }
        // A cough (a voice, not speech) still pauses, but brings back nothing.
        assert_eq!(b.tick(&voiced(60_100, 20), &L), Some(Decision::Pause));
        b.end();
        assert_eq!(b.tick(&onset(61_200), &L), None);
        // The caller speaks (here while the agent is quiet): onsets pause again.
        let speech = Seen {
            now: 62_000,
            voiced_ms: 200,
            in_speech: true,
            heard: true,
            ..Seen::default()
        };
        assert_eq!(b.tick(&speech, &L), None);
        assert_eq!(b.tick(&onset(63_000), &L), Some(Decision::Pause));
    }

    #[test]
    fn a_paused_reply_that_became_a_farewell_goes_on_even_while_speech_is_ignored() {
        let mut b = B::default();
        assert_eq!(b.tick(&voiced(0, 20), &L), Some(Decision::Pause));
        let farewell = Seen {
            interruptible: false,
            ignored: true,
            ..voiced(20, 40)
        };
        assert_eq!(
            b.tick(&farewell, &L),
            Some(Decision::Resume(Resumed::Farewell))
        );
    }

    #[test]
    fn onsets_that_never_become_a_voice_are_undone_after_100_ms() {
        let mut b = B::default();
        assert_eq!(b.tick(&onset(0), &L), Some(Decision::Pause));
        for t in (20..100).step_by(20) {
            assert_eq!(b.tick(&onset(t), &L), None, "{t}");
        }
        assert_eq!(
            b.tick(&onset(100), &L),
            Some(Decision::Resume(Resumed::Unconfirmed))
        );
        b.end();
        assert_eq!(b.tick(&onset(120), &L), None);
    }

    #[test]
    fn an_onset_pauses_nothing_where_a_voice_would_not() {
        let mut b = B::default();
        for s in [
            Seen {
                pausable: false,
                ..onset(0)
            },
            Seen {
                unsent: false,
                ..onset(0)
            },
            Seen {
                ignored: true,
                ..onset(0)
            },
            Seen {
                interruptible: false,
                ..onset(0)
            },
        ] {
            assert_eq!(b.tick(&s, &L), None, "{s:?}");
        }
    }
}
