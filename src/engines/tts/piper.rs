//! Piper neural TTS (PyPI `piper-tts`), offline: long-lived worker processes
//! (`scripts/piper_worker.py`, embedded here and run with the configured Python), each holding
//! the voice loaded, one synthesis at a time each. A long sentence comes back clause by clause,
//! each clause as soon as it is made, resampled to the call's rate.
//!
//! A worker that stops answering within `tts.timeout_ms`, dies or writes garbage is killed and
//! replaced at the next request. A synthesis whose caller went away (a barge-in) is cancelled:
//! the worker stops after the clause in hand, so the next reply does not wait for the rest of
//! one nobody hears; what it still sends is read to its end before the worker takes another,
//! so no audio ever reaches the wrong request.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{STREAM_DEPTH, Tts, TtsError, TtsStream};
use crate::audio::l16;
use crate::audio::resample::StreamResampler;
use crate::config::TtsConfig;

/// The worker, run as `python -c`.
const WORKER: &str = include_str!("../../../scripts/piper_worker.py");

/// Loading the voice (and Python's imports) on a cold machine.
const START_LIMIT: Duration = Duration::from_secs(60);

/// The largest frame a worker may send (a clause of a minute at 48 kHz is 5.8 MB).
const MAX_FRAME: usize = 16 << 20;

pub struct Piper {
    python: String,
    voice: String,
    length_scale: f32,
    timeout: Duration,
    slots: Arc<Semaphore>,
    /// Callers' syntheses waiting for a worker: background work (the prompt cache) waits for
    /// none to be waiting, and never takes the last free worker when there are several.
    live_waiting: Arc<AtomicUsize>,
    workers: usize,
    idle: Arc<Mutex<Vec<Worker>>>,
    /// The last request's id (a cancel names the request it stops).
    request_id: AtomicU64,
    /// Requests cancelled before their end (a barge-in), and the audio their workers made
    /// that nobody heard (ms).
    cancelled: Arc<Cancelled>,
}

/// What cancelled syntheses cost.
#[derive(Debug, Default)]
struct Cancelled {
    requests: AtomicU64,
    discarded_ms: AtomicU64,
}

/// How long background work (filling the prompt cache at start) may wait for a free worker.
const BACKGROUND_LIMIT: Duration = Duration::from_secs(120);

struct Worker {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    rate: u32,
}

fn ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One frame from a worker.
enum Frame {
    Ready(u32),
    Audio(Vec<i16>),
    End,
    Failed(String),
}

async fn read_frame(out: &mut BufReader<ChildStdout>) -> Result<Frame, TtsError> {
    let bad = |e: std::io::Error| TtsError::Engine(format!("the Piper worker stopped: {e}"));
    let kind = out.read_u8().await.map_err(bad)?;
    let len = usize::try_from(out.read_u32_le().await.map_err(bad)?).unwrap_or(usize::MAX);
    if len > MAX_FRAME {
        return Err(TtsError::BadAudio(format!(
            "a Piper frame of {len} bytes (most {MAX_FRAME})"
        )));
    }
    let mut payload = vec![0u8; len];
    out.read_exact(&mut payload).await.map_err(bad)?;
    match kind {
        b'R' => {
            let v: serde_json::Value = serde_json::from_slice(&payload)
                .map_err(|e| TtsError::BadAudio(format!("Piper's ready frame: {e}")))?;
            let rate = v["sample_rate"]
                .as_u64()
                .and_then(|r| u32::try_from(r).ok())
                .filter(|r| (8_000..=48_000).contains(r))
                .ok_or_else(|| TtsError::BadAudio(format!("Piper's sample rate in {v}")))?;
            Ok(Frame::Ready(rate))
        }
        b'A' if len.is_multiple_of(2) => Ok(Frame::Audio(l16::decode_le(&payload))),
        b'E' => Ok(Frame::End),
        b'X' => Ok(Frame::Failed(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        k => Err(TtsError::BadAudio(format!(
            "a Piper frame of kind {k:#x} and {len} bytes"
        ))),
    }
}

impl Piper {
    pub fn new(cfg: &TtsConfig) -> Self {
        let workers = cfg.piper.workers.max(1);
        Self {
            python: cfg.piper.python.clone(),
            voice: cfg.piper.voice.clone(),
            length_scale: cfg.piper.length_scale,
            timeout: Duration::from_millis(cfg.timeout_ms),
            slots: Arc::new(Semaphore::new(workers)),
            live_waiting: Arc::new(AtomicUsize::new(0)),
            workers,
            idle: Arc::new(Mutex::new(Vec::with_capacity(workers))),
            request_id: AtomicU64::new(0),
            cancelled: Arc::new(Cancelled::default()),
        }
    }

    /// Syntheses cancelled so far because nobody listened any more (a barge-in), and the
    /// audio (ms) their workers made after that, which nobody heard.
    pub fn cancelled(&self) -> (u64, u64) {
        let c = &self.cancelled;
        (
            c.requests.load(Ordering::Relaxed),
            c.discarded_ms.load(Ordering::Relaxed),
        )
    }

    async fn spawn(&self) -> Result<Worker, TtsError> {
        let mut child = tokio::process::Command::new(&self.python)
            .arg("-c")
            .arg(WORKER)
            .arg("--model")
            .arg(&self.voice)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Its tracebacks reach sidecall's log output.
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TtsError::Engine(format!("cannot run {}: {e}", self.python)))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(TtsError::Engine("the Piper worker has no pipes".into()));
        };
        let mut stdout = BufReader::new(stdout);
        let first = tokio::time::timeout(START_LIMIT, read_frame(&mut stdout))
            .await
            .map_err(|_| TtsError::Timeout(ms_of(START_LIMIT)))??;
        match first {
            Frame::Ready(rate) => {
                tracing::info!(voice = %self.voice, rate, "Piper worker ready");
                Ok(Worker {
                    _child: child,
                    stdin,
                    stdout,
                    rate,
                })
            }
            Frame::Failed(m) => Err(TtsError::Engine(m)),
            _ => Err(TtsError::BadAudio("the Piper worker did not start".into())),
        }
    }
}

