#!/usr/bin/env bash
# Stops the testenv control plane that tests/testenv/up.sh started for this checkout (and its
# real node, node.sh) and removes its state ($REPO/.testenv and $REPO/.testenv.lock). Safe to
# run at any time: after a failed or interrupted up.sh, or when nothing is running (exit 0).
# It only ever signals processes that were started from this checkout's .testenv, so other
# checkouts' testenvs are left alone.
#
# Internal knobs, used by up.sh when it tears down after a failure:
#   TESTENV_LOCK_HELD=1  the caller already holds the lock: do not take it, do not delete it.
#   TESTENV_KEEP_LOGS=1  keep .testenv/logs so the failure can be inspected.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Prints the pids of the live processes of one component of this checkout's testenv.
pids_of() { # component
  local pid args
  # From its pid file first...
  pid=$(cat "$STATE/$1.pid" 2>/dev/null || true)
  if [[ "$pid" =~ ^[0-9]+$ ]] && is_ours "$1" "$pid"; then echo "$pid"; fi
  # ...then a sweep, for a process whose pid file was never written (up.sh killed between
  # starting it and recording it) or was deleted by hand together with .testenv.
  while read -r pid args; do
    if matches "$1" "$args"; then echo "$pid"; fi
  done < <(ps -eo pid=,args= 2>/dev/null || true)
}

# SIGTERM, then SIGKILL whatever is still there after a few seconds.
stop() { # component...
  local pids
  mapfile -t pids < <(for c in "$@"; do pids_of "$c"; done | sort -un)
  [ "${#pids[@]}" -gt 0 ] || return 0
  log "stopping $* (pid ${pids[*]})"
  for p in "${pids[@]}"; do signal TERM "$p"; done
  wait_gone "${pids[@]}"
  if [ "${#left[@]}" -gt 0 ]; then
    log "killing ${left[*]} (still running 5 s after SIGTERM)"
    for p in "${left[@]}"; do signal KILL "$p"; done
    wait_gone "${left[@]}"
  fi
}

if [ "${TESTENV_LOCK_HELD:-}" != 1 ]; then take_lock; fi

# etcd last: stopped together with the apiserver, etcd waits on the apiserver's open watches
# and both need SIGKILL; after it, each wave exits in a second or two.
stop framelane-operator framelane-runner kueue
"$HERE/node.sh" stop
stop kwok kube-scheduler kube-controller-manager kube-apiserver
stop etcd

if [ "${TESTENV_KEEP_LOGS:-}" = 1 ] && [ -d "$STATE/logs" ]; then
  find "$STATE" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
else
  rm -rf "$STATE"
fi
# Deleted while we hold it; a waiter notices (see take_lock) and locks the new file.
if [ "${TESTENV_LOCK_HELD:-}" != 1 ]; then rm -f "$LOCK"; fi
