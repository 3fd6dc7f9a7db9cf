//! Scripted flows: deterministic, offline IVR conversations read from TOML. States speak,
//! ask, collect slots (with entity extraction and confirmation of critical values), match
//! intents by phrases and regexes with a confidence, look records up in a JSON file or over a
//! webhook, retry with progressively clearer reprompts, and escalate to a human.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use super::entities::{self, YesNo};
use super::prompt::{self, Segment};
use super::{
    Dialog, DialogError, DigitSpec, Expectation, Heard, Input, Next, Spoken, Turn, lookup,
};

fn default_retries() -> u32 {
    2
}
fn default_confidence() -> f32 {
    0.5
}
fn default_true() -> bool {
    true
}
fn default_escalate() -> String {
    "Let me connect you with someone who can help.".into()
}
fn default_keypad_offer() -> String {
    "You can also type it on your keypad, then press pound.".into()
}
fn default_not_understood() -> String {
    "Sorry, I didn't catch that.".into()
}

/// A flow file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowFile {
    pub name: Option<String>,
    /// The state the call enters after the greeting.
    pub start: String,
    /// Overrides the configured AI disclosure; empty to omit it.
    pub disclosure: Option<String>,
    /// Spoken after the disclosure.
    pub greeting: Option<String>,
    /// Failed tries per state before escalation.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Intent matches below this are ignored.
    #[serde(default = "default_confidence")]
    pub min_confidence: f32,
    /// Said before transferring when retries run out.
    #[serde(default = "default_escalate")]
    pub escalate_prompt: String,
    /// Transfer target for escalation (default: the configured human target).
    pub escalate_target: Option<String>,
    /// Added to a reprompt when the slot can be typed.
    #[serde(default = "default_keypad_offer")]
    pub keypad_offer: String,
    /// Said before a reprompt.
    #[serde(default = "default_not_understood")]
    pub not_understood: String,
    /// Named JSON files for lookups, relative to the flow file.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    #[serde(default)]
    pub intents: BTreeMap<String, IntentDef>,
    pub states: BTreeMap<String, StateDef>,
}

/// An intent: phrases (whole-word match) and regexes; `transfer` or `hangup` make it global.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IntentDef {
    #[serde(default)]
    pub phrases: Vec<String>,
    #[serde(default)]
    pub regexes: Vec<String>,
    /// Global intent: transfer to this allow-listed target from any state.
    pub transfer: Option<String>,
    /// Global intent: go to this state from any state.
    pub goto: Option<String>,
    /// Said before a global intent acts.
    pub say: Option<String>,
}

/// One state.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StateDef {
    /// Spoken on entry.
    pub say: Option<String>,
    /// A question: spoken after `say`, then the flow listens.
    pub prompt: Option<String>,
    /// Clearer versions of `prompt` for the 1st, 2nd ... retry.
    #[serde(default)]
    pub reprompts: Vec<String>,
    pub collect: Option<Collect>,
    /// Intent name to next state.
    #[serde(default)]
    pub intents: BTreeMap<String, String>,
    pub next: Option<String>,
    pub lookup: Option<LookupDef>,
    /// After a lookup: where to go when the record exists / does not.
    pub found: Option<String>,
    pub missing: Option<String>,
    /// Transfer to this allow-listed target after speaking.
    pub transfer: Option<String>,
    /// Hang up after speaking.
    #[serde(default)]
    pub hangup: bool,
    /// Keys sent to the PBX after this state's speech (0-9 * # A-D, `w`/`W` pauses).
    pub send_dtmf: Option<String>,
    /// Whether the caller may interrupt this state's speech (off for legal disclosures).
    #[serde(default = "default_true")]
    pub barge_in: bool,
    /// When this state hands the call to an LLM agent (`next = "agent:NAME"`), the state the
    /// flow goes on at once the agent hands it back; without it the agent keeps the call.
    pub return_to: Option<String>,
    /// Overrides `vad.pause_on_voice` for this state's speech: false cuts it at the caller's
    /// first words (no resume after a cough or an "mm-hm").
    pub pause_on_voice: Option<bool>,
}

/// A slot to fill in a state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Collect {
    pub slot: String,
    /// digits | amount | date | time | yes_no | text
    pub entity: String,
    pub min_len: Option<usize>,
    pub max_len: Option<usize>,
    /// Ask "Did you say ...?" before accepting.
    #[serde(default)]
    pub confirm: bool,
    pub confirm_prompt: Option<String>,
    /// Passed to the ASR as its prompt.
    pub hint: Option<String>,
}

/// A lookup: `file` names a `[data]` entry or a path; `url` is a webhook template.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupDef {
    pub file: Option<String>,
    pub url: Option<String>,
    /// The record's key in the file (a template such as `{order}`); for `url`, put it in the URL.
    pub key: Option<String>,
    /// Name under which the record is available to templates (`{order_info.status}`).
    #[serde(default = "default_store")]
    pub store: String,
}

fn default_store() -> String {
    "lookup".into()
}

const ENTITIES: [&str; 6] = ["digits", "amount", "date", "time", "yes_no", "text"];

/// A loaded, checked flow.
#[derive(Debug, Clone)]
pub struct Flow {
    pub file: FlowFile,
    pub path: PathBuf,
    regexes: BTreeMap<String, Vec<Regex>>,
}

