package harness

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// NodeStartTimeout bounds StartNode: containerd, the images, kube-controller-manager, kube-scheduler,
// and kubelet until the node is Ready.
const NodeStartTimeout = 3 * time.Minute

// NodeLockWait bounds NodeT's wait for another node on the machine to stop (see NodeLockFile).
const NodeLockWait = 20 * time.Minute

// NodeOptions configure StartNode.
type NodeOptions struct {
	// Kube is the apiserver the node registers with (required).
	Kube *KubeAPIServer
	// Name is the node's name (default kw-node).
	Name string
	// PauseImage is the pod sandbox image as a tarball (as `ctr images import` reads it, docker-archive or
	// OCI layout); its reference becomes containerd's sandbox_image (required: nothing is pulled).
	PauseImage string
	// Images are more image tarballs imported into containerd's k8s.io namespace before kubelet starts;
	// pods use them with imagePullPolicy: Never.
	Images []string
	// MaxPods is the kubelet's maxPods (default 250).
	MaxPods int
	// KubeletRootDir is kubelet's --root-dir (default: kubelet/ in the node's directory). Set it to
	// /var/lib/kubelet to run manifests that name kubelet's default paths (a CSI driver's hostPath
	// volumes) unchanged; what the node adds there is removed by Stop like everything else.
	KubeletRootDir string
	// InsecureRegistries are registries (HOST:PORT) containerd pulls from over plain HTTP, as a mirror
	// of themselves: a registry a test serves on loopback. Without them nothing is pulled from
	// anywhere (the images are imported); with them a pod whose image names such a registry and is
	// not already in containerd is pulled, as on a cluster's node.
	InsecureRegistries []string
}

// Node is a real Kubernetes node on this machine: containerd (Debian's, with runc) with its root, state
// and socket in the node's directory, kubelet registered with the harness kube-apiserver by a client
// certificate (system:node:NAME, so the Node authorizer and NodeRestriction apply), and the cluster's
// kube-controller-manager and kube-scheduler, so that Deployments, DaemonSets and service accounts work
// as in any cluster.
//
// Pods get their own network namespace on a bridge with no gateway, masquerade or default route (see
// cniConfig): they reach nothing but the other pods on the node, and blackhole routes keep the host's
// packets for pod and service addresses on the machine. Pods that need the host's loopback use
// hostNetwork.
//
// kubelet writes outside its root directory and leaves mounts and cgroups behind; Stop removes all of
// it, and Leftovers reports anything a node left on the host. One node runs on a machine at a time
// (those paths are the machine's): StartNode waits for the machine-wide lock NodeLockFile.
type Node struct {
	Name string
	Dir  string
	Kube *KubeAPIServer
	// ContainerdSocket is containerd's gRPC socket (CRI and the containerd API).
	ContainerdSocket string
	// KubeletRootDir is kubelet's --root-dir: pods/, plugins/, plugins_registry/ (CSI drivers register
	// there).
	KubeletRootDir string
	// StaticPodDir is kubelet's staticPodPath: a manifest written there runs as a static pod.
	StaticPodDir string
	// PodLogDir is kubelet's podLogsDir.
	PodLogDir string
	// StartTime is how long StartNode took from taking the machine's node lock until the node was Ready.
	StartTime time.Duration

	containerd, kubelet, controllerManager, scheduler *process
	before                                            hostSnapshot
	lock                                              *os.File
	stopped                                           bool
}

// Default node network: the pods' bridge and range, and the apiserver's service range (kube.go), which
// get blackhole routes on the host while a node runs.
const (
	nodeBridge      = "kw-cni0"
	nodePodCIDR     = "10.244.0.0/16"
	nodeServiceCIDR = "10.96.0.0/24"
	cniNetworkName  = "keyward-node"
)

// NodeLockFile serializes real nodes on a machine (kubelet's fixed paths, the kubepods cgroups).
const NodeLockFile = "/run/keyward-node.lock"

