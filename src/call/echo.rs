//! The echo gate: the agent's own voice coming back on the caller's channel (line echo, a
//! speakerphone) must not count as the caller speaking, or the agent interrupts itself.
//!
//! The audio sidecall plays is the reference. Both it and the caller's audio are reduced to
//! levels per 10 ms block. For every lag up to `max_delay_ms` the gate keeps a running mean and
//! variance of (caller level - agent level at that lag) over the blocks where the agent was
//! audible; the echo path is the lag whose difference is clearly the most constant, and its mean
//! is the echo return loss (ERL). A caller frame is echo when it is no louder than the echo the
//! path predicts for it (plus the line's noise floor) by the margin; right after the caller was
//! heard over the echo, a smaller margin lets the rest of the syllable through. The echo's tail
//! (a room's reverberation) is predicted as a decay from the path's echo, at a rate measured
//! where words end. When enough agent audio (about 1.5 s) found no consistent echo, the line
//! has none and nothing is gated.
//!
//! Until then the gate assumes an echo at most `default_erl_db` below the agent's audio, but at
//! each lag no louder than the line has allowed: the echo only adds to the caller's side, so a
//! caller block quieter than the agent's block `l` back proves the echo through lag `l` at
//! least that much quieter. The agent's audio in the window predicts the sum of what each lag
//! still allows. A quiet line while the agent talks thus rules out an echo at once, at every
//! lag the agent's audio has reached: a caller who starts later than `max_delay_ms` into the
//! agent's audio is heard at once. A lag the agent's audio first reached while the caller was
//! talking is unknown until the caller pauses (an echo there would start under the caller's
//! voice), and is assumed at the worst meanwhile.
//!
//! The statistics are kept at two speeds: slow ones (about 5 s of agent audio) give the path
//! its precision and ride out double talk, fast ones (about 0.25 s) notice a path that changed or
//! an echo that appeared (a speakerphone switched on). Blocks louder than any echo could be are
//! the caller talking and are not learned from; the rest of double talk is tolerated (the
//! statistics are robust to outliers, and the margin comes from the spread below the mean, which
//! the caller's voice cannot widen since it only adds to the echo).
//!
//! The caller's frames are placed on the reference's clock by their order, not by when they
//! arrive: bursts of late frames keep their places, and a gap longer than a burst (a PBX that
//! sends nothing in silence, lost frames) or a frame that would be ahead of the clock
//! re-anchors them. So does a single frame after ticks without any, or a run that stays behind
//! the clock one frame per tick: late frames come in a burst, so frames before these were never
//! sent (a PBX bridge sends nothing while the far side is silent, nor does a phone's silence
//! suppression). Frames never sent are a quiet line, and prove the echo quiet like quiet frames
//! do; without that, such a line would prove nothing and a caller quieter than the agent would
//! be held until the agent stopped. Only the statistics learn nothing from them (frames lost
//! on the way look the same); but when none came for the first second of the agent's audio,
//! proving every lag 30 dB down under its loud parts (the echo of those would have been sent,
//! silence suppression or not), the line has no echo, and a caller far quieter than the agent
//! is heard at once. On such a line the statistics see mostly the caller's voice, so a
//! new path that what the line proved in the last second contradicts is double talk, not echo. A frame re-anchored by a short distance may belong at either place: for a
//! while the path's echo is predicted that far either way and nothing is learned. So is the
//! start of the agent's audio after a silence, by a PBX tick (the phase between the PBX's clock
//! and ours can change from one prompt to the next), until the fast statistics agree again.
//!
//! Pure and allocation-free per frame: a few hundred operations per 10 ms block, about a
//! thousand while learning (about 4 us per 20 ms frame, reference and caller, in a release
//! build).

use crate::config::EchoConfig;

/// Levels are kept per block of this length.
const BLOCK_MS: u32 = 10;
/// Levels are clamped here (dBFS); digital silence sits on it.
const FLOOR_DB: f32 = -90.0;
/// Agent blocks louder than this (dBFS) count as agent audio playing.
const ACTIVE_DB: f32 = -50.0;
/// Agent blocks within this of the caller line's noise floor teach nothing about the echo.
const LEARN_OVER_FLOOR_DB: f32 = 15.0;
/// Observations of a lag (blocks of agent audio) before it may be the echo path.
const MIN_OBS: u32 = 30;
/// Agent audio (blocks) after which no consistent echo means the line has none...
const NO_ECHO_OBS: u32 = 150;
/// ...or, if the statistics stay ambiguous, after which the gate gives up anyway.
const GIVE_UP_OBS: u32 = 1_000;
/// The slow statistics learn at one over this many blocks at the slowest (5 s of agent audio)...
const SLOW_N: f32 = 500.0;
/// ...and the fast ones at one over this many (0.25 s).
const FAST_N: f32 = 25.0;
/// The best lag's variance over the other lags' mean variance: below this it becomes the path...
const GAIN_RATIO: f32 = 0.25;
/// ...and above this a learned path is lost.
const KEEP_RATIO: f32 = 0.45;
/// Above this the variances are flat: no echo.
const FLAT_RATIO: f32 = 0.5;
/// A path whose level difference wanders more than this (dB, one sigma) is not a path.
const MAX_SIGMA_DB: f32 = 6.0;
/// Lags this close to the best one are left out of the comparison (speech is smooth over them).
const NEIGHBOUR_LAGS: usize = 3;
/// The fast statistics take over from the slow ones when their paths are this far apart.
const MOVED_LAGS: usize = 2;
/// The path's echo is predicted from its lag give or take a block...
const PATH_SPREAD_BLOCKS: usize = 1;
/// ...or this many at the start of the agent's audio after a silence longer than the window:
/// the picture of when a frame reaches the caller's ear can be a PBX tick (20 ms) off from
/// when it does (the phase between the PBX's clock and ours), and that can change from one
/// prompt to the next...
const PATH_JITTER_BLOCKS: usize = 3;
/// ...for this many blocks of agent audio, and on up to `SETTLE_MAX_BLOCKS` until the fast
/// statistics agree with the path (time for them to find a path that moved; meanwhile the
/// path they find is predicted from too).
const SETTLE_BLOCKS: u32 = 50;
/// ...and this many more, for all of `SETTLE_MAX_BLOCKS`, when our tick moved against the PBX's
/// clock since the agent last spoke (see `tick_phase`): the PBX's queue can then hold a frame
/// more or less, and the echo come back a frame or two off from the path learned before, where
/// the fast statistics still find the old path for a while.
const CLOCK_MOVED_BLOCKS: usize = 3;
const SETTLE_MAX_BLOCKS: u32 = 150;
/// A caller frame placed this many frames away from where its order put it (a burst that came
/// later than `JITTER_FRAMES`, a run ahead of the clock) may be either: for that many frames
/// and this many more, the path's echo is predicted that far either way, and nothing is learned.
const UNSURE_EXTRA_FRAMES: u32 = 8;
/// A gap longer than this (frames) is frames that were never sent (a PBX that sends nothing in
/// silence, a loss), not a late burst: the frame after it is on time, no doubt about it.
const UNSURE_MAX_FRAMES: u64 = 12;
/// Outliers (the caller talking) pull the statistics by at most max(3 sigma, this) dB.
const HUBER_MIN_DB: f32 = 8.0;
/// With a learned path the margin shrinks to 3 sigma of its spread, but not below this (dB).
const MIN_MARGIN_DB: f32 = 3.0;
/// Once the caller was heard over the echo, for this many frames (a syllable)...
const HOLD_FRAMES: u32 = 5;
/// ...a block this much above the echo predicted for it is still the caller (dB).
const HOLD_MARGIN_DB: f32 = 1.0;
/// The echo rings on after its path (a room's reverberation), decaying this much per block
/// (dB) until the gate has measured it...
const TAIL_DECAY_DB: f32 = 6.0;
/// ...within these bounds (1 dB per block is 600 ms to fall by 60 dB)...
const TAIL_DECAY_RANGE_DB: (f32, f32) = (1.0, 10.0);
/// ...following this quantile of the decays observed (the caller's voice only slows them down:
/// a low one errs towards a longer tail)...
const TAIL_QUANTILE: f32 = 0.35;
/// ...in steps of at most this much (dB) per observation...
const TAIL_STEP_DB: f32 = 1.0;
/// ...from blocks this far above the noise floor (dB).
const TAIL_OVER_FLOOR_DB: f32 = 20.0;
/// The tail is followed until it has decayed by this much (dB)...
const TAIL_SPAN_DB: f32 = 40.0;
/// ...or this many blocks past the lag window.
const TAIL_LAGS: usize = 40;
/// The noise floor follows the quietest blocks and rises this much (dB) per block otherwise.
const FLOOR_RISE_DB: f32 = 0.05;
/// Caller frames never sent (see `place`) are taken as at most this loud (dBFS), or the line's
/// floor if that is quieter: silence suppression sends nothing below about this, and a bridge
/// nothing while the far side makes no sound.
const GAP_DB: f32 = -60.0;
/// ...or at most as loud as the last frame sent before them; after a frame louder than this
/// (dBFS) they prove nothing (frames lost in the middle of a sound, not silence).
const GAP_LOUD_DB: f32 = -35.0;
/// The only caller frame of a tick after this many ticks without any is on time (frames late by
/// that much come in a burst).
const QUIET_TICKS: i64 = 2;
/// A run of caller frames that stays as far behind the clock, one per tick, for this many frames
/// after the first is on time after frames never sent.
const STEADY_BEHIND_FRAMES: u32 = 3;
/// Caller frames arriving this many frames later than their order says are a gap, not a burst.
const JITTER_FRAMES: i64 = 4;
/// What a quiet caller side proved about the echo at a lag is trusted up to this much (dB):
/// the level of a sum is not quite the sum of the levels (phase)...
const BOUND_SLACK_DB: f32 = 3.0;
/// ...and give or take this many lags: a burst or a gap may have moved the caller's frames on
/// the reference's clock since.
const BOUND_LAGS: usize = 4;
/// A lag's proof relaxes back towards `default_erl_db` by this much (dB) per caller block (5 dB
/// per second), so an echo that appears later is not ruled out for long...
const BOUND_RELAX_DB: f32 = 0.05;
/// ...and proves at most this much (dB): an echo that far down is inaudible anyway. Losing an
/// echo path held this many frames forgets all proofs.
const BOUND_MAX_DB: f32 = 60.0;
/// What the line proved recently relaxes this much (dB) per caller block (30 dB per second)...
const RECENT_RELAX_DB: f32 = 0.3;
/// ...and a new echo path is not taken while it proves the echo at the path's lag this much
/// (dB) quieter than the path says (and `BOUND_SLACK_DB` more).
const CONTRADICT_DB: f32 = 10.0;
const FORGET_AFTER_FRAMES: u32 = 50;
/// Before the line's first frame, a block never sent proves the echo at a lag at least this far
/// (dB) below the agent's audio there, when the agent played there this much over `GAP_DB` and
/// within `GAP_PROOF_LOUDEST_DB` of its loudest...
const GAP_PROOF_DB: f32 = 30.0;
const GAP_PROOF_LOUDEST_DB: f32 = 15.0;
/// ...and when every lag has this many such proofs, the line has no echo: one would have been
/// sent. (Silence suppression hides an echo below its threshold, but not the echo of the
/// agent's loudest audio unless that echo is too quiet to matter.)
const GAP_NO_ECHO_BLOCKS: u16 = 25;

/// A learned echo path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EchoPath {
    /// From the agent audio given to [`EchoGate::reference`] to its echo in the caller's audio.
    pub delay_ms: f32,
    /// How much quieter the echo is than the agent audio (dB; an echo at -10 dB is 10).
    pub erl_db: f32,
}

