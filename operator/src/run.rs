//! Wires the operator together: leader election, caches, the two controllers and the
//! HTTP endpoints.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use framelane_api::{ModelLane, VideoJob, VideoModel, videojob::JobPhase, wellknown::LABEL_LANE};
use framelane_contract::{
    backoff::{WATCH_BACKOFF_MAX, watch_backoff},
    readable::{Unreadable, count_watch_error, watch_readable},
};
use framelane_core::{index::Index, queue::JobKey};
use futures::{StreamExt, TryStreamExt, future};
use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::Config as ControllerConfig,
        events::Reporter,
        reflector::{self, ObjectRef},
        watcher::{self, watcher},
    },
};
use tokio::sync::mpsc;
use tokio_stream_shim::UnboundedReceiverStream;

use crate::{
    config::{CertificateSource, Config},
    context::{Context, Counted, LeaseView, Told},
    events::{EventSink, Publisher},
    jobs, lanes,
    leader::Elector,
    metrics::{KindLabels, Metrics},
    webhook::{self, Webhook, certs::Policy},
};

mod tokio_stream_shim {
    //! An mpsc receiver as a Stream, without another dependency.
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    pub struct UnboundedReceiverStream<T>(pub tokio::sync::mpsc::UnboundedReceiver<T>);

    impl<T> futures::Stream for UnboundedReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

/// A leader-election identity for a replica started without `--identity`: the host's name
/// (a container's is its pod's) and a random suffix.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "framelane-operator".to_owned());
    format!("{host}_{:08x}", rand::random::<u32>())
}

/// Runs the operator until SIGTERM/SIGINT, or until it loses leadership (then it returns an
/// error: the process exits non-zero and its Deployment restarts it as a standby).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = framelane_contract::serve::client(config.kubeconfig.as_deref()).await?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(framelane_contract::serve::probes(
        config.metrics_addr,
        metrics.clone(),
        ready.clone(),
        "starting".into(),
    ));

    let identity = config.identity.clone().unwrap_or_else(default_identity);
    let elector = Arc::new(Elector::new(
        Api::namespaced(election_client(&config).await?, &config.namespace),
        &config.leader_lease,
        &identity,
        config.leader_lease_seconds,
        config.webhook_endpoint(),
    ));
    let (models, models_writer) = reflector::store();
    tokio::spawn(
        watch_readable::<VideoModel, _>(
            client.clone(),
            None,
            watcher::Config::default(),
            report_unreadable(&metrics, "VideoModel"),
        )
        .inspect_err(report_watch_errors(&metrics, "VideoModel"))
        .backoff(watch_backoff(WATCH_BACKOFF_MAX))
        .reflect(models_writer)
        .for_each(|_| future::ready(())),
    );
    let (webhook, mut server) = match config.webhook_addr {
        Some(addr) => {
            let (webhook, server) =
                start_webhook(&client, &config, addr, &models, &elector, &metrics).await?;
            (Some(webhook), Some(server))
        }
        None => (None, None),
    };
    // A standby is healthy and ready (serving the webhook when it has one): it is waiting
    // to lead.
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        identity,
        lease = config.leader_lease,
        "waiting to become the leader"
    );
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let released = elector.releases(Api::namespaced(client.clone(), &config.namespace));
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                drain(&ready, server.take(), config.shutdown_delay_seconds).await;
                return Ok(());
            }
            led = elector.try_lead() => match led {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
            }
        }
        // A leader that lets go on shutdown is replaced at once, not at the next retry.
        tokio::select! {
            _ = tokio::time::sleep(elector.next_try()) => {}
            _ = released.notified() => {}
        }
    }
    tracing::info!(identity, "became the leader");
    metrics.leader.set(1);
    let leases_seen = Arc::new(LeaseView::new(Timestamp::now()));
    // Ends when leadership is lost; then this replica returns an error, so that its
    // process exits non-zero and its Deployment restarts it as a standby.
    let mut leading = tokio::spawn(keep_leading(
        elector.clone(),
        metrics.clone(),
        leases_seen.clone(),
    ));
    if let Some(webhook) = webhook
        .as_ref()
        .filter(|w| w.source == CertificateSource::Operator)
    {
        tokio::spawn(webhook::secret::maintain_certificates(
            client.clone(),
            Api::namespaced(client.clone(), &config.namespace),
            config.webhook_secret.clone(),
            config.webhook_configuration.clone(),
            webhook.policy.clone(),
        ));
    }

    let delay = config.shutdown_delay_seconds;
    let work = controllers(
        client,
        config,
        metrics,
        models,
        webhook,
        elector.clone(),
        leases_seen,
    );
    tokio::pin!(work);
    let led = async {
        tokio::select! {
            result = &mut work => result,
            // The controllers go on while the webhook drains: reviews it still answers need
            // the leader's count.
            _ = &mut shutdown => tokio::select! {
                result = &mut work => result,
                _ = drain(&ready, server.take(), delay) => Ok(()),
            },
        }
    };
    tokio::select! {
        result = led => result?,
        _ = &mut leading => anyhow::bail!("lost leadership: no longer the leader"),
    }
    leading.abort();
    elector.release().await?;
    tracing::info!("released leadership; exiting");
    Ok(())
}

