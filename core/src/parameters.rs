//! Does a job fit its model? Every violation of a VideoJob's parameters against its
//! VideoModel, each naming its field and the fix: the webhook refuses them with a 422, and
//! the controller fails a job that bypassed the webhook with the same causes. Also where a
//! job's start image may come from ([`image_source`]), which the runner checks again before
//! it reads one.

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
/// `image_url_hosts` are the hosts a `spec.image` URL may name (none: only paths).
pub fn violations<M: Borrow<VideoModel>>(
    spec: &VideoJobSpec,
    models: &[M],
    image_url_hosts: &[String],
) -> Vec<Cause> {
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
    match (spec.mode, &spec.image) {
        (GenerationMode::I2v, None) => cause(
            "spec.image",
            CauseReason::FieldValueRequired,
            "required when mode is i2v: set it to an image path in the model volume or an http(s) URL"
                .into(),
        ),
        (GenerationMode::T2v, Some(_)) => cause(
            "spec.image",
            CauseReason::FieldValueInvalid,
            "is used only when mode is i2v: remove spec.image or set spec.mode to i2v".into(),
        ),
        (GenerationMode::I2v, Some(image)) => {
            if let Err(why) = image_source(image, image_url_hosts) {
                cause("spec.image", CauseReason::FieldValueInvalid, why);
            }
        }
        (GenerationMode::T2v, None) => {}
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

/// Where a job's start image is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageSource<'a> {
    /// A file, relative to the root of the lane's model volume.
    Path(&'a str),
    /// An http(s) URL whose host the cluster allows.
    Url(&'a str),
}

/// Where `image` (a `spec.image`) points, or why it may not be read: a path must stay inside
/// the model volume (relative, no `..`); a URL must be http or https, carry no credentials,
/// and name one of `allowed_hosts` (compared without case; a port does not matter). Fetching
/// any URL from inside a cluster would let a job reach internal services, so an empty list
/// allows no URL.
pub fn image_source<'a>(
    image: &'a str,
    allowed_hosts: &[String],
) -> Result<ImageSource<'a>, String> {
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    let Some((scheme, rest)) = split_scheme(image) else {
        if image.starts_with('/') {
            return Err(format!(
                "must be a path relative to the model volume's root, not the absolute path {image}"
            ));
        }
        if image.split('/').any(|part| part == "..") {
            return Err("must not leave the model volume: remove the `..`".into());
        }
        return Ok(ImageSource::Path(image));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "scheme {scheme}: is not allowed; give a path in the model volume (such as \
             inputs/cat.png) or an http(s) URL"
        ));
    }
    let Some(after) = rest.strip_prefix("//") else {
        return Err(format!(
            "{image} is not a URL with a host (http://host/...)"
        ));
    };
    let authority = after.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("must not carry credentials (user@host) in the URL".into());
    }
    let host = host_of(authority);
    if host.is_empty() {
        return Err(format!("{image} names no host"));
    }
    if allowed_hosts.is_empty() {
        return Err(format!(
            "URLs are not allowed: this cluster allows images from no host (the operator's \
             --image-url-hosts); put the image in the model volume and give its path, not {host}"
        ));
    }
    if !allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return Err(format!(
            "host {host} is not one this cluster allows images from ([{}]); use one of them or \
             a path in the model volume",
            allowed_hosts.join(", ")
        ));
    }
    Ok(ImageSource::Url(image))
}

/// `scheme` and the rest of `scheme:rest`, a scheme being a letter followed by letters,
/// digits, `+`, `-` or `.` (RFC 3986); `None` for a path.
fn split_scheme(image: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = image.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some((scheme, rest))
}

/// The host of a URL authority (`host`, `host:port`, `[v6]:port`), without a trailing dot.
fn host_of(authority: &str) -> &str {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => match authority.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
            _ => authority,
        },
    };
    host.strip_suffix('.').unwrap_or(host)
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
                    "weights": {"format": "diffusers", "path": name}, "modes": modes}
            }))
            .unwrap()
        };
        vec![
            model("anisora", 8, None, &["t2v", "i2v"]),
            model("phr00t", 4, Some(1.0), &["t2v"]),
        ]
    }

    fn causes(spec: Value) -> Vec<Cause> {
        let hosts = ["images.example.com".to_owned()];
        violations(&serde_json::from_value(spec).unwrap(), &models(), &hosts)
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

    #[test]
    fn an_image_may_be_a_path_in_the_model_volume_or_a_url_of_an_allowed_host() {
        let hosts = [
            "images.example.com".to_owned(),
            "cdn.example.org".to_owned(),
        ];
        for (image, expected) in [
            ("inputs/cat.png", Ok(ImageSource::Path("inputs/cat.png"))),
            ("a..b/c.png", Ok(ImageSource::Path("a..b/c.png"))),
            (
                "https://images.example.com/cat.png",
                Ok(ImageSource::Url("https://images.example.com/cat.png")),
            ),
            (
                "HTTP://CDN.example.org.:8443/x?y#z",
                Ok(ImageSource::Url("HTTP://CDN.example.org.:8443/x?y#z")),
            ),
        ] {
            assert_eq!(image_source(image, &hosts), expected, "{image}");
        }
        let refused = |image: &str, hosts: &[String]| image_source(image, hosts).unwrap_err();
        assert_eq!(
            refused("/etc/passwd", &hosts),
            "must be a path relative to the model volume's root, not the absolute path /etc/passwd"
        );
        assert_eq!(
            refused("inputs/../../secrets/key", &hosts),
            "must not leave the model volume: remove the `..`"
        );
        assert!(refused("file:///etc/passwd", &hosts).starts_with("scheme file: is not allowed"));
        assert!(refused("ftp://images.example.com/a.png", &hosts).starts_with("scheme ftp:"));
        assert!(refused("data:image/png;base64,AAAA", &hosts).starts_with("scheme data:"));
        assert_eq!(
            refused("https://images.example.com@evil.test/a.png", &hosts),
            "must not carry credentials (user@host) in the URL"
        );
        assert!(
            refused("http://169.254.169.254/latest", &hosts)
                .starts_with("host 169.254.169.254 is not one this cluster allows images from ([images.example.com, cdn.example.org])")
        );
        assert!(
            refused("https://images.example.com/cat.png", &[])
                .starts_with("URLs are not allowed: this cluster allows images from no host")
        );
        assert!(refused("https:cat.png", &hosts).contains("is not a URL with a host"));
        assert_eq!(
            refused("inputs/my cat.png", &hosts),
            "must not contain spaces or control characters"
        );
    }

    #[test]
    fn image_rules_are_admission_causes_and_only_for_i2v() {
        let found = causes(json!({"model": "anisora", "prompt": "a", "mode": "i2v",
            "image": "file:///etc/passwd"}));
        assert_eq!(
            (found[0].field.as_str(), found[0].reason, found.len()),
            ("spec.image", CauseReason::FieldValueInvalid, 1)
        );
        assert!(
            fields(
                json!({"model": "anisora", "prompt": "a", "mode": "i2v", "image": "inputs/cat.png"})
            )
            .is_empty()
        );
        let t2v = causes(json!({"model": "anisora", "prompt": "a", "image": "inputs/cat.png"}));
        assert_eq!(
            t2v[0].message,
            "is used only when mode is i2v: remove spec.image or set spec.mode to i2v"
        );
        let phr00t = causes(
            json!({"model": "phr00t", "prompt": "a", "mode": "i2v", "image": "inputs/cat.png"}),
        );
        assert_eq!(
            phr00t[0].message,
            "model phr00t does not offer i2v: set spec.mode to one of [t2v]"
        );
    }
}
