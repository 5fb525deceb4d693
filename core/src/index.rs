//! Which jobs hold which lane's slots? Turns VideoJob watch events into the in-memory
//! queues, and keeps them exact while admissions are being written and creates the webhook let
//! through are on their way. Watch events can arrive after the controller's own write of the
//! same job; a resourceVersion check keeps the index from stepping back to an older state, and
//! a write's answer never brings back a job the watch has shown deleted.

use std::{
    collections::{BTreeSet, HashMap},
    time::Instant,
};

use framelane_api::{VideoJob, modellane::FallbackCause, videojob::JobPhase};
use jiff::Timestamp;

use crate::{
    depth::{Occupancy, Overloaded, QueueLimits, room},
    queue::{AdmissionClock, JobKey, LaneQueue, Queues, Slot},
};

/// The queues plus what keeps them exact.
#[derive(Debug, Default)]
pub struct Index {
    pub queues: Queues,
    pub clock: AdmissionClock,
    versions: HashMap<JobKey, u64>,
    /// The UID of the job each name stands for: a job re-created under a deleted job's name is
    /// another job, and a late copy of the old one must not touch the new one's slot.
    uids: HashMap<JobKey, String>,
    reservations: HashMap<JobKey, Reservation>,
    /// Jobs waiting for admission, in creation order.
    awaiting: BTreeSet<(CreationKey, JobKey)>,
    awaiting_keys: HashMap<JobKey, (CreationKey, String)>,
    /// Jobs awaiting admission, counted by model.
    awaiting_models: HashMap<String, usize>,
    /// Creates the admission webhook let through that the watch has not shown yet.
    holds: HashMap<JobKey, Hold>,
    /// Whether a full list of jobs has been read (before that the counts are partial).
    pub synced: bool,
}

/// A slot the admission webhook holds for a create the watch has not shown yet.
#[derive(Debug)]
struct Hold {
    /// The lane it counts against.
    lane: String,
    /// When it lapses: the create failed after all (another webhook or a quota refused it).
    until: Instant,
    /// The new job's UID.
    uid: Option<String>,
    /// The UID of a job of the same name that the index knows and that holds a slot: the
    /// create is a duplicate (the API server refuses it) or re-creates that job after a delete
    /// the watch has not shown yet. Either way the old job's slot stands in for this one,
    /// which counts only once the index has forgotten the old job.
    behind: Option<String>,
}

/// The order users created jobs in: creation time, then the API server's revision.
pub type CreationKey = (Option<jiff::Timestamp>, u64);

/// The creation key of a job.
pub fn creation_key(job: &VideoJob) -> CreationKey {
    (
        job.metadata.creation_timestamp.as_ref().map(|t| t.0),
        version(job).unwrap_or(0),
    )
}

/// A slot taken for a job whose admission is still being written to the API server.
#[derive(Clone, Debug, PartialEq)]
pub struct Reservation {
    pub lane: String,
    pub queued_at: jiff::Timestamp,
    pub position: i32,
    /// For a job that goes to a fallback lane: why, and the lane it leaves.
    pub fallback: Option<(FallbackCause, String)>,
}

/// The queue slot a job's status says it holds.
pub fn slot_of(job: &VideoJob) -> Slot {
    let Some(status) = job.status.as_ref() else {
        return Slot::None;
    };
    let Some(lane) = status.lane.clone() else {
        return Slot::None;
    };
    match (status.phase, &status.queued_at) {
        (Some(JobPhase::Queued), Some(at)) => Slot::Queued {
            lane,
            queued_at: at.0,
        },
        (Some(JobPhase::Running), _) => Slot::Running { lane },
        _ => Slot::None,
    }
}

/// The queue's key of a job: its namespace and name.
pub fn key_of(job: &VideoJob) -> JobKey {
    JobKey {
        namespace: job.metadata.namespace.clone().unwrap_or_default(),
        name: job.metadata.name.clone().unwrap_or_default(),
    }
}

/// A resourceVersion as a number, to tell an older copy from a newer one: the API server's
/// resourceVersions are etcd revisions, which only grow.
pub fn version(job: &VideoJob) -> Option<u64> {
    job.metadata.resource_version.as_deref()?.parse().ok()
}

