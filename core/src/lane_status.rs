//! What should a lane's status say, and which Events does a change imply? Computed from its
//! runners' availability, its queue depth and whether its pods could be created; the lane
//! reconciler writes the status and posts the Events.

use std::time::Duration;

use framelane_api::{
    ModelLane, ModelLaneStatus,
    modellane::LanePhase,
    reasons::{LaneCondition, LaneReason},
    wellknown::ALLOC_CONF_ENV,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::{
    availability::Availability,
    conditions::{Observed, lane_condition_true, remove_lane, set_lane},
    fallback::{self, Change, Trigger},
    timeouts::until,
};

/// What the lane reconciler observed.
#[derive(Clone, Debug, PartialEq)]
pub struct LaneFacts {
    pub availability: Availability,
    /// Unfinished jobs the lane holds.
    pub depth: usize,
    /// `Err`: why a runner pod could not be created (for example a ResourceQuota refusal).
    pub pods: Result<(), String>,
    /// The lane's own PYTORCH_CUDA_ALLOC_CONF, when `spec.runner.env` sets one.
    pub allocator_override: Option<String>,
    /// Why the lane would be in fallback now (`fallback::trigger`); it is only with a
    /// fallback lane.
    pub fallback: Option<Trigger>,
    /// `Err`: why the lane's `spec.fallback.lane` cannot take its jobs (it does not exist, or
    /// serves none of the lane's models); such a lane is never in fallback.
    pub fallback_lane: Result<(), String>,
    pub now: Timestamp,
}

/// The status a lane should have, the Events its changes imply, and what became of its
/// fallback episode (for the metrics and the log, once the status is written).
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub status: ModelLaneStatus,
    pub events: Vec<LaneEvent>,
    pub episode: Vec<Change>,
}

/// An Event a status change implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneEvent {
    pub warning: bool,
    pub reason: LaneReason,
    pub note: String,
}

/// The lane's phase for `fresh` runners out of `replicas`.
pub fn phase(fresh: i32, replicas: i32) -> LanePhase {
    match fresh {
        0 => LanePhase::Unavailable,
        n if n < replicas => LanePhase::Degraded,
        _ => LanePhase::Ready,
    }
}

/// The number of runner pods a lane keeps: `replicas`, never fewer than one.
pub fn replicas(lane: &ModelLane) -> i32 {
    lane.spec.replicas.unwrap_or(1).max(1)
}

/// The status the lane should have, and the Events its changes imply.
pub fn desired(lane: &ModelLane, facts: &LaneFacts) -> Desired {
    let old = lane.status.clone().unwrap_or_default();
    let generation = lane.metadata.generation;
    let now = facts.now;
    let availability = &facts.availability;
    let replicas = replicas(lane);
    let phase = phase(availability.fresh, replicas);
    let mut events = Vec::new();
    let mut status = ModelLaneStatus {
        phase: Some(phase),
        ready_runners: availability.fresh,
        queue_depth: i32::try_from(facts.depth).unwrap_or(i32::MAX),
        fallback: old.fallback.clone(),
        observed_generation: generation,
        conditions: old.conditions.clone(),
    };
    let observed = |status, message| Observed {
        status,
        message,
        generation,
        now,
    };
    let ready = format!(
        "{} of {replicas} runners have a fresh heartbeat",
        availability.fresh
    );
    set_lane(
        &mut status.conditions,
        LaneCondition::Available,
        phase_reason(phase),
        observed(availability.fresh > 0, &ready),
    );
    // The durable record of the outage, which queued jobs' maxWaitSeconds counts from: when
    // the last runner stopped being fresh (not when this was noticed), and later if a runner
    // was fresh since. It outlives the runners' Leases and the operator replica.
    if let Some(since) = availability.unavailable_since
        && let Some(available) = status
            .conditions
            .iter_mut()
            .find(|c| c.type_ == LaneCondition::Available.as_str())
    {
        available.last_transition_time = Time(since);
    }
    match &facts.pods {
        Ok(()) => set_lane(
            &mut status.conditions,
            LaneCondition::PodsCreated,
            LaneReason::PodsCreated,
            observed(true, "every runner pod exists"),
        ),
        Err(why) => set_lane(
            &mut status.conditions,
            LaneCondition::PodsCreated,
            LaneReason::PodCreateRefused,
            observed(false, why),
        ),
    }
    match &facts.allocator_override {
        Some(value) => {
            let message = format!(
                "spec.runner.env sets {ALLOC_CONF_ENV}={value}, replacing expandable_segments:True; \
                 model switches may fragment GPU memory and run out of it"
            );
            if !lane_condition_true(&old.conditions, LaneCondition::AllocatorOverridden) {
                events.push(LaneEvent {
                    warning: true,
                    reason: LaneReason::AllocatorOverridden,
                    note: message.clone(),
                });
            }
            set_lane(
                &mut status.conditions,
                LaneCondition::AllocatorOverridden,
                LaneReason::AllocatorOverridden,
                observed(true, &message),
            );
        }
        None => remove_lane(&mut status.conditions, LaneCondition::AllocatorOverridden),
    }
    if old.phase != status.phase {
        events.push(LaneEvent {
            warning: phase != LanePhase::Ready,
            reason: phase_reason(phase),
            note: format!("lane is {}: {ready}", phase_reason(phase)),
        });
    }
    let episode = set_fallback(lane, facts, &mut status, &mut events);
    Desired {
        status,
        events,
        episode,
    }
}

