package pkcs11

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
)

const cpLabel = "audit-cp"

func withCheckpointKey(c *Config) { c.AuditCheckpointKeyLabel = cpLabel }

// openAdmin is an Admin sharing the process's module, closed when the test ends.
func (tk *token) openAdmin(t *testing.T) *Admin {
	t.Helper()
	a, err := OpenAdmin(tk.cfg, tk.hsm.UserPIN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	return a
}

// The checkpoint key is generated inside the HSM (private key local, sensitive, never extractable,
// sign only); keyward-kms signs with it through its session pool, and the exported public key
// verifies the signature (ASN.1 DER, as audit verify and X.509 tools read it). Before the key exists,
// and for a message other than the one signed, nothing verifies.
func TestCheckpointKeySignsInsideTheHSM(t *testing.T) {
	tk := newToken(t, withCheckpointKey)
	ctx := context.Background()
	if _, err := tk.w.SignCheckpoint(ctx, []byte("m")); !errors.Is(err, fault.ErrUnavailable) || !strings.Contains(err.Error(), "checkpoint-key create") {
		t.Fatalf("sign before the key exists: %v", err)
	}
	a := tk.openAdmin(t)
	pub, err := a.CreateCheckpointKey()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.CreateCheckpointKey(); err == nil || !strings.Contains(err.Error(), "already exist") {
		t.Fatalf("second create: %v", err)
	}
	privs, _ := findObjects(a.p, a.s, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY), p11.NewAttribute(p11.CKA_LABEL, cpLabel)})
	if len(privs) != 1 {
		t.Fatalf("%d private keys", len(privs))
	}
	attrs, err := a.p.GetAttributeValue(a.s, privs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_LOCAL, nil),
		p11.NewAttribute(p11.CKA_SENSITIVE, nil), p11.NewAttribute(p11.CKA_EXTRACTABLE, nil), p11.NewAttribute(p11.CKA_PRIVATE, nil)})
	if err != nil || !boolAttr(attrs[0].Value) || !boolAttr(attrs[1].Value) || boolAttr(attrs[2].Value) || !boolAttr(attrs[3].Value) {
		t.Fatalf("private key attributes: %v %v", attrs, err)
	}
	if _, err := a.p.GetAttributeValue(a.s, privs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_VALUE, nil)}); err == nil {
		t.Fatal("the private key's value is readable")
	}
	pemBytes, err := PublicKeyPEM(pub)
	if err != nil {
		t.Fatal(err)
	}
	pemFile := t.TempDir() + "/pub.pem"
	if err := os.WriteFile(pemFile, pemBytes, 0o644); err != nil {
		t.Fatal(err)
	}
	exported, err := audit.ReadCheckpointKey(pemFile)
	if err != nil || !exported.Equal(pub) {
		t.Fatalf("exported key: %v", err)
	}

	if err := tk.w.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := tk.w.CheckpointPublicKey(); err != nil || !got.Equal(pub) {
		t.Fatalf("wrapper's public key: %v", err)
	}
	msg := []byte("keyward-audit-checkpoint-v1\n{\"seq\":42}")
	sig, err := tk.w.SignCheckpoint(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(msg)
	if !ecdsa.VerifyASN1(exported, sum[:], sig) {
		t.Fatal("the HSM's signature does not verify under the exported key")
	}
	other := sha256.Sum256([]byte("keyward-audit-checkpoint-v1\n{\"seq\":43}"))
	if ecdsa.VerifyASN1(exported, other[:], sig) {
		t.Fatal("the signature verifies for another message")
	}

	// The key destroyed under the running wrapper: signing fails, the KEKs are not disturbed.
	if err := a.p.DestroyObject(a.s, privs[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := tk.w.SignCheckpoint(ctx, msg); !errors.Is(err, fault.ErrUnavailable) || !strings.Contains(err.Error(), "is gone") {
		t.Fatalf("sign with the key destroyed: %v", err)
	}
	if r := tk.w.Reason(); r != "" || tk.w.Recoveries() != 0 {
		t.Fatalf("a destroyed checkpoint key made the HSM unavailable: %q", r)
	}
	if ct, id, err := tk.w.Wrap(ctx, []byte("seed")); err != nil {
		t.Fatal(err)
	} else if _, err := tk.w.Unwrap(ctx, ct, id); err != nil {
		t.Fatal(err)
	}
}

// The audit stream of keyward-kms with its checkpoints signed inside SoftHSM: the stream verifies
// against its checkpoint with the exported public key; the checkpoint with its seq or mac edited, or
// without its signature, does not. When the HSM cannot sign (here: the wrapper is closed), records
// are still written and checkpoints go out unsigned, saying why, and counted.
func TestAuditCheckpointsSignedByTheHSM(t *testing.T) {
	tk := newToken(t, withCheckpointKey)
	var pub *ecdsa.PublicKey
	tk.admin(t, func(a *Admin) (err error) {
		pub, err = a.CreateCheckpointKey()
		return err
	})
	ctx := context.Background()
	if err := tk.w.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "audit.key")
	os.WriteFile(keyFile, []byte(strings.Repeat("k", 32)), 0o600)
	var cps lockedBuffer
	opts := audit.Options{Dir: filepath.Join(dir, "kms-audit"), KeyFile: keyFile, Node: "node-a", Stream: "kms",
		Checkpoints: &cps, CheckpointEvery: 1, CheckpointInterval: time.Millisecond, SyncInterval: 5 * time.Millisecond,
		SignCheckpoint: tk.w.SignCheckpoint}
	l, err := audit.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	record := func(n int) {
		t.Helper()
		for range n {
			ev := audit.Event{Type: audit.EventKMSEncrypt}
			ev.Outcome(nil)
			if err := l.Record(ctx, ev); err != nil {
				t.Fatal(err)
			}
		}
	}
	newest := func(seq uint64) *audit.Checkpoint {
		t.Helper()
		var cp *audit.Checkpoint
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			cp, err = audit.ReadCheckpoint(strings.NewReader(cps.String()), "node-a", "kms")
			if err == nil && cp.Seq == seq {
				return cp
			}
			if time.Now().After(deadline) {
				t.Fatalf("no checkpoint of record %d: %v\n%s", seq, err, cps.String())
			}
		}
	}
	record(10)
	cp := newest(11)
	if cp.Sig == "" {
		t.Fatalf("checkpoint not signed: %+v", cp)
	}
	key, _ := audit.ReadKey(keyFile)
	vo := audit.VerifyOptions{Key: key, Node: "node-a", Stream: "kms", Checkpoint: cp, CheckpointKey: pub}
	if _, err := audit.VerifyDir(opts.Dir, vo); err != nil {
		t.Fatalf("signed checkpoint: %v", err)
	}
	for name, edit := range map[string]func(c *audit.Checkpoint){
		"seq edited": func(c *audit.Checkpoint) { c.Seq-- },
		"mac edited": func(c *audit.Checkpoint) { c.MAC = strings.Repeat("0", 64) },
		"unsigned":   func(c *audit.Checkpoint) { c.Sig = "" },
	} {
		forged := *cp
		edit(&forged)
		vo := vo
		vo.Checkpoint = &forged
		if rep, err := audit.VerifyDir(opts.Dir, vo); !errors.Is(err, audit.ErrTampered) || !strings.Contains(rep.Problem, "the checkpoint of record") {
			t.Errorf("%s: %q, %v", name, rep.Problem, err)
		}
	}

	tk.w.Close() // the HSM can no longer sign
	record(10)
	cp = newest(21)
	if cp.Sig != "" || !strings.Contains(cp.Unsigned, "HSM unavailable") || l.CheckpointSignFailures() == 0 || l.Health() != nil {
		t.Fatalf("checkpoint while the HSM cannot sign: %+v, %d failures, health %v", cp, l.CheckpointSignFailures(), l.Health())
	}
	vo.Checkpoint, vo.CheckpointKey = cp, nil
	if rep, err := audit.VerifyDir(opts.Dir, vo); err != nil || rep.Records != 21 {
		t.Fatalf("records written while the HSM could not sign: %+v, %v", rep, err)
	}
	vo.CheckpointKey = pub
	if rep, err := audit.VerifyDir(opts.Dir, vo); !errors.Is(err, audit.ErrTampered) || !strings.Contains(rep.Problem, "could not sign it") {
		t.Fatalf("the unsigned checkpoint with the key: %q, %v", rep.Problem, err)
	}
}

