//! A runner's heartbeat: a `Lease` named after its pod and held by the runner's current start
//! (`Runner::incarnation`), renewed every [`RENEW_INTERVAL`], fresh for [`LEASE_DURATION`],
//! with the model it has loaded and its GPU memory (for the fit check) in annotations.

use std::time::Duration;

use framelane_api::wellknown::{
    ANNOTATION_LOADED_MODEL, ANNOTATION_MEMORY, LABEL_LANE, LABEL_RUNNER,
};
use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference},
};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use tokio::sync::watch;

use crate::{
    backoff::jittered,
    claim::{ContractError, Runner},
};

/// How long a heartbeat stays fresh without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often a runner renews its heartbeat.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(3);
/// How long one renewal may take before it is given up and tried again: a request the API
/// server holds (etcd down: it waits up to its own 60 s request timeout) must not stop the
/// renewals that would succeed once it is back.
pub const RENEW_TIMEOUT: Duration = Duration::from_secs(5);

impl Runner {
    /// Creates or renews the heartbeat Lease, recording the loaded model.
    pub async fn heartbeat(&self, loaded_model: Option<&str>) -> Result<(), ContractError> {
        let now = MicroTime(Timestamp::now());
        let seconds = LEASE_DURATION.as_secs() as i32;
        let incarnation = self.incarnation();
        match self.leases.get_opt(&self.name).await? {
            Some(mut lease) => {
                lease.metadata.owner_references = pod_owned(
                    lease.metadata.owner_references.take(),
                    &self.name,
                    self.pod_uid.as_deref(),
                );
                let spec = lease.spec.get_or_insert_with(Default::default);
                // A new start of the runner takes the Lease over, as a new holder.
                if spec.holder_identity.as_deref() != Some(incarnation.as_str()) {
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.holder_identity = Some(incarnation);
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(now);
                // A patch without a resourceVersion: the Lease is this runner's alone, and
                // right after etcd comes back the API server may answer the read above from
                // its stale cache, which would make a conditional write conflict every time.
                // A merge patch keeps a key it leaves out: one with no value is sent as null,
                // which removes it (a model unloaded since the last renewal).
                let patch = serde_json::json!({
                    "metadata": {
                        "annotations": {
                            ANNOTATION_LOADED_MODEL: loaded_model,
                            ANNOTATION_MEMORY: self.memory,
                        },
                        "ownerReferences": lease.metadata.owner_references,
                    },
                    "spec": lease.spec,
                });
                self.leases
                    .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        labels: Some(
                            [
                                (LABEL_LANE.into(), self.lane.clone()),
                                (LABEL_RUNNER.into(), "true".into()),
                            ]
                            .into(),
                        ),
                        annotations: Some(
                            [
                                (ANNOTATION_LOADED_MODEL, loaded_model.map(str::to_owned)),
                                (ANNOTATION_MEMORY, self.memory.clone()),
                            ]
                            .into_iter()
                            .filter_map(|(key, value)| Some((key.to_owned(), value?)))
                            .collect(),
                        ),
                        owner_references: pod_owned(None, &self.name, self.pod_uid.as_deref()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(incarnation),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        ..Default::default()
                    }),
                };
                self.leases.create(&PostParams::default(), &lease).await?;
            }
        }
        Ok(())
    }

    /// Renews the heartbeat every [`RENEW_INTERVAL`] until the returned handle is dropped.
    /// `model` is read at each renewal, so a Shared runner can report switches.
    pub fn keep_alive(&self, model: watch::Receiver<Option<String>>) -> HeartbeatHandle {
        let runner = self.clone();
        HeartbeatHandle(tokio::spawn(async move {
            loop {
                let loaded = model.borrow().clone();
                match tokio::time::timeout(RENEW_TIMEOUT, runner.heartbeat(loaded.as_deref())).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, runner = runner.name, "heartbeat renewal failed")
                    }
                    Err(_) => tracing::warn!(
                        runner = runner.name,
                        "heartbeat renewal got no answer within {RENEW_TIMEOUT:?}; trying again"
                    ),
                }
                tokio::time::sleep(jittered(RENEW_INTERVAL)).await;
            }
        }))
    }
}

/// Stops the heartbeat when dropped.
pub struct HeartbeatHandle(tokio::task::JoinHandle<()>);

impl Drop for HeartbeatHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A heartbeat Lease's owner references: the runner's pod `name` with `uid`, when known
/// (replacing a reference to an earlier pod of that name), and whatever else owns it.
fn pod_owned(
    current: Option<Vec<OwnerReference>>,
    name: &str,
    uid: Option<&str>,
) -> Option<Vec<OwnerReference>> {
    let Some(uid) = uid else {
        return current;
    };
    let mut owners: Vec<OwnerReference> = current
        .unwrap_or_default()
        .into_iter()
        .filter(|o| !(o.api_version == "v1" && o.kind == "Pod"))
        .collect();
    owners.push(OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: name.into(),
        uid: uid.into(),
        ..Default::default()
    });
    Some(owners)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(api_version: &str, kind: &str, name: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: api_version.into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_pod_owns_the_heartbeat_once_its_uid_is_known() {
        assert_eq!(pod_owned(None, "r-0", None), None);
        let other = owner("example.com/v1", "Thing", "t", "u-t");
        assert_eq!(
            pod_owned(Some(vec![other.clone()]), "r-0", None),
            Some(vec![other.clone()]),
            "without a uid the owners stay as they are"
        );
        assert_eq!(
            pod_owned(None, "r-0", Some("u-1")),
            Some(vec![owner("v1", "Pod", "r-0", "u-1")])
        );
        // A pod of the same name that replaced an earlier one takes over its Lease.
        let earlier = owner("v1", "Pod", "r-0", "u-0");
        assert_eq!(
            pod_owned(Some(vec![earlier, other.clone()]), "r-0", Some("u-1")),
            Some(vec![other, owner("v1", "Pod", "r-0", "u-1")])
        );
    }
}
