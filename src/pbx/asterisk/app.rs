//! The ARI application: one event loop reads ARI events and never waits on a call; each caller
//! that enters Stasis gets its own setup task (answer, mixing bridge, external media channel,
//! bridge both, run the session) and teardown (bridge and media channel removed, whatever
//! happened). Over capacity or while shutting down, callers go straight to the overflow target.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;

use super::ari::{AriClient, AriError, Event, ExternalMedia, mark_support, supports_json_control};
use super::ari_events::{self, EventMsg};
use super::chan_ws::{self, ControlFormat, MarkSupport, MediaStart};
use super::{audiosocket, rtp};
use crate::call::link::Target;
use crate::call::{CallControl, ControlError, MediaLink};
use crate::config::Config;
use crate::pbx::events::{CallEvents, DtmfSource};
use crate::pbx::supervisor::{Slot, Supervisor};
use crate::pbx::{CallArgs, PartsFactory};
use crate::telemetry::Recorder;

/// Prefix of the ids sidecall gives its own channels and bridges, so their events are told apart
/// and what a killed sidecall left behind can be found.
pub const MEDIA_PREFIX: &str = "sidecall-media-";
pub const BRIDGE_PREFIX: &str = "sidecall-bridge-";
/// If the marker event of a sweep cannot be sent, how long to let StasisStart events of callers
/// that arrived meanwhile reach the event loop before deciding what was left behind.
const SWEEP_SETTLE: Duration = Duration::from_secs(2);
/// Name prefix of the user event that marks a sweep's place in the event stream.
const SWEEP_EVENT: &str = "sidecall-sweep-";

/// A new id for a channel or bridge sidecall creates: the prefix and 128 random bits as 32 hex
/// digits. Every id has the same length, so none is a prefix of another: Asterisk's channel
/// storage treats a new id as taken when it is a prefix of a live one, and chan_websocket then
/// crashes Asterisk (seen on master of October 2025). Ids derived from the caller's id
/// (`1795293732.3` and `1795293732.37`) can be prefixes of each other.
pub fn object_id(prefix: &str) -> String {
    format!("{prefix}{}", crate::net::random_hex128())
}

/// The prefix of this application's objects of one kind: `sidecall-media-<app>-`. Another
/// sidecall (another Stasis application on the same Asterisk) never takes them for its own.
/// Ids stay prefix-free across applications: the part after the prefix is 32 hex digits, and
/// two different application names differ before either id ends.
pub fn app_prefix(kind: &str, app: &str) -> String {
    let app: String = app
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{kind}{app}-")
}

/// Errors that stop the adapter.
#[derive(Debug, thiserror::Error)]
pub enum AsteriskError {
    #[error("asterisk.password: set the password in the environment variable {0}")]
    NoPassword(String),
    #[error(
        "asterisk.websocket_client_username is set: put the section's password in the environment variable {0}"
    )]
    NoMediaPassword(String),
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
}

