package pkcs11

import (
	"fmt"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/kms"
)

// Ciphertext format, version 1:
//
//	byte 0      format version (1)
//	bytes 1..12 the 96-bit GCM IV, fresh per call: random, or the one the HSM generated (see seal)
//	bytes 13..  AES-256-GCM ciphertext with its 128-bit tag
//
// The additional authenticated data is "keyward-kms" || 0x00 || version || key ID, so a ciphertext
// replayed under another key ID, or relabelled with another version, fails authentication.
const (
	formatV1 = 1
	ivLen    = 12
	tagLen   = 16
	header   = 1 + ivLen
)

func aad(version byte, keyID string) []byte {
	b := make([]byte, 0, 13+len(keyID))
	b = append(b, "keyward-kms"...)
	b = append(b, 0, version)
	return append(b, keyID...)
}

// parsed is a ciphertext split into its parts.
type parsed struct {
	version byte
	iv      []byte
	sealed  []byte
}

// parseCiphertext checks the envelope before anything reaches the HSM.
func parseCiphertext(ct []byte) (parsed, error) {
	if len(ct) == 0 {
		return parsed{}, fmt.Errorf("empty ciphertext: %w", fault.ErrInvalid)
	}
	if len(ct) > kms.MaxCiphertext {
		return parsed{}, fmt.Errorf("ciphertext of %d bytes exceeds %d: %w", len(ct), kms.MaxCiphertext, fault.ErrInvalid)
	}
	if ct[0] != formatV1 {
		return parsed{}, fmt.Errorf("unknown ciphertext format version %d: %w", ct[0], fault.ErrInvalid)
	}
	if len(ct) < header+tagLen+1 {
		return parsed{}, fmt.Errorf("ciphertext of %d bytes is too short: %w", len(ct), fault.ErrInvalid)
	}
	return parsed{version: ct[0], iv: ct[1:header], sealed: ct[header:]}, nil
}

// gcmParams is the one AES-GCM parameter builder: the IV and the additional data (aad) of one
// operation. Free them after the operation.
func gcmParams(aad, iv []byte) *p11.GCMParams {
	return p11.NewGCMParams(iv, aad, tagLen*8)
}

// gcm is the mechanism over params. It is small enough to inline, so the mechanism stays on the
// caller's stack (two fewer allocations per operation than a builder that returns both).
func gcm(params *p11.GCMParams) []*p11.Mechanism {
	return []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}
}

// seal encrypts plaintext inside the HSM under the key object obj, format v1, with additional data
// aad (key.aad). iv holds a fresh random IV on entry; on return it holds the IV the module actually
// used, read back from the mechanism parameters after C_Encrypt. Some HSMs (AWS CloudHSM among them)
// ignore the IV the caller sends and write one they generate into CK_GCM_PARAMS.pIv; a ciphertext
// must carry the IV it was made with. SoftHSM uses the IV it is given, so there the two are equal.
func seal(p *p11.Ctx, s p11.SessionHandle, obj p11.ObjectHandle, aad, iv, plaintext []byte) ([]byte, error) {
	params := gcmParams(aad, iv)
	defer params.Free()
	if err := p.EncryptInit(s, gcm(params), obj); err != nil {
		return nil, err
	}
	sealed, err := p.Encrypt(s, plaintext)
	if err != nil {
		return nil, err
	}
	used := params.IV()
	if len(used) != len(iv) {
		return nil, fmt.Errorf("the HSM reports a %d-byte GCM IV, want %d: %w", len(used), len(iv), fault.ErrUnavailable)
	}
	copy(iv, used)
	return sealed, nil
}

// open decrypts a parsed ciphertext inside the HSM under the key object obj, with additional data
// aad (key.aad for format v1).
func open(p *p11.Ctx, s p11.SessionHandle, obj p11.ObjectHandle, aad []byte, c parsed) ([]byte, error) {
	params := gcmParams(aad, c.iv)
	defer params.Free()
	if err := p.DecryptInit(s, gcm(params), obj); err != nil {
		return nil, initError{err}
	}
	return p.Decrypt(s, c.sealed)
}

// initError is a failure to start a decryption: the key or the session failed, never the ciphertext
// (its IV length was checked when it was parsed), so it is not read as a tag mismatch.
type initError struct{ error }

func (e initError) Unwrap() error { return e.error }
