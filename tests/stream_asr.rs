//! Streaming ASR end to end: calls through `simulate` with real espeak-ng callers, their audio
//! streamed to a scripted OpenAI Realtime transcription server (`realtime_emu`, whose
//! transcripts come from the local whisper server unless scripted), and the batch engine (the
//! real whisper server) as the fallback for any turn the stream cannot do.

mod common;
mod realtime_emu;

use std::path::{Path, PathBuf};

use common::*;
use realtime_emu::vllm::{VllmAnswer, VllmEmu};
use realtime_emu::{Answer, RealtimeEmu};
use sidecall::app::SimulateArgs;
use sidecall::call::CallOutcome;
use sidecall::config::Config;

const RATE: u32 = 16_000;

/// The emulator's transcripts come from the shared whisper server (about a second each, more
/// on a busy machine): the stream is given `timeout_ms` for them.
fn stream_config(dir: &Path, emu_url: &str, timeout_ms: u64, extra: &str) -> Config {
    let mut cfg = config(
        dir,
        &format!("\n[asr.stream]\nurl = \"{emu_url}\"\ntimeout_ms = {timeout_ms}\n{extra}"),
        &asr_url(),
    );
    cfg.asr.api_key = Some("sk-test-stream".into());
    cfg
}

fn order_callers(dir: &Path) -> Vec<PathBuf> {
    vec![
        speak(dir, "order", "five five four two one"),
        speak(dir, "yes", "yes"),
        speak(dir, "no", "no thank you"),
    ]
}

async fn order_call(cfg: Config, dir: &Path) -> Call {
    simulate(
        cfg,
        dir,
        SimulateArgs {
            callers: order_callers(dir),
            max_seconds: 60,
            ..Default::default()
        },
    )
    .await
}

fn assert_order_status_done(call: &Call) {
    let said = call.said().join(" | ");
    let dump = call.dump();
    assert!(
        said.contains("Did you say order 5, 5, 4, 2, 1?"),
        "{said}\n{dump}"
    );
    assert!(
        said.contains("Order 5, 5, 4, 2, 1 shipped yesterday"),
        "{said}\n{dump}"
    );
    assert!(
        said.ends_with("Goodbye!") || said.contains("Goodbye"),
        "{said}"
    );
    assert_eq!(
        call.outcome,
        CallOutcome::AgentHungUp {
            reason: "normal".into()
        },
        "{dump}"
    );
}

