package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

// Outages under load (issue 12, section 7). While a component is down, kubelet keeps republishing
// the running pods' volumes and new pods keep arriving; these tests do the same, from many
// goroutines at once, and count what a pod would notice.

const (
	// outageRunning is how many pods hold a published volume before the first outage.
	outageRunning = 12
	// outageNew is how many new pods ask for a volume during each outage.
	outageNew = 4
	// republishEvery is each running pod's republish period here (kubelet's is longer; this is load).
	republishEvery = 300 * time.Millisecond
	// recoveryDeadline bounds how long service may take to resume after a component is back: generous,
	// for 2 noisy cores; the measured figures are logged.
	recoveryDeadline = 60 * time.Second
)

// loadPod is a pod with its CSI volume's target and the token kubelet holds for it (minted once, as
// kubelet's token manager caches it: kubelet needs no apiserver to republish).
type loadPod struct {
	pod    *corev1.Pod
	target string
	token  string
}

// publishCall is one NodePublishVolume made for a pod, and its outcome.
type publishCall struct {
	pod        *loadPod
	republish  bool
	start, end time.Time
	err        error
}

// outageLoad runs a driver under load: every running pod's volume is republished in a loop and a
// watcher reads every running pod's files throughout; new pods are published during each outage.
type outageLoad struct {
	e *brokerEnv
	d *driver

	mu      sync.Mutex
	running []*loadPod
	calls   []publishCall
	wiped   map[string]string // pod UID -> the pod and what was found instead of its files
	reads   int               // the watcher's reads of a running pod's files

	stop chan struct{}
	wg   sync.WaitGroup
}

// The files of running pods survive Vault going down (and coming back empty) and the apiserver
// restarting, while their volumes are republished in loops and new pods arrive: no volume is lost or
// wiped, every new publish during the outage fails Unavailable naming the cause (and no secret) and
// is audited, every republish either succeeds or fails Unavailable, and service resumes by itself
// once the component is back.
func TestOutagesKeepRunningPodsFiles(t *testing.T) {
	e := newBrokerEnv(t)
	l := &outageLoad{e: e, d: startDriver(t, e, driverOptions{config: "refusalAuditBurst: 1000\n"}), wiped: map[string]string{}, stop: make(chan struct{})}
	t.Cleanup(l.halt) // registered after the driver's: the loops end before the driver, Vault and the apiserver stop
	runSteps(t,
		step{"publish the running pods", l.publishRunning},
		step{"Vault stopped, then back (empty, provisioned again)", func(t *testing.T) {
			l.outage(t, "vault", "vault", func(t *testing.T) { e.vault.Stop() }, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				if err := e.vault.Restart(ctx); err != nil {
					t.Fatal(err)
				}
				provisionVault(t, e.vault, e.kube)
			})
		}},
		step{"kube-apiserver stopped, then started", func(t *testing.T) {
			l.outage(t, "kube-apiserver", "token review", func(t *testing.T) { e.kube.Stop() }, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				if err := e.kube.Start(ctx); err != nil {
					t.Fatal(err)
				}
			})
		}},
		step{"every answer was OK or Unavailable, and every refusal is audited", l.audited},
	)
}

