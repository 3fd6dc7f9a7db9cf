//! A simulated PBX driven by WAV files, for `sidecall simulate`, tests and benchmarks. It plays
//! the agent's frames on its own 20 ms clock (queue of at most 1000 frames, marks answered when
//! reached, flush drops queued audio and marks, as chan_websocket does), speaks caller files one
//! per turn 700 ms after the agent stops, or at absolute times, presses DTMF keys at given
//! times, can send no frames at all while the caller is silent (as a real Asterisk does), and
//! can echo the agent back on the caller's line (line echo, a speakerphone).

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::call::link::Target;
use crate::call::{CallControl, ControlError, MediaEvent};
use crate::pbx::queue_link::{LinkCmd, QueueLink, queue_link};

/// Agent frames the simulated PBX queues at most (chan_websocket's limit).
pub const QUEUE_MAX: usize = 1000;
/// Pause between the end of the agent's speech and the next caller turn.
pub const TURN_GAP_MS: u64 = 700;
/// Gap between DTMF keys of one `--dtmf` entry.
pub const DTMF_GAP_MS: u64 = 150;

/// What the simulated caller does.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Spoken one per turn, each 700 ms after the agent finishes speaking.
    pub turns: Vec<Vec<i16>>,
    /// Spoken at an absolute time (ms since call start).
    pub at: Vec<(u64, Vec<i16>)>,
    /// Keys pressed from an absolute time.
    pub dtmf: Vec<(u64, String)>,
    /// Send no frames while the caller is silent (a real Asterisk in a bridge does this).
    pub no_frames_in_silence: bool,
    /// The caller hangs up after this long.
    pub max_ms: u64,
    /// Do not keep the audio timelines in the report (benchmarks).
    pub discard_audio: bool,
    /// The agent's voice coming back on the caller's line.
    pub echo: Option<SimEcho>,
}

/// An echo of the agent on the caller's line: the agent audio the caller hears, `delay_ms`
/// later and `gain_db` louder (negative: quieter), mixed (saturating) into the caller's audio
/// sent to sidecall. Written `DB:MS` (`-10:80`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimEcho {
    pub gain_db: f32,
    pub delay_ms: u32,
}

impl SimEcho {
    /// Echo levels accepted (dB relative to the agent).
    pub const GAIN_DB: std::ops::RangeInclusive<f32> = -60.0..=0.0;
    /// Echo delays accepted (ms).
    pub const MAX_DELAY_MS: u32 = 2_000;
}

impl FromStr for SimEcho {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (db, ms) = s.split_once(':').ok_or_else(|| {
            format!("`{s}`: expected DB:MS, as in -10:80 (10 dB down, 80 ms late)")
        })?;
        let gain_db = db
            .trim()
            .parse::<f32>()
            .ok()
            .filter(|g| g.is_finite())
            .ok_or_else(|| format!("`{s}`: `{db}` is not a level in dB"))?;
        if !Self::GAIN_DB.contains(&gain_db) {
            return Err(format!(
                "`{s}`: the echo's level must be {} to {} dB (relative to the agent)",
                Self::GAIN_DB.start(),
                Self::GAIN_DB.end()
            ));
        }
        let delay_ms = ms
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("`{s}`: `{ms}` is not a delay in milliseconds"))?;
        if delay_ms > Self::MAX_DELAY_MS {
            return Err(format!(
                "`{s}`: the echo's delay must be at most {} ms",
                Self::MAX_DELAY_MS
            ));
        }
        Ok(Self { gain_db, delay_ms })
    }
}

/// The echo's delay line: what the caller heard `delay` samples ago, at the echo's gain.
struct EchoLine {
    gain: f32,
    past: VecDeque<i16>,
}

impl EchoLine {
    fn new(echo: SimEcho, rate: u32) -> Self {
        let delay = u64::from(echo.delay_ms) * u64::from(rate) / 1_000;
        let delay = usize::try_from(delay).unwrap_or(0);
        Self {
            gain: 10f32.powf(echo.gain_db / 20.0),
            past: std::iter::repeat_n(0, delay).collect(),
        }
    }

