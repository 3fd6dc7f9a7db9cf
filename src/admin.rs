//! The admin HTTP listener of `serve`: Prometheus `/metrics`, `/health` (the state, 503 while
//! the PBX control connection is down) and `/ready` (503 while down or draining), for a load
//! balancer or supervisor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::pbx::supervisor::Health;

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    let buckets = [
        0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets(&buckets)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    crate::telemetry::describe_metrics();
    Ok(handle)
}

/// `/health`: the state of the PBX control connection, the calls, and the ASR engine's load.
/// 503 while the control connection is down (no calls can arrive).
fn health_body(h: &Health) -> (StatusCode, String) {
    let up = h.pbx.is_empty() || h.control_up();
    let mut body = serde_json::json!({
        "status": if up { "ok" } else { "degraded" },
        "pbx": if h.pbx.is_empty() { "none" } else { h.pbx.as_str() },
        "control_connected": h.control_up(),
        "active_calls": h.active_calls.load(Ordering::Relaxed),
        "draining": h.draining.load(Ordering::Relaxed),
        "ready": h.ready(),
    });
    if let Some(asr) = &h.asr {
        body["asr"] = serde_json::json!({
            "max_concurrent": asr.max_concurrent,
            "in_flight": asr.in_flight.load(Ordering::Relaxed),
            "waiting": asr.waiting.load(Ordering::Relaxed),
            "last_queue_ms": asr.last_queue_ms.load(Ordering::Relaxed),
            "saturated": asr.saturated(),
        });
    }
    let code = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body.to_string())
}

/// `/ready`: whether to send this instance new calls. 503 while the control connection is down
/// or while draining after SIGTERM (a load balancer takes it out; `/health` stays about state).
fn ready_body(h: &Health) -> (StatusCode, String) {
    let ready = h.ready();
    let why = if ready {
        "ready"
    } else if h.draining.load(Ordering::Relaxed) {
        "draining"
    } else {
        "control connection down"
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        serde_json::json!({"ready": ready, "why": why}).to_string(),
    )
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let ready = health.clone();
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route(
            "/health",
            get(move || std::future::ready(health_body(&health))),
        )
        .route(
            "/ready",
            get(move || std::future::ready(ready_body(&ready))),
        );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin listener up (/metrics, /health, /ready)");
    }
    axum::serve(listener, app).await
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn health_reports_state_and_ready_says_whether_to_send_calls() {
        let h = Health {
            pbx: "asterisk".into(),
            control_connected: Arc::new(AtomicBool::new(true)),
            asr: Some(Arc::new(crate::engines::asr::EngineLoad {
                max_concurrent: 2,
                ..Default::default()
            })),
            ..Default::default()
        };
        let (code, body) = health_body(&h);
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["pbx"], "asterisk");
        assert_eq!(v["asr"]["saturated"], false);
        assert_eq!(ready_body(&h).0, StatusCode::OK);
        // Draining: still healthy, no longer ready.
        h.draining.store(true, Ordering::Relaxed);
        assert_eq!(health_body(&h).0, StatusCode::OK);
        let (code, body) = ready_body(&h);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("draining"));
        // Control connection down: neither.
        h.draining.store(false, Ordering::Relaxed);
        h.control_connected.store(false, Ordering::Relaxed);
        assert_eq!(health_body(&h).0, StatusCode::SERVICE_UNAVAILABLE);
        assert!(ready_body(&h).1.contains("control connection down"));
        // An engine with callers waiting shows as saturated.
        h.control_connected.store(true, Ordering::Relaxed);
        if let Some(a) = &h.asr {
            a.waiting.store(3, Ordering::Relaxed);
        }
        let v: serde_json::Value = serde_json::from_str(&health_body(&h).1).unwrap();
        assert_eq!(v["asr"]["saturated"], true);
        assert_eq!(v["asr"]["waiting"], 3);
    }
}
