package main

import (
	"fmt"
	"time"

	"github.com/keyward/keyward/internal/config"
	"github.com/keyward/keyward/kms/pkcs11"
)

// Config is keyward-kms's configuration file (decoded strictly: an unknown key is an error). The HSM
// PIN is read from the file pkcs11.pinFile names, never from here.
type Config struct {
	PKCS11 pkcs11.Config `json:"pkcs11"`
	// HealthInterval is how often the background encrypt+decrypt round trip runs (default 10s).
	HealthInterval config.Duration `json:"healthInterval,omitempty"`
}

// loadConfig reads the file, applies defaults and validates.
func loadConfig(path string) (Config, error) {
	var c Config
	if err := config.LoadStrict(path, &c); err != nil {
		return Config{}, err
	}
	if c.HealthInterval.Duration == 0 {
		c.HealthInterval.Duration = 10 * time.Second
	}
	c.PKCS11.Default()
	if err := c.validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

func (c Config) validate() error {
	if c.HealthInterval.Duration < 100*time.Millisecond {
		return fmt.Errorf("healthInterval %s is below 100ms", c.HealthInterval)
	}
	return c.PKCS11.Validate()
}
