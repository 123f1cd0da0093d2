package pkcs11

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"strings"
	"testing"

	p11 "github.com/miekg/pkcs11"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// knownKEK is key material an attacker with the user PIN knows and imports into the token.
var knownKEK = bytes.Repeat([]byte{0x42}, 32)

// importKnownKey is the attack: C_CreateObject of an AES-256 key whose value the attacker knows,
// labelled as the next generation and marked sensitive and non-extractable, as a generated KEK is.
func importKnownKey(t *testing.T, a *Admin, label string) {
	t.Helper()
	id := make([]byte, 16)
	rand.Read(id)
	_, err := a.p.CreateObject(a.s, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_ENCRYPT, true),
		p11.NewAttribute(p11.CKA_DECRYPT, true),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
		p11.NewAttribute(p11.CKA_VALUE, knownKEK),
	})
	if err != nil {
		t.Fatal(err)
	}
}

// generateKey generates an AES key inside the token with the given label, length, and sensitivity
// and extractability at generation; then applies later attribute changes.
func generateKey(t *testing.T, a *Admin, label string, valueLen int, sensitive, extractable bool, later ...*p11.Attribute) {
	t.Helper()
	id := make([]byte, 16)
	rand.Read(id)
	h, err := a.p.GenerateKey(a.s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_KEY_GEN, nil)}, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
		p11.NewAttribute(p11.CKA_VALUE_LEN, valueLen),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, sensitive),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, extractable),
		p11.NewAttribute(p11.CKA_ENCRYPT, true),
		p11.NewAttribute(p11.CKA_DECRYPT, true),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(later) > 0 {
		if err := a.p.SetAttributeValue(a.s, h, later); err != nil {
			t.Fatal(err)
		}
	}
}

// openWith decrypts a keyward ciphertext offline with a known key, as an attacker holding a copy of
// etcd would.
func openWith(key, ct []byte, keyID string) ([]byte, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	g, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return g.Open(nil, ct[1:header], ct[header:], aad(ct[0], keyID))
}

// sealWith makes a keyward ciphertext offline under a known key.
func sealWith(key, pt []byte, keyID string) []byte {
	block, _ := aes.NewCipher(key)
	g, _ := cipher.NewGCM(block)
	iv := make([]byte, ivLen)
	rand.Read(iv)
	return g.Seal(append([]byte{formatV1}, iv...), iv, pt, aad(formatV1, keyID))
}

