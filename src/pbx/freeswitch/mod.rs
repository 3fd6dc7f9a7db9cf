//! The FreeSWITCH adapter: mod_audio_stream carries a call's audio over a WebSocket to sidecall
//! (`media`), the Event Socket carries control and events (`esl`), and agent audio plays
//! through stock mod_audio_stream's `streamAudio` files (`playback`). The dialplan answers,
//! sets `sidecall=true` (and optionally `sidecall_flow`), starts the stream to sidecall with the
//! token, and parks; sidecall does the rest through the PBX-neutral supervisor: capacity,
//! draining, overflow when a stream fails or never comes.

pub mod esl;
pub mod fork;
pub mod media;
pub mod playback;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::call::link::{CallControl, ControlError, Target};
use crate::config::Config;
use crate::pbx::codec::WireFormat;
use crate::pbx::events::{CallEvents, DtmfSource};
use crate::pbx::supervisor::{Slot, Supervisor};
use crate::pbx::{CallArgs, PartsFactory};
use crate::telemetry::Recorder;
use esl::{Esl, EslError, EslMsg, FsEvent};
use playback::{Playback, PlayerCmd, StockLink};

/// Why the FreeSWITCH adapter could not run.
#[derive(Debug, thiserror::Error)]
pub enum FreeSwitchError {
    #[error("the Event Socket password is not set: export {0}")]
    NoPassword(String),
    #[error("the media token is not set: export {0}")]
    NoToken(String),
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
}

/// The adapter `serve` runs when `[freeswitch] enabled = true`.
pub struct FreeSwitch {
    cfg: Arc<Config>,
}

impl FreeSwitch {
    pub fn new(cfg: Arc<Config>) -> Self {
        Self { cfg }
    }
}

#[async_trait]
impl crate::pbx::Adapter for FreeSwitch {
    fn name(&self) -> &'static str {
        "freeswitch"
    }

    fn describe(&self) -> String {
        let f = &self.cfg.freeswitch;
        format!(
            "freeswitch (Event Socket {}, media on ws://{}/fs/<uuid>)",
            f.esl_address, f.media_listen
        )
    }

    async fn run(
        &self,
        sup: Arc<Supervisor>,
        parts: PartsFactory,
        records: Option<mpsc::Sender<serde_json::Value>>,
        stop: CancellationToken,
    ) -> Result<(), crate::pbx::PbxError> {
        Ok(run(self.cfg.clone(), parts, sup, records, stop).await?)
    }
}

/// What the adapter knows of one live call.
#[derive(Clone)]
struct Live {
    events: CallEvents,
    playback: Arc<Playback>,
    /// The `sidecall` marker of the entry this call serves (learnt from the park).
    marker: Arc<std::sync::Mutex<Option<String>>>,
}

struct Shared {
    cfg: Arc<Config>,
    esl: Arc<Esl>,
    parts: PartsFactory,
    records: Option<mpsc::Sender<serde_json::Value>>,
    calls: std::sync::Mutex<HashMap<String, Live>>,
    /// Channels that parked for sidecall and whose media has not come yet.
    expected: std::sync::Mutex<HashMap<String, Expected>>,
    /// Channels served, with the `sidecall` marker they came with: channel variables outlive a
    /// transfer, so a transfer target that parks the caller again (a human's queue) would
    /// otherwise look like a new call whose media never came.
    served: std::sync::Mutex<HashMap<String, (std::time::Instant, String)>>,
    /// Callers to send to overflow once the Event Socket is back.
    retry: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Callers kept for an overflow retry at most.
const RETRY_MAX: usize = 10_000;

/// A channel that parked for sidecall: the media deadline's cancel, its `sidecall_flow`, and
/// its `sidecall` marker.
struct Expected {
    cancel: CancellationToken,
    /// `sidecall_flow`, `sidecall_agent` and the caller's number from the park.
    park: CallArgs,
    marker: String,
}

/// How long a served channel's marker is remembered.
const SERVED_KEEP: Duration = Duration::from_secs(3_600);
const SERVED_MAX: usize = 100_000;

impl Shared {
    fn call(&self, uuid: &str) -> Option<Live> {
        self.calls.lock().ok()?.get(uuid).cloned()
    }

