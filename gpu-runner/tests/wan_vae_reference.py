"""Writes a tiny random-weight diffusers AutoencoderKLWan and what diffusers computes with it,
the reference for tests/wan_vae.rs.

    python wan_vae_reference.py OUT_DIR

OUT_DIR/vae: the model as save_pretrained writes it (config.json, safetensors). A Wan 2.1 VAE
in every respect but its widths (z_dim 16, two residual blocks per level, temporal
downsampling in the last two levels).

OUT_DIR/reference.safetensors, all float32 unless said:
- latents: denoiser-space latents [1, 16, 5, 4, 6]; unnormalized: after the text-to-video
  pipeline's `latents / (1 / std) + mean`; video: vae.decode(unnormalized).sample (17 frames);
  frames: uint8 [17, 32, 48, 3], the pipeline's video processor's PIL frames of that video.
- video_in: a video [1, 3, 17, 32, 48] in [-1, 1]; encoded: encode(video_in).latent_dist.mode();
  encoded_normalized: the image-to-video pipeline's `(encoded - mean) * (1 / std)`.
- tiled_latents [1, 16, 3, 7, 9] and tiled_video: decode with tiling on; tiled_video_in
  [1, 3, 9, 56, 72] and tiled_encoded: encode with tiling on. Tiles of 32 pixels every 16
  (height) and 24 (width) pixels.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor
from safetensors.torch import save_file

TILING = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
              tile_sample_stride_width=24)


def main(out: Path):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True]).eval()
    # Default init leaves the output nearly constant; spread the weights so every layer counts.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    vae.save_pretrained(out / "vae")

    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)
    ref = {}
    with torch.no_grad():
        ref["latents"] = torch.randn(1, z_dim, 5, 4, 6)
        ref["unnormalized"] = ref["latents"] / inv_std + mean
        ref["video"] = vae.decode(ref["unnormalized"]).sample
        pil = VideoProcessor(vae_scale_factor=8).postprocess_video(ref["video"], output_type="pil")[0]
        ref["frames"] = torch.from_numpy(np.stack([np.asarray(image) for image in pil]))

        ref["video_in"] = torch.rand(1, 3, 17, 32, 48) * 2.0 - 1.0
        ref["encoded"] = vae.encode(ref["video_in"]).latent_dist.mode()
        ref["encoded_normalized"] = (ref["encoded"] - mean) * inv_std

        vae.enable_tiling(**TILING)
        ref["tiled_latents"] = torch.randn(1, z_dim, 3, 7, 9)
        ref["tiled_video"] = vae.decode(ref["tiled_latents"]).sample
        ref["tiled_video_in"] = torch.rand(1, 3, 9, 56, 72) * 2.0 - 1.0
        ref["tiled_encoded"] = vae.encode(ref["tiled_video_in"]).latent_dist.mode()
    save_file({k: v.contiguous() for k, v in ref.items()}, out / "reference.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
