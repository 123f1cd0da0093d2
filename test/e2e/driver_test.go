package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

// kubelet is a simulated kubelet: it calls the driver as kubelet does for an inline ephemeral volume,
// with a real pod-bound token from TokenRequest.
type kubelet struct {
	e    *brokerEnv
	node csipb.NodeClient
	id   csipb.IdentityClient
	root string
}

const csiSecrets = `
- ref: payments-prod/db
  key: password
  file: db-password
- ref: shared/tls/ca
  key: password
  file: ca.crt
  mode: "0444"
`

// target is kubelet's path of the pod's CSI volume; kubelet creates its parent before publishing.
func (k *kubelet) target(t *testing.T, pod *corev1.Pod) string {
	t.Helper()
	p := filepath.Join(k.root, "pods", string(pod.UID), "volumes/kubernetes.io~csi/secrets/mount")
	if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
		t.Fatal(err)
	}
	return p
}

func (k *kubelet) publish(t *testing.T, pod *corev1.Pod, secrets string, fsGroup string) error {
	t.Helper()
	tok, err := k.e.kube.PodToken(context.Background(), pod, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return k.publishWith(t, pod, tok, secrets, fsGroup)
}

func (k *kubelet) publishWith(t *testing.T, pod *corev1.Pod, tok, secrets, fsGroup string) error {
	t.Helper()
	tokens, _ := json.Marshal(map[string]map[string]string{audience: {"token": tok, "expirationTimestamp": time.Now().Add(10 * time.Minute).Format(time.RFC3339)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := k.node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{
		VolumeId:   "csi-" + string(pod.UID),
		TargetPath: k.target(t, pod),
		VolumeCapability: &csipb.VolumeCapability{
			AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{VolumeMountGroup: fsGroup}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY},
		},
		Readonly: true,
		VolumeContext: map[string]string{
			csi.AttrSecrets: secrets, csi.AttrTokens: string(tokens), csi.AttrEphemeral: "true",
			csi.AttrPodName: pod.Name, csi.AttrPodNamespace: pod.Namespace, csi.AttrPodUID: string(pod.UID),
			csi.AttrSAName: pod.Spec.ServiceAccountName,
		},
	})
	return err
}

func (k *kubelet) unpublish(t *testing.T, pod *corev1.Pod) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := k.node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "csi-" + string(pod.UID), TargetPath: k.target(t, pod)})
	return err
}

// driverOptions shape a driver started for a test.
type driverOptions struct {
	// config is appended to the driver's config file.
	config string
	// args are added to the driver's flags.
	args []string
	// metrics is the metrics address ("": off).
	metrics string
	// provider also serves the Secrets Store CSI Driver provider API.
	provider bool
	// auditDisk, when set, is the size of a tmpfs mounted as the audit directory (a disk that fills).
	auditDisk int64
	// policy is the driver's policy file ("": brokerPolicy).
	policy string
}

// driver is keyward-broker, the binary, serving CSI to a simulated kubelet.
type driver struct {
	owner                             *testing.T // the test the driver lives as long as
	proc                              *proc
	kl                                *kubelet
	conn                              *grpc.ClientConn
	dir, auditLog, key, policy, sock  string
	providerSock, configFile, kubecfg string
	registry                          string // the driver's kubelet plugin registration directory
	args                              []string
}

// startDriver starts keyward-broker as node-1 against the env's apiserver and Vault.
func startDriver(t *testing.T, e *brokerEnv, o driverOptions) *driver {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the CSI e2e tests mount tmpfs and need root, as the node plugin does")
	}
	dir := harness.Dir(t)
	d := &driver{owner: t, dir: dir, auditLog: filepath.Join(dir, "broker-audit"), key: filepath.Join(dir, "audit.key"),
		policy: filepath.Join(dir, "policy.yaml"), sock: filepath.Join(dir, "csi.sock"), configFile: filepath.Join(dir, "broker.yaml"),
		registry: filepath.Join(dir, "plugins_registry")}
	if err := os.Mkdir(d.registry, 0o700); err != nil {
		t.Fatal(err)
	}
	pol := brokerPolicy
	if o.policy != "" {
		pol = o.policy
	}
	os.WriteFile(d.policy, []byte(pol), 0o600)
	var err error
	if d.kubecfg, err = e.kube.WriteKubeconfig(filepath.Join(dir, "kubeconfig"), ""); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(d.configFile, []byte(fmt.Sprintf("policyFile: %s\npolicyReloadInterval: 200ms\ntokenReviewCacheTTL: 1s\nvault:\n  address: %s\n  allowInsecureHTTP: true\n%s",
		d.policy, e.vault.Addr, o.config)), 0o600)
	os.WriteFile(d.key, []byte(strings.Repeat("h", 40)), 0o600)
	d.args = []string{"--csi-socket", d.sock, "--node-id", "node-1", "--kubelet-dir", filepath.Join(dir, "kubelet"),
		"--metrics-address", o.metrics, "--config", d.configFile, "--kubeconfig", d.kubecfg,
		"--audit-dir", d.auditLog, "--audit-key-file", d.key, "--log-level", "debug",
		"--kubelet-registration-dir", d.registry} // its own, not the host's kubelet's
	if o.provider {
		d.providerSock = filepath.Join(dir, "provider.sock")
		d.args = append(d.args, "--provider-socket", d.providerSock)
	}
	d.args = append(d.args, o.args...)
	if o.auditDisk > 0 {
		smallDisk(t, d.auditLog, o.auditDisk)
	}
	d.proc = start(t, nil, filepath.Join(dir, "keyward-broker.log"), "keyward-broker", d.args...)
	if d.conn, err = grpc.NewClient("unix://"+d.sock, grpc.WithTransportCredentials(insecure.NewCredentials())); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.conn.Close() })
	d.kl = &kubelet{e: e, node: csipb.NewNodeClient(d.conn), id: csipb.NewIdentityClient(d.conn), root: filepath.Join(dir, "kubelet")}
	t.Cleanup(func() { tmpfs.UnmountAllUnder(d.kl.root) }) // only matters when a test failed midway
	d.waitReady(t)
	return d
}

