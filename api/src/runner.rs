//! The runner contract: how a runner announces itself and takes work, shared by the runner
//! binary, the operator (which reads the heartbeats) and the tests (which play runners).
//!
//! - A runner renews a heartbeat `Lease` (holder = its pod name, the loaded model in an
//!   annotation) every few seconds. A lane is available while one of its runners is fresh.
//!   When the runner knows its pod's uid, the pod owns the Lease, so the garbage collector
//!   removes the Lease with the pod.
//! - Jobs are a durable queue in the API server. A runner claims the oldest Queued job of
//!   its lane with a resourceVersion precondition, so no job runs twice.
//! - Every later write checks that the job is still this runner's and still Running, so a
//!   runner that was declared lost can never overwrite what happened since, and nothing
//!   overwrites Succeeded or Failed.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::watch;

use crate::{
    VideoJob,
    videojob::{JobPhase, MemoryReport, Output, Progress, VideoJobStatus},
    wellknown::{ANNOTATION_LOADED_MODEL, LABEL_LANE, LABEL_RUNNER, Reason, job_condition},
};

/// How long a heartbeat stays fresh without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often a runner renews its heartbeat.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(3);

/// What can go wrong between a runner and the API server.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("the API server refused the runner's request: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "job {0} is no longer this runner's (cancelled, finished, or requeued after this runner was declared lost); stop working on it"
    )]
    Lost(String),
}

