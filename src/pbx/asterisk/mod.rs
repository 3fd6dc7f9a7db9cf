//! The Asterisk adapter: an ARI application that answers callers in Stasis, bridges them with
//! an external media channel (chan_websocket, AudioSocket or RTP), and runs a call session on it.

pub mod app;
pub mod ari;
pub mod ari_events;
pub mod audiosocket;
pub mod chan_ws;
pub mod rtp;
