// Package harness starts the real components Keyward talks to — SoftHSM2, etcd, kube-apiserver, a
// Vault dev server, PostgreSQL (from Debian's packages, for Vault's database secrets engine), and a
// real node (containerd, runc, kubelet, kube-controller-manager, kube-scheduler) — on loopback, in
// temporary directories, and hands back ready clients.
//
// It owns: locating the cached component binaries (built by test/tools, keyed by the versions in
// versions.env), process lifecycle (start, readiness by polling, stop), the throwaway PKI the components
// use, the node's cleanup of everything kubelet and containerd leave on the host (Node.Leftovers says
// what is left), and small helpers tests need (namespaces, service accounts, pods, pod-bound tokens,
// KV v2 mounts, Vault's kubernetes auth, Vault's pki and database engines and the dynamic-secrets
// policy of deploy/vault/namespace-dynamic.hcl).
//
// It may import the standard library, client-go, the etcd client, vault/api, pgx (jackc/pgx/v5) and
// miekg/pkcs11. It must not import Keyward's own packages: it is the ground truth the product is
// tested against.
//
// Every Start function takes a context and returns a value with a Stop method; the T-flavoured helpers
// (SoftHSMT, EtcdT, ...) register Stop with t.Cleanup. A missing binary fails the test with the command
// that installs it; set KEYWARD_ALLOW_SKIP=1 to skip instead (ignored when CI=true).
package harness
