//! How long may things take? A queued job's wait for a runner, a running job's runner before
//! it counts as lost, a running job before its deadline, and a finished job before its TTL
//! deletes it.

use std::time::Duration;

use framelane_api::{VideoJobStatus, reasons::JobCondition};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;

use crate::{availability::fresh_until, conditions::job_condition};

/// Since when a queued job has waited: its admission (`queuedAt`, its place in the queue) or,
/// for a job given back to the queue (its runner was lost, or stopping), the moment it left
/// Running, whichever is later. A requeued job waits `maxWaitSeconds` anew before it moves or
/// fails: the wait before its first run is over.
pub fn waiting_since(status: &VideoJobStatus) -> Option<Timestamp> {
    let queued_at = status.queued_at.as_ref().map(|t| t.0);
    let left_running = job_condition(&status.conditions, JobCondition::Running)
        .filter(|c| c.status == "False")
        .map(|c| c.last_transition_time.0);
    match (queued_at, left_running) {
        (Some(q), Some(r)) => Some(q.max(r)),
        (q, r) => q.or(r),
    }
}

/// When a queued job has waited long enough for a runner: `max_wait` after the later of its
/// admission and the moment its lane lost its last runner. `None` while the lane has a fresh
/// runner: a job behind busy runners waits its turn.
pub fn queue_wait_deadline(
    queued_at: Option<Timestamp>,
    unavailable_since: Option<Timestamp>,
    max_wait: Duration,
) -> Option<Timestamp> {
    let down_since = unavailable_since?;
    let waiting_since = queued_at.map_or(down_since, |q| q.max(down_since));
    Some(plus(waiting_since, signed(max_wait)))
}

/// How long a job may run when neither it nor its lane says: long enough for any model's
/// longest video, short enough that a hung runner gives its slot back the same hour.
pub const DEFAULT_JOB_DEADLINE: Duration = Duration::from_secs(3600);

/// When a running job has run too long: `deadline` after its runner claimed it. A requeued
/// job's next attempt gets the whole deadline again.
pub fn run_deadline(started_at: Option<Timestamp>, deadline: Duration) -> Option<Timestamp> {
    Some(plus(started_at?, signed(deadline)))
}

/// Until when the runner holding a running job is fresh: its heartbeat Lease's freshness, while
/// the Lease still names the job's holder (`status.runnerIncarnation`). A runner restarted
/// under the same pod name renews that Lease as a new holder, so the job its earlier start
/// held is lost at once instead of looking alive for as long as the new start renews.
///
/// `seen_since` is when the operator's view of the Leases last came back whole (it began
/// leading, or its watch of them recovered from a failure). Nobody can renew while the API
/// server is unreachable, so a holder stays fresh for a whole lease duration after that: an
/// outage is not mistaken for a dead runner.
pub fn holder_fresh_until(
    lease: &Lease,
    incarnation: Option<&str>,
    seen_since: Timestamp,
) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != incarnation {
        return None;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let grace = plus(seen_since, duration);
    Some(fresh_until(lease).map_or(grace, |renewed| renewed.max(grace)))
}

/// Whether a running job's runner still counts as alive: its heartbeat is fresh.
pub fn runner_alive(fresh_until: Option<Timestamp>, now: Timestamp) -> bool {
    fresh_until.is_some_and(|t| t > now)
}

/// When a finished job is deleted: `ttlSecondsAfterFinished` after it finished.
pub fn expiry(finished_at: Option<Timestamp>, ttl_seconds: Option<i32>) -> Option<Timestamp> {
    Some(plus(
        finished_at?,
        SignedDuration::from_secs(i64::from(ttl_seconds?)),
    ))
}

/// How long from `now` until `then`, plus a margin so that a timer set with it fires after
/// the moment, not just before.
pub fn until(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(then.duration_since(now)).unwrap_or(Duration::ZERO)
        + Duration::from_millis(100)
}

