//! What every reconcile shares: the client, caches, the queue index, metrics and Events, and
//! the facts the core's decisions take, gathered from the caches.

use std::{
    borrow::Borrow,
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use framelane_api::{
    ModelLane, VideoJob, VideoModel,
    wellknown::{ANNOTATION_MEMORY, LABEL_LANE},
};
use framelane_core::{
    availability::{Availability, availability, fresh_until},
    depth::{Occupancy, QueueLimits},
    index::Index,
    lifecycle::{FallbackFacts, LaneFacts},
    memory::{DoesNotFit, JobSize, RunnerMemory, fits},
    queue::JobKey,
    routing::{episode_cause, route},
    timeouts::DEFAULT_JOB_DEADLINE,
};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Client, ResourceExt,
    runtime::reflector::{ObjectRef, Store},
};
use tokio::sync::mpsc;

use crate::{config::Config, events::EventSink, leader::Elector, metrics::Metrics};

pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
    pub lanes: Store<ModelLane>,
    pub models: Store<VideoModel>,
    pub leases: Store<Lease>,
    pub jobs: Store<VideoJob>,
    pub index: Arc<Mutex<Index>>,
    /// Lanes whose queue changed and need positions and depth rewritten.
    pub lane_changes: mpsc::UnboundedSender<String>,
    /// Jobs to decide again now: a lane's queued jobs when its fallback episode starts or
    /// ends (their wait for the fallback lane starts then).
    pub job_changes: mpsc::UnboundedSender<JobKey>,
    /// When this replica became leader: metrics count only what happened since.
    pub leader_since: Timestamp,
    /// Since when this replica has seen the runners' heartbeat Leases without a break.
    pub leases_seen: Arc<LeaseView>,
    /// The election: a reconcile or a webhook decision acts only while it confirms this
    /// replica leads.
    pub elector: Arc<Elector>,
    /// Transitions already counted in the finished and queue-wait metrics or told by an
    /// Event: see [`Context::first_time`].
    pub counted: Arc<Mutex<Counted>>,
    /// Lanes this replica saw deleted (their watch said so, and a read without the lane
    /// selector found nothing): their jobs are this operator's to fail, with a selector too.
    pub deleted_lanes: Arc<Mutex<BTreeSet<String>>>,
}

/// What was already counted or told of each job, by the job's UID. The job watch forgets a job's entries when it shows the
/// job deleted, and a relist forgets those of every job it no longer lists, so the set never
/// holds more than the stored jobs' entries.
#[derive(Debug, Default)]
pub struct Counted(HashMap<String, HashSet<Told>>);

/// A transition of a job that is counted in a metric or told by an Event once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Told {
    /// Started, in this attempt.
    Started { attempt: i32 },
    /// Succeeded or Failed.
    Finished,
    /// The failure's Warning Event.
    FailedEvent,
    /// Given back to the queue by its stopping runner, after this attempt.
    HandedBack { attempt: i32 },
}

impl Counted {
    /// Records `what` of the job `uid`; true the first time only.
    pub fn first_time(&mut self, uid: &str, what: Told) -> bool {
        match self.0.get_mut(uid) {
            Some(seen) => seen.insert(what),
            None => {
                self.0.insert(uid.to_owned(), HashSet::from([what]));
                true
            }
        }
    }

    /// Forgets a deleted job.
    pub fn forget(&mut self, uid: &str) {
        self.0.remove(uid);
    }

    /// Keeps only the jobs `live` holds (after a relist, deletions may have been missed).
    pub fn retain(&mut self, live: &HashSet<&str>) {
        self.0.retain(|uid, _| live.contains(uid.as_str()));
    }
}

impl Context {
    /// Whether this replica is the confirmed leader now (see [`Elector::confirmed`]).
    pub fn leading(&self) -> bool {
        self.elector.confirmed()
    }

