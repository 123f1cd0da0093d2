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
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/test/harness"
	"github.com/keyward/keyward/test/images"
)

// kmsUID is the keyward-kms image's user: the node gives it its files (deploy/README.md).
const kmsUID = 65532

// kmsStaticPod runs deploy/control-plane/keyward-kms.yaml as a static pod of the node, with the image
// built from this tree under the manifest's own name, then gives the apiserver
// deploy/control-plane/encryption-config.yaml: Secrets written afterwards are KMS v2 envelopes of
// keyward-kms in etcd, and read back through it.
func (r *realNode) kmsStaticPod(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	pod := &corev1.Pod{}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(readObject(t, "../../deploy/control-plane/keyward-kms.yaml").Object, pod); err != nil {
		t.Fatal(err)
	}
	image := pod.Spec.Containers[0].Image // keyward/keyward-kms:v0.1.0: built and imported under that name
	name, tag, _ := strings.Cut(strings.TrimPrefix(image, "keyward/"), ":")
	root, err := harness.RepoFile(".")
	if err != nil {
		t.Fatal(err)
	}
	built, err := images.Build(ctx, images.Options{ModuleDir: root, OutDir: harness.Dir(t), Images: []string{name}, Tag: tag,
		ModuleDeps: []string{harness.SoftHSMModule}, // make images' default (KMS_MODULE_DEPS): SoftHSM's libraries
		Meta:       images.Meta{Source: "https://example.invalid/keyward", Revision: "e2e", Version: "e2e", Created: time.Unix(0, 0).UTC()}})
	if err != nil {
		t.Fatal(err)
	}
	if built[0].Ref != image {
		t.Fatalf("built %s, the manifest runs %s", built[0].Ref, image)
	}
	if err := r.node.ImportImage(ctx, built[0].Tar); err != nil {
		t.Fatal(err)
	}
	paths := r.provisionKMSNode(t)
	// The node's files are the test's, not this machine's /etc/keyward, /etc/softhsm,
	// /var/lib/softhsm/tokens, /var/run/keyward and /var/log/keyward (other tests share the machine).
	// The PKCS#11 module stays the machine's, as the manifest mounts it.
	moved := 0
	for i, v := range pod.Spec.Volumes {
		if p, ok := paths[v.Name]; ok {
			pod.Spec.Volumes[i].HostPath.Path = p
			moved++
		}
	}
	if moved != len(paths) {
		t.Fatalf("moved %d of the manifest's host paths, want %d: %+v", moved, len(paths), pod.Spec.Volumes)
	}
	b, err := yaml.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(r.node.StaticPodDir, "keyward-kms.yaml"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	mirror := pod.Name + "-" + r.node.Name
	eventually(t, 2*time.Minute, "the keyward-kms static pod Ready", func() error {
		p, err := r.kube.Client.CoreV1().Pods(pod.Namespace).Get(ctx, mirror, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodRunning || !podReady(p) {
			return fmt.Errorf("%s: %s", mirror, r.podStates(ctx, pod.Namespace))
		}
		return nil
	})
	t.Logf("the keyward-kms static pod was Ready %s after its manifest was written", time.Since(start).Round(100*time.Millisecond))
	socket := filepath.Join(paths["socket-dir"], "kms.sock")
	if st, err := os.Stat(socket); err != nil || st.Mode()&os.ModeSocket == 0 {
		t.Fatalf("no KMS socket in the shared directory: %v", err)
	}
	r.encryptThroughKMS(ctx, t, socket)
}

// provisionKMSNode does on the node what deploy/README.md asks of every control-plane node, in the
// test's directory: a SoftHSM token with the KEK (keywardctl kms keys create), the PIN, the audit key
// and the shipped kms.yaml in the config directory, softhsm2.conf naming the tokens' mount path, and
// all of it, the socket and audit directories included, owned by 65532. It returns the host path of
// each of the manifest's volumes it provides.
func (r *realNode) provisionKMSNode(t *testing.T) map[string]string {
	t.Helper()
	base := filepath.Join(r.hostDir, "kms")
	paths := map[string]string{"socket-dir": "run-keyward", "config": "etc-keyward", "softhsm-conf": "etc-softhsm", "audit-log": "kms-audit"}
	for k, v := range paths {
		paths[k] = filepath.Join(base, v)
		if err := os.MkdirAll(paths[k], 0o700); err != nil {
			t.Fatal(err)
		}
	}
	hsm, err := harness.NewSoftHSM(filepath.Join(base, "hsm"), "keyward") // the shipped kms.yaml's tokenLabel
	harness.Check(t, err)
	paths["tokens"] = hsm.TokenDir
	shipped, err := os.ReadFile("../../deploy/control-plane/kms.yaml")
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		filepath.Join(paths["config"], "kms.yaml"):            string(shipped),
		filepath.Join(paths["config"], "hsm.pin"):             hsm.UserPIN,
		filepath.Join(paths["config"], "audit.key"):           strings.Repeat("a", 48),
		filepath.Join(paths["softhsm-conf"], "softhsm2.conf"): "directories.tokendir = /var/lib/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
	}
	for p, content := range files {
		if err := os.WriteFile(p, []byte(content), 0o400); err != nil {
			t.Fatal(err)
		}
	}
	// The operator creates the KEK with keywardctl on the node: the shipped config, with the PIN
	// file's host path.
	hostCfg := filepath.Join(base, "kms-host.yaml")
	if err := os.WriteFile(hostCfg, []byte(strings.ReplaceAll(string(shipped), "/etc/keyward/hsm.pin", filepath.Join(paths["config"], "hsm.pin"))), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, out := ctl(t, hsm.Env(), "kms", "keys", "create", "--config", hostCfg); code != 0 {
		t.Fatalf("keywardctl kms keys create: %d %s", code, out)
	}
	for _, dir := range []string{paths["socket-dir"], paths["config"], paths["softhsm-conf"], paths["audit-log"], paths["tokens"]} {
		if err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			return os.Chown(p, kmsUID, kmsUID)
		}); err != nil {
			t.Fatal(err)
		}
	}
	return paths
}

