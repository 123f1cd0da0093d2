package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/kms/envelope"
	"github.com/keyward/keyward/test/harness"
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
	dir     string
	bin     string
	procs   []*proc
	cleanup []func()
}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
}

// check fails when the process has exited, pointing at its log.
func (p *proc) check(dir string) error {
	select {
	case <-p.done:
		return errExited{fmt.Errorf("%s exited; see %s.log:\n%s", p.name, p.name, strings.Join(tail(filepath.Join(dir, p.name+".log"), 3), "\n"))}
	default:
		return nil
	}
}

func (d *demo) teardown() {
	step("tear down")
	for i := len(d.cleanup) - 1; i >= 0; i-- {
		d.cleanup[i]()
	}
	for i := len(d.procs) - 1; i >= 0; i-- {
		d.procs[i].cmd.Process.Signal(syscall.SIGTERM)
		<-d.procs[i].done
	}
	if d.dir != "" {
		tmpfs.UnmountAllUnder(d.dir) // only if an unpublish above failed
	}
	if d.dir != "" && os.Getenv("KEYWARD_DEMO_KEEP") == "" {
		os.RemoveAll(d.dir)
	}
	show("stopped every process, unmounted the volume, removed %s", d.dir)
}

func (d *demo) start(name string, env []string, args ...string) (*proc, error) {
	logf, err := os.Create(filepath.Join(d.dir, name+".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(filepath.Join(d.bin, name), args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); logf.Close(); close(p.done) }()
	d.procs = append(d.procs, p)
	return p, nil
}

func (d *demo) ctl(env []string, args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(d.bin, "keywardctl"), args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// errExited marks an error poll must not retry.
type errExited struct{ error }

func poll(ctx context.Context, f func() error) error {
	for {
		err := f()
		if err == nil {
			return nil
		}
		if e, ok := err.(errExited); ok {
			return e.error
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
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
		return fmt.Errorf("the demo mounts tmpfs volumes as the CSI driver does: run it as root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var err error
	if d.dir, err = harness.ShortTempDir("kw-demo-"); err != nil {
		return err
	}
	d.bin = filepath.Join(d.dir, "bin")
	step("build keyward-kms, keyward-broker and keywardctl")
	if out, err := exec.Command("go", "build", "-o", d.bin+"/", "github.com/keyward/keyward/cmd/...").CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v: %s", err, out)
	}

	step("SoftHSM2 token with a key-encryption key that never leaves it")
	hsm, err := harness.NewSoftHSM(d.dir, "keyward")
	if err != nil {
		return err
	}
	kmsCfg := filepath.Join(d.dir, "kms.yaml")
	os.WriteFile(kmsCfg, []byte(fmt.Sprintf("pkcs11: {module: %s, tokenLabel: keyward, pinFile: %s, keyLabel: kek}\nhealthInterval: 1s\n", hsm.Module, hsm.PINFile)), 0o600)
	out, err := d.ctl(hsm.Env(), "kms", "keys", "create", "--config", kmsCfg)
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	show("keywardctl kms keys create: %s", out)

	step("keyward-kms: the KMS v2 plugin on a unix socket")
	// One audit key per node, derived from a master key the security team keeps off the nodes.
	auditMaster, auditKey := filepath.Join(d.dir, "audit-master.key"), filepath.Join(d.dir, "audit.key")
	os.WriteFile(auditMaster, []byte(strings.Repeat("demo-audit-master-", 3)), 0o600)
	if out, err = d.ctl(nil, "audit", "node-key", "--master-key-file", auditMaster, "--node", "node-1", "--out", auditKey); err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	show("keywardctl audit node-key: %s", out)
	kmsSock, kmsAudit := filepath.Join(d.dir, "kms.sock"), filepath.Join(d.dir, "kms-audit")
	kmsProc, err := d.start("keyward-kms", hsm.Env(), "--socket", kmsSock, "--config", kmsCfg, "--metrics-address", "",
		"--node-name", "node-1", "--audit-dir", kmsAudit, "--audit-key-file", auditKey, "--audit-checkpoint-interval", "1s")
	if err != nil {
		return err
	}
	kconn, err := grpc.NewClient("unix://"+kmsSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer kconn.Close()
	kmsClient := kmsapi.NewKeyManagementServiceClient(kconn)
	var st *kmsapi.StatusResponse
	if err := poll(ctx, func() error {
		if err := kmsProc.check(d.dir); err != nil {
			return err
		}
		st, err = kmsClient.Status(ctx, &kmsapi.StatusRequest{})
		if err == nil && st.Healthz != "ok" {
			err = fmt.Errorf("healthz %s", st.Healthz)
		}
		return err
	}); err != nil {
		return err
	}
	show("Status: version %s, healthz %s, key_id %s", st.Version, st.Healthz, st.KeyId)

	step("etcd %s and kube-apiserver %s with keyward-kms as the encryption provider for Secrets",
		harness.Versions()["ETCD_VERSION"], harness.Versions()["KUBE_VERSION"])
	encCfg := filepath.Join(d.dir, "encryption.yaml")
	if err := harness.WriteEncryptionConfig(encCfg, kmsSock, 3*time.Second); err != nil {
		return err
	}
	env, err := harness.StartEnv(ctx, harness.EnvOptions{Kube: true, Vault: true, KubeOptions: harness.KubeOptions{EncryptionConfig: encCfg}})
	if err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, env.Stop)
	k, v := env.Kube, env.Vault
	show("apiserver %s, etcd %s (mutual TLS), Vault %s (a test dev server)", k.URL, env.Etcd.Endpoint, v.Addr)

	step("namespaces payments-prod (environment prod) and payments-dev (dev), a pod in each, and the policy")
	pods := map[string]*corev1.Pod{}
	for ns, e := range map[string]string{"payments-prod": "prod", "payments-dev": "dev"} {
		if _, err := k.CreateNamespace(ctx, ns, map[string]string{"keyward.dev/environment": e}); err != nil {
			return err
		}
		if _, err := k.CreateServiceAccount(ctx, ns, "api"); err != nil {
			return err
		}
		if pods[ns], err = k.CreatePod(ctx, ns, "api-0", "api", "node-1"); err != nil {
			return err
		}
		show("namespace %s (keyward.dev/environment=%s), pod api-0 uid %s", ns, e, pods[ns].UID)
	}
	policyPath := filepath.Join(d.dir, "policy.yaml")
	os.WriteFile(policyPath, []byte(policyYAML), 0o600)
	for _, l := range strings.Split(strings.TrimSpace(policyYAML), "\n") {
		show("  %s", l)
	}

	step("secrets in Vault (KV v2 per environment) with kubernetes-auth roles and per-namespace policies per environment")
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
		show("kv/%s/%s/db (password); Vault policy %s-read: kv/data/%s/<the login's namespace>/* and kv/data/%s/shared/*", e, ns, e, e, e)
	}

	step("keyward-broker: the CSI node driver")
	kubeconfig, err := k.WriteKubeconfig(filepath.Join(d.dir, "kubeconfig"), "")
	if err != nil {
		return err
	}
	brokerCfg := filepath.Join(d.dir, "broker.yaml")
	os.WriteFile(brokerCfg, []byte(fmt.Sprintf("policyFile: %s\nvault: {address: %s, allowInsecureHTTP: true}\n", policyPath, v.Addr)), 0o600)
	csiSock, brokerAudit := filepath.Join(d.dir, "csi.sock"), filepath.Join(d.dir, "broker-audit")
	brokerProc, err := d.start("keyward-broker", nil, "--csi-socket", csiSock, "--node-id", "node-1", "--config", brokerCfg,
		"--kubeconfig", kubeconfig, "--audit-dir", brokerAudit, "--audit-key-file", auditKey, "--audit-checkpoint-interval", "1s",
		"--kubelet-dir", filepath.Join(d.dir, "kubelet"), "--metrics-address", "",
		"--kubelet-registration-dir", "") // the demo plays kubelet itself: never register with the host's
	if err != nil {
		return err
	}
	cconn, err := grpc.NewClient("unix://"+csiSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() { cconn.Close() })
	node, ident := csipb.NewNodeClient(cconn), csipb.NewIdentityClient(cconn)
	if err := poll(ctx, func() error {
		if err := brokerProc.check(d.dir); err != nil {
			return err
		}
		r, err := ident.Probe(ctx, &csipb.ProbeRequest{})
		if err == nil && !r.GetReady().GetValue() {
			err = fmt.Errorf("not ready")
		}
		return err
	}); err != nil {
		return err
	}
	show("Probe: ready")

	publishRW := func(pod *corev1.Pod, target, secrets string, readOnly bool) error {
		tok, err := k.PodToken(ctx, pod, []string{"keyward"}, 10*time.Minute)
		if err != nil {
			return err
		}
		tokens, _ := json.Marshal(map[string]map[string]string{"keyward": {"token": tok}})
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil { // kubelet creates the parent
			return err
		}
		_, err = node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{
			VolumeId: "demo-" + string(pod.UID), TargetPath: target, Readonly: readOnly,
			VolumeCapability: &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
				AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY}},
			VolumeContext: map[string]string{csi.AttrSecrets: secrets, csi.AttrTokens: string(tokens), csi.AttrPodName: pod.Name,
				csi.AttrPodNamespace: pod.Namespace, csi.AttrPodUID: string(pod.UID), csi.AttrSAName: "api"},
		})
		return err
	}
	publish := func(pod *corev1.Pod, target, secrets string) error { return publishRW(pod, target, secrets, true) }
	step("a simulated kubelet publishes payments-prod/api-0's volume with a real TokenRequest token")
	target := filepath.Join(d.dir, "kubelet/pods", string(pods["payments-prod"].UID), "volumes/kubernetes.io~csi/secrets/mount")
	if err := publish(pods["payments-prod"], target, "- {ref: payments-prod/db, key: password, file: db-password}"); err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() {
		_, err := node.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: "demo-" + string(pods["payments-prod"].UID), TargetPath: target})
		if err != nil {
			show("NodeUnpublishVolume: %v", err)
		} else {
			show("NodeUnpublishVolume: the volume's files were overwritten and the tmpfs unmounted")
		}
	})
	onTmpfs, _ := tmpfs.IsTmpfs(target)
	files, err := tmpfs.Read(target)
	if err != nil || len(files) != 1 || string(files[0].Data) != values["prod"] {
		return fmt.Errorf("the volume does not hold the prod secret (%v)", err)
	}
	show("%s", target)
	show("  %s  mode %v  %d bytes (the prod value; not printed)  on tmpfs: %v", files[0].Name, files[0].Mode, len(files[0].Data), onTmpfs)
	if !onTmpfs {
		return fmt.Errorf("the volume is not a tmpfs")
	}

	step("payments-dev/api-0 asks for a prod namespace's ref: denied")
	devTarget := filepath.Join(d.dir, "kubelet/pods", string(pods["payments-dev"].UID), "volumes/kubernetes.io~csi/secrets/mount")
	err = publish(pods["payments-dev"], devTarget, "- {ref: payments-prod/db, key: password, file: x}")
	if err == nil {
		return fmt.Errorf("the dev pod was allowed a prod ref")
	}
	show("NodePublishVolume: %s: %s", status.Code(err), status.Convert(err).Message())
	if _, serr := os.Stat(devTarget); !os.IsNotExist(serr) {
		return fmt.Errorf("the refused publish left %s", devTarget)
	}
	show("nothing was mounted or written for it")

	step("a pod asks for a writable volume (a root container could plant links in it): refused")
	err = publishRW(pods["payments-dev"], devTarget, "- {ref: payments-dev/db, key: password, file: x}", false)
	if status.Code(err) != codes.InvalidArgument {
		return fmt.Errorf("a writable volume was not refused: %v", err)
	}
	show("NodePublishVolume: %s: %.110s...", status.Code(err), status.Convert(err).Message())

	step("a Kubernetes Secret, as stored in etcd")
	if _, err := k.Client.CoreV1().Secrets("payments-prod").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "tls"},
		StringData: map[string]string{"key": "demo-plaintext-never-in-etcd"}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	resp, err := env.Etcd.Client.Get(ctx, "/registry/secrets/payments-prod/tls")
	if err != nil || len(resp.Kvs) != 1 {
		return fmt.Errorf("etcd get: %v", err)
	}
	raw := resp.Kvs[0].Value
	envl, err := envelope.ParseStored(raw)
	if err != nil || bytes.Contains(raw, []byte("demo-plaintext")) {
		return fmt.Errorf("the Secret is not KMS v2 encrypted in etcd (%v)", err)
	}
	show("raw value: %q... (%d bytes; no plaintext)", raw[:32], len(raw))
	show("envelope: provider %s, key_id %s, annotations %v", envl.Provider, envl.KeyID, keys(envl.Annotations))

	step("rotate the key-encryption key")
	if out, err = d.ctl(hsm.Env(), "kms", "keys", "rotate", "--config", kmsCfg); err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	show("keywardctl kms keys rotate: %s", strings.SplitN(out, "\n", 2)[0])
	kmsProc.cmd.Process.Signal(syscall.SIGHUP)
	old := st.KeyId
	if err := poll(ctx, func() error {
		st, err = kmsClient.Status(ctx, &kmsapi.StatusRequest{})
		if err == nil && st.KeyId == old {
			err = fmt.Errorf("still %s", old)
		}
		return err
	}); err != nil {
		return err
	}
	show("after SIGHUP, Status reports key_id %s (was %s); kube-apiserver starts a new DEK seed on its next Status poll", st.KeyId, old)
	if out, err = d.ctl(hsm.Env(), "kms", "keys", "list", "--config", kmsCfg); err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	for _, l := range strings.Split(out, "\n") {
		show("%s", l)
	}

	step("the audit streams: tail, then keywardctl audit verify against the last checkpoint each daemon wrote to stdout")
	for _, s := range []struct{ stream, dir string }{{"broker", brokerAudit}, {"kms", kmsAudit}} {
		for _, l := range tail(s.dir, 2) {
			show("%s", l)
		}
		if out, err = d.ctl(nil, "audit", "verify", s.dir, "--master-key-file", auditMaster, "--node", "node-1", "--stream", s.stream,
			"--checkpoint", filepath.Join(d.dir, "keyward-"+s.stream+".log")); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		show("keywardctl audit verify: %s", out)
	}
	return nil
}

func keys(m map[string][]byte) []string {
	var out []string
	for k, v := range m {
		out = append(out, k+"="+string(v))
	}
	return out
}

// tail is the last n lines of a stream directory's newest segment.
func tail(dir string, n int) []string {
	segs, _ := filepath.Glob(filepath.Join(dir, "audit-*.jsonl"))
	if len(segs) == 0 {
		return nil
	}
	f, err := os.Open(segs[len(segs)-1])
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if len(l) > 220 {
			l = l[:220] + "..."
		}
		lines = append(lines, l)
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}
