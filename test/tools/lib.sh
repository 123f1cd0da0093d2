# Shared helpers for the component build scripts. Sourced, not run.
# Built binaries are cached, keyed by version, under $KEYWARD_CACHE/bin so only the first run builds.
set -euo pipefail
# shellcheck source=../harness/versions.env
source "$(dirname "${BASH_SOURCE[0]}")/../harness/versions.env"
KEYWARD_CACHE="${KEYWARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyward}"
KEYWARD_BIN="$KEYWARD_CACHE/bin"
KEYWARD_BUILD="$KEYWARD_CACHE/build"
mkdir -p "$KEYWARD_BIN" "$KEYWARD_BUILD"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# cached NAME: true if every named binary is already in the cache.
cached() {
  local f
  for f in "$@"; do [ -x "$KEYWARD_BIN/$f" ] || return 1; done
}

# install_bin SRC NAME: move a freshly built binary into the cache atomically (no partial binaries).
install_bin() {
  local src=$1 name=$2
  install -m 0755 "$src" "$KEYWARD_BIN/.$name.tmp.$$"
  mv -f "$KEYWARD_BIN/.$name.tmp.$$" "$KEYWARD_BIN/$name"
}

# with_lock NAME CMD...: serialize builds across processes (never two heavy builds at once).
with_lock() {
  local name=$1; shift
  exec 9>"$KEYWARD_CACHE/build.lock"
  flock 9
  "$@"
}

# progress PID LABEL: print a heartbeat while a long build runs, so a cold first run is visibly alive.
progress() {
  local pid=$1 label=$2 start=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    kill -0 "$pid" 2>/dev/null && log "$label: still building ($((SECONDS - start)) s)"
  done
  wait "$pid"
}
