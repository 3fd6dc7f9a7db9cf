//! The LLM agent: a dialog engine that streams a model's reply into speakable pieces (the
//! caller hears the first sentence while the rest is generated), runs the model's tool calls
//! (transfers to allow-listed targets only, hang-up after the farewell, keys, keypad entry,
//! HTTP webhooks, confirmed read-backs for money and account state), keeps the conversation
//! (the system prompt with call variables, keys as user input, history cut to what the caller
//! heard, a bounded window) and falls back safely: a filler when the model is slow, a fallback
//! prompt when it fails, a human after repeated failures.

pub mod conversation;
pub mod llm;
pub mod profile;
pub mod tools;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::{Config, LlmConfig};
use crate::engines::dialog::chat_stream::ToolCall;
use crate::engines::dialog::entities::{self, YesNo};
use crate::engines::dialog::pieces::PieceSplitter;
use crate::engines::dialog::{
    Ask, DialogError, DigitSpec, Expectation, Heard, Input, LlmStats, Next, ReplyPart, ReplySink,
    Segment, Spoken, prompt,
};
use crate::pbx::CallArgs;
use llm::{ChatClient, LlmError, LlmSettings};
use profile::AgentProfile;

/// Errors of the agent layer (profiles).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent profile {path}: {message}")]
    Profile { path: String, message: String },
}

/// Pieces shorter than this end only at a sentence end; longer ones also at a clause end.
const CLAUSE_MIN: usize = 40;
/// The longest piece sent to TTS at once.
const PIECE_MAX: usize = 220;
/// Consecutive silences before the caller goes to a human.
const MAX_NO_INPUT: u32 = 3;
/// Read-backs asked again when the answer is neither yes nor no.
const CONFIRM_ASKS: u32 = 2;
/// Words in a row shared with the system prompt that make a reply a leak of its instructions.
const LEAK_WORDS: usize = 10;
/// Said instead of a reply that reads out the agent's instructions.
const LEAK_REFUSAL: &str = "Sorry, I can't share that.";

/// Lowercase words (letters and digits only).
fn words_of(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The text without its quoted passages: lines the prompt gives the model to say are not
/// secret.
fn unquoted(text: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                out.push(' ');
            }
            '“' => {
                quoted = true;
                out.push(' ');
            }
            '”' => {
                quoted = false;
                out.push(' ');
            }
            c if !quoted => out.push(c),
            _ => {}
        }
    }
    out
}

/// Every run of `LEAK_WORDS` words of `text`.
fn shingles(words: &[String]) -> std::collections::HashSet<String> {
    words.windows(LEAK_WORDS).map(|w| w.join(" ")).collect()
}

/// What the agent needs from the process: the model client and the webhook client.
#[derive(Clone)]
pub struct AgentEngines {
    pub chat: ChatClient,
    pub http: reqwest::Client,
}

/// How a turn of the agent ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The reply is complete: keys to send, then what happens.
    End {
        send_dtmf: Option<String>,
        next: Next,
    },
    /// The model handed the call back to the flow it came from.
    Handback,
}

/// A reply being streamed to the call, shared by engines that take turns in one reply (a flow
/// handing over to the agent).
pub struct ReplyOut<'a> {
    pub sink: &'a ReplySink,
    begun: bool,
    barge_in: bool,
    /// Words said in this reply so far.
    pub words: usize,
}

impl<'a> ReplyOut<'a> {
    pub fn new(sink: &'a ReplySink, barge_in: bool) -> Self {
        Self {
            sink,
            begun: false,
            barge_in,
            words: 0,
        }
    }

    /// Whether anything was said yet.
    pub fn said(&self) -> bool {
        self.words > 0
    }

    pub async fn say(&mut self, text: &str) -> Result<(), DialogError> {
        for seg in prompt::segments(text) {
            self.segment(seg).await?;
        }
        Ok(())
    }

    pub async fn segment(&mut self, seg: Segment) -> Result<(), DialogError> {
        if seg.text.trim().is_empty() && seg.pause_after_ms == 0 {
            return Ok(());
        }
        if !self.begun {
            self.begun = true;
            self.sink
                .send(ReplyPart::Begin {
                    barge_in: self.barge_in,
                })
                .await?;
        }
        self.words = self
            .words
            .saturating_add(seg.text.split_whitespace().count());
        self.sink.send(ReplyPart::Say(seg)).await
    }

    pub async fn end(&mut self, send_dtmf: Option<String>, next: Next) -> Result<(), DialogError> {
        if !self.begun {
            self.begun = true;
            self.sink
                .send(ReplyPart::Begin {
                    barge_in: self.barge_in,
                })
                .await?;
        }
        self.sink.send(ReplyPart::End { send_dtmf, next }).await
    }

    pub async fn note(&self, kind: &'static str, fields: Value) {
        let _ = self.sink.send(ReplyPart::Note { kind, fields }).await;
    }
}

/// A tool call waiting for the caller.
#[derive(Debug, Clone)]
enum Pending {
    /// `collect_digits`: the next keys are its result.
    Digits { id: String },
    /// A `confirm = true` webhook: runs only after a yes to the read-back.
    Confirm { call: ToolCall, asked: u32 },
}

/// A webhook request in flight.
struct Running {
    id: String,
    name: String,
    arguments: Value,
    task: tokio::task::JoinHandle<tools::WebhookResult>,
    limit_ms: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The call is over (the agent dropped): nothing will read the result.
        self.task.abort();
    }
}

/// Marks a spoken entry as model text not yet committed to history.
const UNCOMMITTED: usize = usize::MAX;

/// The agent for one call.
pub struct Agent {
    profile: Arc<AgentProfile>,
    llm: LlmConfig,
    settings: LlmSettings,
    engines: AgentEngines,
    call_id: String,
    human_target: String,
    disclosure: String,
    /// What the agent says before each allowed transfer when the model said nothing.
    announce: BTreeMap<String, String>,
    /// The system prompt, filled.
    system: String,
    tools: Arc<Vec<Value>>,
    can_hand_back: bool,
    history: Vec<Value>,
    /// Model text streamed in this reply and not yet in history (a turn cut short).
    inflight: String,
    /// What the last reply said, in order: (history index of model text, words).
    spoken: Vec<(Option<usize>, usize)>,
    pending: Option<Pending>,
    failures: u32,
    no_inputs: u32,
    tool_seq: u64,
    /// Keys the model sent mid-turn, sent once this reply has played.
    pending_dtmf: Option<String>,
    /// A webhook request in flight (kept across a turn cut short).
    running: Option<Running>,
    /// Confirmed tool calls whose request is in flight.
    confirmed: std::collections::HashSet<String>,
    /// Tool records from a turn cut short, written with the next reply.
    late_notes: Vec<Value>,
    /// Runs of words of the system prompt: a reply that repeats one is not spoken.
    secret: std::collections::HashSet<String>,
    /// A copy making a reply ahead (`Dialog::fork`): no tools.
    ahead: bool,
}

