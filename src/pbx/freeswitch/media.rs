//! The listener mod_audio_stream connects to: a WebSocket server that takes only connections it
//! expects. The path names the call (`/fs/<uuid>`), and a token is required: in the path
//! (`/fs/<uuid>/<token>`), the query (`?token=`), or an `Authorization: Bearer` header (set through
//! STREAM_EXTRA_HEADERS); anything else gets 401 and a log line. No subprotocol, no compression
//! (none is offered by mod_audio_stream 1.10.12 builds; an offer is declined), header lines read
//! leniently (the module writes `Host:x`), and the handshake is answered at once: the module
//! gives up after about a second. The first text frame is the call's metadata (JSON or
//! `flow=...,lang=...`); then L16 little-endian mono frames at 8 or 16 kHz, of any size.
//!
//! Stereo and mixed streams are refused by design: they send nothing while the channel itself
//! plays nothing (seen on 1.10.12) and the caller would only be heard late.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_util::sync::CancellationToken;

use super::fork::{Marks, WsOut};
use crate::pbx::codec::{Transcoder, WireFormat};
use crate::pbx::events::CallEvents;

/// How long the metadata may take after the handshake.
const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(2);
/// The subprotocol jambonz mod_audio_fork asks for.
const FORK_PROTOCOL: &str = "audio.drachtio.org";
/// Largest message taken from the module (100 ms at 16 kHz is 3 200 B; STREAM_BUFFER_SIZE may
/// make it larger, a little).
const MAX_MESSAGE: usize = 64 * 1024;

/// A media connection that passed the handshake.
pub struct MediaConn {
    pub uuid: String,
    /// The first text frame, if the stream began with one.
    pub metadata: Option<String>,
    /// Audio that came before or instead of metadata.
    pub first_audio: Option<Vec<u8>>,
    pub ws: WebSocketStream<TcpStream>,
}

/// Reads `uuid` and the token from the request (path, query or header).
fn credentials(req: &Request) -> Option<(String, String)> {
    let uri = req.uri();
    let mut parts = uri.path().trim_matches('/').split('/');
    let (Some("fs"), Some(uuid)) = (parts.next(), parts.next()) else {
        return None;
    };
    let in_path = parts.next().map(str::to_string);
    let in_query = uri.query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == "token").then(|| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
    });
    let in_header = req
        .headers()
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string());
    let ok_uuid = !uuid.is_empty()
        && uuid.len() <= 64
        && uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if !ok_uuid {
        return None;
    }
    Some((uuid.to_string(), in_path.or(in_query).or(in_header)?))
}

fn refuse(
    status: StatusCode,
    why: &str,
) -> tokio_tungstenite::tungstenite::http::Response<Option<String>> {
    let mut no = tokio_tungstenite::tungstenite::http::Response::new(Some(why.to_string()));
    *no.status_mut() = status;
    no
}

/// WebSocket settings for media: bounded messages.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Accepts media connections until `stop`; those that pass go to `tx`.
pub async fn accept(
    listener: TcpListener,
    token: String,
    gate: crate::net::Gate,
    tx: mpsc::Sender<MediaConn>,
    stop: CancellationToken,
) {
    let token = std::sync::Arc::new(token);
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
        let (token, tx, handshake) = (token.clone(), tx.clone(), gate.handshake);
        tokio::spawn(async move {
            let _permit = permit;
            let mut who: Option<String> = None;
            // tungstenite fixes the callback's error type (an HTTP response); not ours to shrink.
            #[allow(clippy::result_large_err)]
            let callback = |req: &Request, resp: Response| {
                let Some((uuid, given)) = credentials(req) else {
                    return Err(refuse(
                        StatusCode::UNAUTHORIZED,
                        "expected /fs/<uuid> and a token",
                    ));
                };
                if !crate::net::credential_eq(given.as_bytes(), token.as_bytes()) {
                    return Err(refuse(StatusCode::UNAUTHORIZED, "wrong token"));
                }
                who = Some(uuid);
                // Stock mod_audio_stream asks no subprotocol; jambonz mod_audio_fork asks
                // `audio.drachtio.org` and needs it echoed. Never any extension.
                let mut resp = resp;
                let drachtio = req
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.split(',').any(|p| p.trim() == FORK_PROTOCOL));
                if drachtio {
                    resp.headers_mut().insert(
                        "Sec-WebSocket-Protocol",
                        tokio_tungstenite::tungstenite::http::HeaderValue::from_static(
                            FORK_PROTOCOL,
                        ),
                    );
                }
                Ok(resp)
            };
            let accept =
                tokio_tungstenite::accept_hdr_async_with_config(sock, callback, Some(ws_config()));
            let mut ws = match tokio::time::timeout(handshake, accept).await {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "media connection refused (no call id or wrong token)");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "media handshake too slow; closed");
                    return;
                }
            };
            let Some(uuid) = who else { return };
            let (metadata, first_audio) = match tokio::time::timeout(FIRST_MESSAGE_WAIT, ws.next())
                .await
            {
                Ok(Some(Ok(Message::Text(t)))) => (Some(t.to_string()), None),
                Ok(Some(Ok(Message::Binary(b)))) => (None, Some(b.to_vec())),
                Ok(Some(Ok(_))) | Err(_) => (None, None),
                Ok(Some(Err(e))) => {
                    tracing::warn!(%uuid, error = %e, "media connection failed before its first message");
                    return;
                }
                Ok(None) => return,
            };
            let conn = MediaConn {
                uuid,
                metadata,
                first_audio,
                ws,
            };
            if tx.send(conn).await.is_err() {
                tracing::debug!("adapter gone; media connection dropped");
            }
        });
    }
}

