package config

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"sigs.k8s.io/yaml"
)

// Duration is a time.Duration written as a Go duration string ("30s").
type Duration struct{ time.Duration }

// UnmarshalJSON parses a non-negative duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"30s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	if v < 0 {
		return fmt.Errorf("duration %q is negative", s)
	}
	d.Duration = v
	return nil
}

// MarshalJSON writes a duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// LoadStrict reads path and decodes it into v, refusing unknown keys.
func LoadStrict(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if err := yaml.UnmarshalStrict(b, v); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// LoadSection reads the YAML file at path and decodes only its top-level key section into v,
// refusing unknown keys inside it: for tools that share a daemon's config file and need one part of
// it (keywardctl reads keyward-kms's pkcs11 section).
func LoadSection(path, section string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	// Strict: a key written twice is refused, as the daemon's own strict load refuses it.
	j, err := yaml.YAMLToJSONStrict(b)
	if err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(j, &top); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	raw, ok := top[section]
	if !ok {
		return fmt.Errorf("config %s: no %q section", path, section)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("config %s: %s: %w", path, section, err)
	}
	return nil
}
