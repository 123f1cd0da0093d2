package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadStrict(t *testing.T) {
	var v struct {
		Every Duration `json:"every"`
	}
	p := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(p, []byte("every: 30s\n"), 0o600)
	if err := LoadStrict(p, &v); err != nil || v.Every.Duration != 30*time.Second {
		t.Fatalf("%+v %v", v, err)
	}
	for body, want := range map[string]string{"every: 30s\nextra: 1\n": "unknown field", "every: 30\n": "string", "every: -1s\n": "negative", "every: soon\n": "invalid"} {
		os.WriteFile(p, []byte(body), 0o600)
		if err := LoadStrict(p, &v); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", body, err, want)
		}
	}
}

func TestLoadSection(t *testing.T) {
	var v struct {
		Module string `json:"module"`
	}
	p := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(p, []byte("pkcs11:\n  module: /lib/x.so\nhealthInterval: 10s\n"), 0o600)
	if err := LoadSection(p, "pkcs11", &v); err != nil || v.Module != "/lib/x.so" {
		t.Fatalf("%+v %v", v, err)
	}
	for body, want := range map[string]string{"pkcs11:\n  module: x\n  modul: y\n": "unknown field", "other: {}\n": "no \"pkcs11\" section", "pkcs11: [\n": "config", "pkcs11:\n  module: x\n  module: y\n": "already set"} {
		os.WriteFile(p, []byte(body), 0o600)
		if err := LoadSection(p, "pkcs11", &v); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", body, err, want)
		}
	}
}
