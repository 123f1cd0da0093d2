package images

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// containerdT starts a containerd of the test's own (root, state, sockets in a temp dir; no CRI)
// and returns a function running ctr against it; the test stops it.
func containerdT(t *testing.T) func(args ...string) (string, error) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test runs containerd: it needs root (the CI machine runs as root)")
	}
	bin, err := exec.LookPath("containerd")
	ctr, err2 := exec.LookPath("ctr")
	if err != nil || err2 != nil {
		msg := "containerd is not installed: run `make deps` or `test/tools/install-debs.sh`"
		if os.Getenv("KEYWARD_ALLOW_SKIP") == "1" && os.Getenv("CI") != "true" {
			t.Skip(msg)
		}
		t.Fatal(msg)
	}
	dir, err := os.MkdirTemp("", "kw-ctrd-") // short: the socket path must fit in sun_path
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "containerd.sock")
	config := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc")
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", filepath.Join(dir, "config.toml"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		// Unpacking mounts nothing that outlives a call, but make sure before removing the tree.
		if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil && strings.Contains(string(b), dir) {
			t.Errorf("mounts left under %s", dir)
			return
		}
		os.RemoveAll(dir)
	})
	run := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c := exec.CommandContext(ctx, ctr, append([]string{"--address", sock}, args...)...)
		var out bytes.Buffer
		c.Stdout, c.Stderr = &out, &out
		err := c.Run()
		return out.String(), err
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := run("version"); err == nil {
			break
		}
		select {
		case <-done:
			b, _ := os.ReadFile(filepath.Join(dir, "containerd.log"))
			t.Fatalf("containerd exited:\n%s", b)
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "containerd.log"))
			t.Fatalf("containerd did not answer within 30 s:\n%s", b)
		}
	}
	return run
}

// containerd imports each tar as a node without a registry would (ctr -n k8s.io images import),
// under the name kubelet resolves image: keyward/NAME:TAG to, with the digest Build printed.
func TestContainerdImportsTheImages(t *testing.T) {
	results := images(t)
	ctr := containerdT(t)
	for _, r := range results {
		if out, err := ctr("-n", "k8s.io", "images", "import", r.Tar); err != nil {
			t.Fatalf("importing %s: %v\n%s", r.Tar, err, out)
		}
	}
	out, err := ctr("-n", "k8s.io", "images", "ls")
	if err != nil {
		t.Fatalf("ctr images ls: %v\n%s", err, out)
	}
	t.Logf("ctr -n k8s.io images ls:\n%s", out)
	for _, r := range results {
		name := "docker.io/keyward/" + r.Name + ":test"
		found := false
		for _, line := range strings.Split(out, "\n") {
			f := strings.Fields(line)
			if len(f) >= 3 && f[0] == name {
				found = true
				if f[2] != r.Digest.String() {
					t.Errorf("%s: containerd has digest %s, Build printed %s", name, f[2], r.Digest)
				}
			}
		}
		if !found {
			t.Errorf("%s is not among containerd's images", name)
		}
	}
}
