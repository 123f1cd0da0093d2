#!/usr/bin/env bash
# Installs the Debian packages Keyward's tests use: SoftHSM2 (the PKCS#11 HSM) and OpenSC (pkcs11-tool).
# Idempotent: does nothing when they are present. Needs root (or sudo) the first time.
set -euo pipefail
PKGS="softhsm2 opensc"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing Debian packages:$missing" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
