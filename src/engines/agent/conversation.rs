//! A scripted flow that can hand its call to an LLM agent (`next = "agent:NAME"`) and take it
//! back (the agent's `return_to_flow` tool, to the state's `return_to`). One dialog for the
//! call; a hand-over happens inside one reply, so the caller hears the flow's last words and
//! the agent's first ones without a gap.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Agent, AgentAsk, Outcome, ReplyOut};
use crate::engines::dialog::flow::ScriptedDialog;
use crate::engines::dialog::{Ask, Dialog, DialogError, Heard, Input, ReplySink, Turn};

/// Makes the agent `name` for this call with the flow's slots (`true`: it may hand back).
pub type MakeAgent =
    Arc<dyn Fn(&str, &BTreeMap<String, String>, bool) -> Result<Agent, String> + Send + Sync>;

/// Flows hand over this many times in one reply at most (a flow and an agent handing the call
/// back and forth without the caller is a loop).
const MAX_SWITCHES: usize = 4;

/// A flow with agents behind it.
pub struct Conversation {
    flow: ScriptedDialog,
    agent: Option<Agent>,
    /// Where the flow goes on when the agent hands back.
    return_to: Option<String>,
    make_agent: MakeAgent,
    /// The longest an agent turn may take (the agents this flow may use).
    limit: Duration,
}

impl Conversation {
    pub fn new(flow: ScriptedDialog, make_agent: MakeAgent, limit: Duration) -> Self {
        Self {
            flow,
            agent: None,
            return_to: None,
            make_agent,
            limit,
        }
    }

    /// Says a flow turn's words in the reply (and its end, unless the flow hands over).
    async fn flow_turn(&mut self, turn: Turn, out: &mut ReplyOut<'_>) -> Result<bool, DialogError> {
        for seg in turn.say {
            out.segment(seg).await?;
        }
        match self.flow.take_handover() {
            Some((name, back)) => {
                let mut agent = (self.make_agent)(&name, self.flow.slots(), back.is_some())
                    .map_err(DialogError::Engine)?;
                if self.flow.is_ahead() {
                    // Handed over in a reply made ahead: that agent makes no tool calls either.
                    agent.mark_ahead();
                }
                tracing::info!(agent = %name, "the flow hands the call to an agent");
                out.note("handover", serde_json::json!({"to": format!("agent:{name}"), "slots": self.flow.slots().len()}))
                    .await;
                self.agent = Some(agent);
                self.return_to = back;
                Ok(true)
            }
            None => {
                out.end(turn.send_dtmf, turn.next).await?;
                Ok(false)
            }
        }
    }
}

#[async_trait]
impl Dialog for Conversation {
    async fn start(&mut self) -> Result<Turn, DialogError> {
        self.flow.start().await
    }
    async fn input(&mut self, input: Input) -> Result<Turn, DialogError> {
        self.flow.input(input).await
    }
    fn heard(&mut self, heard: &Heard) {
        match &mut self.agent {
            Some(a) => a.heard(heard),
            None => self.flow.heard(heard),
        }
    }
    fn turn_limit(&self) -> Option<Duration> {
        Some(self.limit)
    }
    fn fork(&self) -> Option<Box<dyn Dialog>> {
        let agent = match &self.agent {
            Some(a) => Some(a.ahead_copy()?),
            None => None,
        };
        Some(Box::new(Conversation {
            flow: self.flow.ahead_copy(),
            agent,
            return_to: self.return_to.clone(),
            make_agent: self.make_agent.clone(),
            limit: self.limit,
        }))
    }
    fn adopted(&mut self) {
        self.flow.confirmed();
        if let Some(a) = self.agent.as_mut() {
            a.confirmed();
        }
    }
    async fn respond(&mut self, ask: Ask, sink: &ReplySink) -> Result<(), DialogError> {
        let mut out = ReplyOut::new(sink, true);
        let mut agent_ask = match (&self.agent, ask) {
            (None, Ask::Start) => {
                let turn = self.flow.start().await?;
                out = ReplyOut::new(sink, turn.barge_in);
                if !self.flow_turn(turn, &mut out).await? {
                    return Ok(());
                }
                AgentAsk::HandedOver {
                    disclosed: self.flow.disclosed(),
                }
            }
            (None, Ask::Input(i)) => {
                let turn = self.flow.input(i).await?;
                out = ReplyOut::new(sink, turn.barge_in);
                if !self.flow_turn(turn, &mut out).await? {
                    return Ok(());
                }
                AgentAsk::HandedOver {
                    disclosed: self.flow.disclosed(),
                }
            }
            (Some(_), Ask::Start) => AgentAsk::Open,
            (Some(_), Ask::Input(i)) => AgentAsk::Input(i),
        };
        for _ in 0..MAX_SWITCHES {
            let Some(agent) = self.agent.as_mut() else {
                break;
            };
            let ask = std::mem::replace(&mut agent_ask, AgentAsk::HandedOver { disclosed: true });
            match agent.turn(ask, &mut out).await? {
                Outcome::Handback => {
                    tracing::info!("the agent hands the call back to the flow");
                    out.note(
                        "handover",
                        serde_json::json!({"to": "flow", "state": self.return_to}),
                    )
                    .await;
                    if let Some(a) = self.agent.as_mut() {
                        // Keys the agent asked for still go out with this reply.
                        let keys = a.pending_dtmf.take();
                        self.agent = None;
                        let mut turn = self.flow.resume(self.return_to.take()).await?;
                        if let Some(k) = keys {
                            let mut all = k;
                            all.push_str(turn.send_dtmf.as_deref().unwrap_or_default());
                            turn.send_dtmf = Some(all);
                        }
                        if !self.flow_turn(turn, &mut out).await? {
                            return Ok(());
                        }
                    }
                }
                outcome => {
                    if let Some(a) = self.agent.as_mut() {
                        return super::finish(a, &mut out, outcome).await;
                    }
                }
            }
        }
        Err(DialogError::Engine(
            "a flow and an agent handed the call back and forth without the caller".into(),
        ))
    }
}
