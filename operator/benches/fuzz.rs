//! `just bench`: a long fuzz run, outside CI, of what the operator and the runners read from
//! the API server. No cluster: the pure paths only.
//!
//! - AdmissionReviews, from the example jobs and then mutated (wrong types, huge numbers,
//!   unicode, nested junk, removed and added keys, flipped bytes, truncations), through the
//!   webhook's `check` and answer, and a readable job's spec through `defaults::missing`.
//! - VideoJobs with mutated statuses, through the status transitions the runner contract and
//!   the operator write (`claimed`, `progressed`, `completed`, `failed`, `requeued`, `moved`).
//!
//! Counts cases, accepted, refused by reason, broken invariants and panics; exits non-zero
//! on any panic or broken invariant. Cases: the first argument or `FUZZ_CASES` (default
//! 1,000,000); seed: `FUZZ_SEED` (default drawn, always printed).

use std::{
    collections::BTreeMap,
    panic::{self, AssertUnwindSafe},
    sync::{Arc, Mutex},
    time::Instant,
};

use framelane_api::{
    VideoJob, VideoModel,
    modellane::FallbackCause,
    reasons::JobReason,
    videojob::{MemoryReport, Output, Progress},
};
use framelane_core::{defaults::missing, transitions};
use framelane_operator::webhook::{check, review};
use jiff::Timestamp;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde::Deserialize;
use serde_json::{Value, json};

/// The VideoJob spec fields a review's object carries; each is also mutated on its own.
const SPEC_FIELDS: &[&str] = &[
    "model",
    "mode",
    "prompt",
    "negativePrompt",
    "image",
    "width",
    "height",
    "frames",
    "fps",
    "steps",
    "cfg",
    "seed",
];

/// The other keys the webhook and the transitions read, so mutations hit them often.
const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "request",
    "uid",
    "operation",
    "object",
    "metadata",
    "name",
    "namespace",
    "dryRun",
    "group",
    "spec",
    "ttlSecondsAfterFinished",
    "deadlineSeconds",
    "status",
    "phase",
    "lane",
    "queuedAt",
    "startedAt",
    "finishedAt",
    "attempts",
    "progress",
    "conditions",
    "lastTransitionTime",
];

const STRINGS: &[&str] = &[
    "",
    " ",
    "\t\n",
    "anisora",
    "phr00t",
    "t2v",
    "i2v",
    "CREATE",
    "UPDATE",
    "VideoJob",
    "framelane.dev",
    "admission.k8s.io/v1",
    "AdmissionReview",
    "Queued",
    "Running",
    "Succeeded",
    "Failed",
    "ü",
    "🎬🐈",
    "\u{202e}evil",
    "\u{0}",
    "\u{feff}",
    "../../etc/passwd",
    "/abs/path.png",
    "inputs/ok.png",
    "http://images.example.com/a.png",
    "https://user:pw@images.example.com/a.png",
    "http://169.254.169.254/latest",
    "https://IMAGES.example.com:8443/a.png",
    "file:///etc/shadow",
    "http://[::1]/x",
    "9999-12-31T23:59:59Z",
    "9999-12-30T22:00:00.999999999Z",
    "0000-01-01T00:00:00Z",
    "2030-01-02T03:04:05.678901Z",
    "-1",
    "1e999",
    "NaN",
];

const INTS: &[i64] = &[
    0,
    1,
    -1,
    4,
    8,
    16,
    81,
    255,
    256,
    832,
    4096,
    4097,
    1025,
    120,
    121,
    1000,
    1001,
    4_294_967_295,
    4_294_967_296,
    i32::MAX as i64,
    i32::MIN as i64,
    i64::MAX,
    i64::MIN,
];

const FLOATS: &[f64] = &[
    0.0, -0.0, 1.0, 1.5, 30.0, 30.000001, -1.0, 1e308, -1e308, 5e-324,
];

/// Byte strings spliced into a serialized body.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"1e999999",
    b"-",
    b"18446744073709551616",
    b"\xff",
    b"\xc3",
    b"\xf0\x9f",
    b"\"uid\":\"x\",",
];

/// What the run counted.
#[derive(Default)]
struct Counts {
    reviews: u64,
    accepted: u64,
    refused: BTreeMap<String, u64>,
    defaults_filled: u64,
    jobs: u64,
    unreadable_jobs: u64,
    transitions: u64,
    broken: BTreeMap<String, u64>,
    panics: u64,
}

