package realnode

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/test/harness"
)

// KMSUID is the keyward-kms image's user: the node gives it its files (deploy/README.md).
const KMSUID = 65532

// KMSNode is a control-plane node's keyward-kms: the static pod and the files the node gave it.
type KMSNode struct {
	Pod      *corev1.Pod       // the mirror pod, Ready
	Socket   string            // the KMS socket's host path, shared with the apiserver
	HSM      *harness.SoftHSM  // the token holding the KEK
	Config   string            // the shipped kms.yaml with the PIN file's host path: keywardctl's --config on the node (owned by KMSUID)
	AuditDir string            // the host directory of its audit stream
	Paths    map[string]string // the host path given to each of the manifest's hostPath volumes, by volume name
}

// DeployKMS runs deploy/control-plane/keyward-kms.yaml as a static pod of the node, its image built
// from this tree and imported under the manifest's own name, after provisioning the node as
// deploy/README.md asks (ProvisionKMSNode, with auditKey as the node's audit key; random when empty).
// It returns once the mirror pod is Ready and the socket exists.
func (c *Cluster) DeployKMS(ctx context.Context, auditKey []byte) (*KMSNode, error) {
	pod, err := c.kmsManifest()
	if err != nil {
		return nil, err
	}
	image := pod.Spec.Containers[0].Image // keyward/keyward-kms:v0.1.0: built and imported under that name
	name, tag, _ := strings.Cut(strings.TrimPrefix(image, "keyward/"), ":")
	built, err := BuildImages(ctx, c.Repo, filepath.Join(c.HostDir, "kms-image"), tag, name)
	if err != nil {
		return nil, err
	}
	if built[name].Ref != image {
		return nil, fmt.Errorf("built %s, the manifest runs %s", built[name].Ref, image)
	}
	if err := c.Node.ImportImage(ctx, built[name].Tar); err != nil {
		return nil, err
	}
	k, err := c.ProvisionKMSNode(ctx, auditKey)
	if err != nil {
		return nil, err
	}
	return k, c.StartKMSPod(ctx, k, "")
}

func (c *Cluster) kmsManifest() (*corev1.Pod, error) {
	pod := &corev1.Pod{}
	b, err := os.ReadFile(filepath.Join(c.Repo, "deploy/control-plane/keyward-kms.yaml"))
	if err != nil {
		return nil, err
	}
	if err := yaml.UnmarshalStrict(b, pod); err != nil {
		return nil, fmt.Errorf("deploy/control-plane/keyward-kms.yaml: %w", err)
	}
	return pod, nil
}

// StartKMSPod writes deploy/control-plane/keyward-kms.yaml into the node's static pod directory, its
// hostPath volumes moved to the provisioned node's files and its image replaced by image when that
// is not empty, and waits until the mirror pod (k.Pod) is Ready and the socket exists.
func (c *Cluster) StartKMSPod(ctx context.Context, k *KMSNode, image string) error {
	pod, err := c.kmsManifest()
	if err != nil {
		return err
	}
	if image != "" {
		pod.Spec.Containers[0].Image = image
	}
	// The node's files are the cluster's HostDir's, not this machine's /etc/keyward, /etc/softhsm,
	// /var/lib/softhsm/tokens, /var/run/keyward and /var/log/keyward (other tests share the machine).
	// The PKCS#11 module stays the machine's, as the manifest mounts it.
	moved := 0
	for i, v := range pod.Spec.Volumes {
		if p, ok := k.Paths[v.Name]; ok {
			pod.Spec.Volumes[i].HostPath.Path = p
			moved++
		}
	}
	if moved != len(k.Paths) {
		return fmt.Errorf("moved %d of the manifest's host paths, want %d: %+v", moved, len(k.Paths), pod.Spec.Volumes)
	}
	out, err := yaml.Marshal(pod)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(c.Node.StaticPodDir, "keyward-kms.yaml"), out, 0o600); err != nil {
		return err
	}
	mirror := pod.Name + "-" + c.Node.Name
	err = Poll(ctx, 3*time.Minute, "the keyward-kms static pod Ready", func() error {
		p, err := c.Kube.Client.CoreV1().Pods(pod.Namespace).Get(ctx, mirror, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodRunning || !PodReady(p) {
			return fmt.Errorf("%s: %s", mirror, c.PodStates(ctx, pod.Namespace))
		}
		k.Pod = p
		return nil
	})
	if err != nil {
		return err
	}
	if st, err := os.Stat(k.Socket); err != nil || st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("no KMS socket in the shared directory: %v", err)
	}
	return nil
}

// ChownTokens gives SoftHSM's token directory to KMSUID again, as deploy/README.md's provisioning
// does: keywardctl, run by root on the node (rotate), creates the new key's object files as root.
func (k *KMSNode) ChownTokens() error {
	return filepath.Walk(k.Paths["tokens"], func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Chown(p, KMSUID, KMSUID)
	})
}

