// Command keyward-kms is the Kubernetes KMS v2 plugin that kube-apiserver uses as its encryption
// provider: etcd Secrets are envelope-encrypted under a key that never leaves a PKCS#11 HSM.
//
// It only wires packages together (flags, configuration, signals): it may import kms, kms/plugin,
// kms/pkcs11, the internal packages, Prometheus and zap (never broker: the KMS plugin does not link the
// secrets broker).
package main
