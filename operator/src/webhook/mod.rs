//! The validating admission webhook (DESIGN §3), served by every replica over HTTPS.
//!
//! - Parameters are checked against the VideoModel on the replica that gets the request:
//!   every violation, with its field and fix (422 `Invalid`).
//! - The depth limit has one arbiter, the leader: its queue index counts every unfinished job
//!   of a lane (admitted, created but not yet admitted, and creates it let through that the
//!   watch has not shown yet) and takes a slot in the same step as the check. A standby hands
//!   the review to the leader (its address is on the leader Lease), so the limit is exact
//!   with any number of replicas; the controller still rejects anything that slipped past.
//! - Certificates: see `certs`; every replica serves the Secret's current one. The operator
//!   issues them, or (`--webhook-certificates external`) cert-manager does: then the operator
//!   never writes the Secret or the caBundle, it only reloads what cert-manager writes.

pub mod certs;
pub mod params;
pub mod review;
pub mod tls;

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use framelane_api::{VideoJob, VideoModel};
use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::ValidatingWebhookConfiguration, core::v1::Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, reflector::Store, watcher},
};

use self::{
    certs::{Material, Policy, Rotation, Serving},
    review::{Denial, Request},
    tls::{Forwarder, Reloadable},
};
use crate::{
    config::CertificateSource,
    context::{Context, route},
    leader::Elector,
    metrics::{AdmissionLabels, Metrics},
    queue::JobKey,
};

/// How long a slot stays held for a create the webhook let through before the watch shows
/// the job: longer than the API server waits for the webhook, so only a create that failed
/// after admission (another webhook or a quota refused it) gives its slot back this way.
const HOLD: Duration = Duration::from_secs(15);

/// The path the API server calls, and the one a standby hands reviews to the leader on.
/// The answer while the caches are still being read: counting from a partial view could let
/// a lane overfill.
const STARTING: &str =
    "framelane is starting and has not read its models, lanes and jobs yet; retry in a few seconds";

pub const PATH: &str = "/validate-videojob";
const LEADER_PATH: &str = "/leader/validate-videojob";

pub struct Webhook {
    pub models: Store<VideoModel>,
    /// The leader's controller context, once this replica leads.
    pub leader: OnceLock<Arc<Context>>,
    pub elector: Arc<Elector>,
    pub metrics: Arc<Metrics>,
    pub certs: Arc<Reloadable>,
    pub policy: Policy,
    pub source: CertificateSource,
    forwarder: RwLock<Option<Arc<Forwarder>>>,
}

impl Webhook {
    pub fn new(
        models: Store<VideoModel>,
        elector: Arc<Elector>,
        metrics: Arc<Metrics>,
        policy: Policy,
        source: CertificateSource,
    ) -> Webhook {
        Webhook {
            models,
            leader: OnceLock::new(),
            elector,
            metrics,
            certs: Arc::default(),
            policy,
            source,
            forwarder: RwLock::new(None),
        }
    }

    /// The HTTP routes: `POST /validate-videojob` for the API server, and the leader's own.
    pub fn routes(
        self: Arc<Self>,
    ) -> impl warp::Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone {
        use warp::Filter;
        let api_server = self.clone();
        let standby = self;
        let body = || warp::body::content_length_limit(3 << 20).and(warp::body::bytes());
        let validate = warp::path!("validate-videojob")
            .and(body())
            .then(move |b: Bytes| {
                let webhook = api_server.clone();
                async move { json(webhook.review(b, true).await) }
            });
        let leader = warp::path!("leader" / "validate-videojob")
            .and(body())
            .then(move |b: Bytes| {
                let webhook = standby.clone();
                async move { json(webhook.review(b, false).await) }
            });
        warp::post().and(validate.or(leader).unify())
    }

    /// Answers one AdmissionReview body. `may_forward`: a standby hands the depth decision
    /// to the leader (a review that came from a standby is never handed on again).
    pub async fn review(&self, body: Bytes, may_forward: bool) -> Vec<u8> {
        let started = Instant::now();
        let out = self.answer(body, may_forward).await;
        self.metrics
            .webhook_duration
            .observe(started.elapsed().as_secs_f64());
        out
    }

