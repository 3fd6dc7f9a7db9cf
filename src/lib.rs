//! sidecall: a sidecar that turns an Asterisk or FreeSWITCH dialplan context into a real-time
//! voice agent. The library holds everything; `main.rs` is only the command line.

pub mod admin;
pub mod app;
pub mod audio;
pub mod bench;
pub mod call;
pub mod config;
pub mod engines;
pub mod net;
pub mod pbx;
pub mod telemetry;
