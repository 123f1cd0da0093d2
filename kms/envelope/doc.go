// Package envelope reads the values kube-apiserver stores in etcd through a KMS v2 provider: which
// provider and key ID wrapped an object's DEK (for coverage reports and migrations), without linking
// the apiserver.
//
// It may import the standard library, internal/fault and google.golang.org/protobuf's protowire.
package envelope
