//! A media link backed by a bounded queue: the call engine's non-blocking side of every PBX
//! transport. The transport's own task reads the commands and talks to the PBX.

use tokio::sync::mpsc;

use crate::call::{LinkError, MediaLink};

/// What the call asked of the media link.
#[derive(Debug)]
pub enum LinkCmd {
    /// One 20 ms frame of agent audio at the call's internal rate.
    Audio(Vec<i16>),
    /// Report back when everything before this has been played.
    Mark(u64),
    /// Drop what is queued (barge-in).
    Flush,
}

/// The call's end of the queue.
pub struct QueueLink {
    tx: mpsc::Sender<LinkCmd>,
}

/// A link and the receiver its transport task reads, holding at most `depth` commands.
pub fn queue_link(depth: usize) -> (QueueLink, mpsc::Receiver<LinkCmd>) {
    let (tx, rx) = mpsc::channel(depth);
    (QueueLink { tx }, rx)
}

impl QueueLink {
    fn send(&self, cmd: LinkCmd) -> Result<(), LinkError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LinkError::Congested,
            mpsc::error::TrySendError::Closed(_) => LinkError::Closed,
        })
    }
}

impl MediaLink for QueueLink {
    fn send_audio(&mut self, frame: &[i16]) -> Result<(), LinkError> {
        self.send(LinkCmd::Audio(frame.to_vec()))
    }
    fn mark(&mut self, id: u64) -> Result<(), LinkError> {
        self.send(LinkCmd::Mark(id))
    }
    fn flush(&mut self) -> Result<(), LinkError> {
        self.send(LinkCmd::Flush)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_closed_queues_are_reported_not_blocking() {
        let (mut link, mut rx) = queue_link(1);
        assert_eq!(link.send_audio(&[1, 2]), Ok(()));
        assert_eq!(link.mark(3), Err(LinkError::Congested));
        assert!(matches!(rx.try_recv(), Ok(LinkCmd::Audio(v)) if v == vec![1, 2]));
        drop(rx);
        assert_eq!(link.flush(), Err(LinkError::Closed));
    }
}
