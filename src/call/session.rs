//! The driver of one call: it owns the call's I/O and spawned work and feeds the sans-I/O core
//! (`machine::CallCore`). A 20 ms timer (not the inbound audio) is the call's clock; ASR,
//! dialog, TTS and control requests run as tasks that report back as events on a bounded
//! channel. Every task is owned here and aborted when the call ends: no ASR request, dialog
//! turn or synthesis outlives its call.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

use super::link::{CallControl, ControlError, MediaEvent, MediaLink};
use super::machine::{
    Action, CONTROL_TIMEOUT_MS, CallCore, DialogCmd, Event, PhaseName, TTS_SEGMENT_LIMIT_MS,
};
use super::tick_phase::TickPhase;
use super::vad;
use crate::config::Config;
use crate::engines::asr::realtime::{AsrStream, PendingTranscript};
use crate::engines::asr::{Asr, AsrError, Transcript};
use crate::engines::dialog::{Ask, Dialog, DialogError, ReplyPart, ReplySink};
use crate::engines::endpoint::SmartTurn;
use crate::engines::tts::Tts;
use crate::telemetry::{Recorder, TickStats, names};

pub use super::machine::CallOutcome;

const CONTROL_TIMEOUT: Duration = Duration::from_millis(CONTROL_TIMEOUT_MS);
/// An end-of-turn answer later than this is no use: the silence endpoint has come.
const TURN_CHECK_LIMIT: Duration = Duration::from_secs(2);

/// Everything a call needs.
pub struct CallSetup {
    pub call_id: String,
    pub flow_name: String,
    pub config: Arc<Config>,
    pub dialog: Box<dyn Dialog>,
    pub asr: Arc<dyn Asr>,
    pub tts: Arc<dyn Tts>,
    /// The end-of-turn model, shared by every call (None: silence-only endpointing).
    pub turn: Option<Arc<SmartTurn>>,
    pub link: Box<dyn MediaLink>,
    pub control: Arc<dyn CallControl>,
    pub events: mpsc::Receiver<MediaEvent>,
    pub recorder: Recorder,
    /// Tick timing for benchmarks (None in production).
    pub tick_stats: Option<Arc<TickStats>>,
    /// The call's time zero (default: now). The simulated PBX shares its clock this way.
    pub origin: Option<Instant>,
}

/// The active-calls gauge, held for the life of a call: decremented on every exit, a panic
/// included.
struct ActiveCall;

impl ActiveCall {
    fn new() -> Self {
        metrics::gauge!(names::CALLS_ACTIVE).increment(1.0);
        ActiveCall
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        metrics::gauge!(names::CALLS_ACTIVE).decrement(1.0);
    }
}

fn ms_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Performs the core's actions. Owns every task of the call (in `tasks`, aborted on drop).
struct Driver {
    start: Instant,
    rate: u32,
    rec: Recorder,
    link: Box<dyn MediaLink>,
    control: Arc<dyn CallControl>,
    asr: Arc<dyn Asr>,
    /// This call's stream to a streaming recognizer, when the engine has one.
    stream: Option<Box<dyn AsrStream>>,
    tts: Arc<dyn Tts>,
    turn: Option<Arc<SmartTurn>>,
    asr_limit: Duration,
    dialog_tx: mpsc::Sender<(u64, DialogCmd)>,
    work_tx: mpsc::Sender<Event>,
    tasks: JoinSet<()>,
    asr_tasks: Vec<AbortHandle>,
    tts_tasks: Vec<(u64, AbortHandle)>,
}

impl Driver {
    fn now(&self) -> u64 {
        ms_since(self.start)
    }

    /// Performs everything the core asks, feeding back what fails at once.
    fn perform_all(&mut self, core: &mut CallCore) {
        while let Some(action) = core.poll_action() {
            if let Some(ev) = self.perform(action) {
                core.handle(self.now(), ev);
            }
        }
    }

