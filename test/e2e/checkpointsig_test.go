package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	kmsapi "k8s.io/kms/apis/v2"

	"github.com/keyward/keyward/internal/audit"
)

// keyward-kms with pkcs11.auditCheckpointKeyLabel signs its audit checkpoints inside the HSM: the
// checkpoint lines on its stdout carry a signature, keywardctl audit verify checks the stream against
// them with the exported public key, and none went out unsigned.
func TestKMSCheckpointsSignedByTheHSM(t *testing.T) {
	p := newKMSPlugin(t)
	p.proc.stop(t)
	cfg, err := os.ReadFile(p.config)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(p.config, []byte(strings.Replace(string(cfg), "  keyLabel: kek\n", "  keyLabel: kek\n  auditCheckpointKeyLabel: audit-cp\n", 1)), 0o600)
	if code, out := ctl(t, p.env, "kms", "checkpoint-key", "create", "--config", p.config); code != 0 {
		t.Fatalf("checkpoint-key create: %d %s", code, out)
	}
	pub := filepath.Join(p.dir, "checkpoint.pem")
	if code, out := ctl(t, p.env, "kms", "checkpoint-key", "export", "--config", p.config, "--out", pub); code != 0 {
		t.Fatalf("checkpoint-key export: %d %s", code, out)
	}
	stdout := filepath.Join(p.dir, "keyward-kms-signed.log")
	p.proc = startFor(t, t, p.env, stdout, "keyward-kms",
		"--socket", p.socket, "--config", p.config, "--metrics-address", p.metrics,
		"--node-name", "node-1", "--audit-dir", p.auditLog, "--audit-key-file", p.auditKey, "--grace", "5s",
		"--audit-checkpoint-every", "1")
	p.waitHealthz(t, "ok", 30*time.Second)
	for i := range 5 {
		if _, err := p.client.Encrypt(context.Background(), &kmsapi.EncryptRequest{Uid: fmt.Sprint("cp-", i), Plaintext: []byte(secretCanary)}); err != nil {
			t.Fatal(err)
		}
	}
	var last uint64
	eventually(t, 20*time.Second, "a signed checkpoint of the Encrypts' records", func() error {
		f, err := os.Open(stdout)
		if err != nil {
			return err
		}
		defer f.Close()
		cp, err := audit.ReadCheckpoint(f, "node-1", "kms")
		if err != nil {
			return err
		}
		if cp.Sig == "" || cp.Seq < 7 {
			return fmt.Errorf("newest checkpoint %+v", cp)
		}
		last = cp.Seq
		return nil
	})
	if m := p.metric(t, "keyward_audit_checkpoint_sign_failures_total"); m != "keyward_audit_checkpoint_sign_failures_total 0" {
		t.Fatalf("sign failures: %q", m)
	}
	p.proc.stop(t)
	code, out := ctl(t, nil, "audit", "verify", p.auditLog, "--key-file", p.auditKey, "--node", "node-1", "--stream", "kms",
		"--checkpoint", stdout, "--checkpoint-pubkey", pub)
	if code != 0 || !strings.Contains(out, "and its signature verifies") {
		t.Fatalf("audit verify: %d %s", code, out)
	}
	if b, _ := os.ReadFile(stdout); strings.Contains(string(b), `"unsigned"`) || last == 0 {
		t.Fatalf("a checkpoint went out unsigned:\n%s", b)
	}
}
