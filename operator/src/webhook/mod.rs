//! The validating admission webhook, served by every replica over HTTPS.
//!
//! - Parameters are checked against the VideoModel on the replica that gets the request
//!   (`framelane_core::parameters`): every violation, with its field and fix (422 `Invalid`).
//! - The depth limit has one arbiter, the leader (`hold`): its queue index counts every
//!   unfinished job of a lane (admitted, created but not yet admitted, and creates it let
//!   through that the watch has not shown yet) and takes a slot in the same step as the check.
//!   A standby hands the review to the leader (`forward`), so the limit is exact with any
//!   number of replicas; the controller still rejects anything that slipped past.
//! - Certificates (`certs`, `secret`): every replica serves the Secret's current one. The
//!   operator issues them, or (`--webhook-certificates external`) cert-manager does: then the
//!   operator never writes the Secret or the caBundle, it only reloads what cert-manager writes.
//! - Who may call (`peer`, `routes`): with `--webhook-client-ca`, the API server's paths
//!   answer only connections with a client certificate that CA signed; the leader path
//!   answers only requests signed with a key only the replicas have. Anything else is
//!   refused unread, so no one else can take a hold.
//! - `routes` and `tls` serve it all over HTTPS, with a handshake timeout, a connection cap
//!   and a body limit, and drain on shutdown.

pub mod certs;
mod forward;
mod hold;
pub mod peer;
pub mod review;
mod routes;
pub mod secret;
pub mod tls;

use std::{
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use framelane_api::{VideoJob, VideoModel};
use framelane_core::{defaults::missing, parameters::violations};
use kube::{ResourceExt, runtime::reflector::Store};
use serde_json::json;

use self::{
    certs::Policy,
    peer::PeerKeys,
    review::{Denial, Request},
    tls::{Forwarder, Reloadable},
};
use crate::{
    config::CertificateSource,
    context::Context,
    leader::Elector,
    metrics::{AdmissionLabels, Metrics},
};

/// The answer while the caches are still being read: counting from a partial view could let
/// a lane overfill.
const STARTING: &str =
    "framelane is starting and has not read its models, lanes and jobs yet; retry in a few seconds";

/// The path the API server calls to validate a job.
pub const PATH: &str = "/validate-videojob";
/// The path the API server calls to fill in a job's defaults.
pub const MUTATE_PATH: &str = "/mutate-videojob";
/// The path a standby hands reviews to the leader on.
const LEADER_PATH: &str = "/leader/validate-videojob";
/// How long a review may wait for a leader that can count (one being elected, or starting),
/// hand-over included, when the API server did not say how long it waits: 3 s, inside the
/// chart's 5 s `webhook.timeoutSeconds`.
const DECIDE_WITHIN: Duration = Duration::from_secs(3);

/// How long a review may wait, from the API server's `timeout` query parameter (its wait for
/// this call, the webhook's `timeoutSeconds` or less, as a Go duration such as `5s`): three
/// fifths of it, so that a refusal reaches the API server before it gives up on the call and
/// fails the create with its own, vaguer error.
pub fn decide_within(timeout: Option<&str>) -> Duration {
    timeout
        .and_then(go_duration)
        .map_or(DECIDE_WITHIN, |t| t * 3 / 5)
}

/// A Go duration (`time.Duration.String()`: `5s`, `1m0s`, `1.5s`, `300ms`); `None` for
/// anything else.
fn go_duration(text: &str) -> Option<Duration> {
    const UNITS: [(&str, f64); 7] = [
        ("ns", 1e-9),
        ("us", 1e-6),
        ("µs", 1e-6),
        ("ms", 1e-3),
        ("s", 1.0),
        ("m", 60.0),
        ("h", 3600.0),
    ];
    let mut rest = text;
    let mut seconds = 0.0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|&end| end > 0)?;
        let value: f64 = rest[..digits].parse().ok()?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (_, scale) = UNITS.iter().find(|(u, _)| *u == &after[..unit_len])?;
        seconds += value * scale;
        rest = &after[unit_len..];
    }
    (seconds > 0.0 && seconds <= 3600.0).then(|| Duration::from_secs_f64(seconds))
}

