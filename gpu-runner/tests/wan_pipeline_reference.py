"""What diffusers' Wan pipelines make of a job, the reference for tests/wan_pipeline.rs.

    python wan_pipeline_reference.py MODELS_DIR OUT_FILE < cases.json

MODELS_DIR is from make_tiny_wan_models.py. cases.json is a list of cases, each with "name",
"kind", "model" (a folder of MODELS_DIR), "prompt", "negativePrompt", "width", "height",
"frames", "steps", "guidance", "seed", and:
- kind "t2v": diffusers' WanPipeline as saved (its UniPC scheduler); "transformer" may name a
  safetensors file of diffusers transformer weights to run instead of the saved ones;
- kind "i2v": diffusers' WanImageToVideoPipeline as saved, from the picture at "image";
- kind "comfy": the pipeline's own transformer, text encoder and VAE, sampled with ComfyUI's
  `beta` schedule (with "shift") and `sample_euler_ancestral_RF` (with "eta") as
  wan_sampler_reference.py writes them from ComfyUI's definitions, guidance on the velocity;
- kind "resize": only "image" and "sizes" ([[width, height], ...]): PIL's LANCZOS resize of
  the picture to each size, as the image processor does, in NAME.WxH (float32 of the bytes);
- kind "upright": only "images": each JPEG as diffusers' load_image reads it (turned upright by
  ImageOps.exif_transpose, then RGB), in NAME.I for the I-th (float32 of the bytes).

Noise: a CPU generator seeded with "seed" draws the initial latents (as the pipelines do), then,
for "comfy", one standard normal tensor per step.

OUT_FILE (safetensors) gets NAME.latents (float32, before decoding) and NAME.frames (the decoded
video as the pipelines' "np" output, float32 in [0, 1], [frames, height, width, 3]). Stdout: a
JSON object with NAME: {"ids": ..., "negativeIds": ...}, the token ids of the cleaned prompts.
"""

import json
import sys
from pathlib import Path

import numpy
import torch
import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v
from diffusers import WanImageToVideoPipeline, WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_sampler_reference import beta_scheduler, comfy_flow_sigmas, sample_euler_ancestral_RF  # noqa: E402

# The image-to-video pipeline's prompt_clean needs ftfy, which the venv lacks; the text-to-video
# one skips it. Both clean valid text alike.
wan_i2v.prompt_clean = prompt_clean

MAX_LENGTH = 512


def token_ids(pipe, text: str) -> list:
    tokens = pipe.tokenizer([prompt_clean(text)], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                            add_special_tokens=True, return_tensors="pt")
    return tokens.input_ids[0].tolist()


def call(pipe, case: dict, output_type: str, **extra):
    return pipe(prompt=case["prompt"], negative_prompt=case["negativePrompt"], height=case["height"],
                width=case["width"], num_frames=case["frames"], num_inference_steps=case["steps"],
                guidance_scale=case["guidance"], generator=torch.Generator().manual_seed(case["seed"]),
                output_type=output_type, return_dict=False, **extra)[0]


def diffusers_case(root: Path, case: dict, out: dict):
    name = case["name"]
    if case["kind"] == "i2v":
        pipe = WanImageToVideoPipeline.from_pretrained(root / case["model"], torch_dtype=torch.float32)
        extra = {"image": Image.open(root / case["image"]).convert("RGB")}
    else:
        pipe = WanPipeline.from_pretrained(root / case["model"], torch_dtype=torch.float32)
        if "transformer" in case:
            pipe.transformer.load_state_dict(load_file(root / case["transformer"]))
        extra = {}
    with torch.no_grad():
        out[f"{name}.latents"] = call(pipe, case, "latent", **extra)
        out[f"{name}.frames"] = torch.from_numpy(call(pipe, case, "np", **extra)[0])
    return pipe


def comfy_case(root: Path, case: dict, out: dict):
    name = case["name"]
    pipe = WanPipeline.from_pretrained(root / case["model"], torch_dtype=torch.float32)
    guidance = case["guidance"]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(case["prompt"], case["negativePrompt"],
                                          do_classifier_free_guidance=guidance > 1.0,
                                          max_sequence_length=MAX_LENGTH)
        sigmas = beta_scheduler(comfy_flow_sigmas(case["shift"]), case["steps"])
        shape = (1, 16, (case["frames"] - 1) // 4 + 1, case["height"] // 8, case["width"] // 8)
        generator = torch.Generator().manual_seed(case["seed"])
        x = torch.randn(shape, generator=generator)
        noises = [torch.randn(shape, generator=generator) for _ in range(len(sigmas) - 1)]

        def velocity(x, sigma):
            t = (sigma * 1000).reshape(1)
            v = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
            if guidance > 1.0:
                v_uncond = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=uncond,
                                            return_dict=False)[0]
                v = v_uncond + guidance * (v - v_uncond)
            return v

        def denoised(x, sigma, i):  # ComfyUI's CONST.calculate_denoised
            return x - velocity(x, sigma) * sigma

        for x in sample_euler_ancestral_RF(denoised, x, sigmas, case["eta"], noises):
            pass
        out[f"{name}.latents"] = x
        vae = pipe.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        video = vae.decode(x / std + mean, return_dict=False)[0]
        out[f"{name}.frames"] = torch.from_numpy(pipe.video_processor.postprocess_video(video, output_type="np")[0])
    return pipe


def main(root: Path, out_file: Path):
    cases = json.load(sys.stdin)
    tensors, ids = {}, {}
    for case in cases:
        if case["kind"] == "upright":
            for i, path in enumerate(case["images"]):
                upright = ImageOps.exif_transpose(Image.open(root / path)).convert("RGB")
                tensors[f"{case['name']}.{i}"] = torch.from_numpy(numpy.array(upright))
            continue
        if case["kind"] == "resize":
            image = Image.open(root / case["image"]).convert("RGB")
            for width, height in case["sizes"]:
                resized = numpy.array(image.resize((width, height), resample=Image.LANCZOS))
                tensors[f"{case['name']}.{width}x{height}"] = torch.from_numpy(resized)
            continue
        run = comfy_case if case["kind"] == "comfy" else diffusers_case
        pipe = run(root, case, tensors)
        ids[case["name"]] = {"ids": token_ids(pipe, case["prompt"]),
                             "negativeIds": token_ids(pipe, case["negativePrompt"])}
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, out_file)
    print(json.dumps(ids))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
