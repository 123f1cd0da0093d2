#!/usr/bin/env bash
# Builds kube-apiserver from the Go module proxy into the keyward binary cache (kube_build in lib.sh:
# a nested wrapper module that repeats k8s.io/kubernetes's staging replaces). Cold: ~9 min (measured 9.0 on 2 cores, 2026-12-01) and ~2.7 GB
# RAM on 2 cores.
source "$(dirname "$0")/lib.sh"
if cached "kube-apiserver-$KUBE_VERSION"; then exit 0; fi
with_lock kube kube_build kube-apiserver "~9 min cold on 2 cores"
