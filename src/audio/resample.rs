//! Stateful resampling of one mono stream with rubato's FFT resampler. One `StreamResampler`
//! lives as long as its stream, so filter state carries across 20 ms frames (never per chunk).

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler};

use super::AudioError;

/// Resamples a stream of i16 samples from one rate to another, any chunk size in.
pub struct StreamResampler {
    from: u32,
    to: u32,
    inner: Option<Fft<f32>>,
    chunk_in: usize,
    pending: Vec<f32>,
    scratch_out: Vec<f32>,
    skip: usize,
    total_in: u64,
    total_out: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler")
            .field("from", &self.from)
            .field("to", &self.to)
            .finish()
    }
}

impl StreamResampler {
    /// A resampler from `from` Hz to `to` Hz; the identity when they are equal.
    pub fn new(from: u32, to: u32) -> Result<Self, AudioError> {
        for rate in [from, to] {
            if !(8_000..=192_000).contains(&rate) || rate % 50 != 0 {
                return Err(AudioError::UnsupportedRate(rate));
            }
        }
        let chunk_in = (from / 50) as usize;
        if from == to {
            return Ok(Self {
                from,
                to,
                inner: None,
                chunk_in,
                pending: Vec::new(),
                scratch_out: Vec::new(),
                skip: 0,
                total_in: 0,
                total_out: 0,
            });
        }
        let inner = Fft::<f32>::new(from as usize, to as usize, chunk_in, 1, FixedSync::Input)
            .map_err(|e| AudioError::Resampler(e.to_string()))?;
        let skip = inner.output_delay();
        let out_max = inner.output_frames_max();
        Ok(Self {
            from,
            to,
            inner: Some(inner),
            chunk_in,
            pending: Vec::with_capacity(chunk_in * 2),
            scratch_out: vec![0.0; out_max],
            skip,
            total_in: 0,
            total_out: 0,
        })
    }

    /// Input rate in Hz.
    pub fn from_rate(&self) -> u32 {
        self.from
    }

    /// Output rate in Hz.
    pub fn to_rate(&self) -> u32 {
        self.to
    }

    /// Feeds `input` and appends every output sample that is ready to `out`.
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) -> Result<(), AudioError> {
        if self.inner.is_none() {
            out.extend_from_slice(input);
            return Ok(());
        }
        self.total_in += input.len() as u64;
        self.pending
            .extend(input.iter().map(|&s| s as f32 / 32768.0));
        while self.pending.len() >= self.chunk_in {
            self.run_chunk(None, out)?;
        }
        Ok(())
    }

    /// Ends the stream: pushes out what is buffered, including the filter's delay, so the total
    /// output length matches the total input length times the rate ratio.
    pub fn flush(&mut self, out: &mut Vec<i16>) -> Result<(), AudioError> {
        if self.inner.is_none() {
            return Ok(());
        }
        let target = (self.total_in as f64 * self.to as f64 / self.from as f64).round() as u64;
        let start_len = out.len();
        let mut guard = 0;
        while self.total_out < target && guard < 64 {
            let partial = self.pending.len().min(self.chunk_in);
            self.run_chunk(Some(partial), out)?;
            guard += 1;
        }
        if self.total_out > target {
            let extra = (self.total_out - target) as usize;
            let keep = out.len().saturating_sub(extra).max(start_len);
            out.truncate(keep);
        }
        if let Some(inner) = self.inner.as_mut() {
            inner.reset();
            self.skip = inner.output_delay();
        }
        self.pending.clear();
        self.total_in = 0;
        self.total_out = 0;
        Ok(())
    }

    fn run_chunk(&mut self, partial: Option<usize>, out: &mut Vec<i16>) -> Result<(), AudioError> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(());
        };
        let take = partial.unwrap_or(self.chunk_in).min(self.pending.len());
        let mut input = vec![0.0f32; self.chunk_in];
        input[..take].copy_from_slice(&self.pending[..take]);
        self.pending.drain(..take);
        let frames_out = inner.output_frames_next();
        if self.scratch_out.len() < frames_out {
            self.scratch_out.resize(frames_out, 0.0);
        }
        let buf_in = InterleavedSlice::new(&input[..], 1, self.chunk_in)
            .map_err(|e| AudioError::Resampler(e.to_string()))?;
        let mut buf_out = InterleavedSlice::new_mut(&mut self.scratch_out[..], 1, frames_out)
            .map_err(|e| AudioError::Resampler(e.to_string()))?;
        let indexing = partial.map(|p| Indexing::new().partial_len(p.min(take)));
        let (_, written) = inner
            .process_into_buffer(&buf_in, &mut buf_out, indexing.as_ref())
            .map_err(|e| AudioError::Resampler(e.to_string()))?;
        let mut start = 0;
        if self.skip > 0 {
            start = self.skip.min(written);
            self.skip -= start;
        }
        self.total_out += (written - start) as u64;
        out.extend(
            self.scratch_out[start..written]
                .iter()
                .map(|&v| (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16),
        );
        Ok(())
    }
}

