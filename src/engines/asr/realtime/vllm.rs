//! vLLM's realtime transcription dialect (`vllm serve` with a realtime model such as Voxtral
//! Mini Realtime, WebSocket `/v1/realtime`), which is not OpenAI's protocol:
//! - the server greets with `session.created`; `session.update` names the model at the top
//!   level (`{"type": "session.update", "model": ...}`) and gets no answer (a model the server
//!   does not have shows as an `error` later);
//! - `input_audio_buffer.commit` *starts* a generation that transcribes the audio appended
//!   from then on as it comes (`transcription.delta`); `input_audio_buffer.commit` with
//!   `"final": true` ends its audio, and `transcription.done` carries the whole text;
//! - one generation at a time: a start while one runs is ignored, and audio appended before
//!   `transcription.done` of the last one is dropped by the server;
//! - audio is PCM16 at 16 kHz; errors are `{"type": "error", "error": "<message>", "code": ...}`.
//!
//! So each commit the call asks for ends the generation (its `final`), and the audio that
//! follows (the caller went on after a pause) is held until the server has said `done`, then
//! goes out in a new generation. A generation the server ends on its own (its token limit)
//! leaves the rest of that utterance to the batch engine.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::{Cmd, Connection, SEND_LIMIT, Ws, encode, send, str_of};
use crate::engines::asr::{AsrError, Transcript};

/// Audio held for the next generation while the server finishes the last one, at most (60 s
/// at 16 kHz): a server that never says `done` loses the session, not the call's memory.
const MAX_HELD_SAMPLES: usize = 16_000 * 60;

type Reply = oneshot::Sender<Result<Transcript, AsrError>>;

/// Where the server's generation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gen {
    /// None runs: the next audio starts one.
    Idle,
    /// Running: audio goes to it.
    Open,
    /// Its audio has ended (`final` sent): waiting for `transcription.done`.
    Closing,
}

/// What waits for the next generation while the last one closes.
enum Held {
    Audio { b64: String, samples: usize },
    Final(Reply),
}

/// A `final` sent: when, and the answer owed (`None`: nobody's, an utterance given up or a
/// generation that only clears the server's queue).
struct Owed {
    at: Instant,
    reply: Option<Reply>,
}

/// The dialect's state, apart from the socket: commands and server events in, events to send
/// out.
pub(super) struct Dialect {
    generation: Gen,
    /// One per `final` sent, oldest first.
    owed: VecDeque<Owed>,
    held: VecDeque<Held>,
    held_samples: usize,
    /// The server ended a generation on its own: the utterance's commits go to the batch engine.
    broken: bool,
    /// How long a `final` may wait for its `transcription.done` before the session is given up.
    done_limit: Duration,
}

fn start() -> Value {
    json!({"type": "input_audio_buffer.commit"})
}

fn finish() -> Value {
    json!({"type": "input_audio_buffer.commit", "final": true})
}

fn append(b64: String) -> Value {
    json!({"type": "input_audio_buffer.append", "audio": b64})
}

/// 20 ms of silence at 16 kHz (vLLM refuses empty audio).
fn silence() -> String {
    encode(&[0; 320])
}

impl Dialect {
    pub(super) fn new(done_limit: Duration) -> Self {
        Self {
            generation: Gen::Idle,
            owed: VecDeque::new(),
            held: VecDeque::new(),
            held_samples: 0,
            broken: false,
            done_limit,
        }
    }

    /// A new utterance: a generation still open is ended and its text dropped; audio held for
    /// the last utterance after its last commit is dropped (its commits still go out).
    pub(super) fn clear(&mut self) -> Vec<Value> {
        while matches!(self.held.back(), Some(Held::Audio { .. })) {
            if let Some(Held::Audio { samples, .. }) = self.held.pop_back() {
                self.held_samples = self.held_samples.saturating_sub(samples);
            }
        }
        self.broken = false;
        if self.generation == Gen::Open {
            self.owed.push_back(Owed {
                at: Instant::now(),
                reply: None,
            });
            self.generation = Gen::Closing;
            return vec![finish()];
        }
        Vec::new()
    }

