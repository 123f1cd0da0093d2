// Package grpcserver serves gRPC on a unix socket the way Keyward's binaries need it: socket hygiene
// (refuse a socket another process serves, remove a stale one only when nothing answers, mode 0600),
// one log line per RPC from an interceptor that never logs request or response payloads, and a
// graceful stop that lets in-flight calls finish and removes the socket.
//
// It may import the standard library, internal/fault, zap and gRPC.
package grpcserver
