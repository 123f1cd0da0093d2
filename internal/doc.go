// Package internal holds Keyward's shared kernel and plumbing, which are not an API: the error
// vocabulary (fault), the one audit stream (audit), configuration loading (config), unix-socket gRPC
// serving with the one error-to-code map (grpcserver), logging, process hardening, the metrics
// listener and the version. It holds no domain logic.
//
// It may import the standard library only; each sub-package's doc.go says what it may import, and
// none imports broker/, csi/ or kms/.
package internal
