//! Playout of one agent reply: synthesized audio is sent one 20 ms frame per tick (plus a
//! small lead so the PBX never starves), each segment ends with a mark, and the marks the PBX
//! reports back tell exactly what the caller has heard. Stopping (barge-in) says how much of
//! the reply was heard, cut at a word.

use std::collections::VecDeque;

use super::link::{LinkError, MediaLink};
use crate::engines::dialog::{Heard, Segment};

#[derive(Debug)]
struct SegPlay {
    mark: u64,
    text: String,
    audio: VecDeque<i16>,
    synth_done: bool,
    received: usize,
    sent: usize,
    pause_frames: u64,
    marked: bool,
    played: bool,
}

impl SegPlay {
    fn new(mark: u64, s: &Segment) -> Self {
        Self {
            mark,
            text: s.text.clone(),
            audio: VecDeque::new(),
            synth_done: s.text.trim().is_empty(),
            received: 0,
            sent: 0,
            pause_frames: s.pause_after_ms / 20,
            marked: false,
            played: false,
        }
    }
}

/// What one tick did.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Tick {
    /// Frames sent this tick.
    pub frames: usize,
    /// This tick sent the reply's first frame.
    pub first_audio: bool,
}

/// Plays one reply.
#[derive(Debug)]
pub struct Playout {
    frame_len: usize,
    lead: usize,
    segs: Vec<SegPlay>,
    cur: usize,
    started: bool,
    frames_sent: u64,
    ticks_since_start: u64,
    stopped: bool,
    /// More segments may come (a reply still streaming from the dialog).
    open: bool,
    first_mark: u64,
    full_text: String,
    /// The frame being assembled, reused every tick.
    frame: Vec<i16>,
    /// Paused: nothing is sent, nothing is lost.
    held: bool,
    /// The last frames sent (segment, samples; empty for a pause frame), so what the PBX
    /// still had queued when it was flushed for a pause can be sent again on resume.
    recent: VecDeque<(usize, Vec<i16>)>,
}