    async fn answer(&self, body: Bytes, may_forward: bool) -> Vec<u8> {
        use futures::FutureExt;
        let models = matches!(self.models.wait_until_ready().now_or_never(), Some(Ok(())))
            .then(|| self.models.state());
        let (request, job) = match check(&body, models.as_deref()) {
            Ok((request, Some(job))) => (request, job),
            Ok((request, None)) => return review::respond(&request.uid, None),
            Err((uid, denial)) => {
                let reason = match denial.code {
                    422 => "invalid_parameters",
                    503 => "unavailable",
                    _ => "bad_request",
                };
                return self.decided(&uid, "", Some(&denial), reason);
            }
        };
        if let Some(ctx) = self.leader.get() {
            let (lane, denial) = hold_slot(ctx, &request, &job);
            let reason = match &denial {
                None => "",
                Some(d) if d.code == 503 && d.message.starts_with("queue_overloaded") => {
                    "queue_overloaded"
                }
                Some(_) => "unavailable",
            };
            return self.decided(&request.uid, &lane, denial.as_ref(), reason);
        }
        let forwarded = match may_forward {
            true => self.forward(body).await,
            false => Err("this replica is not the leader".into()),
        };
        forwarded.unwrap_or_else(|e| {
            let denial = Denial::unavailable(format!(
                "framelane could not reach its leader replica to count the lane's queue ({e}); retry in a few seconds"
            ));
            self.decided(&request.uid, "", Some(&denial), "unavailable")
        })
    }

    fn decided(&self, uid: &str, lane: &str, denial: Option<&Denial>, reason: &str) -> Vec<u8> {
        let labels = AdmissionLabels {
            lane: lane.into(),
            result: if denial.is_none() {
                "allowed"
            } else {
                "denied"
            }
            .into(),
            reason: reason.into(),
        };
        self.metrics
            .admission_decisions
            .get_or_create(&labels)
            .inc();
        review::respond(uid, denial)
    }

    async fn forward(&self, body: Bytes) -> Result<Vec<u8>, String> {
        let forwarder = self
            .forwarder
            .read()
            .expect("forwarder lock")
            .clone()
            .ok_or("no CA loaded yet")?;
        let known = self.elector.leader_endpoint();
        let answer = match &known {
            Some(endpoint) => forwarder.post(endpoint, LEADER_PATH, body.clone()).await,
            None => Err("no leader is known yet".into()),
        };
        // No leader known, or the one known stopped answering (a failover): read the Lease
        // again and try the leader it names.
        let (endpoint, answer) = match answer {
            Ok(answer) => (known.unwrap_or_default(), answer),
            Err(first) => {
                let endpoint = self
                    .elector
                    .refresh_leader_endpoint()
                    .await
                    .map_err(|e| format!("{first}; reading the leader Lease: {e}"))?
                    .filter(|e| Some(e) != known.as_ref())
                    .ok_or(first)?;
                let answer = forwarder.post(&endpoint, LEADER_PATH, body).await?;
                (endpoint, answer)
            }
        };
        match serde_json::from_slice::<serde_json::Value>(&answer) {
            Ok(v)
                if v.pointer("/response/allowed")
                    .is_some_and(|a| a.is_boolean()) =>
            {
                Ok(answer.to_vec())
            }
            _ => Err(format!("the leader at {endpoint} gave no AdmissionReview")),
        }
    }

    /// Reads the webhook Secret `name` in `namespace` (with the operator's own certificates:
    /// creating or filling it when no replica has yet) and keeps the served certificate and
    /// the CA used to reach the leader current as it changes. Runs on every replica, for the
    /// life of the process.
    pub async fn follow_certificates(
        self: Arc<Self>,
        client: Client,
        namespace: String,
        name: String,
    ) {
        let secrets: Api<Secret> = Api::namespaced(client, &namespace);
        let qualified = format!("{namespace}/{name}");
        if self.source == CertificateSource::Operator {
            while let Err(e) = ensure_secret(&secrets, &name, &self.policy).await {
                tracing::warn!(secret = qualified, error = %e, "cannot create or fill the webhook Secret; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = std::pin::pin!(watcher(secrets, config).default_backoff());
        // Whether the latest (re)list found the Secret.
        let mut found = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => {
                    found = true;
                    if let Err(e) = self.load(&secret) {
                        tracing::error!(
                            secret = qualified,
                            error = %e,
                            "the webhook Secret {qualified} is unusable: {e}; {}{}",
                            self.consequence(),
                            self.hint()
                        );
                    }
                }
                Ok(watcher::Event::Init) => found = false,
                Ok(watcher::Event::InitDone) if !found => tracing::error!(
                    secret = qualified,
                    "the webhook Secret {qualified} does not exist; {}{}",
                    self.consequence(),
                    self.hint()
                ),
                Ok(watcher::Event::Delete(_)) => tracing::warn!(
                    secret = qualified,
                    "the webhook Secret {qualified} was deleted; {}{}",
                    self.consequence(),
                    self.hint()
                ),
                Ok(watcher::Event::InitDone) => {}
                Err(e) => tracing::warn!(error = %e, "watching the webhook Secret failed"),
            }
        }
    }

    /// What a Secret that cannot be used means for this replica now.
    fn consequence(&self) -> &'static str {
        match self.certs.is_loaded() {
            true => "still serving the certificate loaded before",
            false => "the webhook is not ready until it has ca.crt, tls.crt and tls.key",
        }
    }

