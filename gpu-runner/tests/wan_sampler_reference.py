"""References for tests/wan_scheduler.rs: diffusers' flow UniPC and flow-match Euler schedulers as
saved in scheduler_config.json, ComfyUI's `beta` schedule and `sample_euler_ancestral_RF` (written
here from ComfyUI's definitions), and the expert each step of diffusers' WanImageToVideoPipeline
runs.

    python wan_sampler_reference.py OUT_DIR

Every sampler is driven by the same fixed model: at step i the velocity is `a[i] * x + r[i]` with
the scalars `a` and tensors `r` written next to the results, so the Rust side can repeat it.

OUT_DIR gets, per case NAME, NAME/scheduler_config.json (diffusers cases) and NAME.safetensors with
`x` (start), `r.I`, `noise.I` (ancestral cases) and `x.I` (after step I); summary.json holds the
steps, `a`, sigmas and timesteps of each case, ComfyUI beta sigmas for 1 to 24 steps, the expert
and number of transformer calls of each step of the pipeline runs, and for `finite_*` UniPC
configs whether diffusers' latents stay finite.
"""

import json
import sys
from pathlib import Path

import mpmath
import numpy
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from safetensors.torch import save_file

SHAPE = (1, 4, 3, 6, 6)


def fixed_model(steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = [0.1 * (i % 3) - 0.05 for i in range(steps)]
    r = [torch.randn(SHAPE, generator=g) for _ in range(steps)]
    return a, r


def start(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_diffusers(out: Path, name: str, scheduler, steps: int, seed: int) -> dict:
    scheduler.save_config(out / name)
    scheduler.set_timesteps(steps)
    a, r = fixed_model(steps, seed)
    x = start(seed + 100)
    tensors = {"x": x.clone()}
    for i, t in enumerate(scheduler.timesteps):
        tensors[f"r.{i}"] = r[i]
        velocity = a[i] * x + r[i]
        x = scheduler.step(velocity, t, x, return_dict=False)[0]
        tensors[f"x.{i}"] = x.clone()
    save_file(tensors, out / f"{name}.safetensors")
    return {"steps": steps, "a": a, "sigmas": scheduler.sigmas.tolist(),
            "timesteps": scheduler.timesteps.double().tolist()}


# --- ComfyUI's definitions (comfy/model_sampling.py, comfy/samplers.py, comfy/k_diffusion) ---

def comfy_flow_sigmas(shift: float) -> torch.Tensor:
    """ModelSamplingDiscreteFlow.set_parameters(shift, timesteps=1000, multiplier=1000)."""
    ts = (torch.arange(1, 1000 + 1, 1) / 1000) * 1000
    t = ts / 1000
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def beta_ppf(q: float, a: float, b: float) -> float:
    """scipy.stats.beta.ppf, here by a high-precision root of the regularized incomplete beta."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    mpmath.mp.dps = 40
    f = lambda x: mpmath.betainc(a, b, 0, x, regularized=True) - q
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return float(mpmath.findroot(f, (mpmath.mpf(lo), mpmath.mpf(hi)), solver="illinois", tol=1e-35))


def beta_scheduler(sigmas: torch.Tensor, steps: int, alpha=0.6, beta=0.6) -> torch.Tensor:
    total_timesteps = len(sigmas) - 1
    ts = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    ts = numpy.rint(numpy.array([beta_ppf(t, alpha, beta) for t in ts]) * total_timesteps)
    sigs = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigs += [float(sigmas[int(t)])]
        last_t = t
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def sample_euler_ancestral_RF(model, x, sigmas, eta, noises):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1 = 1 - sigmas[i + 1]
            alpha_down = 1 - sigma_down
            renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noises[i] * renoise_coeff
        yield x


def run_comfy(out: Path, name: str, shift: float, steps: int, eta: float, seed: int) -> dict:
    sigmas = beta_scheduler(comfy_flow_sigmas(shift), steps)
    n = len(sigmas) - 1
    a, r = fixed_model(n, seed)
    g = torch.Generator().manual_seed(seed + 200)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(n)]
    x = start(seed + 100)
    tensors = {"x": x.clone()}

    def model(x, sigma, i):  # CONST.calculate_denoised
        return x - (a[i] * x + r[i]) * sigma

    for i, x_i in enumerate(sample_euler_ancestral_RF(model, x, sigmas, eta, noises)):
        tensors[f"r.{i}"] = r[i]
        tensors[f"noise.{i}"] = noises[i]
        tensors[f"x.{i}"] = x_i.clone()
    save_file(tensors, out / f"{name}.safetensors")
    return {"steps": steps, "shift": shift, "eta": eta, "a": a, "sigmas": sigmas.tolist(),
            "timesteps": (sigmas[:-1] * 1000).double().tolist()}


# --- diffusers' WanImageToVideoPipeline: which transformer runs each step ---

def pipeline_experts(out: Path, name: str, scheduler, steps: int, boundary_ratio: float, guidance: float) -> dict:
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from PIL import Image

    torch.manual_seed(0)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=36, out_channels=16,
                  text_dim=32, freq_dim=32, ffn_dim=16, num_layers=1, rope_max_seq_len=32)
    high, low = WanTransformer3DModel(**config).eval(), WanTransformer3DModel(**config).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    calls = []
    high.register_forward_pre_hook(lambda m, args, kw: calls.append(("high", float(kw["timestep"][0]))), with_kwargs=True)
    low.register_forward_pre_hook(lambda m, args, kw: calls.append(("low", float(kw["timestep"][0]))), with_kwargs=True)
    # Prompt embeddings are given, so the pipeline needs no tokenizer or text encoder.
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                                   transformer=high, transformer_2=low, boundary_ratio=boundary_ratio)
    scheduler.save_config(out / name)
    image = Image.new("RGB", (32, 32), (120, 40, 200))
    with torch.no_grad():
        pipe(image=image, prompt_embeds=torch.randn(1, 8, 32), negative_prompt_embeds=torch.randn(1, 8, 32),
             height=32, width=32, num_frames=5,
             num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    per_step = []
    for expert, t in calls:
        if per_step and per_step[-1]["timestep"] == t and per_step[-1]["expert"] == expert:
            per_step[-1]["calls"] += 1
        else:
            per_step.append({"expert": expert, "timestep": t, "calls": 1})
    return {"steps": steps, "boundary_ratio": boundary_ratio, "guidance": guidance, "per_step": per_step}


def finite_configs(out: Path) -> dict:
    """Whether diffusers' UniPC ends with finite latents, for solver type x final sigma x
    lower_order_final x order over 6 steps (some end in NaN or infinity, or fail to solve)."""
    finite = {}
    for solver_type in ("bh1", "bh2"):
        for final in ("zero", "sigma_min"):
            for lower_order_final in (True, False):
                for order in (2, 3):
                    name = f"finite_{solver_type}_{final}_{lower_order_final}_{order}"
                    scheduler = unipc(flow_shift=3.0, solver_type=solver_type, final_sigmas_type=final,
                                      lower_order_final=lower_order_final, solver_order=order)
                    scheduler.save_config(out / name)
                    scheduler.set_timesteps(6)
                    x = start(0)
                    try:
                        for t in scheduler.timesteps:
                            x = scheduler.step(0.3 * x + 0.1, t, x, return_dict=False)[0]
                        finite[name] = bool(torch.isfinite(x).all())
                    except torch.linalg.LinAlgError:  # a singular system at the last step
                        finite[name] = False
    return finite


def unipc(**kw):
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, **kw)


def main(out: Path):
    summary = {"diffusers": {}, "comfy": {}, "beta_sigmas": {}, "pipeline": {}}
    d = summary["diffusers"]
    d["unipc_anisora"] = run_diffusers(out, "unipc_anisora", unipc(flow_shift=5.0), 8, seed=1)
    d["unipc_order2_bh1"] = run_diffusers(
        out, "unipc_order2_bh1",
        unipc(flow_shift=3.0, solver_type="bh1", final_sigmas_type="sigma_min", lower_order_final=False,
              disable_corrector=[0]), 10, seed=2)
    d["unipc_order3_bh2"] = run_diffusers(
        out, "unipc_order3_bh2", unipc(flow_shift=8.0, solver_order=3, disable_corrector=[2]), 6, seed=3)
    d["unipc_order1"] = run_diffusers(out, "unipc_order1", unipc(flow_shift=1.0, solver_order=1), 5, seed=4)
    d["euler_shift5"] = run_diffusers(out, "euler_shift5", FlowMatchEulerDiscreteScheduler(shift=5.0), 8, seed=5)
    d["euler_one_step"] = run_diffusers(out, "euler_one_step", FlowMatchEulerDiscreteScheduler(shift=3.0), 1, seed=6)
    d["euler_shift1"] = run_diffusers(out, "euler_shift1", FlowMatchEulerDiscreteScheduler(shift=1.0), 30, seed=7)

    summary["finite"] = finite_configs(out)

    c = summary["comfy"]
    c["phr00t"] = run_comfy(out, "ancestral_phr00t", shift=8.0, steps=4, eta=1.0, seed=8)
    c["shift5_eta07"] = run_comfy(out, "ancestral_shift5_eta07", shift=5.0, steps=8, eta=0.7, seed=9)
    c["shift1_eta0"] = run_comfy(out, "ancestral_shift1_eta0", shift=1.0, steps=6, eta=0.0, seed=10)

    table = comfy_flow_sigmas(8.0)
    summary["beta_sigmas"] = {str(n): beta_scheduler(table, n).tolist() for n in range(1, 25)}

    p = summary["pipeline"]
    p["anisora"] = pipeline_experts(out, "pipeline_anisora", unipc(flow_shift=5.0), 8, 0.9, 1.0)
    p["euler_cfg"] = pipeline_experts(out, "pipeline_euler_cfg", FlowMatchEulerDiscreteScheduler(shift=5.0), 10,
                                      0.875, 3.0)
    (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
