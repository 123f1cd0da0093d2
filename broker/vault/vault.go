package vault

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"

	"github.com/keyward/keyward/broker"
)

// Mode is how the source authenticates to Vault.
type Mode string

const (
	// ModePod logs in with Vault's kubernetes auth method as the pod, with the pod's own token, so
	// Vault's policies are a second check and Vault's audit log names the pod. The default.
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
	// Role returns the kubernetes auth role of an environment, for ModePod.
	Role func(environment string) (string, bool)
	// BrokerToken is the broker's own Vault token, for ModeBroker.
	BrokerToken broker.Token
	Log         *zap.Logger
	Now         func() time.Time
}

// Source is broker.SecretSource over Vault KV v2.
type Source struct {
	o      Options
	mu     sync.Mutex
	tokens map[string]*vaultToken // by pod UID + role
	flight singleflight.Group
}

type vaultToken struct {
	token     string
	issued    time.Time
	ttl       time.Duration
	renewable bool
}

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
		if o.Role == nil {
			return nil, errors.New("vault: pod mode needs a role per environment")
		}
	case ModeBroker:
		if o.BrokerToken.Empty() {
			return nil, errors.New("vault: broker mode needs the broker's token")
		}
	default:
		return nil, fmt.Errorf("vault: unknown mode %q (want pod or broker)", o.Mode)
	}
	return &Source{o: o, tokens: map[string]*vaultToken{}}, nil
}

// Fetch reads each ref's key from KV v2, up to 8 reads at a time. All refs are in one environment
// (the pod's), so one Vault token serves them all.
func (s *Source) Fetch(ctx context.Context, id broker.Identity, jwt broker.Token, refs []broker.Resolved) ([]broker.Secret, error) {
	out, err := s.fetchAll(ctx, id, jwt, refs)
	if err != nil && errors.Is(err, broker.ErrDenied) && s.o.Mode == ModePod {
		// The cached Vault token may have been revoked (or Vault restarted): log in once more.
		for _, r := range refs {
			s.forget(id, r.Environment)
		}
		out, err = s.fetchAll(ctx, id, jwt, refs)
	}
	return out, err
}

func (s *Source) fetchAll(ctx context.Context, id broker.Identity, jwt broker.Token, refs []broker.Resolved) ([]broker.Secret, error) {
	out := make([]broker.Secret, len(refs))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	var err error
	for i, r := range refs {
		var tok string
		if tok, err = s.token(ctx, id, jwt, r.Environment); err != nil {
			break // reads already started are still waited for below: none outlives the request
		}
		g.Go(func() error {
			sec, err := s.read(gctx, tok, r)
			out[i] = sec
			return err
		})
	}
	if werr := g.Wait(); err == nil {
		err = werr
	}
	if err != nil {
		for i := range out {
			clear(out[i].Value)
		}
		return nil, err
	}
	return out, nil
}

// client is the shared client with token set on every request by a callback: a shallow copy, not a
// Clone (which builds a whole new client, environment lookups included, per call).
func (s *Source) client(token string) *vaultapi.Client {
	return s.o.Client.WithRequestCallbacks(func(req *vaultapi.Request) { req.ClientToken = token })
}

// kvResponse is the body of a KV v2 read, decoded once, straight from the response.
type kvResponse struct {
	Data *struct {
		Data     map[string]any `json:"data"`
		Metadata struct {
			Version int `json:"version"`
		} `json:"metadata"`
	} `json:"data"`
}

