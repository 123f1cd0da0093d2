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
)
