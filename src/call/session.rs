//! `CallSession`: the one task that owns a call. A 20 ms timer (not the inbound audio) drives
//! turn detection, DTMF timeouts, no-input timeouts and playout; ASR, dialog and TTS run as
//! separate tasks that report back on a bounded channel, tagged so stale results are dropped
//! after a barge-in.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::task::AbortOnDropHandle;

use super::dtmf::DigitCollector;
use super::link::{CallControl, MediaEvent, MediaLink};
use super::playout::Playout;
use super::turn::{TurnDetector, TurnEvent};
use super::vad;
use crate::audio::samples_per_frame;
use crate::config::Config;
use crate::engines::asr::Asr;
use crate::engines::dialog::{Dialog, DialogError, Expectation, Heard, Input, Next, Turn, prompt};
use crate::engines::tts::{Tts, TtsError};
use crate::telemetry::{Recorder, TickStats, names};

/// Inbound frames buffered at most (1 s); older ones are dropped with a log line.
const INBOUND_MAX: usize = 50;
/// After this long without an inbound frame, ticks count as silence.
const SILENCE_AFTER_MS: u64 = 40;
/// Longest one segment (a sentence) may take to synthesize in all.
const TTS_SEGMENT_LIMIT: Duration = Duration::from_secs(60);
/// TTS segments synthesized ahead of playout.
const TTS_AHEAD: usize = 2;
/// Limit for answer/transfer/hangup requests to the PBX.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// A reply whose last mark has not come back this long after its audio should have played is
/// taken as played (a mark the PBX lost), so the call never waits on it for ever.
const MARK_TIMEOUT_MS: u64 = 3_000;

/// Everything a call needs.
pub struct CallSetup {
    pub call_id: String,
    pub flow_name: String,
    pub config: Arc<Config>,
    pub dialog: Box<dyn Dialog>,
    pub asr: Arc<dyn Asr>,
    pub tts: Arc<dyn Tts>,
    pub link: Box<dyn MediaLink>,
    pub control: Arc<dyn CallControl>,
    pub events: mpsc::Receiver<MediaEvent>,
    pub recorder: Recorder,
    /// Tick timing for benchmarks (None in production).
    pub tick_stats: Option<Arc<TickStats>>,
    /// The call's time zero (default: now). The simulated PBX shares its clock this way.
    pub origin: Option<Instant>,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    CallerHungUp,
    AgentHungUp { reason: String },
    Transferred { target: String },
    Failed { stage: String },
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

/// Results of work running off the call task.
enum Work {
    Dialog {
        seq: u64,
        result: Result<Turn, DialogError>,
        ms: u64,
    },
    Asr {
        seq: u64,
        result: Result<crate::engines::asr::Transcript, crate::engines::asr::AsrError>,
        ms: u64,
    },
    Tts {
        reply: u64,
        seg: usize,
        chunk: Option<Result<Vec<i16>, TtsError>>,
        first_ms: Option<u64>,
    },
}

enum DialogCmd {
    Start,
    Input(Input),
    Heard(Heard),
}

/// Latency stamps of the turn in progress (ms on the call clock).
#[derive(Default, Clone)]
struct TurnTimes {
    speech_end: Option<u64>,
    endpoint_ms: u64,
    asr_ms: u64,
    asr_queue_ms: u64,
    dialog_ms: u64,
    tts_ms: Option<u64>,
}

struct Reply {
    id: u64,
    playout: Playout,
    turn: Turn,
    segments: Vec<prompt::Segment>,
    next_to_synth: usize,
    in_flight: usize,
    tasks: Vec<JoinHandle<()>>,
    tts_requested_at: u64,
    /// When everything was sent: by then plus the queued audio plus MARK_TIMEOUT_MS the last
    /// mark must be back.
    marks_due_at: Option<u64>,
}

struct Session {
    cfg: Arc<Config>,
    flow_name: String,
    rate: u32,
    frame_len: usize,
    /// One frame of silence, fed to the turn detector when the PBX sends nothing.
    silence: Vec<i16>,
    start: Instant,
    rec: Recorder,
    link: Box<dyn MediaLink>,
    control: Arc<dyn CallControl>,
    asr: Arc<dyn Asr>,
    tts: Arc<dyn Tts>,
    dialog_tx: mpsc::Sender<(u64, DialogCmd)>,
    work_tx: mpsc::Sender<Work>,
    detector: TurnDetector,
    digits: DigitCollector,
    inbound: VecDeque<Vec<i16>>,
    last_inbound_ms: Option<u64>,
    dropped_inbound: u64,
    reply: Option<Reply>,
    reply_seq: u64,
    next_mark: u64,
    dialog_seq: u64,
    dialog_pending: bool,
    asr_seq: u64,
    asr_pending: bool,
    asr_task: Option<AbortOnDropHandle<()>>,
    expect: Expectation,
    listening: bool,
    no_input_at: Option<u64>,
    ignoring_speech: bool,
    times: TurnTimes,
    outcome: Option<CallOutcome>,
    ending: bool,
    ending_action: Option<JoinHandle<bool>>,
    dtmf_task: Option<JoinHandle<()>>,
}

impl Session {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn emit(&self, kind: &str, fields: serde_json::Value) {
        self.rec.emit(self.now(), kind, fields);
    }

