package audit

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// softSigner signs as keyward-kms's HSM does (ASN.1 ECDSA over SHA-256 of the message), with a key in
// memory; the same over SoftHSM is tested in kms/pkcs11 and cmd/keywardctl.
func softSigner(t *testing.T) (*ecdsa.PrivateKey, func(context.Context, []byte) ([]byte, error)) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k, func(_ context.Context, msg []byte) ([]byte, error) {
		sum := sha256.Sum256(msg)
		return ecdsa.SignASN1(rand.Reader, k, sum[:])
	}
}

// checkpointAt runs a log with opts, writes n records and returns the checkpoint of its last record.
func checkpointAt(t *testing.T, opts Options, n int) (*Checkpoint, *Log, *syncBuffer) {
	t.Helper()
	var cps syncBuffer
	opts.SyncInterval, opts.Checkpoints, opts.CheckpointEvery, opts.CheckpointInterval = 5*time.Millisecond, &cps, 5, 10*time.Millisecond
	l, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := l.Record(context.Background(), event(i)); err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
	}
	var cp *Checkpoint
	eventually(t, "a checkpoint of the last record", func() bool {
		cp, err = ReadCheckpoint(strings.NewReader(cps.String()), "node-a", "kms")
		return err == nil && cp.Seq == uint64(n)+1
	})
	return cp, l, &cps
}

