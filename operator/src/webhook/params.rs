//! A VideoJob's parameters against its VideoModel: every violation, each naming its field and
//! the fix (HTTP 422, reason `Invalid`).

use std::sync::Arc;

use framelane_api::{GenerationMode, VideoJob, VideoModel, videomodel::unknown_model_message};
use kube::ResourceExt;

use super::review::{Cause, Denial, Request};

/// Reads the VideoJob of `request` and checks it against the model it names.
pub fn check(request: &Request, models: &[Arc<VideoModel>]) -> Result<VideoJob, Denial> {
    let job: VideoJob = serde_json::from_str(request.object.get())
        .map_err(|e| Denial::bad_request(format!("request.object is not a valid VideoJob: {e}")))?;
    let model = models
        .iter()
        .find(|m| m.name_any() == job.spec.model)
        .map(AsRef::as_ref);
    let causes = violations(&job, model, models);
    if causes.is_empty() {
        return Ok(job);
    }
    let list: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    Err(Denial {
        code: 422,
        reason: "Invalid",
        message: format!(
            "VideoJob {:?} does not fit model {:?}: {}",
            request.name,
            job.spec.model,
            list.join("; ")
        ),
        name: request.name.clone(),
        causes,
    })
}

fn violations(
    job: &VideoJob,
    model: Option<&VideoModel>,
    models: &[Arc<VideoModel>],
) -> Vec<Cause> {
    let spec = &job.spec;
    let Some(model) = model else {
        return vec![Cause {
            field: "spec.model".into(),
            reason: "FieldValueNotFound",
            message: unknown_model_message(&spec.model, models),
        }];
    };
    let name = model.name_any();
    let m = &model.spec;
    let mut causes = Vec::new();
    let mut cause = |field: &str, reason, message: String| {
        causes.push(Cause {
            field: field.into(),
            reason,
            message,
        })
    };
    if !m.modes.contains(&spec.mode) {
        let offered: Vec<&str> = m.modes.iter().map(mode_name).collect();
        cause(
            "spec.mode",
            "FieldValueNotSupported",
            format!(
                "model {name} does not offer {}: set spec.mode to one of [{}]",
                mode_name(&spec.mode),
                offered.join(", ")
            ),
        );
    }
    if spec.mode == GenerationMode::I2v && spec.image.is_none() {
        cause(
            "spec.image",
            "FieldValueRequired",
            "required when mode is i2v: set it to an image path in the model volume or an http(s) URL"
                .into(),
        );
    }
    if let Some(steps) = spec.steps
        && steps != m.fixed_parameters.steps
    {
        let fixed = m.fixed_parameters.steps;
        cause(
            "spec.steps",
            "FieldValueInvalid",
            format!(
                "must be {fixed} for model {name}, got {steps}: remove spec.steps or set it to {fixed}"
            ),
        );
    }
    if let (Some(cfg), Some(fixed)) = (spec.cfg, m.fixed_parameters.cfg)
        && (cfg - fixed).abs() > 1e-9
    {
        cause(
            "spec.cfg",
            "FieldValueInvalid",
            format!(
                "must be {fixed:?} for model {name}, got {cfg:?}: remove spec.cfg or set it to {fixed:?}"
            ),
        );
    }
    let limits = [
        ("spec.width", spec.width, m.limits.max_width, "maxWidth"),
        ("spec.height", spec.height, m.limits.max_height, "maxHeight"),
        ("spec.frames", spec.frames, m.limits.max_frames, "maxFrames"),
    ];
    for (field, value, max, limit) in limits {
        if let Some(value) = value
            && value > max
        {
            cause(
                field,
                "FieldValueInvalid",
                format!(
                    "must be at most {max} for model {name} (its {limit}), got {value}: lower it or leave it out for the default"
                ),
            );
        }
    }
    causes
}

fn mode_name(mode: &GenerationMode) -> &'static str {
    match mode {
        GenerationMode::T2v => "t2v",
        GenerationMode::I2v => "i2v",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::{Value, json};

    use super::*;

    pub fn models() -> Vec<Arc<VideoModel>> {
        let model = |name: &str, steps: i32, cfg: Option<f64>, modes: &[&str]| {
            let mut fixed = json!({"steps": steps});
            if let Some(cfg) = cfg {
                fixed["cfg"] = json!(cfg);
            }
            Arc::new(
                serde_json::from_value(json!({
                    "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel",
                    "metadata": {"name": name},
                    "spec": {"fixedParameters": fixed,
                        "defaults": {"width": 832, "height": 480, "frames": 81, "fps": 16},
                        "limits": {"maxWidth": 1280, "maxHeight": 720, "maxFrames": 121},
                        "package": {"path": name}, "modes": modes}
                }))
                .unwrap(),
            )
        };
        vec![
            model("anisora", 8, None, &["t2v", "i2v"]),
            model("phr00t", 4, Some(1.0), &["t2v"]),
        ]
    }

    pub fn request(spec: Value) -> Request {
        Request {
            uid: "u".into(),
            operation: "CREATE".into(),
            dry_run: false,
            namespace: "ns".into(),
            name: "clip".into(),
            object: serde_json::value::to_raw_value(
                &json!({"apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                "metadata": {"name": "clip", "namespace": "ns"}, "spec": spec}),
            )
            .unwrap(),
        }
    }

    fn fields(spec: Value) -> Vec<String> {
        match check(&request(spec), &models()) {
            Ok(_) => Vec::new(),
            Err(d) => {
                assert_eq!((d.code, d.reason), (422, "Invalid"), "{d:?}");
                d.causes.into_iter().map(|c| c.field).collect()
            }
        }
    }

    #[test]
    fn fixed_values_and_absent_ones_pass() {
        assert!(fields(json!({"model": "anisora", "prompt": "a cat"})).is_empty());
        assert!(
            fields(json!({"model": "anisora", "prompt": "a", "steps": 8, "cfg": 5.0})).is_empty()
        );
        assert!(
            fields(json!({"model": "phr00t", "prompt": "a", "steps": 4, "cfg": 1.0})).is_empty()
        );
    }

    #[test]
    fn wrong_anisora_steps_name_the_field_and_the_fix() {
        let err = check(
            &request(json!({"model": "anisora", "prompt": "a", "steps": 20})),
            &models(),
        )
        .unwrap_err();
        assert_eq!(err.causes.len(), 1);
        assert_eq!(err.causes[0].field, "spec.steps");
        assert_eq!(
            err.causes[0].message,
            "must be 8 for model anisora, got 20: remove spec.steps or set it to 8"
        );
        assert!(
            err.message.contains("spec.steps: must be 8"),
            "{}",
            err.message
        );
    }

    #[test]
    fn every_violation_is_listed() {
        let got = fields(
            json!({"model": "phr00t", "prompt": "a", "mode": "i2v", "steps": 8,
            "cfg": 3.5, "width": 1920, "height": 1088, "frames": 161}),
        );
        assert_eq!(
            got,
            [
                "spec.mode",
                "spec.image",
                "spec.steps",
                "spec.cfg",
                "spec.width",
                "spec.height",
                "spec.frames"
            ]
        );
        assert_eq!(
            fields(json!({"model": "wan", "prompt": "a", "steps": 3})),
            ["spec.model"]
        );
    }

    #[test]
    fn a_non_videojob_object_is_a_bad_request() {
        let mut r = request(json!({"model": 7}));
        let d = check(&r, &models()).unwrap_err();
        assert_eq!(d.code, 400);
        r.object = serde_json::value::to_raw_value(&Value::Null).unwrap();
        assert_eq!(check(&r, &models()).unwrap_err().code, 400);
    }
}
