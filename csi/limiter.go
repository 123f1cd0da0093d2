package csi

import (
	"context"
	"fmt"
	"sync/atomic"

	"golang.org/x/sync/semaphore"

	"github.com/keyward/keyward/internal/fault"
)

// PublishLimiter bounds the publishes (and provider mounts) handled at once, by count and by the sum of their volumes'
// size limits: a publish holds its secrets (and Vault's answers) in memory, up to about twice its
// volume's size, so the bytes bound is what keeps the driver inside its memory limit when many large
// volumes arrive together.
type PublishLimiter struct {
	count, bytes *semaphore.Weighted
	inFlight     atomic.Int64
	waits        atomic.Uint64
}

// NewPublishLimiter allows n publishes at once whose volumes' size limits sum to at most bytes.
func NewPublishLimiter(n int, bytes int64) *PublishLimiter {
	return &PublishLimiter{count: semaphore.NewWeighted(int64(n)), bytes: semaphore.NewWeighted(bytes)}
}

// acquire waits for a slot for a volume of size bytes, until ctx ends (then ErrTooLarge: kubelet
// retries later).
func (l *PublishLimiter) acquire(ctx context.Context, size int64) (func(), error) {
	if !l.count.TryAcquire(1) {
		l.waits.Add(1)
		if err := l.count.Acquire(ctx, 1); err != nil {
			return nil, fmt.Errorf("too many publishes at once, none finished before the deadline (%v): %w", err, fault.ErrTooLarge)
		}
	}
	if !l.bytes.TryAcquire(size) {
		l.waits.Add(1)
		if err := l.bytes.Acquire(ctx, size); err != nil {
			l.count.Release(1)
			return nil, fmt.Errorf("publishes of too many bytes at once, none finished before the deadline (%v): %w", err, fault.ErrTooLarge)
		}
	}
	l.inFlight.Add(1)
	return func() {
		l.inFlight.Add(-1)
		l.bytes.Release(size)
		l.count.Release(1)
	}, nil
}

// InFlight is the number of publishes being handled now (for metrics).
func (l *PublishLimiter) InFlight() int64 { return l.inFlight.Load() }

// Waits counts the publishes that had to wait for a slot (for metrics).
func (l *PublishLimiter) Waits() uint64 { return l.waits.Load() }