impl Index {
    /// Records what an API write answered, unless the watch has shown the job deleted since
    /// (the index no longer knows it): a late answer must not bring its slot back. Returns the
    /// lanes whose queue changed.
    pub fn observe_written(&mut self, job: &VideoJob, now: Timestamp) -> Vec<String> {
        if !self.knows(job) {
            return Vec::new();
        }
        self.observe(job, now)
    }

    /// Records a job as the watch shows it at `now`; returns the lanes whose queue changed.
    pub fn observe(&mut self, job: &VideoJob, now: Timestamp) -> Vec<String> {
        let key = key_of(job);
        if let (Some(seen), Some(new)) = (self.versions.get(&key), version(job))
            && new < *seen
        {
            return Vec::new();
        }
        if let Some(v) = version(job) {
            self.versions.insert(key.clone(), v);
        }
        self.remember_uid(&key, job);
        let slot = slot_of(job);
        if let Slot::Queued { queued_at, .. } = &slot {
            self.clock.observe(*queued_at, now);
        }
        let waiting = job.status.as_ref().and_then(|s| s.phase).is_none()
            && job.metadata.deletion_timestamp.is_none();
        self.drop_hold(&key, job);
        self.set_awaiting(
            &key,
            waiting.then(|| (creation_key(job), job.spec.model.clone())),
        );
        self.queues.set(key, slot)
    }

    fn remember_uid(&mut self, key: &JobKey, job: &VideoJob) {
        match &job.metadata.uid {
            Some(uid) => self.uids.insert(key.clone(), uid.clone()),
            None => self.uids.remove(key),
        };
    }

    /// Whether the index's job of this name is another one than `uid` (deleted and
    /// re-created). An unknown UID on either side counts as the same job.
    fn replaced(&self, key: &JobKey, uid: Option<&str>) -> bool {
        matches!((self.uids.get(key), uid), (Some(known), Some(uid)) if known != uid)
    }

    /// Ends the webhook's hold for `job`'s create, unless the hold is another job's.
    fn drop_hold(&mut self, key: &JobKey, job: &VideoJob) {
        let uid = job.metadata.uid.as_deref();
        if self
            .holds
            .get(key)
            .is_some_and(|hold| matches!((hold.uid.as_deref(), uid), (Some(h), Some(u)) if h != u))
        {
            return;
        }
        self.holds.remove(key);
    }

    fn set_awaiting(&mut self, key: &JobKey, awaiting: Option<(CreationKey, String)>) {
        if let Some((old, model)) = self.awaiting_keys.remove(key) {
            self.awaiting.remove(&(old, key.clone()));
            if let Some(n) = self.awaiting_models.get_mut(&model) {
                *n -= 1;
                if *n == 0 {
                    self.awaiting_models.remove(&model);
                }
            }
        }
        if let Some((c, model)) = awaiting {
            self.awaiting.insert((c, key.clone()));
            *self.awaiting_models.entry(model.clone()).or_default() += 1;
            self.awaiting_keys.insert(key.clone(), (c, model));
        }
    }

    /// Unfinished jobs that count against `lane`'s limits, all of them and (when the lane
    /// has a per-namespace share, `namespace` is given) those of `namespace`: admitted (Queued
    /// or Running), created but not yet admitted (`route` gives a model's lane), and creates
    /// the webhook let through that the watch has not shown yet.
    pub fn occupancy(
        &self,
        lane: &str,
        namespace: Option<&str>,
        route: impl Fn(&str) -> Option<String>,
        now: Instant,
    ) -> Occupancy {
        let routed_here = |model: &str| route(model).as_deref() == Some(lane);
        let queue = self.queues.lane(lane);
        let awaiting: usize = self
            .awaiting_models
            .iter()
            .filter(|(model, _)| routed_here(model))
            .map(|(_, n)| n)
            .sum();
        let holds = self
            .holds
            .iter()
            .filter(|(key, hold)| hold.lane == lane && hold.until > now && self.counts(key, hold));
        let Some(namespace) = namespace else {
            return Occupancy {
                depth: queue.map_or(0, LaneQueue::depth) + awaiting + holds.count(),
                namespace: 0,
            };
        };
        let mut held = Occupancy {
            depth: queue.map_or(0, LaneQueue::depth) + awaiting,
            namespace: queue.map_or(0, |q| q.held_by(namespace)),
        };
        held.namespace += self
            .awaiting_keys
            .iter()
            .filter(|(key, (_, model))| key.namespace == namespace && routed_here(model))
            .count();
        for (key, _) in holds {
            held.depth += 1;
            held.namespace += usize::from(key.namespace == namespace);
        }
        held
    }

