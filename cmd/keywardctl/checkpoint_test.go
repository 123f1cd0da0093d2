package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/kms/pkcs11"
	"github.com/keyward/keyward/test/harness"
)

// The operator's path for HSM-signed checkpoints: create the checkpoint key in the HSM, export its
// public key, let keyward-kms's audit stream sign its checkpoints with it, and verify the stream
// against the shipped checkpoint and its signature. A shipped checkpoint edited to an earlier record
// of the chain (which the chain alone accepts) fails with the key, as does an unsigned one.
func TestCheckpointKeyCreateExportAndSignedVerify(t *testing.T) {
	h := harness.SoftHSMT(t, "keyward")
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "kms.yaml")
	writeFile(t, cfgFile, fmt.Sprintf("pkcs11:\n  module: %s\n  tokenLabel: %s\n  pinFile: %s\n  keyLabel: kek\n  auditCheckpointKeyLabel: audit-cp\n",
		h.Module, h.TokenLabel, h.PINFile))
	ctl := func(args ...string) (int, string) {
		var out, errb bytes.Buffer
		code := run(args, &out, &errb)
		return code, out.String() + errb.String()
	}
	pubFile := filepath.Join(dir, "pub.pem")
	if code, out := ctl("kms", "checkpoint-key", "export", "--config", cfgFile, "--out", pubFile); code != 1 || !strings.Contains(out, "checkpoint-key create") {
		t.Fatalf("export before create: %d %s", code, out)
	}
	if code, out := ctl("kms", "keys", "create", "--config", cfgFile); code != 0 {
		t.Fatalf("keys create: %d %s", code, out)
	}
	code, out := ctl("kms", "checkpoint-key", "create", "--config", cfgFile)
	fp := regexp.MustCompile(`fingerprint ([0-9a-f]{16})`).FindStringSubmatch(out)
	if code != 0 || fp == nil || strings.Contains(out, h.UserPIN) {
		t.Fatalf("checkpoint-key create: %d %s", code, out)
	}
	if code, out := ctl("kms", "checkpoint-key", "create", "--config", cfgFile); code != 1 || !strings.Contains(out, "already exist") {
		t.Fatalf("second create: %d %s", code, out)
	}
	if code, out := ctl("kms", "checkpoint-key", "export", "--config", cfgFile); code != 2 {
		t.Fatalf("export without --out: %d %s", code, out)
	}
	if code, out := ctl("kms", "checkpoint-key", "export", "--config", cfgFile, "--out", pubFile); code != 0 || !strings.Contains(out, fp[1]) {
		t.Fatalf("export: %d %s", code, out)
	}
	if b, _ := os.ReadFile(pubFile); !bytes.HasPrefix(b, []byte("-----BEGIN PUBLIC KEY-----\n")) {
		t.Fatalf("exported:\n%s", b)
	}

	// keyward-kms's wiring: the wrapper's signer under the audit log.
	var cfg pkcs11.Config
	cfg.Module, cfg.TokenLabel, cfg.PINFile, cfg.KeyLabel, cfg.AuditCheckpointKeyLabel = h.Module, h.TokenLabel, h.PINFile, "kek", "audit-cp"
	w, err := pkcs11.New(cfg, h.UserPIN, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	keyFile := filepath.Join(dir, "audit.key")
	writeFile(t, keyFile, strings.Repeat("k", 32))
	stream := filepath.Join(dir, "kms-audit")
	var cps lockedBuffer
	l, err := audit.Open(audit.Options{Dir: stream, KeyFile: keyFile, Node: "node-a", Stream: "kms", Checkpoints: &cps,
		CheckpointEvery: 1, CheckpointInterval: time.Millisecond, SyncInterval: 5 * time.Millisecond, SignCheckpoint: w.SignCheckpoint})
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if err := l.Record(context.Background(), audit.Event{Type: audit.EventKMSEncrypt, Decision: audit.Allowed}); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(cps.String(), `"seq":6,`); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no checkpoint written")
		}
	}
	l.Close()
	shipped := filepath.Join(dir, "shipped.log")
	writeFile(t, shipped, "some log line\n"+cps.String())
	verify := func(cpFile string, extra ...string) (int, string) {
		return ctl(append([]string{"audit", "verify", stream, "--key-file", keyFile, "--node", "node-a", "--stream", "kms", "--checkpoint", cpFile}, extra...)...)
	}
	if code, out := verify(shipped, "--checkpoint-pubkey", pubFile); code != 0 || !strings.Contains(out, "checkpoint of record 6 matches and its signature verifies") {
		t.Fatalf("verify: %d %s", code, out)
	}

	// The newest shipped checkpoint edited to name record 5 exactly.
	recs, err := audit.QueryPath(stream, audit.Filter{})
	if err != nil || len(recs) != 6 {
		t.Fatalf("records: %d %v", len(recs), err)
	}
	cp, err := audit.ReadCheckpoint(strings.NewReader(cps.String()), "node-a", "kms")
	if err != nil || cp.Seq != 6 || cp.Sig == "" {
		t.Fatalf("checkpoint: %+v %v", cp, err)
	}
	edited := filepath.Join(dir, "edited.log")
	writeFile(t, edited, strings.NewReplacer(`"seq":6,`, `"seq":5,`, cp.MAC, recs[4].MAC).Replace(cps.String()))
	if code, out := verify(edited); code != 0 || !strings.Contains(out, "checkpoint of record 5 matches") {
		t.Fatalf("setup: the edited checkpoint passes the chain alone: %d %s", code, out)
	}
	if code, out := verify(edited, "--checkpoint-pubkey", pubFile); code != 1 || !strings.Contains(out, "the checkpoint of record 5") ||
		!strings.Contains(out, "does not carry a valid signature") {
		t.Fatalf("verify of an edited checkpoint: %d %s", code, out)
	}
	unsigned := filepath.Join(dir, "unsigned.log")
	writeFile(t, unsigned, regexp.MustCompile(`,"sig":"[^"]*"`).ReplaceAllString(cps.String(), ""))
	if code, out := verify(unsigned, "--checkpoint-pubkey", pubFile); code != 1 || !strings.Contains(out, "is not signed") {
		t.Fatalf("verify of an unsigned checkpoint: %d %s", code, out)
	}
	if code, out := ctl("audit", "verify", stream, "--key-file", keyFile, "--checkpoint-pubkey", pubFile); code != 2 || !strings.Contains(out, "needs --checkpoint") {
		t.Fatalf("pubkey without checkpoint: %d %s", code, out)
	}
}
