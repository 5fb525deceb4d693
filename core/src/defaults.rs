//! What does a new job leave out, and what does its model say it is? The admission webhook
//! writes these into the stored spec, so that what is stored is what runs.

use framelane_api::{VideoJobSpec, VideoModel};
use serde_json::{Value, json};

/// The fields under `spec` that [`missing`] can fill in, in its order.
pub const DEFAULTED: [&str; 6] = ["steps", "cfg", "width", "height", "frames", "fps"];

/// The CEL expression of the mutating webhook's `matchConditions` (the chart's and the
/// tests' configurations): true when a job leaves out one of [`DEFAULTED`]. A job that sets
/// them all has nothing to fill in, so the API server does not call the mutating webhook
/// for it: one HTTPS call per create instead of two.
pub fn leaves_a_default_out() -> String {
    DEFAULTED
        .map(|field| format!("!has(object.spec.{field})"))
        .join(" || ")
}

/// The cfg of a job that sets none, of a model that fixes none: no guidance.
pub const DEFAULT_CFG: f64 = 1.0;

/// The fields of `spec` its model fills in, as (field name under `spec`, value): the model's
/// fixed steps and cfg ([`DEFAULT_CFG`] when it fixes none: the stored job says what it runs
/// with, whatever the model fixes later), and its default size, length and frame rate.
pub fn missing(spec: &VideoJobSpec, model: &VideoModel) -> Vec<(&'static str, Value)> {
    let m = &model.spec;
    let candidates = [
        (
            "steps",
            spec.steps.is_none(),
            Some(json!(m.fixed_parameters.steps)),
        ),
        (
            "cfg",
            spec.cfg.is_none(),
            Some(json!(m.fixed_parameters.cfg.unwrap_or(DEFAULT_CFG))),
        ),
        ("width", spec.width.is_none(), Some(json!(m.defaults.width))),
        (
            "height",
            spec.height.is_none(),
            Some(json!(m.defaults.height)),
        ),
        (
            "frames",
            spec.frames.is_none(),
            Some(json!(m.defaults.frames)),
        ),
        ("fps", spec.fps.is_none(), Some(json!(m.defaults.fps))),
    ];
    candidates
        .into_iter()
        .filter_map(|(field, absent, value)| Some((field, value.filter(|_| absent)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(fixed: Value) -> VideoModel {
        serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel",
            "metadata": {"name": "phr00t"},
            "spec": {"fixedParameters": fixed,
                "defaults": {"width": 832, "height": 480, "frames": 81, "fps": 16},
                "limits": {"maxWidth": 1280, "maxHeight": 1280, "maxFrames": 161},
                "weights": {"format": "diffusers", "path": "phr00t"}, "modes": ["t2v"]}
        }))
        .unwrap()
    }

    fn spec(fields: Value) -> VideoJobSpec {
        let mut base = json!({"model": "phr00t", "prompt": "a cat"});
        base.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn a_job_gets_what_it_leaves_out_and_keeps_what_it_sets() {
        let phr00t = model(json!({"steps": 4, "cfg": 1.0}));
        assert_eq!(
            missing(&spec(json!({})), &phr00t),
            [
                ("steps", json!(4)),
                ("cfg", json!(1.0)),
                ("width", json!(832)),
                ("height", json!(480)),
                ("frames", json!(81)),
                ("fps", json!(16))
            ]
        );
        assert_eq!(
            missing(
                &spec(json!({"steps": 4, "width": 256, "frames": 17})),
                &phr00t
            ),
            [
                ("cfg", json!(1.0)),
                ("height", json!(480)),
                ("fps", json!(16))
            ]
        );
        let every: Vec<&str> = missing(&spec(json!({})), &phr00t)
            .into_iter()
            .map(|(field, _)| field)
            .collect();
        assert_eq!(
            every, DEFAULTED,
            "the match condition names every field filled in"
        );
        let all_set = spec(
            json!({"steps": 4, "cfg": 1.0, "width": 256, "height": 256, "frames": 17, "fps": 8}),
        );
        assert!(missing(&all_set, &phr00t).is_empty());
        let free_cfg = model(json!({"steps": 8}));
        assert!(
            missing(&spec(json!({})), &free_cfg).contains(&("cfg", json!(1.0))),
            "a model that fixes no cfg gives no guidance, written into the job"
        );
        assert!(
            missing(&spec(json!({"cfg": 3.5})), &free_cfg)
                .iter()
                .all(|(f, _)| *f != "cfg")
        );
    }

    /// The chart's MutatingWebhookConfiguration skips exactly the jobs that set every field.
    #[test]
    fn the_charts_match_condition_is_this_one() {
        let chart = include_str!("../../charts/framelane/templates/webhook.yaml");
        assert!(
            chart.contains(&format!("expression: {:?}", leaves_a_default_out())),
            "charts/framelane/templates/webhook.yaml: the mutating webhook's matchConditions \
             expression must be {:?}",
            leaves_a_default_out()
        );
    }
}
