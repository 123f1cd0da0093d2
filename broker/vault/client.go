package vault

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/keyward/keyward/broker"
)

// Mode is how the source authenticates to Vault.
type Mode string

const (
	// ModePod logs in with Vault's kubernetes auth method with the pod's own token, so Vault's policies
	// are a second check and Vault's audit log names the pod's service account. The token is shared by
	// the service account's pods on the node (see tokens.go). The default.
	ModePod Mode = "pod"
	// ModeBroker uses the broker's own Vault token (from a file) for every pod; the broker's policy
	// scoping is then the only check.
	ModeBroker Mode = "broker"
)

// ClientOptions build a vault/api client.
type ClientOptions struct {
	Address string
	// CACertFile verifies Vault's TLS certificate.
	CACertFile string
	// AllowHTTP permits an http:// address (development only).
	AllowHTTP bool
	// Timeout per HTTP request (default 10s). Retries: up to 2 on connection errors and 5xx.
	Timeout time.Duration
}

// NewClient returns a vault/api client with no token set.
func NewClient(o ClientOptions) (*vaultapi.Client, error) {
	switch {
	case strings.HasPrefix(o.Address, "https://"):
	case strings.HasPrefix(o.Address, "http://"):
		if !o.AllowHTTP {
			return nil, fmt.Errorf("vault address %s is plain HTTP: use https with a CA file (plain HTTP only with the explicit development flag)", o.Address)
		}
	default:
		return nil, fmt.Errorf("vault address %q: want https://host:port", o.Address)
	}
	cfg := vaultapi.DefaultConfig()
	if cfg.Error != nil {
		return nil, cfg.Error
	}
	cfg.Address = o.Address
	cfg.MaxRetries = 2
	cfg.MinRetryWait = 50 * time.Millisecond
	cfg.MaxRetryWait = 400 * time.Millisecond
	cfg.Timeout = o.Timeout
	if cfg.Timeout == 0 {
		cfg.Timeout = 10 * time.Second
	}
	if o.CACertFile != "" {
		if err := cfg.ConfigureTLS(&vaultapi.TLSConfig{CACert: o.CACertFile}); err != nil {
			return nil, err
		}
	}
	// The broker talks to one Vault address with many concurrent reads; vault/api's pool keeps only
	// GOMAXPROCS+1 idle connections per host, so over HTTP/1.1 a burst of publishes would open and
	// close connections on every read.
	if t, ok := cfg.HttpClient.Transport.(*http.Transport); ok {
		t.MaxIdleConnsPerHost = 64
	}
	c, err := vaultapi.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	c.ClearToken()
	c.SetCloneToken(false)
	return c, nil
}

// Options configure New.
type Options struct {
	Client *vaultapi.Client
	Mode   Mode
	// AuthMount is the kubernetes auth method's mount (default "kubernetes"), for ModePod.
	AuthMount string
	// BrokerToken is the broker's own Vault token, for ModeBroker.
	BrokerToken broker.Token
	Log         *zap.Logger
	Now         func() time.Time
	// Observe, if set, is told of each request to Vault when it ends: op is "login", "read", "renew"
	// or "revoke"; err is nil or wraps a fault class. For metrics; it must not block.
	Observe func(op string, took time.Duration, err error)
	// MaxTokens bounds the Vault tokens cached at once (one per namespace, service account, role and
	// environment with a pod on the node; default 1024). A login for one more fails, unavailable.
	MaxTokens int
	// RenewWindow is the part of a lease's TTL, at its end, in which a republish renews or reissues
	// it (default DefaultRenewWindow, the last third).
	RenewWindow float64
	// Budget, if set, is asked before a request issues the n credentials the pod causes (first issues
	// and reissues in the renewal window; not reuses, renewals or the reissues the driver causes), all
	// or none: an error (wrapping fault.ErrTooLarge: over budget) refuses them (policy.Authorizer.TakeIssues).
	Budget func(id broker.Identity, n int, now time.Time) error
	// MaxLeases bounds the leases held at once (default DefaultMaxLeases).
	MaxLeases int
}

