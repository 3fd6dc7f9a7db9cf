//! OpenAI-compatible `POST /v1/audio/speech`, read as a stream: `pcm` (24 kHz s16le) or `wav`,
//! resampled to the call's rate as bytes arrive, so playout starts on the first chunk.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{STREAM_DEPTH, Tts, TtsError, TtsStream};
use crate::audio::{StreamResampler, l16, wav};
use crate::config::TtsConfig;

/// OpenAI-compatible speech client.
pub struct OpenAiTts {
    client: reqwest::Client,
    url: String,
    model: String,
    voice: String,
    format: String,
    timeout: Duration,
    api_key: Option<crate::config::Secret>,
}

impl OpenAiTts {
    pub fn new(cfg: &TtsConfig, client: reqwest::Client) -> Self {
        Self {
            client,
            url: crate::engines::endpoint(&cfg.url, "audio/speech"),
            model: cfg.model.clone(),
            voice: if cfg.voice == "en-us" {
                "alloy".into()
            } else {
                cfg.voice.clone()
            },
            format: cfg.response_format.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
            api_key: cfg.api_key.clone(),
        }
    }
}

/// Turns body bytes into samples at `rate`, whatever chunk boundaries the network gives.
struct Decoder {
    header_done: bool,
    buf: Vec<u8>,
    resampler: Option<StreamResampler>,
    rate: u32,
}

impl Decoder {
    fn new(wav: bool, rate: u32) -> Self {
        Self {
            header_done: !wav,
            buf: Vec::new(),
            resampler: None,
            rate,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> Result<Vec<i16>, TtsError> {
        self.buf.extend_from_slice(bytes);
        if !self.header_done {
            match wav::stream_header(&self.buf).map_err(|e| TtsError::BadAudio(e.to_string()))? {
                None => return Ok(Vec::new()),
                Some(h) => {
                    if h.channels != 1 {
                        return Err(TtsError::BadAudio(format!(
                            "{} channels; mono expected",
                            h.channels
                        )));
                    }
                    self.buf.drain(..h.data_offset);
                    self.header_done = true;
                    self.resampler = Some(
                        StreamResampler::new(h.rate, self.rate)
                            .map_err(|e| TtsError::BadAudio(e.to_string()))?,
                    );
                }
            }
        }
        if self.resampler.is_none() {
            // Raw pcm from this API is 24 kHz mono s16le.
            self.resampler = Some(
                StreamResampler::new(24_000, self.rate)
                    .map_err(|e| TtsError::BadAudio(e.to_string()))?,
            );
        }
        let whole = self.buf.len() & !1;
        let samples = l16::decode_le(&self.buf[..whole]);
        self.buf.drain(..whole);
        let mut out = Vec::new();
        if let Some(r) = self.resampler.as_mut() {
            r.process(&samples, &mut out)
                .map_err(|e| TtsError::BadAudio(e.to_string()))?;
        }
        Ok(out)
    }

    fn finish(&mut self) -> Result<Vec<i16>, TtsError> {
        let mut out = Vec::new();
        if let Some(r) = self.resampler.as_mut() {
            r.flush(&mut out)
                .map_err(|e| TtsError::BadAudio(e.to_string()))?;
        }
        Ok(out)
    }
}

#[async_trait]
impl Tts for OpenAiTts {
    async fn synthesize(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError> {
        let body = serde_json::json!({
            "model": self.model,
            "input": text,
            "voice": self.voice,
            "response_format": self.format,
        });
        let mut req = self.client.post(&self.url).json(&body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k.expose());
        }
        let ms = self.timeout.as_millis() as u64;
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| TtsError::Timeout(ms))?
            .map_err(|e| TtsError::Engine(crate::engines::root_cause(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect();
            return Err(TtsError::Http {
                status: status.as_u16(),
                body,
            });
        }
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let mut decoder = Decoder::new(self.format == "wav", rate);
        let timeout = self.timeout;
        let mut stream = resp.bytes_stream();
        tokio::spawn(async move {
            loop {
                // Each chunk must come within the timeout (a stalled server ends the prompt);
                // a listener that went away (barge-in, the call ended) ends the request at once.
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    n = tokio::time::timeout(timeout, stream.next()) => n,
                };
                let next = match next {
                    Ok(n) => n,
                    Err(_) => {
                        let _ = tx.send(Err(TtsError::Timeout(ms))).await;
                        return;
                    }
                };
                let result = match next {
                    None => break,
                    Some(Ok(bytes)) => decoder.push(&bytes),
                    Some(Err(e)) => Err(TtsError::Engine(e.to_string())),
                };
                let failed = result.is_err();
                let empty = result.as_ref().is_ok_and(Vec::is_empty);
                if !empty && tx.send(result).await.is_err() {
                    return;
                }
                if failed {
                    return;
                }
            }
            if let Ok(tail) = decoder.finish()
                && !tail.is_empty()
            {
                let _ = tx.send(Ok(tail)).await;
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_decoder_handles_split_header() {
        let samples: Vec<i16> = (0..4_800).map(|i| (i % 100) as i16).collect();
        let bytes = wav::to_bytes(16_000, &samples).unwrap();
        let mut d = Decoder::new(true, 16_000);
        let mut out = Vec::new();
        for chunk in bytes.chunks(7) {
            out.extend(d.push(chunk).unwrap());
        }
        out.extend(d.finish().unwrap());
        assert_eq!(out, samples);
    }

    #[test]
    fn pcm_decoder_resamples_24k() {
        let bytes = l16::encode_le(&vec![1000i16; 24_000]);
        let mut d = Decoder::new(false, 8_000);
        let mut n = 0;
        for chunk in bytes.chunks(999) {
            n += d.push(chunk).unwrap().len();
        }
        n += d.finish().unwrap().len();
        assert!((n as i64 - 8_000).abs() <= 2, "{n}");
    }
}
