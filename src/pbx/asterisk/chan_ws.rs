//! chan_websocket media (Asterisk 20.16/22.6/23.0+): binary frames of raw codec bytes both ways,
//! control as TEXT frames, plain-text or JSON. Server mode connects to
//! `ws://asterisk:8088/media/<connection id>`; client mode accepts Asterisk's connection on
//! sidecall's listener. Outbound audio is cut into whole `optimal_frame_size` frames (Asterisk
//! drops a short tail), MEDIA_XOFF/MEDIA_XON pause and resume sending, playout marks are
//! MARK_MEDIA / MEDIA_MARK_PROCESSED, and barge-in is FLUSH_MEDIA.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::pbx::codec::{FrameCutter, Transcoder, WireFormat};
use crate::pbx::events::{CallEvents, DtmfSource};
use crate::pbx::queue_link::{LinkCmd, QueueLink, queue_link};

/// Asterisk rejects text frames longer than this.
pub const MAX_TEXT: usize = 128;
/// Largest binary message sidecall accepts from Asterisk (Asterisk itself closes above 65535).
pub const MAX_BINARY: usize = 65_535;
/// After MEDIA_XON (queue below 800 of 1000), frames released at once; the rest follow at
/// `RELEASE_PER_SECOND`, the pace Asterisk plays them, so the queue never overflows (Asterisk
/// drops whole messages at 1000) and a new MEDIA_XOFF is read between releases.
const XON_BATCH: usize = 150;
const RELEASE_PER_SECOND: usize = 50;
/// Frames held locally while Asterisk says MEDIA_XOFF (20 s).
const HELD_MAX: usize = 1000;

/// Errors on the media socket.
#[derive(Debug, thiserror::Error)]
pub enum WsMediaError {
    #[error("media WebSocket: {0}")]
    Ws(String),
    #[error("media WebSocket: no MEDIA_START within {0} ms")]
    NoMediaStart(u64),
    #[error("media WebSocket: first message was not MEDIA_START: {0:.100}")]
    BadStart(String),
    #[error("media WebSocket: unsupported format `{0}`")]
    Format(String),
    #[error("media WebSocket: {0}")]
    Audio(#[from] crate::audio::AudioError),
}

/// How control messages are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlFormat {
    Plain,
    Json,
}

/// The MEDIA_START event.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaStart {
    pub connection_id: String,
    pub channel: String,
    pub channel_id: String,
    pub format: String,
    pub optimal_frame_size: usize,
    pub ptime: u32,
}

/// A control message from Asterisk.
#[derive(Debug, Clone, PartialEq)]
pub enum AstEvent {
    MediaStart(MediaStart),
    Xoff,
    Xon,
    QueueDrained,
    MarkProcessed(String),
    BufferingCompleted(String),
    DtmfEnd(char),
    Status(String),
    Error(String),
    Unknown(String),
}

fn plain_fields(rest: &str) -> Vec<(&str, &str)> {
    rest.split_whitespace()
        .filter_map(|kv| kv.split_once(':'))
        .collect()
}

