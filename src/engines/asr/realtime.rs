//! Streaming speech recognition over the OpenAI Realtime transcription protocol
//! (`/v1/realtime?intent=transcription`, served by OpenAI, Azure OpenAI and speaches), or over
//! vLLM's own realtime dialect (`asr.stream.protocol = "vllm"`, see `vllm`).
//!
//! Each call holds one WebSocket to the server, opened when the call starts. The caller's audio
//! goes out while they speak (`input_audio_buffer.append`, PCM at the configured rate); a new
//! utterance clears what was not committed (`input_audio_buffer.clear`); the end of a turn, or
//! a pause the end-of-turn logic checks, commits the audio so far (`input_audio_buffer.commit`)
//! and the server's `conversation.item.input_audio_transcription.completed` carries its final
//! transcript, so it is ready moments after the caller stops instead of after a whole upload
//! and decode. Server VAD is off: sidecall decides turns itself.
//!
//! Anything the stream cannot do (not connected, an `error` or `…transcription.failed` event, a
//! dropped socket, no answer within `asr.stream.timeout_ms`, audio it was not given) sends that
//! turn to the batch engine, which every `RealtimeAsr` wraps; a failed connection is retried
//! at the next utterance after `asr.stream.retry_after_ms`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Asr, AsrError, EngineLoad, Transcript};

mod vllm;
use crate::audio::resample::StreamResampler;
use crate::config::{AsrConfig, AsrStreamConfig, Secret};

/// A transcript on its way from the stream.
pub type PendingTranscript = Pin<Box<dyn Future<Output = Result<Transcript, AsrError>> + Send>>;

/// One call's stream of utterances to a streaming recognizer. Positions are samples of the
/// current utterance at the call's rate, counted from its first sample (`begin`).
pub trait AsrStream: Send {
    /// A new utterance starts: what was appended and not committed is dropped.
    fn begin(&mut self);
    /// The utterance's next samples.
    fn append(&mut self, audio: &[i16]);
    /// Transcribes samples `from..to` of the utterance, when the stream holds exactly those
    /// (it was given them, and its last commit ended at `from`; samples after `to` that were
    /// already sent go with them). `None`: the batch engine must do it.
    fn commit(&mut self, from: usize, to: usize) -> Option<PendingTranscript>;
    /// How long a commit may take before the batch engine is asked instead.
    fn timeout(&self) -> Duration;
}

/// A batch engine with a streaming recognizer beside it.
pub struct RealtimeAsr {
    batch: Arc<dyn Asr>,
    cfg: Arc<StreamSettings>,
}

/// What every call's stream needs.
struct StreamSettings {
    stream: AsrStreamConfig,
    language: String,
    api_key: Option<Secret>,
    /// Until when a failed connection keeps new ones from being tried (process-wide: a down
    /// server is tried once per `retry_after_ms`, not once per call).
    retry_at: std::sync::Mutex<Option<Instant>>,
}

impl RealtimeAsr {
    pub fn new(cfg: &AsrConfig, batch: Arc<dyn Asr>) -> Self {
        Self {
            batch,
            cfg: Arc::new(StreamSettings {
                stream: cfg.stream.clone(),
                language: cfg.language.clone(),
                api_key: cfg.api_key.clone(),
                retry_at: std::sync::Mutex::new(None),
            }),
        }
    }
}

#[async_trait]
impl Asr for RealtimeAsr {
    async fn transcribe(
        &self,
        audio: &[i16],
        rate: u32,
        hint: Option<&str>,
    ) -> Result<Transcript, AsrError> {
        self.batch.transcribe(audio, rate, hint).await
    }

    fn load(&self) -> Option<Arc<EngineLoad>> {
        self.batch.load()
    }

    fn stream(&self, rate: u32) -> Option<Box<dyn AsrStream>> {
        let mut s = RealtimeStream {
            cfg: self.cfg.clone(),
            rate,
            conn: None,
            appended: 0,
            committed: 0,
        };
        // Connected before the caller first speaks.
        s.connect();
        Some(Box::new(s))
    }
}

/// What the call asks of its connection task.
enum Cmd {
    Clear,
    Append(Vec<i16>),
    Commit(oneshot::Sender<Result<Transcript, AsrError>>),
}

/// Frames waiting for the socket: five seconds of audio. A server that does not keep up
/// loses the stream (its turns go to the batch engine), never the call's tick.
const QUEUE: usize = 256;

/// The largest server event accepted (transcripts are a few KB).
const MAX_EVENT: usize = 1 << 20;