impl Playout {
    /// A reply of `segments`; marks are numbered from `first_mark`.
    pub fn new(segments: &[Segment], first_mark: u64, frame_len: usize, lead: usize) -> Self {
        let segs = segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                SegPlay::new(
                    first_mark.saturating_add(u64::try_from(i).unwrap_or(u64::MAX)),
                    s,
                )
            })
            .collect();
        Self {
            frame_len,
            lead,
            segs,
            cur: 0,
            started: false,
            frames_sent: 0,
            ticks_since_start: 0,
            stopped: false,
            open: false,
            first_mark,
            full_text: crate::engines::dialog::prompt::joined(segments),
            frame: vec![0; frame_len],
            held: false,
            recent: VecDeque::new(),
        }
    }

    /// A reply still streaming: segments are added with `push`, and it is not over (all
    /// sent, finished) until `close`.
    pub fn streaming(mut self) -> Self {
        self.open = true;
        self
    }

    /// One more segment of a streaming reply.
    pub fn push(&mut self, segment: &Segment) {
        let mark = self
            .first_mark
            .saturating_add(u64::try_from(self.segs.len()).unwrap_or(u64::MAX));
        self.segs.push(SegPlay::new(mark, segment));
        self.full_text = match (self.full_text.is_empty(), segment.text.trim().is_empty()) {
            (_, true) => std::mem::take(&mut self.full_text),
            (true, false) => segment.text.trim().to_string(),
            (false, false) => format!("{} {}", self.full_text, segment.text.trim()),
        };
    }

    /// No more segments will come.
    pub fn close(&mut self) {
        self.open = false;
    }

    /// Mark ids this reply uses (so far, while it streams).
    pub fn mark_range(&self) -> std::ops::Range<u64> {
        match (self.segs.first(), self.segs.last()) {
            (Some(a), Some(b)) => a.mark..b.mark + 1,
            _ => 0..0,
        }
    }

    pub fn segment_count(&self) -> usize {
        self.segs.len()
    }

    /// Audio for segment `idx` arrived from TTS.
    pub fn add_audio(&mut self, idx: usize, samples: &[i16]) {
        if let Some(s) = self.segs.get_mut(idx) {
            s.received += samples.len();
            s.audio.extend(samples.iter().copied());
        }
    }

    /// Synthesis of segment `idx` finished (successfully or not).
    pub fn synth_done(&mut self, idx: usize) {
        if let Some(s) = self.segs.get_mut(idx) {
            s.synth_done = true;
        }
    }

    /// Pauses (`true`) or resumes sending; what was not sent stays for the resume.
    pub fn hold(&mut self, on: bool) {
        self.held = on;
    }

    /// The PBX dropped what it had queued (a flush at a pause): those frames count as not
    /// sent and go out again on resume, with the marks they passed. Returns how many.
    /// Called at the start of a tick, before `tick`: the PBX has played one more frame than
    /// the last tick counted.
    pub fn unsend_queued(&mut self) -> usize {
        let played = self
            .ticks_since_start
            .saturating_add(u64::from(self.started));
        let queued = usize::try_from(self.frames_sent.saturating_sub(played)).unwrap_or(usize::MAX);
        let mut n = 0;
        while n < queued {
            let Some((idx, samples)) = self.recent.pop_back() else {
                break;
            };
            let Some(seg) = self.segs.get_mut(idx) else {
                break;
            };
            if samples.is_empty() {
                seg.pause_frames += 1;
            } else {
                seg.sent = seg.sent.saturating_sub(samples.len());
                for s in samples.into_iter().rev() {
                    seg.audio.push_front(s);
                }
            }
            // Its mark (if it went out) was dropped with the queue.
            seg.marked = false;
            self.cur = self.cur.min(idx);
            n += 1;
        }
        for s in self.segs.iter_mut().skip(self.cur + 1) {
            if !s.played {
                s.marked = false;
            }
        }
        self.frames_sent = self
            .frames_sent
            .saturating_sub(u64::try_from(n).unwrap_or(u64::MAX));
        self.ticks_since_start = self.ticks_since_start.min(self.frames_sent);
        n
    }

    /// Whether the first frame has gone out.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Sends what is due this tick.
    pub fn tick(&mut self, link: &mut dyn MediaLink) -> Result<Tick, LinkError> {
        let mut t = Tick::default();
        if self.stopped {
            return Ok(t);
        }
        if self.started {
            self.ticks_since_start += 1;
            // The PBX played all it had and then silence (TTS or the dialog was behind, or the
            // reply was paused): that time is not owed. Without this the gap would go out as
            // a burst and sit queued at the PBX, far past the lead.
            self.ticks_since_start = self.ticks_since_start.min(self.frames_sent);
        }
        if self.held {
            return Ok(t);
        }
        // Keep `lead` frames queued at the PBX ahead of what is playing.
        let outstanding = self.frames_sent.saturating_sub(self.ticks_since_start) as usize;
        let budget = (self.lead + 1)
            .saturating_sub(outstanding)
            .max(if self.started { 0 } else { 1 });
        let frame = &mut self.frame;
        while t.frames < budget {
            let Some(seg) = self.segs.get_mut(self.cur) else {
                break;
            };
            let kept =
                if seg.audio.len() >= self.frame_len || (seg.synth_done && !seg.audio.is_empty()) {
                    let n = seg.audio.len().min(self.frame_len);
                    for (slot, s) in frame.iter_mut().zip(seg.audio.drain(..n)) {
                        *slot = s;
                    }
                    frame[n..].fill(0);
                    seg.sent += n;
                    n
                } else if seg.synth_done && seg.pause_frames > 0 {
                    seg.pause_frames -= 1;
                    frame.fill(0);
                    0
                } else if seg.synth_done {
                    if !seg.marked {
                        link.mark(seg.mark)?;
                        seg.marked = true;
                    }
                    self.cur += 1;
                    continue;
                } else {
                    break; // TTS has not caught up: the PBX plays silence meanwhile.
                };
            link.send_audio(frame)?;
            // Kept for a resend (the oldest buffer reused: no allocation once warm).
            let mut buf = if self.recent.len() > self.lead + 2 {
                self.recent.pop_front().map(|(_, b)| b).unwrap_or_default()
            } else {
                Vec::with_capacity(self.frame_len)
            };
            buf.clear();
            buf.extend_from_slice(&frame[..kept]);
            self.recent.push_back((self.cur, buf));
            if !self.started {
                self.started = true;
                t.first_audio = true;
            }
            self.frames_sent += 1;
            t.frames += 1;
        }
        // Marks of trailing empty segments go out as soon as they are reached.
        while let Some(seg) = self.segs.get_mut(self.cur) {
            if seg.synth_done && seg.audio.is_empty() && seg.pause_frames == 0 {
                if !seg.marked {
                    link.mark(seg.mark)?;
                    seg.marked = true;
                }
                self.cur += 1;
            } else {
                break;
            }
        }
        Ok(t)
    }

    /// Part of what has been received is still to be sent.
    pub fn has_unsent(&self) -> bool {
        self.cur < self.segs.len()
    }

    /// Every segment has been sent and marked: only the PBX's confirmation is outstanding.
    pub fn all_sent(&self) -> bool {
        !self.open && self.cur >= self.segs.len()
    }

    /// Audio sent ahead of real time (still queued at the PBX), in ms.
    pub fn queued_ms(&self) -> u64 {
        self.frames_sent
            .saturating_sub(self.ticks_since_start)
            .saturating_mul(20)
    }

    /// The PBX played up to mark `id`. Returns true when the whole reply has been played.
    pub fn on_mark(&mut self, id: u64) -> bool {
        for s in self.segs.iter_mut() {
            if s.mark <= id && s.marked {
                s.played = true;
            }
        }
        self.finished()
    }

    /// Every segment has been heard.
    pub fn finished(&self) -> bool {
        !self.open && self.segs.iter().all(|s| s.played)
    }

    /// Stops sending (barge-in) and says what the caller heard: whole segments whose marks came
    /// back, then the played share of the segment in progress, cut at a word.
    pub fn stop(&mut self) -> Heard {
        self.stopped = true;
        let outstanding =
            self.frames_sent.saturating_sub(self.ticks_since_start) as usize * self.frame_len;
        let mut parts: Vec<String> = Vec::new();
        let mut complete = true;
        for s in &self.segs {
            if s.played {
                parts.push(s.text.clone());
                continue;
            }
            complete = false;
            let total = if s.synth_done {
                s.received
            } else {
                s.received.max(s.sent)
            };
            let played = s.sent.saturating_sub(outstanding);
            if total > 0 && played > 0 {
                let words: Vec<&str> = s.text.split_whitespace().collect();
                let n = ((played as f64 / total as f64) * words.len() as f64).floor() as usize;
                if n > 0 {
                    parts.push(words[..n.min(words.len())].join(" "));
                }
            }
            break;
        }
        Heard {
            text: parts.join(" "),
            complete,
        }
    }

    /// The reply is playing its closing question: every segment before the one in progress
    /// has played, the reply is complete, and nothing but that segment is left to say, which
    /// ends with "?". A "yes" over it is an answer, not acknowledgement.
    pub fn asking(&self) -> bool {
        if self.open {
            return false;
        }
        let Some(i) = self.segs.iter().position(|s| !s.played) else {
            return false;
        };
        self.segs[i].text.trim_end().ends_with('?')
            && self.segs[i + 1..].iter().all(|s| s.text.trim().is_empty())
    }

    /// The whole text of the reply.
    pub fn text(&self) -> String {
        self.full_text.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec {
        frames: usize,
        marks: Vec<u64>,
    }
    impl MediaLink for Rec {
        fn send_audio(&mut self, _f: &[i16]) -> Result<(), LinkError> {
            self.frames += 1;
            Ok(())
        }
        fn mark(&mut self, id: u64) -> Result<(), LinkError> {
            self.marks.push(id);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), LinkError> {
            Ok(())
        }
    }

    fn segs() -> Vec<Segment> {
        vec![
            Segment {
                text: "Hello there.".into(),
                pause_after_ms: 40,
            },
            Segment {
                text: "Your order shipped yesterday and arrives tomorrow.".into(),
                pause_after_ms: 0,
            },
        ]
    }

    #[test]
    fn the_closing_question_is_told_once_all_before_it_has_played() {
        let ask = [
            Segment {
                text: "I found order 55421.".into(),
                pause_after_ms: 0,
            },
            Segment {
                text: "Is that the one?".into(),
                pause_after_ms: 0,
            },
        ];
        let mut p = Playout::new(&ask, 10, 160, 2);
        let mut link = Rec::default();
        p.add_audio(0, &[1; 160 * 3]);
        p.synth_done(0);
        p.add_audio(1, &[1; 160 * 3]);
        p.synth_done(1);
        for _ in 0..3 {
            p.tick(&mut link).unwrap();
        }
        assert!(!p.asking(), "the statement is still playing");
        assert_eq!(link.marks, vec![10], "the statement was sent whole");
        assert!(!p.on_mark(10), "the question is still to play");
        assert!(p.asking(), "only the question is left");
        // A reply still streaming from the dialog may go on after the question.
        let mut open = Playout::new(&ask, 20, 160, 2).streaming();
        let mut link = Rec::default();
        open.add_audio(0, &[1; 160]);
        open.synth_done(0);
        for _ in 0..3 {
            open.tick(&mut link).unwrap();
        }
        open.on_mark(20);
        assert!(!open.asking());
        // No question at the end.
        let mut p = Playout::new(&segs(), 30, 160, 2);
        p.add_audio(0, &[1; 160]);
        p.synth_done(0);
        let mut link = Rec::default();
        for _ in 0..3 {
            p.tick(&mut link).unwrap();
        }
        p.on_mark(30);
        assert!(!p.asking());
    }

    #[test]
    fn paces_one_frame_per_tick_after_lead_and_marks_each_segment() {
        let mut p = Playout::new(&segs(), 10, 160, 2);
        let mut link = Rec::default();
        p.add_audio(0, &[1; 160 * 5]);
        p.synth_done(0);
        let t = p.tick(&mut link).unwrap();
        assert_eq!(
            t,
            Tick {
                frames: 3,
                first_audio: true
            },
            "first tick fills the lead"
        );
        assert_eq!(p.tick(&mut link).unwrap().frames, 1);
        assert_eq!(p.tick(&mut link).unwrap().frames, 1);
        // 5 audio frames sent; then 2 pause frames, then the mark.
        p.tick(&mut link).unwrap();
        p.tick(&mut link).unwrap();
        assert_eq!(link.frames, 7);
        assert_eq!(link.marks, vec![10]);
        // Segment 1 not synthesized yet: underrun, nothing sent.
        assert_eq!(p.tick(&mut link).unwrap().frames, 0);
        assert!(!p.on_mark(10));
        p.add_audio(1, &[1; 800]);
        p.synth_done(1);
        for _ in 0..10 {
            p.tick(&mut link).unwrap();
        }
        assert_eq!(link.marks, vec![10, 11]);
        assert!(p.on_mark(11));
    }

    #[test]
    fn after_an_underrun_the_pbx_queue_is_refilled_to_the_lead_not_by_the_gap() {
        // A streamed reply: the next sentence comes a second after the first one played.
        let mut p = Playout::new(&segs()[..1], 0, 160, 2).streaming();
        let mut link = Rec::default();
        p.add_audio(0, &[1; 160 * 5]);
        p.synth_done(0);
        for _ in 0..60 {
            p.tick(&mut link).unwrap();
        }
        p.push(&segs()[1]);
        p.add_audio(1, &[1; 160 * 40]);
        p.synth_done(1);
        let sent: Vec<usize> = (0..10).map(|_| p.tick(&mut link).unwrap().frames).collect();
        // The lead again at once, then one frame a tick: never the second of gap as a burst.
        assert_eq!(sent, [3, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        // As at the start of a reply: the frame playing and the lead of two.
        assert_eq!(p.queued_ms(), 60);
    }

    #[test]
    fn a_flush_at_a_pause_sends_the_queued_frames_again_on_resume() {
        let mut p = Playout::new(&segs(), 0, 160, 2);
        let mut link = Rec::default();
        // Frames numbered by their first sample, to see what is sent again.
        let audio: Vec<i16> = (1..=10).flat_map(|i| [i as i16; 160]).collect();
        p.add_audio(0, &audio);
        p.synth_done(0);
        p.add_audio(1, &[1; 1600]);
        p.synth_done(1);
        for _ in 0..3 {
            p.tick(&mut link).unwrap();
        }
        // 5 frames sent (3, then 1, 1); at the start of the next tick 3 have played.
        assert_eq!(link.frames, 5);
        p.hold(true);
        assert_eq!(p.unsend_queued(), 2);
        // Only the frame playing as this tick begins is left at the PBX.
        assert_eq!(p.queued_ms(), 20);
        for _ in 0..5 {
            assert_eq!(p.tick(&mut link).unwrap().frames, 0, "held");
        }
        p.hold(false);
        let before = link.frames;
        p.tick(&mut link).unwrap();
        assert_eq!(
            link.frames - before,
            3,
            "the lead refilled from frame 4 again"
        );
        // All of segment 0 (10 frames, 2 pause frames) then segment 1 goes out, each marked once.
        for _ in 0..30 {
            p.tick(&mut link).unwrap();
        }
        // 10 audio and 2 pause frames, 10 of segment 1, and the 2 sent again.
        assert_eq!(link.frames, 22 + 2);
        assert_eq!(link.marks, vec![0, 1]);
    }

    #[test]
    fn stop_reports_heard_part_cut_at_a_word() {
        let mut p = Playout::new(&segs(), 0, 160, 0);
        let mut link = Rec::default();
        p.add_audio(0, &[1; 160]);
        p.synth_done(0);
        p.add_audio(1, &[1; 1600]);
        p.synth_done(1);
        for _ in 0..4 {
            p.tick(&mut link).unwrap();
        }
        p.on_mark(0);
        // Segment 1: 10 frames; play half of it.
        for _ in 0..5 {
            p.tick(&mut link).unwrap();
        }
        let heard = p.stop();
        assert!(!heard.complete);
        assert!(
            heard.text.starts_with("Hello there. Your order"),
            "{}",
            heard.text
        );
        assert!(!heard.text.contains("tomorrow"), "{}", heard.text);
        assert_eq!(p.tick(&mut link).unwrap().frames, 0, "nothing after stop");
    }
}
