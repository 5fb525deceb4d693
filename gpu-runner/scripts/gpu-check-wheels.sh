#!/usr/bin/env bash
# Downloads the wheels gpu-check.sh needs beside torch into DIR, on a machine with network, for
# a GPU machine without: diffusers, transformers, accelerate and the rest of the torch venv of
# setup-torch.sh (torch, triton and the nvidia-* libraries excluded: the GPU machine has them).
# About 30 MB: it fits the 64 MiB a device run carries. Carry DIR along and set
# FRAMELANE_GPU_CHECK_WHEELS=DIR for gpu-check.sh. The GPU machine's Python must be the same
# minor version as this one (tokenizers, regex and safetensors ship compiled wheels).
#
#   gpu-runner/scripts/gpu-check-wheels.sh DIR
set -euo pipefail
DIR="${1:?usage: gpu-check-wheels.sh DIR}"
PY="${FRAMELANE_TORCH_PYTHON:-python3}"
mkdir -p "$DIR"
"$PY" -m pip freeze --disable-pip-version-check \
  | grep -v -E '^(torch|triton|nvidia-|numpy)' > "$DIR/requirements.txt"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$DIR" -r "$DIR/requirements.txt"
du -sh "$DIR"
