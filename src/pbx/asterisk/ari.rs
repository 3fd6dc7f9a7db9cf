//! A small typed ARI client: the REST calls sidecall makes (answer, hangup, continue, redirect,
//! DTMF, bridges, externalMedia) with ARI's documented status codes mapped to typed errors, and
//! the event types it reads from the events WebSocket.
//!
//! Why not the `asterisk-ari` crate: 0.3.0 cannot ask for chan_websocket media (its transport and
//! encapsulation enums stop at udp/tcp and rtp/audiosocket, and there is no `transport_data`),
//! maps no ARI status to a meaning, and would pull a second reqwest and tungstenite into the build.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// What went wrong with an ARI request.
#[derive(Debug, thiserror::Error)]
pub enum AriError {
    #[error("ARI: not found (404){}", ctx(.0))]
    NotFound(String),
    #[error("ARI: channel not in a Stasis application (409){}", ctx(.0))]
    NotInStasis(String),
    #[error("ARI: channel in an invalid state (412){}", ctx(.0))]
    InvalidState(String),
    #[error("ARI: unprocessable (422){}", ctx(.0))]
    Unprocessable(String),
    #[error("ARI: authentication failed ({0}): check asterisk.username and the password variable")]
    Auth(u16),
    #[error("ARI: Asterisk is not ready yet (503)")]
    Unavailable,
    #[error("ARI: bad request (400){}", ctx(.0))]
    BadRequest(String),
    #[error("ARI: HTTP {status}{}", ctx(.body))]
    Http { status: u16, body: String },
    #[error("ARI: no answer within {0} ms")]
    Timeout(u64),
    #[error("ARI: cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("ARI: unreadable answer: {0}")]
    BadJson(String),
}

fn ctx(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

impl AriError {
    fn from_status(status: u16, body: String) -> Self {
        // ARI puts a JSON {"message": ...} in error bodies.
        let msg = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| body.chars().take(200).collect());
        match status {
            400 => AriError::BadRequest(msg),
            401 | 403 => AriError::Auth(status),
            404 => AriError::NotFound(msg),
            409 => AriError::NotInStasis(msg),
            412 => AriError::InvalidState(msg),
            422 => AriError::Unprocessable(msg),
            503 => AriError::Unavailable,
            _ => AriError::Http { status, body: msg },
        }
    }
}

/// Caller ID of a channel.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct CallerId {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub number: String,
}

/// Where a channel is in the dialplan.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct DialplanCep {
    #[serde(default)]
    pub context: String,
    #[serde(default)]
    pub exten: String,
    #[serde(default)]
    pub priority: i64,
}

/// An ARI Channel object (the fields sidecall reads).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Channel {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub caller: CallerId,
    #[serde(default)]
    pub dialplan: Option<DialplanCep>,
    #[serde(default)]
    pub channelvars: Option<HashMap<String, Value>>,
}

