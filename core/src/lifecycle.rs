//! What happens next to a job? One decision from plain facts (the job, its lane, its
//! runner's heartbeat), so every transition is unit-tested. Terminal states are final:
//! nothing here leaves Succeeded or Failed except deletion.

use std::time::Duration;

use framelane_api::{
    VideoJob, VideoJobStatus,
    modellane::FallbackCause,
    reasons::JobReason,
    videojob::{JobPhase, LaneAssignment},
};
use jiff::{SignedDuration, Timestamp};

use crate::{
    depth::{Occupancy, QueueLimits, room},
    routing::RouteError,
    timeouts::{
        DEFAULT_JOB_DEADLINE, expiry, queue_wait_deadline, run_deadline, runner_alive, until,
        waiting_since,
    },
};

/// How often a job that waits for a free runner of its fallback lane looks again.
const FREE_RUNNER_POLL: Duration = Duration::from_secs(1);

/// What the controller knows about the lane a job is (or would be) in.
#[derive(Clone, Debug, PartialEq)]
pub struct LaneFacts {
    pub name: String,
    /// The namespace of the lane's runner pods (the operator's), for the messages.
    pub pods_namespace: String,
    pub limits: QueueLimits,
    /// Unfinished jobs the lane holds now, all and those of the job's namespace.
    pub held: Occupancy,
    /// Since when the lane has had no fresh runner; `None` while it has one.
    pub unavailable_since: Option<Timestamp>,
    /// Runners with a fresh heartbeat, and jobs running on the lane: its runners are all busy
    /// when `running >= fresh`.
    pub fresh: i32,
    pub running: usize,
    /// The lane's fallback episode going on: its cause and since when.
    pub episode: Option<(FallbackCause, Timestamp)>,
    /// The lane's fallback lane, when it has one.
    pub fallback: Option<FallbackFacts>,
}

/// What the controller knows about a lane's fallback lane.
#[derive(Clone, Debug, PartialEq)]
pub struct FallbackFacts {
    pub name: String,
    pub limits: QueueLimits,
    /// Unfinished jobs it holds, all and those of the job's namespace.
    pub held: Occupancy,
    pub fresh: i32,
    pub running: usize,
    /// Why the job's estimated GPU memory does not fit a runner of this lane (the fit
    /// check's message), when it does not.
    pub does_not_fit: Option<String>,
}

impl FallbackFacts {
    /// Why this lane cannot take a job of `namespace` now (no fresh runner, its runners'
    /// memory too small for the job, or full), if it cannot.
    fn refusal(&self, namespace: &str) -> Option<String> {
        if self.fresh == 0 {
            return Some(format!(
                "its fallback lane {} has no available runner either",
                self.name
            ));
        }
        if let Some(why) = &self.does_not_fit {
            return Some(format!(
                "its fallback lane {} cannot run it ({why})",
                self.name
            ));
        }
        room(&self.name, namespace, self.held, self.limits)
            .err()
            .map(|full| format!("its fallback lane {} is full ({full})", self.name))
    }
}

/// Why a job has no lane to be in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoLane {
    /// A new job: its model does not exist or nothing serves it.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// An admitted job whose lane was deleted since.
    #[error("lane {0} was deleted; create the job again once a lane serves its model")]
    Deleted(String),
}

/// Everything `decide` looks at besides the job.
#[derive(Clone, Debug)]
pub struct Facts {
    pub now: Timestamp,
    /// The lane the job is routed to (new job) or sits in.
    pub lane: Result<LaneFacts, NoLane>,
    /// For a Running job: until when its runner's heartbeat is fresh.
    pub runner_fresh_until: Option<Timestamp>,
    /// For a new job: how its parameters do not fit its model (`parameters::summary`), if
    /// they do not.
    pub invalid: Option<String>,
    pub max_attempts: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Put the new job in `lane`'s queue.
    Admit { lane: String },
    /// Fail the job (not yet terminal) with a reason and a message saying what to do.
    Fail { reason: JobReason, message: String },
    /// Its runner died: back to its old place in the queue, for another attempt.
    Requeue,
    /// It waited `maxWaitSeconds`: to its lane's fallback lane `to`, keeping its place in time.
    Move { to: String, cause: FallbackCause },
    /// `ttlSecondsAfterFinished` has passed: delete it.
    Delete,
    /// Deleted and nothing runs it any more: drop the finalizer so it goes away.
    Release,
    /// Nothing to do now; look again after this long (zero: only when the job changes).
    Wait(Duration),
}

