#!/usr/bin/env bash
# Stops or starts this checkout's kube-apiserver, for tests of an API server outage:
#   apiserver.sh stop    kills it (the port refuses connections) and keeps its command line
#   apiserver.sh start   starts it again with that command line, as up.sh did, and waits
#                        until it is ready
# The rest of the testenv (etcd, controllers, kwok) keeps running.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PIDFILE="$STATE/kube-apiserver.pid"
CMDLINE="$STATE/kube-apiserver.cmdline"

case "${1:-}" in
  stop)
    pid=$(cat "$PIDFILE")
    # Only the process up.sh started: its arguments name this checkout's state dir.
    [[ "$(ps -o args= -p "$pid")" == *"$STATE/"* ]] || { log "pid $pid is not this testenv's kube-apiserver"; exit 1; }
    cp "/proc/$pid/cmdline" "$CMDLINE"
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    log "kube-apiserver stopped"
    ;;
  start)
    [ -s "$CMDLINE" ] || { log "no saved command line: run '$0 stop' first"; exit 1; }
    mapfile -d '' args <"$CMDLINE"
    setsid nohup "${args[@]}" </dev/null >>"$STATE/logs/kube-apiserver.log" 2>&1 &
    echo "$!" >"$PIDFILE"
    disown "$!"
    deadline=$((SECONDS + 60))
    until "$(dirname "${args[0]}")/kubectl" --kubeconfig="$STATE/kubeconfig" --request-timeout=3s \
      get --raw /readyz </dev/null >/dev/null 2>&1; do
      if ((SECONDS >= deadline)); then log "kube-apiserver not ready after 60s; see $STATE/logs/kube-apiserver.log"; exit 1; fi
      sleep 0.2
    done
    rm -f "$CMDLINE"
    log "kube-apiserver started and ready"
    ;;
  *)
    echo "usage: $0 stop|start" >&2
    exit 2
    ;;
esac
