//! Is a lane in fallback, why, and since when? A lane with a fallback lane is in a fallback
//! *episode* with exactly one cause, each from a Kubernetes signal:
//!
//! - `manual`: an admin set `spec.fallback.force: true`;
//! - `quota`: creating a runner pod was refused and a ResourceQuota has no room for it;
//! - `capacity`: a runner pod cannot be scheduled (`PodScheduled=False`, `Unschedulable`), or
//!   no runner of the lane has been fresh for the grace period.
//!
//! The episode ends when its cause clears; its start, end and duration go into the lane's
//! status, where a later leader finds them, so an episode has one start and one end whichever
//! replica sees them.

use std::{collections::BTreeMap, time::Duration};

use framelane_api::{
    modellane::{FallbackCause, FallbackEpisode, FallbackStatus},
    reasons::LaneReason,
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::core::v1::{Pod, ResourceQuota, ResourceRequirements},
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::MicroTime},
};

use crate::availability::Availability;

/// What the lane reconciler observed that can put a lane in fallback.
#[derive(Clone, Debug, PartialEq)]
pub struct Signals<'a> {
    /// `spec.fallback.force`.
    pub forced: bool,
    /// Why a ResourceQuota refuses a runner pod (see [`quota_without_room`]).
    pub quota: Option<String>,
    /// Since when a runner pod cannot be scheduled, and the scheduler's words (see
    /// [`unschedulable`]).
    pub unschedulable: Option<(Timestamp, String)>,
    pub availability: &'a Availability,
    /// How long the lane may have no fresh runner before that is a `capacity` episode.
    pub grace: Duration,
    pub now: Timestamp,
}

/// The cause of an episode, as observed now.
#[derive(Clone, Debug, PartialEq)]
pub struct Trigger {
    pub cause: FallbackCause,
    /// The reason of the lane's `Fallback` condition: which signal.
    pub reason: LaneReason,
    /// When the signal began.
    pub since: Timestamp,
    /// The signal in words, for the condition and the `FallbackStarted` Event.
    pub detail: String,
}

/// The cause the lane is in fallback for now, if any: `manual` first (the admin said so),
/// then `quota` (pods refused), then `capacity`.
pub fn trigger(s: &Signals) -> Option<Trigger> {
    if s.forced {
        return Some(Trigger {
            cause: FallbackCause::Manual,
            reason: LaneReason::Forced,
            since: s.now,
            detail: "spec.fallback.force is true".into(),
        });
    }
    if let Some(quota) = &s.quota {
        return Some(Trigger {
            cause: FallbackCause::Quota,
            reason: LaneReason::QuotaExceeded,
            since: s.now,
            detail: quota.clone(),
        });
    }
    if let Some((since, message)) = &s.unschedulable {
        return Some(Trigger {
            cause: FallbackCause::Capacity,
            reason: LaneReason::Unschedulable,
            since: (*since).min(s.now),
            detail: format!("a runner pod cannot be scheduled: {message}"),
        });
    }
    let down_since = s.availability.unavailable_since?;
    let since = down_since
        .saturating_add(signed(s.grace))
        .unwrap_or(Timestamp::MAX);
    (since <= s.now).then(|| Trigger {
        cause: FallbackCause::Capacity,
        reason: LaneReason::NoFreshRunner,
        since,
        detail: format!(
            "no runner has had a fresh heartbeat for {} s (since {down_since})",
            s.grace.as_secs()
        ),
    })
}

/// When a lane that has no fresh runner becomes a `capacity` episode, if it is not one yet:
/// when to look at it again.
pub fn grace_ends(s: &Signals) -> Option<Timestamp> {
    let down_since = s.availability.unavailable_since?;
    let at = down_since.saturating_add(signed(s.grace)).ok()?;
    (at > s.now).then_some(at)
}

/// What happened to a lane's episode.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Started(Trigger),
    Ended(FallbackEpisode),
}

