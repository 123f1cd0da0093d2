package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

// fakeVault answers the few Vault endpoints the source uses, to force the answers a real Vault gives
// only in faults (a 5xx, a login refused, a token refused mid-flight). The real Vault runs in the
// integration tests (test/e2e).
type fakeVault struct {
	mu       sync.Mutex
	logins   int
	renewals int
	revoked  []string
	valid    map[string]bool // tokens Vault accepts
	login    func(w http.ResponseWriter)
	read     func(w http.ResponseWriter, token, path string)
}

func (f *fakeVault) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	tok := r.Header.Get("X-Vault-Token")
	switch {
	case r.URL.Path == "/v1/auth/kubernetes/login":
		f.logins++
		if f.login != nil {
			f.login(w)
			return
		}
		f.ServeHTTPLoginLocked(w)
	case r.URL.Path == "/v1/auth/token/renew-self":
		if !f.valid[tok] {
			http.Error(w, `{"errors":["permission denied"]}`, http.StatusForbidden)
			return
		}
		f.renewals++
		json.NewEncoder(w).Encode(map[string]any{"auth": map[string]any{"client_token": tok, "lease_duration": 600, "renewable": true}})
	case r.URL.Path == "/v1/auth/token/revoke-self":
		if !f.valid[tok] {
			http.Error(w, `{"errors":["permission denied"]}`, http.StatusForbidden)
			return
		}
		delete(f.valid, tok)
		f.revoked = append(f.revoked, tok)
		w.WriteHeader(http.StatusNoContent)
	case strings.HasPrefix(r.URL.Path, "/v1/kv/data/"):
		if !f.valid[tok] {
			http.Error(w, `{"errors":["permission denied"]}`, http.StatusForbidden)
			return
		}
		f.read(w, tok, strings.TrimPrefix(r.URL.Path, "/v1/kv/data/"))
	default:
		http.NotFound(w, r)
	}
}

// ServeHTTPLoginLocked answers a successful login; f.mu is held.
func (f *fakeVault) ServeHTTPLoginLocked(w http.ResponseWriter) {
	t := fmt.Sprintf("s.pod-%d", f.logins)
	f.valid[t] = true
	json.NewEncoder(w).Encode(map[string]any{"auth": map[string]any{"client_token": t, "accessor": "acc-" + t, "lease_duration": 600, "renewable": true}})
}

func kv(data map[string]any) func(http.ResponseWriter, string, string) {
	return func(w http.ResponseWriter, _, _ string) {
		json.NewEncoder(w).Encode(map[string]any{"data": map[string]any{"data": data, "metadata": map[string]any{"version": 7}}})
	}
}

