"""Runs a diffusers WanPipeline the way the runner runs its exported package, as the reference
for tests/export_diffusers.rs.

    python diffusers_reference.py PIPELINE_DIR < case.json

case.json: {"prompts": [...], "textLength", "prompt", "negativePrompt", "width", "height",
"frames", "seed", "sigmas", "cfg", "latentsOut", "framesOut"}. Stdout: one JSON object with
"ids" (the pipeline's token ids for each of "prompts", after its prompt cleaning). The final
latents (float32 [1, C, T, H, W]) go to latentsOut and the video (float32 [T, H, W, 3] in [0, 1],
the pipeline's own output) to framesOut, both little-endian, C order.

The pipeline runs unchanged except: the initial noise is the runner's (seed the CPU generator,
one standard normal draw of the latent shape) and its Euler scheduler uses the package's
sigmas.
"""

import json
import sys

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean


def main(root: str):
    case = json.load(sys.stdin)
    pipe = WanPipeline.from_pretrained(root, torch_dtype=torch.float32)
    length = case["textLength"]
    ids = [
        pipe.tokenizer(prompt_clean(p), padding="max_length", max_length=length, truncation=True,
                       add_special_tokens=True).input_ids
        for p in case["prompts"]
    ]

    sigmas = case["sigmas"]
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda steps, device=None: set_timesteps(device=device, sigmas=sigmas[:-1])

    vae_t, vae_s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    shape = [1, pipe.transformer.config.in_channels, (case["frames"] - 1) // vae_t + 1,
             case["height"] // vae_s, case["width"] // vae_s]
    torch.manual_seed(case["seed"])
    noise = torch.randn(shape, dtype=torch.float32)

    final = {}

    def keep_latents(pipe, step, t, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return kwargs

    video = pipe(
        prompt=case["prompt"], negative_prompt=case["negativePrompt"], width=case["width"],
        height=case["height"], num_frames=case["frames"], num_inference_steps=len(sigmas) - 1,
        guidance_scale=case["cfg"], latents=noise, output_type="np", max_sequence_length=length,
        callback_on_step_end=keep_latents,
    ).frames[0]
    final["latents"].contiguous().numpy().astype("<f4").tofile(case["latentsOut"])
    video.astype("<f4").tofile(case["framesOut"])
    print(json.dumps({"ids": ids}))


if __name__ == "__main__":
    main(sys.argv[1])
