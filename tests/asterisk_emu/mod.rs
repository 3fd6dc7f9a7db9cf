//! An Asterisk emulator for tests, built from ../shared/PROTOCOLS.md and checked against a real
//! Asterisk 23.4.1: ARI REST (Basic auth, the documented error codes) and the events WebSocket
//! (api_key, 400 without app, StasisStart for callers and for external media channels), and
//! chan_websocket media in server and client modes: MEDIA_START, a 20 ms timer playing one
//! queued frame per tick, optimal-frame cutting that drops short tails, a 1000-frame queue with
//! MEDIA_XOFF at 900 and MEDIA_XON below 800, marks answered when reached, FLUSH_MEDIA dropping
//! queued audio and marks, 128-byte text limit, unknown commands only logged, binary over 65535
//! closing the call (1009), and closing the socket hanging the channel up. In a bridge, no frames
//! are sent while the caller is silent, as a real Asterisk does.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use sidecall::audio::{g711, l16};

pub const QUEUE_MAX: usize = 1000;
pub const XOFF_LEVEL: usize = 900;
pub const XON_LEVEL: usize = 800;

/// What a test caller does.
#[derive(Clone, Default)]
pub struct Script {
    /// Spoken one per turn, each 700 ms after the agent stops (samples at the wire rate).
    pub turns: Vec<Vec<i16>>,
    /// Spoken at an absolute time after the bridge is up (ms).
    pub at: Vec<(u64, Vec<i16>)>,
    /// Keys pressed at a time (ms), 150 ms apart.
    pub dtmf: Vec<(u64, String)>,
    /// The caller hangs up after this long.
    pub max_ms: u64,
    /// Send unknown and malformed control text to the app at this time.
    pub garbage_at_ms: Option<u64>,
    /// Send one binary message far over any frame size at this time.
    pub oversized_at_ms: Option<u64>,
    /// Send 400 binary messages of 64 KiB of voiced sound at once at this time (a flooding peer;
    /// slin formats).
    pub flood_at_ms: Option<u64>,
}

/// What happened to one caller, as the PBX saw it.
#[derive(Debug, Clone, Default)]
pub struct CallLog {
    pub caller_id: String,
    /// Agent audio the caller heard, at the wire rate, one 20 ms slot per tick.
    pub heard: Vec<i16>,
    /// (tick ms, command) of every text command on the media socket.
    pub commands: Vec<(u64, String)>,
    pub flushes: Vec<u64>,
    pub marks_answered: u32,
    pub dtmf_sent_by_app: Vec<String>,
    pub continued_to: Option<(String, String, Option<u32>)>,
    pub redirected_to: Option<String>,
    pub hangup_reason: Option<String>,
    pub ended: bool,
    /// Tick times (ms) at which each caller voice clip started.
    pub caller_spoke_at: Vec<u64>,
    pub bridged: bool,
    /// AudioSocket/RTP: most agent frames that arrived within any 200 ms (10 ticks): 10 when
    /// paced at real time (pacing check).
    pub max_arrivals_per_200ms: usize,
    /// RTP: packets whose header broke the stream (version, payload type, sequence, timestamp, SSRC).
    pub rtp_header_errors: u32,
    pub rtp_packets: u32,
    /// Commands this Asterisk does not know (it only logs "command unknown").
    pub unknown_commands: u32,
    /// chan_websocket: agent frames still queued, never played, when the call was hung up
    /// (a hangup that cut the goodbye short leaves some).
    pub unplayed_at_hangup: Option<usize>,
}

#[derive(Clone)]
pub struct Options {
    pub user: String,
    pub pass: String,
    /// Send plain-text control even if f(json) is asked (chan_websocket.conf
    /// `control_message_format=plain` on a 23.4 that marks).
    pub plain_only: bool,
    /// websocket_client.conf: section -> URI.
    pub ws_clients: HashMap<String, String>,
    /// Never complete media connections (server: no MEDIA_START; client: never connect).
    pub media_never_connects: bool,
    /// Stop playing queued agent audio (to fill the queue).
    pub stall_playout: bool,
    /// chan_websocket answers MARK_MEDIA (20.18/22.8/23.2+). Without: MARK_MEDIA is an unknown
    /// command (only logged), control is plain text and transport_data is not known, as on
    /// 20.16+/22.6+/23.0-23.1 and the master of October 2025.
    pub marks: bool,
    /// What `GET /asterisk/info` says (default: 23.4.1, or 23.1.0 without marks).
    pub version: Option<String>,
    /// A marking Asterisk that loses every mark (as when one is dropped in a long MEDIA_XOFF).
    pub lose_marks: bool,
    /// MEDIA_START names the channel id (chan_websocket from 2025-10-21 on; not the first
    /// 20.16/22.6/23.0 releases).
    pub media_start_channel_id: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            user: "sidecall".into(),
            pass: "secret".into(),
            plain_only: false,
            ws_clients: HashMap::new(),
            media_never_connects: false,
            stall_playout: false,
            marks: true,
            version: None,
            lose_marks: false,
            media_start_channel_id: true,
        }
    }
}

#[derive(Clone)]
struct Chan {
    id: String,
    name: String,
    state: String,
    in_stasis: bool,
    media: Option<MediaInfo>,
    bridge: Option<String>,
    script: Option<Script>,
    args: Vec<String>,
}

#[derive(Clone)]
struct MediaInfo {
    connection_id: String,
    format: String,
    json: bool,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Chan>,
    bridges: HashMap<String, Vec<String>>,
    apps: HashMap<String, Vec<mpsc::Sender<String>>>,
    /// connection id -> (media channel id, connected already)
    server_conns: HashMap<String, (String, bool)>,
    logs: HashMap<String, Arc<Mutex<CallLog>>>,
    /// media channel id -> sender to its media task (DTMF, hangup, start)
    media_ctl: HashMap<String, mpsc::Sender<MediaCtl>>,
    /// media channel id -> socket waiting for its bridge (before the caller is known)
    parked_ws: HashMap<String, Parked>,
    next_id: u64,
    events_sent: u64,
    /// A channel was created whose id is a prefix of a live one: chan_websocket dereferences a
    /// NULL requestor there and the real Asterisk segfaults.
    crashed: bool,
    /// Channel ids refused for being a prefix of a live one.
    prefix_refusals: Vec<String>,
    /// Events connections go silent (half-open: the socket stays, nothing is read or sent).
    events_frozen: bool,
    /// Events connections accepted so far.
    events_connections: u32,
    /// Where externalMedia (AudioSocket, RTP) was asked to send media.
    media_targets: Vec<std::net::SocketAddr>,
    malformed_on_connect: bool,
}

enum Parked {
    Ws(Box<WebSocketStream<TcpStream>>),
    AudioSocket(TcpStream),
    Rtp(tokio::net::UdpSocket, std::net::SocketAddr),
}

enum MediaCtl {
    Dtmf(char),
    Hangup,
}

/// A running emulator.
#[derive(Clone)]
pub struct Emulator {
    pub port: u16,
    opts: Options,
    state: Arc<Mutex<State>>,
    stop: tokio_util::sync::CancellationToken,
}

fn uuid(n: u64) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", n as u32 ^ 0x5eed, n)
}