// Source is broker.SecretSource over Vault KV v2.
type Source struct {
	o  Options
	mu sync.Mutex
	// tokens are the cached Vault tokens; holders the pods (UIDs) each key is held for, byPod the
	// keys each pod holds: a token is revoked when its last holder is released.
	tokens  map[tokenKey]*vaultToken
	holders map[tokenKey]map[string]struct{}
	byPod   map[string]map[tokenKey]struct{}
	flight  singleflight.Group

	// lmu guards the volumes' dynamic credentials (leases.go).
	lmu        sync.Mutex
	volumes    map[string]*volumeLeases
	leaseCount int
}

// tokenKey names a cached Vault token: a kubernetes-auth login of a service account with a role, for
// an environment. Every field is from the authenticated identity or the policy's resolution, never
// from the request: a pod can only ever be handed its own service account's token.
type tokenKey struct{ namespace, serviceAccount, role, environment string }

// tokenKeyOf is the key of the token the pod's refs resolved as r are read with.
func tokenKeyOf(id broker.Identity, r broker.Resolved) tokenKey {
	return tokenKey{namespace: id.Namespace, serviceAccount: id.ServiceAccount, role: r.Role, environment: r.Environment}
}

func (k tokenKey) String() string {
	return k.namespace + "\x00" + k.serviceAccount + "\x00" + k.role + "\x00" + k.environment
}

// vaultToken is a cached Vault token. It is never logged: its String says only the hash of its
// accessor.
type vaultToken struct {
	token     string
	accessor  string // sha256 of Vault's accessor, hex, 12 digits: what logs may name
	issued    time.Time
	ttl       time.Duration
	renewable bool
	// loginTTL is the TTL the login gave; a renewal that gives less was capped by the token's max
	// TTL, and the token then ends for good at issued+ttl (capped).
	loginTTL time.Duration
	capped   bool
}

// doomedAt reports when the token ends for good, if it is known to: not renewable, or capped.
func (t *vaultToken) doomedAt() (time.Time, bool) {
	if t.capped || !t.renewable {
		return t.issued.Add(t.ttl), true
	}
	return time.Time{}, false
}

func (t *vaultToken) String() string { return "vault-token(accessor-sha256:" + t.accessor + ")" }

var _ broker.SecretSource = (*Source)(nil)

// New checks the options.
func New(o Options) (*Source, error) {
	if o.Client == nil || o.Log == nil {
		return nil, errors.New("vault: Client and Log are required")
	}
	if o.AuthMount == "" {
		o.AuthMount = "kubernetes"
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	switch o.Mode {
	case ModePod:
	case ModeBroker:
		if o.BrokerToken.Empty() {
			return nil, errors.New("vault: broker mode needs the broker's token")
		}
	default:
		return nil, fmt.Errorf("vault: unknown mode %q (want pod or broker)", o.Mode)
	}
	if o.MaxTokens <= 0 {
		o.MaxTokens = 1024
	}
	if o.RenewWindow <= 0 || o.RenewWindow >= 1 {
		o.RenewWindow = DefaultRenewWindow
	}
	if o.MaxLeases <= 0 {
		o.MaxLeases = DefaultMaxLeases
	}
	return &Source{o: o, tokens: map[tokenKey]*vaultToken{}, holders: map[tokenKey]map[string]struct{}{}, byPod: map[string]map[tokenKey]struct{}{},
		volumes: map[string]*volumeLeases{}}, nil
}

// observe tells Options.Observe of a request to Vault that began at start.
func (s *Source) observe(op string, start time.Time, err error) {
	if s.o.Observe != nil {
		s.o.Observe(op, time.Since(start), err)
	}
}

// Tokens is how many Vault tokens the source holds for pods' service accounts (pod mode; none in
// broker mode).
func (s *Source) Tokens() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.tokens)
}

// client is the shared client with token set on every request by a callback: a shallow copy, not a
// Clone (which builds a whole new client, environment lookups included, per call).
func (s *Source) client(token string) *vaultapi.Client {
	return s.o.Client.WithRequestCallbacks(func(req *vaultapi.Request) { req.ClientToken = token })
}
