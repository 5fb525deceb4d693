"""Tiny random-weight diffusers WanTransformer3DModel checkpoints, the same weights in ComfyUI's
layouts, and diffusers' outputs for fixed inputs: the reference for tests/wan_transformer.rs and
tests/wan_weights.rs.

    python make_tiny_wan_transformers.py OUT_DIR

OUT_DIR gets:
  t2v/transformer/                 16 channels, head size 16 (diffusers layout, one file)
  i2v/transformer/                 36 in / 16 out channels, head size 128 (ComfyUI can infer it)
  i2v/transformer_2/               the low-noise expert: other weights, sharded with an index
  comfy/single.safetensors         i2v/transformer under ComfyUI names, `model.diffusion_model.`
  comfy/allinone.safetensors       the same plus `text_encoders.` and `vae.` tensors
  comfy/split-{1,2}.safetensors    the same without prefix, split over two files
  comfy/fp8.safetensors            2-D weights as float8_e4m3fn (ComfyUI fp8 checkpoints)
  comfy/scaled_fp8.safetensors     2-D weights as float8_e4m3fn / scale + `scale_weight`
  comfy/missing.safetensors        one tensor left out
  comfy/wrong_shape.safetensors    one bias one element short
  comfy/vace.safetensors           an extra VACE tensor
  comfy/wan21_i2v.safetensors      an extra Wan 2.1 image-embedding tensor
  cases.safetensors                inputs, diffusers' outputs and its time per t2v forward

ComfyUI names are made by renaming diffusers' keys and are accepted only if diffusers' own
single-file conversion (convert_wan_transformer_to_diffusers) turns them back into exactly the
original state dict, so the tests do not trust the runner's mapping.
"""

import sys
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

COMMON = dict(patch_size=(1, 2, 2), text_dim=32, freq_dim=256, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6)
T2V = dict(COMMON, num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, ffn_dim=48,
           rope_max_seq_len=32)
I2V = dict(COMMON, num_attention_heads=2, attention_head_dim=128, in_channels=36, out_channels=16, ffn_dim=64)
PREFIX = "model.diffusion_model."


def tiny(config: dict, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    # Default init leaves norms at 1 and some biases at 0; move them so every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(config: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(2, config["in_channels"], 3, 8, 8, generator=g),
        # A UniPC-like integer timestep and a fractional one, one per batch item.
        "timestep": torch.tensor([999.0, 412.5]),
        "context": torch.randn(2, 7, config["text_dim"], generator=g),
    }


@torch.no_grad()
def forward(model, x: dict, dtype=torch.float32) -> torch.Tensor:
    out = model(hidden_states=x["latents"].to(dtype), timestep=x["timestep"],
                encoder_hidden_states=x["context"].to(dtype), return_dict=False)[0]
    return out.float()