    /// The utterance's next samples (already at 16 kHz, as base64).
    pub(super) fn append(&mut self, b64: String, samples: usize) -> Result<Vec<Value>, String> {
        if self.broken {
            // The batch engine has this utterance: nothing more goes to the server.
            return Ok(Vec::new());
        }
        match self.generation {
            Gen::Closing => {
                if self
                    .owed
                    .front()
                    .is_some_and(|o| o.at.elapsed() > self.done_limit)
                {
                    return Err(format!(
                        "no transcription.done within {} ms of the end of its audio",
                        self.done_limit.as_millis()
                    ));
                }
                self.held_samples = self.held_samples.saturating_add(samples);
                if self.held_samples > MAX_HELD_SAMPLES {
                    return Err("the server never finished the last transcription".into());
                }
                self.held.push_back(Held::Audio { b64, samples });
                Ok(Vec::new())
            }
            Gen::Idle => {
                self.generation = Gen::Open;
                Ok(vec![start(), append(b64)])
            }
            Gen::Open => Ok(vec![append(b64)]),
        }
    }

    /// The audio since the last commit is to be transcribed: its generation ends.
    pub(super) fn commit(&mut self, reply: Reply) -> Vec<Value> {
        let refuse = |reply: Reply, why: &str| {
            let _ = reply.send(Err(AsrError::Engine(why.into())));
        };
        if self.broken {
            refuse(reply, "the server ended the transcription early");
            return Vec::new();
        }
        match self.generation {
            Gen::Open => {
                self.owed.push_back(Owed {
                    at: Instant::now(),
                    reply: Some(reply),
                });
                self.generation = Gen::Closing;
                vec![finish()]
            }
            Gen::Closing if matches!(self.held.back(), Some(Held::Audio { .. })) => {
                self.held.push_back(Held::Final(reply));
                Vec::new()
            }
            _ => {
                refuse(reply, "no audio since the last commit");
                Vec::new()
            }
        }
    }

    /// One server event; `Err`: the session cannot go on.
    pub(super) fn on_event(&mut self, ev: &Value) -> Result<Vec<Value>, String> {
        match str_of(ev, "type") {
            "transcription.done" => {
                let text = ev.get("text").and_then(Value::as_str).map(str::trim);
                let Some(owed) = self.owed.pop_front() else {
                    // Ended by the server (its token limit) while its audio went on: what it
                    // heard of this utterance is incomplete, and the audio sent since it
                    // cleared its queue would open the next generation. A generation of
                    // nobody's takes that audio away.
                    tracing::debug!("streaming ASR (vLLM): a generation ended on its own");
                    self.broken = true;
                    self.held.clear();
                    self.held_samples = 0;
                    self.owed.push_back(Owed {
                        at: Instant::now(),
                        reply: None,
                    });
                    self.generation = Gen::Closing;
                    return Ok(vec![start(), append(silence()), finish()]);
                };
                if let Some(reply) = owed.reply {
                    let ms = u64::try_from(owed.at.elapsed().as_millis()).unwrap_or(u64::MAX);
                    let answer = match text {
                        None => Err(AsrError::BadResponse(
                            "transcription.done without `text`".into(),
                        )),
                        // The server may have ended the generation before its audio did (its
                        // token limit): an empty text is not trusted; the batch engine checks.
                        Some("") => Err(AsrError::Engine(
                            "an empty transcription (the generation may have ended early)".into(),
                        )),
                        Some(t) => Ok(Transcript {
                            text: t.to_string(),
                            queue_ms: 0,
                            process_ms: ms,
                            streamed: true,
                            fallback: None,
                        }),
                    };
                    let _ = reply.send(answer);
                }
                if self.generation == Gen::Closing && self.owed.is_empty() {
                    self.generation = Gen::Idle;
                    return Ok(self.replay());
                }
                Ok(Vec::new())
            }
            "error" => Err(format!(
                "the server reported an error: {}: {}",
                str_of(ev, "code"),
                str_of(ev, "error")
            )),
            other => {
                tracing::trace!(event = other, "streaming ASR (vLLM) event");
                Ok(Vec::new())
            }
        }
    }

