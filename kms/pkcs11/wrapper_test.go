package pkcs11

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

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
		KeyRefreshInterval: kms.Duration{Duration: time.Hour}}
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

func TestOutageProbe(t *testing.T) {
	f := false
	tk := newToken(t, func(c *Config) { c.SessionKeyCopies = &f })
	ctx := context.Background()
	if err := tk.hsm.HideToken(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		_, _, err := tk.w.Wrap(ctx, []byte("0123456789abcdef0123456789abcdef"))
		t.Logf("wrap %d: %v", i, err)
		time.Sleep(300 * time.Millisecond)
	}
	if err := tk.hsm.ShowToken(); err != nil {
		t.Fatal(err)
	}
	var err error
	for i := 0; i < 20; i++ {
		_, _, err = tk.w.Wrap(ctx, []byte("0123456789abcdef0123456789abcdef"))
		if err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("after: %v recoveries %d", err, tk.w.Recoveries())
	_ = errors.Is
}
