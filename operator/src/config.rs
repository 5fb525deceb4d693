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
    /// This replica's name in leader election (the pod name in a cluster).
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
    /// Queue depth of lanes that set none.
    #[arg(long, default_value_t = 25)]
    pub default_max_depth: i32,
    /// maxWaitSeconds of lanes that set none.
    #[arg(long, default_value_t = 30)]
    pub default_max_wait_seconds: i32,
    /// Runs of a job (the first one included) before a lost runner fails it with RunnerLost.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: i32,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))
}
