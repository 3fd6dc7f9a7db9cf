//! The call engine: a sans-I/O core per call (`machine`: events and the time in, actions out)
//! and its driver (`session`: one task per call that owns the I/O and the spawned work) run
//! turn detection, ASR, dialog, TTS and paced playout with barge-in, and act on the call
//! through the seams in `link`.

pub mod dtmf;
pub mod echo;
pub mod link;
pub mod machine;
pub mod playout;
pub mod session;
pub mod tick_phase;
pub mod turn;
pub mod vad;

pub use link::{CallControl, ControlError, LinkError, MediaEvent, MediaLink};
pub use session::{CallOutcome, CallSetup, run_call};
