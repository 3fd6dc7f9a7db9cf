//! The FreeSWITCH adapter against the FreeSWITCH emulator (tests/freeswitch_emu: an Event Socket
//! server and mod_audio_stream as PROTOCOLS.md describes them), with real espeak-ng speech and
//! the local whisper server where words matter: a whole call in stock playback mode, barge-in,
//! DTMF both ways, transfers allowed and refused, the Event Socket dropped and restored, 50 calls
//! at once with nothing left behind, strangers and garbage on the media listener, and streams
//! that fail.

mod common;
mod freeswitch_emu;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use freeswitch_emu::{FsCall, FsCallLog, FsEmulator, FsOptions, Module, Script};
use serde_json::Value;
use sidecall::app::{Engines, parts_factory};
use sidecall::config::{Config, Overrides};
use sidecall::pbx::PartsFactory;
use sidecall::pbx::freeswitch::run;
use sidecall::pbx::supervisor::Health;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-media-token-4f1d9c";

struct Sidecall {
    stop: CancellationToken,
    health: Arc<Health>,
    records: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
    media: String,
    _dir: tempfile::TempDir,
}

impl Sidecall {
    fn records_of(&self, uuid: &str) -> Vec<Value> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["call_id"] == uuid)
            .cloned()
            .collect()
    }

    fn said(&self, uuid: &str) -> Vec<String> {
        self.records_of(uuid)
            .iter()
            .filter(|r| r["type"] == "agent_say")
            .map(|r| r["text"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// A call to flow `flow` whose stream connects with `token`.
    fn call(&self, flow: &str, token: &str, script: Script) -> FsCall {
        FsCall {
            url: format!("ws://{}/fs/{{uuid}}?token={token}", self.media),
            rate: 16_000,
            metadata: Some(format!("{{\"flow\":\"{flow}\"}}")),
            variables: vec![
                ("sidecall".into(), sidecall::net::uuid_v4()),
                ("sidecall_flow".into(), flow.into()),
            ],
            script,
            module: Module::AudioStream,
        }
    }

    /// The same call through jambonz mod_audio_fork (the dialplan writes silence while parked).
    fn fork_call(&self, flow: &str, script: Script) -> FsCall {
        let mut call = self.call(flow, TOKEN, script);
        call.module = Module::AudioFork;
        call.metadata = Some(format!("{{\"flow\":\"{flow}\"}}"));
        call.variables
            .push(("send_silence_when_idle".into(), "-1".into()));
        call
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

fn config(dir: &Path, emu: &FsEmulator, flows: &Path) -> Config {
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

[transfers.overflow]
context = "overflow"
extension = "s"

[freeswitch]
enabled = true
esl_address = "127.0.0.1:{esl}"
media_listen = "127.0.0.1:{media}"
overflow_target = "overflow"
media_timeout_ms = 3000
shutdown_grace_s = 2
events_silence_ms = 25000
"#,
        flows = flows.display(),
        esl = emu.esl_port(),
        media = free_port(),
    );
    let path = dir.join("sidecall.toml");
    std::fs::write(&path, text).unwrap();
    let mut cfg = Config::load(&path, &Overrides::default()).unwrap();
    cfg.freeswitch.password = Some("ClueCon".into());
    cfg.freeswitch.media_token = Some(TOKEN.into());
    cfg
}

async fn start(emu: &FsEmulator, flows: Option<&Path>, parts: Option<PartsFactory>) -> Sidecall {
    start_tweaked(emu, flows, parts, |_| {}).await
}

async fn start_tweaked(
    emu: &FsEmulator,
    flows: Option<&Path>,
    parts: Option<PartsFactory>,
    tweak: impl FnOnce(&mut Config),
) -> Sidecall {
    let dir = tempfile::tempdir().unwrap();
    let repo_flows = common::repo().join("examples/flows");
    let mut cfg = config(dir.path(), emu, flows.unwrap_or(&repo_flows));
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
    let media = cfg.freeswitch.media_listen.clone();
    let task = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        tokio::spawn(async move {
            run(cfg, parts, sup, Some(tx), stop)
                .await
                .expect("adapter runs");
        })
    };
    for _ in 0..100 {
        if health.control_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        health.control_up(),
        "sidecall never connected to the Event Socket"
    );
    Sidecall {
        stop,
        health,
        records,
        task,
        media,
        _dir: dir,
    }
}

/// Speech at 16 kHz.
fn voice(dir: &Path, name: &str, text: &str) -> Vec<i16> {
    let p = common::speak(dir, name, text);
    sidecall::audio::wav::read_file_at(&p, 16_000).unwrap()
}

async fn wait_ended(log: &Arc<Mutex<FsCallLog>>, secs: u64) -> FsCallLog {
    for _ in 0..secs * 20 {
        if log.lock().unwrap().ended {
            return log.lock().unwrap().clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "call did not end within {secs} s: {:#?}",
        log.lock().unwrap().commands
    );
}

/// Waits (up to `secs`) until the caller has been transferred somewhere.
async fn wait_transferred(log: &Arc<Mutex<FsCallLog>>, secs: u64) {
    for _ in 0..secs * 20 {
        if log.lock().unwrap().transferred_to.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A caller who gives an order number, confirms, and has nothing else.
fn order_status_script(dir: &Path) -> Script {
    Script {
        turns: vec![
            voice(dir, "order", "five five four two one"),
            voice(dir, "yes", "yes"),
            voice(dir, "no", "no thank you"),
        ],
        max_ms: 90_000,
        ..Script::default()
    }
}

/// The order status was read out and the call said goodbye last.
fn assert_order_status_said(sc: &Sidecall, uuid: &str) {
    let said = sc.said(uuid);
    assert!(
        said.iter()
            .any(|s| s.contains("Order 5, 5, 4, 2, 1 shipped yesterday and will arrive tomorrow.")),
        "{said:#?}"
    );
    assert!(
        said.last().is_some_and(|s| s.contains("Goodbye")),
        "{said:#?}"
    );
}

/// No call is left in sidecall's books once the calls are over.
async fn assert_nothing_left(sc: &Sidecall) {
    for _ in 0..100 {
        if sc
            .health
            .active_calls
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("calls still active after they ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_call_with_stock_playback() {
    let _ = common::asr_url();
    let emu = FsEmulator::start(FsOptions::default()).await;
    let sc = start(&emu, None, None).await;
    let dir = tempfile::tempdir().unwrap();
    let script = order_status_script(dir.path());
    let (uuid, log) = emu.place_call(sc.call("order_status", TOKEN, script));
    let l = wait_ended(&log, 95).await;
    assert_order_status_said(&sc, &uuid);
    assert_eq!(
        l.killed.as_deref(),
        Some("NORMAL_CLEARING"),
        "{:#?}",
        l.commands
    );
    assert!(l.metadata_sent && l.stream_connected);
    assert_eq!(l.nested, 0, "playbacks queue (event-lock), never nest");
    assert_eq!(
        l.json_events, 0,
        "every message sidecall sent was understood"
    );
    // Every file sidecall queued played to its end: no reply was cut.
    assert!(!l.playbacks.is_empty());
    assert!(
        l.playbacks.iter().all(|(_, _, status)| status == "done"),
        "{:#?}",
        l.playbacks
    );
    // The goodbye was heard to its end before the hangup (its mark is its last file's stop).
    let recs = sc.records_of(&uuid);
    let last_end = recs
        .iter()
        .rfind(|r| r["type"] == "playout_end")
        .expect("playout_end");
    assert_eq!(last_end["complete"], true, "{recs:#?}");
    assert_eq!(
        recs.iter().rfind(|r| r["type"] == "call_end").unwrap()["outcome"],
        "agent_hangup"
    );
    assert!(
        l.heard.iter().filter(|s| s.unsigned_abs() > 500).count() > 16_000,
        "the caller heard the agent"
    );
    assert_nothing_left(&sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_breaks_the_playback_at_once() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let sc = start(&emu, None, None).await;
    let dir = tempfile::tempdir().unwrap();
    let script = Script {
        at: vec![(2_000, voice(dir.path(), "over", "five five four two one"))],
        max_ms: 6_000,
        ..Script::default()
    };
    let (uuid, log) = emu.place_call(sc.call("order_status", TOKEN, script));
    let l = wait_ended(&log, 15).await;
    let recs = sc.records_of(&uuid);
    assert!(recs.iter().any(|r| r["type"] == "barge_in"), "{recs:#?}");
    let spoke = l.caller_spoke_at[0];
    let (broke_at, all) = *l
        .breaks
        .iter()
        .find(|(t, _)| *t >= spoke)
        .expect("playback broken");
    assert!(all, "uuid_break <uuid> all: the queued files go too");
    println!(
        "barge-in: uuid_break {} ms after the caller began speaking",
        broke_at - spoke
    );
    // The detector needs barge_in_min_ms (120 ms) of voice; the break follows within 100 ms.
    assert!(
        broke_at.saturating_sub(spoke) <= 120 + 100,
        "broken {} ms after the caller began",
        broke_at - spoke
    );
    // The greeting's files queued behind the broken one never played (dropped with `all`):
    // the next file heard is the next reply's, numbered after them.
    let index = |f: &str| -> u64 {
        f.rsplit('_')
            .next()
            .and_then(|x| x.split('.').next())
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    let broken = l
        .playbacks
        .iter()
        .find(|(_, _, st)| st == "break")
        .map(|(_, f, _)| index(f))
        .expect("a file was broken off");
    let next = l
        .playbacks
        .iter()
        .find(|(t, _, st)| *t > broke_at && st == "done")
        .map(|(_, f, _)| index(f));
    if let Some(next) = next {
        assert!(next > broken + 1, "{:#?}", l.playbacks);
    }
    sc.shutdown().await;
}

/// A flow that takes a keypad entry, then dials a downstream IVR's menu and transfers.
fn keys_flow(dir: &Path) {
    std::fs::write(
        dir.join("keys.toml"),
        "start = \"ask\"\ndisclosure = \"\"\n[states.ask]\nprompt = \"Type your code.\"\n\
         collect = { slot = \"code\", entity = \"digits\", min_len = 5, max_len = 5 }\nnext = \"pass\"\n\
         [states.pass]\nsay = \"Code {code|digits}. Passing you on.\"\nsend_dtmf = \"12#\"\ntransfer = \"agent\"\n",
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtmf_both_ways_then_an_allow_listed_transfer() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let flows = tempfile::tempdir().unwrap();
    keys_flow(flows.path());
    let sc = start(&emu, Some(flows.path()), None).await;
    let script = Script {
        dtmf: vec![(1_500, "55421".into())],
        max_ms: 20_000,
        ..Script::default()
    };
    let (uuid, log) = emu.place_call(sc.call("keys", TOKEN, script));
    wait_transferred(&log, 15).await;
    let l = log.lock().unwrap().clone();
    let recs = sc.records_of(&uuid);
    let entries: Vec<&str> = recs
        .iter()
        .filter(|r| r["type"] == "dtmf")
        .filter_map(|r| r["digits"].as_str())
        .collect();
    assert_eq!(entries, vec!["55421"], "{recs:#?}");
    assert_eq!(l.dtmf_sent_by_app, vec!["12#".to_string()]);
    assert_eq!(l.transferred_to.as_deref(), Some("support XML agents"));
    // The keys went out before the transfer, and the transfer after the farewell.
    let at = |needle: &str| {
        l.commands
            .iter()
            .find(|(_, c)| c.contains(needle))
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("no {needle}: {:#?}", l.commands))
    };
    assert!(at("uuid_send_dtmf") <= at("uuid_transfer"));
    assert!(
        sc.said(&uuid)
            .iter()
            .any(|s| s == "Code 5, 5, 4, 2, 1. Passing you on.")
    );
    let farewell_done = recs.iter().rfind(|r| r["type"] == "playout_end").unwrap();
    assert_eq!(farewell_done["complete"], true);
    emu.hangup(&uuid);
    assert_nothing_left(&sc).await;
    sc.shutdown().await;
}

/// A dialog that tries to send the caller somewhere not allow-listed.
struct Rogue;

#[async_trait::async_trait]
impl sidecall::engines::dialog::Dialog for Rogue {
    async fn start(
        &mut self,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        Ok(sidecall::engines::dialog::Turn {
            say: sidecall::engines::dialog::prompt::segments("Putting you through."),
            barge_in: false,
            send_dtmf: None,
            next: sidecall::engines::dialog::Next::Transfer {
                target: "premium_line_900".into(),
            },
        })
    }
    async fn input(
        &mut self,
        _input: sidecall::engines::dialog::Input,
    ) -> Result<sidecall::engines::dialog::Turn, sidecall::engines::dialog::DialogError> {
        self.start().await
    }
    fn heard(&mut self, _heard: &sidecall::engines::dialog::Heard) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_not_allow_listed_is_refused_and_the_caller_reaches_a_human() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(
        dir.path(),
        &emu,
        &common::repo().join("examples/flows"),
    ));
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
    let sc = start(&emu, None, Some(parts)).await;
    let (uuid, log) = emu.place_call(sc.call(
        "rogue",
        TOKEN,
        Script {
            max_ms: 10_000,
            ..Script::default()
        },
    ));
    wait_transferred(&log, 10).await;
    let l = log.lock().unwrap().clone();
    assert_eq!(l.transferred_to.as_deref(), Some("support XML agents"));
    let recs = sc.records_of(&uuid);
    assert!(
        recs.iter()
            .any(|r| r["type"] == "transfer_refused" && r["target"] == "premium_line_900"),
        "{recs:#?}"
    );
    emu.hangup(&uuid);
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_socket_dropped_and_restored() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let flows = tempfile::tempdir().unwrap();
    keys_flow(flows.path());
    let sc = start(&emu, Some(flows.path()), None).await;
    // A call in progress when the connection drops goes on, and its keys still arrive (on the
    // new connection) and its transfer still happens.
    let script = Script {
        dtmf: vec![(3_000, "55421".into())],
        max_ms: 25_000,
        ..Script::default()
    };
    let (uuid, log) = emu.place_call(sc.call("keys", TOKEN, script));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    emu.drop_esl_connections();
    for _ in 0..40 {
        if !sc.health.control_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        !sc.health.control_up(),
        "/health shows the Event Socket down"
    );
    for _ in 0..100 {
        if sc.health.control_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sc.health.control_up(), "reconnected");
    assert!(emu.esl_connections() >= 2);
    wait_transferred(&log, 20).await;
    let l = log.lock().unwrap().clone();
    assert_eq!(
        l.transferred_to.as_deref(),
        Some("support XML agents"),
        "{:#?}\n{:#?}",
        l.commands,
        sc.records_of(&uuid)
    );
    emu.hangup(&uuid);
    assert_nothing_left(&sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_the_token_is_refused_and_the_caller_goes_to_overflow() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let sc = start(&emu, None, None).await;
    let (uuid, log) = emu.place_call(sc.call(
        "order_status",
        "wrong-token",
        Script {
            max_ms: 15_000,
            ..Script::default()
        },
    ));
    wait_transferred(&log, 10).await;
    let l = log.lock().unwrap().clone();
    assert!(!l.stream_connected);
    assert!(l.stream_error.is_some(), "the module saw the refusal");
    assert_eq!(
        l.transferred_to.as_deref(),
        Some("s XML overflow"),
        "{:#?}",
        l.commands
    );
    let recs = sc.records_of(&uuid);
    assert!(
        recs.iter()
            .any(|r| r["type"] == "call_end" && r["outcome"] == "overflow"),
        "{recs:#?}"
    );
    emu.hangup(&uuid);
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_connects_sends_the_caller_to_overflow() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let sc = start(&emu, None, None).await;
    // The dialplan points the stream at a port nobody listens on: ::error after ~20 ms.
    let mut call = sc.call(
        "order_status",
        TOKEN,
        Script {
            max_ms: 15_000,
            ..Script::default()
        },
    );
    call.url = format!("ws://127.0.0.1:{}/fs/{{uuid}}?token={TOKEN}", free_port());
    let (_uuid, log) = emu.place_call(call);
    wait_transferred(&log, 10).await;
    let l = log.lock().unwrap().clone();
    assert_eq!(
        l.transferred_to.as_deref(),
        Some("s XML overflow"),
        "{:#?}",
        l.commands
    );
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_one_stream_harms_no_other_call() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let flows = tempfile::tempdir().unwrap();
    keys_flow(flows.path());
    let sc = start(&emu, Some(flows.path()), None).await;
    let bad = Script {
        garbage_at_ms: Some(500),
        max_ms: 8_000,
        ..Script::default()
    };
    let good = Script {
        dtmf: vec![(2_500, "55421".into())],
        max_ms: 20_000,
        ..Script::default()
    };
    let (_bad_uuid, _bad_log) = emu.place_call(sc.call("keys", TOKEN, bad));
    let (good_uuid, good_log) = emu.place_call(sc.call("keys", TOKEN, good));
    wait_transferred(&good_log, 20).await;
    let l = good_log.lock().unwrap().clone();
    assert_eq!(
        l.transferred_to.as_deref(),
        Some("support XML agents"),
        "{:#?}",
        sc.records_of(&good_uuid)
    );
    emu.hangup(&good_uuid);
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_calls_complete_with_nothing_leaked() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let flows = tempfile::tempdir().unwrap();
    keys_flow(flows.path());
    let sc = start(&emu, Some(flows.path()), None).await;
    let mut logs = Vec::new();
    for i in 0..50u64 {
        let script = Script {
            dtmf: vec![(2_000 + (i % 10) * 100, "55421".into())],
            max_ms: 40_000,
            ..Script::default()
        };
        logs.push(emu.place_call(sc.call("keys", TOKEN, script)));
    }
    for (uuid, log) in &logs {
        let mut done = false;
        for _ in 0..900 {
            if log.lock().unwrap().transferred_to.is_some() {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(done, "{uuid}: {:#?}", sc.records_of(uuid));
        let l = log.lock().unwrap().clone();
        assert_eq!(l.transferred_to.as_deref(), Some("support XML agents"));
        assert_eq!(l.dtmf_sent_by_app, vec!["12#".to_string()]);
        emu.hangup(uuid);
    }
    assert_nothing_left(&sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_capacity_goes_to_overflow_at_once() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let flows = tempfile::tempdir().unwrap();
    keys_flow(flows.path());
    let sc = start_tweaked(&emu, Some(flows.path()), None, |c| {
        c.freeswitch.max_calls = 1
    })
    .await;
    let script = || Script {
        max_ms: 15_000,
        ..Script::default()
    };
    let (first, first_log) = emu.place_call(sc.call("keys", TOKEN, script()));
    for _ in 0..100 {
        if sc
            .health
            .active_calls
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_second, second_log) = emu.place_call(sc.call("keys", TOKEN, script()));
    wait_transferred(&second_log, 2).await;
    assert_eq!(
        second_log.lock().unwrap().transferred_to.as_deref(),
        Some("s XML overflow")
    );
    assert_eq!(
        first_log.lock().unwrap().transferred_to,
        None,
        "the first call goes on"
    );
    emu.hangup(&first);
    assert_nothing_left(&sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_sends_remaining_calls_to_overflow() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let flows = tempfile::tempdir().unwrap();
    keys_flow(flows.path());
    let sc = start(&emu, Some(flows.path()), None).await;
    let (uuid, log) = emu.place_call(sc.call(
        "keys",
        TOKEN,
        Script {
            max_ms: 30_000,
            ..Script::default()
        },
    ));
    for _ in 0..100 {
        if sc
            .health
            .active_calls
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sc.stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        sc.health
            .draining
            .load(std::sync::atomic::Ordering::Relaxed),
        "/ready turns 503 while draining"
    );
    assert_eq!(
        log.lock().unwrap().transferred_to,
        None,
        "the grace period first"
    );
    // shutdown_grace_s = 2: then the caller goes to the overflow target, not left parked.
    wait_transferred(&log, 10).await;
    let to = log.lock().unwrap().transferred_to.clone();
    assert_eq!(to.as_deref(), Some("s XML overflow"));
    let _ = tokio::time::timeout(Duration::from_secs(15), sc.task).await;
    let recs: Vec<Value> = sc
        .records
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r["call_id"] == uuid.as_str())
        .cloned()
        .collect();
    let end = recs
        .iter()
        .rfind(|r| r["type"] == "call_end")
        .expect("call_end");
    assert_eq!(end["outcome"], "transferred", "{recs:#?}");
}

/// Sidecall with `playback = "audio_fork"` (jambonz mod_audio_fork).
async fn start_fork(emu: &FsEmulator, flows: Option<&Path>) -> Sidecall {
    start_tweaked(emu, flows, None, |c| {
        c.freeswitch.playback = "audio_fork".into()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_call_through_mod_audio_fork() {
    let _ = common::asr_url();
    let emu = FsEmulator::start(FsOptions::default()).await;
    let sc = start_fork(&emu, None).await;
    let dir = tempfile::tempdir().unwrap();
    let script = order_status_script(dir.path());
    let (uuid, log) = emu.place_call(sc.fork_call("order_status", script));
    let l = wait_ended(&log, 95).await;
    assert_order_status_said(&sc, &uuid);
    assert_eq!(
        l.killed.as_deref(),
        Some("NORMAL_CLEARING"),
        "{:#?}\n{:#?}",
        l.commands,
        sc.records_of(&uuid)
    );
    // No ESL playback at all: the audio went back over the WebSocket.
    assert!(l.playbacks.is_empty(), "{:#?}", l.playbacks);
    assert!(l.fork_bytes_received > 100_000);
    // Every reply's marks came back played (none cleared: nobody interrupted), and the goodbye
    // was heard to its end before the hangup.
    assert!(
        l.marks_answered.iter().all(|(_, _, ev)| ev == "playout"),
        "{:#?}",
        l.marks_answered
    );
    let recs = sc.records_of(&uuid);
    let last_end = recs.iter().rfind(|r| r["type"] == "playout_end").unwrap();
    assert_eq!(last_end["complete"], true, "{recs:#?}");
    assert!(
        l.heard.iter().filter(|s| s.unsigned_abs() > 500).count() > 16_000,
        "the caller heard the agent"
    );
    assert_nothing_left(&sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_through_mod_audio_fork_kills_its_audio_at_once() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let sc = start_fork(&emu, None).await;
    let dir = tempfile::tempdir().unwrap();
    let script = Script {
        at: vec![(2_000, voice(dir.path(), "over", "five five four two one"))],
        max_ms: 12_000,
        ..Script::default()
    };
    let (uuid, log) = emu.place_call(sc.fork_call("order_status", script));
    let l = wait_ended(&log, 15).await;
    let recs = sc.records_of(&uuid);
    assert!(recs.iter().any(|r| r["type"] == "barge_in"), "{recs:#?}");
    let spoke = l.caller_spoke_at[0];
    let killed_at = *l
        .kills
        .iter()
        .find(|t| **t >= spoke)
        .expect("killAudio sent");
    println!(
        "barge-in (audio_fork): killAudio {} ms after the caller began speaking",
        killed_at - spoke
    );
    assert!(
        killed_at.saturating_sub(spoke) <= 120 + 100,
        "killAudio {} ms after the caller began",
        killed_at - spoke
    );
    // The fork's play-out buffer was emptied: the caller hears nothing more of the greeting
    // (the next reply cannot start while the caller is still talking).
    let from = ((killed_at + 60) * 16) as usize;
    let to = ((killed_at + 400) * 16) as usize;
    let after = &l.heard[from.min(l.heard.len())..to.min(l.heard.len())];
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|s| s.unsigned_abs() < 200),
        "agent audio went on after killAudio"
    );
    let cut = recs.iter().find(|r| r["type"] == "playout_end").unwrap();
    assert_eq!(cut["complete"], false);
    // After a killAudio the module loses track of its marks (later ones never come back): the
    // next reply still ends when its audio has played, by sidecall's clock, not by the call's
    // lost-mark deadline.
    let ends: Vec<&Value> = recs.iter().filter(|r| r["type"] == "playout_end").collect();
    assert!(ends.len() >= 2, "{recs:#?}");
    assert_eq!(ends[1]["complete"], true, "{recs:#?}");
    assert!(
        !recs
            .iter()
            .any(|r| r["type"] == "error" && r["stage"] == "playout"),
        "a mark was lost: {recs:#?}"
    );
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtmf_and_transfer_through_mod_audio_fork() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let flows = tempfile::tempdir().unwrap();
    keys_flow(flows.path());
    let sc = start_fork(&emu, Some(flows.path())).await;
    let script = Script {
        dtmf: vec![(1_500, "55421".into())],
        max_ms: 20_000,
        ..Script::default()
    };
    let (uuid, log) = emu.place_call(sc.fork_call("keys", script));
    wait_transferred(&log, 15).await;
    let l = log.lock().unwrap().clone();
    assert_eq!(l.dtmf_sent_by_app, vec!["12#".to_string()]);
    assert_eq!(
        l.transferred_to.as_deref(),
        Some("support XML agents"),
        "{:#?}",
        sc.records_of(&uuid)
    );
    let farewell = sc
        .records_of(&uuid)
        .into_iter()
        .rfind(|r| r["type"] == "playout_end")
        .unwrap();
    assert_eq!(
        farewell["complete"], true,
        "the farewell's mark came back played"
    );
    emu.hangup(&uuid);
    assert_nothing_left(&sc).await;
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_while_the_event_socket_is_down_is_refused_and_the_caller_goes_to_overflow_when_it_is_back()
 {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let sc = start(&emu, None, None).await;
    emu.drop_esl_connections();
    for _ in 0..40 {
        if !sc.health.control_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!sc.health.control_up());
    // The stream connects during the reconnect backoff: nothing could be played or
    // transferred, so the call is not taken; the caller goes to overflow once the Event
    // Socket is back.
    let (uuid, log) = emu.place_call(sc.call(
        "order_status",
        TOKEN,
        Script {
            max_ms: 15_000,
            ..Script::default()
        },
    ));
    wait_transferred(&log, 10).await;
    let l = log.lock().unwrap().clone();
    assert_eq!(
        l.transferred_to.as_deref(),
        Some("s XML overflow"),
        "{:#?}",
        l.commands
    );
    assert!(
        sc.said(&uuid).is_empty(),
        "no call was run without its control plane"
    );
    emu.hangup(&uuid);
    sc.shutdown().await;
}
