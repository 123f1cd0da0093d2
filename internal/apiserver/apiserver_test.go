package apiserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/internal/apiserver/apitest"
	"github.com/keyward/keyward/internal/audit"
	auditv1 "github.com/keyward/keyward/proto/keyward/audit/v1"
)

// env is a node's audit stream on disk and the PKI of its API.
type env struct {
	t       *testing.T
	dir     string
	opts    audit.Options
	key     []byte
	pki     *apitest.PKI
	readerC [2]string
}

func newEnv(t *testing.T, maxSegment int64, maxSegments int) *env {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "audit.key")
	if err := os.WriteFile(keyFile, []byte("0123456789abcdef0123456789abcdef-apiserver-test"), 0o600); err != nil {
		t.Fatal(err)
	}
	key, _ := audit.ReadKey(keyFile)
	e := &env{t: t, dir: dir, key: key, pki: apitest.New(t, t.TempDir()),
		opts: audit.Options{Dir: filepath.Join(dir, "broker-audit"), KeyFile: keyFile, Node: "node-a", Stream: "broker",
			SyncInterval: 5 * time.Millisecond, MaxSegmentBytes: maxSegment, MaxSegments: maxSegments}}
	c, k := e.pki.Client("security-team")
	e.readerC = [2]string{c, k}
	return e
}

func (e *env) open() *audit.Log {
	l, err := audit.Open(e.opts)
	if err != nil {
		e.t.Fatal(err)
	}
	return l
}

func record(t testing.TB, l *audit.Log, n int) {
	t.Helper()
	for i := range n {
		ev := audit.Event{Type: audit.EventMount, RequestID: "vol-" + strconv.Itoa(i), Subject: audit.Subject{Namespace: "payments", Pod: "api-" + strconv.Itoa(i%3)},
			Object: audit.Object{Environment: "prod", Ref: "payments/db", Key: "password", Version: 3}}
		ev.Outcome(nil)
		if i%4 == 3 {
			ev.Subject.Namespace = "other"
		}
		if err := l.Record(context.Background(), ev); err != nil {
			t.Fatal(err)
		}
	}
}

// serve starts the API on the log (audit and admin services) and returns its address; stop stops it.
func (e *env) serve(l *audit.Log, ao AuditOptions, admin AdminOptions) (addr string, stop func()) {
	e.t.Helper()
	srv, err := Listen(Options{Address: "127.0.0.1:0", CertFile: e.pki.ServerCert, KeyFile: e.pki.ServerKey, ClientCAFile: e.pki.CAFile,
		AuditReaders: []string{"security-team"}, Admins: []string{"CN=operator,O=keyward-test"}}, zaptest.NewLogger(e.t))
	if err != nil {
		e.t.Fatal(err)
	}
	if l != nil {
		ao.Stream = l
	}
	as, err := NewAuditServer(ao)
	if err != nil {
		e.t.Fatal(err)
	}
	as.Register(srv.GRPC)
	NewAdminServer(admin).Register(srv.GRPC)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, time.Second) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Errorf("serve: %v", err)
			}
		})
	}
	e.t.Cleanup(stop)
	return srv.Addr().String(), stop
}

// dial connects with the client certificate files cert/key ("": none) and TLS 1.3.
func (e *env) dial(addr, cert, key string) *grpc.ClientConn {
	e.t.Helper()
	pem, _ := os.ReadFile(e.pki.CAFile)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
	if cert != "" {
		kp, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			e.t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{kp}
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { cc.Close() })
	return cc
}

// subscriber follows a stream the way keywardctl audit follow does: it checks the chain as records
// come, counts each seq, and resumes from its own last record.
type subscriber struct {
	v    *audit.ChainVerifier
	seen map[uint64]int
	cps  int
}

func newSubscriber(key []byte) *subscriber {
	return &subscriber{v: audit.NewChainVerifier(audit.VerifyOptions{Key: key, Node: "node-a", Stream: "broker"}), seen: map[uint64]int{}}
}

func (s *subscriber) next() uint64 { seq, _ := s.v.Head(); return seq + 1 }

