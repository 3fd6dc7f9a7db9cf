//! A FreeSWITCH 1.10.12 + amigniter/mod_audio_stream (ec2a781, libwsc 1.1.0) emulator for tests,
//! built from ../shared/PROTOCOLS.md and checked against the real lab at /opt/fslab (wire captures
//! of auth, replies, BACKGROUND_JOB, CUSTOM/PLAYBACK/DTMF JSON events; the module's and libwsc's
//! sources under /opt/src).
//!
//! ESL (inbound): `auth/request`, `auth` (`-ERR invalid` + disconnect notice + close), `event
//! json|plain <tokens>` (tokens after CUSTOM are subclasses; commands add up; a CUSTOM event is
//! delivered only for a subscribed subclass), `noevents`, `filter`, `api` (synchronous: events
//! wait behind it), `bgapi` (`+OK Job-UUID: X` with a `Job-UUID` header, client `Job-UUID`
//! honoured, then a global BACKGROUND_JOB with the output in `_body`), `sendmsg` playback
//! (nesting without `event-lock`, queueing with it), `exit`. API commands: uuid_break [all],
//! uuid_transfer, uuid_kill, uuid_send_dtmf, uuid_answer, uuid_setvar, uuid_getvar,
//! uuid_audio_stream start|stop|pause|resume|send_text, status; others `-ERR <cmd> Command not
//! found!`.
//!
//! mod_audio_stream: a libwsc-style handshake (no space after the colons, no subprotocol, no
//! deflate offer, `Origin`, STREAM_EXTRA_HEADERS after it), connect timeout, `::connect`,
//! `::error` (code 10 Timeout, 6 refused/upgrade failed, 1 TCP drop), `::disconnect` on a server
//! close, metadata as one TEXT frame, mono L16 frames every 20 ms with near-zero noise while the
//! caller is silent and a back-to-back pair every `pair_every` frames, heartbeat PINGs,
//! streamAudio -> `::play` (file kept in memory, playable), anything else -> `::json`, binary from
//! the server ignored, close 1000 ~15 ms after hangup with no `::disconnect`.
//!
//! jambonz mod_audio_fork (freeswitch-modules 30f2189, /opt/fslab/FORKS.md), beside it:
//! `uuid_audio_fork` start|stop|pause|resume|graceful-shutdown|send_text|stop_play; an lws-style
//! handshake (`Host`/`Origin` without the port, subprotocol audio.drachtio.org, a 101 without it
//! accepted); binary L16 back through the pre-buffer (1280×f then 640×f samples) into the play-out
//! buffer, mixed (i16 wrap) into `heard` only on frames FreeSWITCH writes (a playback, or the park
//! with `send_silence_when_idle`); marks as -1 sentinels (so real -1 samples answer marks),
//! killAudio, clearMarks, and the CUSTOM `mod_audio_fork::*` events.
//!
//! Choices where the page is silent:
//! - An unknown playback file fires no PLAYBACK_START/STOP, only CHANNEL_EXECUTE and
//!   CHANNEL_EXECUTE_COMPLETE with `Application-Response: FILE NOT FOUND` (what switch_ivr_play_file
//!   and mod_dptools do); it is logged in `playbacks` as "notfound".
//! - uuid_break stops only the innermost (newest nested) playback, as CF_BREAK does; outer nested
//!   ones keep playing. `all` additionally drops the queued (event-lock) ones silently.
//! - uuid_transfer and hangup end every playing file (transfer: status break; hangup: status
//!   done, as FreeSWITCH reports a playback ended by a hangup) and drop the queue.
//! - A `sendmsg` playback without event-lock that arrives while queued event-lock ones wait
//!   queues behind them (one FIFO of messages; a running file lets the next message nest only if
//!   it was not started with event-lock).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

const DISCONNECT_NOTICE: &str = "Content-Type: text/disconnect-notice\nContent-Length: 67\n\nDisconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n";

#[derive(Clone, Debug)]
pub struct FsOptions {
    /// ESL password (event_socket.conf.xml), default "ClueCon".
    pub password: String,
    /// mod_audio_stream's (libwsc's) connect/handshake timeout, default 1000 ms.
    pub connect_timeout_ms: u64,
    /// Every N frames two frames go back to back after a 40 ms gap (as observed), default 37.
    pub pair_every: Option<u32>,
    /// A HEARTBEAT event to subscribers this often (switch.conf.xml `event-heartbeat-interval`,
    /// 20 s by default in FreeSWITCH); 0: none (a PBX whose event stream went quiet).
    pub heartbeat_ms: u64,
}

impl Default for FsOptions {
    fn default() -> Self {
        Self {
            password: "ClueCon".into(),
            connect_timeout_ms: 1000,
            pair_every: Some(37),
            heartbeat_ms: 20_000,
        }
    }
}

/// What a test caller does.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// Spoken one per turn, each 700 ms after the agent stops (samples at the call rate).
    pub turns: Vec<Vec<i16>>,
    /// Spoken at an absolute time after the call is answered (ms).
    pub at: Vec<(u64, Vec<i16>)>,
    /// Keys pressed at a time (ms), 150 ms apart (ESL DTMF events only, never on the media socket).
    pub dtmf: Vec<(u64, String)>,
    /// The caller hangs up after this long (0: 120 s).
    pub max_ms: u64,
    /// Send binary frames of odd sizes and a bogus text frame on the media socket at this time
    /// (not something a real mod_audio_stream does: a robustness probe).
    pub garbage_at_ms: Option<u64>,
}

/// One call placed into the dialplan that runs `uuid_audio_stream <uuid> start <url> mono <rate>
/// [metadata]` then `park`.
#[derive(Clone, Debug)]
pub struct FsCall {
    /// ws:// URL; "{uuid}" is replaced by the channel uuid.
    pub url: String,
    /// 8000 or 16000 (the channel's and the stream's rate).
    pub rate: u32,
    pub metadata: Option<String>,
    /// Channel variables (events carry them as `variable_<name>`). STREAM_HEART_BEAT (seconds,
    /// default 15) and STREAM_EXTRA_HEADERS (a JSON object) are honoured.
    pub variables: Vec<(String, String)>,
    pub script: Script,
    /// Which module the dialplan starts after CHANNEL_PARK.
    pub module: Module,
}

/// The media module the dialplan uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Module {
    /// amigniter/mod_audio_stream: `uuid_audio_stream <uuid> start <url> mono <rate> [metadata]`.
    #[default]
    AudioStream,
    /// jambonz mod_audio_fork, bidirectional: `uuid_audio_fork <uuid> start <url> mono 16k|8k
    /// audio_fork <metadata> true true <rate>` (audio back at the call rate). Set the channel
    /// variable `send_silence_when_idle` (e.g. -1) or nothing is played while parked.
    AudioFork,
}

impl Default for FsCall {
    fn default() -> Self {
        Self {
            url: String::new(),
            rate: 16000,
            metadata: None,
            variables: Vec::new(),
            script: Script::default(),
            module: Module::AudioStream,
        }
    }
}

/// What happened to one call, as FreeSWITCH saw it.
#[derive(Debug, Clone, Default)]
pub struct FsCallLog {
    pub uuid: String,
    /// Agent audio the caller heard, at the call rate, one 20 ms slot per tick.
    pub heard: Vec<i16>,
    /// (ms, file, "done"|"break"|"notfound")
    pub playbacks: Vec<(u64, String, String)>,
    /// uuid_break at ms, with `all`?
    pub breaks: Vec<(u64, bool)>,
    /// Playbacks started while another played (sendmsg without event-lock).
    pub nested: u32,
    /// The uuid_transfer arguments after the uuid.
    pub transferred_to: Option<String>,
    /// uuid_kill cause.
    pub killed: Option<String>,
    /// uuid_send_dtmf digits.
    pub dtmf_sent_by_app: Vec<String>,
    pub stream_connected: bool,
    /// The `::error` body, e.g. `{"status":"error","message":{"code":10,"error":"Timeout"}}`.
    pub stream_error: Option<String>,
    /// The close code the app (the WebSocket server) sent.
    pub stream_closed_by_app: Option<u16>,
    pub metadata_sent: bool,
    /// `mod_audio_stream::json` fired (text the module could not take).
    pub json_events: u32,
    pub caller_spoke_at: Vec<u64>,
    pub ended: bool,
    /// Every ESL command about this uuid (ms since the call started, command line).
    pub commands: Vec<(u64, String)>,
    /// mod_audio_fork: ms of each `killAudio` received.
    pub kills: Vec<u64>,
    /// mod_audio_fork: (ms, name, "playout"|"cleared") of each mark event sent to the server.
    pub marks_answered: Vec<(u64, String, String)>,
    /// mod_audio_fork: marks dropped because 30 were outstanding.
    pub marks_dropped: u32,
    /// mod_audio_fork: bytes of BINARY messages received from the server.
    pub fork_bytes_received: u64,
    /// mod_audio_fork: samples of server audio mixed into `heard` (markers excluded).
    pub fork_samples_played: u64,
    /// mod_audio_fork: ms of each `uuid_audio_fork <uuid> stop_play`.
    pub stop_plays: Vec<u64>,
    /// mod_audio_fork: the CUSTOM subclasses fired, in order (ms, subclass).
    pub fork_events: Vec<(u64, String)>,
}

#[derive(Clone)]
pub struct FsEmulator {
    port: u16,
    inner: Arc<Inner>,
}

struct Inner {
    opts: FsOptions,
    state: Mutex<State>,
    stop: CancellationToken,
    core_uuid: String,
}

#[derive(Default)]
struct State {
    conns: Vec<EslConn>,
    chans: HashMap<String, Chan>,
    /// path -> (rate, samples): streamAudio files and files added by tests.
    files: HashMap<String, (u32, Arc<Vec<i16>>)>,
    esl_connections: u32,
    next_id: u64,
    seq: u64,
    /// mod_audio_fork's playCount (global).
    fork_play_count: u32,
}

struct EslConn {
    id: u64,
    tx: mpsc::UnboundedSender<String>,
    sub: Sub,
    kill: CancellationToken,
}

