package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/keyward/keyward/internal/apiserver"
	"github.com/keyward/keyward/internal/apiserver/apitest"
	"github.com/keyward/keyward/internal/audit"
)

// apiNode is one node's daemon as far as the API goes: its audit log and the API server over it,
// restartable on the same address.
type apiNode struct {
	t       *testing.T
	pki     *apitest.PKI
	opts    audit.Options
	log     *audit.Log
	addr    string
	admin   apiserver.AdminOptions
	stop    func()
	keyFile string
}

func newAPINode(t *testing.T, maxSegment int64, maxSegments int) *apiNode {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "audit.key")
	os.WriteFile(keyFile, []byte("0123456789abcdef0123456789abcdef-keywardctl-follow"), 0o600)
	n := &apiNode{t: t, pki: apitest.New(t, t.TempDir()), keyFile: keyFile,
		opts: audit.Options{Dir: filepath.Join(dir, "broker-audit"), KeyFile: keyFile, Node: "node-a", Stream: "broker",
			SyncInterval: 5 * time.Millisecond, MaxSegmentBytes: maxSegment, MaxSegments: maxSegments}}
	n.start()
	t.Cleanup(n.shutdown)
	return n
}

// start opens the log (a restart writes audit_start) and serves the API on the node's address.
func (n *apiNode) start() {
	var err error
	if n.log, err = audit.Open(n.opts); err != nil {
		n.t.Fatal(err)
	}
	addr := n.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var srv *apiserver.Server
	for range 50 { // the port of the previous process may linger a moment
		srv, err = apiserver.Listen(apiserver.Options{Address: addr, CertFile: n.pki.ServerCert, KeyFile: n.pki.ServerKey, ClientCAFile: n.pki.CAFile,
			AuditReaders: []string{"security-team"}, Admins: []string{"operator"}}, zaptest.NewLogger(n.t))
		if err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		n.t.Fatal(err)
	}
	n.addr = srv.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	as, _ := apiserver.NewAuditServer(apiserver.AuditOptions{Stream: n.log, Done: ctx.Done()})
	as.Register(srv.GRPC)
	apiserver.NewAdminServer(n.admin).Register(srv.GRPC)
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ctx, time.Second) }()
	n.stop = func() { cancel(); <-done }
}

// restart stops the API and closes the log, as a daemon's exit does, then starts both again.
func (n *apiNode) restart() {
	n.shutdown()
	n.start()
}

func (n *apiNode) shutdown() {
	if n.stop != nil {
		n.stop()
		n.stop = nil
		n.log.Close()
	}
}

func (n *apiNode) write(count int) {
	for i := range count {
		ev := audit.Event{Type: audit.EventMount, RequestID: "vol-" + strconv.Itoa(i), Subject: audit.Subject{Namespace: "payments", Pod: "api-0"},
			Object: audit.Object{Environment: "prod", Ref: "payments/db", Key: "password"}}
		ev.Outcome(nil)
		if err := n.log.Record(context.Background(), ev); err != nil {
			n.t.Fatal(err)
		}
	}
}

// lastOnDisk is the newest record in the node's files, once durable.
func (n *apiNode) lastOnDisk() uint64 {
	key, _ := audit.ReadKey(n.keyFile)
	rep, err := audit.VerifyDir(n.opts.Dir, audit.VerifyOptions{Key: key})
	if err != nil {
		n.t.Fatal(err)
	}
	for {
		if seq, moved := n.log.Durable(); seq >= rep.LastSeq {
			return rep.LastSeq
		} else {
			<-moved
		}
	}
}

func (n *apiNode) apiArgs(cn string) []string {
	cert, key := n.pki.Client(cn)
	return []string{"--addr", n.addr, "--server-name", "localhost", "--ca", n.pki.CAFile, "--cert", cert, "--key", key}
}

