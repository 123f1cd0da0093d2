package plugin_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/kms"
	"github.com/keyward/keyward/kms/kmstest"
	"github.com/keyward/keyward/kms/plugin"
)

// faultyWrapper is a kmstest.Memory whose Health can hang without honouring its context (a PKCS#11
// call that never returns), that reports a Live error, and refused key objects: the faults a real HSM
// cannot be made to produce on demand.
type faultyWrapper struct {
	*kmstest.Memory
	mu       sync.Mutex
	hang     chan struct{} // non-nil: Health blocks until it is closed
	live     error
	refusals []kms.KeyRefusal
}

func (f *faultyWrapper) Health(ctx context.Context) error {
	f.mu.Lock()
	h := f.hang
	f.mu.Unlock()
	if h != nil {
		<-h
	}
	return f.Memory.Health(ctx)
}

func (f *faultyWrapper) Live() error { f.mu.Lock(); defer f.mu.Unlock(); return f.live }

func (f *faultyWrapper) Refusals() []kms.KeyRefusal {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]kms.KeyRefusal(nil), f.refusals...)
}

func (f *faultyWrapper) set(g func(f *faultyWrapper)) { f.mu.Lock(); defer f.mu.Unlock(); g(f) }

func startService(t *testing.T, w kms.KeyWrapper, aud audit.Auditor) *plugin.Service {
	t.Helper()
	svc, err := plugin.NewService(plugin.ServiceOptions{Wrapper: w, Auditor: aud, Logger: zaptest.NewLogger(t),
		HealthInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { svc.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return svc
}

// eventually polls cond every 10ms for at most d.
func eventually(t *testing.T, d time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %v after %s", what, err, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A health round trip that never returns (and ignores its context) does not stop the health loop:
// Healthz says the round trip did not return within one interval, /livez fails once it has been stuck
// for 3 intervals, and both recover when it returns.
func TestHungHealthRoundTrip(t *testing.T) {
	w := &faultyWrapper{Memory: kmstest.NewMemory()}
	svc := startService(t, w, &audit.Memory{})
	eventually(t, 2*time.Second, "healthy", svc.Healthz)
	release := make(chan struct{})
	w.set(func(f *faultyWrapper) { f.hang = release })
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}()
	eventually(t, time.Second, "Healthz naming the hung round trip", func() error {
		if err := svc.Healthz(); err == nil || !strings.Contains(err.Error(), "not returned") && !strings.Contains(err.Error(), "did not return") {
			return errors.New("Healthz = " + errString(err))
		}
		return nil
	})
	eventually(t, time.Second, "Livez failing", func() error {
		if err := svc.Livez(); err == nil {
			return errors.New("Livez = nil")
		}
		return nil
	})
	w.set(func(f *faultyWrapper) { f.hang = nil })
	close(release)
	eventually(t, 2*time.Second, "healthy again", svc.Healthz)
	eventually(t, time.Second, "live again", svc.Livez)
}

// The wrapper's own liveness (kms/pkcs11: recovery stuck in a PKCS#11 call) reaches /livez.
func TestWrapperLivenessReachesLivez(t *testing.T) {
	w := &faultyWrapper{Memory: kmstest.NewMemory()}
	svc := startService(t, w, &audit.Memory{})
	eventually(t, 2*time.Second, "live", svc.Livez)
	w.set(func(f *faultyWrapper) { f.live = errors.New("HSM recovery stuck") })
	if err := svc.Livez(); err == nil || !strings.Contains(err.Error(), "HSM recovery stuck") {
		t.Fatalf("Livez = %v", err)
	}
}

// Each key object the wrapper refuses is audited once, as a refusal that names the key ID and why.
func TestRefusedKeysAreAudited(t *testing.T) {
	w := &faultyWrapper{Memory: kmstest.NewMemory(), refusals: []kms.KeyRefusal{
		{KeyID: "kek.2.aaaa", Label: "kek.2", Reason: "not generated inside the HSM (CKA_LOCAL=false)"}}}
	mem := &audit.Memory{}
	svc := startService(t, w, mem)
	refused := func() []audit.Event {
		var evs []audit.Event
		for _, ev := range mem.Events() {
			if ev.Type == audit.EventKMSKeyRefused {
				evs = append(evs, ev)
			}
		}
		return evs
	}
	eventually(t, 2*time.Second, "the refusal audited", func() error {
		if len(refused()) == 0 {
			return errors.New("no kms_key_refused record")
		}
		return nil
	})
	w.set(func(f *faultyWrapper) {
		f.refusals = append(f.refusals, kms.KeyRefusal{KeyID: "kek.3.bbbb", Label: "kek.3", Reason: "duplicate label: 2 objects are labelled kek.3"})
	})
	svc.CheckHealth(context.Background())
	time.Sleep(200 * time.Millisecond) // several health rounds: still one record per refusal
	evs := refused()
	if len(evs) != 2 {
		t.Fatalf("%d kms_key_refused records, want 2: %+v", len(evs), evs)
	}
	for i, want := range []string{"CKA_LOCAL=false", "duplicate label"} {
		ev := evs[i]
		if ev.Decision != audit.Denied || !strings.Contains(ev.Reason, want) || ev.Object.KeyID != w.refusals[i].KeyID ||
			!strings.Contains(ev.Reason, w.refusals[i].Label) {
			t.Errorf("record %d = %+v", i, ev)
		}
	}
	if err := svc.Healthz(); err != nil {
		t.Errorf("a refused key object made the plugin unhealthy: %v", err)
	}
}

func errString(err error) string {
	if err == nil {
		return "nil"
	}
	return err.Error()
}
