//! End-to-end calls through `simulate`: real espeak-ng caller speech, the real local whisper
//! server, the real call engine, the order-status flow. Asserts what a caller experiences.

mod common;

use common::*;
use sidecall::app::SimulateArgs;
use sidecall::call::CallOutcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_call_completes_and_goodbye_plays_before_hangup() {
    let url = asr_url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", &url);
    let callers = vec![
        speak(dir.path(), "order", "five five four two one"),
        speak(dir.path(), "yes", "yes"),
        speak(dir.path(), "no", "no thank you"),
    ];
    let call = simulate(
        cfg,
        dir.path(),
        SimulateArgs {
            callers,
            max_seconds: 90,
            ..Default::default()
        },
    )
    .await;
    let said = call.said();
    assert!(
        said.iter()
            .any(|s| s.contains("Did you say order 5, 5, 4, 2, 1?")),
        "no confirmation of the order number: {said:#?}\n{}",
        call.dump()
    );
    assert!(
        said.iter()
            .any(|s| s.contains("Order 5, 5, 4, 2, 1 shipped yesterday and will arrive tomorrow.")),
        "status not read: {said:#?}\n{}",
        call.dump()
    );
    assert!(
        said.last().is_some_and(|s| s.contains("Goodbye")),
        "{said:#?}"
    );
    assert_eq!(
        call.outcome,
        CallOutcome::AgentHungUp {
            reason: "normal".into()
        },
        "{}",
        call.dump()
    );
    // The farewell was played to the end before the hangup.
    let hangup = call.first("hangup").expect("hangup record");
    assert!(
        call.assert_last_reply_played_before("hangup")
            .contains("Goodbye")
    );
    let spoke_until = call.last_agent_sound_between(0, u64::MAX).unwrap();
    assert!(
        spoke_until <= call.t(hangup) + 20,
        "agent audio at {spoke_until} ms after hangup at {}",
        call.t(hangup)
    );
    // Each turn is measured.
    let turns = call.of_type("turn");
    assert!(turns.len() >= 3, "{}", call.dump());
    for t in turns {
        assert!(t["total_ms"].as_u64().unwrap() >= t["endpoint_ms"].as_u64().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_asking_for_an_agent_is_transferred() {
    let url = asr_url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", &url);
    let callers = vec![speak(dir.path(), "agent", "I want to talk to an agent")];
    let call = simulate(
        cfg,
        dir.path(),
        SimulateArgs {
            callers,
            max_seconds: 60,
            ..Default::default()
        },
    )
    .await;
    assert!(
        call.said()
            .iter()
            .any(|s| s.contains("connecting you to an agent")),
        "{}",
        call.dump()
    );
    assert_eq!(
        call.outcome,
        CallOutcome::Transferred {
            target: "agent".into()
        },
        "{}",
        call.dump()
    );
    // The announcement played to the end before the transfer.
    call.assert_last_reply_played_before("transfer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_interrupting_the_greeting_stops_it() {
    let url = asr_url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", &url);
    let order = speak(dir.path(), "order", "five five four two one");
    let call = simulate(
        cfg,
        dir.path(),
        SimulateArgs {
            caller_at: vec![(3_000, order)],
            max_seconds: 25,
            ..Default::default()
        },
    )
    .await;
    let barge = call
        .first("barge_in")
        .unwrap_or_else(|| panic!("no barge_in\n{}", call.dump()));
    let start = call.first("speech_start").unwrap();
    assert!(
        call.t(start) >= 3_000 && call.t(start) < 3_500,
        "{}",
        call.dump()
    );
    assert!(call.t(barge) >= call.t(start));
    assert!(call.report.flushes >= 1, "FLUSH was sent");
    // The call and the simulated PBX share one clock, so the record's speech_start (the moment
    // the turn detector has heard min_speech_ms of voice) and the agent audio the PBX played
    // line up. The agent must be silent within 100 ms of it, until its next reply.
    let per_ms = (call.rate / 1000) as usize;
    let onset = (call.report.caller[3_000 * per_ms..]
        .iter()
        .position(|&s| s.unsigned_abs() > 300)
        .unwrap()
        / per_ms) as u64
        + 3_000;
    let speech_start = call.t(start);
    let next_reply = call
        .records
        .iter()
        .find(|r| r["type"] == "playout_start" && call.t(r) > call.t(barge))
        .map(|r| call.t(r))
        .unwrap_or(u64::MAX);
    let last = call
        .last_agent_sound_between(onset, next_reply)
        .unwrap_or(onset);
    println!(
        "caller voice onset {onset} ms, speech_start {speech_start} ms, barge_in {} ms, agent silent from {last} ms \
         ({} ms after speech start, {} ms after onset); FLUSH at {:?} ms",
        call.t(barge),
        last as i64 - speech_start as i64,
        last as i64 - onset as i64,
        call.report.flush_at_ms
    );
    assert!(
        last <= speech_start + 100,
        "agent still audible at {last} ms; caller speech started at {speech_start} ms"
    );
    // The dialog was told only what was heard: a part of the greeting.
    let cut = call
        .of_type("playout_end")
        .into_iter()
        .find(|r| r["complete"] == false)
        .unwrap();
    let heard = cut["heard"].as_str().unwrap();
    assert!(
        heard.starts_with("You are speaking with an automated assistant."),
        "{heard}"
    );
    assert!(!heard.contains("What is your order number?"), "{heard}");
    // The interruption was understood.
    assert!(
        call.said()
            .iter()
            .any(|s| s.contains("Did you say order 5, 5, 4, 2, 1?")),
        "{}",
        call.dump()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_number_entered_on_the_keypad() {
    let url = asr_url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", &url);
    let callers = vec![
        speak(dir.path(), "yes", "yes"),
        speak(dir.path(), "no", "no thank you"),
    ];
    let call = simulate(
        cfg,
        dir.path(),
        SimulateArgs {
            callers,
            dtmf: vec![(2_500, "55421#".into())],
            max_seconds: 60,
            ..Default::default()
        },
    )
    .await;
    let entry = call
        .of_type("dtmf")
        .into_iter()
        .find(|r| r["digits"] == "55421");
    assert!(entry.is_some(), "{}", call.dump());
    let said = call.said();
    assert!(
        said.iter()
            .any(|s| s.contains("Did you say order 5, 5, 4, 2, 1?")),
        "{said:#?}"
    );
    assert!(
        said.iter()
            .any(|s| s.contains("shipped yesterday and will arrive tomorrow")),
        "{said:#?}"
    );
    assert_eq!(
        call.outcome,
        CallOutcome::AgentHungUp {
            reason: "normal".into()
        },
        "{}",
        call.dump()
    );
}
