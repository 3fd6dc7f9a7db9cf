//! Helpers for the integration tests: espeak-ng caller audio, a config pointing at the repo's
//! flows and the local ASR server, and one simulated call with its record.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use sidecall::app::{self, Engines, SimulateArgs};
use sidecall::call::CallOutcome;
use sidecall::config::{Config, Overrides};
use sidecall::pbx::simulated::SimReport;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The local ASR server's URL. The end-to-end tests need it: run them through `scripts/test`,
/// which starts the server, or start `scripts/asr-server` and set SIDECALL_ASR_URL.
pub fn asr_url() -> String {
    match std::env::var("SIDECALL_ASR_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => panic!(
            "SIDECALL_ASR_URL is not set: these end-to-end tests need the local whisper server. \
             Run scripts/test, or start scripts/asr-server --port 8765 and export \
             SIDECALL_ASR_URL=http://127.0.0.1:8765/v1"
        ),
    }
}

/// The Smart Turn model and ONNX Runtime library (`scripts/test` installs both into the venv
/// and exports their paths).
pub fn turn_model() -> (PathBuf, PathBuf) {
    let get = |name: &str| match std::env::var(name) {
        Ok(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!(
            "{name} is not set: the early-endpointing tests need the Smart Turn model and ONNX \
             Runtime. Run scripts/test, or `source scripts/lib.sh && ensure_venv` (it installs \
             both into the venv and exports SIDECALL_TURN_MODEL and SIDECALL_ONNXRUNTIME)"
        ),
    };
    (get("SIDECALL_TURN_MODEL"), get("SIDECALL_ONNXRUNTIME"))
}

/// Speaks `text` with espeak-ng into `dir/name.wav`.
pub fn speak(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{name}.wav"));
    let status = std::process::Command::new("espeak-ng")
        .args(["-s", "140", "-w"])
        .arg(&path)
        .arg(text)
        .status()
        .expect("espeak-ng must be installed (scripts/test installs it)");
    assert!(status.success(), "espeak-ng failed for {text:?}");
    path
}

/// The support flow with a caller who pauses 450 ms mid-sentence ("I want to talk to, ... an
/// agent please."), in audio at `rate`.
pub async fn goes_on_call(cfg: Config, dir: &Path, rate: u32) -> Call {
    simulate(
        cfg,
        dir,
        SimulateArgs {
            flow: Some("support".into()),
            callers: vec![with_gap(
                dir,
                "goes-on",
                &["I want to talk to,", "an agent please."],
                450,
                rate,
            )],
            max_seconds: 30,
            ..Default::default()
        },
    )
    .await
}

/// A config in `dir` using the repo's flows; `extra` is appended TOML (sections may repeat keys
/// only if the base does not set them).
/// One caller file at `rate`: the parts spoken by espeak-ng with `gap_ms` of silence between
/// them (a caller who pauses mid-sentence).
pub fn with_gap(dir: &Path, name: &str, parts: &[&str], gap_ms: usize, rate: u32) -> PathBuf {
    let mut out = Vec::new();
    for (i, text) in parts.iter().enumerate() {
        if i > 0 {
            out.extend(std::iter::repeat_n(0i16, gap_ms * rate as usize / 1000));
        }
        let part = speak(dir, &format!("{name}-{i}"), text);
        out.extend(sidecall::audio::wav::read_file_at(&part, rate).unwrap());
    }
    let path = dir.join(format!("{name}.wav"));
    sidecall::audio::wav::write_file(&path, rate, &out).unwrap();
    path
}

pub fn config(dir: &Path, call_extra: &str, asr_url: &str) -> Config {
    let flows = repo().join("examples/flows");
    // Turns end on silence alone unless a test sets `[turn]` itself (tests/endpointing.rs):
    // transcribing at every pause would multiply the requests to the one ASR server that all
    // tests share, and slow every other call in the suite.
    let turn = if call_extra.contains("[turn]") {
        ""
    } else {
        "\n[turn]\nspeculate = false\n"
    };
    let text = format!(
        r#"
[call]
no_input_timeout_ms = 3000
{call_extra}

[asr]
url = "{asr_url}"
# The suite shares one whisper server with CPU-bound tests on two cores: a transcript can
# take seconds there. What is tested is the call, not the server's speed.
timeout_ms = 15000

[dialog]
flows_dir = "{flows}"
{turn}
# The agent speaks briskly in tests: calls take less wall time; what is said is the same.
[tts]
rate = 230

[transfers.agent]
context = "agents"
extension = "support"
announce = "Connecting you to an agent."
"#,
        flows = flows.display()
    );
    let path = dir.join("sidecall.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path, &Overrides::default()).unwrap()
}

/// One finished simulated call.
pub struct Call {
    pub outcome: CallOutcome,
    pub report: SimReport,
    pub records: Vec<Value>,
    pub rate: u32,
}

impl Call {
    pub fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.records.iter().filter(|r| r["type"] == kind).collect()
    }

    pub fn first(&self, kind: &str) -> Option<&Value> {
        self.records.iter().find(|r| r["type"] == kind)
    }

    pub fn said(&self) -> Vec<String> {
        self.of_type("agent_say")
            .iter()
            .map(|r| r["text"].as_str().unwrap_or("").to_string())
            .collect()
    }

    pub fn heard_by_caller(&self) -> Vec<String> {
        self.of_type("transcript")
            .iter()
            .map(|r| r["text"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Time (ms on the call's timeline) of the last audible agent sample in [from_ms, to_ms);
    /// None when the agent is silent throughout.
    pub fn last_agent_sound_between(&self, from_ms: u64, to_ms: u64) -> Option<u64> {
        let per_ms = (self.rate / 1000) as usize;
        let len = self.report.agent.len();
        let from = (from_ms as usize * per_ms).min(len);
        let to = (to_ms as usize).saturating_mul(per_ms).min(len).max(from);
        self.report.agent[from..to]
            .iter()
            .rposition(|&s| s.unsigned_abs() > 300)
            .map(|i| ((from + i) / per_ms) as u64)
    }

    pub fn t(&self, r: &Value) -> u64 {
        r["t_ms"].as_u64().unwrap_or(0)
    }

    /// Asserts the last reply played to the end (its marks came back) no later than the `kind`
    /// record (transfer, hangup), and returns that reply's `heard` text.
    pub fn assert_last_reply_played_before(&self, kind: &str) -> String {
        let end = self
            .of_type("playout_end")
            .last()
            .copied()
            .expect("a playout_end record");
        let action = self
            .first(kind)
            .unwrap_or_else(|| panic!("no {kind} record\n{}", self.dump()));
        assert_eq!(
            end["complete"],
            true,
            "the last reply was cut\n{}",
            self.dump()
        );
        assert!(
            self.t(end) <= self.t(action),
            "{kind} before the last reply finished\n{}",
            self.dump()
        );
        end["heard"].as_str().unwrap_or("").to_string()
    }

    /// Prints the record, for failing tests.
    pub fn dump(&self) -> String {
        self.records
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs one simulated call with the engines the config names.
pub async fn simulate(cfg: Config, dir: &Path, args: SimulateArgs) -> Call {
    let engines = Engines::from_config(&cfg);
    simulate_with(cfg, engines, dir, args).await
}

/// Runs one simulated call with these engines (in-process ones run on a paused clock).
pub async fn simulate_with(cfg: Config, engines: Engines, dir: &Path, args: SimulateArgs) -> Call {
    let rate = cfg.call.sample_rate;
    let cfg = Arc::new(cfg);
    let record = dir.join(format!("call-{}.jsonl", std::process::id()));
    let args = SimulateArgs {
        record: Some(record.clone()),
        print: false,
        ..args
    };
    let (outcome, report) = app::simulate(cfg, engines, args).await.expect("simulate");
    let records = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    Call {
        outcome,
        report,
        records,
        rate,
    }
}

/// Reads one whole HTTP/1.1 request (headers, then Content-Length bytes of body), for fake
/// servers: answering before the body is read makes the client see a reset.
pub async fn read_http_request(sock: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = sock.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return buf;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return buf;
            }
        }
    }
}