    /// Takes the frame the caller hears now and mixes the echo due now into `caller`; true
    /// when the echo was not silent.
    fn mix(&mut self, heard: &[i16], caller: &mut [i32]) -> bool {
        self.past.extend(heard.iter().copied());
        let mut audible = false;
        for c in caller.iter_mut() {
            let e = (f32::from(self.past.pop_front().unwrap_or(0)) * self.gain).round() as i32;
            audible |= e != 0;
            *c = c.saturating_add(e);
        }
        audible
    }
}

/// How the simulated call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SimEnd {
    AgentHangup(String),
    Transfer(String),
    CallerHangup,
}

/// What the simulated PBX observed.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// The agent's audio on the call's timeline (one frame per 20 ms tick of the PBX).
    pub agent: Vec<i16>,
    /// The caller's audio on the same timeline, as sent to sidecall (the echo included).
    pub caller: Vec<i16>,
    pub end: SimEnd,
    pub flushes: u32,
    /// When each flush arrived, in ms since the PBX's clock started.
    pub flush_at_ms: Vec<u64>,
    /// The instant the PBX's clock started (tick 0).
    pub origin: Option<tokio::time::Instant>,
    pub marks: u32,
    pub dropped_frames: u64,
    pub dtmf_sent_by_agent: Vec<String>,
}

enum Ctl {
    Transfer(String),
    Hangup(String),
    Dtmf(String),
}

/// The agent side's call control into the simulated PBX.
pub struct SimControl {
    tx: mpsc::Sender<Ctl>,
}

#[async_trait]
impl CallControl for SimControl {
    async fn answer(&self) -> Result<(), ControlError> {
        Ok(())
    }
    async fn send_dtmf(&self, digits: &str) -> Result<(), ControlError> {
        self.tx
            .send(Ctl::Dtmf(digits.into()))
            .await
            .map_err(|_| ControlError::NotFound)
    }
    async fn transfer(&self, name: &str, _t: &Target) -> Result<(), ControlError> {
        self.tx
            .send(Ctl::Transfer(name.into()))
            .await
            .map_err(|_| ControlError::NotFound)
    }
    async fn hangup(&self, reason: &str) -> Result<(), ControlError> {
        self.tx
            .send(Ctl::Hangup(reason.into()))
            .await
            .map_err(|_| ControlError::NotFound)
    }
}

/// A started simulated PBX: hand `link`, `control` and `events` to the call.
pub struct SimPbx {
    pub link: QueueLink,
    pub control: Arc<SimControl>,
    pub events: mpsc::Receiver<MediaEvent>,
    /// Tick 0 of the PBX's clock: give it to the call so records and audio share one timeline.
    pub origin: tokio::time::Instant,
    pub done: tokio::task::JoinHandle<SimReport>,
}

/// Starts the simulated PBX for one call at `rate`.
pub fn start(script: Script, rate: u32) -> SimPbx {
    let (link, out_rx) = queue_link(QUEUE_MAX + 64);
    let (ctl_tx, ctl_rx) = mpsc::channel(16);
    let (ev_tx, ev_rx) = mpsc::channel(256);
    let origin = tokio::time::Instant::now();
    let done = tokio::spawn(run(script, rate, origin, out_rx, ctl_rx, ev_tx));
    SimPbx {
        link,
        control: Arc::new(SimControl { tx: ctl_tx }),
        events: ev_rx,
        origin,
        done,
    }
}

enum Queued {
    Frame(Vec<i16>),
    Mark(u64),
}

