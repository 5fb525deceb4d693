//! Between the API and the generation core: a claimed VideoJob becomes a [`JobRequest`], and
//! a written video becomes `status.output` (a failure's reason is `JobError::reason`).

use framelane_api::{VideoJob, VideoModel, videojob::Output};
use kube::ResourceExt;

use crate::{generate::JobRequest, video::VideoOutput};

/// What to generate for `job`, with the model's defaults for what the job left out and the
/// seed the controller resolved.
pub fn request_for(job: &VideoJob, model: &VideoModel) -> JobRequest {
    let spec = &job.spec;
    let defaults = &model.spec.defaults;
    let seed = job
        .status
        .as_ref()
        .and_then(|s| s.seed)
        .or(spec.seed)
        .filter(|s| *s >= 0)
        .unwrap_or(0);
    JobRequest {
        namespace: job.namespace().unwrap_or_default(),
        name: job.name_any(),
        prompt: spec.prompt.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        width: spec.width.unwrap_or(defaults.width).max(0) as u32,
        height: spec.height.unwrap_or(defaults.height).max(0) as u32,
        frames: spec.frames.unwrap_or(defaults.frames).max(0) as u32,
        fps: Some(spec.fps.unwrap_or(defaults.fps).max(1) as u32),
        cfg: spec.cfg.or(model.spec.fixed_parameters.cfg),
        seed: u32::try_from(seed).unwrap_or(u32::MAX),
    }
}

/// `status.output` for a written video.
pub fn output_for(video: &VideoOutput) -> Output {
    Output {
        path: video.path.clone(),
        size_bytes: i64::try_from(video.size_bytes).unwrap_or(i64::MAX),
        sha256: video.sha256.clone(),
        frames: video.frames as i32,
        fps: video.fps as i32,
        width: video.width as i32,
        height: video.height as i32,
        preview_path: Some(video.preview_path.clone()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_job_takes_the_model_defaults_and_the_resolved_seed() {
        let model: VideoModel = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel", "metadata": {"name": "phr00t"},
            "spec": {"fixedParameters": {"steps": 4, "cfg": 1.0}, "defaults": {"width": 832, "height": 480, "frames": 81, "fps": 16},
                "limits": {"maxWidth": 1280, "maxHeight": 1280, "maxFrames": 161}, "package": {"path": "phr00t"}, "modes": ["t2v"]}
        }))
        .unwrap();
        let job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": "j", "namespace": "ns"},
            "spec": {"model": "phr00t", "prompt": "a cat", "width": 256, "seed": -1},
            "status": {"seed": 1234}
        }))
        .unwrap();
        let r = request_for(&job, &model);
        assert_eq!(
            (r.width, r.height, r.frames, r.fps, r.cfg, r.seed),
            (256, 480, 81, Some(16), Some(1.0), 1234)
        );
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("ns", "j"));
    }
}
