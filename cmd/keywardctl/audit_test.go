package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/internal/audit"
)

// The security team's path: derive each node's key from the master, let the node write its stream
// with it and its checkpoints to stdout, then verify the stream with the master key against the
// shipped checkpoints; another node's name, another stream or a truncated stream fails (exit 1).
func TestAuditNodeKeyVerifyAndCheckpoint(t *testing.T) {
	dir := t.TempDir()
	master := filepath.Join(dir, "master.key")
	writeFile(t, master, strings.Repeat("M", 32))
	nodeKey := filepath.Join(dir, "node-a.key")
	ctl := func(args ...string) (int, string) {
		var out, errb bytes.Buffer
		code := run(args, &out, &errb)
		return code, out.String() + errb.String()
	}
	if code, out := ctl("audit", "node-key", "--master-key-file", master, "--node", "node-a", "--out", nodeKey); code != 0 || strings.Contains(out, "MMMM") {
		t.Fatalf("node-key: %d %s", code, out)
	}
	if st, err := os.Stat(nodeKey); err != nil || st.Mode().Perm() != 0o400 {
		t.Fatalf("node key file: %v %v", st, err)
	}
	if code, out := ctl("audit", "node-key", "--master-key-file", master, "--node", "node-a", "--out", nodeKey); code != 1 || !strings.Contains(out, "exists") {
		t.Fatalf("node-key over an existing file: %d %s", code, out)
	}
	stream := filepath.Join(dir, "broker-audit")
	var cps lockedBuffer
	l, err := audit.Open(audit.Options{Dir: stream, KeyFile: nodeKey, Node: "node-a", Stream: "broker", Checkpoints: &cps, SyncInterval: 0})
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if err := l.Record(context.Background(), audit.Event{Type: audit.EventMount, Decision: audit.Allowed}); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(cps.String(), `"seq":6`); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no checkpoint written")
		}
	}
	l.Close()
	shipped := filepath.Join(dir, "shipped.log")
	writeFile(t, shipped, "some log line\n"+cps.String())
	verify := func(extra ...string) (int, string) {
		return ctl(append([]string{"audit", "verify", stream, "--master-key-file", master, "--stream", "broker", "--checkpoint", shipped}, extra...)...)
	}
	if code, out := verify("--node", "node-a"); code != 0 || !strings.Contains(out, "records 1..6") || !strings.Contains(out, "checkpoint of record 6 matches") {
		t.Fatalf("verify: %d %s", code, out)
	}
	if code, out := verify("--node", "node-b"); code != 1 {
		t.Fatalf("verify as node-b: %d %s", code, out)
	}
	seg := filepath.Join(stream, "audit-00000000000000000001.jsonl")
	b, _ := os.ReadFile(seg)
	lines := strings.SplitAfter(string(b), "\n")
	os.WriteFile(seg, []byte(strings.Join(lines[:4], "")), 0o600)
	if code, out := verify("--node", "node-a"); code != 1 || !strings.Contains(out, "truncated") {
		t.Fatalf("verify of a truncated stream: %d %s", code, out)
	}
	if code, out := ctl("audit", "verify", stream, "--master-key-file", master); code != 2 || !strings.Contains(out, "needs --node") {
		t.Fatalf("master key without node: %d %s", code, out)
	}
}

// lockedBuffer is written by the log's background loop while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