impl Channel {
    /// A channel variable as a string.
    pub fn var(&self, name: &str) -> Option<String> {
        let v = self.channelvars.as_ref()?.get(name)?;
        Some(match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

/// The ARI events sidecall acts on.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type")]
pub enum Event {
    StasisStart {
        #[serde(default)]
        args: Vec<String>,
        channel: Channel,
    },
    StasisEnd {
        channel: Channel,
    },
    ChannelDtmfReceived {
        digit: String,
        #[serde(default)]
        duration_ms: u64,
        channel: Channel,
    },
    ChannelHangupRequest {
        channel: Channel,
        #[serde(default)]
        cause: Option<i64>,
    },
    ChannelDestroyed {
        channel: Channel,
        #[serde(default)]
        cause: i64,
        #[serde(default)]
        cause_txt: String,
    },
    /// A user event (`POST /events/user/{name}`); sidecall sends itself one as a marker in
    /// its event stream.
    ChannelUserevent {
        #[serde(default)]
        eventname: String,
    },
    #[serde(other)]
    Other,
}

/// Parameters of `POST /channels/externalMedia`.
#[derive(Debug, Clone, Default)]
pub struct ExternalMedia {
    pub channel_id: String,
    pub external_host: String,
    pub encapsulation: String,
    pub transport: String,
    pub connection_type: Option<String>,
    pub format: String,
    pub data: Option<String>,
    pub transport_data: Option<String>,
}

/// ARI REST client.
#[derive(Clone)]
pub struct AriClient {
    http: reqwest::Client,
    base: String,
    user: String,
    pass: String,
    timeout: Duration,
}

impl AriClient {
    /// `url` is Asterisk's HTTP server (`http://127.0.0.1:8088`).
    pub fn new(
        http: reqwest::Client,
        url: &str,
        user: &str,
        pass: &str,
        timeout: Duration,
    ) -> Self {
        Self {
            http,
            base: format!("{}/ari", url.trim_end_matches('/')),
            user: user.into(),
            pass: pass.into(),
            timeout,
        }
    }

    /// The events WebSocket URL for `app`. The credentials are not in it: they go in the
    /// `Authorization` header (`events_auth`), so they never reach a log line or a proxy's URL log.
    pub fn events_url(&self, app: &str) -> String {
        let ws = self.base.replacen("http", "ws", 1);
        format!("{ws}/events?app={}", enc(app))
    }

    /// The `Authorization` header value for the events WebSocket (HTTP Basic, which ARI accepts
    /// as well as `api_key`).
    pub fn events_auth(&self) -> String {
        use base64::Engine;
        let raw = format!("{}:{}", self.user, self.pass);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Option<Value>, AriError> {
        let url = format!("{}{path}", self.base);
        let ms = self.timeout.as_millis() as u64;
        let mut attempt = 0;
        let resp = loop {
            let req = self
                .http
                .request(method.clone(), &url)
                .basic_auth(&self.user, Some(&self.pass))
                .query(query)
                .timeout(self.timeout);
            match req.send().await {
                Ok(r) => break r,
                Err(e) if e.is_timeout() => return Err(AriError::Timeout(ms)),
                // A pooled connection that Asterisk closed (a restart, say) fails before the
                // request reaches it: one retry on a fresh connection is safe.
                Err(e) if attempt == 0 && (e.is_connect() || e.is_request()) => {
                    attempt += 1;
                    tracing::debug!(error = %crate::engines::root_cause(&e), %url, "ARI request retried");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(AriError::Connect {
                        url: url.clone(),
                        message: crate::engines::root_cause(&e),
                    });
                }
            }
        };
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| {
            if e.is_timeout() {
                AriError::Timeout(ms)
            } else {
                AriError::BadJson(e.to_string())
            }
        })?;
        if !(200..300).contains(&status) {
            return Err(AriError::from_status(status, body));
        }
        if body.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&body)
            .map(Some)
            .map_err(|e| AriError::BadJson(format!("{e}: {body:.120}")))
    }

    pub async fn answer(&self, channel: &str) -> Result<(), AriError> {
        self.call(
            reqwest::Method::POST,
            &format!("/channels/{}/answer", enc(channel)),
            &[],
        )
        .await
        .map(drop)
    }

    /// Hangs up with a reason (normal, busy, congestion, no_answer, ...).
    pub async fn hangup(&self, channel: &str, reason: &str) -> Result<(), AriError> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/channels/{}", enc(channel)),
            &[("reason", reason.into())],
        )
        .await
        .map(drop)
    }

    /// Sends the channel back into the dialplan.
    pub async fn continue_in_dialplan(
        &self,
        channel: &str,
        context: &str,
        extension: &str,
        priority: Option<u32>,
    ) -> Result<(), AriError> {
        let mut q = vec![
            ("context", context.to_string()),
            ("extension", extension.to_string()),
        ];
        if let Some(p) = priority {
            q.push(("priority", p.to_string()));
        }
        self.call(
            reqwest::Method::POST,
            &format!("/channels/{}/continue", enc(channel)),
            &q,
        )
        .await
        .map(drop)
    }

    /// Redirects the channel to an endpoint (SIP REFER / 302).
    pub async fn redirect(&self, channel: &str, endpoint: &str) -> Result<(), AriError> {
        self.call(
            reqwest::Method::POST,
            &format!("/channels/{}/redirect", enc(channel)),
            &[("endpoint", endpoint.into())],
        )
        .await
        .map(drop)
    }

    pub async fn send_dtmf(&self, channel: &str, digits: &str) -> Result<(), AriError> {
        self.call(
            reqwest::Method::POST,
            &format!("/channels/{}/dtmf", enc(channel)),
            &[
                ("dtmf", digits.into()),
                ("between", "100".into()),
                ("duration", "100".into()),
            ],
        )
        .await
        .map(drop)
    }

