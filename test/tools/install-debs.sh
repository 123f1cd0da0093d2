#!/usr/bin/env bash
# Installs the Debian packages Keyward's tests use: SoftHSM2 (the PKCS#11 HSM), OpenSC (pkcs11-tool),
# and the real node's runtime: containerd (1.6), runc and containernetworking-plugins (the CNI bridge,
# host-local and loopback plugins in /usr/lib/cni). The harness starts its own containerd with its own
# config and socket; the packaged service is not used (and is stopped if the package started one).
# Idempotent: does nothing when they are present. Needs root (or sudo) the first time.
set -euo pipefail
PKGS="softhsm2 opensc containerd runc containernetworking-plugins"
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
