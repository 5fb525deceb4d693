#!/usr/bin/env bash
# Runs framelane-operator from this checkout against the local control plane that up.sh
# started, in the background (log: .testenv/logs/framelane-operator.log), with its admission
# webhook registered; down.sh stops it.
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
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
WEBHOOK_PORT=$(free_port)
# The admission webhook, as the chart registers it but at the operator's local address, for
# every namespace except the system ones and the tests' own (each test registers its own).
# The operator publishes its CA into caBundle.
"$KUBECTL" apply -f - >/dev/null <<EOF
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: framelane
webhooks:
  - name: videojobs.framelane.dev
    admissionReviewVersions: ["v1"]
    sideEffects: None
    failurePolicy: Fail
    timeoutSeconds: 5
    clientConfig:
      url: https://127.0.0.1:$WEBHOOK_PORT/validate-videojob
    rules:
      - apiGroups: ["framelane.dev"]
        apiVersions: ["v1alpha1"]
        operations: ["CREATE"]
        resources: ["videojobs"]
        scope: Namespaced
    namespaceSelector:
      matchExpressions:
        - {key: framelane.dev/test, operator: DoesNotExist}
        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [kube-system, kube-public, kube-node-lease]}
EOF
# The state dir in the arguments is how down.sh recognises this checkout's operator.
setsid nohup "$BIN" --kubeconfig "$STATE/kubeconfig" --namespace framelane-system \
  --lane-selector '!framelane.dev/test-instance' --metrics-addr "127.0.0.1:$PORT" \
  --webhook-addr "127.0.0.1:$WEBHOOK_PORT" --webhook-configuration framelane \
  </dev/null >"$STATE/logs/framelane-operator.log" 2>&1 &
echo "$!" >"$STATE/framelane-operator.pid"
echo "FRAMELANE_OPERATOR_METRICS=http://127.0.0.1:$PORT/metrics" >>"$STATE/env"
probe() {
  "$KUBECTL" create --dry-run=server -o name -f - 2>&1 <<EOF || true
apiVersion: framelane.dev/v1alpha1
kind: VideoJob
metadata: {name: webhook-probe, namespace: framelane-system}
spec: {model: webhook-probe, prompt: probe}
EOF
}
for _ in $(seq 100); do
  # Ready, and the API server trusts its webhook (a dry run naming no model is refused).
  if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && [[ "$(probe)" == *spec.model* ]]; then
    # The default models (anisora, phr00t), as the chart installs them; lanes are up to the
    # user (each holds a fake GPU).
    "$KUBECTL" apply -f "$REPO/examples/videomodels.yaml" >/dev/null
    echo "operator: running (metrics http://127.0.0.1:$PORT/metrics, log $STATE/logs/framelane-operator.log)"
    exit 0
  fi
  sleep 0.2
done
echo "operator: did not become ready; see $STATE/logs/framelane-operator.log" >&2
tail -n 20 "$STATE/logs/framelane-operator.log" >&2
exit 1