impl Emulator {
    /// Starts on `port` (0 for any free port).
    pub async fn start(port: u16, opts: Options) -> Emulator {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind emulator");
        let port = listener.local_addr().unwrap().port();
        let emu = Emulator {
            port,
            opts,
            state: Arc::default(),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        let e = emu.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = e.stop.cancelled() => return,
                    r = listener.accept() => if let Ok((sock, _)) = r {
                        let e = e.clone();
                        tokio::spawn(async move { e.serve_conn(sock).await });
                    }
                }
            }
        });
        emu
    }

    /// Stops everything, as an Asterisk going down does: sockets close.
    pub fn stop(&self) {
        self.stop.cancel();
        let mut st = self.state.lock().unwrap();
        st.apps.clear();
        for (_, tx) in st.media_ctl.drain() {
            let _ = tx.try_send(MediaCtl::Hangup);
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn app_connected(&self, app: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .apps
            .get(app)
            .is_some_and(|v| v.iter().any(|t| !t.is_closed()))
    }

    /// Sends one malformed event to every app socket.
    pub fn send_garbage_event(&self) {
        let st = self.state.lock().unwrap();
        for txs in st.apps.values() {
            for tx in txs {
                let _ = tx.try_send("{\"type\":\"StasisStart\",\"channel\":".into());
                let _ = tx.try_send("not json at all".into());
                let _ = tx.try_send("{\"type\":\"ChannelDtmfReceived\",\"digit\":5}".into());
            }
        }
    }

    /// The events connections go half-open from now on (new ones work again after `thaw`).
    pub fn freeze_events(&self) {
        self.state.lock().unwrap().events_frozen = true;
    }

    pub fn thaw_events(&self) {
        self.state.lock().unwrap().events_frozen = false;
    }

    /// Where sidecall asked AudioSocket/RTP media to go (its listener or RTP socket).
    pub fn media_targets(&self) -> Vec<std::net::SocketAddr> {
        self.state.lock().unwrap().media_targets.clone()
    }

    /// Events connections accepted so far.
    pub fn events_connections(&self) -> u32 {
        self.state.lock().unwrap().events_connections
    }

    /// Whether a request would have crashed a real Asterisk (a media channel id that is a
    /// prefix of a live channel's), and the ids refused that way.
    pub fn crashed(&self) -> (bool, Vec<String>) {
        let st = self.state.lock().unwrap();
        (st.crashed, st.prefix_refusals.clone())
    }

    /// Channels and bridges that still exist.
    pub fn leftovers(&self) -> (Vec<String>, Vec<String>) {
        let st = self.state.lock().unwrap();
        (
            st.channels.keys().cloned().collect(),
            st.bridges.keys().cloned().collect(),
        )
    }

    /// A caller dials the Stasis extension. Returns its channel id, or None when no app is
    /// connected (STASISSTATUS=FAILED: the dialplan's human fallback runs).
    pub fn place_call(
        &self,
        app: &str,
        args: &[&str],
        script: Script,
    ) -> Option<(String, Arc<Mutex<CallLog>>)> {
        let mut st = self.state.lock().unwrap();
        if !st
            .apps
            .get(app)
            .is_some_and(|v| v.iter().any(|t| !t.is_closed()))
        {
            return None;
        }
        st.next_id += 1;
        let n = st.next_id;
        let id = format!("1795262114.{n}");
        let ch = Chan {
            id: id.clone(),
            name: format!("PJSIP/caller-{n:08x}"),
            state: "Ring".into(),
            in_stasis: true,
            media: None,
            bridge: None,
            script: Some(script),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        let log = Arc::new(Mutex::new(CallLog {
            caller_id: id.clone(),
            ..CallLog::default()
        }));
        st.logs.insert(id.clone(), log.clone());
        let ev = json!({"type": "StasisStart", "application": app, "timestamp": "2026-11-21T00:00:00.000+0000",
            "args": ch.args, "channel": chan_json(&ch)});
        st.channels.insert(id.clone(), ch);
        broadcast(&mut st, app, ev);
        Some((id, log))
    }

    /// The caller hangs up now.
    pub fn caller_hangup(&self, caller: &str) {
        let mut st = self.state.lock().unwrap();
        hangup_channel(&mut st, caller, "normal", 16);
    }

    async fn serve_conn(&self, mut sock: TcpStream) {
        loop {
            // A stopped Asterisk drops every connection, keep-alive ones included.
            let req = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = read_request(&mut sock) => r,
            };
            let Some(req) = req else { return };
            if req
                .headers
                .get("upgrade")
                .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
            {
                self.upgrade(sock, req).await;
                return;
            }
            let (code, body) = self.rest(&req).await;
            let reason = match code {
                200 => "OK",
                204 => "No Content",
                400 => "Bad Request",
                401 => "Unauthorized",
                404 => "Not Found",
                409 => "Conflict",
                412 => "Precondition Failed",
                422 => "Unprocessable Entity",
                _ => "Error",
            };
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let head = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if sock.write_all(head.as_bytes()).await.is_err()
                || sock.write_all(body.as_bytes()).await.is_err()
            {
                return;
            }
        }
    }

    fn authed(&self, req: &Req) -> bool {
        let want = format!("{}:{}", self.opts.user, self.opts.pass);
        if req.query.get("api_key").is_some_and(|k| *k == want) {
            return true;
        }
        req.headers.get("authorization").is_some_and(|a| {
            a.strip_prefix("Basic ")
                .is_some_and(|b| base64_decode(b.trim()).as_deref() == Some(want.as_bytes()))
        })
    }

    async fn rest(&self, req: &Req) -> (u16, Option<Value>) {
        if !req.path.starts_with("/ari/") {
            return (404, Some(json!({"message": "Not found"})));
        }
        if !self.authed(req) {
            return (401, Some(json!({"message": "Authentication required"})));
        }
        let parts: Vec<&str> = req.path.trim_start_matches("/ari/").split('/').collect();
        let q = |k: &str| req.query.get(k).cloned();
        match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["asterisk", "info"]) => {
                let v = match &self.opts.version {
                    Some(v) => v.as_str(),
                    None if !self.opts.marks => "23.1.0",
                    None => "23.4.1",
                };
                (
                    200,
                    Some(json!({"system": {"version": v, "entity_id": "02:fc:00:00:00:01"}})),
                )
            }
            ("POST", ["channels", "externalMedia"]) => self.external_media(req).await,
            ("GET", ["channels"]) => {
                let st = self.state.lock().unwrap();
                let list: Vec<Value> = st.channels.values().map(chan_json).collect();
                (200, Some(Value::Array(list)))
            }
            ("GET", ["bridges"]) => {
                let st = self.state.lock().unwrap();
                let list: Vec<Value> = st
                    .bridges
                    .iter()
                    .map(|(id, chans)| json!({"id": id, "technology": "simple_bridge", "bridge_type": "mixing", "channels": chans}))
                    .collect();
                (200, Some(Value::Array(list)))
            }
            ("POST", ["events", "user", name]) => {
                let Some(app) = q("application") else {
                    return (400, Some(json!({"message": "application is required"})));
                };
                let mut st = self.state.lock().unwrap();
                if !st.apps.contains_key(&app) {
                    return (404, Some(json!({"message": "Application not found"})));
                }
                // Delivered in order with every event generated before it.
                let ev = json!({"type": "ChannelUserevent", "application": app, "timestamp": "x",
                    "eventname": name, "userevent": {}});
                broadcast(&mut st, &app, ev);
                (204, None)
            }
            ("GET", ["applications", name]) => {
                let st = self.state.lock().unwrap();
                // Channels in Stasis are subscribed to the application.
                let chans: Vec<&String> = st
                    .channels
                    .values()
                    .filter(|c| c.in_stasis)
                    .map(|c| &c.id)
                    .collect();
                (
                    200,
                    Some(
                        json!({"name": name, "channel_ids": chans, "bridge_ids": [], "endpoint_ids": [], "device_names": []}),
                    ),
                )
            }
            ("POST", ["channels", id, "answer"]) => {
                let mut st = self.state.lock().unwrap();
                match st.channels.get_mut(*id) {
                    None => (404, Some(json!({"message": "Channel not found"}))),
                    Some(c) if !c.in_stasis => (
                        409,
                        Some(json!({"message": "Channel not in Stasis application"})),
                    ),
                    Some(c) => {
                        c.state = "Up".into();
                        (204, None)
                    }
                }
            }
            ("POST", ["channels", id, "dtmf"]) => {
                let st = self.state.lock().unwrap();
                match st.channels.get(*id) {
                    None => (404, Some(json!({"message": "Channel not found"}))),
                    Some(c) if c.state != "Up" => {
                        (412, Some(json!({"message": "Channel in invalid state"})))
                    }
                    Some(c) => {
                        if let Some(l) = st.logs.get(&c.id) {
                            l.lock()
                                .unwrap()
                                .dtmf_sent_by_app
                                .push(q("dtmf").unwrap_or_default());
                        }
                        (204, None)
                    }
                }
            }
            ("POST", ["channels", id, "continue"]) => {
                let mut st = self.state.lock().unwrap();
                let Some(c) = st.channels.get(*id).cloned() else {
                    return (404, Some(json!({"message": "Channel not found"})));
                };
                if !c.in_stasis {
                    return (
                        409,
                        Some(json!({"message": "Channel not in Stasis application"})),
                    );
                }
                if let Some(l) = st.logs.get(*id) {
                    l.lock().unwrap().continued_to = Some((
                        q("context").unwrap_or_default(),
                        q("extension").unwrap_or_default(),
                        q("priority").and_then(|p| p.parse().ok()),
                    ));
                }
                leave_stasis(&mut st, id);
                (204, None)
            }
            ("POST", ["channels", id, "redirect"]) => {
                let mut st = self.state.lock().unwrap();
                let Some(c) = st.channels.get(*id).cloned() else {
                    return (404, Some(json!({"message": "Channel not found"})));
                };
                let ep = q("endpoint").unwrap_or_default();
                let tech = c.name.split('/').next().unwrap_or("");
                if !ep.starts_with(&format!("{tech}/")) {
                    return (
                        422,
                        Some(
                            json!({"message": "Endpoint technology does not match channel's technology"}),
                        ),
                    );
                }
                if let Some(l) = st.logs.get(*id) {
                    l.lock().unwrap().redirected_to = Some(ep);
                }
                leave_stasis(&mut st, id);
                (204, None)
            }
            ("DELETE", ["channels", id]) => {
                if q("reason").is_some() && q("reason_code").is_some() {
                    return (
                        400,
                        Some(json!({"message": "Only one of reason or reason_code may be given"})),
                    );
                }
                let mut st = self.state.lock().unwrap();
                if !st.channels.contains_key(*id) {
                    return (404, Some(json!({"message": "Channel not found"})));
                }
                if let Some(l) = st.logs.get(*id) {
                    l.lock().unwrap().hangup_reason =
                        Some(q("reason").unwrap_or_else(|| "normal".into()));
                }
                hangup_channel(&mut st, id, "normal", 16);
                (204, None)
            }
            ("POST", ["bridges"]) => {
                let mut st = self.state.lock().unwrap();
                let id = q("bridgeId").unwrap_or_else(|| uuid(st.next_id + 1000));
                st.bridges.insert(id.clone(), Vec::new());
                (
                    200,
                    Some(
                        json!({"id": id, "technology": "simple_bridge", "bridge_type": "mixing", "channels": []}),
                    ),
                )
            }
            ("POST", ["bridges", id, "addChannel"]) => {
                let mut st = self.state.lock().unwrap();
                if !st.bridges.contains_key(*id) {
                    return (404, Some(json!({"message": "Bridge not found"})));
                }
                let chans: Vec<String> = q("channel")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_string)
                    .collect();
                for c in &chans {
                    match st.channels.get(c) {
                        None => return (400, Some(json!({"message": "Channel not found"}))),
                        Some(ch) if !ch.in_stasis => {
                            return (
                                422,
                                Some(json!({"message": "Channel not in Stasis application"})),
                            );
                        }
                        _ => {}
                    }
                }
                for c in &chans {
                    if let Some(ch) = st.channels.get_mut(c) {
                        ch.bridge = Some(id.to_string());
                    }
                    if let Some(b) = st.bridges.get_mut(*id) {
                        b.push(c.clone());
                    }
                }
                start_bridge_if_ready(&self.state, &mut st, id, &self.opts);
                (204, None)
            }
            ("DELETE", ["bridges", id]) => {
                let mut st = self.state.lock().unwrap();
                match st.bridges.remove(*id) {
                    None => (404, Some(json!({"message": "Bridge not found"}))),
                    Some(chans) => {
                        for c in chans {
                            if let Some(ch) = st.channels.get_mut(&c) {
                                ch.bridge = None;
                            }
                        }
                        (204, None)
                    }
                }
            }
            _ => (404, Some(json!({"message": "Resource not found"}))),
        }
    }

    async fn external_media(&self, req: &Req) -> (u16, Option<Value>) {
        let q = |k: &str| req.query.get(k).cloned();
        let Some(app) = q("app") else {
            return (400, Some(json!({"message": "app is required"})));
        };
        let transport = q("transport").unwrap_or_else(|| "udp".into());
        let encapsulation = q("encapsulation").unwrap_or_else(|| "rtp".into());
        if encapsulation == "audiosocket" || encapsulation == "rtp" {
            return self
                .external_raw(req, &app, &encapsulation, &transport)
                .await;
        }
        if transport != "websocket" || encapsulation != "none" {
            return (
                400,
                Some(json!({"message": "unsupported encapsulation/transport"})),
            );
        }
        let format = q("format").unwrap_or_default();
        if !["ulaw", "alaw", "slin", "slin16"].contains(&format.as_str()) {
            return (422, Some(json!({"message": "unsupported format"})));
        }
        let json_ctl = q("transport_data").is_some_and(|t| t.contains("f(json)"))
            && !self.opts.plain_only
            && self.opts.marks;
        let mode = q("connection_type").unwrap_or_else(|| "client".into());
        let (id, conn_id, n) = {
            let mut st = self.state.lock().unwrap();
            st.next_id += 1;
            let n = st.next_id;
            let id = q("channelId").unwrap_or_else(|| format!("1795262114.{n}"));
            if refuse_prefix_id(&mut st, &id, true) {
                return (500, Some(json!({"message": "Internal Server Error"})));
            }
            (id, uuid(n), n)
        };
        // Like Asterisk's `WebSocket/<connection>/<pointer>`: unique per channel.
        let name = if mode == "server" {
            format!("WebSocket/INCOMING/0x7fe93c{n:06x}")
        } else {
            format!(
                "WebSocket/{}/0x7fe93c{n:06x}",
                q("external_host").unwrap_or_default()
            )
        };
        let ch = Chan {
            id: id.clone(),
            name,
            state: "Up".into(),
            in_stasis: mode == "server",
            media: Some(MediaInfo {
                connection_id: conn_id.clone(),
                format: format.clone(),
                json: json_ctl,
            }),
            bridge: None,
            script: None,
            args: q("data").into_iter().collect(),
        };
        let ofs = frame_bytes(&format);
        let mut body = chan_json(&ch);
        if mode == "server" {
            body["channelvars"] = json!({"MEDIA_WEBSOCKET_CONNECTION_ID": conn_id, "MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE": ofs.to_string()});
            let mut st = self.state.lock().unwrap();
            st.server_conns.insert(conn_id, (id.clone(), false));
            let ev = json!({"type": "StasisStart", "application": app, "timestamp": "x", "args": ch.args, "channel": chan_json(&ch)});
            st.channels.insert(id, ch);
            broadcast(&mut st, &app, ev);
            return (200, Some(body));
        }
        // Client mode: Asterisk dials the websocket_client.conf URI; the POST answers only after
        // the connection is up (and MEDIA_START sent); the channel enters Stasis after that.
        let Some(uri) = q("external_host").and_then(|h| self.opts.ws_clients.get(&h).cloned())
        else {
            return (
                400,
                Some(json!({"message": "websocket_client connection not found"})),
            );
        };
        if self.opts.media_never_connects {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return (500, Some(json!({"message": "dial timed out"})));
        }
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                uri.as_str(),
            )
            .unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "media".parse().unwrap());
        let connected = tokio::time::timeout(
            Duration::from_millis(500),
            tokio_tungstenite::connect_async(request),
        )
        .await;
        let Ok(Ok((ws, resp))) = connected else {
            return (
                500,
                Some(json!({"message": "Failed to connect websocket client"})),
            );
        };
        if resp.headers().contains_key("Sec-WebSocket-Extensions") {
            return (
                500,
                Some(json!({"message": "server answered with extensions; aborted"})),
            );
        }
        // Client-mode sockets are TLS-capable streams; re-wrap the plain TCP one.
        let ws = ws.into_inner();
        let tcp = match ws {
            tokio_tungstenite::MaybeTlsStream::Plain(t) => t,
            _ => return (500, Some(json!({"message": "unexpected TLS"}))),
        };
        let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
        let start = media_start(
            &ch,
            &conn_id,
            &format,
            ofs,
            json_ctl,
            self.opts.media_start_channel_id,
        );
        if ws.send(Message::text(start)).await.is_err() {
            return (500, Some(json!({"message": "send failed"})));
        }
        {
            let mut st = self.state.lock().unwrap();
            st.channels.insert(id.clone(), ch.clone());
            st.parked_ws.insert(id.clone(), Parked::Ws(Box::new(ws)));
        }
        let state = self.state.clone();
        let app2 = app.clone();
        tokio::spawn(async move {
            // StasisStart for the media channel comes after the POST has been answered.
            tokio::time::sleep(Duration::from_millis(30)).await;
            let mut st = state.lock().unwrap();
            if let Some(c) = st.channels.get_mut(&id) {
                c.in_stasis = true;
                let ev = json!({"type": "StasisStart", "application": app2, "timestamp": "x", "args": c.args, "channel": chan_json(c)});
                broadcast(&mut st, &app2, ev);
            }
        });
        (200, Some(body))
    }

    /// AudioSocket (TCP, Asterisk connects and sends the UUID first) and RTP (UDP, sidecall
    /// learns where to send from UNICASTRTP_LOCAL_ADDRESS/PORT).
    async fn external_raw(
        &self,
        req: &Req,
        app: &str,
        encapsulation: &str,
        transport: &str,
    ) -> (u16, Option<Value>) {
        let q = |k: &str| req.query.get(k).cloned();
        let format = q("format").unwrap_or_default();
        let Some(host) = q("external_host") else {
            return (400, Some(json!({"message": "external_host is required"})));
        };
        let Ok(addr) = host.parse::<std::net::SocketAddr>() else {
            return (400, Some(json!({"message": "bad external_host"})));
        };
        self.state.lock().unwrap().media_targets.push(addr);
        let id = {
            let mut st = self.state.lock().unwrap();
            st.next_id += 1;
            let n = st.next_id;
            let id = q("channelId").unwrap_or_else(|| format!("1795262114.{n}"));
            if refuse_prefix_id(&mut st, &id, false) {
                return (500, Some(json!({"message": "Allocation failed"})));
            }
            id
        };
        let mut ch = Chan {
            id: id.clone(),
            name: String::new(),
            state: "Up".into(),
            in_stasis: true,
            media: Some(MediaInfo {
                connection_id: String::new(),
                format: format.clone(),
                json: false,
            }),
            bridge: None,
            script: None,
            args: q("data").into_iter().collect(),
        };
        let mut body;
        let parked = if encapsulation == "audiosocket" {
            if transport != "tcp" || !["slin", "slin16"].contains(&format.as_str()) {
                return (
                    400,
                    Some(json!({"message": "audiosocket needs transport=tcp and a slin format"})),
                );
            }
            let Some(uuid) = q("data").and_then(|d| parse_uuid(&d)) else {
                return (
                    400,
                    Some(json!({"message": "data must be a UUID for audiosocket"})),
                );
            };
            if self.opts.media_never_connects {
                return (500, Some(json!({"message": "Failed to connect"})));
            }
            let Ok(Ok(mut sock)) =
                tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
            else {
                return (
                    500,
                    Some(json!({"message": "Failed to connect to AudioSocket server"})),
                );
            };
            let mut pkt = vec![0x01u8, 0, 16];
            pkt.extend_from_slice(&uuid);
            if sock.write_all(&pkt).await.is_err() {
                return (500, Some(json!({"message": "send failed"})));
            }
            ch.name = format!("AudioSocket/{host}-{}", q("data").unwrap_or_default());
            body = chan_json(&ch);
            Parked::AudioSocket(sock)
        } else {
            if transport != "udp" || !["ulaw", "slin16"].contains(&format.as_str()) {
                return (
                    400,
                    Some(json!({"message": "rtp needs transport=udp and ulaw or slin16"})),
                );
            }
            let Ok(sock) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
                return (500, None);
            };
            let local = sock.local_addr().unwrap();
            ch.name = format!("UnicastRTP/{host}-0x7f");
            body = chan_json(&ch);
            body["channelvars"] = json!({"UNICASTRTP_LOCAL_ADDRESS": local.ip().to_string(), "UNICASTRTP_LOCAL_PORT": local.port().to_string()});
            Parked::Rtp(sock, addr)
        };
        let mut st = self.state.lock().unwrap();
        let ev = json!({"type": "StasisStart", "application": app, "timestamp": "x", "args": ch.args, "channel": chan_json(&ch)});
        st.channels.insert(id.clone(), ch);
        st.parked_ws.insert(id, parked);
        broadcast(&mut st, app, ev);
        (200, Some(body))
    }

    async fn upgrade(&self, mut sock: TcpStream, req: Req) {
        let Some(key) = req.headers.get("sec-websocket-key").cloned() else {
            return;
        };
        let (code, kind): (u16, &str) = if req.path == "/ari/events" {
            if !self.authed(&req) {
                (401, "")
            } else if !req.query.contains_key("app") {
                (400, "")
            } else {
                (101, "events")
            }
        } else if let Some(id) = req.path.strip_prefix("/media/") {
            let mut st = self.state.lock().unwrap();
            match st.server_conns.get_mut(id) {
                None => (404, ""),
                Some((_, true)) => (409, ""),
                Some((_, c)) => {
                    *c = true;
                    (101, "media")
                }
            }
        } else {
            (404, "")
        };
        if code != 101 {
            let _ = sock
                .write_all(
                    format!("HTTP/1.1 {code} Refused\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                )
                .await;
            return;
        }
        let proto = req.headers.get("sec-websocket-protocol").cloned();
        let mut resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
            derive_accept_key(key.as_bytes())
        );
        if let Some(p) =
            proto.filter(|p| p.split(',').any(|x| x.trim() == kind || x.trim() == "ari"))
        {
            resp.push_str(&format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                p.split(',').next().unwrap_or("").trim()
            ));
        }
        resp.push_str("\r\n");
        if sock.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
        let ws = WebSocketStream::from_raw_socket(sock, Role::Server, None).await;
        if kind == "events" {
            let app = req.query.get("app").cloned().unwrap_or_default();
            self.events_socket(ws, app).await;
        } else {
            let conn = req.path.trim_start_matches("/media/").to_string();
            let (media_id, ch) = {
                let st = self.state.lock().unwrap();
                let Some((mid, _)) = st.server_conns.get(&conn).cloned() else {
                    return;
                };
                let Some(ch) = st.channels.get(&mid).cloned() else {
                    return;
                };
                (mid, ch)
            };
            if self.opts.media_never_connects {
                // Accept the socket but never start media.
                let _keep = ws;
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            let info = ch.media.clone().unwrap();
            let mut ws = ws;
            let start = media_start(
                &ch,
                &info.connection_id,
                &info.format,
                frame_bytes(&info.format),
                info.json,
                self.opts.media_start_channel_id,
            );
            if ws.send(Message::text(start)).await.is_err() {
                return;
            }
            let mut st = self.state.lock().unwrap();
            st.parked_ws
                .insert(media_id.clone(), Parked::Ws(Box::new(ws)));
            // The app may have bridged the channel while MEDIA_START was on its way: look at
            // the channel as it is now, not as it was before the send.
            let bridge = st.channels.get(&media_id).and_then(|c| c.bridge.clone());
            if let Some(b) = bridge {
                start_bridge_if_ready(&self.state, &mut st, &b, &self.opts);
            }
        }
    }

    async fn events_socket(&self, ws: WebSocketStream<TcpStream>, app: String) {
        let (tx, mut rx) = mpsc::channel::<String>(1024);
        {
            let mut st = self.state.lock().unwrap();
            st.events_connections += 1;
            st.apps.entry(app).or_default().push(tx);
        }
        let (mut sink, mut stream) = ws.split();
        let mut check = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = check.tick() => {
                    if self.state.lock().unwrap().events_frozen {
                        // Half-open: hold the socket, answer nothing (no pongs, no events).
                        tokio::select! {
                            _ = self.stop.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                        }
                        return;
                    }
                }
                _ = self.stop.cancelled() => {
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
                m = rx.recv() => match m {
                    Some(t) => if sink.send(Message::text(t)).await.is_err() { return },
                    None => return,
                },
                m = stream.next() => match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    _ => {}
                }
            }
        }
    }
}

