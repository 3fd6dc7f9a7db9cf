//! Audio primitives shared by every part of a call: 20 ms frames at one internal rate, the
//! telephony codecs (G.711, L16), stateful resampling and WAV files.

pub mod g711;
pub mod l16;
pub mod mel;
pub mod resample;
pub mod wav;

pub use resample::StreamResampler;

/// Every frame inside sidecall lasts this long.
pub const FRAME_MS: u32 = 20;

/// Sample rates sidecall resamples between.
pub const SUPPORTED_RATES: [u32; 4] = [8_000, 16_000, 24_000, 48_000];

/// Number of mono samples in one 20 ms frame at `rate`.
pub fn samples_per_frame(rate: u32) -> usize {
    (rate / 1000 * FRAME_MS) as usize
}

/// Errors from the audio layer.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("unsupported sample rate {0} Hz (supported: 8000, 16000, 24000, 48000)")]
    UnsupportedRate(u32),
    #[error("resampler: {0}")]
    Resampler(String),
    #[error("WAV file {path}: {message}")]
    Wav { path: String, message: String },
    #[error("WAV data: {0}")]
    WavData(String),
}

/// Root-mean-square level of `samples` in dBFS (-100 for digital silence).
pub fn rms_dbfs(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return -100.0;
    }
    let sum: f64 = samples.iter().map(|&s| (s as f64) * (s as f64)).sum();
    let rms = (sum / samples.len() as f64).sqrt();
    if rms < 1.0 {
        return -100.0;
    }
    (20.0 * (rms / 32768.0).log10()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_sizes() {
        assert_eq!(samples_per_frame(8_000), 160);
        assert_eq!(samples_per_frame(16_000), 320);
        assert_eq!(samples_per_frame(48_000), 960);
    }

    #[test]
    fn levels() {
        assert_eq!(rms_dbfs(&[0; 160]), -100.0);
        let full: Vec<i16> = (0..160)
            .map(|i| if i % 2 == 0 { 32767 } else { -32767 })
            .collect();
        assert!(rms_dbfs(&full) > -0.1);
    }
}
