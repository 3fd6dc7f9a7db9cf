//! Replies made ahead, end to end through `simulate` with an LLM agent: real espeak-ng caller
//! speech, the scripted Realtime transcription server (`realtime_emu`: each pause's words 100
//! ms after its commit), the scripted model server (`llm_emu`) and a webhook server. At the
//! caller's first pause the reply is made on a copy of the conversation; a caller who has
//! finished hears it the moment the turn ends, one who goes on never does (and the model is
//! told nothing of it), and no tool ever runs ahead.

mod common;
mod llm_emu;
mod realtime_emu;

use std::path::{Path, PathBuf};

use common::*;
use llm_emu::*;
use realtime_emu::{Answer, RealtimeEmu};
use serde_json::{Value, json};
use sidecall::app::SimulateArgs;
use sidecall::config::{Config, Overrides};

const RATE: u32 = 16_000;

fn ahead_config(dir: &Path, llm: &str, hook: &str, stream: &str, end_silence_ms: u64) -> Config {
    let profile = format!(
        r#"
system_prompt = "You are the phone support agent of ShopEasy. Keep answers short."
greeting = "Hi."
disclosure = ""

[tools.lookup_order]
description = "Looks an order up."
url = "{hook}/orders/{{order_id}}"
method = "GET"
timeout_ms = 2000
parameters = {{ type = "object", properties = {{ order_id = {{ type = "string" }} }}, required = ["order_id"] }}
"#
    );
    std::fs::write(dir.join("support.toml"), profile).unwrap();
    let text = format!(
        r#"
[call]
no_input_timeout_ms = 4000

[vad]
end_silence_ms = {end_silence_ms}

[turn]
speculate = true
reply_ahead = true

[asr]
url = "{asr}"
# The suite shares one whisper server with CPU-bound tests on two cores: a transcript can
# take seconds there. What is tested is the call, not the server's speed.
timeout_ms = 15000

[asr.stream]
url = "{stream}"
timeout_ms = 3000

[llm]
url = "{llm}"
model = "test-model"
first_token_timeout_ms = 2500
filler_after_ms = 1500

[dialog]
flows_dir = "{dir}"
agents_dir = "{dir}"

[tts]
rate = 230

[transfers.agent]
context = "agents"
extension = "support"
"#,
        asr = asr_url(),
        dir = dir.display(),
    );
    let path = dir.join("sidecall.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path, &Overrides::default()).unwrap()
}

/// The caller hangs up `max_seconds` in, before the no-input reprompts (4 s after the answer)
/// would ask the model again.
fn args(callers: Vec<PathBuf>, max_seconds: u64) -> SimulateArgs {
    SimulateArgs {
        agent: Some("support".into()),
        callers,
        max_seconds,
        ..Default::default()
    }
}

fn messages(emu: &LlmEmu, i: usize) -> Vec<Value> {
    emu.requests()
        .get(i)
        .and_then(|r| r["messages"].as_array().cloned())
        .unwrap_or_default()
}

fn contents(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| format!("{}: {}", m["role"].as_str().unwrap_or(""), m["content"]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_made_ahead_is_heard_the_moment_the_turn_ends() {
    let llm = LlmEmu::start().await;
    let stream = RealtimeEmu::start(24_000).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ahead_config(
        dir.path(),
        &llm.base_url(),
        "http://127.0.0.1:9",
        &stream.url(),
        600,
    );
    stream.push(Answer::Say {
        text: "When are you open?".into(),
        delay_ms: 100,
    });
    llm.push(text_reply("We open at nine.", 30, 20));
    let callers = vec![speak(dir.path(), "hours", "when are you open")];
    let call = simulate(cfg, dir.path(), args(callers, 6)).await;
    let dump = call.dump();
    let said = call.said().join(" | ");
    assert!(said.contains("We open at nine."), "{said}\n{dump}");
    // One model request: the one made ahead, which the caller confirmed by stopping.
    assert_eq!(llm.requests().len(), 1, "{dump}");
    let msgs = messages(&llm, 0);
    assert_eq!(
        msgs.last().map(|m| m["content"].clone()),
        Some(json!("When are you open?")),
        "{:?}",
        contents(&msgs)
    );
    let turn = call.first("turn").unwrap_or_else(|| panic!("{dump}"));
    assert!(
        matches!(turn["reply_ahead"].as_str(), Some("done" | "partial")),
        "{turn}"
    );
    // Made while the turn was still open: what is left after the endpoint is the wait for
    // its first audio, not for the model.
    assert!(turn["dialog_ms"].as_u64().unwrap() <= 40, "{turn}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_who_goes_on_is_answered_on_all_of_it_and_the_model_never_hears_the_guess() {
    let llm = LlmEmu::start().await;
    let stream = RealtimeEmu::start(24_000).await;
    let dir = tempfile::tempdir().unwrap();
    // A pause of 450 ms, inside the 1.2 s that ends a turn here.
    let cfg = ahead_config(
        dir.path(),
        &llm.base_url(),
        "http://127.0.0.1:9",
        &stream.url(),
        1200,
    );
    stream.push(Answer::Parts {
        texts: vec!["Check my order.".into(), "The one from Tuesday.".into()],
        delay_ms: 100,
    });
    // Made ahead on the first words; then the answer to all of them.
    llm.push(text_reply("Sure, which order is it?", 30, 20));
    llm.push(text_reply("It shipped yesterday.", 30, 20));
    let callers = vec![with_gap(
        dir.path(),
        "goes-on",
        &["check my order", "the one from tuesday"],
        450,
        RATE,
    )];
    let call = simulate(cfg, dir.path(), args(callers, 9)).await;
    let dump = call.dump();
    let said = call.said().join(" | ");
    assert!(said.contains("It shipped yesterday."), "{said}\n{dump}");
    assert!(!said.contains("which order"), "{said}\n{dump}");
    assert_eq!(call.of_type("speech_end").len(), 1, "{dump}");
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 2, "{dump}");
    // The second request carries the whole turn, and nothing of the guess.
    let msgs = messages(&llm, 1);
    let all = contents(&msgs).join("\n");
    assert_eq!(
        msgs.last().map(|m| m["content"].clone()),
        Some(json!("Check my order. The one from Tuesday.")),
        "{all}"
    );
    assert!(!all.contains("which order"), "{all}");
    assert_eq!(
        msgs.iter().filter(|m| m["role"] == "user").count(),
        1,
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_is_never_called_ahead() {
    let llm = LlmEmu::start().await;
    let hook = HookEmu::start().await;
    let stream = RealtimeEmu::start(24_000).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ahead_config(
        dir.path(),
        &llm.base_url(),
        &hook.url(""),
        &stream.url(),
        600,
    );
    stream.push(Answer::Say {
        text: "Where is order 55421?".into(),
        delay_ms: 100,
    });
    hook.push(HookReply::Json {
        status: 200,
        body: json!({"status": "shipped"}),
        delay_ms: 0,
    });
    // Ahead, the model wants the tool: nothing is made ahead. At the end of the turn it is
    // asked again, and the tool runs then, once.
    llm.push(tool_reply(
        None,
        &[("call_a", "lookup_order", json!({"order_id": "55421"}))],
        20,
    ));
    llm.push(tool_reply(
        None,
        &[("call_b", "lookup_order", json!({"order_id": "55421"}))],
        20,
    ));
    llm.push(text_reply("It shipped.", 30, 20));
    let callers = vec![speak(
        dir.path(),
        "where",
        "where is order five five four two one",
    )];
    let call = simulate(cfg, dir.path(), args(callers, 8)).await;
    let dump = call.dump();
    assert!(call.said().join(" | ").contains("It shipped."), "{dump}");
    assert_eq!(hook.requests().len(), 1, "{dump}");
    assert_eq!(llm.requests().len(), 3, "{dump}");
    // The request the turn made knows nothing of the one made ahead.
    let all = contents(&messages(&llm, 1)).join("\n");
    assert!(!all.contains("call_a"), "{all}");
    let turn = call.first("turn").unwrap_or_else(|| panic!("{dump}"));
    assert!(turn.get("reply_ahead").is_none(), "{turn}");
}