fn frame_bytes(format: &str) -> usize {
    match format {
        "ulaw" | "alaw" => 160,
        "slin" => 320,
        _ => 640,
    }
}

fn wire_rate(format: &str) -> u32 {
    if format == "slin16" { 16_000 } else { 8_000 }
}

fn decode(format: &str, b: &[u8]) -> Vec<i16> {
    match format {
        "ulaw" => g711::decode_ulaw(b),
        "alaw" => g711::decode_alaw(b),
        _ => l16::decode_le(b),
    }
}

fn encode(format: &str, s: &[i16]) -> Vec<u8> {
    match format {
        "ulaw" => g711::encode_ulaw(s),
        "alaw" => g711::encode_alaw(s),
        _ => l16::encode_le(s),
    }
}

fn media_start(
    ch: &Chan,
    conn: &str,
    format: &str,
    ofs: usize,
    json: bool,
    with_channel_id: bool,
) -> String {
    if !with_channel_id {
        // chan_websocket before 2025-10-21 (commit 4da19a9): no channel_id field.
        return format!(
            "MEDIA_START connection_id:{conn} channel:{} format:{format} optimal_frame_size:{ofs} ptime:20",
            ch.name
        );
    }
    if json {
        json!({"event": "MEDIA_START", "connection_id": conn, "channel": ch.name, "channel_id": ch.id, "format": format,
               "optimal_frame_size": ofs, "ptime": 20, "channel_variables": {}})
        .to_string()
    } else {
        format!(
            "MEDIA_START connection_id:{conn} channel:{} channel_id:{} format:{format} optimal_frame_size:{ofs} ptime:20",
            ch.name, ch.id
        )
    }
}