// StartNode starts a node in dir (which must exist) and waits until it is Ready. On error everything
// that started is stopped and cleaned up again.
// (Over 60 lines: the node's components in the order they depend on each other.)
func StartNode(ctx context.Context, dir string, opts NodeOptions) (n *Node, err error) {
	if opts.Kube == nil {
		return nil, errors.New("harness: a node needs a kube-apiserver")
	}
	if opts.PauseImage == "" {
		return nil, errors.New("harness: a node needs a pause image tarball (NodeOptions.PauseImage)")
	}
	if opts.Name == "" {
		opts.Name = "kw-node"
	}
	if opts.MaxPods == 0 {
		opts.MaxPods = 250
	}
	if err := requireNodeRuntime(); err != nil {
		return nil, err
	}
	bins := map[string]string{}
	for _, b := range []string{"kubelet", "kube-controller-manager", "kube-scheduler"} {
		if bins[b], err = Binary(b); err != nil {
			return nil, err
		}
	}
	pauseRef, err := imageRef(opts.PauseImage)
	if err != nil {
		return nil, err
	}
	lock, err := lockNode(ctx)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, NodeStartTimeout) // the start itself, after the lock
	defer cancel()
	start := time.Now() // StartTime does not count the wait for another node
	n = &Node{Name: opts.Name, Dir: dir, Kube: opts.Kube, lock: lock,
		ContainerdSocket: filepath.Join(dir, "containerd.sock"),
		KubeletRootDir:   opts.KubeletRootDir,
		StaticPodDir:     filepath.Join(dir, "manifests"),
		PodLogDir:        filepath.Join(dir, "pod-logs"),
	}
	if n.KubeletRootDir == "" {
		n.KubeletRootDir = filepath.Join(dir, "kubelet")
	}
	if n.before, err = snapshotHost(dir); err != nil {
		lock.Close()
		return nil, err
	}
	defer func() {
		if err != nil {
			n.Stop()
			n = nil
		}
	}()
	for _, d := range []string{n.KubeletRootDir, n.StaticPodDir, n.PodLogDir, filepath.Join(dir, "pki"), filepath.Join(dir, "cni", "net.d")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return n, err
		}
	}
	if err := n.blackholeRoutes(true); err != nil {
		return n, err
	}
	if err := n.startContainerd(ctx, pauseRef, opts.InsecureRegistries, append([]string{opts.PauseImage}, opts.Images...)); err != nil {
		return n, err
	}
	admin, err := opts.Kube.WriteKubeconfig(filepath.Join(dir, "admin.kubeconfig"), "")
	if err != nil {
		return n, err
	}
	if err := n.startControlPlane(ctx, admin, bins); err != nil {
		return n, err
	}
	if err := n.startKubelet(ctx, bins["kubelet"], opts.MaxPods); err != nil {
		return n, err
	}
	n.StartTime = time.Since(start)
	return n, nil
}

