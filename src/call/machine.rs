//! The call as a sans-I/O state machine. `CallCore` takes events (a 20 ms tick, media from the
//! PBX, results of work done elsewhere) with the current time on the call's clock, and answers
//! with actions (send this frame, transcribe this utterance, ask the dialog, transfer, record).
//! It never reads a clock, spawns a task or touches a socket: the driver in `session` does, so
//! every behaviour of a call can be tested on synthetic time.
//!
//! A call is in exactly one `Phase`, and every phase has a deadline (`CallCore::deadline`):
//! answering, thinking (dialog), recognizing (ASR), speaking (TTS and playout, the marks
//! included), listening (no-input) and ending (transfer or hangup) each end on their own clock
//! even when the work they wait for never reports back, and the whole call ends at
//! `call.max_duration_s`. Every way out ends with the caller sent to a human or hung up.

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::{Value, json};

use super::dtmf::DigitCollector;
use super::echo::EchoGate;
use super::link::{ControlError, LinkError, MediaEvent, MediaLink, Target};
use super::playout::Playout;
use super::turn::ahead::{self, Adopted, ReplyAhead, Step, Taken, Want};
use super::turn::barge::{self, BargeIn, Decision, Resumed, Seen, is_noise_transcript};
use super::turn::{
    Endpointing, Recognition, Request, Routed, Transcripts, TurnDetector, TurnEvent,
};
use super::vad::Vad;
use crate::audio::samples_per_frame;
use crate::config::Config;
use crate::engines::asr::{AsrError, Transcript};
use crate::engines::dialog::{
    DialogError, Expectation, Heard, Input, Next, ReplyPart, Turn, prompt,
};
use crate::engines::endpoint::Verdict;
use crate::telemetry::names;

/// Inbound frames buffered at most (1 s); older ones are dropped with a log line.
pub const INBOUND_MAX: usize = 50;
/// Inbound frames the detector takes per tick at most (a backlog drains at 5x real time).
const FRAMES_PER_TICK: usize = 5;
/// Agent frames kept for the echo gate beyond what the PBX plays this tick (its queue).
const EAR_MAX: usize = 50;
/// After this long without an inbound frame, ticks count as silence.
const SILENCE_AFTER_MS: u64 = 40;
/// TTS segments synthesized ahead of playout.
const TTS_AHEAD: usize = 2;
/// Limit the driver puts on answer, transfer, hangup and DTMF requests to the PBX.
pub const CONTROL_TIMEOUT_MS: u64 = 5_000;
/// Margin past a worker's own limit before the machine gives up on it (a task that never
/// reports, whatever the reason).
const BACKSTOP_MS: u64 = 1_000;
/// Limit the driver puts on one TTS segment in all (a server trickling audio for ever).
pub const TTS_SEGMENT_LIMIT_MS: u64 = 60_000;
/// A reply with nothing new (no audio from TTS, no frame out) this long is given up.
const SPEAKING_STALL_MS: u64 = TTS_SEGMENT_LIMIT_MS + 5_000;
/// A reply whose last mark has not come back this long after its audio should have played is
/// taken as played (a mark the PBX lost), so the call never waits on it for ever.
const MARK_TIMEOUT_MS: u64 = 3_000;

/// How a call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    CallerHungUp,
    AgentHungUp {
        reason: String,
    },
    Transferred {
        target: String,
    },
    /// The call could not be ended as it should (answer, transfer and hangup all failed): the
    /// adapter sends the caller to its overflow target.
    Failed {
        stage: String,
    },
}

impl CallOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            CallOutcome::CallerHungUp => "caller_hangup",
            CallOutcome::AgentHungUp { .. } => "agent_hangup",
            CallOutcome::Transferred { .. } => "transferred",
            CallOutcome::Failed { .. } => "failed",
        }
    }
}

/// What the dialog task is asked.
#[derive(Debug, Clone, PartialEq)]
pub enum DialogCmd {
    Start,
    Input(Input),
    Heard(Heard),
    /// Make the reply to this input ahead, on a copy of the dialog (`Dialog::fork`).
    Ahead(Input),
    /// The caller confirmed the input of `Ahead` with this seq: its copy is the dialog now.
    Adopt,
    /// The reply made ahead with this seq is not wanted: drop it and its copy.
    Discard,
}

/// What happens to a call, with the time it happened.
#[derive(Debug)]
pub enum Event {
    /// The 20 ms clock.
    Tick,
    /// Something from the PBX's media side.
    Media(MediaEvent),
    /// The PBX answered the call (or did not).
    Answered(Result<(), ControlError>),
    /// A transcript for utterance `seq`; `ms` is the time the request took in all.
    Asr {
        seq: u64,
        result: Result<Transcript, AsrError>,
        ms: u64,
    },
    /// A speculative transcription was not sent (the engine is busy).
    AsrSkipped { seq: u64 },
    /// The end-of-turn model's answer for pause check `id`.
    TurnVerdict {
        id: u64,
        result: Result<Verdict, String>,
    },
    /// A whole reply to ask `seq` at once (the same as its parts, then `DialogDone`).
    Dialog {
        seq: u64,
        result: Result<Turn, DialogError>,
        ms: u64,
    },
    /// One part of the reply to ask `seq`, as the dialog streams it.
    DialogPart { seq: u64, part: ReplyPart },
    /// The dialog is done with ask `seq` (`ms`: how long it took in all).
    DialogDone {
        seq: u64,
        result: Result<(), DialogError>,
        ms: u64,
    },
    /// Audio of segment `seg` of reply `reply`; `first_ms` on its first chunk (time to it).
    TtsAudio {
        reply: u64,
        seg: usize,
        samples: Vec<i16>,
        first_ms: Option<u64>,
    },
    /// Synthesis of a segment failed (what was sent of it plays; the reply goes on).
    TtsFailed {
        reply: u64,
        seg: usize,
        message: String,
    },
    /// Synthesis of a segment is over (after audio, or after a failure).
    TtsDone { reply: u64, seg: usize },
    /// Keys asked by `Action::SendDtmf` were sent (or not).
    DtmfSent(Result<(), ControlError>),
    /// The transfer or hangup `seq` was done (or not).
    ControlDone {
        seq: u64,
        result: Result<(), ControlError>,
    },
}

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A call record of `kind` at `at_ms` on the call's clock.
    Record {
        at_ms: u64,
        kind: &'static str,
        fields: Value,
    },
    /// Answer the call.
    Answer,
    /// Transcribe an utterance (result: `Event::Asr` with this `seq`). A `speculative` one
    /// (the audio at a pause, before the turn has ended) is skipped when the engine is busy
    /// (`Event::AsrSkipped`): it must not delay other callers' turns.
    Transcribe {
        seq: u64,
        audio: Vec<i16>,
        hint: Option<String>,
        speculative: bool,
        /// Where `audio` is in the utterance (samples `from..to`), for a streaming recognizer
        /// that was given the utterance as it came (`StreamAudio`).
        span: (usize, usize),
    },
    /// The utterance's next samples, for a streaming recognizer (`begin`: a new utterance,
    /// `audio` its first samples). Only with `with_stream_asr`.
    StreamAudio { begin: bool, audio: Vec<i16> },
    /// Drop every transcription in flight.
    CancelAsr,
    /// Ask the end-of-turn model whether the utterance so far is complete (result:
    /// `Event::TurnVerdict` with this `id`).
    CheckTurn { id: u64, audio: Vec<i16> },
    /// Ask the dialog (`Start`/`Input` are answered by `Event::Dialog` with this `seq`).
    Dialog { seq: u64, cmd: DialogCmd },
    /// Synthesize segment `seg` of reply `reply`.
    Synthesize {
        reply: u64,
        seg: usize,
        text: String,
    },
    /// Synthesize `text` into the prompt cache (the first sentence of a reply made ahead).
    Prefetch { text: String },
    /// Drop synthesis in flight for `reply`.
    CancelTts { reply: u64 },
    /// One 20 ms frame of agent audio to the media link.
    SendAudio(Vec<i16>),
    /// A playout mark to the media link.
    Mark(u64),
    /// Drop what the PBX still has to play (media queue, and PBX-side playback).
    Flush,
    /// Send keys to the PBX (result: `Event::DtmfSent`).
    SendDtmf(String),
    /// Transfer the caller (result: `Event::ControlDone` with this `seq`).
    Transfer {
        seq: u64,
        name: String,
        target: Target,
    },
    /// Hang up (result: `Event::ControlDone` with this `seq`).
    Hangup { seq: u64, reason: String },
}

/// Where a call is; the public face of `Phase`, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseName {
    Answering,
    Thinking,
    Speaking,
    Listening,
    Recognizing,
    Ending,
    Ended,
}

