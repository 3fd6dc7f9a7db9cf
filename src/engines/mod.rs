//! The speech and language engines behind small traits: ASR (speech to text), TTS (text to
//! speech) and dialog (what to say and do next). Each has a timeout and a typed error.

pub mod agent;
pub mod asr;
pub mod dialog;
pub mod endpoint;
pub mod hugepages;
pub mod instant;
pub mod tts;

pub use crate::net::{http_client, root_cause};

/// Joins an OpenAI-style base URL (`http://host/v1`) and an endpoint path.
pub fn endpoint(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with(path.trim_start_matches('/')) {
        return base.to_string();
    }
    format!("{base}/{}", path.trim_start_matches('/'))
}
