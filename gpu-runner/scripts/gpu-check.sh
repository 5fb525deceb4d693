#!/usr/bin/env bash
# The GPU memory check of issue 16, for one NVIDIA H100/H200 with torch 2.11 and no network:
# full-size Wan 2.2 A14B image to video (two 14B experts) and a 14B AllInOne text-to-video
# model with umT5-XXL and the Wan VAE, random weights written here (make_full_size_wan.py, fp8
# on disk, about 49 GB). For each size and each memory cap standing for a smaller card:
# N jobs alternating the two models on one Shared runner in the mode `auto` picks, each job's
# VAE tiled as the runner's fit check decides, with expandable_segments on and then off. A size
# the fit check refuses under a cap is not run. Records per stage peak allocated/reserved,
# seconds, OOMs and retries, the switch time, and seconds per denoising step against diffusers
# in the same mode. Fails on any OOM or retry, or a stage's peak reserved varying by more than
# 2 %.
#
#   gpu-runner/scripts/gpu-check.sh [--jobs N] [--sizes WxHxF,..] [--caps 80G,48G,24G]
#       [--modes auto,..] [--steps N] [--allocs expandable_segments:True,..]
#       [--transformer-weights compute|fp8] [--bundle DIR | --binary PATH] [--work DIR]
#       [--no-diffusers] [--show-refusal] [--tiny]
#
# --bundle: what gpu-check-bundle.sh made here for a GPU machine without network or Rust: the
#   gpu_check binary, and wheels (diffusers) installed under WORK/site for this run only.
# --binary: a gpu_check built elsewhere (else it is built here with cargo).
# --allocs: the PYTORCH_CUDA_ALLOC_CONF settings to run, in order (default: expandable
#   segments on, then off).
# --modes: the memory modes to run under each cap (resident, expert-swap, model-offload;
#   default auto: the one a runner picks for the cap).
# --transformer-weights: how the runner stores the experts' linear weights (a lane's
#   spec.runner.memory.transformerWeights; fp8 halves them), and diffusers too (its layerwise
#   casting to float8).
# --show-refusal: where the fit check refuses a job, force the first such one of each cap and
#   mode anyway; it must fail for memory (GPU only).
# --tiny: the CPU dry run: tiny models and sizes, each mode under one cap of 620M (a cap's
#   usable bytes are the cap less 5 % and 512 MiB, as a runner counts them: 52 MB here).
# diffusers and transformers must import in the torch Python (FRAMELANE_TORCH_PYTHON, else
# python3): the lent GPU machines lack diffusers alone, which --bundle brings.
set -euo pipefail

JOBS=20
SIZES="832x480x81,1280x720x81"
CAPS="80G,48G,24G"
MODES="auto"
STEPS=4
BINARY=""
BUNDLE=""
ALLOCS="expandable_segments:True,expandable_segments:False"
WORK="${TMPDIR:-/tmp}/framelane-gpu-check"
DIFFUSERS=1
TINY=""
SHOW_REFUSAL=""
WEIGHTS="compute"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

usage() { sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    --sizes) SIZES="$2"; shift 2 ;;
    --caps) CAPS="$2"; shift 2 ;;
    --modes) MODES="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --binary) BINARY="$2"; shift 2 ;;
    --bundle) BUNDLE="$2"; BINARY="$2/gpu_check"; shift 2 ;;
    --allocs) ALLOCS="$2"; shift 2 ;;
    --transformer-weights) WEIGHTS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --no-diffusers) DIFFUSERS=0; shift ;;
    --show-refusal) SHOW_REFUSAL=1; shift ;;
    --tiny) TINY=1; SIZES="64x48x9,96x64x17"; CAPS="620M"; MODES="resident,expert-swap,model-offload"; shift ;;
    -h|--help) usage 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; usage 2 ;;
  esac
done

# torch 2.11: the preinstalled one, or the venv of setup-torch.sh.
PY="${FRAMELANE_TORCH_PYTHON:-python3}"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.__version__.startswith("2.11") else 1)' \
  || { echo "gpu-check: $PY has no torch 2.11 (set FRAMELANE_TORCH_PYTHON)" >&2; exit 1; }
if [[ -n "$BUNDLE" ]]; then
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
    --upgrade --target "$WORK/site" "$BUNDLE"/wheels/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import diffusers, transformers' \
  || { echo "gpu-check: $PY cannot import diffusers and transformers (see --help)" >&2; exit 1; }
LIBTORCH="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
export LIBTORCH LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export FRAMELANE_GPU_CHECK_EXPECT_CUDA=1
  "$PY" -c 'import torch; print("gpu-check:", torch.cuda.get_device_name(0), torch.__version__)'
else
  echo "gpu-check: no GPU visible: a dry run on the CPU, without a ballast (not a GPU result)"
fi

if [[ -z "$BINARY" ]]; then
  (cd "$ROOT" && cargo build --release -q -p framelane-runner --example gpu_check)
  BINARY="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/gpu_check"
fi
[[ -x "$BINARY" ]] || { echo "gpu-check: $BINARY is not an executable gpu_check" >&2; exit 1; }

MODELS="$WORK/models${TINY:+-tiny}"
if [[ ! -f "$MODELS/.complete" ]]; then
  echo "gpu-check: writing the models to $MODELS"
  rm -rf "$MODELS"
  started=$SECONDS
  "$PY" "$ROOT/gpu-runner/scripts/make_full_size_wan.py" "$MODELS" ${TINY:+--tiny}
  touch "$MODELS/.complete"
  echo "gpu-check: models written in $((SECONDS - started)) s ($(du -sh "$MODELS" | cut -f1))"
fi

ARGS=(--jobs "$JOBS" --sizes "$SIZES" --caps "$CAPS" --modes "$MODES" --steps "$STEPS"
  --transformer-weights "$WEIGHTS" ${TINY:+--tiny} ${SHOW_REFUSAL:+--show-refusal})
((DIFFUSERS)) && ARGS+=(--diffusers "$PY" --diffusers-script "$ROOT/gpu-runner/scripts/gpu_check_diffusers.py")
status=0
IFS=, read -r -a CONFS <<<"$ALLOCS"
for conf in "${CONFS[@]}"; do
  echo
  PYTORCH_CUDA_ALLOC_CONF="$conf" "$BINARY" "$MODELS" "${ARGS[@]}" || status=1
done
echo
echo "gpu-check: $( ((status == 0)) && echo passed || echo FAILED ) in ${SECONDS} s"
exit "$status"
