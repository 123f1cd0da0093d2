#!/usr/bin/env bash
# `make bench`: Keyward's benchmarks. Every comparison is measured in this same run against its own
# baseline, so read the ratios, not the absolute numbers (the machine is 2 cores and noisy).
#   1. Go micro-benchmarks: PKCS#11 wrap+unwrap with session-object key copies vs token objects,
#      and the cost of one audit record.
#   2. kmsbench: raw PKCS#11 vs a no-op KMS plugin vs keyward-kms vs the ceiling (no-op + the raw HSM's
#      CPU per call), alternating, at concurrency 1/8/32, with CPU per pair.
#   3. brokerbench: the broker core against the direct TokenReview + login + reads.
#   4. csibench: CSI publishes warm/cold vs the floor and the naive path, CPU per publish of every
#      process, and the driver's RSS with 1000 volumes.
#   5. leasebench: dynamic credentials issued per 1000 republishes of the same pods' volumes, Keyward
#      (leases held per volume) vs a naive issue-per-publish contender, with real Vault and PostgreSQL.
#   6. nodebench (optional: root and the node runtime, else it says why it skips): 200 pods with a
#      secrets volume on a real node, the broker deployed from deploy/overlays/dev, vs the same pods
#      with an emptyDir (the floor), alternating. It waits for the machine's node lock; NODEBENCH=0
#      leaves it out.
set -euo pipefail
cd "$(dirname "$0")/../.."
echo "== Go benchmarks"
go test -run '^$' -bench "${BENCH:-.}" -benchmem -count "${BENCH_COUNT:-1}" ./broker/... ./kms/... ./internal/... ./csi/...
echo
echo "== KMS v2 plugin: keyward-kms vs raw PKCS#11 vs a no-op plugin vs the ceiling (one SoftHSM token, one run)"
go run ./test/bench/kmsbench ${KMSBENCH_ARGS:-}
echo
echo "== Broker: Service (cold and warm caches) vs the direct TokenReview + Vault login + 5 KV reads"
go run ./test/bench/brokerbench ${BROKERBENCH_ARGS:-}
echo
echo "== CSI publish: keyward-broker warm/cold vs the floor (5 reads) and the naive path, and RSS at 1000 volumes"
go run ./test/bench/csibench ${CSIBENCH_ARGS:-}
echo
echo "== Dynamic credentials: leases issued per 1000 republishes, keyward vs issue-per-publish"
go run ./test/bench/leasebench ${LEASEBENCH_ARGS:-}
if [ "${NODEBENCH:-1}" != 0 ]; then
  echo
  echo "== Real node: 200 pods with a secrets volume vs the same pods with an emptyDir (the floor)"
  go run ./test/bench/nodebench ${NODEBENCH_ARGS:-}
fi
