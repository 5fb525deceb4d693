"""What transformers' UMT5EncoderModel and diffusers' WanPipeline compute for some prompts,
the reference for tests/wan_umt5.rs.

    python wan_umt5_reference.py PIPELINE_DIR OUT_FILE < case.json

PIPELINE_DIR is a tiny pipeline from make_tiny_wan_models.py (wan-t2v). case.json: {"prompts": [...],
"negativePrompt", "maxLength", "clean": [...]}. Stdout: one JSON object with "clean" (diffusers'
prompt_clean of each "clean" string), "ids" and "mask" (the pipeline tokenizer's, for each
cleaned prompt, padded to maxLength), "attention" (the encoder's attention implementation).
OUT_FILE (safetensors, float32):
- hidden: text_encoder(ids, mask).last_hidden_state of the prompts as one batch;
- embeds: pipe._get_t5_prompt_embeds(prompts);
- cond, uncond_default: pipe.encode_prompt(prompts[0]) with guidance and no negative prompt;
- uncond: the negative embeddings of pipe.encode_prompt(prompts[0], negativePrompt).
"""

import json
import sys

import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from safetensors.torch import save_file


def main(root: str, out: str):
    case = json.load(sys.stdin)
    length = case["maxLength"]
    pipe = WanPipeline.from_pretrained(root, torch_dtype=torch.float32)
    cleaned = [prompt_clean(p) for p in case["prompts"]]
    tokens = pipe.tokenizer(cleaned, padding="max_length", max_length=length, truncation=True,
                            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ref = {}
    with torch.no_grad():
        ref["hidden"] = pipe.text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
        ref["embeds"] = pipe._get_t5_prompt_embeds(case["prompts"], max_sequence_length=length)
        ref["cond"], ref["uncond_default"] = pipe.encode_prompt(
            case["prompts"][0], do_classifier_free_guidance=True, max_sequence_length=length)
        _, ref["uncond"] = pipe.encode_prompt(
            case["prompts"][0], case["negativePrompt"], do_classifier_free_guidance=True,
            max_sequence_length=length)
    save_file({k: v.contiguous() for k, v in ref.items()}, out)
    print(json.dumps({
        "clean": [prompt_clean(s) for s in case["clean"]],
        "ids": tokens.input_ids.tolist(),
        "mask": tokens.attention_mask.tolist(),
        "attention": pipe.text_encoder.config._attn_implementation,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
