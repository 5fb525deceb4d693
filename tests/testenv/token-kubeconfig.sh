#!/usr/bin/env bash
# Prints a kubeconfig for the local control plane that authenticates as a ServiceAccount,
# with a token bound to the pod a local process plays (as the kubelet would mount it), so the
# process has exactly that account's permissions.
#
#   tests/testenv/token-kubeconfig.sh NAMESPACE SERVICEACCOUNT POD > file
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ $# -eq 3 ] || { echo "usage: $0 NAMESPACE SERVICEACCOUNT POD" >&2; exit 2; }
export KUBECONFIG="$STATE/kubeconfig"
KUBECTL="$("$HERE/tools.sh")/kubectl"
# Two days: a local control plane rarely lives longer; rerun `just up` to renew.
token=$("$KUBECTL" create token "$2" -n "$1" --bound-object-kind=Pod --bound-object-name="$3" --duration=48h)
server=$("$KUBECTL" config view --raw -o jsonpath='{.clusters[0].cluster.server}')
ca=$("$KUBECTL" config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
cat <<YAML
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster: {server: "$server", certificate-authority-data: "$ca"}
users:
- name: $2
  user: {token: "$token"}
contexts:
- name: $2@testenv
  context: {cluster: testenv, user: $2, namespace: $1}
current-context: $2@testenv
YAML
