#!/usr/bin/env bash
# Installs the Debian packages Keyward's tests use: SoftHSM2 (the PKCS#11 HSM), OpenSC (pkcs11-tool),
# the real node's runtime: containerd (1.6), runc and containernetworking-plugins (the CNI bridge,
# host-local and loopback plugins in /usr/lib/cni), and PostgreSQL (the server's
# /usr/lib/postgresql/<major>/bin/{initdb,postgres,pg_ctl} and psql) for Vault's database secrets
# engine. The harness starts its own containerd and its own postgres, each with its own config, data
# directory, socket and port; the packaged services are not used: when this script installs them it
# stops what the packages started and keeps them from starting again (PostgreSQL's main cluster on
# port 5432 set to start manually). protobuf-compiler and libprotobuf-dev: protoc and the well-known
# .proto files, for `make proto` and its staleness test (proto/).
# Idempotent: does nothing when they are present. Needs root (or sudo) the first time.
set -euo pipefail
PKGS="softhsm2 opensc containerd runc containernetworking-plugins protobuf-compiler libprotobuf-dev postgresql postgresql-client"
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

# The packaged services: stopped and disabled (whether or not a policy-rc.d let the packages start
# them). Errors are ignored: a service that was never started or has no unit is already what we want.
systemd=0
if [ -d /run/systemd/system ]; then systemd=1; fi
if [[ " $missing " == *" containerd "* ]] && [ "$systemd" = 1 ]; then
  $SUDO systemctl disable --now containerd.service >/dev/null 2>&1 || true
fi
if [[ " $missing " == *" postgresql "* ]]; then
  # Debian's postgresql-common made a cluster (<major>/main, port 5432) and may have started it:
  # "manual" in its start.conf keeps the init script and systemd from starting it again.
  for conf in /etc/postgresql/*/*/start.conf; do
    if [ -e "$conf" ]; then echo manual | $SUDO tee "$conf" >/dev/null; fi
  done
  pg_lsclusters -h 2>/dev/null | while read -r ver name _ status _; do
    if [ "$status" = online ]; then $SUDO pg_ctlcluster "$ver" "$name" stop || true; fi
  done || true
  if [ "$systemd" = 1 ]; then
    $SUDO systemctl disable --now postgresql.service >/dev/null 2>&1 || true
  else
    $SUDO update-rc.d postgresql disable >/dev/null 2>&1 || true
  fi
fi