// newLoadPod creates a pod in payments-prod on node-1 and mints kubelet's token for it.
func (l *outageLoad) newLoadPod(t *testing.T, name string) *loadPod {
	t.Helper()
	pod := l.e.newPod(t, "payments-prod", name)
	tok, err := l.e.kube.PodToken(context.Background(), pod, []string{audience}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &loadPod{pod: pod, target: l.d.kl.target(t, pod), token: tok}
}

// publish publishes p's volume as kubelet does (a republish if it is published) and records the
// outcome. Safe from any goroutine.
func (l *outageLoad) publish(t *testing.T, p *loadPod, republish bool) error {
	start := time.Now()
	err := l.d.kl.publishWith(t, p.pod, p.token, csiSecrets, "")
	l.mu.Lock()
	l.calls = append(l.calls, publishCall{pod: p, republish: republish, start: start, end: time.Now(), err: err})
	l.mu.Unlock()
	return err
}

// intact says what is wrong with p's files, if anything: they must be exactly what was published.
func intact(p *loadPod) error {
	files, err := tmpfs.Read(p.target)
	if err != nil {
		return fmt.Errorf("volume lost: %v", err)
	}
	got := map[string]string{}
	for _, f := range files {
		got[f.Name] = string(f.Data)
	}
	if len(got) != 2 || got["db-password"] != prodCanary || got["ca.crt"] != "ca-pem" {
		names := make([]string, 0, len(got))
		for n := range got {
			names = append(names, n)
		}
		return fmt.Errorf("files wiped or changed: %d files %v", len(files), names)
	}
	return nil
}

// run starts kubelet's republish loop for p and makes it a running pod the watcher checks.
func (l *outageLoad) run(t *testing.T, p *loadPod) {
	l.mu.Lock()
	l.running = append(l.running, p)
	l.mu.Unlock()
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(republishEvery):
			}
			l.publish(t, p, true)
		}
	}()
}

// watch reads every running pod's files until the load stops, noting each volume found lost or
// wiped: a wipe mended by a later republish is still counted.
func (l *outageLoad) watch() {
	defer l.wg.Done()
	for {
		select {
		case <-l.stop:
			return
		case <-time.After(250 * time.Millisecond):
		}
		for _, p := range l.runningPods() {
			err := intact(p)
			l.mu.Lock()
			l.reads++
			l.noteWiped(p, err)
			l.mu.Unlock()
		}
	}
}

// noteWiped notes the first thing found wrong with p's files (err), if any. Callers hold l.mu.
func (l *outageLoad) noteWiped(p *loadPod, err error) {
	if err != nil && l.wiped[string(p.pod.UID)] == "" {
		l.wiped[string(p.pod.UID)] = p.pod.Name + ": " + err.Error()
	}
}

func (l *outageLoad) runningPods() []*loadPod {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.running)
}

// halt stops the loops and the watcher and waits for them. Safe to call twice.
func (l *outageLoad) halt() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// publishRunning publishes the running pods' volumes and starts their republish loops and the
// watcher.
func (l *outageLoad) publishRunning(t *testing.T) {
	for i := range outageRunning {
		p := l.newLoadPod(t, fmt.Sprintf("run-%d", i))
		if err := l.publish(t, p, false); err != nil {
			t.Fatalf("publishing %s: %v", p.pod.Name, err)
		}
		if err := intact(p); err != nil {
			t.Fatalf("%s: %v", p.pod.Name, err)
		}
		l.run(t, p)
	}
	l.wg.Add(1)
	go l.watch()
}

