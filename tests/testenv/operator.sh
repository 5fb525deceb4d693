#!/usr/bin/env bash
# Installs Framelane on the local control plane that up.sh started, the way a cluster admin
# does: `helm upgrade --install` of charts/framelane (release `framelane`, namespace
# framelane-system). kwok's pods run no containers, so framelane-operator then runs here, in
# the background (log: .testenv/logs/framelane-operator.log), as the first operator pod:
# with that pod's arguments and environment and a token of the chart's operator
# ServiceAccount bound to it, so it has exactly the chart's permissions. down.sh stops it.
#
# Differences from a cluster install (tests/testenv/values.yaml): the webhook is called at
# this process's local address; lanes are left to the user (`just demo` applies
# examples/modellanes.yaml); the operator ignores the tests' lanes and the webhook their
# namespaces, so `just test` can run beside it.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ -f "$STATE/kubeconfig" ] || { log "no control plane; run tests/testenv/up.sh (just up) first"; exit 1; }
export KUBECONFIG="$STATE/kubeconfig"
TOOLS=$("$HERE/tools.sh")
kubectl() { "$TOOLS/kubectl" "$@"; }
NS=framelane-system

cargo build --quiet --manifest-path "$REPO/Cargo.toml" -p framelane-operator
BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/framelane-operator"

if pid=$(cat "$STATE/framelane-operator.pid" 2>/dev/null) && is_ours framelane-operator "$pid"; then
  log "restarting the operator (pid $pid)"
  stop_pid framelane-operator "$pid"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
WEBHOOK_PORT=$(free_port)
# The volumes the chart's claims bind to (kwok runs no containers: never touched).
kubectl apply -f "$HERE/volumes.yaml" >/dev/null
# The API server's webhook client CA, as an admin publishes it for webhook.clientCA.
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create configmap framelane-apiserver-webhook-client-ca -n "$NS" \
  --from-file=ca.crt="$STATE/pki/webhook-client-ca.crt" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
"$TOOLS/helm" upgrade --install framelane "$REPO/charts/framelane" -n "$NS" --create-namespace \
  -f "$HERE/values.yaml" --set "webhook.url=https://127.0.0.1:$WEBHOOK_PORT" \
  --wait --timeout 180s >/dev/null
log "helm: release framelane installed in $NS ($("$TOOLS/helm" status framelane -n "$NS" -o json | python3 -c 'import json,sys; print("revision", json.load(sys.stdin)["version"])'))"

# The first operator pod, which this process plays.
pod_json=$(kubectl get pods -n "$NS" -l app.kubernetes.io/name=framelane-operator,app.kubernetes.io/instance=framelane \
  --sort-by=.metadata.name -o json)
POD=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["metadata"]["name"])' <<<"$pod_json")
ACCOUNT=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["spec"]["serviceAccountName"])' <<<"$pod_json")
KUBECONFIG_OPERATOR="$STATE/operator.kubeconfig"
"$HERE/token-kubeconfig.sh" "$NS" "$ACCOUNT" "$POD" >"$KUBECONFIG_OPERATOR"

# The pod's arguments, but listening on local ports and reading the client CA where the
# ConfigMap came from; and its environment as the kubelet sets it.
mapfile -t ARGS < <(python3 -c '
import json, sys
pod = json.load(sys.stdin)["items"][0]
for a in pod["spec"]["containers"][0].get("args", []):
    if a.startswith("--webhook-client-ca="):
        print("--webhook-client-ca=" + sys.argv[1])
    elif not a.startswith(("--metrics-addr=", "--webhook-addr=")):
        print(a)' "$STATE/pki/webhook-client-ca.crt" <<<"$pod_json")
ENV=()
while IFS= read -r kv; do ENV+=("$kv"); done < <(python3 -c '
import json, sys
pod = json.load(sys.stdin)["items"][0]
fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
          "metadata.uid": pod["metadata"]["uid"]}
for e in pod["spec"]["containers"][0].get("env", []):
    if "value" in e:
        print(e["name"] + "=" + e["value"])
    elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") in fields:
        print(e["name"] + "=" + fields[e["valueFrom"]["fieldRef"]["fieldPath"]])' <<<"$pod_json")

# The state dir in the arguments is how down.sh recognises this checkout's operator.
env "${ENV[@]}" setsid nohup "$BIN" "${ARGS[@]}" --kubeconfig "$KUBECONFIG_OPERATOR" \
  --metrics-addr "127.0.0.1:$PORT" --webhook-addr "127.0.0.1:$WEBHOOK_PORT" \
  </dev/null >"$STATE/logs/framelane-operator.log" 2>&1 &
echo "$!" >"$STATE/framelane-operator.pid"
echo "FRAMELANE_OPERATOR_METRICS=http://127.0.0.1:$PORT/metrics" >>"$STATE/env"
probe() {
  kubectl create --dry-run=server -o name -f - 2>&1 <<EOF || true
apiVersion: framelane.dev/v1alpha1
kind: VideoJob
metadata: {name: webhook-probe, namespace: $NS}
spec: {model: webhook-probe, prompt: probe}
EOF
}
for _ in $(seq 100); do
  # Ready, and the API server trusts its webhook (a dry run naming no model is refused).
  if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && [[ "$(probe)" == *spec.model* ]]; then
    echo "operator: running as pod $POD with ServiceAccount $ACCOUNT (metrics http://127.0.0.1:$PORT/metrics, log $STATE/logs/framelane-operator.log)"
    exit 0
  fi
  sleep 0.2
done
log "the operator did not become ready; see $STATE/logs/framelane-operator.log"
tail -n 20 "$STATE/logs/framelane-operator.log" >&2
exit 1
