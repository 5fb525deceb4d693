//! Test support: a `kube::Client` and a fresh namespace on the real local control plane
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok) that
//! `tests/testenv/up.sh` runs for this checkout.
//!
//! The first test of a process that asks for the control plane runs `up.sh`, which reuses a
//! healthy control plane or starts one (under a lock, so parallel test binaries share one).
//! When it cannot start, the test fails with the reason, the log to read and the fix;
//! nothing is skipped.

pub mod kueue;
pub mod stall;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client, Config,
    api::{ObjectMeta, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// Label on every namespace a test creates.
pub const TEST_LABEL: &str = "framelane.dev/test";

/// Why the test environment could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the local control plane did not start: {0}\n\
         Read the component logs under .testenv/logs/, fix the cause, then run `just down` \
         and `just up` (the first `just up` builds Kubernetes from the Go module proxy, which \
         needs Go 1.26 and takes about 20 minutes on 2 cores)."
    )]
    Start(String),
    #[error("cannot read the admin kubeconfig {path}: {source}; run `just up` to create it")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("the control plane refused a request: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Wait(String),
    #[error(
        "Kueue did not start: {0}\n\
         Read .testenv/logs/kueue.log, fix the cause, then run `tests/testenv/kueue.sh` again \
         (its first run builds Kueue from the Go module proxy, about 10 minutes on 2 cores)."
    )]
    Kueue(String),
}

/// Polls `check` every 200 ms until it returns `Some`, for at most `secs`: the one way the
/// tests wait for the cluster to reach a state. An error from `check` ends the wait at once.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() <= deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A TCP port free on 127.0.0.1 now, for a process started later that must be told its address
/// first (a webhook URL in a chart's values, a flag). Chosen below the kernel's ephemeral range
/// (`ip_local_port_range`): a port from binding port 0 lies inside it, and until the process
/// binds it any outgoing connection of this machine may take it as its local port (a webhook
/// then could not listen: "Address already in use"). Each call starts somewhere else in the
/// range, by process and call, so parallel tests rarely try the same port.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOW).max(1);
    let start = std::process::id()
        .wrapping_mul(7_919)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(104_729));
    (0..span)
        .map(|i| (LOW + start.wrapping_add(i) % span) as u16)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .ok_or_else(|| anyhow::anyhow!("no free port on 127.0.0.1 from {LOW} to {ephemeral}"))
}

/// Runs a tool and returns its stdout; a failure carries its output.
pub fn run_tool(cmd: &mut Command) -> anyhow::Result<String> {
    use anyhow::Context;
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} exited with {}:\n{stdout}{stderr}",
        out.status
    );
    Ok(stdout)
}

/// An AdmissionReview as the API server would send it for a create of VideoJob `name` in
/// `namespace` (model `model`): anyone who can reach the webhook can write one.
pub fn forged_review(namespace: &str, model: &str, name: &str) -> String {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("uid-{name}"),
            "kind": {"group": "framelane.dev", "version": "v1alpha1", "kind": "VideoJob"},
            "resource": {"group": "framelane.dev", "version": "v1alpha1", "resource": "videojobs"},
            "operation": "CREATE",
            "namespace": namespace,
            "name": name,
            "dryRun": false,
            "userInfo": {"username": "system:serviceaccount:elsewhere:attacker"},
            "object": {
                "apiVersion": "framelane.dev/v1alpha1",
                "kind": "VideoJob",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"model": model, "prompt": "forged"}
            }
        }
    })
    .to_string()
}

/// Expects a write refused by the API server with `code` and a message containing `message`.
pub fn expect_refused<T: std::fmt::Debug>(
    written: Result<T, kube::Error>,
    code: u16,
    message: &str,
) -> anyhow::Result<()> {
    match written {
        Err(kube::Error::Api(s)) if s.code == code && s.message.contains(message) => Ok(()),
        Err(kube::Error::Api(s)) => anyhow::bail!(
            "expected {code} with {message:?}; the API server said {}: {}",
            s.code,
            s.message
        ),
        other => anyhow::bail!("expected {code} with {message:?}, got {other:?}"),
    }
}

/// The torch venv's Python (`FRAMELANE_TORCH_PYTHON`, set by
/// `eval "$(gpu-runner/scripts/setup-torch.sh)"`, as `just test` does). Missing is a failure,
/// never a skip.
pub fn torch_python() -> PathBuf {
    const FIX: &str =
        "run `eval \"$(gpu-runner/scripts/setup-torch.sh)\"` first (`just test` does)";
    let path = std::env::var_os("FRAMELANE_TORCH_PYTHON")
        .unwrap_or_else(|| panic!("FRAMELANE_TORCH_PYTHON is not set; {FIX}"));
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "FRAMELANE_TORCH_PYTHON={} does not exist; {FIX}",
        path.display()
    );
    path
}

