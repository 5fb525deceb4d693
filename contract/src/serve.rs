//! What both binaries (operator and runner) need to run in a pod: a client from a
//! kubeconfig or the pod's account, and the `/healthz`, `/readyz`, `/metrics` endpoints.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use kube::Client;
use warp::{Filter, http::StatusCode};

/// A client from `kubeconfig` when given, else the usual inference ($KUBECONFIG,
/// ~/.kube/config, or the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, kube::Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(kube::Error::InferKubeconfig)?
        }
        None => kube::Config::infer()
            .await
            .map_err(kube::Error::InferConfig)?,
    };
    Client::try_from(config)
}

/// A binary's metrics: a prometheus-client registry, rendered as Prometheus text.
pub trait Metrics: Send + Sync + 'static {
    fn registry(&self) -> &prometheus_client::registry::Registry;

    fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, self.registry())
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/healthz` (always ok), `/readyz` (ok while `ready` is set; else `not_ready`) and
/// `/metrics` (what `metrics` renders) until the process ends.
pub async fn probes(
    addr: SocketAddr,
    metrics: Arc<impl Metrics>,
    ready: Arc<AtomicBool>,
    not_ready: String,
) -> std::io::Result<()> {
    let healthz = warp::path!("healthz").map(|| "ok".to_string());
    let readyz = warp::path!("readyz").map(move || {
        if ready.load(Ordering::Relaxed) {
            warp::reply::with_status("ok".to_string(), StatusCode::OK)
        } else {
            warp::reply::with_status(not_ready.clone(), StatusCode::SERVICE_UNAVAILABLE)
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
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    warp::serve(warp::get().and(healthz.or(readyz).or(metrics)))
        .incoming(listener)
        .run()
        .await;
    Ok(())
}
