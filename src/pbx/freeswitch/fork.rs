//! Agent audio through jambonz mod_audio_fork, a bidirectional fork of the audio-streaming
//! module: the agent's audio goes back over the same WebSocket as binary L16 at the stream's
//! rate, the module plays it into the call, marks (`{"type":"mark"}`) come back when playout
//! reaches them, and `{"type":"killAudio"}` empties its play-out buffer at barge-in (pending
//! marks come back `cleared`).
//!
//! Its quirks, from its source and a real FreeSWITCH 1.10.12 (see README): marks are stored in
//! the audio as the sample value -1, so agent samples of -1 are sent as -2; audio waits in a
//! pre-buffer until 80 ms (1280 samples at first) have come, so every segment ends with 100 ms of
//! silence before its mark, or its tail would never play and its mark would come back at once;
//! at most 30 marks may be outstanding (more are dropped without a word); the channel must be
//! written to for anything to play (`send_silence_when_idle=-1` before `park`); and after a
//! killAudio its mark bookkeeping goes wrong (the cleared marks are kept on a list that absorbs
//! later markers, so later marks never come back: seen on a real FreeSWITCH). So sidecall keeps
//! its own clock of the module's queue (`PlayoutClock`), and a mark counts as played when the
//! module says so or when the clock says its audio has played, whichever comes first. Before
//! killAudio, 100 ms of silence pushes the old tail out of the pre-buffer, where killAudio would
//! leave it to play before the next reply.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;

use crate::call::link::{LinkError, MediaLink};
use crate::pbx::clock::PlayoutClock;
use crate::pbx::codec::Transcoder;
use crate::pbx::events::CallEvents;

/// Marks the module keeps at most; one more is dropped silently by it.
const MAX_MARKS: usize = 30;
/// Silence after each segment, pushing its tail through the module's pre-buffer (80 ms).
const TAIL_MS: u32 = 100;
/// Frames kept sent ahead of real time: the module buffers without bound, the lead only
/// absorbs scheduling jitter.
pub const LEAD_FRAMES: usize = 10;
/// Names of sidecall's marks.
const PREFIX: &str = "sidecall-";
/// How long after the clock says a mark's audio has played the module's answer is waited for:
/// its pre-buffer holds up to 160 ms (8 kHz) before anything plays.
pub const MARK_GRACE: Duration = Duration::from_millis(300);

/// A message to the media socket.
#[derive(Debug)]
pub enum WsOut {
    Text(String),
    Binary(Vec<u8>),
}

/// The marks of one call, shared by its link and its media pump.
pub struct Marks {
    outstanding: AtomicUsize,
    clock: Mutex<PlayoutClock>,
}

impl Default for Marks {
    fn default() -> Self {
        Self {
            outstanding: AtomicUsize::new(0),
            clock: Mutex::new(PlayoutClock::new(20, tokio::time::Instant::now())),
        }
    }
}

impl Marks {
    /// When the next mark falls due by the clock.
    pub fn next_due(&self) -> Option<tokio::time::Instant> {
        self.clock.lock().ok()?.next_due(MARK_GRACE)
    }

    /// Marks whose audio has played by the clock and that the module did not answer.
    pub fn due(&self, events: &CallEvents) {
        let due = match self.clock.lock() {
            Ok(mut c) => c.due(tokio::time::Instant::now(), MARK_GRACE),
            Err(_) => return,
        };
        for (id, _) in due {
            tracing::debug!(
                id,
                "mod_audio_fork did not answer a mark; its audio has played"
            );
            events.mark_played(id);
        }
    }

    /// A text message from the module: a mark that played is the call's playout mark.
    pub fn on_text(&self, text: &str, events: &CallEvents) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            tracing::debug!(text = %text.chars().take(80).collect::<String>(), "text from mod_audio_fork is not JSON");
            return;
        };
        if v.get("type").and_then(|t| t.as_str()) != Some("mark") {
            return;
        }
        let data = v.get("data");
        let name = data.and_then(|d| d.get("name")).and_then(|n| n.as_str());
        let event = data.and_then(|d| d.get("event")).and_then(|e| e.as_str());
        let Some(id) = name
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return;
        };
        let _ = self
            .outstanding
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if event == Some("playout") {
            if let Ok(mut c) = self.clock.lock() {
                c.confirmed(id);
            }
            events.mark_played(id);
        }
    }
}

/// The media link of a call in `audio_fork` playback mode.
pub struct ForkLink {
    pub ws: mpsc::Sender<WsOut>,
    pub out: Transcoder,
    pub marks: Arc<Marks>,
    pub events: CallEvents,
    /// One segment's tail of silence at the stream's rate, encoded.
    pub tail: Vec<u8>,
}

impl ForkLink {
    pub fn new(
        ws: mpsc::Sender<WsOut>,
        out: Transcoder,
        marks: Arc<Marks>,
        events: CallEvents,
    ) -> Self {
        let rate = out.wire.rate();
        let samples = usize::try_from(rate / 1000 * TAIL_MS).unwrap_or(0);
        let tail = vec![0u8; samples.saturating_mul(2)];
        Self {
            ws,
            out,
            marks,
            events,
            tail,
        }
    }

