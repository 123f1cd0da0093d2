// Package kms is keyward-kms's core: the KeyWrapper interface over plain Go types and the thin
// adapter that serves it as the Kubernetes KMS v2 gRPC API, mapping errors to codes in one place.
//
// It may import the standard library, internal/..., broker/audit, gRPC and k8s.io/kms. It never
// imports cgo: the HSM lives behind KeyWrapper in kms/pkcs11.
package kms
