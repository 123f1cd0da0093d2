package kms

import "context"

// KeyWrapper encrypts and decrypts small payloads (kube-apiserver's DEK seeds) under a
// key-encryption key that it never hands out. Errors wrap fault.ErrInvalid (malformed or tampered
// ciphertext, an unknown key ID, a bad plaintext: the key store is fine) or fault.ErrUnavailable (the
// key store cannot answer now: token gone, session lost, recovering).
type KeyWrapper interface {
	// Wrap encrypts plaintext under the current key and returns the ciphertext and that key's ID.
	Wrap(ctx context.Context, plaintext []byte) (ciphertext []byte, keyID string, err error)
	// Unwrap decrypts ciphertext produced by Wrap under keyID.
	Unwrap(ctx context.Context, ciphertext []byte, keyID string) ([]byte, error)
	// KeyID returns the ID of the key Wrap uses now. It is cheap (no HSM round trip).
	KeyID(ctx context.Context) (string, error)
	// Health proves the key store works now: a real encrypt+decrypt round trip under the current key
	// in the key store itself (no cached or copied key). It may be slow; callers cache its result.
	Health(ctx context.Context) error
}

// MaxCiphertext is kube-apiserver's limit on a KMS v2 ciphertext; MaxKeyID its limit on a key ID.
const (
	MaxCiphertext = 1024
	MaxKeyID      = 1024
	MaxPlaintext  = 256 // a DEK seed is 32 bytes; anything much larger is not a KMS v2 caller
)

// PoolReporter is implemented by wrappers with a session pool (kms/pkcs11), for metrics.
type PoolReporter interface {
	PoolStats() (inUse, idle int)
	Recoveries() uint64
}

// KeyRefusal is a key object found under the wrapper's key label that it refuses to use, and why.
// It names the object (label, key ID) and never carries key material.
type KeyRefusal struct {
	KeyID  string
	Label  string
	Reason string
}

// KeyVetter is implemented by wrappers that vet the origin of their keys (kms/pkcs11): Refusals lists
// the key objects refused at the last key refresh, which the plugin audits.
type KeyVetter interface {
	Refusals() []KeyRefusal
}

// Liveness is implemented by wrappers that can get stuck inside a call they cannot cancel
// (kms/pkcs11: a PKCS#11 call that never returns). Live returns an error while recovery cannot make
// progress without a new process.
type Liveness interface {
	Live() error
}