fn main() {
    let cases: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .or_else(|| std::env::var("FUZZ_CASES").ok())
        .map_or(1_000_000, |n| {
            n.parse().expect("the case count is a number")
        });
    let seed: u64 = std::env::var("FUZZ_SEED")
        .map(|s| s.parse().expect("FUZZ_SEED is a number"))
        .unwrap_or_else(|_| rand::random());
    println!("fuzz: {cases} cases, seed {seed} (FUZZ_SEED={seed} repeats the run)");

    let first_panic = Arc::new(Mutex::new(None::<String>));
    let recorded = first_panic.clone();
    panic::set_hook(Box::new(move |info| {
        recorded
            .lock()
            .unwrap()
            .get_or_insert_with(|| info.to_string());
    }));

    let models = models();
    let reviews = example_reviews();
    let jobs = example_jobs();
    let hosts = vec!["images.example.com".to_string()];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts = Counts::default();
    let mut first_bad: Option<String> = None;
    let started = Instant::now();
    for case in 0..cases {
        let outcome = if case % 2 == 0 {
            let body = review_body(&mut rng, &reviews);
            let run = panic::catch_unwind(AssertUnwindSafe(|| {
                admission(&body, &models, &hosts, &mut counts)
            }));
            run.map_err(|_| String::from_utf8_lossy(&body).into_owned())
        } else {
            let job = job_value(&mut rng, &jobs);
            let seed = rng.random();
            let run = panic::catch_unwind(AssertUnwindSafe(|| {
                contract(&job, &mut StdRng::seed_from_u64(seed), &mut counts)
            }));
            run.map_err(|_| job.to_string())
        };
        if let Err(input) = outcome {
            counts.panics += 1;
            first_bad.get_or_insert(input);
        }
    }
    let seconds = started.elapsed().as_secs_f64();

    let Counts {
        reviews,
        accepted,
        refused,
        defaults_filled,
        jobs,
        unreadable_jobs,
        transitions,
        broken,
        panics,
    } = counts;
    println!(
        "admission reviews: {reviews}, accepted {accepted}, refused {}",
        refused.values().sum::<u64>()
    );
    for (reason, n) in &refused {
        println!("  refused {reason}: {n}");
    }
    println!("  defaults filled for {defaults_filled} readable creates");
    println!(
        "runner contract: {jobs} jobs, {unreadable_jobs} unreadable as a VideoJob, \
         {transitions} transitions"
    );
    println!("broken invariants: {}", broken.values().sum::<u64>());
    for (what, n) in &broken {
        println!("  {what}: {n}");
    }
    println!("panics: {panics}");
    println!(
        "{seconds:.1} s, {:.0} cases/s",
        (reviews + jobs) as f64 / seconds
    );
    if let Some(message) = first_panic.lock().unwrap().take() {
        println!("first panic: {message}");
    }
    if let Some(input) = first_bad {
        println!("its input: {}", truncated(&input));
    }
    if panics > 0 || !broken.is_empty() {
        std::process::exit(1);
    }
}

/// One AdmissionReview through the webhook's check, the answer it sends, and the defaults.
fn admission(body: &[u8], models: &[Arc<VideoModel>], hosts: &[String], counts: &mut Counts) {
    counts.reviews += 1;
    let answer = match check(body, Some(models), hosts) {
        Ok((request, job)) => {
            counts.accepted += 1;
            if let Some(job) = job {
                let model = models
                    .iter()
                    .find(|m| m.metadata.name.as_deref() == Some(job.spec.model.as_str()));
                if let Some(model) = model {
                    missing(&job.spec, model);
                    counts.defaults_filled += 1;
                }
            }
            review::respond(&request.uid, None)
        }
        Err((uid, denial)) => {
            let mut reason = denial.refusal.as_str().to_string();
            if let Some(cause) = denial.causes.first() {
                reason = format!("{reason} ({})", cause.field);
            }
            *counts.refused.entry(reason).or_default() += 1;
            review::respond(&uid, Some(&denial))
        }
    };
    if serde_json::from_slice::<Value>(&answer).is_err() {
        *counts
            .broken
            .entry("the webhook's answer is not JSON".into())
            .or_default() += 1;
    }
}

