//! The ARI events WebSocket, kept connected: it reconnects with backoff after Asterisk restarts
//! or the network drops, and reports connected/disconnected (for `/health` and a metric). It
//! pings Asterisk and gives up on a connection that has been silent too long, so a half-open
//! connection (a dead peer, a dropped NAT entry) cannot keep `/health` green while no calls come.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use super::ari::{Event, parse_event};

/// Metric: 1 while the events socket is up.
pub const ARI_CONNECTED: &str = "sidecall_ari_connected";

/// What the events task reports.
#[derive(Debug)]
pub enum EventMsg {
    Connected,
    Disconnected(String),
    Event(Box<Event>),
}

/// Keeps the events socket of `url` connected until `stop`, authenticating with the
/// `Authorization` value `auth`; events arrive on the receiver. A connection that has sent
/// nothing (no event, no pong) for `silent_limit` is taken for dead; pings go every third of it.
pub fn spawn(
    url: String,
    auth: String,
    silent_limit: Duration,
    connected: Arc<AtomicBool>,
    stop: CancellationToken,
) -> mpsc::Receiver<EventMsg> {
    let ping_every = (silent_limit / 3).max(Duration::from_millis(100));
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        // Never log the api_key.
        let shown = url.split('?').next().unwrap_or("").to_string();
        while !stop.is_cancelled() {
            let request = match url.as_str().into_client_request() {
                Ok(mut r) => {
                    r.headers_mut()
                        .insert("Sec-WebSocket-Protocol", http_value("ari"));
                    match tokio_tungstenite::tungstenite::http::HeaderValue::from_str(&auth) {
                        Ok(mut v) => {
                            v.set_sensitive(true);
                            r.headers_mut().insert("Authorization", v);
                        }
                        Err(_) => {
                            tracing::error!("ARI credentials cannot go in an HTTP header");
                            return;
                        }
                    }
                    r
                }
                Err(e) => {
                    tracing::error!(url = %shown, error = %e, "ARI events URL is invalid");
                    return;
                }
            };
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(request),
            );
            let result = tokio::select! {
                _ = stop.cancelled() => break,
                r = attempt => r,
            };
            match result {
                Ok(Ok((mut ws, _))) => {
                    backoff = Duration::from_millis(250);
                    connected.store(true, Ordering::Relaxed);
                    metrics::gauge!(ARI_CONNECTED).set(1.0);
                    metrics::gauge!(crate::telemetry::names::CONTROL_CONNECTED, "pbx" => "asterisk").set(1.0);
                    tracing::info!(url = %shown, "ARI events connected");
                    if tx.send(EventMsg::Connected).await.is_err() {
                        return;
                    }
                    let mut ping = tokio::time::interval(ping_every);
                    ping.tick().await;
                    let mut last_heard = tokio::time::Instant::now();
                    let why = loop {
                        let msg = tokio::select! {
                            _ = stop.cancelled() => break "stopping".to_string(),
                            _ = ping.tick() => {
                                if last_heard.elapsed() >= silent_limit {
                                    break format!("nothing from Asterisk for {} ms (half-open connection?)", silent_limit.as_millis());
                                }
                                let send = tokio::time::timeout(ping_every, ws.send(Message::Ping(Vec::new().into())));
                                match send.await {
                                    Ok(Ok(())) => continue,
                                    Ok(Err(e)) => break format!("ping failed: {e}"),
                                    Err(_) => break "ping could not be sent in time".to_string(),
                                }
                            }
                            m = ws.next() => m,
                        };
                        last_heard = tokio::time::Instant::now();
                        match msg {
                            None => break "closed".to_string(),
                            Some(Err(e)) => break e.to_string(),
                            Some(Ok(Message::Text(t))) => match parse_event(&t) {
                                Ok(Event::Other) => {}
                                Ok(ev) => {
                                    if tx.send(EventMsg::Event(Box::new(ev))).await.is_err() {
                                        return;
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, text = %t.chars().take(200).collect::<String>(), "malformed ARI event ignored")
                                }
                            },
                            Some(Ok(Message::Close(_))) => break "closed by Asterisk".to_string(),
                            Some(Ok(_)) => {}
                        }
                    };
                    connected.store(false, Ordering::Relaxed);
                    metrics::gauge!(ARI_CONNECTED).set(0.0);
                    metrics::gauge!(crate::telemetry::names::CONTROL_CONNECTED, "pbx" => "asterisk").set(0.0);
                    if stop.is_cancelled() {
                        // A close frame, so Asterisk does not log an abrupt close.
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                        tracing::info!(url = %shown, "ARI events closed (stopping)");
                        return;
                    }
                    tracing::warn!(url = %shown, reason = %why, "ARI events disconnected");
                    if tx.send(EventMsg::Disconnected(why)).await.is_err() {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(url = %shown, error = %e, retry_ms = backoff.as_millis() as u64, "ARI events connect failed")
                }
                Err(_) => tracing::warn!(url = %shown, "ARI events connect timed out"),
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        connected.store(false, Ordering::Relaxed);
    });
    rx
}

fn http_value(s: &'static str) -> tokio_tungstenite::tungstenite::http::HeaderValue {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_static(s)
}
