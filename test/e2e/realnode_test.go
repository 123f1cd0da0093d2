package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
	"github.com/keyward/keyward/test/images"
)

// realNode is the real-node scenario's cluster: the harness apiserver and Vault, a node (containerd,
// runc, kubelet, kube-controller-manager, kube-scheduler) with Keyward's images imported, and the
// broker deployed from deploy/overlays/dev.
type realNode struct {
	etcd  *harness.Etcd
	kube  *harness.KubeAPIServer
	vault *harness.Vault
	// encryption is the apiserver's --encryption-provider-config, reloaded when it changes: identity
	// until the KMS step writes deploy/control-plane's (a control-plane node's apiserver starts with
	// it, but this one has to run before the node whose kubelet runs keyward-kms).
	encryption string
	node       *harness.Node
	images     map[string]images.Result
	// hostDir holds what the DaemonSet takes from the node's own disk: the audit key and the audit
	// stream (hostPath volumes, /etc/keyward/audit-key and /var/log/keyward as shipped).
	hostDir string
}

// identityOnly is the apiserver's encryption config until keyward-kms runs: Secrets stored as they are.
const identityOnly = `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - identity: {}
`

const (
	realNodeSystemNS = "keyward-system"
	secretsMount     = "/secrets"
	rotatedValue     = "CANARY-prod-db-password-rotated-7e0d"
)

// The broker as users deploy it (kustomize of deploy/overlays/dev, the image built by test/images and
// imported into containerd) serves real pods through a real kubelet: the DaemonSet becomes Ready and
// registers with kubelet; a pod reads its secret from a read-only tmpfs; a pod without a grant stays
// ContainerCreating with the broker's PermissionDenied in its events; killing the broker pod keeps
// the running pods' files and its successor serves them; a rotation in Vault reaches a running pod's
// file through requiresRepublish; deleting a pod leaves no mount, no file and no Vault token. Then
// keyward-kms runs as the static pod of deploy/control-plane in the same kubelet, and the apiserver,
// given deploy/control-plane's EncryptionConfiguration, stores Secrets in etcd through it.
func TestRealNodeServesPodsWithTheShippedManifests(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the real-node e2e runs kubelet and containerd and needs root")
	}
	r := startRealNode(t)
	var reader *corev1.Pod
	runSteps(t,
		step{"the broker DaemonSet becomes Ready and registers with kubelet", r.deployBroker},
		step{"a pod reads its secret from a read-only tmpfs", func(t *testing.T) { reader = r.startReader(t) }},
		step{"a pod without a grant stays ContainerCreating with PermissionDenied", r.deniedPod},
		step{"killing the broker pod keeps the files; its successor serves pods", func(t *testing.T) { r.killBroker(t, reader) }},
		step{"a rotation in Vault reaches the running pod's file", func(t *testing.T) { r.rotate(t, reader) }},
		step{"deleting the pod unpublishes: no mount, no file, no Vault token", func(t *testing.T) { r.deletePod(t, reader) }},
		step{"keyward-kms as the shipped static pod encrypts Secrets in etcd", r.kmsStaticPod},
	)
}