/// `t + d`, or the end of time when that is past it: a far-future timestamp stored in a status
/// must not panic the operator.
fn plus(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime,
    };

    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn a_queued_job_waits_max_wait_from_the_later_of_admission_and_outage() {
        let wait = Duration::from_secs(30);
        assert_eq!(queue_wait_deadline(Some(t(0)), None, wait), None);
        assert_eq!(
            queue_wait_deadline(Some(t(0)), Some(t(10)), wait),
            Some(t(40))
        );
        assert_eq!(
            queue_wait_deadline(Some(t(20)), Some(t(10)), wait),
            Some(t(50))
        );
        assert_eq!(queue_wait_deadline(None, Some(t(10)), wait), Some(t(40)));
    }

    #[test]
    fn a_runner_is_fresh_for_its_job_only_while_its_lease_names_the_jobs_holder() {
        let lease = |holder: Option<&str>| Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                renew_time: Some(MicroTime(t(100))),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        };
        let first = Some("uid-1/0123456789abcdef");
        let seen = t(0);
        assert_eq!(holder_fresh_until(&lease(first), first, seen), Some(t(115)));
        // The pod's container restarted: same Lease, renewed by a new start.
        let restarted = lease(Some("uid-1/fedcba9876543210"));
        assert_eq!(holder_fresh_until(&restarted, first, seen), None);
        assert!(!runner_alive(
            holder_fresh_until(&restarted, first, seen),
            t(101)
        ));
        // A job that records no holder is not held by a Lease that names one.
        assert_eq!(holder_fresh_until(&lease(first), None, seen), None);
        assert_eq!(holder_fresh_until(&Lease::default(), first, seen), None);
    }

    #[test]
    fn a_holder_gets_a_whole_lease_duration_after_the_operators_view_recovers() {
        let holder = Some("uid-1/0123456789abcdef");
        let renewed_at = |secs: i64| Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                renew_time: Some(MicroTime(t(secs))),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        };
        // Last renewed at 100, then the API server was unreachable until 160: the runner
        // could not renew, and has until 175 to do it.
        let fresh = holder_fresh_until(&renewed_at(100), holder, t(160));
        assert_eq!(fresh, Some(t(175)));
        assert!(runner_alive(fresh, t(170)));
        assert!(!runner_alive(fresh, t(175)));
        // A renewal after the recovery counts from itself.
        assert_eq!(
            holder_fresh_until(&renewed_at(165), holder, t(160)),
            Some(t(180))
        );
        // A view whole since long before: the renewal alone decides.
        assert_eq!(
            holder_fresh_until(&renewed_at(100), holder, t(0)),
            Some(t(115))
        );
        // A Lease never renewed is fresh for the grace alone.
        let mut never = renewed_at(0);
        never.spec.as_mut().unwrap().renew_time = None;
        assert_eq!(holder_fresh_until(&never, holder, t(160)), Some(t(175)));
        // Another holder is lost whatever the view.
        assert_eq!(
            holder_fresh_until(&renewed_at(100), Some("uid-1/other"), t(160)),
            None
        );
        // A far-future recovery saturates.
        assert_eq!(
            holder_fresh_until(&renewed_at(100), holder, Timestamp::MAX),
            Some(Timestamp::MAX)
        );
    }

    #[test]
    fn far_future_times_saturate_instead_of_overflowing() {
        let end = Timestamp::MAX;
        assert_eq!(
            queue_wait_deadline(Some(end), Some(end), Duration::from_secs(30)),
            Some(end)
        );
        assert_eq!(expiry(Some(end), Some(86_400)), Some(end));
        assert_eq!(run_deadline(Some(end), DEFAULT_JOB_DEADLINE), Some(end));
    }

    #[test]
    fn runners_and_finished_jobs_expire_on_time() {
        assert!(runner_alive(Some(t(5)), t(4)));
        assert!(!runner_alive(Some(t(5)), t(5)));
        assert!(!runner_alive(None, t(0)));
        assert_eq!(expiry(Some(t(0)), Some(60)), Some(t(60)));
        assert_eq!(expiry(Some(t(0)), None), None);
        assert_eq!(
            run_deadline(Some(t(0)), Duration::from_secs(60)),
            Some(t(60))
        );
        assert_eq!(run_deadline(None, Duration::from_secs(60)), None);
        assert_eq!(until(t(0), t(2)), Duration::from_millis(2_100));
        assert_eq!(until(t(3), t(2)), Duration::from_millis(100));
    }
}