/// The model's time in one turn.
#[derive(Default)]
struct TurnClock {
    first_sent: Option<Instant>,
    stats: LlmStats,
    filler_said: bool,
    /// The model's own words were said this turn (a filler does not count).
    model_said: bool,
}

impl Agent {
    /// An agent for one call. `slots`: values a flow collected before handing the call over.
    pub fn new(
        cfg: &Config,
        profile: Arc<AgentProfile>,
        engines: AgentEngines,
        call_id: &str,
        args: &CallArgs,
        slots: &BTreeMap<String, String>,
        can_hand_back: bool,
    ) -> Self {
        let f = &profile.file;
        let settings = LlmSettings {
            url: cfg.llm.url.clone(),
            model: f.model.clone().unwrap_or_else(|| cfg.llm.model.clone()),
            temperature: f.temperature.unwrap_or(cfg.llm.temperature),
            max_tokens: f.max_tokens.unwrap_or(cfg.llm.max_tokens),
            max_tokens_field: cfg.llm.max_tokens_field.clone(),
            api_key: cfg.llm.api_key.clone(),
            first_token_timeout: Duration::from_millis(cfg.llm.first_token_timeout_ms),
            total_timeout: Duration::from_millis(cfg.llm.timeout_ms),
        };
        let mut tools = Vec::new();
        if cfg.llm.tools {
            tools = tools::builtins(&f.transfers, can_hand_back);
            for (name, t) in &f.tools {
                tools.push(tools::webhook(name, t));
            }
        }
        let announce = f
            .transfers
            .keys()
            .map(|n| {
                let a = cfg
                    .transfers
                    .get(n)
                    .and_then(|t| t.announce.clone())
                    .unwrap_or_else(|| "Transferring you now.".into());
                (n.clone(), a)
            })
            .collect();
        let system = render_system(&f.system_prompt, call_id, args, slots, &f.transfers);

        Self {
            disclosure: f
                .disclosure
                .clone()
                .unwrap_or_else(|| cfg.call.disclosure.clone()),
            llm: cfg.llm.clone(),
            settings,
            engines,
            call_id: call_id.to_string(),
            human_target: cfg.call.human_target.clone(),
            announce,
            system,
            tools: Arc::new(tools),
            can_hand_back,
            history: Vec::new(),
            inflight: String::new(),
            spoken: Vec::new(),
            pending: None,
            failures: 0,
            no_inputs: 0,
            tool_seq: 0,
            pending_dtmf: None,
            running: None,
            confirmed: Default::default(),
            late_notes: Vec::new(),
            secret: shingles(&words_of(&unquoted(&profile.file.system_prompt))),
            profile,
            ahead: false,
        }
    }

    /// A copy that makes a reply ahead of the caller's confirmed turn: the model is asked with
    /// the same history, but any tool call ends it (`NotAhead`). `None` while a webhook runs or
    /// the agent waits on the caller for a tool (keys, a yes to a read-back).
    pub fn ahead_copy(&self) -> Option<Agent> {
        if self.running.is_some() || self.pending.is_some() {
            return None;
        }
        Some(Agent {
            profile: self.profile.clone(),
            llm: self.llm.clone(),
            settings: self.settings.clone(),
            engines: self.engines.clone(),
            call_id: self.call_id.clone(),
            human_target: self.human_target.clone(),
            disclosure: self.disclosure.clone(),
            announce: self.announce.clone(),
            system: self.system.clone(),
            tools: self.tools.clone(),
            can_hand_back: self.can_hand_back,
            history: self.history.clone(),
            inflight: self.inflight.clone(),
            spoken: self.spoken.clone(),
            pending: None,
            failures: self.failures,
            no_inputs: self.no_inputs,
            tool_seq: self.tool_seq,
            pending_dtmf: self.pending_dtmf.clone(),
            running: None,
            confirmed: self.confirmed.clone(),
            late_notes: self.late_notes.clone(),
            secret: self.secret.clone(),
            ahead: true,
        })
    }

    /// The copy, confirmed: it is the agent now, tools and all.
    pub fn confirmed(&mut self) {
        self.ahead = false;
    }

    /// Makes replies ahead only (an agent created inside a copy).
    pub fn mark_ahead(&mut self) {
        self.ahead = true;
    }

    /// The longest one turn may take (see `turn_limit`).
    pub fn turn_limit(&self) -> Duration {
        turn_limit(&self.llm, &self.profile)
    }

    /// The messages of the next request: the system prompt, then the newest history that fits
    /// the window, starting at a caller's message (a tool result never loses its call).
    fn messages(&self) -> Vec<Value> {
        let max = self.llm.history_messages;
        let mut start = self.history.len().saturating_sub(max);
        // A caller's message, or the very first message (the greeting).
        while start > 0 && start < self.history.len() && self.history[start]["role"] != "user" {
            start += 1;
        }
        if start >= self.history.len() {
            // No caller message fits: keep from the last one.
            start = self
                .history
                .iter()
                .rposition(|m| m["role"] == "user")
                .unwrap_or(0);
        }
        let mut out = Vec::with_capacity(self.history.len() - start + 1);
        out.push(json!({"role": "system", "content": self.system}));
        out.extend(self.history[start..].iter().cloned());
        out
    }