async fn run(
    mut script: Script,
    rate: u32,
    origin: tokio::time::Instant,
    mut out_rx: mpsc::Receiver<LinkCmd>,
    mut ctl_rx: mpsc::Receiver<Ctl>,
    ev_tx: mpsc::Sender<MediaEvent>,
) -> SimReport {
    let frame_len = (rate / 50) as usize;
    let mut ticker = tokio::time::interval_at(origin, Duration::from_millis(20));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut queue: VecDeque<Queued> = VecDeque::new();
    let mut queued_frames = 0usize;
    let mut report = SimReport {
        agent: Vec::new(),
        caller: Vec::new(),
        end: SimEnd::CallerHangup,
        flushes: 0,
        flush_at_ms: Vec::new(),
        origin: None,
        marks: 0,
        dropped_frames: 0,
        dtmf_sent_by_agent: Vec::new(),
    };
    let mut echo = script.echo.map(|e| EchoLine::new(e, rate));
    let mut turns: VecDeque<Vec<i16>> = script.turns.drain(..).collect();
    script.at.sort_by_key(|(t, _)| *t);
    let mut at: VecDeque<(u64, Vec<i16>)> = script.at.drain(..).collect();
    let mut keys: VecDeque<(u64, char)> = VecDeque::new();
    for (t, digits) in &script.dtmf {
        for (i, c) in digits.chars().enumerate() {
            keys.push_back((t + i as u64 * DTMF_GAP_MS, c));
        }
    }
    keys.make_contiguous().sort_by_key(|(t, _)| *t);
    // Caller clips playing now: (samples, position).
    let mut speaking: Vec<(Vec<i16>, usize)> = Vec::new();
    let mut agent_spoke_since_turn = false;
    let mut agent_quiet_ticks: u64 = 0;
    let mut tick: u64 = 0;
    let max_ticks = script.max_ms / 20;
    loop {
        tokio::select! {
            biased;
            ctl = ctl_rx.recv() => match ctl {
                Some(Ctl::Hangup(r)) => { report.end = SimEnd::AgentHangup(r); break; }
                Some(Ctl::Transfer(t)) => { report.end = SimEnd::Transfer(t); break; }
                Some(Ctl::Dtmf(d)) => report.dtmf_sent_by_agent.push(d),
                None => break,
            },
            out = out_rx.recv() => match out {
                Some(LinkCmd::Audio(f)) => {
                    if queued_frames >= QUEUE_MAX {
                        report.dropped_frames += 1;
                    } else {
                        queued_frames += 1;
                        queue.push_back(Queued::Frame(f));
                    }
                }
                Some(LinkCmd::Mark(id)) => queue.push_back(Queued::Mark(id)),
                Some(LinkCmd::Flush) => {
                    report.flushes += 1;
                    report.flush_at_ms.push(report.origin.map_or(0, |o| u64::try_from(o.elapsed().as_millis()).unwrap_or(u64::MAX)));
                    queue.clear();
                    queued_frames = 0;
                }
                None => {
                    settle_ctl(&mut ctl_rx, &mut report);
                    break;
                }
            },
            _ = ticker.tick() => {
                if tick == 0 {
                    report.origin = Some(origin);
                }
                let now_ms = tick * 20;
                tick += 1;
                // Marks at the head of the queue are answered at once (all before them played).
                while let Some(Queued::Mark(id)) = queue.front() {
                    report.marks += 1;
                    let _ = ev_tx.try_send(MediaEvent::MarkPlayed(*id));
                    queue.pop_front();
                }
                let mut frame = match queue.pop_front() {
                    Some(Queued::Frame(f)) => { queued_frames -= 1; f }
                    _ => Vec::new(),
                };
                let agent_active = frame.iter().any(|&s| s != 0);
                frame.resize(frame_len, 0);
                if !script.discard_audio {
                    report.agent.extend_from_slice(&frame);
                }
                if agent_active {
                    agent_spoke_since_turn = true;
                    agent_quiet_ticks = 0;
                } else {
                    agent_quiet_ticks += 1;
                }
                // Caller turns.
                if speaking.is_empty()
                    && agent_spoke_since_turn
                    && agent_quiet_ticks * 20 >= TURN_GAP_MS
                    && let Some(clip) = turns.pop_front()
                {
                    speaking.push((clip, 0));
                    agent_spoke_since_turn = false;
                }
                // Speaking or typing at a fixed time is the caller's turn too.
                while at.front().is_some_and(|(t, _)| *t <= now_ms) {
                    if let Some((_, clip)) = at.pop_front() {
                        speaking.push((clip, 0));
                        agent_spoke_since_turn = false;
                    }
                }
                while keys.front().is_some_and(|(t, _)| *t <= now_ms) {
                    if let Some((_, k)) = keys.pop_front() {
                        let _ = ev_tx.try_send(MediaEvent::Dtmf(k));
                        agent_spoke_since_turn = false;
                    }
                }
                let mut caller = vec![0i32; frame_len];
                for (clip, pos) in speaking.iter_mut() {
                    let end = (*pos + frame_len).min(clip.len());
                    for (i, s) in clip[*pos..end].iter().enumerate() {
                        caller[i] += *s as i32;
                    }
                    *pos = end;
                }
                let mut had_caller = !speaking.is_empty();
                speaking.retain(|(clip, pos)| *pos < clip.len());
                // The agent's voice as the caller heard it, coming back on the line.
                if let Some(line) = echo.as_mut() {
                    had_caller |= line.mix(&frame, &mut caller);
                }
                let caller: Vec<i16> = caller.iter().map(|&s| s.clamp(-32768, 32767) as i16).collect();
                if !script.discard_audio {
                    report.caller.extend_from_slice(&caller);
                }
                if (had_caller || !script.no_frames_in_silence)
                    && ev_tx.try_send(MediaEvent::Audio(caller)).is_err()
                    && ev_tx.is_closed()
                {
                    settle_ctl(&mut ctl_rx, &mut report);
                    break;
                }
                if tick >= max_ticks {
                    let _ = ev_tx.try_send(MediaEvent::Hangup { cause: "caller hung up (simulation time limit)".into() });
                    report.end = SimEnd::CallerHangup;
                    break;
                }
            }
        }
    }
    report
}

