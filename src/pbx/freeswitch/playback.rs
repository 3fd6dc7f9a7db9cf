//! Agent audio through stock mod_audio_stream, which plays nothing itself: audio goes to the
//! module as `streamAudio` messages (raw L16 at the stream's rate), one file per chunk; the
//! module announces each file (`mod_audio_stream::play`, carrying our chunk id), and sidecall
//! queues it with `sendmsg` playback (`event-lock`). PLAYBACK_STOP with status `done` is the
//! chunk's playout mark. Barge-in: `uuid_break <uuid> all` drops the queue; the dropped files
//! send no events, so their marks are dropped here, never waited for.
//!
//! Chunks start small (the first audio of a reply goes out after 100 ms of it) and grow to
//! 500 ms; the call engine sends ahead of real time (`LEAD_FRAMES`) so a chunk is always queued
//! before the one playing ends.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::json;
use tokio::sync::mpsc;

use super::fork::WsOut;
use crate::call::link::{LinkError, MediaLink};
use crate::pbx::codec::Transcoder;
use crate::pbx::events::CallEvents;

/// Frames of the first chunk of a reply, and of the largest.
const FIRST_CHUNK: usize = 5;
const MAX_CHUNK: usize = 25;
/// How far ahead of real time the engine sends (1.2 s): more than a chunk plus the
/// streamAudio -> audible chain (~60 ms measured).
pub const LEAD_FRAMES: usize = 60;

/// What the call's player task is asked, in order.
#[derive(Debug)]
pub enum PlayerCmd {
    Play { epoch: u64, file: String },
    Break,
}

struct Chunk {
    id: u64,
    file: Option<String>,
    marks: Vec<u64>,
}

struct State {
    epoch: u64,
    next_chunk: u64,
    /// L16 little-endian bytes at the stream's rate, not yet sent.
    buf: Vec<u8>,
    target: usize,
    /// Sent, not yet played.
    chunks: VecDeque<Chunk>,
}

/// The stock playback of one call, shared by its media link (the call task) and the adapter's
/// event loop.
pub struct Playback {
    state: Mutex<State>,
    rate: u32,
    frame_bytes: usize,
    ws: mpsc::Sender<WsOut>,
    player: mpsc::Sender<PlayerCmd>,
    events: CallEvents,
}

impl Playback {
    /// `ws`: text messages to the media socket; `player`: the call's playback commands.
    pub fn new(
        rate: u32,
        ws: mpsc::Sender<WsOut>,
        player: mpsc::Sender<PlayerCmd>,
        events: CallEvents,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                epoch: 0,
                next_chunk: 0,
                buf: Vec::new(),
                target: FIRST_CHUNK,
                chunks: VecDeque::new(),
            }),
            rate,
            frame_bytes: usize::try_from(rate / 50).unwrap_or(0).saturating_mul(2),
            ws,
            player,
            events,
        })
    }

    /// The call's media socket, for a link that sends there itself.
    pub fn ws(&self) -> mpsc::Sender<WsOut> {
        self.ws.clone()
    }

    /// The epoch now (a flush starts a new one; files of older epochs are never played).
    pub fn epoch(&self) -> u64 {
        self.state.lock().map(|s| s.epoch).unwrap_or(0)
    }

    fn send_chunk(&self, s: &mut State) -> Result<(), LinkError> {
        if s.buf.is_empty() {
            return Ok(());
        }
        let id = s.next_chunk;
        s.next_chunk += 1;
        let bytes = std::mem::take(&mut s.buf);
        let msg = json!({
            "type": "streamAudio",
            "data": {
                "audioDataType": "raw",
                "sampleRate": self.rate,
                "audioData": base64::engine::general_purpose::STANDARD.encode(bytes),
                "sidecall_chunk": format!("{}.{}", s.epoch, id),
            }
        })
        .to_string();
        self.ws.try_send(WsOut::Text(msg)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LinkError::Congested,
            mpsc::error::TrySendError::Closed(_) => LinkError::Closed,
        })?;
        s.chunks.push_back(Chunk {
            id,
            file: None,
            marks: Vec::new(),
        });
        s.target = (s.target * 2).min(MAX_CHUNK);
        Ok(())
    }

    /// The module wrote a chunk's file: queue it, if it is still wanted.
    pub fn on_file(&self, body: &serde_json::Value) {
        let (Some(file), Some(tag)) = (
            body.get("file").and_then(|f| f.as_str()),
            body.get("sidecall_chunk").and_then(|t| t.as_str()),
        ) else {
            tracing::debug!(%body, "mod_audio_stream::play without our chunk id; not ours");
            return;
        };
        let Some((epoch, id)) = tag
            .split_once('.')
            .and_then(|(e, i)| Some((e.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        else {
            return;
        };
        let Ok(mut s) = self.state.lock() else { return };
        if epoch != s.epoch {
            return;
        }
        if let Some(c) = s.chunks.iter_mut().find(|c| c.id == id) {
            c.file = Some(file.to_string());
            if self
                .player
                .try_send(PlayerCmd::Play {
                    epoch,
                    file: file.to_string(),
                })
                .is_err()
            {
                tracing::warn!(file, "playback queue full; chunk dropped");
            }
        }
    }

    /// A file finished playing (`done`) or was broken off.
    pub fn on_stop(&self, file: &str, done: bool) {
        if !done {
            return;
        }
        let Ok(mut s) = self.state.lock() else { return };
        let Some(pos) = s
            .chunks
            .iter()
            .position(|c| c.file.as_deref() == Some(file))
        else {
            return;
        };
        // Files play in order: everything up to this one has played.
        for c in s.chunks.drain(..=pos) {
            for m in c.marks {
                self.events.mark_played(m);
            }
        }
    }
}

/// The media link of a call in stock playback mode.
pub struct StockLink {
    pub playback: Arc<Playback>,
    pub out: Transcoder,
}

impl MediaLink for StockLink {
    fn send_audio(&mut self, frame: &[i16]) -> Result<(), LinkError> {
        let bytes = match self.out.outbound(frame) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "resampling agent audio");
                return Ok(());
            }
        };
        let pb = &self.playback;
        let mut s = pb.state.lock().map_err(|_| LinkError::Closed)?;
        // A reply starting from quiet starts with a small chunk: its first audio is heard fast.
        if s.chunks.is_empty() && s.buf.is_empty() {
            s.target = FIRST_CHUNK;
        }
        s.buf.extend_from_slice(&bytes);
        if s.buf.len() >= s.target.saturating_mul(pb.frame_bytes) {
            pb.send_chunk(&mut s)?;
        }
        Ok(())
    }

    fn mark(&mut self, id: u64) -> Result<(), LinkError> {
        let pb = &self.playback;
        let mut s = pb.state.lock().map_err(|_| LinkError::Closed)?;
        pb.send_chunk(&mut s)?;
        match s.chunks.back_mut() {
            Some(c) => c.marks.push(id),
            // Nothing is playing: everything before the mark has been heard.
            None => pb.events.mark_played(id),
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), LinkError> {
        let pb = &self.playback;
        let mut s = pb.state.lock().map_err(|_| LinkError::Closed)?;
        s.epoch += 1;
        s.buf.clear();
        s.chunks.clear();
        s.target = FIRST_CHUNK;
        Ok(())
    }

    fn lead_frames(&self) -> Option<usize> {
        Some(LEAD_FRAMES)
    }
}