/// A path the statistics found: lag in blocks (with the fraction between blocks), ERL and
/// spread in dB.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Path {
    lag: usize,
    frac: f32,
    erl_db: f32,
    sigma_db: f32,
}

/// What the statistics currently say about the line.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Not enough agent audio yet, or ambiguous: gate conservatively.
    Learning,
    Learned(Path),
    /// Enough agent audio and no consistent echo: gate nothing.
    NoEcho,
}

/// Per lag: observations, robust running mean and variance of (caller dB - agent dB at the lag),
/// and twice the mean square of the differences below the mean (the caller's voice only ever
/// adds to the echo, so this is the path's own spread even in double talk).
struct Stats {
    slowest: f32,
    n: Vec<u32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    low: Vec<f32>,
}

/// How the lags compare.
struct Assessment {
    path: Path,
    /// The best lag's variance over the others' mean.
    ratio: f32,
    var: f32,
    /// Observations of the best lag.
    seen: u32,
}

impl Stats {
    fn new(lags: usize, slowest_n: f32) -> Self {
        Self {
            slowest: 1.0 / slowest_n,
            n: vec![0; lags],
            mean: vec![0.0; lags],
            var: vec![0.0; lags],
            low: vec![0.0; lags],
        }
    }

    /// One more level difference `d` at lag `l`.
    fn learn(&mut self, l: usize, d: f32) {
        let (Some(n), Some(mean), Some(var), Some(low)) = (
            self.n.get_mut(l),
            self.mean.get_mut(l),
            self.var.get_mut(l),
            self.low.get_mut(l),
        ) else {
            return;
        };
        *n = n.saturating_add(1);
        if *n == 1 {
            (*mean, *var, *low) = (d, 0.0, 0.0);
            return;
        }
        let w = (1.0 / *n as f32).max(self.slowest);
        let c = (3.0 * var.sqrt()).max(HUBER_MIN_DB);
        let e = (d - *mean).clamp(-c, c);
        *mean += w * e;
        *var = (1.0 - w) * (*var + w * e * e);
        let below = e.min(0.0);
        *low = (1.0 - w) * (*low + w * 2.0 * below * below);
    }

    /// The lag with the most constant difference and how it compares with the others; None
    /// until lags have enough observations.
    fn assess(&self) -> Option<Assessment> {
        let lags = self.n.len();
        let mut best: Option<usize> = None;
        for l in 0..lags {
            if self.n[l] >= MIN_OBS && best.is_none_or(|b| self.var[l] < self.var[b]) {
                best = Some(l);
            }
        }
        let best = best?;
        let (mut sum, mut count) = (0.0f32, 0u32);
        for l in 0..lags {
            if l.abs_diff(best) > NEIGHBOUR_LAGS && self.n[l] >= MIN_OBS {
                sum += self.var[l];
                count += 1;
            }
        }
        if count == 0 {
            return None;
        }
        let others = sum / count as f32;
        let var = self.var[best];
        let ratio = if others > f32::EPSILON {
            var / others
        } else {
            1.0
        };
        // Between blocks: the vertex of the parabola through the variances around the best lag.
        let mut frac = 0.0;
        if best > 0 && best + 1 < lags {
            let (l, c, r) = (self.var[best - 1], var, self.var[best + 1]);
            let den = l - 2.0 * c + r;
            if den > f32::EPSILON {
                frac = (0.5 * (l - r) / den).clamp(-0.5, 0.5);
            }
        }
        Some(Assessment {
            path: Path {
                lag: best,
                frac,
                erl_db: -self.mean[best],
                sigma_db: self.low[best].sqrt(),
            },
            ratio,
            var,
            seen: self.n[best],
        })
    }
}

/// Learns the agent's echo on one call and tells echo from the caller's voice; see the module
/// documentation.
pub struct EchoGate {
    enabled: bool,
    /// Samples in one 10 ms block at the call's rate.
    block_len: usize,
    margin_db: f32,
    default_erl_db: f32,
    /// Lags 0..lags (blocks) are searched.
    lags: usize,
    /// Reference block powers (linear, full scale 1.0) and levels (dBFS), a ring by block index.
    ref_pow: Vec<f32>,
    ref_db: Vec<f32>,
    /// Reference blocks received so far.
    ref_blocks: i64,
    slow: Stats,
    fast: Stats,
    state: State,
    /// Per lag, the loudest echo (power gain, at most `default_erl_db` down) the caller's side
    /// still allows through it: a caller block while the agent played at that lag proves the
    /// echo through it no louder than the block.
    bound: Vec<f32>,
    /// The same, relaxing fast (`RECENT_RELAX_DB`): what the line proved in the last second.
    recent: Vec<f32>,
    /// The agent's power at each lag (and two more) behind the caller block being judged.
    behind: Vec<f32>,
    /// Caller frames judged since the echo path was learned.
    held_frames: u32,
    /// The caller line's noise floor (dBFS), once a caller block was seen.
    floor_db: Option<f32>,
    /// The position (reference frame index) the next caller frame takes if none were missing.
    mic_next: i64,
    mic_started: bool,
    /// The reference frame at which the previous caller frame arrived, how many caller frames
    /// arrived in this tick, how far behind the clock the previous one was placed, and for how
    /// many frames in a row (one per tick) the run stayed that far behind.
    mic_arrived: i64,
    tick_frames: usize,
    mic_behind: i64,
    steady_behind: u32,
    /// The level (dBFS) of the last caller frame (its louder block).
    last_db: Option<f32>,
    /// Frames left in which the caller, just heard over the echo, needs only `HOLD_MARGIN_DB`.
    hold: u32,
    /// How fast the echo's tail decays (dB per block), and the last caller block the echo
    /// explained (index, dBFS).
    tail_decay_db: f32,
    tail_prev: Option<(i64, f32)>,
    /// Reference blocks since the agent was last audible, and blocks of agent audio since it
    /// started after a silence longer than the window.
    quiet_blocks: usize,
    settling: u32,
    /// The lag the fast statistics find, confidently, and whether it is away from the path's.
    fast_lag: Option<usize>,
    moving: Option<usize>,
    /// Blocks either way the caller's frames may be from where they were placed, and for how
    /// many more frames.
    unsure_blocks: usize,
    unsure_frames: u32,
    /// Our tick moved against the PBX's clock while the agent was quiet, and the agent's audio
    /// since it started again has not settled.
    clock_moved: bool,
    widened: bool,
}

impl EchoGate {
    /// `rate` 8000 or 16000; frames are 20 ms (rate/50 samples).
    pub fn new(rate: u32, cfg: &EchoConfig) -> Self {
        let block_len = usize::try_from(rate / (1_000 / BLOCK_MS))
            .unwrap_or(160)
            .max(1);
        let max_delay_ms = cfg.max_delay_ms.clamp(u64::from(BLOCK_MS), 10_000);
        let lags = usize::try_from(max_delay_ms.div_ceil(u64::from(BLOCK_MS)))
            .unwrap_or(60)
            .saturating_add(1);
        // The ring holds every lag and the tail behind the newest caller block, and a burst more.
        let ring = lags
            + TAIL_LAGS
            + usize::try_from(2 * (JITTER_FRAMES + 4)).unwrap_or(16)
            + usize::try_from(2 * UNSURE_MAX_FRAMES).unwrap_or(24);
        let finite = |v: f32, d: f32| if v.is_finite() { v } else { d };
        let default_erl_db = finite(cfg.default_erl_db, 6.0).clamp(-20.0, 60.0);
        Self {
            enabled: cfg.enabled,
            block_len,
            margin_db: finite(cfg.margin_db, 6.0).clamp(0.0, 40.0),
            default_erl_db,
            lags,
            ref_pow: vec![0.0; ring],
            ref_db: vec![FLOOR_DB; ring],
            ref_blocks: 0,
            slow: Stats::new(lags, SLOW_N),
            fast: Stats::new(lags, FAST_N),
            state: State::Learning,
            bound: vec![db_pow(-default_erl_db); lags],
            recent: vec![db_pow(-default_erl_db); lags],
            behind: vec![0.0; lags + 2],
            held_frames: 0,
            floor_db: None,
            mic_next: 0,
            mic_started: false,
            mic_arrived: 0,
            tick_frames: 1,
            mic_behind: 0,
            steady_behind: 0,
            last_db: None,
            hold: 0,
            tail_decay_db: TAIL_DECAY_DB,
            tail_prev: None,
            quiet_blocks: 0,
            settling: 0,
            fast_lag: None,
            moving: None,
            unsure_blocks: 0,
            unsure_frames: 0,
            clock_moved: false,
            widened: false,
        }
    }

    /// Called exactly once per 20 ms tick with the agent audio that reaches the caller's ear in
    /// that tick (an empty slice when the agent is silent).
    pub fn reference(&mut self, frame: &[i16]) {
        if !self.enabled {
            return;
        }
        let (a, b) = self.halves(frame);
        for half in [a, b] {
            let p = power(half);
            if p > db_pow(ACTIVE_DB) {
                if self.quiet_blocks >= self.lags {
                    self.settling = 0;
                    self.widened = std::mem::take(&mut self.clock_moved);
                }
                self.quiet_blocks = 0;
                self.settling = self.settling.saturating_add(1);
            } else {
                self.quiet_blocks = self.quiet_blocks.saturating_add(1);
            }
            let slot = self.slot(self.ref_blocks);
            self.ref_pow[slot] = p;
            self.ref_db[slot] = pow_db(p);
            self.ref_blocks = self.ref_blocks.saturating_add(1);
        }
    }

    /// Our tick moved against the PBX's clock (while the agent was quiet): the next time the
    /// agent speaks, its echo may come back a frame or two off from the learned path, and is
    /// predicted that much wider until the statistics agree again.
    pub fn clock_moved(&mut self) {
        self.clock_moved = true;
    }

    /// Called once per tick before the caller frames of the tick (after [`Self::reference`]):
    /// how many there are. One after `QUIET_TICKS` ticks without any is on time; several are a
    /// burst, some of them late.
    pub fn arrivals(&mut self, frames: usize) {
        self.tick_frames = frames;
    }

    /// Called for every inbound caller frame, in order (about one per tick, but they can arrive
    /// in bursts of several per tick or be missing for a while). Learns, and returns true when
    /// the frame's level is explained by the agent's echo (so a VAD "voice" on it must be
    /// ignored), false when the caller's own voice is (or may be) in it, or when no agent audio
    /// played within the echo window.
    pub fn is_echo(&mut self, mic: &[i16]) -> bool {
        if !self.enabled || mic.is_empty() {
            return false;
        }
        let first = !self.mic_started;
        let (pos, gap) = self.place();
        if let Some((from, to)) = gap {
            // Frames never sent: the far side made no sound there.
            self.quiet_gap(from.saturating_mul(2), to.saturating_mul(2), first);
        }
        // (The gap came before this frame: what it proved holds for it.)
        let state = self.state;
        let (a, b) = self.halves(mic);
        let mut verdict = Verdict::default();
        let mut loudest = 0.0f32;
        for (k, half) in [a, b].into_iter().enumerate() {
            let block = pos.saturating_mul(2).saturating_add(k as i64);
            let p = power(half);
            loudest = loudest.max(p);
            let v = self.block(block, p);
            verdict.active |= v.active;
            verdict.caller |= v.caller;
            verdict.strong |= v.strong;
            verdict.echo_heard |= v.echo_heard;
        }
        self.last_db = Some(pow_db(loudest));
        self.hold = if verdict.strong {
            HOLD_FRAMES
        } else {
            self.hold.saturating_sub(1)
        };
        self.evaluate();
        self.unsure_frames = self.unsure_frames.saturating_sub(1);
        if self.unsure_frames == 0 {
            self.unsure_blocks = 0;
        }
        match state {
            State::NoEcho => false,
            State::Learned(_) => verdict.echo_heard && !verdict.caller,
            State::Learning => verdict.active && !verdict.caller,
        }
    }

