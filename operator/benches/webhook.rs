//! `just bench`: the admission webhook on the local control plane.
//!
//! 1. The webhook alone, over HTTPS with keep-alive at concurrency 64 (wrk, from Debian's
//!    packages): decisions per second and p50/p99 latency, for an admitted create (the leader
//!    takes a queue slot) and for one refused with 422.
//! 2. VideoJob creates through the API server with the webhook called and without it, in
//!    alternating blocks of one run: creates per second, p50 and p99, and the ratios. Both
//!    sides create into the same namespace and lane, which the operator admits; jobs labelled
//!    `framelane.dev/bench-side: without` do not match the webhook's objectSelector, so the
//!    API server calls no webhook for them. Each block of stored creates starts once the
//!    operator has admitted the one before. First stored creates (what a user's create is),
//!    then server-side dry runs (nothing stored or admitted: the webhook's share of the
//!    cheapest create the API server does).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use framelane_api::VideoJob;
use futures::{StreamExt, stream};
use kube::{Api, api::PostParams};
use serde_json::json;
use support::{Fixture, QueuedAt, eventually};

const WRK_SECONDS: u32 = 10;
const BLOCKS: usize = 8;
const PER_BLOCK: usize = 250;
const CONCURRENCY: usize = 32;
/// The label that keeps a job out of the webhook's objectSelector.
const SIDE_LABEL: &str = "framelane.dev/bench-side";

#[tokio::main]
async fn main() -> Result<()> {
    support::remove_namespaces("whbench").await?;
    let fx = Fixture::new("whbench").await?;
    let model = fx.unbounded_anisora().await?;
    let (op, port) = fx.webhook_operator("bench", 0, &[])?;
    op.until_leading().await?;
    fx.register_webhook_with(
        port,
        json!({"objectSelector": {"matchExpressions": [
            {"key": SIDE_LABEL, "operator": "NotIn", "values": ["without"]}]}}),
    )
    .await?;
    fx.webhook_effective(&model).await?;

    let admitted = review(&fx.ns.name, json!({"model": model, "prompt": "a cat"}));
    let refused = review(
        &fx.ns.name,
        json!({"model": model, "prompt": "a cat", "steps": 20}),
    );
    for (what, body) in [
        ("admitted create", admitted),
        ("refused create (422)", refused),
    ] {
        let before = buckets(&op.metrics().await?);
        let (rps, p50, p99) = wrk(port, &body)?;
        let after = buckets(&op.metrics().await?);
        println!(
            "webhook over HTTPS, keep-alive, concurrency 64, {what}: {rps:.0} decisions/s, p50 {p50:.3} ms, p99 {p99:.3} ms (at the client: queueing included)"
        );
        println!(
            "  its own time (framelane_webhook_duration_seconds): p99 at most {} ms",
            own_p99(&before, &after) * 1000.0
        );
    }

    let api: Api<VideoJob> = fx.jobs_without_retries().await?;
    let (queued, watch) = support::watch_queued(api.clone());
    let mut stored = 0;
    for (what, dry_run) in [("stored", false), ("dry-run", true)] {
        let mut samples = [Vec::new(), Vec::new()];
        let mut elapsed = [Duration::ZERO; 2];
        for block in 0..BLOCKS {
            for (side, label) in ["with", "without"].into_iter().enumerate() {
                let started = Instant::now();
                let prefix = format!("{what}-{label}-{block}");
                let latencies = creates(&api, &model, label, &prefix, dry_run).await?;
                elapsed[side] += started.elapsed();
                samples[side].extend(latencies);
                if !dry_run {
                    stored += PER_BLOCK;
                    settle(&queued, stored).await?;
                }
            }
        }
        let mut summary = Vec::new();
        for (side, name) in ["with the webhook", "without"].into_iter().enumerate() {
            let lat = &mut samples[side];
            lat.sort();
            let p99 = lat[lat.len() * 99 / 100].as_secs_f64() * 1000.0;
            let rate = lat.len() as f64 / elapsed[side].as_secs_f64();
            println!(
                "{what} VideoJob creates through the API server {name}: {rate:.0}/s, p50 {:.1} ms, p99 {p99:.1} ms ({} creates, concurrency {CONCURRENCY})",
                lat[lat.len() / 2].as_secs_f64() * 1000.0,
                lat.len()
            );
            summary.push((rate, p99));
        }
        println!(
            "{what} creates with/without: p99 latency ratio {:.2}, throughput ratio {:.2}",
            summary[0].1 / summary[1].1,
            summary[1].0 / summary[0].0
        );
    }
    watch.abort();
    drop(op);
    support::remove_namespaces("whbench").await
}