    /// Every tool call in history gets a result before the next request (a turn cut short by
    /// the caller left some without one).
    fn repair(&mut self) {
        let mut i = 0;
        while i < self.history.len() {
            let ids: Vec<String> = self.history[i]
                .get("tool_calls")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.get("id").and_then(Value::as_str).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let mut j = i + 1;
            let mut answered = Vec::new();
            while j < self.history.len() && self.history[j]["role"] == "tool" {
                if let Some(id) = self.history[j].get("tool_call_id").and_then(Value::as_str) {
                    answered.push(id.to_string());
                }
                j += 1;
            }
            for id in ids.iter().filter(|id| !answered.contains(id)) {
                let waiting = match &self.pending {
                    Some(Pending::Digits { id: p }) => p == id,
                    Some(Pending::Confirm { call, .. }) => &call.id == id,
                    None => false,
                };
                if waiting {
                    continue;
                }
                self.history.insert(
                    j,
                    json!({"role": "tool", "tool_call_id": id,
                           "content": json!({"error": "not done: the caller interrupted"}).to_string()}),
                );
                j += 1;
            }
            i = j.max(i + 1);
        }
    }

    fn tool_result(&mut self, id: &str, content: &Value) {
        self.history.push(json!({
            "role": "tool",
            "tool_call_id": id,
            "content": content.to_string(),
        }));
    }

    /// Says something that is not model text (a filler, a prompt of the agent's own).
    async fn say(&mut self, out: &mut ReplyOut<'_>, text: &str) -> Result<(), DialogError> {
        let before = out.words;
        out.say(text).await?;
        self.spoken.push((None, out.words - before));
        Ok(())
    }

    /// One turn: the reply to `ask`, streamed into `out`.
    pub async fn turn(
        &mut self,
        ask: AgentAsk,
        out: &mut ReplyOut<'_>,
    ) -> Result<Outcome, DialogError> {
        self.settle_running(out).await;
        for note in std::mem::take(&mut self.late_notes) {
            out.note("tool_call", note).await;
        }
        self.commit_inflight();
        self.spoken.clear();
        if out.words > 0 {
            self.spoken.push((None, out.words));
        }
        let mut clock = TurnClock::default();
        match ask {
            AgentAsk::Open => {
                let disclosure = self.disclosure.clone();
                if !disclosure.trim().is_empty() {
                    self.say(out, &disclosure).await?;
                }
                if let Some(g) = self.profile.file.greeting.clone() {
                    self.say(out, &g).await?;
                    self.history
                        .push(json!({"role": "assistant", "content": g}));
                    return Ok(Outcome::End {
                        send_dtmf: None,
                        next: Next::Listen(self.expect()),
                    });
                }
                self.history.push(json!({"role": "user", "content": "[The call has just been answered. Greet the caller.]"}));
            }
            AgentAsk::HandedOver { disclosed } => {
                // The caller learns they speak with an AI before the model's first words.
                let disclosure = match &self.profile.file.disclosure {
                    Some(d) => Some(d.clone()),
                    None if !disclosed => Some(self.disclosure.clone()),
                    None => None,
                };
                if let Some(d) = disclosure.filter(|d| !d.trim().is_empty()) {
                    self.say(out, &d).await?;
                }
                self.history.push(json!({"role": "user", "content": "[The automated menu has handed the call to you. Carry on helping the caller.]"}));
            }
            AgentAsk::Input(input) => {
                if let Some(p) = self.pending.take() {
                    if let Some(o) = self.resolve(p, input, out, &mut clock).await? {
                        return Ok(o);
                    }
                } else {
                    match input {
                        Input::Speech(t) => {
                            self.no_inputs = 0;
                            self.history.push(json!({"role": "user", "content": t}));
                        }
                        Input::Digits(d) => {
                            self.no_inputs = 0;
                            self.history.push(json!({"role": "user",
                                "content": format!("[The caller typed on the keypad: {d}]")}));
                        }
                        Input::NoInput => {
                            self.no_inputs += 1;
                            if self.no_inputs >= MAX_NO_INPUT {
                                let p = self.llm.escalate_prompt.clone();
                                self.say(out, &p).await?;
                                return Ok(self.to_human());
                            }
                            self.history.push(json!({"role": "user",
                                "content": "[The caller said nothing for a while.]"}));
                        }
                    }
                }
            }
        }
        self.rounds(out, &mut clock).await
    }

    /// What the agent listens for after a reply (the profile's pausing choice with it).
    fn expect(&self) -> Expectation {
        Expectation {
            pause_on_voice: self.profile.file.pause_on_voice,
            ..Expectation::default()
        }
    }

    fn to_human(&self) -> Outcome {
        Outcome::End {
            send_dtmf: None,
            next: Next::Transfer {
                target: self.human_target.clone(),
            },
        }
    }

    /// The caller's answer to a tool that waited for them. `Some` ends the turn here.
    async fn resolve(
        &mut self,
        p: Pending,
        input: Input,
        out: &mut ReplyOut<'_>,
        clock: &mut TurnClock,
    ) -> Result<Option<Outcome>, DialogError> {
        match p {
            Pending::Digits { id } => {
                let content = match input {
                    Input::Digits(d) => json!({"digits": d}),
                    Input::Speech(t) => {
                        json!({"error": "the caller spoke instead of typing", "caller_said": t})
                    }
                    Input::NoInput => json!({"error": "no keys were pressed"}),
                };
                self.tool_result(&id, &content);
                Ok(None)
            }
            Pending::Confirm { call, asked } => {
                let answer = match &input {
                    Input::Speech(t) => entities::yes_no(t).map(|(v, _)| v),
                    Input::Digits(d) if d == "1" => Some(YesNo::Yes),
                    Input::Digits(d) if d == "2" => Some(YesNo::No),
                    _ => None,
                };
                let said = match &input {
                    Input::Speech(t) => t.clone(),
                    Input::Digits(d) => format!("[keys {d}]"),
                    Input::NoInput => String::new(),
                };
                match answer {
                    Some(YesNo::Yes) => {
                        self.confirmed.insert(call.id.clone());
                        let result = self.run_webhook(&call, out, clock).await?;
                        self.confirmed.remove(&call.id);
                        let mut content = result;
                        content["confirmed_by_caller"] = json!(true);
                        self.tool_result(&call.id, &content);
                        Ok(None)
                    }
                    None if asked + 1 < CONFIRM_ASKS => {
                        let text = format!("{} Please say yes or no.", self.read_back(&call));
                        self.say(out, &text).await?;
                        self.pending = Some(Pending::Confirm {
                            call,
                            asked: asked + 1,
                        });
                        Ok(Some(Outcome::End {
                            send_dtmf: None,
                            next: Next::Listen(Expectation {
                                pause_on_voice: self.profile.file.pause_on_voice,
                                ..yes_no()
                            }),
                        }))
                    }
                    _ => {
                        out.note(
                            "tool_call",
                            json!({"name": call.name, "ok": false, "declined": true}),
                        )
                        .await;
                        self.tool_result(
                            &call.id,
                            &json!({"error": "not done: the caller did not confirm", "caller_said": said}),
                        );
                        Ok(None)
                    }
                }
            }
        }
    }