// startRealNode builds the images, starts the apiserver, Vault (laid out by provisionVault) and a node
// with the images imported.
func startRealNode(t *testing.T) *realNode {
	t.Helper()
	r := &realNode{images: map[string]images.Result{}, hostDir: harness.Dir(t)}
	root, err := harness.RepoFile(".")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	built, err := images.Build(ctx, images.Options{ModuleDir: root, OutDir: harness.Dir(t),
		Images: []string{"keyward-broker", "pause", "secretcheck"},
		Meta:   images.Meta{Source: "https://example.invalid/keyward", Revision: "e2e", Version: "e2e", Created: time.Unix(0, 0).UTC()}})
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range built {
		r.images[b.Name] = b
	}
	t.Logf("images built in %s", time.Since(start).Round(100*time.Millisecond))
	r.etcd = harness.EtcdT(t)
	r.encryption = filepath.Join(r.hostDir, "encryption-config.yaml")
	if err := os.WriteFile(r.encryption, []byte(identityOnly), 0o600); err != nil {
		t.Fatal(err)
	}
	r.kube = harness.KubeT(t, harness.KubeOptions{Etcd: r.etcd, EncryptionConfig: r.encryption,
		ExtraArgs: []string{"--encryption-provider-config-automatic-reload=true"}})
	r.vault = harness.VaultT(t)
	provisionVault(t, r.vault, r.kube)
	// kubelet's default root directory, which the shipped DaemonSet's paths name.
	r.node = harness.NodeT(t, harness.NodeOptions{Kube: r.kube, PauseImage: r.images["pause"].Tar,
		Images:         []string{r.images["keyward-broker"].Tar, r.images["secretcheck"].Tar},
		KubeletRootDir: "/var/lib/kubelet"})
	t.Logf("node %s Ready in %s", r.node.Name, r.node.StartTime.Round(100*time.Millisecond))
	t.Cleanup(func() { // before the node stops: what a failure needs to be understood
		if t.Failed() {
			r.dumpLogs(t)
		}
	})
	for ns, env := range map[string]string{"payments-prod": "prod", "other-prod": "prod"} {
		if _, err := r.kube.CreateNamespace(ctx, ns, map[string]string{policy.EnvironmentLabel: env}); err != nil {
			t.Fatal(err)
		}
		if _, err := r.kube.CreateServiceAccount(ctx, ns, "api"); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

// deployBroker applies deploy/overlays/dev as rendered by kustomize, patched only where this machine
// differs from a cluster (patchForThisNode), and waits until the broker's pod is Ready and kubelet
// lists the driver on the node's CSINode.
func (r *realNode) deployBroker(t *testing.T) {
	ctx := context.Background()
	start := time.Now()
	objects := render(t, "../../deploy/overlays/dev")
	r.patchForThisNode(t, objects)
	r.apply(t, objects)
	c := r.kube.Client
	var pod corev1.Pod
	eventually(t, 3*time.Minute, "the broker DaemonSet Ready", func() error {
		ds, err := c.AppsV1().DaemonSets(realNodeSystemNS).Get(ctx, "keyward-broker", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ds.Status.DesiredNumberScheduled != 1 || ds.Status.NumberReady != 1 {
			return fmt.Errorf("DaemonSet: %d desired, %d ready; %s", ds.Status.DesiredNumberScheduled, ds.Status.NumberReady, r.podStates(ctx, realNodeSystemNS))
		}
		p, err := r.brokerPod(ctx)
		if err != nil {
			return err
		}
		pod = *p
		return nil
	})
	dsReady := time.Since(start)
	if pod.Spec.NodeName != r.node.Name || pod.Status.Phase != corev1.PodRunning {
		t.Fatalf("the broker pod is %s on %q", pod.Status.Phase, pod.Spec.NodeName)
	}
	if pod.Spec.Containers[0].Image != r.images["keyward-broker"].Ref {
		t.Errorf("the broker runs %s, not the image built from this tree (%s)", pod.Spec.Containers[0].Image, r.images["keyward-broker"].Ref)
	}
	r.waitRegistered(t)
	t.Logf("the broker DaemonSet was Ready %s after kubectl apply, registered with kubelet after %s",
		dsReady.Round(100*time.Millisecond), time.Since(start).Round(100*time.Millisecond))
}

// waitRegistered waits until kubelet lists secrets.keyward.dev on the node's CSINode: the broker's
// plugin-registration socket was found and the registration accepted.
func (r *realNode) waitRegistered(t *testing.T) {
	t.Helper()
	eventually(t, time.Minute, "kubelet registered "+csi.DriverName, func() error {
		cn, err := r.kube.Client.StorageV1().CSINodes().Get(context.Background(), r.node.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, d := range cn.Spec.Drivers {
			if d.Name == csi.DriverName {
				if d.NodeID != r.node.Name {
					return fmt.Errorf("CSINode lists %s with node ID %q, want %q", d.Name, d.NodeID, r.node.Name)
				}
				return nil
			}
		}
		return fmt.Errorf("CSINode %s lists no %s: %+v", r.node.Name, csi.DriverName, cn.Spec.Drivers)
	})
}

// patchForThisNode changes the rendered manifests only where this machine forces it; each change says
// why. Everything else (image, arguments, probes, mounts, security context, RBAC) is as shipped.
func (r *realNode) patchForThisNode(t *testing.T, objects []*unstructured.Unstructured) {
	t.Helper()
	patched := map[string]bool{}
	for _, o := range objects {
		switch o.GetKind() + "/" + o.GetName() {
		case "ConfigMap/keyward-broker":
			// Vault is the harness's dev server on the host's loopback, plain HTTP (a cluster's is
			// https://vault.vault.svc:8200 with its CA): only the address and the scheme change.
			data, _, _ := unstructured.NestedStringMap(o.Object, "data")
			var cfg map[string]any
			if err := yaml.Unmarshal([]byte(data["broker.yaml"]), &cfg); err != nil {
				t.Fatal(err)
			}
			v, _ := cfg["vault"].(map[string]any)
			if v == nil {
				t.Fatalf("the shipped broker config has no vault section: %s", data["broker.yaml"])
			}
			v["address"], v["allowInsecureHTTP"] = r.vault.Addr, true
			delete(v, "caFile")
			b, err := yaml.Marshal(cfg)
			if err != nil {
				t.Fatal(err)
			}
			data["broker.yaml"] = string(b)
			setData(t, o, data)
		case "ConfigMap/keyward-policy":
			// The shipped policy grants nothing (deny by default); an operator adds the grants of the
			// cluster's namespaces: here the e2e's (payments-prod's api may read payments-prod/*;
			// other-prod has no grant).
			data, _, _ := unstructured.NestedStringMap(o.Object, "data")
			data["policy.yaml"] = brokerPolicy
			setData(t, o, data)
		case "DaemonSet/keyward-broker":
			r.patchDaemonSet(t, o)
		default:
			continue
		}
		patched[o.GetKind()+"/"+o.GetName()] = true
	}
	if len(patched) != 3 {
		t.Fatalf("patched %v; the manifests no longer have the broker's ConfigMaps and DaemonSet", patched)
	}
}

func setData(t *testing.T, o *unstructured.Unstructured, data map[string]string) {
	t.Helper()
	m := map[string]any{}
	for k, v := range data {
		m[k] = v
	}
	if err := unstructured.SetNestedMap(o.Object, m, "data"); err != nil {
		t.Fatal(err)
	}
}

// patchDaemonSet: see each comment.
func (r *realNode) patchDaemonSet(t *testing.T, o *unstructured.Unstructured) {
	t.Helper()
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds); err != nil {
		t.Fatal(err)
	}
	spec := &ds.Spec.Template.Spec
	// The harness has no kube-proxy (so no Service VIPs) and its pods' network reaches nothing off
	// the node, while the apiserver and Vault listen on the host's loopback: the broker joins the
	// host's network namespace and is told the apiserver's address (kubelet would give it the
	// `kubernetes` Service's VIP, 10.96.0.1, which nothing here translates).
	spec.HostNetwork = true
	u, err := url.Parse(r.kube.URL)
	if err != nil {
		t.Fatal(err)
	}
	spec.Containers[0].Env = append(spec.Containers[0].Env,
		corev1.EnvVar{Name: "KUBERNETES_SERVICE_HOST", Value: u.Hostname()},
		corev1.EnvVar{Name: "KUBERNETES_SERVICE_PORT", Value: u.Port()})
	// kubelet's paths stay as shipped: the node's kubelet runs with its default root, /var/lib/kubelet.
	// The node's audit key and audit stream are the test's, not the machine's /etc/keyward and
	// /var/log/keyward (other tests and nodes share this machine).
	moved := 0
	for i, v := range spec.Volumes {
		switch {
		case v.Name == "audit-key" && v.HostPath != nil:
			spec.Volumes[i].HostPath.Path = r.auditKeyDir(t)
			moved++
		case v.Name == "audit-log" && v.HostPath != nil:
			spec.Volumes[i].HostPath.Path = filepath.Join(r.hostDir, "log")
			moved++
		}
	}
	if moved != 2 {
		t.Fatalf("the DaemonSet has no audit-key and audit-log hostPath volumes: %+v", spec.Volumes)
	}
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&ds)
	if err != nil {
		t.Fatal(err)
	}
	o.Object = m
}

// auditKeyDir provisions the node's audit key, as deploy/README.md asks of every node, and returns its
// directory.
func (r *realNode) auditKeyDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(r.hostDir, "audit-key")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "audit.key"), []byte(hex.EncodeToString(key)), 0o400); err != nil {
		t.Fatal(err)
	}
	return dir
}

