//! Leader fencing on the real local control plane: a leader whose connection to the API
//! server stalls, or whose clock is 12 s off, never leaves two replicas acting as leader at
//! once, and a lane never takes more than its maxDepth jobs; a standby without a leader
//! refuses within the API server's webhook timeout.

mod support;

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use framelane_api::videojob::JobPhase;
use framelane_operator::webhook::peer::{self, PeerKeys};
use framelane_testenv::stall::StallProxy;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use support::{Fixture, OperatorProcess, RoundRobin, burst, eventually, job, sample};

/// A lane for one model with maxDepth 25 and no runner.
struct Setup {
    fx: Fixture,
    model: String,
    lane: String,
}

async fn setup(prefix: &str) -> Result<Setup> {
    let fx = Fixture::new(prefix).await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx
        .lane(
            "anisora",
            &[&model],
            json!({"queue": {"maxDepth": 25, "maxWaitSeconds": 3600}}),
        )
        .await?;
    Ok(Setup { fx, model, lane })
}

/// A proxy to the API server that the test can stall, and a kubeconfig that goes through it.
fn stall_proxy(s: &Setup) -> Result<(StallProxy, String)> {
    let name = format!("kubeconfig-{}-through-proxy", s.fx.ns.name);
    let (proxy, kubeconfig) = StallProxy::start(&s.fx.ns.env.kubeconfig, &name)?;
    Ok((proxy, kubeconfig.display().to_string()))
}

/// Operator flags that leave a lane's status unrefreshed unless something changes.
const NO_RESYNC: &[&str] = &["--lane-resync-seconds", "3600"];

