//! What does a new job leave out, and what does its model say it is? The admission webhook
//! writes these into the stored spec, so that what is stored is what runs.

use framelane_api::{VideoJobSpec, VideoModel};
use serde_json::{Value, json};

/// The fields of `spec` its model fills in, as (field name under `spec`, value): the model's
/// fixed steps and cfg (when it fixes one), and its default size, length and frame rate.
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
            m.fixed_parameters.cfg.map(|c| json!(c)),
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
        let free_cfg = model(json!({"steps": 8}));
        assert!(
            missing(&spec(json!({})), &free_cfg)
                .iter()
                .all(|(f, _)| *f != "cfg"),
            "a model that fixes no cfg gives none"
        );
    }
}