/// The call went away: a transfer or hangup it sent just before (while this loop was busy with
/// a tick) still takes effect, as on a real PBX.
fn settle_ctl(ctl_rx: &mut mpsc::Receiver<Ctl>, report: &mut SimReport) {
    while let Ok(ctl) = ctl_rx.try_recv() {
        match ctl {
            Ctl::Hangup(r) => report.end = SimEnd::AgentHangup(r),
            Ctl::Transfer(t) => report.end = SimEnd::Transfer(t),
            Ctl::Dtmf(d) => report.dtmf_sent_by_agent.push(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::MediaLink;

    #[test]
    fn echo_arguments_are_checked() {
        assert_eq!(
            "-10:80".parse::<SimEcho>(),
            Ok(SimEcho {
                gain_db: -10.0,
                delay_ms: 80
            })
        );
        assert_eq!(
            " -6.5 : 0 "
                .parse::<SimEcho>()
                .map(|e| (e.gain_db, e.delay_ms)),
            Ok((-6.5, 0))
        );
        for (bad, why) in [
            ("-10", "expected DB:MS"),
            ("", "expected DB:MS"),
            ("loud:80", "not a level in dB"),
            ("NaN:80", "not a level in dB"),
            ("inf:80", "not a level in dB"),
            ("10:80", "-60 to 0 dB"),
            ("-61:80", "-60 to 0 dB"),
            ("-10:-5", "not a delay in milliseconds"),
            ("-10:80ms", "not a delay in milliseconds"),
            ("-10:", "not a delay in milliseconds"),
            ("-10:2001", "at most 2000 ms"),
            ("-10:99999999999", "not a delay in milliseconds"),
        ] {
            let e = bad.parse::<SimEcho>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_agent_comes_back_on_the_callers_line() {
        let rate = 8_000;
        let script = Script {
            echo: Some(SimEcho {
                gain_db: -10.0,
                delay_ms: 80,
            }),
            no_frames_in_silence: true,
            max_ms: 1_000,
            ..Script::default()
        };
        let mut pbx = start(script, rate);
        // 300 ms of agent audio: a square wave at 10000.
        let frame: Vec<i16> = (0..160)
            .map(|i| if i % 16 < 8 { 10_000 } else { -10_000 })
            .collect();
        for _ in 0..15 {
            pbx.link.send_audio(&frame).expect("queued");
        }
        let mut sent = 0;
        let counter = tokio::spawn(async move {
            while let Some(ev) = pbx.events.recv().await {
                if matches!(ev, MediaEvent::Audio(_)) {
                    sent += 1;
                }
            }
            sent
        });
        let report = pbx.done.await.expect("simulated PBX");
        drop(pbx.link);
        let sent = counter.await.expect("counter");
        let first = report
            .agent
            .iter()
            .position(|&s| s != 0)
            .expect("agent played");
        let echo_at = report
            .caller
            .iter()
            .position(|&s| s != 0)
            .expect("echo heard");
        assert_eq!(echo_at - first, 80 * 8, "80 ms late");
        assert_eq!(report.caller[echo_at], 3_162, "10 dB down");
        let echoed = report.caller.iter().filter(|&&s| s != 0).count();
        assert_eq!(echoed, 15 * 160, "all of it, once");
        // Frames are sent while the echo is heard, though the caller says nothing.
        assert_eq!(sent, 15);
    }
}
