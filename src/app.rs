//! Wiring shared by the subcommands: engines built from config, a call's dialog from its flow,
//! and `simulate` (one call through the simulated PBX).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engines::endpoint::SmartTurn;
use std::time::Duration;

use crate::audio::wav;
use crate::call::{CallOutcome, CallSetup, run_call};
use crate::config::Config;
use crate::engines::agent::conversation::{Conversation, MakeAgent};
use crate::engines::agent::llm::ChatClient;
use crate::engines::agent::profile::AgentProfile;
use crate::engines::agent::{Agent, AgentDialog, AgentEngines};
use crate::engines::asr::{Asr, OpenAiAsr};
use crate::engines::dialog::flow::{Flow, ScriptedDialog};
use crate::engines::dialog::{Dialog, DialogError};
use crate::engines::tts::Tts;
use crate::engines::tts::cache::CachedTts;
use crate::engines::tts::espeak::Espeak;
use crate::engines::tts::openai::OpenAiTts;
use crate::pbx::CallArgs;
use crate::pbx::simulated::{self, Script, SimEcho, SimReport};
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
    /// The end-of-turn model (None: turns end on silence alone).
    pub turn: Option<Arc<SmartTurn>>,
}

impl Engines {
    pub fn from_config(cfg: &Config) -> Engines {
        let client = crate::engines::http_client();
        let mut asr: Arc<dyn Asr> = Arc::new(OpenAiAsr::new(&cfg.asr, client.clone()));
        if !cfg.asr.stream.url.is_empty() {
            tracing::info!(url = %cfg.asr.stream.url, "streaming ASR; the batch engine at {} is its fallback", cfg.asr.url);
            asr = Arc::new(crate::engines::asr::realtime::RealtimeAsr::new(
                &cfg.asr, asr,
            ));
        }
        let base: Arc<dyn Tts> = match cfg.tts.engine.as_str() {
            "openai" => Arc::new(OpenAiTts::new(&cfg.tts, client.clone())),
            "piper" => Arc::new(crate::engines::tts::piper::Piper::new(&cfg.tts)),
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
            turn: load_turn_model(cfg),
        }
    }
}

