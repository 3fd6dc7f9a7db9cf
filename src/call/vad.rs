//! Voice activity detection on 20 ms frames: webrtc-vad (the libfvad port of WebRTC's GMM
//! detector) or earshot (a small pure-Rust neural detector, 16 kHz / 16 ms frames only), and
//! the onset of a voice: the first 20 ms of a word score low (earshot gives 0.35-0.48 where the
//! next frame gives 0.55-0.7), so a frame that scores above a lower threshold and stands well
//! above the line's noise floor may be a voice starting. Only a reply's pause acts on that
//! weaker evidence (it is undone after 60 ms of quiet unless a voice follows).

use crate::audio::{StreamResampler, rms_dbfs};
use crate::config::VadConfig;

/// Says whether a 20 ms frame holds voice.
pub trait Vad: Send {
    fn is_voice(&mut self, frame: &[i16]) -> bool;

    /// After [`Vad::is_voice`]: the frame may be a voice starting, on weaker evidence than
    /// `is_voice` asks for.
    fn maybe_voice(&self) -> bool;
}

/// webrtc-vad wrapper.
pub struct WebRtcVad {
    inner: webrtc_vad::Vad,
    frame_len: usize,
    last: bool,
}

// SAFETY: webrtc_vad::Vad owns a heap-allocated libfvad instance with no thread affinity or
// shared state; it is only ever used through `&mut self`, so moving it to another thread is
// sound. The crate only lacks the marker because it holds a raw pointer.
unsafe impl Send for WebRtcVad {}

impl WebRtcVad {
    pub fn new(rate: u32, mode: u8) -> Self {
        let r = if rate == 8_000 {
            webrtc_vad::SampleRate::Rate8kHz
        } else {
            webrtc_vad::SampleRate::Rate16kHz
        };
        let m = match mode {
            0 => webrtc_vad::VadMode::Quality,
            1 => webrtc_vad::VadMode::LowBitrate,
            2 => webrtc_vad::VadMode::Aggressive,
            _ => webrtc_vad::VadMode::VeryAggressive,
        };
        Self {
            inner: webrtc_vad::Vad::new_with_rate_and_mode(r, m),
            frame_len: (rate / 50) as usize,
            last: false,
        }
    }
}

impl Vad for WebRtcVad {
    fn is_voice(&mut self, frame: &[i16]) -> bool {
        // The crate indexes frame[0]: never hand it an empty or odd-sized frame.
        self.last =
            frame.len() == self.frame_len && self.inner.is_voice_segment(frame).unwrap_or(false);
        self.last
    }

    /// webrtc-vad gives no score: only a voice may be one starting.
    fn maybe_voice(&self) -> bool {
        self.last
    }
}

/// earshot wrapper: re-chunks 20 ms frames into 256-sample windows at 16 kHz.
pub struct EarshotVad {
    detector: Box<earshot::Detector<earshot::DefaultPredictor>>,
    up: Option<StreamResampler>,
    pending: Vec<i16>,
    scratch: Vec<i16>,
    threshold: f32,
    onset_threshold: f32,
    last_score: f32,
}

impl EarshotVad {
    /// `threshold`: the score of a voice; `onset_threshold`: of one that may be starting.
    pub fn new(rate: u32, threshold: f32, onset_threshold: f32) -> Self {
        Self {
            detector: earshot::Detector::default_boxed(),
            up: if rate == 16_000 {
                None
            } else {
                StreamResampler::new(rate, 16_000).ok()
            },
            pending: Vec::with_capacity(640),
            scratch: Vec::with_capacity(640),
            threshold,
            onset_threshold: onset_threshold.min(threshold),
            last_score: 0.0,
        }
    }
}

impl Vad for EarshotVad {
    fn is_voice(&mut self, frame: &[i16]) -> bool {
        match self.up.as_mut() {
            Some(r) => {
                self.scratch.clear();
                if r.process(frame, &mut self.scratch).is_err() {
                    self.last_score = 0.0;
                    return false;
                }
                self.pending.extend_from_slice(&self.scratch);
            }
            None => self.pending.extend_from_slice(frame),
        }
        let mut best: Option<f32> = None;
        while self.pending.len() >= 256 {
            let s = self.detector.predict_i16(&self.pending[..256]);
            self.pending.drain(..256);
            best = Some(best.map_or(s, |b: f32| b.max(s)));
        }
        if let Some(b) = best {
            self.last_score = b;
        }
        self.last_score >= self.threshold
    }

    fn maybe_voice(&self) -> bool {
        self.last_score >= self.onset_threshold
    }
}

/// A voice may be starting only this far (dB) above the quietest frame of the last second.
const ONSET_RISE_DB: f32 = 15.0;
/// Frames in that second.
const FLOOR_FRAMES: usize = 50;

/// Adds a level gate in front of a detector: quiet frames are never voice, and a voice may be
/// starting only where the level rose well above the line's floor (steady noise never does).
pub struct GatedVad {
    inner: Box<dyn Vad>,
    min_dbfs: f32,
    /// Levels (dBFS) of the last second's frames, a ring (unknown ones infinite: the call's
    /// first frame is never an onset).
    levels: [f32; FLOOR_FRAMES],
    next: usize,
    maybe: bool,
}