#[derive(Default)]
struct Sub {
    all: bool,
    json: bool,
    types: HashSet<String>,
    subclasses: HashSet<String>,
    filters: Vec<(String, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StreamSt {
    /// No media bug: `start` works, `stop` answers -ERR.
    Detached,
    /// Connecting, connected or paused.
    Attached,
    /// The server closed: still attached (`start` -ERR until `stop`).
    ServerClosed,
}

struct Chan {
    log: Arc<Mutex<FsCallLog>>,
    ctl: mpsc::UnboundedSender<Ctl>,
    vars: Vec<(String, String)>,
    name: String,
    number: u64,
    rate: u32,
    stream: StreamSt,
    /// mod_audio_fork's media bug name while one is attached (one fork per channel here).
    fork_bug: Option<String>,
    start: Instant,
}

enum Ctl {
    Play {
        file: String,
        locked: bool,
        event_uuid: String,
    },
    Break {
        all: bool,
    },
    Transfer,
    Hangup(String),
    StreamStart {
        url: String,
        rate: u32,
        metadata: Option<String>,
    },
    StreamStop(Option<String>),
    Pause(bool),
    SendText(String),
    ForkStart(ForkParams),
    /// stop, with the text sent before the close.
    ForkStop(Option<String>),
    ForkPause(bool),
    ForkGraceful,
    ForkSendText(Option<String>),
    ForkStopPlay,
}

struct Ev {
    headers: Vec<(String, String)>,
    body: Option<String>,
}

impl FsEmulator {
    /// Starts the ESL server on 127.0.0.1 and a free port.
    pub async fn start(opts: FsOptions) -> FsEmulator {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind ESL");
        let port = listener.local_addr().unwrap().port();
        let inner = Arc::new(Inner {
            opts,
            state: Mutex::default(),
            stop: CancellationToken::new(),
            core_uuid: make_uuid(0xc07e, rand_u64()),
        });
        if inner.opts.heartbeat_ms > 0 {
            let i = inner.clone();
            tokio::spawn(async move {
                let every = Duration::from_millis(i.opts.heartbeat_ms);
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tokio::select! {
                        _ = i.stop.cancelled() => return,
                        _ = tick.tick() => {
                            let mut st = i.state.lock().unwrap();
                            let mut headers = std_headers(&i, &mut st, "HEARTBEAT");
                            headers.extend([
                                ("Event-Info".to_string(), "System Ready".to_string()),
                                ("Up-Time".into(), "0 years, 0 days, 0 hours, 1 minute, 0 seconds, 0 milliseconds, 0 microseconds".into()),
                                ("FreeSWITCH-Version".into(), "1.10.12-release~64bit".into()),
                                ("Session-Count".into(), "0".into()),
                                ("Max-Sessions".into(), "1000".into()),
                            ]);
                            deliver(&mut st, &Ev { headers, body: None });
                        }
                    }
                }
            });
        }
        let i = inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = i.stop.cancelled() => return,
                    r = listener.accept() => if let Ok((sock, _)) = r {
                        let _ = sock.set_nodelay(true);
                        tokio::spawn(serve_esl(i.clone(), sock));
                    }
                }
            }
        });
        FsEmulator { port, inner }
    }

    pub fn esl_port(&self) -> u16 {
        self.port
    }

    /// Makes a file playable by `sendmsg` playback (samples at `rate`).
    pub fn add_file(&self, path: &str, rate: u32, samples: Vec<i16>) {
        self.inner
            .state
            .lock()
            .unwrap()
            .files
            .insert(path.to_string(), (rate, Arc::new(samples)));
    }

    /// Places a call: CHANNEL_ANSWER, CHANNEL_PARK, then mod_audio_stream connects to the URL.
    pub fn place_call(&self, call: FsCall) -> (String, Arc<Mutex<FsCallLog>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.inner.state.lock().unwrap();
        st.next_id += 1;
        let n = st.next_id;
        let uuid = make_uuid(n, rand_u64());
        let log = Arc::new(Mutex::new(FsCallLog {
            uuid: uuid.clone(),
            ..FsCallLog::default()
        }));
        let rate = if call.rate == 8000 { 8000 } else { 16000 };
        st.chans.insert(
            uuid.clone(),
            Chan {
                log: log.clone(),
                ctl: tx,
                vars: call.variables.clone(),
                name: format!("sofia/external/caller-{n}@127.0.0.1"),
                number: n,
                rate,
                stream: if call.module == Module::AudioStream {
                    StreamSt::Attached
                } else {
                    StreamSt::Detached
                },
                fork_bug: (call.module == Module::AudioFork).then(|| MY_BUG_NAME.to_string()),
                start: Instant::now(),
            },
        );
        fire_chan(
            &self.inner,
            &mut st,
            &uuid,
            "CHANNEL_ANSWER",
            None,
            vec![],
            None,
        );
        fire_chan(
            &self.inner,
            &mut st,
            &uuid,
            "CHANNEL_PARK",
            None,
            vec![],
            None,
        );
        drop(st);
        let url = call.url.replace("{uuid}", &uuid);
        let ctl = match call.module {
            Module::AudioStream => Ctl::StreamStart {
                url,
                rate,
                metadata: call.metadata.clone(),
            },
            Module::AudioFork => Ctl::ForkStart(ForkParams {
                url,
                mix: Mix::Mono,
                rate,
                bug: MY_BUG_NAME.into(),
                metadata: call.metadata.clone(),
                enable: true,
                stream: true,
                back_rate: rate,
            }),
        };
        let _ = self.inner.state.lock().unwrap().chans[&uuid].ctl.send(ctl);
        tokio::spawn(channel_task(
            self.inner.clone(),
            uuid.clone(),
            call,
            rate,
            log.clone(),
            rx,
        ));
        (uuid, log)
    }

    /// The caller hangs up now.
    pub fn hangup(&self, uuid: &str) {
        if let Some(c) = self.inner.state.lock().unwrap().chans.get(uuid) {
            let _ = c.ctl.send(Ctl::Hangup("NORMAL_CLEARING".into()));
        }
    }

    /// Cuts every ESL TCP connection at once, without a disconnect notice.
    pub fn drop_esl_connections(&self) {
        let st = self.inner.state.lock().unwrap();
        for c in &st.conns {
            c.kill.cancel();
        }
    }

    /// ESL connections authenticated so far.
    pub fn esl_connections(&self) -> u32 {
        self.inner.state.lock().unwrap().esl_connections
    }

    pub fn live_channels(&self) -> Vec<String> {
        self.inner
            .state
            .lock()
            .unwrap()
            .chans
            .keys()
            .cloned()
            .collect()
    }

    /// Stops everything, as a FreeSWITCH going down: sockets drop.
    pub fn stop(&self) {
        self.inner.stop.cancel();
        let st = self.inner.state.lock().unwrap();
        for c in &st.conns {
            c.kill.cancel();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Events

fn std_headers(inner: &Inner, st: &mut State, name: &str) -> Vec<(String, String)> {
    st.seq += 1;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (local, gmt) = dates(now.as_secs());
    let (file, func, line) = match name {
        "PLAYBACK_START" => ("switch_ivr_play_say.c", "switch_ivr_play_file", "1646"),
        "PLAYBACK_STOP" => ("switch_ivr_play_say.c", "switch_ivr_play_file", "2020"),
        "CHANNEL_EXECUTE" | "CHANNEL_EXECUTE_COMPLETE" => {
            ("switch_core_session.c", "switch_core_session_exec", "2967")
        }
        "CHANNEL_ANSWER" => (
            "switch_channel.c",
            "switch_channel_perform_mark_answered",
            "3846",
        ),
        "CHANNEL_PARK" => ("switch_ivr.c", "switch_ivr_park", "1002"),
        "DTMF" => ("switch_channel.c", "switch_channel_dequeue_dtmf", "677"),
        "BACKGROUND_JOB" => ("mod_event_socket.c", "api_exec", "1572"),
        "HEARTBEAT" => ("switch_core.c", "send_heartbeat", "74"),
        "CUSTOM" => ("mod_audio_stream.c", "responseHandler", "16"),
        _ => (
            "switch_core_state_machine.c",
            "switch_core_session_reporting_state",
            "947",
        ),
    };
    vec![
        ("Event-Name".into(), name.into()),
        ("Core-UUID".into(), inner.core_uuid.clone()),
        ("FreeSWITCH-Hostname".into(), "fs-emu".into()),
        ("FreeSWITCH-Switchname".into(), "fs-emu".into()),
        ("FreeSWITCH-IPv4".into(), "127.0.0.1".into()),
        ("FreeSWITCH-IPv6".into(), "::1".into()),
        ("Event-Date-Local".into(), local),
        ("Event-Date-GMT".into(), gmt),
        ("Event-Date-Timestamp".into(), now.as_micros().to_string()),
        ("Event-Calling-File".into(), file.into()),
        ("Event-Calling-Function".into(), func.into()),
        ("Event-Calling-Line-Number".into(), line.into()),
        ("Event-Sequence".into(), st.seq.to_string()),
    ]
}

fn chan_headers(uuid: &str, c: &Chan, hungup: bool) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = vec![
        (
            "Channel-State".into(),
            if hungup { "CS_REPORTING" } else { "CS_EXECUTE" }.into(),
        ),
        (
            "Channel-Call-State".into(),
            if hungup { "HANGUP" } else { "ACTIVE" }.into(),
        ),
        (
            "Channel-State-Number".into(),
            if hungup { "11" } else { "4" }.into(),
        ),
        ("Channel-Name".into(), c.name.clone()),
        ("Unique-ID".into(), uuid.into()),
        ("Call-Direction".into(), "inbound".into()),
        ("Presence-Call-Direction".into(), "inbound".into()),
        ("Channel-HIT-Dialplan".into(), "true".into()),
        ("Channel-Call-UUID".into(), uuid.into()),
        (
            "Answer-State".into(),
            if hungup { "hangup" } else { "answered" }.into(),
        ),
        ("Channel-Read-Codec-Name".into(), "L16".into()),
        ("Channel-Read-Codec-Rate".into(), c.rate.to_string()),
        ("Channel-Write-Codec-Name".into(), "L16".into()),
        ("Channel-Write-Codec-Rate".into(), c.rate.to_string()),
        ("Caller-Direction".into(), "inbound".into()),
        (
            "Caller-Caller-ID-Name".into(),
            format!("caller-{}", c.number),
        ),
        (
            "Caller-Caller-ID-Number".into(),
            format!("555{:04}", c.number),
        ),
        ("Caller-Destination-Number".into(), "200".into()),
        ("Caller-Unique-ID".into(), uuid.into()),
        ("Caller-Context".into(), "sidecall".into()),
        ("variable_uuid".into(), uuid.into()),
        ("variable_call_uuid".into(), uuid.into()),
    ];
    for (k, v) in &c.vars {
        h.push((format!("variable_{k}"), v.clone()));
    }
    h
}

/// Fires an event about a channel (with its channel data).
fn fire_chan(
    inner: &Inner,
    st: &mut State,
    uuid: &str,
    name: &str,
    subclass: Option<&str>,
    extra: Vec<(&str, String)>,
    body: Option<String>,
) {
    fire_chan_h(inner, st, uuid, name, subclass, extra, body, false)
}

#[allow(clippy::too_many_arguments)]
fn fire_chan_h(
    inner: &Inner,
    st: &mut State,
    uuid: &str,
    name: &str,
    subclass: Option<&str>,
    extra: Vec<(&str, String)>,
    body: Option<String>,
    hungup: bool,
) {
    let Some(c) = st.chans.get(uuid) else { return };
    let ch = chan_headers(uuid, c, hungup);
    let mut headers = Vec::new();
    if let Some(s) = subclass {
        headers.push(("Event-Subclass".to_string(), s.to_string()));
    }
    headers.extend(std_headers(inner, st, name));
    if subclass.is_some_and(|s| s.starts_with("mod_audio_fork::")) {
        for (k, v) in headers.iter_mut() {
            match k.as_str() {
                "Event-Calling-File" => *v = "mod_audio_fork.c".into(),
                "Event-Calling-Line-Number" => *v = "22".into(),
                _ => {}
            }
        }
    }
    headers.extend(ch);
    headers.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
    deliver(st, &Ev { headers, body });
}

fn deliver(st: &mut State, ev: &Ev) {
    let get = |k: &str| {
        ev.headers
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
    };
    let name = get("Event-Name").unwrap_or("");
    let subclass = get("Event-Subclass");
    let mut json_frame = None;
    let mut plain_frame = None;
    for c in &st.conns {
        let s = &c.sub;
        let send = s.all
            || (s.types.contains(name)
                && (name != "CUSTOM" || subclass.is_none_or(|sc| s.subclasses.contains(sc))));
        if !send {
            continue;
        }
        if !s.filters.is_empty()
            && !s
                .filters
                .iter()
                .any(|(h, v)| get(h).is_some_and(|x| x == v))
        {
            continue;
        }
        let frame = if s.json {
            json_frame.get_or_insert_with(|| render_json(ev)).clone()
        } else {
            plain_frame.get_or_insert_with(|| render_plain(ev)).clone()
        };
        let _ = c.tx.send(frame);
    }
}

fn render_json(ev: &Ev) -> String {
    let mut parts: Vec<String> = ev
        .headers
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), Value::from(v.as_str())))
        .collect();
    if let Some(b) = &ev.body {
        parts.push(format!("\"Content-Length\":\"{}\"", b.len()));
        parts.push(format!("\"_body\":{}", Value::from(b.as_str())));
    }
    let body = format!("{{{}}}", parts.join(","));
    format!(
        "Content-Length: {}\nContent-Type: text/event-json\n\n{}",
        body.len(),
        body
    )
}

fn render_plain(ev: &Ev) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const SET: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');
    let mut inner = String::new();
    for (k, v) in &ev.headers {
        inner.push_str(&format!("{k}: {}\n", utf8_percent_encode(v, SET)));
    }
    if let Some(b) = &ev.body {
        inner.push_str(&format!("Content-Length: {}\n\n{}", b.len(), b));
    } else {
        inner.push('\n');
    }
    format!(
        "Content-Length: {}\nContent-Type: text/event-plain\n\n{}",
        inner.len(),
        inner
    )
}

// ---------------------------------------------------------------------------------------------
// ESL server

struct Cmd {
    line: String,
    headers: Vec<(String, String)>,
    body: Option<String>,
}