/// Reads each replica's `framelane_leader` every 50 ms and remembers every moment more than
/// one of them said 1 (a replica that does not answer does not lead).
struct LeaderWatch {
    both: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaderWatch {
    fn start(replicas: &[(&str, &OperatorProcess)]) -> LeaderWatch {
        let ports: Vec<(String, u16)> = replicas
            .iter()
            .map(|(name, op)| (name.to_string(), op.metrics_port))
            .collect();
        let both = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (both.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            while !stopped.load(Ordering::SeqCst) {
                let mut leading = Vec::new();
                for (name, port) in &ports {
                    if leads(*port).await {
                        leading.push(name.clone());
                    }
                }
                if leading.len() > 1 {
                    seen.lock().unwrap().push(format!(
                        "{:.1}s: {}",
                        started.elapsed().as_secs_f64(),
                        leading.join(" and ")
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        LeaderWatch { both, stop, task }
    }

    /// Stops watching; fails if two replicas ever reported themselves leader together.
    async fn assert_one_leader_at_most(self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let both = self.both.lock().unwrap();
        ensure!(
            both.is_empty(),
            "two replicas reported themselves leader at once: {} samples, first {:?}",
            both.len(),
            both.first()
        );
        Ok(())
    }
}

/// Whether the replica with metrics on `port` reports itself leader now.
async fn leads(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scrape = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: probe\r\nconnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(1), scrape).await {
        Ok(Ok(text)) => sample(&text, "framelane_leader") == Some(1.0),
        _ => false,
    }
}

/// Points the webhooks at `operator`'s webhook `port` and waits until the API server calls
/// it there: it answers (its count of served reviews grows), or it is gone and the API
/// server says it cannot reach that port.
async fn route_to(s: &Setup, operator: &OperatorProcess, port: u16) -> Result<()> {
    s.fx.point_webhook(port).await?;
    let jobs = s.fx.jobs_without_retries().await?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let probe = job(
        "webhook-probe",
        json!({"model": s.model, "prompt": "probe", "steps": 999}),
    );
    let served = |m: &str| sample(m, "framelane_webhook_duration_seconds_count").unwrap_or(0.0);
    eventually(
        60,
        &format!("the webhook to be called on port {port}"),
        || async {
            let before = served(&operator.metrics().await.unwrap_or_default());
            let refused = jobs.create(&dry_run, &probe).await;
            let after = served(&operator.metrics().await.unwrap_or_default());
            Ok(match refused {
                Err(kube::Error::Api(s)) if s.message.contains(&format!(":{port}/")) => Some(()),
                Err(kube::Error::Api(s)) if s.code == 422 && after > before => Some(()),
                _ => None,
            })
        },
    )
    .await
}

#[tokio::test]
async fn a_leader_whose_api_server_connection_stalls_stops_before_the_standby_leads() -> Result<()>
{
    let s = setup("fence-stall").await?;
    let (proxy, kubeconfig) = stall_proxy(&s)?;
    let mut flags = vec!["--kubeconfig", kubeconfig.as_str()];
    flags.extend(NO_RESYNC);
    let (mut a, port_a) = s.fx.webhook_operator("a", 0, &flags)?;
    a.until_leading().await?;
    let (b, port_b) = s.fx.webhook_operator("b", 0, NO_RESYNC)?;
    b.until_ready().await?;
    let service = RoundRobin::start(&[(&b, port_b), (&a, port_a)]).await?;
    s.fx.register_webhook(service.port).await?;
    s.fx.webhook_effective(&s.model).await?;
    let leaders = LeaderWatch::start(&[("a", &a), ("b", &b)]);

    // The leader's connections to the API server hang: its renewals and its watches get no
    // answer, and nothing tells it so.
    proxy.freeze();
    b.until_leading().await?;
    // A burst the new leader decides, then one sent to the old leader (a Service may still
    // route the API server's connection there). The old leader's watches stopped before
    // the first burst: if it still counted, it would find the lane empty.
    let jobs = s.fx.jobs_without_retries().await?;
    route_to(&s, &b, port_b).await?;
    s.fx.webhook_effective(&s.model).await?;
    let (to_new, _) = burst(&jobs, &s.model, "new", 200).await;
    route_to(&s, &a, port_a).await?;
    let (to_old, refused) = burst(&jobs, &s.model, "old", 200).await;
    let stored = s.fx.list_jobs().await?.len();
    ensure!(
        stored <= 25,
        "lane {} holds {stored} jobs (the new leader admitted {to_new}, the old one {to_old}); \
         maxDepth is 25; refusals: {:?}",
        s.lane,
        refused.first().map(|r| &r.message)
    );
    assert_eq!(to_new, 25, "the new leader fills the lane");
    leaders.assert_one_leader_at_most().await?;
    let exited = a.until_exited().await?;
    assert!(!exited.success(), "the old leader exits non-zero: {exited}");
    let log = a.log_text();
    assert!(
        log.contains("could not renew the leader Lease within the renew deadline"),
        "{log}"
    );
    Ok(())
}

/// Debian's libfaketime (package `faketime`), which shifts the process's wall clock.
fn libfaketime() -> Result<&'static str> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .context("libfaketime is missing: install Debian's faketime package (apt-get install faketime)")
}

#[tokio::test]
async fn a_leader_whose_clock_is_12s_behind_keeps_leading_alone() -> Result<()> {
    let s = setup("fence-skew").await?;
    // Only the wall clock is off, as on a node whose NTP failed: the monotonic clock runs
    // as it does.
    let skewed = [
        ("LD_PRELOAD", libfaketime()?),
        ("FAKETIME", "-12"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let mut flags = vec!["--watch-namespace", s.fx.ns.name.as_str()];
    flags.extend(NO_RESYNC);
    let (a, port_a) = s.fx.webhook_operator_with_env("a", 0, &flags, &skewed)?;
    a.until_leading().await?;
    let lease = Api::<Lease>::namespaced(s.fx.client.clone(), &s.fx.ns.name)
        .get("framelane-operator")
        .await?;
    let renewed = lease
        .spec
        .and_then(|s| s.renew_time)
        .context("the leader Lease has no renewTime")?;
    let behind = jiff::Timestamp::now().duration_since(renewed.0);
    ensure!(
        behind >= jiff::SignedDuration::from_secs(9),
        "the leader's clock is not behind: it renewed {behind} ago"
    );

    let (b, port_b) = s.fx.webhook_operator("b", 0, NO_RESYNC)?;
    let leaders = LeaderWatch::start(&[("a", &a), ("b", &b)]);
    b.until_ready().await?;
    let service = RoundRobin::start(&[(&b, port_b), (&a, port_a)]).await?;
    s.fx.register_webhook(service.port).await?;
    s.fx.webhook_effective(&s.model).await?;
    let jobs = s.fx.jobs_without_retries().await?;
    let (admitted, refused) = burst(&jobs, &s.model, "skew", 200).await;
    assert_eq!(
        admitted,
        25,
        "refusals: {:?}",
        refused.first().map(|r| &r.message)
    );
    // Two lease durations more: a standby that misjudged the Lease would have taken it.
    tokio::time::sleep(Duration::from_secs(20)).await;
    leaders.assert_one_leader_at_most().await?;
    assert!(
        leads(a.metrics_port).await,
        "the skewed leader lost the Lease to a standby: {}",
        b.log_text()
    );
    assert!(!leads(b.metrics_port).await);
    assert_eq!(s.fx.list_jobs().await?.len(), 25, "lane {}", s.lane);
    Ok(())
}

/// POSTs a signed review to the leader path of the webhook on `port`, as a standby does, saying
/// it waits `within_ms` more for the answer; the HTTP status and body.
async fn hand_over(s: &Setup, port: u16, name: &str, within_ms: u64) -> Result<(u16, String)> {
    let secret = Api::<Secret>::namespaced(s.fx.client.clone(), &s.fx.ns.name)
        .get("framelane-webhook-tls")
        .await?;
    let key = secret
        .data
        .and_then(|d| d.get("tls.key").cloned())
        .context("the webhook Secret has no tls.key")?;
    let keys = PeerKeys::default();
    keys.load(std::str::from_utf8(&key.0)?);
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": format!("uid-{name}"), "operation": "CREATE", "namespace": s.fx.ns.name,
            "name": name,
            "kind": {"group": "framelane.dev", "version": "v1alpha1", "kind": "VideoJob"},
            "object": {"apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                "metadata": {"name": name, "namespace": s.fx.ns.name},
                "spec": {"model": s.model, "mode": "t2v", "prompt": "handed over", "width": 832,
                    "height": 480, "frames": 81, "fps": 16, "steps": 8}}}});
    let body = serde_json::to_vec(&review)?;
    let signed = keys.sign(&body)?;
    let out = tokio::process::Command::new("curl")
        .args(["-sk", "-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("{}: {signed}", peer::HEADER)])
        .args(["-H", &format!("x-framelane-answer-within-ms: {within_ms}")])
        .args(["--data-binary", &String::from_utf8(body)?])
        .arg(format!("https://127.0.0.1:{port}/leader/validate-videojob"))
        .output()
        .await?;
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
    Ok((code.trim().parse()?, body.to_string()))
}

#[tokio::test]
async fn a_review_the_standby_stopped_waiting_for_takes_no_slot_on_the_leader() -> Result<()> {
    let s = setup("fence-late").await?;
    let (leader, port) = s.fx.webhook_operator("a", 0, NO_RESYNC)?;
    leader.until_leading().await?;
    s.fx.register_webhook(port).await?;
    s.fx.webhook_effective(&s.model).await?;

    // A standby that has 2 s left gets the leader's answer (and the leader holds a slot for
    // the create it allowed); one with 0.1 s left, less than the answer's way back may take,
    // gets a refusal and the leader holds nothing for it.
    let (code, answer) = hand_over(&s, port, "in-time", 2000).await?;
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains(r#""allowed":true"#), "{answer}");
    let (code, answer) = hand_over(&s, port, "too-late", 100).await?;
    assert_eq!(code, 503, "{answer}");
    assert!(answer.contains("wait for this answer is over"), "{answer}");

    // The lane has room for 24 more: the create handed over in time holds one slot (until
    // its hold lapses), the one the standby gave up on none.
    let jobs = s.fx.jobs_without_retries().await?;
    let (admitted, refused) = burst(&jobs, &s.model, "after", 200).await;
    assert_eq!(
        admitted,
        24,
        "refusals: {:?}",
        refused.first().map(|r| &r.message)
    );
    Ok(())
}

#[tokio::test]
async fn a_standby_that_cannot_reach_the_leader_refuses_within_the_api_servers_timeout()
-> Result<()> {
    let s = setup("fence-timeout").await?;
    let (mut leader, _) = s.fx.webhook_operator("a", 0, NO_RESYNC)?;
    leader.until_leading().await?;
    let (standby, port) = s.fx.webhook_operator("b", 0, NO_RESYNC)?;
    standby.until_ready().await?;
    // The API server waits 2 s for the webhook, less than the 3 s a review waits when it is
    // not told how long it has.
    s.fx.register_webhook_with(port, json!({"timeoutSeconds": 2}))
        .await?;
    s.fx.webhook_effective(&s.model).await?;

    // The leader dies; its Lease lasts 10 s more, so the standby has no leader to hand to.
    leader.kill();
    let jobs = s.fx.jobs_without_retries().await?;
    let started = Instant::now();
    let created = jobs
        .create(
            &PostParams::default(),
            &job("orphan", json!({"model": s.model, "prompt": "a fox"})),
        )
        .await;
    let waited = started.elapsed();
    let Err(kube::Error::Api(status)) = created else {
        bail!("the create was not refused: {created:?}");
    };
    // The standby's own refusal, with its reason and what to do, not the API server's
    // "context deadline exceeded".
    assert_eq!(status.code, 503, "{status:?}");
    assert!(
        status
            .message
            .contains("framelane has no leader replica that can count the lane's queue"),
        "{}",
        status.message
    );
    assert!(waited < Duration::from_secs(2), "refused after {waited:?}");
    Ok(())
}

#[tokio::test]
async fn a_job_deleted_and_re_created_before_the_leader_saw_the_delete_is_counted() -> Result<()> {
    let s = setup("fence-names").await?;
    let (proxy, kubeconfig) = stall_proxy(&s)?;
    let mut flags = vec!["--kubeconfig", kubeconfig.as_str()];
    flags.extend(NO_RESYNC);
    let (leader, port) = s.fx.webhook_operator("a", 0, &flags)?;
    leader.until_leading().await?;
    s.fx.register_webhook(port).await?;
    s.fx.webhook_effective(&s.model).await?;
    let jobs = s.fx.jobs_without_retries().await?;
    let (admitted, _) = burst(&jobs, &s.model, "full", 25).await;
    assert_eq!(admitted, 25);
    eventually(60, "the lane to count 25", || async {
        Ok((s.fx.lane_status(&s.lane).await?.queue_depth == 25).then_some(()))
    })
    .await?;

    // The leader's watch stalls, so it sees the delete late: the create of a new job under
    // the deleted one's name meets a lane that still counts the old one. The old job's slot
    // passes to it (no second slot, so the full lane lets it in), and it counts once the
    // leader has seen the delete.
    let again = || {
        job(
            "full-0",
            json!({"model": s.model, "prompt": "the same name"}),
        )
    };
    proxy.freeze();
    let deleted = jobs.delete("full-0", &DeleteParams::default()).await;
    let created = jobs.create(&PostParams::default(), &again()).await;
    let (during, _) = burst(&jobs, &s.model, "during", 5).await;
    proxy.thaw();
    deleted?;
    let created = created.context("the new job under the deleted one's name")?;
    assert_eq!(
        during, 0,
        "the lane took more than its maxDepth while it stalled"
    );

    // Once the leader has seen the delete and the new job, the lane holds 25 again, the next
    // create is refused, and nothing failed.
    eventually(60, "the lane to count 25 with the new job", || async {
        Ok((s.fx.lane_status(&s.lane).await?.queue_depth == 25).then_some(()))
    })
    .await?;
    let (more, _) = burst(&jobs, &s.model, "more", 5).await;
    assert_eq!(more, 0, "the lane took more than its maxDepth");
    let stored = s.fx.list_jobs().await?;
    assert_eq!(stored.len(), 25);
    eventually(30, "the new job to be Queued", || async {
        let job = jobs.get("full-0").await?;
        ensure!(
            job.uid() == created.uid(),
            "the new job was replaced: {:?}",
            job.uid()
        );
        let phase = job.status.and_then(|s| s.phase);
        ensure!(
            phase != Some(JobPhase::Failed),
            "the new job failed: {phase:?}"
        );
        Ok((phase == Some(JobPhase::Queued)).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_finished_jobs_ttl_never_deletes_a_job_re_created_under_its_name() -> Result<()> {
    let s = setup("fence-ttl").await?;
    let (proxy, kubeconfig) = stall_proxy(&s)?;
    // The leader outlives the stall (it gives up after 2/3 of its Lease).
    let flags = [
        "--kubeconfig",
        kubeconfig.as_str(),
        "--leader-lease-seconds",
        "300",
    ];
    let op = OperatorProcess::start(&s.fx.ns, "op", &flags)?;
    op.until_leading().await?;
    // No webhook here: the controller fails a job with a wrong parameter at once, and a job
    // that never ran carries no finalizer, so deleting it is immediate.
    let spec = |steps: i32| json!({"model": s.model, "prompt": "a fox", "steps": steps, "ttlSecondsAfterFinished": 3});
    s.fx.jobs
        .create(&PostParams::default(), &job("fox", spec(999)))
        .await?;
    eventually(60, "the first job to fail", || async {
        let job = s.fx.jobs.get("fox").await?;
        Ok((job.status.and_then(|s| s.phase) == Some(JobPhase::Failed)).then_some(()))
    })
    .await?;

    // The leader's connection stalls before the TTL passes: its delete of the finished job
    // is held on the way. Meanwhile the user deletes the job and creates a new one under
    // its name; then the held delete arrives.
    proxy.freeze();
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.fx.jobs.delete("fox", &DeleteParams::default()).await?;
    let new =
        s.fx.jobs
            .create(&PostParams::default(), &job("fox", spec(8)))
            .await?;
    proxy.thaw();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = op.log_text();
    let now = s.fx.jobs.get_opt("fox").await?;
    assert_eq!(
        now.as_ref().and_then(|j| j.uid()),
        new.uid(),
        "the old job's TTL deleted the new job; operator log:\n{log}"
    );
    Ok(())
}
