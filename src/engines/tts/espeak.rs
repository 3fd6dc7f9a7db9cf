//! espeak-ng as a subprocess (`--stdout`), offline and fast: the default voice of sidecall.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;

use super::{Tts, TtsError, TtsStream, ready_stream};
use crate::audio::{l16, wav};
use crate::config::TtsConfig;

/// espeak-ng settings.
pub struct Espeak {
    bin: String,
    voice: String,
    rate: u32,
    pitch: u32,
    timeout: Duration,
}

impl Espeak {
    pub fn new(cfg: &TtsConfig) -> Self {
        Self {
            bin: cfg.espeak_bin.clone(),
            voice: cfg.voice.clone(),
            rate: cfg.rate,
            pitch: cfg.pitch,
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// Runs espeak-ng and returns mono samples at `rate`.
    pub async fn render(&self, text: &str, rate: u32) -> Result<Vec<i16>, TtsError> {
        let mut child = tokio::process::Command::new(&self.bin)
            .arg("--stdout")
            .args([
                "-v",
                &self.voice,
                "-s",
                &self.rate.to_string(),
                "-p",
                &self.pitch.to_string(),
            ])
            .arg("--")
            .arg(text)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TtsError::Engine(format!("cannot run {}: {e}", self.bin)))?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| TtsError::Engine("no stdout".into()))?;
        let mut bytes = Vec::new();
        let run = async {
            stdout
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| TtsError::Engine(e.to_string()))?;
            child
                .wait()
                .await
                .map_err(|e| TtsError::Engine(e.to_string()))
        };
        let status = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| TtsError::Timeout(self.timeout.as_millis() as u64))??;
        if !status.success() {
            return Err(TtsError::Engine(format!(
                "{} exited with {status}",
                self.bin
            )));
        }
        let header = wav::stream_header(&bytes)
            .map_err(|e| TtsError::BadAudio(e.to_string()))?
            .ok_or_else(|| TtsError::BadAudio("espeak-ng produced no audio".into()))?;
        let samples = l16::decode_le(&bytes[header.data_offset..]);
        // Stereo never happens with espeak-ng; mix down anyway to be safe.
        let mono: Vec<i16> = if header.channels > 1 {
            samples
                .chunks(header.channels as usize)
                .map(|c| (c.iter().map(|&s| s as i32).sum::<i32>() / c.len() as i32) as i16)
                .collect()
        } else {
            samples
        };
        let clip = wav::Clip {
            rate: header.rate,
            samples: mono,
        };
        // Resampling a prompt is a few ms of CPU: keep it off the async workers.
        tokio::task::spawn_blocking(move || wav::convert_rate(clip, rate))
            .await
            .map_err(|e| TtsError::Engine(e.to_string()))?
            .map_err(|e| TtsError::BadAudio(e.to_string()))
    }
}

#[async_trait]
impl Tts for Espeak {
    async fn synthesize(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError> {
        Ok(ready_stream(self.render(text, rate).await?))
    }
}
