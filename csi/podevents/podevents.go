package podevents

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The events' reasons.
const (
	ReasonRotated = "SecretsRotated"
	ReasonDenied  = "SecretsDenied"
)

// MaxMessage bounds an event's message (the apiserver's own bound for events.k8s.io is 1 KiB).
const MaxMessage = 1024

// Pod is the pod an event is about.
type Pod struct {
	Namespace string
	Name      string
	UID       string
}

// Change is one ref whose delivered Vault version changed in a swap. From is 0 for a ref the volume
// did not deliver before (or whose version was unknown).
type Change struct {
	Ref  string // "payments/db#password"
	From int
	To   int
}

// Event is one event to post.
type Event struct {
	Pod     Pod
	Reason  string
	Type    string // "Normal" or "Warning"
	Message string
	Time    time.Time
}

// Sink posts events to the apiserver: Create makes a new core/v1 Event named name on ev.Pod; Patch
// raises an existing one's count and last time.
type Sink interface {
	Create(ctx context.Context, name string, ev Event) error
	Patch(ctx context.Context, namespace, name string, count int, last time.Time) error
}

// Options configure New. Zero values take the defaults.
type Options struct {
	Sink Sink
	// PodBurst events per pod, then one per PodInterval (defaults 5 and 30s).
	PodBurst    int
	PodInterval time.Duration
	// Burst events overall, then PerSecond a second (defaults 50 and 5).
	Burst     int
	PerSecond float64
	// Queue bounds the events waiting to be posted (default 256); MaxPods bounds the pods whose rate
	// and aggregation state is kept (default 4096; beyond it an arbitrary entry is forgotten).
	Queue   int
	MaxPods int
	// Aggregate is how long a repeat of an event patches the earlier one instead of creating
	// another (default 10m).
	Aggregate time.Duration
	// Timeout bounds each call to the sink (default 5s).
	Timeout time.Duration
	Now     func() time.Time
}

// Stats count what a Recorder did.
type Stats struct {
	Created, Patched, Failed uint64
	// Limited were refused by a rate limit, Dropped found the queue full.
	Limited, Dropped uint64
	// LastError is the last error of the sink ("" if none).
	LastError string
}

// Recorder queues events for pods and posts them in the background. Its methods never block.
type Recorder struct {
	o     Options
	queue chan Event

	mu      sync.Mutex
	overall bucket
	pods    map[string]*podState
	last    string

	created, patched, failed, limited, dropped, pending atomic.Uint64
}

type podState struct {
	bucket bucket
	// posted aggregates repeats: reason+message -> the event posted for it.
	posted map[string]*posted
}

type posted struct {
	name  string
	count int
	first time.Time
}

// maxAggregated bounds the distinct events remembered per pod.
const maxAggregated = 8

// New checks the options; Run posts the events.
func New(o Options) (*Recorder, error) {
	if o.Sink == nil {
		return nil, errors.New("podevents: a Sink is required")
	}
	if o.PodBurst <= 0 {
		o.PodBurst = 5
	}
	if o.PodInterval <= 0 {
		o.PodInterval = 30 * time.Second
	}
	if o.Burst <= 0 {
		o.Burst = 50
	}
	if o.PerSecond <= 0 {
		o.PerSecond = 5
	}
	if o.Queue <= 0 {
		o.Queue = 256
	}
	if o.MaxPods <= 0 {
		o.MaxPods = 4096
	}
	if o.Aggregate <= 0 {
		o.Aggregate = 10 * time.Minute
	}
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Recorder{o: o, queue: make(chan Event, o.Queue), pods: map[string]*podState{},
		overall: bucket{tokens: float64(o.Burst)}}, nil
}

// Rotated records that a pod's volume swapped in changed secrets: ..version is now version, and
// changes say which refs moved to which Vault version.
func (r *Recorder) Rotated(pod Pod, version uint64, changes []Change) {
	var b strings.Builder
	fmt.Fprintf(&b, "secrets volume swapped, ..version %d:", version)
	if len(changes) == 0 {
		b.WriteString(" content changed at the same Vault versions")
	}
	for i, c := range changes {
		if i > 0 {
			b.WriteByte(',')
		}
		if c.From == 0 {
			fmt.Fprintf(&b, " %s now at version %d", c.Ref, c.To)
		} else {
			fmt.Fprintf(&b, " %s version %d -> %d", c.Ref, c.From, c.To)
		}
	}
	r.enqueue(Event{Pod: pod, Reason: ReasonRotated, Type: "Normal", Message: b.String()})
}

// Denied records that a publish of the pod's volume was refused; reason is what kubelet was told
// (the gRPC status message), which never holds a value or a token.
func (r *Recorder) Denied(pod Pod, reason string) {
	r.enqueue(Event{Pod: pod, Reason: ReasonDenied, Type: "Warning", Message: "publish refused: " + reason})
}

