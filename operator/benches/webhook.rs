//! `just bench`: the admission webhook on the local control plane.
//!
//! 1. The webhook alone, over HTTPS with keep-alive (wrk, from Debian's packages): an
//!    admitted create (the leader takes a queue slot) at concurrency 1, 4, 16 and 64, and one
//!    refused with 422 at 64: decisions per second and p50/p99 latency at the client. Then
//!    with the fit check on (a runner of the lane reports an 80 GiB GPU serving Wan 2.2 A14B
//!    resident, so each review also estimates the job's peak memory): the admitted create
//!    and one refused because it does not fit, at 64.
//! 2. VideoJob creates through the API server four ways, in alternating blocks of one run:
//!    (a) no admission, (b) the same fixed-parameter rules as a ValidatingAdmissionPolicy
//!    (CEL inside the API server, with the bench's VideoModels as its parameters), (c) our
//!    webhooks, for a job that sets every field (the mutating webhook's matchCondition
//!    leaves it out: one call), (c') our webhooks for a job that leaves its model's values
//!    out (two calls): creates per second, p50 and p99, and the ratios (c)/(a), (c)/(b) and
//!    (c')/(a). The other sides' jobs set every field too, so every side stores the same
//!    spec. All create into the same namespace and lane, which the operator admits; a job's
//!    `framelane.dev/bench-side` label picks what the API server runs for it (the webhooks'
//!    objectSelector leaves out `without` and `policy`, the policy's binding selects
//!    `policy`). Each block of stored creates starts once the operator has admitted the one
//!    before. First stored creates (what a user's create is), then server-side dry runs
//!    (nothing stored or admitted: the admission's share of the cheapest create the API
//!    server does). The webhook's own time per review (p50/p99/p999, from its histogram's
//!    bucket bounds) over the stored creates it answered. Per side, the CPU time per create
//!    of kube-apiserver, etcd and the operator (/proc/PID/stat, from each block's start until
//!    the operator has admitted it), and its ratios: steadier than the rates, which the
//!    2-core machine's scheduling moves by 10 % from one block to the next.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use framelane_api::{
    VideoJob,
    modellane::{MemoryMode, VaeTiling},
    wellknown::LABEL_LANE,
};
use futures::{StreamExt, stream};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams},
};
use serde_json::json;
use support::{Fixture, QueuedAt, cpu_seconds_each, eventually};

const WRK_SECONDS: u32 = 10;
const BLOCKS: usize = 8;
const PER_BLOCK: usize = 250;
const CONCURRENCY: usize = 32;
/// The label that picks a job's admission: `with` and `with-defaults` (the webhooks),
/// `without`, `policy`.
const SIDE_LABEL: &str = "framelane.dev/bench-side";
/// Each side's label, its name, and whether its jobs set every field.
const SIDES: [(&str, &str, bool); 4] = [
    ("with", "with the webhook (every field set: one call)", true),
    (
        "with-defaults",
        "with the webhook (model's values left out: two calls)",
        false,
    ),
    ("without", "without admission", true),
    ("policy", "with the ValidatingAdmissionPolicy", true),
];
/// The wrk runs of an admitted create: (threads, connections).
const WRK_ADMITTED: [(u32, u32); 4] = [(1, 1), (2, 4), (2, 16), (2, 64)];