// apply creates the objects as kubectl apply would for new objects, and after the namespace the
// keyward-vault-ca ConfigMap deploy/README.md asks users to create (the harness Vault speaks plain
// HTTP, so its content is any CA: the broker's config names no caFile here).
func (r *realNode) apply(t *testing.T, objects []*unstructured.Unstructured) {
	t.Helper()
	ctx := context.Background()
	dyn, err := dynamic.NewForConfig(r.kube.Config)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(r.kube.Client.Discovery()))
	for _, o := range objects {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s: %v", gvk, err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == "namespace" {
			ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		}
		if _, err := ri.Create(ctx, o, metav1.CreateOptions{FieldValidation: "Strict"}); err != nil {
			t.Fatalf("creating %s %s/%s: %v", gvk.Kind, o.GetNamespace(), o.GetName(), err)
		}
		if gvk.Kind == "Namespace" && o.GetName() == realNodeSystemNS {
			cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "keyward-vault-ca"}, Data: map[string]string{"ca.crt": string(r.kube.CAData)}}
			if _, err := r.kube.Client.CoreV1().ConfigMaps(realNodeSystemNS).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// brokerPod is the broker DaemonSet's pod, once it is Running and Ready.
func (r *realNode) brokerPod(ctx context.Context) (*corev1.Pod, error) {
	pods, err := r.kube.Client.CoreV1().Pods(realNodeSystemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=keyward-broker"})
	if err != nil {
		return nil, err
	}
	var live []corev1.Pod
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			live = append(live, p)
		}
	}
	if len(live) != 1 {
		return nil, fmt.Errorf("%d broker pods", len(live))
	}
	p := live[0]
	if p.Status.Phase != corev1.PodRunning || !podReady(&p) {
		return nil, fmt.Errorf("broker pod %s: %s, not Ready", p.Name, p.Status.Phase)
	}
	return &p, nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// secretPod is a pod of ns's api service account with an inline secrets.keyward.dev volume
