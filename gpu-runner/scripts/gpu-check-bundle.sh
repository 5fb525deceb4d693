#!/usr/bin/env bash
# Makes DIR: what gpu-check.sh needs on a GPU machine that has torch 2.11 but no network and no
# Rust (the lent H100/H200 machines), built here. Carry DIR with the run and pass `--bundle DIR`.
#
#   DIR/gpu_check   the gpu_check example, release build, stripped (it loads the GPU machine's
#                   libtorch at run time: gpu-check.sh sets LD_LIBRARY_PATH from its torch)
#   DIR/wheels/     the Python packages that machine's torch environment lacks, for its Python:
#                   diffusers (the version setup-torch.sh pins) and importlib_metadata. Its image
#                   already has transformers, accelerate, safetensors, tokenizers, huggingface_hub,
#                   numpy and Pillow (about 7 MB; a device run carries 64 MiB in all).
#
#   gpu-runner/scripts/gpu-check-bundle.sh DIR [--python-version 3.12]
#
# --python-version: the GPU machine's Python (3.12 on the lent machines); the wheels are pure
#   Python, but pip picks versions by it.
set -euo pipefail
DIR="${1:?usage: gpu-check-bundle.sh DIR [--python-version X.Y]}"
PYTHON_VERSION=3.12
[[ "${2:-}" == --python-version ]] && PYTHON_VERSION="${3:?--python-version needs X.Y}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

DIFFUSERS="$(grep -o '"diffusers==[^"]*"' "$ROOT/gpu-runner/scripts/setup-torch.sh" | tr -d '"')"
[[ -n "$DIFFUSERS" ]] || { echo "gpu-check-bundle: no diffusers pin in setup-torch.sh" >&2; exit 1; }

eval "$("$ROOT/gpu-runner/scripts/setup-torch.sh")"
(cd "$ROOT" && cargo build --release -q -p framelane-runner --example gpu_check)
rm -rf "$DIR" && mkdir -p "$DIR/wheels"
strip -o "$DIR/gpu_check" "${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/gpu_check"

"$FRAMELANE_TORCH_PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_17_x86_64 --dest "$DIR/wheels" "$DIFFUSERS" importlib_metadata
du -sh "$DIR/gpu_check" "$DIR/wheels"
