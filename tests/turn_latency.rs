//! The conversation's speed with the local engines (espeak-ng callers and agent, the local
//! whisper server, the Smart Turn model): from the end of the caller's speech to the agent's
//! first audio, split into the endpoint wait, ASR (what was left of it after the endpoint),
//! dialog and TTS, and the ASR time that ran during the endpoint wait (overlap gained). It runs
//! the five example flows four ways and prints p50/p95 of each: silence-only endpointing,
//! early endpointing with the batch whisper server, and early endpointing with streaming ASR (a
//! scripted OpenAI Realtime server, `realtime_emu`) two ways: a server that transcribes on
//! commit and gives each utterance's words 100 ms after its first commit ("streamed"), and a
//! streaming recognizer whose words are final 100 ms after the caller's last voiced audio,
//! given at the commit or then ("live": the condition).
//!
//! In CI it runs one flow each way (asserting that every turn record carries its split and that
//! the split accounts for the turn); `SIDECALL_TURN_FLOWS=all` runs all five flows twice each
//! way (30 turns each) for the figures:
//!
//!     SIDECALL_TURN_FLOWS=all cargo test --release --test turn_latency -- --nocapture
//!
//! `SIDECALL_TURN_TTS=piper` has the agent speak with Piper instead of espeak-ng;
//! `SIDECALL_TURN_MODES=streamed` (or `silence`, `early`, `live`, comma-separated) runs only
//! those ways;
//! `SIDECALL_TURN_DUMP=1` prints each call's turn-taking records (`all`: every record);
//! `SIDECALL_TURN_PAUSE_MS` sets `turn.pause_ms`.

mod common;
mod realtime_emu;

use std::path::Path;

use common::*;
use realtime_emu::{Answer, RealtimeEmu};
use serde_json::Value;
use sidecall::app::SimulateArgs;

/// Each flow and what its caller says, turn by turn (two phrasings per flow).
fn scripts() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "order_status",
            vec!["five five four two one", "yes", "no thank you"],
        ),
        (
            "order_status",
            vec!["My order number is one two three four five.", "yes", "no"],
        ),
        ("appointment", vec!["Doctor Smith please", "Friday", "yes"]),
        (
            "appointment",
            vec!["anyone is fine", "Thursday", "yes please"],
        ),
        ("balance", vec!["one two three four five six", "yes", "no"]),
        (
            "balance",
            vec![
                "six five four three two one",
                "yes that's right",
                "no thanks",
            ],
        ),
        (
            "payment",
            vec!["one two three four five six", "yes", "fifty dollars", "yes"],
        ),
        (
            "payment",
            vec![
                "six five four three two one",
                "correct",
                "twenty dollars",
                "yes",
            ],
        ),
        (
            "support",
            vec!["my internet is very slow", "yes it works now"],
        ),
        ("support", vec!["the wifi keeps dropping", "no it does not"]),
    ]
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    SilenceOnly,
    Early,
    EarlyStreamed,
    EarlyLive,
}

/// The turn records of one call of `flow` with `callers`, endpointed and transcribed `mode`'s
/// way.
async fn turns(dir: &Path, flow: &str, callers: &[&str], mode: Mode) -> Vec<Value> {
    let mut extra = String::new();
    if mode != Mode::SilenceOnly {
        let (model, lib) = turn_model();
        extra += &format!(
            "\n[turn]\nmodel = \"{}\"\nonnxruntime = \"{}\"\n",
            model.display(),
            lib.display()
        );
        // SIDECALL_TURN_PAUSE_MS: the pause at which the model is asked (turn.pause_ms).
        if let Ok(ms) = std::env::var("SIDECALL_TURN_PAUSE_MS") {
            extra += &format!("pause_ms = {ms}\n");
        }
    }
    // The scripted server knows what each caller says: its words 100 ms after the commit, or
    // final 100 ms after the caller's voice.
    let emu = if matches!(mode, Mode::EarlyStreamed | Mode::EarlyLive) {
        let emu = RealtimeEmu::start(24_000).await;
        for text in callers {
            let text = (*text).to_string();
            emu.push(if mode == Mode::EarlyLive {
                Answer::Live {
                    text,
                    after_voice_ms: 100,
                }
            } else {
                Answer::Say {
                    text,
                    delay_ms: 100,
                }
            });
        }
        extra += &format!("\n[asr.stream]\nurl = \"{}\"\n", emu.url());
        Some(emu)
    } else {
        None
    };
    let mut cfg = config(dir, &extra, &asr_url());
    // SIDECALL_TURN_TTS=piper: the agent speaks with Piper (scripts/test installs it).
    if std::env::var("SIDECALL_TURN_TTS").is_ok_and(|v| v == "piper") {
        cfg.tts.engine = "piper".into();
        for (key, slot) in [
            ("SIDECALL_PIPER_PYTHON", &mut cfg.tts.piper.python),
            ("SIDECALL_PIPER_VOICE", &mut cfg.tts.piper.voice),
        ] {
            *slot = std::env::var(key).unwrap_or_else(|_| panic!("{key} is not set"));
        }
    }
    let files = callers
        .iter()
        .enumerate()
        .map(|(i, t)| speak(dir, &format!("c{i}"), t))
        .collect();
    let call = simulate(
        cfg,
        dir,
        SimulateArgs {
            flow: Some(flow.into()),
            callers: files,
            max_seconds: 60,
            ..Default::default()
        },
    )
    .await;
    // SIDECALL_TURN_DUMP=1: each call's turn-taking records, to see where the time went.
    if std::env::var("SIDECALL_TURN_DUMP").is_ok_and(|v| v == "all") {
        for r in &call.records {
            eprintln!("{mode:?} {flow}: {r}");
        }
    } else if std::env::var("SIDECALL_TURN_DUMP").is_ok_and(|v| v == "1") {
        for r in &call.records {
            if ["speech_end", "turn_check", "transcript", "turn"]
                .contains(&r["type"].as_str().unwrap_or(""))
            {
                eprintln!("{mode:?} {flow}: {r}");
            }
        }
    }
    if emu.is_some() {
        for t in call.of_type("transcript") {
            assert_eq!(t["streamed"], true, "{t}\n{}", call.dump());
        }
    }
    call.of_type("turn").into_iter().cloned().collect()
}