    fn error(&mut self, stage: &str, message: String) {
        tracing::warn!(stage, %message, "call error");
        metrics::counter!(names::ERRORS, "stage" => stage.to_string()).increment(1);
        self.emit("error", json!({"stage": stage, "message": message}));
    }

    fn ask_dialog(&mut self, cmd: DialogCmd) {
        let is_heard = matches!(cmd, DialogCmd::Heard(_));
        if !is_heard {
            self.dialog_seq += 1;
            self.dialog_pending = true;
        }
        if self.dialog_tx.try_send((self.dialog_seq, cmd)).is_err() {
            if is_heard {
                self.error("dialog", "dialog engine queue full or gone".into());
            } else {
                // Nobody will answer: never leave the caller waiting on a dead engine.
                self.dialog_pending = false;
                self.fail("dialog", "dialog engine is gone".into());
            }
        }
    }

    /// Starts playing a reply from the dialog.
    fn play(&mut self, turn: Turn) {
        self.cancel_reply();
        self.listening = false;
        self.no_input_at = None;
        self.reply_seq += 1;
        let text = prompt::joined(&turn.say);
        let segments: Vec<prompt::Segment> = turn.say.clone();
        if !text.is_empty() {
            self.emit(
                "agent_say",
                json!({"text": text, "barge_in": turn.barge_in}),
            );
        }
        let playout = Playout::new(
            &segments,
            self.next_mark,
            self.frame_len,
            self.cfg.call.playout_lead_frames,
        );
        self.next_mark += segments.len() as u64 + 1;
        let mut reply = Reply {
            id: self.reply_seq,
            playout,
            turn,
            segments,
            next_to_synth: 0,
            in_flight: 0,
            tasks: Vec::new(),
            tts_requested_at: self.now(),
            marks_due_at: None,
        };
        Self::pump_tts(&mut reply, &self.tts, &self.work_tx, self.rate, self.start);
        self.reply = Some(reply);
        if self.reply.as_ref().is_some_and(|r| r.segments.is_empty()) {
            self.reply_finished(true);
        }
    }

    /// Keeps up to TTS_AHEAD segments synthesizing.
    fn pump_tts(
        reply: &mut Reply,
        tts: &Arc<dyn Tts>,
        tx: &mpsc::Sender<Work>,
        rate: u32,
        start: Instant,
    ) {
        while reply.in_flight < TTS_AHEAD && reply.next_to_synth < reply.segments.len() {
            let idx = reply.next_to_synth;
            reply.next_to_synth += 1;
            let text = reply.segments[idx].text.clone();
            if text.trim().is_empty() {
                continue;
            }
            reply.in_flight += 1;
            let (tts, tx, id) = (tts.clone(), tx.clone(), reply.id);
            reply.tasks.push(tokio::spawn(async move {
                use futures_util::FutureExt;
                let t0 = start.elapsed().as_millis() as u64;
                let synth = async {
                    match tts.synthesize(&text, rate).await {
                        Err(e) => {
                            let _ = tx
                                .send(Work::Tts {
                                    reply: id,
                                    seg: idx,
                                    chunk: Some(Err(e)),
                                    first_ms: None,
                                })
                                .await;
                        }
                        Ok(mut stream) => {
                            let mut first = true;
                            while let Some(chunk) = stream.recv().await {
                                let first_ms = first.then(|| {
                                    (start.elapsed().as_millis() as u64).saturating_sub(t0)
                                });
                                first = false;
                                let failed = chunk.is_err();
                                if tx
                                    .send(Work::Tts {
                                        reply: id,
                                        seg: idx,
                                        chunk: Some(chunk),
                                        first_ms,
                                    })
                                    .await
                                    .is_err()
                                    || failed
                                {
                                    break;
                                }
                            }
                        }
                    }
                };
                // A segment has a total deadline as well as the engine's per-chunk one (a
                // server trickling audio for ever), and a panicking engine is an error: either
                // way the segment ends and the reply goes on.
                let failure = match tokio::time::timeout(
                    TTS_SEGMENT_LIMIT,
                    std::panic::AssertUnwindSafe(synth).catch_unwind(),
                )
                .await
                {
                    Ok(Ok(())) => None,
                    Ok(Err(_)) => Some("TTS engine panicked".to_string()),
                    Err(_) => Some(format!(
                        "TTS took more than {} s for one segment",
                        TTS_SEGMENT_LIMIT.as_secs()
                    )),
                };
                if let Some(msg) = failure {
                    let _ = tx
                        .send(Work::Tts {
                            reply: id,
                            seg: idx,
                            chunk: Some(Err(TtsError::Engine(msg))),
                            first_ms: None,
                        })
                        .await;
                }
                let _ = tx
                    .send(Work::Tts {
                        reply: id,
                        seg: idx,
                        chunk: None,
                        first_ms: None,
                    })
                    .await;
            }));
        }
    }