pub struct Webhook {
    pub models: Store<VideoModel>,
    /// The leader's controller context, once this replica leads; used only while the
    /// election confirms it still does (see [`Webhook::leader`]).
    pub leader: OnceLock<Arc<Context>>,
    pub elector: Arc<Elector>,
    pub metrics: Arc<Metrics>,
    pub certs: Arc<Reloadable>,
    pub policy: Policy,
    pub source: CertificateSource,
    /// Whether the API server's paths demand a client certificate (`--webhook-client-ca`).
    pub client_ca: bool,
    peers: PeerKeys,
    /// The hosts a job's `spec.image` URL may name (`--image-url-hosts`).
    pub image_url_hosts: Vec<String>,
    forwarder: RwLock<Option<Arc<Forwarder>>>,
}

impl Webhook {
    pub fn new(
        models: Store<VideoModel>,
        elector: Arc<Elector>,
        metrics: Arc<Metrics>,
        policy: Policy,
        source: CertificateSource,
        client_ca: bool,
        image_url_hosts: Vec<String>,
    ) -> Webhook {
        Webhook {
            models,
            leader: OnceLock::new(),
            elector,
            metrics,
            certs: Arc::default(),
            policy,
            source,
            client_ca,
            peers: PeerKeys::default(),
            image_url_hosts,
            forwarder: RwLock::new(None),
        }
    }

    /// Answers one AdmissionReview body from the API server, deciding within `within`
    /// ([`decide_within`] of the call's timeout).
    pub async fn review(&self, body: Bytes, within: Duration) -> Vec<u8> {
        let started = Instant::now();
        let out = self.answer(body, started + within).await;
        self.metrics
            .webhook_duration
            .observe(started.elapsed().as_secs_f64());
        out
    }

