package apiserver

import (
	"context"
	"testing"
	"time"

	auditv1 "github.com/keyward/keyward/proto/keyward/audit/v1"
)

// TestSubscribeThroughput measures how fast a subscriber catches up on a backlog on disk (over TLS,
// on loopback) and how far behind the live tail it runs while a writer writes as fast as it can.
// It asserts only that everything arrives; the numbers are logged (README: Keyward's API).
func TestSubscribeThroughput(t *testing.T) {
	if testing.Short() {
		t.Skip("measurement")
	}
	e := newEnv(t, 64<<20, 16)
	e.opts.SyncInterval = time.Second // as the daemons run
	l := e.open()
	defer l.Close()
	const backlog = 50000
	record(t, l, backlog)
	want := e.written()
	waitDurable(t, l, want)
	addr, _ := e.serve(l, AuditOptions{}, AdminOptions{})
	cli := auditv1.NewAuditStreamClient(e.dial(addr, e.readerC[0], e.readerC[1]))
	st, err := cli.Subscribe(context.Background(), &auditv1.SubscribeRequest{})
	if err != nil {
		t.Fatal(err)
	}
	sub := newSubscriber(e.key)
	start := time.Now()
	if err := sub.take(st, want); err != nil {
		t.Fatal(err)
	}
	d := time.Since(start)
	t.Logf("backlog: %d records caught up, chain verified, in %v: %.0f records/s", want, d.Round(time.Millisecond), float64(want)/d.Seconds())

	// Live: the writer writes 20000 records as fast as it can; the subscriber follows.
	start = time.Now()
	record(t, l, 20000)
	wrote := time.Since(start)
	last := e.written()
	waitDurable(t, l, last)
	if err := sub.take(st, last); err != nil {
		t.Fatal(err)
	}
	t.Logf("live: 20000 records written in %v (%.0f/s); the subscriber had all of them, verified, %v after the last write",
		wrote.Round(time.Millisecond), 20000/wrote.Seconds(), (time.Since(start) - wrote).Round(time.Millisecond))
}
