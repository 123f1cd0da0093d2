#!/usr/bin/env bash
# Builds kubelet, the node agent of the harness's real node (test/harness/node.go)
# from the Go module proxy into the keyward binary cache, the way kube-apiserver is built (kube_build in
# lib.sh). Most of its packages are kube-apiserver's, so it builds after it from the Go build cache.
source "$(dirname "$0")/lib.sh"
if cached "kubelet-$KUBE_VERSION"; then exit 0; fi
with_lock kube kube_build kubelet "~3.5 min after kube-apiserver on 2 cores"