/// Why setting up a call's media failed (the caller then goes to the overflow target).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{step}: {source}")]
    Ari {
        step: &'static str,
        #[source]
        source: AriError,
    },
    #[error("Asterisk did not connect to the {0} listener in time")]
    NotConnected(&'static str),
    #[error("the {0} listener is gone")]
    ListenerGone(&'static str),
    #[error("externalMedia answered without {0}")]
    MissingVar(&'static str),
    #[error("RTP address `{0}` is not HOST:PORT")]
    BadAddress(String),
    #[error("media WebSocket connect: {0}")]
    Connect(String),
    #[error("media WebSocket connect timed out")]
    ConnectTimeout,
    #[error("call setup took longer than its deadline")]
    Timeout,
    #[error(transparent)]
    Media(#[from] chan_ws::WsMediaError),
    #[error(transparent)]
    Rtp(#[from] rtp::RtpError),
    #[error(transparent)]
    Audio(#[from] crate::audio::AudioError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

fn ari_step(step: &'static str) -> impl FnOnce(AriError) -> SetupError {
    move |source| SetupError::Ari { step, source }
}

type Pending = Arc<std::sync::Mutex<HashMap<String, oneshot::Sender<ClientConn>>>>;

/// Client-mode connections whose MEDIA_START names no channel id (chan_websocket before
/// 2025-10-21: the first 20.16/22.6/23.0 releases), parked by channel name until the
/// externalMedia answer, which carries the name, claims them (a few seconds at most).
type Unclaimed = Arc<std::sync::Mutex<HashMap<String, ClientConn>>>;

struct ClientConn {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    start: MediaStart,
    fmt: ControlFormat,
}

struct Shared {
    cfg: Arc<Config>,
    ari: AriClient,
    parts: PartsFactory,
    records: Option<mpsc::Sender<serde_json::Value>>,
    json_control: AtomicBool,
    /// Whether this Asterisk answers MARK_MEDIA, learned on every (re)connect.
    marks: std::sync::Mutex<MarkSupport>,
    pending: Pending,
    unclaimed: Unclaimed,
    audiosockets: audiosocket::Waiting,
    /// Setups waiting for their media channel's StasisStart (addChannel before it gets 422).
    in_stasis: Arc<std::sync::Mutex<HashMap<String, oneshot::Sender<()>>>>,
    /// Bridges and media channels of this process's live calls.
    owned: std::sync::Mutex<HashSet<String>>,
    /// Callers this process is serving, and the handle that feeds each.
    calls: std::sync::Mutex<HashMap<String, CallEvents>>,
    /// A sweep waiting for its marker event: (marker name, what Asterisk listed).
    sweep: std::sync::Mutex<Option<(String, Listed)>>,
    /// Callers this process sent on (to a human, a transfer target) lately: a sweep leaves them.
    handed_off: Arc<HandedOff>,
    /// Prefixes of this application's media channels and bridges.
    media_prefix: String,
    bridge_prefix: String,
}

/// Callers sent on lately, kept for `HANDED_OFF_FOR`: they may still be listed in the
/// application for a moment while Asterisk moves them on, and must not be sent twice.
#[derive(Debug, Default)]
struct HandedOff(std::sync::Mutex<HashMap<String, std::time::Instant>>);

const HANDED_OFF_FOR: Duration = Duration::from_secs(120);

impl HandedOff {
    fn note(&self, caller: &str) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= 1024 {
                m.retain(|_, t| t.elapsed() < HANDED_OFF_FOR);
            }
            m.insert(caller.to_string(), std::time::Instant::now());
        }
    }

    fn recent(&self, caller: &str) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|m| m.get(caller).map(|t| t.elapsed() < HANDED_OFF_FOR))
            .unwrap_or(false)
    }
}

/// What Asterisk listed when a sweep looked: channels in the app, all channels, ARI bridges.
#[derive(Debug, Default)]
struct Listed {
    in_app: Vec<String>,
    channels: Vec<String>,
    bridges: Vec<String>,
}

impl Shared {
    fn call(&self, caller: &str) -> Option<CallEvents> {
        self.calls.lock().ok().and_then(|c| c.get(caller).cloned())
    }

    fn active(&self) -> usize {
        self.calls.lock().map(|c| c.len()).unwrap_or(0)
    }
}

/// The Asterisk adapter (ARI control, external media).
pub struct Asterisk {
    cfg: Arc<Config>,
}

impl Asterisk {
    pub fn new(cfg: Arc<Config>) -> Self {
        Self { cfg }
    }
}

#[async_trait]
impl crate::pbx::Adapter for Asterisk {
    fn name(&self) -> &'static str {
        "asterisk"
    }

    fn describe(&self) -> String {
        let a = &self.cfg.asterisk;
        format!("asterisk (ARI app `{}` at {})", a.app, a.url)
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

/// Runs the ARI application until `stop`, then drains calls through the supervisor (grace
/// period, then the overflow target). ARI events keep flowing while calls drain.
pub async fn run(
    cfg: Arc<Config>,
    parts: PartsFactory,
    sup: Arc<Supervisor>,
    records: Option<mpsc::Sender<serde_json::Value>>,
    stop: CancellationToken,
) -> Result<(), AsteriskError> {
    let a = &cfg.asterisk;
    let password = a
        .password
        .clone()
        .ok_or_else(|| AsteriskError::NoPassword(a.password_env.clone()))?;
    let ari = AriClient::new(
        crate::engines::http_client(),
        &a.url,
        &a.username,
        password.expose(),
        Duration::from_millis(a.request_timeout_ms),
    );
    let pending: Pending = Arc::default();
    let unclaimed: Unclaimed = Arc::default();
    let audiosockets: audiosocket::Waiting = Arc::default();
    if a.media == "audiosocket" {
        let listener = TcpListener::bind(&a.audiosocket_listen)
            .await
            .map_err(|error| AsteriskError::Listen {
                addr: a.audiosocket_listen.clone(),
                error,
            })?;
        tokio::spawn(audiosocket::accept(
            listener,
            audiosockets.clone(),
            listener_gate(&cfg),
            stop.clone(),
        ));
    }
    if a.media == "websocket" && a.websocket_mode == "client" {
        let listener = TcpListener::bind(&a.websocket_listen)
            .await
            .map_err(|error| AsteriskError::Listen {
                addr: a.websocket_listen.clone(),
                error,
            })?;
        let auth = match (
            a.websocket_client_username.is_empty(),
            &a.websocket_client_password,
        ) {
            (true, _) => None,
            (false, Some(p)) => Some(basic_auth(&a.websocket_client_username, p.expose())),
            (false, None) => {
                return Err(AsteriskError::NoMediaPassword(
                    a.websocket_client_password_env.clone(),
                ));
            }
        };
        tokio::spawn(accept_media_clients(
            listener,
            pending.clone(),
            unclaimed.clone(),
            listener_gate(&cfg),
            auth,
            stop.clone(),
        ));
    }
    // Not a child of `stop`: while draining, active calls still need their ARI events.
    let events_stop = CancellationToken::new();
    let mut events = ari_events::spawn(
        ari.events_url(&a.app),
        ari.events_auth(),
        Duration::from_millis(a.events_silence_ms),
        sup.health().control_connected.clone(),
        events_stop.clone(),
    );
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        ari: ari.clone(),
        parts,
        records,
        json_control: AtomicBool::new(false),
        marks: std::sync::Mutex::new(MarkSupport::Probe),
        pending,
        unclaimed,
        audiosockets,
        in_stasis: Arc::default(),
        owned: Default::default(),
        calls: Default::default(),
        sweep: Default::default(),
        handed_off: Default::default(),
        media_prefix: app_prefix(MEDIA_PREFIX, &a.app),
        bridge_prefix: app_prefix(BRIDGE_PREFIX, &a.app),
    });
    let drain = async {
        stop.cancelled().await;
        sup.drain().await;
    };
    tokio::pin!(drain);
    loop {
        tokio::select! {
            _ = &mut drain => break,
            msg = events.recv() => {
                let Some(msg) = msg else { break };
                match msg {
                    EventMsg::Connected => {
                        // Learn the version on every (re)connect: Asterisk may have been upgraded.
                        let a = &cfg.asterisk;
                        let version = if a.control_format == "auto" || a.marks == "auto" {
                            match ari.version().await {
                                Ok(v) => {
                                    tracing::info!(version = %v, "connected to Asterisk");
                                    Some(v)
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "could not read the Asterisk version; plain control, probing for marks");
                                    None
                                }
                            }
                        } else {
                            None
                        };
                        let json = match a.control_format.as_str() {
                            "json" => true,
                            "plain" => false,
                            _ => version.as_deref().is_some_and(supports_json_control),
                        };
                        let marks = match a.marks.as_str() {
                            "on" => MarkSupport::Yes,
                            "off" => MarkSupport::No,
                            _ => version.as_deref().map(mark_support).unwrap_or(MarkSupport::Probe),
                        };
                        tracing::info!(json_control = json, ?marks, "media control for this Asterisk");
                        shared.json_control.store(json, Ordering::Relaxed);
                        if let Ok(mut m) = shared.marks.lock() {
                            *m = marks;
                        }
                        // A sidecall that was killed (or lost ARI) left callers in Stasis in dead
                        // air and bridges behind: find them on every (re)connect.
                        tokio::spawn(sweep_orphans(shared.clone()));
                    }
                    EventMsg::Disconnected(why) => tracing::warn!(%why, active = shared.active(), "ARI events lost; calls in progress go on"),
                    EventMsg::Event(ev) => match *ev {
                        Event::StasisStart { args, channel } => {
                            if channel.id.starts_with(MEDIA_PREFIX) {
                                // Our own external media channel: its setup may be waiting for this.
                                if let Some(tx) = shared.in_stasis.lock().ok().and_then(|mut m| m.remove(&channel.id)) {
                                    let _ = tx.send(());
                                }
                                continue;
                            }
                            match sup.admit() {
                                Err(why) => {
                                    let shared = shared.clone();
                                    tokio::spawn(async move { to_overflow(&shared, &channel.id, &why.to_string()).await });
                                }
                                Ok(slot) => start_call(&shared, &sup, slot, channel, CallArgs::parse(&args)),
                            }
                        }
                        Event::ChannelDtmfReceived { digit, channel, .. } => {
                            if let (Some(c), Some(d)) = (shared.call(&channel.id), digit.chars().next()) {
                                c.dtmf(d, DtmfSource::Control);
                            }
                        }
                        Event::StasisEnd { channel } | Event::ChannelDestroyed { channel, .. } => {
                            if let Some(c) = shared.call(&channel.id) {
                                c.mark_caller_gone();
                                tokio::spawn(async move { c.hangup("caller left Stasis").await });
                            }
                        }
                        Event::ChannelUserevent { eventname } if eventname.starts_with(SWEEP_EVENT) => {
                            // Every StasisStart generated before the sweep listed the channels
                            // has been handled by now: what is not ours was left behind.
                            let pending = shared.sweep.lock().ok().and_then(|mut p| {
                                if p.as_ref().is_some_and(|(name, _)| *name == eventname) { p.take() } else { None }
                            });
                            if let Some((_, listed)) = pending {
                                tokio::spawn(clean_up_orphans(shared.clone(), listed));
                            }
                        }
                        Event::ChannelUserevent { .. } | Event::ChannelHangupRequest { .. } | Event::Other => {}
                    },
                }
            }
        }
    }
    events_stop.cancel();
    // Let the events task send its close frame before the process may exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.recv().await.is_some() {}
    })
    .await;
    Ok(())
}