/// One job through every status transition, each checked for what it promises.
fn contract(job: &Value, rng: &mut StdRng, counts: &mut Counts) {
    counts.jobs += 1;
    let Ok(job) = serde_json::from_value::<VideoJob>(job.clone()) else {
        counts.unreadable_jobs += 1;
        return;
    };
    let now = timestamp(rng);
    let before = job.status.clone().unwrap_or_default();
    let mut broken = |holds: bool, what: &str| {
        counts.transitions += 1;
        if !holds {
            *counts.broken.entry(what.into()).or_default() += 1;
        }
    };

    let claimed = transitions::claimed(&job, "runner-0", "uid/nonce", now);
    broken(
        claimed.attempts.unwrap_or(0) > before.attempts.unwrap_or(0)
            || before.attempts == Some(i32::MAX),
        "claimed: attempts did not grow",
    );
    let progress = Progress {
        stage: Some(STRINGS.choose(rng).unwrap().to_string()),
        step: int(rng) as i32,
        total_steps: int(rng) as i32,
        percent: int(rng) as i32,
    };
    let progressed = transitions::progressed(&job, progress);
    let percent = progressed.progress.map(|p| p.percent);
    broken(
        percent.is_some_and(|p| (0..=100).contains(&p)),
        "progressed: percent outside 0..=100",
    );
    let output = Output {
        path: STRINGS.choose(rng).unwrap().to_string(),
        size_bytes: int(rng),
        sha256: "ab".into(),
        frames: int(rng) as i32,
        fps: int(rng) as i32,
        width: int(rng) as i32,
        height: int(rng) as i32,
        preview_path: None,
    };
    let memory = rng.random_bool(0.5).then(|| MemoryReport {
        device: "cuda:0".into(),
        peak_allocated_bytes: int(rng),
        peak_reserved_bytes: int(rng),
        after_cleanup_allocated_bytes: int(rng),
        after_cleanup_reserved_bytes: int(rng),
        ..Default::default()
    });
    let completed = transitions::completed(&job, output, memory.clone(), now);
    broken(
        transitions::is_final(completed.phase),
        "completed: not final",
    );
    let reason = *JobReason::ALL.choose(rng).unwrap();
    let message = STRINGS.choose(rng).unwrap();
    let failed = transitions::failed(&job, reason, message, memory, now);
    broken(transitions::is_final(failed.phase), "failed: not final");
    let (requeued, _) = transitions::requeued(&job, int(rng) as i32, now);
    broken(
        requeued.queued_at == before.queued_at,
        "requeued: queuedAt changed",
    );
    let cause = *FallbackCause::ALL.choose(rng).unwrap();
    let moved = transitions::moved(&job, "shared", int(rng) as i32, cause, now);
    broken(
        moved.queued_at == before.queued_at,
        "moved: queuedAt changed",
    );
}

fn models() -> Vec<Arc<VideoModel>> {
    let yaml = include_str!("../../examples/videomodels.yaml");
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Arc::new(VideoModel::deserialize(doc).expect("a VideoModel")))
        .collect()
}

/// The example jobs, each as the create review the API server sends.
fn example_reviews() -> Vec<Value> {
    let jobs = [
        include_str!("../../examples/videojob.yaml"),
        include_str!("../../examples/videojob-phr00t.yaml"),
    ];
    jobs.iter()
        .flat_map(|yaml| serde_yaml::Deserializer::from_str(yaml))
        .map(|doc| {
            let mut object = Value::deserialize(doc).expect("a YAML document");
            object["metadata"]["namespace"] = json!("fuzz");
            json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {
                    "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                    "kind": {"group": "framelane.dev", "version": "v1alpha1", "kind": "VideoJob"},
                    "resource": {"group": "framelane.dev", "version": "v1alpha1",
                        "resource": "videojobs"},
                    "name": object["metadata"]["name"], "namespace": "fuzz",
                    "operation": "CREATE", "userInfo": {"username": "alice"},
                    "object": object, "oldObject": null, "dryRun": false,
                },
            })
        })
        .collect()
}

/// Jobs in each phase, with the status the operator and the runners write.
fn example_jobs() -> Vec<Value> {
    let job = |status: Value| {
        json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": "j", "namespace": "ns", "generation": 1},
            "spec": {"model": "anisora", "prompt": "a cat"},
            "status": status,
        })
    };
    let condition = json!([{"type": "Admitted", "status": "True", "reason": "Admitted",
        "message": "", "lastTransitionTime": "2030-01-02T03:04:05Z"}]);
    vec![
        job(
            json!({"phase": "Queued", "lane": "anisora", "laneMode": "Dedicated",
            "queuedAt": "2030-01-02T03:04:05.678901Z", "queuePosition": 1, "attempts": 0,
            "seed": 42, "conditions": condition}),
        ),
        job(
            json!({"phase": "Running", "lane": "anisora", "queuedAt": "2030-01-02T03:04:05Z",
            "startedAt": "2030-01-02T03:05:00Z", "runner": "anisora-0", "attempts": 1,
            "runnerIncarnation": "uid/nonce", "conditions": condition,
            "progress": {"stage": "Denoising", "step": 3, "totalSteps": 8, "percent": 40}}),
        ),
        job(
            json!({"phase": "Succeeded", "lane": "anisora", "queuedAt": "2030-01-02T03:04:05Z",
            "finishedAt": "2030-01-02T03:09:00Z", "attempts": 1,
            "output": {"path": "ns/j/video.mp4", "sizeBytes": 1000, "sha256": "ab",
                "frames": 81, "fps": 16, "width": 832, "height": 480}}),
        ),
        job(Value::Null),
    ]
}

