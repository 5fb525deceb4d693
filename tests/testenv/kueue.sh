#!/usr/bin/env bash
# Kueue, the peer `just bench` measures Framelane against, on this checkout's local control plane.
#
#   kueue.sh build   builds Kueue's manager from its Go module through the Go module proxy and
#                    caches it outside the checkout, keyed by version, with the CRDs and webhook
#                    configuration of the same module (config/components); prints that directory.
#   kueue.sh         (or `kueue.sh up`) builds if needed, then starts the manager out of cluster,
#                    like tests/testenv/operator.sh runs ours, unless it is already running here.
#
# How it runs (docs/benchmarks.md, "Side by side with Kueue"): Kueue's own configuration
# (config/components/manager/controller_manager_config.yaml: 5 Job and 5 Workload workers, client
# QPS 50 / burst 100, FRAMELANE_KUEUE_QPS and FRAMELANE_KUEUE_BURST override those two), the
# batch/job integration only, no leader election, without its visibility API, as admin. Its
# webhook listens on 127.0.0.1 and the API server calls it by URL. Kueue's internal certificate management stays on (so it
# injects the CA into its webhook configurations and conversion webhooks itself); it finds its
# Secret already filled with a CA and a serving certificate this script makes, valid for
# 127.0.0.1 as well as for the in-cluster Service name, and serves the same files from
# .testenv/kueue/certs (in a cluster the kubelet mounts the Secret there). Its Job webhooks are
# limited to namespaces labelled framelane.dev/kueue=enabled, so the rest of `just test` never
# calls them. down.sh stops it.
set -euo pipefail

KUEUE_VERSION=v0.17.0
MODULE=sigs.k8s.io/kueue

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
CACHE=${FRAMELANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/framelane}
DIR="$CACHE/bin/kueue-$KUEUE_VERSION"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0

klog() { echo "kueue: $*" >&2; }

# Builds into a scratch dir and moves the results in last (the binary last of all), so an
# interrupted build never leaves a half-written cache that a later run would trust.
build() {
  [ -x "$DIR/kueue" ] && return
  klog "building Kueue $KUEUE_VERSION (cmd/kueue); the first build takes about 10 minutes on 2 cores"
  local work src
  work=$(mktemp -d)
  GOBIN="$work" go install -trimpath -ldflags "-s -w -X $MODULE/pkg/version.GitVersion=$KUEUE_VERSION" \
    "$MODULE/cmd/kueue@$KUEUE_VERSION" >&2
  src=$(go mod download -json "$MODULE@$KUEUE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$src/config/components" ] || { klog "no config/components in $src"; exit 1; }
  mkdir -p "$DIR"
  rm -rf "$DIR/crd" && cp -r "$src/config/components/crd" "$DIR/crd"
  cp "$src/config/components/webhook/manifests.yaml" "$DIR/webhook-manifests.yaml"
  cp "$src/config/components/manager/controller_manager_config.yaml" "$DIR/controller_manager_config.yaml"
  chmod -R u+w "$DIR"
  mv "$work/kueue" "$DIR/kueue"
  rm -rf "$work"
}

if [ "${1:-up}" = build ]; then
  build
  echo "$DIR"
  exit 0
fi
[ "${1:-up}" = up ] || { klog "usage: $0 [build|up]"; exit 2; }

[ -f "$STATE/kubeconfig" ] || { klog "no control plane; run tests/testenv/up.sh (just up) first"; exit 1; }
export KUBECONFIG="$STATE/kubeconfig"
TOOLS=$("$HERE/tools.sh")
kubectl() { "$TOOLS/kubectl" "$@"; }
NS=kueue-system
WORK="$STATE/kueue"
PIDFILE="$STATE/kueue.pid"
build

# A Python with PyYAML: python3's, or the torch venv's (`just test` sets FRAMELANE_TORCH_PYTHON).
PY=
for p in python3 "${FRAMELANE_TORCH_PYTHON:-}"; do
  if [ -n "$p" ] && "$p" -c 'import yaml' 2>/dev/null; then PY=$p; break; fi
