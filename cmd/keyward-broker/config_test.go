package main

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/internal/audit"
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
	good := Options{CSISocket: "/s", NodeID: "n", Config: "/c", Audit: validAudit(), MaxPublishes: 16, MaxPublishBytes: 64 << 20,
		MetricsAddress: "127.0.0.1:9465", HealthAddress: ":9808", KubeletRegistrationDir: "/var/lib/kubelet/plugins_registry",
		KubeletRegistrationPath: "/var/lib/kubelet/plugins/secrets.keyward.dev/csi.sock"}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mutate := range map[string]func(*Options){
		"no audit dir":               func(o *Options) { o.Audit.Dir = "" },
		"audit segments too small":   func(o *Options) { o.Audit.MaxSize = 1024 },
		"no audit segments kept":     func(o *Options) { o.Audit.MaxSegments = 0 },
		"no publishes":               func(o *Options) { o.MaxPublishes = 0 },
		"bytes below one volume":     func(o *Options) { o.MaxPublishBytes = 1 << 20 },
		"metrics off loopback":       func(o *Options) { o.MetricsAddress = "0.0.0.0:9465" },
		"metrics address garbled":    func(o *Options) { o.MetricsAddress = "9465" },
		"health address garbled":     func(o *Options) { o.HealthAddress = "9808" },
		"health on metrics":          func(o *Options) { o.HealthAddress = o.MetricsAddress },
		"registration path relative": func(o *Options) { o.KubeletRegistrationPath = "csi.sock" },
	} {
		o := good
		mutate(&o)
		if err := o.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// validAudit is the audit flags' defaults.
func validAudit() audit.Flags {
	var f audit.Flags
	f.Bind(flag.NewFlagSet("t", flag.ContinueOnError), "/var/log/keyward/broker-audit")
	return f
}

// With swap on and no noswap support, the broker refuses to start unless told to accept the risk;
// with noswap, volumes always use it.
func TestSwapPolicy(t *testing.T) {
	for _, tc := range []struct {
		swap, noswap, allow bool
		mountsMaySwap       bool
		warn, fail          bool
	}{
		{swap: true, noswap: true, allow: false, mountsMaySwap: false},
		{swap: false, noswap: true, allow: true, mountsMaySwap: false},
		{swap: false, noswap: false, allow: false, mountsMaySwap: true, warn: true},
		{swap: true, noswap: false, allow: false, fail: true},
		{swap: true, noswap: false, allow: true, mountsMaySwap: true, warn: true},
	} {
		may, warning, err := swapPolicy(tc.swap, tc.noswap, tc.allow)
		if (err != nil) != tc.fail || may != tc.mountsMaySwap || (warning != "") != tc.warn {
			t.Errorf("swap %v noswap %v allow %v: mounts may swap %v, warning %q, err %v", tc.swap, tc.noswap, tc.allow, may, warning, err)
		}
		if tc.fail && !strings.Contains(err.Error(), "--allow-swap-without-noswap") {
			t.Errorf("the refusal does not name the flag: %v", err)
		}
	}
}
