package vault

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

// Vault tokens per service account per node. A kubernetes-auth Vault token carries the service
// account's identity (Vault's token metadata and audit log name the namespace, the service account
// and the role; never a pod), so one login serves every pod of the service account on this node: the
// token is cached under (namespace, service account, Vault role, environment), held by the pods that
// fetched with it, and revoked when the last of them is released (PodReleaser). Keyward's own
// per-pod TokenReview and policy check run on every request before the source is asked (broker.Service):
// the key is built from the authenticated identity and the policy's resolution, so a pod never
// reaches another namespace's, service account's, role's or environment's token. The cache is memory
// only, bounded by Options.MaxTokens, and no token reaches a log or an error (logs name a hash of
// the token's accessor).

// token returns a Vault token for the pod's service account with the ref's role: cached, renewed in
// the last third of its TTL, or a fresh login with the pod's JWT. The pod becomes a holder of the
// key first, so a release of the service account's other pods leaves the token in place. Concurrent
// logins for one key collapse into one.
func (s *Source) token(ctx context.Context, id broker.Identity, jwt broker.Token, r broker.Resolved) (string, error) {
	if s.o.Mode == ModeBroker {
		return s.o.BrokerToken.Reveal(), nil
	}
	if r.Role == "" {
		return "", fmt.Errorf("environment %s has no Vault role: %w", r.Environment, fault.ErrDenied)
	}
	if id.Namespace == "" || id.ServiceAccount == "" {
		return "", fmt.Errorf("no service account in the identity: %w", fault.ErrUnauthenticated)
	}
	key := tokenKeyOf(id, r)
	now := s.o.Now()
	s.mu.Lock()
	s.holdLocked(key, id.PodUID)
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
	v, err, _ := s.flight.Do("login|"+key.String(), func() (any, error) {
		// A login that finished between the look-up above and this flight has cached a fresh
		// token: use it rather than log in again (t, if any, is the one found wanting).
		s.mu.Lock()
		cur := s.tokens[key]
		s.mu.Unlock()
		if cur != nil && cur != t && s.o.Now().Sub(cur.issued) < cur.ttl*2/3 {
			return cur, nil
		}
		return s.login(ctx, key, jwt)
	})
	if err != nil {
		return "", err
	}
	return v.(*vaultToken).token, nil
}

// doomed reports whether the cached token tok of the pod's service account for r ends for good
// (capped at its max TTL, or not renewable) before a lease issued now could be relied on: within
// the next hour. Vault revokes a token's leases with it, so dynamic credentials are issued with a
// fresh login instead (freshToken). Broker mode's own token is the operator's to keep alive.
func (s *Source) doomed(id broker.Identity, r broker.Resolved, tok string) bool {
	if s.o.Mode != ModePod {
		return false
	}
	key := tokenKeyOf(id, r)
	s.mu.Lock()
	t := s.tokens[key]
	s.mu.Unlock()
	if t == nil || t.token != tok {
		return false
	}
	end, ok := t.doomedAt()
	return ok && end.Before(s.o.Now().Add(time.Hour))
}

// freshToken replaces the cached token old of the pod's service account for r with a fresh login.
// The old one is not revoked: leases of other volumes hang off it until their next republish
// reissues them under the fresh one; it ends at its max TTL.
func (s *Source) freshToken(ctx context.Context, id broker.Identity, jwt broker.Token, r broker.Resolved, old string) (string, error) {
	key := tokenKeyOf(id, r)
	s.mu.Lock()
	if t := s.tokens[key]; t != nil && t.token == old {
		delete(s.tokens, key)
	}
	s.mu.Unlock()
	s.o.Log.Info("a service-account Vault token ends at its max TTL within the hour: logging in afresh for dynamic credentials")
	return s.token(ctx, id, jwt, r)
}

// holdLocked records that the pod holds key. Callers hold s.mu.
func (s *Source) holdLocked(key tokenKey, podUID string) {
	if podUID == "" {
		podUID = "-" // a request without a pod UID (brokerbench, keywardctl) holds until ReleaseAll
	}
	h := s.holders[key]
	if h == nil {
		h = map[string]struct{}{}
		s.holders[key] = h
	}
	h[podUID] = struct{}{}
	k := s.byPod[podUID]
	if k == nil {
		k = map[tokenKey]struct{}{}
		s.byPod[podUID] = k
	}
	k[key] = struct{}{}
}

