//! The two models `scripts/make_full_size_wan.py` writes, with random weights, as the GPU check
//! (examples/gpu_check.rs) and the fit bench (benches/fit.rs) load them: Wan 2.2 A14B image to
//! video (two experts in `a14b/`) and a 14B AllInOne text-to-video file (`aio/`), whose text
//! encoder and VAE the A14B model reads too.

use std::path::Path;

use crate::cache::ModelRef;
use crate::wan::pipeline::{ComfyUiFiles, Mode, ModelFiles, ModelSpec};
use crate::wan::recipe::Solver;

/// The A14B and AllInOne models under `root`, each with its short name (`a14b`, `aio`).
pub fn check_models(root: &Path) -> Vec<(ModelRef, &'static str)> {
    let aio = root.join("aio/aio.safetensors");
    let comfy = |transformer, transformer_2| {
        ModelFiles::ComfyUi(ComfyUiFiles {
            transformer,
            transformer_2,
            text_encoder: vec![aio.clone()],
            vae: vec![aio.clone()],
            tokenizer: root.join("tokenizer"),
        })
    };
    vec![
        (
            ModelRef {
                model: "a14b".into(),
                spec: ModelSpec {
                    files: comfy(
                        vec![root.join("a14b/high.safetensors")],
                        vec![root.join("a14b/low.safetensors")],
                    ),
                    solver: Some(Solver::wan_unipc(5.0)),
                    boundary_ratio: Some(0.9),
                },
                modes: vec![Mode::ImageToVideo],
            },
            "a14b",
        ),
        (
            ModelRef {
                model: "aio".into(),
                spec: ModelSpec {
                    files: comfy(vec![aio.clone()], Vec::new()),
                    solver: Some(Solver::wan_unipc(3.0)),
                    boundary_ratio: None,
                },
                modes: vec![Mode::TextToVideo],
            },
            "aio",
        ),
    ]
}
