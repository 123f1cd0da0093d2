package pkcs11

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyward/keyward/internal/config"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/test/harness"
)

// shim is testdata/hsmshim.c built for one test: a PKCS#11 module forwarding to SoftHSM that hangs
// or fails the calls its control files name, or generates the GCM IV itself. It produces the faults
// a real SoftHSM cannot.
type shim struct {
	module     string
	hang, fail string
}

func buildShim(t *testing.T, ownIV bool) *shim {
	t.Helper()
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Fatalf("a C compiler is needed to build the test PKCS#11 shim (cgo needs one too): %v", err)
	}
	hdr, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/miekg/pkcs11").Output()
	if err != nil {
		t.Fatalf("locating miekg/pkcs11's PKCS#11 headers: %v", err)
	}
	dir := harness.Dir(t)
	sh := &shim{module: filepath.Join(dir, "hsmshim.so"), hang: filepath.Join(dir, "hang"), fail: filepath.Join(dir, "fail")}
	out, err := exec.Command(cc, "-shared", "-fPIC", "-O1", "-o", sh.module, "testdata/hsmshim.c",
		"-I", strings.TrimSpace(string(hdr)), "-ldl").CombinedOutput()
	if err != nil {
		t.Fatalf("building the PKCS#11 shim: %v\n%s", err, out)
	}
	t.Setenv("HSMSHIM_MODULE", harness.SoftHSMModule)
	t.Setenv("HSMSHIM_HANG", sh.hang)
	t.Setenv("HSMSHIM_FAIL", sh.fail)
	if ownIV {
		t.Setenv("HSMSHIM_OWN_IV", "1")
	}
	return sh
}