func (s *Source) login(ctx context.Context, key tokenKey, jwt broker.Token) (*vaultToken, error) {
	s.mu.Lock()
	full := s.tokens[key] == nil && len(s.tokens) >= s.o.MaxTokens
	s.mu.Unlock()
	if full {
		return nil, fmt.Errorf("%d Vault tokens cached, the bound: %w", s.o.MaxTokens, fault.ErrUnavailable)
	}
	role := key.role
	c := s.client("")
	start := time.Now()
	sec, err := c.Logical().WriteWithContext(ctx, "auth/"+s.o.AuthMount+"/login", map[string]any{"role": role, "jwt": jwt.Reveal()})
	if err != nil {
		err = loginErr(role, err)
	}
	s.observe("login", start, err)
	if err != nil {
		return nil, err // nothing is cached: a failed login never poisons the cache
	}
	if sec == nil || sec.Auth == nil || sec.Auth.ClientToken == "" {
		return nil, fmt.Errorf("login with role %s: no token in the answer: %w", role, fault.ErrUnavailable)
	}
	t := &vaultToken{token: sec.Auth.ClientToken, accessor: hashAccessor(sec.Auth.Accessor), issued: s.o.Now(),
		ttl: time.Duration(sec.Auth.LeaseDuration) * time.Second, renewable: sec.Auth.Renewable}
	if t.ttl <= 0 {
		t.ttl = time.Minute
	}
	t.loginTTL = t.ttl
	s.mu.Lock()
	var replaced *vaultToken
	if len(s.holders[key]) > 0 { // every holder released meanwhile: used once, not cached
		replaced = s.tokens[key]
		s.tokens[key] = t
	}
	s.mu.Unlock()
	if replaced != nil && replaced.token != t.token {
		s.o.Log.Debug("replaced a lapsed service-account Vault token", zap.Stringer("old", replaced), zap.Stringer("new", t))
	}
	return t, nil
}

// hashAccessor is what logs may name of a token: a prefix of its accessor's SHA-256.
func hashAccessor(accessor string) string {
	if accessor == "" {
		return "none"
	}
	h := sha256.Sum256([]byte(accessor))
	return hex.EncodeToString(h[:6])
}

