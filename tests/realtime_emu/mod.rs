//! A scripted OpenAI Realtime transcription server for integration tests, on a real WebSocket
//! on 127.0.0.1 (`/v1/realtime?intent=transcription`). It speaks the GA protocol's events as
//! OpenAI documents them: `session.created` on connect, `session.updated` for a valid
//! transcription `session.update` (an `error` with `invalid_value` otherwise),
//! `input_audio_buffer.cleared`, `input_audio_buffer.committed` with an `item_id`,
//! `conversation.item.input_audio_transcription.delta` then `.completed`, `.failed`, and
//! `error` events that carry the offending client `event_id` (a commit under 100 ms of audio is
//! `input_audio_buffer_commit_empty`, as OpenAI's server answers).
//!
//! What it answers is scripted per utterance (an utterance is what the client sends between
//! two `input_audio_buffer.clear`): its first commit gets the scripted answer, later commits of
//! the same utterance (the caller went on after a pause) the transcript of their own audio
//! from the local whisper server, or nothing when the answer was scripted text. With nothing
//! scripted, every commit is transcribed by the whisper server (`SIDECALL_ASR_URL`).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

pub mod vllm;

/// The answer to an utterance's first commit.
#[derive(Debug, Clone)]
pub enum Answer {
    /// This transcript, `delay_ms` after the commit (in two deltas, then `.completed`).
    Say { text: String, delay_ms: u64 },
    /// One transcript per commit of the utterance, in order (a caller who pauses and goes on).
    Parts { texts: Vec<String>, delay_ms: u64 },
    /// A streaming recognizer: this transcript is final `after_voice_ms` after the last voiced
    /// audio the server received (it decoded the words as they came), so a commit gets it then,
    /// or at once when that time has passed.
    Live { text: String, after_voice_ms: u64 },
    /// The whisper server's transcript of the committed audio.
    Whisper,
    /// An `error` event naming the commit (`code`), no transcript.
    Error(String),
    /// `conversation.item.input_audio_transcription.failed` for the item.
    Failed,
    /// The TCP connection closed without a close frame.
    Drop,
    /// No answer at all.
    Hang,
}

/// One commit as the server saw it.
#[derive(Debug, Clone)]
pub struct Commit {
    pub connection: usize,
    pub utterance: usize,
    /// Samples committed, at the session's rate.
    pub samples: usize,
    pub answer: String,
}

#[derive(Debug, Default)]
pub struct Log {
    pub connections: usize,
    /// Each connection's request line target and `Authorization` header.
    pub requests: Vec<(String, Option<String>)>,
    pub session_updates: Vec<Value>,
    pub commits: Vec<Commit>,
    pub appends: usize,
    pub clears: usize,
    /// Client events the server refused (`error` sent).
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Shared {
    script: VecDeque<Answer>,
    log: Log,
}

pub struct RealtimeEmu {
    pub port: u16,
    shared: Arc<Mutex<Shared>>,
    rate: u32,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RealtimeEmu {
    /// A server whose sessions take PCM at `rate` (OpenAI: 24000).
    pub async fn start(rate: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let s = shared.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move { session(tcp, s, rate).await });
            }
        });
        Self { port, shared, rate }
    }

    pub fn url(&self) -> String {
        format!(
            "ws://127.0.0.1:{}/v1/realtime?intent=transcription",
            self.port
        )
    }

    /// The answer to the next utterance.
    pub fn push(&self, a: Answer) {
        lock(&self.shared).script.push_back(a);
    }

    pub fn clears(&self) -> usize {
        lock(&self.shared).log.clears
    }

    pub fn commits(&self) -> Vec<Commit> {
        lock(&self.shared).log.commits.clone()
    }

    pub fn connections(&self) -> usize {
        lock(&self.shared).log.connections
    }

    pub fn session_updates(&self) -> Vec<Value> {
        lock(&self.shared).log.session_updates.clone()
    }

    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        lock(&self.shared).log.requests.clone()
    }

    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared).log.errors.clone()
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }
}

fn event_id(n: &mut u64) -> String {
    *n += 1;
    format!("event_emu{n}")
}

