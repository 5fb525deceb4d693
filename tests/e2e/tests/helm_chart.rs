//! The Helm chart (charts/framelane), as a cluster admin meets it, on the local control plane:
//! - `helm lint --strict` is clean and `helm template` renders manifests that kubeconform
//!   validates strictly against this Kubernetes version's own schemas (from the API server),
//!   for the default values and every option; wrong values are refused naming the key;
//!   values.schema.json and the chart's CRDs are what the generators write;
//! - `helm install` creates everything; the operator and the runners then run as processes
//!   here (kwok pods run no containers), each authenticated with a token of the chart's own
//!   ServiceAccount bound to the pod it plays, configured from the pod's own spec: so the
//!   chart's RBAC is exactly what they run with, and jobs are admitted, run and completed
//!   under it; `kubectl auth can-i` shows each account's allowed and forbidden verbs, and a
//!   runner cannot write another runner's heartbeat Lease;
//! - `helm upgrade` changes a lane's replicas and the lane follows; `helm rollback` restores
//!   it; jobs in flight all finish; operator-made certificates survive both;
//! - `helm uninstall` leaves nothing behind but the CRDs and the kept volume claims.

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{CommandFactory, Parser};
use framelane_api::{ModelLane, VideoJob};
use framelane_e2e::until_succeeded;
use framelane_operator::config::Config;
use framelane_testenv::{
    TestEnv, TestNamespace, eventually, expect_refused, repo_root, run_tool, tiny_models,
    torch_python, workspace_binary,
};
use k8s_openapi::api::{
    admissionregistration::v1::ValidatingWebhookConfiguration,
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{EnvVar, PersistentVolume, PersistentVolumeClaim, Pod, Secret},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    config::{AuthInfo, KubeConfigOptions, Kubeconfig, NamedAuthInfo},
};
use serde_json::{Value, json};

fn chart() -> PathBuf {
    repo_root().join("charts/framelane")
}

/// Runs a tool that should fail, and returns what it printed.
fn run_failing(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    ensure!(!out.status.success(), "{cmd:?} should have failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn helm(env: &TestEnv) -> Command {
    let mut cmd = Command::new(env.bin_dir.join("helm"));
    cmd.env("KUBECONFIG", &env.kubeconfig);
    cmd
}

/// `helm template` of the chart as release `fl` in framelane-system, with `--set` arguments.
fn template(env: &TestEnv, version: &str, set_args: &[String]) -> Result<String> {
    run_tool(
        helm(env)
            .args([
                "template",
                "fl",
                "-n",
                "framelane-system",
                "--kube-version",
                version,
            ])
            .arg(chart())
            .args(set_args),
    )
}

/// The documents of a multi-document YAML stream, as JSON values.
fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} rendered"))
}

/// The Kubernetes version of the local control plane, for `helm template --kube-version`.
async fn kube_version(client: &Client) -> Result<String> {
    Ok(client
        .apiserver_version()
        .await?
        .git_version
        .trim_start_matches('v')
        .to_string())
}

/// Strict JSON schemas of every kind this API server serves (CRDs included), written by
/// tests/chart/jsonschemas.py from its OpenAPI document.
fn schemas(env: &TestEnv, dir: &Path) -> Result<()> {
    let openapi = run_tool(env.kubectl().args(["get", "--raw", "/openapi/v2"]))?;
    let mut child = Command::new("python3")
        .arg(repo_root().join("tests/chart/jsonschemas.py"))
        .arg(dir)
        .stdin(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().expect("piped"), openapi.as_bytes())?;
    ensure!(child.wait()?.success(), "jsonschemas.py failed");
    Ok(())
}

/// Kinds whose CRDs (Prometheus Operator, cert-manager) the local control plane does not
/// have, so kubeconform has no schema for them; their rendering is checked by hand below.
const UNVALIDATED_KINDS: &str = "ServiceMonitor,PodMonitor,PrometheusRule,Certificate,Issuer";