/// Latency stamps of the turn in progress (ms on the call clock).
#[derive(Default, Clone)]
struct TurnTimes {
    speech_end: Option<u64>,
    endpoint_ms: u64,
    asr_ms: u64,
    asr_queue_ms: u64,
    /// ASR time spent before the endpoint (the audio was transcribed at the pause).
    asr_early_ms: u64,
    /// The end-of-turn model's score for the utterance, when it answered.
    turn_probability: Option<f32>,
    dialog_ms: u64,
    tts_ms: Option<u64>,
    /// From the ask to the reply's first piece to say.
    first_piece_ms: Option<u64>,
    /// The model behind the reply (LLM agents).
    llm: Option<crate::engines::dialog::LlmStats>,
    /// The dialog is done with the ask (its time is known).
    dialog_done: bool,
    /// The `turn` record, waiting for the dialog to finish (a streamed reply plays before
    /// its model has finished): when its audio started, and its fields so far.
    pending: Option<(u64, u64, serde_json::Map<String, Value>)>,
    /// The reply was made ahead: how much of it was ready when the turn was confirmed
    /// ("done", "partial": its first part, "asked": nothing yet), and how long before.
    reply_ahead: Option<(&'static str, u64)>,
}

/// A reply being synthesized and played.
struct Reply {
    id: u64,
    /// The ask this reply answers, while the dialog streams it (None: a reply of the call's own).
    dialog_seq: Option<u64>,
    /// More parts may come from the dialog.
    open: bool,
    /// Its `agent_say` record went out.
    said: bool,
    playout: Playout,
    turn: Turn,
    next_to_synth: usize,
    in_flight: usize,
    requested_at: u64,
    /// Last sign of life: audio from TTS, a frame out, a mark back.
    progress_at: u64,
    /// When everything was sent: by then plus the queued audio plus MARK_TIMEOUT_MS the last
    /// mark must be back.
    marks_due_at: Option<u64>,
    /// Paused by the caller's voice, until it proves to be a cough or a backchannel (resume)
    /// or a turn (barge-in).
    barge: BargeIn,
}

/// Most agent audio queued at the PBX (20 ms frames) for a pause to silence the caller's ear
/// in time (the PBX plays out what it has).
const PAUSE_MAX_LEAD_FRAMES: usize = 4;

/// The last control action of a call.
#[derive(Debug, Clone)]
enum EndAction {
    Transfer { name: String, target: Target },
    Hangup { reason: String },
}

struct Ending {
    outcome: CallOutcome,
    action: EndAction,
    /// The action has gone out (else it waits for keys still being sent).
    acting: bool,
    seq: u64,
    since: u64,
    /// The human target was tried after another target failed.
    fallback_tried: bool,
}

enum Phase {
    /// Waiting for the PBX to answer.
    Answering {
        since: u64,
    },
    /// Waiting for the dialog's reply to ask `seq` (`barge_in`: as its Begin said).
    Thinking {
        seq: u64,
        since: u64,
        barge_in: bool,
    },
    /// Playing a reply.
    Speaking(Box<Reply>),
    /// Waiting for the caller (no-input at `no_input_at`; None while the caller speaks).
    Listening {
        no_input_at: Option<u64>,
    },
    /// Waiting for the transcripts of the caller's turn.
    Recognizing(Recognition),
    /// Transferring or hanging up.
    Ending(Box<Ending>),
    Ended(CallOutcome),
}

/// The state of one call.
pub struct CallCore {
    cfg: Arc<Config>,
    frame_len: usize,
    /// Agent frames kept sent ahead of real time.
    lead_frames: usize,
    /// One frame of silence, fed to the turn detector when the PBX sends nothing.
    silence: Vec<i16>,
    max_end: u64,
    phase: Phase,
    detector: TurnDetector,
    /// The agent's own voice coming back on the caller's line is not the caller speaking.
    echo: Option<EchoGate>,
    /// Agent frames sent and not yet played at the caller's ear, one played per tick.
    ear: VecDeque<Vec<i16>>,
    digits: DigitCollector,
    /// Keys entered in full during a reply that cannot be interrupted, for the next listen.
    typeahead: Option<String>,
    expect: Expectation,
    ignore_speech: bool,
    /// Onsets not followed by a voice, remembered from reply to reply.
    onsets: barge::OnsetRest,
    /// When the caller's current (or last) utterance began.
    speech_since: u64,
    /// When the caller's last utterance ended (their last voice).
    speech_ended_at: u64,
    inbound: VecDeque<Vec<i16>>,
    last_inbound_ms: Option<u64>,
    dropped_inbound: u64,
    times: TurnTimes,
    dialog_limit_ms: u64,
    reply_seq: u64,
    next_mark: u64,
    dialog_seq: u64,
    /// The transcriptions of the caller's turn in progress.
    heard: Transcripts,
    /// A reply being made ahead.
    ahead: ReplyAhead<Event>,
    /// The utterance is streamed to the recognizer as it comes (`Action::StreamAudio`).
    stream_asr: bool,
    control_seq: u64,
    /// Key sends not yet answered.
    dtmf_in_flight: u32,
    actions: VecDeque<Action>,
}

/// Collects what a playout tick sends as actions, and keeps each frame for the echo gate's
/// picture of what the caller's ear gets (`ear`: the PBX plays one frame per tick).
struct Outbox<'a> {
    actions: &'a mut VecDeque<Action>,
    ear: Option<&'a mut VecDeque<Vec<i16>>>,
}

impl MediaLink for Outbox<'_> {
    fn send_audio(&mut self, frame: &[i16]) -> Result<(), LinkError> {
        if let Some(ear) = self.ear.as_mut()
            && ear.len() < EAR_MAX
        {
            ear.push_back(frame.to_vec());
        }
        self.actions.push_back(Action::SendAudio(frame.to_vec()));
        Ok(())
    }
    fn mark(&mut self, id: u64) -> Result<(), LinkError> {
        self.actions.push_back(Action::Mark(id));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), LinkError> {
        if let Some(ear) = self.ear.as_mut() {
            ear.clear();
        }
        self.actions.push_back(Action::Flush);
        Ok(())
    }
}

/// A `transcript` record's fields, with where the transcript came from: the streaming
/// recognizer, or why it fell back to the batch engine.
fn transcript_fields(t: &Transcript, mut fields: Value) -> Value {
    if t.streamed {
        fields["streamed"] = json!(true);
    }
    if let Some(why) = &t.fallback {
        fields["stream_fallback"] = json!(why);
    }
    fields
}

impl CallCore {
    /// A call at the call's time zero, with `vad` deciding speech.
    pub fn new(cfg: Arc<Config>, vad: Box<dyn Vad>) -> Self {
        let rate = cfg.call.sample_rate;
        let frame_len = samples_per_frame(rate);
        let dialog_limit_ms = cfg.dialog.timeout_ms;
        let detector =
            TurnDetector::new(&cfg.vad, Endpointing::new(&cfg.vad, &cfg.turn, false), vad);
        let digits = DigitCollector::new(
            cfg.dtmf.inter_digit_timeout_ms,
            cfg.dtmf.max_digits,
            cfg.dtmf.terminator.chars().next(),
        );
        let max_end = cfg.call.max_duration_s.saturating_mul(1_000);
        let echo = cfg
            .vad
            .echo
            .enabled
            .then(|| EchoGate::new(rate, &cfg.vad.echo));
        Self {
            lead_frames: cfg.call.playout_lead_frames,
            cfg,
            frame_len,
            silence: vec![0; frame_len],
            max_end,
            phase: Phase::Answering { since: 0 },
            detector,
            echo,
            ear: VecDeque::new(),
            digits,
            typeahead: None,
            expect: Expectation::default(),
            ignore_speech: false,
            onsets: barge::OnsetRest::default(),
            speech_since: 0,
            speech_ended_at: 0,
            inbound: VecDeque::with_capacity(INBOUND_MAX),
            last_inbound_ms: None,
            dropped_inbound: 0,
            times: TurnTimes::default(),
            dialog_limit_ms,
            reply_seq: 0,
            next_mark: 1,
            dialog_seq: 0,
            heard: Transcripts::default(),
            ahead: ReplyAhead::default(),
            stream_asr: false,
            control_seq: 0,
            dtmf_in_flight: 0,
            actions: VecDeque::new(),
        }
    }

    /// Streams each utterance to the recognizer while the caller speaks: the driver's engine
    /// transcribes that way.
    pub fn with_stream_asr(mut self, on: bool) -> Self {
        self.stream_asr = on;
        self
    }

    /// Asks the end-of-turn model at each pause (`turn.*`): the driver has it loaded.
    pub fn with_turn_model(mut self, loaded: bool) -> Self {
        self.detector
            .set_endpointing(Endpointing::new(&self.cfg.vad, &self.cfg.turn, loaded));
        self
    }

    /// Keeps `frames` of agent audio sent ahead of real time (a link that plays in chunks).
    pub fn with_lead_frames(mut self, frames: usize) -> Self {
        self.lead_frames = frames;
        self
    }

    /// The dialog's limit for one turn, when its engine needs longer than `dialog.timeout_ms`
    /// (an LLM agent's model rounds and tools); never shorter.
    pub fn with_dialog_limit(mut self, ms: u64) -> Self {
        self.dialog_limit_ms = self.dialog_limit_ms.max(ms);
        self
    }

    /// Starts the call at `now`: records it and asks the PBX to answer.
    pub fn start(&mut self, now: u64, call_id: &str, flow: &str) {
        self.record(
            now,
            "call_start",
            json!({"call_id": call_id, "flow": flow, "rate": self.cfg.call.sample_rate}),
        );
        self.phase = Phase::Answering { since: now };
        self.actions.push_back(Action::Answer);
    }

    /// The next action to perform, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Where the call is.
    pub fn phase(&self) -> PhaseName {
        match &self.phase {
            Phase::Answering { .. } => PhaseName::Answering,
            Phase::Thinking { .. } => PhaseName::Thinking,
            Phase::Speaking(_) => PhaseName::Speaking,
            Phase::Listening { .. } => PhaseName::Listening,
            Phase::Recognizing(_) => PhaseName::Recognizing,
            Phase::Ending(_) => PhaseName::Ending,
            Phase::Ended(_) => PhaseName::Ended,
        }
    }

    /// The call's tick moved against the PBX's clock (see `tick_phase`).
    pub fn clock_moved(&mut self) {
        if let Some(gate) = self.echo.as_mut() {
            gate.clock_moved();
        }
    }

    /// How the call ended, once it has.
    pub fn outcome(&self) -> Option<&CallOutcome> {
        match &self.phase {
            Phase::Ended(o) => Some(o),
            _ => None,
        }
    }