/// A key the webhook or the transitions read.
fn known_key(rng: &mut StdRng) -> &'static str {
    let i = rng.random_range(0..SPEC_FIELDS.len() + KEYS.len());
    SPEC_FIELDS
        .get(i)
        .copied()
        .unwrap_or_else(|| KEYS[i - SPEC_FIELDS.len()])
}

/// A review body: an example, mutated as a JSON tree, then often as bytes.
fn review_body(rng: &mut StdRng, reviews: &[Value]) -> Vec<u8> {
    if rng.random_ratio(1, 50) {
        return serde_json::to_vec(&junk(rng, 4)).unwrap();
    }
    let mut review = reviews.choose(rng).unwrap().clone();
    if rng.random_ratio(1, 3) {
        let field = *SPEC_FIELDS.choose(rng).unwrap();
        review["request"]["object"]["spec"][field] = junk(rng, 0);
    }
    for _ in 0..rng.random_range(0..4) {
        mutate(&mut review, rng);
    }
    let mut body = serde_json::to_vec(&review).unwrap();
    if rng.random_ratio(1, 3) {
        for _ in 0..rng.random_range(1..4) {
            mutate_bytes(&mut body, rng);
        }
    }
    body
}

/// A job: an example with its status (mostly) mutated.
fn job_value(rng: &mut StdRng, jobs: &[Value]) -> Value {
    let mut job = jobs.choose(rng).unwrap().clone();
    for _ in 0..rng.random_range(0..4) {
        if rng.random_ratio(3, 4) && job["status"].is_object() {
            mutate(&mut job["status"], rng);
        } else {
            mutate(&mut job, rng);
        }
    }
    job
}

/// Replaces, removes or adds one node somewhere in `value`.
fn mutate(value: &mut Value, rng: &mut StdRng) {
    let descend = rng.random_ratio(3, 4);
    match value {
        Value::Object(map) if descend && !map.is_empty() => {
            let key = map
                .keys()
                .nth(rng.random_range(0..map.len()))
                .unwrap()
                .clone();
            match rng.random_range(0..8) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    map.insert(known_key(rng).to_string(), junk(rng, 2));
                }
                _ => mutate(map.get_mut(&key).unwrap(), rng),
            }
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let i = rng.random_range(0..items.len());
            mutate(&mut items[i], rng);
        }
        _ => *value = junk(rng, 2),
    }
}

fn mutate_bytes(body: &mut Vec<u8>, rng: &mut StdRng) {
    if body.is_empty() {
        return;
    }
    let at = rng.random_range(0..body.len());
    match rng.random_range(0..4) {
        0 => body[at] ^= 1 << rng.random_range(0..8),
        1 => body.truncate(at),
        2 => {
            let token = TOKENS.choose(rng).unwrap();
            body.splice(at..at, token.iter().copied());
        }
        _ => {
            let end = rng.random_range(at..body.len());
            let copy = body[at..end].to_vec();
            body.splice(at..at, copy);
        }
    }
}

/// A value of any type: edge numbers, odd strings, nested arrays and objects.
fn junk(rng: &mut StdRng, depth: u32) -> Value {
    let kinds = if depth == 0 { 5 } else { 7 };
    match rng.random_range(0..kinds) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(int(rng)),
        3 => json!(FLOATS.choose(rng).unwrap()),
        4 => match rng.random_range(0..4) {
            0 => json!("x".repeat(rng.random_range(1000..5000))),
            1 => json!(
                (0..rng.random_range(0..20))
                    .map(|_| rng.random::<char>())
                    .collect::<String>()
            ),
            _ => json!(STRINGS.choose(rng).unwrap()),
        },
        5 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| junk(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.random_range(0..4))
                .map(|_| (known_key(rng).to_string(), junk(rng, depth - 1)))
                .collect(),
        ),
    }
}

fn int(rng: &mut StdRng) -> i64 {
    if rng.random_ratio(1, 4) {
        rng.random()
    } else {
        *INTS.choose(rng).unwrap()
    }
}

/// A time anywhere jiff can hold, its ends included.
fn timestamp(rng: &mut StdRng) -> Timestamp {
    match rng.random_range(0..4) {
        0 => Timestamp::MIN,
        1 => Timestamp::MAX,
        _ => {
            let (min, max) = (Timestamp::MIN.as_second(), Timestamp::MAX.as_second());
            Timestamp::from_second(rng.random_range(min..=max)).unwrap()
        }
    }
}

fn truncated(text: &str) -> String {
    text.chars().take(2000).collect()
}
