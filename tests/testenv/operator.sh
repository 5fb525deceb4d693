#!/usr/bin/env bash
# Runs framelane-operator from this checkout against the local control plane that up.sh
# started, in the background (log: .testenv/logs/framelane-operator.log); down.sh stops it.
# Its lanes are every ModelLane without the test-instance label, so `just test` on the same
# control plane does not fight with it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
STATE="$REPO/.testenv"
[ -f "$STATE/kubeconfig" ] || { echo "operator: no control plane; run tests/testenv/up.sh (just up) first" >&2; exit 1; }

cargo build --quiet --manifest-path "$REPO/Cargo.toml" -p framelane-operator
BIN="$REPO/target/debug/framelane-operator"
KUBECTL="$("$HERE/tools.sh")/kubectl"
export KUBECONFIG="$STATE/kubeconfig"

if pid=$(cat "$STATE/framelane-operator.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; then
  echo "operator: restarting (pid $pid)" >&2
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
fi

"$KUBECTL" create namespace framelane-system --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The state dir in the arguments is how down.sh recognises this checkout's operator.
setsid nohup "$BIN" --kubeconfig "$STATE/kubeconfig" --namespace framelane-system \
  --lane-selector '!framelane.dev/test-instance' --metrics-addr "127.0.0.1:$PORT" \
  </dev/null >"$STATE/logs/framelane-operator.log" 2>&1 &
echo "$!" >"$STATE/framelane-operator.pid"
echo "FRAMELANE_OPERATOR_METRICS=http://127.0.0.1:$PORT/metrics" >>"$STATE/env"
for _ in $(seq 50); do
  if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then
    echo "operator: running (metrics http://127.0.0.1:$PORT/metrics, log $STATE/logs/framelane-operator.log)"
    exit 0
  fi
  sleep 0.2
done
echo "operator: did not become ready; see $STATE/logs/framelane-operator.log" >&2
tail -n 20 "$STATE/logs/framelane-operator.log" >&2
exit 1
