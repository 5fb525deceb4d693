#!/usr/bin/env bash
# Stops or starts one of this checkout's control plane processes, for tests of an outage:
#   outage.sh stop COMPONENT    kills it (kube-apiserver: its port refuses connections;
#                               etcd: the API server answers errors) and keeps its command line
#   outage.sh start COMPONENT   starts it again with that command line, as up.sh did, and
#                               waits until the API server is ready (which needs etcd)
# COMPONENT is kube-apiserver or etcd; the rest of the testenv keeps running.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
component="${2:-}"
case "$component" in
  kube-apiserver | etcd) ;;
  *) echo "usage: $0 stop|start kube-apiserver|etcd" >&2; exit 2 ;;
esac
PIDFILE="$STATE/$component.pid"
CMDLINE="$STATE/$component.cmdline"

case "${1:-}" in
  stop)
    pid=$(cat "$PIDFILE")
    # Only the process up.sh started: its arguments name this checkout's state dir.
    [[ "$(ps -o args= -p "$pid")" == *"$STATE/"* ]] || { log "pid $pid is not this testenv's $component"; exit 1; }
    cp "/proc/$pid/cmdline" "$CMDLINE"
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    log "$component stopped"
    ;;
  start)
    [ -s "$CMDLINE" ] || { log "no saved command line: run '$0 stop $component' first"; exit 1; }
    mapfile -d '' args <"$CMDLINE"
    setsid nohup "${args[@]}" </dev/null >>"$STATE/logs/$component.log" 2>&1 &
    echo "$!" >"$PIDFILE"
    disown "$!"
    deadline=$((SECONDS + 60))
    until "$(dirname "${args[0]}")/kubectl" --kubeconfig="$STATE/kubeconfig" --request-timeout=3s \
      get --raw /readyz </dev/null >/dev/null 2>&1; do
      if ((SECONDS >= deadline)); then log "the API server not ready 60s after starting $component; see $STATE/logs/$component.log"; exit 1; fi
      sleep 0.2
    done
    rm -f "$CMDLINE"
    log "$component started; the API server is ready"
    ;;
  *)
    echo "usage: $0 stop|start kube-apiserver|etcd" >&2
    exit 2
    ;;
esac
