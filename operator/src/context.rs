//! What every reconcile shares: the client, caches, the queue index, metrics and Events.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use framelane_api::{
    ModelLane, VideoModel,
    modellane::LaneMode,
    runner::fresh_until,
    wellknown::{LABEL_LANE, lane_condition::AVAILABLE},
};
use jiff::{RoundMode, Timestamp, TimestampRound, Unit};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Client, Resource, ResourceExt, runtime::reflector::Store};
use tokio::sync::mpsc;

use crate::{
    config::Config, events::EventSink, index::Index, jobs::decide::LaneFacts, metrics::Metrics,
};

pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
    pub lanes: Store<ModelLane>,
    pub models: Store<VideoModel>,
    pub leases: Store<Lease>,
    pub jobs: Store<framelane_api::VideoJob>,
    pub index: Arc<Mutex<Index>>,
    /// Lanes whose queue changed and need positions and depth rewritten.
    pub lane_changes: mpsc::UnboundedSender<String>,
    /// When this replica became leader: metrics count only what happened since.
    pub leader_since: Timestamp,
    /// Transitions already counted in the finished and queue-wait metrics or told by an
    /// Event (`{uid}/start/{attempt}`, `{uid}/finished`, `{uid}/failed-event`): see
    /// [`Context::first_time`].
    pub counted: Mutex<HashSet<String>>,
}

/// How many runners of a lane are fresh, and since when none has been.
#[derive(Debug, Clone, PartialEq)]
pub struct Availability {
    pub fresh: i32,
    /// The earliest moment a fresh runner stops being fresh (when to look again).
    pub next_expiry: Option<Timestamp>,
    /// While no runner is fresh: when the last one stopped being fresh, to the second
    /// (rounded up, as the lane's `Available` condition records it).
    pub unavailable_since: Option<Timestamp>,
}

/// Computes a lane's availability from its runners' heartbeat Leases and, for when the last
/// fresh runner went away, from the lane's `Available` condition: a runner's Lease goes with
/// its pod, so the Leases alone forget a runner that was fresh until its pod was deleted.
///
/// With no fresh runner, the lane has been unavailable since the latest of:
/// - the expiry of the freshest Lease left, and
/// - what its status records: `Available=False` since its `lastTransitionTime`; with
///   `Available=True` the lane was available when its status was last written and the
///   outage is not on record yet, so it starts now; with no condition (never reconciled),
///   when the lane was created.
pub fn availability<'a>(
    lane: &ModelLane,
    leases: impl Iterator<Item = &'a Lease>,
    now: Timestamp,
) -> Availability {
    let mut fresh = 0;
    let mut next_expiry: Option<Timestamp> = None;
    let mut last_fresh: Option<Timestamp> = None;
    for until in leases.filter_map(fresh_until) {
        if until > now {
            fresh += 1;
            next_expiry = Some(next_expiry.map_or(until, |n| n.min(until)));
        } else {
            last_fresh = Some(last_fresh.map_or(until, |l| l.max(until)));
        }
    }
    let recorded = lane
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == AVAILABLE));
    let unavailable_since = (fresh == 0).then(|| {
        let on_record = match recorded {
            Some(c) if c.status == "False" => c.last_transition_time.0,
            Some(_) => now,
            None => lane.meta().creation_timestamp.as_ref().map_or(now, |t| t.0),
        };
        second_up(last_fresh.map_or(on_record, |l| l.max(on_record)))
    });
    Availability {
        fresh,
        next_expiry,
        unavailable_since,
    }
}

/// `t` rounded up to the second: a condition's `lastTransitionTime` keeps whole seconds, and
/// rounding down would start a job's grace before the lane went down.
fn second_up(t: Timestamp) -> Timestamp {
    t.round(
        TimestampRound::new()
            .smallest(Unit::Second)
            .mode(RoundMode::Ceil),
    )
    .unwrap_or(t)
}

/// The lane a new job of `model` goes to: the model's Dedicated lane, else a Shared lane
/// that serves it (by name, for a stable choice).
pub fn route<'a>(model: &str, lanes: &'a [Arc<ModelLane>]) -> Option<&'a Arc<ModelLane>> {
    let serves = |l: &&Arc<ModelLane>| l.spec.models.iter().any(|m| m == model);
    let mut candidates: Vec<&Arc<ModelLane>> = lanes.iter().filter(serves).collect();
    candidates.sort_by_key(|l| (l.spec.mode != LaneMode::Dedicated, l.name_any()));
    candidates.into_iter().next()
}

