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
                optimal_frame_size: n("optimal_frame_size") as usize,
                ptime: n("ptime") as u32,
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
                optimal_frame_size: get("optimal_frame_size").parse().unwrap_or(0),
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

enum Out {
    Frame(Vec<u8>),
    Text(String),
}

impl Out {
    fn message(self) -> Message {
        match self {
            Out::Frame(b) => Message::binary(b),
            Out::Text(t) => Message::text(t),
        }
    }
}

/// Starts the media task for a connected socket; returns the link for the call session.
/// The task ends (closing the socket, which hangs up the media channel) when the link is dropped.
pub fn start<S>(
    ws: WebSocketStream<S>,
    start: MediaStart,
    fmt: ControlFormat,
    internal_rate: u32,
    events: CallEvents,
) -> Result<(QueueLink, tokio::task::JoinHandle<()>), WsMediaError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let wire = WireFormat::from_asterisk(&start.format)
        .ok_or_else(|| WsMediaError::Format(start.format.clone()))?;
    let transcoder = Transcoder::new(wire, internal_rate)?;
    let ofs = if start.optimal_frame_size > 0 {
        start.optimal_frame_size
    } else {
        wire.frame_bytes()
    };
    let (link, rx) = queue_link(256);
    let task = tokio::spawn(run(
        ws,
        fmt,
        ofs,
        transcoder,
        rx,
        events,
        start.channel_id.clone(),
    ));
    Ok((link, task))
}

async fn run<S>(
    ws: WebSocketStream<S>,
    fmt: ControlFormat,
    ofs: usize,
    mut tc: Transcoder,
    mut rx: mpsc::Receiver<LinkCmd>,
    events: CallEvents,
    channel_id: String,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let mut cutter = FrameCutter::new(ofs);
    let mut held: VecDeque<Out> = VecDeque::new();
    let mut xoff = false;
    let mut warned_held = false;
    let cause = loop {
        tokio::select! {
            cmd = rx.recv() => {
                let mut out: Vec<Out> = Vec::new();
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
                        out.push(Out::Text(command(fmt, "MARK_MEDIA", Some(&format!("m{id}")))));
                    }
                    Some(LinkCmd::Flush) => {
                        cutter.clear();
                        held.clear();
                        // A flush is never held back, even during MEDIA_XOFF.
                        if sink.send(Message::text(command(fmt, "FLUSH_MEDIA", None))).await.is_err() {
                            break "send failed".to_string();
                        }
                    }
                }
                let mut failed = false;
                for o in out {
                    if xoff {
                        if held.len() >= HELD_MAX {
                            if !warned_held {
                                tracing::warn!(%channel_id, "Asterisk queue full (MEDIA_XOFF) too long; dropping agent audio");
                                warned_held = true;
                            }
                            continue;
                        }
                        held.push_back(o);
                        continue;
                    }
                    if sink.send(o.message()).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed {
                    break "send failed".to_string();
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
                    AstEvent::MarkProcessed(id) => {
                        match id.strip_prefix('m').and_then(|n| n.parse::<u64>().ok()) {
                            Some(n) => events.mark_played(n),
                            None => tracing::debug!(%channel_id, %id, "mark that is not ours"),
                        }
                    }
                    AstEvent::DtmfEnd(d) => events.dtmf(d, DtmfSource::Media),
                    AstEvent::Xoff => xoff = true,
                    AstEvent::Xon => {
                        xoff = false;
                        warned_held = false;
                        let mut failed = false;
                        while let Some(o) = held.pop_front() {
                            if sink.send(o.message()).await.is_err() {
                                failed = true;
                                break;
                            }
                        }
                        if failed {
                            break "send failed".to_string();
                        }
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
    };
    tracing::debug!(%channel_id, %cause, "media task ends");
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    events.hangup(&cause).await;
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
