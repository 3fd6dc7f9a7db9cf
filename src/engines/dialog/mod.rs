//! The dialog seam: what the agent says next and what it does (listen, transfer, hang up),
//! given what the caller said or typed. A reply streams to the call part by part
//! (`Dialog::respond` into a `ReplySink`), so speech starts with its first piece; scripted flows
//! live here and answer in whole turns (a stream of one); the LLM agent joins behind the same
//! trait.

pub mod chat_stream;
pub mod entities;
pub mod flow;
pub mod lookup;
pub mod pieces;
pub mod prompt;

use async_trait::async_trait;

pub use prompt::Segment;

/// Errors a dialog engine can give.
#[derive(Debug, thiserror::Error)]
pub enum DialogError {
    #[error("flow file {path}: {message}")]
    Flow { path: String, message: String },
    #[error("lookup failed: {0}")]
    Lookup(String),
    #[error("dialog engine: {0}")]
    Engine(String),
    #[error("dialog engine gave no answer within {0} ms")]
    Timeout(u64),
    #[error("dialog engine crashed (panicked); the call goes on without it")]
    Panicked,
    /// A reply made ahead (before the caller's turn was confirmed) would need a side effect
    /// (a webhook, a tool): it is made when the turn ends instead.
    #[error("not made ahead: the reply needs {0}")]
    NotAhead(String),
}

/// What the dialog expects next, so ASR can be hinted and the keypad collected.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expectation {
    /// Text for the ASR `prompt` field ("The caller says a five digit order number.").
    pub asr_hint: Option<String>,
    /// Keypad entry, when digits are acceptable.
    pub digits: Option<DigitSpec>,
    /// Whether the caller's voice pauses the reply that asks for this (resumed after a cough
    /// or a backchannel) or cuts it at once; `None`: `vad.pause_on_voice`. Set per flow state
    /// and per agent profile.
    pub pause_on_voice: Option<bool>,
    /// What the caller is expected to say, which sets how long a pause may be before their
    /// turn ends; `None`: as the keypad entry suggests (a number of more than one digit is
    /// read out, one key without a terminator is a yes or no).
    pub spoken: Option<Spoken>,
}

/// What kind of answer the caller is expected to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spoken {
    /// Anything: the end-of-turn model decides.
    Free,
    /// A number read out digit by digit, of at most `max` digits: it comes in groups, so a
    /// pause never ends it early.
    Digits { max: usize },
    /// Yes or no: the answer ends the turn at once.
    YesNo,
    /// An amount of money in words: complete once it names its unit ("fifty dollars").
    Amount,
}

/// How to collect keypad digits.
#[derive(Debug, Clone, PartialEq)]
pub struct DigitSpec {
    pub max: usize,
    pub terminator: Option<char>,
}

/// What happens after the agent has spoken.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Wait for the caller.
    Listen(Expectation),
    /// Transfer to an allow-listed target (by name), after the prompt has played.
    Transfer { target: String },
    /// Hang up after the prompt has played.
    Hangup { reason: String },
}

/// One reply of the agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub say: Vec<Segment>,
    /// Whether the caller may interrupt this reply.
    pub barge_in: bool,
    /// Keys to send to the PBX once the reply has played (before `next`).
    pub send_dtmf: Option<String>,
    pub next: Next,
}

/// What the caller did.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A transcript of an utterance.
    Speech(String),
    /// Keypad digits (terminator removed).
    Digits(String),
    /// Nothing within the no-input timeout.
    NoInput,
}

/// What the caller heard of the last reply (the rest was cut by barge-in).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Heard {
    pub text: String,
    pub complete: bool,
}

/// One piece of a reply as a dialog engine produces it: the call sends each `Say` to TTS as
/// soon as it arrives, so the caller hears the first sentence while the rest is made.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyPart {
    /// A reply begins; `barge_in`: the caller may interrupt it.
    Begin { barge_in: bool },
    /// Something to say (a sentence or clause).
    Say(Segment),
    /// The reply is complete: keys to send once it has played, then what happens.
    End {
        send_dtmf: Option<String>,
        next: Next,
    },
    /// Something the engine did, for the call's record (`kind` and its fields; sensitive
    /// values already redacted).
    Note {
        kind: &'static str,
        fields: serde_json::Value,
    },
    /// Timing of the model behind this reply so far (cumulative; the last one counts).
    Stats(LlmStats),
}

