//! `admission.k8s.io/v1` AdmissionReview in and out. Reading a request never panics, and
//! every answer is a well-formed AdmissionReview: a body that is not one gets a clear denial
//! (code 400), never a 500.

use std::borrow::Cow;

use framelane_core::{
    depth::Overloaded,
    parameters::{Cause, summary},
};
use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};

/// What the webhook needs from an AdmissionReview request.
#[derive(Debug, Clone)]
pub struct Request {
    pub uid: String,
    pub operation: String,
    pub dry_run: bool,
    pub namespace: String,
    /// The object's name (the API server has generated it by now for `generateName`).
    pub name: String,
    /// `request.object` as it came (JSON `null` when absent), read into a VideoJob only by
    /// the parameter check.
    pub object: Box<RawValue>,
}

/// Why the webhook refuses a create: the `reason` label of
/// `framelane_admission_decisions_total`, and with it the HTTP code and Status reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A parameter does not fit the model: 422 `Invalid`.
    InvalidParameters,
    /// The job's estimated GPU memory does not fit its lane's runners: 422 `Invalid`.
    DoesNotFit,
    /// The lane is full: 503, the message starts with `queue_overloaded`.
    QueueOverloaded,
    /// The job's namespace holds its share of the lane: 503, the message starts with
    /// `queue_overloaded` and names the namespace.
    NamespaceShare,
    /// The body is not a VideoJob AdmissionReview: 400.
    BadRequest,
    /// The webhook cannot decide now (starting, or the leader is unreachable): 503.
    Unavailable,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::InvalidParameters => "invalid_parameters",
            Refusal::DoesNotFit => "does_not_fit",
            Refusal::QueueOverloaded => "queue_overloaded",
            Refusal::NamespaceShare => "namespace_share",
            Refusal::BadRequest => "bad_request",
            Refusal::Unavailable => "unavailable",
        }
    }

    /// The HTTP status code and the Status `reason` the API server returns to the client.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::InvalidParameters | Refusal::DoesNotFit => (422, "Invalid"),
            Refusal::QueueOverloaded | Refusal::NamespaceShare | Refusal::Unavailable => {
                (503, "ServiceUnavailable")
            }
            Refusal::BadRequest => (400, "BadRequest"),
        }
    }
}

/// A refusal, as the user will read it from kubectl or a client library.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub refusal: Refusal,
    pub message: String,
    pub name: String,
    pub causes: Vec<Cause>,
}

impl Denial {
    pub fn bad_request(message: impl Into<String>) -> Denial {
        Denial::new(Refusal::BadRequest, message.into())
    }

    pub fn unavailable(message: impl Into<String>) -> Denial {
        Denial::new(Refusal::Unavailable, message.into())
    }

    /// The job `name` does not fit its model: every violation in `causes`.
    pub fn invalid(name: &str, model: &str, causes: Vec<Cause>) -> Denial {
        Denial {
            message: summary(name, model, &causes),
            name: name.into(),
            causes,
            ..Denial::new(Refusal::InvalidParameters, String::new())
        }
    }

    /// The job `name` needs more GPU memory than lane `lane`'s runners have: `cause` names
    /// the field to lower, the limit and the largest size that fits.
    pub fn does_not_fit(name: &str, lane: &str, cause: Cause) -> Denial {
        Denial {
            message: format!(
                "VideoJob {name:?} does not fit the GPU memory of lane {lane:?}: {}: {}",
                cause.field, cause.message
            ),
            name: name.into(),
            causes: vec![cause],
            ..Denial::new(Refusal::DoesNotFit, String::new())
        }
    }

    /// The lane the job of `name` counts against is full (for its namespace).
    pub fn overloaded(name: &str, full: &Overloaded) -> Denial {
        let refusal = match full {
            Overloaded::Lane { .. } => Refusal::QueueOverloaded,
            Overloaded::Namespace { .. } => Refusal::NamespaceShare,
        };
        Denial {
            name: name.into(),
            ..Denial::new(refusal, full.to_string())
        }
    }

    fn new(refusal: Refusal, message: String) -> Denial {
        Denial {
            refusal,
            message,
            name: String::new(),
            causes: Vec::new(),
        }
    }
}

/// The parts of an AdmissionReview the webhook reads, borrowed from the body; everything
/// else (userInfo, oldObject, options, ...) is skipped unparsed.
#[derive(Deserialize)]
struct Review<'a> {
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "apiVersion")]
    api_version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    request: Option<ReviewRequest<'a>>,
}