// (readOnly, as the driver requires) at /secrets, running secretcheck in each container.
func secretPod(ns, name, ref string, containers map[string][]string) *corev1.Pod {
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
			Name: n, Image: "keyward/secretcheck:dev", ImagePullPolicy: corev1.PullNever,
			Args:         append([]string{"-dir", secretsMount}, containers[n]...),
			VolumeMounts: []corev1.VolumeMount{{Name: "secrets", MountPath: secretsMount, ReadOnly: true}},
		})
	}
	return p
}

// checkVerdict is secretcheck's termination message.
type checkVerdict struct {
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

// startReader starts a pod whose "check" container proves its secret and exits, whose "hold"
// container keeps the pod running, and whose "rotated" container waits for the rotated value (the
// rotation step).
func (r *realNode) startReader(t *testing.T) *corev1.Pod {
	ctx := context.Background()
	want := "db-password=" + prodCanary
	p := secretPod("payments-prod", "reader", "payments-prod/db", map[string][]string{
		"check":   {"-expect", want},
		"hold":    {"-expect", want, "-hold"},
		"rotated": {"-expect", "db-password=" + rotatedValue, "-timeout", "30m", "-poll", "250ms"},
	})
	start := time.Now()
	p, err := r.kube.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var running time.Duration
	var v checkVerdict
	eventually(t, 2*time.Minute, "the reader's check container done", func() error {
		cur, err := r.kube.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cur.Status.Phase == corev1.PodRunning && running == 0 {
			running = time.Since(start)
		}
		st := containerStatus(cur, "check")
		if st == nil || st.State.Terminated == nil {
			return fmt.Errorf("pod %s, check container not terminated: %s", cur.Status.Phase, r.podStates(ctx, p.Namespace))
		}
		if err := json.Unmarshal([]byte(st.State.Terminated.Message), &v); err != nil {
			t.Fatalf("the check container's termination message %q: %v", st.State.Terminated.Message, err)
		}
		if st.State.Terminated.ExitCode != 0 {
			t.Fatalf("the check container exited %d: %s", st.State.Terminated.ExitCode, st.State.Terminated.Message)
		}
		p = cur
		return nil
	})
	if v.Verdict != "pass" || !v.MountPoint || !v.Tmpfs || !v.ReadOnly || len(v.Problems) > 0 {
		t.Fatalf("secretcheck's verdict from inside the pod: %+v", v)
	}
	if len(v.Files) != 1 || v.Files[0].Name != "db-password" || v.Files[0].Bytes != len(prodCanary) {
		t.Fatalf("the volume holds %+v, want db-password only", v.Files)
	}
	if p.Status.Phase != corev1.PodRunning {
		t.Fatalf("the reader pod is %s, want Running (hold and rotated keep running)", p.Status.Phase)
	}
	t.Logf("the reader pod was Running %s after it was created; secretcheck: %+v", running.Round(100*time.Millisecond), v)
	r.wantVolume(t, p, prodCanary)
	return p
}

func containerStatus(p *corev1.Pod, name string) *corev1.ContainerStatus {
	for i := range p.Status.ContainerStatuses {
		if p.Status.ContainerStatuses[i].Name == name {
			return &p.Status.ContainerStatuses[i]
		}
	}
	return nil
}

// volumePath is kubelet's path of the pod's secrets volume on the host.
func (r *realNode) volumePath(p *corev1.Pod) string {
	return filepath.Join(r.node.KubeletRootDir, "pods", string(p.UID), "volumes/kubernetes.io~csi/secrets/mount")
}

// wantVolume checks from the host that the pod's volume is a mounted tmpfs whose db-password holds
// value.
func (r *realNode) wantVolume(t *testing.T, p *corev1.Pod, value string) {
	t.Helper()
	target := r.volumePath(p)
	if fs := mountedFS(t, target); fs != "tmpfs" {
		t.Fatalf("the pod's volume %s is mounted as %q, want tmpfs", target, fs)
	}
	b, err := os.ReadFile(filepath.Join(target, "db-password"))
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != value {
		t.Fatalf("the pod's db-password holds %d bytes, not the expected %d", len(b), len(value))
	}
}

// mountedFS is the file system type mounted at path in the host's mount namespace ("" if none).
func mountedFS(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
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
	return fs
}

// mountsUnder lists the host's mount points under dir.
func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir) {
			out = append(out, f[4])
		}
	}
	return out
}