    fn send(&self, m: WsOut) -> Result<(), LinkError> {
        self.ws.try_send(m).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LinkError::Congested,
            mpsc::error::TrySendError::Closed(_) => LinkError::Closed,
        })
    }
}

/// -1 is the module's mark sample: agent audio never carries it.
fn avoid_mark_sample(bytes: &mut [u8]) {
    for s in bytes.chunks_exact_mut(2) {
        if s == [0xff, 0xff] {
            s.copy_from_slice(&(-2i16).to_le_bytes());
        }
    }
}

impl MediaLink for ForkLink {
    fn send_audio(&mut self, frame: &[i16]) -> Result<(), LinkError> {
        let mut bytes = match self.out.outbound(frame) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "resampling agent audio");
                return Ok(());
            }
        };
        avoid_mark_sample(&mut bytes);
        self.send(WsOut::Binary(bytes))?;
        if let Ok(mut c) = self.marks.clock.lock() {
            c.frame_sent(tokio::time::Instant::now());
        }
        Ok(())
    }

    fn mark(&mut self, id: u64) -> Result<(), LinkError> {
        // The segment's tail must leave the module's pre-buffer before the mark can be reached.
        self.send(WsOut::Binary(self.tail.clone()))?;
        let now = tokio::time::Instant::now();
        let asked = self.marks.outstanding.load(Ordering::Relaxed) < MAX_MARKS;
        if let Ok(mut c) = self.marks.clock.lock() {
            for _ in 0..TAIL_MS / 20 {
                c.frame_sent(now);
            }
            c.mark(id, now, asked);
        }
        if !asked {
            // The module would drop it: the clock answers it.
            tracing::debug!(
                id,
                "30 marks outstanding at mod_audio_fork; the clock answers this one"
            );
            return Ok(());
        }
        self.marks.outstanding.fetch_add(1, Ordering::Relaxed);
        let mark = json!({"type": "mark", "data": {"name": format!("{PREFIX}{id}")}});
        self.send(WsOut::Text(mark.to_string()))
    }

    fn flush(&mut self) -> Result<(), LinkError> {
        // Silence first pushes the old tail out of the pre-buffer into the play-out buffer,
        // which killAudio empties; else it would play before the next reply.
        self.send(WsOut::Binary(self.tail.clone()))?;
        self.send(WsOut::Text(json!({"type": "killAudio"}).to_string()))?;
        self.marks.outstanding.store(0, Ordering::Relaxed);
        if let Ok(mut c) = self.marks.clock.lock() {
            c.flush(tokio::time::Instant::now());
        }
        Ok(())
    }

    fn lead_frames(&self) -> Option<usize> {
        Some(LEAD_FRAMES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_sample_never_leaves_in_agent_audio() {
        let mut b: Vec<u8> = [-1i16, 5, -1, -2]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        avoid_mark_sample(&mut b);
        let back: Vec<i16> = b
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(back, vec![-2, 5, -2, -2]);
    }

    /// A mark the module never answers (its bookkeeping after a killAudio) is answered by the
    /// clock once its audio has played, plus the grace; not before.
    #[tokio::test(start_paused = true)]
    async fn the_clock_answers_a_mark_the_module_lost() {
        let (events, mut rx) = CallEvents::channel(8);
        let (ws, mut out) = mpsc::channel(64);
        let marks = Arc::new(Marks::default());
        let t = Transcoder::new(crate::pbx::codec::WireFormat::SlinLe(16_000), 16_000).unwrap();
        let mut link = ForkLink::new(ws, t, marks.clone(), events.clone());
        for _ in 0..10 {
            link.send_audio(&[100; 320]).unwrap();
        }
        link.mark(5).unwrap();
        let mut texts = 0;
        while let Ok(m) = out.try_recv() {
            texts += usize::from(matches!(m, WsOut::Text(_)));
        }
        assert_eq!(texts, 1, "the mark went to the module");
        // 200 ms of audio + 100 ms of tail + one frame of margin, then the grace.
        tokio::time::advance(Duration::from_millis(300 + 20 + 250)).await;
        marks.due(&events);
        assert!(rx.try_recv().is_err(), "not before its time");
        tokio::time::advance(Duration::from_millis(100)).await;
        marks.due(&events);
        assert_eq!(
            rx.try_recv().ok(),
            Some(crate::call::MediaEvent::MarkPlayed(5))
        );
    }

    #[tokio::test]
    async fn played_marks_reach_the_call_and_cleared_ones_do_not() {
        let (events, mut rx) = CallEvents::channel(8);
        let marks = Marks::default();
        marks.outstanding.store(2, Ordering::Relaxed);
        marks.on_text(
            r#"{"type": "mark", "data": {"name":"sidecall-7", "event": "playout"}}"#,
            &events,
        );
        marks.on_text(
            r#"{"type": "mark", "data": {"name":"sidecall-8", "event": "cleared"}}"#,
            &events,
        );
        marks.on_text(r#"{"type": "mark", "data": {"name":"other-9"}}"#, &events);
        marks.on_text("not json", &events);
        assert_eq!(
            rx.try_recv().ok(),
            Some(crate::call::MediaEvent::MarkPlayed(7))
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(marks.outstanding.load(Ordering::Relaxed), 0);
    }
}