    /// What waited for the last generation to close goes out, up to the next `final`.
    fn replay(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(h) = self.held.pop_front() {
            match h {
                Held::Audio { b64, samples } => {
                    self.held_samples = self.held_samples.saturating_sub(samples);
                    if self.generation == Gen::Idle {
                        out.push(start());
                        self.generation = Gen::Open;
                    }
                    out.push(append(b64));
                }
                Held::Final(reply) => {
                    self.owed.push_back(Owed {
                        at: Instant::now(),
                        reply: Some(reply),
                    });
                    self.generation = Gen::Closing;
                    out.push(finish());
                    break;
                }
            }
        }
        out
    }

    /// Every answer still owed fails with `why`.
    pub(super) fn fail_all(&mut self, why: &str) {
        for h in self.held.drain(..) {
            if let Held::Final(reply) = h {
                let _ = reply.send(Err(AsrError::Engine(why.into())));
            }
        }
        self.held_samples = 0;
        for reply in self.owed.drain(..).filter_map(|o| o.reply) {
            let _ = reply.send(Err(AsrError::Engine(why.into())));
        }
    }
}

/// Opens the session: waits for `session.created`, names the model.
pub(super) async fn configure(ws: &mut Ws, model: &str) -> Result<(), String> {
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => return Err("the server closed the socket".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(_)) => continue,
        };
        let ev: Value = serde_json::from_str(text.as_str())
            .map_err(|_| format!("an event that is not JSON: {:.120}", text.as_str()))?;
        match str_of(&ev, "type") {
            "session.created" => break,
            "error" => return Err(format!("the server refused: {}", str_of(&ev, "error"))),
            _ => {}
        }
    }
    send(ws, json!({"type": "session.update", "model": model})).await
}

