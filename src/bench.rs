//! `sidecall bench`: N concurrent simulated calls through the real turn detector, resampling,
//! G.711 coding and playout, with instant in-process engines, so the figures are sidecall's own
//! cost. Prints CPU per call-second, per-tick work time, missed 20 ms deadlines, memory, and
//! the latency sidecall adds to each turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::audio::{StreamResampler, g711};
use crate::call::{CallSetup, LinkError, MediaEvent, MediaLink, run_call};
use crate::config::{Config, TransferTarget};
use crate::engines::dialog::flow::{Flow, ScriptedDialog};
use crate::engines::instant::{InstantAsr, InstantTts};
use crate::pbx::queue_link::QueueLink;
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

/// Agent audio at 16 kHz -> 8 kHz -> mu-law -> PBX, as a transport would do it.
struct PhoneLink {
    inner: QueueLink,
    down: StreamResampler,
    buf: Vec<i16>,
    scratch: Vec<i16>,
}

impl MediaLink for PhoneLink {
    fn send_audio(&mut self, frame: &[i16]) -> Result<(), LinkError> {
        self.scratch.clear();
        if self.down.process(frame, &mut self.scratch).is_err() {
            return Err(LinkError::Closed);
        }
        let coded = g711::encode_ulaw(&self.scratch);
        self.buf.extend(g711::decode_ulaw(&coded));
        while self.buf.len() >= 160 {
            let f: Vec<i16> = self.buf.drain(..160).collect();
            self.inner.send_audio(&f)?;
        }
        Ok(())
    }
    fn mark(&mut self, id: u64) -> Result<(), LinkError> {
        self.inner.mark(id)
    }
    fn flush(&mut self) -> Result<(), LinkError> {
        self.buf.clear();
        self.inner.flush()
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
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
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
            while let Some(v) = rec_rx.recv().await {
                if v.get("type").and_then(Value::as_str) == Some("turn") {
                    turns += 1;
                    let g = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
                    added.push(g("total_ms").saturating_sub(
                        g("endpoint_ms") + g("asr_ms") + g("dialog_ms") + g("tts_ms"),
                    ));
                }
            }
            added.sort_unstable();
            (turns, added)
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
        let pbx = simulated::start(script, 8_000);
        // Inbound: 8 kHz mu-law from the PBX -> 16 kHz for the engine.
        let (ev_tx, ev_rx) = mpsc::channel(256);
        let mut pbx_events = pbx.events;
        tokio::spawn(async move {
            let Ok(mut up) = StreamResampler::new(8_000, 16_000) else {
                return;
            };
            let mut out = Vec::with_capacity(320);
            while let Some(ev) = pbx_events.recv().await {
                let ev = match ev {
                    MediaEvent::Audio(f) => {
                        let coded = g711::encode_ulaw(&f);
                        out.clear();
                        if up.process(&g711::decode_ulaw(&coded), &mut out).is_err() {
                            break;
                        }
                        MediaEvent::Audio(out.clone())
                    }
                    other => other,
                };
                if ev_tx.send(ev).await.is_err() {
                    break;
                }
            }
        });
        let link = PhoneLink {
            inner: pbx.link,
            down: StreamResampler::new(16_000, 8_000)
                .map_err(|e| BenchError::Flow(e.to_string()))?,
            buf: Vec::with_capacity(320),
            scratch: Vec::with_capacity(320),
        };
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
            link: Box::new(link),
            control: pbx.control,
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
    let completed = outcomes.iter().filter(|o| o.is_ok()).count();
    let (turns, added) = collector.await.unwrap_or((0, Vec::new()));
    let call_seconds = (args.calls as f64) * args.seconds as f64;
    let pct = |v: &[u64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let ticks = stats.work.count().max(1);
    println!(
        "sidecall bench: {} calls x {} s, VAD {}, 8 kHz mu-law PBX <-> 16 kHz engine",
        args.calls, args.seconds, args.vad
    );
    println!("  calls completed           {completed}/{}", args.calls);
    println!("  wall time                 {wall_s:.1} s");
    println!(
        "  CPU                       {:.0} ms total, {:.2} ms per call-second",
        cpu.as_millis(),
        cpu.as_millis() as f64 / call_seconds
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
    Ok(())
}
