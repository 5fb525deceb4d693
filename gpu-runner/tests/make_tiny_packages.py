"""Writes tiny Framelane model packages: real TorchScript modules with random weights.

    python make_tiny_packages.py OUT_DIR

creates OUT_DIR/anisora (anisora-like: 8 steps, shift schedule, cfg 3.0, euler) and
OUT_DIR/phr00t (phr00t-like: 4 steps, explicit sigmas, cfg 1.0, euler_ancestral). The module
interfaces are the package contract of gpu-runner/README.md:

  text_encoder(input_ids: int64[B, L]) -> float[B, L, D]
  denoiser(x: float[B, C, T, H, W], timestep: float[B], context: float[B, L, D]) -> float[B, C, T, H, W]
  vae_decoder(latents: float[B, C, T, H, W]) -> float[B, 3, (T - 1) * ts + 1, H * ss, W * ss] in [-1, 1]
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

VOCAB = 257  # byte tokenizer: 0 is padding, byte b is b + 1


class TextEncoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.embed(input_ids)))


class Denoiser(nn.Module):
    def __init__(self, channels: int, text_dim: int, hidden: int):
        super().__init__()
        self.inp = nn.Conv3d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.text = nn.Linear(text_dim, hidden)
        self.out = nn.Conv3d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = self.time((timestep / 1000.0).unsqueeze(-1).to(x.dtype))
        c = self.text(context.mean(dim=1))
        h = self.inp(x) + (t + c)[:, :, None, None, None]
        return self.out(F.silu(h))


class VaeDecoder(nn.Module):
    def __init__(self, channels: int, temporal_stride: int, spatial_stride: int):
        super().__init__()
        self.temporal_stride = temporal_stride
        self.spatial_stride = spatial_stride
        self.mix = nn.Conv3d(channels, 8, 1)
        self.rgb = nn.Conv3d(8, 3, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.mix(latents)
        # Causal video VAE layout: the first latent frame is one frame, each later one is
        # `temporal_stride` frames.
        h = torch.cat([h[:, :, :1], h[:, :, 1:].repeat_interleave(self.temporal_stride, dim=2)], dim=2)
        h = F.interpolate(h, scale_factor=(1.0, float(self.spatial_stride), float(self.spatial_stride)), mode="nearest")
        return torch.tanh(self.rgb(F.silu(h)))


def weight_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def write_package(out: Path, manifest: dict, seed: int, channels=4, text_dim=16, hidden=32, ts=4, ss=4):
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    te, dn, vae = TextEncoder(text_dim), Denoiser(channels, text_dim, hidden), VaeDecoder(channels, ts, ss)
    for name, module in (("text_encoder", te), ("denoiser", dn), ("vae_decoder", vae)):
        torch.jit.script(module.eval()).save(str(out / f"{name}.pt"))
    manifest = {
        "formatVersion": 1,
        "latentChannels": channels,
        "temporalStride": ts,
        "spatialStride": ss,
        "textLength": 32,
        "timestepScale": 1000.0,
        "fps": 16,
        "dtype": "float32",
        "tokenizer": "bytes",
        "weightBytes": weight_bytes(te, dn, vae),
        **manifest,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(root: Path):
    write_package(
        root / "anisora",
        {"model": "anisora", "steps": 8, "schedule": {"shift": 5.0}, "sampler": "euler", "cfg": 3.0},
        seed=1,
    )
    write_package(
        root / "phr00t",
        {
            "model": "phr00t",
            "steps": 4,
            "schedule": {"sigmas": [1.0, 0.9375, 0.8333333, 0.625, 0.0]},
            "sampler": "euler_ancestral",
            "eta": 1.0,
            "cfg": 1.0,
        },
        seed=2,
        hidden=48,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
