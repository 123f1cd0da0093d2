package harness

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// containerd itself reads the node's configuration (`containerd config dump` decodes it as the daemon
// does, without starting one): each insecure registry becomes its own plain-HTTP mirror, and a node
// without any has no mirror at all (nothing is pulled).
func TestContainerdConfigMirrorsInsecureRegistries(t *testing.T) {
	Check(t, requireNodeRuntime())
	dir := t.TempDir()
	dump := func(insecure []string) string {
		t.Helper()
		cfg := filepath.Join(dir, "containerd.toml")
		if err := os.WriteFile(cfg, []byte(containerdConfig(dir, filepath.Join(dir, "containerd.sock"), "keyward/pause:dev", insecure)), 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		out, err := run(ctx, "/usr/bin/containerd", "--config", cfg, "config", "dump")
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	out := dump([]string{"127.0.0.1:5000", "127.0.0.1:5001"})
	for _, host := range []string{"127.0.0.1:5000", "127.0.0.1:5001"} {
		want := `[plugins."io.containerd.grpc.v1.cri".registry.mirrors."` + host + `"]` + "\n" + `          endpoint = ["http://` + host + `"]`
		if !strings.Contains(out, want) {
			t.Errorf("containerd's view of the config has no plain-HTTP mirror for %s:\n%s", host, out)
		}
	}
	if !strings.Contains(out, `sandbox_image = "keyward/pause:dev"`) {
		t.Errorf("containerd's view of the config lost the sandbox image:\n%s", out)
	}
	if out := dump(nil); strings.Contains(out, `registry.mirrors."`) {
		t.Errorf("a node without insecure registries has a mirror:\n%s", out)
	}
}
