//! Whisper-style log-mel features (80 Slaney mel bands, 25 ms Hann windows every 10 ms, 16 kHz)
//! over a fixed 8 s window: the input of the Smart Turn end-of-turn model. Mirrors
//! `transformers.WhisperFeatureExtractor(chunk_length=8)` with `do_normalize=True`, the
//! preprocessing the model was trained with, so its scores match the reference.
//! Written here (about 100 lines over realfft) because no maintained crate computes exactly
//! these features: mel crates differ in window, scale and normalisation.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex, num_complex::Complex};

/// The model's sample rate.
pub const RATE: u32 = 16_000;
/// Samples in the 8 s window.
pub const WINDOW_SAMPLES: usize = 8 * RATE as usize;
/// Mel bands.
pub const N_MELS: usize = 80;
/// Feature frames (10 ms each) in the window.
pub const N_FRAMES: usize = WINDOW_SAMPLES / HOP;

const N_FFT: usize = 400;
const HOP: usize = 160;
const BINS: usize = N_FFT / 2 + 1;
const MEL_FLOOR: f64 = 1e-10;

/// The feature extractor with its FFT plan, window and filterbank (build once, reuse).
pub struct WhisperMel {
    fft: Arc<dyn RealToComplex<f64>>,
    window: Vec<f64>,
    /// Per band: its first bin and the weights from there (each band spans a few bins only).
    filters: Vec<(usize, Vec<f64>)>,
    frame: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
    /// The normalised window and the log-mel values, kept between calls: no allocation, and
    /// the same (warm) memory every time.
    x: Vec<f64>,
    logmel: Vec<f64>,
}

impl Default for WhisperMel {
    fn default() -> Self {
        Self::new()
    }
}

impl WhisperMel {
    pub fn new() -> Self {
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT);
        // Periodic Hann (torch.hann_window).
        let window = (0..N_FFT)
            .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
            .collect();
        let spectrum = fft.make_output_vec();
        let scratch = fft.make_scratch_vec();
        Self {
            fft,
            window,
            filters: slaney_filterbank(),
            frame: vec![0.0; N_FFT],
            spectrum,
            scratch,
            x: vec![0.0; WINDOW_SAMPLES],
            logmel: vec![0.0; N_MELS * N_FRAMES],
        }
    }

    /// Features of `audio` (16 kHz, at most 8 s: the last 8 s are taken, shorter audio is
    /// preceded by silence, as the model was trained): `N_MELS * N_FRAMES` values, band-major.
    pub fn features(&mut self, audio: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; N_MELS * N_FRAMES];
        self.features_into(audio, &mut out);
        out
    }

    /// `features` written into `out` (`N_MELS * N_FRAMES` values; a shorter `out` gets the
    /// first ones, a longer one keeps the rest as it was).
    pub fn features_into(&mut self, audio: &[f32], out: &mut [f32]) {
        let tail = &audio[audio.len().saturating_sub(WINDOW_SAMPLES)..];
        let lead = WINDOW_SAMPLES - tail.len();
        let x = &mut self.x;
        x[..lead].fill(0.0);
        x[lead..]
            .iter_mut()
            .zip(tail)
            .for_each(|(d, &s)| *d = f64::from(s));
        // Zero mean, unit variance over the whole window (padding included).
        let n = WINDOW_SAMPLES as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        let scale = 1.0 / (var + 1e-7).sqrt();
        x.iter_mut().for_each(|v| *v = (*v - mean) * scale);

        let logmel = &mut self.logmel;
        let mut power = [0.0f64; BINS];
        let pad = N_FFT / 2;
        // Frames that lie wholly in the silence before a short utterance are all alike:
        // computed once, copied (a one-second answer needs ~110 of the 800 frames).
        let alike = |t: usize| lead >= pad && t * HOP + pad <= lead;
        for t in 0..N_FRAMES {
            if t > 0 && alike(t) {
                for m in 0..N_MELS {
                    logmel[m * N_FRAMES + t] = logmel[m * N_FRAMES];
                }
                continue;
            }
            // Centered frames over a reflect-padded signal (numpy's "reflect": the edge
            // sample is not repeated).
            for (k, slot) in self.frame.iter_mut().enumerate() {
                *slot = x[reflect(t * HOP + k, pad, WINDOW_SAMPLES)] * self.window[k];
            }
            if self
                .fft
                .process_with_scratch(&mut self.frame, &mut self.spectrum, &mut self.scratch)
                .is_err()
            {
                // Only wrong buffer sizes fail, and these are fixed at construction.
                for m in 0..N_MELS {
                    logmel[m * N_FRAMES + t] = MEL_FLOOR.log10();
                }
                continue;
            }
            for (p, c) in power.iter_mut().zip(&self.spectrum) {
                *p = c.norm_sqr();
            }
            for (m, (first, weights)) in self.filters.iter().enumerate() {
                let e: f64 = weights
                    .iter()
                    .zip(&power[*first..])
                    .map(|(a, b)| a * b)
                    .sum();
                logmel[m * N_FRAMES + t] = e.max(MEL_FLOOR).log10();
            }
        }
        let max = logmel.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        for (o, &v) in out.iter_mut().zip(logmel.iter()) {
            *o = ((v.max(max - 8.0) + 4.0) / 4.0) as f32;
        }
    }
}