/// Parses a control message in either format.
pub fn parse_control(text: &str) -> AstEvent {
    let text = text.trim();
    if text.starts_with('{') {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return AstEvent::Unknown(text.to_string());
        };
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let n = |k: &str| {
            v.get(k)
                .and_then(|x| {
                    x.as_u64()
                        .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
                })
                .unwrap_or(0)
        };
        return match s("event").as_str() {
            "MEDIA_START" => AstEvent::MediaStart(MediaStart {
                connection_id: s("connection_id"),
                channel: s("channel"),
                channel_id: s("channel_id"),
                format: s("format"),
                optimal_frame_size: usize::try_from(n("optimal_frame_size")).unwrap_or(usize::MAX),
                ptime: u32::try_from(n("ptime")).unwrap_or(0),
            }),
            "MEDIA_XOFF" => AstEvent::Xoff,
            "MEDIA_XON" => AstEvent::Xon,
            "QUEUE_DRAINED" => AstEvent::QueueDrained,
            "MEDIA_MARK_PROCESSED" => AstEvent::MarkProcessed(s("correlation_id")),
            "MEDIA_BUFFERING_COMPLETED" => AstEvent::BufferingCompleted(s("correlation_id")),
            "DTMF_END" => match s("digit").chars().next() {
                Some(d) => AstEvent::DtmfEnd(d),
                None => AstEvent::Unknown(text.to_string()),
            },
            "STATUS" => AstEvent::Status(text.to_string()),
            "ERROR" => AstEvent::Error(s("error_text")),
            _ => AstEvent::Unknown(text.to_string()),
        };
    }
    let (name, rest) = text.split_once(' ').unwrap_or((text, ""));
    match name {
        "MEDIA_START" => {
            let f = plain_fields(rest);
            let get = |k: &str| {
                f.iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default()
            };
            AstEvent::MediaStart(MediaStart {
                connection_id: get("connection_id"),
                channel: get("channel"),
                channel_id: get("channel_id"),
                format: get("format"),
                // Unparseable (too large, say) is refused later, never taken as the default.
                optimal_frame_size: get("optimal_frame_size").parse().unwrap_or(usize::MAX),
                ptime: get("ptime").parse().unwrap_or(0),
            })
        }
        "MEDIA_XOFF" => AstEvent::Xoff,
        "MEDIA_XON" => AstEvent::Xon,
        "QUEUE_DRAINED" => AstEvent::QueueDrained,
        "MEDIA_MARK_PROCESSED" => AstEvent::MarkProcessed(rest.trim().to_string()),
        "MEDIA_BUFFERING_COMPLETED" => AstEvent::BufferingCompleted(rest.trim().to_string()),
        "DTMF_END" => match plain_fields(rest)
            .iter()
            .find(|(k, _)| *k == "digit")
            .and_then(|(_, v)| v.chars().next())
        {
            Some(d) => AstEvent::DtmfEnd(d),
            None => AstEvent::Unknown(text.to_string()),
        },
        "STATUS" => AstEvent::Status(rest.to_string()),
        "ERROR" => AstEvent::Error(
            rest.split_once("error_text:")
                .map(|(_, t)| t.to_string())
                .unwrap_or_default(),
        ),
        _ => AstEvent::Unknown(text.to_string()),
    }
}

/// A command to Asterisk in the connection's control format.
pub fn command(fmt: ControlFormat, name: &str, correlation_id: Option<&str>) -> String {
    match (fmt, correlation_id) {
        (ControlFormat::Json, Some(id)) => {
            serde_json::json!({"command": name, "correlation_id": id}).to_string()
        }
        (ControlFormat::Json, None) => serde_json::json!({"command": name}).to_string(),
        (ControlFormat::Plain, Some(id)) => format!("{name} {id}"),
        (ControlFormat::Plain, None) => name.to_string(),
    }
}

/// WebSocket limits for media sockets: nothing near the default 64 MiB.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Reads messages until MEDIA_START (Asterisk sends it first).
pub async fn read_media_start<S>(
    ws: &mut WebSocketStream<S>,
    timeout: Duration,
) -> Result<(MediaStart, ControlFormat), WsMediaError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ms = timeout.as_millis() as u64;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| WsMediaError::NoMediaStart(ms))?
            .ok_or_else(|| WsMediaError::Ws("closed before MEDIA_START".into()))?
            .map_err(|e| WsMediaError::Ws(e.to_string()))?;
        match msg {
            Message::Text(t) => {
                let fmt = if t.trim_start().starts_with('{') {
                    ControlFormat::Json
                } else {
                    ControlFormat::Plain
                };
                return match parse_control(&t) {
                    AstEvent::MediaStart(s) => Ok((s, fmt)),
                    _ => Err(WsMediaError::BadStart(t.to_string())),
                };
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return Err(WsMediaError::Ws("closed before MEDIA_START".into())),
            other => return Err(WsMediaError::BadStart(format!("{other:?}"))),
        }
    }
}

