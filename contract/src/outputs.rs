//! A job's files on the output volume: `<root>/<namespace>/<name>/video.mp4` and
//! `preview.png`. A runner writes them under an attempt's own staging folder
//! (`<root>/.staging/<job uid>-<attempt>/`, same layout) and moves them into place only after
//! the API server confirmed that the job is still its own ([`crate::ClaimedJob::publish`]),
//! so a runner declared lost that finishes late cannot replace the files of the attempt that
//! took its job over. A deleted job's files are removed by the runners that see the delete
//! ([`remove_deleted`]), only while they are still the ones its status describes.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use framelane_api::VideoJob;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

pub const VIDEO_FILE: &str = "video.mp4";
pub const PREVIEW_FILE: &str = "preview.png";
/// The folder of the output volume that holds the attempts' staging folders.
pub const STAGING_DIR: &str = ".staging";

/// `<namespace>/<name>` of a job, relative to the output root; `None` for a name that is
/// not a plain path segment (the API server allows none, but the runner does not rely on it).
pub fn job_dir(namespace: &str, name: &str) -> Option<PathBuf> {
    let plain = |s: &str| !s.is_empty() && !s.starts_with('.') && !s.contains(['/', '\\']);
    (plain(namespace) && plain(name)).then(|| Path::new(namespace).join(name))
}

/// The staging folder of one attempt of `job` under `root`.
pub fn staging_dir(root: &Path, job: &VideoJob) -> PathBuf {
    let uid = job.uid().unwrap_or_default();
    let attempt = job.status.as_ref().and_then(|s| s.attempts).unwrap_or(0);
    root.join(STAGING_DIR).join(format!("{uid}-{attempt}"))
}

/// Moves `files` (paths relative to both folders) from `staging` into `root`, each with one
/// rename, then removes the staging folder.
pub(crate) fn move_into_place(staging: &Path, root: &Path, files: &[String]) -> io::Result<()> {
    for file in files {
        let (from, to) = (staging.join(file), root.join(file));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&from, &to).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{} -> {}: {e}", from.display(), to.display()),
            )
        })?;
    }
    discard(staging)
}

/// Removes a staging folder and what is in it (nothing to do when it is gone).
pub fn discard(staging: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(staging) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What [`remove_deleted`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    /// The job's video and preview were removed.
    Removed,
    /// The video in the job's folder is not the one its status describes (a job re-created
    /// under the same name wrote it), or the job never wrote one: left alone.
    NotItsFiles,
}

/// Removes the files of a deleted `job` under `root`: its video and preview when the video's
/// sha256 is the one in the job's status, its attempts' staging folders, and its folder once
/// empty. Reads the video to hash it: call it off the async threads.
pub fn remove_deleted(root: &Path, job: &VideoJob) -> io::Result<Removal> {
    let Some(dir) = job_dir(&job.namespace().unwrap_or_default(), &job.name_any()) else {
        return Ok(Removal::NotItsFiles);
    };
    if let Some(uid) = job.uid() {
        remove_staging_of(root, &uid)?;
    }
    let expected = job
        .status
        .as_ref()
        .and_then(|s| s.output.as_ref())
        .map(|o| o.sha256.as_str());
    remove_video(&root.join(dir), expected)
}

/// Removes the video (and preview, and folder once empty) published for `job` that its status
/// does not name, while the video there is still the one with `sha256`. Reads the video to
/// hash it: call it off the async threads.
pub fn withdraw(root: &Path, job: &VideoJob, sha256: &str) -> io::Result<Removal> {
    match job_dir(&job.namespace().unwrap_or_default(), &job.name_any()) {
        Some(dir) => remove_video(&root.join(dir), Some(sha256)),
        None => Ok(Removal::NotItsFiles),
    }
}

/// Removes the video and preview in a job's folder `dir` when the video's sha256 is
/// `expected`, then the folder once empty (a re-created job's files stay).
fn remove_video(dir: &Path, expected: Option<&str>) -> io::Result<Removal> {
    let video = dir.join(VIDEO_FILE);
    let removal = match (expected, sha256_of(&video)?) {
        (Some(expected), Some(found)) if expected == found => {
            std::fs::remove_file(&video)?;
            remove_if_present(&dir.join(PREVIEW_FILE))?;
            Removal::Removed
        }
        _ => Removal::NotItsFiles,
    };
    let _ = std::fs::remove_dir(dir);
    Ok(removal)
}

fn remove_staging_of(root: &Path, uid: &str) -> io::Result<()> {
    let entries = match std::fs::read_dir(root.join(STAGING_DIR)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let prefix = format!("{uid}-");
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            discard(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Lower-case hex SHA-256 of a file, `None` when there is no such file.
pub fn sha256_of(path: &Path) -> io::Result<Option<String>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(Some(hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use framelane_api::{VideoJobStatus, videojob::Output};

    fn job(uid: &str, sha256: Option<&str>) -> VideoJob {
        let mut job: VideoJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": "fox", "namespace": "team", "uid": uid},
            "spec": {"model": "anisora", "prompt": "a fox"}
        }))
        .unwrap();
        job.status = Some(VideoJobStatus {
            attempts: Some(2),
            output: sha256.map(|sha256| Output {
                sha256: sha256.into(),
                ..Output::default()
            }),
            ..VideoJobStatus::default()
        });
        job
    }

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_deleted_jobs_files_go_only_while_they_are_the_ones_its_status_describes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("team/fox");
        write(&dir.join(VIDEO_FILE), b"video of the first fox");
        write(&dir.join(PREVIEW_FILE), b"png");
        let sha = sha256_of(&dir.join(VIDEO_FILE)).unwrap().unwrap();
        let stale = staging_dir(root.path(), &job("uid-1", None));
        write(
            &stale.join("team/fox").join(VIDEO_FILE),
            b"a lost attempt's video",
        );

        // A job of that name whose video is another one (re-created, then deleted).
        let other = job("uid-2", Some(&"0".repeat(64)));
        assert_eq!(
            remove_deleted(root.path(), &other).unwrap(),
            Removal::NotItsFiles
        );
        assert!(dir.join(VIDEO_FILE).exists() && stale.exists());

        let first = job("uid-1", Some(&sha));
        assert_eq!(
            remove_deleted(root.path(), &first).unwrap(),
            Removal::Removed
        );
        assert!(!dir.exists(), "the job's folder stays: {}", dir.display());
        assert!(!stale.exists(), "its staging folder stays");
        assert!(root.path().join("team").exists());
    }

    #[test]
    fn names_that_are_not_one_plain_segment_have_no_folder() {
        assert_eq!(job_dir("team", "fox"), Some(PathBuf::from("team/fox")));
        for (ns, name) in [("team", ".."), ("..", "fox"), ("team", "a/b"), ("", "fox")] {
            assert_eq!(job_dir(ns, name), None, "{ns:?}/{name:?}");
        }
    }
}
