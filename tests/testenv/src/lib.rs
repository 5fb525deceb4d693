//! Test support: a `kube::Client` and a fresh namespace on the real local control plane
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok) that
//! `tests/testenv/up.sh` runs for this checkout.
//!
//! The first test of a process that asks for the control plane runs `up.sh`, which reuses a
//! healthy control plane or starts one (under a lock, so parallel test binaries share one).
//! When it cannot start, the test fails with the reason, the log to read and the fix;
//! nothing is skipped.

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
    #[error(
        "namespace {0} has no default ServiceAccount after 60 s; is kube-controller-manager running? See .testenv/logs/kube-controller-manager.log"
    )]
    NoServiceAccount(String),
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
    /// The control plane of this checkout, started by `up.sh` on first use in this process.
    pub fn get() -> Result<&'static TestEnv, Error> {
        ENV.get_or_init(start)
            .as_ref()
            .map_err(|e| Error::Start(e.clone()))
    }

    /// A client with the admin identity. Each call builds a new one, so every test's tokio
    /// runtime owns its own connections.
    pub async fn client(&self) -> Result<Client, Error> {
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
        Ok(Client::try_from(config)?)
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
        for _ in 0..120 {
            if accounts.get_opt("default").await?.is_some() {
                return Ok(TestNamespace {
                    env: self,
                    name,
                    client,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(Error::NoServiceAccount(name))
    }
}

/// A namespace of one test, with a client for it.
pub struct TestNamespace {
    pub env: &'static TestEnv,
    pub name: String,
    pub client: Client,
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

fn repo_root() -> PathBuf {
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