/// The one place where a job's next step is decided.
pub fn decide(job: &VideoJob, facts: &Facts) -> Decision {
    let status = job.status.clone().unwrap_or_default();
    let namespace = job.metadata.namespace.as_deref().unwrap_or_default();
    let deleted = job.metadata.deletion_timestamp.is_some();
    let alive = runner_alive(facts.runner_fresh_until, facts.now);
    let runner_expiry = || until(facts.now, facts.runner_fresh_until.unwrap_or(facts.now));
    let limit = job_deadline(job, &facts.lane);
    let deadline = run_deadline(status.started_at.as_ref().map(|t| t.0), limit);
    let overdue = deadline.is_some_and(|at| at <= facts.now);
    // A live runner's job: look again when its heartbeat or its deadline is due.
    let look_again = || {
        Decision::Wait(deadline.map_or(runner_expiry(), |at| {
            runner_expiry().min(until(facts.now, at))
        }))
    };
    match status.phase {
        // The runner sees the deletion and stops at the next step boundary; one hung past the
        // job's deadline never does, and the deletion goes through as it would have failed.
        Some(JobPhase::Running) if deleted && alive && !overdue => look_again(),
        _ if deleted => Decision::Release,
        None => match &facts.invalid {
            // Created while the webhook did not check it: refused before any runner sees it.
            Some(why) => Decision::Fail {
                reason: JobReason::InvalidParameters,
                message: why.clone(),
            },
            None => admit(namespace, &facts.lane),
        },
        Some(JobPhase::Queued) => queued(
            namespace,
            waiting_since(&status),
            status.lane_mode == Some(LaneAssignment::Fallback),
            facts,
        ),
        Some(JobPhase::Running) if overdue => Decision::Fail {
            reason: JobReason::DeadlineExceeded,
            message: overran(&status, limit),
        },
        Some(JobPhase::Running) if alive => look_again(),
        Some(JobPhase::Running) => lost(&status, facts.max_attempts),
        Some(JobPhase::Succeeded | JobPhase::Failed) => {
            let finished = status.finished_at.map(|t| t.0);
            match expiry(finished, job.spec.ttl_seconds_after_finished) {
                Some(at) if at <= facts.now => Decision::Delete,
                Some(at) => Decision::Wait(until(facts.now, at)),
                None => Decision::Wait(Duration::ZERO),
            }
        }
    }
}

/// How long the job may run: its own deadline, else its lane's, else the default.
fn job_deadline(job: &VideoJob, lane: &Result<LaneFacts, NoLane>) -> Duration {
    let own = job
        .spec
        .deadline_seconds
        .and_then(|s| u64::try_from(s).ok());
    match (own, lane) {
        (Some(secs), _) => Duration::from_secs(secs),
        (None, Ok(lane)) => lane.limits.job_deadline,
        (None, Err(_)) => DEFAULT_JOB_DEADLINE,
    }
}

fn overran(status: &VideoJobStatus, limit: Duration) -> String {
    format!(
        "the job ran {} s on runner {} without finishing (its deadline: spec.deadlineSeconds, else its lane's \
         spec.queue.jobDeadlineSeconds); look at the runner pod's logs for why it hung, then create the job again \
         (with a larger spec.deadlineSeconds if it needs more time)",
        limit.as_secs(),
        status.runner.as_deref().unwrap_or("?")
    )
}

