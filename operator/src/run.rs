//! Wires the operator together: leader election, caches, the two controllers and the
//! HTTP endpoints.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use framelane_api::{ModelLane, VideoJob, VideoModel, wellknown::LABEL_LANE};
use framelane_core::index::Index;
use futures::{StreamExt, TryStreamExt, future};
use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::Config as ControllerConfig,
        events::{Recorder, Reporter},
        reflector::{self, ObjectRef},
        watcher,
    },
};
use tokio::sync::mpsc;
use tokio_stream_shim::UnboundedReceiverStream;

use crate::{
    config::{CertificateSource, Config},
    context::Context,
    events::EventSink,
    jobs, lanes,
    leader::Elector,
    metrics::Metrics,
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

/// Runs the operator until SIGTERM/SIGINT, or until it loses leadership (then it exits
/// non-zero so its Deployment restarts it as a standby).
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

    let identity = config
        .identity
        .clone()
        .unwrap_or_else(|| format!("framelane-operator-{}", std::process::id()));
    let elector = Arc::new(Elector::new(
        Api::namespaced(client.clone(), &config.namespace),
        &config.leader_lease,
        &identity,
        config.leader_lease_seconds,
        config.webhook_endpoint(),
    ));
    let (models, models_writer) = reflector::store();
    tokio::spawn(
        watcher(
            Api::<VideoModel>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(models_writer)
        .for_each(|_| future::ready(())),
    );
    let webhook = match config.webhook_addr {
        Some(addr) => {
            Some(start_webhook(&client, &config, addr, &models, &elector, &metrics).await)
        }
        None => None,
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
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            led = elector.try_lead() => match led {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
            }
        }
        tokio::time::sleep(elector.retry_interval()).await;
    }
    tracing::info!(identity, "became the leader");
    metrics.leader.set(1);
    tokio::spawn(keep_leading(elector.clone(), config.leader_lease_seconds));
    if let Some(webhook) = webhook
        .as_ref()
        .filter(|w| w.source == CertificateSource::Operator)
    {
        tokio::spawn(webhook::secret::maintain_certificates(
            Api::namespaced(client.clone(), &config.namespace),
            Api::all(client.clone()),
            config.webhook_secret.clone(),
            config.webhook_configuration.clone(),
            webhook.policy.clone(),
        ));
    }

    tokio::select! {
        result = controllers(client, config, metrics, models, webhook) => result?,
        _ = &mut shutdown => {}
    }
    elector.release().await?;
    tracing::info!("released leadership; exiting");
    Ok(())
}

/// Renews the Lease; exits the process as soon as leadership cannot be confirmed within the
/// lease duration, so two leaders never write at once.
async fn keep_leading(elector: Arc<Elector>, duration: Duration) {
    let mut confirmed = Instant::now();
    loop {
        tokio::time::sleep(elector.retry_interval()).await;
        match elector.try_lead().await {
            Ok(true) => confirmed = Instant::now(),
            Ok(false) => {
                tracing::error!("another replica holds the leader Lease; exiting");
                std::process::exit(1);
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew the leader Lease"),
        }
        if confirmed.elapsed() >= duration - elector.retry_interval() {
            tracing::error!("could not renew the leader Lease in time; exiting");
            std::process::exit(1);
        }
    }
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
) -> Arc<Webhook> {
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
        config.image_url_hosts.clone(),
    ));
    tokio::spawn(webhook.clone().follow_certificates(
        client.clone(),
        config.namespace.clone(),
        config.webhook_secret.clone(),
    ));
    // Listen only with a certificate: a connection before it would fail its handshake.
    while !webhook.certs.is_loaded() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (certs, routes) = (webhook.certs.clone(), webhook.clone().routes());
    tokio::spawn(async move {
        if let Err(e) = webhook::tls::serve(addr, certs, routes).await {
            tracing::error!(%addr, error = %e, "cannot serve the admission webhook");
            std::process::exit(1);
        }
    });
    webhook
}

/// Runs the lane and job controllers (the leader's work) until they end.
async fn controllers(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    models: reflector::Store<VideoModel>,
    webhook: Option<Arc<Webhook>>,
) -> anyhow::Result<()> {
    let (leases, leases_writer) = reflector::store();
    let lease_stream = watcher(
        Api::<Lease>::namespaced(client.clone(), &config.namespace),
        watcher::Config::default().labels(framelane_api::wellknown::LABEL_RUNNER),
    )
    .default_backoff()
    .reflect(leases_writer)
    // Deletions too: a runner's Lease goes with its pod, and the lane must notice at once
    // that it lost a runner.
    .touched_objects();
    let lane_watch = match &config.lane_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let (lanes, lanes_writer) = reflector::store();
    let lane_stream = watcher(Api::<ModelLane>::all(client.clone()), lane_watch)
        .default_backoff()
        .reflect(lanes_writer)
        .applied_objects();
    let index = Arc::new(Mutex::new(Index::default()));
    let (lane_tx, lane_rx) = mpsc::unbounded_channel::<String>();
    let (jobs, job_stream) = job_stream(&client, &config, index.clone(), lane_tx.clone());

    let reporter = Reporter {
        controller: "framelane-operator".into(),
        instance: config.identity.clone(),
    };
    let ctx = Arc::new(Context {
        events: EventSink::start(
            Recorder::new(client.clone(), reporter),
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
        leader_since: Timestamp::now(),
        counted: Mutex::new(Default::default()),
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
        .run(jobs::reconcile, jobs::error_policy, ctx)
        .for_each(|_| future::ready(()));
    future::join(lane_controller, job_controller).await;
    Ok(())
}

/// The VideoJob cache and the stream that feeds it. Each watch event updates the queue
/// index first (so the index knows every job a reconcile sees) and tells the lanes whose
/// queue changed.
fn job_stream(
    client: &Client,
    config: &Config,
    index: Arc<Mutex<Index>>,
    lanes_changed: mpsc::UnboundedSender<String>,
) -> (
    reflector::Store<VideoJob>,
    impl futures::Stream<Item = Result<VideoJob, watcher::Error>> + use<>,
) {
    let api: Api<VideoJob> = match &config.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (jobs, writer) = reflector::store();
    let store = jobs.clone();
    // managedFields are most of a VideoJob's bytes and nothing here reads them: the cache
    // drops them (writes leave them alone: an update without them keeps the stored ones).
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|job: &mut VideoJob| job.metadata.managed_fields = None)
        .reflect(writer)
        .inspect_ok(move |event| {
            let changed = {
                let mut index = index.lock().expect("index lock");
                match event {
                    watcher::Event::Apply(job) | watcher::Event::InitApply(job) => {
                        index.observe(job)
                    }
                    watcher::Event::Delete(job) => index.forget(job),
                    watcher::Event::InitDone => {
                        let all = store.state();
                        index.rebuild(all.iter().map(|j| j.as_ref()))
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
