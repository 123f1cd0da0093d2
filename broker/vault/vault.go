package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

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

// Fetch reads each ref's key from KV v2, up to 8 reads at a time; refs in the same secret share one
// read. All refs are in one environment (the pod's), so one Vault token serves them all. The
// responses together may hold at most broker.AnswerBudget(maxBytes, reads), and the values returned
// at most maxBytes: beyond that the fetch stops reading and fails with broker.ErrTooLarge.
func (s *Source) Fetch(ctx context.Context, id broker.Identity, jwt broker.Token, refs []broker.Resolved, maxBytes int64) ([]broker.Secret, error) {
	out, used, err := s.fetchAll(ctx, id, jwt, refs, maxBytes)
	if err != nil && errors.Is(err, broker.ErrDenied) && s.o.Mode == ModePod {
		// The cached Vault token may have been revoked (or Vault restarted): forget it (only it: a
		// concurrent request may have logged in afresh meanwhile), revoke it in case Vault still knows
		// it (best effort), and log in once more.
		if old := s.forget(id, refs, used); len(old) > 0 {
			if _, rerr := s.revoke(ctx, old); rerr != nil {
				s.o.Log.Info("revoking a Vault token refused a read failed; it lapses at its TTL", zap.Error(rerr))
			}
		}
		out, _, err = s.fetchAll(ctx, id, jwt, refs, maxBytes)
	}
	return out, err
}

// read is one KV v2 read and the refs it answers.
type read struct {
	ref  broker.Resolved // the first ref: mount, path, version
	refs []int           // indexes of the refs it answers
}

// fetchAll fetches refs; it also returns the Vault tokens it used.
func (s *Source) fetchAll(ctx context.Context, id broker.Identity, jwt broker.Token, refs []broker.Resolved, maxBytes int64) ([]broker.Secret, map[string]bool, error) {
	var reads []*read
	byKey := map[string]*read{}
	for i, r := range refs {
		k := r.Environment + "\x00" + r.Mount + "\x00" + r.Path + "\x00" + strconv.Itoa(r.Version)
		if rd := byKey[k]; rd != nil {
			rd.refs = append(rd.refs, i)
			continue
		}
		rd := &read{ref: r, refs: []int{i}}
		byKey[k] = rd
		reads = append(reads, rd)
	}
	b := &budget{}
	b.body.Store(broker.AnswerBudget(maxBytes, len(reads)))
	b.values.Store(maxBytes)
	out := make([]broker.Secret, len(refs))
	used := map[string]bool{}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	var err error
	for _, rd := range reads {
		var tok string
		if tok, err = s.token(ctx, id, jwt, rd.ref.Environment); err != nil {
			break // reads already started are still waited for below: none outlives the request
		}
		used[tok] = true
		g.Go(func() error { return s.read(gctx, tok, rd, refs, out, b) })
	}
	if werr := g.Wait(); err == nil {
		err = werr
	}
	if err != nil {
		for i := range out {
			clear(out[i].Value)
		}
		return nil, used, err
	}
	return out, used, nil
}

// budget is what a fetch may still read: response bytes and value bytes.
type budget struct{ body, values atomic.Int64 }

// client is the shared client with token set on every request by a callback: a shallow copy, not a
// Clone (which builds a whole new client, environment lookups included, per call).
func (s *Source) client(token string) *vaultapi.Client {
	return s.o.Client.WithRequestCallbacks(func(req *vaultapi.Request) { req.ClientToken = token })
}

// kvResponse is the body of a KV v2 read. The values are views into the response body, not copies:
// the requested ones are decoded into fresh buffers and the body is zeroed after.
type kvResponse struct {
	Data *struct {
		Data     map[string]rawView `json:"data"`
		Metadata struct {
			Version int `json:"version"`
		} `json:"metadata"`
	} `json:"data"`
}

// rawView keeps the JSON of a value as a slice of the input json.Unmarshal decodes: no copy.
type rawView []byte

func (r *rawView) UnmarshalJSON(b []byte) error { *r = b; return nil }