// Only keys generated inside the HSM and never exposed are KEKs: an imported key (its value known
// outside the HSM) or a key that was once extractable or not sensitive is refused, as are generation
// labels held by more than one object. A refused object is never used to wrap or unwrap; what was
// wrapped before stays decryptable; the log, Admin.List and Refusals say why.
func TestOnlyKeysOfProvenOriginAreUsed(t *testing.T) {
	for _, tc := range []struct {
		name string
		add  func(t *testing.T, a *Admin)
		why  string
	}{
		{"imported known key", func(t *testing.T, a *Admin) { importKnownKey(t, a, "kek.2") }, "CKA_LOCAL=false"},
		{"once extractable", func(t *testing.T, a *Admin) {
			generateKey(t, a, "kek.2", 32, true, true, p11.NewAttribute(p11.CKA_EXTRACTABLE, false))
		}, "CKA_NEVER_EXTRACTABLE=false"},
		{"once not sensitive", func(t *testing.T, a *Admin) {
			generateKey(t, a, "kek.2", 32, false, false, p11.NewAttribute(p11.CKA_SENSITIVE, true))
		}, "CKA_ALWAYS_SENSITIVE=false"},
		{"AES-128", func(t *testing.T, a *Admin) { generateKey(t, a, "kek.2", 16, true, false) }, "not AES-256"},
		{"duplicate label", func(t *testing.T, a *Admin) {
			generateKey(t, a, "kek.2", 32, true, false)
			generateKey(t, a, "kek.2", 32, true, false)
		}, "2 objects are labelled kek.2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tk := newToken(t)
			core, logs := observer.New(zapcore.InfoLevel)
			tk.w.Close()
			w, err := New(tk.cfg, tk.hsm.UserPIN, zap.New(core))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { w.Close() })
			ctx := context.Background()
			pt := []byte("0123456789abcdef0123456789abcdef")
			before, kek1, err := w.Wrap(ctx, pt)
			if err != nil {
				t.Fatal(err)
			}

			tk.admin(t, func(a *Admin) error { tc.add(t, a); return nil })
			if err := w.Refresh(ctx); err != nil {
				t.Fatal(err)
			}

			// Admin.List says which generations are acceptable, and why not.
			var refused []Generation
			tk.admin(t, func(a *Admin) error {
				gens, err := a.List()
				for _, g := range gens {
					if g.Generation == 1 && (!g.Usable || g.Refusal != "") {
						t.Errorf("generation 1 refused: %q", g.Refusal)
					}
					if g.Generation == 2 {
						refused = append(refused, g)
					}
				}
				return err
			})
			if len(refused) == 0 {
				t.Fatal("generation 2 not listed")
			}
			for _, g := range refused {
				if g.Usable || !strings.Contains(g.Refusal, tc.why) {
					t.Errorf("generation 2 %s: usable %v, refusal %q; want refused for %q", g.KeyID, g.Usable, g.Refusal, tc.why)
				}
			}

			// Never used to wrap: the current key is still generation 1.
			if cur, _ := w.KeyID(ctx); cur != kek1 {
				t.Fatalf("current key %s, want %s", cur, kek1)
			}
			after, id, err := w.Wrap(ctx, pt)
			if err != nil || id != kek1 {
				t.Fatalf("wrap after the refused key appeared: key %s, %v; want %s", id, err, kek1)
			}
			if got, err := openWith(knownKEK, after, id); err == nil || bytes.Equal(got, pt) {
				t.Fatal("a DEK seed wrapped after the import decrypts offline with the imported key")
			}
			// Never used to unwrap: not even a ciphertext made under it.
			for _, g := range refused {
				if _, err := w.Unwrap(ctx, sealWith(knownKEK, pt, g.KeyID), g.KeyID); err == nil {
					t.Errorf("unwrapped under refused key %s", g.KeyID)
				}
			}
			// What was wrapped before still decrypts.
			for _, ct := range [][]byte{before, after} {
				if got, err := w.Unwrap(ctx, ct, kek1); err != nil || !bytes.Equal(got, pt) {
					t.Fatalf("unwrap under generation 1: %v", err)
				}
			}
			// The wrapper says why: in its log (once per object), and to the plugin for the audit stream.
			for _, g := range refused {
				lines := logs.FilterMessageSnippet("refused").FilterField(zap.String("key_id", g.KeyID)).All()
				if len(lines) != 1 || !strings.Contains(lines[0].ContextMap()["reason"].(string), tc.why) {
					t.Errorf("log lines for %s: %v", g.KeyID, lines)
				}
			}
			rs := w.Refusals()
			if len(rs) != len(refused) {
				t.Fatalf("Refusals = %+v, want %d", rs, len(refused))
			}
			for _, r := range rs {
				if r.Label != "kek.2" || !strings.Contains(r.Reason, tc.why) {
					t.Errorf("refusal %+v", r)
				}
			}
			// Another refresh neither logs again nor changes anything.
			if err := w.Refresh(ctx); err != nil {
				t.Fatal(err)
			}
			if n := logs.FilterMessageSnippet("refused").Len(); n != len(refused) {
				t.Errorf("%d refusal log lines after a second refresh, want %d", n, len(refused))
			}
		})
	}
}

// An imported key is refused even when it is the only generation: the wrapper then has no KEK.
func TestImportedFirstGenerationLeavesNoKey(t *testing.T) {
	tk := newToken(t)
	tk.admin(t, func(a *Admin) error {
		gens, err := a.List()
		if err != nil {
			return err
		}
		return a.p.DestroyObject(a.s, gens[0].handle)
	})
	tk.admin(t, func(a *Admin) error { importKnownKey(t, a, "kek.1"); return nil })
	if err := tk.w.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	if id, err := tk.w.KeyID(context.Background()); err == nil {
		t.Fatalf("imported key accepted as the only generation: %s", id)
	}
	if _, _, err := tk.w.Wrap(context.Background(), []byte("x")); err == nil {
		t.Fatal("wrapped under an imported key")
	}
}

// Retire may destroy a refused object even when it carries the highest generation number, and
// rotation numbers past it; the newest acceptable generation stays protected.
func TestRetireAndRotateAroundARefusedKey(t *testing.T) {
	tk := newToken(t)
	tk.admin(t, func(a *Admin) error {
		importKnownKey(t, a, "kek.2")
		gens, err := a.List()
		if err != nil {
			return err
		}
		if err := a.Retire(gens[0].KeyID); err == nil {
			t.Error("retired the newest acceptable generation")
		}
		if err := a.Retire(gens[1].KeyID); err != nil {
			t.Errorf("retiring the refused object: %v", err)
		}
		g, err := a.Rotate()
		if err != nil {
			return err
		}
		if g.Generation != 2 || !g.Usable {
			t.Errorf("rotated to %+v", g)
		}
		return nil
	})
}
