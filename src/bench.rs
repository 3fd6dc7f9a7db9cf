//! `sidecall bench`: N concurrent calls through the real call engine and the real chan_websocket
//! transport (the code `serve` runs: WebSocket framing, 8 kHz mu-law <-> 16 kHz transcoding,
//! whole-frame cutting, marks, flush, the inbound event queue), with instant in-process engines,
//! so the figures are sidecall's own cost. The Asterisk side of each WebSocket is a simulated PBX
//! behind an in-memory stream: it plays one frame per 20 ms and answers marks, as chan_websocket
//! does. Prints CPU per call-second, per-tick work time, missed 20 ms deadlines, memory, and the
//! latency sidecall adds to each turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::audio::g711;
use crate::call::{CallSetup, MediaEvent, MediaLink, run_call};
use crate::config::{Config, TransferTarget};
use crate::engines::dialog::flow::{Flow, ScriptedDialog};
use crate::engines::endpoint::SmartTurn;
use crate::engines::instant::{InstantAsr, InstantTts};
use crate::pbx::asterisk::chan_ws;
use crate::pbx::events::CallEvents;
use crate::pbx::simulated::{self, Script};
use crate::telemetry::{Recorder, TickStats};

/// Flags of `sidecall bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Concurrent calls.
    #[arg(long, default_value_t = 100)]
    pub calls: usize,
    /// Length of each call in seconds.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// VAD engine to run: earshot or webrtc.
    #[arg(long, default_value = "earshot")]
    pub vad: String,
    /// Run the Smart Turn end-of-turn model at every pause (its ONNX file).
    #[arg(long, env = "SIDECALL_TURN_MODEL", requires = "onnxruntime")]
    pub turn_model: Option<std::path::PathBuf>,
    /// ONNX Runtime's libonnxruntime.so, for --turn-model.
    #[arg(long, env = "SIDECALL_ONNXRUNTIME")]
    pub onnxruntime: Option<std::path::PathBuf>,
    /// Model inferences at once (`turn.threads`).
    #[arg(long, default_value_t = 1)]
    pub turn_threads: usize,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench flow: {0}")]
    Flow(String),
}

const FLOW: &str = r#"
start = "ask"
disclosure = ""
[states.ask]
prompt = "Please say something now."
[states.ask.intents]
yes = "ask"
"#;

/// A caller utterance the VAD hears as voice: a 1.2 s harmonic buzz with a syllable rhythm.
fn utterance(rate: u32) -> Vec<i16> {
    let n = rate as usize * 6 / 5;
    (0..n)
        .map(|i| {
            let t = i as f32 / rate as f32;
            let env = 0.6 + 0.4 * (2.0 * std::f32::consts::PI * 4.0 * t).sin();
            let mut v = 0.0;
            for h in 1..12 {
                v += (2.0 * std::f32::consts::PI * 140.0 * h as f32 * t).sin() / h as f32;
            }
            (v * env * 6000.0) as i16
        })
        .collect()
}

/// The Asterisk end of one call's media WebSocket: chan_websocket's wire protocol (binary
/// mu-law frames both ways, MARK_MEDIA answered with MEDIA_MARK_PROCESSED once played,
/// FLUSH_MEDIA) in front of the simulated PBX, which plays one frame per 20 ms.
async fn asterisk_side<S>(ws: WebSocketStream<S>, pbx: simulated::SimPbx)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let simulated::SimPbx {
        link: mut to_caller,
        mut events,
        ..
    } = pbx;
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            m = stream.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    for f in b.chunks(160) {
                        if to_caller.send_audio(&g711::decode_ulaw(f)).is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let mut it = t.split_whitespace();
                    match (it.next(), it.next()) {
                        (Some("MARK_MEDIA"), Some(id)) => {
                            if let Some(n) = id.strip_prefix('m').and_then(|n| n.parse().ok()) {
                                let _ = to_caller.mark(n);
                            }
                        }
                        (Some("FLUSH_MEDIA"), _) => {
                            let _ = to_caller.flush();
                        }
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return,
            },
            ev = events.recv() => {
                let msg = match ev {
                    Some(MediaEvent::Audio(f)) => Message::binary(g711::encode_ulaw(&f)),
                    Some(MediaEvent::MarkPlayed(n)) => Message::text(format!("MEDIA_MARK_PROCESSED m{n}")),
                    Some(MediaEvent::Dtmf(d)) => Message::text(format!("DTMF_END digit:{d} channel_id:bench")),
                    Some(MediaEvent::Hangup { .. } | MediaEvent::TakenAway { .. }) | None => {
                        let _ = sink.close().await;
                        return;
                    }
                };
                if sink.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    stat_cpu(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
}

/// Name of the threads that run the simulated Asterisk, so their CPU is told apart.
const PBX_THREAD: &str = "bench-pbx";

/// CPU time of this process's threads named `PBX_THREAD`.
fn pbx_cpu_time() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with(PBX_THREAD))
        })
        .map(|t| stat_cpu(&std::fs::read_to_string(t.path().join("stat")).unwrap_or_default()))
        .sum()
}

