// Package internal holds plumbing shared by Keyward's binaries (logging, unix-socket gRPC serving,
// interceptors). It holds no domain logic. Its sub-packages may import the standard library, zap
// and gRPC; they never import broker/, csi/ or kms/.
package internal
