"""Tiny random-weight Wan models in every layout the runner reads, for the tests, the benchmark
and the demo (nothing is downloaded).

    python make_tiny_wan_models.py OUT_DIR [--heavy-gib G]

OUT_DIR gets:
  wan-t2v/                    a diffusers WanPipeline: one text-to-video transformer (16 channels),
                              UniPC flow with shift 3 as saved (scheduler/), tokenizer, umT5, VAE
  anisora/                    a diffusers WanImageToVideoPipeline in the Wan 2.2 A14B shape: two
                              36-channel experts (transformer/, transformer_2/), boundary_ratio 0.9,
                              no image encoder, UniPC flow with shift 5
  phr00t/phr00t-aio.safetensors      wan-t2v as one ComfyUI AllInOne file: `model.diffusion_model.`,
                              `text_encoders.umt5xxl.transformer.` and `vae.` under ComfyUI's names
  phr00t/phr00t-aio-fp8.safetensors  the same, the transformer's linear weights in ComfyUI's scaled fp8
  phr00t/tokenizer/           the tokenizer (ComfyUI files carry none the runner reads)
  phr00t/fp8-dequantized-transformer.safetensors  what the fp8 file's transformer stands for
  inputs/first-frame.png      an 80x56 RGB picture for image-to-video jobs
  inputs/orientation-N.jpg    the same picture as a JPEG, stored as EXIF orientation N (1 to 8)
                              says a camera stores it

The transformers have Wan's head size (128) so ComfyUI's config inference applies, and the VAE has
the Wan 2.1 VAE's block structure (4 stages, 2 residual blocks each), the one diffusers' single-file
conversion is written for. ComfyUI names are accepted only if diffusers' own conversion
(convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers, and the prefix its T5 loader
strips) turns them back into exactly the diffusers state dicts, so the tests do not trust the
runner's mapping.

`--heavy-gib G` (the GPU memory check) writes only anisora, phr00t and inputs, in bfloat16, with
transformers as wide as Wan 14B's (40 heads of 128, feed-forward 13824) and as many layers as make
anisora's two experts about G GiB.
"""

import argparse
import sys
from pathlib import Path

import numpy
import torch
from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                       WanTransformer3DModel)
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_wan_transformers import to_comfy as transformer_to_comfy  # noqa: E402

WORDS = "a the fox red running through snow cat surfing at dusk blurry dog on beach in of and with".split()
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, text_dim=32, freq_dim=256,
                   ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
WIDE = dict(num_attention_heads=40, ffn_dim=13824)
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
TEXT_PREFIX = "text_encoders.umt5xxl.transformer."
VAE_PREFIX = "vae."
TRANSFORMER_PREFIX = "model.diffusion_model."


def tokenizer() -> T5Tokenizer:
    """A UMT5-style SentencePiece Unigram tokenizer over a small vocabulary (the real one cannot be
    downloaded here). UMT5's special ids: 0 <pad>, 1 </s>, 2 <unk>; pieces carry the "▁" word mark."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -6.0) for c in sorted(set("".join(WORDS)) | set(",.!?'"))]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [(w, -3.0) for w in WORDS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5Tokenizer(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def text_encoder(vocab: int) -> UMT5EncoderModel:
    torch.manual_seed(10)
    return UMT5EncoderModel(
        UMT5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    ).eval()


def transformer(in_channels: int, seed: int, shape: dict) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**dict(TRANSFORMER, **shape), in_channels=in_channels, out_channels=16).eval()
    # Default init leaves norms at 1 and biases at 0; move them so every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def vae() -> AutoencoderKLWan:
    torch.manual_seed(20)
    model = AutoencoderKLWan(**VAE).eval()
    # Default init decodes to nearly flat frames; spread the weights so frames have content,
    # and keep the encoder's latents in the range real ones have.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("decoder.", "post_quant_conv.")):
                p.normal_(0.0, 0.25 if p.ndim > 1 else 0.1)
            elif name.endswith("gamma"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def unipc(shift: float) -> UniPCMultistepScheduler:
    """Wan's saved scheduler: UniPC multistep on flow sigmas."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=shift)


def vae_to_comfy(state: dict) -> dict:
    """diffusers' VAE names to the original Wan names, checked against diffusers' own conversion."""
    residual = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                "conv2": "residual.6", "conv_shortcut": "shortcut"}
    per_stage = VAE["num_res_blocks"] + 2  # residual blocks, then an upsampler

    def block(rest: str) -> str:
        for a, b in residual.items():
            if rest == a or rest.startswith(a + "."):
                return b + rest[len(a):]
        return rest

    def rename(key: str) -> str:
        fixed = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
        top, rest = key.split(".", 1)
        if top in fixed:
            return f"{fixed[top]}.{rest}"
        part, rest = rest.split(".", 1)
        if part == "conv_in":
            return f"{top}.conv1.{rest}"
        if part == "norm_out":
            return f"{top}.head.0.{rest}"
        if part == "conv_out":
            return f"{top}.head.2.{rest}"
        if part == "mid_block":
            kind, index, inner = rest.split(".", 2)
            if kind == "attentions":
                return f"{top}.middle.1.{inner}"
            return f"{top}.middle.{2 * int(index)}.{block(inner)}"
        if part == "down_blocks":
            index, inner = rest.split(".", 1)
            return f"{top}.downsamples.{index}.{block(inner)}"
        if part == "up_blocks":
            stage, kind, inner = rest.split(".", 2)
            if kind == "resnets":
                index, inner = inner.split(".", 1)
                return f"{top}.upsamples.{int(stage) * per_stage + int(index)}.{block(inner)}"
            assert kind == "upsamplers" and inner.startswith("0."), key
            return f"{top}.upsamples.{int(stage) * per_stage + per_stage - 1}.{inner[2:]}"
        raise ValueError(f"unexpected VAE tensor {key}")

    out = {rename(k): v for k, v in state.items()}
    back = convert_wan_vae_to_diffusers(dict(out))
    assert back.keys() == state.keys(), sorted(set(back) ^ set(state))
    assert all(torch.equal(back[k], state[k]) for k in state)
    return out


