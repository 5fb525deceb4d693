#!/usr/bin/env bash
# The GPU memory check of issue 5, for one NVIDIA H100/H200 with torch 2.11 installed and no
# network: 20 alternating anisora/phr00t jobs (832x480, 81 frames) on a Shared model cache,
# with random-weight Wan models as wide as Wan 14B (tests/make_tiny_wan_models.py --heavy-gib:
# anisora's two experts about --weight-gib GiB in bfloat16, phr00t half that) and a ballast
# sized so both models never fit at once. Fails on any OOM or a model whose peak reserved
# memory varies by more than 2 %; prints a table with expandable_segments on (what runner
# pods get) and again with it off.
#
#   gpu-runner/scripts/gpu-check.sh [--jobs N] [--weight-gib G] [--binary PATH] [--work DIR]
#
# --binary: a gpu_check built elsewhere (the GPU machine has no network for cargo):
#   cargo build --release -p framelane-runner --example gpu_check
#   -> $CARGO_TARGET_DIR/release/examples/gpu_check (default: built here with cargo)
set -euo pipefail

JOBS=20
WEIGHT_GIB=16
BINARY=""
WORK="${TMPDIR:-/tmp}/framelane-gpu-check"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    --weight-gib) WEIGHT_GIB="$2"; shift 2 ;;
    --binary) BINARY="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; usage 2 ;;
  esac
done
[[ "$JOBS" =~ ^[0-9]+$ && "$JOBS" -ge 2 ]] || { echo "gpu-check: --jobs must be a number >= 2" >&2; exit 2; }
[[ "$WEIGHT_GIB" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "gpu-check: --weight-gib must be a number" >&2; exit 2; }

# torch 2.11: the preinstalled one, or the venv of setup-torch.sh.
PY="${FRAMELANE_TORCH_PYTHON:-python3}"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.__version__.startswith("2.11") else 1)' \
  || { echo "gpu-check: $PY has no torch 2.11 (set FRAMELANE_TORCH_PYTHON)" >&2; exit 1; }
LIBTORCH="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
export LIBTORCH LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export FRAMELANE_GPU_CHECK_EXPECT_CUDA=1
  "$PY" -c 'import torch; print("gpu-check:", torch.cuda.get_device_name(0), torch.__version__)'
else
  echo "gpu-check: no GPU visible: the check runs on the CPU, without a ballast"
fi

if [[ -z "$BINARY" ]]; then
  (cd "$ROOT" && cargo build --release -q -p framelane-runner --example gpu_check)
  BINARY="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/gpu_check"
fi
[[ -x "$BINARY" ]] || { echo "gpu-check: $BINARY is not an executable gpu_check" >&2; exit 1; }

mkdir -p "$WORK"
STAMP="$WORK/models/.weight-$WEIGHT_GIB"
if [[ ! -f "$STAMP" ]]; then
  echo "gpu-check: writing the models (anisora about ${WEIGHT_GIB} GiB) to $WORK/models"
  rm -rf "$WORK/models"
  "$PY" "$ROOT/gpu-runner/tests/make_tiny_wan_models.py" "$WORK/models" --heavy-gib "$WEIGHT_GIB"
  touch "$STAMP"
fi

status=0
for conf in "expandable_segments:True" "expandable_segments:False"; do
  echo
  PYTORCH_CUDA_ALLOC_CONF="$conf" "$BINARY" "$WORK/models" "$JOBS" || status=1
done
echo
echo "gpu-check: $( ((status == 0)) && echo passed || echo FAILED ) in ${SECONDS} s"
exit "$status"