/// Whether this Asterisk answers MARK_MEDIA (20.18/22.8/23.2+). Older chan_websocket logs
/// "command unknown" and never answers, so playout is then tracked by sidecall's own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkSupport {
    /// Marks are answered: MEDIA_MARK_PROCESSED says what was played.
    Yes,
    /// No marks: the playout clock alone says what was played; MARK_MEDIA is never sent.
    No,
    /// Unknown (a version string that does not say): one probe mark on the empty queue, which a
    /// marking Asterisk answers at once; until it does, the clock decides.
    Probe,
}

/// The correlation id of the probe mark.
const PROBE_MARK: &str = "sidecall-probe";
/// A mark Asterisk should have answered by now is treated as played this long after the
/// clock says its audio ended (a mark lost in a long MEDIA_XOFF, say), with a warning.
const MARK_GRACE: Duration = Duration::from_millis(1500);

pub use crate::pbx::clock::PlayoutClock;

enum Out {
    Frame(Vec<u8>),
    Mark(u64),
}

/// Starts the media task for a connected socket; returns the link for the call session.
/// The task ends (closing the socket, which hangs up the media channel) when the link is dropped.
pub fn start<S>(
    ws: WebSocketStream<S>,
    start: MediaStart,
    fmt: ControlFormat,
    marks: MarkSupport,
    internal_rate: u32,
    events: CallEvents,
) -> Result<(QueueLink, tokio::task::JoinHandle<()>), WsMediaError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let wire = WireFormat::from_asterisk(&start.format)
        .ok_or_else(|| WsMediaError::Format(start.format.clone()))?;
    let transcoder = Transcoder::new(wire, internal_rate)?;
    let ofs = optimal_frame_size(start.optimal_frame_size, wire)?;
    let ptime = if (10..=200).contains(&start.ptime) {
        start.ptime
    } else {
        20
    };
    let (link, rx) = queue_link(256);
    let task = tokio::spawn(run(
        ws,
        Conn {
            fmt,
            ofs,
            marks,
            ptime,
        },
        transcoder,
        rx,
        events,
        start.channel_id.clone(),
    ));
    Ok((link, task))
}

/// The frame size Asterisk asks for, checked: 0 means "the codec's 20 ms"; anything that is not
/// a whole number of samples or is over the 65,535-byte frame limit is refused (a huge value
/// would otherwise make sidecall allocate without bound).
pub fn optimal_frame_size(asked: usize, wire: WireFormat) -> Result<usize, WsMediaError> {
    if asked == 0 {
        return Ok(wire.frame_bytes());
    }
    if asked > MAX_BINARY || !asked.is_multiple_of(wire.width()) {
        return Err(WsMediaError::BadStart(format!(
            "optimal_frame_size {asked} is not a usable frame size"
        )));
    }
    Ok(asked)
}

struct Conn {
    fmt: ControlFormat,
    ofs: usize,
    marks: MarkSupport,
    ptime: u32,
}