// ProvisionKMSNode does on the node what deploy/README.md asks of every control-plane node, under
// HostDir: a SoftHSM token with the KEK (keywardctl kms keys create), the PIN, the audit key and the
// shipped kms.yaml in the config directory, softhsm2.conf naming the tokens' mount path, and all of
// it, the socket and audit directories included, owned by KMSUID.
func (c *Cluster) ProvisionKMSNode(ctx context.Context, auditKey []byte) (*KMSNode, error) {
	base := filepath.Join(c.HostDir, "kms")
	paths := map[string]string{"socket-dir": "run-keyward", "config": "etc-keyward", "softhsm-conf": "etc-softhsm", "audit-log": "kms-log"}
	for k, v := range paths {
		paths[k] = filepath.Join(base, v)
		if err := os.MkdirAll(paths[k], 0o700); err != nil {
			return nil, err
		}
	}
	hsm, err := harness.NewSoftHSM(filepath.Join(base, "hsm"), "keyward") // the shipped kms.yaml's tokenLabel
	if err != nil {
		return nil, err
	}
	paths["tokens"] = hsm.TokenDir
	shipped, err := os.ReadFile(filepath.Join(c.Repo, "deploy/control-plane/kms.yaml"))
	if err != nil {
		return nil, err
	}
	if len(auditKey) == 0 {
		raw := make([]byte, 32)
		if _, err := rand.Read(raw); err != nil {
			return nil, err
		}
		auditKey = []byte(hex.EncodeToString(raw))
	}
	files := map[string]string{
		filepath.Join(paths["config"], "kms.yaml"):            string(shipped),
		filepath.Join(paths["config"], "hsm.pin"):             hsm.UserPIN,
		filepath.Join(paths["config"], "audit.key"):           string(auditKey),
		filepath.Join(paths["softhsm-conf"], "softhsm2.conf"): "directories.tokendir = /var/lib/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
	}
	for p, content := range files {
		if err := os.WriteFile(p, []byte(content), 0o400); err != nil {
			return nil, err
		}
	}
	// The operator creates the KEK with keywardctl on the node: the shipped config, with the PIN
	// file's host path.
	hostCfg := filepath.Join(base, "kms-host.yaml")
	if err := os.WriteFile(hostCfg, []byte(strings.ReplaceAll(string(shipped), "/etc/keyward/hsm.pin", filepath.Join(paths["config"], "hsm.pin"))), 0o600); err != nil {
		return nil, err
	}
	if _, err := c.ctl(ctx, hsm.Env(), "kms", "keys", "create", "--config", hostCfg); err != nil {
		return nil, err
	}
	// hostCfg too: keywardctl runs as 65532 on the node after this (ctlAsKMS), so that the key objects
	// it creates in SoftHSM's token directory stay the plugin's.
	for _, dir := range []string{paths["socket-dir"], paths["config"], paths["softhsm-conf"], paths["audit-log"], paths["tokens"], hostCfg} {
		if err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			return os.Chown(p, KMSUID, KMSUID)
		}); err != nil {
			return nil, err
		}
	}
	return &KMSNode{Socket: filepath.Join(paths["socket-dir"], "kms.sock"), HSM: hsm, Config: hostCfg,
		AuditDir: paths["audit-log"], Paths: paths}, nil
}

// UseKMS writes deploy/control-plane/encryption-config.yaml, its endpoint the socket's host path, as
// the apiserver's encryption config (reloaded automatically), and waits until a Secret written
// afterwards is stored in etcd as a keyward KMS v2 envelope. probe writes a Secret of the given name
// in ns. It returns the name of the first such Secret.
func (c *Cluster) UseKMS(ctx context.Context, socket, ns string, probe func(name string) error) (string, error) {
	shipped, err := os.ReadFile(filepath.Join(c.Repo, "deploy/control-plane/encryption-config.yaml"))
	if err != nil {
		return "", err
	}
	cfg := strings.ReplaceAll(string(shipped), "unix:///var/run/keyward/kms.sock", "unix://"+socket)
	if cfg == string(shipped) {
		return "", fmt.Errorf("the shipped encryption config no longer names unix:///var/run/keyward/kms.sock")
	}
	if err := os.WriteFile(c.Encryption, []byte(cfg), 0o600); err != nil {
		return "", err
	}
	n := 0
	var name string
	err = Poll(ctx, 3*time.Minute, "a new Secret stored through keyward-kms", func() error {
		n++
		name = fmt.Sprintf("through-kms-%d", n)
		if err := probe(name); err != nil {
			return err
		}
		raw, err := c.RawSecret(ctx, ns, name)
		if err != nil {
			return err
		}
		if !strings.HasPrefix(raw, "k8s:enc:kms:v2:keyward:") {
			return fmt.Errorf("%s is stored as %q, not a keyward KMS v2 envelope", name, raw[:min(24, len(raw))])
		}
		return nil
	})
	return name, err
}

// RawSecret is a Secret's value as etcd holds it.
func (c *Cluster) RawSecret(ctx context.Context, ns, name string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	key := "/registry/secrets/" + ns + "/" + name
	resp, err := c.Etcd.Client.Get(ctx, key)
	if err != nil {
		return "", err
	}
	if len(resp.Kvs) != 1 {
		return "", fmt.Errorf("etcd holds %d values at %s", len(resp.Kvs), key)
	}
	return string(resp.Kvs[0].Value), nil
}
