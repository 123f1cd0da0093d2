package broker

import (
	"sync"
	"sync/atomic"
	"time"
)

// refusalLimiter rate-limits the audit records of refused requests per pod and code (a token bucket
// each),
// so a crash-looping or hostile pod cannot flood the audit log. A record that is let through carries
// the number suppressed before it. Allowed requests are never rate-limited.
type refusalLimiter struct {
	burst float64
	every time.Duration

	mu         sync.Mutex
	pods       map[string]*bucket
	suppressed atomic.Uint64 // in all, for metrics
}

type bucket struct {
	tokens     float64
	last       time.Time
	suppressed int
}

// maxLimitedPods bounds the limiter's memory; beyond it, idle pods are forgotten and, failing that,
// every new pod shares one bucket.
const maxLimitedPods = 10000

func newRefusalLimiter(burst int, every time.Duration) *refusalLimiter {
	return &refusalLimiter{burst: float64(burst), every: every, pods: map[string]*bucket{}}
}

// allow reports whether a refusal of pod may be recorded now and, if so, how many were suppressed
// since the last one recorded.
func (l *refusalLimiter) allow(pod string, now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.pods[pod]
	if b == nil {
		if len(l.pods) >= maxLimitedPods {
			l.sweep(now)
		}
		if len(l.pods) >= maxLimitedPods {
			pod = "\x00overflow"
			b = l.pods[pod]
		}
		if b == nil {
			b = &bucket{tokens: l.burst, last: now}
			l.pods[pod] = b
		}
	}
	if l.every > 0 {
		b.tokens = min(l.burst, b.tokens+float64(now.Sub(b.last))/float64(l.every))
	}
	b.last = now
	if b.tokens < 1 {
		b.suppressed++
		l.suppressed.Add(1)
		return false, 0
	}
	b.tokens--
	n := b.suppressed
	b.suppressed = 0
	return true, n
}

// sweep forgets buckets that have refilled and owe no count, and those idle for ten refills even if
// they owe one (a pod gone long ago; its suppressed refusals stay counted in the metric). Callers
// hold l.mu.
func (l *refusalLimiter) sweep(now time.Time) {
	full := time.Duration(l.burst) * l.every
	for k, b := range l.pods {
		idle := now.Sub(b.last)
		if (b.suppressed == 0 && idle >= full) || idle >= 10*full {
			delete(l.pods, k)
		}
	}
}
