//! The two seams between the call engine and a PBX: a media link (frames in as events,
//! frames out, marks, flush) and a call-control handle (answer, DTMF, transfer, hangup).
//! PBX adapters and the simulated PBX implement them; the engine depends on nothing else.

use async_trait::async_trait;

use crate::config::TransferTarget;

/// Where a transfer sends the caller, in the call engine's own words; each adapter maps it to its
/// PBX (Asterisk: `continue` into the dialplan or `redirect` to an endpoint; FreeSWITCH:
/// `uuid_transfer` to an extension in a dialplan and context, or a dial string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Back into the PBX's dialplan.
    Dialplan {
        context: String,
        extension: String,
        priority: Option<u32>,
    },
    /// Straight to an endpoint or dial string (`PJSIP/2000`, `sofia/gateway/gw/2000`).
    Endpoint(String),
}

impl From<&TransferTarget> for Target {
    fn from(t: &TransferTarget) -> Self {
        match (&t.endpoint, &t.context) {
            (Some(ep), _) => Target::Endpoint(ep.clone()),
            (None, ctx) => Target::Dialplan {
                context: ctx.clone().unwrap_or_default(),
                extension: t.extension.clone().unwrap_or_else(|| "s".into()),
                priority: t.priority,
            },
        }
    }
}

/// What the PBX side tells a call.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaEvent {
    /// One frame of caller audio at the call's internal rate (any length; 20 ms normally).
    Audio(Vec<i16>),
    /// A DTMF key, reported once per press (adapters remove duplicates).
    Dtmf(char),
    /// All agent audio sent before `mark(id)` has been played to the caller.
    MarkPlayed(u64),
    /// The caller hung up or the media connection ended.
    Hangup { cause: String },
    /// The PBX side has sent the caller on (the supervisor's overflow after the shutdown
    /// grace): the call ends as transferred to `target`.
    TakenAway { target: String, why: String },
}

/// Why sending to a link failed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LinkError {
    #[error("media link is closed")]
    Closed,
    #[error("media link is congested; frame dropped")]
    Congested,
}

/// Agent audio out. Calls never block: a link queues (bounded) and paces on its own side.
pub trait MediaLink: Send {
    /// Sends one 20 ms frame of agent audio at the call's internal rate.
    fn send_audio(&mut self, frame: &[i16]) -> Result<(), LinkError>;
    /// Asks to be told (`MediaEvent::MarkPlayed`) when everything sent so far has played.
    fn mark(&mut self, id: u64) -> Result<(), LinkError>;
    /// Drops everything queued and not yet played (barge-in). Pending marks are dropped.
    fn flush(&mut self) -> Result<(), LinkError>;
    /// Frames the engine should keep sent ahead of real time (None: `call.playout_lead_frames`).
    /// A link that plays in chunks (FreeSWITCH files) needs more than one that plays frames.
    fn lead_frames(&self) -> Option<usize> {
        None
    }
}

/// Why a control action failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("call not found (already gone)")]
    NotFound,
    #[error("call is in the wrong state: {0}")]
    InvalidState(String),
    #[error("PBX refused: {0}")]
    Refused(String),
    #[error("PBX unreachable: {0}")]
    Unreachable(String),
    #[error("PBX did not answer within {0} ms")]
    Timeout(u64),
}

/// Acting on the call through the PBX's control plane.
#[async_trait]
pub trait CallControl: Send + Sync {
    async fn answer(&self) -> Result<(), ControlError>;
    async fn send_dtmf(&self, digits: &str) -> Result<(), ControlError>;
    /// Transfers to an allow-listed target (already checked by the engine); `name` is its
    /// `[transfers]` entry, for logs.
    async fn transfer(&self, name: &str, target: &Target) -> Result<(), ControlError>;
    async fn hangup(&self, reason: &str) -> Result<(), ControlError>;
    /// Barge-in: stop whatever the PBX itself is playing to the caller (FreeSWITCH plays files,
    /// stopped with `uuid_break`). Media links that queue audio are flushed through
    /// `MediaLink::flush`; for them this does nothing.
    async fn stop_playback(&self) -> Result<(), ControlError> {
        Ok(())
    }
}