    /// Remembers that `uuid` was served with `marker`.
    fn note_served(&self, uuid: &str, marker: &str) {
        if let Ok(mut m) = self.served.lock() {
            let now = std::time::Instant::now();
            if m.len() >= SERVED_MAX {
                m.retain(|_, (at, _)| now.duration_since(*at) < SERVED_KEEP);
            }
            if m.len() < SERVED_MAX {
                m.insert(uuid.to_string(), (now, marker.to_string()));
            }
        }
    }

    /// A park with the marker of a call already served: a variable left over, not a new entry
    /// into sidecall (the dialplan sets `sidecall=${create_uuid()}` on every entry).
    fn stale_park(&self, uuid: &str, marker: &str) -> bool {
        self.served.lock().ok().is_some_and(|m| {
            m.get(uuid)
                .is_some_and(|(at, seen)| seen == marker && at.elapsed() < SERVED_KEEP)
        })
    }

    fn recorder(&self, uuid: &str) -> Recorder {
        match &self.records {
            Some(tx) => Recorder::to_channel(uuid, tx.clone()),
            None => Recorder::none(),
        }
    }

    /// Sends a caller sidecall will not (or can no longer) serve to the overflow target; if
    /// that fails, hangs up. A caller already gone is done.
    async fn to_overflow(&self, uuid: &str, why: &str) {
        let target = &self.cfg.freeswitch.overflow_target;
        tracing::warn!(%uuid, why, %target, "sending caller to the overflow target");
        let sent = match self.cfg.transfers.get(target) {
            Some(t) => transfer(&self.esl, stream_api(&self.cfg), uuid, &Target::from(t)).await,
            None => Err(EslError::Refused(format!(
                "no [transfers] entry `{target}`"
            ))),
        };
        match sent {
            Ok(()) | Err(EslError::NoSuchChannel) => {}
            Err(EslError::NotConnected) => {
                // Nothing can reach FreeSWITCH now: tried again as soon as it is back (and the
                // dialplan's backstop transfer covers the time until then).
                tracing::warn!(%uuid, "Event Socket down; the caller goes to overflow when it is back");
                if let Ok(mut r) = self.retry.lock()
                    && r.len() < RETRY_MAX
                {
                    r.insert(uuid.to_string());
                }
            }
            // No answer: the transfer may have happened; a hangup could cut off a caller who
            // already reached the human (the dialplan's backstop covers the rest).
            Err(e @ EslError::Timeout(_)) => {
                tracing::warn!(%uuid, error = %e, "overflow transfer not confirmed");
            }
            Err(e) => {
                tracing::warn!(%uuid, error = %e, "overflow transfer failed; hanging up");
                let _ = self
                    .esl
                    .bgapi(&format!("uuid_kill {uuid} NORMAL_TEMPORARY_FAILURE"))
                    .await;
            }
        }
    }

    /// Replaces the dialplan's `sched_transfer` backstop by one after `max_duration_s` (and a
    /// minute): sidecall holds the call now, but should it die, the caller still reaches the
    /// overflow target.
    async fn backstop(&self, uuid: &str) {
        let _ = self.esl.bgapi(&format!("sched_del {uuid}")).await;
        let target = self.cfg.transfers.get(&self.cfg.freeswitch.overflow_target);
        if let Some(Target::Dialplan {
            context, extension, ..
        }) = target.map(Target::from)
        {
            let secs = self.cfg.call.max_duration_s.saturating_add(60);
            let cmd = format!("sched_transfer +{secs} {uuid} {extension} XML {context}");
            if let Err(e) = self.esl.bgapi(&cmd).await {
                tracing::debug!(%uuid, error = %e, "backstop not scheduled");
            }
        }
    }

