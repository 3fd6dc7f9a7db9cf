//! Scripted servers for integration tests, on real sockets on 127.0.0.1: `LlmEmu`, an
//! OpenAI-compatible streaming chat-completions server that plays queued replies (SSE chunks in
//! OpenAI's exact wire format, with delays, malformed chunks, cuts and hangs), and `HookEmu`, a
//! webhook server that records requests and plays queued replies. Both speak HTTP/1.1 over a raw
//! `TcpListener` so every step is its own chunk on the wire and a cut is a real cut.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Scripts

/// One step of a streamed reply.
#[derive(Debug, Clone)]
pub enum Step {
    /// `{"role":"assistant","content":"","refusal":null}` delta.
    Role,
    /// A content delta.
    Content(String),
    /// One `tool_calls` delta fragment; `"type":"function"` is present when `id` is. When it is
    /// the first delta of the reply it also carries `"role":"assistant","content":null`.
    Tool {
        index: Option<usize>,
        id: Option<String>,
        name: Option<String>,
        args: String,
    },
    /// A chunk with an empty delta `{}` and this finish_reason ("stop", "tool_calls", "length").
    Finish(String),
    /// The usage chunk (`"choices":[]`); skipped unless the request set
    /// `"stream_options":{"include_usage":true}`.
    Usage,
    /// `data: [DONE]`.
    Done,
    /// A raw SSE data payload, written as `data: {raw}\n\n`.
    Raw(String),
    /// An SSE comment line `: keep-alive\n\n`.
    Comment,
    /// Wait this many ms before the next step.
    Delay(u64),
    /// Drop the connection here, mid-body (no terminating chunk, no [DONE]).
    Cut,
}

/// A scripted answer to one chat-completions request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 `text/event-stream`, steps in order, then the end of the chunked body.
    Stream(Vec<Step>),
    /// This status with this body (`application/json` when the body is JSON).
    Status { code: u16, body: String },
    /// Read the request, send nothing until the client gives up.
    Hang,
    /// Send 200 and the SSE headers, then nothing until the client gives up.
    HeadersThenHang,
}

/// OpenAI's error JSON body. An empty `code` is written as `null`.
pub fn error_body(message: &str, kind: &str, code: &str) -> String {
    let code = if code.is_empty() {
        Value::Null
    } else {
        Value::from(code)
    };
    serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    })
    .to_string()
}

