package podevents

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

type call struct {
	op, name string
	ev       Event
	count    int
}

type fakeSink struct {
	mu    sync.Mutex
	calls []call
	block chan struct{}
	fail  error
}

func (f *fakeSink) Create(_ context.Context, name string, ev Event) error {
	if f.block != nil {
		<-f.block
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, call{op: "create", name: name, ev: ev})
	return f.fail
}

func (f *fakeSink) Patch(_ context.Context, ns, name string, count int, _ time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, call{op: "patch", name: name, count: count})
	return f.fail
}

func (f *fakeSink) take() []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func start(t *testing.T, o Options) *Recorder {
	t.Helper()
	r, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

func drain(t *testing.T, r *Recorder) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for r.Pending() > 0 {
		if time.Now().After(deadline) {
			t.Fatal("events still pending")
		}
		time.Sleep(time.Millisecond)
	}
}

var pod = Pod{Namespace: "payments", Name: "api-0", UID: "u1"}

// Rotations and refusals become events on the pod with the documented reasons; a repeat of the same
// event patches the earlier one's count instead of adding another.
func TestEventsAndAggregation(t *testing.T) {
	sink, c := &fakeSink{}, &clock{time.Unix(1e9, 0)}
	r := start(t, Options{Sink: sink, Now: c.now})
	r.Rotated(pod, 3, []Change{{Ref: "payments/db#password", From: 2, To: 3}, {Ref: "shared/ca#crt", To: 1}})
	r.Denied(pod, "payments/x#k: no grant: permission denied")
	r.Denied(pod, "payments/x#k: no grant: permission denied")
	drain(t, r)
	calls := sink.take()
	if len(calls) != 3 || calls[0].op != "create" || calls[1].op != "create" || calls[2].op != "patch" {
		t.Fatalf("calls %+v", calls)
	}
	rot, den := calls[0].ev, calls[1].ev
	if rot.Reason != ReasonRotated || rot.Type != "Normal" || rot.Pod != pod ||
		rot.Message != "secrets volume swapped, ..version 3: payments/db#password version 2 -> 3, shared/ca#crt now at version 1" {
		t.Fatalf("rotated %+v", rot)
	}
	if den.Reason != ReasonDenied || den.Type != "Warning" || den.Message != "publish refused: payments/x#k: no grant: permission denied" {
		t.Fatalf("denied %+v", den)
	}
	if calls[2].name != calls[1].name || calls[2].count != 2 || !strings.HasPrefix(calls[1].name, "api-0.") {
		t.Fatalf("aggregation %+v", calls)
	}
	c.t = c.t.Add(11 * time.Minute) // past the aggregation window: a new event
	r.Denied(pod, "payments/x#k: no grant: permission denied")
	drain(t, r)
	if calls := sink.take(); len(calls) != 1 || calls[0].op != "create" {
		t.Fatalf("after the window %+v", calls)
	}
}

// Per pod: a burst of 5, then one per 30 s; overall: a burst of 50, then 5 a second. A pod without
// a name gets nothing.
func TestRateLimits(t *testing.T) {
	sink, c := &fakeSink{}, &clock{time.Unix(1e9, 0)}
	r := start(t, Options{Sink: sink, Now: c.now})
	for i := range 8 {
		r.Denied(pod, fmt.Sprint("reason ", i))
	}
	drain(t, r)
	if n := len(sink.take()); n != 5 || r.Stats().Limited != 3 {
		t.Fatalf("per pod: %d posted, %+v", n, r.Stats())
	}
	c.t = c.t.Add(30 * time.Second)
	r.Denied(pod, "again")
	r.Denied(pod, "again 2")
	drain(t, r)
	if n := len(sink.take()); n != 1 {
		t.Fatalf("after 30 s: %d posted, want 1", n)
	}
	for i := range 60 { // 60 pods, one event each: the overall burst of 50 holds
		r.Denied(Pod{Namespace: "ns", Name: fmt.Sprint("p", i), UID: fmt.Sprint(i)}, "x")
	}
	drain(t, r)
	if n := len(sink.take()); n != 49 { // one token went to the pod above
		t.Fatalf("overall: %d posted, want 49", n)
	}
	r.Denied(Pod{Namespace: "ns"}, "no pod name")
	if r.Pending() != 0 {
		t.Fatal("an event without a pod was queued")
	}
}

// A sink that hangs or fails never blocks or fails the caller: the queue is bounded and the rest
// is dropped and counted; failures are counted with the last error.
func TestNeverBlocksAndBoundsTheQueue(t *testing.T) {
	sink := &fakeSink{block: make(chan struct{})}
	r := start(t, Options{Sink: sink, Queue: 4, Burst: 1000, PerSecond: 1000, PodBurst: 1000})
	done := make(chan struct{})
	go func() {
		for i := range 100 {
			r.Denied(Pod{Namespace: "ns", Name: "p", UID: fmt.Sprint(i)}, "x")
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Denied blocked on a hung sink")
	}
	if s := r.Stats(); s.Dropped < 95 || s.Dropped > 96 {
		t.Fatalf("dropped %d, want 95 or 96 (queue of 4, one being posted)", s.Dropped)
	}
	sink.fail = errors.New("events is forbidden")
	close(sink.block)
	drain(t, r)
	if s := r.Stats(); s.Failed == 0 || !strings.Contains(s.LastError, "forbidden") {
		t.Fatalf("stats %+v", s)
	}
	if _, err := New(Options{}); err == nil {
		t.Fatal("New without a sink")
	}
}