func (s *Source) read(ctx context.Context, token string, rd *read, refs []broker.Resolved, out []broker.Secret, b *budget) error {
	r := rd.ref
	path := r.Mount + "/data/" + r.Path
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
		return mapErr("read "+r.Ref, err)
	}
	body, err := readBounded(resp.Body, resp.ContentLength, &b.body)
	if err != nil {
		if errors.Is(err, errTooLarge) {
			return fmt.Errorf("secret %s: Vault's answer is larger than the volume can take: %w", r.Ref, broker.ErrTooLarge)
		}
		return fmt.Errorf("secret %s: reading Vault's answer: %v: %w", r.Ref, err, broker.ErrUnavailable)
	}
	// The values are decoded in place: they stay in body, the rest of which is zeroed when this
	// returns (all of it on failure), so the answer is never held twice.
	var keep [][2]int
	done := false
	defer func() {
		if done {
			clearExcept(body, keep)
		} else {
			clear(body)
		}
	}()
	var kv kvResponse
	if err := json.Unmarshal(body, &kv); err != nil {
		return fmt.Errorf("secret %s: undecodable answer from Vault: %w", r.Ref, broker.ErrUnavailable)
	}
	if kv.Data == nil || kv.Data.Data == nil {
		return fmt.Errorf("secret %s was deleted or is not KV v2: %w", r.Ref, broker.ErrNotFound)
	}
	decoded := map[string][]byte{}
	for _, i := range rd.refs {
		key := refs[i].Key
		v, seen := decoded[key]
		if !seen {
			raw, ok := kv.Data.Data[key]
			if !ok {
				return fmt.Errorf("secret %s has no key %q: %w", r.Ref, key, broker.ErrNotFound)
			}
			if v, ok = decodeInPlace(raw); !ok {
				return fmt.Errorf("secret %s key %q: undecodable value: %w", r.Ref, key, broker.ErrUnavailable)
			}
			if b.values.Add(-int64(len(v))) < 0 {
				return fmt.Errorf("secret %s key %q: the values are larger than the volume: %w", r.Ref, key, broker.ErrTooLarge)
			}
			// v is a prefix of raw, a view of body that encoding/json hands out up to body's end;
			// checked, so that a decoder handing out capped views cannot make the zeroing below
			// hit the value instead of the rest.
			off := cap(body) - cap(v)
			if len(v) > 0 && (off < 0 || off+len(v) > len(body) || &body[off] != &v[0]) {
				return fmt.Errorf("secret %s key %q: the value is not where it was read: %w", r.Ref, key, broker.ErrUnavailable)
			}
			keep = append(keep, [2]int{off, off + len(v)})
			decoded[key] = v
		}
		out[i] = broker.Secret{Ref: refs[i].SecretRef, Version: kv.Data.Metadata.Version, Value: v}
	}
	done = true
	return nil
}

// clearExcept zeroes b outside the kept ranges.
func clearExcept(b []byte, keep [][2]int) {
	sort.Slice(keep, func(i, j int) bool { return keep[i][0] < keep[j][0] })
	at := 0
	for _, k := range keep {
		if k[0] > at {
			clear(b[at:k[0]])
		}
		at = max(at, k[1])
	}
	clear(b[at:])
}

var errTooLarge = errors.New("over budget")

// chunk is the unit answers are read in; chunks are pooled and zeroed before they go back.
const chunk = 64 << 10

var chunks = sync.Pool{New: func() any { b := make([]byte, chunk); return &b }}

