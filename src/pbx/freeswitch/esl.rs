//! The Event Socket side of the FreeSWITCH adapter: one inbound connection (freeswitch-esl-tokio),
//! kept up with backoff (the crate has none of its own) and a liveness deadline, JSON events
//! turned into the few the adapter acts on, `bgapi` commands matched to their BACKGROUND_JOB by
//! Job-UUID (the result may arrive before the reply is read: both orders work), and `sendmsg`
//! playback with `event-lock` (without it a second playback nests instead of queueing).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use freeswitch_esl_tokio::{EslClient, EslConnectOptions, EslEvent, EventFormat};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Every event the adapter needs, CUSTOM subclasses last (every token after CUSTOM is one).
const SUBSCRIPTION: &str = "CHANNEL_PARK CHANNEL_HANGUP_COMPLETE DTMF BACKGROUND_JOB PLAYBACK_START PLAYBACK_STOP HEARTBEAT CUSTOM mod_audio_stream::play mod_audio_stream::connect mod_audio_stream::disconnect mod_audio_stream::error mod_audio_stream::json mod_audio_fork::connect mod_audio_fork::connect_failed mod_audio_fork::disconnect mod_audio_fork::error mod_audio_fork::buffer_overrun mod_audio_fork::json";
/// Results that came before their reply was read, kept this long at most (ours are waited for
/// within microseconds; other clients' jobs, which every subscriber sees, must not crowd them out).
const EARLY_KEEP: Duration = Duration::from_secs(5);
const EARLY_MAX: usize = 4_096;

/// Why an Event Socket command failed.
#[derive(Debug, thiserror::Error)]
pub enum EslError {
    #[error("no Event Socket connection")]
    NotConnected,
    #[error("FreeSWITCH did not answer within {0} ms")]
    Timeout(u64),
    #[error("no such channel")]
    NoSuchChannel,
    #[error("FreeSWITCH refused: {0}")]
    Refused(String),
    #[error("Event Socket: {0}")]
    Protocol(String),
}

/// An event the adapter acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum FsEvent {
    /// A channel parked; its variables (without the `variable_` prefix) say whether it is ours.
    Park {
        uuid: String,
        vars: HashMap<String, String>,
    },
    Dtmf {
        uuid: String,
        digit: char,
    },
    Hangup {
        uuid: String,
        cause: String,
    },
    PlaybackStop {
        uuid: String,
        file: String,
        done: bool,
    },
    /// mod_audio_stream wrote a `streamAudio` file (`body`: the data object with `file`).
    StreamPlay {
        uuid: String,
        body: serde_json::Value,
    },
    StreamConnected {
        uuid: String,
    },
    /// The stream failed or the far side closed it (`::error`, `::disconnect`).
    StreamFailed {
        uuid: String,
        why: String,
    },
    /// mod_audio_stream could not take a text message sidecall sent.
    StreamRejected {
        uuid: String,
        body: String,
    },
}

/// What the connection task tells the adapter.
#[derive(Debug)]
pub enum EslMsg {
    Connected,
    Disconnected(String),
    Event(FsEvent),
}

#[derive(Default)]
struct Jobs {
    waiting: HashMap<String, oneshot::Sender<String>>,
    early: HashMap<String, (Instant, String)>,
}

/// The shared Event Socket handle: commands go through whatever connection is up.
pub struct Esl {
    client: std::sync::Mutex<Option<EslClient>>,
    jobs: std::sync::Mutex<Jobs>,
    timeout: Duration,
}

impl Esl {
    fn client(&self) -> Result<EslClient, EslError> {
        self.client
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .ok_or(EslError::NotConnected)
    }

    fn timeout_ms(&self) -> u64 {
        u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs `cmd` with `bgapi` and waits (bounded) for its BACKGROUND_JOB. `+OK...` is success;
    /// `-ERR No such channel` is `NoSuchChannel`; any other `-ERR` is `Refused`.
    pub async fn bgapi(&self, cmd: &str) -> Result<String, EslError> {
        let client = self.client()?;
        let reply = tokio::time::timeout(self.timeout, client.bgapi(cmd))
            .await
            .map_err(|_| EslError::Timeout(self.timeout_ms()))?
            .map_err(|e| EslError::Protocol(e.to_string()))?;
        let job = reply
            .job_uuid()
            .map(str::to_string)
            .ok_or_else(|| EslError::Protocol("bgapi reply without a Job-UUID".into()))?;
        let rx = {
            let mut jobs = self
                .jobs
                .lock()
                .map_err(|_| EslError::Protocol("job table poisoned".into()))?;
            if let Some((_, body)) = jobs.early.remove(&job) {
                return outcome(body);
            }
            let (tx, rx) = oneshot::channel();
            jobs.waiting.insert(job.clone(), tx);
            rx
        };
        let result = tokio::time::timeout(self.timeout, rx).await;
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.waiting.remove(&job);
        }
        match result {
            Ok(Ok(body)) => outcome(body),
            // The connection went (its jobs' results are delivered on it only).
            Ok(Err(_)) => Err(EslError::NotConnected),
            Err(_) => Err(EslError::Timeout(self.timeout_ms())),
        }
    }