// lockedBuffer is written by the audit log's background work while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
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

// Only a checkpoint key generated inside the HSM and never exposed is used: an imported P-256 key
// (its value known outside the HSM, so checkpoints could be signed anywhere), one that was once
// extractable, or a duplicate label is refused by keyward-kms (SignCheckpoint fails, saying why) and
// by export.
func TestCheckpointKeyOfProvenOriginOnly(t *testing.T) {
	for _, tc := range []struct {
		name string
		add  func(t *testing.T, a *Admin)
		why  string
	}{
		{"imported known key", func(t *testing.T, a *Admin) { importECKey(t, a) }, "CKA_LOCAL=false"},
		{"once extractable", func(t *testing.T, a *Admin) {
			h := generateECKey(t, a, true)
			if err := a.p.SetAttributeValue(a.s, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_EXTRACTABLE, false)}); err != nil {
				t.Fatal(err)
			}
		}, "CKA_NEVER_EXTRACTABLE=false"},
		{"duplicate label", func(t *testing.T, a *Admin) {
			if _, err := a.CreateCheckpointKey(); err != nil {
				t.Fatal(err)
			}
			generateECKey(t, a, false)
		}, "2 private keys are labelled audit-cp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tk := newToken(t, withCheckpointKey)
			a := tk.openAdmin(t)
			tc.add(t, a)
			if _, err := a.CheckpointPublicKey(); err == nil || !strings.Contains(err.Error(), tc.why) {
				t.Fatalf("export: %v; want %q", err, tc.why)
			}
			if err := tk.w.Refresh(context.Background()); err != nil {
				t.Fatal(err)
			}
			if _, err := tk.w.SignCheckpoint(context.Background(), []byte("m")); !errors.Is(err, fault.ErrUnavailable) || !strings.Contains(err.Error(), tc.why) {
				t.Fatalf("sign: %v; want %q", err, tc.why)
			}
			if _, err := tk.w.CheckpointPublicKey(); err == nil || !strings.Contains(err.Error(), tc.why) {
				t.Fatalf("wrapper public key: %v", err)
			}
		})
	}
}

