//! `admission.k8s.io/v1` AdmissionReview in and out. Reading a request never panics, and
//! every answer is a well-formed AdmissionReview: a body that is not one gets a clear denial
//! (code 400), never a 500.

use serde_json::{Value, json};

/// What the webhook needs from an AdmissionReview request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub uid: String,
    pub operation: String,
    pub dry_run: bool,
    pub namespace: String,
    /// The object's name (the API server has generated it by now for `generateName`).
    pub name: String,
    pub object: Value,
}

/// One `details.causes[]` entry: the field, what is wrong, and the fix.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub field: String,
    /// `FieldValueInvalid`, `FieldValueNotSupported`, `FieldValueNotFound`, ...
    pub reason: &'static str,
    pub message: String,
}

/// A refusal, as the user will read it from kubectl or a client library.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub code: u16,
    /// The Status reason: `Invalid`, `ServiceUnavailable`, `BadRequest`.
    pub reason: &'static str,
    pub message: String,
    pub name: String,
    pub causes: Vec<Cause>,
}

impl Denial {
    pub fn bad_request(message: impl Into<String>) -> Denial {
        Denial {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
            name: String::new(),
            causes: Vec::new(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Denial {
        Denial {
            code: 503,
            reason: "ServiceUnavailable",
            message: message.into(),
            name: String::new(),
            causes: Vec::new(),
        }
    }
}

/// Reads an AdmissionReview. On failure returns the request's uid if one could be read (so
/// the API server can match the answer) and what is wrong.
pub fn parse(body: &[u8]) -> Result<Request, (String, String)> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| (String::new(), format!("the body is not JSON: {e}")))?;
    let request = review.get("request");
    let uid = request
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let fail = |message: String| Err((uid.clone(), message));
    if review.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
        || review.get("apiVersion").and_then(Value::as_str) != Some("admission.k8s.io/v1")
    {
        return fail("expected an admission.k8s.io/v1 AdmissionReview".into());
    }
    let Some(request) = request.filter(|r| r.is_object()) else {
        return fail("the AdmissionReview has no request".into());
    };
    if uid.is_empty() {
        return fail("request.uid is missing".into());
    }
    let text = |field: &str| {
        request
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let kind = request.get("kind");
    let group = kind.and_then(|k| k.get("group")).and_then(Value::as_str);
    let kind = kind.and_then(|k| k.get("kind")).and_then(Value::as_str);
    if (group, kind) != (Some("framelane.dev"), Some("VideoJob")) {
        return fail(format!(
            "this webhook admits framelane.dev VideoJobs only, got kind {}/{}",
            group.unwrap_or("?"),
            kind.unwrap_or("?")
        ));
    }
    let object = request.get("object").cloned().unwrap_or(Value::Null);
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| text("name"));
    Ok(Request {
        uid,
        operation: text("operation"),
        dry_run: request.get("dryRun").and_then(Value::as_bool) == Some(true),
        namespace: text("namespace"),
        name,
        object,
    })
}

/// The AdmissionReview answering request `uid`: allowed when `denial` is None.
pub fn respond(uid: &str, denial: Option<&Denial>) -> Vec<u8> {
    let mut response = json!({"uid": uid, "allowed": denial.is_none()});
    if let Some(d) = denial {
        let causes: Vec<Value> = d
            .causes
            .iter()
            .map(|c| json!({"field": c.field, "reason": c.reason, "message": c.message}))
            .collect();
        response["status"] = json!({
            "metadata": {},
            "status": "Failure",
            "code": d.code,
            "reason": d.reason,
            "message": d.message,
            "details": {
                "name": d.name,
                "group": "framelane.dev",
                "kind": "VideoJob",
                "causes": causes,
            },
        });
    }
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
    .expect("a JSON value always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request
        }))
        .unwrap()
    }

    #[test]
    fn reads_a_videojob_create() {
        let body = review(json!({
            "uid": "u-1", "operation": "CREATE", "namespace": "ns", "dryRun": true,
            "kind": {"group": "framelane.dev", "version": "v1alpha1", "kind": "VideoJob"},
            "object": {"metadata": {"name": "job-x1"}, "spec": {}}
        }));
        let r = parse(&body).unwrap();
        assert_eq!(
            (
                r.uid.as_str(),
                r.operation.as_str(),
                r.dry_run,
                r.name.as_str()
            ),
            ("u-1", "CREATE", true, "job-x1")
        );
    }

    #[test]
    fn refuses_other_kinds_and_garbage_with_a_reason() {
        let other = review(json!({"uid": "u-2", "kind": {"group": "", "kind": "Pod"}}));
        let (uid, message) = parse(&other).unwrap_err();
        assert_eq!(uid, "u-2");
        assert!(message.contains("got kind /Pod"), "{message}");
        assert!(
            parse(b"{\"apiVersion\": \"admi")
                .unwrap_err()
                .1
                .contains("not JSON")
        );
        assert!(parse(b"[]").unwrap_err().1.contains("AdmissionReview"));
        let no_uid = review(json!({"kind": {"group": "framelane.dev", "kind": "VideoJob"}}));
        assert!(parse(&no_uid).unwrap_err().1.contains("uid"));
    }

    #[test]
    fn a_denial_carries_code_reason_and_causes() {
        let denial = Denial {
            code: 422,
            reason: "Invalid",
            message: "spec.steps: must be 8".into(),
            name: "j".into(),
            causes: vec![Cause {
                field: "spec.steps".into(),
                reason: "FieldValueInvalid",
                message: "must be 8".into(),
            }],
        };
        let out: Value = serde_json::from_slice(&respond("u", Some(&denial))).unwrap();
        assert_eq!(out["response"]["allowed"], false);
        assert_eq!(out["response"]["status"]["code"], 422);
        assert_eq!(out["response"]["status"]["reason"], "Invalid");
        assert_eq!(
            out["response"]["status"]["details"]["causes"][0]["field"],
            "spec.steps"
        );
        let ok: Value = serde_json::from_slice(&respond("u", None)).unwrap();
        assert_eq!(ok["response"], json!({"uid": "u", "allowed": true}));
    }
}
