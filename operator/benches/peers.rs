//! `just bench`: Framelane side by side with Kueue on the same local control plane, in one run.
//!
//! The same bursts go to both, in alternating rounds (which side goes first alternates too):
//! N creates (200, then 1,000) from C concurrent creators (4, then 32). To Framelane:
//! VideoJobs into a lane with room for all of them (`maxDepth` 10000, no runner), through its
//! webhooks, admitted by the operator (release build) when a watch sees them `Queued`. To
//! Kueue (tests/testenv/kueue.sh: v0.17.0, its shipped configuration): suspended Jobs with the
//! queue-name label in a LocalQueue whose ClusterQueue has a quota of 10000 slots, admitted
//! when a watch sees their Workload `QuotaReserved` (an AdmissionCheck nobody answers keeps
//! them suspended, so no pod runs on either side; see tests/testenv/src/kueue.rs).
//!
//! For each round and side: create→admitted p50/p99, admissions per second (N over the time
//! from the first create to the last admission), the API server's writes per admitted job
//! (its `apiserver_request_total` for POST, PUT, PATCH and DELETE before and after, leases
//! left out), and the controller process's CPU seconds (/proc/PID/stat) and peak resident
//! memory (VmRSS sampled every 50 ms). Then a side-by-side table with Framelane/Kueue ratios.
//! `FRAMELANE_BENCH_ROUNDS=200x4,1000x32` picks other rounds.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use framelane_testenv::{
    TestEnv,
    kueue::{KueueQueue, watch_reserved},
};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, PostParams};
use support::{Fixture, cpu_seconds, eventually};

const ROUNDS: [(usize, usize); 4] = [(200, 4), (200, 32), (1000, 4), (1000, 32)];
/// The lane's `maxDepth` and the ClusterQueue's quota: room for every job of the run.
const SLOTS: u32 = 10_000;
/// After the last admission, for the Events and status writes that follow it.
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Framelane,
    Kueue,
}

/// One side's figures for one round.
struct Figures {
    rate: f64,
    p50: f64,
    p99: f64,
    writes: f64,
    by_kind: BTreeMap<String, f64>,
    cpu: f64,
    peak_mib: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds = match std::env::var("FRAMELANE_BENCH_ROUNDS") {
        Ok(v) => v
            .split(',')
            .map(|r| {
                let (n, c) = r.trim().split_once('x').context("rounds look like 200x4")?;
                Ok((n.parse()?, c.parse()?))
            })
            .collect::<Result<Vec<(usize, usize)>>>()?,
        Err(_) => ROUNDS.to_vec(),
    };
    support::remove_namespaces("peers").await?;
    support::remove_namespaces("kueuebench").await?;
    let env = TestEnv::get()?;
    let kueue_pid = env.kueue()?.pid;

    // Framelane as installed: the operator with its webhooks, which the API server calls.
    let fx = Fixture::new("peers").await?;
    let model = fx.unbounded_anisora().await?;
    let (op, port) = fx.webhook_operator("bench", 0, &[])?;
    op.until_leading().await?;
    fx.register_webhook(port).await?;
    fx.webhook_effective(&model).await?;
    let (queued, framelane_watch) = support::watch_queued(fx.jobs.clone());

    let kueue_ns = env.namespace("kueuebench").await?;
    let queue = KueueQueue::new(&kueue_ns, SLOTS).await?;
    let (reserved, kueue_watch) = watch_reserved(&kueue_ns.client, &kueue_ns.name);
    let jobs: Api<Job> = kueue_ns.api();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (fx_ref, model_ref, jobs_ref, queue_ref) = (&fx, &model, &jobs, &queue);
    let mut table = Vec::new();
    for (round, &(n, c)) in rounds.iter().enumerate() {
        let order = if round % 2 == 0 {
            [Side::Framelane, Side::Kueue]
        } else {
            [Side::Kueue, Side::Framelane]
        };
        let mut figures = HashMap::new();
        for side in order {
            let names: Vec<String> = (0..n).map(|i| format!("r{round}-{i:04}")).collect();
            let f =
                match side {
                    Side::Framelane => measure(
                        env,
                        op.child.id(),
                        &names,
                        c,
                        |name| async move { fx_ref.create_job(name, model_ref).await.map(|_| ()) },
                        || {
                            queued
                                .lock()
                                .unwrap()
                                .iter()
                                .map(|(k, v)| (k.clone(), v.0))
                                .collect()
                        },
                    )
                    .await?,
                    Side::Kueue => {
                        measure(
                            env,
                            kueue_pid,
                            &names,
                            c,
                            |name| async move {
                                let job = queue_ref.job(&name);
                                jobs_ref.create(&PostParams::default(), &job).await?;
                                Ok(())
                            },
                            || reserved.lock().unwrap().clone(),
                        )
                        .await?
                    }
                };
            let what = match side {
                Side::Framelane => "Framelane (VideoJob → Queued)",
                Side::Kueue => "Kueue (Job → Workload QuotaReserved)",
            };
            println!(
                "{what}, {n} creates, {c} creators: {:.0} admitted/s, p50 {:.1} ms, p99 {:.1} ms, {:.2} API writes per job ({}), CPU {:.2} s, peak RSS {:.1} MiB",
                f.rate,
                f.p50,
                f.p99,
                f.writes,
                f.by_kind
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                f.cpu,
                f.peak_mib
            );
            figures.insert(side == Side::Framelane, f);
        }
        table.push((n, c, figures));
    }

