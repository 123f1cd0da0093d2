package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
)

// SoftHSM is a freshly initialized SoftHSM2 token with its own configuration and token directory.
// Point the PKCS#11 module at it with the SOFTHSM2_CONF environment variable (Env).
type SoftHSM struct {
	Module     string // path of libsofthsm2.so
	ConfPath   string // SOFTHSM2_CONF
	TokenDir   string
	TokenLabel string
	Slot       uint
	UserPIN    string
	SOPIN      string
	// PINFile holds UserPIN (mode 0600), for components that read the PIN from a file.
	PINFile string
}

// NewSoftHSM initializes a token labelled label in a new token directory under dir.
func NewSoftHSM(dir, label string) (*SoftHSM, error) {
	if err := requireSoftHSM(); err != nil {
		return nil, err
	}
	tokenDir := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokenDir, 0o700); err != nil {
		return nil, err
	}
	conf, err := writeFile(dir, "softhsm2.conf", []byte(fmt.Sprintf(
		"directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokenDir)), 0o600)
	if err != nil {
		return nil, err
	}
	h := &SoftHSM{Module: SoftHSMModule, ConfPath: conf, TokenDir: tokenDir, TokenLabel: label,
		UserPIN: randomHex(8), SOPIN: randomHex(8)}
	if h.PINFile, err = writeFile(dir, "user.pin", []byte(h.UserPIN), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", h.SOPIN, "--pin", h.UserPIN)
	cmd.Env = append(os.Environ(), h.Env()...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("softhsm2-util --init-token: %w: %s", err, out)
	}
	m := regexp.MustCompile(`reassigned to slot (\d+)`).FindSubmatch(out)
	if m == nil {
		return nil, fmt.Errorf("softhsm2-util --init-token: no slot in output %q", out)
	}
	slot, err := strconv.ParseUint(string(m[1]), 10, 64)
	if err != nil {
		return nil, err
	}
	h.Slot = uint(slot)
	return h, nil
}

// Env returns the environment a process needs to see this token.
func (h *SoftHSM) Env() []string { return []string{"SOFTHSM2_CONF=" + h.ConfPath} }

// HideToken makes the token invisible to SoftHSM (an HSM outage) until ShowToken. SoftHSM notices only
// when the module is finalized and initialized again, which a recovering client does.
func (h *SoftHSM) HideToken() error {
	return os.Rename(h.TokenDir, h.TokenDir+".hidden")
}

// ShowToken undoes HideToken.
func (h *SoftHSM) ShowToken() error {
	return os.Rename(h.TokenDir+".hidden", h.TokenDir)
}
