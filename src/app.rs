//! Wiring shared by the subcommands: engines built from config, a call's dialog from its flow,
//! and `simulate` (one call through the simulated PBX).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::audio::wav;
use crate::call::{CallOutcome, CallSetup, run_call};
use crate::config::Config;
use crate::engines::asr::{Asr, OpenAiAsr};
use crate::engines::dialog::flow::{Flow, ScriptedDialog};
use crate::engines::dialog::{Dialog, DialogError};
use crate::engines::tts::Tts;
use crate::engines::tts::cache::CachedTts;
use crate::engines::tts::espeak::Espeak;
use crate::engines::tts::openai::OpenAiTts;
use crate::pbx::simulated::{self, Script, SimReport};
use crate::telemetry::{self, Recorder};

/// Errors of the application layer.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Audio(#[from] crate::audio::AudioError),
    #[error(transparent)]
    Dialog(#[from] DialogError),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The engines every call shares.
#[derive(Clone)]
pub struct Engines {
    pub asr: Arc<dyn Asr>,
    pub tts: Arc<dyn Tts>,
    pub cache: Option<Arc<CachedTts>>,
    /// The process's HTTP client (one connection pool), also for flow webhooks.
    pub http: reqwest::Client,
}

impl Engines {
    pub fn from_config(cfg: &Config) -> Engines {
        let client = crate::engines::http_client();
        let asr: Arc<dyn Asr> = Arc::new(OpenAiAsr::new(&cfg.asr, client.clone()));
        let base: Arc<dyn Tts> = match cfg.tts.engine.as_str() {
            "openai" => Arc::new(OpenAiTts::new(&cfg.tts, client.clone())),
            _ => Arc::new(Espeak::new(&cfg.tts)),
        };
        let cache = Arc::new(CachedTts::new(
            base,
            cfg.tts.cache_entries,
            cfg.tts.cache_mb.saturating_mul(1 << 20),
        ));
        Engines {
            asr,
            tts: cache.clone(),
            cache: Some(cache),
            http: client,
        }
    }
}

/// Loads and validates the config file, the default flow included (`check`, `simulate`, `serve`).
pub fn load_config(
    path: &Path,
    overrides: &crate::config::Overrides,
) -> Result<Config, crate::config::ConfigError> {
    Config::load_checking(path, overrides, &|p| {
        Flow::load(p).map(drop).map_err(|e| e.to_string())
    })
}

/// Loads the flow `name` (a name in flows_dir or a path) and checks its transfer targets
/// against the allow-list.
pub fn load_flow(cfg: &Config, name: &str) -> Result<Flow, AppError> {
    let path = cfg.flow_path(name);
    let flow = Flow::load(&path)?;
    for t in flow.transfer_targets() {
        if !cfg.transfers.contains_key(&t) {
            return Err(AppError::Dialog(DialogError::Flow {
                path: path.display().to_string(),
                message: format!(
                    "transfer target `{t}` is not in the config's [transfers] allow-list"
                ),
            }));
        }
    }
    Ok(flow)
}

/// A dialog for one call running `flow`; webhooks go through the process's `http` client.
pub fn dialog_for(cfg: &Config, flow: Flow, http: reqwest::Client) -> Box<dyn Dialog> {
    Box::new(ScriptedDialog::new(
        flow,
        &cfg.call.disclosure,
        &cfg.call.human_target,
        Duration::from_millis(cfg.dialog.webhook_timeout_ms),
        http,
    ))
}

/// Builds each call's dialog and engines from its PBX arguments (`flow=NAME`). Each flow is read
/// and compiled once, on first use (the default flow at once), never again per call.
pub fn parts_factory(cfg: Arc<Config>, engines: Engines) -> crate::pbx::PartsFactory {
    let flows: std::sync::Mutex<HashMap<String, Flow>> = std::sync::Mutex::default();
    let default = cfg.dialog.flow.get_ref().clone();
    if let Ok(f) = load_flow(&cfg, &default) {
        if let Ok(mut m) = flows.lock() {
            m.insert(default, f);
        }
    }
    Arc::new(move |args: &crate::pbx::CallArgs| {
        let name = args
            .flow
            .clone()
            .unwrap_or_else(|| cfg.dialog.flow.get_ref().clone());
        // Only plain names from the dialplan: never a path chosen by whoever controls the dialplan args.
        if name.contains('/') || name.contains("..") || name.ends_with(".toml") {
            return Err(format!("flow `{name}` is not a flow name"));
        }
        let cached = flows.lock().ok().and_then(|m| m.get(&name).cloned());
        let flow = match cached {
            Some(f) => f,
            None => {
                let f = load_flow(&cfg, &name).map_err(|e| e.to_string())?;
                if let Ok(mut m) = flows.lock() {
                    m.insert(name.clone(), f.clone());
                }
                f
            }
        };
        Ok(crate::pbx::CallParts {
            flow_name: name,
            dialog: dialog_for(&cfg, flow, engines.http.clone()),
            asr: engines.asr.clone(),
            tts: engines.tts.clone(),
        })
    })
}

/// Synthesizes a flow's opening so the first call does not wait for it.
pub async fn warm_cache(cfg: &Config, engines: &Engines, flow: &Flow) {
    let Some(cache) = &engines.cache else { return };
    let mut d = ScriptedDialog::new(
        flow.clone(),
        &cfg.call.disclosure,
        &cfg.call.human_target,
        Duration::from_secs(1),
        engines.http.clone(),
    );
    if let Ok(turn) = d.start().await {
        for seg in turn.say {
            if let Err(e) = cache.warm(&seg.text, cfg.call.sample_rate).await {
                tracing::warn!(error = %e, "could not pre-synthesize a prompt");
            }
        }
    }
}

/// One `simulate` run's inputs.
#[derive(Debug, Clone, Default)]
pub struct SimulateArgs {
    pub flow: Option<String>,
    pub callers: Vec<PathBuf>,
    pub caller_at: Vec<(u64, PathBuf)>,
    pub dtmf: Vec<(u64, String)>,
    pub out: Option<PathBuf>,
    pub record: Option<PathBuf>,
    pub print: bool,
    pub no_frames_in_silence: bool,
    pub max_seconds: u64,
}

/// Parses `MS:VALUE`.
pub fn parse_at(s: &str) -> Result<(u64, String), String> {
    let (ms, v) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected MS:VALUE"))?;
    let ms = ms
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("`{s}`: `{ms}` is not milliseconds"))?;
    if v.is_empty() {
        return Err(format!("`{s}`: nothing after the colon"));
    }
    Ok((ms, v.to_string()))
}

