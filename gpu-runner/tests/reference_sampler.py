"""An independent reference for the Rust sampling loop: the same TorchScript modules, seed and
noise order, driven from a plain Python loop.

    python reference_sampler.py < cases.json

stdin: a JSON list of cases {"package", "prompt", "negativePrompt", "width", "height",
"frames", "seed", "sampler", "cfg", "eta", "sigmas", "out"}; for each case the final latents
(float32, little-endian, C order) are written to `out`, and stdout gets one JSON line per case
with the latent shape and the seconds per denoising step (benches/runner.rs reports them).

Noise contract (shared with src/sampler.rs): seed the CPU generator with `seed`, draw the
initial latent noise, then (euler_ancestral only) one noise tensor per step, all float32
standard normal of the latent shape, before any step runs.
"""

import json
import sys
import time
from pathlib import Path

import torch


def tokenize(text: str, length: int) -> torch.Tensor:
    ids = [b + 1 for b in text.encode("utf-8")][:length]
    ids += [0] * (length - len(ids))
    return torch.tensor([ids], dtype=torch.int64)


def run(case: dict) -> list:
    pkg = Path(case["package"])
    manifest = json.loads((pkg / "manifest.json").read_text())
    te = torch.jit.load(str(pkg / "text_encoder.pt"))
    dn = torch.jit.load(str(pkg / "denoiser.pt"))
    length = manifest["textLength"]
    ts, ss = manifest["temporalStride"], manifest["spatialStride"]
    scale = manifest.get("timestepScale", 1000.0)
    shape = [1, manifest["latentChannels"], (case["frames"] - 1) // ts + 1, case["height"] // ss, case["width"] // ss]

    torch.manual_seed(case["seed"])
    x = torch.randn(shape, dtype=torch.float32)
    sigmas = case["sigmas"]
    steps = len(sigmas) - 1
    ancestral = case["sampler"] == "euler_ancestral"
    step_noise = [torch.randn(shape, dtype=torch.float32) for _ in range(steps)] if ancestral else []

    cfg = case["cfg"]
    with torch.no_grad():
        cond = te(tokenize(case["prompt"], length))
        uncond = te(tokenize(case.get("negativePrompt") or "", length)) if cfg != 1.0 else None
        started = time.perf_counter()
        for i in range(steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            t = torch.tensor([s * scale], dtype=torch.float32)
            v = dn(x, t, cond)
            if uncond is not None:
                v_u = dn(x, t, uncond)
                v = v_u + cfg * (v - v_u)
            if not ancestral:
                x = x + (s_next - s) * v
                continue
            # Rectified-flow ancestral step (ComfyUI's sample_euler_ancestral_RF).
            denoised = x - s * v
            if s_next == 0.0:
                x = denoised
                continue
            eta = case["eta"]
            sigma_down = s_next * (1.0 + (s_next / s - 1.0) * eta)
            alpha_next, alpha_down = 1.0 - s_next, 1.0 - sigma_down
            renoise = (s_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
            ratio = sigma_down / s
            x = ratio * x + (1.0 - ratio) * denoised
            x = (alpha_next / alpha_down) * x + step_noise[i] * renoise
    per_step = (time.perf_counter() - started) / steps
    x.contiguous().numpy().astype("<f4").tofile(case["out"])
    return shape, per_step


def main():
    for case in json.load(sys.stdin):
        shape, per_step = run(case)
        print(json.dumps({"out": case["out"], "shape": shape, "secondsPerStep": per_step}), flush=True)


if __name__ == "__main__":
    main()
