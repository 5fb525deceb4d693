//! Between the API and the generation core: a VideoModel becomes the model the runner loads,
//! a claimed VideoJob a [`JobRequest`], and a written video `status.output` (a failure's
//! reason is `JobError::reason`).

use std::path::{Path, PathBuf};

use framelane_api::videomodel::{Schedule, Solver as ApiSolver, WeightsFormat};
use framelane_api::{GenerationMode, VideoJob, VideoModel, videojob::Output};
use framelane_core::{defaults::DEFAULT_CFG, memory::JobSize};
use kube::ResourceExt;

use crate::cache::ModelRef;
use crate::generate::JobRequest;
use crate::video::VideoOutput;
use crate::wan::pipeline::{ComfyUiFiles, Mode, ModelFiles, ModelSpec};
use crate::wan::recipe::{AncestralSchedule, Solver};

/// The mode a job asks for, as the pipeline names it.
pub fn mode(mode: GenerationMode) -> Mode {
    match mode {
        GenerationMode::T2v => Mode::TextToVideo,
        GenerationMode::I2v => Mode::ImageToVideo,
    }
}

/// The size of `request` as the fit check weighs it: what [`JobSize::of`] makes of the
/// VideoJob that [`request_for`] turned into `request`.
pub fn size(request: &JobRequest) -> JobSize {
    JobSize {
        width: request.width.into(),
        height: request.height.into(),
        frames: request.frames.into(),
        guided: request.cfg > 1.0,
        mode: match request.mode {
            Mode::TextToVideo => GenerationMode::T2v,
            Mode::ImageToVideo => GenerationMode::I2v,
        },
    }
}

/// What the runner loads for `model`, its weight paths below `models_dir`. Refuses (naming
/// the field) what the VideoModel schema should have refused already.
pub fn model_ref(model: &VideoModel, models_dir: &Path) -> Result<ModelRef, String> {
    let name = model.name_any();
    let weights = &model.spec.weights;
    let path = |field: &str, value: Option<&String>| -> Result<PathBuf, String> {
        let value = value.ok_or_else(|| {
            format!("VideoModel {name}: spec.weights.{field} is required for its format")
        })?;
        if value.starts_with('/') || value.split('/').any(|p| p == "..") {
            return Err(format!(
                "VideoModel {name}: spec.weights.{field} {value:?} leaves the model volume"
            ));
        }
        Ok(models_dir.join(value))
    };
    let paths = |field: &str, values: &[String]| -> Result<Vec<PathBuf>, String> {
        values.iter().map(|v| path(field, Some(v))).collect()
    };
    let files = match weights.format {
        WeightsFormat::Diffusers => ModelFiles::Diffusers(path("path", weights.path.as_ref())?),
        WeightsFormat::ComfyUi => {
            let tokenizer = path("tokenizer", weights.tokenizer.as_ref())?;
            match (&weights.file, &weights.files) {
                (Some(file), None) => ModelFiles::ComfyUi(ComfyUiFiles {
                    transformer: vec![path("file", Some(file))?],
                    transformer_2: Vec::new(),
                    text_encoder: Vec::new(),
                    vae: Vec::new(),
                    tokenizer,
                }),
                (None, Some(split)) => ModelFiles::ComfyUi(ComfyUiFiles {
                    transformer: paths("files.transformer", &split.transformer)?,
                    transformer_2: paths("files.transformer2", &split.transformer2)?,
                    text_encoder: vec![path("files.textEncoder", Some(&split.text_encoder))?],
                    vae: vec![path("files.vae", Some(&split.vae))?],
                    tokenizer,
                }),
                _ => {
                    return Err(format!(
                        "VideoModel {name}: format comfyui takes one of spec.weights.file or \
                         spec.weights.files"
                    ));
                }
            }
        }
    };
    let sampling = model.spec.sampling.as_ref();
    let solver = sampling.map(
        |s| match (s.solver, s.schedule.unwrap_or(Schedule::Shift)) {
            (ApiSolver::UniPc, _) => Solver::wan_unipc(s.shift),
            (ApiSolver::Euler, Schedule::Shift) => Solver::flow_euler(s.shift),
            (ApiSolver::Euler, Schedule::Beta) => Solver::EulerBeta { shift: s.shift },
            (ApiSolver::EulerAncestral, schedule) => Solver::EulerAncestral {
                schedule: match schedule {
                    Schedule::Shift => AncestralSchedule::Flow,
                    Schedule::Beta => AncestralSchedule::Beta,
                },
                shift: s.shift,
                eta: s.eta.unwrap_or(1.0),
            },
        },
    );
    Ok(ModelRef {
        model: name,
        spec: ModelSpec {
            files,
            solver,
            boundary_ratio: sampling
                .and_then(|s| s.experts.as_ref())
                .map(|e| e.boundary),
        },
        modes: model.spec.modes.iter().copied().map(mode).collect(),
    })
}