    /// The queue index, locked.
    pub fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().expect("index lock")
    }

    /// Applies `change` to the index and tells the lanes whose queue it changed.
    pub fn update_index(&self, change: impl FnOnce(&mut Index) -> Vec<String>) {
        let changed = change(&mut self.index());
        self.notify_lanes(changed);
    }

    /// The heartbeat Leases of `lane`'s runners.
    pub fn runner_leases<'a>(
        leases: &'a [Arc<Lease>],
        lane: &'a str,
    ) -> impl Iterator<Item = &'a Lease> {
        leases
            .iter()
            .filter(move |l| l.labels().get(LABEL_LANE).map(String::as_str) == Some(lane))
            .map(|l| l.as_ref())
    }

    pub fn lane_availability(&self, lane: &ModelLane, now: Timestamp) -> Availability {
        let leases = self.leases.state();
        availability(lane, Self::runner_leases(&leases, &lane.name_any()), now)
    }

    /// Why `job`'s estimated GPU memory does not fit a live runner of `lane` that reported
    /// its memory (`framelane.dev/memory` on its heartbeat Lease), whichever would claim it,
    /// with the size weighed; `None` when it fits them all. Runners whose heartbeat is not
    /// fresh (gone, or started by hand and stopped: nothing deletes their Lease), that
    /// reported nothing, or something unreadable (logged), do not count: their jobs are
    /// admitted and the runner checks again before it touches the GPU.
    pub fn does_not_fit(&self, lane: &str, job: &VideoJob) -> Option<(DoesNotFit, JobSize)> {
        let model = self.models.get(&ObjectRef::new(&job.spec.model))?;
        let size = JobSize::of(&job.spec, &model);
        let leases = self.leases.state();
        let now = Timestamp::now();
        let live = |lease: &&Lease| fresh_until(lease).is_some_and(|until| until > now);
        Self::runner_leases(&leases, lane)
            .filter(live)
            .find_map(|lease| {
                let value = lease.annotations().get(ANNOTATION_MEMORY)?;
                let memory = RunnerMemory::from_annotation(value)
                    .inspect_err(|e| {
                        tracing::warn!(lease = %lease.name_any(), lane, error = %e,
                        "ignoring the runner's unreadable {ANNOTATION_MEMORY} annotation")
                    })
                    .ok()?;
                fits(&memory, &job.spec.model, &size).err()
            })
            .map(|refused| (refused, size))
    }

    /// The facts `lifecycle::decide` needs about `job`'s lane `lane` and its fallback lane;
    /// `index` is the locked queue index (for depths and running jobs). A fallback lane that
    /// does not serve the job's model is none for this job: its runners would fail it; one
    /// whose runners' memory does not fit the job says so.
    pub fn lane_facts(
        &self,
        lane: &ModelLane,
        job: &VideoJob,
        now: Timestamp,
        index: &Index,
    ) -> LaneFacts {
        let (model, namespace) = (
            job.spec.model.as_str(),
            job.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let name = lane.name_any();
        let availability = self.lane_availability(lane, now);
        let running = |lane: &str| index.queues.lane(lane).map_or(0, |q| q.running());
        let fallback = lane
            .spec
            .fallback
            .as_ref()
            .and_then(|f| self.cached_lane(&f.lane))
            .filter(|f| f.spec.models.iter().any(|m| m == model))
            .map(|f| {
                let name = f.name_any();
                FallbackFacts {
                    limits: self.lane_limits(&f),
                    held: promised(index, &self.lanes.state(), &name, namespace),
                    fresh: self.lane_availability(&f, now).fresh,
                    running: running(&name),
                    does_not_fit: self
                        .does_not_fit(&name, job)
                        .map(|(refused, size)| refused.message(&size, &name)),
                    name,
                }
            });
        let episode = episode_cause(lane).map(|cause| {
            let since = lane
                .status
                .as_ref()
                .and_then(|s| s.fallback.as_ref())
                .and_then(|f| f.since.as_ref())
                .map_or(now, |t| t.0);
            (cause, since)
        });
        LaneFacts {
            pods_namespace: self.config.namespace.clone(),
            limits: self.lane_limits(lane),
            held: admitted(index, &name, namespace),
            unavailable_since: availability.unavailable_since,
            fresh: availability.fresh,
            running: running(&name),
            episode,
            fallback,
            name,
        }
    }

    /// A lane's queue limits, with the operator's defaults.
    pub fn lane_limits(&self, lane: &ModelLane) -> QueueLimits {
        let queue = lane.spec.queue.as_ref();
        let max_depth = queue
            .and_then(|q| q.max_depth)
            .unwrap_or(self.config.default_max_depth);
        let max_wait = queue
            .and_then(|q| q.max_wait_seconds)
            .unwrap_or(self.config.default_max_wait_seconds);
        QueueLimits {
            max_depth: max_depth.max(1) as usize,
            max_wait: std::time::Duration::from_secs(max_wait.max(1) as u64),
            max_per_namespace: queue
                .and_then(|q| q.max_per_namespace)
                .map(|n| n.max(1) as usize),
            job_deadline: queue
                .and_then(|q| q.job_deadline_seconds)
                .map_or(DEFAULT_JOB_DEADLINE, |s| {
                    std::time::Duration::from_secs(s.max(1) as u64)
                }),
        }
    }

    /// Whether the lane, model and heartbeat caches hold a full list: routing a new job
    /// needs all of them.
    pub fn synced(&self) -> bool {
        use futures::FutureExt;
        [
            self.lanes.wait_until_ready().now_or_never(),
            self.models.wait_until_ready().now_or_never(),
            self.leases.wait_until_ready().now_or_never(),
        ]
        .iter()
        .all(|r| matches!(r, Some(Ok(()))))
    }

    /// Whether this operator is responsible for a job. Without a lane selector it owns every
    /// job; with one, only jobs in (or routed to) one of its lanes, or in a lane it saw
    /// deleted: other jobs belong to the operator that runs their lane.
    pub fn owns(&self, job: &VideoJob) -> bool {
        if self.config.lane_selector.is_none() {
            return true;
        }
        let lanes = self.lanes.state();
        match job.status.as_ref().and_then(|s| s.lane.as_deref()) {
            Some(lane) => {
                lanes.iter().any(|l| l.name_any() == lane)
                    || self
                        .deleted_lanes
                        .lock()
                        .expect("deleted lanes lock")
                        .contains(lane)
            }
            None => route(&job.spec.model, &lanes).is_some(),
        }
    }

    /// A job as the watch cache has it now.
    pub fn cached_job(&self, key: &JobKey) -> Option<Arc<VideoJob>> {
        self.jobs
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
    }

    /// A lane as the watch cache has it now.
    pub fn cached_lane(&self, name: &str) -> Option<Arc<ModelLane>> {
        self.lanes.get(&ObjectRef::new(name))
    }

    /// Records `what` of `job` in [`Context::counted`]; true the first time only.
    pub fn first_time(&self, job: &VideoJob, what: Told) -> bool {
        let uid = job.metadata.uid.as_deref().unwrap_or_default();
        self.counted
            .lock()
            .expect("counted lock")
            .first_time(uid, what)
    }

    /// Has the queued jobs of `lane` decided again.
    pub fn notify_queued(&self, lane: &str) {
        let keys = self.index().queues.queued(lane);
        for key in keys {
            let _ = self.job_changes.send(key);
        }
    }

    pub fn notify_lanes(&self, lanes: Vec<String>) {
        for lane in lanes {
            let _ = self.lane_changes.send(lane);
        }
    }
}

