"""Random-weight Wan models of full size for the GPU check, written on the GPU machine (no
download), as ComfyUI files:

  OUT/a14b/high.safetensors, OUT/a14b/low.safetensors
      Wan 2.2 A14B image to video: two 14B experts (36 input channels), scaled fp8
  OUT/aio/aio.safetensors
      a 14B text-to-video AllInOne: the transformer in scaled fp8, umT5-XXL in fp8, the Wan VAE
      in float32. The A14B model reads its text encoder and VAE from this file too.
  OUT/tokenizer/, OUT/inputs/first-frame.png
      the tiny models' umT5-style tokenizer (its ids are valid umT5-XXL ids) and start image

fp8 on disk keeps the three 14B transformers and umT5-XXL at about 49 GB (64 GB of disk); the
runner upcasts to bfloat16 as it loads. `--tiny` writes the same layout at the tiny models'
shapes, for the CPU dry run. `--layers N` keeps the full widths (and the real VAE) but gives
the transformers and umT5-XXL N blocks each: what the fit bench (benches/fit.rs) runs on the
CPU.

    python make_full_size_wan.py OUT [--tiny | --layers N]
"""

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from make_tiny_wan_models import (TEXT_PREFIX, TRANSFORMER, TRANSFORMER_PREFIX, VAE, VAE_PREFIX,  # noqa: E402
                                  first_frame, tokenizer, vae_to_comfy)
from make_tiny_wan_transformers import to_comfy as transformer_to_comfy  # noqa: E402

WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, text_dim=4096,
               freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 feed_forward_proj="gated-gelu")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def shapes(make) -> dict:
    """Parameter names and shapes of a module built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in make().state_dict().items()}


def random(shape, fp8: bool, generator: torch.Generator):
    """N(0, 0.02) for matrices (1 + N(0, 0.1) for norms' scales), as fp8 or bfloat16, on DEVICE:
    a 14B transformer is made and quantised on the GPU and only its fp8 file comes to the host."""
    t = torch.randn(shape, generator=generator, device=DEVICE, dtype=torch.float32)
    t = t * 0.02 if len(shape) >= 2 else 1.0 + 0.1 * t
    return t.to(torch.float8_e4m3fn) if fp8 else t.to(torch.bfloat16)


def transformer(in_channels: int, seed: int, config: dict) -> dict:
    """A transformer's ComfyUI tensors: matrices in ComfyUI's scaled fp8, the rest bfloat16."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    state = {}
    for name, shape in shapes(lambda: WanTransformer3DModel(**config, in_channels=in_channels,
                                                            out_channels=16)).items():
        state[name] = random(shape, False, generator)
    comfy = transformer_to_comfy(state)
    out = {f"{TRANSFORMER_PREFIX}scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for name, tensor in comfy.items():
        key = TRANSFORMER_PREFIX + name
        if tensor.ndim == 2 and name.endswith(".weight"):
            scale = (tensor.float().abs().max() / 448.0).clamp(min=1e-8)
            out[key] = (tensor.float() / scale).to(torch.float8_e4m3fn).cpu()
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(()).cpu()
        else:
            out[key] = tensor.cpu()
    return out


def text_encoder(vocab: int, tiny: bool, layers: int) -> dict:
    config = UMT5Config(vocab_size=vocab, **TINY_UMT5) if tiny else UMT5Config(**{**UMT5_XXL, "num_layers": layers})
    generator = torch.Generator(DEVICE).manual_seed(10)
    state = {name: random(shape, len(shape) >= 2, generator).cpu()
             for name, shape in shapes(lambda: UMT5EncoderModel(config)).items()}
    # transformers saves the tied embedding twice; ComfyUI files keep `shared.weight` only.
    return {TEXT_PREFIX + k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def main(out: Path, tiny: bool, layers: int | None):
    tok = tokenizer()
    (out / "a14b").mkdir(parents=True, exist_ok=True)
    (out / "aio").mkdir(parents=True, exist_ok=True)
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out / "tokenizer")
    first_frame(out / "inputs" / "first-frame.png")
    config = TRANSFORMER if tiny else {**WAN_14B, "num_layers": layers or WAN_14B["num_layers"]}
    for name, seed in [("high", 2), ("low", 3)]:
        save_file(transformer(36, seed, config), out / "a14b" / f"{name}.safetensors")
    torch.manual_seed(20)
    vae = AutoencoderKLWan(**VAE) if tiny else AutoencoderKLWan()
    allinone = {
        **transformer(16, 1, config),
        **text_encoder(len(tok), tiny, layers or UMT5_XXL["num_layers"]),
        **{VAE_PREFIX + k: v.contiguous() for k, v in vae_to_comfy(vae.state_dict()).items()},
    }
    assert any(k.startswith(TEXT_PREFIX) for k in allinone)
    save_file(allinone, out / "aio" / "aio.safetensors")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="the tiny models' shapes (CPU dry run)")
    parser.add_argument("--layers", type=int, help="full widths with this many blocks (the fit bench)")
    args = parser.parse_args()
    main(args.out, args.tiny, args.layers)
