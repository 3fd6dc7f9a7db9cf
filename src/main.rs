//! The `sidecall` command line: serve, simulate, check, bench.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sidecall::app::{self, Engines, SimulateArgs};
use sidecall::config::Overrides;

#[derive(Parser)]
#[command(
    name = "sidecall",
    version,
    about = "Turns a PBX dialplan context into a real-time voice agent"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log more (-v info, -vv debug); logs go to stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Args, Clone)]
struct Common {
    /// The TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// ASR base URL (OpenAI-compatible, up to /v1).
    #[arg(long, env = "SIDECALL_ASR_URL")]
    asr_url: Option<String>,
    /// TTS base URL (OpenAI-compatible, up to /v1).
    #[arg(long, env = "SIDECALL_TTS_URL")]
    tts_url: Option<String>,
    /// LLM base URL (OpenAI-compatible, up to /v1).
    #[arg(long, env = "SIDECALL_LLM_URL")]
    llm_url: Option<String>,
    /// TTS engine: espeak, piper or openai.
    #[arg(long, env = "SIDECALL_TTS_ENGINE")]
    tts_engine: Option<String>,
    /// The Smart Turn ONNX file for early endpointing (`turn.model`).
    #[arg(long, env = "SIDECALL_TURN_MODEL")]
    turn_model: Option<String>,
    /// ONNX Runtime's libonnxruntime.so (`turn.onnxruntime`).
    #[arg(long, env = "SIDECALL_ONNXRUNTIME")]
    onnxruntime: Option<String>,
    /// The Piper voice's .onnx file (`tts.piper.voice`).
    #[arg(long, env = "SIDECALL_PIPER_VOICE")]
    piper_voice: Option<String>,
    /// A Python with piper-tts installed (`tts.piper.python`).
    #[arg(long, env = "SIDECALL_PIPER_PYTHON")]
    piper_python: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run beside the PBX: admin listener with /metrics and /health.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Admin listener HOST:PORT.
        #[arg(long)]
        admin_listen: Option<String>,
    },
    /// One call through a simulated PBX, from WAV files.
    Simulate {
        #[command(flatten)]
        common: Common,
        /// Flow to run (name in flows_dir or path); default from config.
        #[arg(long, conflicts_with = "agent")]
        flow: Option<String>,
        /// LLM agent profile to run instead of a flow (name in agents_dir or path).
        #[arg(long)]
        agent: Option<String>,
        /// The caller's number, as a PBX would give it (the agent's `{caller_number}`).
        #[arg(long)]
        caller_number: Option<String>,
        /// Caller speech, one file per turn, each 700 ms after the agent stops.
        #[arg(long)]
        caller: Vec<PathBuf>,
        /// MS:FILE: caller speech starting at an absolute time.
        #[arg(long = "caller-at", value_parser = app::parse_at)]
        caller_at: Vec<(u64, String)>,
        /// MS:DIGITS: keys pressed from an absolute time.
        #[arg(long, value_parser = app::parse_at)]
        dtmf: Vec<(u64, String)>,
        /// Write the agent's audio on the call's timeline here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write the call record (JSON lines) here.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Send no frames while the caller is silent, like a real Asterisk bridge.
        #[arg(long)]
        no_frames_in_silence: bool,
        /// DB:MS: the agent's voice comes back on the caller's line this much quieter (dB,
        /// negative) and this late (ms), as line echo or a speakerphone does (`--echo=-10:80`).
        #[arg(long, value_name = "DB:MS", allow_hyphen_values = true, value_parser = app::parse_echo)]
        echo: Option<sidecall::pbx::simulated::SimEcho>,
        /// The simulated caller hangs up after this many seconds.
        #[arg(long, default_value_t = 180)]
        max_seconds: u64,
        /// Do not print the conversation.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Validate a configuration file and the flows it names.
    Check {
        #[command(flatten)]
        common: Common,
    },
    /// N concurrent simulated calls with instant engines; prints CPU, timing and memory figures.
    Bench(sidecall::bench::BenchArgs),
}

