//! Speech recognition: an utterance's audio in, its transcript out. The first implementation
//! speaks the OpenAI-compatible `POST /v1/audio/transcriptions` API (OpenAI, Groq, whisper.cpp
//! server, faster-whisper servers, and sidecall's own `scripts/asr-server`).

pub mod realtime;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    #[error("ASR engine failed: {0}")]
    Engine(String),
}

/// A transcript and where its time went: waiting for the engine (sidecall's queue, and the
/// server's own when it says how long it worked) and the engine working.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcript {
    pub text: String,
    pub queue_ms: u64,
    pub process_ms: u64,
    /// From the streaming recognizer (else the batch engine).
    pub streamed: bool,
    /// Why the streaming recognizer did not transcribe it, when it was asked to.
    pub fallback: Option<String>,
}

/// How busy a shared engine is, for `/health` and metrics.
#[derive(Debug, Default)]
pub struct EngineLoad {
    /// Requests allowed at once.
    pub max_concurrent: usize,
    pub in_flight: AtomicUsize,
    /// Requests waiting for a slot right now.
    pub waiting: AtomicUsize,
    /// The last request's wait for a slot (ms).
    pub last_queue_ms: AtomicU64,
    /// When that was (ms since the process's first request).
    pub last_queue_at_ms: AtomicU64,
}

/// How long a long wait keeps an engine reported as saturated.
const SATURATION_MEMORY_MS: u64 = 10_000;

fn process_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ms_since(*START.get_or_init(Instant::now))
}

impl EngineLoad {
    /// Requests are waiting, or one waited long in the last ten seconds: callers feel the
    /// engine's queue.
    pub fn saturated(&self) -> bool {
        let recent = process_ms().saturating_sub(self.last_queue_at_ms.load(Ordering::Relaxed))
            < SATURATION_MEMORY_MS;
        self.waiting.load(Ordering::Relaxed) > 0
            || (recent && self.last_queue_ms.load(Ordering::Relaxed) > 250)
    }

    /// No spare slot for work that may be wasted: requests wait, or one more would take the
    /// last free slot (kept for a caller whose turn has ended).
    pub fn busy(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
            || self.in_flight.load(Ordering::Relaxed).saturating_add(1) >= self.max_concurrent
    }

    fn queued(&self, ms: u64) {
        self.last_queue_ms.store(ms, Ordering::Relaxed);
        self.last_queue_at_ms.store(process_ms(), Ordering::Relaxed);
    }
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
    ) -> Result<Transcript, AsrError>;

    /// How busy the engine is, where it knows.
    fn load(&self) -> Option<Arc<EngineLoad>> {
        None
    }

    /// A stream of one call's utterances at `rate`, for an engine that transcribes while the
    /// caller speaks (`None`: batch only).
    fn stream(&self, _rate: u32) -> Option<Box<dyn realtime::AsrStream>> {
        None
    }
}

/// Header sidecall's own ASR server (and any that cares to) sets: ms spent transcribing,
/// so the rest of the round trip counts as the server's queue.
pub const PROCESSING_HEADER: &str = "x-asr-processing-ms";

/// OpenAI-compatible transcription client.
pub struct OpenAiAsr {
    client: reqwest::Client,
    url: String,
    model: String,
    language: String,
    timeout: Duration,
    retries: u32,
    api_key: Option<crate::config::Secret>,
    slots: Arc<tokio::sync::Semaphore>,
    load: Arc<EngineLoad>,
}

impl OpenAiAsr {
    pub fn new(cfg: &AsrConfig, client: reqwest::Client) -> Self {
        let max = cfg.max_concurrent.max(1);
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(max)),
            load: Arc::new(EngineLoad {
                max_concurrent: max,
                ..EngineLoad::default()
            }),
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
    ) -> Result<(String, Option<u64>), AsrError> {
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
            req = req.bearer_auth(k.expose());
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
        let processing = resp
            .headers()
            .get(PROCESSING_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| processing_ms(v.trim()));
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
            .map(|t| (t.trim().to_string(), processing))
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
    ) -> Result<Transcript, AsrError> {
        let bytes = wav::to_bytes(rate, audio).map_err(|e| AsrError::BadResponse(e.to_string()))?;
        let started = Instant::now();
        let deadline = started + self.timeout;
        let budget_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        // Wait for a slot: the time spent here is the engine's queue, seen from sidecall.
        // Counted while waiting, also if this request is dropped meanwhile (the call ended).
        let waiting = Counted::new(&self.load.waiting);
        let permit =
            tokio::time::timeout_at(deadline.into(), self.slots.clone().acquire_owned()).await;
        drop(waiting);
        let Ok(Ok(_permit)) = permit else {
            return Err(AsrError::Timeout(budget_ms));
        };
        let queued = ms_since(started);
        self.load.queued(queued);
        let _in_flight = Counted::new(&self.load.in_flight);
        let mut last = None;
        for attempt in 0..=self.retries {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let sent = Instant::now();
            match self.once(bytes.clone(), hint, left).await {
                Ok((text, processing)) => {
                    let round_trip = ms_since(sent);
                    // With the server's own figure, the rest of the round trip was its queue.
                    let (server_queue, process) = match processing {
                        Some(p) if p <= round_trip => (round_trip - p, p),
                        _ => (0, round_trip),
                    };
                    // Queue: the wait for a slot here and in the server; time lost on failed
                    // attempts before a retry is neither.
                    return Ok(Transcript {
                        text,
                        queue_ms: queued.saturating_add(server_queue),
                        process_ms: process,
                        ..Transcript::default()
                    });
                }
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
        Err(last.unwrap_or(AsrError::Timeout(budget_ms)))
    }

    fn load(&self) -> Option<Arc<EngineLoad>> {
        Some(self.load.clone())
    }
}

fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Counts one request in a gauge until dropped (also when its future is dropped mid-way).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Counted(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whole milliseconds from the server's processing header ("412" or "412.7"), checked: digits
/// only, below an hour; anything else is ignored.
fn processing_ms(v: &str) -> Option<u64> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let ms = int.parse::<u64>().ok()?;
    let up = frac.bytes().next().is_some_and(|b| b >= b'5');
    ms.checked_add(u64::from(up)).filter(|ms| *ms < 3_600_000)
}

#[cfg(test)]
mod header_tests {
    use super::processing_ms;

    #[test]
    fn the_processing_header_is_read_checked() {
        assert_eq!(processing_ms("412"), Some(412));
        assert_eq!(processing_ms("412.7"), Some(413));
        assert_eq!(processing_ms("412.2"), Some(412));
        for bad in [
            "",
            "-5",
            "1e9",
            "NaN",
            "inf",
            "99999999999999999999999",
            "3600000",
            "4.x",
            " 4",
        ] {
            assert_eq!(processing_ms(bad), None, "{bad}");
        }
    }
}