/// The lane's fallback episode: its status, its condition and its Events. Only a lane with a
/// fallback lane is ever in fallback; one that loses its fallback lane ends its episode.
fn set_fallback(
    lane: &ModelLane,
    facts: &LaneFacts,
    status: &mut ModelLaneStatus,
    events: &mut Vec<LaneEvent>,
) -> Vec<Change> {
    let name = lane.metadata.name.as_deref().unwrap_or_default();
    let to = lane.spec.fallback.as_ref().map(|f| f.lane.as_str());
    let invalid = to.and(facts.fallback_lane.as_ref().err());
    let trigger = facts
        .fallback
        .as_ref()
        .filter(|_| to.is_some() && invalid.is_none());
    let (fallback, changes) = fallback::next(status.fallback.as_ref(), trigger, facts.now);
    for change in &changes {
        events.push(match change {
            Change::Started(t) => LaneEvent {
                warning: true,
                reason: LaneReason::FallbackStarted,
                note: format!(
                    "lane {name} is in fallback ({}): {}; new jobs go to lane {}, queued ones after maxWaitSeconds",
                    t.cause.as_str(),
                    t.detail,
                    to.unwrap_or("?")
                ),
            },
            Change::Ended(e) => LaneEvent {
                warning: false,
                reason: LaneReason::FallbackEnded,
                note: format!(
                    "lane {name} left fallback ({}) after {:.1} s; new jobs go to it again",
                    e.cause.as_str(),
                    e.duration_seconds
                ),
            },
        });
    }
    if let Some(why) = invalid {
        let told = status.conditions.iter().any(|c| {
            c.type_ == LaneCondition::Fallback.as_str()
                && c.reason == LaneReason::FallbackLaneInvalid.as_str()
                && c.message == *why
        });
        if !told {
            events.push(LaneEvent {
                warning: true,
                reason: LaneReason::FallbackLaneInvalid,
                note: why.clone(),
            });
        }
    }
    let condition = match (invalid, trigger, to) {
        (Some(why), _, _) => Some((false, LaneReason::FallbackLaneInvalid, why.clone())),
        (None, Some(t), Some(to)) => Some((
            true,
            t.reason,
            format!("new jobs go to lane {to}: {}", t.detail),
        )),
        (None, None, Some(_)) if fallback.last_episode.is_some() => Some((
            false,
            LaneReason::Recovered,
            "the lane runs its own jobs".into(),
        )),
        (None, None, Some(_)) => Some((
            false,
            LaneReason::NotNeeded,
            "the lane runs its own jobs".into(),
        )),
        (None, _, None) => None,
    };
    match condition {
        Some((on, reason, message)) => set_lane(
            &mut status.conditions,
            LaneCondition::Fallback,
            reason,
            Observed {
                status: on,
                message: &message,
                generation: lane.metadata.generation,
                now: facts.now,
            },
        ),
        None => remove_lane(&mut status.conditions, LaneCondition::Fallback),
    }
    status.fallback = (fallback != Default::default()).then_some(fallback);
    changes
}

/// The reason that names a phase.
pub fn phase_reason(phase: LanePhase) -> LaneReason {
    match phase {
        LanePhase::Ready => LaneReason::Ready,
        LanePhase::Degraded => LaneReason::Degraded,
        LanePhase::Unavailable => LaneReason::Unavailable,
    }
}

