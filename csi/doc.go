// Package csi is the CSI Identity and Node server of keyward-broker (and its Secrets Store CSI Driver
// provider API): it checks a request (read-only volume, kubelet's target path of the claimed pod,
// strict attributes), bounds the publishes in flight, turns the request into a broker.Service call
// and files in a tmpfs, audits refusals through the broker, and maps errors to gRPC codes in one place.
//
// It may import the standard library, package broker (and broker/policy for ref checks), csi/tmpfs,
// internal/..., gRPC, golang.org/x/sync and the CSI spec.
package csi
