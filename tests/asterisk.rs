//! The Asterisk adapter against the Asterisk emulator (tests/asterisk_emu), with real espeak-ng
//! caller speech and the local whisper server: whole calls over chan_websocket in server and
//! client modes, barge-in, DTMF both ways, transfers, refusals, Asterisk restarting, 50 calls at
//! once with nothing left behind, and bad input from the PBX.

mod asterisk_emu;
mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use asterisk_emu::{CallLog, Emulator, Options, Script};
use serde_json::Value;
use sidecall::app::{Engines, parts_factory};
use sidecall::config::{Config, Overrides};
use sidecall::pbx::PartsFactory;
use sidecall::pbx::asterisk::app::run;
use sidecall::pbx::supervisor::Health;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Sidecall {
    stop: CancellationToken,
    health: Arc<Health>,
    records: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Sidecall {
    fn records_of(&self, caller: &str) -> Vec<Value> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["call_id"] == caller)
            .cloned()
            .collect()
    }

    fn said(&self, caller: &str) -> Vec<String> {
        self.records_of(caller)
            .iter()
            .filter(|r| r["type"] == "agent_say")
            .map(|r| r["text"].as_str().unwrap_or("").to_string())
            .collect()
    }

    async fn shutdown(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(dir: &Path, emu: &Emulator, extra: &str) -> Config {
    let flows = common::repo().join("examples/flows");
    let asr = std::env::var("SIDECALL_ASR_URL").unwrap_or_else(|_| "http://127.0.0.1:9/v1".into());
    let text = format!(
        r#"
[call]
no_input_timeout_ms = 4000

# Turns end on silence alone (see tests/common: one ASR server for the whole suite).
[turn]
speculate = false

[asr]
url = "{asr}"

[dialog]
flows_dir = "{flows}"

# The agent speaks briskly in tests: calls take less wall time; what is said is the same.
[tts]
rate = 230

[transfers.agent]
context = "agents"
extension = "support"
priority = 1

[transfers.overflow]
context = "overflow"
extension = "s"

[asterisk]
enabled = true
url = "{url}"
overflow_target = "overflow"
media_timeout_ms = 5000
shutdown_grace_s = 2
{extra}
"#,
        flows = flows.display(),
        url = emu.base_url(),
    );
    let path = dir.join("sidecall.toml");
    std::fs::write(&path, text).unwrap();
    let mut cfg = Config::load(&path, &Overrides::default()).unwrap();
    cfg.asterisk.password = Some("secret".into());
    cfg
}

async fn start(emu: &Emulator, extra: &str, parts: Option<PartsFactory>) -> Sidecall {
    start_tweaked(emu, extra, parts, |_| {}).await
}

async fn start_tweaked(
    emu: &Emulator,
    extra: &str,
    parts: Option<PartsFactory>,
    tweak: impl FnOnce(&mut Config),
) -> Sidecall {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), emu, extra);
    tweak(&mut cfg);
    let cfg = Arc::new(cfg);
    let parts = parts.unwrap_or_else(|| parts_factory(cfg.clone(), Engines::from_config(&cfg)));
    let (tx, mut rx) = mpsc::channel::<Value>(65_536);
    let records: Arc<Mutex<Vec<Value>>> = Arc::default();
    let r2 = records.clone();
    tokio::spawn(async move {
        while let Some(v) = rx.recv().await {
            r2.lock().unwrap().push(v);
        }
    });
    let stop = CancellationToken::new();
    let sup = sidecall::pbx::supervisor(&cfg, Health::default());
    let health = sup.health().clone();
    let task = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        tokio::spawn(async move {
            run(cfg, parts, sup, Some(tx), stop)
                .await
                .expect("adapter runs");
        })
    };
    // Ready when both ends know: the emulator registers the app as soon as it accepts the
    // socket, sidecall only once its handshake completes (a moment later on a busy machine).
    for _ in 0..100 {
        if emu.app_connected("sidecall") && health.control_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        emu.app_connected("sidecall"),
        "sidecall never connected to ARI events"
    );
    assert!(
        health.control_up(),
        "sidecall never saw its ARI events socket open"
    );
    Sidecall {
        stop,
        health,
        records,
        task,
        _dir: dir,
    }
}

/// Speech at the wire rate of `format`.
fn voice(dir: &Path, name: &str, text: &str, rate: u32) -> Vec<i16> {
    let p = common::speak(dir, name, text);
    sidecall::audio::wav::read_file_at(&p, rate).unwrap()
}

/// A caller who presses the human key at `at_ms`.
fn human_key_caller(emu: &Emulator, at_ms: u64) -> Arc<Mutex<CallLog>> {
    let script = Script {
        dtmf: vec![(at_ms, "0".into())],
        max_ms: 30_000,
        ..Script::default()
    };
    emu.place_call("sidecall", &["flow=order_status"], script)
        .expect("the app is connected")
        .1
}

/// Waits for the call to end and checks it reached the agents context (served, not overflowed).
async fn assert_reached_agent(log: &Arc<Mutex<CallLog>>, secs: u64) {
    wait_ended(log, secs).await;
    assert_eq!(
        log.lock().unwrap().continued_to,
        Some(("agents".into(), "support".into(), Some(1)))
    );
}