impl Cmd {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_cmd(r: &mut BufReader<OwnedReadHalf>) -> Option<Cmd> {
    let mut lines: Vec<String> = Vec::new();
    loop {
        let mut buf = Vec::new();
        let n = (&mut *r)
            .take(64 * 1024)
            .read_until(b'\n', &mut buf)
            .await
            .ok()?;
        if n == 0 {
            return None;
        }
        let line = String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        if line.trim().is_empty() {
            if lines.is_empty() {
                continue;
            }
            break;
        }
        lines.push(line);
    }
    let first = lines.remove(0).trim().to_string();
    let headers: Vec<(String, String)> = lines
        .iter()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim_start().to_string()))
        })
        .collect();
    let mut cmd = Cmd {
        line: first,
        headers,
        body: None,
    };
    if let Some(len) = cmd
        .header("Content-Length")
        .and_then(|l| l.trim().parse::<usize>().ok())
    {
        let mut b = vec![0u8; len.min(8 << 20)];
        r.read_exact(&mut b).await.ok()?;
        cmd.body = Some(String::from_utf8_lossy(&b).into_owned());
    }
    Some(cmd)
}

fn reply(text: &str) -> String {
    format!("Content-Type: command/reply\nReply-Text: {text}\n\n")
}

async fn serve_esl(inner: Arc<Inner>, sock: TcpStream) {
    let (rd, mut wr) = sock.into_split();
    let kill = CancellationToken::new();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<String>();
    let id = {
        let mut st = inner.state.lock().unwrap();
        st.next_id += 1;
        let id = st.next_id;
        st.conns.push(EslConn {
            id,
            tx: ev_tx,
            sub: Sub {
                json: true,
                ..Sub::default()
            },
            kill: kill.clone(),
        });
        id
    };
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(64);
    let k = kill.clone();
    tokio::spawn(async move {
        let mut br = BufReader::new(rd);
        loop {
            tokio::select! {
                _ = k.cancelled() => return,
                c = read_cmd(&mut br) => match c {
                    Some(c) => if cmd_tx.send(c).await.is_err() { return },
                    None => return,
                }
            }
        }
    });
    let mut authed = false;
    if wr
        .write_all(b"Content-Type: auth/request\n\n")
        .await
        .is_ok()
    {
        loop {
            tokio::select! {
                biased;
                _ = kill.cancelled() => break,
                _ = inner.stop.cancelled() => break,
                c = cmd_rx.recv() => {
                    let Some(c) = c else { break };
                    let (out, close) = handle_cmd(&inner, id, &mut authed, c);
                    if wr.write_all(out.as_bytes()).await.is_err() || close {
                        break;
                    }
                }
                e = ev_rx.recv() => {
                    let Some(e) = e else { break };
                    if authed && wr.write_all(e.as_bytes()).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    kill.cancel();
    inner.state.lock().unwrap().conns.retain(|c| c.id != id);
}

/// Runs one ESL command; returns what to write and whether to close after it.
fn handle_cmd(inner: &Arc<Inner>, conn: u64, authed: &mut bool, c: Cmd) -> (String, bool) {
    let (verb, rest) = match c.line.split_once(char::is_whitespace) {
        Some((v, r)) => (v.to_string(), r.trim().to_string()),
        None => (c.line.clone(), String::new()),
    };
    let verb_l = verb.to_ascii_lowercase();
    if !*authed {
        if verb_l == "auth" {
            if rest == inner.opts.password {
                *authed = true;
                inner.state.lock().unwrap().esl_connections += 1;
                return (reply("+OK accepted"), false);
            }
            return (
                format!("{}{}", reply("-ERR invalid"), DISCONNECT_NOTICE),
                true,
            );
        }
        return (reply("-ERR command not found"), false);
    }
    if (verb_l == "api" || verb_l == "bgapi") && rest.is_empty() {
        return (reply("-ERR command not found"), false);
    }
    match verb_l.as_str() {
        "exit" => (format!("{}{}", reply("+OK bye"), DISCONNECT_NOTICE), true),
        "event" => {
            let mut toks = rest.split_whitespace();
            let fmt = toks.next().unwrap_or("").to_ascii_lowercase();
            let toks: Vec<&str> = toks.collect();
            if toks.is_empty() {
                return (reply("-ERR no keywords supplied"), false);
            }
            let mut st = inner.state.lock().unwrap();
            let Some(cn) = st.conns.iter_mut().find(|x| x.id == conn) else {
                return (reply("-ERR no keywords supplied"), false);
            };
            cn.sub.json = fmt == "json";
            let mut custom = false;
            for t in toks {
                if custom {
                    cn.sub.subclasses.insert(t.to_string());
                } else if t.eq_ignore_ascii_case("ALL") {
                    cn.sub.all = true;
                } else if t.eq_ignore_ascii_case("CUSTOM") {
                    cn.sub.types.insert("CUSTOM".into());
                    custom = true;
                } else {
                    cn.sub.types.insert(t.to_ascii_uppercase());
                }
            }
            let f = if fmt == "json" || fmt == "xml" {
                fmt.as_str()
            } else {
                "plain"
            };
            (reply(&format!("+OK event listener enabled {f}")), false)
        }
        "noevents" => {
            let mut st = inner.state.lock().unwrap();
            if let Some(cn) = st.conns.iter_mut().find(|x| x.id == conn) {
                let json = cn.sub.json;
                let filters = std::mem::take(&mut cn.sub.filters);
                cn.sub = Sub {
                    json,
                    filters,
                    ..Sub::default()
                };
            }
            (reply("+OK no longer listening for events"), false)
        }
        "nixevent" => {
            let mut st = inner.state.lock().unwrap();
            if let Some(cn) = st.conns.iter_mut().find(|x| x.id == conn) {
                for t in rest.split_whitespace() {
                    cn.sub.types.remove(&t.to_ascii_uppercase());
                }
            }
            (reply("+OK events nixed"), false)
        }
        "filter" => {
            let mut parts = rest.splitn(2, ' ');
            let h = parts.next().unwrap_or("").to_string();
            let v = parts.next().unwrap_or("").trim().to_string();
            let mut st = inner.state.lock().unwrap();
            if let Some(cn) = st.conns.iter_mut().find(|x| x.id == conn) {
                if h.eq_ignore_ascii_case("delete") {
                    cn.sub.filters.clear();
                    return (reply("+OK filter deleted."), false);
                }
                cn.sub.filters.push((h.clone(), v.clone()));
            }
            (reply(&format!("+OK filter added. [{h}]=[{v}]")), false)
        }
        "api" => {
            let out = api_exec(inner, &rest);
            (
                format!(
                    "Content-Type: api/response\nContent-Length: {}\n\n{}",
                    out.len(),
                    out
                ),
                false,
            )
        }
        "bgapi" => {
            let job = c
                .header("Job-UUID")
                .map(str::to_string)
                .unwrap_or_else(|| make_uuid(0x70b, rand_u64()));
            let out = api_exec(inner, &rest);
            let (cmd, arg) = match rest.split_once(' ') {
                Some((a, b)) => (a.to_string(), Some(b.to_string())),
                None => (rest.clone(), None),
            };
            let mut st = inner.state.lock().unwrap();
            let mut headers = std_headers(inner, &mut st, "BACKGROUND_JOB");
            headers.push(("Job-UUID".into(), job.clone()));
            headers.push(("Job-Command".into(), cmd));
            if let Some(a) = arg {
                headers.push(("Job-Command-Arg".into(), a));
            }
            deliver(
                &mut st,
                &Ev {
                    headers,
                    body: Some(out),
                },
            );
            (
                format!(
                    "Content-Type: command/reply\nReply-Text: +OK Job-UUID: {job}\nJob-UUID: {job}\n\n"
                ),
                false,
            )
        }
        "sendmsg" => {
            let uuid = if rest.is_empty() {
                c.header("Unique-ID").unwrap_or("").to_string()
            } else {
                rest.clone()
            };
            let st = inner.state.lock().unwrap();
            let Some(ch) = st.chans.get(&uuid) else {
                return (reply(&format!("-ERR invalid session id [{uuid}]")), false);
            };
            let cc = c.header("call-command").unwrap_or("").to_ascii_lowercase();
            let app = c.header("execute-app-name").unwrap_or("").to_string();
            let arg = c
                .header("execute-app-arg")
                .map(str::to_string)
                .or_else(|| c.body.clone())
                .unwrap_or_default();
            let locked = c
                .header("event-lock")
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let ms = ch.start.elapsed().as_millis() as u64;
            ch.log.lock().unwrap().commands.push((
                ms,
                format!(
                    "sendmsg {cc} {app} {arg}{}",
                    if locked { " event-lock" } else { "" }
                ),
            ));
            match (cc.as_str(), app.as_str()) {
                ("execute", "playback") => {
                    let event_uuid = c
                        .header("event-uuid")
                        .map(str::to_string)
                        .unwrap_or_else(|| make_uuid(0xe7, rand_u64()));
                    let _ = ch.ctl.send(Ctl::Play {
                        file: arg,
                        locked,
                        event_uuid,
                    });
                }
                ("hangup", _) => {
                    let cause = c
                        .header("hangup-cause")
                        .unwrap_or("NORMAL_CLEARING")
                        .to_string();
                    let _ = ch.ctl.send(Ctl::Hangup(cause));
                }
                // Other applications and commands are accepted and do nothing here.
                _ => {}
            }
            (reply("+OK"), false)
        }
        "log" | "nolog" | "linger" | "nolinger" | "noop" | "divert_events" | "myevents" => {
            (reply("+OK"), false)
        }
        _ => (reply("-ERR command not found"), false),
    }
}

/// One API command, as `api` and `bgapi` run it; returns its output.
fn api_exec(inner: &Arc<Inner>, line: &str) -> String {
    let line = line.trim();
    let (cmd, args) = match line.split_once(char::is_whitespace) {
        Some((c, a)) => (c.to_string(), a.trim().to_string()),
        None => (line.to_string(), String::new()),
    };
    let argv: Vec<&str> = args.split_whitespace().collect();
    let mut st = inner.state.lock().unwrap();
    let uuid = argv.first().copied().unwrap_or("");
    if let Some(c) = st.chans.get(uuid) {
        let ms = c.start.elapsed().as_millis() as u64;
        c.log.lock().unwrap().commands.push((ms, line.to_string()));
    }
    let chan = st.chans.get(uuid);
    let ms = chan
        .map(|c| c.start.elapsed().as_millis() as u64)
        .unwrap_or(0);
    match cmd.as_str() {
        "status" => {
            let n = st.chans.len();
            format!(
                "UP 0 years, 0 days, 0 hours, 0 minutes, 1 second, 0 milliseconds, 0 microseconds\nFreeSWITCH (Version 1.10.12-release  64bit) is ready\n{} session(s) since startup\n{n} session(s) - peak {n}, last 5min {n} \n0 session(s) per Sec out of max 30, peak 0, last 5min 0 \n1000 session(s) max\nmin idle cpu 0.00/99.00\nCurrent Stack Size/Max 240K/8192K\n",
                st.next_id
            )
        }
        "uuid_break" => {
            let Some(c) = chan else {
                return "-ERR No such channel!\n".into();
            };
            let all = argv.get(1).is_some_and(|f| f.contains("all"));
            c.log.lock().unwrap().breaks.push((ms, all));
            let _ = c.ctl.send(Ctl::Break { all });
            "+OK\n".into()
        }
        "uuid_transfer" => {
            if argv.len() < 2 {
                return "-USAGE: <uuid> [-bleg|-both] <dest-exten> [<dialplan>] [<context>]\n"
                    .into();
            }
            let Some(c) = chan else {
                return "-ERR No such channel!\n".into();
            };
            let rest = argv[1..].join(" ");
            c.log.lock().unwrap().transferred_to = Some(rest);
            let _ = c.ctl.send(Ctl::Transfer);
            "+OK\n".into()
        }
        "uuid_kill" => {
            if argv.is_empty() {
                return "-USAGE: <uuid> [cause]\n".into();
            }
            let Some(c) = chan else {
                return "-ERR No such channel!\n".into();
            };
            let cause = argv.get(1).unwrap_or(&"NORMAL_CLEARING").to_string();
            c.log.lock().unwrap().killed = Some(cause.clone());
            let _ = c.ctl.send(Ctl::Hangup(cause));
            "+OK\n".into()
        }
        "uuid_send_dtmf" => {
            if argv.len() < 2 {
                return "-USAGE: <uuid> <dtmf_data>\n".into();
            }
            let Some(c) = chan else {
                return "-ERR Cannot locate session!\n".into();
            };
            c.log
                .lock()
                .unwrap()
                .dtmf_sent_by_app
                .push(argv[1].to_string());
            format!("+OK {uuid} sent DTMF {}.\n", argv[1])
        }
        "uuid_answer" => {
            if chan.is_some() {
                "+OK\n".into()
            } else {
                "-ERROR\n".into()
            }
        }
        "uuid_setvar" => {
            if argv.len() < 2 {
                return "-USAGE: <uuid> <var> [value]\n".into();
            }
            let Some(c) = st.chans.get_mut(uuid) else {
                return "-ERR No such channel!\n".into();
            };
            let var = argv[1].to_string();
            let val = argv[2..].join(" ");
            c.vars.retain(|(k, _)| *k != var);
            if !val.is_empty() {
                c.vars.push((var, val));
            }
            "+OK\n".into()
        }
        "uuid_getvar" => {
            let Some(c) = chan else {
                return "-ERR No such channel!\n".into();
            };
            let var = argv.get(1).copied().unwrap_or("");
            c.vars
                .iter()
                .find(|(k, _)| k == var)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| "_undef_".into())
        }
        "uuid_exists" => if chan.is_some() { "true" } else { "false" }.into(),
        "uuid_audio_stream" => audio_stream_api(&mut st, &args),
        "uuid_audio_fork" => audio_fork_api(&mut st, &args),
        "" => "-ERR  Command not found!\n".into(),
        _ => format!("-ERR {cmd} Command not found!\n"),
    }
}

/// mod_audio_stream's API (stream_function): argv split on spaces into at most 6 parts, the last
/// one keeping the rest.
fn audio_stream_api(st: &mut State, args: &str) -> String {
    const OK: &str = "+OK Success\n";
    const ERR: &str = "-ERR Operation Failed\n";
    let argv: Vec<&str> = args.splitn(6, ' ').filter(|s| !s.is_empty()).collect();
    if argv.len() < 2 || (argv[1] == "start" && argv.len() < 4) {
        return "-USAGE: <uuid> [start | stop | send_text | pause | resume | graceful-shutdown ] [wss-url | path] [mono | mixed | stereo] [8000 | 16000] [metadata]\n".into();
    }
    let Some(c) = st.chans.get_mut(argv[0]) else {
        return ERR.into();
    };
    let first_word = |s: &str| s.split(' ').next().unwrap_or("").to_string();
    match argv[1].to_ascii_lowercase().as_str() {
        "stop" => {
            if c.stream == StreamSt::Detached {
                return ERR.into();
            }
            c.stream = StreamSt::Detached;
            let _ = c
                .ctl
                .send(Ctl::StreamStop(argv.get(2).map(|t| first_word(t))));
            OK.into()
        }
        "pause" | "resume" => {
            if c.stream == StreamSt::Detached {
                return ERR.into();
            }
            let _ = c
                .ctl
                .send(Ctl::Pause(argv[1].eq_ignore_ascii_case("pause")));
            OK.into()
        }
        "send_text" => {
            if argv.len() < 3 || c.stream == StreamSt::Detached {
                return ERR.into();
            }
            let _ = c.ctl.send(Ctl::SendText(first_word(argv[2])));
            OK.into()
        }
        "start" => {
            if argv[3] != "mono" && argv[3] != "mixed" && argv[3] != "stereo" {
                return ERR.into();
            }
            let rate = match argv.get(4) {
                None => 8000,
                Some(&"16k") => 16000,
                Some(&"8k") => 8000,
                Some(r) => r.parse::<u32>().unwrap_or(0),
            };
            if rate == 0 || rate % 8000 != 0 || !argv[2].starts_with("ws") {
                return ERR.into();
            }
            if c.stream != StreamSt::Detached {
                return ERR.into(); // bug already attached
            }
            c.stream = StreamSt::Attached;
            let _ = c.ctl.send(Ctl::StreamStart {
                url: argv[2].to_string(),
                rate,
                metadata: argv.get(5).map(|s| s.to_string()),
            });
            OK.into()
        }
        _ => ERR.into(),
    }
}

/// mod_audio_fork's media bug name (MY_BUG_NAME).
const MY_BUG_NAME: &str = "audio_fork";
/// The subprotocol mod_audio_fork asks for (MOD_AUDIO_FORK_SUBPROTOCOL_NAME unset).
const FORK_SUBPROTOCOL: &str = "audio.drachtio.org";
/// AUDIO_MARKER: a mark is a 0xFFFF sample in the audio queues.
const AUDIO_MARKER: i16 = -1;
/// MAX_MARKS: marks in inventory + in use.
const MAX_MARKS: usize = 30;

/// mod_audio_fork's `start` arguments.
#[derive(Clone, Debug)]
struct ForkParams {
    url: String,
    mix: Mix,
    /// The rate sent to the server.
    rate: u32,
    bug: String,
    metadata: Option<String>,
    /// bidirectionalAudio_enabled (playAudio handled) and _stream_enabled (binary back).
    enable: bool,
    stream: bool,
    /// bidirectionalAudio_stream_samplerate (0: none).
    back_rate: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mix {
    Mono,
    Mixed,
    Stereo,
}

/// `atoi`: leading blanks, an optional sign, digits; 0 otherwise.
fn atoi(s: &str) -> i64 {
    let s = s.trim_start();
    let (neg, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let v = digits.parse::<i64>().unwrap_or(0);
    if neg { -v } else { v }
}

/// mod_audio_fork's API (fork_function): argv split on blanks into at most 10 parts (the last
/// keeps the rest), `+OK Success` / `-ERR Operation Failed`.
fn audio_fork_api(st: &mut State, args: &str) -> String {
    const OK: &str = "+OK Success\n";
    const ERR: &str = "-ERR Operation Failed\n";
    const USAGE: &str = "-USAGE: <uuid> [start | stop | send_text | pause | resume | graceful-shutdown | stop_play ] [wss-url | path] [mono | mixed | stereo] [8000 | 16000 | 24000 | 32000 | 64000] [bugname] [metadata] [bidirectionalAudio_enabled] [bidirectionalAudio_stream_enabled] [bidirectionalAudio_stream_samplerate]\n";
    let mut argv: Vec<String> = Vec::new();
    let mut rest = args.trim_start_matches(' ');
    while !rest.is_empty() {
        if argv.len() == 9 {
            argv.push(rest.to_string());
            break;
        }
        match rest.split_once(' ') {
            Some((a, b)) => {
                argv.push(a.to_string());
                rest = b.trim_start_matches(' ');
            }
            None => {
                argv.push(rest.to_string());
                rest = "";
            }
        }
    }
    let argc = argv.len();
    if argc < 2 || (argv[1] == "start" && argc < 4) {
        return USAGE.into();
    }
    let Some(c) = st.chans.get_mut(&argv[0]) else {
        return ERR.into();
    };
    let is_json = |s: &str| s.starts_with('{') || s.starts_with('[');
    let mut bug = MY_BUG_NAME.to_string();
    let attached = |c: &Chan, b: &str| c.fork_bug.as_deref() == Some(b);
    match argv[1].to_ascii_lowercase().as_str() {
        "stop" => {
            let mut text = None;
            if argc > 3 {
                bug = argv[2].clone();
                text = Some(argv[3].clone());
            } else if argc > 2 {
                if is_json(&argv[2]) {
                    text = Some(argv[2].clone());
                } else {
                    bug = argv[2].clone();
                }
            }
            if !attached(c, &bug) {
                return ERR.into();
            }
            c.fork_bug = None;
            let _ = c.ctl.send(Ctl::ForkStop(text));
            OK.into()
        }
        "stop_play" => {
            if !attached(c, &bug) {
                return ERR.into();
            }
            let _ = c.ctl.send(Ctl::ForkStopPlay);
            OK.into()
        }
        v @ ("pause" | "resume" | "graceful-shutdown") => {
            if argc > 2 {
                bug = argv[2].clone();
            }
            if !attached(c, &bug) {
                return ERR.into();
            }
            let _ = c.ctl.send(match v {
                "pause" => Ctl::ForkPause(true),
                "resume" => Ctl::ForkPause(false),
                _ => Ctl::ForkGraceful,
            });
            OK.into()
        }
        "send_text" => {
            if argc < 3 {
                return String::new(); // the module writes nothing at all here
            }
            let mut text = None;
            if argc > 3 {
                bug = argv[2].clone();
                text = Some(argv[3].clone());
            } else if is_json(&argv[2]) {
                text = Some(argv[2].clone());
            } else {
                bug = argv[2].clone();
            }
            if !attached(c, &bug) {
                return ERR.into();
            }
            let _ = c.ctl.send(Ctl::ForkSendText(text));
            OK.into()
        }
        "start" => {
            let mut metadata = None;
            let (mut enable, mut stream, mut back_rate) = (true, false, 0u32);
            if argc > 9 {
                bug = argv[5].clone();
                metadata = Some(argv[6].clone());
                enable = argv[7] == "true";
                stream = argv[8] == "true";
                back_rate = atoi(&argv[9]).max(0) as u32;
            } else if argc > 6 {
                bug = argv[5].clone();
                metadata = Some(argv[6].clone());
            } else if argc > 5 {
                if is_json(&argv[5]) {
                    metadata = Some(argv[5].clone());
                } else {
                    bug = argv[5].clone();
                }
            }
            let mix = match argv[3].as_str() {
                "mono" => Mix::Mono,
                "mixed" => Mix::Mixed,
                "stereo" => Mix::Stereo,
                _ => return ERR.into(),
            };
            // (The module reads argv[4] even when absent and crashes; here: -ERR.)
            let rate = match argv.get(4).map(String::as_str) {
                Some("16k") => 16000,
                Some("8k") => 8000,
                Some(r) => atoi(r).max(0) as u32,
                None => 0,
            };
            let url_ok = ["ws://", "wss://", "http://", "https://"]
                .iter()
                .any(|p| argv[2].to_ascii_lowercase().starts_with(p));
            // (The module logs a bad URL or rate and goes on with garbage; here: -ERR.)
            if !url_ok || rate == 0 || rate % 8000 != 0 {
                return ERR.into();
            }
            if c.fork_bug.is_some() {
                return ERR.into(); // already attached (one fork per channel here)
            }
            c.fork_bug = Some(bug.clone());
            let _ = c.ctl.send(Ctl::ForkStart(ForkParams {
                url: argv[2].clone(),
                mix,
                rate,
                bug,
                metadata,
                enable,
                stream,
                back_rate,
            }));
            OK.into()
        }
        _ => ERR.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The channel: playback, caller, media stream

struct Playing {
    file: String,
    samples: Arc<Vec<i16>>,
    pos: usize,
    event_uuid: String,
    locked: bool,
}

struct PlayReq {
    file: String,
    locked: bool,
    event_uuid: String,
}

type WsSink = SplitSink<WebSocketStream<TcpStream>, Message>;
type WsSrc = SplitStream<WebSocketStream<TcpStream>>;
/// A connection attempt's outcome: the socket, or libwsc's (error code, message).
type ConnResult = Result<WebSocketStream<TcpStream>, (i64, String)>;

struct Media {
    generation: u64,
    sink: Option<WsSink>,
    src: Option<WsSrc>,
    paused: bool,
    rate: u32,
    metadata: Option<String>,
    held: Option<Vec<u8>>,
    frames: u64,
    play_n: u32,
    heartbeat: Option<tokio::time::Interval>,
}

struct ChanTask {
    inner: Arc<Inner>,
    uuid: String,
    rate: u32,
    log: Arc<Mutex<FsCallLog>>,
    start: Instant,
    stack: Vec<Playing>,
    queue: VecDeque<PlayReq>,
    media: Media,
    conn_tx: mpsc::UnboundedSender<(u64, ConnResult)>,
    heart_beat_s: u64,
    extra_headers: Vec<(String, String)>,
    noise: u32,
    fork: Option<Fork>,
    fork_gen: u64,
    fork_conn_tx: mpsc::UnboundedSender<(u64, ForkConn)>,
    /// MOD_AUDIO_BASIC_AUTH_USERNAME / _PASSWORD.
    fork_auth: Option<(String, String)>,
    /// send_silence_when_idle (read once when the park starts): the park loop writes frames.
    send_silence: bool,
}

impl ChanTask {
    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn fire(
        &self,
        name: &str,
        sub: Option<&str>,
        extra: Vec<(&str, String)>,
        body: Option<String>,
    ) {
        let mut st = self.inner.state.lock().unwrap();
        fire_chan(&self.inner, &mut st, &self.uuid, name, sub, extra, body);
    }

    fn fire_custom(&self, sub: &str, body: String) {
        self.fire("CUSTOM", Some(sub), vec![], Some(body));
    }

    fn set_stream(&self, s: StreamSt) {
        if let Some(c) = self.inner.state.lock().unwrap().chans.get_mut(&self.uuid) {
            c.stream = s;
        }
    }

    fn load(&self, file: &str) -> Option<Arc<Vec<i16>>> {
        let (rate, s) = if let Some(ms) = file.strip_prefix("silence_stream://") {
            let ms: u64 = ms.split(',').next()?.parse().ok()?;
            (
                self.rate,
                Arc::new(vec![0i16; (ms * self.rate as u64 / 1000) as usize]),
            )
        } else if let Some(f) = self.inner.state.lock().unwrap().files.get(file).cloned() {
            f
        } else {
            let bytes = std::fs::read(file).ok()?;
            let ext_rate = |ext: &str| match ext {
                "r8" => Some(8000),
                "r16" => Some(16000),
                "r24" => Some(24000),
                "r32" => Some(32000),
                "r48" => Some(48000),
                _ => None,
            };
            let ext = file.rsplit('.').next().unwrap_or("");
            if let Some(r) = ext_rate(ext) {
                (r, Arc::new(l16_decode(&bytes)))
            } else if ext == "wav" {
                let (r, s) = parse_wav(&bytes)?;
                (r, Arc::new(s))
            } else {
                return None;
            }
        };
        if rate == self.rate {
            Some(s)
        } else {
            Some(Arc::new(resample(&s, rate, self.rate)))
        }
    }

    /// Starts queued playbacks while nothing plays or the running one was not event-locked.
    fn start_queued(&mut self) {
        while !self.queue.is_empty() && self.stack.last().is_none_or(|p| !p.locked) {
            let r = self.queue.pop_front().unwrap();
            self.begin(r);
        }
    }

    fn begin(&mut self, r: PlayReq) {
        let exec = vec![
            ("Application", "playback".to_string()),
            ("Application-Data", r.file.clone()),
            ("Application-UUID", r.event_uuid.clone()),
        ];
        self.fire("CHANNEL_EXECUTE", None, exec.clone(), None);
        let Some(samples) = self.load(&r.file) else {
            let mut e = exec;
            e.insert(2, ("Application-Response", "FILE NOT FOUND".into()));
            self.fire("CHANNEL_EXECUTE_COMPLETE", None, e, None);
            let ms = self.ms();
            self.log
                .lock()
                .unwrap()
                .playbacks
                .push((ms, r.file, "notfound".into()));
            return;
        };
        if !self.stack.is_empty() {
            self.log.lock().unwrap().nested += 1;
        }
        self.fire(
            "PLAYBACK_START",
            None,
            vec![("Playback-File-Path", r.file.clone())],
            None,
        );
        self.stack.push(Playing {
            file: r.file,
            samples,
            pos: 0,
            event_uuid: r.event_uuid,
            locked: r.locked,
        });
    }

    fn finish_top(&mut self, status: &str) {
        let Some(p) = self.stack.pop() else { return };
        self.fire(
            "PLAYBACK_STOP",
            None,
            vec![
                ("Playback-File-Path", p.file.clone()),
                ("Playback-Status", status.to_string()),
            ],
            None,
        );
        self.fire(
            "CHANNEL_EXECUTE_COMPLETE",
            None,
            vec![
                ("Application", "playback".into()),
                ("Application-Data", p.file.clone()),
                ("Application-Response", "FILE PLAYED".into()),
                ("Application-UUID", p.event_uuid.clone()),
            ],
            None,
        );
        let ms = self.ms();
        self.log
            .lock()
            .unwrap()
            .playbacks
            .push((ms, p.file, status.to_string()));
    }

    /// One 20 ms slot of what the channel plays to the caller, and whether a playback wrote it.
    fn play_tick(&mut self, per_frame: usize) -> (Vec<i16>, bool) {
        self.start_queued();
        let mut out = vec![0i16; per_frame];
        let wrote = !self.stack.is_empty();
        if let Some(p) = self.stack.last_mut() {
            let end = (p.pos + per_frame).min(p.samples.len());
            out[..end - p.pos].copy_from_slice(&p.samples[p.pos..end]);
            p.pos = end;
            if p.pos >= p.samples.len() {
                self.finish_top("done");
            }
        }
        (out, wrote)
    }

    fn connect(&mut self, url: String, rate: u32, metadata: Option<String>) {
        self.media.generation += 1;
        self.media.sink = None;
        self.media.src = None;
        self.media.paused = false;
        self.media.rate = rate;
        self.media.metadata = metadata;
        self.media.held = None;
        self.media.play_n = 0;
        self.media.heartbeat = None;
        let generation = self.media.generation;
        let tx = self.conn_tx.clone();
        let extra = self.extra_headers.clone();
        let timeout = self.inner.opts.connect_timeout_ms;
        tokio::spawn(async move {
            let r = ws_connect(&url, &extra, timeout).await;
            let _ = tx.send((generation, r));
        });
    }

    async fn send(&mut self, m: Message) -> bool {
        match self.media.sink.as_mut() {
            Some(s) => s.send(m).await.is_ok(),
            None => false,
        }
    }

    async fn close_stream(&mut self, text: Option<String>) {
        if let Some(t) = text {
            self.send(Message::text(t)).await;
        }
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "Normal closure".into(),
        }));
        self.send(close).await;
        if let (Some(sink), Some(src)) = (self.media.sink.take(), self.media.src.take()) {
            // Wait a little for the server's close reply, then drop the connection.
            tokio::spawn(async move {
                let mut src = src;
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while let Some(Ok(m)) = src.next().await {
                        if matches!(m, Message::Close(_)) {
                            break;
                        }
                    }
                })
                .await;
                drop(sink);
            });
        }
        self.media.generation += 1;
        self.media.heartbeat = None;
    }

    /// The module's processMessage: streamAudio -> (file path, body of ::play, samples, rate).
    fn process_message(&mut self, text: &str) -> Option<(String, String, u32, Vec<i16>)> {
        let root: OrderedRoot = serde_json::from_str(text).ok()?;
        if root.ty.as_deref() != Some("streamAudio") {
            return None;
        }
        let mut data = root.data?;
        let adt = data
            .iter()
            .find(|(k, _)| k == "audioDataType")
            .and_then(|(_, v)| v.as_str())
            .unwrap_or("")
            .to_string();
        let idx = data.iter().position(|(k, _)| k == "audioData")?;
        let (_, audio) = data.remove(idx);
        let audio = audio.as_str()?.to_string();
        let rate = data
            .iter()
            .find(|(k, _)| k == "sampleRate")
            .and_then(|(_, v)| v.as_f64())
            .map(|f| f as i64)
            .unwrap_or(0);
        let ext = match adt.as_str() {
            "raw" => match rate {
                8000 => ".r8",
                16000 => ".r16",
                24000 => ".r24",
                32000 => ".r32",
                48000 => ".r48",
                64000 => ".r64",
                _ => return None,
            },
            "wav" => ".wav",
            "mp3" => ".mp3",
            "ogg" => ".ogg",
            "pcmu" => ".pcmu",
            "pcma" => ".pcma",
            _ => return None,
        };
        let cleaned: String = audio.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(cleaned.as_bytes())
            .or_else(|_| {
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(cleaned.trim_end_matches('='))
            })
            .ok()?;
        let n = self.media.play_n;
        self.media.play_n += 1;
        let path = format!("/tmp/{}_{n}.tmp{ext}", self.uuid);
        let (frate, samples) = match ext {
            ".wav" => parse_wav(&bytes).unwrap_or((self.rate, Vec::new())),
            ".pcmu" | ".pcma" => (8000, Vec::new()),
            ".mp3" | ".ogg" => (self.rate, Vec::new()),
            _ => (rate as u32, l16_decode(&bytes)),
        };
        data.push(("file".into(), Value::from(path.clone())));
        let body = format!(
            "{{{}}}",
            data.iter()
                .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v))
                .collect::<Vec<_>>()
                .join(",")
        );
        Some((path, body, frate, samples))
    }

    async fn on_ws_message(
        &mut self,
        m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) {
        match m {
            Some(Ok(Message::Text(t))) => {
                let t = t.to_string();
                if let Some((path, body, rate, samples)) = self.process_message(&t) {
                    self.inner
                        .state
                        .lock()
                        .unwrap()
                        .files
                        .insert(path, (rate, Arc::new(samples)));
                    self.fire_custom("mod_audio_stream::play", body);
                } else {
                    self.log.lock().unwrap().json_events += 1;
                    self.fire_custom("mod_audio_stream::json", t);
                }
            }
            Some(Ok(Message::Close(f))) => {
                let (code, reason) = f
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                self.log.lock().unwrap().stream_closed_by_app = Some(code);
                let body =
                    json!({"status": "disconnected", "message": {"code": code, "reason": reason}});
                self.fire_custom("mod_audio_stream::disconnect", body.to_string());
                self.set_stream(StreamSt::ServerClosed);
                if let Some(mut s) = self.media.sink.take() {
                    let _ = s.flush().await;
                    let src = self.media.src.take();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        drop((s, src));
                    });
                }
                self.media.src = None;
                self.media.heartbeat = None;
                self.media.generation += 1;
            }
            Some(Ok(_)) => {} // binary frames are discarded; pongs are answered by tungstenite
            None | Some(Err(_)) => {
                self.stream_error(
                    1,
                    "Connection closed without WebSocket CLOSE (abnormal EOF)",
                );
            }
        }
    }

    fn stream_error(&mut self, code: i64, msg: &str) {
        let body = json!({"status": "error", "message": {"code": code, "error": msg}}).to_string();
        self.log.lock().unwrap().stream_error = Some(body.clone());
        self.fire_custom("mod_audio_stream::error", body);
        self.set_stream(StreamSt::Detached);
        self.media.sink = None;
        self.media.src = None;
        self.media.heartbeat = None;
        self.media.generation += 1;
    }

    /// Sends one caller frame (L16 LE at the stream rate), holding every Nth for a pair.
    async fn send_frame(&mut self, frame: &[i16]) {
        if self.media.sink.is_none() || self.media.paused {
            return;
        }
        let s = if self.media.rate == self.rate {
            frame.to_vec()
        } else {
            resample(frame, self.rate, self.media.rate)
        };
        let bytes: Vec<u8> = s.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.media.frames += 1;
        if let Some(held) = self.media.held.take() {
            if !self.send(Message::binary(held)).await || !self.send(Message::binary(bytes)).await {
                self.stream_error(
                    1,
                    "Connection closed without WebSocket CLOSE (abnormal EOF)",
                );
            }
            return;
        }
        if self
            .inner
            .opts
            .pair_every
            .is_some_and(|n| n > 0 && self.media.frames.is_multiple_of(n as u64))
        {
            self.media.held = Some(bytes);
            return;
        }
        if !self.send(Message::binary(bytes)).await {
            self.stream_error(
                1,
                "Connection closed without WebSocket CLOSE (abnormal EOF)",
            );
        }
    }

    fn noise_frame(&mut self, n: usize) -> Vec<i16> {
        (0..n)
            .map(|_| {
                self.noise = self.noise.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                ((self.noise >> 16) % 7) as i16 - 3
            })
            .collect()
    }

    async fn hang_up(&mut self, cause: &str) {
        while !self.stack.is_empty() {
            self.finish_top("done");
        }
        self.queue.clear();
        {
            let mut st = self.inner.state.lock().unwrap();
            fire_chan_h(
                &self.inner,
                &mut st,
                &self.uuid,
                "CHANNEL_HANGUP_COMPLETE",
                None,
                vec![
                    ("Hangup-Cause", cause.to_string()),
                    ("variable_hangup_cause", cause.to_string()),
                ],
                None,
                true,
            );
            st.chans.remove(&self.uuid);
            // The module's files are deleted at hangup.
            let prefix = format!("/tmp/{}_", self.uuid);
            st.files.retain(|k, _| !k.starts_with(&prefix));
        }
        self.log.lock().unwrap().ended = true;
        if self.media.sink.is_some() || self.fork.as_ref().is_some_and(|f| f.sink.is_some()) {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        if self.media.sink.is_some() {
            self.close_stream(None).await;
        }
        // SWITCH_ABC_TYPE_CLOSE: fork_session_cleanup, close 1000 without a reason.
        self.fork_close(None).await;
    }
}

