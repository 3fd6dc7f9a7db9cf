//! The conversation's speed with the local engines (espeak-ng callers and agent, the local
//! whisper server, the Smart Turn model): from the end of the caller's speech to the agent's
//! first audio, split into the endpoint wait, ASR (what was left of it after the endpoint),
//! dialog and TTS, and the ASR time that ran during the endpoint wait (overlap gained). It runs
//! the five example flows with and without early endpointing and prints p50/p95 of each.
//!
//! In CI it runs one flow each way (asserting that every turn record carries its split and that
//! the split accounts for the turn); `SIDECALL_TURN_FLOWS=all` runs all five flows twice each
//! way (30 turns each) for the figures:
//!
//!     SIDECALL_TURN_FLOWS=all cargo test --release --test turn_latency -- --nocapture

mod common;

use std::path::Path;

use common::*;
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

/// The turn records of one call of `flow` with `callers`, with early endpointing or without.
async fn turns(dir: &Path, flow: &str, callers: &[&str], early: bool) -> Vec<Value> {
    let extra = if early {
        let (model, lib) = turn_model();
        format!(
            "\n[turn]\nmodel = \"{}\"\nonnxruntime = \"{}\"\n",
            model.display(),
            lib.display()
        )
    } else {
        String::new()
    };
    let cfg = config(dir, &extra, &asr_url());
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
    for early in [false, true] {
        let mut rows: Vec<[u64; 6]> = Vec::new();
        for (i, (flow, callers)) in scripts.iter().enumerate() {
            let sub = dir.path().join(format!("{early}-{i}"));
            std::fs::create_dir_all(&sub).unwrap();
            let records = turns(&sub, flow, callers, early).await;
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
            if early {
                "early endpointing"
            } else {
                "silence only (600 ms)"
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