    /// The learned echo path, once confident: delay in ms from the reference to the mic, and
    /// echo return loss in dB.
    pub fn estimate(&self) -> Option<EchoPath> {
        let State::Learned(p) = self.state else {
            return None;
        };
        Some(EchoPath {
            delay_ms: (p.lag as f32 + p.frac) * BLOCK_MS as f32,
            erl_db: p.erl_db,
        })
    }

    /// One caller block at `block` (a reference block index) with power `m_pow`: judges it,
    /// then learns from it.
    fn block(&mut self, block: i64, m_pow: f32) -> Verdict {
        let m_db = pow_db(m_pow);
        let floor_db = self.track_floor(m_db);
        let floor_pow = db_pow(floor_db);
        let mut v = Verdict::default();
        // The loudest agent block in the window, and the loudest echo it could make.
        let default_gain = db_pow(-self.default_erl_db);
        let active = db_pow(ACTIVE_DB);
        let mut window = 0.0f32;
        for l in 0..self.behind.len() {
            let r_pow = self.ref_at(block, l).0;
            self.behind[l] = r_pow;
            if l < self.lags && r_pow > active {
                window = window.max(r_pow);
            }
        }
        v.active = window > 0.0;
        let worst = window * default_gain + floor_pow;
        let beyond_worst = m_pow > worst * db_pow(self.margin_db);
        match self.state {
            State::Learning => {
                // No louder than the line has allowed at each lag.
                let allowed = (window * default_gain).min(self.allowed(default_gain));
                v.caller = m_pow > (allowed + floor_pow) * db_pow(self.margin_db);
                v.strong = v.caller;
            }
            State::Learned(p) => {
                // What the path predicts: its lag give or take a block (a PBX tick while the
                // agent's audio starts, and where the fast statistics see it moving), and its
                // tail.
                let erl = db_pow(-p.erl_db);
                let settled = self.settling >= SETTLE_MAX_BLOCKS
                    || (!self.widened
                        && self.settling >= SETTLE_BLOCKS
                        && self.fast_lag == Some(p.lag));
                self.widened &= !settled;
                let spread = if settled {
                    PATH_SPREAD_BLOCKS
                } else if self.widened {
                    PATH_JITTER_BLOCKS + CLOCK_MOVED_BLOCKS
                } else {
                    PATH_JITTER_BLOCKS
                }
                .saturating_add(self.unsure_blocks);
                let mut direct = 0.0f32;
                for centre in std::iter::once(p.lag).chain(self.moving) {
                    for l in centre.saturating_sub(spread)..=centre + spread {
                        direct = direct.max(self.ref_at(block, l).0);
                    }
                }
                direct *= erl;
                let mut echo = direct;
                let (step, mut gain) = (db_pow(-self.tail_decay_db), 1.0);
                let span = db_pow(-TAIL_SPAN_DB);
                let mut l = p.lag.max(self.moving.unwrap_or(0)) + spread + 1;
                while l < self.lags + TAIL_LAGS {
                    gain *= step;
                    if gain < span {
                        break;
                    }
                    echo = echo.max(self.ref_at(block, l).0 * erl * gain);
                    l += 1;
                }
                let predicted = echo + floor_pow;
                if self.unsure_blocks == 0 {
                    self.learn_tail(
                        block,
                        m_db,
                        floor_db,
                        direct,
                        m_pow <= predicted * db_pow(self.margin_db),
                    );
                }
                let margin =
                    (3.0 * p.sigma_db).clamp(MIN_MARGIN_DB.min(self.margin_db), self.margin_db);
                let held = if self.hold > 0 {
                    HOLD_MARGIN_DB.min(margin)
                } else {
                    margin
                };
                v.echo_heard = echo >= floor_pow && echo > db_pow(FLOOR_DB);
                v.strong = m_pow > predicted * db_pow(margin);
                v.caller = m_pow > predicted * db_pow(held);
            }
            State::NoEcho => {}
        }
        if self.unsure_blocks > 0 {
            // Where this block really was is not known: it teaches nothing.
            return v;
        }
        self.prove(m_pow, default_gain);
        // Louder than any echo could be: the caller talks, nothing to learn about the echo.
        if !beyond_worst {
            self.learn(block, m_db, floor_db);
        }
        v
    }

    /// Learns the level difference between a caller block at `block` (`m_db`) and the agent's
    /// audio at every lag behind it that was loud enough to teach something.
    fn learn(&mut self, block: i64, m_db: f32, floor_db: f32) {
        for l in 0..self.lags {
            let r_db = self.ref_at(block, l).1;
            if r_db > ACTIVE_DB && r_db > floor_db + LEARN_OVER_FLOOR_DB {
                self.slow.learn(l, m_db - r_db);
                self.fast.learn(l, m_db - r_db);
            }
        }
    }

    /// The loudest echo the agent's audio in the window (`self.behind`) can put in the caller
    /// block being judged, through each lag as loud as the line has allowed there so far (with
    /// the proofs moved by up to `BOUND_LAGS`, the worst of those).
    fn allowed(&self, default_gain: f32) -> f32 {
        let (slack, active) = (db_pow(BOUND_SLACK_DB), db_pow(ACTIVE_DB));
        let lags = self.lags.min(self.behind.len()).min(self.bound.len());
        let last = lags.saturating_sub(1);
        let mut worst = 0.0f32;
        for shift in 0..=2 * BOUND_LAGS {
            let mut sum = 0.0f32;
            for (l, &r) in self.behind.iter().enumerate().take(lags) {
                if r > active {
                    let j = (l + shift).saturating_sub(BOUND_LAGS).min(last);
                    let b = self.bound.get(j).map_or(default_gain, |&b| b * slack);
                    sum += r * b.min(default_gain);
                }
            }
            worst = worst.max(sum);
        }
        worst
    }

    /// What a caller block at power `m_pow` proves (the agent's audio behind it in
    /// `self.behind`): the echo through each lag where the agent played is no louder than the
    /// block. Older proofs relax.
    fn prove(&mut self, m_pow: f32, default_gain: f32) {
        let (relax, recent_relax) = (db_pow(BOUND_RELAX_DB), db_pow(RECENT_RELAX_DB));
        let least = db_pow(-BOUND_MAX_DB).min(default_gain);
        let active = db_pow(ACTIVE_DB);
        // An echo between two lags takes part of each of two blocks (at lag 0, of lags 0 and 1
        // only). Where the agent's level rises or falls through them (or peaks) that part is
        // at least the quieter block; where it dips between or in them it can be far below
        // both, and a block proves less the deeper the dip.
        let at = |l: usize| self.behind.get(l).copied().unwrap_or(0.0);
        let mut r = [at(0), at(0), at(0), at(0), at(1)];
        for l in 0..self.lags.min(self.bound.len()) {
            r.rotate_left(1);
            r[4] = at(l + 2);
            let [r0, r1, r2, r3, r4] = r;
            let low = r1.min(r2).min(r3);
            let high = r1.max(r2).max(r3);
            let dip = (r2 < r1 && r2 < r3)
                || (r0 > r1.max(r2) && r3 > r1.max(r2))
                || (r1 > r2.max(r3) && r4 > r2.max(r3));
            let held = if dip { low * (low / high) } else { low };
            let proven = (m_pow / held).max(least);
            for (bounds, relax) in [(&mut self.bound, relax), (&mut self.recent, recent_relax)] {
                if let Some(b) = bounds.get_mut(l) {
                    *b = (*b * relax).min(default_gain);
                    if low > active {
                        *b = b.min(proven);
                    }
                }
            }
        }
    }

    /// Measures how fast the echo's tail decays: from one caller block to the next where the
    /// path's direct echo is 10 dB below the caller's level (so what is heard is the tail, or
    /// the line's noise once the tail is gone), after a block the echo explained.
    fn learn_tail(&mut self, block: i64, m_db: f32, floor_db: f32, direct: f32, explained: bool) {
        if let Some((prev, prev_db)) = self.tail_prev
            && prev.saturating_add(1) == block
            && prev_db > floor_db + TAIL_OVER_FLOOR_DB
            && direct * 10.0 < db_pow(m_db)
        {
            let fall = (prev_db - m_db).clamp(-TAIL_DECAY_RANGE_DB.1, TAIL_DECAY_RANGE_DB.1);
            let step = if fall > self.tail_decay_db {
                TAIL_STEP_DB * TAIL_QUANTILE
            } else {
                -TAIL_STEP_DB * (1.0 - TAIL_QUANTILE)
            };
            self.tail_decay_db =
                (self.tail_decay_db + step).clamp(TAIL_DECAY_RANGE_DB.0, TAIL_DECAY_RANGE_DB.1);
        }
        self.tail_prev = explained.then_some((block, m_db));
    }

    /// Decides from the statistics whether there is an echo path, none, or not known yet.
    fn evaluate(&mut self) {
        let current = match self.state {
            State::Learned(p) => Some(p.lag),
            _ => None,
        };
        self.held_frames = if current.is_some() {
            self.held_frames.saturating_add(1)
        } else {
            0
        };
        let confident = |a: &Assessment, keep: bool| {
            let needed = if keep { KEEP_RATIO } else { GAIN_RATIO };
            a.ratio < needed && a.var < MAX_SIGMA_DB * MAX_SIGMA_DB
        };
        let slow = self.slow.assess();
        let fast = self.fast.assess();
        let kept = |a: &Assessment| current.is_some_and(|c| c.abs_diff(a.path.lag) <= 1);
        let slow_path = slow.as_ref().filter(|a| confident(a, kept(a)));
        let fast_path = fast.as_ref().filter(|a| confident(a, false));
        let path = match (slow_path, fast_path) {
            // The path moved (or an echo appeared): the fast statistics saw it first.
            (Some(s), Some(f)) if f.path.lag.abs_diff(s.path.lag) > MOVED_LAGS => Some(f.path),
            (Some(s), _) => Some(s.path),
            (None, Some(f)) => Some(f.path),
            (None, None) => None,
        };
        self.fast_lag = fast_path.map(|f| f.path.lag);
        self.moving = self
            .fast_lag
            .filter(|&f| path.is_some_and(|p| p.lag.abs_diff(f) > PATH_SPREAD_BLOCKS));
        // A new path where the line recently proved the echo far quieter is the caller's
        // voice following the agent's by chance (double talk), not an echo.
        let path = path.filter(|p| current.is_some() || !self.contradicted(p));
        if let Some(p) = path {
            self.state = State::Learned(p);
            return;
        }
        let Some(slow) = slow else {
            return;
        };
        let next = match self.state {
            State::NoEcho => State::NoEcho,
            _ if slow.seen >= GIVE_UP_OBS
                || (slow.seen >= NO_ECHO_OBS && slow.ratio > FLAT_RATIO) =>
            {
                State::NoEcho
            }
            _ => State::Learning,
        };
        // An echo path held for a while and lost (it moved, or the caller's frames did): what
        // the line proved at each lag may have been proven where the echo is not now.
        if next == State::Learning && self.held_frames >= FORGET_AFTER_FRAMES {
            let default_gain = db_pow(-self.default_erl_db);
            self.bound.iter_mut().for_each(|b| *b = default_gain);
            self.recent.iter_mut().for_each(|b| *b = default_gain);
        }
        self.state = next;
    }