    /// When the current phase gives up on what it waits for (ms on the call clock); the call's
    /// own limit (`max_duration_s`) caps every phase but the end.
    pub fn deadline(&self) -> Option<u64> {
        let backstop =
            |since: u64, limit: u64| since.saturating_add(limit).saturating_add(BACKSTOP_MS);
        let own = match &self.phase {
            Phase::Answering { since } => Some(backstop(*since, CONTROL_TIMEOUT_MS)),
            Phase::Thinking { since, .. } => Some(backstop(*since, self.dialog_limit_ms)),
            // The oldest transcript still out; with all in, the caller still talking (the
            // detector ends an utterance at max_utterance_ms).
            Phase::Recognizing(r) => Some(r.pending_since().map_or_else(
                || self.speech_bound(),
                |since| backstop(since, self.asr_limit_ms()),
            )),
            // While the caller talks or types, no-input waits: the utterance or the entry
            // ends by its own limit.
            Phase::Listening { .. } if self.detector.in_speech() => Some(self.speech_bound()),
            Phase::Listening { .. } if !self.digits.is_empty() => Some(self.digits.due_at()),
            Phase::Listening { no_input_at } => *no_input_at,
            Phase::Speaking(r) => Some(
                r.marks_due_at
                    .unwrap_or_else(|| r.progress_at.saturating_add(SPEAKING_STALL_MS)),
            ),
            Phase::Ending(e) => return Some(backstop(e.since, CONTROL_TIMEOUT_MS)),
            Phase::Ended(_) => return None,
        };
        Some(own.map_or(self.max_end, |d| d.min(self.max_end)))
    }

    /// By when the utterance in progress has ended (the detector cuts it at max_utterance_ms).
    fn speech_bound(&self) -> u64 {
        self.speech_since
            .saturating_add(self.cfg.vad.max_utterance_ms)
            .saturating_add(self.cfg.vad.end_silence_ms)
            .saturating_add(BACKSTOP_MS)
    }

    /// The driver's limit on one transcription (the engine's own budget plus a margin).
    pub fn asr_limit_ms(&self) -> u64 {
        self.cfg.asr.timeout_ms.saturating_add(2_000)
    }

    /// Handles one event at `now` (ms since the call's start).
    pub fn handle(&mut self, now: u64, ev: Event) {
        if matches!(self.phase, Phase::Ended(_)) {
            return;
        }
        if let Some(a) = self.ahead.seq()
            && matches!(&ev, Event::DialogPart { seq, .. } | Event::DialogDone { seq, .. }
                | Event::Dialog { seq, .. } if *seq == a)
        {
            return self.on_ahead(ev);
        }
        match ev {
            Event::Tick => self.on_tick(now),
            Event::Media(m) => self.on_media(now, m),
            Event::Answered(r) => self.on_answered(now, r),
            Event::Asr { seq, result, ms } => self.on_asr(now, seq, result, ms),
            Event::TurnVerdict { id, result } => self.on_verdict(now, id, result),
            Event::AsrSkipped { seq } => self.drop_speculation(seq),
            Event::Dialog { seq, result, ms } => match result {
                Ok(turn) => {
                    let barge_in = turn.barge_in;
                    self.on_part(now, seq, ReplyPart::Begin { barge_in });
                    for s in turn.say {
                        self.on_part(now, seq, ReplyPart::Say(s));
                    }
                    let (send_dtmf, next) = (turn.send_dtmf, turn.next);
                    self.on_part(now, seq, ReplyPart::End { send_dtmf, next });
                    self.on_dialog_done(now, seq, Ok(()), ms);
                }
                Err(e) => self.on_dialog_done(now, seq, Err(e), ms),
            },
            Event::DialogPart { seq, part } => self.on_part(now, seq, part),
            Event::DialogDone { seq, result, ms } => self.on_dialog_done(now, seq, result, ms),
            Event::TtsAudio {
                reply,
                seg,
                samples,
                first_ms,
            } => self.on_tts_audio(now, reply, seg, &samples, first_ms),
            Event::TtsFailed {
                reply,
                seg,
                message,
            } => {
                let Some(r) = self.reply_mut(reply) else {
                    return;
                };
                r.playout.synth_done(seg);
                r.progress_at = now;
                self.error(now, "tts", message);
            }
            Event::TtsDone { reply, seg } => {
                let Phase::Speaking(r) = &mut self.phase else {
                    return;
                };
                if r.id != reply {
                    return;
                }
                r.playout.synth_done(seg);
                r.in_flight = r.in_flight.saturating_sub(1);
                r.progress_at = now;
                Self::pump_tts(r, &mut self.actions);
            }
            Event::DtmfSent(r) => self.on_dtmf_sent(now, r),
            Event::ControlDone { seq, result } => self.on_control_done(now, seq, result),
        }
    }

    fn record(&mut self, at_ms: u64, kind: &'static str, fields: Value) {
        self.actions.push_back(Action::Record {
            at_ms,
            kind,
            fields,
        });
    }

    fn error(&mut self, now: u64, stage: &'static str, message: String) {
        tracing::warn!(stage, %message, "call error");
        metrics::counter!(names::ERRORS, "stage" => stage).increment(1);
        self.record(now, "error", json!({"stage": stage, "message": message}));
    }

    /// Whether the reply playing now may be interrupted by the caller: the turn allows it, the
    /// config allows it, and it waits for the caller after it (a farewell before a transfer or
    /// a hangup always plays to its end, and its keys always go out).
    fn interruptible(&self) -> bool {
        match &self.phase {
            Phase::Speaking(r) => {
                r.turn.barge_in && self.cfg.vad.barge_in && matches!(r.turn.next, Next::Listen(_))
            }
            _ => false,
        }
    }

    fn reply_mut(&mut self, id: u64) -> Option<&mut Reply> {
        match &mut self.phase {
            Phase::Speaking(r) if r.id == id => Some(r),
            _ => None,
        }
    }

    fn ending(&self) -> bool {
        matches!(self.phase, Phase::Ending(_) | Phase::Ended(_))
    }

    /// Asks the dialog for a turn; the call thinks until it answers.
    fn ask(&mut self, now: u64, cmd: DialogCmd) {
        self.flush_turn(true);
        self.times.first_piece_ms = None;
        self.times.llm = None;
        self.times.dialog_done = false;
        let words = match &cmd {
            DialogCmd::Input(Input::Speech(t)) => Some(t.as_str()),
            _ => None,
        };
        match self.ahead.take_for(now, words) {
            Taken::Adopt(a) => return self.adopt(now, a),
            Taken::Discard(seq) => self.discard(seq),
            Taken::Nothing => {}
        }
        self.dialog_seq += 1;
        let seq = self.dialog_seq;
        self.actions.push_back(Action::Dialog { seq, cmd });
        self.phase = Phase::Thinking {
            seq,
            since: now,
            barge_in: true,
        };
    }

    /// The caller's turn ended on the words the reply was made ahead for: it is the reply.
    fn adopt(&mut self, now: u64, a: Adopted<Event>) {
        self.times.reply_ahead = Some((a.ready, a.ahead_ms));
        self.actions.push_back(Action::Dialog {
            seq: a.seq,
            cmd: DialogCmd::Adopt,
        });
        self.phase = Phase::Thinking {
            seq: a.seq,
            since: now,
            barge_in: true,
        };
        for ev in a.events {
            self.handle(now, ev);
        }
    }

    /// The dialog's reply to the transcript of a pause, made ahead: kept (its first sentence
    /// synthesized into the cache) until the turn ends; a failed one is forgotten.
    fn on_ahead(&mut self, ev: Event) {
        let said = match &ev {
            Event::DialogPart {
                part: ReplyPart::Say(s),
                ..
            } => Some(s.text.clone()),
            _ => None,
        };
        let seen = match (&ev, &said) {
            (
                Event::DialogDone { result: Err(e), .. } | Event::Dialog { result: Err(e), .. },
                _,
            ) => {
                tracing::debug!(error = %e, "no reply ahead");
                ahead::Seen::Failed
            }
            (Event::DialogDone { .. }, _) => ahead::Seen::Done,
            (_, Some(text)) => ahead::Seen::Say(text),
            _ => ahead::Seen::Other,
        };
        match self.ahead.on_part(seen, ev) {
            Step::Kept | Step::Forgotten => {}
            Step::Prefetch(text) => self.actions.push_back(Action::Prefetch { text }),
            Step::Discard(seq) => self.discard(seq),
        }
    }

    /// The caller went on, or did something else: the reply made ahead is dropped.
    fn drop_ahead(&mut self) {
        if let Some(seq) = self.ahead.cancel() {
            self.discard(seq);
        }
    }

    /// Tells the dialog to forget the reply it made ahead (`seq`).
    fn discard(&mut self, seq: u64) {
        self.actions.push_back(Action::Dialog {
            seq,
            cmd: DialogCmd::Discard,
        });
    }

    /// With the transcript of a pause in a turn that is the caller's, the reply is made ahead.
    fn reply_ahead(&mut self, now: u64, text: &str) {
        let want = Want {
            enabled: self.cfg.turn.reply_ahead,
            theirs: matches!(self.phase, Phase::Listening { .. }) && !self.ignore_speech,
            parts_pending: self.heard.has_parts(),
            text,
        };
        if !self.ahead.wanted(want) {
            return;
        }
        self.dialog_seq += 1;
        let seq = self.dialog_seq;
        self.actions.push_back(Action::Dialog {
            seq,
            cmd: DialogCmd::Ahead(Input::Speech(text.trim().to_string())),
        });
        self.ahead.start(seq, text, now);
    }

    fn tell_heard(&mut self, heard: Heard) {
        self.actions.push_back(Action::Dialog {
            seq: self.dialog_seq,
            cmd: DialogCmd::Heard(heard),
        });
    }

    fn on_answered(&mut self, now: u64, r: Result<(), ControlError>) {
        if !matches!(self.phase, Phase::Answering { .. }) {
            return;
        }
        match r {
            Ok(()) => self.ask(now, DialogCmd::Start),
            Err(e) => {
                self.error(now, "answer", e.to_string());
                self.end(
                    now,
                    CallOutcome::Failed {
                        stage: "answer".into(),
                    },
                );
            }
        }
    }