impl Context {
    pub fn runner_leases<'a>(
        &self,
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
        availability(lane, self.runner_leases(&leases, &lane.name_any()), now)
    }

    /// The facts `decide` needs about a lane.
    pub fn lane_facts(&self, lane: &ModelLane, now: Timestamp) -> LaneFacts {
        let depth = self
            .index
            .lock()
            .expect("index lock")
            .queues
            .depth(&lane.name_any());
        self.lane_facts_at_depth(lane, now, depth)
    }

    /// The same, for a caller that already holds the index.
    pub fn lane_facts_at_depth(&self, lane: &ModelLane, now: Timestamp, depth: usize) -> LaneFacts {
        let (max_depth, max_wait) = self.lane_limits(lane);
        LaneFacts {
            name: lane.name_any(),
            max_depth,
            max_wait,
            depth,
            unavailable_since: self.lane_availability(lane, now).unavailable_since,
        }
    }

    /// A lane's `maxDepth` and `maxWaitSeconds`, with the operator's defaults.
    pub fn lane_limits(&self, lane: &ModelLane) -> (usize, std::time::Duration) {
        let queue = lane.spec.queue.as_ref();
        let max_depth = queue
            .and_then(|q| q.max_depth)
            .unwrap_or(self.config.default_max_depth);
        let max_wait = queue
            .and_then(|q| q.max_wait_seconds)
            .unwrap_or(self.config.default_max_wait_seconds);
        (
            max_depth.max(1) as usize,
            std::time::Duration::from_secs(max_wait.max(1) as u64),
        )
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
    /// job; with one, only jobs in (or routed to) one of its lanes: other jobs belong to the
    /// operator that runs their lane.
    pub fn owns(&self, job: &framelane_api::VideoJob) -> bool {
        if self.config.lane_selector.is_none() {
            return true;
        }
        let lanes = self.lanes.state();
        match job.status.as_ref().and_then(|s| s.lane.as_deref()) {
            Some(lane) => lanes.iter().any(|l| l.name_any() == lane),
            None => route(&job.spec.model, &lanes).is_some(),
        }
    }

    /// A job as the watch cache has it now.
    pub fn jobs_cache(&self, key: &crate::queue::JobKey) -> Option<Arc<framelane_api::VideoJob>> {
        self.jobs
            .get(&kube::runtime::reflector::ObjectRef::new(&key.name).within(&key.namespace))
    }

    /// Records `key` in [`Context::counted`]; true the first time only.
    pub fn first_time(&self, key: String) -> bool {
        self.counted.lock().expect("counted lock").insert(key)
    }

    pub fn notify_lanes(&self, lanes: Vec<String>) {
        for lane in lanes {
            let _ = self.lane_changes.send(lane);
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec,
        apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    };
    use serde_json::json;

    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }
    fn lane(name: &str, mode: &str, models: &[&str]) -> Arc<ModelLane> {
        let mut l: ModelLane = serde_json::from_value(
            json!({"apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane",
            "metadata": {"name": name}, "spec": {"mode": mode, "models": models}}),
        )
        .unwrap();
        l.metadata.creation_timestamp = Some(Time(t(0)));
        Arc::new(l)
    }
    fn lease(renewed: i64) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(t(renewed))),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_model_goes_to_its_dedicated_lane_before_a_shared_one() {
        let lanes = [
            lane("a-shared", "Shared", &["anisora", "phr00t"]),
            lane("anisora", "Dedicated", &["anisora"]),
        ];
        assert_eq!(route("anisora", &lanes).unwrap().name_any(), "anisora");
        assert_eq!(route("phr00t", &lanes).unwrap().name_any(), "a-shared");
        assert!(route("other", &lanes).is_none());
    }

    #[test]
    fn availability_counts_fresh_heartbeats_and_dates_the_outage() {
        let l = lane("anisora", "Dedicated", &["anisora"]);
        let leases = [lease(100), lease(90)];
        let a = availability(&l, leases.iter(), t(104));
        assert_eq!(
            (a.fresh, a.next_expiry, a.unavailable_since),
            (2, Some(t(105)), None)
        );
        let a = availability(&l, leases.iter(), t(110));
        assert_eq!((a.fresh, a.unavailable_since), (1, None));
        let a = availability(&l, leases.iter(), t(200));
        assert_eq!(
            (a.fresh, a.unavailable_since),
            (0, Some(t(115))),
            "down since the last heartbeat expired"
        );
        let a = availability(&l, std::iter::empty(), t(200));
        assert_eq!(
            a.unavailable_since,
            Some(t(0)),
            "never had a runner: down since it was created"
        );
    }

    fn with_available(lane: &ModelLane, status: &str, since: i64) -> ModelLane {
        let mut lane = lane.clone();
        lane.status = Some(
            serde_json::from_value(json!({"conditions": [{
            "type": "Available", "status": status, "reason": "Started", "message": "",
            "lastTransitionTime": Time(t(since))}]}))
            .unwrap(),
        );
        lane
    }

    #[test]
    fn an_outage_counts_from_its_record_when_the_leases_are_gone() {
        let created = lane("anisora", "Dedicated", &["anisora"]);
        // The runner's pod was replaced and its Lease went with it. The lane was Available
        // when its status was last written: the outage starts when it is noticed, not
        // when the lane was created.
        let up = with_available(&created, "True", 10);
        let a = availability(&up, std::iter::empty(), t(500));
        assert_eq!((a.fresh, a.unavailable_since), (0, Some(t(500))));
        // Once on record, it keeps that start, Leases or not, whichever replica reads it.
        let down = with_available(&created, "False", 480);
        let a = availability(&down, std::iter::empty(), t(600));
        assert_eq!(a.unavailable_since, Some(t(480)));
        // A runner fresh after the record moves it later, never earlier.
        let leases = [lease(500), lease(100)];
        let a = availability(&down, leases.iter(), t(600));
        assert_eq!(a.unavailable_since, Some(t(515)));
        // A fresh runner: available, whatever the record says.
        let a = availability(&down, [lease(590)].iter(), t(600));
        assert_eq!((a.fresh, a.unavailable_since), (1, None));
    }

    #[test]
    fn an_outage_starts_on_a_whole_second_rounded_up() {
        let up = with_available(&lane("anisora", "Dedicated", &["anisora"]), "True", 10);
        let now = t(500) + jiff::SignedDuration::from_millis(300);
        assert_eq!(
            availability(&up, std::iter::empty(), now).unavailable_since,
            Some(t(501))
        );
        assert_eq!(
            availability(&up, std::iter::empty(), t(500)).unavailable_since,
            Some(t(500))
        );
    }
}
