# Every task a person runs. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

export KUBECONFIG := justfile_directory() / ".testenv/kubeconfig"

# List the recipes.
default:
    @just --list

# Build (or reuse from the cache) the control plane binaries; prints their directory.
tools:
    @tests/testenv/tools.sh

# Start the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok, 2 fake GPU nodes) with the CRDs installed, and framelane-operator from this checkout.
up:
    tests/testenv/up.sh
    tests/testenv/operator.sh

# Stop the local control plane and remove its state.
down:
    tests/testenv/down.sh

# Start the control plane, apply the sample objects from examples/ and show them.
demo: up
    #!/usr/bin/env bash
    set -euo pipefail
    kubectl="$(tests/testenv/tools.sh)/kubectl"
    "$kubectl" apply -f tests/testenv/volumes.yaml
    "$kubectl" apply -f examples/videomodels.yaml -f examples/modellanes.yaml
    "$kubectl" delete -n default videojob cat-on-beach --ignore-not-found --wait
    "$kubectl" apply -n default -f examples/videojob.yaml
    "$kubectl" wait -n default --for=jsonpath='{.status.phase}'=Queued videojob/cat-on-beach --timeout=30s
    "$kubectl" wait -n framelane-system --for=condition=Ready pod -l framelane.dev/lane=anisora --timeout=60s
    "$kubectl" get nodes -o 'custom-columns=NODE:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,GPUS:.status.allocatable.nvidia\.com/gpu'
    "$kubectl" get videomodels
    "$kubectl" get modellanes
    "$kubectl" get pods -n framelane-system -o wide
    "$kubectl" get videojobs -n default
    "$kubectl" describe videojob -n default cat-on-beach | sed -n '/^Events:/,$p'

    echo
    echo "The runner pods are kwok pods that run no code, so nothing claims the job: with no runner"
    echo "heartbeat, it fails with QueueWaitTimeout after the lane's maxWaitSeconds (30 s)."
    echo "The control plane keeps running. Try: export KUBECONFIG=$KUBECONFIG; kubectl get vj -w"
    echo "Stop it with: just down"

# Regenerate crds/ from the Rust types in api/.
crds:
    rm -f crds/*.yaml
    cargo run -q -p framelane-api --bin crdgen -- crds

# Formatting and lints, as CI runs them.
lint:
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$(gpu-runner/scripts/setup-torch.sh)"
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Install libtorch (torch 2.11 from PyPI, cached outside the checkout); prints its exports.
torch:
    @gpu-runner/scripts/setup-torch.sh

# Run every test against the real local control plane (started if needed).
test: tools
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$(gpu-runner/scripts/setup-torch.sh)"
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    tests/testenv/up.sh
    cargo test --workspace

# Benchmarks against the local control plane; record the figures in docs/benchmarks.md.
bench: tools
    tests/testenv/up.sh
    cargo bench -p framelane-operator --bench queue