    /// After a media close: did the caller hang up? The close often comes before
    /// CHANNEL_HANGUP_COMPLETE; wait for it a moment, then ask FreeSWITCH.
    async fn caller_left(&self, events: &CallEvents, uuid: &str) -> bool {
        for _ in 0..50 {
            if events.caller_gone() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        matches!(
            self.esl
                .bgapi(&format!("uuid_exists {uuid}"))
                .await
                .as_deref(),
            Ok("false")
        )
    }
}

/// `uuid_transfer` to a dialplan extension, or to a dial string through `bridge`. The dialplan's
/// backstop (`sched_transfer`, group = the channel's uuid) is cancelled first: it would take the
/// caller away from wherever they were sent.
/// The media stream is stopped first too: it would survive the transfer, and a target that
/// hands the caller back to sidecall must be able to start a new one.
/// Both go out at once with a short limit, so the whole transfer stays within the call's
/// control deadline.
async fn transfer(esl: &Esl, api: &str, uuid: &str, t: &Target) -> Result<(), EslError> {
    let (del, stop) = (format!("sched_del {uuid}"), format!("{api} {uuid} stop"));
    let first = Duration::from_millis(1_000);
    let (d, s) = tokio::join!(
        tokio::time::timeout(first, esl.bgapi(&del)),
        tokio::time::timeout(first, esl.bgapi(&stop))
    );
    if !matches!(d, Ok(Ok(_))) {
        tracing::debug!(%uuid, "sched_del did not succeed (no backstop scheduled?)");
    }
    if !matches!(s, Ok(Ok(_))) {
        tracing::debug!(%uuid, "stopping the stream before the transfer did not succeed");
    }
    let cmd = match t {
        Target::Dialplan {
            context, extension, ..
        } => format!("uuid_transfer {uuid} {extension} XML {context}"),
        Target::Endpoint(dial) => format!("uuid_transfer {uuid} 'bridge:{dial}' inline"),
    };
    esl.bgapi(&cmd).await.map(|_| ())
}

fn control_error(e: EslError) -> ControlError {
    match e {
        EslError::NoSuchChannel => ControlError::NotFound,
        EslError::Timeout(ms) => ControlError::Timeout(ms),
        EslError::NotConnected => ControlError::Unreachable(e.to_string()),
        EslError::Refused(m) | EslError::Protocol(m) => ControlError::Refused(m),
    }
}

/// Where a FreeSWITCH caller goes at the end of a call.
struct FsRoute<'a> {
    shared: &'a Shared,
    uuid: &'a str,
    events: &'a CallEvents,
}

#[async_trait]
impl crate::pbx::supervisor::CallerRoute for FsRoute<'_> {
    async fn to_overflow(&self, why: &str) {
        self.shared.to_overflow(self.uuid, why).await;
    }

    async fn caller_left(&self) -> bool {
        self.shared.caller_left(self.events, self.uuid).await
    }
}

/// Acting on a FreeSWITCH call through the Event Socket.
struct FsControl {
    esl: Arc<Esl>,
    uuid: String,
    /// Stock playback's player (None: audio_fork, whose link sends killAudio itself).
    player: Option<mpsc::Sender<PlayerCmd>>,
    /// The stream's API (`uuid_audio_stream` or `uuid_audio_fork`).
    api: &'static str,
}

/// The API that controls the media stream in the configured playback mode.
fn stream_api(cfg: &Config) -> &'static str {
    if cfg.freeswitch.playback == "audio_fork" {
        "uuid_audio_fork"
    } else {
        "uuid_audio_stream"
    }
}

#[async_trait]
impl CallControl for FsControl {
    async fn answer(&self) -> Result<(), ControlError> {
        // The dialplan answered before it started the stream.
        Ok(())
    }

    async fn send_dtmf(&self, digits: &str) -> Result<(), ControlError> {
        if digits.is_empty() || !digits.chars().all(|c| "0123456789*#ABCDabcd".contains(c)) {
            return Err(ControlError::Refused(format!(
                "`{digits}` are not DTMF keys"
            )));
        }
        self.esl
            .bgapi(&format!("uuid_send_dtmf {} {digits}", self.uuid))
            .await
            .map(|_| ())
            .map_err(control_error)
    }

    async fn transfer(&self, name: &str, target: &Target) -> Result<(), ControlError> {
        tracing::info!(uuid = %self.uuid, target = name, "transferring");
        transfer(&self.esl, self.api, &self.uuid, target)
            .await
            .map_err(control_error)
    }

    async fn hangup(&self, _reason: &str) -> Result<(), ControlError> {
        self.esl
            .bgapi(&format!("uuid_kill {} NORMAL_CLEARING", self.uuid))
            .await
            .map(|_| ())
            .map_err(control_error)
    }

    /// Barge-in: `uuid_break all` through the call's player, so it comes after every playback
    /// already asked for and before any asked later.
    async fn stop_playback(&self) -> Result<(), ControlError> {
        match &self.player {
            Some(p) => p
                .send(PlayerCmd::Break)
                .await
                .map_err(|_| ControlError::NotFound),
            None => Ok(()),
        }
    }
}