/// Starts a call the supervisor admitted: its own task, guarded. If that task panics, the
/// caller still goes to the overflow target (a human) and the bridge and media channel are
/// removed. The call's object ids are this process's until then (the orphan sweep leaves them).
fn start_call(
    shared: &Arc<Shared>,
    sup: &Arc<Supervisor>,
    slot: Slot,
    channel: super::ari::Channel,
    args: CallArgs,
) {
    let (events, rx) = CallEvents::channel(512);
    let ids = CallIds {
        caller: channel.id.clone(),
        media: object_id(&shared.media_prefix),
        bridge: object_id(&shared.bridge_prefix),
    };
    if let Ok(mut o) = shared.owned.lock() {
        o.insert(ids.media.clone());
        o.insert(ids.bridge.clone());
    }
    if let Ok(mut c) = shared.calls.lock() {
        c.insert(ids.caller.clone(), events.clone());
    }
    let call = run_one(
        shared.clone(),
        ids.clone(),
        channel.caller.number.clone(),
        args,
        events.clone(),
        rx,
        sup.grace_over(),
    );
    let shared = shared.clone();
    sup.spawn(slot, call, move |panicked| async move {
        if panicked {
            if !events.caller_gone() {
                to_overflow(&shared, &ids.caller, "call task failed").await;
            }
            teardown(&shared.ari, &ids.media, &ids.bridge).await;
        }
        if let Ok(mut o) = shared.owned.lock() {
            o.remove(&ids.media);
            o.remove(&ids.bridge);
        }
        // Only this call's entry: a caller back in Stasis (a transfer target that runs
        // Stasis again) is a new call under the same id.
        if let Ok(mut c) = shared.calls.lock()
            && c.get(&ids.caller).is_some_and(|e| e.same(&events))
        {
            c.remove(&ids.caller);
        }
    });
}

