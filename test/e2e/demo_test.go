package e2e

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/test/harness"
)

// TestDemo runs `make demo`'s program: every step of the whole flow on the real node must pass, the
// output must show what each step claims (the pod's verdict, the refusals in the pods' events, the
// envelope in etcd, the rotation, the verified audit streams), and the teardown must leave no mount
// behind.
func TestDemo(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the demo runs a real node and needs root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), harness.NodeLockWait+15*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "run", "github.com/keyward/keyward/test/demo").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "demo: all steps passed") {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	t.Logf("demo output:\n%s", out)
	for _, want := range []string{
		"kw-node   Ready",                // kubectl get nodes
		`"verdict":"pass"`, "is a tmpfs", // the reader's secretcheck, and the host's view
		"ContainerCreating", "FailedMount", "PermissionDenied", // the sneaky pod's status and events
		"InvalidArgument",                      // the writable volume
		`"k8s:enc:kms:v2:keyward:`,             // the Secret in etcd
		"Status reports key_id keyward-kek.2.", // the rotation (the shipped kms.yaml names the key keyward-kek)
		"hash chain intact",                    // audit verify
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	if strings.Contains(string(out), "prod-db-1") {
		t.Error("the demo printed the prod secret's value")
	}
	mounts, _ := exec.Command("sh", "-c", "grep -cE 'kw-demo-|/var/lib/kubelet/pods' /proc/self/mountinfo || true").Output()
	if strings.TrimSpace(string(mounts)) != "0" {
		t.Fatalf("the demo left %s mounts behind", strings.TrimSpace(string(mounts)))
	}
}