// set makes the shim hang (file sh.hang) or fail (sh.fail) the named PKCS#11 functions; none: stop.
func (sh *shim) set(t *testing.T, file string, functions ...string) {
	t.Helper()
	if len(functions) == 0 {
		if err := os.Remove(file); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		return
	}
	if err := os.WriteFile(file, []byte(strings.Join(functions, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// shimToken is a fresh SoftHSM token seen through the shim, with a short call timeout.
func shimToken(t *testing.T, ownIV bool) (*token, *shim) {
	t.Helper()
	sh := buildShim(t, ownIV)
	tk := newToken(t, func(c *Config) {
		c.Module = sh.module
		c.CallTimeout = config.Duration{Duration: 300 * time.Millisecond}
	})
	// Registered after the wrapper's Close, so it runs first: nothing is left hung or failing.
	t.Cleanup(func() { os.Remove(sh.hang); os.Remove(sh.fail) })
	return tk, sh
}

// within runs f and fails the test if it has not returned after d.
func within[T any](t *testing.T, d time.Duration, what string, f func() T) T {
	t.Helper()
	done := make(chan T, 1)
	go func() { done <- f() }()
	select {
	case v := <-done:
		return v
	case <-time.After(d):
		t.Fatalf("%s has not returned after %s", what, d)
		panic("unreachable")
	}
}

func waitHealthy(t *testing.T, w *Wrapper, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := within(t, 2*time.Second, "Health", func() error { return w.Health(context.Background()) })
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not healthy after %s: %v (reason %q)", d, err, w.Reason())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A health round trip stuck in C_Encrypt returns within the call timeout as Unavailable and starts
// recovery, which completes while the call is still hung; the wrapper serves again, and closes
// cleanly once the call returns.
func TestHungHealthCallStartsRecovery(t *testing.T) {
	tk, sh := shimToken(t, false)
	ctx := context.Background()
	pt := []byte("0123456789abcdef0123456789abcdef")
	ct, id, err := tk.w.Wrap(ctx, pt)
	if err != nil {
		t.Fatal(err)
	}
	sh.set(t, sh.hang, "C_Encrypt")
	start := time.Now()
	err = within(t, 3*time.Second, "Health with C_Encrypt hung", func() error { return tk.w.Health(ctx) })
	if !errors.Is(err, fault.ErrUnavailable) || !strings.Contains(err.Error(), "did not return") {
		t.Fatalf("Health with C_Encrypt hung: %v, want Unavailable saying it did not return", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("Health took %s with a call timeout of 300ms", took)
	}
	// The hung call holds its session and the old incarnation; recovery goes on beside it.
	waitHealthy(t, tk.w, 5*time.Second)
	if n := tk.w.Recoveries(); n != 1 {
		t.Fatalf("recoveries = %d, want 1", n)
	}
	if got, err := tk.w.Unwrap(ctx, ct, id); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("unwrap after recovery beside a hung call: %v", err)
	}
	if err := tk.w.Live(); err != nil {
		t.Fatalf("Live after recovery: %v", err)
	}
	sh.set(t, sh.hang) // the hung call returns
	within(t, 3*time.Second, "Close", func() error { return tk.w.Close() })
}

// A Wrap hung in C_Encrypt does not keep recovery from starting when the HSM is lost meanwhile:
// recovery waits at most the call timeout for it, then rebuilds beside it.
func TestHungCallDoesNotBlockRecovery(t *testing.T) {
	tk, sh := shimToken(t, false)
	ctx := context.Background()
	pt := []byte("0123456789abcdef0123456789abcdef")
	sh.set(t, sh.hang, "C_Encrypt")
	hung := make(chan error, 1)
	go func() { _, _, err := tk.w.Wrap(ctx, pt); hung <- err }()
	time.Sleep(100 * time.Millisecond) // let the Wrap reach the module (nothing to poll: it is stuck in C)
	// The token answers C_GetTokenInfo with CKR_DEVICE_ERROR: Health loses the HSM.
	sh.set(t, sh.fail, "C_GetTokenInfo")
	if err := within(t, 3*time.Second, "Health", func() error { return tk.w.Health(ctx) }); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("Health with the device failing: %v", err)
	}
	sh.set(t, sh.fail)
	waitHealthy(t, tk.w, 5*time.Second)
	if n := tk.w.Recoveries(); n != 1 {
		t.Fatalf("recoveries = %d, want 1", n)
	}
	ct, id, err := tk.w.Wrap(ctx, pt)
	if err != nil {
		t.Fatalf("wrap after recovery: %v", err)
	}
	sh.set(t, sh.hang)
	if err := within(t, 3*time.Second, "the hung Wrap", func() error { return <-hung }); err != nil {
		t.Logf("the hung Wrap returned %v", err)
	}
	if got, err := tk.w.Unwrap(ctx, ct, id); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("unwrap: %v", err)
	}
	within(t, 3*time.Second, "Close", func() error { return tk.w.Close() })
}

// A re-initialization stuck in C_Login makes Live fail (keyward-kms's /livez then gets the process
// restarted) and says so in the reason; Live recovers when the call returns.
func TestStuckRecoveryFailsLive(t *testing.T) {
	tk, sh := shimToken(t, false)
	ctx := context.Background()
	sh.set(t, sh.hang, "C_Login")
	sh.set(t, sh.fail, "C_GetTokenInfo")
	if err := within(t, 3*time.Second, "Health", func() error { return tk.w.Health(ctx) }); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("Health with the device failing: %v", err)
	}
	sh.set(t, sh.fail)
	deadline := time.Now().Add(10 * time.Second)
	for tk.w.Live() == nil {
		if time.Now().After(deadline) {
			t.Fatalf("Live still nil with C_Login hung; reason %q", tk.w.Reason())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := tk.w.Live(); !strings.Contains(err.Error(), "has not returned") {
		t.Errorf("Live: %v", err)
	}
	if r := tk.w.Reason(); !strings.Contains(r, "has not returned") {
		t.Errorf("reason while stuck: %q", r)
	}
	if err := within(t, time.Second, "Health while recovery is stuck", func() error { return tk.w.Health(ctx) }); !errors.Is(err, fault.ErrUnavailable) {
		t.Errorf("Health while recovery is stuck: %v", err)
	}
	sh.set(t, sh.hang)
	waitHealthy(t, tk.w, 5*time.Second)
	if err := tk.w.Live(); err != nil {
		t.Fatalf("Live after recovery: %v", err)
	}
}

// An HSM that generates the GCM IV itself (the shim writes its own into CK_GCM_PARAMS.pIv, as AWS
// CloudHSM does): the ciphertext carries the IV the module used, read back after C_Encrypt, so it
// decrypts; with the IV that was sent it would not.
func TestModuleGeneratedIV(t *testing.T) {
	tk, _ := shimToken(t, true)
	ctx := context.Background()
	if err := tk.w.Health(ctx); err != nil {
		t.Fatalf("Health with a module that generates IVs: %v", err)
	}
	pt := []byte("0123456789abcdef0123456789abcdef")
	for range 3 {
		ct, id, err := tk.w.Wrap(ctx, pt)
		if err != nil {
			t.Fatal(err)
		}
		// The shim's IVs repeat their pattern every 8 bytes (byte i is 0xA5 ^ counter byte i%8 ^ i).
		iv := ct[1:header]
		for j := 0; j < 4; j++ {
			if iv[j]^byte(j) != iv[8+j]^byte(8+j) {
				t.Fatalf("the ciphertext's IV %x is not the one the module generated", iv)
			}
		}
		got, err := tk.w.Unwrap(ctx, ct, id)
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("unwrap of a ciphertext made with the module's IV: %v", err)
		}
	}
}

// SoftHSM uses the IV it is given: what seal reads back from the mechanism parameters is the IV sent.
func TestSoftHSMKeepsTheIVSent(t *testing.T) {
	tk := newToken(t)
	err := tk.w.withSession(context.Background(), "test", func(inc *incarnation, s p11.SessionHandle, ks *keySet) error {
		iv := bytes.Repeat([]byte{7}, ivLen)
		sealed, err := seal(inc.p, s, ks.current.work, ks.current.aad, iv, []byte("probe"))
		if err != nil {
			return err
		}
		if !bytes.Equal(iv, bytes.Repeat([]byte{7}, ivLen)) {
			t.Errorf("SoftHSM reported IV %x, sent 0707...", iv)
		}
		got, err := open(inc.p, s, ks.current.work, ks.current.aad, parsed{version: formatV1, iv: iv, sealed: sealed})
		if err != nil || string(got) != "probe" {
			t.Errorf("open with the IV sent: %q, %v", got, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
