"""diffusers' side of the GPU check: seconds per denoising step of diffusers' own pipeline with
random weights of the same shapes as the runner's models (gpu-runner/scripts/make_full_size_wan.py),
the same job size, steps and memory mode, on the same GPU under the same memory cap.

    python gpu_check_diffusers.py MODELS_DIR a14b|aio WIDTH HEIGHT FRAMES STEPS MODE CAP_BYTES [--tiny] [--fp8]

MODE: `resident` (the pipeline on the GPU) or `offload` (`enable_model_cpu_offload`, which the
runner's `expert-swap` and `model-offload` are compared with: diffusers has no expert swap alone).
--fp8: the transformers stored in float8 and upcast layer by layer (diffusers' layerwise casting),
as the runner's `--transformer-weights fp8`.
Prints one JSON line: {"sPerStep": ..., "steps": ...}. Weights are random and bfloat16 (the
runner upcasts its fp8 files to bfloat16 too); their values do not change the time of a step.
"""

import json
import sys
import time
from pathlib import Path

import torch
from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                       WanTransformer3DModel)
from diffusers.pipelines.wan import pipeline_wan_i2v
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from PIL import Image
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from make_full_size_wan import TINY_UMT5, UMT5_XXL, WAN_14B  # noqa: E402
from make_tiny_wan_models import TRANSFORMER, VAE  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The image-to-video pipeline's prompt_clean needs ftfy, which the venv may lack; the
# text-to-video pipeline's does the same without it.
pipeline_wan_i2v.prompt_clean = prompt_clean


def built(make):
    """A module with random weights, made on the GPU (fast) in bfloat16."""
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        module = make().eval()
    torch.set_default_dtype(torch.float32)
    return module


def main(models: Path, kind: str, width: int, height: int, frames: int, steps: int, mode: str, cap: int,
         tiny: bool, fp8: bool):
    if DEVICE == "cuda" and cap > 0:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    tok = AutoTokenizer.from_pretrained(models / "tokenizer")
    config = TRANSFORMER if tiny else WAN_14B
    text = UMT5Config(vocab_size=len(tok), **TINY_UMT5) if tiny else UMT5Config(**UMT5_XXL)
    in_channels = 36 if kind == "a14b" else 16
    parts = {}
    # Made one at a time and moved to the host under offload, so they need not fit together.
    for name, make in [
        ("text_encoder", lambda: UMT5EncoderModel(text)),
        ("transformer", lambda: WanTransformer3DModel(**config, in_channels=in_channels, out_channels=16)),
        ("transformer_2", lambda: WanTransformer3DModel(**config, in_channels=in_channels, out_channels=16)),
    ]:
        if name == "transformer_2" and kind != "a14b":
            continue
        parts[name] = built(make)
        if fp8 and name.startswith("transformer"):
            parts[name].enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        if mode == "offload":
            parts[name] = parts[name].to("cpu")
    vae = AutoencoderKLWan(**VAE) if tiny else AutoencoderKLWan()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=5.0 if kind == "a14b" else 3.0)
    if kind == "a14b":
        pipe = WanImageToVideoPipeline(tokenizer=tok, vae=vae, scheduler=scheduler, boundary_ratio=0.9, **parts)
    else:
        pipe = WanPipeline(tokenizer=tok, vae=vae, scheduler=scheduler, **parts)
    if mode == "offload" and DEVICE == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(DEVICE)
    ends = []

    def on_step(pipeline, step, timestep, kwargs):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return kwargs

    extra = {}
    if kind == "a14b":
        extra["image"] = Image.open(models / "inputs" / "first-frame.png").convert("RGB").resize((width, height))
    with torch.no_grad():
        pipe(prompt="a fox", negative_prompt="", width=width, height=height, num_frames=frames,
             num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=on_step, **extra)
    per_step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan")
    print(json.dumps({"sPerStep": per_step, "steps": len(ends)}))


if __name__ == "__main__":
    a = sys.argv[1:]
    tiny, fp8 = "--tiny" in a, "--fp8" in a
    a = [x for x in a if x not in ("--tiny", "--fp8")]
    main(Path(a[0]), a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]), a[6], int(a[7]), tiny, fp8)
