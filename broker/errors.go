package broker

import "errors"

// Sentinel errors. Backends wrap them (fmt.Errorf("vault read %s: %w", ref, ErrUnavailable)) and each
// protocol adapter maps them to its status codes in one place with errors.Is.
var (
	// ErrUnauthenticated: the caller's identity could not be established.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrDenied: the caller is known but may not have what it asked for.
	ErrDenied = errors.New("permission denied")
	// ErrNotFound: the thing asked for does not exist.
	ErrNotFound = errors.New("not found")
	// ErrInvalid: the request is malformed.
	ErrInvalid = errors.New("invalid request")
	// ErrUnavailable: a backend (Vault, the apiserver, the HSM, the audit log) cannot answer now; retry.
	ErrUnavailable = errors.New("unavailable")
	// ErrTooLarge: the request or its answer exceeds a bound (a secret larger than the volume, too
	// many requests at once).
	ErrTooLarge = errors.New("resource exhausted")
	// ErrWithdrawn marks a refusal that certainly withdraws access the pod had: the broker's own policy
	// denies it, or the pod is confirmed gone (deleted, or replaced by another pod of the same name).
	// Only such refusals clear a pod's delivered files; every other error (a backend down, a token the
	// apiserver rejects for a pod that still exists, Vault refusing a login) keeps them. It is never
	// returned alone: it is joined to the error that says why.
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