/// Carries one call's media until either side ends it: caller audio in (decoded, resampled,
/// any message size), agent audio and commands out, and (audio_fork) marks in. Ends the call's
/// events with a hangup when the socket closes.
pub async fn pump(
    ws: WebSocketStream<TcpStream>,
    first_audio: Option<Vec<u8>>,
    wire: WireFormat,
    internal_rate: u32,
    events: CallEvents,
    mut out: mpsc::Receiver<WsOut>,
    marks: Option<std::sync::Arc<Marks>>,
) {
    let mut decoder = match Transcoder::new(wire, internal_rate) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "no resampler for this stream");
            events.hangup("media format").await;
            return;
        }
    };
    let (mut sink, mut stream) = ws.split();
    // An odd byte left over from a message (sizes are not always whole samples).
    let mut carry: Vec<u8> = Vec::new();
    let mut take = |bytes: &[u8], events: &CallEvents| {
        carry.extend_from_slice(bytes);
        let whole = carry.len() & !1;
        match decoder.inbound(&carry[..whole]) {
            Ok(s) if !s.is_empty() => events.audio(s),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "decoding caller audio"),
        }
        carry.drain(..whole);
    };
    if let Some(b) = first_audio {
        take(&b, &events);
    }
    let why = loop {
        tokio::select! {
            msg = stream.next() => match msg {
                None => break "media connection closed".to_string(),
                Some(Err(e)) => break format!("media connection failed: {e}"),
                Some(Ok(Message::Binary(b))) => take(&b, &events),
                Some(Ok(Message::Close(c))) => {
                    break format!("media connection closed ({})", c.map(|c| u16::from(c.code)).unwrap_or(1005));
                }
                Some(Ok(Message::Text(t))) => match &marks {
                    Some(m) => m.on_text(&t, &events),
                    None => tracing::debug!(text = %t.chars().take(80).collect::<String>(), "text from mod_audio_stream ignored"),
                },
                Some(Ok(_)) => {}
            },
            m = out.recv() => match m {
                Some(m) => {
                    let msg = match m {
                        WsOut::Text(t) => Message::text(t),
                        WsOut::Binary(b) => Message::binary(b),
                    };
                    let send = sink.send(msg);
                    match tokio::time::timeout(crate::pbx::paced::SEND_TIMEOUT, send).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break format!("media send failed: {e}"),
                        Err(_) => break "media send stalled".to_string(),
                    }
                }
                // The call is over: close politely.
                None => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                    return;
                }
            },
            // jambonz mod_audio_fork: marks its clock says have played, when it did not say so.
            _ = async {
                match marks.as_ref().and_then(|m| m.next_due()) {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }, if marks.is_some() => {
                if let Some(m) = &marks {
                    m.due(&events);
                }
            }
            _ = events.closed() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                return;
            }
        }
    };
    tracing::info!(why = %why, "media ended");
    events.hangup(&why).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, auth: Option<&str>) -> Request {
        let mut b = tokio_tungstenite::tungstenite::http::Request::builder().uri(uri);
        if let Some(a) = auth {
            b = b.header("Authorization", a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_token_comes_from_the_path_the_query_or_a_header() {
        let id = "0f9e6c4a-1b2c-4d5e-8f90-123456789abc";
        let want = Some((id.to_string(), "t0k".to_string()));
        assert_eq!(credentials(&req(&format!("/fs/{id}/t0k"), None)), want);
        assert_eq!(
            credentials(&req(&format!("/fs/{id}?token=t0k"), None)),
            want
        );
        assert_eq!(
            credentials(&req(&format!("/fs/{id}"), Some("Bearer t0k"))),
            want
        );
        assert_eq!(credentials(&req(&format!("/fs/{id}"), None)), None);
        assert_eq!(credentials(&req("/fs/not;a;uuid/t0k", None)), None);
        assert_eq!(credentials(&req(&format!("/other/{id}/t0k"), None)), None);
    }
}
