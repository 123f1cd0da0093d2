// Command kmsbench compares, in one run on one SoftHSM token, three contenders at concurrency 1, 8
// and 32, alternating them round by round so machine drift hits all alike:
//
//	raw     in-process PKCS#11 AES-GCM encrypt+decrypt of a 32-byte payload (no gRPC, no audit)
//	no-op   a reference KMS v2 plugin on the same gRPC server stack, in-memory AES, no HSM: the
//	        transport ceiling of this machine
//	keyward keyward-kms's full stack: gRPC adapter, Service (audit record per op, metrics), PKCS#11
//	        session pool on SoftHSM
//
//	ceiling the no-op plugin burning, per operation, the CPU one raw HSM operation costs (measured
//	        at the start of the run): an upper bound for any plugin making one HSM call per
//	        operation, since the HSM's CPU comes out of the same two cores as the transport's
//
// For each it prints encrypt+decrypt pairs/s, p50/p99 per operation, and the process's CPU per pair,
// cores busy and allocations per pair (load generator included), then keyward/no-op, ceiling/no-op
// and keyward/raw ratios against the targets (>= 0.8 of no-op pairs/s at 8 and 32, p99 <= 1.5x).
//
// It may import the harness, the Keyward packages it measures and their clients; it is not shipped.
package main
