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
	dir := t.TempDir()
	opts := Options{Path: filepath.Join(dir, "audit.log"), KeyFile: newKey(t, dir)}
	writeN(t, opts, 3)
	opts.SyncInterval = 10 * time.Millisecond
	writeN(t, opts, 2) // a restarted process continues the same chain
	rep, err := VerifyFile(opts.Path, opts.KeyFile)
	if err != nil || rep.Records != 5 {
		t.Fatalf("verify: %+v, %v", rep, err)
	}
	st, err := os.Stat(opts.Path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", st.Mode().Perm())
	}
	lines := strings.Split(strings.TrimSpace(readFile(t, opts.Path)), "\n")
	for _, want := range []string{`"event":"kms_encrypt"`, `"seq":5`, `"decision":"allow"`, `"namespace":"payments"`,
		`"key_id":"kek.1.abcd"`, `"latency_ms":1.5`, `"request_id":"req-1"`, `"code":"OK"`} {
		if !strings.Contains(lines[4], want) && !strings.Contains(strings.Join(lines, ""), want) {
			t.Errorf("records lack %s: %s", want, lines[4])
		}
	}
}

func TestVerifyDetectsTampering(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Path: filepath.Join(dir, "audit.log"), KeyFile: newKey(t, dir)}
	writeN(t, opts, 4)
	orig := strings.SplitAfter(readFile(t, opts.Path), "\n")
	orig = orig[:len(orig)-1] // trailing ""
	for _, tc := range []struct {
		name, problem string
		edit          func([]string) []string
	}{
		{"modified", "record 2 was modified", func(l []string) []string {
			l[1] = strings.Replace(l[1], `"decision":"allow"`, `"decision":"deny"`, 1)
			return l
		}},
		{"deleted", "records 2..2 are missing", func(l []string) []string { return append(l[:1:1], l[2:]...) }},
		{"reordered", "records 2..2 are missing", func(l []string) []string { l[1], l[2] = l[2], l[1]; return l }},
		{"duplicated", "record 2 is out of order or repeated", func(l []string) []string {
			return append(append(l[:2:2], l[1]), l[2:]...)
		}},
		{"mac removed", "no mac", func(l []string) []string { l[3] = strings.SplitN(l[3], `,"mac"`, 2)[0] + "}\n"; return l }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines := tc.edit(append([]string(nil), orig...))
			p := filepath.Join(t.TempDir(), "audit.log")
			if err := os.WriteFile(p, []byte(strings.Join(lines, "")), 0o600); err != nil {
				t.Fatal(err)
			}
			rep, err := VerifyFile(p, opts.KeyFile)
			if !errors.Is(err, ErrTampered) || !strings.Contains(rep.Problem, tc.problem) {
				t.Fatalf("got %q, %v; want problem %q", rep.Problem, err, tc.problem)
			}
			// A process must refuse to extend a broken chain.
			if _, err := Open(Options{Path: p, KeyFile: opts.KeyFile}); err == nil {
				t.Fatal("Open accepted a tampered log")
			}
		})
	}
	// Another key does not verify an honest log.
	other := filepath.Join(dir, "other.key")
	os.WriteFile(other, bytes.Repeat([]byte("x"), 40), 0o600)
	if _, err := VerifyFile(opts.Path, other); !errors.Is(err, ErrTampered) {
		t.Fatalf("verify with another key: %v", err)
	}
}

func TestFailsClosedWhenTheRecordCannotBeWritten(t *testing.T) {
	dir := t.TempDir()
	l, err := Open(Options{Path: filepath.Join(dir, "audit.log"), KeyFile: newKey(t, dir)})
	if err != nil {
		t.Fatal(err)
	}
	l.file.Close() // the disk went away under the log
	if err := l.Record(context.Background(), event(1)); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("Record on a dead file: %v, want ErrUnavailable", err)
	}
}

func TestShortKeyRefused(t *testing.T) {
	dir := t.TempDir()
	k := filepath.Join(dir, "k")
	os.WriteFile(k, []byte("short"), 0o600)
	if _, err := Open(Options{Path: filepath.Join(dir, "a.log"), KeyFile: k}); err == nil || strings.Contains(err.Error(), "short") {
		t.Fatalf("short key: %v (the error must not echo the key)", err)
	}
}

// readFile is the file's content ("" if it cannot be read: the assertions then fail).
func readFile(_ *testing.T, p string) string { b, _ := os.ReadFile(p); return string(b) }

