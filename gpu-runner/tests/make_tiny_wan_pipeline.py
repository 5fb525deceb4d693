"""Writes a tiny diffusers Wan text-to-video pipeline with random weights, the layout a real
Wan2.1/2.2 checkpoint has (model_index.json, tokenizer/, text_encoder/, transformer/, vae/,
scheduler/), for testing scripts/export_diffusers.py without network or real weights.

    python make_tiny_wan_pipeline.py OUT_DIR

The tokenizer is a UMT5-style SentencePiece Unigram tokenizer built from a small vocabulary
(the real UMT5 tokenizer cannot be downloaded here); the models are the real diffusers and
transformers classes with tiny configs.
"""

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

WORDS = "a the fox red running through snow cat surfing at dusk blurry dog on beach in of and with".split()


def tokenizer() -> T5Tokenizer:
    # UMT5's special ids: 0 <pad>, 1 </s>, 2 <unk>; pieces carry SentencePiece's "▁" word mark.
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


def main(out: Path):
    torch.manual_seed(0)
    tok = tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    # Random init leaves the VAE near zero output; spread the weights so frames have content.
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.normal_(0.0, 0.2)
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder.eval(), transformer=transformer.eval(),
                       vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
