//! The model client: OpenAI-compatible chat completions (`POST {base}/chat/completions`,
//! `stream: true`), read as server-sent events (eventsource-stream) and put together by
//! `ChatStream`. Three deadlines: connect (the client), first token (request to the first
//! content or tool-call delta) and total (the whole stream). Works unchanged with OpenAI,
//! vLLM, llama.cpp's server, Ollama's `/v1` and Groq.

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::Secret;
use crate::engines::dialog::chat_stream::{AssembleError, ChatStream, ToolCall};

/// Why a model request failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("model request failed: {0}")]
    Request(String),
    #[error("model server answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("no first token within {0} ms")]
    FirstToken(u64),
    #[error("the stream did not end within {0} ms")]
    Total(u64),
    #[error("the stream broke: {0}")]
    Stream(String),
    #[error("the stream ended without [DONE] or a finish reason")]
    Truncated,
    #[error(transparent)]
    Malformed(#[from] AssembleError),
}

/// Where and how to ask the model.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    pub url: String,
    pub model: String,
    pub temperature: f32,
    pub max_tokens: u32,
    /// "max_tokens" or "max_completion_tokens".
    pub max_tokens_field: String,
    pub api_key: Option<Secret>,
    pub first_token_timeout: Duration,
    pub total_timeout: Duration,
}

/// A streamed completion, complete.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<String>,
    pub usage: Option<Value>,
}

type Events = Pin<
    Box<
        dyn Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

/// A completion being streamed: text as it comes, then the whole.
pub struct Streaming {
    events: Events,
    asm: ChatStream,
    /// Text that came with the first token, not yet handed out.
    held: Option<String>,
    out: Completion,
    total_by: Instant,
    total_ms: u64,
    done: bool,
    /// When the request went out and when its first token came.
    pub sent_at: Instant,
    pub first_at: Instant,
}

/// The model client (one per process; cheap to clone).
#[derive(Clone)]
pub struct ChatClient {
    http: reqwest::Client,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A client for the model with its own connect deadline (the shared client's is for other
/// engines).
pub fn client(connect_timeout: Duration) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default()
}

impl ChatClient {
    pub fn new(http: reqwest::Client) -> Self {
        Self { http }
    }

    /// Sends the request and waits for its first token (content or a tool call): the returned
    /// stream has it. Fails with the server's own message on an error status.
    pub async fn start(
        &self,
        s: &LlmSettings,
        messages: &[Value],
        tools: &[Value],
    ) -> Result<Streaming, LlmError> {
        let sent_at = Instant::now();
        let first_ms = ms(s.first_token_timeout);
        let first_by = sent_at + s.first_token_timeout;
        let mut body = json!({
            "model": s.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": s.temperature,
        });
        body[s.max_tokens_field.as_str()] = json!(s.max_tokens);
        if !tools.is_empty() {
            body["tools"] = Value::Array(tools.to_vec());
            body["tool_choice"] = json!("auto");
        }
        let mut req = self
            .http
            .post(crate::engines::endpoint(&s.url, "chat/completions"))
            .header("accept", "text/event-stream")
            .timeout(s.total_timeout)
            .json(&body);
        if let Some(k) = &s.api_key {
            req = req.bearer_auth(k.expose());
        }
        let resp = tokio::time::timeout_at(first_by, req.send())
            .await
            .map_err(|_| LlmError::FirstToken(first_ms))?
            .map_err(|e| {
                if e.is_timeout() {
                    LlmError::Total(ms(s.total_timeout))
                } else {
                    LlmError::Request(crate::engines::root_cause(&e))
                }
            })?;
        let status = resp.status();
        if !status.is_success() {
            let text = tokio::time::timeout(Duration::from_secs(2), resp.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .or_else(|| v.get("error"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(LlmError::Status {
                status: status.as_u16(),
                message,
            });
        }
        let mut st = Streaming {
            events: Box::pin(resp.bytes_stream().eventsource()),
            asm: ChatStream::new(),
            held: None,
            out: Completion::default(),
            total_by: sent_at + s.total_timeout,
            total_ms: ms(s.total_timeout),
            done: false,
            sent_at,
            first_at: sent_at,
        };
        // Up to the first token: role-only chunks, keep-alive comments and empty deltas do
        // not count.
        loop {
            match tokio::time::timeout_at(first_by, st.step()).await {
                Err(_) => return Err(LlmError::FirstToken(first_ms)),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Step::Text(t))) => {
                    st.held = Some(t);
                    break;
                }
                Ok(Ok(Step::Token)) => break,
                Ok(Ok(Step::Nothing)) => {}
                // A reply with no token at all (an empty completion) is still a reply.
                Ok(Ok(Step::End)) => break,
            }
        }
        st.first_at = Instant::now();
        Ok(st)
    }
}

enum Step {
    Text(String),
    /// A tool-call delta (no text).
    Token,
    Nothing,
    End,
}

impl Streaming {
    async fn step(&mut self) -> Result<Step, LlmError> {
        if self.done {
            return Ok(Step::End);
        }
        let ev = match self.events.next().await {
            None => {
                self.done = true;
                // Some servers close without [DONE] once they sent the finish reason.
                return if self.out.finish_reason.is_some() {
                    Ok(Step::End)
                } else {
                    Err(LlmError::Truncated)
                };
            }
            Some(Err(e)) => {
                self.done = true;
                return Err(LlmError::Stream(e.to_string()));
            }
            Some(Ok(ev)) => ev,
        };
        let data = ev.data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(Step::End);
        }
        if data.is_empty() {
            return Ok(Step::Nothing);
        }
        // An error object inside the stream (OpenAI and vLLM send these mid-stream).
        if data.starts_with("{\"error\"") {
            self.done = true;
            let message = serde_json::from_str::<Value>(data)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| data.chars().take(200).collect());
            return Err(LlmError::Stream(message));
        }
        let before = self.asm.tool_fragments();
        let delta = self.asm.push(data)?;
        if let Some(u) = delta.usage {
            self.out.usage = Some(u);
        }
        if let Some(f) = delta.finish_reason {
            self.out.finish_reason = Some(f);
        }
        match delta.content {
            Some(t) if !t.is_empty() => {
                self.out.text.push_str(&t);
                Ok(Step::Text(t))
            }
            _ if self.asm.tool_fragments() != before => Ok(Step::Token),
            _ => Ok(Step::Nothing),
        }
    }

    /// The next text of the reply; `None` once the stream has ended.
    pub async fn next_text(&mut self) -> Result<Option<String>, LlmError> {
        if let Some(t) = self.held.take() {
            return Ok(Some(t));
        }
        loop {
            let step = tokio::time::timeout_at(self.total_by, self.step())
                .await
                .map_err(|_| LlmError::Total(self.total_ms))??;
            match step {
                Step::Text(t) => return Ok(Some(t)),
                Step::End => return Ok(None),
                Step::Token | Step::Nothing => {}
            }
        }
    }

    /// The whole completion, tool calls assembled; call after `next_text` gave `None`.
    pub fn finish(mut self) -> Result<Completion, LlmError> {
        self.out.tool_calls = self.asm.finish()?;
        Ok(self.out)
    }
}