    fn hint(&self) -> &'static str {
        match self.source {
            CertificateSource::External => {
                " (with --webhook-certificates external, cert-manager's Certificate writes them)"
            }
            CertificateSource::Operator => "",
        }
    }

    fn load(&self, secret: &Secret) -> Result<(), String> {
        let empty = BTreeMap::new();
        let material = Serving::from_data(secret.data.as_ref().unwrap_or(&empty))
            .map_err(|missing| format!("it lacks {}", missing.join(", ")))?;
        let serving = material.serving().map_err(|e| e.to_string())?;
        let ca = material.ca().map_err(|e| e.to_string())?;
        let stale = self
            .forwarder
            .read()
            .expect("forwarder lock")
            .as_ref()
            .is_none_or(|f| f.ca_bundle != material.ca_bundle);
        let forwarder = match stale {
            true => Some(Forwarder::new(
                &material.ca_bundle,
                self.policy.server_name(),
            )?),
            false => None,
        };
        self.certs.load(&material)?;
        if let Some(forwarder) = forwarder {
            *self.forwarder.write().expect("forwarder lock") = Some(Arc::new(forwarder));
        }
        for (which, not_after) in [("serving", serving.not_after), ("ca", ca.not_after)] {
            self.metrics
                .certificate_expiry
                .get_or_create(&crate::metrics::CertificateLabels {
                    certificate: which.into(),
                })
                .set(not_after);
        }
        tracing::info!(
            serial = serving.serial,
            not_after = serving.not_after,
            ca = ca.subject,
            "loaded the webhook certificate"
        );
        Ok(())
    }
}

fn json(body: Vec<u8>) -> warp::http::Response<Vec<u8>> {
    warp::http::Response::builder()
        .header("content-type", "application/json")
        .body(body)
        .expect("a static header is valid")
}

/// Everything the webhook decides without the queue: reads the review and checks the job's
/// parameters against `models` (`None` while the model cache is still being read). The job
/// is `None` for an operation other than a create: nothing to check.
pub fn check(
    body: &[u8],
    models: Option<&[Arc<VideoModel>]>,
) -> Result<(Request, Option<VideoJob>), (String, Denial)> {
    let request = review::parse(body).map_err(|(uid, m)| (uid, Denial::bad_request(m)))?;
    if request.operation != "CREATE" {
        return Ok((request, None));
    }
    let Some(models) = models else {
        return Err((request.uid, Denial::unavailable(STARTING)));
    };
    match params::check(&request, models) {
        Ok(job) => Ok((request, Some(job))),
        Err(denial) => Err((request.uid, denial)),
    }
}

/// The leader's depth decision: takes a slot of the job's lane, or refuses with
/// `queue_overloaded`. Returns the lane it counted against.
fn hold_slot(ctx: &Context, request: &Request, job: &VideoJob) -> (String, Option<Denial>) {
    if !ctx.synced() {
        return (String::new(), Some(Denial::unavailable(STARTING)));
    }
    let lanes = ctx.lanes.state();
    let Some(lane) = route(&job.spec.model, &lanes) else {
        // No lane of this operator serves the model: the controller fails the job with the
        // reason, or another operator's lanes serve it.
        return (String::new(), None);
    };
    let name = lane.name_any();
    if ctx
        .config
        .watch_namespace
        .as_ref()
        .is_some_and(|ns| ns != &request.namespace)
    {
        return (name, None);
    }
    let (max_depth, max_wait) = ctx.lane_limits(lane);
    let key = JobKey {
        namespace: request.namespace.clone(),
        name: request.name.clone(),
    };
    let lane_of = |model: &str| route(model, &lanes).map(|l| l.name_any());
    let now = Instant::now();
    let held = {
        let mut index = ctx.index.lock().expect("index lock");
        if !index.synced {
            return (name, Some(Denial::unavailable(STARTING)));
        }
        index.hold(
            key,
            &name,
            max_depth,
            lane_of,
            (now, now + HOLD),
            request.dry_run,
        )
    };
    match held {
        Ok(()) => (name, None),
        Err(depth) => {
            let denial = Denial {
                message: format!(
                    "queue_overloaded: lane {name} holds {depth} unfinished jobs and its maxDepth is {max_depth}; \
                     a queued job waits at most maxWaitSeconds {} for a runner. Retry when a job of this lane finishes",
                    max_wait.as_secs()
                ),
                name: request.name.clone(),
                ..Denial::unavailable("")
            };
            (name, Some(denial))
        }
    }
}

