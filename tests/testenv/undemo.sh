#!/usr/bin/env bash
# Makes way for the tests on a control plane that `just demo` ran on: the demo's lanes admit
# anisora and phr00t jobs in every namespace and hold the fake GPUs, its runners would take the
# tests' jobs, and its third GPU node would change what the tests count. Stops the runner
# processes and the demo's operator (it would take the jobs of its deleted lanes' names, which
# the tests use too), deletes those lanes (their pods go with them) and the node, and says so;
# `just demo` brings them back. Does nothing after a plain `just up`.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ -f "$STATE/kubeconfig" ] || exit 0
export KUBECONFIG="$STATE/kubeconfig"
kubectl() { "$("$HERE/tools.sh")/kubectl" "$@"; }

lanes=$(kubectl get modellanes -l '!framelane.dev/test-instance' -o name)
nodes=$(kubectl get nodes -l framelane.dev/demo=node -o name)
runners=("$STATE"/framelane-runner-*.pid)
operator="$STATE/framelane-operator.pid"
[ -n "$lanes$nodes" ] || [ -e "${runners[0]}" ] || [ -e "$operator" ] || exit 0
log "removing what just demo left running, so that it does not take the tests' jobs: $(echo "$lanes" "$nodes" | tr '\n' ' ') and the operator and runner processes (just demo brings them back)"
for file in "${runners[@]}"; do
  [ -e "$file" ] || continue
  pid=$(cat "$file")
  [[ "$pid" =~ ^[0-9]+$ ]] && stop_pid framelane-runner "$pid"
  rm -f "$file"
done
if pid=$(cat "$operator" 2>/dev/null); then
  [[ "$pid" =~ ^[0-9]+$ ]] && stop_pid framelane-operator "$pid"
  rm -f "$operator"
fi
if [ -n "$lanes" ]; then
  kubectl delete $lanes --wait=true >/dev/null
  # The garbage collector deletes the lanes' runner pods after the lanes: wait for them, or
  # the first tests would find the fake GPUs still taken.
  names=$(echo "$lanes" | sed 's|.*/||' | paste -sd, -)
  for _ in $(seq 120); do
    [ -z "$(kubectl get pods -A -l "framelane.dev/lane in ($names)" -o name)" ] && break
    sleep 0.5
  done
fi
[ -z "$nodes" ] || kubectl delete $nodes --wait=true >/dev/null