    /// Performs one action; an event that answers it at once comes back.
    fn perform(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Record {
                at_ms,
                kind,
                fields,
            } => self.rec.emit(at_ms, kind, fields),
            Action::SendAudio(frame) => {
                if let Err(e) = self.link.send_audio(&frame) {
                    tracing::debug!(error = %e, "playout send");
                }
            }
            Action::Mark(id) => {
                if let Err(e) = self.link.mark(id) {
                    tracing::debug!(error = %e, "playout mark");
                }
            }
            Action::Flush => {
                if let Err(e) = self.link.flush() {
                    tracing::debug!(error = %e, "flush after barge-in");
                }
                // Whatever the PBX plays itself stops too, without holding up this tick.
                let control = self.control.clone();
                self.tasks.spawn(async move {
                    if let Ok(Err(e)) =
                        tokio::time::timeout(CONTROL_TIMEOUT, control.stop_playback()).await
                    {
                        tracing::debug!(error = %e, "stopping PBX playback after barge-in");
                    }
                });
            }
            Action::Dialog { seq, cmd } => {
                let answers = matches!(
                    cmd,
                    DialogCmd::Start | DialogCmd::Input(_) | DialogCmd::Ahead(_)
                );
                if self.dialog_tx.try_send((seq, cmd)).is_err() {
                    tracing::warn!("dialog engine queue full or gone");
                    // Nobody will answer: never leave the caller waiting on a dead engine.
                    if answers {
                        return Some(Event::Dialog {
                            seq,
                            result: Err(DialogError::Engine("dialog engine is gone".into())),
                            ms: 0,
                        });
                    }
                }
            }
            Action::StreamAudio { begin, audio } => {
                if let Some(s) = self.stream.as_mut() {
                    if begin {
                        s.begin();
                    }
                    s.append(&audio);
                }
            }
            Action::Transcribe {
                seq,
                audio,
                hint,
                speculative,
                span,
            } => {
                // The streaming recognizer has the audio already: it only has to commit it.
                if let Some(pending) = self.stream.as_mut().and_then(|s| s.commit(span.0, span.1)) {
                    self.transcribe_streamed(seq, pending, audio, hint, speculative);
                    return None;
                }
                // Work that may be wasted never queues ahead of other callers' turns.
                if speculative && self.asr.load().is_some_and(|l| l.busy()) {
                    return Some(Event::AsrSkipped { seq });
                }
                self.transcribe(seq, audio, hint)
            }
            Action::CheckTurn { id, audio } => self.check_turn(id, audio),
            Action::CancelAsr => {
                for t in self.asr_tasks.drain(..) {
                    t.abort();
                }
            }
            Action::Synthesize { reply, seg, text } => self.synthesize(reply, seg, text),
            Action::Prefetch { text } => {
                // Into the prompt cache, where the reply's first segment will find it.
                let (tts, rate) = (self.tts.clone(), self.rate);
                let limit = Duration::from_millis(TTS_SEGMENT_LIMIT_MS);
                self.tasks.spawn(async move {
                    let fill = async {
                        if let Ok(mut s) = tts.synthesize(&text, rate).await {
                            while s.recv().await.is_some() {}
                        }
                    };
                    let _ = tokio::time::timeout(limit, fill).await;
                });
            }
            Action::CancelTts { reply } => self.tts_tasks.retain(|(r, t)| {
                if *r == reply {
                    t.abort();
                }
                *r != reply && !t.is_finished()
            }),
            Action::Answer => {
                let control = self.control.clone();
                self.control_task(async move { control.answer().await }, Event::Answered);
            }
            Action::SendDtmf(digits) => {
                let control = self.control.clone();
                self.control_task(
                    async move { control.send_dtmf(&digits).await },
                    Event::DtmfSent,
                );
            }
            Action::Transfer { seq, name, target } => {
                let control = self.control.clone();
                self.control_task(
                    async move { control.transfer(&name, &target).await },
                    move |result| Event::ControlDone { seq, result },
                );
            }
            Action::Hangup { seq, reason } => {
                let control = self.control.clone();
                self.control_task(
                    async move { control.hangup(&reason).await },
                    move |result| Event::ControlDone { seq, result },
                );
            }
        }
        None
    }

    /// A control request with the PBX's deadline; its answer comes back as an event.
    fn control_task<F, E>(&mut self, request: F, event: E)
    where
        F: std::future::Future<Output = Result<(), ControlError>> + Send + 'static,
        E: FnOnce(Result<(), ControlError>) -> Event + Send + 'static,
    {
        let tx = self.work_tx.clone();
        self.tasks.spawn(async move {
            let result = tokio::time::timeout(CONTROL_TIMEOUT, request)
                .await
                .unwrap_or(Err(ControlError::Timeout(CONTROL_TIMEOUT_MS)));
            let _ = tx.send(event(result)).await;
        });
    }

    /// A transcript from the streaming recognizer; when it fails or is late, the batch engine
    /// transcribes the same audio in what is left of the usual limit (a speculative one only
    /// with a spare slot), and the transcript says why.
    fn transcribe_streamed(
        &mut self,
        seq: u64,
        pending: PendingTranscript,
        audio: Vec<i16>,
        hint: Option<String>,
        speculative: bool,
    ) {
        self.asr_tasks.retain(|t| !t.is_finished());
        let (asr, tx, rate, start, limit) = (
            self.asr.clone(),
            self.work_tx.clone(),
            self.rate,
            self.start,
            self.asr_limit,
        );
        let wait = self.stream.as_ref().map_or(Duration::ZERO, |s| s.timeout());
        let handle = self.tasks.spawn(async move {
            let t0 = start.elapsed();
            let why = match tokio::time::timeout(wait, pending).await {
                Ok(Ok(t)) => {
                    let ms = u64::try_from(start.elapsed().saturating_sub(t0).as_millis())
                        .unwrap_or(u64::MAX);
                    let _ = tx.send(Event::Asr { seq, result: Ok(t), ms }).await;
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no transcript within {} ms", wait.as_millis()),
            };
            if speculative && asr.load().is_some_and(|l| l.busy()) {
                // The turn's audio is transcribed whole at its end instead.
                let ms = u64::try_from(start.elapsed().saturating_sub(t0).as_millis())
                    .unwrap_or(u64::MAX);
                let result = Err(AsrError::Engine(why));
                let _ = tx.send(Event::Asr { seq, result, ms }).await;
                return;
            }
            tracing::warn!(reason = %why, "streaming ASR failed for this turn; the batch engine transcribes it");
            let left = limit.saturating_sub(start.elapsed().saturating_sub(t0));
            let work = std::panic::AssertUnwindSafe(asr.transcribe(&audio, rate, hint.as_deref()));
            let result = match tokio::time::timeout(left, work.catch_unwind()).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(AsrError::Engine("panicked".into())),
                Err(_) => Err(AsrError::Timeout(
                    u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
                )),
            };
            let result = result.map(|t| Transcript {
                fallback: Some(why),
                ..t
            });
            let ms =
                u64::try_from(start.elapsed().saturating_sub(t0).as_millis()).unwrap_or(u64::MAX);
            let _ = tx.send(Event::Asr { seq, result, ms }).await;
        });
        self.asr_tasks.push(handle);
    }

    fn transcribe(&mut self, seq: u64, audio: Vec<i16>, hint: Option<String>) {
        self.asr_tasks.retain(|t| !t.is_finished());
        let (asr, tx, rate, start, limit) = (
            self.asr.clone(),
            self.work_tx.clone(),
            self.rate,
            self.start,
            self.asr_limit,
        );
        // The engine's own deadline plus a margin, and a panic caught: whatever the engine
        // does, an answer comes and the call goes on.
        let handle = self.tasks.spawn(async move {
            let t0 = start.elapsed();
            let work = std::panic::AssertUnwindSafe(asr.transcribe(&audio, rate, hint.as_deref()));
            let result = match tokio::time::timeout(limit, work.catch_unwind()).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(AsrError::Engine("panicked".into())),
                Err(_) => Err(AsrError::Timeout(
                    u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
                )),
            };
            let ms =
                u64::try_from(start.elapsed().saturating_sub(t0).as_millis()).unwrap_or(u64::MAX);
            let _ = tx.send(Event::Asr { seq, result, ms }).await;
        });
        self.asr_tasks.push(handle);
    }

    /// Asks the end-of-turn model (off this task: it queues for a free slot, or is refused
    /// at once when the queue is full); its answer comes back as `TurnVerdict`.
    fn check_turn(&mut self, id: u64, audio: Vec<i16>) {
        let Some(model) = self.turn.clone() else {
            return;
        };
        let (tx, rate) = (self.work_tx.clone(), self.rate);
        let handle = self.tasks.spawn(async move {
            let result =
                match tokio::time::timeout(TURN_CHECK_LIMIT, model.complete(audio, rate)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!(
                        "no answer within {} ms",
                        TURN_CHECK_LIMIT.as_millis()
                    )),
                };
            let _ = tx.send(Event::TurnVerdict { id, result }).await;
        });
        self.asr_tasks.push(handle);
    }

    fn synthesize(&mut self, reply: u64, seg: usize, text: String) {
        self.tts_tasks.retain(|(_, t)| !t.is_finished());
        let (tts, tx, rate, start) = (
            self.tts.clone(),
            self.work_tx.clone(),
            self.rate,
            self.start,
        );
        let handle = self.tasks.spawn(async move {
            let t0 = ms_since(start);
            let synth = async {
                let mut stream = match tts.synthesize(&text, rate).await {
                    Ok(s) => s,
                    Err(e) => return Some(e.to_string()),
                };
                let mut first = true;
                while let Some(chunk) = stream.recv().await {
                    let samples = match chunk {
                        Ok(s) => s,
                        Err(e) => return Some(e.to_string()),
                    };
                    let first_ms = first.then(|| ms_since(start).saturating_sub(t0));
                    first = false;
                    let ev = Event::TtsAudio {
                        reply,
                        seg,
                        samples,
                        first_ms,
                    };
                    if tx.send(ev).await.is_err() {
                        return None;
                    }
                }
                None
            };
            // A segment has a total deadline as well as the engine's per-chunk one (a server
            // trickling audio for ever), and a panicking engine is an error: either way the
            // segment ends and the reply goes on.
            let limit = Duration::from_millis(TTS_SEGMENT_LIMIT_MS);
            let failure = match tokio::time::timeout(
                limit,
                std::panic::AssertUnwindSafe(synth).catch_unwind(),
            )
            .await
            {
                Ok(Ok(failure)) => failure,
                Ok(Err(_)) => Some("TTS engine panicked".to_string()),
                Err(_) => Some(format!(
                    "TTS took more than {} s for one segment",
                    limit.as_secs()
                )),
            };
            if let Some(message) = failure {
                let _ = tx
                    .send(Event::TtsFailed {
                        reply,
                        seg,
                        message,
                    })
                    .await;
            }
            let _ = tx.send(Event::TtsDone { reply, seg }).await;
        });
        self.tts_tasks.push((reply, handle));
    }
}

