//! A runner takes work: it watches its lane's jobs, claims the oldest queued one with a
//! resourceVersion precondition, and reports progress and the outcome, each write conditional
//! on the job still being its own. What each write says is `framelane_core::transitions`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use framelane_api::{
    VideoJob, VideoJobStatus,
    reasons::JobReason,
    videojob::{JobPhase, MemoryReport, Output, Progress},
};
use framelane_core::{claims, index::version, memory::RunnerMemory, transitions};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client, ResourceExt,
    api::PostParams,
    runtime::{WatchStreamExt, reflector, watcher},
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::sync::watch;

use crate::{
    api_errors::{is_conflict, is_not_found},
    backoff::{Backoff, WATCH_BACKOFF_MAX, watch_backoff},
    outputs::{self, Removal},
    readable::{Unreadable, WatchErrorLabels, count_watch_error, watch_readable},
};

/// The first and the longest wait between tries of a final status write.
const FINAL_RETRY_FIRST: Duration = Duration::from_millis(200);
const FINAL_RETRY_MAX: Duration = Duration::from_secs(10);

/// What can go wrong between a runner and the API server.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("the API server refused the runner's request: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "job {0} is no longer this runner's (cancelled, finished, or requeued after this runner was declared lost); stop working on it"
    )]
    Lost(String),
    #[error(
        "job {0} was deleted while its video was being finished: its files were thrown away, not published"
    )]
    Deleted(String),
    #[error("moving the job's files into place: {0}")]
    Files(#[from] std::io::Error),
}

