// Package auditv1 is the generated Go code of proto/keyward/audit/v1/audit.proto (make proto); the .proto
// file is the reference. Only doc.go is written by hand.
//
// It may import the standard library, the protobuf runtime and gRPC.
package auditv1
