#!/usr/bin/env bash
# Builds the local control plane's binaries from Go modules through the Go module proxy and
# caches them outside the checkout, keyed by version, so a second run starts in seconds.
# Prints the bin directory on stdout.
set -euo pipefail

K8S_VERSION=v1.37.2
ETCD_VERSION=v3.7.3
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
# Prometheus's Go module versions its releases as v0.<minor>.<patch> (this is 3.16.0).
PROMTOOL_VERSION=v0.316.0

CACHE=${FRAMELANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/framelane}
BIN="$CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"
mkdir -p "$BIN"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0

log() { echo "tools: $*" >&2; }

# Builds into a scratch dir and moves the binary in last, so an interrupted build never leaves
# a half-written binary that a later run would trust.
have() { [ -x "$BIN/$1" ]; }

# A Go module that requires k8s.io/kubernetes at $K8S_VERSION, in the current directory:
# k8s.io/kubernetes requires its staging modules at v0.0.0, so each is pointed at its release.
k8s_module() {
  go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' | xargs -I{} cp {} upstream.mod
  local staging="v0.${K8S_VERSION#v1.}"
  {
    echo "module framelane.dev/testenv/kubernetes"
    echo "go 1.26.0"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -oE '^[[:space:]]+k8s\.io/[a-z0-9-]+ v0\.0\.0$' upstream.mod | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod
}

# Builds Kubernetes commands (k8s.io/kubernetes/cmd/<name>) into $BIN, stamped with the version
# as upstream's release builds are.
build_k8s_commands() { # name...
  local work minor
  work=$(mktemp -d)
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local pkgs=()
  for b in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  (
    cd "$work"
    k8s_module
    go get "k8s.io/kubernetes/cmd/$1@$K8S_VERSION" "${pkgs[@]:1}" >&2
    local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    local ld="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$date"
    done
    mkdir -p out
    go build -trimpath -ldflags "$ld" -o out/ "${pkgs[@]}" >&2
    for b in "$@"; do mv out/"$b" "$BIN/$b"; done
  )
  rm -rf "$work"
}

build_kubernetes() {
  local want=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local missing=0
  for b in "${want[@]}"; do have "$b" || missing=1; done
  [ "$missing" = 0 ] && return
  log "building Kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl); the first build takes about 20 minutes on 2 cores"
  build_k8s_commands "${want[@]}"
}

# The real node's kubelet and kube-proxy (node.sh), from the same module: most of their
# packages are already in Go's build cache after build_kubernetes.
build_node() {
  have kubelet && have kube-proxy && return
  log "building kubelet and kube-proxy $K8S_VERSION for the real node (about 2 minutes on 2 cores after the control plane's build)"
  build_k8s_commands kubelet kube-proxy
}

# Builds command $1 into $BIN from the main.go on stdin, in a module of its own that requires
# $2 (module@version) when given.
build_main() { # name [module@version]
  local work; work=$(mktemp -d)
  cat > "$work/main.go"
  (
    cd "$work"
    printf 'module framelane.dev/testenv/%s\ngo 1.26.0\n' "$1" > go.mod
    if [ -n "${2:-}" ]; then
      go get "$2" >&2
      go mod tidy >&2
    fi
    go build -trimpath -ldflags "-s -w" -o "$1" . >&2
    mv "$1" "$BIN/$1"
  )
  rm -rf "$work"
}

build_etcd() {
  have etcd && return
  log "building etcd $ETCD_VERSION"
  build_main etcd "go.etcd.io/etcd/server/v3@$ETCD_VERSION" <<'GO'
// Command etcd runs etcd's server entry point; upstream ships its main in another module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
}

# The sandbox ("pause") process of the real node's pods: it holds a pod's namespaces while
# its containers come and go. The runtime needs its image locally (there is no registry), so
# node.sh packs this binary into one.
build_pause() {
  have pause && return
  log "building pause (the real node's sandbox process)"
  build_main pause <<'GO'
// Command pause sleeps until it is told to stop, and reaps the children it inherits as the
// first process of a pod.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			if pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
GO
}

install_go_tool() { # name module-path version [ldflags]
  # $BIN's name carries the control plane's versions, not these tools': a stamp beside each
  # says what it was built from, so a new version is built rather than the old one kept.
  local stamp="$BIN/.$1.built-from" want="$2@$3 ${4:-}"
  if have "$1"; then
    # A binary cached before the stamps were written is taken as the version asked for.
    [ -f "$stamp" ] || echo "$want" >"$stamp"
    [ "$(cat "$stamp")" = "$want" ] && return
  fi
  log "building $1 $3"
  local work; work=$(mktemp -d)
  GOBIN="$work" go install -trimpath -ldflags "-s -w ${4:-}" "$2@$3" >&2
  mv "$work/$1" "$BIN/$1"
  echo "$want" >"$stamp"
  rm -rf "$work"
}

build_kubernetes
build_node
build_pause
build_etcd
install_go_tool kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
install_go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
install_go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
# promtool checks the chart's alert rules and the operator's /metrics (about 8 minutes on 2
# cores, once).
install_go_tool promtool github.com/prometheus/prometheus/cmd/promtool "$PROMTOOL_VERSION" \
  "-X github.com/prometheus/common/version.Version=${PROMTOOL_VERSION#v0.}"
echo "$BIN"