    fn cancel_reply(&mut self) {
        if let Some(r) = self.reply.take() {
            for t in r.tasks {
                t.abort();
            }
        }
    }

    /// Drops what the PBX still has to play: the media link's queue, and whatever the PBX plays
    /// itself (through the control plane, without holding up this tick).
    fn flush_playback(&mut self) {
        if let Err(e) = self.link.flush() {
            tracing::debug!(error = %e, "flush after barge-in");
        }
        let control = self.control.clone();
        tokio::spawn(async move {
            if let Ok(Err(e)) = tokio::time::timeout(CONTROL_TIMEOUT, control.stop_playback()).await
            {
                tracing::debug!(error = %e, "stopping PBX playback after barge-in");
            }
        });
    }

    /// The caller interrupted: stop in this tick, flush the PBX, cancel synthesis, tell the dialog
    /// what was heard.
    fn barge_in(&mut self, by: &str) {
        let Some(mut reply) = self.reply.take() else {
            return;
        };
        let heard = reply.playout.stop();
        self.flush_playback();
        for t in reply.tasks.drain(..) {
            t.abort();
        }
        metrics::counter!(names::BARGE_INS).increment(1);
        self.emit("barge_in", json!({"by": by}));
        self.emit(
            "playout_end",
            json!({"heard": heard.text, "complete": false}),
        );
        self.ask_dialog(DialogCmd::Heard(heard));
        match reply.turn.next {
            Next::Listen(exp) => self.listen(exp),
            // Replies that end the call are not interruptible; if one was, carry on with it.
            other => self.finish_next(other),
        }
    }

    fn listen(&mut self, exp: Expectation) {
        self.digits.expect(exp.digits.clone());
        self.expect = exp;
        self.listening = true;
        self.no_input_at = Some(self.now() + self.cfg.call.no_input_timeout_ms);
    }

    fn reply_finished(&mut self, complete: bool) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        self.emit(
            "playout_end",
            json!({"heard": reply.playout.text(), "complete": complete}),
        );
        self.ask_dialog(DialogCmd::Heard(Heard {
            text: reply.playout.text(),
            complete,
        }));
        if let Some(digits) = reply.turn.send_dtmf.clone() {
            self.send_dtmf(digits);
        }
        self.finish_next(reply.turn.next);
    }

    /// Sends keys to the PBX (a downstream IVR, say) without holding up the call.
    fn send_dtmf(&mut self, digits: String) {
        self.emit("dtmf_sent", json!({"digits": digits}));
        let (control, rec, start) = (self.control.clone(), self.rec.clone(), self.start);
        // A transfer or hangup that follows waits for these keys to be sent.
        self.dtmf_task = Some(tokio::spawn(async move {
            let err = match tokio::time::timeout(CONTROL_TIMEOUT, control.send_dtmf(&digits)).await
            {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "PBX did not answer".to_string(),
            };
            let t = start.elapsed().as_millis() as u64;
            rec.emit(t, "error", json!({"stage": "dtmf", "message": err}));
        }));
    }

