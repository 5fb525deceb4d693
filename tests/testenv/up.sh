#!/usr/bin/env bash
# Starts a real, local Kubernetes control plane for tests ("testenv") without Docker:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (which plays the
# kubelet for the fake GPU nodes in nodes.yaml), all bound to 127.0.0.1 on ports picked at
# runtime, and, with TESTENV_REAL_NODE=1 (as root), a real node (node.sh: containerd, kubelet,
# kube-proxy) where pods run as containers; only the real-node test needs it (`just
# test-real-node`). Everything lives in $REPO/.testenv; tests use $REPO/.testenv/kubeconfig.
#
# Idempotent: if this checkout's testenv is already up and healthy it only re-applies the
# nodes and CRDs and exits. A stale or broken .testenv is torn down (down.sh) and started
# afresh. Concurrent runs in one checkout are serialised by a lock; runs in different
# checkouts share nothing (own state dir, own ports).
#
# The binaries come from tools.sh (built once, cached outside the checkout).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PKI="$STATE/pki"
LOGS="$STATE/logs"
CRDS="$REPO/crds"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
TESTENV_REAL_NODE=${TESTENV_REAL_NODE:-0}
SERVICE_CIDR=10.0.0.0/24 # the "kubernetes" Service gets 10.0.0.1
POD_CIDR=10.244.0.0/16   # kwok hands out pod IPs from here; must not overlap SERVICE_CIDR
MAX_ATTEMPTS=3           # fresh starts, when a picked port was taken before we bound it

# A re-run after a port clash (see on_failure) inherits the lock on fd 9 through exec.
if [ "${_TESTENV_REEXEC:-}" != 1 ]; then take_lock; fi

BIN=$("$HERE/tools.sh")
KUBECTL="$BIN/kubectl"
ADMIN_KUBECONFIG="$PKI/admin.kubeconfig" # what the components use, written before they start
KUBECONFIG_OUT="$STATE/kubeconfig"        # what tests use, published once everything is ready

kubectl_admin() { "$KUBECTL" --kubeconfig="$ADMIN_KUBECONFIG" "$@"; }

# GETs a health endpoint with kubectl (no curl needed). The components serve self-signed
# certs, hence a kubeconfig that skips verification (kubectl refuses --insecure-skip-tls-verify
# next to a CA). It carries the admin credentials because a kubectl without any prompts for a
# username on stdin.
PROBE_KUBECONFIG="$PKI/probe.kubeconfig"
probe() { # base-url path
  "$KUBECTL" --kubeconfig="$PROBE_KUBECONFIG" --server="$1" --request-timeout=3s \
    get --raw "$2" </dev/null >/dev/null 2>&1
}