/// The client of the election: no retries and a read timeout, so that a renewal the API
/// server does not answer (a 503 retried for minutes, a stalled connection) fails in time
/// instead of keeping a leader that can no longer renew.
async fn election_client(config: &Config) -> anyhow::Result<Client> {
    let mut kube = framelane_contract::serve::config(config.kubeconfig.as_deref()).await?;
    let limit = crate::leader::renew_deadline(config.leader_lease_seconds);
    kube.default_retry = false;
    kube.connect_timeout = Some(limit);
    kube.read_timeout = Some(limit);
    kube.write_timeout = Some(limit);
    kube.reset_reader_on_write = true;
    Ok(Client::try_from(kube)?)
}

/// Renews the Lease. As soon as leadership is not confirmed (no renewal succeeded within the
/// renew deadline, or another replica holds the Lease), the replica stops acting as leader
/// (the webhook and the controllers check [`Elector::confirmed`] before each decision) and
/// returns, which ends [`run`] with an error.
///
/// A failed renewal, and the first to succeed after failures, tell `leases_seen` that the
/// API server was unreachable until then.
async fn keep_leading(elector: Arc<Elector>, metrics: Arc<Metrics>, leases_seen: Arc<LeaseView>) {
    let mut wait = elector.retry_interval();
    let mut failing = false;
    while let Some(until) = elector.confirmed_until() {
        tokio::time::sleep_until(until.min(Instant::now() + wait).into()).await;
        let renewed = tokio::time::timeout_at(until.into(), elector.try_lead()).await;
        if failing || !matches!(renewed, Ok(Ok(_))) {
            leases_seen.interrupted(Timestamp::now());
        }
        failing = !matches!(renewed, Ok(Ok(_)));
        match renewed {
            Ok(Ok(true)) => wait = elector.retry_interval(),
            Ok(Ok(false)) => {
                tracing::error!("another replica holds the leader Lease");
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot renew the leader Lease; retrying");
                wait = Duration::from_secs(1);
            }
            Err(_) => {}
        }
        if !elector.confirmed() {
            tracing::error!(
                renew_deadline_ms = elector.renew_deadline().as_millis() as u64,
                "could not renew the leader Lease within the renew deadline"
            );
            break;
        }
    }
    metrics.leader.set(0);
    tracing::error!("no longer the leader: stopped acting as leader; exiting");
}

/// The webhook's HTTPS server, until it is told to stop.
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