    fn read_back(&self, call: &ToolCall) -> String {
        let t = self.profile.file.tools.get(&call.name);
        match t.and_then(|t| t.confirm_prompt.as_deref()) {
            Some(p) => tools::fill(p, &call.arguments, false),
            None => {
                let what = t.map(|t| t.description.clone()).unwrap_or_default();
                let args = call
                    .arguments
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{}: {}", k.replace('_', " "), tools::text_of(v)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                format!("To confirm: {what} With {args}. Shall I go ahead?")
            }
        }
    }

    /// Asks the model until it answers without tools, ends the call, or waits for the caller.
    async fn rounds(
        &mut self,
        out: &mut ReplyOut<'_>,
        clock: &mut TurnClock,
    ) -> Result<Outcome, DialogError> {
        for _ in 0..self.llm.max_rounds {
            self.repair();
            let messages = self.messages();
            let (text, calls) = match self.stream_round(&messages, out, clock).await {
                Ok(r) => r,
                Err(e) => return self.failed(out, e.to_string()).await,
            };
            if calls.is_empty() {
                self.failures = 0;
                return Ok(Outcome::End {
                    send_dtmf: None,
                    next: Next::Listen(self.expect()),
                });
            }
            let _ = text;
            if let Some(o) = self.run_tools(calls, out, clock).await? {
                self.failures = 0;
                return Ok(o);
            }
        }
        self.failed(
            out,
            format!("no answer after {} model requests", self.llm.max_rounds),
        )
        .await
    }

    /// A model request failed: the fallback prompt, or a human after repeated failures.
    async fn failed(
        &mut self,
        out: &mut ReplyOut<'_>,
        message: String,
    ) -> Result<Outcome, DialogError> {
        self.failures += 1;
        tracing::warn!(call_id = %self.call_id, error = %message, failures = self.failures, "LLM turn failed");
        out.note("error", json!({"stage": "llm", "message": message}))
            .await;
        metrics::counter!(crate::telemetry::names::ERRORS, "stage" => "llm").increment(1);
        self.commit_inflight();
        if self.failures >= self.llm.max_failures {
            let p = self.llm.escalate_prompt.clone();
            self.say(out, &p).await?;
            return Ok(self.to_human());
        }
        let p = self.llm.fallback_prompt.clone();
        self.say(out, &p).await?;
        Ok(Outcome::End {
            send_dtmf: None,
            next: Next::Listen(self.expect()),
        })
    }

