// Package plugin is keyward-kms's KMS v2 plugin: Service (the KMS v2 operations over a kms.KeyWrapper,
// with cached and bounded health, liveness, audit — of operations and of refused key objects — and
// metrics) and GRPCServer, the thin adapter that serves it as the Kubernetes KMS v2 gRPC API, errors
// mapped to codes by internal/grpcserver. It is the only home of gRPC, Prometheus and k8s.io/kms in
// the KMS tree.
//
// It may import the standard library, package kms, internal/audit, internal/fault, internal/grpcserver,
// zap, gRPC, Prometheus and k8s.io/kms.
package plugin