// wipedCount is how many running volumes the watcher or a direct check found lost or wiped.
func (l *outageLoad) wipedCount(t *testing.T) int {
	t.Helper()
	for _, p := range l.runningPods() {
		err := intact(p)
		l.mu.Lock()
		l.noteWiped(p, err)
		l.mu.Unlock()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, why := range l.wiped {
		t.Errorf("pod %s", why)
	}
	return len(l.wiped)
}

// callsSince is the calls that started at or after from (republishes or new publishes).
func (l *outageLoad) callsSince(from time.Time, republish bool) []publishCall {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []publishCall
	for _, c := range l.calls {
		if c.republish == republish && !c.start.Before(from) {
			out = append(out, c)
		}
	}
	return out
}

// secretsIn says which secret value or token, if any, the message of a refusal of p shows.
func (l *outageLoad) secretsIn(msg string, p *loadPod) string {
	if strings.Contains(msg, p.token) {
		return "the pod's token"
	}
	for name, s := range map[string]string{"the prod canary": prodCanary, "the CA": "ca-pem", "Vault's root token": l.e.vault.RootToken, "a JWT": "eyJ"} {
		if strings.Contains(msg, s) {
			return name
		}
	}
	for _, other := range l.runningPods() {
		if strings.Contains(msg, other.token) {
			return "a running pod's token"
		}
	}
	return ""
}

// outage takes the component name down with down while the loops run, publishes new pods (each must
// fail Unavailable, naming cause), checks that no running volume lost its files, brings the component
// back with up and measures how soon service resumes.
func (l *outageLoad) outage(t *testing.T, name, cause string, down, up func(*testing.T)) {
	fresh := make([]*loadPod, outageNew)
	for i := range fresh { // created before the outage: the apiserver may be what goes down
		fresh[i] = l.newLoadPod(t, fmt.Sprintf("%s-new-%d", name, i))
	}
	runningBefore := len(l.runningPods())
	down(t)
	downAt := time.Now()

	// New pods arrive, several at once, a few times over (kubelet retries).
	for range 3 {
		var wg sync.WaitGroup
		for _, p := range fresh {
			wg.Add(1)
			go func() { defer wg.Done(); l.publish(t, p, false) }()
		}
		wg.Wait()
		time.Sleep(republishEvery)
	}
	newCalls := l.callsSince(downAt, false)
	if len(newCalls) != 3*outageNew {
		t.Fatalf("%d new publishes recorded, want %d", len(newCalls), 3*outageNew)
	}
	for _, c := range newCalls {
		msg := status.Convert(c.err).Message()
		if status.Code(c.err) != codes.Unavailable || !strings.Contains(strings.ToLower(msg), cause) {
			t.Errorf("new publish of %s during the outage: %v; want Unavailable naming %q", c.pod.pod.Name, c.err, cause)
		}
		if s := l.secretsIn(msg, c.pod); s != "" {
			t.Errorf("new publish of %s: the message shows %s", c.pod.pod.Name, s)
		}
	}
	for _, p := range fresh {
		if _, err := os.Stat(p.target); !os.IsNotExist(err) {
			t.Errorf("a refused new publish of %s left its target behind: %v", p.pod.Name, err)
		}
	}
	// The running pods' republishes meet the outage too (each pod at least once).
	eventually(t, 30*time.Second, "every running pod's republish refused during the outage", func() error {
		refused := map[*loadPod]bool{}
		for _, c := range l.callsSince(downAt, true) {
			if c.err != nil { // which code is checked at the end
				refused[c.pod] = true
			}
		}
		if n := len(l.runningPods()); len(refused) < n {
			return fmt.Errorf("%d of %d running pods had a republish refused", len(refused), n)
		}
		return nil
	})
	if n := l.wipedCount(t); n != 0 {
		t.Fatalf("%d of %d running volumes lost or wiped during the outage", n, len(l.runningPods()))
	}

	up(t)
	upAt := time.Now()
	outageFor := upAt.Sub(downAt)
	firstNew := l.resumeNew(t, fresh, upAt)
	first, all := l.resumeRunning(t, upAt)
	if n := l.wipedCount(t); n != 0 {
		t.Fatalf("%d of %d running volumes lost or wiped", n, len(l.runningPods()))
	}
	for _, p := range fresh {
		if err := intact(p); err != nil {
			t.Fatalf("new pod %s after recovery: %v", p.pod.Name, err)
		}
		l.run(t, p)
	}
	during, refusedRepublishes := 0, 0
	for _, c := range l.callsSince(downAt, true) {
		if c.start.Before(upAt) {
			during++
			if c.err != nil {
				refusedRepublishes++
			}
		}
	}
	l.mu.Lock()
	reads := l.reads
	l.mu.Unlock()
	t.Logf("%s outage of %s: %d republishes of %d running volumes during it (%d refused), %d new publishes refused; "+
		"after recovery: first republish ok in %s, every volume republished in %s, first new publish ok in %s; "+
		"volumes lost or wiped: 0 (%d reads of running pods' files so far)",
		name, outageFor.Round(time.Millisecond), during, runningBefore, refusedRepublishes, len(newCalls),
		first.Round(time.Millisecond), all.Round(time.Millisecond), firstNew.Round(time.Millisecond), reads)
}

// resumeNew retries the new pods' publishes, as kubelet does, until each succeeds; it returns how
// long after upAt the first one did.
func (l *outageLoad) resumeNew(t *testing.T, fresh []*loadPod, upAt time.Time) time.Duration {
	t.Helper()
	var first time.Duration
	done := map[*loadPod]bool{}
	eventually(t, recoveryDeadline, "new pods published after recovery", func() error {
		for _, p := range fresh {
			if done[p] {
				continue
			}
			if err := l.publish(t, p, false); err != nil {
				return fmt.Errorf("%s: %w", p.pod.Name, err)
			}
			if len(done) == 0 {
				first = time.Since(upAt)
			}
			done[p] = true
		}
		return nil
	})
	return first
}

// resumeRunning waits until every running pod's volume has been republished since upAt; it returns
// how long after upAt the first and the last of these republishes ended.
func (l *outageLoad) resumeRunning(t *testing.T, upAt time.Time) (first, all time.Duration) {
	t.Helper()
	eventually(t, recoveryDeadline, "every running volume republished after recovery", func() error {
		last := map[*loadPod]time.Time{}
		first, all = 0, 0
		for _, c := range l.callsSince(upAt, true) {
			if c.err != nil {
				continue
			}
			if d := c.end.Sub(upAt); first == 0 || d < first {
				first = d
			}
			if _, ok := last[c.pod]; !ok || c.end.Before(last[c.pod]) {
				last[c.pod] = c.end
			}
		}
		running := l.runningPods()
		for _, p := range running {
			if _, ok := last[p]; !ok {
				return fmt.Errorf("%s not republished yet (%d of %d are)", p.pod.Name, len(last), len(running))
			}
			all = max(all, last[p].Sub(upAt))
		}
		return nil
	})
	return first, all
}

// audited stops the load and checks every answer and the audit stream: every publish and republish
// answered OK or Unavailable; each refusal has its own record (the pod, code Unavailable, the
// reason) and there is no other refusal record for these pods.
func (l *outageLoad) audited(t *testing.T) {
	l.halt()
	if n := l.wipedCount(t); n != 0 {
		t.Fatalf("%d volumes lost or wiped", n)
	}
	refused := map[string]int{}
	calls := 0
	for _, c := range l.calls {
		calls++
		switch status.Code(c.err) {
		case codes.OK:
		case codes.Unavailable:
			refused[string(c.pod.pod.UID)]++
			if s := l.secretsIn(status.Convert(c.err).Message(), c.pod); s != "" {
				t.Errorf("%s: the refusal's message shows %s", c.pod.pod.Name, s)
			}
		default:
			t.Errorf("%s (republish %v): %v; want OK or Unavailable", c.pod.pod.Name, c.republish, c.err)
		}
	}
	records := map[string]int{}
	for _, r := range l.d.records(t) {
		if r.Decision == audit.Allowed || r.Subject.PodUID == "" {
			continue
		}
		if r.Code != codes.Unavailable.String() || r.Reason == "" {
			t.Errorf("refusal record of pod %s: code %s, reason %q; want Unavailable with the reason", r.Subject.Pod, r.Code, r.Reason)
		}
		records[r.Subject.PodUID]++
	}
	total := 0
	for uid, n := range refused {
		total += n
		if records[uid] != n {
			t.Errorf("pod %s: %d refusals answered, %d audited", uid, n, records[uid])
		}
	}
	for uid, n := range records {
		if refused[uid] == 0 {
			t.Errorf("pod %s: %d refusal records for no refusal answered", uid, n)
		}
	}
	if total == 0 {
		t.Fatal("no refusal at all: the outages did not happen")
	}
	t.Logf("%d publishes and republishes in all, %d refused Unavailable and audited one by one", calls, total)
	if code, out := ctl(t, nil, "audit", "verify", l.d.auditLog, "--key-file", l.d.key); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
}

// kmsOutage is keyward-kms under kube-apiserver while the HSM is gone: Secrets are read and written
// through the apiserver in loops, and the plugin is called directly.
type kmsOutage struct {
	s *kmsScenario

	mu                         sync.Mutex
	reads, failedReads         int
	writes, failedWrites       int
	written                    []string // Secrets whose creation succeeded
	firstReadErr, lastWriteErr error
}

// With the HSM token gone, kube-apiserver keeps reading existing Secrets (its DEK cache), the plugin
// refuses direct calls with Unavailable naming the HSM and audits each, and once the token is back
// the plugin recovers by itself: healthz ok, Encrypt works, everything written reads back.
func TestKMSKeepsSecretsReadableThroughHSMOutage(t *testing.T) {
	s := &kmsScenario{p: newKMSPlugin(t)}
	s.etcd = harness.EtcdT(t)
	s.kube = harness.KubeT(t, harness.KubeOptions{Etcd: s.etcd, EncryptionConfig: encryptionConfig(t, s.p.dir, s.p.socket)})
	o := &kmsOutage{s: s}
	runSteps(t,
		step{"Secrets are encrypted under the HSM's key", func(t *testing.T) {
			st, err := s.p.status(t)
			if err != nil {
				t.Fatal(err)
			}
			s.key1 = st.KeyId
			s.encrypted(t)
		}},
		step{"the HSM token hidden under load, then shown", o.hsmGone},
		step{"the audit verifies and holds no secret", s.audit},
	)
}

// load reads the existing Secrets and writes new ones through the apiserver until stop closes.
func (o *kmsOutage) load(stop <-chan struct{}, wg *sync.WaitGroup) {
	ctx := context.Background()
	for r := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := r; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				sec, err := o.s.secrets().Get(ctx, fmt.Sprintf("db-%d", i%5), metav1.GetOptions{})
				if err == nil && string(sec.Data["password"]) != fmt.Sprintf("%s-%d", secretCanary, i%5) {
					err = fmt.Errorf("db-%d reads back another value", i%5)
				}
				o.mu.Lock()
				o.reads++
				if err != nil {
					o.failedReads++
					if o.firstReadErr == nil {
						o.firstReadErr = err
					}
				}
				o.mu.Unlock()
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			name := fmt.Sprintf("outage-%d", i)
			_, err := o.s.secrets().Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name},
				StringData: map[string]string{"password": secretCanary + "-" + name}}, metav1.CreateOptions{})
			o.mu.Lock()
			o.writes++
			if err != nil {
				o.failedWrites++
				o.lastWriteErr = err
			} else {
				o.written = append(o.written, name)
			}
			o.mu.Unlock()
		}
	}()
}

