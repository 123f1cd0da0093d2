#!/usr/bin/env bash
# Generates the Go code of Keyward's own API from proto/**/*.proto with the pinned generators
# (test/tools/build-protogen.sh builds them once). `make proto` runs it into proto/ itself; the proto
# package's TestGeneratedCodeIsCurrent runs it into a temporary directory and compares.
#   protogen.sh [OUT_DIR]      (default: the repository's proto/)
# With KEYWARD_PROTOGEN_NO_BUILD=1 a missing generator is an error instead of a build.
source "$(dirname "$0")/lib.sh"
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/proto}"
if [ "${KEYWARD_PROTOGEN_NO_BUILD:-}" != 1 ]; then
  "$(dirname "$0")/build-protogen.sh"
fi
plugins="$(mktemp -d)"
trap 'rm -rf "$plugins"' EXIT
for t in "buf:$BUF_VERSION" "protoc-gen-go:$PROTOC_GEN_GO_VERSION" "protoc-gen-go-grpc:$PROTOC_GEN_GO_GRPC_VERSION"; do
  name="${t%%:*}" version="${t#*:}"
  if ! cached "$name-$version"; then
    echo "protogen: $name $version is not built (looked in $KEYWARD_BIN): run \`make deps\` or test/tools/build-protogen.sh" >&2
    exit 1
  fi
  ln -s "$KEYWARD_BIN/$name-$version" "$plugins/$name"
done
cd "$root/proto"
PATH="$plugins:$PATH" buf generate --template buf.gen.yaml -o "$out"