// encryptThroughKMS writes deploy/control-plane/encryption-config.yaml (its endpoint the shared
// socket's host path) as the apiserver's encryption config and waits until a new Secret is stored in
// etcd as a keyward KMS v2 envelope; it reads back through the apiserver.
func (r *realNode) encryptThroughKMS(ctx context.Context, t *testing.T, socket string) {
	t.Helper()
	shipped, err := os.ReadFile("../../deploy/control-plane/encryption-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := strings.ReplaceAll(string(shipped), "unix:///var/run/keyward/kms.sock", "unix://"+socket)
	if cfg == string(shipped) {
		t.Fatal("the shipped encryption config no longer names unix:///var/run/keyward/kms.sock")
	}
	// Before: Secrets are stored as they are (the identity provider).
	secrets := r.kube.Client.CoreV1().Secrets("payments-prod")
	mk := func(name string) {
		t.Helper()
		if _, err := secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name},
			StringData: map[string]string{"password": secretCanary}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mk("before-kms")
	if raw := r.rawSecret(t, "payments-prod", "before-kms"); !strings.Contains(raw, secretCanary) {
		t.Fatal("with the identity provider the Secret is not in etcd as written: the check below would prove nothing")
	}
	if err := os.WriteFile(r.encryption, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	n := 0
	var name string
	eventually(t, 3*time.Minute, "a new Secret stored through keyward-kms", func() error {
		n++
		name = fmt.Sprintf("through-kms-%d", n)
		mk(name)
		if raw := r.rawSecret(t, "payments-prod", name); !strings.HasPrefix(raw, "k8s:enc:kms:v2:keyward:") {
			return fmt.Errorf("%s is stored as %q...", name, raw[:min(24, len(raw))])
		}
		return nil
	})
	t.Logf("the apiserver stored Secrets through keyward-kms %s after the encryption config was written", time.Since(start).Round(100*time.Millisecond))
	rawKeyID(t, r.etcd, "payments-prod", name) // a keyward envelope, no plaintext
	got, err := secrets.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if string(got.Data["password"]) != secretCanary {
		t.Fatal("the Secret stored through keyward-kms does not read back as written")
	}
}

// rawSecret is a Secret's value as etcd holds it.
func (r *realNode) rawSecret(t *testing.T, ns, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := r.etcd.Client.Get(ctx, "/registry/secrets/"+ns+"/"+name)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("etcd get %s/%s: %v", ns, name, err)
	}
	return string(resp.Kvs[0].Value)
}
