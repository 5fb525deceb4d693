//! Leader election on a `Lease`: only the holder reconciles and writes. A standby takes over
//! once the holder has not renewed for the lease duration (a killed leader never renews).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::Notify;

/// The Lease annotation with the leader's webhook address (`host:port`), where standbys
/// hand admission reviews for the depth decision.
pub const WEBHOOK_ENDPOINT: &str = "framelane.dev/webhook-endpoint";

/// One replica's view of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// This replica's webhook address, published while it leads.
    endpoint: Option<String>,
    /// The current leader's webhook address, as last read.
    leader_endpoint: Mutex<Option<String>>,
}

impl Elector {
    pub fn new(
        api: Api<Lease>,
        name: &str,
        identity: &str,
        duration: Duration,
        endpoint: Option<String>,
    ) -> Self {
        Elector {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
            endpoint,
            leader_endpoint: Mutex::new(None),
        }
    }

    /// The leader's webhook address, as of the last look at the Lease.
    pub fn leader_endpoint(&self) -> Option<String> {
        self.leader_endpoint.lock().expect("endpoint lock").clone()
    }

    /// Reads the Lease now and returns the leader's webhook address (for a standby that has
    /// none yet, or whose last one stopped answering).
    pub async fn refresh_leader_endpoint(&self) -> Result<Option<String>, kube::Error> {
        let endpoint = self
            .api
            .get_opt(&self.name)
            .await?
            .and_then(|l| endpoint_of(&l));
        self.saw(endpoint.clone());
        Ok(endpoint)
    }

    fn saw(&self, endpoint: Option<String>) {
        *self.leader_endpoint.lock().expect("endpoint lock") = endpoint;
    }

    fn publish(&self, meta: &mut ObjectMeta) {
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        match &self.endpoint {
            Some(e) => annotations.insert(WEBHOOK_ENDPOINT.into(), e.clone()),
            None => annotations.remove(WEBHOOK_ENDPOINT),
        };
    }

    /// How often the leader renews (and a standby retries): a third of the lease.
    pub fn retry_interval(&self) -> Duration {
        self.duration / 3
    }

    /// Takes or renews the Lease. `Ok(true)`: this replica leads until at least now + the
    /// lease duration. Every write carries the resourceVersion it read, so two replicas can
    /// never both succeed.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = self.duration.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let mut metadata = ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            };
            self.publish(&mut metadata);
            let lease = Lease {
                metadata,
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(secs)) => {
                renewed.0 + SignedDuration::from_secs(i64::from(secs)) < now
            }
            _ => true,
        };
        if !mine && !expired {
            self.saw(endpoint_of(&lease));
            return Ok(false);
        }
        self.publish(&mut lease.metadata);
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Notified whenever the Lease shows no holder (a leader let go on shutdown), so a
    /// standby tries at once instead of at its next retry.
    pub fn releases(&self) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let leases = watcher(self.api.clone(), config)
            .default_backoff()
            .applied_objects();
        let released = notify.clone();
        tokio::spawn(leases.for_each(move |lease| {
            let free = lease.is_ok_and(|l| l.spec.is_none_or(|s| s.holder_identity.is_none()));
            if free {
                released.notify_one();
            }
            futures::future::ready(())
        }));
        notify
    }

    /// Gives the Lease up (on a clean shutdown), so a standby takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await? {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await?;
            }
        }
        Ok(())
    }
}

/// The webhook address a Lease's holder published.
fn endpoint_of(lease: &Lease) -> Option<String> {
    lease.annotations().get(WEBHOOK_ENDPOINT).cloned()
}

fn conflict_is_false(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