/// Runs a call's playback commands in order: queued files (only those of the current epoch:
/// a barge-in makes the rest stale) and breaks.
async fn player(
    esl: Arc<Esl>,
    uuid: String,
    playback: Arc<Playback>,
    mut rx: mpsc::Receiver<PlayerCmd>,
) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            PlayerCmd::Play { epoch, file } => {
                if epoch != playback.epoch() {
                    continue;
                }
                if let Err(e) = esl.play(&uuid, &file).await {
                    tracing::warn!(%uuid, %file, error = %e, "playback not queued");
                }
            }
            PlayerCmd::Break => {
                if let Err(e) = esl.bgapi(&format!("uuid_break {uuid} all")).await {
                    tracing::debug!(%uuid, error = %e, "uuid_break");
                }
            }
        }
    }
}

/// The call's arguments from the stream's metadata (JSON `{"flow": ..}` or `flow=..,lang=..`),
/// else from the channel's `sidecall_flow` / `sidecall_agent` variables; the caller's number
/// from the park.
fn call_args(metadata: Option<&str>, park: CallArgs) -> CallArgs {
    let mut args = match metadata.map(str::trim) {
        Some(m) if m.starts_with('{') => match serde_json::from_str::<serde_json::Value>(m) {
            Ok(serde_json::Value::Object(map)) => {
                let mut args = CallArgs::default();
                for (k, v) in &map {
                    match v {
                        serde_json::Value::String(s) => args.set(k, s),
                        serde_json::Value::Number(n) => args.set(k, &n.to_string()),
                        serde_json::Value::Bool(b) => args.set(k, &b.to_string()),
                        _ => {}
                    }
                }
                args
            }
            Ok(_) => {
                tracing::warn!("stream metadata is not a JSON object; ignored");
                CallArgs::default()
            }
            Err(e) => {
                tracing::warn!(error = %e, "stream metadata is not JSON; ignored");
                CallArgs::default()
            }
        },
        Some(m) => CallArgs::parse(&[m.to_string()]),
        None => CallArgs::default(),
    };
    if args.flow.is_none() && args.agent.is_none() {
        args.flow = park.flow;
        args.agent = park.agent;
    }
    args.caller = park.caller;
    args
}

/// Runs the adapter until `stop`, then drains calls through the supervisor.
pub async fn run(
    cfg: Arc<Config>,
    parts: PartsFactory,
    sup: Arc<Supervisor>,
    records: Option<mpsc::Sender<serde_json::Value>>,
    stop: CancellationToken,
) -> Result<(), FreeSwitchError> {
    let f = &cfg.freeswitch;
    let password = f
        .password
        .clone()
        .ok_or_else(|| FreeSwitchError::NoPassword(f.password_env.clone()))?;
    let token = f
        .media_token
        .clone()
        .ok_or_else(|| FreeSwitchError::NoToken(f.media_token_env.clone()))?;
    let listener =
        TcpListener::bind(&f.media_listen)
            .await
            .map_err(|error| FreeSwitchError::Listen {
                addr: f.media_listen.clone(),
                error,
            })?;
    let (conn_tx, mut conns) = mpsc::channel(64);
    let gate = crate::net::Gate::new(f.max_calls.saturating_add(16), Duration::from_millis(1_000));
    tokio::spawn(media::accept(
        listener,
        token.expose().to_string(),
        gate,
        conn_tx,
        stop.clone(),
    ));
    // Not a child of `stop`: while draining, active calls still need their events.
    let esl_stop = CancellationToken::new();
    let (esl, mut esl_msgs) = esl::spawn(
        esl::EslSettings {
            address: f.esl_address.clone(),
            password: password.expose().to_string(),
            request_timeout: Duration::from_millis(f.request_timeout_ms),
            silence: Duration::from_millis(f.events_silence_ms),
        },
        sup.health().control_connected.clone(),
        esl_stop.clone(),
    );
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        esl,
        parts,
        records,
        calls: Default::default(),
        expected: Default::default(),
        served: Default::default(),
        retry: Default::default(),
    });
    let drain = async {
        stop.cancelled().await;
        sup.drain().await;
    };
    tokio::pin!(drain);
    let mut listening = true;
    loop {
        tokio::select! {
            _ = &mut drain => break,
            msg = esl_msgs.recv() => {
                let Some(msg) = msg else { break };
                match msg {
                    EslMsg::Connected => {
                        let waiting: Vec<String> = shared
                            .retry
                            .lock()
                            .map(|mut r| r.drain().collect())
                            .unwrap_or_default();
                        for uuid in waiting {
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                shared.to_overflow(&uuid, "Event Socket back").await;
                            });
                        }
                    }
                    EslMsg::Disconnected(why) => {
                        let active = shared.calls.lock().map(|c| c.len()).unwrap_or(0);
                        tracing::warn!(%why, active, "Event Socket lost; calls in progress go on");
                    }
                    EslMsg::Event(ev) => on_event(&shared, &sup, ev),
                }
            }
            // The listener stops taking connections at SIGTERM; calls in progress go on.
            conn = conns.recv(), if listening => {
                match conn {
                    Some(conn) => on_media(&shared, &sup, conn),
                    None => listening = false,
                }
            }
        }
    }
    esl_stop.cancel();
    Ok(())
}