/// Asterisk's legacy channel storage treats a new id as taken when it is a prefix of a live one
/// (strncasecmp(existing, new, strlen(new))); for chan_websocket that path crashes Asterisk.
fn refuse_prefix_id(st: &mut State, id: &str, websocket: bool) -> bool {
    let lower = id.to_ascii_lowercase();
    let taken = st
        .channels
        .keys()
        .any(|k| k.to_ascii_lowercase().starts_with(&lower));
    if taken {
        st.prefix_refusals.push(id.to_string());
        if websocket {
            st.crashed = true;
        }
    }
    taken
}

fn chan_json(c: &Chan) -> Value {
    json!({"id": c.id, "name": c.name, "state": c.state, "protocol_id": "",
           "caller": {"name": "", "number": "100"}, "connected": {"name": "", "number": ""},
           "accountcode": "", "dialplan": {"context": "sidecall", "exten": "100", "priority": 2, "app_name": "Stasis", "app_data": "sidecall"},
           "creationtime": "2026-11-21T00:00:00.000+0000", "language": "en"})
}

fn broadcast(st: &mut State, app: &str, ev: Value) {
    st.events_sent += 1;
    if let Some(txs) = st.apps.get_mut(app) {
        txs.retain(|t| !t.is_closed());
        for t in txs.iter() {
            let _ = t.try_send(ev.to_string());
        }
    }
}