/// Sending one event: a server that stops reading ends the session, never blocks it.
const SEND_LIMIT: Duration = Duration::from_secs(2);

/// Less than this is refused by OpenAI's server (`input_audio_buffer_commit_empty`).
const MIN_COMMIT_MS: usize = 100;

struct Conn {
    tx: mpsc::Sender<Cmd>,
    alive: Arc<AtomicBool>,
    /// The connection task: it ends with the call (or when replaced), whatever it is doing.
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(t) = self.task.take() else { return };
        // The channel closes with this `Conn`: the task closes the socket properly and ends;
        // if it cannot (stuck connecting, a server that takes nothing), it is aborted.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(SEND_LIMIT.saturating_add(Duration::from_secs(1))).await;
                    t.abort();
                });
            }
            Err(_) => t.abort(),
        }
    }
}

struct RealtimeStream {
    cfg: Arc<StreamSettings>,
    rate: u32,
    conn: Option<Conn>,
    /// Samples of the utterance given to the server.
    appended: usize,
    /// Where the last commit ended (as the call counts: the samples after it that were sent
    /// with it are silence the turn logic left out).
    committed: usize,
}

impl RealtimeStream {
    fn alive(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.alive.load(Ordering::Relaxed))
    }

    fn connect(&mut self) {
        let now = Instant::now();
        if let Ok(mut retry) = self.cfg.retry_at.lock() {
            if retry.is_some_and(|t| now < t) {
                return;
            }
            *retry = None;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let alive = Arc::new(AtomicBool::new(true));
        let task = Connection {
            cfg: self.cfg.clone(),
            rate: self.rate,
            alive: alive.clone(),
        };
        let handle = tokio::spawn(task.run(rx)).abort_handle();
        self.conn = Some(Conn {
            tx,
            alive,
            task: Some(handle),
        });
    }

    fn send(&mut self, cmd: Cmd) {
        let Some(c) = &self.conn else { return };
        match c.tx.try_send(cmd) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    "streaming ASR: the server does not keep up; the batch engine takes over until the next utterance"
                );
            }
            // The connection already ended (and said why).
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        c.alive.store(false, Ordering::Relaxed);
        self.conn = None;
    }
}

impl AsrStream for RealtimeStream {
    fn begin(&mut self) {
        if !self.alive() {
            self.conn = None;
            self.connect();
        }
        self.appended = 0;
        self.committed = 0;
        self.send(Cmd::Clear);
    }

    fn append(&mut self, audio: &[i16]) {
        if audio.is_empty() {
            return;
        }
        self.appended = self.appended.saturating_add(audio.len());
        self.send(Cmd::Append(audio.to_vec()));
    }

    fn commit(&mut self, from: usize, to: usize) -> Option<PendingTranscript> {
        let min = usize::try_from(self.rate)
            .unwrap_or(usize::MAX)
            .saturating_mul(MIN_COMMIT_MS)
            / 1000;
        if !self.alive()
            || from != self.committed
            || to > self.appended
            || to < from.saturating_add(min)
        {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        self.send(Cmd::Commit(reply));
        self.committed = to;
        // Sending failed: the connection is gone.
        self.conn.as_ref()?;
        Some(Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(AsrError::Engine("the stream closed".into())))
        }))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.stream.timeout_ms)
    }
}

/// A commit the server has not yet acknowledged (`input_audio_buffer.committed`).
struct Sent {
    event_id: String,
    at: Instant,
    reply: oneshot::Sender<Result<Transcript, AsrError>>,
}