#[async_trait]
impl Tts for Piper {
    async fn synthesize(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError> {
        let ms = ms_of(self.timeout);
        self.live_waiting.fetch_add(1, Ordering::SeqCst);
        let permit = tokio::time::timeout(self.timeout, self.slots.clone().acquire_owned()).await;
        self.live_waiting.fetch_sub(1, Ordering::SeqCst);
        let permit = permit
            .map_err(|_| TtsError::Timeout(ms))?
            .map_err(|_| TtsError::Engine("Piper is shut down".into()))?;
        self.run(permit, text, rate).await
    }

    async fn synthesize_background(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError> {
        let deadline = tokio::time::Instant::now() + BACKGROUND_LIMIT;
        // Left for callers: one worker when there are several.
        let spare = usize::from(self.workers > 1);
        loop {
            if self.live_waiting.load(Ordering::SeqCst) == 0
                && self.slots.available_permits() > spare
                && let Ok(permit) = self.slots.clone().try_acquire_owned()
            {
                return self.run(permit, text, rate).await;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TtsError::Timeout(ms_of(BACKGROUND_LIMIT)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Piper {
    /// One synthesis on a worker (`permit` held until its last frame is read).
    async fn run(
        &self,
        permit: OwnedSemaphorePermit,
        text: &str,
        rate: u32,
    ) -> Result<TtsStream, TtsError> {
        let ms = ms_of(self.timeout);
        let id = self
            .request_id
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let line = serde_json::json!({"id": id, "text": text, "length_scale": self.length_scale});
        let line = format!("{line}\n");
        // An idle worker may have died since its last request: then a fresh one, once.
        let mut worker = None;
        for _ in 0..2 {
            let reused = self.idle.lock().await.pop();
            let fresh = reused.is_none();
            let mut w = match reused {
                Some(w) => w,
                None => self.spawn().await?,
            };
            let send = async {
                w.stdin.write_all(line.as_bytes()).await?;
                w.stdin.flush().await
            };
            match tokio::time::timeout(self.timeout, send).await {
                Ok(Ok(())) => {
                    worker = Some(w);
                    break;
                }
                // The worker is gone: dropped (killed).
                Ok(Err(e)) if fresh => {
                    return Err(TtsError::Engine(format!("the Piper worker stopped: {e}")));
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "an idle Piper worker had stopped; starting another")
                }
                Err(_) => return Err(TtsError::Timeout(ms)),
            }
        }
        let Some(worker) = worker else {
            return Err(TtsError::Engine("no Piper worker would start".into()));
        };
        let mut resampler = StreamResampler::new(worker.rate, rate)
            .map_err(|e| TtsError::BadAudio(e.to_string()))?;
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let (idle, timeout, cancelled) = (self.idle.clone(), self.timeout, self.cancelled.clone());
        let Worker {
            _child: child,
            stdin,
            mut stdout,
            rate: worker_rate,
        } = worker;
        // Cancels the request when nobody listens any more (the receiver dropped: a barge-in);
        // gives the worker's stdin back when the request is over.
        let (over_tx, over_rx) = oneshot::channel::<()>();
        let watcher = tokio::spawn(cancel_on_close(tx.clone(), over_rx, stdin, id, timeout));
        tokio::spawn(async move {
            let _permit = permit;
            let mut ended = false;
            // The request ended while its reader still listened (a cancel after that is late).
            let mut ended_heard = false;
            let mut discarded: u64 = 0;
            loop {
                let frame = match tokio::time::timeout(timeout, read_frame(&mut stdout)).await {
                    Ok(Ok(f)) => f,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "Piper worker replaced");
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(ms, "Piper worker silent; replaced");
                        let _ = tx.send(Err(TtsError::Timeout(ms))).await;
                        break;
                    }
                };
                match frame {
                    Frame::Audio(samples) => {
                        if tx.is_closed() {
                            // Nobody listens (a barge-in): read on to the end, resample nothing.
                            discarded = discarded
                                .saturating_add(u64::try_from(samples.len()).unwrap_or(u64::MAX));
                            continue;
                        }
                        // A clause is a few hundred ms of CPU-light resampling, off the workers.
                        let out = tokio::task::spawn_blocking(move || {
                            let mut out = Vec::with_capacity(samples.len() * 2);
                            let r = resampler.process(&samples, &mut out);
                            (resampler, out, r)
                        })
                        .await;
                        let Ok((r, out, result)) = out else {
                            let _ = tx
                                .send(Err(TtsError::Engine(
                                    "resampling Piper's audio failed".into(),
                                )))
                                .await;
                            break;
                        };
                        resampler = r;
                        if let Err(e) = result {
                            let _ = tx.send(Err(TtsError::BadAudio(e.to_string()))).await;
                            continue;
                        }
                        if !out.is_empty() {
                            let _ = tx.send(Ok(out)).await;
                        }
                    }
                    Frame::End => {
                        ended_heard = !tx.is_closed();
                        let mut tail = Vec::new();
                        if resampler.flush(&mut tail).is_ok() && !tail.is_empty() {
                            let _ = tx.send(Ok(tail)).await;
                        }
                        ended = true;
                        break;
                    }
                    Frame::Failed(m) => {
                        let _ = tx.send(Err(TtsError::Engine(m))).await;
                        ended = true;
                        break;
                    }
                    Frame::Ready(_) => {
                        let _ = tx
                            .send(Err(TtsError::BadAudio(
                                "Piper restarted mid-request".into(),
                            )))
                            .await;
                        break;
                    }
                }
            }
            // The stream ends for its reader now.
            drop(tx);
            let _ = over_tx.send(());
            let (stdin, sent_cancel) = watcher.await.unwrap_or_default();
            if sent_cancel && !ended_heard {
                cancelled.requests.fetch_add(1, Ordering::Relaxed);
            }
            let ms = discarded.saturating_mul(1_000) / u64::from(worker_rate.max(1));
            cancelled.discarded_ms.fetch_add(ms, Ordering::Relaxed);
            // A worker that ended its request cleanly, with its stdin whole, takes the next;
            // any other is dropped (killed) and replaced at the next request.
            if let (true, Some(stdin)) = (ended, stdin) {
                idle.lock().await.push(Worker {
                    _child: child,
                    stdin,
                    stdout,
                    rate: worker_rate,
                });
            }
        });
        Ok(rx)
    }
}

/// Waits for the request to be over (`over`) or for nobody to listen any more (`tx` closed):
/// then asks the worker to stop request `id`. Gives back the worker's stdin (`None`: it could
/// not be written: the worker is not reused) and whether a cancel went out.
async fn cancel_on_close(
    tx: mpsc::Sender<Result<Vec<i16>, TtsError>>,
    over: oneshot::Receiver<()>,
    mut stdin: ChildStdin,
    id: u64,
    timeout: Duration,
) -> (Option<ChildStdin>, bool) {
    tokio::select! {
        biased;
        _ = over => return (Some(stdin), false),
        () = tx.closed() => {}
    }
    drop(tx);
    let line = format!("{}\n", serde_json::json!({ "cancel": id }));
    let send = async {
        stdin.write_all(line.as_bytes()).await?;
        stdin.flush().await
    };
    match tokio::time::timeout(timeout, send).await {
        Ok(Ok(())) => (Some(stdin), true),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot cancel a Piper synthesis; the worker is replaced");
            (None, false)
        }
        Err(_) => (None, false),
    }
}
