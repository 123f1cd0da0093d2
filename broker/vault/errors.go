package vault

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	vaultapi "github.com/hashicorp/vault/api"

	"github.com/keyward/keyward/internal/fault"
)

// loginErr maps a failed kubernetes-auth login. Vault answers 400/403 when the role does not exist or
// does not match, but also when its own TokenReview fails (an expired reviewer JWT, an apiserver it
// cannot reach): a refused login is ambiguous, so it is ErrUnavailable (retried, files kept), never
// a denial that would clear a running pod's files.
func loginErr(role string, err error) error {
	var re *vaultapi.ResponseError
	if errors.As(err, &re) && re.StatusCode >= 400 && re.StatusCode < 500 {
		return fmt.Errorf("vault login with role %s refused (%d %s; check the role and the auth method's token reviewer): %w",
			role, re.StatusCode, strings.Join(re.Errors, "; "), fault.ErrUnavailable)
	}
	return mapErr("login with role "+role, err)
}

// mapErr maps a vault/api error onto the broker's sentinels, in this one place. The message keeps
// Vault's error strings but never a request body (the JWT) or a token.
func mapErr(op string, err error) error {
	var re *vaultapi.ResponseError
	if errors.As(err, &re) {
		msg := strings.Join(re.Errors, "; ")
		switch {
		case re.StatusCode == http.StatusForbidden, re.StatusCode == http.StatusUnauthorized:
			return fmt.Errorf("vault %s: %d %s: %w", op, re.StatusCode, msg, fault.ErrDenied)
		case re.StatusCode == http.StatusNotFound:
			return fmt.Errorf("vault %s: not found: %w", op, fault.ErrNotFound)
		default:
			return fmt.Errorf("vault %s: %d %s: %w", op, re.StatusCode, msg, fault.ErrUnavailable)
		}
	}
	// A transport error's message holds the request's URL, and a lease's revocation or renewal names
	// the lease ID in its path: keep only what went wrong (the cause stays wrapped for errors.Is).
	var ue *url.Error
	if errors.As(err, &ue) {
		err = urlCause{op: ue.Op, err: ue.Err}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("vault %s: %w", op, err)
	}
	return fmt.Errorf("vault %s: %v: %w", op, err, fault.ErrUnavailable)
}

// urlCause is a *url.Error without its URL.
type urlCause struct {
	op  string
	err error
}

func (u urlCause) Error() string { return u.op + ": " + u.err.Error() }
func (u urlCause) Unwrap() error { return u.err }