/// A mod_audio_fork connection attempt's outcome: the socket, or libwebsockets' reason.
type ForkConn = Result<WebSocketStream<TcpStream>, String>;

/// mod_audio_fork's per-bug state (private_t).
struct Fork {
    p: ForkParams,
    generation: u64,
    sink: Option<WsSink>,
    src: Option<WsSrc>,
    paused: bool,
    graceful: bool,
    /// downscale_factor: back_rate / native rate when above it, else 1.
    f: usize,
    prebuf: Vec<i16>,
    prebuf_size: usize,
    playout: VecDeque<i16>,
    /// pVecMarksInInventory / InUse / Cleared (created by the first mark accepted).
    marks: Option<[VecDeque<String>; 3]>,
    aside: Option<u8>,
    clear: bool,
    /// SMBF_WRITE_REPLACE: enable && stream && back_rate.
    write_replace: bool,
}

const INVENTORY: usize = 0;
const IN_USE: usize = 1;
const CLEARED: usize = 2;

impl ChanTask {
    fn fork_event(&self, sub: &str, body: Option<String>) {
        let ms = self.ms();
        self.log
            .lock()
            .unwrap()
            .fork_events
            .push((ms, sub.to_string()));
        self.fire("CUSTOM", Some(sub), vec![], body);
    }