func (o *kmsOutage) hsmGone(t *testing.T) {
	p := o.s.p
	call := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 3*time.Second)
	}
	ctx, cancel := call()
	before, err := p.client.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: "outage-before", Plaintext: make([]byte, 32)})
	cancel()
	if err != nil {
		t.Fatalf("Encrypt before the outage: %v", err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	halt := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(halt)
	o.load(stop, &wg)

	time.Sleep(500 * time.Millisecond) // the load runs before the outage too
	o.mu.Lock()
	readsBefore, failedReadsBefore, writesBefore, failedWritesBefore := o.reads, o.failedReads, o.writes, o.failedWrites
	o.mu.Unlock()
	if err := p.hsm.HideToken(); err != nil {
		t.Fatal(err)
	}
	hiddenAt := time.Now()
	p.waitHealthz(t, "", 15*time.Second)
	detected := time.Since(hiddenAt)

	// Direct calls on the plugin's socket: each refused Unavailable, naming the HSM, and audited.
	var uids []string
	for i := range 5 {
		uid := fmt.Sprintf("outage-encrypt-%d", i)
		uids = append(uids, uid)
		ctx, cancel := call()
		_, err := p.client.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: uid, Plaintext: make([]byte, 32)})
		cancel()
		if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "HSM") {
			t.Errorf("Encrypt with the HSM gone: %v; want Unavailable naming the HSM", err)
		}
		if strings.Contains(fmt.Sprint(err), p.hsm.UserPIN) {
			t.Error("the refusal shows the PIN")
		}
		time.Sleep(300 * time.Millisecond)
	}
	ctx, cancel = call()
	_, err = p.client.Decrypt(ctx, &kmsapi.DecryptRequest{Uid: "outage-decrypt", Ciphertext: before.Ciphertext, KeyId: before.KeyId, Annotations: before.Annotations})
	cancel()
	if status.Code(err) != codes.Unavailable {
		t.Errorf("Decrypt with the HSM gone: %v; want Unavailable", err)
	}
	// The outage lasts a while under load (a real one lasts longer; the apiserver's cache holds for
	// minutes).
	time.Sleep(3 * time.Second)
	o.mu.Lock()
	outageReads, outageFailedReads, outageWrites, outageFailedWrites := o.reads-readsBefore, o.failedReads-failedReadsBefore,
		o.writes-writesBefore, o.failedWrites-failedWritesBefore
	o.mu.Unlock()

	if err := p.hsm.ShowToken(); err != nil {
		t.Fatal(err)
	}
	shownAt := time.Now()
	p.waitHealthz(t, "ok", recoveryDeadline)
	healthy := time.Since(shownAt)
	var encrypted time.Duration
	eventually(t, recoveryDeadline, "Encrypt after the token is back", func() error {
		ctx, cancel := call()
		defer cancel()
		_, err := p.client.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: "outage-after", Plaintext: make([]byte, 32)})
		encrypted = time.Since(shownAt)
		return err
	})
	time.Sleep(time.Second) // some load after recovery too
	halt()

	o.mu.Lock()
	defer o.mu.Unlock()
	t.Logf("HSM outage: detected (healthz not ok) in %s; during it %d reads (%d failed), %d writes (%d failed, last error: %v); "+
		"after the token is back: healthz ok in %s, first Encrypt ok in %s; in all %d reads (%d failed), %d writes (%d failed)",
		detected.Round(time.Millisecond), outageReads, outageFailedReads, outageWrites, outageFailedWrites, o.lastWriteErr,
		healthy.Round(time.Millisecond), encrypted.Round(time.Millisecond), o.reads, o.failedReads, o.writes, o.failedWrites)
	if o.failedReads != 0 {
		t.Errorf("%d of %d reads of existing Secrets failed (first: %v)", o.failedReads, o.reads, o.firstReadErr)
	}
	if outageReads == 0 {
		t.Error("no read during the outage")
	}
	// After recovery the apiserver writes, and everything written (during the outage too) reads back.
	if _, err := o.s.secrets().Create(context.Background(), &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "after-outage"},
		StringData: map[string]string{"password": secretCanary}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("write after recovery: %v", err)
	}
	for _, name := range o.written {
		sec, err := o.s.secrets().Get(context.Background(), name, metav1.GetOptions{})
		if err != nil || string(sec.Data["password"]) != secretCanary+"-"+name {
			t.Errorf("%s does not read back: %v", name, err)
		}
	}
	o.s.readAll(t)

	byUID := map[string]audit.Record{}
	recs, err := audit.QueryPath(p.auditLog, audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if strings.HasPrefix(r.RequestID, "outage-") {
			byUID[r.RequestID] = r
		}
	}
	for _, uid := range uids {
		if r, ok := byUID[uid]; !ok || r.Type != audit.EventKMSEncrypt || r.Code != codes.Unavailable.String() || r.Decision == audit.Allowed {
			t.Errorf("audit record of %s: %+v; want a kms_encrypt refusal with code Unavailable", uid, r)
		}
	}
	if r := byUID["outage-decrypt"]; r.Type != audit.EventKMSDecrypt || r.Code != codes.Unavailable.String() {
		t.Errorf("audit record of the Decrypt with the HSM gone: %+v", r)
	}
	if r := byUID["outage-after"]; r.Decision != audit.Allowed {
		t.Errorf("audit record of the Encrypt after recovery: %+v", r)
	}
}