#[derive(Deserialize)]
struct ReviewRequest<'a> {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    operation: String,
    #[serde(default, rename = "dryRun")]
    dry_run: Option<bool>,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(borrow, default)]
    kind: Option<GroupKind<'a>>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct GroupKind<'a> {
    #[serde(borrow, default)]
    group: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Named {
    metadata: NamedMeta,
}

#[derive(Deserialize)]
struct NamedMeta {
    name: String,
}

/// Reads an AdmissionReview. On failure returns the request's uid if one could be read (so
/// the API server can match the answer) and what is wrong.
///
/// A review the API server sends is read straight into the few fields used (no JSON tree is
/// built: this is most of a decision's time). Anything that does not read that way (wrong
/// types, duplicate keys, not JSON) is read again as a JSON tree, which finds the uid and says
/// what is wrong; both readings give the same answer for a review either can read.
pub fn parse(body: &[u8]) -> Result<Request, (String, String)> {
    match serde_json::from_slice::<Review>(body) {
        Ok(review) => from_review(review),
        Err(_) => parse_tree(body),
    }
}

fn from_review(review: Review) -> Result<Request, (String, String)> {
    let Review {
        kind,
        api_version,
        request,
    } = review;
    let uid = request.as_ref().map(|r| r.uid.clone()).unwrap_or_default();
    if kind.as_deref() != Some("AdmissionReview") || api_version.as_deref() != Some(API_VERSION) {
        return Err((uid, NOT_A_REVIEW.into()));
    }
    let Some(request) = request else {
        return Err((uid, NO_REQUEST.into()));
    };
    if uid.is_empty() {
        return Err((uid, NO_UID.into()));
    }
    let (group, kind) = request
        .kind
        .as_ref()
        .map_or((None, None), |k| (k.group.as_deref(), k.kind.as_deref()));
    if (group, kind) != (Some(GROUP), Some(KIND)) {
        return Err((uid, wrong_kind(group, kind)));
    }
    let object = match request.object {
        Some(raw) => raw.to_owned(),
        None => null(),
    };
    let name = serde_json::from_str::<Named>(object.get())
        .map(|n| n.metadata.name)
        .unwrap_or(request.name);
    Ok(Request {
        uid,
        operation: request.operation,
        dry_run: request.dry_run == Some(true),
        namespace: request.namespace,
        name,
        object,
    })
}

const API_VERSION: &str = "admission.k8s.io/v1";
const GROUP: &str = "framelane.dev";
const KIND: &str = "VideoJob";
const NOT_A_REVIEW: &str = "expected an admission.k8s.io/v1 AdmissionReview";
const NO_REQUEST: &str = "the AdmissionReview has no request";
const NO_UID: &str = "request.uid is missing";

fn wrong_kind(group: Option<&str>, kind: Option<&str>) -> String {
    format!(
        "this webhook admits framelane.dev VideoJobs only, got kind {}/{}",
        group.unwrap_or("?"),
        kind.unwrap_or("?")
    )
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".into()).expect("null is JSON")
}

/// [`parse`] by way of a JSON tree: for bodies that do not read into [`Review`].
pub(super) fn parse_tree(body: &[u8]) -> Result<Request, (String, String)> {
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
        || review.get("apiVersion").and_then(Value::as_str) != Some(API_VERSION)
    {
        return fail(NOT_A_REVIEW.into());
    }
    let Some(request) = request.filter(|r| r.is_object()) else {
        return fail(NO_REQUEST.into());
    };
    if uid.is_empty() {
        return fail(NO_UID.into());
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
    if (group, kind) != (Some(GROUP), Some(KIND)) {
        return fail(wrong_kind(group, kind));
    }
    let object = request.get("object").unwrap_or(&Value::Null);
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| text("name"));
    let object = serde_json::value::to_raw_value(object).expect("a JSON value always serializes");
    Ok(Request {
        uid,
        operation: text("operation"),
        dry_run: request.get("dryRun").and_then(Value::as_bool) == Some(true),
        namespace: text("namespace"),
        name,
        object,
    })
}

/// The AdmissionReview that allows request `uid` with `patch` (JSON Patch operations) applied
/// to its object.
pub fn respond_patch(uid: &str, patch: &[Value]) -> Vec<u8> {
    let encoded = serde_json::to_value(k8s_openapi::ByteString(
        serde_json::to_vec(patch).expect("a JSON value always serializes"),
    ))
    .expect("bytes always serialize");
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": encoded},
    }))
    .expect("a JSON value always serializes")
}

/// The AdmissionReview answering request `uid`: allowed when `denial` is None.
pub fn respond(uid: &str, denial: Option<&Denial>) -> Vec<u8> {
    let mut response = json!({"uid": uid, "allowed": denial.is_none()});
    if let Some(d) = denial {
        let causes: Vec<Value> = d
            .causes
            .iter()
            .map(|c| json!({"field": c.field, "reason": c.reason.as_str(), "message": c.message}))
            .collect();
        let (code, reason) = d.refusal.status();
        response["status"] = json!({
            "metadata": {},
            "status": "Failure",
            "code": code,
            "reason": reason,
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
        let cause = Cause {
            field: "spec.steps".into(),
            reason: framelane_core::parameters::CauseReason::FieldValueInvalid,
            message: "must be 8".into(),
        };
        let denial = Denial::invalid("j", "anisora", vec![cause]);
        let out: Value = serde_json::from_slice(&respond("u", Some(&denial))).unwrap();
        assert_eq!(out["response"]["allowed"], false);
        assert_eq!(out["response"]["status"]["code"], 422);
        assert_eq!(out["response"]["status"]["reason"], "Invalid");
        assert_eq!(
            out["response"]["status"]["message"],
            "VideoJob \"j\" does not fit model \"anisora\": spec.steps: must be 8"
        );
        assert_eq!(
            out["response"]["status"]["details"]["causes"][0]["field"],
            "spec.steps"
        );
        let ok: Value = serde_json::from_slice(&respond("u", None)).unwrap();
        assert_eq!(ok["response"], json!({"uid": "u", "allowed": true}));
        let patch = [json!({"op": "add", "path": "/spec/steps", "value": 8})];
        let patched: Value = serde_json::from_slice(&respond_patch("u", &patch)).unwrap();
        assert_eq!(patched["response"]["patchType"], "JSONPatch");
        let decoded: k8s_openapi::ByteString =
            serde_json::from_value(patched["response"]["patch"].clone()).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&decoded.0).unwrap(),
            json!(patch)
        );
    }
}
