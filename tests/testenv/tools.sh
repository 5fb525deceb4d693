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

build_kubernetes() {
  local want=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local missing=0
  for b in "${want[@]}"; do have "$b" || missing=1; done
  [ "$missing" = 0 ] && return
  log "building Kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl); the first build takes about 20 minutes on 2 cores"
  local work minor
  work=$(mktemp -d)
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local staging="v0.${K8S_VERSION#v1.}"
  (
    cd "$work"
    go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' | xargs -I{} cp {} upstream.mod
    {
      echo "module framelane.dev/testenv/kubernetes"
      echo "go 1.26.0"
      echo "require k8s.io/kubernetes $K8S_VERSION"
      # k8s.io/kubernetes requires its staging modules at v0.0.0; point each at its release.
      grep -oE '^[[:space:]]+k8s\.io/[a-z0-9-]+ v0\.0\.0$' upstream.mod | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
    } > go.mod
    go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl >&2
    local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    local ld="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$date"
    done
    mkdir -p out
    go build -trimpath -ldflags "$ld" -o out/ k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl >&2
    for b in "${want[@]}"; do mv out/"$b" "$BIN/$b"; done
  )
  rm -rf "$work"
}

build_etcd() {
  have etcd && return
  log "building etcd $ETCD_VERSION"
  local work; work=$(mktemp -d)
  (
    cd "$work"
    printf 'module framelane.dev/testenv/etcd\ngo 1.26.0\n' > go.mod
    cat > main.go <<'GO'
// Command etcd runs etcd's server entry point; upstream ships its main in another module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
    go mod tidy >&2
    go build -trimpath -ldflags "-s -w" -o etcd . >&2
    mv etcd "$BIN/etcd"
  )
  rm -rf "$work"
}

install_go_tool() { # name module-path version
  have "$1" && return
  log "building $1 $3"
  local work; work=$(mktemp -d)
  GOBIN="$work" go install -trimpath -ldflags "-s -w ${4:-}" "$2@$3" >&2
  mv "$work/$1" "$BIN/$1"
  rm -rf "$work"
}

build_kubernetes
build_etcd
install_go_tool kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
install_go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
install_go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
# promtool checks the chart's alert rules and the operator's /metrics (about 8 minutes on 2
# cores, once).
install_go_tool promtool github.com/prometheus/prometheus/cmd/promtool "$PROMTOOL_VERSION" \
  "-X github.com/prometheus/common/version.Version=${PROMTOOL_VERSION#v0.}"
echo "$BIN"
