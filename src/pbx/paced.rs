//! Real-time pacing for transports whose PBX side plays frames as they arrive (AudioSocket,
//! RTP): the call's frames are queued here and written one per 20 ms; marks are reported when
//! the frame before them has been written; flush drops what is queued.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::pbx::codec::{FrameCutter, Transcoder};
use crate::pbx::events::CallEvents;
use crate::pbx::queue_link::{LinkCmd, QueueLink, queue_link};

/// Frames queued at most (20 s).
pub const QUEUE_MAX: usize = 1000;

enum Item {
    Frame(Vec<u8>),
    Mark(u64),
}

/// Writes one encoded 20 ms frame to the wire; an error ends the pacing task.
pub trait FrameWriter: Send + 'static {
    fn write(
        &mut self,
        frame: Vec<u8>,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

/// Longest one frame may take to reach the wire.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the pacing task; it ends when the link is dropped or the writer fails.
pub fn start<W: FrameWriter>(
    mut writer: W,
    mut tc: Transcoder,
    events: CallEvents,
) -> (QueueLink, tokio::task::JoinHandle<()>) {
    let (link, mut rx) = queue_link(256);
    let frame_bytes = tc.wire.frame_bytes();
    let task = tokio::spawn(async move {
        let mut queue: VecDeque<Item> = VecDeque::new();
        let mut cutter = FrameCutter::new(frame_bytes);
        let mut frames = 0usize;
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(LinkCmd::Audio(s)) => {
                        let mut dropped = false;
                        let pushed = cutter.push(&mut tc, &s, |f| {
                            if frames >= QUEUE_MAX {
                                dropped = true;
                            } else {
                                queue.push_back(Item::Frame(f));
                                frames += 1;
                            }
                        });
                        if let Err(e) = pushed {
                            tracing::warn!(error = %e, "encoding agent audio");
                        }
                        if dropped {
                            tracing::warn!("paced queue full; agent audio dropped");
                        }
                    }
                    Some(LinkCmd::Mark(id)) => {
                        if let Some(f) = cutter.finish(tc.wire) {
                            queue.push_back(Item::Frame(f));
                            frames += 1;
                        }
                        queue.push_back(Item::Mark(id));
                    }
                    Some(LinkCmd::Flush) => {
                        queue.clear();
                        cutter.clear();
                        frames = 0;
                    }
                },
                _ = ticker.tick() => {
                    while let Some(Item::Mark(id)) = queue.front() {
                        events.mark_played(*id);
                        queue.pop_front();
                    }
                    if let Some(Item::Frame(f)) = queue.pop_front() {
                        frames -= 1;
                        // A peer that stops reading must not hold the call: the send has a
                        // deadline, and a failed transport ends the call (its caller then goes
                        // to the overflow target).
                        let why = match tokio::time::timeout(SEND_TIMEOUT, writer.write(f)).await {
                            Ok(Ok(())) => None,
                            Ok(Err(e)) => Some(format!("media send failed: {e}")),
                            Err(_) => Some("media send timed out".to_string()),
                        };
                        if let Some(why) = why {
                            tracing::warn!(%why, "agent audio could not be sent; ending the call");
                            events.hangup(&why).await;
                            return;
                        }
                    }
                }
            }
        }
    });
    (link, task)
}
