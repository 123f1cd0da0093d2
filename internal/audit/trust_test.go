package audit

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/internal/fault"
)

// eventually polls cond until it holds or 20 s pass (the log's background loop acts on its own
// clock; this waits for it, it does not time it).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s", what)
		}
	}
}

// lastRecord is the stream's newest record of the given type.
func lastRecord(t *testing.T, dir string, ev EventType) Record {
	t.Helper()
	recs, err := QueryPath(dir, Filter{Event: string(ev)})
	if err != nil || len(recs) == 0 {
		t.Fatalf("no %s record: %v", ev, err)
	}
	return recs[len(recs)-1]
}

// A crash leaves a partial last record (or file-system blocks of zeros): the next start cuts it
// back, says so in the stream's first new record, and goes on (it used to refuse to start, so
// keyward-kms crash-looped and its node's kube-apiserver could not decrypt Secrets).
func TestTornTailIsCutBackAndRecorded(t *testing.T) {
	for name, tail := range map[string]string{
		"partial record": `{"time":"2026-12-01T10:00:00Z","event":"kms_dec`,
		"zeroed blocks":  strings.Repeat("\x00", 4096),
	} {
		t.Run(name, func(t *testing.T) {
			opts := newOptions(t)
			writeN(t, opts, 5)
			seg := segmentPaths(t, opts.Dir)[0]
			f, _ := os.OpenFile(seg, os.O_WRONLY|os.O_APPEND, 0)
			f.WriteString(tail)
			f.Close()
			if rep, err := VerifyDir(opts.Dir, verifyOpts(t, opts)); name == "partial record" && (err != nil || rep.Partial != len(tail) || rep.Records != 6) {
				t.Fatalf("verify before restart: %+v, %v; want 6 records and the partial one reported", rep, err)
			}
			writeN(t, opts, 2)
			rep, err := VerifyDir(opts.Dir, verifyOpts(t, opts))
			if err != nil || rep.Records != 9 {
				t.Fatalf("after restart: %+v, %v (want 6 + audit_recovered + 2)", rep, err)
			}
			rec := lastRecord(t, opts.Dir, EventAuditRecovered)
			if rec.Seq != 7 || rec.Chain.DroppedBytes != int64(len(tail)) || rec.Chain.LastGoodSeq != 6 {
				t.Fatalf("audit_recovered: seq %d %+v, want seq 7, %d bytes dropped, last good 6", rec.Seq, rec.Chain, len(tail))
			}
		})
	}
}

// A whole line that does not verify is tampering, not a crash: it is never cut, and the log
// refuses to extend it.
func TestTamperedWholeLastLineIsNotCut(t *testing.T) {
	opts := newOptions(t)
	writeN(t, opts, 3)
	seg := segmentPaths(t, opts.Dir)[0]
	text := readFile(t, seg)
	forged := strings.Replace(text, `"request_id":"req-2"`, `"request_id":"req-X"`, 1)
	os.WriteFile(seg, []byte(forged), 0o600)
	if _, err := Open(opts); err == nil || !strings.Contains(err.Error(), "does not verify") {
		t.Fatalf("Open on a forged last record: %v", err)
	}
	if got := readFile(t, seg); got != forged {
		t.Fatal("the forged segment was modified")
	}
}

