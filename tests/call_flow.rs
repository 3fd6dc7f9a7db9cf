//! Call behaviour that needs no real speech engine, on tokio's paused clock with in-process
//! engines (instant TTS; no ASR): no-input reprompts and escalation, the human key. A minute of
//! call runs in milliseconds and cannot be flaky on a busy machine. What needs real speech
//! (espeak-ng and whisper) lives in e2e_calls.rs.

mod common;

use std::sync::Arc;

use common::*;
use sidecall::app::{Engines, SimulateArgs};
use sidecall::call::CallOutcome;
use sidecall::engines::instant::{InstantAsr, InstantTts};

/// Engines that answer at once, in process: nothing waits on real time or real I/O.
fn instant_engines() -> Engines {
    Engines {
        asr: Arc::new(InstantAsr(String::new())),
        tts: Arc::new(InstantTts),
        cache: None,
        http: sidecall::net::http_client(),
        turn: None,
    }
}

#[tokio::test(start_paused = true)]
async fn silent_caller_is_reprompted_then_transferred() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", "http://127.0.0.1:9/v1");
    let call = simulate_with(
        cfg,
        instant_engines(),
        dir.path(),
        SimulateArgs {
            max_seconds: 90,
            no_frames_in_silence: true,
            ..Default::default()
        },
    )
    .await;
    let said = call.said();
    assert!(said.len() >= 4, "{said:#?}");
    assert!(
        said[1].contains("one digit at a time"),
        "first reprompt is clearer: {said:#?}"
    );
    assert!(
        said[2].contains("keypad"),
        "second reprompt offers the keypad: {said:#?}"
    );
    assert!(said[3].contains("Let me connect you"), "{said:#?}");
    assert_eq!(call.of_type("no_input").len(), 3);
    assert_eq!(
        call.outcome,
        CallOutcome::Transferred {
            target: "agent".into()
        }
    );
    assert_eq!(call.first("transfer").unwrap()["target"], "agent");
}

#[tokio::test(start_paused = true)]
async fn pressing_zero_reaches_a_human_from_the_greeting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", "http://127.0.0.1:9/v1");
    let call = simulate_with(
        cfg,
        instant_engines(),
        dir.path(),
        SimulateArgs {
            // During the greeting (instant TTS: 60 ms a word, so it lasts about 2 s).
            dtmf: vec![(600, "0".into())],
            max_seconds: 30,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        call.outcome,
        CallOutcome::Transferred {
            target: "agent".into()
        },
        "{}",
        call.dump()
    );
    assert!(call.report.flushes >= 1, "the greeting was flushed");
    assert!(
        call.said()
            .iter()
            .any(|s| s == "Connecting you to an agent."),
        "{:#?}",
        call.said()
    );
    let transfer = call.first("transfer").unwrap();
    assert!(
        call.t(transfer) < 10_000,
        "transferred at once, not after the greeting"
    );
}

/// An ASR engine that never answers and notes when its request is dropped.
struct HangingAsr(Arc<std::sync::atomic::AtomicBool>);

struct Dropped(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl sidecall::engines::asr::Asr for HangingAsr {
    async fn transcribe(
        &self,
        _audio: &[i16],
        _rate: u32,
        _hint: Option<&str>,
    ) -> Result<sidecall::engines::asr::Transcript, sidecall::engines::asr::AsrError> {
        let _guard = Dropped(self.0.clone());
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn no_asr_request_outlives_its_call() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "", "http://127.0.0.1:9/v1");
    // Far longer than the call: only the end of the call can stop the request.
    cfg.asr.timeout_ms = 120_000;
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let engines = Engines {
        asr: Arc::new(HangingAsr(dropped.clone())),
        ..instant_engines()
    };
    let callers = vec![speak(dir.path(), "order", "five five four two one")];
    let call = simulate_with(
        cfg,
        engines,
        dir.path(),
        SimulateArgs {
            callers,
            // The caller hangs up while the transcription is still running.
            max_seconds: 8,
            ..Default::default()
        },
    )
    .await;
    assert!(call.first("speech_end").is_some(), "{}", call.dump());
    assert!(call.first("transcript").is_none(), "{}", call.dump());
    assert_eq!(call.outcome, CallOutcome::CallerHungUp, "{}", call.dump());
    tokio::task::yield_now().await;
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the ASR request was still running after the call ended"
    );
}

