//! The inbound side of a PBX call as the adapters feed it: audio, DTMF from two sources with
//! duplicates removed (Asterisk reports a key both on ARI and on the media socket), marks and
//! hangup, into the call's bounded event queue. Never blocks: audio that does not fit is dropped
//! and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::call::MediaEvent;

/// Most samples one audio event carries: 200 ms at 16 kHz (400 ms at 8 kHz). PBXes send 20 ms
/// (FreeSWITCH up to 100 ms with a larger buffer).
pub const MAX_AUDIO_SAMPLES: usize = 3_200;

/// Where a DTMF report came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtmfSource {
    /// The control plane (ARI ChannelDtmfReceived, ESL DTMF).
    Control,
    /// The media stream (chan_websocket DTMF_END, AudioSocket 0x03).
    Media,
}

/// Pairs each key from one source with the same key from the other within a window.
#[derive(Debug)]
pub struct DtmfDedup {
    window: Duration,
    recent: VecDeque<(char, DtmfSource, Instant)>,
}

impl DtmfDedup {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            recent: VecDeque::new(),
        }
    }

    /// True if this report is a new key press; false if it repeats one the other source gave.
    pub fn accept(&mut self, digit: char, source: DtmfSource, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|(_, _, t)| now.duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        if let Some(pos) = self
            .recent
            .iter()
            .position(|(d, s, _)| *d == digit && *s != source)
        {
            self.recent.remove(pos);
            return false;
        }
        self.recent.push_back((digit, source, now));
        true
    }
}

/// A cloneable handle that adapters use to feed one call.
#[derive(Clone)]
pub struct CallEvents {
    tx: mpsc::Sender<MediaEvent>,
    dedup: Arc<Mutex<DtmfDedup>>,
    dropped: Arc<AtomicU64>,
    caller_gone: Arc<std::sync::atomic::AtomicBool>,
}

impl CallEvents {
    /// The control plane says the caller has left (hung up, or left the application).
    pub fn mark_caller_gone(&self) {
        self.caller_gone.store(true, Ordering::Relaxed);
    }

    /// Whether the caller is known to have left; if not, a call that ended on its own (media
    /// failure) still has a caller to take care of.
    pub fn caller_gone(&self) -> bool {
        self.caller_gone.load(Ordering::Relaxed)
    }

    /// A handle and the receiver the call session reads.
    pub fn channel(depth: usize) -> (Self, mpsc::Receiver<MediaEvent>) {
        let (tx, rx) = mpsc::channel(depth);
        (
            Self {
                tx,
                dedup: Arc::new(Mutex::new(DtmfDedup::new(Duration::from_millis(800)))),
                dropped: Arc::new(AtomicU64::new(0)),
                caller_gone: Arc::default(),
            },
            rx,
        )
    }

    /// Caller audio at the internal rate; dropped (and counted) if the call is behind. One
    /// message carries at most `MAX_AUDIO_SAMPLES` (the newest): a peer that sends one huge
    /// message cannot make the queue hold more audio than its depth in short messages.
    pub fn audio(&self, mut samples: Vec<i16>) {
        if samples.len() > MAX_AUDIO_SAMPLES {
            let excess = samples.len() - MAX_AUDIO_SAMPLES;
            samples.drain(..excess);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 50 == 1 {
                tracing::warn!(
                    samples = excess + MAX_AUDIO_SAMPLES,
                    "oversized inbound audio message; only its last 200 ms kept"
                );
            }
        }
        if self.tx.try_send(MediaEvent::Audio(samples)).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 50 == 1 {
                tracing::warn!(
                    dropped = n,
                    "call is not keeping up with inbound audio; frames dropped"
                );
            }
        }
    }

    /// A key press from `source`; duplicates from the other source are removed.
    pub fn dtmf(&self, digit: char, source: DtmfSource) {
        if !"0123456789*#ABCD".contains(digit) {
            tracing::warn!(?digit, "ignoring a DTMF report that is not a key");
            return;
        }
        let fresh = self
            .dedup
            .lock()
            .map(|mut d| d.accept(digit, source, Instant::now()))
            .unwrap_or(true);
        if fresh {
            let _ = self.tx.try_send(MediaEvent::Dtmf(digit));
        }
    }

    pub fn mark_played(&self, id: u64) {
        let _ = self.tx.try_send(MediaEvent::MarkPlayed(id));
    }

    /// The call is over on the PBX side. Waits for room: a hangup must not be lost.
    pub async fn hangup(&self, cause: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.tx.send(MediaEvent::Hangup {
                cause: cause.to_string(),
            }),
        )
        .await;
    }

    /// The adapter has sent the caller on itself (overflow after the shutdown grace). Waits
    /// for room, like a hangup.
    pub async fn taken_away(&self, target: &str, why: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.tx.send(MediaEvent::TakenAway {
                target: target.to_string(),
                why: why.to_string(),
            }),
        )
        .await;
    }

    /// Whether `other` feeds the same call (not just a call with the same id).
    pub fn same(&self, other: &CallEvents) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// Whether the call has gone away.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the call has gone away (its event receiver is dropped).
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_huge_audio_message_is_cut_to_its_newest_200_ms() {
        let (ev, mut rx) = CallEvents::channel(4);
        let mut big = vec![0i16; 32_768];
        big[32_767] = 7;
        ev.audio(big);
        match rx.try_recv() {
            Ok(MediaEvent::Audio(a)) => {
                assert_eq!(a.len(), MAX_AUDIO_SAMPLES);
                assert_eq!(a.last(), Some(&7), "the newest audio is kept");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn same_key_from_both_sources_counts_once_repeats_count_twice() {
        let mut d = DtmfDedup::new(Duration::from_millis(800));
        let t = Instant::now();
        assert!(d.accept('5', DtmfSource::Control, t));
        assert!(!d.accept('5', DtmfSource::Media, t + Duration::from_millis(30)));
        // The caller presses 5 again.
        assert!(d.accept('5', DtmfSource::Media, t + Duration::from_millis(300)));
        assert!(!d.accept('5', DtmfSource::Control, t + Duration::from_millis(320)));
        // Only one source working still delivers every key.
        assert!(d.accept('1', DtmfSource::Control, t + Duration::from_millis(400)));
        assert!(d.accept('1', DtmfSource::Control, t + Duration::from_millis(500)));
        // Outside the window a report is new.
        assert!(d.accept('9', DtmfSource::Control, t));
        assert!(d.accept('9', DtmfSource::Media, t + Duration::from_secs(2)));
    }
}
