//! End-to-end suites live in tests/; this library holds what more than one of them needs.

use anyhow::{Result, bail};
use framelane_api::{VideoJob, videojob::JobPhase};
use framelane_testenv::eventually;
use kube::Api;

/// Waits up to `secs` until every job in `names` has Succeeded, and returns them in that
/// order. A job that Failed ends the wait with its status, and so does an error from `check`,
/// which runs at every look (to see that a process the test plays is still alive, say).
pub async fn until_succeeded(
    jobs: &Api<VideoJob>,
    names: &[impl AsRef<str>],
    secs: u64,
    check: impl Fn() -> Result<()>,
) -> Result<Vec<VideoJob>> {
    eventually(
        secs,
        &format!("{} jobs to succeed", names.len()),
        || async {
            let mut done = Vec::new();
            for name in names.iter().map(AsRef::as_ref) {
                let job = jobs.get(name).await?;
                match job.status.as_ref().and_then(|s| s.phase) {
                    Some(JobPhase::Succeeded) => done.push(job),
                    Some(JobPhase::Failed) => bail!("job {name} failed: {:?}", job.status),
                    _ => {}
                }
            }
            check()?;
            Ok((done.len() == names.len()).then_some(done))
        },
    )
    .await
}
