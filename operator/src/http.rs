//! `/healthz`, `/readyz` and `/metrics`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use warp::{Filter, http::StatusCode};

use crate::metrics::Metrics;

/// Serves the probes and metrics until the process ends. `ready` turns /readyz green.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let healthz = warp::path!("healthz").map(|| "ok".to_string());
    let readyz = warp::path!("readyz").map(move || {
        if ready.load(Ordering::Relaxed) {
            warp::reply::with_status("ok".to_string(), StatusCode::OK)
        } else {
            warp::reply::with_status("not ready".to_string(), StatusCode::SERVICE_UNAVAILABLE)
        }
    });
    let metrics = warp::path!("metrics").map(move || {
        warp::http::Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(metrics.render())
            .expect("a static header is valid")
    });
    let routes = warp::get().and(healthz.or(readyz).or(metrics));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    warp::serve(routes).incoming(listener).run().await;
    Ok(())
}
