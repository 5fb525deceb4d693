#!/usr/bin/env bash
# Runs framelane-runner processes from this checkout for the lanes named as arguments
# (Dedicated or Shared, with the lane's models), each playing its lane's (kwok) pod: same
# name, namespace and uid, so its heartbeat Lease is the pod's and is garbage-collected with
# it. Models are the tiny Wan models the runner's tests make (the real architecture with
# random weights, in the default VideoModels' file layouts, with the i2v start image
# inputs/first-frame.png), under .testenv/models; videos go to .testenv/outputs. down.sh
# stops them.
#
#   tests/testenv/runners.sh anisora phr00t shared
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ -f "$STATE/kubeconfig" ] || { log "no control plane; run just up first"; exit 1; }
export KUBECONFIG="$STATE/kubeconfig"
KUBECTL="$("$HERE/tools.sh")/kubectl"
eval "$("$REPO/gpu-runner/scripts/setup-torch.sh")"

cargo build --quiet --manifest-path "$REPO/Cargo.toml" -p framelane-runner
BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/framelane-runner"
if [ ! -f "$STATE/models/inputs/first-frame.png" ]; then
  log "making the tiny Wan models in $STATE/models"
  rm -rf "$STATE/models"
  "$FRAMELANE_TORCH_PYTHON" "$REPO/gpu-runner/tests/make_tiny_wan_models.py" "$STATE/models" 2>>"$STATE/logs/models.log"
fi
mkdir -p "$STATE/outputs"

for lane in "$@"; do
  if pid=$(cat "$STATE/framelane-runner-$lane.pid" 2>/dev/null) && is_ours framelane-runner "$pid"; then
    log "restarting the runner of lane $lane (pid $pid)"
    stop_pid framelane-runner "$pid"
  fi
  pod=$("$KUBECTL" get pods -n framelane-system -l "framelane.dev/lane=$lane" -o jsonpath='{.items[0].metadata.name}')
  [ -n "$pod" ] || { log "lane $lane has no runner pod yet"; exit 1; }
  uid=$("$KUBECTL" get pod -n framelane-system "$pod" -o jsonpath='{.metadata.uid}')
  # A token of the pod's ServiceAccount (the chart's runner account) bound to the pod.
  account=$("$KUBECTL" get pod -n framelane-system "$pod" -o jsonpath='{.spec.serviceAccountName}')
  "$HERE/token-kubeconfig.sh" framelane-system "${account:-default}" "$pod" >"$STATE/runner-$lane.kubeconfig"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mode=$("$KUBECTL" get modellane "$lane" -o jsonpath='{.spec.mode}')
  models=$("$KUBECTL" get modellane "$lane" -o jsonpath='{.spec.models[*]}' | tr ' ' ',')
  # The state dir in the arguments is how down.sh recognises this checkout's runners.
  setsid nohup "$BIN" --name "$pod" --namespace framelane-system --pod-uid "$uid" --lane "$lane" --mode "$mode" \
    --models "$models" --models-dir "$STATE/models" --output-dir "$STATE/outputs" \
    --kubeconfig "$STATE/runner-$lane.kubeconfig" --metrics-addr "127.0.0.1:$port" \
    </dev/null >"$STATE/logs/framelane-runner-$lane.log" 2>&1 &
  echo "$!" >"$STATE/framelane-runner-$lane.pid"
  log "runner for lane $lane plays pod $pod (log $STATE/logs/framelane-runner-$lane.log, metrics http://127.0.0.1:$port/metrics)"
done