/// Runs one simulated call and returns its outcome and what the PBX saw.
pub async fn simulate(
    cfg: Arc<Config>,
    engines: Engines,
    args: SimulateArgs,
) -> Result<(CallOutcome, SimReport), AppError> {
    let rate = cfg.call.sample_rate;
    let flow_name = args
        .flow
        .clone()
        .unwrap_or_else(|| cfg.dialog.flow.get_ref().clone());
    let flow = load_flow(&cfg, &flow_name)?;
    for (_, d) in &args.dtmf {
        if let Some(bad) = d.chars().find(|c| !"0123456789*#ABCD".contains(*c)) {
            return Err(AppError::Usage(format!(
                "--dtmf: `{bad}` is not a DTMF key"
            )));
        }
    }
    let read = |p: &Path| -> Result<Vec<i16>, AppError> {
        let clip = wav::read_file_at(p, rate)?;
        if clip.is_empty() {
            return Err(AppError::Audio(crate::audio::AudioError::Wav {
                path: p.display().to_string(),
                message: "no audio in file".into(),
            }));
        }
        Ok(clip)
    };
    let mut script = Script {
        no_frames_in_silence: args.no_frames_in_silence,
        max_ms: args.max_seconds.max(1) * 1000,
        dtmf: args.dtmf.clone(),
        ..Script::default()
    };
    for p in &args.callers {
        script.turns.push(read(p)?);
    }
    for (t, p) in &args.caller_at {
        script.at.push((*t, read(p)?));
    }
    warm_cache(&cfg, &engines, &flow).await;
    let (rec_tx, writer) = telemetry::spawn_writer(args.record.as_deref(), false, args.print)
        .map_err(|source| AppError::Io {
            path: args
                .record
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            source,
        })?;
    let call_id = format!("sim-{}", std::process::id());
    let recorder = Recorder::to_channel(&call_id, rec_tx);
    let pbx = simulated::start(script, rate);
    let setup = CallSetup {
        call_id,
        flow_name,
        config: cfg.clone(),
        dialog: dialog_for(&cfg, flow, engines.http.clone()),
        asr: engines.asr.clone(),
        tts: engines.tts.clone(),
        link: Box::new(pbx.link),
        control: pbx.control,
        events: pbx.events,
        recorder,
        tick_stats: None,
        origin: Some(pbx.origin),
    };
    let outcome = run_call(setup).await;
    let report = match tokio::time::timeout(Duration::from_secs(5), pbx.done).await {
        Ok(Ok(r)) => r,
        _ => return Err(AppError::Usage("simulated PBX did not finish".into())),
    };
    // The writer ends when the last recorder clone is gone. Waited for on the blocking pool:
    // bounded in real time, and on a paused clock (tests) time stands still meanwhile.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || writer.blocking_recv()),
    )
    .await;
    if let Some(out) = &args.out {
        wav::write_file(out, rate, &report.agent)?;
    }
    Ok((outcome, report))
}