    // ---- speaking ----

    /// Starts playing a reply from the dialog.
    fn play(&mut self, now: u64, turn: Turn) {
        self.take_reply();
        let text = prompt::joined(&turn.say);
        if !text.is_empty() {
            self.record(
                now,
                "agent_say",
                json!({"text": text, "barge_in": turn.barge_in}),
            );
        }
        self.reply_seq += 1;
        let playout = Playout::new(&turn.say, self.next_mark, self.frame_len, self.lead_frames);
        self.next_mark = self
            .next_mark
            .saturating_add(u64::try_from(turn.say.len()).unwrap_or(u64::MAX))
            .saturating_add(1);
        let empty = turn.say.is_empty();
        let mut reply = Box::new(Reply {
            id: self.reply_seq,
            dialog_seq: None,
            open: false,
            said: true,
            playout,
            turn,
            next_to_synth: 0,
            in_flight: 0,
            requested_at: now,
            progress_at: now,
            marks_due_at: None,
            barge: BargeIn::default(),
        });
        Self::pump_tts(&mut reply, &mut self.actions);
        self.phase = Phase::Speaking(reply);
        if empty {
            self.reply_finished(now, true);
        }
    }

    /// Keeps up to TTS_AHEAD segments synthesizing.
    fn pump_tts(reply: &mut Reply, actions: &mut VecDeque<Action>) {
        while reply.in_flight < TTS_AHEAD && reply.next_to_synth < reply.turn.say.len() {
            let seg = reply.next_to_synth;
            reply.next_to_synth += 1;
            let text = reply.turn.say[seg].text.clone();
            if text.trim().is_empty() {
                continue;
            }
            reply.in_flight += 1;
            actions.push_back(Action::Synthesize {
                reply: reply.id,
                seg,
                text,
            });
        }
    }

    /// Leaves the speaking phase without a word (its caller sets the next phase): synthesis
    /// in flight is dropped. Returns the reply.
    fn take_reply(&mut self) -> Option<Box<Reply>> {
        if !matches!(self.phase, Phase::Speaking(_)) {
            return None;
        }
        // A placeholder until the caller sets the real next phase.
        let Phase::Speaking(r) =
            std::mem::replace(&mut self.phase, Phase::Listening { no_input_at: None })
        else {
            return None;
        };
        self.actions.push_back(Action::CancelTts { reply: r.id });
        // A streamed reply's marks were numbered as its parts came: the next reply's start after.
        self.next_mark = self
            .next_mark
            .max(r.playout.mark_range().end.saturating_add(1));
        self.flush_turn(true);
        let text = r.playout.text();
        if !r.said && !text.is_empty() {
            // Cut before the dialog finished it: what it had said so far.
            self.actions.push_back(Action::Record {
                at_ms: r.progress_at,
                kind: "agent_say",
                fields: json!({"text": text, "barge_in": r.turn.barge_in, "partial": true}),
            });
        }
        Some(r)
    }

    fn on_tts_audio(
        &mut self,
        now: u64,
        reply: u64,
        seg: usize,
        samples: &[i16],
        first_ms: Option<u64>,
    ) {
        let Phase::Speaking(r) = &mut self.phase else {
            return;
        };
        if r.id != reply {
            return;
        }
        r.playout.add_audio(seg, samples);
        r.progress_at = now;
        let started = r.playout.started();
        if let Some(ms) = first_ms
            && seg == 0
            && self.times.tts_ms.is_none()
        {
            self.times.tts_ms = Some(ms);
            metrics::histogram!(names::STAGE_SECONDS, "stage" => "tts").record(ms as f64 / 1000.0);
        }
        // The first audio of a reply goes out now, not at the next tick.
        if !started {
            self.playout_step(now);
        }
    }

    /// Sends the agent audio due now; stamps the turn when a reply's first audio goes out.
    fn playout_step(&mut self, now: u64) {
        let Phase::Speaking(r) = &mut self.phase else {
            return;
        };
        if r.marks_due_at.is_none() && r.playout.all_sent() {
            r.marks_due_at = Some(
                now.saturating_add(r.playout.queued_ms())
                    .saturating_add(MARK_TIMEOUT_MS),
            );
        }
        let mut out = Outbox {
            actions: &mut self.actions,
            ear: self.echo.is_some().then_some(&mut self.ear),
        };
        let tick = match r.playout.tick(&mut out) {
            Ok(t) => t,
            Err(_) => return, // the outbox never refuses
        };
        if tick.frames > 0 {
            r.progress_at = now;
        }
        if !tick.first_audio {
            return;
        }
        let requested_at = r.requested_at;
        let tts_wait = now.saturating_sub(requested_at);
        self.record(now, "playout_start", json!({}));
        if let Some(end) = self.times.speech_end.take() {
            let total = now.saturating_sub(end);
            let tts_ms = self.times.tts_ms.unwrap_or(tts_wait);
            metrics::histogram!(names::TURN_SECONDS).record(total as f64 / 1000.0);
            metrics::histogram!(names::STAGE_SECONDS, "stage" => "endpoint")
                .record(self.times.endpoint_ms as f64 / 1000.0);
            let t = &self.times;
            let mut fields = serde_json::Map::new();
            for (k, v) in [
                ("endpoint_ms", t.endpoint_ms),
                ("asr_ms", t.asr_ms),
                ("asr_queue_ms", t.asr_queue_ms),
                ("asr_early_ms", t.asr_early_ms),
                ("tts_ms", tts_ms),
                ("total_ms", total),
            ] {
                fields.insert(k.into(), json!(v));
            }
            if let Some(p) = t.turn_probability {
                fields.insert("turn_probability".into(), json!(p));
            }
            if let Some((ready, ms)) = t.reply_ahead {
                fields.insert("reply_ahead".into(), json!(ready));
                fields.insert("reply_ahead_ms".into(), json!(ms));
            }
            self.times.pending = Some((now, requested_at, fields));
            self.flush_turn(false);
        }
    }

    /// Writes the `turn` record once the dialog is done with the ask (or at once when
    /// `force`: the reply was cut or the call moves on), with the model's times when a model
    /// made the reply.
    fn flush_turn(&mut self, force: bool) {
        if !force && !self.times.dialog_done {
            return;
        }
        let Some((at, tts_requested_at, mut fields)) = self.times.pending.take() else {
            return;
        };
        let t = &self.times;
        fields.insert("dialog_ms".into(), json!(t.dialog_ms));
        if let Some(ms) = t.first_piece_ms {
            fields.insert("first_piece_ms".into(), json!(ms));
            metrics::histogram!(names::FIRST_PIECE_SECONDS).record(ms as f64 / 1000.0);
        }
        if let Some(l) = t.llm {
            fields.insert("llm_ttft_ms".into(), json!(l.ttft_ms));
            fields.insert("llm_total_ms".into(), json!(l.total_ms));
            fields.insert("llm_rounds".into(), json!(l.rounds));
            if let Some(ms) = l.ttft_ms {
                metrics::histogram!(names::LLM_TTFT_SECONDS).record(ms as f64 / 1000.0);
            }
            if let Some(ms) = l.total_ms {
                metrics::histogram!(names::LLM_TOTAL_SECONDS).record(ms as f64 / 1000.0);
            }
            // sidecall's own share: from the first token to the first TTS request and audio.
            if let Some(tok) = l.first_token_at_ms {
                fields.insert(
                    "token_to_tts_ms".into(),
                    json!(tts_requested_at.saturating_sub(tok)),
                );
                fields.insert("token_to_audio_ms".into(), json!(at.saturating_sub(tok)));
            }
            if let Some(piece) = l.first_piece_at_ms {
                fields.insert(
                    "piece_to_tts_ms".into(),
                    json!(tts_requested_at.saturating_sub(piece)),
                );
            }
        }
        self.record(at, "turn", Value::Object(fields));
    }

    /// The reply has played (or is taken as played): the dialog hears what was said, keys go
    /// out, and the turn's `next` happens.
    fn reply_finished(&mut self, now: u64, complete: bool) {
        let was_interruptible = self.interruptible();
        let Some(r) = self.take_reply() else { return };
        // A short utterance over it still being transcribed is the caller's answer now.
        let checking = r
            .barge
            .pause()
            .and_then(|p| p.checking.map(|seq| (seq, *p)));
        let text = r.playout.text();
        self.record(
            now,
            "playout_end",
            json!({"heard": text, "complete": complete}),
        );
        self.tell_heard(Heard { text, complete });
        let Turn {
            send_dtmf, next, ..
        } = r.turn;
        if let Some(digits) = send_dtmf {
            self.record(now, "dtmf_sent", json!({"digits": digits}));
            self.dtmf_in_flight = self.dtmf_in_flight.saturating_add(1);
            self.actions.push_back(Action::SendDtmf(digits));
        }
        self.finish_next(now, next, was_interruptible);
        if let Some((seq, p)) = checking {
            if matches!(self.phase, Phase::Listening { .. }) {
                self.recognize_checked(now, seq, &p);
            } else {
                self.actions.push_back(Action::CancelAsr);
            }
        }
    }

    /// The short utterance over a reply, still being transcribed (`seq`), is the caller's turn.
    fn recognize_checked(&mut self, now: u64, seq: u64, p: &barge::Pause) {
        self.times = TurnTimes {
            speech_end: Some(p.speech_end),
            endpoint_ms: p.endpoint_ms,
            ..TurnTimes::default()
        };
        self.phase = Phase::Recognizing(Recognition::asked(seq, now));
    }

    /// Drops what the PBX has queued of the agent's audio (and the ear's picture of it).
    fn flush_pbx(&mut self) {
        self.ear.clear();
        self.actions.push_back(Action::Flush);
    }

