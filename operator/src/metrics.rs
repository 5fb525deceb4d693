//! Prometheus metrics (prefix `framelane_`, units in names). The names are defined here and
//! nowhere else.

use std::sync::atomic::AtomicI64;

use framelane_api::modellane::FallbackCause;
use framelane_contract::readable::WatchErrorLabels;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Metric, Registry},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub lane: String,
    /// `capacity`, `quota` or `manual`.
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MovedLabels {
    pub lane: String,
    pub fallback_lane: String,
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    pub phase: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub lane: String,
    /// `allowed` or `denied`.
    pub result: String,
    /// Empty when allowed; `invalid_parameters`, `queue_overloaded`, `bad_request` or
    /// `unavailable` when denied.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedCallLabels {
    /// `api_server` (the API server's paths) or `leader` (the leader path).
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `VideoJob`, `ModelLane` or `VideoModel`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// `serving` or `ca`.
    pub certificate: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub queue_depth: Family<LaneLabels, Gauge>,
    pub queue_max_depth: Family<LaneLabels, Gauge>,
    pub ready_runners: Family<LaneLabels, Gauge>,
    pub queue_wait: Family<LaneLabels, Histogram>,
    pub jobs_finished: Family<FinishedLabels, Counter>,
    pub timeout_drops: Family<LaneLabels, Counter>,
    pub runner_lost_requeues: Family<LaneLabels, Counter>,
    pub fallback_activations: Family<FallbackLabels, Counter>,
    pub fallback_active: Family<FallbackLabels, Gauge>,
    pub fallback_duration: Family<FallbackLabels, Histogram>,
    pub fallback_jobs_moved: Family<MovedLabels, Counter>,
    pub events_dropped: Counter,
    pub unreadable_objects: Family<KindLabels, Counter>,
    pub watch_errors: Family<WatchErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub leader: Gauge<i64, AtomicI64>,
    pub admission_decisions: Family<AdmissionLabels, Counter>,
    pub webhook_duration: Histogram,
    pub webhook_connections: Gauge,
    pub webhook_refused_calls: Family<RefusedCallLabels, Counter>,
    pub certificate_expiry: Family<CertificateLabels, Gauge>,
}

