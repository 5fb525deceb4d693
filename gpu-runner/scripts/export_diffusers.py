"""Turns a diffusers Wan text-to-video pipeline directory into a Framelane model package.

    python export_diffusers.py PIPELINE_DIR OUT_DIR --model anisora --steps 8 --shift 5.0 --cfg 3.0

PIPELINE_DIR is what `WanPipeline.save_pretrained` writes (model_index.json, tokenizer/,
text_encoder/ (UMT5), transformer/ (WanTransformer3DModel), vae/ (AutoencoderKLWan)).
OUT_DIR gets manifest.json, tokenizer.json, text_encoder.pt, denoiser.pt, vae_decoder.pt: the
contract of docs/models.md. The modules are loaded in the chosen dtype (bfloat16 by default;
layers diffusers keeps in float32 stay float32) and traced on the CPU; the saved traces hold no
device constant, so the runner can load them on any device.

Each module is a thin adapter around the real diffusers/transformers module:
  text_encoder(ids)        UMT5 with the attention mask from ids != pad, padded positions zeroed
                           (what WanPipeline does with the sequence lengths)
  denoiser(x, t, context)  WanTransformer3DModel; the timestep projection and the RoPE tables
                           are computed at run time in float32/float64 on the input's device
  vae_decoder(latents)     de-normalise with the VAE's latents_mean/std, decode the whole
                           sequence at once (equal to diffusers' frame-by-frame causal decode),
                           clamp to [-1, 1]
Verified with diffusers 0.42.1 and transformers 5.24.0 (gpu-runner/tests/export_diffusers.rs).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn


def fail(message: str):
    sys.exit(f"export_diffusers: {message}")


def device_generic_bias(attention: nn.Module):
    """UMT5Attention.compute_bias with positions made from the bias table, not
    torch.arange(device=...), which the trace would pin to the CPU."""

    def compute_bias(query_length, key_length, device=None, past_seen_tokens=0):
        weight = attention.relative_attention_bias.weight
        context = torch.cumsum(weight.new_ones(query_length, dtype=torch.long), 0)[:, None] - 1 + past_seen_tokens
        memory = torch.cumsum(weight.new_ones(key_length, dtype=torch.long), 0)[None, :] - 1
        bucket = attention._relative_position_bucket(memory - context)
        return attention.relative_attention_bias(bucket).permute([2, 0, 1]).unsqueeze(0)

    return compute_bias


class TextEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, pad_id: int):
        super().__init__()
        for module in encoder.modules():
            if hasattr(module, "relative_attention_bias") and hasattr(module, "compute_bias"):
                module.compute_bias = device_generic_bias(module)
        self.encoder = encoder
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        keep = input_ids != self.pad_id
        length = input_ids.shape[1]
        # A ready 4D mask (query x key): transformers would move a 2D one with .to(device),
        # which the trace would pin to the CPU.
        mask = keep[:, None, None, :].expand(input_ids.shape[0], 1, length, length)
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden * keep.unsqueeze(-1).to(hidden.dtype)


class TimestepProjection(nn.Module):
    """diffusers' `Timesteps` (sinusoidal), with the frequency index made from the input so the
    trace holds no device constant (torch.arange(device=...) would be traced as "cpu")."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.num_channels = proj.num_channels
        self.flip_sin_to_cos = proj.flip_sin_to_cos
        self.downscale_freq_shift = proj.downscale_freq_shift
        self.scale = float(getattr(proj, "scale", 1))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        index = torch.cumsum(timesteps.new_ones(half, dtype=torch.float32), 0) - 1.0
        exponent = -math.log(10000) * index / (half - self.downscale_freq_shift)
        emb = timesteps[:, None].float() * torch.exp(exponent)[None, :]
        emb = self.scale * emb
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        if self.flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if self.num_channels % 2 == 1:
            emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
        return emb