/// A dialog that streams its reply the way an LLM does: a first sentence, then (after three
/// seconds of "thinking") the rest.
struct Streamer;

#[async_trait::async_trait]
impl sidecall::engines::dialog::Dialog for Streamer {
    async fn start(
        &mut self,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        Err(sidecall::engines::dialog::DialogError::Engine(
            "this engine only streams".into(),
        ))
    }
    async fn input(
        &mut self,
        _input: sidecall::engines::dialog::Input,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        self.start().await
    }
    fn heard(&mut self, _heard: &sidecall::engines::dialog::Heard) {}
    async fn respond(
        &mut self,
        _ask: sidecall::engines::dialog::Ask,
        out: &sidecall::engines::dialog::ReplySink,
    ) -> Result<(), sidecall::engines::dialog::DialogError> {
        use sidecall::engines::dialog::{Next, ReplyPart, Segment};
        let seg = |t: &str| {
            ReplyPart::Say(Segment {
                text: t.into(),
                pause_after_ms: 0,
            })
        };
        out.send(ReplyPart::Begin { barge_in: false }).await?;
        out.send(seg("Thanks for calling. Let me check your account."))
            .await?;
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        out.send(seg("Your balance is ten dollars.")).await?;
        out.send(ReplyPart::End {
            send_dtmf: None,
            next: Next::Hangup {
                reason: "done".into(),
            },
        })
        .await
    }
}

#[tokio::test(start_paused = true)]
async fn a_streamed_reply_is_heard_while_the_dialog_is_still_making_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(dir.path(), "", "http://127.0.0.1:9/v1"));
    let pbx = sidecall::pbx::simulated::start(
        sidecall::pbx::simulated::Script {
            max_ms: 20_000,
            ..Default::default()
        },
        cfg.call.sample_rate,
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(1_024);
    let engines = instant_engines();
    let outcome = sidecall::call::run_call(sidecall::call::CallSetup {
        call_id: "stream".into(),
        flow_name: "streamer".into(),
        config: cfg.clone(),
        dialog: Box::new(Streamer),
        asr: engines.asr.clone(),
        tts: engines.tts.clone(),
        turn: None,
        link: Box::new(pbx.link),
        control: pbx.control,
        events: pbx.events,
        recorder: sidecall::telemetry::Recorder::to_channel("stream", tx),
        tick_stats: None,
        origin: Some(pbx.origin),
    })
    .await;
    let mut recs = Vec::new();
    while let Ok(r) = rx.try_recv() {
        recs.push(r);
    }
    let at = |kind: &str| {
        recs.iter()
            .find(|r| r["type"] == kind)
            .and_then(|r| r["t_ms"].as_u64())
            .unwrap_or_else(|| panic!("no {kind}: {recs:#?}"))
    };
    // The first sentence played long before the dialog had the second.
    assert!(at("playout_start") < 1_000, "{recs:#?}");
    let said = recs.iter().find(|r| r["type"] == "agent_say").unwrap();
    assert_eq!(
        said["text"],
        "Thanks for calling. Let me check your account. Your balance is ten dollars."
    );
    // Both sentences were heard, and the hangup waited for the second.
    let end = recs.iter().find(|r| r["type"] == "playout_end").unwrap();
    assert_eq!(end["complete"], true, "{recs:#?}");
    assert!(at("playout_end") > 3_000);
    assert_eq!(
        outcome,
        CallOutcome::AgentHungUp {
            reason: "done".into()
        }
    );
}

