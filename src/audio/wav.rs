//! WAV files with hound: read any rate, sample format and channel count (mixed down to mono,
//! resampled to the rate asked for); write mono 16-bit.

use std::io::{Read, Seek};
use std::path::Path;

use super::AudioError;
use super::resample::resample_clip;

/// Mono 16-bit audio at a known rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    pub rate: u32,
    pub samples: Vec<i16>,
}

impl Clip {
    /// Length in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        self.samples.len() as u64 * 1000 / self.rate as u64
    }
}

fn read_any<R: Read + Seek>(reader: hound::WavReader<R>) -> Result<Clip, String> {
    let spec = reader.spec();
    if spec.channels == 0 {
        return Err("zero channels".into());
    }
    if spec.sample_rate < 1000 || spec.sample_rate > 384_000 {
        return Err(format!("implausible sample rate {}", spec.sample_rate));
    }
    let channels = spec.channels as usize;
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?,
        hound::SampleFormat::Int => {
            let bits = spec.bits_per_sample;
            if bits == 0 || bits > 32 {
                return Err(format!("unsupported bits per sample {bits}"));
            }
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?
        }
    };
    let samples = interleaved
        .chunks(channels)
        .map(|frame| {
            let mean = frame.iter().sum::<f32>() / channels as f32;
            (mean * 32768.0).round().clamp(-32768.0, 32767.0) as i16
        })
        .collect();
    Ok(Clip {
        rate: spec.sample_rate,
        samples,
    })
}

/// Reads a WAV file as mono at its own rate.
pub fn read_file(path: &Path) -> Result<Clip, AudioError> {
    let err = |message: String| AudioError::Wav {
        path: path.display().to_string(),
        message,
    };
    let reader = hound::WavReader::open(path).map_err(|e| err(e.to_string()))?;
    read_any(reader).map_err(err)
}

/// Reads a WAV file as mono, resampled to `rate`.
pub fn read_file_at(path: &Path, rate: u32) -> Result<Vec<i16>, AudioError> {
    let clip = read_file(path)?;
    convert_rate(clip, rate).map_err(|e| AudioError::Wav {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Reads WAV bytes (for example an HTTP response) as mono at their own rate.
pub fn read_bytes(bytes: &[u8]) -> Result<Clip, AudioError> {
    let reader = hound::WavReader::new(std::io::Cursor::new(bytes))
        .map_err(|e| AudioError::WavData(e.to_string()))?;
    read_any(reader).map_err(AudioError::WavData)
}

/// Resamples a clip to `rate` (a no-op when it is already there).
pub fn convert_rate(clip: Clip, rate: u32) -> Result<Vec<i16>, AudioError> {
    if clip.rate == rate {
        return Ok(clip.samples);
    }
    if clip.rate.is_multiple_of(50) {
        return resample_clip(&clip.samples, clip.rate, rate);
    }
    // Rates like 22050 or 11025 (espeak-ng): go through rubato with a rate rounded to 50 Hz would
    // shift pitch, so use the nearest exact pair rubato accepts: it handles any integer rates.
    resample_any(&clip.samples, clip.rate, rate)
}

fn resample_any(samples: &[i16], from: u32, to: u32) -> Result<Vec<i16>, AudioError> {
    use rubato::audioadapter_buffers::direct::InterleavedSlice;
    use rubato::{Fft, FixedSync, Resampler};
    let input: Vec<f32> = samples.iter().map(|&s| s as f32 / 32768.0).collect();
    let mut r = Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Input)
        .map_err(|e| AudioError::Resampler(e.to_string()))?;
    let need = r.process_all_needed_output_len(input.len());
    let mut out = vec![0.0f32; need];
    let buf_in = InterleavedSlice::new(&input[..], 1, input.len())
        .map_err(|e| AudioError::Resampler(e.to_string()))?;
    let mut buf_out = InterleavedSlice::new_mut(&mut out[..], 1, need)
        .map_err(|e| AudioError::Resampler(e.to_string()))?;
    let (_, written) = r
        .process_all_into_buffer(&buf_in, &mut buf_out, input.len(), None)
        .map_err(|e| AudioError::Resampler(e.to_string()))?;
    Ok(out[..written]
        .iter()
        .map(|&v| (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16)
        .collect())
}

fn mono16(rate: u32) -> hound::WavSpec {
    hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    }
}

fn write_all<W: std::io::Write + std::io::Seek>(
    w: W,
    rate: u32,
    samples: &[i16],
) -> Result<(), hound::Error> {
    let mut w = hound::WavWriter::new(w, mono16(rate))?;
    let mut s16 = w.get_i16_writer(u32::try_from(samples.len()).unwrap_or(u32::MAX));
    for &s in samples {
        s16.write_sample(s);
    }
    s16.flush()?;
    w.finalize()
}

/// Writes mono 16-bit samples to a WAV file.
pub fn write_file(path: &Path, rate: u32, samples: &[i16]) -> Result<(), AudioError> {
    let err = |e: hound::Error| AudioError::Wav {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| err(e.into()))?);
    write_all(f, rate, samples).map_err(err)
}

/// Encodes mono 16-bit samples as WAV bytes (for multipart uploads).
pub fn to_bytes(rate: u32, samples: &[i16]) -> Result<Vec<u8>, AudioError> {
    let mut out = std::io::Cursor::new(Vec::with_capacity(44 + samples.len() * 2));
    write_all(&mut out, rate, samples).map_err(|e| AudioError::WavData(e.to_string()))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stereo_float_file_reads_as_mono_at_asked_rate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 48_000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        for _ in 0..48_000 {
            w.write_sample(0.5f32).unwrap();
            w.write_sample(0.0f32).unwrap();
        }
        w.finalize().unwrap();
        let mono = read_file_at(&path, 16_000).unwrap();
        assert!((mono.len() as i64 - 16_000).abs() <= 2);
        // (0.5 + 0) / 2 = 0.25 of full scale in the middle of the clip.
        assert!((mono[8_000] as i32 - 8192).abs() < 200, "{}", mono[8_000]);
    }

    #[test]
    fn espeak_rate_22050_converts() {
        let samples: Vec<i16> = (0..22_050)
            .map(|i| ((i as f32 * 0.05).sin() * 8000.0) as i16)
            .collect();
        let out = convert_rate(
            Clip {
                rate: 22_050,
                samples,
            },
            16_000,
        )
        .unwrap();
        assert!((out.len() as i64 - 16_000).abs() < 40, "{}", out.len());
    }

    #[test]
    fn bytes_round_trip_and_bad_input() {
        let bytes = to_bytes(8_000, &[1, -2, 3]).unwrap();
        let clip = read_bytes(&bytes).unwrap();
        assert_eq!(
            clip,
            Clip {
                rate: 8_000,
                samples: vec![1, -2, 3]
            }
        );
        assert!(read_bytes(b"").is_err());
        assert!(read_bytes(b"RIFF\x00\x00garbage").is_err());
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.wav");
        std::fs::write(&empty, b"").unwrap();
        let e = read_file(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.wav"), "{e}");
    }
}

/// Where the samples of a streamed WAV start, and their format, read from the header alone.
/// Streamed WAVs (espeak-ng --stdout, HTTP bodies) carry placeholder lengths, so the chunk
/// sizes of RIFF and data are not trusted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamHeader {
    pub rate: u32,
    pub channels: u16,
    pub bits: u16,
    pub data_offset: usize,
}