/// Makes sure the Secret holds a CA and serving certificate: creates it when missing, and
/// fills it when it exists without usable material (the Helm chart creates it empty, so that
/// `helm uninstall` removes it). Its type and any other keys stay as they are.
async fn ensure_secret(
    secrets: &Api<Secret>,
    name: &str,
    policy: &Policy,
) -> Result<(), kube::Error> {
    let generate = || {
        Material::generate(policy, jiff::Timestamp::now().as_second())
            .expect("generating a key pair and certificate")
    };
    loop {
        let Some(mut secret) = secrets.get_opt(name).await? else {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(generate().to_data()),
                ..Default::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(secret = name, "created the webhook CA and certificate");
                    return Ok(());
                }
                // Created meanwhile, by another replica or the chart: read what it holds.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e),
            }
        };
        let data = secret.data.get_or_insert_with(Default::default);
        if Material::from_data(data).is_some() {
            return Ok(());
        }
        data.extend(generate().to_data());
        // The read's resourceVersion is the precondition: one replica fills the Secret.
        match secrets.replace(name, &PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(
                    secret = name,
                    "filled the webhook Secret with a new CA and certificate"
                );
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The leader's duty: keeps `caBundle` of the webhook configuration equal to the Secret's
/// CA bundle and rotates certificates when due. Runs until the process ends.
pub async fn maintain_certificates(
    secrets: Api<Secret>,
    configurations: Api<ValidatingWebhookConfiguration>,
    secret: String,
    configuration: String,
    policy: Policy,
) {
    let tick = (policy.cert_validity / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        if let Err(e) =
            maintain_once(&secrets, &configurations, &secret, &configuration, &policy).await
        {
            tracing::warn!(error = %e, "maintaining the webhook certificates failed; retrying");
        }
        tokio::time::sleep(tick).await;
    }
}

async fn maintain_once(
    secrets: &Api<Secret>,
    configurations: &Api<ValidatingWebhookConfiguration>,
    name: &str,
    configuration: &str,
    policy: &Policy,
) -> anyhow::Result<()> {
    let mut secret = secrets.get(name).await?;
    let material = secret
        .data
        .as_ref()
        .and_then(Material::from_data)
        .ok_or_else(|| anyhow::anyhow!("Secret {name} lacks ca.crt, ca.key, tls.crt or tls.key"))?;
    let published = publish_ca_bundle(configurations, configuration, &material.ca_bundle).await?;
    let Some((next, what)) =
        material.rotate(policy, jiff::Timestamp::now().as_second(), published)?
    else {
        return Ok(());
    };
    secret.data = Some(next.to_data());
    secrets
        .replace(name, &PostParams::default(), &secret)
        .await?;
    tracing::info!(secret = name, rotation = ?what, "rotated the webhook certificates");
    if what == Rotation::Ca {
        publish_ca_bundle(configurations, configuration, &next.ca_bundle).await?;
    }
    Ok(())
}

/// Sets every webhook's `caBundle` in the configuration to `bundle`. Returns whether it
/// already was (the API server trusts the bundle), also when the configuration does not
/// exist (then nothing calls the webhook yet).
async fn publish_ca_bundle(
    configurations: &Api<ValidatingWebhookConfiguration>,
    name: &str,
    bundle: &str,
) -> Result<bool, kube::Error> {
    let Some(mut configuration) = configurations.get_opt(name).await? else {
        return Ok(true);
    };
    let wanted = ByteString(bundle.as_bytes().to_vec());
    let webhooks = configuration.webhooks.get_or_insert_with(Vec::new);
    if webhooks
        .iter()
        .all(|w| w.client_config.ca_bundle.as_ref() == Some(&wanted))
    {
        return Ok(true);
    }
    for webhook in webhooks.iter_mut() {
        webhook.client_config.ca_bundle = Some(wanted.clone());
    }
    configurations
        .replace(name, &PostParams::default(), &configuration)
        .await?;
    tracing::info!(configuration = name, "published the webhook CA bundle");
    Ok(false)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    /// What a replica answers before the queue step, for any body.
    fn answer(body: &[u8]) -> Value {
        let models = params::tests::models();
        let out = match check(body, Some(&models)) {
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
