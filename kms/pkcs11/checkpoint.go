package pkcs11

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"strings"

	p11 "github.com/miekg/pkcs11"
	"go.uber.org/zap"

	"github.com/keyward/keyward/internal/fault"
)

// The audit checkpoint key: an ECDSA P-256 key pair generated inside the HSM (keywardctl kms
// checkpoint-key create), labelled Config.AuditCheckpointKeyLabel, with which keyward-kms signs the
// checkpoints of its audit stream (internal/audit's Options.SignCheckpoint); the verifier holds the
// public key (keywardctl kms checkpoint-key export). Like a KEK, the private key is used only if it
// was generated inside the HSM and has never been readable or extractable: an imported key's value
// existed outside the HSM, and whoever had it could sign checkpoints anywhere.

// p256Params is CKA_EC_PARAMS for P-256: the DER of the namedCurve OID 1.2.840.10045.3.1.7.
var p256Params = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}

// checkpointKey is the checkpoint key pair as found on the token.
type checkpointKey struct {
	priv p11.ObjectHandle
	pub  *ecdsa.PublicKey
	// refusal says why the key is not used ("" if it is).
	refusal string
}

// The private key's attributes findCheckpointKey reads, in this order (after CKA_KEY_TYPE).
var checkpointKeyAttrs = []uint{p11.CKA_ID, p11.CKA_EC_PARAMS, p11.CKA_SIGN, p11.CKA_SENSITIVE, p11.CKA_EXTRACTABLE,
	p11.CKA_LOCAL, p11.CKA_ALWAYS_SENSITIVE, p11.CKA_NEVER_EXTRACTABLE}

// findCheckpointKey finds and vets the key pair labelled label: exactly one private key with that
// label, an ECDSA P-256 key generated inside the HSM (CKA_LOCAL=true), always sensitive, never
// extractable, allowed to sign; and its public key (same label and CKA_ID). The error is for PKCS#11
// failures; a missing or unacceptable key is a refusal.
func findCheckpointKey(p *p11.Ctx, s p11.SessionHandle, label string) (checkpointKey, error) {
	privs, err := findObjects(p, s, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
		p11.NewAttribute(p11.CKA_LABEL, label),
	})
	if err != nil {
		return checkpointKey{}, err
	}
	switch len(privs) {
	case 0:
		return checkpointKey{refusal: fmt.Sprintf("no private key labelled %s on the token (create it with keywardctl kms checkpoint-key create)", label)}, nil
	case 1:
	default:
		return checkpointKey{refusal: fmt.Sprintf("duplicate label: %d private keys are labelled %s, none is used", len(privs), label)}, nil
	}
	kt, err := p.GetAttributeValue(s, privs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_KEY_TYPE, nil)})
	if err != nil {
		return checkpointKey{}, err
	}
	if t, _ := bytesToUint(kt[0].Value); t != p11.CKK_EC {
		return checkpointKey{refusal: fmt.Sprintf("%s is not an EC key", label)}, nil
	}
	tmpl := make([]*p11.Attribute, len(checkpointKeyAttrs))
	for i, a := range checkpointKeyAttrs {
		tmpl[i] = p11.NewAttribute(a, nil)
	}
	attrs, err := p.GetAttributeValue(s, privs[0], tmpl)
	if err != nil {
		return checkpointKey{}, err
	}
	why := exposure(boolAttr(attrs[3].Value), boolAttr(attrs[4].Value), boolAttr(attrs[5].Value),
		boolAttr(attrs[6].Value), boolAttr(attrs[7].Value))
	if !bytes.Equal(attrs[1].Value, p256Params) {
		why = append(why, "not a P-256 key")
	}
	if !boolAttr(attrs[2].Value) {
		why = append(why, "CKA_SIGN=false")
	}
	k := checkpointKey{priv: privs[0]}
	pubs, err := findObjects(p, s, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, attrs[0].Value),
	})
	if err != nil {
		return checkpointKey{}, err
	}
	if len(pubs) != 1 {
		why = append(why, fmt.Sprintf("%d public key objects with its label and CKA_ID (want 1)", len(pubs)))
	} else {
		pt, err := p.GetAttributeValue(s, pubs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_EC_POINT, nil)})
		if err != nil {
			return checkpointKey{}, err
		}
		if k.pub, err = parseECPoint(pt[0].Value); err != nil {
			why = append(why, err.Error())
		}
	}
	k.refusal = strings.Join(why, "; ")
	return k, nil
}

// findObjects returns every object matching tmpl.
func findObjects(p *p11.Ctx, s p11.SessionHandle, tmpl []*p11.Attribute) ([]p11.ObjectHandle, error) {
	if err := p.FindObjectsInit(s, tmpl); err != nil {
		return nil, err
	}
	var hs []p11.ObjectHandle
	for {
		batch, _, err := p.FindObjects(s, 16)
		if err != nil {
			p.FindObjectsFinal(s)
			return nil, err
		}
		if len(batch) == 0 {
			break
		}
		hs = append(hs, batch...)
	}
	return hs, p.FindObjectsFinal(s)
}

