//! A scripted vLLM realtime transcription server (`vllm serve` with a realtime model), on a
//! real WebSocket on 127.0.0.1 (`/v1/realtime`), behaving as vLLM's `RealtimeConnection`
//! (vllm/entrypoints/speech_to_text/realtime/connection.py) does:
//! - `session.created` on connect; `session.update` must name the server's model at the top
//!   level and gets no answer (`error` `invalid_event` without one, `model_not_found` for
//!   another);
//! - `input_audio_buffer.append` queues 16 kHz PCM16 (`error` `invalid_audio` for bad or
//!   empty audio); `input_audio_buffer.commit` before the model is validated is an `error`
//!   `model_not_validated`; a commit starts a generation over the queued and coming audio
//!   (ignored while one runs), one with `"final": true` ends its audio;
//! - the generation answers `transcription.delta` then `transcription.done` with the text,
//!   then drops whatever audio was queued meanwhile;
//! - errors are `{"type": "error", "error": "<message>", "code": "<code>"}`; unknown events and
//!   invalid JSON get one too.
//!
//! Each generation's text is scripted (`VllmAnswer`), or the local whisper server's transcript
//! of its audio.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// What one generation answers.
#[derive(Debug, Clone)]
pub enum VllmAnswer {
    /// The whisper server's transcript of the generation's audio.
    Whisper,
    /// This text.
    Say(String),
    /// The model ends the generation itself after its first audio (its token limit), with
    /// this text.
    EndEarly(String),
    /// The TCP connection closes without a close frame at the generation's end.
    Drop,
}

#[derive(Debug, Default, Clone)]
pub struct VllmLog {
    pub connections: usize,
    pub session_updates: Vec<Value>,
    /// Samples each generation transcribed.
    pub generations: Vec<usize>,
    /// Commits that would have started a generation while one ran.
    pub ignored_starts: usize,
    /// Samples the server dropped after a generation's end (appended before `done`).
    pub dropped_samples: usize,
    /// `code: message` of every error sent.
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Shared {
    script: VecDeque<VllmAnswer>,
    log: VllmLog,
}

pub struct VllmEmu {
    pub port: u16,
    shared: Arc<Mutex<Shared>>,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VllmEmu {
    /// A server that has `model`.
    pub async fn start(model: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (s, model) = (shared.clone(), model.to_string());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (s, model) = (s.clone(), model.clone());
                tokio::spawn(async move { session(tcp, s, model).await });
            }
        });
        Self { port, shared }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/realtime", self.port)
    }

    /// The answer of the next generation.
    pub fn push(&self, a: VllmAnswer) {
        lock(&self.shared).script.push_back(a);
    }

    pub fn log(&self) -> VllmLog {
        lock(&self.shared).log.clone()
    }
}

type Out = mpsc::Sender<Option<Value>>;

async fn error(out: &Out, shared: &Mutex<Shared>, message: &str, code: &str) {
    lock(shared).log.errors.push(format!("{code}: {message}"));
    let _ = out
        .send(Some(
            json!({"type": "error", "error": message, "code": code}),
        ))
        .await;
}

