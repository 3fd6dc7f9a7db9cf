//! Checks the scripted test servers in `llm_emu/` on their own, as a client sees them: the
//! OpenAI SSE wire format of `LlmEmu` (ids, deltas, tool-call fragments, usage, [DONE]), its
//! failure modes (error statuses, cuts, hangs), request recording, and `HookEmu`.

mod llm_emu;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use llm_emu::{HookEmu, HookReply, LlmEmu, Reply, Step, error_body, text_reply, tool_reply};
use serde_json::{Value, json};
use tokio::time::Instant;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn chat_body(include_usage: bool) -> Value {
    let mut b = json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [{"role": "user", "content": "Where is my order?"}],
    });
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// What the client saw of one streamed reply.
struct Seen {
    status: u16,
    headers: reqwest::header::HeaderMap,
    /// SSE events (`data: ` payloads and comment lines), in order.
    events: Vec<String>,
    /// When the first byte carrying a content delta arrived.
    first_content_at: Option<Instant>,
    /// The body ended with an error (rather than a clean end).
    error: bool,
}

impl Seen {
    fn chunks(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
            .collect()
    }
}

async fn stream(url: &str, body: &Value) -> Seen {
    let resp = client()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    let mut first_content_at = None;
    let mut error = false;
    while let Some(item) = body.next().await {
        match item {
            Ok(bytes) => {
                buf.push_str(std::str::from_utf8(&bytes).expect("utf-8"));
                while let Some(p) = buf.find("\n\n") {
                    let ev = buf[..p].to_string();
                    buf.drain(..p + 2);
                    if first_content_at.is_none() && ev.contains("\"content\":\"") {
                        let v: Value =
                            serde_json::from_str(ev.trim_start_matches("data: ")).unwrap();
                        if v["choices"][0]["delta"]["content"]
                            .as_str()
                            .is_some_and(|s| !s.is_empty())
                        {
                            first_content_at = Some(Instant::now());
                        }
                    }
                    events.push(ev);
                }
            }
            Err(_) => {
                error = true;
                break;
            }
        }
    }
    assert!(
        buf.is_empty() || error,
        "a clean body ends on an event boundary: {buf:?}"
    );
    Seen {
        status,
        headers,
        events,
        first_content_at,
        error,
    }
}

