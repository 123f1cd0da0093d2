package pkcs11

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/keyward/keyward/internal/config"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/kms"
	"github.com/keyward/keyward/kms/kmstest"
	"github.com/keyward/keyward/test/harness"
)

// token is a fresh SoftHSM token with a first key generation and a running Wrapper.
type token struct {
	hsm *harness.SoftHSM
	cfg Config
	w   *Wrapper
}

func newToken(t *testing.T, mutate ...func(*Config)) *token {
	t.Helper()
	h := harness.SoftHSMT(t, "keyward")
	cfg := Config{Module: h.Module, TokenLabel: h.TokenLabel, PINFile: h.PINFile, KeyLabel: "kek",
		KeyRefreshInterval: config.Duration{Duration: time.Hour}}
	for _, m := range mutate {
		m(&cfg)
	}
	a, err := OpenAdmin(cfg, h.UserPIN)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Create(); err != nil {
		t.Fatal(err)
	}
	a.Close()
	tk := &token{hsm: h, cfg: cfg}
	tk.w = tk.open(t)
	return tk
}

// newTokenB is newToken for benchmarks.
func newTokenB(b *testing.B, copies bool, setup ...func(*Config, *Admin)) *Wrapper {
	b.Helper()
	dir := harness.Dir(b)
	h, err := harness.NewSoftHSM(dir, "keyward")
	harness.Check(b, err)
	b.Setenv("SOFTHSM2_CONF", h.ConfPath)
	cfg := Config{Module: h.Module, TokenLabel: h.TokenLabel, PINFile: h.PINFile, KeyLabel: "kek", SessionKeyCopies: &copies}
	a, err := OpenAdmin(cfg, h.UserPIN)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := a.Create(); err != nil {
		b.Fatal(err)
	}
	for _, f := range setup {
		f(&cfg, a)
	}
	a.Close()
	w, err := New(cfg, h.UserPIN, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { w.Close() })
	return w
}

