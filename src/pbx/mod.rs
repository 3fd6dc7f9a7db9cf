//! PBX adapters: each turns one PBX's media and control protocols into the call engine's
//! `MediaLink` and `CallControl`. The simulated PBX is the one that needs no PBX; Asterisk and
//! FreeSWITCH adapters live beside it.

pub mod simulated;