#[tokio::main]
async fn main() -> Result<()> {
    support::remove_namespaces("whbench").await?;
    let fx = Fixture::new("whbench").await?;
    let model = fx.unbounded_anisora().await?;
    // No client certificate asked of callers: wrk cannot show one. (The API server's
    // connections are kept alive, so checking its certificate costs a handshake, not a call.)
    let (op, port) = fx.webhook_operator_open("bench", 0, &["--watch-namespace", &fx.ns.name])?;
    op.until_leading().await?;
    fx.register_webhook_with(
        port,
        json!({"objectSelector": {"matchExpressions": [
            {"key": SIDE_LABEL, "operator": "NotIn", "values": ["without", "policy"]}]}}),
    )
    .await?;
    fx.webhook_effective(&model).await?;

    let admitted = review(&fx.ns.name, json!({"model": model, "prompt": "a cat"}));
    let refused = review(
        &fx.ns.name,
        json!({"model": model, "prompt": "a cat", "steps": 20}),
    );
    let runs = WRK_ADMITTED
        .iter()
        .map(|&(t, c)| ("admitted create", admitted.clone(), t, c))
        .chain([("refused create (422)", refused, 2, 64)]);
    for (what, body, threads, connections) in runs {
        webhook_alone(&op, port, what, &body, threads, connections).await?;
    }
    fit_check_on(&fx, &op, port, &model, &admitted).await?;

    policy(&fx).await?;
    let api: Api<VideoJob> = fx.jobs_without_retries().await?;
    let (queued, watch) = support::watch_queued(api.clone());
    let mut stored = 0;
    let procs = [
        support::control_plane_pid("kube-apiserver")?,
        support::control_plane_pid("etcd")?,
        op.child.id(),
    ];
    for (what, dry_run) in [("stored", false), ("dry-run", true)] {
        let mut samples = SIDES.map(|_| Vec::new());
        let mut elapsed = SIDES.map(|_| Duration::ZERO);
        let mut cpu = SIDES.map(|_| [0.0; 3]);
        let before = buckets(&op.metrics().await?);
        for block in 0..BLOCKS {
            // Each side's turn moves one place every block, so none always follows another.
            for turn in 0..SIDES.len() {
                let side = (block + turn) % SIDES.len();
                let (label, _, every_field) = SIDES[side];
                let cpu_before = cpu_seconds_each(procs)?;
                let started = Instant::now();
                let prefix = format!("{what}-{label}-{block}");
                let latencies =
                    creates(&api, &model, (label, every_field), &prefix, dry_run).await?;
                elapsed[side] += started.elapsed();
                samples[side].extend(latencies);
                if !dry_run {
                    stored += PER_BLOCK;
                    settle(&queued, stored).await?;
                }
                let cpu_after = cpu_seconds_each(procs)?;
                for (i, spent) in cpu[side].iter_mut().enumerate() {
                    *spent += cpu_after[i] - cpu_before[i];
                }
            }
        }
        let after = buckets(&op.metrics().await?);
        let mut summary = Vec::new();
        for (side, (_, name, _)) in SIDES.iter().enumerate() {
            let lat = &mut samples[side];
            lat.sort();
            let p99 = lat[lat.len() * 99 / 100].as_secs_f64() * 1000.0;
            let rate = lat.len() as f64 / elapsed[side].as_secs_f64();
            println!(
                "{what} VideoJob creates through the API server {name}: {rate:.0}/s, p50 {:.1} ms, p99 {p99:.1} ms ({} creates, concurrency {CONCURRENCY})",
                lat[lat.len() / 2].as_secs_f64() * 1000.0,
                lat.len()
            );
            let per_create = cpu[side].map(|s| s / lat.len() as f64 * 1000.0);
            println!(
                "  CPU per create {name}: kube-apiserver {:.2} ms, etcd {:.2} ms, operator {:.2} ms, together {:.2} ms",
                per_create[0],
                per_create[1],
                per_create[2],
                per_create.iter().sum::<f64>()
            );
            summary.push((rate, p99, per_create.iter().sum::<f64>()));
        }
        let (with, defaults, without, policy) = (summary[0], summary[1], summary[2], summary[3]);
        let pairs = [
            ("webhook/none (c)/(a)", with, without),
            ("webhook/policy (c)/(b)", with, policy),
            (
                "webhook leaving defaults out/none (c')/(a)",
                defaults,
                without,
            ),
        ];
        for (ratio, side, base) in pairs {
            println!(
                "{what} creates, {ratio}: p99 latency ratio {:.2}, time per create ratio {:.2}",
                side.1 / base.1,
                base.0 / side.0
            );
        }
        println!(
            "{what} creates, CPU per create (kube-apiserver, etcd and operator together): (c)/(a) {:.2}, (c)/(b) {:.2}, (c')/(a) {:.2}",
            with.2 / without.2,
            with.2 / policy.2,
            defaults.2 / without.2
        );
        println!(
            "  the webhook's own time per review over these creates (framelane_webhook_duration_seconds, bucket bounds): p50 at most {} ms, p99 at most {} ms, p999 at most {} ms",
            own_quantile(&before, &after, 0.50) * 1000.0,
            own_quantile(&before, &after, 0.99) * 1000.0,
            own_quantile(&before, &after, 0.999) * 1000.0
        );
    }
    watch.abort();
    drop(op);
    support::remove_namespaces("whbench").await
}

