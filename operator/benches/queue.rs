//! `just bench`: VideoJobs created as fast as the API server takes them, against the
//! operator (release build) on the local control plane. For each round of 1,000 jobs (8
//! creators, then 32) prints create→Queued latency (p50/p99) and jobs admitted per second;
//! then the operator's resident memory with 10,000 VideoJobs in its caches.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use futures::{StreamExt, TryStreamExt, stream};
use support::{Fixture, QueuedAt, eventually};

const FIRST: usize = 1_000;
const TOTAL: usize = 10_000;
/// Concurrent creators of each round of FIRST jobs; `FRAMELANE_BENCH_CONCURRENCY` (say
/// `8,32`) overrides them. 8 is about where the API server takes creates as fast as it can;
/// more creators only queue inside it.
const CONCURRENCY: [usize; 2] = [8, 32];

#[tokio::main]
async fn main() -> Result<()> {
    let rounds: Vec<usize> = match std::env::var("FRAMELANE_BENCH_CONCURRENCY") {
        Ok(v) => v
            .split(',')
            .map(|n| n.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => CONCURRENCY.to_vec(),
    };
    support::remove_namespaces("bench").await?;
    let fx = Fixture::new("bench").await?;
    let model = fx.unbounded_anisora().await?;
    let op = fx.operator("bench")?;
    op.until_leading().await?;

    let (queued_at, watch) = support::watch_queued(fx.jobs.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    for (round, concurrency) in rounds.iter().copied().enumerate() {
        let first = round * FIRST;
        measure(&fx, &model, &queued_at, first..first + FIRST, concurrency).await?;
        // Let the operator's Events drain, so the next round starts on a quiet API server.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    let concurrency = rounds.iter().copied().max().unwrap_or(1);
    stream::iter(rounds.len() * FIRST..TOTAL)
        .map(|i| {
            let fx = &fx;
            let model = &model;
            async move {
                fx.create_job(format!("job-{i:05}"), model)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    eventually(600, "10,000 jobs Queued", || async {
        Ok((queued_at.lock().unwrap().len() >= TOTAL).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", op.child.id()))?;
    let rss_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("0")
        .parse()?;
    println!(
        "operator resident memory with {TOTAL} VideoJobs cached: {:.1} MiB",
        rss_kib / 1024.0
    );
    let metrics = op.metrics().await?;
    println!(
        "Events dropped (more than the sink's queue waiting): {}",
        support::sample(&metrics, "framelane_events_dropped_total").unwrap_or(f64::NAN)
    );
    watch.abort();
    drop(op);
    support::remove_namespaces("bench").await
}

/// Creates the jobs `range` with `concurrency` creators, waits until the watch has seen them
/// all Queued, and prints create→Queued latency and rates.
async fn measure(
    fx: &Fixture,
    model: &str,
    queued_at: &QueuedAt,
    range: std::ops::Range<usize>,
    concurrency: usize,
) -> Result<()> {
    let count = range.len();
    let end = range.end;
    let started = Instant::now();
    let created: Vec<(String, Instant, SystemTime, Duration)> = stream::iter(range)
        .map(|i| async move {
            let name = format!("job-{i:05}");
            let (t, wall) = (Instant::now(), SystemTime::now());
            fx.create_job(name.clone(), model)
                .await
                .map(|_| (name, t, wall, t.elapsed()))
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let create_secs = started.elapsed().as_secs_f64();
    eventually(120, "the jobs Queued", || async {
        Ok((queued_at.lock().unwrap().len() >= end).then_some(()))
    })
    .await?;
    let seen = queued_at.lock().unwrap().clone();
    let millis = |d: Duration| d.as_secs_f64() * 1000.0;
    // Where each job's time went, by this machine's clock (the operator's status.queuedAt
    // is when it took the job's slot): the create request, then until the operator reserved
    // the slot (the watch event reaching it, a reconcile), then until the Queued status was
    // seen (the status write and its watch event).
    let (mut latencies, mut creates, mut to_reserve, mut to_seen) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (name, t, wall, took) in &created {
        let (seen_at, reserved) = seen[name];
        let total = seen_at.duration_since(*t);
        let reserved_after = reserved.duration_since(*wall).unwrap_or_default();
        latencies.push(millis(total));
        creates.push(millis(*took));
        to_reserve.push(millis(reserved_after.saturating_sub(*took)));
        to_seen.push(millis(total.saturating_sub(reserved_after)));
    }
    for v in [&mut latencies, &mut creates, &mut to_reserve, &mut to_seen] {
        v.sort_by(f64::total_cmp);
    }
    let last_queued = created
        .iter()
        .map(|(name, ..)| seen[name].0)
        .max()
        .unwrap_or(started);
    let pct_of = |v: &[f64], p: f64| v[((v.len() as f64 * p).ceil() as usize).min(v.len()) - 1];
    let pct = |p: f64| pct_of(&latencies, p);
    println!("create→Queued over {count} jobs (concurrency {concurrency}):");
    println!(
        "  creates/s accepted by the API server: {:.0}",
        count as f64 / create_secs
    );
    println!(
        "  jobs admitted (Queued) per second:    {:.0}",
        count as f64 / last_queued.duration_since(started).as_secs_f64()
    );
    println!(
        "  latency p50: {:.1} ms   p99: {:.1} ms   max: {:.1} ms",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    for (what, v) in [
        ("the create request", &creates),
        ("answered → slot taken", &to_reserve),
        ("slot taken → seen Queued", &to_seen),
    ] {
        println!(
            "  of which {what:<25} p50: {:.1} ms   p99: {:.1} ms",
            pct_of(v, 0.50),
            pct_of(v, 0.99)
        );
    }
    Ok(())
}