/// Sends a caller sidecall will not (or can no longer) serve to the overflow target; if that
/// fails, hangs up, so nobody is left in Stasis in silence. A caller already gone (404) is done.
async fn to_overflow(shared: &Shared, caller: &str, why: &str) {
    let (cfg, ari) = (&shared.cfg, &shared.ari);
    shared.handed_off.note(caller);
    tracing::warn!(%caller, why, target = %cfg.asterisk.overflow_target, "sending caller to the overflow target");
    let sent = match cfg.transfers.get(&cfg.asterisk.overflow_target) {
        Some(t) => send_to(ari, caller, &Target::from(t)).await,
        None => Err(AriError::BadRequest(format!(
            "no [transfers] entry `{}`",
            cfg.asterisk.overflow_target
        ))),
    };
    match sent {
        // Gone, or already out of Stasis (in the dialplan, with a human): never hang that up.
        Ok(()) | Err(AriError::NotFound(_)) | Err(AriError::NotInStasis(_)) => {}
        Err(e) => {
            tracing::warn!(%caller, error = %e, "overflow transfer failed; hanging up");
            let _ = ari.hangup(caller, "normal").await;
        }
    }
}

/// Continue into the dialplan, or redirect to an endpoint.
async fn send_to(ari: &AriClient, channel: &str, t: &Target) -> Result<(), AriError> {
    match t {
        Target::Endpoint(ep) => ari.redirect(channel, ep).await,
        Target::Dialplan {
            context,
            extension,
            priority,
        } => {
            ari.continue_in_dialplan(channel, context, extension, *priority)
                .await
        }
    }
}

/// An entry in a map of setups waiting for something, removed when the setup is over, also
/// when its deadline drops it half-way.
struct Registered<'a, T> {
    map: &'a std::sync::Mutex<HashMap<String, T>>,
    key: String,
}

impl<'a, T> Registered<'a, T> {
    fn new(map: &'a std::sync::Mutex<HashMap<String, T>>, key: &str, value: T) -> Self {
        if let Ok(mut m) = map.lock() {
            m.insert(key.to_string(), value);
        }
        Self {
            map,
            key: key.to_string(),
        }
    }
}

impl<T> Drop for Registered<'_, T> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&self.key);
        }
    }
}

/// The PBX objects of one call.
#[derive(Debug, Clone)]
struct CallIds {
    caller: String,
    media: String,
    bridge: String,
}

/// Sets up, runs and tears down one call.
async fn run_one(
    shared: Arc<Shared>,
    ids: CallIds,
    number: String,
    args: CallArgs,
    events: CallEvents,
    rx: mpsc::Receiver<crate::call::MediaEvent>,
    grace_over: CancellationToken,
) {
    let cfg = &shared.cfg;
    let ari = &shared.ari;
    let CallIds {
        caller,
        media: media_id,
        bridge: bridge_id,
    } = ids;
    tracing::info!(%caller, %number, flow = ?args.flow, agent = ?args.agent, "caller entered Stasis");
    let mut args = args;
    if !number.is_empty() {
        args.caller = Some(number.clone());
    }
    args.call_id = Some(caller.clone());
    let recorder = match &shared.records {
        Some(tx) => Recorder::to_channel(&caller, tx.clone()),
        None => Recorder::none(),
    };
    // A call that never gets going still leaves a record of why its caller went to a human.
    let not_started = |stage: &str, message: String| {
        recorder.emit(
            0,
            "error",
            serde_json::json!({"stage": stage, "message": message}),
        );
        recorder.emit(0, "call_end", serde_json::json!({"outcome": "overflow"}));
    };
    let parts = match (shared.parts)(&args) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%caller, error = %e, "cannot start a call for these arguments");
            not_started("arguments", e.to_string());
            to_overflow(&shared, &caller, "bad call arguments").await;
            return;
        }
    };
    let setup = tokio::time::timeout(
        Duration::from_millis(
            cfg.asterisk
                .media_timeout_ms
                .saturating_add(cfg.asterisk.request_timeout_ms.saturating_mul(3)),
        ),
        setup_media(&shared, &caller, &media_id, &bridge_id, events.clone()),
    )
    .await
    .unwrap_or(Err(SetupError::Timeout));
    let link = match setup {
        Ok(link) => link,
        Err(e) => {
            tracing::warn!(%caller, error = %e, "call setup failed");
            metrics::counter!(crate::telemetry::names::ERRORS, "stage" => "setup").increment(1);
            not_started("setup", e.to_string());
            to_overflow(&shared, &caller, "call setup failed").await;
            teardown(ari, &media_id, &bridge_id).await;
            return;
        }
    };
    let control = Arc::new(AriControl {
        ari: ari.clone(),
        channel: caller.clone(),
        handed_off: shared.handed_off.clone(),
    });
    let setup = parts.into_setup(caller.clone(), cfg.clone(), link, control, rx, recorder);
    let route = AriRoute {
        shared: &shared,
        caller: &caller,
        events: &events,
    };
    let target = &cfg.asterisk.overflow_target;
    crate::pbx::supervisor::run_routed_call(setup, &events, target, grace_over, &route).await;
    teardown(ari, &media_id, &bridge_id).await;
}