// PKCS#11's r || s becomes the DER SEQUENCE of two INTEGERs, leading zeros dropped and a sign byte
// added where the high bit is set.
func TestRawSignatureToASN1(t *testing.T) {
	raw := make([]byte, 64)
	raw[31], raw[32] = 0x01, 0x80
	der, err := rawToASN1(raw)
	if err != nil {
		t.Fatal(err)
	}
	var rs struct{ R, S []byte }
	var ints struct{ R, S asn1.RawValue }
	if _, err := asn1.Unmarshal(der, &ints); err != nil {
		t.Fatal(err)
	}
	rs.R, rs.S = ints.R.Bytes, ints.S.Bytes
	if len(rs.R) != 1 || rs.R[0] != 1 || len(rs.S) != 33 || rs.S[0] != 0 || rs.S[1] != 0x80 {
		t.Fatalf("r %x s %x", rs.R, rs.S)
	}
	if _, err := rawToASN1(make([]byte, 63)); err == nil {
		t.Fatal("odd-length signature accepted")
	}
}

// importECKey is the attack: C_CreateObject of a P-256 key pair whose private value is known outside
// the HSM, labelled as the checkpoint key and marked sensitive and non-extractable.
func importECKey(t *testing.T, a *Admin) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := k.Bytes()
	pt, _ := k.PublicKey.Bytes()
	point, _ := asn1.Marshal(pt)
	id := make([]byte, 16)
	rand.Read(id)
	for _, tmpl := range [][]*p11.Attribute{{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_EC),
		p11.NewAttribute(p11.CKA_EC_PARAMS, p256Params),
		p11.NewAttribute(p11.CKA_VALUE, d),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_SIGN, true),
		p11.NewAttribute(p11.CKA_LABEL, cpLabel),
		p11.NewAttribute(p11.CKA_ID, id),
	}, {
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_EC),
		p11.NewAttribute(p11.CKA_EC_PARAMS, p256Params),
		p11.NewAttribute(p11.CKA_EC_POINT, point),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_VERIFY, true),
		p11.NewAttribute(p11.CKA_LABEL, cpLabel),
		p11.NewAttribute(p11.CKA_ID, id),
	}} {
		if _, err := a.p.CreateObject(a.s, tmpl); err != nil {
			t.Fatal(err)
		}
	}
}

// generateECKey generates a P-256 key pair in the HSM labelled as the checkpoint key, extractable or
// not at generation; it returns the private key.
func generateECKey(t *testing.T, a *Admin, extractable bool) p11.ObjectHandle {
	t.Helper()
	id := make([]byte, 16)
	rand.Read(id)
	_, priv, err := a.p.GenerateKeyPair(a.s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_EC_KEY_PAIR_GEN, nil)},
		[]*p11.Attribute{
			p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_EC),
			p11.NewAttribute(p11.CKA_EC_PARAMS, p256Params),
			p11.NewAttribute(p11.CKA_TOKEN, true),
			p11.NewAttribute(p11.CKA_VERIFY, true),
			p11.NewAttribute(p11.CKA_LABEL, cpLabel),
			p11.NewAttribute(p11.CKA_ID, id),
		},
		[]*p11.Attribute{
			p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_EC),
			p11.NewAttribute(p11.CKA_TOKEN, true),
			p11.NewAttribute(p11.CKA_PRIVATE, true),
			p11.NewAttribute(p11.CKA_SENSITIVE, true),
			p11.NewAttribute(p11.CKA_EXTRACTABLE, extractable),
			p11.NewAttribute(p11.CKA_SIGN, true),
			p11.NewAttribute(p11.CKA_LABEL, cpLabel),
			p11.NewAttribute(p11.CKA_ID, id),
		})
	if err != nil {
		t.Fatal(err)
	}
	return priv
}