# Alive, and still the process we started (a reused pid never counts).
alive() { # component
  local pid args
  pid=$(cat "$STATE/$1.pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
  [[ "$args" == *"$STATE/"* ]]
}

# Re-applies what tests rely on. Cheap when nothing changed, so the "already up" path runs it
# too (a test may have deleted a node, or crds/ may have changed since the last up).
apply_nodes() {
  CURRENT=kwok
  kubectl_admin apply -f "$HERE/nodes.yaml" >&2
  # Nodes are Ready once kwok has played node-initialize (kwok.yaml).
  kubectl_admin wait --for=condition=Ready -f "$HERE/nodes.yaml" --timeout=60s >&2
  # The node lifecycle controller may have tainted a node not-ready before kwok marked it
  # Ready; it lifts the taint within seconds. Wait, or the first test pod can be Unschedulable.
  local deadline=$((SECONDS + 60))
  until [ -z "$(kubectl_admin get -f "$HERE/nodes.yaml" -o jsonpath='{.items[*].spec.taints}')" ]; do
    if ((SECONDS >= deadline)); then
      log "nodes still tainted after 60s: $(kubectl_admin get -f "$HERE/nodes.yaml" -o jsonpath='{.items[*].spec.taints}')"
      return 1
    fi
    sleep 0.5
  done
}

apply_crds() {
  CURRENT=crds
  compgen -G "$CRDS/*.yaml" >/dev/null || return 0
  log "applying CRDs from $CRDS"
  kubectl_admin apply --server-side --force-conflicts -f "$CRDS/" >&2
  kubectl_admin wait --for=condition=Established -f "$CRDS/" --timeout=60s >&2
}

summary() {
  local real=""
  if [ "$TESTENV_REAL_NODE" = 1 ]; then real=" and a real node"; fi
  echo "testenv is up: Kubernetes $("$KUBECTL" version --client -o json 2>/dev/null | sed -n 's/.*"gitVersion": "\(.*\)".*/\1/p' | head -1), 2 fake GPU nodes$real, state in $STATE"
  echo "  kubeconfig: $KUBECONFIG_OUT"
  echo "  export KUBECONFIG=$KUBECONFIG_OUT"
  echo "  stop it with: $HERE/down.sh"
}

# ---------------------------------------------------------------------------------------------
# Already up? Every component alive, and the apiserver ready. Then there is nothing to start.
healthy() {
  [ -f "$KUBECONFIG_OUT" ] && [ -f "$STATE/env" ] || return 1
  local c
  for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done
  if [ "$TESTENV_REAL_NODE" = 1 ]; then "$HERE/node.sh" alive || return 1; fi
  "$KUBECTL" --kubeconfig="$KUBECONFIG_OUT" --request-timeout=5s get --raw /readyz >/dev/null 2>&1
}

hint() {
  case "$1" in
    etcd) echo "etcd did not start; see the log above ($LOGS/etcd.log)." ;;
    kube-apiserver) echo "kube-apiserver did not become ready; see $LOGS/kube-apiserver.log (a flag this version rejects, etcd unreachable, or a certificate problem)." ;;
    kube-controller-manager) echo "kube-controller-manager did not become healthy or did not create the default ServiceAccount; see $LOGS/kube-controller-manager.log." ;;
    kube-scheduler) echo "kube-scheduler did not become healthy; see $LOGS/kube-scheduler.log." ;;
    kwok) echo "the fake nodes did not become Ready; see $LOGS/kwok.log and the stages in $HERE/kwok.yaml." ;;
    node) echo "the real node did not start; see $LOGS/containerd.log, kubelet.log and kube-proxy.log (it needs root; without TESTENV_REAL_NODE=1 it is left out)." ;;
    crds) echo "applying $CRDS failed: fix the CRD manifests there." ;;
    *) echo "see the logs in $LOGS." ;;
  esac
}

set -E # ERR traps also fire inside functions
if [ "${_TESTENV_REEXEC:-}" != 1 ] && healthy; then
  log "already running; re-applying nodes and CRDs"
  # A failure here (say, a broken CRD) is reported, but the running testenv is left alone.
  trap '[ "$BASHPID" != "$$" ] || log "ERROR: re-applying $CURRENT failed (exit $?); the running testenv was left as it is. $(hint "$CURRENT")"' ERR
  ADMIN_KUBECONFIG=$KUBECONFIG_OUT
  apply_nodes
  apply_crds
  summary
  exit 0
fi

# Not (fully) up: clear whatever is left (processes of a half-dead testenv, old state),
# then start from scratch. Cheap when there is nothing to clear.
if [ -e "$STATE" ]; then log "found a stale or broken $STATE; cleaning it up first"; fi
TESTENV_LOCK_HELD=1 "$HERE/down.sh"

# ---------------------------------------------------------------------------------------------
# Failure handling for the start: show why, tear down, exit non-zero. down.sh keeps the logs
# (TESTENV_KEEP_LOGS) so they can be read; the next up.sh removes them.
CURRENT=setup
ATTEMPT=${_TESTENV_ATTEMPT:-1}

on_failure() { # exit-status message
  local rc=$1 msg=$2
  # A failure inside a subshell ($(...)) is reported once, by the main shell.
  if [ "$BASHPID" != "$$" ]; then exit "$rc"; fi
  trap - ERR INT TERM
  set +e
  if [ "$rc" = 130 ] || [ "$rc" = 143 ]; then
    log "$msg while starting $CURRENT; tearing down"
    TESTENV_LOCK_HELD=1 "$HERE/down.sh"
    exit "$rc"
  fi
  log "ERROR: $msg (while starting: $CURRENT)"
  local logfile="$LOGS/$CURRENT.log"
  if [ -s "$logfile" ]; then
    log "last 30 lines of $logfile:"
    tail -n 30 "$logfile" | sed 's/^/    /' >&2
  fi
  # A port picked at random was taken before the component bound it: start again on new ports.
  if [ -s "$logfile" ] && grep -qi 'address already in use' "$logfile" && [ "$ATTEMPT" -lt "$MAX_ATTEMPTS" ]; then
    log "port clash; tearing down and retrying on new ports (attempt $((ATTEMPT + 1))/$MAX_ATTEMPTS)"
    TESTENV_LOCK_HELD=1 "$HERE/down.sh"
    _TESTENV_REEXEC=1 _TESTENV_ATTEMPT=$((ATTEMPT + 1)) exec "$HERE/up.sh"
  fi
  log "fix: $(hint "$CURRENT")"
  log "tearing down (logs kept in $LOGS); run $HERE/up.sh again once fixed"
  TESTENV_LOCK_HELD=1 TESTENV_KEEP_LOGS=1 "$HERE/down.sh"
  exit "$rc"
}
fail() { on_failure 1 "$1"; }
trap 'on_failure $? "command failed (exit $?): $BASH_COMMAND"' ERR
trap 'on_failure 130 "interrupted"' INT
trap 'on_failure 143 "terminated"' TERM

