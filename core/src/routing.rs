//! Which lane takes a new job? A model's Dedicated lane, else a Shared lane that serves it;
//! and while that lane is in fallback, its fallback lane.

use std::borrow::Borrow;

use framelane_api::{
    ModelLane, VideoModel,
    modellane::{FallbackCause, LaneMode},
    videojob::LaneAssignment,
};

/// Why a job has no lane.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The job names a VideoModel that does not exist; `known` lists those that do, sorted.
    #[error(
        "VideoModel {model:?} does not exist: set spec.model to one of [{}] (kubectl get videomodels)",
        known.join(", ")
    )]
    UnknownModel { model: String, known: Vec<String> },
    /// The model exists but no lane serves it.
    #[error(
        "no ModelLane serves model {model}; create one (kubectl get modellanes shows the lanes)"
    )]
    NoLane { model: String },
}

/// Where a new job goes.
#[derive(Debug, PartialEq)]
pub struct Route<'a, L> {
    pub lane: &'a L,
    /// `Fallback` when `lane` is the fallback lane of the model's own lane.
    pub assignment: LaneAssignment,
    /// Why, for a fallback.
    pub cause: Option<FallbackCause>,
    /// The model's own lane, for a fallback.
    pub from: Option<String>,
}

impl<L: Borrow<ModelLane>> Route<'_, L> {
    /// The lane's name.
    pub fn name(&self) -> String {
        name_of(self.lane.borrow())
    }
}

/// The lane a new job of `model` goes to: the model's Dedicated lane, else a Shared lane that
/// serves it (by name, for a stable choice); while that lane is in fallback, its fallback
/// lane when that exists and serves the model.
pub fn route<'a, L: Borrow<ModelLane>>(model: &str, lanes: &'a [L]) -> Option<Route<'a, L>> {
    let serves = |lane: &ModelLane| lane.spec.models.iter().any(|m| m == model);
    let own = lanes
        .iter()
        .filter(|l| serves((*l).borrow()))
        .min_by_key(|l| {
            let lane: &ModelLane = (*l).borrow();
            (
                lane.spec.mode != LaneMode::Dedicated,
                lane.metadata.name.clone(),
            )
        })?;
    let dedicated = Route {
        lane: own,
        assignment: LaneAssignment::Dedicated,
        cause: None,
        from: None,
    };
    let own_lane: &ModelLane = own.borrow();
    let (Some(cause), Some(spec)) = (episode_cause(own_lane), own_lane.spec.fallback.as_ref())
    else {
        return Some(dedicated);
    };
    let fallback = lanes.iter().find(|l| {
        let lane: &ModelLane = (*l).borrow();
        lane.metadata.name.as_deref() == Some(spec.lane.as_str()) && serves(lane)
    });
    Some(match fallback {
        Some(lane) => Route {
            lane,
            assignment: LaneAssignment::Fallback,
            cause: Some(cause),
            from: Some(name_of(own_lane)),
        },
        None => dedicated,
    })
}

/// Why a lane is in fallback now, if it is: the admin's switch at once, else the episode its
/// status records.
pub fn episode_cause(lane: &ModelLane) -> Option<FallbackCause> {
    if lane.spec.fallback.as_ref().is_some_and(|f| f.force) {
        return Some(FallbackCause::Manual);
    }
    let fallback = lane.status.as_ref()?.fallback.as_ref()?;
    fallback.active.then_some(fallback.cause).flatten()
}

/// [`route`] for a job, saying why there is no lane: its model does not exist, or nothing
/// serves it.
pub fn lane_for<'a, M: Borrow<VideoModel>, L: Borrow<ModelLane>>(
    model: &str,
    models: &[M],
    lanes: &'a [L],
) -> Result<Route<'a, L>, RouteError> {
    model_exists(model, models)?;
    route(model, lanes).ok_or_else(|| RouteError::NoLane {
        model: model.into(),
    })
}

fn name_of(lane: &ModelLane) -> String {
    lane.metadata.name.clone().unwrap_or_default()
}

