package vault

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

func fetchAs(s *Source, id broker.Identity, refs ...broker.Resolved) ([]broker.Secret, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return s.Fetch(ctx, id, "jwt-CANARY", refs, 1<<20)
}

func podOf(ns, sa, uid string) broker.Identity {
	return broker.Identity{Namespace: ns, ServiceAccount: sa, PodName: "p-" + uid, PodUID: uid}
}

// One Vault login serves every pod of a service account; the token is revoked when its last pod is
// released, not before; a token is never shared across namespaces, service accounts, roles or
// environments (the real-Vault version of each boundary: test/e2e TestSharedVaultTokens).
func TestServiceAccountTokenIsSharedAndRefCounted(t *testing.T) {
	f := &fakeVault{}
	var mu sync.Mutex
	tokenOf := map[string]string{} // path read -> token used
	f.read = func(w http.ResponseWriter, tok, path string) {
		mu.Lock()
		tokenOf[path] = tok
		mu.Unlock()
		kv(map[string]any{"a": "A"})(w, tok, path)
	}
	s := newSource(t, f)
	a1, a2 := podOf("payments", "api", "uid-a1"), podOf("payments", "api", "uid-a2")
	for _, p := range []broker.Identity{a1, a2} {
		if _, err := fetchAs(s, p, ref("payments/db", "a")); err != nil {
			t.Fatal(err)
		}
	}
	if f.logins != 1 || s.Tokens() != 1 || s.Holders("payments", "api", "prod", "prod") != 2 {
		t.Fatalf("two pods of one service account: %d logins, %d tokens, %d holders", f.logins, s.Tokens(), s.Holders("payments", "api", "prod", "prod"))
	}
	// Each boundary gets its own token.
	envRef := ref("payments/db", "a")
	envRef.Environment = "staging"
	roleRef := ref("payments/db", "a")
	roleRef.Role = "prod-other"
	for _, tc := range []struct {
		name string
		id   broker.Identity
		r    broker.Resolved
	}{
		{"namespace", podOf("other", "api", "uid-n"), ref("payments/db", "a")},
		{"service account", podOf("payments", "worker", "uid-s"), ref("payments/db", "a")},
		{"role", podOf("payments", "api", "uid-r"), roleRef},
		{"environment", podOf("payments", "api", "uid-e"), envRef},
	} {
		before := f.logins
		if _, err := fetchAs(s, tc.id, tc.r); err != nil {
			t.Fatal(err)
		}
		if f.logins != before+1 {
			t.Errorf("another %s shared a cached token (%d logins)", tc.name, f.logins-before)
		}
	}
	if s.Tokens() != 5 {
		t.Fatalf("%d tokens cached, want 5", s.Tokens())
	}
	// The first pod goes: the token stays for the second; the second goes: revoked.
	if revoke := s.Release(a1.PodUID); revoke != nil {
		t.Fatal("releasing one of two pods revoked their token")
	}
	if _, err := fetchAs(s, a2, ref("payments/db", "a")); err != nil || f.logins != 5 {
		t.Fatalf("the remaining pod lost the token: %v, %d logins", err, f.logins)
	}
	revoke := s.Release(a2.PodUID)
	if revoke == nil || revoke(context.Background()) != nil || len(f.revoked) != 1 || f.revoked[0] != "s.pod-1" {
		t.Fatalf("the last pod's release revoked %v", f.revoked)
	}
	if s.Tokens() != 4 {
		t.Fatalf("%d tokens after the release", s.Tokens())
	}
}