    /// Caller blocks `from..to` (reference block indices) were never sent: a PBX bridge sends
    /// nothing while the far side makes no sound, and a phone's silence suppression nothing below
    /// its threshold. An echo there would have been sent, so these blocks prove the echo quiet at
    /// every lag where the agent played, as a quiet caller block does, and they are the line's
    /// floor. They teach the statistics nothing: frames lost on the way look the same. Only the
    /// last ones count (older proofs would have relaxed by now). `first`: they came before the
    /// line's first frame, which may show the line has no echo at all.
    fn quiet_gap(&mut self, from: i64, to: i64, first: bool) {
        // Silence suppression cuts what is quieter than the frames it sent last (its hangover);
        // a loud frame right before the gap is frames lost mid-sound, which prove nothing.
        let level_db = match self.last_db {
            Some(db) if db > GAP_LOUD_DB => return,
            Some(db) => db.max(GAP_DB),
            None => GAP_DB,
        };
        let level_db = self.floor_db.map_or(level_db, |f| f.min(level_db));
        let window = i64::try_from(self.lags.saturating_mul(2)).unwrap_or(i64::MAX);
        let from = from.max(to.saturating_sub(window)).max(0);
        if from >= to {
            return;
        }
        let (pow, default_gain) = (db_pow(level_db), db_pow(-self.default_erl_db));
        // The agent's loudest block the gap heard at any lag.
        let lags = i64::try_from(self.lags).unwrap_or(i64::MAX);
        let loudest = (from.saturating_sub(lags)..to)
            .map(|b| self.ref_at(b, 0).0)
            .fold(0.0f32, f32::max);
        let proof = db_pow(GAP_DB + GAP_PROOF_DB).max(loudest * db_pow(-GAP_PROOF_LOUDEST_DB));
        // Per lag, the blocks that proved the echo there that far down (once per call).
        let mut proofs = if first {
            vec![0u16; self.lags]
        } else {
            Vec::new()
        };
        for block in from..to {
            self.track_floor(level_db);
            for l in 0..self.behind.len() {
                self.behind[l] = self.ref_at(block, l).0;
            }
            self.prove(pow, default_gain);
            for (n, &r) in proofs.iter_mut().zip(&self.behind) {
                if r >= proof {
                    *n = n.saturating_add(1);
                }
            }
        }
        if first && self.state == State::Learning && proofs.iter().all(|&n| n >= GAP_NO_ECHO_BLOCKS)
        {
            self.state = State::NoEcho;
        }
    }

    /// Whether what the line proved recently (`self.recent`) at the path's lag, give or take a
    /// block, says the echo there is more than `CONTRADICT_DB` quieter than the path has it.
    fn contradicted(&self, p: &Path) -> bool {
        let proven = (p.lag.saturating_sub(1)..=p.lag.saturating_add(1))
            .filter_map(|l| self.recent.get(l))
            .fold(0.0f32, |a, &b| a.max(b));
        proven * db_pow(BOUND_SLACK_DB + CONTRADICT_DB) < db_pow(-p.erl_db)
    }

    /// Places the next caller frame on the reference clock (a reference frame index): right
    /// after the previous one, unless that is ahead of the clock (the run was placed too late:
    /// this frame is on time) or more than a burst behind it (frames went missing: this one is
    /// taken as on time). The only frame of a tick after `QUIET_TICKS` without any is on time
    /// too: a late run would have come in a burst, so the frames before it were never sent; so
    /// is a run that stays as far behind the clock, one frame per tick. Also says which frames
    /// (a range of frame indices, the end left out) were surely never sent before this one:
    /// since the previous frame, or since the call started when this is the line's first.
    fn place(&mut self) -> (i64, Option<(i64, i64)>) {
        let latest = self.ref_blocks / 2 - 1;
        let ticks = latest.saturating_sub(self.mic_arrived);
        self.mic_arrived = latest;
        let mut pos = match self.mic_next {
            _ if !self.mic_started => latest,
            next if next > latest => latest,
            next if latest.saturating_sub(next) > JITTER_FRAMES => latest,
            next => next,
        };
        // Frames never sent before this one (first and last, frame indices).
        let mut gap = if !self.mic_started {
            Some((0, pos.saturating_sub(JITTER_FRAMES)))
        } else if pos > self.mic_next && pos.abs_diff(self.mic_next) > UNSURE_MAX_FRAMES {
            // Leave out the last few, where this frame may belong if it came late.
            Some((self.mic_next, pos.saturating_sub(JITTER_FRAMES)))
        } else {
            None
        };
        let behind = latest.saturating_sub(pos);
        if self.mic_started && self.tick_frames == 1 && behind > 0 && pos == self.mic_next {
            if ticks > QUIET_TICKS {
                // The only frame this tick, after ticks without any: on time after frames
                // never sent (a late run would come in a burst).
                gap = Some((self.mic_next, latest));
                pos = latest;
            } else if ticks > 1 && self.mic_behind == 0 {
                // After one tick without any on a line that was on time: late, or on time
                // after a frame never sent; the frames after it tell.
                self.unsure(behind.unsigned_abs(), STEADY_BEHIND_FRAMES);
            }
            // A run that stays as far behind, one frame per tick, is not late (it would catch
            // up): frames were never sent before it.
            self.steady_behind = if ticks == 1 && behind == self.mic_behind {
                self.steady_behind.saturating_add(1)
            } else {
                0
            };
            if self.steady_behind >= STEADY_BEHIND_FRAMES {
                pos = latest;
            }
        } else {
            self.steady_behind = 0;
        }
        self.mic_behind = latest.saturating_sub(pos);
        let moved = pos.abs_diff(self.mic_next);
        if self.mic_started && moved > 0 && moved <= UNSURE_MAX_FRAMES {
            self.unsure(moved, UNSURE_EXTRA_FRAMES);
        }
        self.mic_started = true;
        self.mic_next = pos.saturating_add(1);
        (pos, gap)
    }

    /// The caller's frames may be `frames` away from where they are placed: for that many frames
    /// and `extra` more, the echo is predicted that far either way and nothing is learned.
    fn unsure(&mut self, frames: u64, extra: u32) {
        let n = u32::try_from(frames).unwrap_or(u32::MAX);
        self.unsure_frames = self.unsure_frames.max(n.saturating_add(extra));
        let blocks = usize::try_from(frames.saturating_mul(2)).unwrap_or(usize::MAX);
        self.unsure_blocks = self.unsure_blocks.max(blocks).min(self.lags);
    }

    /// The reference block `lag` blocks before caller block `block`: (power, dBFS), silence when
    /// it is not (or no longer) known.
    fn ref_at(&self, block: i64, lag: usize) -> (f32, f32) {
        let i = block.saturating_sub(i64::try_from(lag).unwrap_or(i64::MAX));
        let kept = i64::try_from(self.ref_pow.len()).unwrap_or(i64::MAX);
        if i < 0 || i >= self.ref_blocks || i < self.ref_blocks.saturating_sub(kept) {
            return (0.0, FLOOR_DB);
        }
        let s = self.slot(i);
        (self.ref_pow[s], self.ref_db[s])
    }

    fn slot(&self, block: i64) -> usize {
        let len = i64::try_from(self.ref_pow.len()).unwrap_or(1).max(1);
        usize::try_from(block.rem_euclid(len)).unwrap_or(0)
    }

    /// The caller line's noise floor after one more block at `db`.
    fn track_floor(&mut self, db: f32) -> f32 {
        let f = match self.floor_db {
            None => db,
            Some(f) if db < f => f + 0.3 * (db - f),
            Some(f) => (f + FLOOR_RISE_DB).min(db),
        };
        self.floor_db = Some(f);
        f
    }

    /// A 20 ms frame's two 10 ms blocks (the two halves of a frame of another length).
    fn halves<'a>(&self, frame: &'a [i16]) -> (&'a [i16], &'a [i16]) {
        let mid = if frame.len() == 2 * self.block_len {
            self.block_len
        } else {
            frame.len() / 2
        };
        frame.split_at(mid)
    }
}

/// What one caller block (or frame) showed.
#[derive(Default)]
struct Verdict {
    /// Agent audio played within the echo window.
    active: bool,
    /// Louder than the echo explains.
    caller: bool,
    /// Louder by the whole margin (not only by the one held after the caller was heard).
    strong: bool,
    /// The learned path predicts an echo above the noise floor.
    echo_heard: bool,
}

/// Mean power of `s` relative to full scale (0 for no samples).
fn power(s: &[i16]) -> f32 {
    if s.is_empty() {
        return 0.0;
    }
    let sum: f64 = s.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    (sum / s.len() as f64 / (32_768.0 * 32_768.0)) as f32
}

fn pow_db(p: f32) -> f32 {
    if p > 0.0 {
        (10.0 * p.log10()).max(FLOOR_DB)
    } else {
        FLOOR_DB
    }
}

