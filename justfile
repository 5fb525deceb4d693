# Every task a person runs. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

export KUBECONFIG := justfile_directory() / ".testenv/kubeconfig"

# List the recipes.
default:
    @just --list

# Build (or reuse from the cache) the control plane binaries; prints their directory.
tools:
    @tests/testenv/tools.sh

# Start the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok, 2 fake GPU nodes) with the CRDs installed.
up:
    tests/testenv/up.sh

# Stop the local control plane and remove its state.
down:
    tests/testenv/down.sh

# Start the control plane, apply the sample objects from examples/ and show them.
demo: up
    #!/usr/bin/env bash
    set -euo pipefail
    kubectl="$(tests/testenv/tools.sh)/kubectl"
    "$kubectl" apply -f examples/videomodels.yaml -f examples/modellanes.yaml
    "$kubectl" apply -n default -f examples/videojob.yaml
    "$kubectl" get nodes -o custom-columns=NODE:.metadata.name,READY:.status.conditions[-1].type,GPUS:.status.allocatable.nvidia\\.com/gpu
    "$kubectl" get videomodels
    "$kubectl" get modellanes
    "$kubectl" get videojobs -A
    echo
    echo "The control plane keeps running. Try: export KUBECONFIG=$KUBECONFIG; kubectl explain videojob.spec"
    echo "Stop it with: just down"

# Regenerate crds/ from the Rust types in api/.
crds:
    rm -f crds/*.yaml
    cargo run -q -p framelane-api --bin crdgen -- crds

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Run every test against the real local control plane (started if needed).
test: tools lint
    tests/testenv/up.sh
    cargo test --workspace
