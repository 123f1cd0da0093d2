// Package proto holds Keyward's own API: the .proto files under keyward/ (the reference) and their
// generated Go code, in keyward/audit/v1 (AuditStream) and keyward/admin/v1 (Admin), made by
// `make proto` (test/tools/protogen.sh: Debian's protoc and the protoc-gen-go plugins at the versions pinned in
// test/harness/versions.env). TestGeneratedCodeIsCurrent fails when the checked-in code is stale. The
// KMS v2 and CSI protocols come from their upstream modules (k8s.io/kms, the CSI spec) and are not
// copied here.
//
// It may import the standard library only (the generated packages below it: the protobuf runtime
// and gRPC).
package proto
