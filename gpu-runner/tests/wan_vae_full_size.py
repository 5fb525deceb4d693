"""Writes diffusers' AutoencoderKLWan at its default size (the Wan 2.1 VAE: base_dim 96,
127M parameters) with random weights, for tests/wan_vae_memory.rs.

    python wan_vae_full_size.py OUT_DIR
"""

import sys

import torch
from diffusers import AutoencoderKLWan

torch.manual_seed(0)
AutoencoderKLWan().save_pretrained(sys.argv[1])