/// The end-of-turn model, or silence-only endpointing said once at startup (never a failed
/// start: a call without the model still works, only slower to answer).
fn load_turn_model(cfg: &Config) -> Option<Arc<SmartTurn>> {
    match SmartTurn::from_config(&cfg.turn, |p| cfg.resolve(p)) {
        Ok(Some(m)) => {
            let huge = m.huge_pages();
            tracing::info!(
                model = %cfg.resolve(&cfg.turn.model).display(),
                threads = cfg.turn.threads,
                huge_pages_mib = huge.collapsed >> 20,
                refused_huge_pages_mib = huge.refused >> 20,
                sparse_mib = huge.sparse >> 20,
                "end-of-turn model loaded: turns end at {} ms pauses the model finds complete",
                cfg.turn.pause_ms
            );
            Some(Arc::new(m))
        }
        Ok(None) => {
            tracing::warn!(
                "no end-of-turn model (turn.model, turn.onnxruntime; scripts/test installs \
                 both): turns end after {} ms of silence",
                cfg.vad.end_silence_ms
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "end-of-turn model not loaded: turns end after {} ms of silence",
                cfg.vad.end_silence_ms
            );
            None
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
/// against the allow-list and the agents it hands calls to.
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
    for a in flow.agents() {
        load_agent(cfg, &a).map_err(|e| {
            AppError::Dialog(DialogError::Flow {
                path: path.display().to_string(),
                message: format!("hands calls to agent `{a}`, which does not load: {e}"),
            })
        })?;
    }
    Ok(flow)
}

/// Loads the agent profile `name` (a name in agents_dir or a path), its transfer targets
/// checked against the allow-list.
pub fn load_agent(cfg: &Config, name: &str) -> Result<AgentProfile, AppError> {
    let path = cfg.agent_path(name);
    AgentProfile::load(&path, &|t| cfg.transfers.contains_key(t))
        .map_err(|e| AppError::Usage(e.to_string()))
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

/// Only plain names from the dialplan: never a path chosen by whoever controls its arguments.
fn plain_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains('/') || name.contains("..") || name.ends_with(".toml") {
        return Err(format!("{kind} `{name}` is not a {kind} name"));
    }
    Ok(())
}

/// Makes each call's dialog: a flow (`flow=NAME`), an LLM agent (`agent=NAME`), or a flow that
/// hands calls to agents. Flows and profiles are read and checked once, on first use.
pub struct Dialogs {
    cfg: Arc<Config>,
    http: reqwest::Client,
    agents: AgentEngines,
    flows: std::sync::Mutex<HashMap<String, Flow>>,
    profiles: std::sync::Mutex<HashMap<String, Arc<AgentProfile>>>,
    /// Names may be paths (the command line), not only names (the dialplan).
    paths: bool,
}

impl Dialogs {
    /// For `simulate`: flows and agents may be given by path.
    pub fn for_cli(cfg: Arc<Config>, http: reqwest::Client) -> Arc<Self> {
        let mut d = Self::build(cfg, http);
        d.paths = true;
        Arc::new(d)
    }

    /// For calls from a PBX: plain names only.
    pub fn new(cfg: Arc<Config>, http: reqwest::Client) -> Arc<Self> {
        Arc::new(Self::build(cfg, http))
    }

    fn build(cfg: Arc<Config>, http: reqwest::Client) -> Self {
        let agents = AgentEngines {
            chat: ChatClient::new(crate::engines::agent::llm::client(Duration::from_millis(
                cfg.llm.connect_timeout_ms,
            ))),
            http: http.clone(),
        };
        Self {
            cfg,
            http,
            agents,
            flows: Default::default(),
            profiles: Default::default(),
            paths: false,
        }
    }

    fn flow(&self, name: &str) -> Result<Flow, String> {
        if let Some(f) = self.flows.lock().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(f);
        }
        let f = load_flow(&self.cfg, name).map_err(|e| e.to_string())?;
        if let Ok(mut m) = self.flows.lock() {
            m.insert(name.to_string(), f.clone());
        }
        Ok(f)
    }

    fn profile(&self, name: &str) -> Result<Arc<AgentProfile>, String> {
        if !self.paths {
            plain_name("agent", name)?;
        }
        if let Some(p) = self.profiles.lock().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(p);
        }
        let p = Arc::new(load_agent(&self.cfg, name).map_err(|e| e.to_string())?);
        if let Ok(mut m) = self.profiles.lock() {
            m.insert(name.to_string(), p.clone());
        }
        Ok(p)
    }

    /// An agent for one call.
    pub fn agent(
        self: &Arc<Self>,
        name: &str,
        args: &CallArgs,
        slots: &std::collections::BTreeMap<String, String>,
        can_hand_back: bool,
    ) -> Result<Agent, String> {
        let profile = self.profile(name)?;
        let call_id = args
            .call_id
            .clone()
            .unwrap_or_else(crate::net::random_hex128);
        Ok(Agent::new(
            &self.cfg,
            profile,
            self.agents.clone(),
            &call_id,
            args,
            slots,
            can_hand_back,
        ))
    }

    /// The dialog for a call with these arguments, and its name for records.
    pub fn dialog(self: &Arc<Self>, args: &CallArgs) -> Result<(String, Box<dyn Dialog>), String> {
        let agent = match (&args.agent, &args.flow) {
            (Some(a), _) => Some(a.clone()),
            (None, None) => self.cfg.dialog.agent.clone(),
            (None, Some(_)) => None,
        };
        if let Some(name) = agent {
            let a = self.agent(&name, args, &Default::default(), false)?;
            return Ok((format!("agent:{name}"), Box::new(AgentDialog::new(a))));
        }
        let name = args
            .flow
            .clone()
            .unwrap_or_else(|| self.cfg.dialog.flow.get_ref().clone());
        if !self.paths {
            plain_name("flow", &name)?;
        }
        let flow = self.flow(&name)?;
        let agents = flow.agents();
        let scripted = ScriptedDialog::new(
            flow,
            &self.cfg.call.disclosure,
            &self.cfg.call.human_target,
            Duration::from_millis(self.cfg.dialog.webhook_timeout_ms),
            self.http.clone(),
        );
        if agents.is_empty() {
            return Ok((name, Box::new(scripted)));
        }
        // The longest turn of any agent the flow may hand the call to.
        let mut limit = Duration::from_millis(self.cfg.dialog.timeout_ms);
        for a in &agents {
            limit = limit.max(crate::engines::agent::turn_limit(
                &self.cfg.llm,
                self.profile(a)?.as_ref(),
            ));
        }
        let (me, args2) = (self.clone(), args.clone());
        let make: MakeAgent =
            Arc::new(move |name, slots, back| me.agent(name, &args2, slots, back));
        Ok((name, Box::new(Conversation::new(scripted, make, limit))))
    }
}