fn db_pow(db: f32) -> f32 {
    10f32.powf(db / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic noise for the synthetic voices.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [0, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }
        fn range(&mut self, lo: f32, hi: f32) -> f32 {
            lo + (hi - lo) * self.unit()
        }
    }

    /// Speech-like audio: words of 1-4 syllables (80-260 ms, raised-sine envelopes of varying
    /// peaks) separated by pauses, on a voiced carrier (harmonics of a wandering pitch) with
    /// breath noise, at `dbfs` RMS over the words. `ms` long, starting with a word.
    fn voice(rate: u32, ms: u32, dbfs: f32, seed: u64) -> Vec<i16> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let len = (rate / 1000 * ms) as usize;
        let per_ms = (rate / 1000) as usize;
        let mut env = vec![0f32; len];
        let mut at = 0usize;
        while at < len {
            for _ in 0..1 + (rng.next() % 4) {
                let syl = per_ms * rng.range(80.0, 260.0) as usize;
                let peak = rng.range(0.3, 1.0);
                for i in 0..syl {
                    if let Some(e) = env.get_mut(at + i) {
                        let x = std::f32::consts::PI * i as f32 / syl as f32;
                        *e = peak * x.sin().powf(1.5);
                    }
                }
                at += syl;
            }
            at += per_ms * rng.range(60.0, 400.0) as usize;
        }
        let mut out = vec![0f32; len];
        let (mut phase, mut f0, mut lp) = (0f32, rng.range(100.0, 220.0), 0f32);
        let f_base = f0;
        for (i, o) in out.iter_mut().enumerate() {
            if i % per_ms == 0 {
                f0 = (f0 + rng.range(-2.0, 2.0)).clamp(f_base * 0.8, f_base * 1.25);
            }
            phase += 2.0 * std::f32::consts::PI * f0 / rate as f32;
            let mut v = 0.0;
            for k in 1..=8 {
                v += (phase * k as f32).sin() / k as f32;
            }
            lp += 0.3 * (rng.range(-1.0, 1.0) - lp);
            *o = env[i] * (0.7 * v + 0.8 * lp);
        }
        let active: Vec<f32> = out
            .iter()
            .zip(&env)
            .filter(|(_, e)| **e > 0.0)
            .map(|(s, _)| *s)
            .collect();
        let rms = (active.iter().map(|s| s * s).sum::<f32>() / active.len().max(1) as f32).sqrt();
        let gain = 32_768.0 * 10f32.powf(dbfs / 20.0) / rms.max(1e-9);
        out.iter()
            .map(|s| (s * gain).round().clamp(-32_768.0, 32_767.0) as i16)
            .collect()
    }

    fn noise(rate: u32, ms: u32, dbfs: f32, seed: u64) -> Vec<i16> {
        let mut rng = Rng(seed | 1);
        let a = 32_768.0 * 10f32.powf(dbfs / 20.0) * 3f32.sqrt();
        (0..(rate / 1000 * ms) as usize)
            .map(|_| (rng.range(-a, a)).round() as i16)
            .collect()
    }

    /// `clip` placed at `at_ms` on a `total_ms` timeline.
    fn place(rate: u32, total_ms: u32, parts: &[(u32, Vec<i16>)]) -> Vec<i16> {
        let mut out = vec![0i16; (rate / 1000 * total_ms) as usize];
        for (at_ms, clip) in parts {
            let at = (rate / 1000 * at_ms) as usize;
            for (i, s) in clip.iter().enumerate() {
                if let Some(o) = out.get_mut(at + i) {
                    *o = o.saturating_add(*s);
                }
            }
        }
        out
    }

    /// `s` delayed by `ms` and scaled by `db`.
    fn delayed(rate: u32, s: &[i16], ms: u32, db: f32) -> Vec<i16> {
        let d = (rate / 1000 * ms) as usize;
        let g = 10f32.powf(db / 20.0);
        (0..s.len())
            .map(|i| {
                if i < d {
                    0
                } else {
                    (f32::from(s[i - d]) * g).round() as i16
                }
            })
            .collect()
    }

    fn mix(parts: &[&[i16]]) -> Vec<i16> {
        let len = parts.iter().map(|p| p.len()).max().unwrap_or(0);
        (0..len)
            .map(|i| {
                let v: i32 = parts
                    .iter()
                    .map(|p| i32::from(*p.get(i).unwrap_or(&0)))
                    .sum();
                v.clamp(-32_768, 32_767) as i16
            })
            .collect()
    }

    fn dbfs(s: &[i16]) -> f32 {
        pow_db(power(s))
    }

    /// How caller frames reach the gate.
    #[derive(Clone, Copy)]
    enum Arrival {
        /// One per tick, after the tick's reference.
        Steady,
        /// Late by up to two ticks, then in bursts of up to three; and every ~3 s a stretch of
        /// 5-30 frames that never arrives.
        Bursty(u64),
        /// Every `.0` ticks nothing arrives for `.1` ticks (a stall), then all of it at once.
        Stalls(usize, usize),
        /// One per tick, but only frames louder than `.0` dBFS and the 5 after them (a phone's
        /// silence suppression with its hangover, or a bridge where the far side is silent).
        Suppressed(f32),
    }

    /// One caller frame as the gate judged it.
    struct Obs {
        t_ms: u64,
        echo: bool,
        /// Level of the agent's echo in it, of the caller's own voice, of the whole frame.
        echo_db: f32,
        caller_db: f32,
        mic_db: f32,
        learned: bool,
    }

    struct Run {
        obs: Vec<Obs>,
        estimate: Option<EchoPath>,
        learned_at_ms: Option<u64>,
        /// When the gate first found the line had no echo.
        no_echo_at_ms: Option<u64>,
    }

    /// Plays `agent` as the reference (the ear hears it `lead_ms` later), and the caller's
    /// line: `echo_part` (the echo alone), `caller` and `noise`, summed.
    fn run(
        rate: u32,
        agent: &[i16],
        echo_part: &[i16],
        caller: &[i16],
        noise: &[i16],
        arrival: Arrival,
    ) -> Run {
        let cfg = EchoConfig {
            enabled: true,
            ..EchoConfig::default()
        };
        let mut g = EchoGate::new(rate, &cfg);
        let fl = (rate / 50) as usize;
        let ticks = agent.len() / fl;
        let frame = |s: &[i16], t: usize| -> Vec<i16> {
            (t * fl..(t + 1) * fl)
                .map(|i| *s.get(i).unwrap_or(&0))
                .collect()
        };
        let mut queue: std::collections::VecDeque<usize> = Default::default();
        let (mut rng, bursty) = match arrival {
            Arrival::Steady | Arrival::Stalls(..) | Arrival::Suppressed(_) => (Rng(1), false),
            Arrival::Bursty(seed) => (Rng(seed | 1), true),
        };
        let stalled = |t: usize| match arrival {
            Arrival::Stalls(every, ticks) => every > 0 && t % every >= every - ticks,
            _ => false,
        };
        let (mut drop_left, mut hangover) = (0u32, 0u32);
        let mut obs = Vec::new();
        let mut learned_at_ms = None;
        let mut no_echo_at_ms = None;
        for t in 0..ticks {
            let r = frame(agent, t);
            if r.iter().all(|&s| s == 0) {
                g.reference(&[]);
            } else {
                g.reference(&r);
            }
            if bursty && drop_left == 0 && rng.unit() < 1.0 / 150.0 {
                drop_left = 5 + (rng.next() % 26) as u32;
            }
            if let Arrival::Suppressed(threshold_db) = arrival {
                let mic = mix(&[&frame(echo_part, t), &frame(caller, t), &frame(noise, t)]);
                if dbfs(&mic) > threshold_db {
                    hangover = 6;
                }
                drop_left = u32::from(hangover == 0);
                hangover = hangover.saturating_sub(1);
            }
            if drop_left > 0 {
                drop_left -= 1;
            } else {
                queue.push_back(t);
            }
            let deliver = if stalled(t) {
                0
            } else if !bursty {
                queue.len()
            } else if queue.len() >= 3 {
                3
            } else {
                match rng.next() % 6 {
                    0 | 1 => 0,
                    2 => 2.min(queue.len()),
                    _ => 1.min(queue.len()),
                }
            };
            g.arrivals(deliver.min(queue.len()));
            for _ in 0..deliver {
                let Some(k) = queue.pop_front() else { break };
                let e = frame(echo_part, k);
                let c = frame(caller, k);
                let mic = mix(&[&e, &c, &frame(noise, k)]);
                let echo = g.is_echo(&mic);
                let learned = g.estimate().is_some();
                if learned && learned_at_ms.is_none() {
                    learned_at_ms = Some(t as u64 * 20);
                }
                if g.state == State::NoEcho && no_echo_at_ms.is_none() {
                    no_echo_at_ms = Some(t as u64 * 20);
                }
                obs.push(Obs {
                    t_ms: k as u64 * 20,
                    echo,
                    echo_db: dbfs(&e),
                    caller_db: dbfs(&c),
                    mic_db: dbfs(&mic),
                    learned,
                });
            }
        }
        Run {
            obs,
            estimate: g.estimate(),
            learned_at_ms,
            no_echo_at_ms,
        }
    }

    /// Frames of echo alone, loud enough for a VAD (above `vad.min_level_dbfs`), that the gate
    /// let through.
    fn leaks(r: &Run) -> usize {
        leaked_at(r).len()
    }

    /// When (ms) those frames were.
    fn leaked_at(r: &Run) -> Vec<u64> {
        r.obs
            .iter()
            .filter(|o| o.caller_db <= FLOOR_DB && o.mic_db > -50.0 && o.echo_db > -60.0 && !o.echo)
            .map(|o| o.t_ms)
            .collect()
    }

    /// The agent talks in three stretches (0-4 s, 5-10 s, 11-16 s) over a 17 s call.
    fn agent_track(rate: u32, dbfs: f32, seed: u64) -> Vec<i16> {
        place(
            rate,
            17_000,
            &[
                (0, voice(rate, 4_000, dbfs, seed)),
                (5_000, voice(rate, 5_000, dbfs, seed + 1)),
                (11_000, voice(rate, 5_000, dbfs, seed + 2)),
            ],
        )
    }

    #[test]
    fn learns_the_echo_path_and_lets_no_echo_through() {
        for rate in [8_000, 16_000] {
            for delay in [40, 80, 120] {
                for lead in [0, 25, 80] {
                    let seed = u64::from(rate + delay * 7 + lead);
                    let agent = agent_track(rate, -13.0, seed);
                    let echo = delayed(rate, &agent, lead + delay, -10.0);
                    let silent = vec![0i16; agent.len()];
                    let line = noise(rate, 17_000, -65.0, seed);
                    let r = run(rate, &agent, &echo, &silent, &line, Arrival::Steady);
                    let est = r.estimate.expect("echo path learned");
                    let true_ms = (lead + delay) as f32;
                    eprintln!(
                        "{rate} Hz, echo -10 dB at {delay} ms + lead {lead} ms: learned {:.1} ms, ERL {:.1} dB after {} ms, {} leaks",
                        est.delay_ms,
                        est.erl_db,
                        r.learned_at_ms.unwrap_or(0),
                        leaks(&r)
                    );
                    assert!(
                        (est.delay_ms - true_ms).abs() <= 10.0,
                        "{est:?} vs {true_ms} ms"
                    );
                    assert!((est.erl_db - 10.0).abs() <= 2.0, "{est:?}");
                    assert!(r.learned_at_ms.is_some_and(|t| t <= 2_000), "learned late");
                    assert_eq!(leaks(&r), 0, "echo frames let through");
                }
            }
        }
    }

    /// Of the frames where the caller's own voice is up (within 10 dB of its level) over the
    /// agent's audible echo, after the path was learned: the share the gate let through.
    fn double_talk_pass(r: &Run, caller_dbfs: f32) -> (f32, usize) {
        let voiced: Vec<&Obs> = r
            .obs
            .iter()
            .filter(|o| o.learned && o.caller_db > caller_dbfs - 10.0 && o.echo_db > -50.0)
            .collect();
        let passed = voiced.iter().filter(|o| !o.echo).count();
        (passed as f32 / voiced.len().max(1) as f32, voiced.len())
    }

    /// The longest the caller talked over the agent's echo without a frame let through (ms):
    /// consecutive voiced frames over an audible echo, all gated.
    fn longest_held_back_ms(r: &Run, caller_dbfs: f32) -> u64 {
        let (mut run, mut longest) = (0u64, 0u64);
        for o in r.obs.iter().filter(|o| o.learned) {
            if o.caller_db > caller_dbfs - 10.0 && o.echo_db > -50.0 && o.echo {
                run += 20;
                longest = longest.max(run);
            } else {
                run = 0;
            }
        }
        longest
    }

    #[test]
    fn the_caller_talking_over_the_agent_gets_through() {
        let rate = 8_000;
        for caller_dbfs in [-20.0, -23.0, -26.0] {
            for agent_dbfs in [-10.0, -13.0, -16.0] {
                let (mut rates, mut firsts) = (Vec::new(), Vec::new());
                for (i, delay) in [60u32, 100, 150].into_iter().enumerate() {
                    let seed = 40 + i as u64;
                    let agent = agent_track(rate, agent_dbfs, seed);
                    let echo = delayed(rate, &agent, delay, -10.0);
                    // The caller talks over the second stretch of the agent's speech.
                    let caller = place(
                        rate,
                        17_000,
                        &[(6_000, voice(rate, 3_500, caller_dbfs, seed + 100))],
                    );
                    let line = noise(rate, 17_000, -65.0, seed);
                    let r = run(rate, &agent, &echo, &caller, &line, Arrival::Steady);
                    let est = r.estimate.expect("echo path learned");
                    assert!(
                        (est.delay_ms - delay as f32).abs() <= 10.0,
                        "{est:?} vs {delay} ms"
                    );
                    assert!((est.erl_db - 10.0).abs() <= 2.0, "{est:?}");
                    assert_eq!(leaks(&r), 0, "echo frames let through");
                    let (pass, n) = double_talk_pass(&r, caller_dbfs);
                    assert!(n > 50, "{n} double-talk frames");
                    let first = longest_held_back_ms(&r, caller_dbfs);
                    rates.push(pass);
                    firsts.push(first);
                }
                let mean = rates.iter().sum::<f32>() / rates.len() as f32;
                let slowest = firsts.iter().max().copied().unwrap_or(0);
                eprintln!(
                    "caller {caller_dbfs} dBFS over agent {agent_dbfs} dBFS (echo {} dBFS): {:.0}% of voiced frames through, at most {} ms held back",
                    agent_dbfs - 10.0,
                    mean * 100.0,
                    slowest
                );
                if caller_dbfs == -20.0 {
                    assert!(mean > 0.5, "{:.0}% through", mean * 100.0);
                }
                // The caller gets through within a syllable or so (one frame pauses the agent).
                assert!(slowest <= 300, "the caller held back for {slowest} ms");
            }
        }
    }

    #[test]
    fn an_echo_a_pbx_tick_off_in_the_next_prompt_is_still_echo() {
        // The PBX's clock and ours are in another phase when the agent speaks again after a
        // silence (seen under load against the simulated PBX): the echo of the next prompt
        // comes one tick (20 ms) later, or earlier, than the first prompt taught.
        let rate = 16_000;
        for (first, next) in [(40u32, 60u32), (60, 40), (120, 140), (120, 100)] {
            let agent = place(
                rate,
                12_000,
                &[
                    (0, voice(rate, 6_000, -13.0, 81)),
                    (9_000, voice(rate, 2_500, -13.0, 82)),
                ],
            );
            let split = usize::try_from(rate / 1000 * 8_000).unwrap_or(usize::MAX);
            let mut echo = delayed(rate, &agent, first, -10.0);
            echo.truncate(split);
            echo.extend_from_slice(&delayed(rate, &agent, next, -10.0)[split..]);
            let silent = vec![0i16; agent.len()];
            let line = noise(rate, 12_000, -65.0, 83);
            let r = run(rate, &agent, &echo, &silent, &line, Arrival::Steady);
            let at = leaked_at(&r);
            assert!(
                at.is_empty(),
                "{first} then {next} ms: echo let through at {at:?} ms"
            );
        }
    }

    #[test]
    fn frames_that_come_late_in_a_burst_after_a_stall_are_still_echo() {
        // Our task or the PBX's stalls for 100-200 ms (a busy machine) and the caller's frames
        // come all at once after it: placed as if some were missing, they may be that far
        // off, and their echo must not pass for the caller's voice meanwhile.
        let rate = 16_000;
        for (delay, stall) in [(40u32, 5usize), (120, 7), (80, 10)] {
            let agent = agent_track(rate, -13.0, 90 + u64::from(delay));
            let echo = delayed(rate, &agent, delay, -10.0);
            let silent = vec![0i16; agent.len()];
            let line = noise(rate, 17_000, -65.0, 91);
            let r = run(
                rate,
                &agent,
                &echo,
                &silent,
                &line,
                Arrival::Stalls(97, stall),
            );
            let at = leaked_at(&r);
            assert!(
                at.is_empty(),
                "{delay} ms, stalls of {stall}: echo let through at {at:?} ms"
            );
            let est = r.estimate.expect("echo path learned");
            assert!(
                (est.delay_ms - delay as f32).abs() <= 10.0,
                "{est:?} vs {delay} ms"
            );
        }
    }

    #[test]
    fn a_line_without_echo_is_never_gated_once_learned() {
        let rate = 16_000;
        let agent = agent_track(rate, -13.0, 7);
        let silent = vec![0i16; agent.len()];
        // Only line noise; then a caller who talks all along, over the agent and not.
        let talker = place(
            rate,
            17_000,
            &[
                (500, voice(rate, 3_000, -22.0, 70)),
                (5_500, voice(rate, 4_000, -22.0, 71)),
                (11_000, voice(rate, 5_500, -22.0, 72)),
            ],
        );
        let mut results = Vec::new();
        for (what, caller, line) in [
            ("noise", &silent, noise(rate, 17_000, -60.0, 8)),
            ("the caller", &talker, noise(rate, 17_000, -65.0, 9)),
        ] {
            let r = run(rate, &agent, &silent, caller, &line, Arrival::Steady);
            let gated_after = |ms: u64| r.obs.iter().filter(|o| o.t_ms >= ms && o.echo).count();
            eprintln!(
                "no echo, {what} on the line: {} frames gated in all, {} after 4 s",
                gated_after(0),
                gated_after(4_000)
            );
            let first = r.obs.iter().rev().find(|o| o.echo).map_or(0, |o| o.t_ms);
            eprintln!("  last gated frame at {first} ms");
            results.push((what, r.estimate, gated_after(4_000)));
        }
        for (what, estimate, gated) in results {
            assert_eq!(estimate, None, "{what}");
            assert_eq!(gated, 0, "{what}: gated after the agent's first 4 s");
        }
    }

    /// From `onset_ms` on, for the caller's voice (frames within 10 dB of `caller_dbfs`): when
    /// the first such frame got through, when the first one after the caller's first pause (3
    /// frames without their voice) came, and the longest run of such frames held back (ms;
    /// only a frame let through ends a run).
    fn first_through(r: &Run, onset_ms: u64, caller_dbfs: f32) -> (Option<u64>, Option<u64>, u64) {
        let from = r.obs.iter().filter(|o| o.t_ms >= onset_ms);
        let voiced = |o: &Obs| o.caller_db > caller_dbfs - 10.0;
        let first = from.clone().find(|o| voiced(o) && !o.echo).map(|o| o.t_ms);
        let (mut silent, mut paused, mut after_pause) = (0, false, None);
        for o in from.clone() {
            if o.caller_db <= FLOOR_DB {
                silent += 1;
                paused |= silent >= 3;
            } else {
                silent = 0;
                if paused && voiced(o) {
                    after_pause = Some(o.t_ms);
                    break;
                }
            }
        }
        let (mut run, mut longest) = (0u64, 0u64);
        for o in from {
            if voiced(o) && o.echo {
                run += 20;
                longest = longest.max(run);
            } else if !o.echo {
                run = 0;
            }
        }
        (first, after_pause, longest)
    }

    #[test]
    fn a_caller_over_the_agents_first_words_on_a_line_without_echo() {
        let rate = 8_000;
        let agent_dbfs = -13.0;
        // The agent's audio has reached every lag (`max_delay_ms`) by then.
        let window_ms = EchoConfig {
            enabled: true,
            ..EchoConfig::default()
        }
        .max_delay_ms;
        for seed in [80u64, 81, 82] {
            let agent = agent_track(rate, agent_dbfs, seed);
            let silent = vec![0i16; agent.len()];
            let line = noise(rate, 17_000, -65.0, seed + 20);
            for rel in [0.0, -10.0, -20.0] {
                for onset in [0u64, 200, 400, 800] {
                    let caller_dbfs = agent_dbfs + rel;
                    let voice = voice(rate, 3_000, caller_dbfs, seed + 10);
                    let caller = place(rate, 17_000, &[(onset as u32, voice)]);
                    let r = run(rate, &agent, &silent, &caller, &line, Arrival::Steady);
                    let (first, after_pause, held) = first_through(&r, onset, caller_dbfs);
                    let first = first.expect("the caller got through");
                    eprintln!(
                        "no echo, caller at {rel} dB from {onset} ms (seed {seed}): first through {} ms after, held back at most {held} ms",
                        first - onset
                    );
                    if onset > window_ms {
                        // At once: the caller's own first 20-40 ms are quieter.
                        assert!(first <= onset + 60, "{rel} dB at {onset} ms: {first} ms");
                        assert!(held <= 40, "{rel} dB at {onset} ms: {held} ms held back");
                    } else {
                        // Lags the agent's audio first reached under the caller's voice are
                        // known once the caller pauses.
                        let resumed = after_pause.expect("the caller pauses");
                        assert!(
                            first <= resumed + 20,
                            "{rel} dB at {onset} ms: {first} ms, after the pause {resumed} ms"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_line_that_sends_nothing_in_silence_lets_the_caller_through_at_once() {
        // A bridge sends nothing while the far side is silent, a phone's silence suppression
        // nothing below its threshold: no caller frame while the agent talks. The missing frames
        // prove there is no echo, so a caller quieter than the agent is heard from their first
        // frames, however they start (a plain level from the first sample, or a voice). (A
        // sound that goes on for a second over an agent that never stops is held once the
        // proofs have relaxed, as on any line; the agent pauses at the caller's first frame.)
        let rate = 8_000;
        let agent_dbfs = -13.0;
        let agent = agent_track(rate, agent_dbfs, 61);
        let silent = vec![0i16; agent.len()];
        let line = vec![0i16; agent.len()];
        for rel in [-5.0f32, -12.0, -20.0] {
            let caller_dbfs = agent_dbfs + rel;
            let buzz: Vec<i16> = {
                let amp = 32_768.0 * 10f32.powf(caller_dbfs / 20.0) * 2f32.sqrt();
                (0..rate)
                    .map(|i| (amp * (0.37 * i as f32).sin()).round() as i16)
                    .collect()
            };
            for (what, clip) in [
                ("a buzz", buzz),
                ("a voice", voice(rate, 1_000, caller_dbfs, 62)),
            ] {
                let onset = 1_500u64;
                let caller = place(rate, 17_000, &[(1_500, clip)]);
                let r = run(
                    rate,
                    &agent,
                    &silent,
                    &caller,
                    &line,
                    Arrival::Suppressed(-55.0),
                );
                let (first, _, _) = first_through(&r, onset, caller_dbfs);
                let first = first.expect("the caller got through");
                // Held back within the agent's echo window after it paused at the caller's
                // first frame (`max_delay_ms`): after that no agent audio is in the window.
                let held = r
                    .obs
                    .iter()
                    .filter(|o| (onset..onset + 600).contains(&o.t_ms))
                    .filter(|o| o.caller_db > caller_dbfs - 10.0 && o.echo)
                    .count()
                    * 20;
                eprintln!(
                    "silence suppressed, no echo, {what} at {rel} dB: first through {} ms after, {held} ms held back in the first 600",
                    first - onset
                );
                assert!(first <= onset + 60, "{what} at {rel} dB: {first} ms");
                assert!(held <= 40, "{what} at {rel} dB: {held} ms held back");
            }
        }
    }

    #[test]
    fn a_caller_whose_voice_is_the_lines_first_frame_is_heard_from_it() {
        // A bridge that sends nothing from the start of the call (the far side silent until
        // they speak, as Asterisk does for a caller leg in Wait()): a second and a half of the
        // agent's audio with no frame proves every lag quiet, so the line has no echo and a
        // caller 23 dB under the agent is heard from their first frame, whether it comes alone
        // or in a burst.
        let rate = 8_000;
        let agent = voice(rate, 4_000, -20.0, 70);
        let caller = voice(rate, 600, -43.0, 71);
        for burst in [1usize, 3] {
            let mut g = EchoGate::new(
                rate,
                &EchoConfig {
                    enabled: true,
                    ..EchoConfig::default()
                },
            );
            let mut judged = Vec::new();
            for (t, a) in agent.chunks(160).enumerate() {
                g.reference(a);
                let due = t.checked_sub(75).filter(|k| k % burst == burst - 1);
                let frames = due.map_or(0, |_| burst);
                g.arrivals(frames);
                if let Some(k) = due {
                    for c in caller.chunks(160).skip(k + 1 - burst).take(frames) {
                        judged.push((dbfs(c), g.is_echo(c)));
                    }
                }
            }
            let held: Vec<_> = judged
                .iter()
                .filter(|(db, echo)| *echo && *db > -60.0)
                .collect();
            assert!(
                held.is_empty(),
                "burst {burst}: held {held:?} of {judged:?}"
            );
            assert!(g.estimate().is_none());
        }
    }

    #[test]
    fn an_echo_two_frames_off_after_our_tick_moved_is_still_echo() {
        // Our tick moved against the PBX's clock while the agent was quiet (see `tick_phase`):
        // the next prompt's echo can come back a frame or two off the path learned before (here
        // 40 ms sooner), where the fast statistics still find the old path for a while. (Without
        // `clock_moved` this echo passes for the caller at its start and again ~700 ms in.)
        let rate = 8_000;
        let mut g = EchoGate::new(
            rate,
            &EchoConfig {
                enabled: true,
                ..EchoConfig::default()
            },
        );
        let first = voice(rate, 4_000, -15.0, 80);
        let second = voice(rate, 2_000, -15.0, 81);
        let agent = place(rate, 8_000, &[(0, first), (5_000, second)]);
        let echo = mix(&[
            &delayed(rate, &agent[..5_000 * 8], 80, -10.0),
            &place(
                rate,
                8_000,
                &[(5_000, delayed(rate, &agent[5_000 * 8..], 40, -10.0))],
            ),
        ]);
        let mut leaked = Vec::new();
        for (t, (a, e)) in agent.chunks(160).zip(echo.chunks(160)).enumerate() {
            if t == 225 {
                g.clock_moved();
            }
            g.reference(a);
            g.arrivals(1);
            if !g.is_echo(e) && dbfs(e) > -40.0 {
                leaked.push(t * 20);
            }
        }
        assert!(leaked.is_empty(), "leaked at {leaked:?} ms");
    }

    #[test]
    fn silence_suppression_that_hides_an_echo_never_makes_a_line_without_one() {
        // The agent's audio at many levels, its echo 6 to 20 dB down, a phone whose silence
        // suppression sends nothing below -40 to -55 dBFS: the frames it never sends hide
        // the echo's quiet parts, but the echo of the agent's loudest audio comes through,
        // so the line never passes for one without echo (which would let the echo interrupt).
        let rate = 8_000;
        let mut wrong = Vec::new();
        for agent_db in [-20.0f32, -30.0, -40.0] {
            for erl in [-6.0f32, -10.0, -15.0, -20.0] {
                for threshold in [-40.0f32, -45.0, -55.0] {
                    for (seed, delay) in [(63u64, 40u32), (64, 120), (65, 300)] {
                        let agent = agent_track(rate, agent_db, seed);
                        let echo = delayed(rate, &agent, delay, erl);
                        let silent = vec![0i16; agent.len()];
                        let r = run(
                            rate,
                            &agent,
                            &echo,
                            &silent,
                            &silent,
                            Arrival::Suppressed(threshold),
                        );
                        if let Some(t) = r.no_echo_at_ms {
                            wrong.push((agent_db, erl, threshold, delay, t));
                        }
                    }
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "no echo found (agent, erl, threshold, delay, at ms): {wrong:?}"
        );
    }

    #[test]
    fn on_a_line_that_sends_nothing_in_silence_the_echo_is_still_held() {
        // The same line with an echo: its frames come when the echo does, so the gaps prove
        // nothing at the echo's lag, and it must not pass for the caller, from the agent's first
        // word on (nothing learned yet) and after every pause of the agent's.
        // Suppression that cuts at -55 or at -45 dBFS (its hangover frames are that loud).
        let rate = 8_000;
        for threshold in [-55.0f32, -45.0] {
            for (seed, delay) in [(63u64, 40u32), (64, 120), (65, 300)] {
                let agent = agent_track(rate, -13.0, seed);
                let echo = delayed(rate, &agent, delay, -10.0);
                let silent = vec![0i16; agent.len()];
                let line = vec![0i16; agent.len()];
                let r = run(
                    rate,
                    &agent,
                    &echo,
                    &silent,
                    &line,
                    Arrival::Suppressed(threshold),
                );
                let at = leaked_at(&r);
                eprintln!(
                    "silence suppressed below {threshold} dBFS, echo -10 dB at {delay} ms: {} frames sent, leaks at {at:?}",
                    r.obs.len()
                );
                assert!(r.obs.len() > 100, "the echo's frames were sent");
                assert!(
                    at.is_empty(),
                    "suppression at {threshold}: echo at {delay} ms let through at {at:?} ms"
                );
            }
        }
    }

    #[test]
    fn a_caller_over_the_agents_first_words_with_echo() {
        let rate = 8_000;
        let agent_dbfs = -13.0;
        for (i, delay) in [40u32, 80, 120].into_iter().enumerate() {
            let seed = 90 + i as u64;
            let agent = agent_track(rate, agent_dbfs, seed);
            let echo = delayed(rate, &agent, delay, -10.0);
            let line = noise(rate, 17_000, -65.0, seed + 20);
            for rel in [0.0, -10.0, -20.0] {
                for onset in [0u64, 200, 400, 800] {
                    let caller_dbfs = agent_dbfs + rel;
                    let voice = voice(rate, 3_000, caller_dbfs, seed + 10);
                    let caller = place(rate, 17_000, &[(onset as u32, voice)]);
                    let r = run(rate, &agent, &echo, &caller, &line, Arrival::Steady);
                    let est = r.estimate.expect("echo path learned");
                    let (first, _, held) = first_through(&r, onset, caller_dbfs);
                    let learned_held = longest_held_back_ms(&r, caller_dbfs);
                    eprintln!(
                        "echo -10 dB at {delay} ms, caller at {rel} dB from {onset} ms: learned {:.1} ms after {} ms, {} leaks, first through {} ms after, held back at most {held} ms ({learned_held} ms once learned)",
                        est.delay_ms,
                        r.learned_at_ms.unwrap_or(0),
                        leaks(&r),
                        first.map_or(0, |f| f - onset),
                    );
                    assert!((est.delay_ms - delay as f32).abs() <= 10.0, "{est:?}");
                    // A caller talking from the agent's first word can have a path learned a
                    // block or two off at first: one frame let through at 120 ms, caller at 0
                    // and -10 dB (the same with the gate before lags were proven quiet).
                    let allowed = usize::from(onset == 0);
                    assert!(
                        leaks(&r) <= allowed,
                        "{rel} dB at {onset} ms: {} leaks",
                        leaks(&r)
                    );
                    assert!(
                        learned_held <= 300,
                        "{rel} dB at {onset} ms: {learned_held} ms"
                    );
                }
            }
        }
    }

    #[test]
    fn an_echo_later_than_the_quiet_start_is_still_held() {
        // The line proves no echo only at the lags the agent's audio has reached: an echo with
        // a long delay is still caught when it starts.
        let rate = 8_000;
        for (i, delay) in [230u32, 300, 400, 550].into_iter().enumerate() {
            let seed = 300 + i as u64;
            let agent = agent_track(rate, -13.0, seed);
            let echo = delayed(rate, &agent, delay, -10.0);
            let silent = vec![0i16; agent.len()];
            let line = noise(rate, 17_000, -65.0, seed);
            let r = run(rate, &agent, &echo, &silent, &line, Arrival::Steady);
            let est = r.estimate.expect("echo path learned");
            eprintln!(
                "echo -10 dB at {delay} ms: learned {:.1} ms after {} ms, {} leaks",
                est.delay_ms,
                r.learned_at_ms.unwrap_or(0),
                leaks(&r)
            );
            assert!((est.delay_ms - delay as f32).abs() <= 10.0, "{est:?}");
            assert_eq!(leaks(&r), 0, "echo at {delay} ms let through");
        }
    }

    #[test]
    fn frames_arriving_late_in_bursts_or_not_at_all_keep_their_place() {
        for rate in [8_000, 16_000] {
            for (seed, delay) in [(3u64, 60u32), (4, 110), (5, 170)] {
                let agent = agent_track(rate, -13.0, seed);
                let echo = delayed(rate, &agent, delay, -10.0);
                let caller = place(
                    rate,
                    17_000,
                    &[(6_000, voice(rate, 3_500, -20.0, seed + 100))],
                );
                let line = noise(rate, 17_000, -65.0, seed);
                let r = run(rate, &agent, &echo, &caller, &line, Arrival::Bursty(seed));
                let est = r.estimate.expect("echo path learned");
                let (pass, _) = double_talk_pass(&r, -20.0);
                eprintln!(
                    "{rate} Hz bursty, echo at {delay} ms: learned {:.1} ms, ERL {:.1} dB, {} leaks, double talk {:.0}% through",
                    est.delay_ms,
                    est.erl_db,
                    leaks(&r),
                    pass * 100.0
                );
                assert!(
                    (est.delay_ms - delay as f32).abs() <= 10.0,
                    "{est:?} vs {delay} ms"
                );
                assert!((est.erl_db - 10.0).abs() <= 2.0, "{est:?}");
                assert_eq!(leaks(&r), 0, "echo frames let through");
                assert!(pass > 0.5, "{:.0}%", pass * 100.0);
            }
        }
    }

    /// A speakerphone in a room: the direct echo at `delay_ms` and `db`, reflections every 5 ms
    /// for `rt_ms` (60 dB down by then) starting `tail_db` below it, a soft low-pass, then the
    /// line's G.711 mu-law.
    fn room(rate: u32, s: &[i16], delay_ms: u32, db: f32, tail_db: f32, rt_ms: u32) -> Vec<f32> {
        let per_ms = (rate / 1000) as usize;
        let mut rng = Rng(77);
        let mut taps = vec![(delay_ms as usize * per_ms, 10f32.powf(db / 20.0))];
        let mut t = 5;
        while t <= rt_ms {
            let g = 10f32.powf((db + tail_db - 60.0 * t as f32 / rt_ms as f32) / 20.0);
            let sign = if rng.next().is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
            taps.push((
                (delay_ms + t) as usize * per_ms,
                sign * g * rng.range(0.5, 1.0),
            ));
            t += 5;
        }
        let mut out = vec![0f32; s.len()];
        for (d, g) in taps {
            for i in d..s.len() {
                out[i] += g * f32::from(s[i - d]);
            }
        }
        let mut lp = 0.0;
        for o in out.iter_mut() {
            lp += 0.6 * (*o - lp);
            *o = lp;
        }
        out
    }

    fn ulaw(s: &[i16]) -> Vec<i16> {
        use crate::audio::g711;
        s.iter()
            .map(|&x| g711::ulaw_to_linear(g711::linear_to_ulaw(x)))
            .collect()
    }

    #[test]
    fn a_speakerphone_in_a_room_over_mu_law() {
        for rate in [8_000, 16_000] {
            for (delay, tail_db, rt_ms) in [(90u32, -6.0, 150u32), (140, -3.0, 300)] {
                let agent = agent_track(rate, -13.0, 9);
                let echo_f = room(rate, &agent, delay, -10.0, tail_db, rt_ms);
                let echo: Vec<i16> = echo_f
                    .iter()
                    .map(|v| v.round().clamp(-32_768.0, 32_767.0) as i16)
                    .collect();
                let echo = ulaw(&echo);
                let caller = place(rate, 17_000, &[(6_000, voice(rate, 3_500, -20.0, 90))]);
                let line = noise(rate, 17_000, -60.0, 10);
                let r = run(rate, &agent, &echo, &caller, &line, Arrival::Steady);
                let est = r.estimate.expect("echo path learned");
                let (pass, _) = double_talk_pass(&r, -20.0);
                let held = longest_held_back_ms(&r, -20.0);
                eprintln!(
                    "{rate} Hz room, direct echo at {delay} ms, tail {tail_db} dB RT {rt_ms} ms: learned {:.1} ms, ERL {:.1} dB, {} leaks, double talk {:.0}% through, at most {held} ms held back",
                    est.delay_ms,
                    est.erl_db,
                    leaks(&r),
                    pass * 100.0
                );
                assert!(
                    (est.delay_ms - delay as f32).abs() <= 10.0,
                    "{est:?} vs {delay} ms"
                );
                assert!(held <= 300, "the caller held back for {held} ms");
                if tail_db < -5.0 {
                    assert_eq!(leaks(&r), 0, "echo frames let through");
                } else {
                    // A tail as loud as the direct echo for 300 ms: a few word ends get through.
                    let audible = r
                        .obs
                        .iter()
                        .filter(|o| o.caller_db <= FLOOR_DB && o.mic_db > -50.0)
                        .count();
                    assert!(leaks(&r) * 20 <= audible, "{} of {audible}", leaks(&r));
                }
            }
        }
    }

    /// `a` before `at_ms`, `b` from then on.
    fn switch(rate: u32, a: &[i16], b: &[i16], at_ms: u32) -> Vec<i16> {
        let at = (rate / 1000 * at_ms) as usize;
        a.iter()
            .zip(b)
            .enumerate()
            .map(|(i, (x, y))| if i < at { *x } else { *y })
            .collect()
    }

    /// Audible echo-only frames the gate let through at or after `from_ms`.
    fn leaks_from(r: &Run, from_ms: u64) -> Vec<u64> {
        r.obs
            .iter()
            .filter(|o| {
                o.t_ms >= from_ms
                    && o.caller_db <= FLOOR_DB
                    && o.mic_db > -50.0
                    && o.echo_db > -60.0
                    && !o.echo
            })
            .map(|o| o.t_ms)
            .collect()
    }

    #[test]
    fn a_path_that_changes_or_appears_is_learned_again() {
        let rate = 8_000;
        let agent = place(
            rate,
            30_000,
            &[
                (0, voice(rate, 6_000, -13.0, 20)),
                (7_000, voice(rate, 11_000, -13.0, 21)),
                (19_000, voice(rate, 11_000, -13.0, 22)),
            ],
        );
        let silent = vec![0i16; agent.len()];
        let line = noise(rate, 30_000, -65.0, 23);
        let near = delayed(rate, &agent, 80, -10.0);
        let far = delayed(rate, &agent, 220, -10.0);
        for (what, before, after, to_ms) in [
            ("the delay moves from 80 to 220 ms", &near, &far, 220.0),
            (
                "a speakerphone is switched on (no echo, then 80 ms)",
                &silent,
                &near,
                80.0,
            ),
        ] {
            let echo = switch(rate, before, after, 8_000);
            let r = run(rate, &agent, &echo, &silent, &line, Arrival::Steady);
            let est = r.estimate.expect("echo path learned");
            let leaks = leaks_from(&r, 8_000);
            let last = leaks.last().copied().unwrap_or(8_000);
            eprintln!(
                "{what}: learned {:.1} ms, ERL {:.1} dB; {} echo frames through after the change, the last {} ms after it",
                est.delay_ms,
                est.erl_db,
                leaks.len(),
                last - 8_000
            );
            assert!((est.delay_ms - to_ms).abs() <= 10.0, "{what}: {est:?}");
            assert!((est.erl_db - 10.0).abs() <= 2.0, "{what}: {est:?}");
            assert!(
                last <= 11_000,
                "{what}: echo still let through {last} ms into the call"
            );
        }
    }

    #[test]
    fn double_talk_from_the_first_word_still_learns() {
        let rate = 16_000;
        let agent = agent_track(rate, -13.0, 30);
        let echo = delayed(rate, &agent, 120, -10.0);
        // The caller talks over most of the agent's first 4 s.
        let caller = place(rate, 17_000, &[(200, voice(rate, 3_000, -20.0, 31))]);
        let line = noise(rate, 17_000, -65.0, 32);
        let r = run(rate, &agent, &echo, &caller, &line, Arrival::Steady);
        let est = r.estimate.expect("echo path learned");
        eprintln!(
            "double talk from the start: learned {:.1} ms, ERL {:.1} dB after {} ms, {} echo frames through",
            est.delay_ms,
            est.erl_db,
            r.learned_at_ms.unwrap_or(0),
            leaks(&r)
        );
        assert!((est.delay_ms - 120.0).abs() <= 10.0, "{est:?}");
        assert!((est.erl_db - 10.0).abs() <= 2.0, "{est:?}");
        assert_eq!(leaks(&r), 0);
    }

    #[test]
    fn no_agent_audio_in_the_window_is_never_echo() {
        let rate = 8_000;
        // The agent talks for 3 s; the caller answers from 4 s, at every level, on a line
        // with a learned echo.
        let agent = place(rate, 10_000, &[(0, voice(rate, 3_000, -13.0, 50))]);
        let echo = delayed(rate, &agent, 100, -10.0);
        let mut parts = Vec::new();
        for (i, db) in [-20.0, -30.0, -40.0, -50.0].into_iter().enumerate() {
            parts.push((
                4_000 + 1_500 * i as u32,
                voice(rate, 1_200, db, 51 + i as u64),
            ));
        }
        let caller = place(rate, 10_000, &parts);
        let line = noise(rate, 10_000, -65.0, 55);
        for arrival in [Arrival::Steady, Arrival::Bursty(56)] {
            let r = run(rate, &agent, &echo, &caller, &line, arrival);
            assert!(r.estimate.is_some());
            // 3 s + 100 ms of delay + the 600 ms window.
            let gated: Vec<u64> = r
                .obs
                .iter()
                .filter(|o| o.t_ms >= 3_720 && o.echo)
                .map(|o| o.t_ms)
                .collect();
            assert!(gated.is_empty(), "gated without agent audio: {gated:?}");
        }
        // Before anything was learned too.
        let mut g = EchoGate::new(
            rate,
            &EchoConfig {
                enabled: true,
                ..EchoConfig::default()
            },
        );
        for t in 0..100 {
            g.reference(&[]);
            let c = &caller[(4_000 / 20 + t) * 160..][..160];
            assert!(!g.is_echo(c));
        }
    }

    #[test]
    fn silence_empty_and_odd_frames_do_not_panic() {
        let loud: Vec<i16> = (0..320)
            .map(|i| if i % 2 == 0 { i16::MAX } else { i16::MIN })
            .collect();
        for rate in [8_000, 16_000, 0, 1, 48_000] {
            for cfg in [
                EchoConfig {
                    enabled: true,
                    ..EchoConfig::default()
                },
                EchoConfig {
                    max_delay_ms: 0,
                    margin_db: f32::NAN,
                    default_erl_db: f32::INFINITY,
                    ..EchoConfig {
                        enabled: true,
                        ..EchoConfig::default()
                    }
                },
                EchoConfig {
                    max_delay_ms: u64::MAX,
                    ..EchoConfig {
                        enabled: true,
                        ..EchoConfig::default()
                    }
                },
            ] {
                let mut g = EchoGate::new(rate, &cfg);
                // The caller before any reference, then every shape of frame.
                assert!(!g.is_echo(&loud));
                assert!(!g.is_echo(&[]));
                let frames: [&[i16]; 7] =
                    [&[], &[0], &[1; 3], &[0; 160], &[0; 320], &loud, &[7; 5_000]];
                for i in 0..2_000 {
                    let f = frames[i % frames.len()];
                    g.reference(f);
                    g.is_echo(frames[(i / 3) % frames.len()]);
                    if i % 5 == 0 {
                        g.is_echo(&loud);
                        g.is_echo(&loud);
                    }
                    if i % 7 == 0 {
                        g.reference(&loud);
                    }
                }
                let _ = g.estimate();
                // Digital silence all along: never echo, nothing learned.
                let mut g = EchoGate::new(rate, &cfg);
                for _ in 0..500 {
                    g.reference(&[0; 160]);
                    assert!(!g.is_echo(&[0; 160]));
                }
                assert_eq!(g.estimate(), None);
            }
        }
        // Disabled: never echo, whatever plays.
        let off = EchoConfig {
            enabled: false,
            ..EchoConfig {
                enabled: true,
                ..EchoConfig::default()
            }
        };
        let mut g = EchoGate::new(8_000, &off);
        let agent = agent_track(8_000, -13.0, 60);
        let echo = delayed(8_000, &agent, 100, -10.0);
        for t in 0..agent.len() / 160 {
            g.reference(&agent[t * 160..][..160]);
            assert!(!g.is_echo(&echo[t * 160..][..160]));
        }
        assert_eq!(g.estimate(), None);
    }

    /// The path is learned on a steady line and on one with silence suppression alike, and
    /// the cost per frame is printed (figures: `cargo test --release --lib cost_per_frame --
    /// --nocapture`).
    #[test]
    fn cost_per_frame() {
        let rate = 16_000;
        let agent = agent_track(rate, -13.0, 70);
        let echo = delayed(rate, &agent, 150, -10.0);
        let caller = place(rate, 17_000, &[(6_000, voice(rate, 3_500, -20.0, 71))]);
        let mic = mix(&[&echo, &caller, &noise(rate, 17_000, -65.0, 72)]);
        let mut g = EchoGate::new(
            rate,
            &EchoConfig {
                enabled: true,
                ..EchoConfig::default()
            },
        );
        let frames = agent.len() / 320;
        let started = std::time::Instant::now();
        let mut gated = 0;
        for t in 0..frames {
            g.reference(&agent[t * 320..][..320]);
            gated += usize::from(g.is_echo(&mic[t * 320..][..320]));
        }
        let per = started.elapsed().as_secs_f64() * 1e6
            / f64::from(u32::try_from(frames).unwrap_or(u32::MAX));
        eprintln!(
            "echo gate: {per:.2} us per 20 ms frame at 16 kHz, reference and caller ({gated} of {frames} gated)"
        );
        let learned = |g: &EchoGate| g.estimate().map(|e| e.delay_ms);
        assert!(
            learned(&g).is_some_and(|d| (d - 150.0).abs() <= 10.0),
            "{:?}",
            g.estimate()
        );
        // The same line with silence suppression (frames under -50 dBFS and 5 after a louder
        // one never sent): the frame after a gap proves the gap's lags quiet at once.
        let mut g = EchoGate::new(
            rate,
            &EchoConfig {
                enabled: true,
                ..EchoConfig::default()
            },
        );
        let (mut worst, mut sent, mut hangover) = (0.0f64, 0usize, 0u32);
        let started = std::time::Instant::now();
        for t in 0..frames {
            g.reference(&agent[t * 320..][..320]);
            let f = &mic[t * 320..][..320];
            if dbfs(f) > -50.0 {
                hangover = 6;
            }
            let send = hangover > 0;
            hangover = hangover.saturating_sub(1);
            g.arrivals(usize::from(send));
            if send {
                let one = std::time::Instant::now();
                g.is_echo(f);
                worst = worst.max(one.elapsed().as_secs_f64() * 1e6);
                sent += 1;
            }
        }
        let per = started.elapsed().as_secs_f64() * 1e6
            / f64::from(u32::try_from(frames).unwrap_or(u32::MAX));
        eprintln!(
            "echo gate, silence suppressed: {per:.2} us per 20 ms tick ({sent} of {frames} frames sent), the dearest frame {worst:.0} us"
        );
        assert!(sent < frames, "silence was suppressed");
        assert!(
            learned(&g).is_some_and(|d| (d - 150.0).abs() <= 10.0),
            "{:?}",
            g.estimate()
        );
    }
}
