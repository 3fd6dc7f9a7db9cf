//! Where the call's 20 ms tick falls against the PBX's 20 ms frames. The call hears the caller
//! once per tick, so a frame that arrives just after a tick waits nearly 20 ms before the VAD,
//! the barge-in pause and the endpoint see it; on a PBX whose frames come at a steady phase that
//! is up to 20 ms added to every barge-in and every end of turn, 10 ms on average. This watches a
//! second of arrivals and, when the frames are steady and the tick could come sooner after them,
//! says where to move it: just after the frames. Pure: the session owns the clock.

use std::time::Duration;

/// The tick's period.
const PERIOD_US: u64 = 20_000;
/// Arrivals weighed at once (one second of 20 ms frames).
const WINDOW: usize = 50;
/// The tick goes this long after the frames it should take (their arrival jitters a little).
const MARGIN_US: u64 = 1_500;
/// Moving is worth it when frames would wait at least this much less on average.
const MIN_GAIN_US: u64 = 3_000;

/// Arrival offsets since the last tick, and the decision once a window is full.
#[derive(Debug, Default)]
pub struct TickPhase {
    offsets: Vec<u64>,
}

impl TickPhase {
    pub fn new() -> Self {
        Self {
            offsets: Vec::with_capacity(WINDOW),
        }
    }

    /// A caller frame arrived `since_tick` after the last tick. Once a window is full, returns
    /// when the next tick should come, counted from the last tick (in `(0, 20 ms]`), if that
    /// saves frames enough waiting; the window then starts again. A frame 20 ms or more after
    /// the last tick (a backlog, a late tick) tells nothing about the phase and is not counted.
    pub fn arrival(&mut self, since_tick: Duration) -> Option<Duration> {
        let us = u64::try_from(since_tick.as_micros()).unwrap_or(u64::MAX);
        if us >= PERIOD_US {
            return None;
        }
        self.offsets.push(us);
        if self.offsets.len() < WINDOW {
            return None;
        }
        let moved = best_tick(&self.offsets);
        // The next window starts empty (the buffer is kept: no allocation per window).
        self.offsets.clear();
        moved
    }
}

/// The tick (after the last one) at which these arrivals would wait least, if that saves
/// `MIN_GAIN_US` a frame on average over the tick where it is.
fn best_tick(offsets: &[u64]) -> Option<Duration> {
    // Each frame waits until the next tick after it: at the tick itself it waits a whole
    // period (the tick is taken first).
    let waits = |tick: u64| -> u64 {
        offsets
            .iter()
            .map(|&o| (tick + PERIOD_US - o - 1) % PERIOD_US + 1)
            .sum()
    };
    let now = waits(PERIOD_US);
    // The best tick is just after one of the arrivals: try each.
    let (best, best_waits) = offsets
        .iter()
        .map(|&o| {
            let t = (o + MARGIN_US) % PERIOD_US;
            let t = if t == 0 { PERIOD_US } else { t };
            (t, waits(t))
        })
        .min_by_key(|&(_, w)| w)?;
    let n = u64::try_from(offsets.len()).unwrap_or(1).max(1);
    if now.saturating_sub(best_waits) / n < MIN_GAIN_US {
        return None;
    }
    Some(Duration::from_micros(best))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arrivals in a window (`WINDOW`; the last test fails if the two part).
    const N: u64 = 50;

    fn feed(p: &mut TickPhase, offsets: impl IntoIterator<Item = u64>) -> Option<Duration> {
        let mut last = None;
        for o in offsets {
            last = p.arrival(Duration::from_micros(o));
        }
        last
    }

    #[test]
    fn frames_just_after_the_tick_move_it_just_after_them() {
        let mut p = TickPhase::new();
        // Frames 2 ms after each tick (±0.3 ms) wait 18 ms: the tick moves to 3.5-3.8 ms.
        let at = feed(&mut p, (0..N).map(|i| 1_700 + (i * 7919) % 600));
        let at = at.expect("a steady phase 18 ms away is moved");
        assert!(
            (Duration::from_micros(3_200)..=Duration::from_micros(3_800)).contains(&at),
            "{at:?}"
        );
    }

    #[test]
    fn frames_just_before_the_tick_leave_it() {
        let mut p = TickPhase::new();
        assert_eq!(feed(&mut p, (0..N).map(|i| 18_500 + i % 5 * 100)), None);
        // Frames that straddle the tick: some just before, some just after. The tick moves
        // after the later ones; those before wait little more than before.
        let mut p = TickPhase::new();
        let at = feed(
            &mut p,
            (0..N).map(|i| if i % 2 == 0 { 19_800 } else { 300 }),
        );
        assert_eq!(at, Some(Duration::from_micros(1_300)));
    }

    #[test]
    fn frames_at_no_steady_phase_leave_it() {
        // Spread over the whole period (a jittery network, a peer sending as it likes): no
        // tick is better than another on average.
        let mut p = TickPhase::new();
        assert_eq!(feed(&mut p, (0..N).map(|i| (i * 400) % PERIOD_US)), None);
    }

    #[test]
    fn a_backlog_is_not_counted_and_each_window_starts_again() {
        let mut p = TickPhase::new();
        for _ in 0..N * 3 {
            assert_eq!(p.arrival(Duration::from_millis(25)), None);
        }
        assert!(feed(&mut p, (0..N).map(|_| 500)).is_some());
        // The next window needs its own WINDOW arrivals.
        assert_eq!(feed(&mut p, (0..N - 1).map(|_| 500)), None);
        assert!(p.arrival(Duration::from_micros(500)).is_some());
    }
}
