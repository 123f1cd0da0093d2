package harness

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"
)

// StartTimeout bounds how long one component may take to become ready.
const StartTimeout = 60 * time.Second

// AllowSkip reports whether a missing component may skip a test instead of failing it: only when the
// developer sets KEYWARD_ALLOW_SKIP=1, and never in CI.
func AllowSkip() bool {
	return os.Getenv("KEYWARD_ALLOW_SKIP") == "1" && os.Getenv("CI") != "true"
}

// Check fails the test on err; a missing component skips it instead only when AllowSkip.
func Check(tb testing.TB, err error) {
	tb.Helper()
	if err == nil {
		return
	}
	if errors.Is(err, ErrMissing) && AllowSkip() {
		tb.Skip(err)
	}
	tb.Fatal(err)
}

// Dir makes a short temporary directory (see ShortTempDir) removed at the end of the test.
func Dir(tb testing.TB) string {
	tb.Helper()
	d, err := ShortTempDir("kw-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func sub(tb testing.TB, name string) string {
	tb.Helper()
	d := Dir(tb) + "/" + name
	if err := os.MkdirAll(d, 0o700); err != nil {
		tb.Fatal(err)
	}
	return d
}

// SoftHSMT creates a fresh SoftHSM token for this test and points SOFTHSM2_CONF at it for the test's
// duration (so the test must not be parallel).
func SoftHSMT(t *testing.T, label string) *SoftHSM {
	t.Helper()
	h, err := NewSoftHSM(sub(t, "hsm"), label)
	Check(t, err)
	t.Setenv("SOFTHSM2_CONF", h.ConfPath)
	return h
}

// EtcdT starts etcd for this test.
func EtcdT(tb testing.TB) *Etcd {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	e, err := StartEtcd(ctx, sub(tb, "etcd"))
	Check(tb, err)
	tb.Cleanup(e.Stop)
	return e
}

// KubeT starts etcd and kube-apiserver for this test.
func KubeT(tb testing.TB, opts KubeOptions) *KubeAPIServer {
	tb.Helper()
	if opts.Etcd == nil {
		opts.Etcd = EtcdT(tb)
	}
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	k, err := StartKubeAPIServer(ctx, sub(tb, "kube"), opts)
	Check(tb, err)
	tb.Cleanup(k.Stop)
	return k
}

// VaultT starts a Vault dev server for this test.
func VaultT(tb testing.TB) *Vault {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	v, err := StartVault(ctx, sub(tb, "vault"))
	Check(tb, err)
	tb.Cleanup(v.Stop)
	return v
}
