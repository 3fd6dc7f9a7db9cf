//! PBX adapters: each turns one PBX's media and control protocols into the call engine's
//! `MediaLink` and `CallControl`, under the PBX-neutral `supervisor`. `Adapter` is what `serve`
//! runs; `adapter()` picks the configured one. The simulated PBX needs no PBX; Asterisk (and
//! FreeSWITCH next) live beside it.

pub mod asterisk;
pub mod clock;
pub mod codec;
pub mod events;
pub mod freeswitch;
pub mod paced;
pub mod queue_link;
pub mod simulated;
pub mod supervisor;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use supervisor::{Health, Limits, Supervisor};

/// Why an adapter could not run.
#[derive(Debug, thiserror::Error)]
pub enum PbxError {
    #[error(transparent)]
    Asterisk(#[from] asterisk::app::AsteriskError),
    #[error(transparent)]
    FreeSwitch(#[from] freeswitch::FreeSwitchError),
}

/// One PBX's adapter: takes calls from its control plane until `stop`, then drains them
/// through the supervisor and returns.
#[async_trait]
pub trait Adapter: Send + Sync {
    /// The PBX's name, for `/health` and logs.
    fn name(&self) -> &'static str;
    /// One line for the start-up banner: the PBX and where sidecall reaches it.
    fn describe(&self) -> String;
    async fn run(
        &self,
        sup: Arc<Supervisor>,
        parts: PartsFactory,
        records: Option<mpsc::Sender<serde_json::Value>>,
        stop: CancellationToken,
    ) -> Result<(), PbxError>;
}

/// The adapter the config enables, if any.
pub fn adapter(cfg: &Arc<Config>) -> Option<Box<dyn Adapter>> {
    if cfg.freeswitch.enabled {
        return Some(Box::new(freeswitch::FreeSwitch::new(cfg.clone())));
    }
    cfg.asterisk
        .enabled
        .then(|| Box::new(asterisk::app::Asterisk::new(cfg.clone())) as Box<dyn Adapter>)
}

/// A supervisor for `cfg`'s PBX, with the health state `/health` and `/ready` read.
pub fn supervisor(cfg: &Config, health: Health) -> Arc<Supervisor> {
    let (max_calls, grace_s) = if cfg.freeswitch.enabled {
        (cfg.freeswitch.max_calls, cfg.freeswitch.shutdown_grace_s)
    } else {
        (cfg.asterisk.max_calls, cfg.asterisk.shutdown_grace_s)
    };
    Supervisor::new(
        Limits {
            max_calls,
            grace: Duration::from_secs(grace_s),
            after_grace: Duration::from_secs(10),
        },
        Arc::new(health),
    )
}

use crate::engines::asr::Asr;
use crate::engines::dialog::Dialog;
use crate::engines::tts::Tts;

/// What a call needs besides its media and control: chosen per call from the PBX's arguments
/// (e.g. `Stasis(sidecall,flow=order_status)`).
pub struct CallParts {
    pub flow_name: String,
    pub dialog: Box<dyn Dialog>,
    pub asr: Arc<dyn Asr>,
    pub tts: Arc<dyn Tts>,
    pub turn: Option<Arc<crate::engines::endpoint::SmartTurn>>,
}

impl CallParts {
    /// The setup of a call from a PBX: these parts on this media and control, on the call's
    /// own clock.
    pub fn into_setup(
        self,
        call_id: String,
        config: Arc<crate::config::Config>,
        link: Box<dyn crate::call::MediaLink>,
        control: Arc<dyn crate::call::CallControl>,
        events: tokio::sync::mpsc::Receiver<crate::call::MediaEvent>,
        recorder: crate::telemetry::Recorder,
    ) -> crate::call::CallSetup {
        crate::call::CallSetup {
            call_id,
            flow_name: self.flow_name,
            config,
            dialog: self.dialog,
            asr: self.asr,
            tts: self.tts,
            turn: self.turn,
            link,
            control,
            events,
            recorder,
            tick_stats: None,
            origin: None,
        }
    }
}

/// Builds a call's parts from its arguments (`flow=NAME`, `lang=xx`); an error names what is wrong.
pub type PartsFactory = Arc<dyn Fn(&CallArgs) -> Result<CallParts, String> + Send + Sync>;

/// Arguments a dialplan passes to sidecall, and what the PBX says of the caller.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallArgs {
    pub flow: Option<String>,
    /// An LLM agent profile to run instead of a flow (`agent=support`).
    pub agent: Option<String>,
    pub lang: Option<String>,
    /// The caller's number as the PBX has it.
    pub caller: Option<String>,
    /// The PBX's id of the call (the channel).
    pub call_id: Option<String>,
    /// Every `key=value` argument, for the agent's prompt (`{args.key}`).
    pub vars: std::collections::BTreeMap<String, String>,
}

impl CallArgs {
    /// Parses `flow=order_status`, `lang=en` (also a bare first argument as the flow, and
    /// comma-joined pairs in one argument).
    pub fn parse(args: &[String]) -> Self {
        let mut out = CallArgs::default();
        for (i, a) in args
            .iter()
            .flat_map(|a| a.split(','))
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .enumerate()
        {
            match a.split_once('=') {
                Some((k, v)) => out.set(k.trim(), v.trim()),
                None if i == 0 => out.flow = Some(a.to_string()),
                None => {}
            }
        }
        out
    }

    /// One `key=value` argument.
    pub fn set(&mut self, key: &str, value: &str) {
        match key {
            "flow" => self.flow = Some(value.to_string()),
            "agent" => self.agent = Some(value.to_string()),
            "lang" => self.lang = Some(value.to_string()),
            _ => {}
        }
        // Bounded: a dialplan cannot grow a prompt without limit.
        if self.vars.len() < 32 && key.len() <= 64 && value.len() <= 256 {
            self.vars.insert(key.to_string(), value.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_args() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            CallArgs::parse(&s(&["flow=order_status", "lang=en"])),
            CallArgs {
                flow: Some("order_status".into()),
                lang: Some("en".into()),
                vars: [("flow", "order_status"), ("lang", "en")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..CallArgs::default()
            }
        );
        let a = CallArgs::parse(&s(&["agent=support,account=77"]));
        assert_eq!(a.agent.as_deref(), Some("support"));
        assert_eq!(a.flow, None);
        assert_eq!(a.vars.get("account").map(String::as_str), Some("77"));
        assert_eq!(
            CallArgs::parse(&s(&["flow=payment,lang=en"]))
                .flow
                .as_deref(),
            Some("payment")
        );
        assert_eq!(
            CallArgs::parse(&s(&["balance"])).flow.as_deref(),
            Some("balance")
        );
        assert_eq!(CallArgs::parse(&[]), CallArgs::default());
    }
}