/// One call's socket: runs until the call drops its stream or the socket fails.
struct Connection {
    cfg: Arc<StreamSettings>,
    rate: u32,
    alive: Arc<AtomicBool>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Connection {
    async fn run(self, mut rx: mpsc::Receiver<Cmd>) {
        let limit = Duration::from_millis(self.cfg.stream.connect_timeout_ms);
        let ws = match tokio::time::timeout(limit, self.open()).await {
            Ok(Ok(ws)) => Some(ws),
            Ok(Err(e)) => {
                tracing::warn!(url = %self.cfg.stream.url, error = %e, "streaming ASR: cannot connect; the batch engine transcribes meanwhile");
                None
            }
            Err(_) => {
                tracing::warn!(url = %self.cfg.stream.url, ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX), "streaming ASR: no connection in time; the batch engine transcribes meanwhile");
                None
            }
        };
        let failure = match ws {
            Some(ws) => {
                let failure = if self.cfg.stream.protocol == "vllm" {
                    self.serve_vllm(ws, &mut rx).await
                } else {
                    self.serve(ws, &mut rx).await
                };
                if let Some(why) = &failure {
                    tracing::warn!(url = %self.cfg.stream.url, %why, "streaming ASR: the session ended; the batch engine transcribes until the next one");
                }
                failure
            }
            None => Some("not connected".to_string()),
        };
        if failure.is_some() {
            // A server that failed is left alone for a while (by every call): its turns go to
            // the batch engine without waiting on it.
            let retry = Duration::from_millis(self.cfg.stream.retry_after_ms);
            if let Ok(mut at) = self.cfg.retry_at.lock() {
                *at = Some(Instant::now() + retry);
            }
        }
        self.alive.store(false, Ordering::Relaxed);
        // Commits still queued get their answer: the batch engine's turn.
        rx.close();
        let why = failure.unwrap_or_else(|| "the call ended".into());
        while let Some(cmd) = rx.recv().await {
            if let Cmd::Commit(reply) = cmd {
                let _ = reply.send(Err(AsrError::Engine(why.clone())));
            }
        }
    }

    /// Connects and configures the session.
    async fn open(&self) -> Result<Ws, AsrError> {
        let s = &self.cfg.stream;
        let connect_err = |message: String| AsrError::Connect {
            url: s.url.clone(),
            message,
        };
        let mut req = s
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| connect_err(e.to_string()))?;
        if let Some(key) = &self.cfg.api_key {
            let v = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                .map_err(|_| connect_err("the API key is not a valid header value".into()))?;
            req.headers_mut().insert("authorization", v);
        }
        if s.protocol == "beta" {
            req.headers_mut()
                .insert("openai-beta", HeaderValue::from_static("realtime=v1"));
        }
        // Server events are small JSON: nothing near tungstenite's 64 MiB default is accepted.
        let limits = WebSocketConfig::default()
            .max_message_size(Some(MAX_EVENT))
            .max_frame_size(Some(MAX_EVENT));
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(limits), true)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        if s.protocol == "vllm" {
            vllm::configure(&mut ws, &s.model)
                .await
                .map_err(connect_err)?;
            return Ok(ws);
        }
        let update = session_update(s, &self.cfg.language);
        ws.send(Message::text(update.to_string()))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        // The session is ready when the server accepts its configuration.
        loop {
            let text = match ws.next().await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None => {
                    return Err(connect_err("the server closed the socket".into()));
                }
                Some(Err(e)) => return Err(connect_err(e.to_string())),
                Some(Ok(_)) => continue,
            };
            let Ok(ev) = serde_json::from_str::<Value>(text.as_str()) else {
                return Err(AsrError::BadResponse(format!(
                    "an event that is not JSON: {:.120}",
                    text.as_str()
                )));
            };
            match str_of(&ev, "type") {
                "session.updated" | "transcription_session.updated" => return Ok(ws),
                "error" => {
                    let err = ev.get("error").cloned().unwrap_or(Value::Null);
                    return Err(AsrError::Engine(format!(
                        "the server refused the session: {}: {}",
                        str_of(&err, "code"),
                        str_of(&err, "message")
                    )));
                }
                _ => {}
            }
        }
    }

    /// Relays the call's commands and the server's events; the reason it stopped, if the
    /// socket failed.
    async fn serve(&self, mut ws: Ws, rx: &mut mpsc::Receiver<Cmd>) -> Option<String> {
        let mut pcm_out = self.outgoing();
        let mut sent: VecDeque<Sent> = VecDeque::new();
        let mut items: HashMap<String, Sent> = HashMap::new();
        let mut next_id = 0u64;
        let fail_all = |sent: &mut VecDeque<Sent>, items: &mut HashMap<String, Sent>, why: &str| {
            for s in sent.drain(..).chain(items.drain().map(|(_, s)| s)) {
                let _ = s.reply.send(Err(AsrError::Engine(why.to_string())));
            }
        };
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else {
                        let _ = tokio::time::timeout(SEND_LIMIT, ws.close(None)).await;
                        return None;
                    };
                    let out = match cmd {
                        Cmd::Clear => {
                            pcm_out.reset();
                            json!({"type": "input_audio_buffer.clear"})
                        }
                        Cmd::Append(audio) => {
                            let pcm = pcm_out.convert(&audio);
                            if pcm.is_empty() {
                                continue;
                            }
                            json!({"type": "input_audio_buffer.append", "audio": encode(&pcm)})
                        }
                        Cmd::Commit(reply) => {
                            // What the resampler holds back belongs to this commit.
                            let pcm = pcm_out.flush();
                            if !pcm.is_empty() {
                                let tail = json!({"type": "input_audio_buffer.append", "audio": encode(&pcm)});
                                if let Err(why) = send(&mut ws, tail).await {
                                    let _ = reply.send(Err(AsrError::Engine(why.clone())));
                                    fail_all(&mut sent, &mut items, &why);
                                    return Some(why);
                                }
                            }
                            next_id += 1;
                            let event_id = format!("sidecall_commit_{next_id}");
                            let out = json!({"type": "input_audio_buffer.commit", "event_id": event_id});
                            sent.push_back(Sent { event_id, at: Instant::now(), reply });
                            out
                        }
                    };
                    if let Err(why) = send(&mut ws, out).await {
                        fail_all(&mut sent, &mut items, &why);
                        return Some(why);
                    }
                }
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Ok(Message::Binary(_))) => {
                            tracing::warn!("streaming ASR: a binary message where JSON events belong; ignored");
                            continue;
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let why = format!("the server closed the socket ({})", frame.map(|f| f.reason.to_string()).unwrap_or_default());
                            fail_all(&mut sent, &mut items, &why);
                            return Some(why);
                        }
                        Some(Err(e)) => {
                            let why = format!("the socket failed: {e}");
                            fail_all(&mut sent, &mut items, &why);
                            return Some(why);
                        }
                        None => {
                            let why = "the server dropped the socket".to_string();
                            fail_all(&mut sent, &mut items, &why);
                            return Some(why);
                        }
                    };
                    let Ok(ev) = serde_json::from_str::<Value>(text.as_str()) else {
                        tracing::warn!(text = %text.as_str().chars().take(120).collect::<String>(), "streaming ASR: an event that is not JSON; ignored");
                        continue;
                    };
                    if let Some(why) = on_event(&ev, &mut sent, &mut items) {
                        fail_all(&mut sent, &mut items, &why);
                        let _ = tokio::time::timeout(SEND_LIMIT, ws.close(None)).await;
                        return Some(why);
                    }
                }
            }
        }
    }

    fn outgoing(&self) -> Outgoing {
        let mut o = Outgoing {
            from: self.rate,
            to: self.cfg.stream.rate,
            resampler: None,
        };
        o.reset();
        o
    }
}

