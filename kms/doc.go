// Package kms is keyward-kms's core contract: the KeyWrapper interface over plain Go types, the limits
// kube-apiserver puts on KMS v2 values, and the optional interfaces a wrapper may add: PoolReporter
// (metrics), KeyVetter (key objects it refuses, with KeyRefusal, which the plugin audits) and Liveness
// (stuck beyond recovery). Implementations (kms/pkcs11) and the KMS v2 plugin (kms/plugin) depend on
// it, never the other way round.
//
// It may import the standard library only (errors are internal/fault's, named in the docs).
package kms