fn all_apps(st: &State) -> Vec<String> {
    st.apps.keys().cloned().collect()
}

/// A channel leaves Stasis (continue/redirect): StasisEnd, out of its bridge.
fn leave_stasis(st: &mut State, id: &str) {
    let Some(c) = st.channels.get_mut(id) else {
        return;
    };
    c.in_stasis = false;
    let ev = json!({"type": "StasisEnd", "application": "sidecall", "timestamp": "x", "channel": chan_json(c)});
    let bridge = c.bridge.take();
    if let Some(b) = bridge.and_then(|b| st.bridges.get_mut(&b)) {
        b.retain(|x| x != id);
    }
    for app in all_apps(st) {
        broadcast(st, &app, ev.clone());
    }
    if let Some(l) = st.logs.get(id) {
        l.lock().unwrap().ended = true;
    }
    // The caller is gone from this PBX's point of view for the test (it went to the dialplan).
    st.channels.remove(id);
}

/// Hangs a channel up: StasisEnd (if in Stasis), ChannelDestroyed, media socket closed.
fn hangup_channel(st: &mut State, id: &str, cause_txt: &str, cause: i64) {
    let Some(c) = st.channels.remove(id) else {
        return;
    };
    if let Some(b) = c.bridge.as_ref().and_then(|b| st.bridges.get_mut(b)) {
        b.retain(|x| x != id);
    }
    let mut evs = Vec::new();
    if c.in_stasis {
        evs.push(json!({"type": "StasisEnd", "application": "sidecall", "timestamp": "x", "channel": chan_json(&c)}));
    }
    evs.push(json!({"type": "ChannelDestroyed", "application": "sidecall", "timestamp": "x", "cause": cause, "cause_txt": cause_txt, "channel": chan_json(&c)}));
    for app in all_apps(st) {
        for ev in &evs {
            broadcast(st, &app, ev.clone());
        }
    }
    if let Some(tx) = st.media_ctl.remove(id) {
        let _ = tx.try_send(MediaCtl::Hangup);
    }
    st.parked_ws.remove(id);
    if let Some(l) = st.logs.get(id) {
        l.lock().unwrap().ended = true;
    }
}

