//! What happens next to a job? One decision from plain facts (the job, its lane, its
//! runner's heartbeat), so every transition is unit-tested. Terminal states are final:
//! nothing here leaves Succeeded or Failed except deletion.

use std::time::Duration;

use framelane_api::{VideoJob, reasons::JobReason, videojob::JobPhase};
use jiff::Timestamp;

use crate::{
    depth::{QueueLimits, room},
    routing::RouteError,
    timeouts::{expiry, queue_wait_deadline, runner_alive, until},
};

/// What the controller knows about the lane a job is (or would be) in.
#[derive(Clone, Debug, PartialEq)]
pub struct LaneFacts {
    pub name: String,
    pub limits: QueueLimits,
    /// Unfinished jobs the lane holds now.
    pub depth: usize,
    /// Since when the lane has had no fresh runner; `None` while it has one.
    pub unavailable_since: Option<Timestamp>,
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
    let deleted = job.metadata.deletion_timestamp.is_some();
    let alive = runner_alive(facts.runner_fresh_until, facts.now);
    let runner_expiry = || until(facts.now, facts.runner_fresh_until.unwrap_or(facts.now));
    match status.phase {
        // The runner sees the deletion and stops at the next step boundary.
        Some(JobPhase::Running) if deleted && alive => Decision::Wait(runner_expiry()),
        _ if deleted => Decision::Release,
        None => admit(&facts.lane),
        Some(JobPhase::Queued) => queued(status.queued_at.map(|t| t.0), facts),
        Some(JobPhase::Running) if alive => Decision::Wait(runner_expiry()),
        Some(JobPhase::Running) => {
            let runner = status.runner.as_deref().unwrap_or("?");
            let attempts = status.attempts.unwrap_or(1);
            if attempts < facts.max_attempts {
                Decision::Requeue
            } else {
                Decision::Fail {
                    reason: JobReason::RunnerLost,
                    message: format!(
                        "runner {runner} stopped sending heartbeats mid-job, and the job has now lost {attempts} runners \
                         (limit {}); look at the runner pods' logs (OOM kills, node failures), then create the job again",
                        facts.max_attempts
                    ),
                }
            }
        }
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

fn admit(lane: &Result<LaneFacts, NoLane>) -> Decision {
    match lane {
        Err(why) => Decision::Fail {
            reason: JobReason::LaneNotFound,
            message: why.to_string(),
        },
        Ok(lane) => match room(&lane.name, lane.depth, lane.limits) {
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

fn queued(queued_at: Option<Timestamp>, facts: &Facts) -> Decision {
    let Ok(lane) = &facts.lane else {
        return Decision::Wait(Duration::from_secs(5));
    };
    let max_wait = lane.limits.max_wait;
    match queue_wait_deadline(queued_at, lane.unavailable_since, max_wait) {
        // The lane has a runner: the job waits its turn, however long the queue.
        None => Decision::Wait(max_wait),
        Some(deadline) if deadline <= facts.now => Decision::Fail {
            reason: JobReason::QueueWaitTimeout,
            message: format!(
                "lane {} had no available runner for {} s (maxWaitSeconds); check its runner pods \
                 (kubectl get pods -l framelane.dev/lane={}) and create the job again",
                lane.name,
                max_wait.as_secs(),
                lane.name
            ),
        },
        Some(deadline) => Decision::Wait(until(facts.now, deadline)),
    }
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
    fn lane(depth: usize, unavailable_since: Option<Timestamp>) -> Result<LaneFacts, NoLane> {
        Ok(LaneFacts {
            name: "anisora".into(),
            limits: QueueLimits {
                max_depth: 25,
                max_wait: Duration::from_secs(30),
            },
            depth,
            unavailable_since,
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
    }
}