    /// Queues `file` for playback on `uuid` (`event-lock`: in order, never nested).
    pub async fn play(&self, uuid: &str, file: &str) -> Result<(), EslError> {
        let client = self.client()?;
        let mut msg = EslEvent::new();
        msg.set_header("call-command", "execute");
        msg.set_header("execute-app-name", "playback");
        msg.set_header("execute-app-arg", file);
        msg.set_header("event-lock", "true");
        let reply = tokio::time::timeout(self.timeout, client.sendmsg(Some(uuid), msg))
            .await
            .map_err(|_| EslError::Timeout(self.timeout_ms()))?;
        match reply {
            Ok(_) => Ok(()),
            Err(e) => {
                let text = e.to_string();
                if text.to_ascii_lowercase().contains("no such channel") {
                    Err(EslError::NoSuchChannel)
                } else {
                    Err(EslError::Refused(text))
                }
            }
        }
    }

    /// A BACKGROUND_JOB arrived: to its waiter, or kept until the reply is read.
    fn job_done(&self, job: String, body: String) {
        let Ok(mut jobs) = self.jobs.lock() else {
            return;
        };
        if let Some(tx) = jobs.waiting.remove(&job) {
            let _ = tx.send(body);
            return;
        }
        // Another client's job (BACKGROUND_JOB goes to every subscriber), or ours early.
        let now = Instant::now();
        jobs.early
            .retain(|_, (at, _)| now.duration_since(*at) < EARLY_KEEP);
        if jobs.early.len() < EARLY_MAX {
            jobs.early.insert(job, (now, body));
        }
    }

    /// The connection went: nobody waits for results that will never come.
    fn connection_lost(&self) {
        if let Ok(mut c) = self.client.lock() {
            *c = None;
        }
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.waiting.clear();
            jobs.early.clear();
        }
    }
}

fn outcome(body: String) -> Result<String, EslError> {
    let text = body.trim();
    if text.starts_with("+OK") || !text.starts_with('-') {
        return Ok(text.to_string());
    }
    if text.to_ascii_lowercase().contains("no such channel") {
        return Err(EslError::NoSuchChannel);
    }
    Err(EslError::Refused(text.to_string()))
}

/// Settings of the connection task.
pub struct EslSettings {
    pub address: String,
    pub password: String,
    pub request_timeout: Duration,
    pub silence: Duration,
}

/// Starts the connection task: it connects, subscribes, reports events, and reconnects with
/// backoff (0.5 s doubling to 10 s) until `stop`.
pub fn spawn(
    settings: EslSettings,
    connected: Arc<AtomicBool>,
    stop: CancellationToken,
) -> (Arc<Esl>, mpsc::Receiver<EslMsg>) {
    let esl = Arc::new(Esl {
        client: std::sync::Mutex::new(None),
        jobs: std::sync::Mutex::new(Jobs::default()),
        timeout: settings.request_timeout,
    });
    let (tx, rx) = mpsc::channel(1_024);
    tokio::spawn(run(settings, esl.clone(), connected, tx, stop));
    (esl, rx)
}

async fn run(
    s: EslSettings,
    esl: Arc<Esl>,
    connected: Arc<AtomicBool>,
    tx: mpsc::Sender<EslMsg>,
    stop: CancellationToken,
) {
    let (host, port) = match s.address.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse::<u16>().unwrap_or(8021)),
        None => (s.address.clone(), 8021),
    };
    let mut backoff = Duration::from_millis(500);
    loop {
        let options = EslConnectOptions::new().with_connect_timeout(s.request_timeout);
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = EslClient::connect_with_options(&host, port, &s.password, options) => r,
        };
        let why = match attempt {
            Err(e) => format!("connect: {e}"),
            Ok((client, mut events)) => {
                client.set_command_timeout(s.request_timeout);
                let subscribed = client
                    .subscribe_events_raw(EventFormat::Json, SUBSCRIPTION)
                    .await;
                match subscribed {
                    Err(e) => format!("subscribe: {e}"),
                    Ok(()) => {
                        // HEARTBEAT every ~20 s keeps an idle connection's deadline fed.
                        client.set_liveness_timeout(s.silence);
                        if let Ok(mut c) = esl.client.lock() {
                            *c = Some(client.clone());
                        }
                        connected.store(true, Ordering::Relaxed);
                        metrics::gauge!(crate::telemetry::names::CONTROL_CONNECTED, "pbx" => "freeswitch").set(1.0);
                        backoff = Duration::from_millis(500);
                        tracing::info!(address = %s.address, "Event Socket connected");
                        let _ = tx.send(EslMsg::Connected).await;
                        let why = loop {
                            let ev = tokio::select! {
                                _ = stop.cancelled() => {
                                    let _ = tokio::time::timeout(Duration::from_secs(1), client.exit()).await;
                                    break "stopping".to_string();
                                }
                                ev = events.recv() => ev,
                            };
                            match ev {
                                None => break "connection closed".to_string(),
                                Some(Err(e)) => {
                                    if e.is_connection_error() {
                                        break e.to_string();
                                    }
                                    tracing::warn!(error = %e, "bad Event Socket message; skipped");
                                }
                                Some(Ok(ev)) => {
                                    if let Some(msg) = read_event(&esl, &ev)
                                        && tx.send(EslMsg::Event(msg)).await.is_err()
                                    {
                                        return;
                                    }
                                }
                            }
                        };
                        connected.store(false, Ordering::Relaxed);
                        metrics::gauge!(crate::telemetry::names::CONTROL_CONNECTED, "pbx" => "freeswitch").set(0.0);
                        esl.connection_lost();
                        why
                    }
                }
            }
        };
        if stop.is_cancelled() {
            return;
        }
        tracing::warn!(why = %why, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "Event Socket down; reconnecting");
        let _ = tx.send(EslMsg::Disconnected(why)).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The header `name` of a JSON event (values are strings), or "".