async fn run<S>(
    ws: WebSocketStream<S>,
    conn: Conn,
    mut tc: Transcoder,
    mut rx: mpsc::Receiver<LinkCmd>,
    events: CallEvents,
    channel_id: String,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Conn {
        fmt,
        ofs,
        mut marks,
        ptime,
    } = conn;
    let (mut sink, mut stream) = ws.split();
    let mut cutter = FrameCutter::new(ofs);
    let mut held: VecDeque<Out> = VecDeque::new();
    let mut held_frames = 0usize;
    let mut xoff = false;
    let mut warned_held = false;
    let mut clock = PlayoutClock::new(ptime, tokio::time::Instant::now());
    if marks == MarkSupport::Probe {
        // On the empty queue a marking Asterisk answers at once; an older one logs
        // "MARK_MEDIA ... command unknown" once.
        let probe = Message::text(command(fmt, "MARK_MEDIA", Some(PROBE_MARK)));
        if let Err(why) = send(&mut sink, probe).await {
            events.hangup(&why).await;
            return;
        }
    }
    // With PBX marks the clock is only a deadline for lost ones; without, it is the answer.
    let mut release_tick = tokio::time::interval(Duration::from_secs(1));
    release_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cause = loop {
        let due = clock.next_due(MARK_GRACE);
        let mut out: Vec<Out> = Vec::new();
        // `out` holds frames released from `held` (not new ones queued behind them).
        let mut released = false;
        tokio::select! {
            _ = release_tick.tick(), if !xoff && !held.is_empty() => {
                release(&mut held, &mut held_frames, &mut out, RELEASE_PER_SECOND);
                released = true;
            }
            cmd = rx.recv() => {
                match cmd {
                    None => break "session ended".to_string(),
                    Some(LinkCmd::Audio(samples)) => {
                        // Whole frames only: Asterisk silently drops a short tail.
                        if let Err(e) = cutter.push(&mut tc, &samples, |f| out.push(Out::Frame(f))) {
                            tracing::warn!(%channel_id, error = %e, "encoding agent audio");
                        }
                    }
                    Some(LinkCmd::Mark(id)) => {
                        if let Some(f) = cutter.finish(tc.wire) {
                            out.push(Out::Frame(f));
                        }
                        out.push(Out::Mark(id));
                    }
                    Some(LinkCmd::Flush) => {
                        cutter.clear();
                        held.clear();
                        held_frames = 0;
                        clock.flush(tokio::time::Instant::now());
                        // A flush is never held back, even during MEDIA_XOFF.
                        if let Err(why) = send(&mut sink, Message::text(command(fmt, "FLUSH_MEDIA", None))).await {
                            break why;
                        }
                    }
                }
            }
            _ = sleep_until_opt(due) => {
                for (id, asked) in clock.due(tokio::time::Instant::now(), MARK_GRACE) {
                    if asked {
                        tracing::warn!(%channel_id, mark = id, "Asterisk never answered a playout mark; treating it as played");
                    }
                    events.mark_played(id);
                }
            }
            msg = stream.next() => match msg {
                None => break "media socket closed".to_string(),
                Some(Err(e)) => break format!("media socket error: {e}"),
                Some(Ok(Message::Binary(b))) => {
                    if b.len() > MAX_BINARY {
                        tracing::warn!(%channel_id, len = b.len(), "oversized media frame from Asterisk; ending the call");
                        break "oversized media frame".to_string();
                    }
                    if b.len() % tc.wire.width() != 0 {
                        tracing::debug!(%channel_id, len = b.len(), "odd-length media frame; last byte ignored");
                    }
                    match tc.inbound(&b) {
                        Ok(samples) if !samples.is_empty() => events.audio(samples),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(%channel_id, error = %e, "decoding caller audio"),
                    }
                }
                Some(Ok(Message::Text(t))) => match parse_control(&t) {
                    AstEvent::MarkProcessed(id) if id == PROBE_MARK => {
                        if marks == MarkSupport::Probe {
                            tracing::debug!(%channel_id, "Asterisk answers playout marks");
                            marks = MarkSupport::Yes;
                        }
                    }
                    AstEvent::MarkProcessed(id) => {
                        match id.strip_prefix('m').and_then(|n| n.parse::<u64>().ok()) {
                            Some(n) => {
                                clock.confirmed(n);
                                events.mark_played(n);
                            }
                            None => tracing::debug!(%channel_id, %id, "mark that is not ours"),
                        }
                    }
                    AstEvent::DtmfEnd(d) => events.dtmf(d, DtmfSource::Media),
                    AstEvent::Xoff => xoff = true,
                    AstEvent::Xon => {
                        xoff = false;
                        warned_held = false;
                        release(&mut held, &mut held_frames, &mut out, XON_BATCH);
                        released = true;
                        release_tick.reset();
                    }
                    AstEvent::Error(e) => tracing::warn!(%channel_id, error = %e, "Asterisk reported a media error"),
                    AstEvent::MediaStart(_) => tracing::warn!(%channel_id, "second MEDIA_START ignored"),
                    AstEvent::Unknown(t) => tracing::warn!(%channel_id, text = %t.chars().take(128).collect::<String>(), "unknown control message ignored"),
                    AstEvent::Status(_) | AstEvent::QueueDrained | AstEvent::BufferingCompleted(_) => {}
                },
                Some(Ok(Message::Close(frame))) => break format!("Asterisk closed the media socket ({})", frame.map(|f| f.code.to_string()).unwrap_or_default()),
                Some(Ok(_)) => {}
            }
        }
        let mut failed = None;
        for o in out {
            // While frames are held, new ones queue behind them (order is what the caller hears).
            if xoff || (!released && !held.is_empty()) {
                match o {
                    // Marks are never dropped: a lost mark would leave a reply unfinished.
                    Out::Mark(_) => held.push_back(o),
                    Out::Frame(_) if held_frames >= HELD_MAX => {
                        if !warned_held {
                            tracing::warn!(%channel_id, "Asterisk queue full (MEDIA_XOFF) too long; dropping agent audio");
                            warned_held = true;
                        }
                    }
                    Out::Frame(_) => {
                        held_frames += 1;
                        held.push_back(o);
                    }
                }
                continue;
            }
            let (msg, mark) = match o {
                Out::Frame(b) => (Message::binary(b), None),
                Out::Mark(id) if marks == MarkSupport::Yes => (
                    Message::text(command(fmt, "MARK_MEDIA", Some(&format!("m{id}")))),
                    Some(id),
                ),
                Out::Mark(id) => {
                    clock.mark(id, tokio::time::Instant::now(), false);
                    continue;
                }
            };
            if let Err(why) = send(&mut sink, msg).await {
                failed = Some(why);
                break;
            }
            // Stamped once Asterisk has it: a send slowed by backpressure moves the clock on.
            let now = tokio::time::Instant::now();
            match mark {
                Some(id) => clock.mark(id, now, true),
                None => clock.frame_sent(now),
            }
        }
        if let Some(why) = failed {
            break why;
        }
    };
    tracing::debug!(%channel_id, %cause, "media task ends");
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    events.hangup(&cause).await;
}