fn on_event(shared: &Arc<Shared>, sup: &Arc<Supervisor>, ev: FsEvent) {
    match ev {
        FsEvent::Park { uuid, vars } => {
            let marker = vars.get("sidecall").cloned().unwrap_or_default();
            let ours = !marker.is_empty() && marker != "false";
            if !ours || shared.stale_park(&uuid, &marker) {
                return;
            }
            if let Some(live) = shared.call(&uuid) {
                let Ok(mut m) = live.marker.lock() else {
                    return;
                };
                match m.as_deref() {
                    // The media came first (the stream starts before the dialplan parks).
                    None => {
                        *m = Some(marker.clone());
                        shared.note_served(&uuid, &marker);
                        return;
                    }
                    Some(seen) if seen == marker => return,
                    // A new entry into sidecall while the last call on this channel ends (a
                    // transfer back into sidecall): its media deadline runs as for any.
                    Some(_) => {}
                }
            }
            let _ = sup;
            // The media must come within the deadline, or the caller goes to a human.
            let cancel = CancellationToken::new();
            let park = CallArgs {
                flow: vars.get("sidecall_flow").cloned(),
                agent: vars.get("sidecall_agent").cloned(),
                caller: vars.get("Caller-Caller-ID-Number").cloned(),
                ..CallArgs::default()
            };
            if let Ok(mut e) = shared.expected.lock() {
                e.insert(
                    uuid.clone(),
                    Expected {
                        cancel: cancel.clone(),
                        park,
                        marker,
                    },
                );
            }
            let (shared, wait) = (
                shared.clone(),
                Duration::from_millis(shared.cfg.freeswitch.media_timeout_ms),
            );
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(wait) => {
                        let still = shared.expected.lock().ok().and_then(|mut e| e.remove(&uuid)).is_some();
                        if still && shared.call(&uuid).is_none() {
                            let rec = shared.recorder(&uuid);
                            rec.emit(0, "error", serde_json::json!({"stage": "setup", "message": "no media connection from mod_audio_stream"}));
                            rec.emit(0, "call_end", serde_json::json!({"outcome": "overflow"}));
                            shared.to_overflow(&uuid, "media never connected").await;
                        }
                    }
                }
            });
        }
        FsEvent::Dtmf { uuid, digit } => {
            if let Some(c) = shared.call(&uuid) {
                c.events.dtmf(digit, DtmfSource::Control);
            }
        }
        FsEvent::Hangup { uuid, cause } => {
            if let Some(e) = shared
                .expected
                .lock()
                .ok()
                .and_then(|mut e| e.remove(&uuid))
            {
                e.cancel.cancel();
            }
            if let Some(c) = shared.call(&uuid) {
                c.events.mark_caller_gone();
                tokio::spawn(
                    async move { c.events.hangup(&format!("caller hung up ({cause})")).await },
                );
            }
        }
        FsEvent::PlaybackStop { uuid, file, done } => {
            if let Some(c) = shared.call(&uuid) {
                c.playback.on_stop(&file, done);
            }
        }
        FsEvent::StreamPlay { uuid, body } => {
            if let Some(c) = shared.call(&uuid) {
                c.playback.on_file(&body);
            }
        }
        FsEvent::StreamConnected { .. } => {}
        FsEvent::StreamFailed { uuid, why } => {
            // Before the call began: its media will never come.
            let waiting = shared
                .expected
                .lock()
                .ok()
                .and_then(|mut e| e.remove(&uuid));
            if let Some(Expected { cancel, .. }) = waiting {
                cancel.cancel();
                if shared.call(&uuid).is_none() {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let rec = shared.recorder(&uuid);
                        rec.emit(
                            0,
                            "error",
                            serde_json::json!({"stage": "setup", "message": why}),
                        );
                        rec.emit(0, "call_end", serde_json::json!({"outcome": "overflow"}));
                        shared.to_overflow(&uuid, "media stream failed").await;
                    });
                }
            } else {
                tracing::info!(%uuid, %why, "media stream ended");
            }
        }
        FsEvent::StreamRejected { uuid, body } => {
            tracing::warn!(%uuid, %body, "mod_audio_stream could not take a message from sidecall");
        }
    }
}

