# Every task a person runs. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

export KUBECONFIG := justfile_directory() / ".testenv/kubeconfig"

# List the recipes.
default:
    @{{just_executable()}} --justfile {{justfile()}} --list

# Build (or reuse from the cache) the control plane binaries and Kueue (the peer `just bench` compares with, and a test checks); prints the control plane's directory.
tools:
    @tests/testenv/tools.sh
    @tests/testenv/kueue.sh build >/dev/null

# Start the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok, 2 fake GPU nodes) with the CRDs installed, and framelane-operator from this checkout.
up:
    tests/testenv/up.sh
    tests/testenv/operator.sh

# Stop the local control plane and remove its state.
down:
    tests/testenv/down.sh

# The whole flow on a local control plane: the operator, runner processes with tiny built-in models, one job per model, live progress, a summary.
demo: prereqs up
    tests/testenv/demo.sh

# Check (and where this machine allows, install) what demo and test need besides what they build.
prereqs:
    @tests/testenv/prereqs.sh

# Regenerate crds/ and the chart's copy from the Rust types in api/, and the chart's values.schema.json from them.
crds:
    #!/usr/bin/env bash
    set -euo pipefail
    rm -f crds/*.yaml charts/framelane/crds/*.yaml
    cargo run -q -p framelane-api --bin crdgen -- crds
    cp crds/*.yaml charts/framelane/crds/
    eval "$(gpu-runner/scripts/setup-torch.sh)"
    "$FRAMELANE_TORCH_PYTHON" tests/chart/values_schema.py

# Formatting and lints, as CI runs them.
lint:
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$(gpu-runner/scripts/setup-torch.sh)"
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --all-features -- -D warnings

# Install libtorch (torch 2.11 from PyPI, cached outside the checkout); prints its exports.
torch:
    @gpu-runner/scripts/setup-torch.sh

# Run every test: lints; every suite against the real local control plane (started if needed; a demo's lanes are removed first); then both images built and the Helm chart run with them in real pods on the control plane's real node (as root).
test: prereqs tools && images real-node
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$(gpu-runner/scripts/setup-torch.sh)"
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --all-features -- -D warnings
    tests/testenv/up.sh
    tests/testenv/undemo.sh
    cargo test --workspace
    # The control plane the suites leave behind keeps a core busy; the images' release builds
    # come next, and the real-node part starts the control plane again with its node.
    tests/testenv/down.sh

# Benchmarks against the local control plane; record the figures in docs/benchmarks.md.
bench: tools
    command -v wrk >/dev/null || apt-get install -y wrk
    tests/testenv/up.sh
    cargo bench -p framelane-operator --bench queue
    cargo bench -p framelane-operator --bench webhook
    cargo bench -p framelane-operator --bench peers
    cargo bench -p framelane-operator --bench writes
    cargo bench -p framelane-operator --bench fuzz
    cargo bench -p framelane-operator --bench restart
    eval "$(gpu-runner/scripts/setup-torch.sh)" && cargo bench -p framelane-runner --bench runner
    eval "$(gpu-runner/scripts/setup-torch.sh)" && cargo bench -p framelane-runner --bench fit

# GPU memory check on one H100/H200 (torch 2.11, no network): full-size Wan 14B models (A14B i2v, AllInOne t2v), per size and memory cap 20 alternating jobs on a Shared runner, expandable_segments on and off, against diffusers. Args: --jobs N --sizes WxHxF,.. --caps 80G,.. --steps N --allocs CONF,.. --bundle DIR | --binary PATH --no-diffusers --tiny (CPU dry run).
gpu-check *args:
    gpu-runner/scripts/gpu-check.sh {{args}}

# Build here what `just gpu-check` needs on a GPU machine without network or Rust (the gpu_check binary and the diffusers wheels) into DIR; carry DIR there and pass `--bundle DIR`.
gpu-check-bundle dir=".gpu-check":
    gpu-runner/scripts/gpu-check-bundle.sh {{dir}}

# Image tags `just images` builds (the chart's defaults); the runner's CPU flavour is tagged <runner_image>-cpu. Override with `just operator_image=... runner_image=... images`.
operator_image := "ghcr.io/framelane/operator:0.1.0"
runner_image := "ghcr.io/framelane/runner:0.1.0"

# Build the operator image and the runner's CUDA and CPU images with Docker from this checkout (release binaries; no registry needed); prints their sizes.
images:
    scripts/images.sh "{{operator_image}}" "{{runner_image}}"

# Only the real-node part of `just test` (as root): the operator and CPU runner images, then the Helm chart with them in real pods on the control plane's real node (restarts the control plane with its node if it runs without): install, webhook, a CPU lane's job, leader deleted, runner killed, upgrade under load.
test-real-node: prereqs tools test-images real-node

[private]
real-node:
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$(gpu-runner/scripts/setup-torch.sh)"
    export TESTENV_REAL_NODE=1
    tests/testenv/up.sh
    cargo test -p framelane-e2e --features real-node --test real_node -- --nocapture

# The images the real-node test runs: the operator and the runner's CPU flavour (`just test` builds the CUDA flavour too; it runs on no node here).
test-images:
    scripts/images.sh "{{operator_image}}" "{{runner_image}}" cpu