def to_comfy(state: dict) -> dict:
    """diffusers names to the original Wan names, checked against diffusers' own conversion."""
    renames = [
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("proj_out", "head.head"),
        (".attn1.", ".self_attn."),
        (".attn2.", ".cross_attn."),
        (".to_out.0.", ".o."),
        (".to_q.", ".q."),
        (".to_k.", ".k."),
        (".to_v.", ".v."),
        (".ffn.net.0.proj.", ".ffn.0."),
        (".ffn.net.2.", ".ffn.2."),
        (".norm2.", ".norm3."),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for a, b in renames:
            new = new.replace(a, b)
        if new == "scale_shift_table":
            new = "head.modulation"
        new = new.replace(".scale_shift_table", ".modulation")
        out[PREFIX + new] = value
    back = convert_wan_transformer_to_diffusers(dict(out))
    assert back.keys() == state.keys(), sorted(set(back) ^ set(state))
    assert all(torch.equal(back[k], state[k]) for k in state)
    return out


def contiguous(state: dict) -> dict:
    return {k: v.contiguous() for k, v in state.items()}


def is_linear_weight(name: str, value: torch.Tensor) -> bool:
    return value.ndim == 2 and name.endswith(".weight")


def main(out: Path):
    cases = {}

    t2v = tiny(T2V, seed=1)
    t2v.save_pretrained(out / "t2v" / "transformer")
    x = inputs(T2V, seed=11)
    cases.update({f"t2v.{k}": v for k, v in x.items()})
    cases["t2v.out"] = forward(t2v, x)
    started = time.perf_counter()
    for _ in range(5):
        forward(t2v, x)
    cases["t2v.diffusers_ms"] = torch.tensor([(time.perf_counter() - started) * 1000 / 5])
    bf16 = WanTransformer3DModel.from_pretrained(out / "t2v" / "transformer", torch_dtype=torch.bfloat16).eval()
    cases["t2v.out_bf16"] = forward(bf16, x, torch.bfloat16)

    i2v = tiny(I2V, seed=2)
    i2v.save_pretrained(out / "i2v" / "transformer")
    x = inputs(I2V, seed=12)
    cases.update({f"i2v.{k}": v for k, v in x.items()})
    cases["i2v.out"] = forward(i2v, x)

    low = tiny(I2V, seed=3)
    low.save_pretrained(out / "i2v" / "transformer_2", max_shard_size="1MB")
    cases["i2v.out_2"] = forward(low, x)

    comfy = out / "comfy"
    comfy.mkdir()
    state = {k: v.detach().clone() for k, v in i2v.state_dict().items()}
    named = contiguous(to_comfy(state))
    save_file(named, comfy / "single.safetensors")

    g = torch.Generator().manual_seed(4)
    others = {
        "text_encoders.umt5xxl.transformer.shared.weight": torch.randn(50, 32, generator=g),
        "text_encoders.umt5xxl.transformer.encoder.final_layer_norm.weight": torch.randn(32, generator=g),
        "vae.decoder.middle.0.residual.0.gamma": torch.randn(8, 1, 1, 1, generator=g),
        "vae.encoder.conv1.weight": torch.randn(8, 3, 3, 3, 3, generator=g),
    }
    save_file({**named, **others}, comfy / "allinone.safetensors")

    bare = {k[len(PREFIX):]: v for k, v in named.items()}
    keys = sorted(bare)
    save_file({k: bare[k] for k in keys[::2]}, comfy / "split-1.safetensors")
    save_file({k: bare[k] for k in keys[1::2]}, comfy / "split-2.safetensors")

    fp8 = {k: v.to(torch.float8_e4m3fn) if is_linear_weight(k, v) else v for k, v in named.items()}
    save_file(fp8, comfy / "fp8.safetensors")
    dequantized = {k: v.float() for k, v in fp8.items()}

    scaled = {f"{PREFIX}scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    scaled_ref = {}
    for k, v in named.items():
        if is_linear_weight(k, v):
            scale = (v.abs().max() / 448.0).float()
            q = (v / scale).to(torch.float8_e4m3fn)
            scaled[k] = q
            scaled[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            scaled_ref[k] = q.float() * scale
        else:
            scaled[k] = v
            scaled_ref[k] = v
    save_file(scaled, comfy / "scaled_fp8.safetensors")

    missing = dict(named)
    del missing[f"{PREFIX}blocks.1.cross_attn.k.weight"]
    save_file(missing, comfy / "missing.safetensors")
    wrong = dict(named)
    wrong[f"{PREFIX}blocks.1.ffn.0.bias"] = wrong[f"{PREFIX}blocks.1.ffn.0.bias"][:-1].contiguous()
    save_file(wrong, comfy / "wrong_shape.safetensors")
    save_file({**named, f"{PREFIX}vace_blocks.0.after_proj.bias": torch.zeros(256)}, comfy / "vace.safetensors")
    save_file({**named, f"{PREFIX}img_emb.proj.0.weight": torch.ones(1280)}, comfy / "wan21_i2v.safetensors")

    for label, weights in [("fp8", dequantized), ("scaled_fp8", scaled_ref)]:
        reference = WanTransformer3DModel(**I2V).eval()
        diffusers_state = convert_wan_transformer_to_diffusers(
            {k: v for k, v in weights.items() if not k.endswith(("scale_weight", "scaled_fp8"))})
        reference.load_state_dict(diffusers_state)
        cases[f"i2v.out_{label}"] = forward(reference, x)

    save_file(contiguous(cases), out / "cases.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
