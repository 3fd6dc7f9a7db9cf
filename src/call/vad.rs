//! Voice activity detection on 20 ms frames: webrtc-vad (the libfvad port of WebRTC's GMM
//! detector) or earshot (a small pure-Rust neural detector, 16 kHz / 16 ms frames only).

use crate::audio::{StreamResampler, rms_dbfs};
use crate::config::VadConfig;

/// Says whether a 20 ms frame holds voice.
pub trait Vad: Send {
    fn is_voice(&mut self, frame: &[i16]) -> bool;
}

/// webrtc-vad wrapper.
pub struct WebRtcVad {
    inner: webrtc_vad::Vad,
    frame_len: usize,
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
        }
    }
}

impl Vad for WebRtcVad {
    fn is_voice(&mut self, frame: &[i16]) -> bool {
        // The crate indexes frame[0]: never hand it an empty or odd-sized frame.
        if frame.len() != self.frame_len {
            return false;
        }
        self.inner.is_voice_segment(frame).unwrap_or(false)
    }
}

/// earshot wrapper: re-chunks 20 ms frames into 256-sample windows at 16 kHz.
pub struct EarshotVad {
    detector: Box<earshot::Detector<earshot::DefaultPredictor>>,
    up: Option<StreamResampler>,
    pending: Vec<i16>,
    scratch: Vec<i16>,
    threshold: f32,
    last_score: f32,
}

impl EarshotVad {
    pub fn new(rate: u32, threshold: f32) -> Self {
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
}

/// Adds a level gate in front of a detector: quiet frames are never voice.
pub struct GatedVad {
    inner: Box<dyn Vad>,
    min_dbfs: f32,
}

impl Vad for GatedVad {
    fn is_voice(&mut self, frame: &[i16]) -> bool {
        // Always run the detector so its adaptive state follows the audio.
        let v = self.inner.is_voice(frame);
        v && rms_dbfs(frame) >= self.min_dbfs
    }
}

/// The detector the config asks for, at the call's rate.
pub fn from_config(cfg: &VadConfig, rate: u32) -> Box<dyn Vad> {
    let inner: Box<dyn Vad> = match cfg.engine.as_str() {
        "earshot" => Box::new(EarshotVad::new(rate, cfg.earshot_threshold)),
        _ => Box::new(WebRtcVad::new(rate, cfg.webrtc_mode)),
    };
    Box::new(GatedVad {
        inner,
        min_dbfs: cfg.min_level_dbfs,
    })
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
}