/// Since when the heartbeat Lease cache is whole: from when the leader started watching, moved
/// on each time the watch fails, a reconcile finds the API server unreachable (refused
/// connections, 5xx while it starts), or a leader renewal fails or is the first to succeed
/// after failures (while kube-apiserver starts, requests hang until it answers, and a watch
/// may fail no more). Runners cannot renew while it is unreachable either, so their
/// freshness is judged from then (`timeouts::holder_fresh_until`).
pub struct LeaseView(Mutex<Timestamp>);

impl LeaseView {
    pub fn new(since: Timestamp) -> LeaseView {
        LeaseView(Mutex::new(since))
    }

    /// The view was cut off, or came back, at `at`: runners get a lease duration from then.
    pub fn interrupted(&self, at: Timestamp) {
        let mut since = self.0.lock().expect("lease view lock");
        *since = (*since).max(at);
    }

    pub fn since(&self) -> Timestamp {
        *self.0.lock().expect("lease view lock")
    }
}

/// Jobs admitted to `lane` (Queued or Running), all and those of `namespace`: what the
/// controller counts, admitting in creation order.
pub fn admitted(index: &Index, lane: &str, namespace: &str) -> Occupancy {
    index
        .queues
        .lane(lane)
        .map_or_else(Occupancy::default, |q| Occupancy {
            depth: q.depth(),
            namespace: q.held_by(namespace),
        })
}