/// The lane's fallback status now, from what it was and the cause observed now, and what
/// changed: an end, a start, or both (the cause changed: one episode, one cause).
pub fn next(
    old: Option<&FallbackStatus>,
    now_cause: Option<&Trigger>,
    now: Timestamp,
) -> (FallbackStatus, Vec<Change>) {
    // On the microsecond grid the status is written with, so that a recorded duration is
    // exactly its end minus its start.
    let now = micro(now);
    let mut status = old.cloned().unwrap_or_default();
    let mut changes = Vec::new();
    if status.active
        && let (Some(cause), Some(start)) = (status.cause, status.since.as_ref().map(|t| t.0))
    {
        if now_cause.is_some_and(|t| t.cause == cause) {
            return (status, changes);
        }
        let episode = FallbackEpisode {
            cause,
            start: MicroTime(start),
            end: MicroTime(now),
            duration_seconds: now.duration_since(start).as_secs_f64().max(0.0),
        };
        status.last_episode = Some(episode.clone());
        changes.push(Change::Ended(episode));
    }
    status.active = false;
    status.cause = None;
    status.since = None;
    if let Some(trigger) = now_cause {
        // A new episode cannot begin before the one it replaces ended.
        let since = match &status.last_episode {
            Some(last) if !changes.is_empty() => micro(trigger.since).max(last.end.0),
            _ => micro(trigger.since),
        };
        status.active = true;
        status.cause = Some(trigger.cause);
        status.since = Some(MicroTime(since));
        changes.push(Change::Started(Trigger {
            since,
            ..trigger.clone()
        }));
    }
    (status, changes)
}

/// Since when the earliest of `pods` cannot be scheduled, and the scheduler's message: a
/// `PodScheduled` condition that is False with reason `Unschedulable`.
pub fn unschedulable<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Option<(Timestamp, String)> {
    pods.into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.as_ref()?.conditions.as_ref())
        .flatten()
        .filter(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
        .map(|c| {
            let since = c
                .last_transition_time
                .as_ref()
                .map_or(Timestamp::MAX, |t| t.0);
            (since, c.message.clone().unwrap_or_default())
        })
        .min_by_key(|(since, _)| *since)
}

/// The first ResourceQuota that has no room for one more pod with `resources`, said in
/// words (quota, resource, used, hard): what made a pod create fail with 403, from the
/// quotas' own status rather than the refusal's text.
pub fn quota_without_room<'a>(
    resources: &ResourceRequirements,
    quotas: impl IntoIterator<Item = &'a ResourceQuota>,
) -> Option<String> {
    for quota in quotas {
        let Some(status) = &quota.status else {
            continue;
        };
        let used = status.used.clone().unwrap_or_default();
        for (name, hard) in status.hard.iter().flatten() {
            let need = demand(resources, name);
            let Some(hard) = quantity(&hard.0) else {
                continue;
            };
            let used_now = used.get(name).and_then(|q| quantity(&q.0)).unwrap_or(0.0);
            if need > 0.0 && used_now + need > hard {
                return Some(format!(
                    "ResourceQuota {} allows {name} {} and {} is used; a runner pod needs {}",
                    quota.metadata.name.as_deref().unwrap_or("?"),
                    status.hard.as_ref().map_or("?", |h| h[name].0.as_str()),
                    used.get(name).map_or("0", |q| q.0.as_str()),
                    format_amount(need)
                ));
            }
        }
    }
    None
}

/// How much of the quota resource `name` one pod with `resources` takes.
fn demand(resources: &ResourceRequirements, name: &str) -> f64 {
    let get = |map: &Option<BTreeMap<String, Quantity>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .and_then(|q| quantity(&q.0))
    };
    if name == "pods" || name == "count/pods" {
        return 1.0;
    }
    if let Some(resource) = name.strip_prefix("limits.") {
        return get(&resources.limits, resource).unwrap_or(0.0);
    }
    let resource = name.strip_prefix("requests.").unwrap_or(name);
    // A request left out is its limit (extended resources such as GPUs set only limits).
    get(&resources.requests, resource)
        .or_else(|| get(&resources.limits, resource))
        .unwrap_or(0.0)
}