    /// Answers one AdmissionReview a standby handed on, which waits for the answer until
    /// `answer_by`; `Err` with why not while this replica cannot count (it is not the
    /// confirmed leader, or has not read its caches yet) or the standby would give up before
    /// the answer reached it (then no slot is taken): the standby tries again or refuses.
    pub fn review_as_leader(
        &self,
        body: &[u8],
        answer_by: Option<Instant>,
    ) -> Result<Vec<u8>, &'static str> {
        let started = Instant::now();
        if answer_by.is_some_and(|by| started + forward::REPLY_MARGIN >= by) {
            return Err("the standby's wait for this answer is over");
        }
        let out = match self.checked(body) {
            Ok((request, job)) => self
                .hold(&request, &job)
                .ok_or("this replica is not the confirmed leader or has not read its caches yet")?,
            Err(answer) => answer,
        };
        self.metrics
            .webhook_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(out)
    }

    async fn answer(&self, body: Bytes, deadline: Instant) -> Vec<u8> {
        let (request, job) = match self.checked(&body) {
            Ok(checked) => checked,
            Err(answer) => return answer,
        };
        // The leader decides. While there is none that can count (a failover, a rollout),
        // wait for one rather than fail the create.
        let mut why;
        loop {
            if let Some(answer) = self.hold(&request, &job) {
                return answer;
            }
            if self.leader().is_none() {
                match self.forward(body.clone(), deadline).await {
                    Ok(answer) => return answer,
                    Err(e) => why = e,
                }
            } else {
                why = "this replica leads but has not read its lanes and jobs yet".into();
            }
            if Instant::now() + Duration::from_millis(100) >= deadline {
                let denial = Denial::unavailable(format!(
                    "framelane has no leader replica that can count the lane's queue ({why}); retry in a few seconds"
                ));
                return self.decided(&request.uid, "", Some(&denial));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The review's request and job when the depth decision is still to be made, else the
    /// answer.
    fn checked(&self, body: &[u8]) -> Result<(Request, VideoJob), Vec<u8>> {
        match check(body, self.ready_models().as_deref(), &self.image_url_hosts) {
            Ok((request, Some(job))) => Ok((request, job)),
            Ok((request, None)) => Err(review::respond(&request.uid, None)),
            Err((uid, denial)) => Err(self.decided(&uid, "", Some(&denial))),
        }
    }

    /// The leader's context while this replica is the confirmed leader: a replica whose
    /// renewals stalled, or that lost the Lease, hands reviews on like a standby.
    fn leader(&self) -> Option<&Arc<Context>> {
        self.leader.get().filter(|ctx| ctx.leading())
    }

    /// The leader's decision, or `None` when this replica cannot count now.
    fn hold(&self, request: &Request, job: &VideoJob) -> Option<Vec<u8>> {
        let ctx = self.leader()?;
        let (lane, denial) = hold::hold_slot(ctx, request, job)?;
        Some(self.decided(&request.uid, &lane, denial.as_ref()))
    }

    /// Answers one AdmissionReview of the mutating webhook ([`defaults`]).
    pub fn mutate(&self, body: &[u8]) -> Vec<u8> {
        defaults(body, self.ready_models().as_deref())
    }

    /// The VideoModels, once the cache has read them all (`None` before).
    fn ready_models(&self) -> Option<Vec<Arc<VideoModel>>> {
        use futures::FutureExt;
        matches!(self.models.wait_until_ready().now_or_never(), Some(Ok(())))
            .then(|| self.models.state())
    }

    fn decided(&self, uid: &str, lane: &str, denial: Option<&Denial>) -> Vec<u8> {
        let labels = AdmissionLabels {
            lane: lane.into(),
            result: if denial.is_none() {
                "allowed"
            } else {
                "denied"
            }
            .into(),
            reason: denial.map_or("", |d| d.refusal.as_str()).into(),
        };
        self.metrics
            .admission_decisions
            .get_or_create(&labels)
            .inc();
        review::respond(uid, denial)
    }
}

/// The mutating webhook's answer: a new job gets what it leaves out from its model in
/// `models` (`framelane_core::defaults`), so the stored spec is what runs. Refused with 503
/// while the model cache is still being read (`None`): allowed unchanged, the job would be
/// stored without its defaults. Anything it cannot read is allowed unchanged: the validating
/// webhook refuses it.
pub fn defaults(body: &[u8], models: Option<&[Arc<VideoModel>]>) -> Vec<u8> {
    let request = match review::parse(body) {
        Ok(request) => request,
        Err((uid, _)) => return review::respond(&uid, None),
    };
    let Ok(job) = serde_json::from_str::<VideoJob>(request.object.get()) else {
        return review::respond(&request.uid, None);
    };
    if request.operation != "CREATE" {
        return review::respond(&request.uid, None);
    }
    let Some(models) = models else {
        return review::respond(&request.uid, Some(&Denial::unavailable(STARTING)));
    };
    let patch: Vec<serde_json::Value> = models
        .iter()
        .find(|m| m.name_any() == job.spec.model)
        .map(|model| {
            missing(&job.spec, model)
                .into_iter()
                .map(|(field, value)| {
                    json!({"op": "add", "path": format!("/spec/{field}"), "value": value})
                })
                .collect()
        })
        .unwrap_or_default();
    review::respond_patch(&request.uid, &patch)
}

/// Everything the webhook decides without the queue: reads the review and checks the job's
/// parameters against `models` (`None` while the model cache is still being read) and its
/// image against `image_url_hosts`. The job is `None` for an operation other than a create:
/// nothing to check.
pub fn check(
    body: &[u8],
    models: Option<&[Arc<VideoModel>]>,
    image_url_hosts: &[String],
) -> Result<(Request, Option<VideoJob>), (String, Denial)> {
    let request = review::parse(body).map_err(|(uid, m)| (uid, Denial::bad_request(m)))?;
    if request.operation != "CREATE" {
        return Ok((request, None));
    }
    let Some(models) = models else {
        return Err((request.uid, Denial::unavailable(STARTING)));
    };
    let job: VideoJob = match serde_json::from_str(request.object.get()) {
        Ok(job) => job,
        Err(e) => {
            let message = format!("request.object is not a valid VideoJob: {e}");
            return Err((request.uid, Denial::bad_request(message)));
        }
    };
    let causes = violations(&job.spec, models, image_url_hosts);
    if causes.is_empty() {
        Ok((request, Some(job)))
    } else {
        let denial = Denial::invalid(&request.name, &job.spec.model, causes);
        Err((request.uid, denial))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::Deserialize;
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn a_review_decides_within_three_fifths_of_the_api_servers_timeout() {
        let ms = |text| decide_within(Some(text)).as_millis();
        assert_eq!(ms("5s"), 3000);
        assert_eq!(ms("2s"), 1200);
        assert_eq!(ms("30s"), 18_000);
        assert_eq!(ms("1m0s"), 36_000);
        assert_eq!(ms("1.5s"), 900);
        assert_eq!(ms("500ms"), 300);
        // Not said, or not a duration: the 3 s that fit the chart's 5 s.
        for text in [
            None,
            Some(""),
            Some("5"),
            Some("s"),
            Some("5x"),
            Some("-5s"),
            Some("0s"),
        ] {
            assert_eq!(decide_within(text), DECIDE_WITHIN, "{text:?}");
        }
    }

    /// The default install's models (examples/videomodels.yaml).
    fn models() -> Vec<Arc<VideoModel>> {
        let yaml = include_str!("../../../examples/videomodels.yaml");
        serde_yaml::Deserializer::from_str(yaml)
            .map(|doc| Arc::new(VideoModel::deserialize(doc).expect("a VideoModel")))
            .collect()
    }

    #[test]
    fn defaults_wait_for_the_model_cache() {
        let body = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "operation": "CREATE", "name": "cat", "namespace": "ns",
                "kind": {"group": "framelane.dev", "version": "v1alpha1", "kind": "VideoJob"},
                "object": {"apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                    "metadata": {"name": "cat"},
                    "spec": {"model": "anisora", "prompt": "a cat", "width": 832}}}
        }))
        .unwrap();
        let starting: Value = serde_json::from_slice(&defaults(&body, None)).unwrap();
        assert_eq!(starting["response"]["allowed"], false);
        assert_eq!(starting["response"]["status"]["code"], 503);
        let models = models();
        let filled: Value = serde_json::from_slice(&defaults(&body, Some(&models))).unwrap();
        assert_eq!(filled["response"]["allowed"], true);
        let patch: k8s_openapi::ByteString =
            serde_json::from_value(filled["response"]["patch"].clone()).unwrap();
        let patch: Value = serde_json::from_slice(&patch.0).unwrap();
        let paths: Vec<&str> = patch
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(&"/spec/steps"), "{paths:?}");
        assert!(!paths.contains(&"/spec/width"), "{paths:?}");
    }

    /// What a replica answers before the queue step, for any body.
    fn answer(body: &[u8]) -> Value {
        let models = models();
        let out = match check(body, Some(&models), &[]) {
            Ok((request, _)) => review::respond(&request.uid, None),
            Err((uid, denial)) => review::respond(&uid, Some(&denial)),
        };
        serde_json::from_slice(&out).expect("the answer is JSON")
    }

    fn well_formed(out: &Value) -> bool {
        let response = &out["response"];
        out["apiVersion"] == "admission.k8s.io/v1"
            && out["kind"] == "AdmissionReview"
            && response["uid"].is_string()
            && match response["allowed"].as_bool() {
                Some(true) => response.get("status").is_none(),
                Some(false) => {
                    let code = response["status"]["code"].as_u64().unwrap_or(0);
                    (code == 400 || code == 422)
                        && !response["status"]["message"]
                            .as_str()
                            .unwrap_or("")
                            .is_empty()
                }
                None => false,
            }
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            ".{0,10}".prop_map(Value::from),
            prop::sample::select(vec![
                "admission.k8s.io/v1",
                "AdmissionReview",
                "framelane.dev",
                "VideoJob",
                "CREATE",
                "anisora",
                "phr00t",
                "t2v",
                "i2v",
            ])
            .prop_map(Value::from),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "apiVersion",
                "kind",
                "request",
                "uid",
                "group",
                "operation",
                "object",
                "metadata",
                "name",
                "spec",
                "model",
                "prompt",
                "mode",
                "steps",
                "cfg",
                "width",
                "frames",
                "image",
                "dryRun",
            ])
            .prop_map(String::from),
            "[a-z]{1,6}",
        ]
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(5, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(key(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A real-looking review whose spec fields are arbitrary.
    fn videojob_review() -> impl Strategy<Value = Value> {
        (
            prop::collection::btree_map(key(), leaf(), 0..10),
            prop::option::of(prop::sample::select(vec!["anisora", "phr00t", "wan"])),
        )
            .prop_map(|(spec, model)| {
                let mut spec = Value::Object(spec.into_iter().collect());
                if let Some(model) = model {
                    spec["model"] = model.into();
                }
                json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "request": {"uid": "u-7", "operation": "CREATE", "namespace": "ns",
                        "kind": {"group": "framelane.dev", "version": "v1alpha1", "kind": "VideoJob"},
                        "object": {"apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                            "metadata": {"name": "j"}, "spec": spec}}})
            })
    }

    /// `right`, or anything else in its place, or nothing.
    fn maybe(right: Value, other: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => Just(right),
            1 => other,
            1 => Just(Value::Null),
        ]
    }

    /// A review whose every field is right, of another type or value, or missing.
    fn review_like() -> impl Strategy<Value = Value> {
        let kind = maybe(
            json!({"group": "framelane.dev", "kind": "VideoJob"}),
            leaf(),
        );
        let metadata = maybe(json!({"name": "j"}), leaf()).prop_map(|m| json!({"metadata": m}));
        let request = (
            maybe(json!("u-7"), leaf()),
            maybe(json!("CREATE"), leaf()),
            maybe(json!("ns"), leaf()),
            maybe(json!("from-request"), leaf()),
            maybe(json!(true), leaf()),
            kind,
            maybe(Value::Null, metadata),
        )
            .prop_map(|(uid, operation, namespace, name, dry_run, kind, object)| {
                let fields = [
                    ("uid", uid),
                    ("operation", operation),
                    ("namespace", namespace),
                    ("name", name),
                    ("dryRun", dry_run),
                    ("kind", kind),
                    ("object", object),
                ];
                Value::Object(
                    fields
                        .into_iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                )
            });
        (
            maybe(json!("admission.k8s.io/v1"), leaf()),
            maybe(json!("AdmissionReview"), leaf()),
            maybe(Value::Null, request),
        )
            .prop_map(|(api_version, kind, request)| {
                json!({"apiVersion": api_version, "kind": kind, "request": request})
            })
    }

    /// A parse result as JSON, the object included as a tree, to compare.
    fn comparable(
        parsed: Result<review::Request, (String, String)>,
    ) -> Result<Value, (String, String)> {
        parsed.map(|r| {
            let object: Value = serde_json::from_str(r.object.get()).expect("the object is JSON");
            json!([r.uid, r.operation, r.dry_run, r.namespace, r.name, object])
        })
    }

    proptest! {
        #[test]
        fn the_direct_reading_and_the_tree_agree(value in review_like()) {
            let body = serde_json::to_vec(&value).unwrap();
            prop_assert_eq!(
                comparable(review::parse(&body)),
                comparable(review::parse_tree(&body))
            );
        }

        #[test]
        fn arbitrary_bytes_get_a_well_formed_answer(body in prop::collection::vec(any::<u8>(), 0..300)) {
            prop_assert!(well_formed(&answer(&body)));
        }

        #[test]
        fn arbitrary_json_gets_a_well_formed_answer(value in arbitrary_json()) {
            let body = serde_json::to_vec(&value).unwrap();
            prop_assert!(well_formed(&answer(&body)));
        }

        #[test]
        fn arbitrary_videojobs_get_a_well_formed_answer(value in videojob_review()) {
            let out = answer(&serde_json::to_vec(&value).unwrap());
            prop_assert!(well_formed(&out));
            prop_assert_eq!(out["response"]["uid"].as_str(), Some("u-7"));
        }

        #[test]
        fn truncated_reviews_get_a_well_formed_answer(value in videojob_review(), cut in 0usize..600) {
            let body = serde_json::to_vec(&value).unwrap();
            prop_assert!(well_formed(&answer(&body[..cut.min(body.len())])));
        }
    }
}