fn line_of_name(text: &str, name: &str) -> usize {
    let quoted = format!("\"{name}\"");
    let header = format!("[states.{name}]");
    text.lines()
        .position(|l| l.contains(&quoted) || l.trim() == header)
        .map(|i| i + 1)
        .unwrap_or(0)
}

impl Flow {
    /// Reads and checks a flow file: every state it names must exist, every intent must be
    /// defined, regexes must compile and entity types must be known.
    pub fn load(path: &Path) -> Result<Flow, DialogError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| DialogError::Flow {
            path: p.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Checks a flow from text (the path is used for messages and relative data files).
    pub fn parse(path: &Path, text: &str) -> Result<Flow, DialogError> {
        let p = path.display().to_string();
        let file: FlowFile = toml::from_str(text).map_err(|e| {
            let cfg = crate::config::toml_error(path, text, &e);
            DialogError::Flow {
                path: p.clone(),
                message: cfg.to_string().replacen(&format!("{p}:"), "line ", 1),
            }
        })?;
        let err = |name: &str, message: String| DialogError::Flow {
            path: p.clone(),
            message: format!("line {}: {message}", line_of_name(text, name)),
        };
        // A state, or an LLM agent to hand the call to (`agent:NAME`).
        let has = |s: &str| {
            file.states.contains_key(s)
                || s.strip_prefix("agent:").is_some_and(|a| {
                    !a.is_empty()
                        && a.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                })
        };
        if !file.states.contains_key(&file.start) {
            return Err(err(
                &file.start,
                format!("start state `{}` is not defined", file.start),
            ));
        }
        let mut regexes = BTreeMap::new();
        for (name, intent) in &file.intents {
            let mut compiled = Vec::new();
            for r in &intent.regexes {
                let re = Regex::new(&format!("(?i){r}"))
                    .map_err(|e| err(r, format!("intent `{name}`: bad regex: {e}")))?;
                compiled.push(re);
            }
            if intent.phrases.is_empty() && intent.regexes.is_empty() {
                return Err(err(
                    name,
                    format!("intent `{name}` has no phrases or regexes"),
                ));
            }
            if let Some(g) = &intent.goto
                && !has(g)
            {
                return Err(err(
                    g,
                    format!("intent `{name}` goes to unknown state `{g}`"),
                ));
            }
            regexes.insert(name.clone(), compiled);
        }
        for (name, st) in &file.states {
            for (label, target) in [
                ("next", &st.next),
                ("found", &st.found),
                ("missing", &st.missing),
            ] {
                if let Some(t) = target
                    && !has(t)
                {
                    return Err(err(
                        t,
                        format!("state `{name}`: {label} = unknown state `{t}`"),
                    ));
                }
            }
            for (intent, target) in &st.intents {
                if !has(target) {
                    return Err(err(
                        target,
                        format!(
                            "state `{name}`: intent `{intent}` goes to unknown state `{target}`"
                        ),
                    ));
                }
                if !file.intents.contains_key(intent) && intent != "yes" && intent != "no" {
                    return Err(err(
                        intent,
                        format!("state `{name}`: intent `{intent}` is not defined in [intents]"),
                    ));
                }
            }
            if let Some(c) = &st.collect {
                if !ENTITIES.contains(&c.entity.as_str()) {
                    return Err(err(
                        &c.entity,
                        format!(
                            "state `{name}`: unknown entity `{}` (one of {})",
                            c.entity,
                            ENTITIES.join(", ")
                        ),
                    ));
                }
                if st.next.is_none() {
                    return Err(err(
                        name,
                        format!("state `{name}` collects `{}` but has no `next`", c.slot),
                    ));
                }
            }
            if let Some(l) = &st.lookup {
                if l.file.is_some() == l.url.is_some() {
                    return Err(err(
                        name,
                        format!("state `{name}`: lookup needs exactly one of file or url"),
                    ));
                }
                if l.file.is_some() && l.key.is_none() {
                    return Err(err(
                        name,
                        format!("state `{name}`: a file lookup needs a `key`"),
                    ));
                }
                if let Some(f) = &l.file {
                    let path = Self::data_path_in(&file, path, f);
                    if !path.is_file() {
                        return Err(err(
                            f,
                            format!(
                                "state `{name}`: lookup file {} does not exist",
                                path.display()
                            ),
                        ));
                    }
                }
                if st.found.is_none() || st.missing.is_none() {
                    return Err(err(
                        name,
                        format!("state `{name}`: a lookup needs both `found` and `missing`"),
                    ));
                }
            }
            if let Some(r) = &st.return_to
                && !file.states.contains_key(r)
            {
                return Err(err(
                    r,
                    format!("state `{name}`: return_to = unknown state `{r}`"),
                ));
            }
            if let Some(d) = &st.send_dtmf
                && (d.is_empty() || !d.chars().all(|c| "0123456789*#ABCDwW".contains(c)))
            {
                return Err(err(
                    name,
                    format!("state `{name}`: send_dtmf `{d}` has keys that are not DTMF"),
                ));
            }
            let listens = st.prompt.is_some();
            let ends = st.transfer.is_some() || st.hangup;
            let moves = st.next.is_some() || st.lookup.is_some();
            if !listens && !ends && !moves {
                return Err(err(
                    name,
                    format!("state `{name}` neither asks, moves on, transfers nor hangs up"),
                ));
            }
            if listens && st.collect.is_none() && st.intents.is_empty() {
                return Err(err(
                    name,
                    format!("state `{name}` asks a question but has no `collect` or `intents`"),
                ));
            }
        }
        Ok(Flow {
            file,
            path: path.to_path_buf(),
            regexes,
        })
    }

    fn data_path_in(file: &FlowFile, flow_path: &Path, name: &str) -> PathBuf {
        let rel = file.data.get(name).map(String::as_str).unwrap_or(name);
        let base = flow_path.parent().unwrap_or(Path::new("."));
        base.join(rel)
    }

    /// Every fixed text the flow can say (no `{slot}` in it): the greeting, each state's
    /// speech, prompts and reprompts, and the retry and escalation wording; made at start so
    /// they play from the first tick.
    pub fn fixed_prompts(&self) -> Vec<String> {
        let f = &self.file;
        let mut v: Vec<String> = Vec::new();
        v.extend(f.greeting.clone());
        v.extend(f.disclosure.clone());
        for st in f.states.values() {
            v.extend(st.say.clone());
            v.extend(st.prompt.clone());
            v.extend(st.reprompts.iter().cloned());
        }
        for i in f.intents.values() {
            v.extend(i.say.clone());
        }
        v.push(f.escalate_prompt.clone());
        v.push(f.keypad_offer.clone());
        v.push(f.not_understood.clone());
        v.push("Okay, let's try again.".into());
        v.push("Please say yes or no.".into());
        v.retain(|t| !t.contains('{') && !t.trim().is_empty());
        v.sort();
        v.dedup();
        v
    }

    /// Every LLM agent the flow can hand a call to.
    pub fn agents(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .file
            .states
            .values()
            .flat_map(|s| {
                [&s.next, &s.found, &s.missing]
                    .into_iter()
                    .flatten()
                    .chain(s.intents.values())
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .chain(self.file.intents.values().filter_map(|i| i.goto.clone()))
            .filter_map(|t| t.strip_prefix("agent:").map(str::to_string))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Every transfer target the flow can use (to check against the allow-list).
    pub fn transfer_targets(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .file
            .states
            .values()
            .filter_map(|s| s.transfer.clone())
            .collect();
        v.extend(
            self.file
                .intents
                .values()
                .filter_map(|i| i.transfer.clone()),
        );
        v.extend(self.file.escalate_target.clone());
        v.sort();
        v.dedup();
        v
    }

    /// Scores `text` against intent `name` (0 when it does not match).
    pub fn intent_score(&self, name: &str, text: &str) -> f32 {
        if name == "yes" || name == "no" {
            if let Some(def) = self.file.intents.get(name) {
                return score_def(def, self.regexes.get(name), text);
            }
            return match entities::yes_no(text) {
                Some((YesNo::Yes, c)) if name == "yes" => c,
                Some((YesNo::No, c)) if name == "no" => c,
                _ => 0.0,
            };
        }
        match self.file.intents.get(name) {
            Some(def) => score_def(def, self.regexes.get(name), text),
            None => 0.0,
        }
    }
}

fn score_def(def: &IntentDef, regexes: Option<&Vec<Regex>>, text: &str) -> f32 {
    let toks = entities::tokens(text);
    let mut best: f32 = 0.0;
    for phrase in &def.phrases {
        let p = entities::tokens(phrase);
        if p.is_empty() || p.len() > toks.len() {
            continue;
        }
        if toks.windows(p.len()).any(|w| w == p.as_slice()) {
            // A phrase that is most of the utterance is surer than one word in a long sentence.
            let cover = p.len() as f32 / toks.len() as f32;
            best = best.max(0.75 + 0.25 * cover);
        }
    }
    if regexes.is_some_and(|rs| rs.iter().any(|r| r.is_match(text))) {
        best = best.max(0.9);
    }
    best
}

/// Runs a flow for one call.
#[derive(Clone)]
pub struct ScriptedDialog {
    flow: Flow,
    disclosure: String,
    human_target: String,
    state: String,
    retries: u32,
    slots: BTreeMap<String, String>,
    records: BTreeMap<String, Value>,
    pending_confirm: Option<(String, String)>,
    client: reqwest::Client,
    webhook_timeout: Duration,
    last_heard: Option<Heard>,
    pending_dtmf: Option<String>,
    /// The flow reached `agent:NAME`: the agent and the state to return to.
    handover: Option<(String, Option<String>)>,
    /// A copy making a reply ahead: no webhooks.
    ahead: bool,
}

impl ScriptedDialog {
    /// A copy that makes a reply ahead (`Dialog::fork`); it refuses webhook lookups.
    pub fn ahead_copy(&self) -> Self {
        Self {
            ahead: true,
            ..self.clone()
        }
    }

    /// The copy, confirmed: it is the dialog now, webhooks and all.
    pub fn confirmed(&mut self) {
        self.ahead = false;
    }

    /// A copy making a reply ahead.
    pub fn is_ahead(&self) -> bool {
        self.ahead
    }

    pub fn new(
        flow: Flow,
        disclosure: &str,
        human_target: &str,
        webhook_timeout: Duration,
        client: reqwest::Client,
    ) -> Self {
        let disclosure = flow
            .file
            .disclosure
            .clone()
            .unwrap_or_else(|| disclosure.to_string());
        let state = flow.file.start.clone();
        Self {
            flow,
            disclosure,
            human_target: human_target.to_string(),
            state,
            retries: 0,
            slots: BTreeMap::new(),
            records: BTreeMap::new(),
            pending_confirm: None,
            client,
            webhook_timeout,
            last_heard: None,
            pending_dtmf: None,
            handover: None,
            ahead: false,
        }
    }

    /// Slots filled so far (for records and tests).
    pub fn slots(&self) -> &BTreeMap<String, String> {
        &self.slots
    }

    /// Whether the flow's opening plays an AI disclosure.
    pub fn disclosed(&self) -> bool {
        !self.disclosure.trim().is_empty()
    }

    /// The agent the last turn handed the call to (and the state to return to), once.
    pub fn take_handover(&mut self) -> Option<(String, Option<String>)> {
        self.handover.take()
    }

    /// Goes on at `state` (the start when `None`) after an agent handed the call back.
    pub async fn resume(&mut self, state: Option<String>) -> Result<Turn, DialogError> {
        let state = state.unwrap_or_else(|| self.flow.file.start.clone());
        self.enter(&state, Vec::new()).await
    }

    /// What the caller heard of the last reply, as the session reported it.
    pub fn last_heard(&self) -> Option<&Heard> {
        self.last_heard.as_ref()
    }

    fn st(&self) -> &StateDef {
        // States are checked at load; the current one always exists.
        self.flow.file.states.get(&self.state).unwrap_or_else(|| {
            self.flow
                .file
                .states
                .get(&self.flow.file.start)
                .unwrap_or_else(|| unreachable!("start state checked at load"))
        })
    }

    /// Fills `{slot}`, `{slot|digits}`, `{slot|amount}` and `{record.field}`.
    fn render(&self, template: &str) -> String {
        prompt::fill(template, |expr| {
            let (name, filter) = expr.split_once('|').unwrap_or((expr, ""));
            let value = if let Some((rec, field)) = name.split_once('.') {
                self.records
                    .get(rec)
                    .and_then(|r| r.get(field))
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_default()
            } else {
                self.slots.get(name).cloned().unwrap_or_default()
            };
            Some(match filter {
                "digits" => entities::spell_digits(&value),
                "amount" => value.parse().map(entities::say_amount).unwrap_or(value),
                _ => value,
            })
        })
    }

    fn expectation(&self) -> Expectation {
        let pause_on_voice = self.st().pause_on_voice;
        if self.pending_confirm.is_some() {
            return Expectation {
                asr_hint: Some("The caller answers yes or no.".into()),
                digits: Some(DigitSpec {
                    max: 1,
                    terminator: None,
                }),
                pause_on_voice,
                spoken: Some(Spoken::YesNo),
            };
        }
        let st = self.st();
        match &st.collect {
            Some(c) => Expectation {
                asr_hint: c.hint.clone(),
                digits: match c.entity.as_str() {
                    "digits" | "amount" => Some(DigitSpec {
                        max: c.max_len.unwrap_or(20),
                        terminator: Some('#'),
                    }),
                    "yes_no" => Some(DigitSpec {
                        max: 1,
                        terminator: None,
                    }),
                    _ => None,
                },
                pause_on_voice,
                // Keyed as digits, said in words.
                spoken: (c.entity == "amount").then_some(Spoken::Amount),
            },
            None => Expectation {
                asr_hint: None,
                digits: None,
                pause_on_voice,
                spoken: None,
            },
        }
    }

    fn listen(&self, say: Vec<Segment>, barge_in: bool) -> Turn {
        Turn {
            say,
            barge_in,
            send_dtmf: None,
            next: Next::Listen(self.expectation()),
        }
    }

    /// Enters `state` and runs through states that do not listen, gathering what is said.
    async fn enter(&mut self, state: &str, say: Vec<Segment>) -> Result<Turn, DialogError> {
        let mut turn = self.enter_states(state, say).await?;
        turn.send_dtmf = self.pending_dtmf.take();
        Ok(turn)
    }

    async fn enter_states(
        &mut self,
        state: &str,
        mut say: Vec<Segment>,
    ) -> Result<Turn, DialogError> {
        let mut name = state.to_string();
        let mut barge_in = true;
        for _ in 0..64 {
            if let Some(agent) = name.strip_prefix("agent:") {
                // The state that led here says where the agent hands the call back.
                let back = self.st().return_to.clone();
                self.handover = Some((agent.to_string(), back));
                return Ok(Turn {
                    say,
                    barge_in,
                    send_dtmf: None,
                    next: Next::Listen(Expectation::default()),
                });
            }
            self.state = name.clone();
            self.retries = 0;
            self.pending_confirm = None;
            let st = self.st().clone();
            barge_in &= st.barge_in;
            if let Some(s) = &st.say {
                say.extend(prompt::segments(&self.render(s)));
            }
            if let Some(d) = &st.send_dtmf {
                self.pending_dtmf
                    .get_or_insert_with(String::new)
                    .push_str(d);
            }
            if let Some(target) = &st.transfer {
                return Ok(Turn {
                    say,
                    barge_in,
                    send_dtmf: None,
                    next: Next::Transfer {
                        target: target.clone(),
                    },
                });
            }
            if st.hangup {
                return Ok(Turn {
                    say,
                    barge_in,
                    send_dtmf: None,
                    next: Next::Hangup {
                        reason: "normal".into(),
                    },
                });
            }
            if let Some(l) = &st.lookup {
                let found = self.lookup(l).await?;
                name = if found {
                    st.found.clone()
                } else {
                    st.missing.clone()
                }
                .unwrap_or_default();
                continue;
            }
            if let Some(p) = &st.prompt {
                say.extend(prompt::segments(&self.render(p)));
                return Ok(self.listen(say, barge_in));
            }
            match &st.next {
                Some(n) => name = n.clone(),
                None => break,
            }
        }
        Err(DialogError::Engine(format!(
            "flow loops without listening near state `{name}`"
        )))
    }

    async fn lookup(&mut self, l: &LookupDef) -> Result<bool, DialogError> {
        let key = self.render(l.key.as_deref().unwrap_or_default());
        if self.ahead && l.file.is_none() {
            return Err(DialogError::NotAhead("a webhook lookup".into()));
        }
        let record = if let Some(f) = &l.file {
            let path = Flow::data_path_in(&self.flow.file, &self.flow.path, f);
            lookup::from_file(&path, &key).await?
        } else {
            let url = self.render(l.url.as_deref().unwrap_or_default());
            lookup::from_webhook(&self.client, &url, self.webhook_timeout).await?
        };
        match record {
            Some(r) => {
                self.records.insert(l.store.clone(), r);
                Ok(true)
            }
            None => {
                self.records.remove(&l.store);
                Ok(false)
            }
        }
    }

    /// A failed try: reprompt more clearly, or escalate when tries run out.
    fn retry(&mut self, no_input: bool) -> Turn {
        self.retries += 1;
        let st = self.st().clone();
        if self.retries > self.flow.file.max_retries {
            let target = self
                .flow
                .file
                .escalate_target
                .clone()
                .unwrap_or_else(|| self.human_target.clone());
            return Turn {
                say: prompt::segments(&self.flow.file.escalate_prompt),
                barge_in: false,
                send_dtmf: None,
                next: Next::Transfer { target },
            };
        }
        let mut text = String::new();
        if !no_input {
            text.push_str(&self.flow.file.not_understood);
            text.push(' ');
        }
        let idx = (self.retries as usize).saturating_sub(1);
        let base = st
            .reprompts
            .get(idx)
            .or(st.reprompts.last())
            .or(st.prompt.as_ref())
            .cloned()
            .unwrap_or_default();
        if let Some((_, value)) = &self.pending_confirm {
            let c = st.collect.as_ref();
            let confirm = c
                .and_then(|c| c.confirm_prompt.clone())
                .unwrap_or_else(|| "Did you say {value}?".into());
            // Read back the way the first confirmation was (digits one by one, not "55421").
            let shown = c
                .map(|c| Self::shown(c, value))
                .unwrap_or_else(|| value.clone());
            text.push_str(&self.render(&confirm.replace("{value}", &shown)));
            text.push_str(" Please say yes or no.");
        } else {
            text.push_str(&self.render(&base));
            let typed = st
                .collect
                .as_ref()
                .is_some_and(|c| matches!(c.entity.as_str(), "digits" | "amount"));
            if typed && !base.to_lowercase().contains("keypad") {
                text.push(' ');
                text.push_str(&self.flow.file.keypad_offer);
            }
        }
        self.listen(prompt::segments(&text), st.barge_in)
    }

    /// A collected value as it is read back: digits one by one, amounts in words.
    fn shown(c: &Collect, value: &str) -> String {
        match c.entity.as_str() {
            "digits" => entities::spell_digits(value),
            "amount" => value
                .parse()
                .map(entities::say_amount)
                .unwrap_or_else(|_| value.to_string()),
            _ => value.to_string(),
        }
    }

    fn extract(c: &Collect, input: &Input) -> Option<String> {
        let value = match (input, c.entity.as_str()) {
            (Input::Digits(d), "digits") => Some(d.clone()),
            // Keyed whole dollars; an 18-digit entry is no amount (it overflowed `v * 100`).
            (Input::Digits(d), "amount") => d
                .parse::<u64>()
                .ok()
                .and_then(|v| v.checked_mul(100))
                .filter(|c| *c <= entities::MAX_CENTS)
                .map(|c| c.to_string()),
            (Input::Digits(d), "yes_no") => match d.as_str() {
                "1" => Some("yes".into()),
                "2" => Some("no".into()),
                _ => None,
            },
            (Input::Speech(t), "digits") => entities::digits(t),
            (Input::Speech(t), "amount") => entities::amount_cents(t).map(|v| v.to_string()),
            (Input::Speech(t), "date") => entities::date(t),
            (Input::Speech(t), "time") => entities::time_of_day(t),
            (Input::Speech(t), "yes_no") => {
                entities::yes_no(t).map(|(v, _)| if v == YesNo::Yes { "yes" } else { "no" }.into())
            }
            (Input::Speech(t), "text") => Some(t.trim().to_string()).filter(|t| !t.is_empty()),
            _ => None,
        }?;
        let len = value.chars().count();
        if c.entity == "digits"
            && (c.min_len.is_some_and(|m| len < m) || c.max_len.is_some_and(|m| len > m))
        {
            return None;
        }
        Some(value)
    }

    fn global_intent(&self, text: &str) -> Option<(String, IntentDef)> {
        let mut best: Option<(f32, String)> = None;
        for (name, def) in &self.flow.file.intents {
            if def.transfer.is_none() && def.goto.is_none() {
                continue;
            }
            let s = self.flow.intent_score(name, text);
            if s >= self.flow.file.min_confidence && best.as_ref().is_none_or(|b| s > b.0) {
                best = Some((s, name.clone()));
            }
        }
        best.and_then(|(_, n)| self.flow.file.intents.get(&n).map(|d| (n, d.clone())))
    }
}

#[async_trait]
impl Dialog for ScriptedDialog {
    fn fork(&self) -> Option<Box<dyn Dialog>> {
        Some(Box::new(self.ahead_copy()))
    }

    fn adopted(&mut self) {
        self.confirmed();
    }

    async fn start(&mut self) -> Result<Turn, DialogError> {
        let mut say = Vec::new();
        if !self.disclosure.trim().is_empty() {
            say.extend(prompt::segments(&self.disclosure));
        }
        if let Some(g) = self.flow.file.greeting.clone() {
            say.extend(prompt::segments(&self.render(&g)));
        }
        let start = self.flow.file.start.clone();
        self.enter(&start, say).await
    }

    async fn input(&mut self, input: Input) -> Result<Turn, DialogError> {
        if let Input::Speech(t) = &input
            && let Some((_, def)) = self.global_intent(t)
        {
            let say = def.say.as_deref().map(prompt::segments).unwrap_or_default();
            if let Some(target) = def.transfer {
                return Ok(Turn {
                    say,
                    barge_in: false,
                    send_dtmf: None,
                    next: Next::Transfer { target },
                });
            }
            if let Some(g) = def.goto {
                return self.enter(&g, say).await;
            }
        }
        if input == Input::NoInput {
            return Ok(self.retry(true));
        }
        let st = self.st().clone();
        if let Some((slot, value)) = self.pending_confirm.clone() {
            let answer = match &input {
                Input::Speech(t) => entities::yes_no(t).map(|(v, _)| v),
                Input::Digits(d) if d == "1" => Some(YesNo::Yes),
                Input::Digits(d) if d == "2" => Some(YesNo::No),
                _ => None,
            };
            return match answer {
                Some(YesNo::Yes) => {
                    self.slots.insert(slot, value);
                    let next = st.next.clone().unwrap_or_default();
                    self.enter(&next, Vec::new()).await
                }
                Some(YesNo::No) => {
                    self.pending_confirm = None;
                    self.retries += 1;
                    if self.retries > self.flow.file.max_retries {
                        self.retries = self.flow.file.max_retries;
                        return Ok(self.retry(false));
                    }
                    let mut text = String::from("Okay, let's try again. ");
                    let idx = (self.retries as usize).saturating_sub(1);
                    let p = st
                        .reprompts
                        .get(idx)
                        .or(st.prompt.as_ref())
                        .cloned()
                        .unwrap_or_default();
                    text.push_str(&self.render(&p));
                    Ok(self.listen(prompt::segments(&text), st.barge_in))
                }
                None => Ok(self.retry(false)),
            };
        }
        if let Some(c) = &st.collect
            && let Some(value) = Self::extract(c, &input)
        {
            if c.confirm {
                let shown = Self::shown(c, &value);
                let template = c
                    .confirm_prompt
                    .clone()
                    .unwrap_or_else(|| "Did you say {value}?".into());
                let text = self.render(&template.replace("{value}", &shown));
                self.pending_confirm = Some((c.slot.clone(), value));
                self.retries = 0;
                return Ok(self.listen(prompt::segments(&text), st.barge_in));
            }
            self.slots.insert(c.slot.clone(), value);
            let next = st.next.clone().unwrap_or_default();
            return self.enter(&next, Vec::new()).await;
        }
        if let Input::Speech(t) = &input {
            let mut best: Option<(f32, String)> = None;
            for (intent, target) in &st.intents {
                let s = self.flow.intent_score(intent, t);
                if s >= self.flow.file.min_confidence && best.as_ref().is_none_or(|b| s > b.0) {
                    best = Some((s, target.clone()));
                }
            }
            if let Some((_, target)) = best {
                return self.enter(&target, Vec::new()).await;
            }
        }
        if let Input::Digits(d) = &input {
            // "1" and "2" answer yes/no questions on the keypad.
            let intent = match d.as_str() {
                "1" => "yes",
                "2" => "no",
                _ => "",
            };
            if let Some(target) = st.intents.get(intent).cloned() {
                return self.enter(&target, Vec::new()).await;
            }
        }
        Ok(self.retry(false))
    }

    fn heard(&mut self, heard: &Heard) {
        self.last_heard = Some(heard.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/flows")
    }

    fn dialog(name: &str) -> ScriptedDialog {
        let flow = Flow::load(&flows_dir().join(format!("{name}.toml"))).unwrap();
        ScriptedDialog::new(
            flow,
            "You are speaking with an automated assistant.",
            "agent",
            Duration::from_secs(1),
            crate::net::http_client(),
        )
    }

    fn text(t: &Turn) -> String {
        prompt::joined(&t.say)
    }

    async fn say(d: &mut ScriptedDialog, s: &str) -> Turn {
        d.input(Input::Speech(s.into())).await.unwrap()
    }

    #[test]
    fn every_example_flow_loads() {
        for name in [
            "order_status",
            "appointment",
            "payment",
            "support",
            "balance",
        ] {
            let f = Flow::load(&flows_dir().join(format!("{name}.toml"))).unwrap();
            assert_eq!(f.transfer_targets(), vec!["agent".to_string()], "{name}");
        }
    }

    #[test]
    fn parse_errors_name_the_problem_and_line() {
        let p = Path::new("f.toml");
        let e = Flow::parse(p, "start = \"a\"\n[states.a]\nsay = \"x\"\nnext = \"b\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 4") && e.contains("unknown state `b`"),
            "{e}"
        );
        let e = Flow::parse(p, "start = \"zz\"\n[states.a]\nhangup = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("start state `zz`"), "{e}");
        let e = Flow::parse(
            p,
            "start = \"a\"\n[states.a]\nprompt = \"?\"\n[states.a.intents]\nfoo = \"a\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("intent `foo` is not defined"), "{e}");
        let e = Flow::parse(p, "start = \"a\"\n[states.a]\nprompt = \"?\"\ncollect = { slot = \"x\", entity = \"colour\" }\nnext = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown entity `colour`"), "{e}");
        let e = Flow::parse(p, "start = \"a\"\n[states.a]\nsay = \"hi\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither asks, moves on"), "{e}");
        let e = Flow::parse(p, "start = \"a\"\nbogus = 1\n[states.a]\nhangup = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("unknown field `bogus`"),
            "{e}"
        );
        let e = Flow::parse(
            p,
            "start = \"a\"\n[intents.x]\nregexes = [\"(\"]\n[states.a]\nhangup = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad regex"), "{e}");
    }

    #[tokio::test]
    async fn order_status_by_voice_with_misheard_digits() {
        let mut d = dialog("order_status");
        let t = d.start().await.unwrap();
        assert!(text(&t).starts_with(
            "You are speaking with an automated assistant. Thank you for calling ShopEasy."
        ));
        assert!(
            matches!(&t.next, Next::Listen(e) if e.asr_hint.as_deref().is_some_and(|h| h.contains("five digit")))
        );
        let t = say(&mut d, "My order number in time time for two ones.").await;
        assert_eq!(text(&t), "Did you say order 5, 5, 4, 2, 1?");
        let t = say(&mut d, "Yeah.").await;
        assert_eq!(
            text(&t),
            "Order 5, 5, 4, 2, 1 shipped yesterday and will arrive tomorrow. Is there anything else I can help you with?"
        );
        let t = say(&mut d, "No, that's all.").await;
        assert_eq!(text(&t), "Thank you for calling ShopEasy. Goodbye!");
        assert_eq!(
            t.next,
            Next::Hangup {
                reason: "normal".into()
            }
        );
    }

    #[tokio::test]
    async fn a_confirmation_asked_again_reads_digits_the_same_way() {
        let mut d = dialog("order_status");
        d.start().await.unwrap();
        let t = say(&mut d, "five five four two one").await;
        assert_eq!(text(&t), "Did you say order 5, 5, 4, 2, 1?");
        // No answer: the reprompt reads the number back one digit at a time again, not "55421".
        let t = d.input(Input::NoInput).await.unwrap();
        assert!(
            text(&t).contains("Did you say order 5, 5, 4, 2, 1? Please say yes or no."),
            "{}",
            text(&t)
        );
    }

    #[tokio::test]
    async fn wrong_confirmation_retries_and_unknown_order_is_said() {
        let mut d = dialog("order_status");
        d.start().await.unwrap();
        say(&mut d, "one two three four six").await;
        let t = say(&mut d, "no").await;
        assert!(
            text(&t).starts_with("Okay, let's try again."),
            "{}",
            text(&t)
        );
        let t = d.input(Input::Digits("99999".into())).await.unwrap();
        assert_eq!(text(&t), "Did you say order 9, 9, 9, 9, 9?");
        let t = d.input(Input::Digits("1".into())).await.unwrap();
        assert!(
            text(&t).starts_with("I could not find order 9, 9, 9, 9, 9."),
            "{}",
            text(&t)
        );
    }

    #[tokio::test]
    async fn retries_get_clearer_then_escalate() {
        let mut d = dialog("order_status");
        d.start().await.unwrap();
        let t = say(&mut d, "banana").await;
        assert!(
            text(&t)
                .starts_with("Sorry, I didn't catch that. Please say your five digit order number")
        );
        assert!(
            text(&t).contains("keypad"),
            "a failed try offers the keypad: {}",
            text(&t)
        );
        let t = d.input(Input::NoInput).await.unwrap();
        assert!(
            text(&t).starts_with("Please type your five digit order number"),
            "{}",
            text(&t)
        );
        let t = say(&mut d, "banana").await;
        assert_eq!(text(&t), "Let me connect you with someone who can help.");
        assert_eq!(
            t.next,
            Next::Transfer {
                target: "agent".into()
            }
        );
        assert!(!t.barge_in);
    }

    #[tokio::test]
    async fn global_agent_intent_from_any_state() {
        let mut d = dialog("balance");
        d.start().await.unwrap();
        let t = say(&mut d, "can I speak to a real person please").await;
        assert_eq!(
            t.next,
            Next::Transfer {
                target: "agent".into()
            }
        );
        assert_eq!(text(&t), "Connecting you to a banker.");
    }

    #[tokio::test]
    async fn payment_confirms_the_amount_and_disclosure_cannot_be_interrupted() {
        let mut d = dialog("payment");
        d.start().await.unwrap();
        say(&mut d, "one two three four five six").await;
        let t = say(&mut d, "yes").await;
        assert!(
            text(&t).contains("Your balance due is 120 dollars and 50 cents."),
            "{}",
            text(&t)
        );
        // Keyed as digits, said in words: the call ends an amount that names its unit.
        let Next::Listen(exp) = &t.next else {
            panic!("asks the amount: {:?}", t.next)
        };
        assert_eq!(exp.spoken, Some(Spoken::Amount));
        assert!(exp.digits.is_some(), "an amount can be keyed");
        let t = say(
            &mut d,
            "I'd like to pay one hundred twenty dollars and fifty cents",
        )
        .await;
        assert_eq!(
            text(&t),
            "You want to pay 120 dollars and 50 cents. Is that correct?"
        );
        let t = say(&mut d, "yes").await;
        assert!(text(&t).starts_with("Your payment of 120 dollars and 50 cents is scheduled."));
        assert!(!t.barge_in, "legal wording is not interruptible");
        assert_eq!(
            t.next,
            Next::Hangup {
                reason: "normal".into()
            }
        );
    }

    #[tokio::test]
    async fn a_keyed_18_digit_amount_is_not_read_back_wrong() {
        let mut d = dialog("payment");
        d.start().await.unwrap();
        say(&mut d, "one two three four five six").await;
        say(&mut d, "yes").await;
        // 18 keyed digits overflowed `v * 100` (a wrong amount in release builds).
        let t = d
            .input(Input::Digits("999999999999999999".into()))
            .await
            .unwrap();
        assert!(
            !text(&t).contains("You want to pay"),
            "an impossible amount is not confirmed: {}",
            text(&t)
        );
        let t = d.input(Input::Digits("120".into())).await.unwrap();
        assert_eq!(text(&t), "You want to pay 120 dollars. Is that correct?");
    }

    #[tokio::test]
    async fn appointment_and_support_flows() {
        let mut d = dialog("appointment");
        d.start().await.unwrap();
        let t = say(&mut d, "Doctor Smith please").await;
        assert!(text(&t).contains("Thursday at 10 AM"), "{}", text(&t));
        let t = say(&mut d, "Thursday works").await;
        assert_eq!(
            text(&t),
            "To confirm, Doctor Smith on Thursday. Shall I book it?"
        );
        let t = say(&mut d, "yes please").await;
        assert!(text(&t).starts_with("You are booked with Doctor Smith on Thursday."));
        assert_eq!(
            t.say.first().map(|s| s.pause_after_ms),
            Some(300),
            "SSML-like pause"
        );

        let mut d = dialog("support");
        d.start().await.unwrap();
        let t = say(&mut d, "my internet is not working").await;
        assert!(text(&t).contains("unplug your router"));
        let t = say(&mut d, "no it's still down").await;
        assert_eq!(
            t.next,
            Next::Transfer {
                target: "agent".into()
            }
        );
    }

    #[tokio::test]
    async fn a_state_chooses_whether_the_callers_voice_pauses_its_question() {
        let flow = Flow::parse(
            Path::new("p.toml"),
            "start = \"pin\"\n[states.pin]\nprompt = \"Your PIN?\"\ncollect = { slot = \"pin\", entity = \"digits\" }\nnext = \"done\"\npause_on_voice = false\n[states.done]\nsay = \"Thanks.\"\nhangup = true\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut d = ScriptedDialog::new(
            flow,
            "",
            "agent",
            Duration::from_secs(1),
            crate::net::http_client(),
        );
        let t = d.start().await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(t.next, Next::Listen(e) if e.pause_on_voice == Some(false)));
    }

    #[tokio::test]
    async fn webhook_lookup_with_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let reply: &[u8] = if req.starts_with("GET /orders/55421 ") {
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n{\"status\":\"is on way\"}"
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(reply).await;
            }
        });
        let src = format!(
            "start = \"ask\"\n[states.ask]\nprompt = \"Order?\"\ncollect = {{ slot = \"o\", entity = \"digits\" }}\nnext = \"look\"\n\
             [states.look]\nlookup = {{ url = \"http://127.0.0.1:{port}/orders/{{o}}\" }}\nfound = \"ok\"\nmissing = \"nope\"\n\
             [states.ok]\nsay = \"It {{lookup.status}}.\"\nhangup = true\n[states.nope]\nsay = \"Unknown.\"\nhangup = true\n"
        );
        let flow = Flow::parse(Path::new("w.toml"), &src).unwrap();
        let mut d = ScriptedDialog::new(
            flow.clone(),
            "",
            "agent",
            Duration::from_secs(2),
            crate::net::http_client(),
        );
        d.start().await.unwrap();
        let t = d.input(Input::Digits("55421".into())).await.unwrap();
        assert_eq!(text(&t), "It is on way.");
        let mut d = ScriptedDialog::new(
            flow,
            "",
            "agent",
            Duration::from_secs(2),
            crate::net::http_client(),
        );
        d.start().await.unwrap();
        let t = d.input(Input::Digits("1".into())).await.unwrap();
        assert_eq!(text(&t), "Unknown.");
    }
}
