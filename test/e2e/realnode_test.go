package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
	"github.com/keyward/keyward/test/images"
	"github.com/keyward/keyward/test/realnode"
)

// realNode is the real-node scenario's cluster (realnode.Cluster: the harness apiserver and Vault, a
// node with Keyward's images imported) and the images built for it.
type realNode struct {
	*realnode.Cluster
	images map[string]images.Result
}

const rotatedValue = "CANARY-prod-db-password-rotated-7e0d"

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
		step{"a pod supplying its own token in its volumeAttributes is refused", r.smuggledToken},
		step{"killing the broker pod keeps the files; its successor serves pods", func(t *testing.T) { r.killBroker(t, reader) }},
		step{"a rotation in Vault reaches the running pod's file", func(t *testing.T) { r.rotate(t, reader) }},
		step{"deleting the pod unpublishes: no mount, no file, no Vault token", func(t *testing.T) { r.deletePod(t, reader) }},
		step{"keyward-kms as the shipped static pod encrypts Secrets in etcd", r.kmsStaticPod},
	)
}

// startRealNode builds the images, starts the apiserver (identity encryption, reloaded when it changes),
// Vault (laid out by provisionVault) and a node with the images imported, kubelet at its default root
// (the shipped DaemonSet's paths name it).
func startRealNode(t *testing.T) *realNode {
	t.Helper()
	root, err := harness.RepoFile(".")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	r := &realNode{Cluster: &realnode.Cluster{Repo: root, HostDir: harness.Dir(t), Keywardctl: filepath.Join(bin, "keywardctl")}}
	if r.images, err = realnode.BuildImages(ctx, root, harness.Dir(t), "", "keyward-broker", "pause", "secretcheck"); err != nil {
		t.Fatal(err)
	}
	t.Logf("images built in %s", time.Since(start).Round(100*time.Millisecond))
	r.Etcd = harness.EtcdT(t)
	r.Encryption = filepath.Join(r.HostDir, "encryption-config.yaml")
	if err := os.WriteFile(r.Encryption, []byte(realnode.IdentityOnly), 0o600); err != nil {
		t.Fatal(err)
	}
	r.Kube = harness.KubeT(t, harness.KubeOptions{Etcd: r.Etcd, EncryptionConfig: r.Encryption,
		ExtraArgs: []string{"--encryption-provider-config-automatic-reload=true"}})
	r.Vault = harness.VaultT(t)
	provisionVault(t, r.Vault, r.Kube)
	r.Node = harness.NodeT(t, harness.NodeOptions{Kube: r.Kube, PauseImage: r.images["pause"].Tar,
		Images:         []string{r.images["keyward-broker"].Tar, r.images["secretcheck"].Tar},
		KubeletRootDir: "/var/lib/kubelet"})
	t.Logf("node %s Ready in %s", r.Node.Name, r.Node.StartTime.Round(100*time.Millisecond))
	t.Cleanup(func() { // before the node stops: what a failure needs to be understood
		if t.Failed() {
			r.dumpLogs(t)
		}
	})
	for ns, env := range map[string]string{"payments-prod": "prod", "other-prod": "prod"} {
		if _, err := r.Kube.CreateNamespace(ctx, ns, map[string]string{policy.EnvironmentLabel: env}); err != nil {
			t.Fatal(err)
		}
		if _, err := r.Kube.CreateServiceAccount(ctx, ns, "api"); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

// deployBroker applies deploy/overlays/dev as rendered by kustomize, patched only where this machine
// differs from a cluster (realnode.PatchForThisNode), and waits until the broker's pod is Ready and
// kubelet lists the driver on the node's CSINode.
func (r *realNode) deployBroker(t *testing.T) {
	start := time.Now()
	pod, err := r.DeployBroker(context.Background(), brokerPolicy, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The shipped CSIDriver asks kubelet for the token in the publish secrets; an apiserver that drops
	// the field would leave it in the volume context, and this scenario would not cover that path.
	drv, err := r.Kube.Client.StorageV1().CSIDrivers().Get(context.Background(), csi.DriverName, metav1.GetOptions{})
	check(t, err)
	if drv.Spec.ServiceAccountTokenInSecrets == nil || !*drv.Spec.ServiceAccountTokenInSecrets {
		t.Fatalf("the CSIDriver as stored has serviceAccountTokenInSecrets %v, want true", drv.Spec.ServiceAccountTokenInSecrets)
	}
	if pod.Spec.Containers[0].Image != r.images["keyward-broker"].Ref {
		t.Errorf("the broker runs %s, not the image built from this tree (%s)", pod.Spec.Containers[0].Image, r.images["keyward-broker"].Ref)
	}
	t.Logf("the broker DaemonSet was Ready and registered with kubelet %s after kubectl apply", time.Since(start).Round(100*time.Millisecond))
}

func check(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// startReader starts a pod whose "check" container proves its secret and exits, whose "hold"
// container keeps the pod running, and whose "rotated" container waits for the rotated value (the
// rotation step).
func (r *realNode) startReader(t *testing.T) *corev1.Pod {
	ctx := context.Background()
	want := "db-password=" + prodCanary
	p := realnode.SecretPod("payments-prod", "reader", "payments-prod/db", map[string][]string{
		"check":   {"-expect", want},
		"hold":    {"-expect", want, "-hold"},
		"rotated": {"-expect", "db-password=" + rotatedValue, "-timeout", "30m", "-poll", "250ms"},
	})
	start := time.Now()
	p, err := r.Kube.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	check(t, err)
	var running time.Duration
	var v realnode.Verdict
	eventually(t, 2*time.Minute, "the reader's check container done", func() error {
		cur, err := r.Kube.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cur.Status.Phase == corev1.PodRunning && running == 0 {
			running = time.Since(start)
		}
		var code int32
		if v, code, err = realnode.ContainerVerdict(cur, "check"); err != nil {
			return fmt.Errorf("%v: %s", err, r.PodStates(ctx, p.Namespace))
		}
		if code != 0 {
			t.Fatalf("the check container exited %d: %+v", code, v)
		}
		p = cur
		return nil
	})
	if !v.Passed() {
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

// wantVolume checks from the host that the pod's volume is a mounted tmpfs whose db-password holds
// value.
func (r *realNode) wantVolume(t *testing.T, p *corev1.Pod, value string) {
	t.Helper()
	target := r.VolumePath(p)
	fs, err := realnode.MountedFS(target)
	check(t, err)
	if fs != "tmpfs" {
		t.Fatalf("the pod's volume %s is mounted as %q, want tmpfs", target, fs)
	}
	b, err := os.ReadFile(filepath.Join(target, "db-password"))
	check(t, err)
	if string(b) != value {
		t.Fatalf("the pod's db-password holds %d bytes, not the expected %d", len(b), len(value))
	}
}

// deniedPod: other-prod is in the prod environment and Vault's prod role covers it, but the broker's
// policy grants it nothing: the pod never starts, and its events carry the broker's refusal.
func (r *realNode) deniedPod(t *testing.T) {
	ctx := context.Background()
	p := realnode.SecretPod("other-prod", "denied", "other-prod/db", map[string][]string{"check": {"-expect", "db-password=" + prodCanary + "-3"}})
	p, err := r.Kube.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	check(t, err)
	ev, err := r.FailedMount(ctx, p.Namespace, p.Name, "PermissionDenied")
	check(t, err)
	t.Logf("the denied pod's event: %s", ev.Message)
	if strings.Contains(ev.Message, prodCanary) {
		t.Fatal("the event carries the secret's value")
	}
	// The broker's own event on the pod, through the shipped RBAC (events: create, patch).
	bev := r.brokerEvent(t, p, "SecretsDenied", "publish refused: ")
	if !strings.Contains(bev.Message, "permission denied") || strings.Contains(bev.Message, prodCanary) {
		t.Fatalf("the broker's SecretsDenied: %s", bev.Message)
	}
	t.Logf("the broker's event: %s %s (count %d)", bev.Reason, bev.Message, bev.Count)
	// Still not started, a while later: kubelet keeps retrying and the broker keeps refusing.
	time.Sleep(5 * time.Second)
	cur, err := r.Kube.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	check(t, err)
	st := realnode.ContainerStatus(cur, "check")
	if cur.Status.Phase != corev1.PodPending || st == nil || st.State.Waiting == nil || st.State.Waiting.Reason != "ContainerCreating" {
		t.Fatalf("the denied pod is %s with %+v, want Pending in ContainerCreating", cur.Status.Phase, st)
	}
	zero := int64(0)
	check(t, r.Kube.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}))
}

// smuggledToken: kubelet passes the pod's token in the publish secrets (the shipped CSIDriver's
// serviceAccountTokenInSecrets), and copies the pod's volumeAttributes into the volume context as they
// are: a pod of a granted namespace that names the token attribute itself (here with a real token of
// another namespace's service account) is refused with InvalidArgument, never authenticated as that
// token's pod.
func (r *realNode) smuggledToken(t *testing.T) {
	ctx := context.Background()
	tok, err := r.Kube.ServiceAccountToken(ctx, "other-prod", "api", []string{audience}, 10*time.Minute)
	check(t, err)
	p := realnode.SecretPod("payments-prod", "smuggler", "payments-prod/db", map[string][]string{"check": {"-expect", "db-password=" + prodCanary}})
	p.Spec.Volumes[0].CSI.VolumeAttributes[csi.AttrTokens] = `{"` + audience + `":{"token":"` + tok + `"}}`
	p, err = r.Kube.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	check(t, err)
	ev, err := r.FailedMount(ctx, p.Namespace, p.Name, "InvalidArgument")
	check(t, err)
	if !strings.Contains(ev.Message, "both a volume attribute and a publish secret") || strings.Contains(ev.Message, tok) {
		t.Fatalf("the smuggler's event: %s", ev.Message)
	}
	t.Logf("the smuggler's event: %s", ev.Message)
	zero := int64(0)
	check(t, r.Kube.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}))
}

// killBroker deletes the broker's pod at once (no grace): the reader's volume and files stay, its
// containers keep running, the DaemonSet's next pod registers again and serves a new pod.
func (r *realNode) killBroker(t *testing.T, reader *corev1.Pod) {
	ctx := context.Background()
	old, err := r.BrokerPod(ctx)
	check(t, err)
	zero := int64(0)
	start := time.Now()
	check(t, r.Kube.Client.CoreV1().Pods(realnode.SystemNamespace).Delete(ctx, old.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}))
	// The old pod is gone from the node, not only from the API (a forced delete removes the object at
	// once): kubelet removes a pod's directory after it stopped its containers and unmounted its
	// volumes, the pods directory's Bidirectional mount included. The reader's files must survive that.
	oldDir := filepath.Join(r.Node.KubeletRootDir, "pods", string(old.UID))
	eventually(t, 2*time.Minute, "the old broker pod torn down by kubelet", func() error {
		if _, err := os.Stat(oldDir); !os.IsNotExist(err) {
			return fmt.Errorf("%s: %v", oldDir, err)
		}
		return nil
	})
	r.wantVolume(t, reader, prodCanary)
	successor, err := r.WaitBroker(ctx, string(old.UID))
	check(t, err)
	t.Logf("broker pod %s replaced by %s, Ready and registered %s after the kill", old.Name, successor.Name, time.Since(start).Round(100*time.Millisecond))
	r.wantVolume(t, reader, prodCanary)
	cur, err := r.Kube.Client.CoreV1().Pods(reader.Namespace).Get(ctx, reader.Name, metav1.GetOptions{})
	check(t, err)
	for _, name := range []string{"hold", "rotated"} {
		if st := realnode.ContainerStatus(cur, name); st == nil || st.State.Running == nil || st.RestartCount != 0 {
			t.Fatalf("the reader's %s container is no longer running: %+v", name, st)
		}
	}
	// The successor serves: a new pod reads its secret.
	p := realnode.SecretPod("payments-prod", "reader-2", "payments-prod/db", map[string][]string{"check": {"-expect", "db-password=" + prodCanary}})
	p, err = r.Kube.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	check(t, err)
	eventually(t, 2*time.Minute, "reader-2 done", func() error {
		cur, err := r.Kube.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
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
	check(t, r.Kube.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}))
}

// rotate writes a new value in Vault: kubelet republishes the volume (requiresRepublish) on its pod
// sync, the broker swaps the file, and the reader's "rotated" container sees it from inside the pod.
func (r *realNode) rotate(t *testing.T, reader *corev1.Pod) {
	ctx := context.Background()
	_, err := r.Vault.PutKV(ctx, "kv", "prod/payments-prod/db", map[string]any{"password": rotatedValue})
	check(t, err)
	start := time.Now()
	file := filepath.Join(r.VolumePath(reader), "db-password")
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
	var v realnode.Verdict
	eventually(t, 30*time.Second, "the rotated container saw the new value", func() error {
		cur, err := r.Kube.Client.CoreV1().Pods(reader.Namespace).Get(ctx, reader.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		var code int32
		if v, code, err = realnode.ContainerVerdict(cur, "rotated"); err != nil {
			return err
		}
		if code != 0 {
			t.Fatalf("the rotated container exited %d: %+v", code, v)
		}
		return nil
	})
	if !v.Passed() {
		t.Fatalf("after the rotation, secretcheck's verdict: %+v", v)
	}
	t.Logf("the rotated value reached the running pod's file %s after the Vault write", onHost.Round(100*time.Millisecond))
	// The app can poll ..version; the pod's events say what rotated. The reader was published by the
	// broker pod killed before this step: its successor counted on from the volume.
	raw, err := os.ReadFile(filepath.Join(r.VolumePath(reader), "..version"))
	check(t, err)
	ver, ok := csi.ParseVersion(raw)
	if !ok || ver.Version != 2 || ver.Refs["payments-prod/db#password"] < 2 || strings.Contains(string(raw), "CANARY") {
		t.Fatalf("..version after the rotation: %s", raw)
	}
	ev := r.brokerEvent(t, reader, "SecretsRotated", "secrets volume swapped, ..version 2: payments-prod/db#password version ")
	if strings.Contains(ev.Message, "CANARY") {
		t.Fatalf("SecretsRotated carries a value: %s", ev.Message)
	}
	t.Logf("..version %s; the pod's event: %s", strings.TrimSpace(string(raw)), ev.Message)
}

// brokerEvent waits for keyward-broker's event of reason on pod, its message starting with prefix,
// from the node's broker.
func (r *realNode) brokerEvent(t *testing.T, pod *corev1.Pod, reason, prefix string) corev1.Event {
	t.Helper()
	var found corev1.Event
	eventually(t, time.Minute, reason+" on "+pod.Name, func() error {
		evs, err := r.Kube.Client.CoreV1().Events(pod.Namespace).List(context.Background(),
			metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod.Name + ",reason=" + reason})
		if err != nil {
			return err
		}
		for _, ev := range evs.Items {
			if strings.HasPrefix(ev.Message, prefix) && ev.Source.Component == "keyward-broker" && ev.Source.Host == r.Node.Name {
				found = ev
				return nil
			}
		}
		return fmt.Errorf("%d %s events, none from keyward-broker starting %q", len(evs.Items), reason, prefix)
	})
	return found
}

// deletePod deletes the reader: kubelet unpublishes its volume, and nothing of it is left: no mount,
// no file, no pod token in Vault.
func (r *realNode) deletePod(t *testing.T, reader *corev1.Pod) {
	ctx := context.Background()
	if n, err := podLoginTokens(r.Vault); err != nil || n == 0 {
		t.Fatalf("before the delete, %d pod tokens are live in Vault (%v): the check below would prove nothing", n, err)
	}
	grace := int64(2)
	start := time.Now()
	check(t, r.Kube.Client.CoreV1().Pods(reader.Namespace).Delete(ctx, reader.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace}))
	podDir := filepath.Join(r.Node.KubeletRootDir, "pods", string(reader.UID))
	eventually(t, 2*time.Minute, "the pod gone and its volume unmounted", func() error {
		if _, err := r.Kube.Client.CoreV1().Pods(reader.Namespace).Get(ctx, reader.Name, metav1.GetOptions{}); err == nil {
			return fmt.Errorf("pod still exists")
		}
		m, err := realnode.MountsUnder(podDir)
		if err == nil && len(m) > 0 {
			err = fmt.Errorf("still mounted: %v", m)
		}
		return err
	})
	t.Logf("the reader pod was deleted and its volume unmounted %s after the delete", time.Since(start).Round(100*time.Millisecond))
	eventually(t, time.Minute, "no file of the volume", func() error {
		if _, err := os.Stat(r.VolumePath(reader)); !os.IsNotExist(err) {
			return fmt.Errorf("%s: %v", r.VolumePath(reader), err)
		}
		return nil
	})
	wantPodTokens(t, r.Vault, 0, "the pod's Vault token revoked at unpublish")
	r.checkAudit(t, reader)
}

