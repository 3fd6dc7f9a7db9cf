//! An agent profile as an operator writes it (`agents_dir/NAME.toml`): the system prompt, the
//! transfer targets the model may use (each described by purpose, each in the config's
//! allow-list), HTTP webhook tools with JSON-schema parameters, and model overrides. Checked
//! at load so a bad profile fails `check`, not a call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::AgentError;

/// Names the model may not give a webhook tool: the built-ins.
pub const BUILTIN_TOOLS: [&str; 5] = [
    "transfer_call",
    "end_call",
    "send_dtmf",
    "collect_digits",
    "return_to_flow",
];

fn default_method() -> String {
    "POST".into()
}
fn default_retries() -> u32 {
    1
}
fn default_tool_timeout() -> u64 {
    4_000
}
fn default_schema() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

/// A profile file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub name: Option<String>,
    /// The model's instructions. `{caller_number}`, `{call_id}`, `{date}`, `{time}`,
    /// `{weekday}`, `{args.KEY}` (dialplan arguments), `{slots.KEY}` and `{slots}` (values a
    /// flow collected before handing over) are filled per call.
    pub system_prompt: String,
    /// Said (without the model) after the disclosure when the call opens with the agent; without
    /// it the model writes the opening.
    pub greeting: Option<String>,
    /// Overrides the configured AI disclosure; empty to omit it.
    pub disclosure: Option<String>,
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Said with the keypad prompt of `collect_digits` when the model gives none.
    pub keypad_prompt: Option<String>,
    /// Overrides `vad.pause_on_voice` for this agent's replies.
    pub pause_on_voice: Option<bool>,
    /// Where the model may transfer the caller: names from the config's `[transfers]`.
    #[serde(default)]
    pub transfers: BTreeMap<String, TransferUse>,
    #[serde(default)]
    pub tools: BTreeMap<String, WebhookTool>,
}

/// An allow-listed transfer target as the model sees it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferUse {
    /// What the target is for ("billing: invoices, refunds, failed payments").
    pub description: String,
}

/// An HTTP webhook the model may call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTool {
    pub description: String,
    /// `{arg}` in the URL is filled (percent-encoded) from the call's arguments.
    pub url: String,
    /// GET and DELETE send the arguments as the query; POST, PUT and PATCH as a JSON body.
    #[serde(default = "default_method")]
    pub method: String,
    /// JSON schema of the arguments (an object schema).
    #[serde(default = "default_schema")]
    pub parameters: Value,
    /// Header name to value, sent as is.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Header name to the environment variable holding its value (tokens).
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    #[serde(default = "default_tool_timeout")]
    pub timeout_ms: u64,
    /// Tries after the first on a connection error, a timeout, 429 or 5xx; every try carries
    /// the same `Idempotency-Key`.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Argument names whose values never reach logs or records.
    #[serde(default)]
    pub sensitive: Vec<String>,
    /// Money or account state: runs only after the caller says yes to a read-back.
    #[serde(default)]
    pub confirm: bool,
    /// The read-back, `{arg}` filled from the arguments (default: the tool's description and
    /// arguments).
    pub confirm_prompt: Option<String>,
}

/// A loaded, checked profile.
#[derive(Debug, Clone)]
pub struct AgentProfile {
    pub name: String,
    pub path: PathBuf,
    pub file: AgentFile,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl AgentProfile {
    /// Reads and checks a profile; `allowed` is the config's transfer allow-list.
    pub fn load(path: &Path, allowed: &dyn Fn(&str) -> bool) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::Profile {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text, allowed)
    }

    pub fn parse(
        path: &Path,
        text: &str,
        allowed: &dyn Fn(&str) -> bool,
    ) -> Result<Self, AgentError> {
        let bad = |message: String| AgentError::Profile {
            path: path.display().to_string(),
            message,
        };
        let file: AgentFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if file.system_prompt.trim().is_empty() {
            return Err(bad("system_prompt is empty".into()));
        }
        if let Some(t) = file.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(bad("temperature must be 0.0..2.0".into()));
        }
        for name in file.transfers.keys() {
            if !allowed(name) {
                return Err(bad(format!(
                    "transfer target `{name}` is not in the config's [transfers] allow-list"
                )));
            }
        }
        for (name, t) in &file.tools {
            let tool = |m: &str| bad(format!("tool `{name}`: {m}"));
            if !valid_name(name) {
                return Err(tool("names are 1-64 of a-z A-Z 0-9 _ -"));
            }
            if BUILTIN_TOOLS.contains(&name.as_str()) {
                return Err(tool("is a built-in tool's name"));
            }
            if !(t.url.starts_with("http://") || t.url.starts_with("https://")) {
                return Err(tool("url must be http(s)"));
            }
            if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&t.method.as_str()) {
                return Err(tool("method must be GET, POST, PUT, PATCH or DELETE"));
            }
            if t.parameters.get("type").and_then(Value::as_str) != Some("object") {
                return Err(tool("parameters must be a JSON schema of type \"object\""));
            }
            if let Some(p) = &t.confirm_prompt
                && let Some(s) = t.sensitive.iter().find(|s| p.contains(&format!("{{{s}}}")))
            {
                return Err(tool(&format!(
                    "confirm_prompt reads out `{s}`, which is sensitive (it would be spoken and recorded)"
                )));
            }
            if t.timeout_ms == 0 || t.timeout_ms > 60_000 || t.retries > 5 {
                return Err(tool("timeout_ms must be 1..60000 and retries at most 5"));
            }
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "agent".into());
        Ok(Self {
            name: file.name.clone().unwrap_or(name),
            path: path.to_path_buf(),
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentProfile, AgentError> {
        AgentProfile::parse(Path::new("a.toml"), text, &|t| t == "billing")
    }

    #[test]
    fn profiles_are_checked_at_load() {
        let ok = parse(
            "system_prompt = \"x\"\n[transfers.billing]\ndescription = \"b\"\n[tools.look]\ndescription = \"d\"\nurl = \"http://h/x\"\n",
        )
        .map(|p| p.file.tools["look"].method.clone());
        assert_eq!(ok.ok().as_deref(), Some("POST"));
        for (text, needle) in [
            ("system_prompt = \"\"", "empty"),
            (
                "system_prompt = \"x\"\n[transfers.sales]\ndescription = \"s\"",
                "allow-list",
            ),
            (
                "system_prompt = \"x\"\n[tools.end_call]\ndescription = \"d\"\nurl = \"http://h\"",
                "built-in",
            ),
            (
                "system_prompt = \"x\"\n[tools.t]\ndescription = \"d\"\nurl = \"ftp://h\"",
                "http",
            ),
            (
                "system_prompt = \"x\"\n[tools.t]\ndescription = \"d\"\nurl = \"http://h\"\nparameters = { type = \"string\" }",
                "object",
            ),
            ("system_prompt = \"x\"\nunknown = 1", "unknown"),
        ] {
            let e = parse(text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
