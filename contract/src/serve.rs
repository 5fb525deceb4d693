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
    Client::try_from(config(kubeconfig).await?)
}

/// The client configuration [`client`] uses, to adjust before building a client from it.
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config, kube::Error> {
    Ok(match kubeconfig {
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
    })
}

/// A binary's metrics: a prometheus-client registry.
pub trait Metrics: Send + Sync + 'static {
    fn registry(&self) -> &prometheus_client::registry::Registry;

    /// The metrics as OpenMetrics text (what Prometheus asks for).
    fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, self.registry())
            .expect("writing to a String cannot fail");
        out
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text in the Prometheus text format (0.0.4), for scrapers and tools that do not
/// ask for OpenMetrics (promtool, curl): a counter's family takes its samples' `_total` name,
/// and the OpenMetrics-only lines (`# UNIT`, `# EOF`) go.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
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
    // Prometheus asks for OpenMetrics; anything else gets the Prometheus text format.
    let metrics = warp::path!("metrics")
        .and(warp::header::optional::<String>("accept"))
        .map(move |accept: Option<String>| {
            let openmetrics = metrics.render();
            let (content_type, body) = match accept {
                Some(a) if a.contains("application/openmetrics-text") => (OPENMETRICS, openmetrics),
                _ => (PROMETHEUS_TEXT, prometheus_text(&openmetrics)),
            };
            warp::http::Response::builder()
                .header("content-type", content_type)
                .body(body)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_keep_their_total_name_in_the_prometheus_text_format() {
        let openmetrics = "# HELP jobs Jobs done.\n# TYPE jobs counter\njobs_total{r=\"ok\"} 3\n\
            # HELP depth Queue depth.\n# TYPE depth gauge\n# UNIT depth jobs\ndepth 2\n# EOF\n";
        assert_eq!(
            prometheus_text(openmetrics),
            "# HELP jobs_total Jobs done.\n# TYPE jobs_total counter\njobs_total{r=\"ok\"} 3\n\
             # HELP depth Queue depth.\n# TYPE depth gauge\ndepth 2\n"
        );
    }
}
