//! Turn taking: VAD decisions per 20 ms frame become speech start (after a minimum of voiced
//! audio), end of turn (after a silence) and a cut at the maximum utterance length. Missing
//! frames are fed in as silence by the session, so endpointing runs on the call's clock.

use std::collections::VecDeque;

use super::vad::Vad;
use crate::audio::FRAME_MS;
use crate::config::VadConfig;

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
    /// The caller's turn ended; `audio` is the utterance with a little context on both sides.
    SpeechEnd {
        audio: Vec<i16>,
        speech_ms: u64,
        endpoint_ms: u64,
        cut: bool,
    },
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
    end_silence: u64,
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
}

impl TurnDetector {
    pub fn new(cfg: &VadConfig, rate: u32, vad: Box<dyn Vad>) -> Self {
        let _ = rate;
        Self {
            vad,
            min_speech: cfg.min_speech_ms.max(FRAME),
            end_silence: cfg.end_silence_ms,
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
        }
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

    /// Forgets the current utterance (for speech the agent chose not to listen to).
    pub fn reset(&mut self) {
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
        let voiced = self.vad.is_voice(frame);
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
                } else {
                    self.silence_ms += FRAME;
                }
                let ended = self.silence_ms >= self.end_silence;
                let cut = !ended && self.speech_ms >= self.max_utterance;
                if !(ended || cut) {
                    return None;
                }
                let frame_len = frame.len().max(1) as u64;
                let tail = (TAIL_MS / FRAME * frame_len) as usize;
                let keep = (self.samples_at_last_voice + tail).min(self.utterance.len());
                let mut audio = std::mem::take(&mut self.utterance);
                audio.truncate(keep);
                let event = TurnEvent::SpeechEnd {
                    audio,
                    speech_ms: self.speech_ms.saturating_sub(self.silence_ms),
                    endpoint_ms: self.silence_ms,
                    cut,
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
    }

    fn det(cfg: VadConfig) -> TurnDetector {
        TurnDetector::new(&cfg, 8_000, Box::new(Scripted))
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
                    speech_ms,
                    endpoint_ms,
                    cut,
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
}