/// Resamples a whole clip at once (for prompts and files, not for live streams).
pub fn resample_clip(samples: &[i16], from: u32, to: u32) -> Result<Vec<i16>, AudioError> {
    let mut r = StreamResampler::new(from, to)?;
    let mut out = Vec::with_capacity(samples.len() * to as usize / from as usize + 64);
    r.process(samples, &mut out)?;
    r.flush(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, freq: f64, secs: f64, amp: f64) -> Vec<i16> {
        let n = (rate as f64 * secs) as usize;
        (0..n)
            .map(|i| {
                (amp * (2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64).sin()) as i16
            })
            .collect()
    }

    /// SNR of `got` against the ideal sine, fitted for phase and gain by least squares.
    fn snr_db(got: &[i16], rate: u32, freq: f64) -> f64 {
        let w = 2.0 * std::f64::consts::PI * freq / rate as f64;
        let (mut ss, mut sc, mut cc, mut ys, mut yc) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (i, &y) in got.iter().enumerate() {
            let (s, c) = ((w * i as f64).sin(), (w * i as f64).cos());
            let y = y as f64;
            ss += s * s;
            sc += s * c;
            cc += c * c;
            ys += y * s;
            yc += y * c;
        }
        let det = ss * cc - sc * sc;
        let a = (ys * cc - yc * sc) / det;
        let b = (yc * ss - ys * sc) / det;
        let (mut sig, mut noise) = (0.0, 0.0);
        for (i, &y) in got.iter().enumerate() {
            let fit = a * (w * i as f64).sin() + b * (w * i as f64).cos();
            sig += fit * fit;
            noise += (y as f64 - fit).powi(2);
        }
        10.0 * (sig / noise.max(1e-9)).log10()
    }

    #[test]
    fn sine_8k_16k_8k_keeps_40_db_snr() {
        let input = sine(8_000, 1_000.0, 2.0, 16_000.0);
        let mut up = StreamResampler::new(8_000, 16_000).unwrap();
        let mut down = StreamResampler::new(16_000, 8_000).unwrap();
        let (mut mid, mut out) = (Vec::new(), Vec::new());
        // Stream it in 20 ms frames, as a call would.
        for frame in input.chunks(160) {
            let start = mid.len();
            up.process(frame, &mut mid).unwrap();
            let fresh: Vec<i16> = mid[start..].to_vec();
            down.process(&fresh, &mut out).unwrap();
        }
        let start = mid.len();
        up.flush(&mut mid).unwrap();
        let fresh: Vec<i16> = mid[start..].to_vec();
        down.process(&fresh, &mut out).unwrap();
        down.flush(&mut out).unwrap();
        assert!(
            (mid.len() as i64 - 32_000).abs() <= 2,
            "16 kHz length {}",
            mid.len()
        );
        assert!(
            (out.len() as i64 - 16_000).abs() <= 2,
            "8 kHz length {}",
            out.len()
        );
        // Ignore the edges, where the filters ramp.
        let snr = snr_db(&out[800..15_200], 8_000, 1_000.0);
        println!("1 kHz sine 8k->16k->8k: SNR {snr:.1} dB");
        assert!(snr >= 40.0, "SNR {snr:.1} dB");
        let snr_mid = snr_db(&mid[1600..30_400], 16_000, 1_000.0);
        println!("1 kHz sine 8k->16k: SNR {snr_mid:.1} dB");
        assert!(snr_mid >= 40.0);
    }

    #[test]
    fn every_supported_pair_keeps_timing() {
        for &from in &super::super::SUPPORTED_RATES {
            for &to in &super::super::SUPPORTED_RATES {
                let input = sine(from, 440.0, 1.0, 8_000.0);
                let out = resample_clip(&input, from, to).unwrap();
                assert!(
                    (out.len() as i64 - to as i64).abs() <= 2,
                    "{from}->{to}: {} samples",
                    out.len()
                );
                let snr = snr_db(&out[(to / 20) as usize..(to - to / 20) as usize], to, 440.0);
                assert!(snr >= 40.0, "{from}->{to}: SNR {snr:.1}");
            }
        }
    }

    #[test]
    fn rejects_odd_rates() {
        assert!(StreamResampler::new(8_000, 7_999).is_err());
        assert!(StreamResampler::new(0, 8_000).is_err());
    }
}
