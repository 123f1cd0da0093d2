// Package csi is the CSI Identity and Node server of keyward-broker: it turns a NodePublishVolume
// request into a broker.Service call and files in a tmpfs, and maps errors to gRPC codes in one place.
//
// It may import the standard library, package broker, csi/tmpfs, internal/..., gRPC and the CSI spec.
package csi