// deniedPod: other-prod is in the prod environment and Vault's prod role covers it, but the broker's
// policy grants it nothing: the pod never starts, and its events carry the broker's refusal.
func (r *realNode) deniedPod(t *testing.T) {
	ctx := context.Background()
	p := secretPod("other-prod", "denied", "other-prod/db", map[string][]string{"check": {"-expect", "db-password=" + prodCanary + "-3"}})
	p, err := r.kube.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var msg string
	eventually(t, time.Minute, "a FailedMount event with PermissionDenied", func() error {
		evs, err := r.kube.Client.CoreV1().Events(p.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + p.Name})
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Reason == "FailedMount" && strings.Contains(e.Message, "PermissionDenied") {
				msg = e.Message
				return nil
			}
		}
		return fmt.Errorf("%d events, none FailedMount with PermissionDenied", len(evs.Items))
	})
	t.Logf("the denied pod's event: %s", msg)
	if strings.Contains(msg, prodCanary) {
		t.Fatal("the event carries the secret's value")
	}
	// Still not started, a while later: kubelet keeps retrying and the broker keeps refusing.
	time.Sleep(5 * time.Second)
	cur, err := r.kube.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st := containerStatus(cur, "check")
	if cur.Status.Phase != corev1.PodPending || st == nil || st.State.Waiting == nil || st.State.Waiting.Reason != "ContainerCreating" {
		t.Fatalf("the denied pod is %s with %+v, want Pending in ContainerCreating", cur.Status.Phase, st)
	}
	zero := int64(0)
	if err := r.kube.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
}

