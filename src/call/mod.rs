//! The call engine: one task per call (`CallSession`) runs turn detection, ASR, dialog, TTS and
//! paced playout with barge-in, and acts on the call through the seams in `link`.

pub mod dtmf;
pub mod link;
pub mod playout;
pub mod session;
pub mod turn;
pub mod vad;

pub use link::{CallControl, ControlError, LinkError, MediaEvent, MediaLink};
pub use session::{CallOutcome, CallSetup, run_call};
