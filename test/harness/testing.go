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
	return startT(tb, "etcd", StartEtcd)
}

// KubeT starts etcd and kube-apiserver for this test.
func KubeT(tb testing.TB, opts KubeOptions) *KubeAPIServer {
	tb.Helper()
	if opts.Etcd == nil {
		opts.Etcd = EtcdT(tb)
	}
	return startT(tb, "kube", func(ctx context.Context, dir string) (*KubeAPIServer, error) {
		return StartKubeAPIServer(ctx, dir, opts)
	})
}

// NodeT starts a real node (StartNode) for this test, registered with opts.Kube, and stops it when the
// test ends.
func NodeT(tb testing.TB, opts NodeOptions) *Node {
	tb.Helper()
	// Another package's node may hold the machine's node lock (go test runs packages in parallel):
	// waiting for it does not count against the start (StartNode bounds the start after the lock).
	ctx, cancel := context.WithTimeout(context.Background(), NodeLockWait+NodeStartTimeout)
	defer cancel()
	n, err := StartNode(ctx, sub(tb, "node"), opts)
	Check(tb, err)
	tb.Cleanup(n.Stop)
	return n
}

// VaultT starts a Vault dev server for this test.
func VaultT(tb testing.TB) *Vault {
	tb.Helper()
	return startT(tb, "vault", StartVault)
}

// startT starts one component in its own directory within StartTimeout and stops it when the test
// ends.
func startT[C interface{ Stop() }](tb testing.TB, name string, start func(context.Context, string) (C, error)) C {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	c, err := start(ctx, sub(tb, name))
	Check(tb, err)
	tb.Cleanup(c.Stop)
	return c
}

// Within runs fn and fails the test if fn fails or has not returned after d, saying stalled: for
// proving that something a hostile pod holds (a lease, a lock) cannot stall the driver. On a
// timeout fn's goroutine is left behind; the test has failed.
func Within(tb testing.TB, d time.Duration, stalled string, fn func() error) {
	tb.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		Check(tb, err)
	case <-time.After(d):
		tb.Fatal(stalled)
	}
}