    /// Whether a hold counts against its lane: not while the job it is behind still does.
    fn counts(&self, key: &JobKey, hold: &Hold) -> bool {
        hold.behind.is_none() || self.uids.get(key) != hold.behind.as_ref()
    }

    /// The admission webhook's atomic check-and-take: holds a slot of `lane` for the create
    /// of `key` (a new job with `uid`) if the lane has [`room`], else says why not. A job the
    /// index already knows takes no second slot (its create fails as a duplicate). A create
    /// under the name of a known job with another UID (the API server gives every create a
    /// new one) is a duplicate or re-creates that job after a delete the watch has not shown
    /// yet: while the known job holds a slot, that slot stands in for the create's, which
    /// counts once the old job is gone ([`Hold::behind`]), so a duplicate neither takes a
    /// slot nor meets a full lane with 503 instead of its 409. With `dry_run` nothing is held.
    #[allow(clippy::too_many_arguments)]
    pub fn hold(
        &mut self,
        key: JobKey,
        uid: Option<&str>,
        lane: &str,
        limits: QueueLimits,
        route: impl Fn(&str) -> Option<String>,
        (now, until): (Instant, Instant),
        dry_run: bool,
    ) -> Result<(), Overloaded> {
        self.holds.retain(|_, hold| hold.until > now);
        if (self.versions.contains_key(&key) || self.awaiting_keys.contains_key(&key))
            && !self.replaced(&key, uid)
        {
            return Ok(());
        }
        let holds_here = self.queues.lane_of(&key) == Some(lane)
            || self
                .awaiting_keys
                .get(&key)
                .is_some_and(|(_, model)| route(model).as_deref() == Some(lane));
        let behind = self.uids.get(&key).filter(|_| holds_here).cloned();
        if behind.is_none() {
            let share = limits.max_per_namespace.map(|_| key.namespace.as_str());
            let mut held = self.occupancy(lane, share, route, now);
            // A create reviewed again (a client's retry) does not count its own hold, when
            // that hold is on this lane: the model's route may have changed lanes since.
            if self
                .holds
                .get(&key)
                .is_some_and(|hold| hold.lane == lane && self.counts(&key, hold))
            {
                held.depth = held.depth.saturating_sub(1);
                held.namespace = held.namespace.saturating_sub(1);
            }
            room(lane, &key.namespace, held, limits)?;
        }
        if !dry_run {
            let hold = Hold {
                lane: lane.to_string(),
                until,
                uid: uid.map(str::to_string),
                behind,
            };
            self.holds.insert(key, hold);
        }
        Ok(())
    }

    /// Jobs waiting for admission that were created no later than `upto`, oldest first.
    pub fn awaiting_upto(&self, upto: CreationKey) -> Vec<JobKey> {
        self.awaiting
            .iter()
            .take_while(|(c, _)| *c <= upto)
            .map(|(_, k)| k.clone())
            .collect()
    }

    /// Whether the index holds the job: every job the watch showed and that was not deleted
    /// since (a reconcile can still hold a copy of a job deleted a moment ago).
    pub fn knows(&self, job: &VideoJob) -> bool {
        let key = key_of(job);
        self.versions.contains_key(&key) && !self.replaced(&key, job.metadata.uid.as_deref())
    }

    /// Whether this copy of a job is older than one the index has already seen (a cache
    /// that has not caught up with the controller's own write).
    pub fn is_stale(&self, job: &VideoJob) -> bool {
        matches!((self.versions.get(&key_of(job)), version(job)), (Some(seen), Some(v)) if v < *seen)
    }