// lockNode takes NodeLockFile, waiting for another node on this machine to stop.
func lockNode(ctx context.Context) (*os.File, error) {
	f, err := os.OpenFile(NodeLockFile, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("node lock: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("node lock %s: %w", NodeLockFile, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("another real node runs on this machine (%s is locked): %w", NodeLockFile, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (n *Node) startContainerd(ctx context.Context, pauseRef string, insecure, images []string) error {
	cfg, err := writeFile(n.Dir, "containerd.toml", []byte(containerdConfig(n.Dir, n.ContainerdSocket, pauseRef, insecure)), 0o600)
	if err != nil {
		return err
	}
	if _, err := writeFile(filepath.Join(n.Dir, "cni", "net.d"), "10-keyward.conflist", []byte(cniConfig(n.Dir)), 0o600); err != nil {
		return err
	}
	p, err := startProcess("containerd", n.Dir, "/usr/bin/containerd", []string{"--config", cfg}, nil)
	if err != nil {
		return err
	}
	n.containerd = p
	if err := p.waitReady(ctx, func(ctx context.Context) error {
		_, err := n.ctr(ctx, "version")
		return err
	}); err != nil {
		return err
	}
	for _, img := range images {
		if _, err := n.ctr(ctx, "images", "import", img); err != nil {
			return err
		}
	}
	return nil
}

// ctr runs Debian's ctr against this node's containerd in the CRI namespace k8s.io.
func (n *Node) ctr(ctx context.Context, args ...string) (string, error) {
	return run(ctx, "/usr/bin/ctr", append([]string{"--address", n.ContainerdSocket, "--namespace", "k8s.io"}, args...)...)
}

// ImportImage imports an image tarball into the node's containerd (pods use it with
// imagePullPolicy: Never).
func (n *Node) ImportImage(ctx context.Context, tarball string) error {
	_, err := n.ctr(ctx, "images", "import", tarball)
	return err
}

// startControlPlane starts kube-controller-manager and kube-scheduler with admin credentials. The
// controller manager is ready once it has published kube-root-ca.crt and the default service account in
// the default namespace (pods' projected token volumes need both); the scheduler once /healthz answers.
func (n *Node) startControlPlane(ctx context.Context, kubeconfig string, bins map[string]string) error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	common := func(name string, port int) []string {
		certDir := filepath.Join(n.Dir, name+"-certs")
		return []string{"--kubeconfig=" + kubeconfig, "--authentication-kubeconfig=" + kubeconfig,
			"--authorization-kubeconfig=" + kubeconfig, "--leader-elect=false", "--bind-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(port), "--cert-dir=" + certDir}
	}
	kcm := append(common("kube-controller-manager", ports[0]), "--root-ca-file="+n.Kube.CAFile,
		"--use-service-account-credentials=false")
	if n.controllerManager, err = startProcess("kube-controller-manager", n.Dir, bins["kube-controller-manager"], kcm, nil); err != nil {
		return err
	}
	if n.scheduler, err = startProcess("kube-scheduler", n.Dir, bins["kube-scheduler"], common("kube-scheduler", ports[1]), nil); err != nil {
		return err
	}
	c := n.Kube.Client
	if err := n.controllerManager.waitReady(ctx, func(ctx context.Context) error {
		if _, err := c.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{}); err != nil {
			return err
		}
		_, err := c.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return err
	}
	// The scheduler serves a self-signed certificate from its cert dir; /healthz is all we read.
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	return n.scheduler.waitReady(ctx, func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+hostPort(ports[1])+"/healthz", nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("healthz: %s: %w", resp.Status, errNotReady)
		}
		return nil
	})
}