/// Jobs that count against `lane` for a job of `namespace` that joins it from another lane
/// (a fallback move): those admitted to it, and the slots already promised to creates (jobs
/// awaiting admission whose model routes there, and the webhook's holds for creates the watch
/// has not shown yet), which a move must not take.
pub fn promised<L: Borrow<ModelLane>>(
    index: &Index,
    lanes: &[L],
    lane: &str,
    namespace: &str,
) -> Occupancy {
    let route = |model: &str| route(model, lanes).map(|r| r.name());
    index.occupancy(lane, Some(namespace), route, Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_counts_the_slots_promised_to_creates() {
        let lane: ModelLane = serde_json::from_value(serde_json::json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane",
            "metadata": {"name": "shared"}, "spec": {"mode": "Shared", "models": ["m"]}
        }))
        .unwrap();
        let mut index = Index::default();
        for i in 0..24 {
            let job: VideoJob = serde_json::from_value(serde_json::json!({
                "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                "metadata": {"name": format!("j{i}"), "namespace": "ns", "uid": format!("u{i}"),
                    "resourceVersion": "1"},
                "spec": {"model": "m", "prompt": "a fox"},
                "status": {"phase": "Queued", "lane": "shared",
                    "queuedAt": format!("2026-12-08T00:00:{i:02}.000000Z")}
            }))
            .unwrap();
            index.observe(&job, Timestamp::now());
        }
        // The webhook let a 25th create through; the watch has not shown it yet.
        let limits = QueueLimits {
            max_depth: 25,
            max_wait: std::time::Duration::from_secs(30),
            max_per_namespace: None,
            job_deadline: DEFAULT_JOB_DEADLINE,
        };
        let now = Instant::now();
        let key = JobKey {
            namespace: "ns".into(),
            name: "new".into(),
        };
        let lanes = [lane];
        let route = |m: &str| route(m, &lanes).map(|r| r.name());
        let until = (now, now + std::time::Duration::from_secs(15));
        index
            .hold(key, Some("new"), "shared", limits, route, until, false)
            .unwrap();
        assert_eq!(admitted(&index, "shared", "ns").depth, 24);
        let held = promised(&index, &lanes, "shared", "ns");
        assert_eq!((held.depth, held.namespace), (25, 25));
        assert!(
            framelane_core::depth::room("shared", "ns", held, limits).is_err(),
            "a move took the slot promised to the create"
        );
    }

    #[test]
    fn a_transition_counts_once_until_its_job_is_forgotten() {
        let mut counted = Counted::default();
        let started = |attempt| Told::Started { attempt };
        assert!(counted.first_time("a", started(1)));
        assert!(!counted.first_time("a", started(1)), "told once");
        assert!(
            counted.first_time("a", started(2)),
            "a new attempt starts anew"
        );
        assert!(counted.first_time("a", Told::Finished));
        assert!(counted.first_time("b", Told::Finished), "per job");
        counted.forget("a");
        assert!(
            counted.first_time("a", Told::Finished),
            "a deleted job's entries are gone"
        );
        counted.retain(&HashSet::from(["b"]));
        assert!(
            counted.0.keys().eq(["b"]),
            "a relist keeps only listed jobs"
        );
    }
}