/// The tiny random-weight Wan models the runner's tests, benchmark and demo use, made once
/// per test process by gpu-runner/tests/make_tiny_wan_models.py (its doc lists them): `anisora`
/// (diffusers, image to video, two experts), `phr00t` (one ComfyUI AllInOne file, text to
/// video), `wan-t2v` (diffusers, text to video) and `inputs/first-frame.png`.
pub fn tiny_models() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let script = repo_root().join("gpu-runner/tests/make_tiny_wan_models.py");
        let out = Command::new(torch_python())
            .arg(&script)
            .arg(dir.path())
            .output()
            .expect("the torch Python runs");
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

/// A binary of this workspace, built now if needed (debug profile): for tests in another
/// package than the binary's, which cargo gives no path to.
pub fn workspace_binary(name: &str) -> PathBuf {
    let root = repo_root();
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--quiet", "--bin", name])
        .current_dir(&root)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build --bin {name} failed");
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("debug")
        .join(name)
}

/// The running control plane of this checkout.
#[derive(Debug)]
pub struct TestEnv {
    /// The repository root.
    pub root: PathBuf,
    /// The admin kubeconfig (`.testenv/kubeconfig`).
    pub kubeconfig: PathBuf,
    /// The directory with kubectl, helm and the control plane binaries.
    pub bin_dir: PathBuf,
}

static ENV: OnceLock<Result<TestEnv, String>> = OnceLock::new();

impl TestEnv {
    /// The CA of the client certificate the API server shows admission webhooks (an
    /// operator's `--webhook-client-ca`).
    pub fn webhook_client_ca(&self) -> PathBuf {
        self.root.join(".testenv/pki/webhook-client-ca.crt")
    }

    /// The control plane of this checkout, started by `up.sh` on first use in this process.
    pub fn get() -> Result<&'static TestEnv, Error> {
        ENV.get_or_init(start)
            .as_ref()
            .map_err(|e| Error::Start(e.clone()))
    }

    /// A client with the admin identity. Each call builds a new one, so every test's tokio
    /// runtime owns its own connections.
    pub async fn client(&self) -> Result<Client, Error> {
        Ok(Client::try_from(self.config().await?)?)
    }

    /// The admin client's configuration (a test may point it through a proxy of its own).
    pub async fn config(&self) -> Result<Config, Error> {
        let kubeconfig =
            Kubeconfig::read_from(&self.kubeconfig).map_err(|source| Error::Kubeconfig {
                path: self.kubeconfig.clone(),
                source,
            })?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|source| Error::Kubeconfig {
                path: self.kubeconfig.clone(),
                source,
            })?;
        Ok(config)
    }

    /// `kubectl` of the control plane's version, talking to it as admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// A new namespace (named `<prefix>-<random>`) whose default ServiceAccount exists, so
    /// pods can be created in it at once.
    pub async fn namespace(&'static self, prefix: &str) -> Result<TestNamespace, Error> {
        let client = self.client().await?;
        let ns = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                labels: Some([(TEST_LABEL.to_string(), prefix.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let name = created
            .metadata
            .name
            .expect("the API server names a generateName object");
        let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &name);
        let what = format!(
            "the default ServiceAccount of namespace {name} (is kube-controller-manager running? See .testenv/logs/kube-controller-manager.log)"
        );
        eventually(60, &what, || async {
            Ok(accounts.get_opt("default").await?.map(|_| ()))
        })
        .await
        .map_err(|e| Error::Wait(format!("{e:#}")))?;
        Ok(TestNamespace {
            env: self,
            name,
            client,
        })
    }
}

/// A namespace of one test, with a client for it.
pub struct TestNamespace {
    pub env: &'static TestEnv,
    pub name: String,
    pub client: Client,
}

/// A test's namespace goes when the test ends, with its jobs: left behind, jobs of the
/// default models (`anisora`, `phr00t`) would be admitted to the lanes `just demo` makes.
impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = self
            .env
            .kubectl()
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .output();
    }
}

impl TestNamespace {
    /// An `Api` for a namespaced kind in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// `kubectl -n <this namespace>`.
    pub fn kubectl(&self) -> Command {
        let mut cmd = self.env.kubectl();
        cmd.args(["-n", &self.name]);
        cmd
    }
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/testenv sits two levels below the repository root")
        .to_path_buf()
}

fn start() -> Result<TestEnv, String> {
    let root = repo_root();
    let up = root.join("tests/testenv/up.sh");
    let out = Command::new(&up)
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", up.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} exited with {}:\n{}{}",
            up.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let tools = root.join("tests/testenv/tools.sh");
    let bin = Command::new(&tools)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tools.display()))?;
    if !bin.status.success() {
        return Err(format!(
            "{} failed:\n{}",
            tools.display(),
            String::from_utf8_lossy(&bin.stderr)
        ));
    }
    Ok(TestEnv {
        kubeconfig: root.join(".testenv/kubeconfig"),
        bin_dir: PathBuf::from(String::from_utf8_lossy(&bin.stdout).trim()),
        root,
    })
}
