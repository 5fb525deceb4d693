#!/usr/bin/env bash
# The real node of this checkout's local control plane: containerd, kubelet and kube-proxy, so
# that pods run as real containers (runc, the bridge CNI plugin) beside kwok's fake GPU nodes.
#
# The node lives in a network namespace of its own (framelane-<id>, linked to the host by a
# veth pair), so its kubelet ports, iptables rules and pod bridge never meet another
# checkout's node; its cgroups are under /framelane-<id>, its state under .testenv/node/. It is
# tainted framelane.dev/real-node:NoSchedule and labelled framelane.dev/node=real: only pods
# of a namespace that asks for it run there (with the API server's PodNodeSelector and
# PodTolerationRestriction annotations, see up.sh), so kwok keeps playing every other pod. There is no registry: images come from Docker
# (`node.sh load`), the pods' sandbox image from tools.sh's pause binary.
#
#   node.sh net             create the namespace and its link; prints the addresses (up.sh,
#                           before the API server starts: pods reach it at the host's end)
#   node.sh start           start containerd, kubelet and kube-proxy; wait until it is Ready
#   node.sh load IMAGE...   copy images from Docker into the node's containerd
#   node.sh alive           exit 0 when containerd, kubelet and kube-proxy run
#   node.sh stop            stop it, kill what runs in its cgroups, unmount, remove the
#                           namespace (down.sh)
# It needs root: namespaces, cgroups and mounts.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
NODE="$STATE/node"
LOGS="$STATE/logs"
PKI="$STATE/pki"
ID=$(printf '%s' "$REPO" | sha256sum | cut -c1-6)
NETNS="framelane-$ID"
HOST_IF="fl-$ID"
CGROUP="framelane-$ID"
NODE_NAME=real-node
TAINT=framelane.dev/real-node
PAUSE_IMAGE=framelane.local/pause:1
SOCK="$NODE/containerd.sock"
NODE_LOCK=/run/framelane-node.lock

ctr_node() { ctr --address "$SOCK" --namespace k8s.io "$@"; }

