package audit

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// A Cursor reads the records as written, in order, from any seq on disk and on across segments; a
// ChainVerifier fed with them checks the same chain VerifyDir does, resumed anywhere.
func TestCursorAndChainVerifierAcrossSegments(t *testing.T) {
	o := newOptions(t)
	o.MaxSegmentBytes = 2048
	writeN(t, o, 60)
	rep, err := VerifyDir(o.Dir, verifyOpts(t, o))
	if err != nil || rep.Segments < 4 {
		t.Fatalf("%+v %v", rep, err)
	}
	lines := strings.Split(strings.TrimSuffix(streamText(t, o.Dir), "\n"), "\n")
	for _, from := range []uint64{0, 1, 17, rep.LastSeq} {
		c, err := OpenCursor(o.Dir, from)
		if err != nil {
			t.Fatal(err)
		}
		v := NewChainVerifier(verifyOpts(t, o))
		start := max(from, 1)
		if start > 1 {
			prev := lines[start-2]
			if err := v.Resume(start-1, prev[strings.LastIndex(prev, macField)+len(macField):len(prev)-2]); err != nil {
				t.Fatal(err)
			}
		}
		for seq := start; seq <= rep.LastSeq; seq++ {
			l, ok, err := c.Next(rep.LastSeq)
			if err != nil || !ok || l.Seq != seq || string(l.Raw) != lines[seq-1] {
				t.Fatalf("from %d: record %d: %+v %v %v", from, seq, l, ok, err)
			}
			if err := v.Record(l.Raw, segmentName(seq) == l.Segment); err != nil {
				t.Fatalf("from %d: %v", from, err)
			}
		}
		if _, ok, err := c.Next(rep.LastSeq); ok || err != nil {
			t.Fatalf("a record past the head: %v %v", ok, err)
		}
		c.Close()
	}
	// A resume point that is not the chain's: the next record does not verify.
	v := NewChainVerifier(verifyOpts(t, o))
	v.Resume(9, strings.Repeat("00", 32))
	if err := v.Record([]byte(lines[9]), false); !errors.Is(err, ErrTampered) {
		t.Fatalf("a record chained from another mac: %v", err)
	}
	// Gaps and repeats, elided or whole.
	if err := v.Elided(12, strings.Repeat("ab", 32)); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("a gap: %v", err)
	}
	if _, err := OpenCursor(o.Dir, rep.LastSeq+2); err == nil {
		t.Fatal("a cursor beyond the newest record + 1")
	}
}