/// The rules the webhook enforces from a job's VideoModel (its fixed steps and cfg, its size
/// limits, its modes), as a ValidatingAdmissionPolicy whose parameters are this bench's
/// VideoModels, bound to the jobs labelled `policy`; returns once the API server enforces it.
/// (What CEL cannot do: refuse a model that does not exist, and hold a queue slot.)
async fn policy(fx: &Fixture) -> Result<()> {
    let kind = |kind: &str| {
        let gvk = GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
        Api::<DynamicObject>::all_with(fx.client.clone(), &ApiResource::from_gvk(&gvk))
    };
    let name = format!("framelane-{}", fx.ns.name);
    let rule = |field: &str, check: &str, message: &str| {
        json!({
            "expression": format!("!variables.mine || !has(object.spec.{field}) || {check}"),
            "messageExpression": format!("'spec.{field}: ' + {message} + ' for model ' + params.metadata.name"),
            "reason": "Invalid"
        })
    };
    let policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": {support::INSTANCE_LABEL: fx.ns.name}},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel"},
            "matchConstraints": {"resourceRules": [{"apiGroups": ["framelane.dev"],
                "apiVersions": ["v1alpha1"], "operations": ["CREATE"], "resources": ["videojobs"]}]},
            "variables": [{"name": "mine", "expression": "params.metadata.name == object.spec.model"}],
            "validations": [
                rule("steps", "object.spec.steps == params.spec.fixedParameters.steps",
                    "'must be ' + string(params.spec.fixedParameters.steps)"),
                rule("cfg", "!has(params.spec.fixedParameters.cfg) || object.spec.cfg == params.spec.fixedParameters.cfg",
                    "'must be ' + string(params.spec.fixedParameters.cfg)"),
                rule("width", "object.spec.width <= params.spec.limits.maxWidth",
                    "'at most ' + string(params.spec.limits.maxWidth)"),
                rule("height", "object.spec.height <= params.spec.limits.maxHeight",
                    "'at most ' + string(params.spec.limits.maxHeight)"),
                rule("frames", "object.spec.frames <= params.spec.limits.maxFrames",
                    "'at most ' + string(params.spec.limits.maxFrames)"),
                rule("mode", "object.spec.mode in params.spec.modes", "'not offered'"),
            ]
        }
    }))?;
    kind("ValidatingAdmissionPolicy")
        .create(&PostParams::default(), &policy)
        .await?;
    let binding: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": {support::INSTANCE_LABEL: fx.ns.name}},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "paramRef": {"selector": {"matchLabels": {support::INSTANCE_LABEL: fx.ns.name}},
                "parameterNotFoundAction": "Deny"},
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": fx.ns.name}},
                "objectSelector": {"matchLabels": {SIDE_LABEL: "policy"}}
            }
        }
    }))?;
    kind("ValidatingAdmissionPolicyBinding")
        .create(&PostParams::default(), &binding)
        .await?;
    // Enforced: a dry run with a wrong `steps` is refused, naming the field.
    let api = fx.jobs_without_retries().await?;
    let model = fx.scoped("anisora");
    let probe: VideoJob = serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
        "metadata": {"name": "policy-probe", "labels": {SIDE_LABEL: "policy"}},
        "spec": {"model": model, "prompt": "probe", "steps": 20}
    }))?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually(
        60,
        "the ValidatingAdmissionPolicy to refuse a wrong steps",
        || async {
            Ok(match api.create(&dry_run, &probe).await {
                Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("spec.steps") => {
                    Some(())
                }
                _ => None,
            })
        },
    )
    .await
}

/// Waits until the watch has seen all `stored` jobs Queued, and a little for their Events:
/// each block starts on a quiet API server, not in the wake of the block before (which would
/// be the other side's).
/// One wrk run against the webhook alone, printed: at the client and its own time.
async fn webhook_alone(
    op: &support::OperatorProcess,
    port: u16,
    what: &str,
    body: &str,
    threads: u32,
    connections: u32,
) -> Result<()> {
    let before = buckets(&op.metrics().await?);
    let (rps, p50, p99) = wrk(port, body, threads, connections)?;
    let after = buckets(&op.metrics().await?);
    println!(
        "webhook over HTTPS, keep-alive, concurrency {connections}, {what}: {rps:.0} decisions/s, p50 {p50:.3} ms, p99 {p99:.3} ms (at the client: queueing included)"
    );
    println!(
        "  its own time (framelane_webhook_duration_seconds): p99 at most {} ms",
        own_quantile(&before, &after, 0.99) * 1000.0
    );
    Ok(())
}