// killBroker deletes the broker's pod at once (no grace): the reader's volume and files stay, its
// containers keep running, the DaemonSet's next pod registers again and serves a new pod.
func (r *realNode) killBroker(t *testing.T, reader *corev1.Pod) {
	ctx := context.Background()
	old, err := r.brokerPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	zero := int64(0)
	start := time.Now()
	if err := r.kube.Client.CoreV1().Pods(realNodeSystemNS).Delete(ctx, old.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	// The old pod is gone from the node, not only from the API (a forced delete removes the object at
	// once): kubelet removes a pod's directory after it stopped its containers and unmounted its
	// volumes, the pods directory's Bidirectional mount included. The reader's files must survive that.
	oldDir := filepath.Join(r.node.KubeletRootDir, "pods", string(old.UID))
	eventually(t, 2*time.Minute, "the old broker pod torn down by kubelet", func() error {
		if _, err := os.Stat(oldDir); !os.IsNotExist(err) {
			return fmt.Errorf("%s: %v", oldDir, err)
		}
		return nil
	})
	r.wantVolume(t, reader, prodCanary)
	var successor *corev1.Pod
	eventually(t, 2*time.Minute, "a new broker pod Ready", func() error {
		p, err := r.brokerPod(ctx)
		if err == nil && p.UID == old.UID {
			err = fmt.Errorf("still the old pod")
		}
		successor = p
		return err
	})
	r.waitRegistered(t)
	t.Logf("broker pod %s replaced by %s, Ready %s after the kill", old.Name, successor.Name, time.Since(start).Round(100*time.Millisecond))
	r.wantVolume(t, reader, prodCanary)
	cur, err := r.kube.Client.CoreV1().Pods(reader.Namespace).Get(ctx, reader.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"hold", "rotated"} {
		if st := containerStatus(cur, name); st == nil || st.State.Running == nil || st.RestartCount != 0 {
			t.Fatalf("the reader's %s container is no longer running: %+v", name, st)
		}
	}
	// The successor serves: a new pod reads its secret.
	p := secretPod("payments-prod", "reader-2", "payments-prod/db", map[string][]string{"check": {"-expect", "db-password=" + prodCanary}})
	if p, err = r.kube.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Minute, "reader-2 done", func() error {
		cur, err := r.kube.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		switch cur.Status.Phase {
		case corev1.PodSucceeded:
			return nil
		case corev1.PodFailed:
			t.Fatalf("reader-2 failed: %+v", cur.Status.ContainerStatuses)
		}
		return fmt.Errorf("reader-2 is %s", cur.Status.Phase)
	})
	if err := r.kube.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
}

