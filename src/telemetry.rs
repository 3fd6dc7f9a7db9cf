//! Observability: per-call records (JSON lines with `t_ms` and `type`), the conversation
//! printed as it happens, and Prometheus metrics (low cardinality, no per-call labels).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

/// Metric names, in one place.
pub mod names {
    pub const CALLS_ACTIVE: &str = "sidecall_calls_active";
    pub const CALLS_TOTAL: &str = "sidecall_calls_total";
    pub const STAGE_SECONDS: &str = "sidecall_stage_latency_seconds";
    pub const TURN_SECONDS: &str = "sidecall_turn_latency_seconds";
    pub const BARGE_INS: &str = "sidecall_barge_ins_total";
    /// The LLM agent: request to first token, to the stream's end, and ask to first piece.
    pub const LLM_TTFT_SECONDS: &str = "sidecall_llm_ttft_seconds";
    pub const LLM_TOTAL_SECONDS: &str = "sidecall_llm_total_seconds";
    pub const FIRST_PIECE_SECONDS: &str = "sidecall_first_piece_seconds";
    /// Agent tool calls, by tool kind (`webhook` or the built-in's name) and result.
    pub const TOOL_CALLS: &str = "sidecall_tool_calls_total";
    pub const ERRORS: &str = "sidecall_errors_total";
    pub const RECORDS_DROPPED: &str = "sidecall_records_dropped_total";
    /// Callers, bridges and media channels an earlier sidecall left behind, found on (re)connect.
    pub const ORPHANS: &str = "sidecall_orphans_total";
    /// 1 while the PBX control connection (ARI events, Event Socket) is up, by `pbx`.
    pub const CONTROL_CONNECTED: &str = "sidecall_control_connected";
}

/// Describes every metric once at start-up.
pub fn describe_metrics() {
    metrics::describe_gauge!(names::CALLS_ACTIVE, "Calls in progress");
    metrics::describe_counter!(names::CALLS_TOTAL, "Calls ended, by outcome");
    metrics::describe_histogram!(
        names::STAGE_SECONDS,
        "Per-stage latency (endpoint, asr, dialog, tts)"
    );
    metrics::describe_histogram!(
        names::TURN_SECONDS,
        "End of caller speech to first agent audio"
    );
    metrics::describe_counter!(names::BARGE_INS, "Times a caller interrupted the agent");
    metrics::describe_histogram!(
        names::LLM_TTFT_SECONDS,
        "LLM agent: first model request of a turn to its first token"
    );
    metrics::describe_histogram!(
        names::LLM_TOTAL_SECONDS,
        "LLM agent: first model request of a turn to the end of its last stream"
    );
    metrics::describe_histogram!(
        names::FIRST_PIECE_SECONDS,
        "Dialog asked to the first speakable piece of its reply"
    );
    metrics::describe_counter!(
        names::TOOL_CALLS,
        "LLM agent tool calls, by tool and result"
    );
    metrics::describe_counter!(names::ERRORS, "Errors, by stage");
    metrics::describe_gauge!(
        names::CONTROL_CONNECTED,
        "1 while the PBX control connection (ARI events, Event Socket) is up"
    );
    metrics::describe_counter!(
        names::RECORDS_DROPPED,
        "Call records dropped because the writer lagged"
    );
}

