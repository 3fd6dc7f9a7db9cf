//! The agent's tools as the model sees them (JSON-schema function definitions: the built-ins
//! and the profile's webhooks) and the webhook calls themselves: URL template, method,
//! headers from the environment, a deadline per try, retries that reuse one idempotency key,
//! and sensitive arguments redacted from everything but the request itself.

use std::collections::BTreeMap;
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::profile::{TransferUse, WebhookTool};

/// Most of a webhook's answer handed to the model (bytes).
const RESULT_MAX: usize = 8 * 1024;

/// The function definitions of the built-in tools.
pub fn builtins(transfers: &BTreeMap<String, TransferUse>, handback: bool) -> Vec<Value> {
    let mut out = Vec::new();
    if !transfers.is_empty() {
        let names: Vec<&String> = transfers.keys().collect();
        let described = transfers
            .iter()
            .map(|(n, t)| format!("`{n}`: {}", t.description))
            .collect::<Vec<_>>()
            .join("; ");
        out.push(function(
            "transfer_call",
            &format!(
                "Transfers the caller, after what you say now has played. Only these targets \
                 exist: {described}. Say a short sentence first (\"Let me connect you to billing.\")."
            ),
            json!({
                "type": "object",
                "properties": {
                    "target": {"type": "string", "enum": names, "description": "Which target"},
                    "reason": {"type": "string", "description": "Why, in a few words"}
                },
                "required": ["target"]
            }),
        ));
    }
    out.push(function(
        "end_call",
        "Hangs up after your farewell has played. Say goodbye in the same reply first.",
        json!({"type": "object", "properties": {"reason": {"type": "string"}}}),
    ));
    out.push(function(
        "send_dtmf",
        "Sends keypad tones on the call (0-9 * # A-D; w pauses half a second), after what \
         you say now has played.",
        json!({
            "type": "object",
            "properties": {"digits": {"type": "string", "pattern": "^[0-9*#A-Dw]{1,32}$"}},
            "required": ["digits"]
        }),
    ));
    out.push(function(
        "collect_digits",
        "Asks the caller to type digits on the keypad and returns what they typed: the next \
         max_digits keys, or up to the terminator key. Use for account numbers, PINs and \
         anything the caller should not say aloud.",
        json!({
            "type": "object",
            "properties": {
                "prompt": {"type": "string", "description": "What to say, e.g. \"Please type your account number, then press pound.\""},
                "max_digits": {"type": "integer", "minimum": 1, "maximum": 32},
                "terminator": {"type": "string", "enum": ["#", "*", ""]}
            },
            "required": ["prompt"]
        }),
    ));
    if handback {
        out.push(function(
            "return_to_flow",
            "Hands the call back to the menu it came from, when the caller's request is done.",
            json!({"type": "object", "properties": {"summary": {"type": "string"}}}),
        ));
    }
    out
}

/// The function definition of a webhook tool.
pub fn webhook(name: &str, t: &WebhookTool) -> Value {
    let mut description = t.description.clone();
    if t.confirm {
        description.push_str(
            " The caller is asked to confirm before it runs; call it directly, do not ask first.",
        );
    }
    function(name, &description, t.parameters.clone())
}

fn function(name: &str, description: &str, parameters: Value) -> Value {
    json!({
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters}
    })
}

/// The arguments with every sensitive key's value replaced (at any depth).
pub fn redact(args: &Value, sensitive: &[String]) -> Value {
    match args {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = if sensitive.iter().any(|s| s == k) {
                        json!("[redacted]")
                    } else {
                        redact(v, sensitive)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| redact(v, sensitive)).collect()),
        other => other.clone(),
    }
}

/// A value as plain text (strings without quotes).
pub fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Fills `{arg}` from the arguments; `encode` percent-encodes (URLs).
pub fn fill(template: &str, args: &Value, encode: bool) -> String {
    crate::engines::dialog::prompt::fill(template, |key| {
        let v = args.get(key).map(text_of).unwrap_or_default();
        Some(if encode {
            utf8_percent_encode(&v, NON_ALPHANUMERIC).to_string()
        } else {
            v
        })
    })
}

/// What a webhook call gave the model.
#[derive(Debug, Clone)]
pub struct WebhookResult {
    /// Handed to the model as the tool's result.
    pub content: Value,
    pub ok: bool,
    pub tries: u32,
    pub ms: u64,
}

