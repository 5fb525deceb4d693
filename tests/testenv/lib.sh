# Shared by up.sh and down.sh: where this checkout's testenv lives, and its lock.
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
