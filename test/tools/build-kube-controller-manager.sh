#!/usr/bin/env bash
# Builds kube-controller-manager (DaemonSets, service accounts, kube-root-ca.crt) for the harness's real node
# from the Go module proxy into the keyward binary cache, the way kube-apiserver is built (kube_build in
# lib.sh). Most of its packages are kube-apiserver's, so it builds after it from the Go build cache.
source "$(dirname "$0")/lib.sh"
if cached "kube-controller-manager-$KUBE_VERSION"; then exit 0; fi
with_lock kube kube_build kube-controller-manager "~1 min after kubelet on 2 cores"