/// Splits text into tokens the way real tokenizers roughly do: each word keeps its leading
/// whitespace (" there"), punctuation is its own token (",").
pub fn tokenize(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        let cur_all_space = cur.chars().all(char::is_whitespace);
        let last_punct = cur.chars().last().is_some_and(is_punct);
        let split = !cur.is_empty()
            && (((c.is_whitespace() || is_punct(c)) && !cur_all_space)
                || (!c.is_whitespace() && !is_punct(c) && last_punct));
        if split {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn is_punct(c: char) -> bool {
    !c.is_alphanumeric() && !c.is_whitespace()
}

/// Splits `s` into pieces of about `n` chars (on char boundaries, anywhere else).
pub fn fragments(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars.chunks(n.max(1)).map(|c| c.iter().collect()).collect()
}

fn push_tokens(steps: &mut Vec<Step>, text: &str, first_ms: u64, token_ms: u64) {
    for (i, tok) in tokenize(text).into_iter().enumerate() {
        let ms = if i == 0 { first_ms } else { token_ms };
        if ms > 0 {
            steps.push(Step::Delay(ms));
        }
        steps.push(Step::Content(tok));
    }
}

/// A streamed text reply: Role, the text as tokens (`first_ms` before the first, `token_ms`
/// between the others), Finish("stop"), Usage, Done.
pub fn text_reply(text: &str, first_ms: u64, token_ms: u64) -> Reply {
    let mut steps = vec![Step::Role];
    push_tokens(&mut steps, text, first_ms, token_ms);
    steps.extend([Step::Finish("stop".into()), Step::Usage, Step::Done]);
    Reply::Stream(steps)
}

/// A streamed tool-call reply: optional content first (Role, then tokens), then for each
/// `(id, name, args)` a first fragment with index, id, type, name and `"arguments":""`, then the
/// argument JSON in ~7-char fragments, `token_ms` apart; Finish("tool_calls"), Usage, Done.
/// Without text there is no separate Role chunk: as with OpenAI, the first tool fragment carries
/// `"role":"assistant","content":null`.
pub fn tool_reply(text: Option<&str>, calls: &[(&str, &str, Value)], token_ms: u64) -> Reply {
    let mut steps = Vec::new();
    if let Some(t) = text {
        steps.push(Step::Role);
        push_tokens(&mut steps, t, token_ms, token_ms);
    }
    for (i, (id, name, args)) in calls.iter().enumerate() {
        if token_ms > 0 && !steps.is_empty() {
            steps.push(Step::Delay(token_ms));
        }
        steps.push(Step::Tool {
            index: Some(i),
            id: Some((*id).to_string()),
            name: Some((*name).to_string()),
            args: String::new(),
        });
        for frag in fragments(&args.to_string(), 7) {
            if token_ms > 0 {
                steps.push(Step::Delay(token_ms));
            }
            steps.push(Step::Tool {
                index: Some(i),
                id: None,
                name: None,
                args: frag,
            });
        }
    }
    steps.extend([Step::Finish("tool_calls".into()), Step::Usage, Step::Done]);
    Reply::Stream(steps)
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 server side

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;

struct Request {
    method: String,
    target: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    close: bool,
}

enum ReadOutcome {
    Request(Request),
    /// The peer closed (or the socket failed) before a whole request arrived.
    Closed,
    /// A malformed request: answer with this status and message, then close.
    Bad(u16, String),
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads more bytes into the buffer; false on EOF or error.
    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 8192];
        match self.stream.read(&mut tmp).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    /// Reads until `needle` is in the buffer (within `limit` bytes); its position.
    async fn read_until(&mut self, needle: &[u8], limit: usize) -> Result<usize, ReadOutcome> {
        loop {
            if let Some(p) = find(&self.buf, needle) {
                return Ok(p);
            }
            if self.buf.len() > limit {
                return Err(ReadOutcome::Bad(431, "request head too large".into()));
            }
            if !self.fill().await {
                return Err(ReadOutcome::Closed);
            }
        }
    }

    async fn read_exact_buf(&mut self, n: usize) -> Result<Vec<u8>, ReadOutcome> {
        while self.buf.len() < n {
            if !self.fill().await {
                return Err(ReadOutcome::Closed);
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn read_request(&mut self) -> ReadOutcome {
        match self.try_read_request().await {
            Ok(r) => ReadOutcome::Request(r),
            Err(o) => o,
        }
    }

    async fn try_read_request(&mut self) -> Result<Request, ReadOutcome> {
        // Tolerate stray CRLFs between requests (RFC 9112 section 2.2).
        loop {
            while self.buf.starts_with(b"\r\n") {
                self.buf.drain(..2);
            }
            if !self.buf.is_empty() {
                break;
            }
            if !self.fill().await {
                return Err(ReadOutcome::Closed);
            }
        }
        let end = self.read_until(b"\r\n\r\n", MAX_HEAD).await?;
        let head: Vec<u8> = self.buf.drain(..end + 4).collect();
        let bad = |m: &str| ReadOutcome::Bad(400, m.to_string());
        let head =
            std::str::from_utf8(&head[..end]).map_err(|_| bad("request head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or_default();
        let mut parts = line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("malformed request line"));
        };
        if method.is_empty() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
            return Err(bad("malformed request line"));
        }
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for l in lines {
            let Some((name, value)) = l.split_once(':') else {
                return Err(bad("malformed header line"));
            };
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(bad("malformed header name"));
            }
            let value = value.trim().to_string();
            headers
                .entry(name)
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        let conn_hdr = headers
            .get("connection")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        let close = conn_hdr.contains("close")
            || (version == "HTTP/1.0" && !conn_hdr.contains("keep-alive"));
        if headers
            .get("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            let _ = self
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await;
        }
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            self.read_chunked().await?
        } else if let Some(cl) = headers.get("content-length") {
            let n: usize = cl.parse().map_err(|_| bad("bad content-length"))?;
            if n > MAX_BODY {
                return Err(ReadOutcome::Bad(413, "request body too large".into()));
            }
            self.read_exact_buf(n).await?
        } else {
            Vec::new()
        };
        Ok(Request {
            method: method.to_string(),
            target: target.to_string(),
            headers,
            body,
            close,
        })
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>, ReadOutcome> {
        let mut body = Vec::new();
        loop {
            let p = self.read_until(b"\r\n", MAX_HEAD).await?;
            let line: Vec<u8> = self.buf.drain(..p + 2).collect();
            let line = String::from_utf8_lossy(&line[..p]);
            let size = line.split(';').next().unwrap_or_default().trim();
            let Ok(n) = usize::from_str_radix(size, 16) else {
                return Err(ReadOutcome::Bad(400, "bad chunk size".into()));
            };
            if body.len() + n > MAX_BODY {
                return Err(ReadOutcome::Bad(413, "request body too large".into()));
            }
            if n == 0 {
                // Trailers, if any, then the blank line.
                loop {
                    let p = self.read_until(b"\r\n", MAX_HEAD).await?;
                    self.buf.drain(..p + 2);
                    if p == 0 {
                        return Ok(body);
                    }
                }
            }
            let data = self.read_exact_buf(n + 2).await?;
            if &data[n..] != b"\r\n" {
                return Err(ReadOutcome::Bad(400, "bad chunk terminator".into()));
            }
            body.extend_from_slice(&data[..n]);
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// Writes one chunk of a chunked body.
    async fn write_chunk(&mut self, data: &[u8]) -> bool {
        if data.is_empty() {
            return true;
        }
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        self.write(&out).await
    }

    /// Waits `dur`, watching the socket; true if the peer closed meanwhile. Bytes that arrive
    /// (a pipelined request) are kept in the buffer.
    async fn sleep_watching(&mut self, dur: Duration) -> bool {
        let deadline = tokio::time::sleep(dur);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return false,
                alive = self.fill() => if !alive { return true },
            }
        }
    }

    /// Waits until the peer closes the connection.
    async fn wait_closed(&mut self) {
        while self.fill().await {}
    }

    async fn respond(&mut self, code: u16, content_type: &str, body: &str, close: bool) -> bool {
        let mut head = format!(
            "HTTP/1.1 {code} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
            reason(code),
            body.len()
        );
        if close {
            head.push_str("connection: close\r\n");
        }
        head.push_str("\r\n");
        head.push_str(body);
        self.write(head.as_bytes()).await
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn content_type_of(body: &str) -> &'static str {
    if serde_json::from_str::<Value>(body).is_ok() {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds 127.0.0.1:0 and runs `serve` for each connection; the connection tasks live in a
/// JoinSet owned by the accept task, so aborting it ends them all.
async fn spawn_server<F, Fut>(serve: F) -> (u16, JoinHandle<()>)
where
    F: Fn(Conn) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local_addr").port();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => { conns.spawn(serve(Conn::new(stream))); }
                    Err(e) => {
                        eprintln!("emu: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    (port, task)
}

async fn poll_until(timeout: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// LlmEmu

#[derive(Default)]
struct LlmState {
    queue: VecDeque<Reply>,
    requests: Vec<Value>,
    headers: Vec<BTreeMap<String, String>>,
    finished: Vec<Option<Instant>>,
    aborted: Vec<Option<Instant>>,
}

/// A scripted OpenAI-compatible chat-completions server (streaming only).
pub struct LlmEmu {
    port: u16,
    state: Arc<Mutex<LlmState>>,
    task: JoinHandle<()>,
}

impl Drop for LlmEmu {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LlmEmu {
    pub async fn start() -> LlmEmu {
        let state = Arc::new(Mutex::new(LlmState::default()));
        let st = state.clone();
        let (port, task) = spawn_server(move |conn| llm_conn(conn, st.clone())).await;
        LlmEmu { port, state, task }
    }

    /// "http://127.0.0.1:PORT/v1"; clients POST {base}/chat/completions.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Queues a reply for the next streaming request (FIFO). With an empty queue the server
    /// answers `text_reply("Okay.", 0, 0)` and logs that the script ran out.
    pub fn push(&self, reply: Reply) {
        lock(&self.state).queue.push_back(reply);
    }

    /// How many queued replies are still unused.
    pub fn pending(&self) -> usize {
        lock(&self.state).queue.len()
    }

    /// Every request body to `/v1/chat/completions` so far, in order (a body that is not JSON
    /// is recorded as a JSON string of its text, so indexes match `request_headers`).
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.state).requests.clone()
    }

    /// The headers (lowercased names) of each request to `/v1/chat/completions`, in order.
    pub fn request_headers(&self) -> Vec<BTreeMap<String, String>> {
        lock(&self.state).headers.clone()
    }

    /// Waits (polling, up to `timeout`) until at least `n` requests arrived.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || lock(&self.state).requests.len() >= n).await
    }

    /// When the last step of reply `i` (by request order) was written: the end of a stream, the
    /// cut of a `Cut`, or the body of a `Status`. None while running, for hangs, and when the
    /// client went away first.
    pub fn finished_at(&self, i: usize) -> Option<Instant> {
        lock(&self.state).finished.get(i).copied().flatten()
    }

    /// When the server saw the client close the connection before reply `i` finished (during a
    /// delay, a hang, or on a failed write). None if it did not (yet).
    pub fn aborted_at(&self, i: usize) -> Option<Instant> {
        lock(&self.state).aborted.get(i).copied().flatten()
    }
}

const BAD_JSON: &str = "We could not parse the JSON body of your request. (HINT: This likely \
means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but \
what was sent was not valid JSON. If you have trouble figuring out how to fix this, please \
contact us through our help center at help.openai.com.)";

async fn llm_conn(mut conn: Conn, state: Arc<Mutex<LlmState>>) {
    loop {
        let req = match conn.read_request().await {
            ReadOutcome::Request(r) => r,
            ReadOutcome::Closed => return,
            ReadOutcome::Bad(code, msg) => {
                let body = error_body(&msg, "invalid_request_error", "");
                conn.respond(code, "application/json", &body, true).await;
                return;
            }
        };
        let path = req.target.split('?').next().unwrap_or_default();
        if req.method != "POST" || path != "/v1/chat/completions" {
            eprintln!("llm_emu: {} {} -> 404", req.method, req.target);
            let msg = format!("Invalid URL ({} {})", req.method, path);
            let body = error_body(&msg, "invalid_request_error", "");
            if !conn
                .respond(404, "application/json", &body, req.close)
                .await
                || req.close
            {
                return;
            }
            continue;
        }
        let parsed: Result<Value, _> = serde_json::from_slice(&req.body);
        let idx = {
            let mut st = lock(&state);
            let recorded = match &parsed {
                Ok(v) => v.clone(),
                Err(_) => Value::String(String::from_utf8_lossy(&req.body).into_owned()),
            };
            st.requests.push(recorded);
            st.headers.push(req.headers.clone());
            st.finished.push(None);
            st.aborted.push(None);
            st.requests.len() - 1
        };
        let mark = |aborted: bool| {
            let mut st = lock(&state);
            let slot = if aborted {
                &mut st.aborted
            } else {
                &mut st.finished
            };
            slot[idx] = Some(Instant::now());
        };
        let body = match parsed {
            Ok(v) if v.is_object() => v,
            _ => {
                let body = error_body(BAD_JSON, "invalid_request_error", "");
                let ok = conn
                    .respond(400, "application/json", &body, req.close)
                    .await;
                mark(!ok);
                if !ok || req.close {
                    return;
                }
                continue;
            }
        };
        if body.get("stream").and_then(Value::as_bool) != Some(true) {
            let body = error_body(
                "this emulator only streams: set \"stream\": true",
                "invalid_request_error",
                "stream_required",
            );
            let ok = conn
                .respond(400, "application/json", &body, req.close)
                .await;
            mark(!ok);
            if !ok || req.close {
                return;
            }
            continue;
        }
        let reply = lock(&state).queue.pop_front();
        let reply = reply.unwrap_or_else(|| {
            eprintln!("llm_emu: script ran out at request {idx}; answering \"Okay.\"");
            text_reply("Okay.", 0, 0)
        });
        let keep = match reply {
            Reply::Status { code, body: text } => {
                let ok = conn
                    .respond(code, content_type_of(&text), &text, req.close)
                    .await;
                mark(!ok);
                ok
            }
            Reply::Hang => {
                conn.wait_closed().await;
                mark(true);
                false
            }
            Reply::HeadersThenHang => {
                if conn.write(sse_head(idx).as_bytes()).await {
                    conn.wait_closed().await;
                }
                mark(true);
                false
            }
            Reply::Stream(steps) => match play(&mut conn, &body, idx, steps).await {
                Played::Finished => {
                    mark(false);
                    true
                }
                Played::Cut => {
                    mark(false);
                    false
                }
                Played::ClientGone => {
                    mark(true);
                    false
                }
            },
        };
        if !keep || req.close {
            return;
        }
    }
}

fn sse_head(idx: usize) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\
         cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\
         x-request-id: req_emu{idx:06}\r\n\r\n"
    )
}

enum Played {
    Finished,
    Cut,
    ClientGone,
}

/// What every chunk of one reply shares.
struct ChunkCtx {
    head: String,
    usage_null: bool,
    first_delta: bool,
}

impl ChunkCtx {
    fn chunk(&mut self, delta: &str, finish: Option<&str>) -> String {
        self.first_delta = false;
        let finish = finish.map_or("null".to_string(), json_str);
        let usage = if self.usage_null {
            ",\"usage\":null"
        } else {
            ""
        };
        format!(
            "{},\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{usage}}}",
            self.head
        )
    }
}

fn json_str(s: &str) -> String {
    Value::from(s).to_string()
}

fn estimate_prompt_tokens(req: &Value) -> u64 {
    let chars = req
        .get("messages")
        .map(|m| m.to_string().len())
        .unwrap_or(0);
    (chars as u64).div_ceil(4).max(1)
}

async fn play(conn: &mut Conn, req: &Value, idx: usize, steps: Vec<Step>) -> Played {
    if !conn.write(sse_head(idx).as_bytes()).await {
        return Played::ClientGone;
    }
    let model = req.get("model").and_then(Value::as_str).unwrap_or("emu");
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let id = format!("chatcmpl-emu{idx:04}{nanos:09}");
    let mut ctx = ChunkCtx {
        head: format!(
            "{{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{},\"system_fingerprint\":\"fp_emu\"",
            json_str(&id),
            json_str(model)
        ),
        usage_null: include_usage,
        first_delta: true,
    };
    let prompt_tokens = estimate_prompt_tokens(req);
    let mut completion_tokens = 0u64;
    for step in steps {
        let event = match step {
            Step::Delay(ms) => {
                if conn.sleep_watching(Duration::from_millis(ms)).await {
                    return Played::ClientGone;
                }
                continue;
            }
            Step::Cut => return Played::Cut,
            Step::Role => {
                let c = ctx.chunk(r#"{"role":"assistant","content":"","refusal":null}"#, None);
                format!("data: {c}\n\n")
            }
            Step::Content(text) => {
                completion_tokens += 1;
                let c = ctx.chunk(&format!("{{\"content\":{}}}", json_str(&text)), None);
                format!("data: {c}\n\n")
            }
            Step::Tool {
                index,
                id,
                name,
                args,
            } => {
                completion_tokens += 1;
                let mut call = String::from("{");
                let mut sep = "";
                if let Some(i) = index {
                    call.push_str(&format!("\"index\":{i}"));
                    sep = ",";
                }
                if let Some(id) = &id {
                    call.push_str(&format!(
                        "{sep}\"id\":{},\"type\":\"function\"",
                        json_str(id)
                    ));
                    sep = ",";
                }
                call.push_str(&format!("{sep}\"function\":{{"));
                if let Some(name) = &name {
                    call.push_str(&format!("\"name\":{},", json_str(name)));
                }
                call.push_str(&format!("\"arguments\":{}}}}}", json_str(&args)));
                let role = if ctx.first_delta {
                    "\"role\":\"assistant\",\"content\":null,"
                } else {
                    ""
                };
                let c = ctx.chunk(&format!("{{{role}\"tool_calls\":[{call}]}}"), None);
                format!("data: {c}\n\n")
            }
            Step::Finish(reason) => format!("data: {}\n\n", ctx.chunk("{}", Some(&reason))),
            Step::Usage => {
                if !include_usage {
                    continue;
                }
                format!(
                    "data: {},\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\
                     \"completion_tokens\":{completion_tokens},\"total_tokens\":{},\
                     \"prompt_tokens_details\":{{\"cached_tokens\":0,\"audio_tokens\":0}},\
                     \"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\
                     \"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}}}\n\n",
                    ctx.head,
                    prompt_tokens + completion_tokens
                )
            }
            Step::Done => "data: [DONE]\n\n".to_string(),
            Step::Raw(raw) => format!("data: {raw}\n\n"),
            Step::Comment => ": keep-alive\n\n".to_string(),
        };
        if !conn.write_chunk(event.as_bytes()).await {
            return Played::ClientGone;
        }
    }
    if !conn.write(b"0\r\n\r\n").await {
        return Played::ClientGone;
    }
    Played::Finished
}

// ---------------------------------------------------------------------------------------------
// HookEmu

/// One request the webhook server received.
#[derive(Debug, Clone)]
pub struct HookRequest {
    pub method: String,
    /// The request target: path with query.
    pub path: String,
    /// Lowercased names; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl HookRequest {
    /// The body parsed as JSON (Null if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// A scripted answer to one webhook request.
#[derive(Debug, Clone)]
pub enum HookReply {
    /// This status and JSON body, after `delay_ms`.
    Json {
        status: u16,
        body: Value,
        delay_ms: u64,
    },
    /// This status and a `text/plain` body (an HTML error page, say), at once.
    Text { status: u16, body: String },
    /// Send nothing until the client gives up.
    Hang,
    /// Close the connection without a response.
    Drop,
}

#[derive(Default)]
struct HookState {
    queue: VecDeque<HookReply>,
    requests: Vec<HookRequest>,
}

/// A scripted webhook server: any method, any path.
pub struct HookEmu {
    port: u16,
    state: Arc<Mutex<HookState>>,
    task: JoinHandle<()>,
}

impl Drop for HookEmu {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HookEmu {
    pub async fn start() -> HookEmu {
        let state = Arc::new(Mutex::new(HookState::default()));
        let st = state.clone();
        let (port, task) = spawn_server(move |conn| hook_conn(conn, st.clone())).await;
        HookEmu { port, state, task }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "http://127.0.0.1:PORT{path}".
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Queues a reply (FIFO); with an empty queue the answer is 200 `{"ok":true}`.
    pub fn push(&self, reply: HookReply) {
        lock(&self.state).queue.push_back(reply);
    }

    pub fn requests(&self) -> Vec<HookRequest> {
        lock(&self.state).requests.clone()
    }

    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || lock(&self.state).requests.len() >= n).await
    }
}

async fn hook_conn(mut conn: Conn, state: Arc<Mutex<HookState>>) {
    loop {
        let req = match conn.read_request().await {
            ReadOutcome::Request(r) => r,
            ReadOutcome::Closed => return,
            ReadOutcome::Bad(code, msg) => {
                let body = serde_json::json!({ "error": msg }).to_string();
                conn.respond(code, "application/json", &body, true).await;
                return;
            }
        };
        let reply = {
            let mut st = lock(&state);
            st.requests.push(HookRequest {
                method: req.method.clone(),
                path: req.target.clone(),
                headers: req.headers.clone(),
                body: String::from_utf8_lossy(&req.body).into_owned(),
            });
            st.queue.pop_front()
        };
        let reply = reply.unwrap_or(HookReply::Json {
            status: 200,
            body: serde_json::json!({ "ok": true }),
            delay_ms: 0,
        });
        let ok = match reply {
            HookReply::Json {
                status,
                body,
                delay_ms,
            } => {
                if delay_ms > 0 && conn.sleep_watching(Duration::from_millis(delay_ms)).await {
                    return;
                }
                conn.respond(status, "application/json", &body.to_string(), req.close)
                    .await
            }
            HookReply::Text { status, body } => {
                conn.respond(status, "text/plain; charset=utf-8", &body, req.close)
                    .await
            }
            HookReply::Hang => {
                conn.wait_closed().await;
                return;
            }
            HookReply::Drop => return,
        };
        if !ok || req.close {
            return;
        }
    }
}