/// A clean exit: no longer ready, still serving for `delay` (the Service and the API server
/// stop sending new connections meanwhile), then the webhook stops accepting and lets open
/// connections finish what they started.
async fn drain(ready: &AtomicBool, server: Option<Server>, delay: Duration) {
    ready.store(false, Ordering::Relaxed);
    let Some(server) = server else { return };
    tracing::info!(
        seconds = delay.as_secs(),
        "shutting down: not ready; serving until new connections have moved elsewhere"
    );
    tokio::time::sleep(delay).await;
    let _ = server.stop.send(());
    let _ = server.done.await;
    tracing::info!("the webhook finished its open connections");
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Starts the admission webhook: loads its certificate (with the operator's own
/// certificates: creating it first when needed), then serves HTTPS.
async fn start_webhook(
    client: &Client,
    config: &Config,
    addr: std::net::SocketAddr,
    models: &reflector::Store<VideoModel>,
    elector: &Arc<Elector>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<Webhook>, Server)> {
    let client_ca = match &config.webhook_client_ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--webhook-client-ca {}: {e}", path.display()))?,
        ),
        None => {
            tracing::warn!(
                "no --webhook-client-ca: the webhook answers any caller that reaches its port; \
                 only a NetworkPolicy keeps others from taking slots of a lane's queue"
            );
            None
        }
    };
    let policy = Policy::for_service(
        &config.webhook_service,
        &config.namespace,
        config.webhook_ca_seconds,
        config.webhook_cert_seconds,
    );
    let webhook = Arc::new(Webhook::new(
        models.clone(),
        elector.clone(),
        metrics.clone(),
        policy,
        config.webhook_certificates,
        client_ca.is_some(),
        config.image_url_hosts.clone(),
    ));
    tokio::spawn(webhook.clone().follow_certificates(
        client.clone(),
        config.namespace.clone(),
        config.webhook_secret.clone(),
    ));
    let tls = webhook::tls::server_config(webhook.certs.clone(), client_ca.as_deref())
        .map_err(|e| anyhow::anyhow!("--webhook-client-ca: {e}"))?;
    let limits = webhook::tls::Limits {
        handshake: config.webhook_handshake_seconds,
        max_connections: connection_cap(config.webhook_max_connections),
        drain: Duration::from_secs(10),
    };
    // Listen only with a certificate: a connection before it would fail its handshake.
    while !webhook.certs.is_loaded() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listener = webhook::tls::listen(addr)
        .map_err(|e| anyhow::anyhow!("cannot serve the admission webhook on {addr}: {e}"))?;
    tracing::info!(%addr, "serving the admission webhook over HTTPS");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(webhook::tls::serve(
        listener,
        tls,
        webhook.clone().routes(),
        limits,
        metrics.webhook_connections.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    Ok((webhook, Server { stop, done }))
}

/// `wanted`, or less when the process may not open that many files: the soft limit is
/// raised to the hard one first (as Go programs do), and some files are kept for the rest.
fn connection_cap(wanted: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    let files = getrlimit(Resource::Nofile)
        .current
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let cap = wanted.min(files.saturating_sub(256)).max(1);
    if cap < wanted {
        tracing::warn!(
            wanted,
            cap,
            files,
            "the open-file limit allows fewer webhook connections than --webhook-max-connections"
        );
    }
    cap
}

/// Counts and logs an object a watch left out because this version cannot read it.
fn report_unreadable(metrics: &Arc<Metrics>, kind: &'static str) -> impl Fn(Unreadable) + use<> {
    let counter = metrics.unreadable_objects.get_or_create(&KindLabels {
        kind: kind.to_owned(),
    });
    counter.inc_by(0);
    let counter = counter.clone();
    move |u: Unreadable| {
        counter.inc();
        tracing::warn!(
            kind,
            object = u.object,
            error = u.error,
            "left out an object this operator cannot read: upgrade the operator to the version that wrote it, or fix or delete the object"
        );
    }
}

/// Runs a watch that feeds a cache in a task of its own and hands what it yields to a
/// controller through a channel, so that the cache is as current as the API server lets it
/// be however the controller takes its triggers. Polled as a trigger of the lane controller,
/// the runners' Lease and the ModelLane watches were retried a few times in two minutes of an
/// API server outage instead of every second or five, and their caches (a lane's runners,
/// its depth) stayed stale for minutes after it. (The jobs' watch stays the job
/// controller's own trigger: fed through a channel, that controller stopped reconciling
/// during an outage, for a reason not found yet.)
fn in_own_task<T: Send + 'static>(
    stream: impl futures::Stream<Item = T> + Send + 'static,
) -> UnboundedReceiverStream<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(stream.for_each(move |item| {
        let _ = tx.send(item);
        future::ready(())
    }));
    UnboundedReceiverStream(rx)
}

/// Counts and logs the errors of a watch of `kind` (`framelane_watch_errors_total`).
fn report_watch_errors(
    metrics: &Arc<Metrics>,
    kind: &'static str,
) -> impl Fn(&watcher::Error) + use<> {
    let metrics = metrics.clone();
    move |e| count_watch_error(&metrics.watch_errors, kind, e)
}