// take receives from a subscription until it has record until (or the stream ends: its error).
func (s *subscriber) take(st grpc.ServerStreamingClient[auditv1.SubscribeResponse], until uint64) error {
	for {
		m, err := st.Recv()
		if err != nil {
			return err
		}
		if cp := m.GetCheckpoint(); cp != nil {
			s.cps++
			if seq, mac := s.v.Head(); cp.GetSeq() != seq || cp.GetMac() != mac || cp.GetHeadSeq() < seq {
				return fmt.Errorf("checkpoint %d/%s does not match the chain head %d/%s", cp.GetSeq(), cp.GetMac(), seq, mac)
			}
			continue
		}
		r := m.GetRecord()
		s.seen[r.GetSeq()]++
		first := fmt.Sprintf("audit-%020d.jsonl", r.GetSeq()) == r.GetSegment()
		if len(r.GetLine()) == 0 {
			err = s.v.Elided(r.GetSeq(), r.GetMac())
		} else {
			err = s.v.Record(r.GetLine(), first)
		}
		if err != nil {
			return err
		}
		if r.GetSeq() >= until {
			return nil
		}
	}
}

// written is the newest record in the stream's files.
func (e *env) written() uint64 {
	rep, err := audit.VerifyDir(e.opts.Dir, audit.VerifyOptions{Key: e.key})
	if err != nil {
		e.t.Fatal(err)
	}
	return rep.LastSeq
}

func head(l *audit.Log) uint64 { seq, _ := l.Durable(); return seq }

// waitDurable waits until every record written so far is durable.
func waitDurable(t *testing.T, l *audit.Log, want uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		seq, moved := l.Durable()
		if seq >= want {
			return
		}
		select {
		case <-moved:
		case <-time.After(time.Until(deadline)):
			t.Fatalf("durable head %d, want %d", seq, want)
		}
	}
}

func segments(t *testing.T, dir string) int {
	m, err := filepath.Glob(filepath.Join(dir, "audit-*.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	return len(m)
}

// A subscriber disconnects, the stream rotates, the daemon restarts (the log closed and reopened on
// the same directory, the API served again), segments rotate while it is subscribed, and it resumes
// each time from its own last record: every record from the genesis to the head arrives exactly
// once and the chain verifies across all of it, as VerifyDir says of the directory.
func TestSubscribeResumesAcrossDisconnectRestartAndRotation(t *testing.T) {
	e := newEnv(t, 4096, 1000)
	l := e.open()
	record(t, l, 40)
	addr, stop := e.serve(l, AuditOptions{}, AdminOptions{})
	sub := newSubscriber(e.key)
	ctx := context.Background()

	// 1. From the oldest record, then disconnect mid-stream.
	cctx, cancel := context.WithCancel(ctx)
	st, err := auditv1.NewAuditStreamClient(e.dial(addr, e.readerC[0], e.readerC[1])).Subscribe(cctx, &auditv1.SubscribeRequest{CheckpointEvery: 7})
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.take(st, 25); err != nil {
		t.Fatal(err)
	}
	cancel()

	// 2. Records written while it is away rotate the segment; then the daemon restarts.
	segsBefore := segments(t, e.opts.Dir)
	record(t, l, 60)
	stop()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l = e.open() // writes audit_start
	record(t, l, 20)
	if segments(t, e.opts.Dir) <= segsBefore {
		t.Fatalf("no rotation: %d segments before, %d after", segsBefore, segments(t, e.opts.Dir))
	}
	addr, _ = e.serve(l, AuditOptions{}, AdminOptions{})

	// 3. Resume from its own next record, and stay subscribed while more records rotate segments.
	st, err = auditv1.NewAuditStreamClient(e.dial(addr, e.readerC[0], e.readerC[1])).Subscribe(ctx, &auditv1.SubscribeRequest{Start: from(sub.next()), CheckpointEvery: 7})
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.take(st, head(l)); err != nil {
		t.Fatal(err)
	}
	segsLive := segments(t, e.opts.Dir)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); record(t, l, 80) }()
	wg.Wait()
	want := e.written()
	if want < 40+60+20+80+2 { // the records, the genesis and audit_start, and segment headers
		t.Fatalf("only %d records on disk", want)
	}
	waitDurable(t, l, want)
	if err := sub.take(st, want); err != nil {
		t.Fatal(err)
	}
	if segments(t, e.opts.Dir) <= segsLive {
		t.Fatal("no rotation while subscribed")
	}
	l.Close()

	for seq := uint64(1); seq <= want; seq++ {
		if sub.seen[seq] != 1 {
			t.Errorf("record %d received %d times", seq, sub.seen[seq])
		}
	}
	if len(sub.seen) != int(want) {
		t.Errorf("received %d distinct records, the stream has %d", len(sub.seen), want)
	}
	rep, err := audit.VerifyDir(e.opts.Dir, audit.VerifyOptions{Key: e.key, Node: "node-a", Stream: "broker"})
	if err != nil || rep.LastSeq != want || sub.v.Report().Records != rep.Records {
		t.Fatalf("directory: %+v %v; subscriber verified %d records, want %d", rep, err, sub.v.Report().Records, want)
	}
	if sub.cps == 0 {
		t.Error("no checkpoint in the stream")
	}
	t.Logf("%d records in %d segments, %d checkpoints, chain verified by the subscriber", want, segments(t, e.opts.Dir), sub.cps)
}