func (tk *token) open(t *testing.T) *Wrapper {
	t.Helper()
	w, err := New(tk.cfg, tk.hsm.UserPIN, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

// admin runs f with an Admin sharing the process's module (it must not finalize it).
func (tk *token) admin(t *testing.T, f func(a *Admin) error) {
	t.Helper()
	a, err := OpenAdmin(tk.cfg, tk.hsm.UserPIN)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if a.owner {
		t.Fatal("admin took ownership of a module the wrapper initialized")
	}
	if err := f(a); err != nil {
		t.Fatal(err)
	}
}

func (tk *token) subject(t *testing.T) kmstest.Subject {
	return kmstest.Subject{
		Wrapper: tk.w,
		Rotate: func(t *testing.T) string {
			var g Generation
			tk.admin(t, func(a *Admin) (err error) { g, err = a.Rotate(); return err })
			if err := tk.w.Refresh(context.Background()); err != nil {
				t.Fatal(err)
			}
			return g.KeyID
		},
		Retire: func(t *testing.T, id string) {
			tk.admin(t, func(a *Admin) error { return a.Retire(id) })
			if err := tk.w.Refresh(context.Background()); err != nil {
				t.Fatal(err)
			}
		},
		Reopen: func(t *testing.T) kms.KeyWrapper {
			tk.w.Close()
			tk.w = tk.open(t)
			return tk.w
		},
	}
}

func TestSoftHSMContract(t *testing.T) {
	kmstest.Run(t, func(t *testing.T) kmstest.Subject { return newToken(t).subject(t) })
}

func TestSoftHSMContractTokenObjects(t *testing.T) {
	f := false
	kmstest.Run(t, func(t *testing.T) kmstest.Subject {
		return newToken(t, func(c *Config) { c.SessionKeyCopies = &f }).subject(t)
	})
}

// The token disappears under the running wrapper (an HSM outage) and comes back: calls fail with
// ErrUnavailable, never panic, and the wrapper recovers by itself.
func TestOutageAndRecovery(t *testing.T) {
	for _, copies := range []bool{true, false} {
		t.Run(map[bool]string{true: "session copies", false: "token objects"}[copies], func(t *testing.T) {
			tk := newToken(t, func(c *Config) { c.SessionKeyCopies = &copies })
			ctx := context.Background()
			pt := []byte("0123456789abcdef0123456789abcdef")
			ct, id, err := tk.w.Wrap(ctx, pt)
			if err != nil {
				t.Fatal(err)
			}
			if err := tk.hsm.HideToken(); err != nil {
				t.Fatal(err)
			}
			if err := tk.w.Health(ctx); !errors.Is(err, fault.ErrUnavailable) {
				t.Fatalf("Health with the token gone: %v, want ErrUnavailable", err)
			}
			if _, _, err := tk.w.Wrap(ctx, pt); !errors.Is(err, fault.ErrUnavailable) {
				t.Fatalf("Wrap with the token gone: %v, want ErrUnavailable", err)
			}
			if _, err := tk.w.Unwrap(ctx, ct, id); !errors.Is(err, fault.ErrUnavailable) {
				t.Fatalf("Unwrap with the token gone: %v, want ErrUnavailable", err)
			}
			if tk.w.Reason() == "" {
				t.Fatal("no reason while unavailable")
			}
			if err := tk.hsm.ShowToken(); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(30 * time.Second)
			for tk.w.Health(ctx) != nil {
				if time.Now().After(deadline) {
					t.Fatalf("not recovered: %s", tk.w.Reason())
				}
				time.Sleep(50 * time.Millisecond)
			}
			if tk.w.Recoveries() != 1 {
				t.Fatalf("recoveries = %d, want 1", tk.w.Recoveries())
			}
			got, err := tk.w.Unwrap(ctx, ct, id)
			if err != nil || string(got) != string(pt) {
				t.Fatalf("old ciphertext after recovery: %v", err)
			}
			if cur, _ := tk.w.KeyID(ctx); cur != id {
				t.Fatalf("key ID changed across recovery: %s -> %s", id, cur)
			}
		})
	}
}

func TestBadPINAndMissingToken(t *testing.T) {
	h := harness.SoftHSMT(t, "keyward")
	cfg := Config{Module: h.Module, TokenLabel: h.TokenLabel, PINFile: h.PINFile, KeyLabel: "kek"}
	_, err := New(cfg, "wrong-pin-canary", zaptest.NewLogger(t))
	if err == nil || strings.Contains(err.Error(), "wrong-pin-canary") {
		t.Fatalf("bad PIN: %v (the PIN must never be in the error)", err)
	}
	cfg.TokenLabel = "nope"
	if _, err := New(cfg, h.UserPIN, zaptest.NewLogger(t)); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("missing token: %v", err)
	}
}

func TestKeyWithoutGenerationIsUnavailable(t *testing.T) {
	h := harness.SoftHSMT(t, "keyward")
	cfg := Config{Module: h.Module, TokenLabel: h.TokenLabel, PINFile: h.PINFile, KeyLabel: "kek"}
	w, err := New(cfg, h.UserPIN, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, _, err := w.Wrap(context.Background(), []byte("x")); !errors.Is(err, fault.ErrUnavailable) || !strings.Contains(err.Error(), "keywardctl kms keys create") {
		t.Fatalf("no key: %v", err)
	}
}

func TestAdminGenerations(t *testing.T) {
	tk := newToken(t)
	tk.admin(t, func(a *Admin) error {
		if _, err := a.Create(); err == nil {
			t.Error("Create succeeded twice")
		}
		g2, err := a.Rotate()
		if err != nil {
			return err
		}
		gens, err := a.List()
		if err != nil {
			return err
		}
		if len(gens) != 2 || gens[1].KeyID != g2.KeyID || gens[1].Generation != 2 || !gens[0].Usable {
			t.Errorf("generations = %+v", gens)
		}
		if err := a.Retire(g2.KeyID); err == nil {
			t.Error("retired the newest generation")
		}
		if err := a.Retire("kek.9.0000"); err == nil {
			t.Error("retired an unknown key")
		}
		return a.Retire(gens[0].KeyID)
	})
}