/// When a bridge holds a caller and a connected media channel, media starts flowing.
fn start_bridge_if_ready(state: &Arc<Mutex<State>>, st: &mut State, bridge: &str, opts: &Options) {
    let (stall, marks, lose_marks) = (opts.stall_playout, opts.marks, opts.lose_marks);
    let Some(members) = st.bridges.get(bridge).cloned() else {
        return;
    };
    let caller = members
        .iter()
        .find(|m| st.channels.get(*m).is_some_and(|c| c.media.is_none()))
        .cloned();
    let media = members
        .iter()
        .find(|m| st.parked_ws.contains_key(*m))
        .cloned();
    let (Some(caller), Some(media)) = (caller, media) else {
        return;
    };
    let Some(ws) = st.parked_ws.remove(&media) else {
        return;
    };
    let Some(ch) = st.channels.get(&media).cloned() else {
        return;
    };
    let script = st
        .channels
        .get(&caller)
        .and_then(|c| c.script.clone())
        .unwrap_or_default();
    let Some(log) = st.logs.get(&caller).cloned() else {
        return;
    };
    log.lock().unwrap().bridged = true;
    let (tx, rx) = mpsc::channel(64);
    st.media_ctl.insert(media.clone(), tx.clone());
    st.media_ctl.insert(caller.clone(), tx);
    let info = ch.media.clone().unwrap();
    let session = Session {
        state: state.clone(),
        info,
        media_id: media,
        caller,
        script,
        log,
        stall,
        marks,
        lose_marks,
    };
    match ws {
        Parked::Ws(ws) => {
            tokio::spawn(media_session(*ws, session, rx));
        }
        other => {
            tokio::spawn(raw_session(other, session, rx));
        }
    }
}

struct Session {
    state: Arc<Mutex<State>>,
    info: MediaInfo,
    media_id: String,
    caller: String,
    script: Script,
    log: Arc<Mutex<CallLog>>,
    stall: bool,
    marks: bool,
    lose_marks: bool,
}

/// The caller's side of a bridged call: speaks turns 700 ms after the agent stops, clips at
/// fixed times, presses keys, hangs up at the end of its script.
struct CallerSim {
    turns: VecDeque<Vec<i16>>,
    at: VecDeque<(u64, Vec<i16>)>,
    keys: VecDeque<(u64, char)>,
    speaking: Vec<(Vec<i16>, usize)>,
    agent_spoke: bool,
    quiet_ticks: u64,
    max_ms: u64,
    per_frame: usize,
    log: Arc<Mutex<CallLog>>,
}

/// What the caller does in one 20 ms tick.
struct CallerTick {
    frame: Option<Vec<i16>>,
    keys: Vec<char>,
    hang_up: bool,
}

impl CallerSim {
    fn new(script: &mut Script, per_frame: usize, log: Arc<Mutex<CallLog>>) -> Self {
        let mut keys: VecDeque<(u64, char)> = script
            .dtmf
            .iter()
            .flat_map(|(t, d)| {
                d.chars()
                    .enumerate()
                    .map(move |(i, c)| (t + i as u64 * 150, c))
            })
            .collect();
        keys.make_contiguous().sort_by_key(|k| k.0);
        Self {
            turns: std::mem::take(&mut script.turns).into(),
            at: std::mem::take(&mut script.at).into(),
            keys,
            speaking: Vec::new(),
            agent_spoke: false,
            quiet_ticks: 0,
            max_ms: if script.max_ms == 0 {
                120_000
            } else {
                script.max_ms
            },
            per_frame,
            log,
        }
    }

    /// `heard` is the agent audio played to the caller in this tick.
    fn tick(&mut self, now: u64, heard: &[i16]) -> CallerTick {
        let mut out = CallerTick {
            frame: None,
            keys: Vec::new(),
            hang_up: now >= self.max_ms,
        };
        if out.hang_up {
            return out;
        }
        self.log.lock().unwrap().heard.extend_from_slice(heard);
        if heard.iter().any(|s| s.unsigned_abs() > 200) {
            self.agent_spoke = true;
            self.quiet_ticks = 0;
        } else {
            self.quiet_ticks += 1;
        }
        if self.speaking.is_empty()
            && self.agent_spoke
            && self.quiet_ticks * 20 >= 700
            && let Some(clip) = self.turns.pop_front()
        {
            self.log.lock().unwrap().caller_spoke_at.push(now);
            self.speaking.push((clip, 0));
            self.agent_spoke = false;
        }
        while self.at.front().is_some_and(|(t, _)| *t <= now) {
            let (_, clip) = self.at.pop_front().unwrap();
            self.log.lock().unwrap().caller_spoke_at.push(now);
            self.speaking.push((clip, 0));
            self.agent_spoke = false;
        }
        while self.keys.front().is_some_and(|(t, _)| *t <= now) {
            let (_, k) = self.keys.pop_front().unwrap();
            self.agent_spoke = false;
            self.log
                .lock()
                .unwrap()
                .commands
                .push((now, format!("CALLER_DTMF {k}")));
            out.keys.push(k);
        }
        if !self.speaking.is_empty() {
            let mut mix = vec![0i32; self.per_frame];
            for (clip, pos) in self.speaking.iter_mut() {
                let end = (*pos + self.per_frame).min(clip.len());
                for (i, s) in clip[*pos..end].iter().enumerate() {
                    mix[i] += *s as i32;
                }
                *pos = end;
            }
            self.speaking.retain(|(c, p)| *p < c.len());
            out.frame = Some(mix.iter().map(|&v| v.clamp(-32768, 32767) as i16).collect());
        }
        out
    }
}

/// Reports a caller's key on ARI (ChannelDtmfReceived), as Asterisk does besides the media side.
fn ari_dtmf(state: &Arc<Mutex<State>>, caller: &str, k: char) {
    let mut st = state.lock().unwrap();
    if let Some(c) = st.channels.get(caller).cloned() {
        let ev = json!({"type": "ChannelDtmfReceived", "application": "sidecall", "timestamp": "x",
            "digit": k.to_string(), "duration_ms": 100, "channel": chan_json(&c)});
        for app in all_apps(&st) {
            broadcast(&mut st, &app, ev.clone());
        }
    }
}

