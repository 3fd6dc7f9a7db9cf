//! Barge-in with real speech through `simulate` (espeak-ng callers, the local whisper server):
//! the agent pauses at the caller's first voiced frame; a cough or a backchannel ("mm-hm")
//! resumes the prompt, which is then heard whole; a real interruption cuts it, the agent silent
//! at the caller's ear within 60 ms of their voice.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sidecall::app::SimulateArgs;

const GREETING: &str = "Welcome to the ShopEasy help line. Our stores are open from nine in the \
morning to six in the evening, every day of the week except public holidays. You can track an \
order, return an item, or ask about an invoice.";

/// A flow whose greeting is long and may be interrupted.
fn flow(dir: &Path) -> PathBuf {
    let path = dir.join("hello.toml");
    std::fs::write(
        &path,
        format!(
            r#"
start = "menu"
disclosure = ""
greeting = "{GREETING}"

[intents.agent]
phrases = ["agent", "a person", "someone"]

[states.menu]
prompt = "What would you like to do?"
intents = {{ agent = "human" }}

[states.human]
say = "Connecting you."
transfer = "agent"
"#
        ),
    )
    .unwrap();
    path
}

/// `ms` of the voiced part of an espeak-ng "ah": a cough-like click of voice.
fn cough(dir: &Path, ms: usize) -> PathBuf {
    let src = speak(dir, "ah", "ah");
    let rate = 16_000;
    let samples = sidecall::audio::wav::read_file_at(&src, rate).unwrap();
    let start = samples
        .iter()
        .position(|s| s.unsigned_abs() > 1000)
        .unwrap();
    let clip: Vec<i16> = samples[start..(start + ms * 16).min(samples.len())].to_vec();
    let path = dir.join("cough.wav");
    sidecall::audio::wav::write_file(&path, rate, &clip).unwrap();
    path
}