/// Runs one call to its end.
pub async fn run_call(setup: CallSetup) -> CallOutcome {
    let CallSetup {
        call_id,
        flow_name,
        config,
        dialog,
        asr,
        tts,
        turn,
        link,
        control,
        mut events,
        recorder,
        tick_stats,
        origin,
    } = setup;
    // Counts the call as active until this function returns or its task unwinds.
    let _active = ActiveCall::new();
    let rate = config.call.sample_rate;
    let start = origin.unwrap_or_else(Instant::now);
    let (work_tx, mut work_rx) = mpsc::channel::<Event>(256);
    let (dialog_tx, dialog_rx) = mpsc::channel::<(u64, DialogCmd)>(16);
    let lead = link
        .lead_frames()
        .unwrap_or(config.call.playout_lead_frames);
    // An engine that needs longer per turn (an LLM agent) gets it, never less than configured.
    let dialog_limit = dialog
        .turn_limit()
        .unwrap_or_default()
        .max(Duration::from_millis(config.dialog.timeout_ms));
    let stream = asr.stream(rate);
    let mut core = CallCore::new(config.clone(), vad::from_config(&config.vad, rate))
        .with_turn_model(turn.is_some())
        .with_stream_asr(stream.is_some())
        .with_lead_frames(lead)
        .with_dialog_limit(u64::try_from(dialog_limit.as_millis()).unwrap_or(u64::MAX));
    let mut d = Driver {
        start,
        rate,
        rec: recorder,
        link,
        control,
        asr,
        stream,
        tts,
        turn,
        asr_limit: Duration::from_millis(core.asr_limit_ms()),
        dialog_tx,
        work_tx: work_tx.clone(),
        tasks: JoinSet::new(),
        asr_tasks: Vec::new(),
        tts_tasks: Vec::new(),
    };
    d.tasks
        .spawn(dialog_task(dialog, dialog_rx, work_tx, start, dialog_limit));
    tracing::info!(call_id, flow = %flow_name, "call started");
    core.start(d.now(), &call_id, &flow_name);
    d.perform_all(&mut core);
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut media_open = true;
    // The tick follows the PBX's frames (see `tick_phase`): it moves only while the agent has
    // been quiet a while, so the echo gate never sees its reference shift under an echo.
    let mut phase = TickPhase::new();
    let mut last_tick = Instant::now();
    let mut agent_quiet_since: Option<Instant> = None;
    // The agent's last echo has come back by then.
    let echo_settled = Duration::from_millis(config.vad.echo.max_delay_ms.saturating_add(200));
    while core.outcome().is_none() {
        tokio::select! {
            // The tick comes first: a peer flooding the event queue cannot delay the call's clock.
            biased;
            deadline = ticker.tick() => {
                let began = Instant::now();
                last_tick = deadline;
                core.handle(d.now(), Event::Tick);
                d.perform_all(&mut core);
                if core.phase() == PhaseName::Speaking {
                    agent_quiet_since = None;
                } else if agent_quiet_since.is_none() {
                    agent_quiet_since = Some(began);
                }
                if let Some(st) = &tick_stats {
                    st.lateness.record_us(began.saturating_duration_since(deadline).as_micros() as u64);
                    st.work.record_us(began.elapsed().as_micros() as u64);
                }
                continue;
            }
            // Results of the call's own work before the PBX's media: their number is bounded
            // by the call itself, while a peer can send media faster than real time.
            Some(ev) = work_rx.recv() => core.handle(d.now(), ev),
            ev = events.recv(), if media_open => {
                let ev = ev.unwrap_or_else(|| {
                    // Closed for good: told once, never polled again.
                    media_open = false;
                    MediaEvent::Hangup { cause: "media closed".into() }
                });
                if matches!(ev, MediaEvent::Audio(_)) {
                    let now = Instant::now();
                    if let Some(at) = phase.arrival(now.saturating_duration_since(last_tick))
                        && agent_quiet_since
                            .is_some_and(|q| now.saturating_duration_since(q) >= echo_settled)
                    {
                        tracing::debug!(call_id, tick_after_us = %at.as_micros(), "the tick moves to just after the PBX's frames");
                        ticker.reset_at(last_tick + at);
                        core.clock_moved();
                    }
                }
                core.handle(d.now(), Event::Media(ev));
            }
            Some(done) = d.tasks.join_next(), if !d.tasks.is_empty() => {
                if let Err(e) = done
                    && e.is_panic() {
                        tracing::error!(call_id, "a task of this call panicked");
                    }
            }
        }
        d.perform_all(&mut core);
    }
    let outcome = core.outcome().cloned().unwrap_or(CallOutcome::CallerHungUp);
    tracing::info!(call_id, outcome = outcome.label(), "call ended");
    // Dropping the driver aborts every task the call still has (ASR, TTS, dialog, control).
    drop(d);
    outcome
}