/// Where an Asterisk caller goes at the end of a call.
struct AriRoute<'a> {
    shared: &'a Shared,
    caller: &'a str,
    events: &'a CallEvents,
}

#[async_trait]
impl crate::pbx::supervisor::CallerRoute for AriRoute<'_> {
    async fn to_overflow(&self, why: &str) {
        to_overflow(self.shared, self.caller, why).await;
    }

    async fn caller_left(&self) -> bool {
        // Asterisk tells StasisEnd before the media channel goes.
        self.events.caller_gone()
    }
}

/// Finds what an earlier sidecall (killed, or cut off from ARI) left behind: callers still in
/// this application's Stasis go to the overflow target (a human), sidecall's bridges are
/// destroyed and its media channels hung up. Live calls of this process are left alone.
///
/// The lists are taken first; then a user event marks that moment in the application's event
/// stream. Asterisk delivers events in order, so when the marker comes back every caller that
/// entered Stasis before the lists were taken has had its StasisStart handled: a caller in the
/// lists that is still not a call of ours was there before this connection, and no caller
/// arriving during a (re)connect under load is taken for stranded.
async fn sweep_orphans(shared: Arc<Shared>) {
    let (ari, cfg) = (&shared.ari, &shared.cfg);
    let (in_app, channels, bridges) = tokio::join!(
        ari.app_channels(&cfg.asterisk.app),
        ari.channel_ids(),
        ari.bridge_ids()
    );
    let listed = match (in_app, channels, bridges) {
        (Ok(in_app), Ok(channels), Ok(bridges)) => Listed {
            in_app,
            channels,
            bridges,
        },
        (a, c, b) => {
            let e = [a.err(), c.err(), b.err()]
                .into_iter()
                .flatten()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(error = %e, "could not look for callers left behind");
            return;
        }
    };
    let marker = format!("{SWEEP_EVENT}{}", crate::net::random_hex128());
    // Kept aside until the marker is back (a later sweep replaces an unfinished one).
    if let Ok(mut p) = shared.sweep.lock() {
        *p = Some((marker.clone(), listed));
    }
    if let Err(e) = ari.user_event(&cfg.asterisk.app, &marker).await {
        tracing::warn!(error = %e, "no marker event for the orphan sweep; deciding after a pause");
        tokio::time::sleep(SWEEP_SETTLE).await;
        let pending = shared.sweep.lock().ok().and_then(|mut p| {
            if p.as_ref().is_some_and(|(name, _)| *name == marker) {
                p.take()
            } else {
                None
            }
        });
        if let Some((_, listed)) = pending {
            clean_up_orphans(shared, listed).await;
        }
    }
}

/// Acts on a sweep's lists once every earlier StasisStart has been handled.
async fn clean_up_orphans(shared: Arc<Shared>, listed: Listed) {
    let ari = &shared.ari;
    let Listed {
        in_app,
        channels,
        bridges,
    } = listed;
    let owned = shared.owned.lock().map(|o| o.clone()).unwrap_or_default();
    let stranded: Vec<String> = in_app
        .into_iter()
        .filter(|id| {
            !id.starts_with(MEDIA_PREFIX)
                && shared.call(id).is_none()
                && !shared.handed_off.recent(id)
        })
        .collect();
    let stale_bridges: Vec<String> = bridges
        .into_iter()
        .filter(|id| id.starts_with(&shared.bridge_prefix) && !owned.contains(id))
        .collect();
    let stale_media: Vec<String> = channels
        .into_iter()
        .filter(|id| id.starts_with(&shared.media_prefix) && !owned.contains(id))
        .collect();
    if stranded.is_empty() && stale_bridges.is_empty() && stale_media.is_empty() {
        return;
    }
    tracing::warn!(
        callers = stranded.len(),
        bridges = stale_bridges.len(),
        media_channels = stale_media.len(),
        "found what an earlier sidecall left behind: callers go to the overflow target"
    );
    let label = crate::telemetry::names::ORPHANS;
    metrics::counter!(label, "kind" => "caller").increment(stranded.len() as u64);
    metrics::counter!(label, "kind" => "bridge").increment(stale_bridges.len() as u64);
    metrics::counter!(label, "kind" => "media_channel").increment(stale_media.len() as u64);
    if let Some(tx) = &shared.records {
        for c in &stranded {
            Recorder::to_channel(c, tx.clone()).emit(
                0,
                "call_end",
                serde_json::json!({"outcome": "overflow", "why": "left in Stasis by an earlier sidecall"}),
            );
        }
    }
    // Callers first (leaving Stasis takes them out of the old bridge), then the objects.
    futures_util::future::join_all(
        stranded
            .iter()
            .map(|c| to_overflow(&shared, c, "left in Stasis by an earlier sidecall")),
    )
    .await;
    futures_util::future::join_all(stale_bridges.iter().map(|b| ari.destroy_bridge(b))).await;
    futures_util::future::join_all(stale_media.iter().map(|m| ari.hangup(m, "normal"))).await;
}