    /// One model request: its text goes out piece by piece as it streams; the whole text and
    /// its tool calls come back. The assistant message is in history when this returns Ok.
    async fn stream_round(
        &mut self,
        messages: &[Value],
        out: &mut ReplyOut<'_>,
        clock: &mut TurnClock,
    ) -> Result<(String, Vec<ToolCall>), LlmError> {
        let sent = Instant::now();
        let first_sent = *clock.first_sent.get_or_insert(sent);
        clock.stats.rounds += 1;
        let (chat, settings, tools) = (
            self.engines.chat.clone(),
            self.settings.clone(),
            self.tools.clone(),
        );
        let start = chat.start(&settings, messages, &tools);
        tokio::pin!(start);
        let filler_at = sent + Duration::from_millis(self.llm.filler_after_ms);
        let mut streaming = loop {
            tokio::select! {
                r = &mut start => break r?,
                _ = tokio::time::sleep_until(filler_at), if !clock.filler_said => {
                    clock.filler_said = true;
                    let f = self.llm.filler.clone();
                    if self.say(out, &f).await.is_err() {
                        return Err(LlmError::Request("the call is gone".into()));
                    }
                }
            }
        };
        if clock.stats.ttft_ms.is_none() {
            clock.stats.ttft_ms = Some(ms_between(first_sent, streaming.first_at));
            clock.stats.first_token_at_ms = out
                .sink
                .call_ms()
                .map(|now| now.saturating_sub(ms_between(streaming.first_at, Instant::now())));
        }
        let mut splitter = PieceSplitter::new(CLAUSE_MIN, PIECE_MAX);
        let gone = |_| LlmError::Request("the call is gone".into());
        // The last words spoken, so a leak split across pieces is still seen.
        let mut tail: Vec<String> = Vec::new();
        let mut leaked = false;
        while let Some(delta) = streaming.next_text().await? {
            for piece in splitter.push(&delta) {
                self.guarded_piece(out, piece, clock, &mut tail, &mut leaked)
                    .await
                    .map_err(gone)?;
            }
        }
        if let Some(piece) = splitter.finish() {
            self.guarded_piece(out, piece, clock, &mut tail, &mut leaked)
                .await
                .map_err(gone)?;
        }
        let completion = streaming.finish()?;
        let _ = leaked;
        clock.stats.total_ms = Some(ms_between(first_sent, Instant::now()));
        clock.stats.stream_end_at_ms = out.sink.call_ms();
        let _ = out.sink.send(ReplyPart::Stats(clock.stats)).await;
        out.note(
            "llm",
            json!({
                "ttft_ms": clock.stats.ttft_ms,
                "total_ms": clock.stats.total_ms,
                "round": clock.stats.rounds,
                "stream_end_at_ms": clock.stats.stream_end_at_ms,
                "finish_reason": completion.finish_reason,
                "tool_calls": completion.tool_calls.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                "usage": completion.usage,
            }),
        )
        .await;
        // The assistant message: its text (as streamed) and its tool calls.
        let text = std::mem::take(&mut self.inflight);
        let mut msg = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
        if !completion.tool_calls.is_empty() {
            msg["tool_calls"] = Value::Array(
                completion
                    .tool_calls
                    .iter()
                    .map(|c| {
                        json!({"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments.to_string()}})
                    })
                    .collect(),
            );
        }
        if !text.is_empty() || !completion.tool_calls.is_empty() {
            self.history.push(msg);
            let idx = self.history.len() - 1;
            for e in &mut self.spoken {
                if e.0 == Some(UNCOMMITTED) {
                    e.0 = Some(idx);
                }
            }
        }
        Ok((text, completion.tool_calls))
    }

    /// A piece of model text, unless it reads out the instructions: then the refusal, once,
    /// and nothing more of this reply.
    async fn guarded_piece(
        &mut self,
        out: &mut ReplyOut<'_>,
        piece: String,
        clock: &mut TurnClock,
        tail: &mut Vec<String>,
        leaked: &mut bool,
    ) -> Result<(), DialogError> {
        if *leaked {
            return Ok(());
        }
        let mut words = std::mem::take(tail);
        words.extend(words_of(&piece));
        if words
            .windows(LEAK_WORDS)
            .any(|w| self.secret.contains(&w.join(" ")))
        {
            *leaked = true;
            tracing::warn!(call_id = %self.call_id, "the model read out its instructions; not spoken");
            out.note(
                "guard",
                json!({"what": "instructions", "action": "not spoken"}),
            )
            .await;
            let before = out.words;
            if !self.inflight.is_empty() {
                self.inflight.push(' ');
            }
            self.inflight.push_str(LEAK_REFUSAL);
            out.say(LEAK_REFUSAL).await?;
            self.spoken.push((Some(UNCOMMITTED), out.words - before));
            return Ok(());
        }
        let keep = words.len().saturating_sub(LEAK_WORDS - 1);
        *tail = words.split_off(keep);
        self.model_piece(out, piece, clock).await
    }

    async fn model_piece(
        &mut self,
        out: &mut ReplyOut<'_>,
        piece: String,
        clock: &mut TurnClock,
    ) -> Result<(), DialogError> {
        if clock.stats.first_piece_at_ms.is_none() {
            clock.stats.first_piece_at_ms = out.sink.call_ms();
        }
        let before = out.words;
        // History holds what was said, piece by piece, not what the model wrote past it.
        if !self.inflight.is_empty() {
            self.inflight.push(' ');
        }
        self.inflight.push_str(&piece);
        clock.model_said = true;
        out.segment(Segment {
            text: piece,
            pause_after_ms: 0,
        })
        .await?;
        self.spoken.push((Some(UNCOMMITTED), out.words - before));
        Ok(())
    }

    /// Model text streamed into a turn that was cut short goes into history as it was.
    fn commit_inflight(&mut self) {
        let text = std::mem::take(&mut self.inflight);
        if text.trim().is_empty() {
            return;
        }
        self.history
            .push(json!({"role": "assistant", "content": text}));
        let idx = self.history.len() - 1;
        for e in &mut self.spoken {
            if e.0 == Some(UNCOMMITTED) {
                e.0 = Some(idx);
            }
        }
    }

    /// Runs the tool calls of one model reply in order. `Some` ends the turn (a transfer, a
    /// hang-up, a hand-back, or a tool that waits for the caller).
    async fn run_tools(
        &mut self,
        calls: Vec<ToolCall>,
        out: &mut ReplyOut<'_>,
        clock: &mut TurnClock,
    ) -> Result<Option<Outcome>, DialogError> {
        if self.ahead && !calls.is_empty() {
            return Err(DialogError::NotAhead("a tool call".into()));
        }
        let mut end: Option<Outcome> = None;
        let mut dtmf = String::new();
        let mut listen: Option<Expectation> = None;
        for call in calls {
            if end.is_some() || listen.is_some() {
                self.tool_result(
                    &call.id,
                    &json!({"error": "not run: one step at a time; call it again if still needed"}),
                );
                continue;
            }
            let args = &call.arguments;
            match call.name.as_str() {
                "transfer_call" => {
                    let target = args.get("target").map(tools::text_of).unwrap_or_default();
                    if let Some(announce) = self.announce.get(&target).cloned() {
                        out.note(
                            "tool_call",
                            json!({"name": "transfer_call", "target": target, "ok": true}),
                        )
                        .await;
                        metrics::counter!(crate::telemetry::names::TOOL_CALLS, "tool" => "transfer_call", "result" => "ok").increment(1);
                        if !clock.model_said {
                            self.say(out, &announce).await?;
                        }
                        self.tool_result(&call.id, &json!({"ok": true, "transferring_to": target}));
                        end = Some(Outcome::End {
                            send_dtmf: None,
                            next: Next::Transfer { target },
                        });
                    } else {
                        let allowed: Vec<&String> = self.announce.keys().collect();
                        out.note("tool_call", json!({"name": "transfer_call", "target": target, "ok": false, "refused": true})).await;
                        metrics::counter!(crate::telemetry::names::TOOL_CALLS, "tool" => "transfer_call", "result" => "refused").increment(1);
                        self.tool_result(
                            &call.id,
                            &json!({"error": format!("refused: `{target}` is not a transfer target you may use; nothing was done. The only targets are: {}", allowed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
                                    "allowed_targets": allowed}),
                        );
                    }
                }
                "end_call" => {
                    out.note("tool_call", json!({"name": "end_call", "ok": true}))
                        .await;
                    if !clock.model_said {
                        self.say(out, "Goodbye.").await?;
                    }
                    self.tool_result(&call.id, &json!({"ok": true}));
                    end = Some(Outcome::End {
                        send_dtmf: None,
                        next: Next::Hangup {
                            reason: "agent_end_call".into(),
                        },
                    });
                }
                "send_dtmf" => {
                    let digits = args.get("digits").map(tools::text_of).unwrap_or_default();
                    let ok = !digits.is_empty()
                        && digits.len() <= 32
                        && digits.chars().all(|c| "0123456789*#ABCDwW".contains(c));
                    out.note("tool_call", json!({"name": "send_dtmf", "ok": ok}))
                        .await;
                    if ok {
                        dtmf.push_str(&digits);
                        self.tool_result(
                            &call.id,
                            &json!({"ok": true, "note": "sent once what you say now has played"}),
                        );
                    } else {
                        self.tool_result(
                            &call.id,
                            &json!({"error": "digits must be 1-32 of 0-9 * # A-D w"}),
                        );
                    }
                }
                "collect_digits" => {
                    let max = args
                        .get("max_digits")
                        .and_then(Value::as_u64)
                        .and_then(|m| usize::try_from(m).ok())
                        .unwrap_or(20)
                        .clamp(1, 32);
                    let terminator = match args.get("terminator").and_then(Value::as_str) {
                        Some("") => None,
                        Some("*") => Some('*'),
                        _ => Some('#'),
                    };
                    let p = args
                        .get("prompt")
                        .map(tools::text_of)
                        .filter(|p| !p.trim().is_empty())
                        .or_else(|| self.profile.file.keypad_prompt.clone())
                        .unwrap_or_else(|| {
                            "Please type it on your keypad, then press pound.".into()
                        });
                    out.note(
                        "tool_call",
                        json!({"name": "collect_digits", "max_digits": max}),
                    )
                    .await;
                    self.say(out, &p).await?;
                    self.pending = Some(Pending::Digits {
                        id: call.id.clone(),
                    });
                    listen = Some(Expectation {
                        asr_hint: None,
                        digits: Some(DigitSpec { max, terminator }),
                        pause_on_voice: self.profile.file.pause_on_voice,
                        spoken: None,
                    });
                }
                "return_to_flow" if self.can_hand_back => {
                    out.note("tool_call", json!({"name": "return_to_flow", "ok": true}))
                        .await;
                    self.tool_result(&call.id, &json!({"ok": true}));
                    end = Some(Outcome::Handback);
                }
                name => match self.profile.file.tools.get(name).cloned() {
                    Some(t) if t.confirm => {
                        let text = self.read_back(&call);
                        out.note("tool_call", json!({"name": name, "arguments": tools::redact(&call.arguments, &t.sensitive), "awaiting_confirmation": true})).await;
                        self.say(out, &text).await?;
                        self.pending = Some(Pending::Confirm {
                            call: call.clone(),
                            asked: 0,
                        });
                        listen = Some(Expectation {
                            pause_on_voice: self.profile.file.pause_on_voice,
                            ..yes_no()
                        });
                    }
                    Some(_) => {
                        let content = self.run_webhook(&call, out, clock).await?;
                        self.tool_result(&call.id, &content);
                    }
                    None => {
                        out.note(
                            "tool_call",
                            json!({"name": name, "ok": false, "unknown": true}),
                        )
                        .await;
                        self.tool_result(
                            &call.id,
                            &json!({"error": format!("there is no tool `{name}`")}),
                        );
                    }
                },
            }
        }
        let send_dtmf = (!dtmf.is_empty()).then_some(dtmf);
        if let Some(e) = listen {
            return Ok(Some(Outcome::End {
                send_dtmf,
                next: Next::Listen(e),
            }));
        }
        match end {
            Some(Outcome::End { next, .. }) => Ok(Some(Outcome::End { send_dtmf, next })),
            Some(Outcome::Handback) => {
                // Keys go out with the reply the flow goes on with.
                if let Some(k) = send_dtmf {
                    self.pending_dtmf
                        .get_or_insert_with(String::new)
                        .push_str(&k);
                }
                Ok(Some(Outcome::Handback))
            }
            // Keys asked for without an end: sent after this reply; the model goes on.
            None if send_dtmf.is_some() => {
                let mut keys = self.pending_dtmf.take().unwrap_or_default();
                keys.push_str(send_dtmf.as_deref().unwrap_or_default());
                self.pending_dtmf = Some(keys);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Runs a webhook (a filler if it is slow and nothing was said); its result for the model.
    async fn run_webhook(
        &mut self,
        call: &ToolCall,
        out: &mut ReplyOut<'_>,
        clock: &mut TurnClock,
    ) -> Result<Value, DialogError> {
        let Some(t) = self.profile.file.tools.get(&call.name).cloned() else {
            return Ok(json!({"error": "no such tool"}));
        };
        self.tool_seq += 1;
        let key = format!("{}-{}-{}", self.call_id, self.tool_seq, call.id);
        let (http, args) = (self.engines.http.clone(), call.arguments.clone());
        let limit = t.timeout_ms.saturating_mul(u64::from(t.retries) + 1);
        // On its own task, owned by the agent: a turn the caller cuts short does not cancel a
        // request that may already have changed something (a refund); the next turn waits for
        // its result and tells the model what really happened.
        let task = tokio::spawn(async move { tools::call_webhook(&http, &t, &args, &key).await });
        self.running = Some(Running {
            id: call.id.clone(),
            name: call.name.clone(),
            arguments: call.arguments.clone(),
            task,
            limit_ms: limit.saturating_add(2_000),
        });
        let filler_at = Instant::now() + Duration::from_millis(self.llm.filler_after_ms);
        loop {
            let Some(r) = self.running.as_mut() else {
                return Ok(json!({"error": "lost"}));
            };
            let filler = tokio::select! {
                done = &mut r.task => {
                    let r = self.running.take();
                    let result = done.unwrap_or_else(|_| tools::WebhookResult {
                        content: json!({"error": "the tool failed inside sidecall"}),
                        ok: false,
                        tries: 0,
                        ms: 0,
                    });
                    return Ok(self.webhook_done(r, result, Some(out)).await);
                }
                _ = tokio::time::sleep_until(filler_at), if !clock.filler_said && !clock.model_said => true,
            };
            if filler {
                clock.filler_said = true;
                let f = self.llm.filler.clone();
                self.say(out, &f).await?;
            }
        }
    }

    /// A webhook's result: logged and recorded (sensitive arguments redacted), for the model.
    async fn webhook_done(
        &mut self,
        running: Option<Running>,
        result: tools::WebhookResult,
        out: Option<&mut ReplyOut<'_>>,
    ) -> Value {
        let Some(r) = running else {
            return result.content;
        };
        let sensitive = self
            .profile
            .file
            .tools
            .get(&r.name)
            .map(|t| t.sensitive.clone())
            .unwrap_or_default();
        let args = tools::redact(&r.arguments, &sensitive);
        tracing::info!(call_id = %self.call_id, tool = %r.name, arguments = %args, ok = result.ok, tries = result.tries, ms = result.ms, "webhook tool");
        let note = json!({"name": r.name, "arguments": args, "ok": result.ok, "tries": result.tries, "ms": result.ms});
        match out {
            Some(out) => out.note("tool_call", note).await,
            None => self.late_notes.push(note),
        }
        metrics::counter!(crate::telemetry::names::TOOL_CALLS, "tool" => "webhook", "result" => if result.ok { "ok" } else { "error" }).increment(1);
        result.content
    }

    /// A webhook a cut-short turn left running: its real result goes into history (waited for,
    /// within its own limit) before anything else.
    async fn settle_running(&mut self, out: &mut ReplyOut<'_>) {
        let Some(mut r) = self.running.take() else {
            return;
        };
        let result = match tokio::time::timeout(Duration::from_millis(r.limit_ms), &mut r.task)
            .await
        {
            Ok(Ok(result)) => result,
            _ => {
                r.task.abort();
                tools::WebhookResult {
                    content: json!({"error": "outcome unknown: the request did not finish; do not assume it was done or not done"}),
                    ok: false,
                    tries: 0,
                    ms: 0,
                }
            }
        };
        let id = r.id.clone();
        let confirmed = self.confirmed.remove(&id);
        let mut content = self.webhook_done(Some(r), result, Some(out)).await;
        if confirmed {
            content["confirmed_by_caller"] = json!(true);
        }
        self.tool_result(&id, &content);
    }

    /// What the caller heard of the last reply: model text they did not hear leaves history.
    pub fn heard(&mut self, heard: &Heard) {
        self.commit_inflight();
        if heard.complete {
            return;
        }
        let mut left = heard.text.split_whitespace().count();
        let mut kept: BTreeMap<usize, usize> = BTreeMap::new();
        for (msg, n) in &self.spoken {
            let keep = left.min(*n);
            left -= keep;
            if let Some(i) = msg {
                *kept.entry(*i).or_default() += keep;
            }
        }
        let mut remove = Vec::new();
        for (i, keep) in kept {
            let Some(m) = self.history.get_mut(i) else {
                continue;
            };
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let words: Vec<&str> = content.split_whitespace().collect();
            if keep >= words.len() {
                continue;
            }
            let cut = words[..keep].join(" ");
            if cut.is_empty() && m.get("tool_calls").is_none() {
                remove.push(i);
            } else {
                m["content"] = if cut.is_empty() {
                    Value::Null
                } else {
                    json!(cut)
                };
            }
        }
        for i in remove.into_iter().rev() {
            self.history.remove(i);
        }
        self.spoken.clear();
    }

    /// The history so far (tests and records).
    pub fn history(&self) -> &[Value] {
        &self.history
    }
}

/// The longest one turn of `profile` may take: its model rounds and webhook tries, with a
/// margin.
pub fn turn_limit(llm: &LlmConfig, profile: &AgentProfile) -> Duration {
    let rounds = u64::from(llm.max_rounds);
    let tools = profile
        .file
        .tools
        .values()
        .map(|t| t.timeout_ms.saturating_mul(u64::from(t.retries) + 1))
        .max()
        .unwrap_or(0);
    Duration::from_millis(
        llm.timeout_ms
            .saturating_add(tools)
            .saturating_mul(rounds)
            .saturating_add(2_000),
    )
}

/// What the agent is asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentAsk {
    /// The call opens with the agent.
    Open,
    /// A flow handed the call over (its words are already said in this reply); `disclosed`:
    /// the flow played an AI disclosure.
    HandedOver {
        disclosed: bool,
    },
    Input(Input),
}

fn yes_no() -> Expectation {
    Expectation {
        pause_on_voice: None,
        asr_hint: Some("The caller answers yes or no.".into()),
        digits: Some(DigitSpec {
            max: 1,
            terminator: None,
        }),
        spoken: Some(Spoken::YesNo),
    }
}

fn ms_between(a: Instant, b: Instant) -> u64 {
    u64::try_from(b.saturating_duration_since(a).as_millis()).unwrap_or(u64::MAX)
}

/// The system prompt with the call's variables filled; unknown names stay as written.
fn render_system(
    template: &str,
    call_id: &str,
    args: &CallArgs,
    slots: &BTreeMap<String, String>,
    transfers: &BTreeMap<String, profile::TransferUse>,
) -> String {
    let now = local_now();
    prompt::fill(template, |key| match key {
        "caller_number" => Some(args.caller.clone().unwrap_or_else(|| "unknown".into())),
        "call_id" => Some(call_id.to_string()),
        "date" => Some(now.0.clone()),
        "time" => Some(now.1.clone()),
        "weekday" => Some(now.2.clone()),
        "slots" => Some(
            slots
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        "transfers" => Some(
            transfers
                .iter()
                .map(|(k, t)| format!("{k}: {}", t.description))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        k => k
            .strip_prefix("args.")
            .map(|a| args.vars.get(a).cloned().unwrap_or_default())
            .or_else(|| {
                k.strip_prefix("slots.")
                    .map(|s| slots.get(s).cloned().unwrap_or_default())
            }),
    })
}

/// Today's date, the time and the weekday (UTC: the sidecar has no time zone database).
fn local_now() -> (String, String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(days);
    let rem = secs % 86_400;
    let weekday = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ][usize::try_from(days.rem_euclid(7)).unwrap_or(0)];
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02} UTC", rem / 3600, (rem % 3600) / 60),
        weekday.to_string(),
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The agent as a dialog of its own (a call that runs an agent from the start).
pub struct AgentDialog {
    pub agent: Agent,
    opened: bool,
}

impl AgentDialog {
    pub fn new(agent: Agent) -> Self {
        Self {
            agent,
            opened: false,
        }
    }
}

#[async_trait::async_trait]
impl crate::engines::dialog::Dialog for AgentDialog {
    async fn start(&mut self) -> Result<crate::engines::dialog::Turn, DialogError> {
        Err(DialogError::Engine("the agent only streams".into()))
    }
    async fn input(&mut self, _: Input) -> Result<crate::engines::dialog::Turn, DialogError> {
        Err(DialogError::Engine("the agent only streams".into()))
    }
    fn heard(&mut self, heard: &Heard) {
        self.agent.heard(heard);
    }
    fn turn_limit(&self) -> Option<Duration> {
        Some(self.agent.turn_limit())
    }
    fn fork(&self) -> Option<Box<dyn crate::engines::dialog::Dialog>> {
        Some(Box::new(AgentDialog {
            agent: self.agent.ahead_copy()?,
            opened: self.opened,
        }))
    }
    fn adopted(&mut self) {
        self.agent.confirmed();
    }
    async fn respond(&mut self, ask: Ask, sink: &ReplySink) -> Result<(), DialogError> {
        let ask = match ask {
            Ask::Start => {
                self.opened = true;
                AgentAsk::Open
            }
            Ask::Input(i) => AgentAsk::Input(i),
        };
        // The opening (the disclosure) cannot be interrupted; the agent's replies can.
        let mut out = ReplyOut::new(sink, ask != AgentAsk::Open);
        let outcome = self.agent.turn(ask, &mut out).await?;
        finish(&mut self.agent, &mut out, outcome).await
    }
}

/// Ends a reply with the agent's outcome (a hand-back with no flow to return to listens).
pub async fn finish(
    agent: &mut Agent,
    out: &mut ReplyOut<'_>,
    outcome: Outcome,
) -> Result<(), DialogError> {
    let (send_dtmf, next) = match outcome {
        Outcome::End { send_dtmf, next } => (send_dtmf, next),
        Outcome::Handback => (None, Next::Listen(agent.expect())),
    };
    let send_dtmf = match (agent.pending_dtmf.take(), send_dtmf) {
        (Some(mut a), Some(b)) => {
            a.push_str(&b);
            Some(a)
        }
        (a, b) => a.or(b),
    };
    out.end(send_dtmf, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(history_messages: usize) -> Agent {
        let mut cfg = Config::defaults(&crate::config::Overrides::default()).unwrap_or_default();
        cfg.llm.history_messages = history_messages;
        let profile = AgentProfile::parse(
            std::path::Path::new("support.toml"),
            "system_prompt = \"You help callers of ShopEasy. Number {caller_number}, order {slots.order_id}, account {args.account}.\"\n",
            &|_| true,
        )
        .map(Arc::new)
        .unwrap_or_else(|e| panic!("{e}"));
        let args = CallArgs {
            caller: Some("+15550100".into()),
            vars: [("account".to_string(), "77".to_string())].into(),
            ..CallArgs::default()
        };
        let slots = [("order_id".to_string(), "55421".to_string())].into();
        let engines = AgentEngines {
            chat: ChatClient::new(crate::net::http_client()),
            http: crate::net::http_client(),
        };
        Agent::new(&cfg, profile, engines, "c1", &args, &slots, false)
    }

    #[test]
    fn the_system_prompt_carries_the_call_variables() {
        let a = agent(40);
        assert_eq!(
            a.system,
            "You help callers of ShopEasy. Number +15550100, order 55421, account 77."
        );
    }

    #[test]
    fn a_cut_reply_keeps_only_the_words_heard_across_its_messages() {
        let mut a = agent(40);
        a.history.push(json!({"role": "user", "content": "hi"}));
        // A filler, then round one (text and a tool call), then round two streaming when cut.
        a.spoken.push((None, 2));
        a.history.push(json!({"role": "assistant", "content": "Let me look that up.",
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "x", "arguments": "{}"}}]}));
        a.spoken.push((Some(2), 5));
        a.history
            .push(json!({"role": "tool", "tool_call_id": "t1", "content": "{}"}));
        a.inflight = "Your order shipped yesterday and arrives tomorrow.".into();
        a.spoken.push((Some(UNCOMMITTED), 7));
        a.heard(&Heard {
            text: "One moment. Let me look that up. Your order shipped".into(),
            complete: false,
        });
        assert_eq!(a.history[1]["content"], "Let me look that up.");
        assert_eq!(a.history[3]["content"], "Your order shipped");
        // Heard nothing of a message: it leaves history (its tool call stays, its text goes).
        a.spoken = vec![(Some(1), 5), (Some(3), 3)];
        a.heard(&Heard {
            text: String::new(),
            complete: false,
        });
        assert_eq!(a.history.len(), 3, "{:#?}", a.history);
        assert_eq!(a.history[1]["content"], Value::Null);
        assert!(a.history[1].get("tool_calls").is_some());
    }

    #[test]
    fn the_window_starts_at_a_caller_message_and_tool_calls_keep_their_results() {
        let mut a = agent(4);
        for i in 0..3 {
            a.history
                .push(json!({"role": "user", "content": format!("q{i}")}));
            a.history.push(json!({"role": "assistant", "content": null,
                "tool_calls": [{"id": format!("t{i}"), "type": "function", "function": {"name": "x", "arguments": "{}"}}]}));
            a.history
                .push(json!({"role": "tool", "tool_call_id": format!("t{i}"), "content": "{}"}));
            a.history
                .push(json!({"role": "assistant", "content": format!("a{i}")}));
        }
        let m = a.messages();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m[1]["content"], "q2");
        assert_eq!(m.len(), 5);
        // A window that would open on a tool message moves on to the next caller message.
        let mut b = agent(3);
        b.history = a.history.clone();
        let m = b.messages();
        assert_eq!(m[1]["role"], "user", "{m:#?}");
    }

    #[test]
    fn a_turn_cut_before_its_tools_ran_still_answers_every_tool_call() {
        let mut a = agent(40);
        a.history.push(json!({"role": "user", "content": "q"}));
        a.history
            .push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "x", "arguments": "{}"}},
            {"id": "t2", "type": "function", "function": {"name": "y", "arguments": "{}"}}]}));
        a.history
            .push(json!({"role": "tool", "tool_call_id": "t1", "content": "{}"}));
        a.history.push(json!({"role": "user", "content": "next"}));
        a.repair();
        assert_eq!(a.history[3]["tool_call_id"], "t2");
        assert!(
            a.history[3]["content"]
                .as_str()
                .unwrap_or("")
                .contains("interrupted")
        );
        assert_eq!(a.history[4]["content"], "next");
        // A call waiting for the caller is left alone.
        a.history.push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "t3", "type": "function", "function": {"name": "collect_digits", "arguments": "{}"}}]}));
        a.pending = Some(Pending::Digits { id: "t3".into() });
        let before = a.history.len();
        a.repair();
        assert_eq!(a.history.len(), before);
    }

    #[test]
    fn lines_the_prompt_quotes_are_not_secret_but_its_rules_are() {
        let prompt = "Never give refunds above fifty dollars without a supervisor approving it first. \
            When done, say \"Thank you for calling ShopEasy, have a wonderful day and goodbye now.\"";
        let secret = shingles(&words_of(&unquoted(prompt)));
        let leaks = |text: &str| {
            words_of(text)
                .windows(LEAK_WORDS)
                .any(|w| secret.contains(&w.join(" ")))
        };
        assert!(!leaks(
            "Thank you for calling ShopEasy, have a wonderful day and goodbye now."
        ));
        assert!(leaks(
            "My rules: never give refunds above fifty dollars without a supervisor approving it."
        ));
        assert!(!leaks("I can refund up to fifty dollars today."));
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_422), (2025, 11, 30));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
