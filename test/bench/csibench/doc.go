// Command csibench measures NodePublishVolume of keyward-broker (the real binary, on its unix socket,
// against real kube-apiserver and Vault) for a 5-secret volume at concurrency 1, 8 and 32:
//
//	warm   a pod publishing its volume again (kubelet's republish): cached review and Vault token
//	cold   new pods, each publishing for the first time: TokenReview, Vault login, reads, tmpfs mount
//	floor  the unavoidable work: 5 KV v2 reads with an already-held Vault token
//	naive  TokenReview + Vault kubernetes login + 5 reads + plain file writes, per mount
//
// Contenders alternate round by round. For each it prints publishes/s, p50/p99 and the CPU per publish
// of every process (driver, Vault, kube-apiserver, etcd, the benchmark itself), then the ratios against
// the targets. It then publishes 1000 volumes and reports the driver's RSS.
//
// It may import the harness, the Keyward packages it measures and their clients; it is not shipped.
package main