// rotate writes a new value in Vault: kubelet republishes the volume (requiresRepublish) on its pod
// sync, the broker swaps the file, and the reader's "rotated" container sees it from inside the pod.
func (r *realNode) rotate(t *testing.T, reader *corev1.Pod) {
	ctx := context.Background()
	if _, err := r.vault.PutKV(ctx, "kv", "prod/payments-prod/db", map[string]any{"password": rotatedValue}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	file := filepath.Join(r.volumePath(reader), "db-password")
	eventually(t, 4*time.Minute, "the rotated value in the pod's file", func() error {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatalf("the pod's file during rotation: %v", err)
		}
		if string(b) != rotatedValue {
			return fmt.Errorf("still the old value")
		}
		return nil
	})
	onHost := time.Since(start)
	var v checkVerdict
	eventually(t, 30*time.Second, "the rotated container saw the new value", func() error {
		cur, err := r.kube.Client.CoreV1().Pods(reader.Namespace).Get(ctx, reader.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		st := containerStatus(cur, "rotated")
		if st == nil || st.State.Terminated == nil {
			return fmt.Errorf("rotated container still running")
		}
		if err := json.Unmarshal([]byte(st.State.Terminated.Message), &v); err != nil || st.State.Terminated.ExitCode != 0 {
			t.Fatalf("the rotated container exited %d: %q (%v)", st.State.Terminated.ExitCode, st.State.Terminated.Message, err)
		}
		return nil
	})
	if v.Verdict != "pass" || !v.ReadOnly || !v.Tmpfs {
		t.Fatalf("after the rotation, secretcheck's verdict: %+v", v)
	}
	t.Logf("the rotated value reached the running pod's file %s after the Vault write", onHost.Round(100*time.Millisecond))
}

// deletePod deletes the reader: kubelet unpublishes its volume, and nothing of it is left: no mount,
// no file, no pod token in Vault.
func (r *realNode) deletePod(t *testing.T, reader *corev1.Pod) {
	ctx := context.Background()
	if n, err := podLoginTokens(r.vault); err != nil || n == 0 {
		t.Fatalf("before the delete, %d pod tokens are live in Vault (%v): the check below would prove nothing", n, err)
	}
	grace := int64(2)
	start := time.Now()
	if err := r.kube.Client.CoreV1().Pods(reader.Namespace).Delete(ctx, reader.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		t.Fatal(err)
	}
	podDir := filepath.Join(r.node.KubeletRootDir, "pods", string(reader.UID))
	eventually(t, 2*time.Minute, "the pod gone and its volume unmounted", func() error {
		if _, err := r.kube.Client.CoreV1().Pods(reader.Namespace).Get(ctx, reader.Name, metav1.GetOptions{}); err == nil {
			return fmt.Errorf("pod still exists")
		}
		if m := mountsUnder(t, podDir); len(m) > 0 {
			return fmt.Errorf("still mounted: %v", m)
		}
		return nil
	})
	t.Logf("the reader pod was deleted and its volume unmounted %s after the delete", time.Since(start).Round(100*time.Millisecond))
	eventually(t, time.Minute, "no file of the volume", func() error {
		if _, err := os.Stat(r.volumePath(reader)); !os.IsNotExist(err) {
			return fmt.Errorf("%s: %v", r.volumePath(reader), err)
		}
		return nil
	})
	wantPodTokens(t, r.vault, 0, "the pod's Vault token revoked at unpublish")
	r.checkAudit(t, reader)
}

// checkAudit reads the broker's audit stream from the node's disk (both broker pods wrote it): it
// verifies under the node's key, bound to the node, and records the reader's mount and unmount and
// the denied pod's refusal.
func (r *realNode) checkAudit(t *testing.T, reader *corev1.Pod) {
	t.Helper()
	dir := filepath.Join(r.hostDir, "log", "broker-audit")
	key, err := audit.ReadKey(filepath.Join(r.hostDir, "audit-key", "audit.key"))
	if err != nil {
		t.Fatal(err)
	}
	rep, err := audit.VerifyDir(dir, audit.VerifyOptions{Key: key, Node: r.node.Name, Stream: "broker"})
	if err != nil || rep.Problem != "" {
		t.Fatalf("the broker's audit stream does not verify: %v %+v", err, rep)
	}
	recs, err := audit.QueryPath(dir, audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, rec := range recs {
		switch {
		case rec.Type == audit.EventMount && rec.Subject.PodUID == string(reader.UID) && rec.Decision == audit.Allowed:
			seen[string(rec.Type)] = true
		case rec.Type == audit.EventUnmount && strings.Contains(rec.Reason, string(reader.UID)) && rec.Decision == audit.Allowed:
			// An unpublish names no pod but its target path, kubelet's path of the pod's volume.
			seen[string(rec.Type)] = true
		case rec.Subject.Namespace == "other-prod" && rec.Decision == audit.Denied && rec.Code == "PermissionDenied":
			seen["denied"] = true
		}
	}
	for _, want := range []string{string(audit.EventMount), string(audit.EventUnmount), "denied"} {
		if !seen[want] {
			t.Errorf("the audit stream (%d records) has no %s record of the scenario's pods: %v", len(recs), want, seen)
		}
	}
}

// podStates summarizes a namespace's pods for a timeout's message.
func (r *realNode) podStates(ctx context.Context, ns string) string {
	pods, err := r.kube.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, p := range pods.Items {
		s := p.Name + ": " + string(p.Status.Phase)
		for _, c := range p.Status.ContainerStatuses {
			switch {
			case c.State.Waiting != nil:
				s += fmt.Sprintf(" %s waiting %s %s", c.Name, c.State.Waiting.Reason, c.State.Waiting.Message)
			case c.State.Terminated != nil:
				s += fmt.Sprintf(" %s terminated %d", c.Name, c.State.Terminated.ExitCode)
			default:
				s += fmt.Sprintf(" %s running (ready %v, restarts %d)", c.Name, c.Ready, c.RestartCount)
			}
		}
		out = append(out, s)
	}
	return strings.Join(out, "; ")
}

// dumpLogs logs the tail of kubelet's log, the broker's container logs and the keyward-system events.
func (r *realNode) dumpLogs(t *testing.T) {
	tail := func(path string, n int) string {
		b, err := os.ReadFile(path)
		if err != nil {
			return err.Error()
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		return strings.Join(lines, "\n")
	}
	t.Logf("kubelet log (tail):\n%s", tail(filepath.Join(r.node.Dir, "kubelet.log"), 60))
	logs, _ := filepath.Glob(filepath.Join(r.node.PodLogDir, realNodeSystemNS+"_*", "*", "*.log"))
	for _, l := range logs {
		t.Logf("%s (tail):\n%s", l, tail(l, 40))
	}
	for _, ns := range []string{realNodeSystemNS, "payments-prod", "other-prod"} {
		evs, err := r.kube.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			continue
		}
		for _, e := range evs.Items {
			t.Logf("event %s %s/%s: %s %s", ns, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Reason, e.Message)
		}
	}
}