# Polls until the command succeeds; fails early if the component has died meanwhile.
wait_for() { # component timeout-seconds what command...
  local comp=$1 timeout=$2 what=$3
  shift 3
  CURRENT=$comp
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$comp"; then fail "$comp exited while waiting for $what"; fi
    if ((SECONDS >= deadline)); then fail "timed out after ${timeout}s waiting for $what"; fi
    sleep 0.2
  done
}

# Starts a component in the background so that it outlives this script: its own session
# (setsid: no SIGINT from this terminal's Ctrl-C, and down.sh can kill its process group), no stdin,
# output to its log, and without the lock fd (9>&-).
launch() { # component command...
  local comp=$1
  shift
  CURRENT=$comp
  setsid nohup "$@" </dev/null >"$LOGS/$comp.log" 2>&1 9>&- &
  echo "$!" >"$STATE/$comp.pid"
  disown "$!" # not our job any more: no "Killed" notice when down.sh stops it
}

mkdir -p "$PKI" "$LOGS" "$STATE/etcd" "$STATE/kwok"

# The real node's network comes first: the API server advertises the host's end of its link
# to pods, and its certificate names that address.
NODE_HOST_IP=
if [ "$TESTENV_REAL_NODE" = 1 ]; then
  CURRENT=node
  [ "$(id -u)" = 0 ] || fail "the real node needs root (without TESTENV_REAL_NODE=1 it is left out)"
  NODE_ENV=$("$HERE/node.sh" net)
  eval "$NODE_ENV"
fi

# ---------------------------------------------------------------------------------------------
# Ports: let the kernel pick free loopback ports. All sockets are held open together so the
# six ports are distinct; a port could still be taken between here and the component binding
# it, which on_failure handles by starting again.
CURRENT=ports
command -v python3 >/dev/null || fail "python3 is needed to pick free ports"
read -r ETCD_CLIENT_PORT ETCD_PEER_PORT APISERVER_PORT KCM_PORT SCHEDULER_PORT KWOK_PORT < <(
  python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))'
)
[ -n "$KWOK_PORT" ] || fail "could not pick free ports"
{
  echo "# Written by tests/testenv/up.sh; shell- and dotenv-readable."
  printf '%s=%q\n' \
    TESTENV_DIR "$STATE" \
    KUBECONFIG "$KUBECONFIG_OUT" \
    TESTENV_BIN "$BIN" \
    ETCD_CLIENT_PORT "$ETCD_CLIENT_PORT" \
    ETCD_PEER_PORT "$ETCD_PEER_PORT" \
    APISERVER_PORT "$APISERVER_PORT" \
    APISERVER_URL "https://127.0.0.1:$APISERVER_PORT" \
    KUBE_CONTROLLER_MANAGER_PORT "$KCM_PORT" \
    KUBE_SCHEDULER_PORT "$SCHEDULER_PORT" \
    KWOK_PORT "$KWOK_PORT"
  if [ -n "$NODE_HOST_IP" ]; then echo "$NODE_ENV"; fi
} >"$STATE/env"

