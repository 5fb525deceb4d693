//! Which lane takes a new job? A model's Dedicated lane, else a Shared lane that serves it.

use std::borrow::Borrow;

use framelane_api::{ModelLane, VideoModel, modellane::LaneMode};

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

/// The lane a new job of `model` goes to: the model's Dedicated lane, else a Shared lane that
/// serves it (by name, for a stable choice).
pub fn route<'a, L: Borrow<ModelLane>>(model: &str, lanes: &'a [L]) -> Option<&'a L> {
    lanes
        .iter()
        .filter(|l| {
            let lane: &ModelLane = (*l).borrow();
            lane.spec.models.iter().any(|m| m == model)
        })
        .min_by_key(|l| {
            let lane: &ModelLane = (*l).borrow();
            (
                lane.spec.mode != LaneMode::Dedicated,
                lane.metadata.name.clone(),
            )
        })
}

/// [`route`] for a job, saying why there is no lane: its model does not exist, or nothing
/// serves it.
pub fn lane_for<'a, M: Borrow<VideoModel>, L: Borrow<ModelLane>>(
    model: &str,
    models: &[M],
    lanes: &'a [L],
) -> Result<&'a L, RouteError> {
    model_exists(model, models)?;
    route(model, lanes).ok_or_else(|| RouteError::NoLane {
        model: model.into(),
    })
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

    fn name(l: &ModelLane) -> &str {
        l.metadata.name.as_deref().unwrap()
    }

    #[test]
    fn a_model_goes_to_its_dedicated_lane_before_a_shared_one() {
        let lanes = [
            lane("a-shared", "Shared", &["anisora", "phr00t"]),
            lane("anisora", "Dedicated", &["anisora"]),
            lane("b-shared", "Shared", &["phr00t"]),
        ];
        assert_eq!(name(route("anisora", &lanes).unwrap()), "anisora");
        assert_eq!(name(route("phr00t", &lanes).unwrap()), "a-shared");
        assert!(route("other", &lanes).is_none());
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
