package realnode

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyward/keyward/test/harness"
	"github.com/keyward/keyward/test/images"
)

// SystemNamespace is the namespace deploy/base puts the broker in.
const SystemNamespace = "keyward-system"

// IdentityOnly is an apiserver encryption config that stores Secrets as they are: the apiserver's
// until keyward-kms runs (a control-plane node's apiserver starts with deploy/control-plane's config,
// but the harness's has to run before the node whose kubelet runs keyward-kms).
const IdentityOnly = `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - identity: {}
`

// Cluster is the real-node scenario's cluster: the harness's components, started by the caller.
type Cluster struct {
	Repo  string // the module's root: deploy/ is read from it
	Etcd  *harness.Etcd
	Kube  *harness.KubeAPIServer
	Vault *harness.Vault
	Node  *harness.Node
	// HostDir holds what the pods take from the node's own disk (hostPath volumes): audit keys,
	// audit streams, the KMS node's files. Never the machine's /etc/keyward or /var/log/keyward:
	// other tests share the machine.
	HostDir string
	// Encryption is the apiserver's --encryption-provider-config, reloaded when it changes
	// (--encryption-provider-config-automatic-reload): IdentityOnly until UseKMS.
	Encryption string
	// Keywardctl is the operator CLI's binary, run on the node to create the KEK.
	Keywardctl string
}

// BuildImages builds the named images from the module at repo into dir, with the meta every test
// build uses (a fixed time: the same tree gives the same digests), keyed by name.
func BuildImages(ctx context.Context, repo, dir, tag string, names ...string) (map[string]images.Result, error) {
	built, err := images.Build(ctx, images.Options{ModuleDir: repo, OutDir: dir, Images: names, Tag: tag,
		ModuleDeps: []string{harness.SoftHSMModule}, // make images' default (KMS_MODULE_DEPS): SoftHSM's libraries
		Meta:       images.Meta{Source: "https://example.invalid/keyward", Revision: "test", Version: "test", Created: time.Unix(0, 0).UTC()}})
	if err != nil {
		return nil, err
	}
	out := map[string]images.Result{}
	for _, b := range built {
		out[b.Name] = b
	}
	return out, nil
}

// Poll calls f every 250 ms until it returns nil or an error of Permanent, ctx ends or timeout
// passes; the error then names what was awaited and f's last error.
func Poll(ctx context.Context, timeout time.Duration, what string, f func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		err := f()
		if err == nil {
			return nil
		}
		var p permanent
		if errors.As(err, &p) {
			return fmt.Errorf("%s: %w", what, p.error)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: still failing after %s: %v", what, timeout, err)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// Permanent marks an error Poll must not retry.
func Permanent(err error) error { return permanent{err} }

type permanent struct{ error }

// PodStates summarizes a namespace's pods, for a timeout's message.
func (c *Cluster) PodStates(ctx context.Context, ns string) string {
	pods, err := c.Kube.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, p := range pods.Items {
		s := p.Name + ": " + string(p.Status.Phase)
		for _, cs := range p.Status.ContainerStatuses {
			switch {
			case cs.State.Waiting != nil:
				s += fmt.Sprintf(" %s waiting %s %s", cs.Name, cs.State.Waiting.Reason, cs.State.Waiting.Message)
			case cs.State.Terminated != nil:
				s += fmt.Sprintf(" %s terminated %d", cs.Name, cs.State.Terminated.ExitCode)
			default:
				s += fmt.Sprintf(" %s running (ready %v, restarts %d)", cs.Name, cs.Ready, cs.RestartCount)
			}
		}
		out = append(out, s)
	}
	return strings.Join(out, "; ")
}

// PodReady says whether the pod's Ready condition is true.
func PodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// ContainerStatus is the named container's status, nil if the pod reports none yet.
func ContainerStatus(p *corev1.Pod, name string) *corev1.ContainerStatus {
	for i := range p.Status.ContainerStatuses {
		if p.Status.ContainerStatuses[i].Name == name {
			return &p.Status.ContainerStatuses[i]
		}
	}
	return nil
}

// ContainerPid finds a pod's container's main process on the host: the process named comm whose
// cgroup names the container's ID (what `crictl inspect` reports as its pid).
func ContainerPid(p *corev1.Pod, container, comm string) (int, error) {
	st := ContainerStatus(p, container)
	if st == nil {
		return 0, fmt.Errorf("pod %s has no %s container status", p.Name, container)
	}
	_, id, _ := strings.Cut(st.ContainerID, "://")
	if id == "" {
		return 0, fmt.Errorf("the %s container has no ID yet", container)
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range entries {
		name, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(name)) != comm {
			continue
		}
		cg, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		if err == nil && strings.Contains(string(cg), id) {
			var pid int
			if _, err := fmt.Sscan(e.Name(), &pid); err == nil {
				return pid, nil
			}
		}
	}
	return 0, fmt.Errorf("no %s process in container %s", comm, id)
}

// ctl runs keywardctl on the node.
func (c *Cluster) ctl(ctx context.Context, env []string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, c.Keywardctl, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("keywardctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out)), nil
}