func (s *Source) read(ctx context.Context, token string, r broker.Resolved) (broker.Secret, error) {
	path := r.Mount + "/data/" + r.Path
	sum := sha256.Sum256([]byte(token))
	key := hex.EncodeToString(sum[:8]) + "|" + path + "|" + strconv.Itoa(r.Version)
	v, err, _ := s.flight.Do(key, func() (any, error) {
		var q map[string][]string
		if r.Version > 0 {
			q = map[string][]string{"version": {strconv.Itoa(r.Version)}}
		}
		// The client's configured timeout applies (RawRequestWithContext sets it).
		resp, err := s.client(token).Logical().ReadRawWithDataWithContext(ctx, path, q)
		if resp != nil {
			defer resp.Body.Close()
		}
		if err != nil {
			return nil, mapErr("read "+r.Ref, err)
		}
		var kv kvResponse
		dec := json.NewDecoder(resp.Body)
		dec.UseNumber() // numbers pass through exactly
		if err := dec.Decode(&kv); err != nil {
			return nil, fmt.Errorf("secret %s: undecodable answer from Vault: %w", r.Ref, broker.ErrUnavailable)
		}
		if kv.Data == nil || kv.Data.Data == nil {
			return nil, fmt.Errorf("secret %s was deleted or is not KV v2: %w", r.Ref, broker.ErrNotFound)
		}
		return &kv, nil
	})
	if err != nil {
		return broker.Secret{}, err
	}
	kv := v.(*kvResponse).Data
	val, ok := kv.Data[r.Key]
	if !ok {
		return broker.Secret{}, fmt.Errorf("secret %s has no key %q: %w", r.Ref, r.Key, broker.ErrNotFound)
	}
	var b []byte
	switch x := val.(type) {
	case string:
		b = []byte(x)
	default:
		if b, err = json.Marshal(x); err != nil {
			return broker.Secret{}, fmt.Errorf("secret %s key %q: not encodable: %w", r.Ref, r.Key, broker.ErrInvalid)
		}
	}
	return broker.Secret{Ref: r.SecretRef, Version: kv.Metadata.Version, Value: b}, nil
}

// token returns a Vault token for the pod in env: cached, renewed in the last third of its TTL, or a
// fresh login. Concurrent logins for one pod collapse into one.
func (s *Source) token(ctx context.Context, id broker.Identity, jwt broker.Token, env string) (string, error) {
	if s.o.Mode == ModeBroker {
		return s.o.BrokerToken.Reveal(), nil
	}
	role, ok := s.o.Role(env)
	if !ok || role == "" {
		return "", fmt.Errorf("environment %s has no Vault role: %w", env, broker.ErrDenied)
	}
	key := id.PodUID + "|" + role
	now := s.o.Now()
	s.mu.Lock()
	t := s.tokens[key]
	s.mu.Unlock()
	if t != nil {
		age := now.Sub(t.issued)
		switch {
		case age < t.ttl*2/3:
			return t.token, nil
		case age < t.ttl && t.renewable:
			if nt, err := s.renew(ctx, key, t); err == nil {
				return nt.token, nil
			}
		}
	}
	v, err, _ := s.flight.Do("login|"+key, func() (any, error) {
		return s.login(ctx, key, role, jwt)
	})
	if err != nil {
		return "", err
	}
	return v.(*vaultToken).token, nil
}

func (s *Source) login(ctx context.Context, key, role string, jwt broker.Token) (*vaultToken, error) {
	c := s.client("")
	sec, err := c.Logical().WriteWithContext(ctx, "auth/"+s.o.AuthMount+"/login", map[string]any{"role": role, "jwt": jwt.Reveal()})
	if err != nil {
		return nil, mapErr("login with role "+role, err)
	}
	if sec == nil || sec.Auth == nil || sec.Auth.ClientToken == "" {
		return nil, fmt.Errorf("login with role %s: no token in the answer: %w", role, broker.ErrUnavailable)
	}
	t := &vaultToken{token: sec.Auth.ClientToken, issued: s.o.Now(), ttl: time.Duration(sec.Auth.LeaseDuration) * time.Second, renewable: sec.Auth.Renewable}
	if t.ttl <= 0 {
		t.ttl = time.Minute
	}
	s.mu.Lock()
	s.tokens[key] = t
	s.mu.Unlock()
	return t, nil
}