/// Moves up to `frames` held frames (and the marks among them) to `out`.
fn release(held: &mut VecDeque<Out>, held_frames: &mut usize, out: &mut Vec<Out>, frames: usize) {
    let mut n = 0;
    while let Some(o) = held.front() {
        if matches!(o, Out::Frame(_)) {
            if n >= frames {
                break;
            }
            n += 1;
        }
        if let Some(o) = held.pop_front() {
            out.push(o);
        }
    }
    *held_frames = held_frames.saturating_sub(n);
}

/// Sends one message with a deadline: an Asterisk that stops reading must not hold the call.
async fn send<S>(sink: &mut S, msg: Message) -> Result<(), String>
where
    S: futures_util::Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    match tokio::time::timeout(crate::pbx::paced::SEND_TIMEOUT, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("send failed: {e}")),
        Err(_) => Err("media send timed out".to_string()),
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_media_start_both_formats() {
        let plain = "MEDIA_START connection_id:4f1c channel:WebSocket/INCOMING/0x7fe93c002ab0 channel_id:1795262114.2 format:slin16 optimal_frame_size:640 ptime:20";
        let json = r#"{"event":"MEDIA_START","connection_id":"4f1c","channel":"WebSocket/INCOMING/0x7fe93c002ab0","channel_id":"1795262114.2","format":"slin16","optimal_frame_size":640,"ptime":20,"channel_variables":{"A":"b"}}"#;
        let want = MediaStart {
            connection_id: "4f1c".into(),
            channel: "WebSocket/INCOMING/0x7fe93c002ab0".into(),
            channel_id: "1795262114.2".into(),
            format: "slin16".into(),
            optimal_frame_size: 640,
            ptime: 20,
        };
        assert_eq!(parse_control(plain), AstEvent::MediaStart(want.clone()));
        assert_eq!(parse_control(json), AstEvent::MediaStart(want));
    }

    #[test]
    fn parses_events_and_survives_garbage() {
        assert_eq!(
            parse_control("MEDIA_MARK_PROCESSED m3"),
            AstEvent::MarkProcessed("m3".into())
        );
        assert_eq!(
            parse_control(
                r#"{"event":"MEDIA_MARK_PROCESSED","channel_id":"1.2","correlation_id":"tone1"}"#
            ),
            AstEvent::MarkProcessed("tone1".into())
        );
        assert_eq!(
            parse_control("DTMF_END digit:5 channel_id:1.2"),
            AstEvent::DtmfEnd('5')
        );
        assert_eq!(
            parse_control(r##"{"event":"DTMF_END","channel_id":"1.2","digit":"#"}"##),
            AstEvent::DtmfEnd('#')
        );
        assert_eq!(parse_control("MEDIA_XOFF"), AstEvent::Xoff);
        assert_eq!(
            parse_control(r#"{"event":"MEDIA_XON","channel_id":"1"}"#),
            AstEvent::Xon
        );
        assert_eq!(
            parse_control("ERROR channel_id:1.2 error_text:Unknown command FOO"),
            AstEvent::Error("Unknown command FOO".into())
        );
        assert!(matches!(parse_control("{garbage"), AstEvent::Unknown(_)));
        assert!(matches!(parse_control(""), AstEvent::Unknown(_)));
        assert!(matches!(parse_control("DTMF_END"), AstEvent::Unknown(_)));
    }

    #[test]
    fn playout_clock_says_when_audio_has_played() {
        let t0 = tokio::time::Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut c = PlayoutClock::new(20, t0);
        // 50 frames (1 s) sent at once, then a mark: due after 1 s plus one ptime.
        for _ in 0..50 {
            c.frame_sent(t0);
        }
        c.mark(1, t0, false);
        assert_eq!(c.next_due(MARK_GRACE), Some(t0 + ms(1020)));
        assert!(c.due(t0 + ms(1000), MARK_GRACE).is_empty());
        assert_eq!(c.due(t0 + ms(1020), MARK_GRACE), vec![(1, false)]);
        // Frames paced one per 20 ms keep the queue short: a mark after them is due soon.
        let t1 = t0 + ms(5000);
        for i in 0..10 {
            c.frame_sent(t1 + ms(20 * i));
        }
        c.mark(2, t1 + ms(180), false);
        assert_eq!(c.next_due(MARK_GRACE), Some(t1 + ms(220)));
        // A flush drops pending marks and empties the queue.
        c.flush(t1 + ms(190));
        assert_eq!(c.next_due(MARK_GRACE), None);
        c.mark(3, t1 + ms(190), true);
        assert_eq!(c.next_due(MARK_GRACE), Some(t1 + ms(210) + MARK_GRACE));
        // With PBX marks, a confirmed mark is gone; a lost one is due after the grace.
        c.mark(4, t1 + ms(190), true);
        c.confirmed(3);
        assert_eq!(c.next_due(MARK_GRACE), Some(t1 + ms(210) + MARK_GRACE));
        assert!(c.due(t1 + ms(1000), MARK_GRACE).is_empty());
        assert_eq!(
            c.due(t1 + ms(210) + MARK_GRACE, MARK_GRACE),
            vec![(4, true)]
        );
    }

    #[test]
    fn optimal_frame_sizes_from_outside_are_checked() {
        let slin16 = WireFormat::from_asterisk("slin16").unwrap();
        assert_eq!(optimal_frame_size(0, slin16).unwrap(), 640);
        assert_eq!(optimal_frame_size(640, slin16).unwrap(), 640);
        assert!(optimal_frame_size(641, slin16).is_err(), "half a sample");
        assert!(optimal_frame_size(100_000_000_000, slin16).is_err());
        assert!(optimal_frame_size(usize::MAX, slin16).is_err());
        // A MEDIA_START whose frame size does not even parse is refused, not defaulted.
        let huge = "MEDIA_START connection_id:a channel:c channel_id:1.2 format:slin16 optimal_frame_size:99999999999999999999999 ptime:20";
        match parse_control(huge) {
            AstEvent::MediaStart(m) => {
                assert!(optimal_frame_size(m.optimal_frame_size, slin16).is_err())
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_asterisk_that_stops_reading_ends_the_call() {
        // The far end never reads: once the pipe is full, a send waits, and its deadline ends
        // the call instead of holding it silent for ever.
        let (ours, _theirs) = tokio::io::duplex(4096);
        let ws = WebSocketStream::from_raw_socket(
            ours,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        let (events, mut rx) = CallEvents::channel(16);
        let start_ev = MediaStart {
            connection_id: "c".into(),
            channel: "WebSocket/x".into(),
            channel_id: "x".into(),
            format: "slin16".into(),
            optimal_frame_size: 640,
            ptime: 20,
        };
        let (mut link, _task) = start(
            ws,
            start_ev,
            ControlFormat::Plain,
            MarkSupport::No,
            16_000,
            events,
        )
        .unwrap();
        use crate::call::MediaLink;
        for _ in 0..100 {
            let _ = link.send_audio(&[1000; 320]);
        }
        let cause = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match rx.recv().await {
                    Some(crate::call::MediaEvent::Hangup { cause }) => return cause,
                    Some(_) => continue,
                    None => return "closed".to_string(),
                }
            }
        })
        .await
        .unwrap();
        assert!(cause.contains("timed out"), "{cause}");
    }

    #[test]
    fn held_frames_go_out_in_batches_with_their_marks_in_order() {
        let mut held: VecDeque<Out> = VecDeque::new();
        for i in 0..300u64 {
            held.push_back(Out::Frame(vec![0; 4]));
            if i % 100 == 99 {
                held.push_back(Out::Mark(i));
            }
        }
        let mut n = 300;
        let mut out = Vec::new();
        release(&mut held, &mut n, &mut out, XON_BATCH);
        let frames = out.iter().filter(|o| matches!(o, Out::Frame(_))).count();
        let marks: Vec<u64> = out
            .iter()
            .filter_map(|o| if let Out::Mark(m) = o { Some(*m) } else { None })
            .collect();
        assert_eq!(frames, 150, "at most a batch after MEDIA_XON");
        assert_eq!(marks, vec![99], "the mark after frame 100 went with it");
        assert_eq!(n, 150);
        let mut rest = Vec::new();
        release(&mut held, &mut n, &mut rest, usize::MAX);
        assert_eq!(rest.len(), 150 + 2);
        assert_eq!(n, 0);
        assert!(held.is_empty());
    }

    #[test]
    fn commands_fit_in_128_bytes() {
        assert_eq!(
            command(ControlFormat::Plain, "MARK_MEDIA", Some("m7")),
            "MARK_MEDIA m7"
        );
        assert_eq!(
            command(ControlFormat::Json, "MARK_MEDIA", Some("m7")),
            r#"{"command":"MARK_MEDIA","correlation_id":"m7"}"#
        );
        assert_eq!(
            command(ControlFormat::Json, "FLUSH_MEDIA", None),
            r#"{"command":"FLUSH_MEDIA"}"#
        );
        assert!(
            command(
                ControlFormat::Json,
                "MARK_MEDIA",
                Some(&format!("m{}", u64::MAX))
            )
            .len()
                <= MAX_TEXT
        );
    }
}