fn chat_url(emu: &LlmEmu) -> String {
    format!("{}/chat/completions", emu.base_url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_reply_streams_openai_chunks() {
    let emu = LlmEmu::start().await;
    let text = "Hello there, your order ships tomorrow.";
    emu.push(text_reply(text, 150, 5));
    let sent = Instant::now();
    let seen = stream(&chat_url(&emu), &chat_body(true)).await;

    assert_eq!(seen.status, 200);
    assert_eq!(
        seen.headers["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(seen.headers["cache-control"], "no-cache");
    assert!(seen.headers.get("content-length").is_none());
    assert!(!seen.error);
    assert_eq!(seen.events.last().unwrap(), "data: [DONE]");
    assert!(
        seen.first_content_at.unwrap() - sent >= Duration::from_millis(100),
        "first content no earlier than first_ms"
    );

    let chunks = seen.chunks();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "gpt-4o-mini");
        assert_eq!(c["system_fingerprint"], "fp_emu");
        assert!(c["created"].as_u64().unwrap() > 1_600_000_000);
        assert!(c.as_object().unwrap().contains_key("usage"));
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, text);
    let deltas: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(&deltas[..3], ["Hello", " there", ","]);

    let with_choices: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"].as_array().unwrap().is_empty())
        .collect();
    let last = with_choices.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    for c in &with_choices[..with_choices.len() - 1] {
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(c["usage"], Value::Null);
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    let u = &usage["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u["completion_tokens"].as_u64().unwrap(),
        deltas.len() as u64
    );
    assert!(emu.finished_at(0).is_some());

    // Without include_usage: no usage chunk and no "usage" key at all.
    emu.push(text_reply("Fine.", 0, 0));
    let seen = stream(&chat_url(&emu), &chat_body(false)).await;
    let chunks = seen.chunks();
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert!(
        chunks
            .iter()
            .all(|c| !c["choices"].as_array().unwrap().is_empty())
    );
    assert_eq!(seen.events.last().unwrap(), "data: [DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_reply_fragments_concatenate_per_index() {
    let emu = LlmEmu::start().await;
    let a = json!({"order_id": "A-1234", "note": "say \"hi\"\n\u{e9}t\u{e9}"});
    let b = json!({"city": "Zürich", "n": [1, 2, 3]});
    emu.push(tool_reply(
        None,
        &[
            ("call_abc", "lookup_order", a.clone()),
            ("call_def", "weather", b.clone()),
        ],
        1,
    ));
    let seen = stream(&chat_url(&emu), &chat_body(true)).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.events.last().unwrap(), "data: [DONE]");
    let chunks = seen.chunks();

    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert_eq!(first["content"], Value::Null);
    assert!(first.as_object().unwrap().contains_key("content"));

    let mut args: BTreeMap<u64, String> = BTreeMap::new();
    let mut heads: Vec<(u64, String, String)> = Vec::new();
    let mut fragments = 0;
    for c in &chunks {
        let Some(calls) = c["choices"][0]["delta"]["tool_calls"].as_array() else {
            continue;
        };
        for call in calls {
            fragments += 1;
            let i = call["index"].as_u64().unwrap();
            if let Some(id) = call["id"].as_str() {
                assert_eq!(call["type"], "function");
                assert_eq!(call["function"]["arguments"], "");
                heads.push((
                    i,
                    id.into(),
                    call["function"]["name"].as_str().unwrap().into(),
                ));
            } else {
                assert!(call.get("type").is_none());
                assert!(call["function"].get("name").is_none());
            }
            args.entry(i)
                .or_default()
                .push_str(call["function"]["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(
        heads,
        [
            (0, "call_abc".into(), "lookup_order".into()),
            (1, "call_def".into(), "weather".into())
        ]
    );
    assert!(fragments > 6, "arguments come in several fragments");
    assert_eq!(args[&0], a.to_string());
    assert_eq!(args[&1], b.to_string());
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("tool_calls")]);

    // With text first: a role chunk, content, then tool calls without role.
    emu.push(tool_reply(
        Some("One moment."),
        &[("call_x", "lookup_order", json!({}))],
        0,
    ));
    let chunks = stream(&chat_url(&emu), &chat_body(false)).await.chunks();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "One moment.");
    let tool_chunks: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"].get("tool_calls").is_some())
        .collect();
    assert!(
        tool_chunks
            .iter()
            .all(|c| c["choices"][0]["delta"].get("role").is_none())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_steps_raw_comment_and_default() {
    let emu = LlmEmu::start().await;
    emu.push(Reply::Stream(vec![
        Step::Comment,
        Step::Role,
        Step::Raw("{not json".into()),
        Step::Content("x".into()),
        Step::Finish("length".into()),
        Step::Done,
    ]));
    let seen = stream(&chat_url(&emu), &chat_body(false)).await;
    assert_eq!(seen.events[0], ": keep-alive");
    assert_eq!(seen.events[2], "data: {not json");
    assert_eq!(seen.events.last().unwrap(), "data: [DONE]");

    // Empty queue: "Okay."
    let seen = stream(&chat_url(&emu), &chat_body(false)).await;
    let chunks = seen.chunks();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Okay.");
    assert_eq!(seen.events.last().unwrap(), "data: [DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reply_gives_error_json() {
    let emu = LlmEmu::start().await;
    let err = error_body(
        "Rate limit reached for gpt-4o-mini",
        "requests",
        "rate_limit_exceeded",
    );
    emu.push(Reply::Status {
        code: 429,
        body: err.clone(),
    });
    let resp = client()
        .post(chat_url(&emu))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(v["error"]["param"], Value::Null);
    assert_eq!(v, serde_json::from_str::<Value>(&err).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_ends_the_body_early() {
    let emu = LlmEmu::start().await;
    emu.push(Reply::Stream(vec![
        Step::Role,
        Step::Content("Hello".into()),
        Step::Delay(20),
        Step::Cut,
    ]));
    let seen = stream(&chat_url(&emu), &chat_body(false)).await;
    assert_eq!(seen.status, 200);
    assert!(seen.error, "a cut body is an error, not a clean end");
    assert!(!seen.events.iter().any(|e| e == "data: [DONE]"));
    assert_eq!(seen.chunks().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_times_out_and_headers_then_hang_sends_nothing() {
    let emu = LlmEmu::start().await;
    emu.push(Reply::Hang);
    let r = client()
        .post(chat_url(&emu))
        .json(&chat_body(false))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(r.unwrap_err().is_timeout());
    assert!(emu.wait_requests(1, Duration::from_secs(1)).await);
    assert!(emu.finished_at(0).is_none());

    emu.push(Reply::HeadersThenHang);
    let resp = client()
        .post(chat_url(&emu))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let mut body = resp.bytes_stream();
    let next = tokio::time::timeout(Duration::from_millis(300), body.next()).await;
    assert!(next.is_err(), "no data within 300 ms");
    drop(body);
    assert!(emu.finished_at(1).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_requests_and_rejects_bad_ones() {
    let emu = LlmEmu::start().await;
    emu.push(text_reply("Hi.", 0, 0));
    let waiter = {
        let url = chat_url(&emu);
        tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth("sk-test")
                .json(&chat_body(true))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        })
    };
    assert!(emu.wait_requests(1, Duration::from_secs(5)).await);
    assert!(!emu.wait_requests(2, Duration::from_millis(50)).await);
    waiter.await.unwrap();
    assert_eq!(emu.requests()[0], chat_body(true));
    let h = &emu.request_headers()[0];
    assert_eq!(h["authorization"], "Bearer sk-test");
    assert_eq!(h["content-type"], "application/json");

    // Not JSON: 400 with OpenAI's error JSON.
    let resp = client()
        .post(chat_url(&emu))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(emu.requests().len(), 2);

    // Not streaming: 400.
    let resp = client()
        .post(chat_url(&emu))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Wrong path: 404 JSON, not recorded.
    let resp = client()
        .post(format!("{}/completions", emu.base_url()))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Invalid URL")
    );
    let resp = client().get(chat_url(&emu)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(emu.requests().len(), 3);

    // The server still answers after all that.
    let seen = stream(&chat_url(&emu), &chat_body(false)).await;
    assert_eq!(seen.events.last().unwrap(), "data: [DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_emu_scripts_and_records() {
    let hook = HookEmu::start().await;
    hook.push(HookReply::Json {
        status: 201,
        body: json!({"created": 7}),
        delay_ms: 50,
    });
    hook.push(HookReply::Drop);

    let resp = client()
        .post(hook.url("/hooks/call?x=1"))
        .header("x-signature", "abc")
        .json(&json!({"event": "call.ended"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"created": 7}));

    let r = client().put(hook.url("/drop")).body("x").send().await;
    assert!(r.is_err(), "a dropped connection is a client error");

    let resp = client().get(hook.url("/health")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"ok": true}));

    assert!(hook.wait_requests(3, Duration::from_secs(1)).await);
    let reqs = hook.requests();
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/hooks/call?x=1");
    assert_eq!(reqs[0].headers["x-signature"], "abc");
    assert_eq!(reqs[0].headers["content-type"], "application/json");
    assert_eq!(reqs[0].json(), json!({"event": "call.ended"}));
    assert_eq!(reqs[1].method, "PUT");
    assert_eq!(reqs[1].body, "x");
    assert_eq!(reqs[2].method, "GET");
    assert_eq!(reqs[2].path, "/health");
}

/// Sends raw bytes and returns everything the server writes until it closes.
async fn raw_exchange(port: u16, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_an_error_response() {
    let emu = LlmEmu::start().await;
    let out = raw_exchange(emu.port(), b"NONSENSE\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    let out = raw_exchange(
        emu.port(),
        b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: nope\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    let out = raw_exchange(
        emu.port(),
        b"POST /v1/chat/completions HTTP/1.1\r\nno colon here\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");

    // A chunked request body is decoded; `connection: close` is honoured.
    let hook = HookEmu::start().await;
    let out = raw_exchange(
        hook.port(),
        b"POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
          3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert_eq!(hook.requests()[0].body, "abcde");
    let out = raw_exchange(hook.port(), b"GET / HTTP/1.1\r\n\xff\xfe\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");

    // Both still serve well-formed requests.
    let seen = stream(&chat_url(&emu), &chat_body(false)).await;
    assert_eq!(seen.events.last().unwrap(), "data: [DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_going_away_mid_stream_is_seen() {
    let emu = LlmEmu::start().await;
    emu.push(text_reply("one two three four five six", 0, 100));
    let resp = client()
        .post(chat_url(&emu))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let gone = async {
        while emu.aborted_at(0).is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .is_ok()
    );
    assert!(emu.finished_at(0).is_none());
}
