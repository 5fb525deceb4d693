//! Does a job fit its model? Every violation of a VideoJob's parameters against its
//! VideoModel, each naming its field and the fix: the webhook refuses them with a 422, and
//! the controller fails a job that bypassed the webhook with the same causes.

use std::borrow::Borrow;

use framelane_api::{GenerationMode, VideoJobSpec, VideoModel};

use crate::routing::model_exists;

/// The `details.causes[].reason` of a violation, as Kubernetes names its field errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CauseReason {
    FieldValueInvalid,
    FieldValueNotSupported,
    FieldValueNotFound,
    FieldValueRequired,
}

impl CauseReason {
    /// The reason as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            CauseReason::FieldValueInvalid => "FieldValueInvalid",
            CauseReason::FieldValueNotSupported => "FieldValueNotSupported",
            CauseReason::FieldValueNotFound => "FieldValueNotFound",
            CauseReason::FieldValueRequired => "FieldValueRequired",
        }
    }
}

/// One violation: the field, what is wrong, and the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    pub field: String,
    pub reason: CauseReason,
    pub message: String,
}

/// Every way `spec` does not fit the model it names, in field order (empty: it fits).
pub fn violations<M: Borrow<VideoModel>>(spec: &VideoJobSpec, models: &[M]) -> Vec<Cause> {
    if let Err(unknown) = model_exists(&spec.model, models) {
        return vec![Cause {
            field: "spec.model".into(),
            reason: CauseReason::FieldValueNotFound,
            message: unknown.to_string(),
        }];
    }
    let model = models
        .iter()
        .map(Borrow::borrow)
        .find(|m| m.metadata.name.as_deref() == Some(spec.model.as_str()))
        .expect("model_exists found it");
    let name = &spec.model;
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
        let offered: Vec<&str> = m.modes.iter().map(|m| m.as_str()).collect();
        cause(
            "spec.mode",
            CauseReason::FieldValueNotSupported,
            format!(
                "model {name} does not offer {}: set spec.mode to one of [{}]",
                spec.mode.as_str(),
                offered.join(", ")
            ),
        );
    }
    if spec.mode == GenerationMode::I2v && spec.image.is_none() {
        cause(
            "spec.image",
            CauseReason::FieldValueRequired,
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
            CauseReason::FieldValueInvalid,
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
            CauseReason::FieldValueInvalid,
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
                CauseReason::FieldValueInvalid,
                format!(
                    "must be at most {max} for model {name} (its {limit}), got {value}: lower it or leave it out for the default"
                ),
            );
        }
    }
    causes
}

/// One line listing every violation of the job `name`, as the 422's message and a failed
/// job's message say it.
pub fn summary(name: &str, model: &str, causes: &[Cause]) -> String {
    let list: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    format!(
        "VideoJob {name:?} does not fit model {model:?}: {}",
        list.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn models() -> Vec<VideoModel> {
        let model = |name: &str, steps: i32, cfg: Option<f64>, modes: &[&str]| {
            let mut fixed = json!({"steps": steps});
            if let Some(cfg) = cfg {
                fixed["cfg"] = json!(cfg);
            }
            serde_json::from_value(json!({
                "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel",
                "metadata": {"name": name},
                "spec": {"fixedParameters": fixed,
                    "defaults": {"width": 832, "height": 480, "frames": 81, "fps": 16},
                    "limits": {"maxWidth": 1280, "maxHeight": 720, "maxFrames": 121},
                    "package": {"path": name}, "modes": modes}
            }))
            .unwrap()
        };
        vec![
            model("anisora", 8, None, &["t2v", "i2v"]),
            model("phr00t", 4, Some(1.0), &["t2v"]),
        ]
    }

    fn causes(spec: Value) -> Vec<Cause> {
        violations(&serde_json::from_value(spec).unwrap(), &models())
    }

    fn fields(spec: Value) -> Vec<String> {
        causes(spec).into_iter().map(|c| c.field).collect()
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
        let found = causes(json!({"model": "anisora", "prompt": "a", "steps": 20}));
        assert_eq!(
            found,
            [Cause {
                field: "spec.steps".into(),
                reason: CauseReason::FieldValueInvalid,
                message: "must be 8 for model anisora, got 20: remove spec.steps or set it to 8"
                    .into()
            }]
        );
        assert_eq!(
            summary("clip", "anisora", &found),
            "VideoJob \"clip\" does not fit model \"anisora\": spec.steps: must be 8 for model anisora, got 20: remove spec.steps or set it to 8"
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
        let unknown = causes(json!({"model": "wan", "prompt": "a", "steps": 3}));
        assert_eq!(
            (unknown[0].field.as_str(), unknown[0].reason, unknown.len()),
            ("spec.model", CauseReason::FieldValueNotFound, 1)
        );
        assert_eq!(
            unknown[0].message,
            "VideoModel \"wan\" does not exist: set spec.model to one of [anisora, phr00t] (kubectl get videomodels)"
        );
    }
}