func (r *Recorder) enqueue(ev Event) {
	if ev.Pod.Namespace == "" || ev.Pod.Name == "" {
		return // nothing to attach it to
	}
	ev.Time = r.o.Now()
	ev.Message = truncate(ev.Message, MaxMessage)
	if !r.allow(ev.Pod, ev.Time) {
		r.limited.Add(1)
		return
	}
	r.pending.Add(1)
	select {
	case r.queue <- ev:
	default:
		r.pending.Add(^uint64(0))
		r.dropped.Add(1)
	}
}

// allow takes a token from the pod's bucket and the overall one.
func (r *Recorder) allow(pod Pod, now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.state(pod)
	if !st.bucket.ready(now, float64(r.o.PodBurst), 1/r.o.PodInterval.Seconds()) ||
		!r.overall.ready(now, float64(r.o.Burst), r.o.PerSecond) {
		return false
	}
	st.bucket.tokens--
	r.overall.tokens--
	return true
}

// state is the pod's state, made if needed (r.mu held).
func (r *Recorder) state(pod Pod) *podState {
	k := key(pod)
	st := r.pods[k]
	if st == nil {
		if len(r.pods) >= r.o.MaxPods {
			for k := range r.pods { // forget one: bounded memory over exact limits
				delete(r.pods, k)
				break
			}
		}
		st = &podState{bucket: bucket{tokens: float64(r.o.PodBurst)}, posted: map[string]*posted{}}
		r.pods[k] = st
	}
	return st
}

func key(pod Pod) string { return pod.Namespace + "/" + pod.Name + "/" + pod.UID }

// Run posts queued events until ctx ends.
func (r *Recorder) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-r.queue:
			r.post(ctx, ev)
			r.pending.Add(^uint64(0))
		}
	}
}

// post creates the event, or patches the count of the same event posted for the pod lately.
func (r *Recorder) post(ctx context.Context, ev Event) {
	ctx, cancel := context.WithTimeout(ctx, r.o.Timeout)
	defer cancel()
	agg := ev.Reason + "\x00" + ev.Message
	r.mu.Lock()
	st := r.state(ev.Pod)
	p := st.posted[agg]
	if p != nil && ev.Time.Sub(p.first) > r.o.Aggregate {
		p = nil
	}
	var name string
	var count int
	if p != nil {
		p.count++
		name, count = p.name, p.count
	}
	r.mu.Unlock()
	if p != nil {
		if err := r.o.Sink.Patch(ctx, ev.Pod.Namespace, name, count, ev.Time); err == nil {
			r.patched.Add(1)
			return
		} else {
			r.fail(err) // the event may be gone (TTL): create a new one
		}
	}
	name = eventName(ev.Pod.Name)
	if err := r.o.Sink.Create(ctx, name, ev); err != nil {
		r.fail(err)
		return
	}
	r.created.Add(1)
	r.mu.Lock()
	st = r.state(ev.Pod)
	if len(st.posted) >= maxAggregated {
		for k := range st.posted {
			delete(st.posted, k)
			break
		}
	}
	st.posted[agg] = &posted{name: name, count: 1, first: ev.Time}
	r.mu.Unlock()
}

func (r *Recorder) fail(err error) {
	r.failed.Add(1)
	r.mu.Lock()
	r.last = truncate(err.Error(), 512)
	r.mu.Unlock()
}

// Stats returns the counts so far.
func (r *Recorder) Stats() Stats {
	r.mu.Lock()
	last := r.last
	r.mu.Unlock()
	return Stats{Created: r.created.Load(), Patched: r.patched.Load(), Failed: r.failed.Load(),
		Limited: r.limited.Load(), Dropped: r.dropped.Load(), LastError: last}
}

// Pending is how many events are queued or being posted.
func (r *Recorder) Pending() int { return int(r.pending.Load()) }

// eventName is "<pod>.<16 hex>", as client-go names events (a unique suffix).
func eventName(pod string) string {
	b := make([]byte, 8)
	rand.Read(b)
	if len(pod) > 200 {
		pod = pod[:200]
	}
	return pod + "." + hex.EncodeToString(b)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n-3], "") + "..."
}

// bucket is a token bucket.
type bucket struct {
	tokens float64
	at     time.Time
}

// ready refills the bucket up to burst at rate tokens a second and reports whether one is there.
func (b *bucket) ready(now time.Time, burst, rate float64) bool {
	if !b.at.IsZero() {
		b.tokens = min(burst, b.tokens+now.Sub(b.at).Seconds()*rate)
	}
	b.at = now
	return b.tokens >= 1
}