/// Runs the lane and job controllers (the leader's work) until they end.
async fn controllers(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    models: reflector::Store<VideoModel>,
    webhook: Option<Arc<Webhook>>,
    elector: Arc<Elector>,
    leases_seen: Arc<LeaseView>,
) -> anyhow::Result<()> {
    let (leases, leases_writer) = reflector::store();
    let seen = leases_seen.clone();
    let lease_stream = watcher(
        Api::<Lease>::namespaced(client.clone(), &config.namespace),
        watcher::Config::default().labels(framelane_api::wellknown::LABEL_RUNNER),
    )
    // Retried at least every second: each failure moves `leases_seen` on, so an API server
    // outage keeps runners fresh while it lasts and for a lease duration after.
    .backoff(watch_backoff(Duration::from_secs(1)))
    .inspect_err(report_watch_errors(&metrics, "Lease"))
    .inspect_err(move |_| seen.interrupted(Timestamp::now()))
    .reflect(leases_writer)
    // Deletions too: a runner's Lease goes with its pod, and the lane must notice at once
    // that it lost a runner.
    .touched_objects();
    let lease_stream = in_own_task(lease_stream);
    let lane_watch = match &config.lane_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let index = Arc::new(Mutex::new(Index::default()));
    let (job_tx, job_rx) = mpsc::unbounded_channel::<JobKey>();
    let deleted_lanes = Arc::new(Mutex::new(BTreeSet::new()));
    let (lanes, lanes_writer) = reflector::store();
    let lane_stream = watch_readable::<ModelLane, _>(
        client.clone(),
        None,
        lane_watch,
        report_unreadable(&metrics, "ModelLane"),
    )
    .inspect_err(report_watch_errors(&metrics, "ModelLane"))
    .backoff(watch_backoff(WATCH_BACKOFF_MAX))
    .reflect(lanes_writer)
    .inspect_ok({
        let (metrics, index, job_tx) = (metrics.clone(), index.clone(), job_tx.clone());
        let (deleted_lanes, client) = (deleted_lanes.clone(), client.clone());
        move |event| match event {
            watcher::Event::Delete(lane) => {
                metrics.forget_lane(&lane.name_any());
                tokio::spawn(lane_deleted(
                    client.clone(),
                    lane.name_any(),
                    deleted_lanes.clone(),
                    index.clone(),
                    job_tx.clone(),
                ));
            }
            watcher::Event::Apply(lane) | watcher::Event::InitApply(lane) => {
                let mut deleted = deleted_lanes.lock().expect("deleted lanes lock");
                deleted.remove(&lane.name_any());
            }
            _ => {}
        }
    })
    .applied_objects();
    let lane_stream = in_own_task(lane_stream);
    let (lane_tx, lane_rx) = mpsc::unbounded_channel::<String>();
    let counted = Arc::new(Mutex::new(Counted::default()));
    let (left_queue_tx, left_queue_rx) = mpsc::unbounded_channel::<VideoJob>();
    let (jobs, job_stream) = job_stream(
        &client,
        &config,
        &metrics,
        index.clone(),
        counted.clone(),
        lane_tx.clone(),
        left_queue_tx,
    );

    let reporter = Reporter {
        controller: "framelane-operator".into(),
        instance: config.identity.clone(),
    };
    let ctx = Arc::new(Context {
        events: EventSink::start(
            Publisher::new(client.clone(), reporter),
            metrics.events_dropped.clone(),
        ),
        client: client.clone(),
        config: config.clone(),
        metrics,
        lanes: lanes.clone(),
        models,
        leases,
        jobs: jobs.clone(),
        index,
        lane_changes: lane_tx,
        job_changes: job_tx,
        leader_since: Timestamp::now(),
        leases_seen,
        elector,
        counted,
        deleted_lanes,
    });
    if let Some(webhook) = webhook {
        let _ = webhook.leader.set(ctx.clone());
    }
    let pods = Api::<Pod>::namespaced(client.clone(), &config.namespace);
    let lane_controller = Controller::for_stream(lane_stream, lanes)
        .with_config(ControllerConfig::default().concurrency(4))
        .owns(pods, watcher::Config::default().labels(LABEL_LANE))
        .watches_stream(lease_stream, |lease: Lease| {
            lease
                .labels()
                .get(LABEL_LANE)
                .map(|lane| ObjectRef::<ModelLane>::new(lane))
        })
        .reconcile_on(
            UnboundedReceiverStream(lane_rx).map(|lane| ObjectRef::<ModelLane>::new(&lane)),
        )
        .run(lanes::reconcile, lanes::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));
    let job_controller = Controller::for_stream(job_stream, jobs)
        .with_config(ControllerConfig::default().concurrency(32))
        .reconcile_on(
            UnboundedReceiverStream(job_rx)
                .map(|key| ObjectRef::<VideoJob>::new(&key.name).within(&key.namespace)),
        )
        .run(jobs::reconcile, jobs::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));
    let left_queue = UnboundedReceiverStream(left_queue_rx).for_each(|job| {
        jobs::deleted_while_queued(&ctx, &job);
        future::ready(())
    });
    future::join3(lane_controller, job_controller, left_queue).await;
    Ok(())
}

