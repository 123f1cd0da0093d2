// Package kmstest holds the contract test suite every kms.KeyWrapper must pass, and Memory, an
// in-memory KeyWrapper (Go's AES-GCM) used to force faults a real HSM cannot produce on demand and as
// the no-HSM reference in benchmarks. Memory is never used in production wiring.
//
// It may import the standard library, package kms and internal/fault.
package kmstest
