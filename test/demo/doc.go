// Command demo is `make demo`: the whole Keyward flow on loopback, with the real components, step by
// step, then everything torn down. It exits non-zero if any step fails.
//
// SoftHSM2 holds the key-encryption key; keyward-kms is kube-apiserver's KMS v2 provider over etcd;
// Vault holds the secrets; keyward-broker (the CSI node driver) delivers them into a tmpfs for a pod,
// called the way kubelet calls it, with a real pod-bound token. It needs root (tmpfs mounts).
//
// It may import the harness, the Keyward packages and client-go; it runs the real binaries.
package main
