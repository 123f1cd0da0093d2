package fault

import (
	"context"
	"errors"
	"strings"
)

// Sentinel errors. Backends wrap them (fmt.Errorf("vault read %s: %w", ref, fault.ErrUnavailable))
// and adapters map them to codes in one place with errors.Is (ClassOf).
var (
	// ErrUnauthenticated: the caller's identity could not be established.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrDenied: the caller is known but may not have what it asked for.
	ErrDenied = errors.New("permission denied")
	// ErrNotFound: the thing asked for does not exist.
	ErrNotFound = errors.New("not found")
	// ErrInvalid: the request is malformed (or a ciphertext does not authenticate).
	ErrInvalid = errors.New("invalid request")
	// ErrUnavailable: a backend (Vault, the apiserver, the HSM, the audit log) cannot answer now; retry.
	ErrUnavailable = errors.New("unavailable")
	// ErrTooLarge: the request or its answer exceeds a bound (a secret larger than the volume, too
	// many requests at once).
	ErrTooLarge = errors.New("resource exhausted")
	// ErrWithdrawn marks a refusal that certainly withdraws access a pod had: the broker's own policy
	// denies it, or the pod is confirmed gone. Only such refusals clear a pod's delivered files. It is
	// never returned alone: Withdrawn joins it to the error that says why.
	ErrWithdrawn = errors.New("access withdrawn")
)

// withdrawn is an error marked ErrWithdrawn; its message is the underlying error's.
type withdrawn struct{ err error }

func (w withdrawn) Error() string   { return w.err.Error() }
func (w withdrawn) Unwrap() []error { return []error{w.err, ErrWithdrawn} }

// Withdrawn marks err as a certain withdrawal of access (see ErrWithdrawn).
func Withdrawn(err error) error {
	if err == nil {
		return nil
	}
	return withdrawn{err}
}

// Class is the kind of an error, as callers and audit records see it.
type Class int

// The classes. Their names (String) are the gRPC code names the adapters answer with, which audit
// records carry as their "code".
const (
	OK Class = iota
	Unauthenticated
	Denied
	Invalid
	NotFound
	TooLarge
	Unavailable
	DeadlineExceeded
	Canceled
	Internal
)

var names = [...]string{OK: "OK", Unauthenticated: "Unauthenticated", Denied: "PermissionDenied", Invalid: "InvalidArgument",
	NotFound: "NotFound", TooLarge: "ResourceExhausted", Unavailable: "Unavailable", DeadlineExceeded: "DeadlineExceeded",
	Canceled: "Canceled", Internal: "Internal"}

func (c Class) String() string {
	if c < 0 || int(c) >= len(names) {
		return names[Internal]
	}
	return names[c]
}

// classes are the sentinels in the order ClassOf tries them.
var classes = []struct {
	err   error
	class Class
}{
	{ErrUnauthenticated, Unauthenticated}, {ErrDenied, Denied}, {ErrInvalid, Invalid}, {ErrNotFound, NotFound},
	{ErrTooLarge, TooLarge}, {ErrUnavailable, Unavailable}, {context.DeadlineExceeded, DeadlineExceeded}, {context.Canceled, Canceled},
}

// ClassOf is the class of err: the first sentinel it wraps, in this order; nil is OK; anything else
// is Internal.
func ClassOf(err error) Class {
	if err == nil {
		return OK
	}
	for _, c := range classes {
		if errors.Is(err, c.err) {
			return c.class
		}
	}
	return Internal
}

// Refusal reports whether an error refuses the request as such (who asks, what is asked for, how
// much), as opposed to failing to serve it.
func (c Class) Refusal() bool {
	return c == Unauthenticated || c == Denied || c == Invalid || c == TooLarge
}

// Truncate bounds s to about n bytes (cut on a character boundary), marking a cut with "...": for
// error texts, reasons and key IDs quoted where space is bounded.
func Truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "..."
}