# ---------------------------------------------------------------------------------------------
# Certificates: one CA signs the apiserver's serving cert, the admin client cert (group
# system:masters), and doubles as the cluster-signing CA of the controller-manager.
# ECDSA P-256 for speed; the service-account signing key is RSA, the most widely accepted.
CURRENT=certs
log "generating certificates"
(
  cd "$PKI"
  newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
  sign() { # name subject extensions
    newkey "$1.key"
    printf '%b\n' "$3" >"$1.ext"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -set_serial "0x1$(openssl rand -hex 8)" \
      -days 3650 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  }
  newkey ca.key
  printf '%s\n' 'basicConstraints=critical,CA:TRUE' 'keyUsage=critical,keyCertSign,cRLSign,digitalSignature' \
    'subjectKeyIdentifier=hash' >ca.ext
  openssl req -new -key ca.key -subj "/CN=framelane-testenv-ca" -out ca.csr
  openssl x509 -req -in ca.csr -signkey ca.key -days 3650 -extfile ca.ext -out ca.crt 2>/dev/null
  sign apiserver "/CN=kube-apiserver" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1${NODE_HOST_IP:+,IP:$NODE_HOST_IP}"
  # The API server's identity towards kubelets (logs, exec).
  sign kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
  sign admin "/O=system:masters/CN=admin" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
  openssl pkey -in sa.key -pubout -out sa.pub
  # The API server's identity towards admission webhooks: a CA of its own, so only this
  # certificate (not every cluster client) passes an operator's --webhook-client-ca.
  newkey webhook-client-ca.key
  openssl req -new -key webhook-client-ca.key -subj "/CN=framelane-testenv-webhook-client-ca" -out ca.csr
  openssl x509 -req -in ca.csr -signkey webhook-client-ca.key -days 3650 -extfile ca.ext \
    -out webhook-client-ca.crt 2>/dev/null
  newkey webhook-client.key
  printf '%b\n' "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth" >webhook-client.ext
  openssl req -new -key webhook-client.key -subj "/CN=kube-apiserver-webhook-client" -out webhook-client.csr
  openssl x509 -req -in webhook-client.csr -CA webhook-client-ca.crt -CAkey webhook-client-ca.key \
    -set_serial "0x1$(openssl rand -hex 8)" -days 3650 -extfile webhook-client.ext -out webhook-client.crt 2>/dev/null
  rm -f ./*.csr ./*.ext
)

# The API server presents that certificate to every webhook it calls (user "*").
cat >"$PKI/webhook-client.kubeconfig" <<EOF
apiVersion: v1
kind: Config
users:
- name: "*"
  user:
    client-certificate: $PKI/webhook-client.crt
    client-key: $PKI/webhook-client.key
EOF
cat >"$PKI/admission.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $PKI/webhook-client.kubeconfig
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $PKI/webhook-client.kubeconfig
EOF

b64() { base64 <"$1" | tr -d '\n'; }
# Admin kubeconfig (client-certificate auth, CA embedded). The components use it directly;
# tests get a copy only when the whole testenv is ready.
kubeconfig() { # cluster-trust-setting
  cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    $1
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$PKI/admin.crt")
    client-key-data: $(b64 "$PKI/admin.key")
contexts:
- name: testenv
  context:
    cluster: testenv
    user: admin
current-context: testenv
EOF
}
kubeconfig "certificate-authority-data: $(b64 "$PKI/ca.crt")" >"$ADMIN_KUBECONFIG"
kubeconfig "insecure-skip-tls-verify: true" >"$PROBE_KUBECONFIG"

# ---------------------------------------------------------------------------------------------
log "starting etcd, kube-apiserver (ports in $STATE/env)"
# --unsafe-no-fsync: the data is thrown away anyway, and fsync dominates write latency.
launch etcd "$BIN/etcd" \
  --name=testenv \
  --data-dir="$STATE/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --advertise-client-urls="http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="testenv=http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster-state=new \
  --unsafe-no-fsync \
  --quota-backend-bytes=$((1024 * 1024 * 1024))
wait_for etcd 30 "etcd to serve on 127.0.0.1:$ETCD_CLIENT_PORT" probe "http://127.0.0.1:$ETCD_CLIENT_PORT" /health

# Default admission plugins (ResourceQuota, ServiceAccount, ... are on). No front-proxy /
# requestheader setup: nothing here serves an aggregated API.
# --endpoint-reconciler-type=none: the apiserver refuses to start when it would publish a
# loopback --advertise-address in the "kubernetes" Service's endpoints; nothing runs in-cluster
# here, so that Service needs no endpoints.
# --kubelet-preferred-address-types=InternalIP: reach a fake node's "kubelet" (kwok, at
# 127.0.0.1:<kwok port>) by IP; the default tries its Hostname first, which does not resolve.
# With the real node, pods reach the API server through the "kubernetes" Service at the host's
# end of the node's link, so it listens there too and publishes that address; and it calls
# webhooks at their pods' addresses (--enable-aggregator-routing), which the host routes to
# the node, instead of at their Service's cluster IP, which only the node's kube-proxy knows.
# PodNodeSelector and PodTolerationRestriction let a namespace put its pods on the real node.
if [ -n "$NODE_HOST_IP" ]; then
  ADDRESS_FLAGS=(--bind-address=0.0.0.0 --advertise-address="$NODE_HOST_IP" --enable-aggregator-routing=true)
else
  ADDRESS_FLAGS=(--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none)
fi
launch kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$ETCD_CLIENT_PORT" \
  "${ADDRESS_FLAGS[@]}" \
  --enable-admission-plugins=PodNodeSelector,PodTolerationRestriction \
  --kubelet-client-certificate="$PKI/kubelet-client.crt" \
  --kubelet-client-key="$PKI/kubelet-client.key" \
  --secure-port="$APISERVER_PORT" \
  --cert-dir="$PKI/kube-apiserver" \
  --tls-cert-file="$PKI/apiserver.crt" \
  --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --admission-control-config-file="$PKI/admission.yaml" \
  --authorization-mode=Node,RBAC \
  --service-account-issuer=https://kubernetes.default.svc \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --allow-privileged=true \
  --kubelet-preferred-address-types=InternalIP \
  --profiling=false
wait_for kube-apiserver 60 "kube-apiserver /readyz on 127.0.0.1:$APISERVER_PORT" \
  kubectl_admin --request-timeout=5s get --raw /readyz

# ---------------------------------------------------------------------------------------------
log "starting kube-controller-manager, kube-scheduler, kwok"
# --cert-dir: each serves its secure port with a self-signed cert it writes there (default
# /var/run/kubernetes, which would be shared between checkouts or not writable).
# No --authentication/authorization-kubeconfig for them: their /healthz is open anyway, and
# with those set they log an error every few seconds about the missing requestheader CA.
launch kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig="$ADMIN_KUBECONFIG" \
  --leader-elect=false \
  --bind-address=127.0.0.1 \
  --secure-port="$KCM_PORT" \
  --cert-dir="$PKI/kube-controller-manager" \
  --controllers='*' \
  --cluster-name=testenv \
  --service-account-private-key-file="$PKI/sa.key" \
  --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" \
  --cluster-signing-key-file="$PKI/ca.key" \
  --use-service-account-credentials=false

# The scheduler's --kubeconfig flag is deprecated in favour of its config file.
cat >"$STATE/kube-scheduler.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: $ADMIN_KUBECONFIG
leaderElection:
  leaderElect: false
EOF
launch kube-scheduler "$BIN/kube-scheduler" \
  --config="$STATE/kube-scheduler.yaml" \
  --bind-address=127.0.0.1 \
  --secure-port="$SCHEDULER_PORT" \
  --cert-dir="$PKI/kube-scheduler"

# KWOK_WORKDIR: kwok would otherwise also load ~/.kwok/kwok.yaml (a user's own stages) on top
# of ours. --server-address serves kwok's health endpoints on our picked port instead of a
# fixed one; --node-ip/--node-port advertise that address as the fake nodes' kubelet.
# --cidr: pod IPs; the default (10.0.0.0/24) would overlap the Service range.
# Pods only get played once bound to a node kwok manages (the annotation).
KWOK_WORKDIR="$STATE/kwok" launch kwok "$BIN/kwok" \
  --kubeconfig="$ADMIN_KUBECONFIG" \
  --config="$HERE/kwok.yaml" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --node-lease-duration-seconds=40 \
  --cidr="$POD_CIDR" \
  --node-ip=127.0.0.1 \
  --node-port="$KWOK_PORT" \
  --server-address="127.0.0.1:$KWOK_PORT"

wait_for kube-controller-manager 60 "kube-controller-manager /healthz" probe "https://127.0.0.1:$KCM_PORT" /healthz
wait_for kube-scheduler 60 "kube-scheduler /healthz" probe "https://127.0.0.1:$SCHEDULER_PORT" /healthz
wait_for kwok 60 "kwok /healthz" probe "http://127.0.0.1:$KWOK_PORT" /healthz

# ---------------------------------------------------------------------------------------------
log "creating the fake GPU nodes"
apply_nodes

# Pods are refused (ServiceAccount admission) until the namespace's default ServiceAccount exists.
# Note for tests: a namespace they create gets its own default ServiceAccount a moment later.
sa_exists() { kubectl_admin get serviceaccount default -n default >/dev/null 2>&1; }
wait_for kube-controller-manager 60 "the default ServiceAccount" sa_exists

apply_crds

if [ -n "$NODE_HOST_IP" ]; then
  CURRENT=node
  "$HERE/node.sh" start
fi

# Publish the kubeconfig last, atomically: its presence means "ready" to tests and to the
# next up.sh.
CURRENT=kubeconfig
cp "$ADMIN_KUBECONFIG" "$KUBECONFIG_OUT.tmp"
mv -f "$KUBECONFIG_OUT.tmp" "$KUBECONFIG_OUT"
trap - ERR INT TERM
log "ready after ${SECONDS}s"
summary
