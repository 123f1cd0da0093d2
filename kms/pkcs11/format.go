package pkcs11

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strconv"

	"github.com/keyward/keyward/kms"
)

// Ciphertext format, version 1:
//
//	byte 0      format version (1)
//	bytes 1..12 the 96-bit GCM IV, fresh per call
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
		return parsed{}, fmt.Errorf("empty ciphertext: %w", kms.ErrInvalid)
	}
	if len(ct) > kms.MaxCiphertext {
		return parsed{}, fmt.Errorf("ciphertext of %d bytes exceeds %d: %w", len(ct), kms.MaxCiphertext, kms.ErrInvalid)
	}
	if ct[0] != formatV1 {
		return parsed{}, fmt.Errorf("unknown ciphertext format version %d: %w", ct[0], kms.ErrInvalid)
	}
	if len(ct) < header+tagLen+1 {
		return parsed{}, fmt.Errorf("ciphertext of %d bytes is too short: %w", len(ct), kms.ErrInvalid)
	}
	return parsed{version: ct[0], iv: ct[1:header], sealed: ct[header:]}, nil
}

// KeyID derives a key generation's ID from the HSM object's identity: the base label, the generation
// and a fingerprint of the object's CKA_ID (random per object), so an ID is never reused, even when a
// retired generation number is created again, and it is the same after a restart.
func KeyID(label string, generation int, ckaID []byte) string {
	sum := sha256.Sum256(ckaID)
	return label + "." + strconv.Itoa(generation) + "." + hex.EncodeToString(sum[:8])
}

// generationLabel is the CKA_LABEL of one key generation.
func generationLabel(label string, generation int) string {
	return label + "." + strconv.Itoa(generation)
}

// parseGeneration returns the generation of an object labelled label.N, or false.
func parseGeneration(base, objLabel string) (int, bool) {
	m := regexp.MustCompile(`^` + regexp.QuoteMeta(base) + `\.([1-9][0-9]{0,8})$`).FindStringSubmatch(objLabel)
	if m == nil {
		return 0, false
	}
	n, err := strconv.Atoi(m[1])
	return n, err == nil
}
