//! Leader election on a `Lease`: only the holder reconciles and writes.
//!
//! Fencing, as client-go's leaderelection does it:
//! - A standby judges another holder's Lease by its own monotonic clock: the Lease has
//!   expired once it has not changed for the lease duration since this replica last saw it
//!   change. The holder's `renewTime` is never compared with the local wall clock, so a
//!   replica whose clock is off neither steals a live Lease nor waits for a dead one forever.
//! - A leader is confirmed until the renew deadline (two thirds of the lease) after the
//!   start of its last successful renewal. A standby waits at least the whole lease after it
//!   saw that renewal, so a leader whose renewals stall stops acting before anyone else can
//!   take over.
//! - Every call of the election is bounded (a timeout per try, no client retries): kube's
//!   client otherwise retries a 503 for minutes, and a stalled connection never answers.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use framelane_contract::backoff::{WATCH_BACKOFF_MAX, watch_backoff};
use futures::StreamExt;
use jiff::Timestamp;
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

/// Why one try of the election failed.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("the API server did not answer within {}ms", .0.as_millis())]
    TimedOut(Duration),
}

/// Another holder's Lease: its resourceVersion, when this replica saw it change to that,
/// and its duration.
struct Observed {
    version: String,
    since: Instant,
    duration: Duration,
}

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
    /// Another holder's Lease as this replica last saw it.
    observed: Mutex<Option<Observed>>,
    /// Until when this replica is a confirmed leader; `None` while it is not one.
    confirmed_until: Mutex<Option<Instant>>,
}