# What the node runs on, from Debian's packages where missing: containerd (with ctr), runc, the
# CNI plugins (bridge, host-local, loopback), and iptables, conntrack and curl for kube-proxy
# and its health check.
packages() {
  local missing=() pair
  for pair in containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
    iptables:iptables conntrack:conntrack curl:curl; do
    if [[ "${pair%%:*}" == /* ]]; then [ -x "${pair%%:*}" ] && continue
    else command -v "${pair%%:*}" >/dev/null && continue; fi
    missing+=("${pair#*:}")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  command -v apt-get >/dev/null || { log "the real node needs ${missing[*]}: install them"; exit 1; }
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# The link: 10.200.<n>.1 on the host, 10.200.<n>.2 in the node's namespace, pods in
# 10.201.<n>.0/24 (routed to the node from the host, so the API server reaches the webhook
# pods). <n> is the first index from this checkout's id on that no other node uses.
net() {
  packages
  exec 7>"$NODE_LOCK"
  flock 7
  local n=$((16#$ID % 250)) tries=0
  while ip -4 -o addr show | grep -q " 10\.200\.$n\." || ip -4 route show | grep -q "^10\.201\.$n\."; do
    n=$(((n + 1) % 250))
    tries=$((tries + 1))
    [ "$tries" -lt 250 ] || { log "no free 10.200.<n>.0/30 for the real node"; exit 1; }
  done
  ip netns add "$NETNS"
  ip link add "$HOST_IF" type veth peer name eth0 netns "$NETNS"
  ip addr add "10.200.$n.1/30" dev "$HOST_IF"
  ip link set "$HOST_IF" up
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" addr add "10.200.$n.2/30" dev eth0
  ip -n "$NETNS" link set eth0 up
  ip -n "$NETNS" route add default via "10.200.$n.1"
  ip route add "10.201.$n.0/24" via "10.200.$n.2"
  # The node routes between its pods and the host, and kube-proxy's rules also see traffic
  # between two pods on its bridge.
  ip netns exec "$NETNS" sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
  printf '%s=%q\n' NODE_NAME "$NODE_NAME" NODE_NETNS "$NETNS" NODE_HOST_IP "10.200.$n.1" \
    NODE_IP "10.200.$n.2" NODE_POD_CIDR "10.201.$n.0/24" NODE_CONTAINERD "$SOCK"
}

# ---------------------------------------------------------------------------------------------
# A client certificate signed by the control plane's CA, and a kubeconfig with it that reaches
# the API server at the host's end of the link.
client_kubeconfig() { # name subject
  local b64
  (
    cd "$PKI"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    printf '%s\n' basicConstraints=CA:FALSE keyUsage=critical,digitalSignature,keyEncipherment \
      extendedKeyUsage=clientAuth >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -set_serial "0x1$(openssl rand -hex 8)" \
      -days 3650 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
  )
  b64() { base64 <"$1" | tr -d '\n'; }
  cat >"$NODE/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: https://$NODE_HOST_IP:$APISERVER_PORT
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $1
  user:
    client-certificate-data: $(b64 "$PKI/$1.crt")
    client-key-data: $(b64 "$PKI/$1.key")
contexts:
- name: testenv
  context: {cluster: testenv, user: $1}
current-context: testenv
EOF
}

# The node's cgroup in every v1 hierarchy (kubelet's cgroupRoot); a cpuset cgroup starts
# with no CPUs and memory nodes, so it gets its parent's.
make_cgroups() {
  local dir
  for dir in /sys/fs/cgroup/*/; do
    [ -e "$dir/cgroup.procs" ] || continue
    mkdir -p "$dir$CGROUP"
  done
  if [ -d "/sys/fs/cgroup/cpuset/$CGROUP" ]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$CGROUP/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$CGROUP/cpuset.mems"
  fi
}

write_configs() {
  mkdir -p "$NODE/cni" "$NODE/containerd" "$NODE/kubelet" "$NODE/pod-logs" "$NODE/runc"
  # restrict_oom_score_adj: without CAP_SYS_RESOURCE (as here) runc cannot lower a
  # container's OOM score below containerd's own. netns_mounts_under_state_dir: the pods'
  # network namespaces are mounted under the state dir, which stop() unmounts.
  cat >"$NODE/containerd.toml" <<EOF
version = 2
root = "$NODE/containerd/root"
state = "$NODE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "$SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$NODE/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE/cni"
EOF
  cat >"$NODE/cni/10-framelane.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "framelane-$ID",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$NODE_POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$NODE/cni/ipam"
      }
    }
  ]
}
EOF
  # Thresholds at the limits: the disk of a shared machine may be fuller than kubelet's
  # defaults allow, and the images cannot be pulled again once collected.
  cat >"$NODE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$SOCK
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP
failCgroupV1: false
failSwapOn: false
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
registerWithTaints:
  - {key: $TAINT, value: "true", effect: NoSchedule}
podLogsDir: $NODE/pod-logs
maxPods: 30
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
EOF
  # conntrack at 0: the conntrack table's size is the host's, not this namespace's to set.
  cat >"$NODE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $NODE/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $NODE_POD_CIDR
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# Starts a component in the node's network namespace (but the host's mount namespace, which
# kubelet and containerd must share), in its own session, logging to .testenv/logs/.
launch() { # component command...
  local comp=$1
  shift
  setsid nohup nsenter --net="/run/netns/$NETNS" -- "$@" </dev/null >"$LOGS/$comp.log" 2>&1 9>&- 7>&- &
  echo "$!" >"$NODE/$comp.pid"
  disown "$!"
}

wait_until() { # seconds what log command...
  local deadline=$((SECONDS + $1)) what=$2 logfile=$3
  shift 3
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out waiting for $what; last lines of $logfile:"
      tail -n 30 "$logfile" | sed 's/^/    /' >&2
      return 1
    fi
    sleep 0.5
  done
}

# The pods' sandbox image, packed from tools.sh's pause binary as a Docker archive.
load_pause() { # bin-dir
  local dir cfg diff
  dir=$(mktemp -d)
  cp "$1/pause" "$dir/pause"
  tar -C "$dir" --owner=0 --group=0 -cf "$dir/layer.tar" pause
  diff=$(sha256sum "$dir/layer.tar" | cut -d' ' -f1)
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/pause"],"User":"65535:65535"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$diff" >"$dir/config.json"
  cfg=$(sha256sum "$dir/config.json" | cut -d' ' -f1)
  mv "$dir/config.json" "$dir/$cfg.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer.tar"]}]' "$cfg" "$PAUSE_IMAGE" >"$dir/manifest.json"
  tar -C "$dir" -cf - manifest.json "$cfg.json" layer.tar | ctr_node images import - >/dev/null
  rm -rf "$dir"
}