/// Runs the dialog engine on its own task. Every turn has a deadline (`dialog.timeout_ms`) and a
/// panic in the engine is caught: either becomes an error the call answers with the error prompt
/// and a human, instead of silence until `max_duration_s`. After a panic the engine is not used
/// again (its state may be broken); the task ends and later asks fail at once.
async fn dialog_task(
    mut dialog: Box<dyn Dialog>,
    mut rx: mpsc::Receiver<(u64, DialogCmd)>,
    tx: mpsc::Sender<Event>,
    start: Instant,
    limit: Duration,
) {
    use std::panic::AssertUnwindSafe;
    let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    let mut pending: Option<(u64, DialogCmd)> = None;
    // A reply made ahead on a copy of the dialog, waiting for the caller to confirm it.
    let mut ahead: Option<(u64, Box<dyn Dialog>)> = None;
    loop {
        let (seq, cmd) = match pending.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => c,
                None => break,
            },
        };
        let t0 = start.elapsed();
        let (ask, mut fork) = match cmd {
            DialogCmd::Start => {
                ahead = None;
                (Ask::Start, None)
            }
            DialogCmd::Input(i) => {
                ahead = None;
                (Ask::Input(i), None)
            }
            DialogCmd::Heard(h) => {
                ahead = None;
                if std::panic::catch_unwind(AssertUnwindSafe(|| dialog.heard(&h))).is_err() {
                    tracing::error!("dialog engine panicked on `heard`; no more turns from it");
                    break;
                }
                continue;
            }
            DialogCmd::Adopt => {
                if let Some((s, mut copy)) = ahead.take()
                    && s == seq
                {
                    copy.adopted();
                    dialog = copy;
                }
                continue;
            }
            DialogCmd::Discard => {
                ahead = None;
                continue;
            }
            DialogCmd::Ahead(i) => {
                ahead = None;
                match std::panic::catch_unwind(AssertUnwindSafe(|| dialog.fork())) {
                    Ok(Some(copy)) => (Ask::Input(i), Some(copy)),
                    _ => {
                        let result = Err(DialogError::NotAhead("a copy of this dialog".into()));
                        if tx
                            .send(Event::DialogDone { seq, result, ms: 0 })
                            .await
                            .is_err()
                        {
                            break;
                        }
                        continue;
                    }
                }
            }
        };
        let made_ahead = fork.is_some();
        // Confirmed while it was still being made: the copy becomes the dialog when done.
        let mut adopt_now = false;
        let mut gone = false;
        let result = {
            let engine: &mut Box<dyn Dialog> = match fork.as_mut() {
                Some(f) => f,
                None => &mut dialog,
            };
            // The reply streams to the call part by part while the engine makes it.
            let (parts_tx, mut parts) = mpsc::channel::<ReplyPart>(64);
            let sink = ReplySink::with_origin(parts_tx, start);
            let turn = async {
                let sink = sink;
                engine.respond(ask, &sink).await
            };
            let forward = async {
                while let Some(part) = parts.recv().await {
                    if tx.send(Event::DialogPart { seq, part }).await.is_err() {
                        break;
                    }
                }
            };
            let guarded = tokio::time::timeout(limit, AssertUnwindSafe(turn).catch_unwind());
            let run = async { tokio::join!(guarded, forward).0 };
            tokio::pin!(run);
            // Anything newer from the call (what was heard of a reply cut by barge-in, the
            // next input) ends the turn in flight: its work is dropped, not finished for
            // nobody. The confirmation of a reply being made ahead lets it finish.
            loop {
                tokio::select! {
                    r = &mut run => break Some(r),
                    newer = rx.recv() => match newer {
                        Some((s, DialogCmd::Adopt)) if made_ahead && s == seq => adopt_now = true,
                        Some(c) => {
                            tracing::debug!(seq, "dialog turn dropped for a newer ask");
                            pending = Some(c);
                            break None;
                        }
                        None => {
                            gone = true;
                            break None;
                        }
                    }
                }
            }
        };
        if gone {
            break;
        }
        let Some(result) = result else { continue };
        let result = match result {
            Err(_) => Err(DialogError::Timeout(limit_ms)),
            Ok(Err(_)) => Err(DialogError::Panicked),
            Ok(Ok(r)) => r,
        };
        let panicked = matches!(result, Err(DialogError::Panicked));
        if panicked {
            tracing::error!("dialog engine panicked; the caller gets the error prompt");
        }
        if let Some(mut copy) = fork.take()
            && result.is_ok()
        {
            if adopt_now {
                copy.adopted();
                dialog = copy;
            } else {
                ahead = Some((seq, copy));
            }
        }
        let ms = u64::try_from(start.elapsed().saturating_sub(t0).as_millis()).unwrap_or(0);
        if tx
            .send(Event::DialogDone { seq, result, ms })
            .await
            .is_err()
            || (panicked && !made_ahead)
        {
            break;
        }
    }
}
