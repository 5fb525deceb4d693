//! Does a lane have room for one more job? The webhook's hold, the controller's admission
//! and its backlog all ask [`room`], and a full lane is always told with the same
//! [`Overloaded`] message.

use std::time::Duration;

/// A lane's queue limits, with the operator's defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most unfinished (Queued or Running) jobs the lane holds.
    pub max_depth: usize,
    /// How long a queued job may wait (see `timeouts`).
    pub max_wait: Duration,
}

/// A lane that takes no more jobs: its message starts with `queue_overloaded` and states the
/// lane, its depth, maxDepth and maxWaitSeconds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "queue_overloaded: lane {lane} holds {depth} unfinished jobs and its maxDepth is {max_depth}; \
     a queued job waits at most maxWaitSeconds {max_wait_seconds} for a runner. Retry when a job of \
     this lane finishes",
    max_depth = limits.max_depth,
    max_wait_seconds = limits.max_wait.as_secs()
)]
pub struct Overloaded {
    pub lane: String,
    pub depth: usize,
    pub limits: QueueLimits,
}

/// Whether `lane`, holding `depth` unfinished jobs, can take one more.
pub fn room(lane: &str, depth: usize, limits: QueueLimits) -> Result<(), Overloaded> {
    if depth < limits.max_depth {
        Ok(())
    } else {
        Err(Overloaded {
            lane: lane.into(),
            depth,
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_has_room_below_max_depth_and_says_so_in_one_message_when_full() {
        let limits = QueueLimits {
            max_depth: 25,
            max_wait: Duration::from_secs(30),
        };
        assert_eq!(room("anisora", 24, limits), Ok(()));
        let full = room("anisora", 25, limits).unwrap_err();
        assert_eq!(
            full.to_string(),
            "queue_overloaded: lane anisora holds 25 unfinished jobs and its maxDepth is 25; a queued \
             job waits at most maxWaitSeconds 30 for a runner. Retry when a job of this lane finishes"
        );
        assert!(room("anisora", 26, limits).is_err(), "over-full stays full");
    }
}