    fn fork_start(&mut self, p: ForkParams) {
        self.fork_gen += 1;
        let f = if p.back_rate > self.rate {
            (p.back_rate / self.rate) as usize
        } else {
            1
        };
        let generation = self.fork_gen;
        let tx = self.fork_conn_tx.clone();
        let url = p.url.clone();
        let auth = self.fork_auth.clone();
        tokio::spawn(async move {
            let r = fork_ws_connect(&url, auth).await;
            let _ = tx.send((generation, r));
        });
        self.fork = Some(Fork {
            write_replace: p.enable && p.stream && p.back_rate > 0,
            p,
            generation,
            sink: None,
            src: None,
            paused: false,
            graceful: false,
            f,
            prebuf: Vec::new(),
            prebuf_size: 320 * f * 4,
            playout: VecDeque::new(),
            marks: None,
            aside: None,
            clear: false,
        });
    }

    async fn on_fork_connect(&mut self, generation: u64, r: ForkConn) {
        let Some(fk) = self.fork.as_mut().filter(|f| f.generation == generation) else {
            return; // stopped meanwhile
        };
        match r {
            Ok(ws) => {
                let (sink, src) = ws.split();
                fk.sink = Some(sink);
                fk.src = Some(src);
                let meta = fk.p.metadata.clone().filter(|m| !m.is_empty());
                self.log.lock().unwrap().stream_connected = true;
                self.fork_event("mod_audio_fork::connect", None);
                if let Some(m) = meta
                    && self.fork_send_text(m).await
                {
                    self.log.lock().unwrap().metadata_sent = true;
                }
            }
            Err(reason) => {
                // The bug stays attached; the pipe is gone.
                let body = format!("{{\"reason\":\"{reason}\"}}");
                self.log.lock().unwrap().stream_error = Some(body.clone());
                self.fork_event("mod_audio_fork::connect_failed", Some(body));
            }
        }
    }