// A modified record on disk is caught by the subscriber's own check: the server does not verify,
// it sends the line as written.
func TestSubscriberDetectsAModifiedRecord(t *testing.T) {
	e := newEnv(t, 1<<20, 10)
	l := e.open()
	record(t, l, 10)
	waitDurable(t, l, 11)
	l.Close()
	seg := filepath.Join(e.opts.Dir, fmt.Sprintf("audit-%020d.jsonl", 1))
	b, _ := os.ReadFile(seg)
	b = regexp.MustCompile(`"api-1"`).ReplaceAll(b, []byte(`"api-9"`))
	os.WriteFile(seg, b, 0o600)
	// The file is served by a log opened elsewhere: reopen refuses a tampered stream, so serve it
	// from a Stream over the same directory.
	addr, _ := e.serve(nil, AuditOptions{Stream: fixedStream{dir: e.opts.Dir, head: 11}}, AdminOptions{})
	st, err := auditv1.NewAuditStreamClient(e.dial(addr, e.readerC[0], e.readerC[1])).Subscribe(context.Background(), &auditv1.SubscribeRequest{})
	if err != nil {
		t.Fatal(err)
	}
	sub := newSubscriber(e.key)
	if err := sub.take(st, 11); !errors.Is(err, audit.ErrTampered) {
		t.Fatalf("a modified record passed: %v", err)
	}
}

// fixedStream serves a directory whose durable head does not move.
type fixedStream struct {
	dir  string
	head uint64
}

func (f fixedStream) Dir() string                        { return f.dir }
func (f fixedStream) Node() string                       { return "node-a" }
func (f fixedStream) Stream() string                     { return "broker" }
func (f fixedStream) KeyID() string                      { return "k" }
func (f fixedStream) Durable() (uint64, <-chan struct{}) { return f.head, nil }
func (f fixedStream) Done() <-chan struct{}              { return nil }

func from(seq uint64) *auditv1.SubscribeRequest_FromSeq {
	return &auditv1.SubscribeRequest_FromSeq{FromSeq: seq}
}

