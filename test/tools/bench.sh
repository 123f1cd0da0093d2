#!/usr/bin/env bash
# Runs Keyward's Go benchmarks. Each benchmark family measures its own baseline in the same run
# (see the benchmark's doc comment) so ratios, not absolute numbers, are what to compare across machines.
set -euo pipefail
cd "$(dirname "$0")/../.."
go test -run '^$' -bench "${BENCH:-.}" -benchmem -count "${BENCH_COUNT:-1}" ./...
