package e2e

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestDemo runs `make demo`'s program: every step of the whole flow must pass and the teardown must
// leave no mount behind.
func TestDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "run", "github.com/keyward/keyward/test/demo").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "demo: all steps passed") {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	for _, want := range []string{"on tmpfs: true", "PermissionDenied", `"k8s:enc:kms:v2:keyward:`, "Status reports key_id kek.2.", "hash chain intact"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	mounts, _ := exec.Command("sh", "-c", "grep -c kw-demo- /proc/self/mountinfo || true").Output()
	if strings.TrimSpace(string(mounts)) != "0" {
		t.Fatalf("the demo left %s mounts behind", strings.TrimSpace(string(mounts)))
	}
}