/// Index into the signal for position `i` of the padded signal (`pad` on each side).
fn reflect(i: usize, pad: usize, len: usize) -> usize {
    if i < pad {
        pad - i
    } else if i - pad >= len {
        // len - 2 - (i - pad - len)
        (2 * len).saturating_sub(i - pad + 2)
    } else {
        i - pad
    }
}

fn hz_to_mel(f: f64) -> f64 {
    if f < 1000.0 {
        3.0 * f / 200.0
    } else {
        15.0 + (f / 1000.0).ln() * 27.0 / 6.4f64.ln()
    }
}

fn mel_to_hz(m: f64) -> f64 {
    if m < 15.0 {
        200.0 * m / 3.0
    } else {
        1000.0 * ((m - 15.0) * 6.4f64.ln() / 27.0).exp()
    }
}

/// Slaney-normalised triangular filters from 0 Hz to 8 kHz, each as its non-zero span.
fn slaney_filterbank() -> Vec<(usize, Vec<f64>)> {
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(f64::from(RATE) / 2.0));
    let edges: Vec<f64> = (0..N_MELS + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (N_MELS + 1) as f64))
        .collect();
    (0..N_MELS)
        .map(|m| {
            let norm = 2.0 / (edges[m + 2] - edges[m]);
            let full: Vec<f64> = (0..BINS)
                .map(|bin| {
                    let f = f64::from(RATE) / 2.0 * bin as f64 / (BINS - 1) as f64;
                    let down = (f - edges[m]) / (edges[m + 1] - edges[m]);
                    let up = (edges[m + 2] - f) / (edges[m + 2] - edges[m + 1]);
                    down.min(up).max(0.0) * norm
                })
                .collect();
            let first = full.iter().position(|&w| w > 0.0).unwrap_or(0);
            let last = full.iter().rposition(|&w| w > 0.0).unwrap_or(first);
            (first, full[first..=last].to_vec())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_padding_matches_numpy() {
        // np.pad([0,1,2,3,4], 2, mode="reflect") == [2,1,0,1,2,3,4,3,2]
        let got: Vec<usize> = (0..9).map(|i| reflect(i, 2, 5)).collect();
        assert_eq!(got, vec![2, 1, 0, 1, 2, 3, 4, 3, 2]);
    }

    #[test]
    fn the_silence_before_a_short_utterance_is_computed_once_and_is_the_same() {
        // The same audio, once as is and once with the silence before it spelled out: the
        // shortcut for the leading silence must not change a value.
        let voice: Vec<f32> = (0..12_000)
            .map(|i| ((i as f32 * 0.07).sin() * (i as f32 * 0.0013).sin()) * 0.4)
            .collect();
        let mut padded = vec![0.0f32; WINDOW_SAMPLES - voice.len()];
        // (a full window: no leading silence to skip)
        padded.extend_from_slice(&voice);
        let mut mel = WhisperMel::new();
        let short = mel.features(&voice);
        // The whole 8 s given: every frame computed one by one.
        let full = mel.features(&padded);
        let worst = short
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{worst}");
    }

    #[test]
    fn a_tone_lights_its_band_and_silence_is_flat() {
        let mut mel = WhisperMel::new();
        let tone: Vec<f32> = (0..RATE as usize)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / RATE as f32).sin() * 0.3)
            .collect();
        let f = mel.features(&tone);
        assert_eq!(f.len(), N_MELS * N_FRAMES);
        // The last second holds the tone: its loudest band is the one around 1 kHz.
        let t = N_FRAMES - 50;
        let loudest = (0..N_MELS)
            .max_by(|&a, &b| f[a * N_FRAMES + t].total_cmp(&f[b * N_FRAMES + t]))
            .unwrap_or(0);
        let centre = mel_to_hz(hz_to_mel(0.0) + (hz_to_mel(8000.0)) * (loudest + 1) as f64 / 81.0);
        assert!(
            (800.0..1250.0).contains(&centre),
            "band {loudest} at {centre} Hz"
        );
        // The silent first seconds sit at the floor, 8 decades (2.0 after scaling) below.
        let peak = f.iter().copied().fold(f32::MIN, f32::max);
        assert!((peak - f[10 * N_FRAMES + 100] - 2.0).abs() < 1e-3);
        // Silence in, no NaN out.
        assert!(mel.features(&[]).iter().all(|v| v.is_finite()));
    }
}