// parseECPoint reads a P-256 public key from CKA_EC_POINT: the DER OCTET STRING holding the
// uncompressed point, as PKCS#11 specifies (a few HSMs give the raw point; both are read).
func parseECPoint(v []byte) (*ecdsa.PublicKey, error) {
	pt := v
	var inner []byte
	if rest, err := asn1.Unmarshal(v, &inner); err == nil && len(rest) == 0 {
		pt = inner
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), pt)
	if err != nil {
		return nil, fmt.Errorf("CKA_EC_POINT is not a P-256 point: %v", err)
	}
	return pub, nil
}

// signDigest signs a SHA-256 digest with CKM_ECDSA and returns the signature as ASN.1 DER (PKCS#11
// returns r || s, each as long as the curve's order), checked against the public key object: a
// signature that does not verify (a public key object that is not the private key's) is an error.
func signDigest(p *p11.Ctx, s p11.SessionHandle, k checkpointKey, digest []byte) ([]byte, error) {
	if err := p.SignInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}, k.priv); err != nil {
		return nil, err
	}
	raw, err := p.Sign(s, digest)
	if err != nil {
		return nil, err
	}
	sig, err := rawToASN1(raw)
	if err != nil {
		return nil, err
	}
	if !ecdsa.VerifyASN1(k.pub, digest, sig) {
		return nil, fmt.Errorf("the checkpoint key's signature does not verify under its public key object: %w", fault.ErrUnavailable)
	}
	return sig, nil
}

// rawToASN1 converts PKCS#11's ECDSA signature, r || s as two equal-length big-endian integers, to
// the ASN.1 DER SEQUENCE { r INTEGER, s INTEGER } Go and X.509 tools verify.
func rawToASN1(raw []byte) ([]byte, error) {
	if len(raw) == 0 || len(raw)%2 != 0 {
		return nil, fmt.Errorf("CKM_ECDSA returned a %d-byte signature: %w", len(raw), fault.ErrUnavailable)
	}
	n := len(raw) / 2
	return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(raw[:n]), new(big.Int).SetBytes(raw[n:])})
}

// CheckpointKeyFingerprint names a checkpoint public key: the first 8 bytes of SHA-256 over its
// PKIX DER, in hex.
func CheckpointKeyFingerprint(pub *ecdsa.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "invalid"
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:8])
}

// SignCheckpoint signs an audit checkpoint message (internal/audit's Options.SignCheckpoint): an
// ASN.1 DER ECDSA signature over SHA-256 of msg, made inside the HSM with the checkpoint key,
// through the session pool (waiting for a session at most until ctx ends; the PKCS#11 call itself
// cannot be cancelled, which is why the audit log does not wait for it past its timeout). It fails
// while the HSM is unavailable or the key is missing or refused.
func (w *Wrapper) SignCheckpoint(ctx context.Context, msg []byte) ([]byte, error) {
	if w.cfg.AuditCheckpointKeyLabel == "" {
		return nil, errors.New("no pkcs11.auditCheckpointKeyLabel configured")
	}
	digest := sha256.Sum256(msg)
	var sig []byte
	err := w.withSession(ctx, "sign checkpoint", func(inc *incarnation, s p11.SessionHandle, ks *keySet) error {
		k := ks.checkpoint
		if k == nil || k.refusal != "" {
			return fmt.Errorf("checkpoint key %s refused: %s: %w", w.cfg.AuditCheckpointKeyLabel, ks.checkpointRefusal(), fault.ErrUnavailable)
		}
		var err error
		sig, err = signDigest(inc.p, s, *k, digest[:])
		if isCode(err, p11.CKR_KEY_HANDLE_INVALID) || isCode(err, p11.CKR_OBJECT_HANDLE_INVALID) {
			// The key object was destroyed: that is no reason to rebuild the KEKs' session pool (a
			// lost token is found by the health round trip); the next key refresh says what is left.
			return fmt.Errorf("sign checkpoint: the checkpoint key object is gone (%v): %w", err, fault.ErrUnavailable)
		}
		return err
	})
	return sig, err
}

// CheckpointPublicKey returns the checkpoint key's public key as the last key refresh found it, or
// why it is not used.
func (w *Wrapper) CheckpointPublicKey() (*ecdsa.PublicKey, error) {
	if w.cfg.AuditCheckpointKeyLabel == "" {
		return nil, errors.New("no pkcs11.auditCheckpointKeyLabel configured")
	}
	inc := w.cur.Load()
	if inc == nil {
		return nil, fmt.Errorf("HSM unavailable (%s): %w", w.Reason(), fault.ErrUnavailable)
	}
	ks := inc.keys.Load()
	if k := ks.checkpoint; k != nil && k.refusal == "" {
		return k.pub, nil
	}
	return nil, fmt.Errorf("checkpoint key %s refused: %s", w.cfg.AuditCheckpointKeyLabel, ks.checkpointRefusal())
}

