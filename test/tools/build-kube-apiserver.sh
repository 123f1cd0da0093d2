#!/usr/bin/env bash
# Builds kube-apiserver from the Go module proxy into the keyward binary cache.
# k8s.io/kubernetes is not meant to be consumed as a module: its go.mod points every staging module
# (k8s.io/api, k8s.io/client-go, ...) at ./staging via replace directives, which a dependent module ignores.
# A nested wrapper module therefore repeats that replace block, pinning each staging module to the
# matching published v0.X.Y tag. Cold: ~7 min and ~2.7 GB RAM on 2 cores.
source "$(dirname "$0")/lib.sh"
if cached "kube-apiserver-$KUBE_VERSION"; then exit 0; fi
STAGING="api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api cri-client
cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics mount-utils
pod-security-admission sample-apiserver streaming"
build() {
  cached "kube-apiserver-$KUBE_VERSION" && return 0
  local dir="$KEYWARD_BUILD/kube-apiserver-$KUBE_VERSION" minor staging_version
  minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
  staging_version="v0.${KUBE_VERSION#v1.}"
  rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
  {
    printf 'module keyward.local/kubebuild\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
    for m in $STAGING; do printf '\tk8s.io/%s => k8s.io/%s %s\n' "$m" "$m" "$staging_version"; done
    printf ')\n'
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
  log "kube-apiserver $KUBE_VERSION: resolving modules"
  go mod tidy
  local pkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version date
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="-s -w"
  for p in $pkg $cpkg; do
    ld="$ld -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  log "kube-apiserver $KUBE_VERSION: building (~7 min cold on 2 cores)"
  go build -trimpath -ldflags "$ld" -o kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver &
  progress $! "kube-apiserver $KUBE_VERSION"
  install_bin kube-apiserver "kube-apiserver-$KUBE_VERSION"
  log "kube-apiserver $KUBE_VERSION: cached in $KEYWARD_BIN"
}
with_lock kube build