/// When the caller's voice begins at or after `from_ms` (ms on the call's timeline).
fn onset(call: &Call, from_ms: u64) -> u64 {
    let per_ms = (call.rate / 1000) as usize;
    let from = from_ms as usize * per_ms;
    (call.report.caller[from..]
        .iter()
        .position(|&s| s.unsigned_abs() > 300)
        .expect("the caller spoke")
        / per_ms) as u64
        + from_ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cough_and_a_backchannel_pause_the_greeting_and_it_is_heard_whole() {
    let url = asr_url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", &url);
    let call = simulate(
        cfg,
        dir.path(),
        SimulateArgs {
            flow: Some(flow(dir.path()).display().to_string()),
            caller_at: vec![
                (1_500, cough(dir.path(), 90)),
                (4_500, speak(dir.path(), "okay", "okay")),
            ],
            max_seconds: 20,
            ..Default::default()
        },
    )
    .await;
    let pauses = call.of_type("pause");
    let resumes = call.of_type("resume");
    assert!(pauses.len() >= 2, "{}", call.dump());
    assert_eq!(pauses.len(), resumes.len(), "{}", call.dump());
    assert!(call.first("barge_in").is_none(), "{}", call.dump());
    // Each sound paused the greeting in the tick it was heard and it went on after.
    for (at, p) in [(1_500, &pauses[0]), (4_500, &pauses[1])] {
        let o = onset(&call, at);
        assert!(
            call.t(p) >= o && call.t(p) <= o + 100,
            "pause at {} for a sound at {o}",
            call.t(p)
        );
    }
    let greeting_end = call
        .of_type("playout_end")
        .into_iter()
        .next()
        .expect("the greeting ended");
    assert_eq!(greeting_end["complete"], true, "{}", call.dump());
    let heard = greeting_end["heard"].as_str().unwrap();
    assert!(heard.starts_with(GREETING), "{heard}");
    println!(
        "paused for {:?} ms",
        resumes
            .iter()
            .map(|r| r["paused_ms"].clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_interruption_silences_the_agent_within_60_ms_of_the_callers_voice() {
    let url = asr_url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", &url);
    let call = simulate(
        cfg,
        dir.path(),
        SimulateArgs {
            flow: Some(flow(dir.path()).display().to_string()),
            caller_at: vec![(
                2_500,
                speak(
                    dir.path(),
                    "agent",
                    "I would like to talk to an agent please",
                ),
            )],
            max_seconds: 20,
            ..Default::default()
        },
    )
    .await;
    let o = onset(&call, 2_500);
    let barge = call
        .first("barge_in")
        .unwrap_or_else(|| panic!("no barge-in\n{}", call.dump()));
    let next_reply = call
        .records
        .iter()
        .find(|r| r["type"] == "playout_start" && call.t(r) > call.t(barge))
        .map(|r| call.t(r))
        .unwrap_or(u64::MAX);
    let last = call.last_agent_sound_between(o, next_reply).unwrap_or(o);
    println!(
        "caller voice onset {o} ms, agent silent from {last} ms ({} ms after), barge-in decided at {} ms",
        last - o,
        call.t(barge)
    );
    assert!(
        last <= o + 60,
        "agent audible until {last} ms, the caller began at {o} ms"
    );
    let cut = call
        .of_type("playout_end")
        .into_iter()
        .find(|r| r["complete"] == false)
        .unwrap();
    assert!(!cut["heard"].as_str().unwrap().contains("invoice"));
    assert_eq!(
        call.report.end,
        sidecall::pbx::simulated::SimEnd::Transfer("agent".into()),
        "{}",
        call.dump()
    );
}

/// When the agent's track goes quiet (below the caller-onset amplitude for 60 ms) at or after
/// `from_ms`.
fn agent_quiet_from(call: &Call, from_ms: u64) -> Option<u64> {
    let per_ms = (call.rate / 1000) as usize;
    let agent = call.report.agent.get(from_ms as usize * per_ms..)?;
    let run = 60 * per_ms;
    let mut quiet = 0;
    for (i, s) in agent.iter().enumerate() {
        quiet = if s.unsigned_abs() > 300 { 0 } else { quiet + 1 };
        if quiet >= run {
            return Some(from_ms + ((i + 1 - run) / per_ms) as u64);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_yes_on_a_line_silent_until_then_pauses_the_greeting_at_once() {
    // A caller 14 dB quieter than the usual espeak-ng voice, on a line that sends nothing while
    // they are silent (a real Asterisk bridge), says "yes" over the greeting: the agent is
    // silent at their ear within 60 ms of their voice, and the greeting goes on and is heard
    // whole. (The echo gate must not hold the quiet voice, and its soft start pauses the agent
    // a frame before it scores as a voice.)
    let url = asr_url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", &url);
    let loud = speak(dir.path(), "yes-loud", "yes");
    let quiet = dir.path().join("yes.wav");
    let samples = sidecall::audio::wav::read_file_at(&loud, 16_000).unwrap();
    let quieter: Vec<i16> = samples.iter().map(|&s| s / 5).collect();
    sidecall::audio::wav::write_file(&quiet, 16_000, &quieter).unwrap();
    let call = simulate(
        cfg,
        dir.path(),
        SimulateArgs {
            flow: Some(flow(dir.path()).display().to_string()),
            caller_at: vec![(3_000, quiet)],
            no_frames_in_silence: true,
            max_seconds: 18,
            ..Default::default()
        },
    )
    .await;
    let o = onset(&call, 3_000);
    let silent = agent_quiet_from(&call, o).unwrap_or(u64::MAX);
    let pause = call
        .first("pause")
        .unwrap_or_else(|| panic!("no pause\n{}", call.dump()));
    println!(
        "quiet caller onset {o} ms, paused at {} ms on {}, agent silent from {silent} ms ({} ms after)",
        call.t(pause),
        pause["on"],
        silent.saturating_sub(o)
    );
    assert!(
        silent <= o + 60,
        "agent audible until {silent} ms, the caller began at {o} ms\n{}",
        call.dump()
    );
    assert!(call.first("barge_in").is_none(), "{}", call.dump());
    let greeting = call
        .of_type("playout_end")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{}", call.dump()));
    assert_eq!(greeting["complete"], true, "{}", call.dump());
}

/// The greeting's own echo on the caller's line (line echo, a speakerphone), 10 dB down and
/// `delay_ms` late.
fn echo(delay_ms: u32) -> Option<sidecall::pbx::simulated::SimEcho> {
    Some(sidecall::pbx::simulated::SimEcho {
        gain_db: -10.0,
        delay_ms,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_own_echo_never_interrupts_it() {
    let url = asr_url();
    let dir = tempfile::tempdir().unwrap();
    let run = |delay_ms: u32| {
        let sub = dir.path().join(format!("echo-{delay_ms}"));
        std::fs::create_dir_all(&sub).unwrap();
        let cfg = config(&sub, "\n[vad.echo]\nenabled = true\n", &url);
        let flow = flow(&sub).display().to_string();
        async move {
            simulate(
                cfg,
                &sub,
                SimulateArgs {
                    flow: Some(flow),
                    echo: echo(delay_ms),
                    max_seconds: 16,
                    ..Default::default()
                },
            )
            .await
        }
    };
    let (near, far) = tokio::join!(run(40), run(120));
    for (delay, call) in [(40, &near), (120, &far)] {
        assert!(call.first("pause").is_none(), "{delay} ms\n{}", call.dump());
        assert!(
            call.first("barge_in").is_none(),
            "{delay} ms\n{}",
            call.dump()
        );
        let greeting = call
            .of_type("playout_end")
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{delay} ms\n{}", call.dump()));
        assert_eq!(greeting["complete"], true, "{delay} ms\n{}", call.dump());
        // The echo really was on the line: the caller's side carried the greeting.
        let loud = call
            .report
            .caller
            .iter()
            .filter(|s| s.unsigned_abs() > 300)
            .count();
        assert!(loud > call.rate as usize, "{delay} ms: no echo on the line");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_the_echo_still_interrupts() {
    let url = asr_url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "\n[vad.echo]\nenabled = true\n", &url);
    let call = simulate(
        cfg,
        dir.path(),
        SimulateArgs {
            flow: Some(flow(dir.path()).display().to_string()),
            echo: echo(80),
            caller_at: vec![(
                4_000,
                speak(
                    dir.path(),
                    "agent",
                    "I would like to talk to an agent please",
                ),
            )],
            max_seconds: 20,
            ..Default::default()
        },
    )
    .await;
    let barge = call
        .first("barge_in")
        .unwrap_or_else(|| panic!("no barge-in\n{}", call.dump()));
    let first_pause = call.first("pause").map(|p| call.t(p)).unwrap_or(u64::MAX);
    println!(
        "with the echo on the line: paused at {first_pause} ms for a caller from 4000 ms, barge-in at {} ms",
        call.t(barge)
    );
    assert!(
        first_pause >= 4_000,
        "paused before the caller spoke\n{}",
        call.dump()
    );
    assert_eq!(
        call.report.end,
        sidecall::pbx::simulated::SimEnd::Transfer("agent".into()),
        "{}",
        call.dump()
    );
}