/// Calls a webhook: one deadline per try; a connection error, a timeout, 429 or 5xx is tried
/// again (`retries` times) with the same idempotency key. Never fails: a failure is a result
/// the model reads.
pub async fn call_webhook(
    http: &reqwest::Client,
    t: &WebhookTool,
    args: &Value,
    idempotency_key: &str,
) -> WebhookResult {
    let started = Instant::now();
    let url = fill(&t.url, args, true);
    let method = reqwest::Method::from_bytes(t.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let query = matches!(t.method.as_str(), "GET" | "DELETE");
    let mut tries = 0u32;
    loop {
        tries = tries.saturating_add(1);
        let mut req = http
            .request(method.clone(), &url)
            .timeout(Duration::from_millis(t.timeout_ms))
            .header("idempotency-key", idempotency_key)
            .header("accept", "application/json");
        for (k, v) in &t.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        for (k, env) in &t.headers_env {
            match std::env::var(env) {
                Ok(v) => req = req.header(k.as_str(), v),
                Err(_) => {
                    tracing::warn!(header = %k, env = %env, "webhook header's variable is not set")
                }
            }
        }
        if query {
            // Arguments the URL template used are not repeated in the query.
            let pairs: Vec<(String, String)> = args
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| !t.url.contains(&format!("{{{k}}}")))
                        .map(|(k, v)| (k.clone(), text_of(v)))
                        .collect()
                })
                .unwrap_or_default();
            if !pairs.is_empty() {
                req = req.query(&pairs);
            }
        } else {
            req = req.json(args);
        }
        let last_error: String;
        let retry = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let body = read_limited(resp).await;
                if status.is_success() {
                    let result =
                        serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body));
                    return WebhookResult {
                        content: json!({"status": status.as_u16(), "result": result}),
                        ok: true,
                        tries,
                        ms: ms_since(started),
                    };
                }
                let mut e = format!("the service answered {}", status.as_u16());
                if !body.is_empty() {
                    e.push_str(": ");
                    e.extend(body.chars().take(300));
                }
                last_error = e;
                status.as_u16() == 429 || status.is_server_error()
            }
            Err(e) if e.is_timeout() => {
                last_error = format!("no answer within {} ms", t.timeout_ms);
                true
            }
            Err(e) => {
                last_error = crate::engines::root_cause(&e);
                true
            }
        };
        if !retry || tries > t.retries {
            return WebhookResult {
                content: json!({"error": last_error}),
                ok: false,
                tries,
                ms: ms_since(started),
            };
        }
        tokio::time::sleep(Duration::from_millis(150 * u64::from(tries))).await;
    }
}

async fn read_limited(mut resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = RESULT_MAX.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= RESULT_MAX {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_and_templates() {
        let args =
            json!({"card": "4111 1111", "amount": 20, "nested": {"card": "x"}, "order": "a/b c"});
        let r = redact(&args, &["card".to_string()]);
        assert_eq!(r["card"], "[redacted]");
        assert_eq!(r["nested"]["card"], "[redacted]");
        assert_eq!(r["amount"], 20);
        assert_eq!(
            fill("http://h/orders/{order}?x={amount}", &args, true),
            "http://h/orders/a%2Fb%20c?x=20"
        );
        assert_eq!(
            fill("Refund {amount} on {order}?", &args, false),
            "Refund 20 on a/b c?"
        );
    }

    #[test]
    fn builtins_describe_only_allowed_targets() {
        let mut t = BTreeMap::new();
        t.insert(
            "billing".to_string(),
            TransferUse {
                description: "invoices".into(),
            },
        );
        let defs = builtins(&t, false);
        let names: Vec<&str> = defs
            .iter()
            .filter_map(|d| d.pointer("/function/name").and_then(Value::as_str))
            .collect();
        assert_eq!(
            names,
            ["transfer_call", "end_call", "send_dtmf", "collect_digits"]
        );
        assert_eq!(
            defs[0].pointer("/function/parameters/properties/target/enum"),
            Some(&json!(["billing"]))
        );
        assert!(
            builtins(&BTreeMap::new(), true)
                .iter()
                .any(|d| d.pointer("/function/name") == Some(&json!("return_to_flow")))
        );
    }
}
