package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/keyward/keyward/internal/config"
)

// Config is keyward-broker's configuration file (decoded strictly: unknown keys are an error).
// Secret material (the Vault token in broker mode) is only ever read from a file it names.
type Config struct {
	// PolicyFile is the policy (environments and grants); reloaded when it changes.
	PolicyFile           string          `json:"policyFile"`
	PolicyReloadInterval config.Duration `json:"policyReloadInterval,omitempty"`
	// Audience of the tokens kubelet requests for the driver (CSIDriver tokenRequests).
	Audience string `json:"audience,omitempty"`
	// TokenReviewCacheTTL bounds how long a positive TokenReview is reused.
	TokenReviewCacheTTL config.Duration `json:"tokenReviewCacheTTL,omitempty"`
	// RefusalAuditBurst and RefusalAuditInterval rate-limit the audit records of one pod's refused
	// requests: a burst, then one per interval, each record counting those suppressed before it
	// (defaults 10 and 30s). Allowed requests are always recorded.
	RefusalAuditBurst    int             `json:"refusalAuditBurst,omitempty"`
	RefusalAuditInterval config.Duration `json:"refusalAuditInterval,omitempty"`
	Vault                struct {
		Address   string `json:"address"`
		CAFile    string `json:"caFile,omitempty"`
		AllowHTTP bool   `json:"allowInsecureHTTP,omitempty"`
		// Mode: "pod" (log in as the pod with kubernetes auth; default) or "broker" (TokenFile).
		Mode      string `json:"mode,omitempty"`
		AuthMount string `json:"authMount,omitempty"`
		TokenFile string `json:"tokenFile,omitempty"`
		// LeaseRenewWindow is the part of a dynamic credential's lease TTL, at its end, in which a
		// republish renews or reissues it (default 0.333: the last third; between 0.05 and 0.95).
		LeaseRenewWindow float64 `json:"leaseRenewWindow,omitempty"`
	} `json:"vault"`
}

func loadConfig(path string) (Config, error) {
	var c Config
	if err := config.LoadStrict(path, &c); err != nil {
		return Config{}, err
	}
	if c.PolicyReloadInterval.Duration == 0 {
		c.PolicyReloadInterval.Duration = 10 * time.Second
	}
	if c.Audience == "" {
		c.Audience = "keyward"
	}
	if c.TokenReviewCacheTTL.Duration == 0 {
		c.TokenReviewCacheTTL.Duration = 5 * time.Second
	}
	if c.Vault.Mode == "" {
		c.Vault.Mode = "pod"
	}
	if c.RefusalAuditBurst == 0 {
		c.RefusalAuditBurst = 10
	}
	if c.RefusalAuditInterval.Duration == 0 {
		c.RefusalAuditInterval.Duration = 30 * time.Second
	}
	if err := c.validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

func (c Config) validate() error {
	switch {
	case c.PolicyFile == "":
		return errors.New("policyFile is required")
	case c.Vault.Address == "":
		return errors.New("vault.address is required")
	case c.Vault.Mode != "pod" && c.Vault.Mode != "broker":
		return fmt.Errorf("vault.mode %q: want pod or broker", c.Vault.Mode)
	case c.Vault.Mode == "broker" && c.Vault.TokenFile == "":
		return errors.New("vault.tokenFile is required in broker mode")
	case c.TokenReviewCacheTTL.Duration > time.Minute:
		return errors.New("tokenReviewCacheTTL above 1m would let deleted pods keep access too long")
	case c.RefusalAuditBurst < 1 || c.RefusalAuditInterval.Duration < 0:
		return errors.New("refusalAuditBurst must be at least 1 and refusalAuditInterval positive")
	case c.Vault.LeaseRenewWindow != 0 && (c.Vault.LeaseRenewWindow < 0.05 || c.Vault.LeaseRenewWindow > 0.95):
		return fmt.Errorf("vault.leaseRenewWindow %g: want between 0.05 and 0.95 of a lease's TTL", c.Vault.LeaseRenewWindow)
	}
	return nil
}