// syncBuf is a writer safe to read while keywardctl writes to it.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// keywardctl audit follow stays subscribed while the daemon restarts twice and segments rotate, and
// resumes by itself each time: it prints every record from the genesis to the last one written
// exactly once, as written, and exits 0 at --until-seq; a second run resumes from its --state file.
func TestAuditFollowLosesNothingAcrossRestartsAndRotation(t *testing.T) {
	n := newAPINode(t, 4096, 1000)
	n.write(30)
	state := filepath.Join(t.TempDir(), "follow.state")
	var out, errb syncBuf
	const total = 30 + 3*40 // mount records written; the stream also holds its own records
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	orig := followContext
	t.Cleanup(func() { followContext = orig })
	followContext = func() (context.Context, context.CancelFunc) { return context.WithCancel(ctx) }
	result := make(chan int, 1)
	go func() {
		args := append([]string{"audit", "follow", "--node", "node-a", "--key-file", n.keyFile, "--state", state, "--retry", "20s"},
			n.apiArgs("security-team")...)
		result <- run(args, &out, &errb)
	}()
	// printed waits until follow has printed record seq.
	printed := func(seq uint64) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for !strings.Contains(out.String(), `"seq":`+strconv.FormatUint(seq, 10)+`,"mac"`) {
			if time.Now().After(deadline) {
				t.Fatalf("follow did not print record %d; stderr: %s", seq, errb.String())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	printed(n.lastOnDisk())
	segs := countSegments(n.opts.Dir)
	for round := range 3 {
		n.write(40) // rotates segments while follow is subscribed
		if round < 2 {
			n.restart() // follow's stream ends; it resumes by itself
		}
		printed(n.lastOnDisk())
	}
	if countSegments(n.opts.Dir) <= segs {
		t.Fatal("no segment rotated")
	}
	last := n.lastOnDisk()
	cancel()
	select {
	case code := <-result:
		if code != 0 {
			t.Fatalf("follow exited %d: %s", code, errb.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("follow did not stop: %s", errb.String())
	}
	followContext = orig
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	seen := map[uint64]int{}
	mounts := 0
	for _, l := range lines {
		var r audit.Record
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("not a record: %q", l)
		}
		seen[r.Seq]++
		if r.Type == audit.EventMount {
			mounts++
		}
	}
	for seq := uint64(1); seq <= last; seq++ {
		if seen[seq] != 1 {
			t.Fatalf("record %d printed %d times", seq, seen[seq])
		}
	}
	if mounts != total || uint64(len(lines)) != last {
		t.Fatalf("%d mount records of %d, %d lines for %d records", mounts, total, len(lines), last)
	}
	// The output is the stream as written: byte for byte the files' lines.
	all, _ := audit.ReadAll(n.opts.Dir)
	if strings.TrimSpace(string(all)) != strings.TrimSpace(out.String()) {
		t.Fatal("the printed records differ from the files' lines")
	}
	t.Logf("%d records in %d segments over 2 restarts; stderr:\n%s", last, countSegments(n.opts.Dir), errb.String())

	// A second run resumes after the state file's record, the chain checked across.
	n.write(5)
	next := n.lastOnDisk()
	var out2, errb2 syncBuf
	args := append([]string{"audit", "follow", "--node", "node-a", "--key-file", n.keyFile, "--state", state,
		"--until-seq", strconv.FormatUint(next, 10)}, n.apiArgs("security-team")...)
	if code := run(args, &out2, &errb2); code != 0 {
		t.Fatalf("resumed follow exited %d: %s", code, errb2.String())
	}
	if got := strings.Count(out2.String(), "\n"); uint64(got) != next-last {
		t.Fatalf("resumed follow printed %d records, want %d", got, next-last)
	}
}

func countSegments(dir string) int {
	m, _ := filepath.Glob(filepath.Join(dir, "audit-*.jsonl"))
	return len(m)
}

// A record modified on disk, or a gap (records deleted before follow read them), makes follow exit
// 1 saying so.
func TestAuditFollowFailsOnTamperingAndGaps(t *testing.T) {
	t.Run("modified record", func(t *testing.T) {
		n := newAPINode(t, 1<<20, 10)
		n.write(10)
		last := n.lastOnDisk()
		seg := filepath.Join(n.opts.Dir, fmt.Sprintf("audit-%020d.jsonl", 1))
		b, _ := os.ReadFile(seg)
		os.WriteFile(seg, bytes.Replace(b, []byte(`"vol-5"`), []byte(`"vol-6"`), 1), 0o600)
		var out, errb syncBuf
		args := append([]string{"audit", "follow", "--node", "node-a", "--key-file", n.keyFile, "--until-seq", strconv.FormatUint(last, 10)}, n.apiArgs("security-team")...)
		if code := run(args, &out, &errb); code != 1 || !strings.Contains(errb.String(), "does not verify") {
			t.Fatalf("exit %d: %s", code, errb.String())
		}
	})
	t.Run("gap", func(t *testing.T) {
		n := newAPINode(t, 4096, 2)
		n.write(5)
		state := filepath.Join(t.TempDir(), "state")
		var out, errb syncBuf
		args := append([]string{"audit", "follow", "--node", "node-a", "--key-file", n.keyFile, "--state", state, "--until-seq", "3"}, n.apiArgs("security-team")...)
		if code := run(args, &out, &errb); code != 0 {
			t.Fatalf("exit %d: %s", code, errb.String())
		}
		n.write(300) // segments rotate and the oldest are deleted before follow comes back
		deadline := time.Now().Add(10 * time.Second)
		for countSegments(n.opts.Dir) > 2 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		errb = syncBuf{}
		if code := run(args, &out, &errb); code != 1 || !strings.Contains(errb.String(), "gap: records 4..") {
			t.Fatalf("exit %d: %s", code, errb.String())
		}
	})
	t.Run("wrong certificate", func(t *testing.T) {
		n := newAPINode(t, 1<<20, 10)
		var out, errb syncBuf
		args := append([]string{"audit", "follow", "--node", "node-a", "--key-file", n.keyFile, "--until-seq", "1"}, n.apiArgs("operator")...)
		if code := run(args, &out, &errb); code != 1 || !strings.Contains(errb.String(), "PermissionDenied") {
			t.Fatalf("exit %d: %s", code, errb.String())
		}
	})
}
