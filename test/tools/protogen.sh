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
for t in "protoc-gen-go:$PROTOC_GEN_GO_VERSION" "protoc-gen-go-grpc:$PROTOC_GEN_GO_GRPC_VERSION"; do
  name="${t%%:*}" version="${t#*:}"
  if ! cached "$name-$version"; then
    echo "protogen: $name $version is not built (looked in $KEYWARD_BIN): run \`make deps\` or test/tools/build-protogen.sh" >&2
    exit 1
  fi
  ln -s "$KEYWARD_BIN/$name-$version" "$plugins/$name"
done
# protoc and the well-known types (google/protobuf/*.proto) are Debian's: the version is pinned, as
# it is written into every generated file.
if ! command -v protoc >/dev/null || [ ! -f /usr/include/google/protobuf/timestamp.proto ]; then
  echo "protogen: protoc or the well-known .proto files are missing: run \`make deps\` (Debian protobuf-compiler, libprotobuf-dev)" >&2
  exit 1
fi
have="$(protoc --version)"
if [ "$have" != "libprotoc $PROTOC_VERSION" ]; then
  echo "protogen: $have, want libprotoc $PROTOC_VERSION (test/harness/versions.env): the generated code names the version" >&2
  exit 1
fi
cd "$root/proto"
mkdir -p "$out"
PATH="$plugins:$PATH" protoc -I . -I /usr/include \
  --go_out="$out" --go_opt=paths=source_relative \
  --go-grpc_out="$out" --go-grpc_opt=paths=source_relative \
  $(find keyward -name '*.proto' | sort)
