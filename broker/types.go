package broker

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

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
//
// A dynamic ref (Kind pki or database) names a credential Vault issues for the volume instead: Ref is
// then the Vault role (of the environment's PKI or database mount), Key the part of the credential
// the file holds (KindPKI: cert, key, chain; KindDatabase: username, password), Version is 0, and PKI
// says which certificate (KindPKI only). The refs of one volume with the same Kind, Ref and PKI share
// one credential (one lease).
type SecretRef struct {
	Ref     string
	Key     string
	Version int
	Kind    Kind
	PKI     PKIRequest
}

// Kind is where a ref's value comes from.
type Kind string

// The kinds.
const (
	// KindKV: a key of a KV v2 secret (the zero Kind).
	KindKV Kind = ""
	// KindPKI: a certificate the environment's PKI mount issues (or signs) for the volume.
	KindPKI Kind = "pki"
	// KindDatabase: credentials the environment's database mount creates for the volume.
	KindDatabase Kind = "database"
)

// Dynamic reports whether the ref names an issued credential (a lease) rather than a stored value.
func (r SecretRef) Dynamic() bool { return r.Kind != KindKV }

// PKIRequest is the certificate a KindPKI ref asks for. It is comparable: refs asking for the same
// certificate share it.
type PKIRequest struct {
	CommonName string
	// AltNames are the subject alternative names (DNS names or IP addresses), comma-separated, in
	// the order given.
	AltNames string
	// TTL is the certificate's lifetime (0: the role's default).
	TTL time.Duration
	// LocalKey: the private key is generated in the driver's memory and only a CSR goes to Vault
	// (Vault's sign endpoint), so the key never leaves the node; otherwise Vault generates it (issue).
	LocalKey bool
}

// The parts of dynamic credentials a file may hold.
var dynamicKeys = map[Kind][]string{
	KindPKI:      {"cert", "key", "chain"},
	KindDatabase: {"username", "password"},
}

// DynamicKeys lists the parts of a kind's credential a file may hold.
func DynamicKeys(k Kind) []string { return dynamicKeys[k] }

// Limits of dynamic refs.
const (
	MaxRoleLen     = 128
	MaxAltNames    = 32
	MaxNameLen     = 253
	MinCertTTL     = time.Minute
	MaxCertTTL     = 8760 * time.Hour
	maxAltNamesLen = MaxAltNames * (MaxNameLen + 1)
)