/// Removes the bridge and the media channel; 404 means already gone.
async fn teardown(ari: &AriClient, media_id: &str, bridge_id: &str) {
    for r in [
        ari.destroy_bridge(bridge_id).await,
        ari.hangup(media_id, "normal").await,
    ] {
        match r {
            Ok(()) | Err(AriError::NotFound(_)) => {}
            Err(e) => tracing::warn!(error = %e, "teardown"),
        }
    }
}

async fn setup_media(
    shared: &Shared,
    caller: &str,
    media_id: &str,
    bridge_id: &str,
    events: CallEvents,
) -> Result<Box<dyn MediaLink>, SetupError> {
    let cfg = &shared.cfg;
    let a = &cfg.asterisk;
    let ari = &shared.ari;
    ari.answer(caller).await.map_err(ari_step("answer"))?;
    ari.create_bridge(bridge_id)
        .await
        .map_err(ari_step("bridge"))?;
    let transport_data = shared
        .json_control
        .load(Ordering::Relaxed)
        .then(|| "f(json)".to_string());
    let (stasis_tx, stasis_rx) = oneshot::channel();
    let _waiting = Registered::new(&shared.in_stasis, media_id, stasis_tx);
    let result = connect_media(shared, media_id, transport_data, events).await;
    let link = match result {
        Ok(x) => x,
        Err(e) => {
            if let Ok(mut m) = shared.in_stasis.lock() {
                m.remove(media_id);
            }
            return Err(e);
        }
    };
    // In client mode the POST returns before the media channel has entered Stasis; adding it to
    // the bridge before its StasisStart is refused with 422 (seen on Asterisk 23.4.1).
    let entered = tokio::time::timeout(Duration::from_millis(a.media_timeout_ms), stasis_rx).await;
    if let Ok(mut m) = shared.in_stasis.lock() {
        m.remove(media_id);
    }
    if entered.is_err() {
        tracing::debug!(%media_id, "no StasisStart seen for the media channel; trying addChannel anyway");
    }
    let mut tries = 0;
    loop {
        match ari.add_to_bridge(bridge_id, &[caller, media_id]).await {
            Ok(()) => break,
            Err(AriError::Unprocessable(_)) if tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(ari_step("addChannel")(e)),
        }
    }
    Ok(link)
}

