//! Whole jobs on the tiny default models (anisora: image to video; phr00t: text to video):
//! MP4 + preview output, determinism, ffprobe's view of the file, cancellation at a step
//! boundary, bad requests and bad start images, and the memory report.

mod common;

use std::path::Path;

use framelane_api::reasons::JobReason;
use framelane_runner::generate::{JobError, JobOutcome, JobRequest, Progress, Stage, run_job};
use framelane_runner::sampler::StepControl;
use framelane_runner::wan::pipeline::{Mode, Precision, WanPipeline};
use sha2::{Digest, Sha256};

fn load(model: &str) -> WanPipeline {
    let device = common::device();
    WanPipeline::load(
        &common::model(model).spec,
        Precision::FLOAT32,
        device.device,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn run(pipeline: &mut WanPipeline, out: &Path, job: &JobRequest) -> JobOutcome {
    run_job(pipeline, &common::device(), job, out, |_| {
        StepControl::Continue
    })
}

#[test]
fn same_seed_gives_a_byte_identical_mp4_with_every_frame() {
    let device = common::device();
    let mut pipeline = load("anisora");
    let out = tempfile::tempdir().unwrap();
    let mut stages = Vec::new();
    let first = run_job(
        &mut pipeline,
        &device,
        &common::job("anisora", "fox-a", 7),
        out.path(),
        |p: &Progress| {
            stages.push((p.stage, p.step));
            StepControl::Continue
        },
    );
    let a = first.result.unwrap();
    let denoised: Vec<u32> = stages
        .iter()
        .filter(|(s, _)| *s == Stage::Denoising)
        .map(|(_, step)| *step)
        .collect();
    assert_eq!(denoised, (1..=8).collect::<Vec<_>>());
    assert_eq!(stages.first(), Some(&(Stage::EncodingPrompt, 0)));
    assert_eq!(stages.last(), Some(&(Stage::Encoding, 0)));
    let b = run(
        &mut pipeline,
        out.path(),
        &common::job("anisora", "fox-b", 7),
    )
    .result
    .unwrap();
    let c = run(
        &mut pipeline,
        out.path(),
        &common::job("anisora", "fox-c", 8),
    )
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
    assert_eq!(memory.status.device, device.name());
    assert!(memory.status.peak_allocated_bytes >= memory.status.after_cleanup_allocated_bytes);
    assert!(memory.status.peak_allocated_bytes > 0);
    assert_eq!(memory.ooms, 0);
}

#[test]
fn another_start_image_gives_another_video() {
    let mut pipeline = load("anisora");
    let out = tempfile::tempdir().unwrap();
    let original = run(&mut pipeline, out.path(), &common::job("anisora", "a", 1))
        .result
        .unwrap();
    let mut job = common::job("anisora", "b", 1);
    let mut flat = Vec::new();
    let mut encoder = png::Encoder::new(&mut flat, 16, 16);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&[200u8; 16 * 16 * 3]).unwrap();
    writer.finish().unwrap();
    job.image = Some(flat);
    let other = run(&mut pipeline, out.path(), &job).result.unwrap();
    assert_ne!(
        original.sha256, other.sha256,
        "the start image made no difference"
    );
}

#[test]
fn ffprobe_sees_h264_with_the_requested_frames_fps_and_duration() {
    let mut pipeline = load("phr00t");
    let out = tempfile::tempdir().unwrap();
    let mut job = common::job("phr00t", "probe", 3);
    job.frames = 17;
    job.fps = 8;
    job.width = 48;
    let video = run(&mut pipeline, out.path(), &job).result.unwrap();
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
    let device = common::device();
    let mut pipeline = load("anisora");
    let out = tempfile::tempdir().unwrap();
    let mut last_step = 0;
    let cancelled = run_job(
        &mut pipeline,
        &device,
        &common::job("anisora", "cancel", 1),
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

    let next = run(
        &mut pipeline,
        out.path(),
        &common::job("anisora", "after-cancel", 1),
    );
    assert!(next.result.is_ok(), "{:?}", next.result);
}

#[test]
fn bad_requests_are_rejected_with_the_field() {
    let mut pipeline = load("phr00t");
    let out = tempfile::tempdir().unwrap();
    let mut failed = |job: &JobRequest| run(&mut pipeline, out.path(), job).result.unwrap_err();

    let mut frames = common::job("phr00t", "bad-frames", 1);
    frames.frames = 6;
    let err = failed(&frames);
    assert_eq!(err.to_string(), "`frames` must be of the form 4k+1, got 6");
    assert_eq!(err.reason(), JobReason::GenerationFailed);

    let mut width = common::job("phr00t", "bad-width", 1);
    width.width = 40;
    assert_eq!(
        failed(&width).to_string(),
        "`width` must be a multiple of 16, got 40"
    );

    let mut mode = common::job("phr00t", "bad-mode", 1);
    mode.mode = Mode::ImageToVideo;
    mode.image = Some(common::first_frame());
    assert_eq!(
        failed(&mode).to_string(),
        "`mode` is i2v but this model runs t2v only"
    );

    let escape = common::job("phr00t", "../../etc", 1);
    assert!(matches!(failed(&escape), JobError::Output(_)));
}

#[test]
fn an_unreadable_start_image_fails_the_job_with_the_reason() {
    let mut pipeline = load("anisora");
    let out = tempfile::tempdir().unwrap();
    let mut job = common::job("anisora", "garbage", 1);
    job.image = Some(b"\x89PNG\r\n\x1a\nnot really".to_vec());
    let err = run(&mut pipeline, out.path(), &job).result.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("spec.image is not a readable PNG image:"),
        "{err}"
    );
    assert_eq!(err.reason(), JobReason::GenerationFailed);
    job.image = Some(b"GIF89a....".to_vec());
    let err = run(&mut pipeline, out.path(), &job).result.unwrap_err();
    assert_eq!(err.to_string(), "spec.image is not a PNG or JPEG image");
}