    /// bufferForSending: only while connected; after graceful-shutdown every write is a
    /// zero-length binary frame instead.
    async fn fork_send_text(&mut self, text: String) -> bool {
        let Some(fk) = self.fork.as_mut() else {
            return false;
        };
        let graceful = fk.graceful;
        let Some(sink) = fk.sink.as_mut() else {
            return false;
        };
        let m = if graceful {
            Message::binary(Vec::new())
        } else {
            Message::text(text)
        };
        sink.send(m).await.is_ok()
    }

    /// Stop (API or hangup): optional final text, close 1000 without a reason, state freed.
    async fn fork_close(&mut self, text: Option<String>) {
        if let Some(t) = text {
            self.fork_send_text(t).await;
        }
        let Some(mut fk) = self.fork.take() else {
            return;
        };
        if let Some(mut sink) = fk.sink.take() {
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                })))
                .await;
            let src = fk.src.take();
            tokio::spawn(async move {
                if let Some(mut src) = src {
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Some(Ok(m)) = src.next().await {
                            if matches!(m, Message::Close(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                }
                drop(sink);
            });
        }
    }

    /// The server closed or the TCP connection dropped: `::disconnect`, the bug stays.
    fn fork_dropped(&mut self, code: Option<u16>) {
        if let Some(fk) = self.fork.as_mut() {
            fk.sink = None;
            fk.src = None;
        }
        if let Some(c) = code {
            self.log.lock().unwrap().stream_closed_by_app = Some(c);
        }
        self.fork_event("mod_audio_fork::disconnect", None);
    }

    async fn on_fork_ws(
        &mut self,
        m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) {
        match m {
            Some(Ok(Message::Binary(b))) => {
                self.log.lock().unwrap().fork_bytes_received += b.len() as u64;
                let native = self.rate;
                if let Some(fk) = self.fork.as_mut()
                    && (fk.p.enable || fk.p.stream)
                {
                    fork_binary(fk, &b, native);
                }
            }
            Some(Ok(Message::Text(t))) => self.on_fork_text(t.as_str()).await,
            Some(Ok(Message::Close(f))) => {
                let code = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                if let Some(sink) = self.fork.as_mut().and_then(|f| f.sink.as_mut()) {
                    let _ = sink.flush().await;
                }
                self.fork_dropped(Some(code));
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => self.fork_dropped(None),
        }
    }

    /// processIncomingMessage.
    async fn on_fork_text(&mut self, text: &str) {
        let Ok(root) = serde_json::from_str::<Value>(text) else {
            return; // "could not parse message"
        };
        let compact = json_compact(text);
        let ty = get_ci(&root, "type")
            .and_then(|v| v.as_str())
            .unwrap_or("json")
            .to_string();
        let data_raw = raw_member(&compact, "data");
        let Some((enable, stream)) = self.fork.as_ref().map(|f| (f.p.enable, f.p.stream)) else {
            return;
        };
        match ty.as_str() {
            "playAudio" if enable && !stream => {
                if data_raw.is_none() {
                    return;
                }
                let body = self.fork_play_audio(&root, &compact);
                self.fork_event("mod_audio_fork::play_audio", Some(body));
            }
            "killAudio" => {
                let ms = self.ms();
                self.log.lock().unwrap().kills.push(ms);
                self.fork_event("mod_audio_fork::kill_audio", None);
                // CF_BREAK: the running playback stops (as uuid_break).
                self.finish_top("break");
                if let Some(fk) = self.fork.as_mut() {
                    fk.clear = true;
                }
            }
            "mark" => {
                let name = get_ci(&root, "data")
                    .and_then(|d| get_ci(d, "name"))
                    .and_then(|n| n.as_str());
                let Some(name) = name else { return };
                let fk = self.fork.as_mut().unwrap();
                let full = fk
                    .marks
                    .as_ref()
                    .is_some_and(|m| m[IN_USE].len() + m[INVENTORY].len() >= MAX_MARKS);
                if full {
                    self.log.lock().unwrap().marks_dropped += 1;
                } else {
                    fk.marks.get_or_insert_with(Default::default)[INVENTORY]
                        .push_back(name.to_string());
                }
            }
            "clearMarks" => {
                if let Some(m) = self.fork.as_mut().unwrap().marks.as_mut() {
                    let mut moved: Vec<String> = m[IN_USE].drain(..).collect();
                    moved.extend(m[INVENTORY].drain(..));
                    m[CLEARED].extend(moved);
                }
            }
            "transcription" | "transfer" | "disconnect" | "error" => {
                let sub = format!("mod_audio_fork::{ty}");
                self.fork_event(&sub, data_raw);
            }
            "json" => self.fork_event("mod_audio_fork::json", Some(compact)),
            _ => {} // "unsupported msg type"
        }
    }

    /// playAudio (bidirectional stream off): the audio to a temp file, `::play_audio` with
    /// `data` minus audioContent plus `file`.
    fn fork_play_audio(&mut self, root: &Value, compact: &str) -> String {
        let data = get_ci(root, "data");
        let audio = data
            .and_then(|d| get_ci(d, "audioContent"))
            .and_then(|a| a.as_str())
            .map(str::to_string);
        let ctype = data
            .and_then(|d| get_ci(d, "audioContentType"))
            .and_then(|a| a.as_str())
            .unwrap_or("");
        let sr = data
            .and_then(|d| get_ci(d, "sampleRate"))
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let ext = match ctype {
            "raw" => match sr {
                8000 => Some(".r8"),
                24000 => Some(".r24"),
                32000 => Some(".r32"),
                48000 => Some(".r48"),
                64000 => Some(".r64"),
                _ => Some(".r16"),
            },
            "wave" | "wav" => Some(".wav"),
            _ => None,
        };
        let mut members: Vec<(String, String)> = raw_member(compact, "data")
            .map(|d| raw_members(&d))
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("audioContent"))
            .collect();
        if let (Some(ext), Some(audio)) = (ext, audio) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(audio.as_bytes())
                .unwrap_or_default();
            let mut st = self.inner.state.lock().unwrap();
            let n = st.fork_play_count;
            st.fork_play_count += 1;
            let path = format!("/tmp/{}_{n}.tmp{ext}", self.uuid);
            let (rate, samples) = match ext {
                ".wav" => parse_wav(&bytes).unwrap_or((self.rate, Vec::new())),
                ".r8" => (8000, l16_decode(&bytes)),
                ".r16" => (16000, l16_decode(&bytes)),
                e => (
                    e[2..].parse::<u32>().unwrap_or(16) * 1000,
                    l16_decode(&bytes),
                ),
            };
            st.files.insert(path.clone(), (rate, Arc::new(samples)));
            members.push(("file".into(), Value::from(path).to_string()));
        }
        format!(
            "{{{}}}",
            members
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    /// dub_speech_frame (SWITCH_ABC_TYPE_WRITE_REPLACE), run only when a frame is written.
    async fn fork_dub(&mut self, out: &mut [i16]) {
        let Some(fk) = self.fork.as_mut().filter(|f| f.write_replace) else {
            return;
        };
        let mut events: Vec<(String, &str)> = Vec::new();
        let mut played = 0u64;
        if fk.clear {
            fk.playout.clear();
            fk.clear = false;
            if let Some(m) = fk.marks.as_mut() {
                for n in m[IN_USE].iter().chain(m[INVENTORY].iter()) {
                    events.push((n.clone(), "cleared"));
                }
                let in_use: Vec<String> = m[IN_USE].drain(..).collect();
                m[CLEARED].extend(in_use);
                m[INVENTORY].clear();
            }
        } else {
            let n = fk.playout.len().min(out.len());
            let has_markers = fk
                .marks
                .as_ref()
                .is_some_and(|m| m[IN_USE].len() + m[CLEARED].len() > 0);
            if has_markers {
                let m = fk.marks.as_mut().unwrap();
                let mut data = Vec::with_capacity(n);
                for _ in 0..n {
                    let s = fk.playout.pop_front().unwrap();
                    if s == AUDIO_MARKER {
                        if m[CLEARED].pop_front().is_none()
                            && let Some(name) = m[IN_USE].pop_front()
                        {
                            events.push((name, "playout"));
                        }
                    } else {
                        data.push(s);
                    }
                }
                for (o, d) in out.iter_mut().zip(&data) {
                    *o = o.wrapping_add(*d);
                }
                played = data.len() as u64;
            } else if n > 0 {
                for o in out.iter_mut().take(n) {
                    *o = o.wrapping_add(fk.playout.pop_front().unwrap());
                }
                played = n as u64;
            } else if let Some(name) = fk.marks.as_mut().and_then(|m| m[INVENTORY].pop_front()) {
                events.push((name, "playout"));
            }
        }
        let connected = fk.sink.is_some();
        self.log.lock().unwrap().fork_samples_played += played;
        for (name, ev) in events {
            let text = format!(
                "{{\"type\": \"mark\", \"data\": {{\"name\":\"{name}\", \"event\": \"{ev}\"}}}}"
            );
            if connected && self.fork_send_text(text).await {
                let ms = self.ms();
                self.log
                    .lock()
                    .unwrap()
                    .marks_answered
                    .push((ms, name, ev.to_string()));
            }
        }
    }

    /// fork_frame (SWITCH_ABC_TYPE_READ): the caller's frame (and what it heard for
    /// mixed/stereo) as one binary message at the requested rate.
    async fn fork_send_frame(&mut self, caller: &[i16], heard: &[i16]) {
        let rate = self.rate;
        let Some(fk) = self.fork.as_mut() else { return };
        if fk.paused || fk.graceful || fk.sink.is_none() {
            return;
        }
        let conv = |s: &[i16]| {
            if fk.p.rate == rate {
                s.to_vec()
            } else {
                resample(s, rate, fk.p.rate)
            }
        };
        let samples: Vec<i16> = match fk.p.mix {
            Mix::Mono => conv(caller),
            Mix::Mixed => conv(
                &caller
                    .iter()
                    .zip(heard)
                    .map(|(a, b)| a.saturating_add(*b))
                    .collect::<Vec<_>>(),
            ),
            Mix::Stereo => {
                let (a, b) = (conv(caller), conv(heard));
                a.iter().zip(&b).flat_map(|(x, y)| [*x, *y]).collect()
            }
        };
        let bytes: Vec<u8> = samples.iter().flat_map(|v| v.to_le_bytes()).collect();
        let sink = fk.sink.as_mut().unwrap();
        if sink.send(Message::binary(bytes)).await.is_err() {
            self.fork_dropped(None);
        }
    }

    async fn on_fork_ctl(&mut self, c: Ctl) {
        match c {
            Ctl::ForkStart(p) => {
                if self.fork.is_some() {
                    self.fork_close(None).await;
                }
                self.fork_start(p);
            }
            Ctl::ForkStop(text) => self.fork_close(text).await,
            Ctl::ForkPause(p) => {
                if let Some(fk) = self.fork.as_mut() {
                    fk.paused = p;
                }
            }
            Ctl::ForkGraceful => {
                if let Some(fk) = self.fork.as_mut() {
                    fk.graceful = true;
                }
                self.fork_send_text(String::new()).await;
            }
            Ctl::ForkSendText(Some(t)) => {
                self.fork_send_text(t).await;
            }
            Ctl::ForkStopPlay => {
                let ms = self.ms();
                self.log.lock().unwrap().stop_plays.push(ms);
                if let Some(fk) = self.fork.as_mut() {
                    fk.playout.clear();
                }
            }
            _ => {}
        }
    }
}

/// processIncomingBinary: odd byte set aside, outstanding inventory marks prepended as
/// markers, pre-buffered until 1280×f then 640×f samples, moved (resampled to the channel's
/// rate, in multiples of f) to the play-out buffer.
fn fork_binary(fk: &mut Fork, msg: &[u8], native: u32) {
    let mut data: Vec<u8> = Vec::with_capacity(msg.len() + 1);
    if let Some(b) = fk.aside.take() {
        data.push(b);
    }
    data.extend_from_slice(msg);
    if data.len() % 2 == 1 {
        fk.aside = data.pop();
    }
    if let Some(m) = fk.marks.as_mut() {
        let inv: Vec<String> = m[INVENTORY].drain(..).collect();
        fk.prebuf
            .extend(std::iter::repeat_n(AUDIO_MARKER, inv.len()));
        m[IN_USE].extend(inv);
    }
    fk.prebuf.extend(l16_decode(&data));
    if fk.prebuf.len() < fk.prebuf_size {
        return;
    }
    fk.prebuf_size = 320 * fk.f * 2;
    let complete = fk.prebuf.len() / fk.f * fk.f;
    let leftover = fk.prebuf.split_off(complete);
    let batch = std::mem::replace(&mut fk.prebuf, leftover);
    let back = fk.p.back_rate;
    if back != 0 && back != native {
        fk.playout.extend(resample(&batch, back, native));
    } else {
        fk.playout.extend(batch);
    }
}

/// cJSON_GetObjectItem: case-insensitive.
fn get_ci<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

/// The JSON text without whitespace outside strings (about cJSON_PrintUnformatted).
fn json_compact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let (mut in_str, mut esc) = (false, false);
    for c in s.chars() {
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// The members of a compact JSON object: (key, raw value text), in order.
fn raw_members(obj: &str) -> Vec<(String, String)> {
    let b = obj.as_bytes();
    if b.first() != Some(&b'{') {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut i = 1;
    while i < b.len() && b[i] == b'"' {
        // key
        let ks = i + 1;
        let mut j = ks;
        while j < b.len() && b[j] != b'"' {
            if b[j] == b'\\' {
                j += 1;
            }
            j += 1;
        }
        let key =
            serde_json::from_str::<String>(&obj[ks - 1..=j.min(b.len() - 1)]).unwrap_or_default();
        i = j + 2; // past the quote and the colon
        let vs = i;
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        while i < b.len() {
            let c = b[i];
            if in_str {
                if esc {
                    esc = false;
                } else if c == b'\\' {
                    esc = true;
                } else if c == b'"' {
                    in_str = false;
                }
            } else {
                match c {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth == 0 => break,
                    b'}' | b']' => depth -= 1,
                    b',' if depth == 0 => break,
                    _ => {}
                }
            }
            i += 1;
        }
        out.push((key, obj[vs..i.min(b.len())].to_string()));
        if i < b.len() && b[i] == b',' {
            i += 1;
        } else {
            break;
        }
    }
    out
}

/// A top-level member's raw value (case-insensitive key, first match).
fn raw_member(obj: &str, key: &str) -> Option<String> {
    raw_members(obj)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

/// streamAudio's root, keeping `data`'s key order (cJSON keeps it; `file` is appended).
struct OrderedRoot {
    ty: Option<String>,
    data: Option<Vec<(String, Value)>>,
}

/// An object with its keys in order, or None for any other JSON value.
struct MaybeOrdered(Option<Vec<(String, Value)>>);

impl<'de> serde::Deserialize<'de> for MaybeOrdered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MaybeOrdered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<MaybeOrdered, A::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = m.next_entry::<String, Value>()? {
                    v.push((k, x));
                }
                Ok(MaybeOrdered(Some(v)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<MaybeOrdered, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(MaybeOrdered(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<MaybeOrdered, E> {
                Ok(MaybeOrdered(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<MaybeOrdered, E> {
                Ok(MaybeOrdered(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<MaybeOrdered, E> {
                Ok(MaybeOrdered(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<MaybeOrdered, E> {
                Ok(MaybeOrdered(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<MaybeOrdered, E> {
                Ok(MaybeOrdered(None))
            }
            fn visit_unit<E>(self) -> Result<MaybeOrdered, E> {
                Ok(MaybeOrdered(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for OrderedRoot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct R;
        impl<'de> serde::de::Visitor<'de> for R {
            type Value = OrderedRoot;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<OrderedRoot, A::Error> {
                let mut root = OrderedRoot {
                    ty: None,
                    data: None,
                };
                while let Some(k) = m.next_key::<String>()? {
                    match k.as_str() {
                        "type" if root.ty.is_none() => {
                            root.ty = m.next_value::<Value>()?.as_str().map(str::to_string)
                        }
                        "data" if root.data.is_none() => {
                            root.data = m.next_value::<MaybeOrdered>()?.0;
                        }
                        _ => {
                            let _ = m.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(root)
            }
        }
        d.deserialize_map(R)
    }
}

async fn channel_task(
    inner: Arc<Inner>,
    uuid: String,
    mut call: FsCall,
    rate: u32,
    log: Arc<Mutex<FsCallLog>>,
    mut rx: mpsc::UnboundedReceiver<Ctl>,
) {
    let var = |name: &str| {
        call.variables
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let heart_beat_s = var("STREAM_HEART_BEAT")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(15);
    let extra_headers: Vec<(String, String)> = var("STREAM_EXTRA_HEADERS")
        .and_then(|v| serde_json::from_str::<Value>(&v).ok())
        .and_then(|v| v.as_object().cloned())
        .map(|o| {
            o.into_iter()
                .map(|(k, v)| (k, v.as_str().map(str::to_string).unwrap_or(v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
    let (fork_conn_tx, mut fork_conn_rx) = mpsc::unbounded_channel();
    let fork_auth = var("MOD_AUDIO_BASIC_AUTH_USERNAME")
        .and_then(|u| Some((u, var("MOD_AUDIO_BASIC_AUTH_PASSWORD")?)));
    let send_silence = var("send_silence_when_idle").is_some_and(|v| atoi(&v) != 0);
    let start = inner
        .state
        .lock()
        .unwrap()
        .chans
        .get(&uuid)
        .map(|c| c.start)
        .unwrap_or_else(Instant::now);
    let mut t = ChanTask {
        inner: inner.clone(),
        uuid: uuid.clone(),
        rate,
        log: log.clone(),
        start,
        stack: Vec::new(),
        queue: VecDeque::new(),
        media: Media {
            generation: 0,
            sink: None,
            src: None,
            paused: false,
            rate,
            metadata: None,
            held: None,
            frames: 0,
            play_n: 0,
            heartbeat: None,
        },
        conn_tx,
        heart_beat_s,
        extra_headers,
        noise: rand_u64() as u32,
        fork: None,
        fork_gen: 0,
        fork_conn_tx,
        fork_auth,
        send_silence,
    };
    let per_frame = (rate / 50) as usize;
    let mut sim = CallerSim::new(&mut call.script, per_frame, log.clone());
    let mut garbage_at = call.script.garbage_at_ms;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            biased;
            _ = inner.stop.cancelled() => {
                // FreeSWITCH went away: connections drop without a close.
                inner.state.lock().unwrap().chans.remove(&uuid);
                log.lock().unwrap().ended = true;
                return;
            }
            c = rx.recv() => {
                let Some(c) = c else { return };
                match c {
                    Ctl::Play { file, locked, event_uuid } => {
                        t.queue.push_back(PlayReq { file, locked, event_uuid });
                        t.start_queued();
                    }
                    Ctl::Break { all } => {
                        if all {
                            t.queue.clear();
                        }
                        t.finish_top("break");
                    }
                    Ctl::Transfer => {
                        t.queue.clear();
                        while !t.stack.is_empty() {
                            t.finish_top("break");
                        }
                    }
                    Ctl::Hangup(cause) => {
                        t.hang_up(&cause).await;
                        return;
                    }
                    Ctl::StreamStart { url, rate, metadata } => t.connect(url, rate, metadata),
                    Ctl::StreamStop(text) => {
                        if t.media.sink.is_some() {
                            t.close_stream(text).await;
                        } else {
                            t.media.generation += 1; // a connection still being made is abandoned
                            t.media.src = None;
                        }
                    }
                    Ctl::Pause(p) => t.media.paused = p,
                    Ctl::SendText(s) => {
                        t.send(Message::text(s)).await;
                    }
                    c => t.on_fork_ctl(c).await,
                }
            }
            r = fork_conn_rx.recv() => {
                if let Some((generation, r)) = r {
                    t.on_fork_connect(generation, r).await;
                }
            }
            m = async {
                match t.fork.as_mut().and_then(|f| f.src.as_mut()) {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            } => t.on_fork_ws(m).await,
            r = conn_rx.recv() => {
                let Some((generation, r)) = r else { continue };
                if generation != t.media.generation {
                    continue; // stopped meanwhile
                }
                match r {
                    Ok(ws) => {
                        let (sink, src) = ws.split();
                        t.media.sink = Some(sink);
                        t.media.src = Some(src);
                        t.log.lock().unwrap().stream_connected = true;
                        if let Some(m) = t.media.metadata.clone().filter(|m| !m.is_empty())
                            && t.send(Message::text(m)).await {
                                t.log.lock().unwrap().metadata_sent = true;
                            }
                        t.fire_custom("mod_audio_stream::connect", "{\"status\":\"connected\"}".into());
                        let p = Duration::from_secs(t.heart_beat_s.max(1));
                        t.media.heartbeat = (t.heart_beat_s > 0)
                            .then(|| tokio::time::interval_at(Instant::now() + p, p));
                    }
                    Err((code, msg)) => t.stream_error(code, &msg),
                }
            }
            m = async {
                match t.media.src.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            } => t.on_ws_message(m).await,
            _ = async {
                match t.media.heartbeat.as_mut() {
                    Some(h) => { h.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                t.send(Message::Ping("ping".as_bytes().to_vec().into())).await;
            }
            _ = ticker.tick() => {
                let now = t.ms();
                let (mut heard, wrote) = t.play_tick(per_frame);
                // WRITE_REPLACE runs only for frames written: a playback or the park's silence.
                if wrote || t.send_silence {
                    t.fork_dub(&mut heard).await;
                }
                let tick = sim.tick(now, &heard);
                if tick.hang_up {
                    t.hang_up("NORMAL_CLEARING").await;
                    return;
                }
                for k in tick.keys {
                    t.fire("DTMF", None, vec![
                        ("DTMF-Digit", k.to_string()),
                        ("DTMF-Duration", "2000".into()),
                        ("DTMF-Source", "RTP".into()),
                    ], None);
                }
                let frame = match tick.frame {
                    Some(f) => f,
                    None => t.noise_frame(per_frame),
                };
                t.send_frame(&frame).await;
                t.fork_send_frame(&frame, &heard).await;
                if garbage_at.is_some_and(|g| g <= now) && t.media.sink.is_some() {
                    garbage_at = None;
                    for n in [1usize, 7, 641, 3] {
                        t.send(Message::binary(vec![0x55u8; n])).await;
                    }
                    t.send(Message::text("{\"bogus\":")).await;
                }
            }
        }
    }
}

/// mod_audio_stream's client (libwsc): handshake written by hand, lenient header lines.
async fn ws_connect(
    url: &str,
    extra: &[(String, String)],
    timeout_ms: u64,
) -> Result<WebSocketStream<TcpStream>, (i64, String)> {
    let Some(rest) = url.strip_prefix("ws://") else {
        tokio::time::sleep(Duration::from_millis(20)).await;
        return Err((6, "Invalid host or port".into()));
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (hostport, path) = rest.split_at(cut);
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse::<u16>().unwrap_or(80)),
        None => (hostport.to_string(), 80),
    };
    let fut = async {
        let mut s = match TcpStream::connect((host.as_str(), port)).await {
            Ok(s) => s,
            Err(e) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let errno = e.raw_os_error().unwrap_or(0);
                let what = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => "Connection refused".to_string(),
                    _ => e.to_string(),
                };
                return Err((6, format!("{what} (system error {errno})")));
            }
        };
        let _ = s.set_nodelay(true);
        let key_bytes: Vec<u8> = rand_u64()
            .to_le_bytes()
            .into_iter()
            .chain(rand_u64().to_le_bytes())
            .collect();
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost:{host}:{port}\r\nUpgrade:websocket\r\nConnection:upgrade\r\nSec-WebSocket-Key:{key}\r\nSec-WebSocket-Version:13\r\nOrigin:http://{host}:{port}\r\n"
        );
        for (k, v) in extra {
            req.push_str(&format!("{k}:{v}\r\n"));
        }
        req.push_str("\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return Err((6, "Connection error".into()));
        }
        // Byte by byte so nothing after the header block is lost.
        let mut resp = Vec::new();
        let mut b = [0u8; 1];
        while !resp.ends_with(b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(1) => resp.push(b[0]),
                _ => return Err((6, "Connection closed during handshake (EOF)".into())),
            }
            if resp.len() > 16 * 1024 {
                return Err((6, "WebSocket upgrade failed".into()));
            }
        }
        let head = String::from_utf8_lossy(&resp).to_ascii_lowercase();
        if !head.starts_with("http/1.1 101") || !head.contains("sec-websocket-accept:") {
            return Err((6, "WebSocket upgrade failed".into()));
        }
        Ok(WebSocketStream::from_raw_socket(s, Role::Client, None).await)
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
        Ok(r) => r,
        Err(_) => Err((10, "Timeout".into())),
    }
}

/// mod_audio_fork's client (libwebsockets 4.1.6): `Host` and `Origin` without the port, the
/// subprotocol asked for, no extensions. The 101 may omit the subprotocol (lws then keeps its
/// own); any other subprotocol, a bad accept or a non-101 fails with lws' reason.
async fn fork_ws_connect(url: &str, auth: Option<(String, String)>) -> ForkConn {
    let lower = url.to_ascii_lowercase();
    let (tls, rest) = if lower.starts_with("wss://") || lower.starts_with("https://") {
        (true, &url[url.find("://").unwrap() + 3..])
    } else {
        (false, &url[url.find("://").map(|i| i + 3).unwrap_or(0)..])
    };
    if tls {
        tokio::time::sleep(Duration::from_millis(20)).await;
        return Err("emulator: TLS is not emulated".into());
    }
    let hcut = rest.find([':', '/']).unwrap_or(rest.len());
    let host = &rest[..hcut];
    let mut after = &rest[hcut..];
    let mut port = 80u16;
    if let Some(p) = after.strip_prefix(':') {
        let d = p.find(|c: char| !c.is_ascii_digit()).unwrap_or(p.len());
        if d > 0 {
            port = p[..d].parse().unwrap_or(80);
        }
        after = &p[d..];
    }
    let path = if after.starts_with('/') { after } else { "/" };
    let fut = async {
        let Ok(mut s) = TcpStream::connect((host, port)).await else {
            return Err("Closed before conn".to_string());
        };
        let _ = s.set_nodelay(true);
        let key_bytes: Vec<u8> = rand_u64()
            .to_le_bytes()
            .into_iter()
            .chain(rand_u64().to_le_bytes())
            .collect();
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nPragma: no-cache\r\nCache-Control: no-cache\r\nHost: {host}\r\nOrigin: http://{host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {FORK_SUBPROTOCOL}\r\nSec-WebSocket-Version: 13\r\n"
        );
        if let Some((u, p)) = auth {
            let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            req.push_str(&format!("Authorization: Basic {b}\r\n"));
        }
        req.push_str("\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return Err("closed before established".to_string());
        }
        let mut resp = Vec::new();
        let mut b = [0u8; 1];
        while !resp.ends_with(b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(1) => resp.push(b[0]),
                _ => return Err("closed before established".to_string()),
            }
            if resp.len() > 16 * 1024 {
                return Err("HS: OOM".to_string());
            }
        }
        let head = String::from_utf8_lossy(&resp).to_string();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("").split(' ').nth(1).unwrap_or("");
        let hdrs: Vec<(String, String)> = lines
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect();
        let hdr = |k: &str| hdrs.iter().find(|(h, _)| h == k).map(|(_, v)| v.as_str());
        if status == "401" {
            return Err("HS: ws upgrade unauthorized".to_string());
        }
        if status != "101" {
            return Err("HS: ws upgrade response not 101".to_string());
        }
        match hdr("upgrade") {
            None => return Err("HS: UPGRADE missing".to_string()),
            Some(u) if !u.eq_ignore_ascii_case("websocket") => {
                return Err("HS: Upgrade to something other than websocket".to_string());
            }
            _ => {}
        }
        if !hdr("connection").is_some_and(|c| {
            c.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        }) {
            return Err("HS: UPGRADE malformed".to_string());
        }
        if let Some(p) = hdr("sec-websocket-protocol").filter(|p| !p.is_empty())
            && p != FORK_SUBPROTOCOL
        {
            return Err("HS: PROTOCOL malformed".to_string());
        }
        let Some(accept) = hdr("sec-websocket-accept") else {
            return Err("HS: ACCEPT missing".to_string());
        };
        if accept != tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()) {
            return Err("HS: Accept hash wrong".to_string());
        }
        if hdr("sec-websocket-extensions").is_some_and(|e| !e.is_empty()) {
            return Err("HS: EXT: unknown ext".to_string());
        }
        Ok(WebSocketStream::from_raw_socket(s, Role::Client, None).await)
    };
    // lws timeout_secs = 10.
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(r) => r,
        Err(_) => Err("closed before established".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// The caller (as in the Asterisk emulator)

/// The caller's side: speaks turns 700 ms after the agent stops, clips at fixed times, presses
/// keys, hangs up at the end of its script.
struct CallerSim {
    turns: VecDeque<Vec<i16>>,
    at: VecDeque<(u64, Vec<i16>)>,
    keys: VecDeque<(u64, char)>,
    speaking: Vec<(Vec<i16>, usize)>,
    agent_spoke: bool,
    quiet_ticks: u64,
    max_ms: u64,
    per_frame: usize,
    log: Arc<Mutex<FsCallLog>>,
}

/// What the caller does in one 20 ms tick.
struct CallerTick {
    frame: Option<Vec<i16>>,
    keys: Vec<char>,
    hang_up: bool,
}

impl CallerSim {
    fn new(script: &mut Script, per_frame: usize, log: Arc<Mutex<FsCallLog>>) -> Self {
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
        let mut at: Vec<(u64, Vec<i16>)> = std::mem::take(&mut script.at);
        at.sort_by_key(|a| a.0);
        Self {
            turns: std::mem::take(&mut script.turns).into(),
            at: at.into(),
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

// ---------------------------------------------------------------------------------------------
// Helpers

fn l16_decode(b: &[u8]) -> Vec<i16> {
    b.chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Linear interpolation (good enough for a test double).
fn resample(s: &[i16], from: u32, to: u32) -> Vec<i16> {
    if from == to || s.is_empty() || from == 0 {
        return s.to_vec();
    }
    let n = (s.len() as u64 * to as u64 / from as u64) as usize;
    (0..n)
        .map(|i| {
            let x = i as f64 * from as f64 / to as f64;
            let j = x.floor() as usize;
            let f = x - j as f64;
            let a = s[j.min(s.len() - 1)] as f64;
            let b = s[(j + 1).min(s.len() - 1)] as f64;
            (a + (b - a) * f).round() as i16
        })
        .collect()
}

/// 16-bit PCM mono WAV (the first channel of others).
fn parse_wav(b: &[u8]) -> Option<(u32, Vec<i16>)> {
    if b.len() < 12 || &b[0..4] != b"RIFF" || &b[8..12] != b"WAVE" {
        return None;
    }
    let mut i = 12;
    let (mut rate, mut chans, mut bits) = (0u32, 1usize, 16u16);
    while i + 8 <= b.len() {
        let id = &b[i..i + 4];
        let len = u32::from_le_bytes(b[i + 4..i + 8].try_into().ok()?) as usize;
        let body = &b[i + 8..(i + 8 + len).min(b.len())];
        if id == b"fmt " && body.len() >= 16 {
            chans = u16::from_le_bytes([body[2], body[3]]).max(1) as usize;
            rate = u32::from_le_bytes(body[4..8].try_into().ok()?);
            bits = u16::from_le_bytes([body[14], body[15]]);
        } else if id == b"data" {
            if bits != 16 {
                return None;
            }
            let s = l16_decode(body);
            return Some((rate, s.chunks(chans).map(|c| c[0]).collect()));
        }
        i += 8 + len + (len & 1);
    }
    None
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

fn make_uuid(n: u64, r: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        (r >> 32) as u32,
        (r >> 16) as u16,
        (r & 0xfff) as u16,
        (n >> 48) as u16 & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

/// ("2026-11-30 04:14:04", "Mon, 30 Nov 2026 04:14:04 GMT"); local time is given as UTC.
fn dates(secs: u64) -> (String, String) {
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MO: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    (
        format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}"),
        format!(
            "{}, {d:02} {} {y:04} {h:02}:{mi:02}:{s:02} GMT",
            WD[days.rem_euclid(7) as usize],
            MO[(m - 1) as usize]
        ),
    )
}
