#!/usr/bin/env bash
# Builds the protoc plugins of Keyward's own API (proto/) from the Go module proxy into the keyward
# binary cache, at the versions pinned in test/harness/versions.env: protoc-gen-go (matching
# google.golang.org/protobuf in go.mod) and protoc-gen-go-grpc. protoc itself is Debian's
# protobuf-compiler (install-debs.sh). Cold: under a minute on 2 cores; cached: nothing to do.
source "$(dirname "$0")/lib.sh"
tools=("protoc-gen-go-$PROTOC_GEN_GO_VERSION" "protoc-gen-go-grpc-$PROTOC_GEN_GO_GRPC_VERSION")
if cached "${tools[@]}"; then exit 0; fi
build() {
  cached "${tools[@]}" && return 0
  local gobin="$KEYWARD_BUILD/protogen"
  rm -rf "$gobin"; mkdir -p "$gobin"
  log "protoc-gen-go $PROTOC_GEN_GO_VERSION, protoc-gen-go-grpc $PROTOC_GEN_GO_GRPC_VERSION: building"
  GOBIN="$gobin" go install -trimpath "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
  GOBIN="$gobin" go install -trimpath "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION"
  install_bin "$gobin/protoc-gen-go" "protoc-gen-go-$PROTOC_GEN_GO_VERSION"
  install_bin "$gobin/protoc-gen-go-grpc" "protoc-gen-go-grpc-$PROTOC_GEN_GO_GRPC_VERSION"
  log "protogen: cached in $KEYWARD_BIN"
}
with_lock protogen build