/// The webhook alone with the fit check on: a runner of the lane reports an 80 GiB GPU
/// serving the model (Wan 2.2 A14B's shapes) resident, so every review also estimates the
/// job's peak. The default 832x480x81 fits; 1280x720x81 does not (422, with the largest size
/// that fits). The runner's Lease is removed afterwards, and the creates through the API
/// server that follow run as before, without a memory report.
async fn fit_check_on(
    fx: &Fixture,
    op: &support::OperatorProcess,
    port: u16,
    model: &str,
    admitted: &str,
) -> Result<()> {
    let lane = fx.scoped("anisora");
    let runner = fx.memory_runner(
        "bench-runner-0",
        &lane,
        model,
        MemoryMode::Resident,
        VaeTiling::Off,
    );
    fx.until_ready_runners(&lane, 1).await?;
    let too_large =
        json!({"model": model, "prompt": "a cat", "width": 1280, "height": 720, "frames": 81});
    let refuses = |refused: bool| {
        let job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": "fit-probe", "labels": {SIDE_LABEL: "with"}}, "spec": too_large.clone()
        }))
        .expect("a VideoJob");
        let api = fx.jobs.clone();
        async move {
            let dry_run = PostParams {
                dry_run: true,
                ..Default::default()
            };
            Ok(match api.create(&dry_run, &job).await {
                Err(kube::Error::Api(s))
                    if s.code == 422 && s.message.contains("the largest that fit") =>
                {
                    refused.then_some(())
                }
                Ok(_) => (!refused).then_some(()),
                _ => None,
            })
        }
    };
    eventually(30, "the fit check to refuse 1280x720x81", || refuses(true)).await?;
    for (what, body) in [
        ("admitted create, fit check on", admitted.to_owned()),
        (
            "refused create, does not fit (422)",
            review(&fx.ns.name, too_large.clone()),
        ),
    ] {
        webhook_alone(op, port, what, &body, 2, 64).await?;
    }
    drop(runner);
    Api::<Lease>::namespaced(fx.client.clone(), &fx.ns.name)
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{LABEL_LANE}={lane}")),
        )
        .await?;
    eventually(30, "the fit check to be off again", || refuses(false)).await
}

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

/// The smallest bucket bound holding the fraction `q` of the reviews between two scrapes.
fn own_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let total = counts.last().map_or(0, |c| c.1) as f64;
    counts
        .iter()
        .find(|(_, c)| *c as f64 >= total * q)
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

/// Runs wrk against the webhook with `body`, `connections` kept open by `threads`; returns
/// requests/s, p50 and p99 in ms.
fn wrk(port: u16, body: &str, threads: u32, connections: u32) -> Result<(f64, f64, f64)> {
    let script = std::env::temp_dir().join(format!("framelane-wrk-{port}.lua"));
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [==[{body}]==]\n"
        ),
    )?;
    let out = std::process::Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{connections}"),
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
/// `SIDE_LABEL: side`, setting every field the mutating webhook fills in if `every_field`
/// (the fixture model's values); returns each one's latency.
async fn creates(
    api: &Api<VideoJob>,
    model: &str,
    (side, every_field): (&str, bool),
    prefix: &str,
    dry_run: bool,
) -> Result<Vec<Duration>> {
    let params = PostParams {
        dry_run,
        ..Default::default()
    };
    let results: Vec<Result<Duration>> = stream::iter(0..PER_BLOCK)
        .map(|i| {
            let mut spec = json!({"model": model, "prompt": "a cat"});
            if every_field {
                spec.as_object_mut().expect("an object").extend(
                    json!({"steps": 8, "cfg": 5.0, "width": 832, "height": 480, "frames": 81, "fps": 16})
                        .as_object()
                        .expect("an object")
                        .clone(),
                );
            }
            let job: VideoJob = serde_json::from_value(json!({
                "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                "metadata": {"name": format!("{prefix}-{i}"), "labels": {SIDE_LABEL: side}},
                "spec": spec
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
