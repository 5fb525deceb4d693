#!/usr/bin/env bash
# Installs the torch wheel that provides libtorch for tch (build) and `import torch` (tests'
# model and reference scripts) into a venv outside the repo, keyed by version, so repeated
# runs are a no-op. Prints the env vars to export on its last lines (eval-able).
#
#   eval "$(gpu-runner/scripts/setup-torch.sh)"
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
PYTHON="${PYTHON:-python3}"
PY_TAG="$("$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}.{sys.version_info[1]}")')"
VENV="${FRAMELANE_TORCH_VENV:-${FRAMELANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/framelane}/torch-$TORCH_VERSION-$PY_TAG}"
# diffusers, transformers and accelerate: the tests build tiny Wan models with them and compare
# the runner with diffusers' pipelines. Pinned to the versions the runner was verified with.
PACKAGES=("torch==$TORCH_VERSION" "numpy" "diffusers==0.42.1" "transformers==5.24.0" "accelerate==1.15.0")
# The stamp names the package list, so changing it installs the difference into an old venv.
STAMP="$VENV/.framelane-installed-$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-12)"

if [[ ! -f "$STAMP" ]]; then
  echo "setup-torch: installing ${PACKAGES[*]} into $VENV (several GB, once)" >&2
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
  touch "$STAMP"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
LIBTORCH="$SITE/torch"
[[ -f "$LIBTORCH/lib/libtorch_cpu.so" ]] || { echo "setup-torch: $LIBTORCH/lib/libtorch_cpu.so missing; delete $VENV and rerun" >&2; exit 1; }

echo "export LIBTORCH='$LIBTORCH'"
echo "export LD_LIBRARY_PATH='$LIBTORCH/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
echo "export FRAMELANE_TORCH_PYTHON='$VENV/bin/python'"