    /// Takes a queue slot for `job` in `lane` now, before its admission is written, so the
    /// next admission already counts it. Copies of the job older than the admission write
    /// are ignored from here on. The lane's depth changes here (the write that follows shows
    /// the same slot), so the caller tells the lane.
    pub fn reserve(
        &mut self,
        job: &VideoJob,
        lane: &str,
        fallback: Option<(FallbackCause, String)>,
        now: jiff::Timestamp,
    ) -> Reservation {
        let queued_at = self.clock.next(now);
        self.take(job, lane, queued_at, fallback)
    }

    /// Takes a slot in `lane` for a queued job moving there from its own lane. It keeps its
    /// admission time, and so its place in time among that lane's jobs.
    pub fn reserve_move(
        &mut self,
        job: &VideoJob,
        lane: &str,
        cause: FallbackCause,
        queued_at: jiff::Timestamp,
    ) -> Reservation {
        let from = job
            .status
            .as_ref()
            .and_then(|s| s.lane.clone())
            .unwrap_or_default();
        self.take(job, lane, queued_at, Some((cause, from)))
    }

    fn take(
        &mut self,
        job: &VideoJob,
        lane: &str,
        queued_at: jiff::Timestamp,
        fallback: Option<(FallbackCause, String)>,
    ) -> Reservation {
        let key = key_of(job);
        let ahead = self
            .queues
            .lane(lane)
            .map_or(0, |q| q.queued_before(queued_at));
        self.queues.set(
            key.clone(),
            Slot::Queued {
                lane: lane.into(),
                queued_at,
            },
        );
        self.versions
            .insert(key.clone(), version(job).unwrap_or(0) + 1);
        self.remember_uid(&key, job);
        self.set_awaiting(&key, None);
        let reservation = Reservation {
            lane: lane.into(),
            queued_at,
            position: ahead as i32 + 1,
            fallback,
        };
        self.reservations.insert(key, reservation.clone());
        reservation
    }

    /// The reservation of a job whose admission is being written.
    pub fn reservation(&self, job: &VideoJob) -> Option<Reservation> {
        let key = key_of(job);
        if self.replaced(&key, job.metadata.uid.as_deref()) {
            return None;
        }
        self.reservations.get(&key).cloned()
    }

    /// The admission (or move) was written (`written`) or failed (`None`): the reservation
    /// ends. A failed write leaves the job as it was before the reservation (awaiting
    /// admission, or queued in its old lane), so that its next reconcile tries again, unless
    /// the watch showed a newer copy meanwhile: that copy stands.
    pub fn settle(
        &mut self,
        job: &VideoJob,
        written: Option<&VideoJob>,
        now: Timestamp,
    ) -> Vec<String> {
        let key = key_of(job);
        if self.replaced(&key, job.metadata.uid.as_deref())
            || self.reservations.remove(&key).is_none()
        {
            // Deleted (or the index rebuilt) while the write was on its way: what the watch
            // shows has the last word.
            return Vec::new();
        }
        match written {
            Some(written) => self.observe(written, now),
            None => {
                let reserved = version(job).unwrap_or(0) + 1;
                if self.versions.get(&key).is_some_and(|&seen| seen > reserved) {
                    return Vec::new();
                }
                match version(job) {
                    Some(v) => self.versions.insert(key.clone(), v),
                    None => self.versions.remove(&key),
                };
                if job.status.as_ref().and_then(|s| s.phase).is_none() {
                    self.set_awaiting(&key, Some((creation_key(job), job.spec.model.clone())));
                }
                self.queues.set(key, slot_of(job))
            }
        }
    }

    /// Forgets a deleted job, unless its name stands for a job created since; returns the
    /// lanes whose queue changed.
    pub fn forget(&mut self, job: &VideoJob) -> Vec<String> {
        let key = key_of(job);
        self.drop_hold(&key, job);
        if self.replaced(&key, job.metadata.uid.as_deref()) {
            return Vec::new();
        }
        self.versions.remove(&key);
        self.uids.remove(&key);
        self.reservations.remove(&key);
        self.set_awaiting(&key, None);
        self.queues.set(key, Slot::None)
    }

