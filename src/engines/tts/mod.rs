//! Speech synthesis: text in, audio at the call's rate out, streamed in chunks so playout can
//! start on the first bytes. espeak-ng is the offline default; Piper the offline neural voice;
//! OpenAI-compatible `POST /v1/audio/speech` the cloud one. A small cache keeps fixed prompts
//! ready.

pub mod cache;
pub mod espeak;
pub mod openai;
pub mod piper;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// Why synthesis failed.
#[derive(Debug, thiserror::Error)]
pub enum TtsError {
    #[error("TTS timed out after {0} ms")]
    Timeout(u64),
    #[error("TTS engine failed: {0}")]
    Engine(String),
    #[error("TTS server answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("TTS audio unreadable: {0}")]
    BadAudio(String),
}

/// Audio chunks of one synthesis, at the rate asked for; ends when the sender is dropped.
pub type TtsStream = mpsc::Receiver<Result<Vec<i16>, TtsError>>;

/// Chunks buffered between a synthesizer and playout (bounded).
pub const STREAM_DEPTH: usize = 64;

/// A speech synthesizer.
#[async_trait]
pub trait Tts: Send + Sync {
    /// Starts synthesizing `text` at `rate` Hz; audio arrives on the returned stream.
    async fn synthesize(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError>;

    /// The same for work no caller waits on (filling the prompt cache): an engine with few
    /// slots lets every caller's synthesis go first.
    async fn synthesize_background(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError> {
        self.synthesize(text, rate).await
    }
}

/// A stream that yields one finished clip.
pub fn ready_stream(samples: Vec<i16>) -> TtsStream {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Ok(samples));
    rx
}