fn overrides(c: &Common) -> Overrides {
    Overrides {
        asr_url: c.asr_url.clone(),
        tts_url: c.tts_url.clone(),
        llm_url: c.llm_url.clone(),
        tts_engine: c.tts_engine.clone(),
        turn_model: c.turn_model.clone(),
        onnxruntime: c.onnxruntime.clone(),
        piper_voice: c.piper_voice.clone(),
        piper_python: c.piper_python.clone(),
        ..Overrides::default()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info,sidecall=info",
        _ => "debug,hyper=info,reqwest=info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIDECALL_LOG")
        .unwrap_or_else(|_| level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidecall: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sidecall: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Check { common } => {
            let cfg = app::load_config(&common.config, &overrides(&common))?;
            let mut flows = Vec::new();
            let dir = cfg.resolve(cfg.dialog.flows_dir.get_ref());
            let mut entries: Vec<_> = std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            entries.sort();
            for p in entries {
                app::load_flow(&cfg, &p.display().to_string())?;
                flows.push(
                    p.file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or_default(),
                );
            }
            // Agent profiles too, when their folder exists.
            let mut agents = Vec::new();
            let dir = cfg.resolve(&cfg.dialog.agents_dir);
            if let Ok(read) = std::fs::read_dir(&dir) {
                let mut entries: Vec<_> = read
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                    .collect();
                entries.sort();
                for p in entries {
                    app::load_agent(&cfg, &p.display().to_string())?;
                    agents.push(
                        p.file_stem()
                            .map(|s| s.to_string_lossy().to_string())
                            .unwrap_or_default(),
                    );
                }
            }
            if let Some(a) = &cfg.dialog.agent {
                app::load_agent(&cfg, a).context("dialog.agent")?;
            }
            println!(
                "{}: OK ({} flows: {}; {} agents: {})",
                common.config.display(),
                flows.len(),
                flows.join(", "),
                agents.len(),
                agents.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Simulate {
            common,
            flow,
            agent,
            caller_number,
            caller,
            caller_at,
            dtmf,
            out,
            record,
            no_frames_in_silence,
            echo,
            max_seconds,
            quiet,
        } => {
            let cfg = Arc::new(app::load_config(&common.config, &overrides(&common))?);
            let engines = Engines::from_config(&cfg);
            let args = SimulateArgs {
                flow,
                agent,
                caller_number,
                callers: caller,
                caller_at: caller_at
                    .into_iter()
                    .map(|(t, p)| (t, PathBuf::from(p)))
                    .collect(),
                dtmf,
                out,
                record,
                print: !quiet,
                no_frames_in_silence,
                max_seconds,
                echo,
            };
            let rate = cfg.call.sample_rate as f64;
            let (outcome, report) = app::simulate(cfg, engines, args).await?;
            if !quiet {
                println!(
                    "call ended: {} ({} marks played, {} flushes, {:.1} s of audio)",
                    outcome.label(),
                    report.marks,
                    report.flushes,
                    report.agent.len() as f64 / rate
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve {
            common,
            admin_listen,
        } => {
            let mut o = overrides(&common);
            o.admin_listen = admin_listen;
            let cfg = Arc::new(app::load_config(&common.config, &o)?);
            let handle = sidecall::admin::install_recorder().map_err(anyhow::Error::msg)?;
            let addr: std::net::SocketAddr = cfg.admin.listen.parse().context("admin.listen")?;
            let listener = sidecall::admin::bind(addr)
                .await
                .with_context(|| format!("admin listener {addr}"))?;
            let engines = Engines::from_config(&cfg);
            let adapter = sidecall::pbx::adapter(&cfg);
            let sup = sidecall::pbx::supervisor(
                &cfg,
                sidecall::pbx::supervisor::Health {
                    pbx: adapter
                        .as_ref()
                        .map(|a| a.name().to_string())
                        .unwrap_or_default(),
                    asr: engines.asr.load(),
                    ..Default::default()
                },
            );
            // The admin listener answers at once, before the prompt cache is warm.
            let admin = tokio::spawn(sidecall::admin::serve(
                listener,
                handle,
                sup.health().clone(),
            ));
            let flow = app::load_flow(&cfg, cfg.dialog.flow.get_ref())?;
            app::warm_cache(&cfg, &engines, &flow).await;
            // Every other fixed prompt, in the background: calls start meanwhile.
            {
                let (cfg, engines) = (cfg.clone(), engines.clone());
                tokio::spawn(async move {
                    let t0 = std::time::Instant::now();
                    let made = app::warm_all(&cfg, &engines).await;
                    tracing::info!(
                        sentences = made,
                        ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "every fixed prompt is in the prompt cache"
                    );
                });
            }
            let stop = tokio_util::sync::CancellationToken::new();
            let records = if cfg.admin.records_dir.is_empty() {
                None
            } else {
                let dir = cfg.resolve(&cfg.admin.records_dir);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("records_dir {}", dir.display()))?;
                let (tx, _writer) =
                    sidecall::telemetry::spawn_writer(Some(&dir.join("calls.jsonl")), true, false)?;
                Some(tx)
            };
            let has_pbx = adapter.is_some();
            let pbx = match adapter {
                Some(adapter) => {
                    let parts = app::parts_factory(cfg.clone(), engines.clone());
                    eprintln!(
                        "sidecall: serving {}; admin on http://{addr}",
                        adapter.describe()
                    );
                    let (sup, stop) = (sup.clone(), stop.clone());
                    Some(tokio::spawn(async move {
                        adapter.run(sup, parts, records, stop).await
                    }))
                }
                None => {
                    eprintln!(
                        "sidecall: serving; admin on http://{addr} (no PBX enabled: set [asterisk] or [freeswitch] enabled = true)"
                    );
                    None
                }
            };
            let pbx_done = async move {
                match pbx {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(pbx_done);
            tokio::select! {
                r = admin => { r.context("admin task")?.context("admin listener")?; }
                r = &mut pbx_done => { r.context("PBX task")??; }
                _ = shutdown_signal() => {
                    eprintln!("sidecall: shutting down (no new calls; active calls get the grace period)");
                    stop.cancel();
                    if has_pbx {
                        pbx_done.await.context("PBX task")??;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(args) => {
            sidecall::bench::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