/// Parses a WAV header from the first bytes of a stream; `Ok(None)` means "need more bytes".
pub fn stream_header(bytes: &[u8]) -> Result<Option<StreamHeader>, AudioError> {
    if bytes.len() < 12 {
        return Ok(None);
    }
    if &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(AudioError::WavData("not a RIFF/WAVE stream".into()));
    }
    let mut pos = 12;
    let mut fmt: Option<(u16, u32, u16, u16)> = None;
    loop {
        if bytes.len() < pos + 8 {
            return Ok(None);
        }
        let id = &bytes[pos..pos + 4];
        let size = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        if id == b"data" {
            let Some((format, rate, channels, bits)) = fmt else {
                return Err(AudioError::WavData("data chunk before fmt chunk".into()));
            };
            if format != 1 || bits != 16 || channels == 0 || rate == 0 {
                return Err(AudioError::WavData(format!(
                    "only 16-bit PCM streams are supported (format {format}, {bits} bits, {channels} channels)"
                )));
            }
            return Ok(Some(StreamHeader {
                rate,
                channels,
                bits,
                data_offset: pos + 8,
            }));
        }
        if size > 1 << 20 {
            return Err(AudioError::WavData(format!(
                "implausible chunk size {size}"
            )));
        }
        if bytes.len() < pos + 8 + size {
            return Ok(None);
        }
        if id == b"fmt " && size >= 16 {
            let b = &bytes[pos + 8..];
            fmt = Some((
                u16::from_le_bytes([b[0], b[1]]),
                u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                u16::from_le_bytes([b[2], b[3]]),
                u16::from_le_bytes([b[14], b[15]]),
            ));
        }
        pos += 8 + size + (size & 1);
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    #[test]
    fn streamed_header_with_placeholder_sizes() {
        let mut b = to_bytes(22_050, &[5, 6]).unwrap();
        b[4..8].copy_from_slice(&0x7fff_f024u32.to_le_bytes());
        b[40..44].copy_from_slice(&0x7fff_f000u32.to_le_bytes());
        let h = stream_header(&b).unwrap().unwrap();
        assert_eq!(
            h,
            StreamHeader {
                rate: 22_050,
                channels: 1,
                bits: 16,
                data_offset: 44
            }
        );
        assert_eq!(stream_header(&b[..20]).unwrap(), None);
        assert!(stream_header(b"RIFX....WAVE").is_err());
    }
}
