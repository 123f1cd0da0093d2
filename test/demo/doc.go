// Command demo is `make demo`: the whole Keyward flow on loopback with the real components and a real
// node, step by step, then everything torn down. It exits non-zero if any step fails.
//
// It builds Keyward's images, starts etcd, kube-apiserver and Vault, and a real node (containerd,
// runc, kubelet, kube-controller-manager, kube-scheduler) with the images imported; keyward-kms runs
// as the shipped static pod with its KEK in a SoftHSM2 token, and the apiserver encrypts Secrets
// through it; the broker is deployed from deploy/overlays/dev and serves real pods; what an operator
// would see is shown with kubectl. It needs root (a node).
//
// It may import the harness, test/realnode, the Keyward packages and client-go; it runs the real
// binaries.
package main
