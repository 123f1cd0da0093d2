package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/internal/apiserver"
	"github.com/keyward/keyward/internal/audit"
	auditv1 "github.com/keyward/keyward/proto/keyward/audit/v1"
)

// lyingStream is an AuditStream server without the node's key: it sends what send says.
type lyingStream struct {
	auditv1.UnimplementedAuditStreamServer
	send func(req *auditv1.SubscribeRequest, ss grpc.ServerStreamingServer[auditv1.SubscribeResponse]) error
}

func (s lyingStream) Subscribe(req *auditv1.SubscribeRequest, ss grpc.ServerStreamingServer[auditv1.SubscribeResponse]) error {
	return s.send(req, ss)
}

// serveLying serves s with the node's PKI and allow-lists, on an address of its own.
func (n *apiNode) serveLying(s lyingStream) []string {
	n.t.Helper()
	srv, err := apiserver.Listen(apiserver.Options{Address: "127.0.0.1:0", CertFile: n.pki.ServerCert, KeyFile: n.pki.ServerKey, ClientCAFile: n.pki.CAFile,
		AuditReaders: []string{"security-team"}, Admins: []string{"operator"}}, zaptest.NewLogger(n.t))
	if err != nil {
		n.t.Fatal(err)
	}
	auditv1.RegisterAuditStreamServer(srv.GRPC, s)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ctx, time.Second) }()
	n.t.Cleanup(func() { cancel(); <-done })
	args := n.apiArgs("security-team")
	args[1] = srv.Addr().String()
	return args
}

// genesis is the node's real first record, as the server would send it.
func (n *apiNode) genesis() *auditv1.Record {
	b, err := os.ReadFile(filepath.Join(n.opts.Dir, "audit-00000000000000000001.jsonl"))
	if err != nil {
		n.t.Fatal(err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return &auditv1.Record{Seq: 1, Mac: line[strings.LastIndex(line, `"mac":"`)+7 : len(line)-2], Line: []byte(line), Segment: "audit-00000000000000000001.jsonl"}
}

func rec(r *auditv1.Record) *auditv1.SubscribeResponse {
	return &auditv1.SubscribeResponse{Item: &auditv1.SubscribeResponse_Record{Record: r}}
}

func elided(seq uint64) *auditv1.SubscribeResponse {
	return rec(&auditv1.Record{Seq: seq, Mac: strings.Repeat("e1", 32), Segment: "audit-00000000000000000001.jsonl"})
}

// A server without the node's key can send elided records (seq and a made-up mac), and checkpoints
// naming them: follow must count none of them as verified. A checkpoint naming an elided record
// fails; --until-seq is not reached by an elided record; --state keeps the last record verified, not
// the last elided; an interrupted follow says which records are unverified; a checkpoint of another
// node, stream or key fails.
func TestAuditFollowNeverTrustsElidedRecords(t *testing.T) {
	n := newAPINode(t, 1<<20, 10)
	key, _ := audit.ReadKey(n.keyFile)
	g := n.genesis()
	cp := func(seq uint64, mac string) *auditv1.SubscribeResponse {
		return &auditv1.SubscribeResponse{Item: &auditv1.SubscribeResponse_Checkpoint{Checkpoint: &auditv1.Checkpoint{
			Node: "node-a", Stream: "broker", KeyId: audit.KeyID(key), Seq: seq, Mac: mac, HeadSeq: seq}}}
	}
	// sends sends ms, then ends the stream with Aborted (not retried: follow exits).
	sends := func(ms ...*auditv1.SubscribeResponse) lyingStream {
		return lyingStream{send: func(_ *auditv1.SubscribeRequest, ss grpc.ServerStreamingServer[auditv1.SubscribeResponse]) error {
			for _, m := range ms {
				if err := ss.Send(m); err != nil {
					return err
				}
			}
			return status.Error(codes.Aborted, "the lying server ends here")
		}}
	}
	follow := func(s lyingStream, extra ...string) (int, string) {
		var out, errb syncBuf
		args := append(append([]string{"audit", "follow", "--node", "node-a", "--key-file", n.keyFile, "--retry", "1s"}, extra...), n.serveLying(s)...)
		return run(args, &out, &errb), errb.String()
	}
	withCP := func(c *auditv1.Checkpoint) *auditv1.SubscribeResponse {
		return &auditv1.SubscribeResponse{Item: &auditv1.SubscribeResponse_Checkpoint{Checkpoint: c}}
	}
	mod := func(f func(c *auditv1.Checkpoint)) *auditv1.SubscribeResponse {
		m := cp(1, g.GetMac())
		f(m.GetCheckpoint())
		return m
	}
	for _, c := range []struct {
		name  string
		s     lyingStream
		extra []string
		want  string
	}{
		{"a checkpoint naming an elided record", sends(rec(g), elided(2), elided(3), cp(3, strings.Repeat("e1", 32))), nil, "which it sent elided"},
		{"--until-seq on an elided record", sends(rec(g), elided(2), elided(3)), []string{"--until-seq", "3"}, "the lying server ends here"},
		{"a checkpoint of another node", sends(rec(g), mod(func(c *auditv1.Checkpoint) { c.Node = "node-b" })), nil, `node "node-b"'s`},
		{"a checkpoint of another stream", sends(rec(g), mod(func(c *auditv1.Checkpoint) { c.Stream = "kms" })), nil, `"kms" stream`},
		{"a checkpoint of another key", sends(rec(g), mod(func(c *auditv1.Checkpoint) { c.KeyId = "0000" })), nil, "names key 0000"},
		{"the matching checkpoint", sends(rec(g), withCP(cp(1, g.GetMac()).GetCheckpoint())), nil, "the lying server ends here"},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, stderr := follow(c.s, c.extra...)
			if code != 1 || !strings.Contains(stderr, c.want) {
				t.Fatalf("exit %d, want 1 saying %q: %s", code, c.want, stderr)
			}
		})
	}

	t.Run("--state keeps the last record verified", func(t *testing.T) {
		state := filepath.Join(t.TempDir(), "state")
		code, stderr := follow(sends(rec(g), elided(2), elided(3)), "--state", state)
		if code != 1 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		b, _ := os.ReadFile(state)
		var st followState
		if err := json.Unmarshal(b, &st); err != nil || st.Seq != 1 || st.MAC != g.GetMac() {
			t.Fatalf("state %s (%v), want record 1, the last verified", b, err)
		}
	})

	t.Run("interrupted after elided records", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		orig := followContext
		t.Cleanup(func() { followContext = orig })
		followContext = func() (context.Context, context.CancelFunc) { return context.WithCancel(ctx) }
		s := lyingStream{send: func(req *auditv1.SubscribeRequest, ss grpc.ServerStreamingServer[auditv1.SubscribeResponse]) error {
			if req.GetFromSeq() == 0 {
				for _, m := range []*auditv1.SubscribeResponse{rec(g), elided(2), elided(3)} {
					ss.Send(m)
				}
				return status.Error(codes.Unavailable, "restarting") // follow resubscribes once it took them
			}
			cancel() // ^C, with records 2 and 3 taken
			<-ss.Context().Done()
			return nil
		}}
		code, stderr := follow(s)
		if code != 0 || !strings.Contains(stderr, "stopped after record 1, verified; records 2..3 arrived elided and are not verified") {
			t.Fatalf("exit %d: %s", code, stderr)
		}
	})
}

