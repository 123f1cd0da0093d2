package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/kms/envelope"
	"github.com/keyward/keyward/test/harness"
	"github.com/keyward/keyward/test/realnode"
)

var stepN int

func step(format string, args ...any) {
	stepN++
	fmt.Printf("\n== %d. %s\n", stepN, fmt.Sprintf(format, args...))
}

func show(format string, args ...any) { fmt.Printf("   %s\n", fmt.Sprintf(format, args...)) }

func main() {
	d := &demo{}
	err := d.run()
	d.teardown()
	if err != nil {
		fmt.Fprintln(os.Stderr, "\ndemo: FAILED:", err)
		os.Exit(1)
	}
	fmt.Println("\ndemo: all steps passed")
}

type demo struct {
	dir        string
	bin        string
	kubeconfig string
	kubectlBin string
	c          *realnode.Cluster
	cleanup    []func()
}

func (d *demo) teardown() {
	step("tear down")
	for i := len(d.cleanup) - 1; i >= 0; i-- {
		d.cleanup[i]()
	}
	if d.dir != "" && os.Getenv("KEYWARD_DEMO_KEEP") == "" {
		os.RemoveAll(d.dir)
	}
	show("deleted the pods, stopped the node (kubelet unmounted the volumes; the harness removed what kubelet and containerd leave), the apiserver, etcd and Vault; removed %s", d.dir)
}