class RotaryTables(nn.Module):
    """WanRotaryPosEmbed computed at run time on the input's device. As buffers the tables would
    be cast to bfloat16 with the weights."""

    def __init__(self, rope: nn.Module, theta: float = 10000.0):
        super().__init__()
        self.patch_size = tuple(rope.patch_size)
        self.dims = (rope.t_dim, rope.h_dim, rope.w_dim)
        self.theta = theta

    def axis(self, x: torch.Tensor, length: int, dim: int):
        one = x.new_ones((), dtype=torch.float64)
        pos = torch.cumsum(x.new_ones(length, dtype=torch.float64), 0) - 1.0
        index = torch.cumsum(x.new_ones(dim // 2, dtype=torch.float64), 0) - 1.0
        freqs = one / (self.theta ** (2.0 * index / dim))
        angles = torch.outer(pos, freqs)
        # float64 angles, float32 tables: what diffusers' get_1d_rotary_pos_embed returns.
        return angles.cos().repeat_interleave(2, dim=1).float(), angles.sin().repeat_interleave(2, dim=1).float()

    def forward(self, hidden_states: torch.Tensor):
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        sizes = (frames // p_t, height // p_h, width // p_w)
        cos, sin = [], []
        for axis, (length, dim) in enumerate(zip(sizes, self.dims)):
            c, s = self.axis(hidden_states, length, dim)
            view = [1, 1, 1, -1]
            view[axis] = length
            cos.append(c.view(view).expand(*sizes, -1))
            sin.append(s.view(view).expand(*sizes, -1))
        tokens = sizes[0] * sizes[1] * sizes[2]
        return (torch.cat(cos, dim=-1).reshape(1, tokens, 1, -1), torch.cat(sin, dim=-1).reshape(1, tokens, 1, -1))


class Denoiser(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        transformer.condition_embedder.timesteps_proj = TimestepProjection(transformer.condition_embedder.timesteps_proj)
        transformer.rope = RotaryTables(transformer.rope)
        self.transformer = transformer

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]


class FullSequenceUpsample3d(nn.Module):
    """WanResample(mode="upsample3d") over the whole sequence: the first frame stays one frame,
    every later frame becomes two through the causal time_conv (frame-by-frame decoding gives
    the same: its first chunk skips time_conv and later chunks never see frame 0)."""

    def __init__(self, resample: nn.Module):
        super().__init__()
        self.time_conv = resample.time_conv
        self.resample = resample.resample

    def forward(self, x, feat_cache=None, feat_idx=[0]):
        b, c, _, h, w = x.size()
        # Causal padding (two zero frames) plus one trailing zero frame so a one-frame input
        # still fits the kernel; the output of that trailing frame is dropped.
        z = torch.cat([x.new_zeros(b, c, 2, h, w), x[:, :, 1:], x.new_zeros(b, c, 1, h, w)], dim=2)
        y = nn.Conv3d.forward(self.time_conv, z)[:, :, :-1]
        t = y.shape[2]
        y = y.reshape(b, 2, c, t, h, w)
        y = torch.stack((y[:, 0], y[:, 1]), 3).reshape(b, c, t * 2, h, w)
        x = torch.cat([x[:, :, :1], y], dim=2)
        t = x.shape[2]
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return x.view(b, t, x.size(1), x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)


class VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

        z_dim = vae.config.z_dim
        dtype = vae.post_quant_conv.weight.dtype
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean, dtype=dtype).view(1, z_dim, 1, 1, 1))
        self.register_buffer("std", torch.tensor(vae.config.latents_std, dtype=dtype).view(1, z_dim, 1, 1, 1))
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        for parent in list(self.decoder.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, WanResample) and child.mode == "upsample3d":
                    setattr(parent, name, FullSequenceUpsample3d(child))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.std + self.mean
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)


def trace(module: nn.Module, inputs: tuple, path: Path):
    """Traces `module` and saves it. Every device the trace captured as a constant (what
    `.to(x.device)` and `torch.arange(device=...)` leave behind) becomes the device of the
    first input, so the saved module runs wherever the runner puts it."""
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), inputs, check_trace=False)
    graph = traced.graph
    torch._C._jit_pass_inline(graph)
    constants = [n for n in graph.nodes() if n.kind() == "prim::Constant" and n.output().type().kind() == "DeviceObjType"]
    if constants:
        device = graph.create("prim::device", [list(graph.inputs())[1]])
        device.output().setType(torch._C.DeviceObjType.get())
        device.insertBefore(next(iter(graph.nodes())))
        for constant in constants:
            constant.output().replaceAllUsesWith(device.output())
            constant.destroy()
    traced.save(str(path))
    if "Device = prim::Constant" in str(torch.jit.load(str(path)).inlined_graph):
        fail(f"{path}: the saved trace still pins a device; it would fail off the CPU")