/// When a heartbeat Lease stops being fresh.
pub fn fresh_until(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0;
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    renewed
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .ok()
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

/// The FIFO key of a queued job: admission time, then namespace and name.
pub fn queue_key(job: &VideoJob) -> (Option<Timestamp>, String, String) {
    let queued = job
        .status
        .as_ref()
        .and_then(|s| s.queued_at.as_ref())
        .map(|t| t.0);
    (queued, job.namespace().unwrap_or_default(), job.name_any())
}

/// A condition with `lastTransitionTime` kept when the status did not flip.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" };
    let now = Time(Timestamp::now());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.into();
            c.reason = reason.as_str().into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.as_str().into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

/// One runner's side of the contract.
#[derive(Clone)]
pub struct Runner {
    name: String,
    lane: String,
    /// The uid of the runner's pod (called like the runner), when known.
    pod_uid: Option<String>,
    leases: Api<Lease>,
    jobs: Api<VideoJob>,
    store: reflector::Store<VideoJob>,
    changed: watch::Receiver<()>,
}

impl Runner {
    /// Starts watching the jobs of `lane` (in `jobs`' scope) for a runner called `name` whose
    /// heartbeat Lease lives in `namespace`.
    pub fn start(
        client: Client,
        namespace: &str,
        name: &str,
        lane: &str,
        jobs: Api<VideoJob>,
    ) -> Self {
        let (store, writer) = reflector::store();
        let (tx, changed) = watch::channel(());
        let stream = watcher(jobs.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watching VideoJobs failed; retrying");
                }
                let _ = tx.send(());
            }
        });
        Runner {
            name: name.into(),
            lane: lane.into(),
            pod_uid: None,
            leases: Api::namespaced(client, namespace),
            jobs,
            store,
            changed,
        }
    }

    /// Makes the runner's pod (named like the runner, in the Lease's namespace, with this
    /// uid) the owner of the heartbeat Lease, so the Lease is garbage-collected with the pod.
    pub fn owned_by_pod(mut self, uid: impl Into<String>) -> Self {
        self.pod_uid = Some(uid.into());
        self
    }

    /// The runner's name (its pod's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates or renews the heartbeat Lease, recording the loaded model.
    pub async fn heartbeat(&self, loaded_model: Option<&str>) -> Result<(), ContractError> {
        let now = MicroTime(Timestamp::now());
        let mut annotations = std::collections::BTreeMap::new();
        if let Some(model) = loaded_model {
            annotations.insert(ANNOTATION_LOADED_MODEL.to_string(), model.to_string());
        }
        match self.leases.get_opt(&self.name).await? {
            Some(mut lease) => {
                lease.metadata.annotations = Some(annotations);
                lease.metadata.owner_references = pod_owned(
                    lease.metadata.owner_references.take(),
                    &self.name,
                    self.pod_uid.as_deref(),
                );
                let spec = lease.spec.get_or_insert_with(Default::default);
                spec.holder_identity = Some(self.name.clone());
                spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
                spec.renew_time = Some(now);
                self.leases
                    .replace(&self.name, &PostParams::default(), &lease)
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
                        annotations: Some(annotations),
                        owner_references: pod_owned(None, &self.name, self.pod_uid.as_deref()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.name.clone()),
                        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
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
                if let Err(e) = runner.heartbeat(loaded.as_deref()).await {
                    tracing::warn!(error = %e, runner = runner.name, "heartbeat renewal failed");
                }
                tokio::time::sleep(RENEW_INTERVAL).await;
            }
        }))
    }

    /// Claims the oldest Queued job of this lane, or returns `None` when there is none.
    pub async fn claim_next(&self) -> Result<Option<ClaimedJob>, ContractError> {
        let mut queued: Vec<Arc<VideoJob>> = self
            .store
            .state()
            .into_iter()
            .filter(|j| self.claimable(j))
            .collect();
        queued.sort_by_key(|j| queue_key(j));
        for job in queued {
            let api = self.api_for(&job);
            let mut current = (*job).clone();
            // A conflict means the job changed since the cache saw it (often only its queue
            // position): look again, and take it if it is still queued, so claims stay FIFO.
            loop {
                match api
                    .replace_status(
                        &current.name_any(),
                        &PostParams::default(),
                        &self.claimed(&current),
                    )
                    .await
                {
                    Ok(job) => {
                        return Ok(Some(ClaimedJob {
                            runner: self.clone(),
                            api,
                            job,
                        }));
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        match api.get_opt(&current.name_any()).await? {
                            Some(fresh) if self.claimable(&fresh) => current = fresh,
                            _ => break,
                        }
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(None)
    }

    fn claimable(&self, job: &VideoJob) -> bool {
        let s = job.status.as_ref();
        job.metadata.deletion_timestamp.is_none()
            && s.and_then(|s| s.lane.as_deref()) == Some(&self.lane)
            && s.and_then(|s| s.phase) == Some(JobPhase::Queued)
    }

    /// The job as this runner claims it: Running, with this runner's name.
    fn claimed(&self, job: &VideoJob) -> VideoJob {
        let mut claimed = job.clone();
        let status = claimed.status.get_or_insert_with(Default::default);
        status.phase = Some(JobPhase::Running);
        status.runner = Some(self.name.clone());
        status.started_at = Some(MicroTime(Timestamp::now()));
        status.attempts = Some(status.attempts.unwrap_or(0) + 1);
        status.queue_position = None;
        status.reason = Some(Reason::Started.as_str().into());
        status.message = Some(format!("runner {} started the job", self.name));
        let generation = job.metadata.generation;
        set_condition(
            &mut status.conditions,
            job_condition::RUNNING,
            true,
            Reason::Started,
            &format!("runner {}", self.name),
            generation,
        );
        claimed
    }

    /// Waits until the job cache changes (or `max` passes), so an idle runner does not spin.
    pub async fn wait_for_change(&mut self, max: Duration) {
        let _ = tokio::time::timeout(max, self.changed.changed()).await;
    }

    fn api_for(&self, job: &VideoJob) -> Api<VideoJob> {
        Api::namespaced(
            self.jobs.clone().into_client(),
            &job.namespace().unwrap_or_default(),
        )
    }
}

/// A resourceVersion as a number, to tell an older cached copy from a newer one. The API
/// server's resourceVersions are etcd revisions, which only grow.
fn version(job: &VideoJob) -> u64 {
    job.resource_version()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Stops the heartbeat when dropped.
pub struct HeartbeatHandle(tokio::task::JoinHandle<()>);

impl Drop for HeartbeatHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A job this runner claimed. Every write is conditional on it still being this runner's.
pub struct ClaimedJob {
    runner: Runner,
    api: Api<VideoJob>,
    job: VideoJob,
}

impl ClaimedJob {
    /// The job as last written by this runner.
    pub fn job(&self) -> &VideoJob {
        &self.job
    }

    /// Whether the job was deleted (cancelled) or taken away from this runner. Cheap: reads
    /// the runner's watch cache.
    pub fn is_cancelled(&self) -> bool {
        let key = reflector::ObjectRef::from_obj(&self.job);
        match self.runner.store.get(&key) {
            None => true,
            Some(seen) if seen.metadata.deletion_timestamp.is_some() => true,
            // The cache has not caught up with this runner's own last write yet.
            Some(seen) if version(&seen) < version(&self.job) => false,
            Some(seen) => !self.is_mine(&seen),
        }
    }

    fn is_mine(&self, job: &VideoJob) -> bool {
        let s = job.status.as_ref();
        s.and_then(|s| s.phase) == Some(JobPhase::Running)
            && s.and_then(|s| s.runner.as_deref()) == Some(self.runner.name())
    }

    /// Records progress (stage and denoising step).
    pub async fn progress(
        &mut self,
        stage: &str,
        step: i32,
        total_steps: i32,
        percent: i32,
    ) -> Result<(), ContractError> {
        self.update(|s| {
            s.progress = Some(Progress {
                stage: Some(stage.into()),
                step,
                total_steps,
                percent: percent.min(100),
            });
        })
        .await
    }

    /// Marks the job Succeeded with its output. Final.
    pub async fn complete(
        mut self,
        output: Output,
        memory: Option<MemoryReport>,
    ) -> Result<VideoJob, ContractError> {
        let runner = self.runner.name.clone();
        self.update(|s| {
            let total = s
                .progress
                .as_ref()
                .map(|p| p.total_steps)
                .unwrap_or_default();
            s.progress = Some(Progress {
                stage: Some("Done".into()),
                step: total,
                total_steps: total,
                percent: 100,
            });
            s.phase = Some(JobPhase::Succeeded);
            s.finished_at = Some(MicroTime(Timestamp::now()));
            s.output = Some(output.clone());
            s.memory = memory.clone();
            s.reason = Some(Reason::Completed.as_str().into());
            s.message = Some(format!("runner {runner} generated the video"));
            set_condition(
                &mut s.conditions,
                job_condition::RUNNING,
                false,
                Reason::Completed,
                "finished",
                None,
            );
            set_condition(
                &mut s.conditions,
                job_condition::COMPLETE,
                true,
                Reason::Completed,
                "the video is at status.output.path",
                None,
            );
        })
        .await?;
        Ok(self.job)
    }

    /// Marks the job Failed with a reason and a message saying what to do next. Final.
    pub async fn fail(
        mut self,
        reason: Reason,
        message: &str,
        memory: Option<MemoryReport>,
    ) -> Result<VideoJob, ContractError> {
        self.update(|s| {
            s.phase = Some(JobPhase::Failed);
            s.finished_at = Some(MicroTime(Timestamp::now()));
            s.memory = memory.clone();
            s.reason = Some(reason.as_str().into());
            s.message = Some(message.into());
            set_condition(
                &mut s.conditions,
                job_condition::RUNNING,
                false,
                reason,
                message,
                None,
            );
            set_condition(
                &mut s.conditions,
                job_condition::FAILED,
                true,
                reason,
                message,
                None,
            );
        })
        .await?;
        Ok(self.job)
    }

    /// Applies `change` to the status with a resourceVersion precondition; on a conflict,
    /// re-reads the job and retries only while it is still this runner's.
    async fn update(&mut self, change: impl Fn(&mut VideoJobStatus)) -> Result<(), ContractError> {
        let name = self.job.name_any();
        loop {
            let mut next = self.job.clone();
            change(next.status.get_or_insert_with(Default::default));
            match self
                .api
                .replace_status(&name, &PostParams::default(), &next)
                .await
            {
                Ok(written) => {
                    self.job = written;
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let current = self
                        .api
                        .get_opt(&name)
                        .await?
                        .ok_or_else(|| ContractError::Lost(name.clone()))?;
                    if !self.is_mine(&current) {
                        return Err(ContractError::Lost(name));
                    }
                    self.job = current;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return Err(ContractError::Lost(name)),
                Err(e) => return Err(e.into()),
            }
        }
    }
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