func newSource(t *testing.T, f *fakeVault) *Source {
	t.Helper()
	if f.valid == nil {
		f.valid = map[string]bool{}
	}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	c, err := NewClient(ClientOptions{Address: srv.URL, AllowHTTP: true, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Options{Client: c, Mode: ModePod, Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var pod = broker.Identity{Namespace: "payments", ServiceAccount: "api", PodName: "api-0", PodUID: "uid-1"}

func ref(path, key string) broker.Resolved {
	return broker.Resolved{SecretRef: broker.SecretRef{Ref: path, Key: key}, Environment: "prod", Mount: "kv", Path: "prod/" + path, Role: "prod"}
}

func fetch(s *Source, refs ...broker.Resolved) ([]broker.Secret, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return s.Fetch(ctx, pod, "jwt-CANARY", refs, 1<<20)
}

// Vault's answers map onto the fault classes in one place; the token never reaches an error.
func TestVaultAnswersMapToFaults(t *testing.T) {
	for _, tc := range []struct {
		name  string
		login func(http.ResponseWriter)
		read  func(http.ResponseWriter, string, string)
		want  error
	}{
		{"value", nil, kv(map[string]any{"password": "s3cr3t"}), nil},
		{"missing key", nil, kv(map[string]any{"other": "x"}), fault.ErrNotFound},
		{"deleted secret", nil, func(w http.ResponseWriter, _, _ string) {
			w.Write([]byte(`{"data":{"data":null,"metadata":{"version":3}}}`))
		}, fault.ErrNotFound},
		{"404", nil, func(w http.ResponseWriter, _, _ string) { http.Error(w, `{"errors":[]}`, http.StatusNotFound) }, fault.ErrNotFound},
		{"500", nil, func(w http.ResponseWriter, _, _ string) {
			http.Error(w, `{"errors":["boom"]}`, http.StatusInternalServerError)
		}, fault.ErrUnavailable},
		{"garbage", nil, func(w http.ResponseWriter, _, _ string) { w.Write([]byte(`{"data":`)) }, fault.ErrUnavailable},
		{"read refused after a fresh login too", nil, func(w http.ResponseWriter, _, _ string) {
			http.Error(w, `{"errors":["permission denied"]}`, http.StatusForbidden)
		}, fault.ErrDenied},
		{"login refused (a wrong role or a broken reviewer look alike)", func(w http.ResponseWriter) {
			http.Error(w, `{"errors":["permission denied"]}`, http.StatusForbidden)
		}, nil, fault.ErrUnavailable},
		{"login 400", func(w http.ResponseWriter) { http.Error(w, `{"errors":["invalid role name"]}`, http.StatusBadRequest) }, nil, fault.ErrUnavailable},
		{"too large", nil, kv(map[string]any{"password": strings.Repeat("x", 2<<20)}), fault.ErrTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSource(t, &fakeVault{login: tc.login, read: tc.read})
			secs, err := fetch(s, ref("payments/db", "password"))
			if tc.want == nil {
				if err != nil || len(secs) != 1 || string(secs[0].Value) != "s3cr3t" || secs[0].Version != 7 {
					t.Fatalf("got %v, %v", secs, err)
				}
				return
			}
			if !errors.Is(err, tc.want) || secs != nil {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if strings.Contains(err.Error(), "CANARY") || strings.Contains(err.Error(), "s.pod-") {
				t.Fatalf("a token reached the error: %v", err)
			}
		})
	}
}

// A cached token Vault stops accepting (a restart, a revocation) is dropped, revoked if Vault still
// knows it, and replaced by one fresh login; refs in one secret share one read.
func TestARefusedTokenIsRevokedAndReplaced(t *testing.T) {
	f := &fakeVault{}
	reads := 0
	f.read = func(w http.ResponseWriter, tok, path string) {
		reads++
		kv(map[string]any{"a": "A", "b": "B"})(w, tok, path)
	}
	s := newSource(t, f)
	if secs, err := fetch(s, ref("payments/db", "a"), ref("payments/db", "b")); err != nil || string(secs[0].Value) != "A" || string(secs[1].Value) != "B" {
		t.Fatalf("first fetch: %v %v", secs, err)
	}
	if f.logins != 1 || reads != 1 {
		t.Fatalf("%d logins, %d reads for two keys of one secret", f.logins, reads)
	}
	// Vault forgets the token (a restart): the read is refused, so is the revoke (Vault does not know
	// the token any more), and the fetch logs in afresh and succeeds.
	f.mu.Lock()
	delete(f.valid, "s.pod-1")
	f.mu.Unlock()
	if _, err := fetch(s, ref("payments/db", "a")); err != nil {
		t.Fatalf("after Vault forgot the token: %v", err)
	}
	if f.logins != 2 {
		t.Fatalf("%d logins, want 2", f.logins)
	}
	// A token Vault still knows but that a read is refused with (its policy changed) is revoked.
	f.read = func(w http.ResponseWriter, tok, path string) {
		if tok == "s.pod-2" {
			http.Error(w, `{"errors":["permission denied"]}`, http.StatusForbidden)
			return
		}
		kv(map[string]any{"a": "A"})(w, tok, path)
	}
	if _, err := fetch(s, ref("payments/db", "a")); err != nil {
		t.Fatalf("after a refused read: %v", err)
	}
	if len(f.revoked) != 1 || f.revoked[0] != "s.pod-2" {
		t.Fatalf("revoked %v, want the refused token", f.revoked)
	}
	// Release forgets the pod's token and revokes it.
	revoke := s.Release(pod.PodUID)
	if revoke == nil || revoke(context.Background()) != nil || len(f.revoked) != 2 || f.revoked[1] != "s.pod-3" {
		t.Fatalf("release: revoked %v", f.revoked)
	}
	if s.Release(pod.PodUID) != nil {
		t.Fatal("a released pod still holds a token")
	}
}

// Every request to Vault is observed with its outcome (for the latency metrics), and the pods' live
// tokens are counted.
func TestRequestsAreObservedAndTokensCounted(t *testing.T) {
	f := &fakeVault{read: kv(map[string]any{"password": "s3cr3t"})}
	s := newSource(t, f)
	var mu sync.Mutex
	var ops []string
	s.o.Observe = func(op string, took time.Duration, err error) {
		mu.Lock()
		defer mu.Unlock()
		if took <= 0 {
			t.Errorf("%s observed without a duration", op)
		}
		ops = append(ops, fmt.Sprintf("%s:%s", op, fault.ClassOf(err)))
	}
	if _, err := fetch(s, ref("payments/db", "password")); err != nil {
		t.Fatal(err)
	}
	if s.Tokens() != 1 {
		t.Fatalf("%d tokens held after a login", s.Tokens())
	}
	f.read = func(w http.ResponseWriter, _, _ string) {
		http.Error(w, `{"errors":["boom"]}`, http.StatusInternalServerError)
	}
	fetch(s, ref("payments/db", "password"))
	if err := s.Release(pod.PodUID)(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s.Tokens() != 0 {
		t.Fatalf("%d tokens held after the release", s.Tokens())
	}
	mu.Lock()
	defer mu.Unlock()
	if got, want := strings.Join(ops, ","), "login:OK,read:OK,read:Unavailable,revoke:OK"; got != want {
		t.Fatalf("observed %s, want %s", got, want)
	}
}