// Durable moves, and its channel is closed, when records become durable; a cursor asking for a
// pruned record gets a PrunedError naming the oldest kept.
func TestDurableAndPruned(t *testing.T) {
	o := newOptions(t)
	o.SyncInterval, o.MaxSegmentBytes, o.MaxSegments = 10*time.Millisecond, 2048, 2
	l, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	seq, moved := l.Durable()
	if seq != 1 {
		t.Fatalf("durable %d after the genesis", seq)
	}
	if err := l.Record(context.Background(), event(1)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-moved:
	case <-time.After(5 * time.Second):
		t.Fatal("the durable head did not move")
	}
	if seq, _ := l.Durable(); seq != 2 {
		t.Fatalf("durable %d", seq)
	}
	for i := range 100 {
		l.Record(context.Background(), event(i))
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(segmentPaths(t, o.Dir)) > 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	_, err = OpenCursor(o.Dir, 1)
	var p *PrunedError
	if !errors.As(err, &p) || p.Want != 1 || p.Oldest <= 1 {
		t.Fatalf("a pruned record: %v", err)
	}
	c, err := OpenCursor(o.Dir, p.Oldest)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	head, _ := l.Durable()
	if r, ok, err := c.Next(head); err != nil || !ok || r.Seq != p.Oldest {
		t.Fatalf("the oldest record: %+v %v %v", r, ok, err)
	}
}

// rollbackFile is a segment file whose next write (half of it reaching the file: a full disk) or
// fsync (after the whole write) fails; during runs while the failing write's bytes are in the file,
// before the failure makes the writer cut them back.
type rollbackFile struct {
	appender
	mu                  sync.Mutex
	failWrite, failSync bool
	during              func()
}

func (f *rollbackFile) arm(write, sync bool, during func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failWrite, f.failSync, f.during = write, sync, during
}

func (f *rollbackFile) take() (write, sync bool, during func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	write, sync, during = f.failWrite, f.failSync, f.during
	f.failWrite, f.failSync, f.during = false, false, nil
	return write, sync, during
}

func (f *rollbackFile) WriteAt(b []byte, off int64) (int, error) {
	f.mu.Lock()
	fail := f.failWrite
	f.mu.Unlock()
	if !fail {
		return f.appender.WriteAt(b, off)
	}
	_, _, during := f.take()
	n, _ := f.appender.WriteAt(b[:len(b)/2], off)
	during()
	return n, errors.New("no space left on device")
}

func (f *rollbackFile) Sync() error {
	f.mu.Lock()
	fail := f.failSync
	f.mu.Unlock()
	if !fail {
		return f.appender.Sync()
	}
	_, _, during := f.take()
	during()
	return errors.New("input/output error")
}

// A cursor that read a durable record while the writer's next write was in the file, and went on
// to wait at the durable head, must not return those bytes once the writer has cut them back (a
// failed write or fsync) and written other records under the same seqs: it returns the records as
// they are now on disk, never the stale one nor a line spliced from both.
func TestCursorNeverReturnsRolledBackBytes(t *testing.T) {
	for _, c := range []struct {
		name        string
		syncEvery   time.Duration
		write, sync bool
	}{
		// fsync in Record: a failed fsync cuts back a whole record, whose seq is reused.
		{"failed fsync, whole record cut back", 0, false, true},
		// fsync in the background: a failed write cuts back half a record.
		{"failed write, partial record cut back", 5 * time.Millisecond, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := newOptions(t)
			o.SyncInterval = c.syncEvery
			f := &rollbackFile{}
			o.wrap = func(a appender) appender { f.appender = a; return f }
			l, err := Open(o)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			for i := range 4 {
				if err := l.Record(context.Background(), event(i)); err != nil {
					t.Fatal(err)
				}
			}
			durable := func(want uint64) {
				t.Helper()
				for {
					seq, moved := l.Durable()
					if seq >= want {
						return
					}
					select {
					case <-moved:
					case <-time.After(10 * time.Second):
						t.Fatalf("durable %d, want %d", seq, want)
					}
				}
			}
			durable(5)
			cur, err := OpenCursor(o.Dir, 1)
			if err != nil {
				t.Fatal(err)
			}
			defer cur.Close()
			for seq := uint64(1); seq <= 5; seq++ {
				if _, ok, err := cur.Next(5); !ok || err != nil {
					t.Fatalf("record %d: %v %v", seq, ok, err)
				}
			}
			if _, ok, err := cur.Next(5); ok || err != nil { // caught up
				t.Fatalf("past the durable head: %v %v", ok, err)
			}
			if err := l.Record(context.Background(), event(4)); err != nil {
				t.Fatal(err)
			}
			durable(6)
			// Record 6 is durable; the cursor reads it while the next write, failing, is in the
			// file, and is caught up again.
			f.arm(c.write, c.sync, func() {
				if r, ok, err := cur.Next(6); !ok || err != nil || r.Seq != 6 {
					t.Errorf("record 6: %+v %v %v", r, ok, err)
				}
				if _, ok, err := cur.Next(6); ok || err != nil {
					t.Errorf("past the durable head: %v %v", ok, err)
				}
			})
			stale := event(100)
			stale.RequestID = "rolled-back"
			if err := l.Record(context.Background(), stale); err == nil {
				t.Fatal("the failing write succeeded")
			}
			// The writer goes on: records 7 and 8 again, other records this time.
			for i := range 2 {
				ev := event(200 + i)
				ev.RequestID = "rewritten"
				if err := l.Record(context.Background(), ev); err != nil {
					t.Fatal(err)
				}
			}
			durable(8)
			b, err := os.ReadFile(filepath.Join(o.Dir, segmentName(1)))
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
			v := NewChainVerifier(verifyOpts(t, o))
			v.Resume(6, lines[5][strings.LastIndex(lines[5], macField)+len(macField):len(lines[5])-2])
			for seq := uint64(7); seq <= 8; seq++ {
				r, ok, err := cur.Next(8)
				if err != nil || !ok {
					t.Fatalf("record %d: %v %v", seq, ok, err)
				}
				if string(r.Raw) != lines[seq-1] {
					t.Fatalf("record %d is not the one on disk:\n got %s\nwant %s", seq, r.Raw, lines[seq-1])
				}
				if err := v.Record(r.Raw, false); err != nil {
					t.Fatal(err)
				}
			}
			if strings.Contains(string(b), "rolled-back") {
				t.Fatal("the cut-back record is still in the file")
			}
		})
	}
}

// OpenCursor racing a prune (the segment holding from deleted between the listing and the open)
// is a *PrunedError naming the oldest record kept, not an I/O error.
func TestOpenCursorRacingAPrune(t *testing.T) {
	o := newOptions(t)
	o.MaxSegmentBytes = 2048
	writeN(t, o, 40)
	names, err := listSegments(o.Dir)
	if err != nil || len(names) < 3 {
		t.Fatalf("%v %v", names, err)
	}
	t.Cleanup(func() { testHookListed = nil })
	testHookListed = func() {
		testHookListed = nil
		for _, n := range names[:2] { // as prune does, oldest first
			if err := os.Remove(filepath.Join(o.Dir, n)); err != nil {
				t.Fatal(err)
			}
		}
	}
	_, err = OpenCursor(o.Dir, firstSeq(names[1])+1)
	var p *PrunedError
	if !errors.As(err, &p) || p.Oldest != firstSeq(names[2]) {
		t.Fatalf("OpenCursor racing a prune: %v, want a PrunedError naming %d", err, firstSeq(names[2]))
	}
}
