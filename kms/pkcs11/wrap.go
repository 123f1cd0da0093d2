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

// Wrap encrypts plaintext inside the HSM with AES-256-GCM under the newest acceptable key generation.
func (w *Wrapper) Wrap(ctx context.Context, plaintext []byte) ([]byte, string, error) {
	if len(plaintext) == 0 || len(plaintext) > kms.MaxPlaintext {
		return nil, "", fmt.Errorf("plaintext of %d bytes (want 1..%d): %w", len(plaintext), kms.MaxPlaintext, fault.ErrInvalid)
	}
	var out []byte
	var keyID string
	err := w.withSession(ctx, "encrypt", func(inc *incarnation, s p11.SessionHandle, ks *keySet) error {
		k := ks.current
		if k == nil {
			return fmt.Errorf("no acceptable key generation labelled %s.N on the token (create one with keywardctl kms keys create): %w",
				w.cfg.KeyLabel, fault.ErrUnavailable)
		}
		// The IV goes straight into the ciphertext: seal overwrites it with the one the HSM used.
		ct := make([]byte, header, header+len(plaintext)+tagLen)
		ct[0] = formatV1
		iv := ct[1:header]
		if _, err := rand.Read(iv); err != nil {
			return err
		}
		sealed, err := seal(inc.p, s, k.work, k.aad, iv, plaintext)
		if err != nil {
			return err
		}
		out, keyID = append(ct, sealed...), k.id
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
			return ks.unknown(keyID)
		}
		pt, err := open(inc.p, s, k.work, k.aad, c)
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

// unknown is the error for a key ID the key set has no key for: refused (and why), or unknown.
func (ks *keySet) unknown(keyID string) error {
	for _, r := range ks.refused {
		if r.KeyID == keyID {
			return fmt.Errorf("key ID %q belongs to a key object keyward-kms refuses (%s): %w", fault.Truncate(keyID, 128), r.Reason, fault.ErrInvalid)
		}
	}
	return fmt.Errorf("unknown key ID %q (retired, or never created on this token): %w", fault.Truncate(keyID, 128), fault.ErrInvalid)
}

// errHung is the cause of a health deadline the wrapper set itself.
var errHung = errors.New("HSM health round trip did not return in time")

// Health runs an AES-GCM encrypt and decrypt of a random probe inside the HSM with the current
// generation's token object (not its session copy), so a token that went away is noticed even while
// the copies still answer, and recovery starts. It returns within CallTimeout (or ctx's deadline, if
// sooner) even when a PKCS#11 call hangs: the round trip then counts as an HSM loss and recovery
// starts, the hung call left to return on its own.
func (w *Wrapper) Health(ctx context.Context) error {
	inc := w.cur.Load()
	if inc == nil {
		return fmt.Errorf("health: HSM unavailable (%s): %w", w.Reason(), fault.ErrUnavailable)
	}
	ctx, cancel := context.WithTimeoutCause(ctx, w.cfg.CallTimeout.Duration, errHung)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.roundTrip(ctx) }()
	var err error
	select {
	case err = <-done:
		if err == nil || !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return err
		}
	case <-ctx.Done():
		if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("health: %w: %w", ctx.Err(), fault.ErrUnavailable)
		}
	}
	// Hung (in a PKCS#11 call, or waiting for a session that hung calls hold): rebuild.
	within := fmt.Sprintf("within the call timeout (%s)", w.cfg.CallTimeout.Duration)
	if context.Cause(ctx) != errHung {
		within = "before the caller's deadline"
	}
	cause := fmt.Errorf("health: the HSM round trip did not return %s: %w", within, fault.ErrUnavailable)
	w.lose(inc, cause)
	return cause
}

// roundTrip is Health's encrypt and decrypt.
func (w *Wrapper) roundTrip(ctx context.Context) error {
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
			return fmt.Errorf("no acceptable key generation labelled %s.N on the token: %w", w.cfg.KeyLabel, fault.ErrUnavailable)
		}
		iv := make([]byte, ivLen)
		if _, err := rand.Read(iv); err != nil {
			return err
		}
		sealed, err := seal(inc.p, s, k.obj, k.aad, iv, probe)
		if err != nil {
			return err
		}
		got, err := open(inc.p, s, k.obj, k.aad, parsed{version: formatV1, iv: iv, sealed: sealed})
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