def tensor_bytes(*modules: nn.Module) -> int:
    tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_pipeline(root: Path) -> dict:
    index_path = root / "model_index.json"
    if not index_path.is_file():
        fail(f"{index_path}: missing; PIPELINE_DIR must be a diffusers pipeline saved with save_pretrained")
    index = json.loads(index_path.read_text())
    kind = index.get("_class_name")
    if kind == "WanImageToVideoPipeline":
        fail(f"{index_path}: `_class_name` is WanImageToVideoPipeline; image-to-video needs the image "
             "latents, mask and (Wan2.1) CLIP image embeddings as denoiser inputs, which the package "
             "format does not have yet. Export the text-to-video pipeline (WanPipeline) of the family.")
    if kind != "WanPipeline":
        fail(f"{index_path}: `_class_name` is {kind!r}; this script exports WanPipeline")
    if (index.get("transformer_2") or [None])[0] is not None or index.get("boundary_ratio") is not None:
        fail(f"{index_path}: `transformer_2`/`boundary_ratio` set (Wan2.2 A14B, two experts switched by "
             "timestep); a package has one denoiser. Merge the experts into one checkpoint first.")
    if index.get("expand_timesteps"):
        fail(f"{index_path}: `expand_timesteps` is true (Wan2.2 TI2V-5B, per-token timesteps); not supported")
    return index


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pipeline", type=Path, help="diffusers WanPipeline directory")
    p.add_argument("out", type=Path, help="package directory to write")
    p.add_argument("--model", required=True, help="the VideoModel name (anisora, phr00t)")
    p.add_argument("--steps", type=int, required=True, help="the VideoModel's fixed steps")
    schedule = p.add_mutually_exclusive_group(required=True)
    schedule.add_argument("--shift", type=float, help="Wan time shift over linspace(1, 0, steps+1)")
    schedule.add_argument("--sigmas", type=float, nargs="+", help="explicit sigmas, steps+1 values ending at 0")
    p.add_argument("--cfg", type=float, required=True, help="guidance scale (1.0: no unconditional pass)")
    p.add_argument("--sampler", choices=["euler", "euler_ancestral"], default="euler")
    p.add_argument("--eta", type=float, default=1.0, help="ancestral noise (euler_ancestral)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--text-length", type=int, default=512, help="token ids per prompt (Wan: 512)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = p.parse_args()

    root = args.pipeline
    check_pipeline(root)
    if args.sigmas is not None and len(args.sigmas) != args.steps + 1:
        fail(f"--sigmas has {len(args.sigmas)} values; --steps {args.steps} needs {args.steps + 1}")
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    length = args.text_length

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    backend.save(str(out / "tokenizer.json"))
    ids = torch.tensor([tokenizer("probe", padding="max_length", max_length=length, truncation=True).input_ids])

    encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
    text_encoder = TextEncoder(encoder, tokenizer.pad_token_id)
    with torch.no_grad():
        context = text_encoder(ids)
    trace(text_encoder, (ids,), out / "text_encoder.pt")
    del encoder

    transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
    cfg = transformer.config
    if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
        fail(f"{root / 'transformer/config.json'}: `image_dim`/`added_kv_proj_dim` set: an image-to-video transformer")
    channels = cfg.in_channels
    denoiser = Denoiser(transformer)
    latents = torch.randn(1, channels, 2, 2 * cfg.patch_size[1], 2 * cfg.patch_size[2]).to(dtype)
    trace(denoiser, (latents, torch.tensor([500.0]), context), out / "denoiser.pt")

    vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=dtype)
    if vae.config.is_residual or vae.config.patch_size is not None:
        fail(f"{root / 'vae/config.json'}: the Wan2.2 (residual, patchified) VAE is not supported; the Wan2.1 VAE is")
    if vae.config.z_dim != channels:
        fail(f"{root / 'vae/config.json'}: `z_dim` {vae.config.z_dim} != the transformer's in_channels {channels}")
    vae_decoder = VaeDecoder(vae)
    trace(vae_decoder, (latents,), out / "vae_decoder.pt")

    manifest = {
        "formatVersion": 1,
        "model": args.model,
        "steps": args.steps,
        "schedule": {"shift": args.shift} if args.sigmas is None else {"sigmas": args.sigmas},
        "sampler": args.sampler,
        "eta": args.eta,
        "cfg": args.cfg,
        "latentChannels": channels,
        "temporalStride": vae.config.scale_factor_temporal,
        "spatialStride": vae.config.scale_factor_spatial,
        "textLength": length,
        "timestepScale": 1000.0,
        "fps": args.fps,
        "dtype": args.dtype,
        "tokenizer": "huggingface",
        "weightBytes": tensor_bytes(text_encoder, denoiser, vae_decoder),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"export_diffusers: wrote {out} ({manifest['weightBytes']} bytes of {args.dtype} weights)")


if __name__ == "__main__":
    main()
