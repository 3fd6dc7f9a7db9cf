//! The admin HTTP listener of `serve`: Prometheus `/metrics` and `/health`.

use std::net::SocketAddr;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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

/// Serves the admin endpoints on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, handle: PrometheusHandle) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route(
            "/health",
            get(|| async { (StatusCode::OK, "{\"status\":\"ok\"}") }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin listener up (/metrics, /health)");
    axum::serve(listener, app).await
}
