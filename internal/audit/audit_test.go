package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/internal/fault"
)

func newKeyB(b *testing.B, dir string) string {
	p := filepath.Join(dir, "audit.key")
	if err := os.WriteFile(p, bytes.Repeat([]byte("k"), 40), 0o600); err != nil {
		b.Fatal(err)
	}
	return p
}

func newKey(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "audit.key")
	if err := os.WriteFile(p, bytes.Repeat([]byte("k"), 40), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func event(i int) Event {
	return Event{
		RequestID: fmt.Sprintf("req-%d", i),
		Type:      EventKMSEncrypt,
		Decision:  Allowed,
		Reason:    "ok",
		Subject:   Subject{Namespace: "payments", ServiceAccount: "api", Pod: "api-0", PodUID: "u1", Node: "n1"},
		Object:    Object{Environment: "prod", Ref: "payments/db", Key: "password", Version: 3, KeyID: "kek.1.abcd"},
		Code:      "OK",
		LatencyMS: Millis(1500 * time.Microsecond),
	}
}

// newOptions is a stream of node-a's KMS in a fresh directory.
func newOptions(t *testing.T) Options {
	t.Helper()
	dir := t.TempDir()
	return Options{Dir: filepath.Join(dir, "kms-audit"), KeyFile: newKey(t, dir), Node: "node-a", Stream: "kms"}
}

func verifyOpts(t *testing.T, o Options) VerifyOptions {
	t.Helper()
	key, err := ReadKey(o.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	return VerifyOptions{Key: key, Node: o.Node, Stream: o.Stream}
}

// segmentPaths are the stream's segment files, oldest first.
func segmentPaths(t *testing.T, dir string) []string {
	t.Helper()
	names, err := listSegments(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range names {
		names[i] = filepath.Join(dir, n)
	}
	return names
}

// streamText is every segment's content, in order.
func streamText(t *testing.T, dir string) string {
	var b strings.Builder
	for _, p := range segmentPaths(t, dir) {
		b.WriteString(readFile(t, p))
	}
	return b.String()
}

func writeN(t *testing.T, opts Options, n int) {
	t.Helper()
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := l.Record(context.Background(), event(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}

// Outcome is the one place decision, code and reason are filled from an error: refusals are "deny",
// failures "error", and a reason quoting a caller's input is bounded.
func TestOutcome(t *testing.T) {
	for _, tc := range []struct {
		err      error
		decision Decision
		code     string
	}{
		{nil, Allowed, "OK"},
		{fmt.Errorf("no grant: %w", fault.ErrDenied), Denied, "PermissionDenied"},
		{fmt.Errorf("bad token: %w", fault.ErrUnauthenticated), Denied, "Unauthenticated"},
		{fmt.Errorf("bad ref: %w", fault.ErrInvalid), Denied, "InvalidArgument"},
		{fmt.Errorf("too big: %w", fault.ErrTooLarge), Denied, "ResourceExhausted"},
		{fmt.Errorf("vault down: %w", fault.ErrUnavailable), Failed, "Unavailable"},
		{errors.New("unclassified"), Failed, "Internal"},
	} {
		var ev Event
		ev.Outcome(tc.err)
		if ev.Decision != tc.decision || ev.Code != tc.code {
			t.Errorf("Outcome(%v) = %s/%s, want %s/%s", tc.err, ev.Decision, ev.Code, tc.decision, tc.code)
		}
		if tc.err != nil && ev.Reason != tc.err.Error() {
			t.Errorf("Outcome(%v) reason %q", tc.err, ev.Reason)
		}
	}
	var ev Event
	ev.Outcome(fmt.Errorf("ref %q: %w", strings.Repeat("x", 10000), fault.ErrInvalid))
	if len(ev.Reason) != MaxReason+len("...") || !strings.HasSuffix(ev.Reason, "...") {
		t.Errorf("reason of %d bytes, want %d ending in ...", len(ev.Reason), MaxReason+3)
	}
}

func TestRecordsVerifyAndChainAcrossRestarts(t *testing.T) {
	opts := newOptions(t)
	writeN(t, opts, 3)
	opts.SyncInterval = 10 * time.Millisecond
	writeN(t, opts, 2) // a restarted process continues the same chain
	rep, err := VerifyDir(opts.Dir, verifyOpts(t, opts))
	if err != nil || rep.Records != 7 || rep.Node != "node-a" || rep.Stream != "kms" {
		t.Fatalf("verify: %+v, %v (want genesis, 3 records, a start record, 2 records)", rep, err)
	}
	paths := segmentPaths(t, opts.Dir)
	for p, want := range map[string]os.FileMode{paths[0]: 0o600, opts.Dir: 0o700} {
		if st, err := os.Stat(p); err != nil || st.Mode().Perm() != want {
			t.Fatalf("%s: %v, %v; want mode %v", p, st, err, want)
		}
	}
	lines := strings.Split(strings.TrimSpace(streamText(t, opts.Dir)), "\n")
	for i, want := range []string{`"event":"audit_genesis"`, `"event":"kms_encrypt"`, "", "", `"event":"audit_start"`} {
		if !strings.Contains(lines[i], want) {
			t.Errorf("line %d lacks %s: %s", i+1, want, lines[i])
		}
	}
	for _, want := range []string{`"seq":6`, `"decision":"allow"`, `"namespace":"payments"`,
		`"key_id":"kek.1.abcd"`, `"latency_ms":1.5`, `"request_id":"req-0"`, `"code":"OK"`} {
		if !strings.Contains(lines[5], want) {
			t.Errorf("record lacks %s: %s", want, lines[5])
		}
	}
}

func TestVerifyDetectsTampering(t *testing.T) {
	opts := newOptions(t)
	writeN(t, opts, 4)
	orig := strings.SplitAfter(streamText(t, opts.Dir), "\n")
	orig = orig[:len(orig)-1] // trailing ""
	for _, tc := range []struct {
		name, problem string
		edit          func([]string) []string
	}{
		{"modified", "record 3 was modified", func(l []string) []string {
			l[2] = strings.Replace(l[2], `"decision":"allow"`, `"decision":"deny"`, 1)
			return l
		}},
		{"deleted", "records 3..3 are missing", func(l []string) []string { return append(l[:2:2], l[3:]...) }},
		{"reordered", "records 3..3 are missing", func(l []string) []string { l[2], l[3] = l[3], l[2]; return l }},
		{"duplicated", "record 3 is out of order or repeated", func(l []string) []string {
			return append(append(l[:3:3], l[2]), l[3:]...)
		}},
		{"mac removed", "no mac", func(l []string) []string { l[3] = strings.SplitN(l[3], `,"mac"`, 2)[0] + "}\n"; return l }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines := tc.edit(append([]string(nil), orig...))
			o := opts
			o.Dir = t.TempDir()
			if err := os.WriteFile(filepath.Join(o.Dir, segmentName(1)), []byte(strings.Join(lines, "")), 0o600); err != nil {
				t.Fatal(err)
			}
			rep, err := VerifyDir(o.Dir, verifyOpts(t, o))
			if !errors.Is(err, ErrTampered) || !strings.Contains(rep.Problem, tc.problem) {
				t.Fatalf("got %q, %v; want problem %q", rep.Problem, err, tc.problem)
			}
			// A process must refuse to extend a broken chain.
			if _, err := Open(o); err == nil {
				t.Fatal("Open accepted a tampered log")
			}
		})
	}
	// Another key does not verify an honest log.
	vo := verifyOpts(t, opts)
	vo.Key = bytes.Repeat([]byte("x"), 40)
	if _, err := VerifyDir(opts.Dir, vo); !errors.Is(err, ErrTampered) {
		t.Fatalf("verify with another key: %v", err)
	}
}

func TestFailsClosedWhenTheRecordCannotBeWritten(t *testing.T) {
	l, err := Open(newOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	l.out.Close() // the disk went away under the log
	if err := l.Record(context.Background(), event(1)); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("Record on a dead file: %v, want ErrUnavailable", err)
	}
	if n := l.WriteFailures(); n != 1 {
		t.Fatalf("%d write failures counted, want 1", n)
	}
}

func TestShortKeyRefused(t *testing.T) {
	opts := newOptions(t)
	os.WriteFile(opts.KeyFile, []byte("short"), 0o600)
	if _, err := Open(opts); err == nil || strings.Contains(err.Error(), "short") {
		t.Fatalf("short key: %v (the error must not echo the key)", err)
	}
}

// readFile is the file's content ("" if it cannot be read: the assertions then fail).
func readFile(_ *testing.T, p string) string { b, _ := os.ReadFile(p); return string(b) }

func TestQuery(t *testing.T) {
	opts := newOptions(t)
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	old := event(1)
	old.Time = time.Now().Add(-2 * time.Hour)
	deny := event(2)
	deny.Decision, deny.Type, deny.Subject.Namespace = Denied, EventMount, "billing"
	for _, ev := range []Event{old, deny, event(3)} {
		if err := l.Record(context.Background(), ev); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	count := func(f Filter) int {
		recs, err := QueryPath(opts.Dir, f)
		if err != nil {
			t.Fatal(err)
		}
		return len(recs)
	}
	for _, tc := range []struct {
		f    Filter
		want int
	}{
		{Filter{}, 4}, // and the genesis
		{Filter{Decision: "deny"}, 1},
		{Filter{Namespace: "billing", Event: "mount"}, 1},
		{Filter{Namespace: "payments"}, 2},
		{Filter{Since: time.Now().Add(-time.Hour)}, 3},
		{Filter{Event: "unmount"}, 0},
	} {
		if got := count(tc.f); got != tc.want {
			t.Errorf("%+v: %d records, want %d", tc.f, got, tc.want)
		}
	}
}

// faultyFile is a segment file that fails on demand: a write that reaches the file half way (a
// full disk), a failing truncate, a failing fsync (and how many writes retried data).
type faultyFile struct {
	appender
	mu                           sync.Mutex
	fail, truncateFail, failFull bool
	syncFails                    int
	rewrites                     int
	writes                       map[int64]bool
}

func (w *faultyFile) Truncate(size int64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.truncateFail {
		return errors.New("input/output error")
	}
	return w.appender.Truncate(size)
}

func (w *faultyFile) WriteAt(b []byte, off int64) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.failFull {
		return 0, errors.New("no space left on device")
	}
	if w.fail {
		n, _ := w.appender.WriteAt(b[:len(b)/2], off)
		return n, errors.New("no space left on device")
	}
	if w.writes == nil {
		w.writes = map[int64]bool{}
	}
	if w.writes[off] {
		w.rewrites++
	}
	w.writes[off] = true
	return w.appender.WriteAt(b, off)
}

func (w *faultyFile) Sync() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.syncFails > 0 {
		w.syncFails--
		return errors.New("input/output error")
	}
	return w.appender.Sync()
}

func (w *faultyFile) set(f func(*faultyFile)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	f(w)
}

// withFaults opens the stream with every segment file wrapped in w.
func withFaults(t *testing.T, opts Options, w *faultyFile) *Log {
	t.Helper()
	opts.wrap = func(a appender) appender { w.appender = a; return w }
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestFailedWriteLeavesNoPartialRecordAndTheChainContinues(t *testing.T) {
	for _, every := range []time.Duration{0, time.Hour} {
		t.Run(fmt.Sprintf("sync=%s", every), func(t *testing.T) {
			opts := newOptions(t)
			opts.SyncInterval = every
			w := &faultyFile{}
			l := withFaults(t, opts, w)
			for i := range 3 {
				if err := l.Record(context.Background(), event(i)); err != nil {
					t.Fatal(err)
				}
			}
			w.set(func(w *faultyFile) { w.fail = true })
			if err := l.Record(context.Background(), event(3)); !errors.Is(err, fault.ErrUnavailable) {
				t.Fatalf("Record on a full disk: %v, want ErrUnavailable", err)
			}
			w.set(func(w *faultyFile) { w.fail = false })
			if n := l.WriteFailures(); n != 1 {
				t.Fatalf("%d write failures counted, want 1", n)
			}
			for i := 4; i < 6; i++ {
				if err := l.Record(context.Background(), event(i)); err != nil {
					t.Fatal(err)
				}
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			rep, err := VerifyDir(opts.Dir, verifyOpts(t, opts))
			if err != nil || rep.Records != 6 {
				t.Fatalf("after a failed write: %+v, %v (want the genesis and 5 verified records, no partial line)", rep, err)
			}
			recs, err := QueryPath(opts.Dir, Filter{Event: string(EventKMSEncrypt)})
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, r := range recs {
				ids = append(ids, r.RequestID)
			}
			if got := strings.Join(ids, ","); got != "req-0,req-1,req-2,req-4,req-5" {
				t.Fatalf("records in the file: %s", got)
			}
		})
	}
}

func TestConcurrentRecordsAreAllWrittenInOneChain(t *testing.T) {
	opts := newOptions(t)
	opts.SyncInterval = time.Hour
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	const workers, each = 16, 200
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				if err := l.Record(context.Background(), event(w*each+i)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	rep, err := VerifyDir(opts.Dir, verifyOpts(t, opts))
	if err != nil || rep.Records != workers*each+1 {
		t.Fatalf("verify: %+v, %v (want %d records and the genesis)", rep, err, workers*each)
	}
	recs, _ := QueryPath(opts.Dir, Filter{Event: string(EventKMSEncrypt)})
	seen := map[string]bool{}
	for _, r := range recs {
		seen[r.RequestID] = true
	}
	if len(seen) != workers*each {
		t.Fatalf("%d distinct records, want %d", len(seen), workers*each)
	}
}

func TestStdoutCopyMatchesTheFile(t *testing.T) {
	opts := newOptions(t)
	var copyOut bytes.Buffer
	opts.Copy = &copyOut
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		if err := l.Record(context.Background(), event(i)); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	if got, want := copyOut.String(), streamText(t, opts.Dir); got != want || want == "" {
		t.Fatalf("stdout copy differs from the file:\n%s\nfile:\n%s", got, want)
	}
}

// A partial record that cannot be cut back leaves the log unusable: later records fail (closed)
// instead of being appended after the broken line.
func TestUncutPartialRecordStopsTheLog(t *testing.T) {
	opts := newOptions(t)
	opts.SyncInterval = time.Hour
	w := &faultyFile{}
	l := withFaults(t, opts, w)
	if err := l.Record(context.Background(), event(0)); err != nil {
		t.Fatal(err)
	}
	w.set(func(w *faultyFile) { w.fail, w.truncateFail = true, true })
	if err := l.Record(context.Background(), event(1)); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("failed write: %v", err)
	}
	w.set(func(w *faultyFile) { w.fail, w.truncateFail = false, false })
	for i := range 3 {
		if err := l.Record(context.Background(), event(2+i)); !errors.Is(err, fault.ErrUnavailable) {
			t.Fatalf("record after an uncut partial write: %v, want ErrUnavailable", err)
		}
	}
	l.Close()
	lines := strings.Split(strings.TrimSpace(streamText(t, opts.Dir)), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines in the file, want the genesis, the good record and the partial one only", len(lines))
	}
}

// Key files are text: a hex key with a trailing newline reads as its 64 characters; 32 raw bytes
// that end in a whitespace byte (as /dev/urandom gives about 4.6% of the time) come out short and are
// refused, with the hint to write hex and without echoing the key.
func TestReadKeyTrimsTextAndRefusesShortKeys(t *testing.T) {
	dir := t.TempDir()
	hexKey := strings.Repeat("ab", 32)
	p := filepath.Join(dir, "hex.key")
	os.WriteFile(p, []byte(hexKey+"\n"), 0o600)
	if k, err := ReadKey(p); err != nil || string(k) != hexKey {
		t.Fatalf("hex key with a newline: %q %v", k, err)
	}
	raw := []byte("CANARYCANARYCANARYCANARYCANARY\x01\n") // 32 bytes, the last one whitespace
	p = filepath.Join(dir, "raw.key")
	os.WriteFile(p, raw, 0o600)
	_, err := ReadKey(p)
	if err == nil || !strings.Contains(err.Error(), "openssl rand -hex 32") || strings.Contains(err.Error(), "CANARY") {
		t.Fatalf("raw 32-byte key ending in whitespace: %v", err)
	}
}
