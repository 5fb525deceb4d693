//! The leader's depth decision for one create: the queue index takes a slot of the job's
//! lane, or the lane is full (`framelane_core::depth`).

use std::time::{Duration, Instant};

use framelane_api::VideoJob;
use framelane_core::{queue::JobKey, routing::route};

use super::review::{Denial, Request};
use crate::context::Context;

/// How long a slot stays held for a create the webhook let through before the watch shows
/// the job: longer than a create usually takes from this webhook's answer to its storage, so
/// that mostly a create that failed after admission (another webhook or a quota refused it)
/// gives its slot back this way. A create that takes longer (a slow webhook called after
/// this one) lets the next create take its slot; the controller, the final arbiter of
/// `maxDepth`, then fails the extra job with `QueueOverloaded` instead of the webhook
/// refusing it with 503.
const HOLD: Duration = Duration::from_secs(15);

/// Takes a slot of the job's lane, or refuses with `queue_overloaded`. Returns the lane it
/// counted against (empty when none); `None` while the caches are still being read
/// (counting from a partial view could let a lane overfill).
pub fn hold_slot(
    ctx: &Context,
    request: &Request,
    job: &VideoJob,
) -> Option<(String, Option<Denial>)> {
    if !ctx.synced() {
        return None;
    }
    let lanes = ctx.lanes.state();
    let Some(route) = route(&job.spec.model, &lanes) else {
        // No lane of this operator serves the model: the controller fails the job with the
        // reason, or another operator's lanes serve it.
        return Some((String::new(), None));
    };
    let name = route.name();
    if ctx
        .config
        .watch_namespace
        .as_ref()
        .is_some_and(|ns| ns != &request.namespace)
    {
        return Some((name, None));
    }
    if let Some(denial) = fit(ctx, &name, request, job) {
        return Some((name, Some(denial)));
    }
    let limits = ctx.lane_limits(route.lane);
    let key = JobKey {
        namespace: request.namespace.clone(),
        name: request.name.clone(),
    };
    let lane_of = |model: &str| framelane_core::routing::route(model, &lanes).map(|r| r.name());
    let now = Instant::now();
    let held = {
        let mut index = ctx.index();
        if !index.synced {
            return None;
        }
        index.hold(
            key,
            job.metadata.uid.as_deref(),
            &name,
            limits,
            lane_of,
            (now, now + HOLD),
            request.dry_run,
        )
    };
    let denial = held
        .err()
        .map(|full| Denial::overloaded(&request.name, &full));
    Some((name, denial))
}

/// Refuses a job whose estimated GPU memory does not fit every live runner of `lane` that
/// reported its memory ([`Context::does_not_fit`]).
fn fit(ctx: &Context, lane: &str, request: &Request, job: &VideoJob) -> Option<Denial> {
    let (refused, size) = ctx.does_not_fit(lane, job)?;
    Some(Denial::does_not_fit(
        &request.name,
        lane,
        refused.cause(&size, lane),
    ))
}
