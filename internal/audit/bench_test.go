package audit

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkRecord is the cost of one audit record (encode, HMAC chain, write to the kernel).
func BenchmarkRecord(b *testing.B) {
	dir := b.TempDir()
	l, err := Open(Options{Dir: filepath.Join(dir, "stream"), KeyFile: newKeyB(b, dir), Node: "node-a", Stream: "kms", SyncInterval: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	ev := event(1)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := l.Record(context.Background(), ev); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkOpenFullSegment is start-up on a stream whose newest segment is full (64 MiB, the
// default --audit-max-size): the whole segment is verified, so this bounds the time before a
// restarted daemon serves. Older segments cost one line each.
func BenchmarkOpenFullSegment(b *testing.B) {
	dir := b.TempDir()
	opts := Options{Dir: filepath.Join(dir, "stream"), KeyFile: newKeyB(b, dir), Node: "node-a", Stream: "kms",
		SyncInterval: time.Second, MaxSegmentBytes: 1 << 40}
	l, err := Open(opts)
	if err != nil {
		b.Fatal(err)
	}
	ev := event(1)
	for l.size < DefaultMaxSegmentBytes {
		if err := l.Record(context.Background(), ev); err != nil {
			b.Fatal(err)
		}
	}
	l.Close()
	b.SetBytes(DefaultMaxSegmentBytes)
	b.ResetTimer()
	for b.Loop() {
		l, err := Open(opts)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		l.Close()
		b.StartTimer()
	}
}
