//! What the controller does with a job, decided from plain facts (no client), so every
//! transition is unit-tested. Terminal states are final: nothing here leaves Succeeded or
//! Failed except deletion.

use std::time::Duration;

use framelane_api::{VideoJob, videojob::JobPhase, wellknown::Reason};
use jiff::{SignedDuration, Timestamp};

/// What the controller knows about the lane a job is (or would be) in.
#[derive(Clone, Debug, PartialEq)]
pub struct LaneFacts {
    pub name: String,
    pub max_depth: usize,
    pub max_wait: Duration,
    /// Unfinished jobs the lane holds now.
    pub depth: usize,
    /// Since when the lane has had no fresh runner; `None` while it has one.
    pub unavailable_since: Option<Timestamp>,
}

/// Everything `decide` looks at besides the job.
#[derive(Clone, Debug)]
pub struct Facts {
    pub now: Timestamp,
    /// The lane the job is routed to (new job) or sits in; `Err` says why there is none.
    pub lane: Result<LaneFacts, String>,
    /// For a Running job: whether its runner's heartbeat is fresh, and until when.
    pub runner_fresh_until: Option<Timestamp>,
    pub max_attempts: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Put the new job in `lane`'s queue.
    Admit { lane: String },
    /// Fail the job (not yet terminal) with a reason and a message saying what to do.
    Fail { reason: Reason, message: String },
    /// Its runner died: back to its old place in the queue, for another attempt.
    Requeue,
    /// `ttlSecondsAfterFinished` has passed: delete it.
    Delete,
    /// Deleted and nothing runs it any more: drop the finalizer so it goes away.
    Release,
    /// Nothing to do now; look again after this long.
    Wait(Duration),
}

/// The one place where a job's next step is decided.
pub fn decide(job: &VideoJob, facts: &Facts) -> Decision {
    let status = job.status.clone().unwrap_or_default();
    let deleted = job.metadata.deletion_timestamp.is_some();
    let runner_alive = facts.runner_fresh_until.is_some_and(|t| t > facts.now);
    match status.phase {
        Some(JobPhase::Running) if deleted && runner_alive => {
            // The runner sees the deletion and stops at the next step boundary.
            Decision::Wait(until(
                facts.now,
                facts.runner_fresh_until.unwrap_or(facts.now),
            ))
        }
        _ if deleted => Decision::Release,
        None => admit(&facts.lane),
        Some(JobPhase::Queued) => queued(&status.queued_at.map(|t| t.0), facts),
        Some(JobPhase::Running) if runner_alive => Decision::Wait(until(
            facts.now,
            facts.runner_fresh_until.unwrap_or(facts.now),
        )),
        Some(JobPhase::Running) => {
            let runner = status.runner.as_deref().unwrap_or("?");
            let attempts = status.attempts.unwrap_or(1);
            if attempts < facts.max_attempts {
                Decision::Requeue
            } else {
                Decision::Fail {
                    reason: Reason::RunnerLost,
                    message: format!(
                        "runner {runner} stopped sending heartbeats mid-job, and the job has now lost {attempts} runners \
                         (limit {}); look at the runner pods' logs (OOM kills, node failures), then create the job again",
                        facts.max_attempts
                    ),
                }
            }
        }
        Some(JobPhase::Succeeded | JobPhase::Failed) => {
            let ttl = job.spec.ttl_seconds_after_finished;
            match (ttl, status.finished_at) {
                (Some(ttl), Some(finished)) => {
                    let expiry = finished.0 + SignedDuration::from_secs(i64::from(ttl));
                    if expiry <= facts.now {
                        Decision::Delete
                    } else {
                        Decision::Wait(until(facts.now, expiry))
                    }
                }
                _ => Decision::Wait(Duration::ZERO),
            }
        }
    }
}

fn admit(lane: &Result<LaneFacts, String>) -> Decision {
    match lane {
        Err(why) => Decision::Fail {
            reason: Reason::LaneNotFound,
            message: why.clone(),
        },
        Ok(lane) if lane.depth >= lane.max_depth => Decision::Fail {
            reason: Reason::QueueOverloaded,
            message: format!(
                "queue_overloaded: lane {} holds {} unfinished jobs (maxDepth {}); create the job again once some finish",
                lane.name, lane.depth, lane.max_depth
            ),
        },
        Ok(lane) => Decision::Admit {
            lane: lane.name.clone(),
        },
    }
}

fn queued(queued_at: &Option<Timestamp>, facts: &Facts) -> Decision {
    let Ok(lane) = &facts.lane else {
        return Decision::Wait(Duration::from_secs(5));
    };
    let Some(down_since) = lane.unavailable_since else {
        // The lane has a runner: the job waits its turn, however long the queue.
        return Decision::Wait(lane.max_wait);
    };
    let waiting_since = queued_at.map_or(down_since, |q| q.max(down_since));
    let deadline =
        waiting_since + SignedDuration::try_from(lane.max_wait).unwrap_or(SignedDuration::MAX);
    if deadline <= facts.now {
        // The seam for fallback routing: a later change moves the job to the lane's
        // fallback lane here instead of failing it.
        Decision::Fail {
            reason: Reason::QueueWaitTimeout,
            message: format!(
                "lane {} had no available runner for {} s (maxWaitSeconds); check its runner pods \
                 (kubectl get pods -l framelane.dev/lane={}) and create the job again",
                lane.name,
                lane.max_wait.as_secs(),
                lane.name
            ),
        }
    } else {
        Decision::Wait(until(facts.now, deadline))
    }
}

fn until(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(then.duration_since(now)).unwrap_or(Duration::ZERO)
        + Duration::from_millis(100)
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
    fn lane(depth: usize, unavailable_since: Option<Timestamp>) -> Result<LaneFacts, String> {
        Ok(LaneFacts {
            name: "anisora".into(),
            max_depth: 25,
            max_wait: Duration::from_secs(30),
            depth,
            unavailable_since,
        })
    }
    fn facts(now: i64, lane: Result<LaneFacts, String>, runner_fresh_until: Option<i64>) -> Facts {
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
        assert_eq!(reason, Reason::QueueOverloaded);
        assert!(
            message.starts_with("queue_overloaded: lane anisora holds 25"),
            "{message}"
        );
        let Decision::Fail { reason, .. } =
            decide(&new, &facts(0, Err("no lane serves model x".into()), None))
        else {
            panic!()
        };
        assert_eq!(reason, Reason::LaneNotFound);
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
        assert_eq!(reason, Reason::QueueWaitTimeout);
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
        assert_eq!(reason, Reason::QueueWaitTimeout);
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
        assert_eq!(reason, Reason::RunnerLost);
    }

    #[test]
    fn terminal_states_are_final_and_expire_by_ttl() {
        let finished = |phase: &str| {
            job(json!({"phase": phase, "finishedAt": micro(0), "queuedAt": micro(-5)}))
        };
        for phase in ["Succeeded", "Failed"] {
            // Even with the lane gone and its runner dead, a finished job stays as it is.
            assert!(matches!(
                decide(&finished(phase), &facts(30, Err("gone".into()), None)),
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