func (s *Source) renew(ctx context.Context, key string, t *vaultToken) (*vaultToken, error) {
	v, err, _ := s.flight.Do("renew|"+key, func() (any, error) {
		sec, err := s.client(t.token).Auth().Token().RenewSelfWithContext(ctx, 0)
		if err != nil {
			return nil, mapErr("renew", err)
		}
		if sec == nil || sec.Auth == nil {
			return nil, fmt.Errorf("renew: empty answer: %w", broker.ErrUnavailable)
		}
		nt := &vaultToken{token: t.token, issued: s.o.Now(), ttl: time.Duration(sec.Auth.LeaseDuration) * time.Second, renewable: sec.Auth.Renewable}
		s.mu.Lock()
		if cur := s.tokens[key]; cur != nil && cur.token == t.token { // a released token stays released
			s.tokens[key] = nt
		}
		s.mu.Unlock()
		return nt, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*vaultToken), nil
}

var _ broker.PodReleaser = (*Source)(nil)

// Release forgets the Vault tokens the pod's logins returned and returns the function that revokes
// them (revoke-self, with each token); nil if it held none.
func (s *Source) Release(podUID string) func(context.Context) error {
	toks := s.detach(func(uid string) bool { return uid == podUID })
	if len(toks) == 0 {
		return nil
	}
	return func(ctx context.Context) error {
		_, err := s.revoke(ctx, toks)
		return err
	}
}

// ReleaseAll revokes every pod's cached Vault token, for a clean shutdown. It returns how many were
// revoked.
func (s *Source) ReleaseAll(ctx context.Context) (int, error) {
	return s.revoke(ctx, s.detach(func(string) bool { return true }))
}

// detach removes the matching pods' tokens from the cache and returns them.
func (s *Source) detach(match func(podUID string) bool) []string {
	if s.o.Mode != ModePod {
		return nil
	}
	var toks []string
	s.mu.Lock()
	for k, t := range s.tokens {
		if uid, _, _ := strings.Cut(k, "|"); match(uid) {
			toks = append(toks, t.token)
			delete(s.tokens, k)
		}
	}
	s.mu.Unlock()
	return toks
}

// revoke revokes tokens at Vault. A token Vault no longer accepts is not an error.
func (s *Source) revoke(ctx context.Context, toks []string) (int, error) {
	n := 0
	var first error
	for _, tok := range toks {
		err := s.client(tok).Auth().Token().RevokeSelfWithContext(ctx, "")
		if err == nil {
			n++
			continue
		}
		switch merr := mapErr("revoke", err); {
		case errors.Is(merr, broker.ErrDenied):
			// Expired, already revoked, or the role's tokens lack revoke-self (Vault says 403 to all).
			s.o.Log.Debug("Vault refused a token's revoke-self; it lapses at its TTL", zap.Error(merr))
		case first == nil:
			first = merr
		}
	}
	return n, first
}

func (s *Source) forget(id broker.Identity, env string) {
	role, _ := s.o.Role(env)
	s.mu.Lock()
	delete(s.tokens, id.PodUID+"|"+role)
	s.mu.Unlock()
}

// mapErr maps a vault/api error onto the broker's sentinels, in this one place. The message keeps
// Vault's error strings but never a request body (the JWT) or a token.
func mapErr(op string, err error) error {
	var re *vaultapi.ResponseError
	if errors.As(err, &re) {
		msg := strings.Join(re.Errors, "; ")
		switch {
		case re.StatusCode == http.StatusForbidden, re.StatusCode == http.StatusUnauthorized:
			return fmt.Errorf("vault %s: %d %s: %w", op, re.StatusCode, msg, broker.ErrDenied)
		case re.StatusCode == http.StatusNotFound:
			return fmt.Errorf("vault %s: not found: %w", op, broker.ErrNotFound)
		case re.StatusCode == http.StatusBadRequest:
			return fmt.Errorf("vault %s: %d %s: %w", op, re.StatusCode, msg, broker.ErrDenied)
		default:
			return fmt.Errorf("vault %s: %d %s: %w", op, re.StatusCode, msg, broker.ErrUnavailable)
		}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("vault %s: %w", op, err)
	}
	return fmt.Errorf("vault %s: %v: %w", op, err, broker.ErrUnavailable)
}
