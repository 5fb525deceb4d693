//! The operator's configuration: flags and environment (Helm values become these).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;

/// framelane-operator: runs VideoJobs on warm GPU lanes.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Config {
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, or the in-cluster account).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Namespace of the runner pods, their heartbeat Leases and the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "framelane-system")]
    pub namespace: String,
    /// This replica's name in leader election (the pod name in a cluster). Default: the
    /// host's name and a random suffix, new at each start, so that two replicas never share
    /// one (as a process id would: each container's first process is 1).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Only VideoJobs of this namespace (default: every namespace).
    #[arg(long, env = "FRAMELANE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Only ModelLanes matching this label selector (default: every lane). Lets several
    /// operators share a cluster, each with its own lanes: an operator with a selector leaves
    /// jobs alone that none of its lanes serve.
    #[arg(long, env = "FRAMELANE_LANE_SELECTOR")]
    pub lane_selector: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FRAMELANE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "framelane-operator")]
    pub leader_lease: String,
    /// How long a leader's Lease lasts without renewal; a standby takes over after it.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    pub leader_lease_seconds: Duration,
    /// Runner image for lanes that do not set one.
    #[arg(
        long,
        env = "FRAMELANE_RUNNER_IMAGE",
        default_value = "ghcr.io/framelane/runner:0.1.0"
    )]
    pub runner_image: String,
    /// Pull policy of the runner image (Always, IfNotPresent or Never). Unset: Kubernetes'
    /// default for the image's tag.
    #[arg(long, env = "FRAMELANE_RUNNER_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub runner_image_pull_policy: Option<String>,
    /// Secrets (in --namespace) the runner pods pull their image with, comma-separated.
    #[arg(
        long,
        env = "FRAMELANE_RUNNER_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    pub runner_image_pull_secrets: Vec<String>,
    /// ServiceAccount of the runner pods, in --namespace (it needs the runner's RBAC: its
    /// heartbeat Leases, VideoModels, VideoJobs and their status). Unset: the namespace's
    /// `default` account.
    #[arg(long, env = "FRAMELANE_RUNNER_SERVICE_ACCOUNT")]
    pub runner_service_account: Option<String>,
    /// Extended resource a lane's runner requests (one each) when the lane sets no resources.
    #[arg(long, default_value = "nvidia.com/gpu")]
    pub gpu_resource: String,
    /// PersistentVolumeClaim with the model packages, for lanes that set no modelVolume.
    #[arg(
        long,
        env = "FRAMELANE_MODELS_CLAIM",
        default_value = "framelane-models"
    )]
    pub models_claim: String,
    /// PersistentVolumeClaim for generated videos, for lanes that set no outputVolume.
    #[arg(
        long,
        env = "FRAMELANE_OUTPUTS_CLAIM",
        default_value = "framelane-outputs"
    )]
    pub outputs_claim: String,
    /// Hosts a VideoJob's `spec.image` URL may name (comma-separated; the port does not
    /// matter). Empty (the default): no URL is allowed, only paths in the model volume, since
    /// a runner fetching any URL could reach services inside the cluster. Runner pods get the
    /// same list.
    #[arg(long, env = "FRAMELANE_IMAGE_URL_HOSTS", value_delimiter = ',')]
    pub image_url_hosts: Vec<String>,
    /// Queue depth of lanes that set none.
    #[arg(long, default_value_t = 25)]
    pub default_max_depth: i32,
    /// maxWaitSeconds of lanes that set none.
    #[arg(long, default_value_t = 30)]
    pub default_max_wait_seconds: i32,
    /// Seconds a lane may have no fresh runner before it goes into fallback (cause
    /// `capacity`), when it has a fallback lane.
    #[arg(long, env = "FRAMELANE_FALLBACK_GRACE_SECONDS", value_parser = parse_seconds, default_value = "60")]
    pub fallback_grace_seconds: Duration,
    /// Runs of a job (the first one included) before a lost runner fails it with RunnerLost.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: i32,
    /// Seconds between refreshes of a lane's status when nothing changed (admissions,
    /// starts, finishes, deletions and pod changes refresh it at once; a runner heartbeat's
    /// expiry is looked at when it is due).
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    pub lane_resync_seconds: Duration,
    /// Address the admission webhook listens on (HTTPS). Unset: no webhook.
    #[arg(long, env = "FRAMELANE_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,
    /// `host:port` where the other replicas reach this one's webhook (default: $POD_IP, or
    /// the listen address, with the webhook port).
    #[arg(long, env = "FRAMELANE_WEBHOOK_ADVERTISE")]
    pub webhook_advertise: Option<String>,
    /// This pod's IP (the downward API sets it in a cluster).
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<String>,
    /// Name of the webhook's Service in --namespace: its DNS names go into the certificate.
    #[arg(long, default_value = "framelane-webhook")]
    pub webhook_service: String,
    /// Who issues the webhook's certificates: `operator` generates, rotates and publishes
    /// them itself; `external` (cert-manager) writes the Secret (ca.crt, tls.crt, tls.key) and
    /// the caBundle, and the operator only serves what the Secret holds.
    #[arg(
        long,
        env = "FRAMELANE_WEBHOOK_CERTIFICATES",
        value_enum,
        default_value_t = CertificateSource::Operator
    )]
    pub webhook_certificates: CertificateSource,
    /// Secret in --namespace with the webhook's CA and serving certificate (with
    /// `--webhook-certificates operator`: created when missing, filled when it has none).
    #[arg(long, default_value = "framelane-webhook-tls")]
    pub webhook_secret: String,
    /// ValidatingWebhookConfiguration whose caBundle the leader keeps equal to the CA.
    #[arg(long, default_value = "framelane")]
    pub webhook_configuration: String,
    /// Lifetime of the serving certificate; renewed with a third of it left.
    #[arg(long, value_parser = parse_seconds, default_value = "2592000")]
    pub webhook_cert_seconds: Duration,
    /// Lifetime of the webhook CA; renewed with a third of it left, with an overlap.
    #[arg(long, value_parser = parse_seconds, default_value = "31536000")]
    pub webhook_ca_seconds: Duration,
    /// PEM file with the CA that signs the API server's client certificate for webhook
    /// calls (its admission configuration's kubeconfig). Set: the API server's paths answer
    /// only connections that show a certificate it signed, so no other caller can take a
    /// slot of a lane's queue. Unset: any caller that reaches the port is answered.
    #[arg(long, env = "FRAMELANE_WEBHOOK_CLIENT_CA")]
    pub webhook_client_ca: Option<std::path::PathBuf>,
    /// Connections the webhook keeps open at once; past it, it accepts no more until one
    /// closes (the API server multiplexes its calls over the connection it holds). Lowered
    /// to fit the process's open-file limit.
    #[arg(long, default_value_t = 10_000)]
    pub webhook_max_connections: usize,
    /// A webhook connection without a finished TLS handshake (or, over HTTP/1.1, a request's
    /// headers) within this long is closed.
    #[arg(long, value_parser = parse_seconds, default_value = "5")]
    pub webhook_handshake_seconds: Duration,
    /// On SIGTERM: how long to keep serving everything while no longer ready, so Services
    /// and the API server stop sending new connections before the webhook stops accepting.
    /// Then open connections get up to 10 s to finish, and a leader hands over its Lease.
    #[arg(long, env = "FRAMELANE_SHUTDOWN_DELAY_SECONDS", value_parser = parse_seconds, default_value = "5")]
    pub shutdown_delay_seconds: Duration,
}

/// Who issues the webhook's certificates.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateSource {
    /// The operator: a self-signed CA and a serving certificate in the Secret, rotated before
    /// expiry, the CA published as the webhook configuration's caBundle.
    Operator,
    /// Someone else (cert-manager and its cainjector): the operator serves the Secret's
    /// certificate, reloading it when it changes, and never writes the Secret or caBundle.
    External,
}

impl Config {
    /// Where other replicas reach this one's webhook.
    pub fn webhook_endpoint(&self) -> Option<String> {
        let addr = self.webhook_addr?;
        if let Some(a) = &self.webhook_advertise {
            return Some(a.clone());
        }
        let host = match (&self.pod_ip, addr.ip()) {
            (Some(ip), _) => ip.clone(),
            (None, ip) if ip.is_unspecified() => "127.0.0.1".into(),
            (None, ip) => ip.to_string(),
        };
        Some(match host.contains(':') {
            true => format!("[{host}]:{}", addr.port()),
            false => format!("{host}:{}", addr.port()),
        })
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))
}