fn on_media(shared: &Arc<Shared>, sup: &Arc<Supervisor>, conn: media::MediaConn) {
    let uuid = conn.uuid.clone();
    if shared.call(&uuid).is_some() {
        // The last call on this channel is still ending (a transfer back into sidecall): this
        // connection waits for it, a little.
        let (shared, sup) = (shared.clone(), sup.clone());
        tokio::spawn(async move {
            for _ in 0..150 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if shared.call(&uuid).is_none() {
                    return on_media(&shared, &sup, conn);
                }
            }
            tracing::warn!(%uuid, "a second media connection for a live call; closed");
        });
        return;
    }
    if !sup.health().control_up() {
        // Nothing could be played, keyed or transferred: refused, and the caller goes to a
        // human as soon as the Event Socket is back (the dialplan's backstop until then).
        tracing::warn!(%uuid, "Event Socket down: media connection refused");
        if let Ok(mut r) = shared.retry.lock()
            && r.len() < RETRY_MAX
        {
            r.insert(uuid);
        }
        return;
    }
    let mut park = CallArgs::default();
    let mut marker = None;
    if let Some(e) = shared
        .expected
        .lock()
        .ok()
        .and_then(|mut e| e.remove(&uuid))
    {
        e.cancel.cancel();
        park = e.park;
        shared.note_served(&uuid, &e.marker);
        marker = Some(e.marker);
    }
    match sup.admit() {
        Err(why) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                drop(conn);
                shared.to_overflow(&uuid, &why.to_string()).await;
            });
        }
        Ok(slot) => start_call(shared, sup, slot, conn, park, marker),
    }
}

/// Starts a call the supervisor admitted, on its own guarded task: if it panics, the caller
/// still goes to the overflow target.
fn start_call(
    shared: &Arc<Shared>,
    sup: &Arc<Supervisor>,
    slot: Slot,
    conn: media::MediaConn,
    park: CallArgs,
    marker: Option<String>,
) {
    let uuid = conn.uuid.clone();
    let (events, rx) = CallEvents::channel(512);
    let (ws_tx, ws_rx) = mpsc::channel(64);
    let (player_tx, player_rx) = mpsc::channel(256);
    let playback = Playback::new(
        shared.cfg.freeswitch.stream_rate,
        ws_tx,
        player_tx.clone(),
        events.clone(),
    );
    if let Ok(mut c) = shared.calls.lock() {
        c.insert(
            uuid.clone(),
            Live {
                events: events.clone(),
                playback: playback.clone(),
                marker: Arc::new(std::sync::Mutex::new(marker)),
            },
        );
    }
    let call = run_one(
        shared.clone(),
        uuid.clone(),
        conn,
        park,
        events.clone(),
        rx,
        playback,
        (ws_rx, player_tx, player_rx),
        sup.grace_over(),
    );
    let shared = shared.clone();
    sup.spawn(slot, call, move |panicked| async move {
        if panicked && !events.caller_gone() {
            shared.to_overflow(&uuid, "call task failed").await;
        }
        if let Ok(mut c) = shared.calls.lock() {
            c.remove(&uuid);
        }
    });
}

type Pipes = (
    mpsc::Receiver<fork::WsOut>,
    mpsc::Sender<PlayerCmd>,
    mpsc::Receiver<PlayerCmd>,
);