// One failed fsync used to fail every later Record until restart. Now the log fails closed while
// fsync fails, retries with backoff (writing again what the failed fsync may have dropped), and
// clears by itself; Health tells the truth all along and the stream records the outage.
func TestFsyncFailureFailsClosedThenRecovers(t *testing.T) {
	opts := newOptions(t)
	opts.SyncInterval = 10 * time.Millisecond
	w := &faultyFile{}
	l := withFaults(t, opts, w)
	defer l.Close()
	if err := l.Health(); err != nil {
		t.Fatal(err)
	}
	w.set(func(w *faultyFile) { w.syncFails = 1 << 30 })
	if err := l.Record(context.Background(), event(1)); err != nil {
		t.Fatal(err) // written; its fsync fails in the background
	}
	eventually(t, "Health reports the failing fsync", func() bool { return l.Health() != nil })
	if err := l.Record(context.Background(), event(2)); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("Record while fsync fails: %v, want ErrUnavailable", err)
	}
	if !strings.Contains(l.Health().Error(), "cannot be synced") {
		t.Fatalf("health: %v", l.Health())
	}
	w.set(func(w *faultyFile) { w.syncFails = 0 })
	eventually(t, "Health recovers", func() bool { return l.Health() == nil })
	if err := l.Record(context.Background(), event(3)); err != nil {
		t.Fatalf("Record after recovery: %v", err)
	}
	eventually(t, "the recovery is recorded", func() bool {
		recs, _ := QueryPath(opts.Dir, Filter{Event: string(EventAuditRecovered)})
		return len(recs) == 1
	})
	w.mu.Lock()
	rewrites := w.rewrites
	w.mu.Unlock()
	if rewrites == 0 {
		t.Fatal("the retry did not write again what the failed fsync may have dropped")
	}
	rec := lastRecord(t, opts.Dir, EventAuditRecovered)
	if !strings.Contains(rec.Reason, "1 records were refused") {
		t.Fatalf("recovery record: %q, want the refused count", rec.Reason)
	}
	if _, err := VerifyDir(opts.Dir, verifyOpts(t, opts)); err != nil {
		t.Fatal(err)
	}
}

// A disk that refuses writes: Health says so, and when the disk is back the log finds out by
// itself (no request needed) and records how long it could not write and how many it refused.
func TestWriteFailureHealthRecoversWithoutRequests(t *testing.T) {
	opts := newOptions(t)
	opts.SyncInterval = 10 * time.Millisecond
	w := &faultyFile{}
	l := withFaults(t, opts, w)
	defer l.Close()
	w.set(func(w *faultyFile) { w.failFull = true })
	for i := range 3 {
		if err := l.Record(context.Background(), event(i)); !errors.Is(err, fault.ErrUnavailable) {
			t.Fatalf("Record on a full disk: %v", err)
		}
	}
	if err := l.Health(); err == nil || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("health on a full disk: %v", err)
	}
	w.set(func(w *faultyFile) { w.failFull = false })
	eventually(t, "Health recovers with no request", func() bool { return l.Health() == nil })
	rec := lastRecord(t, opts.Dir, EventAuditRecovered)
	if !strings.Contains(rec.Reason, "3 records were refused") || !strings.Contains(rec.Reason, "no space left") {
		t.Fatalf("recovery record: %q", rec.Reason)
	}
}

// Segments: a new one begins at the size or age limit with a record naming the previous one's
// last record; beyond the limit the oldest are deleted after an audit_pruned record; the directory
// verifies across segments and deletions, and a missing or swapped segment does not.
func TestSegmentsChainRotateAndPrune(t *testing.T) {
	opts := newOptions(t)
	opts.SyncInterval = 5 * time.Millisecond
	opts.MaxSegmentBytes, opts.MaxSegments = 8<<10, 3
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		if err := l.Record(context.Background(), event(i)); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "old segments pruned", func() bool { return len(segmentPaths(t, opts.Dir)) <= 3 })
	l.Close()
	vo := verifyOpts(t, opts)
	rep, err := VerifyDir(opts.Dir, vo)
	if err != nil || rep.Segments != 3 || rep.Pruned == 0 || rep.LastSeq != rep.Pruned+rep.Records {
		t.Fatalf("verify: %+v, %v", rep, err)
	}
	paths := segmentPaths(t, opts.Dir)
	for _, p := range paths {
		if st, _ := os.Stat(p); st.Size() > opts.MaxSegmentBytes+4096 {
			t.Fatalf("%s: %d bytes, over the limit", p, st.Size())
		}
	}
	// A segment alone does not verify: it starts mid-chain without its predecessor.
	if rep, err := VerifyPath(paths[2], vo); err == nil || !strings.Contains(rep.Problem, "audit_pruned") {
		t.Fatalf("newest segment alone: %+v, %v", rep, err)
	}
	// A missing middle segment breaks the chain.
	hidden := paths[1] + ".hidden"
	os.Rename(paths[1], hidden)
	if rep, err := VerifyDir(opts.Dir, vo); err == nil || !strings.Contains(rep.Problem, "does not continue") {
		t.Fatalf("middle segment missing: %+v, %v", rep, err)
	}
	os.Rename(hidden, paths[1])
	// A partial record is a crash's mark only at the very end.
	mid := readFile(t, paths[1])
	os.WriteFile(paths[1], []byte(mid+`{"time":"2026`), 0o600)
	if rep, err := VerifyDir(opts.Dir, vo); err == nil || !strings.Contains(rep.Problem, "not the newest") {
		t.Fatalf("partial record inside the stream: %+v, %v", rep, err)
	}
	os.WriteFile(paths[1], []byte(mid), 0o600)
	// Deleting the oldest without an audit_pruned record is detected.
	os.Remove(paths[0])
	if rep, err := VerifyDir(opts.Dir, vo); err == nil || !strings.Contains(rep.Problem, "no audit_pruned record") {
		t.Fatalf("oldest segment deleted by hand: %+v, %v", rep, err)
	}
}