/// utime + stime from a /proc stat line.
fn stat_cpu(stat: &str) -> Duration {
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the ')'.
    let total = ticks(11) + ticks(12);
    Duration::from_millis(total * 10)
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    // The simulated Asterisk runs on threads of its own, so sidecall's CPU can be told apart.
    let pbx_rt = PbxRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(PBX_THREAD)
            .enable_all()
            .build()
            .map_err(|e| BenchError::Flow(e.to_string()))?,
    ));
    let mut cfg = Config::default();
    cfg.vad.engine = args.vad.clone();
    cfg.call.sample_rate = 16_000;
    cfg.call.no_input_timeout_ms = 60_000;
    cfg.transfers.insert(
        "agent".into(),
        TransferTarget {
            context: Some("agents".into()),
            extension: Some("s".into()),
            priority: None,
            endpoint: None,
            announce: None,
        },
    );
    let turn = match (&args.turn_model, &args.onnxruntime) {
        (Some(model), Some(lib)) => Some(Arc::new(
            SmartTurn::load(lib, model, args.turn_threads.max(1), cfg.turn.queue)
                .map_err(|e| BenchError::Flow(e.to_string()))?,
        )),
        _ => None,
    };
    let cfg = Arc::new(cfg);
    let http = crate::net::http_client();
    let flow = Flow::parse(std::path::Path::new("<bench>"), FLOW)
        .map_err(|e| BenchError::Flow(e.to_string()))?;
    let stats = Arc::new(TickStats::default());
    let (rec_tx, mut rec_rx) = mpsc::channel::<Value>(65_536);
    let collector =
        tokio::spawn(async move {
            let mut added = Vec::new();
            let mut turns = 0u64;
            let mut checks = Checks::default();
            while let Some(v) = rec_rx.recv().await {
                if v.get("type").and_then(Value::as_str) == Some("turn_check") {
                    checks.add(&v);
                }
                if v.get("type").and_then(Value::as_str) == Some("turn") {
                    turns += 1;
                    let g = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
                    added.push(g("total_ms").saturating_sub(
                        g("endpoint_ms") + g("asr_ms") + g("dialog_ms") + g("tts_ms"),
                    ));
                }
            }
            added.sort_unstable();
            (turns, added, checks)
        });
    let rss_before = proc_status_kib("VmRSS:");
    let cpu_before = cpu_time();
    let wall = Instant::now();
    let clip8 = utterance(8_000);
    let mut handles = Vec::with_capacity(args.calls);
    let asr = Arc::new(InstantAsr("yes".into()));
    let tts = Arc::new(InstantTts);
    for i in 0..args.calls {
        let script = Script {
            // One utterance per ~2 s of call is more than the call can take.
            turns: vec![clip8.clone(); args.seconds as usize / 2 + 2],
            no_frames_in_silence: i % 2 == 0,
            max_ms: args.seconds * 1000,
            discard_audio: true,
            ..Script::default()
        };
        // The call's media WebSocket, in memory: sidecall's real chan_websocket code on one
        // end, the simulated Asterisk on the other (on its own runtime).
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let ours =
            WebSocketStream::from_raw_socket(ours, Role::Client, Some(chan_ws::ws_config())).await;
        let (control_tx, control_rx) = tokio::sync::oneshot::channel();
        pbx_rt.handle().spawn(async move {
            let pbx = simulated::start(script, 8_000);
            let _ = control_tx.send(pbx.control.clone());
            let theirs = WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
            asterisk_side(theirs, pbx).await;
        });
        let control = control_rx
            .await
            .map_err(|_| BenchError::Flow("simulated PBX did not start".into()))?;
        let (events, ev_rx) = CallEvents::channel(512);
        let start = chan_ws::MediaStart {
            connection_id: format!("bench-{i}"),
            channel: format!("WebSocket/bench-{i}"),
            channel_id: format!("bench-{i}"),
            format: "ulaw".into(),
            optimal_frame_size: 160,
            ptime: 20,
        };
        let (link, _media) = chan_ws::start(
            ours,
            start,
            chan_ws::ControlFormat::Plain,
            chan_ws::MarkSupport::Yes,
            16_000,
            events,
        )
        .map_err(|e| BenchError::Flow(e.to_string()))?;
        let setup = CallSetup {
            call_id: format!("bench-{i}"),
            flow_name: "bench".into(),
            config: cfg.clone(),
            dialog: Box::new(ScriptedDialog::new(
                flow.clone(),
                "",
                "agent",
                Duration::from_secs(1),
                http.clone(),
            )),
            asr: asr.clone(),
            tts: tts.clone(),
            turn: turn.clone(),
            link: Box::new(link),
            control,
            events: ev_rx,
            recorder: Recorder::to_channel(&format!("bench-{i}"), rec_tx.clone()),
            tick_stats: Some(stats.clone()),
            origin: None,
        };
        handles.push(tokio::spawn(run_call(setup)));
        // Stagger call starts over the first second, as real traffic is.
        if args.calls > 50 && i % (args.calls / 50).max(1) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(rec_tx);
    let mut rss_peak_during = 0u64;
    let mut sampler = tokio::time::interval(Duration::from_millis(500));
    let all = futures_util::future::join_all(handles);
    tokio::pin!(all);
    let outcomes = loop {
        tokio::select! {
            r = &mut all => break r,
            _ = sampler.tick() => rss_peak_during = rss_peak_during.max(proc_status_kib("VmRSS:")),
        }
    };
    let wall_s = wall.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let pbx_cpu = pbx_cpu_time();
    let own_cpu = cpu.saturating_sub(pbx_cpu);
    let completed = outcomes.iter().filter(|o| o.is_ok()).count();
    let (turns, added, mut checks) = collector
        .await
        .unwrap_or((0, Vec::new(), Checks::default()));
    let call_seconds = (args.calls as f64) * args.seconds as f64;
    let pct = |v: &[u64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let ticks = stats.work.count().max(1);
    println!(
        "sidecall bench: {} calls x {} s, VAD {}, chan_websocket 8 kHz mu-law <-> 16 kHz engine{}",
        args.calls,
        args.seconds,
        args.vad,
        if turn.is_some() {
            format!(", Smart Turn on {} thread(s)", args.turn_threads.max(1))
        } else {
            String::new()
        }
    );
    println!("  calls completed           {completed}/{}", args.calls);
    println!("  wall time                 {wall_s:.1} s");
    println!(
        "  CPU                       {:.0} ms total, {:.2} ms per call-second",
        cpu.as_millis(),
        cpu.as_millis() as f64 / call_seconds
    );
    println!(
        "  CPU, sidecall's own       {:.2} ms per call-second (the simulated Asterisk took {:.2})",
        own_cpu.as_millis() as f64 / call_seconds,
        pbx_cpu.as_millis() as f64 / call_seconds
    );
    println!(
        "  tick work                 p50 {} us, p99 {} us, max bucket {} us ({} ticks)",
        stats.work.quantile_us(0.5),
        stats.work.quantile_us(0.99),
        stats.work.quantile_us(1.0),
        ticks
    );
    println!(
        "  tick lateness             p50 {} us, p99 {} us; missed 20 ms deadlines {} ({:.3}%)",
        stats.lateness.quantile_us(0.5),
        stats.lateness.quantile_us(0.99),
        stats.lateness.over_limit(),
        100.0 * stats.lateness.over_limit() as f64 / ticks as f64
    );
    let peak = proc_status_kib("VmHWM:");
    println!(
        "  memory                    peak RSS {:.1} MiB, baseline {:.1} MiB, {:.1} KiB per call",
        peak as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        rss_peak_during.saturating_sub(rss_before) as f64 / args.calls.max(1) as f64
    );
    println!(
        "  added latency per turn    p50 {} ms, p99 {} ms, max {} ms over {turns} turns (total minus endpointing and engines)",
        pct(&added, 0.5),
        pct(&added, 0.99),
        added.last().copied().unwrap_or(0)
    );
    if let Some(model) = &turn {
        let huge = model.huge_pages();
        println!(
            "  end-of-turn model memory  {} MiB on huge pages; {} MiB refused by the kernel, {} MiB mostly unused",
            huge.collapsed >> 20,
            huge.refused >> 20,
            huge.sparse >> 20
        );
        checks.infer.sort_unstable();
        checks.wait.sort_unstable();
        let total: u64 = checks.infer.iter().sum();
        println!(
            "  end-of-turn model         {} checks ({:.2}/s), {} refused (busy) or failed; inference p50 {} ms, p95 {} ms; queue wait p50 {} ms, p95 {} ms",
            checks.infer.len(),
            checks.infer.len() as f64 / wall_s.max(0.001),
            checks.failed,
            pct(&checks.infer, 0.5),
            pct(&checks.infer, 0.95),
            pct(&checks.wait, 0.5),
            pct(&checks.wait, 0.95),
        );
        println!(
            "  end-of-turn model CPU     {:.2} ms per call-second ({} ms of inference in all)",
            total as f64 / call_seconds,
            total
        );
    }
    Ok(())
}

/// The end-of-turn model's answers, from `turn_check` records.
#[derive(Default)]
struct Checks {
    infer: Vec<u64>,
    wait: Vec<u64>,
    failed: u64,
}

impl Checks {
    fn add(&mut self, v: &Value) {
        match (
            v.get("infer_ms").and_then(Value::as_u64),
            v.get("wait_ms").and_then(Value::as_u64),
        ) {
            (Some(i), Some(w)) => {
                self.infer.push(i);
                self.wait.push(w);
            }
            _ => self.failed += 1,
        }
    }
}

/// The simulated Asterisk's runtime; shut down without blocking when the bench ends (a runtime
/// may not be dropped inside another).
struct PbxRuntime(Option<tokio::runtime::Runtime>);

impl PbxRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for PbxRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