/// Builds each call's dialog and engines from its PBX arguments (`flow=NAME`, `agent=NAME`).
/// Each flow and agent profile is read and checked once, on first use (the default flow at
/// once), never again per call.
pub fn parts_factory(cfg: Arc<Config>, engines: Engines) -> crate::pbx::PartsFactory {
    let dialogs = Dialogs::new(cfg.clone(), engines.http.clone());
    let _ = dialogs.flow(cfg.dialog.flow.get_ref());
    Arc::new(move |args: &crate::pbx::CallArgs| {
        let (flow_name, dialog) = dialogs.dialog(args)?;
        Ok(crate::pbx::CallParts {
            flow_name,
            dialog,
            asr: engines.asr.clone(),
            tts: engines.tts.clone(),
            turn: engines.turn.clone(),
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

/// Synthesizes every fixed sentence of every flow and agent profile (and the call's own
/// prompts) into the prompt cache, one at a time, so greetings and reprompts play from the
/// first tick. Returns how many sentences were made.
pub async fn warm_all(cfg: &Config, engines: &Engines) -> usize {
    let Some(cache) = &engines.cache else {
        return 0;
    };
    let mut texts: Vec<String> = vec![cfg.call.disclosure.clone(), cfg.call.error_prompt.clone()];
    texts.extend(cfg.transfers.values().filter_map(|t| t.announce.clone()));
    let files = |dir: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(cfg.resolve(dir))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    for p in files(cfg.dialog.flows_dir.get_ref()) {
        if let Ok(f) = Flow::load(&p) {
            texts.extend(f.fixed_prompts());
        }
    }
    for p in files(&cfg.dialog.agents_dir) {
        if let Ok(a) = load_agent(cfg, &p.display().to_string()) {
            let f = &a.file;
            texts.extend(f.greeting.clone());
            texts.extend(f.disclosure.clone());
            texts.extend(f.keypad_prompt.clone());
        }
    }
    if cfg.dialog.agent.is_some() || !files(&cfg.dialog.agents_dir).is_empty() {
        texts.extend([
            cfg.llm.filler.clone(),
            cfg.llm.fallback_prompt.clone(),
            cfg.llm.escalate_prompt.clone(),
        ]);
    }
    let mut sentences: Vec<String> = texts
        .iter()
        .flat_map(|t| crate::engines::dialog::prompt::segments(t))
        .map(|s| s.text)
        .filter(|t| !t.trim().is_empty())
        .collect();
    sentences.sort();
    sentences.dedup();
    let mut made = 0;
    for s in &sentences {
        match cache.warm(s, cfg.call.sample_rate).await {
            Ok(()) => made += 1,
            Err(e) => tracing::warn!(error = %e, "could not pre-synthesize a prompt"),
        }
    }
    made
}

/// One `simulate` run's inputs.
#[derive(Debug, Clone, Default)]
pub struct SimulateArgs {
    pub flow: Option<String>,
    /// Run this LLM agent instead of a flow.
    pub agent: Option<String>,
    /// The caller's number, as a PBX would give it.
    pub caller_number: Option<String>,
    pub callers: Vec<PathBuf>,
    pub caller_at: Vec<(u64, PathBuf)>,
    pub dtmf: Vec<(u64, String)>,
    pub out: Option<PathBuf>,
    pub record: Option<PathBuf>,
    pub print: bool,
    pub no_frames_in_silence: bool,
    pub max_seconds: u64,
    /// The agent's voice comes back on the caller's line (`--echo DB:MS`).
    pub echo: Option<SimEcho>,
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

/// Parses `--echo DB:MS` (`-10:80`: 10 dB down, 80 ms late).
pub fn parse_echo(s: &str) -> Result<SimEcho, String> {
    s.parse()
}

/// Runs one simulated call and returns its outcome and what the PBX saw.
pub async fn simulate(
    cfg: Arc<Config>,
    engines: Engines,
    args: SimulateArgs,
) -> Result<(CallOutcome, SimReport), AppError> {
    let rate = cfg.call.sample_rate;
    let call_id = format!("sim-{}", std::process::id());
    let call_args = CallArgs {
        flow: args.flow.clone(),
        agent: args.agent.clone(),
        caller: args.caller_number.clone(),
        call_id: Some(call_id.clone()),
        ..CallArgs::default()
    };
    let dialogs = Dialogs::for_cli(cfg.clone(), engines.http.clone());
    let (flow_name, dialog) = dialogs.dialog(&call_args).map_err(AppError::Usage)?;
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
        echo: args.echo,
        ..Script::default()
    };
    for p in &args.callers {
        script.turns.push(read(p)?);
    }
    for (t, p) in &args.caller_at {
        script.at.push((*t, read(p)?));
    }
    if args.agent.is_none()
        && let Ok(flow) = dialogs.flow(&flow_name)
    {
        warm_cache(&cfg, &engines, &flow).await;
    }
    let (rec_tx, writer) = telemetry::spawn_writer(args.record.as_deref(), false, args.print)
        .map_err(|source| AppError::Io {
            path: args
                .record
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            source,
        })?;
    let recorder = Recorder::to_channel(&call_id, rec_tx);
    let pbx = simulated::start(script, rate);
    let setup = CallSetup {
        call_id,
        flow_name,
        config: cfg.clone(),
        dialog,
        asr: engines.asr.clone(),
        tts: engines.tts.clone(),
        turn: engines.turn.clone(),
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