/// Whether `model` names one of `models`.
pub fn model_exists<M: Borrow<VideoModel>>(model: &str, models: &[M]) -> Result<(), RouteError> {
    let name = |m: &M| {
        let model: &VideoModel = m.borrow();
        model.metadata.name.clone().unwrap_or_default()
    };
    if models.iter().any(|m| name(m) == model) {
        return Ok(());
    }
    let mut known: Vec<String> = models.iter().map(name).collect();
    known.sort();
    Err(RouteError::UnknownModel {
        model: model.into(),
        known,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn lane(name: &str, mode: &str, models: &[&str]) -> ModelLane {
        serde_json::from_value(
            json!({"apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane",
            "metadata": {"name": name}, "spec": {"mode": mode, "models": models}}),
        )
        .unwrap()
    }

    fn model(name: &str) -> VideoModel {
        serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel",
            "metadata": {"name": name},
            "spec": {"fixedParameters": {"steps": 8},
                "defaults": {"width": 832, "height": 480, "frames": 81, "fps": 16},
                "limits": {"maxWidth": 1280, "maxHeight": 1280, "maxFrames": 161},
                "weights": {"format": "diffusers", "path": name}, "modes": ["t2v"]}
        }))
        .unwrap()
    }

    fn name(r: Route<'_, ModelLane>) -> String {
        r.name()
    }

    #[test]
    fn a_model_goes_to_its_dedicated_lane_before_a_shared_one() {
        let lanes = [
            lane("a-shared", "Shared", &["anisora", "phr00t"]),
            lane("anisora", "Dedicated", &["anisora"]),
            lane("b-shared", "Shared", &["phr00t"]),
        ];
        assert_eq!(name(route("anisora", &lanes).unwrap()), "anisora");
        assert_eq!(
            route("anisora", &lanes).unwrap().assignment,
            LaneAssignment::Dedicated
        );
        assert_eq!(name(route("phr00t", &lanes).unwrap()), "a-shared");
        assert!(route("other", &lanes).is_none());
    }

    #[test]
    fn a_lane_in_fallback_hands_new_jobs_to_its_fallback_lane() {
        let mut own = lane("anisora", "Dedicated", &["anisora"]);
        own.spec.fallback = serde_json::from_value(json!({"lane": "shared"})).unwrap();
        let shared = lane("shared", "Shared", &["anisora", "phr00t"]);
        let mut lanes = vec![own.clone(), shared];
        assert_eq!(name(route("anisora", &lanes).unwrap()), "anisora");
        lanes[0].status = serde_json::from_value(
            json!({"fallback": {"active": true, "cause": "capacity", "since": "2026-12-06T10:00:00Z"}}),
        )
        .unwrap();
        let r = route("anisora", &lanes).unwrap();
        assert_eq!(
            (r.name(), r.assignment, r.cause, r.from.as_deref()),
            (
                "shared".into(),
                LaneAssignment::Fallback,
                Some(FallbackCause::Capacity),
                Some("anisora")
            )
        );
        // The admin's switch counts at once, before the lane's status says so.
        lanes[0] = own;
        lanes[0].spec.fallback.as_mut().unwrap().force = true;
        assert_eq!(
            route("anisora", &lanes).unwrap().cause,
            Some(FallbackCause::Manual)
        );
        // A fallback lane that does not serve the model takes nothing.
        lanes[1].spec.models = vec!["phr00t".into()];
        assert_eq!(name(route("anisora", &lanes).unwrap()), "anisora");
    }

    #[test]
    fn a_job_without_a_lane_is_told_why() {
        let models = [model("phr00t"), model("anisora"), model("orphan")];
        let lanes = [lane("anisora", "Dedicated", &["anisora"])];
        assert_eq!(
            lane_for("wan-2-9", &models, &lanes)
                .unwrap_err()
                .to_string(),
            "VideoModel \"wan-2-9\" does not exist: set spec.model to one of [anisora, orphan, phr00t] (kubectl get videomodels)"
        );
        assert_eq!(
            lane_for("orphan", &models, &lanes).unwrap_err(),
            RouteError::NoLane {
                model: "orphan".into()
            }
        );
        assert_eq!(
            model_exists("wan", &Vec::<VideoModel>::new())
                .unwrap_err()
                .to_string(),
            "VideoModel \"wan\" does not exist: set spec.model to one of [] (kubectl get videomodels)"
        );
    }
}
