//! Does a lane have room for one more job? The webhook's hold, the controller's admission,
//! its backlog and fallback moves all ask [`room`], and a full lane (or a namespace at its
//! share of it) is always told with the same [`Overloaded`] message.

use std::time::Duration;

/// A lane's queue limits, with the operator's defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most unfinished (Queued or Running) jobs the lane holds.
    pub max_depth: usize,
    /// How long a queued job may wait (see `timeouts`).
    pub max_wait: Duration,
    /// Most unfinished jobs of one namespace the lane holds, when the lane sets a share.
    pub max_per_namespace: Option<usize>,
    /// How long a job may run, unless the job sets its own deadline (see `timeouts`).
    pub job_deadline: Duration,
}

/// How many unfinished jobs count against a lane: all of them, and those of the namespace a
/// new job comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub depth: usize,
    pub namespace: usize,
}

/// A lane that takes no more jobs (of a namespace): the message starts with `queue_overloaded`
/// and states the lane, the count and the limit, and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overloaded {
    /// The lane holds `maxDepth` unfinished jobs.
    #[error(
        "queue_overloaded: lane {lane} holds {depth} unfinished jobs and its maxDepth is {max_depth}; \
         a queued job waits at most maxWaitSeconds {max_wait_seconds} for a runner. Retry when a job of \
         this lane finishes",
        max_depth = limits.max_depth,
        max_wait_seconds = limits.max_wait.as_secs()
    )]
    Lane {
        lane: String,
        depth: usize,
        limits: QueueLimits,
    },
    /// The job's namespace holds its share of the lane.
    #[error(
        "queue_overloaded: namespace {namespace} holds {held} unfinished jobs of lane {lane}, its share \
         (maxPerNamespace {share}); the lane still takes other namespaces' jobs. Retry when a job of \
         {namespace} in this lane finishes"
    )]
    Namespace {
        lane: String,
        namespace: String,
        held: usize,
        share: usize,
    },
}

/// Whether `lane`, holding `held` unfinished jobs, can take one more from `namespace`.
pub fn room(
    lane: &str,
    namespace: &str,
    held: Occupancy,
    limits: QueueLimits,
) -> Result<(), Overloaded> {
    if held.depth >= limits.max_depth {
        return Err(Overloaded::Lane {
            lane: lane.into(),
            depth: held.depth,
            limits,
        });
    }
    match limits.max_per_namespace {
        Some(share) if held.namespace >= share => Err(Overloaded::Namespace {
            lane: lane.into(),
            namespace: namespace.into(),
            held: held.namespace,
            share,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: QueueLimits = QueueLimits {
        max_depth: 25,
        max_wait: Duration::from_secs(30),
        max_per_namespace: None,
        job_deadline: Duration::from_secs(3600),
    };

    fn held(depth: usize, namespace: usize) -> Occupancy {
        Occupancy { depth, namespace }
    }

    #[test]
    fn a_lane_has_room_below_max_depth_and_says_so_in_one_message_when_full() {
        assert_eq!(room("anisora", "a", held(24, 24), LIMITS), Ok(()));
        let full = room("anisora", "a", held(25, 3), LIMITS).unwrap_err();
        assert_eq!(
            full.to_string(),
            "queue_overloaded: lane anisora holds 25 unfinished jobs and its maxDepth is 25; a queued \
             job waits at most maxWaitSeconds 30 for a runner. Retry when a job of this lane finishes"
        );
        assert!(
            room("anisora", "a", held(26, 0), LIMITS).is_err(),
            "over-full stays full"
        );
    }

    #[test]
    fn a_namespace_at_its_share_is_refused_while_others_are_not() {
        let shared = QueueLimits {
            max_per_namespace: Some(5),
            ..LIMITS
        };
        assert_eq!(room("anisora", "team-a", held(10, 4), shared), Ok(()));
        let full = room("anisora", "team-a", held(10, 5), shared).unwrap_err();
        assert_eq!(
            full.to_string(),
            "queue_overloaded: namespace team-a holds 5 unfinished jobs of lane anisora, its share \
             (maxPerNamespace 5); the lane still takes other namespaces' jobs. Retry when a job of \
             team-a in this lane finishes"
        );
        assert_eq!(room("anisora", "team-b", held(10, 0), shared), Ok(()));
        assert!(
            matches!(
                room("anisora", "team-b", held(25, 0), shared),
                Err(Overloaded::Lane { .. })
            ),
            "a full lane is full for every namespace"
        );
    }
}