    /// Stops a reply at once (barge-in, the human key, the end of the call): nothing more is
    /// sent, the PBX drops what it has queued, synthesis stops. Returns the reply and what the
    /// caller heard of it.
    fn cut_reply(&mut self) -> Option<(Box<Reply>, Heard)> {
        let mut r = self.take_reply()?;
        let heard = r.playout.stop();
        self.flush_pbx();
        Some((r, heard))
    }

    /// Cuts a reply and records what was heard of it.
    fn cut_reply_recorded(&mut self, now: u64) -> Option<(Box<Reply>, Heard)> {
        let (r, heard) = self.cut_reply()?;
        self.record(
            now,
            "playout_end",
            json!({"heard": heard.text, "complete": false}),
        );
        Some((r, heard))
    }

    /// The caller interrupted: stop in this tick, tell the dialog what was heard.
    fn barge_in(&mut self, now: u64, by: &str) {
        if !matches!(self.phase, Phase::Speaking(_)) {
            return;
        }
        metrics::counter!(names::BARGE_INS).increment(1);
        self.record(now, "barge_in", json!({"by": by}));
        let Some((r, heard)) = self.cut_reply_recorded(now) else {
            return;
        };
        // A short utterance still being transcribed is the start of the caller's turn.
        let checking = r
            .barge
            .pause()
            .and_then(|p| p.checking.map(|seq| (seq, *p)));
        self.tell_heard(heard);
        match r.turn.next {
            Next::Listen(exp) => {
                self.listen(now, exp);
                if let Some((seq, p)) = checking {
                    self.flush_turn(true);
                    self.recognize_checked(now, seq, &p);
                }
            }
            // Replies that end the call are never interrupted (see `interruptible`).
            other => self.finish_next(now, other, true),
        }
    }

    /// What follows a reply. `was_interruptible`: the caller could talk over that reply (speech
    /// that began during it is an answer; over one that could not be interrupted, it is not).
    fn finish_next(&mut self, now: u64, next: Next, was_interruptible: bool) {
        match next {
            Next::Listen(exp) => {
                self.listen(now, exp);
                if self.detector.in_speech() && !was_interruptible {
                    self.ignore_speech = true;
                }
                let typed = self
                    .typeahead
                    .take()
                    .or_else(|| self.digits.complete_now().map(|e| e.digits));
                if let Some(digits) = typed {
                    self.digits_done(now, digits);
                }
            }
            Next::Transfer { target } => self.start_transfer(now, target),
            Next::Hangup { reason } => self.start_hangup(now, reason),
        }
    }

    // ---- listening and recognizing ----

    fn listen(&mut self, now: u64, exp: Expectation) {
        self.digits.expect(exp.digits.clone());
        self.detector.expect(&exp);
        self.expect = exp;
        self.phase = Phase::Listening {
            no_input_at: Some(now.saturating_add(self.cfg.call.no_input_timeout_ms)),
        };
    }

    /// Gives a streaming recognizer what the utterance gained with the last frame, before the
    /// frame's event is acted on (a commit at a pause or at the end covers that frame too).
    fn stream_audio(&mut self, ev: Option<&TurnEvent>) {
        if !self.stream_asr {
            return;
        }
        let d = &self.detector;
        if let Some((begin, audio)) = self.heard.stream(ev, d.in_speech(), d.utterance()) {
            self.actions.push_back(Action::StreamAudio { begin, audio });
        }
    }

    /// Asks for a transcription.
    fn transcribe(&mut self, req: Request, hint: Option<String>) {
        self.actions.push_back(Action::Transcribe {
            seq: req.seq,
            audio: req.audio,
            hint,
            speculative: req.speculative,
            span: req.span,
        });
    }

    fn on_turn_event(&mut self, now: u64, ev: TurnEvent) {
        match ev {
            TurnEvent::SpeechStart { voiced_ms } => {
                self.heard.speech_start();
                self.record(now, "speech_start", json!({"voiced_ms": voiced_ms}));
                self.speech_since = now.saturating_sub(voiced_ms);
                let interruptible = self.interruptible();
                match &mut self.phase {
                    Phase::Listening { no_input_at } => *no_input_at = None,
                    Phase::Speaking(_) => self.ignore_speech = !interruptible,
                    _ => {}
                }
            }
            TurnEvent::Pause {
                id,
                audio,
                part_from,
            } => self.on_pause(now, id, audio, part_from),
            TurnEvent::Resumed { id } => {
                // The caller goes on: the reply to their words so far is not the reply.
                self.drop_ahead();
                self.heard.resumed(id);
            }
            TurnEvent::SpeechEnd {
                audio,
                from,
                speech_ms,
                endpoint_ms,
                cut,
                check,
            } => {
                let mut fields =
                    json!({"speech_ms": speech_ms, "endpoint_ms": endpoint_ms, "cut": cut});
                if let Some(p) = check.as_ref().and_then(|c| c.probability) {
                    fields["turn_probability"] = json!(p);
                }
                self.record(now, "speech_end", fields);
                let ignored = std::mem::take(&mut self.ignore_speech);
                // A short utterance over a paused reply: a backchannel, or the caller's turn?
                // Its transcript says; the reply stays paused meanwhile.
                // A second utterance while the first is checked: the caller is talking, not
                // acknowledging; both are their turn, joined (the first is still transcribed).
                // Too long for a backchannel though with little voice (words with gaps): the
                // caller's turn, heard in full below.
                let limits = self.barge_limits();
                let seq = self.heard.next_seq();
                let decision = match &mut self.phase {
                    Phase::Speaking(r) => {
                        r.barge
                            .utterance_end(now, speech_ms, endpoint_ms, ignored, seq, &limits)
                    }
                    _ => None,
                };
                match decision {
                    Some(Decision::BargeIn) => self.barge_in(now, "speech"),
                    Some(Decision::Check) => {
                        self.heard.forget();
                        let req = self.heard.ask(audio, from, false);
                        return self.transcribe(req, None);
                    }
                    _ => {}
                }
                let listening = matches!(self.phase, Phase::Listening { .. });
                let recognizing = matches!(self.phase, Phase::Recognizing(_));
                if ignored || !(listening || recognizing) {
                    // Speech over a prompt, or while the dialog thinks or the call ends.
                    self.heard.forget();
                    if let Phase::Listening { no_input_at } = &mut self.phase {
                        *no_input_at = Some(now.saturating_add(self.cfg.call.no_input_timeout_ms));
                    }
                    return;
                }
                self.flush_turn(true);
                self.speech_ended_at = now.saturating_sub(endpoint_ms);
                self.times = TurnTimes {
                    speech_end: Some(now.saturating_sub(endpoint_ms)),
                    endpoint_ms,
                    turn_probability: check.as_ref().and_then(|c| c.probability),
                    ..TurnTimes::default()
                };
                // The transcription started at the pause is this turn's, if its audio is; the
                // parts before it too.
                let ended = self.heard.end(now, check.map(|c| c.id), audio, from);
                if let Some(req) = ended.request {
                    self.transcribe(req, self.expect.asr_hint.clone());
                }
                self.times.asr_early_ms = ended.early_ms.unwrap_or(0);
                if !matches!(self.phase, Phase::Recognizing(_)) {
                    self.phase = Phase::Recognizing(Recognition::default());
                }
                if let Phase::Recognizing(r) = &mut self.phase {
                    for (seq, since) in ended.asked {
                        r.expect(seq, since);
                    }
                }
                // Transcribed while the turn was still open: ready now.
                for (seq, (result, ms)) in ended.answered {
                    if seq == ended.last {
                        self.times.asr_early_ms = ms;
                    }
                    self.on_asr(now, seq, result, ms);
                }
            }
        }
    }

    /// The caller paused: while the turn is theirs (not over a reply), the end-of-turn model
    /// is asked and the audio so far transcribed, so that a complete utterance ends the turn
    /// at once with its transcript ready.
    fn on_pause(&mut self, now: u64, id: u64, audio: Vec<i16>, part_from: usize) {
        let theirs = matches!(self.phase, Phase::Listening { .. } | Phase::Recognizing(_))
            && !self.ignore_speech;
        if !theirs {
            return self.detector.decline(id);
        }
        self.detector.expect(&self.expect);
        let (model, speculate) = self.detector.checks();
        // The model hears the whole utterance; ASR the part not yet transcribed.
        let req = speculate.then(|| self.heard.pause(now, id, &audio, part_from));
        if model {
            self.actions.push_back(Action::CheckTurn { id, audio });
        }
        if let Some(req) = req {
            self.transcribe(req, self.expect.asr_hint.clone());
        }
    }

    /// The transcription at a pause was not made (the engine was busy).
    fn drop_speculation(&mut self, seq: u64) {
        if let Some(check) = self.heard.skipped(seq) {
            self.detector.transcript(check, None);
        }
    }

    /// The end-of-turn model answered for pause check `id`.
    fn on_verdict(&mut self, now: u64, id: u64, result: Result<Verdict, String>) {
        match result {
            Ok(v) => {
                self.detector.verdict(id, Some(v.probability));
                self.record(
                    now,
                    "turn_check",
                    json!({"probability": v.probability, "infer_ms": v.infer_ms, "wait_ms": v.wait_ms}),
                );
            }
            Err(e) => {
                self.detector.verdict(id, None);
                self.record(now, "turn_check", json!({"error": e}));
            }
        }
    }