// --from-seq N mid-segment needs --from-mac (the MAC of record N-1) to continue the chain: without
// it, a usage error (exit 2); with it, the records from N, verified; with a wrong one, exit 1. A
// segment's first record needs none. The first record received must be N.
func TestAuditFollowFromSeq(t *testing.T) {
	n := newAPINode(t, 4096, 100)
	n.write(60)
	last := n.lastOnDisk()
	b, err := audit.ReadAll(n.opts.Dir)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	macOf := func(seq uint64) string {
		l := lines[seq-1]
		return l[strings.LastIndex(l, `"mac":"`)+7 : len(l)-2]
	}
	names, _ := filepath.Glob(filepath.Join(n.opts.Dir, "audit-*.jsonl"))
	if len(names) < 2 {
		t.Fatalf("one segment: %v", names)
	}
	var segStart uint64
	fmt.Sscanf(filepath.Base(names[1]), "audit-%d.jsonl", &segStart)
	mid := segStart + 3
	follow := func(extra ...string) (int, string, string) {
		var out, errb syncBuf
		args := append(append([]string{"audit", "follow", "--node", "node-a", "--key-file", n.keyFile, "--retry", "1s"}, extra...), n.apiArgs("security-team")...)
		return run(args, &out, &errb), out.String(), errb.String()
	}
	until := strconv.FormatUint(last, 10)
	seq := func(s uint64) string { return strconv.FormatUint(s, 10) }

	if code, _, stderr := follow("--from-seq", seq(mid), "--until-seq", until); code != 2 || !strings.Contains(stderr, "--from-mac") {
		t.Errorf("mid-segment without --from-mac: exit %d: %s", code, stderr)
	}
	code, out, stderr := follow("--from-seq", seq(mid), "--from-mac", macOf(mid-1), "--until-seq", until)
	if code != 0 || uint64(strings.Count(out, "\n")) != last-mid+1 || !strings.HasPrefix(out, lines[mid-1]+"\n") {
		t.Errorf("mid-segment with --from-mac: exit %d, %d records: %s", code, strings.Count(out, "\n"), stderr)
	}
	if code, _, stderr := follow("--from-seq", seq(mid), "--from-mac", macOf(mid), "--until-seq", until); code != 1 || !strings.Contains(stderr, "does not verify") {
		t.Errorf("a wrong --from-mac: exit %d: %s", code, stderr)
	}
	if code, out, stderr := follow("--from-seq", seq(segStart), "--until-seq", until); code != 0 || uint64(strings.Count(out, "\n")) != last-segStart+1 {
		t.Errorf("a segment's first record: exit %d: %s", code, stderr)
	}
	if code, _, stderr := follow("--from-mac", macOf(1)); code != 2 {
		t.Errorf("--from-mac alone: exit %d: %s", code, stderr)
	}

	// A server that sends another record than the one asked for.
	g := n.genesis()
	var o, e syncBuf
	lie := n.serveLying(lyingStream{send: func(_ *auditv1.SubscribeRequest, ss grpc.ServerStreamingServer[auditv1.SubscribeResponse]) error {
		ss.Send(rec(g))
		return status.Error(codes.Aborted, "the lying server ends here")
	}})
	args := append([]string{"audit", "follow", "--node", "node-a", "--key-file", n.keyFile, "--from-seq", seq(segStart), "--until-seq", until}, lie...)
	if code := run(args, &o, &e); code != 1 || !strings.Contains(e.String(), "sent record 1 first") {
		t.Errorf("another record first: exit %d: %s", code, e.String())
	}
}