async fn session(tcp: tokio::net::TcpStream, shared: Arc<Mutex<Shared>>, model: String) {
    let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    lock(&shared).log.connections += 1;
    let (mut sink, mut stream) = ws.split();
    let (out, mut out_rx) = mpsc::channel::<Option<Value>>(256);
    // A drop (`None`): the connection goes away without a close frame.
    let dropped = Arc::new(tokio::sync::Notify::new());
    let on_drop = dropped.clone();
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            let Some(v) = msg else {
                on_drop.notify_one();
                return;
            };
            if sink.send(Message::text(v.to_string())).await.is_err() {
                return;
            }
        }
    });
    let _ = out
        .send(Some(
            json!({"type": "session.created", "id": "sess-emu", "created": 0}),
        ))
        .await;
    // The audio queue: chunks, and `None` for the end of a generation's audio.
    let (queue_tx, queue_rx) = mpsc::unbounded_channel::<Option<Vec<i16>>>();
    let queue_rx = Arc::new(tokio::sync::Mutex::new(queue_rx));
    let mut generation: Option<tokio::task::JoinHandle<()>> = None;
    // A generation runs (vLLM: its task is not done); it is over once it has sent `done`.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut validated = false;
    loop {
        let msg = tokio::select! {
            msg = stream.next() => msg,
            () = dropped.notified() => break,
        };
        let Some(Ok(msg)) = msg else { break };
        let Message::Text(text) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        let Ok(ev) = serde_json::from_str::<Value>(text.as_str()) else {
            error(&out, &shared, "Invalid JSON", "invalid_json").await;
            continue;
        };
        match ev["type"].as_str().unwrap_or("") {
            "session.update" => {
                lock(&shared).log.session_updates.push(ev.clone());
                match ev["model"].as_str() {
                    None => {
                        error(
                            &out,
                            &shared,
                            "Missing required field: model",
                            "invalid_event",
                        )
                        .await
                    }
                    Some(m) if m != model => {
                        let msg = format!("The model `{m}` does not exist.");
                        error(&out, &shared, &msg, "model_not_found").await;
                    }
                    Some(_) => validated = true,
                }
            }
            "input_audio_buffer.append" => {
                let Some(audio) = ev["audio"].as_str() else {
                    // pydantic refuses the event before the handler's own checks.
                    error(&out, &shared, "audio: Field required", "processing_error").await;
                    continue;
                };
                let decoded = base64::engine::general_purpose::STANDARD.decode(audio).ok();
                match decoded {
                    Some(bytes) if !bytes.is_empty() && bytes.len() % 2 == 0 => {
                        let samples = bytes
                            .chunks_exact(2)
                            .map(|b| i16::from_le_bytes([b[0], b[1]]))
                            .collect();
                        let _ = queue_tx.send(Some(samples));
                    }
                    _ => error(&out, &shared, "Invalid audio data", "invalid_audio").await,
                }
            }
            "input_audio_buffer.commit" => {
                if !validated {
                    let msg = "Model not validated. Make sure to validate the model by sending a session.update event.";
                    error(&out, &shared, msg, "model_not_validated").await;
                    continue;
                }
                if ev["final"] == true {
                    let _ = queue_tx.send(None);
                } else if running.load(std::sync::atomic::Ordering::SeqCst) {
                    lock(&shared).log.ignored_starts += 1;
                } else {
                    let answer = lock(&shared)
                        .script
                        .pop_front()
                        .unwrap_or(VllmAnswer::Whisper);
                    running.store(true, std::sync::atomic::Ordering::SeqCst);
                    generation = Some(tokio::spawn(generate(
                        answer,
                        queue_rx.clone(),
                        out.clone(),
                        shared.clone(),
                        running.clone(),
                    )));
                }
            }
            other => {
                let msg = format!("Unknown event type: {other}");
                error(&out, &shared, &msg, "unknown_event").await;
            }
        }
    }
    if let Some(g) = generation {
        g.abort();
    }
    drop(out);
    let _ = writer.await;
}

/// One generation: its audio until the final commit (or its own end), then its text.
async fn generate(
    answer: VllmAnswer,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Option<Vec<i16>>>>>,
    out: Out,
    shared: Arc<Mutex<Shared>>,
    running: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut q = queue.lock().await;
    let mut audio: Vec<i16> = Vec::new();
    while let Some(Some(chunk)) = q.recv().await {
        audio.extend(chunk);
        if matches!(answer, VllmAnswer::EndEarly(_)) {
            break;
        }
    }
    lock(&shared).log.generations.push(audio.len());
    let text = match answer {
        VllmAnswer::Say(t) | VllmAnswer::EndEarly(t) => t,
        VllmAnswer::Whisper => match super::whisper(&audio, 16_000).await {
            Ok(t) => t,
            Err(e) => {
                // vLLM's task ends without `done` and without clearing its queue.
                running.store(false, std::sync::atomic::Ordering::SeqCst);
                error(&out, &shared, &e, "processing_error").await;
                return;
            }
        },
        VllmAnswer::Drop => {
            let _ = out.send(None).await;
            return;
        }
    };
    let _ = out
        .send(Some(json!({"type": "transcription.delta", "delta": text})))
        .await;
    // vLLM sends `done`, then clears its queue ("Clear queue for next utterance") and ends
    // without reading another event: here the queue is cleared and the generation over before
    // `done` goes out, so nothing the client sends after `done` can be taken for it.
    let mut dropped = 0;
    while let Ok(item) = q.try_recv() {
        dropped += item.map_or(0, |c| c.len());
    }
    lock(&shared).log.dropped_samples += dropped;
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = out
        .send(Some(json!({"type": "transcription.done", "text": text,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})))
        .await;
}