/// How the model behind a reply performed; times `*_at_ms` are on the call's clock.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LlmStats {
    /// From the turn's first model request to its first token.
    pub ttft_ms: Option<u64>,
    /// From the turn's first model request to the last chunk of its last stream.
    pub total_ms: Option<u64>,
    pub first_token_at_ms: Option<u64>,
    /// When the first speakable piece was complete.
    pub first_piece_at_ms: Option<u64>,
    /// When the last stream of the turn ended.
    pub stream_end_at_ms: Option<u64>,
    /// Model requests in the turn.
    pub rounds: u32,
}

/// Where a dialog engine puts the parts of its reply (bounded: an engine faster than the call
/// waits).
pub struct ReplySink {
    tx: tokio::sync::mpsc::Sender<ReplyPart>,
    origin: Option<tokio::time::Instant>,
}

impl ReplySink {
    pub fn new(tx: tokio::sync::mpsc::Sender<ReplyPart>) -> Self {
        Self { tx, origin: None }
    }

    /// A sink that knows the call's time zero, so engines can stamp `LlmStats` on its clock.
    pub fn with_origin(
        tx: tokio::sync::mpsc::Sender<ReplyPart>,
        origin: tokio::time::Instant,
    ) -> Self {
        Self {
            tx,
            origin: Some(origin),
        }
    }

    /// Now on the call's clock (ms), when the sink knows it.
    pub fn call_ms(&self) -> Option<u64> {
        self.origin
            .map(|o| u64::try_from(o.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Sends one part; fails when the call no longer listens.
    pub async fn send(&self, part: ReplyPart) -> Result<(), DialogError> {
        self.tx
            .send(part)
            .await
            .map_err(|_| DialogError::Engine("the call is gone".into()))
    }

    /// A whole turn at once: a stream of one (scripted flows).
    pub async fn turn(&self, turn: Turn) -> Result<(), DialogError> {
        self.send(ReplyPart::Begin {
            barge_in: turn.barge_in,
        })
        .await?;
        for s in turn.say {
            self.send(ReplyPart::Say(s)).await?;
        }
        self.send(ReplyPart::End {
            send_dtmf: turn.send_dtmf,
            next: turn.next,
        })
        .await
    }
}

/// What the call asks the dialog for.
#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    /// The opening reply.
    Start,
    /// The reply to the caller's input.
    Input(Input),
}

/// A conversation engine for one call.
#[async_trait]
pub trait Dialog: Send {
    /// The opening reply.
    async fn start(&mut self) -> Result<Turn, DialogError>;
    /// The reply to the caller's input.
    async fn input(&mut self, input: Input) -> Result<Turn, DialogError>;
    /// Tells the dialog what the caller actually heard of its last reply.
    fn heard(&mut self, heard: &Heard);
    /// The longest one turn may take, when the engine needs longer than `dialog.timeout_ms`
    /// (an LLM agent's model rounds and tools).
    fn turn_limit(&self) -> Option<std::time::Duration> {
        None
    }
    /// A copy of the dialog as it stands, to make a reply ahead on an input the caller may
    /// not confirm: the copy becomes the dialog if they do, and is dropped (the dialog told
    /// nothing) if they go on speaking. A copy refuses side effects (`NotAhead`). `None`: this
    /// engine, or its state right now, cannot be copied.
    fn fork(&self) -> Option<Box<dyn Dialog>> {
        None
    }
    /// This dialog is a fork whose reply the caller confirmed: it is the call's dialog now,
    /// side effects allowed again.
    fn adopted(&mut self) {}
    /// The seam the call uses: the reply to `ask`, streamed into `out` part by part. Engines
    /// that think in whole turns (scripted flows) keep this default, a stream of one; engines
    /// that generate (an LLM) send each speakable piece as soon as they have it.
    async fn respond(&mut self, ask: Ask, out: &ReplySink) -> Result<(), DialogError> {
        let turn = match ask {
            Ask::Start => self.start().await?,
            Ask::Input(i) => self.input(i).await?,
        };
        out.turn(turn).await
    }
}
