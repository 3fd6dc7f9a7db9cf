//! The admin HTTP listener of `serve`: Prometheus `/metrics` and `/health` (503 while the PBX
//! control connection is down, so a load balancer or supervisor can see it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::pbx::asterisk::app::AsteriskHealth;

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

fn health_body(asterisk: Option<&AsteriskHealth>) -> (StatusCode, String) {
    match asterisk {
        None => (StatusCode::OK, "{\"status\":\"ok\"}".to_string()),
        Some(h) => {
            let up = h.ari_connected.load(Ordering::Relaxed);
            let body = serde_json::json!({
                "status": if up { "ok" } else { "degraded" },
                "ari_connected": up,
                "active_calls": h.active_calls.load(Ordering::Relaxed),
                "draining": h.draining.load(Ordering::Relaxed),
            });
            (
                if up {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                body.to_string(),
            )
        }
    }
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    asterisk: Option<Arc<AsteriskHealth>>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route(
            "/health",
            get(move || std::future::ready(health_body(asterisk.as_deref()))),
        );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin listener up (/metrics, /health)");
    }
    axum::serve(listener, app).await
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
