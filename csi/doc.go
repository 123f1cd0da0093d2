// Package csi is the CSI Identity and Node server of keyward-broker (and its Secrets Store CSI Driver
// provider API): it checks a request (read-only volume, kubelet's target path of the claimed pod,
// strict attributes, templates checked before anything is fetched), bounds the publishes in flight,
// turns the request into a broker.Service call and files in a tmpfs (rendered and converted by
// csi/render) with their ..version, audits refusals through the broker, tells the pod of
// swaps and refusals through Events, maps errors to gRPC codes in one place, and lists its live
// volumes (pod, refs, Vault versions; never a value) for the admin API.
//
// It may import the standard library, package broker, csi/podevents (its types), csi/render, csi/tmpfs,
// internal/audit, internal/fault, internal/grpcserver, gRPC, the CSI spec, the Secrets Store CSI
// Driver provider API, zap, golang.org/x/sync and a YAML decoder.
package csi