/// When to look at the lane again if nothing changes: when its first fresh heartbeat would
/// expire (heartbeats expire without an event), at most after `resync`.
pub fn next_look(availability: &Availability, now: Timestamp, resync: Duration) -> Duration {
    availability
        .next_expiry
        .map_or(resync, |t| until(now, t))
        .min(resync)
}

#[cfg(test)]
mod tests {
    use framelane_api::modellane::FallbackCause;
    use serde_json::json;

    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn lane(replicas: i32, status: serde_json::Value) -> ModelLane {
        serde_json::from_value(
            json!({"apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane",
            "metadata": {"name": "anisora", "generation": 2},
            "spec": {"mode": "Dedicated", "models": ["anisora"], "replicas": replicas},
            "status": status}),
        )
        .unwrap()
    }

    fn facts(fresh: i32, unavailable_since: Option<Timestamp>) -> LaneFacts {
        LaneFacts {
            availability: Availability {
                fresh,
                next_expiry: (fresh > 0).then(|| at(20)),
                unavailable_since,
            },
            depth: 3,
            pods: Ok(()),
            allocator_override: None,
            fallback: None,
            fallback_lane: Ok(()),
            now: at(10),
        }
    }

    fn condition(status: &ModelLaneStatus, type_: LaneCondition) -> (String, String, Timestamp) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_.as_str())
            .unwrap();
        (c.status.clone(), c.reason.clone(), c.last_transition_time.0)
    }

    #[test]
    fn a_lane_losing_its_runners_goes_degraded_then_unavailable_with_events() {
        let Desired {
            status: ready,
            events,
            ..
        } = desired(&lane(2, json!(null)), &facts(2, None));
        assert_eq!(
            (ready.phase, ready.ready_runners, ready.queue_depth),
            (Some(LanePhase::Ready), 2, 3)
        );
        assert_eq!(condition(&ready, LaneCondition::Available).0, "True");
        assert_eq!(
            condition(&ready, LaneCondition::PodsCreated).1,
            "PodsCreated"
        );
        assert_eq!(
            events,
            [LaneEvent {
                warning: false,
                reason: LaneReason::Ready,
                note: "lane is Ready: 2 of 2 runners have a fresh heartbeat".into()
            }]
        );
        let before = serde_json::to_value(&ready).unwrap();
        let Desired {
            status: degraded,
            events,
            ..
        } = desired(&lane(2, before.clone()), &facts(1, None));
        assert_eq!(condition(&degraded, LaneCondition::Available).1, "Degraded");
        assert_eq!(events.len(), 1);
        assert!(events[0].warning);
        let Desired {
            status: same,
            events,
            ..
        } = desired(&lane(2, before), &facts(2, None));
        assert_eq!(same, ready, "nothing changed");
        assert!(events.is_empty());

        let down = desired(
            &lane(2, serde_json::to_value(&degraded).unwrap()),
            &facts(0, Some(at(7))),
        )
        .status;
        assert_eq!(
            condition(&down, LaneCondition::Available),
            ("False".into(), "Unavailable".into(), at(7)),
            "the outage is dated from when the last runner went, not when it was noticed"
        );
    }

    #[test]
    fn a_refused_pod_and_an_allocator_override_show_in_conditions_and_events() {
        let mut f = facts(1, None);
        f.pods = Err("cannot create runner pod anisora-0: exceeded quota".into());
        f.allocator_override = Some("backend:cudaMallocAsync".into());
        let Desired { status, events, .. } = desired(&lane(1, json!(null)), &f);
        let (created, reason, _) = condition(&status, LaneCondition::PodsCreated);
        assert_eq!(
            (created.as_str(), reason.as_str()),
            ("False", "PodCreateRefused")
        );
        assert_eq!(
            condition(&status, LaneCondition::AllocatorOverridden).0,
            "True"
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| e.reason == LaneReason::AllocatorOverridden)
                .count(),
            1
        );
        let again = desired(&lane(1, serde_json::to_value(&status).unwrap()), &f).events;
        assert!(
            !again
                .iter()
                .any(|e| e.reason == LaneReason::AllocatorOverridden),
            "warned once"
        );
        f.allocator_override = None;
        let cleared = desired(&lane(1, serde_json::to_value(&status).unwrap()), &f).status;
        assert!(
            !cleared
                .conditions
                .iter()
                .any(|c| c.type_ == "AllocatorOverridden")
        );
    }

    #[test]
    fn the_lane_is_looked_at_again_when_a_heartbeat_expires() {
        let f = facts(1, None);
        assert_eq!(
            next_look(&f.availability, at(10), Duration::from_secs(60)),
            Duration::from_millis(10_100)
        );
        assert_eq!(
            next_look(&f.availability, at(10), Duration::from_secs(5)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_fallback_episode_shows_in_status_condition_and_events() {
        let mut with_fallback = lane(1, json!(null));
        with_fallback.spec.fallback = serde_json::from_value(json!({"lane": "shared"})).unwrap();
        let mut f = facts(0, Some(at(0)));
        f.fallback = Some(Trigger {
            cause: FallbackCause::Capacity,
            reason: LaneReason::NoFreshRunner,
            since: at(8),
            detail: "no runner has had a fresh heartbeat for 8 s".into(),
        });
        let started = desired(&with_fallback, &f);
        let fallback = started.status.fallback.clone().unwrap();
        assert_eq!(
            (fallback.active, fallback.cause, fallback.since.map(|t| t.0)),
            (true, Some(FallbackCause::Capacity), Some(at(8)))
        );
        let (on, reason, _) = condition(&started.status, LaneCondition::Fallback);
        assert_eq!((on.as_str(), reason.as_str()), ("True", "NoFreshRunner"));
        let event = started
            .events
            .iter()
            .find(|e| e.reason == LaneReason::FallbackStarted)
            .unwrap();
        assert_eq!(
            event.note,
            "lane anisora is in fallback (capacity): no runner has had a fresh heartbeat for 8 s; new jobs go to lane shared, queued ones after maxWaitSeconds"
        );
        assert!(matches!(&started.episode[..], [Change::Started(_)]));

        with_fallback.status = Some(started.status);
        let mut recovered = facts(1, None);
        recovered.now = at(38);
        let ended = desired(&with_fallback, &recovered);
        assert!(matches!(&ended.episode[..], [Change::Ended(e)] if e.duration_seconds == 30.0));
        let event = ended
            .events
            .iter()
            .find(|e| e.reason == LaneReason::FallbackEnded)
            .unwrap();
        assert_eq!(
            event.note,
            "lane anisora left fallback (capacity) after 30.0 s; new jobs go to it again"
        );
        let (on, reason, _) = condition(&ended.status, LaneCondition::Fallback);
        assert_eq!((on.as_str(), reason.as_str()), ("False", "Recovered"));
        assert_eq!(
            ended
                .status
                .fallback
                .unwrap()
                .last_episode
                .unwrap()
                .duration_seconds,
            30.0
        );

        // A fallback lane that cannot take the lane's jobs: no episode, and the lane says so
        // once.
        let mut typo = lane(1, json!(null));
        typo.spec.fallback = serde_json::from_value(json!({"lane": "shraed"})).unwrap();
        let why =
            "spec.fallback.lane: lane shraed does not exist; create it or name an existing lane";
        let invalid = LaneFacts {
            fallback_lane: Err(why.into()),
            ..f.clone()
        };
        let refused = desired(&typo, &invalid);
        assert!(!refused.status.fallback.as_ref().is_some_and(|f| f.active));
        assert!(refused.episode.is_empty());
        let (on, reason, _) = condition(&refused.status, LaneCondition::Fallback);
        assert_eq!(
            (on.as_str(), reason.as_str()),
            ("False", "FallbackLaneInvalid")
        );
        let told: Vec<_> = refused
            .events
            .iter()
            .filter(|e| e.reason == LaneReason::FallbackLaneInvalid)
            .map(|e| (e.warning, e.note.as_str()))
            .collect();
        assert_eq!(told, [(true, why)]);
        typo.status = Some(refused.status);
        let again = desired(&typo, &invalid);
        assert!(
            !again
                .events
                .iter()
                .any(|e| e.reason == LaneReason::FallbackLaneInvalid),
            "told once"
        );

        let without = desired(&lane(1, json!(null)), &f);
        assert_eq!(
            without.status.fallback, None,
            "no fallback lane, no episode"
        );
        assert!(without.episode.is_empty());
        assert!(
            !without
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == "Fallback")
        );
    }
}