/// The call's audio at the stream's rate.
struct Outgoing {
    from: u32,
    to: u32,
    resampler: Option<StreamResampler>,
}

impl Outgoing {
    /// A new utterance: nothing held from the last.
    fn reset(&mut self) {
        self.resampler = if self.from == self.to {
            None
        } else {
            match StreamResampler::new(self.from, self.to) {
                Ok(r) => Some(r),
                // The configuration's rates are checked at load: this does not happen.
                Err(e) => {
                    tracing::error!(error = %e, "streaming ASR: cannot resample; sending the call's rate");
                    None
                }
            }
        };
    }

    fn convert(&mut self, audio: &[i16]) -> Vec<i16> {
        match self.resampler.as_mut() {
            Some(r) => {
                let mut pcm = Vec::with_capacity(audio.len().saturating_mul(3));
                let _ = r.process(audio, &mut pcm);
                pcm
            }
            None => audio.to_vec(),
        }
    }

    /// What the resampler still holds (the end of a commit); it starts afresh after.
    fn flush(&mut self) -> Vec<i16> {
        let mut pcm = Vec::new();
        if let Some(r) = self.resampler.as_mut() {
            let _ = r.flush(&mut pcm);
            self.reset();
        }
        pcm
    }
}

/// Sends one event, within `SEND_LIMIT`.
async fn send(ws: &mut Ws, event: Value) -> Result<(), String> {
    match tokio::time::timeout(SEND_LIMIT, ws.send(Message::text(event.to_string()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the socket failed: {e}")),
        Err(_) => Err(format!(
            "the server took no data for {} ms",
            SEND_LIMIT.as_millis()
        )),
    }
}

/// The session's configuration: transcription only, no server VAD (sidecall ends turns).
fn session_update(s: &AsrStreamConfig, language: &str) -> Value {
    let mut transcription = json!({"model": s.model});
    if !language.is_empty() {
        transcription["language"] = json!(language);
    }
    if s.protocol == "beta" {
        json!({
            "type": "transcription_session.update",
            "session": {
                "input_audio_format": "pcm16",
                "input_audio_transcription": transcription,
                "turn_detection": null,
            }
        })
    } else {
        json!({
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": s.rate},
                    "transcription": transcription,
                    "turn_detection": null,
                }}
            }
        })
    }
}