func TestQuery(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Path: filepath.Join(dir, "audit.log"), KeyFile: newKey(t, dir)}
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
		fh, _ := os.Open(opts.Path)
		defer fh.Close()
		recs, err := Query(fh, f)
		if err != nil {
			t.Fatal(err)
		}
		return len(recs)
	}
	for _, tc := range []struct {
		f    Filter
		want int
	}{
		{Filter{}, 3},
		{Filter{Decision: "deny"}, 1},
		{Filter{Namespace: "billing", Event: "mount"}, 1},
		{Filter{Namespace: "payments"}, 2},
		{Filter{Since: time.Now().Add(-time.Hour)}, 2},
		{Filter{Event: "unmount"}, 0},
	} {
		if got := count(tc.f); got != tc.want {
			t.Errorf("%+v: %d records, want %d", tc.f, got, tc.want)
		}
	}
}

// shortWriter writes part of a batch to the real file and then fails, as a full disk does.
type shortWriter struct {
	*os.File
	fail         bool
	truncateFail bool
}

func (w *shortWriter) Truncate(size int64) error {
	if w.truncateFail {
		return errors.New("input/output error")
	}
	return w.File.Truncate(size)
}

func (w *shortWriter) Write(b []byte) (int, error) {
	if !w.fail {
		return w.File.Write(b)
	}
	n, _ := w.File.Write(b[:len(b)/2])
	return n, errors.New("no space left on device")
}

func TestFailedWriteLeavesNoPartialRecordAndTheChainContinues(t *testing.T) {
	for _, every := range []time.Duration{0, time.Hour} {
		t.Run(fmt.Sprintf("sync=%s", every), func(t *testing.T) {
			dir := t.TempDir()
			opts := Options{Path: filepath.Join(dir, "audit.log"), KeyFile: newKey(t, dir), SyncInterval: every}
			l, err := Open(opts)
			if err != nil {
				t.Fatal(err)
			}
			w := &shortWriter{File: l.file}
			l.out = w
			for i := range 3 {
				if err := l.Record(context.Background(), event(i)); err != nil {
					t.Fatal(err)
				}
			}
			w.fail = true
			if err := l.Record(context.Background(), event(3)); !errors.Is(err, fault.ErrUnavailable) {
				t.Fatalf("Record on a full disk: %v, want ErrUnavailable", err)
			}
			w.fail = false
			for i := 4; i < 6; i++ {
				if err := l.Record(context.Background(), event(i)); err != nil {
					t.Fatal(err)
				}
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			rep, err := VerifyFile(opts.Path, opts.KeyFile)
			if err != nil || rep.Records != 5 {
				t.Fatalf("after a failed write: %+v, %v (want 5 verified records, no partial line)", rep, err)
			}
			recs, err := Query(strings.NewReader(readFile(t, opts.Path)), Filter{})
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
	dir := t.TempDir()
	opts := Options{Path: filepath.Join(dir, "audit.log"), KeyFile: newKey(t, dir), SyncInterval: time.Hour}
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
	rep, err := VerifyFile(opts.Path, opts.KeyFile)
	if err != nil || rep.Records != workers*each {
		t.Fatalf("verify: %+v, %v (want %d records)", rep, err, workers*each)
	}
	recs, _ := Query(strings.NewReader(readFile(t, opts.Path)), Filter{})
	seen := map[string]bool{}
	for _, r := range recs {
		seen[r.RequestID] = true
	}
	if len(seen) != workers*each {
		t.Fatalf("%d distinct records, want %d", len(seen), workers*each)
	}
}

func TestStdoutCopyMatchesTheFile(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Path: filepath.Join(dir, "audit.log"), KeyFile: newKey(t, dir), Stdout: true}
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	var copyOut bytes.Buffer
	l.stdout = &copyOut
	for i := range 4 {
		if err := l.Record(context.Background(), event(i)); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	if got, want := copyOut.String(), readFile(t, opts.Path); got != want || want == "" {
		t.Fatalf("stdout copy differs from the file:\n%s\nfile:\n%s", got, want)
	}
}

// A partial record that cannot be cut back leaves the log unusable: later records fail (closed)
// instead of being appended after the broken line.
func TestUncutPartialRecordStopsTheLog(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Path: filepath.Join(dir, "audit.log"), KeyFile: newKey(t, dir), SyncInterval: time.Hour}
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	w := &shortWriter{File: l.file}
	l.out = w
	if err := l.Record(context.Background(), event(0)); err != nil {
		t.Fatal(err)
	}
	w.fail, w.truncateFail = true, true
	if err := l.Record(context.Background(), event(1)); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("failed write: %v", err)
	}
	w.fail, w.truncateFail = false, false
	for i := range 3 {
		if err := l.Record(context.Background(), event(2+i)); !errors.Is(err, fault.ErrUnavailable) {
			t.Fatalf("record after an uncut partial write: %v, want ErrUnavailable", err)
		}
	}
	l.Close()
	lines := strings.Split(strings.TrimSpace(readFile(t, opts.Path)), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines in the file, want the good record and the partial one only", len(lines))
	}
}
