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
