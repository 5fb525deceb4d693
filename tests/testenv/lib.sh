# Shared by the testenv scripts: where this checkout's testenv lives, its lock, and how its
# processes are told from others and stopped.
# shellcheck shell=bash

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
STATE="$REPO/.testenv"
# Outside .testenv so that down.sh can delete the whole state dir while the lock is held.
LOCK="$REPO/.testenv.lock"

log() { echo "testenv: $*" >&2; }

# The lock is held for a whole up.sh or down.sh (fd 9) and released when that shell exits.
# down.sh deletes the lock file while holding it; anyone who was waiting then holds a lock on
# a deleted file, which is why a lock is only trusted when it is still the file at $LOCK.
# Components started by up.sh must not inherit fd 9 (they would hold the lock while they run).
take_lock() {
  while :; do
    exec 9>>"$LOCK"
    if ! flock -n 9; then
      log "another up.sh/down.sh of this checkout is running; waiting for it (lock $LOCK)"
      flock 9
    fi
    if [ "$LOCK" -ef /dev/fd/9 ]; then return 0; fi
    exec 9>&-
  done
}

# A process is ours if it runs the component's binary and names our state dir in its
# arguments (every component is started with a path inside it), so a stale pid file whose pid
# got reused, or another checkout's testenv, is never signalled.
matches() { # component args
  local exe=${2%% *}
  [ "${exe##*/}" = "$1" ] && [[ "$2" == *"$STATE/"* ]]
}
is_ours() { # component pid
  local args
  args=$(ps -o args= -p "$2" 2>/dev/null) || return 1
  matches "$1" "$args"
}

# Signals a process and, when it leads its own process group (up.sh starts every component
# with setsid), the whole group, so nothing it forked survives.
signal() { # SIG pid
  local pgid
  pgid=$(ps -o pgid= -p "$2" 2>/dev/null | tr -d ' ' || true)
  if [ "$pgid" = "$2" ]; then kill -"$1" -- "-$2" 2>/dev/null || true; fi
  kill -"$1" "$2" 2>/dev/null || true
}

# Waits up to 5 s for the pids to exit; returns the ones still alive in $left.
wait_gone() { # pids...
  local p
  for _ in $(seq 50); do
    left=()
    for p in "$@"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
    [ "${#left[@]}" -eq 0 ] && return 0
    sleep 0.1
  done
}

# Stops the process a pid file named, only while it is still ours (the pid may have been
# reused since): SIGTERM, then SIGKILL if it is still there after 5 s.
stop_pid() { # component pid
  is_ours "$1" "$2" || return 0
  signal TERM "$2"
  wait_gone "$2"
  if [ "${#left[@]}" -gt 0 ]; then
    log "killing $1 (pid $2, still running 5 s after SIGTERM)"
    signal KILL "$2"
    wait_gone "$2"
  fi
}