    /// Rebuilds everything from a full list (after a watch restart, deletions may have been
    /// missed). Webhook holds stay: their creates may still be on their way. Returns every
    /// lane it held jobs of before or holds now: their depth may have changed.
    pub fn rebuild<'a>(
        &mut self,
        jobs: impl Iterator<Item = &'a VideoJob>,
        now: Timestamp,
    ) -> Vec<String> {
        let mut lanes: Vec<String> = self.queues.lane_names().cloned().collect();
        *self = Index {
            clock: std::mem::take(&mut self.clock),
            holds: std::mem::take(&mut self.holds),
            synced: true,
            ..Default::default()
        };
        for job in jobs {
            lanes.extend(self.observe(job, now));
        }
        lanes.sort();
        lanes.dedup();
        lanes
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn job(name: &str, version: u64) -> VideoJob {
        serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": version.to_string()},
            "spec": {"model": "anisora", "prompt": "p"}
        }))
        .unwrap()
    }

    fn key(name: &str) -> JobKey {
        key_of(&job(name, 1))
    }

    const LIMITS: QueueLimits = QueueLimits {
        max_depth: 3,
        max_wait: Duration::from_secs(30),
        max_per_namespace: None,
        job_deadline: Duration::from_secs(3600),
    };

    #[test]
    fn a_rebuild_reports_the_lanes_whose_jobs_it_saw_or_lost() {
        let queued = |name: &str, lane: &str| {
            let mut j = job(name, 2);
            j.status = Some(
                serde_json::from_value(json!({
                    "phase": "Queued", "lane": lane, "queuedAt": "2026-11-27T10:00:00.000001Z"
                }))
                .unwrap(),
            );
            j
        };
        let mut index = Index::default();
        index.observe(&queued("a", "lane-a"), Timestamp::UNIX_EPOCH);
        assert_eq!(index.queues.depth("lane-a"), 1);
        // The watch restarts: "a" was deleted meanwhile, "b" was admitted to another lane.
        let lanes = index.rebuild([queued("b", "lane-b")].iter(), Timestamp::UNIX_EPOCH);
        assert_eq!(lanes, ["lane-a", "lane-b"]);
        assert_eq!(index.queues.depth("lane-a"), 0);
    }

    #[test]
    fn a_late_write_answer_does_not_bring_back_a_deleted_job() {
        let queued = |version: u64| {
            let mut j = job("a", version);
            j.status = Some(
                serde_json::from_value(json!({
                    "phase": "Queued", "lane": "lane-a", "queuedAt": "2026-11-27T10:00:00.000001Z"
                }))
                .unwrap(),
            );
            j
        };
        let mut index = Index::default();
        index.observe(&queued(2), Timestamp::UNIX_EPOCH);
        // The lane reconciler's position write answers with version 3, but the watch has
        // meanwhile shown the job deleted (at version 4).
        index.forget(&queued(4));
        assert!(
            index
                .observe_written(&queued(3), Timestamp::UNIX_EPOCH)
                .is_empty()
        );
        assert_eq!(index.queues.depth("lane-a"), 0, "no slot comes back");
        assert!(!index.knows(&queued(3)));
        // A job the index knows takes the answer.
        index.observe(&queued(5), Timestamp::UNIX_EPOCH);
        assert!(
            index
                .observe_written(&queued(6), Timestamp::UNIX_EPOCH)
                .is_empty(),
            "same slot"
        );
        assert_eq!(index.queues.depth("lane-a"), 1);
    }

    #[test]
    fn a_failed_admission_or_move_write_leaves_the_job_as_it_was() {
        let now = Timestamp::UNIX_EPOCH;
        let mut index = Index::default();
        // A new job: reserved, its write fails (a 500): it awaits admission again, and its
        // next reconcile can reserve it.
        let new = job("a", 5);
        index.observe(&new, now);
        index.reserve(&new, "lane-a", None, now);
        assert_eq!(index.queues.depth("lane-a"), 1);
        index.settle(&new, None, now);
        assert_eq!(index.queues.depth("lane-a"), 0);
        assert!(index.knows(&new) && !index.is_stale(&new));
        assert_eq!(index.awaiting_upto(creation_key(&new)), [key("a")]);

        // A queued job moving to its fallback lane: it keeps its slot in its own lane.
        let mut queued = job("b", 7);
        queued.status = Some(
            serde_json::from_value(json!({
                "phase": "Queued", "lane": "lane-a", "queuedAt": "2026-11-27T10:00:00.000001Z"
            }))
            .unwrap(),
        );
        index.observe(&queued, now);
        let at = queued.status.as_ref().unwrap().queued_at.clone().unwrap().0;
        index.reserve_move(&queued, "lane-b", FallbackCause::Capacity, at);
        assert_eq!(
            (index.queues.depth("lane-a"), index.queues.depth("lane-b")),
            (0, 1)
        );
        index.settle(&queued, None, now);
        assert_eq!(
            (index.queues.depth("lane-a"), index.queues.depth("lane-b")),
            (1, 0)
        );
        assert!(index.knows(&queued));

        // The watch showed a newer copy while the write was on its way (a 409): it stands.
        let c = job("c", 9);
        index.observe(&c, now);
        index.reserve(&c, "lane-a", None, now);
        index.observe(&queued_as(job("c", 12), "lane-a"), now);
        index.settle(&c, None, now);
        assert_eq!(index.queues.depth("lane-a"), 2, "b and c");
        assert!(index.is_stale(&c));
    }

    fn queued_as(mut j: VideoJob, lane: &str) -> VideoJob {
        j.status = Some(
            serde_json::from_value(json!({
                "phase": "Queued", "lane": lane, "queuedAt": "2026-11-27T10:00:01.000001Z"
            }))
            .unwrap(),
        );
        j
    }

    #[test]
    fn holds_count_until_the_watch_shows_the_job_and_lapse_after() {
        let lane_of = |m: &str| (m == "anisora").then(|| "lane-a".to_string());
        let mut index = Index::default();
        let now = Instant::now();
        let until = (now, now + Duration::from_secs(15));
        for name in ["a", "b"] {
            assert_eq!(
                index.hold(key(name), None, "lane-a", LIMITS, lane_of, until, false),
                Ok(())
            );
        }
        assert_eq!(
            index.hold(key("dry"), None, "lane-a", LIMITS, lane_of, until, true),
            Ok(()),
            "a dry run fits but holds nothing"
        );
        assert_eq!(index.occupancy("lane-a", None, lane_of, now).depth, 2);
        index.observe(&job("a", 5), Timestamp::UNIX_EPOCH);
        assert_eq!(
            index.occupancy("lane-a", None, lane_of, now).depth,
            2,
            "a shown job counts as awaiting admission instead of held"
        );
        assert_eq!(
            index.hold(key("c"), None, "lane-a", LIMITS, lane_of, until, false),
            Ok(())
        );
        assert_eq!(
            index.hold(key("d"), None, "lane-a", LIMITS, lane_of, until, false),
            Err(Overloaded::Lane {
                lane: "lane-a".into(),
                depth: 3,
                limits: LIMITS
            })
        );
        assert_eq!(
            index.hold(key("a"), None, "lane-a", LIMITS, lane_of, until, false),
            Ok(()),
            "an existing name takes no slot: its create fails as a duplicate"
        );
        let later = now + Duration::from_secs(16);
        assert_eq!(
            index.hold(
                key("d"),
                None,
                "lane-a",
                LIMITS,
                lane_of,
                (later, later),
                false
            ),
            Ok(()),
            "holds of creates that never arrived lapse"
        );
        index.forget(&job("a", 6));
        assert_eq!(index.occupancy("lane-a", None, lane_of, later).depth, 0);
    }

    #[test]
    fn a_create_reviewed_again_after_its_model_moved_lanes_holds_the_new_lane() {
        let mut index = Index::default();
        let now = Instant::now();
        let until = (now, now + Duration::from_secs(15));
        let to = |lane: &'static str| move |_: &str| Some(lane.to_string());
        assert_eq!(
            index.hold(key("a"), None, "lane-a", LIMITS, to("lane-a"), until, false),
            Ok(())
        );
        // The model's route moved to lane-b (a fallback episode began) and the client
        // retried the create: lane-b is empty, so its own hold on lane-a is not taken off.
        assert_eq!(
            index.hold(key("a"), None, "lane-b", LIMITS, to("lane-b"), until, false),
            Ok(())
        );
        assert_eq!(index.occupancy("lane-b", None, to("lane-b"), now).depth, 1);
        assert_eq!(index.occupancy("lane-a", None, to("lane-b"), now).depth, 0);
    }

    #[test]
    fn a_job_re_created_under_a_known_name_is_counted_and_keeps_its_place() {
        let lane_of = |m: &str| (m == "anisora").then(|| "lane-a".to_string());
        let with_uid = |version: u64, uid: &str, queued: bool| {
            let mut j = job("a", version);
            j.metadata.uid = Some(uid.into());
            j.status = queued.then(|| {
                serde_json::from_value(json!({
                    "phase": "Queued", "lane": "lane-a", "queuedAt": "2026-11-27T10:00:00.000001Z"
                }))
                .unwrap()
            });
            j
        };
        let mut index = Index::default();
        let now = Instant::now();
        let until = (now, now + Duration::from_secs(15));
        let old = with_uid(2, "old", true);
        index.observe(&old, Timestamp::UNIX_EPOCH);
        // Deleted and re-created: the webhook sees the create before the watch shows the
        // delete.
        assert_eq!(
            index.hold(
                key("a"),
                Some("new"),
                "lane-a",
                LIMITS,
                lane_of,
                until,
                false
            ),
            Ok(())
        );
        assert_eq!(
            index.occupancy("lane-a", None, lane_of, now).depth,
            1,
            "the old job's slot stands in for the new job's hold"
        );
        index.forget(&with_uid(3, "old", true));
        assert_eq!(
            index.occupancy("lane-a", None, lane_of, now).depth,
            1,
            "the old job's delete leaves the new job's hold"
        );
        let new = with_uid(4, "new", false);
        index.observe(&new, Timestamp::UNIX_EPOCH);
        assert_eq!(index.occupancy("lane-a", None, lane_of, now).depth, 1);
        // A late copy of the old job (a reconcile's release) leaves the new one alone.
        index.forget(&old);
        assert!(index.knows(&new) && !index.knows(&old));
        assert!(index.reservation(&old).is_none());
        assert_eq!(index.occupancy("lane-a", None, lane_of, now).depth, 1);
    }

    #[test]
    fn a_duplicate_create_takes_no_slot_and_meets_no_full_lane() {
        // The API server gives every create a new UID before the webhook sees it, so a create
        // under a queued job's name carries another UID than the job.
        let lane_of = |_: &str| Some("lane-a".to_string());
        let queued = |name: &str| {
            let mut j = queued_as(job(name, 2), "lane-a");
            j.metadata.uid = Some(format!("{name}-uid"));
            j
        };
        let mut index = Index::default();
        let now = Instant::now();
        let until = (now, now + Duration::from_secs(15));
        index.observe(&queued("a"), Timestamp::UNIX_EPOCH);
        let again = |index: &mut Index, name: &str| {
            index.hold(
                key(name),
                Some("fresh"),
                "lane-a",
                LIMITS,
                lane_of,
                until,
                false,
            )
        };
        assert_eq!(again(&mut index, "a"), Ok(()));
        assert_eq!(
            index.occupancy("lane-a", None, lane_of, now).depth,
            1,
            "the duplicate of a took no slot"
        );
        index.observe(&queued("b"), Timestamp::UNIX_EPOCH);
        assert_eq!(again(&mut index, "c"), Ok(()));
        assert_eq!(index.occupancy("lane-a", None, lane_of, now).depth, 3);
        assert_eq!(
            again(&mut index, "b"),
            Ok(()),
            "on a full lane, a duplicate is let through to meet its 409"
        );
        assert!(matches!(
            again(&mut index, "d"),
            Err(Overloaded::Lane { depth: 3, .. })
        ));
        // Re-created under a finished job's name: that job holds no slot to stand in.
        let mut done = job("e", 3);
        done.metadata.uid = Some("e-uid".into());
        done.status =
            Some(serde_json::from_value(json!({"phase": "Succeeded", "lane": "lane-a"})).unwrap());
        index.observe(&done, Timestamp::UNIX_EPOCH);
        assert!(matches!(
            again(&mut index, "e"),
            Err(Overloaded::Lane { depth: 3, .. })
        ));
    }
}