var (
	roleRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$`)
	// hostRE is a DNS name (a leading "*." wildcard allowed) or an IP address's characters.
	hostRE = regexp.MustCompile(`^(\*\.)?[A-Za-z0-9]([A-Za-z0-9:.-]*[A-Za-z0-9])?$`)
)

// ValidateRole checks a Vault role name a dynamic ref names (Vault's own rule for role names, bounded).
func ValidateRole(role string) error {
	if !roleRE.MatchString(role) {
		return fmt.Errorf("role %.140q: want 1..%d of [A-Za-z0-9_.-], starting and ending with a letter or digit: %w", role, MaxRoleLen, fault.ErrInvalid)
	}
	return nil
}

// validateDynamic checks a dynamic ref: its kind, role, part and (PKI) certificate request.
func (r SecretRef) validateDynamic() error {
	keys, ok := dynamicKeys[r.Kind]
	if !ok {
		return fmt.Errorf("source %.40q: want pki or database: %w", r.Kind, fault.ErrInvalid)
	}
	if err := ValidateRole(r.Ref); err != nil {
		return err
	}
	if !slices.Contains(keys, r.Key) {
		return fmt.Errorf("key %.140q of a %s credential: want one of %s: %w", r.Key, r.Kind, strings.Join(keys, ", "), fault.ErrInvalid)
	}
	if r.Version != 0 {
		return fmt.Errorf("a %s credential has no version: %w", r.Kind, fault.ErrInvalid)
	}
	if r.Kind != KindPKI {
		if r.PKI != (PKIRequest{}) {
			return fmt.Errorf("commonName, altNames, ttl and generate are for pki: %w", fault.ErrInvalid)
		}
		return nil
	}
	p := r.PKI
	if len(p.CommonName) > MaxNameLen || !hostRE.MatchString(p.CommonName) {
		return fmt.Errorf("commonName %.140q: want a DNS name of at most %d bytes: %w", p.CommonName, MaxNameLen, fault.ErrInvalid)
	}
	if p.AltNames != "" {
		names := strings.Split(p.AltNames, ",")
		if len(names) > MaxAltNames || len(p.AltNames) > maxAltNamesLen {
			return fmt.Errorf("%d altNames (max %d): %w", len(names), MaxAltNames, fault.ErrInvalid)
		}
		for _, n := range names {
			if len(n) > MaxNameLen || !hostRE.MatchString(n) {
				return fmt.Errorf("altName %.140q: want a DNS name or IP address: %w", n, fault.ErrInvalid)
			}
		}
	}
	if p.TTL != 0 && (p.TTL < MinCertTTL || p.TTL > MaxCertTTL) {
		return fmt.Errorf("ttl %s: want between %s and %s (or none: the role's default): %w", p.TTL, MinCertTTL, MaxCertTTL, fault.ErrInvalid)
	}
	return nil
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
	if r.Dynamic() {
		return r.validateDynamic()
	}
	if r.PKI != (PKIRequest{}) {
		return fmt.Errorf("commonName, altNames, ttl and generate are for pki: %w", fault.ErrInvalid)
	}
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

// String names the ref: "ref#key", "ref#key@version", or for a dynamic ref "kind:role#part"
// (the certificate's request is not part of the name).
func (r SecretRef) String() string {
	if r.Dynamic() {
		return string(r.Kind) + ":" + r.Ref + "#" + r.Key
	}
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
	// Lease, for a dynamic ref, is the hash of the lease the value belongs to (Lease.Hash).
	Lease string
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

// Lease is what may be said of a dynamic credential's lease: in audit records, logs and the volume's
// metadata. Never the lease ID, which only the source's memory holds.
type Lease struct {
	// Name is the credential's name (LeaseName).
	Name string
	// Hash is a prefix of the lease ID's SHA-256, hex ("" when Vault gave the credential no lease).
	Hash string
	// TTL is the lease's duration when it was issued or last renewed; Expires when it ends.
	TTL     time.Duration
	Expires time.Time
	// Serial is a certificate's serial number (KindPKI).
	Serial string
	Action LeaseAction
}

// LeaseAction is what a request did with a lease.
type LeaseAction string

// The actions.
const (
	// LeaseIssued: a new credential (the volume had none).
	LeaseIssued LeaseAction = "issued"
	// LeaseReused: the volume's credential, outside its renewal window.
	LeaseReused LeaseAction = "reused"
	// LeaseRenewed: the volume's credential, renewed inside its renewal window.
	LeaseRenewed LeaseAction = "renewed"
	// LeaseReissued: a new credential replacing the volume's (inside its renewal window, for a
	// certificate or a lease that cannot be renewed, or after a driver restart).
	LeaseReissued LeaseAction = "reissued"
)

// LeaseName names the credential a dynamic ref belongs to: "database:role", or "pki:role/commonName"
// (the parts of one credential share it). A volume's credentials have distinct names: it may not ask
// for two certificates of one role and common name that differ otherwise (csi refuses such a list).
func LeaseName(r SecretRef) string {
	if r.Kind == KindPKI {
		return string(r.Kind) + ":" + r.Ref + "/" + r.PKI.CommonName
	}
	return string(r.Kind) + ":" + r.Ref
}

// LeaseRequest asks for the dynamic credentials of one volume.
type LeaseRequest struct {
	// Volume owns the leases: they live until ReleaseVolume.
	Volume string
	// Refs are the volume's dynamic refs, allowed.
	Refs []Resolved
	// Adopt, after a driver restart, maps each lease name (LeaseName) to the lease hash the volume's
	// metadata recorded, for the source to find those leases again.
	Adopt map[string]string
}

// LeaseSource issues dynamic credentials (certificates, database credentials) for volumes and holds
// their leases for as long as each volume lives: reused while fresh, renewed or reissued inside their
// renewal window, revoked when the volume goes (ReleaseVolume).
//
// Calls for one volume must not run concurrently (the CSI server holds the volume's lock around its
// publish and its unpublish): a release zeroes the values a concurrent Lease of the same volume could
// be copying. Calls for different volumes may.
type LeaseSource interface {
	// Lease returns one Secret per ref (in order) and what it did with each lease.
	Lease(ctx context.Context, id Identity, token Token, req LeaseRequest) ([]Secret, []Lease, error)
	// ReleaseVolume forgets the volume's leases at once and returns the function that revokes them
	// at Vault (nil if it held none).
	ReleaseVolume(volume string) (revoke func(context.Context) error)
}