fn pct(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    let i = ((v.len().saturating_sub(1)) as f64 * q).round() as usize;
    v.get(i).copied().unwrap_or(0)
}

/// The split of a turn: (total, endpoint, ASR left after the endpoint, dialog, TTS, overlap).
fn split(t: &Value) -> [u64; 6] {
    let g = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("no {k} in {t}"));
    let asr = g("asr_ms") + g("asr_queue_ms");
    let early = g("asr_early_ms").min(asr);
    [
        g("total_ms"),
        g("endpoint_ms"),
        asr - early,
        g("dialog_ms"),
        g("tts_ms"),
        early,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_speech_to_first_audio_split_by_stage() {
    let all = std::env::var("SIDECALL_TURN_FLOWS").is_ok_and(|v| v == "all");
    let scripts: Vec<_> = if all {
        scripts()
    } else {
        scripts().into_iter().take(1).collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    // SIDECALL_TURN_MODES=streamed (or silence, early, live; comma-separated): only those ways.
    let only = std::env::var("SIDECALL_TURN_MODES").unwrap_or_default();
    let modes = [
        ("silence", Mode::SilenceOnly),
        ("early", Mode::Early),
        ("streamed", Mode::EarlyStreamed),
        ("live", Mode::EarlyLive),
    ]
    .into_iter()
    .filter(|(name, _)| only.is_empty() || only.split(',').any(|o| o.trim() == *name))
    .map(|(_, m)| m);
    for mode in modes {
        let mut rows: Vec<[u64; 6]> = Vec::new();
        for (i, (flow, callers)) in scripts.iter().enumerate() {
            let sub = dir.path().join(format!("{mode:?}-{i}"));
            std::fs::create_dir_all(&sub).unwrap();
            let records = turns(&sub, flow, callers, mode).await;
            assert!(
                records.len() >= callers.len().saturating_sub(1),
                "{flow}: {} turn records for {} caller turns",
                records.len(),
                callers.len()
            );
            for t in &records {
                let s = split(t);
                // The stages account for the turn: what is left is sidecall's own share
                // (the tick the reply's first frame waits for) and ASR's overlap with TTS.
                assert!(
                    s[1] + s[2] + s[3] + s[4] <= s[0] + 40,
                    "{flow}: the stages add up to more than the turn: {t}"
                );
                rows.push(s);
            }
        }
        let col = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<u64>>();
        let mut line = format!(
            "{:<26} {:>3} turns",
            match mode {
                Mode::SilenceOnly => "silence only (600 ms)",
                Mode::Early => "early endpointing",
                Mode::EarlyStreamed => "early + streaming ASR",
                Mode::EarlyLive => "early + live streaming ASR",
            },
            rows.len()
        );
        for (i, name) in ["total", "endpoint", "asr", "dialog", "tts", "overlap"]
            .iter()
            .enumerate()
        {
            let mut v = col(i);
            line += &format!(
                " | {name} {}/{}",
                pct(&mut v.clone(), 0.5),
                pct(&mut v, 0.95)
            );
        }
        report.push(line);
    }
    println!("end of caller speech -> first agent audio, p50/p95 ms:");
    for l in report {
        println!("  {l}");
    }
}
