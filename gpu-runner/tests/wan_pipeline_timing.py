"""Times diffusers' Wan pipelines on the jobs benches/runner.rs times the runner on.

    python wan_pipeline_timing.py MODELS_DIR < cases.json

cases.json: a list of {"name", "kind" (t2v: WanPipeline, i2v: WanImageToVideoPipeline), "model" (a
folder of MODELS_DIR), "image" (i2v), "prompt", "negativePrompt", "width", "height", "frames",
"steps", "guidance", "seed", "runs"}. Each pipeline runs as saved, in float32, on the CPU.

Stdout: one JSON line per case: {"name", "threads", "secondsPerStep", "secondsEndToEnd"}, each
the median of "runs" calls after one warm-up call. Per step: from the end of the first step to
the end of the last, over steps - 1 (callback_on_step_end), so neither setup nor the first step
counts. End to end: the whole call, prompt to decoded frames ("np" output).
"""

import json
import statistics
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


def time_case(root: Path, case: dict) -> dict:
    if case["kind"] == "i2v":
        pipe = WanImageToVideoPipeline.from_pretrained(root / case["model"], torch_dtype=torch.float32)
        extra = {"image": Image.open(root / case["image"]).convert("RGB")}
    else:
        pipe = WanPipeline.from_pretrained(root / case["model"], torch_dtype=torch.float32)
        extra = {}
    pipe.set_progress_bar_config(disable=True)
    per_step, whole = [], []
    for run in range(case["runs"] + 1):
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
        if run > 0:
            whole.append(time.perf_counter() - started)
            per_step.append((ends[-1] - ends[0]) / (len(ends) - 1))
    return {"name": case["name"], "threads": torch.get_num_threads(),
            "secondsPerStep": statistics.median(per_step), "secondsEndToEnd": statistics.median(whole)}


def main(root: Path):
    for case in json.load(sys.stdin):
        print(json.dumps(time_case(root, case)), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
