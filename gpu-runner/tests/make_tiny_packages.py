"""Writes tiny Framelane model packages: real TorchScript modules with random weights.

    python make_tiny_packages.py OUT_DIR [--bulk-gib N]

creates OUT_DIR/anisora (anisora-like: 8 steps, shift schedule, cfg 3.0, euler) and
OUT_DIR/phr00t (phr00t-like: 4 steps, explicit sigmas, cfg 1.0, euler_ancestral). The module
interfaces are the package contract of docs/models.md. `--bulk-gib N` gives each denoiser
an extra N GiB float32 parameter (its weights, as far as the device is concerned), for the
GPU memory check (scripts/gpu-check.sh):

  text_encoder(input_ids: int64[B, L]) -> float[B, L, D]
  denoiser(x: float[B, C, T, H, W], timestep: float[B], context: float[B, L, D]) -> float[B, C, T, H, W]
  vae_decoder(latents: float[B, C, T, H, W]) -> float[B, 3, (T - 1) * ts + 1, H * ss, W * ss] in [-1, 1]
"""

import argparse
import json
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
    def __init__(self, channels: int, text_dim: int, hidden: int, bulk_gib: float = 0.0):
        super().__init__()
        # Weight that costs device memory and nothing else (the GPU check's "large model").
        self.bulk = nn.Parameter(torch.zeros(int(bulk_gib * 2**30) // 4))
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


def write_package(out: Path, manifest: dict, seed: int, channels=4, text_dim=16, hidden=32, ts=4, ss=4, bulk_gib=0.0):
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    te, dn, vae = TextEncoder(text_dim), Denoiser(channels, text_dim, hidden, bulk_gib), VaeDecoder(channels, ts, ss)
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


def main(root: Path, bulk_gib: float):
    write_package(
        root / "anisora",
        {"model": "anisora", "steps": 8, "schedule": {"shift": 5.0}, "sampler": "euler", "cfg": 3.0},
        seed=1,
        bulk_gib=bulk_gib,
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
        bulk_gib=bulk_gib,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Writes the tiny anisora and phr00t packages.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--bulk-gib", type=float, default=0.0, help="extra denoiser weight per package, GiB")
    args = parser.parse_args()
    main(args.out, args.bulk_gib)
