package audit

import (
	"context"
	"errors"
	"strings"
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