func TestSegmentAgeLimit(t *testing.T) {
	opts := newOptions(t)
	opts.MaxSegmentAge = 50 * time.Millisecond
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	l.Record(context.Background(), event(1))
	time.Sleep(60 * time.Millisecond)
	l.Record(context.Background(), event(2))
	l.Close()
	if n := len(segmentPaths(t, opts.Dir)); n != 2 {
		t.Fatalf("%d segments, want 2", n)
	}
	if _, err := VerifyDir(opts.Dir, verifyOpts(t, opts)); err != nil {
		t.Fatal(err)
	}
}

// Start-up reads only the newest segment and the first line of the others: a broken record in an
// old segment does not stop the writer (verify finds it), so start-up time is bounded by the
// segment size, not the stream's.
func TestStartReadsOnlyTheNewestSegment(t *testing.T) {
	opts := newOptions(t)
	opts.MaxSegmentBytes = 4 << 10
	writeN(t, opts, 40)
	paths := segmentPaths(t, opts.Dir)
	if len(paths) < 3 {
		t.Fatalf("%d segments", len(paths))
	}
	old := readFile(t, paths[0])
	os.WriteFile(paths[0], []byte(strings.Replace(old, `"req-3"`, `"req-Z"`, 1)), 0o600)
	writeN(t, opts, 1)
	if rep, err := VerifyDir(opts.Dir, verifyOpts(t, opts)); err == nil || !strings.Contains(rep.Problem, "was modified") {
		t.Fatalf("verify: %+v, %v", rep, err)
	}
}

