// Package fault is Keyward's one error vocabulary: the sentinel errors every backend wraps, the
// ErrWithdrawn mark, and Class, the kind of an error that protocol adapters turn into their status
// codes (internal/grpcserver.Status) and audit records write as their code.
//
// It may import the standard library only.
package fault