/// Creates the external media channel and connects its media socket.
async fn connect_media(
    shared: &Shared,
    media_id: &str,
    transport_data: Option<String>,
    events: CallEvents,
) -> Result<Box<dyn MediaLink>, SetupError> {
    let cfg = &shared.cfg;
    let a = &cfg.asterisk;
    let ari = &shared.ari;
    let media_timeout = Duration::from_millis(a.media_timeout_ms);
    let marks = shared
        .marks
        .lock()
        .map(|m| *m)
        .unwrap_or(MarkSupport::Probe);
    match a.media.as_str() {
        "audiosocket" => return connect_audiosocket(shared, media_id, events).await,
        "rtp" => return connect_rtp(shared, media_id, events).await,
        _ => {}
    }
    let connected = if a.websocket_mode == "client" {
        let (tx, rx) = oneshot::channel();
        let _waiting = Registered::new(&shared.pending, media_id, tx);
        let params = ExternalMedia {
            channel_id: media_id.into(),
            external_host: a.websocket_client_section.clone(),
            encapsulation: "none".into(),
            transport: "websocket".into(),
            connection_type: Some("client".into()),
            format: a.format.clone(),
            data: None,
            transport_data,
        };
        // The POST returns only after Asterisk has connected to our listener: it runs while
        // the listener matches the connection by channel id (the media channel's id is ours).
        let deadline = tokio::time::Instant::now() + media_timeout;
        let post = ari.external_media(&a.app, &params);
        tokio::pin!(post);
        let mut rx = rx;
        let mut rx_done = false;
        let mut by_id = None;
        let posted = loop {
            tokio::select! {
                r = &mut post => break r,
                c = &mut rx, if !rx_done => {
                    rx_done = true;
                    by_id = c.ok();
                }
            }
        };
        // The pending entry stays until this setup is over (`_waiting`): the listener may
        // still be reading MEDIA_START when the answer arrives.
        let ch = posted.map_err(ari_step("externalMedia"))?;
        // Without a channel id in MEDIA_START, the connection waits under the channel's name.
        let c = match by_id {
            Some(c) => c,
            None => loop {
                if !rx_done && let Ok(c) = rx.try_recv() {
                    break c;
                }
                let parked = shared
                    .unclaimed
                    .lock()
                    .ok()
                    .and_then(|mut u| u.remove(&ch.name));
                if let Some(c) = parked {
                    break c;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(SetupError::NotConnected("media"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            },
        };
        chan_ws::start(c.ws, c.start, c.fmt, marks, cfg.call.sample_rate, events)?
    } else {
        let params = ExternalMedia {
            channel_id: media_id.into(),
            external_host: String::new(),
            encapsulation: "none".into(),
            transport: "websocket".into(),
            connection_type: Some("server".into()),
            format: a.format.clone(),
            data: None,
            transport_data,
        };
        let ch = ari
            .external_media(&a.app, &params)
            .await
            .map_err(ari_step("externalMedia"))?;
        let id = ch
            .var("MEDIA_WEBSOCKET_CONNECTION_ID")
            .ok_or(SetupError::MissingVar("MEDIA_WEBSOCKET_CONNECTION_ID"))?;
        let url = format!(
            "{}/media/{id}",
            a.url.trim_end_matches('/').replacen("http", "ws", 1)
        );
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| SetupError::Connect(e.to_string()))?;
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("media"));
        let connect =
            tokio_tungstenite::connect_async_with_config(req, Some(chan_ws::ws_config()), true);
        let (mut ws, _) = tokio::time::timeout(media_timeout, connect)
            .await
            .map_err(|_| SetupError::ConnectTimeout)?
            .map_err(|e| SetupError::Connect(e.to_string()))?;
        let (start, fmt) = chan_ws::read_media_start(&mut ws, media_timeout).await?;
        chan_ws::start(ws, start, fmt, marks, cfg.call.sample_rate, events)?
    };
    Ok(Box::new(connected.0))
}

/// AudioSocket: Asterisk connects to our listener and names the call by the UUID we gave it.
async fn connect_audiosocket(
    shared: &Shared,
    media_id: &str,
    events: CallEvents,
) -> Result<Box<dyn MediaLink>, SetupError> {
    let a = &shared.cfg.asterisk;
    let uuid = audiosocket::new_uuid();
    let (tx, rx) = oneshot::channel();
    let _waiting = Registered::new(&shared.audiosockets, &uuid, tx);
    let params = ExternalMedia {
        channel_id: media_id.into(),
        external_host: a.audiosocket_listen.clone(),
        encapsulation: "audiosocket".into(),
        transport: "tcp".into(),
        connection_type: None,
        format: a.format.clone(),
        data: Some(uuid.clone()),
        transport_data: None,
    };
    let post = shared.ari.external_media(&a.app, &params);
    let conn = tokio::time::timeout(Duration::from_millis(a.media_timeout_ms), rx);
    let (post, conn) = tokio::join!(post, conn);
    if let Ok(mut w) = shared.audiosockets.lock() {
        w.remove(&uuid);
    }
    post.map_err(ari_step("externalMedia"))?;
    let sock = conn
        .map_err(|_| SetupError::NotConnected("AudioSocket"))?
        .map_err(|_| SetupError::ListenerGone("AudioSocket"))?;
    let rate = if a.format == "slin" { 8_000 } else { 16_000 };
    let link = audiosocket::start(sock, rate, shared.cfg.call.sample_rate, events)?;
    Ok(Box::new(link))
}

/// RTP: a UDP socket per call; Asterisk tells where to send in the channel's variables.
async fn connect_rtp(
    shared: &Shared,
    media_id: &str,
    events: CallEvents,
) -> Result<Box<dyn MediaLink>, SetupError> {
    let a = &shared.cfg.asterisk;
    let sock = tokio::net::UdpSocket::bind((a.rtp_bind.as_str(), 0)).await?;
    let local = sock.local_addr()?;
    let params = ExternalMedia {
        channel_id: media_id.into(),
        external_host: local.to_string(),
        encapsulation: "rtp".into(),
        transport: "udp".into(),
        connection_type: None,
        format: a.format.clone(),
        data: None,
        transport_data: None,
    };
    let ch = shared
        .ari
        .external_media(&a.app, &params)
        .await
        .map_err(ari_step("externalMedia"))?;
    let addr = ch
        .var("UNICASTRTP_LOCAL_ADDRESS")
        .ok_or(SetupError::MissingVar("UNICASTRTP_LOCAL_ADDRESS"))?;
    let port = ch
        .var("UNICASTRTP_LOCAL_PORT")
        .ok_or(SetupError::MissingVar("UNICASTRTP_LOCAL_PORT"))?;
    let remote: std::net::SocketAddr = format!("{addr}:{port}")
        .parse()
        .map_err(|_| SetupError::BadAddress(format!("{addr}:{port}")))?;
    let link = rtp::start(sock, remote, &a.format, shared.cfg.call.sample_rate, events)?;
    Ok(Box::new(link))
}

/// The door of the listeners Asterisk connects to: room for every call's handshake and some
/// more, two seconds each (Asterisk connects and speaks at once).
fn listener_gate(cfg: &Config) -> crate::net::Gate {
    crate::net::Gate::new(
        cfg.asterisk.max_calls.saturating_add(16),
        Duration::from_secs(2),
    )
}

/// The `Authorization` value Asterisk sends for a websocket_client.conf section with a
/// username and password.
fn basic_auth(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Accepts chan_websocket client-mode connections and hands each to the call waiting for it.
/// Only connections that are expected get through: within the gate's handshake time they must
/// pass HTTP Basic auth (when `auth` is set, as websocket_client.conf sends it) and name in
/// MEDIA_START a media channel of a pending call (its id is 128 random bits from the CSPRNG,
/// compared in constant time). Anything else is closed at once with a log line.
/// Most client-mode connections waiting to be claimed by channel name, and for how long.
const PARKED_MAX: usize = 256;
const PARKED_FOR: Duration = Duration::from_secs(5);

async fn accept_media_clients(
    listener: TcpListener,
    pending: Pending,
    unclaimed: Unclaimed,
    gate: crate::net::Gate,
    auth: Option<String>,
    stop: CancellationToken,
) {
    let auth = auth.map(Arc::new);
    loop {
        let (sock, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "media listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(permit) = gate.enter() else {
            tracing::warn!(%peer, "too many media connections in their handshake; closing this one");
            continue;
        };
        let _ = sock.set_nodelay(true);
        let pending = pending.clone();
        let unclaimed = unclaimed.clone();
        let auth = auth.clone();
        let handshake = gate.handshake;
        tokio::spawn(async move {
            let _permit = permit;
            // tungstenite fixes the callback's error type (an HTTP response); it is not ours to shrink.
            #[allow(clippy::result_large_err)]
            let callback = |req: &Request, mut resp: Response| {
                if let Some(want) = auth.as_deref() {
                    let given = req
                        .headers()
                        .get("Authorization")
                        .map(|v| v.as_bytes())
                        .unwrap_or_default();
                    if !crate::net::credential_eq(given, want.as_bytes()) {
                        let mut no = tokio_tungstenite::tungstenite::http::Response::new(Some(
                            "authentication required".to_string(),
                        ));
                        *no.status_mut() =
                            tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                        return Err(no);
                    }
                }
                // Echo the `media` subprotocol; never answer with extensions (Asterisk aborts).
                let wants_media = req
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.split(',').any(|p| p.trim() == "media"));
                if wants_media {
                    resp.headers_mut()
                        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("media"));
                }
                Ok(resp)
            };
            let deadline = tokio::time::Instant::now() + handshake;
            let accept = tokio_tungstenite::accept_hdr_async_with_config(
                sock,
                callback,
                Some(chan_ws::ws_config()),
            );
            let mut ws = match tokio::time::timeout_at(deadline, accept).await {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "media connection refused in its handshake");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "media connection handshake timed out; closing");
                    return;
                }
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (start, fmt) = match chan_ws::read_media_start(&mut ws, left).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "media connection without a valid MEDIA_START; closing");
                    return;
                }
            };
            if start.channel_id.is_empty() {
                // An older chan_websocket: the call claims it by channel name once its
                // externalMedia answer is back; unclaimed, it is closed.
                let name = start.channel.clone();
                let parked = match unclaimed.lock() {
                    Ok(mut u) if u.len() < PARKED_MAX && !name.is_empty() => {
                        u.insert(name.clone(), ClientConn { ws, start, fmt });
                        true
                    }
                    _ => false,
                };
                if !parked {
                    tracing::warn!(%peer, "media connection without a channel id that cannot wait; closing");
                    return;
                }
                tokio::time::sleep(PARKED_FOR).await;
                if unclaimed
                    .lock()
                    .ok()
                    .and_then(|mut u| u.remove(&name))
                    .is_some()
                {
                    tracing::warn!(%peer, "media connection for no call of ours (unknown channel); closing");
                }
                return;
            }
            let waiter = pending
                .lock()
                .ok()
                .and_then(|mut p| crate::net::claim(&mut p, &start.channel_id));
            match waiter {
                Some(tx) => {
                    let _ = tx.send(ClientConn { ws, start, fmt });
                }
                None => {
                    tracing::warn!(%peer, "media connection for no call of ours (unknown channel id); closing")
                }
            }
        });
    }
}