start() {
  source "$STATE/env"
  local bin kubectl
  bin=$("$HERE/tools.sh")
  kubectl=("$bin/kubectl" --kubeconfig="$PKI/admin.kubeconfig")
  mkdir -p "$NODE" "$LOGS"
  client_kubeconfig kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  client_kubeconfig kube-proxy "/CN=system:kube-proxy"
  make_cgroups
  write_configs

  launch containerd containerd --config "$NODE/containerd.toml"
  wait_until 30 "containerd" "$LOGS/containerd.log" ctr --address "$SOCK" version
  load_pause "$bin"
  launch kubelet "$bin/kubelet" --config="$NODE/kubelet.yaml" --kubeconfig="$NODE/kubelet.kubeconfig" \
    --root-dir="$NODE/kubelet" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    --node-labels=framelane.dev/node=real
  launch kube-proxy "$bin/kube-proxy" --config="$NODE/kube-proxy.yaml"
  wait_until 120 "node $NODE_NAME to be Ready" "$LOGS/kubelet.log" \
    "${kubectl[@]}" wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  # kube-proxy has written the rules for the API server's Service once its health says so.
  wait_until 60 "kube-proxy" "$LOGS/kube-proxy.log" \
    ip netns exec "$NETNS" curl -sf http://127.0.0.1:10256/healthz
  log "real node $NODE_NAME is Ready (pods in $NODE_POD_CIDR; logs $LOGS/{containerd,kubelet,kube-proxy}.log)"
}

# Copies images from Docker into the node's containerd, unless this node has that image id
# under that name already.
load() { # image...
  local image id stamp
  mkdir -p "$NODE/images"
  for image in "$@"; do
    id=$(docker image inspect -f '{{.Id}}' "$image") || {
      log "Docker has no image $image; build it with \`just images\`"
      exit 1
    }
    stamp="$NODE/images/$(printf '%s' "$image" | tr -c 'a-zA-Z0-9._-' '_')"
    [ "$(cat "$stamp" 2>/dev/null)" != "$id" ] || continue
    log "loading $image into the real node"
    docker save "$image" | ctr_node images import - >/dev/null
    echo "$id" >"$stamp"
  done
}

# ---------------------------------------------------------------------------------------------
pid_of() { # component
  local pid
  pid=$(cat "$NODE/$1.pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(ps -o args= -p "$pid" 2>/dev/null)" == *"$NODE/"* ]] && echo "$pid"
}

kill_and_wait() { # pid...
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$@" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null || true
}

# Every process in the node's cgroups: the containers and their sandboxes.
cgroup_pids() {
  find "/sys/fs/cgroup/pids/$CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null || true
}

stop() {
  local pids pid
  [ -d "$NODE" ] || ip netns list | grep -qw "$NETNS" || [ -d "/sys/fs/cgroup/pids/$CGROUP" ] || return 0
  log "stopping the real node"
  pids=()
  for c in kubelet kube-proxy; do pid=$(pid_of "$c") && pids+=("$pid"); done
  kill_and_wait "${pids[@]}"
  for _ in $(seq 50); do
    mapfile -t pids < <(cgroup_pids)
    [ "${#pids[@]}" -gt 0 ] || break
    kill -KILL "${pids[@]}" 2>/dev/null || true
    sleep 0.1
  done
  pids=()
  pid=$(pid_of containerd) && pids+=("$pid")
  # Shims outlive containerd; they name its socket.
  while read -r pid args; do
    [[ "$args" == *containerd-shim*"$SOCK"* ]] && pids+=("$pid")
  done < <(ps -eo pid=,args=)
  kill_and_wait "${pids[@]}"
  # Containers' root filesystems, the pods' network namespaces and volumes.
  findmnt -rn -o TARGET | grep "^$NODE/" | sort -r | while read -r target; do
    umount -l "$target" 2>/dev/null || true
  done
  find /sys/fs/cgroup/*/"$CGROUP" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  # The veth pair goes with the namespace, and the route to the pods with it.
  ip netns del "$NETNS" 2>/dev/null || true
  ip link del "$HOST_IF" 2>/dev/null || true
}

# containerd, kubelet and kube-proxy are running.
alive() {
  local c
  for c in containerd kubelet kube-proxy; do
    pid_of "$c" >/dev/null || return 1
  done
}

case "${1:-}" in
  net) net ;;
  alive) alive ;;
  start) start ;;
  load) shift; load "$@" ;;
  stop) stop ;;
  *) echo "usage: $0 net|start|alive|load IMAGE...|stop" >&2; exit 2 ;;
esac
