package vault

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

// token returns a Vault token for the pod with the ref's role: cached, renewed in the last third of
// its TTL, or a fresh login. Concurrent logins for one pod collapse into one.
func (s *Source) token(ctx context.Context, id broker.Identity, jwt broker.Token, r broker.Resolved) (string, error) {
	if s.o.Mode == ModeBroker {
		return s.o.BrokerToken.Reveal(), nil
	}
	if r.Role == "" {
		return "", fmt.Errorf("environment %s has no Vault role: %w", r.Environment, fault.ErrDenied)
	}
	role := r.Role
	key := tokenKey{id.PodUID, role}
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
	v, err, _ := s.flight.Do("login|"+key.String(), func() (any, error) {
		return s.login(ctx, key, role, jwt)
	})
	if err != nil {
		return "", err
	}
	return v.(*vaultToken).token, nil
}

func (s *Source) login(ctx context.Context, key tokenKey, role string, jwt broker.Token) (*vaultToken, error) {
	c := s.client("")
	start := time.Now()
	sec, err := c.Logical().WriteWithContext(ctx, "auth/"+s.o.AuthMount+"/login", map[string]any{"role": role, "jwt": jwt.Reveal()})
	if err != nil {
		err = loginErr(role, err)
	}
	s.observe("login", start, err)
	if err != nil {
		return nil, err
	}
	if sec == nil || sec.Auth == nil || sec.Auth.ClientToken == "" {
		return nil, fmt.Errorf("login with role %s: no token in the answer: %w", role, fault.ErrUnavailable)
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
		if match(k.podUID) {
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
		start := time.Now()
		err := s.client(tok).Auth().Token().RevokeSelfWithContext(ctx, "")
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
			s.o.Log.Debug("Vault refused a token's revoke-self; it lapses at its TTL", zap.Error(err))
		case first == nil:
			first = err
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
		k := tokenKey{id.PodUID, r.Role}
		if t := s.tokens[k]; t != nil && used[t.token] {
			toks = append(toks, t.token)
			delete(s.tokens, k)
		}
	}
	return toks
}
