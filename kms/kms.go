package kms

import (
	"context"
	"fmt"
	"time"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/config"
)

// KeyWrapper encrypts and decrypts small payloads (kube-apiserver's DEK seeds) under a
// key-encryption key that it never hands out.
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

// The errors a KeyWrapper wraps; the gRPC adapter maps them to codes in one place (toStatus).
var (
	// ErrInvalid: malformed or tampered ciphertext, an unknown key ID, a bad plaintext. The HSM is fine.
	ErrInvalid = broker.ErrInvalid
	// ErrUnavailable: the HSM cannot answer now (token gone, session lost, recovering).
	ErrUnavailable = broker.ErrUnavailable
)

// MaxCiphertext is kube-apiserver's limit on a KMS v2 ciphertext; MaxKeyID its limit on a key ID.
const (
	MaxCiphertext = 1024
	MaxKeyID      = 1024
	MaxPlaintext  = 256 // a DEK seed is 32 bytes; anything much larger is not a KMS v2 caller
)

// PKCS11Config locates the HSM and the key-encryption key. The PIN is read from PINFile only.
type PKCS11Config struct {
	// Module is the path of the PKCS#11 library (for SoftHSM2: /usr/lib/softhsm/libsofthsm2.so).
	Module string `json:"module"`
	// TokenLabel selects the token; Slot may be given instead.
	TokenLabel string `json:"tokenLabel,omitempty"`
	Slot       *uint  `json:"slot,omitempty"`
	// PINFile holds the user PIN.
	PINFile string `json:"pinFile"`
	// KeyLabel is the base label of the key generations: objects labelled KeyLabel.1, KeyLabel.2, ...
	KeyLabel string `json:"keyLabel"`
	// MaxSessions bounds the session pool (default 8).
	MaxSessions int `json:"maxSessions,omitempty"`
	// SessionKeyCopies uses session-object copies of the token keys for speed (default true). The
	// copies stay inside the HSM, sensitive and non-extractable.
	SessionKeyCopies *bool `json:"sessionKeyCopies,omitempty"`
	// KeyRefreshInterval is how often new key generations are looked for (default 30s; SIGHUP also).
	KeyRefreshInterval Duration `json:"keyRefreshInterval,omitempty"`
}

// Config is keyward-kms's configuration file.
type Config struct {
	PKCS11 PKCS11Config `json:"pkcs11"`
	// HealthInterval is how often the background encrypt+decrypt round trip runs (default 10s).
	HealthInterval Duration `json:"healthInterval,omitempty"`
}

// Duration is a time.Duration written as a Go duration string ("30s") in YAML.
type Duration = config.Duration

// LoadConfig reads a YAML config strictly (unknown keys are an error), applies defaults and validates.
func LoadConfig(path string) (Config, error) {
	var c Config
	if err := config.LoadStrict(path, &c); err != nil {
		return Config{}, err
	}
	c.Default()
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Default fills in defaults.
func (c *Config) Default() {
	if c.HealthInterval.Duration == 0 {
		c.HealthInterval.Duration = 10 * time.Second
	}
	c.PKCS11.Default()
}

// Default fills in defaults.
func (c *PKCS11Config) Default() {
	if c.MaxSessions == 0 {
		c.MaxSessions = 8
	}
	if c.KeyRefreshInterval.Duration == 0 {
		c.KeyRefreshInterval.Duration = 30 * time.Second
	}
	if c.SessionKeyCopies == nil {
		t := true
		c.SessionKeyCopies = &t
	}
}

// Validate reports the first problem with the configuration.
func (c Config) Validate() error {
	if c.HealthInterval.Duration < 100*time.Millisecond {
		return fmt.Errorf("healthInterval %s is below 100ms", c.HealthInterval)
	}
	return c.PKCS11.Validate()
}

// Validate reports the first problem with the PKCS#11 settings.
func (c PKCS11Config) Validate() error {
	switch {
	case c.Module == "":
		return fmt.Errorf("pkcs11.module is required")
	case c.TokenLabel == "" && c.Slot == nil:
		return fmt.Errorf("pkcs11.tokenLabel or pkcs11.slot is required")
	case c.TokenLabel != "" && c.Slot != nil:
		return fmt.Errorf("set pkcs11.tokenLabel or pkcs11.slot, not both")
	case c.PINFile == "":
		return fmt.Errorf("pkcs11.pinFile is required (the PIN is never taken from the config or a flag)")
	case c.KeyLabel == "":
		return fmt.Errorf("pkcs11.keyLabel is required")
	case len(c.KeyLabel) > 200:
		return fmt.Errorf("pkcs11.keyLabel is longer than 200 bytes")
	case c.MaxSessions < 1 || c.MaxSessions > 1024:
		return fmt.Errorf("pkcs11.maxSessions %d is outside 1..1024", c.MaxSessions)
	case c.KeyRefreshInterval.Duration < 100*time.Millisecond:
		return fmt.Errorf("pkcs11.keyRefreshInterval %s is below 100ms", c.KeyRefreshInterval)
	}
	return nil
}
