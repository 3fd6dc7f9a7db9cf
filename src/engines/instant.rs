//! Instant in-process engines for `sidecall bench`: they answer at once, so the benchmark
//! measures only sidecall's own work (turn detection, resampling, playout, the call loop).

use async_trait::async_trait;

use super::asr::{Asr, AsrError, Transcript};
use super::tts::{Tts, TtsError, TtsStream, ready_stream};

/// Returns a fixed transcript at once.
pub struct InstantAsr(pub String);

#[async_trait]
impl Asr for InstantAsr {
    async fn transcribe(
        &self,
        _audio: &[i16],
        _rate: u32,
        _hint: Option<&str>,
    ) -> Result<Transcript, AsrError> {
        Ok(Transcript {
            text: self.0.clone(),
            ..Transcript::default()
        })
    }
}

/// Returns a 440 Hz tone, 60 ms per word, at once.
pub struct InstantTts;

#[async_trait]
impl Tts for InstantTts {
    async fn synthesize(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError> {
        let words = text.split_whitespace().count().max(1);
        let n = rate as usize * 60 * words / 1000;
        let w = 2.0 * std::f32::consts::PI * 440.0 / rate as f32;
        Ok(ready_stream(
            (0..n)
                .map(|i| ((w * i as f32).sin() * 6000.0) as i16)
                .collect(),
        ))
    }
}