/// Plays one bridged call over chan_websocket: caller audio out, agent audio queued and played
/// at 20 ms, marks, flush and flow control.
async fn media_session(
    ws: WebSocketStream<TcpStream>,
    sess: Session,
    mut rx: mpsc::Receiver<MediaCtl>,
) {
    let Session {
        state,
        info,
        media_id,
        caller,
        mut script,
        log,
        stall,
        marks,
        lose_marks,
    } = sess;
    let fmt = info.format.clone();
    let ofs = frame_bytes(&fmt);
    let per_frame = (wire_rate(&fmt) / 50) as usize;
    let (mut sink, mut stream) = ws.split();
    let mut queue: VecDeque<Result<Vec<u8>, String>> = VecDeque::new(); // Ok(frame) | Err(mark id)
    let mut frames = 0usize;
    let mut full = false;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let start = Instant::now();
    let mut sim = CallerSim::new(&mut script, per_frame, log.clone());
    let json = info.json;
    let mut outgoing: Vec<Message> = Vec::new();
    let event = |name: &str, extra: Value| -> String {
        if json {
            let mut v = json!({"event": name, "channel_id": media_id});
            if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
                m.extend(e);
            }
            v.to_string()
        } else {
            name.to_string()
        }
    };
    loop {
        tokio::select! {
            // Control first: a hangup told before the app closed its socket is seen as the
            // hangup (Asterisk acts on it when the REST call is made, not when it is polled).
            biased;
            c = rx.recv() => match c {
                Some(MediaCtl::Dtmf(d)) => {
                    let t = if json { json!({"event": "DTMF_END", "channel_id": media_id, "digit": d.to_string()}).to_string() } else { format!("DTMF_END digit:{d} channel_id:{media_id}") };
                    let _ = sink.send(Message::text(t)).await;
                }
                Some(MediaCtl::Hangup) | None => {
                    log.lock().unwrap().unplayed_at_hangup = Some(frames);
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))).await;
                    break;
                }
            },
            m = stream.next() => match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Binary(b))) => {
                    if b.len() > 65_535 {
                        let _ = sink.send(Message::Close(Some(CloseFrame { code: CloseCode::Size, reason: "".into() }))).await;
                        break;
                    }
                    if frames >= QUEUE_MAX {
                        continue; // dropped whole
                    }
                    for chunk in b.chunks(ofs) {
                        if chunk.len() < ofs {
                            break; // short tail dropped (no buffering mode)
                        }
                        queue.push_back(Ok(chunk.to_vec()));
                        frames += 1;
                        if !full && frames >= XOFF_LEVEL {
                            full = true;
                            outgoing.push(Message::text(event("MEDIA_XOFF", json!({}))));
                        }
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let now = start.elapsed().as_millis() as u64;
                    if t.is_empty() || t.len() > 128 {
                        log.lock().unwrap().commands.push((now, format!("IGNORED({} bytes)", t.len())));
                        continue;
                    }
                    let (cmd, id) = if t.starts_with('{') {
                        match serde_json::from_str::<Value>(&t) {
                            Ok(v) => (v["command"].as_str().unwrap_or("").to_string(), v["correlation_id"].as_str().map(str::to_string)),
                            Err(_) => {
                                outgoing.push(Message::text(event("ERROR", json!({"error_text": "Unable to parse JSON command"}))));
                                continue;
                            }
                        }
                    } else {
                        let mut it = t.trim().splitn(2, ' ');
                        (it.next().unwrap_or("").to_string(), it.next().map(str::to_string))
                    };
                    log.lock().unwrap().commands.push((now, cmd.clone()));
                    match cmd.as_str() {
                        "MARK_MEDIA" if marks && lose_marks => {}
                        "MARK_MEDIA" if marks => queue.push_back(Err(id.unwrap_or_default())),
                        "MARK_MEDIA" => log.lock().unwrap().unknown_commands += 1,
                        "FLUSH_MEDIA" => {
                            queue.clear();
                            frames = 0;
                            log.lock().unwrap().flushes.push(now);
                        }
                        "HANGUP" => break,
                        "GET_STATUS" => outgoing.push(Message::text(format!("STATUS channel_id:{media_id} queue_length:{frames} xon_level:800 xoff_level:900 queue_full:{full} bulk_media:false media_paused:false"))),
                        _ => {} // the rest are accepted; unknown commands are only logged by Asterisk
                    }
                }
                Some(Ok(_)) => {}
            },
            _ = ticker.tick() => {
                let now = start.elapsed().as_millis() as u64;
                // XON check first, then control frames, then one media frame.
                if full && frames < XON_LEVEL {
                    full = false;
                    outgoing.push(Message::text(event("MEDIA_XON", json!({}))));
                }
                while let Some(Err(_)) = queue.front() {
                    if let Some(Err(id)) = queue.pop_front() {
                        log.lock().unwrap().marks_answered += 1;
                        outgoing.push(Message::text(if json { event("MEDIA_MARK_PROCESSED", json!({"correlation_id": id})) } else { format!("MEDIA_MARK_PROCESSED {id}") }));
                    }
                }
                let mut heard = vec![0i16; per_frame];
                if !stall
                    && let Some(Ok(_)) = queue.front()
                        && let Some(Ok(f)) = queue.pop_front() {
                            frames -= 1;
                            let s = decode(&fmt, &f);
                            let n = s.len().min(per_frame);
                            heard[..n].copy_from_slice(&s[..n]);
                        }
                let t = sim.tick(now, &heard);
                if t.hang_up {
                    {
                        let mut st = state.lock().unwrap();
                        hangup_channel(&mut st, &caller, "normal", 16);
                    }
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))).await;
                    break;
                }
                for k in t.keys {
                    ari_dtmf(&state, &caller, k);
                    outgoing.push(Message::text(if json { json!({"event": "DTMF_END", "channel_id": media_id, "digit": k.to_string()}).to_string() } else { format!("DTMF_END digit:{k} channel_id:{media_id}") }));
                }
                if script.garbage_at_ms.is_some_and(|t| t <= now) {
                    script.garbage_at_ms = None;
                    outgoing.push(Message::text("WHAT_IS_THIS channel_id:x"));
                    outgoing.push(Message::text("{\"event\":"));
                    outgoing.push(Message::text("MEDIA_MARK_PROCESSED not-a-mark-of-ours"));
                    outgoing.push(Message::binary(vec![0x55u8; 7]));
                }
                if script.flood_at_ms.is_some_and(|t| t <= now) {
                    script.flood_at_ms = None;
                    // A voiced buzz (140 Hz and harmonics, a syllable rhythm) that any VAD
                    // takes for speech, at the wire rate.
                    let rate = wire_rate(&fmt) as f32;
                    let noise: Vec<u8> = (0..65_534 / 2)
                        .flat_map(|i| {
                            let t = i as f32 / rate;
                            let env = 0.6 + 0.4 * (2.0 * std::f32::consts::PI * 4.0 * t).sin();
                            let v: f32 = (1..12)
                                .map(|h| (2.0 * std::f32::consts::PI * 140.0 * h as f32 * t).sin() / h as f32)
                                .sum();
                            ((v * env * 6000.0) as i16).to_le_bytes()
                        })
                        .collect();
                    for _ in 0..400 {
                        outgoing.push(Message::binary(noise.clone()));
                    }
                }
                if script.oversized_at_ms.is_some_and(|t| t <= now) {
                    script.oversized_at_ms = None;
                    outgoing.push(Message::binary(vec![0u8; 200_000]));
                }
                if let Some(f) = t.frame {
                    outgoing.push(Message::binary(encode(&fmt, &f)));
                }
            }
        }
        let mut failed = false;
        for m in outgoing.drain(..) {
            if sink.send(m).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            break;
        }
    }
    // Closing the media socket hangs up the media channel (the caller stays until it is
    // transferred, hung up, or hangs up).
    let mut st = state.lock().unwrap();
    hangup_channel(&mut st, &media_id, "normal", 16);
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

enum RawOut {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Udp(Arc<tokio::net::UdpSocket>, std::net::SocketAddr, u16, u32),
}

