"""Times diffusers' Wan pipelines on the jobs benches/runner.rs times the runner on, one call
at a time, so the bench can alternate the two under the same machine load.

    python wan_pipeline_timing.py MODELS_DIR

Reads one case per stdin line: {"name", "kind" (t2v: WanPipeline, i2v: WanImageToVideoPipeline),
"model" (a folder of MODELS_DIR), "image" (i2v), "prompt", "negativePrompt", "width", "height",
"frames", "steps", "guidance", "seed"}. Each pipeline runs as saved, in float32, on the CPU,
loaded once per model. Answers each case with one stdout line: {"name", "threads",
"secondsPerStep", "secondsEndToEnd"} of one call. Per step: from the end of the first step to
the end of the last, over steps - 1 (callback_on_step_end), so neither setup nor the first step
counts. End to end: the whole call, prompt to decoded frames ("np" output).
"""

import json
import sys
import time
from pathlib import Path

import torch
import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v
from diffusers import WanImageToVideoPipeline, WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from PIL import Image

# The image-to-video pipeline's prompt_clean needs ftfy, which the venv lacks.
wan_i2v.prompt_clean = prompt_clean


def load(root: Path, case: dict, cache: dict):
    if case["model"] not in cache:
        kind = WanImageToVideoPipeline if case["kind"] == "i2v" else WanPipeline
        pipe = kind.from_pretrained(root / case["model"], torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        cache[case["model"]] = pipe
    return cache[case["model"]]


def time_case(pipe, root: Path, case: dict) -> dict:
    extra = {"image": Image.open(root / case["image"]).convert("RGB")} if case["kind"] == "i2v" else {}
    ends = []

    def on_step(pipe, i, t, kwargs):
        ends.append(time.perf_counter())
        return kwargs

    started = time.perf_counter()
    with torch.no_grad():
        pipe(prompt=case["prompt"], negative_prompt=case["negativePrompt"], height=case["height"],
             width=case["width"], num_frames=case["frames"], num_inference_steps=case["steps"],
             guidance_scale=case["guidance"], generator=torch.Generator().manual_seed(case["seed"]),
             output_type="np", callback_on_step_end=on_step, **extra)
    return {"name": case["name"], "threads": torch.get_num_threads(),
            "secondsPerStep": (ends[-1] - ends[0]) / (len(ends) - 1),
            "secondsEndToEnd": time.perf_counter() - started}


def main(root: Path):
    cache = {}
    for line in sys.stdin:
        case = json.loads(line)
        print(json.dumps(time_case(load(root, case, cache), root, case)), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
