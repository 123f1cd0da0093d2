#!/usr/bin/env bash
# Builds a HashiCorp Vault *test server* from the Go module proxy into the keyward binary cache.
#
# Why this recipe:
# - Keyward talks to Vault through github.com/hashicorp/vault/api, so its tests need a real Vault server.
#   There is no Docker engine and no download site here, only the Go module proxy.
# - Vault >= 1.15 is not open source (BUSL), so we do not use it; OpenBao's server module is not served
#   by the proxy. Vault v1.14.2 is the last MPL-2.0 release and it builds from the proxy.
# - v1.14.2's go.mod points api/ and sdk/ at ./api and ./sdk (replace directives, ignored by a dependent
#   module); the 1.14 branch's sdk has no published tag. The nearest published sdk, v0.9.2, is newer and
#   adds a startup panic for a path that "defines a CreateOperation but no ExistenceCheck", which some
#   1.14 builtin backends trip. So the wrapper module replaces the sdk with a copy of v0.9.2 taken from the
#   module cache, in which only that one check is disabled.
# - Do not run `go mod tidy` in the wrapper: it drags the module graph to versions 1.14.2 does not build with.
#
# - Built with Go 1.26, the binary panics at start ("failed to parse CA certificate", gosnowflake's init)
#   unless run with GODEBUG=x509negativeserial=1; test/harness sets it.
#
# This binary is only ever run as `vault server -dev` on loopback by the tests and the demo. It is a test
# server, not something to deploy. Cold: ~10 min on 2 cores after ~3 min of module downloads, a ~270 MB binary.
source "$(dirname "$0")/lib.sh"
VAULT_API_VERSION=v1.9.2
VAULT_SDK_VERSION=v0.9.2
if cached "vault-$VAULT_VERSION"; then exit 0; fi
build() {
  cached "vault-$VAULT_VERSION" && return 0
  local dir="$KEYWARD_BUILD/vault-$VAULT_VERSION" sdkdir
  rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
  cat > go.mod <<MOD
module keyward.local/vaultbuild

go 1.26

require (
	github.com/hashicorp/vault $VAULT_VERSION
	github.com/hashicorp/vault/api $VAULT_API_VERSION
	github.com/hashicorp/vault/sdk $VAULT_SDK_VERSION
)

replace github.com/hashicorp/vault/sdk => ./sdk
MOD
  log "vault $VAULT_VERSION: fetching sdk $VAULT_SDK_VERSION"
  sdkdir=$(go mod download -json "github.com/hashicorp/vault/sdk@$VAULT_SDK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$sdkdir" ] || { log "cannot locate sdk $VAULT_SDK_VERSION in the module cache"; exit 1; }
  cp -r "$sdkdir" sdk
  chmod -R u+w sdk
  sed -i 's/^\([[:space:]]*\)if p\.ExistenceCheck == nil {$/\1if false \&\& p.ExistenceCheck == nil { \/\/ keyward: check disabled, see build-vault.sh/' sdk/framework/backend.go
  [ "$(grep -c 'keyward: check disabled' sdk/framework/backend.go)" = 1 ] || { log "sdk patch did not apply"; exit 1; }
  log "vault $VAULT_VERSION: resolving modules"
  go get "github.com/hashicorp/vault@$VAULT_VERSION"
  log "vault $VAULT_VERSION: building (~10 min cold on 2 cores)"
  go build -trimpath -ldflags "-s -w" -o vault github.com/hashicorp/vault &
  progress $! "vault $VAULT_VERSION"
  install_bin vault "vault-$VAULT_VERSION"
  log "vault $VAULT_VERSION: cached in $KEYWARD_BIN"
}
with_lock vault build