// checkAudit reads the broker's audit stream from the node's disk (both broker pods wrote it): it
// verifies under the node's key, bound to the node, and records the reader's mount and unmount and
// the denied pod's refusal.
func (r *realNode) checkAudit(t *testing.T, reader *corev1.Pod) {
	t.Helper()
	keyDir, logDir := r.BrokerDirs()
	dir := filepath.Join(logDir, "broker-audit")
	key, err := audit.ReadKey(filepath.Join(keyDir, "audit.key"))
	check(t, err)
	rep, err := audit.VerifyDir(dir, audit.VerifyOptions{Key: key, Node: r.Node.Name, Stream: "broker"})
	if err != nil || rep.Problem != "" {
		t.Fatalf("the broker's audit stream does not verify: %v %+v", err, rep)
	}
	recs, err := audit.QueryPath(dir, audit.Filter{})
	check(t, err)
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
	t.Logf("kubelet log (tail):\n%s", tail(filepath.Join(r.Node.Dir, "kubelet.log"), 60))
	logs, _ := filepath.Glob(filepath.Join(r.Node.PodLogDir, realnode.SystemNamespace+"_*", "*", "*.log"))
	for _, l := range logs {
		t.Logf("%s (tail):\n%s", l, tail(l, 40))
	}
	for _, ns := range []string{realnode.SystemNamespace, "payments-prod", "other-prod"} {
		evs, err := r.Kube.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			continue
		}
		for _, e := range evs.Items {
			t.Logf("event %s %s/%s: %s %s", ns, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Reason, e.Message)
		}
	}
}
