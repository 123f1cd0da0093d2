package pkcs11

import (
	"fmt"
	"time"

	"github.com/keyward/keyward/internal/config"
)

// Config locates the HSM and the key-encryption key: the pkcs11 section of keyward-kms's config
// file. The PIN is read from PINFile only.
type Config struct {
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
	KeyRefreshInterval config.Duration `json:"keyRefreshInterval,omitempty"`
	// CallTimeout bounds the waits on HSM calls in the health and recovery paths (default 10s): a
	// health round trip that takes longer starts recovery, recovery waits at most this long for
	// in-flight calls to drain, and a re-initialization stuck longer makes Live fail. A PKCS#11 call
	// cannot be cancelled; these bounds only keep a hung one from blocking the rest.
	CallTimeout config.Duration `json:"callTimeout,omitempty"`
	// AuditCheckpointKeyLabel, when set, labels the ECDSA P-256 key pair (generated inside the HSM by
	// keywardctl kms checkpoint-key create) that signs the audit stream's checkpoints. Empty:
	// checkpoints are unsigned.
	AuditCheckpointKeyLabel string `json:"auditCheckpointKeyLabel,omitempty"`
}

// Default fills in defaults.
func (c *Config) Default() {
	if c.MaxSessions == 0 {
		c.MaxSessions = 8
	}
	if c.KeyRefreshInterval.Duration == 0 {
		c.KeyRefreshInterval.Duration = 30 * time.Second
	}
	if c.CallTimeout.Duration == 0 {
		c.CallTimeout.Duration = 10 * time.Second
	}
	if c.SessionKeyCopies == nil {
		t := true
		c.SessionKeyCopies = &t
	}
}

// Validate reports the first problem with the settings.
func (c Config) Validate() error {
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
	case len(c.AuditCheckpointKeyLabel) > 200:
		return fmt.Errorf("pkcs11.auditCheckpointKeyLabel is longer than 200 bytes")
	case c.MaxSessions < 1 || c.MaxSessions > 1024:
		return fmt.Errorf("pkcs11.maxSessions %d is outside 1..1024", c.MaxSessions)
	case c.KeyRefreshInterval.Duration < 100*time.Millisecond:
		return fmt.Errorf("pkcs11.keyRefreshInterval %s is below 100ms", c.KeyRefreshInterval)
	case c.CallTimeout.Duration < 50*time.Millisecond:
		return fmt.Errorf("pkcs11.callTimeout %s is below 50ms", c.CallTimeout)
	}
	return nil
}