    fn on_asr(&mut self, now: u64, seq: u64, result: Result<Transcript, AsrError>, ms: u64) {
        // A transcript of the turn in progress (a pause's, or an earlier part's): it helps
        // decide the end and is kept for it; never given to the dialog unless the turn ends
        // on this audio.
        let (result, ms) = match self.heard.answer(seq, result, ms) {
            Routed::Kept => return,
            Routed::AtPause { check, text } => {
                self.reply_ahead(now, &text);
                return self.detector.transcript(check, Some(text));
            }
            Routed::Dropped { check } => return self.detector.transcript(check, None),
            Routed::Other(result, ms) => (result, ms),
        };
        if let Phase::Speaking(r) = &self.phase
            && r.barge.checking() == Some(seq)
        {
            return self.on_backchannel_check(now, result, ms);
        }
        let Phase::Recognizing(r) = &self.phase else {
            return;
        };
        if !r.waits_for(seq) {
            return;
        }
        // Waiting for the engine and the engine working are told apart: many callers on one
        // ASR server show up as queue, not as a slow engine.
        let (queue_ms, asr_ms) = match &result {
            Ok(t) => (t.queue_ms.min(ms), t.process_ms.min(ms)),
            Err(_) => (0, ms),
        };
        self.times.asr_ms = asr_ms;
        self.times.asr_queue_ms = queue_ms;
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "asr").record(asr_ms as f64 / 1000.0);
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "asr_queue")
            .record(queue_ms as f64 / 1000.0);
        let piece = match result {
            Ok(t) if t.text.trim().is_empty() || is_noise_transcript(&t.text) => {
                self.record(
                    now,
                    "transcript",
                    json!({"text": t.text, "ignored": true, "asr_ms": asr_ms, "asr_queue_ms": queue_ms}),
                );
                Ok(String::new())
            }
            Ok(t) => {
                let fields = transcript_fields(
                    &t,
                    json!({"text": t.text, "asr_ms": asr_ms, "asr_queue_ms": queue_ms}),
                );
                self.record(now, "transcript", fields);
                Ok(t.text.trim().to_string())
            }
            // Failed for good (the engine retried within its budget); acted on once the caller
            // has stopped talking, never over them.
            Err(e) => Err(e.to_string()),
        };
        if let Phase::Recognizing(r) = &mut self.phase {
            r.got(seq, piece);
        }
        self.check_recognized(now, false);
    }

    /// The transcript of a short utterance over a paused reply: acknowledgement (or nothing
    /// to understand) resumes the reply; anything else was the caller taking the turn: the
    /// reply is cut and the words go to the dialog.
    fn on_backchannel_check(&mut self, now: u64, result: Result<Transcript, AsrError>, ms: u64) {
        let Phase::Speaking(r) = &mut self.phase else {
            return;
        };
        let Some(p) = r.barge.pause().copied() else {
            return;
        };
        let times = |asr_ms: u64, asr_queue_ms: u64| TurnTimes {
            speech_end: Some(p.speech_end),
            endpoint_ms: p.endpoint_ms,
            asr_ms,
            asr_queue_ms,
            ..TurnTimes::default()
        };
        // This transcript is here (the cut below must not wait for it again): it decides.
        let asking = r.playout.asking();
        let decision = r.barge.transcript(
            result.as_ref().map(|t| t.text.trim()).map_err(|_| ()),
            asking,
        );
        let t = match result {
            Ok(t) => t,
            // Not understood is not "mm-hm": the caller spoke; as on any turn whose ASR fails.
            Err(e) => {
                self.barge_in(now, "speech");
                self.times = times(ms, 0);
                return self.fail(now, "asr", e.to_string());
            }
        };
        let (text, asr_ms, queue_ms) = (
            t.text.trim().to_string(),
            t.process_ms.min(ms),
            t.queue_ms.min(ms),
        );
        let backchannel = decision == Decision::Resume(Resumed::Backchannel);
        let fields = transcript_fields(
            &t,
            json!({"text": text, "asr_ms": asr_ms, "asr_queue_ms": queue_ms, "backchannel": backchannel}),
        );
        self.record(now, "transcript", fields);
        if backchannel {
            return self.resume(now, Resumed::Backchannel);
        }
        self.barge_in(now, "speech");
        if matches!(self.phase, Phase::Listening { .. }) {
            self.times = times(asr_ms, queue_ms);
            self.ask(now, DialogCmd::Input(Input::Speech(text)));
        }
    }

    /// Every transcript is in and the caller is not speaking again (or `force`: the wait for
    /// the caller is over): the dialog gets them as one input, or the error prompt plays when
    /// ASR failed.
    fn check_recognized(&mut self, now: u64, force: bool) {
        let Phase::Recognizing(r) = &self.phase else {
            return;
        };
        let Some(heard) = r.heard() else {
            return;
        };
        if self.detector.in_speech() && !force {
            return;
        }
        match heard {
            Err(e) => self.fail(now, "asr", e),
            // Words that trail off ("my order number is...") wait for the rest of the
            // sentence, up to the silence an unfinished turn gets.
            Ok(text)
                if !force
                    && self
                        .detector
                        .waits_for_rest(&text, now.saturating_sub(self.speech_ended_at)) => {}
            Ok(text) if text.is_empty() => {
                let exp = self.expect.clone();
                self.listen(now, exp);
            }
            Ok(text) => self.ask(now, DialogCmd::Input(Input::Speech(text))),
        }
    }

    /// A part of the dialog's reply: the first thing to say starts the reply, the rest join it
    /// as they come (each goes to TTS at once), the end says what follows it.
    fn on_part(&mut self, now: u64, seq: u64, part: ReplyPart) {
        let current = match &self.phase {
            Phase::Thinking { seq: s, .. } => *s == seq,
            Phase::Speaking(r) => r.dialog_seq == Some(seq),
            _ => false,
        };
        let part = match part {
            ReplyPart::Note { kind, fields } => {
                // What the engine did is recorded even when its reply is gone.
                self.record(now, kind, fields);
                return;
            }
            ReplyPart::Stats(stats) => {
                if current {
                    self.times.llm = Some(stats);
                }
                return;
            }
            ReplyPart::Say(s) if current && self.times.first_piece_ms.is_none() => {
                if let Phase::Thinking { since, .. } = &self.phase {
                    self.times.first_piece_ms = Some(now.saturating_sub(*since));
                }
                ReplyPart::Say(s)
            }
            other => other,
        };
        if let Phase::Thinking {
            seq: s, barge_in, ..
        } = &mut self.phase
        {
            if *s != seq {
                return;
            }
            match part {
                ReplyPart::Begin { barge_in: b } => *barge_in = b,
                ReplyPart::Say(segment) => {
                    let b = *barge_in;
                    self.play_streaming(now, seq, b, segment);
                }
                ReplyPart::Note { .. } | ReplyPart::Stats(_) => {}
                ReplyPart::End { send_dtmf, next } => {
                    let b = *barge_in;
                    self.play(
                        now,
                        Turn {
                            say: Vec::new(),
                            barge_in: b,
                            send_dtmf,
                            next,
                        },
                    );
                }
            }
            return;
        }
        let Phase::Speaking(r) = &mut self.phase else {
            return;
        };
        if !r.open || r.dialog_seq != Some(seq) {
            return;
        }
        match part {
            ReplyPart::Begin { .. } | ReplyPart::Note { .. } | ReplyPart::Stats(_) => {}
            ReplyPart::Say(segment) => {
                r.playout.push(&segment);
                r.turn.say.push(segment);
                r.progress_at = now;
                Self::pump_tts(r, &mut self.actions);
            }
            ReplyPart::End { send_dtmf, next } => {
                r.open = false;
                r.said = true;
                r.playout.close();
                r.turn.send_dtmf = send_dtmf;
                r.turn.next = next;
                let (text, barge_in) = (r.playout.text(), r.turn.barge_in);
                let done = r.playout.finished();
                if !text.is_empty() {
                    self.record(
                        now,
                        "agent_say",
                        json!({"text": text, "barge_in": barge_in}),
                    );
                }
                // Everything said so far may have played already.
                if done {
                    self.reply_finished(now, true);
                }
            }
        }
    }

    /// Starts a reply the dialog is still streaming, with its first segment.
    fn play_streaming(&mut self, now: u64, seq: u64, barge_in: bool, first: prompt::Segment) {
        self.take_reply();
        self.reply_seq += 1;
        let mut playout =
            Playout::new(&[], self.next_mark, self.frame_len, self.lead_frames).streaming();
        playout.push(&first);
        let mut reply = Box::new(Reply {
            id: self.reply_seq,
            dialog_seq: Some(seq),
            open: true,
            said: false,
            playout,
            turn: Turn {
                say: vec![first],
                barge_in,
                send_dtmf: None,
                // Until the dialog says otherwise: wait for the caller.
                next: Next::Listen(self.expect.clone()),
            },
            next_to_synth: 0,
            in_flight: 0,
            requested_at: now,
            progress_at: now,
            marks_due_at: None,
            barge: BargeIn::default(),
        });
        Self::pump_tts(&mut reply, &mut self.actions);
        self.phase = Phase::Speaking(reply);
    }

    /// The dialog is done with an ask: its time is the turn's dialog time; a failure (or a
    /// reply that never came) gets the error prompt.
    fn on_dialog_done(&mut self, now: u64, seq: u64, result: Result<(), DialogError>, ms: u64) {
        let thinking = matches!(self.phase, Phase::Thinking { seq: s, .. } if s == seq);
        let streaming =
            matches!(&self.phase, Phase::Speaking(r) if r.open && r.dialog_seq == Some(seq));
        let answered = matches!(&self.phase, Phase::Speaking(r) if r.dialog_seq == Some(seq));
        if !(thinking || answered) {
            return;
        }
        // A reply made ahead: only its time after the turn was confirmed is waited for.
        let ahead = self.times.reply_ahead.map_or(0, |(_, ms)| ms);
        self.times.dialog_ms = ms.saturating_sub(ahead);
        self.times.dialog_done = true;
        self.flush_turn(false);
        metrics::histogram!(names::STAGE_SECONDS, "stage" => "dialog").record(ms as f64 / 1000.0);
        match result {
            Err(e) if thinking || streaming => self.fail(now, "dialog", e.to_string()),
            Err(_) => {}
            Ok(()) if thinking => self.fail(now, "dialog", "the dialog gave no reply".into()),
            Ok(()) if streaming => {
                tracing::warn!("the dialog ended its reply without saying what follows; listening");
                let next = Next::Listen(self.expect.clone());
                self.on_part(
                    now,
                    seq,
                    ReplyPart::End {
                        send_dtmf: None,
                        next,
                    },
                );
            }
            Ok(()) => {}
        }
    }

    // ---- keys ----

    fn on_digit(&mut self, now: u64, d: char) {
        self.record(now, "dtmf_key", json!({"digit": d.to_string()}));
        // Before the answer there is nothing to act on; after the end, nothing to change.
        if self.ending() || matches!(self.phase, Phase::Answering { .. }) {
            return;
        }
        let human = self.cfg.call.human_key.chars().next();
        if Some(d) == human && self.digits.is_empty() {
            self.cut_reply_recorded(now);
            if matches!(self.phase, Phase::Recognizing(_)) {
                self.actions.push_back(Action::CancelAsr);
            }
            self.record(
                now,
                "dtmf",
                json!({"digits": d.to_string(), "human_key": true}),
            );
            let target = self.cfg.call.human_target.clone();
            let announce = self
                .cfg
                .transfers
                .get(&target)
                .and_then(|t| t.announce.clone());
            let say = announce.map(|a| prompt::segments(&a)).unwrap_or_default();
            self.play(
                now,
                Turn {
                    say,
                    barge_in: false,
                    send_dtmf: None,
                    next: Next::Transfer { target },
                },
            );
            return;
        }
        // A terminator with nothing before it (after an entry that filled up) means nothing.
        if Some(d) == self.digits.terminator() && self.digits.is_empty() {
            return;
        }
        // Typing over a prompt interrupts it, like speaking does.
        if self.interruptible() {
            self.barge_in(now, "dtmf");
        }
        match self.digits.push(d, now) {
            Some(entry) => self.digits_done(now, entry.digits),
            // The entry is still open: the inter-digit timeout ends it; no-input waits meanwhile.
            None => {
                if let Phase::Listening { no_input_at } = &mut self.phase {
                    *no_input_at = Some(now.saturating_add(self.cfg.call.no_input_timeout_ms));
                }
            }
        }
    }

    fn digits_done(&mut self, now: u64, digits: String) {
        self.record(now, "dtmf", json!({"digits": digits}));
        match self.phase {
            Phase::Listening { .. } => {}
            // Keys are the more deliberate answer: they win over speech still being recognized.
            Phase::Recognizing(_) => self.actions.push_back(Action::CancelAsr),
            // Typed ahead (over a prompt that cannot be interrupted, or while the dialog
            // thinks): kept for the next listen.
            Phase::Speaking(_) | Phase::Thinking { .. } => {
                self.typeahead = Some(digits);
                return;
            }
            _ => return,
        }
        self.flush_turn(true);
        self.times = TurnTimes {
            speech_end: Some(now),
            ..TurnTimes::default()
        };
        self.ask(now, DialogCmd::Input(Input::Digits(digits)));
    }

    fn on_dtmf_sent(&mut self, now: u64, r: Result<(), ControlError>) {
        self.dtmf_in_flight = self.dtmf_in_flight.saturating_sub(1);
        if let Err(e) = r {
            self.record(
                now,
                "error",
                json!({"stage": "dtmf", "message": e.to_string()}),
            );
        }
        if let Phase::Ending(e) = &self.phase
            && !e.acting
            && self.dtmf_in_flight == 0
        {
            self.act(now);
        }
    }

    // ---- ending ----

    /// An engine failed for good: play the fallback prompt, then transfer or hang up per config.
    fn fail(&mut self, now: u64, stage: &'static str, message: String) {
        self.error(now, stage, message);
        if self.ending() {
            return;
        }
        let next = if self.cfg.call.on_error == "transfer"
            && self.cfg.transfers.contains_key(&self.cfg.call.human_target)
        {
            Next::Transfer {
                target: self.cfg.call.human_target.clone(),
            }
        } else {
            Next::Hangup {
                reason: format!("{stage}_error"),
            }
        };
        let say = prompt::segments(&self.cfg.call.error_prompt);
        self.play(
            now,
            Turn {
                say,
                barge_in: false,
                send_dtmf: None,
                next,
            },
        );
    }

    fn start_transfer(&mut self, now: u64, name: String) {
        let Some(t) = self.cfg.transfers.get(&name) else {
            self.error(
                now,
                "transfer",
                format!("target `{name}` is not allow-listed; refused"),
            );
            self.record(now, "transfer_refused", json!({"target": name}));
            // The caller was told they are being put through: a human, not silence.
            let human = self.cfg.call.human_target.clone();
            if human != name && self.cfg.transfers.contains_key(&human) {
                return self.start_transfer(now, human);
            }
            let exp = self.expect.clone();
            self.listen(now, exp);
            return;
        };
        let target = Target::from(t);
        self.record(now, "transfer", json!({"target": name}));
        self.begin_end(
            now,
            CallOutcome::Transferred {
                target: name.clone(),
            },
            EndAction::Transfer { name, target },
        );
    }

    fn start_hangup(&mut self, now: u64, reason: String) {
        self.record(now, "hangup", json!({"reason": reason}));
        self.begin_end(
            now,
            CallOutcome::AgentHungUp {
                reason: reason.clone(),
            },
            EndAction::Hangup { reason },
        );
    }

    /// The agent's part is over: the control action goes out once keys being sent are out.
    fn begin_end(&mut self, now: u64, outcome: CallOutcome, action: EndAction) {
        if matches!(self.phase, Phase::Recognizing(_)) {
            self.actions.push_back(Action::CancelAsr);
        }
        self.phase = Phase::Ending(Box::new(Ending {
            outcome,
            action,
            acting: false,
            seq: 0,
            since: now,
            fallback_tried: false,
        }));
        if self.dtmf_in_flight == 0 {
            self.act(now);
        }
    }

    /// Sends the ending's control action.
    fn act(&mut self, now: u64) {
        self.control_seq += 1;
        let seq = self.control_seq;
        let Phase::Ending(e) = &mut self.phase else {
            return;
        };
        e.acting = true;
        e.seq = seq;
        e.since = now;
        self.actions.push_back(match &e.action {
            EndAction::Transfer { name, target } => Action::Transfer {
                seq,
                name: name.clone(),
                target: target.clone(),
            },
            EndAction::Hangup { reason } => Action::Hangup {
                seq,
                reason: reason.clone(),
            },
        });
    }

    fn on_control_done(&mut self, now: u64, seq: u64, result: Result<(), ControlError>) {
        let Phase::Ending(e) = &self.phase else {
            return;
        };
        if !e.acting || e.seq != seq {
            return;
        }
        match result {
            Ok(()) => {
                let outcome = e.outcome.clone();
                self.end(now, outcome);
            }
            Err(err) => self.control_failed(now, err),
        }
    }

    /// The transfer or hangup failed or got no answer. A transfer falls back to the human
    /// target, then to a hangup; a failed hangup ends the call as failed (the adapter sends the
    /// caller to its overflow target).
    fn control_failed(&mut self, now: u64, err: ControlError) {
        let Phase::Ending(e) = &self.phase else {
            return;
        };
        let gone = matches!(err, ControlError::NotFound);
        let stage = match e.action {
            EndAction::Transfer { .. } => "transfer",
            EndAction::Hangup { .. } => "hangup",
        };
        let (action, fallback_tried) = (e.action.clone(), e.fallback_tried);
        self.error(now, stage, err.to_string());
        match action {
            _ if gone => {
                let outcome = match action {
                    EndAction::Hangup { reason } => CallOutcome::AgentHungUp { reason },
                    EndAction::Transfer { .. } => CallOutcome::CallerHungUp,
                };
                self.end(now, outcome);
            }
            EndAction::Transfer { name, .. } => {
                let human = self.cfg.call.human_target.clone();
                let fallback = self
                    .cfg
                    .transfers
                    .get(&human)
                    .filter(|_| !fallback_tried && human != name)
                    .map(Target::from);
                let (outcome, action) = match fallback {
                    Some(target) => {
                        self.record(
                            now,
                            "transfer",
                            json!({"target": human, "why": format!("transfer to `{name}` failed")}),
                        );
                        (
                            CallOutcome::Transferred {
                                target: human.clone(),
                            },
                            EndAction::Transfer {
                                name: human,
                                target,
                            },
                        )
                    }
                    None => {
                        let reason = "transfer_failed".to_string();
                        self.record(now, "hangup", json!({"reason": reason}));
                        (
                            CallOutcome::AgentHungUp {
                                reason: reason.clone(),
                            },
                            EndAction::Hangup { reason },
                        )
                    }
                };
                if let Phase::Ending(e) = &mut self.phase {
                    e.outcome = outcome;
                    e.action = action;
                    e.fallback_tried = true;
                }
                self.act(now);
            }
            EndAction::Hangup { .. } => self.end(
                now,
                CallOutcome::Failed {
                    stage: "hangup".into(),
                },
            ),
        }
    }

    /// The call is over: a reply still playing says what was heard; the record is written.
    fn end(&mut self, now: u64, outcome: CallOutcome) {
        self.cut_reply_recorded(now);
        if matches!(self.phase, Phase::Recognizing(_)) {
            self.actions.push_back(Action::CancelAsr);
        }
        metrics::counter!(names::CALLS_TOTAL, "outcome" => outcome.label()).increment(1);
        self.record(now, "call_end", json!({"outcome": outcome.label()}));
        self.phase = Phase::Ended(outcome);
    }

    // ---- media and the clock ----

    fn push_inbound(&mut self, frame: Vec<i16>) {
        if self.inbound.len() >= INBOUND_MAX {
            self.inbound.pop_front();
            self.dropped_inbound += 1;
            if self.dropped_inbound % 50 == 1 {
                tracing::warn!(
                    dropped = self.dropped_inbound,
                    "inbound audio backlog; dropping oldest frames"
                );
            }
        }
        self.inbound.push_back(frame);
    }

    fn on_media(&mut self, now: u64, ev: MediaEvent) {
        match ev {
            MediaEvent::Audio(frame) => {
                self.last_inbound_ms = Some(now);
                if frame.is_empty() {
                    return;
                }
                // Re-cut to whole frames (a PBX may send short tails or odd sizes); the backlog
                // is bounded in frames, whatever the size of the messages.
                if frame.len() == self.frame_len {
                    self.push_inbound(frame);
                } else {
                    for chunk in frame.chunks(self.frame_len) {
                        let mut f = chunk.to_vec();
                        f.resize(self.frame_len, 0);
                        self.push_inbound(f);
                    }
                }
            }
            MediaEvent::Dtmf(d) => self.on_digit(now, d),
            MediaEvent::MarkPlayed(id) => {
                let done = match &mut self.phase {
                    Phase::Speaking(r) if r.playout.mark_range().contains(&id) => {
                        r.progress_at = now;
                        r.playout.on_mark(id)
                    }
                    _ => false,
                };
                if done {
                    self.reply_finished(now, true);
                }
            }
            MediaEvent::Hangup { cause } => {
                // While ending, the media side closing is the transfer or hangup taking
                // effect: the control action's own answer decides the outcome.
                if !self.ending() {
                    self.record(now, "hangup", json!({"reason": "caller", "cause": cause}));
                    self.end(now, CallOutcome::CallerHungUp);
                }
            }
            MediaEvent::TakenAway { target, why } => {
                self.record(now, "transfer", json!({"target": target, "why": why}));
                self.end(now, CallOutcome::Transferred { target });
            }
        }
    }

    fn on_tick(&mut self, now: u64) {
        // What the caller's ear gets in this tick: the echo gate's reference.
        if let Some(gate) = self.echo.as_mut() {
            let frame = self.ear.pop_front();
            gate.reference(frame.as_deref().unwrap_or(&[]));
            gate.arrivals(self.inbound.len().min(FRAMES_PER_TICK));
        }
        // Inbound audio: what arrived (a few frames per tick at most, so a backlog drains
        // without stalling the tick); silence when the PBX sends nothing.
        let mut processed = 0;
        let mut onset = false;
        while processed < FRAMES_PER_TICK {
            let Some(frame) = self.inbound.pop_front() else {
                break;
            };
            processed += 1;
            let echo = self.echo.as_mut().is_some_and(|g| g.is_echo(&frame));
            let ev = self.detector.push_gated(&frame, echo);
            onset |= self.detector.onset();
            self.stream_audio(ev.as_ref());
            if let Some(ev) = ev {
                self.on_turn_event(now, ev);
            }
        }
        let silent = processed == 0
            && self
                .last_inbound_ms
                .is_none_or(|t| now.saturating_sub(t) >= SILENCE_AFTER_MS);
        if silent {
            let ev = self.detector.push(&self.silence);
            self.stream_audio(ev.as_ref());
            if let Some(ev) = ev {
                self.on_turn_event(now, ev);
            }
        }
        if self.ending() {
            return self.check_deadline(now);
        }
        self.check_barge_in(now, onset, processed > 0 || silent);
        if let Some(entry) = self.digits.tick(now) {
            self.digits_done(now, entry.digits);
        }
        self.check_recognized(now, false);
        self.playout_step(now);
        self.check_deadline(now);
    }

    /// The barge-in decisions of the tick (see `barge`), run after the caller's audio of the
    /// tick (`onset`: a frame of it may be a voice starting; `heard`: it had any) and before
    /// the reply's goes out: a voice pauses the reply now, not next tick.
    fn check_barge_in(&mut self, now: u64, onset: bool, heard: bool) {
        // Every tick: nothing to work out while the agent is not speaking.
        if !matches!(self.phase, Phase::Speaking(_)) {
            return;
        }
        let seen = Seen {
            now,
            voiced_ms: self.detector.voiced_ms(),
            onset,
            heard,
            in_speech: self.detector.in_speech(),
            ignored: self.ignore_speech,
            interruptible: self.interruptible(),
            pausable: self.pausable(),
            ..Seen::default()
        };
        let limits = self.barge_limits();
        let Phase::Speaking(r) = &mut self.phase else {
            return;
        };
        let seen = Seen {
            started: r.playout.started(),
            unsent: r.playout.has_unsent(),
            ..seen
        };
        match r.barge.tick(&seen, &limits, &mut self.onsets) {
            Some(Decision::BargeIn) => self.barge_in(now, "speech"),
            Some(Decision::Resume(why)) => self.resume(now, why),
            Some(Decision::Pause) => {
                r.playout.hold(true);
                // The last mark's deadline counts again from when the rest has been sent.
                r.marks_due_at = None;
                // What the PBX still has queued is dropped now (silent at the ear in this
                // tick) and sent again if the reply resumes.
                let resend = r.playout.unsend_queued();
                let on = match r.barge.pause() {
                    Some(p) if !p.confirmed => "onset",
                    _ => "voice",
                };
                if resend > 0 {
                    self.flush_pbx();
                }
                self.record(now, "pause", json!({"resend_frames": resend, "on": on}));
            }
            Some(Decision::Check) | None => {}
        }
    }

    fn barge_limits(&self) -> barge::Limits {
        let v = &self.cfg.vad;
        barge::Limits {
            barge_in_min_ms: v.barge_in_min_ms,
            backchannel_max_ms: v.backchannel_max_ms,
            resume_after_ms: v.resume_after_ms,
            pause_limit_ms: v
                .end_silence_ms
                .saturating_add(v.backchannel_max_ms)
                .saturating_add(self.asr_limit_ms()),
        }
    }

    /// Whether a pause silences the caller's ear: only when the PBX holds little of the reply
    /// (chan_websocket, AudioSocket, RTP, mod_audio_fork). FreeSWITCH's stock playback has
    /// over a second of files queued that only a cut (`uuid_break`) stops: there the caller's
    /// speech cuts at `barge_in_min_ms` as before.
    fn pausable(&self) -> bool {
        // The reply's own choice (its flow state or agent), else the config's.
        let wanted = match &self.phase {
            Phase::Speaking(r) => match &r.turn.next {
                Next::Listen(e) => e.pause_on_voice,
                _ => None,
            },
            _ => None,
        };
        wanted.unwrap_or(self.cfg.vad.pause_on_voice) && self.lead_frames <= PAUSE_MAX_LEAD_FRAMES
    }

    /// The paused reply goes on from where it stopped.
    fn resume(&mut self, now: u64, why: Resumed) {
        let Phase::Speaking(r) = &mut self.phase else {
            return;
        };
        let Some(p) = r.barge.end() else {
            return;
        };
        r.playout.hold(false);
        r.progress_at = now;
        let paused_ms = now.saturating_sub(p.since);
        self.record(
            now,
            "resume",
            json!({"paused_ms": paused_ms, "by": why.label()}),
        );
    }

    /// What happens when the current phase's deadline has passed.
    fn check_deadline(&mut self, now: u64) {
        let Some(deadline) = self.deadline() else {
            return;
        };
        if now < deadline {
            return;
        }
        if now >= self.max_end && !self.ending() {
            self.cut_reply_recorded(now);
            self.start_hangup(now, "max_duration".into());
            return;
        }
        match &self.phase {
            Phase::Answering { .. } => self.on_answered(
                now,
                Err(ControlError::Timeout(CONTROL_TIMEOUT_MS + BACKSTOP_MS)),
            ),
            Phase::Thinking { .. } => {
                let ms = self.dialog_limit_ms;
                self.fail(now, "dialog", format!("no reply within {ms} ms"));
            }
            Phase::Recognizing(r) => {
                if r.pending_since().is_some() {
                    self.actions.push_back(Action::CancelAsr);
                    let ms = self.asr_limit_ms();
                    self.fail(now, "asr", format!("no transcript within {ms} ms"));
                } else {
                    self.check_recognized(now, true);
                }
            }
            Phase::Listening { no_input_at } => {
                if self.detector.in_speech()
                    || !self.digits.is_empty()
                    || no_input_at.is_none_or(|at| now < at)
                {
                    return;
                }
                self.record(now, "no_input", json!({}));
                self.flush_turn(true);
                self.times = TurnTimes::default();
                self.ask(now, DialogCmd::Input(Input::NoInput));
            }
            Phase::Speaking(r) => {
                if r.marks_due_at.is_some() {
                    tracing::warn!(
                        "playout marks never came back from the PBX; taking the reply as played"
                    );
                    self.record(
                        now,
                        "error",
                        json!({"stage": "playout", "message": "playout marks never came back"}),
                    );
                    self.reply_finished(now, true);
                } else {
                    // TTS (or the media link) gave nothing for a minute: a reply that waits for
                    // the caller becomes the error prompt; one that ends the call ends it now
                    // (the error prompt itself may be what stalled).
                    self.error(
                        now,
                        "tts",
                        format!("no progress in the reply for {SPEAKING_STALL_MS} ms"),
                    );
                    let Some((r, _)) = self.cut_reply_recorded(now) else {
                        return;
                    };
                    match r.turn.next {
                        Next::Listen(_) => self.fail(now, "playout", "reply given up".into()),
                        other => self.finish_next(now, other, false),
                    }
                }
            }
            Phase::Ending(e) => {
                if e.acting {
                    self.control_failed(now, ControlError::Timeout(CONTROL_TIMEOUT_MS));
                } else {
                    // Keys that never finish sending do not hold up the end.
                    self.act(now);
                }
            }
            Phase::Ended(_) => {}
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
