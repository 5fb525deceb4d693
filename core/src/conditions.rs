//! How a condition changes: `lastTransitionTime` moves only when the status flips, and is
//! computed here and nowhere else. Conditions are typed by kind: a job's take a
//! [`JobCondition`] and a [`JobReason`], a lane's a [`LaneCondition`] and a [`LaneReason`].

use framelane_api::reasons::{JobCondition, JobReason, LaneCondition, LaneReason};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What a condition says now.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed<'a> {
    pub status: bool,
    pub message: &'a str,
    pub generation: Option<i64>,
    pub now: Timestamp,
}

/// Sets a job condition.
pub fn set_job(
    conditions: &mut Vec<Condition>,
    type_: JobCondition,
    reason: JobReason,
    observed: Observed,
) {
    set(conditions, type_.as_str(), reason.as_str(), observed);
}

/// Sets a lane condition.
pub fn set_lane(
    conditions: &mut Vec<Condition>,
    type_: LaneCondition,
    reason: LaneReason,
    observed: Observed,
) {
    set(conditions, type_.as_str(), reason.as_str(), observed);
}

/// The job condition of `type_`, if set.
pub fn job_condition(conditions: &[Condition], type_: JobCondition) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// The lane condition of `type_`, if set.
pub fn lane_condition(conditions: &[Condition], type_: LaneCondition) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// Whether the lane condition of `type_` is set and True.
pub fn lane_condition_true(conditions: &[Condition], type_: LaneCondition) -> bool {
    lane_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Removes the lane condition of `type_`.
pub fn remove_lane(conditions: &mut Vec<Condition>, type_: LaneCondition) {
    conditions.retain(|c| c.type_ != type_.as_str());
}

fn set(conditions: &mut Vec<Condition>, type_: &str, reason: &str, observed: Observed) {
    let status = if observed.status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(observed.now);
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = observed.message.into();
            c.observed_generation = observed.generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: observed.message.into(),
            observed_generation: observed.generation,
            last_transition_time: Time(observed.now),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn observed(status: bool, message: &str, secs: i64) -> Observed<'_> {
        Observed {
            status,
            message,
            generation: Some(1),
            now: at(secs),
        }
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_flips() {
        let mut c = Vec::new();
        let ready = LaneReason::Ready;
        set_lane(
            &mut c,
            LaneCondition::Available,
            ready,
            observed(true, "1 of 1", 0),
        );
        set_lane(
            &mut c,
            LaneCondition::Available,
            ready,
            observed(true, "2 of 2", 5),
        );
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].last_transition_time.0, c[0].message.as_str()),
            (at(0), "2 of 2")
        );
        let down = LaneReason::Unavailable;
        set_lane(
            &mut c,
            LaneCondition::Available,
            down,
            observed(false, "0 of 2", 9),
        );
        assert_eq!(
            (
                c[0].status.as_str(),
                c[0].reason.as_str(),
                c[0].last_transition_time.0
            ),
            ("False", "Unavailable", at(9))
        );
        assert!(!lane_condition_true(&c, LaneCondition::Available));
        remove_lane(&mut c, LaneCondition::Available);
        assert!(c.is_empty());
    }
}