/// Reads AudioSocket packets from the app into `tx`; app DTMF (0x03) is an error that ends the call.
fn spawn_audiosocket_reader(
    mut r: tokio::net::tcp::OwnedReadHalf,
    tx: mpsc::Sender<Result<Vec<i16>, String>>,
) {
    tokio::spawn(async move {
        loop {
            let mut head = [0u8; 3];
            if r.read_exact(&mut head).await.is_err() {
                let _ = tx.send(Err("closed".into())).await;
                return;
            }
            let mut p = vec![0u8; u16::from_be_bytes([head[1], head[2]]) as usize];
            if r.read_exact(&mut p).await.is_err() {
                let _ = tx.send(Err("closed".into())).await;
                return;
            }
            let msg = match head[0] {
                0x10 | 0x12 => Ok(l16::decode_le(&p)),
                0x00 => Err("hangup from app".into()),
                0x03 => Err("app sent DTMF (not allowed)".into()),
                k => Err(format!("unexpected kind {k:#x}")),
            };
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                return;
            }
        }
    });
}

/// Reads RTP from the app into `tx`, checking every header against the stream so far.
fn spawn_rtp_reader(
    sock: Arc<tokio::net::UdpSocket>,
    fmt: String,
    log: Arc<Mutex<CallLog>>,
    tx: mpsc::Sender<Result<Vec<i16>, String>>,
) {
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        let want_pt = if fmt == "ulaw" { 0u8 } else { 118 };
        let step = if fmt == "ulaw" { 160 } else { 320 };
        let mut last: Option<(u16, u32, u32)> = None;
        loop {
            // The reader ends with its session, like Asterisk's RTP instance.
            let n = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok((n, _)) => n,
                    Err(_) => return,
                },
                _ = tx.closed() => return,
            };
            let p = &buf[..n];
            let mut bad = n < 12 || p[0] >> 6 != 2 || (p[1] & 0x7f) != want_pt;
            if n >= 12 {
                let seq = u16::from_be_bytes([p[2], p[3]]);
                let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
                if let Some((ls, lt, lss)) = last {
                    bad |= seq != ls.wrapping_add(1) || ts != lt.wrapping_add(step) || ssrc != lss;
                }
                last = Some((seq, ts, ssrc));
            }
            {
                let mut l = log.lock().unwrap();
                l.rtp_packets += 1;
                l.rtp_header_errors += bad as u32;
            }
            if n > 12 {
                let payload = &p[12..];
                let s = if fmt == "ulaw" {
                    g711::decode_ulaw(payload)
                } else {
                    l16::decode_be(payload)
                };
                if tx.send(Ok(s)).await.is_err() {
                    return;
                }
            }
        }
    });
}

/// Plays one bridged call over AudioSocket or RTP: Asterisk writes what arrives straight to the
/// caller (no queue, no marks, no flush), so the app must pace; bursts are recorded.
async fn raw_session(transport: Parked, sess: Session, mut rx: mpsc::Receiver<MediaCtl>) {
    let Session {
        state,
        info,
        media_id,
        caller,
        mut script,
        log,
        ..
    } = sess;
    let fmt = info.format.clone();
    let rate = wire_rate(&fmt);
    let per_frame = (rate / 50) as usize;
    let (in_tx, mut in_rx) = mpsc::channel::<Result<Vec<i16>, String>>(256);
    let mut sim = CallerSim::new(&mut script, per_frame, log.clone());
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let start = Instant::now();
    let mut arrived: VecDeque<Vec<i16>> = VecDeque::new();
    let mut this_tick = 0usize;
    let mut window: VecDeque<usize> = VecDeque::new();
    let mut out = match transport {
        Parked::AudioSocket(sock) => {
            let (r, w) = sock.into_split();
            spawn_audiosocket_reader(r, in_tx.clone());
            RawOut::Tcp(w)
        }
        Parked::Rtp(sock, to) => {
            let sock = Arc::new(sock);
            spawn_rtp_reader(sock.clone(), fmt.clone(), log.clone(), in_tx.clone());
            RawOut::Udp(sock, to, 1, 0)
        }
        Parked::Ws(_) => return,
    };
    loop {
        tokio::select! {
            c = rx.recv() => match c {
                Some(MediaCtl::Dtmf(_)) => {}
                Some(MediaCtl::Hangup) | None => break,
            },
            m = in_rx.recv() => match m {
                Some(Ok(frame)) => {
                    this_tick += 1;
                    arrived.push_back(frame);
                }
                Some(Err(why)) => {
                    log.lock().unwrap().commands.push((start.elapsed().as_millis() as u64, why));
                    break;
                }
                None => break,
            },
            _ = ticker.tick() => {
                let now = start.elapsed().as_millis() as u64;
                window.push_back(this_tick);
                if window.len() > 10 {
                    window.pop_front();
                }
                {
                    let mut l = log.lock().unwrap();
                    l.max_arrivals_per_200ms = l.max_arrivals_per_200ms.max(window.iter().sum());
                }
                this_tick = 0;
                let mut heard = vec![0i16; per_frame];
                if let Some(f) = arrived.pop_front() {
                    let n = f.len().min(per_frame);
                    heard[..n].copy_from_slice(&f[..n]);
                }
                // Nothing is queued at the PBX: what comes too early is played over or lost.
                arrived.truncate(2);
                let t = sim.tick(now, &heard);
                if t.hang_up {
                    let mut st = state.lock().unwrap();
                    hangup_channel(&mut st, &caller, "normal", 16);
                    break;
                }
                for k in t.keys {
                    ari_dtmf(&state, &caller, k);
                    if let RawOut::Tcp(w) = &mut out {
                        let _ = w.write_all(&[0x03, 0, 1, k as u8]).await;
                    }
                }
                if let Some(f) = t.frame {
                    let failed = match &mut out {
                        RawOut::Tcp(w) => {
                            let kind = if rate == 16_000 { 0x12u8 } else { 0x10 };
                            let payload = l16::encode_le(&f);
                            let mut pkt = vec![kind];
                            pkt.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                            pkt.extend_from_slice(&payload);
                            w.write_all(&pkt).await.is_err()
                        }
                        RawOut::Udp(sock, to, seq, ts) => {
                            let (pt, payload) = if fmt == "ulaw" { (0u8, g711::encode_ulaw(&f)) } else { (118u8, l16::encode_be(&f)) };
                            let mut pkt = vec![0x80, pt];
                            pkt.extend_from_slice(&seq.to_be_bytes());
                            pkt.extend_from_slice(&ts.to_be_bytes());
                            pkt.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                            pkt.extend_from_slice(&payload);
                            *seq = seq.wrapping_add(1);
                            *ts = ts.wrapping_add(per_frame as u32);
                            sock.send_to(&pkt, *to).await.is_err()
                        }
                    };
                    if failed {
                        break;
                    }
                }
            }
        }
    }
    let mut st = state.lock().unwrap();
    hangup_channel(&mut st, &media_id, "normal", 16);
}

struct Req {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
}

async fn read_request(sock: &mut TcpStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = sock.read(&mut byte).await.ok()?;
        if n == 0 || buf.len() > 16_384 {
            return None;
        }
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let mut headers = HashMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).await.ok()?;
    let (path, qs) = target.split_once('?').unwrap_or((&target, ""));
    let query = qs
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), pct_decode(v)))
        .collect();
    Some(Req {
        method,
        path: path.to_string(),
        query,
        headers,
    })
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = T.iter().position(|x| *x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}