impl GatedVad {
    pub fn new(inner: Box<dyn Vad>, min_dbfs: f32) -> Self {
        Self {
            inner,
            min_dbfs,
            levels: [f32::INFINITY; FLOOR_FRAMES],
            next: 0,
            maybe: false,
        }
    }
}

impl Vad for GatedVad {
    fn is_voice(&mut self, frame: &[i16]) -> bool {
        // Always run the detector so its adaptive state follows the audio.
        let v = self.inner.is_voice(frame);
        let level = rms_dbfs(frame);
        let floor = self.levels.iter().copied().fold(f32::INFINITY, f32::min);
        self.levels[self.next] = level;
        self.next = (self.next + 1) % FLOOR_FRAMES;
        let loud = level >= self.min_dbfs;
        self.maybe = loud && self.inner.maybe_voice() && level >= floor + ONSET_RISE_DB;
        v && loud
    }

    fn maybe_voice(&self) -> bool {
        self.maybe
    }
}

/// The detector the config asks for, at the call's rate.
pub fn from_config(cfg: &VadConfig, rate: u32) -> Box<dyn Vad> {
    let inner: Box<dyn Vad> = match cfg.engine.as_str() {
        "earshot" => Box::new(EarshotVad::new(
            rate,
            cfg.earshot_threshold,
            cfg.earshot_onset_threshold,
        )),
        _ => Box::new(WebRtcVad::new(rate, cfg.webrtc_mode)),
    };
    Box::new(GatedVad::new(inner, cfg.min_level_dbfs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, ms: u32) -> Vec<i16> {
        // A vowel-like harmonic buzz (150 Hz fundamental) is voice to both detectors.
        let n = (rate * ms / 1000) as usize;
        (0..n)
            .map(|i| {
                let t = i as f32 / rate as f32;
                let mut v = 0.0;
                for h in 1..15 {
                    v += (2.0 * std::f32::consts::PI * 150.0 * h as f32 * t).sin() / h as f32;
                }
                (v * 5000.0) as i16
            })
            .collect()
    }

    #[test]
    fn silence_is_never_voice_and_bad_frames_do_not_panic() {
        for engine in ["webrtc", "earshot"] {
            let cfg = VadConfig {
                engine: engine.into(),
                ..VadConfig::default()
            };
            for rate in [8_000, 16_000] {
                let mut v = from_config(&cfg, rate);
                for _ in 0..50 {
                    assert!(!v.is_voice(&vec![0; (rate / 50) as usize]));
                }
                assert!(!v.is_voice(&[]));
                assert!(!v.is_voice(&[1, 2, 3]));
            }
        }
    }

    #[test]
    fn webrtc_hears_a_buzz() {
        let cfg = VadConfig::default();
        let mut v = from_config(&cfg, 16_000);
        let audio = tone(16_000, 1000);
        let voiced = audio.chunks(320).filter(|f| v.is_voice(f)).count();
        assert!(voiced > 25, "only {voiced} of 50 frames voiced");
    }

    /// A detector whose every frame scores as a voice starting (but is never a voice).
    struct Starting;
    impl Vad for Starting {
        fn is_voice(&mut self, _: &[i16]) -> bool {
            false
        }
        fn maybe_voice(&self) -> bool {
            true
        }
    }

    fn at_db(db: f32) -> Vec<i16> {
        let amp = 32768.0 * 10f32.powf(db / 20.0) * std::f32::consts::SQRT_2;
        (0..320)
            .map(|i| (amp * (i as f32 * 0.3).sin()) as i16)
            .collect()
    }

    #[test]
    fn a_voice_may_start_only_well_above_the_lines_floor() {
        let mut v = GatedVad::new(Box::new(Starting), -50.0);
        let onsets = |v: &mut GatedVad, db: f32, frames: usize| {
            let f = at_db(db);
            (0..frames)
                .filter(|_| {
                    v.is_voice(&f);
                    v.maybe_voice()
                })
                .count()
        };
        // The call's first frame: the floor is not known yet. A steady sound never rises.
        assert_eq!(onsets(&mut v, -30.0, 1), 0);
        assert_eq!(onsets(&mut v, -30.0, 49), 0);
        // Quiet, then 20 dB louder: a voice may be starting, for as long as the floor is the
        // quiet second; once the loud sound has lasted a second it is the floor.
        assert_eq!(onsets(&mut v, -50.0, 50), 0);
        assert_eq!(onsets(&mut v, -30.0, 50), 50);
        assert_eq!(onsets(&mut v, -30.0, 50), 0);
        // 10 dB over the floor is not enough; a rise that stays under min_level_dbfs never is.
        assert_eq!(onsets(&mut v, -20.0, 5), 0);
        let mut quiet = GatedVad::new(Box::new(Starting), -50.0);
        onsets(&mut quiet, -90.0, 1);
        assert_eq!(onsets(&mut quiet, -55.0, 5), 0);
        assert_eq!(onsets(&mut quiet, -45.0, 5), 5);
    }
}