// ctl runs keywardctl, as an operator on the node would.
func (d *demo) ctl(env []string, args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(d.bin, "keywardctl"), args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("keywardctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

// kubectl runs kubectl with the admin kubeconfig and prints the command and what it printed; keep,
// when not nil, selects the lines shown.
func (d *demo) kubectl(keep func([]string) []string, args ...string) (string, error) {
	out, err := exec.Command(d.kubectlBin, append([]string{"--kubeconfig", d.kubeconfig}, args...)...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	show("$ kubectl %s", strings.Join(args, " "))
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if keep != nil {
		lines = keep(lines)
	}
	for _, l := range lines {
		show("  %s", l)
	}
	return string(out), nil
}

// events keeps describe's Events section.
func events(lines []string) []string {
	for i, l := range lines {
		if strings.HasPrefix(l, "Events:") {
			return lines[i:]
		}
	}
	return lines
}

const policyYAML = `environments:
  - {name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod}
  - {name: dev, vaultMount: kv, vaultPrefix: dev, vaultRole: dev}
grants:
  - {namespace: payments-prod, serviceAccount: api, paths: ["payments-prod/*"]}
  - {namespace: payments-dev, serviceAccount: api, paths: ["payments-dev/*"]}
`

// (Over 60 lines: a narrated script, one printed step after another; split, the story would scatter across functions.)
func (d *demo) run() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("the demo runs a real node (containerd, runc, kubelet) and needs root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), harness.NodeLockWait+15*time.Minute)
	defer cancel()
	var err error
	for _, b := range []string{"kubectl", "kubelet", "kube-controller-manager", "kube-scheduler"} {
		if _, err := harness.Binary(b); err != nil {
			return err
		}
	}
	if d.kubectlBin, err = harness.Binary("kubectl"); err != nil {
		return err
	}
	if d.dir, err = harness.ShortTempDir("kw-demo-"); err != nil {
		return err
	}
	repo, err := harness.RepoFile(".")
	if err != nil {
		return err
	}
	d.bin = filepath.Join(d.dir, "bin")
	step("build keywardctl (the operator's CLI, run on the nodes) and Keyward's images (as make images does)")
	if out, err := exec.Command("go", "build", "-o", d.bin+"/", "github.com/keyward/keyward/cmd/keywardctl").CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v: %s", err, out)
	}
	imgs, err := realnode.BuildImages(ctx, repo, filepath.Join(d.dir, "images"), "", "keyward-broker", "pause", "secretcheck")
	if err != nil {
		return err
	}
	for _, n := range []string{"keyward-broker", "secretcheck", "pause"} {
		show("%-28s %s  %5.1f MB  user %s", imgs[n].Ref, imgs[n].Digest.String()[:19]+"...", float64(imgs[n].TarSize)/1e6, imgs[n].User)
	}

	step("etcd %s, kube-apiserver %s and Vault (a test dev server) on loopback",
		harness.Versions()["ETCD_VERSION"], harness.Versions()["KUBE_VERSION"])
	encryption := filepath.Join(d.dir, "encryption-config.yaml")
	if err := os.WriteFile(encryption, []byte(realnode.IdentityOnly), 0o600); err != nil {
		return err
	}
	env, err := harness.StartEnv(ctx, harness.EnvOptions{Kube: true, Vault: true, KubeOptions: harness.KubeOptions{
		EncryptionConfig: encryption, ExtraArgs: []string{"--encryption-provider-config-automatic-reload=true"}}})
	if err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, env.Stop)
	k, v := env.Kube, env.Vault
	if d.kubeconfig, err = k.WriteKubeconfig(filepath.Join(d.dir, "kubeconfig"), ""); err != nil {
		return err
	}
	show("apiserver %s, etcd %s (mutual TLS), Vault %s", k.URL, env.Etcd.Endpoint, v.Addr)

	step("a real node: containerd and runc, kubelet, kube-controller-manager and kube-scheduler; the images imported (no registry)")
	start := time.Now()
	nodeDir := filepath.Join(d.dir, "node")
	if err := os.MkdirAll(nodeDir, 0o700); err != nil {
		return err
	}
	node, err := harness.StartNode(ctx, nodeDir, harness.NodeOptions{Kube: k, PauseImage: imgs["pause"].Tar,
		Images: []string{imgs["keyward-broker"].Tar, imgs["secretcheck"].Tar}, KubeletRootDir: "/var/lib/kubelet"})
	if err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, node.Stop)
	d.c = &realnode.Cluster{Repo: repo, Etcd: env.Etcd, Kube: k, Vault: v, Node: node, HostDir: filepath.Join(d.dir, "host"),
		Encryption: encryption, Keywardctl: filepath.Join(d.bin, "keywardctl")}
	show("Ready %s after the start (%s with the wait for the machine's node lock)", node.StartTime.Round(100*time.Millisecond), time.Since(start).Round(time.Second))
	if _, err := d.kubectl(nil, "get", "nodes"); err != nil {
		return err
	}

	step("keyward-kms: the KEK created in a SoftHSM2 token on the node, the shipped static pod (deploy/control-plane)")
	auditMaster, auditKeyFile := filepath.Join(d.dir, "audit-master.key"), filepath.Join(d.dir, "node-audit.key")
	// One audit key per node, derived from a master key the security team keeps off the nodes.
	if err := os.WriteFile(auditMaster, []byte(strings.Repeat("demo-audit-master-", 3)), 0o600); err != nil {
		return err
	}
	out, err := d.ctl(nil, "audit", "node-key", "--master-key-file", auditMaster, "--node", node.Name, "--out", auditKeyFile)
	if err != nil {
		return err
	}
	show("keywardctl audit node-key: %s", out)
	auditKey, err := os.ReadFile(auditKeyFile)
	if err != nil {
		return err
	}
	kmsNode, err := d.c.DeployKMS(ctx, auditKey)
	if err != nil {
		return err
	}
	if _, err := d.kubectl(nil, "-n", "kube-system", "get", "pods", "-o", "wide"); err != nil {
		return err
	}
	kconn, err := grpc.NewClient("unix://"+kmsNode.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer kconn.Close()
	kmsClient := kmsapi.NewKeyManagementServiceClient(kconn)
	st, err := kmsClient.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		return err
	}
	show("Status on the shared socket: version %s, healthz %s, key_id %s", st.Version, st.Healthz, st.KeyId)

	step("namespaces payments-prod (environment prod) and payments-dev (dev); secrets in Vault, per environment")
	for ns, e := range map[string]string{"payments-prod": "prod", "payments-dev": "dev"} {
		if _, err := k.CreateNamespace(ctx, ns, map[string]string{policy.EnvironmentLabel: e}); err != nil {
			return err
		}
		if _, err := k.CreateServiceAccount(ctx, ns, "api"); err != nil {
			return err
		}
	}
	if err := v.EnableKVv2(ctx, "kv"); err != nil {
		return err
	}
	if err := v.KubernetesAuth(ctx, "kubernetes", k); err != nil {
		return err
	}
	values := map[string]string{"prod": "prod-db-" + fmt.Sprint(time.Now().UnixNano()), "dev": "dev-db-password"}
	for e, val := range values {
		ns := "payments-" + e
		if _, err := v.PutKV(ctx, "kv", e+"/"+ns+"/db", map[string]any{"password": val}); err != nil {
			return err
		}
		// deploy/vault/namespace-read.hcl, as deploy/vault/setup.sh writes it.
		if err := v.GrantEnvironment(ctx, "kubernetes", "kv", e, []string{ns}, []string{"api"}, "keyward"); err != nil {
			return err
		}
		show("kv/%s/%s/db (password); Vault role %s: kv/data/%s/<the login's namespace>/* and kv/data/%s/shared/*", e, ns, e, e, e)
	}
	if _, err := d.kubectl(nil, "get", "namespaces", "-L", policy.EnvironmentLabel, "payments-prod", "payments-dev"); err != nil {
		return err
	}

	step("kubectl apply -k deploy/overlays/dev, with the broker's policy (and Vault's address; host network: no kube-proxy here)")
	for _, l := range strings.Split(strings.TrimSpace(policyYAML), "\n") {
		show("  %s", l)
	}
	start = time.Now()
	broker, err := d.c.DeployBroker(ctx, policyYAML, auditKey, func(obj string) { show("%s created", obj) })
	if err != nil {
		return err
	}
	show("the DaemonSet's pod %s Ready and registered with kubelet %s later", broker.Name, time.Since(start).Round(100*time.Millisecond))
	if _, err := d.kubectl(nil, "-n", realnode.SystemNamespace, "get", "daemonset,pods"); err != nil {
		return err
	}
	if _, err := d.kubectl(nil, "get", "csinode", node.Name); err != nil {
		return err
	}

	step("payments-prod/reader mounts its secret: secretcheck proves it from inside the pod")
	reader := realnode.SecretPod("payments-prod", "reader", "payments-prod/db", map[string][]string{
		"check": {"-expect", "db-password=" + values["prod"]},
		"app":   {"-expect", "db-password=" + values["prod"], "-hold"},
	})
	if reader, err = k.Client.CoreV1().Pods(reader.Namespace).Create(ctx, reader, metav1.CreateOptions{}); err != nil {
		return err
	}
	var verdict realnode.Verdict
	if err := realnode.Poll(ctx, 3*time.Minute, "the reader's check container done", func() error {
		cur, err := k.Client.CoreV1().Pods(reader.Namespace).Get(ctx, reader.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		var code int32
		if verdict, code, err = realnode.ContainerVerdict(cur, "check"); err != nil {
			return fmt.Errorf("%v: %s", err, d.c.PodStates(ctx, reader.Namespace))
		}
		if code != 0 || !verdict.Passed() {
			return realnode.Permanent(fmt.Errorf("secretcheck failed (exit %d): %+v", code, verdict))
		}
		reader = cur
		return nil
	}); err != nil {
		return err
	}
	if _, err := d.kubectl(nil, "-n", "payments-prod", "get", "pod", "reader"); err != nil {
		return err
	}
	if _, err := d.kubectl(nil, "-n", "payments-prod", "get", "pod", "reader", "-o",
		`jsonpath={.status.containerStatuses[?(@.name=="check")].state.terminated.message}`); err != nil {
		return err
	}
	target := d.c.VolumePath(reader)
	fs, err := realnode.MountedFS(target)
	if err != nil || fs != "tmpfs" {
		return fmt.Errorf("the reader's volume %s is mounted as %q (%v), want tmpfs", target, fs, err)
	}
	fi, err := os.Stat(filepath.Join(target, "db-password"))
	if err != nil {
		return err
	}
	show("on the node: %s is a %s, db-password mode %v, %d bytes (the value is not printed)", target, fs, fi.Mode(), fi.Size())

	step("payments-dev/sneaky asks for payments-prod's secret: the broker refuses, the pod never starts")
	sneaky := realnode.SecretPod("payments-dev", "sneaky", "payments-prod/db", map[string][]string{"app": {"-expect", "db-password=x"}})
	if _, err := k.Client.CoreV1().Pods(sneaky.Namespace).Create(ctx, sneaky, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := d.c.FailedMount(ctx, "payments-dev", "sneaky", "PermissionDenied"); err != nil {
		return err
	}
	if _, err := d.kubectl(nil, "-n", "payments-dev", "get", "pod", "sneaky"); err != nil {
		return err
	}
	if _, err := d.kubectl(events, "-n", "payments-dev", "describe", "pod", "sneaky"); err != nil {
		return err
	}

	step("payments-dev/writable mounts its own secret without readOnly: true (a root container could plant links in it): refused")
	writable := realnode.SecretPod("payments-dev", "writable", "payments-dev/db", map[string][]string{"app": {"-expect", "db-password=x"}})
	writable.Spec.Volumes[0].CSI.ReadOnly = nil
	if _, err := k.Client.CoreV1().Pods(writable.Namespace).Create(ctx, writable, metav1.CreateOptions{}); err != nil {
		return err
	}
	ev, err := d.c.FailedMount(ctx, "payments-dev", "writable", "InvalidArgument")
	if err != nil {
		return err
	}
	show("event %s: %.150s...", ev.Reason, ev.Message)

	step("the apiserver takes deploy/control-plane/encryption-config.yaml: a Secret, as stored in etcd, is a keyward-kms envelope")
	probe := func(name string) error {
		_, err := k.Client.CoreV1().Secrets("payments-prod").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name},
			StringData: map[string]string{"key": "demo-plaintext-never-in-etcd"}}, metav1.CreateOptions{})
		return err
	}
	start = time.Now()
	name, err := d.c.UseKMS(ctx, kmsNode.Socket, "payments-prod", probe)
	if err != nil {
		return err
	}
	show("the apiserver reloaded its encryption config and stores Secrets through keyward-kms %s after the file was written", time.Since(start).Round(100*time.Millisecond))
	raw, err := d.c.RawSecret(ctx, "payments-prod", name)
	if err != nil {
		return err
	}
	envl, err := envelope.ParseStored([]byte(raw))
	if err != nil || strings.Contains(raw, "demo-plaintext") {
		return fmt.Errorf("the Secret is not KMS v2 encrypted in etcd (%v)", err)
	}
	show("etcd /registry/secrets/payments-prod/%s: %q... (%d bytes; no plaintext)", name, raw[:32], len(raw))
	show("envelope: provider %s, key_id %s", envl.Provider, envl.KeyID)

	step("rotate the key-encryption key on the node (the README's runbook)")
	if out, err = d.ctl(kmsNode.HSM.Env(), "kms", "keys", "rotate", "--config", kmsNode.Config); err != nil {
		return err
	}
	show("keywardctl kms keys rotate: %s", strings.SplitN(out, "\n", 2)[0])
	if err := kmsNode.ChownTokens(); err != nil {
		return err
	}
	show("chown -R 65532:65532 the token directory (SoftHSM: the new key's files are keyward-kms's)")
	pid, err := realnode.ContainerPid(kmsNode.Pod, "kms", "keyward-kms")
	if err != nil {
		return err
	}
	if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
		return err
	}
	old := st.KeyId
	if err := realnode.Poll(ctx, time.Minute, "Status with the new key", func() error {
		st, err = kmsClient.Status(ctx, &kmsapi.StatusRequest{})
		if err == nil && st.KeyId == old {
			err = fmt.Errorf("still %s", old)
		}
		return err
	}); err != nil {
		return err
	}
	show("SIGHUP to the kms container's process (pid %d): Status reports key_id %s (was %s)", pid, st.KeyId, old)
	if out, err = d.ctl(kmsNode.HSM.Env(), "kms", "keys", "list", "--config", kmsNode.Config); err != nil {
		return err
	}
	for _, l := range strings.Split(out, "\n") {
		show("%s", l)
	}

	step("delete the reader: kubelet unpublishes, the broker wipes the files and unmounts the tmpfs")
	grace := int64(1)
	if err := k.Client.CoreV1().Pods("payments-prod").Delete(ctx, "reader", metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		return err
	}
	if err := realnode.Poll(ctx, 2*time.Minute, "the reader's volume gone", func() error {
		if _, err := os.Stat(target); !os.IsNotExist(err) {
			return fmt.Errorf("%s: %v", target, err)
		}
		return nil
	}); err != nil {
		return err
	}
	show("%s: no mount, no file", target)

	step("the node's audit streams: keywardctl audit verify against the newest checkpoint each daemon wrote to its container log")
	_, logDir := d.c.BrokerDirs()
	streams := []struct{ stream, dir, logs string }{
		{"broker", filepath.Join(logDir, "broker-audit"), filepath.Join(node.PodLogDir, realnode.SystemNamespace+"_"+broker.Name+"_*", "broker", "*.log")},
		{"kms", kmsNode.AuditDir, filepath.Join(node.PodLogDir, "kube-system_"+kmsNode.Pod.Name+"_*", "kms", "*.log")},
	}
	for _, s := range streams {
		var cpLog string
		if err := realnode.Poll(ctx, 2*time.Minute, s.stream+"'s first checkpoint in its container log", func() error {
			logs, _ := filepath.Glob(s.logs)
			for _, l := range logs {
				if b, err := os.ReadFile(l); err == nil && strings.Contains(string(b), "keyward_audit_checkpoint") {
					cpLog = l
					return nil
				}
			}
			return fmt.Errorf("no checkpoint in %v", logs)
		}); err != nil {
			return err
		}
		if out, err = d.ctl(nil, "audit", "verify", s.dir, "--master-key-file", auditMaster, "--node", node.Name, "--stream", s.stream,
			"--checkpoint", cpLog); err != nil {
			return err
		}
		show("$ keywardctl audit verify %s --node %s --stream %s --checkpoint %s", s.dir, node.Name, s.stream, cpLog)
		show("  %s", out)
	}
	if out, err = d.ctl(nil, "audit", "query", "--decision", "deny", streams[0].dir); err != nil {
		return err
	}
	show("$ keywardctl audit query --decision deny %s", streams[0].dir)
	lines := strings.Split(out, "\n")
	for _, l := range lines[:min(3, len(lines))] {
		if len(l) > 200 {
			l = l[:200] + "..."
		}
		show("  %s", l)
	}
	show("  ... %d refusals in all: kubelet retries the two pods' mounts with backoff, and the broker audits every refusal", len(lines)-1)
	return nil
}