/// Where one call's records go. Cheap to clone; never blocks the call.
#[derive(Clone)]
pub struct Recorder {
    tx: Option<mpsc::Sender<Value>>,
    call_id: Arc<str>,
    dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// A recorder that keeps nothing.
    pub fn none() -> Self {
        Self {
            tx: None,
            call_id: Arc::from(""),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A recorder that hands records to `tx` (bounded).
    pub fn to_channel(call_id: &str, tx: mpsc::Sender<Value>) -> Self {
        Self {
            tx: Some(tx),
            call_id: Arc::from(call_id),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records an event of `kind` at `t_ms` with the fields of `fields` (an object).
    pub fn emit(&self, t_ms: u64, kind: &str, fields: Value) {
        let Some(tx) = &self.tx else { return };
        let mut obj = Map::new();
        obj.insert("t_ms".into(), json!(t_ms));
        obj.insert("type".into(), json!(kind));
        if !self.call_id.is_empty() {
            obj.insert("call_id".into(), json!(&*self.call_id));
        }
        if let Value::Object(f) = fields {
            obj.extend(f);
        }
        if tx.try_send(Value::Object(obj)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(names::RECORDS_DROPPED).increment(1);
        }
    }
}

/// One line of the conversation for people, or None for records that are not worth printing.
pub fn human_line(v: &Value) -> Option<String> {
    let t = v.get("t_ms")?.as_u64()? as f64 / 1000.0;
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let line = match v.get("type")?.as_str()? {
        "call_start" => format!("call started (flow {})", s("flow")),
        "agent_say" => format!("AGENT:  {}", s("text")),
        "transcript" => format!("CALLER: {}", s("text")),
        "dtmf" => format!("CALLER: [keypad {}]", s("digits")),
        "barge_in" => "-- caller interrupted the agent --".to_string(),
        "transfer" => format!("-> transfer to {}", s("target")),
        "hangup" => format!("-> hangup ({})", s("reason")),
        "error" => format!("!! {} error: {}", s("stage"), s("message")),
        "turn" => format!(
            "   (turn: endpoint {} ms, asr {} ms, dialog {} ms, tts {} ms, total {} ms)",
            v.get("endpoint_ms")?,
            v.get("asr_ms")?,
            v.get("dialog_ms")?,
            v.get("tts_ms")?,
            v.get("total_ms")?
        ),
        _ => return None,
    };
    Some(format!("[{t:7.2}s] {line}"))
}

/// Writes records as JSON lines to `path` (if any; appended to with `append`, else emptied
/// first) and prints the conversation (if asked), until every sender is gone.
pub fn spawn_writer(
    path: Option<&Path>,
    append: bool,
    print: bool,
) -> std::io::Result<(mpsc::Sender<Value>, WriterDone)> {
    let mut file = match path {
        // Appended to, never emptied: a restart (after a crash, say) keeps earlier calls' records.
        Some(p) if append => Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        )),
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    let (tx, mut rx) = mpsc::channel::<Value>(4096);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    // A thread of its own, not the blocking pool: the writer lives as long as `serve`, and a
    // blocking-pool task would hold tokio's paused clock still in tests.
    let mut write = move || -> std::io::Result<()> {
        while let Some(v) = rx.blocking_recv() {
            if let Some(f) = file.as_mut() {
                serde_json::to_writer(&mut *f, &v)?;
                f.write_all(b"\n")?;
            }
            if print && let Some(line) = human_line(&v) {
                println!("{line}");
            }
            // Long-running writers (serve) flush whenever they catch up, so records are on disk
            // while calls go on.
            if rx.is_empty()
                && let Some(f) = file.as_mut()
            {
                f.flush()?;
            }
        }
        if let Some(f) = file.as_mut() {
            f.flush()?;
        }
        Ok(())
    };
    std::thread::Builder::new()
        .name("sidecall-records".into())
        .spawn(move || {
            let _ = done_tx.send(write());
        })?;
    Ok((tx, done))
}

/// Resolves when the record writer has written everything and closed its file.
pub type WriterDone = tokio::sync::oneshot::Receiver<std::io::Result<()>>;

/// A lock-free latency histogram (microseconds, power-of-two-ish buckets) for benchmarks.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
    bounds: Vec<u64>,
    count: AtomicU64,
    over_limit: AtomicU64,
    limit_us: u64,
}

/// Bucket upper bounds in microseconds: 1, 2, 3, 4, 6, 8, 12, 16, ... up to ~16 s.
fn bucket_bounds() -> Vec<u64> {
    let mut v = Vec::new();
    let mut b = 1u64;
    while b < 16_000_000 {
        v.push(b);
        v.push(b + b / 2);
        b *= 2;
    }
    v.dedup();
    v
}

impl LatencyHistogram {
    /// A histogram that also counts values over `limit_us`.
    pub fn new(limit_us: u64) -> Self {
        let bounds = bucket_bounds();
        Self {
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            count: AtomicU64::new(0),
            over_limit: AtomicU64::new(0),
            limit_us,
        }
    }

    pub fn record_us(&self, us: u64) {
        // Called twice per call per tick in `bench`: no allocation, a binary search.
        let idx = self.bounds.partition_point(|&b| b < us);
        self.buckets[idx].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        if us > self.limit_us {
            self.over_limit.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn over_limit(&self) -> u64 {
        self.over_limit.load(Ordering::Relaxed)
    }

    /// The upper bound of the bucket holding quantile `q` (0..1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= want {
                return self.bounds.get(i).copied().unwrap_or(u64::MAX);
            }
        }
        u64::MAX
    }
}

/// Per-tick timing of call sessions, for `sidecall bench`.
#[derive(Debug)]
pub struct TickStats {
    /// Time spent handling one tick (turn detection, playout, timers).
    pub work: LatencyHistogram,
    /// How late each tick fired after its deadline; over 20 ms is a missed deadline.
    pub lateness: LatencyHistogram,
}

impl Default for TickStats {
    fn default() -> Self {
        Self {
            work: LatencyHistogram::new(20_000),
            lateness: LatencyHistogram::new(20_000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serve_records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.jsonl");
        for n in 0..2 {
            let (tx, done) = spawn_writer(Some(&path), true, false).unwrap();
            tx.send(serde_json::json!({"call": n})).await.unwrap();
            drop(tx);
            done.await.unwrap().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "the second start appended: {text}");
    }

    #[test]
    fn histogram_quantiles_and_limit() {
        let h = LatencyHistogram::new(20_000);
        for us in 1..=100 {
            h.record_us(us);
        }
        h.record_us(30_000);
        assert_eq!(h.count(), 101);
        assert_eq!(h.over_limit(), 1);
        let p50 = h.quantile_us(0.5);
        assert!((48..=64).contains(&p50), "{p50}");
        assert!(h.quantile_us(1.0) >= 30_000);
    }

    #[test]
    fn human_lines() {
        let v = json!({"t_ms": 1500, "type": "agent_say", "text": "Hello"});
        assert_eq!(human_line(&v).as_deref(), Some("[   1.50s] AGENT:  Hello"));
        assert_eq!(
            human_line(&json!({"t_ms": 1, "type": "speech_start"})),
            None
        );
    }
}
