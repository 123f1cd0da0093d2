#!/usr/bin/env bash
# Builds the code generators of Keyward's own API (proto/) from the Go module proxy into the keyward
# binary cache, at the versions pinned in test/harness/versions.env: buf (compiles the .proto files,
# no protoc needed), protoc-gen-go (matching google.golang.org/protobuf in go.mod) and
# protoc-gen-go-grpc. Cold: about 15 minutes on 2 cores (buf is large); cached: nothing to do.
source "$(dirname "$0")/lib.sh"
tools=("buf-$BUF_VERSION" "protoc-gen-go-$PROTOC_GEN_GO_VERSION" "protoc-gen-go-grpc-$PROTOC_GEN_GO_GRPC_VERSION")
if cached "${tools[@]}"; then exit 0; fi
build() {
  cached "${tools[@]}" && return 0
  local gobin="$KEYWARD_BUILD/protogen"
  rm -rf "$gobin"; mkdir -p "$gobin"
  log "protoc-gen-go $PROTOC_GEN_GO_VERSION, protoc-gen-go-grpc $PROTOC_GEN_GO_GRPC_VERSION: building"
  GOBIN="$gobin" go install -trimpath "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
  GOBIN="$gobin" go install -trimpath "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION"
  log "buf $BUF_VERSION: building (about 15 minutes cold on 2 cores)"
  GOBIN="$gobin" go install -trimpath "github.com/bufbuild/buf/cmd/buf@$BUF_VERSION" &
  progress $! "buf $BUF_VERSION"
  install_bin "$gobin/protoc-gen-go" "protoc-gen-go-$PROTOC_GEN_GO_VERSION"
  install_bin "$gobin/protoc-gen-go-grpc" "protoc-gen-go-grpc-$PROTOC_GEN_GO_GRPC_VERSION"
  install_bin "$gobin/buf" "buf-$BUF_VERSION"
  log "protogen: cached in $KEYWARD_BIN"
}
with_lock protogen build