async fn wait_ended(log: &Arc<Mutex<CallLog>>, secs: u64) {
    for _ in 0..secs * 10 {
        if log.lock().unwrap().ended {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("call did not end within {secs} s");
}

async fn assert_no_leftovers(emu: &Emulator, sc: &Sidecall) {
    for _ in 0..50 {
        let (chans, bridges) = emu.leftovers();
        if chans.is_empty()
            && bridges.is_empty()
            && sc
                .health
                .active_calls
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (chans, bridges) = emu.leftovers();
    panic!(
        "left behind: channels {chans:?}, bridges {bridges:?}, active {}",
        sc.health
            .active_calls
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

async fn order_status_call(media: &str, mode: &str, plain: bool, format: &str) {
    order_status_call_on(media, mode, plain, format, None, false).await
}

/// `old_version`: an Asterisk without marks that reports this version. `lose_marks`: a marking
/// Asterisk that never answers a mark.
async fn order_status_call_on(
    media: &str,
    mode: &str,
    plain: bool,
    format: &str,
    old_version: Option<&str>,
    lose_marks: bool,
) {
    let url = common::asr_url();
    let _ = url;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut opts = Options {
        plain_only: plain,
        marks: old_version.is_none(),
        version: old_version.map(str::to_string),
        lose_marks,
        ..Options::default()
    };
    opts.ws_clients
        .insert("sidecall".into(), format!("ws://{listen}/media"));
    let emu = Emulator::start(0, opts).await;
    let extra = format!(
        "media = \"{media}\"\nwebsocket_mode = \"{mode}\"\nwebsocket_listen = \"{listen}\"\nformat = \"{format}\"\naudiosocket_listen = \"127.0.0.1:{}\"",
        free_port()
    );
    let sc = start(&emu, &extra, None).await;
    let dir = tempfile::tempdir().unwrap();
    let rate = if format == "slin16" { 16_000 } else { 8_000 };
    let script = Script {
        turns: vec![
            voice(dir.path(), "order", "five five four two one", rate),
            voice(dir.path(), "yes", "yes", rate),
            voice(dir.path(), "no", "no thank you", rate),
        ],
        max_ms: 90_000,
        ..Script::default()
    };
    let (caller, log) = emu
        .place_call("sidecall", &["flow=order_status", "lang=en"], script)
        .unwrap();
    wait_ended(&log, 95).await;
    let said = sc.said(&caller);
    assert!(
        said.iter()
            .any(|s| s.contains("Order 5, 5, 4, 2, 1 shipped yesterday and will arrive tomorrow.")),
        "{said:#?}"
    );
    assert!(
        said.last().is_some_and(|s| s.contains("Goodbye")),
        "{said:#?}"
    );
    let l = log.lock().unwrap().clone();
    if media != "websocket" {
        // Nothing re-times what the app sends: it must arrive at real time (10 frames per 200 ms,
        // a little more after a scheduling hiccup on a loaded machine).
        assert!(
            l.max_arrivals_per_200ms <= 13,
            "{media}: {} frames arrived within 200 ms",
            l.max_arrivals_per_200ms
        );
    }
    if media == "rtp" {
        assert!(l.rtp_packets > 500, "{}", l.rtp_packets);
        assert_eq!(
            l.rtp_header_errors, 0,
            "RTP sequence/timestamp/SSRC/PT stay consistent"
        );
    }
    assert_eq!(
        l.hangup_reason.as_deref(),
        Some("normal"),
        "agent hung up the caller"
    );
    if media == "websocket" {
        // Every frame of the goodbye was played before the hangup (nothing left in the queue),
        // whether marks or sidecall's own clock said when it had played.
        assert_eq!(l.unplayed_at_hangup, Some(0), "the goodbye was cut short");
    }
    if media == "websocket" && old_version.is_some() {
        // Playout was tracked by sidecall's own clock: no mark was answered, and MARK_MEDIA went
        // out at most once (the probe, when the version string does not tell).
        assert_eq!(l.marks_answered, 0);
        let sent = l.commands.iter().filter(|(_, c)| c == "MARK_MEDIA").count();
        assert!(
            sent <= 1,
            "MARK_MEDIA sent {sent} times to an Asterisk without marks"
        );
        assert!(
            l.commands.iter().all(|(_, c)| !c.starts_with('{')),
            "plain control only"
        );
        // Every reply counted as heard to its end, and no caller answer was taken as barge-in.
        let recs = sc.records_of(&caller);
        assert!(
            recs.iter().all(|r| r["type"] != "barge_in"),
            "no barge-in: {recs:#?}"
        );
        assert!(
            recs.iter()
                .filter(|r| r["type"] == "playout_end")
                .all(|r| r["complete"] == true),
            "{recs:#?}"
        );
    } else if lose_marks {
        assert_eq!(l.marks_answered, 0, "every mark was lost");
    } else if media == "websocket" {
        assert!(
            l.marks_answered >= 4,
            "playout marks went through the PBX: {}",
            l.marks_answered
        );
        let marks = l.commands.iter().filter(|(_, c)| c == "MARK_MEDIA").count();
        assert!(marks >= 4);
    }
    // The farewell was played before the hangup: its mark came back.
    let recs = sc.records_of(&caller);
    let last_end = recs
        .iter()
        .rev()
        .find(|r| r["type"] == "playout_end")
        .unwrap();
    assert_eq!(last_end["complete"], true);
    assert!(last_end["heard"].as_str().unwrap().contains("Goodbye"));
    // The caller heard speech.
    let loud = l.heard.iter().filter(|s| s.unsigned_abs() > 1000).count();
    assert!(loud > rate as usize, "the caller heard the agent");
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_over_websocket_server_mode_json() {
    order_status_call("websocket", "server", false, "slin16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_over_websocket_client_mode_plain_ulaw() {
    order_status_call("websocket", "client", true, "ulaw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_on_asterisk_without_marks_server_mode_git_master() {
    // A git build says `GIT-master-27fb039`: sidecall probes once, hears nothing back, and
    // tracks playout by its own clock; the call still ends with a hangup after the goodbye.
    order_status_call_on(
        "websocket",
        "server",
        true,
        "slin16",
        Some("GIT-master-27fb039"),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_playout_marks_do_not_leave_replies_unfinished() {
    // Asterisk 23.4.1 answers marks, but this one loses them all: each reply still ends (a
    // little late) and the call completes with a hangup after the goodbye.
    order_status_call_on("websocket", "server", false, "slin16", None, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_on_asterisk_without_marks_client_mode_23_1() {
    order_status_call_on("websocket", "client", true, "ulaw", Some("23.1.0"), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_flushes_and_silences_the_agent() {
    let _ = common::asr_url();
    let emu = Emulator::start(0, Options::default()).await;
    let sc = start(&emu, "", None).await;
    let dir = tempfile::tempdir().unwrap();
    let clip = voice(dir.path(), "order", "five five four two one", 16_000);
    let script = Script {
        at: vec![(3_000, clip.clone())],
        max_ms: 20_000,
        ..Script::default()
    };
    let (caller, log) = emu
        .place_call("sidecall", &["flow=order_status"], script)
        .unwrap();
    wait_ended(&log, 30).await;
    let l = log.lock().unwrap().clone();
    let recs = sc.records_of(&caller);
    assert!(recs.iter().any(|r| r["type"] == "barge_in"), "no barge_in");
    assert!(
        !l.flushes.is_empty(),
        "FLUSH_MEDIA was sent: {:?}",
        l.commands
    );
    // On the PBX's clock: the caller's voice begins at `onset`; speech has started once
    // min_speech_ms (100) of it was heard. No agent audio may be played 100 ms after that, until
    // the agent's next reply.
    let spoke = l.caller_spoke_at[0] as usize;
    let onset = spoke + clip.iter().position(|s| s.unsigned_abs() > 300).unwrap() / 16;
    let speech_start = onset + 100;
    let next_reply = l.heard[(speech_start + 200) * 16..]
        .chunks(320)
        .position(|f| f.iter().any(|s| s.unsigned_abs() > 300))
        .map(|i| speech_start + 200 + i * 20)
        .unwrap_or(usize::MAX);
    let window = &l.heard[(speech_start + 100) * 16..(next_reply.min(l.heard.len() / 16)) * 16];
    let loud = window.iter().filter(|s| s.unsigned_abs() > 300).count();
    let last = l.heard[..(next_reply.min(l.heard.len() / 16)) * 16]
        .iter()
        .rposition(|s| s.unsigned_abs() > 300)
        .unwrap_or(0)
        / 16;
    println!(
        "onset {onset} ms, agent last heard at {last} ms, next reply {next_reply} ms, flush at {:?}",
        l.flushes
    );
    assert_eq!(
        loud, 0,
        "agent audio played more than 100 ms after the caller's speech started"
    );
    assert!(
        sc.said(&caller)
            .iter()
            .any(|s| s.contains("Did you say order 5, 5, 4, 2, 1?")),
        "{:#?}",
        sc.said(&caller)
    );
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtmf_both_ways_without_duplicates() {
    let emu = Emulator::start(0, Options::default()).await;
    let flows = tempfile::tempdir().unwrap();
    // A flow that takes a keypad entry, then dials a downstream IVR's menu by DTMF and transfers.
    std::fs::write(
        flows.path().join("keys.toml"),
        "start = \"ask\"\ndisclosure = \"\"\n[states.ask]\nprompt = \"Type your code.\"\n\
         collect = { slot = \"code\", entity = \"digits\", min_len = 5, max_len = 5 }\nnext = \"pass\"\n\
         [states.pass]\nsay = \"Code {code|digits}. Passing you on.\"\nsend_dtmf = \"12#\"\ntransfer = \"agent\"\n",
    )
    .unwrap();
    let extra = format!(
        "[dialog]\nflows_dir = \"{}\"\nflow = \"keys\"",
        flows.path().display()
    );
    // [dialog] is set twice otherwise: build the config by hand.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &emu, "");
    cfg.dialog.flows_dir = toml::Spanned::new(0..0, flows.path().display().to_string());
    let _ = extra;
    let cfg = Arc::new(cfg);
    let parts = parts_factory(cfg.clone(), Engines::from_config(&cfg));
    let sc = start(&emu, "", Some(parts)).await;
    let script = Script {
        dtmf: vec![(1_500, "55421".into())],
        max_ms: 20_000,
        ..Script::default()
    };
    let (caller, log) = emu.place_call("sidecall", &["flow=keys"], script).unwrap();
    wait_ended(&log, 25).await;
    let recs = sc.records_of(&caller);
    let entries: Vec<&str> = recs
        .iter()
        .filter(|r| r["type"] == "dtmf")
        .filter_map(|r| r["digits"].as_str())
        .collect();
    assert_eq!(
        entries,
        vec!["55421"],
        "each key once although Asterisk reports it twice\n{recs:#?}"
    );
    let l = log.lock().unwrap().clone();
    assert_eq!(
        l.dtmf_sent_by_app,
        vec!["12#".to_string()],
        "keys sent with POST /channels/{{id}}/dtmf"
    );
    assert_eq!(
        l.continued_to,
        Some(("agents".into(), "support".into(), Some(1)))
    );
    assert!(
        sc.said(&caller)
            .iter()
            .any(|s| s == "Code 5, 5, 4, 2, 1. Passing you on.")
    );
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_allow_listed_target_after_the_farewell() {
    let _ = common::asr_url();
    let emu = Emulator::start(0, Options::default()).await;
    let sc = start(&emu, "", None).await;
    let dir = tempfile::tempdir().unwrap();
    let script = Script {
        turns: vec![voice(
            dir.path(),
            "agent",
            "I want to talk to an agent",
            16_000,
        )],
        max_ms: 40_000,
        ..Script::default()
    };
    let (caller, log) = emu
        .place_call("sidecall", &["flow=order_status"], script)
        .unwrap();
    wait_ended(&log, 45).await;
    let l = log.lock().unwrap().clone();
    assert_eq!(
        l.continued_to,
        Some(("agents".into(), "support".into(), Some(1))),
        "{:#?}",
        sc.records_of(&caller)
    );
    let recs = sc.records_of(&caller);
    let farewell = recs
        .iter()
        .rev()
        .find(|r| r["type"] == "playout_end")
        .unwrap();
    assert_eq!(farewell["complete"], true, "the farewell played to the end");
    assert!(
        farewell["heard"]
            .as_str()
            .unwrap()
            .contains("connecting you to an agent")
    );
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

/// A dialog that asks for a transfer nobody allowed.
struct Rogue;

#[async_trait::async_trait]
impl sidecall::engines::dialog::Dialog for Rogue {
    async fn start(
        &mut self,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        Ok(sidecall::engines::dialog::Turn {
            say: sidecall::engines::dialog::prompt::segments(
                "Transferring you to the premium line.",
            ),
            barge_in: false,
            send_dtmf: None,
            next: sidecall::engines::dialog::Next::Transfer {
                target: "premium_line_900".into(),
            },
        })
    }
    async fn input(
        &mut self,
        _i: sidecall::engines::dialog::Input,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        Ok(sidecall::engines::dialog::Turn {
            say: sidecall::engines::dialog::prompt::segments("Goodbye."),
            barge_in: false,
            send_dtmf: None,
            next: sidecall::engines::dialog::Next::Hangup {
                reason: "normal".into(),
            },
        })
    }
    fn heard(&mut self, _h: &sidecall::engines::dialog::Heard) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_a_target_not_allow_listed_is_refused() {
    let emu = Emulator::start(0, Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(dir.path(), &emu, ""));
    let engines = Engines::from_config(&cfg);
    let parts: PartsFactory = Arc::new(move |_args| {
        Ok(sidecall::pbx::CallParts {
            flow_name: "rogue".into(),
            dialog: Box::new(Rogue),
            asr: engines.asr.clone(),
            tts: engines.tts.clone(),
            turn: None,
        })
    });
    let sc = start(&emu, "", Some(parts)).await;
    let (caller, log) = emu
        .place_call(
            "sidecall",
            &[],
            Script {
                max_ms: 8_000,
                ..Script::default()
            },
        )
        .unwrap();
    wait_ended(&log, 15).await;
    let l = log.lock().unwrap().clone();
    // Never the rogue target; the caller, told they are being put through, reaches the human
    // target rather than silence.
    assert_eq!(l.redirected_to, None);
    assert_eq!(
        l.continued_to,
        Some(("agents".into(), "support".into(), Some(1)))
    );
    let recs = sc.records_of(&caller);
    assert!(
        recs.iter()
            .any(|r| r["type"] == "transfer_refused" && r["target"] == "premium_line_900"),
        "{recs:#?}"
    );
    assert!(
        recs.iter()
            .any(|r| r["type"] == "error" && r["stage"] == "transfer")
    );
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_restart_then_new_calls_work() {
    let port = free_port();
    let emu = Emulator::start(port, Options::default()).await;
    let sc = start(&emu, "", None).await;
    assert!(sc.health.control_up());
    emu.stop();
    for _ in 0..100 {
        if !sc.health.control_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!sc.health.control_up(), "/health reports the loss");
    // Asterisk comes back on the same port.
    let emu2 = Emulator::start(port, Options::default()).await;
    for _ in 0..100 {
        if emu2.app_connected("sidecall") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(emu2.app_connected("sidecall"), "sidecall reconnected");
    assert_reached_agent(&human_key_caller(&emu2, 1_000), 20).await;
    assert_no_leftovers(&emu2, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_calls_complete_with_nothing_leaked() {
    fifty_calls_over("websocket", "slin16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_calls_over_audiosocket_leak_nothing() {
    fifty_calls_over("audiosocket", "slin16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_calls_over_rtp_leak_nothing() {
    fifty_calls_over("rtp", "ulaw").await;
}

async fn fifty_calls_over(media: &str, format: &str) {
    let emu = Emulator::start(0, Options::default()).await;
    let extra = format!(
        "max_calls = 60\nmedia = \"{media}\"\nformat = \"{format}\"\naudiosocket_listen = \"127.0.0.1:{}\"",
        free_port()
    );
    let sc = start(&emu, &extra, None).await;
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let mut logs = Vec::new();
    for i in 0..50 {
        let script = Script {
            dtmf: vec![(1_000 + (i % 10) * 100, "0".into())],
            max_ms: 30_000,
            ..Script::default()
        };
        logs.push(
            emu.place_call("sidecall", &["flow=order_status"], script)
                .unwrap(),
        );
    }
    for (_, log) in &logs {
        wait_ended(log, 40).await;
    }
    for (caller, log) in &logs {
        assert_eq!(
            log.lock().unwrap().continued_to,
            Some(("agents".into(), "support".into(), Some(1))),
            "{caller}: {:#?}",
            sc.records_of(caller)
        );
    }
    assert_no_leftovers(&emu, &sc).await;
    let (crashed, refused) = emu.crashed();
    assert!(
        !crashed && refused.is_empty(),
        "ids that are prefixes of live ones: {refused:?}"
    );
    // Every call's tasks (session, media, dialog, pacing, readers) are gone. What may remain
    // are pooled HTTP connections to the emulator (at most 8 idle, a task on each side, and
    // the emulator's per-connection handler) and the adapter's own few: a leak of one task per
    // call would add 50.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    println!("tasks alive before the calls {tasks_before}, after {tasks_after}");
    assert!(
        tasks_after <= tasks_before + 30,
        "tasks before {tasks_before}, after {tasks_after}"
    );
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_capacity_goes_to_overflow_at_once() {
    let emu = Emulator::start(0, Options::default()).await;
    let sc = start(&emu, "max_calls = 1", None).await;
    let (_a, first) = emu
        .place_call(
            "sidecall",
            &[],
            Script {
                max_ms: 6_000,
                ..Script::default()
            },
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_b, second) = emu
        .place_call(
            "sidecall",
            &[],
            Script {
                max_ms: 6_000,
                ..Script::default()
            },
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        second.lock().unwrap().continued_to,
        Some(("overflow".into(), "s".into(), None))
    );
    wait_ended(&first, 10).await;
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_that_never_connects_sends_the_caller_to_overflow() {
    for mode in ["server", "client"] {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut opts = Options {
            media_never_connects: true,
            ..Options::default()
        };
        opts.ws_clients
            .insert("sidecall".into(), format!("ws://{listen}/media"));
        let emu = Emulator::start(0, opts).await;
        let sc = start_tweaked(
            &emu,
            &format!("websocket_mode = \"{mode}\"\nwebsocket_listen = \"{listen}\""),
            None,
            |c| c.asterisk.media_timeout_ms = 1_500,
        )
        .await;
        let t0 = std::time::Instant::now();
        let (_c, log) = emu
            .place_call(
                "sidecall",
                &[],
                Script {
                    max_ms: 30_000,
                    ..Script::default()
                },
            )
            .unwrap();
        for _ in 0..100 {
            if log.lock().unwrap().continued_to.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let waited = t0.elapsed();
        assert_eq!(
            log.lock().unwrap().continued_to,
            Some(("overflow".into(), "s".into(), None)),
            "{mode}"
        );
        assert!(
            waited < Duration::from_secs(8),
            "{mode}: overflow after {waited:?}"
        );
        sc.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_from_asterisk_ends_only_that_call() {
    let emu = Emulator::start(0, Options::default()).await;
    let sc = start(&emu, "", None).await;
    emu.send_garbage_event();
    // One call gets garbage control text (ignored), another an oversized frame (that call
    // ends cleanly), a third runs normally beside them.
    let (_g, garbage) = emu
        .place_call(
            "sidecall",
            &[],
            Script {
                garbage_at_ms: Some(500),
                dtmf: vec![(2_000, "0".into())],
                max_ms: 20_000,
                ..Script::default()
            },
        )
        .unwrap();
    let (big_id, big) = emu
        .place_call(
            "sidecall",
            &[],
            Script {
                oversized_at_ms: Some(500),
                max_ms: 20_000,
                ..Script::default()
            },
        )
        .unwrap();
    let (_n, normal) = emu
        .place_call(
            "sidecall",
            &[],
            Script {
                dtmf: vec![(2_500, "0".into())],
                max_ms: 20_000,
                ..Script::default()
            },
        )
        .unwrap();
    wait_ended(&garbage, 25).await;
    wait_ended(&big, 25).await;
    wait_ended(&normal, 25).await;
    assert_eq!(
        garbage.lock().unwrap().continued_to,
        Some(("agents".into(), "support".into(), Some(1))),
        "garbage text is ignored"
    );
    assert_eq!(
        normal.lock().unwrap().continued_to,
        Some(("agents".into(), "support".into(), Some(1)))
    );
    let recs = sc.records_of(&big_id);
    let end = recs
        .iter()
        .find(|r| r["type"] == "hangup")
        .expect("oversized frame ended the call");
    assert!(
        end["cause"].as_str().unwrap_or("").contains("oversized"),
        "{end}"
    );
    // The caller was not left in silence: sent to the overflow target.
    assert_eq!(
        big.lock().unwrap().continued_to,
        Some(("overflow".into(), "s".into(), None))
    );
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_over_audiosocket() {
    order_status_call("audiosocket", "server", false, "slin16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_over_rtp_ulaw() {
    order_status_call("rtp", "server", false, "ulaw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_sends_remaining_calls_to_overflow() {
    let emu = Emulator::start(0, Options::default()).await;
    let sc = start(&emu, "", None).await;
    let (active_id, active) = emu
        .place_call(
            "sidecall",
            &[],
            Script {
                max_ms: 30_000,
                ..Script::default()
            },
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let t0 = std::time::Instant::now();
    sc.stop.cancel(); // what SIGTERM does in `serve`
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sc.health
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    // A new caller during the grace period goes straight to overflow.
    let (_b, late) = emu
        .place_call(
            "sidecall",
            &[],
            Script {
                max_ms: 10_000,
                ..Script::default()
            },
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        late.lock().unwrap().continued_to,
        Some(("overflow".into(), "s".into(), None))
    );
    // The active call may finish during the grace (2 s here), then goes to overflow too.
    assert_eq!(
        active.lock().unwrap().continued_to,
        None,
        "not cut before the grace period ends"
    );
    wait_ended(&active, 10).await;
    let waited = t0.elapsed();
    assert_eq!(
        active.lock().unwrap().continued_to,
        Some(("overflow".into(), "s".into(), None))
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    // Its record says where it went, not that the caller hung up.
    let mut end = None;
    for _ in 0..50 {
        end = sc
            .records_of(&active_id)
            .into_iter()
            .find(|r| r["type"] == "call_end");
        if end.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        end.as_ref().map(|r| r["outcome"].clone()),
        Some(serde_json::json!("transferred")),
        "{:#?}",
        sc.records_of(&active_id)
    );
    assert!(
        sc.records_of(&active_id)
            .iter()
            .any(|r| r["type"] == "transfer" && r["target"] == "overflow")
    );
    let finished = tokio::time::timeout(Duration::from_secs(10), sc.task).await;
    assert!(finished.is_ok(), "the adapter stopped after draining");
    let (chans, bridges) = emu.leftovers();
    assert!(
        chans.is_empty() && bridges.is_empty(),
        "{chans:?} {bridges:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ari_password_is_reported_not_fatal() {
    let emu = Emulator::start(
        0,
        Options {
            pass: "other".into(),
            ..Options::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(dir.path(), &emu, ""));
    let parts = parts_factory(cfg.clone(), Engines::from_config(&cfg));
    let stop = CancellationToken::new();
    let sup = sidecall::pbx::supervisor(&cfg, Health::default());
    let health = sup.health().clone();
    let task = tokio::spawn(run(cfg, parts, sup, None, stop.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!emu.app_connected("sidecall"));
    assert!(
        !health
            .control_connected
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(!task.is_finished(), "keeps retrying with backoff");
    stop.cancel();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_an_endpoint_and_a_refused_redirect() {
    let emu = Emulator::start(0, Options::default()).await;
    let flows = tempfile::tempdir().unwrap();
    std::fs::write(
        flows.path().join("billing.toml"),
        "start = \"go\"\ndisclosure = \"\"\n[states.go]\nsay = \"One moment, billing will take your call.\"\ntransfer = \"billing\"\n",
    )
    .unwrap();
    std::fs::write(
        flows.path().join("wrongtech.toml"),
        "start = \"go\"\ndisclosure = \"\"\n[states.go]\nsay = \"One moment.\"\ntransfer = \"iax\"\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = "\n[transfers.billing]\nendpoint = \"PJSIP/billing\"\n\n[transfers.iax]\nendpoint = \"IAX2/remote\"";
    let mut cfg = config(dir.path(), &emu, extra);
    cfg.dialog.flows_dir = toml::Spanned::new(0..0, flows.path().display().to_string());
    let cfg = Arc::new(cfg);
    let parts = parts_factory(cfg.clone(), Engines::from_config(&cfg));
    let sc = start(&emu, extra, Some(parts)).await;
    let (_a, ok) = emu
        .place_call(
            "sidecall",
            &["flow=billing"],
            Script {
                max_ms: 15_000,
                ..Script::default()
            },
        )
        .unwrap();
    let (bad_id, bad) = emu
        .place_call(
            "sidecall",
            &["flow=wrongtech"],
            Script {
                max_ms: 15_000,
                ..Script::default()
            },
        )
        .unwrap();
    wait_ended(&ok, 20).await;
    wait_ended(&bad, 20).await;
    assert_eq!(
        ok.lock().unwrap().redirected_to.as_deref(),
        Some("PJSIP/billing")
    );
    // Asterisk refuses a redirect to another technology (422): the caller is not left in
    // Stasis; they go to the human target (`call.human_target`) instead.
    let b = bad.lock().unwrap().clone();
    let recs = sc.records_of(&bad_id);
    assert_eq!(b.redirected_to, None);
    assert_eq!(
        b.continued_to,
        Some(("agents".into(), "support".into(), Some(1))),
        "{recs:#?}"
    );
    assert_eq!(b.hangup_reason, None, "{recs:#?}");
    let end = recs.iter().rfind(|r| r["type"] == "call_end").unwrap();
    assert_eq!(end["outcome"], "transferred");
    assert!(
        recs.iter().any(|r| r["type"] == "error"
            && r["stage"] == "transfer"
            && r["message"].as_str().unwrap_or("").contains("422")),
        "{recs:#?}"
    );
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_refuses_ids_that_are_prefixes_like_asterisk() {
    // Faithful to Asterisk's legacy channel storage: `probe-media-3` while `probe-media-34`
    // lives is "already in use", and for chan_websocket the real one crashes there.
    let emu = Emulator::start(0, Options::default()).await;
    let http = sidecall::net::http_client();
    let post = |id: &str| {
        http.post(format!("{}/ari/channels/externalMedia", emu.base_url()))
            .basic_auth("sidecall", Some("secret"))
            .query(&[
                ("app", "sidecall"),
                ("channelId", id),
                ("transport", "websocket"),
                ("encapsulation", "none"),
                ("connection_type", "server"),
                ("format", "slin16"),
            ])
            .send()
    };
    assert_eq!(post("probe-media-34").await.unwrap().status(), 200);
    assert_eq!(post("probe-media-3").await.unwrap().status(), 500);
    assert_eq!(emu.crashed(), (true, vec!["probe-media-3".to_string()]));
    // sidecall's own ids are all one length: none can be a prefix of another.
    let ids: Vec<String> = (0..1000)
        .map(|_| sidecall::pbx::asterisk::app::object_id("sidecall-media-"))
        .collect();
    assert!(ids.iter().all(|i| i.len() == ids[0].len()));
    let set: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(set.len(), ids.len());
}

/// Starts sidecall on a runtime of its own, so that a test can kill it as `kill -9` does:
/// every task and socket gone at once, nothing cleaned up.
fn start_killable(emu: &Emulator, extra: &str) -> (tokio::runtime::Runtime, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(dir.path(), emu, extra));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let parts = parts_factory(cfg.clone(), Engines::from_config(&cfg));
    let sup = sidecall::pbx::supervisor(&cfg, Health::default());
    rt.spawn(async move {
        let _ = run(cfg, parts, sup, None, CancellationToken::new()).await;
    });
    (rt, dir)
}

async fn killed_sidecall_strands_nobody(media: &str, format: &str) {
    let emu = Emulator::start(0, Options::default()).await;
    let extra = format!(
        "media = \"{media}\"\nformat = \"{format}\"\naudiosocket_listen = \"127.0.0.1:{}\"",
        free_port()
    );
    let (rt, _dir) = start_killable(&emu, &extra);
    for _ in 0..100 {
        if emu.app_connected("sidecall") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let script = Script {
        max_ms: 120_000,
        ..Script::default()
    };
    let (caller, log) = emu
        .place_call("sidecall", &["flow=order_status"], script)
        .unwrap();
    for _ in 0..100 {
        if log.lock().unwrap().bridged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.lock().unwrap().bridged, "the call never got going");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // kill -9: the ARI socket drops, the caller stays in Stasis (Asterisk keeps it there).
    rt.shutdown_background();
    let killed = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let (chans, bridges) = emu.leftovers();
        assert!(chans.contains(&caller), "the caller is stranded in Stasis");
        assert_eq!(bridges.len(), 1, "the bridge is left behind");
        assert!(log.lock().unwrap().continued_to.is_none());
    }
    // Restarted at once, sidecall finds the caller and sends it to a human.
    let restarted = std::time::Instant::now();
    let sc = start(&emu, &extra, None).await;
    for _ in 0..100 {
        if log.lock().unwrap().continued_to.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{media}: caller reached the overflow target {} ms after the kill, {} ms after the restart",
        killed.elapsed().as_millis(),
        restarted.elapsed().as_millis()
    );
    assert_eq!(
        log.lock().unwrap().continued_to,
        Some(("overflow".into(), "s".into(), None)),
        "the stranded caller went to the overflow target"
    );
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sidecall_restarted_sends_stranded_callers_to_a_human_websocket() {
    killed_sidecall_strands_nobody("websocket", "slin16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sidecall_restarted_sends_stranded_callers_to_a_human_rtp() {
    // RTP has no socket whose close hangs up the media channel: it is left behind too.
    killed_sidecall_strands_nobody("rtp", "ulaw").await;
}

/// A dialog engine that breaks: it asks for digits, then panics or never answers.
struct Broken {
    panic: bool,
}

#[async_trait::async_trait]
impl sidecall::engines::dialog::Dialog for Broken {
    async fn start(
        &mut self,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        Ok(sidecall::engines::dialog::Turn {
            say: sidecall::engines::dialog::prompt::segments("Please key in your code."),
            barge_in: true,
            send_dtmf: None,
            next: sidecall::engines::dialog::Next::Listen(sidecall::engines::dialog::Expectation {
                asr_hint: None,
                pause_on_voice: None,
                digits: Some(sidecall::engines::dialog::DigitSpec {
                    max: 8,
                    terminator: Some('#'),
                }),
                spoken: None,
            }),
        })
    }
    async fn input(
        &mut self,
        _i: sidecall::engines::dialog::Input,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        if self.panic {
            panic!("injected: the dialog engine has a bug");
        }
        std::future::pending().await
    }
    fn heard(&mut self, _h: &sidecall::engines::dialog::Heard) {}
}

async fn broken_dialog_reaches_a_human(panic: bool) {
    let emu = Emulator::start(0, Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(dir.path(), &emu, ""));
    let engines = Engines::from_config(&cfg);
    let parts: PartsFactory = Arc::new(move |_args| {
        Ok(sidecall::pbx::CallParts {
            flow_name: "broken".into(),
            dialog: Box::new(Broken { panic }),
            asr: engines.asr.clone(),
            tts: engines.tts.clone(),
            turn: None,
        })
    });
    // Long enough that a panic's backtrace, printed on a busy machine, comes back before it.
    let sc = start_tweaked(&emu, "", Some(parts), |c| c.dialog.timeout_ms = 4_000).await;
    let (caller, log) = emu
        .place_call(
            "sidecall",
            &[],
            Script {
                dtmf: vec![(3_000, "1234#".into())],
                max_ms: 60_000,
                ..Script::default()
            },
        )
        .unwrap();
    // Without a deadline and a panic guard the caller sat in silence until max_duration_s.
    wait_ended(&log, 25).await;
    let recs = sc.records_of(&caller);
    assert_eq!(
        log.lock().unwrap().continued_to,
        Some(("agents".into(), "support".into(), Some(1))),
        "{recs:#?}"
    );
    let err = recs
        .iter()
        .find(|r| r["type"] == "error" && r["stage"] == "dialog")
        .unwrap_or_else(|| panic!("{recs:#?}"));
    let want = if panic {
        "panicked"
    } else {
        "no answer within 4000 ms"
    };
    assert!(err["message"].as_str().unwrap().contains(want), "{err}");
    assert!(
        sc.said(&caller)
            .iter()
            .any(|s| s.contains("technical trouble")),
        "the caller heard the error prompt: {:?}",
        sc.said(&caller)
    );
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_dialog_engine_sends_the_caller_to_a_human() {
    broken_dialog_reaches_a_human(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_dialog_engine_times_out_to_a_human() {
    broken_dialog_reaches_a_human(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_call_task_frees_its_slot_and_the_caller_reaches_a_human() {
    let emu = Emulator::start(0, Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(dir.path(), &emu, "max_calls = 1"));
    let good = parts_factory(cfg.clone(), Engines::from_config(&cfg));
    let parts: PartsFactory = Arc::new(move |args| {
        if args.flow.as_deref() == Some("explode") {
            panic!("injected: a bug while setting up the call");
        }
        good(args)
    });
    let sc = start(&emu, "max_calls = 1", Some(parts)).await;
    let (_c, log) = emu
        .place_call(
            "sidecall",
            &["flow=explode"],
            Script {
                max_ms: 30_000,
                ..Script::default()
            },
        )
        .unwrap();
    wait_ended(&log, 10).await;
    assert_eq!(
        log.lock().unwrap().continued_to,
        Some(("overflow".into(), "s".into(), None)),
        "the caller went to the overflow target"
    );
    assert_no_leftovers(&emu, &sc).await;
    // The one slot (max_calls = 1) is free again: the next caller is served, not overflowed.
    assert_reached_agent(&human_key_caller(&emu, 2_000), 20).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_ari_connection_is_detected_and_replaced() {
    let emu = Emulator::start(0, Options::default()).await;
    let sc = start_tweaked(&emu, "", None, |c| c.asterisk.events_silence_ms = 1_000).await;
    let ok = |sc: &Sidecall| {
        sc.health
            .control_connected
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(ok(&sc));
    assert_eq!(emu.events_connections(), 1);
    // The connection stays open but Asterisk answers nothing, not even pings.
    emu.freeze_events();
    let frozen = std::time::Instant::now();
    while ok(&sc) && frozen.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "half-open ARI connection noticed after {} ms",
        frozen.elapsed().as_millis()
    );
    assert!(!ok(&sc), "/health stayed green on a half-open connection");
    emu.thaw_events();
    for _ in 0..200 {
        if ok(&sc) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok(&sc), "reconnected");
    // The emulator counts a connection once its handshake is done, which sidecall may see a
    // moment earlier.
    for _ in 0..50 {
        if emu.events_connections() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(emu.events_connections() >= 2, "a new events connection");
    // Calls arrive on the new connection.
    assert_reached_agent(&human_key_caller(&emu, 1_500), 20).await;
    sc.shutdown().await;
}

/// Starts one call over `media` whose caller stays silent, and waits until it is bridged.
async fn silent_call(emu: &Emulator, sc: &Sidecall) -> (String, Arc<Mutex<CallLog>>) {
    let _ = sc;
    let (caller, log) = emu
        .place_call(
            "sidecall",
            &["flow=order_status"],
            Script {
                max_ms: 60_000,
                ..Script::default()
            },
        )
        .unwrap();
    for _ in 0..100 {
        if log.lock().unwrap().bridged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.lock().unwrap().bridged);
    (caller, log)
}

/// Reads until the peer closes (Ok(0)) or `secs` pass; true if it closed.
async fn closed_within(sock: &mut tokio::net::TcpStream, secs: u64) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_audiosocket_listener_are_dropped() {
    use tokio::io::AsyncWriteExt;
    let emu = Emulator::start(0, Options::default()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let sc = start(
        &emu,
        &format!("media = \"audiosocket\"\naudiosocket_listen = \"{listen}\""),
        None,
    )
    .await;
    let (caller, log) = silent_call(&emu, &sc).await;
    // A guessed UUID, a packet of another kind, and silence: each is closed, with no call.
    let mut guess = tokio::net::TcpStream::connect(&listen).await.unwrap();
    let mut pkt = vec![0x01u8, 0, 16];
    pkt.extend_from_slice(&[0x42; 16]);
    guess.write_all(&pkt).await.unwrap();
    let mut audio = tokio::net::TcpStream::connect(&listen).await.unwrap();
    audio.write_all(&[0x12, 0x02, 0x80]).await.unwrap();
    audio.write_all(&[0u8; 640]).await.unwrap();
    let mut mute = tokio::net::TcpStream::connect(&listen).await.unwrap();
    assert!(
        closed_within(&mut guess, 3).await,
        "a guessed UUID is closed"
    );
    assert!(
        closed_within(&mut audio, 3).await,
        "audio before a UUID is closed"
    );
    assert!(
        closed_within(&mut mute, 4).await,
        "a silent connection is closed after the handshake time"
    );
    // The real call was not touched.
    assert!(!log.lock().unwrap().ended);
    assert!(
        sc.records_of(&caller)
            .iter()
            .all(|r| r["type"] != "call_end")
    );
    emu.caller_hangup(&caller);
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_media_websocket_listener_are_dropped() {
    use futures_util::{SinkExt, StreamExt};
    let listen = format!("127.0.0.1:{}", free_port());
    let mut opts = Options::default();
    opts.ws_clients
        .insert("sidecall".into(), format!("ws://{listen}/media"));
    let emu = Emulator::start(0, opts).await;
    let sc = start(
        &emu,
        &format!("websocket_mode = \"client\"\nwebsocket_listen = \"{listen}\""),
        None,
    )
    .await;
    let (caller, log) = silent_call(&emu, &sc).await;
    // A stranger that speaks the protocol but names no call of ours.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{listen}/media"))
        .await
        .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        "MEDIA_START connection_id:x channel:WebSocket/x channel_id:1795262114.1 format:slin16 optimal_frame_size:640 ptime:20",
    ))
    .await
    .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(m) = ws.next().await {
            if m.is_err() || matches!(m, Ok(tokio_tungstenite::tungstenite::Message::Close(_))) {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a connection for no call of ours is closed");
    // One that never says anything is closed after the handshake time.
    let mut mute = tokio::net::TcpStream::connect(&listen).await.unwrap();
    assert!(closed_within(&mut mute, 4).await);
    assert!(!log.lock().unwrap().ended, "the real call goes on");
    emu.caller_hangup(&caller);
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_websocket_listener_with_basic_auth_refuses_wrong_credentials() {
    let listen = format!("127.0.0.1:{}", free_port());
    let emu = Emulator::start(0, Options::default()).await;
    let sc = start_tweaked(
        &emu,
        &format!("websocket_mode = \"client\"\nwebsocket_listen = \"{listen}\"\nwebsocket_client_username = \"asterisk\""),
        None,
        |c| c.asterisk.websocket_client_password = Some("media-secret".into()),
    )
    .await;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{listen}/media")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        "Basic YXN0ZXJpc2s6d3Jvbmc=".parse().unwrap(),
    );
    let r = tokio_tungstenite::connect_async(req).await;
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401)
        }
        other => panic!("wrong password got in: {:?}", other.map(|_| ())),
    }
    let r = tokio_tungstenite::connect_async(format!("ws://{listen}/media")).await;
    assert!(r.is_err(), "no credentials, no connection");
    let mut req = format!("ws://{listen}/media")
        .into_client_request()
        .unwrap();
    // asterisk:media-secret
    req.headers_mut().insert(
        "Authorization",
        "Basic YXN0ZXJpc2s6bWVkaWEtc2VjcmV0".parse().unwrap(),
    );
    assert!(
        tokio_tungstenite::connect_async(req).await.is_ok(),
        "the right credentials pass the handshake"
    );
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtp_from_a_stranger_is_not_heard() {
    let emu = Emulator::start(0, Options::default()).await;
    let sc = start(&emu, "media = \"rtp\"\nformat = \"ulaw\"", None).await;
    let (caller, log) = silent_call(&emu, &sc).await;
    let target = emu.media_targets()[0];
    // Loud noise for 1.5 s, well-formed RTP, from an address:port that is not Asterisk's.
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seed = 12345u32;
    for i in 0..75u16 {
        let mut p = vec![0x80u8, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        p[2..4].copy_from_slice(&i.to_be_bytes());
        p[4..8].copy_from_slice(&(u32::from(i) * 160).to_be_bytes());
        for _ in 0..160 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let v = ((seed >> 16) as i16) / 2;
            p.push(sidecall::audio::g711::encode_ulaw(&[v])[0]);
        }
        stranger.send_to(&p, target).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recs = sc.records_of(&caller);
    assert!(
        recs.iter()
            .all(|r| r["type"] != "speech_start" && r["type"] != "barge_in"),
        "the stranger's noise was heard: {recs:#?}"
    );
    assert!(!log.lock().unwrap().ended);
    emu.caller_hangup(&caller);
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_on_a_first_release_without_channel_id_in_media_start() {
    // chan_websocket before 2025-10-21 (20.16, 22.6, 23.0) names no channel id in MEDIA_START:
    // the connection is matched by channel name once externalMedia answers.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut opts = Options {
        marks: false,
        plain_only: true,
        version: Some("23.0.0".into()),
        media_start_channel_id: false,
        ..Options::default()
    };
    opts.ws_clients
        .insert("sidecall".into(), format!("ws://{listen}/media"));
    let emu = Emulator::start(0, opts).await;
    let sc = start(
        &emu,
        &format!("websocket_mode = \"client\"\nwebsocket_listen = \"{listen}\""),
        None,
    )
    .await;
    let mut logs = Vec::new();
    for i in 0..3 {
        logs.push(human_key_caller(&emu, 3_000 + i * 200));
    }
    for log in &logs {
        assert_reached_agent(log, 20).await;
        let l = log.lock().unwrap().clone();
        assert!(l.bridged, "media connected");
        let loud = l.heard.iter().filter(|s| s.unsigned_abs() > 1000).count();
        assert!(
            loud > 8_000,
            "the caller heard the greeting ({loud} loud samples)"
        );
    }
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_64_kib_media_messages_is_bounded_by_frames() {
    // 400 messages of 64 KiB of voiced sound (about 13 minutes of audio) at once: the call
    // keeps at most a second of it, so the caller's "speech" ends within seconds of the flood,
    // the 20 ms clock keeps running, and the human key right after it works.
    let emu = Emulator::start(0, Options::default()).await;
    let sc = start(&emu, "", None).await;
    let (caller, log) = emu
        .place_call(
            "sidecall",
            &["flow=order_status"],
            Script {
                flood_at_ms: Some(1_000),
                dtmf: vec![(6_000, "0".into())],
                max_ms: 30_000,
                ..Script::default()
            },
        )
        .unwrap();
    assert_reached_agent(&log, 20).await;
    let recs = sc.records_of(&caller);
    let t = |kind: &str| {
        recs.iter()
            .find(|r| r["type"] == kind)
            .and_then(|r| r["t_ms"].as_u64())
    };
    let (start, end) = (t("speech_start"), t("speech_end"));
    assert!(start.is_some(), "the flood was heard: {recs:#?}");
    let end = end.unwrap_or_else(|| panic!("the flood's sound never ended: {recs:#?}"));
    assert!(
        end < 6_000,
        "the flood ended {end} ms into the call, not minutes of backlog later: {recs:#?}"
    );
    // What was kept is at most about a second of it: the utterance ended because the sound
    // did, not because it reached the 15 s limit on the backlog of the whole flood.
    let first_end = recs
        .iter()
        .find(|r| r["type"] == "speech_end")
        .cloned()
        .unwrap_or_default();
    assert_eq!(first_end["cut"], false, "{first_end}");
    // The flood itself takes 1.5 to 2.5 s to cross the socket (so the sound lasts that long
    // plus the second kept): 2,980 ms here, 3,100 ms once in CI on a loaded machine. The
    // failure this guards against is the whole backlog: 15 s, the utterance limit.
    assert!(
        first_end["speech_ms"]
            .as_u64()
            .is_some_and(|ms| ms <= 4_000),
        "{first_end}"
    );
    assert_no_leftovers(&emu, &sc).await;
    sc.shutdown().await;
}
