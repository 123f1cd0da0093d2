#!/usr/bin/env bash
# Builds kubectl, the operator's client, for the demo (which shows what an operator sees: kubectl get,
# describe, apply -k) and the README's deploy-to-your-cluster test, from the Go module proxy into the
# keyward binary cache, the way kube-apiserver is built (kube_build in lib.sh). Most of its packages are
# client-go's and apimachinery's, already in the Go build cache after the other Kubernetes binaries.
source "$(dirname "$0")/lib.sh"
if cached "kubectl-$KUBE_VERSION"; then exit 0; fi
with_lock kube kube_build kubectl "~1 min after kube-scheduler on 2 cores"
