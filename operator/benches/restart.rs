//! `just bench`: an operator restart with 10,000 VideoJobs stored, on the local control
//! plane. A first operator admits the jobs (no runner, so all stay Queued); it is killed
//! (SIGKILL) and a new one started with the same identity, as a restarted pod. Prints the
//! seconds from the new process's start to /readyz 200, to leading, and to its own count of
//! the lane's depth (`framelane_queue_depth_jobs`) being every job again; its peak and settled
//! resident memory; and how many jobs changed lane, queuedAt or queuePosition across the
//! restart (must be 0). `FRAMELANE_BENCH_JOBS` overrides the number of jobs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use framelane_api::{VideoJob, videojob::JobPhase};
use futures::{StreamExt, TryStreamExt, stream};
use kube::{
    ResourceExt,
    api::{DeleteParams, ListParams},
};
use serde_json::json;
use support::{Fixture, OperatorProcess, eventually};

const JOBS: usize = 10_000;
const CONCURRENCY: usize = 50;
/// How long the new operator runs after its depth is whole before the jobs are compared and
/// its settled memory read: time for any status writes the restart would cause.
const SETTLE: Duration = Duration::from_secs(15);

/// What a restart must not change about a queued job.
#[derive(Debug, PartialEq, Eq)]
struct Place {
    lane: Option<String>,
    queued_at: Option<String>,
    queue_position: Option<i32>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let total: usize = match std::env::var("FRAMELANE_BENCH_JOBS") {
        Ok(v) => v.trim().parse()?,
        Err(_) => JOBS,
    };
    support::remove_namespaces("restart").await?;
    let fx = Fixture::new("restart").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx
        .lane(
            "anisora",
            &[&model],
            // The CRD's largest maxDepth: enough for the default 10,000 jobs.
            json!({"queue": {"maxDepth": 10_000, "maxWaitSeconds": 86400}}),
        )
        .await?;
    let mut first = fx.operator("bench")?;
    first.until_leading().await?;

    let started = Instant::now();
    stream::iter(0..total)
        .map(|i| {
            let (fx, model) = (&fx, &model);
            async move {
                fx.create_job(format!("job-{i:05}"), model)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    println!(
        "{total} jobs created in {:.0} s ({CONCURRENCY} at a time)",
        started.elapsed().as_secs_f64()
    );
    // Positions are rewritten while admissions land out of order: the snapshot is taken
    // once two lists 5 s apart agree and every position 1..=total is held once.
    let mut previous = BTreeMap::new();
    let before = loop {
        ensure!(
            started.elapsed() < Duration::from_secs(1200),
            "the jobs were not all Queued at stable positions within 1200 s"
        );
        let places = places(&fx).await?;
        if complete(&places, total) && places == previous {
            break places;
        }
        previous = places;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    println!(
        "{total} jobs Queued with their positions {:.0} s after the first create",
        started.elapsed().as_secs_f64()
    );
    let first_rss = memory(&first, "VmRSS:")?;
    first.kill();

    let start = Instant::now();
    let op = fx.operator("bench")?;
    let depth_series = format!("framelane_queue_depth_jobs{{lane=\"{lane}\"}}");
    let (mut ready, mut leading, mut depth) = (None, None, None);
    while depth.is_none() {
        ensure!(
            start.elapsed() < Duration::from_secs(600),
            "the new operator did not count {total} jobs in the lane within 600 s"
        );
        if ready.is_none() && op.ready().await? {
            ready = Some(start.elapsed());
        }
        if ready.is_some() {
            let metrics = op.metrics().await?;
            if leading.is_none() && support::sample(&metrics, "framelane_leader") == Some(1.0) {
                leading = Some(start.elapsed());
            }
            if support::sample(&metrics, &depth_series) == Some(total as f64) {
                depth = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored_depth = fx.lane_status(&lane).await?.queue_depth;
    tokio::time::sleep(SETTLE).await;
    let peak = memory(&op, "VmHWM:")?;
    let settled = memory(&op, "VmRSS:")?;
    let after = places(&fx).await?;
    let moved: Vec<_> = before
        .iter()
        .filter(|(name, place)| after.get(*name) != Some(*place))
        .collect();
    for (name, place) in moved.iter().take(20) {
        println!(
            "  moved: {name}: {place:?} -> {:?}",
            after.get(name.as_str())
        );
    }
    let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    println!("operator restart with {total} VideoJobs Queued in one lane:");
    println!(
        "  process start → /readyz 200:            {:>8.2} s",
        secs(ready)
    );
    println!(
        "  process start → leading:                {:>8.2} s",
        secs(leading)
    );
    println!(
        "  process start → lane depth {total} counted: {:>8.2} s",
        secs(depth)
    );
    println!("  lane status queueDepth then:            {stored_depth:>8}");
    println!("  peak resident memory (VmHWM):           {peak:>8.1} MiB");
    println!(
        "  resident memory {} s later (VmRSS):     {settled:>8.1} MiB",
        SETTLE.as_secs()
    );
    println!("  first operator's VmRSS before the kill: {first_rss:>8.1} MiB");
    println!(
        "  jobs whose lane, queuedAt or queuePosition changed: {} of {total}",
        moved.len()
    );

    // The operator drops each deleted job's finalizer, so it runs until the jobs are gone.
    // One deleteCollection of 10,000 jobs can outlast the API server's 60 s request timeout
    // on 2 cores (it then closes the connection with the deletion half done): while jobs
    // remain, it is sent again.
    let cleanup = Instant::now();
    eventually(1200, "the jobs to be deleted", || async {
        if fx.list_jobs().await?.is_empty() {
            return Ok(Some(()));
        }
        if let Err(e) = fx
            .jobs
            .delete_collection(&DeleteParams::background(), &ListParams::default())
            .await
        {
            eprintln!("deleteCollection cut off ({e}); sending it again");
        }
        Ok(None)
    })
    .await?;
    println!(
        "{total} jobs deleted (deleteCollection) in {:.0} s",
        cleanup.elapsed().as_secs_f64()
    );
    drop(op);
    drop(fx);
    support::remove_namespaces("restart").await?;
    ensure!(
        moved.is_empty(),
        "{} jobs moved in the restart",
        moved.len()
    );
    ensure!(
        stored_depth == total as i32,
        "lane status queueDepth {stored_depth}, expected {total}"
    );
    Ok(())
}

/// Every job's place, by name.
async fn places(fx: &Fixture) -> Result<BTreeMap<String, Place>> {
    Ok(fx
        .list_jobs()
        .await?
        .into_iter()
        .filter(|job: &VideoJob| support::phase(job) == Some(JobPhase::Queued))
        .map(|job| {
            let status = job.status.clone().unwrap_or_default();
            let place = Place {
                lane: status.lane,
                queued_at: status.queued_at.map(|t| t.0.to_string()),
                queue_position: status.queue_position,
            };
            (job.name_any(), place)
        })
        .collect())
}

/// Whether `total` jobs are Queued, holding the positions 1..=total once each.
fn complete(places: &BTreeMap<String, Place>, total: usize) -> bool {
    let mut positions: Vec<i32> = places.values().filter_map(|p| p.queue_position).collect();
    positions.sort_unstable();
    positions.len() == total && positions.iter().copied().eq(1..=total as i32)
}

/// A memory figure of the operator process from /proc/<pid>/status, in MiB.
fn memory(op: &OperatorProcess, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", op.child.id()))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("0")
        .parse()?;
    Ok(kib / 1024.0)
}
