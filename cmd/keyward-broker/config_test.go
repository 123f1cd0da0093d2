package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadConfig(t *testing.T) {
	p := filepath.Join(t.TempDir(), "broker.yaml")
	os.WriteFile(p, []byte("policyFile: /p.yaml\nvault: {address: https://v:8200}\n"), 0o600)
	c, err := loadConfig(p)
	if err != nil || c.Audience != "keyward" || c.Vault.Mode != "pod" || c.TokenReviewCacheTTL.Duration != 5*time.Second {
		t.Fatalf("defaults: %+v %v", c, err)
	}
	for body, want := range map[string]string{
		"policyFile: /p\nvault: {address: https://v}\nvaultToken: s.abc\n":          "unknown field",
		"vault: {address: https://v}\n":                                             "policyFile",
		"policyFile: /p\nvault: {address: https://v, mode: broker}\n":               "tokenFile",
		"policyFile: /p\nvault: {address: https://v, mode: root}\n":                 "mode",
		"policyFile: /p\ntokenReviewCacheTTL: 1h\nvault: {address: https://v}\n":    "deleted pods",
		"policyFile: /p\npolicyReloadInterval: soon\nvault: {address: https://v}\n": "invalid",
	} {
		os.WriteFile(p, []byte(body), 0o600)
		if _, err := loadConfig(p); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", body, err, want)
		}
	}
}

func TestOptionsValidate(t *testing.T) {
	o := Options{CSISocket: "/s", NodeID: "n", Config: "/c", AuditLog: "/a", AuditKeyFile: "/k"}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	o.AuditLog = ""
	if err := o.Validate(); err == nil {
		t.Fatal("no audit log accepted")
	}
}