// The attacks on the stream as a whole: another node's or stream's file in this one's place, an
// empty file or directory, an older copy, and a truncated tail (the last two against a
// checkpoint the log shipper kept).
func TestSwapAndTruncationAttacks(t *testing.T) {
	opts := newOptions(t)
	opts.SyncInterval = 5 * time.Millisecond
	var cps syncBuffer
	// The interval makes the last record's checkpoint certain: with every 5 alone, a sync that found
	// record 21..24 durable leaves 25 without one for a minute (seen under a loaded make test).
	opts.Checkpoints, opts.CheckpointEvery, opts.CheckpointInterval = &cps, 5, 50*time.Millisecond
	writeN(t, opts, 3)
	older := t.TempDir()
	copyDir(t, opts.Dir, older)
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		l.Record(context.Background(), event(i))
	}
	eventually(t, "a checkpoint of the last record", func() bool {
		cp, err := ReadCheckpoint(strings.NewReader(cps.String()), "node-a", "kms")
		return err == nil && cp.Seq == 25
	})
	l.Close()
	cp, _ := ReadCheckpoint(strings.NewReader(cps.String()), "node-a", "kms")
	vo := verifyOpts(t, opts)
	vo.Checkpoint = cp
	if _, err := VerifyDir(opts.Dir, vo); err != nil {
		t.Fatalf("honest stream against its checkpoint: %v", err)
	}
	check := func(name, dir, problem string, vo VerifyOptions) {
		t.Helper()
		if rep, err := VerifyPath(dir, vo); !errors.Is(err, ErrTampered) || !strings.Contains(rep.Problem, problem) {
			t.Errorf("%s: %q, %v; want %q", name, rep.Problem, err, problem)
		}
	}
	other := vo
	other.Node = "node-b"
	check("another node's stream", opts.Dir, `node "node-a"'s audit stream, not node "node-b"'s`, other)
	other = vo
	other.Stream = "broker"
	check("another stream", opts.Dir, `the "kms" audit stream, not "broker"`, other)
	// A forged genesis that claims node-b, over node-a's records (same key): the chain binds the node.
	forged := t.TempDir()
	seg := readFile(t, segmentPaths(t, opts.Dir)[0])
	os.WriteFile(filepath.Join(forged, segmentName(1)), []byte(strings.Replace(seg, `"node":"node-a"`, `"node":"node-b"`, 1)), 0o600)
	other = vo
	other.Node, other.Checkpoint = "node-b", nil
	check("relabelled genesis", forged, "record 1 was modified", other)
	empty := t.TempDir()
	check("empty directory", empty, "no records", vo)
	os.WriteFile(filepath.Join(empty, segmentName(1)), nil, 0o600)
	check("empty file", filepath.Join(empty, segmentName(1)), "empty segment", vo)
	check("older copy", older, "tail was truncated or it is an older copy", vo)
	truncated := t.TempDir()
	copyDir(t, opts.Dir, truncated)
	p := segmentPaths(t, truncated)[0]
	lines := strings.SplitAfter(readFile(t, p), "\n")
	os.WriteFile(p, []byte(strings.Join(lines[:20], "")), 0o600)
	noCP := vo
	noCP.Checkpoint = nil
	if _, err := VerifyDir(truncated, noCP); err != nil {
		t.Fatalf("a cleanly truncated stream verifies without a checkpoint (%v): that is what checkpoints are for", err)
	}
	check("truncated tail", truncated, "tail was truncated", vo)
	// And the writer refuses to continue another node's stream.
	swapped := opts
	swapped.Node = "node-b"
	if _, err := Open(swapped); err == nil || !strings.Contains(err.Error(), `node "node-a"`) {
		t.Errorf("node-b's writer opened node-a's stream: %v", err)
	}
}

// Per-node keys: a node's key, derived from a master the security team keeps, verifies that
// node's stream only; another node's key (all that node's root has) does not.
func TestNodeKeys(t *testing.T) {
	master := bytes.Repeat([]byte("m"), 32)
	a, b := NodeKey(master, "node-a"), NodeKey(master, "node-b")
	if bytes.Equal(a, b) || len(a) != 64 || bytes.Contains(a, master) {
		t.Fatalf("node keys: %q %q", a, b)
	}
	opts := newOptions(t)
	os.WriteFile(opts.KeyFile, a, 0o600)
	writeN(t, opts, 2)
	vo := VerifyOptions{Key: a, Node: "node-a", Stream: "kms"}
	if _, err := VerifyDir(opts.Dir, vo); err != nil {
		t.Fatal(err)
	}
	vo.Key = b
	if rep, err := VerifyDir(opts.Dir, vo); err == nil || !strings.Contains(rep.Problem, "keyed with key") {
		t.Fatalf("node-b's key verified node-a's stream: %+v, %v", rep, err)
	}
}

// A second writer on the same directory would fork the chain: it is refused.
func TestOneWriterPerStream(t *testing.T) {
	opts := newOptions(t)
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := Open(opts); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second writer: %v", err)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	for _, p := range segmentPaths(t, from) {
		if err := os.WriteFile(filepath.Join(to, filepath.Base(p)), []byte(readFile(t, p)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}