/// Sets its flag when dropped: a turn's future that was dropped before it finished.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Streams one sentence, then "thinks" for a minute before the rest.
struct SlowStreamer {
    dropped: Arc<std::sync::atomic::AtomicBool>,
    finished: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl sidecall::engines::dialog::Dialog for SlowStreamer {
    async fn start(
        &mut self,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        Err(sidecall::engines::dialog::DialogError::Engine(
            "this engine only streams".into(),
        ))
    }
    async fn input(
        &mut self,
        _input: sidecall::engines::dialog::Input,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        self.start().await
    }
    fn heard(&mut self, _heard: &sidecall::engines::dialog::Heard) {}
    async fn respond(
        &mut self,
        ask: sidecall::engines::dialog::Ask,
        out: &sidecall::engines::dialog::ReplySink,
    ) -> Result<(), sidecall::engines::dialog::DialogError> {
        use sidecall::engines::dialog::{Ask, Expectation, Next, ReplyPart, Segment};
        if ask != Ask::Start {
            return out
                .send(ReplyPart::End {
                    send_dtmf: None,
                    next: Next::Hangup {
                        reason: "done".into(),
                    },
                })
                .await;
        }
        let _guard = DropFlag(self.dropped.clone());
        out.send(ReplyPart::Begin { barge_in: true }).await?;
        out.send(ReplyPart::Say(Segment {
            text: "Welcome to a very long introduction about everything we offer.".into(),
            pause_after_ms: 0,
        }))
        .await?;
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        self.finished
            .store(true, std::sync::atomic::Ordering::SeqCst);
        out.send(ReplyPart::End {
            send_dtmf: None,
            next: Next::Listen(Expectation::default()),
        })
        .await
    }
}

#[tokio::test(start_paused = true)]
async fn a_barge_in_ends_the_dialog_turn_still_being_made() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(dir.path(), "", "http://127.0.0.1:9/v1"));
    let rate = cfg.call.sample_rate;
    let clip = sidecall::audio::wav::read_file_at(
        &speak(dir.path(), "hi", "hello there, I need help"),
        rate,
    )
    .unwrap();
    let pbx = sidecall::pbx::simulated::start(
        sidecall::pbx::simulated::Script {
            at: vec![(1_500, clip)],
            max_ms: 15_000,
            ..Default::default()
        },
        rate,
    );
    let (dropped, finished) = (Arc::default(), Arc::default());
    let (tx, mut rx) = tokio::sync::mpsc::channel(1_024);
    let engines = Engines {
        asr: Arc::new(InstantAsr("I need help".into())),
        ..instant_engines()
    };
    let _ = sidecall::call::run_call(sidecall::call::CallSetup {
        call_id: "cut".into(),
        flow_name: "slow".into(),
        config: cfg.clone(),
        dialog: Box::new(SlowStreamer {
            dropped: Arc::clone(&dropped),
            finished: Arc::clone(&finished),
        }),
        asr: engines.asr.clone(),
        tts: engines.tts.clone(),
        turn: None,
        link: Box::new(pbx.link),
        control: pbx.control,
        events: pbx.events,
        recorder: sidecall::telemetry::Recorder::to_channel("cut", tx),
        tick_stats: None,
        origin: Some(pbx.origin),
    })
    .await;
    let mut recs = Vec::new();
    while let Ok(r) = rx.try_recv() {
        recs.push(r);
    }
    assert!(recs.iter().any(|r| r["type"] == "barge_in"), "{recs:#?}");
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst)
            && !finished.load(std::sync::atomic::Ordering::SeqCst),
        "the turn in flight was dropped at the barge-in, not left to run: {recs:#?}"
    );
    // The caller's words were answered at once (not after the minute the old turn wanted).
    let hangup = recs
        .iter()
        .find(|r| r["type"] == "hangup")
        .and_then(|r| r["t_ms"].as_u64())
        .unwrap_or_else(|| panic!("{recs:#?}"));
    assert!(hangup < 10_000, "{recs:#?}");
}