def text_to_comfy(state: dict) -> dict:
    """transformers' UMT5 names under ComfyUI's text-encoder prefix: what diffusers' single-file T5
    loader strips (convert_sd3_t5_checkpoint_to_diffusers), for the umT5-XXL slot."""
    out = {TEXT_PREFIX + k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    back = {k[len(TEXT_PREFIX):]: v for k, v in out.items()}
    assert all(torch.equal(back[k], state[k]) for k in back) and "shared.weight" in back
    return out


def scaled_fp8(state: dict) -> dict:
    """ComfyUI's scaled fp8: each linear weight as float8_e4m3fn divided by a per-tensor scale,
    the scale beside it (`scale_weight`), and a `scaled_fp8` marker."""
    out = {f"{TRANSFORMER_PREFIX}scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for k, v in state.items():
        if k.startswith(TRANSFORMER_PREFIX) and v.ndim == 2 and k.endswith(".weight"):
            scale = (v.abs().max() / 448.0).float()
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    return out


def dequantized_transformer(fp8_file: dict) -> dict:
    """The diffusers transformer state an fp8 file stands for: each weight upcast and scaled."""
    state = {}
    for k, v in fp8_file.items():
        if not k.startswith(TRANSFORMER_PREFIX) or k.endswith(("scale_weight", "scaled_fp8")):
            continue
        scale = fp8_file.get(k[: -len("weight")] + "scale_weight") if k.endswith(".weight") else None
        state[k] = v.float() * scale if scale is not None else v
    return convert_wan_transformer_to_diffusers(state)


def first_frame(path: Path):
    """A picture with edges and gradients in every channel, of another size and aspect than the
    jobs, so resizing matters."""
    y, x = numpy.mgrid[0:56, 0:80]
    rgb = numpy.stack([
        (x * 3 + y) % 256,
        numpy.where((x // 10 + y // 8) % 2 == 0, 220, 40),
        (128 + 100 * numpy.sin(x / 6.0) * numpy.cos(y / 5.0)).astype(int),
    ], axis=-1).astype(numpy.uint8)
    picture = Image.fromarray(rgb, "RGB")
    picture.save(path)
    # What a camera stores for each EXIF orientation: the upright picture turned the other way,
    # so that ImageOps.exif_transpose turns it upright again.
    stored = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_270}
    for orientation, turn in stored.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        image = picture if turn is None else picture.transpose(turn)
        image.save(path.parent / f"orientation-{orientation}.jpg", quality=95, exif=exif)


def contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items()}


def heavy_layers(gib: float) -> int:
    """Layers per expert that make two wide experts about `gib` GiB in bfloat16."""
    dim = WIDE["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    per_layer = (8 * dim * dim + 2 * dim * WIDE["ffn_dim"]) * 2
    return max(1, round(gib * 2**30 / (2 * per_layer)))


def main(out: Path, heavy_gib: float | None):
    tok = tokenizer()
    encoder = text_encoder(len(tok))
    autoencoder = vae()
    shape = {} if heavy_gib is None else dict(WIDE, num_layers=heavy_layers(heavy_gib))
    dtype = torch.float32 if heavy_gib is None else torch.bfloat16

    high, low = transformer(36, 2, shape).to(dtype), transformer(36, 3, shape).to(dtype)
    WanImageToVideoPipeline(tokenizer=tok, text_encoder=encoder, vae=autoencoder, scheduler=unipc(5.0),
                            transformer=high, transformer_2=low, boundary_ratio=0.9).save_pretrained(out / "anisora")
    del high, low

    t2v = transformer(16, 1, shape).to(dtype)
    if heavy_gib is None:
        WanPipeline(tokenizer=tok, text_encoder=encoder, transformer=t2v, vae=autoencoder,
                    scheduler=unipc(3.0)).save_pretrained(out / "wan-t2v")

    phr00t = out / "phr00t"
    phr00t.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(phr00t / "tokenizer")
    allinone = {
        **transformer_to_comfy({k: v.detach().clone() for k, v in t2v.state_dict().items()}),
        **text_to_comfy(encoder.state_dict()),
        **{VAE_PREFIX + k: v for k, v in vae_to_comfy(autoencoder.state_dict()).items()},
    }
    save_file(contiguous(allinone), phr00t / "phr00t-aio.safetensors")
    t2v_names = t2v.state_dict().keys()
    del t2v
    (out / "inputs").mkdir(exist_ok=True)
    first_frame(out / "inputs" / "first-frame.png")
    if heavy_gib is not None:
        return
    fp8 = scaled_fp8(allinone)
    save_file(contiguous(fp8), phr00t / "phr00t-aio-fp8.safetensors")
    dequantized = dequantized_transformer(fp8)
    assert dequantized.keys() == t2v_names
    save_file(contiguous(dequantized), phr00t / "fp8-dequantized-transformer.safetensors")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--heavy-gib", type=float)
    args = parser.parse_args()
    main(args.out, args.heavy_gib)