/// A support call whose caller pauses mid-sentence (450 ms) and goes on.
fn transcripts(call: &Call) -> Vec<&serde_json::Value> {
    call.of_type("transcript")
        .into_iter()
        .filter(|r| r["ignored"] != true)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_status_call_is_transcribed_over_the_stream() {
    let emu = RealtimeEmu::start(24_000).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = stream_config(dir.path(), &emu.url(), 6_000, "");
    let call = order_call(cfg, dir.path()).await;
    let dump = call.dump();
    assert_order_status_done(&call);
    // Every turn came over the stream, none from the batch engine.
    let ts = transcripts(&call);
    assert_eq!(ts.len(), 3, "{dump}");
    for t in &ts {
        assert_eq!(t["streamed"], true, "{t}\n{dump}");
        assert!(t.get("stream_fallback").is_none(), "{t}");
    }
    // One socket for the call, to the transcription endpoint, with the API key; a
    // transcription session at 24 kHz without server VAD.
    assert_eq!(emu.connections(), 1);
    let reqs = emu.requests();
    assert_eq!(reqs[0].0, "/v1/realtime?intent=transcription");
    assert_eq!(reqs[0].1.as_deref(), Some("Bearer sk-test-stream"));
    let updates = emu.session_updates();
    assert_eq!(updates.len(), 1, "{updates:?}");
    let input = &updates[0]["session"]["audio"]["input"];
    assert_eq!(input["format"]["rate"], 24_000);
    // Explicitly null: OpenAI's default is server VAD, whose own commits would answer ours.
    assert_eq!(input.get("turn_detection"), Some(&serde_json::Value::Null));
    assert!(emu.errors().is_empty(), "{:?}", emu.errors());
    // One commit per turn, each holding that turn's speech (resampled to 24 kHz): at least
    // what the caller said, at most that with the pre-roll and the silence that ended it.
    let commits = emu.commits();
    let ends = call.of_type("speech_end");
    assert_eq!(commits.len(), ends.len(), "{commits:?}\n{dump}");
    for (c, end) in commits.iter().zip(&ends) {
        let ms = (c.samples as u64) * 1000 / 24_000;
        let speech = end["speech_ms"].as_u64().unwrap();
        let endpoint = end["endpoint_ms"].as_u64().unwrap();
        assert!(
            ms >= speech && ms <= speech + endpoint + 600,
            "committed {ms} ms for {speech} ms of speech ended by {endpoint} ms of silence"
        );
    }
    // Each utterance began with a clear of what was left uncommitted.
    assert!(emu.clears() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_or_a_dropped_socket_sends_only_that_turn_to_the_batch_engine() {
    let emu = RealtimeEmu::start(24_000).await;
    emu.push(Answer::Error("server_error".into()));
    emu.push(Answer::Drop);
    emu.push(Answer::Whisper);
    let dir = tempfile::tempdir().unwrap();
    // After the drop the server is left alone for a second (every call's turns go to the
    // batch engine meanwhile), then tried again.
    let cfg = stream_config(dir.path(), &emu.url(), 6_000, "retry_after_ms = 1000\n");
    let call = order_call(cfg, dir.path()).await;
    let dump = call.dump();
    // The caller notices nothing: every turn was understood.
    assert_order_status_done(&call);
    let ts = transcripts(&call);
    assert_eq!(ts.len(), 3, "{dump}");
    let why = |i: usize| ts[i]["stream_fallback"].as_str().unwrap_or("").to_string();
    assert!(why(0).contains("server_error"), "{}\n{dump}", ts[0]);
    assert!(ts[0].get("streamed").is_none());
    assert!(
        why(1).contains("dropped") || why(1).contains("socket"),
        "{}\n{dump}",
        ts[1]
    );
    // The next utterance opened a new session and was streamed again.
    assert_eq!(ts[2]["streamed"], true, "{}\n{dump}", ts[2]);
    assert_eq!(emu.connections(), 2, "{:?}\n{dump}", emu.commits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_answers_times_out_to_the_batch_engine() {
    let emu = RealtimeEmu::start(24_000).await;
    emu.push(Answer::Hang);
    emu.push(Answer::Failed);
    emu.push(Answer::Say {
        text: "No, thank you.".into(),
        delay_ms: 100,
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = stream_config(dir.path(), &emu.url(), 1_500, "");
    let call = order_call(cfg, dir.path()).await;
    let dump = call.dump();
    assert_order_status_done(&call);
    let ts = transcripts(&call);
    assert!(
        ts[0]["stream_fallback"]
            .as_str()
            .is_some_and(|w| w.contains("no transcript within 1500 ms")),
        "{}\n{dump}",
        ts[0]
    );
    assert!(
        ts[1]["stream_fallback"]
            .as_str()
            .is_some_and(|w| w.contains("scripted failure")),
        "{}\n{dump}",
        ts[1]
    );
    assert_eq!(ts[2]["streamed"], true, "{dump}");
    // A hung commit does not end the session: one socket throughout.
    assert_eq!(emu.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_server_refuses_leaves_the_turns_to_the_batch_engine() {
    // The server takes 16 kHz; sidecall asks for 24 kHz: every session.update is refused.
    let emu = RealtimeEmu::start(16_000).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = stream_config(dir.path(), &emu.url(), 6_000, "retry_after_ms = 30000\n");
    let call = order_call(cfg, dir.path()).await;
    assert_order_status_done(&call);
    for t in transcripts(&call) {
        assert!(t.get("streamed").is_none(), "{t}");
    }
    // Refused once, then left alone (retry_after_ms): one socket, not one per utterance.
    assert_eq!(emu.connections(), 1, "{:?}", emu.errors());
    assert!(emu.commits().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_stream_server_down_the_batch_engine_does_every_turn() {
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("ws://127.0.0.1:{port}/v1/realtime?intent=transcription");
    let cfg = stream_config(dir.path(), &url, 6_000, "");
    let call = order_call(cfg, dir.path()).await;
    assert_order_status_done(&call);
    for t in transcripts(&call) {
        assert!(t.get("streamed").is_none(), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_is_committed_early_and_the_rest_of_the_sentence_joins_it() {
    let emu = RealtimeEmu::start(24_000).await;
    let dir = tempfile::tempdir().unwrap();
    // Pauses are transcribed ahead: the audio up to a short pause (`turn.pause_ms`) is
    // committed at once.
    // No end-of-turn model here: the 600 ms silence would end the turn inside the caller's
    // pause, so the turn ends on 1.2 s.
    let cfg = stream_config(
        dir.path(),
        &emu.url(),
        6_000,
        "\n[turn]\nspeculate = true\n\n[vad]\nend_silence_ms = 1200\n",
    );
    let call = goes_on_call(cfg, dir.path(), RATE).await;
    let dump = call.dump();
    assert_eq!(call.of_type("speech_end").len(), 1, "{dump}");
    // Two commits of one utterance: the words before the pause, then the rest.
    let commits = emu.commits();
    assert!(commits.len() >= 2, "{commits:?}\n{dump}");
    assert!(commits.iter().all(|c| c.utterance == commits[0].utterance));
    let heard: Vec<_> = transcripts(&call)
        .iter()
        .map(|t| t["text"].as_str().unwrap_or("").to_lowercase())
        .collect();
    let joined = heard.join(" ");
    assert!(
        joined.contains("talk") && joined.contains("agent"),
        "{heard:?}\n{dump}"
    );
    assert!(
        transcripts(&call).iter().all(|t| t["streamed"] == true),
        "{dump}"
    );
    assert_eq!(call.of_type("agent_say").len(), 2, "{dump}");
    assert_eq!(
        call.report.end,
        sidecall::pbx::simulated::SimEnd::Transfer("agent".into()),
        "{dump}"
    );
}

/// vLLM's realtime dialect (`protocol = "vllm"`): the model named in `session.update`, one
/// generation per commit, 16 kHz.
fn vllm_config(dir: &Path, emu: &VllmEmu, model: &str, extra: &str) -> Config {
    stream_config(
        dir,
        &emu.url(),
        6_000,
        &format!("protocol = \"vllm\"\nrate = 16000\nmodel = \"{model}\"\n{extra}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_status_call_is_transcribed_by_a_vllm_realtime_server() {
    let emu = VllmEmu::start("mistralai/Voxtral-Mini-4B-Realtime-2602").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = vllm_config(
        dir.path(),
        &emu,
        "mistralai/Voxtral-Mini-4B-Realtime-2602",
        "",
    );
    let call = order_call(cfg, dir.path()).await;
    let dump = call.dump();
    assert_order_status_done(&call);
    let ts = transcripts(&call);
    assert_eq!(ts.len(), 3, "{dump}");
    for t in &ts {
        assert_eq!(t["streamed"], true, "{t}\n{dump}");
    }
    let log = emu.log();
    assert_eq!(log.connections, 1, "{log:?}");
    assert_eq!(
        log.session_updates[0]["model"],
        "mistralai/Voxtral-Mini-4B-Realtime-2602"
    );
    assert!(log.errors.is_empty(), "{log:?}");
    assert_eq!(
        log.ignored_starts, 0,
        "never a start while one runs: {log:?}"
    );
    // One generation per turn, each holding that turn's speech at 16 kHz.
    let ends = call.of_type("speech_end");
    assert_eq!(log.generations.len(), ends.len(), "{log:?}\n{dump}");
    for (samples, end) in log.generations.iter().zip(&ends) {
        let ms = u64::try_from(*samples).unwrap() * 1000 / 16_000;
        let speech = end["speech_ms"].as_u64().unwrap();
        let endpoint = end["endpoint_ms"].as_u64().unwrap();
        assert!(
            ms >= speech && ms <= speech + endpoint + 600,
            "transcribed {ms} ms for {speech} ms of speech ended by {endpoint} ms of silence"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_vllm_a_caller_who_goes_on_after_a_pause_is_heard_whole() {
    let emu = VllmEmu::start("voxtral").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = vllm_config(
        dir.path(),
        &emu,
        "voxtral",
        "\n[turn]\nspeculate = true\n\n[vad]\nend_silence_ms = 1200\n",
    );
    let call = goes_on_call(cfg, dir.path(), RATE).await;
    let dump = call.dump();
    assert_eq!(call.of_type("speech_end").len(), 1, "{dump}");
    let log = emu.log();
    // The pause ended a generation; the rest of the sentence went out in the next one, none
    // of it lost to the server's clearing of its queue.
    assert!(log.generations.len() >= 2, "{log:?}\n{dump}");
    assert_eq!(log.dropped_samples, 0, "{log:?}");
    assert_eq!(log.ignored_starts, 0, "{log:?}");
    let heard = transcripts(&call)
        .iter()
        .map(|t| t["text"].as_str().unwrap_or("").to_lowercase())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        heard.contains("talk") && heard.contains("agent"),
        "{heard}\n{dump}"
    );
    assert!(
        transcripts(&call).iter().all(|t| t["streamed"] == true),
        "{dump}"
    );
    assert_eq!(
        call.report.end,
        sidecall::pbx::simulated::SimEnd::Transfer("agent".into()),
        "{dump}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_server_without_the_model_or_that_fails_leaves_the_turns_to_the_batch_engine() {
    // Another model: refused at session.update; the batch engine does every turn.
    let emu = VllmEmu::start("voxtral").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = vllm_config(
        dir.path(),
        &emu,
        "whisper-large",
        "retry_after_ms = 30000\n",
    );
    let call = order_call(cfg, dir.path()).await;
    assert_order_status_done(&call);
    for t in transcripts(&call) {
        assert!(t.get("streamed").is_none(), "{t}");
    }
    let log = emu.log();
    assert!(
        log.errors.iter().any(|e| e.starts_with("model_not_found")),
        "{log:?}"
    );
    assert!(log.generations.is_empty(), "{log:?}");
    // A generation the model ends alone, then a dropped socket: those turns go to the batch
    // engine, the call goes on.
    let emu = VllmEmu::start("voxtral").await;
    emu.push(VllmAnswer::EndEarly("five".into()));
    // The generation that takes away what came after the server's own end.
    emu.push(VllmAnswer::Say(String::new()));
    emu.push(VllmAnswer::Drop);
    let dir = tempfile::tempdir().unwrap();
    let cfg = vllm_config(dir.path(), &emu, "voxtral", "retry_after_ms = 100\n");
    let call = order_call(cfg, dir.path()).await;
    let dump = call.dump();
    assert_order_status_done(&call);
    let ts = transcripts(&call);
    // The first turn: the generation's "five" is not its transcript; the batch engine's is.
    assert!(ts.iter().all(|t| t["text"] != "five"), "{dump}");
    let fallbacks: Vec<&str> = ts
        .iter()
        .filter_map(|t| t["stream_fallback"].as_str())
        .collect();
    assert!(
        fallbacks.iter().any(|f| f.contains("early")),
        "{fallbacks:?}\n{dump}"
    );
    assert!(
        fallbacks.iter().any(|f| f.contains("socket")),
        "{fallbacks:?}\n{dump}"
    );
    assert!(ts.iter().any(|t| t["streamed"] == true), "{dump}");
    // What the caller said after the server ended its generation never opened the next one.
    let log = emu.log();
    assert_eq!(log.ignored_starts, 0, "{log:?}");
}