fn encode(pcm: &[i16]) -> String {
    let bytes: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Acts on one server event; a reason when the session cannot go on.
fn on_event(
    ev: &Value,
    sent: &mut VecDeque<Sent>,
    items: &mut HashMap<String, Sent>,
) -> Option<String> {
    match str_of(ev, "type") {
        "input_audio_buffer.committed" => {
            let item = str_of(ev, "item_id");
            match sent.pop_front() {
                Some(s) if !item.is_empty() => {
                    items.insert(item.to_string(), s);
                }
                Some(s) => {
                    let _ = s.reply.send(Err(AsrError::BadResponse(
                        "a commit acknowledged without an item_id".into(),
                    )));
                }
                None => tracing::debug!(item, "streaming ASR: a commit nobody asked for"),
            }
        }
        "conversation.item.input_audio_transcription.completed" => {
            let item = str_of(ev, "item_id");
            match items.remove(item) {
                Some(s) => {
                    let text = match ev.get("transcript").and_then(Value::as_str) {
                        Some(t) => Ok(t.trim().to_string()),
                        None => Err(AsrError::BadResponse(
                            "a completed transcription without `transcript`".into(),
                        )),
                    };
                    let ms = u64::try_from(s.at.elapsed().as_millis()).unwrap_or(u64::MAX);
                    let _ = s.reply.send(text.map(|text| Transcript {
                        text,
                        queue_ms: 0,
                        process_ms: ms,
                        streamed: true,
                        fallback: None,
                    }));
                }
                None => tracing::debug!(item, "streaming ASR: a transcript for no known item"),
            }
        }
        "conversation.item.input_audio_transcription.failed" => {
            let item = str_of(ev, "item_id");
            let message = ev
                .get("error")
                .map(|e| str_of(e, "message").to_string())
                .unwrap_or_default();
            if let Some(s) = items.remove(item) {
                let _ = s.reply.send(Err(AsrError::Engine(format!(
                    "transcription failed: {message}"
                ))));
            }
        }
        "error" => {
            let err = ev.get("error").cloned().unwrap_or(Value::Null);
            let (code, message, event_id) = (
                str_of(&err, "code"),
                str_of(&err, "message"),
                str_of(&err, "event_id"),
            );
            tracing::warn!(
                code,
                message,
                event_id,
                "streaming ASR: the server reports an error"
            );
            // An error about one commit (before or after the server acknowledged it) fails
            // that commit only.
            let failed = |s: Sent| {
                let _ = s
                    .reply
                    .send(Err(AsrError::Engine(format!("{code}: {message}"))));
            };
            if !event_id.is_empty() {
                if let Some(i) = sent.iter().position(|s| s.event_id == event_id) {
                    if let Some(s) = sent.remove(i) {
                        failed(s);
                    }
                    return None;
                }
                let item = items
                    .iter()
                    .find(|(_, s)| s.event_id == event_id)
                    .map(|(k, _)| k.clone());
                if let Some(s) = item.and_then(|k| items.remove(&k)) {
                    failed(s);
                    return None;
                }
            }
            if code == "input_audio_buffer_commit_empty"
                && let Some(s) = sent.pop_front()
            {
                failed(s);
                return None;
            }
            // Anything else (the session refused, a bad key, an unknown event): this session
            // cannot be trusted to answer; the next utterance opens a new one.
            return Some(format!("the server reported an error: {code}: {message}"));
        }
        other => tracing::trace!(event = other, "streaming ASR event"),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(protocol: &str) -> AsrStreamConfig {
        AsrStreamConfig {
            url: "ws://127.0.0.1:9/v1/realtime?intent=transcription".into(),
            protocol: protocol.into(),
            ..AsrStreamConfig::default()
        }
    }

    #[test]
    fn the_session_is_transcription_only_without_server_vad() {
        let ga = session_update(&settings("ga"), "en");
        assert_eq!(ga["type"], "session.update");
        assert_eq!(ga["session"]["type"], "transcription");
        let input = &ga["session"]["audio"]["input"];
        assert_eq!(input["format"], json!({"type": "audio/pcm", "rate": 24000}));
        assert_eq!(input["transcription"]["model"], "gpt-4o-transcribe");
        assert_eq!(input["transcription"]["language"], "en");
        assert!(input["turn_detection"].is_null());
        let beta = session_update(&settings("beta"), "");
        assert_eq!(beta["type"], "transcription_session.update");
        assert_eq!(beta["session"]["input_audio_format"], "pcm16");
        assert!(
            beta["session"]["input_audio_transcription"]
                .get("language")
                .is_none()
        );
    }

    #[test]
    fn audio_goes_out_as_little_endian_base64() {
        let b = encode(&[1, -2, 0x1234]);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b)
            .unwrap_or_default();
        assert_eq!(raw, vec![1, 0, 0xfe, 0xff, 0x34, 0x12]);
    }

    #[test]
    fn events_answer_their_own_commits() {
        let mut sent = VecDeque::new();
        let mut items = HashMap::new();
        let mut answers = Vec::new();
        for i in 1..=3 {
            let (tx, rx) = oneshot::channel();
            sent.push_back(Sent {
                event_id: format!("sidecall_commit_{i}"),
                at: Instant::now(),
                reply: tx,
            });
            answers.push(rx);
        }
        let ev = |v: Value| v;
        assert!(
            on_event(
                &ev(json!({"type": "input_audio_buffer.committed", "item_id": "a"})),
                &mut sent,
                &mut items
            )
            .is_none()
        );
        // An error naming the second commit fails that one only.
        let err = json!({"type": "error", "error": {"code": "x", "message": "no", "event_id": "sidecall_commit_2"}});
        assert!(on_event(&err, &mut sent, &mut items).is_none());
        assert!(
            on_event(
                &ev(json!({"type": "input_audio_buffer.committed", "item_id": "c"})),
                &mut sent,
                &mut items
            )
            .is_none()
        );
        on_event(
            &json!({"type": "conversation.item.input_audio_transcription.delta", "item_id": "c", "delta": "good"}),
            &mut sent,
            &mut items,
        );
        on_event(
            &json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "c", "transcript": " goodbye "}),
            &mut sent,
            &mut items,
        );
        on_event(
            &json!({"type": "conversation.item.input_audio_transcription.failed", "item_id": "a", "error": {"message": "bad audio"}}),
            &mut sent,
            &mut items,
        );
        let mut got = answers.into_iter().map(|mut rx| rx.try_recv());
        let first = got.next();
        assert!(matches!(first, Some(Ok(Err(AsrError::Engine(m)))) if m.contains("bad audio")));
        assert!(matches!(got.next(), Some(Ok(Err(AsrError::Engine(m)))) if m.contains("no")));
        match got.next() {
            Some(Ok(Ok(t))) => {
                assert_eq!(t.text, "goodbye");
                assert!(t.streamed);
            }
            other => panic!("{other:?}"),
        }
        // An error about nothing sent ends the session.
        let fatal =
            json!({"type": "error", "error": {"code": "invalid_api_key", "message": "bad key"}});
        assert!(on_event(&fatal, &mut sent, &mut items).is_some());
    }

    #[test]
    fn a_commit_needs_the_audio_it_names() {
        let mut s = RealtimeStream {
            cfg: Arc::new(StreamSettings {
                stream: settings("ga"),
                language: "en".into(),
                api_key: None,
                retry_at: std::sync::Mutex::new(None),
            }),
            rate: 8000,
            conn: None,
            appended: 0,
            committed: 0,
        };
        let (tx, mut rx) = mpsc::channel(QUEUE);
        s.conn = Some(Conn {
            tx,
            alive: Arc::new(AtomicBool::new(true)),
            task: None,
        });
        s.appended = 8000;
        // Not where the last commit ended, past what was sent, or too short: the batch engine.
        assert!(s.commit(100, 4000).is_none());
        assert!(s.commit(0, 8001).is_none());
        assert!(s.commit(0, 400).is_none());
        assert!(s.commit(0, 4000).is_some());
        assert!(s.commit(0, 6000).is_none());
        assert!(s.commit(4000, 8000).is_some());
        let mut commits = 0;
        while let Ok(c) = rx.try_recv() {
            commits += usize::from(matches!(c, Cmd::Commit(_)));
        }
        assert_eq!(commits, 2);
        // A new utterance starts over.
        s.begin();
        assert_eq!((s.appended, s.committed), (0, 0));
        // A dead connection commits nothing.
        if let Some(c) = &s.conn {
            c.alive.store(false, Ordering::Relaxed);
        }
        s.appended = 8000;
        assert!(s.commit(0, 8000).is_none());
    }
}
