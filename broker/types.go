package broker

import (
	"context"
	"fmt"
	"regexp"
	"strings"

	"github.com/keyward/keyward/internal/fault"
)

// Identity is who a request comes from: a pod, proven by its service-account token.
type Identity struct {
	Namespace      string
	ServiceAccount string
	PodName        string
	PodUID         string
	Node           string
}

func (id Identity) String() string {
	return fmt.Sprintf("%s/%s (sa %s)", id.Namespace, id.PodName, id.ServiceAccount)
}

// Token is a bearer token. Every way of printing or marshalling it yields "[redacted]"; Reveal is
// the one way to the value, for the single call that must send it.
type Token string

const redacted = "[redacted]"

func (Token) String() string               { return redacted }
func (Token) GoString() string             { return redacted }
func (Token) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
func (Token) MarshalText() ([]byte, error) { return []byte(redacted), nil }
func (t Token) Format(f fmt.State, _ rune) { f.Write([]byte(redacted)) }
func (t Token) Reveal() string             { return string(t) }
func (t Token) Empty() bool                { return t == "" }

// SecretRef names a value a pod asks for: Ref is a path relative to the pod's environment
// ("payments/db"), Key a key inside that KV v2 secret, Version a KV v2 version (0: the latest).
type SecretRef struct {
	Ref     string
	Key     string
	Version int
}

// Limits on refs and keys.
const (
	MaxRefLen   = 256
	MaxSegments = 16
	MaxKeyLen   = 128
)

var (
	segmentRE = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
	keyRE     = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,128}$`)
)

// Validate checks a ref before anything matches or reads it: the ref (ValidateRef), the key
// (ValidateKey) and the version (not negative). Errors wrap fault.ErrInvalid.
func (r SecretRef) Validate() error {
	if err := ValidateRef(r.Ref); err != nil {
		return err
	}
	if err := ValidateKey(r.Key); err != nil {
		return err
	}
	if r.Version < 0 {
		return fmt.Errorf("version %d: %w", r.Version, fault.ErrInvalid)
	}
	return nil
}

// ValidateRef checks a ref (or a path a policy names): relative, no empty, "." or ".." segments, a
// restricted character set and bounded length.
func ValidateRef(ref string) error {
	if ref == "" || len(ref) > MaxRefLen {
		return fmt.Errorf("ref of %d bytes (want 1..%d): %w", len(ref), MaxRefLen, fault.ErrInvalid)
	}
	if strings.HasPrefix(ref, "/") {
		return fmt.Errorf("ref %q is absolute: %w", ref, fault.ErrInvalid)
	}
	segs := strings.Split(ref, "/")
	if len(segs) > MaxSegments {
		return fmt.Errorf("ref has %d segments (max %d): %w", len(segs), MaxSegments, fault.ErrInvalid)
	}
	for _, s := range segs {
		switch {
		case s == "":
			return fmt.Errorf("ref %q has an empty segment: %w", ref, fault.ErrInvalid)
		case s == "." || s == "..":
			return fmt.Errorf("ref %q has a %q segment: %w", ref, s, fault.ErrInvalid)
		case !segmentRE.MatchString(s):
			return fmt.Errorf("ref %q has characters outside [A-Za-z0-9_.-]: %w", ref, fault.ErrInvalid)
		}
	}
	return nil
}

// ValidateKey checks a key inside a secret.
func ValidateKey(key string) error {
	if !keyRE.MatchString(key) {
		return fmt.Errorf("key %q: want 1..%d of [A-Za-z0-9_.-]: %w", key, MaxKeyLen, fault.ErrInvalid)
	}
	return nil
}

func (r SecretRef) String() string {
	s := r.Ref + "#" + r.Key
	if r.Version > 0 {
		s += fmt.Sprintf("@%d", r.Version)
	}
	return s
}

// Resolved is a SecretRef the Authorizer allowed, placed in its environment's part of Vault.
type Resolved struct {
	SecretRef
	Environment string
	// Mount is the KV v2 mount, Path the secret's path under it (environment prefix + Ref).
	Mount string
	Path  string
	// Role is the Vault role pods of the environment log in with (pod mode), as the policy that
	// allowed the ref says: the source never reads the policy again.
	Role string
	// Reason says why it was allowed (which grant).
	Reason string
}

// Secret is a fetched value. Value is secret: it is never logged, printed or written outside the
// tmpfs it is delivered to.
type Secret struct {
	Ref     SecretRef
	Version int
	Value   []byte
	// Environment is the environment the value was read from: the pod's namespace's when it was
	// allowed (Resolved.Environment).
	Environment string
}

func (s Secret) String() string {
	return fmt.Sprintf("Secret(%s, version %d, %s)", s.Ref, s.Version, redacted)
}
func (s Secret) GoString() string { return s.String() }

// Format keeps %v, %+v and %#v of a Secret from printing its value.
func (s Secret) Format(f fmt.State, _ rune) { f.Write([]byte(s.String())) }

// Authenticator establishes the identity behind a token for the given audiences.
type Authenticator interface {
	Authenticate(ctx context.Context, token Token, audiences []string) (Identity, error)
}

// Authorizer decides whether id may read ref and where ref lives. Deny by default: an error wrapping
// fault.ErrDenied (with the reason). Refs reach it validated (SecretRef.Validate, in Service): an
// Authorizer matches, it does not parse.
type Authorizer interface {
	Authorize(ctx context.Context, id Identity, ref SecretRef) (Resolved, error)
}

// SecretSource fetches allowed secrets. token is the pod's own token, for sources that act as the pod.
// maxBytes bounds the values returned, together: a source refuses (fault.ErrTooLarge) before it holds much
// more than that, so a tenant who can write a huge value into its own Vault path cannot exhaust the
// broker's memory.
type SecretSource interface {
	Fetch(ctx context.Context, id Identity, token Token, refs []Resolved, maxBytes int64) ([]Secret, error)
}

// PodChecker confirms that a pod is gone. Gone is true only when the apiserver says the pod does not
// exist, or that the pod of that name has another UID; any doubt (an error) is not gone.
type PodChecker interface {
	Gone(ctx context.Context, namespace, name, uid string) (bool, error)
}

// PodReleaser is implemented by sources that hold credentials on behalf of a pod (a Vault token from
// the pod's login). Release forgets them at once, so no later request uses them, and returns the
// function that revokes them at their issuer (nil if it held none), so they do not outlive the pod's
// volumes.
type PodReleaser interface {
	Release(podUID string) (revoke func(context.Context) error)
}