/// Its runner died: another attempt, or `RunnerLost` once it has lost `max_attempts` runners.
fn lost(status: &VideoJobStatus, max_attempts: i32) -> Decision {
    let runner = status.runner.as_deref().unwrap_or("?");
    let attempts = status.attempts.unwrap_or(1);
    if attempts < max_attempts {
        return Decision::Requeue;
    }
    Decision::Fail {
        reason: JobReason::RunnerLost,
        message: format!(
            "runner {runner} stopped sending heartbeats mid-job, and the job has now lost {attempts} runners \
             (limit {max_attempts}); look at the runner pods' logs (OOM kills, node failures), then create the job again"
        ),
    }
}

fn admit(namespace: &str, lane: &Result<LaneFacts, NoLane>) -> Decision {
    match lane {
        Err(why) => no_lane(why),
        Ok(lane) => match room(&lane.name, namespace, lane.held, lane.limits) {
            Ok(()) => Decision::Admit {
                lane: lane.name.clone(),
            },
            Err(full) => Decision::Fail {
                reason: JobReason::QueueOverloaded,
                message: full.to_string(),
            },
        },
    }
}

/// A job with no lane to be in fails with `LaneNotFound` and why.
fn no_lane(why: &NoLane) -> Decision {
    Decision::Fail {
        reason: JobReason::LaneNotFound,
        message: why.to_string(),
    }
}

/// A queued job waits its turn, except when it has waited `maxWaitSeconds` and:
/// - its lane has no available runner: it moves to the fallback lane if that has a runner
///   and room, else it fails with `QueueWaitTimeout`;
/// - its lane is in fallback: it moves when the fallback lane can take it, else it stays
///   (its own runners may still run it);
/// - every runner of its lane is busy: it moves when a runner of the fallback lane is free,
///   and waits its turn while there is none (that lane busy, down or full): its own lane's
///   runners will run it.
///
/// A job already on a fallback lane never moves again; a job whose lane was deleted fails
/// with `LaneNotFound` (nothing would ever run it).
fn queued(namespace: &str, queued_at: Option<Timestamp>, moved: bool, facts: &Facts) -> Decision {
    let lane = match &facts.lane {
        Ok(lane) => lane,
        Err(why) => return no_lane(why),
    };
    let max_wait = lane.limits.max_wait;
    let fallback = lane.fallback.as_ref().filter(|_| !moved);
    if let Some(deadline) = queue_wait_deadline(queued_at, lane.unavailable_since, max_wait) {
        if deadline > facts.now {
            return Decision::Wait(until(facts.now, deadline));
        }
        let cause = lane.episode.map_or(FallbackCause::Capacity, |(c, _)| c);
        return match fallback.map(|f| (f, f.refusal(namespace))) {
            Some((f, None)) => Decision::Move {
                to: f.name.clone(),
                cause,
            },
            refused => Decision::Fail {
                reason: JobReason::QueueWaitTimeout,
                message: timed_out(lane, refused.and_then(|(_, why)| why)),
            },
        };
    }
    // A fallback lane whose runners cannot fit the job is none while the job's own lane has
    // a runner: the job waits its turn there.
    let Some(fallback) = fallback.filter(|f| f.does_not_fit.is_none()) else {
        // The lane has a runner: the job waits its turn, however long the queue.
        return Decision::Wait(max_wait);
    };
    let busy = lane.running >= usize::try_from(lane.fresh).unwrap_or(0);
    let waiting_since = match lane.episode {
        Some((_, since)) => queued_at.map_or(since, |q| q.max(since)),
        None if busy => queued_at.unwrap_or(facts.now),
        None => return Decision::Wait(max_wait),
    };
    let deadline = waiting_since
        .saturating_add(signed(max_wait))
        .unwrap_or(Timestamp::MAX);
    if deadline > facts.now {
        return Decision::Wait(until(facts.now, deadline));
    }
    if let Some((cause, _)) = lane.episode {
        return match fallback.refusal(namespace) {
            None => Decision::Move {
                to: fallback.name.clone(),
                cause,
            },
            Some(_) => Decision::Wait(FREE_RUNNER_POLL),
        };
    }
    // Its own lane's runners will run it: it moves only to a free runner of the fallback
    // lane, and waits its turn while there is none (the fallback lane busy, down or full).
    let free = fallback.running < usize::try_from(fallback.fresh).unwrap_or(0);
    if free && fallback.refusal(namespace).is_none() {
        Decision::Move {
            to: fallback.name.clone(),
            cause: FallbackCause::Capacity,
        }
    } else {
        Decision::Wait(FREE_RUNNER_POLL)
    }
}