/// Waits until the watch has seen all `stored` jobs Queued, and a little for their Events:
/// each block starts on a quiet API server, not in the wake of the block before (which would
/// be the other side's).
async fn settle(queued: &QueuedAt, stored: usize) -> Result<()> {
    eventually(120, "the operator to admit the block", || async {
        Ok((queued.lock().unwrap().len() >= stored).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// The webhook duration histogram: (upper bound in seconds, cumulative count).
fn buckets(metrics: &str) -> Vec<(f64, u64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("framelane_webhook_duration_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            Some((
                le.parse().unwrap_or(f64::INFINITY),
                count.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// The smallest bucket bound holding 99% of the reviews between two scrapes.
fn own_p99(before: &[(f64, u64)], after: &[(f64, u64)]) -> f64 {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let total = counts.last().map_or(0, |c| c.1);
    counts
        .iter()
        .find(|(_, c)| *c * 100 >= total * 99)
        .map_or(f64::INFINITY, |c| c.0)
}

/// An AdmissionReview for creating a VideoJob with `spec` in `namespace`.
fn review(namespace: &str, spec: serde_json::Value) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000001", "operation": "CREATE",
            "namespace": namespace, "name": "wrk-job",
            "kind": {"group": "framelane.dev", "version": "v1alpha1", "kind": "VideoJob"},
            "resource": {"group": "framelane.dev", "version": "v1alpha1", "resource": "videojobs"},
            "object": {"apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                "metadata": {"name": "wrk-job", "namespace": namespace}, "spec": spec}
        }
    })
    .to_string()
}

/// Runs wrk against the webhook with `body`; returns requests/s, p50 and p99 in ms.
fn wrk(port: u16, body: &str) -> Result<(f64, f64, f64)> {
    let script = std::env::temp_dir().join(format!("framelane-wrk-{port}.lua"));
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [==[{body}]==]\n"
        ),
    )?;
    let out = std::process::Command::new("wrk")
        .args([
            "-t2",
            "-c64",
            &format!("-d{WRK_SECONDS}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("https://127.0.0.1:{port}/validate-videojob"))
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::trim))
            .with_context(|| format!("no {prefix:?} in wrk's output:\n{text}"))
    };
    Ok((
        field("Requests/sec:")?.parse()?,
        millis(field("50%")?)?,
        millis(field("99%")?)?,
    ))
}

/// wrk's latency text ("512.00us", "1.20ms", "2.00s") in milliseconds.
fn millis(text: &str) -> Result<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown latency {text:?}")
    };
    Ok(number.parse::<f64>()? * factor)
}

/// PER_BLOCK creates (server-side dry runs if `dry_run`) at CONCURRENCY, labelled
/// `SIDE_LABEL: side`; returns each one's latency.
async fn creates(
    api: &Api<VideoJob>,
    model: &str,
    side: &str,
    prefix: &str,
    dry_run: bool,
) -> Result<Vec<Duration>> {
    let params = PostParams {
        dry_run,
        ..Default::default()
    };
    let results: Vec<Result<Duration>> = stream::iter(0..PER_BLOCK)
        .map(|i| {
            let job: VideoJob = serde_json::from_value(json!({
                "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                "metadata": {"name": format!("{prefix}-{i}"), "labels": {SIDE_LABEL: side}},
                "spec": {"model": model, "prompt": "a cat"}
            }))
            .expect("a VideoJob");
            let (api, params) = (api, &params);
            async move {
                let started = Instant::now();
                api.create(params, &job).await?;
                Ok(started.elapsed())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}