func (ks *keySet) checkpointRefusal() string {
	if ks.checkpoint == nil {
		return "not loaded yet"
	}
	return ks.checkpoint.refusal
}

// loadCheckpointKey finds the checkpoint key for a new key set (reloadKeys), logging a refusal once
// per reason and the key when it becomes usable.
func (w *Wrapper) loadCheckpointKey(p *p11.Ctx, s p11.SessionHandle, old, next *keySet) error {
	label := w.cfg.AuditCheckpointKeyLabel
	if label == "" {
		return nil
	}
	k, err := findCheckpointKey(p, s, label)
	if err != nil {
		return fmt.Errorf("checkpoint key %s: %w", label, err)
	}
	next.checkpoint = &k
	if k.refusal != "" {
		w.warnOnce("checkpoint\x00"+k.refusal, func() {
			w.log.Warn("audit checkpoint key refused: checkpoints are written unsigned", zap.String("label", label), zap.String("reason", k.refusal))
		})
		return nil
	}
	if o := old.checkpoint; o == nil || o.refusal != "" || !o.pub.Equal(k.pub) {
		w.log.Info("audit checkpoint key found", zap.String("label", label), zap.String("fingerprint", CheckpointKeyFingerprint(k.pub)))
	}
	return nil
}

// CreateCheckpointKey generates the checkpoint key pair inside the HSM (CKM_EC_KEY_PAIR_GEN, P-256):
// the private key a token object that is private, sensitive, never extractable and may only sign; it
// refuses when any object already has the label.
func (a *Admin) CreateCheckpointKey() (*ecdsa.PublicKey, error) {
	if a.cpLabel == "" {
		return nil, errors.New("pkcs11.auditCheckpointKeyLabel is not set in the config")
	}
	existing, err := findObjects(a.p, a.s, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, a.cpLabel)})
	if err != nil {
		return nil, err
	}
	if len(existing) > 0 {
		return nil, fmt.Errorf("%d object(s) labelled %s already exist; export the key, or choose another label", len(existing), a.cpLabel)
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	_, _, err = a.p.GenerateKeyPair(a.s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_EC_KEY_PAIR_GEN, nil)},
		[]*p11.Attribute{
			p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY),
			p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_EC),
			p11.NewAttribute(p11.CKA_EC_PARAMS, p256Params),
			p11.NewAttribute(p11.CKA_TOKEN, true),
			p11.NewAttribute(p11.CKA_PRIVATE, false),
			p11.NewAttribute(p11.CKA_VERIFY, true),
			p11.NewAttribute(p11.CKA_ENCRYPT, false),
			p11.NewAttribute(p11.CKA_WRAP, false),
			p11.NewAttribute(p11.CKA_LABEL, a.cpLabel),
			p11.NewAttribute(p11.CKA_ID, id),
		},
		[]*p11.Attribute{
			p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
			p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_EC),
			p11.NewAttribute(p11.CKA_TOKEN, true),
			p11.NewAttribute(p11.CKA_PRIVATE, true),
			p11.NewAttribute(p11.CKA_SENSITIVE, true),
			p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
			p11.NewAttribute(p11.CKA_SIGN, true),
			p11.NewAttribute(p11.CKA_DECRYPT, false),
			p11.NewAttribute(p11.CKA_UNWRAP, false),
			p11.NewAttribute(p11.CKA_DERIVE, false),
			p11.NewAttribute(p11.CKA_LABEL, a.cpLabel),
			p11.NewAttribute(p11.CKA_ID, id),
		})
	if err != nil {
		return nil, fmt.Errorf("C_GenerateKeyPair: %w", err)
	}
	return a.CheckpointPublicKey()
}

// CheckpointPublicKey returns the checkpoint key's public key, once the key pair is vetted as
// keyward-kms vets it and a signature made inside the HSM verifies under it (so the public key
// object is the private key's).
func (a *Admin) CheckpointPublicKey() (*ecdsa.PublicKey, error) {
	if a.cpLabel == "" {
		return nil, errors.New("pkcs11.auditCheckpointKeyLabel is not set in the config")
	}
	k, err := findCheckpointKey(a.p, a.s, a.cpLabel)
	if err != nil {
		return nil, err
	}
	if k.refusal != "" {
		return nil, fmt.Errorf("checkpoint key %s is not acceptable: %s", a.cpLabel, k.refusal)
	}
	probe := make([]byte, sha256.Size)
	if _, err := rand.Read(probe); err != nil {
		return nil, err
	}
	if _, err := signDigest(a.p, a.s, k, probe); err != nil {
		return nil, fmt.Errorf("checkpoint key %s: test signature: %w", a.cpLabel, err)
	}
	return k.pub, nil
}

// PublicKeyPEM encodes a public key as a PEM "PUBLIC KEY" (PKIX) block.
func PublicKeyPEM(pub *ecdsa.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}