// readBounded reads r whole while the shared budget lasts, into one buffer of exactly its size:
// read in pooled chunks (zeroed after use) and copied once, so no outgrown copy of the answer is
// left for the garbage collector and the peak is twice the answer, not three times.
func readBounded(r io.Reader, contentLength int64, left *atomic.Int64) ([]byte, error) {
	if contentLength > left.Load() {
		return nil, errTooLarge
	}
	var parts []*[]byte
	var lens []int
	total := 0
	defer func() {
		for _, p := range parts {
			clear(*p)
			chunks.Put(p)
		}
	}()
	for {
		p := chunks.Get().(*[]byte)
		n, err := io.ReadFull(r, *p)
		parts, lens = append(parts, p), append(lens, n)
		total += n
		if left.Add(-int64(n)) < 0 {
			return nil, errTooLarge
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	out := make([]byte, total)
	at := 0
	for i, p := range parts {
		at += copy(out[at:], (*p)[:lens[i]])
	}
	return out, nil
}

// decodeInPlace turns the JSON of a KV value into the file's bytes, in the value's own bytes: a
// string's characters (decoded over its literal, which is never shorter), anything else (a number, a
// boolean, an object) its JSON text as Vault sent it. ok is false for a string that is not valid
// UTF-8 JSON (Vault's encoder never sends one).
func decodeInPlace(raw []byte) ([]byte, bool) {
	if len(raw) == 0 || raw[0] != '"' {
		return raw, len(raw) > 0
	}
	if !utf8.Valid(raw) {
		return nil, false // U+FFFD replacements would be longer than what they replace
	}
	return unquote(raw[:0], raw)
}

// unquote appends the decoded JSON string literal s to dst, as encoding/json decodes it (invalid
// surrogate escapes and invalid UTF-8 become U+FFFD), without going through an immutable Go string
// that could not be zeroed. dst may be s[:0] when s is valid UTF-8: the output never overtakes the
// input. ok is false for anything that is not a well-formed string literal.
func unquote(dst, s []byte) ([]byte, bool) {
	if len(s) < 2 || s[0] != '"' || s[len(s)-1] != '"' {
		return nil, false
	}
	s = s[1 : len(s)-1]
	out := dst
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '"' || c < 0x20:
			return nil, false
		case c != '\\':
			if c < utf8.RuneSelf {
				out = append(out, c)
				i++
				continue
			}
			r, size := utf8.DecodeRune(s[i:])
			out = utf8.AppendRune(out, r) // invalid UTF-8 becomes U+FFFD, as encoding/json does
			i += size
			continue
		}
		if i+1 >= len(s) {
			return nil, false
		}
		switch e := s[i+1]; e {
		case '"', '\\', '/':
			out = append(out, e)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r := hex4(s[i+2:])
			if r < 0 {
				return nil, false
			}
			i += 6
			if utf16.IsSurrogate(r) {
				r2 := rune(-1)
				if i+1 < len(s) && s[i] == '\\' && s[i+1] == 'u' {
					r2 = hex4(s[i+2:])
				}
				if dec := utf16.DecodeRune(r, r2); dec != unicode.ReplacementChar {
					i += 6
					r = dec
				} else {
					r = unicode.ReplacementChar
				}
			}
			out = utf8.AppendRune(out, r)
			continue
		default:
			return nil, false
		}
		i += 2
	}
	return out, true
}

// hex4 decodes the four hex digits at the start of s, or returns -1.
func hex4(s []byte) rune {
	if len(s) < 4 {
		return -1
	}
	var r rune
	for _, c := range s[:4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			c = c - 'A' + 10
		default:
			return -1
		}
		r = r*16 + rune(c)
	}
	return r
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
		return nil, loginErr(role, err)
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

// forget drops the pod's cached tokens for the refs' environments, if they are among used, and
// returns them.
func (s *Source) forget(id broker.Identity, refs []broker.Resolved, used map[string]bool) []string {
	var toks []string
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range refs {
		role, _ := s.o.Role(r.Environment)
		k := id.PodUID + "|" + role
		if t := s.tokens[k]; t != nil && used[t.token] {
			toks = append(toks, t.token)
			delete(s.tokens, k)
		}
	}
	return toks
}

// loginErr maps a failed kubernetes-auth login. Vault answers 400/403 when the role does not exist or
// does not match, but also when its own TokenReview fails (an expired reviewer JWT, an apiserver it
// cannot reach): a refused login is ambiguous, so it is ErrUnavailable (retried, files kept), never
// a denial that would clear a running pod's files.
func loginErr(role string, err error) error {
	var re *vaultapi.ResponseError
	if errors.As(err, &re) && re.StatusCode >= 400 && re.StatusCode < 500 {
		return fmt.Errorf("vault login with role %s refused (%d %s; check the role and the auth method's token reviewer): %w",
			role, re.StatusCode, strings.Join(re.Errors, "; "), broker.ErrUnavailable)
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
			return fmt.Errorf("vault %s: %d %s: %w", op, re.StatusCode, msg, broker.ErrDenied)
		case re.StatusCode == http.StatusNotFound:
			return fmt.Errorf("vault %s: not found: %w", op, broker.ErrNotFound)
		default:
			return fmt.Errorf("vault %s: %d %s: %w", op, re.StatusCode, msg, broker.ErrUnavailable)
		}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("vault %s: %w", op, err)
	}
	return fmt.Errorf("vault %s: %v: %w", op, err, broker.ErrUnavailable)
}