impl Connection {
    /// Relays the call's commands and the server's events in vLLM's dialect; the reason it
    /// stopped, if the socket failed.
    pub(super) async fn serve_vllm(
        &self,
        mut ws: Ws,
        rx: &mut mpsc::Receiver<Cmd>,
    ) -> Option<String> {
        let mut pcm_out = self.outgoing();
        // A `final` gets its `done` within the stream's timeout, or the session is given up.
        let done_limit = Duration::from_millis(self.cfg.stream.timeout_ms.saturating_mul(2));
        let mut d = Dialect::new(done_limit);
        loop {
            let out = tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else {
                        d.fail_all("the call ended");
                        let _ = tokio::time::timeout(SEND_LIMIT, ws.close(None)).await;
                        return None;
                    };
                    match cmd {
                        Cmd::Clear => {
                            pcm_out.reset();
                            Ok(d.clear())
                        }
                        Cmd::Append(audio) => {
                            let pcm = pcm_out.convert(&audio);
                            if pcm.is_empty() {
                                continue;
                            }
                            d.append(encode(&pcm), pcm.len())
                        }
                        Cmd::Commit(reply) => {
                            // What the resampler holds back belongs to this commit.
                            let pcm = pcm_out.flush();
                            let tail = if pcm.is_empty() {
                                Ok(Vec::new())
                            } else {
                                d.append(encode(&pcm), pcm.len())
                            };
                            match tail {
                                Ok(mut out) => {
                                    out.extend(d.commit(reply));
                                    Ok(out)
                                }
                                Err(why) => {
                                    let _ = reply.send(Err(AsrError::Engine(why.clone())));
                                    Err(why)
                                }
                            }
                        }
                    }
                }
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_) | Message::Binary(_))) => continue,
                        Some(Ok(Message::Close(frame))) => {
                            let why = format!("the server closed the socket ({})", frame.map(|f| f.reason.to_string()).unwrap_or_default());
                            d.fail_all(&why);
                            return Some(why);
                        }
                        Some(Err(e)) => {
                            let why = format!("the socket failed: {e}");
                            d.fail_all(&why);
                            return Some(why);
                        }
                        None => {
                            let why = "the server dropped the socket".to_string();
                            d.fail_all(&why);
                            return Some(why);
                        }
                    };
                    match serde_json::from_str::<Value>(text.as_str()) {
                        Ok(ev) => d.on_event(&ev),
                        Err(_) => {
                            tracing::warn!(text = %text.as_str().chars().take(120).collect::<String>(), "streaming ASR: an event that is not JSON; ignored");
                            continue;
                        }
                    }
                }
            };
            let events = match out {
                Ok(events) => events,
                Err(why) => {
                    d.fail_all(&why);
                    let _ = tokio::time::timeout(SEND_LIMIT, ws.close(None)).await;
                    return Some(why);
                }
            };
            for ev in events {
                if let Err(why) = send(&mut ws, ev).await {
                    d.fail_all(&why);
                    return Some(why);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(events: &[Value]) -> Vec<String> {
        events
            .iter()
            .map(|e| match (str_of(e, "type"), e.get("final")) {
                ("input_audio_buffer.commit", Some(_)) => "final".to_string(),
                ("input_audio_buffer.commit", None) => "start".to_string(),
                ("input_audio_buffer.append", _) => "append".to_string(),
                (t, _) => t.to_string(),
            })
            .collect()
    }

    fn done(text: &str) -> Value {
        json!({"type": "transcription.done", "text": text, "usage": null})
    }

    fn text(rx: &mut oneshot::Receiver<Result<Transcript, AsrError>>) -> Result<String, String> {
        match rx.try_recv() {
            Ok(Ok(t)) => Ok(t.text),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("no answer: {e}")),
        }
    }

    #[test]
    fn each_commit_is_a_generation_and_what_follows_waits_for_its_end() {
        let mut d = Dialect::new(Duration::from_secs(4));
        assert_eq!(kinds(&d.clear()), Vec::<String>::new());
        let out = d.append("a".into(), 320).unwrap_or_default();
        assert_eq!(kinds(&out), ["start", "append"]);
        assert_eq!(
            kinds(&d.append("b".into(), 320).unwrap_or_default()),
            ["append"]
        );
        // A pause: the generation ends.
        let (tx, mut first) = oneshot::channel();
        assert_eq!(kinds(&d.commit(tx)), ["final"]);
        // The caller goes on before the server is done: held.
        assert!(d.append("c".into(), 320).unwrap_or_default().is_empty());
        let (tx, mut second) = oneshot::channel();
        assert!(d.commit(tx).is_empty(), "its final waits too");
        assert!(d.append("d".into(), 320).unwrap_or_default().is_empty());
        // The first is done: its text answers the first commit, what was held goes out in a
        // new generation up to its final; the rest waits again.
        let out = d
            .on_event(&done(" my order number is "))
            .unwrap_or_default();
        assert_eq!(kinds(&out), ["start", "append", "final"]);
        assert_eq!(text(&mut first), Ok("my order number is".into()));
        assert!(text(&mut second).is_err(), "not yet");
        let out = d
            .on_event(&done("five five four two one"))
            .unwrap_or_default();
        assert_eq!(kinds(&out), ["start", "append"]);
        assert_eq!(text(&mut second), Ok("five five four two one".into()));
        // A new utterance ends the open generation; its text is nobody's.
        assert_eq!(kinds(&d.clear()), ["final"]);
        assert!(d.on_event(&done("lost")).unwrap_or_default().is_empty());
        assert_eq!(
            kinds(&d.append("e".into(), 320).unwrap_or_default()),
            ["start", "append"]
        );
    }

    #[test]
    fn a_generation_the_server_ends_alone_leaves_the_utterance_to_the_batch_engine() {
        let mut d = Dialect::new(Duration::from_secs(4));
        let _ = d.append("a".into(), 320);
        // Ended by the server: a generation of nobody's takes away what was sent since.
        let out = d.on_event(&done("partial")).unwrap_or_default();
        assert_eq!(kinds(&out), ["start", "append", "final"]);
        assert!(d.append("b".into(), 320).unwrap_or_default().is_empty());
        let (tx, mut rx) = oneshot::channel();
        assert!(d.commit(tx).is_empty());
        assert!(text(&mut rx).is_err_and(|e| e.contains("early")));
        assert!(d.on_event(&done("")).unwrap_or_default().is_empty());
        // The next utterance streams again.
        let _ = d.clear();
        assert_eq!(
            kinds(&d.append("c".into(), 320).unwrap_or_default()),
            ["start", "append"]
        );
        let (tx, mut rx) = oneshot::channel();
        assert_eq!(kinds(&d.commit(tx)), ["final"]);
        let _ = d.on_event(&done("yes"));
        assert_eq!(text(&mut rx), Ok("yes".into()));
    }

    #[test]
    fn a_new_utterance_keeps_the_commits_still_held() {
        let mut d = Dialect::new(Duration::from_secs(4));
        let _ = d.append("a".into(), 320);
        let (tx, mut first) = oneshot::channel();
        let _ = d.commit(tx);
        // The end of the turn comes while the pause's transcription is still out.
        let _ = d.append("b".into(), 320);
        let (tx, mut last) = oneshot::channel();
        assert!(d.commit(tx).is_empty());
        let _ = d.append("trailing".into(), 320);
        // The next utterance: only the audio after the last commit is dropped.
        assert!(d.clear().is_empty());
        let out = d.on_event(&done("my number is")).unwrap_or_default();
        assert_eq!(kinds(&out), ["start", "append", "final"]);
        assert_eq!(out[1]["audio"], "b");
        assert_eq!(text(&mut first), Ok("my number is".into()));
        let out = d.on_event(&done("five five")).unwrap_or_default();
        assert!(out.is_empty(), "nothing of the next utterance yet");
        assert_eq!(text(&mut last), Ok("five five".into()));
    }

    #[test]
    fn an_empty_or_textless_done_is_not_a_transcript_and_a_missing_one_ends_the_session() {
        let mut d = Dialect::new(Duration::from_millis(50));
        for ev in [json!({"type": "transcription.done"}), done("  ")] {
            let _ = d.append("a".into(), 320);
            let (tx, mut rx) = oneshot::channel();
            let _ = d.commit(tx);
            let _ = d.on_event(&ev);
            assert!(text(&mut rx).is_err(), "{ev}");
        }
        // A final whose done never comes: the session is given up once the caller goes on.
        let _ = d.append("a".into(), 320);
        let (tx, _rx) = oneshot::channel();
        let _ = d.commit(tx);
        assert!(d.append("b".into(), 320).is_ok(), "held meanwhile");
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            d.append("c".into(), 320)
                .is_err_and(|e| e.contains("transcription.done"))
        );
    }

    #[test]
    fn errors_end_the_session_and_fail_what_is_owed() {
        let mut d = Dialect::new(Duration::from_secs(4));
        let _ = d.append("a".into(), 320);
        let (tx, mut owed) = oneshot::channel();
        let _ = d.commit(tx);
        let _ = d.append("b".into(), 320);
        let (tx, mut held) = oneshot::channel();
        let _ = d.commit(tx);
        let err = json!({"type": "error", "error": "Model not validated.", "code": "model_not_validated"});
        let why = d.on_event(&err).err().unwrap_or_default();
        assert!(why.contains("model_not_validated"), "{why}");
        d.fail_all(&why);
        assert!(text(&mut owed).is_err_and(|e| e.contains("model_not_validated")));
        assert!(text(&mut held).is_err_and(|e| e.contains("model_not_validated")));
        // A commit with no audio since the last is refused at once.
        let mut d = Dialect::new(Duration::from_secs(4));
        let (tx, mut rx) = oneshot::channel();
        assert!(d.commit(tx).is_empty());
        assert!(text(&mut rx).is_err());
        // A server that never says done cannot make the call hold audio for ever.
        let mut d = Dialect::new(Duration::from_secs(4));
        let _ = d.append("a".into(), 320);
        let (tx, _rx) = oneshot::channel();
        let _ = d.commit(tx);
        let mut result = Ok(Vec::new());
        for _ in 0..=MAX_HELD_SAMPLES / 320 {
            result = d.append("x".into(), 320);
            if result.is_err() {
                break;
            }
        }
        assert!(result.is_err());
    }
}