done
[ -n "$PY" ] || { klog "needs PyYAML: apt-get install python3-yaml, or run eval \"\$(gpu-runner/scripts/setup-torch.sh)\" first"; exit 1; }

# Already running from this checkout's state dir (a reused pid never counts), and serving?
running() {
  local pid args
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
  [[ "$args" == *"$STATE/"* ]] && [ -f "$WORK/health-port" ] &&
    curl -sf "http://127.0.0.1:$(cat "$WORK/health-port")/readyz" >/dev/null 2>&1
}
if running; then
  klog "already running (pid $(cat "$PIDFILE"))"
  exit 0
fi
if pid=$(cat "$PIDFILE" 2>/dev/null) && [[ "$(ps -o args= -p "$pid" 2>/dev/null)" == *"$STATE/"* ]]; then
  klog "restarting Kueue (pid $pid, not ready)"
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
fi

rm -rf "$WORK"
mkdir -p "$WORK/certs" "$STATE/logs"
free_ports() { # count
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
read -r WEBHOOK_PORT METRICS_PORT HEALTH_PORT < <(free_ports 3)

# The certificates Kueue's rotator accepts as its own: a CA whose certificate names "kueue-ca"
# and whose key is PKCS#1 RSA (it parses it so), and a serving certificate for the Service name
# it checks, which also names 127.0.0.1 for the API server's calls by URL.
(
  cd "$WORK/certs"
  openssl genrsa -traditional -out ca.key 2048 2>/dev/null
  openssl req -x509 -new -key ca.key -subj "/O=kueue/CN=kueue-ca" -days 3650 -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment" \
    -addext "subjectAltName=DNS:kueue-ca" 2>/dev/null
  openssl genrsa -traditional -out tls.key 2048 2>/dev/null
  openssl req -new -key tls.key -subj "/CN=kueue-webhook-service.$NS.svc" -out tls.csr
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:kueue-webhook-service.$NS.svc,IP:127.0.0.1" >tls.ext
  openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -set_serial "0x1$(openssl rand -hex 8)" \
    -days 3650 -extfile tls.ext -out tls.crt 2>/dev/null
  rm -f tls.csr tls.ext
)
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create secret generic kueue-webhook-server-cert -n "$NS" --from-file="$WORK/certs" \
  --dry-run=client -o yaml | kubectl apply --server-side --force-conflicts -f - >/dev/null

# The module's CRDs with their conversion webhooks (config/components/crd/patches) and its
# webhook configurations, pointed at 127.0.0.1 instead of the in-cluster Service.
"$PY" - "$DIR" "$WORK" "https://127.0.0.1:$WEBHOOK_PORT" <<'PYEOF'
import glob, json, os, sys
import yaml

src, out, url = sys.argv[1:]
crds = {}
for path in sorted(glob.glob(os.path.join(src, "crd/bases/*.yaml"))):
    with open(path) as f:
        crd = yaml.safe_load(f)
    crds[crd["metadata"]["name"]] = crd
for path in sorted(glob.glob(os.path.join(src, "crd/patches/webhook_in_*.yaml"))):
    with open(path) as f:
        patch = yaml.safe_load(f)
    name = patch["metadata"]["name"]
    if name in crds and "webhook_in_resourceflavors" not in path:
        conversion = patch["spec"]["conversion"]
        conversion["webhook"]["clientConfig"] = {"url": url + "/convert"}
        crds[name]["spec"]["conversion"] = conversion
with open(os.path.join(out, "crds.yaml"), "w") as f:
    yaml.safe_dump_all(list(crds.values()), f)

# Kueue's objects, and batch Jobs in namespaces that opt in; the webhooks of integrations not
# enabled here (pods, deployments, Kubeflow, Ray, ...) are left out.
only_opted_in = {"matchLabels": {"framelane.dev/kueue": "enabled"}}
configurations = []
with open(os.path.join(src, "webhook-manifests.yaml")) as f:
    for conf in yaml.safe_load_all(f):
        if not conf:
            continue
        conf["metadata"]["name"] = "kueue-" + conf["metadata"]["name"]
        kept = []
        for hook in conf["webhooks"]:
            groups = {g for rule in hook["rules"] for g in rule["apiGroups"]}
            if groups == {"kueue.x-k8s.io"} or groups == {"batch"}:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": url + path}
                if groups == {"batch"}:
                    hook["namespaceSelector"] = only_opted_in
                kept.append(hook)
        conf["webhooks"] = kept
        configurations.append(conf)
with open(os.path.join(out, "webhooks.yaml"), "w") as f:
    yaml.safe_dump_all(configurations, f)
PYEOF
kubectl apply --server-side --force-conflicts -f "$WORK/crds.yaml" >/dev/null
kubectl wait --for=condition=Established -f "$WORK/crds.yaml" --timeout=60s >/dev/null
kubectl apply --server-side --force-conflicts -f "$WORK/webhooks.yaml" >/dev/null

# Kueue's shipped configuration, with this process's addresses and the batch/job integration.
"$PY" - "$DIR/controller_manager_config.yaml" "$WORK/config.yaml" "$WEBHOOK_PORT" "$METRICS_PORT" \
  "$HEALTH_PORT" "$WORK/certs" "${FRAMELANE_KUEUE_QPS:-}" "${FRAMELANE_KUEUE_BURST:-}" <<'PYEOF'
import sys
import yaml

shipped, out, webhook, metrics, health, certs, qps, burst = sys.argv[1:]
with open(shipped) as f:
    cfg = yaml.safe_load(f)
cfg["namespace"] = "kueue-system"
cfg["health"] = {"healthProbeBindAddress": f"127.0.0.1:{health}"}
cfg["metrics"] = {"bindAddress": f"127.0.0.1:{metrics}"}
cfg["webhook"] = {"port": int(webhook), "host": "127.0.0.1", "certDir": certs}
cfg["leaderElection"] = {"leaderElect": False}
cfg["internalCertManagement"] = {"enable": True}
cfg["integrations"] = {"frameworks": ["batch/job"]}
# Its visibility API (pending workloads, an aggregated API server) needs in-cluster
# credentials for delegated authentication, and Kueue exits when it cannot start it.
cfg["featureGates"] = {"VisibilityOnDemand": False}
if qps:
    cfg["clientConnection"]["qps"] = float(qps)
if burst:
    cfg["clientConnection"]["burst"] = int(burst)
with open(out, "w") as f:
    yaml.safe_dump(cfg, f)
PYEOF

# The state dir in the arguments is how down.sh recognises this checkout's Kueue.
KUBECONFIG="$STATE/pki/admin.kubeconfig" setsid nohup "$DIR/kueue" --config="$WORK/config.yaml" \
  </dev/null >"$STATE/logs/kueue.log" 2>&1 9>&- &
echo "$!" >"$PIDFILE"
echo "$HEALTH_PORT" >"$WORK/health-port"

# A dry-run ClusterQueue goes through Kueue's webhooks: answered once the API server trusts them.
probe() {
  kubectl create --dry-run=server -o name -f - >/dev/null 2>&1 <<EOF
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {name: kueue-probe}
spec: {namespaceSelector: {}}
EOF
}
for _ in $(seq 300); do
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then break; fi
  if curl -sf "http://127.0.0.1:$HEALTH_PORT/readyz" >/dev/null 2>&1 && probe; then
    {
      echo "KUEUE_METRICS=https://127.0.0.1:$METRICS_PORT/metrics"
      echo "KUEUE_WEBHOOK_URL=https://127.0.0.1:$WEBHOOK_PORT"
    } >>"$STATE/env"
    klog "running Kueue $KUEUE_VERSION (pid $(cat "$PIDFILE"), webhook https://127.0.0.1:$WEBHOOK_PORT, log $STATE/logs/kueue.log)"
    exit 0
  fi
  sleep 0.2
done
klog "Kueue did not become ready within 60 s; see $STATE/logs/kueue.log"
tail -n 20 "$STATE/logs/kueue.log" >&2
exit 1