// Signed checkpoints: with the signer's public key, verify accepts the stream against its signed
// checkpoint, and refuses a checkpoint whose seq or mac was edited (even one edited to name an
// earlier record of the chain exactly, which the chain alone cannot tell from a genuine older
// checkpoint), an unsigned one, and one signed by another key.
func TestSignedCheckpoints(t *testing.T) {
	key, sign := softSigner(t)
	opts := newOptions(t)
	opts.SignCheckpoint = sign
	cp, l, _ := checkpointAt(t, opts, 20)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if cp.Sig == "" || cp.Unsigned != "" || l.CheckpointSignFailures() != 0 {
		t.Fatalf("checkpoint not signed: %+v, %d failures", cp, l.CheckpointSignFailures())
	}
	vo := verifyOpts(t, opts)
	vo.Checkpoint, vo.CheckpointKey = cp, &key.PublicKey
	if _, err := VerifyDir(opts.Dir, vo); err != nil {
		t.Fatalf("signed checkpoint: %v", err)
	}
	// The public key as keywardctl kms checkpoint-key export writes it.
	der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	pemFile := filepath.Join(t.TempDir(), "pub.pem")
	os.WriteFile(pemFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
	if pub, err := ReadCheckpointKey(pemFile); err != nil || !pub.Equal(&key.PublicKey) {
		t.Fatalf("ReadCheckpointKey: %v", err)
	}

	recs, err := QueryPath(opts.Dir, Filter{})
	if err != nil {
		t.Fatal(err)
	}
	rec10 := recs[9] // seq 10
	refused := func(name string, cp *Checkpoint, key *ecdsa.PublicKey, problem string) {
		t.Helper()
		vo := vo
		vo.Checkpoint, vo.CheckpointKey = cp, key
		if rep, err := VerifyDir(opts.Dir, vo); !errors.Is(err, ErrTampered) || !strings.Contains(rep.Problem, problem) {
			t.Errorf("%s: %q, %v; want %q", name, rep.Problem, err, problem)
		}
	}
	older := *cp
	older.Seq, older.MAC = rec10.Seq, rec10.MAC
	plain := vo
	plain.Checkpoint, plain.CheckpointKey = &older, nil
	if _, err := VerifyDir(opts.Dir, plain); err != nil {
		t.Fatalf("setup: an edited checkpoint naming record 10 exactly should pass the chain alone: %v", err)
	}
	refused("seq and mac edited to an earlier record", &older, &key.PublicKey, "does not carry a valid signature")
	seq := *cp
	seq.Seq = 25
	refused("seq edited", &seq, &key.PublicKey, "does not carry a valid signature")
	mac := *cp
	mac.MAC = strings.Repeat("0", 64)
	refused("mac edited", &mac, &key.PublicKey, "does not carry a valid signature")
	garbled := *cp
	garbled.Sig = "not base64!"
	refused("garbled signature", &garbled, &key.PublicKey, "does not carry a valid signature")
	unsigned := *cp
	unsigned.Sig = ""
	refused("unsigned", &unsigned, &key.PublicKey, "is not signed")
	other, _ := softSigner(t)
	refused("another key", cp, &other.PublicKey, "does not carry a valid signature")
	noCP := vo
	noCP.Checkpoint = nil
	if _, err := VerifyDir(opts.Dir, noCP); err == nil || errors.Is(err, ErrTampered) {
		t.Errorf("a checkpoint key without a checkpoint: %v", err)
	}
}

// A signer that fails, or hangs, never holds up records: they are written (and synced) all along,
// checkpoints go out unsigned saying why, and are counted; Close does not wait for a hung signer.
func TestCheckpointSignerFailureKeepsRecordsFlowing(t *testing.T) {
	key, _ := softSigner(t)
	t.Run("failing", func(t *testing.T) {
		opts := newOptions(t)
		opts.SignCheckpoint = func(context.Context, []byte) ([]byte, error) {
			return nil, errors.New("sign checkpoint: HSM unavailable (token not present)")
		}
		cp, l, _ := checkpointAt(t, opts, 20)
		if err := l.Health(); err != nil {
			t.Fatal(err)
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if cp.Sig != "" || !strings.Contains(cp.Unsigned, "signing failed: sign checkpoint: HSM unavailable") || l.CheckpointSignFailures() == 0 {
			t.Fatalf("checkpoint %+v, %d failures", cp, l.CheckpointSignFailures())
		}
		vo := verifyOpts(t, opts)
		vo.Checkpoint = cp
		if rep, err := VerifyDir(opts.Dir, vo); err != nil || rep.Records != 21 {
			t.Fatalf("records written while signing failed: %+v, %v", rep, err)
		}
		vo.CheckpointKey = &key.PublicKey
		if rep, err := VerifyDir(opts.Dir, vo); !errors.Is(err, ErrTampered) || !strings.Contains(rep.Problem, "could not sign it: signing failed") {
			t.Fatalf("unsigned checkpoint with a key: %q, %v", rep.Problem, err)
		}
	})
	t.Run("hung", func(t *testing.T) {
		opts := newOptions(t)
		release := make(chan struct{})
		defer close(release)
		calls := make(chan struct{}, 100)
		opts.SignCheckpoint = func(context.Context, []byte) ([]byte, error) {
			calls <- struct{}{}
			<-release // ignores its context, as a PKCS#11 call would
			return nil, errors.New("released")
		}
		opts.CheckpointSignTimeout = 50 * time.Millisecond
		cp, l, cps := checkpointAt(t, opts, 20)
		if cp.Sig != "" {
			t.Fatalf("signed by a hung signer: %+v", cp)
		}
		// The hung checkpoint's line is written when its 50ms run out, which may be after the
		// checkpoint of the last record (written at once, unsigned: its signer is still busy).
		eventually(t, "the hung checkpoint written unsigned after its 50ms", func() bool {
			return strings.Contains(cps.String(), `"unsigned":"no signature within 50ms"`)
		})
		for i := range 5 {
			if err := l.Record(context.Background(), event(i)); err != nil {
				t.Fatalf("record while the signer hangs: %v", err)
			}
		}
		eventually(t, "a checkpoint while the signer still hangs", func() bool {
			next, err := ReadCheckpoint(strings.NewReader(cps.String()), "node-a", "kms")
			return err == nil && next.Seq == 26 && next.Unsigned == "the signature of an earlier checkpoint has not returned"
		})
		if len(calls) != 1 {
			t.Fatalf("%d signer calls: a hung signer must not be called again until it returns", len(calls))
		}
		start := time.Now()
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("Close waited %s for a hung signer", d)
		}
		vo := verifyOpts(t, opts)
		vo.Checkpoint = cp
		if rep, err := VerifyDir(opts.Dir, vo); err != nil || rep.Records != 26 {
			t.Fatalf("records written while the signer hung: %+v, %v", rep, err)
		}
	})
}

// A checkpoint is read from kubelet's CRI log file of the daemon's container as from its stdout:
// "TIME stdout F LINE" lines, mixed with other output. A checkpoint line on stderr, a partial line,
// or a line whose prefix is not a CRI prefix is not a checkpoint.
func TestReadCheckpointFromACRILogFile(t *testing.T) {
	line := func(seq int) string {
		return fmt.Sprintf(`{"keyward_audit_checkpoint":{"node":"node-a","stream":"kms","key_id":"k","seq":%d,"mac":"m","time":"2026-12-01T00:00:00Z"}}`, seq)
	}
	cri := strings.Join([]string{
		`2026-12-01T21:00:00.000000001Z stdout F {"level":"info","msg":"serving"}`,
		"2026-12-01T21:00:01.5Z stdout F " + line(7),
		"2026-12-01T21:00:02Z stderr F " + line(9),  // stderr: not the checkpoint sink
		"2026-12-01T21:00:03Z stdout P " + line(10), // a partial line
		"not-a-time stdout F " + line(11),           // not a CRI prefix: not JSON either
		"2026-12-01T21:00:04Z stdout F " + line(8),
		"",
	}, "\n")
	cp, err := ReadCheckpoint(strings.NewReader(cri), "node-a", "kms")
	if err != nil {
		t.Fatal(err)
	}
	if cp.Seq != 8 {
		t.Fatalf("read checkpoint seq %d from the CRI log, want 8 (7 and 8 are stdout's full lines)", cp.Seq)
	}
	// As the daemon wrote it, unwrapped, the same reader takes it.
	if cp, err := ReadCheckpoint(strings.NewReader(line(3)+"\n"), "node-a", "kms"); err != nil || cp.Seq != 3 {
		t.Fatalf("plain line: %+v %v", cp, err)
	}
}