/// A Kubernetes quantity (`1`, `500m`, `2Gi`, `1e3`) as a number.
fn quantity(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 14] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    let text = text.trim();
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.strip_suffix('E').map_or_else(
        || text.parse().ok(),
        |n| n.parse::<f64>().ok().map(|n| n * 1e18),
    )
}

fn format_amount(n: f64) -> String {
    if n.fract() == 0.0 {
        format!("{n:.0}")
    } else {
        format!("{n}")
    }
}

fn micro(t: Timestamp) -> Timestamp {
    Timestamp::from_microsecond(t.as_microsecond()).unwrap_or(t)
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn available(unavailable_since: Option<i64>) -> Availability {
        Availability {
            fresh: i32::from(unavailable_since.is_none()),
            next_expiry: None,
            unavailable_since: unavailable_since.map(at),
        }
    }

    fn signals(availability: &Availability, now: i64) -> Signals<'_> {
        Signals {
            forced: false,
            quota: None,
            unschedulable: None,
            availability,
            grace: Duration::from_secs(60),
            now: at(now),
        }
    }

    #[test]
    fn each_cause_comes_from_its_signal_with_one_cause_at_a_time() {
        let up = available(None);
        assert_eq!(trigger(&signals(&up, 100)), None);
        let down = available(Some(50));
        assert_eq!(
            trigger(&signals(&down, 100)),
            None,
            "within the grace period"
        );
        assert_eq!(grace_ends(&signals(&down, 100)), Some(at(110)));
        let late = trigger(&signals(&down, 110)).unwrap();
        assert_eq!(
            (late.cause, late.reason, late.since),
            (FallbackCause::Capacity, LaneReason::NoFreshRunner, at(110))
        );
        let pending = Signals {
            unschedulable: Some((at(90), "0/2 nodes: Insufficient nvidia.com/gpu".into())),
            ..signals(&up, 100)
        };
        let t = trigger(&pending).unwrap();
        assert_eq!(
            (t.cause, t.reason, t.since),
            (FallbackCause::Capacity, LaneReason::Unschedulable, at(90))
        );
        assert_eq!(
            t.detail,
            "a runner pod cannot be scheduled: 0/2 nodes: Insufficient nvidia.com/gpu"
        );
        let quota = Signals {
            quota: Some("ResourceQuota gpus allows requests.nvidia.com/gpu 0".into()),
            ..pending.clone()
        };
        assert_eq!(
            trigger(&quota).unwrap().cause,
            FallbackCause::Quota,
            "quota before capacity"
        );
        let forced = Signals {
            forced: true,
            ..quota
        };
        let t = trigger(&forced).unwrap();
        assert_eq!(
            (t.cause, t.reason, t.since),
            (FallbackCause::Manual, LaneReason::Forced, at(100))
        );
    }

    fn manual(now: i64) -> Trigger {
        let up = available(None);
        trigger(&Signals {
            forced: true,
            ..signals(&up, now)
        })
        .unwrap()
    }

    #[test]
    fn an_episode_has_one_start_one_end_and_its_duration() {
        let (started, changes) = next(None, Some(&manual(10)), at(10));
        assert!(started.active);
        assert_eq!(
            (started.cause, started.since.clone().map(|t| t.0)),
            (Some(FallbackCause::Manual), Some(at(10)))
        );
        assert!(matches!(&changes[..], [Change::Started(t)] if t.since == at(10)));
        // Seen again later, by this leader or the next one: the same episode, nothing new.
        let (same, changes) = next(Some(&started), Some(&manual(25)), at(25));
        assert_eq!(same, started);
        assert!(changes.is_empty());
        let (ended, changes) = next(Some(&same), None, at(40));
        let episode = FallbackEpisode {
            cause: FallbackCause::Manual,
            start: MicroTime(at(10)),
            end: MicroTime(at(40)),
            duration_seconds: 30.0,
        };
        assert_eq!(changes, [Change::Ended(episode.clone())]);
        assert_eq!(
            ended,
            FallbackStatus {
                active: false,
                cause: None,
                since: None,
                last_episode: Some(episode)
            }
        );
        let (quiet, changes) = next(Some(&ended), None, at(50));
        assert_eq!((quiet, changes.len()), (ended, 0));
    }

    #[test]
    fn a_new_cause_ends_the_episode_and_starts_another() {
        let (manual_episode, _) = next(None, Some(&manual(10)), at(10));
        let down = available(Some(0));
        let capacity = trigger(&signals(&down, 70)).unwrap();
        assert_eq!(capacity.since, at(60));
        let (status, changes) = next(Some(&manual_episode), Some(&capacity), at(70));
        assert!(
            matches!(&changes[..], [Change::Ended(e), Change::Started(t)]
            if e.duration_seconds == 60.0 && t.cause == FallbackCause::Capacity && t.since == at(70)),
            "{changes:?}"
        );
        assert_eq!(status.cause, Some(FallbackCause::Capacity));
        assert_eq!(
            status.since.map(|t| t.0),
            Some(at(70)),
            "not before the last one ended"
        );
    }

    #[test]
    fn an_unschedulable_runner_pod_is_found_with_its_time_and_message() {
        let pod = |name: &str, scheduled: serde_json::Value| -> Pod {
            serde_json::from_value(
                json!({"metadata": {"name": name}, "status": {"conditions": [scheduled]}}),
            )
            .unwrap()
        };
        let pods = [
            pod(
                "a",
                json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-06T10:00:00Z"}),
            ),
            pod(
                "b",
                json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.", "lastTransitionTime": "2026-12-06T10:00:05Z"}),
            ),
        ];
        let (since, message) = unschedulable(&pods).unwrap();
        assert_eq!(since, "2026-12-06T10:00:05Z".parse::<Timestamp>().unwrap());
        assert_eq!(
            message,
            "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
        );
        assert_eq!(unschedulable(&pods[..1]), None);
    }

    #[test]
    fn a_quota_without_room_for_a_runner_pod_is_named() {
        let gpu: ResourceRequirements = serde_json::from_value(
            json!({"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "500m"}}),
        )
        .unwrap();
        let quota = |hard: serde_json::Value, used: serde_json::Value| -> ResourceQuota {
            serde_json::from_value(
                json!({"metadata": {"name": "gpus"}, "status": {"hard": hard, "used": used}}),
            )
            .unwrap()
        };
        let none = quota(
            json!({"requests.nvidia.com/gpu": "0"}),
            json!({"requests.nvidia.com/gpu": "0"}),
        );
        assert_eq!(
            quota_without_room(&gpu, [&none]).as_deref(),
            Some(
                "ResourceQuota gpus allows requests.nvidia.com/gpu 0 and 0 is used; a runner pod needs 1"
            )
        );
        let full = quota(
            json!({"requests.nvidia.com/gpu": "2"}),
            json!({"requests.nvidia.com/gpu": "2"}),
        );
        assert!(quota_without_room(&gpu, [&full]).is_some());
        let room = quota(
            json!({"requests.nvidia.com/gpu": "2", "cpu": "2", "pods": "10"}),
            json!({"requests.nvidia.com/gpu": "1", "cpu": "1500m", "pods": "9"}),
        );
        assert_eq!(quota_without_room(&gpu, [&room]), None);
        let cpu = quota(
            json!({"requests.cpu": "1"}),
            json!({"requests.cpu": "800m"}),
        );
        assert!(
            quota_without_room(&gpu, [&cpu])
                .unwrap()
                .contains("requests.cpu")
        );
        let pods = quota(json!({"pods": "3"}), json!({"pods": "3"}));
        assert!(quota_without_room(&gpu, [&pods]).is_some());
    }

    #[test]
    fn quantities_read_as_kubernetes_writes_them() {
        for (text, value) in [
            ("1", 1.0),
            ("500m", 0.5),
            ("2Gi", 2147483648.0),
            ("1k", 1000.0),
            ("1e3", 1000.0),
            ("3E", 3e18),
        ] {
            assert_eq!(quantity(text), Some(value), "{text}");
        }
        assert_eq!(quantity("lots"), None);
    }
}