// waitReady waits until the driver's CSI Probe says ready.
func (d *driver) waitReady(t *testing.T) {
	t.Helper()
	eventually(t, 30*time.Second, "driver ready", func() error {
		if d.proc.exited() {
			t.Fatalf("driver exited: %s", readFile(t, d.proc.log))
		}
		r, err := d.kl.id.Probe(context.Background(), &csipb.ProbeRequest{})
		if err != nil || !r.GetReady().GetValue() {
			return fmt.Errorf("probe %v %v", r, err)
		}
		return nil
	})
}

// restart stops the driver (SIGTERM) and starts it again with the same flags, but no provider API.
func (d *driver) restart(t *testing.T) {
	t.Helper()
	d.proc.stop(t)
	if _, err := os.Lstat(filepath.Join(d.registry, csi.DriverName+"-reg.sock")); !os.IsNotExist(err) {
		t.Errorf("the registration socket outlived the driver (kubelet would not deregister it): %v", err)
	}
	var args []string
	for i := 0; i < len(d.args); i++ {
		if d.args[i] == "--provider-socket" {
			i++
			continue
		}
		args = append(args, d.args[i])
	}
	d.proc = startFor(t, d.owner, nil, filepath.Join(d.dir, "keyward-broker-2.log"), "keyward-broker", args...)
	d.waitReady(t)
}

// records reads the driver's audit log back.
func (d *driver) records(t *testing.T) []audit.Record {
	t.Helper()
	recs, err := audit.QueryPath(d.auditLog, audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

// podLoginTokens counts the live Vault tokens made by kubernetes-auth logins: the pods' tokens the
// driver holds.
func podLoginTokens(v *harness.Vault) (int, error) {
	list, err := v.Client.Logical().List("auth/token/accessors")
	if err != nil || list == nil {
		return 0, fmt.Errorf("listing token accessors: %v", err)
	}
	keys, _ := list.Data["keys"].([]any)
	n := 0
	for _, k := range keys {
		l, err := v.Client.Logical().Write("auth/token/lookup-accessor", map[string]any{"accessor": k})
		if err != nil || l == nil {
			continue // revoked in between
		}
		if p, _ := l.Data["path"].(string); strings.HasPrefix(p, "auth/kubernetes/login") {
			n++
		}
	}
	return n, nil
}

// wantPodTokens waits until exactly want pod tokens are live in Vault.
func wantPodTokens(t *testing.T, v *harness.Vault, want int, why string) {
	t.Helper()
	eventually(t, 15*time.Second, why, func() error {
		n, err := podLoginTokens(v)
		if err == nil && n != want {
			err = fmt.Errorf("%d pod tokens live in Vault, want %d", n, want)
		}
		return err
	})
}

// revokePodTokens revokes every Vault token a kubernetes-auth login issued.
func revokePodTokens(t *testing.T, v *harness.Vault) {
	t.Helper()
	list, err := v.Client.Logical().List("auth/token/accessors")
	if err != nil || list == nil {
		t.Fatalf("listing token accessors: %v", err)
	}
	keys, _ := list.Data["keys"].([]any)
	for _, k := range keys {
		l, err := v.Client.Logical().Write("auth/token/lookup-accessor", map[string]any{"accessor": k})
		if err != nil || l == nil {
			continue
		}
		if p, _ := l.Data["path"].(string); strings.HasPrefix(p, "auth/kubernetes/login") {
			if _, err := v.Client.Logical().Write("auth/token/revoke-accessor", map[string]any{"accessor": k}); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// readFile is a file's content, or an audit stream directory's (every segment, in order).
func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if st, serr := os.Stat(p); serr == nil && st.IsDir() {
		b, err = audit.ReadAll(p)
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
