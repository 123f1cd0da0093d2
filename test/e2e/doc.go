// Package e2e runs Keyward's binaries, built from this tree, against the real components started by
// test/harness: SoftHSM2, etcd and kube-apiserver (and Vault for the broker).
package e2e