// A filtered subscription never sends a checkpoint naming an elided record: the record a checkpoint
// names (by count or by time) is sent whole, even when the filter does not select it, so every
// checkpoint re-anchors the subscriber's chain on a record it verified itself.
func TestCheckpointsNameOnlyWholeRecords(t *testing.T) {
	e := newEnv(t, 1<<20, 10)
	l := e.open()
	defer l.Close()
	record(t, l, 40)
	waitDurable(t, l, 41)
	addr, _ := e.serve(l, AuditOptions{}, AdminOptions{})
	cli := auditv1.NewAuditStreamClient(e.dial(addr, e.readerC[0], e.readerC[1]))
	none := &auditv1.Filter{Namespace: "no-such-namespace"} // selects only the stream's own records
	// recv takes one message: the record (whole or elided, checked) or the checkpoint (checked
	// against what was verified: the last record verified must be the one it names).
	recv := func(st grpc.ServerStreamingClient[auditv1.SubscribeResponse], sub *subscriber) (*auditv1.Record, *auditv1.Checkpoint) {
		t.Helper()
		m, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if cp := m.GetCheckpoint(); cp != nil {
			if seq, mac := sub.v.Verified(); cp.GetSeq() != seq || cp.GetMac() != mac {
				head, _ := sub.v.Head()
				t.Fatalf("checkpoint names record %d; verified up to %d (head %d): it names an elided record", cp.GetSeq(), seq, head)
			}
			return nil, cp
		}
		r := m.GetRecord()
		if len(r.GetLine()) == 0 {
			err = sub.v.Elided(r.GetSeq(), r.GetMac())
		} else {
			err = sub.v.Record(r.GetLine(), r.GetSeq() == 1)
		}
		if err != nil {
			t.Fatal(err)
		}
		return r, nil
	}

	t.Run("by count", func(t *testing.T) {
		st, err := cli.Subscribe(context.Background(), &auditv1.SubscribeRequest{Filter: none, CheckpointEvery: 7})
		if err != nil {
			t.Fatal(err)
		}
		sub := newSubscriber(e.key)
		cps := 0
		for seq := uint64(0); seq < 41; {
			r, cp := recv(st, sub)
			if cp != nil {
				cps++
				continue
			}
			seq = r.GetSeq()
			if whole := len(r.GetLine()) > 0; whole != (seq == 1 || seq%7 == 0) {
				t.Errorf("record %d whole: %v (only the genesis and the checkpointed ones should be)", seq, whole)
			}
		}
		if cps != 5 {
			t.Errorf("%d checkpoints, want 5", cps)
		}
	})
	t.Run("by time", func(t *testing.T) {
		st, err := cli.Subscribe(context.Background(), &auditv1.SubscribeRequest{Filter: none, CheckpointEvery: 1 << 30, CheckpointSeconds: 1})
		if err != nil {
			t.Fatal(err)
		}
		sub := newSubscriber(e.key)
		for seq := uint64(0); seq < 41; {
			r, _ := recv(st, sub)
			if r != nil {
				seq = r.GetSeq()
			}
		}
		// The checkpoint interval passes with record 41, elided, the last sent: no checkpoint may
		// name it; the next record is sent whole and checkpointed.
		time.Sleep(1500 * time.Millisecond)
		record(t, l, 1)
		r, cp := recv(st, sub)
		if cp != nil {
			t.Fatalf("a checkpoint after an elided record: %v", cp)
		}
		if r.GetSeq() != 42 || len(r.GetLine()) == 0 {
			t.Fatalf("record %d whole: %v; want 42, whole (a checkpoint is due)", r.GetSeq(), len(r.GetLine()) > 0)
		}
		if _, cp := recv(st, sub); cp == nil || cp.GetSeq() != 42 {
			t.Fatalf("no checkpoint naming record 42: %v", cp)
		}
	})
}

// A subscription refused for too many subscribers is told to resume where it would have begun: the
// record after its checkpoint, its from_seq, or the oldest record on disk.
func TestTooManySubscribersNamesTheStart(t *testing.T) {
	e := newEnv(t, 1<<20, 10)
	l := e.open()
	defer l.Close()
	record(t, l, 10)
	waitDurable(t, l, 11)
	addr, _ := e.serve(l, AuditOptions{MaxSubscribers: 1}, AdminOptions{})
	cli := auditv1.NewAuditStreamClient(e.dial(addr, e.readerC[0], e.readerC[1]))
	ctx := context.Background()
	st, err := cli.Subscribe(ctx, &auditv1.SubscribeRequest{CheckpointEvery: 5})
	if err != nil {
		t.Fatal(err)
	}
	var cp *auditv1.Checkpoint
	for cp == nil { // the one subscription holds its place
		m, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		cp = m.GetCheckpoint()
	}
	for _, c := range []struct {
		req  *auditv1.SubscribeRequest
		want string
	}{
		{&auditv1.SubscribeRequest{Start: &auditv1.SubscribeRequest_FromCheckpoint{FromCheckpoint: cp}}, fmt.Sprintf("resume with from_seq %d", cp.GetSeq()+1)},
		{&auditv1.SubscribeRequest{Start: from(7)}, "resume with from_seq 7"},
		{&auditv1.SubscribeRequest{}, "resume from the oldest record on disk"},
	} {
		err := firstErr(cli.Subscribe(ctx, c.req))
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), c.want) {
			t.Errorf("%v: %v, want ResourceExhausted saying %q", c.req, err, c.want)
		}
	}
}
