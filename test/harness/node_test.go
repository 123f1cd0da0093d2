package harness_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyward/keyward/test/harness"
	"github.com/keyward/keyward/test/images"
)

// pauseImage builds Keyward's pause image (test/images: a static Go binary, put into an image with
// go-containerregistry) into dir and returns its tar and reference.
func pauseImage(t *testing.T, dir string) images.Result {
	t.Helper()
	root, err := harness.RepoFile(".")
	if err != nil {
		t.Fatal(err)
	}
	meta := images.Meta{Source: "https://example.invalid/keyward", Revision: "test", Version: "test", Created: time.Unix(0, 0).UTC()}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rs, err := images.Build(ctx, images.Options{ModuleDir: root, OutDir: dir, Images: []string{"pause"}, Meta: meta})
	if err != nil {
		t.Fatal(err)
	}
	return rs[0]
}

// A real node becomes Ready, runs a DaemonSet's pod (so kube-controller-manager and kube-scheduler
// work) in its own network namespace on the pods' bridge with no way out (no default route), and
// after Stop nothing it made is left on the host: no file outside its directory, mount, cgroup,
// interface, route, process or iptables rule.
// The second run puts kubelet's root in /var/lib/kubelet, as the shipped manifests expect.
func TestNodeRunsPodsAndLeavesNothingBehind(t *testing.T) {
	pause := pauseImage(t, t.TempDir())
	for _, root := range []string{"", "/var/lib/kubelet"} {
		t.Run("root="+root, func(t *testing.T) { nodeRunsPodsAndLeavesNothingBehind(t, pause, root) })
	}
}

// (Over 60 lines: one node's life, from start to the check that nothing is left.)
func nodeRunsPodsAndLeavesNothingBehind(t *testing.T, pause images.Result, kubeletRoot string) {
	dir := harness.Dir(t)
	ctx, cancel := context.WithTimeout(context.Background(), harness.NodeLockWait+harness.NodeStartTimeout+3*time.Minute)
	defer cancel()
	node, err := harness.StartNode(ctx, dir, harness.NodeOptions{Kube: env.Kube, PauseImage: pause.Tar, KubeletRootDir: kubeletRoot})
	harness.Check(t, err)
	t.Cleanup(node.Stop)
	t.Logf("node %s Ready in %s", node.Name, node.StartTime.Round(100*time.Millisecond))

	k := env.Kube.Client
	ns := named()("node-smoke")
	if _, err := env.Kube.CreateNamespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"app": "smoke"}
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "smoke"},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{
					Name: "pause", Image: pause.Ref, ImagePullPolicy: corev1.PullNever,
				}}},
			},
		},
	}
	if _, err := k.AppsV1().DaemonSets(ns).Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	waitFor(ctx, t, "the DaemonSet's pod Running on the node", func() bool {
		pods, err := k.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil || len(pods.Items) != 1 {
			return false
		}
		pod = pods.Items[0]
		return pod.Spec.NodeName == node.Name && pod.Status.Phase == corev1.PodRunning
	})
	if pod.Spec.HostNetwork {
		t.Fatal("the pod runs in the host's network namespace")
	}
	_, podNet, _ := net.ParseCIDR("10.244.0.0/16")
	if ip := net.ParseIP(pod.Status.PodIP); ip == nil || !podNet.Contains(ip) {
		t.Fatalf("pod IP %q is not on the pods' bridge network %s", pod.Status.PodIP, podNet)
	}
	checkPodNetwork(t, node, pod)

	running := node.Leftovers()
	for _, want := range []string{"cgroup /sys/fs/cgroup/memory/kubepods", "network interface kw-cni0", "file /var/lib/kubelet/device-plugins"} {
		if !slices.ContainsFunc(running, func(s string) bool { return strings.HasPrefix(s, want) }) {
			t.Errorf("while the node runs, Leftovers does not see %q (so it could not see it left behind either): %v", want, running)
		}
	}
	for _, d := range []string{dir + "/containerd/", node.KubeletRootDir} {
		if !slices.ContainsFunc(running, func(s string) bool { return strings.HasPrefix(s, "mount "+d) }) {
			t.Errorf("while the node runs, Leftovers sees no mount under %s: %v", d, running)
		}
	}
	t.Logf("while running, the node has %d things on the host outside its files:\n%s", len(running), strings.Join(running, "\n"))

	// The DaemonSet would run on the next node of the same name too.
	if err := k.AppsV1().DaemonSets(ns).Delete(ctx, ds.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	node.Stop()
	if left := node.Leftovers(); len(left) > 0 {
		t.Fatalf("the stopped node left on the host:\n%s", strings.Join(left, "\n"))
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatalf("the node's directory cannot be removed (a mount left?): %v", err)
	}
	if _, err := k.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{}); err == nil {
		t.Error("the stopped node is still registered")
	}
}

// checkPodNetwork reads the pod's network namespace through its sandbox's process: loopback and one
// interface on the bridge, and no default route.
func checkPodNetwork(t *testing.T, node *harness.Node, pod corev1.Pod) {
	t.Helper()
	pid := sandboxPid(t, node, pod)
	routes, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "net", "route"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(routes)), "\n")[1:] {
		f := strings.Fields(l)
		if len(f) > 2 && f[1] == "00000000" {
			t.Errorf("the pod has a default route: %s", l)
		}
	}
	dev, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "net", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	var ifaces []string
	for _, l := range strings.Split(string(dev), "\n")[2:] {
		if name, _, ok := strings.Cut(strings.TrimSpace(l), ":"); ok {
			ifaces = append(ifaces, name)
		}
	}
	slices.Sort(ifaces)
	if !slices.Equal(ifaces, []string{"eth0", "lo"}) {
		t.Errorf("the pod's interfaces are %v, want [eth0 lo]", ifaces)
	}
}

// sandboxPid finds a process of the pod: the one in the pod's cgroup (kubepods/.../pod<UID>).
func sandboxPid(t *testing.T, node *harness.Node, pod corev1.Pod) int {
	t.Helper()
	matches, _ := filepath.Glob("/sys/fs/cgroup/pids/kubepods/*/pod" + string(pod.UID) + "/*/cgroup.procs")
	more, _ := filepath.Glob("/sys/fs/cgroup/pids/kubepods/pod" + string(pod.UID) + "/*/cgroup.procs")
	for _, m := range append(matches, more...) {
		b, err := os.ReadFile(m)
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) > 0 {
			pid, err := strconv.Atoi(f[0])
			if err == nil {
				return pid
			}
		}
	}
	t.Fatalf("no process of pod %s in the kubepods cgroups of node %s", pod.Name, node.Name)
	return 0
}

// waitFor polls cond every 200 ms until it holds or ctx ends.
func waitFor(ctx context.Context, t *testing.T, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