    println!();
    println!(
        "| N | C | admitted/s F / K | ratio | p50 ms F / K | p99 ms F / K | p99 ratio | API writes per job F / K | CPU s F / K | peak RSS MiB F / K |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (n, c, f) in &table {
        let (fl, ku) = (&f[&true], &f[&false]);
        println!(
            "| {n} | {c} | {:.0} / {:.0} | {:.2} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} / {:.1} |",
            fl.rate,
            ku.rate,
            fl.rate / ku.rate,
            fl.p50,
            ku.p50,
            fl.p99,
            ku.p99,
            fl.p99 / ku.p99,
            fl.writes,
            ku.writes,
            fl.cpu,
            ku.cpu,
            fl.peak_mib,
            ku.peak_mib
        );
    }
    println!("(F: Framelane, K: Kueue; ratios Framelane/Kueue)");

    framelane_watch.abort();
    kueue_watch.abort();
    drop(op);
    drop(queue);
    drop(kueue_ns);
    support::remove_namespaces("peers").await?;
    support::remove_namespaces("kueuebench").await
}

/// Creates `names` with `concurrency` creators through `create`, waits until `admitted`
/// (first sight of each admitted job, by name) has them all, and measures the controller
/// `pid` and the API server meanwhile.
async fn measure<C, Fut, A>(
    env: &TestEnv,
    pid: u32,
    names: &[String],
    concurrency: usize,
    create: C,
    admitted: A,
) -> Result<Figures>
where
    C: Fn(String) -> Fut,
    Fut: Future<Output = Result<()>>,
    A: Fn() -> HashMap<String, Instant>,
{
    let writes_before = writes(env)?;
    let cpu_before = cpu_seconds(pid)?;
    let peak = Arc::new(AtomicU64::new(rss_kib(pid)?));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(kib) = rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let created: Vec<(String, Instant)> = stream::iter(names.iter().cloned())
        .map(|name| {
            let create = &create;
            async move {
                let t = Instant::now();
                create(name.clone()).await.map(|_| (name, t))
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let seen = eventually(300, "every job admitted", || async {
        let seen = admitted();
        Ok(names.iter().all(|n| seen.contains_key(n)).then_some(seen))
    })
    .await?;
    tokio::time::sleep(SETTLE).await;
    sampler.abort();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let writes_after = writes(env)?;

    let mut latencies: Vec<f64> = created
        .iter()
        .map(|(name, t)| seen[name].duration_since(*t).as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).max(1) - 1];
    let last = created
        .iter()
        .map(|(name, _)| seen[name])
        .max()
        .unwrap_or(started);
    let n = names.len() as f64;
    let mut by_kind = BTreeMap::new();
    for (key, after) in &writes_after {
        let delta = after - writes_before.get(key).copied().unwrap_or(0.0);
        if delta > 0.0 {
            *by_kind.entry(key.clone()).or_insert(0.0) += delta / n;
        }
    }
    Ok(Figures {
        rate: n / last.duration_since(started).as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        writes: by_kind.values().sum(),
        by_kind,
        cpu,
        peak_mib: peak.load(Ordering::Relaxed) as f64 / 1024.0,
    })
}

/// The API server's write requests so far, by `VERB resource[/subresource]`, leases (the
/// nodes' and controllers' heartbeats) left out.
fn writes(env: &TestEnv) -> Result<HashMap<String, f64>> {
    let out = env.kubectl().args(["get", "--raw", "/metrics"]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl get --raw /metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut counts = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"'))
                .unwrap_or("")
        };
        let verb = label("verb");
        let resource = label("resource");
        if !matches!(verb, "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE") || resource == "leases" {
            continue;
        }
        let subresource = label("subresource");
        let key = if subresource.is_empty() {
            format!("{verb} {resource}")
        } else {
            format!("{verb} {resource}/{subresource}")
        };
        *counts.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(counts)
}

/// The resident memory of `pid` now, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS in /proc/PID/status")?
        .parse()
        .map_err(Into::into)
}