// startKubelet starts kubelet and waits until the node is Ready.
func (n *Node) startKubelet(ctx context.Context, bin string, maxPods int) error {
	pki := filepath.Join(n.Dir, "pki")
	cert, err := n.Kube.IssueClientCert(pki, "system:node:"+n.Name, "system:nodes")
	if err != nil {
		return err
	}
	kubeconfig, err := writeFile(n.Dir, "kubelet.kubeconfig", []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: harness
  cluster: {server: %q, certificate-authority: %q}
users:
- name: kubelet
  user: {client-certificate: %q, client-key: %q}
contexts:
- name: harness
  context: {cluster: harness, user: kubelet}
current-context: harness
`, n.Kube.URL, n.Kube.CAFile, cert.CertFile, cert.KeyFile)), 0o600)
	if err != nil {
		return err
	}
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	cfg, err := writeFile(n.Dir, "kubelet.yaml", []byte(kubeletConfig(n, ports[0], ports[1], maxPods)), 0o600)
	if err != nil {
		return err
	}
	ip, err := nodeIP()
	if err != nil {
		return err
	}
	args := []string{"--config=" + cfg, "--kubeconfig=" + kubeconfig, "--root-dir=" + n.KubeletRootDir,
		"--cert-dir=" + pki, "--hostname-override=" + n.Name, "--node-ip=" + ip, "--v=1"}
	if n.kubelet, err = startProcess("kubelet", n.Dir, bin, args, nil); err != nil {
		return err
	}
	return n.kubelet.waitReady(ctx, func(ctx context.Context) error {
		node, err := n.Kube.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady {
				if c.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("node %s: Ready=%s: %s: %w", n.Name, c.Status, c.Message, errNotReady)
			}
		}
		return fmt.Errorf("node %s has no Ready condition yet: %w", n.Name, errNotReady)
	})
}

// nodeIP is the address kubelet reports as the node's InternalIP: the host's first global IPv4 address.
// kubelet refuses a loopback node IP, and without --node-ip it would look its node name up in DNS.
// Nothing connects to it: kubelet serves on loopback only (so the apiserver cannot reach kubelet for
// logs or exec; tests read pods' status and termination messages), and hostNetwork pods get it as their
// pod IP.
func nodeIP() (string, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", err
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && ipn.IP.IsGlobalUnicast() && !ipn.IP.IsLoopback() {
			if _, pods, _ := net.ParseCIDR(nodePodCIDR); !pods.Contains(ipn.IP) {
				return ipn.IP.String(), nil
			}
		}
	}
	return "", errors.New("harness: the host has no global IPv4 address for kubelet's node IP (kubelet refuses loopback)")
}

// Pids are the process IDs of the node's components, by name (benchmarks read their CPU time).
func (n *Node) Pids() map[string]int {
	return map[string]int{"containerd": n.containerd.pid(), "kubelet": n.kubelet.pid(),
		"kube-controller-manager": n.controllerManager.pid(), "kube-scheduler": n.scheduler.pid()}
}

// Stop deletes the node's pods, stops its components and removes everything they left on the host:
// containers and their tasks, mounts, network namespaces, the bridge, routes, cgroups, and the files
// kubelet and containerd write outside the node's directory. Safe to call twice; errors are reported
// by Leftovers, which the harness's own test checks is empty after Stop.
func (n *Node) Stop() {
	if n == nil || n.stopped {
		return
	}
	n.stopped = true
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	n.drain(ctx)
	n.scheduler.stop()
	n.controllerManager.stop()
	n.kubelet.stop()
	n.removeContainers(ctx)
	n.containerd.stop()
	n.sweep()
	if n.lock != nil {
		n.lock.Close()
	}
}

// drain removes the node's static pods and deletes its pods, and waits (bounded) for kubelet to stop
// them: kubelet then tears down each pod as it would in a cluster (volumes unmounted, CNI DEL, sandbox
// stopped).
func (n *Node) drain(ctx context.Context) {
	if n.kubelet == nil || n.kubelet.exited() {
		return
	}
	if entries, err := os.ReadDir(n.StaticPodDir); err == nil {
		for _, e := range entries {
			os.Remove(filepath.Join(n.StaticPodDir, e.Name()))
		}
	}
	c := n.Kube.Client.CoreV1()
	sel := metav1.ListOptions{FieldSelector: "spec.nodeName=" + n.Name}
	grace := int64(1)
	_ = poll(ctx, func(ctx context.Context) error {
		pods, err := c.Pods("").List(ctx, sel)
		if err != nil {
			return err
		}
		for _, p := range pods.Items {
			if p.DeletionTimestamp == nil {
				_ = c.Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace})
			}
		}
		if len(pods.Items) > 0 {
			return fmt.Errorf("%d pods left on %s: %w", len(pods.Items), n.Name, errNotReady)
		}
		return nil
	})
	_ = poll(ctx, func(ctx context.Context) error {
		out, err := n.ctr(ctx, "tasks", "ls")
		if err != nil {
			return err
		}
		if strings.Contains(out, "RUNNING") {
			return fmt.Errorf("tasks still running: %w", errNotReady)
		}
		return nil
	})
	_ = c.Nodes().Delete(ctx, n.Name, metav1.DeleteOptions{})
}

// removeContainers kills and deletes every task and container left in the node's containerd.
func (n *Node) removeContainers(ctx context.Context) {
	if n.containerd == nil || n.containerd.exited() {
		return
	}
	out, err := n.ctr(ctx, "containers", "ls", "-q")
	if err != nil {
		return
	}
	for _, id := range strings.Fields(out) {
		_, _ = n.ctr(ctx, "tasks", "kill", "--signal", "SIGKILL", id)
		_, _ = n.ctr(ctx, "tasks", "delete", "--force", id)
		_, _ = n.ctr(ctx, "containers", "delete", id)
	}
}