#[tokio::test]
async fn the_chart_lints_and_renders_valid_manifests_for_every_option() -> Result<()> {
    let env = TestEnv::get()?;
    let client = env.client().await?;
    let version = kube_version(&client).await?;
    let dir = tempfile::tempdir()?;
    schemas(env, dir.path())?;
    let location = format!(
        "{}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        dir.path().display()
    );

    let options: &[&[&str]] = &[
        &[],
        &["webhook.certificates.source=cert-manager"],
        &[
            "webhook.certificates.source=cert-manager",
            "webhook.certificates.certManager.issuerRef.name=corp-ca",
            "webhook.certificates.certManager.issuerRef.kind=ClusterIssuer",
        ],
        &["operator.watchNamespace=team-a"],
        &[
            "runner.image.pullPolicy=Always",
            "runner.imagePullSecrets[0].name=regcred",
            "runner.imagePullSecrets[1].name=mirror",
        ],
        &["webhook.enabled=false"],
        &["webhook.url=https://10.0.0.5:9443"],
        &[
            "webhook.clientCA.configMap=apiserver-webhook-client-ca",
            "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/28",
        ],
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
            "metrics.dashboard.enabled=true",
        ],
        &[
            "volumes.models.existingClaim=team-models",
            "volumes.outputs.create=false",
            "volumes.outputs.existingClaim=team-outputs",
            "networkPolicy.enabled=false",
            "operator.replicas=1",
            "runner.admissionPolicies=false",
            "operator.image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ],
    ];
    for sets in options {
        let set_args: Vec<String> = sets.iter().map(|s| format!("--set={s}")).collect();
        run_tool(
            helm(env)
                .args(["lint", "--strict", "--kube-version", &version])
                .arg(chart())
                .args(&set_args),
        )?;
        let rendered = template(env, &version, &set_args)?;
        let mut kubeconform = Command::new(env.bin_dir.join("kubeconform"))
            .args([
                "-strict",
                "-summary",
                "-skip",
                UNVALIDATED_KINDS,
                "-schema-location",
                &location,
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(
            &mut kubeconform.stdin.take().expect("piped"),
            rendered.as_bytes(),
        )?;
        let out = kubeconform.wait_with_output()?;
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && report.contains("Invalid: 0, Errors: 0"),
            "kubeconform with {sets:?}:\n{report}"
        );
        let docs = documents(&rendered)?;
        for doc in &docs {
            let skipped = UNVALIDATED_KINDS.split(',').any(|k| doc["kind"] == k);
            ensure!(
                !skipped || doc["metadata"]["namespace"] == "framelane-system",
                "{doc}"
            );
        }
        match *sets {
            ["webhook.certificates.source=cert-manager"] => {
                let certificate = find(&docs, "Certificate", "fl-framelane-webhook")?;
                ensure!(certificate["spec"]["secretName"] == "fl-framelane-webhook-tls");
                ensure!(
                    certificate["spec"]["dnsNames"][0]
                        == "fl-framelane-webhook.framelane-system.svc"
                );
                let issuer = &certificate["spec"]["issuerRef"]["name"];
                ensure!(issuer == "fl-framelane-webhook-ca", "{issuer}");
                let ca = find(&docs, "Certificate", "fl-framelane-webhook-ca")?;
                ensure!(
                    ca["spec"]["isCA"] == true
                        && ca["spec"]["issuerRef"]["name"] == "fl-framelane-selfsigned"
                );
                ensure!(
                    find(&docs, "Issuer", "fl-framelane-webhook-ca")?["spec"]["ca"]["secretName"]
                        == "fl-framelane-webhook-ca"
                );
                let vwc = find(&docs, "ValidatingWebhookConfiguration", "fl-framelane")?;
                ensure!(
                    vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
                        == "framelane-system/fl-framelane-webhook"
                );
                let args = find(&docs, "Deployment", "fl-framelane-operator")?["spec"]["template"]
                    ["spec"]["containers"][0]["args"]
                    .to_string();
                ensure!(args.contains("--webhook-certificates=external"), "{args}");
                ensure!(
                    !docs.iter().any(|d| d["kind"] == "Secret"),
                    "cert-manager makes the Secret"
                );
            }
            ["operator.watchNamespace=team-a"] => {
                for name in ["fl-framelane-operator-jobs", "fl-framelane-runner-jobs"] {
                    let binding = find(&docs, "RoleBinding", name)?;
                    ensure!(binding["metadata"]["namespace"] == "team-a", "{binding}");
                }
                let vwc = find(&docs, "ValidatingWebhookConfiguration", "fl-framelane")?;
                ensure!(
                    vwc["webhooks"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                        == "team-a"
                );
            }
            ["runner.image.pullPolicy=Always", ..] => {
                let env =
                    find(&docs, "Deployment", "fl-framelane-operator")?["spec"]["template"]["spec"]
                        ["containers"][0]["env"]
                        .to_string();
                ensure!(
                    env.contains(
                        r#"{"name":"FRAMELANE_RUNNER_IMAGE_PULL_POLICY","value":"Always"}"#
                    ) && env.contains(
                        r#"{"name":"FRAMELANE_RUNNER_IMAGE_PULL_SECRETS","value":"regcred,mirror"}"#
                    ),
                    "{env}"
                );
            }
            ["webhook.enabled=false"] => {
                ensure!(!docs.iter().any(|d| {
                    d["kind"] == "ValidatingWebhookConfiguration"
                        || d["kind"] == "MutatingWebhookConfiguration"
                }));
                let args = find(&docs, "Deployment", "fl-framelane-operator")?["spec"]["template"]
                    ["spec"]["containers"][0]["args"]
                    .to_string();
                ensure!(!args.contains("--webhook-addr"), "{args}");
            }
            ["webhook.clientCA.configMap=apiserver-webhook-client-ca", _] => {
                // The operator reads the API server's client CA from the ConfigMap.
                let pod = &find(&docs, "Deployment", "fl-framelane-operator")?["spec"]["template"]
                    ["spec"];
                let args = pod["containers"][0]["args"].to_string();
                ensure!(
                    args.contains("--webhook-client-ca=/etc/framelane/webhook-client-ca/ca.crt"),
                    "{args}"
                );
                ensure!(
                    pod["volumes"][0]["configMap"]["name"] == "apiserver-webhook-client-ca"
                        && pod["containers"][0]["volumeMounts"][0]["mountPath"]
                            == "/etc/framelane/webhook-client-ca",
                    "{pod}"
                );
                // Only the other replicas and the API server's addresses reach the webhook.
                let policy = find(&docs, "NetworkPolicy", "fl-framelane-operator")?;
                let from = &policy["spec"]["ingress"][0]["from"];
                ensure!(
                    from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "fl"
                        && from[1]["ipBlock"]["cidr"] == "10.0.0.0/28"
                        && from.as_array().map(Vec::len) == Some(2),
                    "{policy}"
                );
            }
            ["webhook.url=https://10.0.0.5:9443"] => {
                for kind in [
                    "ValidatingWebhookConfiguration",
                    "MutatingWebhookConfiguration",
                ] {
                    let url =
                        &find(&docs, kind, "fl-framelane")?["webhooks"][0]["clientConfig"]["url"];
                    ensure!(
                        url.as_str()
                            .is_some_and(|u| u.starts_with("https://10.0.0.5:9443/")),
                        "{kind}: {url}"
                    );
                }
            }
            _ => {}
        }
    }

    // The defaults, as a cluster admin would review them.
    let rendered = template(env, &version, &[])?;
    let docs = documents(&rendered)?;
    let deployment = find(&docs, "Deployment", "fl-framelane-operator")?;
    let pod = &deployment["spec"]["template"]["spec"];
    ensure!(deployment["spec"]["replicas"] == 2);
    ensure!(pod["serviceAccountName"] == "fl-framelane-operator");
    ensure!(pod["securityContext"]["runAsNonRoot"] == true);
    ensure!(pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault");
    let container = &pod["containers"][0];
    ensure!(container["securityContext"]["readOnlyRootFilesystem"] == true);
    ensure!(container["securityContext"]["allowPrivilegeEscalation"] == false);
    ensure!(container["securityContext"]["capabilities"]["drop"] == json!(["ALL"]));
    ensure!(pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname");
    ensure!(
        find(&docs, "PodDisruptionBudget", "fl-framelane-operator")?["spec"]["minAvailable"] == 1
    );
    let webhook = &find(&docs, "ValidatingWebhookConfiguration", "fl-framelane")?["webhooks"][0];
    let defaults = &find(&docs, "MutatingWebhookConfiguration", "fl-framelane")?["webhooks"][0];
    ensure!(defaults["clientConfig"]["service"]["path"] == "/mutate-videojob");
    ensure!(
        defaults["rules"] == webhook["rules"]
            && defaults["namespaceSelector"] == webhook["namespaceSelector"]
    );
    ensure!(webhook["clientConfig"]["service"]["path"] == "/validate-videojob");
    ensure!(webhook["failurePolicy"] == "Fail" && webhook["sideEffects"] == "None");
    ensure!(webhook["timeoutSeconds"].as_i64().is_some_and(|t| t <= 10));
    ensure!(
        webhook["clientConfig"]["caBundle"].is_null(),
        "the operator sets caBundle, not helm"
    );
    ensure!(
        webhook["namespaceSelector"]
            .to_string()
            .contains("kube-system")
    );
    for (kind, name) in [
        ("VideoModel", "anisora"),
        ("VideoModel", "phr00t"),
        ("ModelLane", "anisora"),
        ("ModelLane", "phr00t"),
        ("ModelLane", "shared"),
        ("NetworkPolicy", "fl-framelane-operator"),
        ("NetworkPolicy", "fl-framelane-runner"),
        ("ValidatingAdmissionPolicy", "fl-framelane-runner-jobs"),
        ("ValidatingAdmissionPolicy", "fl-framelane-runner-own-lease"),
        ("Lease", "fl-framelane-operator"),
        ("Secret", "fl-framelane-webhook-tls"),
    ] {
        find(&docs, kind, name)?;
    }
    ensure!(find(&docs, "VideoModel", "anisora")?["spec"]["fixedParameters"]["steps"] == 8);
    let phr00t = &find(&docs, "VideoModel", "phr00t")?["spec"]["fixedParameters"];
    ensure!(
        phr00t["steps"] == 4 && phr00t["cfg"].as_f64() == Some(1.0),
        "{phr00t}"
    );
    ensure!(find(&docs, "ModelLane", "shared")?["spec"]["mode"] == "Shared");

    // Wrong values are refused before anything is applied, naming the key.
    for (set, expect) in [
        ("operator.replica=3", "'replica' not allowed"),
        ("lanes[0].spec.mode=Turbo", "/lanes/0/spec/mode"),
        (
            "webhook.certificates.source=vault",
            "/webhook/certificates/source",
        ),
        (
            "models[0].spec.fixedParameters.steps=zero",
            "/models/0/spec/fixedParameters/steps",
        ),
        (
            "lanes[0].name=a-lane-name-longer-than-a-label-value-may-be-which-is-63-characters",
            "/lanes/0/name",
        ),
        (
            "webhook.certificates.certManager.issuerRef.kind=ClusterIssuer",
            "/webhook/certificates/certManager/issuerRef",
        ),
    ] {
        let out = run_failing(
            helm(env)
                .args(["template", "fl"])
                .arg(chart())
                .arg(format!("--set={set}")),
        )?;
        ensure!(out.contains(expect), "{set}: {out}");
    }

    // The chart README documents every value.
    let readme = std::fs::read_to_string(chart().join("README.md"))?;
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml"))?)?;
    for path in value_paths(&values, "") {
        let documented = readme.contains(&format!("`{path}`"))
            || path
                .match_indices('.')
                .any(|(i, _)| readme.contains(&format!("`{}.*`", &path[..i])));
        ensure!(
            documented,
            "charts/framelane/README.md does not document `{path}`"
        );
    }

    // Generated files are current.
    let schema = dir.path().join("values.schema.json");
    run_tool(
        Command::new(torch_python())
            .arg(repo_root().join("tests/chart/values_schema.py"))
            .arg(&schema),
    )?;
    ensure!(
        std::fs::read(&schema)? == std::fs::read(chart().join("values.schema.json"))?,
        "charts/framelane/values.schema.json is stale: run `just crds`"
    );
    for crd in std::fs::read_dir(repo_root().join("crds"))? {
        let crd = crd?.path();
        let copy = chart().join("crds").join(crd.file_name().expect("a file"));
        ensure!(
            std::fs::read(&crd)? == std::fs::read(&copy).unwrap_or_default(),
            "{} differs from {}: run `just crds`",
            copy.display(),
            crd.display()
        );
    }
    Ok(())
}

/// The dotted paths of a values tree's settings: its leaves, and the maps that are one
/// setting (a Kubernetes object such as resources or a security context, or labels).
fn value_paths(values: &Value, prefix: &str) -> Vec<String> {
    const WHOLE: &[&str] = &[
        "resources",
        "podSecurityContext",
        "securityContext",
        "labels",
    ];
    match values.as_object() {
        Some(map) if !map.is_empty() && !WHOLE.iter().any(|w| prefix.ends_with(w)) => map
            .iter()
            .flat_map(|(key, value)| {
                let path = match prefix {
                    "" => key.clone(),
                    _ => format!("{prefix}.{key}"),
                };
                value_paths(value, &path)
            })
            .collect(),
        _ => vec![prefix.to_string()],
    }
}

/// A kubeconfig for this control plane that authenticates with `token` only.
fn token_kubeconfig(env: &TestEnv, token: &str, path: &Path) -> Result<()> {
    let mut config = Kubeconfig::read_from(&env.kubeconfig)?;
    let user = config
        .contexts
        .first()
        .and_then(|c| c.context.as_ref())
        .context("the admin kubeconfig has a context")?
        .user
        .clone()
        .context("the admin context names a user")?;
    config.auth_infos = vec![NamedAuthInfo {
        name: user,
        auth_info: Some(AuthInfo {
            token: Some(token.to_string().into()),
            ..Default::default()
        }),
        other: Default::default(),
    }];
    std::fs::write(path, serde_yaml::to_string(&config)?)?;
    Ok(())
}

/// A token of `account` bound to `pod`, as the pod itself would get one.
fn pod_token(ns: &TestNamespace, account: &str, pod: &str) -> Result<String> {
    Ok(run_tool(ns.kubectl().args([
        "create",
        "token",
        account,
        "--bound-object-kind=Pod",
        &format!("--bound-object-name={pod}"),
        "--duration=2h",
    ]))?
    .trim()
    .to_string())
}

/// The value of a container environment variable as the kubelet would set it.
fn env_value(var: &EnvVar, pod: &Pod) -> Option<String> {
    if let Some(value) = &var.value {
        return Some(value.clone());
    }
    let field = &var.value_from.as_ref()?.field_ref.as_ref()?.field_path;
    let meta = &pod.metadata;
    match field.as_str() {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        // This process listens on loopback.
        "status.podIP" => Some("127.0.0.1".into()),
        _ => None,
    }
}

/// The operator of a pod of the chart's Deployment, run in this process on its own runtime
/// (stopping it stops every task it started), with the Deployment's arguments and
/// environment (turned into the flags they set) and a token of the chart's operator account.
struct Operator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Operator {
    fn start(pod: &Pod, kubeconfig: &Path, webhook_addr: &str) -> Result<Operator> {
        let container = &pod.spec.as_ref().context("pod spec")?.containers[0];
        let command = Config::command();
        let overridden = ["--metrics-addr", "--webhook-addr"];
        let mut args = vec!["framelane-operator".to_string()];
        for arg in container.args.iter().flatten() {
            if !overridden.iter().any(|o| arg.starts_with(o)) {
                args.push(arg.clone());
            }
        }
        for var in container.env.iter().flatten() {
            let Some(value) = env_value(var, pod) else {
                continue;
            };
            let flag = command
                .get_arguments()
                .find(|a| a.get_env() == Some(OsStr::new(&var.name)))
                .and_then(|a| a.get_long());
            match flag {
                // A flag in the arguments wins over the environment, as in the pod.
                Some(long) if args.iter().any(|a| a.starts_with(&format!("--{long}="))) => {}
                Some(long) if var.name != "POD_IP" => args.push(format!("--{long}={value}")),
                // RUST_LOG configures logging; POD_IP: this process is reached at the
                // webhook address below.
                _ => ensure!(
                    ["RUST_LOG", "POD_IP"].contains(&var.name.as_str()),
                    "unknown env {}",
                    var.name
                ),
            }
        }
        args.extend([
            "--metrics-addr=127.0.0.1:0".into(),
            format!("--webhook-addr={webhook_addr}"),
            format!("--kubeconfig={}", kubeconfig.display()),
        ]);
        let config = Config::try_parse_from(&args).with_context(|| format!("{args:?}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut stopped = stopped;
            // As the pod's container would be: started afresh whenever it exits with an
            // error (a replica that lost leadership comes back as a standby).
            loop {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                let failed = runtime.block_on(async {
                    tokio::select! {
                        result = framelane_operator::run::run(config.clone()) => result.err(),
                        _ = &mut stopped => None,
                    }
                });
                runtime.shutdown_background();
                let Some(e) = failed else { break };
                eprintln!("operator: {e:#}; restarting");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
        Ok(Operator {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One chart install in its own namespace, with the objects the test made around it.
struct Release {
    env: &'static TestEnv,
    ns: TestNamespace,
    name: String,
    /// `<release>-framelane`, the prefix of the chart's object names.
    full: String,
    dir: tempfile::TempDir,
    webhook_port: u16,
    /// `operator.watchNamespace`: where the jobs are, when not in every namespace.
    watched: Option<TestNamespace>,
}

impl Release {
    /// The release `ns` will be (named like it), with the PersistentVolumes its claims bind to.
    async fn new(ns: TestNamespace, watched: Option<TestNamespace>) -> Result<Release> {
        let webhook_port = framelane_testenv::free_port()?;
        let release = Release {
            env: ns.env,
            name: ns.name.clone(),
            full: format!("{}-framelane", ns.name),
            dir: tempfile::tempdir()?,
            webhook_port,
            ns,
            watched,
        };
        for (which, mode) in [("models", "ReadOnlyMany"), ("outputs", "ReadWriteMany")] {
            let pv: PersistentVolume = serde_json::from_value(json!({
                "metadata": {"name": format!("{}-{which}", release.ns.name)},
                "spec": {"capacity": {"storage": "300Gi"}, "accessModes": [mode], "storageClassName": "",
                    "hostPath": {"path": format!("/var/lib/framelane/{which}")},
                    "claimRef": {"namespace": release.ns.name, "name": format!("{}-{which}", release.full)}},
            }))?;
            release
                .volumes()
                .create(&PostParams::default(), &pv)
                .await?;
        }
        Ok(release)
    }

    fn volumes(&self) -> Api<PersistentVolume> {
        Api::all(self.ns.client.clone())
    }

    /// After the test: a failed test's release is uninstalled (its webhook would refuse jobs
    /// in the namespace), and the volumes go.
    async fn clean_up(&self, failed: bool) {
        if failed {
            let _ = self.helm("uninstall", &["--wait", "--timeout=60s"]);
        }
        for which in ["models", "outputs"] {
            let _ = self
                .volumes()
                .delete(
                    &format!("{}-{which}", self.ns.name),
                    &DeleteParams::default(),
                )
                .await;
        }
    }

    /// The operator, as the first pod of the chart's Deployment, with a token of the chart's
    /// operator account bound to it (written to the returned kubeconfig). Returns once the
    /// API server trusts its webhook: a job naming no model is refused.
    async fn operator(&self) -> Result<(Operator, PathBuf)> {
        let selector = format!(
            "app.kubernetes.io/name=framelane-operator,app.kubernetes.io/instance={}",
            self.name
        );
        let pods = self.pods(&selector).await?;
        let pod = pods.first().context("the chart's operator pod")?;
        let kubeconfig = self.dir.path().join("operator.kubeconfig");
        token_kubeconfig(
            self.env,
            &pod_token(
                &self.ns,
                &format!("{}-operator", self.full),
                pod.metadata.name.as_deref().expect("named"),
            )?,
            &kubeconfig,
        )?;
        let operator = Operator::start(
            pod,
            &kubeconfig,
            &format!("127.0.0.1:{}", self.webhook_port),
        )?;
        let jobs = self.jobs_namespace().api::<VideoJob>();
        eventually(60, "the chart's webhook to answer", || async {
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let job: VideoJob = serde_json::from_value(
                json!({"apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                "metadata": {"name": "probe"}, "spec": {"model": "no-such-model", "prompt": "p"}}),
            )?;
            let refused =
                matches!(jobs.create(&dry, &job).await, Err(kube::Error::Api(s)) if s.code == 422);
            Ok(refused.then_some(()))
        })
        .await?;
        Ok((operator, kubeconfig))
    }

    /// The namespace of the release's jobs.
    fn jobs_namespace(&self) -> &TestNamespace {
        self.watched.as_ref().unwrap_or(&self.ns)
    }

    fn model(&self, package: &str) -> String {
        format!("{}-{package}", self.ns.name)
    }

    /// The test's values: models and lanes named after the namespace (the cluster-scoped
    /// defaults may exist already), lanes that ask for CPU so their pods schedule next to
    /// anything holding the fake GPUs, the webhook reached at this process, and the chart's
    /// own claims bound to volumes made for them.
    fn values(&self, anisora_replicas: u32) -> Value {
        // Both text to video, on the tiny models of the runner's tests: a diffusers folder
        // and a ComfyUI AllInOne file.
        let model = |package: &str, fixed: Value| {
            let mut spec = json!({"fixedParameters": fixed,
                "defaults": {"width": 256, "height": 256, "frames": 17, "fps": 8},
                "limits": {"maxWidth": 512, "maxHeight": 512, "maxFrames": 33},
                "weights": {"format": "diffusers", "path": "wan-t2v"}, "modes": ["t2v"]});
            if package == "phr00t" {
                spec["weights"] = json!({"format": "comfyui", "file": "phr00t/phr00t-aio.safetensors",
                    "tokenizer": "phr00t/tokenizer"});
                spec["sampling"] =
                    json!({"solver": "euler_ancestral", "schedule": "beta", "shift": 8.0});
            }
            json!({"name": self.model(package), "spec": spec})
        };
        let runner = json!({"resources": {"requests": {"cpu": "100m"}}});
        // The operator of `just up` (its lane selector leaves these out) must not act on them.
        let labels = json!({"framelane.dev/test-instance": self.ns.name});
        json!({
            // Keeps the operator of `just up` away from the release's lanes (its selector
            // leaves the tests' out), so only the release's own operator runs them.
            "commonLabels": {"framelane.dev/test-instance": self.ns.name},
            "operator": {"laneSelector": format!("app.kubernetes.io/instance={}", self.name),
                "watchNamespace": self.watched.as_ref().map_or("", |w| w.name.as_str())},
            "webhook": {
                "url": format!("https://127.0.0.1:{}", self.webhook_port),
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.jobs_namespace().name}},
            },
            // Four tiny Wan jobs take a CPU runner more than the default 30 s; this test is
            // about jobs surviving an upgrade and a rollback, not about queue timeouts.
            "queueDefaults": {"maxDepth": 25, "maxWaitSeconds": 600},
            "volumes": {
                "models": {"storageClassName": "", "volumeName": format!("{}-models", self.ns.name)},
                "outputs": {"storageClassName": "", "volumeName": format!("{}-outputs", self.ns.name)},
            },
            "models": [model("anisora", json!({"steps": 8})), model("phr00t", json!({"steps": 4, "cfg": 1.0}))],
            "lanes": [
                {"name": self.model("anisora"), "labels": labels, "spec": {"mode": "Dedicated", "models": [self.model("anisora")],
                    "replicas": anisora_replicas, "fallback": {"lane": self.model("shared")}, "runner": runner}},
                {"name": self.model("phr00t"), "labels": labels, "spec": {"mode": "Dedicated", "models": [self.model("phr00t")],
                    "fallback": {"lane": self.model("shared")}, "runner": runner}},
                {"name": self.model("shared"), "labels": labels, "spec": {"mode": "Shared",
                    "models": [self.model("anisora"), self.model("phr00t")], "runner": runner}},
            ],
        })
    }

    /// `helm <verb> <release> ...` in the release namespace, waiting for the result.
    fn helm(&self, verb: &str, args: &[&str]) -> Result<String> {
        run_tool(
            helm(self.env)
                .args([verb, &self.name, "-n", &self.ns.name])
                .args(args),
        )
    }

    fn install_or_upgrade(&self, verb: &str, anisora_replicas: u32) -> Result<String> {
        let values = self.dir.path().join(format!("values-{verb}.yaml"));
        std::fs::write(
            &values,
            serde_yaml::to_string(&self.values(anisora_replicas))?,
        )?;
        let values = values.to_string_lossy().into_owned();
        let chart = chart().to_string_lossy().into_owned();
        self.helm(verb, &[&chart, "-f", &values, "--wait", "--timeout=180s"])
    }

    async fn pods(&self, selector: &str) -> Result<Vec<Pod>> {
        Ok(self
            .ns
            .api::<Pod>()
            .list(&ListParams::default().labels(selector))
            .await?
            .items)
    }

    async fn lane_pods(&self, package: &str) -> Result<Vec<Pod>> {
        self.pods(&format!("framelane.dev/lane={}", self.model(package)))
            .await
    }

    /// A runner process playing the lane's first pod: the pod's own environment, a token of
    /// the chart's runner account bound to the pod, the tiny models.
    async fn runner(&self, package: &str) -> Result<tokio::process::Child> {
        let pod = eventually(60, "the lane's runner pod", || async {
            Ok(self.lane_pods(package).await?.into_iter().find(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.ends_with("-0"))
            }))
        })
        .await?;
        let spec = pod.spec.as_ref().context("pod spec")?;
        let account = spec
            .service_account_name
            .clone()
            .context("runner pods name the chart's runner account")?;
        ensure!(account == format!("{}-runner", self.full), "{account}");
        let name = pod.metadata.name.clone().expect("named");
        let kubeconfig = self.dir.path().join(format!("{name}.kubeconfig"));
        token_kubeconfig(
            self.env,
            &pod_token(&self.ns, &account, &name)?,
            &kubeconfig,
        )?;
        let mut cmd = tokio::process::Command::new(workspace_binary("framelane-runner"));
        for var in spec.containers[0].env.iter().flatten() {
            if let Some(value) = env_value(var, &pod) {
                cmd.env(&var.name, value);
            }
        }
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        Ok(cmd
            .arg("--models-dir")
            .arg(tiny_models())
            .arg("--output-dir")
            .arg(self.dir.path())
            .args(["--metrics-addr", "127.0.0.1:0", "--kubeconfig"])
            .arg(&kubeconfig)
            .stdout(log)
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?)
    }

    async fn create_job(&self, name: &str, package: &str, extra: Value) -> Result<(), kube::Error> {
        let mut spec = json!({"model": self.model(package), "prompt": format!("{name} by the sea"), "seed": 7});
        spec.as_object_mut()
            .expect("an object")
            .extend(extra.as_object().cloned().unwrap_or_default());
        let job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": name}, "spec": spec,
        }))
        .expect("a VideoJob");
        self.jobs_namespace()
            .api::<VideoJob>()
            .create(&PostParams::default(), &job)
            .await
            .map(|_| ())
    }

    async fn wait_succeeded(&self, names: &[&str]) -> Result<()> {
        let jobs = self.jobs_namespace().api();
        until_succeeded(&jobs, names, 300, || Ok(())).await?;
        Ok(())
    }

    /// `kubectl auth can-i` as the account whose token `kubeconfig` holds.
    fn can_i(&self, kubeconfig: &Path, args: &str) -> Result<bool> {
        let out = self
            .env
            .kubectl()
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["auth", "can-i"])
            .args(args.split_whitespace())
            .output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(
            answer == "yes" || answer == "no",
            "can-i {args}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(answer == "yes")
    }
}

#[tokio::test]
async fn a_helm_install_runs_jobs_under_its_own_rbac_and_survives_upgrade_rollback_and_uninstall()
-> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("chart").await?;
    // The operator's pods and the runner pods it makes must pass the restricted standard.
    run_tool(env.kubectl().args([
        "label",
        "namespace",
        &ns.name,
        "pod-security.kubernetes.io/enforce=restricted",
    ]))?;
    let release = Release::new(ns, None).await?;
    let result = install_run_upgrade_uninstall(&release).await;
    release.clean_up(result.is_err()).await;
    result
}

#[tokio::test]
async fn a_helm_install_watching_one_namespace_runs_jobs_there() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("chart-watch").await?;
    let team = env.namespace("team").await?;
    let release = Release::new(ns, Some(team)).await?;
    let result = watch_one_namespace(&release).await;
    release.clean_up(result.is_err()).await;
    result
}

/// With operator.watchNamespace, the runner pods get that namespace and the chart grants
/// the runners VideoJobs there only: a job there is claimed and succeeds.
async fn watch_one_namespace(release: &Release) -> Result<()> {
    release.install_or_upgrade("install", 1)?;
    let team = release.jobs_namespace();
    let (mut operator, _) = release.operator().await?;
    let mut runner = release.runner("phr00t").await?;
    let pods = release.lane_pods("phr00t").await?;
    let env = pods
        .first()
        .and_then(|p| p.spec.as_ref())
        .map(|s| s.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default();
    ensure!(
        env.iter().any(|e| e.name == "FRAMELANE_WATCH_NAMESPACE"
            && e.value.as_deref() == Some(team.name.as_str())),
        "a runner pod tells its runner the watched namespace: {env:?}"
    );
    // Under load the runner may start after the lane's fallback grace: wait for the lane to
    // run its own jobs again, or the job would go to the fallback lane, which has no runner.
    let lanes: Api<ModelLane> = Api::all(release.ns.client.clone());
    let lane = release.model("phr00t");
    eventually(120, "the lane's runner to be ready", || async {
        let status = lanes.get(&lane).await?.status.unwrap_or_default();
        let own_jobs = !status.fallback.is_some_and(|f| f.active);
        Ok((status.ready_runners == 1 && own_jobs).then_some(()))
    })
    .await?;
    release
        .create_job("lighthouse", "phr00t", json!({}))
        .await?;
    release.wait_succeeded(&["lighthouse"]).await?;
    let job = team.api::<VideoJob>().get("lighthouse").await?;
    let status = job.status.context("a status")?;
    ensure!(
        status
            .runner
            .as_deref()
            .is_some_and(|r| r.starts_with(&release.model("phr00t"))),
        "{status:?}"
    );
    runner.kill().await?;
    operator.stop();
    release.helm("uninstall", &["--wait", "--timeout=180s"])?;
    Ok(())
}

async fn install_run_upgrade_uninstall(release: &Release) -> Result<()> {
    let (env, ns, full) = (release.env, &release.ns, &release.full);
    let admin = ns.client.clone();
    release.install_or_upgrade("install", 1)?;

    // The operator Deployment: two replicas, spread over the two nodes, a PDB that allows
    // one disruption.
    let operator_selector = format!(
        "app.kubernetes.io/name=framelane-operator,app.kubernetes.io/instance={}",
        release.name
    );
    let deployment = ns
        .api::<Deployment>()
        .get(&format!("{full}-operator"))
        .await?;
    ensure!(
        deployment.status.as_ref().and_then(|s| s.ready_replicas) == Some(2),
        "{:?}",
        deployment.status
    );
    let operator_pods = release.pods(&operator_selector).await?;
    let nodes: BTreeSet<_> = operator_pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    ensure!(
        nodes.len() == 2,
        "operator replicas share a node: {nodes:?}"
    );
    let pdbs = ns.api::<PodDisruptionBudget>();
    eventually(30, "the PDB to allow one disruption", || async {
        let pdb = pdbs.get(&format!("{full}-operator")).await?;
        let healthy = pdb
            .status
            .is_some_and(|s| s.current_healthy == Some(2) && s.disruptions_allowed == Some(1));
        Ok(healthy.then_some(()))
    })
    .await?;

    let (mut operator, operator_kubeconfig) = release.operator().await?;
    let secret = ns
        .api::<Secret>()
        .get(&format!("{full}-webhook-tls"))
        .await?;
    ensure!(
        secret
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key("tls.crt")),
        "the operator fills the chart's Secret"
    );
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    let ca_bundle = |c: ValidatingWebhookConfiguration| {
        c.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .clone()
    };
    let bundle = ca_bundle(configurations.get(full).await?);
    ensure!(bundle.is_some(), "the operator publishes caBundle");

    let mut runners = vec![
        release.runner("anisora").await?,
        release.runner("phr00t").await?,
    ];
    let lanes: Api<ModelLane> = Api::all(admin.clone());
    for package in ["anisora", "phr00t"] {
        let lane = release.model(package);
        eventually(120, "the lane's runner to be ready", || async {
            let lane = lanes.get(&lane).await?;
            Ok((lane.status.map(|s| s.ready_runners) == Some(1)).then_some(()))
        })
        .await?;
    }

    // Admit, run, complete under the chart's RBAC; refuse a wrong parameter.
    release.create_job("cat", "anisora", json!({})).await?;
    release
        .create_job("lighthouse", "phr00t", json!({}))
        .await?;
    match release
        .create_job("twenty-steps", "anisora", json!({"steps": 20}))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("spec.steps") => {}
        other => bail!("steps 20 should be refused with 422 naming spec.steps: {other:?}"),
    }
    release.wait_succeeded(&["cat", "lighthouse"]).await?;
    let cat = ns.api::<VideoJob>().get("cat").await?;
    let output = cat
        .status
        .and_then(|s| s.output)
        .context("cat has an output")?;
    ensure!(
        release.dir.path().join(&output.path).is_file(),
        "{output:?}"
    );

    // What each account may and may not do.
    let runner_pod = release.lane_pods("anisora").await?.remove(0);
    let runner_name = runner_pod.metadata.name.clone().expect("named");
    let runner_kubeconfig = release.dir.path().join(format!("{runner_name}.kubeconfig"));
    let n = &ns.name;
    for (allowed, check) in [
        (true, format!("create pods -n {n}")),
        (true, format!("delete pods -n {n}")),
        (true, format!("update secrets/{full}-webhook-tls -n {n}")),
        (true, format!("create secrets -n {n}")),
        (false, "create secrets -n default".into()),
        (
            true,
            format!("update validatingwebhookconfigurations/{full}"),
        ),
        (
            true,
            "patch modellanes.framelane.dev --subresource=status".into(),
        ),
        (true, "list videojobs.framelane.dev --all-namespaces".into()),
        (true, "patch videojobs.framelane.dev -n default".into()),
        (true, "create events.events.k8s.io -n default".into()),
        (false, "create pods -n default".into()),
        (true, format!("list resourcequotas -n {n}")),
        (false, "list resourcequotas -n default".into()),
        (false, format!("get secrets/other -n {n}")),
        (false, format!("list secrets -n {n}")),
        (false, "update validatingwebhookconfigurations/other".into()),
        (false, "create modellanes.framelane.dev".into()),
        (false, "update videomodels.framelane.dev".into()),
        (false, "create videojobs.framelane.dev -n default".into()),
    ] {
        ensure!(
            release.can_i(&operator_kubeconfig, &check)? == allowed,
            "operator: can-i {check} should be {allowed}"
        );
    }
    for (allowed, check) in [
        (true, format!("get videojobs.framelane.dev -n {n}")),
        (
            true,
            "watch videojobs.framelane.dev --all-namespaces".into(),
        ),
        (
            true,
            format!("update videojobs.framelane.dev --subresource=status -n {n}"),
        ),
        (true, "list videomodels.framelane.dev".into()),
        (true, format!("create leases.coordination.k8s.io -n {n}")),
        (true, format!("update leases.coordination.k8s.io -n {n}")),
        (true, format!("patch leases.coordination.k8s.io -n {n}")),
        (false, format!("update videojobs.framelane.dev -n {n}")),
        (false, format!("delete videojobs.framelane.dev -n {n}")),
        (false, format!("create videojobs.framelane.dev -n {n}")),
        (false, format!("create pods -n {n}")),
        (false, format!("list pods -n {n}")),
        (false, format!("get secrets -n {n}")),
        (false, "create leases.coordination.k8s.io -n default".into()),
        (
            false,
            "patch modellanes.framelane.dev --subresource=status".into(),
        ),
        (false, "update videomodels.framelane.dev".into()),
    ] {
        ensure!(
            release.can_i(&runner_kubeconfig, &check)? == allowed,
            "runner: can-i {check} should be {allowed}"
        );
    }
    // RBAC allows Lease writes; the chart's admission policy allows only the runner's own.
    let runner_client = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&runner_kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?,
    )?;
    let runner_leases: Api<Lease> = Api::namespaced(runner_client, n);
    ensure!(
        runner_leases.get(&runner_name).await?.spec.is_some(),
        "a runner reads its own Lease"
    );
    let other: Lease = serde_json::from_value(
        json!({"metadata": {"name": "someone-else"}, "spec": {"holderIdentity": "me"}}),
    )?;
    match runner_leases.create(&PostParams::default(), &other).await {
        Err(kube::Error::Api(s))
            if s.code == 403
                && s.message
                    .contains("only write the heartbeat Lease named after its own pod") => {}
        other => bail!("a runner wrote another Lease: {other:?}"),
    }

    // Jobs in flight through an upgrade (anisora gets a second runner pod) and a rollback.
    let in_flight = ["wave-1", "wave-2", "wave-3", "wave-4"];
    for name in in_flight {
        release.create_job(name, "anisora", json!({})).await?;
    }
    let revision_2 = release.install_or_upgrade("upgrade", 2)?;
    ensure!(revision_2.contains("REVISION: 2"), "{revision_2}");
    let anisora = release.model("anisora");
    ensure!(lanes.get(&anisora).await?.spec.replicas == Some(2));
    eventually(60, "the upgraded lane's second pod", || async {
        Ok((release.lane_pods("anisora").await?.len() == 2).then_some(()))
    })
    .await?;
    release.helm("rollback", &["1", "--wait", "--timeout=180s"])?;
    ensure!(lanes.get(&anisora).await?.spec.replicas == Some(1));
    eventually(60, "the rolled-back lane to shrink", || async {
        Ok((release.lane_pods("anisora").await?.len() == 1).then_some(()))
    })
    .await?;
    release.wait_succeeded(&in_flight).await?;
    let history = release.helm("history", &[])?;
    ensure!(history.contains("Rollback to 1"), "{history}");
    // Helm left the operator's certificates alone: same CA, still trusted.
    ensure!(
        ca_bundle(configurations.get(full).await?) == bundle,
        "caBundle changed across upgrade/rollback"
    );
    let kept = ns
        .api::<Secret>()
        .get(&format!("{full}-webhook-tls"))
        .await?;
    ensure!(
        kept.data == secret.data,
        "the webhook Secret changed across upgrade/rollback"
    );
    match release
        .create_job("twenty-steps", "anisora", json!({"steps": 20}))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 422 => {}
        other => bail!("the webhook stopped refusing after the rollback: {other:?}"),
    }

    // Users delete their jobs; the operator and runners go with the release's pods.
    let jobs = ns.api::<VideoJob>();
    jobs.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    eventually(60, "the jobs to be gone", || async {
        Ok(jobs
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    for runner in &mut runners {
        runner.kill().await?;
    }
    operator.stop();
    release.helm("uninstall", &["--wait", "--timeout=180s"])?;

    let instance = format!("app.kubernetes.io/instance={}", release.name);
    // The volume claims stay with the weights and videos on them (helm.sh/resource-policy).
    let claims: Vec<String> = ["models", "outputs"]
        .iter()
        .map(|which| format!("{}-{which}", release.full))
        .collect();
    let kept: Vec<String> = claims
        .iter()
        .map(|c| format!("persistentvolumeclaim/{c}"))
        .collect();
    let ours = |out: String| -> Vec<String> {
        out.lines()
            .filter(|l| {
                !l.is_empty()
                    && *l != "serviceaccount/default"
                    && *l != "configmap/kube-root-ca.crt"
                    && !kept.iter().any(|k| k == l)
            })
            .map(str::to_string)
            .collect()
    };
    eventually(90, "nothing of the release to remain", || async {
            let cluster = ours(run_tool(env.kubectl().args([
                "get",
                "clusterroles,clusterrolebindings,validatingwebhookconfigurations,validatingadmissionpolicies,validatingadmissionpolicybindings,videomodels,modellanes",
                "-l",
                &instance,
                "-o",
                "name",
            ]))?);
            let namespaced = ours(run_tool(ns.kubectl().args([
                "get",
                "pods,leases,secrets,services,deployments,replicasets,poddisruptionbudgets,networkpolicies,roles,rolebindings,serviceaccounts,configmaps,persistentvolumeclaims",
                "-o",
                "name",
            ]))?);
            if !cluster.is_empty() || !namespaced.is_empty() {
                eprintln!("left: {cluster:?} {namespaced:?}");
            }
            Ok((cluster.is_empty() && namespaced.is_empty()).then_some(()))
        })
        .await?;
    let pvcs = ns.api::<PersistentVolumeClaim>();
    for claim in &claims {
        let kept = pvcs
            .get(claim)
            .await
            .context("helm uninstall keeps the volume claims")?;
        ensure!(
            kept.annotations()
                .get("helm.sh/resource-policy")
                .map(String::as_str)
                == Some("keep")
        );
        pvcs.delete(claim, &DeleteParams::default()).await?;
    }
    let crds = run_tool(env.kubectl().args(["get", "crd", "-o", "name"]))?;
    for crd in ["videojobs", "videomodels", "modellanes"] {
        ensure!(
            crds.contains(&format!("{crd}.framelane.dev")),
            "helm uninstall keeps the CRDs: {crds}"
        );
    }
    Ok(())
}

/// Every metric the operator and the runner define, each with a sample (a family without
/// one is not exported at all), in the Prometheus text format.
fn exported_metrics() -> (String, String) {
    use framelane_api::modellane::FallbackCause;
    use framelane_contract::{
        readable::WatchErrorLabels,
        serve::{Metrics as _, prometheus_text},
    };
    use framelane_operator::metrics::{
        AdmissionLabels, CertificateLabels, ControllerLabels, ErrorLabels, FinishedLabels, Metrics,
        MovedLabels,
    };
    let op = Metrics::default();
    let lane = Metrics::lane("anisora");
    op.queue_depth.get_or_create(&lane).set(1);
    op.queue_max_depth.get_or_create(&lane).set(25);
    op.ready_runners.get_or_create(&lane).set(1);
    op.queue_wait.get_or_create(&lane).observe(2.0);
    let finished = FinishedLabels {
        phase: "Succeeded".into(),
        reason: "Completed".into(),
    };
    op.jobs_finished.get_or_create(&finished).inc();
    op.timeout_drops.get_or_create(&lane).inc();
    op.runner_lost_requeues.get_or_create(&lane).inc();
    let episode = Metrics::fallback("anisora", FallbackCause::Capacity);
    op.fallback_activations.get_or_create(&episode).inc();
    op.fallback_active.get_or_create(&episode).set(1);
    op.fallback_duration.get_or_create(&episode).observe(42.0);
    let moved = MovedLabels {
        lane: "anisora".into(),
        fallback_lane: "shared".into(),
        cause: "capacity".into(),
    };
    op.fallback_jobs_moved.get_or_create(&moved).inc();
    op.events_dropped.inc();
    let controller = ControllerLabels {
        controller: "videojob".into(),
    };
    op.reconcile_duration
        .get_or_create(&controller)
        .observe(0.01);
    let error = ErrorLabels {
        controller: "videojob".into(),
        error: "conflict".into(),
    };
    op.reconcile_errors.get_or_create(&error).inc();
    op.leader.set(1);
    let decision = AdmissionLabels {
        lane: "anisora".into(),
        result: "denied".into(),
        reason: "queue_overloaded".into(),
    };
    op.admission_decisions.get_or_create(&decision).inc();
    op.webhook_duration.observe(0.0001);
    let certificate = CertificateLabels {
        certificate: "ca".into(),
    };
    op.certificate_expiry
        .get_or_create(&certificate)
        .set(1_900_000_000);

    let expired = WatchErrorLabels {
        kind: "VideoJob".into(),
        cause: "expired".into(),
    };
    op.watch_errors.get_or_create(&expired).inc();

    use framelane_runner::metrics::{LoadLabels, MemoryLabels, Metrics as Runner, ResultLabels};
    let runner_watch_errors = prometheus_client::metrics::family::Family::<
        WatchErrorLabels,
        prometheus_client::metrics::counter::Counter,
    >::default();
    let runner = Runner::new(runner_watch_errors.clone());
    runner_watch_errors.get_or_create(&expired).inc();
    let result = ResultLabels {
        result: "Succeeded".into(),
    };
    runner.jobs.get_or_create(&result).inc();
    runner.generation_seconds.observe(12.0);
    for from in ["files", "host"] {
        runner
            .model_loads
            .get_or_create(&LoadLabels { from: from.into() })
            .inc();
    }
    runner.warm_hits.inc();
    runner.host_weight_bytes.set(1 << 30);
    let kind = MemoryLabels {
        kind: "reserved".into(),
    };
    runner
        .memory_after_cleanup
        .get_or_create(&kind)
        .set(1 << 20);
    runner.ooms.inc();
    (
        prometheus_text(&op.render()),
        prometheus_text(&runner.render()),
    )
}

/// The metric names in `text` (a rule file, a dashboard, a scrape).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("framelane_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.ends_with('_') {
            names.insert(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
    names
}

#[tokio::test]
async fn the_charts_alerts_and_dashboard_use_only_exported_metrics_and_pass_promtool() -> Result<()>
{
    let env = TestEnv::get()?;
    let version = kube_version(&env.client().await?).await?;
    let rendered = template(
        env,
        &version,
        &["--set".into(), "metrics.prometheusRule.enabled=true".into()],
    )?;
    let docs = documents(&rendered)?;
    let rule = find(&docs, "PrometheusRule", "fl-framelane")?;
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        serde_yaml::to_string(&json!({"groups": rule["spec"]["groups"]}))?,
    )?;
    let checked = run_tool(
        Command::new(env.bin_dir.join("promtool"))
            .args(["check", "rules"])
            .arg(&rules),
    )?;
    ensure!(checked.contains("SUCCESS"), "{checked}");

    let (operator, runner) = exported_metrics();
    for (binary, scrape) in [("operator", &operator), ("runner", &runner)] {
        let mut child = Command::new(env.bin_dir.join("promtool"))
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(&mut child.stdin.take().expect("piped"), scrape.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "promtool check metrics on the {binary}'s metrics: {}{}\n{scrape}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let exported: BTreeSet<String> = metric_names(&operator)
        .into_iter()
        .chain(metric_names(&runner))
        .collect();
    let dashboard = std::fs::read_to_string(chart().join("dashboards").join("framelane.json"))?;
    let queried: BTreeSet<String> = metric_names(&serde_yaml::to_string(&rule["spec"])?)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    let missing: Vec<&String> = queried.difference(&exported).collect();
    ensure!(
        missing.is_empty(),
        "the chart queries metrics nothing exports: {missing:?}"
    );
    ensure!(
        queried.contains("framelane_fallback_active")
            && queried.contains("framelane_fallback_duration_seconds_bucket"),
        "{queried:?}"
    );
    Ok(())
}

/// A kube client that authenticates as `account` with a token bound to `pod` (or to nothing).
async fn client_as(
    ns: &TestNamespace,
    dir: &Path,
    account: &str,
    pod: Option<&str>,
) -> Result<Client> {
    let token = match pod {
        Some(pod) => pod_token(ns, account, pod)?,
        None => run_tool(ns.kubectl().args(["create", "token", account]))?
            .trim()
            .to_string(),
    };
    let path = dir.join(format!("{}.kubeconfig", pod.unwrap_or(account)));
    token_kubeconfig(ns.env, &token, &path)?;
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

/// Writes `status` over a job's status, as `jobs`' client.
async fn write_status(
    jobs: &Api<VideoJob>,
    name: &str,
    status: Value,
) -> Result<VideoJob, kube::Error> {
    let mut job = jobs.get(name).await?;
    job.status = serde_json::from_value(status).map_err(kube::Error::SerdeError)?;
    jobs.replace_status(name, &PostParams::default(), &job)
        .await
}

/// The chart's admission policies on the runners, each refusal seen from a runner's own
/// pod-bound token, with the real runner contract allowed through.
async fn runner_policies(ns: &TestNamespace, release: &str, dir: &Path) -> Result<()> {
    let account = format!("{release}-framelane-runner");
    // Runner pods of lane `x` and of lane `x-b`: the policies read the lane from the pod name,
    // exactly (lane x is not lane x-b).
    let pods = ns.api::<Pod>();
    let mut uids = std::collections::BTreeMap::new();
    for name in ["x-0a1b2c-0", "x-0a1b2c-1", "x-b-0a1b2c-0"] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"serviceAccountName": account, "containers": [{"name": "runner", "image": "runner"}]},
        }))?;
        let pod = pods.create(&PostParams::default(), &pod).await?;
        uids.insert(name, pod.metadata.uid.context("a uid")?);
    }
    let x = client_as(ns, dir, &account, Some("x-0a1b2c-0")).await?;
    let xb = client_as(ns, dir, &account, Some("x-b-0a1b2c-0")).await?;
    let admin = ns.api::<VideoJob>();
    let as_x: Api<VideoJob> = Api::namespaced(x.clone(), &ns.name);
    let as_xb: Api<VideoJob> = Api::namespaced(xb.clone(), &ns.name);
    let queued_at = "2030-01-02T03:04:05.678901Z";
    let queued = |lane: &str| json!({"phase": "Queued", "lane": lane, "queuedAt": queued_at, "queuePosition": 1});
    let running = |lane: &str, runner: &str, incarnation: &str| {
        json!({"phase": "Running", "lane": lane, "queuedAt": queued_at, "runner": runner,
            "runnerIncarnation": incarnation, "attempts": 1})
    };
    let new_job = |name: &str, status: Value| {
        let admin = admin.clone();
        let name = name.to_string();
        async move {
            let job: VideoJob = serde_json::from_value(json!({
                "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                "metadata": {"name": name},
                "spec": {"model": "served-by-no-lane", "prompt": "a cat by the sea"},
            }))?;
            admin.create(&PostParams::default(), &job).await?;
            write_status(&admin, &name, status).await?;
            anyhow::Ok(())
        }
    };
    let x_self = format!("{}/0123456789abcdef", uids["x-0a1b2c-0"]);
    let xb_self = format!("{}/0123456789abcdef", uids["x-b-0a1b2c-0"]);
    // The API server enforces a new policy once it has loaded it: a token bound to no pod is
    // then refused.
    new_job("probe", queued("no-runner-serves")).await?;
    let unbound: Api<VideoJob> =
        Api::namespaced(client_as(ns, dir, &account, None).await?, &ns.name);
    eventually(30, "the runner policies to be enforced", || async {
        let written = write_status(
            &unbound,
            "probe",
            running("no-runner-serves", "x-0a1b2c-0", &x_self),
        )
        .await;
        Ok(expect_refused(
            written,
            403,
            "a runner writes only with the token of its own runner pod",
        )
        .ok())
    })
    .await?;

    // Claims: only its own lane's queued jobs, recording its own pod.
    new_job("of-lane-x", queued("x")).await?;
    new_job("of-lane-x-b", queued("x-b")).await?;
    expect_refused(
        write_status(&as_xb, "of-lane-x", running("x", "x-b-0a1b2c-0", &xb_self)).await,
        403,
        "runner pod x-b-0a1b2c-0 serves lane x-b: it may not claim job of-lane-x of lane x",
    )?;
    expect_refused(
        write_status(&as_x, "of-lane-x-b", running("x-b", "x-0a1b2c-0", &x_self)).await,
        403,
        "runner pod x-0a1b2c-0 serves lane x: it may not claim job of-lane-x-b of lane x-b",
    )?;
    expect_refused(
        write_status(&as_x, "of-lane-x", running("x", "x-0a1b2c-1", &x_self)).await,
        403,
        "a claim records who claimed: status.runner x-0a1b2c-0",
    )?;
    // The runner contract itself passes: claim, progress, complete, heartbeat.
    let runner =
        framelane_contract::Runner::start(x.clone(), &ns.name, "x-0a1b2c-0", "x", as_x.clone())
            .owned_by_pod(uids["x-0a1b2c-0"].clone());
    let mut claimed = eventually(30, "runner x to claim its lane's job", || async {
        Ok(runner.claim_next().await?)
    })
    .await?;
    ensure!(claimed.job().metadata.name.as_deref() == Some("of-lane-x"));
    claimed.progress("Denoising", 1, 2, 50).await?;
    let output = framelane_api::videojob::Output {
        path: format!("{}/of-lane-x/video.mp4", ns.name),
        frames: 17,
        fps: 16,
        width: 256,
        height: 256,
        ..Default::default()
    };
    claimed.complete(output, None).await?;
    // A stopping runner gives the job it holds back to its place in the queue (SIGTERM).
    new_job("given-back", queued("x")).await?;
    let claimed = eventually(30, "runner x to claim the next job", || async {
        Ok(runner.claim_next().await?)
    })
    .await?;
    ensure!(claimed.job().metadata.name.as_deref() == Some("given-back"));
    let back = claimed.hand_back().await?;
    let status = back.status.context("a status")?;
    ensure!(status.phase == Some(framelane_api::videojob::JobPhase::Queued));
    ensure!(status.runner.is_none() && status.lane.as_deref() == Some("x"));
    runner.heartbeat(None).await?;
    runner.heartbeat(Some("anisora")).await?;

    // Nor may it finish a queued job without running it.
    new_job("waiting", queued("x")).await?;
    let mut dropped = queued("x");
    dropped["phase"] = json!("Failed");
    expect_refused(
        write_status(&as_x, "waiting", dropped).await,
        403,
        "a runner may only claim a Queued job (Queued to Running) or update a Running job it holds; job waiting is Queued and would become Failed",
    )?;
    // Updates: only of a job its pod holds; never handing it on, never its queuedAt.
    new_job(
        "held-by-x-1",
        running("x", "x-0a1b2c-1", &format!("{}/0", uids["x-0a1b2c-1"])),
    )
    .await?;
    let mut done = running("x", "x-0a1b2c-1", &format!("{}/0", uids["x-0a1b2c-1"]));
    done["phase"] = json!("Succeeded");
    expect_refused(
        write_status(&as_x, "held-by-x-1", done).await,
        403,
        &format!(
            "runner pod x-0a1b2c-0 (uid {}) may only update a job it holds; job held-by-x-1 is held by x-0a1b2c-1",
            uids["x-0a1b2c-0"]
        ),
    )?;
    // Its own pod name, but an earlier pod of that name (another uid).
    new_job(
        "held-by-earlier-pod",
        running("x", "x-0a1b2c-0", "earlier-uid/0"),
    )
    .await?;
    let mut done = running("x", "x-0a1b2c-0", "earlier-uid/0");
    done["phase"] = json!("Succeeded");
    expect_refused(
        write_status(&as_x, "held-by-earlier-pod", done).await,
        403,
        "may only update a job it holds; job held-by-earlier-pod is held by x-0a1b2c-0 (earlier-uid/0)",
    )?;
    new_job("held-by-x", running("x", "x-0a1b2c-0", &x_self)).await?;
    expect_refused(
        write_status(&as_x, "held-by-x", running("x", "x-0a1b2c-1", &x_self)).await,
        403,
        "a runner may not hand a job on",
    )?;
    expect_refused(
        write_status(&as_x, "held-by-x", queued("x-b")).await,
        403,
        "a runner may not hand a job on",
    )?;
    let mut still_held = queued("x");
    still_held["runner"] = json!("x-0a1b2c-0");
    expect_refused(
        write_status(&as_x, "held-by-x", still_held).await,
        403,
        "a runner may not hand a job on",
    )?;
    let mut late = running("x", "x-0a1b2c-0", &x_self);
    late["queuedAt"] = json!("2031-01-01T00:00:00.000000Z");
    expect_refused(
        write_status(&as_x, "held-by-x", late).await,
        422,
        "status.queuedAt: Invalid value: status.queuedAt is the job's place in its lane's queue",
    )?;
    // A held job with no queuedAt (written by an admin): the runner still may not set one.
    let mut unplaced = running("x", "x-0a1b2c-0", &x_self);
    unplaced
        .as_object_mut()
        .expect("an object")
        .remove("queuedAt");
    new_job("unplaced", unplaced.clone()).await?;
    // The year 9999 is refused for everyone (the CRD: the operator cannot read it), a
    // plausible time for the runner by its policy.
    unplaced["queuedAt"] = json!("9999-01-01T00:00:00.000000Z");
    expect_refused(
        write_status(&as_x, "unplaced", unplaced.clone()).await,
        422,
        "status.queuedAt must be before the year 9000",
    )?;
    unplaced["queuedAt"] = json!("2031-01-01T00:00:00.000000Z");
    expect_refused(
        write_status(&as_x, "unplaced", unplaced).await,
        403,
        "a runner may not set or change status.queuedAt",
    )?;
    // Its own finished job stays finished.
    expect_refused(
        write_status(
            &as_x,
            "of-lane-x",
            running("x", "x-0a1b2c-0", &runner.incarnation()),
        )
        .await,
        422,
        "the job is Succeeded or Failed, and a finished job's status never changes again",
    )?;

    // Leases: only its own, in its own lane.
    let leases: Api<Lease> = Api::namespaced(x.clone(), &ns.name);
    let mut own = leases.get("x-0a1b2c-0").await?;
    ensure!(
        own.spec.as_ref().and_then(|s| s.holder_identity.clone()) == Some(runner.incarnation()),
        "the heartbeat names the runner's start: {own:?}"
    );
    let xbs = framelane_contract::Runner::start(
        xb.clone(),
        &ns.name,
        "x-b-0a1b2c-0",
        "x-b",
        as_xb.clone(),
    )
    .owned_by_pod(uids["x-b-0a1b2c-0"].clone());
    xbs.heartbeat(None).await?;
    let mut other = Api::<Lease>::namespaced(ns.client.clone(), &ns.name)
        .get("x-b-0a1b2c-0")
        .await?;
    other.metadata.managed_fields = None;
    // Renewing it: the same Lease, written back.
    expect_refused(
        leases
            .replace("x-b-0a1b2c-0", &PostParams::default(), &other)
            .await,
        403,
        "a runner may only write the heartbeat Lease named after its own pod; Lease x-b-0a1b2c-0 is not x-0a1b2c-0",
    )?;
    own.labels_mut()
        .insert("framelane.dev/lane".into(), "x-b".into());
    expect_refused(
        leases
            .replace("x-0a1b2c-0", &PostParams::default(), &own)
            .await,
        403,
        "runner pod x-0a1b2c-0 serves lane x: its heartbeat Lease must be labelled framelane.dev/lane=x, not x-b",
    )?;

    Ok(())
}

#[tokio::test]
async fn the_charts_policies_hold_each_runner_to_its_own_lane_jobs_and_lease() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("trust").await?;
    let dir = tempfile::tempdir()?;
    let release = ns.name.clone();
    run_tool(
        helm(env)
            .args(["install", &release, "-n", &ns.name])
            .arg(chart())
            .args([
                "--set=webhook.enabled=false",
                "--set=operator.replicas=1",
                "--set=volumes.models.create=false",
                "--set=volumes.outputs.create=false",
                "--set-json=models=[]",
                "--set-json=lanes=[]",
            ]),
    )?;
    let result = runner_policies(&ns, &release, dir.path()).await;
    let uninstalled = run_tool(helm(env).args(["uninstall", &release, "-n", &ns.name, "--wait"]));
    result?;
    uninstalled.map(|_| ())
}