impl Elector {
    /// `api` should come from a client without retries and with a read timeout
    /// (see `run::election_client`): each try is bounded here too.
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
            observed: Mutex::new(None),
            confirmed_until: Mutex::new(None),
        }
    }

    /// Whether this replica leads now: its last renewal started less than the renew
    /// deadline ago. The webhook and the controllers act as leader only while this holds.
    pub fn confirmed(&self) -> bool {
        self.confirmed_until()
            .is_some_and(|until| Instant::now() < until)
    }

    /// Until when this replica is a confirmed leader, if it is one.
    pub fn confirmed_until(&self) -> Option<Instant> {
        *self.confirmed_until.lock().expect("confirmed lock")
    }

    /// How long after the start of its last successful renewal a leader stops acting: two
    /// thirds of the lease, so it has stopped well before a standby can take over.
    pub fn renew_deadline(&self) -> Duration {
        renew_deadline(self.duration)
    }

    /// The leader's webhook address, as of the last look at the Lease.
    pub fn leader_endpoint(&self) -> Option<String> {
        self.leader_endpoint.lock().expect("endpoint lock").clone()
    }

    /// Reads the Lease now and returns the leader's webhook address (for a standby that has
    /// none yet, or whose last one stopped answering).
    pub async fn refresh_leader_endpoint(&self) -> Result<Option<String>, ElectionError> {
        let endpoint = self
            .bounded(self.api.get_opt(&self.name))
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

    /// How often the leader renews (and a standby retries): a fifth of the lease, so a
    /// leader has two or three tries, each of up to twice that, before its renew deadline.
    pub fn retry_interval(&self) -> Duration {
        self.duration / 5
    }

    /// Takes or renews the Lease, within the renew deadline (a leader bounds it by its own
    /// deadline). `Ok(true)`: this replica
    /// leads, confirmed until the renew deadline from now. Every write carries the
    /// resourceVersion it read, so two replicas can never both succeed.
    pub async fn try_lead(&self) -> Result<bool, ElectionError> {
        let started = Instant::now();
        let led = self.bounded(self.try_lead_once()).await;
        if let Ok(true) = led {
            *self.confirmed_until.lock().expect("confirmed lock") =
                Some(started + self.renew_deadline());
        }
        led
    }

    async fn try_lead_once(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
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
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !mine {
            self.lose();
        }
        let held = spec.holder_identity.is_some();
        if !mine && held && !self.expired(&lease) {
            self.saw(endpoint_of(&lease));
            return Ok(false);
        }
        let spec = lease.spec.get_or_insert_with(Default::default);
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        self.publish(&mut lease.metadata);
        let written = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await;
        if matches!(&written, Err(kube::Error::Api(s)) if s.code == 409) {
            self.lose();
        }
        conflict_is_false(written)
    }

    /// Whether another holder's Lease has gone unchanged for its duration since this
    /// replica saw it change.
    fn expired(&self, lease: &Lease) -> bool {
        self.observe(lease);
        self.observed
            .lock()
            .expect("observed lock")
            .as_ref()
            .is_some_and(|o| o.since.elapsed() >= o.duration)
    }

    /// Notes another holder's Lease as seen now: a new resourceVersion (a renewal, a new
    /// holder) starts its duration again.
    fn observe(&self, lease: &Lease) {
        let Some(spec) = &lease.spec else { return };
        if spec.holder_identity.is_none()
            || spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            return;
        }
        let version = lease.resource_version().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .map_or(self.duration, |s| Duration::from_secs(s.max(0) as u64));
        let mut observed = self.observed.lock().expect("observed lock");
        if observed.as_ref().is_none_or(|o| o.version != version) {
            *observed = Some(Observed {
                version,
                since: Instant::now(),
                duration,
            });
        }
    }

    /// How long a standby waits before its next try: the retry interval, or less when the
    /// Lease it saw expires sooner.
    pub fn next_try(&self) -> Duration {
        let expires_in = self
            .observed
            .lock()
            .expect("observed lock")
            .as_ref()
            .map(|o| (o.since + o.duration).saturating_duration_since(Instant::now()));
        let soon = expires_in.map_or(Duration::MAX, |d| d + Duration::from_millis(50));
        self.retry_interval().min(soon)
    }

    /// Another replica holds the Lease, or took it: this one is no longer leader.
    fn lose(&self) {
        *self.confirmed_until.lock().expect("confirmed lock") = None;
    }

    /// `call`, or [`ElectionError::TimedOut`] after the renew deadline.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, ElectionError> {
        let limit = self.renew_deadline();
        match tokio::time::timeout(limit, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ElectionError::TimedOut(limit)),
        }
    }

    /// Notified whenever the Lease shows no holder (a leader let go on shutdown), so a
    /// standby tries at once instead of at its next retry. Every renewal the watch shows is
    /// noted as seen then, so a standby measures a dead leader's lease from its last renewal,
    /// not from its own next look. `api` is the Leases' API through the operator's usual
    /// client (a watch waits longer than the election's read timeout).
    pub fn releases(self: &Arc<Self>, api: Api<Lease>) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let leases = watcher(api, config)
            .backoff(watch_backoff(WATCH_BACKOFF_MAX))
            .applied_objects();
        let (released, elector) = (notify.clone(), self.clone());
        tokio::spawn(leases.for_each(move |lease| {
            if let Ok(lease) = lease {
                if lease
                    .spec
                    .as_ref()
                    .is_none_or(|s| s.holder_identity.is_none())
                {
                    released.notify_one();
                }
                elector.observe(&lease);
            }
            futures::future::ready(())
        }));
        notify
    }

    /// Gives the Lease up (on a clean shutdown), so a standby takes over at once.
    pub async fn release(&self) -> Result<(), ElectionError> {
        self.lose();
        if let Some(mut lease) = self.bounded(self.api.get_opt(&self.name)).await? {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                self.bounded(self.api.replace(&self.name, &PostParams::default(), &lease))
                    .await?;
            }
        }
        Ok(())
    }
}

/// How long after the start of its last successful renewal a leader stops acting, for a
/// lease of `duration`: also the longest any call of the election may take.
pub fn renew_deadline(duration: Duration) -> Duration {
    duration * 2 / 3
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