// The handshake callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn session(tcp: tokio::net::TcpStream, shared: Arc<Mutex<Shared>>, rate: u32) {
    let mut target = String::new();
    let mut auth = None;
    let callback = |req: &Request, resp: Response| {
        target = req.uri().to_string();
        auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    let connection = {
        let mut s = lock(&shared);
        s.log.connections += 1;
        s.log.requests.push((target, auth));
        s.log.connections
    };
    let (mut sink, mut stream) = ws.split();
    // Everything the server sends goes through one writer task, so delayed answers interleave
    // with acknowledgements as a real server's would.
    let (out_tx, mut out_rx) = mpsc::channel::<Option<Value>>(256);
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            match msg {
                Some(v) => {
                    if sink.send(Message::text(v.to_string())).await.is_err() {
                        return;
                    }
                }
                // A drop: the TCP connection goes away without a close frame.
                None => return,
            }
        }
    });
    let mut n = 0u64;
    let _ = out_tx
        .send(Some(json!({"type": "session.created", "event_id": event_id(&mut n),
            "session": {"type": "transcription", "object": "realtime.transcription_session", "id": format!("sess_emu{connection}")}})))
        .await;
    let mut buffer: Vec<i16> = Vec::new();
    // When the last voiced audio came in (above -40 dBFS over an append).
    let mut last_voiced: Option<tokio::time::Instant> = None;
    let mut utterance = 0usize;
    let mut first_in_utterance = true;
    let mut scripted_text = false;
    let mut parts: VecDeque<String> = VecDeque::new();
    let mut parts_delay = 0u64;
    let mut item = 0u64;
    let mut configured = false;
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(text) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        let Ok(ev) = serde_json::from_str::<Value>(text.as_str()) else {
            let _ = out_tx
                .send(Some(error(
                    &mut n,
                    "invalid_request_error",
                    "invalid_json",
                    "not JSON",
                    None,
                )))
                .await;
            continue;
        };
        let client_id = ev
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let refuse = |code: &str, message: &str, n: &mut u64| {
            lock(&shared).log.errors.push(format!("{code}: {message}"));
            error(n, "invalid_request_error", code, message, client_id.clone())
        };
        match ev["type"].as_str().unwrap_or("") {
            "session.update" => {
                lock(&shared).log.session_updates.push(ev.clone());
                let s = &ev["session"];
                let input = &s["audio"]["input"];
                let ok = s["type"] == "transcription"
                    && input["format"]["type"] == "audio/pcm"
                    && input["format"]["rate"] == json!(rate)
                    && input["transcription"]["model"].is_string();
                if ok {
                    configured = true;
                    let _ = out_tx.send(Some(json!({"type": "session.updated", "event_id": event_id(&mut n), "session": s}))).await;
                } else {
                    let e = refuse(
                        "invalid_value",
                        "session.update: not a transcription session at this rate",
                        &mut n,
                    );
                    let _ = out_tx.send(Some(e)).await;
                }
            }
            "input_audio_buffer.append" => {
                let decoded = ev["audio"]
                    .as_str()
                    .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok());
                match decoded {
                    Some(bytes) if bytes.len() % 2 == 0 => {
                        let from = buffer.len();
                        buffer.extend(
                            bytes
                                .chunks_exact(2)
                                .map(|b| i16::from_le_bytes([b[0], b[1]])),
                        );
                        let chunk = &buffer[from..];
                        let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX).max(1);
                        let power =
                            chunk.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / f64::from(n);
                        if power > (32_768.0f64 * 0.01).powi(2) {
                            last_voiced = Some(tokio::time::Instant::now());
                        }
                        lock(&shared).log.appends += 1;
                    }
                    _ => {
                        let e = refuse("invalid_value", "audio is not base64 PCM16", &mut n);
                        let _ = out_tx.send(Some(e)).await;
                    }
                }
            }
            "input_audio_buffer.clear" => {
                buffer.clear();
                last_voiced = None;
                parts.clear();
                utterance += 1;
                first_in_utterance = true;
                lock(&shared).log.clears += 1;
                let _ = out_tx
                    .send(Some(
                        json!({"type": "input_audio_buffer.cleared", "event_id": event_id(&mut n)}),
                    ))
                    .await;
            }
            "input_audio_buffer.commit" => {
                if !configured {
                    let e = refuse(
                        "session_not_configured",
                        "commit before session.update",
                        &mut n,
                    );
                    let _ = out_tx.send(Some(e)).await;
                    continue;
                }
                let samples = buffer.len();
                if samples < rate as usize / 10 {
                    let e = refuse(
                        "input_audio_buffer_commit_empty",
                        "buffer too small: expected at least 100ms of audio",
                        &mut n,
                    );
                    let _ = out_tx.send(Some(e)).await;
                    continue;
                }
                let audio = std::mem::take(&mut buffer);
                let previous = (item > 0).then(|| format!("item_emu{item}"));
                item += 1;
                let item_id = format!("item_emu{item}");
                let _ = out_tx
                    .send(Some(
                        json!({"type": "input_audio_buffer.committed", "event_id": event_id(&mut n),
                    "previous_item_id": previous, "item_id": item_id}),
                    ))
                    .await;
                let answer = if first_in_utterance {
                    let a = lock(&shared).script.pop_front().unwrap_or(Answer::Whisper);
                    scripted_text = matches!(
                        a,
                        Answer::Say { .. } | Answer::Parts { .. } | Answer::Live { .. }
                    );
                    match a {
                        Answer::Parts { texts, delay_ms } => {
                            parts = texts.into();
                            parts_delay = delay_ms;
                            Answer::Say {
                                text: parts.pop_front().unwrap_or_default(),
                                delay_ms,
                            }
                        }
                        a => a,
                    }
                } else if let Some(text) = parts.pop_front() {
                    Answer::Say {
                        text,
                        delay_ms: parts_delay,
                    }
                } else if scripted_text {
                    Answer::Say {
                        text: String::new(),
                        delay_ms: 50,
                    }
                } else {
                    Answer::Whisper
                };
                first_in_utterance = false;
                lock(&shared).log.commits.push(Commit {
                    connection,
                    utterance,
                    samples,
                    answer: format!("{answer:?}"),
                });
                let out = out_tx.clone();
                let done_id = event_id(&mut n);
                match answer {
                    Answer::Say { text, delay_ms } => {
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            transcript(&out, &item_id, &text, &done_id).await;
                        });
                    }
                    Answer::Live {
                        text,
                        after_voice_ms,
                    } => {
                        let ready = last_voiced.map(|t| t + Duration::from_millis(after_voice_ms));
                        tokio::spawn(async move {
                            if let Some(at) = ready {
                                tokio::time::sleep_until(at).await;
                            }
                            transcript(&out, &item_id, &text, &done_id).await;
                        });
                    }
                    Answer::Whisper => {
                        tokio::spawn(async move {
                            match whisper(&audio, rate).await {
                                Ok(text) => transcript(&out, &item_id, &text, &done_id).await,
                                Err(e) => {
                                    let _ = out.send(Some(json!({"type": "conversation.item.input_audio_transcription.failed",
                                        "event_id": done_id, "item_id": item_id, "content_index": 0,
                                        "error": {"type": "server_error", "code": null, "message": e, "param": null}}))).await;
                                }
                            }
                        });
                    }
                    Answer::Error(code) => {
                        let _ = out_tx
                            .send(Some(error(
                                &mut n,
                                "invalid_request_error",
                                &code,
                                "scripted error",
                                client_id,
                            )))
                            .await;
                    }
                    Answer::Failed => {
                        let _ = out_tx.send(Some(json!({"type": "conversation.item.input_audio_transcription.failed",
                            "event_id": done_id, "item_id": item_id, "content_index": 0,
                            "error": {"type": "transcription_error", "code": "audio_unintelligible", "message": "scripted failure", "param": null}}))).await;
                    }
                    Answer::Parts { .. } => {}
                    Answer::Drop => {
                        let _ = out_tx.send(None).await;
                        break;
                    }
                    Answer::Hang => {}
                }
            }
            other => {
                let e = refuse(
                    "invalid_value",
                    &format!("unknown event type {other}"),
                    &mut n,
                );
                let _ = out_tx.send(Some(e)).await;
            }
        }
    }
    drop(out_tx);
    let _ = writer.await;
}