fn header<'a>(ev: &'a EslEvent, name: &str) -> &'a str {
    ev.header_str(name).unwrap_or_default()
}

/// Turns an event into what the adapter acts on (None: nothing to do).
fn read_event(esl: &Esl, ev: &EslEvent) -> Option<FsEvent> {
    let uuid = header(ev, "Unique-ID").to_string();
    match header(ev, "Event-Name") {
        "BACKGROUND_JOB" => {
            let job = header(ev, "Job-UUID").to_string();
            if !job.is_empty() {
                esl.job_done(job, ev.body().unwrap_or_default().to_string());
            }
            None
        }
        "HEARTBEAT" | "PLAYBACK_START" => None,
        _ if uuid.is_empty() => None,
        "CHANNEL_PARK" => {
            let mut vars: HashMap<String, String> = ev
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("variable_")?.to_string(), v.clone())))
                .collect();
            let number = header(ev, "Caller-Caller-ID-Number");
            if !number.is_empty() {
                vars.insert("Caller-Caller-ID-Number".into(), number.to_string());
            }
            Some(FsEvent::Park { uuid, vars })
        }
        "DTMF" => {
            let digit = header(ev, "DTMF-Digit").chars().next()?;
            Some(FsEvent::Dtmf { uuid, digit })
        }
        "CHANNEL_HANGUP_COMPLETE" => Some(FsEvent::Hangup {
            uuid,
            cause: header(ev, "Hangup-Cause").to_string(),
        }),
        "PLAYBACK_STOP" => Some(FsEvent::PlaybackStop {
            uuid,
            file: header(ev, "Playback-File-Path").to_string(),
            done: header(ev, "Playback-Status") != "break",
        }),
        "CUSTOM" => {
            let body = ev.body().unwrap_or_default();
            match header(ev, "Event-Subclass") {
                "mod_audio_stream::play" => match serde_json::from_str(body) {
                    Ok(body) => Some(FsEvent::StreamPlay { uuid, body }),
                    Err(e) => {
                        tracing::warn!(%uuid, error = %e, "mod_audio_stream::play body is not JSON");
                        None
                    }
                },
                "mod_audio_stream::connect" | "mod_audio_fork::connect" => {
                    Some(FsEvent::StreamConnected { uuid })
                }
                "mod_audio_fork::buffer_overrun" => {
                    tracing::warn!(%uuid, "mod_audio_fork: buffer overrun");
                    None
                }
                "mod_audio_stream::error"
                | "mod_audio_stream::disconnect"
                | "mod_audio_fork::connect_failed"
                | "mod_audio_fork::error"
                | "mod_audio_fork::disconnect" => Some(FsEvent::StreamFailed {
                    uuid,
                    why: format!(
                        "{}: {}",
                        header(ev, "Event-Subclass"),
                        body.chars().take(200).collect::<String>()
                    ),
                }),
                "mod_audio_stream::json" | "mod_audio_fork::json" => {
                    Some(FsEvent::StreamRejected {
                        uuid,
                        body: body.chars().take(200).collect(),
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_bodies_read_as_outcomes() {
        assert_eq!(outcome("+OK\n".into()).unwrap(), "+OK");
        assert!(matches!(
            outcome("-ERR No such channel!\n".into()),
            Err(EslError::NoSuchChannel)
        ));
        assert!(matches!(
            outcome("-ERR invalid\n".into()),
            Err(EslError::Refused(_))
        ));
    }

    #[tokio::test]
    async fn a_result_before_its_reply_is_kept_for_it() {
        let esl = Esl {
            client: std::sync::Mutex::new(None),
            jobs: std::sync::Mutex::new(Jobs::default()),
            timeout: Duration::from_secs(1),
        };
        esl.job_done("job-1".into(), "+OK done".into());
        let early = esl.jobs.lock().unwrap().early.remove("job-1");
        assert_eq!(early.map(|(_, b)| b).as_deref(), Some("+OK done"));
    }
}