func (s *Source) renew(ctx context.Context, key tokenKey, t *vaultToken) (*vaultToken, error) {
	v, err, _ := s.flight.Do("renew|"+key.String(), func() (any, error) {
		start := time.Now()
		sec, err := s.client(t.token).Auth().Token().RenewSelfWithContext(ctx, 0)
		if err != nil {
			err = mapErr("renew", err)
		}
		s.observe("renew", start, err)
		if err != nil {
			return nil, err
		}
		if sec == nil || sec.Auth == nil {
			return nil, fmt.Errorf("renew: empty answer: %w", fault.ErrUnavailable)
		}
		nt := &vaultToken{token: t.token, accessor: t.accessor, issued: s.o.Now(), ttl: time.Duration(sec.Auth.LeaseDuration) * time.Second,
			renewable: sec.Auth.Renewable, loginTTL: t.loginTTL}
		// Less than the login gave: the token's max TTL capped it, and it ends for good then.
		nt.capped = t.capped || (t.loginTTL > 0 && nt.ttl < t.loginTTL)
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

// Release drops the pod from the holders of its service accounts' tokens; the tokens it was the
// last holder of are forgotten at once and revoked (revoke-self) by the function returned; nil if
// there are none.
func (s *Source) Release(podUID string) func(context.Context) error {
	if s.o.Mode != ModePod || podUID == "" {
		return nil
	}
	var toks []*vaultToken
	s.mu.Lock()
	for key := range s.byPod[podUID] {
		h := s.holders[key]
		delete(h, podUID)
		if len(h) > 0 {
			continue
		}
		delete(s.holders, key)
		if t := s.tokens[key]; t != nil {
			toks = append(toks, t)
			delete(s.tokens, key)
		}
	}
	delete(s.byPod, podUID)
	s.mu.Unlock()
	if len(toks) == 0 {
		return nil
	}
	return func(ctx context.Context) error {
		_, err := s.revoke(ctx, toks)
		return err
	}
}

// Holders is how many pods hold a cached token (or a login in flight) of the service account's with
// the role, for the environment: for tests and metrics.
func (s *Source) Holders(namespace, serviceAccount, role, environment string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.holders[tokenKey{namespace, serviceAccount, role, environment}])
}

// ReleaseAll revokes every cached Vault token, for a clean shutdown, except those that issued the
// leases of dynamic credentials published volumes still hold: Vault would revoke the leases with the
// token, and the pods keep their volumes across a driver restart (an upgrade). Those tokens lapse at
// their TTL; the next driver finds their leases by hash at the volumes' first republish and replaces
// them (leases.go). It returns how many were revoked.
func (s *Source) ReleaseAll(ctx context.Context) (int, error) {
	if s.o.Mode != ModePod {
		return 0, nil
	}
	leased := s.leasedTokens()
	s.mu.Lock()
	toks := make([]*vaultToken, 0, len(s.tokens))
	kept := 0
	for _, t := range s.tokens {
		if leased[t.token] {
			kept++
			continue
		}
		toks = append(toks, t)
	}
	if kept > 0 {
		s.o.Log.Info("shutdown: Vault tokens holding published volumes' leases are left to lapse at their TTL, not revoked", zap.Int("tokens", kept))
	}
	s.tokens = map[tokenKey]*vaultToken{}
	s.holders = map[tokenKey]map[string]struct{}{}
	s.byPod = map[string]map[tokenKey]struct{}{}
	s.mu.Unlock()
	return s.revoke(ctx, toks)
}

// leasedTokens are the Vault tokens that issued the leases the volumes hold: Vault revokes a token's
// leases with it.
func (s *Source) leasedTokens() map[string]bool {
	leased := map[string]bool{}
	s.lmu.Lock()
	defer s.lmu.Unlock()
	for _, vl := range s.volumes {
		for _, l := range vl.cur {
			leased[l.token] = true
		}
		for _, l := range vl.retired {
			leased[l.token] = true
		}
	}
	return leased
}

// revokeUnleased revokes the tokens a refused request forgot, except those holding volumes' leases
// (revoking one would revoke other pods' credentials: it lapses at its TTL instead).
func (s *Source) revokeUnleased(ctx context.Context, toks []*vaultToken) {
	leased := s.leasedTokens()
	var revoke []*vaultToken
	for _, t := range toks {
		if !leased[t.token] {
			revoke = append(revoke, t)
		}
	}
	if len(revoke) == 0 {
		return
	}
	if _, err := s.revoke(ctx, revoke); err != nil {
		s.o.Log.Info("revoking a Vault token Vault refused failed; it lapses at its TTL", zap.Error(err))
	}
}

// revoke revokes tokens at Vault. A token Vault no longer accepts is not an error.
func (s *Source) revoke(ctx context.Context, toks []*vaultToken) (int, error) {
	n := 0
	var first error
	for _, t := range toks {
		start := time.Now()
		err := s.client(t.token).Auth().Token().RevokeSelfWithContext(ctx, "")
		if err != nil {
			err = mapErr("revoke", err)
		}
		s.observe("revoke", start, err)
		if err == nil {
			n++
			continue
		}
		switch {
		case errors.Is(err, fault.ErrDenied):
			// Expired, already revoked, or the role's tokens lack revoke-self (Vault says 403 to all).
			s.o.Log.Debug("Vault refused a token's revoke-self; it lapses at its TTL", zap.Stringer("token", t), zap.Error(err))
		case first == nil:
			first = err
		}
	}
	return n, first
}

// forget drops the cached tokens of the pod's service account for the refs' keys, if they are among
// used (a concurrent request may have logged in afresh meanwhile: that token stays), and returns
// them. The holders stay: the next request logs in again for them.
func (s *Source) forget(id broker.Identity, refs []broker.Resolved, used map[string]bool) []*vaultToken {
	var toks []*vaultToken
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range refs {
		k := tokenKeyOf(id, r)
		if t := s.tokens[k]; t != nil && used[t.token] {
			toks = append(toks, t)
			delete(s.tokens, k)
		}
	}
	return toks
}
