#!/usr/bin/env bash
# Builds etcd and etcdctl 3.6 from the Go module proxy into the keyward binary cache.
# Debian's etcd (3.4.23) is too old for kube-apiserver 1.37 (streaming lists), and `go install` refuses
# etcd's server module because its go.mod carries replace directives, so we build it from a small nested
# wrapper module that requires both modules.
source "$(dirname "$0")/lib.sh"
if cached "etcd-$ETCD_VERSION" "etcdctl-$ETCD_VERSION"; then exit 0; fi
build() {
  cached "etcd-$ETCD_VERSION" "etcdctl-$ETCD_VERSION" && return 0
  local dir="$KEYWARD_BUILD/etcd-$ETCD_VERSION"
  rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
  cat > go.mod <<MOD
module keyward.local/etcdbuild

go 1.26

require (
	go.etcd.io/etcd/server/v3 $ETCD_VERSION
	go.etcd.io/etcd/etcdctl/v3 $ETCD_VERSION
)
MOD
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/etcdctl/v3"
	_ "go.etcd.io/etcd/server/v3"
)
GO
  log "etcd $ETCD_VERSION: resolving modules"
  go mod tidy
  log "etcd $ETCD_VERSION: building"
  go build -trimpath -o etcd go.etcd.io/etcd/server/v3
  go build -trimpath -o etcdctl go.etcd.io/etcd/etcdctl/v3
  install_bin etcd "etcd-$ETCD_VERSION"
  install_bin etcdctl "etcdctl-$ETCD_VERSION"
  log "etcd $ETCD_VERSION: cached in $KEYWARD_BIN"
}
with_lock etcd build
