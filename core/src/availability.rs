//! Can a lane run jobs now? A lane is available while at least one of its runners has a fresh
//! heartbeat Lease; when none has, since when matters (queued jobs' waits count from then).

use framelane_api::{ModelLane, reasons::LaneCondition};
use jiff::{RoundMode, SignedDuration, Timestamp, TimestampRound, Unit};
use k8s_openapi::api::coordination::v1::Lease;

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

/// When a heartbeat Lease stops being fresh: its renewTime plus its duration.
pub fn fresh_until(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0;
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    renewed.checked_add(SignedDuration::from_secs(secs)).ok()
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
    let recorded = lane.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == LaneCondition::Available.as_str())
    });
    let unavailable_since = (fresh == 0).then(|| {
        let on_record = match recorded {
            Some(c) if c.status == "False" => c.last_transition_time.0,
            Some(_) => now,
            None => lane
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(now, |t| t.0),
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
    fn lane(name: &str, mode: &str, models: &[&str]) -> ModelLane {
        let mut l: ModelLane = serde_json::from_value(
            json!({"apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane",
            "metadata": {"name": name}, "spec": {"mode": mode, "models": models}}),
        )
        .unwrap();
        l.metadata.creation_timestamp = Some(Time(t(0)));
        l
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