#[allow(clippy::too_many_arguments)]
async fn run_one(
    shared: Arc<Shared>,
    uuid: String,
    conn: media::MediaConn,
    park: CallArgs,
    events: CallEvents,
    rx: mpsc::Receiver<crate::call::MediaEvent>,
    playback: Arc<Playback>,
    pipes: Pipes,
    grace_over: CancellationToken,
) {
    let cfg = shared.cfg.clone();
    let (ws_rx, player_tx, player_rx) = pipes;
    let mut args = call_args(conn.metadata.as_deref(), park);
    args.call_id = Some(uuid.clone());
    tracing::info!(%uuid, flow = ?args.flow, agent = ?args.agent, "FreeSWITCH call");
    let recorder = shared.recorder(&uuid);
    let parts = match (shared.parts)(&args) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%uuid, error = %e, "cannot start a call for these arguments");
            recorder.emit(
                0,
                "error",
                serde_json::json!({"stage": "arguments", "message": e}),
            );
            recorder.emit(0, "call_end", serde_json::json!({"outcome": "overflow"}));
            shared.to_overflow(&uuid, "bad call arguments").await;
            return;
        }
    };
    // The dialplan's short backstop (a human, should sidecall never take the call) becomes one
    // for the call's whole length.
    shared.backstop(&uuid).await;
    let rate = cfg.call.sample_rate;
    // The stream's rate, as the dialplan starts it (`mono 16k` or `mono 8k`).
    let wire = WireFormat::SlinLe(cfg.freeswitch.stream_rate);
    let out = match crate::pbx::codec::Transcoder::new(wire, rate) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(%uuid, error = %e, "no resampler");
            shared.to_overflow(&uuid, "no resampler").await;
            return;
        }
    };
    let fork_mode = cfg.freeswitch.playback == "audio_fork";
    let marks = fork_mode.then(|| Arc::new(fork::Marks::default()));
    let ws_tx = playback.ws();
    let media = tokio::spawn(media::pump(
        conn.ws,
        conn.first_audio,
        wire,
        rate,
        events.clone(),
        ws_rx,
        marks.clone(),
    ));
    let player_task = tokio::spawn(player(
        shared.esl.clone(),
        uuid.clone(),
        playback.clone(),
        player_rx,
    ));
    let control = Arc::new(FsControl {
        esl: shared.esl.clone(),
        uuid: uuid.clone(),
        player: (!fork_mode).then_some(player_tx),
        api: stream_api(&cfg),
    });
    let link: Box<dyn crate::call::MediaLink> = match marks {
        Some(marks) => Box::new(fork::ForkLink::new(ws_tx, out, marks, events.clone())),
        None => Box::new(StockLink { playback, out }),
    };
    let setup = parts.into_setup(uuid.clone(), cfg.clone(), link, control, rx, recorder);
    let route = FsRoute {
        shared: &shared,
        uuid: &uuid,
        events: &events,
    };
    let target = &cfg.freeswitch.overflow_target;
    crate::pbx::supervisor::run_routed_call(setup, &events, target, grace_over, &route).await;
    // Detach the stream (it survives a transfer; a stream left attached refuses a new start).
    if !events.caller_gone() {
        let api = stream_api(&cfg);
        let _ = shared.esl.bgapi(&format!("{api} {uuid} stop")).await;
    }
    player_task.abort();
    media.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_metadata_chooses_before_the_channel_variables() {
        let park = CallArgs {
            flow: Some("order_status".into()),
            agent: Some("support".into()),
            caller: Some("5550100".into()),
            ..CallArgs::default()
        };
        // Only the variables: the park's choice (an agent wins over a flow) and number.
        let a = call_args(None, park.clone());
        assert_eq!(a.agent.as_deref(), Some("support"));
        assert_eq!(a.caller.as_deref(), Some("5550100"));
        // The metadata names a flow: the variables' agent is not used.
        let a = call_args(Some(r#"{"flow": "payment", "account": 77}"#), park.clone());
        assert_eq!(
            (a.flow.as_deref(), a.agent.as_deref()),
            (Some("payment"), None)
        );
        assert_eq!(a.vars.get("account").map(String::as_str), Some("77"));
        assert_eq!(a.caller.as_deref(), Some("5550100"));
        let a = call_args(Some("agent=billing_bot,lang=en"), park.clone());
        assert_eq!(a.agent.as_deref(), Some("billing_bot"));
        // Garbage metadata is ignored, not fatal.
        let a = call_args(Some("{not json"), park);
        assert_eq!(a.agent.as_deref(), Some("support"));
    }
}
