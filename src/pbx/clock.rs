//! A model of a PBX's playout queue, for PBXes that report no marks (Asterisk chan_websocket
//! before 20.18/22.8/23.2) or lose them (jambonz mod_audio_fork after a killAudio): every mark
//! gets the time its audio will have played.

use std::collections::VecDeque;
use std::time::Duration;

/// Sidecall's model of a PBX's playout queue (Asterisk's chan_websocket, jambonz mod_audio_fork):
/// it plays one frame per ptime, so the queue is empty at `busy_until`. Every mark gets the time its audio will have played; without
/// PBX marks that time reports it, with them it is the deadline for a lost one.
#[derive(Debug)]
pub struct PlayoutClock {
    ptime: Duration,
    busy_until: tokio::time::Instant,
    /// (mark, when its audio has played, whether Asterisk was asked to answer it).
    marks: VecDeque<(u64, tokio::time::Instant, bool)>,
}

impl PlayoutClock {
    pub fn new(ptime_ms: u32, now: tokio::time::Instant) -> Self {
        Self {
            ptime: Duration::from_millis(u64::from(ptime_ms.clamp(10, 200))),
            busy_until: now,
            marks: VecDeque::new(),
        }
    }

    /// One frame reached Asterisk's queue.
    pub fn frame_sent(&mut self, now: tokio::time::Instant) {
        self.busy_until = self.busy_until.max(now) + self.ptime;
    }

    /// Everything sent so far is followed by mark `id` (`asked`: MARK_MEDIA went to Asterisk,
    /// whose answer is waited for a grace period longer). Asterisk's timer starts playing a
    /// frame up to one ptime after it arrives, hence one ptime of margin.
    pub fn mark(&mut self, id: u64, now: tokio::time::Instant, asked: bool) {
        let due = self.busy_until.max(now) + self.ptime;
        self.marks.push_back((id, due, asked));
    }

    /// The queue was flushed: nothing is left to play, pending marks are dropped.
    pub fn flush(&mut self, now: tokio::time::Instant) {
        self.busy_until = now;
        self.marks.clear();
    }

    /// Asterisk answered mark `id`: it and every earlier mark are done.
    pub fn confirmed(&mut self, id: u64) {
        while self.marks.front().is_some_and(|(m, _, _)| *m <= id) {
            self.marks.pop_front();
        }
    }

    /// When the next mark falls due; `grace` is added where Asterisk was asked to answer.
    pub fn next_due(&self, grace: Duration) -> Option<tokio::time::Instant> {
        self.marks
            .front()
            .map(|(_, due, asked)| if *asked { *due + grace } else { *due })
    }

    /// Marks whose time has come, with whether each was one Asterisk should have answered.
    pub fn due(&mut self, now: tokio::time::Instant, grace: Duration) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        while let Some(&(id, due, asked)) = self.marks.front() {
            if (if asked { due + grace } else { due }) > now {
                break;
            }
            out.push((id, asked));
            self.marks.pop_front();
        }
        out
    }
}
