//! Speech recognition: an utterance's audio in, its transcript out. The first implementation
//! speaks the OpenAI-compatible `POST /v1/audio/transcriptions` API (OpenAI, Groq, whisper.cpp
//! server, faster-whisper servers, and sidecall's own `scripts/asr-server`).

use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::root_cause;
use crate::audio::wav;
use crate::config::AsrConfig;

/// Why a transcription failed.
#[derive(Debug, thiserror::Error)]
pub enum AsrError {
    #[error("ASR timed out after {0} ms")]
    Timeout(u64),
    #[error("ASR server unreachable at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("ASR server answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("ASR answer unreadable: {0}")]
    BadResponse(String),
}

/// A speech recognizer.
#[async_trait]
pub trait Asr: Send + Sync {
    /// Transcribes mono 16-bit audio at `rate`; `hint` is what the caller is expected to say.
    async fn transcribe(
        &self,
        audio: &[i16],
        rate: u32,
        hint: Option<&str>,
    ) -> Result<String, AsrError>;
}

/// OpenAI-compatible transcription client.
pub struct OpenAiAsr {
    client: reqwest::Client,
    url: String,
    model: String,
    language: String,
    timeout: Duration,
    retries: u32,
    api_key: Option<String>,
}

impl OpenAiAsr {
    pub fn new(cfg: &AsrConfig, client: reqwest::Client) -> Self {
        Self {
            client,
            url: super::endpoint(&cfg.url, "audio/transcriptions"),
            model: cfg.model.clone(),
            language: cfg.language.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
            retries: cfg.retries,
            api_key: cfg.api_key.clone(),
        }
    }

    async fn once(
        &self,
        wav_bytes: Vec<u8>,
        hint: Option<&str>,
        budget: Duration,
    ) -> Result<String, AsrError> {
        let part = reqwest::multipart::Part::bytes(wav_bytes)
            .file_name("utterance.wav")
            .mime_str("audio/wav")
            .map_err(|e| AsrError::BadResponse(e.to_string()))?;
        let mut form = reqwest::multipart::Form::new()
            .part("file", part)
            .text("model", self.model.clone())
            .text("language", self.language.clone())
            .text("response_format", "json");
        if let Some(h) = hint {
            form = form.text("prompt", h.to_string());
        }
        let mut req = self.client.post(&self.url).multipart(form).timeout(budget);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let ms = budget.as_millis() as u64;
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                AsrError::Timeout(ms)
            } else {
                AsrError::Connect {
                    url: self.url.clone(),
                    message: root_cause(&e),
                }
            }
        })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| {
            if e.is_timeout() {
                AsrError::Timeout(ms)
            } else {
                AsrError::BadResponse(e.to_string())
            }
        })?;
        if !status.is_success() {
            let body: String = body.chars().take(200).collect();
            return Err(AsrError::Http {
                status: status.as_u16(),
                body,
            });
        }
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| AsrError::BadResponse(format!("{e}: {body:.100}")))?;
        v.get("text")
            .and_then(|t| t.as_str())
            .map(|t| t.trim().to_string())
            .ok_or_else(|| AsrError::BadResponse(format!("no `text` in {body:.100}")))
    }
}

#[async_trait]
impl Asr for OpenAiAsr {
    async fn transcribe(
        &self,
        audio: &[i16],
        rate: u32,
        hint: Option<&str>,
    ) -> Result<String, AsrError> {
        let bytes = wav::to_bytes(rate, audio);
        let deadline = Instant::now() + self.timeout;
        let mut last = None;
        for attempt in 0..=self.retries {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.once(bytes.clone(), hint, left).await {
                Ok(t) => return Ok(t),
                // Client errors will not get better by retrying.
                Err(
                    e @ AsrError::Http {
                        status: 400..=499, ..
                    },
                ) => return Err(e),
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "ASR request failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(AsrError::Timeout(self.timeout.as_millis() as u64)))
    }
}
