//! The speech and language engines behind small traits: ASR (speech to text), TTS (text to
//! speech) and dialog (what to say and do next). Each has a timeout and a typed error.

pub mod asr;
pub mod dialog;
pub mod instant;
pub mod tts;

use std::time::Duration;

/// One shared HTTP client (connection pools are per client). Timeouts are set per request.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(8)
        .build()
        .unwrap_or_default()
}

/// The innermost error message (reqwest wraps hyper wraps io), for logs and records.
pub fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Joins an OpenAI-style base URL (`http://host/v1`) and an endpoint path.
pub fn endpoint(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with(path.trim_start_matches('/')) {
        return base.to_string();
    }
    format!("{base}/{}", path.trim_start_matches('/'))
}