    /// Creates a mixing bridge and returns its id.
    pub async fn create_bridge(&self, id: &str) -> Result<String, AriError> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/bridges",
                &[
                    ("type", "mixing".into()),
                    ("bridgeId", id.into()),
                    ("name", id.into()),
                ],
            )
            .await?;
        v.and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string))
            .ok_or_else(|| AriError::BadJson("bridge without id".into()))
    }

    pub async fn add_to_bridge(&self, bridge: &str, channels: &[&str]) -> Result<(), AriError> {
        self.call(
            reqwest::Method::POST,
            &format!("/bridges/{}/addChannel", enc(bridge)),
            &[("channel", channels.join(","))],
        )
        .await
        .map(drop)
    }

    pub async fn destroy_bridge(&self, bridge: &str) -> Result<(), AriError> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/bridges/{}", enc(bridge)),
            &[],
        )
        .await
        .map(drop)
    }

    /// Creates an external media channel in `app`; returns the channel with `channelvars`.
    pub async fn external_media(&self, app: &str, p: &ExternalMedia) -> Result<Channel, AriError> {
        let mut q = vec![
            ("app", app.to_string()),
            ("channelId", p.channel_id.clone()),
            ("external_host", p.external_host.clone()),
            ("encapsulation", p.encapsulation.clone()),
            ("transport", p.transport.clone()),
            ("format", p.format.clone()),
        ];
        if let Some(c) = &p.connection_type {
            q.push(("connection_type", c.clone()));
        }
        if let Some(d) = &p.data {
            q.push(("data", d.clone()));
        }
        if let Some(t) = &p.transport_data {
            q.push(("transport_data", t.clone()));
        }
        let v = self
            .call(reqwest::Method::POST, "/channels/externalMedia", &q)
            .await?;
        let v = v.ok_or_else(|| AriError::BadJson("externalMedia answered no channel".into()))?;
        serde_json::from_value(v).map_err(|e| AriError::BadJson(e.to_string()))
    }

    /// Ids of the channels subscribed to `app` (every channel in its Stasis), from
    /// `GET /applications/{app}`.
    pub async fn app_channels(&self, app: &str) -> Result<Vec<String>, AriError> {
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("/applications/{}", enc(app)),
                &[],
            )
            .await?;
        Ok(v.as_ref()
            .and_then(|v| v.get("channel_ids"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Sends the user event `name` to `app`'s event stream (`POST /events/user/{name}`). It
    /// arrives after every event Asterisk generated before it.
    pub async fn user_event(&self, app: &str, name: &str) -> Result<(), AriError> {
        self.call(
            reqwest::Method::POST,
            &format!("/events/user/{}", enc(name)),
            &[("application", app.to_string())],
        )
        .await
        .map(drop)
    }

    /// Ids of every channel (`GET /channels`).
    pub async fn channel_ids(&self) -> Result<Vec<String>, AriError> {
        self.ids("/channels").await
    }

    /// Ids of every bridge ARI applications made (`GET /bridges`).
    pub async fn bridge_ids(&self) -> Result<Vec<String>, AriError> {
        self.ids("/bridges").await
    }

    async fn ids(&self, path: &str) -> Result<Vec<String>, AriError> {
        let v = self.call(reqwest::Method::GET, path, &[]).await?;
        Ok(v.as_ref()
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|o| o.get("id").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Asterisk's version string (`GET /asterisk/info`).
    pub async fn version(&self) -> Result<String, AriError> {
        let v = self
            .call(
                reqwest::Method::GET,
                "/asterisk/info",
                &[("only", "system".into())],
            )
            .await?;
        v.as_ref()
            .and_then(|v| v.pointer("/system/version"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| AriError::BadJson("no system.version".into()))
    }
}

/// Everything but RFC 3986's unreserved characters is escaped.
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a path segment or query value.
fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, COMPONENT).to_string()
}

/// Whether an Asterisk version has the JSON control format and `transport_data`
/// (20.18+, 22.8+, 23.2+, and any later major).
pub fn supports_json_control(version: &str) -> bool {
    // A git build (`GIT-master-27fb039`) says nothing: the digits of its hash are no version.
    if !version.starts_with(|c: char| c.is_ascii_digit()) {
        return false;
    }
    let nums: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .filter_map(|s| s.parse().ok())
        .collect();
    match nums.as_slice() {
        [major, minor, ..] => match major {
            20 => *minor >= 18,
            21 => false,
            22 => *minor >= 8,
            23 => *minor >= 2,
            m => *m > 23,
        },
        _ => false,
    }
}

/// Whether an Asterisk version answers MARK_MEDIA: the same floors as JSON control (20.18,
/// 22.8, 23.2). A version string without numbers (a `GIT-master-...` build) says nothing: probe.
pub fn mark_support(version: &str) -> super::chan_ws::MarkSupport {
    use super::chan_ws::MarkSupport;
    let has_number = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .count()
        >= 2
        && version.starts_with(|c: char| c.is_ascii_digit());
    if !has_number {
        MarkSupport::Probe
    } else if supports_json_control(version) {
        MarkSupport::Yes
    } else {
        MarkSupport::No
    }
}

/// Parses one events-socket message; garbage gives an error to log, never a panic.
pub fn parse_event(text: &str) -> Result<Event, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_and_unknown_types_are_other() {
        let e = parse_event(
            r#"{"type":"StasisStart","application":"sidecall","timestamp":"x","args":["flow=order_status"],
                "channel":{"id":"1.2","name":"Local/100@t-00000001;2","state":"Ring","caller":{"name":"","number":"100"},
                "dialplan":{"context":"t","exten":"100","priority":2}}}"#,
        )
        .unwrap();
        match e {
            Event::StasisStart { args, channel } => {
                assert_eq!(args, vec!["flow=order_status"]);
                assert_eq!(channel.caller.number, "100");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_event(r#"{"type":"PlaybackStarted","playback":{}}"#).unwrap(),
            Event::Other
        );
        assert!(parse_event("{not json").is_err());
        assert!(
            parse_event(r#"{"type":"StasisStart"}"#).is_err(),
            "a StasisStart without channel is an error"
        );
    }

    #[test]
    fn error_statuses_map_to_meanings() {
        assert!(
            matches!(AriError::from_status(404, r#"{"message":"Channel not found"}"#.into()), AriError::NotFound(m) if m == "Channel not found")
        );
        assert!(matches!(
            AriError::from_status(409, String::new()),
            AriError::NotInStasis(_)
        ));
        assert!(matches!(
            AriError::from_status(412, String::new()),
            AriError::InvalidState(_)
        ));
        assert!(matches!(
            AriError::from_status(422, String::new()),
            AriError::Unprocessable(_)
        ));
        assert!(matches!(
            AriError::from_status(401, String::new()),
            AriError::Auth(401)
        ));
        assert!(matches!(
            AriError::from_status(403, String::new()),
            AriError::Auth(403)
        ));
        assert!(matches!(
            AriError::from_status(503, String::new()),
            AriError::Unavailable
        ));
        assert!(matches!(
            AriError::from_status(500, "boom".into()),
            AriError::Http { status: 500, .. }
        ));
    }

    #[test]
    fn version_floors_for_json_control() {
        for (v, want) in [
            ("23.4.1", true),
            ("23.1.0", false),
            ("22.8.0", true),
            ("22.7.2", false),
            ("20.18.1", true),
            ("20.17.0", false),
            ("21.10.0", false),
            ("24.0.0", true),
            ("GIT-master-abc", false),
            ("GIT-master-27fb039", false),
            ("certified-22.8-cert1", false),
        ] {
            assert_eq!(supports_json_control(v), want, "{v}");
        }
    }

    #[test]
    fn mark_support_from_versions() {
        use crate::pbx::asterisk::chan_ws::MarkSupport;
        assert_eq!(mark_support("23.4.1"), MarkSupport::Yes);
        assert_eq!(mark_support("20.18.0"), MarkSupport::Yes);
        assert_eq!(mark_support("23.1.0"), MarkSupport::No);
        assert_eq!(mark_support("22.6.0"), MarkSupport::No);
        assert_eq!(mark_support("20.16.1"), MarkSupport::No);
        assert_eq!(mark_support("GIT-master-27fb039"), MarkSupport::Probe);
        assert_eq!(mark_support(""), MarkSupport::Probe);
    }

    #[test]
    fn urls_are_encoded() {
        let c = AriClient::new(
            crate::engines::http_client(),
            "http://127.0.0.1:8088/",
            "u s",
            "p&w",
            Duration::from_secs(1),
        );
        assert_eq!(
            c.events_url("sidecall"),
            "ws://127.0.0.1:8088/ari/events?app=sidecall"
        );
        assert_eq!(c.events_auth(), "Basic dSBzOnAmdw==");
    }
}
