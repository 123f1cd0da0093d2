package pkcs11

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/kms"
)

// Wrap encrypts plaintext inside the HSM with AES-256-GCM under the newest key generation.
func (w *Wrapper) Wrap(ctx context.Context, plaintext []byte) ([]byte, string, error) {
	if len(plaintext) == 0 || len(plaintext) > kms.MaxPlaintext {
		return nil, "", fmt.Errorf("plaintext of %d bytes (want 1..%d): %w", len(plaintext), kms.MaxPlaintext, fault.ErrInvalid)
	}
	var out []byte
	var keyID string
	err := w.withSession(ctx, "encrypt", func(inc *incarnation, s p11.SessionHandle, ks *keySet) error {
		k := ks.current
		if k == nil {
			return fmt.Errorf("no key generation labelled %s.N on the token (create one with keywardctl kms keys create): %w",
				w.cfg.KeyLabel, fault.ErrUnavailable)
		}
		iv, err := newIV()
		if err != nil {
			return err
		}
		sealed, err := seal(inc.p, s, k.work, k.id, iv, plaintext)
		if err != nil {
			return err
		}
		out = make([]byte, 0, header+len(sealed))
		out = append(append(append(out, formatV1), iv...), sealed...)
		keyID = k.id
		return nil
	})
	return out, keyID, err
}

// Unwrap decrypts a ciphertext made by Wrap under the generation keyID.
func (w *Wrapper) Unwrap(ctx context.Context, ciphertext []byte, keyID string) ([]byte, error) {
	c, err := parseCiphertext(ciphertext)
	if err != nil {
		return nil, err
	}
	var out []byte
	err = w.withSession(ctx, "decrypt", func(inc *incarnation, s p11.SessionHandle, ks *keySet) error {
		k, ok := ks.byID[keyID]
		if !ok {
			return fmt.Errorf("unknown key ID %q (retired, or never created on this token): %w", fault.Truncate(keyID, 128), fault.ErrInvalid)
		}
		pt, err := open(inc.p, s, k.work, k.id, c)
		if err != nil {
			var ie initError // declared here: it escapes, so only a failure pays for it
			if errors.As(err, &ie) {
				return ie.error // the key or session failed, not the ciphertext
			}
			return inc.decryptFailure(s, keyID, err)
		}
		out = pt
		return nil
	})
	return out, err
}

// Health runs an AES-GCM encrypt and decrypt of a random probe inside the HSM with the current
// generation's token object (not its session copy), so a token that went away is noticed even while
// the copies still answer, and recovery starts.
func (w *Wrapper) Health(ctx context.Context) error {
	probe := make([]byte, 32)
	if _, err := rand.Read(probe); err != nil {
		return err
	}
	return w.withSession(ctx, "health", func(inc *incarnation, s p11.SessionHandle, ks *keySet) error {
		if _, err := inc.p.GetTokenInfo(inc.slot); err != nil {
			return err
		}
		k := ks.current
		if k == nil {
			return fmt.Errorf("no key generation labelled %s.N on the token: %w", w.cfg.KeyLabel, fault.ErrUnavailable)
		}
		iv, err := newIV()
		if err != nil {
			return err
		}
		sealed, err := seal(inc.p, s, k.obj, k.id, iv, probe)
		if err != nil {
			return err
		}
		got, err := open(inc.p, s, k.obj, k.id, parsed{version: formatV1, iv: iv, sealed: sealed})
		if err != nil {
			return err
		}
		if !bytes.Equal(got, probe) {
			return fmt.Errorf("health probe round trip returned other bytes: %w", fault.ErrUnavailable)
		}
		return nil
	})
}

// decryptFailure tells a ciphertext that does not authenticate from an HSM in trouble. HSMs differ:
// SoftHSM answers a GCM tag mismatch with CKR_GENERAL_ERROR, which elsewhere means the device failed.
// So unless the code says "bad data" outright, the session and token are probed: if they answer, the
// ciphertext was at fault (InvalidArgument, and the plugin stays healthy); if not, the probe's error
// starts recovery.
func (inc *incarnation) decryptFailure(s p11.SessionHandle, keyID string, err error) error {
	invalid := fmt.Errorf("ciphertext does not authenticate under key ID %q: %w", fault.Truncate(keyID, 128), fault.ErrInvalid)
	if isCode(err, p11.CKR_ENCRYPTED_DATA_INVALID) || isCode(err, p11.CKR_ENCRYPTED_DATA_LEN_RANGE) {
		return invalid
	}
	if !isCode(err, p11.CKR_GENERAL_ERROR) && !isCode(err, p11.CKR_FUNCTION_FAILED) {
		return err
	}
	if _, perr := inc.p.GetSessionInfo(s); perr != nil {
		return perr
	}
	if _, perr := inc.p.GetTokenInfo(inc.slot); perr != nil {
		return perr
	}
	return invalid
}