/// Call control through ARI on the caller's channel.
struct AriControl {
    ari: AriClient,
    channel: String,
    handed_off: Arc<HandedOff>,
}

fn control_err(e: AriError) -> ControlError {
    match e {
        AriError::NotFound(_) => ControlError::NotFound,
        AriError::NotInStasis(m) | AriError::InvalidState(m) => ControlError::InvalidState(m),
        AriError::Timeout(ms) => ControlError::Timeout(ms),
        AriError::Connect { message, .. } => ControlError::Unreachable(message),
        other => ControlError::Refused(other.to_string()),
    }
}

#[async_trait]
impl CallControl for AriControl {
    async fn answer(&self) -> Result<(), ControlError> {
        // Answered during setup, before media was bridged.
        Ok(())
    }
    async fn send_dtmf(&self, digits: &str) -> Result<(), ControlError> {
        self.ari
            .send_dtmf(&self.channel, digits)
            .await
            .map_err(control_err)
    }
    async fn transfer(&self, _name: &str, target: &Target) -> Result<(), ControlError> {
        self.handed_off.note(&self.channel);
        send_to(&self.ari, &self.channel, target)
            .await
            .map_err(control_err)
    }
    async fn hangup(&self, reason: &str) -> Result<(), ControlError> {
        let ari_reason = match reason {
            "busy" | "congestion" | "no_answer" | "normal" => reason,
            _ => "normal",
        };
        match self.ari.hangup(&self.channel, ari_reason).await {
            Ok(()) | Err(AriError::NotFound(_)) => Ok(()),
            Err(e) => Err(control_err(e)),
        }
    }
}