// Concurrent first requests of one service account log in once; a failed login caches nothing; a
// token Vault refuses is dropped and replaced by exactly one more login, never in a loop.
func TestLoginsCollapseFailuresDoNotPoisonAndRefusalsRetryOnce(t *testing.T) {
	f := &fakeVault{read: kv(map[string]any{"a": "A"})}
	gate := make(chan struct{})
	f.login = nil
	s := newSource(t, f)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := range 20 {
		wg.Go(func() {
			<-gate
			_, err := fetchAs(s, podOf("payments", "api", "uid-"+strings.Repeat("x", i+1)), ref("payments/db", "a"))
			errs <- err
		})
	}
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	// The fake serializes requests, so late arrivals may find the token cached: what matters is one login.
	if f.logins != 1 {
		t.Fatalf("20 concurrent first publishes of one service account: %d logins", f.logins)
	}

	// A failed login caches nothing: the next request logs in again and succeeds.
	g := &fakeVault{read: kv(map[string]any{"a": "A"})}
	fail := true
	g.login = func(w http.ResponseWriter) {
		if fail {
			http.Error(w, `{"errors":["boom"]}`, http.StatusInternalServerError)
			return
		}
		g.login = nil
		g.ServeHTTPLoginLocked(w)
	}
	s2 := newSource(t, g)
	if _, err := fetchAs(s2, podOf("payments", "api", "u1"), ref("payments/db", "a")); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("failed login: %v", err)
	}
	if s2.Tokens() != 0 {
		t.Fatal("a failed login left a cache entry")
	}
	fail = false
	if _, err := fetchAs(s2, podOf("payments", "api", "u1"), ref("payments/db", "a")); err != nil {
		t.Fatalf("after a failed login: %v", err)
	}

	// Vault refuses every read: one refusal, one fresh login, then the denial: no loop.
	h := &fakeVault{read: func(w http.ResponseWriter, _, _ string) {
		http.Error(w, `{"errors":["permission denied"]}`, http.StatusForbidden)
	}}
	s3 := newSource(t, h)
	if _, err := fetchAs(s3, podOf("payments", "api", "u1"), ref("payments/db", "a")); !errors.Is(err, fault.ErrDenied) {
		t.Fatalf("refused reads: %v", err)
	}
	if h.logins != 2 || s3.Tokens() != 1 {
		t.Fatalf("refused reads: %d logins (want the first and one retry), %d tokens", h.logins, s3.Tokens())
	}
}

// The cache is bounded, and no token reaches a log line (the logs name an accessor hash).
func TestCacheIsBoundedAndNeverLogged(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	f := &fakeVault{read: kv(map[string]any{"a": "A"})}
	s := newSource(t, f)
	s.o.Log = zap.New(core)
	s.o.MaxTokens = 2
	for i, sa := range []string{"a", "b", "c"} {
		_, err := fetchAs(s, podOf("payments", sa, "uid-"+sa), ref("payments/db", "a"))
		if i < 2 && err != nil {
			t.Fatal(err)
		}
		if i == 2 && !errors.Is(err, fault.ErrUnavailable) {
			t.Fatalf("a third service account past the bound of 2: %v", err)
		}
	}
	// Revocations Vault refuses are logged: with the hash, never the token.
	f.mu.Lock()
	f.valid = map[string]bool{}
	f.mu.Unlock()
	if _, err := s.ReleaseAll(context.Background()); err != nil {
		t.Fatal(err)
	}
	if logs.Len() == 0 {
		t.Fatal("expected the refused revocations to be logged")
	}
	for _, e := range logs.All() {
		line := e.Message
		for _, fld := range e.Context {
			line += " " + fld.String + " " + fmtAny(fld.Interface)
		}
		if strings.Contains(line, "s.pod-") || strings.Contains(line, "CANARY") {
			t.Fatalf("a token reached the log: %s", line)
		}
	}
}

func fmtAny(v any) string {
	if s, ok := v.(interface{ String() string }); ok {
		return s.String()
	}
	return ""
}

// A shared token is renewed inside its renewal window (the last third of its TTL), not logged in
// again; past its TTL it is replaced by a login.
func TestSharedTokenIsRenewedInItsWindow(t *testing.T) {
	f := &fakeVault{read: kv(map[string]any{"a": "A"})}
	s := newSource(t, f)
	now := time.Now()
	s.o.Now = func() time.Time { return now }
	p := podOf("payments", "api", "u1")
	if _, err := fetchAs(s, p, ref("payments/db", "a")); err != nil {
		t.Fatal(err)
	}
	now = now.Add(5 * time.Minute) // of 10: before the window
	if _, err := fetchAs(s, p, ref("payments/db", "a")); err != nil || f.logins != 1 || f.renewals != 0 {
		t.Fatalf("before the window: %v, %d logins, %d renewals", err, f.logins, f.renewals)
	}
	now = now.Add(2 * time.Minute) // 7 of 10: in the window
	if _, err := fetchAs(s, p, ref("payments/db", "a")); err != nil || f.logins != 1 || f.renewals != 1 {
		t.Fatalf("in the window: %v, %d logins, %d renewals", err, f.logins, f.renewals)
	}
	now = now.Add(11 * time.Minute) // past the renewed TTL
	if _, err := fetchAs(s, p, ref("payments/db", "a")); err != nil || f.logins != 2 {
		t.Fatalf("past the TTL: %v, %d logins", err, f.logins)
	}
}