fn timed_out(lane: &LaneFacts, fallback: Option<String>) -> String {
    let also = fallback.map_or(String::new(), |why| format!(" and {why}"));
    format!(
        "lane {} had no available runner for {} s (maxWaitSeconds){also}; check its runner pods \
         (kubectl get pods -n {} -l framelane.dev/lane={}) and create the job again",
        lane.name,
        lane.limits.max_wait.as_secs(),
        lane.pods_namespace,
        lane.name
    )
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
    use serde_json::json;

    use super::*;

    fn job(status: serde_json::Value) -> VideoJob {
        serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": "j", "namespace": "ns"},
            "spec": {"model": "anisora", "prompt": "a cat", "ttlSecondsAfterFinished": 60},
            "status": status,
        }))
        .unwrap()
    }
    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }
    fn micro(secs: i64) -> serde_json::Value {
        serde_json::to_value(MicroTime(t(secs))).unwrap()
    }
    /// Both test lanes' queue limits.
    const LIMITS: QueueLimits = QueueLimits {
        max_depth: 25,
        max_wait: Duration::from_secs(30),
        max_per_namespace: None,
        job_deadline: Duration::from_secs(3600),
    };

    fn lane(depth: usize, unavailable_since: Option<Timestamp>) -> Result<LaneFacts, NoLane> {
        Ok(LaneFacts {
            name: "anisora".into(),
            pods_namespace: "framelane-system".into(),
            limits: LIMITS,
            held: Occupancy {
                depth,
                namespace: depth,
            },
            unavailable_since,
            fresh: i32::from(unavailable_since.is_none()),
            running: 0,
            episode: None,
            fallback: None,
        })
    }
    fn gone() -> Result<LaneFacts, NoLane> {
        Err(NoLane::Deleted("anisora".into()))
    }
    fn facts(now: i64, lane: Result<LaneFacts, NoLane>, runner_fresh_until: Option<i64>) -> Facts {
        Facts {
            now: t(now),
            lane,
            runner_fresh_until: runner_fresh_until.map(t),
            invalid: None,
            max_attempts: 3,
        }
    }

    #[test]
    fn a_new_job_is_admitted_until_the_lane_is_full() {
        let new = job(json!(null));
        assert_eq!(
            decide(&new, &facts(0, lane(24, None), None)),
            Decision::Admit {
                lane: "anisora".into()
            }
        );
        let Decision::Fail { reason, message } = decide(&new, &facts(0, lane(25, None), None))
        else {
            panic!()
        };
        assert_eq!(reason, JobReason::QueueOverloaded);
        assert!(
            message.starts_with("queue_overloaded: lane anisora holds 25"),
            "{message}"
        );
        let no_lane = Err(NoLane::Route(RouteError::NoLane { model: "x".into() }));
        let Decision::Fail { reason, message } = decide(&new, &facts(0, no_lane, None)) else {
            panic!()
        };
        assert_eq!(reason, JobReason::LaneNotFound);
        assert_eq!(
            message,
            "no ModelLane serves model x; create one (kubectl get modellanes shows the lanes)"
        );
    }

    #[test]
    fn a_queued_job_times_out_only_after_max_wait_without_a_runner() {
        let queued = job(json!({"phase": "Queued", "queuedAt": micro(0)}));
        assert_eq!(
            decide(&queued, &facts(100, lane(1, None), None)),
            Decision::Wait(Duration::from_secs(30))
        );
        // The lane went down at 10 s: the clock starts then, not at admission.
        assert!(matches!(
            decide(&queued, &facts(39, lane(1, Some(t(10))), None)),
            Decision::Wait(_)
        ));
        let Decision::Fail { reason, .. } = decide(&queued, &facts(40, lane(1, Some(t(10))), None))
        else {
            panic!()
        };
        assert_eq!(reason, JobReason::QueueWaitTimeout);
        // Admitted after the lane went down: its own wait counts.
        let late = job(json!({"phase": "Queued", "queuedAt": micro(20)}));
        assert!(matches!(
            decide(&late, &facts(45, lane(1, Some(t(10))), None)),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn a_job_queued_long_before_its_lane_went_down_still_gets_max_wait() {
        // Queued at 0 behind a live runner; the lane's last runner went away at 100.
        let queued = job(json!({"phase": "Queued", "queuedAt": micro(0)}));
        assert_eq!(
            decide(&queued, &facts(101, lane(1, Some(t(100))), None)),
            Decision::Wait(Duration::from_millis(29_100)),
            "waits out maxWaitSeconds from the outage, not from its admission"
        );
        assert!(matches!(
            decide(&queued, &facts(129, lane(1, Some(t(100))), None)),
            Decision::Wait(_)
        ));
        let Decision::Fail { reason, .. } =
            decide(&queued, &facts(130, lane(1, Some(t(100))), None))
        else {
            panic!()
        };
        assert_eq!(reason, JobReason::QueueWaitTimeout);
    }

    #[test]
    fn a_queued_job_whose_lane_was_deleted_fails_with_lane_not_found() {
        let queued = job(json!({"phase": "Queued", "lane": "anisora", "queuedAt": micro(0)}));
        assert_eq!(
            decide(&queued, &facts(1, gone(), None)),
            Decision::Fail {
                reason: JobReason::LaneNotFound,
                message: "lane anisora was deleted; create the job again once a lane serves \
                          its model"
                    .into()
            }
        );
    }

    #[test]
    fn a_lost_runner_requeues_then_fails_with_runner_lost() {
        let running =
            |attempts: i32| job(json!({"phase": "Running", "runner": "r-0", "attempts": attempts}));
        assert!(matches!(
            decide(&running(1), &facts(10, lane(1, None), Some(20))),
            Decision::Wait(_)
        ));
        assert_eq!(
            decide(&running(1), &facts(10, lane(1, None), Some(5))),
            Decision::Requeue
        );
        assert_eq!(
            decide(&running(2), &facts(10, lane(1, None), None)),
            Decision::Requeue
        );
        let Decision::Fail { reason, .. } = decide(&running(3), &facts(10, lane(1, None), None))
        else {
            panic!()
        };
        assert_eq!(reason, JobReason::RunnerLost);
    }

    #[test]
    fn a_running_job_fails_deadline_exceeded_once_it_ran_its_deadline() {
        let running = |deadline_seconds: Option<i32>| {
            let mut j = job(
                json!({"phase": "Running", "runner": "r-0", "attempts": 1, "startedAt": micro(0)}),
            );
            j.spec.deadline_seconds = deadline_seconds;
            j
        };
        let exceeded = |decision: Decision| {
            matches!(decision, Decision::Fail { reason: JobReason::DeadlineExceeded, message }
                if message.contains("ran 3600 s on runner r-0") || message.contains("ran 60 s on runner r-0"))
        };
        // A live runner heartbeating: look again when its heartbeat or the deadline is due.
        assert_eq!(
            decide(&running(None), &facts(100, lane(1, None), Some(110))),
            Decision::Wait(Duration::from_millis(10_100))
        );
        assert_eq!(
            decide(&running(None), &facts(3595, lane(1, None), Some(3605))),
            Decision::Wait(Duration::from_millis(5_100))
        );
        assert!(exceeded(decide(
            &running(None),
            &facts(3600, lane(1, None), Some(3610))
        )));
        // Its runner dead too: past the deadline it fails rather than running again.
        assert!(exceeded(decide(
            &running(None),
            &facts(3600, lane(1, None), None)
        )));
        // The job's own deadline wins over its lane's, shorter or longer.
        assert!(exceeded(decide(
            &running(Some(60)),
            &facts(60, lane(1, None), Some(70))
        )));
        let short = with(lane(1, None), |l| {
            l.limits.job_deadline = Duration::from_secs(30)
        });
        assert!(matches!(
            decide(&running(Some(60)), &facts(45, short.clone(), Some(55))),
            Decision::Wait(_)
        ));
        assert!(matches!(
            decide(&running(None), &facts(30, short, Some(55))),
            Decision::Fail {
                reason: JobReason::DeadlineExceeded,
                ..
            }
        ));
        // Its lane deleted meanwhile: the default deadline still holds.
        assert!(matches!(
            decide(&running(None), &facts(3599, gone(), Some(3610))),
            Decision::Wait(_)
        ));
        assert!(exceeded(decide(
            &running(None),
            &facts(3600, gone(), Some(3610))
        )));
    }

    #[test]
    fn terminal_states_are_final_and_expire_by_ttl() {
        let finished = |phase: &str| {
            job(json!({"phase": phase, "finishedAt": micro(0), "queuedAt": micro(-5)}))
        };
        for phase in ["Succeeded", "Failed"] {
            // Even with the lane gone and its runner dead, a finished job stays as it is.
            assert!(matches!(
                decide(&finished(phase), &facts(30, gone(), None)),
                Decision::Wait(_)
            ));
            assert_eq!(
                decide(&finished(phase), &facts(60, lane(0, None), None)),
                Decision::Delete
            );
        }
    }

    #[test]
    fn deleting_cancels_at_once_unless_a_live_runner_is_stopping_it() {
        let mut queued = job(json!({"phase": "Queued", "queuedAt": micro(0)}));
        queued.metadata.deletion_timestamp = Some(Time(t(1)));
        assert_eq!(
            decide(&queued, &facts(2, lane(1, None), None)),
            Decision::Release
        );
        let mut running = job(json!({"phase": "Running", "runner": "r-0", "attempts": 1}));
        running.metadata.deletion_timestamp = Some(Time(t(1)));
        assert!(matches!(
            decide(&running, &facts(2, lane(1, None), Some(10))),
            Decision::Wait(_)
        ));
        assert_eq!(
            decide(&running, &facts(11, lane(1, None), Some(10))),
            Decision::Release
        );
        // A runner hung in a step keeps heartbeating and never stops: past the job's deadline
        // (where it would have failed DeadlineExceeded) the deletion goes through.
        let mut hung =
            job(json!({"phase": "Running", "runner": "r-0", "attempts": 1, "startedAt": micro(0)}));
        hung.metadata.deletion_timestamp = Some(Time(t(3000)));
        assert_eq!(
            decide(&hung, &facts(3595, lane(1, None), Some(3605))),
            Decision::Wait(Duration::from_millis(5_100))
        );
        assert_eq!(
            decide(&hung, &facts(3600, lane(1, None), Some(3610))),
            Decision::Release
        );
    }

    fn shared(fresh: i32, running: usize, depth: usize) -> Option<FallbackFacts> {
        Some(FallbackFacts {
            name: "shared".into(),
            limits: LIMITS,
            held: Occupancy {
                depth,
                namespace: 0,
            },
            fresh,
            running,
            does_not_fit: None,
        })
    }

    fn with(
        lane: Result<LaneFacts, NoLane>,
        change: impl FnOnce(&mut LaneFacts),
    ) -> Result<LaneFacts, NoLane> {
        let mut lane = lane.unwrap();
        change(&mut lane);
        Ok(lane)
    }

    fn moved(cause: FallbackCause) -> Decision {
        Decision::Move {
            to: "shared".into(),
            cause,
        }
    }

    #[test]
    fn a_job_of_a_lane_without_runners_moves_to_a_fallback_lane_that_can_take_it() {
        let queued = job(json!({"phase": "Queued", "queuedAt": micro(0), "laneMode": "Dedicated"}));
        let down = |fallback| with(lane(1, Some(t(0))), |l| l.fallback = fallback);
        assert!(matches!(
            decide(&queued, &facts(29, down(shared(1, 1, 3)), None)),
            Decision::Wait(_)
        ));
        assert_eq!(
            decide(&queued, &facts(30, down(shared(1, 1, 3)), None)),
            moved(FallbackCause::Capacity)
        );
        for (fallback, why) in [
            (
                shared(0, 0, 0),
                "its fallback lane shared has no available runner either",
            ),
            (
                shared(1, 0, 25),
                "its fallback lane shared is full (queue_overloaded: lane shared holds 25",
            ),
        ] {
            let Decision::Fail { reason, message } =
                decide(&queued, &facts(30, down(fallback), None))
            else {
                panic!()
            };
            assert_eq!(reason, JobReason::QueueWaitTimeout);
            assert!(message.contains(why), "{message}");
            assert!(
                message
                    .contains("kubectl get pods -n framelane-system -l framelane.dev/lane=anisora"),
                "the runner pods are in the operator's namespace: {message}"
            );
        }
        // Already on the fallback lane: it does not move again.
        let on_shared =
            job(json!({"phase": "Queued", "queuedAt": micro(0), "laneMode": "Fallback"}));
        assert!(matches!(
            decide(&on_shared, &facts(30, down(shared(1, 0, 0)), None)),
            Decision::Fail {
                reason: JobReason::QueueWaitTimeout,
                ..
            }
        ));
    }

    #[test]
    fn a_job_behind_busy_runners_moves_only_to_a_free_fallback_runner() {
        let queued = job(json!({"phase": "Queued", "queuedAt": micro(0)}));
        let busy = |fallback| {
            with(lane(2, None), |l| {
                l.running = 1;
                l.fallback = fallback;
            })
        };
        assert_eq!(
            decide(&queued, &facts(10, busy(shared(1, 0, 0)), None)),
            Decision::Wait(Duration::from_millis(20_100)),
            "waits maxWaitSeconds first"
        );
        assert_eq!(
            decide(&queued, &facts(30, busy(shared(1, 0, 0)), None)),
            moved(FallbackCause::Capacity)
        );
        assert_eq!(
            decide(&queued, &facts(30, busy(shared(1, 1, 1)), None)),
            Decision::Wait(FREE_RUNNER_POLL),
            "the fallback lane is busy too: it stays queued"
        );
        assert_eq!(
            decide(&queued, &facts(30, busy(shared(0, 0, 0)), None)),
            Decision::Wait(FREE_RUNNER_POLL),
            "the fallback lane is down: it waits its turn on its own busy lane"
        );
        assert_eq!(
            decide(&queued, &facts(30, busy(shared(1, 0, 25)), None)),
            Decision::Wait(FREE_RUNNER_POLL),
            "the fallback lane is full: the same"
        );
        let idle = with(lane(2, None), |l| l.fallback = shared(1, 0, 0));
        assert_eq!(
            decide(&queued, &facts(300, idle, None)),
            Decision::Wait(Duration::from_secs(30)),
            "a free runner of its own lane will take it"
        );
        assert_eq!(
            decide(&queued, &facts(300, busy(None), None)),
            Decision::Wait(Duration::from_secs(30)),
            "no fallback lane: it waits its turn"
        );
    }

    #[test]
    fn a_job_given_back_to_the_queue_waits_max_wait_anew() {
        // Admitted at 0, run, and given back at 600 (its runner was lost, or stopping) while
        // the lane's other runner is busy.
        let requeued = job(
            json!({"phase": "Queued", "queuedAt": micro(0), "attempts": 1,
            "reason": "Requeued", "conditions": [{"type": "Running", "status": "False",
                "reason": "Requeued", "message": "runner r-0 is stopping",
                "lastTransitionTime": serde_json::to_value(Time(t(600))).unwrap()}]}),
        );
        let busy = |fallback| {
            with(lane(2, None), |l| {
                l.running = 1;
                l.fallback = fallback;
            })
        };
        assert_eq!(
            decide(&requeued, &facts(610, busy(shared(0, 0, 0)), None)),
            Decision::Wait(Duration::from_millis(20_100)),
            "it waits maxWaitSeconds from its requeue, not from its admission"
        );
        assert_eq!(
            decide(&requeued, &facts(610, busy(shared(1, 0, 0)), None)),
            Decision::Wait(Duration::from_millis(20_100))
        );
        assert_eq!(
            decide(&requeued, &facts(630, busy(shared(1, 0, 0)), None)),
            moved(FallbackCause::Capacity)
        );
        // Its lane lost its runners before the requeue: the wait counts from the requeue too.
        let down = with(lane(2, Some(t(560))), |l| l.fallback = shared(0, 0, 0));
        assert!(matches!(
            decide(&requeued, &facts(620, down, None)),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn a_job_never_moves_to_a_fallback_lane_whose_runners_cannot_fit_it() {
        let queued = job(json!({"phase": "Queued", "queuedAt": micro(0)}));
        let too_small = || {
            shared(1, 0, 0).map(|f| FallbackFacts {
                does_not_fit: Some(
                    "needs 31 GiB to denoise; lane shared's runners have 20 GiB usable".into(),
                ),
                ..f
            })
        };
        // Its own lane down: it fails when its wait ends, saying why it did not move.
        let down = with(lane(1, Some(t(0))), |l| l.fallback = too_small());
        let Decision::Fail { reason, message } = decide(&queued, &facts(30, down, None)) else {
            panic!()
        };
        assert_eq!(reason, JobReason::QueueWaitTimeout);
        assert!(
            message.contains("its fallback lane shared cannot run it (needs 31 GiB to denoise;"),
            "{message}"
        );
        // Its own runners busy, or in an episode: it waits its turn there.
        let busy = with(lane(2, None), |l| {
            l.running = 2;
            l.fallback = too_small();
        });
        assert_eq!(
            decide(&queued, &facts(300, busy, None)),
            Decision::Wait(Duration::from_secs(30))
        );
        let manual = with(lane(2, None), |l| {
            l.episode = Some((FallbackCause::Manual, t(100)));
            l.fallback = too_small();
        });
        assert_eq!(
            decide(&queued, &facts(300, manual, None)),
            Decision::Wait(Duration::from_secs(30))
        );
    }

    #[test]
    fn a_job_of_a_lane_in_fallback_moves_after_max_wait_from_the_episode_start() {
        let queued = job(json!({"phase": "Queued", "queuedAt": micro(0)}));
        let manual = |fallback| {
            with(lane(2, None), |l| {
                l.episode = Some((FallbackCause::Manual, t(100)));
                l.fallback = fallback;
            })
        };
        assert_eq!(
            decide(&queued, &facts(110, manual(shared(1, 1, 1)), None)),
            Decision::Wait(Duration::from_millis(20_100))
        );
        assert_eq!(
            decide(&queued, &facts(130, manual(shared(1, 1, 1)), None)),
            moved(FallbackCause::Manual)
        );
        assert_eq!(
            decide(&queued, &facts(130, manual(shared(0, 0, 0)), None)),
            Decision::Wait(FREE_RUNNER_POLL),
            "its own runners may still run it"
        );
    }

    #[test]
    fn a_new_job_that_does_not_fit_its_model_fails_before_admission() {
        let new = job(json!(null));
        let mut f = facts(0, lane(0, None), None);
        f.invalid =
            Some("VideoJob \"j\" does not fit model \"anisora\": spec.steps: must be 8".into());
        assert_eq!(
            decide(&new, &f),
            Decision::Fail {
                reason: JobReason::InvalidParameters,
                message: "VideoJob \"j\" does not fit model \"anisora\": spec.steps: must be 8"
                    .into()
            }
        );
    }
}
