package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	kmsapi "k8s.io/kms/apis/v2"

	"github.com/keyward/keyward/internal/apiserver/apitest"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

// The real keyward-kms serves its audit stream on --api-address, and the real keywardctl audit
// follow, started once, follows it while the process is restarted twice (SIGTERM, start again) and
// its 64 KiB segments rotate under KMS traffic: follow resumes by itself and prints every record on
// disk exactly once, byte for byte, with the chain verified; then it stops cleanly on SIGINT.
// keywardctl status reads the same process's Admin.GetHealth.
func TestKMSAuditStreamFollowedAcrossRestartsAndRotation(t *testing.T) {
	p := newKMSPlugin(t)
	p.proc.stop(t)
	pki := apitest.New(t, harness.Dir(t))
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	p.extraArgs = []string{"--audit-max-size", "64Ki", "--api-address", addr, "--api-tls-cert", pki.ServerCert, "--api-tls-key", pki.ServerKey,
		"--api-client-ca", pki.CAFile, "--api-audit-readers", "keyward-security-team", "--api-admins", "keyward-operator"}
	p.start(t)
	reader, readerKey := pki.Client("keyward-security-team")
	op, opKey := pki.Client("keyward-operator")
	api := func(cert, key string) []string {
		return []string{"--addr", addr, "--server-name", "localhost", "--ca", pki.CAFile, "--cert", cert, "--key", key}
	}

	outPath := filepath.Join(p.dir, "follow.out")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	var errb lockedBuffer // the child writes it while the test reads it
	follow := exec.Command(filepath.Join(bin, "keywardctl"), append([]string{"audit", "follow", "--stream", "kms", "--node", "node-1",
		"--key-file", p.auditKey, "--state", filepath.Join(p.dir, "follow.state"), "--retry", "60s"}, api(reader, readerKey)...)...)
	follow.Stdout, follow.Stderr = out, &errb
	follow.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- follow.Wait() }()
	t.Cleanup(func() { follow.Process.Kill() })

	key, _ := audit.ReadKey(p.auditKey)
	lastOnDisk := func() uint64 {
		rep, err := audit.VerifyDir(p.auditLog, audit.VerifyOptions{Key: key, Node: "node-1", Stream: "kms"})
		if err != nil {
			t.Fatal(err)
		}
		return rep.LastSeq
	}
	printed := func(seq uint64) {
		eventually(t, 30*time.Second, "follow prints record "+strconv.FormatUint(seq, 10), func() error {
			b, _ := os.ReadFile(outPath)
			if !bytes.Contains(b, []byte(`"seq":`+strconv.FormatUint(seq, 10)+`,"mac"`)) {
				return fmt.Errorf("not yet; follow's stderr: %s", errb.String())
			}
			return nil
		})
	}
	encrypt := func(n int) {
		for i := range n {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := p.client.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: "e2e-" + strconv.Itoa(i), Plaintext: make([]byte, 32)})
			cancel()
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	start := time.Now()
	for round := range 3 {
		encrypt(250)
		printed(lastOnDisk()) // follow is subscribed and caught up
		if round < 2 {
			p.proc.stop(t) // SIGTERM: the subscription ends, naming where to resume
			p.start(t)
		}
	}
	encrypt(10)
	last := lastOnDisk()
	printed(last)
	segs, _ := filepath.Glob(filepath.Join(p.auditLog, "audit-*.jsonl"))
	if len(segs) < 3 {
		t.Fatalf("%d segments: the stream did not rotate", len(segs))
	}
	follow.Process.Signal(syscall.SIGINT)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("follow: %v; stderr: %s", err, errb.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("follow did not stop on SIGINT")
	}
	got, _ := os.ReadFile(outPath)
	all, _ := audit.ReadAll(p.auditLog)
	if !bytes.Equal(got, all) {
		t.Fatalf("follow printed %d lines, the stream has %d records: not the stream as written", bytes.Count(got, []byte("\n")), last)
	}
	t.Logf("%d records in %d segments, 2 restarts, followed in %s; follow's stderr:\n%s", last, len(segs), time.Since(start).Round(time.Millisecond), errb.String())
	if !strings.Contains(errb.String(), "stopped after record "+strconv.FormatUint(last, 10)+", verified") {
		t.Errorf("follow's last word: %s", errb.String())
	}

	code, status := ctl(t, nil, append([]string{"status"}, api(op, opKey)...)...)
	if code != 0 || !strings.Contains(status, "node-1") || !strings.Contains(status, "kms") || !strings.Contains(status, "true") {
		t.Fatalf("keywardctl status: %d %s", code, status)
	}
	if code, out := ctl(t, nil, append([]string{"volumes"}, api(op, opKey)...)...); code != 1 || !strings.Contains(out, "Unimplemented") {
		t.Fatalf("keywardctl volumes on keyward-kms: %d %s", code, out)
	}
}

// lockedBuffer is a bytes.Buffer a child process writes (through exec's copying goroutine) while
// the test reads it.
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