fn error(n: &mut u64, kind: &str, code: &str, message: &str, client_id: Option<String>) -> Value {
    json!({"type": "error", "event_id": event_id(n),
        "error": {"type": kind, "code": code, "message": message, "param": null, "event_id": client_id}})
}

async fn transcript(out: &mpsc::Sender<Option<Value>>, item_id: &str, text: &str, done_id: &str) {
    let mid = text.len() / 2;
    let mid = (0..=mid)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    for (i, part) in [&text[..mid], &text[mid..]].into_iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        let _ = out
            .send(Some(json!({"type": "conversation.item.input_audio_transcription.delta",
                "event_id": format!("{done_id}_d{i}"), "item_id": item_id, "content_index": 0, "delta": part})))
            .await;
    }
    let _ = out
        .send(Some(
            json!({"type": "conversation.item.input_audio_transcription.completed",
            "event_id": done_id, "item_id": item_id, "content_index": 0, "transcript": text,
            "usage": {"type": "duration", "seconds": 1}}),
        ))
        .await;
}

/// The committed audio through the local whisper server (`SIDECALL_ASR_URL`).
async fn whisper(audio: &[i16], rate: u32) -> Result<String, String> {
    let url =
        std::env::var("SIDECALL_ASR_URL").map_err(|_| "SIDECALL_ASR_URL is not set".to_string())?;
    let mut wav = std::io::Cursor::new(Vec::new());
    {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(&mut wav, spec).map_err(|e| e.to_string())?;
        for &s in audio {
            w.write_sample(s).map_err(|e| e.to_string())?;
        }
        w.finalize().map_err(|e| e.to_string())?;
    }
    let part = reqwest::multipart::Part::bytes(wav.into_inner())
        .file_name("a.wav")
        .mime_str("audio/wav")
        .map_err(|e| e.to_string())?;
    let form = reqwest::multipart::Form::new()
        .part("file", part)
        .text("model", "tiny.en")
        .text("language", "en");
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/audio/transcriptions",
            url.trim_end_matches('/')
        ))
        .multipart(form)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    Ok(v["text"].as_str().unwrap_or("").trim().to_string())
}
