// Package proto holds Keyward's own .proto files and their generated code, and nothing else. The KMS v2
// and CSI protocols come from their upstream modules (k8s.io/kms, the CSI spec) and are not copied here.
//
// It may import the standard library only, until it holds generated code (then the protobuf and
// gRPC runtimes).
package proto