    fn finish_next(&mut self, next: Next) {
        match next {
            Next::Listen(exp) => {
                self.listen(exp);
                // Speech the caller started during a non-interruptible prompt was ignored.
                self.ignoring_speech = self.detector.in_speech();
            }
            Next::Transfer { target } => self.start_transfer(target),
            Next::Hangup { reason } => self.start_hangup(reason),
        }
    }

    fn start_transfer(&mut self, target: String) {
        let Some(t) = self.cfg.transfers.get(&target).cloned() else {
            self.error(
                "transfer",
                format!("target `{target}` is not allow-listed; refused"),
            );
            self.emit("transfer_refused", json!({"target": target}));
            let exp = self.expect.clone();
            self.listen(exp);
            return;
        };
        self.ending = true;
        self.emit("transfer", json!({"target": target}));
        let control = self.control.clone();
        let outcome = CallOutcome::Transferred {
            target: target.clone(),
        };
        self.outcome = Some(outcome);
        let rec = self.rec.clone();
        let start = self.start;
        self.end_task(async move {
            let to = crate::call::link::Target::from(&t);
            match tokio::time::timeout(CONTROL_TIMEOUT, control.transfer(&target, &to)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    rec.emit(
                        start.elapsed().as_millis() as u64,
                        "error",
                        json!({"stage": "transfer", "message": e.to_string()}),
                    );
                    let _ =
                        tokio::time::timeout(CONTROL_TIMEOUT, control.hangup("transfer_failed"))
                            .await;
                    false
                }
                Err(_) => {
                    rec.emit(
                        start.elapsed().as_millis() as u64,
                        "error",
                        json!({"stage": "transfer", "message": "PBX did not answer"}),
                    );
                    false
                }
            }
        });
    }

    fn start_hangup(&mut self, reason: String) {
        self.ending = true;
        self.emit("hangup", json!({"reason": reason}));
        self.outcome = Some(CallOutcome::AgentHungUp {
            reason: reason.clone(),
        });
        let control = self.control.clone();
        self.end_task(async move {
            tokio::time::timeout(CONTROL_TIMEOUT, control.hangup(&reason))
                .await
                .is_ok()
        });
    }

    fn end_task<F: std::future::Future<Output = bool> + Send + 'static>(&mut self, f: F) {
        // The control action runs on its own task; the call waits for it (bounded) before it
        // returns, so the PBX has acted on the caller before media is torn down.
        let keys_first = self.dtmf_task.take();
        self.ending_action = Some(tokio::spawn(async move {
            if let Some(k) = keys_first {
                let _ = k.await;
            }
            f.await
        }));
    }

    /// An engine failed for good: play the fallback prompt, then transfer or hang up per config.
    fn fail(&mut self, stage: &str, message: String) {
        self.error(stage, message);
        if self.ending {
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
        self.play(Turn {
            say,
            barge_in: false,
            send_dtmf: None,
            next,
        });
    }

    fn on_turn_event(&mut self, ev: TurnEvent) {
        match ev {
            TurnEvent::SpeechStart { voiced_ms } => {
                self.emit("speech_start", json!({"voiced_ms": voiced_ms}));
                self.no_input_at = None;
                let playing = self.reply.is_some();
                let interruptible =
                    self.reply.as_ref().is_some_and(|r| r.turn.barge_in) && self.cfg.vad.barge_in;
                self.ignoring_speech = playing && !interruptible;
            }
            TurnEvent::SpeechEnd {
                audio,
                speech_ms,
                endpoint_ms,
                cut,
            } => {
                self.emit(
                    "speech_end",
                    json!({"speech_ms": speech_ms, "endpoint_ms": endpoint_ms, "cut": cut}),
                );
                if self.ignoring_speech || self.reply.is_some() || self.ending {
                    self.ignoring_speech = false;
                    if self.listening && self.reply.is_none() {
                        self.no_input_at = Some(self.now() + self.cfg.call.no_input_timeout_ms);
                    }
                    return;
                }
                self.times = TurnTimes {
                    speech_end: Some(self.now().saturating_sub(endpoint_ms)),
                    endpoint_ms,
                    ..TurnTimes::default()
                };
                self.asr_seq += 1;
                self.asr_pending = true;
                self.listening = false;
                let (asr, tx, seq, rate, start) = (
                    self.asr.clone(),
                    self.work_tx.clone(),
                    self.asr_seq,
                    self.rate,
                    self.start,
                );
                let hint = self.expect.asr_hint.clone();
                // Aborted if the call ends first (the session drops it): no ASR request
                // outlives its call.
                // The engine's own deadline plus a margin, and a panic caught: whatever the
                // engine does, an answer comes and the call goes on (error prompt and a human).
                let limit = Duration::from_millis(self.cfg.asr.timeout_ms.saturating_add(2_000));
                self.asr_task = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                    use futures_util::FutureExt;
                    let t0 = start.elapsed();
                    let work =
                        std::panic::AssertUnwindSafe(asr.transcribe(&audio, rate, hint.as_deref()));
                    let result = match tokio::time::timeout(limit, work.catch_unwind()).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err(crate::engines::asr::AsrError::Engine("panicked".into())),
                        Err(_) => Err(crate::engines::asr::AsrError::Timeout(
                            u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
                        )),
                    };
                    let ms = u64::try_from(start.elapsed().saturating_sub(t0).as_millis())
                        .unwrap_or(u64::MAX);
                    let _ = tx.send(Work::Asr { seq, result, ms }).await;
                })));
            }
        }
    }

    /// Barge-in check, run every tick while the caller speaks over the agent.
    fn check_barge_in(&mut self) {
        let Some(reply) = &self.reply else { return };
        if !reply.turn.barge_in || !self.cfg.vad.barge_in || !reply.playout.started() {
            return;
        }
        if self.detector.voiced_ms() >= self.cfg.vad.barge_in_min_ms {
            self.barge_in("speech");
        }
    }

    fn on_digit(&mut self, d: char) {
        let now = self.now();
        self.emit("dtmf_key", json!({"digit": d.to_string()}));
        let human = self.cfg.call.human_key.chars().next();
        if Some(d) == human && self.digits.is_empty() && !self.ending {
            if let Some(mut r) = self.reply.take() {
                r.playout.stop();
                self.flush_playback();
                for t in r.tasks.drain(..) {
                    t.abort();
                }
            }
            self.emit("dtmf", json!({"digits": d.to_string(), "human_key": true}));
            let target = self.cfg.call.human_target.clone();
            let announce = self
                .cfg
                .transfers
                .get(&target)
                .and_then(|t| t.announce.clone());
            let say = announce.map(|a| prompt::segments(&a)).unwrap_or_default();
            self.play(Turn {
                say,
                barge_in: false,
                send_dtmf: None,
                next: Next::Transfer { target },
            });
            return;
        }
        // A terminator with nothing before it (after an entry that filled up) means nothing.
        if Some(d) == self.digits.terminator() && self.digits.is_empty() {
            return;
        }
        // Typing over a prompt interrupts it, like speaking does.
        if self.reply.as_ref().is_some_and(|r| r.turn.barge_in) {
            self.barge_in("dtmf");
        }
        match self.digits.push(d, now) {
            Some(entry) => self.digits_done(entry.digits),
            // The entry is still open: the inter-digit timeout ends it; no-input waits meanwhile.
            None if self.listening => {
                self.no_input_at = Some(now + self.cfg.call.no_input_timeout_ms)
            }
            None => {}
        }
    }

    fn digits_done(&mut self, digits: String) {
        self.emit("dtmf", json!({"digits": digits}));
        if self.ending || self.dialog_pending {
            return;
        }
        self.times = TurnTimes {
            speech_end: Some(self.now()),
            ..TurnTimes::default()
        };
        self.listening = false;
        self.ask_dialog(DialogCmd::Input(Input::Digits(digits)));
    }

    fn on_work(&mut self, w: Work) {
        match w {
            Work::Asr { seq, result, ms } => {
                if seq != self.asr_seq {
                    return;
                }
                self.asr_pending = false;
                // Waiting for the engine and the engine working are told apart: many callers
                // on one ASR server show up as queue, not as a slow engine.
                let (queue_ms, asr_ms) = match &result {
                    Ok(t) => (t.queue_ms.min(ms), t.process_ms.min(ms)),
                    Err(_) => (0, ms),
                };
                self.times.asr_ms = asr_ms;
                self.times.asr_queue_ms = queue_ms;
                metrics::histogram!(names::STAGE_SECONDS, "stage" => "asr")
                    .record(asr_ms as f64 / 1000.0);
                metrics::histogram!(names::STAGE_SECONDS, "stage" => "asr_queue")
                    .record(queue_ms as f64 / 1000.0);
                match result {
                    Ok(t) if t.text.trim().is_empty() || is_noise_transcript(&t.text) => {
                        self.emit(
                            "transcript",
                            json!({"text": t.text, "ignored": true, "asr_ms": asr_ms, "asr_queue_ms": queue_ms}),
                        );
                        let exp = self.expect.clone();
                        self.listen(exp);
                    }
                    Ok(t) => {
                        self.emit(
                            "transcript",
                            json!({"text": t.text, "asr_ms": asr_ms, "asr_queue_ms": queue_ms}),
                        );
                        self.ask_dialog(DialogCmd::Input(Input::Speech(t.text)));
                    }
                    Err(e) => self.fail("asr", e.to_string()),
                }
            }
            Work::Dialog { seq, result, ms } => {
                if seq != self.dialog_seq {
                    return;
                }
                self.dialog_pending = false;
                self.times.dialog_ms = ms;
                metrics::histogram!(names::STAGE_SECONDS, "stage" => "dialog")
                    .record(ms as f64 / 1000.0);
                match result {
                    Ok(turn) => self.play(turn),
                    Err(e) => self.fail("dialog", e.to_string()),
                }
            }
            Work::Tts {
                reply,
                seg,
                chunk,
                first_ms,
            } => {
                let Some(r) = self.reply.as_mut() else { return };
                if r.id != reply {
                    return;
                }
                if let Some(ms) = first_ms {
                    if seg == 0 && self.times.tts_ms.is_none() {
                        self.times.tts_ms = Some(ms);
                        metrics::histogram!(names::STAGE_SECONDS, "stage" => "tts")
                            .record(ms as f64 / 1000.0);
                    }
                }
                match chunk {
                    Some(Ok(samples)) => {
                        r.playout.add_audio(seg, &samples);
                        // The first audio of a reply goes out now, not at the next tick.
                        if !r.playout.started() {
                            self.playout_step();
                        }
                    }
                    Some(Err(e)) => {
                        let msg = e.to_string();
                        r.playout.synth_done(seg);
                        self.error("tts", msg);
                    }
                    None => {
                        r.playout.synth_done(seg);
                        r.in_flight = r.in_flight.saturating_sub(1);
                        Self::pump_tts(r, &self.tts, &self.work_tx, self.rate, self.start);
                    }
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = self.now();
        // Inbound audio: everything that arrived; silence when the PBX sends nothing.
        let mut processed = 0;
        while let Some(frame) = self.inbound.pop_front() {
            processed += 1;
            if let Some(ev) = self.detector.push(&frame) {
                self.on_turn_event(ev);
            }
            if processed >= 5 {
                break;
            }
        }
        if processed == 0
            && self
                .last_inbound_ms
                .is_none_or(|t| now.saturating_sub(t) >= SILENCE_AFTER_MS)
        {
            if let Some(ev) = self.detector.push(&self.silence) {
                self.on_turn_event(ev);
            }
        }
        if self.detector.in_speech() && !self.ignoring_speech {
            self.check_barge_in();
        }
        if let Some(entry) = self.digits.tick(now) {
            self.digits_done(entry.digits);
        }
        if let Some(at) = self.no_input_at {
            if now >= at && self.listening && !self.detector.in_speech() && self.digits.is_empty() {
                self.no_input_at = None;
                self.listening = false;
                self.emit("no_input", json!({}));
                self.times = TurnTimes::default();
                self.ask_dialog(DialogCmd::Input(Input::NoInput));
            }
        }
        self.playout_step();
        self.check_marks_due();
    }

    /// A reply whose marks never came back (a PBX that lost them) is taken as played.
    fn check_marks_due(&mut self) {
        let now = self.now();
        let lost = self
            .reply
            .as_ref()
            .and_then(|r| r.marks_due_at)
            .is_some_and(|at| now >= at);
        if lost {
            tracing::warn!(
                "playout marks never came back from the PBX; taking the reply as played"
            );
            self.emit(
                "error",
                json!({"stage": "playout", "message": "playout marks never came back"}),
            );
            self.reply_finished(true);
        }
    }

    /// Sends the agent audio due now; stamps the turn when a reply's first audio goes out.
    fn playout_step(&mut self) {
        let now = self.now();
        if let Some(r) = self.reply.as_mut() {
            if r.marks_due_at.is_none() && r.playout.all_sent() {
                r.marks_due_at = Some(
                    now.saturating_add(r.playout.queued_ms())
                        .saturating_add(MARK_TIMEOUT_MS),
                );
            }
            match r.playout.tick(self.link.as_mut()) {
                Ok(t) if t.first_audio => {
                    let tts_wait = now.saturating_sub(r.tts_requested_at);
                    self.emit("playout_start", json!({}));
                    if let Some(end) = self.times.speech_end.take() {
                        let total = now.saturating_sub(end);
                        let tts_ms = self.times.tts_ms.unwrap_or(tts_wait);
                        metrics::histogram!(names::TURN_SECONDS).record(total as f64 / 1000.0);
                        metrics::histogram!(names::STAGE_SECONDS, "stage" => "endpoint")
                            .record(self.times.endpoint_ms as f64 / 1000.0);
                        self.emit(
                            "turn",
                            json!({
                                "endpoint_ms": self.times.endpoint_ms,
                                "asr_ms": self.times.asr_ms,
                                "asr_queue_ms": self.times.asr_queue_ms,
                                "dialog_ms": self.times.dialog_ms,
                                "tts_ms": tts_ms,
                                "total_ms": total,
                            }),
                        );
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "playout send"),
            }
        }
    }

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

    fn on_media(&mut self, ev: MediaEvent) {
        match ev {
            MediaEvent::Audio(frame) => {
                self.last_inbound_ms = Some(self.now());
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
            MediaEvent::Dtmf(d) => self.on_digit(d),
            MediaEvent::MarkPlayed(id) => {
                let done = match self.reply.as_mut() {
                    Some(r) if r.playout.mark_range().contains(&id) => r.playout.on_mark(id),
                    _ => false,
                };
                if done {
                    self.reply_finished(true);
                }
            }
            MediaEvent::Hangup { cause } => {
                if self.outcome.is_none() {
                    self.emit("hangup", json!({"reason": "caller", "cause": cause}));
                    self.outcome = Some(CallOutcome::CallerHungUp);
                }
            }
            MediaEvent::TakenAway { target, why } => {
                if self.outcome.is_none() {
                    self.emit("transfer", json!({"target": target, "why": why}));
                    self.outcome = Some(CallOutcome::Transferred { target });
                }
            }
        }
    }
}

/// Transcripts that are only noise markers (whisper's "[BLANK_AUDIO]", "(coughs)", "...").
fn is_noise_transcript(text: &str) -> bool {
    let t = text.trim();
    (t.starts_with('[') && t.ends_with(']'))
        || (t.starts_with('(') && t.ends_with(')'))
        || t.chars().all(|c| !c.is_alphanumeric())
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

/// Runs one call to its end.
pub async fn run_call(setup: CallSetup) -> CallOutcome {
    let CallSetup {
        call_id,
        flow_name,
        config,
        dialog,
        asr,
        tts,
        link,
        control,
        mut events,
        recorder,
        tick_stats,
        origin,
    } = setup;
    let rate = config.call.sample_rate;
    let (work_tx, mut work_rx) = mpsc::channel::<Work>(256);
    let (dialog_tx, dialog_rx) = mpsc::channel::<(u64, DialogCmd)>(16);
    let start = origin.unwrap_or_else(Instant::now);
    let dialog_task = spawn_dialog(
        dialog,
        dialog_rx,
        work_tx.clone(),
        start,
        Duration::from_millis(config.dialog.timeout_ms),
    );
    let vad = vad::from_config(&config.vad, rate);
    let detector = TurnDetector::new(&config.vad, rate, vad);
    let terminator = config.dtmf.terminator.chars().next();
    let digits = DigitCollector::new(
        config.dtmf.inter_digit_timeout_ms,
        config.dtmf.max_digits,
        terminator,
    );
    let mut s = Session {
        cfg: config.clone(),
        flow_name,
        rate,
        frame_len: samples_per_frame(rate),
        silence: vec![0; samples_per_frame(rate)],
        start,
        rec: recorder,
        link,
        control,
        asr,
        tts,
        dialog_tx,
        work_tx,
        detector,
        digits,
        inbound: VecDeque::with_capacity(INBOUND_MAX),
        last_inbound_ms: None,
        dropped_inbound: 0,
        reply: None,
        reply_seq: 0,
        next_mark: 1,
        dialog_seq: 0,
        dialog_pending: false,
        asr_seq: 0,
        asr_pending: false,
        asr_task: None,
        expect: Expectation::default(),
        listening: false,
        no_input_at: None,
        ignoring_speech: false,
        times: TurnTimes::default(),
        outcome: None,
        ending: false,
        ending_action: None,
        dtmf_task: None,
    };
    // Counts the call as active until this function returns or its task unwinds.
    let _active = ActiveCall::new();
    s.emit(
        "call_start",
        json!({"call_id": call_id, "flow": s.flow_name, "rate": rate}),
    );
    tracing::info!(call_id, flow = %s.flow_name, "call started");
    if let Err(e) = tokio::time::timeout(CONTROL_TIMEOUT, s.control.answer())
        .await
        .unwrap_or(Err(super::ControlError::Timeout(
            CONTROL_TIMEOUT.as_millis() as u64,
        )))
    {
        s.error("answer", e.to_string());
        s.outcome = Some(CallOutcome::Failed {
            stage: "answer".into(),
        });
    } else {
        s.ask_dialog(DialogCmd::Start);
    }
    let max_end = start
        .checked_add(Duration::from_secs(config.call.max_duration_s))
        .unwrap_or(start + Duration::from_secs(86_400));
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    while s.outcome.is_none() {
        tokio::select! {
            // The tick comes first: a peer flooding the event queue cannot delay the call's clock.
            biased;
            deadline = ticker.tick() => {
                let began = Instant::now();
                s.on_tick();
                if let Some(st) = &tick_stats {
                    st.lateness.record_us(began.saturating_duration_since(deadline).as_micros() as u64);
                    st.work.record_us(began.elapsed().as_micros() as u64);
                }
                if Instant::now() >= max_end && !s.ending {
                    s.cancel_reply();
                    s.start_hangup("max_duration".into());
                }
            }
            ev = events.recv() => match ev {
                Some(ev) => s.on_media(ev),
                None => {
                    s.emit("hangup", json!({"reason": "caller", "cause": "media closed"}));
                    s.outcome = Some(CallOutcome::CallerHungUp);
                }
            },
            Some(w) = work_rx.recv() => s.on_work(w),
        }
    }
    // A reply cut by the end of the call (the caller hung up, was sent on) says what was heard.
    if let Some(r) = s.reply.as_mut() {
        let heard = r.playout.stop();
        s.emit(
            "playout_end",
            json!({"heard": heard.text, "complete": false}),
        );
    }
    s.cancel_reply();
    dialog_task.abort();
    if let Some(action) = s.ending_action.take() {
        let _ = tokio::time::timeout(CONTROL_TIMEOUT + Duration::from_secs(1), action).await;
    }
    let outcome = s.outcome.clone().unwrap_or(CallOutcome::CallerHungUp);
    metrics::counter!(names::CALLS_TOTAL, "outcome" => outcome.label()).increment(1);
    s.emit("call_end", json!({"outcome": outcome.label()}));
    tracing::info!(call_id, outcome = outcome.label(), "call ended");
    outcome
}

/// Runs the dialog engine on its own task. Every turn has a deadline (`dialog.timeout_ms`) and a
/// panic in the engine is caught: either becomes an error the call answers with the error prompt
/// and a human, instead of silence until `max_duration_s`. After a panic the engine is not used
/// again (its state may be broken); the task ends and later asks fail at once.
fn spawn_dialog(
    mut dialog: Box<dyn Dialog>,
    mut rx: mpsc::Receiver<(u64, DialogCmd)>,
    tx: mpsc::Sender<Work>,
    start: Instant,
    limit: Duration,
) -> JoinHandle<()> {
    use futures_util::FutureExt;
    use std::panic::AssertUnwindSafe;
    let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    tokio::spawn(async move {
        while let Some((seq, cmd)) = rx.recv().await {
            let t0 = start.elapsed();
            let turn = match cmd {
                DialogCmd::Start => dialog.start(),
                DialogCmd::Input(i) => dialog.input(i),
                DialogCmd::Heard(h) => {
                    if std::panic::catch_unwind(AssertUnwindSafe(|| dialog.heard(&h))).is_err() {
                        tracing::error!("dialog engine panicked on `heard`; no more turns from it");
                        break;
                    }
                    continue;
                }
            };
            let result =
                match tokio::time::timeout(limit, AssertUnwindSafe(turn).catch_unwind()).await {
                    Err(_) => Err(DialogError::Timeout(limit_ms)),
                    Ok(Err(_)) => Err(DialogError::Panicked),
                    Ok(Ok(r)) => r,
                };
            let panicked = matches!(result, Err(DialogError::Panicked));
            if panicked {
                tracing::error!("dialog engine panicked; the caller gets the error prompt");
            }
            let ms = u64::try_from(start.elapsed().saturating_sub(t0).as_millis()).unwrap_or(0);
            if tx.send(Work::Dialog { seq, result, ms }).await.is_err() || panicked {
                break;
            }
        }
    })
}
