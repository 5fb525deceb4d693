//! `just bench`: what each API write of an admission costs the API server (issue #20, item 4).
//!
//! An admitted VideoJob costs three writes: the user's create, the operator's Queued status
//! write and the admission's Event. For N jobs each, in a namespace that no webhook and no
//! operator serves, this measures the CPU time the API server and etcd spend per write
//! (/proc/PID/stat of the local control plane's processes, before and after) and the rate at
//! concurrency 8, for: the create; the status write as the operator makes it (a whole-status
//! PUT of `transitions::admitted`, carrying the resourceVersion it decided on); the same
//! status as a JSON merge patch carrying the resourceVersion; the same PUT without
//! `metadata.managedFields`; a PUT of the phase alone (what a smaller status could save at
//! most); and the Event, posted through kube's Recorder as the operator's EventSink posts it.
//! Every status variant writes to a fresh batch of N created jobs; the variants take turns in
//! each of three rounds, and each figure is the median of its rounds (the range beside it).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{collections::BTreeMap, future::Future, time::Instant};

use anyhow::{Context, Result};
use framelane_api::{VideoJob, VideoJobStatus, videojob::LaneAssignment};
use framelane_core::transitions::{self, Admission};
use futures::{StreamExt, TryStreamExt, stream};
use jiff::Timestamp;
use kube::{
    Api, Resource,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;
use support::{Fixture, cpu_seconds_each};

const N: usize = 500;
const CONCURRENCY: usize = 8;
/// Every variant runs once per round, the rounds one after another.
const ROUNDS: usize = 3;

#[derive(Clone, Copy)]
enum StatusWrite {
    /// What the operator does (jobs/apply.rs, `replace_status`).
    Put,
    MergePatch,
    PutWithoutManagedFields,
    PutPhaseOnly,
}

#[tokio::main]
async fn main() -> Result<()> {
    support::remove_namespaces("writes").await?;
    let fx = Fixture::new("writes").await?;
    let procs = [
        support::control_plane_pid("kube-apiserver")?,
        support::control_plane_pid("etcd")?,
    ];
    let recorder = Recorder::new(
        fx.client.clone(),
        Reporter {
            controller: "framelane-bench".into(),
            instance: None,
        },
    );
    let variants = [
        (StatusWrite::Put, "status PUT, as the operator writes it"),
        (
            StatusWrite::MergePatch,
            "status merge patch with resourceVersion",
        ),
        (
            StatusWrite::PutWithoutManagedFields,
            "status PUT without managedFields",
        ),
        (StatusWrite::PutPhaseOnly, "status PUT of the phase alone"),
    ];
    let mut figures: BTreeMap<&str, Vec<Figures>> = BTreeMap::new();
    let mut batch = 0;
    for _ in 0..ROUNDS {
        for (how, what) in variants {
            let (created, create) = measured(&procs, creates(&fx.jobs, batch)).await?;
            figures.entry("create").or_default().push(create);
            let ((), write) = measured(&procs, status_writes(&fx.jobs, &created, how)).await?;
            figures.entry(what).or_default().push(write);
            if matches!(how, StatusWrite::Put) {
                let ((), event) = measured(&procs, events(&recorder, &created)).await?;
                figures.entry(EVENT).or_default().push(event);
            }
            batch += 1;
        }
    }
    println!(
        "CPU time per write and rate ({N} writes at concurrency {CONCURRENCY}; median of {ROUNDS} rounds, range in brackets):"
    );
    let order = ["create", EVENT]
        .into_iter()
        .chain(variants.map(|(_, what)| what));
    for what in order {
        let runs = &figures[what];
        let column = |f: fn(&Figures) -> f64| {
            let mut values: Vec<f64> = runs.iter().map(f).collect();
            values.sort_by(f64::total_cmp);
            (
                values[values.len() / 2],
                values[0],
                values[values.len() - 1],
            )
        };
        let (api, api_lo, api_hi) = column(|f| f.apiserver_ms);
        let (etcd, _, _) = column(|f| f.etcd_ms);
        let (rate, _, _) = column(|f| f.rate);
        println!(
            "  {what:<44} kube-apiserver {api:.2} ms [{api_lo:.2}-{api_hi:.2}], etcd {etcd:.2} ms, {rate:.0}/s"
        );
    }
    support::remove_namespaces("writes").await
}

const EVENT: &str = "Event (events.k8s.io/v1, kube's Recorder)";

/// CPU milliseconds per write of the API server and etcd, and writes per second.
struct Figures {
    apiserver_ms: f64,
    etcd_ms: f64,
    rate: f64,
}

/// Runs `work` (N writes) and measures it.
async fn measured<T>(
    procs: &[u32; 2],
    work: impl Future<Output = Result<T>>,
) -> Result<(T, Figures)> {
    let before = cpu_seconds_each(*procs)?;
    let started = Instant::now();
    let out = work.await?;
    let rate = N as f64 / started.elapsed().as_secs_f64();
    let after = cpu_seconds_each(*procs)?;
    let per_write = |i: usize| (after[i] - before[i]) / N as f64 * 1000.0;
    Ok((
        out,
        Figures {
            apiserver_ms: per_write(0),
            etcd_ms: per_write(1),
            rate,
        },
    ))
}

/// Creates N jobs (batch `batch`) as a user does, with every field set.
async fn creates(jobs: &Api<VideoJob>, batch: usize) -> Result<Vec<VideoJob>> {
    stream::iter(0..N)
        .map(|i| async move {
            let job: VideoJob = serde_json::from_value(json!({
                "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                "metadata": {"name": format!("w{batch}-{i}")},
                "spec": {"model": "anisora", "mode": "i2v", "image": "inputs/first-frame.png",
                    "prompt": "a cat surfing at dusk", "steps": 8, "width": 832, "height": 480,
                    "frames": 81, "fps": 16, "seed": 42}
            }))?;
            Ok::<_, anyhow::Error>(jobs.create(&PostParams::default(), &job).await?)
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

/// One admission status write to each job of `created`, the way `how` says.
async fn status_writes(jobs: &Api<VideoJob>, created: &[VideoJob], how: StatusWrite) -> Result<()> {
    stream::iter(created.iter().enumerate())
        .map(|(position, job)| async move {
            let admission = Admission {
                lane: "anisora".into(),
                assignment: LaneAssignment::Dedicated,
                fallback: None,
                queued_at: Timestamp::now(),
                position: i32::try_from(position)? + 1,
                seed: 42,
            };
            let status = match how {
                StatusWrite::PutPhaseOnly => VideoJobStatus {
                    phase: transitions::admitted(job, &admission, Timestamp::now()).phase,
                    ..Default::default()
                },
                _ => transitions::admitted(job, &admission, Timestamp::now()),
            };
            let name = job.metadata.name.as_deref().context("a name")?;
            match how {
                StatusWrite::MergePatch => {
                    let patch = json!({"metadata": {"resourceVersion": job.metadata.resource_version},
                        "status": status});
                    jobs.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                }
                _ => {
                    let mut next = VideoJob {
                        status: Some(status),
                        ..job.clone()
                    };
                    if matches!(how, StatusWrite::PutWithoutManagedFields) {
                        next.metadata.managed_fields = None;
                    }
                    jobs.replace_status(name, &PostParams::default(), &next).await?;
                }
            }
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

/// The admission's Event for each job of `created`.
async fn events(recorder: &Recorder, created: &[VideoJob]) -> Result<()> {
    stream::iter(created)
        .map(|job| async move {
            let event = Event {
                type_: EventType::Normal,
                reason: "Admitted".into(),
                note: Some("admitted to lane anisora at position 1".into()),
                action: "Reconcile".into(),
                secondary: None,
            };
            recorder.publish(&event, &job.object_ref(&())).await?;
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}
