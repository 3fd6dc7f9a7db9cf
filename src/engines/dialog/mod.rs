//! The dialog seam: what the agent says next and what it does (listen, transfer, hang up),
//! given what the caller said or typed. Scripted flows live here; the LLM agent joins later
//! behind the same trait.

pub mod entities;
pub mod flow;
pub mod lookup;
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
}

/// What the dialog expects next, so ASR can be hinted and the keypad collected.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expectation {
    /// Text for the ASR `prompt` field ("The caller says a five digit order number.").
    pub asr_hint: Option<String>,
    /// Keypad entry, when digits are acceptable.
    pub digits: Option<DigitSpec>,
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

/// A conversation engine for one call.
#[async_trait]
pub trait Dialog: Send {
    /// The opening reply.
    async fn start(&mut self) -> Result<Turn, DialogError>;
    /// The reply to the caller's input.
    async fn input(&mut self, input: Input) -> Result<Turn, DialogError>;
    /// Tells the dialog what the caller actually heard of its last reply.
    fn heard(&mut self, heard: &Heard);
}
