//! Assembles the chunks of an OpenAI-compatible streamed chat completion (`stream: true`):
//! content deltas pass through as they come; tool calls arrive as deltas (an index, the id and
//! name once, the arguments' JSON split anywhere across chunks, several tools in one reply) and
//! are put together here, the arguments parsed only when the reply is complete. Written for the
//! shapes OpenAI, vLLM, llama.cpp's server, Ollama and Groq send (a missing `index` is the
//! position in the list; a name or id sent again is not doubled).

use std::collections::BTreeMap;

use serde_json::Value;

/// A tool call the model made, complete.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments, parsed.
    pub arguments: Value,
}

/// Why a streamed reply could not be put together.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AssembleError {
    #[error("chunk is not a chat completion chunk: {0}")]
    NotAChunk(String),
    #[error("tool call {index} has no name")]
    NoName { index: usize },
    #[error("tool call `{name}` has arguments that are not JSON: {message}")]
    BadArguments { name: String, message: String },
}

/// What one chunk brought.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    /// Text to say, as it came.
    pub content: Option<String>,
    /// The reply is complete (`stop`, `tool_calls`, `length`, ...).
    pub finish_reason: Option<String>,
    /// Token usage (the last chunk, when asked for).
    pub usage: Option<Value>,
}

#[derive(Debug, Default)]
struct Partial {
    id: String,
    name: String,
    arguments: String,
}

/// Puts one streamed reply together.
#[derive(Debug, Default)]
pub struct ChatStream {
    calls: BTreeMap<usize, Partial>,
    fragments: usize,
}

impl ChatStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// One `data:` payload of the stream (not `[DONE]`).
    pub fn push(&mut self, data: &str) -> Result<Delta, AssembleError> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| AssembleError::NotAChunk(format!("{e}: {}", clip(data))))?;
        if !v.is_object() {
            return Err(AssembleError::NotAChunk(clip(data)));
        }
        let mut out = Delta {
            usage: v.get("usage").filter(|u| !u.is_null()).cloned(),
            ..Delta::default()
        };
        // Only the first choice is used (sidecall never asks for more).
        let Some(choice) = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return Ok(out);
        };
        out.finish_reason = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string);
        let Some(delta) = choice.get("delta") else {
            return Ok(out);
        };
        out.content = delta
            .get("content")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .map(str::to_string);
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for (pos, call) in calls.iter().enumerate() {
                self.fragments = self.fragments.saturating_add(1);
                let id = call.get("id").and_then(Value::as_str).unwrap_or_default();
                let index = match call
                    .get("index")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok())
                {
                    Some(i) => i,
                    // No index: a new id starts a new call; a fragment without one goes on
                    // the last call.
                    None => match self.calls.iter().next_back() {
                        Some((&last, p)) if !id.is_empty() && !p.id.is_empty() && p.id != id => {
                            last.saturating_add(1)
                        }
                        Some((&last, _)) if id.is_empty() => last,
                        _ => pos,
                    },
                };
                let p = self.calls.entry(index).or_default();
                if let Some(id) = call.get("id").and_then(Value::as_str)
                    && !id.is_empty()
                    && p.id != id
                {
                    p.id = id.to_string();
                }
                let f = call.get("function");
                if let Some(name) = f.and_then(|f| f.get("name")).and_then(Value::as_str)
                    && !name.is_empty()
                    && p.name != name
                {
                    p.name.push_str(name);
                }
                if let Some(args) = f.and_then(|f| f.get("arguments")) {
                    match args {
                        Value::String(s) => p.arguments.push_str(s),
                        // Some servers send the arguments as an object, whole.
                        Value::Object(_) => p.arguments = args.to_string(),
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }

    /// Tool-call fragments seen so far (a token, even without text).
    pub fn tool_fragments(&self) -> usize {
        self.fragments
    }

    /// Whether the reply asked for tools.
    pub fn has_tool_calls(&self) -> bool {
        !self.calls.is_empty()
    }

    /// The tool calls, complete, in the model's order.
    pub fn finish(self) -> Result<Vec<ToolCall>, AssembleError> {
        self.calls
            .into_iter()
            .map(|(index, p)| {
                if p.name.is_empty() {
                    return Err(AssembleError::NoName { index });
                }
                let raw = if p.arguments.trim().is_empty() {
                    "{}"
                } else {
                    p.arguments.as_str()
                };
                let arguments =
                    serde_json::from_str(raw).map_err(|e| AssembleError::BadArguments {
                        name: p.name.clone(),
                        message: e.to_string(),
                    })?;
                Ok(ToolCall {
                    id: if p.id.is_empty() {
                        format!("call_{index}")
                    } else {
                        p.id
                    },
                    name: p.name,
                    arguments,
                })
            })
            .collect()
    }
}

fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_without_an_index_are_told_apart_by_their_ids() {
        let mut s = ChatStream::new();
        for c in [
            json!({"choices": [{"delta": {"tool_calls": [{"id": "a", "function": {"name": "x", "arguments": "{\"n\":"}}]}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "1}"}}]}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"id": "b", "function": {"name": "y", "arguments": "{}"}}]}}]}),
        ] {
            s.push(&c.to_string()).unwrap_or_default();
        }
        let calls = s.finish().unwrap_or_default();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(
            (calls[0].name.as_str(), &calls[0].arguments),
            ("x", &json!({"n": 1}))
        );
        assert_eq!(calls[1].name, "y");
    }

    fn chunk(delta: Value, finish: Option<&str>) -> String {
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        })
        .to_string()
    }

    #[test]
    fn content_passes_through_as_it_comes() {
        let mut s = ChatStream::new();
        let role = s
            .push(&chunk(json!({"role": "assistant", "content": ""}), None))
            .unwrap();
        assert_eq!(role.content, None);
        let d = s.push(&chunk(json!({"content": "Hel"}), None)).unwrap();
        assert_eq!(d.content.as_deref(), Some("Hel"));
        let end = s.push(&chunk(json!({}), Some("stop"))).unwrap();
        assert_eq!(end.finish_reason.as_deref(), Some("stop"));
        let usage = s
            .push(&json!({"choices": [], "usage": {"total_tokens": 9}}).to_string())
            .unwrap();
        assert_eq!(usage.usage, Some(json!({"total_tokens": 9})));
        assert!(!s.has_tool_calls());
        assert_eq!(s.finish().unwrap(), vec![]);
    }

    #[test]
    fn several_tool_calls_with_arguments_split_anywhere() {
        let mut s = ChatStream::new();
        let parts = [
            json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "lookup_order", "arguments": ""}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"ord"}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "er\": \"55"}}]}),
            json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "transfer_call", "arguments": "{\"tar"}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "421\"}"}}]}),
            json!({"tool_calls": [{"index": 1, "function": {"arguments": "get\":\"billing\"}"}}]}),
        ];
        for p in parts {
            s.push(&chunk(p, None)).unwrap();
        }
        let end = s.push(&chunk(json!({}), Some("tool_calls"))).unwrap();
        assert_eq!(end.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(
            s.finish().unwrap(),
            vec![
                ToolCall {
                    id: "call_a".into(),
                    name: "lookup_order".into(),
                    arguments: json!({"order": "55421"}),
                },
                ToolCall {
                    id: "call_b".into(),
                    name: "transfer_call".into(),
                    arguments: json!({"target": "billing"}),
                },
            ]
        );
    }

    #[test]
    fn ids_and_names_sent_again_are_not_doubled_and_a_missing_index_is_the_position() {
        let mut s = ChatStream::new();
        // llama.cpp and vLLM repeat the id and name; Ollama sends whole calls without index.
        s.push(&chunk(
            json!({"tool_calls": [{"id": "c1", "function": {"name": "end_call", "arguments": "{}"}},
                                   {"id": "c2", "function": {"name": "send_dtmf", "arguments": {"digits": "12#"}}}]}),
            None,
        ))
        .unwrap();
        s.push(&chunk(
            json!({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "end_call"}}]}),
            Some("tool_calls"),
        ))
        .unwrap();
        let calls = s.finish().unwrap();
        assert_eq!(calls[0].name, "end_call");
        assert_eq!(calls[0].arguments, json!({}));
        assert_eq!(calls[1].name, "send_dtmf");
        assert_eq!(calls[1].arguments, json!({"digits": "12#"}));
    }

    #[test]
    fn malformed_chunks_and_arguments_are_errors_not_panics() {
        let mut s = ChatStream::new();
        assert!(matches!(
            s.push("{not json"),
            Err(AssembleError::NotAChunk(_))
        ));
        assert!(matches!(s.push("[1,2]"), Err(AssembleError::NotAChunk(_))));
        assert!(s.push(&json!({"choices": "nope"}).to_string()).is_ok());
        s.push(&chunk(
            json!({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "lookup_order", "arguments": "{\"order\": "}}]}),
            Some("tool_calls"),
        ))
        .unwrap();
        assert!(matches!(
            s.finish(),
            Err(AssembleError::BadArguments { .. })
        ));
        let mut t = ChatStream::new();
        t.push(&chunk(
            json!({"tool_calls": [{"index": 3, "function": {"arguments": "{}"}}]}),
            None,
        ))
        .unwrap();
        assert_eq!(t.finish(), Err(AssembleError::NoName { index: 3 }));
    }
}