/// A lane left this operator's watch: deleted, or (under a lane selector) relabelled for
/// another operator. Read without the selector: when it is gone, its queued jobs are decided
/// again now and fail `LaneNotFound`, not at the end of their wait.
async fn lane_deleted(
    client: Client,
    name: String,
    deleted_lanes: Arc<Mutex<BTreeSet<String>>>,
    index: Arc<Mutex<Index>>,
    jobs: mpsc::UnboundedSender<JobKey>,
) {
    match Api::<ModelLane>::all(client).get_opt(&name).await {
        Ok(None) => {
            deleted_lanes
                .lock()
                .expect("deleted lanes lock")
                .insert(name.clone());
            let queued = index.lock().expect("index lock").queues.queued(&name);
            for key in queued {
                let _ = jobs.send(key);
            }
        }
        Ok(Some(_)) => {
            tracing::info!(lane = %name, "lane left the lane selector; its jobs are another operator's")
        }
        Err(e) => {
            tracing::warn!(lane = %name, error = %e, "cannot tell whether a lane was deleted; its queued jobs wait")
        }
    }
}

/// The VideoJob cache and the stream that feeds it. Each watch event updates the queue
/// index first (so the index knows every job a reconcile sees) and tells the lanes whose
/// queue changed.
fn job_stream(
    client: &Client,
    config: &Config,
    metrics: &Arc<Metrics>,
    index: Arc<Mutex<Index>>,
    counted: Arc<Mutex<Counted>>,
    lanes_changed: mpsc::UnboundedSender<String>,
    left_queue: mpsc::UnboundedSender<VideoJob>,
) -> (
    reflector::Store<VideoJob>,
    impl futures::Stream<Item = Result<VideoJob, watcher::Error>> + use<>,
) {
    let (jobs, writer) = reflector::store();
    let store = jobs.clone();
    // managedFields are most of a VideoJob's bytes and nothing here reads them: the cache
    // drops them (writes leave them alone: an update without them keeps the stored ones).
    let stream = watch_readable::<VideoJob, _>(
        client.clone(),
        config.watch_namespace.as_deref(),
        watcher::Config::default(),
        report_unreadable(metrics, "VideoJob"),
    )
    .inspect_err(report_watch_errors(metrics, "VideoJob"))
    .backoff(watch_backoff(WATCH_BACKOFF_MAX))
    .modify(|job: &mut VideoJob| job.metadata.managed_fields = None)
    .reflect(writer)
    .inspect_ok(move |event| {
        let changed = {
            let mut index = index.lock().expect("index lock");
            match event {
                watcher::Event::Apply(job) | watcher::Event::InitApply(job) => {
                    index.observe(job, Timestamp::now())
                }
                watcher::Event::Delete(job) => {
                    let uid = job.metadata.uid.as_deref().unwrap_or_default();
                    let mut counted = counted.lock().expect("counted lock");
                    // A queued job leaves without a finalizer: no reconcile tells it.
                    let queued =
                        job.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Queued);
                    if queued && counted.first_time(uid, Told::Finished) {
                        let _ = left_queue.send(job.clone());
                    }
                    counted.forget(uid);
                    index.forget(job)
                }
                watcher::Event::InitDone => {
                    let all = store.state();
                    let live = all.iter().filter_map(|j| j.metadata.uid.as_deref());
                    (counted.lock().expect("counted lock")).retain(&live.collect());
                    index.rebuild(all.iter().map(|j| j.as_ref()), Timestamp::now())
                }
                watcher::Event::Init => Vec::new(),
            }
        };
        for lane in changed {
            let _ = lanes_changed.send(lane);
        }
    })
    .touched_objects();
    (jobs, stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_started_without_an_identity_get_different_ones() {
        let (a, b) = (default_identity(), default_identity());
        assert_ne!(a, b, "two replicas in one leader election");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert!(a.starts_with(&format!("{}_", host.trim())), "{a}");
    }
}
