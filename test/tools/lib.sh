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

# Staging modules of k8s.io/kubernetes: its go.mod points each at ./staging via a replace directive, which
# a dependent module ignores, so kube_build's wrapper module pins each to the matching published v0.X.Y.
KUBE_STAGING="api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api cri-client
cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics mount-utils
pod-security-admission sample-apiserver streaming"

# kube_build NAME HINT: builds k8s.io/kubernetes/cmd/NAME at $KUBE_VERSION from a nested wrapper module
# (k8s.io/kubernetes is not meant to be consumed as a module; see KUBE_STAGING) and caches it as
# NAME-$KUBE_VERSION. HINT says how long it takes cold. Every Kubernetes binary is built with the same
# flags, so the later ones reuse the Go build cache of the earlier ones (the shared packages).
kube_build() {
  local name=$1 hint=$2
  cached "$name-$KUBE_VERSION" && return 0
  local dir="$KEYWARD_BUILD/$name-$KUBE_VERSION" minor staging_version m
  minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
  staging_version="v0.${KUBE_VERSION#v1.}"
  rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
  {
    printf 'module keyward.local/kubebuild\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
    for m in $KUBE_STAGING; do printf '\tk8s.io/%s => k8s.io/%s %s\n' "$m" "$m" "$staging_version"; done
    printf ')\n'
  } > go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/%s"\n' "$name" > tools.go
  log "$name $KUBE_VERSION: resolving modules"
  go mod tidy
  local pkg date ld="-s -w"
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  log "$name $KUBE_VERSION: building ($hint)"
  go build -trimpath -ldflags "$ld" -o "$name" "k8s.io/kubernetes/cmd/$name" &
  progress $! "$name $KUBE_VERSION"
  install_bin "$name" "$name-$KUBE_VERSION"
  log "$name $KUBE_VERSION: cached in $KEYWARD_BIN"
}