/// What to generate for `job`: its stored spec (the admission webhook wrote the model's
/// values into it, and the controller checked it against the model before admitting it), the
/// model's values for what a job stored without the webhook left out, and the seed the
/// controller resolved. A model changed since does not change what the job runs with (the
/// runner read its copy at start). The start image is read separately.
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
        mode: mode(spec.mode),
        prompt: spec.prompt.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        image: None,
        width: spec.width.unwrap_or(defaults.width).max(0) as u32,
        height: spec.height.unwrap_or(defaults.height).max(0) as u32,
        frames: spec.frames.unwrap_or(defaults.frames).max(0) as u32,
        fps: spec.fps.unwrap_or(defaults.fps).max(1) as u32,
        steps: spec
            .steps
            .unwrap_or(model.spec.fixed_parameters.steps)
            .max(1) as u32,
        cfg: spec
            .cfg
            .or(model.spec.fixed_parameters.cfg)
            .unwrap_or(DEFAULT_CFG),
        seed: u32::try_from(seed).unwrap_or(u32::MAX),
        vae_tiling: None,
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
    use serde_json::{Value, json};

    use super::*;

    fn model(spec: Value) -> VideoModel {
        let mut full = json!({"fixedParameters": {"steps": 4, "cfg": 1.0},
            "defaults": {"width": 832, "height": 480, "frames": 81, "fps": 16},
            "limits": {"maxWidth": 1280, "maxHeight": 1280, "maxFrames": 161}});
        for (k, v) in spec.as_object().unwrap() {
            full[k] = v.clone();
        }
        serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel", "metadata": {"name": "phr00t"},
            "spec": full}))
        .unwrap()
    }

    fn job(spec: Value) -> VideoJob {
        serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": "j", "namespace": "ns"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn a_job_takes_the_model_defaults_fixed_steps_and_the_resolved_seed() {
        let model = model(json!({"weights": {"format": "diffusers", "path": "phr00t"},
            "modes": ["t2v"]}));
        let job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": "j", "namespace": "ns"},
            "spec": {"model": "phr00t", "prompt": "a cat", "width": 256, "seed": -1},
            "status": {"seed": 1234}
        }))
        .unwrap();
        let r = request_for(&job, &model);
        assert_eq!(
            (r.width, r.height, r.frames, r.fps, r.steps, r.cfg, r.seed),
            (256, 480, 81, 16, 4, 1.0, 1234)
        );
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("ns", "j"));
        assert_eq!(r.mode, Mode::TextToVideo);
    }

    #[test]
    fn a_job_runs_its_stored_steps_and_cfg_even_after_its_model_changed() {
        // Admitted under steps 8 and a free cfg; the model now fixes 12 steps and cfg 1.
        let admitted = job(json!({"model": "anisora", "prompt": "a cat", "steps": 8, "cfg": 5.0}));
        let changed = model(
            json!({"weights": {"format": "diffusers", "path": "anisora"},
            "modes": ["t2v"], "fixedParameters": {"steps": 12, "cfg": 1.0}}),
        );
        let r = request_for(&admitted, &changed);
        assert_eq!((r.steps, r.cfg), (8, 5.0));
        assert!(size(&r).guided);
        // Stored without the webhook: the model's values fill what the job left out.
        let bare = job(json!({"model": "anisora", "prompt": "a cat"}));
        let r = request_for(&bare, &changed);
        assert_eq!((r.steps, r.cfg), (12, 1.0));
        let free = model(
            json!({"weights": {"format": "diffusers", "path": "anisora"},
            "modes": ["t2v"], "fixedParameters": {"steps": 8}}),
        );
        let r = request_for(&bare, &free);
        assert_eq!((r.steps, r.cfg), (8, 1.0));
    }

    #[test]
    fn a_request_weighs_what_admission_weighed_for_its_job() {
        let free = model(
            json!({"weights": {"format": "diffusers", "path": "anisora"},
            "modes": ["t2v", "i2v"], "fixedParameters": {"steps": 8}}),
        );
        let fixed =
            model(json!({"weights": {"format": "diffusers", "path": "phr00t"}, "modes": ["t2v"]}));
        let sizes = [
            (json!({"model": "m", "prompt": "a cat"}), &free),
            (
                json!({"model": "m", "prompt": "a cat", "cfg": 5.0, "mode": "i2v",
                "image": "start.png", "width": 1280, "height": 720, "frames": 45}),
                &free,
            ),
            (
                json!({"model": "m", "prompt": "a cat", "frames": 33}),
                &fixed,
            ),
        ]
        .map(|(spec, model)| {
            let job = job(spec);
            let size = size(&request_for(&job, model));
            assert_eq!(size, JobSize::of(&job.spec, model));
            size
        });
        assert_eq!(
            sizes.map(|s| (s.width, s.height, s.frames, s.guided, s.mode)),
            [
                (832, 480, 81, false, GenerationMode::T2v),
                (1280, 720, 45, true, GenerationMode::I2v),
                (832, 480, 33, false, GenerationMode::T2v),
            ]
        );
    }

    #[test]
    fn weights_and_sampling_become_the_runners_model() {
        let root = Path::new("/models");
        let aio = model(json!({
            "weights": {"format": "comfyui", "file": "phr00t/aio.safetensors", "tokenizer": "phr00t/tokenizer"},
            "sampling": {"solver": "euler_ancestral", "schedule": "beta", "shift": 8.0},
            "modes": ["t2v"]}));
        let r = model_ref(&aio, root).unwrap();
        assert_eq!(
            r.spec.files,
            ModelFiles::ComfyUi(ComfyUiFiles {
                transformer: vec![root.join("phr00t/aio.safetensors")],
                transformer_2: vec![],
                text_encoder: vec![],
                vae: vec![],
                tokenizer: root.join("phr00t/tokenizer"),
            })
        );
        assert_eq!(
            r.spec.solver,
            Some(Solver::EulerAncestral {
                schedule: AncestralSchedule::Beta,
                shift: 8.0,
                eta: 1.0
            })
        );
        let split = model(json!({
            "weights": {"format": "comfyui", "tokenizer": "tok", "files": {
                "transformer": ["high-1.safetensors", "high-2.safetensors"], "transformer2": ["low.safetensors"],
                "textEncoder": "umt5.safetensors", "vae": "vae.safetensors"}},
            "sampling": {"solver": "unipc", "shift": 5.0, "experts": {"boundary": 0.9}},
            "modes": ["i2v"]}));
        let r = model_ref(&split, root).unwrap();
        let ModelFiles::ComfyUi(files) = &r.spec.files else {
            panic!("{:?}", r.spec.files)
        };
        assert_eq!(files.transformer.len(), 2);
        assert_eq!(files.transformer_2, vec![root.join("low.safetensors")]);
        assert_eq!(r.spec.solver, Some(Solver::wan_unipc(5.0)));
        assert_eq!(
            (r.spec.boundary_ratio, r.modes),
            (Some(0.9), vec![Mode::ImageToVideo])
        );

        let saved =
            model(json!({"weights": {"format": "diffusers", "path": "anisora"}, "modes": ["i2v"]}));
        let r = model_ref(&saved, root).unwrap();
        assert_eq!(r.spec.files, ModelFiles::Diffusers(root.join("anisora")));
        assert_eq!((r.spec.solver, r.spec.boundary_ratio), (None, None));

        let escaping =
            model(json!({"weights": {"format": "diffusers", "path": "../etc"}, "modes": ["t2v"]}));
        assert_eq!(
            model_ref(&escaping, root).unwrap_err(),
            "VideoModel phr00t: spec.weights.path \"../etc\" leaves the model volume"
        );
    }
}