/// One runner's side of the contract.
#[derive(Clone)]
pub struct Runner {
    pub(crate) name: String,
    pub(crate) lane: String,
    /// The uid of the runner's pod (called like the runner), when known.
    pub(crate) pod_uid: Option<String>,
    /// The `framelane.dev/memory` annotation the heartbeat carries, when the runner knows
    /// its device's memory.
    pub(crate) memory: Option<String>,
    /// The models this runner can run, when it said (see [`Runner::serving`]).
    models: Option<Vec<String>>,
    /// Drawn when the runner starts: a container restarted in the same pod is a new holder.
    nonce: String,
    pub(crate) leases: Api<Lease>,
    jobs: Api<VideoJob>,
    store: reflector::Store<VideoJob>,
    changed: watch::Receiver<()>,
    /// The output volume, once set: the files of jobs deleted meanwhile are removed from it.
    outputs: Arc<OnceLock<PathBuf>>,
    watch_errors: Family<WatchErrorLabels, Counter>,
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
        let unreadable = |u: Unreadable| {
            tracing::warn!(
                object = u.object,
                error = u.error,
                "left out a VideoJob this runner cannot read: upgrade the runner to the version that wrote it, or fix or delete the job"
            );
        };
        let stream = watch_readable::<VideoJob, _>(
            jobs.clone().into_client(),
            jobs.namespace(),
            watcher::Config::default(),
            unreadable,
        )
        .backoff(watch_backoff(WATCH_BACKOFF_MAX))
        .reflect(writer);
        let outputs = Arc::new(OnceLock::<PathBuf>::new());
        let root = outputs.clone();
        let watch_errors = Family::<WatchErrorLabels, Counter>::default();
        let errors = watch_errors.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Delete(job)) => {
                        if let Some(root) = root.get() {
                            remove_deleted(root.clone(), job);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => count_watch_error(&errors, "VideoJob", &e),
                }
                let _ = tx.send(());
            }
        });
        Runner {
            name: name.into(),
            lane: lane.into(),
            pod_uid: None,
            memory: None,
            models: None,
            nonce: format!("{:016x}", rand::random::<u64>()),
            leases: Api::namespaced(client, namespace),
            jobs,
            store,
            changed,
            outputs,
            watch_errors,
        }
    }

    /// This runner's watch errors by cause (`readable::watch_error_cause`), for its metrics.
    pub fn watch_errors(&self) -> &Family<WatchErrorLabels, Counter> {
        &self.watch_errors
    }

    /// Sets the output volume this runner writes to: the files of a job deleted from now on
    /// (by its user or its TTL) are removed from it (`outputs::remove_deleted`).
    pub fn removing_outputs_of_deleted_jobs(self, root: impl Into<PathBuf>) -> Self {
        let _ = self.outputs.set(root.into());
        self
    }

    /// Makes the runner's pod (named like the runner, in the Lease's namespace, with this
    /// uid) the owner of the heartbeat Lease, so the Lease is garbage-collected with the pod.
    pub fn owned_by_pod(mut self, uid: impl Into<String>) -> Self {
        self.pod_uid = Some(uid.into());
        self
    }

    /// Reports the runner's GPU memory and model shapes in every heartbeat, for the fit
    /// check at admission.
    pub fn reporting_memory(mut self, memory: &RunnerMemory) -> Self {
        self.memory = Some(memory.to_annotation());
        self
    }

    /// Claims only jobs of `models`: a runner started before its lane took another model
    /// (its pod about to be replaced) leaves that model's jobs queued for the runners that
    /// load it, instead of failing them.
    pub fn serving(mut self, models: impl IntoIterator<Item = String>) -> Self {
        self.models = Some(models.into_iter().collect());
        self
    }

    /// The runner's name (its pod's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which start of the runner this is: `<pod uid>/<nonce>` (the runner's name in place of
    /// the uid outside a pod). Its heartbeat Lease names it as holder and its claims record
    /// it, so the operator can tell a restarted runner from the one that claimed a job.
    pub fn incarnation(&self) -> String {
        let pod = self.pod_uid.as_deref().unwrap_or(&self.name);
        format!("{pod}/{}", self.nonce)
    }

    /// Claims the oldest Queued job of this lane, or returns `None` when there is none.
    pub async fn claim_next(&self) -> Result<Option<ClaimedJob>, ContractError> {
        let incarnation = self.incarnation();
        let serves = |job: &VideoJob| {
            self.models
                .as_ref()
                .is_none_or(|models| models.contains(&job.spec.model))
        };
        for job in claims::claim_order(self.store.state(), &self.lane) {
            if !serves(&job) {
                continue;
            }
            let api = self.api_for(&job);
            if let Some(job) = claim(&api, &job, &self.lane, &self.name, &incarnation).await? {
                return Ok(Some(ClaimedJob {
                    runner: self.clone(),
                    api,
                    job,
                }));
            }
        }
        Ok(None)
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

/// Claims `job` for runner `name` (start `incarnation`): the job as written, or `None` when
/// it is no longer claimable. A conflict means the job changed since the cache saw it (often
/// only its queue position): look again, and take it if it is still queued, so claims stay
/// FIFO. A claim whose answer was lost (the connection dropped, or a retried request found
/// its own earlier write) landed when the job reads as running under this very start: it is
/// this runner's, and left it would sit Running, its runner alive, until its deadline.
async fn claim(
    api: &Api<VideoJob>,
    job: &VideoJob,
    lane: &str,
    name: &str,
    incarnation: &str,
) -> Result<Option<VideoJob>, ContractError> {
    let mut current = job.clone();
    loop {
        let claimed = with_status(
            &current,
            transitions::claimed(&current, name, incarnation, Timestamp::now()),
        );
        let error = match api
            .replace_status(&current.name_any(), &PostParams::default(), &claimed)
            .await
        {
            Ok(job) => return Ok(Some(job)),
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => e,
        };
        match api.get_opt(&current.name_any()).await {
            Ok(Some(fresh)) if runs_under(&fresh, name, incarnation) => return Ok(Some(fresh)),
            Ok(Some(fresh)) if is_conflict(&error) && claims::claimable(&fresh, lane) => {
                current = fresh
            }
            Ok(_) if is_conflict(&error) => return Ok(None),
            _ => return Err(error.into()),
        }
    }
}

/// Whether `job` is running under runner `name` in its start `incarnation`.
fn runs_under(job: &VideoJob, name: &str, incarnation: &str) -> bool {
    job.status.as_ref().is_some_and(|s| {
        s.phase == Some(JobPhase::Running)
            && s.runner.as_deref() == Some(name)
            && s.runner_incarnation.as_deref() == Some(incarnation)
    })
}

/// Removes a deleted job's files off the async threads, logging what happened.
fn remove_deleted(root: PathBuf, job: VideoJob) {
    tokio::task::spawn_blocking(move || {
        let name = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
        match outputs::remove_deleted(&root, &job) {
            Ok(Removal::Removed) => {
                tracing::info!(job = %name, "removed the files of a deleted job")
            }
            Ok(Removal::NotItsFiles) => {}
            Err(e) => {
                tracing::warn!(job = %name, error = %e, "could not remove the files of a deleted job")
            }
        }
    });
}

fn with_status(job: &VideoJob, status: VideoJobStatus) -> VideoJob {
    VideoJob {
        status: Some(status),
        ..job.clone()
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
        runs_under(job, self.runner.name(), &self.runner.incarnation())
    }

    /// Records progress (stage and denoising step).
    pub async fn progress(
        &mut self,
        stage: &str,
        step: i32,
        total_steps: i32,
        percent: i32,
    ) -> Result<(), ContractError> {
        let progress = Progress {
            stage: Some(stage.into()),
            step,
            total_steps,
            percent,
        };
        self.update(|job| transitions::progressed(job, progress.clone()))
            .await
    }

    /// Marks the job Succeeded with its output. Final. When the job stopped being this
    /// runner's after its files were published (the operator failed it `DeadlineExceeded`
    /// meanwhile, say), the published video and preview are taken off the output volume
    /// again, when the volume is known ([`Runner::removing_outputs_of_deleted_jobs`]): no
    /// job's status names them, so nothing else would ever remove them.
    pub async fn complete(
        mut self,
        output: Output,
        memory: Option<MemoryReport>,
    ) -> Result<VideoJob, ContractError> {
        let written = self
            .finish(|job| {
                transitions::completed(job, output.clone(), memory.clone(), Timestamp::now())
            })
            .await;
        if let Err(ContractError::Lost(name)) = &written
            && let Some(root) = self.runner.outputs.get().cloned()
        {
            self.withdraw(root, &output).await;
            return Err(ContractError::Lost(name.clone()));
        }
        written?;
        Ok(self.job)
    }

    /// Removes the published files of `output` that no job names: left alone when the job,
    /// read again, names them after all (or cannot be read).
    async fn withdraw(&self, root: PathBuf, output: &Output) {
        let name = self.job.name_any();
        let named = match self.api.get_opt(&name).await {
            Ok(current) => current
                .and_then(|job| job.status)
                .and_then(|status| status.output)
                .is_some_and(|named| named.sha256 == output.sha256),
            Err(error) => {
                tracing::warn!(job = %name, %error, "cannot read the job back: its published files stay");
                return;
            }
        };
        if named {
            return;
        }
        let (job, sha256) = (self.job.clone(), output.sha256.clone());
        let removed =
            tokio::task::spawn_blocking(move || outputs::withdraw(&root, &job, &sha256)).await;
        match removed.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(Removal::Removed) => {
                tracing::warn!(job = %name, "the job stopped being this runner's after its files were published: they were removed")
            }
            Ok(Removal::NotItsFiles) => {}
            Err(error) => {
                tracing::warn!(job = %name, %error, "could not remove the files of a job no longer this runner's")
            }
        }
    }

    /// Marks the job Failed with a reason and a message saying what to do next. Final.
    pub async fn fail(
        mut self,
        reason: JobReason,
        message: &str,
        memory: Option<MemoryReport>,
    ) -> Result<VideoJob, ContractError> {
        self.finish(|job| {
            transitions::failed(job, reason, message, memory.clone(), Timestamp::now())
        })
        .await?;
        Ok(self.job)
    }

    /// Gives the job back unfinished, to its old place in the queue, because this runner is
    /// stopping (SIGTERM): another runner takes it at once instead of after this runner's
    /// heartbeat lapses. Written only while the job is still this runner's.
    pub async fn hand_back(mut self) -> Result<VideoJob, ContractError> {
        self.update(|job| transitions::handed_back(job, Timestamp::now()))
            .await?;
        Ok(self.job)
    }

    /// Where this attempt writes its files before [`ClaimedJob::publish`] moves them into
    /// place: `<root>/.staging/<job uid>-<attempt>/`, laid out like `root`.
    pub fn staging_dir(&self, root: &Path) -> PathBuf {
        outputs::staging_dir(root, &self.job)
    }

    /// Moves the attempt's `files` (relative paths) from its staging folder into `root`, after
    /// a fresh read from the API server shows the job still this runner's: a runner that was
    /// declared lost, and whose job another runner took over, has its files thrown away
    /// (`Lost`) instead of replacing the ones the job's status describes, and so has a job
    /// deleted while its video was being finished (`Deleted`): its user asked for no video.
    /// While the API server cannot be reached the read is retried with backoff, the files kept.
    pub async fn publish(&mut self, root: &Path, files: &[String]) -> Result<(), ContractError> {
        let staging = self.staging_dir(root);
        let name = self.job.name_any();
        let mut backoff = Backoff::new(FINAL_RETRY_FIRST, FINAL_RETRY_MAX);
        let (mine, deleted) = loop {
            match self.api.get_opt(&name).await {
                Ok(Some(current)) if self.is_mine(&current) => {
                    let deleted = current.metadata.deletion_timestamp.is_some();
                    self.job = current;
                    break (!deleted, deleted);
                }
                Ok(_) => break (false, false),
                Err(error) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(job = %name, %error, ?wait, "cannot confirm the job is still this runner's; keeping its files staged and retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        };
        let staged = staging.clone();
        let files = files.to_vec();
        let root = root.to_path_buf();
        let moved = tokio::task::spawn_blocking(move || {
            if mine {
                outputs::move_into_place(&staged, &root, &files)
            } else {
                outputs::discard(&staged)
            }
        })
        .await
        .map_err(std::io::Error::other)?;
        if deleted {
            tracing::info!(job = %name, "the job was deleted: its files were thrown away, not published");
            return Err(ContractError::Deleted(name));
        }
        if !mine {
            tracing::warn!(job = %name, staging = %staging.display(), "the job is no longer this runner's: its files were thrown away, not published");
            return Err(ContractError::Lost(name));
        }
        Ok(moved?)
    }

    /// Writes a final status. A refusal other than a conflict or a missing job is retried
    /// with backoff, the job read again before each try, until the write is taken or the job
    /// is no longer this runner's (the operator failed it `DeadlineExceeded`, say): a runner
    /// that finished its job must not leave it Running while it keeps heartbeating.
    async fn finish(
        &mut self,
        next: impl Fn(&VideoJob) -> VideoJobStatus,
    ) -> Result<(), ContractError> {
        let name = self.job.name_any();
        let mut backoff = Backoff::new(FINAL_RETRY_FIRST, FINAL_RETRY_MAX);
        loop {
            let error = match self.update(&next).await {
                Err(ContractError::Kube(e)) => e,
                done => return done,
            };
            let wait = backoff.next_wait();
            tracing::warn!(job = %name, %error, ?wait, "final status refused; retrying while the job is this runner's");
            tokio::time::sleep(wait).await;
            match self.api.get_opt(&name).await {
                Ok(Some(current)) if self.is_mine(&current) => self.job = current,
                Ok(_) => return Err(ContractError::Lost(name)),
                // Not reachable either: try the write again after the next wait.
                Err(_) => {}
            }
        }
    }

    /// Writes the status `next` makes of the job, with a resourceVersion precondition; on a
    /// conflict, re-reads the job and retries only while it is still this runner's.
    async fn update(
        &mut self,
        next: impl Fn(&VideoJob) -> VideoJobStatus,
    ) -> Result<(), ContractError> {
        let name = self.job.name_any();
        loop {
            let written = with_status(&self.job, next(&self.job));
            match self
                .api
                .replace_status(&name, &PostParams::default(), &written)
                .await
            {
                Ok(written) => {
                    self.job = written;
                    return Ok(());
                }
                Err(e) if is_conflict(&e) => {
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
                Err(e) if is_not_found(&e) => return Err(ContractError::Lost(name)),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http::{Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;
    use serde_json::json;

    use super::*;

    /// What becomes of the claim's write.
    #[derive(Clone, Copy)]
    enum Write {
        /// It lands, and a retry of the request is answered 409 (its own write moved the
        /// resourceVersion on).
        LandsThenConflict,
        /// It lands, and the connection drops before the answer.
        LandsThenDrops,
        /// The connection drops before it reaches the server.
        Drops,
        /// Another runner's claim landed first: 409.
        Taken,
    }

    /// An API server holding one queued job of lane `l`, answering a claim as `write` says:
    /// the API, the job as stored, and the job as the runner's cache saw it.
    fn server(write: Write) -> (Api<VideoJob>, Arc<Mutex<VideoJob>>, VideoJob) {
        let job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": "j", "namespace": "ns", "resourceVersion": "1"},
            "spec": {"model": "m", "prompt": "a fox"},
            "status": {"phase": "Queued", "lane": "l", "queuedAt": "2026-12-07T00:00:00Z"}
        }))
        .unwrap();
        let stored = Arc::new(Mutex::new(job.clone()));
        let state = stored.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let stored = state.clone();
            async move {
                let answer = |code: u16, body: serde_json::Value| {
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap()
                };
                let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "Conflict", "code": 409, "message": "the object has been modified"});
                if request.method() == http::Method::GET {
                    let job = stored.lock().unwrap().clone();
                    return Ok(answer(200, serde_json::to_value(job).unwrap()));
                }
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let mut written: VideoJob = serde_json::from_slice(&body).unwrap();
                written.metadata.resource_version = Some("2".into());
                match write {
                    Write::LandsThenConflict => {
                        *stored.lock().unwrap() = written;
                        Ok(answer(409, conflict))
                    }
                    Write::LandsThenDrops => {
                        *stored.lock().unwrap() = written;
                        Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
                    }
                    Write::Drops => Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                    Write::Taken => {
                        let mut status = written.status.clone().unwrap();
                        status.runner = Some("other-0".into());
                        status.runner_incarnation = Some("other/1".into());
                        written.status = Some(status);
                        *stored.lock().unwrap() = written;
                        Ok(answer(409, conflict))
                    }
                }
            }
        });
        let api = Api::namespaced(Client::new(service, "ns"), "ns");
        (api, stored, job)
    }

    #[tokio::test]
    async fn a_claim_whose_answer_was_lost_is_this_runners_when_it_landed() {
        for write in [Write::LandsThenConflict, Write::LandsThenDrops] {
            let (api, stored, job) = server(write);
            let claimed = claim(&api, &job, "l", "r-0", "uid/7")
                .await
                .unwrap()
                .expect("the landed claim is the runner's");
            let status = claimed.status.unwrap();
            assert_eq!(status.phase, Some(JobPhase::Running));
            assert_eq!(
                (
                    status.runner.as_deref(),
                    status.runner_incarnation.as_deref()
                ),
                (Some("r-0"), Some("uid/7"))
            );
            assert_eq!(claimed.metadata.resource_version.as_deref(), Some("2"));
            assert_eq!(
                stored.lock().unwrap().status.as_ref().unwrap().phase,
                Some(JobPhase::Running)
            );
        }
    }

    #[tokio::test]
    async fn a_claim_that_did_not_land_is_not_taken_for_one_that_did() {
        let (api, stored, job) = server(Write::Drops);
        let error = claim(&api, &job, "l", "r-0", "uid/7").await.unwrap_err();
        assert!(matches!(error, ContractError::Kube(_)), "{error}");
        assert_eq!(
            stored.lock().unwrap().status.as_ref().unwrap().phase,
            Some(JobPhase::Queued)
        );
        // Another runner's claim landed first: not this one's.
        let (api, _, job) = server(Write::Taken);
        assert!(
            claim(&api, &job, "l", "r-0", "uid/7")
                .await
                .unwrap()
                .is_none()
        );
    }
}