/// Queue wait buckets: fine around the 30 s default `maxWaitSeconds`.
const QUEUE_WAIT_BUCKETS: [f64; 18] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 25.0, 28.0, 29.0, 30.0, 31.0, 32.0, 35.0, 45.0,
    60.0, 300.0,
];
/// Webhook buckets: its own time is well under a millisecond; a review a standby hands to
/// the leader adds a network round trip.
const WEBHOOK_BUCKETS: [f64; 11] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
];
/// Fallback episode buckets: from a second to an hour.
const FALLBACK_BUCKETS: [f64; 12] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 2700.0, 3600.0,
];
const RECONCILE_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("framelane");
        let r = &mut registry;
        Metrics {
            queue_depth: register(
                r,
                "queue_depth_jobs",
                "Unfinished (Queued or Running) jobs per lane",
            ),
            queue_max_depth: register(
                r,
                "queue_max_depth_jobs",
                "Effective maxDepth per lane: its spec.queue.maxDepth, else the operator's default",
            ),
            ready_runners: register(
                r,
                "lane_ready_runners",
                "Runners with a fresh heartbeat per lane",
            ),
            queue_wait: register_with(
                r,
                "queue_wait_seconds",
                "Time from admission to a runner starting the job",
                Family::new_with_constructor(|| Histogram::new(QUEUE_WAIT_BUCKETS)),
            ),
            jobs_finished: register(
                r,
                "jobs_finished",
                "Jobs that reached Succeeded or Failed, by phase and reason",
            ),
            timeout_drops: register(
                r,
                "queue_timeout_drops",
                "Queued jobs failed with QueueWaitTimeout because their lane had no runner for maxWaitSeconds",
            ),
            runner_lost_requeues: register(
                r,
                "runner_lost_requeues",
                "Jobs put back in the queue because their runner died",
            ),
            fallback_activations: register(
                r,
                "fallback_activations",
                "Fallback episodes a lane entered, by lane and cause",
            ),
            fallback_active: register(
                r,
                "fallback_active",
                "1 while the lane is in a fallback episode of this cause, else 0",
            ),
            fallback_duration: register_with(
                r,
                "fallback_duration_seconds",
                "Length of finished fallback episodes, by lane and cause",
                Family::new_with_constructor(|| Histogram::new(FALLBACK_BUCKETS)),
            ),
            fallback_jobs_moved: register(
                r,
                "fallback_jobs_moved",
                "Queued jobs moved from a lane to its fallback lane after maxWaitSeconds, by cause",
            ),
            events_dropped: register(
                r,
                "events_dropped",
                "Kubernetes Events not posted because too many were waiting for the API server",
            ),
            unreadable_objects: register(
                r,
                "unreadable_objects",
                "Watch events left out because the object does not parse as its kind (written by another Framelane version?)",
            ),
            watch_errors: register(
                r,
                "watch_errors",
                "Errors of the operator's watches, by kind and cause (expired: 410 Gone, the cache is listed again whole; failed: retried with backoff)",
            ),
            reconcile_duration: register_with(
                r,
                "reconcile_duration_seconds",
                "Time of one reconcile",
                Family::new_with_constructor(|| Histogram::new(RECONCILE_BUCKETS)),
            ),
            reconcile_errors: register(
                r,
                "reconcile_errors",
                "Failed reconciles by controller and error kind",
            ),
            leader: register(
                r,
                "leader",
                "1 while this replica is the leader and reconciles",
            ),
            admission_decisions: register(
                r,
                "admission_decisions",
                "Admission webhook decisions on VideoJob creates, by lane, result and reason",
            ),
            webhook_duration: register_with(
                r,
                "webhook_duration_seconds",
                "Time the admission webhook took to answer a review",
                Histogram::new(WEBHOOK_BUCKETS),
            ),
            webhook_connections: register(
                r,
                "webhook_connections",
                "Open connections to the admission webhook, those still in their TLS handshake included (past --webhook-max-connections none are accepted)",
            ),
            webhook_refused_calls: register(
                r,
                "webhook_refused_calls",
                "Calls the webhook refused unread because the caller could not prove it is the API server (path api_server) or another replica (path leader)",
            ),
            certificate_expiry: register(
                r,
                "webhook_certificate_expiry_timestamp_seconds",
                "When the webhook's serving certificate and CA expire (Unix time)",
            ),
            registry,
        }
    }
}

/// Registers a new metric under `name` and returns it.
fn register<M: Default + Clone + Metric>(registry: &mut Registry, name: &str, help: &str) -> M {
    register_with(registry, name, help, M::default())
}

/// Registers `metric` under `name` and returns it.
fn register_with<M: Clone + Metric>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl framelane_contract::serve::Metrics for Metrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Metrics {
    /// Runs one reconcile of `controller`, recording how long it took.
    pub async fn timed<T>(&self, controller: &str, reconcile: impl Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let result = reconcile.await;
        let labels = ControllerLabels {
            controller: controller.into(),
        };
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Counts a failed reconcile of `controller`.
    pub fn reconcile_error(&self, controller: &str, error: &crate::error::Error) {
        let labels = ErrorLabels {
            controller: controller.into(),
            error: error.kind().into(),
        };
        self.reconcile_errors.get_or_create(&labels).inc();
    }

    /// The series of a lane's episode of `cause`.
    pub fn fallback(lane: &str, cause: FallbackCause) -> FallbackLabels {
        FallbackLabels {
            lane: lane.into(),
            cause: cause.as_str().into(),
        }
    }

    pub fn lane(lane: &str) -> LaneLabels {
        LaneLabels { lane: lane.into() }
    }

    /// Drops a deleted lane's gauges (its depth, limit, ready runners and fallback state), so
    /// that no alert keeps firing on its last values. Its counters and histograms stay.
    pub fn forget_lane(&self, lane: &str) {
        let labels = Metrics::lane(lane);
        for gauge in [
            &self.queue_depth,
            &self.queue_max_depth,
            &self.ready_runners,
        ] {
            gauge.remove(&labels);
        }
        for cause in FallbackCause::ALL {
            self.fallback_active.remove(&Metrics::fallback(lane, cause));
        }
    }
}
