//! Whole jobs on CPU: MP4 + preview output, determinism, ffprobe's view of the file,
//! cancellation at a step boundary, bad requests, and the memory report.

mod common;

use std::path::Path;

use framelane_api::reasons::JobReason;
use framelane_runner::generate::{JobError, JobOutcome, Progress, Stage, run_job};
use framelane_runner::package::ModelPackage;
use framelane_runner::sampler::StepControl;
use sha2::{Digest, Sha256};

fn run(pkg: &ModelPackage, out: &Path, job: &framelane_runner::generate::JobRequest) -> JobOutcome {
    run_job(pkg, &common::cpu(), job, out, |_| StepControl::Continue)
}

#[test]
fn same_seed_gives_a_byte_identical_mp4_with_every_frame() {
    let device = common::cpu();
    let pkg = ModelPackage::load(&common::anisora(), device.device, Some(8)).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut steps_seen = Vec::new();
    let first = run_job(
        &pkg,
        &device,
        &common::job("fox-a", 7),
        out.path(),
        |p: &Progress| {
            if p.stage == Stage::Denoising {
                steps_seen.push(p.step);
            }
            StepControl::Continue
        },
    );
    let a = first.result.unwrap();
    assert_eq!(steps_seen, (1..=8).collect::<Vec<_>>());
    let b = run(&pkg, out.path(), &common::job("fox-b", 7))
        .result
        .unwrap();
    let c = run(&pkg, out.path(), &common::job("fox-c", 8))
        .result
        .unwrap();

    assert_eq!(a.path, "default/fox-a/video.mp4");
    let bytes_a = std::fs::read(out.path().join(&a.path)).unwrap();
    let bytes_b = std::fs::read(out.path().join(&b.path)).unwrap();
    assert_eq!(bytes_a, bytes_b, "same seed must give the same bytes");
    assert_eq!(a.sha256, b.sha256);
    assert_ne!(a.sha256, c.sha256, "another seed must give another video");
    assert_eq!(a.size_bytes, bytes_a.len() as u64);
    assert_eq!(a.sha256, hex::encode(Sha256::digest(&bytes_a)));
    assert_eq!((a.frames, a.fps, a.width, a.height), (9, 16, 32, 32));

    let png = std::fs::File::open(out.path().join(&a.preview_path)).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(png))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (32, 32));
    assert!(buf.iter().any(|&v| v != buf[0]), "preview is a flat image");

    let memory = first.memory.unwrap();
    assert_eq!(memory.status.device, "cpu");
    assert!(memory.status.peak_allocated_bytes >= memory.status.after_cleanup_allocated_bytes);
    assert!(memory.status.peak_allocated_bytes > 0);
    assert_eq!(memory.ooms, 0);
}

#[test]
fn ffprobe_sees_h264_with_the_requested_frames_fps_and_duration() {
    let device = common::cpu();
    let pkg = ModelPackage::load(&common::phr00t(), device.device, Some(4)).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut job = common::job("probe", 3);
    job.frames = 17;
    job.fps = Some(8);
    job.width = 48;
    let video = run(&pkg, out.path(), &job).result.unwrap();
    let probe = common::ffprobe(&out.path().join(&video.path))
        .expect("ffprobe is missing: install it (apt-get install ffmpeg); .ci/run does");
    let stream = &probe["streams"][0];
    assert_eq!(stream["codec_name"], "h264");
    assert_eq!(stream["width"], 48);
    assert_eq!(stream["height"], 32);
    assert_eq!(stream["nb_read_frames"], "17");
    assert_eq!(stream["r_frame_rate"], "8/1");
    let duration: f64 = probe["format"]["duration"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((duration - 17.0 / 8.0).abs() < 1e-3, "duration {duration}");
}

#[test]
fn cancelling_stops_at_a_step_boundary_and_the_runner_carries_on() {
    let device = common::cpu();
    let pkg = ModelPackage::load(&common::anisora(), device.device, None).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut last_step = 0;
    let cancelled = run_job(
        &pkg,
        &device,
        &common::job("cancel", 1),
        out.path(),
        |p: &Progress| {
            assert_ne!(p.stage, Stage::Decoding, "decoded after cancel");
            last_step = p.step;
            if p.stage == Stage::Denoising && p.step == 3 {
                StepControl::Cancel
            } else {
                StepControl::Continue
            }
        },
    );
    let err = cancelled.result.unwrap_err();
    assert!(
        matches!(
            err,
            JobError::Cancelled {
                completed: 3,
                total: 8
            }
        ),
        "{err}"
    );
    assert_eq!(err.reason(), JobReason::Cancelled);
    assert_eq!(last_step, 3);
    assert!(!out.path().join("default/cancel/video.mp4").exists());
    assert!(cancelled.memory.is_ok());

    let next = run(&pkg, out.path(), &common::job("after-cancel", 1));
    assert!(next.result.is_ok(), "{:?}", next.result);
}

#[test]
fn bad_requests_are_rejected_with_the_field() {
    let device = common::cpu();
    let pkg = ModelPackage::load(&common::phr00t(), device.device, None).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut frames = common::job("bad-frames", 1);
    frames.frames = 6;
    let err = run(&pkg, out.path(), &frames).result.unwrap_err();
    assert!(
        err.to_string()
            .contains("`frames` must be of the form 4k+1"),
        "{err}"
    );
    assert!(matches!(err, JobError::InvalidRequest { .. }), "{err:?}");
    assert_eq!(err.reason(), JobReason::GenerationFailed);

    let mut width = common::job("bad-width", 1);
    width.width = 30;
    let err = run(&pkg, out.path(), &width).result.unwrap_err();
    assert!(err.to_string().contains("`width`"), "{err}");

    let escape = common::job("../../etc", 1);
    let err = run(&pkg, out.path(), &escape).result.unwrap_err();
    assert!(matches!(err, JobError::Output(_)), "{err:?}");
}
