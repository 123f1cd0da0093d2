// Package apiserver serves Keyward's own API (proto/keyward/...) on a daemon's TCP listener: the
// AuditStream service over an audit stream's segment files (internal/audit's Cursor, the writer's
// Durable head), the read-only Admin service over small sources of plain Go values that each daemon
// wires in, and the transport around them: TLS 1.3 with client certificates from one CA, and an
// allow-list of certificate subjects per service (audit readers, admins) checked in one interceptor
// before any handler runs. No RPC changes state; errors become gRPC codes in one place (status.go).
//
// It may import the standard library, internal/audit, internal/fault, internal/grpcserver, the
// generated packages under proto/keyward, zap, gRPC and the protobuf runtime.
package apiserver
