#!/usr/bin/env bash
# Installs and builds every real component Keyward's tests and demo run. Idempotent: a second run only
# checks the cache. Builds run one after another (never two heavy Go builds at once on 2 cores).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
start=$SECONDS
"$here/install-debs.sh"
"$here/build-etcd.sh"
"$here/build-kube-apiserver.sh"
"$here/build-kubelet.sh"
"$here/build-kube-controller-manager.sh"
"$here/build-kube-scheduler.sh"
"$here/build-kubectl.sh"
"$here/build-vault.sh"
"$here/build-protogen.sh"
echo "deps: ready in $((SECONDS - start)) s (cache: ${KEYWARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyward})" >&2
