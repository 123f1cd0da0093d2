package realnode

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyward/keyward/csi"
)

// SecretsMount is where SecretPod mounts its volume.
const SecretsMount = "/secrets"

// SecretcheckImage is test/images/secretcheck as BuildImages names it with the tag "dev".
const SecretcheckImage = "keyward/secretcheck:dev"

// SecretPod is a pod of ns's api service account with an inline secrets.keyward.dev volume (readOnly,
// as the driver requires) at SecretsMount holding ref's password as db-password, running secretcheck
// with the given arguments in each named container.
func SecretPod(ns, name, ref string, containers map[string][]string) *corev1.Pod {
	readOnly, group := true, int64(65532)
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			ServiceAccountName: "api",
			RestartPolicy:      corev1.RestartPolicyNever,
			// secretcheck runs as 65532: the volume's files are group-readable by the pod's fsGroup.
			SecurityContext: &corev1.PodSecurityContext{FSGroup: &group},
			Volumes: []corev1.Volume{{Name: "secrets", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
				Driver: csi.DriverName, ReadOnly: &readOnly,
				VolumeAttributes: map[string]string{"secrets": "- ref: " + ref + "\n  key: password\n  file: db-password\n"},
			}}}},
		},
	}
	names := make([]string, 0, len(containers))
	for n := range containers {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		p.Spec.Containers = append(p.Spec.Containers, corev1.Container{
			Name: n, Image: SecretcheckImage, ImagePullPolicy: corev1.PullNever,
			Args:         append([]string{"-dir", SecretsMount}, containers[n]...),
			VolumeMounts: []corev1.VolumeMount{{Name: "secrets", MountPath: SecretsMount, ReadOnly: true}},
		})
	}
	return p
}

// Verdict is secretcheck's termination message: what it proved from inside the pod.
type Verdict struct {
	Verdict    string   `json:"verdict"`
	MountPoint bool     `json:"mountPoint"`
	Tmpfs      bool     `json:"tmpfs"`
	ReadOnly   bool     `json:"readOnly"`
	Problems   []string `json:"problems"`
	Files      []struct {
		Name  string `json:"name"`
		Bytes int    `json:"bytes"`
	} `json:"files"`
}

// Passed says whether secretcheck found a read-only tmpfs mount holding what it expected.
func (v Verdict) Passed() bool {
	return v.Verdict == "pass" && v.MountPoint && v.Tmpfs && v.ReadOnly && len(v.Problems) == 0
}

// errNotTerminated: the container still runs.
var errNotTerminated = fmt.Errorf("not terminated")

// ContainerVerdict reads the named container's verdict once it terminated: an error wrapping
// errNotTerminated before; the verdict and the exit code after.
func ContainerVerdict(p *corev1.Pod, container string) (Verdict, int32, error) {
	var v Verdict
	st := ContainerStatus(p, container)
	if st == nil || st.State.Terminated == nil {
		return v, 0, fmt.Errorf("pod %s is %s, its %s container %w", p.Name, p.Status.Phase, container, errNotTerminated)
	}
	if err := json.Unmarshal([]byte(st.State.Terminated.Message), &v); err != nil {
		return v, st.State.Terminated.ExitCode, fmt.Errorf("the %s container's termination message %q: %v", container, st.State.Terminated.Message, err)
	}
	return v, st.State.Terminated.ExitCode, nil
}

// FailedMount waits for a FailedMount event of the pod whose message carries code (a gRPC code's
// name, such as PermissionDenied) and returns the event.
func (c *Cluster) FailedMount(ctx context.Context, ns, pod, code string) (*corev1.Event, error) {
	var ev *corev1.Event
	err := Poll(ctx, 2*time.Minute, "a FailedMount event with "+code, func() error {
		evs, err := c.Kube.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod})
		if err != nil {
			return err
		}
		for i, e := range evs.Items {
			if e.Reason == "FailedMount" && strings.Contains(e.Message, code) {
				ev = &evs.Items[i]
				return nil
			}
		}
		return fmt.Errorf("%d events, none FailedMount with %s", len(evs.Items), code)
	})
	return ev, err
}

// VolumePath is kubelet's path of the pod's secrets volume on the host.
func (c *Cluster) VolumePath(p *corev1.Pod) string {
	return filepath.Join(c.Node.KubeletRootDir, "pods", string(p.UID), "volumes/kubernetes.io~csi/secrets/mount")
}

// MountedFS is the file system type mounted at path in the host's mount namespace ("" if none).
func MountedFS(path string) (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	fs := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i := 6; i+1 < len(fields); i++ {
			if fields[i] == "-" && fields[4] == path {
				fs = fields[i+1]
			}
		}
	}
	return fs, sc.Err()
}

// MountsUnder lists the host's mount points under dir.
func MountsUnder(dir string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir) {
			out = append(out, f[4])
		}
	}
	return out, nil
}
